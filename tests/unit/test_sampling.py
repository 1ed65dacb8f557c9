"""BatchSampler and prefill_logprobs against naive per-row references (float64, plain loops)."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.engine import logits_processors
from worker.engine.logits_processors import prefill_logprobs
from worker.engine.sampling import BatchSampler, SamplingParams

V, N_REAL = 37, 33  # logits width and real vocab: awkward sizes, padded columns at the end


def reference_logprobs(logits: torch.Tensor, prev: list[int], p: SamplingParams, n_real: int) -> torch.Tensor:
    """Processed log-probs of one row, the slow way: [V] float64, -inf where a token is filtered."""
    s = [float(x) for x in logits.double()]
    s[n_real:] = [-math.inf] * (len(s) - n_real)
    for tok, count in Counter(prev).items():
        if p.repetition_penalty != 1.0:
            s[tok] = s[tok] * p.repetition_penalty if s[tok] < 0 else s[tok] / p.repetition_penalty
        s[tok] -= p.frequency_penalty * count + p.presence_penalty
    sample = p.do_sample or p.temperature != 1.0 or p.top_k or p.top_p < 1 or p.typical_p < 1
    if sample and p.temperature > 0:
        s = [x / p.temperature for x in s]
        if p.top_k:
            kth = sorted(s, reverse=True)[min(p.top_k, len(s)) - 1]
            s = [x if x >= kth else -math.inf for x in s]
        if p.top_p < 1:  # drop a token once the tokens ranked above it already hold top_p of the mass
            probs = torch.tensor(s, dtype=torch.float64).softmax(0).tolist()
            above = 0.0
            for j in sorted(range(len(s)), key=lambda j: -s[j]):
                if above >= p.top_p:
                    s[j] = -math.inf
                above += probs[j]
        if p.typical_p < 1:  # keep tokens by |surprise - entropy| until their mass reaches typical_p
            probs = torch.tensor(s, dtype=torch.float64).softmax(0).tolist()
            entropy = -sum(q * math.log(q) for q in probs if q > 0)
            dist = [abs(-math.log(q) - entropy) if q > 0 else math.inf for q in probs]
            keep, mass = set(), 0.0
            for j in sorted(range(len(s)), key=lambda j: dist[j]):
                keep.add(j)
                mass += probs[j]
                if mass >= p.typical_p:
                    break
            s = [x if j in keep else -math.inf for j, x in enumerate(s)]
    return torch.tensor(s, dtype=torch.float64).log_softmax(0)


def random_case(seed: int, batch: int = 5) -> tuple[torch.Tensor, list[list[int]]]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, V, generator=g) * 3
    prev = [
        torch.randint(0, N_REAL, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g).tolist()
        for _ in range(batch)
    ]
    return logits, prev


MIXED = [
    SamplingParams(),  # greedy
    SamplingParams(repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=0.7),  # greedy + penalties
    SamplingParams(do_sample=True, seed=3, temperature=0.7, top_k=9, repetition_penalty=0.8),
    SamplingParams(do_sample=True, seed=4, top_p=0.8, frequency_penalty=-0.5),
    SamplingParams(seed=5, temperature=1.4, typical_p=0.7, top_p=0.95, presence_penalty=1.0),
]


def full_logprobs(sampler: BatchSampler, logits: torch.Tensor, prev: list[list[int]]) -> list[dict[int, float]]:
    """The whole processed distribution per row, read back through alternatives (k = real vocab)."""
    out = sampler(logits, prev)
    return [dict(zip(ids, lps)) for ids, lps in zip(out.top_ids, out.top_logprobs)]


def test_greedy_is_argmax_with_logsoftmax_logprob():
    logits, prev = random_case(0)
    out = BatchSampler([SamplingParams()] * 5, V, V)(logits, prev)
    assert out.next_ids.dtype == torch.int64 and out.next_ids.tolist() == logits.argmax(-1).tolist()
    expect = logits.double().log_softmax(-1).gather(1, logits.argmax(-1, keepdim=True)).squeeze(1)
    torch.testing.assert_close(out.logprobs.double(), expect, atol=1e-5, rtol=0)
    assert out.top_ids == [[]] * 5 and out.top_logprobs == [[]] * 5


@pytest.mark.parametrize(
    "kw,field_name",
    [
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"typical_p": 0.0}, "typical_p"),
        ({"typical_p": 2.0}, "typical_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"frequency_penalty": float("inf")}, "frequency_penalty"),
        ({"presence_penalty": float("-inf")}, "presence_penalty"),
        ({"return_k_alternatives": 101}, "return_k_alternatives"),
        ({"return_k_alternatives": -1}, "return_k_alternatives"),
    ],
)
def test_invalid_params_name_field_and_value(kw, field_name):
    with pytest.raises(ValueError) as e:
        SamplingParams(**kw).validate()
    assert field_name in str(e.value) and str(next(iter(kw.values()))) in str(e.value)


def test_valid_params_pass():
    SamplingParams().validate()
    SamplingParams(temperature=0.0, top_p=1.0, typical_p=1.0, return_k_alternatives=100, seed=2**64 - 1).validate()


@pytest.mark.parametrize(
    "kw,greedy",
    [
        ({}, True),
        ({"do_sample": True}, False),
        ({"temperature": 0.7}, False),
        ({"top_k": 5}, False),
        ({"top_p": 0.9}, False),
        ({"typical_p": 0.9}, False),
        ({"temperature": 0.0}, True),
        ({"temperature": 0.0, "do_sample": True, "top_k": 3}, True),
        ({"repetition_penalty": 1.5}, True),
    ],
)
def test_sampling_rule_is_do_sample_or_warpers(kw, greedy):
    assert SamplingParams(**kw).is_greedy is greedy


def test_padded_vocab_never_chosen():
    logits, prev = random_case(1, batch=4)
    logits[:, N_REAL:] = 1e4
    params = [
        SamplingParams(return_k_alternatives=100),
        SamplingParams(do_sample=True, seed=9),
        SamplingParams(temperature=50.0, seed=10),
        SamplingParams(top_k=V, seed=11),
    ]
    sampler = BatchSampler(params, V, N_REAL)
    for _ in range(50):
        out = sampler(logits, prev)
        assert max(out.next_ids.tolist()) < N_REAL and torch.isfinite(out.logprobs).all()
    assert len(out.top_ids[0]) == N_REAL and max(out.top_ids[0]) < N_REAL


def test_processed_logprobs_and_alternatives_match_reference():
    for case in range(6):
        logits, prev = random_case(100 + case)
        params = [SamplingParams(**{**vars(p), "return_k_alternatives": 100}) for p in MIXED]
        out = BatchSampler(params, V, N_REAL)(logits, prev)
        for i, p in enumerate(params):
            ref = reference_logprobs(logits[i], prev[i], p, N_REAL)
            got = dict(zip(out.top_ids[i], out.top_logprobs[i]))
            assert sorted(got) == list(range(N_REAL))
            for tok, lp in got.items():
                assert (lp == -math.inf) == (ref[tok] == -math.inf) and (lp == -math.inf or abs(lp - ref[tok]) < 1e-4)
            assert out.top_logprobs[i] == sorted(out.top_logprobs[i], reverse=True)
            chosen = out.next_ids[i].item()
            assert abs(out.logprobs[i].item() - ref[chosen].item()) < 1e-4 and ref[chosen] > -math.inf
            if p.is_greedy:
                assert chosen == ref.argmax().item()


def test_alternatives_are_topk_of_processed_logprobs():
    logits, prev = random_case(7)
    params = [SamplingParams(**{**vars(p), "return_k_alternatives": k}) for p, k in zip(MIXED, [0, 1, 3, 5, 36])]
    out = BatchSampler(params, V, N_REAL)(logits, prev)
    assert out.top_ids[0] == [] and [len(x) for x in out.top_ids[1:]] == [1, 3, 5, N_REAL]
    for i, p in enumerate(params[1:], start=1):
        ref = reference_logprobs(logits[i], prev[i], p, N_REAL)
        best = sorted(ref[:N_REAL].tolist(), reverse=True)[: len(out.top_ids[i])]
        assert out.top_logprobs[i] == sorted(out.top_logprobs[i], reverse=True)
        for tok, lp, want in zip(out.top_ids[i], out.top_logprobs[i], best):
            assert lp == pytest.approx(want, abs=1e-4) and lp == pytest.approx(ref[tok].item(), abs=1e-4)
        assert len(set(out.top_ids[i])) == len(out.top_ids[i])


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    rep=st.floats(0.5, 2.0),
    freq=st.floats(-1, 1),
    pres=st.floats(-1, 1),
    temp=st.floats(0.3, 3.0),
    top_k=st.integers(0, 40),
    top_p=st.floats(0.05, 1.0),
    typical=st.floats(0.05, 1.0),
)
def test_random_params_match_reference(seed, rep, freq, pres, temp, top_k, top_p, typical):
    logits, prev = random_case(seed, batch=2)
    p = SamplingParams(
        temperature=temp,
        top_k=top_k,
        top_p=top_p,
        typical_p=typical,
        do_sample=True,
        seed=seed + 1,
        repetition_penalty=rep,
        frequency_penalty=freq,
        presence_penalty=pres,
        return_k_alternatives=100,
    )
    p.validate()
    got = full_logprobs(BatchSampler([SamplingParams(return_k_alternatives=100), p], V, N_REAL), logits, prev)[1]
    ref = reference_logprobs(logits[1], prev[1], p, N_REAL)
    kept_ref = {t for t in range(N_REAL) if ref[t] > -math.inf}
    kept = {t for t, lp in got.items() if lp > -math.inf}
    assert kept == kept_ref
    assert all(abs(got[t] - ref[t].item()) < 1e-4 for t in kept)


def test_penalties_match_naive_loop():
    logits, prev = random_case(11)
    prev[2] = [3, 3, 3, 7, 32]  # repeated ids: frequency counts them, presence once
    params = [
        SamplingParams(repetition_penalty=r, frequency_penalty=f, presence_penalty=q, return_k_alternatives=100)
        for r, f, q in [(1.0, 0.0, 0.0), (1.7, 0.0, 0.0), (1.3, 0.5, 0.25), (0.6, -0.3, 0.0), (1.0, 0.0, 2.0)]
    ]
    got = full_logprobs(BatchSampler(params, V, N_REAL), logits, prev)
    for i, p in enumerate(params):
        s = logits[i, :N_REAL].double().clone()
        for tok in range(N_REAL):
            c = prev[i].count(tok)
            if c:
                s[tok] = s[tok] * p.repetition_penalty if s[tok] < 0 else s[tok] / p.repetition_penalty
                s[tok] = s[tok] - p.frequency_penalty * c - p.presence_penalty
        ref = s.log_softmax(0)
        assert max(abs(got[i][t] - ref[t].item()) for t in range(N_REAL)) < 1e-4


def test_top_k_one_with_sampling_equals_greedy():
    for case in range(5):
        logits, prev = random_case(200 + case)
        pen = {"repetition_penalty": 1.4, "frequency_penalty": 0.3}
        sampled = BatchSampler(
            [SamplingParams(do_sample=True, top_k=1, seed=s + 1, **pen) for s in range(5)], V, N_REAL
        )
        greedy = BatchSampler([SamplingParams(**pen)] * 5, V, N_REAL)
        a, b = sampled(logits, prev), greedy(logits, prev)
        assert a.next_ids.tolist() == b.next_ids.tolist()
        assert torch.allclose(a.logprobs, torch.zeros(5))  # the only token left has probability 1


def test_tiny_top_p_keeps_the_best_token():
    logits, prev = random_case(12)
    out = BatchSampler([SamplingParams(top_p=1e-6, seed=s + 1) for s in range(5)], V, N_REAL)(logits, prev)
    assert out.next_ids.tolist() == logits[:, :N_REAL].argmax(-1).tolist()


def test_sample_frequencies_follow_processed_distribution():
    logits = torch.tensor([[1.0, 0.0, -1.0, 2.0, 0.5]]).repeat(4000, 1)
    params = [SamplingParams(temperature=2.0, seed=s + 1) for s in range(4000)]
    out = BatchSampler(params, 5, 5)(logits, [[]] * 4000)
    freq = torch.bincount(out.next_ids, minlength=5).double() / 4000
    assert (freq - (logits[0].double() / 2).softmax(0)).abs().max() < 0.03


@dataclass
class Req:
    key: int
    params: SamplingParams
    ids: list[int] = field(default_factory=lambda: [1, 2, 3])


def step(sampler: BatchSampler, reqs: list[Req]) -> None:
    """One decode step with logits that depend only on (request, position)."""
    logits = torch.stack(
        [torch.randn(V, generator=torch.Generator().manual_seed(997 * r.key + len(r.ids))) * 2 for r in reqs]
    )
    for r, t in zip(reqs, sampler(logits.to(torch.bfloat16), [r.ids for r in reqs]).next_ids.tolist()):
        r.ids.append(t)


def test_seeded_stream_independent_of_batching_filter_concatenate():
    pa = SamplingParams(do_sample=True, seed=1234, temperature=1.3, top_p=0.97, repetition_penalty=1.1)
    pc = SamplingParams(seed=77, top_k=20, typical_p=0.9)
    alone = {}
    for key, p in [(1, pa), (3, pc)]:
        r = Req(key, p)
        sampler = BatchSampler([p], V, N_REAL)
        for _ in range(12):
            step(sampler, [r])
        alone[key] = r.ids
    a, b, c = Req(1, pa), Req(2, SamplingParams(do_sample=True)), Req(3, pc)
    reqs = [b, a, c]
    sampler = BatchSampler([r.params for r in reqs], V, N_REAL)
    for _ in range(4):
        step(sampler, reqs)
    sampler, reqs = sampler.filter([2, 1]), [c, a]  # drop b, swap order
    for _ in range(4):
        step(sampler, reqs)
    d = Req(4, SamplingParams(do_sample=True, seed=5, temperature=0.5))
    sampler = BatchSampler.concatenate([BatchSampler([d.params], V, N_REAL), sampler])
    reqs = [d] + reqs
    for _ in range(4):
        step(sampler, reqs)
    assert a.ids == alone[1] and c.ids == alone[3]
    assert sampler.seeds[1:] == [77, 1234]


def test_random_seed_is_recorded_and_replays():
    p = SamplingParams(do_sample=True, temperature=1.5)  # seed 0: draw one
    s1, s2 = BatchSampler([p, SamplingParams()], V, N_REAL), BatchSampler([p], V, N_REAL)
    assert s1.seeds[0] != 0 and s1.seeds[0] != s2.seeds[0] and s1.seeds[1] == 0 and s1.generators[1] is None
    replay = BatchSampler([SamplingParams(do_sample=True, temperature=1.5, seed=s1.seeds[0])], V, N_REAL)
    r1, r2 = Req(5, p), Req(5, p)
    for _ in range(10):
        step(s1.filter([0]), [r1])
        step(replay, [r2])
    assert r1.ids == r2.ids


def test_input_logits_untouched_and_any_float_dtype():
    logits, prev = random_case(13)
    before = logits.clone()
    params = [SamplingParams(repetition_penalty=1.5, top_k=3, seed=1)] * 5
    BatchSampler(params, V, N_REAL)(logits, prev)
    assert torch.equal(logits, before)
    half = logits.half()
    p = SamplingParams(repetition_penalty=1.5)
    out = BatchSampler([p] * 5, V, N_REAL)(half, prev)
    assert out.logprobs.dtype == torch.float32
    assert out.next_ids.tolist() == [reference_logprobs(half[i], prev[i], p, N_REAL).argmax().item() for i in range(5)]


def test_prefill_logprobs_nan_first_then_raw_logsoftmax(monkeypatch):
    monkeypatch.setattr(logits_processors, "PREFILL_CHUNK_ROWS", 3)  # several chunks and a short last one
    g = torch.Generator().manual_seed(5)
    logits, ids = torch.randn(10, V, generator=g).to(torch.bfloat16), torch.randint(0, N_REAL, (10,), generator=g)
    logits[:, N_REAL:] = 50.0  # padded columns must not count
    lp = prefill_logprobs(logits, ids, N_REAL)
    assert lp.dtype == torch.float32 and lp.shape == (10,) and math.isnan(lp[0].item())
    for t in range(1, 10):
        expect = logits[t - 1, :N_REAL].double().log_softmax(0)[ids[t]].item()
        assert abs(lp[t].item() - expect) < 1e-5
    assert math.isnan(prefill_logprobs(logits[:1], ids[:1], N_REAL)[0].item())
