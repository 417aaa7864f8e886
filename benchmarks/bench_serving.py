"""Serving through the OpenAI API: vmetal paged vs vmetal MLX-managed vs `mlx_lm.server`, one run.

Each backend serves the same random-weight Qwen3-shaped model (`vmetal.bench.shapes`, picked with
`--shape`) from the same folder, each on its own port:

- `paged`:    vmetal, `VLLM_METAL_USE_PAGED_ATTENTION=1` (vLLM's block tables drive one packed forward)
- `mlx`:      vmetal, the MLX-managed KV cache (the default path)
- `mlx_lm`:   `python -m mlx_lm.server`, mlx-lm's own continuous-batching server (BatchGenerator),
              `--decode-concurrency` set to the highest concurrency measured
- `vllm_cpu`: (opt-in) vLLM's own CPU backend, the same `vllm serve` with the vmetal plugin off

The two vmetal servers are `vmetal bench`'s backends of those names (`vmetal.bench.online.backend_server`,
a `vllm serve` through `vmetal.server.process.ServerProcess`), started from an environment without the
user's VLLM_METAL_* settings, with `--max-num-seqs` the larger of 32 and the highest concurrency measured,
`--max-model-len 1024` and the same explicit KV capacity (`--kv-cache-memory-bytes`, that many full-length
sequences), so neither path gets more room than the other and no request of a wave queues.

The load is vLLM's own: `vllm.benchmarks.serve.benchmark()` (what `vllm bench serve` runs) with
`--max-concurrency C`, every request sent at once (request rate inf), prompts from vLLM's
`RandomDataset` of `--input-len` tokens (its decode/re-encode step leaves a few a token or two
longer; the same prompts go to every backend), `max_tokens=--output-len`, `ignore_eos`, greedy,
streamed over `/v1/completions`. Its metrics are used as they are: output tok/s = output tokens /
wall time of the run, TTFT/TPOT/ITL/E2EL mean, median, p90, p99. Two small substitutions make the
comparison fair (serving_load.py says why): vLLM's request function without its per-chunk strip, which
loses mlx_lm.server's first event, and prompts of i.i.d. tokens, so no two share a cached prefix.

All servers are started at once and warmed up (one full-length request, then one wave of short ones at
the highest concurrency); then the timed runs are interleaved, every backend in turn for each
concurrency (the order rotates between trials), so drift in a shared machine's load hits all alike;
an idle server uses no CPU to speak of. Prompts differ between runs (a seed per concurrency and trial)
and are the same for every backend. Other processes' CPU use during each run is recorded
(`vmetal.bench.contention.CpuWatch`); runs where they used more than `--max-foreign` cores are marked
CONTENDED.

Results go to benchmarks/RESULTS.md (serving_section.py) between `<!-- serving:begin -->` and
`<!-- serving:end -->`; the rest of the file is left as it is.

    python benchmarks/bench_serving.py                                     # ~10 min on a quiet 2-core box
    python benchmarks/bench_serving.py --backends paged,mlx,mlx_lm,vllm_cpu # + vLLM's CPU backend, ~11 min
    python benchmarks/bench_serving.py --quick                             # ~3 min
    python benchmarks/bench_serving.py --shape qwen3-0.6b --dtype bfloat16 --trials 3 --output-len 128 \\
        --no-write --json serving.json                                     # the GPU row, ~4 min there
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from results_md import add_output_args, command_line, publish
from serving_load import KEEP, register, run_load, sample_requests
from serving_section import notes, ratios, render, targets

from vmetal.bench.contention import CpuWatch
from vmetal.bench.machine import machine_info, matmul_gflops, versions
from vmetal.bench.online import backend_server
from vmetal.bench.shapes import SHAPES, build_model, section_name
from vmetal.preflight import fit

ALL_BACKENDS = ("paged", "mlx", "mlx_lm", "vllm_cpu")
DEFAULT_BACKENDS = ("paged", "mlx", "mlx_lm")
MAX_NUM_SEQS = 32
MAX_MODEL_LEN = 1024
SERVED_NAME = "bench"
WARM_OUT = 4  # output tokens of each warm-up request of the wave at the highest concurrency

# For the duration estimate. MLX's CPU matmul is single-threaded and compute-bound here (~3.3 GFLOPS
# at M=1 and M=128 alike), so an MLX server's cost is close to proportional to prompt + output tokens
# processed: this model is ~26 MFLOP a token, i.e. ~100 tokens/s on one core of a quiet box (~65-70
# measured under other sessions' load). vLLM's CPU backend (oneDNN, all cores) is far faster.
EST_TOKENS_PER_S = {"paged": 100.0, "mlx": 100.0, "mlx_lm": 120.0, "vllm_cpu": 1000.0}
EST_START_S = 60.0  # all servers starting together, ready and warmed up (the vLLM CPU one is slowest)


# --------------------------------------------------------------------------- servers
def _clean_environ(**extra: str) -> dict[str, str]:
    """Ours without vmetal's settings: every server runs its backend's defaults whatever the shell has set."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("VLLM_METAL_", "VLLM_MLX_", "VMETAL_"))}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **extra)
    return env


