"""An attention layer's queries and keys normed and rotated in one kernel (`kernels/qk_rope.metal`).

A decode step of a small model on a GPU is bound by its launches (every engine here runs at 3-7 % of the
memory-bandwidth floor), and each layer of mlx-lm's Qwen3 launches four small kernels between its projection and
its attention: the query norm, the key norm and a RoPE for each. One kernel reads the packed projection's query
and key columns (`packed_projections`) and writes both, normed and rotated: three launches fewer a layer, 84 a
step of a 28-layer model (on an H100, `benchmarks/profile/prof_fuse.py`: 451 -> 367 kernels a one-row step).
Llama's attention has no norms; the same kernel rotates its queries and keys in one launch instead of two.

Families (`FAMILIES`) get a `__call__` that is mlx-lm's own with those four calls replaced (the same cache
calls and the same SDPA function of the family's module, so the paged path's hook still routes it): through
the kernel where MLX computes on Metal (the Mac) or on CUDA (`kernels/qk_rope.cu`, the lent NVIDIA GPUs that
measure for a Mac), and elsewhere (this CPU) through `reference`, mlx-lm's own modules in mlx-lm's order, so the
tokens there are mlx-lm's exactly. Before a kernel serves it must agree with the reference on a layer shaped
like the model's (`self_check`); a disagreement serves through the reference with a warning. The paged path
keeps the reference (its compiled steps have not been measured with the kernel). `VLLM_METAL_KERNELS=0` keeps
the reference everywhere.
"""

from __future__ import annotations

import functools
import logging
import math
import sys
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
from mlx import nn

from vmetal.engine.runner.attention.metal import (
    KERNELS,
    SELF_CHECK_TOLERANCE,
    Launch,
    kernel_source,
    kernels_dir,
    metal_available,
    relative_error,
)

logger = logging.getLogger(__name__)

# mlx-lm attention classes whose `__call__` is the one below, and whether they norm their queries and keys.
FAMILIES = {"mlx_lm.models.qwen3.Attention": True, "mlx_lm.models.qwen3_moe.Attention": True,
            "mlx_lm.models.llama.Attention": False}
SIMD_WIDTH = 32


@dataclass
class Rotation:
    """One layer's RoPE as the kernel takes it: per pair its inverse frequency, the position scale, the pairing."""

    inv_freq: mx.array  # float32 [D / 2]
    scale: float
    traditional: bool


def rotation_of(rope: Any, head_dim: int) -> Rotation | None:
    """mlx's `nn.RoPE` or a RoPE of given frequencies (mlx-lm's Llama 3 scaling) over the whole head; None for
    any other (partial rotary dims, YaRN's scaled outputs, ...), which keeps mlx-lm's own `__call__`."""
    if getattr(rope, "dims", None) != head_dim or head_dim % 2:
        return None
    half = head_dim // 2
    if type(rope) is nn.RoPE:
        # mlx's rope: inv_freq = exp2(-(p / half) * log2(base)), in float32
        d = mx.arange(half, dtype=mx.float32) / half
        return Rotation(mx.power(2.0, -d * math.log2(rope.base)), float(rope.scale), bool(rope.traditional))
    freqs = rope.__dict__.get("_freqs")
    if type(rope).__name__ == "Llama3RoPE" and isinstance(freqs, mx.array) and freqs.shape == (half,):
        return Rotation((1.0 / freqs).astype(mx.float32), 1.0, bool(rope.traditional))
    return None


@dataclass
class Fused:
    """What a fused attention layer keeps beside mlx-lm's modules: its head width, its rotation, norms or not,
    and which kernel (shared by every layer of the model: `choice`)."""

    head_dim: int
    rotation: Rotation
    norm: bool
    choice: dict[str, str | None]  # {"backend": "metal" | "cuda" | None}


