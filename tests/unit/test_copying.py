"""The model n-gram speculation is benchmarked on (`vmetal.bench.copying`): a Qwen3 checkpoint whose hand-set
weights make its greedy output copy its context. What a benchmark relies on: the model predicts the token that
followed the last three tokens earlier in the text wherever the text determines it, in mlx-lm itself, and a
checkpoint that cannot hold the construction is refused with the reason."""

from __future__ import annotations

import json

import pytest

from vmetal.bench.shapes import SHAPES, build_model

# A small Python file, three times: the text a rewrite prompt holds.
FILE = ("def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\n"
        "def mul(a, b):\n    return a * b\n\n\n")


@pytest.fixture(scope="module")
def copying(tmp_path_factory):
    return build_model(tmp_path_factory.mktemp("copying") / "model", "float32", SHAPES["copy-tiny"])


def _followers(ids: list[int], n: int) -> dict[tuple[int, ...], set[int]]:
    """Every n-token context of `ids` -> the tokens that follow it somewhere."""
    seen: dict[tuple[int, ...], set[int]] = {}
    for i in range(n, len(ids)):
        seen.setdefault(tuple(ids[i - n:i]), set()).add(ids[i])
    return seen


def test_the_model_predicts_what_followed_the_last_three_tokens_before(copying):
    """Read with the file's second and third copies in context, every position whose last three tokens were
    always followed by one token predicts exactly that token (the copies being rewritten); a position whose
    context the file leaves open (`def` before add, sub or mul) predicts one of the tokens that followed it."""
    import mlx.core as mx
    from mlx_lm import load

    model, tokenizer = load(str(copying))
    ids = tokenizer.encode(FILE * 3)
    predicted = mx.argmax(model(mx.array([ids]))[0], axis=-1).tolist()
    followers = _followers(ids, 3)
    start = len(tokenizer.encode(FILE))
    determined = [i for i in range(start, len(ids) - 1) if len(followers[tuple(ids[i - 2:i + 1])]) == 1]
    assert len(determined) > 0.8 * (len(ids) - 1 - start)
    assert [predicted[i] for i in determined] == [ids[i + 1] for i in determined]
    for i in range(start, len(ids) - 1):
        assert predicted[i] in followers[tuple(ids[i - 2:i + 1])], i


def test_its_config_says_it_copies_and_a_random_checkpoint_of_its_shape_is_not_reused(copying, tmp_path):
    """The mark in config.json keeps `build_model` from handing a random-weight folder of the same shape to a
    benchmark that asked for the copying model (and the copying one to one that asked for random weights)."""
    assert json.loads((copying / "config.json").read_text())["vmetal_copying"] == 3
    random_shape = {k: v for k, v in SHAPES["copy-tiny"].items() if k != "copying"}
    folder = build_model(tmp_path / "m", "float32", random_shape)
    assert "vmetal_copying" not in json.loads((folder / "config.json").read_text())
    build_model(folder, "float32", SHAPES["copy-tiny"])
    assert json.loads((folder / "config.json").read_text())["vmetal_copying"] == 3


def test_a_checkpoint_whose_heads_are_too_narrow_is_refused_with_the_reason(tmp_path):
    from vmetal.bench.copying import make_copying

    folder = build_model(tmp_path / "narrow", "float32", SHAPES["tiny"])  # head_dim 64
    with pytest.raises(ValueError, match="head_dim >= 128"):
        make_copying(folder)


def test_its_cut_to_the_copying_layers_gives_the_targets_logits_and_a_shorter_cut_does_not(tmp_path):
    """The agreeing draft pair bench_draft.py measures (`copy-deep-tiny` and its first 4 layers): every layer past
    the induction layer adds nothing, so the cut's logits are the deeper model's own, where a cut that drops the
    induction layer predicts other tokens."""
    import mlx.core as mx
    from mlx_lm import load

    from vmetal.bench.shapes import first_layers

    deep = build_model(tmp_path / "deep", "float32", {**SHAPES["copy-tiny"], "num_layers": 6})
    target, tokenizer = load(str(deep))
    ids = mx.array([tokenizer.encode(FILE * 2)])
    want = target(ids)[0]
    cut, _ = load(str(first_layers(deep, tmp_path / "cut", 4)))
    assert len(cut.layers) == 4
    assert mx.array_equal(cut(ids)[0], want).item()
    short, _ = load(str(first_layers(deep, tmp_path / "short", 3)))
    agree = (mx.argmax(short(ids)[0], axis=-1) == mx.argmax(want, axis=-1)).mean().item()
    assert agree < 0.5, agree
