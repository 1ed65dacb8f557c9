"""DecodeKernels.norm_fold on the GPU: the residual add + RMSNorm folded into the gptq_tc launches beside it
(gptq_tc.cu's kNorm, worker/layers/norm.Deferred).

- The producer (kNorm 1): its sum equals the unfolded kernel's output plus the residual, rounded as fused.rms_norm's
  add, bit for bit; its output is rn(s * weight) bit for bit; its squares are each 32-column tile's sum of s² (partial
  tiles, split K, 1-2 rows), under graph replay too.
- The consumer (kNorm 2): the product of the rows scaled by rsqrt(mean(s²) + eps), within the fp32 reference's
  rounding (c_attn's shape with its bias; the gate_up pair bit for bit against the scaled plain kernel's halves then
  fused.silu_mul).
- A GPTQ model: with norm_fold the decode runs 2 RMSNorm launches a step (the first ln_1 and ln_f) instead of 5, its
  logits are within bf16's bound of the float64 reference on the dequantized weights, and a CUDA graph's replay equals
  eager bit for bit."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from helpers import GPU_TINY, replayed
from random_weights import random_checkpoint
from reference import ref_forward
from worker.distributed import ParallelContext

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
CUDA = torch.device("cuda", 0)


def _int4(K: int, N: int, asym: bool, g: torch.Generator):
    from worker.kernels.gemv import gemv_weights

    qweight = torch.randint(-(2**31), 2**31 - 1, (K // 8, N), device=CUDA, dtype=torch.int32, generator=g)
    G = -(-K // 128)
    if asym:
        qzeros = torch.randint(-(2**31), 2**31 - 1, (G, N // 8), device=CUDA, dtype=torch.int32, generator=g)
    else:
        qzeros = torch.full((G, N // 8), 0x77777777, device=CUDA, dtype=torch.int32)
    scales = (torch.rand(G, N, device=CUDA, generator=g) * 0.02 + 0.001).to(torch.bfloat16)
    g_idx = (torch.arange(K, device=CUDA) // 128).to(torch.int32)
    return gemv_weights(qweight, qzeros, scales, 4, 1, 128, 0), (qweight, qzeros, scales, g_idx)


@pytest.mark.parametrize("M", [1, 2])
@pytest.mark.parametrize(
    "K,N,asym,bias,splits",
    [(4096, 4096, False, False, None), (11008, 4096, True, False, None), (640, 152, True, True, 3)],
)  # fmt: skip
def test_the_producer_adds_the_residual_and_writes_the_squares(K, N, asym, bias, splits, M):
    """kNorm 1 (attn.c_proj's and mlp.c_proj's shapes at their plans, which split K for 11008; a partial column tile
    with a bias over 3 K splits)."""
    from worker.kernels.gemv_cuda import TC_COLS, cuda_gemv

    g = torch.Generator(device=CUDA).manual_seed(K + N + M)
    w, _ = _int4(K, N, asym, g)
    b = (torch.randn(N, device=CUDA, generator=g) * 0.5).to(torch.bfloat16) if bias else None
    x = torch.randn(M, K, device=CUDA, generator=g).to(torch.bfloat16)
    residual = torch.randn(M, N, device=CUDA, generator=g).to(torch.bfloat16)
    weight = (torch.rand(N, device=CUDA, generator=g) + 0.5).to(torch.bfloat16)
    kw = dict(pdl=True, tc=True, stage=False, splits=splits)
    plain = cuda_gemv(x, w, b, **kw)
    tiles = -(-N // TC_COLS)

    def folded():
        sums = torch.empty(M, N, device=CUDA, dtype=torch.bfloat16)
        squares = torch.full((M, tiles), float("nan"), device=CUDA)
        y = cuda_gemv(x, w, b, norm_out=(residual, weight), sums=sums, squares=squares, **kw)
        return y, sums, squares

    y, sums, squares = folded()
    s = (plain.float() + residual.float()).to(torch.bfloat16)  # fused.rms_norm's residual add
    assert torch.equal(sums, s)
    assert torch.equal(y, (s.float() * weight.float()).to(torch.bfloat16))
    padded = torch.zeros(M, tiles * TC_COLS, device=CUDA)
    padded[:, :N] = s.float() ** 2
    want = padded.view(M, tiles, TC_COLS).sum(-1)
    torch.testing.assert_close(squares, want, rtol=1e-5, atol=0)
    again = replayed(folded)
    assert all(torch.equal(a, b) for a, b in zip(again, (y, sums, squares)))
    assert not w.counters.any()


@pytest.mark.parametrize("M", [1, 2])
@pytest.mark.parametrize(
    "K,N,asym,bias", [(4096, 12288, False, True), (640, 152, True, True), (1408, 512, True, False)]
)
def test_the_consumer_scales_each_row(K, N, asym, bias, M):
    """kNorm 2 on c_attn's shape (with its bias) and awkward ones: y = rsqrt(sum of the row's squares / K + eps) *
    (x . W) + bias within the fp32 reference's rounding; rows with different scales."""
    from worker.kernels.gemv_cuda import cuda_gemv
    from worker.kernels.gptq_reference import gptq_matmul_reference

    g = torch.Generator(device=CUDA).manual_seed(K + N + M)
    w, (qweight, qzeros, scales, g_idx) = _int4(K, N, asym, g)
    b = (torch.randn(N, device=CUDA, generator=g) * 0.5).to(torch.bfloat16) if bias else None
    x = torch.randn(M, K, device=CUDA, generator=g).to(torch.bfloat16)
    squares = torch.rand(M, 128, device=CUDA, generator=g) * torch.tensor([[1.0], [30.0]], device=CUDA)[:M] * K / 128
    eps = 1e-6
    rstd = torch.rsqrt(squares.double().sum(-1, keepdim=True) / K + eps)
    ref = gptq_matmul_reference(x.float(), qweight, qzeros, scales.float(), g_idx, 4, 1).double() * rstd
    ref = ref if b is None else ref + b.double()
    y = cuda_gemv(x, w, b, pdl=True, tc=True, stage=False, row_scale=(squares, eps))
    err = (y.double() - ref).abs().max().item()
    rounding = (ref.to(torch.bfloat16).double() - ref).abs().max().item()
    assert err <= rounding + 1e-3 * ref.abs().max().item(), (err, rounding)
    assert torch.equal(
        replayed(lambda: cuda_gemv(x, w, b, pdl=True, tc=True, stage=False, row_scale=(squares, eps))), y
    )
    with pytest.raises(ValueError, match="row_scale"):
        cuda_gemv(x, w, b, tc=True, stage=True, row_scale=(squares, eps))


