"""Chunked prefill at the engine (LoRAX semantics), fp32 on the CPU, against the float64 reference.

A running request decodes while a prompt longer than the model's seq_length (dynamic NTK and logn active) is
prefilled in chunks of awkward sizes: the first from Request.chunk_len, inside a Prefill that carries the
running batch (one forward for both), the later ones sized by the shard from Warmup's max_prefill_tokens. The
claims: greedy tokens equal the reference's, and a seeded sampling request's tokens equal the unchunked run's;
prefill logprobs gathered over the chunks equal the reference's; a request still prefilling gets no
Generation and the batch's current_tokens is its next chunk plus one per decoding request; no shard-owned KV
block is left taken. Chunks over a prefix another (cancelled) request computed, a failed merged Prefill, and
chunk_len validation are covered too.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
from dataclasses import dataclass, field

import pytest
import torch

from helpers import chunk_request, write_checkpoint
from random_weights import random_checkpoint
from reference import load_checkpoint, ref_forward
from worker.distributed import ParallelContext
from worker.engine import chunks, lookahead
from worker.engine.engine import Engine, EngineConfig
from worker.errors import FailedPrecondition, InvalidArgument
from worker.models.qwen import FlashQwenForCausalLM
from worker.pb import generate_pb2 as pb
from worker.tokenizer import QwenTokenizer

SEQ = 64  # the test model's seq_length
LONG = random.Random(0).choices(range(500), k=150)  # > SEQ: NTK alpha 7, logn active
N_REAL = 518  # the demo tokenizer's vocabulary; the model's rows past it are padding, never sampled
SHORT = [5, 6, 7, 8]
SEEDED = [9, 10, 11]


def _engine(
    model_dir: str, chunked: bool = True, look_ahead: bool | None = None, budget: int = 64, backend=None
) -> Engine:
    model = FlashQwenForCausalLM.from_pretrained(model_dir, dtype=torch.float32, progress=False, backend=backend)
    cfg = EngineConfig(
        max_total_tokens=4096,
        shard_block_fraction=0.5,
        cuda_graphs=False,
        look_ahead=look_ahead,
        chunked_prefill=chunked,
    )
    engine = Engine(model, QwenTokenizer.from_dir(model_dir), ParallelContext(), cfg)
    warm = pb.Batch(id=0, requests=[chunk_request(0, [1, 2], 2)])
    engine.warmup(pb.WarmupRequest(batch=warm, max_input_length=8, max_prefill_tokens=budget))
    return engine


def _greedy(state: dict, cfg: dict, prompt: list[int], n: int) -> list[int]:
    """The float64 reference's greedy tokens over the real vocabulary (NTK alpha from the whole prompt)."""
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(ref_forward(state, cfg, seq, prompt_len=len(prompt))[-1, :N_REAL].argmax()))
    return seq[len(prompt) :]


@dataclass
class Seen:
    tokens: dict[int, list[int]] = field(default_factory=dict)
    prompt: dict[int, tuple[list[float], int]] = field(default_factory=dict)  # prefill logprobs, tokens length
    steps: list[tuple[list[int], int]] = field(default_factory=list)  # per step: ids with a Generation, current

    def add(self, generations, batch) -> None:
        for g in generations:
            self.tokens.setdefault(g.request_id, []).extend(g.next_tokens.ids)
            if g.prefill_tokens is not None:
                self.prompt[g.request_id] = (list(g.prefill_tokens.logprobs), g.prefill_tokens_length)
        self.steps.append(([g.request_id for g in generations], batch.info().current_tokens if batch else 0))


def _to_end(engine: Engine, batch, seen: Seen) -> None:
    while batch is not None:
        gens, batch = engine.decode([batch.info()])
        seen.add(gens, batch)


def _script(engine: Engine, first_chunk: int | None) -> Seen:
    """Two requests decode; the long one joins them in a merged Prefill and is prefilled in chunks."""
    seen = Seen()
    gens, batch = engine.prefill(
        pb.Batch(id=1, requests=[chunk_request(1, SHORT, 40), chunk_request(2, SEEDED, 40, seeded=True)]), None
    )
    seen.add(gens, batch)
    assert batch is not None
    gens, batch = engine.decode([batch.info()])
    seen.add(gens, batch)
    assert batch is not None
    gens, batch = engine.prefill(
        pb.Batch(id=2, requests=[chunk_request(3, LONG, 4, first_chunk, prefill_logprobs=True)]), batch.info()
    )
    seen.add(gens, batch)
    _to_end(engine, batch, seen)
    return seen


