"""Model runners: vLLM's `SchedulerOutput` in, MLX (or torch) forwards, `ModelRunnerOutput` out.

One runner class per KV path, chosen once by the worker from `MetalConfig.kv_path`; each owns its weight
accounting, its KV budget and its KV allocation (`base.ModelRunnerBase` has the shared parts):

- `mlx`: `mlx_runner.MlxModelRunner`, mlx-lm's caches per request, one batched decode cache (the default).
- `paged`: `paged_runner.PagedModelRunner`, vLLM's block tables over per-layer pools (`--paged`).
- `torch`: `torch_runner.TorchModelRunner`, the PyTorch baseline with the MLX-managed layout
  (`VLLM_METAL_USE_MLX=0`).
- embeddings (vLLM's pooling runner): `pooling_runner.PoolingModelRunner`, the MLX-managed layout.

Caches are in `kv/`, paged attention (the pure-MLX reference and the Metal kernels) in `attention/`.
"""

from __future__ import annotations

import importlib
from typing import Any

RUNNERS: dict[str, str] = {
    "mlx": "vmetal.engine.runner.mlx_runner:MlxModelRunner",
    "paged": "vmetal.engine.runner.paged_runner:PagedModelRunner",
    "torch": "vmetal.engine.runner.torch_runner:TorchModelRunner",
}


# vLLM's pooling runner (`--runner pooling`, an embedding checkpoint): hidden states pooled per request, on the
# MLX-managed layout (the platform refuses the other paths for it).
POOLING = "vmetal.engine.runner.pooling_runner:PoolingModelRunner"


def is_pooling(model_config: Any) -> bool:
    """Whether vLLM runs this model with its pooling runner (embeddings): requests carry PoolingParams."""
    return getattr(model_config, "runner_type", "generate") == "pooling"


def runner_class(kv_path: str, pooling: bool = False) -> Any:
    """The runner class of `kv_path` (or the pooling runner), imported only now: each path imports only what it
    uses."""
    module, name = (POOLING if pooling else RUNNERS[kv_path]).split(":")
    return getattr(importlib.import_module(module), name)
