"""The Metal kernels off a Mac: syntax, and a run on a CPU emulation of the Metal execution model.

Each `kernels/<name>.metal` is a kernel body. Here it is wrapped in the signature `mx.fast.metal_kernel` would
generate for the launch that `vmetal.engine.runner.attention.metal.plan_<name>` builds (same input names, dtypes, template arguments,
shape arrays and thread attributes, following MLX's `write_signature`), with `kernels/metal_stub.h` standing in
for Metal's types and built-ins, and

- checked by a C++ compiler (`-fsyntax-only -std=c++14`, MSL being C++14-based), for several dtypes;
- compiled and run as C++ over the kernel's grid: every threadgroup's threads run as real threads, and
  `simd_sum` exchanges values across each SIMD group's 32 lanes. The outputs must equal the pure-MLX reference.

What this cannot see (address spaces, Metal's own rules, the real GPU's scheduling) is what the `metal`-marked
tests of tests/unit/test_paged_attention.py check on a Mac.
"""

from __future__ import annotations

import math
import shutil
import subprocess
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx import nn

from tests.support import REPO
from vmetal.engine import fused_qk
from vmetal.engine.runner.attention import metal as kernels
from vmetal.engine.runner.attention import reference as ref

STUB = REPO / "kernels" / "metal_stub.h"

# MLX's get_type_string
MLX_TYPES = {
    mx.bool_: "bool", mx.uint8: "uint8_t", mx.uint16: "uint16_t", mx.uint32: "uint32_t", mx.uint64: "uint64_t",
    mx.int8: "int8_t", mx.int16: "int16_t", mx.int32: "int32_t", mx.int64: "int64_t",
    mx.float16: "float16_t", mx.bfloat16: "bfloat16_t", mx.float32: "float",
}
# The thread attributes MLX declares when their name appears in the source, in MLX's order.
MLX_ATTRIBUTES = [
    ("dispatch_quadgroups_per_threadgroup", "uint"), ("dispatch_simdgroups_per_threadgroup", "uint"),
    ("dispatch_threads_per_threadgroup", "uint3"), ("grid_origin", "uint3"), ("grid_size", "uint3"),
    ("quadgroup_index_in_threadgroup", "uint"), ("quadgroups_per_threadgroup", "uint"),
    ("simdgroup_index_in_threadgroup", "uint"), ("simdgroups_per_threadgroup", "uint"),
    ("thread_execution_width", "uint"), ("thread_index_in_quadgroup", "uint"),
    ("thread_index_in_simdgroup", "uint"), ("thread_index_in_threadgroup", "uint"),
    ("thread_position_in_grid", "uint3"), ("thread_position_in_threadgroup", "uint3"),
    ("threadgroup_position_in_grid", "uint3"), ("threadgroups_per_grid", "uint3"),
    ("threads_per_grid", "uint3"), ("threads_per_simdgroup", "uint"), ("threads_per_threadgroup", "uint3"),
]
MAX_CONSTANT_ARRAY_SIZE = 8


def compiler() -> str | None:
    return shutil.which("clang++") or shutil.which("g++")


needs_compiler = pytest.mark.skipif(compiler() is None, reason="no C++ compiler (clang++ or g++)")


