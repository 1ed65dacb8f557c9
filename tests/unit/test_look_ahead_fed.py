"""The look-ahead fed on the device (EngineConfig.look_ahead_fed): the next forward launches right after the
sampler, with the chosen ids still on the device, before they are appended. What the router sees must not
change: a scripted sequence of Prefill / Decode / concatenation / FilterBatch, with greedy and seeded-sampling
requests, a stop sequence hit mid-batch and requests finishing at max_new_tokens, gives the same tokens, texts,
finish reasons and logprobs as without any look-ahead; the Decodes take every row from the fed look-ahead."""

from __future__ import annotations

import logging
import os
from types import SimpleNamespace

import pytest
import torch

from look_ahead_script import Router, assert_same, first_text, request, script, warm_up
from worker.distributed import ParallelContext
from worker.engine import lookahead
from worker.engine.batch import Ahead
from worker.engine.cuda_graphs import slot_at
from worker.engine.engine import Engine, EngineConfig
from worker.models.qwen import FlashQwenForCausalLM
from worker.pb import generate_pb2 as pb
from worker.tokenizer import QwenTokenizer


def _engine(model_dir: str, look_ahead: bool, fed: bool) -> Engine:
    model = FlashQwenForCausalLM.from_pretrained(model_dir, dtype=torch.float32, progress=False)
    cfg = EngineConfig(
        max_total_tokens=4096, shard_block_fraction=0.5, cuda_graphs=False, look_ahead=look_ahead, look_ahead_fed=fed
    )
    return warm_up(Engine(model, QwenTokenizer.from_dir(model_dir), ParallelContext(), cfg))


@pytest.fixture(scope="module")
def model_dir(demo_dir):
    return os.path.join(demo_dir, "model")


def test_fed_look_ahead_changes_nothing_the_router_sees(model_dir):
    probe = script(Router(_engine(model_dir, False, False)), ())
    stop = (first_text(probe, 3, 3),)  # request 3's 4th token's text: it stops there (or at an earlier copy)
    assert stop[0]
    off = Router(_engine(model_dir, False, False))
    fed = Router(_engine(model_dir, True, True))
    expected, got = script(off, stop), script(fed, stop)
    finished = {g[0]: g[4][1] for step in expected for g in step if g[4] is not None}
    assert finished[3] == pb.FINISH_REASON_STOP_SEQUENCE and finished[1] == pb.FINISH_REASON_LENGTH
    assert_same(got, expected, 1e-4)
    assert all(n > 0 for n in off.computed) and not any(off.fed)
    # every Decode fed the next step's forward, and no Decode ran one of its own
    assert fed.computed == [0] * len(fed.computed)
    assert fed.fed == [True] * len(fed.fed) and all(fed.cached)
    assert fed.engine.batches == {} and fed.engine.allocator.free == off.engine.allocator.free


def test_only_plain_decode_steps_feed():
    """Drafts or Medusa heads would follow the step's tokens: those batches keep the look-ahead after apply."""
    engine = Engine.__new__(Engine)
    batch = SimpleNamespace(requests=[object()] * 3)
    big = SimpleNamespace(requests=[object()] * 40)
    for fed, tokens, heads, b, feeds in [
        (True, 0, 0, batch, True),
        (False, 0, 0, batch, False),
        (True, 4, 0, batch, False),  # prompt-lookup drafts for a batch that verifies
        (True, 4, 0, big, True),  # too large to verify drafts: plain decode
        (True, 0, 3, batch, False),  # Medusa heads attached
    ]:
        engine.cfg = EngineConfig(look_ahead_fed=fed, speculative_tokens=tokens)
        engine.model = SimpleNamespace(medusa_heads=heads)
        assert engine._feeds(b) == feeds, (fed, tokens, heads, len(b.requests))


def test_a_row_past_its_slots_writes_its_own_block_or_the_scratch_block():
    slots = [40, 41, 42, 43, 20, 21]  # blocks 10 and 5 of 4 slots: positions 0..5 own a slot
    assert slot_at(slots, [10, 5], 5, 99, 4) == 21
    assert slot_at(slots, [10, 5], 6, 99, 4) == 22  # past its slots, still in its own block 5
    assert slot_at(slots, [10, 5], 8, 99, 4) == 99 * 4  # past its blocks: the scratch block, which no one owns
    assert slot_at(slots, [10, 5], 9, 99, 4) == 99 * 4 + 1


