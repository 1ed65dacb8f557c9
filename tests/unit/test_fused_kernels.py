"""The fused Triton kernels (worker/kernels/fused.py) against their PyTorch references, on the CPU through
the Triton interpreter, and the tiny model with the fused path forced on against the unfused model.

Awkward sizes throughout: one row, 7 rows, hidden 64 / 80 / 96 (80 and 96 are not powers of two),
rotary on a quarter of head_dim (rotary_pct 0.5: the pass-through dims), q/k as the non-contiguous
views `qkv.view(T, 3, H, D).unbind(1)` the model passes, with and without logn. fp32 and fp16 (the
interpreter mishandles bf16; bf16 runs in tests/gpu/test_gpu_fused.py).

Exactness: the kernels do the references' operations in the same order with the same casts and no
FMA contraction, so RoPE and the residual add are bit-exact. The RMSNorm mean sums in another order
(fp32 noise, so at most 1 ulp after rounding); the interpreter's exp (numpy) can differ from torch's
CPU exp by an ulp in fp32, which then shows in silu_mul's fp32 output (fp16 rounds it away).
"""

from __future__ import annotations

import os
import sys

import pytest

if "worker.kernels.fused" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
    # kernels are bound to the interpreter (or not) when they are defined: here they were compiled for
    # the GPU by an earlier module (tests/gpu in the same session); run this file on its own instead
    pytest.skip("Triton kernels already compiled for the GPU in this session", allow_module_level=True)
os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere

import torch  # noqa: E402

pytest.importorskip("triton")

from helpers import randn, ulps  # noqa: E402
from worker import ops  # noqa: E402
from worker.kernels.fused import (  # noqa: E402
    rms_norm,
    rms_norm_reference,
    rotary,
    rotary_,
    rotary_reference,
    silu_mul,
    silu_mul_reference,
)

DTYPES = [torch.float32, torch.float16]
# max ulps of the output where the math is not bit-identical (see the module docstring): fp32 shows the
# fp32 noise itself; fp16 rounds it away except for a rare flip of the last bit, in one of two roundings
MAX_ULPS = {torch.float32: 8.0, torch.float16: 2.0}


# --------------------------------------------------------------------------------------- RMSNorm
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,hidden", [(1, 64), (7, 96), (7, 80), (3, 1000)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(dtype, rows, hidden, with_residual):
    x = randn(rows, hidden, dtype=dtype, seed=1, scale=3.0)
    residual = randn(rows, hidden, dtype=dtype, seed=2, scale=3.0) if with_residual else None
    weight = (1 + 0.1 * randn(hidden, dtype=torch.float32, seed=3)).to(dtype)
    out, total = rms_norm(x, weight, 1e-6, residual)
    ref_out, ref_total = rms_norm_reference(x, weight, 1e-6, residual)
    assert out.dtype == dtype and out.shape == (rows, hidden)
    assert torch.equal(total, ref_total)  # the residual add is exact
    if not with_residual:
        assert total is x
    assert ulps(out, ref_out) <= MAX_ULPS[dtype]  # the mean's summation order differs


def test_rms_norm_strided_rows():
    """Rows of a wider tensor (a row stride larger than hidden) read and write the right elements."""
    big = randn(5, 160, dtype=torch.float32, seed=4)
    x, residual = big[:, :80], big[:, 80:]
    weight = randn(80, dtype=torch.float32, seed=5)
    out, total = rms_norm(x, weight, 1e-5, residual)
    ref_out, ref_total = rms_norm_reference(x, weight, 1e-5, residual)
    assert torch.equal(total, ref_total)
    torch.testing.assert_close(out, ref_out, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------- rotary
def _qkv_views(T: int, heads: int, head_dim: int, dtype: torch.dtype, seed: int):
    qkv = randn(T, 3 * heads * head_dim, dtype=dtype, seed=seed, scale=2.0)
    q, k, v = qkv.view(T, 3, heads, head_dim).unbind(1)  # non-contiguous, as in the model
    return qkv, q, k, v


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,heads,head_dim,half", [(1, 4, 16, 8), (7, 3, 16, 4), (7, 5, 32, 16), (9, 2, 24, 6)])
@pytest.mark.parametrize("with_logn", [False, True])
def test_rotary_in_place(dtype, T, heads, head_dim, half, with_logn):
    qkv, q, k, v = _qkv_views(T, heads, head_dim, dtype, seed=T + heads)
    assert q.stride(0) == 3 * heads * head_dim  # a view into qkv
    g = torch.Generator().manual_seed(6)
    positions = torch.arange(T) + 37
    angles = positions.float()[:, None] / (1000.0 ** (torch.arange(half).float() / half))[None, :]
    cos, sin = angles.cos(), angles.sin()
    logn = (1 + torch.rand(T, generator=g)) if with_logn else None
    ref_q, ref_k = rotary_reference(q, k, cos, sin, logn)
    v_before = v.clone()
    rotary_(q, k, cos, sin, logn)
    assert torch.equal(q, ref_q) and torch.equal(k, ref_k)  # same ops, same casts: bit-exact
    assert torch.equal(v, v_before)  # the rest of qkv is untouched


def test_rotary_logn_scales_pass_through_dims():
    """With rotary on part of head_dim, logn still scales the query's pass-through dims, not the key's."""
    _, q, k, _ = _qkv_views(3, 2, 16, torch.float32, seed=7)
    q0, k0 = q.clone(), k.clone()
    cos, sin = torch.ones(3, 4), torch.zeros(3, 4)  # identity rotation on dims [0, 8)
    rotary_(q, k, cos, sin, torch.tensor([1.0, 2.0, 0.5]))
    torch.testing.assert_close(q, q0 * torch.tensor([1.0, 2.0, 0.5])[:, None, None], atol=0, rtol=0)
    assert torch.equal(k, k0)


# ---------------------------------------------------------------------------------- SiLU · mul
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,width", [(1, 64), (7, 96), (7, 80), (2, 3000)])
def test_silu_mul(dtype, T, width):
    gate_up = randn(T, 2 * width, dtype=dtype, seed=width, scale=4.0)
    out = silu_mul(gate_up)
    ref = silu_mul_reference(gate_up)
    assert out.shape == (T, width) and out.dtype == dtype
    assert ulps(out, ref) <= MAX_ULPS[dtype]  # the interpreter's exp (numpy) is not torch's


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")
def test_silu_mul_extremes():
    """Large |gate| (exp overflows to inf: silu -> -0) and zeros behave like torch."""
    gate = torch.tensor([[-100.0, -20.0, 0.0, 20.0, 100.0]])
    up = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]])
    gate_up = torch.cat([gate, up], dim=-1)
    torch.testing.assert_close(silu_mul(gate_up), silu_mul_reference(gate_up), atol=1e-6, rtol=1e-6)


