"""The paged path's all-decode steps as compiled MLX functions, one per (rows, context) bucket.

Why: an all-decode step builds the same graph every step but for its sizes. Built op by op in Python it costs
the host about 2 ms a step on a 28-layer model (most of a decode step's host time on a GPU:
benchmarks/bench_host.py), time a Mac's GPU waits through. `mx.compile` traces the step once and replays it from
C++, fusing elementwise ops on the way (fewer kernels to launch). As vLLM's CUDA graphs take capture sizes, a
compiled step takes buckets: rows padded to a power of two, the gathered context to a power of two up to
`CONTEXT_STEP` tokens and to a multiple of it beyond; a bucket is traced when first met (`VLLM_METAL_DEBUG`
logs it). Prefill chunks, prompt logprobs and pipeline stages keep the op-by-op forward.

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
from collections.abc import Sequence
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
    """One all-decode step's host-planned arrays, padded to its bucket (`Bp` rows, `C` context columns), per KV
    cache group `G` (each its own block tables: `StepLayout`)."""

    positions: np.ndarray  # int32 [Bp]: each row's position (RoPE offset); 0 for padding rows
    write_slots: np.ndarray  # int32 [G, Bp]: the pool slot each row's K/V goes to, per group
    tables: np.ndarray  # int32 [G, Bp, C / block_size]: block tables, for the attention kernel
    views: tuple[tuple[np.ndarray, np.ndarray], ...]  # per view (as planned): gather slots [Bp, Cw], mask

    @property
    def key(self) -> tuple[int, ...]:
        """What a trace is specialised on: the rows and every view's width."""
        return (len(self.positions), *(slots.shape[1] for slots, _ in self.views))


def plan_decode(positions: Sequence[int], tables: Sequence[Sequence[Sequence[int]]], block_size: int,
                dump_block: int, views: Sequence[View] = FULL) -> DecodeInputs:
    """Plan a step of decode rows at `positions` (each row's one new token); `tables[g]`: the rows' block tables
    in KV cache group g (long enough to hold that position); `views`: the (group, window) pairs the layers
    attend through. A sliding view gathers only its window's columns."""
    pos = np.asarray(positions, dtype=np.int64)
    rows, padded = len(pos), rows_bucket(len(pos))
    ctx = pos + 1
    width = context_bucket(int(ctx.max()))
    cols = width // block_size
    # One conversion of Python lists per group: a numpy assignment per row costs ~1.5 us, 50 us at 32 rows.
    pad = [dump_block] * cols
    table = np.array([[list(t[:cols]) + pad[len(t):] for t in group_tables] + [pad] * (padded - len(group_tables))
                      for group_tables in tables], dtype=np.int64).reshape(len(tables), padded, cols)
    all_pos = np.zeros(padded, dtype=np.int64)
    all_pos[:rows] = pos
    real = np.arange(padded) < rows
    starts = table * block_size  # [G, Bp, cols]: the first pool slot of each table entry
    row = np.arange(padded)

    planned = []
    for g, window in views:
        first = np.zeros(padded, dtype=np.int64) if window is None else np.maximum(0, all_pos - window + 1)
        cols = width if window is None else min(width, context_bucket(min(window, int(ctx.max()))))
        kpos = first[:, None] + np.arange(cols)[None, :]
        seen = (kpos <= all_pos[:, None]) & real[:, None]
        seen[~real, 0] = True  # a padding row sees the dump block's first slot, so no row is all masked
        if window is None:
            # Column c is position c: the table's slots in order, no gather (a [Bp, C] gather is ~30 us at 32
            # rows); unseen columns read position 0, written and finite, as with a window.
            slots = (starts[g][:, :, None] + np.arange(block_size)).reshape(padded, width)
            slots = np.where(seen, slots, slots[:, :1])
        else:
            kpos = np.where(seen, kpos, 0)
            slots = starts[g][row[:, None], kpos // block_size] + kpos % block_size
        slots = np.where(real[:, None], slots, dump_block * block_size)
        planned.append((slots.astype(np.int32), seen[:, None, None, :]))
    write = np.where(real, starts[:, row, all_pos // block_size] + all_pos % block_size, dump_block * block_size)
    return DecodeInputs(all_pos.astype(np.int32), write.astype(np.int32), table.astype(np.int32), tuple(planned))


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

    def forward(self, layers: list[PagedLayerCache], pools: list[KVPool], tokens: Any, plan: DecodeInputs,
                rows: int, keep_kv: bool = False) -> Any:
        import mlx.core as mx

        padded = len(plan.positions)
        ids = tokens if isinstance(tokens, mx.array) else mx.array(tokens, dtype=mx.int32)
        if padded > rows:
            ids = mx.concatenate([ids.astype(mx.int32), mx.zeros((padded - rows,), dtype=mx.int32)])
        views = [(mx.array(slots), mx.array(mask)) for slots, mask in plan.views]
        arrays = [(pool.k, pool.v) for pool in pools]
        for pool in pools:  # only the call's arguments hold the old pools: MLX writes them in place
            pool.k = pool.v = None
        key = (keep_kv, plan.key)
        first = key not in self.traced
        started = time.perf_counter()
        self._layers, self._pools = layers, pools
        try:
            out = self._compiled[keep_kv](ids, mx.array(plan.positions), mx.array(plan.write_slots),
                                          mx.array(plan.tables), views, arrays)
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
            logger.debug("vmetal: traced the compiled decode step for %d rows, context %s (%.0f ms)", padded,
                         "/".join(map(str, plan.key[1:])), 1e3 * (time.perf_counter() - started))
        return out[0][:rows] if padded > rows else out[0]

    def _step(self, keep_kv: bool, ids: Any, positions: Any, write_slots: Any, tables: Any,
              views: list[tuple[Any, Any]], arrays: list[tuple[Any, Any]]) -> list[Any]:
        """The traced step (run by `mx.compile` once per bucket; its arguments are then placeholders)."""
        import mlx.core as mx

        rows = ids.shape[0]
        at = mx.arange(rows, dtype=mx.int32)
        plans = {}
        for (g, window), (slots, mask) in zip(self.views, views):
            group = AttentionGroup(slice(0, rows), slots, mask, None, None, rows, 1)
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

