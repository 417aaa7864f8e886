"""`vmetal bench online|offline`: the numbers a user gets, and one clear error for each bad input.

The online tests run against the session's shared server of the tiny random qwen3 model
(tests/support/servers.py). Everything else (bad datasets, an unreachable `--url`, flag errors, CSV and plot
files) needs no server and no engine.
"""

from __future__ import annotations

import csv
import json
import math

import pytest
from typer.testing import CliRunner

from tests.support.servers import SERVED
from vmetal.bench import dataset as ds
from vmetal.bench import report as rep
from vmetal.cli.app import app
from vmetal.server.process import free_port

runner = CliRunner()


@pytest.fixture(autouse=True)
def _home(tmp_path_factory, monkeypatch):
    # Logs (and a demo model, were one built) go to a temp VMETAL_HOME, never the user's.
    monkeypatch.setenv("VMETAL_HOME", str(tmp_path_factory.getbasetemp() / "vmetal-home"))


def invoke(*args: str):
    return runner.invoke(app, ["bench", *args])


def one_error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


# ------------------------------------------------------------------------------------------- no server

def test_malformed_dataset_line_is_named(tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "Hello world", "output_tokens": 4}\n\n{"prompt": "The cat"}\n{"prompt": \n')
    result = invoke("online", "--url", f"http://127.0.0.1:{free_port()}/v1", "--dataset", str(data))
    assert result.exit_code == 2, result.output
    line = one_error_line(result)
    assert f"{data}, line 4" in line and "not valid JSON" in line


@pytest.mark.parametrize("text, where, what", [
    ('{"prompt": "a"}\n["not", "an", "object"]\n', "line 2", "expected a JSON object"),
    ('{"prompt": "a"}\n{"text": "b"}\n', "line 2", '"prompt" or "conversations"'),
    ('{"prompt": "a", "output_tokens": 0}\n', "line 1", "positive integer"),
    ('{"prompt": "a"}\n{"conversations": [{"value": "q"}, {"value": "a"}]}\n', "line 2", "one format"),
    ("", "", "no records"),
])
def test_dataset_checks(tmp_path, text, where, what):
    data = tmp_path / "d.jsonl"
    data.write_text(text)
    with pytest.raises(ds.VmetalError) as info:
        ds.load(data, tmp_path / "out")
    assert f"{data}{', ' + where if where else ''}`" in info.value.message and what in info.value.message
    assert info.value.exit_code == 2


def test_dataset_formats(tmp_path):
    custom = tmp_path / "c.jsonl"
    custom.write_text('{"prompt": "Hello", "output_tokens": 3}\n{"prompt": "Hi", "output_tokens": 5}\n')
    got = ds.load(custom, tmp_path / "o1")
    assert (got.name, got.records, got.all_have_output_tokens) == (ds.CUSTOM, 2, True)
    assert got.path.suffix == ".jsonl" and len(got.path.read_text().splitlines()) == 2

    share = tmp_path / "s.json"
    convo = {"conversations": [{"from": "human", "value": "Hi there"}, {"from": "gpt", "value": "Hello"}]}
    share.write_text(json.dumps([convo, convo], indent=2))
    got = ds.load(share, tmp_path / "o2")
    assert (got.name, got.records) == (ds.SHAREGPT, 2)

    broken = tmp_path / "b.json"
    broken.write_text('[\n  {"conversations": []},\n  {oops}\n]\n')
    with pytest.raises(ds.VmetalError, match="line 3"):
        ds.load(broken, tmp_path / "o3")


def test_unreachable_url_is_one_error_line():
    result = invoke("online", "--url", f"http://127.0.0.1:{free_port()}/v1", "--concurrency", "1")
    assert result.exit_code == 1, result.output
    assert "no server answers at http://127.0.0.1:" in one_error_line(result)
    assert result.stdout == ""


@pytest.mark.parametrize("args, message", [
    (["online"], "nothing to benchmark"),
    (["online", "--demo", "--url", "http://127.0.0.1:1", "--compare", "mlx,paged"], "not `--url`"),
    (["online", "--demo", "--concurrency", "0,4"], "--concurrency 0,4"),
    (["online", "--demo", "--request-rate", "fast"], "--request-rate fast"),
    (["online", "--demo", "--compare", "mlx,cuda"], "unknown backend `cuda`"),
    (["online", "--demo", "--", "--max-concurrency", "4"], "use `--concurrency`"),
    (["offline", "--demo", "--compare", "nope"], "unknown backend `nope`"),
    (["offline", "./no-such-model"], "model folder `./no-such-model` does not exist"),
    (["online", "./no-such-model"], "model folder `./no-such-model` does not exist"),
])
def test_usage_errors(args, message):
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert message in one_error_line(result)


def test_plot_needs_matplotlib(tmp_path):
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        result = invoke("online", "--demo", "--plot", str(tmp_path / "p.png"))
        assert result.exit_code == 2
        assert "`matplotlib`" in one_error_line(result)
    else:
        rep.write_plot(_fake_report(), tmp_path / "p.png")
        assert (tmp_path / "p.png").stat().st_size > 0


def _fake_report() -> dict:
    runs = []
    for backend, speed in (("mlx", 1.0), ("paged", 2.0)):
        for c in (1, 8):
            row = {"backend": backend, "concurrency": c, "num_prompts": 8, "completed": 8, "failed": 0,
                   "duration_s": 1.0, "request_throughput": c * speed, "output_throughput": 100.0 * c * speed,
                   "total_token_throughput": 200.0 * c * speed, "errors": []}
            for metric in ("ttft", "tpot", "itl", "e2el"):
                for stat in ("mean", "median", "p90", "p99"):
                    row[f"{stat}_{metric}_ms"] = 10.0 / speed
            runs.append(row)
    from vmetal.bench.online import Results, ratios

    return {"schema": 1, "kind": "online", "model": "m", "url": None, "backends": ["mlx", "paged"],
            "workload": {}, "runs": runs, "errors": [],
            "ratios": ratios(Results(runs=runs), "mlx")}


def test_compare_table_and_csv_show_ratios(tmp_path):
    import io

    report = _fake_report()
    assert {(r["backend"], r["concurrency"], r["output_throughput"], r["median_ttft_ms"])
            for r in report["ratios"]} == {("paged", 1, 2.0, 2.0), ("paged", 8, 2.0, 2.0)}
    out = io.StringIO()
    rep.print_online(report, out)
    assert "output tok/s vs mlx" in out.getvalue() and "2.00×" in out.getvalue()
    rep.write_csv(report, tmp_path / "r.csv")
    rows = list(csv.DictReader((tmp_path / "r.csv").open()))
    assert len(rows) == 4 and float(rows[2]["output_throughput_vs_mlx"]) == 2.0


# ------------------------------------------------------------------------------------------- engine

@pytest.fixture(scope="module")
def server(default_server):
    """The session's shared server (tests/support/servers.py)."""
    return default_server


@pytest.fixture(scope="module")
def url(server):
    from vmetal.bench.online import quiet_vllm_client

    # vLLM's logging binds its stream once, at import: import it here, outside CliRunner's captured streams.
    quiet_vllm_client()
    import vllm.benchmarks.serve  # noqa: F401

    server.wait_ready(240)
    return server.url


@pytest.mark.slow
def test_offline_single_stream(qwen3_model, server, tmp_path):
    result = invoke("offline", str(qwen3_model), "--prompt-len", "32", "--gen-len", "16", "--trials", "2",
                    "--json", "--csv", str(tmp_path / "off.csv"))
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["kind"] == "offline" and report["complete"] and report["errors"] == []
    (row,) = report["runs"]
    assert row["trials"] == 2 and len(row["per_trial"]) == 2
    assert all(t["tokens"] == 16 for t in row["per_trial"])
    assert row["decode_tps"]["mean"] > 0 and row["prefill_tps"]["mean"] > 0
    assert row["decode_tps"]["min"] <= row["decode_tps"]["median"] <= row["decode_tps"]["max"]
    assert row["peak_memory_bytes"] > 0 and row["peak_rss_bytes"] > 0
    assert (tmp_path / "off.csv").read_text().startswith("backend,")


@pytest.mark.slow
def test_online_against_a_server(url, tmp_path):
    result = invoke("online", "--url", url, "--concurrency", "1,4", "--num-prompts", "6", "--input-len", "24",
                    "--output-len", "8", "--warmup", "1", "--json", "--csv", str(tmp_path / "on.csv"))
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["kind"] == "online" and report["model"] == SERVED and report["complete"]
    assert [r["concurrency"] for r in report["runs"]] == [1, 4]
    for r in report["runs"]:
        assert r["completed"] == r["num_prompts"] == 6 and r["failed"] == 0 and r["errors"] == []
        assert r["total_output_tokens"] == 6 * 8
        for key in ("request_throughput", "output_throughput", "total_token_throughput"):
            assert r[key] > 0
        assert r["total_token_throughput"] > r["output_throughput"]
        for metric in ("ttft", "tpot", "itl", "e2el"):
            stats = [r[f"{s}_{metric}_ms"] for s in ("mean", "median", "p90", "p99")]
            assert all(v is not None and math.isfinite(v) and v >= 0 for v in stats), (metric, stats)
            assert r[f"p99_{metric}_ms"] >= r[f"median_{metric}_ms"]
        assert r["median_e2el_ms"] >= r["median_ttft_ms"] > 0
    rows = list(csv.DictReader((tmp_path / "on.csv").open()))
    assert [int(row["concurrency"]) for row in rows] == [1, 4]
    assert float(rows[0]["output_throughput"]) == pytest.approx(report["runs"][0]["output_throughput"])


@pytest.mark.slow
def test_unknown_model_at_url(url):
    result = invoke("online", "no-such-model", "--url", url)
    assert result.exit_code == 1
    assert f"does not serve `no-such-model` (it serves `{SERVED}`)" in one_error_line(result)


@pytest.mark.slow
def test_online_dataset_table(url, tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"The cat reads {i} red books", "output_tokens": 3 + i}) + "\n"
                            for i in range(3)))
    result = invoke("online", SERVED, "--url", url, "--dataset", str(data), "--concurrency", "2",
                    "--num-prompts", "3", "--warmup", "0")
    assert result.exit_code == 0, result.output
    assert "Throughput" in result.stdout and "Latency (ms)" in result.stdout
    assert "3/3" in result.stdout  # completed/requests of the one run


