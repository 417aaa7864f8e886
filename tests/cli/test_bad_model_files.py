"""Damaged model folders: one `error:` line naming the file, a non-zero exit, before any engine starts.

Each case takes the tiny qwen3 model, damages one file, and runs `vmetal serve` (its pre-flight; the server
class is replaced, so a case that got past the checks is seen as a started server), `vmetal pull FOLDER` and
`vmetal doctor --model`'s check. The folder is byte-identical afterwards: a refusal never writes.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vmetal.cli import serve as serve_cmd
from vmetal.cli.app import app
from vmetal.server.process import free_port

runner = CliRunner()


def _config(**changes):
    def mutate(folder: Path) -> None:
        cfg = json.loads((folder / "config.json").read_text())
        for key, value in changes.items():
            if value is _DROP:
                cfg.pop(key)
            else:
                cfg[key] = value
        (folder / "config.json").write_text(json.dumps(cfg))
    return mutate


_DROP = object()


def _write(name: str, data: bytes):
    return lambda folder: (folder / name).write_bytes(data)


def _truncate(fraction: float):
    def mutate(folder: Path) -> None:
        path = folder / "model.safetensors"
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * fraction)])
    return mutate


def _huge_header(folder: Path) -> None:
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", 1 << 40) + data[8:])


def _remove_all(folder: Path) -> None:
    for p in folder.iterdir():
        p.unlink()


def _remove(name: str):
    return lambda folder: (folder / name).unlink()


def _tokenizer_bigger_than_model(folder: Path) -> None:
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    tok = json.loads((folder / "tokenizer.json").read_text())
    tok["added_tokens"].append({"id": vocab + 500, "content": "<extra>", "single_word": False, "lstrip": False,
                                "rstrip": False, "normalized": False, "special": True})
    (folder / "tokenizer.json").write_text(json.dumps(tok))


def _missing_shard(folder: Path) -> None:
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}))


# (id, damage, the file the error must name, a fragment of the message)
CASES = [
    ("empty-folder", _remove_all, "", "empty folder"),
    ("no-config", _remove("config.json"), "config.json", "is missing"),
    ("config-not-json", _write("config.json", b"{\"model_type\": \"qwen3\","), "config.json", "not valid JSON"),
    ("config-binary", _write("config.json", b"\xff\xfe\x00garbage"), "config.json", "not UTF-8"),
    ("config-a-list", _write("config.json", b"[1, 2]"), "config.json", "not an object"),
    ("no-model-type", _config(model_type=_DROP), "config.json", "no `model_type`"),
    ("hidden-size-negative", _config(hidden_size=-1), "config.json", "`hidden_size` = -1"),
    ("hidden-size-string", _config(hidden_size="64"), "config.json", "`hidden_size` = \"64\""),
    ("hidden-size-float", _config(hidden_size=64.5), "config.json", "`hidden_size` = 64.5"),
    ("layers-huge", _config(num_hidden_layers=10**9), "config.json", "`num_hidden_layers` = 1000000000"),
    ("heads-zero", _config(num_attention_heads=0), "config.json", "`num_attention_heads` = 0"),
    ("kv-heads-null-bool", _config(num_key_value_heads=True), "config.json", "`num_key_value_heads` = true"),
    ("no-vocab-size", _config(vocab_size=_DROP), "config.json", "no `vocab_size`"),
    ("context-absurd", _config(max_position_embeddings=10**12), "config.json", "`max_position_embeddings`"),
    ("heads-indivisible", _config(num_key_value_heads=3), "config.json", "not a multiple"),
    ("config-other-model", _config(hidden_size=128, head_dim=16), "model.safetensors", "different models"),
    ("vocab-smaller-than-weights", _config(vocab_size=100), "model.safetensors", "different models"),
    ("no-weights", _remove("model.safetensors"), "", "no `model*.safetensors`"),
    ("weights-truncated-half", _truncate(0.5), "model.safetensors", "is truncated"),
    ("weights-truncated-4-bytes", _truncate(0.00001), "model.safetensors", "is truncated"),
    ("weights-zero-bytes", _write("model.safetensors", b""), "model.safetensors", "is truncated"),
    ("weights-huge-header", _huge_header, "model.safetensors", "header claims"),
    ("weights-not-safetensors", _write("model.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!"
                                       + b"\0" * 64), "model.safetensors", "damaged safetensors header"),
    ("index-missing-shard", _missing_shard, "model-00002-of-00002.safetensors", "is missing"),
    ("tokenizer-not-json", _write("tokenizer.json", b"{\"version\": "), "tokenizer.json", "not valid JSON"),
    ("tokenizer-other-model", _tokenizer_bigger_than_model, "tokenizer.json", "belongs to another model"),
    ("tokenizer-config-not-json", _write("tokenizer_config.json", b"nope"), "tokenizer_config.json",
     "not valid JSON"),
]


@pytest.fixture
def damaged(request, qwen3_model, tmp_path):
    _, damage, _, _ = request.param
    folder = tmp_path / "model"
    shutil.copytree(qwen3_model, folder)
    damage(folder)
    return folder


@pytest.fixture
def no_server(monkeypatch):
    started = []

    class NeverStarted:
        def __init__(self, *a, **kw):
            started.append(a)
            raise AssertionError("the pre-flight let a damaged model through")

    monkeypatch.setattr(serve_cmd, "ServerProcess", NeverStarted)
    return started


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def the_error(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output
    return lines[0]


def named(folder: Path, file: str) -> str:
    return f"`{folder / file}`" if file else f"`{folder}`"


@pytest.mark.parametrize("damaged, case", [(c, c) for c in CASES], ids=[c[0] for c in CASES],
                         indirect=["damaged"])
def test_serve_refuses_before_any_process(damaged, case, no_server):
    _, _, file, fragment = case
    before = snapshot(damaged)
    r = runner.invoke(app, ["serve", str(damaged), "--port", str(free_port())])
    assert r.exit_code == 2, r.output
    line = the_error(r)
    assert named(damaged, file) in line and fragment in line
    assert no_server == [] and snapshot(damaged) == before


@pytest.mark.parametrize("damaged, case", [(c, c) for c in CASES], ids=[c[0] for c in CASES],
                         indirect=["damaged"])
def test_pull_of_a_local_folder_refuses(damaged, case):
    _, _, file, fragment = case
    before = snapshot(damaged)
    r = runner.invoke(app, ["pull", str(damaged)])
    assert r.exit_code == 2, r.output
    line = the_error(r)
    # pull reads config.json itself first, in its own words; the file is named either way.
    assert (file or str(damaged)) in line
    assert snapshot(damaged) == before


@pytest.mark.parametrize("damaged, case", [(c, c) for c in CASES], ids=[c[0] for c in CASES],
                         indirect=["damaged"])
def test_doctor_model_check_fails_naming_the_file(damaged, case):
    from vmetal.cli.doctor.serving import check_model_fit

    _, _, file, _ = case
    check = check_model_fit(str(damaged), None)
    assert check.status in ("fail", "warn") and check.fix
    assert (file or str(damaged)) in check.summary


def test_the_intact_model_passes_every_check(qwen3_model, llama_model):
    from vmetal.preflight.model_files import check_folder

    check_folder(qwen3_model)
    check_folder(llama_model)


def test_doctor_cli_reports_a_damaged_model(qwen3_model, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(qwen3_model, folder)
    _truncate(0.5)(folder)
    r = runner.invoke(app, ["doctor", "--json", "--model", str(folder), "--port", str(free_port()),
                            "--probe-timeout", "60"])
    assert r.exit_code == 1, r.output
    check = {c["id"]: c for c in json.loads(r.stdout)["checks"]}["model_fit"]
    assert check["status"] == "fail" and f"`{folder / 'model.safetensors'}` is truncated" in check["summary"]
