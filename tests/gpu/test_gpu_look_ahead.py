"""The look-ahead fed on the device with CUDA graphs (the Triton backend compiled): the sampler's ids go into the
decode graph's input on the GPU and the graph replays before the host reads them. The router's script
(tests/look_ahead_script.py) gives the same generations as without any look-ahead, every Decode after the first
feeds a graph, and no Decode runs a forward of its own."""

from __future__ import annotations

import os

import torch

from helpers import GPU_TRITON_MARKS
from look_ahead_script import Router, assert_same, first_text, script, warm_up

pytestmark = GPU_TRITON_MARKS


def _engine(model_dir: str, look_ahead: bool | None, fed: bool):
    from worker.distributed import ParallelContext
    from worker.engine.engine import Engine, EngineConfig
    from worker.layers.attention import make_backend
    from worker.models.qwen import FlashQwenForCausalLM
    from worker.tokenizer import QwenTokenizer

    dev = torch.device("cuda")
    pctx = ParallelContext(device=dev)
    model = FlashQwenForCausalLM.from_pretrained(
        model_dir, pctx, torch.float32, make_backend("triton", dev), progress=False
    )
    cfg = EngineConfig(max_total_tokens=4096, shard_block_fraction=0.5, look_ahead=look_ahead, look_ahead_fed=fed)
    return warm_up(Engine(model, QwenTokenizer.from_dir(model_dir), pctx, cfg))


def test_fed_look_ahead_with_graphs_changes_nothing_the_router_sees(demo_dir):
    model_dir = os.path.join(demo_dir, "model")
    probe = script(Router(_engine(model_dir, False, False)), ())
    stop = (first_text(probe, 3, 3),)
    off = Router(_engine(model_dir, False, False))
    fed_engine = _engine(model_dir, None, True)  # auto: on where the graphs serve the batch
    graphs = fed_engine.runner.graphs
    assert graphs is not None
    prepared = []
    prepare = graphs.prepare_ahead
    graphs.prepare_ahead = lambda b, s: prepared.append(len(b.requests)) or prepare(b, s)
    fed = Router(fed_engine)
    expected, got = script(off, stop), script(fed, stop)
    assert_same(got, expected, 1e-3)
    assert fed.computed == [0] * len(fed.computed) and fed.fed == [True] * len(fed.fed)
    assert len(prepared) == len(fed.fed)  # every fed look-ahead replayed a graph
    fed_engine.close()
    off.engine.close()


def test_the_chosen_ids_reach_the_host_before_the_work_queued_after_them():
    """On the GPU the ids and logprobs are copied to the host asynchronously before the fed forward is queued: a
    feed that overwrites the ids on the device after them does not change what the host reads."""
    from worker.distributed import ParallelContext
    from worker.engine import step
    from worker.engine.sampling import BatchSampler, SamplingParams

    dev = torch.device("cuda")
    logits = torch.randn(64, 1000, device=dev, generator=torch.Generator(dev).manual_seed(0))
    sampler = BatchSampler([SamplingParams(temperature=0.0)] * 64, 1000, 1000, dev)

    def feed(ids: torch.Tensor) -> bool:
        torch.cuda._sleep(10_000_000)  # the fed forward still runs when the host reads the ids
        ids.fill_(-1)
        return True

    choices, fed = step._choose_and_feed(sampler, logits, [[1]] * 64, None, ParallelContext(device=dev), feed)
    assert fed and [c.ids[0] for c in choices] == logits.argmax(-1).tolist()


def test_a_fed_decode_replies_without_waiting_for_its_forward(demo_dir):
    """Nothing after the fed launch waits for the forward: the Decode (a request finishing, so the batch is
    filtered) returns while the launched work, held up seconds by a sleep kernel queued before it, is pending."""
    from helpers import chunk_request
    from worker.pb import generate_pb2 as pb

    engine = _engine(os.path.join(demo_dir, "model"), None, True)
    reqs = [chunk_request(1, [5, 6, 7], 2), chunk_request(2, [8, 9], 6), chunk_request(3, [10, 11, 12, 13], 6)]
    _, batch = engine.prefill(pb.Batch(id=1, requests=reqs, size=3), None)
    graphs = engine.runner.graphs
    prepare, pending = graphs.prepare_ahead, []

    def slow_prepare(b, slots):
        launch = prepare(b, slots)

        def slow(ids):
            torch.cuda._sleep(4_000_000_000)  # about two seconds of device time before the forward
            out = launch(ids)
            done = torch.cuda.Event()
            done.record()
            pending.append(done)
            return out

        return slow

    graphs.prepare_ahead = slow_prepare
    gens, batch = engine.decode([batch.info()])
    assert len(pending) == 1 and not pending[0].query()  # replied with the fed forward still queued
    assert [g.request_id for g in gens if g.generated_text is not None] == [1] and len(batch.requests) == 2
    torch.cuda.synchronize()
    engine.close()
