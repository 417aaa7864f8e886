"""vmetal.engine.fused_qk: which attention layers take the fused `__call__`, that it computes mlx-lm's attention,
and that its kernel (Metal on a Mac, CUDA on an NVIDIA GPU) equals mlx-lm's norms and RoPE there.

The kernel's own arithmetic is also run off a GPU, in tests/unit/test_kernels_syntax.py (a CPU emulation of
the Metal body)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache

from tests.unit.test_kernels_syntax import QK_VARIANTS, qk_case
from vmetal.engine import fused_qk, models
from vmetal.engine.runner.attention import metal as kernels


def _gpu_backend() -> str | None:
    return fused_qk.backend(None)


on_gpu = pytest.mark.skipif(_gpu_backend() is None, reason="needs MLX computing on Metal or CUDA")


@pytest.fixture(scope="module", params=["qwen3", "llama"])
def checkpoint(request, tmp_path_factory):
    from vmetal.demo import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp(request.param), request.param, dtype="float32")


def _logits(model, steps: int = 4):
    """Logits of a prompt and the greedy steps after it (each fed the previous step's argmax)."""
    cache, ids, out = make_prompt_cache(model), mx.array([[1, 7, 3, 12, 5, 9]]), []
    for _ in range(steps):
        logits = model(ids, cache=cache)[:, -1, :]
        out.append(np.asarray(logits))
        ids = mx.argmax(logits, axis=-1)[None].astype(mx.int32)
    return out


def test_fused_attention_computes_mlx_lm_logits(checkpoint):
    """A fused model (projections packed, each layer's queries and keys through fused_qk) gives mlx-lm's own
    model's logits, prompt and decode steps, on this CPU exactly (the reference is mlx-lm's ops)."""
    from mlx_lm import load

    lm = models.load(str(checkpoint))
    attn = lm.model.model.layers[0].self_attn
    assert type(attn).__name__ == "FusedAttention" and "_vmetal_fused" in attn.__dict__
    plain, _ = load(str(checkpoint))
    assert type(plain.model.layers[0].self_attn).__name__ == "Attention"  # mlx-lm's own, untouched
    for got, want in zip(_logits(lm.model), _logits(plain)):
        np.testing.assert_array_equal(got, want)


def test_unpacked_models_and_other_ropes_keep_mlx_lms_call(checkpoint):
    lm = models.load(str(checkpoint), packed=False)
    assert type(lm.model.model.layers[0].self_attn).__name__ == "Attention"
    attn, _, _ = qk_case()
    assert fused_qk.install(attn) == 0  # once is all
    assert fused_qk.rotation_of(mx.fast, 40) is None  # not a RoPE module
    from mlx import nn

    assert fused_qk.rotation_of(nn.RoPE(20), 40) is None  # partial rotary dims: mlx-lm's own call


def test_kernel_choice_follows_the_device_and_the_setting():
    assert fused_qk.backend(False) is None
    expected = "metal" if kernels.metal_available() else ("cuda" if mx.cuda.is_available() else None)
    assert fused_qk.backend(None) == (expected if mx.default_device().type == mx.DeviceType.gpu else None)


def test_plan_takes_offsets_per_row_or_one_for_all():
    attn, qkv, _ = qk_case(rows=3, length=1)
    per_row = fused_qk.plan(attn, qkv, mx.array([4, 0, 9], dtype=mx.int32))
    assert dict(per_row.template)["PER_ROW"] == 1 and per_row.grid == (32, 6, 3)
    one = fused_qk.plan(attn, qkv, 12)
    assert dict(one.template)["PER_ROW"] == 0 and one.inputs[-1].tolist() == [12]
    assert one.output_shapes == [(3, 4, 1, 40), (3, 2, 1, 40)]


@on_gpu
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("variant", sorted(QK_VARIANTS))
def test_kernel_matches_mlx_lm_ops_on_the_gpu(variant, dtype):
    """The device's own kernel (Metal or CUDA) against mlx-lm's norms and RoPE, each family and layout."""
    attn, qkv, offset = qk_case(dtype, rng=np.random.default_rng(3), **QK_VARIANTS[variant])
    attn._vmetal_fused.choice["backend"] = _gpu_backend()
    got = fused_qk.queries_and_keys(attn, qkv, offset)
    want = fused_qk.reference(attn, qkv, offset)
    for g, w in zip(got, want):
        g, w = np.asarray(g.astype(mx.float32)), np.asarray(w.astype(mx.float32))
        assert np.abs(g - w).max() / np.abs(w).max() <= fused_qk.SELF_CHECK_TOLERANCE[dtype], variant


@on_gpu
def test_self_check_passes_on_the_gpu():
    attn, _, _ = qk_case(mx.bfloat16)
    attn._vmetal_fused.choice["backend"] = _gpu_backend()
    assert fused_qk.self_check(attn) <= fused_qk.SELF_CHECK_TOLERANCE[mx.bfloat16]
