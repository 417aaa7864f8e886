"""Load and fault runs against vLLM's OpenAI server: the test-side helpers around `vmetal.bench.load`.

The HTTP client itself (`send`, `request_body`, `metrics`, `group_rss`, the prompts and request kinds) lives in
`vmetal.bench.load`, which `benchmarks/soak.py` uses too; it is re-exported here so the tests import one place.
What stays is test-only: waiting for work in flight, submitting jobs whose failures are the outcome under test,
and `vmetal serve` run as a user runs it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from tests.support import REPO
from vmetal.bench.load import (  # noqa: F401 - re-exported for the tests
    KINDS,
    PROMPTS,
    Reply,
    StreamError,
    group_processes,
    group_rss,
    metrics,
    request_body,
    send,
)


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
