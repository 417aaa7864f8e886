"""The paged KV path end to end: vLLM's block manager, our pools, greedy parity."""

from __future__ import annotations

import pytest

from tests.support.engine import (
    LONG_PROMPT,
    PROMPTS,
    assert_greedy_like_mlx,
    assert_step_times_split,
    greedy,
    metric,
    running_llm,
)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("launch_thread_on")]


@pytest.fixture(scope="module", autouse=True)
def paged_env():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_METAL_USE_PAGED_ATTENTION", "1")
        mp.setenv("VLLM_METAL_MEMORY_FRACTION", "0.2")
        yield


def paged_llm(path, **kw):
    kw.setdefault("max_model_len", 256)
    kw.setdefault("max_num_seqs", 16)
    return running_llm(path, seed=0, disable_log_stats=False, **kw)


@pytest.fixture(scope="module")
def paged(qwen3_model):
    with paged_llm(qwen3_model, enable_prefix_caching=True) as llm:
        yield llm


def test_eight_concurrent_requests_match_mlx_lm(paged, qwen3_model):
    assert_greedy_like_mlx(qwen3_model, paged.generate(PROMPTS, greedy(16), use_tqdm=False), 16)


def test_step_times_split_each_decode_step(paged):
    assert_step_times_split(paged)


def ahead_counts(llm) -> dict:
    counts = llm.collective_rpc("step_counts")[0]
    return {k.removeprefix("ahead_"): v for k, v in counts.items() if k.startswith("ahead_")} | \
        {"compiled": counts.get("decode_compiled", 0), "launched": counts.get("thread_launches", 0)}


def test_decode_steps_run_ahead_across_block_boundaries(paged, qwen3_model):
    """Each all-decode step is queued before vLLM asks for it (decode-ahead), also when a row's next token
    starts a block vLLM has not allocated yet; the output stays mlx-lm's."""
    before = ahead_counts(paged)
    outs = paged.generate(PROMPTS, greedy(40), use_tqdm=False)
    after = ahead_counts(paged)
    steps = {k: after.get(k, 0) - before.get(k, 0)
             for k in ("used", "missed", "none", "scratch", "compiled", "launched")}
    assert_greedy_like_mlx(qwen3_model, outs, 40)
    # Every all-decode forward, ahead or not, is the compiled one (VLLM_METAL_COMPILE defaults to 1).
    assert steps["compiled"] >= 39, steps
    # 39 all-decode steps follow the one packed prefill; only the first has nothing queued.
    assert steps["used"] + steps["missed"] + steps["none"] >= 39, steps
    assert steps["used"] >= steps["missed"] + steps["none"] + 30, steps
    assert steps["scratch"] >= 2, steps  # 40 tokens cross block boundaries (block size 16) in every row
    # ... and launched by the launch thread (`launch_thread_on`; a GPU's `auto` keeps this path off it): one for
    # each used step
    assert steps["launched"] >= steps["used"], steps


def test_freed_memory_kept_for_reuse_is_capped(paged):
    """MLX keeps freed buffers only up to the worker's cap, not up to its peak: a server does not hold on to
    memory that another process on the same device needs."""
    import psutil

    paged.generate(PROMPTS, greedy(8), use_tqdm=False)
    mem = paged.collective_rpc("mlx_memory")[0]
    # A tenth of the memory MLX may use (here: the RAM available at start-up), at least 512 MiB.
    assert 512 * 2**20 <= mem["cache_limit"] <= max(512 * 2**20, psutil.virtual_memory().total // 10), mem
    assert mem["cache"] <= mem["cache_limit"] and mem["active"] > 0, mem


def test_prefix_cache_is_hit_and_output_stays_exact(paged, qwen3_model):
    """The second prompt's shared blocks come from vLLM's prefix cache (counted per request: the Prometheus
    counters of this engine are unregistered once another LLM starts in the process, as a test's may)."""
    shared = " ".join(PROMPTS)  # several blocks long
    first = paged.generate([shared + " first"], greedy(8), use_tqdm=False)[0]
    second = paged.generate([shared + " second one"], greedy(8), use_tqdm=False)[0]
    assert second.num_cached_tokens >= 16, second.num_cached_tokens
    assert_greedy_like_mlx(qwen3_model, (first, second), 8)


def test_chunked_prefill_packs_with_running_decodes(qwen3_model):
    with paged_llm(qwen3_model, max_num_batched_tokens=32, enable_chunked_prefill=True, max_num_seqs=4) as llm:
        outs = llm.generate([LONG_PROMPT, "Hello world", "A small dog"], greedy(12), use_tqdm=False)
        assert len(outs[0].prompt_token_ids) > 32
        assert_greedy_like_mlx(qwen3_model, outs, 12)


def test_preemption_in_a_tiny_pool_keeps_outputs_exact(qwen3_model):
    from vmetal.engine import models

    per_token = models.load(str(qwen3_model)).kv_bytes_per_token
    with paged_llm(qwen3_model, max_model_len=64, max_num_seqs=8, block_size=16,
                   kv_cache_memory_bytes=per_token * 96) as llm:
        assert_greedy_like_mlx(qwen3_model, llm.generate(PROMPTS, greedy(40), use_tqdm=False), 40)
        assert metric(llm, "vllm:num_preemptions") > 0


def test_llama_family_on_the_paged_path_op_by_op(llama_model, monkeypatch):
    """With VLLM_METAL_COMPILE=0 every step is built op by op, and the tokens are the same."""
    monkeypatch.setenv("VLLM_METAL_COMPILE", "0")
    with paged_llm(llama_model) as llm:
        assert_greedy_like_mlx(llama_model, llm.generate(PROMPTS[:4], greedy(12), use_tqdm=False), 12)
        assert ahead_counts(llm)["compiled"] == 0 and ahead_counts(llm)["used"] > 0
