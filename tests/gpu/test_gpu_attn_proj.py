"""DecodeKernels.attn_proj on the GPU: attn.c_proj (GPTQ Int4, tiled words) and the norm fold after it inside the CUDA
decode attention (paged_decode.cu's kProj).

- The kernel: from the same raw q, k, v and cache, the caches it leaves equal RoPE + store's bit for bit (the kProj
  form stores them as kRope does); its sums s are within two bf16 roundings of the fp32 reference
  rn(rn(o · W + bias) + residual) on the attention's own output o (each head's product summed in another order than
  gptq_tc's, so not its bits); y = rn(s * weight) and the squares are exactly those of its s; sym and asym zeros, with
  and without a bias, 8 and 32 heads, 1,024 to 4,096 columns, contexts of 1 to 2,048 tokens, logn on; the same bits
  again, replayed from a CUDA graph, with the tiles' counters back at zero.
- A GPTQ model at one row: the decode takes it (one decode attention launch with attn.c_proj inside a layer), its
  logits are within bf16's bound of the float64 reference on the dequantized weights and close to the model's without
  it, and a CUDA graph's replay equals eager bit for bit.
"""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from helpers import GPU_TINY, replayed
from random_weights import random_checkpoint
from reference import ref_forward
from worker.distributed import ParallelContext

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9, reason="needs CUDA on sm_90+"
    ),
]
CUDA = torch.device("cuda", 0)
D, BLOCK = 128, 16


def _bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """bf16's spacing at |x| (fp32 tensor): 2^(exponent - 7)."""
    e = torch.floor(torch.log2(x.abs().clamp_min(2.0**-126)))
    return torch.exp2(e - 7)


