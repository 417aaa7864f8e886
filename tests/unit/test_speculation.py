"""N-gram speculation's two small rules, without an engine: which tokens a greedy verification keeps
(vmetal/engine/runner/speculative.py), and where `--speculative-config` is refused before anything starts
(vmetal/preflight/features.py). The engine itself: tests/engine/test_speculative.py."""

from __future__ import annotations

import json

import pytest

from vmetal.engine.runner.draft_model import shared_prefix
from vmetal.engine.runner.speculative import accepted_tokens
from vmetal.preflight.features import draft_refusal, refused_args, speculation_refusal


@pytest.mark.parametrize("drafts, targets, kept", [
    ([5, 6, 7], [5, 6, 7, 8], [5, 6, 7, 8]),  # all drafts right: they and the token after them
    ([5, 6, 7], [5, 9, 7, 8], [5, 9]),  # the first wrong draft is replaced by the target's own token
    ([5, 6, 7], [4, 6, 7, 8], [4]),  # nothing accepted: one token, as without speculation
    ([5], [5, 3], [5, 3]),
    ([], [3], [3]),
])
def test_greedy_verification_keeps_the_tokens_decoding_one_at_a_time_gives(drafts, targets, kept):
    assert accepted_tokens(drafts, targets) == kept


def _args(config: dict, *more: str) -> list[str]:
    return ["--speculative-config", json.dumps(config), *more]


@pytest.mark.parametrize("args", [
    _args({"method": "ngram", "num_speculative_tokens": 4}),
    _args({"model": "[ngram]", "num_speculative_tokens": 4}),
    ["--speculative-config.method", "ngram"],
    ["--speculative-config", "{not json"],  # vLLM's parser names what is wrong with it
    ["--max-num-seqs", "4"],
    _args({"model": "Qwen/Qwen3-0.6B", "num_speculative_tokens": 4}),  # a draft model
    _args({"method": "draft_model", "model": "./small"}),
])
def test_ngram_or_a_draft_model_on_the_mlx_path_on_one_worker_is_let_through(args):
    assert refused_args(args, "mlx") is None


def test_ngram_or_a_draft_model_on_the_paged_path_is_let_through():
    assert refused_args(_args({"method": "ngram", "num_speculative_tokens": 4}), "paged") is None
    assert refused_args(_args({"model": "Qwen/Qwen3-0.6B", "num_speculative_tokens": 3}), "paged") is None
    assert speculation_refusal("ngram", "paged", 1) is None
    assert speculation_refusal("draft_model", "paged", 1) is None


@pytest.mark.parametrize("args, kv_path, words", [
    (_args({"method": "eagle", "model": "a/b"}), "mlx", "speculative decoding by eagle is not implemented"),
    (_args({"model": "Qwen/Qwen3-0.6B"}), "torch",
     "draft-model speculation runs on the MLX-managed and paged KV paths only"),
    (["--speculative-config.method", "suffix"], "mlx", "speculative decoding by suffix is not implemented"),
    (_args({"method": "draft_model", "model": "./small"}), "torch", "uses the torch path; leave out VLLM_METAL_USE_MLX=0"),
    (_args({"method": "ngram"}), "torch",
     "n-gram speculation runs on the MLX-managed and paged KV paths only, and this server uses the torch path; "
     "leave out VLLM_METAL_USE_MLX=0"),
    (_args({"method": "ngram"}, "--tensor-parallel-size", "2"), "mlx", "runs on one worker, and this server has 2"),
])
def test_what_the_engine_cannot_speculate_with_is_refused_in_one_line(args, kv_path, words):
    refused = refused_args(args, kv_path)
    assert refused is not None and refused.startswith("`--speculative-config`: ") and words in refused, refused
    assert "\n" not in refused


def test_the_same_rule_reads_vllms_resolved_config():
    assert speculation_refusal("ngram", "mlx", 1) is None
    assert speculation_refusal("draft_model", "mlx", 1) is None
    assert "draft-model speculation runs on one worker" in speculation_refusal("draft_model", "mlx", 2)
    assert "speculative decoding by eagle3 is not implemented" in speculation_refusal("eagle3", "mlx", 1)


def test_a_draft_must_share_the_targets_vocabulary():
    assert draft_refusal({"vocab_size": 151936}, {"vocab_size": 151936}, "small") is None
    assert draft_refusal({"vocab_size": 151936}, {}, "small") is None  # not known: vLLM checks it again
    assert draft_refusal({"vocab_size": 151936}, {"text_config": {"vocab_size": 262144}}, "gemma") == (
        "draft model `gemma` has a vocabulary of 262144 tokens and the model it drafts for 151936: a draft must "
        "share the target's tokenizer; pick a smaller model of the same family")


def test_the_draft_cache_keeps_what_it_shares_with_the_request():
    assert shared_prefix([1, 2, 3, 9], [1, 2, 3, 4, 5]) == 3  # its rejected draft 9 goes
    assert shared_prefix([], [1, 2]) == 0 and shared_prefix([1, 2], [1, 2, 3]) == 2
    # Long contexts: a difference in the last few positions, or far before them (a request recomputed).
    context = list(range(1000))
    assert shared_prefix(context + [7, 8], context + [7, 9, 9]) == 1001
    assert shared_prefix(context[:500] + [-1] + context[501:], context + [3]) == 500
    assert shared_prefix(context, context[:995] + [-1] * 5) == 995
    assert shared_prefix(context, context) == 1000
