"""MetalWorker: vLLM's worker interface over the model runner of the chosen KV path.

vLLM's engine core drives one worker (the `uni` executor), or one per tensor-parallel rank (the `mp` executor,
`vmetal.engine.distributed`): it loads the model, asks how much KV memory there
is, hands back the block budget it chose, then calls `execute_model` / `sample_tokens` once per scheduler step.
The KV path is decided once (`MetalConfig.kv_path`) and picks the runner class (`runner.RUNNERS`); what differs
between paths (weights accounting, KV budget and allocation, the forward) is the runner's, so this class never
asks which path it is on.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from typing import Any

from vllm.v1.worker.worker_base import CompilationTimes, WorkerBase

from vmetal import envs
from vmetal.engine import distributed
from vmetal.engine.device import cache_limit_bytes, device_memory_bytes
from vmetal.engine.runner import is_pooling, runner_class
from vmetal.preflight import parallel

logger = logging.getLogger("vllm.vmetal")  # under "vllm": its handlers and level apply


class MetalWorker(WorkerBase):
    def __init__(self, vllm_config, local_rank, rank, distributed_init_method, is_driver_worker=False):
        super().__init__(vllm_config, local_rank, rank, distributed_init_method, is_driver_worker)
        self.metal_config = envs.get_config()
        if self.metal_config.debug:
            logger.setLevel(logging.DEBUG)
        self.mlx_device = "cpu"
        self.ring: distributed.Ring | None = None  # MLX's ring, with more than one rank
        self.peak_activation_bytes = 0
        self._step_shape = (0, False)  # execute_model -> sample_tokens (step_times)
        self.cache_limit = 0

    # ------------------------------------------------------------- lifecycle
    def init_device(self) -> None:
        import dataclasses

        import mlx.core as mx
        import torch

        device, info = envs.resolve_mlx_device(self.metal_config)
        if info:
            logger.info(info)
        self.mlx_device = device
        # The runner sees the device as resolved, not as configured (unset means "gpu where there is one").
        self.metal_config = dataclasses.replace(self.metal_config, mlx_device=device)
        mx.set_default_device(mx.gpu if device == "gpu" else mx.cpu)
        # MLX keeps freed buffers for reuse up to its memory limit (most of the device) by default: a server
        # would hold on to its peak, which other processes on the same device (a second server, the user's
        # apps) then cannot get; three servers on one GPU ran out of memory that way. What a step frees is
        # soon needed again, so a tenth of the device (at least 512 MiB) keeps reuse without the hoard.
        self.cache_limit = cache_limit_bytes(device_memory_bytes(device))
        mx.set_cache_limit(self.cache_limit)
        # The sampler's tensors live on the CPU torch device on every host.
        self.device = torch.device("cpu")
        self.ring = distributed.init_ranks(self.vllm_config, self.rank, self.local_rank,
                                           self.distributed_init_method, self.metal_config.ring_port)
        runner = runner_class(self.metal_config.kv_path, is_pooling(self.model_config))
        self.model_runner = runner(self.vllm_config, self.device, self.metal_config,
                                   self.ring.group if self.ring else None)

    @property
    def weights_bytes(self) -> int:
        return self.model_runner.weights_bytes

    def load_model(self, *, load_dummy_weights: bool = False) -> None:
        runner = self.model_runner
        runner.load_model()
        quant = runner.loaded.quantization
        logger.info("vmetal: loaded %s on %s (%.1f MiB of weights%s)", self.model_config.model,
                    runner.describe_backend(), runner.weights_bytes / 2**20, f", {quant.describe()}" if quant else "")

    def get_model(self) -> Any:
        return self.model_runner.model

    def get_model_inspection(self) -> str:
        # vLLM's default walks torch modules; the model here is an MLX module.
        loaded = self.model_runner.loaded
        quant = f", {loaded.quantization.describe()}" if loaded.quantization else ""
        return (
            f"{type(loaded.model).__module__}.{type(loaded.model).__name__} "
            f"({self.model_runner.backend}, {loaded.dtype}{quant}): "
            f"{loaded.num_layers} layers"
            f"{f' with K/V and {loaded.state_layers} recurrent' if loaded.state_layers else ''}, "
            f"{loaded.num_kv_heads} KV heads x {loaded.head_dim}, "
            f"{self.weights_bytes} bytes of weights"
        )

    def get_supported_tasks(self) -> tuple[str, ...]:
        # vLLM opens the routes of these tasks only (`/v1/embeddings` for "embed"); per-token embeddings
        # ("token_embed"), classification and scoring are not computed here.
        return ("embed",) if self.model_runner.pooling else ("generate",)

    def get_supported_kv_cache_layouts(self) -> list[str]:
        # The default asks the platform for a torch attention backend; ours is MLX. Per-layer pools
        # [num_blocks, block_size, kv_heads, head_dim] are vLLM's LBNHC layout.
        return ["LBNHC"]

    def get_kv_cache_spec(self) -> dict[str, Any]:
        return self.model_runner.kv_cache_spec()

    def determine_available_memory(self) -> int:
        """KV bytes vLLM may plan with, after a profiling forward (the rule is the runner's `kv_budget`)."""
        import mlx.core as mx

        if self.cache_config.kv_cache_memory_bytes:
            return int(self.cache_config.kv_cache_memory_bytes)
        # The largest step's activations, as vLLM profiles them: a forward as large as a step gets (the runner's
        # `profile_tokens`). Beside them, the freed buffers MLX keeps for reuse (its cache) are memory the KV
        # cannot have either: sized from a tiny forward (a few MiB), 0.9 of an H100 went to KV and weights and a
        # served 64-prompt prefill step ran the card out of memory (cudaMallocAsync) with MLX's cache grown into
        # the rest.
        tokens = self.model_runner.profile_tokens()
        if self.ring is not None:
            # Ranks run the forward together (its all-reduces and stage hand-overs pair up), so at one size: the
            # largest any rank's own limits ask for (a headless node may be started with other limits than the
            # head's; at different sizes the ranks hung).
            tokens = int(mx.distributed.all_max(mx.array(tokens), group=self.ring.group, stream=mx.cpu).item())
        mx.reset_peak_memory()
        with self._on_launch_stream():
            self.model_runner.warm_up(tokens)
        self.peak_activation_bytes = max(0, mx.get_peak_memory() - mx.get_active_memory())
        device_bytes = device_memory_bytes(self.mlx_device)
        self.cache_limit = cache_limit_bytes(device_bytes, self.peak_activation_bytes)
        mx.set_cache_limit(self.cache_limit)
        mx.clear_cache()
        # Ranks and replicas on one Mac share its unified memory: each plans with its share, or together they
        # would promise the device several times over.
        sharing = int((self.vllm_config.additional_config or {}).get(parallel.MEMORY_SHARE_KEY, 1))
        total = device_bytes // sharing
        available = self.model_runner.kv_budget(total, self.peak_activation_bytes + self.cache_limit)
        logger.info(
            "vmetal: KV budget %.1f MiB (device %.1f GiB%s x %.2f, weights %.1f MiB, activations %.1f MiB at "
            "%d tokens, MLX cache up to %.1f MiB)",
            available / 2**20, total / 2**30, f" (a 1/{sharing} share)" if sharing > 1 else "",
            self.model_runner.kv_fraction, self.weights_bytes / 2**20, self.peak_activation_bytes / 2**20, tokens,
            self.cache_limit / 2**20,
        )
        return available

    def initialize_from_config(self, kv_cache_config: Any) -> None:
        self.kv_cache_config = kv_cache_config
        with self._on_launch_stream():
            self.model_runner.initialize_kv(kv_cache_config)

    def compile_or_warm_up_model(self) -> CompilationTimes:
        start = time.perf_counter()
        with self._on_launch_stream():
            self.model_runner.warm_up()
        logger.info("vmetal: warm-up took %.2f s", time.perf_counter() - start)
        return CompilationTimes(language_model=0.0, encoder=0.0)

    # ----------------------------------------------------------------- steps
    def execute_model(self, scheduler_output: Any) -> Any:
        times = self.model_runner.step_times
        so = scheduler_output
        rows = len(so.num_scheduled_tokens)
        # (requests, every one decoding a single token) of the step sample_tokens finishes.
        self._step_shape = (rows, so.total_num_scheduled_tokens == rows and not so.scheduled_new_reqs
                            and not so.scheduled_spec_decode_tokens)
        times.enter()
        try:
            with self._ring_errors(), self._on_launch_stream(settle=False):
                out = self.model_runner.execute_model(so)
        finally:
            times.leave()
        if out is not None:  # nothing to sample: vLLM does not call sample_tokens for this step
            times.idle()
        return out

    def sample_tokens(self, grammar_output: Any) -> Any:
        times = self.model_runner.step_times
        times.enter()
        try:
            # MLX evaluates the forward here, where a lost peer shows
            with self._ring_errors(), self._on_launch_stream(settle=False):
                out = self.model_runner.sample_tokens(grammar_output)
        except BaseException:
            times.idle()
            raise
        times.step(*self._step_shape)
        return out

    def take_draft_token_ids(self) -> Any:
        """The draft tokens of speculation for the step just sampled (vLLM's engine asks after each); a draft
        model's forwards count as the runner's time of the next step (step_times)."""
        times = self.model_runner.step_times
        times.enter()
        try:
            with self._on_launch_stream():
                return self.model_runner.take_draft_token_ids()
        finally:
            times.leave()

    @contextlib.contextmanager
    def _on_launch_stream(self, settle: bool = True) -> Iterator[None]:
        """Around a call into the runner: its graphs built on the stream its launches run on (launches.py), and
        unless the call is a step's (which settles where it must), every launch so far encoded first."""
        launches = self.model_runner.launches
        if settle:
            launches.settle()
        with launches.stream_context():
            yield

    def _ring_errors(self) -> Any:
        return self.ring.lost_peer_named() if self.ring else contextlib.nullcontext()

    def mlx_memory(self) -> dict[str, int]:
        """MLX's memory counters in bytes (active, cache, peak, cache_limit); for
        `LLM.collective_rpc("mlx_memory")`."""
        import mlx.core as mx

        limit = mx.set_cache_limit(self.cache_limit)  # the same value: only reads MLX's limit back
        return {"active": mx.get_active_memory(), "cache": mx.get_cache_memory(), "peak": mx.get_peak_memory(),
                "cache_limit": limit}

    def step_times(self, clear: bool = False) -> dict[str, Any]:
        """Medians of where the steps' time went, by kind of step and batch size (`StepTimes.summary`), over
        the last few thousand steps; `clear` starts afresh. For `LLM.collective_rpc("step_times")`."""
        times = self.model_runner.step_times
        summary = times.summary()
        if clear:
            times.clear()
        return summary

    def step_counts(self) -> dict[str, int]:
        """What the runner's steps met: requests preempted, and on the paged path how all-decode steps used the
        decode-ahead (`ModelRunnerBase.counts`); for `LLM.collective_rpc("step_counts")`. Unlike vLLM's
        Prometheus counters, these belong to this engine even when another one starts in the process."""
        return self.model_runner.step_counts()

    def check_health(self) -> None:
        return

    def synchronize_device(self) -> None:
        import mlx.core as mx

        launches = self.model_runner.launches
        launches.settle()
        mx.synchronize(*(() if launches.stream is None else (launches.stream,)))

    def shutdown(self) -> None:
        if self.model_runner is not None:
            self.model_runner.launches.close()
        self.model_runner = None
