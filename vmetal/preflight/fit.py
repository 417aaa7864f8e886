"""Will this model fit? A memory estimate shared by `vmetal serve`'s pre-flight, `vmetal doctor` and `pull`.

    report = estimate(config, weight_bytes_of(folder), max_model_len=4096)
    report.verdict       # "fits" | "tight" | "does not fit"
    report.describe()    # one line with GiB numbers

The estimate is what the engine needs at the least: the weights as stored (an MLX-quantized checkpoint's
packed bytes, which mlx-lm keeps packed in memory, not parameters x dtype), K and V for `num_seqs`
sequences of `max_model_len` tokens in the checkpoint's dtype, and an overhead for activations, MLX's
buffer cache and the runtime. vLLM refuses to start unless one full-length sequence fits in the KV
budget, so `num_seqs=1` is the hard floor; more sequences only make the scheduler queue requests.

`available` is `vmetal.preflight.host.memory_for_mlx()` (Metal's recommended working set on a Mac) unless given.
Pure arithmetic apart from that default, so every boundary is unit-tested with made-up numbers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from vmetal.preflight.checkpoint import Quantization, quantization_of

GiB = 1024**3
MiB = 1024**2

# Above this share of the available memory a model "fits" only "tightly": the rest of macOS, the
# vLLM front-end and any other app share the same unified memory.
TIGHT_FRACTION = 0.75
# Activations of a prefill chunk, MLX's buffer cache and the runtime: a fixed floor plus a share of the
# weights (bigger models have bigger activations). Measured on the tiny models as a few hundred MiB.
OVERHEAD_FIXED = 512 * MiB
OVERHEAD_WEIGHTS_SHARE = 0.10
# With no --max-model-len, vLLM uses the config's max_position_embeddings; long-context models declare
# 128k+, which serve caps for the estimate so that the common case is judged at a usable length.
DEFAULT_MAX_LEN_CAP = 32768
# Suggested --max-model-len values are rounded down to this many tokens.
LEN_STEP = 256

Verdict = Literal["fits", "tight", "does not fit"]

DTYPE_BYTES = {
    "float32": 4, "fp32": 4, "float": 4,
    "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2, "half": 2,
    "float8_e4m3fn": 1, "float8_e5m2": 1, "fp8": 1,
}
DEFAULT_DTYPE = "bfloat16"  # what vLLM picks for a config that names none


class ConfigShapeError(ValueError):
    """The config lacks what the KV estimate needs (layers, heads)."""


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    # Multimodal checkpoints keep the language model's shape under text_config.
    inner = config.get("text_config")
    if isinstance(inner, dict) and "num_hidden_layers" not in config:
        return {**config, **inner}
    return config


def dtype_name(config: dict[str, Any]) -> str:
    cfg = _text_config(config)
    name = cfg.get("dtype") or cfg.get("torch_dtype") or DEFAULT_DTYPE
    return str(name).removeprefix("torch.")


def dtype_bytes(config: dict[str, Any]) -> int:
    name = dtype_name(config)
    # An unknown or "auto" dtype: vLLM's default (bf16) is the best guess.
    return DTYPE_BYTES.get(name.lower(), 2)


def kv_bytes_per_token(config: dict[str, Any]) -> int:
    """K and V of one token across every layer: 2 x layers x kv_heads x head_dim x dtype bytes.

    DeepSeek-V2's MLA: mlx-lm's cache holds every head's decompressed K (qk_nope + qk_rope wide) and V
    (v_head_dim wide), not the compressed latent."""
    cfg = _text_config(config)
    try:
        layers = int(cfg["num_hidden_layers"])
        heads = int(cfg["num_attention_heads"])
        if cfg.get("model_type") == "deepseek_v2" and "qk_rope_head_dim" in cfg:
            width = (int(cfg.get("qk_nope_head_dim", 128)) + int(cfg["qk_rope_head_dim"])
                     + int(cfg.get("v_head_dim", 128)))
            return layers * heads * width * dtype_bytes(cfg)
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        head_dim = int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads)
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
        raise ConfigShapeError(f"config.json lacks the model's shape ({exc})") from None
    return 2 * layers * kv_heads * head_dim * dtype_bytes(cfg)


def kv_bytes(config: dict[str, Any], length: int, held: tuple[int | None, ...] = ()) -> tuple[int, int]:
    """(K and V of one `length`-token sequence, the part of it that grows with every token past the windows).

    `held`: per layer, the most tokens its cache keeps (`cache_types.ModelState.held`: None for all, a sliding
    window's size, 0 for a recurrent state); empty, or not one per layer, counts every layer full-length. A
    Gemma 3 keeps 1,024 tokens in five layers of six, so its KV grows at a sixth of the full-attention rate.
    """
    per_token = kv_bytes_per_token(config)
    layers = int(_text_config(config)["num_hidden_layers"])
    if len(held) != layers:
        return per_token * length, per_token
    per_layer = per_token // layers
    growing = per_layer * sum(1 for n in held if n is None)
    return growing * length + per_layer * sum(min(length, n) for n in held if n is not None), growing


def overhead_for(weights_bytes: int) -> int:
    return OVERHEAD_FIXED + int(weights_bytes * OVERHEAD_WEIGHTS_SHARE)


def default_max_model_len(config: dict[str, Any], cap: int = DEFAULT_MAX_LEN_CAP) -> int:
    """What serve estimates with when no --max-model-len is given: the config's limit, at most `cap`."""
    declared = _text_config(config).get("max_position_embeddings")
    try:
        value = int(declared)
    except (TypeError, ValueError):
        return cap
    return min(value, cap) if value > 0 else cap


def _gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB"


@dataclass(frozen=True)
class FitReport:
    weights_bytes: int
    kv_bytes: int
    overhead: int
    total: int
    available: int
    verdict: Verdict
    max_model_len: int
    num_seqs: int
    kv_bytes_per_token: int  # of the KV that grows with the length (every layer's, but sliding windows')
    quantization: Quantization | None = None  # MLX's, from config.json
    draft_bytes: int = 0  # of the weights: a speculative draft model's, which serves beside the model
    nodes: int = 1  # machines the model is split across (tensor/pipeline parallel): every figure is one node's

    @property
    def share(self) -> float:
        """total / available."""
        return self.total / self.available if self.available > 0 else float("inf")

    def max_len_that_fits(self, fraction: float = 1.0) -> int:
        """The longest max_model_len (a multiple of LEN_STEP) whose estimate stays within `fraction` of
        available; 0 when the weights and overhead alone do not."""
        # The windows' share is fixed once the length passes them, which the suggestions are about.
        fixed = self.kv_bytes - self.kv_bytes_per_token * self.max_model_len * self.num_seqs
        room = int(self.available * fraction) - self.weights_bytes - self.overhead - max(0, fixed)
        per_len = self.kv_bytes_per_token * self.num_seqs
        if room <= 0 or per_len <= 0:
            return 0
        return (room // per_len) // LEN_STEP * LEN_STEP

    def describe(self) -> str:
        seqs = f"{self.num_seqs} x " if self.num_seqs != 1 else ""
        quant = f" ({self.quantization.describe()})" if self.quantization else ""
        if self.draft_bytes:
            quant += f", {_gib(self.draft_bytes)} of them the draft model's"
        split = f" on each of {self.nodes} nodes" if self.nodes > 1 else ""
        return (f"~{_gib(self.total)} needed{split} (weights {_gib(self.weights_bytes)}{quant} + KV "
                f"{_gib(self.kv_bytes)} for {seqs}{self.max_model_len} tokens + overhead "
                f"{_gib(self.overhead)}) of {_gib(self.available)} available to MLX "
                f"({self.share:.0%}): {self.verdict}")

    def advice(self) -> str:
        """What to do about a "tight" or "does not fit" verdict, naming the flag that helps."""
        length = self.max_len_that_fits(TIGHT_FRACTION) or self.max_len_that_fits(1.0)
        if 0 < length < self.max_model_len:
            return (f"`--max-model-len {length}` fits at this size; or use a smaller or quantized (4-bit) "
                    "model")
        return ("use a smaller or quantized (4-bit) model: the weights alone take most of the memory "
                "MLX may use here (on a Mac, `sudo sysctl iogpu.wired_limit_mb=N` lets the GPU wire more)")

    def as_dict(self) -> dict[str, Any]:
        return {
            "weights_bytes": self.weights_bytes, "kv_bytes": self.kv_bytes, "overhead": self.overhead,
            "total": self.total, "available": self.available, "verdict": self.verdict,
            "max_model_len": self.max_model_len, "num_seqs": self.num_seqs,
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "quantization": self.quantization.as_dict() if self.quantization else None, "nodes": self.nodes,
        }


def verdict_for(total: int, available: int) -> Verdict:
    if total > available:
        return "does not fit"
    if total > TIGHT_FRACTION * available:
        return "tight"
    return "fits"


def estimate(config: dict[str, Any], weight_bytes: int, *, max_model_len: int, num_seqs: int = 1,
             memory_bytes: int | None = None, draft: tuple[dict[str, Any], int] | None = None,
             held: tuple[int | None, ...] = (), nodes: int = 1) -> FitReport:
    """Memory needed to serve a model of `config` with `weight_bytes` of weights, against what MLX has; with
    `draft` (its config and weight bytes), a speculative draft model beside it, which holds every token too;
    `held`: the tokens each layer's cache keeps (`kv_bytes`); `nodes`: machines that split the model between
    them (tensor or pipeline parallel with `--nnodes`), each holding its share of the weights and of every
    sequence's KV, against its own memory.

    Raises `ConfigShapeError` when a config lacks the layer/head counts the KV estimate needs.
    """
    if max_model_len < 1 or num_seqs < 1:
        raise ValueError("max_model_len and num_seqs must be positive")
    one, per_token = kv_bytes(config, max_model_len, held)
    draft_bytes = 0
    if draft is not None:
        one += kv_bytes_per_token(draft[0]) * max_model_len
        per_token += kv_bytes_per_token(draft[0])
        draft_bytes = draft[1]
        weight_bytes += draft_bytes
    if nodes < 1:
        raise ValueError("nodes must be positive")
    # TP splits every layer's heads, PP the layers: either way each node keeps about 1/nodes of both.
    weight_bytes, draft_bytes, one, per_token = (-(-n // nodes) for n in (weight_bytes, draft_bytes, one, per_token))
    kv = one * num_seqs
    overhead = overhead_for(weight_bytes)
    total = weight_bytes + kv + overhead
    if memory_bytes is None:
        from vmetal.preflight.host import memory_for_mlx

        memory_bytes = memory_for_mlx()
    return FitReport(weights_bytes=int(weight_bytes), kv_bytes=kv, overhead=overhead, total=total,
                     available=int(memory_bytes), verdict=verdict_for(total, memory_bytes),
                     max_model_len=max_model_len, num_seqs=num_seqs, kv_bytes_per_token=per_token,
                     quantization=quantization_of(config), draft_bytes=int(draft_bytes), nodes=nodes)


def weight_bytes_of(folder: str | Path) -> int:
    """Total size of the folder's *.safetensors files (its weights as stored, quantized or not)."""
    # stat follows the Hugging Face cache's symlinks to the blobs they point at.
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors") if p.is_file())


def read_config(folder: str | Path) -> dict[str, Any] | None:
    """config.json as a dict, or None when it is missing or not a JSON object."""
    try:
        data = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def estimate_folder(folder: str | Path, *, max_model_len: int | None = None, num_seqs: int = 1,
                    memory_bytes: int | None = None, held: tuple[int | None, ...] = (),
                    draft: str | Path | None = None, nodes: int = 1) -> FitReport | None:
    """`estimate` for a local Hugging Face folder (and a local speculative `draft` model folder beside it, when
    its config has the shape the KV estimate needs; else the engine's KV budget alone counts it); None when the
    model has no weights or no usable config."""
    config = read_config(folder)
    weights = weight_bytes_of(folder)
    if config is None or weights == 0:
        return None
    length = max_model_len or default_max_model_len(config)
    beside = None
    draft_weights = weight_bytes_of(draft) if draft is not None else 0
    draft_config = read_config(draft) if draft_weights else None
    if draft_config is not None:
        try:
            kv_bytes_per_token(draft_config)
            beside = (draft_config, draft_weights)
        except ConfigShapeError:
            pass
    try:
        return estimate(config, weights, max_model_len=length, num_seqs=num_seqs, memory_bytes=memory_bytes,
                        draft=beside, held=held, nodes=nodes)
    except ConfigShapeError:
        return None


def nodes_splitting(vllm_args: list[str]) -> int:
    """How many machines hold a share of the model: `--nnodes` when tensor/pipeline parallel ranks span them;
    1 otherwise (one machine, or data-parallel replicas, each a whole model)."""
    from vmetal.preflight.parallel import nodes_in_args, sizes_in_args

    nodes = nodes_in_args(vllm_args)
    sizes = sizes_in_args(vllm_args)
    return nodes if nodes > 1 and sizes["tensor"] * sizes["pipeline"] >= nodes else 1


def _spellings(name: str) -> set[str]:
    return {name, name.replace("-", "_").replace("__", "--")}


def vllm_arg(args: list[str] | tuple[str, ...], name: str) -> str | None:
    """The value of `--name` in vLLM arguments (last one wins, as in argparse; `_` and `-` both spelled)."""
    spellings = _spellings(name)
    value = None
    for i, arg in enumerate(args):
        flag, eq, inline = arg.partition("=")
        if flag in spellings:
            value = inline if eq else (args[i + 1] if i + 1 < len(args) else None)
    return value


def vllm_switch(args: list[str] | tuple[str, ...], name: str) -> bool:
    """Whether the switch `--name` (a flag that takes no value) is among vLLM arguments."""
    spellings = _spellings(name)
    return any(arg.partition("=")[0] in spellings for arg in args)


def serving_fit(folder: str | Path, max_model_len: int | None, vllm_args: list[str],
                draft: str | Path | None = None, held: tuple[int | None, ...] = ()) -> FitReport | None:
    """The fit of a local model folder as `vllm serve` would run it, for one sequence of the context length
    vLLM will use (it refuses to start below that; vLLM itself would find out only after loading the
    weights), with a local speculative `draft` model's weights and KV beside it; `held`: the tokens each layer
    keeps (`kv_bytes`), when the pre-flight has probed the model's caches. None when there is nothing firm to
    judge: no weights or no shape in config.json (vLLM will say what is wrong), or a `--max-model-len` after
    `--` that vLLM sizes itself (`auto`, `1k`, …).
    A model that does not fit is a `VmetalError` (exit 2) naming what to change."""
    from vmetal.errors import USAGE, VmetalError

    given = vllm_arg(vllm_args, "--max-model-len")  # after `--`, it wins over the flag
    if given is not None:
        if not given.isdigit():
            return None
        max_model_len = int(given)
    report = estimate_folder(folder, max_model_len=max_model_len, held=held, draft=draft,
                             nodes=nodes_splitting(vllm_args))
    if report is not None and report.verdict == "does not fit":
        raise VmetalError(f"model `{folder}` is too big for this machine: {report.describe()}",
                          hint=report.advice(), exit_code=USAGE)
    return report
