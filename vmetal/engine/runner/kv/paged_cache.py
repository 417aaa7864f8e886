"""The paged KV path's hook into mlx-lm models.

vLLM owns the blocks; each layer's K and V live in pools
`[num_blocks, block_size, kv_heads, head_dim]` (vLLM's LBNHC layout). One step
packs every scheduled token, decode tokens and prefill chunks alike, into a
single forward over `[T, 1]` inputs: each token is its own batch row, so
mlx-lm's RoPE takes one position per token through its per-row `offset`, and
projections and MLPs run once over all T tokens with no padding.

mlx-lm's attention modules call `cache.update_and_fetch` and then their module's
`scaled_dot_product_attention`; `install_attention_hook` routes the latter to
`PagedLayerCache.attention`, which attends each sequence's queries over its
context gathered by block table (`vmetal.engine.runner.attention`).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from vmetal.engine.runner.attention import metal, reference

_HOOKED: set[str] = set()

View = tuple[int, "int | None"]  # (KV cache group, sliding window or None): what a layer attends through
FULL: tuple[View, ...] = ((0, None),)  # a model of full-attention layers in one group


@dataclass
class StepLayout:
    """Where this step's T packed tokens sit: planned once per step on the host, shared by all layers.

    Planning per layer instead (index arrays built in numpy, copied to the device) cost more host time than the
    GPU's whole decode step on a 28-layer model.

    A model with sliding-window layers has several of vLLM's KV cache groups (`SlidingWindowSpec`, one block
    table each: a sliding group's blocks past its window are freed); a layer writes through its group's slots and
    attends through the plan of its (group, window) "view"."""

    positions: Any  # mx.int32 [T]: each token's position in its sequence (RoPE offset)
    writes: tuple[Any, ...]  # per KV cache group, paged_attention.CacheWrites: the pool slots this step's K/V go to
    attention: dict[tuple[int, int | None], Any]  # per view (group, window), paged_attention.AttentionPlan

    @classmethod
    def plan(cls, positions: Any, slot_mapping: Any, block_tables: Any, context_lens: Any, query_lens: Any,
             block_size: int, windows: tuple[int, ...] = ()) -> StepLayout:
        """One KV cache group's step, from host arrays: positions and slot mapping `[T]`, block tables
        `[B, max_blocks]`, context and query lengths `[B]`; `windows`: the sliding windows of its layers."""
        return cls.plan_groups(positions, [slot_mapping], [block_tables], context_lens, query_lens, block_size,
                               [(0, None), *((0, w) for w in windows)])

    @classmethod
    def plan_groups(cls, positions: Any, slot_mappings: Any, block_tables: Any, context_lens: Any,
                    query_lens: Any, block_size: int, views: Any) -> StepLayout:
        """Per KV cache group `g`: its slot mapping and block tables; `views`: the (group, window) pairs the
        model's layers attend through."""
        import mlx.core as mx

        return cls(mx.array(np.asarray(positions, dtype=np.int32)),
                   tuple(reference.plan_writes(slots) for slots in slot_mappings),
                   {(g, w): reference.plan_attention(block_tables[g], context_lens, query_lens, block_size, w)
                    for g, w in views})


class KVPool:
    """One K and one V pool `[num_blocks, block_size, kv_heads, head_dim]`, shared by one layer of each KV cache
    group: vLLM hands each block id to one group only, so layers of different groups share the memory as vLLM's
    own `KVCacheTensor`s alias it (what a sliding group frees, a full-attention group can use)."""

    __slots__ = ("k", "v")

    def __init__(self, k: Any, v: Any):
        self.k = k
        self.v = v

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