def test_partial_results_are_kept_when_a_later_level_fails(monkeypatch, tmp_path):
    from vmetal.bench import online as on

    def fake_level(target, workload, concurrency, warmups, log):
        if concurrency == 8:
            raise RuntimeError("server went away")
        row = dict(_fake_report()["runs"][0], backend="server", concurrency=concurrency)
        return row

    monkeypatch.setattr(on, "target_at", lambda url, wanted, key: on.Target("http://h:1", "m", "tok"))
    monkeypatch.setattr(on, "run_level", fake_level)
    result = invoke("online", "--url", "http://h:1/v1", "--concurrency", "1,8,32", "--json",
                    "--csv", str(tmp_path / "partial.csv"))
    assert result.exit_code == 1
    assert "C=8: RuntimeError: server went away" in one_error_line(result)
    report = json.loads(result.stdout)
    assert [r["concurrency"] for r in report["runs"]] == [1] and not report["complete"]
    assert report["errors"][0]["concurrency"] == 8
    assert len(list(csv.DictReader((tmp_path / "partial.csv").open()))) == 1


@pytest.mark.parametrize("command", ["online", "offline"])
def test_torch_refused_by_this_build_is_a_clean_note(command, monkeypatch, tmp_path):
    from vmetal import envs

    def refuse(cfg):
        if not cfg.use_mlx:
            raise envs.EnvError("VLLM_METAL_USE_MLX=0 asks for the PyTorch compute path, which vmetal 0.1.0 "
                                "does not have yet", variable=envs.USE_MLX, value="0")

    monkeypatch.setattr(envs, "check_available", refuse)
    result = invoke(command, str(tmp_path), "--compare", "torch", "--json")  # nothing starts
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["runs"] == [] and report["complete"]
    assert [(e["backend"], e["message"], e["skipped"]) for e in report["errors"]] == [
        ("torch", "not available in this build", True)]
    assert "torch: not available in this build" in result.stderr


