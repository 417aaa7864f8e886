"""The paged KV path: vLLM's block tables and slot mappings drive one packed MLX forward.

vLLM's KV cache manager owns the blocks (and so prefix caching, preemption and copy-on-write come from vLLM);
this runner writes each scheduled token's K/V to the slot vLLM assigned in its layer's KV cache group, and attends
over block tables. Decode tokens and prefill chunks go through the same forward every step, as do speculation's
verify positions (a speculating request's last token and its n-gram or draft-model drafts, query rows of their
own). The pools are allocated once, from `VLLM_METAL_MEMORY_FRACTION` of the device (`kv.paged_pools`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vmetal.engine.models import logits_at
from vmetal.engine.runner.attention import metal as attention
from vmetal.engine.runner.attention import reference
from vmetal.engine.runner.base import ModelRunnerBase, RowLogits, StepLogits
from vmetal.engine.runner.compiled_decode import CompiledDecode, TraceError, plan_decode
from vmetal.engine.runner.kv import own_attention
from vmetal.engine.runner.kv.paged_cache import (
    FULL,
    KVPool,
    PagedLayerCache,
    StepLayout,
    View,
    install_attention_hook,
)
from vmetal.engine.runner.kv.paged_pools import PagedPools, views_of

logger = logging.getLogger("vllm.vmetal")  # under "vllm": its handlers and level apply


@dataclass
class Pack:
    """One step's scheduled tokens, decodes first, as one packed batch."""

    req_ids: list[str]
    tokens: list[int] = field(default_factory=list)
    positions: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # [T]
    slots: list[np.ndarray] = field(default_factory=list)  # per KV cache group: each token's pool slot [T]
    # per KV cache group, per request: its block ids (vLLM's own lists, read during the step, never kept)
    tables: list[list[list[int]]] = field(default_factory=list)
    context_lens: list[int] = field(default_factory=list)
    query_lens: list[int] = field(default_factory=list)
    last_rows: list[int] = field(default_factory=list)  # each request's last token in the pack
    prompt_rows: dict[str, range] = field(default_factory=dict)  # prompt-logprobs requests: all their rows
    # speculating requests: (their drafts, the rows that verify them: the last token's and each draft's)
    spec_rows: dict[str, tuple[list[int], range]] = field(default_factory=dict)
    partial: set[str] = field(default_factory=set)  # prompt chunks that end before the prompt does

    @property
    def decode_only(self) -> bool:
        return len(self.tokens) == len(self.req_ids) and not self.prompt_rows and not self.partial

    @property
    def verify_only(self) -> bool:
        """Decodes and speculating requests' verify rows alone (each request one token of its own, the rest
        drafts; no prompt chunk): what a compiled step takes, a request's rows at consecutive positions."""
        return (bool(self.spec_rows) and not self.prompt_rows and not self.partial
                and len(self.tokens) == len(self.req_ids) + sum(len(p) for p, _ in self.spec_rows.values()))

    @property
    def extra_rows(self) -> list[int]:
        """The rows that go through the LM head after `last_rows`: every position of a prompt-logprobs request,
        then every verify position of a speculating one, in the order `execute_model` slices them back."""
        return ([i for rows in self.prompt_rows.values() for i in rows]
                + [i for _, rows in self.spec_rows.values() for i in rows])


