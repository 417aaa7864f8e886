"""`vmetal convert`: exit codes, the files it leaves on disk, and what it refuses before any work.

Conversions run in-process through `CliRunner` on the tiny random qwen3 model (hidden size 64, float32).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.support.hub_fixtures import REPO
from vmetal.cli.app import app

runner = CliRunner()


def convert(*args: str):
    return runner.invoke(app, ["convert", *map(str, args)])


def error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error: ")]


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.endswith(".partial"))


def tensors(folder: Path) -> dict:
    import mlx.core as mx

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(mx.load(str(f)))
    return out


@pytest.fixture
def src(qwen3_model, tmp_path) -> Path:
    # A private copy: some tests rewrite its config.
    return Path(shutil.copytree(qwen3_model, tmp_path / "src"))


@pytest.mark.parametrize("bits, group", [(4, 32), (8, 64), (4, 64)])
def test_writes_what_mlx_lm_writes(src, tmp_path, bits, group):
    import mlx.core as mx
    from mlx_lm.convert import convert as mlx_convert

    dst = tmp_path / "out" / f"q{bits}"  # a parent that does not exist yet
    result = convert(src, dst, "--bits", bits, "--group-size", group)
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    assert f"wrote `{dst}`: {bits}-bit affine, group size {group}" in result.stderr
    config = json.loads((dst / "config.json").read_text())
    assert config["quantization"] == config["quantization_config"] == {"group_size": group, "bits": bits,
                                                                        "mode": "affine"}
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "model.safetensors"):
        assert (dst / name).is_file(), name
    assert leftovers(dst.parent) == []
    # Byte for byte the arrays mlx-lm's own converter makes.
    reference = tmp_path / "reference"
    mlx_convert(str(src), mlx_path=str(reference), quantize=True, q_bits=bits, q_group_size=group)
    mine, theirs = tensors(dst), tensors(reference)
    assert mine.keys() == theirs.keys() and mine["model.layers.0.self_attn.q_proj.weight"].dtype == mx.uint32
    assert all(mx.array_equal(mine[k], theirs[k]).item() for k in mine)


def logit_correlation(folder: Path, reference: Path) -> float:
    """The lowest, over the positions of a prompt, correlation of a model's logits with the reference model's
    (both loaded by vmetal's engine loader, as the server loads them)."""
    import mlx.core as mx

    from vmetal.engine.models import load

    tokens = mx.array([[5, 17, 3, 40, 9, 12, 7, 21, 30, 2, 44, 8]])
    a, b = (load(str(f)).model(tokens)[0].astype(mx.float32) for f in (folder, reference))
    a, b = a - a.mean(-1, keepdims=True), b - b.mean(-1, keepdims=True)
    correlation = (a * b).sum(-1) / mx.sqrt((a * a).sum(-1) * (b * b).sum(-1))
    return correlation.min().item()


@pytest.mark.parametrize(("bits", "least"), [(8, 0.99), (4, 0.5)])
def test_the_converted_model_computes_what_the_float_model_does(src, tmp_path, bits, least):
    """The flag test above compares our converter with mlx-lm's, which it calls, so it cannot catch a
    conversion that both get wrong: this one loads the converted folder the way the engine does and
    compares its logits with the float model's. On the tiny random model (hidden size 64) 8 bits keep a
    correlation of 0.999 and 4 bits 0.79-0.84 (measured); an unrelated model of the same shape is near 0."""
    from vmetal.demo import build_tiny_model
    from vmetal.engine.models import load

    dst = tmp_path / f"q{bits}"
    assert convert(src, dst, "--bits", bits).exit_code == 0
    loaded = load(str(dst))
    assert loaded.quantization is not None and loaded.quantization.bits == bits
    assert logit_correlation(dst, src) > least
    unrelated = build_tiny_model(tmp_path / "unrelated", "qwen3", hidden_size=64, num_layers=2, seed=5)
    assert logit_correlation(unrelated, src) < 0.5


def test_dtype_is_applied_and_recorded(src, tmp_path):
    import mlx.core as mx

    dst = tmp_path / "bf16"
    result = convert(src, dst, "--bits", "4", "--dtype", "bfloat16")
    assert result.exit_code == 0, result.output
    config = json.loads((dst / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16" and config["dtype"] == "bfloat16"
    assert config["quantization"]["group_size"] == 64  # the default
    weights = tensors(dst)
    assert weights["model.layers.0.self_attn.q_proj.scales"].dtype == mx.bfloat16
    assert weights["model.norm.weight"].dtype == mx.bfloat16


def test_mxfp4_mode(src, tmp_path):
    dst = tmp_path / "mxfp4"
    result = convert(src, dst, "--bits", "4", "--mode", "mxfp4")
    assert result.exit_code == 0, result.output
    assert json.loads((dst / "config.json").read_text())["quantization"] == {"group_size": 32, "bits": 4,
                                                                             "mode": "mxfp4"}


def test_existing_destination_is_kept_unless_force(src, tmp_path):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    result = convert(src, dst, "--bits", "4")
    assert result.exit_code == 2
    assert error_lines(result) == [f"error: `{dst}` exists and is not empty"]
    assert "--force" in result.stderr
    assert sorted(p.name for p in dst.iterdir()) == ["keep.txt"]

    result = convert(src, dst, "--bits", "8", "--force")
    assert result.exit_code == 0, result.output
    assert not (dst / "keep.txt").exists()
    assert json.loads((dst / "config.json").read_text())["quantization"]["bits"] == 8
    assert leftovers(tmp_path) == []


def test_empty_destination_folder_is_used(src, tmp_path):
    dst = tmp_path / "empty"
    dst.mkdir()
    assert convert(src, dst, "--bits", "4").exit_code == 0
    assert (dst / "model.safetensors").is_file()


def test_a_failed_conversion_leaves_nothing(src, tmp_path, monkeypatch):
    import importlib

    # `mlx_lm.convert` as an attribute is the function mlx_lm re-exports; the module is what we patch.
    module = importlib.import_module("mlx_lm.convert")

    def half_done(hf_path, mlx_path, **kwargs):
        Path(mlx_path).mkdir()
        (Path(mlx_path) / "model.safetensors").write_bytes(b"partial")
        raise ValueError("[quantize] something went wrong")

    monkeypatch.setattr(module, "convert", half_done)
    dst = tmp_path / "dst"
    result = convert(src, dst, "--bits", "4")
    assert result.exit_code == 1
    assert error_lines(result) == [f"error: mlx-lm could not convert `{src}`: [quantize] something went wrong"]
    assert not dst.exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("args, message", [
    (["--bits", "3"], "Invalid value for '--bits'"),
    (["--bits", "4", "--group-size", "16"], "Invalid value for '--group-size'"),
    (["--bits", "4", "--dtype", "int8"], "Invalid value for '--dtype'"),
    ([], "Missing option '--bits'"),
])
def test_bad_options_are_usage_errors(src, tmp_path, args, message):
    result = convert(src, tmp_path / "dst", *args)
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "dst").exists()


def refused(result, tmp_path: Path) -> str:
    """The one error line of a refusal that created nothing."""
    assert result.exit_code == 2, result.output
    (line,) = error_lines(result)
    assert not (tmp_path / "dst").exists() and leftovers(tmp_path) == []
    return line


def test_missing_source(tmp_path):
    line = refused(convert(tmp_path / "nope", tmp_path / "dst", "--bits", "4"), tmp_path)
    assert line == f"error: source `{tmp_path / 'nope'}` is not a model folder (it does not exist or is a file)"


def test_source_without_config(tmp_path):
    (tmp_path / "empty-src").mkdir()
    line = refused(convert(tmp_path / "empty-src", tmp_path / "dst", "--bits", "4"), tmp_path)
    assert "config.json" in line and "missing" in line


def test_unsupported_architecture(src, tmp_path):
    """A model no KV path serves (chunked attention: decided by the caches mlx-lm makes for it)."""
    from tests.support.families import as_chunked_attention

    config = as_chunked_attention(json.loads((src / "config.json").read_text()))
    (src / "config.json").write_text(json.dumps(config))
    line = refused(convert(src, tmp_path / "dst", "--bits", "4"), tmp_path)
    assert "llama4 (Llama4ForConditionalGeneration)" in line and "ChunkedKVCache" in line


def test_already_quantized_source(src, tmp_path):
    assert convert(src, tmp_path / "q4", "--bits", "4", "--group-size", "32").exit_code == 0
    line = refused(convert(tmp_path / "q4", tmp_path / "dst", "--bits", "8"), tmp_path)
    assert line == f"error: `{tmp_path / 'q4'}` is already quantized (4-bit affine, group size 32)"


def test_group_size_that_does_not_divide_the_model(src, tmp_path):
    result = convert(src, tmp_path / "dst", "--bits", "4", "--group-size", "128")
    line = refused(result, tmp_path)
    assert line == "error: --group-size 128 does not divide the model's hidden_size (64)"
    assert "hint: use `--group-size 64`" in result.stderr


def test_mxfp4_needs_4_bits(src, tmp_path):
    line = refused(convert(src, tmp_path / "dst", "--bits", "8", "--mode", "mxfp4"), tmp_path)
    assert line == "error: --mode mxfp4 is 4 bits with group size 32"


def test_destination_that_would_replace_the_source(src, tmp_path):
    before = sorted(p.name for p in src.iterdir())
    result = convert(src, src, "--bits", "4", "--force")
    assert result.exit_code == 2 and error_lines(result)[0].startswith(f"error: DST `{src}` would replace")
    result = convert(src, tmp_path, "--bits", "4", "--force")  # a parent of the source
    assert result.exit_code == 2 and "would replace the source" in error_lines(result)[0]
    assert sorted(p.name for p in src.iterdir()) == before


def test_a_pulled_hub_id_converts_from_its_snapshot(src, tmp_path, monkeypatch):
    from vmetal.hub import common as hub_common
    from vmetal.hub import registry

    monkeypatch.setenv("VMETAL_HOME", str(tmp_path / "vmetal"))
    registry.upsert(registry.PulledModel(id="acme/tiny", source=hub_common.resolve_source(None), revision="main",
                                         commit="0" * 40, path=str(src), size=1, files=1,
                                         status=registry.COMPLETE, pulled_at=time.time()))
    dst = tmp_path / "dst"
    result = convert("acme/tiny", dst, "--bits", "4")
    assert result.exit_code == 0, result.output
    assert f"quantizing `{src}`" in result.stderr
    assert json.loads((dst / "config.json").read_text())["quantization"]["bits"] == 4


def test_a_hub_id_not_pulled_and_no_network(tmp_path, monkeypatch):
    monkeypatch.setenv("VMETAL_HOME", str(tmp_path / "vmetal"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = convert("acme/not-here", tmp_path / "dst", "--bits", "4")
    assert result.exit_code != 0
    assert len(error_lines(result)) == 1 and "acme/not-here" in error_lines(result)[0]
    assert not (tmp_path / "dst").exists()


def test_a_hub_id_is_pulled_then_converted(hub, tmp_path):
    from vmetal.hub import registry

    dst = tmp_path / "dst"
    result = convert(REPO, dst, "--bits", "4", "--group-size", "32")
    assert result.exit_code == 0, result.output
    (entry,) = registry.find(REPO)
    assert entry.complete and f"quantizing `{entry.path}`" in result.stderr
    assert json.loads((dst / "config.json").read_text())["quantization"]["bits"] == 4
