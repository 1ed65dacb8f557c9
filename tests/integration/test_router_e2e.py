"""End to end through the Router: a real shard process on the demo model, driven by `router_client`'s
serving loop (continuous batching over Prefill / Decode, health probes) over a real unix socket.

Expectations never come from a recorded output: they are the float64 reference (tests/reference.py),
the sentences the demo model was trained on (scripts/make_demo_model.py), or the same request run
alone through the same router.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

from make_demo_model import BASE_TEXTS
from reference import ref_forward, ref_greedy

TOL = 1e-4  # the shard computes in fp32, the reference in float64
SAMPLING = dict(do_sample=True, temperature=0.8, top_k=40, top_p=0.95)
# Prompts the demo model never saw: their next-token distributions are wide enough that sampling
# really samples (the trained prompts' continuations are near-certain at any temperature).
OPEN_PROMPTS = ["a small sea", "Once"]
pytestmark = pytest.mark.usefixtures("wire")  # record the whole module's traffic (see the block-0 test)


@pytest.fixture(scope="module")
def greedy_ref(ref_model, tok):
    """`greedy_ref(prompt_ids, n)`: the reference's greedy continuation, stopping after eos (cached)."""
    state, cfg = ref_model
    eos = tuple(sorted(tok.eos_token_ids))

    @functools.cache
    def run(prompt_ids: tuple[int, ...], n: int, stop_at_eos: bool = True) -> list[int]:
        return ref_greedy(state, cfg, list(prompt_ids), n, stop_ids=eos if stop_at_eos else ())

    return run


def alone(router, prompt, **kw):
    """Run one request with nothing else in flight: the batching-free expectation."""
    assert router.debug_state()["in_flight"] == [] and router.debug_state()["queued"] == []
    return router.generate(prompt, timeout=60, **kw)


def ref_logprobs(ref_model, tok, ids: list[int], prompt_len: int) -> torch.Tensor:
    """Float64 log-softmax over the real vocabulary at every position of `ids`: [len(ids), n_real_vocab]."""
    state, cfg = ref_model
    logits = ref_forward(state, cfg, ids, prompt_len=prompt_len)
    return torch.log_softmax(logits[:, : tok.n_real_vocab], dim=-1)


# ---------------------------------------------------------------------------------------------- greedy


@pytest.mark.parametrize("k", range(len(BASE_TEXTS)))
def test_greedy_equals_reference_and_training_text(router, tok, greedy_ref, k):
    prompt, continuation = BASE_TEXTS[k]
    ids = tok.encode(prompt)
    res = alone(router, prompt, stopping=dict(max_new_tokens=48))
    expect = greedy_ref(tuple(ids), 48)
    assert res.token_ids == expect
    assert res.token_ids[-1] == tok.endoftext_id and res.finish_reason == "eos_token"
    assert res.text == continuation  # eos is a special token: not part of generated_text
    assert res.generated_tokens == len(expect) and res.prefill_tokens_length == len(ids)
    assert res.seed is None  # greedy


# ---------------------------------------------------------------------------------- continuous batching


