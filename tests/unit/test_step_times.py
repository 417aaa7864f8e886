"""`StepTimes`, the engine's per-step timer, on a clock the test moves: each phase lands where it belongs."""

from __future__ import annotations

import pytest

from vmetal.engine.runner import step_times
from vmetal.engine.runner.step_times import StepTimes


class Clock:
    def __init__(self) -> None:
        self.now = 100.0
        self.cpu = 5.0

    def __call__(self) -> float:
        return self.now

    def advance(self, ms: float, cpu_ms: float = 0.0) -> None:
        self.now += ms / 1e3
        self.cpu += cpu_ms / 1e3


def one_step(times: StepTimes, clock: Clock, rows: int = 4, decode: bool = True, *, vllm_ms: float = 1.0,
             build_ms: float = 2.0, launch_ms: float = 3.0, wait_ms: float = 4.0, other_ms: float = 0.5) -> None:
    """vLLM's engine loop as the worker sees it: execute_model, a gap in vLLM, sample_tokens."""
    clock.advance(vllm_ms / 2, cpu_ms=vllm_ms / 2)
    times.enter()  # execute_model
    with times.build():
        clock.advance(build_ms, cpu_ms=build_ms)
    clock.advance(other_ms, cpu_ms=other_ms)
    times.leave()
    clock.advance(vllm_ms / 2, cpu_ms=vllm_ms / 2)  # vLLM between the two calls (grammar bitmask)
    times.enter()  # sample_tokens
    with times.launch():
        clock.advance(launch_ms, cpu_ms=launch_ms)
    with times.wait():
        clock.advance(wait_ms)  # blocked: no CPU
    times.step(rows, decode)


def test_a_step_is_split_into_its_phases():
    clock = Clock()
    times = StepTimes(clock=clock, cpu_clock=lambda: clock.cpu)
    one_step(times, clock)  # the first step: what came before it is not known
    one_step(times, clock, vllm_ms=2.0)
    first, second = times.steps
    assert first.vllm is None and first.cycle is None and first.host_cpu is None
    assert second.build == pytest.approx(0.002) and second.launch == pytest.approx(0.003)
    assert second.wait == pytest.approx(0.004) and second.runner_other == pytest.approx(0.0005)
    assert second.vllm == pytest.approx(0.002)
    assert second.cycle == pytest.approx(0.0115)  # 2 + 3 + 4 + 0.5 + 2
    assert second.host_cpu == pytest.approx(0.0075)  # everything but the wait


def test_summary_is_medians_by_kind_and_rows():
    clock = Clock()
    times = StepTimes(clock=clock, cpu_clock=lambda: clock.cpu)
    one_step(times, clock, rows=1, decode=False)  # a prefill step
    for build in (1.0, 2.0, 9.0):
        one_step(times, clock, rows=32, build_ms=build)
    one_step(times, clock, rows=1)
    summary = times.summary()
    assert set(summary["decode"]) == {1, 32} and set(summary["mixed"]) == {1}
    assert summary["decode"][32]["steps"] == 3
    assert summary["decode"][32]["build_ms"] == pytest.approx(2.0)
    assert summary["decode"][32]["vllm_ms"] == pytest.approx(1.0)
    assert summary["mixed"][1] == {"steps": 1, "build_ms": pytest.approx(2.0), "launch_ms": pytest.approx(3.0),
                                   "runner_other_ms": pytest.approx(0.5), "wait_ms": pytest.approx(4.0)}
    assert "32 rows x3: 10.50 ms a step, host CPU 6.50 ms; graph build 2.00" in times.describe()
    times.clear()
    assert times.summary() == {"decode": {}, "mixed": {}}
    assert times.describe() == "vmetal decode steps, medians: none yet"


def test_a_pause_leaves_the_next_steps_gap_unknown():
    clock = Clock()
    times = StepTimes(clock=clock, cpu_clock=lambda: clock.cpu)
    one_step(times, clock)
    one_step(times, clock)
    times.enter()
    times.leave()
    times.idle()  # execute_model had nothing to run
    clock.advance(5000.0)  # the engine waits for requests
    one_step(times, clock)
    assert [s.cycle is None for s in times.steps] == [True, False, True]


def test_the_debug_log_every_few_hundred_steps(monkeypatch):
    monkeypatch.setattr(step_times, "LOG_EVERY", 3)
    clock, lines = Clock(), []
    times = StepTimes(clock=clock, cpu_clock=lambda: clock.cpu, log=lines.append)
    for _ in range(7):
        one_step(times, clock, rows=2)
    assert len(lines) == 2 and lines[0].startswith("vmetal decode steps, medians: 2 rows x3")


def test_vmetal_debug_logs_the_medians_where_vllm_s_handler_shows_them(monkeypatch, caplog):
    """VLLM_METAL_DEBUG=1 is the opt-in: its line must pass vLLM's log handler, which drops records below its
    level (INFO unless VLLM_LOGGING_LEVEL says otherwise); a DEBUG record never reached a server's log."""
    import dataclasses
    import logging

    from tests.support.runner_stubs import paged_metal_config, stub_vllm_config
    from vmetal.engine.runner.paged_runner import PagedModelRunner

    monkeypatch.setattr(step_times, "LOG_EVERY", 2)
    runner = PagedModelRunner(stub_vllm_config(), "cpu", dataclasses.replace(paged_metal_config(), debug=True))
    clock = Clock()
    runner.step_times.clock, runner.step_times.cpu_clock = clock, lambda: clock.cpu
    with caplog.at_level(logging.DEBUG, logger="vllm.vmetal"):
        for _ in range(2):
            one_step(runner.step_times, clock)
    lines = [r for r in caplog.records if "vmetal decode steps, medians" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno >= logging.INFO
    quiet = PagedModelRunner(stub_vllm_config(), "cpu", paged_metal_config())
    assert quiet.step_times.log is None
