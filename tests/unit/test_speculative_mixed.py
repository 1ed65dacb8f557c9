"""Verify rows beside everything else a step can hold, fp32 on the CPU, against the same engine without drafts:
prompts past seq_length (dynamic NTK, logn), chunked prefill in the same forward, batches with and without
drafts concatenated, LoRA adapters per row, an fp8 KV cache, and a JSON-schema constrained row (no drafts)."""

from __future__ import annotations

import json
import os
import random
import shutil

import pytest
import torch

from helpers import PERSON, write_checkpoint
from random_weights import random_checkpoint
from spec_helpers import Seen, Spy, close, engine, finish, greedy_request, live, run
from worker.engine import prompt_lookup
from worker.engine.batch import Batch
from worker.engine.prompt_lookup import PromptLookup
from worker.models.qwen import FlashQwenForCausalLM
from worker.pb import generate_pb2 as pb
from worker.tokenizer import QwenTokenizer

SEQ = 64  # the random model's seq_length: the long prompts below run with NTK alpha > 1 and logn
CYCLE = random.Random(1).choices(range(500), k=30)
LONG = CYCLE * 5  # 150 tokens: n-grams repeat, so prompt lookup drafts the cycle
COPY = "The capital of France is Paris, a city of light and old stone bridges. The capital of France is"
OPEN = "Water boils at"


@pytest.fixture(scope="module")
def ntk(demo_dir, tmp_path_factory) -> tuple[FlashQwenForCausalLM, QwenTokenizer]:
    """Random weights in the demo model's shape with a short seq_length, and the demo tokenizer."""
    with open(os.path.join(demo_dir, "model", "config.json")) as f:
        cfg = {**json.load(f), "seq_length": SEQ}
    path = write_checkpoint(str(tmp_path_factory.mktemp("ntk")), cfg, random_checkpoint(cfg, seed=5))
    shutil.copy(os.path.join(demo_dir, "model", "qwen.tiktoken"), path)
    return FlashQwenForCausalLM.from_pretrained(path, dtype=torch.float32, progress=False), QwenTokenizer.from_dir(path)


def same(on: Seen, off: Seen, rids) -> None:
    for rid in rids:
        assert on.tokens(rid) == off.tokens(rid) and close(on.logprobs[rid], off.logprobs[rid])
        assert on.done[rid].text == off.done[rid].text


def test_long_prompts_with_ntk_and_rejected_drafts(ntk, monkeypatch):
    """Drafts of a 150-token prompt (NTK alpha 7 on a seq_length of 64): the random model rejects many."""
    model, tok = ntk

    def requests():
        return [greedy_request(1, LONG, 24), greedy_request(2, LONG[7:100], 24), greedy_request(3, CYCLE[:9], 24)]

    off = run(engine(model, tok, 0), requests())
    spy = Spy.on(monkeypatch)
    on = run(engine(model, tok, 5), requests())
    same(on, off, (1, 2, 3))
    assert spy.proposed - spy.accepted >= 20  # drafts were verified and rejected


def test_the_lookup_turns_itself_off_for_a_request_whose_drafts_fail(ntk, monkeypatch, caplog):
    """Every token occurs in the prompt, so each step finds a 1-gram and drafts; hot sampling rejects them all:
    after a window of drafted steps the request drafts no more, and the log says so."""
    model, tok = ntk
    every = random.Random(2).sample(range(518), 518)  # the whole vocabulary, shuffled

    def requests():
        return [greedy_request(1, every, 20, do_sample=True, temperature=3.0, seed=11)]

    off = run(engine(model, tok, 0), requests())
    spy = Spy.on(monkeypatch)
    drafted = []
    record = PromptLookup.record
    monkeypatch.setattr(PromptLookup, "record", lambda self, *a: drafted.append(a[1]) or record(self, *a))
    with caplog.at_level("INFO", logger="worker.engine.prompt_lookup"):
        on = run(engine(model, tok, 5), requests())
    assert on.tokens(1) == off.tokens(1) and spy.accepted == 0
    assert drafted == [5] * prompt_lookup.WINDOW and len(on.steps[1]) == 20  # none after the window
    assert "request 1: prompt lookup off (0 of 40 drafts accepted over 8 steps, below 20%)" in caplog.text


def chunked_script(model, tok, n: int) -> tuple[Seen, list[tuple[int, int]]]:
    """A request decodes with drafts while a long prompt joins it in a merged Prefill and is prefilled in chunks
    (a step budget of 40 tokens). Also returns, for each step with a chunk, its tokens and drafts."""
    e = engine(model, tok, n, max_prefill_tokens=40)
    seen, steps = Seen(), []
    batch = live(seen, e.prefill(pb.Batch(id=1, requests=[greedy_request(1, LONG[:60], 30)]), None))
    batch = live(seen, e.decode([batch.info()]))
    new = greedy_request(2, LONG, 10, chunk_len=33)
    batch = live(seen, e.prefill(pb.Batch(id=2, requests=[new]), batch.info()))
    while any(r.prefilling for r in batch.requests):
        steps.append((batch.info().current_tokens, sum(len(r.drafts) for r in batch.requests)))
        batch = live(seen, e.decode([batch.info()]))
    return finish(e, seen, batch), steps


