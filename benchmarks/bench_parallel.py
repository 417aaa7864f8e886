"""Parallel serving on one machine: one rank vs tensor, pipeline and data parallel 2, through the OpenAI API.

Each mode is a `vmetal serve` of the same random-weight Qwen3-shaped model (`vmetal.bench.shapes`, `--shape`)
started by `vmetal bench online MODEL --serve-args ...` (vLLM's own benchmark client, greedy, ignore_eos, random
prompts), at concurrency 1 and C. The modes run in turn within each trial (the order rotates), so a shared
machine's drift hits all alike, and each mode's output tok/s is reported as a ratio against the one-rank server
of the same trial.

On this 2-core host the figures are about correctness and overhead, not speed: TP=2 runs two processes that
each compute half of every layer and meet twice per layer in MLX's ring over loopback, on cores that the API
server and the engine core need too; PP=2 runs two processes of half the layers each, which pass one
hidden-state row per token between them and work on two batches at once; DP=2 runs two whole engines on the
same two cores. Across Macs the ring
crosses a Thunderbolt link instead, and each rank has a GPU of its own.

Results go to benchmarks/RESULTS.md between `<!-- parallel:begin -->` and `<!-- parallel:end -->`.

    python benchmarks/bench_parallel.py            # ~8 min on 2 cores
    python benchmarks/bench_parallel.py --quick    # one trial, fewer prompts (~4 min)
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results_md import add_output_args, publish_run, run_header

from vmetal.bench.shapes import SHAPES, build_model

MODES = {"1 rank": "", "TP=2": "--tensor-parallel-size 2", "PP=2": "--pipeline-parallel-size 2",
         "DP=2": "--data-parallel-size 2"}


def run_mode(model: Path, serve_args: str, concurrency: list[int], args: argparse.Namespace) -> dict[int, dict]:
    """`vmetal bench online` against a server of this mode; its rows by concurrency."""
    argv = [sys.executable, "-m", "vmetal.cli.app", "bench", "online", str(model), "--json",
            "--concurrency", ",".join(map(str, concurrency)), "--input-len", str(args.input_len),
            "--output-len", str(args.output_len), "--max-model-len", "512", "--max-num-seqs", str(max(concurrency))]
    if args.num_prompts:
        argv += ["--num-prompts", str(args.num_prompts)]
    if serve_args:
        argv += ["--serve-args", serve_args]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise SystemExit(f"`{' '.join(argv)}` failed ({out.returncode}): {out.stderr[-2000:]}")
    report = json.loads(out.stdout)
    return {row["concurrency"]: row for row in report["runs"]}


def render(results: dict, args: argparse.Namespace, shape: dict, started: str, elapsed: float, argv) -> str:
    lines = [
        *run_header("Parallel serving on one machine: 1 rank vs TP=2 vs PP=2 vs DP=2", "bench_parallel.py", argv, started,
                    elapsed, args.shape, shape, args.dtype),
        f"**Workload:** `vmetal bench online` (vLLM's benchmark client), prompts of {args.input_len} random "
        f"tokens, {args.output_len} output tokens, greedy, ignore_eos; {args.trials} trial(s), modes in rotating "
        "order; ratio = the mode's output tok/s / the one-rank server's in the same trial (median over trials).",
        "", "| Mode | Concurrency | output tok/s (median) | mean TPOT ms | ratio vs 1 rank |", "|---|---|---|---|---|",
    ]
    for mode in MODES:
        for c in args.concurrency:
            rows = results[mode][c]
            tps = statistics.median(r["output_throughput"] for r in rows)
            tpot = statistics.median(r["mean_tpot_ms"] for r in rows)
            ratios = [r["output_throughput"] / a["output_throughput"] for r, a in zip(rows, results["1 rank"][c])]
            lines.append(f"| {mode} | {c} | {tps:.1f} | {tpot:.1f} | {statistics.median(ratios):.2f} |")
    lines += ["", "What it says: one engine does not keep both of this host's cores busy (vLLM's loop, the API "
              "server and MLX's CPU compute take turns), so at concurrency C a second replica (DP=2) or a second "
              "rank (TP=2) or stage (PP=2) finds the idle core; with one stream, TP=2 pays two all-reduces per "
              "layer per token over loopback plus the rank-0 broadcast of the sampled token, PP=2 runs its two "
              "stages one after the other (one hand-over per token, nothing in parallel), and DP=2 has nothing "
              "to split. PP=2 overlaps its stages only when vLLM's scheduler has requests for a second batch "
              "while the first is in flight; at this concurrency every request fits the first one. On "
              "Macs each rank or replica has a GPU of its own and the ring crosses Thunderbolt, so these ratios "
              "do not carry over; the per-token cost of the ring is what to measure there. Correctness of every "
              "mode is the tests' job (tests/engine/test_tensor_parallel.py, tests/engine/test_pipeline_parallel.py, "
              "tests/server/test_parallel_serve.py, tests/server/test_pipeline_serve.py, "
              "tests/server/test_multinode.py)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--concurrency", type=lambda s: [int(c) for c in s.split(",")], default=[1, 8])
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--num-prompts", type=int, default=None)
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="one trial, 8 prompts per run")
    add_output_args(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.trials, args.num_prompts = 1, 8
    started = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    t0 = time.monotonic()
    shape = SHAPES[args.shape]
    model = build_model(Path(tempfile.mkdtemp(prefix="vmetal-bench-par-")) / "model", args.dtype, shape)
    results: dict[str, dict[int, list[dict]]] = {mode: {c: [] for c in args.concurrency} for mode in MODES}
    order = list(MODES)
    for trial in range(args.trials):
        for mode in order[trial % len(order):] + order[:trial % len(order)]:
            print(f"trial {trial + 1}/{args.trials}: {mode}", file=sys.stderr, flush=True)
            for c, row in run_mode(model, MODES[mode], args.concurrency, args).items():
                results[mode][c].append(row)
    section = render(results, args, shape, started, time.monotonic() - t0, argv)
    publish_run("parallel", section, {"results": results}, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
