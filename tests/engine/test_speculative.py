"""N-gram speculative decoding on the MLX-managed and paged paths (vmetal/engine/runner/speculative.py), through
vLLM's `LLM`.

What a user would notice: greedy output identical to mlx-lm's token for token while drafts are proposed,
accepted and rejected (vLLM's own spec-decode counters prove each happened), through concurrency, requests
joining mid-decode, preemption and a grammar-constrained neighbour; sampled requests speculate too and keep the
distribution of their tokens; a model whose cache cannot roll back is refused when the engine starts.
"""

from __future__ import annotations

import pytest

from tests.support.engine import (
    PROMPTS,
    assert_greedy_like_mlx,
    assert_joining_requests_like_mlx,
    greedy,
    running_llm,
)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("launch_thread_on")]

SPEC = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 1}
# A prompt that repeats itself, and tokens enough for the tiny random model to fall into loops: drafts both
# accepted and rejected.
REPEATING = "one two three four five six seven " * 3
TOKENS = 48


def spec_counts(llm) -> dict[str, int]:
    """Draft tokens checked and accepted by this engine's runner (`MetalWorker.step_counts`: vLLM's Prometheus
    counters are the process's, shared by every engine a test module starts; /metrics is tested over HTTP)."""
    counts = llm.collective_rpc("step_counts")[0]
    return {"num_draft_tokens": counts.get("spec_draft_tokens", 0),
            "num_accepted_tokens": counts.get("spec_accepted_tokens", 0)}


@pytest.fixture(scope="module")
def llm(qwen3_model):
    with running_llm(qwen3_model, max_model_len=256, max_num_seqs=8, seed=0, speculative_config=SPEC,
                     disable_log_stats=False) as llm:
        yield llm


def assert_greedy_like_mlx_while_drafts_are_kept_and_rejected(llm, model, queued_ahead: bool = True) -> None:
    """Greedy output identical to mlx-lm's on `model`, while some drafts were kept and some rolled back, and
    the verify forwards queued at the end of a step (decode_ahead.VerifyAhead) were used where the drafter
    queues them (`queued_ahead`; n-gram drafts do, a draft model's where a launch thread runs), else none was."""
    before = spec_counts(llm)
    ahead = llm.collective_rpc("step_counts")[0].get("spec_ahead_used", 0)
    outs = llm.generate([REPEATING, *PROMPTS], greedy(TOKENS), use_tqdm=False)
    assert_greedy_like_mlx(model, outs, TOKENS)
    after = spec_counts(llm)
    drafted = after["num_draft_tokens"] - before["num_draft_tokens"]
    accepted = after["num_accepted_tokens"] - before["num_accepted_tokens"]
    assert 0 < accepted < drafted, (accepted, drafted)
    used = llm.collective_rpc("step_counts")[0].get("spec_ahead_used", 0) - ahead
    assert used > 0 if queued_ahead else used == 0, used


def test_greedy_with_drafts_accepted_and_rejected_matches_mlx_lm(llm, qwen3_model):
    assert_greedy_like_mlx_while_drafts_are_kept_and_rejected(llm, qwen3_model)


def test_ngram_speculation_on_the_paged_path_matches_mlx_lm(qwen3_model, monkeypatch):
    """The paged path verifies drafts as rows of its compiled step (a speculating request's last token and each
    draft a decode row at its own position), or of its packed forward beside a prompt chunk, and a rejected
    draft's K/V is simply written again: greedy output is mlx-lm's while drafts are kept and rejected, requests
    joining mid-decode too; a seeded sampled request reproduces its tokens, and a grammar-constrained neighbour
    keeps to its grammar."""
    monkeypatch.setenv("VLLM_METAL_USE_PAGED_ATTENTION", "1")
    with running_llm(qwen3_model, max_model_len=256, max_num_seqs=8, seed=0, speculative_config=SPEC) as paged:
        assert_greedy_like_mlx_while_drafts_are_kept_and_rejected(paged, qwen3_model, queued_ahead=False)
        assert_joining_requests_like_mlx(qwen3_model, paged, "paged-spec-join", max_tokens=TOKENS)
        assert_seeded_sampling_reproducible(paged)
        assert_grammar_beside_speculation(paged, qwen3_model)
        counts = paged.collective_rpc("step_counts")[0]
    # The paged runner's steps are compiled, those that verify drafts (each draft a row of its own) too.
    assert counts["decode_compiled"] > 0 and counts.get("verify_compiled", 0) > 0, counts


def test_requests_joining_while_others_speculate_match_mlx_lm(llm, qwen3_model):
    assert_joining_requests_like_mlx(qwen3_model, llm, "spec-join", max_tokens=TOKENS)


