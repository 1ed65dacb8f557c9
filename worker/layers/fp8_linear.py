"""Column- and row-parallel linears whose weights are quantized to FP8 (e4m3) at load (`--quantize fp8`).

Sharding is the float layers' own (each loads its bf16/fp16 slice, then quantizes it): one scale per
output channel, so a column shard's scales are its own rows and a row shard's (whole) scales are this
rank's K slice's per-channel maxima. On CUDA, decode batches (M <= 16) run Triton W8A16 kernels (bf16
activations; M = 1 the dense GEMV) and larger ones torch._scaled_mm with a dynamic per-token activation
scale; elsewhere the reference of the latter (same quantized operands, dequantized, fp32 matmul).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from worker.distributed import ParallelContext
from worker.layers.decode_kernels import DecodeKernels
from worker.layers.linear import ColumnParallelLinear, RowParallelLinear
from worker.quant.fp8 import FP8, fp8_matmul_reference, fp8_matmul_scaled_mm, quantize_rows

FP8Matmul = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def fp8_matmul_for(device: torch.device, out_features: int, pdl: bool = False) -> FP8Matmul:
    """CUDA: the dense GEMV up to FP8_GEMV_MAX_M rows (its split-K counters made here, one set per layer),
    the Triton W8A16 kernel up to FP8_TRITON_MAX_M (decode), torch._scaled_mm above (prefill); elsewhere
    the reference. pdl: the GEMV launches with PDL (DecodeKernels.pdl; plainly where it is unavailable)."""
    if device.type != "cuda":
        return fp8_matmul_reference
    try:
        from worker.kernels.fp8_matmul import FP8_GEMV_MAX_M, FP8_TRITON_MAX_M, w8a16_gemv, w8a16_matmul
        from worker.kernels.gemv import counters_for
    except ImportError:
        return fp8_matmul_scaled_mm
    counters = counters_for(out_features, device)

    def matmul(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if x.shape[0] <= FP8_GEMV_MAX_M:
            return w8a16_gemv(x, wq, w_scale, bias, counters, pdl=pdl)
        if x.shape[0] <= FP8_TRITON_MAX_M:
            return w8a16_matmul(x, wq, w_scale, bias)
        return fp8_matmul_scaled_mm(x, wq, w_scale, bias)

    return matmul


class _FP8:
    weight: nn.Parameter
    pctx: ParallelContext
    w_scale: torch.Tensor
    in_features: int
    out_features: int
    matmul: FP8Matmul
    decode_kernels: DecodeKernels
    register_buffer: Callable[..., None]

    def _alloc_fp8(self, device: torch.device) -> None:
        self.weight = nn.Parameter(torch.empty(self.out_features, self.in_features, dtype=FP8, device=device), False)
        self.register_buffer("w_scale", torch.empty(self.out_features, dtype=torch.float32, device=device))
        self.matmul = fp8_matmul_for(device, self.out_features)

    def set_decode_kernels(self, opts: DecodeKernels) -> None:
        """Keep `opts`; the matmul is rebuilt so its decode GEMV launches with PDL where opts.pdl (before capture)."""
        self.decode_kernels = opts
        self.matmul = fp8_matmul_for(self.w_scale.device, self.out_features, opts.pdl)

    def _store_fp8(self, w: torch.Tensor) -> None:
        wq, scale = quantize_rows(w)  # [out, in] e4m3, [out, 1]
        self.weight.data.copy_(wq)
        self.w_scale.copy_(scale[:, 0])


class FP8ColumnParallelLinear(_FP8, ColumnParallelLinear):
    """ColumnParallelLinear with e4m3 weights [out_per_rank, in] and fp32 scales [out_per_rank]."""

    def allocate(self, dtype: torch.dtype) -> None:
        self._alloc_fp8(self.pctx.device)

    def store(self, w: torch.Tensor, b: torch.Tensor | None) -> None:
        self._store_fp8(w)
        if self.bias is not None and b is not None:
            self.bias.data.copy_(b)

    def forward(self, x: torch.Tensor, ctx: object = None) -> torch.Tensor:
        return self.matmul(x, self.weight, self.w_scale, self.bias)  # [T, out_per_rank]


class FP8RowParallelLinear(_FP8, RowParallelLinear):
    """RowParallelLinear with e4m3 weights [out, in_per_rank] and fp32 scales [out] (of this rank's slice)."""

    def allocate(self, dtype: torch.dtype) -> None:
        self._alloc_fp8(self.pctx.device)

    def store(self, w: torch.Tensor, b: torch.Tensor | None) -> None:
        self._store_fp8(w)
        if self.bias is not None and b is not None:
            self.bias.data.copy_(b)

    def partial(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.weight, self.w_scale, None)  # [T, out]
