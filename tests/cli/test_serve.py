"""`vmetal serve` and `vmetal.server.process`: argument handling without a server, process handling with small
stand-in children, and one slow test per stop signal against a real server with the demo model."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from typer.testing import CliRunner

from tests.support import fakes
from tests.support.fakes import still_running
from vmetal import envs
from vmetal.cli import options
from vmetal.cli.app import app
from vmetal.server.process import ServerError, ServerProcess, check_port_free, free_port

runner = CliRunner()


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    # The contract's variables and the API key come only from what each test sets.
    for var in envs.VARIABLES:
        monkeypatch.delenv(var.name, raising=False)
    monkeypatch.delenv("VLLM_API_KEY", raising=False)


@pytest.fixture
def fake_server(monkeypatch):
    return fakes.install(monkeypatch)


def invoke(*args: str):
    return runner.invoke(app, ["serve", *args])


def test_help_lists_flags():
    result = invoke("--help")
    assert result.exit_code == 0
    for flag in ("--demo", "--host", "--port", "--api-key", "--max-model-len", "--max-num-seqs",
                 "--paged", "--memory-fraction", "--prefix-cache", "--block-size", "--device",
                 "--served-model-name", "--ready-timeout"):
        assert flag in result.stdout


def test_no_arguments_shows_help_and_version_is_data():
    assert "serve" in runner.invoke(app, []).output
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.startswith("vmetal ")


def test_invalid_combination_stops_before_any_process(fake_server, monkeypatch):
    monkeypatch.setenv(envs.MEMORY_FRACTION, "0.7")
    result = invoke("--demo")
    assert result.exit_code == 2
    first = result.stderr.splitlines()[0]
    assert first.startswith("error: ") and "VLLM_METAL_MEMORY_FRACTION=0.7" in first
    assert "set VLLM_METAL_MEMORY_FRACTION=auto" in first
    # The hint names only flags that were given; here there are none.
    assert "hint" not in result.stderr and "--paged" not in result.stderr
    assert result.stdout == "" and fake_server == []


def test_memory_fraction_flag_needs_paged(fake_server):
    result = invoke("--demo", "--memory-fraction", "0.7", "--port", str(free_port()))
    assert result.exit_code == 2
    assert "VLLM_METAL_MEMORY_FRACTION=0.7 requires VLLM_METAL_USE_PAGED_ATTENTION=1" in result.stderr
    assert "`--memory-fraction` sets VLLM_METAL_MEMORY_FRACTION" in result.stderr and fake_server == []
    assert invoke("--demo", "--paged", "--memory-fraction", "0.7", "--port", str(free_port())).exit_code == 0
    cfg = fake_server[0].kwargs["config"]
    assert cfg.use_paged_attention and cfg.memory_fraction == 0.7 and cfg.sources[envs.MEMORY_FRACTION] == "flag"


@pytest.mark.parametrize("environ, message", [
    # Valid settings whose code path this release does not have.
    ({envs.PREFIX_CACHE: "maybe"}, "VLLM_METAL_PREFIX_CACHE=maybe"),
    ({envs.USE_MLX: "0", envs.USE_PAGED_ATTENTION: "1"}, "the PyTorch path runs with the MLX-managed KV layout only"),
    ({envs.USE_MLX: "maybe"}, "VLLM_METAL_USE_MLX=maybe"),
    # Invalid values.
    ({envs.USE_PAGED_ATTENTION: "1", envs.MEMORY_FRACTION: "1.5"}, "VLLM_METAL_MEMORY_FRACTION=1.5"),
    ({envs.BLOCK_SIZE: "12"}, "VLLM_METAL_BLOCK_SIZE=12"),
])
def test_invalid_environment_exits_2(fake_server, monkeypatch, environ, message):
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    result = invoke("--demo", "--port", str(free_port()))
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert lines[0].startswith("error: ") and message in lines[0]
    assert "hint" not in result.stderr  # no flag was given, so none is named
    assert result.stdout == "" and fake_server == []


@pytest.mark.parametrize("args, variable, hint", [
    (["--block-size", "12"], "VLLM_METAL_BLOCK_SIZE=12", "`--block-size` sets VLLM_METAL_BLOCK_SIZE"),
    (["--block-size", "0"], "VLLM_METAL_BLOCK_SIZE=0", "`--block-size` sets VLLM_METAL_BLOCK_SIZE"),
])
def test_invalid_flag_values_exit_2(fake_server, args, variable, hint):
    result = invoke("--demo", *args)
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ") and variable in result.stderr.splitlines()[0]
    assert hint in result.stderr and fake_server == []


def test_flags_and_environment_are_validated_together(fake_server, monkeypatch):
    monkeypatch.setattr(options, "demo_model", lambda: "/demo")
    monkeypatch.setenv(envs.BLOCK_SIZE, "12")
    assert invoke("--demo", "--port", str(free_port())).exit_code == 2
    # The flag wins over the environment, so the variable's invalid value is never used.
    assert invoke("--demo", "--block-size", "8", "--port", str(free_port())).exit_code == 0
    cfg = fake_server[0].kwargs["config"]
    assert cfg.block_size == 8 and cfg.sources[envs.BLOCK_SIZE] == "flag"


def test_missing_local_model_exits_2_naming_it(fake_server, tmp_path):
    missing = tmp_path / "no-such-model"
    result = invoke(str(missing))
    assert result.exit_code == 2
    assert str(missing) in result.stderr and fake_server == []


def test_model_and_demo_together_exit_2(fake_server):
    assert invoke("./somewhere", "--demo").exit_code == 2


def test_port_in_use_exits_2(fake_server):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = invoke("--demo", "--port", str(port))
    assert result.exit_code == 2
    assert f"port {port}" in result.stderr and "in use" in result.stderr and fake_server == []


def test_flags_reach_the_server(fake_server, qwen3_model, tmp_path):
    tmp_path = tmp_path / "model"
    shutil.copytree(qwen3_model, tmp_path)
    port = free_port()
    result = invoke(str(tmp_path), "--port", str(port),
                    "--block-size", "32", "--device", "cpu", "--max-model-len", "512",
                    "--max-num-seqs", "4", "--api-key", "k", "--ready-timeout", "9", "--no-tool-parser",
                    "--", "--dtype", "float32")
    assert result.exit_code == 0, result.output
    (server,) = fake_server
    assert server.model == str(tmp_path.resolve())
    cfg = server.kwargs["config"]
    assert (cfg.use_paged_attention, cfg.memory_fraction, cfg.block_size, cfg.prefix_cache,
            cfg.mlx_device) == (False, "auto", 32, False, "cpu")
    assert cfg.sources[envs.BLOCK_SIZE] == cfg.sources[envs.MLX_DEVICE] == "flag"
    assert server.kwargs["vllm_args"] == ["--max-num-seqs", "4", "--max-model-len", "512",
                                          "--dtype", "float32"]
    assert server.kwargs["served_model_name"] == str(tmp_path) and server.kwargs["api_key"] == "k"
    assert server.events == ["start", "wait_ready 9", "interrupted", "stop", "stop"]
    assert f"vmetal: serving {tmp_path} at http://127.0.0.1:{port}/v1" in result.stderr
    assert result.stdout == ""


def test_vllm_arguments_after_double_dash_without_model(fake_server, monkeypatch):
    monkeypatch.setattr(options, "demo_model", lambda: "/demo")
    result = invoke("--demo", "--port", str(free_port()), "--", "--enforce-eager")
    assert result.exit_code == 0, result.output
    (server,) = fake_server
    assert server.model == "/demo" and server.kwargs["served_model_name"] == "vmetal-demo"
    assert server.kwargs["vllm_args"] == ["--enforce-eager"]


def test_default_model_is_a_hub_id_passed_through_with_no_pull(fake_server):
    assert invoke("--no-pull", "--port", str(free_port())).exit_code == 0
    assert fake_server[0].model == options.DEFAULT_MODEL == "Qwen/Qwen3-0.6B"


def test_hub_model_is_pulled_before_the_server_starts(fake_server, monkeypatch):
    # Offline (as in these tests) the pull fails and nothing starts, with pull's own message.
    result = invoke("Qwen/Qwen3-0.6B", "--port", str(free_port()))
    assert result.exit_code != 0 and fake_server == []
    assert "HF_HUB_OFFLINE" in result.stderr


def test_public_host_without_key_warns(fake_server, monkeypatch):
    monkeypatch.setattr(options, "demo_model", lambda: "/demo")
    result = invoke("--demo", "--host", "0.0.0.0", "--port", str(free_port()))
    assert result.exit_code == 0 and "warning: " in result.stderr and "--api-key" in result.stderr
    result = invoke("--demo", "--port", str(free_port()))
    assert "warning" not in result.stderr


def test_main_maps_errors_to_exit_codes():
    # The console script path, in a fresh interpreter: also shows that nothing heavy is imported.
    proc = fakes.run_main_fresh(["serve"], {envs.MEMORY_FRACTION: "0.7"})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: VLLM_METAL_MEMORY_FRACTION=0.7")


# ServerProcess with stand-in children: the process-group handling without vLLM's 10 s start.

def stand_in(script: str, **kwargs) -> ServerProcess:
    server = ServerProcess("unused", port=free_port(), echo=False, **kwargs)
    server.argv = [sys.executable, "-c", script]
    return server


def test_child_dying_before_ready_reports_its_last_lines():
    server = stand_in("print('loading'); import sys; sys.exit('boom: no such model')")
    server.start()
    with pytest.raises(ServerError) as info:
        server.wait_ready(timeout=30)
    assert "exited with code 1" in str(info.value) and "boom: no such model" in str(info.value)
    assert server.stop() == 1


def test_stop_ends_the_whole_group_even_when_sigterm_is_ignored(tmp_path):
    log = tmp_path / "server.log"
    script = ("import signal, subprocess, sys, time\n"
              "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
              "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
              "print('up', flush=True); time.sleep(60)\n")
    server = stand_in(script, log_path=log)
    server.start()
    deadline = time.monotonic() + 20
    while "up" not in server.tail and time.monotonic() < deadline:
        time.sleep(0.05)
    family = [psutil.Process(server.pid), *psutil.Process(server.pid).children(recursive=True)]
    assert len(family) == 2
    server.stop(grace=0.5)
    assert server.killed
    assert still_running(family) == [] and log.read_text() == "up\n"


# One real server per stop signal: `vmetal serve --demo`, one completion, then the signal.

@pytest.mark.slow
@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_serve_demo_end_to_end(stop_signal, tmp_path):
    from openai import OpenAI

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_METAL_", "VLLM_MLX_"))}
    vmetal = Path(sys.executable).with_name("vmetal")
    cmd = [str(vmetal)] if vmetal.exists() else [sys.executable, "-m", "vmetal.cli.app"]
    proc = subprocess.Popen([*cmd, "serve", "--demo", "--port", str(port), "--max-model-len", "256"],
                            env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    stderr: list[str] = []
    ready = threading.Event()

    def read_stderr():
        for line in proc.stderr:
            stderr.append(line)
            if line.startswith("vmetal: serving"):
                ready.set()

    readers = [threading.Thread(target=read_stderr, daemon=True),
               threading.Thread(target=proc.stdout.read, daemon=True)]  # vLLM logs to stdout: drain it
    for reader in readers:
        reader.start()
    try:
        assert ready.wait(180), "".join(stderr[-30:])
        ready_line = next(line for line in stderr if line.startswith("vmetal: serving"))
        url = f"http://127.0.0.1:{port}/v1"
        assert ready_line.strip() == f"vmetal: serving vmetal-demo at {url}"

        client = OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)
        completion = client.completions.create(model="vmetal-demo", prompt="Hello", max_tokens=8,
                                               temperature=0)
        assert completion.choices[0].text and completion.usage.completion_tokens == 8

        family = psutil.Process(proc.pid).children(recursive=True)
        assert any("EngineCore" in " ".join(p.cmdline()) or "EngineCore" in p.name() for p in family)
        proc.send_signal(stop_signal)
        assert proc.wait(timeout=60) == 0, "".join(stderr[-30:])
        assert still_running(family) == []
        check_port_free("127.0.0.1", port)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize(("args", "flag"), [
    (["--speculative-config", '{"method": "eagle", "model": "x/y", "num_speculative_tokens": 2}'],
     "--speculative-config"),
    (["--speculative-config.method", "mtp"], "--speculative-config"),
    (["--enable-lora", "--max-loras", "2"], "--enable-lora"),
    (["--kv-transfer-config", "{}"], "--kv-transfer-config"),
    (["--kv-cache-dtype", "fp8"], "--kv-cache-dtype"),
])
def test_vllm_features_the_engine_lacks_are_refused_before_anything_starts(fake_server, args, flag):
    """Speculative decoding used to start, then kill the EngineCore on the first request (HTTP 500 for all):
    what the engine does not implement stops serve's pre-flight with one line naming the flag, exit 2."""
    result = invoke("--demo", "--", *args)
    assert result.exit_code == 2, result.output
    [line] = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert f"`{flag}`" in line and "not implemented by vmetal's engine" in line
    assert fake_server == []


