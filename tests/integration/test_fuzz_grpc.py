"""Fuzz of the gRPC surface against a real shard process (demo model), with hypothesis.

Each example is a short sequence of Prefill / Decode / FilterBatch / ClearCache / Warmup / LoadAdapter /
OffloadAdapter / DownloadAdapter calls built from well-formed messages with adversarial mutations (ids >= vocab,
empty prompts, blocks and slots that disagree or point outside the router's blocks, duplicate ids, unknown
batches, NaN/inf/extreme sampling values, max_new_tokens 0 or 2^32-1, empty stop strings, adapter ids with
`..`, absolute paths or huge strings, cache_len >= prompt). Claims: every call answers OK or a clear refusal
within its deadline (never UNKNOWN/INTERNAL), and after each sequence and a ClearCache no batch is cached,
every shard-owned block is free and a known pair of greedy requests gives exactly the reference tokens.
QWEN_FUZZ_EXAMPLES sets the number of sequences (default 40: CI-sized).
"""

from __future__ import annotations

import collections
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from reference import ref_greedy
from worker.pb import generate_pb2 as pb

BS = 16
U32, U64 = 2**32 - 1, 2**64 - 1
DEADLINE_S = 60.0  # a call slower than this on the tiny model is a hang
ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
EXAMPLES = int(os.environ.get("QWEN_FUZZ_EXAMPLES", "40"))
RANDOM = os.environ.get("QWEN_FUZZ_RANDOM") is not None  # long runs: new sequences, the first failure unshrunk
KNOWN = [[3, 4, 5, 6], [7, 8, 9, 10, 11, 12]]  # the known greedy requests checked after every sequence
KNOWN_NEW = 8

FLOATS = st.one_of(
    st.sampled_from(
        [0.0, -0.0, 1.0, -1.0, 0.5, 2.0, 1e-45, 1e-40, 1e-30, 1e-4, 1e4, 1e38, -1e38, 3.4e38, math.nan, math.inf]
        + [-math.inf]
    ),
    st.floats(width=32),
)
UINT32 = st.one_of(st.sampled_from([0, 1, 2, 15, 16, 17, 255, 256, 4096, 2**31, U32]), st.integers(0, U32))
ADAPTER_IDS = st.one_of(
    st.sampled_from(["pirate", "robot", "", "..", "../adapters/pirate", "pirate/../robot", "/etc", "/tmp", "a\x00b"]),
    st.text(max_size=40),
    st.integers(1_000, 100_000).map(lambda n: "x" * n),
)


@dataclass
class Shard:
    """What the fuzzer knows of the shard: its stub and limits, and the batches it believes are live."""

    stub: object
    n_real: int
    router_blocks: int
    live: dict[int, list[int]] = field(default_factory=dict)
    next_id: int = 100  # fresh batch and request ids; adversarial ones are drawn from 0..12 and the u64 extremes
    outcomes: collections.Counter = field(default_factory=collections.Counter)  # (method, code) -> calls

    def call(self, method: str, request: object) -> object | None:
        """One RPC; the response, or None when it was refused with an allowed code."""
        try:
            response = getattr(self.stub, method)(request, timeout=DEADLINE_S)
        except grpc.RpcError as err:
            code = err.code()
            self.outcomes[(method, code.name)] += 1
            if os.environ.get("QWEN_FUZZ_VERBOSE"):
                print(method, code.name, err.details()[:200])
            assert code in ALLOWED, f"{method} answered {code.name}: {err.details()}\n{request}"
            assert "Stream removed" not in (err.details() or ""), f"{method}: the answer was lost: {err.details()}"
            assert code != grpc.StatusCode.DEADLINE_EXCEEDED
            return None
        self.outcomes[(method, "OK")] += 1
        return response


def stats(stub) -> dict:
    _, call = stub.Health.with_call(pb.HealthRequest(), timeout=DEADLINE_S)
    return json.loads(dict(call.trailing_metadata())["x-qwen-worker-stats"])


# ---------------------------------------------------------------- requests: well formed, then mutated
def well_formed(draw: Callable, rid: int, shard: Shard) -> pb.Request:
    ids = draw(st.lists(st.integers(0, shard.n_real - 1), min_size=1, max_size=40))
    max_new = draw(st.integers(1, 8))
    req = pb.Request(
        id=rid,
        inputs="",
        tokenized_inputs=pb.TokenizedInputs(ids=ids),
        parameters=pb.NextTokenChooserParameters(
            temperature=draw(st.sampled_from([1.0, 0.7, 0.0])),
            top_k=draw(st.sampled_from([0, 5])),
            top_p=1.0,
            typical_p=1.0,
            do_sample=draw(st.booleans()),
            seed=draw(st.integers(0, 2**63)),
            repetition_penalty=draw(st.sampled_from([1.0, 1.3])),
        ),
        stopping_parameters=pb.StoppingCriteriaParameters(max_new_tokens=max_new),
        prefill_logprobs=draw(st.booleans()),
    )
    if draw(st.booleans()):  # router-allocated blocks inside the router's range
        n = len(ids) + max_new - 1
        n_blocks = math.ceil(n / BS)
        first = draw(st.integers(1, shard.router_blocks - n_blocks))
        req.blocks[:] = range(first, first + n_blocks)
        req.slots[:] = [b * BS + j for b in req.blocks for j in range(BS)][:n]
    return req