@pytest.fixture(scope="module")
def model_dir(demo_dir, tmp_path_factory) -> str:
    """Random weights (the demo model's trained attention hardly depends on the NTK alpha) in the demo
    model's shape, with its tokenizer, and a short seq_length."""
    with open(os.path.join(demo_dir, "model", "config.json")) as f:
        cfg = {**json.load(f), "seq_length": SEQ}
    path = write_checkpoint(str(tmp_path_factory.mktemp("ntk")), cfg, random_checkpoint(cfg, seed=5))
    shutil.copy(os.path.join(demo_dir, "model", "qwen.tiktoken"), path)
    return path


@pytest.fixture(scope="module")
def ref(model_dir):
    state, cfg = load_checkpoint(model_dir)
    logits = ref_forward(state, cfg, LONG)[:, :N_REAL]  # the tokenizer's real vocabulary
    lp = torch.log_softmax(logits, -1)[torch.arange(len(LONG) - 1), torch.tensor(LONG[1:])]
    greedy = {1: _greedy(state, cfg, SHORT, 40), 3: _greedy(state, cfg, LONG, 4)}
    return state, cfg, greedy, [math.nan, *lp.tolist()]


@pytest.fixture(scope="module")
def unchunked(model_dir) -> Seen:
    engine = _engine(model_dir, chunked=False)
    return _script(engine, None)


def _max_diff(got: list[float], want: list[float]) -> float:
    """Largest |got - want|; NaN (a missing log-prob) counts as a failure."""
    assert len(got) == len(want)
    diff = (torch.tensor(got, dtype=torch.float64) - torch.tensor(want, dtype=torch.float64)).abs()
    return float("inf") if diff.isnan().any() else float(diff.max())


def _expected_chunks(first: int, budget: int, decoding: int) -> list[int]:
    sizes, done = [first], first
    while done < len(LONG):
        sizes.append(min(len(LONG) - done, budget - decoding))
        done += sizes[-1]
    return sizes


@pytest.mark.parametrize("first_chunk,budget,look_ahead", [(37, 53, None), (1, 91, True), (149, 8, None)])
def test_chunks_give_the_reference_tokens_and_logprobs(model_dir, ref, unchunked, first_chunk, budget, look_ahead):
    _, _, greedy, ref_lp = ref
    engine = _engine(model_dir, look_ahead=look_ahead, budget=budget)
    free = engine.allocator.free
    seen = _script(engine, first_chunk)
    assert seen.tokens[1] == greedy[1] == unchunked.tokens[1]
    assert seen.tokens[3] == greedy[3] == unchunked.tokens[3]
    assert seen.tokens[2] == unchunked.tokens[2]  # the seeded stream went on through the mixed steps
    lps, length = seen.prompt[3]
    assert length == len(LONG) and len(lps) == len(LONG) and math.isnan(lps[0])
    assert _max_diff(lps[1:], ref_lp[1:]) < 1e-4
    assert _max_diff(lps[1:], unchunked.prompt[3][0][1:]) < 1e-5
    chunk_sizes = _expected_chunks(first_chunk, budget, decoding=2)
    prefilling = seen.steps[2 : 2 + len(chunk_sizes) - 1]  # the merged Prefill, then a Decode per later chunk
    assert all(3 not in ids and set(ids) == {1, 2} for ids, _ in prefilling)  # no Generation while prefilling
    assert [current for _, current in prefilling] == [c + 2 for c in chunk_sizes[1:]]
    assert 3 in seen.steps[1 + len(chunk_sizes)][0]  # its first token comes with its last chunk
    assert engine.batches == {} and engine.allocator.free == free


