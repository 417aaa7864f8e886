"""The paged KV path: vLLM's block tables and slot mappings drive one packed MLX forward.

vLLM's KV cache manager owns the blocks (and so prefix caching, preemption and
copy-on-write come from vLLM); this runner keeps per-layer pools, writes each
scheduled token's K/V to the slot vLLM assigned, and attends over block tables.
Decode tokens and prefill chunks go through the same forward every step.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import numpy as np

from vmetal.engine.runner.attention import metal as pa
from vmetal.engine.runner.attention import reference as pa_ref
from vmetal.engine.runner.kv.paged_cache import PagedLayerCache, StepLayout, install_attention_hook, logits_of
from vmetal.engine.runner.model_runner import MetalModelRunner, StepLogits

logger = logging.getLogger("vllm.vmetal")  # under "vllm": its handlers and level apply

SCRATCH_BLOCKS = 8


class PagedModelRunner(MetalModelRunner):
    def __init__(self, vllm_config: Any, device: Any):
        super().__init__(vllm_config, device)
        self.layers: list[PagedLayerCache] = []
        self.num_blocks = 0
        self.scratch_blocks: list[int] = []
        # The decode-ahead step's pool slots, and its rows that wrote to a scratch block.
        self._ahead_slots: np.ndarray | None = None
        self._ahead_scratch: list[int] = []
        # All-decode steps: served by the decode-ahead ("used", "scratch": with a row written to a scratch block)
        # or not ("missed": built but not that step, "none": not built).
        self.ahead_counts: Counter[str] = Counter()

    def load_model(self) -> None:
        super().load_model()
        install_attention_hook(self.model)

    def allocate_pools(self, num_blocks: int) -> None:
        import mlx.core as mx

        lm = self.loaded
        # Scratch blocks past vLLM's: a decode-ahead row whose next token starts a block vLLM has not allocated
        # yet writes it there (see _ahead_forward). At most 1/16 more than vLLM's blocks.
        scratch = min(SCRATCH_BLOCKS, self.max_num_reqs, max(1, num_blocks // 16))
        shape = (num_blocks + scratch, self.cache_config.block_size, lm.num_kv_heads, lm.head_dim)
        self.layers = [PagedLayerCache(mx.zeros(shape, lm.dtype), mx.zeros(shape, lm.dtype))
                       for _ in range(lm.num_layers)]
        mx.eval([(c.k_pool, c.v_pool) for c in self.layers])
        self.num_blocks = num_blocks
        self.scratch_blocks = list(range(num_blocks, num_blocks + scratch))
        logger.info("vmetal: paged KV pools: %d blocks x %d tokens (+%d scratch), %.1f MiB", num_blocks,
                    self.cache_config.block_size, scratch, sum(c.nbytes for c in self.layers) / 2**20)

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
        layout = StepLayout.plan(np.arange(n), np.full((n,), -1), np.zeros((1, 1)), [n], [n],
                                 self.cache_config.block_size)
        mx.eval(self._forward(scratch, list(range(n)), layout, [n - 1]))

    def _forward(self, layers: list[PagedLayerCache], tokens: Any, layout: StepLayout,
                 last_rows: list[int]) -> Any:
        import mlx.core as mx

        for layer in layers:
            layer.layout = layout
        ids = tokens if isinstance(tokens, mx.array) else mx.array(tokens, dtype=mx.int32)
        hidden = self.model.model(ids[:, None], cache=layers)
        return logits_of(self.model, hidden[mx.array(last_rows, dtype=mx.int32), 0, :])

    def _update_states(self, so: Any) -> None:
        super()._update_states(so)
        if so.kv_cache_block_copies:
            src = [c.src_block_id for c in so.kv_cache_block_copies]
            dst = [c.dst_block_id for c in so.kv_cache_block_copies]
            for layer in self.layers:
                layer.k_pool, layer.v_pool = pa.copy_blocks(layer.k_pool, layer.v_pool, src, dst)

    def execute_model(self, so: Any) -> Any:
        from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT

        self._update_states(so)
        self._pending = None
        if so.total_num_scheduled_tokens == 0:
            return EMPTY_MODEL_RUNNER_OUTPUT

        bs = self.cache_config.block_size
        # Single-token queries (decodes) first: the attention's decode group is then a slice of the pack,
        # and its output needs no reordering.
        req_ids = sorted(self.input_batch.req_ids, key=lambda r: so.num_scheduled_tokens[r] > 1)
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

        block_tables = _padded(tables)
        decode_only = None
        all_slots = np.concatenate(slots)
        if len(tokens) == len(req_ids) and not prompt_rows and not partial:
            ahead, greedy = self._take_ahead(tuple(req_ids), all_slots)
            if ahead is not None:
                logits = ahead
            decode_only = (tuple(req_ids), ahead, greedy)
        elif self._next_decode is not None:
            self._next_decode = None  # its writes are harmless: see _ahead_forward
        if decode_only is None or decode_only[1] is None:
            layout = StepLayout.plan(np.concatenate(positions), all_slots, block_tables, context_lens,
                                     query_lens, bs)
            # Every position of a prompt-logprobs request goes through the LM head too, after the last rows.
            extra = [i for r in prompt_rows.values() for i in r]
            logits = self._forward(self.layers, tokens, layout, last_rows + extra)
            if decode_only is not None:
                decode_only = (decode_only[0], logits, None)
        rows = {req_id: logits[i] for i, req_id in enumerate(req_ids)}
        prompt_logits, at = {}, len(last_rows)
        for req_id, r in prompt_rows.items():
            prompt_logits[req_id] = logits[at : at + len(r)]
            at += len(r)
        self._pending = StepLogits(rows, partial, so, prompt_logits, decode_only)
        return None

    # Decode ahead (see DecodeAhead): the next all-decode step is queued on the still-lazy greedy tokens.
    def _ahead_forward(self, order: tuple[str, ...], tokens: Any) -> Any:
        """The next step of decode rows `order`, or None when it cannot be built ahead.

        A row whose next token starts a block that vLLM allocates only when it schedules that token (once every
        block_size tokens; with 32 rows, in most steps for some row) writes it to a scratch block of its own;
        the layers keep the step's K/V, and `_take_ahead` writes them to the block vLLM then assigns.
        The other rows' writes stay even when vLLM schedules something else: each goes to the row's own slot
        for its next position, in the partly filled last block that only that row owns (vLLM shares full
        blocks only); if the row runs on, its next step writes the same values there, and if its blocks are
        freed, a later owner writes a slot before it reads it."""
        bs = self.cache_config.block_size
        positions, slots, tables, scratch = [], [], [], []
        for i, req_id in enumerate(order):
            state = self.requests[req_id]
            pos = state.num_computed_tokens + 1
            table = list(state.block_ids[0])
            if pos // bs >= len(table):
                if len(scratch) == len(self.scratch_blocks):
                    return None
                table.append(self.scratch_blocks[len(scratch)])
                scratch.append(i)
            positions.append(pos)
            slots.append(table[pos // bs] * bs + pos % bs)
            tables.append(table)
        layout = StepLayout.plan(positions, slots, _padded(tables), [p + 1 for p in positions],
                                 [1] * len(order), bs)
        self._ahead_slots = np.asarray(slots, dtype=np.int64)
        self._ahead_scratch = scratch
        for layer in self.layers:
            layer.keep_kv = bool(scratch)
        try:
            return self._forward(self.layers, tokens, layout, list(range(len(order))))
        finally:
            for layer in self.layers:
                layer.keep_kv = False

    def _take_ahead(self, order: tuple[str, ...], slots: np.ndarray) -> tuple[Any, Any]:
        """The decode-ahead's (logits, argmax) if this step is exactly that step, else (None, None)."""
        if self._next_decode is None:
            self.ahead_counts["none"] += 1
            return None, None
        ahead_order, tokens, logits, greedy = self._next_decode
        scratch, self._ahead_scratch, self._next_decode = self._ahead_scratch, [], None
        usable = ahead_order == order
        if usable:
            own = np.ones(len(slots), dtype=bool)
            own[scratch] = False
            usable = np.array_equal(self._ahead_slots[own], slots[own]) and all(
                self.requests[r].get_token_id(self.requests[r].num_computed_tokens) == t
                for r, t in zip(order, tokens))
        if usable and scratch:
            import mlx.core as mx

            writes = pa_ref.plan_writes(slots[scratch])
            rows = mx.array(scratch, dtype=mx.int32)
            for layer in self.layers:
                keys, values = layer.kept_kv
                layer.k_pool, layer.v_pool = pa.write_cache(keys[rows], values[rows], layer.k_pool, layer.v_pool,
                                                            writes)
        for layer in self.layers:
            layer.kept_kv = None
        self.ahead_counts["used" if usable else "missed"] += 1
        self.ahead_counts["scratch"] += bool(usable and scratch)
        return (logits, greedy) if usable else (None, None)

    def sample_tokens(self, grammar_output: Any = None) -> Any:
        import mlx.core as mx

        out = super().sample_tokens(grammar_output)
        if self._next_decode is None:
            # The pools are part of this step's graph; evaluate them with it so the next step starts from
            # materialised arrays, not a growing lazy graph. (A decode-ahead's async_eval covers them.)
            mx.eval([(c.k_pool, c.v_pool) for c in self.layers])
        return out


def _padded(tables: list[Any]) -> np.ndarray:
    """Block tables of different lengths as one int32 array `[B, longest]`, padded with block 0."""
    out = np.zeros((len(tables), max(len(t) for t in tables)), dtype=np.int32)
    for i, t in enumerate(tables):
        out[i, : len(t)] = t
    return out
