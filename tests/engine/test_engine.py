"""The engine through vLLM's `LLM`: greedy parity with mlx-lm and batching behaviour."""

from __future__ import annotations

import pytest

from tests.support.engine import (
    LONG_PROMPT,
    PROMPTS,
    assert_greedy_like_mlx,
    assert_joining_requests_like_mlx,
    assert_step_times_split,
    greedy,
    metric,
    running_llm,
)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("launch_thread_on")]

@pytest.fixture(scope="module", params=["qwen3", "llama"])
def engine(request):
    path = request.getfixturevalue(f"{request.param}_model")
    with running_llm(path, max_model_len=256, max_num_seqs=16, seed=0) as llm:
        yield path, llm


def test_greedy_matches_mlx_lm_one_at_a_time(engine):
    path, llm = engine
    for prompt in PROMPTS[:3]:
        assert_greedy_like_mlx(path, llm.generate([prompt], greedy(), use_tqdm=False), 12)


def test_eight_concurrent_requests_match_mlx_lm(engine):
    path, llm = engine
    outs = llm.generate(PROMPTS, greedy(16), use_tqdm=False)
    assert len(outs) == 8
    assert_greedy_like_mlx(path, outs, 16)


def test_requests_joining_mid_decode_match_mlx_lm(engine):
    """Requests of different lengths arrive while others are decoding."""
    assert_joining_requests_like_mlx(*engine, "join")


def test_decode_steps_launch_on_their_own_thread(engine):
    """With a launch thread (the MLX-managed path's default on a GPU; this module's engines have one) the
    decode-ahead's launches run on it while the engine's thread goes on: the steps that gave mlx-lm's exact
    tokens were launched there."""
    path, llm = engine
    before = llm.collective_rpc("step_counts")[0].get("thread_launches", 0)
    outs = llm.generate(PROMPTS[:2], greedy(16), use_tqdm=False)
    assert_greedy_like_mlx(path, outs, 16)
    assert llm.collective_rpc("step_counts")[0]["thread_launches"] - before >= 14


def test_a_finished_batch_empties_mlx_buffer_cache(engine):
    """MLX's cache of freed buffers is emptied once a batch is over (the runner's `_shrink_cache`: a lone stream
    ran a third slower beside a 32-row batch's buffers), once a batch, never for lone requests, and the streams
    after it still decode mlx-lm's tokens."""
    path, llm = engine

    def cleared() -> int:
        return llm.collective_rpc("step_counts")[0].get("cache_cleared", 0)

    llm.generate([PROMPTS[0]], greedy(4), use_tqdm=False)  # delivers an earlier test's finished requests
    before = cleared()
    assert_greedy_like_mlx(path, llm.generate(PROMPTS[:4], greedy(8), use_tqdm=False), 8)
    assert_greedy_like_mlx(path, llm.generate([PROMPTS[5]], greedy(8), use_tqdm=False), 8)
    assert cleared() == before + 1  # the batch's end reaches the runner with the next request
    assert_greedy_like_mlx(path, llm.generate([PROMPTS[6]], greedy(8), use_tqdm=False), 8)
    assert cleared() == before + 1


def test_launches_on_the_engines_thread_give_the_same_tokens(qwen3_model, monkeypatch):
    """VLLM_METAL_LAUNCH_THREAD=0 (and `auto` on this CPU): the engine launches on its own thread, and the tokens
    are the same."""
    monkeypatch.setenv("VLLM_METAL_LAUNCH_THREAD", "0")
    with running_llm(qwen3_model, max_model_len=256, max_num_seqs=4, seed=0) as llm:
        assert_greedy_like_mlx(qwen3_model, llm.generate(PROMPTS[:3], greedy(12), use_tqdm=False), 12)
        assert "thread_launches" not in llm.collective_rpc("step_counts")[0]


def test_step_times_split_each_decode_step(engine):
    assert_step_times_split(engine[1])


def test_chunked_prefill_of_a_long_prompt_matches(qwen3_model):
    """A prompt longer than the step's token budget is prefilled in chunks."""
    with running_llm(qwen3_model, max_model_len=256, max_num_batched_tokens=32, max_num_seqs=4,
                     enable_chunked_prefill=True) as llm:
        outs = llm.generate([LONG_PROMPT, "Hello world"], greedy(10), use_tqdm=False)
        assert len(outs[0].prompt_token_ids) > 32
        assert_greedy_like_mlx(qwen3_model, outs, 10)


def test_preemption_under_a_tiny_kv_budget_keeps_outputs_exact(qwen3_model):
    """Too little KV for all requests: vLLM preempts and resumes; tokens stay exact."""
    from vmetal.engine import models

    per_token = models.load(str(qwen3_model)).kv_bytes_per_token
    with running_llm(qwen3_model, max_model_len=64, max_num_seqs=8, kv_cache_memory_bytes=per_token * 96,
                     block_size=16, disable_log_stats=False) as llm:
        assert_greedy_like_mlx(qwen3_model, llm.generate(PROMPTS, greedy(40), use_tqdm=False), 40)
        assert metric(llm, "vllm:num_preemptions") > 0
