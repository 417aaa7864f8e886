"""Which of vLLM's parallel modes vmetal's engine serves, and the one-line refusal for what it does not.

- Tensor parallel (`--tensor-parallel-size N`): vLLM's `mp` executor, one worker per rank, the model split by
  mlx-lm's `shard` over MLX's ring (`vmetal.engine.distributed`). Each rank holds 1/N of the KV heads, so N
  must divide them; only the MLX compute path has a sharded forward.
- Data parallel (`--data-parallel-size N`): N independent engines behind one API server (vLLM's own
  machinery). vLLM runs the replicas of a mixture-of-experts model in lockstep instead (`DPEngineCoreProc`:
  idle replicas run dummy batches so that the experts' collectives line up), which this engine does not do.
- Pipeline parallel (`--pipeline-parallel-size N`): vLLM's `mp` executor, one worker per stage, each holding a
  run of the layers and passing hidden states on over MLX's ring (`vmetal.engine.pipeline`). The split reuses
  each family's own forward with its embedding, layers and final norm stood in for, so it is offered for the
  families whose forward is exactly embed → layers → norm (`PIPELINE_MODULES`, each tested); on either KV
  path of the MLX compute path, alone (not with tensor or data parallel).

Stdlib only: the CLI may import this module for its pre-flight.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

# The key in vLLM's `additional_config` (the dict vLLM keeps for platform plugins and ships to every engine
# process) under which the platform records how many workers share this machine's memory. vLLM rewrites the
# data-parallel fields of an independent replica's config to 1 before its worker starts, so the worker
# cannot count the replicas itself.
MEMORY_SHARE_KEY = "vmetal_memory_share"
# mlx-lm modules whose inner model runs embed_tokens → layers → norm and nothing else (a family that scales its
# embeddings inside, as Gemma does, would scale the hidden states a stage receives): the split is exact for them.
PIPELINE_MODULES = ("llama", "qwen2", "qwen3", "qwen3_moe")


def refusal(tensor: int, pipeline: int, data: int, *, kv_heads: int | None, moe: bool, kv_path: str,
            unsplittable: str | None = None, unstaged: str | None = None) -> str | None:
    """Why vmetal cannot serve these parallel sizes for this model, or None. `unsplittable`: the mlx-lm module
    of a model that has no `shard` (`unsplittable_module`); `unstaged`: one the pipeline split does not cover
    (`unstaged_module`)."""
    if pipeline > 1:
        flag = f"`--pipeline-parallel-size {pipeline}`"
        if tensor > 1 or data > 1:
            other = "--tensor-parallel-size" if tensor > 1 else "--data-parallel-size"
            return (f"{flag} with {other}: vmetal's engine runs one parallel mode at a time; choose pipeline "
                    f"parallel or {other}")
        if kv_path == "torch":
            return (f"{flag}: pipeline parallel needs the MLX compute path; unset VLLM_METAL_USE_MLX=0 or start "
                    "without it")
        if unstaged:
            return (f"{flag}: mlx-lm's `{unstaged}` model is not one vmetal splits into stages (it does "
                    f"{', '.join(PIPELINE_MODULES)}); serve it with --tensor-parallel-size, or without a split")
    if tensor > 1 and kv_path == "torch":
        return (f"`--tensor-parallel-size {tensor}`: tensor parallel needs the MLX compute path; unset "
                "VLLM_METAL_USE_MLX=0 or start without it")
    if tensor > 1 and unsplittable:
        return (f"`--tensor-parallel-size {tensor}`: mlx-lm's `{unsplittable}` model has no `shard`, so it cannot "
                "be split across ranks; serve it with --tensor-parallel-size 1")
    if tensor > 1 and kv_heads and kv_heads % tensor:
        sizes = [n for n in range(2, kv_heads + 1) if kv_heads % n == 0][:4]
        hint = f"choose one that divides it ({', '.join(map(str, sizes))})" if sizes else "start without it"
        return (f"`--tensor-parallel-size {tensor}`: the model's {kv_heads} KV heads cannot be split across "
                f"{tensor} ranks; {hint}")
    if data > 1 and moe:
        return (f"`--data-parallel-size {data}` with a mixture-of-experts model: vLLM runs such replicas in "
                "lockstep (dummy batches on idle replicas for the experts' collectives), which vmetal's engine "
                "does not implement; serve one replica per vmetal serve, or a dense model")
    return None


def ranks_sharing_memory(local_world_size: int, data_parallel_size_local: int) -> int:
    """Workers of one serve on this machine, which share its (unified) memory: the tensor-parallel ranks on
    this node times the data-parallel replicas started here."""
    return max(1, local_world_size) * max(1, data_parallel_size_local)


# vLLM's flags for the sizes, with the short spellings its parser also takes.
SIZE_FLAGS = {"tensor": ("--tensor-parallel-size", "-tp"), "pipeline": ("--pipeline-parallel-size", "-pp"),
              "data": ("--data-parallel-size", "-dp")}
# config.json keys that give a mixture-of-experts model its expert count, by family.
EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


def sizes_in_args(args: Sequence[str]) -> dict[str, int]:
    """The parallel sizes vLLM's arguments ask for (1 where not given; a value vLLM would refuse as not a number
    is left for vLLM to report)."""
    return {mode: _count(args, flag, short) for mode, (flag, short) in SIZE_FLAGS.items()}


def nodes_in_args(args: Sequence[str]) -> int:
    """`--nnodes` among vLLM's arguments (1 where not given, or not a number: vLLM's parser says what is wrong)."""
    return max(1, _count(args, "--nnodes"))


def _count(args: Sequence[str], flag: str, short: str | None = None) -> int:
    """The number `flag` (or its `short` form) gives among vLLM's arguments; 1 where absent or not a number."""
    value = None
    for i, arg in enumerate(args):  # argparse takes `-tp 2` and `-tp=2` too; the last one wins
        name, eq, inline = arg.partition("=")
        if name in (short, flag, "--" + flag[2:].replace("-", "_")):
            value = inline if eq else (args[i + 1] if i + 1 < len(args) else None)
    try:
        return int(value) if value is not None else 1
    except ValueError:
        return 1


