"""Prompt-prefix reuse for the MLX-managed KV path (`VLLM_METAL_PREFIX_CACHE`).

vLLM's own prefix caching needs its blocks to hold real KV, which only the paged
path has; here vLLM's is off and this cache works underneath it. When a prompt's
prefill completes, its KV for whole blocks of the prompt is kept; a later prompt
that starts with the same blocks copies that KV into its own cache and prefills
only the rest. The cache holds at most `budget_bytes` (a fraction of the MLX
working set) and, when full, evicts the entry with the fewest hits, oldest first.

Blocks are keyed by a chained hash (block i's key covers blocks 0..i), as vLLM
keys its blocks, so a lookup is one dict probe per block.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any


def block_keys(tokens: list[int], block_size: int) -> list[int]:
    """Chained hashes of the whole blocks of `tokens`."""
    keys, h = [], 0
    for i in range(0, len(tokens) - block_size + 1, block_size):
        h = hash((h, tuple(tokens[i : i + block_size])))
        keys.append(h)
    return keys


@dataclass(eq=False)  # identity: entries hold arrays, and `remove` must not compare them
class _Entry:
    keys: list[Any]  # per layer [1, kv_heads, n, head_dim]
    values: list[Any]
    num_tokens: int
    nbytes: int
    hits: int = 0
    last_used: int = 0
    block_keys: list[int] = field(default_factory=list)


@dataclass
class PrefixCacheStats:
    queries: int = 0
    hits: int = 0
    tokens_reused: int = 0
    evictions: int = 0


class PrefixCache:
    def __init__(self, budget_bytes: int, block_size: int):
        self.budget_bytes = budget_bytes
        self.block_size = block_size
        self.stats = PrefixCacheStats()
        self._by_key: dict[int, tuple[_Entry, int]] = {}  # block key -> (entry, tokens it covers)
        self._entries: list[_Entry] = []
        self._clock = itertools.count(1)

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self._entries)

    def lookup(self, tokens: list[int], limit: int) -> tuple[list[Any], list[Any], int] | None:
        """Longest cached prefix of `tokens` of at most `limit` tokens, as per-layer (keys, values, n)."""
        self.stats.queries += 1
        best = None
        for key in block_keys(tokens[:limit], self.block_size):
            hit = self._by_key.get(key)
            if hit is None:
                break
            best = hit
        if best is None:
            return None
        entry, n = best
        entry.hits += 1
        entry.last_used = next(self._clock)
        self.stats.hits += 1
        self.stats.tokens_reused += n
        return [k[:, :, :n, :] for k in entry.keys], [v[:, :, :n, :] for v in entry.values], n

    def insert(self, tokens: list[int], layer_caches: list[Any]) -> None:
        """Keep the KV of `tokens`' whole blocks, held in the first len(tokens) slots of `layer_caches`."""
        import mlx.core as mx

        keys = block_keys(tokens, self.block_size)
        if not keys or keys[-1] in self._by_key and self._by_key[keys[-1]][1] == len(keys) * self.block_size:
            return
        n = len(keys) * self.block_size
        k = [mx.contiguous(c.keys[:, :, :n, :]) for c in layer_caches]
        v = [mx.contiguous(c.values[:, :, :n, :]) for c in layer_caches]
        nbytes = sum(a.nbytes for a in k) + sum(a.nbytes for a in v)
        if nbytes > self.budget_bytes:
            return
        while self._entries and self.nbytes + nbytes > self.budget_bytes:
            self._evict()
        mx.eval(k, v)
        entry = _Entry(k, v, n, nbytes, last_used=next(self._clock), block_keys=keys)
        self._entries.append(entry)
        for i, key in enumerate(keys):
            # A longer entry covering the same blocks serves them as well; keep whichever exists.
            self._by_key.setdefault(key, (entry, (i + 1) * self.block_size))

    def _evict(self) -> None:
        victim = min(self._entries, key=lambda e: (e.hits, e.last_used))
        self._entries.remove(victim)
        self.stats.evictions += 1
        for key in victim.block_keys:
            if self._by_key.get(key, (None,))[0] is victim:
                del self._by_key[key]
        # Blocks the victim covered may still be covered by another entry.
        for entry in self._entries:
            for i, key in enumerate(entry.block_keys):
                self._by_key.setdefault(key, (entry, (i + 1) * self.block_size))
