"""Tensor parallel through vLLM's `LLM(..., tensor_parallel_size=2)` (issue 16): two `MetalWorker` processes
under vLLM's `mp` executor, the model split by mlx-lm's `shard` over MLX's ring (CPU backend, 127.0.0.1).

What a user would notice: greedy tokens equal to mlx-lm's unsplit model on both KV paths and for an MoE
family; each rank holding half the KV heads (what makes a model larger than one Mac fit across two); and
sampled tokens that stay coherent, which needs rank 0's tokens broadcast: the ranks' random generators are
made to differ here, so a rank sampling on its own would feed a different token into the shared forward and
the logprobs reported would no longer be the model's (compared, teacher-forced, with mlx-lm's).
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


@pytest.fixture(autouse=True)
def plugin_env(monkeypatch):
    monkeypatch.setenv("VMETAL_ENABLE", "1")
    # `collective_rpc` with a function (the reseeding below) pickles it to the workers.
    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")


def _reseed_per_rank(worker) -> int:
    """Run in each worker: a torch generator seeded by rank, so unseeded sampling differs between ranks."""
    import torch

    torch.manual_seed(1000 + worker.rank)
    return worker.rank


@pytest.mark.parametrize("paged", [False, True], ids=["mlx-kv", "paged-kv"])
def test_two_ranks_generate_what_the_unsplit_model_does(qwen3_model, monkeypatch, paged):
    if paged:
        monkeypatch.setenv("VLLM_METAL_USE_PAGED_ATTENTION", "1")
    with running_llm(qwen3_model, max_model_len=256, tensor_parallel_size=2, seed=0) as llm:
        inspections = llm.collective_rpc("get_model_inspection")
        assert len(inspections) == 2 and all("1 KV heads x 16" in i for i in inspections), inspections
        outs = llm.generate(PROMPTS[:4], greedy(12), use_tqdm=False)
        assert_greedy_like_mlx(qwen3_model, outs, 12)

        from vllm import SamplingParams

        assert sorted(llm.collective_rpc(_reseed_per_rank)) == [0, 1]
        params = SamplingParams(temperature=1.0, max_tokens=10, logprobs=0, ignore_eos=True)
        for out in llm.generate(PROMPTS[:3], params, use_tqdm=False):
            got = out.outputs[0]
            reported = [lp[t].logprob for lp, t in zip(got.logprobs, got.token_ids)]
            want = sampled_logprobs_reference(qwen3_model, out.prompt_token_ids, list(got.token_ids))
            assert reported == pytest.approx(want, abs=1e-3), (got.token_ids, reported, want)


@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_two_ranks_split_other_families(request, tmp_path_factory, family):
    from tests.support.families import build_family

    path = (request.getfixturevalue("llama_model") if family == "llama" else
            build_family(tmp_path_factory.mktemp("moe") / family, family))
    assert_split_like_mlx(path, tensor_parallel_size=2)


def test_a_family_mlx_lm_cannot_split_is_refused_before_any_worker_starts(tmp_path_factory):
    from tests.support.families import build_family

    path = build_family(tmp_path_factory.mktemp("glm") / "glm4", "glm4")
    assert_refused_before_start(path, r"mlx_lm\.models\.glm4` model has no `shard`", tensor_parallel_size=2)
