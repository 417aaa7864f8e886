"""Compiled all-decode steps (`vmetal.engine.runner.compiled_decode`) against mlx-lm's own model and caches.

The tiny float32 qwen3 runs through `PagedLayerCache` pools that start as NaN: a slot read before it was
written would turn logits into NaN (a padding column or padding row reading the wrong slot shows here), and a
slot written that should not be stays visible as a finite value. Block tables are not contiguous.
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache

from tests.support.runner_stubs import loaded_paged_runner
from vmetal.engine.runner.attention import reference
from vmetal.engine.runner.attention.reference import AttentionGroup, AttentionPlan
from vmetal.engine.runner.compiled_decode import CompiledDecode, context_bucket, full_view, plan_decode, rows_bucket
from vmetal.engine.runner.kv.paged_cache import PagedLayerCache, StepLayout

BLOCK = 4
NUM_BLOCKS = 40
DUMP = NUM_BLOCKS - 1
TABLES = {"A": [3, 1, 7, 9, 11], "B": [5, 0, 8, 10, 12], "C": [2, 4, 6, 13, 14]}
PROMPTS = {"A": [11, 12, 13, 14, 15, 16], "B": [21, 22, 23, 24, 25], "C": [31, 32, 33]}


@pytest.fixture(scope="module")
def runner(qwen3_model):
    runner = loaded_paged_runner(qwen3_model, BLOCK)
    return runner


def nan_layers(runner) -> list[PagedLayerCache]:
    lm = runner.loaded
    shape = (NUM_BLOCKS, BLOCK, lm.num_kv_heads, lm.head_dim)
    return [PagedLayerCache(mx.full(shape, float("nan")), mx.full(shape, float("nan")))
            for _ in range(lm.num_layers)]


def pools_of(layers) -> list:
    return [layer.pool for layer in layers]


def slots_of(table: list[int], positions) -> list[int]:
    return [table[p // BLOCK] * BLOCK + p % BLOCK for p in positions]


def prefill(runner, layers, name: str) -> None:
    """The prompt of sequence `name` through the op-by-op forward (as the runner prefills)."""
    toks = PROMPTS[name]
    pos = list(range(len(toks)))
    layout = StepLayout.plan(pos, slots_of(TABLES[name], pos), np.array([TABLES[name]], dtype=np.int32),
                             [len(toks)], [len(toks)], BLOCK)
    mx.eval(runner._forward(layers, toks, layout, [len(toks) - 1]), [(c.k_pool, c.v_pool) for c in layers])


def test_buckets():
    assert [rows_bucket(n) for n in (1, 2, 3, 5, 8, 9, 33)] == [1, 2, 4, 8, 8, 16, 64]
    assert [context_bucket(n) for n in (1, 64, 65, 700, 1024, 1025, 3000)] == [64, 64, 128, 1024, 1024, 2048, 3072]


def test_compiled_decode_steps_equal_mlx_lm_and_write_exactly_their_slots(runner):
    """Three sequences prefilled, then decode steps of 3 rows (a 4-row bucket: one padding row) and of 2 rows,
    compiled: each row's logits equal mlx-lm's model on its own caches, each token's K/V land in its slot, the
    padding row writes the dump block only, and a step of a size met before is not traced again."""
    model = runner.model
    layers = nan_layers(runner)
    ref = {name: make_prompt_cache(model) for name in PROMPTS}
    for name, toks in PROMPTS.items():
        prefill(runner, layers, name)
        model(mx.array([toks]), cache=ref[name])
    compiled = CompiledDecode(model, runner.loaded.head_on_rows)
    steps = [("A", "B", "C"), ("A", "B", "C"), ("B", "C"), ("A", "B", "C")]
    for step, names in enumerate(steps):
        positions = [ref[n][0].offset for n in names]
        tokens = [100 + step + i for i in range(len(names))]
        plan = plan_decode(positions, [[TABLES[n] for n in names]], BLOCK, DUMP)
        got = compiled.forward(layers, pools_of(layers), tokens, plan, len(names))
        mx.eval(got, [(c.k_pool, c.v_pool) for c in layers])
        assert got.shape[0] == len(names)
        for i, name in enumerate(names):
            want = model(mx.array([[tokens[i]]]), cache=ref[name])[0, -1]
            np.testing.assert_allclose(np.asarray(got[i]), np.asarray(want), rtol=1e-4, atol=1e-4)
    assert compiled.traced == {(False, 1, (4, 64)), (False, 1, (2, 64))}

    for index, layer in enumerate(layers):
        rows = np.asarray(layer.k_pool).reshape(NUM_BLOCKS * BLOCK, *layer.k_pool.shape[2:])
        written = np.zeros(len(rows), dtype=bool)
        for name, caches in ref.items():
            n = caches[index].offset
            want = np.asarray(caches[index].keys[0, :, :n, :]).transpose(1, 0, 2)
            np.testing.assert_allclose(rows[slots_of(TABLES[name], range(n))], want, rtol=1e-5, atol=1e-5)
            written[slots_of(TABLES[name], range(n))] = True
        written[DUMP * BLOCK] = True  # the padding row's slot
        assert np.isnan(rows[~written]).all(), f"layer {index}: slots outside the slot mapping were written"


def test_the_decode_ahead_variant_keeps_the_steps_keys_and_values(runner):
    """With `keep_kv` (a decode-ahead row writing to a scratch block) each layer keeps the step's K/V for
    the real rows: what the op-by-op forward keeps."""
    layers = nan_layers(runner)
    for name in PROMPTS:
        prefill(runner, layers, name)
    names = ("A", "B", "C")
    plan = plan_decode([len(PROMPTS[n]) for n in names], [[TABLES[n] for n in names]], BLOCK, DUMP)
    compiled = CompiledDecode(runner.model, runner.loaded.head_on_rows)
    compiled.forward(layers, pools_of(layers), [7, 8, 9], plan, 3, keep_kv=True)
    kept = [layer.kept_kv for layer in layers]
    for index, layer in enumerate(layers):
        rows = np.asarray(layer.k_pool).reshape(NUM_BLOCKS * BLOCK, *layer.k_pool.shape[2:])
        slots = [slots_of(TABLES[n], [len(PROMPTS[n])])[0] for n in names]
        np.testing.assert_array_equal(np.asarray(kept[index][0][:3]), rows[slots])
    assert compiled.traced == {(True, 1, (4, 64))}


def test_the_pools_are_written_in_place(runner):
    """A compiled step takes the pools as arguments and returns them: with no other reference left, MLX
    writes them in place instead of copying every layer's pool every step."""
    lm = runner.loaded
    shape = (512, BLOCK, lm.num_kv_heads, lm.head_dim)
    layers = [PagedLayerCache(mx.zeros(shape), mx.zeros(shape)) for _ in range(lm.num_layers)]
    mx.eval([(c.k_pool, c.v_pool) for c in layers])
    compiled = CompiledDecode(runner.model, lm.head_on_rows)
    pool_bytes = 4 * math.prod(shape)
    for step in range(3):
        plan = plan_decode([step], [[[0]]], BLOCK, 511)
        mx.eval(compiled.forward(layers, pools_of(layers), [1], plan, 1), [(c.k_pool, c.v_pool) for c in layers])
        if step == 0:  # the first step traces: its peak is the trace's, not the step's
            mx.reset_peak_memory()
            base = mx.get_active_memory()
    assert mx.get_peak_memory() - base < pool_bytes / 2