@pytest.mark.parametrize(("args", "env", "line"), [
    (["--speculative-config", '{"model": "Qwen/Qwen3-0.6B"}'], {"VLLM_METAL_USE_MLX": "0"},
     "error: `--speculative-config`: draft-model speculation runs on the MLX-managed and paged KV paths only, and "
     "this server uses the torch path; leave out VLLM_METAL_USE_MLX=0, or start without speculation"),
    (["--speculative-config", '{"method": "ngram"}', "--tensor-parallel-size", "2"], {},
     "error: `--speculative-config`: n-gram speculation runs on one worker, and this server has 2 (tensor "
     "parallel); start without one or the other"),
    (["--convert", "classify"], {}, "error: `--convert classify`: vmetal's engine computes embeddings only "
     "(`--convert embed`, `/v1/embeddings`), not classification or scoring; start without it"),
    (["--runner", "pooling"], {"VLLM_METAL_USE_PAGED_ATTENTION": "1"}, "error: embeddings run on the MLX-managed "
     "KV path only, and this server uses the paged path; leave out VLLM_METAL_USE_PAGED_ATTENTION=1 (`--paged`)"),
    (["--runner", "pooling", "-tp", "2"], {}, "error: embeddings run on one worker, and this server has 2 (tensor "
     "or pipeline parallel); start without one or the other"),
    (["--runner", "pooling", "--pooler-config", '{"seq_pooling_type": "STEP"}'], {}, "error: pooling type STEP: "
     "vmetal pools LAST, MEAN, CLS only; choose one with `--pooler-config '{\"seq_pooling_type\": \"LAST\"}'`"),
])
def test_speculation_and_embeddings_where_they_cannot_run_are_refused(fake_server, monkeypatch, args, env, line):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    result = invoke("--demo", "--", *args)
    assert result.exit_code == 2, result.output
    assert [text for text in result.stderr.splitlines() if text.startswith("error: ")] == [line]
    assert fake_server == []


