"""The paged KV path: vLLM's block tables and slot mappings drive one packed MLX forward.

vLLM's KV cache manager owns the blocks (and so prefix caching, preemption and
copy-on-write come from vLLM); this runner keeps per-layer pools, writes each
scheduled token's K/V to the slot vLLM assigned, and attends over block tables.
Decode tokens and prefill chunks go through the same forward every step.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from vmetal import kernels as pa
from vmetal.runner.model_runner import MetalModelRunner, StepLogits
from vmetal.runner.paged_cache import PagedLayerCache, StepLayout, install_attention_hook, logits_of

logger = logging.getLogger("vllm.vmetal")  # under "vllm": its handlers and level apply


class PagedModelRunner(MetalModelRunner):
    def __init__(self, vllm_config: Any, device: Any):
        super().__init__(vllm_config, device)
        self.layers: list[PagedLayerCache] = []
        self.num_blocks = 0

    def load_model(self) -> None:
        super().load_model()
        install_attention_hook(self.model)

    def allocate_pools(self, num_blocks: int) -> None:
        import mlx.core as mx

        lm = self.loaded
        shape = (num_blocks, self.cache_config.block_size, lm.num_kv_heads, lm.head_dim)
        self.layers = [PagedLayerCache(mx.zeros(shape, lm.dtype), mx.zeros(shape, lm.dtype))
                       for _ in range(lm.num_layers)]
        mx.eval([(c.k_pool, c.v_pool) for c in self.layers])
        self.num_blocks = num_blocks
        logger.info("vmetal: paged KV pools: %d blocks x %d tokens, %.1f MiB",
                    num_blocks, self.cache_config.block_size, sum(c.nbytes for c in self.layers) / 2**20)

    def warm_up(self) -> None:
        """A profiling forward on a scratch pool, before vLLM sizes the real one."""
        import mlx.core as mx

        if not self.layers:
            lm = self.loaded
            shape = (2, self.cache_config.block_size, lm.num_kv_heads, lm.head_dim)
            scratch = [PagedLayerCache(mx.zeros(shape, lm.dtype), mx.zeros(shape, lm.dtype))
                       for _ in range(lm.num_layers)]
        else:
            scratch = self.layers
        n = min(8, self.cache_config.block_size)
        layout = StepLayout(
            positions=mx.arange(n, dtype=mx.int32),
            slot_mapping=np.full((n,), -1, dtype=np.int32),
            block_tables=mx.zeros((1, 1), dtype=mx.int32),
            context_lens=mx.array([n], dtype=mx.int32),
            query_lens=np.array([n], dtype=np.int32),
        )
        mx.eval(self._forward(scratch, list(range(n)), layout, [n - 1]))

    def _forward(self, layers: list[PagedLayerCache], tokens: list[int], layout: StepLayout,
                 last_rows: list[int]) -> Any:
        import mlx.core as mx

        for layer in layers:
            layer.layout = layout
        hidden = self.model.model(mx.array(tokens, dtype=mx.int32)[:, None], cache=layers)
        return logits_of(self.model, hidden[mx.array(last_rows, dtype=mx.int32), 0, :])

    def _update_states(self, so: Any) -> None:
        super()._update_states(so)
        if so.kv_cache_block_copies:
            src = [c.src_block_id for c in so.kv_cache_block_copies]
            dst = [c.dst_block_id for c in so.kv_cache_block_copies]
            for layer in self.layers:
                layer.k_pool, layer.v_pool = pa.copy_blocks(layer.k_pool, layer.v_pool, src, dst)

    def execute_model(self, so: Any) -> Any:
        import mlx.core as mx
        from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT

        self._update_states(so)
        self._pending = None
        if so.total_num_scheduled_tokens == 0:
            return EMPTY_MODEL_RUNNER_OUTPUT

        bs = self.cache_config.block_size
        req_ids = list(self.input_batch.req_ids)
        tokens: list[int] = []
        positions: list[np.ndarray] = []
        slots: list[np.ndarray] = []
        context_lens, query_lens, last_rows, tables = [], [], [], []
        prompt_rows: dict[str, range] = {}  # requests wanting prompt logprobs: their rows in the pack
        partial: set[str] = set()
        for req_id in req_ids:
            state = self.requests[req_id]
            start, n = state.num_computed_tokens, so.num_scheduled_tokens[req_id]
            if req_id in self.num_prompt_logprobs:
                prompt_rows[req_id] = range(len(tokens), len(tokens) + n)
            tokens.extend(self._tokens(state, start, start + n))
            pos = np.arange(start, start + n, dtype=np.int64)
            table = np.asarray(state.block_ids[0], dtype=np.int64)
            positions.append(pos)
            slots.append(table[pos // bs] * bs + pos % bs)
            tables.append(table)
            context_lens.append(start + n)
            query_lens.append(n)
            last_rows.append(len(tokens) - 1)
            if start + n < state.num_tokens:
                partial.add(req_id)

        width = max(len(t) for t in tables)
        block_tables = np.zeros((len(tables), width), dtype=np.int32)
        for i, t in enumerate(tables):
            block_tables[i, : len(t)] = t
        layout = StepLayout(
            positions=mx.array(np.concatenate(positions).astype(np.int32)),
            # On the host: padding slots are dropped there, so the pool write stays in place.
            slot_mapping=np.concatenate(slots).astype(np.int32),
            block_tables=mx.array(block_tables),
            context_lens=mx.array(np.asarray(context_lens, dtype=np.int32)),
            # On the host: it sets the padded query width, and a host copy avoids a sync per layer.
            query_lens=np.asarray(query_lens, dtype=np.int32),
        )
        # Every position of a prompt-logprobs request goes through the LM head too, after the last rows.
        extra = [i for r in prompt_rows.values() for i in r]
        logits = self._forward(self.layers, tokens, layout, last_rows + extra)
        rows = {req_id: logits[i] for i, req_id in enumerate(req_ids)}
        prompt_logits, at = {}, len(last_rows)
        for req_id, r in prompt_rows.items():
            prompt_logits[req_id] = logits[at : at + len(r)]
            at += len(r)
        self._pending = StepLogits(rows, partial, so, prompt_logits)
        return None

    def sample_tokens(self, grammar_output: Any = None) -> Any:
        import mlx.core as mx

        out = super().sample_tokens(grammar_output)
        # The pools are part of this step's graph; evaluate them with it so the
        # next step starts from materialised arrays, not a growing lazy graph.
        mx.eval([(c.k_pool, c.v_pool) for c in self.layers])
        return out