def test_empty_batch():
    x = torch.empty(0, 64)
    out, total = rms_norm(x, torch.ones(64), 1e-6, torch.empty(0, 64))
    assert out.shape == (0, 64) and total.shape == (0, 64)
    assert silu_mul(torch.empty(0, 32)).shape == (0, 16)
    q, k = torch.empty(0, 2, 8), torch.empty(0, 2, 8)
    rotary_(q, k, torch.empty(0, 4), torch.empty(0, 4))


# ----------------------------------------------------------------------------------------- model
MODEL_CONFIGS = {
    "ntk_logn_active": dict(seq_length=8),
    "rotary_pct_half": dict(rotary_pct=0.5, seq_length=8),
}


@pytest.mark.parametrize("name", list(MODEL_CONFIGS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_model_fused_matches_unfused(tmp_path, name, dtype):
    """The tiny model with the fused path forced on (CPU tensors, interpreter) gives the unfused model's
    logits: prefill of a mixed batch, decode steps (logn active past seq_length 8), suffix prefill.
    fp32 within 1e-5; fp16 within 1e-2 (logits of O(4), fp16 ulp 4e-3: room for a flipped hidden bit)."""
    from helpers import TINY, write_checkpoint
    from paged import Paged
    from random_weights import random_checkpoint
    from worker.layers.rotary import ntk_alpha
    from worker.models.qwen import FlashQwenForCausalLM

    cfg = {**TINY, **MODEL_CONFIGS[name]}
    path = write_checkpoint(str(tmp_path / "ckpt"), cfg, random_checkpoint(cfg, 0))
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    models = [FlashQwenForCausalLM.from_pretrained(path, dtype=dtype, progress=False, fused=f) for f in (False, True)]
    assert [m.use_fused for m in models] == [False, True]
    for m, impls in zip(models, [(ops.add_rms_norm, ops.rotary_qk, ops.silu_mul), (rms_norm, rotary, silu_mul)]):
        layer = m.transformer.h[1]  # every norm, RoPE and SiLU-mul runs the implementation chosen at construction
        assert (layer.ln_1.impl, layer.ln_2.impl, layer.attn.rotary.impl, layer.mlp.act.impl) == (impls[0], *impls)
        assert m.transformer.ln_f.impl is impls[0]
    runners = [Paged(m, seed=2) for m in models]
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (1, 6, 19)]
    alphas = [ntk_alpha(len(s), 8, True) for s in seqs]
    starts = [0, 0, 0]
    for step in range(3):  # prefill, decode, decode
        outs = [r.step([0, 1, 2], seqs, starts, alphas, prefill=step == 0) for r in runners]
        for a, b in zip(*outs):
            torch.testing.assert_close(b, a, atol=tol, rtol=0)
        starts = [len(s) for s in seqs]
        seqs = [s + [int(o[-1].argmax())] for s, o in zip(seqs, outs[0])]
    seqs[1] += [7, 8, 9, 10, 11]  # suffix prefill after a cached prefix
    outs = [r.step([0, 1, 2], seqs, starts, alphas, prefill=True) for r in runners]
    for a, b in zip(*outs):
        torch.testing.assert_close(b, a, atol=tol, rtol=0)


def test_model_fused_with_lora_adapter(tmp_path):
    """The LoRA wrappers replace c_attn / c_proj / gate_up; the fused path still goes through them."""
    from helpers import TINY, write_checkpoint
    from lora_helpers import attach_manager, load, write_adapter
    from paged import Paged
    from random_weights import random_checkpoint
    from worker.models.qwen import FlashQwenForCausalLM

    cfg = {**TINY, "seq_length": 16}
    path = write_checkpoint(str(tmp_path / "ckpt"), cfg, random_checkpoint(cfg, 1))
    root = str(tmp_path / "adapters")
    write_adapter(root, "a8", cfg, 8, 16, seed=2)
    outs = []
    for fused in (False, True):
        model = FlashQwenForCausalLM.from_pretrained(path, dtype=torch.float32, progress=False, fused=fused)
        mgr, _ = attach_manager(model, root, max_rank=8, num_slots=2)
        load(mgr, 1, "a8")
        slots = [0, mgr.entries[1].slot]
        prompts = [[3, 1, 4, 1, 5], [9, 2, 6, 5, 3, 5, 8]]
        outs.append(Paged(model).step([0, 1], prompts, [0, 0], [1.0, 1.0], True, slots))
    for a, b in zip(*outs):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    assert (outs[0][0][-1] - outs[0][1][-1]).abs().max() > 1e-3  # the adapter changed something
