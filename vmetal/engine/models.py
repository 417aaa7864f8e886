"""Model loading through mlx-lm: a checkpoint folder (or a hub id from the local cache) as an MLX model.

The checkpoint checks (which KV path holds the model's caches, the quantization block) are `vmetal.preflight`'s,
shared with the CLI's pre-flight (asked again here, in-process, before any weight is read); this module adds
what only the engine process does: resolving the folder, loading it, measuring the K/V shapes its caches hold,
and its output head on selected hidden states (`logits_at`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmetal.preflight import cache_types
from vmetal.preflight.checkpoint import (
    ModelNotFoundError,
    Quantization,
    UnsupportedModelError,
    quantization_of,
    read_config,
)

__all__ = ["LoadedModel", "ModelNotFoundError", "UnsupportedModelError", "load", "logits_at", "read_config",
           "resolve_model_path"]


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
    num_layers: int  # the layers that keep K/V (a hybrid's recurrent layers keep a fixed-size state instead)
    num_kv_heads: int
    head_dim: int  # of the keys (and of the values but for MLA's: `kv_dims`)
    vocab_size: int
    dtype: Any  # mx.Dtype of the unquantized weights (norms; scales of affine-quantized layers)
    quantization: Quantization | None = None
    num_heads: int | None = None  # query heads (None: as many as KV heads)
    # (KV heads, key width, value width) of each layer, as its cache holds them after a probe forward; MLA
    # layers (DeepSeek-V2) have keys wider than values. Empty: every layer is num_kv_heads x head_dim for both.
    kv_widths: tuple[tuple[int, int, int], ...] = ()
    # Whether the model's output head may run on selected hidden states only (checked at load: `_probe`).
    head_on_rows: bool = True
    # Whether every layer's cache can give back positions at any length (`trim`): a KVCache can, a
    # sliding-window RotatingKVCache cannot once it has wrapped around its window, a recurrent state never.
    trimmable: bool = True
    # A hybrid's recurrent layers (mlx-lm's ArraysCache): how many, and the bytes of state one request keeps
    # in them whatever its length.
    state_layers: int = 0
    state_bytes: int = 0
    # The pre-flight's view of the checkpoint (cache types per layer), as decided before the weights were read.
    state: cache_types.ModelState | None = None
    # This rank's pipeline stage (`vmetal.engine.pipeline.Stage`); None when the model is not split in stages.
    stage: Any = None

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V for every layer, in the weights' dtype.

        In a quantized model the activations (hence K and V) come out of the quantized matmuls in the
        dtype of the floating weights beside them, not in the packed integer dtype.
        """
        return sum(self._layer_bytes())

    @property
    def kv_dims(self) -> tuple[int, int]:
        """(key width, value width) of the first K/V layer: MLA's values are narrower than its keys (the paged
        pools and vLLM's spec take both; every layer of the families served has the same)."""
        return self.kv_widths[0][1:] if self.kv_widths else (self.head_dim, self.head_dim)

    def _layer_bytes(self) -> list[int]:
        """K and V bytes per token of each K/V layer."""
        if self.kv_widths:
            return [h * (k + v) * self.dtype.size for h, k, v in self.kv_widths]
        return [2 * self.num_kv_heads * self.head_dim * self.dtype.size] * self.num_layers

    def kv_held(self) -> tuple[int | None, ...]:
        """Per K/V layer of this rank (as in `kv_widths`), the most tokens its cache keeps (None: every one), from
        the pre-flight's reading (`state.held`); empty when that does not line up with the layers loaded."""
        held = self.state.held if self.state is not None else ()
        if self.stage is not None and len(held) == self.stage.num_layers:
            held = held[self.stage.start:self.stage.end]
        held = tuple(n for n in held if n != 0)  # a recurrent layer keeps no K/V
        return held if len(held) == len(self._layer_bytes()) else ()

    def growing_layers(self) -> tuple[int, ...]:
        """The K/V layers whose cache grows with every token: all of them, unless some keep a sliding window
        (mlx-lm's RotatingKVCache) and at least one does grow."""
        held = self.kv_held()
        every = tuple(range(len(self._layer_bytes())))
        if not held or all(n is not None for n in held):
            return every
        return tuple(i for i in every if held[i] is None)

    @property
    def growing_kv_bytes_per_token(self) -> int:
        """What one more token of context costs: K and V of the layers that keep every token."""
        per_layer = self._layer_bytes()
        return sum(per_layer[i] for i in self.growing_layers())

    @property
    def window_bytes(self) -> int:
        """The most K and V one request's sliding-window layers hold, whatever its length."""
        growing = set(self.growing_layers())
        held = self.kv_held()
        return sum(b * (held[i] or 0) for i, b in enumerate(self._layer_bytes()) if i not in growing)


