"""The memory MLX computes in, as the worker and the runners size things by it."""

from __future__ import annotations


def device_memory_bytes(device: str) -> int:
    """Memory MLX may use on `device`: Metal's recommended working set, else system RAM."""
    import mlx.core as mx

    info = mx.device_info() if device == "gpu" else {}
    for key in ("max_recommended_working_set_size", "memory_size", "total_memory"):
        if info.get(key):
            return int(info[key])
    import psutil

    # On the CPU, MLX shares RAM with every other process: what is free now, not the total.
    return int(psutil.virtual_memory().available)


MIN_CACHE_BYTES = 512 * 2**20


def cache_limit_bytes(device_bytes: int, step_bytes: int | None = None) -> int:
    """The most freed memory MLX keeps for reuse (`mx.set_cache_limit`): a tenth of the device, at least
    `MIN_CACHE_BYTES`; once the largest step's activation peak (`step_bytes`) is known, no more than that peak
    (or the floor): what a step frees, the next one needs again, and more held back is memory the KV cache
    cannot have."""
    limit = max(MIN_CACHE_BYTES, device_bytes // 10)
    return limit if step_bytes is None else min(limit, max(MIN_CACHE_BYTES, step_bytes))
