"""Projections of one input packed into one matmul, as vLLM packs them (`packed_modules_mapping`): an
attention's queries, keys and values (`qkv_proj`), a gated MLP's gate and up (`gate_up_proj`, a MoE's experts'
too).

mlx-lm's families multiply one input by three weight matrices in attention and by two in a gated MLP: a matmul
each (a gathered one per expert group in a MoE), where one over the stacked weights reads the input once and is
one node of the step's graph, not three.
A decode step on a GPU is bound by the host (the graph's build or compiled replay, node by node) and by kernel
launches: on an H100 a compiled one-row step of a Qwen3-0.6B shape took 6.8 ms packed against 7.8 (1,774 graph
nodes against 1,970; benchmarks/RESULTS-gpu.md, "A compiled decode step taken apart").

The families' own `__call__` stays as mlx-lm wrote it: each projection becomes its columns of the packed
product, computed once for the input they are all handed (the same array object, in a traced compiled step
too). Handed different inputs, each computes its own product: never a wrong value, only a lost saving. The
stacked weights replace the separate ones (the same bytes), so weight accounting and memory do not change.
`VLLM_METAL_PACKED_PROJECTIONS=0` loads models as mlx-lm builds them.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx

# The packed module's name -> the projections it holds, in the order their columns are stacked (vLLM's names).
PACKED_MODULES: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}


class _Part:
    """One projection of a packed group: its columns of the packed product. Not a module, so that the weights
    are the packed module's alone (counted once, saved once)."""

    __slots__ = ("group", "index")

    def __init__(self, group: _Group, index: int):
        self.group, self.index = group, index

    def __call__(self, *args: Any, **kwargs: Any) -> Any:  # a MoE's experts take (x, indices, sorted_indices=)
        return self.group.take(self.index, args, kwargs)


class _Group:
    __slots__ = ("_all", "_args", "_kwargs", "_parts", "_taken", "bounds", "name", "owner")

    def __init__(self, owner: Any, name: str, bounds: list[int]):
        self.owner, self.name, self.bounds = owner, name, bounds
        self._all = (1 << (len(bounds) - 1)) - 1  # every part's bit
        self._args: tuple[Any, ...] = ()
        self._kwargs: dict[str, Any] = {}
        self._parts: list[Any] | None = None
        self._taken = 0

    def _same(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        # By identity, arrays and flags alike: a mismatch costs a product, never a wrong one. Plain loops: this
        # runs for every projection of every layer of a step built op by op (generators cost more than the test).
        if len(args) != len(self._args) or len(kwargs) != len(self._kwargs):
            return False
        for a, b in zip(args, self._args):
            if a is not b:
                return False
        for key, value in kwargs.items():
            if key not in self._kwargs or self._kwargs[key] is not value:
                return False
        return True

    def take(self, index: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        bit = 1 << index
        if self._parts is None or self._taken & bit or not self._same(args, kwargs):
            self._args, self._kwargs = args, kwargs
            # One split into every part's columns: a third of the host time of a slice per part (MLX's
            # __getitem__ parses each index), paid per layer by a step built op by op.
            y = self.owner[self.name](*args, **kwargs)
            self._parts, self._taken = mx.split(y, self.bounds[1:-1], axis=-1), 0
        part = self._parts[index]
        self._taken |= bit
        if self._taken == self._all:  # every part handed out: hold no activation after
            self._args, self._kwargs, self._parts = (), {}, None
        return part


def _axis(key: str) -> int:
    """The output axis of a linear's array: rows of its weight (and of a quantized one's scales and biases),
    the last of its bias; a MoE's expert linears have the experts first."""
    return -1 if key == "bias" else -2


def _packable(linears: list[Any]) -> bool:
    """Plain, quantized or MoE expert linears of one kind: the same input width, dtypes, bias and quantization."""
    from mlx import nn
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

    first = linears[0]
    if (type(first) not in (nn.Linear, nn.QuantizedLinear, SwitchLinear, QuantizedSwitchLinear)
            or any(type(m) is not type(first) for m in linears)
            or any(getattr(m, "global_scale", None) is not None for m in linears)):  # nvfp4's: one per matrix
        return False
    params = [m.parameters() for m in linears]
    if any(set(p) != set(params[0]) for p in params):
        return False
    for key, value in params[0].items():
        kept = [d for d in range(value.ndim) if d != value.ndim + _axis(key)]
        if any(p[key].ndim != value.ndim or p[key].dtype != value.dtype
               or [p[key].shape[d] for d in kept] != [value.shape[d] for d in kept] for p in params):
            return False
    return all(getattr(m, a, None) == getattr(first, a, None) for m in linears for a in ("group_size", "bits", "mode"))


def pack(model: Any) -> dict[str, int]:
    """Pack each group of `model`'s projections (`PACKED_MODULES`) that `_packable` allows; returns how many of
    each packed name were made. Run once the weights are loaded (and split, under tensor parallelism: a rank packs
    its own columns)."""
    made = dict.fromkeys(PACKED_MODULES, 0)
    for _, module in list(model.named_modules()):
        for packed, names in PACKED_MODULES.items():
            linears = [module.get(n) for n in names]
            if any(m is None for m in linears) or not _packable(linears):
                continue
            first = linears[0]
            bounds = [0]
            for m in linears:
                bounds.append(bounds[-1] + m["weight"].shape[-2])
            for key in first.parameters():
                first[key] = mx.concatenate([m[key] for m in linears], axis=_axis(key))
            mx.eval(first.parameters())  # one group's copy at a time: the peak is one layer's, not the model's
            for n in names:
                del module[n]
            module[packed] = first
            group = _Group(module, packed, bounds)
            for i, n in enumerate(names):
                object.__setattr__(module, n, _Part(group, i))
            made[packed] += 1
    return made
