"""The paged KV path's hook into a real mlx-lm model (`vmetal.engine.runner.kv.paged_cache` with the pure-MLX
`attention.reference`): a packed step through `PagedLayerCache` pools gives the logits mlx-lm's own model gives
with its own `KVCache`, and each token's K/V lands in exactly the slot vLLM assigned it.

The model is the float32 tiny qwen3, run through the paged runner's own `_forward` and `warm_up` (the runner
is built on stand-ins for vLLM's config; no engine). Block tables are not contiguous (blocks [3, 1] and
[5, 0]), and every pool starts as NaN: a slot read before it was written would turn logits into NaN, and a
slot written that should not be shows up as a finite value.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache

from tests.support.runner_stubs import loaded_paged_runner
from vmetal.engine.runner.attention import reference
from vmetal.engine.runner.kv.paged_cache import PagedLayerCache, StepLayout, install_attention_hook

BLOCK = 4
NUM_BLOCKS = 6
TABLE_A = [3, 1]
TABLE_B = [5, 0]
PROMPT_A = [11, 12, 13, 14, 15, 16]
PROMPT_B = [21, 22, 23, 24, 25]


@pytest.fixture(scope="module")
def runner(qwen3_model):
    runner = loaded_paged_runner(qwen3_model, BLOCK)
    assert runner.loaded.dtype == mx.float32
    return runner


def nan_layers(runner) -> list[PagedLayerCache]:
    lm = runner.loaded
    shape = (NUM_BLOCKS, BLOCK, lm.num_kv_heads, lm.head_dim)
    layers = [PagedLayerCache(mx.full(shape, float("nan")), mx.full(shape, float("nan"))) for _ in range(lm.num_layers)]
    for layer in layers:
        assert layer.kernels == {"paged_attention": False, "reshape_and_cache": False, "copy_blocks": False}
    return layers


def slots_of(table: list[int], positions) -> list[int]:
    return [table[p // BLOCK] * BLOCK + p % BLOCK for p in positions]


def packed_step(runner, layers, seqs) -> mx.array:
    """One packed step as the paged runner builds it (`_pack`): `seqs` is (block table, first position, tokens)
    per sequence, decodes first; the last position's logits of each sequence, [B, V]."""
    tokens, positions, slots, tables, ctx, qlens, last = [], [], [], [], [], [], []
    for table, start, toks in seqs:
        pos = list(range(start, start + len(toks)))
        tokens += toks
        positions += pos
        slots += slots_of(table, pos)
        tables.append(table)
        ctx.append(start + len(toks))
        qlens.append(len(toks))
        last.append(len(tokens) - 1)
    width = max(len(t) for t in tables)
    block_tables = np.array([t + [0] * (width - len(t)) for t in tables], dtype=np.int32)
    layout = StepLayout.plan(positions, slots, block_tables, ctx, qlens, BLOCK)
    logits = runner._forward(layers, tokens, layout, last)
    mx.eval(logits, [(c.k_pool, c.v_pool) for c in layers])
    return logits


def pool_rows(pool: mx.array) -> np.ndarray:
    """The pool as `[num_blocks * block_size, kv_heads, head_dim]` slot rows."""
    return np.asarray(pool).reshape(NUM_BLOCKS * BLOCK, *pool.shape[2:])


def check_pools(layers, ref_caches: dict[str, list], tables: dict[str, list[int]]) -> None:
    """Every slot of every sequence holds mlx-lm's K and V for that position; every other slot is untouched."""
    for layer_index, layer in enumerate(layers):
        k_rows, v_rows = pool_rows(layer.k_pool), pool_rows(layer.v_pool)
        written = np.zeros(len(k_rows), dtype=bool)
        for seq, caches in ref_caches.items():
            cache = caches[layer_index]
            n = cache.offset
            slots = slots_of(tables[seq], range(n))
            # mlx-lm's cache: [1, kv_heads, positions, head_dim], after RoPE.
            want_k = np.asarray(cache.keys[0, :, :n, :]).transpose(1, 0, 2)
            want_v = np.asarray(cache.values[0, :, :n, :]).transpose(1, 0, 2)
            np.testing.assert_allclose(k_rows[slots], want_k, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(v_rows[slots], want_v, rtol=1e-5, atol=1e-5)
            written[slots] = True
        assert np.isnan(k_rows[~written]).all() and np.isnan(v_rows[~written]).all(), \
            f"layer {layer_index}: slots outside the slot mapping were written"


def close(got, want) -> None:
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)