@pytest.mark.parametrize("args", [["--kv-cache-dtype", "auto"], ["--runner", "generate"], ["--max-loras", "2"],
                                  ["--runner", "pooling"], ["--convert", "embed"],
                                  ["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 3}']])
def test_the_same_flags_with_what_the_engine_does_are_accepted(fake_server, monkeypatch, args):
    monkeypatch.setattr(options, "demo_model", lambda: "/demo")
    result = invoke("--demo", "--", *args)
    assert result.exit_code == 0, result.output
    assert fake_server[0].vllm_args[-len(args):] == args


@pytest.mark.parametrize(("args", "tokens"), [(["--speculative", "ngram"], 4),
                                              (["--speculative", "ngram", "--speculative-tokens", "6"], 6),
                                              (["--speculative", "ngram", "--paged"], 4)])
def test_speculative_ngram_is_vllms_speculative_config(fake_server, monkeypatch, args, tokens):
    import json

    monkeypatch.setattr(options, "demo_model", lambda: "/demo")
    result = invoke("--demo", *args)
    assert result.exit_code == 0, result.output
    given = fake_server[0].vllm_args
    config = json.loads(given[given.index("--speculative-config") + 1])
    assert config == {"method": "ngram", "num_speculative_tokens": tokens, "prompt_lookup_max": 4}


@pytest.mark.parametrize(("args", "line"), [
    (["--speculative-tokens", "3"], "error: `--speculative-tokens` goes with `--speculative ngram|DRAFT_MODEL`"),
    (["--speculative", "./no-such-draft"], "error: draft model folder `./no-such-draft` does not exist"),
    (["--speculative", "ngram", "--", "--speculative-config", '{"method": "ngram"}'],
     "error: give `--speculative` or `--speculative-config` after `--`, not both"),
])
def test_speculative_flags_that_cannot_hold_exit_2(fake_server, args, line):
    result = invoke("--demo", *args)
    assert result.exit_code == 2, result.output
    assert [text for text in result.stderr.splitlines() if text.startswith("error: ")] == [line]
    assert fake_server == []


@pytest.mark.parametrize(("more", "tokens"), [([], 3), (["--speculative-tokens", "5"], 5), (["--paged"], 3)])
def test_speculative_with_a_draft_model_folder(fake_server, qwen3_model, tmp_path, monkeypatch, more, tokens):
    from tests.support.families import first_layers

    draft = first_layers(qwen3_model, tmp_path / "draft", 1)
    monkeypatch.chdir(tmp_path)
    result = invoke(str(qwen3_model), "--speculative", "draft", *more)  # relative: made absolute
    assert result.exit_code == 0, result.output
    given = fake_server[0].vllm_args
    config = json.loads(given[given.index("--speculative-config") + 1])
    assert config == {"method": "draft_model", "model": str(draft.resolve()), "num_speculative_tokens": tokens}
    # The memory pre-flight counts the draft's weights (and its KV) beside the model's.
    weights = sum(p.stat().st_size for p in draft.glob("*.safetensors"))
    assert f"{weights / 2**30:.1f} GiB of them the draft model's" in result.stderr


def test_a_hub_draft_model_is_pulled_first(fake_server, qwen3_model, tmp_path, monkeypatch):
    from tests.support.families import first_layers

    draft = first_layers(qwen3_model, tmp_path / "pulled", 1)
    pulls = []
    monkeypatch.setattr(options, "pulled", lambda *args: pulls.append(args) or str(draft))
    result = invoke(str(qwen3_model), "--speculative", "Qwen/Qwen3-0.6B", "--max-model-len", "256")
    assert result.exit_code == 0, result.output
    assert pulls == [("Qwen/Qwen3-0.6B", 256, "mlx")]
    given = fake_server[0].vllm_args
    assert json.loads(given[given.index("--speculative-config") + 1])["model"] == str(draft)


def test_a_sliding_window_draft_model_is_let_through(fake_server, qwen3_model, tmp_path):
    """The drafter keeps a whole, trimmable cache for a draft's sliding-window layers (draft_model.py), so the
    pre-flight lets a Gemma 3 draft through, for a target on either path."""
    from tests.support.families import as_sliding_window, first_layers

    sliding = first_layers(qwen3_model, tmp_path / "sliding", 2)
    (sliding / "config.json").write_text(json.dumps(as_sliding_window(json.loads((qwen3_model / "config.json")
                                                                                  .read_text()))))
    for more in ([], ["--paged"]):
        result = invoke(str(qwen3_model), "--speculative", str(sliding), *more)
        assert result.exit_code == 0, result.output
        given = fake_server[-1].vllm_args
        assert json.loads(given[given.index("--speculative-config") + 1])["model"] == str(sliding)
    assert len(fake_server) == 2


def test_a_draft_model_that_cannot_draft_stops_at_preflight(fake_server, qwen3_model, tmp_path):
    from tests.support.families import build_family
    from vmetal.demo import build_tiny_model

    config = json.loads((qwen3_model / "config.json").read_text())
    other = build_tiny_model(tmp_path / "other-vocab", "qwen3", hidden_size=64, num_layers=1,
                             vocab_size=config["vocab_size"] + 64)
    hybrid = build_family(tmp_path / "lfm2", "lfm2")
    for draft, line in (
            (other, f"error: draft model `{other}` has a vocabulary of {config['vocab_size'] + 64} tokens and the "
                    f"model it drafts for {config['vocab_size']}: a draft must share the target's tokenizer; pick "
                    "a smaller model of the same family"),
            (hybrid, "error: lfm2 (Lfm2ForCausalLM): a draft model rolls its rejected drafts back out of its own "
                     "cache, and this model also keeps ArraysCache state, which cannot give them back; pick a draft "
                     "whose layers are all attention (full or sliding-window)")):
        result = invoke(str(qwen3_model), "--speculative", str(draft))
        assert result.exit_code == 2, result.output
        [shown] = [text for text in result.stderr.splitlines() if text.startswith("error: ")]
        assert shown.startswith(line), shown
    assert fake_server == []


def test_speculation_on_a_model_whose_cache_cannot_roll_back_stops_at_preflight(fake_server, qwen3_model, tmp_path):
    """Before, the platform refused it in the server process, ~10 s later, after the banner."""
    import json

    from tests.support.families import as_sliding_window

    folder = tmp_path / "sliding"
    shutil.copytree(qwen3_model, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(as_sliding_window(config)))
    result = invoke(str(folder), "--speculative", "ngram")
    assert result.exit_code == 2, result.output
    [line] = [text for text in result.stderr.splitlines() if text.startswith("error: ")]
    assert line.startswith("error: gemma3_text (Gemma3ForCausalLM): speculative decoding") and "RotatingKVCache" in line
    assert line.endswith("serve it without speculation, or use --paged (which rolls nothing back)")
    assert fake_server == []
    # The paged path rolls nothing back: the same model speculates there.
    result = invoke(str(folder), "--speculative", "ngram", "--paged")
    assert result.exit_code == 0, result.output
    assert "--speculative-config" in fake_server[0].vllm_args
