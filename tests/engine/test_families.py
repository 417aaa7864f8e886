"""Model families beyond the demo's four, each a tiny random checkpoint built from mlx-lm's own model class
(`tests/support/families.py`), through vLLM's `LLM` on every KV path that serves it: greedy tokens equal to
mlx-lm's with eight requests at once and with requests joining mid-decode (rows merged into and taken out of
the decode batch), and each sampled token's logprob equal to mlx-lm's log-softmax. The logprobs are where a
family's own output code shows: a skipped Granite `logits_scaling` or Gemma 2 softcapping leaves greedy
tokens as they were (both are monotonic) and moves every logprob.

Which paths serve a family is the pre-flight's decision (`vmetal.preflight.cache_types`, from the caches and
attention mlx-lm's model makes); `PATHS` is what was measured here, and the first test holds the decision to it.
"""

from __future__ import annotations

import json
import math

import pytest

from tests.support.engine import (
    PROMPTS,
    assert_joining_requests_like_mlx,
    greedy,
    mlx_greedy,
    running_llm,
    sampled_logprobs_reference,
)
from tests.support.families import FAMILIES, build_family

pytestmark = pytest.mark.slow

# family -> the KV paths that serve it. Gemma 2 computes attention in its own code (softcapped scores): the paged
# path gives its attention class a paged `__call__` (`own_attention`); with grouped-query attention mlx-lm cannot
# batch it, so only the paged path serves the published models.
PATHS: dict[str, tuple[str, ...]] = {
    "qwen3_moe": ("mlx", "paged"),
    "mixtral": ("mlx", "paged"),
    "phi3": ("mlx", "paged"),
    "smollm3": ("mlx", "paged"),
    "granite": ("mlx", "paged"),
    "glm4": ("mlx", "paged"),
    "olmo2": ("mlx", "paged"),
    "deepseek_v2": ("mlx", "paged"),  # MLA: keys wider than values, pools of their own widths
    "gemma": ("mlx", "paged"),
    "gemma2": ("mlx", "paged"),
    "gemma2_gqa": ("paged",),
    # Sliding-window layers: mlx-lm's RotatingKVCache, merged into its BatchRotatingKVCache on the MLX path; on the
    # paged path KV cache groups of their own whose blocks vLLM frees past the window (gpt-oss: with its sinks).
    "gemma3_text": ("mlx", "paged"),
    "gemma3": ("mlx", "paged"),  # the multimodal wrappers, served for their text
    "qwen3_5": ("mlx",),
    "gpt_oss": ("mlx", "paged"),
    # Hybrids: recurrent layers keep mlx-lm's ArraysCache (a fixed-size state per request), merged into the
    # decode batch by its own `merge`; the paged path has no pools for such state.
    "lfm2": ("mlx",),
    "qwen3_next": ("mlx",),
    # Two caches a layer (mlx-lm's CacheList): the MLX-managed path merges each member by its own `merge`.
    "falcon_h1": ("mlx",),
}
RUNS = [(family, kv_path) for family, paths in PATHS.items() for kv_path in paths]
MAX_TOKENS = 12


def test_every_family_is_measured():
    assert set(PATHS) == set(FAMILIES)


@pytest.fixture(scope="session")
def family_dir(models_dir):
    built = {}

    def path_of(family: str):
        if family not in built:
            built[family] = build_family(models_dir / f"family-{family}", family)
        return built[family]

    return path_of


@pytest.mark.parametrize("family", sorted(PATHS))
def test_preflight_serves_each_family_on_its_measured_paths(family_dir, family):
    from vmetal.preflight.cache_types import model_state, servable_paths

    config = json.loads((family_dir(family) / "config.json").read_text())
    assert tuple(servable_paths(model_state(config))) == PATHS[family]


@pytest.fixture(scope="module", params=RUNS, ids=[f"{f}-{p}" for f, p in RUNS])
def engine(request, family_dir):
    family, kv_path = request.param
    path = family_dir(family)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_METAL_USE_PAGED_ATTENTION", "1" if kv_path == "paged" else "0")
        mp.setenv("VLLM_METAL_MEMORY_FRACTION", "0.2" if kv_path == "paged" else "auto")
        with running_llm(path, max_model_len=256, max_num_seqs=8, seed=0) as llm:
            yield path, llm, f"{family}-{kv_path}"


