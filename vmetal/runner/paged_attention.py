"""Paged KV cache and attention in plain MLX: the reference every device runs and every kernel is tested against.

Layout (vLLM's): per layer one K pool and one V pool, each `[num_blocks, block_size, num_kv_heads, head_dim]`.
The token at position `p` of a sequence with block table `bt` lives in slot
`bt[p // block_size] * block_size + p % block_size` of the pool seen as `[num_blocks * block_size, ...]`.
Slot `-1` in a slot mapping is padding: nothing is written.

A step's queries come packed, sequence after sequence (cu-seqlens order): sequence `i` contributes
`query_lens[i]` queries, the last `query_lens[i]` positions of its context of `context_lens[i]` tokens, whose
K/V are already in the pools (written by `reshape_and_cache` before attention). A decode is a query length of 1,
a prefill chunk a query length of n. Causal: the query at context position `p` sees keys `0..p`.

Functional: MLX arrays are values, so every function returns new pools and the caller rebinds them. The writes
are MLX scatters, which update the pool's buffer in place when nothing else holds the old pool when the step is
evaluated: rebind every reference to the old pool (and keep no view of it) before `mx.eval`, or MLX copies the
whole pool, per layer, per step.

`vmetal.kernels` has the same functions, running Metal kernels where MLX has Metal and these elsewhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx
import numpy as np

IntsLike = Sequence[int] | np.ndarray | mx.array


def _int32(x: IntsLike) -> mx.array:
    return x.astype(mx.int32) if isinstance(x, mx.array) else mx.array(np.asarray(x, dtype=np.int32))


def _host_ints(x: IntsLike) -> np.ndarray:
    """Host copy of small integer metadata (evaluates an `mx.array`: pass host lists to avoid the sync)."""
    return np.asarray(x, dtype=np.int64).reshape(-1)


def reshape_and_cache(keys: mx.array, values: mx.array, k_pool: mx.array, v_pool: mx.array,
                      slot_mapping: IntsLike) -> tuple[mx.array, mx.array]:
    """Write `keys`/`values` `[T, Hkv, D]` into the pools at `slot_mapping` `[T]`; slot -1 writes nothing.

    Values are cast to the pool dtype. Two tokens with the same real slot: one of them wins (vLLM never does it).
    `slot_mapping` is read on the host to drop the -1 slots (MLX scatters have no "skip" index, and anything
    that reads the pool before the scatter, such as a scratch row or an old value to write back, makes MLX copy
    the whole pool): pass a list or numpy array; an `mx.array` is evaluated.
    """
    num_blocks, block_size, num_kv_heads, head_dim = k_pool.shape
    slots = _host_ints(slot_mapping)
    keep = np.flatnonzero(slots >= 0)
    if keep.size == 0:
        return k_pool, v_pool
    if keep.size < slots.size:
        rows = mx.array(keep.astype(np.int32))
        keys, values, slots = keys[rows], values[rows], slots[keep]
    index = mx.array(slots.astype(np.int32))
    k_flat = k_pool.reshape(num_blocks * block_size, num_kv_heads, head_dim)
    v_flat = v_pool.reshape(num_blocks * block_size, num_kv_heads, head_dim)
    k_flat[index] = keys.astype(k_pool.dtype)
    v_flat[index] = values.astype(v_pool.dtype)
    return k_flat.reshape(k_pool.shape), v_flat.reshape(v_pool.shape)


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


def gather_context(pool: mx.array, block_tables: mx.array, context_lens: IntsLike) -> mx.array:
    """Each sequence's context `[B, Hkv, max_ctx, D]`, `max_ctx = max_blocks * block_size`.

    Positions at or past a sequence's context length are zero, whatever the pool holds there (freed blocks,
    padding entries of the block table, uninitialised memory), so a masked-out position never brings a NaN
    into `probabilities @ V`. Negative block table entries (padding) are read as block 0 and zeroed.
    """
    _, block_size, num_kv_heads, head_dim = pool.shape
    tables = mx.maximum(_int32(block_tables), 0)
    batch, max_blocks = tables.shape
    max_ctx = max_blocks * block_size
    ctx = pool[tables].reshape(batch, max_ctx, num_kv_heads, head_dim)
    inside = mx.arange(max_ctx)[None, :] < _int32(context_lens)[:, None]
    ctx = mx.where(inside[:, :, None, None], ctx, mx.zeros((), dtype=pool.dtype))
    return ctx.transpose(0, 2, 1, 3)


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


def paged_attention(queries: mx.array, k_pool: mx.array, v_pool: mx.array, block_tables: IntsLike,
                    context_lens: IntsLike, query_lens: IntsLike, scale: float) -> mx.array:
    """Causal attention of packed varlen queries `[T, Hq, D]` over paged K/V; returns `[T, Hq, D]`.

    `block_tables` int32 `[B, max_blocks]`, `context_lens` and `query_lens` `[B]`. GQA: `Hq = r * Hkv`, query
    head `h` reads KV head `h // r`. Queries are padded to `[B, Hq, max_q, D]`, keys gathered to
    `[B, Hkv, max_ctx, D]`, one masked `mx.fast.scaled_dot_product_attention` runs, and the padding is dropped.
    `query_lens` is read on the host (it sets `max_q`); pass a list to avoid a sync.
    """
    num_tokens, num_heads, head_dim = queries.shape
    qlens = _host_ints(query_lens)
    if int(qlens.sum()) != num_tokens:
        raise ValueError(f"paged_attention: query_lens sum to {int(qlens.sum())} but there are "
                         f"{num_tokens} query tokens")
    batch = len(qlens)
    if num_tokens == 0:
        return mx.zeros((0, num_heads, head_dim), dtype=queries.dtype)
    tables = _int32(block_tables)
    ctx_lens = _int32(context_lens)
    max_q = int(qlens.max())

    # Padded query row (i, j) holds packed query starts[i] + min(j, qlen_i - 1): padding rows repeat the
    # sequence's last query, so every row sees at least one key (no all-masked row, no NaN) and is dropped after.
    starts = np.cumsum(qlens) - qlens
    j = np.arange(max_q)[None, :]
    j_real = np.minimum(j, np.maximum(qlens[:, None] - 1, 0))
    pad_src = np.clip(starts[:, None] + j_real, 0, num_tokens - 1).reshape(-1)
    seq = np.repeat(np.arange(batch), qlens)
    unpad = seq * max_q + (np.arange(num_tokens) - starts[seq])

    q = queries[mx.array(pad_src.astype(np.int32))]
    q = q.reshape(batch, max_q, num_heads, head_dim).transpose(0, 2, 1, 3)
    k = gather_context(k_pool, tables, ctx_lens)
    v = gather_context(v_pool, tables, ctx_lens)

    # Causal by position: row (i, j) is context position ctx_i - qlen_i + j and sees keys 0..that position
    # (which are all inside the context). [B, 1, max_q, max_ctx], broadcast over heads.
    qpos = ctx_lens[:, None] - mx.array(qlens.astype(np.int32))[:, None] + mx.array(j_real.astype(np.int32))
    kpos = mx.arange(k.shape[2])
    mask = (kpos[None, None, :] <= mx.maximum(qpos, 0)[:, :, None])[:, None]

    out = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    out = out.transpose(0, 2, 1, 3).reshape(batch * max_q, num_heads, head_dim)
    return out[mx.array(unpad.astype(np.int32))]