@pytest.mark.parametrize("M", [1, 2])
def test_the_consumer_pair_equals_the_scaled_halves_then_silu_mul(M):
    """kNorm 2 with kPair (gate_up's activation from its epilogue): fused.silu_mul of the scaled plain kernel's output
    at the same warps a half, bit for bit (the 7B gate_up and the model's partial-tile width)."""
    from worker.kernels.fused import silu_mul
    from worker.kernels.gemv_cuda import cuda_gemv

    for K, N in ((4096, 22016), (640, 304)):
        g = torch.Generator(device=CUDA).manual_seed(K + N + M)
        w, _ = _int4(K, N, True, g)
        x = torch.randn(M, K, device=CUDA, generator=g).to(torch.bfloat16)
        scale = (torch.rand(M, 16, device=CUDA, generator=g) * 40, 1e-6)
        want = silu_mul(cuda_gemv(x, w, None, pdl=True, tc=True, stage=False, warps=2, splits=1, row_scale=scale))
        got = cuda_gemv(x, w, None, pdl=True, tc=True, stage=False, pair=True, warps=4, row_scale=scale)
        assert torch.equal(got, want)


def _model(tmp_path, fold: bool):
    from gptq_helpers import dequantized_state, gptq_checkpoint
    from worker.layers.attention_triton import TritonAttention
    from worker.layers.decode_kernels import SERVED, parse_decode_kernels, where_applies
    from worker.models.qwen import FlashQwenForCausalLM

    state = random_checkpoint(GPU_TINY, seed=13)
    path, q = gptq_checkpoint(str(tmp_path / "q"), GPU_TINY, state, 4, 128, False, False)
    names = [n for n in SERVED if n != "norm_fold"] + (["norm_fold"] if fold else [])
    kernels = where_applies(parse_decode_kernels(",".join(names)), CUDA)
    model = FlashQwenForCausalLM.from_pretrained(
        path, ParallelContext(0, 1, CUDA), torch.bfloat16, TritonAttention(), progress=False, decode_kernels=kernels
    )
    return model, dequantized_state(q, 4)


