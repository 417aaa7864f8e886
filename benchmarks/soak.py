"""Soak: 2,000 requests through one real server; nothing fails, nothing drifts, memory stays flat.

One `vllm serve` process with the vmetal plugin (`vmetal.server.process.ServerProcess`) serves a tiny random-weight
Qwen3 (`vmetal.demo.build_tiny_model`). The load is a bounded loop of `--requests` requests at
`--concurrency`, cycling through every (endpoint, prompt, max_tokens) combination of vmetal/bench/load.py,
streamed and not; one request in `--abandon-every` is a client that closes its stream after a few events.
Every answer that is read to the end must equal the combination's sequential answer (asked alone before
the load), token ids and text.

Memory: the resident set of every process of the server's process group (API server, EngineCore, helpers),
summed, after a warm-up of `--warmup` requests and again after the loop, each once the engine is idle (its
running/waiting gauges 0 and KV usage back to 0) and two seconds have passed. It is also sampled every
`--sample-every` requests to show the trend. Exit status 1 if any request failed or differed, if the
engine did not return to idle, or if memory after the run exceeds memory after warm-up by more than
`--max-growth` (10 %).

    python benchmarks/soak.py                 # ~3-5 min on a 2-core box
    python benchmarks/soak.py --json out.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from vmetal.bench.load import KINDS, PROMPTS, group_rss, metrics, request_body, send

MODEL = "tiny"
LENGTHS = (1, 7, 24)
MIB = 1024 * 1024


def wait_idle(http: httpx.Client, base_url: str, timeout: float = 60.0) -> float:
    """Seconds until nothing runs or waits and the KV cache is empty; raises if that never comes."""
    started = time.monotonic()
    while True:
        m = metrics(http, base_url)
        if m["vllm:num_requests_running"] == 0 and m["vllm:num_requests_waiting"] == 0 \
                and m["vllm:kv_cache_usage_perc"] == 0:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise RuntimeError(f"engine not idle after {timeout:g} s: {m['vllm:num_requests_running']:g} running, "
                               f"{m['vllm:num_requests_waiting']:g} waiting, KV {m['vllm:kv_cache_usage_perc']:.4f}")
        time.sleep(0.2)


def settled_rss(http: httpx.Client, server) -> dict[str, int]:
    wait_idle(http, server.base_url)
    time.sleep(2.0)
    return group_rss(server.pid)


def run(args: argparse.Namespace) -> dict:
    from vmetal.demo import build_tiny_model
    from vmetal.server.process import ServerProcess, free_port

    workdir = Path(tempfile.mkdtemp(prefix="vmetal-soak-"))
    model = build_tiny_model(workdir / "qwen3", "qwen3", hidden_size=64, num_layers=2)
    server = ServerProcess(str(model), port=free_port(), served_model_name=MODEL, echo=False,
                           log_path=workdir / "server.log",
                           vllm_args=["--max-model-len", "512", "--max-num-seqs", str(args.concurrency)])
    combos = [(kind, p, n) for kind in KINDS for p in range(len(PROMPTS)) for n in LENGTHS]
    limits = httpx.Limits(max_connections=args.concurrency + 8, max_keepalive_connections=args.concurrency + 8)
    print(f"soak: server log {workdir / 'server.log'}", file=sys.stderr)
    with server, httpx.Client(base_url=server.url, timeout=120, limits=limits) as http:
        reference = {c: send(http, MODEL, c[0], PROMPTS[c[1]], c[2], stream=False) for c in combos}
        counts = {"ok": 0, "failed": 0, "differed": 0, "abandoned": 0}
        errors: list[str] = []
        lock = threading.Lock()

        def one(i: int) -> None:
            kind, p, n = combos[i % len(combos)]
            stream = (i // len(combos)) % 2 == 1
            try:
                if args.abandon_every and i % args.abandon_every == args.abandon_every - 1:
                    path, body = request_body(MODEL, kind, PROMPTS[p], 400 if p < 3 else 60, stream=True)
                    with http.stream("POST", path, json=body) as response:
                        for k, _ in enumerate(response.iter_lines()):
                            if k >= 4:
                                break
                    outcome = "abandoned"
                else:
                    reply = send(http, MODEL, kind, PROMPTS[p], n, stream)
                    outcome = "ok" if reply == reference[(kind, p, n)] else "differed"
                    if outcome == "differed":
                        errors.append(f"request {i} {(kind, p, n, stream)}: {reply} != {reference[(kind, p, n)]}")
            except Exception as exc:  # noqa: BLE001 - counted and reported
                outcome = "failed"
                errors.append(f"request {i}: {type(exc).__name__}: {exc}")
            with lock:
                counts[outcome] += 1

        def burst(first: int, count: int) -> None:
            with ThreadPoolExecutor(args.concurrency) as pool:
                list(pool.map(one, range(first, first + count)))

        started = time.monotonic()
        burst(0, args.warmup)
        warm = settled_rss(http, server)
        warm_total = sum(warm.values())
        print(f"soak: after {args.warmup} warm-up requests: {warm_total / MIB:.1f} MiB "
              f"({', '.join(f'{k} {v / MIB:.1f}' for k, v in warm.items())})", file=sys.stderr)
        for key in counts:
            counts[key] = 0
        samples = []
        loop_started = time.monotonic()
        done = 0
        for first in itertools.count(args.warmup, args.sample_every):
            count = min(args.sample_every, args.requests - done)
            if count <= 0:
                break
            burst(first, count)
            done += count
            total = sum(group_rss(server.pid).values())
            samples.append((done, total))
            print(f"soak: {done}/{args.requests} requests, {time.monotonic() - loop_started:.0f} s, "
                  f"{total / MIB:.1f} MiB, {counts}", file=sys.stderr)
        loop_s = time.monotonic() - loop_started
        idle_s = wait_idle(http, server.base_url)
        after = settled_rss(http, server)
        after_total = sum(after.values())
        final = metrics(http, server.base_url)
    growth = after_total / warm_total - 1
    result = {
        "requests": args.requests, "concurrency": args.concurrency, "warmup": args.warmup,
        "abandon_every": args.abandon_every, "counts": counts, "errors": errors[:10],
        "loop_seconds": round(loop_s, 1), "requests_per_second": round(args.requests / loop_s, 1),
        "idle_after_seconds": round(idle_s, 2), "kv_usage_after": final["vllm:kv_cache_usage_perc"],
        "rss_after_warmup_mib": round(warm_total / MIB, 1), "rss_after_run_mib": round(after_total / MIB, 1),
        "rss_growth_percent": round(100 * growth, 2),
        "rss_by_process_after_warmup_mib": {k: round(v / MIB, 1) for k, v in warm.items()},
        "rss_by_process_after_run_mib": {k: round(v / MIB, 1) for k, v in after.items()},
        "rss_samples_mib": [(n, round(v / MIB, 1)) for n, v in samples],
        "total_seconds": round(time.monotonic() - started, 1),
        "ok": counts["failed"] == 0 and counts["differed"] == 0 and growth <= args.max_growth,
    }
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--abandon-every", type=int, default=20, help="0: no client leaves early")
    parser.add_argument("--sample-every", type=int, default=250)
    parser.add_argument("--max-growth", type=float, default=0.10)
    parser.add_argument("--json", type=Path, help="write the result here too")
    args = parser.parse_args()
    result = run(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
