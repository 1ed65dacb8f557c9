"""Qwen v1 rotary embedding (GPT-NeoX rotate-half) with per-sequence dynamic NTK and logn scaling.

Dynamic NTK: the alpha of each sequence is chosen from its prompt length at prefill and kept for all
later decode steps; each token's rotary base is `base * alpha ** (d / (d - 2))`.
logn: the query of the token at position p is scaled by `log(p + 1) / log(S)` when `p + 1 > S`.
"""
from __future__ import annotations

import math
from typing import Optional

import torch


def ntk_alpha(prompt_len: int, seq_length: int, use_dynamic_ntk: bool) -> float:
    """alpha = max(2 ** ceil(log2(L / S) + 1) - 1, 1); 1 when NTK is off or L <= S."""
    if not use_dynamic_ntk or prompt_len <= seq_length:
        return 1.0
    context_value = math.log(prompt_len / seq_length, 2) + 1
    return float(max(2 ** math.ceil(context_value) - 1, 1))


def rotary_cos_sin(positions: torch.Tensor, alpha_per_token: torch.Tensor, rotary_dim: int,
                   base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: [T, rotary_dim/2] fp32 for absolute `positions` [T] and each token's NTK alpha [T]."""
    d = rotary_dim
    exponent = torch.arange(0, d, 2, device=positions.device, dtype=torch.float32) / d  # [d/2]
    bases = base * alpha_per_token.float() ** (d / (d - 2))  # [T]
    inv_freq = 1.0 / (bases[:, None] ** exponent[None, :])  # [T, d/2]
    angles = positions.float()[:, None] * inv_freq
    return angles.cos(), angles.sin()


def logn_scale(positions: torch.Tensor, seq_length: int) -> torch.Tensor:
    """[T] fp32: log(p+1)/log(S) where p+1 > S, else 1."""
    p1 = positions.double() + 1
    scale = torch.where(p1 > seq_length, p1.log() / math.log(seq_length), torch.ones_like(p1))
    return scale.float()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 logn: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Rotate the first rotary_dim dims of each head in fp32, cast back; then (queries) scale by logn.

    x: [T, heads, head_dim]; cos/sin: [T, rotary_dim/2]; logn: [T] or None.
    """
    half = cos.shape[-1]
    rot = x[..., : 2 * half].float()
    x1, x2 = rot[..., :half], rot[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    rotated = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)
    out = torch.cat((rotated, x[..., 2 * half:]), dim=-1) if 2 * half < x.shape[-1] else rotated
    if logn is not None:
        out = out * logn.to(x.dtype)[:, None, None]
    return out
