"""Speculative decoding with prompt-lookup drafts, fp32 on the CPU, against the same engine without drafts.

The claims: the output (greedy, seeded sampling, penalties, alternatives, stops) is the one without drafts,
while steps carry several accepted tokens (skipped_tokens counts them); drafts never pass a request's budget
(router slots exactly prompt + max_new_tokens - 1, in scattered blocks); the n-gram lookup proposes the
continuation of the latest longest match and turns itself off when its drafts keep failing; bad settings are
refused with a message naming them.
"""

from __future__ import annotations

import random

import pytest

from spec_helpers import Seen, Spy, close, engine, greedy_request, run
from worker.cli import build_parser
from worker.engine import prompt_lookup
from worker.engine.prompt_lookup import PromptLookup
from worker.engine.speculative import Speculation
from worker.engine.stopping import FinishReason

# input-copy prompts: the demo model learnt these sentences, so it copies them back and drafts are accepted
COPY = [
    "The capital of France is Paris, a city of light and old stone bridges. The capital of France is",
    "The quick brown fox jumps over the lazy dog by the river. The quick brown fox",
]
OPEN = "Water boils at"  # no repeated n-gram to copy from at first


def both(demo, requests, n: int = 4, **cfg) -> tuple[Seen, Seen]:
    """The same requests without and with drafts (fresh engines, fresh requests)."""
    model, tok = demo
    return run(engine(model, tok, 0, **cfg), requests()), run(engine(model, tok, n, **cfg), requests())


def test_prompt_lookup_proposes_what_followed_the_latest_longest_match():
    ids = [1, 2, 3, 9, 9, 2, 3, 7, 8, 4, 1, 2, 3]  # suffix [1, 2, 3] occurred at 0; [2, 3] also at 5
    assert PromptLookup().propose(ids, 3) == [9, 9, 2]  # the 3-gram wins over the later 2-gram
    assert PromptLookup().propose([5, 2, 3, 6, 4, 2, 3, 7, 1, 2, 3], 2) == [7, 1]  # latest 2-gram occurrence
    look = PromptLookup()
    seq = [4, 5, 6]
    assert look.propose(seq, 4) == []  # nothing repeats yet
    seq += [4]
    assert look.propose(seq, 4) == [5, 6, 4]  # the 1-gram [4]; the index grows with the sequence
    seq += [5, 6]
    assert look.propose(seq, 2) == [4, 5]
    assert look.propose(seq, 0) == []


def brute_force_lookup(ids: list[int], n: int) -> list[int]:
    """The longest suffix (3..1 tokens) with an earlier occurrence followed by a token: what followed its latest one."""
    for k in range(min(3, len(ids) - 1), 0, -1):
        starts = [i for i in range(len(ids) - k) if ids[i : i + k] == ids[-k:]]
        if starts:
            return ids[starts[-1] + k : starts[-1] + k + n]
    return []


def test_prompt_lookup_equals_a_brute_force_search_as_the_sequence_grows():
    rng = random.Random(0)
    for trial in range(40):
        vocab = rng.choice([2, 3, 5, 12])
        look, seq = PromptLookup(), []
        for _ in range(60):
            seq += rng.choices(range(vocab), k=rng.choice([1, 1, 3]))  # one token a step, or several accepted
            n = rng.randint(1, 6)
            assert look.propose(seq, n) == brute_force_lookup(seq, n), (trial, seq, n)


def test_prompt_lookup_turns_off_when_a_window_of_drafts_mostly_fails(caplog):
    look = PromptLookup()
    for _ in range(prompt_lookup.WINDOW):
        look.record(7, 4, 1)  # 25 % accepted: above MIN_RATE
    assert not look.off
    for _ in range(prompt_lookup.WINDOW - 1):
        look.record(7, 4, 0)
    look.record(7, 0, 0)  # a step without drafts does not count
    assert not look.off
    with caplog.at_level("INFO"):
        look.record(7, 4, 0)
    assert look.off and look.propose([1, 2, 1, 2], 4) == []
    assert "request 7: prompt lookup off (0 of 32 drafts accepted over 8 steps" in caplog.text


