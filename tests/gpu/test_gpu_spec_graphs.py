"""Speculative verify steps replayed from CUDA graphs (engine/graphed_verify.py) on the GPU, Triton backend.
The claims: a replay equals the eager span path bitwise where the step fills its bucket exactly (the last and
per-position logits, the Medusa heads' logits, the K/V outside the scratch block), within bf16 noise when
padded; an engine with CUDA graphs captures the verify buckets and runs every verify step from them, its
greedy tokens (prompt lookup, the demo's Medusa heads) equal to the graphed run without speculation."""

from __future__ import annotations

import os
import random
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from helpers import GPU_TRITON_MARKS, TINY, write_checkpoint
from medusa_helpers import medusa_tensors, write_medusa
from random_weights import random_checkpoint
from spec_helpers import engine, greedy_request, run

pytestmark = GPU_TRITON_MARKS

BLOCK, NUM_BLOCKS = 16, 64
VOCAB, HIDDEN = 256, 64  # TINY's


def _requests(lengths: list[int], drafts: list[int], seed: int) -> tuple[list[SimpleNamespace], list[Any]]:
    """Decoding requests on shuffled blocks and their verify spans (the last token and d drafts)."""
    from worker.engine.chunks import RowSpan

    g = random.Random(seed)
    free = g.sample(range(NUM_BLOCKS - 1), NUM_BLOCKS - 1)
    reqs, spans = [], []
    for n, d in zip(lengths, drafts):
        blocks = [free.pop() for _ in range(-(-(n + d) // BLOCK))]
        slots = [blocks[p // BLOCK] * BLOCK + p % BLOCK for p in range(n + d)]
        ids = g.choices(range(VOCAB), k=n)
        reqs.append(SimpleNamespace(ids=ids, slots=slots, blocks=blocks, ntk_alpha=1.0, n_cached=0))
        spans.append(RowSpan(n - 1, n, d > 0, tuple(g.choices(range(VOCAB), k=d))))
    return reqs, spans


@pytest.mark.parametrize("heads", [None, "v2"])
def test_verify_replay_equals_the_eager_span_path(tmp_path, heads):
    from worker.adapters.medusa import load_speculator
    from worker.distributed import ParallelContext
    from worker.engine.chunks import RowSpan
    from worker.engine.graphed_verify import GraphedVerify
    from worker.engine.kv_cache import KVCache
    from worker.engine.runner import Runner
    from worker.layers.attention import make_backend
    from worker.models.qwen import FlashQwenForCausalLM

    dev = torch.device("cuda")
    path = write_checkpoint(str(tmp_path / "ckpt"), TINY, random_checkpoint(TINY, seed=7))
    model = FlashQwenForCausalLM.from_pretrained(
        path, ParallelContext(device=dev), torch.bfloat16, make_backend("triton", dev), progress=False
    )
    if heads:
        write_medusa(str(tmp_path / heads), medusa_tensors(HIDDEN, VOCAB, 3, 1, False, seed=3), 3, 1)
        model.attach_medusa(load_speculator(str(tmp_path), heads, model.config))
    c = model.config
    kv = KVCache(c.num_hidden_layers, NUM_BLOCKS, BLOCK, c.num_attention_heads, c.head_dim, torch.bfloat16, dev)
    model.set_kv_scales(None, None)
    graphs = GraphedVerify(model, kv, 16, NUM_BLOCKS - 1, 4, rows=(1, 2, 4))
    assert len(graphs.graphs) == len(graphs.buckets) == 4 + 2 * 3
    eager, replayed = Runner(model, kv, dev), Runner(model, kv, dev, verify_graphs=graphs)
    speculative = heads is not None
    # (lengths, drafts, exact): 1 x 5 tokens in (1, 5); 2 x 5 in (2, 10); 4 + 1 + 4 = 9 tokens padded to (4, 12)
    for lengths, drafts, exact in (([40], [4], True), ([23, 70], [4, 4], True), ([9, 30, 51], [3, 0, 3], False)):
        reqs, spans = _requests(lengths, drafts, seed=len(lengths))
        batch = SimpleNamespace(requests=reqs)
        Runner(model, kv, dev).forward(batch, True, spans=[RowSpan(0, sp.start, False) for sp in spans])
        outs = []
        for runner in (eager, replayed):
            for r, sp in zip(reqs, spans):
                r.n_cached = sp.start
            got = runner.forward(batch, True, spans=spans, speculative=speculative)
            outs.append((got, kv.layers[0][0][: NUM_BLOCKS - 1].clone()))
        (a, cache_a), (b, cache_b) = outs
        assert graphs.bucket(batch, spans, None) is not None and a.prompt.keys() == b.prompt.keys()
        pairs = [(a.last, b.last), (cache_a, cache_b)] + [(a.prompt[i], b.prompt[i]) for i in a.prompt]
        if speculative:
            assert a.speculative is not None and b.speculative is not None
            pairs += [(x, y) for x, y in zip(a.speculative, b.speculative) if x is not None and y is not None]
        for x, y in pairs:
            assert x.shape == y.shape
            if exact:
                assert torch.equal(x, y)
            else:  # GEMMs of another row count may round differently
                torch.testing.assert_close(y.float(), x.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("drafting", ["lookup", "medusa"])
def test_engine_runs_verify_steps_from_graphs_with_the_greedy_output(demo_dir, drafting):
    from worker.adapters.medusa import load_speculator
    from worker.distributed import ParallelContext
    from worker.layers.attention import make_backend
    from worker.models.qwen import FlashQwenForCausalLM
    from worker.tokenizer import QwenTokenizer

    dev = torch.device("cuda")
    pctx = ParallelContext(device=dev)
    path = os.path.join(demo_dir, "model")
    tok = QwenTokenizer.from_dir(path)
    prompts = [
        "The capital of France is Paris, a city of light and old stone bridges. The capital of France is",
        "The quick brown fox jumps over the lazy dog by the river. The quick brown fox",
        "Water boils at",
    ]

    def load() -> FlashQwenForCausalLM:
        return FlashQwenForCausalLM.from_pretrained(
            path, pctx, torch.float32, make_backend("triton", dev), progress=False
        )

    def requests() -> list:
        return [greedy_request(i, tok.encode(p), 32) for i, p in enumerate(prompts)]

    off_engine = engine(load(), tok, 0, pctx, cuda_graphs=True)
    assert off_engine.runner is not None and off_engine.runner.verify_graphs is None  # no speculation: none
    off = run(off_engine, requests())
    model = load()
    if drafting == "medusa":
        model.attach_medusa(load_speculator(os.path.join(demo_dir, "adapters"), "medusa", model.config))
    e = engine(model, tok, 4 if drafting == "lookup" else 0, pctx, cuda_graphs=True)
    assert e.runner is not None and e.runner.verify_graphs is not None
    graphs = e.runner.verify_graphs
    assert graphs.graphs and (graphs.heads is not None) == (drafting == "medusa")
    on = run(e, requests())
    for rid in range(len(prompts)):
        assert on.tokens(rid) == off.tokens(rid), (drafting, rid)
    assert graphs.verify_steps["graphed"] >= 3 and graphs.verify_steps["eager"] == 0
    assert max(len(s) for rid in range(len(prompts)) for s in on.steps[rid]) > 1  # drafts accepted
