"""Embeddings: vLLM's pooling runner (`--runner pooling`, or an embedding checkpoint vLLM recognises) with the
hidden states computed in MLX.

vLLM schedules a pooling request like a prompt with nothing to generate: its prompt in one step or in chunks
(chunked prefill stays on for last-token pooling), then it expects the request's vector in
`ModelRunnerOutput.pooler_output` on the step that computes the prompt's last token, and `None` for a chunk
before it (a `None` on the last chunk would leave the request unfinished forever). `sample_tokens` is never
called. Each request runs on its own mlx-lm cache, as a prompt does on the MLX-managed path, so chunks carry
their K/V from one step to the next; the cache is dropped when vLLM reports the request finished.

The pooling is vLLM's embedding head, recomputed here (its torch pooler runs on hidden states of vLLM's own
model, which does not exist here): the final-normed hidden state of the last token (LAST), the mean over the
prompt (MEAN) or the first token's (CLS), in float32, cut to the request's `dimensions` (Matryoshka models),
then L2-normalised when the request's `use_activation` says so (vLLM's default for embedding models).
"""

from __future__ import annotations

import logging
from typing import Any

from vmetal.engine.runner.mlx_runner import MlxModelRunner
from vmetal.preflight.features import POOLING_TYPES

logger = logging.getLogger("vllm.vmetal")  # under "vllm": its handlers and level apply

# torch.nn.functional.normalize's eps, which vLLM's embedding head uses.
NORM_EPS = 1e-12


class PoolingModelRunner(MlxModelRunner):
    decode_ahead_enabled = False  # nothing is decoded

    def __init__(self, vllm_config: Any, device: Any, metal_config: Any, group: Any = None):
        super().__init__(vllm_config, device, metal_config, group)
        pooler = self.model_config.pooler_config
        self.pooling_type = str(getattr(pooler, "seq_pooling_type", None) or "LAST").upper()
        if self.pooling_type not in POOLING_TYPES:
            # The platform refuses this before the engine starts; kept for a config built some other way.
            raise ValueError(f"pooling type {self.pooling_type} is not computed by vmetal "
                             f"({', '.join(POOLING_TYPES)} are)")
        # MEAN: a running sum of the hidden states (and CLS: the first one) across a prompt's chunks.
        self.partial_pool: dict[str, Any] = {}

    def load_model(self) -> None:
        super().load_model()
        if not hasattr(self.model, "model"):
            raise ValueError(f"`{self.model_config.model}`: mlx-lm's `{type(self.model).__module__}` keeps no "
                             "inner model to take hidden states from; it cannot serve embeddings")
        logger.info("vmetal: embeddings by %s pooling of the final hidden states", self.pooling_type)

    def _drop_kv(self, req_id: str) -> None:
        super()._drop_kv(req_id)
        self.partial_pool.pop(req_id, None)

    def execute_model(self, so: Any) -> Any:
        import mlx.core as mx
        from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, ModelRunnerOutput

        self._update_states(so)
        if so.total_num_scheduled_tokens == 0:
            return EMPTY_MODEL_RUNNER_OUTPUT
        req_ids = list(self.input_batch.req_ids)
        pooled: list[Any] = []
        with self.step_times.build():
            for req_id in req_ids:
                state = self.requests[req_id]
                start, n = state.num_computed_tokens, so.num_scheduled_tokens[req_id]
                cache = self._cache_for_prefill(req_id, start)
                tokens = mx.array([self._tokens(state, start, start + n)])
                hidden = self.model.model(tokens, cache=cache)[0]  # [n, H], after the final norm
                self.cache_len[req_id] = start + n
                vector = self._pool(req_id, hidden, start)
                done = start + n >= len(state.prompt_token_ids)
                if not done:  # the K/V of this chunk (and the sum so far) are what the next one needs
                    mx.eval([c.state for c in cache], self.partial_pool.get(req_id, []))
                pooled.append(vector if done else None)
        outputs = self._finish([(req_id, v) for req_id, v in zip(req_ids, pooled)])
        return ModelRunnerOutput(req_ids=req_ids, req_id_to_index=dict(self.input_batch.req_id_to_index),
                                 sampled_token_ids=[], pooler_output=outputs)

    def _pool(self, req_id: str, hidden: Any, start: int) -> Any:
        """The request's vector once `hidden` (this chunk's rows, the first at position `start`) is added."""
        import mlx.core as mx

        if self.pooling_type == "LAST":
            return hidden[-1]
        if self.pooling_type == "CLS":
            if start == 0:
                self.partial_pool[req_id] = hidden[0]
            return self.partial_pool[req_id]
        total = hidden.astype(mx.float32).sum(axis=0)
        if start > 0:
            total = total + self.partial_pool[req_id]
        self.partial_pool[req_id] = total
        return total / (start + hidden.shape[0])

    def _finish(self, pooled: list[tuple[str, Any]]) -> list[Any]:
        """vLLM's embedding head on each finished request's vector: float32, `dimensions`, L2 norm; CPU torch."""
        import mlx.core as mx
        import numpy as np
        import torch

        ready = [v for _, v in pooled if v is not None]
        if ready:
            with self.step_times.wait():
                mx.eval(ready)
        outputs: list[Any] = []
        for req_id, vector in pooled:
            if vector is None:
                outputs.append(None)
                continue
            params = self.requests[req_id].pooling_params
            v = np.array(vector.astype(mx.float32))
            if params.dimensions is not None:
                v = v[: params.dimensions]
            if params.use_activation is not False:
                v = v / max(float(np.linalg.norm(v)), NORM_EPS)
            outputs.append(torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)))
        return outputs
