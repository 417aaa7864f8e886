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


def cache_limit_bytes(device_bytes: int) -> int:
    """The most freed memory MLX keeps for reuse (`mx.set_cache_limit`)."""
    return max(512 * 2**20, device_bytes // 10)
