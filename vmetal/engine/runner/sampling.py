"""Sampling: greedy stays in MLX, everything else goes through vLLM's own Sampler.

vLLM's `Sampler` already implements every SamplingParams field the OpenAI API
exposes (temperature, top-p/k, min-p, seeds, penalties, logit bias, min tokens,
allowed/bad words, logprobs), driven by the `SamplingMetadata` that vLLM's
`InputBatch` builds. Re-implementing that would only add bugs, so the runner
keeps an `InputBatch` and hands logits to the sampler on the CPU torch device
(never MPS: its `exponential_()` has returned exact zeros).
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np


def needs_torch_sampler(params: Any) -> bool:
    """True when a request's params change the argmax or ask for logprobs."""
    if params is None:
        return False
    from vllm.sampling_params import SamplingType

    return bool(
        params.sampling_type != SamplingType.GREEDY
        or params.logprobs is not None
        or params.presence_penalty != 0.0
        or params.frequency_penalty != 0.0
        or params.repetition_penalty != 1.0
        or params.logit_bias
        or params.min_tokens
        or params.allowed_token_ids
        or params.bad_words_token_ids
    )


class MetalSampler:
    def __init__(self, logprobs_mode: str = "raw_logprobs"):
        from vllm.v1.sample.sampler import Sampler

        self._sampler = Sampler(logprobs_mode=logprobs_mode)
        self.logprobs_mode = logprobs_mode
        self.wait: Any = contextlib.nullcontext  # a context around blocking reads of MLX (step_times.py)

    def _argmax(self, logits: Any) -> list[int]:
        import mlx.core as mx

        tokens = mx.argmax(logits, axis=-1)
        with self.wait():
            return tokens.tolist()

    def _to_torch(self, logits: Any) -> Any:
        import mlx.core as mx
        import torch

        # np.array on an MLX array goes through the buffer protocol; float32 keeps
        # the sampler's maths (softmax, penalties) at full precision. A copy: the
        # grammar mask writes into it.
        scores = logits.astype(mx.float32)
        with self.wait():
            mx.eval(scores)
        return torch.from_numpy(np.array(scores))

    def sample(self, logits: Any, input_batch: Any, use_torch: bool, grammar: Any = None):
        """`logits` is a [num_reqs, vocab] array in `input_batch` row order.

        `grammar`, when given, masks the torch logits in place (structured output)
        before vLLM's sampler sees them; callers pass `use_torch` with it.
        Returns (token ids as a list of ints, LogprobsLists or None).
        """
        if not use_torch:
            return self._argmax(logits), None
        torch_logits = self._to_torch(logits)
        if grammar is not None:
            grammar(torch_logits)
        out = self._sampler(torch_logits, input_batch.sampling_metadata)
        tokens = out.sampled_token_ids[:, 0].tolist()
        logprobs = out.logprobs_tensors.tolists() if out.logprobs_tensors is not None else None
        return tokens, logprobs

    def prompt_logprobs(self, logits: Any, k: int, targets: list[int]) -> Any:
        """LogprobsTensors for prompt positions: `targets[i]` is the token after position i.

        Prompt tokens skip the sampling processors, so processed and raw scores are
        the same here (as in vLLM's GPU runner).
        """
        import torch

        scores = self._to_torch(logits)
        if self.logprobs_mode not in ("raw_logits", "processed_logits"):
            scores = self._sampler.compute_logprobs(scores)
        return self._sampler.gather_logprobs(scores, k, torch.tensor(targets, dtype=torch.int64))