def test_concurrent_greedy_tokens_and_logprobs_equal_mlx_lm(engine):
    path, llm, _ = engine
    outs = llm.generate(PROMPTS, greedy(MAX_TOKENS, logprobs=1), use_tqdm=False)
    assert len(outs) == 8
    for out in outs:
        tokens = list(out.outputs[0].token_ids)
        assert tokens == mlx_greedy(path, out.prompt_token_ids, MAX_TOKENS, ignore_eos=True)
        want = sampled_logprobs_reference(path, out.prompt_token_ids, tokens)
        got = [step[token].logprob for step, token in zip(out.outputs[0].logprobs, tokens)]
        # float32 models: the same forward up to summation order.
        assert all(math.isclose(g, w, abs_tol=1e-4) for g, w in zip(got, want)), (got, want)


def test_requests_joining_mid_decode_equal_mlx_lm(engine):
    path, llm, tag = engine
    assert_joining_requests_like_mlx(path, llm, tag)


@pytest.mark.parametrize("family", ["gemma3_text", "qwen3_next", "falcon_h1"])
def test_sliding_and_recurrent_state_through_chunked_prefill_and_preemption(family_dir, family, monkeypatch):
    """The states that cannot roll back (a wrapped sliding window, a recurrent state): a long prompt prefilled in
    chunks of 32 tokens carries its state from chunk to chunk, and requests that vLLM preempts for want of KV
    start again on fresh caches (their state cannot be trimmed to what vLLM says is computed); tokens stay
    mlx-lm's."""
    from tests.support.engine import LONG_PROMPT, assert_greedy_like_mlx, metric
    from vmetal.engine import models

    # The MLX-managed path, whatever the module's engine fixture (which may hold a paged one) has set.
    monkeypatch.setenv("VLLM_METAL_USE_PAGED_ATTENTION", "0")
    monkeypatch.setenv("VLLM_METAL_MEMORY_FRACTION", "auto")
    path = family_dir(family)
    per_token = models.load(str(path)).growing_kv_bytes_per_token
    # KV for 192 tokens: the 92-token prompt and its 40 tokens fit, the nine requests together (~500) do not.
    with running_llm(path, max_model_len=160, max_num_seqs=8, max_num_batched_tokens=32,
                     enable_chunked_prefill=True, kv_cache_memory_bytes=per_token * 192, block_size=16,
                     disable_log_stats=False, seed=0) as llm:
        outs = llm.generate([LONG_PROMPT, *PROMPTS], greedy(40), use_tqdm=False)
        assert len(outs[0].prompt_token_ids) > 32
        assert_greedy_like_mlx(path, outs, 40)
        assert metric(llm, "vllm:num_preemptions") > 0


@pytest.mark.parametrize("family", ["gemma3_text", "gpt_oss"])
def test_paged_sliding_windows_through_chunks_prefix_hits_and_preemption(family_dir, family, monkeypatch):
    """The paged path's sliding-window layers (window 8 here) over vLLM's blocks: a long prompt prefilled in chunks
    of 32 tokens (each chunk's queries see their own windows across the chunk boundary), the same prompt again
    from vLLM's prefix cache (a hit in each KV cache group: the full layers' blocks and the sliding layers' last
    window), and requests that vLLM preempts in a small pool and recomputes; tokens and, for gpt-oss, its sinks
    stay mlx-lm's."""
    from tests.support.engine import LONG_PROMPT, metric
    from vmetal.engine import models

    monkeypatch.setenv("VLLM_METAL_USE_PAGED_ATTENTION", "1")
    monkeypatch.setenv("VLLM_METAL_MEMORY_FRACTION", "auto")  # the pool is kv_cache_memory_bytes below
    path = family_dir(family)
    per_token = models.load(str(path)).kv_bytes_per_token
    with running_llm(path, max_model_len=160, max_num_seqs=8, max_num_batched_tokens=32,
                     enable_chunked_prefill=True, enable_prefix_caching=True, kv_cache_memory_bytes=per_token * 256,
                     block_size=16, disable_log_stats=False, seed=0) as llm:
        first = llm.generate([LONG_PROMPT], greedy(24), use_tqdm=False)
        outs = llm.generate([LONG_PROMPT + " again", *PROMPTS], greedy(40), use_tqdm=False)
        assert len(first[0].prompt_token_ids) > 32 and outs[0].num_cached_tokens >= 32
        for out in [*first, *outs]:
            n = len(out.outputs[0].token_ids)
            assert list(out.outputs[0].token_ids) == mlx_greedy(path, out.prompt_token_ids, n, ignore_eos=True)
        assert metric(llm, "vllm:num_preemptions") > 0


