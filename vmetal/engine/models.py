"""Model loading through mlx-lm: a checkpoint folder (or a hub id from the local cache) as an MLX model.

The checkpoint checks (architecture, quantization block) are `vmetal.preflight.checkpoint`'s, shared with the
CLI's pre-flight; this module adds what only the engine process does: resolving the folder and loading it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmetal.preflight.checkpoint import (
    ModelNotFoundError,
    Quantization,
    UnsupportedModelError,
    check_architecture,
    quantization_of,
    read_config,
)

__all__ = ["LoadedModel", "ModelNotFoundError", "UnsupportedModelError", "load", "read_config", "resolve_model_path"]


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
    num_heads: int | None = None  # query heads (None: as many as KV heads)

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
        num_heads=num_heads,
        head_dim=head_dim,
        vocab_size=args.vocab_size,
        dtype=float_dtypes[0] if float_dtypes else mx.float32,
        quantization=quantization_of(config),
    )


def logits_of(model: Any, hidden: Any) -> Any:
    """The LM head of an mlx-lm causal LM, applied to selected hidden states only."""
    if getattr(model.args, "tie_word_embeddings", False):
        return model.model.embed_tokens.as_linear(hidden)
    return model.lm_head(hidden)
