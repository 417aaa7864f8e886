"""Every OpenAI-exposed SamplingParams field, through vLLM's `LLM` on our platform."""

from __future__ import annotations

import math

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("launch_thread_on")]

PROMPT = "The old teacher opens the blue door and the old teacher reads the blue book"


@pytest.fixture(scope="module")
def llm(qwen3_model):
    from vllm import LLM

    engine = LLM(model=str(qwen3_model), max_model_len=256, max_num_seqs=16, seed=0)
    yield engine
    engine.llm_engine.engine_core.shutdown()


def sp(**kw):
    from vllm import SamplingParams

    kw.setdefault("max_tokens", 16)
    kw.setdefault("ignore_eos", True)
    return SamplingParams(**kw)


def run(llm, params, prompts=(PROMPT,)):
    return llm.generate(list(prompts), params, use_tqdm=False)


def tokens(out, i=0):
    return list(out.outputs[i].token_ids)


@pytest.fixture(scope="module")
def greedy_tokens(llm):
    return tokens(run(llm, sp(temperature=0.0))[0])


def test_seeded_sampling_is_reproducible_and_seed_dependent(llm):
    a = tokens(run(llm, sp(temperature=1.0, seed=42))[0])
    b = tokens(run(llm, sp(temperature=1.0, seed=42))[0])
    c = tokens(run(llm, sp(temperature=1.0, seed=7))[0])
    assert a == b
    assert a != c


def test_seeded_request_is_unaffected_by_its_batch_neighbours(llm):
    alone = tokens(run(llm, sp(temperature=0.8, seed=3))[0])
    crowd = run(llm, sp(temperature=0.8, seed=3), prompts=[PROMPT, "Hello world", "A small dog"])
    assert tokens(crowd[0]) == alone


def test_n_returns_n_distinct_samples(llm):
    out = run(llm, sp(temperature=1.0, n=3, seed=1))[0]
    assert len(out.outputs) == 3
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1


def test_max_tokens_and_finish_reason(llm):
    out = run(llm, sp(temperature=0.0, max_tokens=5))[0]
    assert len(out.outputs[0].token_ids) == 5
    assert out.outputs[0].finish_reason == "length"


def test_stop_string_truncates_output(llm):
    full = run(llm, sp(temperature=0.0, max_tokens=24))[0].outputs[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop.strip() and full.find(stop) > 0
    out = run(llm, sp(temperature=0.0, max_tokens=24, stop=[stop]))[0].outputs[0]
    assert out.text == full[: full.find(stop)]
    assert out.finish_reason == "stop"


def test_stop_token_ids_end_generation(llm, greedy_tokens):
    stop_id = greedy_tokens[4]
    out = run(llm, sp(temperature=0.0, stop_token_ids=[stop_id]))[0].outputs[0]
    assert out.finish_reason == "stop"
    first = greedy_tokens.index(stop_id)
    assert tokens_before_stop(out) == greedy_tokens[:first]


def tokens_before_stop(output):
    ids = list(output.token_ids)
    return ids[:-1] if output.stop_reason == ids[-1] else ids


@pytest.mark.parametrize("params", [
    dict(temperature=1.0, top_k=1),
    dict(temperature=1.0, top_p=1e-6),
    dict(temperature=1.0, min_p=0.999),
])
def test_filters_that_keep_only_the_top_token_equal_greedy(llm, greedy_tokens, params):
    assert tokens(run(llm, sp(seed=5, **params))[0]) == greedy_tokens


def test_logit_bias_forces_a_token(llm):
    out = run(llm, sp(temperature=0.0, logit_bias={77: 100.0}, max_tokens=6))[0]
    assert tokens(out) == [77] * 6


def test_allowed_token_ids_restrict_the_vocabulary(llm):
    allowed = [40, 41, 42]
    out = run(llm, sp(temperature=1.0, seed=0, allowed_token_ids=allowed))[0]
    assert set(tokens(out)) <= set(allowed)


def penalised_greedy_reference(path, prompt_ids, n, *, bias=None, repetition=1.0, presence=0.0,
                               frequency=0.0):
    """Greedy decoding with OpenAI/vLLM penalty semantics, straight on mlx-lm's model."""
    import mlx.core as mx
    import numpy as np
    from mlx_lm import load

    model, _ = load(str(path))
    out: list[int] = []
    for _ in range(n):
        logits = np.array(model(mx.array([prompt_ids + out]))[0, -1].astype(mx.float32))
        for t, b in (bias or {}).items():  # vLLM applies logit bias before penalties
            logits[t] += b
        seen = set(prompt_ids) | set(out)
        for t in seen:  # repetition: prompt and output tokens, divide positive logits
            logits[t] = logits[t] / repetition if logits[t] > 0 else logits[t] * repetition
        for t in set(out):  # presence / frequency: output tokens only
            logits[t] -= presence + frequency * out.count(t)
        out.append(int(np.argmax(logits)))
    return out


@pytest.mark.parametrize("penalty,kw", [
    (dict(repetition_penalty=1.8), dict(repetition=1.8)),
    # A logit bias makes token 77 recur, so the output penalties have work to do.
    (dict(presence_penalty=1.5, logit_bias={77: 10.0}), dict(presence=1.5, bias={77: 10.0})),
    (dict(frequency_penalty=1.5, logit_bias={77: 10.0}), dict(frequency=1.5, bias={77: 10.0})),
])
def test_penalties_follow_their_definition(llm, qwen3_model, penalty, kw):
    out = run(llm, sp(temperature=0.0, max_tokens=16, **penalty))[0]
    expected = penalised_greedy_reference(qwen3_model, out.prompt_token_ids, 16, **kw)
    unpenalised = penalised_greedy_reference(qwen3_model, out.prompt_token_ids, 16, bias=kw.get("bias"))
    assert expected != unpenalised, "the penalty must matter on this prompt"
    assert tokens(out) == expected


def test_logprobs_with_top_k_alternatives(llm, greedy_tokens):
    out = run(llm, sp(temperature=0.0, logprobs=4))[0].outputs[0]
    assert list(out.token_ids) == greedy_tokens
    assert len(out.logprobs) == len(out.token_ids)
    for token_id, position in zip(out.token_ids, out.logprobs):
        assert len(position) >= 4
        values = [lp.logprob for lp in position.values()]
        assert all(v <= 1e-6 for v in values)
        # Greedy picked the most likely token, and probabilities sum to <= 1.
        assert position[token_id].logprob == pytest.approx(max(values), abs=1e-4)
        assert position[token_id].rank == 1
        assert sum(math.exp(v) for v in values) <= 1.0 + 1e-4


def test_seeded_sampling_is_the_same_with_chunked_prefill(qwen3_model, llm):
    """vLLM's sampler draws for a prompt chunk that does not reach the end of its prompt too (its row is in the
    batch); the runner gives a seeded request's generator back as it was, so chunked prefill does not shift
    the request's draws. Fails when the generator's state is not restored."""
    from tests.support.engine import LONG_PROMPT, running_llm

    params = sp(temperature=1.0, seed=11, max_tokens=8)
    whole = tokens(run(llm, params, prompts=[LONG_PROMPT])[0])
    with running_llm(qwen3_model, max_model_len=256, max_num_seqs=4, max_num_batched_tokens=32, seed=0) as chunked:
        assert len(chunked.get_tokenizer().encode(LONG_PROMPT)) > 2 * 32  # at least three chunks
        assert tokens(run(chunked, params, prompts=[LONG_PROMPT])[0]) == whole