@pytest.mark.parametrize("batch", [1, 2])
def test_a_gptq_model_decodes_with_the_norms_folded(tmp_path, batch, monkeypatch):
    """Decode steps with norm_fold: 2 RMSNorm launches a step instead of 5 (the folded path ran), the logits within
    bf16's bound (0.15, as test_gpu_decode_kernels) of the float64 reference on the dequantized weights, and close to
    the unfolded model's."""
    from paged import Paged
    from worker.layers.norm import RMSNorm
    from worker.layers.rotary import ntk_alpha

    calls = []
    forward = RMSNorm.forward
    monkeypatch.setattr(RMSNorm, "forward", lambda self, *a, **k: calls.append(1) or forward(self, *a, **k))
    results = {}
    for fold in (False, True):
        model, deq = _model(tmp_path / str(fold), fold)
        g = torch.Generator().manual_seed(2)
        prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (9, 40)[:batch]]
        alphas = [ntk_alpha(len(x), 32, True) for x in prompts]  # logn and NTK past 32, as the reference
        p = Paged(model, num_blocks=64)
        ids = list(range(batch))
        out = p.step(ids, prompts, [0] * batch, alphas, True)
        seqs = [list(s) for s in prompts]
        logits = []
        for _ in range(3):
            for s, o in zip(seqs, out):
                s.append(int(o[-1].argmax()))
            calls.clear()
            out = p.step(ids, seqs, [len(s) - 1 for s in seqs], alphas, False)
            assert len(calls) == (2 if fold else 5), (fold, len(calls))
            logits.append([o[-1].double().cpu() for o in out])
        worst = 0.0
        for i, s in enumerate(seqs):
            ref = ref_forward(deq, GPU_TINY, s, prompt_len=len(prompts[i]))[-1]  # the last step fed s[-1]
            worst = max(worst, (logits[-1][i] - ref).abs().max().item())
        print(f"norm_fold {fold}, batch {batch}: max abs logit diff vs float64 {worst:.2e}")
        assert worst <= 0.15
        results[fold] = logits[0]
    assert all((a - b).abs().max().item() <= 0.15 for a, b in zip(results[False], results[True]))


@pytest.mark.parametrize("batch", [1, 2])
def test_the_folded_decode_replays_from_a_graph_bit_for_bit(tmp_path, batch):
    from helpers import decode_requests
    from worker.engine.cuda_graphs import GraphedDecode
    from worker.engine.kv_cache import KVCache
    from worker.engine.runner import Runner

    model, _ = _model(tmp_path, True)
    c = model.config
    kv = KVCache(c.num_hidden_layers, 200, 16, c.num_attention_heads, c.head_dim, torch.bfloat16, CUDA)
    graphs = GraphedDecode(model, kv, max_batch=4, max_blocks_per_seq=16, scratch_block=199, adapter_pools=False)
    step = decode_requests([3, 40][:batch])
    runner = Runner(model, kv, CUDA)
    runner.forward(step, True)
    for r in step.requests:
        r.ids.append(5)
    assert model.transformer.folds_norms(SimpleNamespace(is_prefill=False, adapter_data=None), batch)
    eager = runner.forward(step, False).last
    for r in step.requests:
        r.n_cached -= 1  # the same decode step again, replayed from the graph
    assert torch.equal(eager, graphs.run(step, None))