def test_engine_refusing_torch_at_start_up_is_recognised():
    from vmetal.bench.online import refused_torch
    from vmetal.server.process import ServerError

    tail = ["Traceback (most recent call last):", "vmetal.envs.EnvError: VLLM_METAL_USE_MLX=0 asks for the "
            "PyTorch compute path, which vmetal 0.1.0 does not have yet; unset VLLM_METAL_USE_MLX"]
    assert refused_torch(ServerError("the vLLM server exited with code 1 before it was ready", tail))
    assert not refused_torch(ServerError("the vLLM server exited with code 1 before it was ready",
                                         ["RuntimeError: Engine core initialization failed"]))


@pytest.mark.slow
def test_offline_compares_ngram_speculation_with_the_plain_path(qwen3_model):
    """`--compare mlx,ngram`: the same greedy workload with and without `--speculative ngram`; `--repeat` builds
    prompts that repeat themselves, so drafts are proposed and checked (and only the ngram row has any)."""
    result = invoke("offline", str(qwen3_model), "--prompt-len", "48", "--gen-len", "24", "--trials", "1",
                    "--repeat", "4", "--compare", "mlx,ngram", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["complete"] and report["workload"]["repeat"] == 4
    rows = {r["backend"]: r for r in report["runs"]}
    assert set(rows) == {"mlx", "ngram"}
    assert all(t["tokens"] == 24 for r in rows.values() for t in r["per_trial"])
    assert rows["mlx"]["spec_draft_tokens"] is None
    assert rows["ngram"]["spec_draft_tokens"] > 0
    assert 0 <= rows["ngram"]["spec_accepted_tokens"] <= rows["ngram"]["spec_draft_tokens"]
    [ratio] = report["ratios"]
    assert ratio["backend"] == "ngram" and ratio["decode_tps"] > 0
