"""Speculative decoding by n-gram lookup (prompt lookup): vLLM proposes, the MLX runner verifies (a draft model
proposes instead in draft_model.py; verification is shared).

vLLM's engine drives it: after each step it asks the worker for draft tokens (`take_draft_token_ids`), the
scheduler sends them back the next step as `scheduled_spec_decode_tokens`, one more scheduled position per
draft, and reads the tokens the runner returns for the request as the accepted ones (fewer than drafts + 1:
it counts the rest as rejected, rolls `num_computed_tokens` back and reports both in `/metrics`).

- The drafts come from vLLM's own `NgramProposer` (the last n tokens looked up earlier in the sequence; numba,
  on the host), fed the input batch's token rows as vLLM's GPU runner feeds it.
- Verification is ours. vLLM's `RejectionSampler` is written in Triton, which has no CPU or Metal backend. For a
  greedy request it reduces to a comparison, done here: the forward over the last token and the drafts gives the
  target's argmax at each position; the drafts are accepted while they equal it, and the first argmax that
  differs (or the one after the last draft) is the step's own token. The output is then exactly the tokens
  decoding one at a time would give.
- A sampled request (temperature, top-k, top-p) is verified by rejection sampling against the
  distribution vLLM's sampler would draw from at each position (`target_probs`: the same steps in the same
  order, vLLM's own top-k/top-p function). A draft from n-gram lookup is one token proposed with certainty, so
  the rule reduces to: accept draft d with probability p(d); at the first rejection draw from p with d removed;
  after the last draft draw the bonus token from the next position's p. The tokens then have exactly the
  distribution one-at-a-time sampling gives (tests/unit/test_rejection_sampling.py checks it exactly, and the
  engine test by frequencies), not the same tokens: a seeded request stays reproducible, drawing from its own
  generator.
- Requests with logprobs, penalties, logit bias, allowed or banned tokens, min_tokens or a grammar get no
  drafts: their distribution depends on what vLLM's sampler sees beyond the logits. They decode one token a step
  with the tokens they get without speculation.
- The rejected positions' KV is rolled back by trimming the request's own cache to what vLLM counts as
  computed (`MlxModelRunner._cache_for_prefill`), so a model whose cache cannot trim (a sliding window that
  wraps, a recurrent state) is refused. On the paged path (n-gram or a draft model's drafts) nothing is rolled
  back: vLLM counts a rejected position as not computed, and the step that computes it writes its slot again
  (`PagedModelRunner._pack` lays a speculating request's verify positions out as query rows).
"""

from __future__ import annotations

import contextlib
from typing import Any


def accepted_tokens(drafts: list[int], targets: list[int]) -> list[int]:
    """The step's tokens: `targets[i]` (the target's greedy token after the i-th fed position) for each draft
    it agrees with, then the first one that differs, or the one after the last draft."""
    out = []
    for draft, target in zip(drafts, targets):
        out.append(target)
        if draft != target:
            return out
    out.append(targets[len(drafts)])
    return out


def verifiable(params: Any) -> str | None:
    """How a request's drafts are verified: "greedy", "sampled", or None when it may not speculate."""
    if params is None or getattr(params, "structured_outputs", None) is not None:
        return None
    from vllm.sampling_params import SamplingType

    if (params.logprobs is not None or params.presence_penalty != 0.0 or params.frequency_penalty != 0.0
            or params.repetition_penalty != 1.0 or params.logit_bias or params.min_tokens
            or params.allowed_token_ids or params.bad_words_token_ids):
        return None
    return "greedy" if params.sampling_type == SamplingType.GREEDY else "sampled"


