"""MLX's launches on a thread of their own (`vmetal.engine.runner.launches`): arrays built on the launch stream
are evaluated by the launch thread, in order, while the caller goes on; `settle` waits for them and hands back
what a launch raised; without the thread a launch is the caller's own `mx.async_eval`.
"""

from __future__ import annotations

import threading

import mlx.core as mx
import pytest

from vmetal.engine.runner.launches import Launches, wanted


@pytest.fixture
def launches():
    threaded = Launches(threaded=True)
    yield threaded
    threaded.close()


def spy_async_eval(monkeypatch, gate: threading.Event | None = None, fail: Exception | None = None) -> list[int]:
    """Record the thread of every `mx.async_eval` (waiting for `gate` first, raising `fail` instead of
    evaluating when given)."""
    threads: list[int] = []
    real = mx.async_eval

    def spy(*arrays):
        threads.append(threading.get_ident())
        if gate is not None:
            gate.wait(10)
        if fail is not None:
            raise fail
        return real(*arrays)

    monkeypatch.setattr(mx, "async_eval", spy)
    return threads


def test_a_launch_runs_on_the_launch_thread_and_its_values_are_right(launches, monkeypatch):
    threads = spy_async_eval(monkeypatch)
    with launches.stream_context():
        x = mx.arange(6, dtype=mx.float32).reshape(2, 3)
        y = (x * 2).sum(axis=1)
    ticket = launches.launch(y)
    launches.settle(upto=ticket)
    assert y.tolist() == [6.0, 24.0]
    assert threads and threading.get_ident() not in threads
    assert launches.done == 1


def test_the_caller_goes_on_while_a_launch_is_encoding(launches, monkeypatch):
    """`launch` returns before the launch thread has evaluated anything; `settle` returns only once it has."""
    gate = threading.Event()
    spy_async_eval(monkeypatch, gate=gate)
    with launches.stream_context():
        y = mx.ones((4,)) + 1
    launches.launch(y)
    assert launches.done == 0  # the thread waits on the gate
    settled = threading.Event()
    waiter = threading.Thread(target=lambda: (launches.settle(), settled.set()))
    waiter.start()
    assert not settled.wait(0.2)
    gate.set()
    waiter.join(10)
    assert settled.is_set() and launches.done == 1
    assert y.tolist() == [2.0] * 4


def test_launches_are_encoded_in_the_order_they_came(launches):
    """A step's graph takes the arrays of the step launched before it: each launch waits for the one before."""
    with launches.stream_context():
        x = mx.zeros((3,))
        steps = []
        for _ in range(20):
            x = x + 1
            steps.append(x)
            launches.launch(x)
    launches.settle()
    assert [s.tolist() for s in steps] == [[float(i)] * 3 for i in range(1, 21)]
    assert launches.done == 20


def test_settle_hands_back_what_a_launch_raised_once(launches, monkeypatch):
    spy_async_eval(monkeypatch, fail=RuntimeError("out of device memory"))
    with launches.stream_context():
        y = mx.ones((2,)) * 3
    launches.launch(y)
    with pytest.raises(RuntimeError, match="out of device memory"):
        launches.settle()
    launches.settle()  # reported once, not on every later settle


def test_without_the_thread_a_launch_is_the_callers_own(monkeypatch):
    threads = spy_async_eval(monkeypatch)
    inline = Launches(threaded=False)
    assert inline.stream is None
    y = mx.ones((2,)) * 5
    with inline.stream_context():
        assert inline.launch(y) == 0
    inline.settle()
    assert threads == [threading.get_ident()]
    assert y.tolist() == [5.0, 5.0]


@pytest.mark.parametrize(("setting", "device", "by_default", "threaded"), [
    (None, "gpu", True, True),  # auto, the MLX-managed path on a GPU
    (None, "gpu", False, False),  # auto, the paged path: measured slower with the thread
    (None, "cpu", True, False),  # auto on MLX's CPU backend, where a launch is the step's compute
    (True, "cpu", False, True),  # 1: every path, every device
    (False, "gpu", True, False),  # 0: none
])
def test_which_runners_launch_on_a_thread(setting, device, by_default, threaded):
    assert wanted(setting, device, by_default) is threaded
