"""Speculative decoding with a draft model on the MLX-managed and paged paths (vmetal/engine/runner/draft_model.py),
through vLLM's `LLM`.

The target is the tiny Qwen3; the draft is the same checkpoint cut to its first layer, so its greedy tokens
agree with the target's often but not always and drafts are both accepted and rejected (vLLM's counters, as the
runner reports them, show both). What a user would notice: greedy output identical to mlx-lm's on the target,
sampled requests keeping their distribution and their seeds, and a draft that cannot serve refused at start.
"""

from __future__ import annotations

import json

import pytest

from tests.engine.test_speculative import (
    REPEATING,
    TOKENS,
    _same_distribution,
    assert_greedy_like_mlx_while_drafts_are_kept_and_rejected,
    assert_seeded_sampling_reproducible,
    spec_counts,
)
from tests.support.engine import PROMPTS, assert_greedy_like_mlx, assert_joining_requests_like_mlx, greedy, running_llm

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("launch_thread_on")]


@pytest.fixture(scope="module")
def draft(qwen3_model, tmp_path_factory):
    from tests.support.families import first_layers

    return first_layers(qwen3_model, tmp_path_factory.mktemp("draft") / "qwen3-1-layer", 1)


def config(draft_path, k: int = 3) -> dict:
    return {"model": str(draft_path), "num_speculative_tokens": k}


@pytest.fixture(scope="module")
def llm(qwen3_model, draft):
    with running_llm(qwen3_model, max_model_len=256, max_num_seqs=8, seed=0, speculative_config=config(draft)) as llm:
        yield llm


def test_greedy_with_drafts_accepted_and_rejected_matches_mlx_lm(llm, qwen3_model):
    """With a launch thread (this module's engines, a GPU's default) the drafts and their verify forward are
    queued at the end of the step before."""
    assert_greedy_like_mlx_while_drafts_are_kept_and_rejected(llm, qwen3_model, queued_ahead=True)


def test_requests_joining_while_others_speculate_match_mlx_lm(llm, qwen3_model):
    assert_joining_requests_like_mlx(qwen3_model, llm, "draft-join", max_tokens=TOKENS)


def test_the_target_as_its_own_draft_has_every_draft_accepted(qwen3_model, monkeypatch):
    """The draft's cache follows the request through accepted drafts: with the target itself drafting, every
    draft is the target's own greedy token. Launched on the engine's thread (VLLM_METAL_LAUNCH_THREAD=0, this
    CPU's default), the drafts are made when vLLM asks for them and none is queued ahead."""
    monkeypatch.setenv("VLLM_METAL_LAUNCH_THREAD", "0")
    with running_llm(qwen3_model, max_model_len=256, max_num_seqs=4, seed=0,
                     speculative_config=config(qwen3_model, 4)) as llm:
        outs = llm.generate(PROMPTS[:3], greedy(TOKENS), use_tqdm=False)
        assert_greedy_like_mlx(qwen3_model, outs, TOKENS)
        counts = spec_counts(llm)
        steps = llm.collective_rpc("step_counts")[0]
    assert counts["num_draft_tokens"] > 0 and counts["num_accepted_tokens"] == counts["num_draft_tokens"]
    assert "spec_ahead_used" not in steps and "thread_launches" not in steps, steps


@pytest.mark.parametrize("paged", [False, True], ids=["mlx", "paged"])
def test_drafts_cut_short_by_the_step_budget_keep_tokens_exact(qwen3_model, draft, monkeypatch, paged):
    """A 9-token step budget for four requests of three drafts makes vLLM cut some drafts short or leave
    requests out of a step: the draft caches and the target's (its own caches, or the paged pools' verify rows)
    follow what was scheduled, and greedy output is mlx-lm's."""
    if paged:
        monkeypatch.setenv("VLLM_METAL_USE_PAGED_ATTENTION", "1")
    with running_llm(qwen3_model, max_model_len=256, max_num_seqs=4, seed=0, speculative_config=config(draft),
                     max_num_batched_tokens=9) as budget:
        outs = budget.generate(PROMPTS[:4], greedy(TOKENS), use_tqdm=False)
        counts = spec_counts(budget)
    assert_greedy_like_mlx(qwen3_model, outs, TOKENS)
    assert 0 < counts["num_accepted_tokens"] < counts["num_draft_tokens"], counts


