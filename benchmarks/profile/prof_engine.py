"""Where single-stream decode time goes in the engine: a py-spy profile of the EngineCore, and decode loops
stepped in-process without vLLM.

- `profile_engine_core`: py-spy samples the EngineCore's main thread while back-to-back single-stream requests
  run, and each stack is put in one bucket (blocked on an MLX evaluation, building the graph in mlx-lm's model
  code, vmetal's runner, vLLM's scheduler, idle between requests).
- `decode_loop_diagnostic`: the same model in this process, decoded by mlx-lm's own loop and by the engine's
  decode structures (vmetal's `DecodeBatch` over mlx-lm's caches) stepped three ways, and how long
  `mx.async_eval` blocks its caller; the gap between the loops is Python work left on the critical path.
- `render_profile`: both as the RESULTS.md tables.

`bench_engine.py --profile` runs both after its trials and puts the tables into its section. On its own:

    python benchmarks/profile/prof_engine.py              # tiny model, 12 s of py-spy, ~2 min on 2 cores
    python benchmarks/profile/prof_engine.py --seconds 5 --max-tokens 32
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vmetal.bench.contention import CpuWatch, quiet_wait
from vmetal.bench.inprocess import engine_run, summary, summary_text

Log = Callable[[str], None]


# --------------------------------------------------------------------------- py-spy on the EngineCore
def _engine_core_pid() -> int | None:
    import psutil

    for child in psutil.Process().children(recursive=True):
        try:
            if "EngineCore" in child.name() or "EngineCore" in " ".join(child.cmdline()):
                return child.pid
        except psutil.Error:
            continue
    return None


def _classify(frames: list[str]) -> str:
    """One main-thread py-spy stack of the EngineCore -> where that time goes."""
    def in_vmetal(frame: str) -> bool:
        return "(vmetal/" in frame

    leaf = frames[-1]
    if in_vmetal(leaf):
        # The Python thread sits in a C call made straight from vmetal code: with MLX that is a blocking
        # evaluation (.tolist(), .item(), mx.eval).
        return f"MLX evaluation wait (blocking call at {leaf})"
    if any("mlx_lm/models/" in f for f in frames):
        return "graph building: mlx-lm model forward in Python"
    ours = [f for f in frames if in_vmetal(f)]
    if ours:
        return f"vmetal runner Python: {ours[-1].split(' (')[0]}"
    for key, label in (("Scheduler.schedule", "vLLM Scheduler.schedule"),
                       ("update_from_output", "vLLM Scheduler.update_from_output"),
                       ("_process_input_queue", "idle / request intake (between requests)"),
                       ("_process_engine_step", "vLLM engine step, other")):
        if any(key in f for f in frames):
            return label
    return "other: " + leaf.split(" (")[0]


def _py_spy() -> str | None:
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


def profile_engine_core(llm: Any, single: list[list[int]], max_tokens: int, seconds: float, log: Log) -> dict:
    """py-spy at 100 Hz on the EngineCore of `llm` for `seconds`, while `single` is decoded over and over."""
    import psutil

    spy, pid = _py_spy(), _engine_core_pid()
    if not spy or not pid:
        return {"error": f"py-spy ({spy}) or EngineCore pid ({pid}) not found"}
    out = Path(tempfile.mkdtemp(prefix="vmetal-bench-prof-")) / "core.txt"
    core, front = psutil.Process(pid), psutil.Process()

    def cpu(proc: Any) -> float:
        t = proc.cpu_times()
        return t.user + t.system

    spying = subprocess.Popen([spy, "record", "-r", "100", "-d", str(int(seconds)), "-p", str(pid),
                               "-f", "raw", "--idle", "--threads", "-o", str(out)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)  # py-spy attached before the first request
    watch = CpuWatch()
    mark = watch.start()
    rates, c0, f0, t0 = [], cpu(core), cpu(front), time.perf_counter()
    tokens = 0
    while spying.poll() is None:
        run = engine_run(llm, single, max_tokens)
        rates.append(run["agg_decode_tps"])
        tokens += run["tokens"]
    wall = time.perf_counter() - t0
    foreign = watch.stop(mark)
    cpu_core, cpu_front = (cpu(core) - c0) / wall, (cpu(front) - f0) / wall
    err = spying.stderr.read() if spying.stderr else ""
    if not out.is_file():
        return {"error": f"py-spy wrote nothing: {err.strip()[-300:]}"}
    buckets: dict[str, int] = {}
    total = 0
    for line in out.read_text().splitlines():
        if not line.strip():
            continue
        stack, n = line.rsplit(" ", 1)
        frames = stack.split(";")
        if "MainThread" not in frames[0]:
            continue
        bucket = _classify(frames[1:])
        buckets[bucket] = buckets.get(bucket, 0) + int(n)
        total += int(n)
    shutil.rmtree(out.parent, ignore_errors=True)
    shares = sorted(((k, v / total) for k, v in buckets.items()), key=lambda kv: -kv[1]) if total else []
    log("EngineCore main thread: " + "; ".join(f"{100 * v:.1f}% {k}" for k, v in shares[:6]))
    return {"samples": total, "shares": shares, "rates": rates, "foreign": foreign,
            "cpu_core_cores": cpu_core, "cpu_front_cores": cpu_front,
            "ms_per_token": 1e3 * wall / max(1, tokens)}


# --------------------------------------------------------------------------- decode loops without vLLM
def _decode_loops(model: Any, prompt: list[int], n: int) -> tuple[dict[str, Callable[[], float]], Callable]:
    """Each loop as a function returning its decode tok/s, and the timing of one step's parts."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    from vmetal.engine.runner.kv import mlx_cache

    def setup() -> tuple[Any, Any]:
        cache = mlx_cache.new_request_cache(model)
        logits = mlx_cache.prefill(model, cache, prompt)
        batch = mlx_cache.DecodeBatch(len(model.layers))
        batch.add("r", cache)
        return batch, mx.argmax(logits, axis=-1)

    def mlx_lm_loop() -> float:
        steps = generate_step(mx.array(prompt), model, max_tokens=n)
        next(steps)
        t = time.perf_counter()
        for _ in steps:
            pass
        return (n - 1) / (time.perf_counter() - t)

    def synchronous() -> float:
        batch, y = setup()
        y = int(y.item())
        t = time.perf_counter()
        for _ in range(n - 1):
            out = batch.forward(model, [y])
            y = mx.argmax(mx.stack([out[0]]), axis=-1).tolist()[0]
        return (n - 1) / (time.perf_counter() - t)

    def decode_ahead() -> float:
        batch, y = setup()
        upcoming = batch.forward(model, [int(y.item())])
        mx.async_eval(upcoming)
        t = time.perf_counter()
        for _ in range(n - 1):
            y = mx.argmax(mx.stack([upcoming[0]]), axis=-1).tolist()[0]
            upcoming = batch.forward(model, [y])
            mx.async_eval(upcoming)
        return (n - 1) / (time.perf_counter() - t)

    def lazy_feed() -> float:
        batch, y = setup()

        def step(tok: Any) -> Any:
            return mx.argmax(model(tok[:, None], cache=batch.caches)[:, -1, :], axis=-1)

        upcoming = step(y[None])
        mx.async_eval(upcoming)
        t = time.perf_counter()
        for _ in range(n - 1):
            current, upcoming = upcoming, step(upcoming)
            mx.async_eval(upcoming)
            current.tolist()
        return (n - 1) / (time.perf_counter() - t)

    def step_parts() -> dict[str, float]:
        batch, y = setup()
        y = int(y.item())
        build, call, wait = [], [], []
        for _ in range(min(n, 64)):
            t0 = time.perf_counter()
            out = mx.argmax(batch.forward(model, [y]), axis=-1)
            t1 = time.perf_counter()
            mx.async_eval(out)
            t2 = time.perf_counter()
            y = out.tolist()[0]
            t3 = time.perf_counter()
            build.append(t1 - t0)
            call.append(t2 - t1)
            wait.append(t3 - t2)
        med = statistics.median
        return {"build_ms": 1e3 * med(build), "async_eval_ms": 1e3 * med(call), "wait_after_ms": 1e3 * med(wait)}

    loops = {
        "mlx-lm `generate_step`": mlx_lm_loop,
        "A. synchronous: forward, argmax `.tolist()`, then build the next step": synchronous,
        "B. decode-ahead: `.tolist()`, build next step, `mx.async_eval` it, return": decode_ahead,
        "C. lazy feed (mlx-lm style): next step built on the unevaluated argmax, "
        "`mx.async_eval`, then `.tolist()` of the previous": lazy_feed,
    }
    return loops, step_parts


