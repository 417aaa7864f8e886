"""vLLM features vmetal's engine does not implement: refused before anything starts, never accepted and then
fatal (speculative decoding was: the server started, then the EngineCore died on the first request and every
request got HTTP 500). Speculative decoding by n-gram lookup or a draft model runs on the MLX-managed and paged KV
paths on one worker (vmetal/engine/runner/speculative.py, draft_model.py); every other method or place is refused
here.

One table, read twice: `vmetal serve`'s pre-flight looks for the flags among the arguments for vLLM (exit 2
within a second, nothing started), and the platform (`MetalPlatform.check_and_update_config`) looks at vLLM's
resolved config, which also covers `vllm serve` and `LLM(...)` used directly.

Stdlib only: the CLI imports this module for its pre-flight.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from vmetal.preflight.fit import vllm_arg, vllm_switch


@dataclass(frozen=True)
class Unsupported:
    flag: str  # vLLM's command-line flag
    feature: str
    # Whether vLLM's arguments ask for it (given them all).
    asked: Callable[[Sequence[str]], bool]
    # Whether vLLM's resolved config asks for it.
    configured: Callable[[Any], bool]

    def message(self) -> str:
        return f"`{self.flag}`: {self.feature} is not implemented by vmetal's engine; start without it"


def _given(flag: str) -> Callable[[Sequence[str]], bool]:
    return lambda args: vllm_arg(list(args), flag) is not None


def _not_auto(value: Any) -> bool:
    return value is not None and str(value).strip().lower() not in ("", "auto")


UNSUPPORTED: tuple[Unsupported, ...] = (
    Unsupported("--enable-lora", "serving LoRA adapters", lambda args: vllm_switch(list(args), "--enable-lora"),
                lambda c: c.lora_config is not None),
    Unsupported("--kv-transfer-config", "transferring KV cache between engines", _given("--kv-transfer-config"),
                lambda c: c.kv_transfer_config is not None),
    # The KV cache is kept in the model's dtype; vLLM would size its blocks for another one.
    Unsupported("--kv-cache-dtype", "a KV cache dtype other than the model's",
                lambda args: _not_auto(vllm_arg(list(args), "--kv-cache-dtype")),
                lambda c: _not_auto(c.cache_config.cache_dtype)),
)

# vLLM's pooling runner: embeddings (`--convert embed`, what vLLM picks for an embedding checkpoint) by these
# sequence poolings, on the MLX-managed KV path, one worker (vmetal/engine/runner/pooling_runner.py).
EMBED = "embed"
POOLING_TYPES = ("LAST", "MEAN", "CLS")


def pooling_refusal(convert: str | None, pooling_type: str | None, kv_path: str, world_size: int,
                    attention: str = "decoder", dense: bool = False) -> str | None:
    """Why vLLM's pooling runner cannot run as asked (`convert`: vLLM's convert type; `attention`: vLLM's
    `attn_type`; `dense`: a sentence-transformers Dense projection after the pooling), or None."""
    if convert not in (None, "auto", EMBED):
        return (f"`--convert {convert}`: vmetal's engine computes embeddings only (`--convert embed`, "
                "`/v1/embeddings`), not classification or scoring; start without it")
    if pooling_type is not None and pooling_type.upper() not in POOLING_TYPES:
        return (f"pooling type {pooling_type}: vmetal pools {', '.join(POOLING_TYPES)} only; choose one with "
                "`--pooler-config '{\"seq_pooling_type\": \"LAST\"}'`")
    if attention != "decoder":
        return (f"this embedding model's attention is {attention.replace('_', ' ')} (not causal), which mlx-lm's "
                "decoder models do not compute: vmetal serves decoder embedding models (Qwen3-Embedding and the like)")
    if dense:
        return ("this embedding model projects its pooled vector with sentence-transformers Dense layers, which "
                "vmetal does not apply: serve an embedding model without them")
    if kv_path != "mlx":
        return (f"embeddings run on the MLX-managed KV path only, and this server uses the {kv_path} path; leave "
                f"out {_leave(kv_path)}")
    if world_size > 1:
        return (f"embeddings run on one worker, and this server has {world_size} (tensor or pipeline parallel); "
                "start without one or the other")
    return None


def _leave(kv_path: str) -> str:
    """The setting that put a server on `kv_path` (not the MLX-managed one), for a refusal to name."""
    return "VLLM_METAL_USE_MLX=0" if kv_path == "torch" else "VLLM_METAL_USE_PAGED_ATTENTION=1 (`--paged`)"


def serves_embeddings(folder: str | None, args: Sequence[str]) -> bool:
    """Whether vLLM will run its pooling runner for the model at local `folder` (None: not local) with `args`:
    asked for, or picked by vLLM's own rule from a sentence-transformers `modules.json` or an architecture
    named `…Model` (a transformer without a head)."""
    from pathlib import Path

    from vmetal.preflight.fit import read_config

    runner = (vllm_arg(list(args), "--runner") or "auto").strip().lower()
    asked = _pooling_args(args)[0]
    if runner != "auto" or asked:
        return asked
    if folder is None:
        return False
    if (Path(folder) / "modules.json").is_file():
        return True
    architectures = (read_config(folder) or {}).get("architectures") or []
    return isinstance(architectures, list) and bool(architectures) and all(
        str(a).endswith("Model") for a in architectures)


def _pooling_args(args: Sequence[str]) -> tuple[bool, str | None, str | None]:
    """(whether vLLM's arguments ask for the pooling runner, their convert type, their pooling type)."""
    import json

    runner = (vllm_arg(list(args), "--runner") or "").strip().lower()
    convert = vllm_arg(list(args), "--convert")
    pooling_type = None
    raw = vllm_arg(list(args), "--pooler-config")
    try:
        pooler = json.loads(raw) if raw else {}
    except ValueError:
        pooler = {}  # vLLM's parser says what is wrong with it
    if isinstance(pooler, dict):
        pooling_type = pooler.get("seq_pooling_type") or pooler.get("pooling_type")
    asked = runner == "pooling" or convert not in (None, "none", "auto")
    return asked, convert, pooling_type


SPECULATIVE = "--speculative-config"
# What vLLM's SpeculativeConfig calls n-gram lookup (prompt lookup decoding), and a draft model.
NGRAM = "ngram"
DRAFT_MODEL = "draft_model"


def speculation_refusal(method: str | None, kv_path: str, world_size: int) -> str | None:
    """Why speculative decoding by `method` (None: a draft model named without one) cannot run on `kv_path` with
    `world_size` workers, or None."""
    if method not in (NGRAM, DRAFT_MODEL, None):
        import json

        return (f"`{SPECULATIVE}`: speculative decoding by {method} is not implemented by vmetal's engine; it "
                f"speculates with n-gram lookup ('{json.dumps(ngram_config())}') or a draft model "
                "('{\"model\": DRAFT, \"num_speculative_tokens\": 4}'), or start without it")
    what = "n-gram speculation" if method == NGRAM else "draft-model speculation"
    if kv_path not in ("mlx", "paged"):
        return (f"`{SPECULATIVE}`: {what} runs on the MLX-managed and paged KV paths only, and this server "
                f"uses the {kv_path} path; leave out {_leave(kv_path)}, or start without speculation")
    if world_size > 1:
        return (f"`{SPECULATIVE}`: {what} runs on one worker, and this server has {world_size} "
                "(tensor parallel); start without one or the other")
    return None


def draft_refusal(target: dict[str, Any], draft: dict[str, Any], name: str) -> str | None:
    """Why the checkpoint config `draft` cannot draft for `target`'s, or None: its tokens must mean the same
    (the same vocabulary size; a tokenizer that merely overlaps would propose ids the target reads otherwise)."""
    def vocab(config: dict[str, Any]) -> Any:
        return config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")

    if vocab(target) and vocab(draft) and vocab(target) != vocab(draft):
        return (f"draft model `{name}` has a vocabulary of {vocab(draft)} tokens and the model it drafts for "
                f"{vocab(target)}: a draft must share the target's tokenizer; pick a smaller model of the same "
                "family")
    return None


def check_draft(target: dict[str, Any], draft: dict[str, Any], where: str, name: str, state: Any = None) -> None:
    """A speculative draft model (config `draft`, read from `where`; its `cache_types.ModelState` when probed
    already) that cannot draft for the model of config `target` ({} when not known): a cache that cannot roll
    back rejected drafts (a recurrent state), or another vocabulary (`draft_refusal`). UnsupportedModelError
    with one line."""
    from vmetal.preflight.cache_types import check_model, check_speculation
    from vmetal.preflight.checkpoint import UnsupportedModelError

    check_speculation(state or check_model(draft, where, "mlx"), "draft")
    refused = draft_refusal(target, draft, name)
    if refused:
        raise UnsupportedModelError(refused)


# `vmetal serve --speculative ngram`: look up the last 4 tokens in the context and propose the 4 that followed
# them (benchmarks/bench_speculative.py measures this setting). vLLM's own defaults match 5-grams only.
NGRAM_TOKENS = 4
NGRAM_LOOKUP = 4


def ngram_config(tokens: int | None = None) -> dict[str, Any]:
    """vLLM's speculative config that `vmetal serve --speculative ngram [--speculative-tokens K]` stands for."""
    return {"method": NGRAM, "num_speculative_tokens": tokens or NGRAM_TOKENS, "prompt_lookup_max": NGRAM_LOOKUP}


# `vmetal serve --speculative DRAFT`: mlx-lm's own default (`mlx_lm.server --num-draft-tokens`), so the two
# compare like for like.
DRAFT_TOKENS = 3


def draft_config(model: str, tokens: int | None = None) -> dict[str, Any]:
    """vLLM's speculative config that `vmetal serve --speculative DRAFT [--speculative-tokens K]` stands for."""
    return {"method": DRAFT_MODEL, "model": model, "num_speculative_tokens": tokens or DRAFT_TOKENS}


def ngram_args(tokens: int | None = None) -> list[str]:
    """The same as vLLM arguments."""
    import json

    return [SPECULATIVE, json.dumps(ngram_config(tokens))]


def asks_speculation(args: Sequence[str]) -> bool:
    return _speculative_method(args)[0]


def _speculative_method(args: Sequence[str]) -> tuple[bool, str | None]:
    """(whether vLLM's arguments ask for speculation, the method they name: None for a draft model)."""
    import json

    raw = vllm_arg(list(args), SPECULATIVE)
    dotted = vllm_arg(list(args), f"{SPECULATIVE}.method")
    if raw is None:
        return dotted is not None, dotted
    try:
        value = json.loads(raw)
    except ValueError:
        return True, NGRAM  # not JSON: vLLM's parser says what is wrong with it
    if not isinstance(value, dict):
        return True, NGRAM
    return True, dotted or value.get("method") or (NGRAM if value.get("model") in (None, "[ngram]") else None)


def refused_args(args: Sequence[str], kv_path: str = "mlx") -> str | None:
    """The refusal for the first unsupported feature vLLM's arguments ask for (the server to run on `kv_path`),
    or None."""
    refused = next((item.message() for item in UNSUPPORTED if item.asked(args)), None)
    asked, method = _speculative_method(args)
    if refused is None and asked:
        from vmetal.preflight.parallel import sizes_in_args

        sizes = sizes_in_args(args)
        refused = speculation_refusal(method, kv_path, sizes["tensor"] * sizes["pipeline"])
    if refused is None and _pooling_args(args)[0]:
        refused = embeddings_refusal(args, kv_path)
    return refused


def embeddings_refusal(args: Sequence[str], kv_path: str) -> str | None:
    """`pooling_refusal` for a server that will run vLLM's pooling runner with vLLM's arguments `args`."""
    from vmetal.preflight.parallel import sizes_in_args

    sizes = sizes_in_args(args)
    _, convert, pooling_type = _pooling_args(args)
    return pooling_refusal(convert, pooling_type, kv_path, sizes["tensor"] * sizes["pipeline"])


def refused_config(vllm_config: Any, kv_path: str = "mlx") -> str | None:
    """The refusal for the first unsupported feature vLLM's resolved config asks for, or None."""
    refused = next((item.message() for item in UNSUPPORTED if item.configured(vllm_config)), None)
    spec = vllm_config.speculative_config
    if refused is None and spec is not None:
        refused = speculation_refusal(spec.method, kv_path, vllm_config.parallel_config.world_size)
    model = vllm_config.model_config
    if refused is None and getattr(model, "runner_type", "generate") == "pooling":
        pooler = model.pooler_config
        refused = pooling_refusal(model.convert_type, getattr(pooler, "seq_pooling_type", None), kv_path,
                                  vllm_config.parallel_config.world_size, attention=model.attn_type,
                                  dense=model.embedding_size != model.get_hidden_size())
    return refused
