"""bfloat16 and float16: the engine's per-step logprobs are mlx-lm's, teacher-forced, within a bound from the dtype.

Exact greedy tokens are the float32 bar (test_engine.py, test_paged_engine.py). In 16 bits they are not: two
correct computations that round in a different order give logits a few units in the last place apart, the top
two logits of a step are often that close (a bf16 logit between 8 and 16 is a multiple of 1/16: in 2-3 % of the
greedy steps here the top two are equal, in about 6 % within one unit), and one flipped argmax changes every
later token. So this module compares what the engine computed, step by step, with mlx-lm on the same tokens:

- the engine generates greedily (24 tokens, top-8 logprobs, `raw_logprobs`) for 8 prompts at once, so decode
  rows are batched, plus 4 prompts that also ask for prompt logprobs (their prefill puts every position through
  the LM head; the other 8 put only the last one through it);
- mlx-lm runs one forward of prompt + the engine's tokens, in the checkpoint's dtype, log-softmax in float32;
- at every generated and every prompt position, each of the engine's top-k ids has mlx-lm's logprob within the
  bound; the engine's greedy token is within twice the bound of mlx-lm's best; no id that mlx-lm puts more
  than the bound above the engine's k-th is missing from the engine's top-k;
- a wrong reference (the same one shifted by a position, or the model of another seed) breaks the bound at
  nearly every position, so the bound can tell.

The bound is `K * eps * M`: `M` the largest |logit| of mlx-lm's forward of the sequence (14-18 for these
models), `eps` the spacing of 1.0 in the arithmetic that may differ between the two computations, `K = 8`.

- On a GPU (Metal, CUDA) MLX picks kernels by shape (matmul tiles, the one-query attention kernel of a decode
  step against the many-query kernel of a prefill or of a full forward), so engine and reference round
  differently in the dtype: `eps` is the dtype's (bf16 2^-7, fp16 2^-10). Measured on MLX's CUDA backend
  (H200, mlx 0.32.4; vLLM does not run there, so the engine's steps were replayed with vmetal's own
  `DecodeBatch` and paged-attention code: whole-prompt prefill with the head on the last position, batched
  decode, 4 seeds x 8 prompts x 32 steps): at most 3.2 eps M in bf16 (0.42 nats), 3.8 eps M in fp16
  (0.056 nats). mlx-lm's own step-by-step decode differs from its own full forward just as much (3.2, 3.1).
- On MLX's CPU backend (where CI runs these tests) every kernel computes a row the same whatever the shape
  around it: the engine's logits are bitwise mlx-lm's full forward (read in raw_logits mode, bf16 on the MLX
  path and fp16 on the paged one: 0 of 3630 values differed), and only the float32 log-softmax differs
  (torch's in vLLM's sampler, MLX's here): at most 3.8 eps32 M (7e-6 nats). So here `eps` is float32's
  (2^-23), and the check is that tight.
- For scale: mlx-lm in the dtype against float32 arithmetic on the same rounded weights differs by up to
  6.1 eps M (bf16) and 5.2 eps M (fp16) over 48 sequences (6 seeds x 8 prompts). K = 8 is above that and
  twice the largest difference measured between engine and reference: bf16 about 1.1 nats, fp16 0.14,
  float32 2e-5 for these M. Wrong references land far outside: a shift by one position moves the logprobs by
  6.4 nats (median), another seed's model by 9.5.

Where greedy tokens diverge (the GPU run that stopped matching mlx-lm's greedy tokens after some steps) is
not the last-position-only LM head. On the CUDA backend in bf16 the head applied to the last hidden state
alone equals that row of the head over all positions exactly (fp16: within 0.002 nats), as does a prompt-only
forward's last row against the same row of a longer forward; matmuls there give the same row for 1 or 20
rows. What differs is attention: the last row of a 20-query causal `scaled_dot_product_attention` and the
same query alone differ by one bf16 unit (0.0039; fp16 0.00066), and mlx-lm's `generate` runs the prompt's
last token as a step of its own (prompt[:-1] first, then one token: the decode kernel), while vmetal prefills
the whole prompt in one forward (the prefill kernel). That alone moves the first step's logprobs by up to
0.48 nats in bf16, and it is what made greedy paths part: with vmetal's prefill 6 of 32 bf16 sequences left
mlx-lm's greedy path (at steps 1, 2, 7, 10, 19, 27), single row or batched, on either KV path; with mlx-lm's
prefill order none did on a single row, and 1 of 32 batched. Batched decode adds less: the batch's masked
attention against a lone row's moves logprobs by up to 0.18 nats in bf16 (median 1e-5). In fp16 (first step
within 0.03 nats) no sequence left the path with vmetal's prefill. The KV cache holds K and V in the dtype in
both (they come out of the dtype's projections and RoPE), so it adds nothing. On CUDA float32 is not exact
either: a one-row matmul and a row of a many-row one differ there by about 3e-4 relative (TF32's rounding), and
1 of 32 float32 sequences left mlx-lm's greedy path too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from tests.support.engine import PROMPTS, greedy, running_llm

pytestmark = pytest.mark.slow

N_TOKENS = 24
TOP_K = 8
K = 8
# The spacing of 1.0 to the next value: the unit in which rounding differences are counted.
EPS = {"float32": 2.0**-23, "bfloat16": 2.0**-7, "float16": 2.0**-10}
DTYPES = ("bfloat16", "float16")
PATHS = ("mlx", "paged")
# A one-token prompt among them: no prompt position has a logprob.
WITH_PROMPT_LOGPROBS = [PROMPTS[i] for i in (1, 2, 3, 5)]


def arithmetic_eps(dtype: str) -> float:
    """eps of the arithmetic in which engine and reference may differ on this device (module docstring)."""
    import mlx.core as mx

    return EPS["float32"] if mx.default_device().type == mx.DeviceType.cpu else EPS[dtype]


def bound(dtype: str, max_logit: float, eps: float | None = None) -> float:
    return K * (eps if eps is not None else arithmetic_eps(dtype)) * max_logit


# ------------------------------------------------------------------------------------------ the reference
_models: dict = {}


@dataclass
class Reference:
    logprobs: np.ndarray  # [len(seq), V] float32: position i's distribution of the token after it
    max_logit: float


def teacher_forced(model_dir, seq: list[int]) -> Reference:
    """mlx-lm's one forward of `seq` in the checkpoint's dtype; log-softmax in float32."""
    import mlx.core as mx
    from mlx_lm import load

    key = str(model_dir)
    if key not in _models:
        _models[key] = load(key)[0]
    logits = _models[key](mx.array(seq)[None])[0].astype(mx.float32)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return Reference(np.array(logprobs), float(mx.abs(logits).max().item()))


# ----------------------------------------------------------------------------------------- the engine run
@dataclass
class Seq:
    prompt: list[int]
    tokens: list[int]
    # per generated position: id -> (logprob, rank), the top-k and the sampled token
    logprobs: list[dict[int, tuple[float, int]]]
    # per prompt position from the second on (None where not asked for): the same, for the prompt's next token
    prompt_logprobs: list[dict[int, tuple[float, int]]] | None

    @property
    def n(self) -> int:
        return len(self.prompt)


@dataclass
class Run:
    dtype: str
    path: str
    model: object
    seqs: list[Seq]


def _entries(d) -> dict[int, tuple[float, int]]:
    return {int(t): (float(lp.logprob), int(lp.rank)) for t, lp in d.items()}


@pytest.fixture(scope="module")
def low_models(models_dir):
    """Per dtype: the served model (seed 0) and another seed's, a wrong reference."""
    from vmetal.demo import build_tiny_model

    return {(dtype, seed): build_tiny_model(models_dir / f"qwen3-{dtype}-{seed}", "qwen3", hidden_size=64,
                                            num_layers=2, dtype=dtype, seed=seed)
            for dtype in DTYPES for seed in (0, 1)}


