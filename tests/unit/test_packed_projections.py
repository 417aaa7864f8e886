"""Packed projections (`vmetal.engine.packed_projections`): a model whose query/key/value and gate/up projections
are packed into one matmul each gives the logits of the model as mlx-lm builds it, holds the same bytes, and keeps
no activation between calls."""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx import nn
from mlx.utils import tree_flatten

from tests.support.families import build_family
from vmetal.demo import build_tiny_model
from vmetal.engine import models, packed_projections

PROMPT = mx.array([[1, 5, 9, 22, 7, 3, 40, 2]])


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("packed")
    return {
        "qwen3": build_tiny_model(root / "qwen3", "qwen3"),
        "qwen2": build_tiny_model(root / "qwen2", "qwen2"),  # biased q/k/v projections
        "qwen3_moe": build_family(root / "qwen3_moe", "qwen3_moe"),  # the experts' gate/up, gathered
    }


def _names(model) -> set[str]:
    return {name for name, _ in tree_flatten(model.parameters())}


def _bytes(model) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def _groups(model) -> list:
    return [part.group for _, m in model.named_modules() for n in ("q_proj", "gate_proj")
            if isinstance(part := m.__dict__.get(n), packed_projections._Part)]


@pytest.mark.parametrize("arch", ["qwen3", "qwen2", "qwen3_moe"])
def test_packed_model_gives_mlx_lms_logits_with_the_same_bytes(checkpoints, arch):
    plain = models.load(str(checkpoints[arch]), packed=False).model
    packed = models.load(str(checkpoints[arch])).model  # packed by default, as the runners load
    layers = len(packed.model.layers)
    assert {n.split(".")[-2] for n in _names(packed) if "proj" in n} >= {"qkv_proj", "gate_up_proj"}
    assert not any(n.split(".")[-2] in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
                   for n in _names(packed))
    assert len(_groups(packed)) == 2 * layers
    assert _bytes(packed) == _bytes(plain)
    want, got = plain(PROMPT), packed(PROMPT)
    assert mx.allclose(got, want, rtol=1e-5, atol=1e-5).item(), mx.abs(got - want).max().item()
    assert mx.array_equal(got.argmax(-1), want.argmax(-1)).item()


def test_compiled_step_of_a_packed_model_gives_the_same_logits(checkpoints):
    plain = models.load(str(checkpoints["qwen3"]), packed=False).model
    packed = models.load(str(checkpoints["qwen3"])).model
    step = mx.compile(lambda ids: packed(ids))
    assert mx.allclose(step(PROMPT), plain(PROMPT), rtol=1e-5, atol=1e-5).item()


def test_quantized_projections_pack_unless_their_widths_differ(checkpoints):
    uniform = models.load(str(checkpoints["qwen3"]), packed=False).model
    nn.quantize(uniform, group_size=32, bits=4)
    want = uniform(PROMPT)
    assert packed_projections.pack(uniform) == {"qkv_proj": 2, "gate_up_proj": 2}
    assert mx.allclose(uniform(PROMPT), want, rtol=1e-5, atol=1e-5).item()

    # Mixed-precision recipes quantize some projections wider: those cannot share one matmul and stay apart.
    mixed = models.load(str(checkpoints["qwen3"]), packed=False).model
    nn.quantize(mixed, class_predicate=lambda path, m: isinstance(m, nn.Linear) and (
        {"group_size": 32, "bits": 8} if path.endswith("v_proj") else {"group_size": 32, "bits": 4}))
    want = mixed(PROMPT)
    assert packed_projections.pack(mixed) == {"qkv_proj": 0, "gate_up_proj": 2}
    assert mx.allclose(mixed(PROMPT), want, rtol=1e-5, atol=1e-5).item()


def test_a_projection_handed_another_input_computes_its_own(checkpoints):
    plain = models.load(str(checkpoints["qwen3"]), packed=False).model.model.layers[0].self_attn
    packed = models.load(str(checkpoints["qwen3"])).model.model.layers[0].self_attn
    x1, x2 = mx.random.normal((1, 3, 64), key=mx.random.key(1)), mx.random.normal((1, 3, 64), key=mx.random.key(2))
    got = [packed.q_proj(x1), packed.k_proj(x2), packed.v_proj(x1), packed.q_proj(x1)]
    want = [plain.q_proj(x1), plain.k_proj(x2), plain.v_proj(x1), plain.q_proj(x1)]
    for g, w in zip(got, want):
        assert mx.allclose(g, w, rtol=1e-5, atol=1e-5).item()


def test_no_activation_is_held_after_a_forward(checkpoints):
    packed = models.load(str(checkpoints["qwen3_moe"])).model
    mx.eval(packed(PROMPT))
    groups = _groups(packed)
    assert groups and all(g._parts is None and g._args == () for g in groups)