def _ids(draw, req, shard):
    bad = draw(st.sampled_from([shard.n_real, shard.n_real + 1, 575, 576, 100_000, U32]))
    req.tokenized_inputs.ids.insert(draw(st.integers(0, len(req.tokenized_inputs.ids))), bad)


def _empty_prompt(draw, req, shard):
    del req.tokenized_inputs.ids[:]
    req.inputs = draw(st.sampled_from(["", " ", "\x00", "héllo wörld", "<|im_end|>"]) | st.text(max_size=60))


def _blocks(draw, req, shard):
    choice = draw(st.integers(0, 5))
    if choice == 0:
        req.blocks[:] = [shard.router_blocks]  # the shard's first own block
        req.slots[:] = [shard.router_blocks * BS + j for j in range(len(req.slots) or 1)]
    elif choice == 1:
        req.blocks.append(draw(st.sampled_from([shard.router_blocks, shard.router_blocks + 1, 4095, U32])))
    elif choice == 2 and req.slots:
        del req.slots[-1]
    elif choice == 3:
        req.slots.append(draw(UINT32))
    elif choice == 4:
        req.blocks[:] = []
    else:
        req.slots[:] = [draw(UINT32) for _ in range(draw(st.integers(0, 4)))]


def _sampling(draw, req, shard):
    p = req.parameters
    name = draw(st.sampled_from(["temperature", "top_p", "typical_p", "repetition_penalty", "frequency_penalty"]))
    setattr(p, name if name != "frequency_penalty" else draw(st.sampled_from([name, "presence_penalty"])), draw(FLOATS))
    p.do_sample = draw(st.booleans())
    if draw(st.booleans()):
        p.top_k = draw(UINT32)
    if draw(st.booleans()):
        p.return_k_alternatives = draw(st.sampled_from([0, 1, 100, 101, U32]))
    if draw(st.booleans()):
        p.seed = draw(st.sampled_from([0, 1, 2**63, U64]))
    if draw(st.integers(0, 9)) == 0:
        p.watermark = True
    if draw(st.integers(0, 9)) == 0:
        p.schema = draw(st.sampled_from(["", "{}", "not json", '{"type": "object"}']))


def _stopping(draw, req, shard):
    s = req.stopping_parameters
    s.max_new_tokens = draw(st.sampled_from([0, 1, 2**31, U32]) | UINT32)
    if draw(st.booleans()):
        s.stop_sequences[:] = draw(st.lists(st.sampled_from(["", " ", "\x00", "a"]) | st.text(max_size=8), max_size=3))
    s.ignore_eos_token = draw(st.booleans())


def _cache(draw, req, shard):
    n = len(req.tokenized_inputs.ids)
    req.cache_len = draw(st.sampled_from([n, n + 1, max(n - 1, 0), U32]))
    if draw(st.booleans()):
        req.chunk_len = draw(st.sampled_from([0, 1, U32]))


def _misc(draw, req, shard):
    req.adapter_index = draw(st.sampled_from([0, 1, 2, 3, 99, U32]))
    req.truncate = draw(st.sampled_from([0, 1, 3, U32]))


def _long(draw, req, shard):
    """A prompt past the model's seq_length (dynamic NTK) on router blocks, or on too few of them."""
    ids = draw(st.lists(st.integers(0, shard.n_real - 1), min_size=200, max_size=700))
    req.tokenized_inputs.ids[:] = ids
    # slots for the prompt and the new tokens (a huge max_new_tokens from _stopping: 64 of them, too few slots)
    n = len(ids) + min(req.stopping_parameters.max_new_tokens, 64) - 1 - draw(st.sampled_from([0, 0, 1]))
    req.blocks[:] = range(1, 1 + math.ceil(n / BS))
    req.slots[:] = [b * BS + j for b in req.blocks for j in range(BS)][:n]


MUTATIONS = [_ids, _empty_prompt, _blocks, _sampling, _stopping, _cache, _misc, _long]


def fresh_or_adversarial_id(draw: Callable, shard: Shard) -> int:
    if draw(st.integers(0, 3)) < 3:  # hypothesis leans to small draws: the common case is the smallest
        shard.next_id += 1
        return shard.next_id
    return draw(st.integers(0, 12) | st.sampled_from([2**63, U64]))


