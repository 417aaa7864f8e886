"""vmetal.server.background with stand-in servers (small Python processes that record themselves as `vmetal
serve` does and start a child in a session of its own, as vLLM's server is): records, which PID is trusted,
stopping a family, concurrent stops. The real `vmetal serve --detach` is tests/cli/test_detach.py's."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

from vmetal.server import background
from vmetal.server.process import free_port

# argv: model, port, "term" (exit cleanly on SIGTERM) or "ignore" (ignore it, as a hung server would).
STAND_IN = """
import signal, subprocess, sys, time
from vmetal.server import background
with background.recorded(model=sys.argv[1], source="/models/x", host="127.0.0.1", port=int(sys.argv[2])):
    # As vLLM's server: a session of its own, and in its group a process whose environment tells nothing (as
    # vLLM's EngineCore, whose setproctitle overwrites it).
    child = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; subprocess.Popen("
                              "[sys.executable, '-c', 'import time; time.sleep(600)'], env={}); time.sleep(600)"],
                             start_new_session=True)

    def on_term(*_):
        if sys.argv[3] == "ignore":
            return
        child.terminate()
        child.wait()
        sys.exit(0)

    signal.signal(signal.SIGTERM, on_term)
    print(child.pid, flush=True)
    while True:
        time.sleep(0.1)
"""


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class StandIn:
    def __init__(self, model: str = "tiny", on_term: str = "term") -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", STAND_IN, model, str(free_port()), on_term],
                                     stdout=subprocess.PIPE, text=True)
        self.child = int(self.proc.stdout.readline())
        deadline = time.monotonic() + 10
        while not psutil.Process(self.child).children() and time.monotonic() < deadline:
            time.sleep(0.05)
        [self.grandchild] = [p.pid for p in psutil.Process(self.child).children()]
        [self.server] = [s for s in background.records() if s.pid == self.proc.pid]

    def close(self) -> None:
        for pid in (self.proc.pid, self.child, self.grandchild):
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait()


@pytest.fixture
def stand_in():
    made: list[StandIn] = []

    def make(*args: str) -> StandIn:
        made.append(StandIn(*args))
        return made[-1]

    yield make
    for s in made:
        s.close()
    for server in background.records():  # nothing of one test is left for the next
        background.stop(server, wait=1)


def test_a_server_records_itself_and_is_listed_until_it_stops(stand_in):
    s = stand_in("alpha")
    assert (s.server.model, s.server.host, s.server.log) == ("alpha", "127.0.0.1", None)
    assert s.server.url == f"http://127.0.0.1:{s.server.port}/v1"
    assert background.process(s.server).pid == s.proc.pid
    assert background.status(s.server) == background.STARTING  # alive, nothing answers on its port
    assert oct(background.servers_dir().joinpath(f"{s.server.id}.json").stat().st_mode & 0o777) == "0o600"
    assert background.stop(s.server) == background.STOPPED
    assert s.proc.wait(5) == 0 and not alive(s.child)
    assert background.records() == []
    assert list(background.servers_dir().iterdir()) == []  # no record, no lock file


def test_stop_kills_what_ignores_sigterm_and_what_left_its_group(stand_in):
    s = stand_in("stubborn", "ignore")
    started = time.monotonic()
    assert background.stop(s.server, wait=0.5) == background.STOPPED
    assert time.monotonic() - started < 10
    assert s.proc.wait(5) == -signal.SIGKILL
    deadline = time.monotonic() + 5
    while alive(s.child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(s.child), "the child in a session of its own is found by the id in its environment"


def test_a_killed_server_is_dead_and_stop_clears_it_with_its_leftovers(stand_in):
    s = stand_in("crashed")
    s.proc.kill()
    s.proc.wait()
    assert background.status(s.server) == background.DEAD
    assert alive(s.child) and alive(s.grandchild)  # orphaned, still running
    assert background.ID_ENV not in psutil.Process(s.grandchild).environ()
    assert background.stop(s.server) == background.EXITED
    assert background.records() == [] and not alive(s.child) and not alive(s.grandchild)


def test_recorded_exports_the_id_and_keeps_a_server_that_died_after_serving(monkeypatch):
    monkeypatch.delenv(background.ID_ENV, raising=False)
    with pytest.raises(RuntimeError), background.recorded(model="m", source="/m", host="127.0.0.1", port=1) as entry:
        assert os.environ[background.ID_ENV] == entry.server.id
        entry.mark_served()
        raise RuntimeError("the vLLM server exited by itself with code 0 while serving\nits log says why")
    assert background.ID_ENV not in os.environ
    [kept] = background.records()
    assert kept.id == entry.server.id and kept.died == "the vLLM server exited by itself with code 0 while serving"
    assert background.stop(kept) == background.EXITED  # its own process is never signalled
    with pytest.raises(RuntimeError), background.recorded(model="m", source="/m", host="127.0.0.1", port=1):
        raise RuntimeError("failed before it served: its error was on screen")
    assert background.records() == []


def test_died_keeps_the_record_marked_and_a_clean_finish_removes_it(stand_in):
    s = stand_in("served")
    background.finish(s.server, died="the vLLM server exited by itself with code -9 while serving")
    [kept] = background.records()
    assert kept.died == "the vLLM server exited by itself with code -9 while serving"
    background.finish(kept, died=None)
    assert background.records() == []


@pytest.mark.parametrize("stale", ["start time", "command line"])
def test_a_stale_record_never_signals_the_process_that_reused_its_pid(stand_in, stale):
    """A record whose PID now belongs to another process (here: a sleeper of ours) reads as dead, and `stop`
    clears it without touching that process."""
    import dataclasses

    s = stand_in("old")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        me = psutil.Process(sleeper.pid)
        # One of the two differs: the start time (a PID reused later), or the command line.
        fake = dataclasses.replace(
            s.server, pid=sleeper.pid,
            started=me.create_time() - 3600 if stale == "start time" else me.create_time(),
            command=background._digest(me.cmdline() if stale == "start time" else ["vmetal", "serve"]))
        background._write(fake)
        assert background.process(fake) is None and background.status(fake) == background.DEAD
        assert background.stop(fake) == background.EXITED
        assert sleeper.poll() is None, "an unrelated process was signalled"
    finally:
        sleeper.kill()
        sleeper.wait()


def test_concurrent_stops_stop_once(stand_in):
    s = stand_in("shared")
    outcomes: list[str] = []
    threads = [threading.Thread(target=lambda: outcomes.append(background.stop(s.server))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(outcomes) == [background.GONE, background.GONE, background.STOPPED]
    # One SIGTERM only: the stand-in exits 0 through its handler (a second signal would find it gone).
    assert s.proc.wait(5) == 0 and background.records() == []


def test_finish_does_not_wait_for_a_stop_in_progress(stand_in):
    s = stand_in("busy")
    with background._locked(s.server.id) as present:
        assert present
        started = time.monotonic()
        background.finish(s.server, died=None)
        assert time.monotonic() - started < 1
        assert [r.id for r in background.records()] == [s.server.id]  # left for the stopper


def test_a_headless_node_is_running_while_alive_and_has_no_url(monkeypatch, tmp_path):
    """A `--headless` node of a multi-node serve answers no HTTP: `ps` lists it as running while its process
    lives (not `starting` forever), with no URL."""
    monkeypatch.setenv("VMETAL_HOME", str(tmp_path))
    with background.recorded(model="tiny", source="/models/x", host="127.0.0.1", port=free_port(), headless=True):
        [record] = background.records()
        assert record.headless and record.url == "-"
        assert background.status(record) == background.RUNNING
    assert background.records() == []
