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

from vmetal.engine.runner.step_times import StepTimes


@dataclass(frozen=True)
class Ahead:
    """A decode step queued ahead: rows `order` fed `tokens`, their lazy [B, V] `logits` and `greedy` argmax."""

    order: tuple[str, ...]
    tokens: tuple[int, ...]
    logits: Any
    greedy: Any

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
    def __init__(self, times: StepTimes | None = None) -> None:
        self.pending: Ahead | None = None
        self.times = times or StepTimes()  # its async_evals and its blocking read of the tokens are timed

    def take(self) -> Ahead | None:
        """The queued step, which is no longer queued."""
        pending, self.pending = self.pending, None
        return pending

    def queue(self, order: Sequence[str], tokens: Sequence[int], logits: Any) -> None:
        """Queue the step whose (lazy) `logits` were built for rows `order` fed `tokens`."""
        import mlx.core as mx

        greedy = _argmax(logits)
        with self.times.launch():
            mx.async_eval(logits, greedy)
        self.pending = Ahead(tuple(order), tuple(tokens), logits, greedy)

    def argmax_feeding_next(self, order: tuple[str, ...], batch_logits: Any, greedy: Any,
                            forward: Callable[[tuple[str, ...], Any], Any], req_ids: Sequence[str]) -> list[int]:
        """Greedy tokens (in `req_ids` order) of an all-decode step of rows `order`, with the next step queued.

        mlx-lm's loop: the next forward (`forward(order, tokens)`, None when it cannot be built) is built on
        the still-lazy argmax and queued before the host waits for the tokens, so MLX computes while Python
        builds graphs and vLLM does its per-step work. Building the graph after `.tolist()` instead leaves
        the device idle for the whole graph build each step (about 3 ms for a 28-layer model). The tokens
        come from an `async_eval` of their own, issued before the next step's: on MLX's GPU backends
        `.tolist()` of an array evaluated as an intermediate of a later `async_eval` waits for that whole
        later graph.
        """
        import mlx.core as mx

        if greedy is None:
            greedy = _argmax(batch_logits)
            with self.times.launch():
                mx.async_eval(greedy)
        logits = forward(order, greedy)
        next_greedy = None
        if logits is not None:
            next_greedy = _argmax(logits)
            with self.times.launch():
                mx.async_eval(logits, next_greedy)
        with self.times.wait():
            values = greedy.tolist()
        self.pending = None if logits is None else Ahead(order, tuple(values), logits, next_greedy)
        by_req = dict(zip(order, values))
        return [by_req[r] for r in req_ids]


def _argmax(logits: Any) -> Any:
    """Greedy tokens of [B, V] logits, lazily, as the int32 ids a decode step takes."""
    import mlx.core as mx

    return mx.argmax(logits, axis=-1).astype(mx.int32)
