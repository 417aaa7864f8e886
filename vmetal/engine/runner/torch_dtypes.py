"""MLX <-> torch dtype names: vLLM describes KV layouts with torch dtypes."""

from __future__ import annotations

from typing import Any


def torch_dtype_of(mlx_dtype: Any) -> Any:
    import mlx.core as mx
    import torch

    table = {mx.float32: torch.float32, mx.float16: torch.float16, mx.bfloat16: torch.bfloat16}
    return table[mlx_dtype]
