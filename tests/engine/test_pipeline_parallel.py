"""Pipeline parallel through vLLM's `LLM(..., pipeline_parallel_size=N)` (issue 16): one `MetalWorker` process
per stage under vLLM's `mp` executor, each holding a run of the layers, hidden states passed on over MLX's ring
(CPU backend, 127.0.0.1), only the last stage sampling.

What a user would notice: greedy tokens equal to mlx-lm's whole model (both KV paths, dense and MoE families,
more requests than fit one batch so that vLLM keeps two batches in flight, prompts cut in chunks); each
stage holding only its layers (what makes a bigger model fit across Macs); sampled tokens whose reported
logprobs are the model's (the first stage feeds the tokens the last one drew, which it learns from vLLM's
scheduler); and what the split does not cover refused before any worker starts.
"""

from __future__ import annotations

import pytest

from tests.support.engine import (
    PROMPTS,
    assert_greedy_like_mlx,
    assert_refused_before_start,
    assert_split_like_mlx,
    greedy,
    running_llm,
    sampled_logprobs_reference,
)

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("paged", [False, True], ids=["mlx-kv", "paged-kv"])
def test_two_stages_generate_what_the_whole_model_does(qwen3_model, monkeypatch, paged):
    if paged:
        monkeypatch.setenv("VLLM_METAL_USE_PAGED_ATTENTION", "1")
    # max_num_batched_tokens below the longest prompts: their prefill is cut in chunks across steps.
    with running_llm(qwen3_model, max_model_len=256, pipeline_parallel_size=2, seed=0,
                     max_num_batched_tokens=32, max_num_seqs=4) as llm:
        inspections = llm.collective_rpc("get_model_inspection")
        # The fixture's Qwen3 has 2 layers: one a stage.
        assert [i.split(": ")[1].split(",")[0] for i in inspections] == ["1 layers", "1 layers"], inspections
        prompts = PROMPTS[:6] + [" ".join(PROMPTS) * 2]
        outs = llm.generate(prompts, greedy(12), use_tqdm=False)
        assert_greedy_like_mlx(qwen3_model, outs, 12)

        from vllm import SamplingParams

        params = SamplingParams(temperature=1.0, max_tokens=10, logprobs=0, ignore_eos=True)
        for out in llm.generate(PROMPTS[:3], params, use_tqdm=False):
            got = out.outputs[0]
            reported = [lp[t].logprob for lp, t in zip(got.logprobs, got.token_ids)]
            want = sampled_logprobs_reference(qwen3_model, out.prompt_token_ids, list(got.token_ids))
            assert reported == pytest.approx(want, abs=1e-3), (got.token_ids, reported, want)


@pytest.mark.parametrize("family,stages", [("llama", 2), ("qwen3_moe", 2), ("qwen3", 3)])
def test_stages_of_other_families_and_sizes(request, tmp_path_factory, family, stages):
    from tests.support.families import build_family
    from vmetal.demo import build_tiny_model

    folder = tmp_path_factory.mktemp("pp") / family
    path = (request.getfixturevalue("llama_model") if family == "llama" else
            build_tiny_model(folder, "qwen3", hidden_size=64, num_layers=3) if family == "qwen3" else
            build_family(folder, family, num_hidden_layers=3))
    assert_split_like_mlx(path, pipeline_parallel_size=stages)


def test_a_family_the_split_does_not_cover_is_refused_before_any_worker_starts(tmp_path_factory):
    from tests.support.families import build_family

    path = build_family(tmp_path_factory.mktemp("glm") / "glm4", "glm4")
    assert_refused_before_start(path, r"mlx-lm's `glm4` model is not one vmetal splits into stages",
                                pipeline_parallel_size=2)