def compile_cpp(source: str, tmp_path: Path, *, syntax_only: bool, name: str = "k") -> subprocess.CompletedProcess:
    path = tmp_path / f"{name}.cpp"
    path.write_text(source)
    cxx = compiler()
    quiet = "-Wno-unknown-attributes" if "clang" in Path(cxx).name else "-Wno-attributes"
    cmd = [cxx, "-std=c++14", quiet]
    if syntax_only:
        cmd += ["-fsyntax-only", str(path)]
    else:
        cmd += ["-O1", "-pthread", str(path), "-o", str(tmp_path / name)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


# ---------------------------------------------------------------------------------- MLX's generated source
def template_args(launch: kernels.Launch) -> str:
    parts = []
    for _, value in launch.template:
        parts.append(MLX_TYPES[value] if isinstance(value, mx.Dtype) else str(int(value)))
    return "<" + ", ".join(parts) + ">"


def parameters(spec: kernels.KernelSpec, source: str, launch: kernels.Launch) -> list[tuple[str, str, str]]:
    """(kind, C++ declaration, name) of each parameter, in MLX's order.

    kind: input, shape, strides, ndim, output or attr."""
    params = []
    for name, arr in zip(spec.input_names, launch.inputs):
        space = "constant" if arr.size < MAX_CONSTANT_ARRAY_SIZE else "device"
        ref_ = "&" if arr.ndim == 0 else "*"
        params.append(("input", f"const {space} {MLX_TYPES[arr.dtype]}{ref_} {name}", name))
        if arr.ndim > 0:
            if f"{name}_shape" in source:
                params.append(("shape", f"const constant int* {name}_shape", name))
            if f"{name}_strides" in source:
                params.append(("strides", f"const constant int64_t* {name}_strides", name))
            if f"{name}_ndim" in source:
                params.append(("ndim", f"const constant int& {name}_ndim", name))
    for name, dtype in zip(spec.output_names, launch.output_dtypes):
        params.append(("output", f"device {MLX_TYPES[dtype]}* {name}", name))
    return params


def mlx_source(name: str, launch: kernels.Launch, body: str | None = None) -> tuple[str, str, list]:
    """The source MLX compiles for this launch: (source, kernel function name, parameters)."""
    spec = kernels.KERNELS[name]
    body = kernels.kernel_source(name) if body is None else body
    fname = f"custom_kernel_{name}"
    params = parameters(spec, body, launch)
    lines = [f"  {decl} [[buffer({i})]]" for i, (_, decl, _) in enumerate(params)]
    attrs = [(a, t) for a, t in MLX_ATTRIBUTES if a in body]
    lines += [f"  {t} {a} [[{a}]]" for a, t in attrs]
    params += [("attr", t, a) for a, t in attrs]
    kinds = ", ".join(("typename " if isinstance(v, mx.Dtype) else "int ") + k for k, v in launch.template)
    src = (f'#include "{STUB}"\n\ntemplate <{kinds}>\n[[kernel]] void {fname}(\n' + ",\n".join(lines) + ") {\n"
           + body + "\n}\n")
    inst = fname + template_args(launch)
    # MLX writes `template [[host_name("...")]] [[kernel]] decltype(f<...>) f<...>;`: Metal accepts attributes
    # there, C++ does not, so the instantiation is written without them.
    src += f"\ntemplate decltype({inst}) {inst};\n"
    return src, fname, params


# ---------------------------------------------------------------------------------- small launches
def small_case(dtype=mx.float32, *, rng=None, block_size=8, num_kv_heads=2, ratio=2, head_dim=40, value_dim=None):
    """A tiny paged state and a mixed pack (decode, prefill chunk, full prefill) with its K/V written."""
    rng = np.random.default_rng() if rng is None else rng
    ctx_lens, q_lens = [13, 9, 1, 20], [1, 4, 1, 20]
    num_blocks = 16
    k_pool = mx.array(rng.standard_normal((num_blocks, block_size, num_kv_heads, head_dim)).astype(np.float32))
    v_pool = mx.array(rng.standard_normal((num_blocks, block_size, num_kv_heads, value_dim or head_dim))
                      .astype(np.float32))
    order = rng.permutation(num_blocks)
    max_blocks = max(math.ceil(c / block_size) for c in ctx_lens) + 1
    tables = np.full((len(ctx_lens), max_blocks), -1, dtype=np.int32)
    used = 0
    for i, c in enumerate(ctx_lens):
        n = math.ceil(c / block_size)
        tables[i, :n] = order[used:used + n]
        used += n
    queries = mx.array(rng.standard_normal((sum(q_lens), num_kv_heads * ratio, head_dim)).astype(np.float32))
    return (queries.astype(dtype), k_pool.astype(dtype), v_pool.astype(dtype), mx.array(tables),
            ctx_lens, q_lens, 1 / math.sqrt(head_dim))


# The paged-attention kernel's variants: each template switch alone, then all at once. The window (6) is shorter
# than three of small_case's four contexts, the softcap (1.5) of the order of the scores, so each one changes
# the output; MLA's values (24 wide) are narrower than its keys (40), and wider ones (56) come with the rest.
VARIANTS = {
    "full": {}, "window": {"window": 6}, "sinks": {"sinks": True}, "softcap": {"softcap": 1.5},
    "narrow-values": {"value_dim": 24}, "all": {"window": 6, "sinks": True, "softcap": 1.5, "value_dim": 56},
}


def launches(dtype=mx.float32, rng=None, window=None, sinks=False, softcap=None, value_dim=None):
    rng = np.random.default_rng() if rng is None else rng
    q, k_pool, v_pool, tables, ctx, qlens, scale = small_case(dtype, rng=rng, value_dim=value_dim)
    sink_logits = mx.array(rng.standard_normal(q.shape[1]).astype(np.float32)) if sinks else None
    variant = dict(window=window, sinks=sink_logits, softcap=softcap)
    t = 6
    keys = mx.array(rng.standard_normal((t, *k_pool.shape[2:])).astype(np.float32)).astype(dtype)
    values = mx.array(rng.standard_normal((t, *k_pool.shape[2:])).astype(np.float32)).astype(dtype)
    slots = [5, -1, 17, 100, -1, 0]
    attn, qkv, offset = qk_case(dtype, rng)
    return {
        "qk_rope": (fused_qk.plan(attn, qkv, offset), lambda: list(fused_qk.reference(attn, qkv, offset))),
        "paged_attention": (kernels.plan_paged_attention(q, k_pool, v_pool, tables, ctx, qlens, scale, **variant),
                            lambda: [ref.paged_attention(q, k_pool, v_pool, tables, ctx, qlens, scale, **variant)]),
        "reshape_and_cache": (kernels.plan_reshape_and_cache(keys, values, k_pool, v_pool, slots),
                              lambda: list(ref.reshape_and_cache(keys, values, k_pool, v_pool, slots))),
        "copy_blocks": (kernels.plan_copy_blocks(k_pool, v_pool, [3, 7, 7], [12, 0, 9]),
                        lambda: list(ref.copy_blocks(k_pool, v_pool, [3, 7, 7], [12, 0, 9]))),
    }


# The query/key norm and RoPE kernel's cases (vmetal.engine.fused_qk): Qwen3's (norms, mlx's RoPE), Llama's
# (no norms), traditional pairs, one row of a prompt at one offset and rows at offsets of their own.
QK_VARIANTS = {"qwen3": {}, "llama": {"norm": False}, "traditional": {"traditional": True},
               "per-row": {"rows": 3, "length": 1}}


def qk_case(dtype=mx.float32, rng=None, norm=True, traditional=False, rows=1, length=5):
    """A fused attention layer of small random weights (a Qwen3 or Llama attention, packed and fused), a packed
    projection's output for it, and the offsets it rotates at."""
    from mlx_lm.models import llama, qwen3

    from vmetal.engine import fused_qk, packed_projections

    rng = np.random.default_rng() if rng is None else rng
    family = qwen3 if norm else llama
    fields = dict(model_type="qwen3", hidden_size=48, num_hidden_layers=1, intermediate_size=64,
                  num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, vocab_size=32, head_dim=40,
                  tie_word_embeddings=True, max_position_embeddings=512, rope_theta=10000.0)
    if not norm:
        fields = {**fields, "model_type": "llama"}
    args = family.ModelArgs(**{k: v for k, v in fields.items() if k in family.ModelArgs.__dataclass_fields__})
    attn = family.Attention(args)
    if norm:
        for n in (attn.q_norm, attn.k_norm):
            n.weight = mx.array(rng.uniform(0.5, 1.5, 40).astype(np.float32))
    if traditional:
        attn.rope = nn.RoPE(40, traditional=True, base=10000.0)
    attn.set_dtype(dtype)
    packed_projections.pack(attn)
    assert fused_qk.install(attn) == 1
    offset = mx.array([7, 0, 19][:rows], dtype=mx.int32) if rows > 1 else 11
    qkv = mx.array(rng.standard_normal((rows, length, 8 * 40)).astype(np.float32)).astype(dtype)
    return attn, qkv, offset


# ---------------------------------------------------------------------------------- the tests
def test_every_kernel_has_a_source_that_uses_its_names():
    assert set(kernels.KERNELS) == set(kernels.AUTOMATIC) | {"qk_rope"}  # qk_rope: fused_qk chooses it
    readme = (kernels.kernels_dir() / "README.md").read_text()
    for name, spec in kernels.KERNELS.items():
        body = kernels.kernel_source(name)
        for arg in spec.input_names + spec.output_names:
            assert arg in body, f"{name}.metal never uses {arg}"
        assert f"`{name}`" in readme, f"kernels/README.md does not describe {name}"


@needs_compiler
@pytest.mark.parametrize("name", sorted(kernels.KERNELS))
def test_kernel_syntax(name, tmp_path):
    sources = []
    for dtype in (mx.float32, mx.float16, mx.bfloat16):
        launch = launches(dtype)[name][0]
        src, fname, _ = mlx_source(name, launch)
        sources.append(src.replace(fname, f"{fname}_{MLX_TYPES[dtype]}"))
    result = compile_cpp("\n".join(sources), tmp_path, syntax_only=True)
    assert result.returncode == 0, result.stderr


@needs_compiler
def test_syntax_check_catches_errors(tmp_path):
    launch = launches()["paged_attention"][0]
    body = kernels.kernel_source("paged_attention").replace("metal::simd_sum", "metal::simd_summ")
    src, _, _ = mlx_source("paged_attention", launch, body)
    result = compile_cpp(src, tmp_path, syntax_only=True)
    assert result.returncode != 0 and "simd_summ" in result.stderr


# ---------------------------------------------------------------------------------- CPU emulation
HARNESS = r"""
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <thread>
#include <vector>

// One SIMD group's lanes meet here: simd_sum waits for all of them (a barrier) and adds their values.
struct SimdGroup {
  std::mutex m;
  std::condition_variable cv;
  int lanes = 0, arrived = 0;
  unsigned generation = 0;
  float values[32];
  void barrier() {
    std::unique_lock<std::mutex> lock(m);
    unsigned gen = generation;
    if (++arrived == lanes) { arrived = 0; ++generation; cv.notify_all(); }
    else cv.wait(lock, [&] { return gen != generation; });
  }
};
thread_local SimdGroup* my_group = nullptr;
thread_local int my_lane = 0;
float emulated_simd_sum(float x) {
  my_group->values[my_lane] = x;
  my_group->barrier();
  float s = 0.0f;
  for (int i = 0; i < my_group->lanes; ++i) s += my_group->values[i];
  my_group->barrier();
  return s;
}

template <typename U>
std::vector<U> load(const char* path, size_t n) {
  std::vector<U> v(n > 0 ? n : 1);
  FILE* f = std::fopen(path, "rb");
  if (!f || std::fread(v.data(), sizeof(U), n, f) != n) {
    std::fprintf(stderr, "cannot read %s\n", path);
    std::exit(2);
  }
  std::fclose(f);
  return v;
}
template <typename U>
void save(const char* path, const std::vector<U>& v) {
  FILE* f = std::fopen(path, "wb");
  std::fwrite(v.data(), sizeof(U), v.size(), f);
  std::fclose(f);
}
"""

ATTRIBUTE_VALUES = {
    "thread_position_in_grid": "pos", "thread_position_in_threadgroup": "local",
    "threadgroup_position_in_grid": "group", "thread_index_in_threadgroup": "index",
    "thread_index_in_simdgroup": "uint(index % 32)", "simdgroup_index_in_threadgroup": "uint(index / 32)",
    "threads_per_threadgroup": "tg", "threads_per_grid": "grid", "threads_per_simdgroup": "32u",
    "threadgroups_per_grid": "groups",
}


def emulation(name: str, launch: kernels.Launch, workdir: Path) -> str:
    """C++ that runs `name`'s body over its launch grid and writes each output to `<workdir>/<output>.bin`."""
    src, fname, params = mlx_source(name, launch)
    src = src[:src.rindex("\ntemplate decltype")]  # the explicit instantiation: the call below makes one
    src = src.replace("metal::simd_sum", "emulated_simd_sum")
    setup, args = [], []
    arrays = dict(zip(kernels.KERNELS[name].input_names, launch.inputs))
    for kind, decl, pname in params:
        if kind == "input":
            arr = arrays[pname]
            ctype = {mx.float32: "float", mx.int32: "int32_t"}[arr.dtype]
            np.asarray(arr).tofile(workdir / f"{pname}.bin")
            setup.append(f'auto {pname} = load<{ctype}>("{workdir / pname}.bin", {arr.size});')
            args.append(f"{pname}[0]" if arr.ndim == 0 else f"{pname}.data()")
        elif kind == "shape":
            shape = ", ".join(map(str, arrays[pname].shape))
            setup.append(f"const int {pname}_shape[] = {{{shape}}};")
            args.append(f"{pname}_shape")
        elif kind == "output":
            i = kernels.KERNELS[name].output_names.index(pname)
            size = math.prod(launch.output_shapes[i])
            setup.append(f"std::vector<float> {pname}({size});")
            args.append(f"{pname}.data()")
        elif kind == "attr":
            args.append(ATTRIBUTE_VALUES[pname])
        else:
            raise NotImplementedError(f"{kind} parameters are not emulated")
    saves = [f'save("{workdir / o}.bin", {o});' for o in kernels.KERNELS[name].output_names]
    (gx, gy, gz), (tx, ty, tz) = launch.grid, launch.threadgroup
    call = f"{fname}{template_args(launch)}({', '.join(args)})"
    main = f"""
int main() {{
  {' '.join(setup)}
  const uint3 grid = {{{gx}u, {gy}u, {gz}u}}, tg = {{{tx}u, {ty}u, {tz}u}};
  const uint3 groups = {{(grid.x + tg.x - 1) / tg.x, (grid.y + tg.y - 1) / tg.y, (grid.z + tg.z - 1) / tg.z}};
  for (uint bz = 0; bz < groups.z; ++bz)
  for (uint by = 0; by < groups.y; ++by)
  for (uint bx = 0; bx < groups.x; ++bx) {{
    const uint3 group = {{bx, by, bz}};
    const uint size = tg.x * tg.y * tg.z;
    std::vector<SimdGroup> simd((size + 31) / 32);
    std::vector<std::thread> threads;
    for (int pass = 0; pass < 2; ++pass)
    for (uint index = 0; index < size; ++index) {{
      const uint3 local = {{index % tg.x, (index / tg.x) % tg.y, index / (tg.x * tg.y)}};
      const uint3 pos = {{bx * tg.x + local.x, by * tg.y + local.y, bz * tg.z + local.z}};
      if (pos.x >= grid.x || pos.y >= grid.y || pos.z >= grid.z) continue;  // dispatchThreads: no thread there
      if (pass == 0) {{ simd[index / 32].lanes++; continue; }}
      threads.emplace_back([&, index, local, pos] {{
        my_group = &simd[index / 32];
        my_lane = int(index % 32);
        {call};
      }});
    }}
    for (auto& th : threads) th.join();
  }}
  {' '.join(saves)}
  return 0;
}}
"""
    # The stub's address-space macros (`thread`, `device`, ...) would break the harness's std::thread.
    undef = "".join(f"#undef {m}\n" for m in ("device", "constant", "threadgroup", "thread"))
    return HARNESS + src + undef + main


def run_emulated(name: str, tmp_path: Path, seed: int, **variant) -> None:
    """`name`'s kernel run over its grid in C++; its outputs must equal the reference's."""
    launch, reference = launches(rng=np.random.default_rng(seed), **variant)[name]
    mx.eval(launch.inputs)
    result = compile_cpp(emulation(name, launch, tmp_path), tmp_path, syntax_only=False, name=name)
    assert result.returncode == 0, result.stderr
    run = subprocess.run([str(tmp_path / name)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    for out_name, expected in zip(kernels.KERNELS[name].output_names, reference()):
        got = np.fromfile(tmp_path / f"{out_name}.bin", dtype=np.float32).reshape(expected.shape)
        want = np.asarray(expected)
        err = np.abs(got - want).max() / max(np.abs(want).max(), 1e-30)
        assert err < 1e-5, f"{name}.{out_name} {variant}: relative error {err:.2e} (seed {seed})"


@needs_compiler
@pytest.mark.parametrize("name", sorted(kernels.KERNELS))
def test_kernel_runs_like_reference_on_cpu_emulation(name, tmp_path):
    run_emulated(name, tmp_path, int(np.random.SeedSequence().entropy % 2**32))


@needs_compiler
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_paged_attention_variants_run_like_reference_on_cpu_emulation(variant, tmp_path):
    """Sliding windows, sinks, Gemma 2's softcap and MLA's value widths in the kernel (Gemma 3, gpt-oss,
    Gemma 2 and DeepSeek-V2 on the paged path's Metal kernel) equal the reference's attention."""
    run_emulated("paged_attention", tmp_path, int(np.random.SeedSequence().entropy % 2**32), **VARIANTS[variant])


def test_each_variant_changes_the_attention():
    """The variants' cases are chosen so that a kernel ignoring a switch would fail its emulation test."""
    rng_seed = int(np.random.SeedSequence().entropy % 2**32)
    plain = launches(rng=np.random.default_rng(rng_seed))["paged_attention"][1]()[0]
    for variant in ("window", "sinks", "softcap"):
        changed = launches(rng=np.random.default_rng(rng_seed), **VARIANTS[variant])["paged_attention"][1]()[0]
        assert np.abs(np.asarray(changed) - np.asarray(plain)).max() > 1e-2, variant


@needs_compiler
@pytest.mark.parametrize("variant", sorted(QK_VARIANTS))
def test_qk_rope_variants_run_like_reference_on_cpu_emulation(variant, tmp_path):
    """The query/key norm and RoPE kernel, for each family and layout the fused attention serves, equals mlx-lm's
    own norms and RoPE (`fused_qk.reference`)."""
    attn, qkv, offset = qk_case(rng=np.random.default_rng(int(np.random.SeedSequence().entropy % 2**32)),
                                **QK_VARIANTS[variant])
    launch = fused_qk.plan(attn, qkv, offset)
    mx.eval(launch.inputs)
    result = compile_cpp(emulation("qk_rope", launch, tmp_path), tmp_path, syntax_only=False, name="qk_rope")
    assert result.returncode == 0, result.stderr
    run = subprocess.run([str(tmp_path / "qk_rope")], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    for out_name, expected in zip(("q_out", "k_out"), fused_qk.reference(attn, qkv, offset)):
        got = np.fromfile(tmp_path / f"{out_name}.bin", dtype=np.float32).reshape(expected.shape)
        want = np.asarray(expected)
        assert np.abs(got - want).max() / np.abs(want).max() < 1e-5, (variant, out_name)
