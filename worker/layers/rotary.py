"""Qwen v1 rotary embedding (GPT-NeoX rotate-half) with per-sequence dynamic NTK and logn scaling.

The maths is in worker.ops: each token's cos/sin come from its sequence's NTK alpha
(fixed at prefill), and the query of the token at position p is scaled by log(p + 1) / log(S) past
S = seq_length. The ForwardContext holds the step's tables; `Rotary` applies them to q and k.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from worker.layers.decode_kernels import DecodeKernels, launched
from worker.ops import ntk_alpha, rotary_qk

__all__ = ["Rotary", "ntk_alpha"]  # ntk_alpha: the batch builder fixes each prompt's alpha with it

RotaryFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor]
]


class Rotary(nn.Module):
    """(q, k) -> (RoPE(q) × logn, RoPE(k)): the fused Triton kernel (in place, inside qkv) or the PyTorch
    reference (new tensors), picked at construction."""

    def __init__(self, fused: bool = False):
        super().__init__()
        self.fused = fused
        self.impl: RotaryFn = rotary_qk
        self.set_decode_kernels(DecodeKernels())

    def set_decode_kernels(self, opts: DecodeKernels) -> None:
        """The fused kernel (launched with PDL where opts.pdl) or the reference."""
        self.opts = opts
        if self.fused:
            from worker.kernels import fused as kernels

            self.impl = launched(kernels.rotary, opts)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, logn: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # q, k: [T, heads, head_dim]; cos, sin: [T, rotary_dim/2] fp32; logn: [T] fp32 or None
        return self.impl(q, k, cos, sin, logn)

    def stores(self, q: torch.Tensor, k_cache: torch.Tensor, scaled: bool) -> bool:
        """Whether `rotate_and_store` serves this cache (DecodeKernels.rope_store: fused, unscaled, q's dtype)."""
        return self.opts.rope_store and self.fused and not scaled and k_cache.dtype == q.dtype

    def rotate_and_store(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        logn: torch.Tensor | None,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slots: torch.Tensor,
    ) -> None:
        """forward(q, k, ...) in place, then k and v into their cache slots: one kernel (kernels/rope_store.py)."""
        from worker.kernels.rope_store import rotary_store_

        rotary_store_(q, k, v, cos, sin, logn, k_cache, v_cache, slots, self.opts.pdl)