def decode_loop_diagnostic(model: Any, prompt: list[int], max_tokens: int, reps: int, log: Log,
                           max_foreign: float = 0.25) -> dict:
    """Same model, same process, no vLLM: what each way of stepping decode costs on this backend.

    On MLX's CPU backend the scheduler throttles in-flight work, so an "async" eval returns only when the tail
    of the graph is left; the step timing shows how much.
    """
    try:
        loops, step_parts = _decode_loops(model, prompt, max_tokens)
        for loop in loops.values():  # warm-up
            loop()
        rates: dict[str, list[float]] = {k: [] for k in loops}
        watch = CpuWatch()
        foreign = []
        for _ in range(reps):
            quiet_wait(watch, max_foreign, 5.0)
            mark = watch.start()
            for name, loop in loops.items():
                rates[name].append(loop())
            foreign.append(watch.stop(mark))
        keep = [i for i, f in enumerate(foreign) if f <= max_foreign]
        clean = len(keep) >= 2
        if not clean:
            keep = list(range(reps))
        out = {k: dict(summary([v[i] for i in keep]), clean=clean) for k, v in rates.items()}
        blocking = step_parts()
        log("decode loops: " + "; ".join(f"{k[:12]} {v['median']:.1f}" for k, v in out.items())
            + f"; async_eval blocks {blocking['async_eval_ms']:.2f} ms, then "
            f"{blocking['wait_after_ms']:.2f} ms left")
        return {"loops": out, "foreign_max": max(foreign[i] for i in keep), "tokens": max_tokens,
                "clean": clean, "blocking": blocking}
    except Exception as exc:  # noqa: BLE001 - a diagnostic must not sink the run
        return {"error": f"{type(exc).__name__}: {exc}"}


