"""Medusa drafts end to end, fp32 on the CPU: the engine drafts the heads' argmax at each request's last chosen
position and verifies them next step. The claims: greedy and seeded output equal the same model's without
heads; the demo's trained heads get drafts accepted (steps of up to K + 1 tokens), random heads (v1 and v2,
built through worker/layers/medusa.py) mostly not; --speculative-tokens caps the drafts per step."""

from __future__ import annotations

import os

import pytest
import torch

from spec_helpers import Seen, Spy, engine, greedy_request, run
from worker.adapters.medusa import load_speculator
from worker.layers.context import ForwardContext, Seqlen
from worker.layers.medusa import MedusaCheckpoint
from worker.models.qwen import FlashQwenForCausalLM
from worker.tokenizer import QwenTokenizer

PROMPTS = ["The capital of France is", "Qwen is a family of", "Tell me a story:", "Water boils at"]


def load(demo_dir: str) -> tuple[FlashQwenForCausalLM, QwenTokenizer]:
    path = os.path.join(demo_dir, "model")
    return FlashQwenForCausalLM.from_pretrained(path, dtype=torch.float32, progress=False), QwenTokenizer.from_dir(path)


@pytest.fixture(scope="module")
def plain(demo_dir):
    return load(demo_dir)


@pytest.fixture(scope="module")
def with_heads(demo_dir):
    """The demo model with its trained Medusa v2 heads (3) as the base speculator."""
    model, tok = load(demo_dir)
    model.attach_medusa(load_speculator(os.path.join(demo_dir, "adapters"), "medusa", model.config))
    return model, tok


def random_heads(model: FlashQwenForCausalLM, version: int, heads: int, seed: int) -> MedusaCheckpoint:
    g = torch.Generator().manual_seed(seed)
    H, V, L = model.config.hidden_size, model.config.vocab_size, 2 if version == 1 else 1
    return MedusaCheckpoint(
        path=f"random v{version}",
        version=version,
        num_heads=heads,
        num_layers=L,
        weights=torch.randn(heads, L, H, H, generator=g) * 0.1,
        biases=torch.randn(heads, L, H, generator=g) * 0.1,
        projections=torch.randn(heads, V, H, generator=g) * 0.1 if version == 1 else None,
    )


def requests(tok: QwenTokenizer, **params) -> list:
    return [greedy_request(i, tok.encode(p), 20, **params) for i, p in enumerate(PROMPTS)]


def same_tokens(on: Seen, off: Seen) -> None:
    for rid in range(len(PROMPTS)):
        assert on.tokens(rid) == off.tokens(rid) and len(on.tokens(rid)) == 20
        assert on.done[rid].skipped_tokens == sum(len(s) - 1 for s in on.steps[rid])


def test_trained_heads_draft_accepted_tokens_and_keep_the_greedy_output(plain, with_heads, monkeypatch):
    off = run(engine(*plain, 0), requests(plain[1]))
    spy = Spy.on(monkeypatch)
    e = engine(*with_heads, 0)
    assert e.speculation.tokens == 3 and e.speculation.medusa_heads == 3
    on = run(e, requests(with_heads[1]))
    same_tokens(on, off)
    assert spy.accepted >= 20 and max(len(s) for rid in range(4) for s in on.steps[rid]) == 4


def test_seeded_sampling_with_heads_draws_the_same_tokens(plain, with_heads, monkeypatch):
    sample = dict(do_sample=True, temperature=0.8, top_k=10, seed=77)
    off = run(engine(*plain, 0), requests(plain[1], **sample))
    spy = Spy.on(monkeypatch)
    on = run(engine(*with_heads, 0), requests(with_heads[1], **sample))
    same_tokens(on, off)
    assert spy.accepted >= 10


def test_speculative_tokens_caps_the_heads_drafts(with_heads, monkeypatch):
    spy = Spy.on(monkeypatch)
    e = engine(*with_heads, 2)
    assert e.speculation.tokens == 2
    on = run(e, requests(with_heads[1]))
    assert max(len(s) for rid in range(4) for s in on.steps[rid]) == 3 and spy.accepted >= 10