def max_num_seqs(max_c: int) -> int:
    """The vLLM servers' --max-num-seqs: every request of the widest wave in flight at once."""
    return max(MAX_NUM_SEQS, max_c)


def kv_bytes(model_dir: Path, seqs: int = MAX_NUM_SEQS) -> int:
    """KV bytes for `seqs` sequences of MAX_MODEL_LEN tokens of this model."""
    return seqs * MAX_MODEL_LEN * fit.kv_bytes_per_token(fit.read_config(model_dir) or {})


def make_server(backend: str, model_dir: Path, max_c: int, log_path: Path, extra_vllm_args: tuple[str, ...] = ()):
    """A `ServerProcess` for `backend` on a free port (for mlx_lm its argv and environment are replaced).
    `extra_vllm_args` go to every vLLM server (vmetal's two and vllm_cpu)."""
    from vmetal import envs
    from vmetal.server.process import ServerProcess, free_port

    vllm_args = ["--max-num-seqs", str(max_num_seqs(max_c)), "--max-model-len", str(MAX_MODEL_LEN),
                 "--seed", "0", *extra_vllm_args]
    if backend in ("paged", "mlx"):
        return backend_server(backend, str(model_dir), SERVED_NAME, log_path=log_path, environ=_clean_environ(),
                              vllm_args=vllm_args + ["--kv-cache-memory-bytes",
                                                              str(kv_bytes(model_dir, max_num_seqs(max_c)))])
    port = free_port()
    if backend == "vllm_cpu":
        # The same `vllm serve`, plugin off: vLLM picks its own CPU platform. Its CPU platform would
        # downcast a float32 checkpoint to bfloat16; vmetal computes in the checkpoint's dtype (MLX),
        # so the dtype is pinned to the checkpoint's for the same arithmetic.
        dtype = (fit.read_config(model_dir) or {})["torch_dtype"]
        sp = ServerProcess(str(model_dir), port=port, served_model_name=SERVED_NAME,
                           config=envs.load_config(_clean_environ()),
                           vllm_args=vllm_args + ["--dtype", dtype],
                           environ=_clean_environ(), echo=False, log_path=log_path)
        sp.environ["VMETAL_ENABLE"] = "0"
        sp.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        return sp
    if backend == "mlx_lm":
        # ServerProcess only for its process-group handling, /health polling and logging.
        sp = ServerProcess(str(model_dir), port=port, echo=False, log_path=log_path)
        sp.argv = [sys.executable, "-m", "mlx_lm.server", "--model", str(model_dir),
                   "--host", "127.0.0.1", "--port", str(port),
                   "--decode-concurrency", str(max(max_c, 1)), "--prompt-concurrency", "8",
                   "--temp", "0.0", "--log-level", "WARNING"]
        sp.environ = _clean_environ(PYTHONUNBUFFERED="1")
        return sp
    raise ValueError(backend)


def extra_body_for(backend: str) -> dict:
    if backend == "mlx_lm":
        # mlx_lm.server validates `logprobs` as a bool (vLLM's client sends null) and treats any
        # repetition_penalty other than 0 as "on"; greedy like the others.
        return {"temperature": 0.0, "logprobs": False, "repetition_penalty": 0.0}
    return {"temperature": 0.0}


def shown_argv(argv: list[str], model_dir: Path) -> str:
    out = []
    for a in argv:
        if a == sys.executable:
            a = "python"
        out.append("MODEL" if a == str(model_dir) else a)
    return shlex.join(out)


# --------------------------------------------------------------------------- the runs
def _median(vals: list[float]) -> float:
    vals = [v for v in vals if v is not None and not math.isnan(v)]
    return statistics.median(vals) if vals else float("nan")


def summarize(runs: list[dict]) -> dict:
    """Median over trials of each kept metric (one trial: the values themselves)."""
    out = {k: _median([r[k] for r in runs if k in r]) for k in KEEP}
    out["trials"] = len(runs)
    out["foreign_cores_max"] = max(r["foreign_cores"] for r in runs)
    out["own_cores"] = _median([r.get("own_cores", float("nan")) for r in runs])
    out["input_lens"] = sorted({n for r in runs for n in r["input_lens"]})
    out["complete"] = all(r["complete"] for r in runs)
    out["failed_total"] = sum(r["failed"] for r in runs)
    return out


