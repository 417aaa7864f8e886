"""The random-weight models the benchmarks measure, by shape name, built once per folder.

Random weights need no download and no licence, and a shape is all a throughput number depends on. `tiny` is
small enough for a 2-core CPU box to run every benchmark in minutes; `qwen3-0.6b` is Qwen/Qwen3-0.6B's real
shape (its config.json: head_dim 128, vocabulary 151936, tied embeddings) for GPU runs, where the tiny model
would measure only overheads; `deep-tiny` has the real model's depth and a tiny width, for what a step
costs the host. `vmetal.demo.build_tiny_model` writes the checkpoint.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {"arch": "qwen3", "hidden_size": 512, "num_layers": 4, "num_heads": 8, "num_kv_heads": 4,
             "intermediate_size": 1536},
    # Qwen3-0.6B's 28 layers at a tiny width: a step's host work at full depth while its compute stays small
    # (benchmarks/bench_host.py).
    "deep-tiny": {"arch": "qwen3", "hidden_size": 128, "num_layers": 28, "num_heads": 4, "num_kv_heads": 2,
                  "intermediate_size": 384},
    "qwen3-0.6b": {"arch": "qwen3", "hidden_size": 1024, "num_layers": 28, "num_heads": 16, "num_kv_heads": 8,
                   "intermediate_size": 3072, "head_dim": 128, "vocab_size": 151936,
                   "tie_word_embeddings": True},
}
DEFAULT_SHAPE = "tiny"


def build_model(model_dir: Path | None, dtype: str, shape: dict[str, Any] | None = None) -> Path:
    """The folder of a checkpoint of `shape` (default `tiny`) in `dtype`: reused when its config.json
    already describes that model, else built there (in a new temp folder when `model_dir` is None)."""
    from vmetal.demo import build_tiny_model

    shape = shape or SHAPES[DEFAULT_SHAPE]
    if model_dir is None:
        model_dir = (Path(tempfile.mkdtemp(prefix="vmetal-bench-"))
                     / f"qwen3-{shape['hidden_size']}x{shape['num_layers']}-{dtype}")
    if _matches(model_dir / "config.json", dtype, shape):
        return model_dir
    kwargs = {k: v for k, v in shape.items() if k != "arch"}
    return build_tiny_model(model_dir, shape["arch"], dtype=dtype, **kwargs)


def _matches(config_path: Path, dtype: str, shape: dict[str, Any]) -> bool:
    if not config_path.is_file():
        return False
    c = json.loads(config_path.read_text())
    return (c.get("hidden_size") == shape["hidden_size"]
            and c.get("num_hidden_layers") == shape["num_layers"]
            and c.get("num_attention_heads") == shape["num_heads"]
            and c.get("num_key_value_heads") == shape["num_kv_heads"]
            and c.get("intermediate_size") == shape["intermediate_size"]
            and c.get("head_dim") == shape.get("head_dim", shape["hidden_size"] // shape["num_heads"])
            and ("vocab_size" not in shape or c.get("vocab_size") == shape["vocab_size"])
            and c.get("torch_dtype") == dtype)


def first_layers(source: Path, path: Path, layers: int) -> Path:
    """A copy of the checkpoint `source` that keeps only its first `layers` layers (the same embeddings, final
    norm and head): a draft model whose greedy tokens often, not always, agree with the source's, where random
    weights have no smaller sibling to draft with."""
    import re
    import shutil

    import mlx.core as mx

    shutil.copytree(source, path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": layers}))
    weights = mx.load(str(path / "model.safetensors"))
    kept = {k: v for k, v in weights.items()
            if not (m := re.match(r"model\.layers\.(\d+)\.", k)) or int(m.group(1)) < layers}
    mx.save_safetensors(str(path / "model.safetensors"), kept, metadata={"format": "mlx"})
    return path