def load(model: str, revision: str | None = None, kv_path: str = "mlx", group: Any = None,
         stages: Any = None, pooling: bool = False, packed: bool = True, kernels: bool | None = None) -> LoadedModel:
    """Load `model` with mlx-lm, refused (UnsupportedModelError) unless `kv_path` holds every cache it makes.

    With an MLX distributed `group` (tensor parallel, `vmetal.engine.distributed`) the model is split across it
    by mlx-lm's own `shard` before any weight is read, so each rank reads and holds only its part; the shapes
    recorded (heads, KV heads) are then this rank's. With `stages` (pipeline parallel, the ring of its stages)
    this rank keeps only its stage's layers (`vmetal.engine.pipeline`), and the layer counts are its own.
    `pooling`: an embedding checkpoint, whose weights may be the inner model's alone (`_embedding_classes`).
    `packed`: each layer's projections of one input packed into one matmul (`packed_projections`), and then
    the attention layers whose queries and keys one kernel norms and rotates given it (`fused_qk`; `kernels`:
    `VLLM_METAL_KERNELS`, None for `auto`)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import load_model  # mlx-lm itself, before `cache_types.probe` would stand in a bare package

    path = resolve_model_path(model, revision)
    config = read_config(path)
    # The pre-flight's decision, in this process (mlx-lm is imported here anyway): before any weight is read.
    state = cache_types.model_state_here(config, str(path / "config.json"))
    cache_types.check_caches(state, kv_path)
    classes = {"get_model_classes": _embedding_classes} if pooling else {}
    mlx_model, config = load_model(path, lazy=group is not None or stages is not None, **classes)
    if group is not None:
        if not hasattr(mlx_model, "shard"):
            raise UnsupportedModelError(
                f"model `{model}` ({config.get('model_type')}) cannot be split by tensor parallel: mlx-lm's "
                f"`{type(mlx_model).__module__}` has no `shard`; serve it with --tensor-parallel-size 1")
        mlx_model.shard(group)
        mx.eval(mlx_model.parameters())
    stage = None
    if stages is not None:
        from vmetal.engine import pipeline

        pipeline.check_splittable(mlx_model, model)
        stage = pipeline.stage_of(stages, len(mlx_model.model.layers))
        pipeline.cut_layers(mlx_model, stage)
        mx.eval(mlx_model.parameters())
    if packed:
        from vmetal.engine import packed_projections

        packed_projections.pack(mlx_model)
        from vmetal.engine import fused_qk

        fused_qk.install(mlx_model, kernels, kernel=kv_path != "paged")
    # Shapes as the model really makes them, whatever its config calls them (MLA's keys are wider than its
    # values; families name their head counts differently). A pipeline stage probes its own layers alone.
    probe = _probe(mlx_model)
    if stage is not None:
        pipeline.connect(mlx_model, stage)
    params = tree_flatten(mlx_model.parameters())
    # Packed weights of a quantized layer are uint32 (mxfp4 scales uint8): only floating ones count.
    float_dtypes = [v.dtype for _, v in params if mx.issubdtype(v.dtype, mx.floating)]
    kv_heads, head_dim, _ = probe.kv_widths[0]
    return LoadedModel(
        model=mlx_model,
        config=config,
        path=path,
        num_layers=len(probe.kv_widths),
        num_kv_heads=kv_heads,
        num_heads=_per_rank(_text_args(mlx_model.args).get("num_attention_heads"), group),
        head_dim=head_dim,
        vocab_size=probe.vocab_size,
        dtype=float_dtypes[0] if float_dtypes else mx.float32,
        quantization=quantization_of(config),
        kv_widths=probe.kv_widths,
        head_on_rows=probe.head_on_rows,
        trimmable=probe.trimmable,
        state_layers=probe.state_layers,
        state_bytes=probe.state_bytes,
        state=state,
        stage=stage,
    )


def _embedding_classes(config: dict[str, Any]) -> tuple[type, type]:
    """mlx-lm's model classes for `config`, taking the weights embedding checkpoints publish.

    Sentence-transformers exports of a decoder (Qwen3-Embedding and the like, which vLLM serves with
    `Qwen3Model`) keep the inner model's tensors without the `model.` prefix mlx-lm's classes name them with,
    and no output head. mlx-lm has no embedding loader, so the names are mapped here; an untied head that is
    absent gets the embedding matrix as a stand-in: embeddings never compute logits, and a strict load still
    catches every other missing tensor."""
    from mlx_lm.utils import _get_classes

    model_class, args_class = _get_classes(config)

    class EmbeddingModel(model_class):
        def sanitize(self, weights: dict[str, Any]) -> dict[str, Any]:
            if weights and not any(k.startswith("model.") for k in weights) and hasattr(self, "model"):
                weights = {f"model.{k}": v for k, v in weights.items()}
            if hasattr(self, "lm_head") and "lm_head.weight" not in weights \
                    and "model.embed_tokens.weight" in weights:
                weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
            return super().sanitize(weights) if hasattr(super(), "sanitize") else weights

    EmbeddingModel.__name__ = EmbeddingModel.__qualname__ = model_class.__name__
    EmbeddingModel.__module__ = model_class.__module__
    return EmbeddingModel, args_class


def _text_args(args: Any) -> dict[str, Any]:
    """A model's arguments as a dict, those of its language model for a multimodal wrapper (`text_config`)."""
    text = getattr(args, "text_config", None)
    if isinstance(text, dict):
        return text
    return vars(text) if text is not None else vars(args)


