"""Metal kernels for the paged KV path, loaded from `kernels/*.metal` with `mx.fast.metal_kernel` (and the
registry of every kernel body there: `qk_rope`, an attention layer's norms and RoPE, is `vmetal.engine.fused_qk`'s).

The functions here have the signatures of `vmetal.engine.runner.attention.reference` (the pure-MLX reference)
plus `use_kernel`: the Metal kernel when True, the reference when False. Whether kernels run is decided once
per engine (`use_kernels`, from `VLLM_METAL_KERNELS`), and per op by `kernel_choice`; the paged runner passes
that decision down, so nothing is probed per layer or per step.

What each kernel computes, and the reference and test it matches: `kernels/README.md`.

Chosen when kernels are on (`AUTOMATIC`):
- `paged_attention`: the kernel.
- `reshape_and_cache`, `copy_blocks`: the reference. MLX kernels write fresh output buffers, so a cache-write
  kernel has to write the whole new pool each call, while the reference's MLX scatter writes only the changed
  rows, in place (tests/unit/test_paged_attention.py::test_cache_writes_update_pools_in_place). The kernels
  exist, are tested against the reference and can be asked for with `use_kernel=True`; make them automatic
  only if a Mac measures them faster.

Each kernel's launch (inputs, template arguments, grid, output shapes) is built by a `plan_*` function of plain
MLX ops, so the Python side can be tested, and the generated Metal source checked for syntax, off a Mac.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx

from vmetal.engine.runner.attention import reference
from vmetal.engine.runner.attention.reference import AttentionPlan, CacheWrites, IntsLike

SIMD_WIDTH = 32  # lanes per Apple GPU SIMD group; paged_attention.metal uses one SIMD group per threadgroup
MAX_THREADGROUP = 256


@dataclass(frozen=True)
class KernelSpec:
    """How `mx.fast.metal_kernel` is told about one `kernels/<name>.metal` body."""

    name: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]


KERNELS: dict[str, KernelSpec] = {
    "paged_attention": KernelSpec(
        "paged_attention",
        ("queries", "k_pool", "v_pool", "block_tables", "token_seq", "token_pos", "scale", "sinks", "softcap"),
        ("out",)),
    "reshape_and_cache": KernelSpec(
        "reshape_and_cache", ("keys", "values", "k_pool", "v_pool", "slot_token"), ("k_out", "v_out")),
    "copy_blocks": KernelSpec("copy_blocks", ("k_pool", "v_pool", "block_src"), ("k_out", "v_out")),
    # Not a paged op: an attention layer's query/key norms and RoPE (vmetal.engine.fused_qk, which chooses it).
    "qk_rope": KernelSpec("qk_rope", ("qkv", "q_weight", "k_weight", "inv_freq", "params", "offset"),
                          ("q_out", "k_out")),
}

# Which ops run their kernel when kernels are on (see the module docstring for why).
AUTOMATIC = {"paged_attention": True, "reshape_and_cache": False, "copy_blocks": False}


# ------------------------------------------------------------------------------------------- choosing
def metal_available() -> bool:
    """MLX has a Metal device (Apple Silicon with the Metal build of MLX)."""
    try:
        return bool(mx.metal.is_available())
    except Exception:  # an MLX build without the metal module
        return False


def use_kernels(setting: bool | None = None) -> bool:
    """Whether the Metal kernels run, decided once per engine from `VLLM_METAL_KERNELS` (`MetalConfig.kernels`):
    None (`auto`): where MLX computes on Metal (Metal available, the default device the GPU); False: never;
    True: always, and an `EnvError` where they cannot run."""
    from vmetal import envs

    if setting is False:
        return False
    on_metal = metal_available() and mx.default_device().type == mx.DeviceType.gpu
    if setting is None or on_metal:
        return on_metal
    raise envs.EnvError(f"{envs.KERNELS}=1 asks for the Metal kernels, but MLX is not computing on Metal "
                        f"(Metal available: {metal_available()}, default device: {mx.default_device()}); "
                        f"set {envs.KERNELS}=auto or 0", variable=envs.KERNELS, value="1",
                        allowed="`auto` or `0` without Metal")


def kernel_choice(on: bool) -> dict[str, bool]:
    """Per op, whether its kernel runs, when kernels are `on` (`AUTOMATIC`)."""
    return {op: on and automatic for op, automatic in AUTOMATIC.items()}


# The kernel against the reference, both in the same dtype (not against float64): the same inputs and the same
# float32 accumulation leave differences of a few units of the dtype's rounding.
SELF_CHECK_TOLERANCE = {mx.float32: 1e-4, mx.float16: 1e-2, mx.bfloat16: 3e-2}


@dataclass(frozen=True)
class SelfCheck:
    """The paged-attention kernel against the pure-MLX reference on one small random step."""

    error: float  # max |kernel - reference| / max |reference|
    tolerance: float
    shape: str  # what was checked, for the log line

    @property
    def ok(self) -> bool:
        return self.error <= self.tolerance  # NaN fails too

    def describe(self) -> str:
        verdict = "agrees with" if self.ok else "DISAGREES with"
        return (f"the Metal paged-attention kernel {verdict} the pure-MLX reference on {self.shape}: relative "
                f"error {self.error:.2e} (tolerance {self.tolerance:.0e})")


def self_check(num_heads: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: mx.Dtype,
               seed: int = 0, *, value_dim: int | None = None, window: int | None = None, sinks: bool = False,
               softcap: float | None = None) -> SelfCheck:
    """Run the kernel once on a step shaped like the model's attention (its head dims, GQA ratio, block size,
    dtype, and the window, sinks and softcap its layers attend with: each is a variant of its own): a decode,
    a prefill chunk and a whole prompt over scattered blocks, contexts across block boundaries, and with a
    window one context past it. A few milliseconds; the kernel has never run on real hardware before its first
    start there."""
    import numpy as np

    rng = np.random.default_rng(seed)
    ctx_lens, q_lens = [1, 2 * block_size + 1, block_size + 3], [1, block_size, block_size + 3]
    if window is not None:  # a decode and a chunk whose windows start inside the context
        ctx_lens, q_lens = ctx_lens + [window + block_size + 2] * 2, q_lens + [1, block_size]
    blocks = [-(-c // block_size) for c in ctx_lens]
    order = rng.permutation(sum(blocks) + 2)
    tables = np.zeros((len(ctx_lens), max(blocks)), dtype=np.int32)
    used = 0
    for i, n in enumerate(blocks):
        tables[i, :n] = order[used:used + n]
        used += n

    def normal(*shape: int) -> mx.array:
        return mx.array(rng.standard_normal(shape).astype(np.float32)).astype(dtype)

    k_pool = normal(sum(blocks) + 2, block_size, num_kv_heads, head_dim)
    v_pool = normal(sum(blocks) + 2, block_size, num_kv_heads, value_dim or head_dim)
    queries = normal(sum(q_lens), num_heads, head_dim)
    sink_logits = mx.array(rng.standard_normal(num_heads).astype(np.float32)) if sinks else None
    args = (queries, k_pool, v_pool, mx.array(tables), ctx_lens, q_lens, head_dim ** -0.5, window, sink_logits,
            softcap)
    error = relative_error(paged_attention(*args, use_kernel=True), reference.paged_attention(*args))
    features = {f"values {value_dim} wide": value_dim not in (None, head_dim), f"window {window}": window is not None,
                "sinks": sinks, f"softcap {softcap}": softcap is not None}
    return SelfCheck(float(error), SELF_CHECK_TOLERANCE.get(dtype, 3e-2),
                     f"{num_heads} query / {num_kv_heads} KV heads x {head_dim}, block size {block_size}, {dtype}"
                     + "".join(f", {f}" for f, used in features.items() if used))


def relative_error(got: mx.array, want: mx.array) -> float:
    """max |got - want| / max |want|, in float32 (NaN when the kernel wrote one: a check then fails)."""
    got, want = got.astype(mx.float32), want.astype(mx.float32)
    return float((mx.abs(got - want).max() / mx.maximum(mx.abs(want).max(), 1e-30)).item())


# ------------------------------------------------------------------------------------------- loading
def kernels_dir() -> Path:
    """`vmetal/_kernels/` in an installed wheel (package data), else `kernels/` of the source checkout."""
    package = Path(__file__).resolve().parents[3]  # vmetal/engine/runner/attention/metal.py -> vmetal/
    for candidate in (package / "_kernels", package.parent / "kernels"):
        if (candidate / "paged_attention.metal").is_file():
            return candidate
    raise FileNotFoundError(f"Metal kernel sources not found in {package / '_kernels'} or "
                            f"{package.parent / 'kernels'}; reinstall vmetal, or set VLLM_METAL_KERNELS=0")


def kernel_source(name: str) -> str:
    return (kernels_dir() / f"{name}.metal").read_text()


@functools.cache
def _kernel(name: str) -> Callable[..., list[mx.array]]:
    spec = KERNELS[name]
    return mx.fast.metal_kernel(name=f"vmetal_{name}", input_names=list(spec.input_names),
                                output_names=list(spec.output_names), source=kernel_source(name))


@dataclass
class Launch:
    """One kernel call: the keyword arguments of a `mx.fast.metal_kernel` callable."""

    inputs: list[mx.array]
    template: list[tuple[str, Any]]
    grid: tuple[int, int, int]
    threadgroup: tuple[int, int, int]
    output_shapes: list[tuple[int, ...]]
    output_dtypes: list[mx.Dtype]

    def run(self, name: str) -> list[mx.array]:
        return _kernel(name)(inputs=self.inputs, template=self.template, grid=self.grid,
                             threadgroup=self.threadgroup, output_shapes=self.output_shapes,
                             output_dtypes=self.output_dtypes)


# ------------------------------------------------------------------------------------------- launches
def plan_paged_attention(queries: mx.array, k_pool: mx.array, v_pool: mx.array, block_tables: IntsLike,
                         context_lens: IntsLike, query_lens: IntsLike, scale: float,
                         per_token: tuple[mx.array, mx.array] | None = None, window: int | None = None,
                         sinks: mx.array | None = None, softcap: float | None = None) -> Launch:
    """`per_token`: `reference.token_positions(query_lens, context_lens)`, when the caller has it already.

    The window, sinks and softcap are template switches: each variant a model uses compiles once."""
    num_tokens, num_heads, head_dim = queries.shape
    _, block_size, num_kv_heads, _ = k_pool.shape
    value_dim = v_pool.shape[-1]
    if num_heads % num_kv_heads:
        raise ValueError(f"paged_attention: {num_heads} query heads are not a multiple of {num_kv_heads} KV heads")
    token_seq, token_pos = per_token or reference.token_positions(query_lens, context_lens)
    tables = mx.maximum(reference._int32(block_tables), 0)
    # Absent sinks still take an input slot (MLX kernels have fixed inputs): one float the kernel never reads.
    sink_logits = mx.zeros((1,), dtype=mx.float32) if sinks is None else sinks.astype(mx.float32)
    return Launch(
        inputs=[queries, k_pool, v_pool, tables, token_seq, token_pos, mx.array(scale, dtype=mx.float32),
                sink_logits, mx.array(softcap or 0.0, dtype=mx.float32)],
        template=[("T", queries.dtype), ("HQ", num_heads), ("HKV", num_kv_heads), ("D", head_dim),
                  ("DV", value_dim), ("BS", block_size), ("WINDOW", window or 0), ("SINKS", int(sinks is not None)),
                  ("SOFTCAP", int(softcap is not None))],
        grid=(SIMD_WIDTH, num_heads, num_tokens),
        threadgroup=(SIMD_WIDTH, 1, 1),
        output_shapes=[(num_tokens, num_heads, value_dim)],
        output_dtypes=[queries.dtype])


def plan_reshape_and_cache(keys: mx.array, values: mx.array, k_pool: mx.array, v_pool: mx.array,
                           slot_mapping: IntsLike) -> Launch:
    num_blocks, block_size, num_kv_heads, head_dim = k_pool.shape
    num_slots = num_blocks * block_size
    row = num_kv_heads * head_dim
    # slot -> token, the inverse of slot_mapping; slot -1 goes to a scratch entry past the end, cut off.
    slots = reference._int32(slot_mapping)
    slots = mx.where(slots >= 0, slots, num_slots)
    slot_token = mx.full((num_slots + 1,), -1, dtype=mx.int32)
    slot_token[slots] = mx.arange(slots.shape[0], dtype=mx.int32)
    return Launch(
        inputs=[keys, values, k_pool, v_pool, slot_token[:num_slots]],
        template=[("T", k_pool.dtype), ("ROW", row)],
        grid=(row, num_slots, 1),
        threadgroup=(min(row, MAX_THREADGROUP), 1, 1),
        output_shapes=[k_pool.shape, v_pool.shape],
        output_dtypes=[k_pool.dtype, v_pool.dtype])


def plan_copy_blocks(k_pool: mx.array, v_pool: mx.array, src: IntsLike, dst: IntsLike) -> Launch:
    num_blocks = k_pool.shape[0]
    block = k_pool.size // num_blocks
    src, dst = reference._int32(src).reshape(-1), reference._int32(dst).reshape(-1)
    if src.shape != dst.shape:
        raise ValueError(f"copy_blocks: {src.shape[0]} source blocks but {dst.shape[0]} destinations")
    block_src = mx.arange(num_blocks, dtype=mx.int32)
    block_src[dst] = src
    return Launch(
        inputs=[k_pool, v_pool, block_src],
        template=[("BLOCK", block)],
        grid=(block, num_blocks, 1),
        threadgroup=(min(block, MAX_THREADGROUP), 1, 1),
        output_shapes=[k_pool.shape, v_pool.shape],
        output_dtypes=[k_pool.dtype, v_pool.dtype])


# ------------------------------------------------------------------------------------------- entry points
def paged_attention(queries: mx.array, k_pool: mx.array, v_pool: mx.array, block_tables: IntsLike,
                    context_lens: IntsLike, query_lens: IntsLike, scale: float, window: int | None = None,
                    sinks: mx.array | None = None, softcap: float | None = None, *,
                    use_kernel: bool = False) -> mx.array:
    """`reference.paged_attention`, as a Metal kernel with `use_kernel`."""
    if not use_kernel:
        return reference.paged_attention(queries, k_pool, v_pool, block_tables, context_lens, query_lens, scale,
                                         window, sinks, softcap)
    if queries.shape[0] == 0:
        return mx.zeros((0, queries.shape[1], v_pool.shape[-1]), dtype=queries.dtype)
    launch = plan_paged_attention(queries, k_pool, v_pool, block_tables, context_lens, query_lens, scale,
                                  window=window, sinks=sinks, softcap=softcap)
    return launch.run("paged_attention")[0]


def reshape_and_cache(keys: mx.array, values: mx.array, k_pool: mx.array, v_pool: mx.array,
                      slot_mapping: IntsLike, *, use_kernel: bool = False) -> tuple[mx.array, mx.array]:
    """`reference.reshape_and_cache`, as a Metal kernel with `use_kernel`."""
    if not use_kernel or keys.shape[0] == 0 or not one_width(k_pool, v_pool):
        return reference.reshape_and_cache(keys, values, k_pool, v_pool, slot_mapping)
    k_out, v_out = plan_reshape_and_cache(keys, values, k_pool, v_pool, slot_mapping).run("reshape_and_cache")
    return k_out, v_out


def one_width(k_pool: mx.array, v_pool: mx.array) -> bool:
    """Whether K and V are as wide (what the kernels take); MLA's values are narrower than its keys."""
    return k_pool.shape == v_pool.shape


