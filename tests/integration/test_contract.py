"""The wire contract, driven call by call over gRPC against a real shard process (demo model)."""

from __future__ import annotations

import json
import math
import os

import grpc
import pytest

from reference import load_checkpoint, ref_greedy

U64 = 2**64 - 1
BS = 16


def pbm():
    from worker.pb import generate_pb2 as pb

    return pb


def make_request(rid: int, ids: list[int], max_new: int, first_block: int | None, **kw):
    pb = pbm()
    blocks, slots = [], []
    if first_block is not None:
        n = len(ids) + max_new - 1
        blocks = list(range(first_block, first_block + math.ceil(n / BS)))
        slots = [b * BS + j for b in blocks for j in range(BS)][:n]
    params = {"temperature": 1.0, "top_p": 1.0, "typical_p": 1.0, "repetition_penalty": 1.0}
    params.update(kw.pop("params", {}))
    stop = {"max_new_tokens": max_new}
    stop.update(kw.pop("stopping", {}))
    return pb.Request(
        id=rid,
        inputs="",
        tokenized_inputs=pb.TokenizedInputs(ids=ids),
        parameters=pb.NextTokenChooserParameters(**params),
        stopping_parameters=pb.StoppingCriteriaParameters(**stop),
        blocks=blocks,
        slots=slots,
        **kw,
    )


def stats(stub) -> dict:
    pb = pbm()
    _, call = stub.Health.with_call(pb.HealthRequest())
    meta = dict(call.trailing_metadata())
    return json.loads(meta["x-qwen-worker-stats"])


def run_to_end(stub, batch_id: int, requests) -> dict[int, list[int]]:
    """Prefill then decode until every request finished; returns generated ids per request."""
    pb = pbm()
    out: dict[int, list[int]] = {r.id: [] for r in requests}
    resp = stub.Prefill(pb.PrefillRequest(batch=pb.Batch(id=batch_id, requests=requests, size=len(requests))))
    while True:
        for g in resp.generations:
            out[g.request_id] += list(g.next_tokens.ids)
        if not resp.HasField("batch"):
            return out
        done = [g.request_id for g in resp.generations if g.HasField("generated_text")]
        batch = resp.batch
        if done:
            keep = pb.FilterBatchRequest(batch_id=batch.id, request_ids=list(batch.request_ids))
            batch = stub.FilterBatch(keep).batch
        resp = stub.Decode(pb.DecodeRequest(batches=[batch]))


@pytest.fixture(scope="module")
def ref(demo_dir):
    return load_checkpoint(os.path.join(demo_dir, "model"))


@pytest.fixture(scope="module")
def warmed(shard):
    """The router's exact startup sequence."""
    pb = pbm()
    stub = shard.stub(0)
    urls = stub.ServiceDiscovery(pb.ServiceDiscoveryRequest()).urls
    assert list(urls) == [f"unix://{shard.uds}-0"]
    stub.ClearCache(pb.ClearCacheRequest())  # no id: drop everything
    info = stub.Info(pb.InfoRequest())
    warm = pb.Batch(
        id=0,
        requests=[
            pb.Request(
                id=0,
                inputs="The capital of France is " * 4,
                truncate=64,
                parameters=pb.NextTokenChooserParameters(temperature=1.0, top_p=1.0, typical_p=1.0),
                stopping_parameters=pb.StoppingCriteriaParameters(max_new_tokens=8),
            )
        ],
        size=1,
        max_tokens=72,
    )
    resp = stub.Warmup(pb.WarmupRequest(batch=warm, max_input_length=64, max_prefill_tokens=64, max_new_tokens=8))
    return stub, info, resp.max_supported_total_tokens


def test_info(warmed):
    _, info, total = warmed
    assert info.requires_block_allocator and info.supports_generation and not info.requires_padding
    assert not info.supports_embeddings and not info.supports_classification
    assert info.block_size == BS and info.speculate == 0 and not info.HasField("window_size")
    assert info.dtype == "float32" and info.device_type == "cpu"
    assert total % BS == 0 and 0 < total <= 4096  # --max-total-tokens 4096, minus the shard's own blocks


def test_health_probe_block0(warmed, ref):
    pb = pbm()
    stub = warmed[0]
    req = make_request(U64, [5], 1, None)
    req.blocks[:] = [0]
    req.slots[:] = [0]
    resp = stub.Prefill(pb.PrefillRequest(batch=pb.Batch(id=U64, requests=[req], size=1)))
    (gen,) = resp.generations
    assert gen.request_id == U64 and gen.generated_text.finish_reason == pb.FINISH_REASON_LENGTH
    stub.ClearCache(pb.ClearCacheRequest(id=U64))
    assert stats(stub)["batches"] == 0