def test_verify_rows_beside_prompt_chunks(ntk):
    """The chunks shrink by the drafts: a step computes at most the budget."""
    model, tok = ntk
    off, _ = chunked_script(model, tok, 0)
    on, steps = chunked_script(model, tok, 4)
    assert on.tokens(1) == off.tokens(1) and on.tokens(2) == off.tokens(2)
    assert all(tokens <= 40 for tokens, _ in steps) and any(drafts for _, drafts in steps)


def concat_script(model, tok, n: int) -> tuple[Seen, bool]:
    """Batch 1 speculates; batch 2 (no drafts yet) is prefilled alone and joins it (no chunked prefill)."""
    e = engine(model, tok, n, chunked_prefill=False)
    seen = Seen()
    b1 = live(seen, e.prefill(pb.Batch(id=1, requests=[greedy_request(1, tok.encode(COPY), 30)]), None))
    b1 = live(seen, e.decode([b1.info()]))
    b2 = live(seen, e.prefill(pb.Batch(id=2, requests=[greedy_request(2, tok.encode(OPEN), 12)]), None))
    mixed = bool(b1.requests[0].drafts) and not b2.requests[0].drafts
    return finish(e, seen, live(seen, e.decode([b2.info(), b1.info()]))), mixed


def test_batches_with_and_without_drafts_concatenate(demo):
    off, _ = concat_script(*demo, 0)
    on, mixed = concat_script(*demo, 4)
    assert mixed
    same(on, off, (1, 2))
    assert on.done[1].skipped_tokens > 0


def test_each_row_verifies_under_its_own_adapter(demo_dir, monkeypatch):
    """Copy prompts under the pirate and robot adapters and the base in one batch."""
    from lora_helpers import load
    from worker.adapters.pool import AdapterManager

    path = os.path.join(demo_dir, "model")
    tok = QwenTokenizer.from_dir(path)
    story = "Tell me a story: Arr, the ship sailed north to find the lost treasure. Tell me a story:"

    def go(n: int) -> Seen:  # a model and adapter pool per engine (the pool wraps the model's linears)
        model = FlashQwenForCausalLM.from_pretrained(path, dtype=torch.float32, progress=False)
        mgr = AdapterManager(os.path.join(demo_dir, "adapters"), model, model.pctx, model.dtype, 16, 4)
        e = engine(model, tok, n)
        mgr.attach(e)
        load(mgr, 1, "pirate")
        load(mgr, 2, "robot")
        reqs = [greedy_request(i, tok.encode(story), 24, adapter_index=i) for i in (0, 1, 2)]
        return run(e, reqs)

    off = go(0)
    spy = Spy.on(monkeypatch)
    on = go(4)
    same(on, off, (0, 1, 2))
    assert off.tokens(1) != off.tokens(2) and spy.accepted >= 5


def test_fp8_kv_cache(demo, monkeypatch):
    def requests():
        return [greedy_request(1, demo[1].encode(COPY), 30), greedy_request(2, demo[1].encode(OPEN), 30)]

    fp8 = torch.float8_e4m3fn
    off = run(engine(*demo, 0, kv_cache_dtype=fp8), requests())
    spy = Spy.on(monkeypatch)
    on = run(engine(*demo, 4, kv_cache_dtype=fp8), requests())
    assert on.tokens(1) == off.tokens(1) and on.tokens(2) == off.tokens(2) and spy.accepted >= 5


def test_a_constrained_row_gets_no_drafts(demo, monkeypatch):
    _, tok = demo

    def requests():
        schema = greedy_request(2, tok.encode(OPEN), 40, ignore_eos=False)
        schema.parameters.schema = json.dumps(PERSON)
        return [greedy_request(1, tok.encode(COPY), 30), schema]

    off = run(engine(*demo, 0), requests())
    spy = Spy.on(monkeypatch)
    on = run(engine(*demo, 4), requests())
    same(on, off, (1, 2))
    assert all(len(ids) == 1 for rid, ids in spy.choices if rid == 2) and spy.accepted >= 5


def test_no_look_ahead_for_a_batch_with_drafts(demo):
    """A look-ahead cannot know how many drafts a step accepts: a batch with drafts gets none, a batch without
    gets one (look-ahead forced on), and the tokens are those of the run without either."""
    model, tok = demo
    off = run(engine(model, tok, 0), [greedy_request(1, tok.encode(COPY), 20)])
    e = engine(model, tok, 4, look_ahead=True)
    seen, aheads = Seen(), []
    batch: Batch | None = live(
        seen, e.prefill(pb.Batch(id=1, requests=[greedy_request(1, tok.encode(COPY), 20)]), None)
    )
    while batch is not None:
        r = batch.requests[0]
        aheads.append((bool(r.drafts), r.ahead is not None))
        gens, batch = e.decode([batch.info()])
        seen.add(gens)
    assert seen.tokens(1) == off.tokens(1)
    assert (True, False) in aheads and (False, True) in aheads and (True, True) not in aheads
