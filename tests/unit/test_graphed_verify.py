"""Verify steps (a decode token and its drafts, logits at every position) through GraphedVerify's static,
padded buffers, run eagerly here (graphs=False), against the runner's eager span path: the same last and
per-position logits, the same Medusa logits, the same K/V in every block a request owns; the float64
reference's logits at each verified position; the steps the graphs must leave to the eager path. Replaying
the captured graphs is tests/gpu/test_gpu_spec_graphs.py's job."""

from __future__ import annotations

import os
import random
import sys
from types import SimpleNamespace
from typing import Any

import pytest

if "worker.kernels.triton_attention" not in sys.modules:  # the kernels bind to the interpreter when defined
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from helpers import TINY, write_checkpoint  # noqa: E402
from medusa_helpers import medusa_tensors, write_medusa  # noqa: E402
from random_weights import random_checkpoint  # noqa: E402
from reference import ref_forward  # noqa: E402
from spec_helpers import close, engine, greedy_request, run  # noqa: E402
from worker.adapters.medusa import load_speculator  # noqa: E402
from worker.engine.chunks import RowSpan  # noqa: E402
from worker.engine.graphed_verify import GraphedVerify, verify_buckets  # noqa: E402
from worker.engine.kv_cache import KVCache  # noqa: E402
from worker.engine.runner import Runner, StepLogits  # noqa: E402
from worker.models.qwen import FlashQwenForCausalLM  # noqa: E402
from worker.tokenizer import QwenTokenizer  # noqa: E402

BLOCK, NUM_BLOCKS, MAX_BLOCKS, DRAFTS = 4, 96, 24, 4
CPU = torch.device("cpu")
VOCAB, HIDDEN = 256, 64  # TINY's
SCRATCH = NUM_BLOCKS - 1


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    state = random_checkpoint(TINY, 5)
    return write_checkpoint(str(tmp_path_factory.mktemp("ckpt")), TINY, state), state


def load(path: str, backend_name: str = "torch", medusa: str | None = None) -> FlashQwenForCausalLM:
    """The tiny model (fp32), with random Medusa heads ("v1", "v2") as its base speculator when asked."""
    backend = None
    if backend_name == "triton":
        from worker.kernels.triton_attention import Tiles
        from worker.layers.attention_triton import TritonAttention

        backend = TritonAttention(tiles=Tiles(prefill_m=16, prefill_n=16, decode_n=8), use_varlen_attn=False)
    model = FlashQwenForCausalLM.from_pretrained(path, dtype=torch.float32, backend=backend, progress=False)
    if medusa is not None:
        root, v1 = os.path.dirname(path), medusa == "v1"
        write_medusa(os.path.join(root, medusa), medusa_tensors(HIDDEN, VOCAB, 3, 1 + v1, v1, seed=9), 3, 1 + v1)
        model.attach_medusa(load_speculator(root, medusa, model.config))
    return model


