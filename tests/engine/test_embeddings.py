"""Embeddings through vLLM's pooling runner, computed in MLX (issue 14): a tiny decoder embedding model laid out
as Qwen3-Embedding publishes it (`tests/support/embeddings.py`), from which vLLM picks the pooling runner, the
last-token pooling and the normalisation by itself.

- `LLM.embed` equals transformers' float32 reference (cosine ≥ 0.9999, unit norm) for prompts of every length,
  one at a time and many at once, and for a prompt long enough that chunked prefill splits it over steps;
- mean pooling (`pooler_config`) equals the reference's mean;
- a Matryoshka model's `dimensions` cuts the vector before it is normalised;
- what the runner does not compute (classification, another pooling task) is refused, not answered wrong.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.support.embeddings import cosine, reference_embeddings, tiny_embedding_model
from tests.support.engine import LONG_PROMPT, PROMPTS, running_llm

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def embedding_model(models_dir):
    return tiny_embedding_model(models_dir, seed=3)


@pytest.fixture(scope="module")
def llm(embedding_model):
    # 32 tokens a step: the long prompt is prefilled in chunks, its K/V carried on the request's own cache.
    with running_llm(embedding_model, max_model_len=256, max_num_seqs=8, max_num_batched_tokens=32,
                     enable_chunked_prefill=True, seed=0) as llm:
        yield llm


def assert_like_reference(path, outs, pooling="LAST", dimensions=None) -> None:
    want = reference_embeddings(path, [list(o.prompt_token_ids) for o in outs], pooling, dimensions)
    for out, ref in zip(outs, want):
        got = np.asarray(out.outputs.embedding)
        assert got.shape == ref.shape
        assert abs(np.linalg.norm(got) - 1.0) < 1e-5
        assert cosine(got, ref) >= 0.9999, (out.prompt, cosine(got, ref))


def test_vllm_picks_the_pooling_runner_from_the_checkpoint(llm):
    config = llm.llm_engine.model_config
    assert (config.runner_type, config.convert_type) == ("pooling", "embed")
    assert config.pooler_config.seq_pooling_type == "LAST"
    assert tuple(llm.llm_engine.get_supported_tasks()) == ("embed",)


def test_embeddings_equal_transformers_reference(llm, embedding_model):
    prompts = [*PROMPTS, LONG_PROMPT]
    outs = llm.embed(prompts, use_tqdm=False)
    assert len(outs) == len(prompts) and len(outs[-1].prompt_token_ids) > 32  # the long one came in chunks
    assert_like_reference(embedding_model, outs)
    # One at a time: the same vectors as in a batch.
    alone = llm.embed(PROMPTS[1], use_tqdm=False)[0].outputs.embedding
    assert np.allclose(alone, outs[1].outputs.embedding, atol=1e-6)


def test_matryoshka_dimensions_cut_before_normalising(llm, embedding_model):
    from vllm import PoolingParams

    outs = llm.embed(PROMPTS[:3], pooling_params=PoolingParams(dimensions=16), use_tqdm=False)
    assert_like_reference(embedding_model, outs, dimensions=16)


def test_other_pooling_tasks_are_refused(llm):
    with pytest.raises(ValueError, match="classify"):
        llm.classify(PROMPTS[0], use_tqdm=False)


def test_mean_pooling(embedding_model):
    from vllm.config import PoolerConfig

    with running_llm(embedding_model, max_model_len=256, max_num_seqs=4, seed=0,
                     pooler_config=PoolerConfig(seq_pooling_type="MEAN")) as llm:
        outs = llm.embed([*PROMPTS[:4], LONG_PROMPT], use_tqdm=False)
    assert_like_reference(embedding_model, outs, "MEAN")
    # Not the last token's vector: the pooling was really changed.
    last = reference_embeddings(embedding_model, [list(outs[0].prompt_token_ids)])[0]
    assert cosine(outs[0].outputs.embedding, last) < 0.999
