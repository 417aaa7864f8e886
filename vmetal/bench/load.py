"""A plain HTTP client for load, soak and fault runs against vLLM's OpenAI server.

vLLM's own load generator (`vmetal.bench.online`) measures speed; this one checks answers. `send` makes one
greedy request (completion or chat, streamed or not) that runs for exactly `max_tokens` tokens and returns
what the client saw, token ids and text, whichever way they arrived, so a reply under load can be compared
with the same request's reply asked alone. `metrics` reads the server's Prometheus page (is the engine idle,
is the KV cache empty), and `group_rss` sums the resident memory of the server's process group (API server,
EngineCore, helpers), which is how a soak sees a leak.

The caller brings the `httpx.Client` (base URL `…/v1`, its own limits and timeouts); prometheus_client and
psutil, which vLLM installs, are imported inside the functions that need them. `benchmarks/soak.py` and the
server tests (through `tests/support/loadclient.py`) use this module.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import httpx

KINDS = ("completion", "chat")

# Prompts of very different lengths (a few to ~150 tokens), so prefills of all sizes mix with decodes.
PROMPTS = (
    "Hi",
    "The quick brown fox jumps over the lazy dog while the farmer watches from the porch.",
    " ".join(f"item {i} is a number, and numbers are listed here one after another;" for i in range(6)),
    " ".join(f"Paragraph {i}: the server keeps answering while many clients come and go at once."
             for i in range(10)),
)


@dataclass(frozen=True)
class Reply:
    token_ids: tuple[int, ...]
    text: str
    finish_reason: str | None


class StreamError(RuntimeError):
    """The server sent an error event inside a stream that had already begun (HTTP 200)."""


def request_body(model: str, kind: str, prompt: str, max_tokens: int, stream: bool) -> tuple[str, dict[str, Any]]:
    """(path, JSON body) of one greedy request that runs for exactly `max_tokens` tokens."""
    body: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                            "return_token_ids": True, "stream": stream}
    if kind == "completion":
        return "/completions", {**body, "prompt": prompt}
    return "/chat/completions", {**body, "messages": [{"role": "user", "content": prompt}]}


def _choice_text(kind: str, choice: dict[str, Any], stream: bool) -> str:
    if kind == "completion":
        return choice.get("text") or ""
    part = choice.get("delta" if stream else "message") or {}
    return part.get("content") or ""


def send(http: httpx.Client, model: str, kind: str, prompt: str, max_tokens: int, stream: bool) -> Reply:
    """One request; raises `httpx.HTTPStatusError` on a non-2xx answer, `StreamError` on an error event."""
    path, body = request_body(model, kind, prompt, max_tokens, stream)
    if not stream:
        response = http.post(path, json=body)
        response.raise_for_status()
        choice = response.json()["choices"][0]
        return Reply(tuple(choice["token_ids"]), _choice_text(kind, choice, False), choice["finish_reason"])
    ids: list[int] = []
    text: list[str] = []
    finish = None
    with http.stream("POST", path, json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise StreamError(str(event["error"]))
            for choice in event.get("choices", []):
                ids.extend(choice.get("token_ids") or ())
                text.append(_choice_text(kind, choice, True))
                finish = choice.get("finish_reason") or finish
    return Reply(tuple(ids), "".join(text), finish)


def metrics(http: httpx.Client, base_url: str) -> dict[str, float]:
    """The server's gauges and counters by sample name, summed over labels (one engine, one model).

    `vllm:request_success_total` is also given per finish reason, as `…{abort}`, `…{length}`, ….
    """
    from prometheus_client.parser import text_string_to_metric_families

    response = http.get(base_url + "/metrics")
    response.raise_for_status()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            out[sample.name] = out.get(sample.name, 0.0) + sample.value
            reason = sample.labels.get("finished_reason")
            if reason is not None:
                key = f"{sample.name}{{{reason}}}"
                out[key] = out.get(key, 0.0) + sample.value
    return out


def group_processes(pid: int) -> list[Any]:
    """The live processes of the process group `pid` leads (the server and everything vLLM started)."""
    import psutil

    procs = []
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                procs.append(proc)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return procs


def group_rss(pid: int) -> dict[str, int]:
    """Resident bytes per process of the group, keyed `name[pid]`."""
    import psutil

    out = {}
    for proc in group_processes(pid):
        try:
            out[f"{proc.name()}[{proc.pid}]"] = proc.memory_info().rss
        except psutil.Error:
            continue
    return out
