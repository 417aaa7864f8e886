"""MetalPlatform: tells vLLM to run its engine on vmetal's worker and MLX.

vLLM sees an out-of-tree platform whose torch device is the CPU: every tensor
vLLM itself touches (sampler inputs, block tables) is a CPU tensor, while the
forward pass runs in MLX on the device `VLLM_MLX_DEVICE` picks.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from vllm.platforms.interface import Platform, PlatformEnum

from vmetal import envs
from vmetal.preflight import features
from vmetal.preflight import parallel as parallel_modes
from vmetal.preflight.checkpoint import quantization_of

logger = logging.getLogger("vllm.vmetal")  # under "vllm": its handlers and level apply
# vLLM's name for OpenAI's published gpt-oss quantization, the one vLLM method mlx-lm loads itself.
GPT_OSS_MXFP4 = "gpt_oss_mxfp4"


class MetalPlatform(Platform):
    _enum = PlatformEnum.OOT
    device_name: str = "cpu"
    device_type: str = "cpu"
    dispatch_key: str = "CPU"
    dist_backend: str = "gloo"
    ray_device_key: str = ""
    device_control_env_var: str = "VMETAL_VISIBLE_DEVICES"

    @property
    def supported_dtypes(self) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    def is_cpu(self) -> bool:
        # vLLM takes CPU-only code paths when this is true, e.g. it skips
        # torch.accelerator.empty_cache() at shutdown, which raises without one.
        return True

    @classmethod
    def get_device_name(cls, device_id: int = 0) -> str:
        return "mlx"

    @classmethod
    def get_device_total_memory(cls, device_id: int = 0) -> int:
        import psutil

        return int(psutil.virtual_memory().total)

    @classmethod
    def support_hybrid_kv_cache(cls) -> bool:
        """vLLM's hybrid KV cache manager (one block table per KV cache group) on the paged path, whose runner
        keeps a table per group: a sliding-window layer's blocks are freed past its window. The MLX-managed path
        keeps its own caches and reports full-attention layers only; it keeps the single-group manager."""
        try:
            return envs.load_config().kv_path == "paged"
        except envs.EnvError:
            return False  # check_and_update_config reports the bad variable

    @classmethod
    def is_pin_memory_available(cls) -> bool:
        return False

    @classmethod
    def inference_mode(cls):
        return torch.no_grad()

    @classmethod
    def get_device_communicator_cls(cls) -> str:
        return "vllm.distributed.device_communicators.cpu_communicator.CpuCommunicator"

    @classmethod
    def verify_model_arch(cls, model_arch: str) -> None:
        # vLLM asks by architecture name alone. vmetal decides by the state the checkpoint's mlx-lm model makes
        # (vmetal.preflight.cache_types), which takes its config.json: `check_and_update_config` asks for a
        # local folder before the engine starts, and the runner's load asks again before reading a weight.
        return

    @classmethod
    def verify_quantization(cls, quant: str) -> None:
        # vLLM calls this with the method it resolved from `--quantization` or from a checkpoint's
        # `quantization_config.quant_method`. Those are torch kernels (AWQ, GPTQ, fp8, …) that never run
        # here: the runner loads weights with mlx-lm, so accepting one would silently ignore it. MLX's own
        # checkpoints name no method (vLLM resolves their `quantization_config` to None) and never get here.
        # One exception: gpt-oss as OpenAI publishes it (`quant_method: mxfp4`, experts as `*_blocks` and
        # `*_scales`), which vLLM resolves to its `gpt_oss_mxfp4` and mlx-lm loads as MLX's own mxfp4
        # (its loader maps the method, its gpt_oss `sanitize` the tensors): the same 4 bits, nothing ignored.
        if quant == GPT_OSS_MXFP4:
            return
        raise ValueError(
            f"quantization method `{quant}` (from --quantization or the checkpoint's "
            "quantization_config.quant_method) is vLLM's own and vmetal does not run it: serve an "
            "MLX-quantized checkpoint (config.json with a `quantization` block, e.g. an mlx-community "
            "`-4bit` repo) or make one with `vmetal convert SRC DST --bits 4`"
        )

    @classmethod
    def pre_register_and_update(cls, parser: Any = None) -> None:
        # vLLM calls this first in every create_engine_config (and when it builds `vllm serve`'s parser),
        # before it resolves an unset --max-num-batched-tokens / --max-num-seqs from the platform.
        from vmetal.engine import batch_defaults, text_only

        batch_defaults.install()
        # Before vLLM inspects the checkpoint's architecture (its ModelConfig comes next).
        text_only.register()

    @classmethod
    def update_block_size_for_backend(cls, vllm_config: Any) -> None:
        # There is no torch attention backend to negotiate with: the block size
        # is vmetal's own setting (ENV.md), applied in check_and_update_config.
        return

    @classmethod
    def check_and_update_config(cls, vllm_config: Any) -> None:
        from vllm.config import CompilationMode
        from vllm.config.compilation import CUDAGraphMode

        # Read afresh: one process (a test run, a notebook) may build several engines.
        cfg = envs.load_config()  # raises EnvError on an invalid combination
        envs.check_available(cfg)
        envs.check_kernels(cfg)
        refused = features.refused_config(vllm_config, cfg.kv_path)
        if refused:
            raise ValueError(refused)
        spec = vllm_config.speculative_config
        _check_model_state(vllm_config.model_config.model, cfg.kv_path, cfg.prefix_cache, spec is not None,
                           draft=spec.model if spec is not None and spec.method == features.DRAFT_MODEL else None)

        parallel = vllm_config.parallel_config
        model_config = vllm_config.model_config
        refused = parallel_modes.refusal(
            parallel.tensor_parallel_size, parallel.pipeline_parallel_size, parallel.data_parallel_size,
            kv_heads=model_config.get_total_num_kv_heads(), moe=model_config.is_moe, kv_path=cfg.kv_path,
            unsplittable=parallel_modes.unsplittable_module(model_config.hf_config.to_dict())
            if parallel.tensor_parallel_size > 1 else None,
            unstaged=parallel_modes.unstaged_module(model_config.hf_config.to_dict())
            if parallel.pipeline_parallel_size > 1 else None)
        if refused:
            raise ValueError(refused)
        if parallel.pipeline_parallel_size > 1 and cfg.prefix_cache:
            # Each stage's prefix cache would keep and evict its own layers' entries by its own byte count, so
            # the stages could disagree on a hit.
            raise ValueError(f"`--pipeline-parallel-size {parallel.pipeline_parallel_size}` with "
                             f"{envs.PREFIX_CACHE}=1: the MLX path's prefix cache is not kept per pipeline stage; "
                             f"unset {envs.PREFIX_CACHE}")
        if parallel.worker_cls == "auto":
            parallel.worker_cls = "vmetal.engine.worker.MetalWorker"
        # One worker in the engine's process, or one process per rank (vLLM's own executor for either).
        parallel.distributed_executor_backend = "uni" if parallel.world_size == 1 else "mp"
        if parallel.world_size > 1:
            from vmetal.engine.distributed import OMP_BIND_ENV

            os.environ.setdefault(OMP_BIND_ENV, "nobind")
        if isinstance(vllm_config.additional_config, dict):
            vllm_config.additional_config[parallel_modes.MEMORY_SHARE_KEY] = parallel_modes.ranks_sharing_memory(
                parallel.local_world_size, parallel.data_parallel_size_local)

        cache = vllm_config.cache_config
        cache.block_size = cfg.block_size
        if cfg.kv_path != "paged" and cache.enable_prefix_caching:
            # The MLX-managed cache cannot take KV from vLLM's block hashes; a
            # request arriving with "cached" tokens would be computed wrong.
            logger.info(
                "vmetal: vLLM prefix caching is off on the MLX-managed KV path "
                "(VLLM_METAL_PREFIX_CACHE is this path's own prefix cache)"
            )
            cache.enable_prefix_caching = False
            if getattr(model_config, "is_hybrid", False):
                # vLLM set a hybrid's recurrent state up for prefix caching (state aligned to KV blocks) when it
                # saw it on; off, it keeps one state per request, as vLLM sets it when prefix caching is off.
                cache.mamba_cache_mode = "none"
                cache.mamba_block_size = model_config.max_model_len

        quant = quantization_of(vllm_config.model_config.hf_config.to_dict())
        if quant is not None:
            logger.info("vmetal: MLX-quantized checkpoint (%s): mlx-lm loads it and the weights stay "
                        "quantized in MLX", quant.describe())

        # Scheduling is synchronous: the runner keeps each step's sampled tokens
        # itself and the engine calls execute_model then sample_tokens.
        vllm_config.scheduler_config.async_scheduling = False

        comp = vllm_config.compilation_config
        comp.mode = CompilationMode.NONE
        comp.cudagraph_mode = CUDAGraphMode.NONE
        comp.cudagraph_capture_sizes = []
        comp.max_cudagraph_capture_size = 0

    @classmethod
    def validate_environ(cls, hard_fail: bool) -> None:
        """vLLM warns about every `VLLM_*` variable it does not know, which includes vmetal's own contract
        (nine warnings a start). They are registered as known here, and validated by `vmetal.envs`; any other
        unknown `VLLM_*` variable (a typo of one of ours, say) is still reported by vLLM."""
        from vllm import envs as vllm_envs

        for var in envs.VARIABLES:
            vllm_envs.environment_variables.setdefault(var.name, lambda name=var.name: os.environ.get(name))
        super().validate_environ(hard_fail)

    @classmethod
    def validate_request(cls, processed_inputs: Any, params: Any) -> None:
        from vmetal.engine.request_checks import check_request

        check_request(processed_inputs, params)


def _check_model_state(model: str, kv_path: str, prefix_cache: bool = False, speculative: bool = False,
                       draft: str | None = None) -> None:
    """Refuse, before the engine starts, a local checkpoint whose state `kv_path` (or the MLX path's prefix
    cache, or speculation's roll-back) does not hold (one line naming the family, the cache type and the
    path that would serve it), and a local `draft` model that cannot draft for it. A hub id is left to the
    runner's load, which asks the same once the engine has resolved it: resolving it here could reach the
    network."""
    from pathlib import Path

    from vmetal.preflight.cache_types import check_model, check_prefix_cache, check_speculation
    from vmetal.preflight.checkpoint import read_config

    folder = Path(model).expanduser()
    if (folder / "config.json").is_file():
        state = check_model(read_config(folder), str(folder / "config.json"), kv_path)
        if prefix_cache:
            check_prefix_cache(state)
        if speculative:
            check_speculation(state, kv_path)
    draft_folder = Path(draft).expanduser() if draft else None
    if draft_folder is not None and (draft_folder / "config.json").is_file():
        target = read_config(folder) if (folder / "config.json").is_file() else {}
        features.check_draft(target, read_config(draft_folder), str(draft_folder / "config.json"), draft)
