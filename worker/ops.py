"""The maths shared by the Triton kernels and their PyTorch references (imports torch only).

RMSNorm, rotary with dynamic NTK and logn, SiLU-and-multiply, and the paged KV cache's store, gather
and fp8 (e4m3) quantisation. The layers run these as the reference path; the kernels in worker/kernels
reproduce them op for op and their tests compare the two.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value; torch's cast turns anything larger into NaN
Scale = float | torch.Tensor | None  # a python float or a 0-d fp32 tensor (None: no scaling)


# --------------------------------------------------------------------------------------- RMSNorm
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen v1: normalise in fp32, cast back to x's dtype, then scale. x: [T, H]; weight: [H]."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return normed.to(x.dtype) * weight


def add_rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(s), s) with s = x + residual (s = x without one): a residual add fused into the norm."""
    total = x if residual is None else x + residual
    return rms_norm(total, weight, eps), total


# ---------------------------------------------------------------------------------------- rotary
def ntk_alpha(prompt_len: int, seq_length: int, use_dynamic_ntk: bool) -> float:
    """Dynamic NTK: max(2 ** ceil(log2(L / S) + 1) - 1, 1); 1 when NTK is off or L <= S.

    Chosen from a sequence's prompt length at prefill and kept for its later decode steps.
    """
    if not use_dynamic_ntk or prompt_len <= seq_length:
        return 1.0
    context_value = math.log(prompt_len / seq_length, 2) + 1
    return float(max(2 ** math.ceil(context_value) - 1, 1))


def rotary_cos_sin(
    positions: torch.Tensor, alpha_per_token: torch.Tensor, rotary_dim: int, base: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: [T, rotary_dim/2] fp32 for positions [T]; each token's base is base * alpha ** (d / (d - 2))."""
    d = rotary_dim
    exponent = torch.arange(0, d, 2, device=positions.device, dtype=torch.float32) / d  # [d/2]
    bases = base * alpha_per_token.float() ** (d / (d - 2))  # [T]
    inv_freq = 1.0 / (bases[:, None] ** exponent[None, :])  # [T, d/2]
    angles = positions.float()[:, None] * inv_freq
    return angles.cos(), angles.sin()


def logn_scale(positions: torch.Tensor, seq_length: int) -> torch.Tensor:
    """[T] fp32 query scale: log(p + 1) / log(S) where p + 1 > S, else 1."""
    p1 = positions.double() + 1
    scale = torch.where(p1 > seq_length, p1.log() / math.log(seq_length), torch.ones_like(p1))
    return scale.float()


def rotary_tables(
    positions: torch.Tensor, alpha: torch.Tensor | None, rotary_dim: int, base: float, seq_length: int, use_logn: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A step's (cos, sin, logn or None) for positions [T] and each token's NTK alpha [T] (None: 1)."""
    positions = positions.long()
    if alpha is None:
        alpha = torch.ones(positions.shape[0], device=positions.device)
    cos, sin = rotary_cos_sin(positions, alpha, rotary_dim, base)
    return cos, sin, logn_scale(positions, seq_length) if use_logn else None


def apply_rotary(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, logn: torch.Tensor | None = None
) -> torch.Tensor:
    """GPT-NeoX rotate-half on the first rotary_dim dims of each head in fp32, cast back; then scale by logn.

    x: [T, heads, head_dim]; cos/sin: [T, rotary_dim/2]; logn: [T] or None.
    """
    half = cos.shape[-1]
    rot = x[..., : 2 * half].float()
    x1, x2 = rot[..., :half], rot[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    rotated = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)
    out = torch.cat((rotated, x[..., 2 * half :]), dim=-1) if 2 * half < x.shape[-1] else rotated
    if logn is not None:
        out = out * logn.to(x.dtype)[:, None, None]
    return out


def rotary_qk(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, logn: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(RoPE(q) scaled by logn, RoPE(k)): new tensors. q, k: [T, heads, head_dim]."""
    return apply_rotary(q, cos, sin, logn), apply_rotary(k, cos, sin)


# ------------------------------------------------------------------------------------------- MLP
def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[T, 2W] = [gate | up] -> up * silu(gate): [T, W]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return up * F.silu(gate)


# -------------------------------------------------------------------------------------- KV cache
def quantize(x: torch.Tensor, dtype: torch.dtype, scale: Scale = None) -> torch.Tensor:
    """x in the cache's `dtype`: x / scale (fp32) when scaled, clamped to ±448 for fp8, then cast."""
    if scale is not None:
        x = x.float() / scale
    if dtype == FP8:
        x = x.float().clamp(-FP8_MAX, FP8_MAX)
    return x.to(dtype)


def dequantize(x: torch.Tensor, scale: Scale = None) -> torch.Tensor:
    """Cached rows back to numbers: fp32 x × scale (None: x as stored)."""
    return x if scale is None else x.float() * scale


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    k_scale: Scale = None,
    v_scale: Scale = None,
) -> None:
    """Write new keys/values [T, heads, head_dim] into their slots [T] of caches [blocks, block_size, heads,
    head_dim]; slot s is row s % block_size of block s // block_size."""
    nb, bs, h, d = k_cache.shape
    for x, cache, scale in ((k, k_cache, k_scale), (v, v_cache, v_scale)):
        x = quantize(x, cache.dtype, scale)
        if cache.dtype == FP8:  # index_copy_ has no fp8 kernel on CPU: copy the bytes
            cache, x = cache.view(torch.uint8), x.view(torch.uint8)
        cache.view(nb * bs, h, d).index_copy_(0, slots, x)


def gather_context(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` cached rows of one sequence: [length, heads, head_dim], as stored."""
    nb, bs, h, d = cache.shape
    n_blocks = (length + bs - 1) // bs
    return cache[block_table[:n_blocks].long()].reshape(n_blocks * bs, h, d)[:length]


def scales_from_amax(amax: torch.Tensor, margin: float = 2.0) -> torch.Tensor:
    """fp8 scales from calibrated maxima |x|: amax × margin / 448, so the largest value seen maps to
    448 / margin; a zero or non-finite maximum (nothing seen) gives 1.0."""
    scale = amax.float() * margin / FP8_MAX
    ok = torch.isfinite(scale) & (scale > 0)
    return torch.where(ok, scale.clamp(min=1e-12), torch.ones_like(scale))
