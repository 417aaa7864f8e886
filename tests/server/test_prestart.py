"""The EngineCore's pre-started interpreter (vmetal/server/prestart.py), with real spawned processes.

What a user notices is `vmetal serve` answering seconds sooner (benchmarks/bench_cli.py); what these tests pin
is that a process handed to the waiting interpreter behaves as a spawned one does (its target, arguments,
environment as of `start()`, exit code, terminate, sentinel), that everything the interpreter cannot take is
spawned the ordinary way, and that a waiting interpreter never outlives the process that started it.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import textwrap
import time
from multiprocessing import context
from pathlib import Path

import pytest

from vmetal.server import prestart

# A standard-library module that neither multiprocessing nor this test module imports: present in the child
# before its target runs only if the waiting interpreter imported it.
PRELOADED = "colorsys"
SPAWN = multiprocessing.get_context("spawn")


def report(path: str, code: int = 0) -> None:
    Path(path).write_text(json.dumps({
        "pid": os.getpid(),
        "preloaded": PRELOADED in sys.modules,
        "env": os.environ.get("VMETAL_TEST_PRESTART"),
        "name": multiprocessing.current_process().name,
        "parent": multiprocessing.parent_process().pid,
    }))
    sys.exit(code)


def report_title(path: str) -> None:
    import psutil
    import setproctitle

    setproctitle.setproctitle("VLLM::EngineCore")
    Path(path).write_text(json.dumps({"pid": os.getpid(), "cmdline": psutil.Process().cmdline()[0]}))


def report_queue(path: str, queue) -> None:
    Path(path).write_text(json.dumps({"pid": os.getpid(), "item": queue.get(timeout=30)}))


def sleep_forever() -> None:
    time.sleep(600)


@pytest.fixture
def installed(monkeypatch):
    # Restored after the test (pytest keeps the staticmethod as it was on the class).
    monkeypatch.setattr(context.SpawnProcess, "_Popen", context.SpawnProcess.__dict__["_Popen"])
    warm = prestart.install(preload=(PRELOADED,))
    assert warm is not None
    yield warm
    warm.close()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, its parent gone or not reaping) counts as gone.
    state = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True).stdout.strip()
    return bool(state) and not state.startswith("Z")


def reaped(pid: int, timeout: float) -> bool:
    """Wait for this process's own child `pid` to exit, reaping it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return True
        time.sleep(0.1)
    return False


def test_first_engine_core_runs_in_the_waiting_interpreter(installed, tmp_path, monkeypatch):
    monkeypatch.setenv("VMETAL_TEST_PRESTART", "set after the interpreter started")
    out = tmp_path / "out.json"
    proc = SPAWN.Process(target=report, name="EngineCore", args=(str(out), 3))
    proc.start()
    proc.join(60)
    assert proc.exitcode == 3
    seen = json.loads(out.read_text())
    assert seen == {"pid": installed.pid, "preloaded": True, "env": "set after the interpreter started",
                    "name": "EngineCore", "parent": os.getpid()}
    assert proc.pid == installed.pid


def test_the_handed_process_can_name_itself(monkeypatch, tmp_path):
    """vLLM names its EngineCore with setproctitle ("VLLM::EngineCore", what ps and psutil show); replacing the
    environment before setproctitle's first use used to make every title a silent no-op."""
    monkeypatch.setattr(context.SpawnProcess, "_Popen", context.SpawnProcess.__dict__["_Popen"])
    warm = prestart.install(preload=("setproctitle",))
    out = tmp_path / "title.json"
    proc = SPAWN.Process(target=report_title, name="EngineCore", args=(str(out),))
    proc.start()
    proc.join(60)
    warm.close()
    assert proc.exitcode == 0
    assert json.loads(out.read_text()) == {"pid": warm.pid, "cmdline": "VLLM::EngineCore"}


def test_later_and_other_processes_spawn_as_usual(installed, tmp_path):
    first = SPAWN.Process(target=report, name="EngineCore_DP0", args=(str(tmp_path / "a.json"),))
    second = SPAWN.Process(target=report, name="EngineCore_DP1", args=(str(tmp_path / "b.json"),))
    other = SPAWN.Process(target=report, name="VLLM_DP_Coordinator", args=(str(tmp_path / "c.json"),))
    for proc in (other, first, second):
        proc.start()
    for proc in (other, first, second):
        proc.join(60)
        assert proc.exitcode == 0
    seen = {name: json.loads((tmp_path / f"{name}.json").read_text()) for name in "abc"}
    assert seen["a"]["pid"] == installed.pid and seen["a"]["preloaded"]
    assert seen["b"]["pid"] != installed.pid and not seen["b"]["preloaded"]
    assert seen["c"]["pid"] != installed.pid and not seen["c"]["preloaded"]


def test_terminate_and_sentinel_reach_the_handed_process(installed):
    proc = SPAWN.Process(target=sleep_forever, name="EngineCore")
    proc.start()
    assert proc.pid == installed.pid
    assert proc.is_alive()
    proc.terminate()
    from multiprocessing.connection import wait

    assert wait([proc.sentinel], timeout=30) == [proc.sentinel]
    proc.join(10)
    assert proc.exitcode == -15
    assert not alive(installed.pid)


def test_a_process_that_carries_descriptors_is_spawned_and_the_interpreter_leaves(installed, tmp_path):
    queue = SPAWN.Queue()
    queue.put("through the queue")
    out = tmp_path / "q.json"
    proc = SPAWN.Process(target=report_queue, name="EngineCore", args=(str(out), queue))
    proc.start()
    proc.join(60)
    assert proc.exitcode == 0
    seen = json.loads(out.read_text())
    assert seen["item"] == "through the queue"
    assert seen["pid"] != installed.pid
    assert reaped(installed.pid, timeout=30)


def test_an_unused_interpreter_leaves_with_its_parent_even_mid_import(tmp_path):
    # The preloaded module takes a minute to import; the parent exits at once.
    (tmp_path / "slow_import.py").write_text("import time\ntime.sleep(60)\n")
    script = textwrap.dedent("""
        import sys
        from vmetal.server import prestart
        warm = prestart.install(preload=("slow_import",))
        print(warm.pid, flush=True)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(Path(__file__).parents[2])])}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    pid = int(done.stdout.split()[0])
    deadline = time.monotonic() + 20
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(pid)