def target_probs(logits: Any, params: Any) -> Any:
    """torch [rows, V] float32: the distribution vLLM's sampler draws each row's token from, for `params`
    (temperature, then top-k and top-p, as vllm/v1/sample/sampler.py orders them; vLLM refuses min_p and
    logit_bias when speculating)."""
    import mlx.core as mx
    import numpy as np
    import torch
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p_pytorch

    scores = torch.from_numpy(np.array(logits.astype(mx.float32))) / params.temperature
    rows, vocab = scores.shape
    top_k = params.top_k if 0 < params.top_k < vocab else None
    top_p = params.top_p if params.top_p < 1.0 else None
    if top_k is not None or top_p is not None:
        scores = apply_top_k_top_p_pytorch(
            scores, None if top_k is None else torch.full((rows,), top_k, dtype=torch.long),
            None if top_p is None else torch.full((rows,), top_p, dtype=torch.float32), allow_cpu_sync=True)
    return scores.softmax(dim=-1)


def rejection_sample(drafts: list[int], probs: Any, generator: Any = None) -> list[int]:
    """The step's tokens for drafts proposed with certainty, given the target's distributions `probs`
    [drafts + 1, V] after each fed position: accepted drafts, then one drawn token (see the module's text).
    A draft < 0 (vLLM's placeholder) is a draft with probability 0: always rejected."""
    import torch

    out: list[int] = []
    for i, draft in enumerate(drafts):
        row = probs[i]
        if draft >= 0 and torch.rand((), generator=generator) < row[draft]:
            out.append(draft)
            continue
        if draft >= 0:
            row = row.clone()
            row[draft] = 0.0  # the residual max(p - q, 0) when q is all on `draft`
        out.append(int(torch.multinomial(row, 1, generator=generator)))
        return out
    out.append(int(torch.multinomial(probs[len(drafts)], 1, generator=generator)))
    return out


def greedy_targets(logits: list[Any], wait: Any = contextlib.nullcontext) -> list[list[int]]:
    """The argmax of each row of each of `logits` ([k + 1, V] per request), read in one wait (`wait`: a
    context around it, step_times.py)."""
    import mlx.core as mx

    rows = [mx.argmax(x, axis=-1) for x in logits]
    with wait():
        mx.eval(rows)
    return [r.tolist() for r in rows]


class NgramDrafter:
    """vLLM's n-gram proposer, fed from the runner's input batch after each step."""

    # The drafts are a host lookup, so the runner queues their verify forward at the end of the step that
    # sampled the token they follow (decode_ahead.VerifyAhead), to run while vLLM handles that step's output.
    queue_ahead = True

    def __init__(self, vllm_config: Any):
        from vllm.v1.spec_decode.ngram_proposer import NgramProposer

        self.num_tokens = vllm_config.speculative_config.num_speculative_tokens
        self.proposer = NgramProposer(vllm_config)
        self.last: tuple[list[str], list[list[int]]] | None = None  # the step's (row order, tokens per row)
        self.queued: Any = None  # the DraftTokenIds `start` looked up

    def forget(self, req_id: str) -> None:
        """A request finished: nothing of it is kept here."""

    def start(self, input_batch: Any, eligible: Any) -> dict[str, list[int]]:
        """Look up the drafts for the rows of the last step (`eligible(req_id)`: whether a row may get drafts)
        at the end of that step, so the runner can queue their verify forward before vLLM's output handling
        (decode_ahead.VerifyAhead): {req_id: its drafts} for the rows that got any; `propose` returns them."""
        from vllm.v1.outputs import DraftTokenIds

        if self.last is None:
            return {}
        req_ids, sampled = self.last
        self.last = None
        # A row without a sampled token (a partial prompt chunk) gets no drafts; the proposer skips it.
        sampled = [tokens if tokens and eligible(req_id) else [] for req_id, tokens in zip(req_ids, sampled)]
        drafts = [list(d) for d in self.proposer.propose(self.num_tokens, sampled, input_batch.num_tokens_no_spec,
                                                         input_batch.token_ids_cpu)]
        self.queued = DraftTokenIds(req_ids, drafts)
        return {req_id: d for req_id, d in zip(req_ids, drafts) if d}

    def propose(self, input_batch: Any, eligible: Any) -> Any:
        """vLLM's DraftTokenIds for the rows of the last step (looked up by `start` if the runner did not), or
        None when no step ran since the last call."""
        if self.queued is None:
            self.start(input_batch, eligible)
        queued, self.queued = self.queued, None
        return queued
