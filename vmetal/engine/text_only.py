"""Multimodal checkpoints served for their text: vLLM's view of their architecture.

Gemma 3 (4B and up), Mistral Small 3.x, Qwen3-VL and Qwen3.5 ship as `…ForConditionalGeneration` wrappers: a
vision tower beside the language model. mlx-lm loads their language model and drops the tower (its `gemma3`,
`mistral3`, `qwen3_vl`, `qwen3_5` modules), which is what vmetal's runners compute. vLLM, though, inspects the
architecture named in config.json before anything runs, by importing its own torch class, whose multimodal
processing imports torchvision; the CPU torch stack vmetal installs has none (the CUDA build pip would pull
breaks beside CPU torch), so the inspection fails and vLLM refuses the model.

vLLM's documented answer for an out-of-tree plugin is `ModelRegistry.register_model`: here each wrapper's name
is registered to a class that declares what vmetal serves of it, text generation, and nothing multimodal, so
vLLM plans a text-only model (no image processor, no encoder budget). vLLM never builds the class: the worker
loads the checkpoint with mlx-lm (`models.load`). Image inputs are refused per request (`request_checks`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

# The wrappers whose language model mlx-lm loads from the whole checkpoint (its module for their model_type
# strips the vision weights in `sanitize`).
TEXT_ONLY_ARCHITECTURES = (
    "Gemma3ForConditionalGeneration",
    "Mistral3ForConditionalGeneration",
    "Qwen3VLForConditionalGeneration",
    "Qwen3VLMoeForConditionalGeneration",
    "Qwen3_5ForConditionalGeneration",
    "Qwen3_5MoeForConditionalGeneration",
)


class TextOnlyModel(nn.Module):
    """vLLM's interface of a text-generation model (`VllmModelForTextGeneration`), for the registry's
    inspection only: every method says so if anything ever calls it."""

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        self._not_built()

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        self._not_built()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, intermediate_tensors: Any = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        self._not_built()

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        self._not_built()

    def _not_built(self) -> Any:
        raise RuntimeError(f"{type(self).__name__} is computed by mlx-lm in vmetal's worker; vLLM's torch model "
                           "is not built on this platform")


# One class per architecture, named as config.json names it (vLLM reports the class name as the architecture),
# importable by name for the registry's lazy "module:class" form.
globals().update({arch: type(arch, (TextOnlyModel,), {"__module__": __name__})
                  for arch in TEXT_ONLY_ARCHITECTURES})


def register() -> None:
    """Register every wrapper's text-only declaration with vLLM's model registry (idempotent)."""
    from vllm import ModelRegistry

    for arch in TEXT_ONLY_ARCHITECTURES:
        ModelRegistry.register_model(arch, f"{__name__}:{arch}")
