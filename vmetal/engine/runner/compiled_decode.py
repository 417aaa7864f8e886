"""The paged path's all-decode steps, and its speculating steps, as compiled MLX functions, one per (rows,
context) bucket.

Why: an all-decode step builds the same graph every step but for its sizes. Built op by op in Python it costs
the host about 2 ms a step on a 28-layer model (most of a decode step's host time on a GPU:
benchmarks/bench_host.py), time a Mac's GPU waits through. `mx.compile` traces the step once and replays it from
C++, fusing elementwise ops on the way (fewer kernels to launch). As vLLM's CUDA graphs take capture sizes, a
compiled step takes buckets: rows padded to a power of two, the gathered context to a power of two up to
`CONTEXT_STEP` tokens and to a multiple of it beyond; a bucket is traced when first met (`VLLM_METAL_DEBUG`
logs it). A speculating step is one too: each request a sequence of rows (its last token, its drafts) that
gathers its context once (`plan_decode`'s `queries`). Prefill chunks, prompt logprobs and pipeline stages keep
the op-by-op forward.

Padding rows write their K/V to a dump block no request owns and attend to its first slot alone; their logits
are cut off. Padding context columns read the slot of the row's position 0 (written, or in a sliding group's
freed block vLLM's null block, never written: finite either way) and are masked. Each step's K/V pools (one
per layer, or one shared by a layer of each KV cache group) go in as arguments and come back as results (arrays
captured by a compiled function are constants of its trace); nothing else holds the old pools when the step
runs, so MLX still writes them in place.

`VLLM_METAL_COMPILE=0` turns it off. With the Metal kernels on, the attention kernel is part of the compiled
step; that combination runs only on a Mac, with the same inputs the op-by-op step gives the kernel.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from vmetal.engine.models import logits_at
from vmetal.engine.runner.attention.reference import AttentionGroup, AttentionPlan, CacheWrites
from vmetal.engine.runner.kv.paged_cache import FULL, KVPool, PagedLayerCache, StepLayout, View

logger = logging.getLogger("vllm.vmetal")

MIN_CONTEXT = 64  # the smallest context bucket, in tokens
CONTEXT_STEP = 1024  # past this, context buckets grow by this much (a power of two would gather up to twice)


def rows_bucket(rows: int) -> int:
    """The padded row count of a step of `rows` decodes: the next power of two."""
    return 1 << max(rows - 1, 0).bit_length()


def context_bucket(tokens: int) -> int:
    """The gathered context width of a step whose longest context is `tokens`."""
    if tokens <= CONTEXT_STEP:
        return max(MIN_CONTEXT, 1 << max(tokens - 1, 0).bit_length())
    return -(-tokens // CONTEXT_STEP) * CONTEXT_STEP


@dataclass(frozen=True)
class DecodeInputs:
    """One compiled step's host-planned arrays, padded to its bucket (`Bp` sequences of `Q` rows each, `C`
    context columns), per KV cache group `G` (each its own block tables: `StepLayout`). An all-decode step has
    one row a sequence; a speculating one `Q` (a request's last token and its drafts, `queries`)."""

    positions: np.ndarray  # int32 [Bp * Q]: each row's position (RoPE offset); 0 for padding sequences' rows
    write_slots: np.ndarray  # int32 [G, Bp * Q]: the pool slot each row's K/V goes to, per group
    tables: np.ndarray  # int32 [G, Bp, C / block_size]: block tables, for the attention kernel and full views
    block_size: int
    # Per sliding view (as planned): gather slots [Bp, Cw] and mask [Bp, 1, Q, Cw]. A full view's are built in
    # the step itself from `tables` and `positions` (`full_view`).
    sliding: tuple[tuple[np.ndarray, np.ndarray], ...]
    widths: tuple[int, ...]  # every view's gathered width, in the order planned
    queries: int = 1  # rows a sequence (Q)

    @property
    def key(self) -> tuple[int, ...]:
        """What a trace is specialised on: the rows and every view's width."""
        return (len(self.positions), *self.widths)


def plan_decode(positions: Sequence[int], tables: Sequence[Sequence[Sequence[int]]], block_size: int,
                dump_block: int, views: Sequence[View] = FULL,
                write_slots: Sequence[Sequence[int]] | None = None, queries: int = 1) -> DecodeInputs:
    """Plan a step of rows at `positions`, `queries` consecutive rows a sequence (one: decodes, each its one new
    token; more: a speculating request's last token and drafts, at increasing positions); `tables[g]`: the
    sequences' block tables in KV cache group g (long enough to hold their positions); `views`: the (group,
    window) pairs the layers attend through. A row sees its sequence's positions up to its own (so a draft sees
    the drafts before it); a sliding view gathers only the columns its sequence's rows' windows cover.
    `write_slots[g]`: the rows' pool slots in group g, else found in the tables; needed where a sequence has
    padding rows (fewer tokens than `queries`: they repeat its last position and write to the dump block).

    Host time per step is what a decode step costs on a GPU, and numpy's per-call cost dominates arrays this
    small, so only what a full view cannot get on the device is planned here."""
    rows = len(positions)
    seqs = rows // queries
    padded_seqs = rows_bucket(seqs)
    padded = padded_seqs * queries
    longest = int(max(positions)) + 1
    width = context_bucket(longest)
    cols = width // block_size
    # One conversion of Python lists per group: a numpy assignment per row costs ~1.5 us, 50 us at 32 rows.
    pad = [dump_block] * cols
    table = np.array([[list(t[:cols]) + pad[len(t):] for t in group_tables] + [pad] * (padded_seqs - len(group_tables))
                      for group_tables in tables], dtype=np.int32).reshape(len(tables), padded_seqs, cols)
    all_pos = np.zeros(padded, dtype=np.int32)
    all_pos[:rows] = positions
    dump = dump_block * block_size
    write = np.full((len(tables), padded), dump, dtype=np.int32)  # padding rows write to the dump block
    if write_slots is None:
        at = all_pos[:rows]
        write[:, :rows] = table[:, np.arange(rows) // queries, at // block_size] * block_size + at % block_size
    else:
        for g, group_slots in enumerate(write_slots):
            write[g, :rows] = group_slots

    sliding, widths = [], []
    for g, window in views:
        if window is None:
            widths.append(width)
            continue
        pos = all_pos.astype(np.int64).reshape(padded_seqs, queries)
        real = np.arange(padded_seqs) < seqs
        first = np.maximum(0, pos[:, 0] - window + 1)  # the first row's window starts earliest
        view_cols = min(width, context_bucket(min(window + queries - 1, longest)))
        kpos = first[:, None] + np.arange(view_cols)[None, :]
        seen = ((kpos[:, None, :] <= pos[:, :, None]) & (kpos[:, None, :] > pos[:, :, None] - window)
                & real[:, None, None])
        seen[~real, :, 0] = True  # a padding sequence sees the dump block's first slot, so no row is all masked
        # Columns no row of the sequence sees read position 0: written (or vLLM's null block), finite.
        kpos = np.where(seen.any(axis=1), kpos, 0)
        slots = table[g][np.arange(padded_seqs)[:, None], kpos // block_size].astype(np.int64) * block_size
        slots = np.where(real[:, None], slots + kpos % block_size, dump)
        sliding.append((slots.astype(np.int32), seen[:, None, :, :]))
        widths.append(view_cols)
    return DecodeInputs(all_pos, write, table, block_size, tuple(sliding), tuple(widths), queries)


def full_view(table: Any, positions: Any, offsets: Any) -> tuple[Any, Any]:
    """A full-attention view's gather slots int32 [Bp, C] and mask bool [Bp, 1, Q, C], lazily, from one group's
    block tables int32 [Bp, C / block_size], the rows' positions [Bp * Q] (Q rows a sequence) and `offsets`
    (arange(block_size)).

    Column c is position c: the table's slots in order (no gather). Columns past a sequence's last position
    read the slot of position 0 (written, finite) and are masked; a row sees the columns up to its own
    position; a padding sequence (position 0, the dump block's table) sees the dump block's first slot alone.
    Built inside the compiled step, these are a couple of fused kernels instead of a dozen numpy calls on the
    host and two more arrays to hand MLX every step."""
    import mlx.core as mx

    seqs, cols = table.shape
    block_size = offsets.shape[0]
    slots = (table[:, :, None] * block_size + offsets).reshape(seqs, cols * block_size)
    columns = mx.arange(cols * block_size, dtype=positions.dtype)
    if positions.shape[0] == seqs:  # one row a sequence: its mask is the columns it reads
        seen = columns[None, :] <= positions[:, None]
        return mx.where(seen, slots, slots[:, :1]), seen[:, None, None, :]
    pos = positions.reshape(seqs, -1)
    seen = columns[None, None, :] <= pos[:, :, None]
    # A sequence's last row sees the most (its padding rows repeat its last position).
    return mx.where(columns[None, :] <= pos[:, -1:], slots, slots[:, :1]), seen[:, None, :, :]


class TraceError(RuntimeError):
    """The model's decode step could not be traced (a family whose forward reads values on the host, or
    evaluates inside itself); the runner builds its steps op by op instead."""


class CompiledDecode:
    """The compiled all-decode forward of one model over its paged layers.

    `forward` takes the layers, the distinct pools they share (rebound to the step's results), the step's token
    ids (an `mx.array`, possibly still lazy, or a list) and its plan; it returns the real rows' lazy logits
    [B, V]. `views`: the (group, window) pairs the layers attend through, in the order plans list them."""

    def __init__(self, model: Any, head_on_rows: bool, views: Sequence[View] = FULL):
        import mlx.core as mx

        self.model = model
        self.head_on_rows = head_on_rows
        self.views = tuple(views)
        self._layers: list[PagedLayerCache] = []  # the step's layers while it is traced
        self._pools: list[KVPool] = []  # and their pools
        # keep_kv (the decode-ahead's scratch rows need the step's K/V) is a trace of its own.
        self._compiled = {keep: mx.compile(partial(self._step, keep)) for keep in (False, True)}
        self.traced: set[tuple[bool, tuple[int, ...]]] = set()
        # Called before a trace: tracing reads the graphs of the step's inputs, which a launch thread may be
        # evaluating (the runner's `Launches.settle`).
        self.settle: Callable[[], None] = lambda: None
        self._offsets: dict[int, Any] = {}  # block size -> arange(block_size): its shape carries it into a trace

    def forward(self, layers: list[PagedLayerCache], pools: list[KVPool], tokens: Any, plan: DecodeInputs,
                rows: int, keep_kv: bool = False) -> Any:
        import mlx.core as mx

        padded = len(plan.positions)
        ids = tokens if isinstance(tokens, mx.array) else mx.array(tokens, dtype=mx.int32)
        if padded > rows:
            ids = mx.concatenate([ids.astype(mx.int32), mx.zeros((padded - rows,), dtype=mx.int32)])
        sliding = [(mx.array(slots), mx.array(mask)) for slots, mask in plan.sliding]
        offsets = self._offsets.get(plan.block_size)
        if offsets is None:
            offsets = self._offsets[plan.block_size] = mx.arange(plan.block_size, dtype=mx.int32)
        arrays = [(pool.k, pool.v) for pool in pools]
        for pool in pools:  # only the call's arguments hold the old pools: MLX writes them in place
            pool.k = pool.v = None
        key = (keep_kv, plan.queries, plan.key)
        first = key not in self.traced
        if first:
            self.settle()
        started = time.perf_counter()
        self._layers, self._pools = layers, pools
        try:
            out = self._compiled[keep_kv](ids, mx.array(plan.positions), mx.array(plan.write_slots),
                                          mx.array(plan.tables), offsets, sliding, arrays)
        except BaseException as exc:
            for pool, (k, v) in zip(pools, arrays):
                pool.k, pool.v = k, v
            for layer in layers:
                layer.layout, layer.kept_kv = None, None
            if first and isinstance(exc, Exception):
                raise TraceError(f"{type(exc).__name__}: {exc}") from exc
            raise
        finally:
            self._layers, self._pools = [], []
        del arrays
        for pool, (k, v) in zip(pools, out[1]):
            pool.k, pool.v = k, v
        for layer in layers:
            layer.layout = None
            layer.kept_kv = None
        if keep_kv:
            for layer, kept in zip(layers, out[2]):
                layer.kept_kv = tuple(kept)
        if first:
            self.traced.add(key)
            logger.debug("vmetal: traced the compiled decode step for %d rows (%d a sequence), context %s "
                         "(%.0f ms)", padded, plan.queries, "/".join(map(str, plan.key[1:])),
                         1e3 * (time.perf_counter() - started))
        return out[0][:rows] if padded > rows else out[0]

    def _step(self, keep_kv: bool, ids: Any, positions: Any, write_slots: Any, tables: Any, offsets: Any,
              sliding: list[tuple[Any, Any]], arrays: list[tuple[Any, Any]]) -> list[Any]:
        """The traced step (run by `mx.compile` once per bucket; its arguments are then placeholders)."""
        import mlx.core as mx

        rows, seqs = ids.shape[0], tables.shape[1]
        queries = rows // seqs
        at = mx.arange(rows, dtype=mx.int32)  # each row's sequence, for the attention kernel
        if queries > 1:
            at = at // queries
        plans = {}
        planned = iter(sliding)
        for g, window in self.views:
            slots, mask = full_view(tables[g], positions, offsets) if window is None else next(planned)
            group = AttentionGroup(slice(0, rows), slots, mask, None, None, seqs, queries)
            plans[g, window] = AttentionPlan(rows, (group,), None, _NO_HOST, _NO_HOST, _NO_HOST,
                                             {"paged_attention": (tables[g], at, positions)}, window)
        writes = tuple(CacheWrites(_NO_HOST, None, write_slots[g]) for g in range(write_slots.shape[0]))
        layout = StepLayout(positions, writes, plans)
        for pool, (k, v) in zip(self._pools, arrays):
            pool.k, pool.v = k, v
        for layer in self._layers:
            layer.layout = layout
            layer.keep_kv = keep_kv
        try:
            logits = logits_at(self.model, ids[:, None], self._layers, _all_rows, self.head_on_rows)[:, 0, :]
        finally:
            for layer in self._layers:
                layer.keep_kv = False
        out = [logits, [(pool.k, pool.v) for pool in self._pools]]
        if keep_kv:
            out.append([list(layer.kept_kv) for layer in self._layers])
        return out


# The host copies a plan keeps for the op-by-op kernels; a compiled step hands its kernel device arrays instead.
_NO_HOST = np.zeros(0, dtype=np.int64)


def _all_rows(hidden: Any) -> Any:
    return hidden

