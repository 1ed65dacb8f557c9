"""Fused elementwise kernels for the decode/prefill hot path: residual add + RMSNorm, RoPE (+ logn) in
place, SiLU-and-multiply. Each replaces a chain of small PyTorch kernels with one launch; the layers pick
these or their references in worker.ops once, at construction.

Each kernel follows its reference op for op, with the same dtype casts, so results agree to the last bit
except where a reduction order differs (the RMSNorm mean: rare 1-ulp differences):
  rms_norm   `ops.add_rms_norm`: RMSNorm of s = x + residual, and s
  rotary     `ops.rotary_qk`: q with logn, k without (in place here)
  silu_mul   `ops.silu_mul`: silu in fp32 rounded to the input dtype, then the product rounded again, as
             PyTorch does for fp16/bf16
tests/unit/test_fused_kernels.py compares each pair.

Kernels launch with `enable_fp_fusion=False`: no multiply-add is contracted into an FMA, so every fp32
product and sum rounds where PyTorch's would. On CUDA, exp is libdevice's `expf` (what PyTorch's silu
calls) and the division is IEEE round-to-nearest; the Triton interpreter has no libdevice and uses
numpy's exp instead. (Triton may turn "fp32 op, then round to bf16/fp16" into the native 16-bit op: the
same result, since fp32 holds more than twice the 16-bit significand, so the double rounding is exact.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from worker import ops
from worker.kernels.pdl import active, gdc_go, gdc_wait, launch_options, level


# --------------------------------------------------------------------------------------- RMSNorm
@triton.jit
def _rms_norm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    sum_ptr,
    eps,
    inv_n,
    n_cols,
    stride_x,
    stride_res,
    stride_out,
    stride_sum,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    gdc_wait(PDL)
    gdc_go(PDL)
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:  # s = x + residual, rounded to the model dtype (PyTorch adds fp16/bf16 in fp32)
        r = tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * stride_sum + cols, x, mask=mask)
    x32 = x.to(tl.float32)
    mean_sq = tl.sum(x32 * x32, 0) * inv_n  # torch's CUDA mean: sum * (1/n)
    normed = (x32 * tl.math.rsqrt(mean_sq + eps)).to(x_ptr.dtype.element_ty)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    out = normed.to(tl.float32) * w.to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None, pdl: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(s), s) with s = x + residual (or s = x when residual is None).

    x, residual: [T, H] in the model dtype; weight: [H] in the same dtype. pdl: launch with worker/kernels/pdl.py.
    """
    T, H = x.shape
    if weight.dtype != x.dtype or (residual is not None and residual.dtype != x.dtype):
        raise ValueError(
            f"rms_norm wants one dtype, got x {x.dtype}, weight {weight.dtype}, "
            f"residual {None if residual is None else residual.dtype}"
        )
    x = _unit_stride(x)
    out = torch.empty(T, H, dtype=x.dtype, device=x.device)
    if residual is None:
        res, total = x, x
    else:
        res = _unit_stride(residual)
        total = torch.empty(T, H, dtype=x.dtype, device=x.device)
    if T == 0:
        return out, total
    block = triton.next_power_of_2(H)
    on = active(pdl, x.device)
    _rms_norm_kernel[(T,)](
        x,
        res,
        weight,
        out,
        total,
        eps,
        1.0 / H,
        H,
        x.stride(0),
        res.stride(0),
        out.stride(0),
        total.stride(0),
        HAS_RESIDUAL=residual is not None,
        BLOCK=block,
        PDL=level(on, "rms_norm", T),
        num_warps=min(max(block // 512, 1), 16),
        enable_fp_fusion=False,
        **launch_options(on),
    )
    return out, total


rms_norm_reference = ops.add_rms_norm


# ---------------------------------------------------------------------------------------- rotary
@triton.jit
def _rotate_heads(
    ptr, stride_h, heads, c, s, scale, h, j, rest, HALF: tl.constexpr, REST: tl.constexpr, SCALED: tl.constexpr
):
    """Rotate dims [0, 2*HALF) of rows `h` (a tile of heads of one token) in place; with SCALED also
    multiply all head_dim dims by `scale` (already in the tensor's dtype)."""
    dtype = ptr.dtype.element_ty
    row = ptr + h[:, None] * stride_h
    mask = (h[:, None] < heads) & (j[None, :] < HALF)
    x1 = tl.load(row + j[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(row + HALF + j[None, :], mask=mask, other=0.0).to(tl.float32)
    o1 = (x1 * c[None, :] - x2 * s[None, :]).to(dtype)
    o2 = (x2 * c[None, :] + x1 * s[None, :]).to(dtype)
    if SCALED:  # out * logn.to(dtype): the product of two dtype values, rounded to dtype
        o1 = (o1.to(tl.float32) * scale.to(tl.float32)).to(dtype)
        o2 = (o2.to(tl.float32) * scale.to(tl.float32)).to(dtype)
    tl.store(row + j[None, :], o1, mask=mask)
    tl.store(row + HALF + j[None, :], o2, mask=mask)
    if SCALED:
        if REST > 0:  # dims past the rotary ones are scaled too
            rmask = (h[:, None] < heads) & (rest[None, :] < REST)
            x = tl.load(row + 2 * HALF + rest[None, :], mask=rmask, other=0.0)
            x = (x.to(tl.float32) * scale.to(tl.float32)).to(dtype)
            tl.store(row + 2 * HALF + rest[None, :], x, mask=rmask)


@triton.jit
def _rotate_token(q_ptr, k_ptr, cos_ptr, sin_ptr, logn_ptr, heads, stride_qt, stride_qh, stride_kt, stride_kh,
                  stride_ct, stride_st, t, h, HALF: tl.constexpr, REST: tl.constexpr, HAS_LOGN: tl.constexpr,
                  BLOCK_HALF: tl.constexpr, BLOCK_REST: tl.constexpr):  # fmt: skip
    """RoPE in place on heads `h` of token t: q (times logn with HAS_LOGN) and k, as ops.rotary_qk; shared by
    _rotary_kernel and rope_store.py's kernel."""
    j = tl.arange(0, BLOCK_HALF)
    rest = tl.arange(0, BLOCK_REST)
    c = tl.load(cos_ptr + t * stride_ct + j, mask=j < HALF, other=0.0)
    s = tl.load(sin_ptr + t * stride_st + j, mask=j < HALF, other=0.0)
    if HAS_LOGN:
        scale = tl.load(logn_ptr + t).to(q_ptr.dtype.element_ty)
    else:
        scale = tl.full([], 1.0, q_ptr.dtype.element_ty)
    _rotate_heads(q_ptr + t * stride_qt, stride_qh, heads, c, s, scale, h, j, rest, HALF, REST, HAS_LOGN)
    _rotate_heads(k_ptr + t * stride_kt, stride_kh, heads, c, s, scale, h, j, rest, HALF, REST, False)


@triton.jit
def _rotary_kernel(
    q_ptr,
    k_ptr,
    cos_ptr,
    sin_ptr,
    logn_ptr,
    heads,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_ct,
    stride_st,
    HALF: tl.constexpr,
    REST: tl.constexpr,
    HAS_LOGN: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_REST: tl.constexpr,
    PDL: tl.constexpr,
):
    gdc_wait(PDL)
    gdc_go(PDL)
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    _rotate_token(q_ptr, k_ptr, cos_ptr, sin_ptr, logn_ptr, heads, stride_qt, stride_qh, stride_kt, stride_kh,
                  stride_ct, stride_st, t, h, HALF, REST, HAS_LOGN, BLOCK_HALF, BLOCK_REST)  # fmt: skip


def rotary_(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    logn: torch.Tensor | None = None,
    pdl: bool = False,
) -> None:
    """In place: q = apply_rotary(q, cos, sin, logn), k = apply_rotary(k, cos, sin).

    q, k: [T, heads, head_dim] with unit stride on head_dim (views like qkv.unbind(1) are fine);
    cos, sin: [T, half] fp32 (2 * half <= head_dim); logn: [T] fp32 or None.
    """
    T, H, D = q.shape
    half = cos.shape[-1]
    if k.shape != q.shape or k.dtype != q.dtype or 2 * half > D:
        raise ValueError(f"rotary_: q {tuple(q.shape)} {q.dtype}, k {tuple(k.shape)} {k.dtype}, half {half}")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or cos.stride(-1) != 1 or sin.stride(-1) != 1:
        raise ValueError("rotary_ needs a unit stride on the last dim of q, k, cos and sin")
    if T == 0:
        return
    block_half = triton.next_power_of_2(half)
    block_h = min(triton.next_power_of_2(H), max(1, 1024 // block_half))
    rest = D - 2 * half
    on = active(pdl, q.device)
    _rotary_kernel[(T, triton.cdiv(H, block_h))](
        q,
        k,
        cos,
        sin,
        logn if logn is not None else cos,
        H,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        cos.stride(0),
        sin.stride(0),
        HALF=half,
        REST=rest,
        HAS_LOGN=logn is not None,
        BLOCK_H=block_h,
        BLOCK_HALF=block_half,
        BLOCK_REST=triton.next_power_of_2(max(rest, 16)),
        PDL=on,
        num_warps=4,
        enable_fp_fusion=False,
        **launch_options(on),
    )


def rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    logn: torch.Tensor | None = None,
    pdl: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`rotary_` returning (q, k), the signature of its reference `ops.rotary_qk`."""
    rotary_(q, k, cos, sin, logn, pdl)
    return q, k


rotary_reference = ops.rotary_qk


# ---------------------------------------------------------------------------------- SiLU · mul
@triton.jit
def _silu_mul_kernel(
    gu_ptr, out_ptr, width, stride_gu, stride_out, BLOCK: tl.constexpr, LIBDEVICE: tl.constexpr, PDL: tl.constexpr
):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < width
    gdc_wait(PDL)
    gdc_go(PDL)
    gate = tl.load(gu_ptr + t * stride_gu + cols, mask=mask, other=0.0)
    up = tl.load(gu_ptr + t * stride_gu + width + cols, mask=mask, other=0.0)
    tl.store(out_ptr + t * stride_out + cols, silu_mul_rn(gate, up, LIBDEVICE).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def silu_mul_rn(gate, up, LIBDEVICE: tl.constexpr):
    """up * silu(gate) in gate's dtype, rounded as `ops.silu_mul` (also the prologue of gemv_dense's ACT)."""
    dtype = gate.dtype
    g = gate.to(tl.float32)
    if LIBDEVICE:
        e = libdevice.exp(-g)  # expf, as PyTorch's CUDA silu: x / (1 + exp(-x)) in fp32
    else:
        e = tl.exp(-g)
    act = tl.math.div_rn(g, 1.0 + e).to(dtype)  # silu rounded to the input dtype
    return (up.to(tl.float32) * act.to(tl.float32)).to(dtype)


def silu_mul(gate_up: torch.Tensor, pdl: bool = False) -> torch.Tensor:
    """[T, 2W] = [gate | up] -> up * silu(gate): [T, W] in gate_up's dtype."""
    T, W2 = gate_up.shape
    if W2 % 2:
        raise ValueError(f"silu_mul wants an even last dim, got {W2}")
    W = W2 // 2
    gate_up = _unit_stride(gate_up)
    out = torch.empty(T, W, dtype=gate_up.dtype, device=gate_up.device)
    if T == 0:
        return out
    block = min(1024, triton.next_power_of_2(W))
    on = active(pdl, gate_up.device)
    _silu_mul_kernel[(T, triton.cdiv(W, block))](
        gate_up,
        out,
        W,
        gate_up.stride(0),
        out.stride(0),
        BLOCK=block,
        LIBDEVICE=not _INTERPRETED,
        PDL=on,
        num_warps=4,
        enable_fp_fusion=False,
        **launch_options(on),
    )
    return out


silu_mul_reference = ops.silu_mul


# --------------------------------------------------------------------------------------- helpers
# kernels are bound to the Triton interpreter (TRITON_INTERPRET=1) or to the GPU when defined
_INTERPRETED = not isinstance(_silu_mul_kernel, triton.runtime.JITFunction)


def _unit_stride(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


__all__ = [
    "rms_norm",
    "rotary",
    "rotary_",
    "silu_mul",
    "silu_mul_rn",
    "rms_norm_reference",
    "rotary_reference",
    "silu_mul_reference",
]
