"""`vmetal.preflight.fit`: the memory estimate as pure numbers, and `vmetal serve`'s pre-flight built on it."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from tests.support import fakes
from tests.support.checkpoints import QWEN3_06B, QWEN3_06B_KV_PER_TOKEN, QWEN3_06B_WEIGHTS, model_folder
from vmetal import envs
from vmetal.cli.app import app
from vmetal.preflight import fit
from vmetal.preflight import host as system
from vmetal.server.process import free_port

GiB = 1024**3
MiB = 1024**2

def test_kv_bytes_per_token_of_qwen3_06b():
    assert fit.kv_bytes_per_token(QWEN3_06B) == QWEN3_06B_KV_PER_TOKEN == 114_688


def test_estimate_adds_weights_kv_and_overhead():
    report = fit.estimate(QWEN3_06B, QWEN3_06B_WEIGHTS, max_model_len=4096, memory_bytes=16 * GiB)
    assert report.weights_bytes == QWEN3_06B_WEIGHTS
    assert report.kv_bytes == QWEN3_06B_KV_PER_TOKEN * 4096 == 448 * MiB
    assert report.overhead == fit.OVERHEAD_FIXED + QWEN3_06B_WEIGHTS // 10
    assert report.total == report.weights_bytes + report.kv_bytes + report.overhead
    assert report.available == 16 * GiB
    assert report.verdict == "fits"
    assert (report.max_model_len, report.num_seqs) == (4096, 1)


def test_a_draft_model_adds_its_weights_and_its_kv():
    """Speculation with a draft: both models hold every token, and both sets of weights are resident."""
    alone = fit.estimate(QWEN3_06B, QWEN3_06B_WEIGHTS, max_model_len=4096, memory_bytes=16 * GiB)
    report = fit.estimate(QWEN3_06B, QWEN3_06B_WEIGHTS, max_model_len=4096, memory_bytes=16 * GiB,
                          draft=(QWEN3_06B, QWEN3_06B_WEIGHTS))
    assert report.weights_bytes == 2 * QWEN3_06B_WEIGHTS and report.draft_bytes == QWEN3_06B_WEIGHTS
    assert report.kv_bytes == 2 * alone.kv_bytes
    assert report.overhead == fit.OVERHEAD_FIXED + 2 * QWEN3_06B_WEIGHTS // 10
    assert f"weights {2 * QWEN3_06B_WEIGHTS / GiB:.1f} GiB, {QWEN3_06B_WEIGHTS / GiB:.1f} GiB of them the draft " \
           "model's + KV" in report.describe()


def test_sliding_window_and_recurrent_layers_hold_fewer_tokens():
    """Per layer, what its cache keeps: a Gemma-3-like 5:1 pattern grows at a sixth of the full rate past its
    window, recurrent layers add none; counted full-length, a 27B Gemma 3 would be refused on Macs it fits."""
    config = {**QWEN3_06B, "num_hidden_layers": 6}
    per_layer = QWEN3_06B_KV_PER_TOKEN // 28
    held = (1024, 1024, 1024, 1024, 1024, None)
    assert fit.kv_bytes(config, 32768, held) == (per_layer * (32768 + 5 * 1024), per_layer)
    assert fit.kv_bytes(config, 512, held) == (per_layer * 6 * 512, per_layer)  # within the window: all
    assert fit.kv_bytes(config, 100, (0, None, 0, None, 0, None)) == (per_layer * 3 * 100, per_layer * 3)
    assert fit.kv_bytes(config, 100, (None,) * 5) == (per_layer * 6 * 100, per_layer * 6)  # not one per layer
    report = fit.estimate(config, QWEN3_06B_WEIGHTS, max_model_len=32768, memory_bytes=16 * GiB, held=held)
    assert report.kv_bytes == per_layer * (32768 + 5 * 1024) and report.kv_bytes_per_token == per_layer
    # The suggested length leaves room for the windows, which stay fixed.
    room = int(16 * GiB * fit.TIGHT_FRACTION) - report.weights_bytes - report.overhead - per_layer * 5 * 1024
    assert report.max_len_that_fits(fit.TIGHT_FRACTION) == room // per_layer // fit.LEN_STEP * fit.LEN_STEP


def test_mla_keeps_decompressed_keys_and_values():
    """mlx-lm's DeepSeek-V2 cache holds every head's K (nope + rope wide) and V, not the latent."""
    config = {"model_type": "deepseek_v2", "num_hidden_layers": 27, "num_attention_heads": 16,
              "num_key_value_heads": 16, "hidden_size": 2048, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
              "v_head_dim": 128, "kv_lora_rank": 512, "torch_dtype": "bfloat16"}
    assert fit.kv_bytes_per_token(config) == 27 * 16 * (128 + 64 + 128) * 2


def test_kv_scales_with_sequences_and_length():
    one = fit.estimate(QWEN3_06B, 0, max_model_len=1000, memory_bytes=GiB)
    assert fit.estimate(QWEN3_06B, 0, max_model_len=1000, num_seqs=3, memory_bytes=GiB).kv_bytes == 3 * one.kv_bytes
    assert fit.estimate(QWEN3_06B, 0, max_model_len=2000, memory_bytes=GiB).kv_bytes == 2 * one.kv_bytes


@pytest.mark.parametrize("change, per_token", [
    ({}, QWEN3_06B_KV_PER_TOKEN),
    ({"head_dim": None}, 2 * 28 * 8 * (1024 // 16) * 2),  # hidden_size / num_attention_heads
    ({"num_key_value_heads": None}, 2 * 28 * 16 * 128 * 2),  # no GQA: every head has K and V
    ({"torch_dtype": "float32"}, 2 * QWEN3_06B_KV_PER_TOKEN),
    ({"torch_dtype": None, "dtype": "float16"}, QWEN3_06B_KV_PER_TOKEN),  # transformers 5 spelling
    ({"torch_dtype": None}, QWEN3_06B_KV_PER_TOKEN),  # no dtype: vLLM's bf16
    ({"torch_dtype": "torch.float32"}, 2 * QWEN3_06B_KV_PER_TOKEN),
])
def test_kv_shape_and_dtype_sources(change, per_token):
    config = {k: v for k, v in {**QWEN3_06B, **change}.items() if v is not None}
    assert fit.kv_bytes_per_token(config) == per_token


def test_multimodal_text_config_is_used():
    config = {"architectures": ["X"], "text_config": dict(QWEN3_06B)}
    assert fit.kv_bytes_per_token(config) == QWEN3_06B_KV_PER_TOKEN


def test_config_without_shape_is_an_error():
    with pytest.raises(fit.ConfigShapeError):
        fit.kv_bytes_per_token({"model_type": "qwen3"})


def test_verdict_boundaries():
    assert fit.verdict_for(75, 100) == "fits"  # exactly 75 %: still fits
    assert fit.verdict_for(76, 100) == "tight"
    assert fit.verdict_for(100, 100) == "tight"  # exactly all of it
    assert fit.verdict_for(101, 100) == "does not fit"


def test_verdicts_through_estimate_at_the_boundaries():
    def total_of(weights: int) -> int:
        return fit.estimate(QWEN3_06B, weights, max_model_len=4096, memory_bytes=GiB).total

    # Weights that make the total a multiple of 3, so that it is exactly 75 % of an integer.
    weights = next(w for w in range(QWEN3_06B_WEIGHTS, QWEN3_06B_WEIGHTS + 30) if total_of(w) % 3 == 0)
    total = total_of(weights)

    def verdict(available: int) -> str:
        return fit.estimate(QWEN3_06B, weights, max_model_len=4096, memory_bytes=available).verdict

    assert verdict(total * 4 // 3) == "fits"
    assert verdict(total * 4 // 3 - 1) == "tight"
    assert verdict(total) == "tight"
    assert verdict(total - 1) == "does not fit"


def test_available_defaults_to_what_mlx_may_use(monkeypatch):
    monkeypatch.setattr(system, "memory_for_mlx", lambda: 8 * GiB)
    assert fit.estimate(QWEN3_06B, QWEN3_06B_WEIGHTS, max_model_len=1024).available == 8 * GiB


def test_describe_is_one_line_with_gib_numbers():
    report = fit.estimate(QWEN3_06B, QWEN3_06B_WEIGHTS, max_model_len=32768, memory_bytes=4 * GiB)
    text = report.describe()
    assert "\n" not in text
    assert text.endswith(": does not fit")
    assert "weights 1.1 GiB" in text and "KV 3.5 GiB for 32768 tokens" in text and "of 4.0 GiB" in text


def test_max_len_that_fits_and_advice():
    report = fit.estimate(QWEN3_06B, QWEN3_06B_WEIGHTS, max_model_len=32768, memory_bytes=4 * GiB)
    longest = report.max_len_that_fits()
    assert longest % fit.LEN_STEP == 0 and 0 < longest < 32768
    assert fit.estimate(QWEN3_06B, QWEN3_06B_WEIGHTS, max_model_len=longest,
                        memory_bytes=4 * GiB).verdict != "does not fit"
    assert fit.estimate(QWEN3_06B, QWEN3_06B_WEIGHTS, max_model_len=longest + fit.LEN_STEP,
                        memory_bytes=4 * GiB).verdict == "does not fit"
    # The advice names a length that fits with room to spare.
    suggested = report.max_len_that_fits(fit.TIGHT_FRACTION)
    assert f"`--max-model-len {suggested}`" in report.advice()
    assert fit.estimate(QWEN3_06B, QWEN3_06B_WEIGHTS, max_model_len=suggested,
                        memory_bytes=4 * GiB).verdict == "fits"
    # Weights bigger than memory: no length helps.
    huge = fit.estimate(QWEN3_06B, 64 * GiB, max_model_len=1024, memory_bytes=16 * GiB)
    assert huge.max_len_that_fits() == 0 and "quantized" in huge.advice() and "--max-model-len" not in huge.advice()


def test_default_max_model_len_caps_long_contexts():
    assert fit.default_max_model_len(QWEN3_06B) == 32768  # 40960 declared
    assert fit.default_max_model_len({**QWEN3_06B, "max_position_embeddings": 2048}) == 2048
    assert fit.default_max_model_len({}) == fit.DEFAULT_MAX_LEN_CAP


def test_weight_bytes_of_sums_safetensors_only(tmp_path):
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"x" * 100)
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b"x" * 23)
    (tmp_path / "tokenizer.json").write_bytes(b"x" * 1000)
    (tmp_path / "pytorch_model.bin").write_bytes(b"x" * 1000)
    assert fit.weight_bytes_of(tmp_path) == 123
    assert fit.weight_bytes_of(tmp_path / "missing") == 0


def test_estimate_folder(tmp_path):
    assert fit.estimate_folder(tmp_path, memory_bytes=GiB) is None  # nothing there
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"x" * 10)
    assert fit.estimate_folder(tmp_path, memory_bytes=GiB) is None  # no shape in the config
    (tmp_path / "config.json").write_text(json.dumps(QWEN3_06B))
    report = fit.estimate_folder(tmp_path, memory_bytes=GiB)
    assert report.max_model_len == 32768 and report.weights_bytes == 10
    assert fit.estimate_folder(tmp_path, max_model_len=64, memory_bytes=GiB).max_model_len == 64


@pytest.mark.parametrize("args, value", [
    ([], None),
    (["--max-model-len", "4096"], "4096"),
    (["--max-model-len=2048"], "2048"),
    (["--max_model_len", "1024"], "1024"),
    (["--max-model-len", "1", "--dtype", "float32", "--max-model-len", "8"], "8"),  # the last one wins
    (["--max-model-len"], None),
])
def test_vllm_arg(args, value):
    assert fit.vllm_arg(args, "--max-model-len") == value


# --- `vmetal serve`'s pre-flight ---------------------------------------------------------------------

runner = CliRunner()


@pytest.fixture
def servers(monkeypatch):
    for var in envs.VARIABLES:
        monkeypatch.delenv(var.name, raising=False)
    built = fakes.install(monkeypatch)
    # 16 GiB for MLX, whatever this machine has.
    monkeypatch.setattr(system, "memory_for_mlx", lambda *a, **k: 16 * GiB)
    return built


def serve(*args):
    return runner.invoke(app, ["serve", *args, "--port", str(free_port())])


def test_serve_refuses_a_model_bigger_than_memory(servers, tmp_path):
    # A 70B-shaped config with 140 GB of (sparse) bf16 weights, on a 16 GiB budget.
    config = {**QWEN3_06B, "num_hidden_layers": 80, "num_attention_heads": 64, "hidden_size": 8192}
    folder = model_folder(tmp_path / "big", config, 140 * 10**9)
    result = serve(str(folder))
    assert result.exit_code == 2, result.output
    assert servers == []
    assert "too big for this machine" in result.stderr and "of 16.0 GiB available to MLX" in result.stderr
    assert "hint" in result.stderr and "quantized" in result.stderr


def test_serve_refusal_names_a_max_model_len_that_fits(servers, tmp_path, monkeypatch):
    folder = model_folder(tmp_path / "qwen3", QWEN3_06B, QWEN3_06B_WEIGHTS)
    # 32768 tokens (40960 declared, capped) x 112 KiB = 3.5 GiB of KV: too much for 4 GiB.
    monkeypatch.setattr(system, "memory_for_mlx", lambda *a, **k: 4 * GiB)
    result = serve(str(folder))
    assert result.exit_code == 2 and servers == []
    suggested = fit.estimate(QWEN3_06B, QWEN3_06B_WEIGHTS, max_model_len=32768,
                             memory_bytes=4 * GiB).max_len_that_fits(fit.TIGHT_FRACTION)
    assert f"--max-model-len {suggested}" in result.stderr
    # Following the hint works.
    assert serve(str(folder), "--max-model-len", str(suggested)).exit_code == 0
    assert len(servers) == 1
    # So does the same flag given to vLLM after `--` (it wins there too).
    assert serve(str(folder), "--", "--max-model-len", str(suggested)).exit_code == 0


def test_serve_warns_when_tight_and_starts(servers, tmp_path):
    folder = model_folder(tmp_path / "qwen3", QWEN3_06B, 12 * GiB)  # 12 GiB + 1.7 GiB overhead of 16 GiB
    result = serve(str(folder), "--max-model-len", "1024")
    assert result.exit_code == 0, result.output
    assert len(servers) == 1
    assert "warning" in result.stderr and "leaves little memory free" in result.stderr and ": tight" in result.stderr


def test_serve_refuses_a_config_without_shape_before_the_estimate(servers, tmp_path):
    # The pre-flight (vmetal.preflight.model_files) names the file; vLLM would only fail after ~10 s of start-up.
    (tmp_path / "config.json").write_text("{}")
    result = serve(str(tmp_path))
    assert result.exit_code == 2 and servers == []
    assert f"`{tmp_path / 'config.json'}` has no `model_type`" in result.stderr


def test_a_model_split_across_nodes_is_judged_by_each_nodes_share(servers, tmp_path):
    """20 GiB of weights do not fit one 16 GiB Mac; split over two by tensor or pipeline parallel, each holds
    half of them and of the KV and serves. Data-parallel replicas each hold the whole model: still refused."""
    folder = model_folder(tmp_path / "big", QWEN3_06B, 20 * GiB)
    common = [str(folder), "--max-model-len", "4096", "--"]
    alone = serve(*common)
    assert alone.exit_code == 2 and "too big for this machine" in alone.stderr, alone.output
    replicas = serve(*common, "--data-parallel-size", "2", "--data-parallel-size-local", "1")
    assert replicas.exit_code == 2 and "too big for this machine" in replicas.stderr, replicas.output
    assert servers == []
    for split in ("--tensor-parallel-size", "--pipeline-parallel-size"):
        result = serve(*common, split, "2", "--nnodes", "2", "--node-rank", "0", "--master-addr", "10.0.0.1")
        assert result.exit_code == 0, result.output
        assert "needed on each of 2 nodes (weights 10.0 GiB" in result.output, result.output
    assert len(servers) == 2


def test_each_node_holds_its_share_of_weights_and_kv():
    whole = fit.estimate(QWEN3_06B, 8 * GiB, max_model_len=4096, memory_bytes=16 * GiB)
    half = fit.estimate(QWEN3_06B, 8 * GiB, max_model_len=4096, memory_bytes=16 * GiB, nodes=2)
    assert half.weights_bytes == 4 * GiB and half.kv_bytes * 2 == whole.kv_bytes
    assert half.kv_bytes_per_token * 2 == whole.kv_bytes_per_token == QWEN3_06B_KV_PER_TOKEN
    # Twice the tokens fit per node once the weights are split.
    assert half.max_len_that_fits() > 2 * whole.max_len_that_fits() > 0
    assert fit.nodes_splitting(["-tp", "2", "--nnodes", "2"]) == 2
    assert fit.nodes_splitting(["-pp", "4", "--nnodes=2"]) == 2
    assert fit.nodes_splitting(["-tp", "2"]) == 1  # two ranks on one machine share its memory
    assert fit.nodes_splitting(["-dp", "2", "--nnodes", "2"]) == 1  # a replica per node
    assert fit.nodes_splitting(["-tp", "2", "--nnodes", "x"]) == 1
