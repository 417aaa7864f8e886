"""Decode timed token by token in this process: vLLM's engine stepped by hand, and mlx-lm's own generate.

A server adds HTTP and tokenization to every token; to compare the engine's decode with mlx-lm's, both run
here, on the same folder and the same prompt token ids, and each token is stamped when it reaches Python (the
client's view, as a streaming client would see it):

    decode tok/s    = (N - 1) / (t_last - t_first)   one stream; the first token (prefill) excluded
    aggregate tok/s = tokens after the last request's first token / time from then to the last token

`engine_run` steps an `LLM`'s engine with DELTA outputs; `mlx_single` times `mlx_lm.stream_generate`,
`mlx_batch` reads `mlx_lm.batch_generate`'s own statistics. Everything is greedy with ignore_eos, so each
request runs to exactly `max_tokens`. vllm and mlx_lm are imported inside the functions.
"""

from __future__ import annotations

import itertools
import os
import statistics
import time
from typing import Any

# Source sentences for the prompts; each is cut to the same token count, so the C prompts of a batch need no
# padding in mlx-lm and cost the same prefill.
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

_request_ids = itertools.count(1)


def prepare_environ(paged: bool = False) -> None:
    """Before vLLM is imported: the plugin on (it is off on non-Apple hosts unless asked), no Hub lookups;
    `paged`: every engine on the paged KV path (`VLLM_METAL_USE_PAGED_ATTENTION=1`).

    The engine process vLLM spawns inherits this environment.
    """
    os.environ.setdefault("VMETAL_ENABLE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if paged:
        os.environ["VLLM_METAL_USE_PAGED_ATTENTION"] = "1"
        # A paged engine takes its pools up front, 0.9 of the device by default: the benchmarks hold two engines
        # at once, and the second's pools would not fit (on a GPU: cudaMallocAsync out of memory at start).
        os.environ.setdefault("VLLM_METAL_MEMORY_FRACTION", "0.4")


def make_prompts(tokenizer: Any, n: int, length: int) -> list[list[int]]:
    """`n` prompts of exactly `length` token ids, from `SENTENCES` in turn (repeated when too short)."""
    prompts = []
    for i in range(n):
        ids = tokenizer.encode(SENTENCES[i % len(SENTENCES)])
        while len(ids) < length:
            ids = ids + ids
        prompts.append([int(t) for t in ids[:length]])
    return prompts


def summary(values: list[float]) -> dict[str, Any]:
    """Median, min, max, count and the values themselves (a report keeps them for the raw table)."""
    xs = [float(x) for x in values]
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs), "values": xs}


def summary_text(s: dict[str, Any], digits: int = 1) -> str:
    """`summary()` in one line: median (min, max, spread, n), and CONTENDED when `s["clean"]` is False."""
    flag = "" if s.get("clean", True) else ", CONTENDED"
    return (f"{s['median']:.{digits}f} (min {s['min']:.{digits}f}, max {s['max']:.{digits}f}, "
            f"spread {spread(s):.0f}%, n={s['n']}{flag})")


def spread(s: dict[str, Any]) -> float:
    """(max - min) / median of a `summary()`, in percent."""
    return 100.0 * (s["max"] - s["min"]) / s["median"] if s["median"] else 0.0


def engine_run(llm: Any, prompts: list[list[int]], max_tokens: int) -> dict[str, Any]:
    """All prompts submitted at once to `llm` (a `vllm.LLM`), its engine stepped to the end, each token stamped."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    engine = llm.llm_engine
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                            output_kind=RequestOutputKind.DELTA)
    run = next(_request_ids)
    ids = [f"bench{run}-{i}" for i in range(len(prompts))]
    t0 = time.perf_counter()
    for rid, prompt in zip(ids, prompts):
        engine.add_request(rid, {"prompt_token_ids": prompt}, params)
    events: list[tuple[float, str, int]] = []  # (time, request, new tokens)
    metrics = {}
    tokens_by_request: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        outputs = engine.step()
        now = time.perf_counter()
        for out in outputs:
            new = out.outputs[0].token_ids
            tokens_by_request.setdefault(out.request_id, []).extend(int(x) for x in new)
            if new:
                events.append((now, out.request_id, len(new)))
            if out.finished:
                metrics[out.request_id] = out.metrics
    t_end = events[-1][0]
    counts = {r: 0 for r in ids}
    first: dict[str, float] = {}
    for t, r, k in events:
        counts[r] += k
        first.setdefault(r, t)
    t_all = max(first.values())  # every request is decoding from here on
    after = sum(k for t, _, k in events if t > t_all)
    result = {
        "requests": len(prompts),
        "tokens": sum(counts.values()),
        "complete": all(c == max_tokens for c in counts.values()),
        "ttft_s": first[ids[0]] - t0,
        "ttft_last_s": t_all - t0,
        "agg_decode_tps": after / (t_end - t_all),
        "e2e_tps": sum(counts.values()) / (t_end - t0),
        "wall_s": t_end - t0,
        "token_ids": [tokens_by_request[r] for r in ids],
    }
    if len(prompts) == 1:
        # The same rate seen from inside the engine process: a difference is front-end / IPC delay.
        m = metrics.get(ids[0])
        if m is not None and m.last_token_ts > m.first_token_ts > 0:
            result["engine_core_decode_tps"] = (counts[ids[0]] - 1) / (m.last_token_ts - m.first_token_ts)
    return result


def mlx_single(model: Any, tokenizer: Any, prompt: list[int], max_tokens: int) -> dict[str, Any]:
    """One `mlx_lm.stream_generate` timed as `engine_run` times one request, beside its own `generation_tps`."""
    from mlx_lm.generate import stream_generate

    stamps, tokens, response = [], [], None
    t0 = time.perf_counter()
    for response in stream_generate(model, tokenizer, prompt=prompt, max_tokens=max_tokens):
        stamps.append(time.perf_counter())
        tokens.append(int(response.token))
    n = len(stamps)
    return {"tokens": n, "ttft_s": stamps[0] - t0, "token_ids": tokens,
            "decode_tps": (n - 1) / (stamps[-1] - stamps[0]),
            "reported_generation_tps": response.generation_tps}


def mlx_batch(model: Any, tokenizer: Any, prompts: list[list[int]], max_tokens: int) -> dict[str, Any]:
    """`mlx_lm.batch_generate` on `prompts`: its own statistics, and the wall time around it."""
    from mlx_lm.generate import batch_generate

    t0 = time.perf_counter()
    r = batch_generate(model, tokenizer, prompts, max_tokens=max_tokens, return_token_ids=True)
    wall = time.perf_counter() - t0
    s = r.stats
    return {"requests": len(prompts), "tokens": s.generation_tokens,
            "generation_tps": s.generation_tps, "decode_tps_stat": s.decode_tps,
            "prompt_time_s": s.prompt_time, "wall_s": wall,
            "complete": all(len(t) == max_tokens for t in r.token_ids)}
