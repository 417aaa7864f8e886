"""The decode-ahead bookkeeping (`vmetal.engine.runner.decode_ahead`): the queued step is handed out once,
matched only against the very step it was built for, and the greedy tokens of an all-decode step come back in
vLLM's row order while the next step is built on them; a speculating request's verify forward queued ahead is
matched only against the step that feeds what it was built on.

Logits are small hand-written MLX arrays whose argmax is known; no model runs.
"""

from __future__ import annotations

import mlx.core as mx
import pytest

from vmetal.engine.runner.decode_ahead import Ahead, DecodeAhead, VerifyAhead

# Row r's logits peak at column PEAK[r] (vocabulary of 8).
PEAK = {"a": 5, "b": 2, "c": 7}


def logits_peaking_at(columns: list[int], vocab: int = 8) -> mx.array:
    rows = [[0.0] * vocab for _ in columns]
    for row, col in zip(rows, columns, strict=True):
        row[col] = 3.0
        row[(col + 1) % vocab] = 1.0  # a runner-up, so the argmax is not just "the only non-zero"
    return mx.array(rows)


def test_take_returns_the_queued_step_once():
    """`queue` then `take` gives back that step (rows, fed tokens, logits and their argmax), and a second
    `take` finds nothing: a queued step is used at most once."""
    ahead = DecodeAhead()
    assert ahead.take() is None
    logits = logits_peaking_at([PEAK["a"], PEAK["b"]])
    ahead.queue(["a", "b"], [11, 12], logits)
    step = ahead.take()
    assert isinstance(step, Ahead)
    assert step.order == ("a", "b") and step.tokens == (11, 12)
    assert step.logits is logits
    assert step.greedy.dtype == mx.int32 and step.greedy.tolist() == [PEAK["a"], PEAK["b"]]
    assert ahead.pending is None
    assert ahead.take() is None


def test_queue_replaces_an_unused_step():
    """Queueing again drops the older step: only the latest can match the next scheduled step."""
    ahead = DecodeAhead()
    ahead.queue(["a"], [1], logits_peaking_at([1]))
    ahead.queue(["b"], [2], logits_peaking_at([2]))
    assert ahead.take().order == ("b",)


@pytest.mark.parametrize(("order", "next_tokens", "matches"), [
    (("a", "b"), {"a": 11, "b": 12}, True),
    (["a", "b"], {"a": 11, "b": 12}, True),  # a list of the same rows
    (("b", "a"), {"a": 11, "b": 12}, False),  # same rows, other order
    (("a",), {"a": 11, "b": 12}, False),  # a row dropped
    (("a", "b", "c"), {"a": 11, "b": 12, "c": 13}, False),  # a row added
    (("a", "b"), {"a": 11, "b": 99}, False),  # a row fed another token (e.g. a sampled, not greedy, one)
    (("a", "b"), {"a": 99, "b": 12}, False),
])
def test_ahead_matches_only_the_same_rows_fed_the_same_tokens(order, next_tokens, matches):
    """A queued step is usable only for exactly its rows, in its order, each fed the token it was built on;
    anything else would hand a request logits computed for another request or another token."""
    step = Ahead(("a", "b"), (11, 12), logits=None, greedy=None)
    assert step.matches(order, next_tokens.__getitem__) is matches


class RecordingForward:
    """A stand-in for a runner's `_ahead_forward`: records what it was fed, returns `result`."""

    def __init__(self, result):
        self.result = result
        self.calls = []
        self.fed = []  # the arrays themselves

    def __call__(self, order, tokens):
        self.fed.append(tokens)
        self.calls.append((order, tokens.tolist()))
        return self.result


def test_argmax_feeding_next_returns_tokens_in_req_ids_order_and_queues_the_next_step():
    """The greedy tokens come back in vLLM's input-batch order (`req_ids`), not the pack's row order; the
    next step is built by `forward` on exactly those tokens in row order and queued with its own argmax."""
    order = ("c", "a", "b")  # the pack's row order
    req_ids = ["a", "b", "c"]  # vLLM's
    batch_logits = logits_peaking_at([PEAK[r] for r in order])
    next_logits = logits_peaking_at([1, 4, 6])
    forward = RecordingForward(next_logits)
    ahead = DecodeAhead()

    tokens = ahead.argmax_feeding_next(order, batch_logits, None, forward, req_ids)

    assert tokens == [PEAK["a"], PEAK["b"], PEAK["c"]]
    assert forward.calls == [(order, [PEAK[r] for r in order])]
    step = ahead.take()
    assert step.order == order
    assert step.tokens == tuple(PEAK[r] for r in order)
    assert step.logits is next_logits
    assert step.greedy.tolist() == [1, 4, 6]
    # The queued step is the one a runner will find when vLLM schedules those rows fed those tokens.
    assert step.matches(order, PEAK.__getitem__)


