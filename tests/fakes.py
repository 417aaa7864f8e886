"""A stand-in for `vmetal.server.ServerProcess` in CLI tests of `vmetal serve` that start nothing."""

from __future__ import annotations

import signal


class FakeServer:
    """Records how `vmetal serve` built it; ready at once; the user presses Ctrl-C at the first poll
    (a server that exits by itself is an error: tests/test_faults_server.py)."""

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
