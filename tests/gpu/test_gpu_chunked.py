"""Chunked prefill on the GPU: the Triton backend compiled, CUDA graphs on. A request decodes while a prompt
past seq_length (NTK, logn) is prefilled in chunks (the first inside a Prefill carrying the running batch):
mixed steps run eagerly through the paged prefill kernel, pure decode steps replay the graphs, and the
tokens and prefill logprobs equal the float64 reference (fp32 weights, random, demo-model shape)."""

from __future__ import annotations

import json
import math
import os
import random
import shutil

import torch

from helpers import GPU_TRITON_MARKS, chunk_request, write_checkpoint
from random_weights import random_checkpoint
from reference import load_checkpoint, ref_forward

pytestmark = GPU_TRITON_MARKS

N_REAL = 518  # the demo tokenizer's vocabulary
LONG = random.Random(0).choices(range(500), k=150)  # seq_length 64: NTK alpha 7
SHORT = [5, 6, 7, 8]


def _greedy(state: dict, cfg: dict, prompt: list[int], n: int) -> list[int]:
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(ref_forward(state, cfg, seq, prompt_len=len(prompt))[-1, :N_REAL].argmax()))
    return seq[len(prompt) :]


def test_chunks_with_graphs_equal_the_reference(demo_dir, tmp_path):
    from worker.distributed import ParallelContext
    from worker.engine.engine import Engine, EngineConfig
    from worker.layers.attention import make_backend
    from worker.models.qwen import FlashQwenForCausalLM
    from worker.pb import generate_pb2 as pb
    from worker.tokenizer import QwenTokenizer

    with open(os.path.join(demo_dir, "model", "config.json")) as f:
        cfg = {**json.load(f), "seq_length": 64}
    path = write_checkpoint(str(tmp_path / "ckpt"), cfg, random_checkpoint(cfg, seed=5))
    shutil.copy(os.path.join(demo_dir, "model", "qwen.tiktoken"), path)
    dev = torch.device("cuda")
    pctx = ParallelContext(device=dev)
    model = FlashQwenForCausalLM.from_pretrained(path, pctx, torch.float32, make_backend("triton", dev), progress=False)
    cfg_engine = EngineConfig(max_total_tokens=8192, look_ahead=False, shard_block_fraction=0.5)  # replays: steps
    engine = Engine(model, QwenTokenizer.from_dir(path), pctx, cfg_engine)
    warm = pb.Batch(id=0, requests=[chunk_request(0, [1, 2], 2)])
    engine.warmup(pb.WarmupRequest(batch=warm, max_input_length=256, max_prefill_tokens=53))
    runner = engine.runner
    assert runner is not None and runner.graphs is not None
    replays = []
    graphed = runner.graphs.run
    runner.graphs.run = lambda b, s: replays.append(len(b.requests)) or graphed(b, s)
    tokens: dict[int, list[int]] = {}
    prompt_lps: list[float] = []
    replays_while_prefilling = []

    def add(gens, batch) -> None:
        for g in gens:
            tokens.setdefault(g.request_id, []).extend(g.next_tokens.ids)
            if g.prefill_tokens is not None:
                prompt_lps.extend(g.prefill_tokens.logprobs)

    gens, batch = engine.prefill(pb.Batch(id=1, requests=[chunk_request(1, SHORT, 24)]), None)
    add(gens, batch)
    long = chunk_request(3, LONG, 4, 37, prefill_logprobs=True)
    gens, batch = engine.prefill(pb.Batch(id=2, requests=[long]), batch.info())
    add(gens, batch)
    while batch is not None:
        before = len(replays)
        prefilling = any(r.prefilling for r in batch.requests)
        gens, batch = engine.decode([batch.info()])
        if prefilling:
            replays_while_prefilling.append(len(replays) - before)
        add(gens, batch)
    state, ref_cfg = load_checkpoint(path)
    assert tokens[1] == _greedy(state, ref_cfg, SHORT, 24)
    assert tokens[3] == _greedy(state, ref_cfg, LONG, 4)
    lp = torch.log_softmax(ref_forward(state, ref_cfg, LONG)[:, :N_REAL], -1)
    want = lp[torch.arange(len(LONG) - 1), torch.tensor(LONG[1:])]
    assert len(prompt_lps) == len(LONG) and math.isnan(prompt_lps[0])
    assert (torch.tensor(prompt_lps[1:], dtype=torch.float64) - want).abs().max().item() < 1e-3
    assert replays_while_prefilling == [0, 0, 0] and sum(replays) > 0  # mixed steps eager, pure decode graphed