def test_packed_steps_equal_mlx_lm_and_write_exactly_their_slots(runner):
    """Step 1 prefills sequence A (6 tokens into blocks 3 then 1); step 2 packs A's decode with sequence B's
    whole prompt (blocks 5 then 0); step 3 decodes both (contexts of 8 and 6). Each step's last-position
    logits equal mlx-lm's model on its own caches, and after each step the pools hold exactly mlx-lm's K and
    V at the slots block_id * block_size + position % block_size, and nothing anywhere else."""
    model = runner.model
    layers = nan_layers(runner)
    ref = {"A": make_prompt_cache(model), "B": make_prompt_cache(model)}
    tables = {"A": TABLE_A, "B": TABLE_B}

    got = packed_step(runner, layers, [(TABLE_A, 0, PROMPT_A)])
    close(got[0], model(mx.array([PROMPT_A]), cache=ref["A"])[0, -1])
    check_pools(layers, {"A": ref["A"]}, tables)

    got = packed_step(runner, layers, [(TABLE_A, 6, [101]), (TABLE_B, 0, PROMPT_B)])
    close(got[0], model(mx.array([[101]]), cache=ref["A"])[0, -1])
    close(got[1], model(mx.array([PROMPT_B]), cache=ref["B"])[0, -1])
    check_pools(layers, ref, tables)

    got = packed_step(runner, layers, [(TABLE_A, 7, [102]), (TABLE_B, 5, [201])])
    close(got[0], model(mx.array([[102]]), cache=ref["A"])[0, -1])
    close(got[1], model(mx.array([[201]]), cache=ref["B"])[0, -1])
    check_pools(layers, ref, tables)
    assert all(np.isfinite(np.asarray(g)).all() for g in got)


def test_the_hook_leaves_other_caches_to_mlx_lm(runner, monkeypatch):
    """With the hook installed, a model handed mlx-lm's own caches (the MLX-managed path, mlx-lm's generate)
    computes exactly what it computes without the hook: mask, scale and cache are passed through."""
    import importlib

    from mlx_lm.models.base import scaled_dot_product_attention as mlx_lm_sdpa

    model = runner.model
    install_attention_hook(model)  # a second install is a no-op
    module = importlib.import_module(type(model).__module__)
    assert module.scaled_dot_product_attention is not mlx_lm_sdpa  # hooked
    tokens = mx.array([PROMPT_A])
    hooked = model(tokens, cache=make_prompt_cache(model))[0]
    with monkeypatch.context() as patch:
        patch.setattr(module, "scaled_dot_product_attention", mlx_lm_sdpa)
        unhooked = model(tokens, cache=make_prompt_cache(model))[0]
    close(hooked, unhooked)


def test_a_slot_of_minus_one_writes_nothing(runner):
    """In a slot mapping, -1 is padding: those tokens' K/V go nowhere, the others to their slots only."""
    lm = runner.loaded
    layer = nan_layers(runner)[0]
    slot_mapping = [-1, 9, -1, 2]
    layer.layout = StepLayout.plan([0, 1, 2, 3], slot_mapping, np.array([[0, 1, 2]], dtype=np.int32), [4], [4],
                                   BLOCK)
    keys = mx.random.normal((4, lm.num_kv_heads, 1, lm.head_dim))
    values = mx.random.normal((4, lm.num_kv_heads, 1, lm.head_dim))
    layer.update_and_fetch(keys, values)
    k_rows, v_rows = pool_rows(layer.k_pool), pool_rows(layer.v_pool)
    np.testing.assert_array_equal(k_rows[[9, 2]], np.asarray(keys[[1, 3], :, 0, :]))
    np.testing.assert_array_equal(v_rows[[9, 2]], np.asarray(values[[1, 3], :, 0, :]))
    others = np.ones(len(k_rows), dtype=bool)
    others[[9, 2]] = False
    assert np.isnan(k_rows[others]).all() and np.isnan(v_rows[others]).all()


@pytest.mark.parametrize("tokens", [None, 3 * BLOCK + 1, 3 * 64 + 5])  # the runner's max_model_len: 64
def test_warm_up_writes_nothing_to_the_pools(runner, tokens):
    """The profiling forward (`warm_up`, run again after the pools are allocated; the worker's first one as long
    as a step's token budget: several blocks, several prompts of at most max_model_len) uses slot -1 for every
    token: the pools, including K/V already written there, come out bit for bit as they went in."""
    layers = nan_layers(runner)
    packed_step(runner, layers, [(TABLE_A, 0, PROMPT_A)])
    before = [(np.asarray(c.k_pool), np.asarray(c.v_pool)) for c in layers]
    runner.layers = layers
    try:
        runner.warm_up(tokens)
    finally:
        runner.layers = []
    for (k, v), layer in zip(before, layers, strict=True):
        np.testing.assert_array_equal(np.asarray(layer.k_pool), k)
        np.testing.assert_array_equal(np.asarray(layer.v_pool), v)


def test_plan_writes_keeps_only_real_slots():
    """The write plan drops -1 slots, keeps which packed rows the others come from, and plans no write at all
    when every slot is -1 (the warm-up's step)."""
    plan = reference.plan_writes([-1, 9, -1, 2])
    assert plan.rows.tolist() == [1, 3] and plan.slots.tolist() == [9, 2]
    plan = reference.plan_writes([4, 5])
    assert plan.rows is None and plan.slots.tolist() == [4, 5]
    plan = reference.plan_writes([-1, -1])
    assert plan.rows is None and plan.slots is None
