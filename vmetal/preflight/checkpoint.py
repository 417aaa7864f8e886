"""What a checkpoint's config.json says: its MLX quantization, and the errors of a checkpoint that is missing or
not served (whether vmetal serves it is `cache_types`' decision).

Stdlib only: the CLI imports it for its pre-flight checks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class UnsupportedModelError(ValueError):
    """The checkpoint is not one the engine serves (on the KV path asked for)."""


class ModelNotFoundError(FileNotFoundError):
    """Neither a local folder nor a hub id that resolves to one."""


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
    published = config.get("quantization_config")
    if not isinstance(block, dict) and isinstance(published, dict) and published.get("quant_method") == "mxfp4" \
            and config.get("model_type") == "gpt_oss":
        # OpenAI's gpt-oss as published: mlx-lm loads its experts as MLX's mxfp4 (4 bits, groups of 32).
        return Quantization(bits=4, group_size=32, mode="mxfp4")
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
