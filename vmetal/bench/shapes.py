"""The models the benchmarks measure (random weights; for n-gram speculation, weights that copy), by shape name,
built once per folder.

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

from vmetal.bench.copying import MARK as COPYING_MARK

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
# Mixture-of-experts shapes for the GPU (issue 14's MoE rows): the published models' widths, experts and
# vocabulary, cut in depth so that three servers of one fit one card and the checkpoint its disk ("of" = the
# published depth). The per-token work of a layer is the real model's; a whole model's step is about
# depth/of times longer.
SHAPES["qwen3-30b-a3b-cut"] = {
    "arch": "qwen3_moe", "hidden_size": 2048, "num_layers": 8, "of": 48, "num_heads": 32, "num_kv_heads": 4,
    "intermediate_size": 6144, "head_dim": 128, "vocab_size": 151936, "tie_word_embeddings": False,
    "moe": {"architectures": ["Qwen3MoeForCausalLM"], "num_experts": 128, "num_experts_per_tok": 8,
            "moe_intermediate_size": 768, "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True,
            "attention_bias": False},
}
SHAPES["gpt-oss-20b-cut"] = {
    "arch": "gpt_oss", "hidden_size": 2880, "num_layers": 6, "of": 24, "num_heads": 64, "num_kv_heads": 8,
    "intermediate_size": 2880, "head_dim": 64, "vocab_size": 201088, "tie_word_embeddings": False,
    "moe": {"architectures": ["GptOssForCausalLM"], "num_local_experts": 32, "num_experts_per_tok": 4,
            "sliding_window": 128, "layer_types": ["sliding_attention", "full_attention"] * 3,
            "attention_bias": True, "rope_theta": 150000.0},
}
# Models whose weights copy their context (`vmetal.bench.copying`; "copying" = how many tokens they match), for
# n-gram speculation, whose gain a random-weight model cannot show: the same shapes with head_dim 128.
SHAPES["copy-tiny"] = {"arch": "qwen3", "hidden_size": 256, "num_layers": 4, "num_heads": 2, "num_kv_heads": 2,
                       "intermediate_size": 256, "head_dim": 128, "copying": 3}
SHAPES["qwen3-0.6b-copying"] = {**SHAPES["qwen3-0.6b"], "copying": 3}
# copy-tiny at Qwen3-0.6B's depth: its copying lives in layers 0..3, so a cut to those (`first_layers`) is a draft
# that computes what the target does, the agreeing pair a draft-model benchmark wants (benchmarks/bench_draft.py).
SHAPES["copy-deep-tiny"] = {**SHAPES["copy-tiny"], "num_layers": 28}
DEFAULT_SHAPE = "tiny"


def section_name(base: str, name: str) -> str:
    """The RESULTS.md section a script writes for shape `name`: its own for an MoE or a copying shape, so their
    rows stand beside the dense random model's instead of replacing them."""
    return f"{base}-{name}" if "moe" in SHAPES[name] or "copying" in SHAPES[name] else base


def describe(name: str, dtype: str) -> str:
    """The model a section measures, in one phrase: `random-weight Qwen3 (...): hidden ..., dtype`."""
    shape = SHAPES[name]
    depth = f"{shape['num_layers']} layers" + (f" (of the published {shape['of']})" if "of" in shape else "")
    moe = shape.get("moe", {})
    experts = moe.get("num_experts") or moe.get("num_local_experts")
    width = (f"{experts} experts ({moe['num_experts_per_tok']} a token) of "
             f"{moe.get('moe_intermediate_size', shape['intermediate_size'])}" if experts
             else f"intermediate {shape['intermediate_size']}")
    weights = (f"{shape['arch']} with weights that copy its context (`vmetal.bench.copying`, {shape['copying']} "
               "tokens matched)" if "copying" in shape else f"random-weight {shape['arch']}")
    return (f"{weights} (`vmetal.bench.shapes` `{name}`): hidden {shape['hidden_size']}, "
            f"{depth}, {shape['num_heads']} heads, {shape['num_kv_heads']} KV heads, {width}, {dtype}")


def build_model(model_dir: Path | None, dtype: str, shape: dict[str, Any] | None = None) -> Path:
    """The folder of a checkpoint of `shape` (default `tiny`) in `dtype`: reused when its config.json
    already describes that model, else built there (in a new temp folder when `model_dir` is None)."""
    from vmetal.demo import build_tiny_model

    shape = shape or SHAPES[DEFAULT_SHAPE]
    if model_dir is None:
        model_dir = (Path(tempfile.mkdtemp(prefix="vmetal-bench-"))
                     / f"{shape['arch']}-{shape['hidden_size']}x{shape['num_layers']}-{dtype}")
    if _matches(model_dir / "config.json", dtype, shape):
        return model_dir
    kwargs = {k: v for k, v in shape.items() if k not in ("arch", "moe", "of", "copying")}
    if "copying" in shape:
        from vmetal.bench.copying import make_copying

        make_copying(build_tiny_model(model_dir, shape["arch"], dtype=dtype, **kwargs), shape["copying"])
        return model_dir
    if "moe" not in shape:
        return build_tiny_model(model_dir, shape["arch"], dtype=dtype, **kwargs)
    from vmetal.demo import build_checkpoint, model_config

    # The dense Qwen3 config of the same attention, turned into the family's own by its MoE fields.
    dense = model_config("qwen3", hidden_size=kwargs["hidden_size"], num_layers=kwargs["num_layers"],
                          num_heads=kwargs["num_heads"], num_kv_heads=kwargs["num_kv_heads"],
                          intermediate_size=kwargs["intermediate_size"], vocab_size=kwargs["vocab_size"],
                          max_position_embeddings=4096, dtype=dtype,
                          tie_word_embeddings=kwargs["tie_word_embeddings"], head_dim=kwargs["head_dim"])
    return build_checkpoint(model_dir, {**dense, "model_type": shape["arch"], **shape["moe"]}, dtype=dtype)


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
            and c.get("torch_dtype") == dtype
            and c.get("model_type") == shape["arch"]
            and c.get(COPYING_MARK) == shape.get("copying"))


def first_layers(source: Path, path: Path, layers: int) -> Path:
    """A copy of the checkpoint `source` that keeps only its first `layers` layers (the same embeddings, final
    norm and head): a draft model whose greedy tokens often, not always, agree with the source's, where random
    weights have no smaller sibling to draft with."""
    import re
    import shutil

    import mlx.core as mx

    config = {**json.loads((source / "config.json").read_text()), "num_hidden_layers": layers}
    if (path / "config.json").is_file() and json.loads((path / "config.json").read_text()) == config:
        return path  # cut from the same checkpoint by an earlier run (a profiler run twice)
    shutil.rmtree(path, ignore_errors=True)
    shutil.copytree(source, path)
    weights = mx.load(str(path / "model.safetensors"))
    kept = {k: v for k, v in weights.items()
            if not (m := re.match(r"model\.layers\.(\d+)\.", k)) or int(m.group(1)) < layers}
    mx.save_safetensors(str(path / "model.safetensors"), kept, metadata={"format": "mlx"})
    (path / "config.json").write_text(json.dumps(config))  # last: a folder cut short is never reused
    return path