def test_sliding_window_layers_do_not_count_against_the_context_vllm_admits(family_dir, monkeypatch):
    """On the MLX-managed path a sliding-window layer keeps at most its window, so vLLM's block budget counts
    only the layers that keep every token: the same KV bytes admit twice the context for this model (one layer
    of two slides), and its window is the fixed part the budget sets aside per request."""
    from tests.support.engine import assert_greedy_like_mlx
    from vmetal.engine import models

    # The MLX-managed path, whatever the module's engine fixture (which may hold a paged one) has set.
    monkeypatch.setenv("VLLM_METAL_USE_PAGED_ATTENTION", "0")
    monkeypatch.setenv("VLLM_METAL_MEMORY_FRACTION", "auto")
    path = family_dir("gemma3_text")
    loaded = models.load(str(path))
    window = json.loads((path / "config.json").read_text())["sliding_window"]
    assert loaded.state.held == (window, None)  # a sliding layer, then a full-attention one
    assert loaded.growing_kv_bytes_per_token * 2 == loaded.kv_bytes_per_token
    assert loaded.window_bytes == window * loaded.kv_bytes_per_token // 2
    with running_llm(path, max_model_len=160, max_num_seqs=4, block_size=16,
                     kv_cache_memory_bytes=loaded.kv_bytes_per_token * 96) as llm:
        # 96 tokens of every layer's K/V: 192 tokens of the growing layer's, 12 blocks of 16.
        assert llm.llm_engine.vllm_config.cache_config.num_gpu_blocks == 12
        assert_greedy_like_mlx(path, llm.generate(PROMPTS[:2], greedy(20), use_tqdm=False), 20)


def test_paged_sliding_layers_free_their_blocks_past_the_window(family_dir, monkeypatch):
    """On the paged path a sliding-window layer is a KV cache group of its own whose blocks vLLM frees once they
    fall behind the window, on a pool it shares with the full-attention layer: KV bytes for 128 tokens of every
    layer admit a 160-token context (with every layer holding every token they held 128, and vLLM refused to
    start), and a sequence that fills it decodes mlx-lm's tokens."""
    from tests.support.engine import LONG_PROMPT
    from vmetal.engine import models

    monkeypatch.setenv("VLLM_METAL_USE_PAGED_ATTENTION", "1")
    monkeypatch.setenv("VLLM_METAL_MEMORY_FRACTION", "auto")  # the pool is kv_cache_memory_bytes below
    path = family_dir("gemma3_text")
    per_token = models.load(str(path)).kv_bytes_per_token
    with running_llm(path, max_model_len=160, max_num_seqs=4, max_num_batched_tokens=32, block_size=16,
                     kv_cache_memory_bytes=per_token * 128, seed=0) as llm:
        # 16 blocks of 16 tokens of one layer's K/V; a 160-token sequence takes 10 in the full-attention group
        # and at most 3 (the window of 8 and a 32-token chunk) in the sliding one.
        assert llm.llm_engine.vllm_config.cache_config.num_gpu_blocks == 16
        [out] = llm.generate([LONG_PROMPT], greedy(160), use_tqdm=False)  # vLLM stops it at max_model_len
        assert len(out.prompt_token_ids) + len(out.outputs[0].token_ids) == 160
        assert list(out.outputs[0].token_ids) == mlx_greedy(path, out.prompt_token_ids, len(out.outputs[0].token_ids),
                                                            ignore_eos=True)


def test_paged_path_refuses_a_hybrid_before_the_engine_starts(family_dir, monkeypatch):
    """`LLM(...)` on the paged path stops in vLLM's config step, naming the family, the state its pools cannot
    hold and the path that serves it; no engine process is started."""
    from vllm import LLM

    monkeypatch.setenv("VLLM_METAL_USE_PAGED_ATTENTION", "1")
    monkeypatch.setenv("VLLM_METAL_MEMORY_FRACTION", "0.2")
    with pytest.raises(Exception) as err:
        LLM(model=str(family_dir("lfm2")), max_model_len=256)
    message = str(err.value)
    assert "lfm2 (Lfm2ForCausalLM): 1 of 2 layers are recurrent (SSM / linear-attention) layers" in message
    assert "use the MLX-managed path" in message