def kv_heads_of(config: Mapping[str, Any]) -> int | None:
    text = config.get("text_config") if isinstance(config.get("text_config"), Mapping) else config
    heads = text.get("num_key_value_heads") or text.get("num_attention_heads")
    return int(heads) if isinstance(heads, int) else None


def is_moe(config: Mapping[str, Any]) -> bool:
    text = config.get("text_config") if isinstance(config.get("text_config"), Mapping) else config
    return any(isinstance(text.get(k), int) and text[k] > 0 for k in EXPERT_KEYS)


def unsplittable_module(config: Mapping[str, Any]) -> str | None:
    """The mlx-lm module of `config`'s model when its `Model` class has no `shard` (mlx-lm's tensor-parallel
    split), read from the module's source as the loader would pick it; None when it has one, or when that
    cannot be told here (the engine's load says so then)."""
    import ast

    from vmetal.preflight.cache_types import _mlx_lm_dir, mlx_module
    from vmetal.preflight.checkpoint import UnsupportedModelError

    try:
        name = mlx_module(dict(config))
    except UnsupportedModelError:
        return None  # refused on other grounds by the model checks
    root = _mlx_lm_dir()
    tree = ast.parse((root / "models" / f"{name}.py").read_text()) if root else None
    for node in tree.body if tree else ():
        if isinstance(node, ast.ClassDef) and node.name == "Model":
            has = any(isinstance(f, ast.FunctionDef) and f.name == "shard" for f in node.body)
            return None if has else f"mlx_lm.models.{name}"
    return None


def unstaged_module(config: Mapping[str, Any]) -> str | None:
    """The mlx-lm module of `config`'s model when the pipeline split does not cover it; None when it does, or
    when mlx-lm has no module for it (the model checks refuse that)."""
    from vmetal.preflight.cache_types import mlx_module
    from vmetal.preflight.checkpoint import UnsupportedModelError

    try:
        name = mlx_module(dict(config))
    except UnsupportedModelError:
        return None
    return None if name in PIPELINE_MODULES else name


def refused_args(args: Sequence[str], config: Mapping[str, Any] | None, kv_path: str) -> str | None:
    """`vmetal serve`'s pre-flight: `refusal` for the sizes among vLLM's arguments and the model's config.json
    (None: not known yet, only the model-independent rules apply)."""
    sizes = sizes_in_args(args)
    return refusal(sizes["tensor"], sizes["pipeline"], sizes["data"],
                   kv_heads=kv_heads_of(config) if config else None, moe=bool(config) and is_moe(config),
                   kv_path=kv_path,
                   unsplittable=unsplittable_module(config) if config and sizes["tensor"] > 1 else None,
                   unstaged=unstaged_module(config) if config and sizes["pipeline"] > 1 else None)