@pytest.fixture(scope="module")
def runs() -> dict:
    """(dtype, path) -> Run. The suite shuffles tests inside a module, which would tear down and start again a
    parametrised module fixture's engines; runs are kept here instead, each started once."""
    return {}


@pytest.fixture(params=[(d, p) for d in DTYPES for p in PATHS], ids="-".join)
def run(request, runs, low_models) -> Run:
    if request.param not in runs:
        runs[request.param] = start_and_generate(*request.param, low_models[(request.param[0], 0)])
    return runs[request.param]


def start_and_generate(dtype: str, path: str, model) -> Run:
    """One engine for (dtype, KV path): 12 requests in one batch, then shut down; the outputs as plain data."""
    prompts = PROMPTS + WITH_PROMPT_LOGPROBS
    params = [greedy(N_TOKENS, logprobs=TOP_K)] * len(PROMPTS) + \
        [greedy(N_TOKENS, logprobs=TOP_K, prompt_logprobs=TOP_K)] * len(WITH_PROMPT_LOGPROBS)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_METAL_USE_PAGED_ATTENTION", "1" if path == "paged" else "0")
        mp.setenv("VLLM_METAL_MEMORY_FRACTION", "0.2" if path == "paged" else "auto")
        with running_llm(model, max_model_len=256, max_num_seqs=16, seed=0,
                         logprobs_mode="raw_logprobs") as llm:
            outs = llm.generate(prompts, params, use_tqdm=False)
    seqs = []
    for out in outs:
        c = out.outputs[0]
        plps = None if out.prompt_logprobs is None else [_entries(d) for d in out.prompt_logprobs[1:]]
        seqs.append(Seq(list(out.prompt_token_ids), list(c.token_ids), [_entries(d) for d in c.logprobs], plps))
    assert [len(s.tokens) for s in seqs] == [N_TOKENS] * len(prompts)
    assert [s.prompt_logprobs is not None for s in seqs] == [p.prompt_logprobs is not None for p in params]
    return Run(dtype, path, model, seqs)