# --------------------------------------------------------------------------- the tables
def render_profile(r: dict) -> list[str]:
    """The markdown of `r["diagnostic"]` and `r["profile"]` (either may be None: not run)."""
    d, p = r.get("diagnostic"), r.get("profile")
    return (_diagnostic_lines(d) if d else []) + (_profile_lines(p) if p else [])


def _diagnostic_lines(d: dict) -> list[str]:
    out = ["### Where the single-stream gap comes from", ""]
    if "error" in d:
        return out + [f"In-process decode-loop diagnostic failed: {d['error']}", ""]
    out += [
        f"In-process decode loops, no vLLM ({d['tokens']} tokens, same prompt, median of "
        f"{len(next(iter(d['loops'].values()))['values'])} interleaved reps; other processes "
        f"used up to {d['foreign_max']:.2f} cores):",
        "",
        "| Loop | decode tok/s |",
        "|---|---|",
    ]
    out += [f"| {k} | {summary_text(v)} |" for k, v in d["loops"].items()]
    bl = d.get("blocking")
    if bl:
        total = bl["build_ms"] + bl["async_eval_ms"] + bl["wait_after_ms"]
        out += ["", f"One decode step, timed from Python (median of 64): building the graph "
                    f"{bl['build_ms']:.2f} ms, `mx.async_eval` returns after "
                    f"{bl['async_eval_ms']:.2f} ms, `.tolist()` then waits "
                    f"{bl['wait_after_ms']:.2f} ms: on MLX's CPU backend an async eval "
                    f"blocks for {100 * bl['async_eval_ms'] / max(1e-9, total):.0f}% of the "
                    "step (the scheduler caps the work in flight), so only the tail of a "
                    "step can overlap Python work."]
    return out + [""]


