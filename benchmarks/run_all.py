"""Regenerate every section of benchmarks/RESULTS.md that this machine can measure, in one run.

Each benchmark script writes its own marked section (benchmarks/results_md.py); this runs them one after the
other on the same machine, so the rows of one regeneration share a machine, a model shape and a date:

  engine   bench_engine.py   single-stream decode vs mlx_lm.generate; batch gain beside mlx-lm's   (row 1)
  serving  bench_serving.py  concurrency 1/8/32: paged, MLX-managed, mlx_lm.server                  (row 2)
  compute  bench_compute.py  MLX vs the PyTorch compute path in the same engine                     (row 3)
  cli      bench_cli.py      `vmetal --help` and Tab completion start-up time, `vmetal serve --demo` start-up
  host     bench_host.py     host time per decode step, by phase, beside mlx-lm's loop
  speculative bench_speculative.py  n-gram speculation vs the same engine without it (random weights: the cost)
  speculative-copy-tiny  the same on a model that copies its context (vmetal.bench.copying: the gain)
  draft    bench_draft.py    draft-model speculation beside mlx_lm.generate --draft-model
  draft-copy-deep-tiny  the same with a pair that agrees (a copying model and its cut: the gain)
  kv-capacity bench_kv_capacity.py  full-context requests a KV pool holds, sliding groups vs one block table

Not regenerated here, because they are not measured on this kind of machine: the GPU section (row 4: run on
an NVIDIA machine with mlx[cuda]; its section lists the exact commands, which take `--no-write` and `--json`)
and the Reliability sections (figures from the tests in tests/ and benchmarks/soak.py, written up by hand).

Benchmarks want a quiet machine: each script measures other processes' CPU use during its timed runs and marks
contended numbers. A script that fails stops nothing else; the exit code says whether all succeeded.

    python benchmarks/run_all.py                   # everything (~20-30 min on 2 cores)
    python benchmarks/run_all.py --quick           # each script's quick mode (~6-10 min)
    python benchmarks/run_all.py --only engine,compute
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# name -> (script, full-run arguments, quick-run arguments)
SECTIONS = {
    "engine": ("bench_engine.py", ["--profile"], ["--quick"]),
    "serving": ("bench_serving.py", [], ["--quick"]),
    "compute": ("bench_compute.py", [], ["--quick"]),
    "cli": ("bench_cli.py", [], ["--runs", "5"]),
    "host": ("bench_host.py", [], ["--trials", "1", "--tokens", "64"]),
    "speculative": ("bench_speculative.py", [], ["--trials", "1"]),
    "speculative-copy-tiny": ("bench_speculative.py", ["--shape", "copy-tiny"],
                              ["--shape", "copy-tiny", "--trials", "1"]),
    "draft": ("bench_draft.py", [], ["--trials", "1", "--prompts", "2"]),
    "draft-copy-deep-tiny": ("bench_draft.py", ["--shape", "copy-deep-tiny", "--draft-layers", "4"],
                             ["--shape", "copy-deep-tiny", "--draft-layers", "4", "--trials", "1", "--prompts", "2"]),
    "kv-capacity": ("bench_kv_capacity.py", [], []),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="each script's quick mode")
    ap.add_argument("--only", help="comma-separated sections: " + ",".join(SECTIONS))
    ap.add_argument("--no-write", action="store_true", help="print the sections, do not write RESULTS.md")
    args = ap.parse_args(argv)
    names = list(SECTIONS) if not args.only else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        ap.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    failed = []
    for name in names:
        script, full, quick = SECTIONS[name]
        argv_ = [sys.executable, str(HERE / script), *(quick if args.quick else full)]
        if args.no_write:
            argv_.append("--no-write")
        print(f"== {name}: {' '.join(argv_[1:])}", flush=True)
        t0 = time.time()
        rc = subprocess.run(argv_, cwd=HERE.parent).returncode
        print(f"== {name}: exit {rc} after {time.time() - t0:.0f} s", flush=True)
        if rc != 0:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)} (their sections were left as they were)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
