"""Faults against real shard processes: a router that dies mid-generation and a new one that starts against
the same live shard; SIGTERM while a batch decodes.

Claims: the new router's startup (ClearCache, Warmup) drops the dead router's batch and blocks, its own
adapter index replaces the dead router's, and it serves the trained continuations exactly; under SIGTERM
every in-flight call answers OK or UNAVAILABLE/CANCELLED (never INTERNAL), the shard exits 0 and removes
its socket.
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time

import grpc

from make_demo_model import ADAPTERS, BASE_TEXTS, STORY_PROMPT
from pb_requests import paged_request
from shards import start_launcher, stop
from worker.pb import generate_pb2 as pb

BS = 16


def _stats(stub) -> dict:
    _, call = stub.Health.with_call(pb.HealthRequest(), timeout=30)
    return json.loads(dict(call.trailing_metadata())["x-qwen-worker-stats"])


def _request(rid: int, ids: list[int], max_new: int, adapter_index: int = 0) -> pb.Request:
    blocks = list(range(1, 1 + math.ceil((len(ids) + max_new - 1) / BS)))
    return paged_request(rid, ids, max_new, blocks, BS, adapter_index=adapter_index)


def test_a_new_router_serves_a_shard_a_dead_router_left_mid_generation(shard, tok):
    from router_client.router import Router, RouterConfig

    stub = shard.stub(0)
    stub.Warmup(pb.WarmupRequest(batch=pb.Batch(id=0, requests=[]), max_input_length=64), timeout=60)
    params = pb.AdapterParameters(adapter_ids=["pirate"])
    stub.LoadAdapter(pb.LoadAdapterRequest(adapter_parameters=params, adapter_source=pb.LOCAL, adapter_index=1))
    resp = stub.Prefill(
        pb.PrefillRequest(batch=pb.Batch(id=5, requests=[_request(9, tok.encode(STORY_PROMPT), 40, 1)]))
    )
    stub.Decode(pb.DecodeRequest(batches=[resp.batch]), timeout=60)
    assert _stats(stub)["batches"] == 1  # the dead router's batch, its blocks and its adapter index 1

    limits = dict(max_input_length=64, max_total_tokens=256, max_batch_prefill_tokens=256)
    with Router.connect(f"{shard.uds}-0", tokenizer=tok, config=RouterConfig(**limits)) as router:
        assert _stats(stub)["batches"] == 0  # dropped at the new router's startup
        robot = router.load_adapter("robot")
        assert robot == 1  # the dead router's index, now another adapter
        story = router.submit(STORY_PROMPT, stopping=dict(max_new_tokens=48), adapter_index=robot)
        base = router.submit(STORY_PROMPT, stopping=dict(max_new_tokens=48))
        assert story.result(timeout=120).text == ADAPTERS["robot"][2]
        assert base.result(timeout=120).text == dict(BASE_TEXTS)[STORY_PROMPT]
    s = _stats(stub)
    assert s["batches"] == 0 and s["shard_blocks_free"] == s["shard_blocks_total"] and s["adapter_slots_used"] == 1


def test_sigterm_while_a_batch_decodes(demo_dir):
    s = start_launcher(os.path.join(demo_dir, "model"), os.path.join(demo_dir, "adapters"))
    stub = s.stub(0)
    stub.Warmup(pb.WarmupRequest(batch=pb.Batch(id=0, requests=[]), max_input_length=64), timeout=60)
    codes: list[grpc.StatusCode] = []
    decoding, signalled = threading.Event(), threading.Event()

    def drive() -> None:
        try:
            resp = stub.Prefill(
                pb.PrefillRequest(batch=pb.Batch(id=1, requests=[_request(1, [3, 4, 5], 200)])), timeout=60
            )
            while resp.HasField("batch"):
                if signalled.is_set():  # once SIGTERM is sent, the rest of the 200 tokens cannot outrun the shutdown
                    time.sleep(0.05)  # (on a loaded 2-core CI box they once did: every Decode answered OK)
                resp = stub.Decode(pb.DecodeRequest(batches=[resp.batch]), timeout=60)
                codes.append(grpc.StatusCode.OK)
                decoding.set()
        except grpc.RpcError as err:
            codes.append(err.code())
            decoding.set()

    thread = threading.Thread(target=drive)
    thread.start()
    assert decoding.wait(60)
    t0 = time.monotonic()
    s.proc.send_signal(signal.SIGTERM)
    signalled.set()
    thread.join(60)
    assert not thread.is_alive()
    rc = s.proc.wait(timeout=30)
    assert rc == 0 and time.monotonic() - t0 < 30, s.log()[-3000:]
    assert "shutting down" in s.log()  # the shard's own shutdown, not the launcher's kill after its timeout
    assert not os.path.exists(f"{s.uds}-0")  # the socket is removed
    stop(s)
    assert codes and set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}, codes
    assert codes[-1] != grpc.StatusCode.OK  # the shard went away mid-generation (200 tokens take longer)