def test_continuous_batching_matches_each_request_alone(router, shard_stats, wire):
    """Requests join a running batch (Prefill, then Decode(batches=[running, new])), leave it at
    different steps, and the batch ends; every request still gets exactly the tokens it gets alone,
    greedy or seeded sampling."""
    # name -> (prompt, parameters, stopping); they finish at different steps: eos, 12, 20, 6, 16 tokens,
    # and F at its Prefill (whose answer then has no batch to merge)
    specs = {
        "A": (BASE_TEXTS[3][0], {}, dict(max_new_tokens=48)),
        "B": (BASE_TEXTS[0][0], {}, dict(max_new_tokens=12)),
        "C": (OPEN_PROMPTS[0], dict(SAMPLING, seed=7), dict(max_new_tokens=20, ignore_eos_token=True)),
        "D": (BASE_TEXTS[1][0], {}, dict(max_new_tokens=6)),
        "E": (OPEN_PROMPTS[1], dict(SAMPLING, seed=11), dict(max_new_tokens=16, ignore_eos_token=True)),
        "F": (BASE_TEXTS[4][0], {}, dict(max_new_tokens=1)),
    }
    solo = {name: alone(router, p, parameters=params, stopping=stop) for name, (p, params, stop) in specs.items()}
    assert len(solo["A"].token_ids) > 20  # A outlives everything submitted after its 5th token

    def submit(name):
        p, params, stop = specs[name]
        return router.submit(p, parameters=params, stopping=stop)

    start = len(wire)
    handles = {"A": submit("A")}
    for n, _ in enumerate(handles["A"].stream(timeout=60), start=1):
        if n == 2:
            handles.update(B=submit("B"), C=submit("C"))
        if n == 5:
            handles.update(D=submit("D"), E=submit("E"), F=submit("F"))

    results = {name: h.result(timeout=60) for name, h in handles.items()}
    for name, res in results.items():
        assert (res.token_ids, res.text, res.finish_reason) == (
            solo[name].token_ids,
            solo[name].text,
            solo[name].finish_reason,
        ), name
    assert results["C"].seed == 7 and results["E"].seed == 11

    # on the wire: new requests were merged into A's running batch, which then shrank as they finished
    a = handles["A"].request_id
    steps = [batches for kind, batches in wire[start:] if kind == "decode" and a in batches[0]]
    joined = {rid for batches in steps for rid in batches[0]}
    assert {handles[n].request_id for n in "BCDE"} <= joined  # F finished at its Prefill
    if not (router.info.chunked_prefill and router.config.chunked_prefill):
        assert sum(len(batches) == 2 for batches in steps) >= 2  # Decode([running, new]) at least twice
    # chunked: Prefill(new, cached_batch=running) merged them in one forward (test_prefix_cache_e2e.py)
    sizes = [sum(map(len, batches)) for batches in steps]
    assert max(sizes) >= 3 and sizes[-1] < max(sizes), sizes
    # and it ended: nothing left on the router or the shard
    state = router.debug_state()
    assert state["running_batch"] is None and state["in_flight"] == [] and state["used_blocks"] == 0
    stats = shard_stats()
    assert stats["batches"] == 0 and stats["requests"] == 0


# ------------------------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("prompt", OPEN_PROMPTS)
def test_seeded_sampling_is_reproducible(router, prompt):
    stop = dict(max_new_tokens=12, ignore_eos_token=True)
    runs = {
        seed: [alone(router, prompt, parameters=dict(SAMPLING, seed=seed), stopping=stop) for _ in range(2)]
        for seed in (1, 2, 3, 4)
    }
    for seed, (first, second) in runs.items():
        assert first.token_ids == second.token_ids and first.text == second.text
        assert first.seed == second.seed == seed
    # the seed decides: different seeds draw different tokens (else this test would prove nothing)
    assert len({tuple(r[0].token_ids) for r in runs.values()}) > 1
    greedy = alone(router, prompt, stopping=stop)
    assert any(r[0].token_ids != greedy.token_ids for r in runs.values())


def test_unseeded_sampling_reports_a_seed_that_reproduces_it(router):
    prompt, stop = OPEN_PROMPTS[0], dict(max_new_tokens=12, ignore_eos_token=True)
    first, second = (alone(router, prompt, parameters=SAMPLING, stopping=stop) for _ in range(2))
    assert first.seed is not None and second.seed is not None and first.seed != second.seed
    for res in (first, second):
        again = alone(router, prompt, parameters=dict(SAMPLING, seed=res.seed), stopping=stop)
        assert again.token_ids == res.token_ids and again.seed == res.seed


# ---------------------------------------------------------------------------------------------- stops


def test_stop_sequence_spanning_tokens(router, tok, greedy_ref):
    prompt, continuation = BASE_TEXTS[0]  # " Paris, a city of light ..."
    ref = greedy_ref(tuple(tok.encode(prompt)), 48)
    res = alone(router, prompt, stopping=dict(max_new_tokens=48, stop_sequences=["never there", "city"]))
    assert res.finish_reason == "stop_sequence"
    assert res.text == continuation[: continuation.index("city") + len("city")] and res.text.endswith("city")
    assert res.token_ids == ref[: len(res.token_ids)]
    assert "city" not in tok.decode(res.token_ids[:-1])  # it stopped at the first token completing it
    assert len(tok.encode(" city")) > 1  # the stop sequence spans several tokens


def test_eos_length_and_ignore_eos(router, tok, greedy_ref):
    prompt, continuation = BASE_TEXTS[4]
    ids = tuple(tok.encode(prompt))
    ref = greedy_ref(ids, 48)
    n = len(ref)  # the continuation, then eos

    eos = alone(router, prompt, stopping=dict(max_new_tokens=48))
    assert eos.finish_reason == "eos_token" and eos.token_ids == ref and eos.token_ids[-1] == tok.endoftext_id
    assert eos.text == continuation

    short = alone(router, prompt, stopping=dict(max_new_tokens=5))
    assert short.finish_reason == "length" and short.token_ids == ref[:5] and short.generated_tokens == 5

    exact = alone(router, prompt, stopping=dict(max_new_tokens=n))  # length is checked before eos
    assert exact.finish_reason == "length" and exact.token_ids == ref

    past = alone(router, prompt, stopping=dict(max_new_tokens=n + 3, ignore_eos_token=True))
    assert past.finish_reason == "length" and past.generated_tokens == n + 3
    assert past.token_ids == greedy_ref(ids, n + 3, stop_at_eos=False)
    assert past.token_ids[n - 1] == tok.endoftext_id  # it ran through eos
    assert past.text == tok.decode(past.token_ids, skip_special_tokens=True)


