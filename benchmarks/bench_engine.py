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
engine's decode path stepped synchronously vs the same path pipelined), from
benchmarks/profile/prof_engine.py.

The measuring is vmetal.bench's (`inprocess`: the engine and mlx-lm timed token by
token; `shapes`: the model; `contention`: other processes' CPU; `machine`: the
machine and versions); this script runs the trials, and engine_section.py writes
the results to benchmarks/RESULTS.md between `<!-- engine:begin -->` and
`<!-- engine:end -->`; the rest of the file is left as it is.

    python benchmarks/bench_engine.py --profile   # full run (~4-9 min on 2 cores)
    python benchmarks/bench_engine.py --quick     # smaller run (~1-3 min)
    VLLM_MLX_DEVICE=gpu python benchmarks/bench_engine.py --shape qwen3-0.6b --dtype bfloat16 \\
        --concurrency 32 --max-tokens 256 --no-write --json engine.json   # the GPU row of RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime as _dt
import shutil
import sys
import time
from pathlib import Path

from engine_section import TARGET_BATCH_GAIN, TARGET_SINGLE_RATIO, notes, render
from results_md import add_output_args, command_line, publish

from vmetal.bench.contention import CpuWatch, quiet_wait
from vmetal.bench.inprocess import engine_run, make_prompts, mlx_batch, mlx_single, prepare_environ, summary
from vmetal.bench.machine import machine_info, matmul_gflops, versions
from vmetal.bench.shapes import SHAPES, build_model, section_name

sys.path.insert(0, str(Path(__file__).resolve().parent / "profile"))
from prof_engine import decode_loop_diagnostic, profile_engine_core, render_profile  # noqa: E402

# The runs of one trial, in the order they run: each ratio's two runs sit next to each other.
ES, MS, EB, M1, MC = "engine_single", "mlx_single", "engine_batch", "mlx_batch1", "mlx_batchC"
PAIRS = ((ES, MS), (EB, ES), (MC, M1))


def parse(argv: list[str] | None) -> argparse.Namespace:
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
    add_output_args(ap)
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
    args = ap.parse_args(argv)
    args.trials = args.trials or (2 if args.quick else 5)
    args.max_tokens = args.max_tokens or (64 if args.quick else 128)
    args.max_trials = args.max_trials or 4 * args.trials
    args.budget = args.budget or (130.0 if args.quick else 450.0)
    if args.wait_quiet is None:
        args.wait_quiet = 2.0 if args.quick else 5.0
    if args.profile:
        args.budget -= args.profile + 40  # leave room for the profile and the diagnostic
    return args


