"""What the CLI tests of `vmetal serve` share: a stand-in for `vmetal.server.process.ServerProcess` for those that start
nothing, the console script run in a fresh interpreter, and which of a server's processes still run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys


class FakeServer:
    """Records how `vmetal serve` built it; ready at once; the user presses Ctrl-C at the first poll
    (a server that exits by itself is an error: tests/server/test_faults.py)."""

    built: list[FakeServer] = []

    def __init__(self, model, **kwargs):
        self.model, self.kwargs = model, kwargs
        self.vllm_args = kwargs.get("vllm_args")
        self.killed = False
        self.events: list[str] = []
        FakeServer.built.append(self)

    def start(self):
        self.events.append("start")

    def wait_ready(self, timeout, cancel=None):
        self.events.append(f"wait_ready {timeout:g}")
        return True

    def wait(self, timeout=None):
        if "interrupted" not in self.events:
            self.events.append("interrupted")
            signal.raise_signal(signal.SIGINT)
        return None

    def kill(self):
        self.killed = True

    def stop(self, grace=15.0):
        self.events.append("stop")
        return 0


def install(monkeypatch) -> list[FakeServer]:
    """Make `vmetal serve` build FakeServers; returns the list of those built."""
    from vmetal.cli import serve as serve_cmd

    FakeServer.built = []
    monkeypatch.setattr(serve_cmd, "ServerProcess", FakeServer)
    return FakeServer.built


def run_main_fresh(argv: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`vmetal ARGV` through the console script's `main()` in a fresh interpreter, without this process's
    VLLM_METAL_* / VLLM_MLX_* settings (plus `env`); it fails if vLLM, torch or mlx got imported on the way."""
    code = (f"import sys; sys.argv = {['vmetal', *argv]!r}\n"
            "from vmetal.cli.app import main\n"
            "try:\n    main()\nfinally:\n"
            "    assert not {'vllm', 'torch', 'mlx'} & set(sys.modules), sorted(sys.modules)\n")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_METAL_", "VLLM_MLX_"))}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**clean, **(env or {})})


def still_running(procs: list, timeout: float = 5.0) -> list:
    """Those of `procs` (psutil.Process) still running after up to `timeout` s; zombies left for PID 1 to reap
    count as gone."""
    import time

    import psutil

    deadline = time.monotonic() + timeout
    while True:
        running = []
        for proc in procs:
            try:
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    running.append(proc)
            except psutil.NoSuchProcess:
                pass
        if not running or time.monotonic() > deadline:
            return running
        time.sleep(0.05)
