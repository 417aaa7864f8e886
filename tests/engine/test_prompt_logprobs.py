"""Prompt logprobs (`prompt_logprobs`, `echo` with logprobs) equal mlx-lm's own log-softmax over the prompt.

The reference runs the mlx-lm model once over the whole prompt; the engine must give, for every prompt position
after the first, the same logprob of the actual next token, its rank, and the same top-k, on the MLX-managed
path (whole prompt and chunked prefill) and on the paged path, whatever else shares the batch.
"""

from __future__ import annotations

import math

import pytest

from tests.support.engine import PROMPTS, prompt_logprobs_reference

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("launch_thread_on")]

TOP_K = 3


def check(outputs, path):
    for out in outputs:
        ref = prompt_logprobs_reference(path, out.prompt_token_ids, TOP_K)
        got = out.prompt_logprobs
        assert got[0] is None and len(got) == len(out.prompt_token_ids)
        for pos, (entry, (lp, rank, top)) in enumerate(zip(got[1:], ref)):
            target = out.prompt_token_ids[pos + 1]
            assert math.isclose(entry[target].logprob, lp, abs_tol=1e-4), (pos, entry[target], lp)
            assert entry[target].rank == rank
            top_got = sorted((t for t in entry if entry[t].rank <= TOP_K), key=lambda t: entry[t].rank)
            assert top_got == top, (pos, top_got, top)


def run(path, monkeypatch, paged: bool, **kw):
    from vllm import LLM, SamplingParams

    monkeypatch.setenv("VLLM_METAL_USE_PAGED_ATTENTION", "1" if paged else "0")
    monkeypatch.setenv("VLLM_METAL_MEMORY_FRACTION", "0.2" if paged else "auto")
    llm = LLM(model=str(path), max_model_len=256, max_num_seqs=8, seed=0, **kw)
    try:
        long_prompt = " ".join(PROMPTS)
        # Mixed: prompt-logprobs requests beside plain ones, and a prompt long enough to be chunked.
        with_lp = SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=TOP_K)
        plain = SamplingParams(temperature=0, max_tokens=4)
        prompts = [PROMPTS[0], long_prompt, PROMPTS[1], PROMPTS[2]]
        params = [with_lp, with_lp, plain, with_lp]
        outs = llm.generate(prompts, params, use_tqdm=False)
        check([o for o, p in zip(outs, params) if p is with_lp], path)
        assert outs[2].prompt_logprobs is None
        # The same greedy continuation as without prompt logprobs.
        again = llm.generate(prompts, plain, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in again]
    finally:
        llm.llm_engine.engine_core.shutdown()


def test_mlx_path_prompt_logprobs_equal_mlx_lm_with_chunked_prefill(qwen3_model, monkeypatch):
    run(qwen3_model, monkeypatch, paged=False, max_num_batched_tokens=24, enable_chunked_prefill=True)


def test_paged_path_prompt_logprobs_equal_mlx_lm_with_prefix_caching_on(qwen3_model, monkeypatch):
    # vLLM skips reading the prefix cache for these requests; the second round's plain requests may hit it.
    run(qwen3_model, monkeypatch, paged=True, max_num_batched_tokens=24, enable_prefix_caching=True)
