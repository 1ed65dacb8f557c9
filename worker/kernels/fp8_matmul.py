"""Triton W8A16 FP8 matmul for small batches: y [M, N] = (x [M, K] · dequant(wq)ᵀ) · s_w (+ bias).

wq e4m3 [N, K] with one fp32 scale per output channel (worker/quant/fp8.py); activations stay in their own
dtype (bf16), weights are converted in registers, fp32 accumulation, split-K GEMV planes summed once (as in
worker/kernels/gptq.py). torch._scaled_mm (e4m3 activations too) serves larger M; the layer picks by M
(`FP8_TRITON_MAX_M`; scripts/bench_quant.py --only linears times both per shape). The PyTorch reference
with bf16 activations is `w8a16_reference`.

H200, 2026-11-29 (Triton 3.6, weights cycled past L2): this kernel beat torch._scaled_mm on every 7B shape at
M = 1 (c_attn 33.7 vs 43.2 us, attn.c_proj 13.2 vs 31.0, w2|w1 56.8 vs 65.2, mlp.c_proj 26.7 vs 53.6) and
M = 8 but w2|w1 (63.4 vs 62.4), so the Triton path stays. It read only 1.1-1.7 TB/s, so M <= FP8_GEMV_MAX_M
takes `w8a16_gemv` instead: worker/kernels/gemv_dense.py's GEMV (the bf16 one that reached 3.6 TB/s) reading
e4m3 rows; "splitk" in `FP8_GEMV_TILES` names this kernel, for the GPU check to compare.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from worker.kernels.gemv import GemvTiles
from worker.kernels.gemv_dense import dense_gemv
from worker.kernels.gptq import split_k_for

FP8_TRITON_MAX_M = 16
FP8_GEMV_MAX_M = 1
FP8_GEMV_TILES: dict[str, GemvTiles | None] = {  # block_k: columns (bytes) per tile row
    "n32k512w8": GemvTiles(block_n=32, block_k=512, num_warps=8),
    "n32k256w4": GemvTiles(block_n=32, block_k=256, num_warps=4),
    "n32k512pf0": GemvTiles(block_n=32, block_k=512, num_warps=8, prefetch=False),  # no spills (sm_90)
    "n16k1024w8": GemvTiles(block_n=16, block_k=1024, num_warps=8),
    "splitk": None,  # the split-K kernel below (`w8a16_matmul`)
}
# fastest on all four 7B shapes at M = 1 on the H200 (2026-11-29, scripts/gpu_check_gemv.py): c_attn 18.4 us vs
# 32.8 for n16k1024w8 and 29.3 for bf16 cuBLAS; attn.c_proj 10.2 / 18.0 / 12.8; w2|w1 28.0 / 57.6 / 51.5;
# mlp.c_proj 17.6 / 32.5 / 28.1. No spills on sm_90 (scripts/gemv_compile.py).
FP8_GEMV_DEFAULT = "n32k512pf0"


# fmt: off
@triton.jit
def _w8a16_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, M, N, K, K_PER_SPLIT, stride_xm, stride_wn, stride_ym, stride_ys,
                  HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, offs_n < N
    k_lo = pid_k * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
    if BLOCK_M == 1:
        acc1 = tl.zeros([BLOCK_N], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_hi
        w = tl.load(w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None],
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0).to(tl.float32)  # [BK, BN]
        if BLOCK_M == 1:
            x1 = tl.load(x_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
            acc1 += tl.sum(x1[:, None] * w, axis=0)
        else:
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            acc += tl.dot(x, w.to(x.dtype), input_precision=DOT_PRECISION)
    if BLOCK_M == 1:
        acc = acc1[None, :]
    acc = acc * tl.load(s_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
    if HAS_BIAS:
        if pid_k == 0:
            acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y = y_ptr + pid_k * stride_ys + offs_m[:, None] * stride_ym + offs_n[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])
# fmt: on


def w8a16_reference(
    x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x [M, K] · (wq [N, K] in fp32 · w_scale [N])ᵀ (+ bias), in fp32, rounded once to x's dtype."""
    y = (x.float() @ wq.float().t()) * w_scale.float()
    return (y if bias is None else y + bias.float()).to(x.dtype)


def w8a16_matmul(
    x: torch.Tensor,
    wq: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    split_k: int | None = None,
    block_n: int = 64,
    block_k: int = 64,
) -> torch.Tensor:
    """The Triton kernel (M <= 16 expected: a GEMV; M = 1 reduces in fp32 without tensor cores)."""
    M, K = x.shape
    N = wq.shape[0]
    x = x.contiguous()
    block_m = 1 if M == 1 else 16
    if split_k is None:
        split_k = split_k_for(N, K, block_n, block_k, x.device)
    k_per_split = triton.cdiv(triton.cdiv(K, split_k), block_k) * block_k
    split_k = triton.cdiv(K, k_per_split)
    planes = split_k > 1
    y = torch.empty((split_k, M, N), device=x.device, dtype=torch.float32 if planes else x.dtype)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n), split_k)
    _w8a16_kernel[grid](
        x, wq, w_scale, bias if bias is not None else w_scale, y, M, N, K, k_per_split,
        x.stride(0), wq.stride(0), y.stride(1), y.stride(0),
        HAS_BIAS=bias is not None, DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4, num_stages=2,
    )  # fmt: skip
    return y.sum(0).to(x.dtype) if planes else y[0]


def w8a16_gemv(
    x: torch.Tensor,
    wq: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    counters: torch.Tensor | None = None,
    tiles: str = FP8_GEMV_DEFAULT,
    pdl: bool = False,
) -> torch.Tensor:
    """`w8a16_matmul` for decode batches through the dense GEMV (`counters`: `counters_for(N)` kept by the
    caller; None: zeroed per call); tiles names an entry of FP8_GEMV_TILES."""
    t = FP8_GEMV_TILES[tiles]
    if t is None:
        return w8a16_matmul(x, wq, w_scale, bias)
    return dense_gemv(x, wq, bias, counters, t, scale=w_scale, pdl=pdl)