def test_greedy_equals_reference(warmed, ref, demo_dir):
    from make_demo_model import BASE_TEXTS
    from worker.tokenizer import QwenTokenizer

    stub = warmed[0]
    state, cfg = ref
    tok = QwenTokenizer.from_dir(os.path.join(demo_dir, "model"))
    prompts = [tok.encode(p) for p, _ in BASE_TEXTS[:4]]
    reqs = [make_request(i, p, 40, 1 + 4 * i) for i, p in enumerate(prompts)]
    out = run_to_end(stub, 1, reqs)
    eos = sorted(tok.eos_token_ids)
    for i, p in enumerate(prompts):
        expect = ref_greedy(state, cfg, p, 40, stop_ids=eos)
        assert out[i] == expect
        # and the demo model knows its sentence: the reference reproduces the training text
        assert tok.decode(expect, skip_special_tokens=True) == BASE_TEXTS[i][1]


def test_embed_classify_unimplemented(warmed):
    pb = pbm()
    stub = warmed[0]
    for call, req in ((stub.Embed, pb.EmbedRequest()), (stub.Classify, pb.ClassifyRequest())):
        with pytest.raises(grpc.RpcError) as e:
            call(req)
        assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED and "causal LM" in e.value.details()


BAD = {
    "duplicate request ids": (
        lambda: [make_request(7, [1, 2], 2, 40), make_request(7, [3], 2, 44)],
        grpc.StatusCode.INVALID_ARGUMENT,
        "duplicate request id 7",
    ),
    "token id >= vocab": (
        lambda: [make_request(7, [1, 10**6], 2, 40)],
        grpc.StatusCode.INVALID_ARGUMENT,
        "token id 1000000",
    ),
    "empty prompt": (lambda: [make_request(7, [], 2, 40)], grpc.StatusCode.INVALID_ARGUMENT, "empty prompt"),
    "prompt longer than the KV space": (
        lambda: [make_request(7, [1] * 5000, 2, None)],
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "KV slots",
    ),
    "slots shorter than the tokens": (lambda: _short_slots(), grpc.StatusCode.INVALID_ARGUMENT, "slots for"),
    "blocks out of range": (
        lambda: [make_request(7, [1, 2], 2, 100000)],
        grpc.StatusCode.INVALID_ARGUMENT,
        "out of range",
    ),
    "NaN temperature": (
        lambda: [make_request(7, [1], 2, 40, params={"temperature": float("nan")})],
        grpc.StatusCode.INVALID_ARGUMENT,
        "temperature",
    ),
    "negative repetition penalty": (
        lambda: [make_request(7, [1], 2, 40, params={"repetition_penalty": -1.0})],
        grpc.StatusCode.INVALID_ARGUMENT,
        "repetition_penalty",
    ),
    "top_p = 0": (
        lambda: [make_request(7, [1], 2, 40, params={"top_p": 0.0})],
        grpc.StatusCode.INVALID_ARGUMENT,
        "top_p",
    ),
    "top_p > 1": (
        lambda: [make_request(7, [1], 2, 40, params={"top_p": 1.5})],
        grpc.StatusCode.INVALID_ARGUMENT,
        "top_p",
    ),
    "unknown adapter index": (
        lambda: [make_request(7, [1], 2, 40, adapter_index=999)],
        grpc.StatusCode.NOT_FOUND,
        "adapter index 999",
    ),
}


def _short_slots():
    r = make_request(7, [1, 2, 3], 4, 40)
    del r.slots[-2:]
    return [r]


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_keeps_serving(warmed, ref, case):
    pb = pbm()
    stub = warmed[0]
    state, cfg = ref
    # a live batch that must survive the bad call untouched
    live = stub.Prefill(pb.PrefillRequest(batch=pb.Batch(id=50, requests=[make_request(50, [3, 4, 5], 6, 60)], size=1)))
    before = stats(stub)
    make, code, needle = BAD[case]
    with pytest.raises(grpc.RpcError) as e:
        stub.Prefill(pb.PrefillRequest(batch=pb.Batch(id=51, requests=make(), size=1)))
    assert e.value.code() == code, e.value.details()
    assert needle in e.value.details()
    assert stats(stub) == before  # no batch, request or shard block leaked
    # the live batch goes on, and gives the reference's tokens
    got = list(live.generations[0].next_tokens.ids)
    batch = live.batch
    while True:
        resp = stub.Decode(pb.DecodeRequest(batches=[batch]))
        got += [t for g in resp.generations for t in g.next_tokens.ids]
        if not resp.HasField("batch"):
            break
        batch = resp.batch
    assert got == ref_greedy(state, cfg, [3, 4, 5], 6)[: len(got)] and len(got) >= 1


def test_unknown_batch_ids(warmed):
    pb = pbm()
    stub = warmed[0]
    for call in (
        lambda: stub.Decode(pb.DecodeRequest(batches=[pb.CachedBatch(id=12345)])),
        lambda: stub.FilterBatch(pb.FilterBatchRequest(batch_id=12345, request_ids=[1])),
    ):
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert e.value.code() == grpc.StatusCode.NOT_FOUND and "12345" in e.value.details()
    assert stats(warmed[0])["batches"] == 0


