"""CLI start-up time: `vmetal --help` and a completion request must not import mlx, torch or vllm; how long
`vmetal doctor` takes to answer (it imports vLLM once, in a probe child, beside its other checks); and how long
`vmetal serve --demo` takes until `/v1/models` answers, beside `vllm serve` with the plugin on the same model
(vLLM's own start: the EngineCore spawned after the API server's imports) and `mlx_lm.server` (the anchor).

Targets: under 0.3 s on this machine for start-up (the vmetal CLI issue), under 5 s for `doctor --json`, under
10 s for `serve --demo` (issue 15). Median of N runs of a fresh process (a few for doctor and the servers), wall
time, recorded in RESULTS.md between the `cli` markers.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_md import write_section  # noqa: E402

from vmetal.bench.machine import machine_info  # noqa: E402

TARGET_S = 0.3
DOCTOR_TARGET_S = 5.0
DOCTOR_RUNS = 3
SERVE_TARGET_S = 10.0
SERVE_RUNS = 3


def answered(argv: list[str], env: dict[str, str], url: str, runs: int) -> list[float]:
    """Seconds from starting `argv` until `url` answers 200; the server's process group is stopped after each."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            while True:
                if proc.poll() is not None:
                    raise SystemExit(f"{' '.join(argv[:3])} exited with {proc.returncode} before answering")
                try:
                    with urllib.request.urlopen(url, timeout=1) as answer:
                        if answer.status == 200:
                            break
                except OSError:
                    time.sleep(0.05)
            times.append(time.perf_counter() - start)
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return times


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
    home = tempfile.mkdtemp(prefix="vmetal-bench-cli-")
    serve_env = {**base, "VMETAL_HOME": home}
    from vmetal.server.process import free_port

    def server_case(argv: list[str], env: dict[str, str],
                    target: float | None = None) -> tuple[list[str], dict[str, str], float | None, int]:
        port = str(free_port())
        return [a.replace("PORT", port) for a in argv], env, target, SERVE_RUNS

    # Built before any timing, so no row counts building it.
    from vmetal.demo import ensure_demo_model

    os.environ["VMETAL_HOME"] = home
    demo = str(ensure_demo_model())
    python = sys.executable
    servers = {
        "vmetal serve --demo (until /v1/models answers)": server_case(
            [str(exe), "serve", "--demo", "--port", "PORT"], serve_env, SERVE_TARGET_S),
        "vllm serve, same model, plugin on (vLLM's own start)": server_case(
            [python, "-m", "vmetal.server.vllm_cli", "serve", demo, "--port", "PORT"],
            {**serve_env, "VMETAL_ENABLE": "1"}),
        "mlx_lm.server, same model (anchor)": server_case(
            [python, "-m", "mlx_lm.server", "--model", demo, "--port", "PORT"], serve_env),
    }
    rows = []
    for name, (argv, env, target, runs) in {**cases, **servers}.items():
        if name in servers:
            port = argv[argv.index("--port") + 1]
            t = answered(argv, env, f"http://127.0.0.1:{port}/v1/models", runs)
        else:
            t = timed(argv, env, runs)
        med = statistics.median(t)
        met = "" if target is None else ("yes" if med < target else "no")
        rows.append(f"| {name} | {med:.3f} | {min(t):.3f} | {max(t):.3f} | "
                    f"{'' if target is None else f'{target:g}'} | {met} |")
    cpu = machine_info()["cpu"]
    text = "\n".join([
        "## CLI start-up",
        "",
        f"{time.strftime('%Y-%m-%d')}, {cpu}, {os.cpu_count()} cores, Python {platform.python_version()}; "
        f"`python benchmarks/bench_cli.py --runs {args.runs}` (fresh process each run, {DOCTOR_RUNS} runs of doctor "
        f"and {SERVE_RUNS} of each server; wall time, seconds). The servers serve the demo model (random-weight "
        "Qwen3, hidden 64, 2 layers); the last two rows have no target: they are the comparison.",
        "",
        "| command | median | min | max | target | met |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        "Where a server's start goes here: the API server imports vLLM (~7 s), the EngineCore's interpreter imports "
        "it again (~5 s), then the model loads (<1 s for the demo). `vmetal serve` starts the EngineCore's "
        "interpreter when the API server starts (`vmetal/server/prestart.py`), so the two imports overlap; vLLM's "
        "own start runs them one after the other. mlx_lm.server imports neither vLLM nor torch.",
    ])
    print(text)
    if not args.no_write:
        write_section("cli", text)


if __name__ == "__main__":
    main()
