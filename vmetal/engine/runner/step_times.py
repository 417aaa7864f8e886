"""Where an engine step's time goes: building MLX graphs, handing them to MLX, the runner's other host work,
waiting on MLX, and vLLM's own work between the runner's calls (scheduling, output processing, detokenising).

On a GPU every engine here is bound by host work and per-op launches, not by memory, so the host time of a
step is the figure that carries over to Apple silicon: a decode step whose host work exceeds the device's
share cannot run at the device's speed, however fast its kernels are. MLX computes on its own thread, so
what the host spends building the next graph overlaps the device's work (decode-ahead), and the wait on MLX
is what is left of the device's time once the host is done.

The worker marks where vLLM hands it a step and takes it back (`enter`/`leave` around `execute_model` and
`sample_tokens`); the runners mark their model calls (`build`: Python building the lazy graph), their
`mx.async_eval` calls (`launch`: on a GPU, encoding and launching the kernels; on MLX's CPU backend the call
also runs queued ops itself once too many are in flight, so there it holds much of the compute) and their
blocking reads of MLX results (`wait`). Beside those wall-clock spans, `host_cpu` is the CPU time the
engine's thread spent over the whole step cycle (vLLM's part included): host work, measured, with every wait
left out, which is the figure the GPU targets are stated in. Every step is recorded (a few `perf_counter` calls); `summary` gives medians per kind of step and
batch size, for `LLM.collective_rpc("step_times")`, benchmarks/bench_host.py and the log line that
`VLLM_METAL_DEBUG=1` prints every `LOG_EVERY` steps.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

KEEP = 4096  # steps kept for the summary: the most recent ones
LOG_EVERY = 256
PHASES = ("build", "launch", "runner_other", "wait", "vllm", "cycle", "host_cpu")


@dataclass(frozen=True)
class Step:
    rows: int  # requests in the step
    decode: bool  # every row decodes one token
    build: float  # seconds building MLX graphs (model calls), this step's and any queued ahead
    launch: float  # seconds in mx.async_eval
    wait: float  # seconds blocked on MLX results
    runner: float  # seconds inside execute_model + sample_tokens
    # Since the previous step's sample_tokens returned (None: not known, the first step after a pause):
    vllm: float | None  # seconds in vLLM
    cycle: float | None  # seconds in all, wall clock
    host_cpu: float | None  # CPU seconds of this thread

    @property
    def runner_other(self) -> float:
        return self.runner - self.build - self.launch - self.wait


class StepTimes:
    def __init__(self, clock: Callable[[], float] = time.perf_counter, keep: int = KEEP,
                 log: Callable[[str], None] | None = None,
                 cpu_clock: Callable[[], float] = time.thread_time) -> None:
        self.clock = clock
        self.cpu_clock = cpu_clock
        self.steps: deque[Step] = deque(maxlen=keep)
        self.log = log
        self._build = self._launch = self._wait = self._runner = 0.0
        self._in_vllm = 0.0
        self._gap_known = True  # vLLM's time before this step was seen from its start
        self._entered: float | None = None
        self._left: float | None = None  # when the runner last gave control back to vLLM
        self._cycle_start: tuple[float, float] | None = None  # (wall, thread CPU) when the last step ended
        self._counted = 0

    # ------------------------------------------------------------- marks
    def build(self) -> contextlib.AbstractContextManager[None]:
        return self._span("_build")

    def launch(self) -> contextlib.AbstractContextManager[None]:
        return self._span("_launch")

    def wait(self) -> contextlib.AbstractContextManager[None]:
        return self._span("_wait")

    @contextlib.contextmanager
    def _span(self, phase: str) -> Iterator[None]:
        start = self.clock()
        try:
            yield
        finally:
            setattr(self, phase, getattr(self, phase) + self.clock() - start)

    def enter(self) -> None:
        """vLLM calls into the runner (execute_model or sample_tokens)."""
        now = self.clock()
        if self._left is not None:
            self._in_vllm += now - self._left
        else:
            self._gap_known = False
        self._entered = now

    def leave(self) -> None:
        now = self.clock()
        if self._entered is not None:
            self._runner += now - self._entered
        self._entered = None
        self._left = now

    def step(self, rows: int, decode: bool) -> None:
        """sample_tokens finished a step of `rows` requests (`decode`: each decoded one token)."""
        self.leave()
        now, cpu = self.clock(), self.cpu_clock()
        known = self._gap_known and self._cycle_start is not None
        self.steps.append(Step(rows, decode, self._build, self._launch, self._wait, self._runner,
                               self._in_vllm if known else None,
                               now - self._cycle_start[0] if known else None,
                               cpu - self._cycle_start[1] if known else None))
        self._cycle_start = (now, cpu)
        self._reset()
        self._counted += 1
        if self.log is not None and self._counted % LOG_EVERY == 0:
            self.log(self.describe())

    def idle(self) -> None:
        """No step ran (nothing scheduled): the next step's vLLM time is not known from its start."""
        self._left = None
        self._cycle_start = None
        self._reset()

    def _reset(self) -> None:
        self._build = self._launch = self._wait = self._runner = self._in_vllm = 0.0
        self._gap_known = True

    # ------------------------------------------------------------- reading
    def summary(self) -> dict[str, dict[int, dict[str, float]]]:
        """{"decode" | "mixed": {rows: {"steps": n, PHASE_ms: median, ...}}} over the steps kept."""
        groups: dict[tuple[str, int], list[Step]] = {}
        for s in self.steps:
            groups.setdefault(("decode" if s.decode else "mixed", s.rows), []).append(s)
        out: dict[str, dict[int, dict[str, float]]] = {"decode": {}, "mixed": {}}
        for (kind, rows), steps in sorted(groups.items()):
            timed = [s for s in steps if s.cycle is not None] or steps
            row: dict[str, float] = {"steps": len(steps)}
            for phase in PHASES:
                values = [getattr(s, phase) for s in timed if getattr(s, phase) is not None]
                if values:
                    row[f"{phase}_ms"] = statistics.median(values) * 1e3
            out[kind][rows] = row
        return out

    def clear(self) -> None:
        self.steps.clear()

    def describe(self) -> str:
        """One line per batch size of the decode steps kept (medians), for the debug log."""
        parts = []
        for rows, r in self.summary()["decode"].items():
            if "cycle_ms" in r:
                parts.append(f"{rows} rows x{int(r['steps'])}: {r['cycle_ms']:.2f} ms a step, host CPU "
                             f"{r['host_cpu_ms']:.2f} ms; graph build {r['build_ms']:.2f}, launch "
                             f"{r['launch_ms']:.2f}, runner other {r['runner_other_ms']:.2f}, vLLM "
                             f"{r['vllm_ms']:.2f}, MLX wait {r['wait_ms']:.2f}")
        return "vmetal decode steps, medians: " + ("; ".join(parts) or "none yet")
