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
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vmetal.engine.runner.attention import metal, reference

_HOOKED: set[str] = set()


@dataclass
class StepLayout:
    """Where this step's T packed tokens sit: planned once per step on the host, shared by all layers.

    Planning per layer instead (index arrays built in numpy, copied to the device) cost more host time than the
    GPU's whole decode step on a 28-layer model."""

    positions: Any  # mx.int32 [T]: each token's position in its sequence (RoPE offset)
    writes: Any  # paged_attention.CacheWrites: the pool slots this step's K/V go to
    attention: Any  # paged_attention.AttentionPlan: who attends to which blocks
    # The same for each sliding window the model's layers use (window -> plan).
    windowed: dict[int, Any] = field(default_factory=dict)

    @classmethod
    def plan(cls, positions: Any, slot_mapping: Any, block_tables: Any, context_lens: Any, query_lens: Any,
             block_size: int, windows: tuple[int, ...] = ()) -> StepLayout:
        """From host arrays: positions and slot mapping `[T]`, block tables `[B, max_blocks]`, context and
        query lengths `[B]`; `windows`: the sliding windows of the model's local layers."""
        import mlx.core as mx

        return cls(mx.array(np.asarray(positions, dtype=np.int32)), reference.plan_writes(slot_mapping),
                   reference.plan_attention(block_tables, context_lens, query_lens, block_size),
                   {w: reference.plan_attention(block_tables, context_lens, query_lens, block_size, w)
                    for w in windows})

    def attention_for(self, window: int | None) -> Any:
        return self.attention if window is None else self.windowed[window]


class PagedLayerCache:
    """One layer's pools, speaking mlx-lm's cache protocol for a packed step.

    `kernels`: per op, whether its Metal kernel runs (`metal.kernel_choice`, decided once by the runner);
    none by default (the pure-MLX reference)."""

    def __init__(self, k_pool: Any, v_pool: Any, kernels: Mapping[str, bool] | None = None,
                 window: int | None = None):
        self.k_pool = k_pool
        self.v_pool = v_pool
        self.kernels = kernels or metal.kernel_choice(False)
        # A sliding-window layer (mlx-lm's RotatingKVCache on the MLX path): its blocks hold every token, as
        # vLLM's KV manager allocates them for a full-attention layer; its queries see the window only.
        self.window = window
        self.layout: StepLayout | None = None
        self.keep_kv = False  # keep the next step's keys and values in `kept_kv`
        self.kept_kv: tuple[Any, Any] | None = None

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
                                                     self.layout.writes, use_kernel=self.kernels["reshape_and_cache"])
        return keys, values

    def attention(self, queries: Any, scale: float, sinks: Any = None) -> Any:
        """queries [T, heads, 1, head_dim] -> attention output of the same shape; `sinks` [heads]: gpt-oss's
        attention sinks."""
        out = metal.attend(queries[:, :, 0, :], self.k_pool, self.v_pool, self.layout.attention_for(self.window),
                           scale, use_kernel=self.kernels["paged_attention"], sinks=sinks)
        return out[:, :, None, :]

    @property
    def nbytes(self) -> int:
        return self.k_pool.nbytes + self.v_pool.nbytes


def install_attention_hook(model: Any) -> None:
    """Route SDPA to our caches when it is handed a PagedLayerCache, in every module the model's attention
    calls it from (`cache_types.attention_modules`: SmolLM3's is Llama's). Whether that is all of its attention
    (no family-specific attention code, one width for K and V) is the pre-flight's `paged_obstacle`.

    Any other cache (the MLX-managed path, mlx-lm's own generate) goes to the
    original function unchanged.
    """
    from vmetal.preflight.cache_types import attention_modules

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
