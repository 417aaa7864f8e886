"""Light stand-ins for what a model runner reads of vLLM's config, so runner parts can be tested without vLLM's
engine (only the fields `ModelRunnerBase.__init__` and the tested methods read)."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import Any


def stub_vllm_config(*, max_model_len: int = 1000, max_num_seqs: int = 4, block_size: int = 16,
                     gpu_memory_utilization: float = 0.5, max_num_batched_tokens: int = 2048) -> Any:
    return SimpleNamespace(
        model_config=SimpleNamespace(max_model_len=max_model_len, model="unused", revision=None),
        scheduler_config=SimpleNamespace(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens),
        cache_config=SimpleNamespace(block_size=block_size, gpu_memory_utilization=gpu_memory_utilization),
        parallel_config=SimpleNamespace(pipeline_parallel_size=1, tensor_parallel_size=1),
    )


def paged_metal_config(device: str = "cpu", fraction: str = "auto") -> Any:
    """`vmetal.envs.MetalConfig` of the paged path with VLLM_METAL_MEMORY_FRACTION=`fraction` on MLX `device`."""
    from vmetal import envs

    cfg = envs.load_config({envs.USE_PAGED_ATTENTION: "1", envs.MEMORY_FRACTION: fraction})
    return dataclasses.replace(cfg, mlx_device=device)


def loaded_paged_runner(model_dir: Any, block_size: int, max_model_len: int = 64) -> Any:
    """A `PagedModelRunner` on the stand-ins above holding the checkpoint at `model_dir` (loaded with vmetal's
    loader, the attention hook installed), for tests of its forward without an engine; no pools yet."""
    from vmetal.engine.models import load
    from vmetal.engine.runner.kv.paged_cache import install_attention_hook
    from vmetal.engine.runner.paged_runner import PagedModelRunner

    loaded = load(str(model_dir), kv_path="paged")
    runner = PagedModelRunner(stub_vllm_config(block_size=block_size, max_model_len=max_model_len), "cpu",
                              paged_metal_config("cpu"))
    runner.loaded, runner.model = loaded, loaded.model
    install_attention_hook(runner.model)
    return runner
