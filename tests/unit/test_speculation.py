"""N-gram speculation's two small rules, without an engine: which tokens a greedy verification keeps
(vmetal/engine/runner/speculative.py), and where `--speculative-config` is refused before anything starts
(vmetal/preflight/features.py). The engine itself: tests/engine/test_speculative.py."""

from __future__ import annotations

import json

import pytest

from vmetal.engine.runner.speculative import accepted_tokens
from vmetal.preflight.features import refused_args, speculation_refusal


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
])
def test_ngram_on_the_mlx_path_on_one_worker_is_let_through(args):
    assert refused_args(args, "mlx") is None


@pytest.mark.parametrize("args, kv_path, words", [
    (_args({"method": "eagle", "model": "a/b"}), "mlx", "speculative decoding by eagle is not implemented"),
    (_args({"model": "Qwen/Qwen3-0.6B"}), "mlx", "speculative decoding by a draft model is not implemented"),
    (["--speculative-config.method", "suffix"], "mlx", "speculative decoding by suffix is not implemented"),
    (_args({"method": "ngram"}), "paged",
     "uses the paged path; leave out VLLM_METAL_USE_PAGED_ATTENTION=1 (`--paged`)"),
    (_args({"method": "ngram"}), "torch", "uses the torch path; leave out VLLM_METAL_USE_MLX=0"),
    (_args({"method": "ngram"}, "--tensor-parallel-size", "2"), "mlx", "runs on one worker, and this server has 2"),
])
def test_what_the_engine_cannot_speculate_with_is_refused_in_one_line(args, kv_path, words):
    refused = refused_args(args, kv_path)
    assert refused is not None and refused.startswith("`--speculative-config`: ") and words in refused, refused
    assert "\n" not in refused


def test_the_same_rule_reads_vllms_resolved_config():
    assert speculation_refusal("ngram", "mlx", 1) is None
    assert "draft_model" in speculation_refusal("draft_model", "mlx", 1)