def summarize(trials: list[dict], wanted: int, max_foreign: float) -> dict:
    """Each metric over the trials whose runs it reads were all uncontended (all trials when fewer than 2)."""
    def metric(keys, fn) -> dict:
        ok = [t for t in trials if all(t[k]["foreign_cores"] <= max_foreign for k in keys)]
        clean = len(ok) >= min(2, wanted)
        out = summary([fn(t) for t in (ok if clean else trials)])
        out["clean"] = clean
        return out

    s = {
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
    s["gain_vs_mlx"] = s["engine_gain"]["median"] / s["mlx_gain"]["median"]
    return s


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    C, max_tokens = args.concurrency, args.max_tokens
    start = time.perf_counter()
    date = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")

    prepare_environ()

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
    mm = {f"M={m}": v for m, v in matmul_gflops(shape["hidden_size"], shape["intermediate_size"],
                                                 args.dtype).items()}

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
    results_trials: list[dict] = []
    restarts: list[str] = []
    profile = diag = None
    try:
        loop_start = time.perf_counter()
        watch = CpuWatch()

        def timed(fn, *fa):
            quiet_wait(watch, args.max_foreign, args.wait_quiet)
            mark = watch.start()
            res = fn(*fa)
            res["foreign_cores"] = watch.stop(mark)
            return res

        def clean_pairs(keys):
            return sum(1 for t in results_trials
                       if all(t[k]["foreign_cores"] <= args.max_foreign for k in keys))

        i = 0
        while min(clean_pairs(k) for k in PAIRS) < args.trials and i < args.max_trials:
            per_trial = (time.perf_counter() - loop_start) / i if i else 0.0
            if i and time.perf_counter() - start + per_trial > args.budget:
                log(f"time budget of {args.budget:.0f}s reached after {i} trials")
                break
            i += 1
            try:
                tr = {MS: timed(mlx_single, model, tokenizer, single[0], max_tokens),
                      ES: timed(engine_run, llm, single, max_tokens),
                      EB: timed(engine_run, llm, prompts, max_tokens),
                      MC: timed(mlx_batch, model, tokenizer, prompts, max_tokens),
                      M1: timed(mlx_batch, model, tokenizer, single, max_tokens)}
            except Exception as exc:  # noqa: BLE001 - EngineDeadError and friends
                # Seen on a shared box when another session's clean-up killed engine processes: restart once
                # or twice rather than lose the run.
                log(f"trial {i} failed: {type(exc).__name__}: {exc}")
                restarts.append(f"trial {i}: {type(exc).__name__}")
                if len(restarts) > 2:
                    raise
                stop_engine(llm)
                llm = start_engine()
                continue
            tr["foreign_max"] = max(v["foreign_cores"] for v in tr.values())
            tr["same_tokens"] = tr[ES]["token_ids"][0] == tr[MS]["token_ids"]
            tr["clean"] = tr["foreign_max"] <= args.max_foreign
            results_trials.append(tr)
            log(f"trial {i} ({'clean' if tr['clean'] else 'CONTENDED'}, other processes used up to "
                f"{tr['foreign_max']:.2f} cores): mlx single {tr[MS]['decode_tps']:.1f}, "
                f"engine single {tr[ES]['agg_decode_tps']:.1f}, "
                f"mlx b1 {tr[M1]['generation_tps']:.1f}, "
                f"mlx b{C} {tr[MC]['generation_tps']:.1f}, "
                f"engine C={C} {tr[EB]['agg_decode_tps']:.1f} tok/s")
        if args.profile:
            log(f"profiling the EngineCore for {args.profile:.0f}s of single-stream decode")
            profile = profile_engine_core(llm, single, max(max_tokens, 256), args.profile, log)
            log("in-process decode-loop diagnostic")
            diag = decode_loop_diagnostic(model, single[0], max_tokens, 3 if args.quick else 5, log,
                                          args.max_foreign)
    finally:
        stop_engine(llm)
        if tmp_root is not None:
            shutil.rmtree(tmp_root, ignore_errors=True)

    incomplete = [k for t in results_trials for k, v in t.items()
                  if isinstance(v, dict) and not v.get("complete", True)]
    if incomplete:
        log(f"WARNING: runs that stopped before max_tokens: {incomplete}")
    s = summarize(results_trials, args.trials, args.max_foreign)
    contended = [k for k, v in s.items() if isinstance(v, dict) and not v["clean"]]
    log(f"{sum(t['clean'] for t in results_trials)} fully clean of {len(results_trials)} trials; "
        f"metrics without 2 clean trials: {contended or 'none'}")

    report = {
        "date": date,
        "command": command_line("bench_engine.py", argv),
        "args": {"quick": args.quick, "trials": args.trials, "max_tokens": max_tokens, "concurrency": C,
                 "prompt_len": args.prompt_len, "dtype": args.dtype},
        "machine": machine_info(),
        "versions": versions(),
        "mlx_device": str(mx.default_device()),
        "shape": shape,
        "shape_name": args.shape,
        "vocab_size": model.args.vocab_size,
        "params_m": params_m,
        "weights_mib": weights_mib,
        "engine_kwargs": engine_kwargs,
        "matmul": mm,
        "trials": results_trials,
        "trials_used": "clean" if not contended else "contended: " + ", ".join(contended),
        "restarts": restarts,
        "profile": profile,
        "diagnostic": diag,
        "n_used": s["single_ratio"]["n"],
        "max_foreign": args.max_foreign,
        "summary": s,
    }
    report["elapsed_s"] = time.perf_counter() - start
    report["notes"] = notes(report)
    section = render(report, render_profile(report))
    publish(section_name("engine", args.shape), section, report, json_path=args.json, write=not args.no_write, path=args.results)
    if not args.no_write:
        log(f"wrote {args.results}")
    log(f"single-stream ratio {s['single_ratio']['median']:.3f} (target {TARGET_SINGLE_RATIO}); "
        f"engine gain {s['engine_gain']['median']:.2f}x (target {TARGET_BATCH_GAIN}x), "
        f"mlx-lm gain {s['mlx_gain']['median']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
