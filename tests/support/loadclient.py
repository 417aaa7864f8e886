"""A plain HTTP client for load and fault runs against vLLM's OpenAI server (tests and benchmarks/soak.py).

`send` makes one greedy request (completion or chat, streamed or not) and returns what the client saw: the
generated token ids and text, whichever way they arrived. `metrics` reads the server's Prometheus page, and
`group_rss` sums the resident memory of the server's process group (API server, EngineCore, helpers).
Only httpx and what vLLM installs (prometheus_client, psutil) are used, so the soak script runs in the venv.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.support import REPO

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


def request_body(model: str, kind: str, prompt: str, max_tokens: int, stream: bool) -> tuple[str, dict]:
    """(path, JSON body) of one greedy request that runs for exactly `max_tokens` tokens."""
    body: dict = {"model": model, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                  "return_token_ids": True, "stream": stream}
    if kind == "completion":
        return "/completions", {**body, "prompt": prompt}
    return "/chat/completions", {**body, "messages": [{"role": "user", "content": prompt}]}


def _choice_text(kind: str, choice: dict, stream: bool) -> str:
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


def wait_running(http: httpx.Client, base_url: str, at_least: int, timeout: float = 60) -> None:
    """Until the engine holds `at_least` requests (vLLM's gauge), so a fault meets work in flight."""
    deadline = time.monotonic() + timeout
    while metrics(http, base_url)["vllm:num_requests_running"] < at_least:
        assert time.monotonic() < deadline, "the load never reached the engine"
        time.sleep(0.05)


def launch(pool, http: httpx.Client, model: str, jobs, max_tokens: int) -> list:
    """Submit (kind, prompt index, stream) jobs; each future gives (job, Reply or None, exception or None)."""
    def one(job):
        kind, p, stream = job
        try:
            return job, send(http, model, kind, PROMPTS[p], max_tokens, stream), None
        except Exception as exc:  # noqa: BLE001 - the outcome under test
            return job, None, exc
    return [pool.submit(one, job) for job in jobs]


def group_processes(pid: int) -> list:
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


class VmetalServe:
    """`vmetal serve MODEL` (served as `tiny`) as a user runs it, in a session of its own; output kept line by line."""

    def __init__(self, model: Path, port: int) -> None:
        self.port = port
        argv = [sys.executable, "-m", "vmetal.cli.app", "serve", str(model), "--port", str(self.port),
                "--served-model-name", "tiny", "--max-model-len", "512", "--max-num-seqs", "64"]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.port}"
        self.children: list = []

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def output(self, n: int = 40) -> str:
        return "\n".join(self.lines[-n:])

    def wait_serving(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not any(line.startswith("vmetal: serving") for line in self.lines):
            assert self.proc.poll() is None, f"vmetal serve exited with {self.proc.returncode}:\n{self.output()}"
            assert time.monotonic() < deadline, f"not serving after {timeout:g} s:\n{self.output()}"
            time.sleep(0.2)
        import psutil

        self.children = psutil.Process(self.proc.pid).children(recursive=True)
        assert any(p.name() == "VLLM::EngineCore" for p in self.children), self.children

    def leftovers(self) -> list:
        import psutil

        left = []
        for p in self.children:
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    left.append(p)
            except psutil.NoSuchProcess:
                pass
        return left

    def close(self) -> None:
        for pid in [self.proc.pid] + [p.pid for p in self.children]:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.proc.wait(30)
