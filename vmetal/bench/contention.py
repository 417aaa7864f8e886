"""CPU that other processes use while a benchmark times something, read from Linux's /proc.

On a shared box another session's test run can halve a benchmark's numbers without leaving a trace in them.
So each timed run is bracketed by a `CpuWatch`: what the whole machine used, minus what this process and its
descendants (the engine, the servers it started) used, is the other processes' share, in cores. A report
marks runs above a threshold as contended, and `quiet_wait` lets a run start in a quiet moment.

Where /proc is missing (macOS) nothing is measured and every run reads as uncontended.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import NamedTuple

CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


class Mark(NamedTuple):
    """Where a timed run began: wall clock, the machine's busy ticks, this process tree's ticks."""

    wall: float
    busy: int
    own: int


def process_tree_ticks(root: int) -> int:
    """User + system clock ticks (all threads) of `root` and every process descended from it."""
    stats: dict[int, tuple[int, int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/stat").read_text()
        except OSError:  # the process ended while we listed
            continue
        fields = raw[raw.rfind(")") + 2:].split()  # after the command name, which may hold spaces
        stats[int(entry)] = (int(fields[1]), int(fields[11]) + int(fields[12]))  # ppid, utime + stime
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += stats.get(pid, (0, 0))[1]
        todo.extend(children.get(pid, []))
    return total


def machine_busy_ticks() -> int:
    """Clock ticks every CPU of the machine spent on anything but idle and I/O wait, since boot."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(ticks) - ticks[3] - (ticks[4] if len(ticks) > 4 else 0)


class CpuWatch:
    """`mark = watch.start()` before a timed run, `watch.stop(mark)` after: other processes' cores."""

    def __init__(self) -> None:
        self.ok = Path("/proc/stat").is_file()

    def start(self) -> Mark | None:
        if not self.ok:
            return None
        return Mark(time.perf_counter(), machine_busy_ticks(), process_tree_ticks(os.getpid()))

    def measure(self, mark: Mark | None) -> tuple[float, float]:
        """(cores other processes used, cores this process tree used) since `mark`; (0, 0) without /proc."""
        if mark is None:
            return 0.0, 0.0
        wall = time.perf_counter() - mark.wall
        busy, own = machine_busy_ticks(), process_tree_ticks(os.getpid())
        if wall <= 0:
            return 0.0, 0.0
        foreign = max(0, (busy - mark.busy) - (own - mark.own))
        return foreign / CLOCK_TICKS / wall, (own - mark.own) / CLOCK_TICKS / wall

    def stop(self, mark: Mark | None) -> float:
        return self.measure(mark)[0]


def quiet_wait(watch: CpuWatch, max_foreign: float, seconds: float) -> None:
    """Wait, up to `seconds`, for a half-second in which other processes use at most half of `max_foreign`."""
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        mark = watch.start()
        time.sleep(0.5)
        if watch.stop(mark) <= max_foreign / 2:
            return