def test_verify_forwards_queued_ahead_are_used_or_rolled_back_and_tokens_stay_exact(qwen3_model):
    """At the end of each step the runner queues every speculating request's verify forward of the drafts
    looked up for it (decode_ahead.VerifyAhead); the next step uses it when vLLM schedules the drafts it was
    built on, and rolls its positions back when not: a 5-token step budget for four requests of three drafts
    makes vLLM cut some drafts short or leave requests out of a step. Both happen, and greedy output is
    mlx-lm's."""
    prompts = [REPEATING + word for word in ("one", "two", "seven", "five")]
    with running_llm(qwen3_model, max_model_len=256, max_num_seqs=4, seed=0, speculative_config=SPEC,
                     max_num_batched_tokens=5) as budget:
        outs = budget.generate(prompts, greedy(TOKENS), use_tqdm=False)
        counts = budget.collective_rpc("step_counts")[0]
    assert_greedy_like_mlx(qwen3_model, outs, TOKENS)
    assert counts.get("spec_ahead_used", 0) > 0 and counts.get("spec_ahead_dropped", 0) > 0, counts


def _same_distribution(a: list[list[int]], b: list[list[int]], alpha: float = 1e-4) -> bool:
    """Whether two sets of sampled sequences could have one distribution of token at each position: a
    chi-square test of homogeneity per position (tokens seen fewer than 10 times in all pooled into one
    category), Bonferroni over the positions."""
    import collections

    import torch

    positions = len(a[0])
    for pos in range(positions):
        ca, cb = collections.Counter(x[pos] for x in a), collections.Counter(x[pos] for x in b)
        rare = {t for t in set(ca) | set(cb) if ca[t] + cb[t] < 10}
        table = collections.defaultdict(lambda: [0, 0])
        for column, counts in enumerate((ca, cb)):
            for token, n in counts.items():
                table[-1 if token in rare else token][column] += n
        if len(table) < 2:
            continue
        statistic = 0.0
        for row in table.values():
            for column, total in enumerate((len(a), len(b))):
                expected = sum(row) * total / (len(a) + len(b))
                statistic += (row[column] - expected) ** 2 / expected
        dof = torch.tensor((len(table) - 1) / 2, dtype=torch.float64)
        if torch.special.gammaincc(dof, torch.tensor(statistic / 2, dtype=torch.float64)).item() < alpha / positions:
            return False
    return True


def test_sampled_requests_speculate_and_keep_their_distribution(llm, qwen3_model):
    """Rejection sampling (tests/unit/test_rejection_sampling.py checks the rule exactly): over 300 seeds, the
    tokens at each position are distributed as without speculation, while drafts of these very requests were
    accepted and rejected. The prompt ends in the model's own greedy loop, so drafts are often its likely tokens;
    a verifier that kept every draft the target could produce would fail this at the first positions."""
    from vllm import SamplingParams, TokensPrompt

    from tests.support.engine import mlx_greedy

    prompt_ids = llm.get_tokenizer().encode(REPEATING)
    prompt = TokensPrompt(prompt_token_ids=prompt_ids + mlx_greedy(qwen3_model, prompt_ids, 40))
    params = [SamplingParams(temperature=0.6, top_p=0.9, seed=1000 + i, max_tokens=8, ignore_eos=True)
              for i in range(300)]
    before = spec_counts(llm)
    speculated = [list(o.outputs[0].token_ids) for o in llm.generate([prompt] * 300, params, use_tqdm=False)]
    after = spec_counts(llm)
    drafted = after["num_draft_tokens"] - before["num_draft_tokens"]
    accepted = after["num_accepted_tokens"] - before["num_accepted_tokens"]
    assert 0 < accepted < drafted, (accepted, drafted)
    with running_llm(qwen3_model, max_model_len=256, max_num_seqs=8, seed=0) as plain:
        alone = [list(o.outputs[0].token_ids) for o in plain.generate([prompt] * 300, params, use_tqdm=False)]
    assert speculated != alone  # the same seeds draw differently: the test compares distributions
    assert _same_distribution(speculated, alone)


def test_a_seeded_sampled_request_is_reproducible_while_speculating(llm):
    """Its draws come from its own generator, whatever else is in the batch."""
    assert_seeded_sampling_reproducible(llm)


def assert_seeded_sampling_reproducible(llm) -> None:
    """A seeded sampled request that speculates draws the same tokens alone and beside greedy ones."""
    from vllm import SamplingParams

    sampled = SamplingParams(temperature=0.9, top_k=50, seed=7, max_tokens=24, ignore_eos=True)
    first = llm.generate([REPEATING], sampled, use_tqdm=False)
    mixed = llm.generate([PROMPTS[1], REPEATING, PROMPTS[2]], [greedy(TOKENS), sampled, greedy(TOKENS)],
                         use_tqdm=False)
    assert list(first[0].outputs[0].token_ids) == list(mixed[1].outputs[0].token_ids)