class PagedModelRunner(PagedPools, ModelRunnerBase):
    # VLLM_METAL_LAUNCH_THREAD=auto keeps this path's launches on the engine's thread: with the thread an H100 ran
    # a one-row step in 5.97 ms against 4.60 without it, 32 rows in 7.42 against 6.54, the compiled graph's replay
    # taking 1.90 ms instead of 0.82 while the thread encoded (benchmarks/RESULTS-gpu.md, 2026-12-07 07:48); why
    # is not known yet. `1` still gives it the thread (tested here).
    launch_thread_by_default = False

    def __init__(self, vllm_config: Any, device: Any, metal_config: Any, group: Any = None):
        super().__init__(vllm_config, device, metal_config, group)
        self.layers: list[PagedLayerCache] = []
        self.pools: list[KVPool] = []  # the distinct pools under `layers` (one per layer of the largest group)
        self.num_groups = 1  # vLLM's KV cache groups (sliding-window layers are groups of their own)
        self.num_blocks = 0
        self.scratch_blocks: list[int] = []
        self.kernels = attention.kernel_choice(False)  # per op: its Metal kernel runs; decided once, at load
        self.kernel_check: attention.SelfCheck | None = None  # the kernel's check at load, where it ran
        # The decode-ahead step's pool slots, and its rows that wrote to a scratch block.
        self._ahead_slots: list[list[int]] = []
        self._ahead_scratch: list[int] = []
        self.layer_windows: tuple[int | None, ...] = ()  # per K/V layer, set at load
        self.views: tuple[View, ...] = FULL  # the (group, window) pairs the layers attend through
        self._compile = False  # whether all-decode steps are compiled (VLLM_METAL_COMPILE), decided at load
        self.compiled: CompiledDecode | None = None  # built with the pools
        self.dump_block = 0  # the block a compiled step's padding rows write to, past the scratch blocks

    def load_model(self) -> None:
        super().load_model()
        install_attention_hook(self.model)
        # Each K/V layer's sliding window (None: full attention), as its mlx-lm cache keeps it on the MLX path.
        self.layer_windows = self.loaded.kv_held() or (None,) * self.loaded.num_layers
        windows = sorted({w for w in self.layer_windows if w is not None})
        if windows:
            logger.info("vmetal: %d of %d layers attend to a sliding window (%s tokens): vLLM frees their blocks "
                        "past it", sum(w is not None for w in self.layer_windows), len(self.layer_windows),
                        "/".join(map(str, windows)))
        self.kernels = attention.kernel_choice(self._kernels_on())
        logger.info("vmetal: paged attention through %s", "the Metal kernel" if self.kernels["paged_attention"]
                    else "the pure-MLX reference")
        # A pipeline stage evaluates its sends and receives inside the forward, which a trace cannot.
        self._compile = self.metal_config.compile and self.stages is None
        if self.vllm_config.speculative_config is not None:
            # A rejected draft's K/V needs no rolling back: vLLM counts its position as not computed and its
            # slot is written again when it is, sliding-window layers' too. No decode-ahead: the step after one
            # that found drafts verifies them, and a queued all-decode step would be built and run for nothing.
            # (The platform checks a local folder; a Hub id is only known here.)
            from vmetal.preflight.cache_types import check_speculation

            check_speculation(self.loaded.state, "paged")
            self.drafter = self._new_drafter()
            self.decode_ahead_enabled = False

    def _kernels_on(self) -> bool:
        """Whether the Metal kernels run (`VLLM_METAL_KERNELS`). Where they would, the attention kernel is first
        checked against the reference on a step shaped like this model's; under `auto` a disagreement falls
        back to the reference with one warning, under `1` (forced) it only warns."""
        if not attention.use_kernels(self.metal_config.kernels):
            return False
        check = self.kernel_check = self._self_check()
        if check.ok:
            logger.info("vmetal: %s", check.describe())
            return True
        if self.metal_config.kernels is True:
            logger.warning("vmetal: %s; serving with the kernel anyway (VLLM_METAL_KERNELS=1)", check.describe())
            return True
        logger.warning("vmetal: %s; serving with the reference instead (VLLM_METAL_KERNELS=0 skips the "
                       "check, =1 keeps the kernel)", check.describe())
        return False

    def _self_check(self) -> attention.SelfCheck:
        """The kernel against the reference on each variant this model's layers attend with (the model's head
        dims, sinks and softcap, once per distinct window, full attention included): the first that fails, else
        the last. Each variant is a kernel of its own, so a Gemma 3 or gpt-oss checks its sliding and its full
        layers' kernels both."""
        import mlx.core as mx

        lm = self.loaded
        key_dim, value_dim = lm.kv_dims
        sinks = any(isinstance(getattr(m, "sinks", None), mx.array) for m in self.model.modules())
        softcap = own_attention.softcap_of(self.model)
        checks = [attention.self_check(lm.num_heads or lm.num_kv_heads, lm.num_kv_heads, key_dim,
                                       self.cache_config.block_size, lm.dtype, value_dim=value_dim, window=window,
                                       sinks=sinks, softcap=softcap)
                  for window in sorted(set(self.layer_windows) or {None}, key=lambda w: w or 0)]
        return next((c for c in checks if not c.ok), checks[-1])

    def initialize_kv(self, kv_cache_config: Any) -> None:
        super().initialize_kv(kv_cache_config)
        if self._compile:
            self.compiled = CompiledDecode(self.model, self.loaded.head_on_rows, self.views)
            self.compiled.settle = self.launches.settle

    def profile_tokens(self) -> int:
        # A paged step is one packed forward over every token scheduled, however many prompts they come from.
        return max(1, self.scheduler_config.max_num_batched_tokens)

    def warm_up(self, tokens: int | None = None) -> None:
        """One packed step of prompts, `tokens` in all, each at most `max_model_len` long, on a scratch pool
        before vLLM sizes the real one: no K/V is written (slot -1) and every position reads the scratch
        pool's block 0, so `tokens` costs no pool of their own."""
        import mlx.core as mx

        block_size = self.cache_config.block_size
        layers = self.layers or self._new_layers(2)
        views = views_of(layers)
        groups = 1 + max(g for g, _ in views)
        n = tokens or min(8, block_size)
        lens = [min(n - start, self.max_model_len) for start in range(0, n, self.max_model_len)]
        tables = [np.zeros((len(lens), -(-lens[0] // block_size)), dtype=np.int64)] * groups
        positions = np.concatenate([np.arange(length) for length in lens])
        layout = StepLayout.plan_groups(positions, [np.full((n,), -1)] * groups, tables, lens, lens, block_size,
                                        views)
        mx.eval(self._forward(layers, [0] * n, layout, (np.cumsum(lens) - 1).tolist()))

    def _forward(self, layers: list[PagedLayerCache], tokens: Any, layout: StepLayout, last_rows: list[int]) -> Any:
        import mlx.core as mx

        for layer in layers:
            layer.layout = layout
        ids = tokens if isinstance(tokens, mx.array) else mx.array(tokens, dtype=mx.int32)
        rows = mx.array(last_rows, dtype=mx.int32)
        # Each packed token is a batch row [T, 1]: the model's own head runs on the rows asked for only.
        with self.step_times.build():
            return logits_at(self.model, ids[:, None], layers, lambda hidden: hidden[rows],
                             self.loaded.head_on_rows)[:, 0, :]

    def _decode(self, tokens: Any, positions: Any, tables: list[list[Any]], slots: list[Any] | None = None,
                keep_kv: bool = False, queries: int = 1) -> Any:
        """An all-decode step through its compiled forward (`compiled_decode`; `tables[g]`: the sequences' block
        tables in KV cache group g, `slots[g]`: the rows' pool slots there; `queries` rows a sequence): lazy
        logits [rows, V], or None when the step cannot be traced (compiled steps are then off for this engine,
        with one warning)."""
        plan = plan_decode(positions, tables, self.cache_config.block_size, self.dump_block, self.views, slots,
                           queries)
        try:
            with self.step_times.build():
                logits = self.compiled.forward(self.layers, self.pools, tokens, plan, len(positions), keep_kv)
        except TraceError as exc:
            logger.warning("vmetal: this model's decode step cannot be compiled (%s); building every step op by "
                           "op (VLLM_METAL_COMPILE=0 skips the attempt)", exc)
            self.compiled = None
            return None
        self.counts["decode_compiled"] += 1
        return logits

    def _verify_compiled(self, pack: Pack) -> Any:
        """A speculating step (`Pack.verify_only`) through the compiled step: each request is a sequence of Q
        rows (Q: the most tokens a request has this step), its last token and its drafts, each at its own
        position; a request with fewer tokens is padded with rows that repeat its last position and write to
        the dump block. Each layer writes every row's K/V before any row attends, and a row sees its request's
        positions up to its own, so a draft sees the drafts before it, as in the packed forward; the request's
        context is gathered once for its Q rows. Built op by op, such a step costs a GPU host as much again as
        a compiled one (its launches are not fused either), and with one stream nearly every step speculates.
        Returns the logits of the rows `execute_model` slices (`last_rows + extra_rows`), or None where the step
        cannot be traced."""
        import mlx.core as mx

        queries = max(pack.query_lens)
        dump = self.dump_block * self.cache_config.block_size
        tokens: list[int] = []
        positions: list[int] = []
        slots: list[list[int]] = [[] for _ in pack.slots]
        moved: list[int] = []  # each packed row's row in the compiled step
        at = 0
        for i, n in enumerate(pack.query_lens):
            moved.extend(range(i * queries, i * queries + n))
            tokens.extend(pack.tokens[at:at + n])
            positions.extend(pack.positions[at:at + n].tolist())
            for group_slots, packed in zip(slots, pack.slots):
                group_slots.extend(packed[at:at + n].tolist())
            if n < queries:
                tokens.extend([0] * (queries - n))
                positions.extend([positions[-1]] * (queries - n))
                for group_slots in slots:
                    group_slots.extend([dump] * (queries - n))
            at += n
        logits = self._decode(tokens, positions, pack.tables, slots, queries=queries)
        if logits is None:
            return None
        self.counts["verify_compiled"] += 1
        return logits[mx.array([moved[r] for r in pack.last_rows + pack.extra_rows], dtype=mx.int32)]

    # ---------------------------------------------------------------- steps
    def _update_states(self, so: Any) -> None:
        super()._update_states(so)
        if so.kv_cache_block_copies:
            src = [c.src_block_id for c in so.kv_cache_block_copies]
            dst = [c.dst_block_id for c in so.kv_cache_block_copies]
            for pool in self.pools:
                pool.k, pool.v = attention.copy_blocks(pool.k, pool.v, src, dst,
                                                       use_kernel=self.kernels["copy_blocks"])

    def execute_model(self, so: Any) -> Any:
        from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT

        self._settle_unless_ahead(so)
        self._update_states(so)
        self._pending = None
        if so.total_num_scheduled_tokens == 0:
            return EMPTY_MODEL_RUNNER_OUTPUT
        pack = self._pack(so)
        logits = ahead = None
        if pack.decode_only:
            logits, ahead = self._take_ahead(tuple(pack.req_ids), pack.slots)
        else:
            self.ahead.take()  # its writes are harmless: see _ahead_forward
        if logits is None and pack.decode_only and self.compiled is not None:
            logits = self._decode(pack.tokens, pack.positions, pack.tables, pack.slots)
        elif logits is None and pack.verify_only and self.compiled is not None:
            logits = self._verify_compiled(pack)
        if logits is None:
            layout = StepLayout.plan_groups(pack.positions, pack.slots,
                                            [_padded(tables) for tables in pack.tables], pack.context_lens,
                                            pack.query_lens, self.cache_config.block_size, self.views)
            logits = self._forward(self.layers, pack.tokens, layout, pack.last_rows + pack.extra_rows)
        rows = RowLogits(logits, pack.req_ids)
        prompt_logits, drafts, at = {}, {}, len(pack.last_rows)
        for req_id, r in pack.prompt_rows.items():
            prompt_logits[req_id] = logits[at : at + len(r)]
            at += len(r)
        for req_id, (proposed, r) in pack.spec_rows.items():
            drafts[req_id] = (proposed, logits[at : at + len(r)])
            at += len(r)
        decode_only = (tuple(pack.req_ids), logits, ahead) if pack.decode_only else None
        self._pending = StepLogits(rows, pack.partial, so, prompt_logits, decode_only, drafts or None)
        return None

    def _pack(self, so: Any) -> Pack:
        """Every scheduled token, single-token queries (decodes) first: the attention's decode group is then a
        slice of the pack, and its output needs no reordering.

        Host time per step is what a decode step costs on a GPU (step_times.py), and this runs for every row
        of every step: a decode's position and slots are plain ints (numpy on one-element arrays costs ~7 us
        a row), and only prompt chunks go through numpy."""
        bs = self.cache_config.block_size
        groups = range(self.num_groups)
        scheduled = so.num_scheduled_tokens
        spec = so.scheduled_spec_decode_tokens
        req_ids = self.input_batch.req_ids
        all_decode = so.total_num_scheduled_tokens == len(req_ids)  # one token each: already in order
        pack = Pack(list(req_ids) if all_decode else sorted(req_ids, key=lambda r: scheduled[r] > 1))
        positions: list[int] = []
        slots: list[list[int]] = [[] for _ in groups]
        pack.tables = [[] for _ in groups]
        for req_id in pack.req_ids:
            state = self.requests[req_id]
            start, n = state.num_computed_tokens, scheduled[req_id]
            tables = state.block_ids
            if req_id in self.prompt_logprobs:
                pack.prompt_rows[req_id] = range(len(pack.tokens), len(pack.tokens) + n)
            sample_row = None  # the row sampled for the request: its last token's, but for a speculating one
            if n == 1:
                pack.tokens.append(state.get_token_id(start))
                positions.append(start)
                for g in groups:
                    slots[g].append(tables[g][start // bs] * bs + start % bs)
            else:
                proposed = list(spec.get(req_id, ()))
                if proposed:
                    # The last sampled token, then the drafts. Its row for sampling is the last token's, the first
                    # that verifies.
                    pack.tokens.extend(self._tokens_and_drafts(state, start, n, proposed))
                    sample_row = len(pack.tokens) - len(proposed) - 1
                    pack.spec_rows[req_id] = (proposed, range(sample_row, sample_row + len(proposed) + 1))
                else:
                    pack.tokens.extend(self._tokens(state, start, start + n))
                pos = np.arange(start, start + n, dtype=np.int64)
                positions.extend(range(start, start + n))
                for g in groups:
                    slots[g].extend((np.asarray(tables[g], dtype=np.int64)[pos // bs] * bs + pos % bs).tolist())
            for g in groups:
                pack.tables[g].append(tables[g])
            pack.context_lens.append(start + n)
            pack.query_lens.append(n)
            pack.last_rows.append(len(pack.tokens) - 1 if sample_row is None else sample_row)
            if start + n < state.num_tokens:
                pack.partial.add(req_id)
        pack.positions = np.array(positions, dtype=np.int64)
        pack.slots = [np.array(group_slots, dtype=np.int64) for group_slots in slots]
        return pack

    # Decode ahead (vmetal.engine.runner.decode_ahead): the next all-decode step is queued on the still-lazy
    # greedy tokens.
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
        groups = range(self.num_groups)
        positions, scratch = [], []
        slots: list[list[int]] = [[] for _ in groups]
        tables: list[list[list[int]]] = [[] for _ in groups]
        for i, req_id in enumerate(order):
            pos = self.requests[req_id].num_computed_tokens + 1
            own = self.requests[req_id].block_ids  # vLLM's lists: copied only where a scratch block goes
            if any(pos // bs >= len(table) for table in own):
                if len(scratch) == len(self.scratch_blocks):
                    return None
                # The same scratch block in every group: each layer reads back the K/V it just wrote there.
                own = [table + [self.scratch_blocks[len(scratch)]] if pos // bs >= len(table) else table
                       for table in own]
                scratch.append(i)
            positions.append(pos)
            for g, table in enumerate(own):
                slots[g].append(table[pos // bs] * bs + pos % bs)
                tables[g].append(table)
        self._ahead_slots = slots
        self._ahead_scratch = scratch
        if self.compiled is not None:
            logits = self._decode(tokens, positions, tables, slots, keep_kv=bool(scratch))
            if logits is not None:
                return logits
        layout = StepLayout.plan_groups(positions, slots, [_padded(t) for t in tables], [p + 1 for p in positions],
                                        [1] * len(order), bs, self.views)
        for layer in self.layers:
            layer.keep_kv = bool(scratch)
        try:
            return self._forward(self.layers, tokens, layout, list(range(len(order))))
        finally:
            for layer in self.layers:
                layer.keep_kv = False

    def _take_ahead(self, order: tuple[str, ...], slots: list[np.ndarray]) -> tuple[Any, Any]:
        """The decode-ahead's (logits, itself) if this step is exactly that step (`slots[g]`: its rows' pool
        slots in KV cache group g), else (None, None)."""
        ahead = self.ahead.take()
        if ahead is None:
            self.counts["ahead_none"] += 1
            return None, None
        scratch, self._ahead_scratch = self._ahead_scratch, []
        usable = ahead.order == order
        if usable:  # compared as Python ints: a handful of numpy calls cost more than 32 rows of this
            now, before = [group_slots.tolist() for group_slots in slots], self._ahead_slots
            for i in scratch:  # its slot was a scratch stand-in: whichever vLLM gives it is written below
                for g, group_slots in enumerate(now):
                    group_slots[i] = before[g][i]
            usable = now == before and ahead.matches(order, self._next_token)
        if usable and scratch:
            import mlx.core as mx

            writes = [reference.plan_writes(group_slots[scratch]) for group_slots in slots]
            rows = mx.array(scratch, dtype=mx.int32)
            for layer in self.layers:
                keys, values = layer.kept_kv
                layer.k_pool, layer.v_pool = attention.write_cache(keys[rows], values[rows], layer.k_pool,
                                                                   layer.v_pool, writes[layer.group],
                                                                   use_kernel=self.kernels["reshape_and_cache"])
        for layer in self.layers:
            layer.kept_kv = None
        # All-decode steps served by the decode-ahead ("ahead_used"; "ahead_scratch": with a row written to a
        # scratch block) or not ("ahead_missed": built but not that step; "ahead_none": not built).
        self.counts["ahead_used" if usable else "ahead_missed"] += 1
        self.counts["ahead_scratch"] += bool(usable and scratch)
        return (ahead.logits, ahead) if usable else (None, None)

    def _after_step(self) -> None:
        import mlx.core as mx

        if self.ahead.pending is None:
            self.launches.settle()
            # The pools are part of this step's graph; evaluate them with it so the next step starts from
            # materialised arrays, not a growing lazy graph. (A decode-ahead's async_eval covers them.)
            with self.step_times.wait():
                mx.eval([(p.k, p.v) for p in self.pools])


def _padded(tables: list[Any]) -> np.ndarray:
    """Block tables of different lengths as one int32 array `[B, longest]`, padded with block 0."""
    out = np.zeros((len(tables), max(len(t) for t in tables)), dtype=np.int32)
    for i, t in enumerate(tables):
        out[i, : len(t)] = t
    return out
