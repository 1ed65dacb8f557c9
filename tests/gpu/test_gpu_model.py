"""The model on the GPU (triton backend, CUDA graphs) against the float64 reference and eager decode."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from helpers import GPU_TINY, counted_calls, decode_requests, write_checkpoint
from paged import Paged
from random_weights import random_checkpoint
from reference import ref_forward
from worker.distributed import ParallelContext
from worker.layers.rotary import ntk_alpha
from worker.models.qwen import FlashQwenForCausalLM

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

CFG = GPU_TINY


def gpu_model(tmp_path, dtype):
    from worker.layers.attention_triton import TritonAttention

    state = random_checkpoint(CFG, seed=3)
    path = write_checkpoint(str(tmp_path / "ckpt"), CFG, state)
    pctx = ParallelContext(0, 1, torch.device("cuda", 0))
    return state, FlashQwenForCausalLM.from_pretrained(path, pctx, dtype, TritonAttention(), progress=False)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-3), (torch.bfloat16, 0.15)])
def test_prefill_decode_vs_reference(tmp_path, dtype, tol):
    state, model = gpu_model(tmp_path, dtype)
    g = torch.Generator().manual_seed(0)
    lengths = [1, 17, 70, 129]  # NTK alpha 1, 3, 7 with seq_length 32; logn active past 32
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in lengths]
    alphas = [ntk_alpha(n, 32, True) for n in lengths]
    p = Paged(model, num_blocks=256)
    out = p.step([0, 1, 2, 3], prompts, [0] * 4, alphas, True)
    seqs = [list(x) for x in prompts]
    worst = max((o.double().cpu() - ref_forward(state, CFG, s)).abs().max().item() for s, o in zip(prompts, out))
    for _ in range(8):
        for s, o in zip(seqs, out):
            s.append(int(o[-1].argmax()))
        out = p.step([0, 1, 2, 3], seqs, [len(s) - 1 for s in seqs], alphas, False)
    for s, x, o in zip(seqs, prompts, out):
        ref = ref_forward(state, CFG, s, prompt_len=len(x))[-1]
        worst = max(worst, (o[-1].double().cpu() - ref).abs().max().item())
    print(f"{dtype}: max abs logit diff vs float64 reference {worst:.2e} (bound {tol})")
    assert worst <= tol


def test_cuda_graph_decode_equals_eager(tmp_path):
    from worker.engine.cuda_graphs import GraphedDecode
    from worker.engine.kv_cache import KVCache

    _, model = gpu_model(tmp_path, torch.bfloat16)
    c = model.config
    kv = KVCache(c.num_hidden_layers, 200, 16, c.num_attention_heads, c.head_dim, torch.bfloat16, torch.device("cuda"))
    graphs = GraphedDecode(model, kv, max_batch=16, max_blocks_per_seq=16, scratch_block=199, adapter_pools=False)
    from worker.engine.runner import Runner

    batch = decode_requests([3, 40, 100, 7, 200])
    reqs = batch.requests
    runner = Runner(model, kv, torch.device("cuda"))
    runner.forward(batch, True)  # prefill (eager) fills the cache
    for r in reqs:
        r.ids.append(5)
    eager = runner.forward(batch, False).last
    for r in reqs:
        r.n_cached -= 1  # run the same decode step again, now replayed from the graph
    graphed = graphs.run(batch, None)
    diff = (eager.float() - graphed.float()).abs().max().item()
    print(f"graph vs eager decode: max abs diff {diff:.2e}")
    assert diff <= 1e-2


def test_long_context_decode_replays_a_graph_of_its_own(tmp_path, monkeypatch):
    """Steps of 1-2 rows take the CUDA decode attention below paged_decode_cuda.LONG_CONTEXT (here 256 tokens) and
    the Triton split kernels from there, by the step's longest context; GraphedDecode captures those buckets twice
    and replays the one on the step's side: the long graph at a 301-token context (the eager step launched no CUDA
    attention), the short one at 101 tokens (one a layer), each equal bit for bit to the eager decode."""
    from worker.engine.cuda_graphs import GraphedDecode
    from worker.engine.kv_cache import KVCache
    from worker.engine.runner import Runner
    from worker.kernels import paged_decode_cuda as pdc
    from worker.layers.decode_kernels import SERVED, apply_decode_kernels, parse_decode_kernels

    monkeypatch.setattr(pdc, "LONG_CONTEXT", {1: 256, 2: 256})
    calls = counted_calls(monkeypatch, pdc, "paged_decode_cuda")
    _, model = gpu_model(tmp_path, torch.bfloat16)
    apply_decode_kernels(model.transformer, parse_decode_kernels(",".join(SERVED)))
    c = model.config
    kv = KVCache(c.num_hidden_layers, 200, 16, c.num_attention_heads, c.head_dim, torch.bfloat16, torch.device("cuda"))
    graphs = GraphedDecode(model, kv, max_batch=4, max_blocks_per_seq=32, scratch_block=199, adapter_pools=False)
    keys = [(1, False, False), (1, False, True), (2, False, False), (2, False, True), (4, False, False)]
    assert sorted(graphs.graphs) == keys
    runner = Runner(model, kv, torch.device("cuda"))
    reqs = decode_requests([300, 100], seed=1).requests  # contexts 301 and 101 once a token is appended
    for req, is_long in zip(reqs, (True, False)):
        batch = SimpleNamespace(requests=[req])
        runner.forward(batch, True)  # prefill (eager) fills the cache
        req.ids.append(5)
        calls.clear()
        eager = runner.forward(batch, False).last
        assert calls == ([] if is_long else [1] * c.num_hidden_layers)
        req.n_cached -= 1  # the same decode step again, replayed from a graph
        graphed = graphs.run(batch, None)
        assert graphed.data_ptr() == graphs.graphs[(1, False, is_long)][1].data_ptr()
        diff = (eager.float() - graphed.float()).abs().max().item()
        print(f"context {len(req.ids)}: graph vs eager max abs diff {diff:.2e}")
        assert torch.equal(eager, graphed)