def test_a_grammar_constrained_request_beside_speculating_ones(llm, qwen3_model):
    """vLLM lays the grammar's bitmask out with a row per verified position; the runner has one row per request
    (tests/engine/test_structured_output.py covers the grammar itself)."""
    assert_grammar_beside_speculation(llm, qwen3_model)


def assert_grammar_beside_speculation(llm, model) -> None:
    """A grammar-constrained request answers one of its choices while greedy neighbours speculate exactly."""
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    choice = SamplingParams(temperature=0.0, max_tokens=16,
                            structured_outputs=StructuredOutputsParams(choice=["alpha beta", "gamma"]))
    outs = llm.generate([REPEATING, REPEATING, PROMPTS[2]], [greedy(TOKENS), greedy(TOKENS), choice],
                        use_tqdm=False)
    assert outs[2].outputs[0].text in ("alpha beta", "gamma")
    assert_greedy_like_mlx(model, outs[:2], TOKENS)


def test_preemption_while_speculating_keeps_outputs_exact(qwen3_model):
    from vmetal.engine import models

    per_token = models.load(str(qwen3_model)).kv_bytes_per_token
    with running_llm(qwen3_model, max_model_len=128, max_num_seqs=8, kv_cache_memory_bytes=per_token * 192,
                     block_size=16, speculative_config=SPEC, disable_log_stats=False) as llm:
        outs = llm.generate([REPEATING, *PROMPTS[:5]], greedy(TOKENS), use_tqdm=False)
        assert_greedy_like_mlx(qwen3_model, outs, TOKENS)
        assert llm.collective_rpc("step_counts")[0].get("preempted", 0) > 0
        assert spec_counts(llm)["num_accepted_tokens"] > 0


def test_a_model_that_copies_its_context_has_most_drafts_accepted_and_tokens_exact(tmp_path):
    """On a model that rewrites a file it was shown (`vmetal.bench.copying`: hand-set weights that copy), most
    n-gram drafts are right, so steps keep several tokens at once, sometimes every draft; greedy output stays
    mlx-lm's token for token, for several requests speculating side by side."""
    from vmetal.bench.shapes import SHAPES, build_model

    model = build_model(tmp_path / "copying", "float32", SHAPES["copy-tiny"])
    code = "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\n" * 3
    with running_llm(model, max_model_len=256, max_num_seqs=4, seed=0, speculative_config=SPEC) as llm:
        outs = llm.generate([f"# file {i}\n{code}" for i in range(3)], greedy(TOKENS), use_tqdm=False)
        counts = spec_counts(llm)
    assert_greedy_like_mlx(model, outs, TOKENS)
    assert counts["num_accepted_tokens"] > 0.7 * counts["num_draft_tokens"] > 0, counts


def test_a_model_whose_cache_cannot_roll_back_is_refused_at_start(tmp_path):
    """A sliding-window cache that wraps cannot give rejected drafts back: the MLX-managed path refuses, and
    names the paged path, which rolls nothing back."""
    from tests.support.families import build_family

    path = build_family(tmp_path / "gemma3", "gemma3_text")
    with pytest.raises(Exception, match=r"gemma3_text \(Gemma3ForCausalLM\): speculative decoding "
                                        r"\(`--speculative-config`\) rolls rejected tokens back out of the KV cache, "
                                        "and this model also keeps RotatingKVCache state, which cannot give them "
                                        r"back; serve it without speculation, or use --paged \(which rolls nothing "
                                        r"back\)"):
        with running_llm(path, max_model_len=128, speculative_config=SPEC):
            pass


@pytest.mark.parametrize("family", ["gemma3_text", "gpt_oss"])
def test_sliding_window_models_speculate_on_the_paged_path(tmp_path, monkeypatch, family):
    """On the paged path a rejected draft's slot is simply written again, in a sliding-window layer's blocks as
    in a full one's: Gemma 3 and gpt-oss (windows of 8 tokens, far behind the 48 generated; gpt-oss's sinks too)
    speculate, with greedy output mlx-lm's while drafts are kept and rejected; their verify steps go through
    the compiled step, where each draft's row gathers its own window."""
    from tests.support.families import build_family

    path = build_family(tmp_path / family, family)
    monkeypatch.setenv("VLLM_METAL_USE_PAGED_ATTENTION", "1")
    with running_llm(path, max_model_len=256, max_num_seqs=8, seed=0, speculative_config=SPEC) as paged:
        assert_greedy_like_mlx_while_drafts_are_kept_and_rejected(paged, path, queued_ahead=False)
        counts = paged.collective_rpc("step_counts")[0]
    assert counts.get("verify_compiled", 0) > 0, counts
