"""Paged KV cache and attention: the pure-MLX reference against dense attention, and the Metal kernels
against the reference (on a Mac).

Inputs are fresh random draws each run; a failure names its seed. Pools start as NaN so that reading any slot
that was not written for the sequence (a freed block, the tail of the last block, a padding entry of the block
table) shows up in the output.
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

from vmetal.engine.runner.attention import metal as kernels
from vmetal.engine.runner.attention import reference as pa
from vmetal.envs import EnvError
from vmetal.preflight.host import is_paravirtual

HEAD_DIM = 32
NUM_KV_HEADS = 2


def fresh_seed() -> int:
    return int(np.random.SeedSequence().entropy % 2**32)


def relative_error(got, want) -> float:
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


EPS = {mx.float32: 2.0**-23, mx.float16: 2.0**-10, mx.bfloat16: 2.0**-7}


def tolerance(dtype, max_ctx: int) -> float:
    """The largest relative error (max |out - dense| / max |dense|) allowed against float64 dense attention.

    Two sources: the inputs and the output rounded to `dtype` (a few units of its epsilon, whatever the length),
    and float32 accumulation in the two reductions, q.k over HEAD_DIM and the weighted sum over the context,
    whose rounding grows like the square root of their length for random inputs. Measured over 150 random
    packs (block sizes 8-32, GQA 1-8, contexts up to 90): float32 at most 0.43 eps32 x sqrt(n), float16 1.28
    eps16, bfloat16 1.33 eps_bf16; 4x each leaves room, and keeps float32's bound near 5e-6, so a 0.1 % scale
    error (1e-3) cannot pass (test_a_tenth_of_a_percent_scale_error_fails)."""
    return 4 * EPS[dtype] + 4 * EPS[mx.float32] * math.sqrt(HEAD_DIM + max_ctx)


def dense_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float, window: int | None = None,
                    sinks: np.ndarray | None = None, softcap: float | None = None) -> np.ndarray:
    """Standard causal attention of one sequence, float64: q `[n, Hq, D]` are the last n positions of the
    context k, v `[ctx, Hkv, D]`; KV heads repeated to the query heads. `window`: a query at position p sees keys
    p-window+1..p; `sinks` [Hq]: a logit per head that joins each softmax and adds nothing to the output."""
    n, hq, _ = q.shape
    ctx, hkv, _ = k.shape
    k = np.repeat(k, hq // hkv, axis=1)
    v = np.repeat(v, hq // hkv, axis=1)
    scores = np.einsum("qhd,khd->hqk", q, k) * scale
    if softcap is not None:
        scores = softcap * np.tanh(scores / softcap)
    qpos = ctx - n + np.arange(n)
    kpos = np.arange(ctx)[None, None, :]
    seen = kpos <= qpos[None, :, None]
    if window is not None:
        seen &= kpos > qpos[None, :, None] - window
    scores = np.where(seen, scores, -np.inf)
    top = scores.max(axis=-1, keepdims=True)
    if sinks is not None:
        top = np.maximum(top, sinks[:, None, None])
    probs = np.exp(scores - top)
    total = probs.sum(axis=-1, keepdims=True)
    if sinks is not None:
        total += np.exp(sinks[:, None, None] - top)
    return np.einsum("hqk,khd->qhd", probs / total, v)


class Pack:
    """A random step: several sequences with their K/V written into NaN pools through `reshape_and_cache`
    (earlier tokens first, then this step's tokens, each call with interleaved -1 padding slots), and one
    packed batch of queries: decodes, prefill chunks and whole prompts, ragged."""

    def __init__(self, rng: np.random.Generator, *, block_size: int, ratio: int, dtype=mx.float32,
                 write=pa.reshape_and_cache, value_dim: int = HEAD_DIM):
        self.block_size = block_size
        num_seqs = int(rng.integers(3, 7))
        kinds = ["decode", "chunk", "prompt"] + list(rng.choice(["decode", "chunk", "prompt"], num_seqs - 3))
        rng.shuffle(kinds)
        self.ctx_lens, self.q_lens = [], []
        for kind in kinds:
            # Include lengths on and next to block boundaries.
            ctx = int(rng.choice([1, block_size, block_size + 1, 2 * block_size - 1, int(rng.integers(1, 90))]))
            qlen = {"decode": 1, "prompt": ctx, "chunk": int(rng.integers(1, ctx + 1))}[kind]
            self.ctx_lens.append(ctx)
            self.q_lens.append(qlen)
        blocks_needed = [math.ceil(c / block_size) for c in self.ctx_lens]
        num_blocks = sum(blocks_needed) + 3  # some blocks nobody owns
        order = rng.permutation(num_blocks)
        max_blocks = max(blocks_needed) + int(rng.integers(0, 3))
        # Padding entries: -1 or a block of someone else.
        self.tables = np.where(rng.random((num_seqs, max_blocks)) < 0.5, -1,
                               rng.integers(0, num_blocks, (num_seqs, max_blocks))).astype(np.int32)
        used = 0
        for i, n in enumerate(blocks_needed):
            self.tables[i, :n] = order[used:used + n]
            used += n

        shape = (num_blocks, block_size, NUM_KV_HEADS, HEAD_DIM)
        self.k_pool = mx.full(shape, float("nan"), dtype=dtype)
        self.v_pool = mx.full((*shape[:3], value_dim), float("nan"), dtype=dtype)
        self.k_full = [rng.standard_normal((c, NUM_KV_HEADS, HEAD_DIM)).astype(np.float32) for c in self.ctx_lens]
        self.v_full = [rng.standard_normal((c, NUM_KV_HEADS, value_dim)).astype(np.float32) for c in self.ctx_lens]
        self.queries = [rng.standard_normal((n, NUM_KV_HEADS * ratio, HEAD_DIM)).astype(np.float32)
                        for n in self.q_lens]
        self.scale = float(rng.uniform(0.5, 1.5)) / math.sqrt(HEAD_DIM)

        for earlier in (True, False):
            keys, values, slots = [], [], []
            for i, (ctx, qlen) in enumerate(zip(self.ctx_lens, self.q_lens)):
                positions = range(0, ctx - qlen) if earlier else range(ctx - qlen, ctx)
                for p in positions:
                    keys.append(self.k_full[i][p])
                    values.append(self.v_full[i][p])
                    slots.append(self.slot(i, p))
                    if rng.random() < 0.2:  # a padding token: its slot is -1 and its values must go nowhere
                        keys.append(rng.standard_normal((NUM_KV_HEADS, HEAD_DIM)).astype(np.float32) * 100)
                        values.append(np.resize(keys[-1], (NUM_KV_HEADS, value_dim)))
                        slots.append(-1)
            if keys:
                self.k_pool, self.v_pool = write(mx.array(np.stack(keys)).astype(dtype),
                                                 mx.array(np.stack(values)).astype(dtype),
                                                 self.k_pool, self.v_pool, slots)

    def slot(self, seq: int, pos: int) -> int:
        return int(self.tables[seq, pos // self.block_size]) * self.block_size + pos % self.block_size

    def args(self, dtype=mx.float32):
        q = mx.array(np.concatenate(self.queries)).astype(dtype)
        return q, self.k_pool, self.v_pool, mx.array(self.tables), self.ctx_lens, self.q_lens, self.scale

    def dense(self) -> np.ndarray:
        return np.concatenate([dense_attention(q, k, v, self.scale)
                               for q, k, v in zip(self.queries, self.k_full, self.v_full)])


# ------------------------------------------------------------------------------ reference vs dense
@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize("ratio", [1, 2, 4, 8])
def test_paged_attention_equals_dense(ratio, block_size):
    seed = fresh_seed()
    pack = Pack(np.random.default_rng(seed), block_size=block_size, ratio=ratio)
    out = pa.paged_attention(*pack.args())
    err = relative_error(out, pack.dense())
    assert err < tolerance(mx.float32, max(pack.ctx_lens)), (
        f"relative error {err:.2e} (seed {seed}, ctx {pack.ctx_lens}, q {pack.q_lens})")


@pytest.mark.parametrize("ratio", [1, 4])
def test_prefills_split_into_groups_still_equal_dense(monkeypatch, ratio):
    """With no padding allowed, each longer query of a different size attends in a group of its own (the rows
    of the groups concatenated and put back in the step's order): the same output."""
    monkeypatch.setattr(pa, "SPLIT_WASTE", 0)
    seed = fresh_seed()
    pack = Pack(np.random.default_rng(seed), block_size=8, ratio=ratio)
    plan = pa.plan_attention(pack.tables, pack.ctx_lens, pack.q_lens, 8)
    longer = {(q, c) for q, c in zip(pack.q_lens, pack.ctx_lens) if q > 1}  # a group holds one size at most
    assert len(plan.groups) >= (1 in pack.q_lens) + len(longer), f"seed {seed}"
    out = pa.paged_attention(*pack.args())
    err = relative_error(out, pack.dense())
    assert err < tolerance(mx.float32, max(pack.ctx_lens)), f"relative error {err:.2e} (seed {seed})"


def test_a_long_prompt_beside_short_ones_is_a_group_of_its_own():
    """A 3,000-token prompt beside three of 20 would pad each to 3,000 x 3,000 (27M positions of waste): they
    split. Prompts of nearly one size (64 of 128-130 tokens) stay one group, in the step's order."""
    def planned(qlens):
        plan = pa.plan_attention(np.zeros((len(qlens), 200), dtype=np.int32), qlens, qlens, 16)
        restore = None if plan.restore is None else np.array(plan.restore).tolist()
        return [(g.batch, g.max_q) for g in plan.groups], restore

    # Rows: the 3,000-token prompt's first, then the three short ones'; `restore` puts them back.
    groups, restore = planned([20, 3000, 20, 20])
    assert groups == [(1, 3000), (3, 20)]
    assert restore == [*range(3000, 3020), *range(3000), *range(3020, 3060)]
    assert planned([128, 130, 129] * 21 + [128]) == ([(64, 130)], None)
    assert planned([1, 1, 20, 3000])[0] == [(2, 1), (1, 3000), (1, 20)]


@pytest.mark.parametrize("ratio", [1, 2])
def test_softcapped_scores_equal_dense(ratio):
    """Gemma 2: scores capped by `softcap * tanh(scores / softcap)` before the mask and the softmax; a cap of 2
    moves every output here (the random scores reach several units)."""
    seed = fresh_seed()
    pack = Pack(np.random.default_rng(seed), block_size=16, ratio=ratio)
    q, k_pool, v_pool, tables, ctx, qlens, scale = pack.args()
    plan = pa.plan_attention(np.asarray(tables), ctx, qlens, 16)
    out = pa.attend(q, k_pool, v_pool, plan, scale, softcap=2.0)
    want = np.concatenate([dense_attention(q, k, v, pack.scale, softcap=2.0)
                           for q, k, v in zip(pack.queries, pack.k_full, pack.v_full)])
    err = relative_error(out, want)
    assert err < tolerance(mx.float32, max(pack.ctx_lens)), f"relative error {err:.2e} (seed {seed})"
    assert relative_error(out, pack.dense()) > 1e-3


def test_softcap_sinks_and_window_together_equal_dense():
    """The reference with every switch the Metal kernel has at once (the kernel's emulation test compares with
    it): no family combines them, so this is what makes the combination a reference at all."""
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    pack = Pack(rng, block_size=8, ratio=2)
    q, k_pool, v_pool, tables, ctx, qlens, scale = pack.args()
    sinks = rng.standard_normal(q.shape[1])
    out = pa.paged_attention(q, k_pool, v_pool, tables, ctx, qlens, scale, 5, mx.array(sinks.astype(np.float32)),
                             2.0)
    want = np.concatenate([dense_attention(q, k, v, pack.scale, window=5, sinks=sinks, softcap=2.0)
                           for q, k, v in zip(pack.queries, pack.k_full, pack.v_full)])
    err = relative_error(out, want)
    assert err < tolerance(mx.float32, max(pack.ctx_lens)), f"relative error {err:.2e} (seed {seed})"


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("ratio", [1, 4])
def test_fused_sdpa_and_written_out_attention_both_equal_dense(monkeypatch, fused, ratio):
    """Both ways the reference attends: MLX's fused SDPA (on Metal, whose kernels take the mask) and
    `grouped_attention` (elsewhere; the query heads of a KV head as rows of one matmul), with and without sinks."""
    monkeypatch.setattr(pa, "FUSED_SDPA", fused)
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    pack = Pack(rng, block_size=16, ratio=ratio)
    q, k_pool, v_pool, tables, ctx, qlens, scale = pack.args()
    sinks = rng.standard_normal(q.shape[1])
    for logits in (None, sinks):
        out = pa.paged_attention(q, k_pool, v_pool, tables, ctx, qlens, scale,
                                 sinks=None if logits is None else mx.array(logits.astype(np.float32)))
        want = np.concatenate([dense_attention(q, k, v, pack.scale, sinks=logits)
                               for q, k, v in zip(pack.queries, pack.k_full, pack.v_full)])
        err = relative_error(out, want)
        assert err < tolerance(mx.float32, max(pack.ctx_lens)), f"relative error {err:.2e} (seed {seed})"


@pytest.mark.parametrize("value_dim", [HEAD_DIM // 2, HEAD_DIM + 8])
def test_values_of_another_width_than_keys_equal_dense(value_dim):
    """MLA (DeepSeek-V2): mlx-lm's attention hands the cache keys wider than its values; the V pool is that
    width, and the output is."""
    seed = fresh_seed()
    pack = Pack(np.random.default_rng(seed), block_size=16, ratio=2, value_dim=value_dim)
    out = pa.paged_attention(*pack.args())
    assert out.shape == (sum(pack.q_lens), NUM_KV_HEADS * 2, value_dim)
    err = relative_error(out, pack.dense())
    assert err < tolerance(mx.float32, max(pack.ctx_lens)), f"relative error {err:.2e} (seed {seed})"


@pytest.mark.parametrize("block_size", [8, 16])
@pytest.mark.parametrize("window", [1, 5, 16])
@pytest.mark.parametrize("with_sinks", [False, True])
def test_sliding_window_and_sinks_equal_dense(block_size, window, with_sinks):
    """Gemma's and gpt-oss's local layers: each query sees its last `window` positions (a chunk's first query
    its own window, a long context only its tail is gathered); gpt-oss's sinks join every softmax."""
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    pack = Pack(rng, block_size=block_size, ratio=2)
    sinks = rng.standard_normal(NUM_KV_HEADS * 2) * 2 if with_sinks else None
    out = pa.paged_attention(*pack.args(), window=window,
                             sinks=mx.array(sinks.astype(np.float32)) if with_sinks else None)
    want = np.concatenate([dense_attention(q, k, v, pack.scale, window, sinks)
                           for q, k, v in zip(pack.queries, pack.k_full, pack.v_full)])
    err = relative_error(out, want)
    assert err < tolerance(mx.float32, max(pack.ctx_lens)), (
        f"relative error {err:.2e} (seed {seed}, ctx {pack.ctx_lens}, q {pack.q_lens})")
    # The window is really applied: full attention differs wherever a context is longer than it.
    if max(pack.ctx_lens) > window:
        assert relative_error(out, pack.dense() if not with_sinks else np.concatenate(
            [dense_attention(q, k, v, pack.scale, None, sinks)
             for q, k, v in zip(pack.queries, pack.k_full, pack.v_full)])) > 1e-3


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_paged_attention_half_precision_close_to_dense(dtype):
    seed = fresh_seed()
    pack = Pack(np.random.default_rng(seed), block_size=16, ratio=4, dtype=dtype)
    out = pa.paged_attention(*pack.args(dtype))
    assert out.dtype == dtype
    err = relative_error(out.astype(mx.float32), pack.dense())
    assert err < tolerance(dtype, max(pack.ctx_lens)), f"relative error {err:.2e} (seed {seed})"


@pytest.mark.parametrize("seed", range(20))
def test_a_tenth_of_a_percent_scale_error_fails(seed):
    """The float32 bound is tight enough to catch a kernel or reference that is off by 0.1 % (the old 1e-3
    bound let such an error pass 196 times in 200)."""
    pack = Pack(np.random.default_rng(seed), block_size=16, ratio=2)
    out = pa.paged_attention(*pack.args())
    assert relative_error(out, pack.dense()) < tolerance(mx.float32, max(pack.ctx_lens))
    assert relative_error(out * 1.001, pack.dense()) > tolerance(mx.float32, max(pack.ctx_lens))


def test_paged_attention_accepts_mx_lengths_and_empty_batch():
    pack = Pack(np.random.default_rng(fresh_seed()), block_size=8, ratio=2)
    q, k, v, tables, ctx, qlens, scale = pack.args()
    host = pa.paged_attention(q, k, v, tables, ctx, qlens, scale)
    device = pa.paged_attention(q, k, v, tables, mx.array(ctx), mx.array(qlens), scale)
    assert mx.array_equal(host, device)
    empty = pa.paged_attention(q[:0], k, v, tables[:0], [], [], scale)
    assert empty.shape == (0, q.shape[1], q.shape[2])
    with pytest.raises(ValueError, match="query_lens sum"):
        pa.paged_attention(q[:-1], k, v, tables, ctx, qlens, scale)


@pytest.mark.parametrize("num_seqs", [1, 3])
def test_decodes_of_equal_contexts_equal_dense(num_seqs):
    """The decode step mlx-lm also runs without a mask: single queries over contexts of one length."""
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    block_size, ctx, ratio = 8, int(rng.integers(1, 40)), 4
    blocks = math.ceil(ctx / block_size)
    tables = rng.permutation(num_seqs * blocks + 2)[: num_seqs * blocks].reshape(num_seqs, blocks)
    shape = (num_seqs * blocks + 2, block_size, NUM_KV_HEADS, HEAD_DIM)
    k_pool, v_pool = mx.full(shape, float("nan")), mx.full(shape, float("nan"))
    keys = rng.standard_normal((num_seqs, ctx, NUM_KV_HEADS, HEAD_DIM)).astype(np.float32)
    values = rng.standard_normal((num_seqs, ctx, NUM_KV_HEADS, HEAD_DIM)).astype(np.float32)
    pos = np.arange(ctx)
    slots = (tables[:, pos // block_size] * block_size + pos % block_size).reshape(-1)
    k_pool, v_pool = pa.reshape_and_cache(mx.array(keys.reshape(-1, NUM_KV_HEADS, HEAD_DIM)),
                                          mx.array(values.reshape(-1, NUM_KV_HEADS, HEAD_DIM)),
                                          k_pool, v_pool, slots)
    q = rng.standard_normal((num_seqs, NUM_KV_HEADS * ratio, HEAD_DIM)).astype(np.float32)
    plan = pa.plan_attention(tables, [ctx] * num_seqs, [1] * num_seqs, block_size)
    assert plan.groups[0].mask is None
    out = pa.attend(mx.array(q), k_pool, v_pool, plan, 0.2)
    want = np.concatenate([dense_attention(q[i:i + 1], keys[i], values[i], 0.2) for i in range(num_seqs)])
    assert relative_error(out, want) < tolerance(mx.float32, ctx), f"seed {seed}"


@pytest.mark.parametrize("dtype, head_dim", [(mx.bfloat16, 128), (mx.float32, 6), (mx.float16, 6),
                                             (mx.bfloat16, 3), (mx.uint8, 5)])
def test_contexts_gathered_bit_for_bit_whatever_the_row_width(dtype, head_dim):
    # Rows move as 8- or 4-byte words where their width allows (bf16 x 128, float32 x 6, float16 x 6) and in
    # their own type where not (bf16 x 3, uint8 x 5): the same bits come out either way, NaNs and all.
    rng = np.random.default_rng(fresh_seed())
    num_blocks, block_size, kv_heads = 5, 4, 3
    bits = rng.integers(0, 256, size=(num_blocks, block_size, kv_heads, head_dim * dtype.size), dtype=np.uint8)
    pool = mx.array(bits).view(dtype)
    slots = rng.integers(0, num_blocks * block_size, size=(2, 7)).astype(np.int32)
    group = pa.AttentionGroup(slice(0, 2), mx.array(slots), None, None, None, 2, 1)
    got = np.array(pa._gathered(pool, group).view(mx.uint8))
    rows = bits.reshape(num_blocks * block_size, kv_heads, -1)
    assert got.shape == (2, kv_heads, 7, head_dim * dtype.size)
    assert np.array_equal(got, rows[slots].transpose(0, 2, 1, 3))


def test_every_layer_gathers_by_the_steps_one_head_row_index(tmp_path):
    # The index a context is gathered by (slot * Hkv + head) is the step's, not a layer's: built per layer it
    # cost each of a 28-layer model's layers two index kernels and two aranges more, K and V, every step.
    import re

    rng = np.random.default_rng(fresh_seed())
    block_size, num_blocks, layers = 4, 12, 3
    plan = pa.plan_attention([[1, 2, 3], [4, 5, 0]], [10, 6], [1, 3], block_size)
    queries = mx.array(rng.standard_normal((4, 2 * NUM_KV_HEADS, HEAD_DIM)).astype(np.float32))
    pools = [mx.array(rng.standard_normal((num_blocks, block_size, NUM_KV_HEADS, HEAD_DIM)).astype(np.float32))
             for _ in range(2 * layers)]
    outs = [pa.attend(queries, pools[2 * i], pools[2 * i + 1], plan, 0.125) for i in range(layers)]
    dot = tmp_path / "step.dot"
    mx.export_to_dot(str(dot), *outs)
    aranges = re.findall(r'label ="Arange', dot.read_text())
    assert len(plan.groups) == 2 and len(aranges) == 2  # one index per group, whatever the layers
    for group in plan.groups:
        assert list(group.head_rows) == [(NUM_KV_HEADS, mx.int32)]


def test_masked_scores_are_scaled_in_the_masks_kernel(tmp_path, monkeypatch):
    # With a mask the scale rides in the mask's fused kernel: scaling the queries first launched a kernel of its
    # own per layer. Without one (equal contexts of single queries) the queries are scaled. Either way the output
    # is dense attention's.
    import re

    rng = np.random.default_rng(fresh_seed())
    block_size, num_blocks, tables = 4, 12, [[1, 2, 3], [4, 5, 0]]
    pools = [mx.array(rng.standard_normal((num_blocks, block_size, NUM_KV_HEADS, HEAD_DIM)).astype(np.float32))
             for _ in range(2)]
    queries = mx.array(rng.standard_normal((2, 2 * NUM_KV_HEADS, HEAD_DIM)).astype(np.float32))
    flat = [np.array(p).reshape(num_blocks * block_size, NUM_KV_HEADS, HEAD_DIM) for p in pools]

    def multiplies(out) -> int:
        dot = tmp_path / "attend.dot"
        mx.export_to_dot(str(dot), out)
        return re.findall(r'label ="(\w+)', dot.read_text()).count("Multiply")

    for ctx, saved in (([10, 6], 1), ([6, 6], 0)):
        plan = pa.plan_attention(tables, ctx, [1, 1], block_size)
        assert (plan.groups[0].mask is None) == (saved == 0)
        out = pa.attend(queries, *pools, plan, 0.125)
        with monkeypatch.context() as m:
            m.setattr(pa, "SCALE_MASKED_SCORES", False)
            before = pa.attend(queries, *pools, pa.plan_attention(tables, ctx, [1, 1], block_size), 0.125)
        assert multiplies(out) == multiplies(before) - saved
        for row, (table, n) in enumerate(zip(tables, ctx)):
            slots = [table[i // block_size] * block_size + i % block_size for i in range(n)]
            k, v = flat[0][slots], flat[1][slots]  # [n, Hkv, D]
            q = np.array(queries[row]).reshape(NUM_KV_HEADS, 2, HEAD_DIM)
            scores = np.einsum("hgd,nhd->hgn", q.astype(np.float64), k) * 0.125
            w = np.exp(scores - scores.max(-1, keepdims=True))
            w /= w.sum(-1, keepdims=True)
            dense = np.einsum("hgn,nhd->hgd", w, v).reshape(2 * NUM_KV_HEADS, HEAD_DIM)
            np.testing.assert_allclose(np.array(out[row]), dense, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(np.array(before[row]), dense, rtol=1e-5, atol=1e-5)


def test_the_fused_mask_kernel_is_right_whatever_shapes_it_meets():
    # `_scaled_masked` is compiled shapeless (traced once, replayed at every size): each call, at another size,
    # broadcast or dtype than the one traced, gives what the ops give uncompiled.
    rng = np.random.default_rng(fresh_seed())
    # One query a sequence takes 4-d scores [B, Hkv, group, ctx] and its [B, 1, 1, ctx] mask (reference._grouped).
    shapes = [((2, 3, 2, 1, 5), (2, 1, 1, 1, 5)), ((4, 2, 4, 7, 9), (4, 1, 1, 7, 9)), ((1, 1, 1, 1, 3),) * 2,
              ((3, 2, 2, 6), (3, 1, 1, 6)), ((3, 2, 2, 4, 6), (3, 1, 1, 4, 6)), ((5, 2, 4, 9), (5, 1, 1, 9)),
              ((2, 3, 2, 1, 5), (2, 1, 1, 1, 5))]
    for dtype in (mx.float32, mx.bfloat16):
        for scores_shape, mask_shape in shapes:
            scores = mx.array(rng.standard_normal(scores_shape).astype(np.float32)).astype(dtype)
            mask = mx.array(rng.random(mask_shape) > 0.3)
            scale, low = mx.array(0.3, dtype), mx.array(mx.finfo(dtype).min, dtype)
            got = pa._scaled_masked(scores, mask, scale, low)
            assert got.shape == scores_shape and got.dtype == dtype
            assert mx.array_equal(got, mx.where(mask, scores * scale, low)).item()


def test_groups_are_planned_when_first_read(monkeypatch):
    # The Metal kernel attends from the step's host metadata alone: a plan it reads plans no groups (slots, masks,
    # padding), the host work of a prefill wave. The reference plans them once, on first read.
    calls = []
    real = pa._plan_group
    monkeypatch.setattr(pa, "_plan_group", lambda *args: calls.append(args[0]) or real(*args))
    plan = pa.plan_attention([[1, 2], [3, 0]], [5, 3], [1, 3], 4)
    assert calls == [] and plan.num_tokens == 4
    assert plan.query_lens.tolist() == [1, 3] and plan.context_lens.tolist() == [5, 3]
    assert plan.block_tables.tolist() == [[1, 2], [3, 0]]
    groups = plan.groups
    assert [g.max_q for g in groups] == [1, 3] and len(calls) == 2 and plan.restore is None
    assert plan.groups is groups and len(calls) == 2


# ------------------------------------------------------------------------------ cache writes
def test_reshape_and_cache_writes_slots_and_skips_padding():
    rng = np.random.default_rng(fresh_seed())
    shape = (6, 4, 2, 8)
    k_pool = mx.array(rng.standard_normal(shape).astype(np.float32)).astype(mx.float16)
    v_pool = mx.array(rng.standard_normal(shape).astype(np.float32)).astype(mx.float16)
    before_k, before_v = np.array(k_pool), np.array(v_pool)
    keys = rng.standard_normal((5, 2, 8)).astype(np.float32)
    values = rng.standard_normal((5, 2, 8)).astype(np.float32)
    slots = [-1, 7, 0, -1, 23]
    k2, v2 = pa.reshape_and_cache(mx.array(keys), mx.array(values), k_pool, v_pool, mx.array(slots))
    assert k2.dtype == mx.float16 and k2.shape == shape
    want_k, want_v = before_k.reshape(24, 2, 8).copy(), before_v.reshape(24, 2, 8).copy()
    for t, s in enumerate(slots):
        if s >= 0:
            want_k[s], want_v[s] = keys[t], values[t]
    np.testing.assert_array_equal(np.array(k2).reshape(24, 2, 8), want_k.astype(np.float16))
    np.testing.assert_array_equal(np.array(v2).reshape(24, 2, 8), want_v.astype(np.float16))
    # Functional: the pools passed in are unchanged.
    np.testing.assert_array_equal(np.array(k_pool), before_k)
    # All padding, and no tokens at all: nothing changes.
    k3, v3 = pa.reshape_and_cache(mx.array(keys), mx.array(values), k2, v2, [-1] * 5)
    assert mx.array_equal(k3, k2) and mx.array_equal(v3, v2)
    k4, _ = pa.reshape_and_cache(mx.array(keys[:0]), mx.array(values[:0]), k2, v2, [])
    assert mx.array_equal(k4, k2)


def test_every_layer_writes_by_the_steps_one_block_and_offset_index(tmp_path):
    # The pools are scattered into by (block, offset), as they are: seen as [slots, ...] and reshaped back, each
    # pool of each layer cost two graph nodes more a step. The index is the step's: one division for any layers.
    import re

    rng = np.random.default_rng(fresh_seed())
    shape, layers, slots = (6, 4, 2, 8), 3, [9, -1, 0, 22]
    pools = [mx.array(rng.standard_normal(shape).astype(np.float32)) for _ in range(2 * layers)]
    before = [np.array(p) for p in pools]
    keys = [mx.array(rng.standard_normal((4, 2, 8)).astype(np.float32)) for _ in range(2 * layers)]
    writes = pa.plan_writes(slots)
    out = [pa.write_cache(keys[2 * i], keys[2 * i + 1], pools[2 * i], pools[2 * i + 1], writes)
           for i in range(layers)]
    dot = tmp_path / "writes.dot"
    mx.export_to_dot(str(dot), *[p for pair in out for p in pair])
    names = re.findall(r'label ="(\w+)', dot.read_text())
    # A reshape a scatter (of the keys to the scatter's update shape), none of a pool
    assert names.count("Scatter") == 2 * layers and names.count("Reshape") == 2 * layers
    assert names.count("Remainder") == 1 and list(writes.split) == [4]
    for i, pair in enumerate(out):
        for j, pool in enumerate(pair):
            want = before[2 * i + j].reshape(24, 2, 8).copy()
            for t, slot in enumerate(slots):
                if slot >= 0:
                    want[slot] = np.array(keys[2 * i + j][t])
            np.testing.assert_array_equal(np.array(pool).reshape(24, 2, 8), want)
            np.testing.assert_array_equal(np.array(pools[2 * i + j]), before[2 * i + j])  # the old pool as it was


def test_copy_blocks_copies_whole_blocks():
    rng = np.random.default_rng(fresh_seed())
    k_pool = mx.array(rng.standard_normal((5, 4, 2, 8)).astype(np.float32))
    v_pool = mx.array(rng.standard_normal((5, 4, 2, 8)).astype(np.float32))
    before_k, before_v = np.array(k_pool), np.array(v_pool)
    k2, v2 = pa.copy_blocks(k_pool, v_pool, [1, 3], mx.array([4, 0]))
    want_k, want_v = before_k.copy(), before_v.copy()
    want_k[[4, 0]], want_v[[4, 0]] = before_k[[1, 3]], before_v[[1, 3]]
    np.testing.assert_array_equal(np.array(k2), want_k)
    np.testing.assert_array_equal(np.array(v2), want_v)
    np.testing.assert_array_equal(np.array(k_pool), before_k)
    assert pa.copy_blocks(k2, v2, [], []) == (k2, v2)
    with pytest.raises(ValueError):
        pa.copy_blocks(k2, v2, [1], [2, 3])


def test_cache_writes_update_pools_in_place():
    """With the old pools rebound, neither write copies a pool (MLX donates the buffer to the scatter)."""
    shape = (256, 16, 4, 64)
    pool_bytes = 4 * math.prod(shape)
    k, v = mx.zeros(shape) + 1, mx.zeros(shape) + 2
    keys = mx.ones((3, 4, 64))
    mx.eval(k, v, keys)
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    for step in range(3):
        k, v = pa.reshape_and_cache(keys, keys, k, v, [step, -1, 100 + step])
        mx.eval(k, v)
        k, v = pa.copy_blocks(k, v, [1], [2 + step])
        mx.eval(k, v)
    assert mx.get_peak_memory() - base < pool_bytes / 2
    assert float(k[2 + 2, 0].sum()) == float(k[1, 0].sum())


# ------------------------------------------------------------------------------ kernel choice
def test_use_kernels_choice(monkeypatch):
    """`VLLM_METAL_KERNELS` decides once: `auto` (None) where MLX computes on Metal, 0 never, 1 always (an
    error off Metal); per op, only attention runs its kernel when kernels are on."""
    assert kernels.use_kernels(False) is False
    on_metal = kernels.metal_available() and mx.default_device().type == mx.DeviceType.gpu
    assert kernels.use_kernels(None) is on_metal
    monkeypatch.setattr(kernels, "metal_available", lambda: False)
    assert kernels.use_kernels(None) is False
    with pytest.raises(EnvError, match="VLLM_METAL_KERNELS=1 asks for the Metal kernels"):
        kernels.use_kernels(True)
    assert kernels.kernel_choice(False) == {"paged_attention": False, "reshape_and_cache": False,
                                            "copy_blocks": False}
    assert kernels.kernel_choice(True) == {"paged_attention": True, "reshape_and_cache": False,
                                           "copy_blocks": False}


def test_entry_points_without_use_kernel_are_the_reference():
    pack = Pack(np.random.default_rng(fresh_seed()), block_size=16, ratio=2)
    assert mx.array_equal(kernels.paged_attention(*pack.args()), pa.paged_attention(*pack.args()),
                          equal_nan=True)
    keys = mx.ones((2, NUM_KV_HEADS, HEAD_DIM))
    got = kernels.reshape_and_cache(keys, keys, pack.k_pool, pack.v_pool, [3, -1])
    want = pa.reshape_and_cache(keys, keys, pack.k_pool, pack.v_pool, [3, -1])
    assert all(mx.array_equal(a, b, equal_nan=True) for a, b in zip(got, want))
    got = kernels.copy_blocks(pack.k_pool, pack.v_pool, [0], [1])
    want = pa.copy_blocks(pack.k_pool, pack.v_pool, [0], [1])
    assert all(mx.array_equal(a, b, equal_nan=True) for a, b in zip(got, want))


def test_plans_cover_the_grid():
    pack = Pack(np.random.default_rng(fresh_seed()), block_size=8, ratio=4)
    q, k, v, tables, ctx, qlens, scale = pack.args()
    launch = kernels.plan_paged_attention(q, k, v, tables, ctx, qlens, scale)
    assert launch.grid == (kernels.SIMD_WIDTH, q.shape[1], q.shape[0])
    seq, pos = (np.array(a) for a in launch.inputs[4:6])
    assert list(np.bincount(seq, minlength=len(qlens))) == qlens
    assert all(pos[seq == i].max() == c - 1 for i, c in enumerate(ctx))
    slots = [5, -1, 9]
    new = mx.ones((3, NUM_KV_HEADS, HEAD_DIM))
    cache = kernels.plan_reshape_and_cache(new, new, k, v, slots)
    slot_token = np.array(cache.inputs[-1])
    assert slot_token.shape == (k.shape[0] * 8,) and slot_token[5] == 0 and slot_token[9] == 2
    assert (np.delete(slot_token, [5, 9]) == -1).all()
    copy = kernels.plan_copy_blocks(k, v, [2], [0])
    assert list(np.array(copy.inputs[-1]))[:3] == [2, 1, 2]


# ------------------------------------------------------------------------------ Metal (a Mac, or a macOS VM)
metal = pytest.mark.skipif(not kernels.metal_available(), reason="needs MLX with Metal (Apple Silicon)")

# Kernel against reference on Apple silicon: both accumulate in float32, so float32 agrees to rounding; the
# half-precision bounds are the output's own rounding (a few units of 2^-10 and 2^-7).
STRICT = {mx.float32: 1e-4, mx.float16: 1e-2, mx.bfloat16: 3e-2}
# float32 on a VM's paravirtual device; why, in `kernel_tolerance`.
PARAVIRTUAL_FLOAT32 = 5e-3


def metal_device_info() -> dict:
    """`mx.device_info()` of the Metal device; {} where there is none (it then describes the CPU)."""
    return dict(mx.device_info()) if kernels.metal_available() else {}


def kernel_tolerance(dtype, device_info: dict) -> float:
    """The relative error the Metal paged-attention kernel may show against the pure-MLX reference.

    On Apple silicon: `STRICT`, always. On a macOS VM's "Apple Paravirtual device" (GitHub's macos-14/15/26
    runners; `is_paravirtual` reads `device_info`), float32 gets `PARAVIRTUAL_FLOAT32` = 5e-3 instead of 1e-4,
    and only there. Not measured here: this project's development host has no Mac and no VM, and no run on a
    paravirtual device exists yet. The figure comes from what projects report: strict parity can diverge on
    that device, e.g. a deterministic uniform shift of ~7e-4 relative in a parity test that passes on an M2 Max
    (ohdearquant/lattice#899: the paravirtual GPU is not an Apple7-family device and takes other code paths;
    llama.cpp reports it without simdgroup reductions, which this kernel's `simd_sum` uses). 1e-4 would fail
    on such a shift; 5e-3 leaves 7x room. It still catches the bugs a kernel has, measured on the reference
    here over 100 random packs: a wrong causal mask or KV-head mapping gives relative errors of 0.8-1.3, a
    context one key short 0.016 or more in 9 packs of 10. A sub-percent error (a softmax scale 1 % off: median
    6.7e-3) may pass on a VM; that is what the strict job on Apple silicon (`runs-on: [self-hosted, macOS,
    ARM64]` in .github/workflows/macos.yml) is for. The half-precision bounds already exceed the reported shift
    and stay as they are."""
    if dtype == mx.float32 and is_paravirtual(device_info):
        return PARAVIRTUAL_FLOAT32
    return STRICT[dtype]


def test_kernel_tolerance_is_loosened_only_on_a_paravirtual_device():
    vm = {"device_name": "Apple Paravirtual device", "memory_size": 7516192768}
    m2 = {"device_name": "Apple M2 Pro", "memory_size": 34359738368}
    assert kernel_tolerance(mx.float32, vm) == PARAVIRTUAL_FLOAT32
    assert [kernel_tolerance(t, m2) for t in STRICT] == [kernel_tolerance(t, {}) for t in STRICT] == [1e-4, 1e-2, 3e-2]
    assert kernel_tolerance(mx.float16, vm) == STRICT[mx.float16]


@pytest.mark.metal
@metal
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
@pytest.mark.parametrize("block_size,ratio", [(8, 1), (16, 4), (32, 8)])
def test_metal_paged_attention_matches_reference(block_size, ratio, dtype):
    """Within `kernel_tolerance`: strict on Apple silicon, float32 at 5e-3 on a VM's paravirtual device."""
    seed = fresh_seed()
    tolerance = kernel_tolerance(dtype, metal_device_info())
    pack = Pack(np.random.default_rng(seed), block_size=block_size, ratio=ratio, dtype=dtype)
    args = pack.args(dtype)
    got = kernels.paged_attention(*args, use_kernel=True)
    want = pa.paged_attention(*args)
    assert got.dtype == dtype and got.shape == want.shape
    err = relative_error(got.astype(mx.float32), want.astype(mx.float32))
    device = metal_device_info().get("device_name")
    assert err < tolerance, f"relative error {err:.2e} > {tolerance:g} on {device} (seed {seed})"


@pytest.mark.metal
@metal
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("variant", [dict(window=12), dict(sinks=True), dict(softcap=2.0), dict(value_dim=96),
                                     dict(window=12, sinks=True, value_dim=64)])
def test_metal_paged_attention_variants_match_reference(variant, dtype):
    """The kernel's sliding window, sinks, softcap and value widths (Gemma 3, gpt-oss, Gemma 2, DeepSeek-V2) on
    the GPU, through the check the runner makes at start: strict on Apple silicon."""
    check = kernels.self_check(8, 2, 128, 16, dtype, **variant)
    tolerance = kernel_tolerance(dtype, metal_device_info())
    assert check.error < tolerance, check.describe()


@pytest.mark.metal
@metal
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16])
def test_metal_cache_kernels_match_reference(dtype):
    """Bit for bit on every Metal device, a VM's included: the cache kernels only move values."""
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    # The Pack writes through the kernel; attention over it must then equal dense attention.
    pack = Pack(rng, block_size=16, ratio=2, dtype=dtype,
                write=lambda *a: kernels.reshape_and_cache(*a, use_kernel=True))
    ref_pack = Pack(np.random.default_rng(seed), block_size=16, ratio=2, dtype=dtype)
    assert mx.array_equal(pack.k_pool, ref_pack.k_pool, equal_nan=True), f"seed {seed}"
    assert mx.array_equal(pack.v_pool, ref_pack.v_pool, equal_nan=True), f"seed {seed}"
    blocks = rng.permutation(pack.k_pool.shape[0])
    src, dst = list(blocks[:3]), list(blocks[3:6])
    got = kernels.copy_blocks(pack.k_pool, pack.v_pool, src, dst, use_kernel=True)
    want = pa.copy_blocks(pack.k_pool, pack.v_pool, src, dst)
    assert all(mx.array_equal(a, b, equal_nan=True) for a, b in zip(got, want)), f"seed {seed}"
