"""The engine through vLLM's `LLM`: greedy parity with mlx-lm and batching behaviour."""

from __future__ import annotations

from contextlib import contextmanager

import pytest

from conftest import mlx_greedy

pytestmark = pytest.mark.slow

PROMPTS = [
    "Hello world",
    "The cat reads a red book",
    "one",
    "The old teacher opens the blue door near the station every Sunday and",
    "A small dog",
    "Our team builds a simple program",
    "The robot counts three apples",
    "Everyone remembers",
]
LONG_PROMPT = " ".join(PROMPTS) * 2  # longer than a 32-token step budget: prefilled in chunks
ARRIVALS = {0: PROMPTS[3], 3: PROMPTS[0], 5: PROMPTS[1], 9: PROMPTS[6]}  # step -> prompt, while others decode


# Helpers the other engine-path tests (paged, torch, prefix cache, prompt logprobs) import from here.
def greedy(max_tokens=12, **kw):
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


@contextmanager
def running_llm(path, **kw):
    """vLLM's `LLM` for the model folder `path`; its engine core is shut down on leaving, whatever happened."""
    from vllm import LLM

    llm = LLM(model=str(path), **kw)
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown()


def assert_greedy_like_mlx(path, outs, max_tokens: int) -> None:
    """Every output's tokens are mlx-lm's own greedy continuation of its prompt."""
    for out in outs:
        assert list(out.outputs[0].token_ids) == mlx_greedy(path, out.prompt_token_ids, max_tokens)


def metric(llm, name: str) -> float:
    return sum(m.value for m in llm.get_metrics() if m.name == name)


def assert_joining_requests_like_mlx(path, llm, tag: str, max_tokens: int = 20) -> None:
    """Requests of different lengths join while others decode (the engine stepped by hand, each prompt added at
    its step of ARRIVALS): every one finishes, with mlx-lm's greedy tokens."""
    core, tok = llm.llm_engine, llm.get_tokenizer()
    finished, step = {}, 0
    while step < 200 and (len(finished) < len(ARRIVALS) or step <= max(ARRIVALS)):
        if step in ARRIVALS:
            core.add_request(f"{tag}-{step}", {"prompt_token_ids": tok.encode(ARRIVALS[step])},
                             greedy(max_tokens))
        for out in core.step():
            if out.finished:
                finished[out.request_id] = (out.prompt_token_ids, list(out.outputs[0].token_ids))
        step += 1
    assert len(finished) == len(ARRIVALS) == 4
    for prompt_ids, token_ids in finished.values():
        assert token_ids == mlx_greedy(path, prompt_ids, max_tokens)


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


def test_chunked_prefill_of_a_long_prompt_matches(qwen3_model):
    """A prompt longer than the step's token budget is prefilled in chunks."""
    with running_llm(qwen3_model, max_model_len=256, max_num_batched_tokens=32, max_num_seqs=4,
                     enable_chunked_prefill=True) as llm:
        outs = llm.generate([LONG_PROMPT, "Hello world"], greedy(10), use_tqdm=False)
        assert len(outs[0].prompt_token_ids) > 32
        assert_greedy_like_mlx(qwen3_model, outs, 10)


def test_preemption_under_a_tiny_kv_budget_keeps_outputs_exact(qwen3_model):
    """Too little KV for all requests: vLLM preempts and resumes; tokens stay exact."""
    from vmetal import models

    per_token = models.load(str(qwen3_model)).kv_bytes_per_token
    with running_llm(qwen3_model, max_model_len=64, max_num_seqs=8, kv_cache_memory_bytes=per_token * 96,
                     block_size=16, disable_log_stats=False) as llm:
        assert_greedy_like_mlx(qwen3_model, llm.generate(PROMPTS, greedy(40), use_tqdm=False), 40)
        assert metric(llm, "vllm:num_preemptions") > 0
