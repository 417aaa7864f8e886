"""Offline benchmark: single-stream prefill and decode speed and peak memory, like `mlx_lm.benchmark`.

The front end (`run`) starts this module as a child process, `python -P -m vmetal.bench.offline SPEC OUT`,
once per backend. The child (`main`) runs vLLM's `LLM` with the plugin active and
`VLLM_ENABLE_V1_MULTIPROCESSING=0`, so the engine core and the MLX worker live in the child itself: its
`mx.get_peak_memory()` is the engine's, and its peak RSS is the whole engine's footprint. A child per backend
also keeps vLLM's spawn-only start method (see `vmetal.register`) and a crash out of the front end.

Each trial sends one prompt of `prompt_len` random token ids (a new one each trial: no prefix cache can
serve it; with `repeat` N, one random block N times over, text that repeats itself as code edits do) with greedy
sampling and `ignore_eos`, so exactly `gen_len` tokens come out, and timestamps every engine step's new tokens
(a speculating step returns several):

    prefill tok/s = prompt_len / time to the first token
    decode tok/s  = (gen_len - 1) / (time of the last token - time of the first)

One warm-up run (same lengths) comes first. The child rewrites OUT after every trial, so a crash keeps the
trials that finished.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vmetal.bench.compare import against

TRIAL_KEYS = ("prefill_tps", "decode_tps", "ttft_ms")


# ------------------------------------------------------------------------------------------- front end

def kv_cache_bytes(model_dir: str, max_model_len: int, block_size: int) -> int | None:
    """KV bytes for one `max_model_len` sequence (plus vLLM's null block and one spare), or None.

    Given to vLLM as `kv_cache_memory_bytes`, so every backend gets the same KV room and the paged pools are
    not sized from device memory: peak memory then reflects this workload, not a fraction of the machine.
    """
    from vmetal.preflight import fit

    config = fit.read_config(model_dir)
    if config is None:
        return None
    try:
        per_token = fit.kv_bytes_per_token(config)
    except fit.ConfigShapeError:
        return None
    blocks = -(-max_model_len // block_size) + 2
    return blocks * block_size * per_token


def summarize(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "median": statistics.median(values), "min": min(values), "max": max(values)}


def summary_row(backend: str, result: dict[str, Any]) -> dict[str, Any]:
    """One row of the report from a child's result: each metric's mean, std, median, min and max."""
    trials = result.get("trials", [])
    row: dict[str, Any] = {"backend": backend, "prompt_len": result.get("prompt_len"),
                           "gen_len": result.get("gen_len"), "trials": len(trials)}
    for key in TRIAL_KEYS:
        row[key] = summarize([t[key] for t in trials if t.get(key) is not None])
    for key in ("peak_memory_bytes", "peak_rss_bytes", "load_s", "mlx_device", "kv_cache_memory_bytes",
                "spec_draft_tokens", "spec_accepted_tokens"):
        row[key] = result.get(key)
    row["per_trial"] = trials
    return row


def child_environ(cfg: Any) -> dict[str, str]:
    from vmetal.server.process import server_environ

    env = server_environ(cfg)
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine in the child: its MLX memory is readable there
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def run(model_dir: str, cfg: Any, *, prompt_len: int, gen_len: int, trials: int, log_path: Path,
        timeout: float, say: Callable[[str], None], label: str, repeat: int = 1,
        speculative_config: dict[str, Any] | None = None) -> tuple[dict[str, Any], str | None]:
    """Run the child for one backend: (its result, partial if it failed; an error line or None)."""
    max_model_len = prompt_len + gen_len + 1
    spec = {"model": model_dir, "prompt_len": prompt_len, "gen_len": gen_len, "trials": trials,
            "max_model_len": max_model_len, "repeat": repeat, "speculative_config": speculative_config,
            "kv_cache_memory_bytes": kv_cache_bytes(model_dir, max_model_len, cfg.block_size)}
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="vmetal-bench-offline-") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_path.write_text(json.dumps(spec))
        argv = [sys.executable, "-P", "-m", "vmetal.bench.offline", str(spec_path), str(out_path)]
        say(f"{label}: loading the model, 1 warm-up + {trials} trial(s) of {prompt_len} prompt + {gen_len} "
            f"generated tokens (log: {log_path})")
        with log_path.open("w", encoding="utf-8") as log:
            proc = subprocess.Popen(argv, env=child_environ(cfg), stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            try:
                code = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                _kill(proc)
                code = None
            except BaseException:  # Ctrl-C: the child leads its own session, so stop it here
                _kill(proc)
                raise
        result = json.loads(out_path.read_text()) if out_path.is_file() else {}
    if code == 0 and result.get("done"):
        return result, None
    reason = result.get("error") or _last_error(log_path) or (
        f"no result after {timeout:g} s" if code is None else f"the engine exited with code {code}")
    return result, reason


def run_backends(backends: list[str], model_dir: str, results: Any, *, prompt_len: int, gen_len: int,
                 trials: int, timeout: float, log_dir: Path, say: Callable[[str], None], repeat: int = 1) -> None:
    """Each backend in its own child, rows and errors added to `results` (a failed one keeps its trials)."""
    from vmetal.bench.online import NOT_AVAILABLE, backend_config, backend_speculation
    from vmetal.errors import VmetalError

    runs, errors = results.runs, results.errors
    for backend in backends:
        try:
            cfg = backend_config(backend)
        except VmetalError as exc:
            message = exc.message.removeprefix(f"{backend}: ")
            errors.append({"backend": backend, "concurrency": None, "message": message,
                           "skipped": message == NOT_AVAILABLE, "exit_code": exc.exit_code})
            say(exc.message)
            continue
        log_path = log_dir / f"bench-offline-{backend}.log"
        result, error = run(model_dir, cfg, prompt_len=prompt_len, gen_len=gen_len, trials=trials,
                            log_path=log_path, timeout=timeout, say=say, label=backend, repeat=repeat,
                            speculative_config=backend_speculation(backend))
        if result.get("trials"):
            runs.append(summary_row(backend, result))
        if error is None:
            row = runs[-1]
            say(f"{backend}: decode {row['decode_tps']['mean']:.1f} tok/s, prefill "
                f"{row['prefill_tps']['mean']:.1f} tok/s over {row['trials']} trial(s)")
        elif backend == "torch" and "VLLM_METAL_USE_MLX" in error:  # the engine refused the torch path
            errors.append({"backend": backend, "concurrency": None, "message": NOT_AVAILABLE, "skipped": True})
            say(f"torch: {NOT_AVAILABLE}")
        else:
            errors.append({"backend": backend, "concurrency": None, "message": error,
                           "hint": f"the engine's log is {log_path}"})
            say(f"{backend}: {error}")


def ratios(runs: list[dict[str, Any]], baseline: str) -> list[dict[str, Any]]:
    """Each other backend against `baseline`: tok/s theirs/baseline, peak memory baseline/theirs."""
    return against(runs, baseline, higher=("prefill_tps", "decode_tps"), lower=("peak_memory_bytes",),
                   value=_mean_or_measured)


def _mean_or_measured(row: dict[str, Any], key: str) -> float | None:
    value = row.get(key)
    if isinstance(value, dict):  # a metric's summary over the trials
        return value.get("mean")
    return value or None  # a peak of 0 bytes was not measured


def _kill(proc: subprocess.Popen[bytes]) -> None:
    import signal

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _last_error(log_path: Path) -> str | None:
    from vmetal.bench.online import last_error_line

    try:
        return last_error_line(log_path.read_text(encoding="utf-8", errors="replace").splitlines())
    except OSError:
        return None


# ------------------------------------------------------------------------------------------- the child

def _peak_rss_bytes() -> int | None:
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024  # macOS: bytes; Linux: KiB


def _prompt(tokenizer: Any, length: int, seed: int, repeat: int = 1) -> list[int]:
    """`length` random ids: one random block, repeated `repeat` times (then cut to `length`)."""
    import random

    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    size = int(getattr(tokenizer, "vocab_size", 0) or len(tokenizer))
    rng = random.Random(seed)
    block: list[int] = []
    while len(block) < -(-length // repeat):
        t = rng.randrange(size)
        if t not in special:
            block.append(t)
    return (block * repeat)[:length]


def _one(engine: Any, prompt: list[int], gen_len: int, request_id: str) -> dict[str, Any]:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    params = SamplingParams(temperature=0.0, max_tokens=gen_len, ignore_eos=True, detokenize=False,
                            output_kind=RequestOutputKind.DELTA)
    t0 = time.perf_counter()
    engine.add_request(request_id, {"prompt_token_ids": prompt}, params)
    first = last = None
    tokens = 0
    while engine.has_unfinished_requests():
        outputs = engine.step()
        now = time.perf_counter()
        for out in outputs:
            k = len(out.outputs[0].token_ids) if out.outputs else 0
            if k:
                tokens += k
                first = now if first is None else first
                last = now
    if first is None or last is None:
        raise RuntimeError("the engine returned no tokens")
    return {"tokens": tokens, "ttft_ms": (first - t0) * 1000, "prefill_tps": len(prompt) / (first - t0),
            "decode_tps": (tokens - 1) / (last - first) if tokens > 1 and last > first else None}


def _write(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    out = Path(argv[1])
    result: dict[str, Any] = {"prompt_len": spec["prompt_len"], "gen_len": spec["gen_len"], "trials": [],
                              "kv_cache_memory_bytes": spec.get("kv_cache_memory_bytes"), "done": False}
    try:
        import mlx.core as mx
        from vllm import LLM

        t0 = time.perf_counter()
        kwargs: dict[str, Any] = {"max_model_len": spec["max_model_len"], "max_num_seqs": 1,
                                  "enable_prefix_caching": False, "seed": 0}
        if spec.get("kv_cache_memory_bytes"):
            kwargs["kv_cache_memory_bytes"] = spec["kv_cache_memory_bytes"]
        if spec.get("speculative_config"):
            kwargs["speculative_config"] = spec["speculative_config"]
        llm = LLM(model=spec["model"], **kwargs)
        result["load_s"] = time.perf_counter() - t0
        result["mlx_device"] = str(mx.default_device())
        engine = llm.llm_engine
        tokenizer = llm.get_tokenizer()
        repeat = spec.get("repeat", 1)
        _one(engine, _prompt(tokenizer, spec["prompt_len"], 10_000, repeat), spec["gen_len"], "warmup")
        counted = llm.collective_rpc("step_counts")[0]
        for i in range(spec["trials"]):
            trial = _one(engine, _prompt(tokenizer, spec["prompt_len"], i, repeat), spec["gen_len"], f"trial-{i}")
            result["trials"].append(trial)
            if spec.get("speculative_config"):  # the runner's counts since the warm-up
                now = llm.collective_rpc("step_counts")[0]
                for key in ("spec_draft_tokens", "spec_accepted_tokens"):
                    result[key] = now.get(key, 0) - counted.get(key, 0)
            result["peak_memory_bytes"] = int(mx.get_peak_memory())
            result["peak_rss_bytes"] = _peak_rss_bytes()
            _write(out, result)
            print(f"vmetal-bench: trial {i + 1}: {json.dumps(trial)}", file=sys.stderr, flush=True)
        result["done"] = True
    except Exception as exc:  # noqa: BLE001 - the front end reports it, with the trials that finished
        import traceback

        traceback.print_exc()
        result["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        _write(out, result)
        return 1
    _write(out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
