"""The fused kernels (worker/kernels/fused.py) on CUDA against their PyTorch references at Qwen-7B shapes
(hidden 4096, 32 heads x 128, MLP width 11008; up to 8192 tokens), bf16 / fp16 / fp32; the model's fused
path against its unfused path. Timings: scripts/bench_kernels.py --only fused.

Tolerances, in ulps of the reference output (max over elements):
  rotary_   bit-exact: the same fp32 products and sums (no FMA contraction), the same casts
  rotary_tables  bit-exact against the correctly rounded tables (logn: PyTorch's bit for bit)
  silu_mul  <= 2 ulps, expected exact (libdevice expf and IEEE division, as PyTorch's CUDA silu); a
            flipped last bit of the rounded silu would show as up to 2 ulps of the product
  rms_norm  the residual sum bit-exact; the output <= 2 ulps in bf16/fp16 (the mean sums in another
            order: fp32 noise that flips the last bit of the normed value, then of the product with the
            weight, rarely), <= 8 ulps in fp32
Run: `pytest -q -s -m gpu tests/gpu/test_gpu_fused.py` (-s shows the mismatch counts).
"""

from __future__ import annotations

import pytest
import torch

from helpers import GPU_TINY, GPU_TRITON_MARKS, ulps

pytestmark = GPU_TRITON_MARKS
pytest.importorskip("triton")

import helpers  # noqa: E402
from worker.kernels.fused import rms_norm, rms_norm_reference, rotary_, rotary_reference, silu_mul, silu_mul_reference  # noqa: E402
from worker.kernels.rotary_tables import rotary_tables, rotary_tables_reference  # noqa: E402
from worker.ops import logn_scale, rotary_cos_sin  # noqa: E402

CUDA = torch.device("cuda")
HIDDEN, HEADS, HEAD_DIM, WIDTH = 4096, 32, 128, 11008
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
RMS_ULPS = {torch.bfloat16: 2.0, torch.float16: 2.0, torch.float32: 8.0}
SILU_ULPS = {torch.bfloat16: 2.0, torch.float16: 2.0, torch.float32: 2.0}


def randn(*shape: int, dtype: torch.dtype, seed: int, scale: float = 1.0) -> torch.Tensor:
    return helpers.randn(*shape, dtype=dtype, seed=seed, scale=scale, device=CUDA)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 7, 128, 8192])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(dtype, T, with_residual):
    x = randn(T, HIDDEN, dtype=dtype, seed=T, scale=3.0)
    residual = randn(T, HIDDEN, dtype=dtype, seed=T + 1, scale=3.0) if with_residual else None
    weight = (1 + 0.1 * randn(HIDDEN, dtype=torch.float32, seed=2)).to(dtype)
    out, total = rms_norm(x, weight, 1e-6, residual)
    ref_out, ref_total = rms_norm_reference(x, weight, 1e-6, residual)
    assert torch.equal(total, ref_total)
    worst = ulps(out, ref_out)
    print(f"rms_norm {dtype} T={T}: {(out != ref_out).sum().item()} of {out.numel()} differ, max {worst} ulp")
    assert worst <= RMS_ULPS[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 7, 8192])
