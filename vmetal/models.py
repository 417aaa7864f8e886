"""Model loading through mlx-lm, with an architecture allow-list.

mlx-lm knows many architectures; the engine is tested on the dense decoder-only
families below (GQA, standard KV cache). Anything else stops at load with a
message instead of failing somewhere inside a forward pass.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# HF `architectures` entry -> mlx-lm module that implements it.
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture is not one the engine supports."""


class ModelNotFoundError(FileNotFoundError):
    """Neither a local folder nor a hub id that resolves to one."""


def supported_list() -> str:
    return ", ".join(sorted(SUPPORTED_ARCHITECTURES))


def check_architecture(config: dict[str, Any], where: str = "config.json") -> str:
    """Return the mlx-lm module name for `config`, or raise UnsupportedModelError."""
    archs = config.get("architectures") or []
    for arch in archs:
        if arch in SUPPORTED_ARCHITECTURES:
            return SUPPORTED_ARCHITECTURES[arch]
    named = ", ".join(archs) if archs else f"model_type={config.get('model_type')!r}"
    raise UnsupportedModelError(
        f"architecture {named} (from {where}) is not supported by vmetal; "
        f"supported: {supported_list()}"
    )


def resolve_model_path(model: str, revision: str | None = None) -> Path:
    """A local folder as is; a hub id through huggingface_hub's cache.

    `HF_HUB_OFFLINE=1` makes this a cache lookup only, which is what the engine
    process wants: `vmetal serve` pulls before it starts anything.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists() or model.startswith((".", "/", "~")):
        raise ModelNotFoundError(f"model folder `{model}` does not exist or is not a folder")
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                model,
                revision=revision,
                allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"],
            )
        )
    except Exception as exc:  # huggingface_hub raises many types; all mean "not here"
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
        hint = " (HF_HUB_OFFLINE is set: pull it first with `vmetal pull`)" if offline else ""
        raise ModelNotFoundError(f"model `{model}` could not be found locally or on the hub{hint}: {exc}") from exc


def read_config(path: Path) -> dict[str, Any]:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ModelNotFoundError(f"`{cfg_file}` is missing: not a Hugging Face model folder")
    try:
        return json.loads(cfg_file.read_text())
    except json.JSONDecodeError as exc:
        raise UnsupportedModelError(f"`{cfg_file}` is not valid JSON: {exc}") from exc


@dataclass(frozen=True)
class Quantization:
    """MLX's `quantization` block of config.json, as mlx-lm writes and loads it.

    `bits`/`group_size`/`mode` apply to every quantized layer unless the block names the layer itself
    (mlx-lm's mixed recipes): `other_bits` lists the other widths those layers use.
    """

    bits: int
    group_size: int
    mode: str = "affine"
    other_bits: tuple[int, ...] = ()

    def describe(self) -> str:
        text = f"{self.bits}-bit {self.mode}, group size {self.group_size}"
        if self.other_bits:
            text += f" (some layers {'/'.join(map(str, self.other_bits))}-bit)"
        return text

    def as_dict(self) -> dict[str, Any]:
        return {"bits": self.bits, "group_size": self.group_size, "mode": self.mode,
                "other_bits": list(self.other_bits)}


def quantization_of(config: dict[str, Any]) -> Quantization | None:
    """The MLX quantization of a checkpoint's config, or None when its weights are not MLX-quantized.

    mlx-lm writes the block under both `quantization` and `quantization_config`; only `quantization` is
    MLX's own (`quantization_config` with a `quant_method` is a torch method, e.g. AWQ or GPTQ).
    """
    block = config.get("quantization")
    if not isinstance(block, dict) and isinstance(config.get("text_config"), dict):
        block = config["text_config"].get("quantization")
    if not isinstance(block, dict):
        return None
    try:
        bits, group_size = int(block["bits"]), int(block["group_size"])
    except (KeyError, TypeError, ValueError):
        return None
    # Per-layer entries: {"bits": …, "group_size": …} for a layer quantized differently, False for one kept
    # in full precision.
    others = {int(v["bits"]) for v in block.values() if isinstance(v, dict) and "bits" in v} - {bits}
    return Quantization(bits=bits, group_size=group_size, mode=str(block.get("mode") or "affine"),
                        other_bits=tuple(sorted(others)))


@dataclass
class LoadedModel:
    model: Any  # mlx.nn.Module from mlx-lm
    config: dict[str, Any]
    path: Path
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    dtype: Any  # mx.Dtype of the unquantized weights (norms; scales of affine-quantized layers)
    quantization: Quantization | None = None

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V for every layer, in the weights' dtype.

        In a quantized model the activations (hence K and V) come out of the quantized matmuls in the
        dtype of the floating weights beside them, not in the packed integer dtype.
        """
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype.size


def load(model: str, revision: str | None = None) -> LoadedModel:
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import load_model

    path = resolve_model_path(model, revision)
    config = read_config(path)
    check_architecture(config, where=str(path / "config.json"))
    mlx_model, config = load_model(path)
    args = mlx_model.args
    num_heads = args.num_attention_heads
    head_dim = getattr(args, "head_dim", None) or args.hidden_size // num_heads
    params = tree_flatten(mlx_model.parameters())
    # Packed weights of a quantized layer are uint32 (mxfp4 scales uint8): only floating ones count.
    float_dtypes = [v.dtype for _, v in params if mx.issubdtype(v.dtype, mx.floating)]
    return LoadedModel(
        model=mlx_model,
        config=config,
        path=path,
        num_layers=len(mlx_model.layers),
        num_kv_heads=getattr(args, "num_key_value_heads", None) or num_heads,
        head_dim=head_dim,
        vocab_size=args.vocab_size,
        dtype=float_dtypes[0] if float_dtypes else mx.float32,
        quantization=quantization_of(config),
    )
