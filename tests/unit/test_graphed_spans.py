"""Span steps through GraphedSpans' static, padded buffers (run eagerly here: graphs=False) against the
runner's eager span path: the same logits, and the same K/V in every block a request owns (padding writes
only the scratch block). Replaying the captured graphs is tests/gpu/test_gpu_chunked.py's job."""

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
from random_weights import random_checkpoint  # noqa: E402
from reference import ref_forward  # noqa: E402
from worker.engine.chunks import RowSpan  # noqa: E402
from worker.engine.graphed_spans import GraphedSpans, span_buckets  # noqa: E402
from worker.engine.kv_cache import KVCache  # noqa: E402
from worker.engine.runner import Runner  # noqa: E402
from worker.models.qwen import FlashQwenForCausalLM  # noqa: E402

BLOCK, NUM_BLOCKS, MAX_BLOCKS = 4, 96, 24
CPU = torch.device("cpu")
VOCAB = 256  # TINY["vocab_size"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    state = random_checkpoint(TINY, 11)
    return write_checkpoint(str(tmp_path_factory.mktemp("ckpt")), TINY, state), state


def load(path: str, backend_name: str) -> FlashQwenForCausalLM:
    backend = None
    if backend_name == "triton":
        from worker.kernels.triton_attention import Tiles
        from worker.layers.attention_triton import TritonAttention

        backend = TritonAttention(tiles=Tiles(prefill_m=16, prefill_n=16, decode_n=8), use_varlen_attn=False)
    return FlashQwenForCausalLM.from_pretrained(path, dtype=torch.float32, backend=backend, progress=False)


def as_batch(reqs: list[SimpleNamespace]) -> Any:
    """Stand-in requests as the Batch the runner reads (it reads only .requests)."""
    return SimpleNamespace(requests=reqs)


