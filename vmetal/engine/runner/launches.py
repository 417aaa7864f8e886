"""MLX's launches on a thread of their own, so that a decode step's launch overlaps the host's other work.

On a GPU a decode step of a small model is host work: Python builds the step's graph, then `mx.async_eval`
walks it and encodes every kernel (about as long again: 2.1 ms of a 3.3 ms `mlx_lm.generate` step of a
28-layer model on an H100), then vLLM schedules and handles outputs. One after the other on one thread, those
make the step. MLX releases the GIL while it evaluates, and a stream made by `mx.new_thread_unsafe_stream`
may be evaluated from any thread, so the decode-ahead's launch runs here on a second thread while the engine's
thread reads the previous step's tokens, goes back to vLLM and builds the step after. A draft model's forwards
(draft_model.py) and a verify forward queued ahead go the same way: the thread encodes one while the engine's
thread builds the next.

What keeps that safe (MLX puts no lock around such a stream): one thread encodes at a time (the engine's
thread calls `settle` before any evaluation of its own, and a `launch` waits for the one before it);
the engine's thread only builds graphs while a launch runs, which reads the shapes and types of the arrays it
takes, not what the evaluation changes (their events, status and inputs); and it reads a step's tokens from an
array that no later step takes as an input (`DecodeAhead`), since reading an array clears its event, which the
launch of the next step would otherwise read at the same time. A compiled function's first call traces its
inputs' graphs, so the paged path settles before one (`compiled_decode`).

`VLLM_METAL_LAUNCH_THREAD` (`wanted`): `auto` gives the MLX-managed path the thread on a GPU, where it was
measured faster; `1` gives every runner that decodes ahead one, `0` none (`Launches(threaded=False)`).
"""

from __future__ import annotations

import queue
import threading
from typing import Any


def wanted(setting: bool | None, device: str | None, by_default: bool) -> bool:
    """Whether a runner launches on a thread: VLLM_METAL_LAUNCH_THREAD's `setting` (None: `auto`), on MLX `device`,
    for a runner whose `auto` takes the thread on a GPU (`by_default`). MLX's CPU backend computes inside
    `mx.async_eval` (the launch is mostly the step's compute there, not encoding), so a thread would only have the
    next step's build and this step's compute take turns on the same cores."""
    if setting is not None:
        return setting
    return by_default and device == "gpu"


class Launches:
    def __init__(self, threaded: bool) -> None:
        import mlx.core as mx

        self.threaded = threaded
        # The stream the runner builds its graphs on: evaluated by either thread, one at a time.
        self.stream = mx.new_thread_unsafe_stream(mx.default_device()) if threaded else None
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._done = threading.Condition()
        self._submitted = self._finished = 0
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def stream_context(self) -> Any:
        """Where the runner's graphs are built (no change when not threaded)."""
        import contextlib

        import mlx.core as mx

        return mx.stream(self.stream) if self.stream is not None else contextlib.nullcontext()

    def launch(self, *arrays: Any) -> int:
        """`mx.async_eval(*arrays)`, on the launch thread when threaded, after the launches before it; the
        launch's number, for `settle`."""
        import mlx.core as mx

        if not self.threaded:
            mx.async_eval(*arrays)
            return 0
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="vmetal-launch", daemon=True)
            self._thread.start()
        with self._done:
            self._submitted += 1
            ticket = self._submitted
        self._jobs.put(arrays)
        return ticket

    def settle(self, upto: int | None = None) -> None:
        """Return once the launches so far (or up to number `upto`) have been encoded, so the engine's thread
        may evaluate again (or read what launch `upto` covered); raise what a launch raised."""
        if not self.threaded:
            return
        with self._done:
            last = self._submitted if upto is None else upto
            self._done.wait_for(lambda: self._finished >= last)
            error, self._error = self._error, None
        if error is not None:
            raise error

    @property
    def done(self) -> int:
        """Launches the thread has encoded so far."""
        return self._finished

    def close(self) -> None:
        if self._thread is not None:
            self.settle()
            self._jobs.put(None)
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        import mlx.core as mx

        while True:
            arrays = self._jobs.get()
            if arrays is None:
                return
            try:
                mx.async_eval(*arrays)
            except BaseException as e:  # noqa: BLE001 - handed to the engine's thread at its next settle
                with self._done:
                    self._error = self._error or e
            del arrays  # not held until the next launch comes
            with self._done:
                self._finished += 1
                self._done.notify_all()
