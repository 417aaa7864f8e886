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


@dataclass
class LoadedModel:
    model: Any  # mlx.nn.Module from mlx-lm
    config: dict[str, Any]
    path: Path
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    dtype: Any  # mx.Dtype of the weights

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V for every layer, in the weights' dtype."""
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
    )
