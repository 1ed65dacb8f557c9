"""SiLU-and-multiply of the merged gate/up projection (worker.ops.silu_mul), fused or reference."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from worker import ops
from worker.layers.decode_kernels import DecodeKernels, launched


class SiluAndMul(nn.Module):
    """[T, 2W] = [gate | up] -> up * silu(gate): the fused Triton kernel or the PyTorch reference, picked at
    construction."""

    def __init__(self, fused: bool = False):
        super().__init__()
        self.fused = fused
        self.impl: Callable[[torch.Tensor], torch.Tensor] = ops.silu_mul
        self.set_decode_kernels(DecodeKernels())

    def set_decode_kernels(self, opts: DecodeKernels) -> None:
        """The fused kernel (launched with PDL where opts.pdl) or the reference."""
        if self.fused:
            from worker.kernels import fused as kernels

            self.impl = launched(kernels.silu_mul, opts)

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        # gate_up: [T, 2W] -> [T, W]
        return self.impl(gate_up)