# ---------------------------------------------------------------------------------------------- checking
def out_of_bound(entries: list[dict[int, tuple[float, int]]], rows: np.ndarray, b: float) -> list[str]:
    """Each engine logprob against the reference row of its position: what lies more than `b` away."""
    bad = []
    for i, (entry, row) in enumerate(zip(entries, rows)):
        for t, (lp, _) in entry.items():
            if abs(lp - row[t]) > b:
                bad.append(f"position {i} id {t}: engine {lp:.6f}, mlx-lm {row[t]:.6f} (|d| {abs(lp - row[t]):.3g})")
    return bad


def positions_out_of_bound(entries: list[dict[int, tuple[float, int]]], rows: np.ndarray, b: float) -> int:
    """How many positions have an engine logprob more than `b` from its reference row's."""
    return sum(any(abs(lp - row[t]) > b for t, (lp, _) in entry.items()) for entry, row in zip(entries, rows))


def missing_from_top_k(entries: list[dict[int, tuple[float, int]]], rows: np.ndarray, b: float) -> list[str]:
    """Ids that mlx-lm puts more than `b` above the engine's k-th logprob, absent from the engine's top-k: the
    engine's value of such an id would exceed its k-th, so a correct top-k holds it."""
    bad = []
    for i, (entry, row) in enumerate(zip(entries, rows)):
        top = {t: lp for t, (lp, rank) in entry.items() if rank <= TOP_K}
        kth = min(top.values())
        missing = set(np.flatnonzero(row > kth + b).tolist()) - top.keys()
        if missing:
            bad.append(f"position {i}: ids {sorted(missing)} above the k-th ({kth:.6f}) by more than {b:.3g}")
    return bad


