"""`vmetal ...` run as a user runs it, in a process group of its own, its output in a log file: for the tests that
need the CLI's own behaviour around a real server (its pre-flight, `-v`, `--headless`, the lines it prints), where
`vmetal.server.process.ServerProcess` alone would skip the CLI."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path


class CliServer:
    """`python -m vmetal.cli.app ARGV` started at once; `prefix` runs it under another command (`ip netns exec
    NS`). Stopped with its whole process group by `stop()`, or on leaving a `with` block."""

    def __init__(self, argv: Sequence[str], log: Path, env: Mapping[str, str] | None = None,
                 prefix: Sequence[str] = ()) -> None:
        self.log = log
        with log.open("w") as out:
            self.proc = subprocess.Popen([*prefix, sys.executable, "-m", "vmetal.cli.app", *argv],
                                         env=None if env is None else dict(env), stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def text(self) -> str:
        return self.log.read_text()

    def wait_for(self, words: str = "vmetal: serving", timeout: float = 300) -> CliServer:
        """Until the log shows `words`; fails with the log's end if the process exits or time runs out."""
        deadline = time.monotonic() + timeout
        while words not in self.text():
            assert self.proc.poll() is None, self.text()[-3000:]
            assert time.monotonic() < deadline, f"no {words!r} in {timeout:g} s: {self.text()[-3000:]}"
            time.sleep(0.5)
        return self

    def stop(self, timeout: float = 90) -> int:
        """SIGTERM to the group (SIGKILL after `timeout` s); the CLI's exit code."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait()

    def assert_stops_with_its_group(self, timeout: float = 60) -> None:
        """SIGTERM to the group ends the CLI with 0, and within seconds no process of its group is left."""
        os.killpg(self.proc.pid, signal.SIGTERM)
        assert self.proc.wait(timeout) == 0
        deadline = time.monotonic() + 10
        while self._group_alive() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not self._group_alive(), "a process of the server's group outlived it"

    def _group_alive(self) -> bool:
        try:
            os.killpg(self.proc.pid, 0)
        except ProcessLookupError:
            return False
        return True

    def __enter__(self) -> CliServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
