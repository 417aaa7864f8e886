"""Where a served decode step's time goes: a vmetal server (paged path) under vLLM's serving load, read three ways
at once, per variant of the server's arguments:

- the client's view: vLLM's `benchmark()` output tok/s and ITL (what bench_serving.py reports);
- the engine's view: its own step timer (`vmetal/engine/runner/step_times.py`, the `VLLM_METAL_DEBUG=1` log
  line): the all-decode step cycle at the load's row count, split into graph build, launch, runner, vLLM, wait;
- each server process's CPU use over the load (the API server(s), the EngineCore), in cores;
- where the time to first token goes, from vLLM's own request histograms on `/metrics` (means over each trial):
  the client's TTFT, the engine's (from the request's arrival at vLLM's input processor to its first token),
  the time it waited in the scheduler's queue, and from its first scheduled step to its first token (prefill).
  Client minus engine is the HTTP and API-server side.

An engine cycle well below the client's ITL means the time goes outside the engine (the API server's
per-token work for every stream: detokenising, the SSE chunk, the client); an API server near one whole core
means it is the bottleneck.

    python benchmarks/profile/prof_serving.py --shape qwen3-0.6b --dtype bfloat16 --model-dir /tmp/model \\
        --variant base= --variant api2=--api-server-count=2

Prints one line per run and a JSON summary; the figures in RESULTS-gpu.md were copied from it by hand. Meant
for a GPU (on the CPU host a 32-row step is compute-bound and the engine is all there is to see).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: serving_load

STEP_LINE = re.compile(r"(\d+) rows x(\d+): ([\d.]+) ms a step, host CPU ([\d.]+) ms; graph build ([\d.]+), "
                       r"launch ([\d.]+), runner other ([\d.]+), vLLM ([\d.]+), MLX wait ([\d.]+)")
STEP_FIELDS = ("steps", "cycle_ms", "host_cpu_ms", "build_ms", "launch_ms", "runner_other_ms", "vllm_ms",
               "wait_ms")


def engine_steps(log: Path, rows: int) -> dict[str, float] | None:
    """The last decode-step medians the engine logged for `rows` rows (VLLM_METAL_DEBUG's line)."""
    found = None
    for line in log.read_text(errors="replace").splitlines():
        if "vmetal decode steps, medians" not in line:
            continue
        for m in STEP_LINE.finditer(line):
            if int(m.group(1)) == rows:
                found = {k: float(v) for k, v in zip(STEP_FIELDS, m.groups()[1:])}
    return found


# vLLM's request histograms (vllm/v1/metrics/loggers.py) whose means split a trial's TTFT.
TTFT_PARTS = {"engine_ttft": "vllm:time_to_first_token_seconds", "queue": "vllm:request_queue_time_seconds",
              "prefill": "vllm:request_prefill_time_seconds"}


def histograms(base_url: str) -> dict[str, tuple[float, float]]:
    """(sum, count) of each TTFT_PARTS histogram, from the server's Prometheus text (summed over labels)."""
    import urllib.request

    with urllib.request.urlopen(base_url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    out = {}
    for key, name in TTFT_PARTS.items():
        total = count = 0.0
        for line in text.splitlines():
            if line.startswith(name + "_sum"):
                total += float(line.rsplit(" ", 1)[1])
            elif line.startswith(name + "_count"):
                count += float(line.rsplit(" ", 1)[1])
        out[key] = (total, count)
    return out


def ttft_parts(before: dict, after: dict) -> dict[str, float | None]:
    """Mean ms of each histogram over the requests between the two scrapes."""
    out = {}
    for key in TTFT_PARTS:
        total, count = (a - b for a, b in zip(after[key], before[key]))
        out[f"{key}_mean_ms"] = round(1e3 * total / count, 1) if count else None
    return out


def process_cpu(pid: int) -> dict[str, float]:
    """CPU seconds so far of the server process `pid` and each descendant, keyed by its name and pid."""
    import psutil

    root = psutil.Process(pid)
    out = {}
    for p in [root, *root.children(recursive=True)]:
        try:
            t = p.cpu_times()
            out[f"{p.name()}[{p.pid}]"] = t.user + t.system
        except psutil.Error:
            pass
    return out


def run_variant(name: str, extra: list[str], model_dir: Path, concurrency: int, requests: int, trials: int,
                input_len: int, output_len: int, log_dir: Path) -> dict:
    from serving_load import register, run_load, sample_requests
    from transformers import AutoTokenizer

    from vmetal.server.process import ServerProcess, free_port

    register()
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_METAL_", "VMETAL_"))}
    environ.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", VLLM_METAL_USE_PAGED_ATTENTION="1",
                   VLLM_METAL_DEBUG="1", VMETAL_ENABLE="1")
    log = log_dir / f"server-{name}.log"
    server = ServerProcess(str(model_dir), port=free_port(), served_model_name="bench", environ=environ,
                           echo=False, log_path=log,
                           vllm_args=["--max-num-seqs", str(max(32, concurrency)), "--max-model-len", "1024",
                                      "--seed", "0", *extra])
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    runs = []
    with server:  # started and ready, or an error with the log's tail
        with open(log_dir / f"load-{name}.log", "a") as load_log:
            warm = sample_requests(tokenizer, concurrency, 16, 16, seed=99)
            run_load(base_url=server.base_url, model_id="bench", tokenizer=tokenizer, requests=warm,
                     concurrency=concurrency, extra_body={"temperature": 0.0}, log_file=load_log)
            for trial in range(trials):
                reqs = sample_requests(tokenizer, requests, input_len, output_len, seed=trial)
                scraped = histograms(server.base_url)
                before, t0 = process_cpu(server.pid), time.perf_counter()
                result = run_load(base_url=server.base_url, model_id="bench", tokenizer=tokenizer, requests=reqs,
                                  concurrency=concurrency, extra_body={"temperature": 0.0}, log_file=load_log)
                after, wall = process_cpu(server.pid), time.perf_counter() - t0
                parts = ttft_parts(scraped, histograms(server.base_url))
                cores = {p: round((after[p] - before.get(p, 0.0)) / wall, 2) for p in after
                         if after[p] - before.get(p, 0.0) > 0.05 * wall}
                run = {"trial": trial, "output_tok_s": round(result["output_throughput"], 1),
                       "itl_p50_ms": round(result["median_itl_ms"], 2),
                       "tpot_p50_ms": round(result["median_tpot_ms"], 2),
                       "ttft_p50_ms": round(result["median_ttft_ms"], 1),
                       "ttft_mean_ms": round(result["mean_ttft_ms"], 1), **parts, "cores": cores}
                runs.append(run)
                print(f"{name} trial {trial}: {json.dumps(run)}", flush=True)
        time.sleep(1)
    steps = engine_steps(log, concurrency)
    print(f"{name} engine at {concurrency} rows: {json.dumps(steps)}", flush=True)
    return {"variant": name, "vllm_args": extra, "runs": runs, "engine_steps": steps,
            "output_tok_s": statistics.median(r["output_tok_s"] for r in runs),
            "itl_p50_ms": statistics.median(r["itl_p50_ms"] for r in runs)}


def main() -> None:
    from vmetal.bench.shapes import SHAPES, build_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--model-dir", type=Path)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--trials", type=int, default=2)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--variant", action="append", default=[],
                    help="NAME=VLLM ARGS (shell words, '=' for none); default: base=")
    ap.add_argument("--log-dir", type=Path)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    model_dir = build_model(args.model_dir, args.dtype, SHAPES[args.shape])
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="prof-serving-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for spec in args.variant or ["base="]:
        name, _, words = spec.partition("=")
        out.append(run_variant(name, shlex.split(words), model_dir, args.concurrency, args.requests, args.trials,
                               args.input_len, args.output_len, log_dir))
    print(json.dumps(out, indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