def test_self_allocated_blocks_released(warmed, ref):
    """Requests without blocks use the shard's own blocks; they all come back when the batch ends."""
    stub = warmed[0]
    state, cfg = ref
    before = stats(stub)
    out = run_to_end(stub, 60, [make_request(i, [7, 8, 9, 10][: i + 1], 5, None) for i in range(3)])
    after = stats(stub)
    assert after["shard_blocks_free"] == before["shard_blocks_free"] == after["shard_blocks_total"]
    for i in range(3):
        assert out[i] == ref_greedy(state, cfg, [7, 8, 9, 10][: i + 1], 5)


def test_cache_len_reuses_a_cached_prefix(warmed, ref):
    """Prefix caching as the router does it: a second request shares the first one's full blocks and
    says cache_len; only its suffix is computed, and the tokens equal the reference on the whole prompt."""
    stub = warmed[0]
    state, cfg = ref
    prefix = [(5 * i) % 200 + 3 for i in range(32)]  # two full blocks of 16
    first = make_request(70, prefix + [9], 3, 80)
    run_to_end(stub, 70, [first])
    shared = list(first.blocks[:2])  # the blocks holding the 32 prefix tokens' K/V
    second_prompt = prefix + [11, 12, 13]
    n = len(second_prompt) + 5 - 1
    blocks = shared + list(range(90, 90 + -(-n // BS) - 2))
    req = make_request(71, second_prompt, 5, None, cache_len=32)
    req.blocks[:] = blocks
    req.slots[:] = [b * BS + j for b in blocks for j in range(BS)][:n]
    out = run_to_end(stub, 71, [req])
    assert out[71] == ref_greedy(state, cfg, second_prompt, 5)


def test_prefill_merged_with_cached_batch(warmed, ref):
    """Prefill(batch, cached_batch): the new requests join the running batch (LoRAX's Prefill merge)."""
    pb = pbm()
    stub = warmed[0]
    state, cfg = ref
    first = stub.Prefill(pb.PrefillRequest(batch=pb.Batch(id=80, requests=[make_request(80, [4, 5], 6, 100)], size=1)))
    got = {80: list(first.generations[0].next_tokens.ids), 81: []}
    resp = stub.Prefill(
        pb.PrefillRequest(
            batch=pb.Batch(id=81, requests=[make_request(81, [6, 7, 8], 4, 104)], size=1), cached_batch=first.batch
        )
    )
    assert set(resp.batch.request_ids) == {80, 81}
    while True:
        for g in resp.generations:
            got[g.request_id] += list(g.next_tokens.ids)
        if not resp.HasField("batch"):
            break
        batch = resp.batch
        finished = {g.request_id for g in resp.generations if g.HasField("generated_text")}
        if finished:
            keep = [r for r in batch.request_ids if r not in finished]
            batch = stub.FilterBatch(pb.FilterBatchRequest(batch_id=batch.id, request_ids=keep)).batch
        resp = stub.Decode(pb.DecodeRequest(batches=[batch]))
    assert got[80] == ref_greedy(state, cfg, [4, 5], 6)
    assert got[81] == ref_greedy(state, cfg, [6, 7, 8], 4)
    assert stats(stub)["batches"] == 0


def test_socket_permissions_stale_socket_and_clean_exit(demo_dir, tmp_path):
    """Owner-only socket; a stale socket file is replaced; SIGTERM exits 0 and removes the socket."""
    import signal
    import stat
    import subprocess
    import sys
    import tempfile
    import time

    from helpers import ROOT

    d = tempfile.mkdtemp(prefix="qs", dir="/tmp")
    uds = os.path.join(d, "s")
    open(f"{uds}-0", "w").close()  # stale leftover
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "worker.cli",
            "serve",
            os.path.join(demo_dir, "model"),
            "--uds-path",
            uds,
            "--max-total-tokens",
            "1024",
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 60
        while not (os.path.exists(f"{uds}-0") and stat.S_ISSOCK(os.stat(f"{uds}-0").st_mode)):
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.1)
        assert stat.S_IMODE(os.stat(f"{uds}-0").st_mode) == 0o600
        from worker.pb import generate_pb2 as pb
        from worker.pb import generate_pb2_grpc as pb_grpc

        stub = pb_grpc.LoraxServiceStub(grpc.insecure_channel(f"unix://{uds}-0"))
        assert stub.Info(pb.InfoRequest()).supports_generation
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert not os.path.exists(f"{uds}-0")
    finally:
        if proc.poll() is None:
            proc.kill()


def test_health_reports_the_kv_cache_dtype(shard_stats):
    """Health's stats name the KV cache's dtype: the router keeps its prefix cache off when a shard says fp8
    (cached K then depends on the calibrated scales)."""
    assert shard_stats()["kv_cache_dtype"] == "torch.float32"  # the test shard: fp32 weights, KV in the model dtype
