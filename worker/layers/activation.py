"""SiLU-and-multiply of the merged gate/up projection (worker.ops.silu_mul), fused or reference."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from worker import ops


class SiluAndMul(nn.Module):
    """[T, 2W] = [gate | up] -> up * silu(gate): the fused Triton kernel or the PyTorch reference, picked at
    construction."""

    def __init__(self, fused: bool = False):
        super().__init__()
        self.impl: Callable[[torch.Tensor], torch.Tensor] = ops.silu_mul
        if fused:
            from worker.kernels import fused as kernels

            self.impl = kernels.silu_mul

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        # gate_up: [T, 2W] -> [T, W]
        return self.impl(gate_up)
