"""The paged KV path end to end: vLLM's block manager, our pools, greedy parity."""

from __future__ import annotations

import pytest

from conftest import mlx_greedy
from test_engine import PROMPTS, greedy

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def paged_env():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_METAL_USE_PAGED_ATTENTION", "1")
        mp.setenv("VLLM_METAL_MEMORY_FRACTION", "0.2")
        yield


def make_llm(path, **kw):
    from vllm import LLM

    kw.setdefault("max_model_len", 256)
    kw.setdefault("max_num_seqs", 16)
    return LLM(model=str(path), seed=0, disable_log_stats=False, **kw)


def metric(llm, name):
    return sum(m.value for m in llm.get_metrics() if m.name == name)


@pytest.fixture(scope="module")
def paged(qwen3_model):
    llm = make_llm(qwen3_model, enable_prefix_caching=True)
    yield llm
    llm.llm_engine.engine_core.shutdown()


def test_eight_concurrent_requests_match_mlx_lm(paged, qwen3_model):
    outs = paged.generate(PROMPTS, greedy(16), use_tqdm=False)
    for out in outs:
        assert list(out.outputs[0].token_ids) == mlx_greedy(qwen3_model, out.prompt_token_ids, 16)


def test_prefix_cache_is_hit_and_output_stays_exact(paged, qwen3_model):
    shared = " ".join(PROMPTS)  # several blocks long
    first = paged.generate([shared + " first"], greedy(8), use_tqdm=False)[0]
    hits_before = metric(paged, "vllm:prefix_cache_hits")
    second = paged.generate([shared + " second one"], greedy(8), use_tqdm=False)[0]
    assert metric(paged, "vllm:prefix_cache_hits") - hits_before >= 16
    for out in (first, second):
        assert list(out.outputs[0].token_ids) == mlx_greedy(qwen3_model, out.prompt_token_ids, 8)


def test_chunked_prefill_packs_with_running_decodes(qwen3_model):
    llm = make_llm(qwen3_model, max_num_batched_tokens=32, enable_chunked_prefill=True, max_num_seqs=4)
    try:
        long_prompt = " ".join(PROMPTS) * 2
        outs = llm.generate([long_prompt, "Hello world", "A small dog"], greedy(12), use_tqdm=False)
        assert len(outs[0].prompt_token_ids) > 32
        for out in outs:
            assert list(out.outputs[0].token_ids) == mlx_greedy(qwen3_model, out.prompt_token_ids, 12)
    finally:
        llm.llm_engine.engine_core.shutdown()


def test_preemption_in_a_tiny_pool_keeps_outputs_exact(qwen3_model):
    from vmetal import models

    per_token = models.load(str(qwen3_model)).kv_bytes_per_token
    llm = make_llm(qwen3_model, max_model_len=64, max_num_seqs=8, block_size=16,
                   kv_cache_memory_bytes=per_token * 96)
    try:
        outs = llm.generate(PROMPTS, greedy(40), use_tqdm=False)
        for out in outs:
            assert list(out.outputs[0].token_ids) == mlx_greedy(qwen3_model, out.prompt_token_ids, 40)
        assert metric(llm, "vllm:num_preemptions") > 0
    finally:
        llm.llm_engine.engine_core.shutdown()


def test_llama_family_on_the_paged_path(llama_model):
    llm = make_llm(llama_model)
    try:
        outs = llm.generate(PROMPTS[:4], greedy(12), use_tqdm=False)
        for out in outs:
            assert list(out.outputs[0].token_ids) == mlx_greedy(llama_model, out.prompt_token_ids, 12)
    finally:
        llm.llm_engine.engine_core.shutdown()
