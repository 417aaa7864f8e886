"""CLI start-up time: `vmetal --help` and a completion request must not import mlx, torch or vllm; and how long
`vmetal doctor` takes to answer (it imports vLLM once, in a probe child, beside its other checks).

Targets: under 0.3 s on this machine for start-up (the vmetal CLI issue), under 5 s for `doctor --json`. Median
of N runs of a fresh process (a few for doctor), wall time, recorded in RESULTS.md between the `cli` markers.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_md import write_section  # noqa: E402

from vmetal.bench.machine import machine_info  # noqa: E402

TARGET_S = 0.3
DOCTOR_TARGET_S = 5.0
DOCTOR_RUNS = 3


def timed(argv: list[str], env: dict[str, str], runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    exe = Path(sys.executable).with_name("vmetal")
    base = {k: v for k, v in os.environ.items() if not k.startswith("_VMETAL_COMPLETE")}
    # name -> (argv, environment, target in seconds, runs)
    cases = {
        "vmetal --help": ([str(exe), "--help"], base, TARGET_S, args.runs),
        "vmetal --version": ([str(exe), "--version"], base, TARGET_S, args.runs),
        "Tab: `vmetal s`": ([str(exe)], {**base, "_VMETAL_COMPLETE": "complete_bash",
                                          "COMP_WORDS": "vmetal s", "COMP_CWORD": "1"}, TARGET_S, args.runs),
        "vmetal doctor --json": ([str(exe), "doctor", "--json"], base, DOCTOR_TARGET_S, DOCTOR_RUNS),
    }
    rows = []
    for name, (argv, env, target, runs) in cases.items():
        t = timed(argv, env, runs)
        med = statistics.median(t)
        rows.append(f"| {name} | {med:.3f} | {min(t):.3f} | {max(t):.3f} | {target:g} | "
                    f"{'yes' if med < target else 'no'} |")
    cpu = machine_info()["cpu"]
    text = "\n".join([
        "## CLI start-up",
        "",
        f"{time.strftime('%Y-%m-%d')}, {cpu}, {os.cpu_count()} cores, Python {platform.python_version()}; "
        f"`python benchmarks/bench_cli.py --runs {args.runs}` (fresh process each run, {DOCTOR_RUNS} runs of doctor; "
        "wall time, seconds).",
        "",
        "| command | median | min | max | target | met |",
        "|---|---|---|---|---|---|",
        *rows,
    ])
    print(text)
    if not args.no_write:
        write_section("cli", text)


if __name__ == "__main__":
    main()
