"""Pipeline parallel: each rank holds a contiguous run of the model's layers, hidden states go from rank to rank.

With `--pipeline-parallel-size N` vLLM's `mp` executor starts N `MetalWorker`s and sends every scheduler step to
all of them; it reads the step's output from the last rank only, and (because the first rank never sees the
last one's samples) puts each request's newly sampled tokens into the next step's `CachedRequestData.new_token_ids`
for every rank. vLLM's engine keeps up to N batches in flight (its batch queue), so while the last rank works
on one batch the first already runs the next.

mlx-lm has no pipeline split for the dense families (only DeepSeek's models carry one), so the split is here,
and it leaves each family's own forward code in charge: the inner model keeps its `__call__` (masks, RoPE,
MoE routing as the family does them) and runs with

- `layers` cut to this rank's slice, by vLLM's own rule (`get_pp_indices`, `VLLM_PP_LAYER_PARTITION`);
- on every rank but the first, `embed_tokens` answering with the hidden states received from the rank before;
- on every rank but the last, `norm` sending its input to the rank after, and the output head (`lm_head`, or the
  tied embedding's `as_linear`) giving a one-wide stand-in instead of logits: nothing is sampled there.

Each send and receive is evaluated where it is built. MLX's ring pairs a rank's sends with the next rank's
receives in the order they run, and one step builds several forwards (prompts one by one, then the decode
batch) whose order inside a lazy graph MLX does not fix; evaluated in turn, they pair in build order on every
rank, since every rank builds the same forwards from the same scheduler output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vmetal.preflight.checkpoint import UnsupportedModelError


@dataclass(frozen=True)
class Stage:
    """This rank's part of the pipeline: layers [start, end) of the model's `num_layers`."""

    group: Any  # mx.distributed.Group over every stage, by rank
    rank: int
    size: int
    start: int
    end: int
    num_layers: int

    @property
    def first(self) -> bool:
        return self.rank == 0

    @property
    def last(self) -> bool:
        return self.rank == self.size - 1

    def describe(self) -> str:
        return f"pipeline stage {self.rank + 1} of {self.size}: layers {self.start}-{self.end - 1} of {self.num_layers}"


def stage_of(group: Any, num_layers: int) -> Stage:
    """This rank's stage in `group` (MLX's ring, one rank per stage), its layers as vLLM splits them."""
    from vllm.distributed.utils import get_pp_indices

    rank, size = group.rank(), group.size()
    start, end = get_pp_indices(num_layers, rank, size)
    return Stage(group, rank, size, start, end, num_layers)


def _no_logits(hidden: Any) -> Any:
    """What the output head gives before the last stage: a [.., 1] slice, so no vocabulary-wide matmul runs."""
    return hidden[..., :1]


class _StageEmbedding:
    """Stands in for `embed_tokens`: after the first stage it answers with the previous stage's hidden states for
    `inputs`; as a tied output head (`as_linear`) it gives logits on the last stage only."""

    def __init__(self, embed: Any, stage: Stage, width: int, dtype: Any):
        self._embed, self._stage, self._width, self._dtype = embed, stage, width, dtype

    def __call__(self, inputs: Any) -> Any:
        import mlx.core as mx

        if self._stage.first:
            return self._embed(inputs)
        hidden = mx.distributed.recv((*inputs.shape, self._width), self._dtype, self._stage.rank - 1,
                                     group=self._stage.group)
        mx.eval(hidden)
        return hidden

    def as_linear(self, hidden: Any) -> Any:
        return self._embed.as_linear(hidden) if self._stage.last else _no_logits(hidden)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._embed, name)


class _Sent:
    """Stands in for the final `norm` before the last stage: sends the hidden states on, returns what was sent."""

    def __init__(self, stage: Stage, dtype: Any):
        self._stage, self._dtype = stage, dtype

    def __call__(self, hidden: Any) -> Any:
        import mlx.core as mx

        # In the dtype the next stage receives: a receive reads exactly its shape's bytes.
        sent = mx.distributed.send(hidden.astype(self._dtype), self._stage.rank + 1, group=self._stage.group)
        mx.eval(sent)
        return sent


def check_splittable(model: Any, model_name: str) -> None:
    """Refuse a model outside the families whose forward the split keeps exact (`PIPELINE_MODULES`); the
    pre-flight says the same before anything starts, this covers `LLM(...)` and Hub ids."""
    from vmetal.preflight.parallel import PIPELINE_MODULES

    module = type(model).__module__.rpartition(".")[2]
    if module not in PIPELINE_MODULES:
        raise UnsupportedModelError(
            f"model `{model_name}`: mlx-lm's `{module}` model is not one vmetal splits into pipeline stages "
            f"(it does {', '.join(PIPELINE_MODULES)}); serve it with --pipeline-parallel-size 1")


def cut_layers(model: Any, stage: Stage) -> None:
    """Keep only this stage's layers (before any weight is read: the others are never loaded)."""
    inner = model.model
    inner.layers = inner.layers[stage.start:stage.end]


def connect(model: Any, stage: Stage) -> None:
    """Put the stand-ins in place (after `cut_layers` and the load's probe forward, which runs on this rank
    alone): from then on every forward receives from the previous stage and sends to the next."""
    import mlx.core as mx

    inner = model.model
    # The hidden states travel in the dtype the norms compute in (a quantized model's too), the same on every
    # stage.
    dtype = inner.norm.weight.dtype if "weight" in inner.norm else mx.float32
    inner.embed_tokens = _StageEmbedding(inner.embed_tokens, stage, model.args.hidden_size, dtype)
    if not stage.last:
        inner.norm = _Sent(stage, dtype)
        if "lm_head" in model:
            model.lm_head = _no_logits