def copy_blocks(k_pool: mx.array, v_pool: mx.array, src: IntsLike, dst: IntsLike, *,
                use_kernel: bool = False) -> tuple[mx.array, mx.array]:
    """`reference.copy_blocks`, as a Metal kernel with `use_kernel`."""
    if not use_kernel or len(src) == 0 or not one_width(k_pool, v_pool):
        return reference.copy_blocks(k_pool, v_pool, src, dst)
    k_out, v_out = plan_copy_blocks(k_pool, v_pool, src, dst).run("copy_blocks")
    return k_out, v_out


def attend(queries: mx.array, k_pool: mx.array, v_pool: mx.array, plan: AttentionPlan, scale: float, *,
           use_kernel: bool = False, sinks: mx.array | None = None, softcap: float | None = None) -> mx.array:
    """`paged_attention` over a step planned once (`reference.plan_attention`), as a Metal kernel with `use_kernel`.

    The model runner calls this once per layer: the host work of a step is done once, in the plan. The kernel
    takes the plan's sliding window, sinks, Gemma 2's softcap and MLA's narrower values as the reference does."""
    if not use_kernel:
        return reference.attend(queries, k_pool, v_pool, plan, scale, sinks, softcap)
    if queries.shape[0] == 0:
        return mx.zeros((0, queries.shape[1], v_pool.shape[-1]), dtype=queries.dtype)
    if "paged_attention" not in plan.kernel_inputs:  # the same for every layer of the step
        plan.kernel_inputs["paged_attention"] = (
            mx.maximum(mx.array(plan.block_tables.astype("int32")), 0),
            *reference.token_positions(plan.query_lens, plan.context_lens))
    tables, token_seq, token_pos = plan.kernel_inputs["paged_attention"]
    launch = plan_paged_attention(queries, k_pool, v_pool, tables, plan.context_lens, plan.query_lens, scale,
                                  per_token=(token_seq, token_pos), window=plan.window, sinks=sinks,
                                  softcap=softcap)
    return launch.run("paged_attention")[0]