# A second KV cache group's tables (a sliding-window group's, as vLLM keeps them: its blocks before the window
# freed to the null block 0; block 15 holds "B"'s positions 16-19).
SLIDING_TABLES = {"A": [0, 21, 22], "B": [0, 0, 0, 0, 15], "C": [23]}


@pytest.mark.parametrize("window", [None, 1, 3, 6, 70])
def test_a_planned_view_attends_what_the_op_by_op_plan_attends(window):
    """Each view of a compiled step's plan (full attention in group 0, or a sliding window in group 1 with block
    tables of its own) gives the attention of the op-by-op plan over that group's tables for the same rows, on
    random pools, the padding row's output aside; each group's rows write to that group's slots."""
    rng = np.random.default_rng(0)
    heads, kv_heads, dim = 4, 2, 8
    pools = [mx.array(rng.standard_normal((NUM_BLOCKS, BLOCK, kv_heads, dim)).astype(np.float32))
             for _ in range(2)]
    positions = [5, 17, 0]  # 3 rows: a padding row in the 4-row bucket
    names = ("A", "B", "C")
    full, sliding = [TABLES[n] for n in names], [SLIDING_TABLES[n] for n in names]
    group = 0 if window is None else 1
    plan = plan_decode(positions, [full, sliding], BLOCK, DUMP, [(0, None), (group, window)])
    if window is None:  # built in the compiled step itself
        assert plan.sliding == ()
        slots, mask = full_view(mx.array(plan.tables[0]), mx.array(plan.positions), mx.arange(BLOCK))
    else:
        slots, mask = map(mx.array, plan.sliding[-1])
    assert plan.key == (4, 64, 64 if window is None else min(64, context_bucket(window)))
    rows = len(plan.positions)
    attend = AttentionGroup(slice(0, rows), slots, mask, None, None, rows, 1)
    view = AttentionPlan(rows, (attend,), None, np.zeros(0), np.zeros(0), np.zeros(0), window=window)
    queries = mx.array(rng.standard_normal((rows, heads, dim)).astype(np.float32))
    got = reference.attend(queries, *pools, view, dim ** -0.5)
    tables = (full, sliding)[group]
    padded = np.zeros((3, max(len(t) for t in tables)), dtype=np.int32)
    for i, t in enumerate(tables):
        padded[i, : len(t)] = t
    want = reference.paged_attention(queries[:3], *pools, padded, [p + 1 for p in positions], [1, 1, 1],
                                     dim ** -0.5, window)
    np.testing.assert_allclose(np.asarray(got[:3]), np.asarray(want), rtol=1e-5, atol=1e-5)
    assert np.isfinite(np.asarray(got)).all()
    assert plan.write_slots.tolist() == [[1 * BLOCK + 1, 12 * BLOCK + 1, 2 * BLOCK, DUMP * BLOCK],
                                         [21 * BLOCK + 1, 15 * BLOCK + 1, 23 * BLOCK, DUMP * BLOCK]]
    # The runner hands over the slots it found for the real rows: the same plan, padding rows to the dump block.
    given = plan_decode(positions, [full, sliding], BLOCK, DUMP, [(0, None), (group, window)],
                        [np.array(s[:3]) for s in plan.write_slots.tolist()])
    assert given.write_slots.tolist() == plan.write_slots.tolist()
    assert plan.tables.shape == (2, 4, 64 // BLOCK)
    assert plan.tables[1, 1, :5].tolist() == SLIDING_TABLES["B"]


@pytest.mark.parametrize("window", [None, 1, 3, 6, 70])
def test_a_speculating_steps_rows_attend_as_the_packed_querys_rows_do(window):
    """A speculating step's plan (`queries` rows a sequence: a request's last token, then its drafts) gives
    each real row the attention of the op-by-op plan's packed query rows over the same tables (a draft sees the
    drafts before it, each row its own window), on random pools; a sequence with fewer tokens is padded with
    rows that repeat its last position, whose writes go to the dump block as the caller gives them, and a
    padding sequence fills the bucket."""
    rng = np.random.default_rng(1)
    heads, kv_heads, dim = 4, 2, 8
    pools = [mx.array(rng.standard_normal((NUM_BLOCKS, BLOCK, kv_heads, dim)).astype(np.float32))
             for _ in range(2)]
    names, queries = ("A", "B", "C"), 3
    real = {"A": [5, 6, 7], "B": [16, 17], "C": [2]}
    positions = [p for n in names for p in real[n] + [real[n][-1]] * (queries - len(real[n]))]
    full, sliding = [TABLES[n] for n in names], [SLIDING_TABLES[n] for n in names]
    group = 0 if window is None else 1
    tables = (full, sliding)[group]
    given = [[s for n, t in zip(names, group_tables) for s in slots_of(t, real[n]) + [DUMP * BLOCK] *
              (queries - len(real[n]))] for group_tables in (full, sliding)]
    plan = plan_decode(positions, [full, sliding], BLOCK, DUMP, [(0, None), (group, window)], given, queries)
    rows = len(plan.positions)
    assert rows == 4 * queries and plan.queries == queries  # 3 sequences in a bucket of 4
    assert plan.write_slots.tolist() == [g + [DUMP * BLOCK] * queries for g in given]
    if window is None:
        slots, mask = full_view(mx.array(plan.tables[0]), mx.array(plan.positions), mx.arange(BLOCK))
    else:
        slots, mask = map(mx.array, plan.sliding[-1])
    assert mask.shape[:3] == (4, 1, queries)
    attend = AttentionGroup(slice(0, rows), slots, mask, None, None, 4, queries)
    view = AttentionPlan(rows, (attend,), None, np.zeros(0), np.zeros(0), np.zeros(0), window=window)
    q = mx.array(rng.standard_normal((rows, heads, dim)).astype(np.float32))
    got = reference.attend(q, *pools, view, dim ** -0.5)
    assert np.isfinite(np.asarray(got)).all()
    kept = [i * queries + j for i, n in enumerate(names) for j in range(len(real[n]))]
    padded = np.zeros((3, max(len(t) for t in tables)), dtype=np.int32)
    for i, t in enumerate(tables):
        padded[i, : len(t)] = t
    index = mx.array(kept)
    want = reference.paged_attention(q[index], *pools, padded, [real[n][-1] + 1 for n in names],
                                     [len(real[n]) for n in names], dim ** -0.5, window)
    np.testing.assert_allclose(np.asarray(got[index]), np.asarray(want), rtol=1e-5, atol=1e-5)


class _EvaluatesInside:
    """A model whose forward evaluates an array on the way (as a pipeline stage's sends do): untraceable."""

    def __init__(self, model):
        self.model = model

    def __call__(self, inputs, cache=None):
        mx.eval(inputs)
        return self.model(inputs, cache=cache)


def test_a_step_that_cannot_be_traced_is_built_op_by_op(runner, caplog):
    """The runner warns once, turns compiled steps off for the engine and leaves the pools as they were, so the
    same step runs op by op."""
    layers = nan_layers(runner)
    prefill(runner, layers, "A")
    pools = [(c.k_pool, c.v_pool) for c in layers]
    runner.layers, runner.pools, runner.dump_block = layers, pools_of(layers), DUMP
    runner.compiled = CompiledDecode(_EvaluatesInside(runner.model), False)
    try:
        with caplog.at_level("WARNING", logger="vllm.vmetal"):
            assert runner._decode([101], [len(PROMPTS["A"])], [[TABLES["A"]]]) is None
        assert runner.compiled is None
        assert all(c.k_pool is k and c.v_pool is v for c, (k, v) in zip(layers, pools))
        assert [r.message for r in caplog.records if "cannot be compiled" in r.message] == [
            "vmetal: this model's decode step cannot be compiled (ValueError: [eval] Attempting to eval an array "
            "during function transformations like compile or vmap is not allowed.); building every step op by op "
            "(VLLM_METAL_COMPILE=0 skips the attempt)"]
    finally:
        runner.layers, runner.pools, runner.compiled = [], [], None
