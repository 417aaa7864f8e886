"""A tiny decoder embedding model as Qwen3-Embedding publishes one, and the reference its vectors must match.

The checkpoint is the demo Qwen3 (tied embeddings) laid out like `Qwen/Qwen3-Embedding-0.6B`: the inner model's
tensors without the `model.` prefix and no output head, sentence-transformers' `modules.json` with a Pooling
module (`1_Pooling/config.json`: last-token pooling) and a Normalize one, from which vLLM picks its pooling
runner, pooling type and normalisation by itself. The reference is transformers' own `AutoModel` in float32:
the final hidden states pooled and L2-normalised, as sentence-transformers computes them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

POOLING_MODES = {"LAST": "pooling_mode_lasttoken", "MEAN": "pooling_mode_mean_tokens", "CLS": "pooling_mode_cls_token"}


def tiny_embedding_model(models_dir: Path, seed: int) -> Path:
    """A demo Qwen3 (hidden 64, 2 layers, tied embeddings, `seed`) as a Matryoshka embedding model, in
    `models_dir`."""
    from vmetal.demo import build_tiny_model

    tied = build_tiny_model(models_dir / f"qwen3-tied-{seed}", "qwen3", hidden_size=64, num_layers=2,
                            tie_word_embeddings=True, seed=seed)
    return as_embedding_model(tied, models_dir / f"qwen3-embedding-{seed}", matryoshka=True)


def as_embedding_model(source: Path, path: Path, pooling: str = "LAST", matryoshka: bool = False) -> Path:
    """The demo checkpoint `source` (tied embeddings) as a sentence-transformers decoder embedding model."""
    import mlx.core as mx

    config = json.loads((source / "config.json").read_text())
    assert config.get("tie_word_embeddings"), "an embedding checkpoint carries no output head: tie it"
    if path.exists():
        shutil.rmtree(path)
    shutil.copytree(source, path, ignore=shutil.ignore_patterns("model.safetensors"))
    weights = mx.load(str(source / "model.safetensors"))
    mx.save_safetensors(str(path / "model.safetensors"),
                        {k.removeprefix("model."): v for k, v in weights.items() if not k.startswith("lm_head")},
                        metadata={"format": "pt"})
    if matryoshka:
        (path / "config.json").write_text(json.dumps({**config, "is_matryoshka": True}, indent=2))
    (path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]))
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": config["hidden_size"], "include_prompt": True,
         **{mode: name == pooling for name, mode in POOLING_MODES.items()}}))
    (path / "2_Normalize").mkdir()
    return path


def reference_embeddings(path: Path, prompts: list[list[int]], pooling: str = "LAST",
                         dimensions: int | None = None) -> list[np.ndarray]:
    """transformers' float32 forward of each prompt's token ids, pooled, cut to `dimensions`, L2-normalised."""
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(path), dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for ids in prompts:
            hidden = model(torch.tensor([ids])).last_hidden_state[0]
            vector = {"LAST": hidden[-1], "MEAN": hidden.mean(dim=0), "CLS": hidden[0]}[pooling].numpy()
            vector = vector[:dimensions] if dimensions else vector
            out.append(vector / np.linalg.norm(vector))
    return out


def cosine(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