def test_mixed_steps_on_the_triton_backend(model_dir, ref):
    """The same chunks through the Triton kernels (the interpreter on the CPU): each mixed step runs the
    decode rows as one-token chunks through the paged prefill kernel; pure decode steps use paged decode."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton interpreter is off (a GPU session: tests/gpu covers the compiled kernels)")
    from worker.kernels.triton_attention import Tiles
    from worker.layers.attention_triton import TritonAttention

    _, _, greedy, ref_lp = ref
    backend = TritonAttention(tiles=Tiles(prefill_m=16, prefill_n=16, decode_n=8))
    engine = _engine(model_dir, budget=53, backend=backend)
    assert engine.model.backend.name == "triton"
    seen = Seen()
    gens, batch = engine.prefill(pb.Batch(id=1, requests=[chunk_request(1, SHORT, 6)]), None)
    seen.add(gens, batch)
    assert batch is not None
    long = chunk_request(3, LONG, 2, 37, prefill_logprobs=True)
    gens, batch = engine.prefill(pb.Batch(id=2, requests=[long]), batch.info())
    seen.add(gens, batch)
    _to_end(engine, batch, seen)
    assert seen.tokens[1] == greedy[1][:6] and seen.tokens[3] == greedy[3][:2]
    assert _max_diff(seen.prompt[3][0][1:], ref_lp[1:]) < 1e-4
    assert [ids for ids, _ in seen.steps[1:4]] == [[1]] * 3  # chunks 37, 52, 52 with SHORT's decode rows


def test_one_prompt_under_two_adapters_in_mixed_steps(model_dir, ref, tmp_path):
    """The same long prompt under adapters a and b, chunked in one batch beside a decoding request on a: each
    row's LoRA segments follow its own chunk (or decode token); tokens equal the reference on merged weights."""
    from lora_helpers import load, write_adapter
    from reference import merge_lora
    from worker.adapters.pool import AdapterManager

    state, cfg, greedy, _ = ref
    root = str(tmp_path / "adapters")
    merged = {
        i: merge_lora(state, *write_adapter(root, n, cfg, r, 16, seed=i)) for i, n, r in [(1, "a", 4), (2, "b", 8)]
    }
    engine = _engine(model_dir, budget=50)
    model = engine.model
    mgr = AdapterManager(root, model, model.pctx, model.dtype, 8, 4)
    mgr.attach(engine)
    engine.adapters = mgr
    load(mgr, 1, "a")
    load(mgr, 2, "b")
    seen = Seen()
    gens, batch = engine.prefill(pb.Batch(id=1, requests=[chunk_request(1, SHORT, 12, adapter_index=1)]), None)
    seen.add(gens, batch)
    assert batch is not None
    new = [chunk_request(2, LONG, 3, 20, adapter_index=1), chunk_request(3, LONG, 3, 25, adapter_index=2)]
    gens, batch = engine.prefill(pb.Batch(id=2, requests=new), batch.info())
    seen.add(gens, batch)
    _to_end(engine, batch, seen)
    assert seen.tokens[1] == _greedy(merged[1], cfg, SHORT, 12)
    assert seen.tokens[2] == _greedy(merged[1], cfg, LONG, 3) != greedy[3][:3]
    assert seen.tokens[3] == _greedy(merged[2], cfg, LONG, 3)


def test_look_ahead_waits_for_the_last_chunk():
    decision = lookahead.decide(
        wanted=True, graphs_available=True, graphs_can_run=True, world_size=1, slots_allocated=True, prefilling=True
    )
    assert not decision.run and decision.reason == "requests still prefilling"


def test_the_budget_is_shared_by_the_prefilling_requests():
    from types import SimpleNamespace

    def row(prompt_len: int, n_cached: int, generated: int = 0):
        ids = [0] * (prompt_len + generated)
        return SimpleNamespace(
            ids=ids, prompt_len=prompt_len, n_cached=n_cached, chunk=0, prefilling=not generated, drafts=[]
        )

    reqs = [row(10, 10, 3), row(300, 100), row(20, 15), row(300, 0)]
    chunks.assign(reqs, 50)  # 49 left after the decoding row, one kept for each later prefilling request
    assert [r.chunk for r in reqs] == [0, 47, 1, 1]
    reqs = [row(300, 290), row(300, 0)]
    chunks.assign(reqs, 50)
    assert [r.chunk for r in reqs] == [10, 40]


def _routerchunk_request(rid: int, ids: list[int], max_new: int, blocks: list[int], **kw) -> pb.Request:
    req = chunk_request(rid, ids, max_new, **kw)
    n = len(ids) + max_new - 1
    req.blocks[:] = blocks
    req.slots[:] = [b * 16 + j for b in blocks for j in range(16)][:n]
    return req


