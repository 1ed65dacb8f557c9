"""Sampling with drafts keeps the output distribution: a two-sample chi-square test on the demo model.

Arm A samples without drafts (seeds 1..N), arm B with prompt-lookup drafts (seeds N+1..2N: independent draws).
At each of the first POSITIONS generated tokens the two arms' token counts are compared with Pearson's
homogeneity statistic X² = Σ_c (a_c − b_c)² / (a_c + b_c) (equal sample sizes), which under "same distribution"
is asymptotically χ² with k − 1 degrees of freedom (k: tokens seen at that position; tokens seen fewer than
5 times in both arms together are pooled into one category so the approximation holds). The test fails when
a p-value is below 1e-4 (a false alarm at one of the positions has probability < POSITIONS × 1e-4; the seeds
are fixed, so the outcome is deterministic). The draws sit in a copy prompt where most drafts are accepted,
so a wrong acceptance rule (accepting drafts unchecked, or choosing from the wrong position's logits) shows.
"""

from __future__ import annotations

from collections import Counter

import torch

from spec_helpers import Spy, engine, greedy_request, run
from worker.engine import chunks

N = 300  # draws per arm
POSITIONS = 5
ALPHA = 1e-4
PROMPT = "The quick brown fox jumps over the lazy dog by the river. The quick brown fox"
SAMPLE = dict(do_sample=True, temperature=1.6, top_k=8)  # flat enough that several tokens are drawn per position


def homogeneity_p(a: Counter, b: Counter) -> float:
    """p-value of Pearson's two-sample chi-square for equal sample sizes (rare categories pooled)."""
    pooled_a = pooled_b = 0
    stat, k = 0.0, 0
    for c in set(a) | set(b):
        if a[c] + b[c] < 5:
            pooled_a, pooled_b = pooled_a + a[c], pooled_b + b[c]
            continue
        stat += (a[c] - b[c]) ** 2 / (a[c] + b[c])
        k += 1
    if pooled_a + pooled_b:
        stat += (pooled_a - pooled_b) ** 2 / (pooled_a + pooled_b)
        k += 1
    if k < 2:
        return 1.0
    # chi-square survival function: the regularized upper incomplete gamma Q(df / 2, x / 2)
    return float(torch.special.gammaincc(torch.tensor((k - 1) / 2, dtype=torch.float64), torch.tensor(stat / 2)))


def test_the_homogeneity_test_rejects_different_distributions():
    same = homogeneity_p(Counter({1: 150, 2: 100, 3: 50}), Counter({1: 140, 2: 108, 3: 52}))
    shifted = homogeneity_p(Counter({1: 150, 2: 100, 3: 50}), Counter({1: 100, 2: 100, 3: 100}))
    assert same > 0.5 and shifted < ALPHA


def test_token_frequencies_agree_with_and_without_drafts(demo, monkeypatch):
    model, tok = demo
    ids = tok.encode(PROMPT)

    def counts(n: int, first_seed: int) -> list[Counter]:
        reqs = [greedy_request(i, ids, POSITIONS, seed=first_seed + i, **SAMPLE) for i in range(N)]
        seen = run(engine(model, tok, n, tokens=32 * 1024), reqs)
        return [Counter(seen.tokens(i)[p] for i in range(N)) for p in range(POSITIONS)]

    off = counts(0, 1)
    monkeypatch.setattr(chunks, "MAX_VERIFY_ROWS", N)  # one batch of N requests verifies its drafts
    spy = Spy.on(monkeypatch)
    on = counts(4, N + 1)
    assert spy.accepted >= N // 2  # many draws went through accepted drafts
    p_values = [homogeneity_p(a, b) for a, b in zip(off, on)]
    assert max(len(c) for c in off) >= 3  # the positions are not deterministic
    assert min(p_values) > ALPHA, (p_values, off, on)