def _profile_lines(p: dict) -> list[str]:
    if "error" in p:
        return [f"EngineCore profile failed: {p['error']}", ""]
    out = [
        f"py-spy on the EngineCore process (100 Hz, {p['samples']} main-thread samples, "
        f"idle included) during back-to-back single-stream requests "
        f"({summary_text(summary(p['rates']))} tok/s while sampled, {p['ms_per_token']:.1f} ms per token "
        f"incl. request set-up). CPU use meanwhile: EngineCore {p['cpu_core_cores']:.2f} "
        f"cores, front-end process {p['cpu_front_cores']:.2f} cores, other processes "
        f"{p.get('foreign', 0.0):.2f} cores.",
        "",
        "| EngineCore main thread | share of wall time | share excl. idle between requests |",
        "|---|---|---|",
    ]
    idle = sum(v for k, v in p["shares"] if k.startswith("idle"))
    out += [f"| {k} | {100 * v:.1f}% | "
            + ("" if k.startswith("idle") else f"{100 * v / max(1e-9, 1 - idle):.1f}%") + " |"
            for k, v in p["shares"][:10]]
    return out + [""]


# --------------------------------------------------------------------------- on its own
def main(argv: list[str] | None = None) -> int:
    from vmetal.bench.inprocess import make_prompts, prepare_environ
    from vmetal.bench.shapes import SHAPES, build_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=12.0, help="py-spy sampling time (default 12)")
    ap.add_argument("--max-tokens", type=int, default=128, help="tokens per decode loop (default 128)")
    ap.add_argument("--reps", type=int, default=3, help="interleaved reps of the decode loops (default 3)")
    ap.add_argument("--prompt-len", type=int, default=16, help="prompt tokens (default 16)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--shape", default="tiny", choices=sorted(SHAPES), help="model shape (default tiny)")
    ap.add_argument("--model-dir", type=Path, help="where to build (or reuse) the model; default a temp folder")
    ap.add_argument("--max-foreign", type=float, default=0.25,
                    help="reps count as clean when other processes used at most this many cores")
    args = ap.parse_args(argv)
    start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[prof_engine {time.perf_counter() - start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    prepare_environ()
    from mlx_lm import load
    from vllm import LLM

    model_dir = build_model(args.model_dir, args.dtype, SHAPES[args.shape])
    model, tokenizer = load(str(model_dir))
    single = make_prompts(tokenizer, 1, args.prompt_len)
    log("in-process decode-loop diagnostic")
    diagnostic = decode_loop_diagnostic(model, single[0], args.max_tokens, args.reps, log, args.max_foreign)
    profiled_tokens = max(args.max_tokens, 256)
    llm = LLM(model=str(model_dir), max_model_len=args.prompt_len + profiled_tokens + 16, max_num_seqs=8, seed=0)
    try:
        engine_run(llm, single, min(32, args.max_tokens))  # warm-up
        log(f"profiling the EngineCore for {args.seconds:.0f}s of single-stream decode")
        profile = profile_engine_core(llm, single, profiled_tokens, args.seconds, log)
    finally:
        llm.llm_engine.engine_core.shutdown()
        if args.model_dir is None:
            shutil.rmtree(model_dir.parent, ignore_errors=True)
    print("\n".join(render_profile({"diagnostic": diagnostic, "profile": profile})))
    return 0 if "error" not in diagnostic and "error" not in profile else 1


if __name__ == "__main__":
    sys.exit(main())
