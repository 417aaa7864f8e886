"""Decode ahead: the next decode forward queued before control returns to vLLM.

MLX computes on its own thread; vLLM's per-step Python (output handling, scheduling) would otherwise run while
that thread idles. So once a step's tokens are known (or, better, while they are still a lazy argmax), the next
decode forward of the same rows is queued with `mx.async_eval`, as mlx-lm's generate loop does. The next step
uses it when vLLM schedules exactly those rows for one token each, fed the tokens it was built on (the steady
state); otherwise the runner undoes what the queued step wrote and runs the step as usual.

`DecodeAhead` only keeps the queued step and builds it from what it is given; the runner decides when a step
can be built ahead (its `forward`) and whether the queued one is usable (`Ahead.matches`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from vmetal.engine.runner.launches import Launches
from vmetal.engine.runner.step_times import StepTimes


@dataclass(frozen=True)
class Ahead:
    """A decode step queued ahead: rows `order` fed `tokens`, their lazy [B, V] `logits` and `greedy` argmax,
    `feed` (the argmax again, what the step after is built on, so that reading `greedy` races with no launch:
    launches.py) and the number of the launch that covers them."""

    order: tuple[str, ...]
    tokens: tuple[int, ...]
    logits: Any
    greedy: Any
    feed: Any = None
    launched: int = 0

    def matches(self, order: Sequence[str], next_token: Callable[[str], int]) -> bool:
        """This is the step of rows `order`, each fed what it was built on (`next_token(req_id)`)."""
        return self.order == tuple(order) and all(next_token(r) == t for r, t in zip(self.order, self.tokens))


@dataclass(frozen=True)
class VerifyAhead:
    """A speculating request's verify forward queued ahead: its cache fed `token` at position `start`, then
    `drafts` (lazy or host int32 [k], what the drafter proposed), with the lazy [k + 1, V] `logits` of those
    positions. Built at the end of the step that sampled `token`, behind the drafter's own forwards, so the
    device verifies while vLLM handles the step's output and schedules the next (mlx-lm's speculative loop
    builds its draft and verify forwards into one wait the same way)."""

    start: int
    token: int
    drafts: Any
    logits: Any

    def matches(self, start: int, fed: Sequence[int]) -> bool:
        """This is the forward of a step that feeds `fed` from position `start`."""
        if start != self.start or len(fed) != len(self.drafts) + 1 or fed[0] != self.token:
            return False
        drafts = self.drafts if isinstance(self.drafts, list) else self.drafts.tolist()
        return list(fed[1:]) == drafts


class DecodeAhead:
    def __init__(self, times: StepTimes | None = None, launches: Launches | None = None) -> None:
        self.pending: Ahead | None = None
        self.times = times or StepTimes()  # its launches and its blocking read of the tokens are timed
        # MLX's launches (launches.py); the runner swaps in a launch thread's once the model is loaded.
        self.launches = launches or Launches(threaded=False)

    def take(self) -> Ahead | None:
        """The queued step, which is no longer queued."""
        pending, self.pending = self.pending, None
        return pending

    def queue(self, order: Sequence[str], tokens: Sequence[int], logits: Any) -> None:
        """Queue the step whose (lazy) `logits` were built for rows `order` fed `tokens`."""
        greedy, feed = _argmax(logits)
        with self.times.launch():
            launched = self.launches.launch(logits, greedy, feed)
        self.pending = Ahead(tuple(order), tuple(tokens), logits, greedy, feed, launched)

    def argmax_feeding_next(self, order: tuple[str, ...], batch_logits: Any, ahead: Ahead | None,
                            forward: Callable[[tuple[str, ...], Any], Any], req_ids: Sequence[str]) -> list[int]:
        """Greedy tokens (in `req_ids` order) of an all-decode step of rows `order` (the decode-ahead
        `ahead`, or None: `batch_logits` not launched yet), with the next step queued.

        mlx-lm's loop: the next forward (`forward(order, tokens)`, None when it cannot be built) is built on
        the still-lazy argmax and queued before the host waits for the tokens, so MLX computes while Python
        builds graphs and vLLM does its per-step work. Building the graph after `.tolist()` instead leaves
        the device idle for the whole graph build each step (about 3 ms for a 28-layer model). The tokens
        come from a launch of their own, issued before the next step's: on MLX's GPU backends `.tolist()` of
        an array evaluated as an intermediate of a later launch waits for that whole later graph. With a
        launch thread the next step's graph is built while this step's launch may still be encoding, and
        queued to the thread: the host reads this step's tokens while the thread encodes the next.
        """
        if ahead is None:
            greedy, feed = _argmax(batch_logits)
            with self.times.launch():
                launched = self.launches.launch(greedy, feed)
        else:
            greedy, feed, launched = ahead.greedy, ahead.feed, ahead.launched
        logits = forward(order, feed)
        if logits is not None:
            next_greedy, next_feed = _argmax(logits)
            with self.times.launch():
                next_launched = self.launches.launch(logits, next_greedy, next_feed)
        with self.times.wait():
            self.launches.settle(upto=launched)
            values = greedy.tolist()
        self.pending = None if logits is None else Ahead(order, tuple(values), logits, next_greedy, next_feed,
                                                         next_launched)
        by_req = dict(zip(order, values))
        return [by_req[r] for r in req_ids]


def _argmax(logits: Any) -> tuple[Any, Any]:
    """Greedy tokens of [B, V] logits, lazily, as the int32 ids a decode step takes: twice, one array for the
    host to read and one for the next step to take (Ahead.feed)."""
    import mlx.core as mx

    greedy = mx.argmax(logits, axis=-1).astype(mx.int32)
    return greedy, mx.stop_gradient(greedy)