def requests(lengths: list[int], alphas: list[float], seed: int) -> list[SimpleNamespace]:
    """Requests with shuffled, non-contiguous blocks (never the scratch block, the last)."""
    g = random.Random(seed)
    free = list(range(NUM_BLOCKS - 1))
    g.shuffle(free)
    out = []
    for n, alpha in zip(lengths, alphas):
        blocks = [free.pop() for _ in range(-(-n // BLOCK))]
        slots = [blocks[p // BLOCK] * BLOCK + p % BLOCK for p in range(n)]
        ids = [g.randrange(VOCAB) for _ in range(n)]
        out.append(SimpleNamespace(ids=ids, slots=slots, blocks=blocks, ntk_alpha=alpha, n_cached=0))
    return out


def two_runs(model, reqs, cached: list[int], rows=(1, 2, 4, 8), tokens=(16, 32, 64)):
    """The step computing ids[cached:] after a shared eager prefix fill, run eagerly and through GraphedSpans:
    ((logits, cache), (logits, cache), the graphed runner's span_graphs)."""
    c = model.config
    kv = KVCache(c.num_hidden_layers, NUM_BLOCKS, BLOCK, c.num_attention_heads, c.head_dim, torch.float32, CPU)
    fill = [(r, n) for r, n in zip(reqs, cached) if n]
    if fill:  # the cached prefixes
        Runner(model, kv, CPU).forward(
            as_batch([r for r, _ in fill]), True, spans=[RowSpan(0, n, False) for _, n in fill]
        )
    spans = [RowSpan(n, len(r.ids), False) for r, n in zip(reqs, cached)]
    graphed = GraphedSpans(model, kv, MAX_BLOCKS, NUM_BLOCKS - 1, rows, tokens, graphs=False)
    results = []
    for runner in (Runner(model, kv, CPU), Runner(model, kv, CPU, span_graphs=graphed)):
        kv_before = [(k.clone(), v.clone()) for k, v in kv.layers]
        for r, n in zip(reqs, cached):
            r.n_cached = n
        logits = runner.forward(as_batch(reqs), True, spans=spans).last
        assert [r.n_cached for r in reqs] == [len(r.ids) for r in reqs]
        results.append((logits, [(k.clone(), v.clone()) for k, v in kv.layers]))
        for (k, v), (k0, v0) in zip(kv.layers, kv_before):
            k.copy_(k0)
            v.copy_(v0)
    return results[0], results[1], graphed


CASES = {  # lengths, cached prefix lengths, NTK alphas
    "one_row_prefix_not_a_block_multiple": ([24], [13], [1.0]),
    "exact_fit_16_tokens": ([30, 9], [15, 8], [1.0, 1.0]),
    "mixed_fresh_one_token_and_long_rows": ([6, 8, 40, 75], [0, 7, 30, 66], [1.0, 1.0, 1.0, 1.7]),
    "verify_like_5_rows_x_5_tokens": ([21, 9, 50, 12, 33], [16, 4, 45, 7, 28], [1.0] * 5),
}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", list(CASES))
def test_padded_static_step_equals_the_eager_span_step(checkpoint, backend, case):
    lengths, cached, alphas = CASES[case]
    model = load(checkpoint[0], backend)
    reqs = requests(lengths, alphas, seed=len(case))
    (eager, eager_kv), (ours, our_kv), graphed = two_runs(model, reqs, cached)
    new = sum(n - c for n, c in zip(lengths, cached))
    assert graphed.bucket(as_batch(reqs), [RowSpan(c, n, False) for n, c in zip(lengths, cached)], None)
    torch.testing.assert_close(ours, eager, rtol=1e-5, atol=1e-5)
    scratch = NUM_BLOCKS - 1
    for (k, v), (k0, v0) in zip(our_kv, eager_kv):  # the same K/V everywhere but the scratch block
        torch.testing.assert_close(k[:scratch], k0[:scratch], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(v[:scratch], v0[:scratch], rtol=1e-5, atol=1e-6)
    if new in (16, 32, 64):  # no padding tokens: the same GEMM shapes, so the very same numbers
        assert torch.equal(ours, eager)


def test_last_logits_match_the_float64_reference(checkpoint):
    """Short prompts (alpha 1, no logn): each row's last logits are the float64 model's."""
    path, state = checkpoint
    model = load(path, "torch")
    lengths, cached = [9, 20, 5], [4, 19, 3]
    reqs = requests(lengths, [1.0] * 3, seed=3)
    _, (ours, _), _ = two_runs(model, reqs, cached)
    for i, r in enumerate(reqs):
        ref = ref_forward(state, TINY, r.ids)[-1].float()
        torch.testing.assert_close(ours[i], ref[: ours.shape[1]], rtol=1e-4, atol=1e-4)


def test_steps_the_graphs_cannot_serve_go_eager(checkpoint):
    model = load(checkpoint[0], "torch")
    c = model.config
    kv = KVCache(c.num_hidden_layers, NUM_BLOCKS, BLOCK, c.num_attention_heads, c.head_dim, torch.float32, CPU)
    graphed = GraphedSpans(model, kv, MAX_BLOCKS, NUM_BLOCKS - 1, (1, 2, 4), (16, 32), graphs=False)
    reqs = requests([20, 10, 6], [1.0] * 3, seed=1)
    batch = as_batch(reqs)
    cached = [RowSpan(s, len(r.ids), False) for r, s in zip(reqs, (8, 2, 5))]  # 12 + 8 + 1 = 21 tokens
    assert graphed.bucket(batch, cached, None) == (4, 32)
    assert graphed.bucket(batch, cached, [0, 3, 0]) is None  # an adapter
    assert graphed.bucket(batch, [RowSpan(0, len(r.ids), False) for r in reqs], None) is None  # all fresh
    too_long = [RowSpan(1, len(r.ids), False) for r in reqs]  # 19 + 9 + 5 = 33 tokens > 32
    assert graphed.bucket(batch, too_long, None) is None
    logprobs = [RowSpan(8, 20, True), *cached[1:]]
    assert graphed.bucket(batch, logprobs, None) is None  # prompt logprobs
    assert graphed.try_run(batch, logprobs, None) is None and [r.n_cached for r in reqs] == [0, 0, 0]


def test_buckets_fit_a_32_row_verify_step():
    assert (32, 192) in span_buckets((1, 2, 4, 8, 16, 32), (16, 32, 64, 128, 192, 256))
    assert all(t >= r for r, t in span_buckets((1, 8, 64), (16, 32)))