def test_a_cancelled_request_s_computed_chunks_serve_as_a_cached_prefix(model_dir, ref):
    """A is cancelled (FilterBatch) mid-prefill after 88 of its 150 tokens were computed; B reuses A's first
    5 blocks (80 tokens; same NTK alpha bucket) with cache_len 80 and is prefilled in chunks of 30."""
    state, cfg, greedy, _ = ref
    engine = _engine(model_dir, budget=41)
    free = engine.allocator.free
    seen = Seen()
    gens, batch = engine.prefill(pb.Batch(id=1, requests=[chunk_request(1, SHORT, 40)]), None)
    seen.add(gens, batch)
    a_blocks = list(range(0, 10))
    a = _routerchunk_request(2, LONG, 4, a_blocks, chunk_len=48)
    gens, batch = engine.prefill(pb.Batch(id=2, requests=[a]), batch.info())
    seen.add(gens, batch)
    gens, batch = engine.decode([batch.info()])  # 48 + 40 computed
    seen.add(gens, batch)
    assert batch.info().current_tokens == 41 and 2 not in seen.tokens
    batch = engine.filter(batch.id, [1])  # the router cancels A mid-chunk
    b_prompt = LONG[:80] + [(7 * i) % 500 for i in range(70)]
    b_blocks = a_blocks[:5] + list(range(40, 45))
    b = _routerchunk_request(3, b_prompt, 4, b_blocks, cache_len=80, chunk_len=30, prefill_logprobs=True)
    gens, batch = engine.prefill(pb.Batch(id=3, requests=[b]), batch.info())
    seen.add(gens, batch)
    _to_end(engine, batch, seen)
    assert seen.tokens[1] == greedy[1]
    assert seen.tokens[3] == _greedy(state, cfg, b_prompt, 4)
    lps, length = seen.prompt[3]
    logits = ref_forward(state, cfg, b_prompt)[:, :N_REAL]
    ref_lp = torch.log_softmax(logits, -1)[torch.arange(80, 149), torch.tensor(b_prompt[81:])]
    assert length == 70 and math.isnan(lps[0])
    assert _max_diff(lps[1:], ref_lp.tolist()) < 1e-4
    assert engine.batches == {} and engine.allocator.free == free


def test_a_failed_merged_prefill_leaves_the_running_batch(model_dir, ref, monkeypatch):
    _, _, greedy, _ = ref
    engine = _engine(model_dir)
    free = engine.allocator.free
    seen = Seen()
    gens, batch = engine.prefill(pb.Batch(id=1, requests=[chunk_request(1, SHORT, 40)]), None)
    seen.add(gens, batch)
    forward = engine.runner.forward

    def oom(*args, **kw):
        raise torch.OutOfMemoryError("injected")

    monkeypatch.setattr(engine.runner, "forward", oom)
    with pytest.raises(torch.OutOfMemoryError):
        engine.prefill(pb.Batch(id=2, requests=[chunk_request(3, LONG, 4, 40)]), batch.info())
    monkeypatch.setattr(engine.runner, "forward", forward)
    assert list(engine.batches) == [1] and engine.batches[1] is batch and engine.allocator.free == free - 3
    _to_end(engine, batch, seen)
    assert seen.tokens[1] == greedy[1] and engine.allocator.free == free


def test_chunk_len_is_validated(model_dir):
    engine = _engine(model_dir)
    with pytest.raises(InvalidArgument, match="chunk_len 0"):
        engine.prefill(pb.Batch(id=1, requests=[chunk_request(1, LONG, 4, 0)]), None)
    gens, batch = engine.prefill(pb.Batch(id=2, requests=[chunk_request(2, SHORT, 1, 2**32 - 1)]), None)
    assert len(gens) == 1 and batch is None  # a chunk_len past the prompt computes it whole
    off = _engine(model_dir, chunked=False)
    with pytest.raises(FailedPrecondition, match="chunked prefill"):
        off.prefill(pb.Batch(id=1, requests=[chunk_request(1, LONG, 4, 100)]), None)
    assert engine.batches == {} and off.batches == {}
