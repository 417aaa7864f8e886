"""The PyTorch compute path (`VLLM_METAL_USE_MLX=0`): same engine, forward in torch, greedy equal to mlx-lm.

One engine for the module, set up so that every test also goes through chunked prefill (a 32-token
step budget) and preemption (KV for 160 tokens, 8 requests of up to 48).
"""

from __future__ import annotations

import math

import pytest

from tests.support.engine import (
    LONG_PROMPT,
    PROMPTS,
    assert_greedy_like_mlx,
    assert_joining_requests_like_mlx,
    greedy,
    mlx_greedy,
    running_llm,
)

MAX_MODEL_LEN = 128
KV_TOKENS = 160


# ------------------------------------------------------------------ no engine
@pytest.mark.parametrize("env, variable", [
    ({"VLLM_METAL_USE_MLX": "0", "VLLM_METAL_USE_PAGED_ATTENTION": "1"}, "VLLM_METAL_USE_PAGED_ATTENTION"),
    ({"VLLM_METAL_USE_MLX": "false", "VLLM_METAL_PREFIX_CACHE": "yes"}, "VLLM_METAL_PREFIX_CACHE"),
])
def test_torch_path_refuses_what_it_does_not_have(env, variable):
    from vmetal import envs

    cfg = envs.load_config(env)
    with pytest.raises(envs.EnvError) as err:
        envs.check_available(cfg)
    assert err.value.variable == variable
    message = str(err.value)
    assert f"{variable}={env[variable]} with VLLM_METAL_USE_MLX={env['VLLM_METAL_USE_MLX']}" in message
    assert message.endswith(f"unset {variable}")
    if variable == "VLLM_METAL_USE_PAGED_ATTENTION":
        assert "the PyTorch path runs with the MLX-managed KV layout only" in message


def test_torch_path_alone_is_available():
    from vmetal import envs

    envs.check_available(envs.load_config({"VLLM_METAL_USE_MLX": "0"}))


def test_batched_decode_equals_each_row_alone(qwen3_model):
    """Left-padded batched decode, rows joining, leaving and being extracted, vs one request at a time."""
    import torch
    from transformers import AutoModelForCausalLM

    from vmetal.engine.runner.torch_runner import TorchDecodeBatch, _new_cache, prefill

    model = AutoModelForCausalLM.from_pretrained(str(qwen3_model), dtype=torch.float32).eval()
    prompts = {"a": [5, 9, 11, 40, 41, 7, 8, 100], "b": [12], "c": [30, 31, 32, 33], "d": [77, 78]}

    def alone(ids, steps):
        cache, out = _new_cache(model), []
        logits = prefill(model, cache, ids, 0)
        for _ in range(steps):
            out.append(int(logits.argmax()))
            logits = prefill(model, cache, [out[-1]], len(ids) + len(out) - 1)
        return out

    with torch.inference_mode():
        want = {r: alone(ids, 6) for r, ids in prompts.items()}
        batch, got, last = TorchDecodeBatch(model), {r: [] for r in prompts}, {}

        def join(r):
            cache = _new_cache(model)
            last[r] = int(prefill(model, cache, prompts[r], 0).argmax())
            got[r].append(last[r])
            batch.add(r, cache)

        def step():
            rows = list(batch.req_ids)
            logits = batch.forward(model, [last[r] for r in rows])
            for i, r in enumerate(rows):
                last[r] = int(logits[i].argmax())
                got[r].append(last[r])

        join("b")
        step()
        join("a")  # longer than the batch: existing rows get more left padding
        step()
        join("c")
        step()
        paused = batch.extract("a")  # the widest row leaves: padding is trimmed
        assert batch.width == max(batch.lengths)
        join("d")
        step()
        batch.add("a", paused)
        step()
        batch.remove({"b"})
        while any(len(got[r]) < 6 for r in batch.req_ids):
            step()
    for r in prompts:
        assert got[r][:6] == want[r], r