def test_truncate_keeps_the_last_tokens(router, tok, greedy_ref):
    prompt_text, continuation = BASE_TEXTS[0]
    prompt = tok.encode(prompt_text)
    tail = prompt[-4:]
    res = alone(router, prompt, truncate=len(tail), prefill_logprobs=True, stopping=dict(max_new_tokens=12))
    just_tail = alone(router, tail, stopping=dict(max_new_tokens=12))
    assert res.token_ids == just_tail.token_ids == greedy_ref(tuple(tail), 12)
    assert res.prefill_tokens_length == len(tail) and [t.id for t in res.prefill_tokens] == tail
    # the dropped tokens mattered: the whole prompt continues differently (with the trained sentence)
    whole = alone(router, prompt, stopping=dict(max_new_tokens=12))
    assert whole.prefill_tokens_length == len(prompt) and continuation.startswith(whole.text)
    assert whole.token_ids != res.token_ids


# -------------------------------------------------------------------------------------------- logprobs


# a trained prompt, and one the model never saw: there the padded vocabulary rows of lm_head carry
# up to ~2e-3 of the softmax mass, so leaving them unmasked shows in the logprobs
@pytest.mark.parametrize("text", [BASE_TEXTS[2][0], "of and to in"])
def test_logprobs_alternatives_and_prefill_logprobs_match_reference(router, ref_model, tok, text):
    prompt = tok.encode(text)
    P = len(prompt)
    handle = router.submit(
        prompt, parameters=dict(return_k_alternatives=3), stopping=dict(max_new_tokens=10), prefill_logprobs=True
    )
    events = list(handle.stream(timeout=60))
    res = handle.result()
    generated = [e.id for e in events]
    assert generated == res.token_ids and len(generated) == 10
    lp = ref_logprobs(ref_model, tok, prompt + generated, prompt_len=P)  # [P + 10, n_real]

    for k, event in enumerate(events):
        row = lp[P - 1 + k]  # the distribution the k-th new token was drawn from
        assert event.id == int(row.argmax())
        assert math.isclose(event.logprob, float(row[event.id]), abs_tol=TOL), (k, event.logprob, float(row[event.id]))
        top = torch.topk(row, 3)
        assert [a.id for a in event.alternatives] == top.indices.tolist()
        for alt, want in zip(event.alternatives, top.values.tolist()):
            assert math.isclose(alt.logprob, want, abs_tol=TOL)
            assert alt.text == tok.token_text(alt.id)
        assert not event.special

    pre = res.prefill_tokens
    assert [t.id for t in pre] == prompt and res.prefill_tokens_length == P
    assert math.isnan(pre[0].logprob)
    for t in range(1, P):
        assert math.isclose(pre[t].logprob, float(lp[t - 1, prompt[t]]), abs_tol=TOL), t
    assert [t.text for t in pre] == [tok.token_text(i) for i in prompt]


# ---------------------------------------------------------------------------------------------- UTF-8


def test_utf8_characters_split_across_tokens_stream_whole(router, tok):
    prompt, continuation = BASE_TEXTS[5]  # "Ünïcödé and 日本語 say" -> " hello, 世界! Grüße aus Zürich."
    handle = router.submit(prompt, stopping=dict(max_new_tokens=48))
    events = list(handle.stream(timeout=60))
    res = handle.result()
    assert res.text == continuation and [e.id for e in events] == res.token_ids
    # the demo tokenizer really splits characters: some generated tokens are not UTF-8 on their own
    partial = [k for k, e in enumerate(events) if not _is_utf8(tok.decode_bytes([e.id]))]
    assert partial, "no token of the continuation splits a character: the test proves nothing"
    waited = False
    for k, e in enumerate(events):
        assert "\ufffd" not in e.text, (k, e)
        so_far = tok.decode_bytes(res.token_ids[: k + 1])  # every byte generated up to this event
        shown = "".join(x.text for x in events[: k + 1]).encode()
        # the texts so far are exactly the bytes so far, less an unfinished character at the end
        assert so_far.startswith(shown), (k, e)
        pending = so_far[len(shown) :]
        assert len(pending) < 4 and not _is_utf8(pending) or not pending, (k, pending)
        waited |= e.text == "" and bool(pending)
    assert waited, "no event held back the bytes of an unfinished character"
    assert "".join(e.text for e in events if not e.special) == res.text
    assert events[-1].special and events[-1].id == tok.endoftext_id


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