def test_a_failed_fed_look_ahead_does_not_fail_the_step(model_dir, monkeypatch, caplog):
    engine = _engine(model_dir, True, True)
    _, batch = engine.prefill(
        pb.Batch(id=1, size=2, requests=[request(1, "Once upon a time", 4), request(2, "Hello there", 4)]), None
    )
    assert batch is not None and all(r.ahead is not None for r in batch.requests)
    forward = engine.runner.forward

    def fails_once(b, prefill, slots=None):  # the Decode's rows are looked-ahead: the first call is the fed one
        monkeypatch.setattr(engine.runner, "forward", forward)
        raise torch.OutOfMemoryError("injected")

    monkeypatch.setattr(engine.runner, "forward", fails_once)
    gens, after = engine.decode([batch.info()])
    assert len(gens) == 2 and after is batch and "look-ahead of batch 1 failed" in caplog.text
    # the look-ahead after apply took over: the next Decode still finds its rows
    assert all(r.ahead is not None and r.ahead.length == len(r.ids) for r in batch.requests)
    while after is not None:
        gens, after = engine.decode([after.info()])
    assert engine.batches == {}


def test_rows_of_one_look_ahead_left_by_finished_requests_are_gathered():
    x = torch.arange(12.0).view(3, 4)
    reqs = [SimpleNamespace(ids=[0] * 5, ahead=Ahead(x, 0, 5)), SimpleNamespace(ids=[0] * 5, ahead=Ahead(x, 2, 5))]
    out = lookahead.take_rows(reqs, [True, True], None)
    assert torch.equal(out, x[[0, 2]]) and all(r.ahead is None for r in reqs)


def test_the_chosen_ids_are_read_before_the_fed_forward_is_queued():
    """The host reads the ids and logprobs the sampler chose, not what the work queued after them (the fed
    forward, here a feed that overwrites the ids in place) leaves in their memory."""
    from worker.engine import step
    from worker.engine.sampling import BatchSampler, SamplingParams

    logits = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    sampler = BatchSampler([SamplingParams(temperature=0.0)] * 3, 8, 8)
    fed_ids = []

    def feed(ids: torch.Tensor) -> bool:
        fed_ids.append(ids.tolist())
        ids.fill_(-1)
        return True

    choices, fed = step._choose_and_feed(sampler, logits, [[1, 2]] * 3, None, ParallelContext(), feed)
    want = logits.argmax(-1)
    assert fed and fed_ids == [want.tolist()] and [c.ids for c in choices] == [[i] for i in want.tolist()]
    lps = torch.log_softmax(logits.double(), -1).gather(1, want[:, None]).squeeze(1)
    assert [c.logprobs[0] for c in choices] == pytest.approx(lps.tolist(), abs=1e-6)


def test_graphs_serve_a_fed_look_ahead_only_inside_their_block_table():
    from worker.engine.cuda_graphs import GraphedDecode

    graphs = GraphedDecode.__new__(GraphedDecode)  # can_run reads only the sizes and the table's shape
    graphs.sizes, graphs.max_blocks, graphs.kv = [1, 2, 4], 2, SimpleNamespace(block_size=4)

    def batch(*shapes: tuple[int, int]):
        return SimpleNamespace(requests=[SimpleNamespace(ids=[0] * i, blocks=list(range(b))) for i, b in shapes])

    assert graphs.can_run(batch((7, 2)), ahead=True)  # the next position, 7, is in the table's second block
    assert not graphs.can_run(batch((8, 2)), ahead=True) and graphs.can_run(batch((8, 2)))  # 8: past the table
    assert not graphs.can_run(batch((3, 3)), ahead=True) and not graphs.can_run(batch((3, 3)))  # blocks > table
    assert not graphs.can_run(batch(*[(1, 1)] * 5), ahead=True)  # past the largest bucket


def test_the_start_up_log_names_the_look_ahead_variant(model_dir, caplog):
    """--look-ahead-fed changes when the look-ahead launches: the start-up line says which one serves."""
    assert lookahead.describe(None, True, 1, fed=True) == "on where CUDA graphs serve the batch, fed (--look-ahead-fed)"
    assert lookahead.describe(True, False, 2, fed=False) == "on, after the stop checks (--look-ahead-fed off)"
    assert lookahead.describe(False, True, 1, fed=True) == "off"
    assert lookahead.describe(None, True, 2, fed=True) == "off (TP: set --look-ahead on to use it)"
    with caplog.at_level(logging.INFO, logger="worker.engine.engine"):
        _engine(model_dir, True, True)
    assert "decode look-ahead: on, fed (--look-ahead-fed)" in [r.getMessage() for r in caplog.records]


