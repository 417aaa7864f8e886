"""Plugin activation, the `vllm` command, and model loading errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import vmetal
from vmetal.engine import models

PLATFORM_PROBE = "from vllm.platforms import current_platform; print(type(current_platform).__name__)"


def _env(**overrides):
    env = {k: v for k, v in os.environ.items() if k != vmetal.ACTIVATE_ENV}
    env.update(overrides)
    return env


@pytest.mark.parametrize("value,active", [("1", True), ("true", True), ("0", False), ("no", False)])
def test_register_follows_the_activation_variable(value, active):
    assert vmetal.should_activate({vmetal.ACTIVATE_ENV: value}) is active


@pytest.mark.skipif(sys.platform == "darwin", reason="on macOS arm64 the plugin is on by default")
def test_register_is_off_by_default_off_apple_silicon():
    assert vmetal.should_activate({}) is False


@pytest.mark.slow
@pytest.mark.parametrize("value,expected", [("1", "MetalPlatform"), ("0", "CpuPlatform")])
def test_vllm_selects_metal_platform_only_when_asked(tmp_path, value, expected):
    # Run from an unrelated folder: a checkout on sys.path could shadow the
    # installed package and make vLLM fall back to its CPU platform silently.
    out = subprocess.run([sys.executable, "-c", PLATFORM_PROBE], cwd=tmp_path, capture_output=True,
                         text=True, env=_env(**{vmetal.ACTIVATE_ENV: value}), timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == expected


@pytest.mark.slow
def test_vllm_command_runs_under_the_installed_distribution(tmp_path):
    script = Path(sys.executable).parent / "vllm"
    if not script.exists():
        pytest.skip("no `vllm` script next to this interpreter (not an install.sh venv)")
    out = subprocess.run([str(script), "--version"], cwd=tmp_path, capture_output=True, text=True,
                         env=_env(), timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith("0.")


def _copy_with_config(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_unsupported_model_names_its_family_and_cache_type(qwen3_model, tmp_path):
    """The loaded model's own caches decide: chunked-attention layers are refused on every path, naming what
    they are, before a weight is read."""
    from tests.support.families import as_chunked_attention

    folder = _copy_with_config(qwen3_model, tmp_path / "chunked", **as_chunked_attention({}))
    with pytest.raises(models.UnsupportedModelError) as err:
        models.load(str(folder))
    message = str(err.value)
    assert message.startswith("llama4 (Llama4ForConditionalGeneration): ") and "ChunkedKVCache" in message


def test_missing_config_and_missing_folder_are_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(models.ModelNotFoundError, match="config.json"):
        models.load(str(tmp_path / "empty"))
    with pytest.raises(models.ModelNotFoundError, match="does not exist"):
        models.load(str(tmp_path / "nowhere"))


@pytest.mark.parametrize("arch", ["qwen3", "llama", "qwen2", "mistral"])
def test_supported_families_load_with_gqa_in_checkpoint_dtype(tmp_path, arch):
    import mlx.core as mx

    from vmetal.demo import build_tiny_model

    folder = build_tiny_model(tmp_path / arch, arch, num_heads=4, num_kv_heads=2, dtype="bfloat16")
    loaded = models.load(str(folder))
    assert loaded.num_kv_heads == 2
    assert loaded.dtype == mx.bfloat16
    assert loaded.kv_bytes_per_token == 2 * loaded.num_layers * 2 * loaded.head_dim * 2


ENGINE_PROBE = """
import sys
from vllm import LLM
if __name__ == "__main__":
    LLM(model=sys.argv[1], max_model_len=128)
    print("STARTED")
"""


@pytest.mark.slow
@pytest.mark.parametrize("env,message", [
    ({"VLLM_METAL_MEMORY_FRACTION": "0.7"}, "VLLM_METAL_MEMORY_FRACTION=0.7 requires VLLM_METAL_USE_PAGED_ATTENTION=1"),
    ({"VLLM_METAL_BLOCK_SIZE": "12"}, "VLLM_METAL_BLOCK_SIZE=12"),
    ({"VLLM_METAL_USE_MLX": "maybe"}, "VLLM_METAL_USE_MLX=maybe"),
])
def test_engine_refuses_to_start_on_invalid_settings(qwen3_model, tmp_path, env, message):
    probe = tmp_path / "probe.py"
    probe.write_text(ENGINE_PROBE)
    out = subprocess.run([sys.executable, str(probe), str(qwen3_model)], cwd=tmp_path, capture_output=True,
                         text=True, env=_env(**{vmetal.ACTIVATE_ENV: "1"}, **env), timeout=180)
    assert out.returncode != 0
    assert "STARTED" not in out.stdout
    assert message in out.stderr


def test_vmetal_variables_are_known_to_vllm_and_other_unknown_ones_still_reported(monkeypatch):
    """vLLM warned "Unknown vLLM environment variable detected" for each of vmetal's own variables at every
    start; with hard_fail (vLLM's strict mode) they raised. A typo of one of them is still vLLM's to report."""
    from vmetal import envs
    from vmetal.engine.platform import MetalPlatform

    for var in envs.VARIABLES:
        monkeypatch.setenv(var.name, var.default or "x")
    MetalPlatform.validate_environ(hard_fail=True)  # raised on the first VLLM_METAL_* before
    monkeypatch.setenv("VLLM_METAL_BLOCKSIZE", "16")
    with pytest.raises(ValueError, match="Unknown vLLM environment variable detected: VLLM_METAL_BLOCKSIZE"):
        MetalPlatform.validate_environ(hard_fail=True)


@pytest.mark.slow
def test_llm_with_speculation_the_engine_lacks_is_refused_at_construction(qwen3_model, monkeypatch):
    """`vllm serve` and `LLM(...)` used directly go through the platform, which refuses what the runner does
    not implement while vLLM builds its config: before an engine starts, not at the first request. A draft
    model runs on the MLX-managed and paged paths, not the PyTorch baseline's."""
    from vllm import LLM

    monkeypatch.setenv("VLLM_METAL_USE_MLX", "0")
    with pytest.raises(Exception, match="`--speculative-config`: draft-model speculation runs on the MLX-managed "
                                        "and paged KV paths only, and this server uses the torch path"):
        LLM(model=str(qwen3_model), max_model_len=128,
            speculative_config={"model": str(qwen3_model), "num_speculative_tokens": 2})