def test_argmax_feeding_next_uses_the_given_argmax():
    """When the step came from a queued one, its argmax is already computed: the host reads that one (`greedy`)
    and the next step is built on its copy (`feed`), not on a recomputation from the logits."""
    order = ("a", "b")
    batch_logits = logits_peaking_at([0, 0])
    greedy = mx.array([3, 6], dtype=mx.int32)
    queued = Ahead(order, (1, 1), batch_logits, greedy, feed=mx.array([3, 6], dtype=mx.int32))
    forward = RecordingForward(logits_peaking_at([1, 1]))
    tokens = DecodeAhead().argmax_feeding_next(order, batch_logits, queued, forward, ["b", "a"])
    assert tokens == [6, 3]
    assert forward.calls == [(order, [3, 6])]
    assert forward.fed[0] is queued.feed


def test_the_next_step_is_built_on_an_array_the_host_never_reads():
    """Reading an MLX array clears its event, which a launch thread's evaluation of a step taking that array as
    an input reads at the same time (launches.py): the tokens the host reads and the ones the next step is
    built on are two arrays of the same values, here and in the step queued for the one after."""
    order = ("a", "b")
    forward = RecordingForward(logits_peaking_at([1, 4]))
    ahead = DecodeAhead()
    ahead.argmax_feeding_next(order, logits_peaking_at([PEAK["a"], PEAK["b"]]), None, forward, list(order))
    queued = ahead.take()
    assert queued.greedy is not queued.feed
    assert queued.greedy.tolist() == queued.feed.tolist() == [1, 4]
    fed_now = forward.fed[0]
    forward2 = RecordingForward(None)
    DecodeAhead().argmax_feeding_next(order, queued.logits, queued, forward2, list(order))
    assert forward2.fed[0] is queued.feed and forward2.fed[0] is not queued.greedy
    assert fed_now.tolist() == [PEAK["a"], PEAK["b"]]


def test_nothing_is_queued_when_the_next_step_cannot_be_built():
    """`forward` returning None (e.g. no scratch block left) leaves nothing queued, not a stale step, and the
    tokens are still returned."""
    ahead = DecodeAhead()
    ahead.queue(["a"], [1], logits_peaking_at([1]))  # a stale step from before
    forward = RecordingForward(None)
    tokens = ahead.argmax_feeding_next(("a", "b"), logits_peaking_at([PEAK["a"], PEAK["b"]]), None, forward,
                                       ["b", "a"])
    assert tokens == [PEAK["b"], PEAK["a"]]
    assert len(forward.calls) == 1
    assert ahead.take() is None


@pytest.mark.parametrize("drafts", [[4, 5, 6], mx.array([4, 5, 6], dtype=mx.int32)], ids=["host", "lazy"])
@pytest.mark.parametrize("start, fed, matches", [
    (20, [9, 4, 5, 6], True),  # the step vLLM schedules in the steady state: the drafts as proposed
    (21, [9, 4, 5, 6], False),  # another position: the request's cache moved on
    (20, [8, 4, 5, 6], False),  # another token before the drafts
    (20, [9, 4, 5], False),  # drafts cut short by the step's token budget
    (20, [9, 4, 0, 6], False),  # a draft vLLM replaced by its -1 placeholder (fed as 0)
    (20, [9], False),  # no drafts scheduled
])
def test_a_verify_ahead_matches_only_the_step_feeding_what_it_was_built_on(drafts, start, fed, matches):
    """Used when vLLM schedules the token and drafts it was built on from its position, whether the drafts are
    host ints (n-gram lookup) or the draft model's MLX array; any other step rolls it back."""
    ahead = VerifyAhead(start=20, token=9, drafts=drafts, logits=logits_peaking_at([1, 2, 3, 4]))
    assert ahead.matches(start, fed) is matches