def test_span_graph_replay_equals_the_eager_span_path(tmp_path):
    """Span steps replayed from GraphedSpans' CUDA graphs against the eager span path, bf16 weights: bitwise
    where the bucket fits exactly (the same kernels on the same shapes), within bf16 noise with padding; only
    the scratch block differs in the cache afterwards."""
    from types import SimpleNamespace

    from helpers import TINY
    from worker.distributed import ParallelContext
    from worker.engine.chunks import RowSpan
    from worker.engine.graphed_spans import GraphedSpans
    from worker.engine.kv_cache import KVCache
    from worker.engine.runner import Runner
    from worker.layers.attention import make_backend
    from worker.models.qwen import FlashQwenForCausalLM

    dev, block, num_blocks = torch.device("cuda"), 16, 64
    path = write_checkpoint(str(tmp_path / "ckpt"), TINY, random_checkpoint(TINY, seed=7))
    pctx = ParallelContext(device=dev)
    model = FlashQwenForCausalLM.from_pretrained(
        path, pctx, torch.bfloat16, make_backend("triton", dev), progress=False
    )
    c = model.config
    kv = KVCache(c.num_hidden_layers, num_blocks, block, c.num_attention_heads, c.head_dim, torch.bfloat16, dev)
    model.set_kv_scales(None, None)
    graphs = GraphedSpans(model, kv, 16, num_blocks - 1, rows=(1, 4), tokens=(16, 32))
    free = random.Random(1).sample(range(num_blocks - 1), num_blocks - 1)
    rng = random.Random(2)

    def req(n: int) -> SimpleNamespace:
        blocks = [free.pop() for _ in range(-(-n // block))]
        slots = [blocks[p // block] * block + p % block for p in range(n)]
        return SimpleNamespace(ids=rng.choices(range(256), k=n), slots=slots, blocks=blocks, ntk_alpha=1.0, n_cached=0)

    eager, replayed = Runner(model, kv, dev), Runner(model, kv, dev, span_graphs=graphs)
    for reqs, new in (([req(37 + 16)], 16), ([req(n) for n in (9, 30, 70, 6)], 5)):
        Runner(model, kv, dev).forward(
            SimpleNamespace(requests=reqs), True, spans=[RowSpan(0, len(r.ids) - new, False) for r in reqs]
        )
        outs = []
        for runner in (eager, replayed):
            for r in reqs:
                r.n_cached = len(r.ids) - new
            spans = [RowSpan(len(r.ids) - new, len(r.ids), False) for r in reqs]
            outs.append(
                (
                    runner.forward(SimpleNamespace(requests=reqs), True, spans=spans).last.float(),
                    kv.layers[0][0].clone(),
                )
            )
        (a, cache_a), (b, cache_b) = outs
        if len(reqs) == 1:  # bucket (1, 16) exactly
            assert torch.equal(a, b) and torch.equal(cache_a[: num_blocks - 1], cache_b[: num_blocks - 1])
        else:  # 20 tokens padded to 32: GEMMs of another row count may round differently
            torch.testing.assert_close(b, a, rtol=2e-2, atol=2e-2)
            torch.testing.assert_close(cache_b[: num_blocks - 1], cache_a[: num_blocks - 1], rtol=2e-2, atol=2e-2)
