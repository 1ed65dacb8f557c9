"""The sampler under a token bitmask (constrained decoding): disallowed tokens get -inf before penalties,
warpers and the choice; rows that allow everything are untouched; the packed layout is llguidance's."""

from __future__ import annotations

import math

import pytest
import torch

from worker.engine.logits_processors import apply_token_bitmask
from worker.engine.sampling import BatchSampler, SamplingParams


def pack(allowed: torch.Tensor) -> torch.Tensor:
    """[B, n] bool -> [B, ceil(n / 32)] int32, bit j of word w for token 32·w + j (an independent packing)."""
    batch, n = allowed.shape
    words = (n + 31) // 32
    padded = torch.zeros(batch, words * 32, dtype=torch.int64)
    padded[:, :n] = allowed.long()
    packed = (padded.view(batch, words, 32) << torch.arange(32)).sum(-1)  # 0 .. 2^32 - 1
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


@pytest.mark.parametrize("n_tokens,pad,batch", [(1, 0, 1), (31, 1, 2), (32, 0, 3), (33, 31, 2), (517, 59, 4)])
def test_bitmask_sets_exactly_the_disallowed_tokens_to_minus_inf(n_tokens, pad, batch):
    g = torch.Generator().manual_seed(n_tokens)
    allowed = torch.rand(batch, n_tokens, generator=g) < 0.4
    allowed[:, -1] = True  # the last token of a word and bit 31 (the sign bit) are exercised
    allowed[0] = True  # a row allowing everything
    scores = torch.randn(batch, n_tokens + pad, generator=g)
    out = apply_token_bitmask(scores.clone(), pack(allowed), n_tokens)
    expect = scores.clone()
    expect[:, :n_tokens][~allowed] = -math.inf
    assert torch.equal(out, expect)  # padding columns past n_tokens are left to the sampler


def test_bitmask_of_the_wrong_shape_is_refused():
    with pytest.raises(ValueError, match="bitmask for 2 rows x 40 tokens"):
        apply_token_bitmask(torch.zeros(2, 64), torch.zeros(2, 1, dtype=torch.int32), 40)
    with pytest.raises(ValueError, match="bitmask"):
        apply_token_bitmask(torch.zeros(2, 64), torch.zeros(2, 2, dtype=torch.int64), 40)


def _logits_and_mask(vocab: int = 64, real: int = 50) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two rows whose best tokens are disallowed: allowed are 10, 20, 30 and 40 (raw order 40 > 30 > 20 > 10)."""
    logits = torch.full((2, vocab), -5.0)
    logits[:, :real] = torch.linspace(0, 9, real)  # disallowed high tokens (45..49) lead
    for tid, value in ((10, 1.0), (20, 2.0), (30, 3.0), (40, 4.0)):
        logits[:, tid] = value
    allowed = torch.zeros(2, real, dtype=torch.bool)
    allowed[:, [10, 20, 30, 40]] = True
    return logits, allowed, pack(allowed)


def test_greedy_and_top_k_choose_among_the_allowed_tokens():
    logits, allowed, bitmask = _logits_and_mask()
    greedy = SamplingParams(temperature=0.0)
    top2 = SamplingParams(do_sample=True, top_k=2, seed=1)
    drawn = set()
    for seed in range(1, 40):
        sampler = BatchSampler([greedy, SamplingParams(do_sample=True, top_k=2, seed=seed)], 64, 50)
        out = sampler(logits, [[1], [1]], bitmask)
        assert out.next_ids[0].item() == 40  # the best allowed token, not 49
        drawn.add(out.next_ids[1].item())
    # top-k runs after the mask: the two best *allowed* tokens survive (before it, none would)
    assert drawn == {30, 40}
    out = BatchSampler([top2, top2], 64, 50)(logits, [[1], [1]], bitmask)
    assert torch.exp(out.logprobs).sum().item() > 0.5  # a real distribution over what is left


def test_penalties_and_temperature_keep_the_mask_and_logprobs_cover_the_allowed_tokens():
    logits, allowed, bitmask = _logits_and_mask()
    params = SamplingParams(
        do_sample=True, temperature=0.7, seed=3, repetition_penalty=1.3, frequency_penalty=0.5, return_k_alternatives=6
    )
    out = BatchSampler([params, params], 64, 50)(logits, [[10, 20, 49], [40, 40]], bitmask)
    for row in range(2):
        assert out.next_ids[row].item() in (10, 20, 30, 40)
        finite = [t for t, lp in zip(out.top_ids[row], out.top_logprobs[row]) if lp > -math.inf]
        assert sorted(finite) == [10, 20, 30, 40]
        mass = sum(math.exp(lp) for lp in out.top_logprobs[row][:4])
        assert mass == pytest.approx(1.0, abs=1e-5)


def test_rows_that_allow_everything_sample_as_without_a_mask():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 64, generator=g)
    params = [SamplingParams(temperature=0.0), SamplingParams(do_sample=True, seed=9, top_p=0.9), SamplingParams()]
    ids = [[1, 2], [3], [4, 4]]
    plain = BatchSampler(params, 64, 50)(logits, ids)
    masked = BatchSampler(params, 64, 50)(logits, ids, torch.full((3, 2), -1, dtype=torch.int32))
    assert torch.equal(plain.next_ids, masked.next_ids) and torch.equal(plain.logprobs, masked.logprobs)


def test_a_row_that_falls_back_to_its_raw_logits_stays_constrained():
    """A NaN in an allowed column sends the row to the sampler's greedy fall-back on raw logits; the mask still
    applies there, so the best raw token (disallowed) is not chosen."""
    logits, allowed, bitmask = _logits_and_mask()
    logits[0, 30] = math.nan
    out = BatchSampler([SamplingParams(temperature=0.0)] * 2, 64, 50)(logits, [[1], [1]], bitmask)
    assert out.next_ids.tolist() == [40, 40]