def describe(run: Run, seq: Seq, what: str, bad: list[str], b: float) -> str:
    return (f"{run.dtype} {run.path} path, prompt {seq.prompt}: {len(bad)} {what} outside the bound {b:.3g} "
            f"(K={K} x eps {arithmetic_eps(run.dtype):.3g} x max|logit|); first: {bad[:3]}")


def test_generated_logprobs_match_mlx_lm_teacher_forced(run):
    """Every generated position, the 8 batched prompts (head on the last position at prefill) and the 4 with
    prompt logprobs (head on every position): the top-k within the bound, greedy within twice the bound of
    mlx-lm's best, and no clearly better id missing from the top-k."""
    for seq in run.seqs:
        ref = teacher_forced(run.model, seq.prompt + seq.tokens)
        b = bound(run.dtype, ref.max_logit)
        rows = ref.logprobs[seq.n - 1 : seq.n - 1 + N_TOKENS]
        bad = out_of_bound(seq.logprobs, rows, b)
        assert not bad, describe(run, seq, "logprobs", bad, b)
        bad = missing_from_top_k(seq.logprobs, rows, b)
        assert not bad, describe(run, seq, "top-k", bad, b)
        for i, (token, row) in enumerate(zip(seq.tokens, rows)):
            assert row[token] >= row.max() - 2 * b, (
                f"{run.dtype} {run.path}: step {i} chose id {token} ({row[token]:.6f} in mlx-lm), mlx-lm's best "
                f"is id {int(row.argmax())} ({row.max():.6f}), more than twice the bound {b:.3g} apart")


def test_prompt_logprobs_match_mlx_lm(run):
    """Prompt positions are teacher-forced by construction: the same bound, for the prompt's own next token
    and the top-k."""
    asked = [s for s in run.seqs if s.prompt_logprobs is not None]
    assert len(asked) == len(WITH_PROMPT_LOGPROBS)
    for seq in asked:
        ref = teacher_forced(run.model, seq.prompt + seq.tokens)
        b = bound(run.dtype, ref.max_logit)
        rows = ref.logprobs[: seq.n - 1]
        assert len(seq.prompt_logprobs) == seq.n - 1
        for i, entry in enumerate(seq.prompt_logprobs):
            assert seq.prompt[i + 1] in entry, f"position {i}: the prompt's next token is not in {sorted(entry)}"
        bad = out_of_bound(seq.prompt_logprobs, rows, b) + missing_from_top_k(seq.prompt_logprobs, rows, b)
        assert not bad, describe(run, seq, "prompt logprobs", bad, b)


def test_wrong_references_break_the_bound(run, low_models):
    """The dtype's bound (the wider one, a GPU's) still rejects a reference one position off, and the model of
    another seed, at nearly every generated position: passing it says something."""
    other = low_models[(run.dtype, 1)]
    positions = shifted_bad = other_bad = 0
    for seq in run.seqs[: len(PROMPTS)]:
        seq_ids = seq.prompt + seq.tokens
        ref = teacher_forced(run.model, seq_ids)
        b = bound(run.dtype, ref.max_logit, eps=EPS[run.dtype])
        # One position late: row n + i for step i (the last step has no later row).
        shifted_bad += positions_out_of_bound(seq.logprobs, ref.logprobs[seq.n : seq.n - 1 + N_TOKENS], b)
        wrong = teacher_forced(other, seq_ids).logprobs[seq.n - 1 : seq.n - 1 + N_TOKENS]
        other_bad += positions_out_of_bound(seq.logprobs, wrong, b)
        positions += N_TOKENS
    shifted_positions = positions - len(PROMPTS)
    assert shifted_bad >= 0.9 * shifted_positions, f"shifted reference: {shifted_bad}/{shifted_positions} positions"
    assert other_bad >= 0.9 * positions, f"another seed's model: {other_bad}/{positions} positions"