def requests(lengths: list[int], drafts: list[int], seed: int) -> list[SimpleNamespace]:
    """Requests with shuffled blocks (never the scratch block) and slots for their drafts' positions too."""
    g = random.Random(seed)
    free = list(range(SCRATCH))
    g.shuffle(free)
    out = []
    for n, d in zip(lengths, drafts):
        blocks = [free.pop() for _ in range(-(-(n + max(d, 0)) // BLOCK))]
        slots = [blocks[p // BLOCK] * BLOCK + p % BLOCK for p in range(n + max(d, 0))]
        ids = [g.randrange(VOCAB) for _ in range(n)]
        out.append(SimpleNamespace(ids=ids, slots=slots, blocks=blocks, ntk_alpha=1.0, n_cached=0))
    return out


def verify_spans(reqs: list[SimpleNamespace], drafts: list[int], seed: int) -> list[RowSpan]:
    """Per request: d >= 0, a decoding row (its last token and d drafts: a verify row, every position's
    logits, when d > 0); d < 0, a prompt chunk of -d tokens after a cached prefix (the last token's logits)."""
    g = random.Random(seed)
    out = []
    for r, d in zip(reqs, drafts):
        n = len(r.ids)
        guesses = tuple(g.randrange(VOCAB) for _ in range(d))
        out.append(RowSpan(n + d, n, False) if d < 0 else RowSpan(n - 1, n, d > 0, guesses))
    return out


def kv_of(model: FlashQwenForCausalLM) -> KVCache:
    c = model.config
    return KVCache(c.num_hidden_layers, NUM_BLOCKS, BLOCK, c.num_attention_heads, c.head_dim, torch.float32, CPU)


def two_runs(model, reqs, spans, speculative=False):
    """The step of `spans` after each request's prefix ids[:start] filled eagerly, run by the eager span path
    and through GraphedVerify: ((StepLogits, cache), (StepLogits, cache), the buckets it replayed)."""
    kv = kv_of(model)
    Runner(model, kv, CPU).forward(as_batch(reqs), True, spans=[RowSpan(0, sp.start, False) for sp in spans])
    graphed = GraphedVerify(model, kv, MAX_BLOCKS, SCRATCH, DRAFTS, (1, 2, 4, 8), graphs=False)
    replays: list[tuple[int, int]] = []
    inner = graphed.replay
    graphed.replay = lambda b, *a: replays.append(b) or inner(b, *a)
    results = []
    for runner in (Runner(model, kv, CPU), Runner(model, kv, CPU, verify_graphs=graphed)):
        before = [(k.clone(), v.clone()) for k, v in kv.layers]
        for r, sp in zip(reqs, spans):
            r.n_cached = sp.start
        out = runner.forward(as_batch(reqs), True, spans=spans, speculative=speculative)
        assert [r.n_cached for r in reqs] == [sp.stop for sp in spans]
        results.append((out, [(k.clone(), v.clone()) for k, v in kv.layers]))
        for (k, v), (k0, v0) in zip(kv.layers, before):
            k.copy_(k0)
            v.copy_(v0)
    return results[0], results[1], replays


def as_batch(reqs: list[SimpleNamespace]) -> Any:
    return SimpleNamespace(requests=reqs)


def same(ours: StepLogits, eager: StepLogits, exact: bool) -> None:
    """The same fields; bitwise when `exact` (no padding: the same GEMM shapes)."""

    def check(a: torch.Tensor, b: torch.Tensor) -> None:
        assert a.shape == b.shape
        assert torch.equal(a, b) if exact else torch.allclose(a, b, rtol=1e-5, atol=1e-5)

    check(ours.last, eager.last)
    assert ours.prompt.keys() == eager.prompt.keys()
    for i in eager.prompt:
        check(ours.prompt[i], eager.prompt[i])
    assert (ours.speculative is None) == (eager.speculative is None)
    for a, b in zip(ours.speculative or [], eager.speculative or []):
        assert a is not None and b is not None
        check(a, b)


CASES = {  # lengths, drafts per row (< 0: a prompt chunk), the bucket the step takes
    "one_row_exact_1x5": ([13], [4], (1, 5)),
    "one_row_two_drafts_exact_1x3": ([9], [2], (1, 3)),
    "two_rows_exact_2x10": ([10, 17], [4, 4], (2, 10)),
    "three_rows_mixed_drafts_exact_4x8": ([11, 6, 21], [3, 0, 2], (4, 8)),
    "three_rows_padded_4x8": ([11, 6, 21], [3, 0, 1], (4, 8)),
    "beside_a_prompt_chunk_padded_4x12": ([11, 23, 8], [4, -5, 0], (4, 12)),
    "five_rows_some_without_drafts_padded": ([7, 12, 9, 30, 5], [4, 2, 0, 4, 2], (8, 24)),
}


TRITON_CASES = [c for c in CASES if len(CASES[c][0]) <= 3]  # the interpreter is slow: the wider steps on torch


@pytest.mark.parametrize("case,backend", [(c, "torch") for c in CASES] + [(c, "triton") for c in TRITON_CASES])
def test_verify_step_equals_the_eager_span_path(checkpoint, backend, case):
    lengths, drafts, bucket = CASES[case]
    model = load(checkpoint[0], backend)
    reqs = requests(lengths, drafts, seed=len(case))
    spans = verify_spans(reqs, drafts, seed=1)
    (eager, eager_kv), (ours, our_kv), replays = two_runs(model, reqs, spans)
    assert replays == [bucket] and ours.speculative is None
    same(ours, eager, exact=bucket[1] == sum(sp.n_tokens for sp in spans))
    for (k, v), (k0, v0) in zip(our_kv, eager_kv):  # padding writes only the scratch block
        torch.testing.assert_close(k[:SCRATCH], k0[:SCRATCH], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(v[:SCRATCH], v0[:SCRATCH], rtol=1e-5, atol=1e-6)


MEDUSA_CASES = {  # drafts per row (< 0: a prompt chunk), the bucket, exactly filled
    "one_row": ([4], (1, 5), True),
    "three_rows": ([3, 0, 2], (4, 8), True),
    "beside_a_prompt_chunk": ([2, -4], (4, 8), False),  # 7 tokens: (4, 8) is smaller than (2, 10)
}


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("case", list(MEDUSA_CASES))
def test_medusa_logits_equal_the_eager_speculative_forward(checkpoint, version, case):
    drafts, bucket, exact = MEDUSA_CASES[case]
    model = load(checkpoint[0], medusa=version)
    reqs = requests([14, 8, 19][: len(drafts)], drafts, seed=3)
    spans = verify_spans(reqs, drafts, seed=4)
    (eager, _), (ours, _), replays = two_runs(model, reqs, spans, speculative=True)
    assert replays == [bucket]
    assert eager.speculative is not None and len(eager.speculative) == len(drafts)
    same(ours, eager, exact)


def test_verified_positions_match_the_float64_reference(checkpoint):
    """Short contexts (alpha 1, no logn): each verify row's logits at position p are the float64 model's for
    its ids and drafts up to p."""
    path, state = checkpoint
    model = load(path)
    drafts = [4, 1, 0]
    reqs = requests([9, 20, 5], drafts, seed=6)
    spans = verify_spans(reqs, drafts, seed=7)
    _, (ours, _), replays = two_runs(model, reqs, spans)
    assert replays == [(4, 8)]
    for i, (r, sp) in enumerate(zip(reqs, spans)):
        ref = ref_forward(state, TINY, r.ids + list(sp.drafts))[sp.start :].float()
        got = ours.prompt[i] if sp.drafts else ours.last[i : i + 1]
        torch.testing.assert_close(got, ref[:, : got.shape[1]], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ours.last[i], ref[-1, : got.shape[1]], rtol=1e-4, atol=1e-4)


def test_steps_the_verify_graphs_cannot_serve_go_eager(checkpoint):
    model = load(checkpoint[0], medusa="v2")
    graphed = GraphedVerify(model, kv_of(model), MAX_BLOCKS, SCRATCH, DRAFTS, (1, 2, 4), graphs=False)
    reqs = requests([20, 10, 6], [4, 4, 4], seed=2)
    batch = as_batch(reqs)
    spans = verify_spans(reqs, [4, 4, 4], seed=3)  # 15 tokens: bucket (4, 20)
    assert graphed.bucket(batch, spans, None) == (4, 20)
    assert graphed.bucket(batch, spans, [0, 2, 0]) is None  # an adapter
    assert graphed.bucket(batch, [RowSpan(0, len(r.ids), False) for r in reqs], None) is None  # fresh prompts
    assert graphed.bucket(as_batch(reqs * 2), spans * 2, None) is None  # 6 rows > 4
    long = [RowSpan(1, len(r.ids), False) for r in reqs]  # 19 + 9 + 5 = 33 tokens > 20
    assert graphed.bucket(batch, long, None) is None
    assert graphed.serves(True) and not graphed.serves(False)  # captured with heads: the speculative forward only
    model.attach_medusa(load_speculator(os.path.dirname(checkpoint[0]), "v2", model.config))  # not the captured

    assert not graphed.serves(True)
    assert graphed.try_verify(batch, spans, None, True) is None and [r.n_cached for r in reqs] == [0, 0, 0]
    plain = GraphedVerify(load(checkpoint[0]), kv_of(model), MAX_BLOCKS, SCRATCH, DRAFTS, (1,), graphs=False)
    assert plain.serves(False) and not plain.serves(True)  # no heads at capture


def test_buckets_fill_exactly_for_uniform_drafts():
    buckets = verify_buckets((1, 2, 4, 8, 16, 32), 4)
    assert [t for r, t in buckets if r == 1] == [2, 3, 4, 5]  # batch 1: every draft count exactly
    assert all((r, r * 5) in buckets and (r, r * 2) in buckets for r in (2, 4, 8, 16, 32))
    assert len(buckets) == 4 + 5 * 3
    assert (4, 4 * 11) in verify_buckets((4,), 10) and (4, 4 * 9) in verify_buckets((4,), 10)
    capped = verify_buckets((1, 32), 16)  # one row: every count; 32 rows: up to 256 tokens (7 drafts each)
    assert [t for r, t in capped if r == 32] == [64, 96, 160] and len(capped) == 16 + 3


PROMPTS = [
    "The capital of France is Paris, a city of light and old stone bridges. The capital of France is",
    "The quick brown fox jumps over the lazy dog by the river. The quick brown fox",
    "Water boils at",
]


@pytest.mark.parametrize("heads", ["lookup", "medusa"])
def test_engine_output_with_verify_steps_through_the_graphs_step(demo_dir, heads):
    """The engine's verify steps through GraphedVerify (prompt lookup; the demo's trained Medusa heads): greedy
    tokens and logprobs equal the engine's without drafts, and every verify step took the static-buffer step."""
    path = os.path.join(demo_dir, "model")
    tok = QwenTokenizer.from_dir(path)

    def model() -> FlashQwenForCausalLM:
        return FlashQwenForCausalLM.from_pretrained(path, dtype=torch.float32, progress=False)

    def requests() -> list:
        return [greedy_request(i, tok.encode(p), 16) for i, p in enumerate(PROMPTS)]

    off = run(engine(model(), tok, 0), requests())
    drafting = model()
    if heads == "medusa":
        drafting.attach_medusa(load_speculator(os.path.join(demo_dir, "adapters"), "medusa", drafting.config))
    e = engine(drafting, tok, 4 if heads == "lookup" else 0)
    assert e.runner is not None and e.runner.kv is not None and e.speculation.tokens
    kv, cfg = e.runner.kv, e.cfg
    graphed = GraphedVerify(drafting, kv, -(-cfg.max_seq_len // cfg.block_size), kv.num_blocks - 1, 4, graphs=False)
    e.runner.verify_graphs = graphed
    on = run(e, requests())
    for rid in range(len(PROMPTS)):
        assert on.tokens(rid) == off.tokens(rid) and close(on.logprobs[rid], off.logprobs[rid])
    assert max(len(s) for rid in range(len(PROMPTS)) for s in on.steps[rid]) > 1  # drafts were accepted
    assert graphed.verify_steps["graphed"] >= 3 and graphed.verify_steps["eager"] == 0
