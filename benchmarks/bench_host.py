"""Host time per decode step, by phase: vmetal's engine (both KV paths) beside mlx-lm's own loop, at 1 and 32 rows.

On a GPU every engine here is bound by host work and launches, so what a decode step costs the host is the
figure that carries over to Apple silicon. For vmetal the engine's own timer (`vmetal/engine/runner/
step_times.py`, read with `LLM.collective_rpc("step_times")`) splits each all-decode step of a greedy run into:
graph build (Python in the model's forward, building MLX's lazy graph), launch (`mx.async_eval`), the runner's
other work, vLLM's work between the runner's calls (scheduling, output processing), and the blocking wait on
MLX; `host` is build + runner other + vLLM, the Python a step needs. For mlx-lm the same run wraps the model's
`__call__` (build) and `mx.async_eval` (launch) around `mlx_lm.generate.generate_step` (1 row) and
`mlx_lm.batch_generate` (32 rows); its `host` is the step's time less launch (its blocking read, like the
engine's, finds the tokens ready). The anchor is mlx-lm's host time at the same rows, measured in the same run.

On MLX's CPU backend (this host) `mx.async_eval` also runs the queued ops itself once too many are in flight,
so launch holds most of the compute and the step times are the CPU's; the host column is what compares with a
GPU's. Default model: `deep-tiny` (`vmetal.bench.shapes`: Qwen3-0.6B's 28 layers at hidden 128), so the step's
Python is that of the real depth while its compute stays small.

Results go to benchmarks/RESULTS.md between `<!-- host:begin -->` and `<!-- host:end -->`.

    python benchmarks/bench_host.py                 # ~4 min on 2 cores
    python benchmarks/bench_host.py --shape qwen3-0.6b --dtype bfloat16 --no-write --json host.json   # on a GPU
"""

from __future__ import annotations

import argparse
import datetime as _dt
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from results_md import add_output_args, publish_run, run_header

from vmetal.bench.inprocess import engine_run, make_prompts, prepare_environ
from vmetal.bench.shapes import SHAPES, build_model

# "paged op-by-op": the paged path with its all-decode steps built op by op (VLLM_METAL_COMPILE=0), what the
# compiled step (vmetal/engine/runner/compiled_decode.py) saves, measured in the same run; "paged unpacked": with
# the model's projections as mlx-lm builds them (VLLM_METAL_PACKED_PROJECTIONS=0), what packing them saves.
PATHS = {"MLX-managed": {}, "paged": {"VLLM_METAL_USE_PAGED_ATTENTION": "1"},
         "paged op-by-op": {"VLLM_METAL_USE_PAGED_ATTENTION": "1", "VLLM_METAL_COMPILE": "0"},
         "paged unpacked": {"VLLM_METAL_USE_PAGED_ATTENTION": "1", "VLLM_METAL_PACKED_PROJECTIONS": "0"}}
PHASES = ("build_ms", "launch_ms", "runner_other_ms", "vllm_ms", "wait_ms")


def vmetal_rows(model: Path, path: str, rows: list[int], tokens: int, max_model_len: int) -> list[dict]:
    """Each batch size's median all-decode step of a greedy run, from the engine's own timer."""
    import os

    from vllm import LLM

    from vmetal.preflight import fit

    saved = {k: os.environ.get(k) for k in PATHS[path]}
    os.environ.update(PATHS[path])
    # KV for the widest batch at full length on both paths: left to itself the paged path takes 90 % of a GPU
    # for its pools, and the previous engine's process may not have given its memory back yet (out of memory
    # on an H100, 2026-12-05). One sequence more: vLLM's null block and the paged path's dump block take from
    # it, so `--rows 1` alone would leave less than one full-length sequence.
    kv_bytes = (max(rows) + 1) * max_model_len * fit.kv_bytes_per_token(fit.read_config(model) or {})
    try:
        llm = LLM(model=str(model), max_model_len=max_model_len, max_num_seqs=max(rows), seed=0,
                  kv_cache_memory_bytes=kv_bytes)
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    out = []
    try:
        tokenizer = llm.get_tokenizer()
        for n in rows:
            prompts = make_prompts(tokenizer, n, 16)
            engine_run(llm, prompts, 8)  # warm: this batch size's shapes
            llm.collective_rpc("step_times", kwargs={"clear": True})
            run = engine_run(llm, prompts, tokens)
            step = llm.collective_rpc("step_times")[0]["decode"][n]
            out.append({"engine": f"vmetal {path}", "rows": n, "steps": int(step["steps"]),
                        "step_ms": step["cycle_ms"], **{p: step[p] for p in PHASES},
                        "host_ms": step["build_ms"] + step["runner_other_ms"] + step["vllm_ms"],
                        "host_cpu_ms": step["host_cpu_ms"], "complete": run["complete"]})
    finally:
        llm.llm_engine.engine_core.shutdown()
    return out


class _Timed:
    """The model, its `__call__` timed (graph build)."""

    def __init__(self, model: Any) -> None:
        self.model, self.times = model, []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return self.model(*args, **kwargs)
        finally:
            self.times.append(time.perf_counter() - t)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)


