"""Prompt logprobs (`prompt_logprobs`, `echo` with `logprobs`) in the shape vLLM's engine takes them.

A runner puts every scheduled prompt position of such a request through the LM head (its `prompt_logits`);
`PromptLogprobs` remembers who asked for how many, and fills, chunk by chunk, the per-request tensors vLLM
hands back to the client.
"""

from __future__ import annotations

from typing import Any


class PromptLogprobs:
    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        # req_id -> top-k asked for, until its prompt's logprobs are all out.
        self.wanted: dict[str, int] = {}

    def want(self, req_id: str, k: int | None) -> None:
        """Record a request's `prompt_logprobs` (None: not asked for; -1: the whole vocabulary, vLLM's
        convention)."""
        if k is not None:
            self.wanted[req_id] = self.vocab_size if k == -1 else k

    def discard(self, req_id: str) -> None:
        self.wanted.pop(req_id, None)

    def __contains__(self, req_id: str) -> bool:
        return req_id in self.wanted

    def collect(self, requests: dict[str, Any], sampler: Any, prompt_logits: dict[str, Any],
                num_scheduled: dict[str, int]) -> dict[str, Any]:
        """Each prompt position's logprob of the next prompt token, with its top-k, as vLLM returns them.

        vLLM's contract (its GPU runner does the same): the [prompt_len - 1, k + 1] tensors are filled chunk
        by chunk and handed over once, in the step after the last prompt chunk has its logits. `requests`:
        vLLM's per-request states; `sampler`: the runner's `MetalSampler`.
        """
        if not self.wanted:
            return {}
        from vllm.v1.outputs import LogprobsTensors

        out: dict[str, Any] = {}
        done = []
        for req_id, k in self.wanted.items():
            n = num_scheduled.get(req_id)
            if n is None:  # not scheduled this step (preempted while prefilling)
                continue
            state = requests[req_id]
            prompt = state.prompt_token_ids
            tensors = state.in_progress_prompt_logprobs_cpu
            if tensors is None:
                tensors = LogprobsTensors.empty_cpu(len(prompt) - 1, k + 1)
                state.in_progress_prompt_logprobs_cpu = tensors
            start = state.num_computed_tokens
            count = len(prompt) - 1 - start
            if n <= count:
                count = n
            else:
                done.append(req_id)
                out[req_id] = tensors
            if count <= 0:
                continue
            got = sampler.prompt_logprobs(prompt_logits[req_id][:count], k, prompt[start + 1 : start + 1 + count])
            rows = slice(start, start + count)
            tensors.logprob_token_ids[rows] = got.logprob_token_ids
            tensors.logprobs[rows] = got.logprobs
            tensors.selected_token_ranks[rows] = got.selected_token_ranks
        for req_id in done:
            del self.wanted[req_id]
            requests[req_id].in_progress_prompt_logprobs_cpu = None
        return out
