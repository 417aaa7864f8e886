"""The MLX-managed KV path's caches (`vmetal.engine.runner.kv.mlx_cache`): a request decoded in the batch gets
the logits it would get decoding alone, however rows join, leave, or are taken out and continued alone.

The reference is a request run by itself on its own mlx-lm cache (prefill, then one token per step), on the
float32 tiny qwen3; prompts have different lengths so the batch's left padding is exercised. Each step feeds
fixed tokens, so batched and alone runs see the same inputs whatever the random weights predict.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import BatchKVCache, KVCache

from vmetal.engine.runner.kv.mlx_cache import DecodeBatch, new_request_cache, prefill

PROMPTS = {"a": [11, 12, 13, 14, 15], "b": [21, 22, 23], "c": [31, 32, 33, 34, 35, 36, 37, 38, 39]}
# The token each request is fed at decode step i.
FED = {"a": [101, 102, 103, 104, 105], "b": [201, 202, 203, 204, 205], "c": [301, 302, 303, 304, 305]}


@pytest.fixture(scope="module")
def model(qwen3_model):
    from vmetal.engine.models import load

    loaded = load(str(qwen3_model))
    assert loaded.dtype == mx.float32
    return loaded.model


def close(got, want) -> None:
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)


def alone(model, req: str, steps: int) -> list[mx.array]:
    """Request `req` never batched: its prompt on its own cache, then `steps` decode steps; each step's [V]."""
    cache = new_request_cache(model)
    model(mx.array([PROMPTS[req]]), cache=cache)
    out = [model(mx.array([[t]]), cache=cache)[0, -1] for t in FED[req][:steps]]
    mx.eval(out)
    return out


def joined(model, batch: DecodeBatch, req: str) -> None:
    cache = new_request_cache(model)
    mx.eval(prefill(model, cache, PROMPTS[req]))
    batch.add(req, cache)


def step(model, batch: DecodeBatch, done: dict[str, int]) -> dict[str, mx.array]:
    """One batched decode step, each row fed its next token; row logits by request."""
    logits = batch.forward(model, [FED[r][done[r]] for r in batch.req_ids])
    assert logits.shape[0] == len(batch)
    rows = {r: logits[i] for i, r in enumerate(batch.req_ids)}
    for r in batch.req_ids:
        done[r] += 1
    return rows


def test_prefill_returns_the_models_logits_also_in_chunks(model):
    """`prefill` gives the last position's logits of the whole model (all positions with `all_logits`), and a
    prompt prefilled in two chunks on one cache ends with the same logits as in one piece."""
    prompt = PROMPTS["c"]
    full = model(mx.array([prompt]))[0]
    close(prefill(model, new_request_cache(model), prompt), full[-1])
    close(prefill(model, new_request_cache(model), prompt, all_logits=True), full)
    cache = new_request_cache(model)
    prefill(model, cache, prompt[:4])
    close(prefill(model, cache, prompt[4:]), full[-1])
    assert cache[0].offset == len(prompt)


def test_a_lone_row_keeps_its_own_cache_two_rows_share_a_batch_cache(model):
    """The first row decodes on its own per-request cache (mlx-lm's generate step, no mask); from the second
    row on every layer holds one left-padded BatchKVCache, rows in the order they joined."""
    batch = DecodeBatch(num_layers=2)
    assert len(batch) == 0 and batch.nbytes == 0
    first = new_request_cache(model)
    prefill(model, first, PROMPTS["a"])
    batch.add("a", first)
    assert batch.caches is first
    assert all(type(c) is KVCache for c in batch.caches)
    joined(model, batch, "b")
    joined(model, batch, "c")
    assert len(batch.caches) == 2
    assert all(isinstance(c, BatchKVCache) for c in batch.caches)
    assert batch.req_ids == ["a", "b", "c"]
    assert "b" in batch and "z" not in batch


def test_batched_decode_equals_each_request_alone(model):
    """Rows decoded together, with a row joining after two steps, get each step the logits they get decoding
    alone: batching changes nothing a user could see."""
    want = {r: alone(model, r, 5) for r in PROMPTS}
    batch, done = DecodeBatch(num_layers=2), dict.fromkeys(PROMPTS, 0)
    joined(model, batch, "a")
    close(step(model, batch, done)["a"], want["a"][0])  # alone in the batch
    joined(model, batch, "b")
    for _ in range(2):
        for r, got in step(model, batch, done).items():
            close(got, want[r][done[r] - 1])
    joined(model, batch, "c")
    for _ in range(2):
        for r, got in step(model, batch, done).items():
            close(got, want[r][done[r] - 1])
    assert done == {"a": 5, "b": 4, "c": 2}


def test_extracted_middle_row_continues_as_if_never_batched(model):
    """A paused request (`extract`) leaves with exactly its own KV: continued alone it gives the logits of a
    request never batched, and the rows left behind keep theirs."""
    want = {r: alone(model, r, 5) for r in PROMPTS}
    batch, done = DecodeBatch(num_layers=2), dict.fromkeys(PROMPTS, 0)
    for r in PROMPTS:
        joined(model, batch, r)
    step(model, batch, done)
    step(model, batch, done)

    cache = batch.extract("b")
    assert batch.req_ids == ["a", "c"]
    assert cache[0].offset == len(PROMPTS["b"]) + 2
    for _ in range(3):
        got = model(mx.array([[FED["b"][done["b"]]]]), cache=cache)[0, -1]
        done["b"] += 1
        close(got, want["b"][done["b"] - 1])
    for r, got in step(model, batch, done).items():
        close(got, want[r][done[r] - 1])


