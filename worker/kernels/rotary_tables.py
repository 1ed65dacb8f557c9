"""A step's rotary tables in one launch: cos, sin [T, rotary_dim / 2] fp32 and the logn query scale [T] fp32 from the
tokens' positions and their sequences' dynamic-NTK alphas (`ops.rotary_cos_sin`, `ops.logn_scale`).

Why: PyTorch computes them in 18 elementwise launches (arange, two pows, the reciprocal, the products, cos, sin and
logn's double-precision where), ~26 us at the head of every graphed decode step on the H200, before the embedding
(BENCHMARKS.md, 2026-11-30, eighth). The values round where PyTorch's do (each fp32 power, product and reciprocal; no
contracted multiply-adds: `enable_fp_fusion=False`; logn in float64), with libdevice's cosf and sinf (PyTorch's bits)
and IEEE division; the powers are computed in float64 and rounded once (`_pow`), since Triton's powf is not PyTorch's:
the tables are the correctly rounded ones, PyTorch's bit for bit wherever its powf rounds correctly (tested against a
float64 emulation of those rounding points, tests/gpu/test_gpu_fused.py). Under the Triton interpreter (no libdevice)
pow, cos, sin and log are numpy's.
"""

from __future__ import annotations

import math
import struct

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from worker import ops
from worker.kernels.pdl import INTERPRETED  # no libdevice under the interpreter


@triton.jit
def _pow(x, y, LIBDEVICE: tl.constexpr):
    """x ** y (fp32) computed in float64 and rounded once: the correctly rounded power (but at a float64 result within
    an ulp of a rounding boundary). Triton's libdevice powf (flush-to-zero build) and PyTorch's CUDA powf differ in the
    last bit of ~38 % of the powers, the float64 one from PyTorch's in ~6 % (H200)."""
    if LIBDEVICE:
        p = libdevice.pow(x.to(tl.float64), y.to(tl.float64))
    else:
        p = tl.exp(y.to(tl.float64) * tl.log(x.to(tl.float64)))
    return p.to(tl.float32)


@triton.jit
def _rotary_tables_kernel(
    pos_ptr, alpha_ptr, cos_ptr, sin_ptr, logn_ptr, T, base, alpha_exp, seq_length, inv_log_bits,
    D: tl.constexpr, HALF: tl.constexpr, HALF_P2: tl.constexpr, BLOCK_T: tl.constexpr, HAS_ALPHA: tl.constexpr,
    LOGN: tl.constexpr, LIBDEVICE: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, HALF_P2)
    rmask, cmask = rows < T, cols < HALF
    pos = tl.load(pos_ptr + rows, mask=rmask, other=0)
    # arange(0, d, 2) / d as PyTorch divides by a scalar: times the scalar's fp32 reciprocal
    inv_d = tl.math.div_rn(tl.full([HALF_P2], 1.0, tl.float32), tl.full([HALF_P2], D, tl.float32))
    exponent = (2 * cols).to(tl.float32) * inv_d
    if HAS_ALPHA:  # base * alpha ** (d / (d - 2)) in fp32, the power correctly rounded (see _pow)
        alpha = tl.load(alpha_ptr + rows, mask=rmask, other=1.0).to(tl.float32)
        bases = base * _pow(alpha, tl.full([BLOCK_T], alpha_exp, tl.float32), LIBDEVICE)
    else:  # alpha 1: pow(1, e) is 1 exactly
        bases = tl.full([BLOCK_T], 1.0, tl.float32) * base
    powers = _pow(bases[:, None], exponent[None, :], LIBDEVICE)
    inv_freq = tl.math.div_rn(tl.full([BLOCK_T, HALF_P2], 1.0, tl.float32), powers)
    angles = pos.to(tl.float32)[:, None] * inv_freq
    if LIBDEVICE:
        cos, sin = libdevice.cos(angles), libdevice.sin(angles)
    else:
        cos, sin = tl.cos(angles), tl.sin(angles)
    offs = rows[:, None] * HALF + cols[None, :]
    mask = rmask[:, None] & cmask[None, :]
    tl.store(cos_ptr + offs, cos, mask=mask)
    tl.store(sin_ptr + offs, sin, mask=mask)
    if LOGN:  # log(p + 1) / log(S) where p + 1 > S, else 1, in float64
        p1 = pos.to(tl.float64) + 1.0
        if LIBDEVICE:
            lg = libdevice.log(p1)
        else:
            lg = tl.log(p1)
        inv_log = inv_log_bits.to(tl.float64, bitcast=True)  # a float64 scalar (Triton passes floats as fp32)
        scale = tl.where(p1 > seq_length, lg * inv_log, 1.0)  # PyTorch's division by a scalar: times its reciprocal
        tl.store(logn_ptr + rows, scale.to(tl.float32), mask=rmask)


def rotary_tables(
    positions: torch.Tensor, alpha: torch.Tensor | None, rotary_dim: int, base: float, seq_length: int, use_logn: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(cos, sin, logn or None) for positions [T] (int) and each token's alpha [T] (None: 1), as
    `ops.rotary_cos_sin` and `ops.logn_scale` compute them."""
    T, half = positions.shape[0], rotary_dim // 2
    dev = positions.device
    cos = torch.empty(T, half, dtype=torch.float32, device=dev)
    sin = torch.empty(T, half, dtype=torch.float32, device=dev)
    logn = torch.empty(T, dtype=torch.float32, device=dev) if use_logn else None
    if T == 0:
        return cos, sin, logn
    positions = positions.contiguous()
    alpha = alpha.float().contiguous() if alpha is not None else None
    block_t = 16
    _rotary_tables_kernel[(triton.cdiv(T, block_t),)](
        positions, alpha if alpha is not None else cos, cos, sin, logn if logn is not None else cos, T,
        float(base), rotary_dim / (rotary_dim - 2), seq_length, _bits(1.0 / math.log(seq_length)),
        D=rotary_dim, HALF=half, HALF_P2=triton.next_power_of_2(half), BLOCK_T=block_t, HAS_ALPHA=alpha is not None,
        LOGN=use_logn, LIBDEVICE=not INTERPRETED, num_warps=4, enable_fp_fusion=False,
    )  # fmt: skip
    return cos, sin, logn


def _bits(value: float) -> int:
    """A float64's bits as an int64 (a kernel argument Triton keeps at 64 bits)."""
    return int(struct.unpack("<q", struct.pack("<d", value))[0])


rotary_tables_reference = ops.rotary_tables