@pytest.mark.parametrize("version", [1, 2])
def test_random_heads_keep_the_greedy_output(plain, demo_dir, version, monkeypatch):
    model, tok = load(demo_dir)
    model.attach_medusa(random_heads(model, version, 4, seed=version))
    off = run(engine(*plain, 0), requests(tok))
    spy = Spy.on(monkeypatch)
    on = run(engine(model, tok, 0), requests(tok))
    same_tokens(on, off)
    assert spy.proposed - spy.accepted >= 40  # the random heads' drafts were verified and mostly rejected


def expected_steps(model: FlashQwenForCausalLM, seq: list[int], prompt_len: int, n_real: int) -> list[int]:
    """Tokens per step a Medusa engine must report for the greedy sequence `seq`, simulated on one cache-free
    forward of the whole sequence: the step after token q verifies the heads' argmax at q (head k guesses
    token q + 1 + k) and accepts them while they equal seq."""
    n = len(seq)
    ctx = ForwardContext.build(
        model.rotary,
        is_prefill=True,
        positions=torch.arange(n),
        seqlen=Seqlen.for_prefill([n], None, [1.0]),
        lm_head_indices=torch.arange(n),
    )
    with torch.inference_mode():
        _, spec = model.forward_speculative(torch.tensor(seq), ctx, None, None)
    assert spec is not None
    guesses = spec[..., :n_real].argmax(-1).tolist()  # [n, K]: head k at position t guesses seq[t + 2 + k]
    steps, t = [1], prompt_len - 1  # the prefill chooses seq[prompt_len]; drafts from the last prompt token
    while t + 2 - prompt_len < n - prompt_len:  # tokens generated so far < max_new_tokens
        budget = min(len(guesses[t]), n - t - 3)  # drafts cut to max_new_tokens - generated - 1
        accepted = 0
        while accepted < budget and guesses[t][accepted] == seq[t + 2 + accepted]:
            accepted += 1
        steps.append(1 + accepted)
        t += 1 + accepted  # the next drafts come from the last accepted token's position
    return steps


def test_drafts_are_the_heads_guesses_at_the_last_accepted_position(with_heads):
    """40 tokens leave the trained sentences: some drafts are rejected, and the next ones must come from the
    position of the last accepted token, as a cache-free simulation says."""
    model, tok = with_heads
    reqs = [greedy_request(i, tok.encode(p), 40) for i, p in enumerate(PROMPTS)]
    on = run(engine(model, tok, 0), reqs)
    rejected = 0
    for rid, p in enumerate(PROMPTS):
        prompt = tok.encode(p)
        want = expected_steps(model, prompt + on.tokens(rid), len(prompt), tok.n_real_vocab)
        assert [len(s) for s in on.steps[rid]] == want
        rejected += sum(n < 4 for n in want[1:-1])
    assert rejected >= 4


def test_rows_under_adapters_draft_from_the_base_heads(demo_dir, monkeypatch):
    """LoRA rows (pirate, robot) and a base row in one batch with the base speculator: each row's logits and
    heads see its own adapter; the tokens equal the same adapters without heads."""
    from lora_helpers import load as load_adapter
    from worker.adapters.pool import AdapterManager

    story = "Tell me a story:"

    def go(with_heads: bool) -> Seen:
        model, tok = load(demo_dir)
        if with_heads:
            model.attach_medusa(load_speculator(os.path.join(demo_dir, "adapters"), "medusa", model.config))
        mgr = AdapterManager(os.path.join(demo_dir, "adapters"), model, model.pctx, model.dtype, 16, 4)
        e = engine(model, tok, 0)
        mgr.attach(e)
        load_adapter(mgr, 1, "pirate")
        load_adapter(mgr, 2, "robot")
        return run(e, [greedy_request(i, tok.encode(story), 20, adapter_index=i) for i in (0, 1, 2)])

    off = go(False)
    spy = Spy.on(monkeypatch)
    on = go(True)
    for rid in (0, 1, 2):
        assert on.tokens(rid) == off.tokens(rid)
    assert off.tokens(1) != off.tokens(0) and spy.proposed > 0