def test_a_draft_model_on_the_paged_path_matches_mlx_lm(qwen3_model, draft, monkeypatch):
    """On the paged path the target verifies a draft model's tokens as it does n-gram drafts (query rows of the
    step's packed forward, a rejected draft's slot written again later) while the draft keeps its own caches:
    greedy output is mlx-lm's with drafts kept and rejected, requests joining mid-decode too, and a seeded
    sampled request reproduces its tokens. A request that gets no drafts (it asks for logprobs) decodes alone
    through the paged path's compiled step."""
    from vllm import SamplingParams

    monkeypatch.setenv("VLLM_METAL_USE_PAGED_ATTENTION", "1")
    with running_llm(qwen3_model, max_model_len=256, max_num_seqs=8, seed=0, speculative_config=config(draft)) as paged:
        assert_greedy_like_mlx_while_drafts_are_kept_and_rejected(paged, qwen3_model, queued_ahead=False)
        assert_joining_requests_like_mlx(qwen3_model, paged, "paged-draft-join", max_tokens=TOKENS)
        assert_seeded_sampling_reproducible(paged)
        before = spec_counts(paged)
        plain = paged.generate(PROMPTS[:1], SamplingParams(temperature=0.0, max_tokens=12, logprobs=1,
                                                           ignore_eos=True), use_tqdm=False)
        assert spec_counts(paged) == before
        counts = paged.collective_rpc("step_counts")[0]
    assert_greedy_like_mlx(qwen3_model, plain, 12)
    # Kept by the paged runner alone: its steps, speculating ones included, went through the compiled step.
    assert counts.get("decode_compiled", 0) > 0 and counts.get("verify_compiled", 0) > 0, counts


def test_sampled_requests_keep_their_distribution_and_their_seeds(llm, qwen3_model):
    """Greedy drafts are a function of the context, so the rejection rule of n-gram drafts applies
    (tests/unit/test_rejection_sampling.py): over 300 seeds the tokens at each position are distributed as
    without speculation, and a seeded request draws the same tokens beside other requests."""
    from vllm import SamplingParams

    params = [SamplingParams(temperature=0.6, top_p=0.9, seed=1000 + i, max_tokens=8, ignore_eos=True)
              for i in range(300)]
    before = spec_counts(llm)
    speculated = [list(o.outputs[0].token_ids) for o in llm.generate([REPEATING] * 300, params, use_tqdm=False)]
    after = spec_counts(llm)
    assert 0 < after["num_accepted_tokens"] - before["num_accepted_tokens"] < \
        after["num_draft_tokens"] - before["num_draft_tokens"]
    with running_llm(qwen3_model, max_model_len=256, max_num_seqs=8, seed=0) as plain:
        alone = [list(o.outputs[0].token_ids) for o in plain.generate([REPEATING] * 300, params, use_tqdm=False)]
    assert speculated != alone
    assert _same_distribution(speculated, alone)
    seeded = params[0]
    mixed = llm.generate([PROMPTS[1], REPEATING], [greedy(TOKENS), seeded], use_tqdm=False)
    assert list(mixed[1].outputs[0].token_ids) == speculated[0]


def test_a_draft_with_another_vocabulary_is_refused_at_start(qwen3_model, draft, tmp_path):
    """vLLM's own check, before vmetal's (`features.draft_refusal`, which `vmetal serve` runs first)."""
    import shutil

    other = tmp_path / "other-vocab"
    shutil.copytree(draft, other)
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "vocab_size": cfg["vocab_size"] + 64}))
    with pytest.raises(Exception, match="Target and draft model should have the same vocabulary size"):
        with running_llm(qwen3_model, max_model_len=128, speculative_config=config(other)):
            pass


def test_a_draft_whose_cache_cannot_roll_back_is_refused_at_start(qwen3_model, tmp_path):
    """A recurrent layer's state (LFM2's short convolutions) cannot give rejected drafts back."""
    from tests.support.families import build_family

    hybrid = build_family(tmp_path / "lfm2", "lfm2")
    with pytest.raises(Exception, match=r"lfm2 \(Lfm2ForCausalLM\): a draft model rolls its rejected drafts "
                                        r"back out of its own cache, and this model also keeps ArraysCache state"):
        with running_llm(qwen3_model, max_model_len=128, speculative_config=config(hybrid)):
            pass


@pytest.mark.parametrize("family", ["gemma3_text", "gpt_oss"])
def test_a_sliding_window_draft_drafts_past_its_window(tmp_path, monkeypatch, family):
    """A draft with sliding-window layers (Gemma 3; gpt-oss with its sinks; windows of 8 tokens, 48 generated)
    keeps a whole cache for them, which trims, masked to the window as mlx-lm masks its rotating cache: drafting
    for itself (its target, on the paged path, which lets sliding targets speculate), every draft is the
    target's own greedy token long after the windows first slide, and greedy output is mlx-lm's."""
    from tests.support.families import build_family

    path = build_family(tmp_path / family, family)
    monkeypatch.setenv("VLLM_METAL_USE_PAGED_ATTENTION", "1")
    with running_llm(path, max_model_len=256, max_num_seqs=4, seed=0, speculative_config=config(path)) as llm:
        outs = llm.generate(PROMPTS[:3], greedy(TOKENS), use_tqdm=False)
        counts = spec_counts(llm)
    assert_greedy_like_mlx(path, outs, TOKENS)
    assert counts["num_draft_tokens"] > 0 and counts["num_accepted_tokens"] == counts["num_draft_tokens"], counts