def test_speculate_setting_and_bad_values(demo, capsys):
    assert Speculation(4, 0).tokens == 4 and Speculation(0, 3).tokens == 3 and Speculation(2, 3).tokens == 2
    assert Speculation(0, 0).tokens == 0 and Speculation().describe() == "off"
    parser = build_parser()
    assert parser.parse_args(["serve", "m", "--speculative-tokens", "16"]).speculative_tokens == 16
    bad_values = [("17", "must be in [0, 16], got 17"), ("-1", "got -1"), ("x", "'x' is not an integer")]
    for bad, why in bad_values:
        with pytest.raises(SystemExit):
            parser.parse_args(["serve", "m", "--speculative-tokens", bad])
        err = capsys.readouterr().err
        assert "error: argument --speculative-tokens:" in err and why in err
    with pytest.raises(ValueError, match=r"speculative tokens must be in \[0, 16\], got 99"):
        engine(*demo, 99)


def test_greedy_output_is_unchanged_while_steps_accept_drafts(demo, monkeypatch):
    """Two copy prompts and an open one in one batch: identical tokens, logprobs and texts with drafts on."""
    _, tok = demo

    def requests():
        prompts = [*COPY, OPEN]
        return [greedy_request(i, tok.encode(p), 40, prefill_logprobs=i == 0) for i, p in enumerate(prompts)]

    off = run(engine(*demo, 0), requests())
    spy = Spy.on(monkeypatch)
    on = run(engine(*demo, 4), requests())
    for rid in range(3):
        assert on.tokens(rid) == off.tokens(rid) and len(on.tokens(rid)) == 40
        assert close(on.logprobs[rid], off.logprobs[rid]) and on.texts[rid] == off.texts[rid]
        assert on.done[rid].text == off.done[rid].text and on.done[rid].generated_tokens == 40
        assert on.done[rid].skipped_tokens == sum(len(s) - 1 for s in on.steps[rid])
        assert off.done[rid].skipped_tokens == 0 and all(len(s) == 1 for s in off.steps[rid])
    assert on.done[0].skipped_tokens >= 10 and max(len(s) for s in on.steps[0]) == 5  # runs of S + 1 tokens
    assert list(on.prompt) == list(off.prompt) == [0] and close(on.prompt[0][1:], off.prompt[0][1:])
    assert spy.accepted >= 20 and spy.proposed > spy.accepted  # some drafts were rejected too


def test_a_stop_in_the_middle_of_an_accepted_run_drops_the_rest(demo, monkeypatch):
    """The stop sequence (and eos) land inside a run of accepted tokens: the tokens after them are dropped."""
    model, tok = demo
    ids = tok.encode(COPY[1])
    probe = run(engine(model, tok, 4), [greedy_request(1, ids, 30)])
    k, at = next((k, sum(map(len, probe.steps[1][:k]))) for k, s in enumerate(probe.steps[1]) if len(s) >= 3)
    text = tok.decode(probe.tokens(1)[: at + 2])  # through the 2nd token of a run of >= 3
    spy = Spy.on(monkeypatch)
    off, on = both(
        demo, lambda: [greedy_request(1, ids, 30, stop=[text]), greedy_request(2, ids, 30, ignore_eos=False)]
    )
    assert on.tokens(1) == off.tokens(1) == probe.tokens(1)[: at + 2]
    assert on.done[1].finish_reason == FinishReason.FINISH_REASON_STOP_SEQUENCE and on.done[1].text == text
    assert on.done[1].skipped_tokens == sum(len(s) - 1 for s in on.steps[1]) and len(on.steps[1]) == k + 1
    last = [ids for rid, ids in spy.choices if rid == 1][-1]
    assert len(last) > len(on.steps[1][-1]) == 2  # the run went on past the stop
    assert on.tokens(2) == off.tokens(2) and on.done[2].finish_reason == off.done[2].finish_reason