def default_num_prompts(c: int, quick: bool) -> int:
    # Full: two waves of C (the second starts as the first finishes, so the run is not one
    # lock-step batch) and >= 6 requests; quick: one wave.
    return max(2, c) if quick else max(6, 2 * c)


def warm_len(input_len: int) -> int:
    return min(16, input_len)


def work_tokens(conc, nprompts: dict, input_len: int, output_len: int, trials: int) -> int:
    """Prompt + output tokens one backend processes, warm-up included."""
    timed = sum(trials * nprompts[c] * (input_len + output_len) for c in conc)
    warm = (input_len + min(16, output_len)) + max(conc) * (warm_len(input_len) + WARM_OUT)
    return timed + warm


def estimate_s(backends, work: int, slowdown: float = 1.0) -> float:
    return EST_START_S + sum(slowdown * work / EST_TOKENS_PER_S[b] for b in backends) + 10


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="one wave per concurrency, 64 prompt / 32 output tokens (~3-4 min)")
    ap.add_argument("--concurrency", default="1,8,32", help="comma-separated (default 1,8,32)")
    ap.add_argument("--num-prompts", type=int,
                    help="requests per run (default: max(6, 2*C), two waves; quick: max(2, C))")
    ap.add_argument("--input-len", type=int, help="prompt tokens (default 128; quick 64)")
    ap.add_argument("--output-len", type=int, help="output tokens (default 64; quick 32)")
    ap.add_argument("--vllm-args", default="",
                    help="more arguments for every vLLM server, one shell-quoted string (default none)")
    ap.add_argument("--trials", type=int, default=1, help="runs per concurrency and backend (default 1)")
    ap.add_argument("--backends", default=",".join(DEFAULT_BACKENDS),
                    help=f"comma-separated, of {', '.join(ALL_BACKENDS)} (default {','.join(DEFAULT_BACKENDS)})")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="model dtype (default float32, as bench_engine.py)")
    ap.add_argument("--shape", default="tiny", choices=sorted(SHAPES),
                    help="model shape, as bench_engine.py (default tiny; qwen3-0.6b for GPU runs)")
    ap.add_argument("--model-dir", type=Path, help="where to build (or reuse) the model; default a temp folder")
    ap.add_argument("--log-dir", type=Path, help="server and load-generator logs; default a temp folder")
    add_output_args(ap)
    ap.add_argument("--max-foreign", type=float, default=0.25,
                    help="a run counts as uncontended when other processes used at most this many "
                         "cores during it (default 0.25)")
    args = ap.parse_args(argv)
    if args.input_len is None:
        args.input_len = 64 if args.quick else 128
    if args.output_len is None:
        args.output_len = 32 if args.quick else 64
    args.conc = sorted({int(x) for x in args.concurrency.split(",") if x.strip()})
    args.backend_list = [b.strip() for b in args.backends.split(",") if b.strip()]
    for b in args.backend_list:
        if b not in ALL_BACKENDS:
            ap.error(f"unknown backend {b!r}; choose from {', '.join(ALL_BACKENDS)}")
    if any(c < 1 for c in args.conc):
        ap.error("concurrency must be >= 1")
    if args.input_len + args.output_len > MAX_MODEL_LEN:
        ap.error(f"--input-len + --output-len must fit --max-model-len {MAX_MODEL_LEN}")
    return args


def start_servers(backends: list[str], model_dir: Path, warm_c: int, log_dir: Path, vllm_args: str,
                  servers: dict, log) -> dict:
    """Every backend's server started at once (start-up is not timed), each put in `servers` as it starts
    (the caller stops them, whatever happens); their report entries."""
    entries = {}
    for b in backends:
        server = make_server(b, model_dir, warm_c, log_dir / f"server-{b}.log", tuple(shlex.split(vllm_args)))
        env_shown = ("VLLM_METAL_USE_PAGED_ATTENTION=1" if b == "paged"
                     else "VMETAL_ENABLE=0" if b == "vllm_cpu" else "")
        entries[b] = {
            "command": shown_argv(server.argv, model_dir), "env": env_shown, "port": server.port,
            "log": str(log_dir / f"server-{b}.log"), "runs": {}, "summary": {},
            "base_url": f"http://127.0.0.1:{server.port}",
            "model_id": "default_model" if b == "mlx_lm" else SERVED_NAME,
        }
        log(f"{b}: starting {entries[b]['command']}")
        servers[b] = server
        server.start()
    return entries