def request(draw: Callable, shard: Shard, mutate: bool = True) -> pb.Request:
    if not mutate:
        shard.next_id += 1
        return well_formed(draw, shard.next_id, shard)
    req = well_formed(draw, fresh_or_adversarial_id(draw, shard), shard)
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 1, 2, 3]))):
        draw(st.sampled_from(MUTATIONS))(draw, req, shard)
    return req


# ---------------------------------------------------------------- calls
# The draws never depend on the shard's answers (hypothesis replays an example by its draws): what is live
# only selects among values drawn regardless.
def batch_id(draw: Callable, shard: Shard) -> int:
    live, pick, other = draw(st.integers(0, 3)), draw(st.integers(0, 2**16)), draw(st.integers(0, 12) | st.just(U64))
    return sorted(shard.live)[pick % len(shard.live)] if shard.live and live < 3 else other


def cached(bid: int, shard: Shard) -> pb.CachedBatch:
    rids = shard.live.get(bid, [])
    return pb.CachedBatch(id=bid, request_ids=rids, size=len(rids))


def do_prefill(draw, shard, mutate: bool = True):
    reqs = [request(draw, shard, mutate) for _ in range(draw(st.integers(1, 4)))]
    msg = pb.PrefillRequest(batch=pb.Batch(id=fresh_or_adversarial_id(draw, shard), requests=reqs, size=len(reqs)))
    old = batch_id(draw, shard) if mutate and draw(st.integers(0, 2)) == 2 else None
    if old is not None:
        msg.cached_batch.CopyFrom(cached(old, shard))
    resp = shard.call("Prefill", msg)
    if resp is not None:
        if old is not None:
            shard.live.pop(old, None)
        if resp.HasField("batch"):
            shard.live[resp.batch.id] = list(resp.batch.request_ids)


def do_decode(draw, shard):
    ids = [batch_id(draw, shard) for _ in range(draw(st.sampled_from([1, 1, 2, 3, 0])))]
    resp = shard.call("Decode", pb.DecodeRequest(batches=[cached(b, shard) for b in ids]))
    if resp is not None or len(set(ids)) == len(ids):  # a failed step drops its batches too
        for b in ids:
            shard.live.pop(b, None)
    if resp is not None and resp.HasField("batch"):
        shard.live[resp.batch.id] = list(resp.batch.request_ids)


def do_filter(draw, shard):
    bid = batch_id(draw, shard)
    order = draw(st.lists(st.integers(0, 2**16), max_size=8))  # sort keys: a permutation of the batch's ids
    drop, extra = draw(st.integers(0, 8)), draw(st.integers(0, 3)) == 3
    stray = draw(st.sampled_from(["dup", "dup", "other", "max"])), draw(st.integers(0, 50))
    rids = shard.live.get(bid, [])
    keys = [order[i] if i < len(order) else i for i in range(len(rids))]
    keep = [r for _, r in sorted(zip(keys, rids))][min(drop, len(rids)) :]
    if extra:
        keep.append({"dup": (keep or [0])[0], "other": stray[1], "max": U64}[stray[0]])
    resp = shard.call("FilterBatch", pb.FilterBatchRequest(batch_id=bid, request_ids=keep))
    if resp is not None:
        if resp.batch.size:
            shard.live[bid] = list(resp.batch.request_ids)
        else:
            shard.live.pop(bid, None)


def do_clear(draw, shard):
    if draw(st.booleans()):
        bid = batch_id(draw, shard)
        if shard.call("ClearCache", pb.ClearCacheRequest(id=bid)) is not None:
            shard.live.pop(bid, None)
    elif shard.call("ClearCache", pb.ClearCacheRequest()) is not None:
        shard.live.clear()


def do_warmup(draw, shard):
    reqs = [request(draw, shard) for _ in range(draw(st.integers(0, 3)))]
    for r in reqs:
        del r.blocks[:], r.slots[:]
        if draw(st.booleans()):
            r.inputs = draw(st.text(max_size=200))
    msg = pb.WarmupRequest(
        batch=pb.Batch(id=0, requests=reqs, size=len(reqs)),
        max_input_length=draw(st.sampled_from([0, 1, 64, U32])),
        max_prefill_tokens=draw(UINT32),
        max_new_tokens=draw(UINT32),
    )
    if shard.call("Warmup", msg) is not None:
        shard.live.clear()


def adapter_parameters(draw) -> pb.AdapterParameters:
    ids = draw(st.lists(ADAPTER_IDS, min_size=1, max_size=3) | st.just([]))
    return pb.AdapterParameters(
        adapter_ids=ids,
        weights=draw(st.lists(FLOATS, max_size=len(ids) + 1)),
        merge_strategy=draw(st.sampled_from(list(pb.MergeStrategy.values()) + [99])),
        density=draw(FLOATS),
        majority_sign_method=draw(st.sampled_from(list(pb.MajoritySignMethod.values()) + [7])),
    )