@pytest.mark.parametrize("max_new", [2, 7])
def test_drafts_stay_inside_the_router_slots(demo, max_new):
    """Router blocks out of order, exactly prompt + max_new_tokens - 1 slots: max_new_tokens is reached mid-run
    and no verify row writes past the request's slots."""
    model, tok = demo
    ids = tok.encode(COPY[0])
    blocks = [200, 5, 121, 17, 9]
    slots = [b * 16 + j for b in blocks for j in range(16)][: len(ids) + max_new - 1]

    def requests():
        return [greedy_request(1, ids, max_new, blocks=blocks, slots=slots), greedy_request(2, ids, 40)]

    off, on = both(demo, requests)
    assert on.tokens(1) == off.tokens(1) == off.tokens(2)[:max_new] and on.tokens(2) == off.tokens(2)
    assert on.done[1].finish_reason == FinishReason.FINISH_REASON_LENGTH and on.done[1].generated_tokens == max_new


def test_penalties_and_alternatives_see_the_tokens_accepted_earlier_in_the_step(demo, monkeypatch):
    """Penalties at position j count the tokens accepted before j in the same step; return_k_alternatives
    stays aligned per token at batch 3 (one request without alternatives in between)."""
    _, tok = demo
    pen = dict(repetition_penalty=1.15, frequency_penalty=0.2, presence_penalty=0.1)

    def requests():
        return [
            greedy_request(1, tok.encode(COPY[0]), 30, return_k_alternatives=3, **pen),
            greedy_request(2, tok.encode(OPEN), 30),
            greedy_request(3, tok.encode(COPY[1]), 30, return_k_alternatives=2, **pen),
        ]

    spy = Spy.on(monkeypatch)
    off, on = both(demo, requests)
    assert spy.accepted >= 5
    for rid in (1, 2, 3):
        assert on.tokens(rid) == off.tokens(rid) and close(on.logprobs[rid], off.logprobs[rid])
        assert on.alternatives[rid] == off.alternatives[rid]
    assert len(on.alternatives[1]) == 30 and all(len(a) == 3 for a in on.alternatives[1])
    assert on.alternatives[2] == [] and all(len(a) == 2 for a in on.alternatives[3])


def test_seeded_sampling_draws_the_same_tokens(demo, monkeypatch):
    """A seeded request draws once per token with or without drafts: the same tokens, seed for seed."""
    _, tok = demo
    sample = dict(do_sample=True, temperature=0.7, top_k=20, top_p=0.95)

    def requests():
        return [greedy_request(i, tok.encode(COPY[i % 2]), 24, seed=1000 + i, **sample) for i in range(6)]

    spy = Spy.on(monkeypatch)
    off, on = both(demo, requests)
    assert spy.accepted >= 10
    for rid in range(6):
        assert on.tokens(rid) == off.tokens(rid) and on.done[rid].seed == off.done[rid].seed == 1000 + rid


def test_greedy_rows_choose_every_position_in_one_call(demo, monkeypatch):
    """Greedy rows (penalties too) are chosen at every position in one chooser call per step; a sampling row
    needs a call per position it reaches (round by round: one draw per token)."""
    from worker.engine.sampling import BatchSampler

    _, tok = demo
    calls = []
    call = BatchSampler.__call__
    monkeypatch.setattr(
        BatchSampler, "__call__", lambda self, *a, **kw: calls.append(len(self)) or call(self, *a, **kw)
    )
    spy = Spy.on(monkeypatch)
    plain = run(engine(*demo, 4), [greedy_request(1, tok.encode(COPY[0]), 30), greedy_request(2, tok.encode(OPEN), 30)])
    steps = max(len(plain.steps[1]), len(plain.steps[2]))
    assert spy.accepted >= 10 and len(calls) == steps and max(calls) > 2  # the drafts' positions in the one call
    calls.clear()
    spy.choices.clear()
    sample = dict(do_sample=True, temperature=0.5, seed=3)
    penalty = dict(repetition_penalty=1.01, frequency_penalty=0.01)
    reqs = [greedy_request(1, tok.encode(COPY[0]), 30, **sample), greedy_request(2, tok.encode(COPY[1]), 3, **penalty)]
    run(engine(*demo, 4), reqs)
    sampled = [ids for rid, ids in spy.choices if rid == 1]
    assert len(calls) == sum(map(len, sampled)) > len(sampled)  # a call per position row 1 reached
