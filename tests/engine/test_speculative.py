"""N-gram speculative decoding on the MLX-managed path (vmetal/engine/runner/speculative.py), through vLLM's `LLM`.

What a user would notice: greedy output identical to mlx-lm's token for token while drafts are proposed,
accepted and rejected (vLLM's own spec-decode counters prove each happened), through concurrency, requests
joining mid-decode, preemption and a grammar-constrained neighbour; a sampled request gets the very tokens it
gets without speculation; a model whose cache cannot roll back is refused when the engine starts.
"""

from __future__ import annotations

import pytest

from tests.support.engine import (
    PROMPTS,
    assert_greedy_like_mlx,
    assert_joining_requests_like_mlx,
    greedy,
    running_llm,
)

pytestmark = pytest.mark.slow

SPEC = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 1}
# A prompt that repeats itself, and tokens enough for the tiny random model to fall into loops: drafts both
# accepted and rejected.
REPEATING = "one two three four five six seven " * 3
TOKENS = 48


def spec_counts(llm) -> dict[str, int]:
    """Draft tokens checked and accepted by this engine's runner (`MetalWorker.step_counts`: vLLM's Prometheus
    counters are the process's, shared by every engine a test module starts; /metrics is tested over HTTP)."""
    counts = llm.collective_rpc("step_counts")[0]
    return {"num_draft_tokens": counts.get("spec_draft_tokens", 0),
            "num_accepted_tokens": counts.get("spec_accepted_tokens", 0)}


@pytest.fixture(scope="module")
def llm(qwen3_model):
    with running_llm(qwen3_model, max_model_len=256, max_num_seqs=8, seed=0, speculative_config=SPEC,
                     disable_log_stats=False) as llm:
        yield llm


def test_greedy_with_drafts_accepted_and_rejected_matches_mlx_lm(llm, qwen3_model):
    before = spec_counts(llm)
    outs = llm.generate([REPEATING, *PROMPTS], greedy(TOKENS), use_tqdm=False)
    assert_greedy_like_mlx(qwen3_model, outs, TOKENS)
    after = spec_counts(llm)
    drafted = after["num_draft_tokens"] - before["num_draft_tokens"]
    accepted = after["num_accepted_tokens"] - before["num_accepted_tokens"]
    assert 0 < accepted < drafted, (accepted, drafted)  # some drafts kept, some rolled back


def test_requests_joining_while_others_speculate_match_mlx_lm(llm, qwen3_model):
    assert_joining_requests_like_mlx(qwen3_model, llm, "spec-join", max_tokens=TOKENS)


def test_a_sampled_request_gets_the_tokens_it_gets_without_speculation(llm, qwen3_model):
    """Only greedy requests speculate; a seeded sampled one beside them decodes as it would alone."""
    from vllm import SamplingParams

    sampled = SamplingParams(temperature=0.9, top_p=0.95, seed=7, max_tokens=24, ignore_eos=True)
    prompts = [REPEATING, PROMPTS[1], REPEATING]
    mixed = llm.generate(prompts, [greedy(TOKENS), sampled, greedy(TOKENS)], use_tqdm=False)
    assert_greedy_like_mlx(qwen3_model, [mixed[0], mixed[2]], TOKENS)
    with running_llm(qwen3_model, max_model_len=256, max_num_seqs=8, seed=0) as plain:
        alone = plain.generate([PROMPTS[1]], sampled, use_tqdm=False)
    assert list(mixed[1].outputs[0].token_ids) == list(alone[0].outputs[0].token_ids)


def test_a_grammar_constrained_request_beside_speculating_ones(llm, qwen3_model):
    """vLLM lays the grammar's bitmask out with a row per verified position; the runner has one row per request
    (tests/engine/test_structured_output.py covers the grammar itself)."""
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    choice = SamplingParams(temperature=0.0, max_tokens=16,
                            structured_outputs=StructuredOutputsParams(choice=["alpha beta", "gamma"]))
    outs = llm.generate([REPEATING, REPEATING, PROMPTS[2]], [greedy(TOKENS), greedy(TOKENS), choice],
                        use_tqdm=False)
    assert outs[2].outputs[0].text in ("alpha beta", "gamma")
    assert_greedy_like_mlx(qwen3_model, outs[:2], TOKENS)


def test_preemption_while_speculating_keeps_outputs_exact(qwen3_model):
    from vmetal.engine import models

    per_token = models.load(str(qwen3_model)).kv_bytes_per_token
    with running_llm(qwen3_model, max_model_len=128, max_num_seqs=8, kv_cache_memory_bytes=per_token * 192,
                     block_size=16, speculative_config=SPEC, disable_log_stats=False) as llm:
        outs = llm.generate([REPEATING, *PROMPTS[:5]], greedy(TOKENS), use_tqdm=False)
        assert_greedy_like_mlx(qwen3_model, outs, TOKENS)
        assert llm.collective_rpc("step_counts")[0].get("preempted", 0) > 0
        assert spec_counts(llm)["num_accepted_tokens"] > 0


def test_a_model_whose_cache_cannot_roll_back_is_refused_at_start(tmp_path):
    """A sliding-window cache that wraps cannot give rejected drafts back."""
    from tests.support.families import build_family

    path = build_family(tmp_path / "gemma3", "gemma3_text")
    with pytest.raises(Exception, match=r"gemma3_text \(Gemma3ForCausalLM\): n-gram speculation "
                                        r"\(`--speculative-config`\) rolls rejected tokens back out of the KV cache, "
                                        "and this model also keeps RotatingKVCache state"):
        with running_llm(path, max_model_len=128, speculative_config=SPEC):
            pass