def do_load(draw, shard):
    source = draw(st.sampled_from([pb.AdapterSource.LOCAL, pb.AdapterSource.HUB, pb.AdapterSource.S3, 3, 42]))
    index = draw(st.sampled_from([1, 2, 3, 4, 0, 99, U32]))
    params = adapter_parameters(draw)
    method = draw(st.sampled_from(["LoadAdapter", "LoadAdapter", "DownloadAdapter"]))
    cls = pb.LoadAdapterRequest if method == "LoadAdapter" else pb.DownloadAdapterRequest
    kw = {"adapter_index": index} if method == "LoadAdapter" else {}
    shard.call(method, cls(adapter_parameters=params, adapter_source=source, **kw))


def do_offload(draw, shard):
    index = draw(st.sampled_from([1, 2, 3, 4, 0, 99, U32]))
    shard.call(
        "OffloadAdapter",
        pb.OffloadAdapterRequest(adapter_parameters=pb.AdapterParameters(adapter_ids=["pirate"]), adapter_index=index),
    )


CALLS = [do_prefill, do_prefill, do_decode, do_decode, do_decode, do_filter, do_clear, do_warmup, do_load, do_offload]


# ---------------------------------------------------------------- the claims
def known_requests() -> list[pb.Request]:
    """Two greedy requests: one on router blocks 1.., one on the shard's own blocks."""
    out = []
    for k, ids in enumerate(KNOWN):
        n = len(ids) + KNOWN_NEW - 1
        blocks = list(range(1, 1 + math.ceil(n / BS))) if k == 0 else []
        out.append(
            pb.Request(
                id=1000 + k,
                inputs="",
                tokenized_inputs=pb.TokenizedInputs(ids=ids),
                parameters=pb.NextTokenChooserParameters(
                    temperature=1.0, top_p=1.0, typical_p=1.0, repetition_penalty=1.0
                ),
                stopping_parameters=pb.StoppingCriteriaParameters(max_new_tokens=KNOWN_NEW, ignore_eos_token=True),
                blocks=blocks,
                slots=[b * BS + j for b in blocks for j in range(BS)][:n] if blocks else [],
            )
        )
    return out


def run_known(stub) -> list[list[int]]:
    out: dict[int, list[int]] = collections.defaultdict(list)
    requests = known_requests()
    resp = stub.Prefill(pb.PrefillRequest(batch=pb.Batch(id=777, requests=requests, size=2)), timeout=DEADLINE_S)
    while True:
        for g in resp.generations:
            out[g.request_id] += list(g.next_tokens.ids)
        if not resp.HasField("batch"):
            return [out[r.id] for r in requests]
        resp = stub.Decode(pb.DecodeRequest(batches=[resp.batch]), timeout=DEADLINE_S)


@pytest.fixture(scope="module")
def fuzz_shard(shard, tok, ref_model):
    stub = shard.stub(0)
    warm = pb.Batch(id=0, requests=known_requests()[1:], size=1)
    for r in warm.requests:
        del r.blocks[:], r.slots[:]
    stub.Warmup(pb.WarmupRequest(batch=warm, max_input_length=64), timeout=DEADLINE_S)
    state, cfg = ref_model
    expected = [ref_greedy(state, cfg, ids, KNOWN_NEW) for ids in KNOWN]
    assert run_known(stub) == expected
    fuzz = Shard(stub, tok.n_real_vocab, stats(stub)["router_blocks"])
    yield fuzz, expected
    print("\nfuzz calls by outcome:", dict(sorted(fuzz.outcomes.items())))


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=not RANDOM,  # CI replays the same sequences
    phases=[Phase.generate] if RANDOM else list(Phase),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_fuzzed_calls_answer_clearly_and_leave_the_shard_whole(fuzz_shard, shard, data):
    fuzz, expected = fuzz_shard
    do_prefill(data.draw, fuzz, mutate=False)  # a live batch for the calls to work on
    for call in data.draw(st.lists(st.sampled_from(CALLS), min_size=1, max_size=10)):
        call(data.draw, fuzz)
        assert shard.proc.poll() is None, shard.log()[-3000:]
    fuzz.stub.ClearCache(pb.ClearCacheRequest(), timeout=DEADLINE_S)
    fuzz.live.clear()
    s = stats(fuzz.stub)
    assert s["batches"] == 0 and s["requests"] == 0, s
    assert s["shard_blocks_free"] == s["shard_blocks_total"] > 0, s  # no leaked shard-owned blocks
    assert s["adapter_slots_used"] <= min(s["adapters_known"], s["adapter_slots_total"]), s
    assert run_known(fuzz.stub) == expected
    assert stats(fuzz.stub)["shard_blocks_free"] == s["shard_blocks_total"]