# ------------------------------------------------------------------------------ health and failures


def test_health_probe_while_requests_run(router, shard_stats, wire):
    """LoRAX's liveness probe (a one-token Prefill on block 0 with batch and request id 2^64-1, then
    ClearCache) answers while a batch is decoding, and the batch's tokens and logprobs are those it
    gets without the probes."""
    from router_client.messages import HEALTH_ID

    specs = [(BASE_TEXTS[3][0], dict(max_new_tokens=48)), (BASE_TEXTS[1][0], dict(max_new_tokens=48))]
    solo = [list(router.submit(p, stopping=s).stream(timeout=60)) for p, s in specs]  # one at a time
    start = len(wire)
    handles = [router.submit(p, stopping=s) for p, s in specs]
    events: list[list] = [[], []]
    for n, event in enumerate(handles[0].stream(timeout=60), start=1):
        events[0].append(event)
        if n == 2:
            assert [router.health_probe() for _ in range(3)] == [True, True, True]
    events[1] = list(handles[1].stream(timeout=60))
    for got, want in zip(events, solo):
        assert [e.id for e in got] == [e.id for e in want]
        assert all(math.isclose(g.logprob, w.logprob, abs_tol=1e-5) for g, w in zip(got, want))
    # on the wire: three probes on block 0 / slot 0 with ids 2^64-1, between decodes of the live batch
    sent = wire[start:]
    probes = [k for k, (kind, batch) in enumerate(sent) if kind == "prefill" and batch.id == HEALTH_ID]
    assert len(probes) == 3
    for k in probes:
        (req,) = sent[k][1].requests
        assert (req.id, list(req.blocks), list(req.slots)) == (HEALTH_ID, [0], [0])
    live = [
        k
        for k, (kind, batches) in enumerate(sent)
        if kind == "decode" and any(handles[0].request_id in b for b in batches)
    ]
    assert live[0] < probes[0] and probes[-1] < live[-1]
    assert shard_stats()["batches"] == 0  # the probe's batch was cleared too


@pytest.mark.parametrize("bad, needle", [(dict(top_p=0.0), "top_p"), (dict(watermark=True), "watermark")])
def test_a_rejected_request_fails_alone(router, shard_stats, wire, bad, needle):
    """A request the shard refuses (the router does not pre-check these) fails with the shard's
    message; the batch already running is untouched and nothing leaks."""
    from router_client.requests import RequestError

    prompt = BASE_TEXTS[2][0]
    solo = alone(router, prompt, stopping=dict(max_new_tokens=48))
    start = len(wire)
    running = router.submit(prompt, stopping=dict(max_new_tokens=48))
    stream = running.stream(timeout=60)
    next(stream)
    bad_handle = router.submit(BASE_TEXTS[0][0], parameters=bad, stopping=dict(max_new_tokens=8))
    with pytest.raises(RequestError, match=needle):
        bad_handle.result(timeout=60)
    list(stream)
    assert running.result().token_ids == solo.token_ids
    # the refused Prefill came while the other request was decoding
    sent = wire[start:]
    refused = [
        k
        for k, (kind, batch) in enumerate(sent)
        if kind == "prefill" and bad_handle.request_id in [r.id for r in batch.requests]
    ]
    live = [k for k, (kind, batches) in enumerate(sent) if kind == "decode" and running.request_id in batches[0]]
    assert len(refused) == 1 and live[0] < refused[0] < live[-1]
    state = router.debug_state()
    assert state["used_blocks"] == 0 and state["in_flight"] == []
    assert shard_stats()["batches"] == 0


def test_block_0_is_never_handed_to_a_request(router, wire):
    """Block 0 is the health probe's: no request the router sent in this module was given it, and
    every request's slots lie in its own blocks."""
    from router_client.messages import HEALTH_ID

    router.generate(BASE_TEXTS[0][0], stopping=dict(max_new_tokens=4), timeout=60)  # at least one request
    block_size = router.debug_state()["block_size"]
    requests = [r for kind, batch in wire if kind == "prefill" for r in batch.requests if r.id != HEALTH_ID]
    assert requests
    for r in requests:
        assert r.blocks and 0 not in r.blocks, r.id
        assert {s // block_size for s in r.slots} <= set(r.blocks), r.id