def test_extract_of_a_lone_row_hands_back_its_cache(model):
    """A lone row's cache is handed back as is and the batch is empty again."""
    batch = DecodeBatch(num_layers=2)
    cache = new_request_cache(model)
    prefill(model, cache, PROMPTS["a"])
    batch.add("a", cache)
    assert batch.extract("a") is cache
    assert len(batch) == 0 and batch.nbytes == 0


def test_removing_rows_back_to_one_keeps_the_right_row(model):
    """Finished rows leave; when one row is left (the middle one here) it goes back to its own plain cache and
    still decodes exactly as alone. Removing unknown ids changes nothing; removing the last empties the
    batch, which then takes a new lone row."""
    want = {r: alone(model, r, 3) for r in PROMPTS}
    batch, done = DecodeBatch(num_layers=2), dict.fromkeys(PROMPTS, 0)
    for r in PROMPTS:
        joined(model, batch, r)
    step(model, batch, done)
    batch.remove({"a", "c"})
    assert batch.req_ids == ["b"]
    assert all(type(c) is KVCache for c in batch.caches)
    for _ in range(2):
        close(step(model, batch, done)["b"], want["b"][done["b"] - 1])

    batch.remove({"zzz"})
    assert batch.req_ids == ["b"]
    batch.remove({"b"})
    assert len(batch) == 0 and batch.nbytes == 0
    joined(model, batch, "a")
    assert batch.req_ids == ["a"]
    close(step(model, batch, {"a": 0})["a"], want["a"][0])


def test_removing_some_rows_keeps_the_others_batched(model):
    """Removing one of three rows keeps the other two in their order, batched, each still decoding as alone."""
    want = {r: alone(model, r, 2) for r in PROMPTS}
    batch, done = DecodeBatch(num_layers=2), dict.fromkeys(PROMPTS, 0)
    for r in PROMPTS:
        joined(model, batch, r)
    step(model, batch, done)
    batch.remove({"b"})
    assert batch.req_ids == ["a", "c"]
    assert all(isinstance(c, BatchKVCache) for c in batch.caches)
    for r, got in step(model, batch, done).items():
        close(got, want[r][done[r] - 1])


def test_nbytes_follows_the_batch(model):
    """`nbytes` is the bytes the batch's caches hold: 0 when empty, growing as rows join the batch and as they
    decode, shrinking when a row leaves. (A lone row reports its own cache, which mlx-lm allocates in
    256-token steps, so it can exceed a freshly merged two-row batch: only batched sizes are compared.)"""
    batch = DecodeBatch(num_layers=2)
    assert batch.nbytes == 0
    sizes = []
    for r in PROMPTS:
        joined(model, batch, r)
        sizes.append(batch.nbytes)
        assert batch.nbytes == sum(c.nbytes for c in batch.caches) > 0
    assert sizes[1] < sizes[2]
    before = batch.nbytes
    step(model, batch, dict.fromkeys(PROMPTS, 0))
    assert batch.nbytes > before
    before = batch.nbytes
    batch.remove({"a"})
    assert 0 < batch.nbytes < before
    batch.remove({"b", "c"})
    assert batch.nbytes == 0


def test_a_forward_launched_in_parts_gives_the_same_logits_and_leaves_the_cache_as_it_was(model):
    """`launched_in_parts`: a speculating step's verify forward handed to a real launch thread layer group by
    layer group while it is built (one launch before each later group, then the whole) gets the logits of the
    forward built and launched at once, and the caches' own `update_and_fetch` is back once it is built."""
    from vmetal.engine.runner.kv.mlx_cache import launched_in_parts
    from vmetal.engine.runner.launches import Launches

    def verify(parts: int, launches: Launches) -> tuple[mx.array, int]:
        with launches.stream_context():
            cache = new_request_cache(model)
            mx.eval(prefill(model, cache, PROMPTS["c"]))
            before = launches.done
            with launched_in_parts(cache, parts, launches.launch):
                logits = prefill(model, cache, [7, 8, 9, 10], last=4)
            launches.settle(upto=launches.launch(logits))
            parts_launched = launches.done - before - 1
        assert all("update_and_fetch" not in vars(c) for c in cache)
        assert cache[0].offset == len(PROMPTS["c"]) + 4
        return logits, parts_launched

    launches = Launches(threaded=True)
    try:
        whole, none = verify(1, launches)
        split, in_parts = verify(len(model.layers), launches)
    finally:
        launches.close()
    assert (none, in_parts) == (0, len(model.layers) - 1)
    assert whole.shape == (4, model.args.vocab_size)
    close(split, whole)


def test_a_layer_without_a_kv_cache_is_not_launched_in_parts():
    """A model whose cache list holds a layer with no K/V to fetch (None here) is launched whole there: no error,
    and the other layers' caches get their own method back."""
    from vmetal.engine.runner.kv.mlx_cache import launched_in_parts

    cache = [KVCache(), None, KVCache(), KVCache()]
    launched = []
    with launched_in_parts(cache, 4, launched.append):
        keys = mx.ones((1, 1, 2, 4))
        for layer in (cache[2], cache[3]):
            layer.update_and_fetch(keys, keys)
    assert len(launched) == 2
    assert all("update_and_fetch" not in vars(c) for c in cache if c is not None)