def write_cache(keys: mx.array, values: mx.array, k_pool: mx.array, v_pool: mx.array, writes: CacheWrites, *,
                use_kernel: bool = False) -> tuple[mx.array, mx.array]:
    """`reshape_and_cache` with its slot mapping planned once (`reference.plan_writes`), as a kernel with
    `use_kernel`."""
    if not use_kernel or keys.shape[0] == 0 or not one_width(k_pool, v_pool):
        return reference.write_cache(keys, values, k_pool, v_pool, writes)
    return reshape_and_cache(keys, values, k_pool, v_pool, writes.slot_mapping, use_kernel=use_kernel)


# ------------------------------------------------------------------------------------------- doctor's probe
# The shape `vmetal doctor` checks: a common GQA attention (Llama 3 8B, Qwen3 8B have 32/8 x 128; 16/8 is
# half the work with the same ratio and head dim) in bfloat16, the dtype most checkpoints serve in.
DOCTOR_SHAPE = dict(num_heads=16, num_kv_heads=8, head_dim=128, block_size=16, dtype=mx.bfloat16)


def main() -> int:
    """`python -m vmetal.engine.runner.attention.metal`: doctor's `metal_kernels` check, in a child process
    because a kernel that faults takes its process down. Prints the self-check as JSON; exit 0 when the
    kernel agrees with the reference, 1 when it does not (any other failure is a traceback and exit 1 too,
    with no JSON)."""
    import json

    check = self_check(**DOCTOR_SHAPE)
    print(json.dumps({"ok": check.ok, "error": check.error, "tolerance": check.tolerance, "shape": check.shape,
                      "device": str(mx.default_device())}))
    return 0 if check.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
