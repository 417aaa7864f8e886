"""TorchModelRunner: the PyTorch compute path (`VLLM_METAL_USE_MLX=0`), the baseline MLX must beat.

Same engine, same request bookkeeping, same sampler as `MlxModelRunner`; only the forward
differs: the checkpoint's Hugging Face model in torch (`transformers.AutoModelForCausalLM`, in the
checkpoint's dtype) on the torch device, `mps` on a Mac and `cpu` elsewhere.

KV follows the MLX-managed layout: a prompt (or a chunk of it) runs alone on its own
`transformers.DynamicCache`; once its prompt is done the request joins `TorchDecodeBatch`, one
left-padded K/V tensor per layer, and every decoding request advances in one forward per step
(a 2-D padding mask and per-row position ids keep padded rows exact).
"""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path
from typing import Any

from vmetal.engine.runner.mlx_runner import MlxModelRunner
from vmetal.engine.runner.sampling import MetalSampler

logger = logging.getLogger("vllm.vmetal")  # under "vllm": its handlers and level apply

_SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def torch_device() -> Any:
    import torch

    return torch.device("mps" if torch.backends.mps.is_available() else "cpu")


def checkpoint_dtype(path: Path, config: dict[str, Any]) -> Any:
    """The dtype the weights are stored in (the first floating tensor), as the MLX path loads them."""
    import torch

    for file in sorted(path.glob("*.safetensors")):
        with open(file, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        for name, entry in header.items():
            if name != "__metadata__" and entry.get("dtype") in _SAFETENSORS_DTYPES:
                return getattr(torch, _SAFETENSORS_DTYPES[entry["dtype"]])
    named = config.get("dtype") or config.get("torch_dtype") or "float32"
    return getattr(torch, str(named).removeprefix("torch."))


def _new_cache(model: Any) -> Any:
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def _cache_of(model: Any, keys: list[Any], values: list[Any]) -> Any:
    """A DynamicCache holding `keys[i]` / `values[i]` ([B, H, L, D]) as layer i, without copying."""
    cache = _new_cache(model)
    for layer, k, v in zip(cache.layers, keys, values):
        layer.dtype, layer.device = k.dtype, k.device
        layer.keys, layer.values = k, v
        layer.is_initialized = True
    return cache


def _kv_of(cache: Any) -> tuple[list[Any], list[Any]]:
    return [layer.keys for layer in cache.layers], [layer.values for layer in cache.layers]


def prefill(model: Any, cache: Any, tokens: list[int], start: int, all_logits: bool = False) -> Any:
    """Run `tokens` (positions `start`...) on a per-request cache; returns the last position's logits [V]
    (every position's [n, V] with `all_logits`)."""
    import torch

    device = model.device
    ids = torch.tensor([tokens], dtype=torch.long, device=device)
    positions = torch.arange(start, start + len(tokens), device=device)[None]
    out = model(input_ids=ids, position_ids=positions, past_key_values=cache, use_cache=True,
                logits_to_keep=0 if all_logits else 1)
    return out.logits[0] if all_logits else out.logits[0, -1]


class TorchDecodeBatch:
    """The decoding requests, one row each, in one left-padded K/V tensor per layer."""

    def __init__(self, model: Any):
        self.model = model
        self.req_ids: list[str] = []
        self.keys: list[Any] = []
        self.values: list[Any] = []
        self.pad: list[int] = []  # left padding of each row
        self.lengths: list[int] = []  # tokens each row holds

    def __contains__(self, req_id: str) -> bool:
        return req_id in self.req_ids

    def __len__(self) -> int:
        return len(self.req_ids)

    @property
    def width(self) -> int:
        return self.keys[0].shape[-2] if self.keys else 0

    def add(self, req_id: str, request_cache: Any) -> None:
        import torch.nn.functional as F

        keys, values = _kv_of(request_cache)
        n = keys[0].shape[-2]
        width = max(self.width, n)
        if self.req_ids and width > self.width:
            grow = width - self.width
            self.keys = [F.pad(k, (0, 0, grow, 0)) for k in self.keys]
            self.values = [F.pad(v, (0, 0, grow, 0)) for v in self.values]
            self.pad = [p + grow for p in self.pad]
        row_k = [F.pad(k, (0, 0, width - n, 0)) for k in keys]
        row_v = [F.pad(v, (0, 0, width - n, 0)) for v in values]
        if self.req_ids:
            import torch

            self.keys = [torch.cat([a, b]) for a, b in zip(self.keys, row_k)]
            self.values = [torch.cat([a, b]) for a, b in zip(self.values, row_v)]
        else:
            self.keys, self.values = row_k, row_v
        self.req_ids.append(req_id)
        self.pad.append(width - n)
        self.lengths.append(n)

    def remove(self, req_ids: set[str]) -> None:
        import torch

        keep = [i for i, r in enumerate(self.req_ids) if r not in req_ids]
        if len(keep) == len(self.req_ids):
            return
        self.req_ids = [self.req_ids[i] for i in keep]
        self.pad = [self.pad[i] for i in keep]
        self.lengths = [self.lengths[i] for i in keep]
        if not keep:
            self.keys, self.values = [], []
            return
        index = torch.tensor(keep, device=self.keys[0].device)
        trim = min(self.pad)  # columns that are padding in every row left
        self.keys = [k.index_select(0, index)[:, :, trim:] for k in self.keys]
        self.values = [v.index_select(0, index)[:, :, trim:] for v in self.values]
        self.pad = [p - trim for p in self.pad]

    def extract(self, req_id: str) -> Any:
        """Take one row out as a per-request cache (for a request paused by the scheduler)."""
        i = self.req_ids.index(req_id)
        p = self.pad[i]
        cache = _cache_of(self.model,
                          [k[i : i + 1, :, p:].contiguous() for k in self.keys],
                          [v[i : i + 1, :, p:].contiguous() for v in self.values])
        self.remove({req_id})
        return cache

    def forward(self, model: Any, tokens: list[int]) -> Any:
        """One decode step for every row; `tokens[i]` is row i's last token. Returns [B, V]."""
        import torch

        device = self.keys[0].device
        width = self.width
        ids = torch.tensor(tokens, dtype=torch.long, device=device)[:, None]
        positions = torch.tensor(self.lengths, dtype=torch.long, device=device)[:, None]
        pad = torch.tensor(self.pad, device=device)[:, None]
        mask = (torch.arange(width + 1, device=device)[None] >= pad).long()
        cache = _cache_of(model, self.keys, self.values)
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                    use_cache=True, logits_to_keep=1)
        self.keys, self.values = _kv_of(cache)
        self.lengths = [n + 1 for n in self.lengths]
        return out.logits[:, -1]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.keys + self.values)


