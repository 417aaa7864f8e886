"""The engine through vLLM's `LLM`: greedy parity with mlx-lm and batching behaviour."""

from __future__ import annotations

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


@pytest.fixture(scope="module", params=["qwen3", "llama"])
def engine(request):
    from vllm import LLM

    path = request.getfixturevalue(f"{request.param}_model")
    llm = LLM(model=str(path), max_model_len=256, max_num_seqs=16, seed=0)
    yield path, llm
    llm.llm_engine.engine_core.shutdown()
    del llm


def greedy(max_tokens=12, **kw):
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


def test_greedy_matches_mlx_lm_one_at_a_time(engine):
    path, llm = engine
    for prompt in PROMPTS[:3]:
        out = llm.generate([prompt], greedy(), use_tqdm=False)[0]
        assert list(out.outputs[0].token_ids) == mlx_greedy(path, out.prompt_token_ids, 12)


def test_eight_concurrent_requests_match_mlx_lm(engine):
    path, llm = engine
    outs = llm.generate(PROMPTS, greedy(16), use_tqdm=False)
    assert len(outs) == 8
    for out in outs:
        assert list(out.outputs[0].token_ids) == mlx_greedy(path, out.prompt_token_ids, 16)


def test_requests_joining_mid_decode_match_mlx_lm(engine):
    """Requests of different lengths arrive while others are decoding."""
    path, llm = engine
    core = llm.llm_engine
    arrivals = {0: PROMPTS[3], 3: PROMPTS[0], 5: PROMPTS[1], 9: PROMPTS[6]}
    finished, step, max_tokens = {}, 0, 20
    tok = llm.get_tokenizer()
    while step < 200 and (len(finished) < len(arrivals) or step <= max(arrivals)):
        if step in arrivals:
            ids = tok.encode(arrivals[step])
            core.add_request(f"join-{step}", {"prompt_token_ids": ids}, greedy(max_tokens))
        for out in core.step():
            if out.finished:
                finished[out.request_id] = (out.prompt_token_ids, list(out.outputs[0].token_ids))
        step += 1
    assert len(finished) == 4
    for prompt_ids, token_ids in finished.values():
        assert token_ids == mlx_greedy(path, prompt_ids, max_tokens)


def test_chunked_prefill_of_a_long_prompt_matches(qwen3_model):
    """A prompt longer than the step's token budget is prefilled in chunks."""
    from vllm import LLM

    llm = LLM(model=str(qwen3_model), max_model_len=256, max_num_batched_tokens=32,
              max_num_seqs=4, enable_chunked_prefill=True)
    try:
        long_prompt = " ".join(PROMPTS) * 2
        outs = llm.generate([long_prompt, "Hello world"], greedy(10), use_tqdm=False)
        assert len(outs[0].prompt_token_ids) > 32
        for out in outs:
            assert list(out.outputs[0].token_ids) == mlx_greedy(qwen3_model, out.prompt_token_ids, 10)
    finally:
        llm.llm_engine.engine_core.shutdown()


def test_preemption_under_a_tiny_kv_budget_keeps_outputs_exact(qwen3_model):
    """Too little KV for all requests: vLLM preempts and resumes; tokens stay exact."""
    from vllm import LLM

    from vmetal import models

    per_token = models.load(str(qwen3_model)).kv_bytes_per_token
    llm = LLM(model=str(qwen3_model), max_model_len=64, max_num_seqs=8,
              kv_cache_memory_bytes=per_token * 96, block_size=16,
              disable_log_stats=False)
    try:
        outs = llm.generate(PROMPTS, greedy(40), use_tqdm=False)
        for out in outs:
            assert list(out.outputs[0].token_ids) == mlx_greedy(qwen3_model, out.prompt_token_ids, 40)
        stats = llm.get_metrics()
        preemptions = [m for m in stats if m.name == "vllm:num_preemptions"]
        assert preemptions and preemptions[0].value > 0
    finally:
        llm.llm_engine.engine_core.shutdown()
