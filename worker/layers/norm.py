"""RMSNorm exactly as Qwen v1 (worker.ops.rms_norm), with the residual add before it fused in.

Not sharded: every rank holds the whole weight [H]. `forward(x, residual)` returns (RMSNorm(s), s) with
s = x + residual, so a decoder loop carries the residual stream the same way whichever implementation
runs: the fused Triton kernel (one launch) or the PyTorch reference, picked at construction.

`Deferred` is RMSNorm folded into the linears beside it (DecodeKernels.norm_fold): the linear before computes the
residual add and s * weight, the linear after scales its product's rows by rsqrt(mean(s²) + eps).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from worker import ops
from worker.layers.decode_kernels import DecodeKernels, launched


@dataclass(frozen=True)
class Deferred:
    """RMSNorm(s) = rsqrt(mean(s²) + eps) · (s * weight) with the row scale left to the next linear
    (DecodeKernels.norm_fold): x = rn(s * weight) [T, H], `squares` [T, tiles] fp32 the sums of s² over each tile of
    the row's columns (their sum over a row is the row's), from the producing linear (`_GPTQ.forward_norm`)."""

    x: torch.Tensor
    squares: torch.Tensor
    eps: float


NormFn = Callable[[torch.Tensor, torch.Tensor, float, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor]]


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype, device: torch.device, fused: bool = False):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype, device=device), requires_grad=False)
        self.fused = fused
        self.impl: NormFn = ops.add_rms_norm
        self.pdl = False
        self.set_decode_kernels(DecodeKernels())

    def set_decode_kernels(self, opts: DecodeKernels) -> None:
        """The fused kernel (launched with PDL where opts.pdl) or the reference."""
        if self.fused:
            from worker.kernels import fused as kernels

            self.impl = launched(kernels.rms_norm, opts)
            self.pdl = opts.pdl

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        # x, residual: [T, H] -> (normed [T, H], s = x + residual [T, H])
        return self.impl(x, self.weight, self.eps, residual)

    def with_shrink(
        self, x: torch.Tensor, residual: torch.Tensor | None, a_pool: torch.Tensor, slots: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """forward, plus the next linear's adapter h in fp32 partials per tile (DecodeKernels.lora_norm_shrink;
        the fused path only): a_pool [slots, 1, r_max, H], slots [T] each row's adapter slot."""
        from worker.kernels.lora_norm import rms_norm_shrink

        return rms_norm_shrink(x, self.weight, self.eps, residual, a_pool, slots, self.pdl)