def reference(attn: Any, qkv: mx.array, offset: Any) -> tuple[mx.array, mx.array]:
    """mlx-lm's own queries and keys, from the packed projection's columns: [B, L, H*D] -> [B, H, L, D] each."""
    B, L, _ = qkv.shape
    nq, nk, d = attn.n_heads, attn.n_kv_heads, attn._vmetal_fused.head_dim
    queries = qkv[..., :nq * d].reshape(B, L, nq, d)
    keys = qkv[..., nq * d:(nq + nk) * d].reshape(B, L, nk, d)
    if attn._vmetal_fused.norm:
        queries, keys = attn.q_norm(queries), attn.k_norm(keys)
    queries, keys = queries.transpose(0, 2, 1, 3), keys.transpose(0, 2, 1, 3)
    return attn.rope(queries, offset=offset), attn.rope(keys, offset=offset)


def plan(attn: Any, qkv: mx.array, offset: Any) -> Launch:
    """The kernel's launch for `reference`'s arguments."""
    fused = attn._vmetal_fused
    B, L, _ = qkv.shape
    nq, nk, d = attn.n_heads, attn.n_kv_heads, fused.head_dim
    if fused.norm:
        q_weight, k_weight, eps = attn.q_norm.weight, attn.k_norm.weight, attn.q_norm.eps
    else:  # MLX kernels have fixed inputs: one element each that the kernel never reads
        q_weight = k_weight = _unread(qkv.dtype)
        eps = 0.0
    per_row = isinstance(offset, mx.array) and offset.size > 1
    offsets = offset.astype(mx.int32).reshape(-1) if isinstance(offset, mx.array) else _offset_array(int(offset))
    return Launch(
        inputs=[qkv, q_weight, k_weight, fused.rotation.inv_freq, _params(float(eps), fused.rotation.scale),
                offsets],
        template=[("T", qkv.dtype), ("D", d), ("NQ", nq), ("NK", nk), ("L", L), ("NORM", int(fused.norm)),
                  ("TRADITIONAL", int(fused.rotation.traditional)), ("PER_ROW", int(per_row))],
        grid=(SIMD_WIDTH, nq + nk, B * L),
        threadgroup=(SIMD_WIDTH, 1, 1),
        output_shapes=[(B, nq, L, d), (B, nk, L, d)],
        output_dtypes=[qkv.dtype, qkv.dtype])


@functools.lru_cache(maxsize=1)
def _offset_array(offset: int) -> mx.array:
    # Every layer of a one-row step rotates at the same position: one small array a step, not one a layer.
    return mx.array([offset], dtype=mx.int32)


@functools.lru_cache(maxsize=8)
def _unread(dtype: mx.Dtype) -> mx.array:
    return mx.zeros((1,), dtype=dtype)


@functools.lru_cache(maxsize=8)
def _params(eps: float, scale: float) -> mx.array:
    return mx.array([eps, scale], dtype=mx.float32)


def queries_and_keys(attn: Any, qkv: mx.array, offset: Any) -> tuple[mx.array, mx.array]:
    """`reference`, through the model's kernel when it has one."""
    backend = attn._vmetal_fused.choice["backend"]
    if backend is None or qkv.shape[0] * qkv.shape[1] == 0:
        return reference(attn, qkv, offset)
    launch = plan(attn, qkv, offset)
    q, k = _kernel(backend)(inputs=launch.inputs, template=launch.template, grid=launch.grid,
                            threadgroup=launch.threadgroup, output_shapes=launch.output_shapes,
                            output_dtypes=launch.output_dtypes)
    return q, k


@functools.cache
def _kernel(backend: str) -> Any:
    spec = KERNELS["qk_rope"]
    names = dict(input_names=list(spec.input_names), output_names=list(spec.output_names))
    if backend == "metal":
        return mx.fast.metal_kernel(name="vmetal_qk_rope", source=kernel_source("qk_rope"), **names)
    return mx.fast.cuda_kernel(name="vmetal_qk_rope", source=(kernels_dir() / "qk_rope.cu").read_text(), **names)


def _call(self: Any, x: mx.array, mask: Any = None, cache: Any = None) -> mx.array:
    """mlx-lm's attention `__call__` (Qwen3's; Llama's without the norms), its norms and RoPE one call."""
    B, L, _ = x.shape
    qkv = self["qkv_proj"](x)
    queries, keys = queries_and_keys(self, qkv, 0 if cache is None else cache.offset)
    start = (self.n_heads + self.n_kv_heads) * self._vmetal_fused.head_dim
    values = qkv[..., start:].reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
    if cache is not None:
        keys, values = cache.update_and_fetch(keys, values)
    # The family module's own SDPA, looked up now: the paged path routes it to its pools.
    sdpa = sys.modules[type(self).__module__].scaled_dot_product_attention
    output = sdpa(queries, keys, values, cache=cache, scale=self.scale, mask=mask)
    return self.o_proj(output.transpose(0, 2, 1, 3).reshape(B, L, -1))