@pytest.mark.parametrize("rotary_dim", [HEAD_DIM, HEAD_DIM // 2])
@pytest.mark.parametrize("with_logn", [False, True])
def test_rotary(dtype, T, rotary_dim, with_logn):
    qkv = randn(T, 3 * HEADS * HEAD_DIM, dtype=dtype, seed=T, scale=2.0)
    q, k, v = qkv.view(T, 3, HEADS, HEAD_DIM).unbind(1)  # the model's non-contiguous views
    positions = torch.arange(T, device=CUDA) + 2000  # past seq_length 2048 for most: logn != 1
    alpha = torch.full((T,), 3.0, device=CUDA)
    cos, sin = rotary_cos_sin(positions, alpha, rotary_dim, 10000.0)
    logn = logn_scale(positions, 2048) if with_logn else None
    ref_q, ref_k = rotary_reference(q, k, cos, sin, logn)
    v_before = v.clone()
    rotary_(q, k, cos, sin, logn)
    assert torch.equal(q, ref_q) and torch.equal(k, ref_k)
    assert torch.equal(v, v_before)


def _tables_emulated(positions, alpha, d, base):
    """cos, sin rounded where ops.rotary_cos_sin rounds (each fp32 power, product, reciprocal), each power computed in
    float64 and rounded once (the correctly rounded fp32 power, which PyTorch's CUDA powf gives in ~94 % of cases)."""
    e = torch.tensor(d / (d - 2), dtype=torch.float32).double()
    if alpha is None:
        alpha = torch.ones(positions.shape[0], device=CUDA)
    bases = torch.pow(alpha.double(), e).float() * base  # fp32 power, fp32 product
    exponent = torch.arange(0, d, 2, device=CUDA, dtype=torch.float32) / d
    powers = torch.pow(bases.double()[:, None], exponent.double()[None, :]).float()
    angles = positions.float()[:, None] * torch.reciprocal(powers)
    return angles.cos(), angles.sin()


@pytest.mark.parametrize("rotary_dim", [HEAD_DIM, 96, 64])
@pytest.mark.parametrize("with_alpha", [False, True])
@pytest.mark.parametrize("seq_length", [2048, 8192])
def test_rotary_tables(rotary_dim, with_alpha, seq_length):
    """The one-launch tables: logn PyTorch's bit for bit; cos and sin the correctly rounded tables bit for bit, and
    PyTorch's (whose powf is sometimes a last bit off) within its own angle error. Positions to 65,535, alphas 1-64."""
    g = torch.Generator(device=CUDA).manual_seed(rotary_dim + seq_length)
    positions = torch.cat([torch.arange(300, device=CUDA) + seq_length - 150,
                           torch.randint(0, 65536, (4000,), device=CUDA, generator=g)])  # fmt: skip
    alpha = 1.0 + 63.0 * torch.rand(positions.shape[0], device=CUDA, generator=g) if with_alpha else None
    if alpha is not None:
        alpha[::3] = 1.0
    for base in (10000.0, 1000000.0):
        cos, sin, logn = rotary_tables(positions, alpha, rotary_dim, base, seq_length, True)
        want_cos, want_sin = _tables_emulated(positions, alpha, rotary_dim, base)
        assert torch.equal(cos, want_cos), f"cos: {(cos != want_cos).sum().item()} of {cos.numel()} differ"
        assert torch.equal(sin, want_sin), f"sin: {(sin != want_sin).sum().item()} of {sin.numel()} differ"
        ref_cos, ref_sin, ref_logn = rotary_tables_reference(positions, alpha, rotary_dim, base, seq_length, True)
        assert logn is not None and ref_logn is not None and torch.equal(logn, ref_logn)
        bound = 4e-7 * (positions.float() + 1)[:, None]  # a few fp32 ulps of the angle
        assert bool(((cos - ref_cos).abs() <= bound).all()) and bool(((sin - ref_sin).abs() <= bound).all())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 7, 8192])
def test_silu_mul(dtype, T):
    gate_up = randn(T, 2 * WIDTH, dtype=dtype, seed=T, scale=4.0)
    out, ref = silu_mul(gate_up), silu_mul_reference(gate_up)
    worst = ulps(out, ref)
    print(f"silu_mul {dtype} T={T}: {(out != ref).sum().item()} of {out.numel()} differ, max {worst} ulp")
    assert worst <= SILU_ULPS[dtype]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 0.1)])
def test_model_fused_vs_unfused(tmp_path, dtype, tol):
    """The model with the triton backend: fused (the default on CUDA) against fused=False, prefill and
    decode of a mixed batch with NTK and logn active. bf16 bound: below the 0.15 the unfused model gets
    against the float64 reference (tests/gpu/test_gpu_model.py); a flipped last bit of a hidden state
    moves logits of O(5) by a few hundredths."""
    from helpers import write_checkpoint
    from paged import Paged
    from random_weights import random_checkpoint
    from worker.distributed import ParallelContext
    from worker.layers.attention_triton import TritonAttention
    from worker.layers.rotary import ntk_alpha
    from worker.models.qwen import FlashQwenForCausalLM

    cfg = dict(GPU_TINY, rotary_pct=0.5)
    path = write_checkpoint(str(tmp_path / "ckpt"), cfg, random_checkpoint(cfg, seed=3))
    pctx = ParallelContext(0, 1, CUDA)
    models = [
        FlashQwenForCausalLM.from_pretrained(path, pctx, dtype, TritonAttention(), progress=False, fused=f)
        for f in (None, False)
    ]
    assert [m.use_fused for m in models] == [True, False]
    g = torch.Generator().manual_seed(0)
    lengths = [1, 17, 70, 129]
    seqs = [torch.randint(0, 512, (n,), generator=g).tolist() for n in lengths]
    alphas = [ntk_alpha(n, 32, True) for n in lengths]
    runners = [Paged(m, num_blocks=256) for m in models]
    starts = [0] * 4
    worst = 0.0
    for step in range(6):
        outs = [r.step([0, 1, 2, 3], seqs, starts, alphas, step == 0) for r in runners]
        worst = max(worst, max((a.float() - b.float()).abs().max().item() for a, b in zip(*outs)))
        starts = [len(s) for s in seqs]
        seqs = [s + [int(o[-1].argmax())] for s, o in zip(seqs, outs[1])]
    print(f"model {dtype}: max abs logit diff fused vs unfused {worst:.2e} (bound {tol})")
    assert worst <= tol