def test_a_fed_launch_refuses_inputs_refilled_after_its_prepare():
    """The decode graphs' static inputs are shared: a fill for another batch between prepare_ahead and its launch
    would replay with that batch's slots and block tables (K/V written into its blocks): the launch refuses."""
    from worker.engine.cuda_graphs import GraphedDecode

    g = object.__new__(GraphedDecode)  # the CPU has no graphs: the static buffers and one fake graph
    replays: list[int] = []
    g.sizes, g.max_blocks, g.scratch_block, g.fills = [2], 4, 9, 0
    g.kv = SimpleNamespace(block_size=4)
    for name in ("ids", "pos", "slots", "lengths", "cache_lengths", "adapter_slots"):
        setattr(g, name, torch.zeros(2, dtype=torch.int64))
    g.alpha, g.tables = torch.zeros(2), torch.zeros(2, 4, dtype=torch.int32)
    g.long_tokens = {}
    g.graphs = {(2, False, False): (SimpleNamespace(replay=lambda: replays.append(int(g.slots[0]))), torch.zeros(2, 3))}

    def batch(block: int) -> SimpleNamespace:
        req = SimpleNamespace(
            ids=[5, 6], blocks=[block], slots=[block * 4, block * 4 + 1, block * 4 + 2], ntk_alpha=1.0
        )
        return SimpleNamespace(requests=[req])

    launch = g.prepare_ahead(batch(1), None)
    launch(torch.tensor([7]))  # nothing in between: replays with its own next slot
    assert replays == [6]
    launch = g.prepare_ahead(batch(1), None)
    g.run(batch(3), None)  # another batch's step fills the same buffers
    with pytest.raises(RuntimeError, match="refilled between prepare_ahead and its launch"):
        launch(torch.tensor([7]))
    assert replays == [6, 13]  # only the other batch's own replay ran


def test_decode_graphs_replay_the_side_of_the_step_s_longest_context():
    """Where the attention's decode changes kernels at a context length (GraphedDecode.long_tokens, from the backend's
    long_decode: a length for each bucket it names), those buckets hold two graphs: a step whose longest context
    (position + 1, one further for a step prepared ahead) reaches its bucket's length replays the long one, any other
    the short one; other buckets have only the short one."""
    from worker.engine.cuda_graphs import GraphedDecode

    g = object.__new__(GraphedDecode)  # the CPU has no graphs: the static buffers and fake graphs
    replayed: list[tuple[int, bool]] = []
    g.sizes, g.max_blocks, g.scratch_block, g.fills = [1, 2, 4], 8, 9, 0
    g.kv = SimpleNamespace(block_size=4)
    for name in ("ids", "pos", "slots", "lengths", "cache_lengths", "adapter_slots"):
        setattr(g, name, torch.zeros(4, dtype=torch.int64))
    g.alpha, g.tables = torch.zeros(4), torch.zeros(4, 8, dtype=torch.int32)
    g.long_tokens = {1: 8, 2: 6}

    def graph(bs: int, is_long: bool) -> tuple[SimpleNamespace, torch.Tensor]:
        return SimpleNamespace(replay=lambda: replayed.append((bs, is_long))), torch.zeros(bs, 3)

    keys = ((1, False), (1, True), (2, False), (2, True), (4, False))
    g.graphs = {(bs, False, is_long): graph(bs, is_long) for bs, is_long in keys}

    def batch(*lengths: int) -> SimpleNamespace:
        reqs = [
            SimpleNamespace(ids=[5] * n, blocks=[1, 2, 3], slots=list(range(4, 16)), ntk_alpha=1.0, n_cached=0)
            for n in lengths
        ]
        return SimpleNamespace(requests=reqs)

    g.run(batch(7), None)  # context 7: below 8
    g.run(batch(8), None)  # context 8
    assert g.last_key == (1, False, True)  # what the benchmarks replay
    g.run(batch(3, 9), None)  # the longest decides for the step
    g.run(batch(3, 5), None)
    g.run(batch(3, 6), None)  # two rows: their own length, 6
    g.run(batch(3, 9, 2), None)  # 3 rows: the 4-row bucket, one graph
    g.prepare_ahead(batch(7), None)(torch.tensor([1]))  # ahead: position 7, context 8
    assert replayed == [(1, False), (1, True), (2, True), (2, False), (2, True), (4, False), (1, True)]