def warm_up(entries: dict, servers: dict, warm: list[tuple[list, int]], tokenizer, t_start: float,
            load_log, log) -> None:
    """Each server ready, then given the warm-up requests; one that fails is stopped and marked."""
    for b, server in servers.items():
        entry = entries[b]
        try:
            server.wait_ready(timeout=300)
            entry["startup_s"] = time.perf_counter() - t_start
            log(f"{b}: ready after {entry['startup_s']:.1f}s; warm-up")
            print(f"\n===== {b} warm-up", file=load_log, flush=True)
            for reqs, c in warm:
                w = run_load(base_url=entry["base_url"], model_id=entry["model_id"], tokenizer=tokenizer,
                             requests=reqs, concurrency=c, extra_body=extra_body_for(b), log_file=load_log)
                if w["failed"]:
                    errs = [e for e in w["errors"] if e]
                    raise RuntimeError(f"warm-up requests failed: {errs[0][:300] if errs else '?'}")
        except Exception as exc:  # noqa: BLE001 - record it and go on without this backend
            entry["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
            log(f"{b}: FAILED: {exc}")
            server.stop()


def timed_runs(args, entries: dict, nprompts: dict, run_reqs: dict, tokenizer, watch: CpuWatch, load_log,
               log) -> None:
    """The timed runs, interleaved: for each C every live backend in turn (the order rotating between
    trials), so drift in a shared machine's load hits them alike; summaries into `entries`."""
    conc = args.conc
    live = [b for b in args.backend_list if not entries[b].get("error")]
    per_run = {b: {c: [] for c in conc} for b in live}
    t_timed, done_tokens = time.perf_counter(), 0
    total_tokens = len(live) * sum(args.trials * nprompts[c] for c in conc) * (args.input_len + args.output_len)
    for t in range(args.trials):
        order = live[t % len(live):] + live[:t % len(live)] if live else []
        for c in conc:
            for b in order:
                entry = entries[b]
                if entry.get("error"):
                    continue
                print(f"\n===== {b} C={c} trial {t + 1}", file=load_log, flush=True)
                try:
                    mark = watch.start()
                    res = run_load(base_url=entry["base_url"], model_id=entry["model_id"],
                                   tokenizer=tokenizer, requests=run_reqs[(c, t)], concurrency=c,
                                   extra_body=extra_body_for(b), log_file=load_log)
                    foreign, own = watch.measure(mark)
                    run = {k: res.get(k) for k in KEEP}
                    run["foreign_cores"] = foreign
                    if mark is not None:
                        run["own_cores"] = own
                    run["complete"] = (res["failed"] == 0
                                       and all(n == args.output_len for n in res["output_lens"]))
                    run["input_lens"] = sorted(set(res["input_lens"]))
                    run["errors"] = sorted({e[:200] for e in res["errors"] if e})[:3]
                except Exception as exc:  # noqa: BLE001 - e.g. the server died mid-run
                    entry["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                    log(f"{b} C={c}: FAILED: {exc}")
                    continue
                per_run[b][c].append(run)
                done_tokens += nprompts[c] * (args.input_len + args.output_len)
                rate = done_tokens / (time.perf_counter() - t_timed)
                log(f"{b} C={c}: {run['output_throughput']:.1f} output tok/s, TTFT p50 "
                    f"{run['median_ttft_ms']:.0f} ms / p99 {run['p99_ttft_ms']:.0f} ms, TPOT p50 "
                    f"{run['median_tpot_ms']:.1f} ms, {run['completed']}/{nprompts[c]} ok"
                    f"{'' if run['complete'] else ' INCOMPLETE'}; cores used: ours "
                    f"{run.get('own_cores', float('nan')):.2f}, other processes "
                    f"{run['foreign_cores']:.2f}; ~{(total_tokens - done_tokens) / rate / 60:.1f} "
                    "min of runs left")
    for b in live:
        for c in conc:
            if per_run[b][c]:
                entries[b]["runs"][c] = per_run[b][c]
                entries[b]["summary"][c] = summarize(per_run[b][c])


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    conc, backends = args.conc, args.backend_list
    nprompts = {c: args.num_prompts or default_num_prompts(c, args.quick) for c in conc}

    start = time.perf_counter()
    date = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # aiohttp's session trusts proxy variables; loopback must never go through one.
    os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost,::1"
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="vmetal-bench-serving-"))
    log_dir.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(f"[bench_serving {time.perf_counter() - start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    work = work_tokens(conc, nprompts, args.input_len, args.output_len, args.trials)
    est = estimate_s(backends, work)
    log(f"plan: backends {backends}, C {conc}, requests {nprompts}, {args.input_len} in / "
        f"{args.output_len} out, {args.trials} trial(s): {work} prompt+output tokens per backend; "
        f"estimated ~{est / 60:.1f} min on a quiet 2-core box (MLX servers ~100 tokens/s), "
        f"~{estimate_s(backends, work, 1.5) / 60:.1f} min at the ~65-70 seen under other sessions' "
        f"load; logs in {log_dir}")

    import mlx.core as mx
    from vllm.tokenizers import get_tokenizer

    register()
    log("building model")
    shape = SHAPES[args.shape]
    model_dir = build_model(args.model_dir, args.dtype, shape)
    cfg = fit.read_config(model_dir) or {}
    tokenizer = get_tokenizer(str(model_dir))
    log(f"model at {model_dir}; MLX matmul micro-benchmark")
    watch = CpuWatch()
    mark = watch.start()
    mm = matmul_gflops(cfg["hidden_size"], cfg["intermediate_size"], args.dtype, rows=(1, 128), seconds=1.0)
    matmul = {m: v["gflops"] for m, v in mm.items()}
    matmul["cores"] = mm[128]["cores"]
    matmul["foreign_cores"] = watch.stop(mark)

    # The same prompts for every backend: one set per (C, trial), one for the warm-up.
    warm_c = max(conc)
    warm = [(sample_requests(tokenizer, 1, args.input_len, min(16, args.output_len), seed=7), 1),
            (sample_requests(tokenizer, warm_c, warm_len(args.input_len), WARM_OUT, seed=8), warm_c)]
    run_reqs = {(c, t): sample_requests(tokenizer, nprompts[c], args.input_len, args.output_len,
                                        seed=1000 * (t + 1) + c)
                for c in conc for t in range(args.trials)}
    servers: dict = {}
    load_log = (log_dir / "load.log").open("w", encoding="utf-8")
    try:
        t_start = time.perf_counter()
        report_backends = start_servers(backends, model_dir, warm_c, log_dir, args.vllm_args, servers, log)
        warm_up(report_backends, servers, warm, tokenizer, t_start, load_log, log)
        timed_runs(args, report_backends, nprompts, run_reqs, tokenizer, watch, load_log, log)
    finally:
        for server in servers.values():
            server.stop()
        log("servers stopped")
        load_log.close()

    report = {
        "date": date,
        "command": command_line("bench_serving.py", argv),
        "args": {"quick": args.quick, "concurrency": conc, "input_len": args.input_len,
                 "output_len": args.output_len, "trials": args.trials, "dtype": args.dtype,
                 "max_foreign": args.max_foreign, "backends": backends},
        "num_prompts": {str(c): n for c, n in nprompts.items()},
        "machine": machine_info(),
        "versions": versions(),
        "mlx_device": str(mx.default_device()),
        "shape": shape,
        "shape_name": args.shape,
        "vocab_size": cfg["vocab_size"],
        "kv_cache_memory_bytes": kv_bytes(model_dir, max_num_seqs(max(args.conc))),
        "max_num_seqs": max_num_seqs(max(args.conc)),
        "max_model_len": MAX_MODEL_LEN,
        "backends": report_backends,
        "log_dir": str(log_dir),
    }
    report["all_complete"] = all(s["complete"] for d in report_backends.values()
                                 for s in d["summary"].values())
    lens = [n for d in report_backends.values() for s in d["summary"].values() for n in s["input_lens"]]
    report["input_len_range"] = [min(lens), max(lens)] if lens else [args.input_len, args.input_len]
    report["matmul_gflops"] = matmul
    if args.model_dir is None:  # the temp folder build_model made; nothing else is in it
        shutil.rmtree(model_dir.parent, ignore_errors=True)
    report["ratios"] = ratios(report)
    if "vllm_cpu" in report_backends:
        try:
            text = Path(report_backends["vllm_cpu"]["log"]).read_text(errors="replace")
            found = [ln.split("]", 1)[-1].strip() for ln in text.splitlines()
                     if "core ids=" in ln or "reserved_cpus=" in ln]
            report["vllm_cpu_binding"] = "; ".join(dict.fromkeys(found))
        except OSError:
            pass
    report["elapsed_s"] = time.perf_counter() - start
    report["notes"] = notes(report)
    section = render(report)
    publish(section_name("serving", args.shape), section, report, json_path=args.json, write=not args.no_write, path=args.results)
    if not args.no_write:
        log(f"wrote {args.results}")
    log(f"done in {report['elapsed_s'] / 60:.1f} min (estimated {est / 60:.1f}). {targets(report)}")
    return 0 if not any(d.get("error") for d in report_backends.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