class Step:
    """One decode step of one sequence with `ctx` tokens (the newest one new) over shuffled cache blocks."""

    def __init__(self, heads: int, ctx: int, seed: int, logn: bool):
        g = torch.Generator(device=CUDA).manual_seed(seed)
        need = -(-ctx // BLOCK)
        blocks = list(range(need + 3))
        random.Random(seed).shuffle(blocks)
        self.table = torch.tensor([blocks[:need]], dtype=torch.int32, device=CUDA)
        shape = (need + 3, BLOCK, heads, D)
        self.k_cache = (torch.randn(shape, generator=g, device=CUDA)).to(torch.bfloat16)
        self.v_cache = (torch.randn(shape, generator=g, device=CUDA)).to(torch.bfloat16)
        p = ctx - 1
        self.slots = torch.tensor([blocks[p // BLOCK] * BLOCK + p % BLOCK], dtype=torch.long, device=CUDA)
        self.lens = torch.tensor([ctx], dtype=torch.int32, device=CUDA)
        qkv = (torch.randn(1, 3, heads, D, generator=g, device=CUDA) * 2).to(torch.bfloat16)
        self.q, self.k, self.v = (t.contiguous() for t in qkv.unbind(1))
        cos, sin = (torch.rand(2, 1, D // 2, generator=g, device=CUDA) * 2 - 1).unbind(0)
        self.cos, self.sin = cos.contiguous(), sin.contiguous()
        self.logn = (1 + torch.rand(1, generator=g, device=CUDA)) if logn else None
        self.scale = D**-0.5

    def run(self, proj=None, caches=None):
        from worker.kernels.paged_decode_cuda import Rope, paged_decode_cuda

        kc, vc = caches if caches is not None else (self.k_cache, self.v_cache)
        rope = Rope(self.k, self.v, self.cos, self.sin, self.logn, self.slots)
        return paged_decode_cuda(self.q, kc, vc, self.table, self.lens, self.scale, pdl=True, rope=rope, proj=proj)


def _c_proj(K: int, N: int, asym: bool, bias: bool, g: torch.Generator):
    """A random Int4 attn.c_proj (groups of 128) in the GEMV's layout with tiled words, its bias, and the fp32
    reference's operands."""
    from worker.kernels.gemv import gemv_weights
    from worker.quant.gptq_format import tile_words

    qweight = torch.randint(-(2**31), 2**31 - 1, (K // 8, N), device=CUDA, dtype=torch.int32, generator=g)
    if asym:
        qzeros = torch.randint(-(2**31), 2**31 - 1, (K // 128, N // 8), device=CUDA, dtype=torch.int32, generator=g)
    else:
        qzeros = torch.full((K // 128, N // 8), 0x77777777, device=CUDA, dtype=torch.int32)
    scales = (torch.rand(K // 128, N, device=CUDA, generator=g) * 0.02 + 0.001).to(torch.bfloat16)
    w = gemv_weights(qweight, qzeros, scales, 4, 1, 128, 0)
    w = dataclasses.replace(w, qweight=tile_words(w.qweight), tiled=True)
    b = (torch.randn(N, device=CUDA, generator=g) * 0.5).to(torch.bfloat16) if bias else None
    g_idx = (torch.arange(K, device=CUDA) // 128).to(torch.int32)
    return w, b, (qweight, qzeros, scales.float(), g_idx)


@pytest.mark.parametrize("heads,N", [(32, 4096), (8, 1024), (32, 2048)])
@pytest.mark.parametrize("ctx", [1, 33, 513, 2048])
@pytest.mark.parametrize("asym,bias", [(False, True), (True, False)])
def test_the_kernel_computes_c_proj_and_the_norm_fold(heads, N, ctx, asym, bias):
    from worker.kernels.gptq_reference import gptq_matmul_reference
    from worker.kernels.paged_decode_cuda import Proj

    seed = heads + N + ctx + asym
    g = torch.Generator(device=CUDA).manual_seed(seed)
    step = Step(heads, ctx, seed, logn=ctx > 32)
    w, b, (qweight, qzeros, scales, g_idx) = _c_proj(heads * D, N, asym, bias, g)
    residual = torch.randn(1, N, device=CUDA, generator=g).to(torch.bfloat16)
    weight = (torch.rand(N, device=CUDA, generator=g) + 0.5).to(torch.bfloat16)
    proj = Proj(w, b, residual, weight)

    caches = (step.k_cache.clone(), step.v_cache.clone())
    o = step.run(caches=caches)  # the attention alone (RoPE + store inside): [1, heads, 128]
    y, s, sq = step.run(proj=proj)
    assert torch.equal(step.k_cache.view(torch.int16), caches[0].view(torch.int16))
    assert torch.equal(step.v_cache.view(torch.int16), caches[1].view(torch.int16))

    prod = gptq_matmul_reference(o.view(1, -1).float(), qweight, qzeros, scales, g_idx, 4, 1).double()
    out = prod + (b.double() if b is not None else 0.0)
    want = out + residual.double()
    top = torch.maximum(want.abs(), s.double().abs()).float()  # s's binade or the exact sum's, the wider
    bound = _bf16_ulp(out.float()).double() / 2 + _bf16_ulp(top).double() / 2 + 1e-6 * out.abs().max()
    err = (s.double() - want).abs()
    assert (err <= bound).all(), (err.max().item(), (err / bound).max().item())
    assert torch.equal(y, (s.float() * weight.float()).to(torch.bfloat16))
    want_sq = (s.float() ** 2).view(1, N // 32, 32).sum(-1)
    torch.testing.assert_close(sq, want_sq, rtol=1e-5, atol=0)
    assert not w.counters.any()

    again = step.run(proj=proj)  # the store again writes the same rows
    assert all(torch.equal(a, e) for a, e in zip(again, (y, s, sq)))
    graphed = replayed(lambda: step.run(proj=proj))
    assert all(torch.equal(a, e) for a, e in zip(graphed, (y, s, sq)))
    assert not w.counters.any()


WIDE = dict(GPU_TINY, hidden_size=1024, num_attention_heads=8, intermediate_size=2048)


def _model(tmp_path, names: list[str]):
    from gptq_helpers import dequantized_state, gptq_checkpoint
    from worker.layers.attention_triton import TritonAttention
    from worker.layers.decode_kernels import parse_decode_kernels, where_applies
    from worker.models.qwen import FlashQwenForCausalLM

    state = random_checkpoint(WIDE, seed=17)
    path, q = gptq_checkpoint(str(tmp_path / "q"), WIDE, state, 4, 128, False, False)
    kernels = where_applies(parse_decode_kernels(",".join(names)), CUDA)
    model = FlashQwenForCausalLM.from_pretrained(
        path, ParallelContext(0, 1, CUDA), torch.bfloat16, TritonAttention(), progress=False, decode_kernels=kernels
    )
    return model, dequantized_state(q, 4)


def test_a_gptq_model_decodes_with_c_proj_inside_the_attention(tmp_path, monkeypatch):
    from paged import Paged
    from worker.kernels import paged_decode_cuda as pdc
    from worker.layers.decode_kernels import SERVED
    from worker.layers.rotary import ntk_alpha

    calls: list[bool] = []
    real = pdc.paged_decode_cuda

    def spy(*a, **k):
        calls.append(k.get("proj") is not None or (len(a) > 8 and a[8] is not None))
        return real(*a, **k)

    monkeypatch.setattr(pdc, "paged_decode_cuda", spy)
    results = {}
    for on in (False, True):
        model, deq = _model(tmp_path / str(on), [*SERVED, "attn_proj"] if on else list(SERVED))
        g = torch.Generator().manual_seed(3)
        prompt = torch.randint(0, 512, (40,), generator=g).tolist()
        alphas = [ntk_alpha(len(prompt), 32, True)]
        p = Paged(model, num_blocks=64)
        out = p.step([0], [prompt], [0], alphas, True)
        seq = list(prompt)
        logits = []
        for _ in range(3):
            seq.append(int(out[0][-1].argmax()))
            calls.clear()
            out = p.step([0], [seq], [len(seq) - 1], alphas, False)
            assert calls == [on] * WIDE["num_hidden_layers"], (on, calls)
            logits.append(out[0][-1].double().cpu())
        ref = ref_forward(deq, WIDE, seq, prompt_len=len(prompt))[-1]
        worst = (logits[-1] - ref).abs().max().item()
        print(f"attn_proj {on}: max abs logit diff vs float64 {worst:.2e}")
        assert worst <= 0.15
        results[on] = logits
    assert all((a - b).abs().max().item() <= 0.15 for a, b in zip(results[False], results[True]))


def test_the_decode_with_c_proj_inside_replays_from_a_graph_bit_for_bit(tmp_path):
    from helpers import decode_requests
    from worker.engine.cuda_graphs import GraphedDecode
    from worker.engine.kv_cache import KVCache
    from worker.engine.runner import Runner
    from worker.layers.decode_kernels import SERVED

    model, _ = _model(tmp_path, [*SERVED, "attn_proj"])
    c = model.config
    kv = KVCache(c.num_hidden_layers, 200, 16, c.num_attention_heads, c.head_dim, torch.bfloat16, CUDA)
    graphs = GraphedDecode(model, kv, max_batch=2, max_blocks_per_seq=16, scratch_block=199, adapter_pools=False)
    step = decode_requests([40])
    runner = Runner(model, kv, CUDA)
    runner.forward(step, True)
    for r in step.requests:
        r.ids.append(5)
    eager = runner.forward(step, False).last
    for r in step.requests:
        r.n_cached -= 1  # the same decode step again, replayed from the graph
    assert torch.equal(eager, graphs.run(step, None))
