"""Where a compiled paged decode step's time goes on the device: the host's replay of the compiled graph, MLX's
launch (`mx.async_eval`) and the wait for the device, one step at a time and back to back, at several row counts.

    python benchmarks/profile/prof_decode.py [--shape qwen3-0.6b] [--rows 1,32,64] [--context 256]

No vLLM: the step is `CompiledDecode` over `PagedLayerCache` layers, planned with `plan_decode`, as the paged runner
runs an all-decode step. Variants, each a separate trace:

- `base`: the step as served (projections packed, `vmetal.engine.packed_projections`);
- `unpacked`: the model as mlx-lm builds it (`VLLM_METAL_PACKED_PROJECTIONS=0`);
- `fused_sdpa`: the attention through MLX's fused SDPA, as on Metal, instead of `reference.grouped_attention`
  (on CUDA and the CPU that SDPA falls back to ops of its own for a masked step);
- `no_attention`: the attention (gather + SDPA) replaced by the queries themselves, what the attention costs (a
  diagnostic: the tokens are wrong);
- `element_gather`: the contexts gathered element by element in the step's own dtype (by slot and head, two
  index arrays), as before `reference._gathered` moved whole rows as 8-byte words;
- `per_layer_index`: the head-row index the contexts are gathered by built by every layer for K and V, as
  before `AttentionGroup.head_row_index` built it once a step;
- `queries_scaled`: the attention's queries scaled by a kernel of their own before the scores, as before the
  scale moved into the mask's kernel (`reference.SCALE_MASKED_SCORES`);
- `gather_only`: the contexts gathered and each read once (summed), but no scores, mask or softmax: what the
  gathers cost against the attention's arithmetic (a diagnostic too);
- `mlx_lm`: mlx-lm's own `BatchKVCache` decode at the same rows and context on mlx-lm's model, built op by op
  (the anchor);
- `mlx_lm_generate`: the same with the plain `KVCache` of `mlx_lm.generate` (the single-stream anchor).

`--count` prints the primitives of an op-by-op paged step and, with each timing, those of the graph the timed
step evaluates (for the compiled step, its replay: what MLX launches).

`--prefill ROWSxTOKENS` (e.g. 64x128) times, per variant, one op-by-op prefill step of that many prompts, as the
paged runner builds it: the host's planning (`StepLayout.plan`), the graph build, the launch and the wait; what
a served wave of new requests waits for before its first tokens (TTFT).

"sync" times one step from an idle device (launch is host work alone, wait is the device's tail); "chain" runs
`--chain` steps back to back and times the whole (what a step costs when host and device overlap, as in a
server). Prints one line per measurement; meant for a GPU (on this CPU host use `--shape deep-tiny`).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def _pools(lm, blocks: int, block_size: int):
    import mlx.core as mx

    from vmetal.engine.runner.kv.paged_cache import PagedLayerCache

    k_dim, v_dim = lm.kv_dims
    layers = [PagedLayerCache(mx.zeros((blocks, block_size, lm.num_kv_heads, k_dim), lm.dtype),
                              mx.zeros((blocks, block_size, lm.num_kv_heads, v_dim), lm.dtype))
              for _ in range(lm.num_layers)]
    mx.eval([(c.k_pool, c.v_pool) for c in layers])
    return layers


def paged(lm, layers, rows: int, context: int, block_size: int, reps: int, chain: int, count: bool) -> dict:
    from vmetal.engine.runner.compiled_decode import CompiledDecode, plan_decode

    per_row = -(-context // block_size)
    tables = [[list(range(1 + r * per_row, 1 + (r + 1) * per_row)) for r in range(rows)]]
    positions = [context - 1] * rows
    plan = plan_decode(positions, tables, block_size, 0)
    compiled = CompiledDecode(lm.model, lm.head_on_rows)
    pools = [layer.pool for layer in layers]
    tokens = list(range(rows))

    def step():
        return compiled.forward(layers, pools, tokens, plan, rows)

    return _time(step, lambda out: [out, [(p.k, p.v) for p in pools]], reps, chain, count)


def prefill(lm, layers, rows: int, prompt: int, block_size: int, reps: int) -> dict:
    import mlx.core as mx

    from vmetal.engine.models import logits_at
    from vmetal.engine.runner.kv.paged_cache import StepLayout

    per_row = -(-prompt // block_size)
    tables = np.arange(1, 1 + rows * per_row).reshape(rows, per_row)
    pos = np.tile(np.arange(prompt), rows)
    seq = np.repeat(np.arange(rows), prompt)
    slots = tables[seq, pos // block_size] * block_size + pos % block_size
    ids = mx.array(np.random.default_rng(0).integers(0, 1000, size=rows * prompt).astype(np.int32))
    last = mx.array((np.arange(1, rows + 1) * prompt - 1).astype(np.int32))

    def step():
        layout = StepLayout.plan(pos, slots, tables, [prompt] * rows, [prompt] * rows, block_size)
        _ = [plan.groups for plan in layout.attention.values()]  # planned when first read: planning too
        planned = time.perf_counter()
        for layer in layers:
            layer.layout = layout
        out = logits_at(lm.model, ids[:, None], layers, lambda hidden: hidden[last], lm.head_on_rows)[:, 0, :]
        return planned, [out, [(c.k_pool, c.v_pool) for c in layers]]

    for _ in range(2):
        mx.eval(step()[1])
    phases = {"plan_ms": [], "build_ms": [], "launch_ms": [], "wait_ms": [], "step_ms": []}
    for _ in range(reps):
        mx.synchronize()
        t0 = time.perf_counter()
        planned, out = step()
        t1 = time.perf_counter()
        mx.async_eval(out)
        t2 = time.perf_counter()
        mx.eval(out)
        t3 = time.perf_counter()
        for key, value in zip(phases, (planned - t0, t1 - planned, t2 - t1, t3 - t2, t3 - t0)):
            phases[key].append(value)
    return {k: round(statistics.median(v) * 1e3, 3) for k, v in phases.items()}


def mlx_lm(lm, rows: int, context: int, reps: int, chain: int, count: bool, batch: bool = True) -> dict:
    """mlx-lm's decode step: its `BatchKVCache` (`batch_generate`, `mlx_lm.server`), or with `batch` off the
    plain `KVCache` `mlx_lm.generate` keeps (no mask: MLX's fused SDPA over the cache's exact length)."""
    import mlx.core as mx
    from mlx_lm.models.cache import BatchKVCache, KVCache

    caches = [BatchKVCache(left_padding=[0] * rows) if batch else KVCache() for _ in range(lm.num_layers)]
    k_dim, v_dim = lm.kv_dims
    for c in caches:
        c.update_and_fetch(mx.zeros((rows, lm.num_kv_heads, context - 1, k_dim), lm.dtype),
                           mx.zeros((rows, lm.num_kv_heads, context - 1, v_dim), lm.dtype))
    mx.eval([c.state for c in caches])
    ids = mx.zeros((rows, 1), dtype=mx.int32)

    def step():
        for c in caches:
            c.offset -= 1  # the same context every repetition (the cache keeps its buffers)
            if batch:
                c._idx -= 1
        return lm.model(ids, cache=caches)[:, -1, :]

    for c in caches:  # step() steps back one first
        c.offset += 1
        if batch:
            c._idx += 1
    return _time(step, lambda out: [out, [c.state for c in caches]], reps, chain, count)


def _time(step, outputs, reps: int, chain: int, count: bool = False) -> dict:
    import mlx.core as mx

    graph = _histogram(outputs(step())) if count else None

    for _ in range(5):
        mx.eval(outputs(step()))
    build, launch, wait = [], [], []
    for _ in range(reps):
        mx.synchronize()
        t0 = time.perf_counter()
        out = outputs(step())
        t1 = time.perf_counter()
        mx.async_eval(out)
        t2 = time.perf_counter()
        mx.eval(out)
        t3 = time.perf_counter()
        build.append(t1 - t0)
        launch.append(t2 - t1)
        wait.append(t3 - t2)
    chained = []
    for _ in range(3):
        mx.synchronize()
        t0 = time.perf_counter()
        last = None
        for _ in range(chain):
            last = outputs(step())
            mx.async_eval(last)
        mx.eval(last)
        chained.append((time.perf_counter() - t0) / chain)
    ms = lambda xs: round(statistics.median(xs) * 1e3, 3)
    found = {"build_ms": ms(build), "launch_ms": ms(launch), "wait_ms": ms(wait),
             "sync_step_ms": ms([a + b + c for a, b, c in zip(build, launch, wait)]), "chain_step_ms": ms(chained)}
    if graph is not None:
        found["graph"] = graph
    return found


def _histogram(outputs) -> str:
    """The primitives of the graph that evaluating `outputs` runs (`mx.export_to_dot`), most common first. For
    a compiled step it is the replayed graph: elementwise runs fused into `Compiled...` nodes, what MLX launches
    (views such as Reshape, Transpose or Slice launch nothing unless they must copy)."""
    import collections
    import re

    import mlx.core as mx
    from mlx.utils import tree_flatten

    arrays = [a for _, a in tree_flatten(outputs) if isinstance(a, mx.array)]  # a cache's state holds ints too
    with tempfile.NamedTemporaryFile("r", suffix=".dot") as f:
        mx.export_to_dot(f.name, *arrays)
        names = collections.Counter(re.findall(r'label ="([A-Za-z]+)', f.read()))
    return f"{sum(names.values())} nodes ({'; '.join(f'{k} {v}' for k, v in names.most_common())})"


def count_primitives(lm, layers, rows: int, context: int, block_size: int) -> str:
    """The primitives of one op-by-op paged decode step's graph (`mx.export_to_dot`), most common first: what
    MLX evaluates for a step, before `mx.compile` fuses its elementwise runs."""
    import mlx.core as mx

    from vmetal.engine.runner.kv.paged_cache import StepLayout

    per_row = -(-context // block_size)
    tables = np.arange(1, 1 + rows * per_row).reshape(rows, per_row)
    pos = np.full(rows, context - 1)
    slots = tables[np.arange(rows), pos // block_size] * block_size + pos % block_size
    layout = StepLayout.plan(pos, slots, tables, [context] * rows, [1] * rows, block_size)
    for layer in layers:
        layer.layout = layout
    out = lm.model(mx.zeros((rows, 1), dtype=mx.int32), cache=layers)[:, 0, :]
    return _histogram([out, [(c.k_pool, c.v_pool) for c in layers]])


def _gather_only(q, k, v, scale, mask, sinks, softcap, length):
    """Stands in for `reference._grouped` (the written-out attention of queries grouped by KV head): reads the
    gathered keys and values once, computes nothing."""
    import mlx.core as mx

    return q + mx.sum(k, axis=2, keepdims=True) + mx.sum(v, axis=2, keepdims=True)  # [B, Hkv, group * L, D]


def _element_gather(pool, group):
    """Stands in for `reference._gathered`: the gather by slot and head, element by element."""
    import mlx.core as mx

    num_blocks, block_size, num_kv_heads, head_dim = pool.shape
    rows = pool.reshape(num_blocks * block_size, num_kv_heads, head_dim)
    return rows[group.slots[:, None, :], mx.arange(num_kv_heads, dtype=mx.int32)[None, :, None]]


def _per_layer_index(group, num_kv_heads, dtype):
    from vmetal.engine.runner.attention import reference

    return reference.head_row_index(group.slots, num_kv_heads, dtype)  # anew at every call, as before


def _no_attention():
    from vmetal.engine.runner.kv.paged_cache import PagedLayerCache

    def attention(self, queries, scale, sinks=None, softcap=None):
        return queries

    PagedLayerCache.attention = attention


def _rows_by_tokens(text: str) -> tuple[int, int]:
    rows, _, tokens = text.lower().partition("x")
    if not (rows.isdigit() and tokens.isdigit() and int(rows) > 0 and int(tokens) > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not ROWSxTOKENS (two positive counts, e.g. 64x128)")
    return int(rows), int(tokens)


def main() -> None:
    from vmetal.bench.shapes import SHAPES, build_model
    from vmetal.engine import models
    from vmetal.engine.runner.attention import reference
    from vmetal.engine.runner.kv.paged_cache import install_attention_hook

    written_out, gathered = reference._grouped, reference._gathered
    head_row_index = reference.AttentionGroup.head_row_index
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="qwen3-0.6b", choices=sorted(SHAPES))
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--rows", default="1,32,64")
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--chain", type=int, default=20)
    ap.add_argument("--variants", default="base,per_layer_index,queries_scaled,element_gather,unpacked,fused_sdpa,"
                                          "gather_only,mlx_lm,mlx_lm_generate,no_attention",
                    help="no_attention last: it patches the attention for the rest of the run")
    ap.add_argument("--model-dir", type=Path, default=None)
    ap.add_argument("--prefill", metavar="ROWSxTOKENS", type=_rows_by_tokens,
                    help="time one prefill step of ROWS prompts of TOKENS")
    ap.add_argument("--count", action="store_true", help="also count the primitives of each step's graph")
    args = ap.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    block_size = 16
    model_dir = args.model_dir or Path(tempfile.mkdtemp(prefix="prof-decode-"))
    if not (model_dir / "config.json").exists():
        build_model(model_dir, args.dtype, SHAPES[args.shape])
    variants = args.variants.split(",")
    blocks = 1 + max(rows) * -(-args.context // block_size)
    for variant in variants:  # a fresh model each: a variant changes the model or the attention class for good
        lm = models.load(str(model_dir), kv_path="paged",
                         packed=variant not in ("unpacked", "mlx_lm", "mlx_lm_generate"))
        install_attention_hook(lm.model)
        if variant == "no_attention":
            _no_attention()
        reference.FUSED_SDPA = True if variant == "fused_sdpa" else None
        reference.SCALE_MASKED_SCORES = variant != "queries_scaled"
        reference._grouped = _gather_only if variant == "gather_only" else written_out
        reference._gathered = _element_gather if variant == "element_gather" else gathered
        reference.AttentionGroup.head_row_index = _per_layer_index if variant == "per_layer_index" else head_row_index
        if args.count and not variant.startswith("mlx_lm"):
            print(f"{variant} primitives rows={rows[-1]}:",
                  count_primitives(lm, _pools(lm, blocks, block_size), rows[-1], args.context, block_size), flush=True)
        if args.prefill and not variant.startswith("mlx_lm"):
            n, prompt = args.prefill
            layers = _pools(lm, 1 + n * -(-prompt // block_size), block_size)
            found = prefill(lm, layers, n, prompt, block_size, min(args.reps, 10))
            del layers
            print(f"{variant} prefill {n}x{prompt}: " + ", ".join(f"{k} {v}" for k, v in found.items()), flush=True)
        for n in rows:
            if variant.startswith("mlx_lm"):
                found = mlx_lm(lm, n, args.context, args.reps, args.chain, args.count, batch=variant == "mlx_lm")
            else:
                layers = _pools(lm, blocks, block_size)
                found = paged(lm, layers, n, args.context, block_size, args.reps, args.chain, args.count)
                del layers
            print(f"{variant} rows={n} context={args.context}: " + ", ".join(f"{k} {v}" for k, v in found.items()),
                  flush=True)


if __name__ == "__main__":
    main()