def _per_rank(count: int | None, group: Any) -> int | None:
    return count // group.size() if count is not None and group is not None else count


# ------------------------------------------------------------------------------------------ output head
#
# mlx-lm's `Model.__call__` is `head(self.model(inputs, cache))`: the inner model gives hidden states and the
# class's own code turns them into logits, which differs by family (a tied embedding or an `lm_head`, Gemma 2's
# final softcapping, Granite's `logits_scaling`, Cohere's `logit_scale`, …). Only some positions' logits are
# needed (a prefill's last one; the paged path's last row per request), and on a large vocabulary the head
# over every position costs more than the rest of a prefill. So the model's own `__call__` runs with its
# `self.model` seen through `_Selecting`, which hands the head only the selected rows of the hidden states:
# the family's own output code, on the rows that are needed.


class _Selecting:
    """The inner model, returning only `select(hidden)`; every other attribute is the inner model's."""

    def __init__(self, inner: Any, select: Any):
        self._inner, self._select = inner, select

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._select(self._inner(*args, **kwargs))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class _HeadOnRows:
    """`model` as its own `__call__` sees `self`, with `self.model` selecting rows (everything else is the model's)."""

    def __init__(self, model: Any, select: Any):
        self._model, self._select = model, select

    def __getattr__(self, name: str) -> Any:
        if name == "model":
            return _Selecting(self._model.model, self._select)
        return getattr(self._model, name)


def logits_at(model: Any, inputs: Any, cache: Any, select: Any, head_on_rows: bool = True) -> Any:
    """`model(inputs, cache=cache)` reduced to `select(...)` of its positions: the family's own output head and
    post-processing, computed on the selected hidden states only (see above). `select` takes and returns
    [B, L, …] arrays (keep the axes: a family's output code may rely on them). With `head_on_rows` False (a
    model whose output code is not position by position, see `_head_on_rows`) the head runs on every position
    and the logits are selected afterwards."""
    if not head_on_rows:
        return select(model(inputs, cache=cache))
    return type(model).__call__(_HeadOnRows(model, select), inputs, cache=cache)


@dataclass(frozen=True)
class _Probe:
    kv_widths: tuple[tuple[int, int, int], ...]  # per layer (KV heads, key width, value width)
    vocab_size: int  # the logits' width
    head_on_rows: bool
    trimmable: bool
    state_layers: int  # layers whose cache holds no K/V (a hybrid's recurrent state)
    state_bytes: int  # what those hold for one request


def _probe(model: Any) -> _Probe:
    """One 4-token forward of the loaded model: the K/V shapes its caches then hold, its logits' width, and
    whether `logits_at` with the head on selected rows gives what the whole forward gives (true of every
    family whose output code works position by position, all of those tested; a family where it is not
    keeps the exact, slower head over every position)."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    tokens = mx.array([[0, 1, 2, 3]], dtype=mx.int32)
    cache = make_prompt_cache(model)
    want = model(tokens, cache=cache)[:, -1:]
    # KVCache keys/values: [batch, KV heads, positions, width]; a recurrent layer's ArraysCache has none. A layer
    # with several caches (mlx-lm's CacheList: a convolution state beside its K/V) counts as its members do.
    layers = [m for c in cache for m in (c.caches if type(c).__name__ == "CacheList" else (c,))]
    kv = [c for c in layers if hasattr(c, "keys")]
    widths = tuple((c.keys.shape[1], c.keys.shape[3], c.values.shape[3]) for c in kv)
    state = [c for c in layers if not hasattr(c, "keys")]
    try:
        got = logits_at(model, tokens, make_prompt_cache(model), last_position)
    except Exception:  # a shape error in the family's output code: it needs every position
        got = None
    # One row's matmul may round differently from four rows' in a 16-bit dtype; a wrong row or a skipped
    # scaling differs by whole units.
    tol = 1e-4 if want.dtype == mx.float32 else 2e-2
    on_rows = got is not None and got.shape == want.shape and bool(
        mx.allclose(got.astype(mx.float32), want.astype(mx.float32), rtol=tol, atol=tol))
    return _Probe(widths, int(want.shape[-1]), on_rows, all(type(c).__name__ == "KVCache" for c in cache),
                  len(state), sum(c.nbytes for c in state))


def last_position(hidden: Any) -> Any:
    """`logits_at`'s selection of a [B, L, …] batch's last position, axes kept."""
    return hidden[:, -1:]