class PagedLayerCache:
    """One layer's pools, speaking mlx-lm's cache protocol for a packed step.

    `kernels`: per op, whether its Metal kernel runs (`metal.kernel_choice`, decided once by the runner);
    none by default (the pure-MLX reference)."""

    def __init__(self, k_pool: Any, v_pool: Any, kernels: Mapping[str, bool] | None = None,
                 window: int | None = None, group: int = 0):
        self.pool = KVPool(k_pool, v_pool)
        self.kernels = kernels or metal.kernel_choice(False)
        # A sliding-window layer (mlx-lm's RotatingKVCache on the MLX path) sees its last `window` positions.
        self.window = window
        self.group = group  # its KV cache group: whose block table and slots it uses
        self.layout: StepLayout | None = None
        self.keep_kv = False  # keep the next step's keys and values in `kept_kv`
        self.kept_kv: tuple[Any, Any] | None = None

    @classmethod
    def sharing(cls, pool: KVPool, kernels: Mapping[str, bool] | None = None, window: int | None = None,
                group: int = 0) -> PagedLayerCache:
        """A layer of KV cache group `group` on a pool other groups' layers share."""
        layer = cls(None, None, kernels, window, group)
        layer.pool = pool
        return layer

    @property
    def k_pool(self) -> Any:
        return self.pool.k

    @k_pool.setter
    def k_pool(self, value: Any) -> None:
        self.pool.k = value

    @property
    def v_pool(self) -> Any:
        return self.pool.v

    @v_pool.setter
    def v_pool(self, value: Any) -> None:
        self.pool.v = value

    @property
    def view(self) -> tuple[int, int | None]:
        """The (group, window) plan this layer attends through."""
        return self.group, self.window

    @property
    def offset(self) -> Any:
        assert self.layout is not None
        return self.layout.positions

    def make_mask(self, *args: Any, **kwargs: Any) -> None:
        # Causality and sequence boundaries are applied in `attention`.
        return None

    def update_and_fetch(self, keys: Any, values: Any) -> tuple[Any, Any]:
        """keys/values [T, kv_heads, 1, head_dim]: write them to their slots."""
        assert self.layout is not None
        if self.keep_kv:
            self.kept_kv = (keys[:, :, 0, :], values[:, :, 0, :])
        self.k_pool, self.v_pool = metal.write_cache(keys[:, :, 0, :], values[:, :, 0, :], self.k_pool, self.v_pool,
                                                     self.layout.writes[self.group],
                                                     use_kernel=self.kernels["reshape_and_cache"])
        return keys, values

    def attention(self, queries: Any, scale: float, sinks: Any = None, softcap: float | None = None) -> Any:
        """queries [T, heads, 1, head_dim] -> attention output of the same shape; `sinks` [heads]: gpt-oss's
        attention sinks; `softcap`: Gemma 2's attention-logit softcapping."""
        out = metal.attend(queries[:, :, 0, :], self.k_pool, self.v_pool, self.layout.attention[self.view],
                           scale, use_kernel=self.kernels["paged_attention"], sinks=sinks, softcap=softcap)
        return out[:, :, None, :]

def install_attention_hook(model: Any) -> None:
    """Route SDPA to our caches when it is handed a PagedLayerCache, in every module the model's attention
    calls it from (`cache_types.attention_modules`: SmolLM3's is Llama's), and gives the attention classes that
    compute their scores in their own code a paged `__call__` (`own_attention`: Gemma 2). Whether that is all
    of its attention is the pre-flight's `paged_obstacle`.

    Any other cache (the MLX-managed path, mlx-lm's own generate) goes to the
    original function unchanged.
    """
    from vmetal.engine.runner.kv import own_attention
    from vmetal.preflight.cache_types import attention_modules

    own_attention.install(model, PagedLayerCache)
    for module_name in attention_modules(model):
        if module_name in _HOOKED:
            continue
        module = importlib.import_module(module_name)
        module.scaled_dot_product_attention = _routed(module.scaled_dot_product_attention)
        _HOOKED.add(module_name)


def _routed(original: Any) -> Any:
    def scaled_dot_product_attention(queries, keys, values, cache, scale, mask, *args, sinks=None, **kwargs):
        if isinstance(cache, PagedLayerCache):
            if args or kwargs:  # an argument the paged attention would drop: fail, never compute it wrong
                raise TypeError(f"paged attention cannot honour mlx-lm's SDPA arguments {list(kwargs) or args}")
            return cache.attention(queries, scale, sinks)
        if sinks is not None:
            kwargs["sinks"] = sinks
        return original(queries, keys, values, *args, cache=cache, scale=scale, mask=mask, **kwargs)

    return scaled_dot_product_attention