@functools.cache
def _fused_class(cls: type) -> type:
    # In the family's module: the paged path's hook finds the module whose SDPA the layer calls by its classes.
    return type(f"Fused{cls.__name__}", (cls,), {"__call__": _call, "__module__": cls.__module__})


def backend(setting: bool | None) -> str | None:
    """Which kernel the model's fused layers run (`VLLM_METAL_KERNELS`: None is `auto`, False never): Metal's
    where MLX computes on Metal, CUDA's where it computes on CUDA, none on a CPU."""
    if setting is False or mx.default_device().type != mx.DeviceType.gpu:
        return None
    if metal_available():
        return "metal"
    cuda = getattr(mx, "cuda", None)  # MLX builds without a CUDA module
    return "cuda" if cuda is not None and cuda.is_available() else None


def install(model: Any, setting: bool | None = None, kernel: bool = True) -> int:
    """Give each attention layer of a family in `FAMILIES` whose projections are packed and whose RoPE the kernel
    takes the fused `__call__` (that instance only: mlx-lm's own models in the same process keep theirs); the
    kernel runs once `self_check` passes, and not at all without `kernel` (the paged path: its compiled steps
    with the kernel are not measured yet, so they keep mlx-lm's ops). Returns how many layers were fused."""
    from vmetal.preflight.cache_types import qualified_name

    choice: dict[str, str | None] = {"backend": None}
    fused = []
    for module in model.modules():
        norm = FAMILIES.get(qualified_name(type(module)))
        if norm is None or "qkv_proj" not in module or "_vmetal_fused" in module.__dict__:
            continue
        head_dim = module["qkv_proj"]["weight"].shape[0] // (module.n_heads + 2 * module.n_kv_heads)
        rotation = rotation_of(module.rope, head_dim)
        if rotation is None:
            continue
        object.__setattr__(module, "_vmetal_fused", Fused(head_dim, rotation, norm, choice))
        module.__class__ = _fused_class(type(module))
        fused.append(module)
    if fused:
        mx.eval([f._vmetal_fused.rotation.inv_freq for f in fused])
    wanted = backend(setting) if fused and kernel else None
    if wanted is not None:
        choice["backend"] = wanted
        error = self_check(fused[0])
        if not error <= SELF_CHECK_TOLERANCE.get(_dtype(fused[0]), 3e-2):
            logger.warning("the %s query/key norm and RoPE kernel disagrees with mlx-lm's ops on this model's "
                           "first attention layer (relative error %.2e): serving through mlx-lm's ops", wanted,
                           error)
            choice["backend"] = None
    return len(fused)


def _dtype(attn: Any) -> mx.Dtype:
    """The dtype of the layer's activations: its projection's (a quantized one's scales')."""
    qkv = attn["qkv_proj"]
    return (qkv["scales"] if "scales" in qkv else qkv["weight"]).dtype


def self_check(attn: Any, seed: int = 0) -> float:
    """The kernel against `reference` on a random step of `attn`'s shape and dtype (a prompt of 5 tokens at
    offset 3, then a batch of 3 rows at their own offsets): the largest |difference| over the largest |value|."""
    import numpy as np

    rng = np.random.default_rng(seed)
    width = attn["qkv_proj"]["weight"].shape[0]
    dtype = _dtype(attn)
    worst = 0.0
    for rows, length, offset in ((1, 5, 3), (3, 1, mx.array([7, 0, 40], dtype=mx.int32))):
        qkv = mx.array(rng.standard_normal((rows, length, width)).astype(np.float32)).astype(dtype)
        got = queries_and_keys(attn, qkv, offset)
        want = reference(attn, qkv, offset)
        for g, w in zip(got, want):
            err = relative_error(g, w)
            worst = max(worst, err if err == err else math.inf)  # NaN fails (max would drop it)
    return worst
