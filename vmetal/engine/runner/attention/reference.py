"""Paged KV cache and attention in plain MLX: the reference every device runs and every kernel is tested against.

Layout (vLLM's): per layer one K pool and one V pool, each `[num_blocks, block_size, num_kv_heads, head_dim]`.
The token at position `p` of a sequence with block table `bt` lives in slot
`bt[p // block_size] * block_size + p % block_size` of the pool seen as `[num_blocks * block_size, ...]`.
Slot `-1` in a slot mapping is padding: nothing is written.

A step's queries come packed, sequence after sequence (cu-seqlens order): sequence `i` contributes
`query_lens[i]` queries, the last `query_lens[i]` positions of its context of `context_lens[i]` tokens, whose
K/V are already in the pools (written by `reshape_and_cache` before attention). A decode is a query length of 1,
a prefill chunk a query length of n. Causal: the query at context position `p` sees keys `0..p`; with a sliding
`window` W, keys `p-W+1..p` (mlx-lm's `create_causal_mask(window_size=W)`, Gemma's and gpt-oss's local layers).
Attention sinks (gpt-oss: one learned logit per head that takes part in the softmax and adds nothing to the
output) go to MLX's SDPA as they are.

Functional: MLX arrays are values, so every function returns new pools and the caller rebinds them. The writes
are MLX scatters, which update the pool's buffer in place when nothing else holds the old pool when the step is
evaluated: rebind every reference to the old pool (and keep no view of it) before `mx.eval`, or MLX copies the
whole pool, per layer, per step.

`vmetal.engine.runner.attention.metal` has the same functions, running Metal kernels where MLX has Metal and these elsewhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial

import mlx.core as mx
import numpy as np

IntsLike = Sequence[int] | np.ndarray | mx.array


def _int32(x: IntsLike) -> mx.array:
    return x.astype(mx.int32) if isinstance(x, mx.array) else mx.array(np.asarray(x, dtype=np.int32))


def _host_ints(x: IntsLike) -> np.ndarray:
    """Host copy of small integer metadata (evaluates an `mx.array`: pass host lists to avoid the sync)."""
    return np.asarray(x, dtype=np.int64).reshape(-1)


@dataclass(frozen=True)
class CacheWrites:
    """A step's pool write, planned once on the host and shared by every layer."""

    slot_mapping: np.ndarray  # as given (host copy)
    rows: mx.array | None  # the tokens that have a slot, None: all of them
    slots: mx.array | None  # their slots; None: nothing is written
    # block size -> the slots as (block, offset) index arrays, built once a step and shared by every layer
    split: dict = field(default_factory=dict, compare=False, repr=False)

    def blocks_and_offsets(self, block_size: int) -> tuple[mx.array, mx.array]:
        """The slots as (block, offset in the block): the indices a pool `[blocks, block_size, ...]` is scattered
        into by as it is. Indexed by slot, it would be seen as `[slots, ...]` first and reshaped back after: two
        graph nodes more a pool a layer, which a compiled step's replay pays every step."""
        found = self.split.get(block_size)
        if found is None:
            found = self.split[block_size] = (self.slots // block_size, self.slots % block_size)
        return found


def plan_writes(slot_mapping: IntsLike) -> CacheWrites:
    """Plan the write of a slot mapping `[T]` (read on the host: an `mx.array` is evaluated)."""
    slots = _host_ints(slot_mapping)
    keep = np.flatnonzero(slots >= 0)
    if keep.size == 0:
        return CacheWrites(slots, None, None)
    rows = None if keep.size == slots.size else mx.array(keep.astype(np.int32))
    return CacheWrites(slots, rows, mx.array(slots[keep].astype(np.int32)))


def write_cache(keys: mx.array, values: mx.array, k_pool: mx.array, v_pool: mx.array,
                writes: CacheWrites) -> tuple[mx.array, mx.array]:
    """`reshape_and_cache` with its slot mapping planned already (`plan_writes`)."""
    if writes.slots is None:
        return k_pool, v_pool
    if writes.rows is not None:
        keys, values = keys[writes.rows], values[writes.rows]
    block, offset = writes.blocks_and_offsets(k_pool.shape[1])
    # A second handle on each pool (a reshape to its own shape is no graph node): `[...] =` rebinds the handle
    # it is called on to the scatter's result, and the caller's arrays must stay the old pools.
    k_out, v_out = k_pool.reshape(k_pool.shape), v_pool.reshape(v_pool.shape)
    k_out[block, offset] = keys.astype(k_pool.dtype)
    v_out[block, offset] = values.astype(v_pool.dtype)
    return k_out, v_out


def reshape_and_cache(keys: mx.array, values: mx.array, k_pool: mx.array, v_pool: mx.array,
                      slot_mapping: IntsLike) -> tuple[mx.array, mx.array]:
    """Write `keys`/`values` `[T, Hkv, D]` into the pools at `slot_mapping` `[T]`; slot -1 writes nothing.

    Values are cast to the pool dtype. Two tokens with the same real slot: one of them wins (vLLM never does it).
    `slot_mapping` is read on the host to drop the -1 slots (MLX scatters have no "skip" index, and anything
    that reads the pool before the scatter, such as a scratch row or an old value to write back, makes MLX copy
    the whole pool): pass a list or numpy array; an `mx.array` is evaluated.
    """
    return write_cache(keys, values, k_pool, v_pool, plan_writes(slot_mapping))


def copy_blocks(k_pool: mx.array, v_pool: mx.array, src: IntsLike, dst: IntsLike) -> tuple[mx.array, mx.array]:
    """Copy whole blocks `src[i] -> dst[i]` in both pools (copy-on-write). Reads see the pools before the copy.

    The source blocks are evaluated before the scatter (a sync point): a gather still pending on the pool
    would make MLX copy the whole pool instead of writing the destination blocks in place.
    """
    src = _int32(src).reshape(-1)
    dst = _int32(dst).reshape(-1)
    if src.shape != dst.shape:
        raise ValueError(f"copy_blocks: {src.shape[0]} source blocks but {dst.shape[0]} destinations")
    if src.shape[0] == 0:
        return k_pool, v_pool
    k_blocks, v_blocks = k_pool[src], v_pool[src]
    mx.eval(k_blocks, v_blocks)
    # A reshape to the same shape is a new array object on the same data, so the caller's pool objects stay
    # as they were; `[...] =` then rebinds only ours.
    k_out = k_pool.reshape(k_pool.shape)
    v_out = v_pool.reshape(v_pool.shape)
    k_out[dst] = k_blocks
    v_out[dst] = v_blocks
    return k_out, v_out


def token_positions(query_lens: IntsLike, context_lens: IntsLike) -> tuple[mx.array, mx.array]:
    """For each packed query token: its sequence and its position in that sequence's context (int32 `[T]`).

    Position of the j-th query of sequence i: `context_lens[i] - query_lens[i] + j`.
    """
    qlens = _host_ints(query_lens)
    seq = np.repeat(np.arange(len(qlens), dtype=np.int32), qlens)
    starts = np.cumsum(qlens) - qlens
    j = np.arange(len(seq), dtype=np.int64) - starts[seq]
    seq_mx = mx.array(seq)
    pos = mx.take(_int32(context_lens), seq_mx) - mx.array((qlens[seq] - j).astype(np.int32))
    return seq_mx, pos


@dataclass(frozen=True)
class AttentionGroup:
    """Sequences of a step attended together by one masked attention: all the decodes, or longer queries of
    similar sizes (`_prefill_groups`).

    Splitting them keeps a prefill chunk from padding every decode to its query length."""

    rows: slice | mx.array  # the group's query rows in the pack
    # int32 [B, max_ctx]: the pool slot of each context position (max_ctx: the group's longest context); past a
    # shorter context, the slot of its position 0: written, finite data that the mask hides
    slots: mx.array
    mask: mx.array | None  # bool [B, 1, max_q, max_ctx], broadcast over heads (None: attend to all)
    pad: mx.array | None  # [B * max_q] row of the group's queries for each padded row (None: no padding)
    unpad: mx.array | None  # [rows] padded row holding each real query (None: no padding)
    batch: int
    max_q: int
    # (KV heads, index dtype) -> the head-row index `_gathered` takes contexts by, built once a step: every
    # layer, K and V alike, gathers by the same one (built per layer, it cost each layer two index kernels and
    # two aranges more, 112 launches a step on a 28-layer model)
    head_rows: dict = field(default_factory=dict, compare=False, repr=False)

    def head_row_index(self, num_kv_heads: int, dtype: mx.Dtype) -> mx.array:
        """int `[B, Hkv, max_ctx]`: row `slot * Hkv + head` of a pool seen as `[slots * Hkv, D]`."""
        index = self.head_rows.get((num_kv_heads, dtype))
        if index is None:
            index = self.head_rows[num_kv_heads, dtype] = head_row_index(self.slots, num_kv_heads, dtype)
        return index


def head_row_index(slots: mx.array, num_kv_heads: int, dtype: mx.Dtype) -> mx.array:
    """`AttentionGroup.head_row_index` of gather slots `[B, max_ctx]`, built anew."""
    slots = slots.astype(dtype)
    return slots[:, None, :] * num_kv_heads + mx.arange(num_kv_heads, dtype=dtype)[None, :, None]


@dataclass
class AttentionPlan:
    """A step's attention layout, planned once on the host and shared by every layer.

    The groups (`groups`, `restore`) are planned when first read: the Metal kernel attends from the host
    metadata alone, and planning them (slots, masks, padding, copied to the device) cost the host ~1 ms for a
    wave of 64 prompts of 128 tokens on the CPU host, in every step, for groups the kernel never reads."""

    num_tokens: int
    planned: tuple[AttentionGroup, ...] | None  # the groups; None: not planned yet
    planned_restore: mx.array | None  # `restore` once planned
    # The step's metadata as given (host copies), for kernels that take it per token.
    block_tables: np.ndarray
    context_lens: np.ndarray
    query_lens: np.ndarray
    kernel_inputs: dict = field(default_factory=dict)  # per-step inputs a kernel derived from the above
    window: int | None = None  # sliding window: each query sees its last `window` positions only
    block_size: int = 0  # what groups are planned with

    def _planned(self) -> tuple[tuple[AttentionGroup, ...], mx.array | None]:
        if self.planned is None:
            self.planned, self.planned_restore = _plan_groups(self)
        return self.planned, self.planned_restore

    @property
    def groups(self) -> tuple[AttentionGroup, ...]:
        return self._planned()[0]

    @property
    def restore(self) -> mx.array | None:
        """Packed row of each output row of the concatenated groups (None: in order)."""
        return self._planned()[1]


def _rows(index: np.ndarray) -> slice | mx.array:
    if index.size and (np.diff(index) == 1).all():
        return slice(int(index[0]), int(index[-1]) + 1)
    return mx.array(index.astype(np.int32))


def _plan_group(seqs: np.ndarray, starts: np.ndarray, tables: np.ndarray, ctx: np.ndarray, qlens: np.ndarray,
                block_size: int, window: int | None = None) -> tuple[AttentionGroup, np.ndarray]:
    qlens, ctx = qlens[seqs], ctx[seqs]
    batch, max_q = len(seqs), int(qlens.max())
    width = -(-int(ctx.max()) // block_size)
    if tables.shape[1] < width:  # a table narrower than its context: the caller's bug
        raise ValueError(f"paged_attention: block tables have {tables.shape[1]} columns but a context of "
                         f"{int(ctx.max())} tokens needs {width} blocks of {block_size}")
    # Key column c of sequence i is context position first_i + c: with a sliding window only the positions its
    # queries can see are gathered (their first query's window onwards), so a long context costs its window.
    first = np.zeros_like(ctx) if window is None else np.maximum(0, ctx - qlens - window + 1)
    max_ctx = int((ctx - first).max())
    kcol = np.arange(max_ctx)
    inside = kcol[None, :] < (ctx - first)[:, None]
    kpos = first[:, None] + kcol[None, :]
    kpos_or_0 = np.where(inside, kpos, first[:, None])
    slots = tables[seqs[:, None], kpos_or_0 // block_size] * block_size + kpos_or_0 % block_size
    packed = np.concatenate([np.arange(starts[s], starts[s] + qlens[i]) for i, s in enumerate(seqs)])

    # Padded query row (i, j) is query min(j, qlen_i - 1) of sequence i: padding rows repeat the sequence's last
    # query, so every row sees at least one key (no all-masked row, no NaN); they are dropped after.
    j = np.arange(max_q)[None, :]
    j_real = np.minimum(j, qlens[:, None] - 1)
    group_start = np.cumsum(qlens) - qlens
    padded = (qlens == max_q).all()
    pad = None if padded else mx.array((group_start[:, None] + j_real).reshape(-1).astype(np.int32))
    seq_of_row = np.repeat(np.arange(batch), qlens)
    unpad = None if padded else mx.array(
        (seq_of_row * max_q + np.arange(len(packed)) - group_start[seq_of_row]).astype(np.int32))

    # Causal by position: row (i, j) is context position ctx_i - qlen_i + j and sees keys 0..that position
    # (the last `window` of them), all inside the context, so the mask also hides the padding past it. Equal
    # contexts of single queries need none (mlx-lm's decode step has none either); nor does a decode's window,
    # which is exactly the columns gathered.
    qpos = ctx[:, None] - qlens[:, None] + j_real
    full = max_q == 1 and inside.all()
    seen = kpos[:, None, :] <= qpos[:, :, None]
    if window is not None:
        seen &= kpos[:, None, :] > qpos[:, :, None] - window
    mask = None if full else mx.array(seen[:, None])
    group = AttentionGroup(_rows(packed), mx.array(slots.astype(np.int32)), mask, pad, unpad, batch, max_q)
    return group, packed


# A group's attention is padded to its longest query and its longest context. Past this many padded (query, key)
# positions of waste the longer queries split into groups (a long prompt's chunk beside short ones would pad each
# of them to its size: 64 chunks of 50 tokens beside one of 8,000 would score 4e9 positions a head for 3e7 real).
SPLIT_WASTE = 1 << 22


def _waste(seqs: np.ndarray, qlens: np.ndarray, ctx: np.ndarray) -> int:
    q, c = qlens[seqs].astype(np.int64), ctx[seqs].astype(np.int64)
    return int(len(seqs) * q.max() * c.max() - (q * c).sum())


def _prefill_groups(seqs: np.ndarray, qlens: np.ndarray, ctx: np.ndarray) -> list[np.ndarray]:
    """The longer queries' groups: one while its padding wastes at most `SPLIT_WASTE` positions (every group
    costs each layer its own kernels), else longest queries first, a new group wherever the next would pass it.
    Each group keeps the step's order (contiguous rows stay a slice)."""
    if _waste(seqs, qlens, ctx) <= SPLIT_WASTE:
        return [seqs]
    groups, current = [], []
    for s in seqs[np.argsort(-qlens[seqs], kind="stable")]:
        if current and _waste(np.array([*current, s]), qlens, ctx) > SPLIT_WASTE:
            groups.append(np.sort(np.array(current)))
            current = []
        current.append(s)
    groups.append(np.sort(np.array(current)))
    return groups


def plan_attention(block_tables: IntsLike, context_lens: IntsLike, query_lens: IntsLike,
                   block_size: int, window: int | None = None) -> AttentionPlan:
    """Plan a step's attention (on the host: `mx.array` arguments are evaluated; pass numpy or lists); with a
    sliding `window`, each query sees its last `window` positions."""
    qlens = _host_ints(query_lens)
    ctx = _host_ints(context_lens)
    num_tokens = int(qlens.sum())
    tables = np.asarray(block_tables, dtype=np.int64)
    tables = tables.reshape(len(qlens), tables.size // max(len(qlens), 1))
    return AttentionPlan(num_tokens, () if num_tokens == 0 else None, None, tables, ctx, qlens, window=window,
                         block_size=block_size)


def _plan_groups(plan: AttentionPlan) -> tuple[tuple[AttentionGroup, ...], mx.array | None]:
    """A plan's groups and the order that puts their rows back (`AttentionPlan.groups`)."""
    qlens, ctx, tables = plan.query_lens, plan.context_lens, plan.block_tables
    starts = np.cumsum(qlens) - qlens
    groups, order = [], []
    longer = np.flatnonzero(qlens > 1)
    for seqs in (np.flatnonzero(qlens == 1), *(_prefill_groups(longer, qlens, ctx) if longer.size else ())):
        if seqs.size:
            group, packed = _plan_group(seqs, starts, tables, ctx, qlens, plan.block_size, plan.window)
            groups.append(group)
            order.append(packed)
    rows = np.concatenate(order) if order else np.zeros(0, dtype=np.int64)
    in_order = (rows == np.arange(plan.num_tokens)).all()
    return tuple(groups), None if in_order else mx.array(np.argsort(rows).astype(np.int32))


# Whether the attention goes through MLX's fused SDPA (None: where MLX computes on Metal, whose kernels take the
# mask; `grouped_attention` elsewhere). A setting for profilers comparing the two, not a user's.
FUSED_SDPA: bool | None = None
# Whether `grouped_attention` scales masked scores in the mask's kernel (else the queries, a kernel more a layer).
# For profilers too.
SCALE_MASKED_SCORES = True


def _fused_sdpa() -> bool:
    if FUSED_SDPA is not None:
        return FUSED_SDPA
    return mx.default_device().type == mx.DeviceType.gpu and mx.metal.is_available()


def _gathered(pool: mx.array, group: AttentionGroup) -> mx.array:
    """The group's contexts `[B, Hkv, max_ctx, D]` from the pool, gathered in that order: one `take` of whole
    head rows (a slot's head), by index `slot * Hkv + head`. Gathered by slot alone (`[B, max_ctx, Hkv, D]`) and
    transposed, each attention matmul after would copy the layer's whole context again.

    The rows are moved as 8-byte words (`_word`): MLX's gather on CUDA (0.32) spends a thread, an index lookup
    and a strided address computation on every element it moves, so a bf16 row of 128 moved as 32 words costs
    a quarter of the threads; the bytes, and so the result, are the same. Measured on an H100 (a 28-layer bf16
    model's compiled decode step, 256-token contexts): 17.0 ms a step at 64 rows gathered element by element,
    7.1 ms as words (benchmarks/RESULTS-gpu.md)."""
    num_blocks, block_size, num_kv_heads, head_dim = pool.shape
    num_rows = num_blocks * block_size * num_kv_heads
    index = group.head_row_index(num_kv_heads, mx.int32 if num_rows < 2**31 else mx.int64)
    rows = pool.reshape(num_rows, head_dim)
    word = _word(rows)
    if word is None:
        return mx.take(rows, index, axis=0)
    return mx.take(rows.view(word), index, axis=0).view(pool.dtype)


def _word(rows: mx.array) -> mx.Dtype | None:
    """The widest unsigned integer type a row of `rows` is a whole number of (None: the row's own type is)."""
    row_bytes = rows.shape[-1] * rows.dtype.size
    for word in (mx.uint64, mx.uint32):
        if word.size > rows.dtype.size and row_bytes % word.size == 0:
            return word
    return None


def attend(queries: mx.array, k_pool: mx.array, v_pool: mx.array, plan: AttentionPlan, scale: float,
           sinks: mx.array | None = None, softcap: float | None = None) -> mx.array:
    """`paged_attention` with its layout planned already (`plan_attention`); `sinks` [Hq]: attention sinks;
    `softcap`: Gemma 2's attention-logit softcapping (`grouped_attention`)."""
    num_tokens, num_heads, head_dim = queries.shape
    value_dim = v_pool.shape[-1]  # the output's width: MLA's values are narrower than its keys and queries
    if num_tokens != plan.num_tokens:
        raise ValueError(f"paged_attention: query_lens sum to {plan.num_tokens} but there are "
                         f"{num_tokens} query tokens")
    if num_tokens == 0:
        return mx.zeros((0, num_heads, value_dim), dtype=queries.dtype)
    fused = softcap is None and _fused_sdpa()
    outs = []
    for g in plan.groups:
        q = queries[g.rows]
        if g.pad is not None:
            q = q[g.pad]
        k, v = _gathered(k_pool, g), _gathered(v_pool, g)
        if g.max_q == 1 and not fused:
            # One query a sequence: its query heads straight to [B, Hkv, group, D] and back, without the
            # [B, Hq, 1, D] form in between (each reshape a graph node a layer: the compiled step's replay).
            kv_heads = k.shape[1]
            out = _grouped(q.reshape(g.batch, kv_heads, num_heads // kv_heads, head_dim), k, v, scale, g.mask,
                           sinks, softcap, 1).reshape(g.batch, num_heads, value_dim)
        else:
            # [B * L, Hq, D] -> [B, Hq, L, D]; with one query a row (decodes) that is a reshape, no transpose.
            q = (q.reshape(g.batch, num_heads, 1, head_dim) if g.max_q == 1
                 else q.reshape(g.batch, g.max_q, num_heads, head_dim).transpose(0, 2, 1, 3))
            if fused:
                out = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=g.mask, sinks=sinks)
            else:
                out = grouped_attention(q, k, v, scale, g.mask, sinks, softcap)
            out = (out.reshape(g.batch, num_heads, value_dim) if g.max_q == 1
                   else out.transpose(0, 2, 1, 3).reshape(g.batch * g.max_q, num_heads, value_dim))
        outs.append(out if g.unpad is None else out[g.unpad])
    out = outs[0] if len(outs) == 1 else mx.concatenate(outs)
    return out if plan.restore is None else out[plan.restore]


def grouped_attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask: mx.array | None,
                      sinks: mx.array | None = None, softcap: float | None = None) -> mx.array:
    """Attention written out in MLX ops, as MLX's SDPA computes it where it has no fused kernel for a mask (its
    CUDA and CPU backends): scaled masked scores (the queries scaled first where there is no mask), a
    float32-precise softmax. q `[B, Hq, L, D]`, k/v `[B, Hkv, ctx, D]`, `mask` bool `[B, 1, L, ctx]`; `sinks`
    [Hq] as MLX's SDPA takes them; `softcap`: scores capped by `softcap * tanh(scores / softcap)` before the mask
    (Gemma 2, as its mlx-lm model computes them; MLX's SDPA takes no softcap).

    Written out because MLX's SDPA with a mask costs more there: on CUDA a fused primitive whose launches made a
    one-row compiled decode step of a 28-layer model 10.2 ms against 5.3 written out (an H100, same run:
    benchmarks/RESULTS-gpu.md), on the CPU a fallback that broadcasts K and V to every query head of a group.
    Here each KV head's query heads are rows of one matmul over its keys."""
    batch, heads, length, dim = q.shape
    kv_heads = k.shape[1]
    out = _grouped(q.reshape(batch, kv_heads, heads // kv_heads * length, dim), k, v, scale, mask, sinks, softcap,
                   length)
    return out.reshape(batch, heads, length, v.shape[-1])


def _grouped(q: mx.array, k: mx.array, v: mx.array, scale: float, mask: mx.array | None, sinks: mx.array | None,
             softcap: float | None, length: int) -> mx.array:
    """`grouped_attention` of queries grouped by KV head, q `[B, Hkv, group * L, D]` (query head h reads KV
    head h // group); returns `[B, Hkv, group * L, Dv]`. With one query a sequence (L = 1) the scores
    `[B, Hkv, group, ctx]` take the mask `[B, 1, 1, ctx]` as they are (no 5-d view of them, no axis added to the
    mask: two graph nodes a layer fewer)."""
    batch, kv_heads, rows, _ = q.shape
    group, ctx = rows // length, k.shape[2]
    # With a mask and no softcap the scale goes onto the scores in the mask's own kernel (`_scaled_masked`):
    # scaling the queries first is a kernel of its own, one a layer, 28 launches of a 28-layer decode step.
    scale_scores = SCALE_MASKED_SCORES and mask is not None and softcap is None
    if not scale_scores:
        q = q * scale
    scores = q @ k.swapaxes(-1, -2)
    if length > 1:
        scores = scores.reshape(batch, kv_heads, group, length, ctx)
    if softcap is not None:
        scores = mx.tanh(scores / softcap) * softcap
    if mask is not None:
        low = mx.array(mx.finfo(scores.dtype).min, scores.dtype)
        if length > 1:
            mask = mx.expand_dims(mask, 2)
        scores = (_scaled_masked(scores, mask, mx.array(scale, scores.dtype), low) if scale_scores
                  else mx.where(mask, scores, low))
    if sinks is not None:  # one more logit per head, with no value: a column the softmax takes, then dropped
        sink = mx.broadcast_to(sinks.astype(scores.dtype).reshape(1, kv_heads, group, *(1,) * (scores.ndim - 3)),
                               (*scores.shape[:-1], 1))
        scores = mx.concatenate([scores, sink], axis=-1)
    weights = mx.softmax(scores, axis=-1, precise=True)
    if sinks is not None:
        weights = weights[..., :-1]
    if length > 1:
        weights = weights.reshape(batch, kv_heads, rows, ctx)
    return weights @ v


@partial(mx.compile, shapeless=True)
def _scaled_masked(scores: mx.array, mask: mx.array, scale: mx.array, low: mx.array) -> mx.array:
    """Scores scaled where the mask sees them, `low` elsewhere: one fused kernel, in a compiled step or not."""
    return mx.where(mask, scores * scale, low)


def paged_attention(queries: mx.array, k_pool: mx.array, v_pool: mx.array, block_tables: IntsLike,
                    context_lens: IntsLike, query_lens: IntsLike, scale: float, window: int | None = None,
                    sinks: mx.array | None = None, softcap: float | None = None) -> mx.array:
    """Causal attention of packed varlen queries `[T, Hq, D]` over paged K/V; returns `[T, Hq, Dv]` (Dv: the
    V pool's width, D but for MLA's narrower values).

    `block_tables` int32 `[B, max_blocks]`, `context_lens` and `query_lens` `[B]`, all read on the host (pass
    lists or numpy arrays to avoid a sync). GQA: `Hq = r * Hkv`, query head `h` reads KV head `h // r`.
    Decodes (query length 1) and longer queries form two groups; in each, queries are padded to
    `[B, Hq, max_q, D]`, keys and values gathered slot by slot to `[B, Hkv, ctx, D]` (ctx: the group's longest
    context), one masked attention runs (MLX's fused SDPA on Metal, `grouped_attention` elsewhere), and the
    padding is dropped. A sliding `window` gathers and sees each query's last `window` positions only; `sinks`
    [Hq] are attention sinks; `softcap` caps the scores as Gemma 2 does.
    """
    plan = plan_attention(block_tables, context_lens, query_lens, k_pool.shape[1], window)
    return attend(queries, k_pool, v_pool, plan, scale, sinks, softcap)
