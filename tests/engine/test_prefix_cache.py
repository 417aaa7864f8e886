"""Prompt-prefix reuse on the MLX-managed path (VLLM_METAL_PREFIX_CACHE)."""

from __future__ import annotations

import pytest

from tests.support.engine import PROMPTS, greedy, mlx_greedy


class FakeLayer:
    def __init__(self, n, value=1.0):
        import mlx.core as mx

        self.keys = mx.full((1, 2, n, 4), value)
        self.values = mx.full((1, 2, n, 4), -value)


def test_lookup_returns_the_longest_cached_whole_block_prefix():
    from vmetal.engine.runner.kv.prefix_cache import PrefixCache

    cache = PrefixCache(budget_bytes=1 << 20, block_size=4)
    prompt = list(range(10))
    cache.insert(prompt, [FakeLayer(10), FakeLayer(10)])
    keys, values, n = cache.lookup(list(range(9)) + [99, 100], limit=10)
    assert n == 8 and keys[0].shape == (1, 2, 8, 4) and len(values) == 2
    # A prompt diverging inside the first block shares nothing; the limit caps reuse.
    assert cache.lookup([0, 1, 7, 3, 4], limit=5) is None
    assert cache.lookup(prompt, limit=5)[2] == 4
    assert cache.stats.hits == 2 and cache.stats.tokens_reused == 12


def test_budget_evicts_the_least_used_entry_first():
    from vmetal.engine.runner.kv.prefix_cache import PrefixCache

    one_entry = 2 * 2 * 8 * 4 * 4  # K and V, 8 tokens, float32, one layer
    cache = PrefixCache(budget_bytes=2 * one_entry, block_size=8)
    a, b, c = [1] * 8, [2] * 8, [3] * 8
    cache.insert(a, [FakeLayer(8)])
    cache.insert(b, [FakeLayer(8)])
    assert cache.lookup(a + [0], limit=8) is not None  # a is now more useful than b
    cache.insert(c, [FakeLayer(8)])
    assert cache.nbytes <= 2 * one_entry and cache.stats.evictions == 1
    assert cache.lookup(b + [0], limit=8) is None
    assert cache.lookup(a + [0], limit=8) is not None and cache.lookup(c + [0], limit=8) is not None


@pytest.mark.slow
def test_engine_reuses_a_shared_prefix_and_stays_exact(qwen3_model):
    from vllm import LLM

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_METAL_PREFIX_CACHE", "1")
        # In-process engine core, so the test can read the runner's counters.
        mp.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        llm = LLM(model=str(qwen3_model), max_model_len=256, max_num_seqs=8)
        try:
            runner = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner
            shared = " ".join(PROMPTS)
            outs = [llm.generate([shared + tail], greedy(8), use_tqdm=False)[0]
                    for tail in (" first", " and then a second one")]
            stats = runner.prefix_cache.stats
            assert stats.hits == 1 and stats.tokens_reused >= 32
            for out in outs:
                assert list(out.outputs[0].token_ids) == mlx_greedy(qwen3_model, out.prompt_token_ids, 8)
        finally:
            llm.llm_engine.engine_core.shutdown()
