"""Rejection sampling of n-gram drafts (vmetal/engine/runner/speculative.py), against the distribution it must
keep: the tokens one-at-a-time sampling gives. Small vocabularies, many seeded draws, chi-square tests at a
significance that a correct sampler fails once in a million runs; each test also shows that a plausible wrong
rule (keep every draft the target could produce, or resample from p without removing the draft) fails it.
"""

from __future__ import annotations

import pytest
import torch

from vmetal.engine.runner.speculative import rejection_sample

DRAWS = 20_000
ALPHA = 1e-6


def _p(values) -> torch.Tensor:
    t = torch.tensor(values, dtype=torch.float32)
    return t / t.sum()


def fits(counts: torch.Tensor, expected_p: torch.Tensor) -> bool:
    """Whether `counts` could come from `expected_p` (chi-square, tokens of probability 0 must not occur)."""
    if (counts[expected_p == 0] > 0).any():
        return False
    keep = expected_p > 0
    expected = expected_p[keep].double() * counts.sum()
    statistic = ((counts[keep].double() - expected) ** 2 / expected).sum()
    dof = int(keep.sum()) - 1
    # The chi-square survival function: the regularized upper incomplete gamma Q(dof/2, statistic/2).
    pvalue = torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), statistic / 2)
    return pvalue.item() > ALPHA


def draw(sampler, drafts, probs, draws=DRAWS, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [sampler(drafts, probs, gen) for _ in range(draws)]


P0 = _p([0.5, 0.2, 0.2, 0.1, 0.0])
P1 = _p([0.1, 0.1, 0.1, 0.1, 0.6])
P2 = _p([0.25, 0.25, 0.25, 0.0, 0.25])


def _wrong_rule(keep):
    """A sampler that keeps draft d when `keep(p, d, generator)` and otherwise draws from p itself."""
    def sampler(drafts, probs, gen):
        out = []
        for i, d in enumerate(drafts):
            if keep(probs[i], d, gen):
                out.append(d)
                continue
            out.append(int(torch.multinomial(probs[i], 1, generator=gen)))
            return out
        out.append(int(torch.multinomial(probs[len(drafts)], 1, generator=gen)))
        return out
    return sampler


# Wrong: keep a draft whenever the target could produce it.
always_keep = _wrong_rule(lambda p, d, gen: p[d] > 0)
# Wrong: keep with probability p(d), but on rejection draw from p itself (the draft can come back).
resample_without_residual = _wrong_rule(lambda p, d, gen: torch.rand((), generator=gen) < p[d])


@pytest.mark.parametrize("sampler", [rejection_sample, always_keep, resample_without_residual],
                         ids=["rejection_sample", "always_keep", "resample_without_residual"])
def test_each_position_has_the_targets_distribution(sampler):
    """First token ~ p0; given it equals draft 0, the second ~ p1; given both drafts kept, the third ~ p2."""
    drafts = [0, 4]
    probs = torch.stack([P0, P1, P2])
    outs = draw(sampler, drafts, probs)
    first = torch.bincount(torch.tensor([o[0] for o in outs]), minlength=5)
    # The steps that went on past a token went on because it was the draft.
    after_first = [o for o in outs if len(o) > 1]
    second = torch.bincount(torch.tensor([o[1] for o in after_first]), minlength=5)
    after_second = [o for o in after_first if len(o) > 2]
    third = torch.bincount(torch.tensor([o[2] for o in after_second]), minlength=5)
    correct = fits(first, P0) and fits(second, P1) and fits(third, P2)
    assert correct == (sampler is rejection_sample)


def test_outputs_stop_at_the_first_rejection_and_have_one_token_of_their_own():
    probs = torch.stack([P0, P1, P2])
    for out in draw(rejection_sample, [0, 4], probs, draws=2_000):
        kept = 0
        while kept < 2 and out[kept] == [0, 4][kept]:
            kept += 1
        assert len(out) == kept + 1


def test_a_certain_draft_is_always_kept_and_an_impossible_one_never():
    certain = torch.stack([_p([0, 0, 1, 0, 0]), P1])
    assert all(out[0] == 2 and len(out) == 2 for out in draw(rejection_sample, [2], certain, draws=500))
    # P0 gives token 4 probability 0; vLLM's placeholder -1 is a draft of probability 0 as well.
    for drafts in ([4], [-1]):
        outs = draw(rejection_sample, drafts, torch.stack([P0, P1]), draws=5_000)
        assert all(len(out) == 1 for out in outs)
        assert fits(torch.bincount(torch.tensor([o[0] for o in outs]), minlength=5), P0)


def test_the_same_seed_gives_the_same_tokens():
    probs = torch.stack([P0, P1, P2])
    assert draw(rejection_sample, [0, 4], probs, draws=200, seed=5) == \
        draw(rejection_sample, [0, 4], probs, draws=200, seed=5)
    assert draw(rejection_sample, [0, 4], probs, draws=200, seed=5) != \
        draw(rejection_sample, [0, 4], probs, draws=200, seed=6)
