"""Speculative decoding by n-gram lookup (prompt lookup): vLLM proposes, the MLX runner verifies.

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
- Only greedy requests without logprobs, penalties or a grammar get drafts. A sampled request would need
  rejection sampling over vLLM's processed distribution to keep its output distribution; it decodes one token
  a step as before (its tokens are those it gets without speculation).
- The rejected positions' KV is rolled back by trimming the request's own cache to what vLLM counts as
  computed (`MlxModelRunner._cache_for_prefill`), so a model whose cache cannot trim (a sliding window that
  wraps, a recurrent state) is refused.
"""

from __future__ import annotations

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


def greedy_targets(logits: Any) -> list[int]:
    """The argmax of each row of `logits` [k + 1, V]."""
    import mlx.core as mx

    return mx.argmax(logits, axis=-1).tolist()


class NgramDrafter:
    """vLLM's n-gram proposer, fed from the runner's input batch after each step."""

    def __init__(self, vllm_config: Any):
        from vllm.v1.spec_decode.ngram_proposer import NgramProposer

        self.num_tokens = vllm_config.speculative_config.num_speculative_tokens
        self.proposer = NgramProposer(vllm_config)
        self.last: tuple[list[str], list[list[int]]] | None = None  # the step's (row order, tokens per row)

    def propose(self, input_batch: Any, eligible: Any) -> Any:
        """vLLM's DraftTokenIds for the rows of the last step (`eligible(req_id)`: whether a row may get
        drafts), or None when no step ran since the last call."""
        from vllm.v1.outputs import DraftTokenIds

        if self.last is None:
            return None
        req_ids, sampled = self.last
        self.last = None
        # A row without a sampled token (a partial prompt chunk) gets no drafts; the proposer skips it.
        sampled = [tokens if tokens and eligible(req_id) else [] for req_id, tokens in zip(req_ids, sampled)]
        drafts = self.proposer.propose(self.num_tokens, sampled, input_batch.num_tokens_no_spec,
                                       input_batch.token_ids_cpu)
        return DraftTokenIds(req_ids, [list(d) for d in drafts])