def mlx_lm_rows(model_dir: Path, rows: list[int], tokens: int) -> list[dict]:
    """mlx-lm's loop at each batch size: per decode step, its wall time, model call (build) and async_eval."""
    import mlx.core as mx
    import mlx_lm.generate as _  # noqa: F401 - the module object is fetched below
    from mlx_lm import load
    from mlx_lm.generate import batch_generate, generate_step

    generate_module = sys.modules["mlx_lm.generate"]
    model, tokenizer = load(str(model_dir))
    timed = _Timed(model)
    launches: list[float] = []
    real_async_eval = mx.async_eval

    def async_eval(*args: Any) -> None:  # mlx-lm calls mx.async_eval through its module: timed there only
        t = time.perf_counter()
        real_async_eval(*args)
        launches.append(time.perf_counter() - t)

    generate_module.mx.async_eval = async_eval
    out = []
    try:
        for n in rows:
            prompts = make_prompts(tokenizer, n, 16)
            for _warm in range(2):  # the first run compiles this batch size's kernels and shapes
                timed.times.clear()
                launches.clear()
                if n == 1:
                    stamps = []
                    for _, _i in zip(generate_step(mx.array(prompts[0]), timed, max_tokens=tokens), range(tokens)):
                        stamps.append(time.perf_counter())
                    step = statistics.median(b - a for a, b in zip(stamps, stamps[1:]))
                    steps = len(stamps) - 1
                else:
                    result = batch_generate(timed, tokenizer, prompts, max_tokens=tokens)
                    step = n / result.stats.generation_tps  # a step gives each row one token
                    steps = tokens
            decode_calls = timed.times[1:]  # the first call is the prefill
            build, launch = statistics.median(decode_calls), statistics.median(launches[1:])
            out.append({"engine": "mlx-lm", "rows": n, "steps": steps, "step_ms": step * 1e3,
                        "build_ms": build * 1e3, "launch_ms": launch * 1e3, "host_ms": (step - launch) * 1e3})
    finally:
        generate_module.mx.async_eval = real_async_eval
    return out


def _ms(row: dict, key: str) -> str:
    return f"{row[key]:.2f}" if key in row else "—"


def render(trials: list[list[dict]], args: argparse.Namespace, shape: dict, started: str, elapsed: float,
           argv: list[str] | None) -> str:
    keys = sorted({(r["engine"], r["rows"]) for trial in trials for r in trial}, key=lambda k: (k[1], k[0]))
    med: dict[tuple[str, int], dict] = {}
    for key in keys:
        runs = [r for trial in trials for r in trial if (r["engine"], r["rows"]) == key]
        med[key] = {f: statistics.median(r[f] for r in runs) for f in runs[0] if f.endswith("_ms")}
    lines = [
        *run_header("Host time per decode step", "bench_host.py", argv, started, elapsed, args.shape, shape,
                    args.dtype),
        f"**Workload:** greedy, ignore_eos, 16-token prompts, {args.tokens} tokens, all rows decoding together; "
        f"medians over the all-decode steps of a run, then the median of {args.trials} trials. host = graph "
        "build + runner other + vLLM (mlx-lm: step − launch); ratio = host / mlx-lm's host at the same rows, "
        "same run.", "",
        "| engine | rows | step ms | graph build | launch | runner other | vLLM | MLX wait | host ms | host ratio |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for engine, n in keys:
        row = med[(engine, n)]
        anchor = med.get(("mlx-lm", n), {}).get("host_ms")
        ratio = f"{row['host_ms'] / anchor:.2f}" if anchor else "—"
        lines.append(f"| {engine} | {n} | {row['step_ms']:.2f} | {_ms(row, 'build_ms')} | {_ms(row, 'launch_ms')} | "
                     f"{_ms(row, 'runner_other_ms')} | {_ms(row, 'vllm_ms')} | {_ms(row, 'wait_ms')} | "
                     f"**{row['host_ms']:.2f}** | {ratio} |")
    lines += ["", "Per-trial host ms: " + "; ".join(
        f"{engine} at {n}: " + ", ".join(f"{r['host_ms']:.2f}" for trial in trials for r in trial
                                         if (r["engine"], r["rows"]) == (engine, n)) for engine, n in keys), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="deep-tiny", choices=sorted(SHAPES))
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--rows", default="1,32", help="batch sizes, comma-separated")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--paths", default="MLX-managed,paged,paged op-by-op", help="vmetal KV paths: " + ",".join(PATHS))
    add_output_args(parser)
    args = parser.parse_args(argv)
    prepare_environ()
    started = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    t0 = time.monotonic()
    shape = SHAPES[args.shape]
    rows = [int(x) for x in args.rows.split(",")]
    model = build_model(Path(tempfile.mkdtemp(prefix="vmetal-bench-host-")) / "model", args.dtype, shape)
    trials = []
    for trial in range(args.trials):
        found = []
        for path in args.paths.split(","):
            print(f"trial {trial + 1}/{args.trials}: vmetal {path}", file=sys.stderr, flush=True)
            found += vmetal_rows(model, path, rows, args.tokens, 16 + args.tokens + 16)
        print(f"trial {trial + 1}/{args.trials}: mlx-lm", file=sys.stderr, flush=True)
        found += mlx_lm_rows(model, rows, args.tokens)
        trials.append(found)
    section = render(trials, args, shape, started, time.monotonic() - t0, argv)
    publish_run("host", section, {"trials": trials}, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
