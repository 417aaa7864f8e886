"""MetalWorker: vLLM's worker interface over an MLX model runner.

vLLM's engine core drives one worker (the `uni` executor): it loads the model,
asks how much KV memory there is, hands back the block budget it chose, then
calls `execute_model` / `sample_tokens` once per scheduler step.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from vllm.v1.worker.worker_base import CompilationTimes, WorkerBase

from vmetal import envs

logger = logging.getLogger("vllm.vmetal")  # under "vllm": its handlers and level apply


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


class MetalWorker(WorkerBase):
    def __init__(self, vllm_config, local_rank, rank, distributed_init_method, is_driver_worker=False):
        super().__init__(vllm_config, local_rank, rank, distributed_init_method, is_driver_worker)
        self.metal_config = envs.get_config()
        if self.metal_config.debug:
            logger.setLevel(logging.DEBUG)
        self.mlx_device = "cpu"
        self.weights_bytes = 0
        self.peak_activation_bytes = 0
        self.cache_limit = 0

    # ------------------------------------------------------------- lifecycle
    def init_device(self) -> None:
        import mlx.core as mx
        import torch

        device, info = envs.resolve_mlx_device(self.metal_config)
        if info:
            logger.info(info)
        self.mlx_device = device
        mx.set_default_device(mx.gpu if device == "gpu" else mx.cpu)
        # MLX keeps freed buffers for reuse up to its memory limit (most of the device) by default: a server
        # would hold on to its peak, which other processes on the same device (a second server, the user's
        # apps) then cannot get; three servers on one GPU ran out of memory that way. What a step frees is
        # soon needed again, so a tenth of the device (at least 512 MiB) keeps reuse without the hoard.
        self.cache_limit = cache_limit_bytes(device_memory_bytes(device))
        mx.set_cache_limit(self.cache_limit)
        # The sampler's tensors live on the CPU torch device on every host.
        self.device = torch.device("cpu")
        if not self.metal_config.use_mlx:
            # The PyTorch baseline (VLLM_METAL_USE_MLX=0): same runner, the forward in torch.
            from vmetal.engine.runner.torch_runner import TorchModelRunner as Runner
        elif self.metal_config.use_paged_attention:
            from vmetal.engine.runner.paged_runner import PagedModelRunner as Runner
        else:
            from vmetal.engine.runner.model_runner import MetalModelRunner as Runner
        self.model_runner = Runner(self.vllm_config, self.device)

    def load_model(self, *, load_dummy_weights: bool = False) -> None:
        import mlx.core as mx

        before = mx.get_active_memory()
        self.model_runner.load_model()
        self.weights_bytes = mx.get_active_memory() - before
        if not self.metal_config.use_mlx:
            self.weights_bytes = self.model_runner.weights_nbytes()
        cfg = self.metal_config
        if cfg.prefix_cache and not cfg.use_paged_attention:
            budget = int(device_memory_bytes(self.mlx_device) * cfg.prefix_cache_fraction)
            self.model_runner.enable_prefix_cache(budget)
        quant = self.model_runner.loaded.quantization
        logger.info(
            "vmetal: loaded %s on %s (%.1f MiB of weights%s)",
            self.model_config.model,
            f"MLX {self.mlx_device}" if self.metal_config.use_mlx else f"torch {self.model_runner.torch_device}",
            self.weights_bytes / 2**20, f", {quant.describe()}" if quant else "",
        )

    def get_model(self) -> Any:
        return self.model_runner.model

    def get_model_inspection(self) -> str:
        # vLLM's default walks torch modules; the model here is an MLX module.
        loaded = self.model_runner.loaded
        backend = "MLX" if self.metal_config.use_mlx else f"torch {self.model_runner.torch_device}"
        quant = f", {loaded.quantization.describe()}" if loaded.quantization else ""
        return (
            f"{type(loaded.model).__module__}.{type(loaded.model).__name__} ({backend}, {loaded.dtype}{quant}): "
            f"{loaded.num_layers} layers, {loaded.num_kv_heads} KV heads x {loaded.head_dim}, "
            f"{self.weights_bytes} bytes of weights"
        )

    def get_supported_tasks(self) -> tuple[str, ...]:
        return ("generate",)

    def get_supported_kv_cache_layouts(self) -> list[str]:
        # The default asks the platform for a torch attention backend; ours is
        # MLX. Per-layer pools [num_blocks, block_size, kv_heads, head_dim] are
        # vLLM's LBNHC layout.
        return ["LBNHC"]

    def get_kv_cache_spec(self) -> dict[str, Any]:
        from vllm.v1.kv_cache_interface import FullAttentionSpec

        from vmetal.engine.runner.torch_dtypes import torch_dtype_of

        loaded = self.model_runner.loaded
        spec = FullAttentionSpec(
            block_size=self.cache_config.block_size,
            num_kv_heads=loaded.num_kv_heads,
            head_size=loaded.head_dim,
            dtype=torch_dtype_of(loaded.dtype),
        )
        return {f"model.layers.{i}.self_attn": spec for i in range(loaded.num_layers)}

    def determine_available_memory(self) -> int:
        """KV bytes vLLM may plan with, after a profiling forward.

        MLX-managed path: the cache grows on demand, so what matters is that the
        scheduler never admits more tokens than memory holds: vLLM's
        `gpu_memory_utilization` of the device, less weights and the activation
        peak, and never more than `max_num_seqs` full-length sequences.
        Paged path: `VLLM_METAL_MEMORY_FRACTION` of the device (`auto` = 0.9) less
        the same, allocated up front as block pools.
        """
        import mlx.core as mx

        if self.cache_config.kv_cache_memory_bytes:
            return int(self.cache_config.kv_cache_memory_bytes)
        mx.reset_peak_memory()
        self.model_runner.warm_up()
        self.peak_activation_bytes = max(0, mx.get_peak_memory() - mx.get_active_memory())
        total = device_memory_bytes(self.mlx_device)
        paged = self.metal_config.use_paged_attention
        fraction = self.metal_config.kv_fraction if paged else self.cache_config.gpu_memory_utilization
        budget = int(total * fraction) - self.weights_bytes - self.peak_activation_bytes
        per_token = self.model_runner.kv_bytes_per_token()
        if paged:
            self._check_fits_one_sequence(budget, per_token, total)
            available = budget
            if self.mlx_device == "cpu":
                # System RAM is shared with everything else on the host (not a GPU's
                # memory): pools no larger than twice what max_num_seqs full-length
                # sequences can use, the second half for vLLM's prefix cache.
                bs = self.cache_config.block_size
                seq_blocks = -(-self.model_config.max_model_len // bs)
                cap = (2 * self.scheduler_config.max_num_seqs * seq_blocks + 1) * bs * per_token
                available = min(available, cap)
        else:
            # Whole blocks per sequence, plus the null block vLLM's block pool keeps aside.
            bs = self.cache_config.block_size
            blocks = self.scheduler_config.max_num_seqs * -(-self.model_config.max_model_len // bs) + 1
            ceiling = blocks * bs * per_token
            available = max(0, min(budget, ceiling))
        logger.info(
            "vmetal: KV budget %.1f MiB (device %.1f GiB x %.2f, weights %.1f MiB, activations %.1f MiB)",
            available / 2**20, total / 2**30, fraction, self.weights_bytes / 2**20,
            self.peak_activation_bytes / 2**20,
        )
        return available

    def _check_fits_one_sequence(self, budget: int, per_token: int, total: int) -> None:
        """Refuse to start when not even one max-length sequence fits, naming what to change."""
        need = self.model_config.max_model_len * per_token
        if budget >= need:
            return
        fixed = self.weights_bytes + self.peak_activation_bytes
        fraction_needed = (fixed + need) / total
        fits_tokens = max(0, budget) // per_token
        hint = (f"set VLLM_METAL_MEMORY_FRACTION to at least {fraction_needed:.2f}"
                if fraction_needed <= 1 else "use a smaller or quantized model")
        raise envs.EnvError(
            f"the paged KV cache gets {max(0, budget) / 2**20:.0f} MiB "
            f"(VLLM_METAL_MEMORY_FRACTION={self.metal_config.memory_fraction}), but one "
            f"{self.model_config.max_model_len}-token sequence needs {need / 2**20:.0f} MiB; "
            f"{hint}, or lower --max-model-len to {fits_tokens} or less",
            variable=envs.MEMORY_FRACTION, value=str(self.metal_config.memory_fraction),
            allowed=f">= {fraction_needed:.2f}",
        )

    def initialize_from_config(self, kv_cache_config: Any) -> None:
        self.kv_cache_config = kv_cache_config
        if self.metal_config.use_paged_attention:
            self.model_runner.allocate_pools(kv_cache_config.num_blocks)
        # MLX-managed path: nothing to allocate up front, the caches grow per request.

    def compile_or_warm_up_model(self) -> CompilationTimes:
        start = time.perf_counter()
        self.model_runner.warm_up()
        logger.info("vmetal: warm-up took %.2f s", time.perf_counter() - start)
        return CompilationTimes(language_model=0.0, encoder=0.0)

    # ----------------------------------------------------------------- steps
    def execute_model(self, scheduler_output: Any) -> Any:
        return self.model_runner.execute_model(scheduler_output)

    def sample_tokens(self, grammar_output: Any) -> Any:
        return self.model_runner.sample_tokens(grammar_output)

    def mlx_memory(self) -> dict[str, int]:
        """MLX's memory counters in bytes (active, cache, peak, cache_limit); for
        `LLM.collective_rpc("mlx_memory")`."""
        import mlx.core as mx

        limit = mx.set_cache_limit(self.cache_limit)  # the same value: only reads MLX's limit back
        return {"active": mx.get_active_memory(), "cache": mx.get_cache_memory(), "peak": mx.get_peak_memory(),
                "cache_limit": limit}

    def decode_ahead_counts(self) -> dict[str, int]:
        """How the paged runner's all-decode steps went (`PagedModelRunner.ahead_counts`); for
        `LLM.collective_rpc("decode_ahead_counts")`. Empty on the MLX-managed path."""
        return dict(getattr(self.model_runner, "ahead_counts", {}))

    def check_health(self) -> None:
        return

    def synchronize_device(self) -> None:
        import mlx.core as mx

        mx.synchronize()

    def shutdown(self) -> None:
        self.model_runner = None
