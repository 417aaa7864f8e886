"""Where a paged step's time goes: one decode step in-process (no vLLM) against mlx-lm's own caches, and an
engine stepped by hand (per-step wall time, first-token time).

    python benchmarks/profile/prof_paged.py [micro] [engine]

Builds (or reuses) a random-weight Qwen3-0.6B-shaped bfloat16 model in /tmp/model. Meant for a GPU (MLX on CUDA
or Metal): on the CPU host a step of that model takes seconds. Prints one line per measurement; the figures in
RESULTS.md ("Paged path reworked") were copied from its output by hand.
"""
import os
import sys
import time
from pathlib import Path

import numpy as np


def _median_ms(step, reps: int = 40) -> tuple[float, float]:
    """Median (graph build, build + evaluation) of `step()` in ms, after 5 warm-up calls."""
    for _ in range(5):
        step()
    runs = [step() for _ in range(reps)]
    return (round(sorted(r[0] for r in runs)[reps // 2] * 1e3, 2), round(sorted(r[1] for r in runs)[reps // 2] * 1e3, 2))


def _paged_step(model, layers, rows: int, ctx: int, block_size: int):
    import mlx.core as mx

    from vmetal.engine.runner.kv.paged_cache import StepLayout

    tables = np.arange(rows * 20, dtype=np.int32).reshape(rows, 20)[:, : -(-ctx // block_size)]
    pos = np.full(rows, ctx - 1)
    slots = tables[np.arange(rows), pos // block_size] * block_size + pos % block_size

    def step():
        t0 = time.perf_counter()
        layout = StepLayout.plan(pos, slots, tables, [ctx] * rows, [1] * rows, block_size)
        for layer in layers:
            layer.layout = layout
        out = model(mx.zeros((rows,), dtype=mx.int32)[:, None], cache=layers)[:, 0, :]
        t1 = time.perf_counter()
        mx.eval(out, [(c.k_pool, c.v_pool) for c in layers])
        return t1 - t0, time.perf_counter() - t0
    return step


def _mlx_lm_step(model, lm, rows: int, ctx: int):
    import mlx.core as mx
    from mlx_lm.models.cache import BatchKVCache, KVCache

    caches = ([KVCache() for _ in range(lm.num_layers)] if rows == 1
              else [BatchKVCache(left_padding=[0] * rows) for _ in range(lm.num_layers)])
    shape = (rows, lm.num_kv_heads, ctx - 1, lm.head_dim)
    for c in caches:
        c.update_and_fetch(mx.zeros(shape, lm.dtype), mx.zeros(shape, lm.dtype))
    mx.eval([c.state for c in caches])

    def step():
        t0 = time.perf_counter()
        out = model(mx.zeros((rows, 1), dtype=mx.int32), cache=caches)[:, -1, :]
        t1 = time.perf_counter()
        mx.eval(out, [c.state for c in caches])
        for c in caches:
            c.trim(1)  # back to the same context for the next repetition
        return t1 - t0, time.perf_counter() - t0
    return step


def micro(model_dir: Path, ctx: int = 144, block_size: int = 16) -> None:
    import mlx.core as mx

    from vmetal.engine import models
    from vmetal.engine.runner.kv.paged_cache import PagedLayerCache, install_attention_hook

    lm = models.load(str(model_dir))
    install_attention_hook(lm.model)
    shape = (32 * 20, block_size, lm.num_kv_heads, lm.head_dim)
    layers = [PagedLayerCache(mx.zeros(shape, lm.dtype), mx.zeros(shape, lm.dtype)) for _ in range(lm.num_layers)]
    mx.eval([(c.k_pool, c.v_pool) for c in layers])
    for rows in (1, 32):
        for name, step in (("paged", _paged_step(lm.model, layers, rows, ctx, block_size)),
                           ("mlx_lm", _mlx_lm_step(lm.model, lm, rows, ctx))):
            build, total = _median_ms(step)
            print(f"micro {name} B={rows}: build {build:.2f} ms, build+eval {total:.2f} ms", flush=True)


def engine(model_dir: Path, paged: bool, concurrency: int, prompt_len: int = 128, out_len: int = 32,
           max_num_batched_tokens: int | None = None) -> None:
    """`concurrency` requests added at once, the engine stepped until they finish, twice (the first pass
    includes MLX's kernel compilation)."""
    from vmetal.bench.online import BACKEND_ENV

    os.environ.update(BACKEND_ENV["paged" if paged else "mlx"])  # before vLLM and its plugin are loaded
    from vllm import LLM, SamplingParams

    kw = {"max_model_len": 1024, "max_num_seqs": 32, "seed": 0, "kv_cache_memory_bytes": 3758096384}
    if max_num_batched_tokens:
        kw["max_num_batched_tokens"] = max_num_batched_tokens
    llm = LLM(str(model_dir), **kw)
    eng = llm.llm_engine
    vocab = eng.model_config.get_vocab_size()
    rng = np.random.default_rng(0)
    params = SamplingParams(temperature=0, max_tokens=out_len, ignore_eos=True)
    for rep in range(2):
        for i in range(concurrency):
            prompt = rng.integers(10, min(5000, vocab - 10), prompt_len).tolist()
            eng.add_request(f"r{rep}-{i}", {"prompt_token_ids": prompt}, params)
        steps, first, start = [], {}, time.perf_counter()
        while eng.has_unfinished_requests():
            t0 = time.perf_counter()
            outs = eng.step()
            steps.append((time.perf_counter() - t0) * 1e3)
            for o in outs:
                if o.request_id not in first and o.outputs and o.outputs[0].token_ids:
                    first[o.request_id] = (time.perf_counter() - start) * 1e3
        ttft = sorted(first.values())
        print(f"engine paged={paged} C={concurrency} rep={rep} max_num_batched_tokens={max_num_batched_tokens}: "
              f"{len(steps)} steps, first 6 (ms) {[round(x, 1) for x in steps[:6]]}, median step "
              f"{np.median(steps):.2f} ms, first token p50 {ttft[len(ttft) // 2]:.1f} ms, last {ttft[-1]:.1f} ms, "
              f"total {sum(steps):.0f} ms", flush=True)
    eng.engine_core.shutdown()


if __name__ == "__main__":
    import multiprocessing

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in this process, stepped by hand
    from vmetal.bench.shapes import SHAPES, build_model

    model_dir = Path("/tmp/model")
    if not (model_dir / "config.json").exists():
        build_model(model_dir, "bfloat16", SHAPES["qwen3-0.6b"])
    which = sys.argv[1:] or ["micro", "engine"]
    if "micro" in which:
        micro(model_dir)
    if "engine" in which:
        for paged, concurrency, mnbt in ((True, 1, None), (True, 32, None), (True, 32, 8192), (False, 32, None)):
            proc = multiprocessing.get_context("spawn").Process(
                target=engine, args=(model_dir, paged, concurrency, 128, 32, mnbt))
            proc.start()
            proc.join()