class TorchSampler(MetalSampler):
    """The same vLLM Sampler as the MLX path, fed torch logits directly."""

    def _argmax(self, logits: Any) -> list[int]:
        import torch

        return torch.argmax(logits, dim=-1).tolist()

    def _to_torch(self, logits: Any) -> Any:
        import torch

        # vLLM's sampler stays on the CPU torch device (never MPS), in float32.
        return logits.to("cpu", torch.float32)


class TorchModelRunner(MlxModelRunner):
    """The MLX-managed path's request bookkeeping, KV policy and sampler over a Hugging Face model in torch."""

    # Decode-ahead relies on MLX's asynchronous evaluation; torch on the CPU
    # computes eagerly, so there is nothing to overlap.
    decode_ahead_enabled = False

    @property
    def backend(self) -> str:
        return f"torch {self.torch_device}"

    def describe_backend(self) -> str:
        return self.backend

    # ---------------------------------------------------------------- set-up
    def load_model(self) -> None:
        import mlx.core as mx
        import torch
        from transformers import AutoModelForCausalLM
        from transformers.cache_utils import DynamicLayer
        from transformers.utils import logging as hf_logging

        from vmetal.engine import models
        from vmetal.preflight import cache_types

        path = models.resolve_model_path(self.model_config.model, self.model_config.revision)
        config = models.read_config(path)
        cache_types.check_model(config, str(path / "config.json"), "torch")
        if config.get("quantization") or config.get("quantization_config"):
            raise models.UnsupportedModelError(
                f"`{path}` is quantized; the PyTorch compute path (VLLM_METAL_USE_MLX=0) loads "
                "unquantized checkpoints only")
        dtype = checkpoint_dtype(path, config)
        self.torch_device = torch_device()
        hf_logging.disable_progress_bar()
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
        model = model.to(self.torch_device).eval().requires_grad_(False)
        if any(type(layer) is not DynamicLayer for layer in _new_cache(model).layers):
            raise models.UnsupportedModelError(
                f"`{path}` uses sliding-window or other non-standard attention layers, which the "
                "PyTorch compute path does not batch; run it with MLX (unset VLLM_METAL_USE_MLX)")
        cfg = model.config
        num_heads = cfg.num_attention_heads
        self.loaded = models.LoadedModel(
            model=model,
            config=config,
            path=path,
            num_layers=cfg.num_hidden_layers,
            num_kv_heads=getattr(cfg, "num_key_value_heads", None) or num_heads,
            num_heads=num_heads,
            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // num_heads,
            vocab_size=cfg.vocab_size,
            # vLLM's KV spec and the bytes-per-token maths share the MLX path's dtype type.
            dtype={torch.float32: mx.float32, torch.float16: mx.float16,
                   torch.bfloat16: mx.bfloat16}[dtype],
        )
        self.model = model
        # What the weights take, counted from the tensors: MLX's memory counters do not see torch's.
        self.weights_bytes = sum(t.nbytes for t in list(model.parameters()) + list(model.buffers()))
        self.decode = TorchDecodeBatch(model)
        self._finish_loading(TorchSampler)

    def enable_prefix_cache(self, budget_bytes: int) -> None:
        # envs.check_available refuses this combination before the engine starts.
        raise RuntimeError("VLLM_METAL_PREFIX_CACHE holds MLX KV; the PyTorch path has no prefix cache")

    def warm_up(self, tokens: int | None = None) -> None:
        import torch

        with torch.inference_mode():
            cache = _new_cache(self.model)
            logits = prefill(self.model, cache, [0] * (tokens or 4), 0)
            batch = TorchDecodeBatch(self.model)
            batch.add("warm-up", cache)
            batch.forward(self.model, [int(torch.argmax(logits))]).sum().item()

    # ------------------------------------------------------- compute hooks
    # Everything else (scheduler state, decode batching policy, sampling) is
    # MlxModelRunner's; only the tensors differ.
    def _new_request_cache(self) -> Any:
        return _new_cache(self.model)

    def _trim_request_cache(self, cache: Any, drop: int) -> None:
        for layer in cache.layers:
            keep = layer.keys.shape[2] - drop
            layer.keys, layer.values = layer.keys[:, :, :keep], layer.values[:, :, :keep]

    def _prefill(self, cache: Any, tokens: list[int], start: int, all_logits: bool = False) -> Any:
        return prefill(self.model, cache, tokens, start, all_logits)

    def _stack(self, rows: list[Any]) -> Any:
        import torch

        return torch.stack(rows)

    def _compute(self) -> Any:
        import torch

        return torch.inference_mode()