# ---------------------------------------------------------------- the engine
@pytest.fixture(scope="module")
def engine(qwen3_model):
    from vmetal import envs
    from vmetal.engine import models

    per_token = models.load(str(qwen3_model)).kv_bytes_per_token
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_METAL_USE_MLX", "0")
        envs.get_config.cache_clear()
        try:
            with running_llm(qwen3_model, max_model_len=MAX_MODEL_LEN, max_num_seqs=8,
                             max_num_batched_tokens=32, enable_chunked_prefill=True,
                             kv_cache_memory_bytes=per_token * KV_TOKENS, block_size=16,
                             disable_log_stats=False, seed=0) as llm:
                yield qwen3_model, llm
        finally:
            envs.get_config.cache_clear()


@pytest.mark.slow
def test_the_engine_computes_with_torch(engine):
    _, llm = engine
    (inspection,) = llm.collective_rpc("get_model_inspection")
    assert "transformers" in inspection and "(torch cpu" in inspection, inspection


@pytest.mark.slow
def test_greedy_matches_mlx_lm_one_at_a_time(engine):
    path, llm = engine
    for prompt in PROMPTS[:3]:
        assert_greedy_like_mlx(path, llm.generate([prompt], greedy(), use_tqdm=False), 12)


@pytest.mark.slow
def test_eight_concurrent_requests_match_mlx_lm_through_preemption(engine):
    path, llm = engine
    # The engine's own count: vLLM's Prometheus counters of this LLM are unregistered once another LLM starts
    # in the process (another test's may, in whatever order the tests run).
    before = llm.collective_rpc("step_counts")[0].get("preempted", 0)
    outs = llm.generate(PROMPTS, greedy(40), use_tqdm=False)
    assert len(outs) == 8
    assert_greedy_like_mlx(path, outs, 40)
    assert llm.collective_rpc("step_counts")[0].get("preempted", 0) > before  # 8 x ~45 tokens: KV for 160


@pytest.mark.slow
def test_chunked_prefill_of_a_long_prompt_matches(engine):
    path, llm = engine
    outs = llm.generate([LONG_PROMPT, "Hello world"], greedy(10), use_tqdm=False)
    assert len(outs[0].prompt_token_ids) > 32  # the step budget: prefilled in chunks
    assert_greedy_like_mlx(path, outs, 10)


@pytest.mark.slow
def test_requests_joining_mid_decode_match_mlx_lm(engine):
    assert_joining_requests_like_mlx(*engine, "torch-join")


@pytest.mark.slow
def test_seeded_sampling_is_reproducible_alone_and_in_a_batch(engine):
    from vllm import SamplingParams

    _, llm = engine
    params = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=1234, max_tokens=16,
                            ignore_eos=True)
    first = llm.generate([PROMPTS[1]], params, use_tqdm=False)[0].outputs[0].token_ids
    again = llm.generate([PROMPTS[1]], params, use_tqdm=False)[0].outputs[0].token_ids
    crowd = llm.generate([PROMPTS[1], *PROMPTS[3:7]],
                         [params] + [SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)] * 4,
                         use_tqdm=False)[0].outputs[0].token_ids
    assert list(first) == list(again) == list(crowd)
    other = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=4321, max_tokens=16, ignore_eos=True)
    assert list(llm.generate([PROMPTS[1]], other, use_tqdm=False)[0].outputs[0].token_ids) != list(first)


@pytest.mark.slow
def test_logprobs_are_returned_and_match_mlx(engine):
    import mlx.core as mx
    from mlx_lm import load

    path, llm = engine
    out = llm.generate([PROMPTS[0]], greedy(8, logprobs=3), use_tqdm=False)[0]
    tokens = list(out.outputs[0].token_ids)
    assert tokens == mlx_greedy(path, out.prompt_token_ids, 8)
    logprobs = out.outputs[0].logprobs
    assert logprobs is not None and len(logprobs) == len(tokens)
    for token, entry in zip(tokens, logprobs):
        assert token in entry and entry[token].rank == 1 and len(entry) >= 3
        assert all(lp.logprob <= 0.0 and math.isfinite(lp.logprob) for lp in entry.values())
    # The first token's log-probabilities against mlx-lm's, from the same prompt.
    model, _ = load(str(path))
    ref = model(mx.array([out.prompt_token_ids]))[0, -1].astype(mx.float32)
    ref = ref - mx.logsumexp(ref)
    for token, lp in logprobs[0].items():
        assert lp.logprob == pytest.approx(ref[token].item(), abs=1e-4)
