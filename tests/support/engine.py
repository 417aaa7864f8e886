"""What the engine-path tests share: prompts, vLLM's `LLM` started and stopped, and mlx-lm's own greedy
tokens and prompt logprobs as the references every path must match."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

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


def assert_split_like_mlx(path, **parallel) -> None:
    """`LLM` with the `parallel` sizes (tensor_parallel_size=2, ...) gives mlx-lm's whole-model greedy tokens."""
    with running_llm(path, max_model_len=256, seed=0, **parallel) as llm:
        assert_greedy_like_mlx(path, llm.generate(PROMPTS[:3], greedy(10), use_tqdm=False), 10)


def assert_refused_before_start(path, words: str, **parallel) -> None:
    """`LLM` with the `parallel` sizes stops in vLLM's config step with an error matching `words`."""
    import pytest

    with pytest.raises(Exception, match=words):
        with running_llm(path, max_model_len=256, **parallel):
            pass


def metric(llm, name: str) -> float:
    return sum(m.value for m in llm.get_metrics() if m.name == name)


def assert_step_times_split(llm) -> None:
    """The runner's own timer (`MetalWorker.step_times`) sees the steps the scheduler ran, each split into its
    phases: every token of three requests came from one timed step (requests reach the engine process one by
    one, so the first steps may hold fewer rows), and most steps decoded all three together."""
    llm.collective_rpc("step_times", kwargs={"clear": True})
    llm.generate(PROMPTS[:3], greedy(16), use_tqdm=False)
    summary = llm.collective_rpc("step_times")[0]
    assert sum(rows * s["steps"] for kind in summary.values() for rows, s in kind.items()) == 3 * 16
    step = summary["decode"][3]
    assert step["steps"] >= 12
    assert step["build_ms"] > 0 and step["vllm_ms"] > 0 and step["host_cpu_ms"] > 0
    for phase in ("build_ms", "launch_ms", "wait_ms", "vllm_ms", "host_cpu_ms"):
        assert step[phase] < step["cycle_ms"], phase


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
        assert token_ids == mlx_greedy(path, prompt_ids, max_tokens, ignore_eos=True)


_mlx_cache: dict = {}


def mlx_greedy(path: Path, prompt_ids: list[int], max_tokens: int, ignore_eos: bool = False) -> list[int]:
    """mlx-lm's own greedy generation: the reference every engine path must match. `ignore_eos`: past an
    end-of-sequence token too (mlx-lm's `generate_step`, which never stops early), for requests that ask vLLM
    to ignore it; else it stops there, as `mlx_lm.generate` does."""
    from mlx_lm.generate import generate_step, stream_generate

    model, tokenizer = _mlx_model(path)
    if ignore_eos:
        import mlx.core as mx

        steps = generate_step(mx.array(prompt_ids), model, max_tokens=max_tokens)
        return [int(token) for token, _ in steps][:max_tokens]
    out = []
    for resp in stream_generate(model, tokenizer, prompt=prompt_ids, max_tokens=max_tokens):
        out.append(int(resp.token))
    return out[:max_tokens]



def sampled_logprobs_reference(path, prompt_ids: list[int], token_ids: list[int]) -> list[float]:
    """mlx-lm's log-softmax of each generated token, from one forward of the model over prompt + output."""
    import mlx.core as mx

    model, _ = _mlx_model(path)
    logits = model(mx.array(list(prompt_ids) + list(token_ids[:-1]))[None])[0].astype(mx.float32)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    first = len(prompt_ids) - 1
    return [logprobs[first + i, t].item() for i, t in enumerate(token_ids)]


def _mlx_model(path):
    from mlx_lm import load

    return _mlx_cache.get(str(path)) or _mlx_cache.setdefault(str(path), load(str(path)))


def prompt_logprobs_reference(path, prompt_ids: list[int], top_k: int) -> list[tuple[float, int, list[int]]]:
    """(logprob of the next prompt token, its 1-based rank, top-k ids) for positions 0..n-2."""
    import mlx.core as mx
    from mlx_lm import load

    model, _ = load(str(path))
    logits = model(mx.array(prompt_ids)[None])[0].astype(mx.float32)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    out = []
    for i in range(len(prompt_ids) - 1):
        row = logprobs[i]
        target = prompt_ids[i + 1]
        lp = row[target].item()
        rank = int(mx.sum(row > lp).item()) + 1
        top = mx.argsort(-row)[:top_k].tolist()
        out.append((lp, rank, top))
    return out
