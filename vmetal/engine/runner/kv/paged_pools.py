"""The paged path's pools: how much memory they take (`kv_budget`), how vLLM sees the layers
(`kv_cache_spec`: a sliding-window layer is a `SlidingWindowSpec`, a KV cache group of its own whose blocks vLLM
frees past the window) and how they are laid out once vLLM has sized them (`initialize_kv`).

vLLM's hybrid KV cache manager hands every block id to one group at a time, and sizes its blocks as one layer
of each group sharing memory (its `KVCacheTensor`s alias): so do these pools. Layer j of every group writes and
reads pool j through its own group's block table; `num_blocks` blocks of one pool per layer of the largest group.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from vmetal import envs
from vmetal.engine.runner.kv.paged_cache import KVPool, PagedLayerCache, View

logger = logging.getLogger("vllm.vmetal")  # under "vllm": its handlers and level apply

SCRATCH_BLOCKS = 8


class PagedPools:
    """The pool half of `PagedModelRunner` (a mixin before `ModelRunnerBase`): it reads the runner's configs,
    `loaded`, `layer_windows` and `kernels`, and sets `layers`, `pools`, `num_groups`, `views`, `num_blocks`,
    `scratch_blocks` and `dump_block`."""

    def _new_layers(self, num_blocks: int, groups: list[tuple[int, int]] | None = None) -> list[PagedLayerCache]:
        """One cache per K/V layer; `groups`: per layer, its KV cache group and its index in the group (layers
        of different groups at the same index share one pool), else one group and a pool per layer."""
        import mlx.core as mx

        lm = self.loaded
        shape = (num_blocks, self.cache_config.block_size, lm.num_kv_heads)
        k_dim, v_dim = lm.kv_dims
        windows = self.layer_windows or (None,) * lm.num_layers  # a runner given a model without load_model
        groups = groups or [(0, i) for i in range(len(windows))]
        pools = [KVPool(mx.zeros((*shape, k_dim), lm.dtype), mx.zeros((*shape, v_dim), lm.dtype))
                 for _ in range(1 + max(j for _, j in groups))]
        return [PagedLayerCache.sharing(pools[j], self.kernels, window, g)
                for window, (g, j) in zip(windows, groups)]

    def kv_cache_spec(self) -> dict[str, Any]:
        """vLLM's view: a sliding-window layer is a `SlidingWindowSpec`, so vLLM's KV cache manager gives such
        layers KV cache groups (block tables) of their own and frees their blocks once they fall out of the
        window (prefix caching and preemption stay vLLM's, per group)."""
        from vllm.v1.kv_cache_interface import SlidingWindowSpec

        specs = super().kv_cache_spec()
        for (name, spec), window in zip(list(specs.items()), self.layer_windows):
            if window is not None:
                specs[name] = SlidingWindowSpec(block_size=spec.block_size, num_kv_heads=spec.num_kv_heads,
                                                head_size=spec.head_size, head_size_v=spec.head_size_v,
                                                dtype=spec.dtype, sliding_window=window)
        return specs

    def _layer_groups(self, kv_cache_config: Any) -> list[tuple[int, int]]:
        """Per K/V layer of this rank, (its KV cache group, its index in the group), from vLLM's config."""
        where = {name: (g, j) for g, group in enumerate(kv_cache_config.kv_cache_groups)
                 for j, name in enumerate(group.layer_names)}
        names = list(self.kv_cache_spec())
        missing = [name for name in names if name not in where]
        if missing:
            raise RuntimeError(f"vLLM's KV cache config has no group for layers {missing}")
        return [where[name] for name in names]

    @property
    def kv_fraction(self) -> float:
        return self.metal_config.kv_fraction

    def kv_budget(self, device_bytes: int, activation_bytes: int) -> int:
        """`VLLM_METAL_MEMORY_FRACTION` of the device (`auto` = 0.9) less weights and activations, allocated up
        front as block pools; refused when not even one max-length sequence fits. A draft model's caches grow
        outside the pools, beside each token the pools hold: its share stays out of them."""
        budget = self._target_share(int(device_bytes * self.kv_fraction) - self.weights_bytes - activation_bytes)
        self._check_fits_one_sequence(budget, device_bytes, activation_bytes)
        if self.metal_config.mlx_device != "cpu":
            return budget
        # System RAM is shared with everything else on the host (not a GPU's memory): pools no larger than
        # twice what max_num_seqs full-length sequences can use, the second half for vLLM's prefix cache.
        bs = self.cache_config.block_size
        seq_blocks = -(-self.max_model_len // bs)
        return min(budget, 2 * self.max_num_reqs * self._sequence_bytes(seq_blocks * bs)
                   + bs * self.kv_bytes_per_token())

    def _sequence_bytes(self, length: int) -> int:
        """The K/V one `length`-token sequence keeps in blocks: a sliding-window layer at most its window and one
        step's tokens (vLLM frees its blocks past that: `SlidingWindowSpec`), unless vLLM's hybrid KV cache
        manager is off (`--disable-hybrid-kv-cache-manager`: every layer holds every token)."""
        windows = self.layer_windows or (None,)
        per_layer = self.kv_bytes_per_token() // len(windows)
        if getattr(self.scheduler_config, "disable_hybrid_kv_cache_manager", False):
            return per_layer * len(windows) * length
        step = self.scheduler_config.max_num_batched_tokens
        return per_layer * sum(length if w is None else min(length, w - 1 + step) for w in windows)

    def _longest_fitting(self, budget: int) -> int:
        """The longest sequence whose K/V fit `budget` (`_sequence_bytes` grows with the length: a bisection)."""
        low, high = 0, self.max_model_len
        while low < high:
            mid = (low + high + 1) // 2
            low, high = (mid, high) if self._sequence_bytes(mid) <= budget else (low, mid - 1)
        return low

    def _check_fits_one_sequence(self, budget: int, total: int, activation_bytes: int) -> None:
        """Refuse to start when not even one max-length sequence fits, naming what to change."""
        need = self._sequence_bytes(self.max_model_len)
        if budget >= need:
            return
        # A draft model's cache holds the sequence again (`_target_share`).
        held = need + need * getattr(self.drafter, "kv_bytes_per_token", 0) // self.kv_bytes_per_token()
        # Rounded up: a fraction shown rounded to nearest (0.524 as 0.52) would be refused again.
        fraction_needed = math.ceil((self.weights_bytes + activation_bytes + held) / total * 100) / 100
        fits_tokens = self._longest_fitting(budget)
        hints = [f"set VLLM_METAL_MEMORY_FRACTION to at least {fraction_needed:.2f}" if fraction_needed <= 1
                 else "use a smaller or quantized model"]
        if fits_tokens:
            hints.append(f"lower --max-model-len to {fits_tokens} or less")
        raise envs.EnvError(
            f"the paged KV cache gets {_mib(max(0, budget))} (VLLM_METAL_MEMORY_FRACTION="
            f"{self.metal_config.memory_fraction}), but one {self.max_model_len}-token sequence needs "
            f"{_mib(need)}; {', or '.join(hints)}",
            variable=envs.MEMORY_FRACTION, value=str(self.metal_config.memory_fraction),
            allowed=f">= {fraction_needed:.2f}",
        )

    def initialize_kv(self, kv_cache_config: Any) -> None:
        import mlx.core as mx

        num_blocks = kv_cache_config.num_blocks
        # Scratch blocks past vLLM's: a decode-ahead row whose next token starts a block vLLM has not allocated
        # yet writes it there (see _ahead_forward). At most 1/16 more than vLLM's blocks.
        scratch = min(SCRATCH_BLOCKS, self.max_num_reqs, max(1, num_blocks // 16))
        groups = self._layer_groups(kv_cache_config)
        self.layers = self._new_layers(num_blocks + scratch + 1, groups)
        self.pools = _distinct(layer.pool for layer in self.layers)
        self.num_groups = len(kv_cache_config.kv_cache_groups)
        self.views = views_of(self.layers)
        mx.eval([(p.k, p.v) for p in self.pools])
        self.num_blocks = num_blocks
        self.scratch_blocks = list(range(num_blocks, num_blocks + scratch))
        self.dump_block = num_blocks + scratch
        logger.info("vmetal: paged KV pools: %d blocks x %d tokens (+%d scratch, +1 for padding rows), %d KV cache "
                    "group(s) on %d pools, %.1f MiB", num_blocks, self.cache_config.block_size, scratch,
                    self.num_groups, len(self.pools), sum(p.nbytes for p in self.pools) / 2**20)


def _mib(n: int) -> str:
    # One decimal below 10 MiB: whole MiB would read "gets 1 MiB ... needs 1 MiB" for a small budget.
    return f"{n / 2**20:.1f} MiB" if n < 10 * 2**20 else f"{n / 2**20:.0f} MiB"


def _distinct(pools: Any) -> list[KVPool]:
    """Each pool once, in first-seen order."""
    return list({id(pool): pool for pool in pools}.values())


def views_of(layers: list[PagedLayerCache]) -> tuple[View, ...]:
    """The (group, window) pairs the layers attend through, in a fixed order (a compiled step's views)."""
    return tuple(sorted({layer.view for layer in layers}, key=lambda v: (v[0], -1 if v[1] is None else v[1])))
