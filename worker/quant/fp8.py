"""FP8 (e4m3) weights quantized at load: per-output-channel weight scales, per-token activation scales.

Torch only. w ≈ wq · s_w[n] (wq e4m3 [N, K], s_w fp32 [N]); x ≈ xq · s_x[m] (xq e4m3 [M, K], s_x fp32 [M, 1],
computed per step from each token's max |x|). y = (xq · s_x) (wq · s_w)ᵀ (+ bias), accumulated in fp32.
"""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
_TINY = 1e-12  # floor of a scale: an all-zero row quantizes to zeros, never NaN


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [R, C] -> (e4m3 [R, C], fp32 scale [R, 1]) with each row's max |x| mapped to 448."""
    scale = (x.float().abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp_min(_TINY)
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def fp8_matmul_reference(
    x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x [M, K] (any float dtype), wq e4m3 [N, K], w_scale fp32 [N] -> [M, N] in x's dtype: the same
    quantized operands as the CUDA path, dequantized to fp32 and multiplied."""
    xq, xs = quantize_rows(x)
    y = (xq.float() * xs) @ (wq.float() * w_scale[:, None]).t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def fp8_matmul_scaled_mm(
    x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """The CUDA path: torch._scaled_mm with row-wise scales (K and N multiples of 16)."""
    xq, xs = quantize_rows(x)
    return torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=w_scale[None, :].float(), bias=bias, out_dtype=x.dtype)
