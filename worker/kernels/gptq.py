"""Triton W4A16 / W8A16 GPTQ matmuls: y [M, N] = x [M, K] · dequant(qweight) (+ bias), fp32 accumulation.

One kernel, two launch shapes:
  decode (M <= 16): split-K GEMV. grid (1, N tiles, K splits); M = 1 multiplies and reduces in fp32 (no
          tensor cores needed for a memory-bound GEMV), 2..16 rows use tl.dot on a 16-row tile. Each split
          writes an fp32 plane, the planes are summed once (deterministic: no atomics).
  prefill (M > 16): tiled GEMM. grid (M tiles, N tiles, 1), the whole K per program, tl.dot, output in x's
          dtype with the bias fused. gptq_matmul instead dequantizes W into x's dtype (one launch of the same
          per-tile dequantization) and calls cuBLAS there: measured faster at every M above 16.
Dequantization is fused: a qweight word holds P = 32 / bits rows of a column (row r·P + j in bits
[bits·j, bits·(j+1))); each row's group comes from g_idx (act order, or a row-parallel shard whose rows are
not whole groups), or, when the rows of a K tile are known to share one group (GROUP_SIZE > 0: no act
order, tiles aligned to groups), from (K_OFFSET + k) // GROUP_SIZE with one zero/scale load per column.
The PyTorch reference is worker/kernels/gptq_reference.py; tests compare the two on awkward shapes.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from worker.kernels.gptq_reference import gptq_matmul_reference
from worker.quant.gptq_format import check_tiles

__all__ = [
    "GemmTiles",
    "gptq_dequant_mm",
    "gptq_dequantize",
    "gptq_gemm",
    "gptq_gemv",
    "gptq_matmul",
    "gptq_matmul_reference",
    "split_k_for",
]


# fmt: off
@triton.jit
def _dequant_tile(qw_ptr, qz_ptr, s_ptr, g_ptr, k0, k_hi, offs_n, mask_n, N, K_OFFSET, CHUNKS, BITS: tl.constexpr,
                  ZERO_OFFSET: tl.constexpr, GROUP_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  TILED: tl.constexpr):
    """Rows k0 .. k0 + BLOCK_K (those below k_hi) of W for columns offs_n, (q - z) · s in fp32 [BK, BN]. TILED: the
    words in gptq_format.tile_words' layout (Int4; CHUNKS: K / 128)."""
    P: tl.constexpr = 32 // BITS
    MAXQ: tl.constexpr = (1 << BITS) - 1
    zero_shift = (offs_n % P) * BITS  # [BN]
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask_k = offs_k < k_hi
    mask_kn = mask_k[:, None] & mask_n[None, :]
    # each word once: [BK/P, BN] words -> [BK/P, P, BN] values -> [BK, BN] (row kw·P + j)
    offs_kw = k0 // P + tl.arange(0, BLOCK_K // P)
    mask_w = (offs_kw[:, None] * P < k_hi) & mask_n[None, :]
    if TILED:  # word (r, n) at ((n // 32 · K / 128 + r // 16) · 4 + r % 16 // 4) · 128 + (n % 32 // 4 · 4 + r % 4)
        #        · 4 + n % 4
        r, n = offs_kw[:, None], offs_n[None, :]
        offs_w = ((n // 32 * CHUNKS + r // 16) * 4 + r % 16 // 4) * 128 + (n % 32 // 4 * 4 + r % 4) * 4 + n % 4
    else:
        offs_w = offs_kw[:, None] * N + offs_n[None, :]
    words = tl.load(qw_ptr + offs_w, mask=mask_w, other=0)
    q = (words[:, None, :] >> (tl.arange(0, P) * BITS)[None, :, None]) & MAXQ
    q = tl.reshape(q, (BLOCK_K, BLOCK_N))
    if GROUP_SIZE > 0:  # the tile's rows share one group: one zero and scale per column
        g = (K_OFFSET + k0) // GROUP_SIZE
        zw = tl.load(qz_ptr + g * (N // P) + offs_n // P, mask=mask_n, other=0)  # [BN]
        z = ((zw >> zero_shift) & MAXQ) + ZERO_OFFSET
        s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        w = (q - z[None, :]).to(tl.float32) * s[None, :]
    else:  # each row's group through g_idx
        gk = tl.load(g_ptr + offs_k, mask=mask_k, other=0)  # [BK]
        zw = tl.load(qz_ptr + gk[:, None] * (N // P) + offs_n[None, :] // P, mask=mask_kn, other=0)
        z = ((zw >> zero_shift[None, :]) & MAXQ) + ZERO_OFFSET
        s = tl.load(s_ptr + gk[:, None] * N + offs_n[None, :], mask=mask_kn, other=0.0).to(tl.float32)
        w = (q - z).to(tl.float32) * s
    return w


@triton.jit
def _gptq_kernel(x_ptr, qw_ptr, qz_ptr, s_ptr, g_ptr, b_ptr, y_ptr, M, N, K, K_PER_SPLIT, K_OFFSET,
                 stride_xm, stride_ym, stride_ys,
                 BITS: tl.constexpr, ZERO_OFFSET: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 TILED: tl.constexpr):
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
        w = _dequant_tile(qw_ptr, qz_ptr, s_ptr, g_ptr, k0, k_hi, offs_n, mask_n, N, K_OFFSET, K // 128, BITS,
                          ZERO_OFFSET, GROUP_SIZE, BLOCK_N, BLOCK_K, TILED)
        if BLOCK_M == 1:
            x1 = tl.load(x_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)  # [BK]
            acc1 += tl.sum(x1[:, None] * w, axis=0)
        else:
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # [BM, BK]
            acc += tl.dot(x, w.to(x.dtype), input_precision=DOT_PRECISION)
    if BLOCK_M == 1:
        acc = acc1[None, :]
    if HAS_BIAS:
        if pid_k == 0:
            acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y = y_ptr + pid_k * stride_ys + offs_m[:, None] * stride_ym + offs_n[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _dequant_kernel(qw_ptr, qz_ptr, s_ptr, g_ptr, w_ptr, N, K, K_OFFSET, BITS: tl.constexpr, ZERO_OFFSET: tl.constexpr,
                    GROUP_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TILED: tl.constexpr):
    """W [K, N] in w's dtype: one [BLOCK_K, BLOCK_N] tile a program, each value rounded once."""
    k0 = tl.program_id(0) * BLOCK_K
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    w = _dequant_tile(qw_ptr, qz_ptr, s_ptr, g_ptr, k0, K, offs_n, mask_n, N, K_OFFSET, K // 128, BITS, ZERO_OFFSET,
                      GROUP_SIZE, BLOCK_N, BLOCK_K, TILED)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    tl.store(w_ptr + offs_k[:, None] * N + offs_n[None, :], w.to(w_ptr.dtype.element_ty),
             mask=(offs_k < K)[:, None] & mask_n[None, :])
# fmt: on


@dataclass(frozen=True)
class GemmTiles:
    block_m: int = 64
    block_n: int = 64
    block_k: int = 32
    num_warps: int = 4
    num_stages: int = 2


DECODE = GemmTiles(block_m=16, block_n=64, block_k=64, num_warps=4, num_stages=2)


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def split_k_for(n: int, k: int, block_n: int, block_k: int, device: torch.device) -> int:
    """K splits that give ~4 programs per SM (1 off CUDA), each split a whole number of K tiles."""
    if device.type != "cuda":
        return 1
    n_tiles = triton.cdiv(n, block_n)
    k_tiles = triton.cdiv(k, block_k)
    return max(1, min(k_tiles, 4 * _sm_count(device.index or 0) // n_tiles))


def _group_size_const(g_idx: torch.Tensor, group_size: int, k_offset: int, block_k: int, k_per_split: int) -> int:
    """GROUP_SIZE for the kernel: group_size when every K tile lies inside one group, else 0 (g_idx)."""
    if group_size <= 0 or group_size % block_k or k_offset % block_k or k_per_split % block_k:
        return 0
    return group_size


def _launch(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    zero_offset: int,
    bias: torch.Tensor | None,
    tiles: GemmTiles,
    split_k: int,
    group_size: int,
    k_offset: int,
    tiled: bool = False,
) -> torch.Tensor:
    M, K = x.shape
    N = qweight.shape[1]
    if K != qweight.shape[0] * (32 // bits) or tiles.block_k % (32 // bits):
        raise ValueError(
            f"x has {K} columns for {qweight.shape[0]} words of {32 // bits} rows (block_k {tiles.block_k})"
        )
    if tiled:
        check_tiles(qweight, bits)
    x = x.contiguous()
    k_per_split = triton.cdiv(triton.cdiv(K, split_k), tiles.block_k) * tiles.block_k
    split_k = triton.cdiv(K, k_per_split)
    gs = _group_size_const(g_idx, group_size, k_offset, tiles.block_k, k_per_split)
    planes = split_k > 1
    y = torch.empty(
        (split_k, M, N) if planes else (1, M, N), device=x.device, dtype=torch.float32 if planes else x.dtype
    )
    grid = (triton.cdiv(M, tiles.block_m), triton.cdiv(N, tiles.block_n), split_k)
    _gptq_kernel[grid](
        x, qweight, qzeros, scales, g_idx, bias if bias is not None else scales, y,
        M, N, K, k_per_split, k_offset, x.stride(0), y.stride(1), y.stride(0),
        BITS=bits, ZERO_OFFSET=zero_offset, GROUP_SIZE=gs, HAS_BIAS=bias is not None,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",  # fp32 stays fp32 (no TF32)
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, TILED=tiled,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )  # fmt: skip
    return y.sum(0).to(x.dtype) if planes else y[0]


def gptq_gemv(
    x: torch.Tensor,  # [M <= 16, K]
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    zero_offset: int = 1,
    bias: torch.Tensor | None = None,
    split_k: int | None = None,
    group_size: int = 0,
    k_offset: int = 0,
    tiles: GemmTiles = DECODE,
    tiled: bool = False,
) -> torch.Tensor:
    """Decode: split-K (split_k None: ~4 programs per SM). group_size > 0 promises g_idx[k] == (k_offset +
    k) // group_size (no act order), letting aligned tiles read one zero/scale row. tiled: qweight in
    gptq_format.tile_words' layout (Int4)."""
    M, K = x.shape
    if M == 1:
        tiles = GemmTiles(1, tiles.block_n, tiles.block_k, tiles.num_warps, tiles.num_stages)
    if split_k is None:
        split_k = split_k_for(qweight.shape[1], K, tiles.block_n, tiles.block_k, x.device)
    return _launch(
        x, qweight, qzeros, scales, g_idx, bits, zero_offset, bias, tiles, split_k, group_size, k_offset, tiled
    )


def gptq_gemm(
    x: torch.Tensor,  # [M, K]
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    zero_offset: int = 1,
    bias: torch.Tensor | None = None,
    group_size: int = 0,
    k_offset: int = 0,
    tiles: GemmTiles | None = None,
    tiled: bool = False,
) -> torch.Tensor:
    """Prefill: tiled GEMM over the whole K, bias fused, output in x's dtype."""
    if tiles is None:
        tiles = GemmTiles(block_m=64 if x.shape[0] <= 64 else 128, block_n=128, block_k=32, num_warps=8, num_stages=3)
    return _launch(x, qweight, qzeros, scales, g_idx, bits, zero_offset, bias, tiles, 1, group_size, k_offset, tiled)


def gptq_dequantize(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    zero_offset: int = 1,
    group_size: int = 0,
    k_offset: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    block_k: int = 64,
    block_n: int = 128,
    tiled: bool = False,
) -> torch.Tensor:
    """W [K, N] in `dtype`, the reference's `dequantize` (each value (q - z) · s in fp32, rounded once) in one launch;
    group_size / k_offset / tiled: as gptq_gemv's."""
    P = 32 // bits
    K, N = qweight.shape[0] * P, qweight.shape[1]
    if block_k % P:
        raise ValueError(f"gptq_dequantize: block_k {block_k} is not a whole number of {P}-row words")
    if tiled:
        check_tiles(qweight, bits)
    w = torch.empty(K, N, dtype=dtype, device=qweight.device)
    gs = _group_size_const(g_idx, group_size, k_offset, block_k, block_k)
    grid = (triton.cdiv(K, block_k), triton.cdiv(N, block_n))
    _dequant_kernel[grid](
        qweight, qzeros, scales, g_idx, w, N, K, k_offset, BITS=bits, ZERO_OFFSET=zero_offset, GROUP_SIZE=gs,
        BLOCK_N=block_n, BLOCK_K=block_k, TILED=tiled, num_warps=4,
    )  # fmt: skip
    return w


def gptq_dequant_mm(
    x: torch.Tensor,  # [M, K]
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    zero_offset: int = 1,
    bias: torch.Tensor | None = None,
    group_size: int = 0,
    k_offset: int = 0,
    tiled: bool = False,
) -> torch.Tensor:
    """Prefill-sized M: W dequantized once into x's dtype (gptq_dequantize), then cuBLAS: the reference's W and its
    matmul, then its bias add (so the same values as gptq_matmul_reference), at the dense GEMM's rate (the
    dequantization reads a quarter (Int4) of the bytes the GEMM then reads). The bias in cuBLAS's epilogue instead
    rounds once where the reference rounds twice: a 2-layer 7B-width model's logits then differed from the
    reference path by one bf16 ulp, so the add stays separate."""
    w = gptq_dequantize(qweight, qzeros, scales, g_idx, bits, zero_offset, group_size, k_offset, x.dtype, tiled=tiled)
    y = x @ w
    return y if bias is None else y + bias


def gptq_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    zero_offset: int = 1,
    bias: torch.Tensor | None = None,
    group_size: int = 0,
    k_offset: int = 0,
    tiled: bool = False,
) -> torch.Tensor:
    """x [M, K] -> [M, N]: the split-K GEMV for M <= 16, above that W dequantized then cuBLAS (gptq_dequant_mm; the
    layers' entry point on CUDA). On the H200 (7B linears, scripts/bench_quant.py --only linears) dequantize + cuBLAS
    beat the tiled GEMM (gptq_gemm) at every M from 24 to 8,192, 1.3-2.9x (mlp.c_proj at M = 32: 107 vs 267 us;
    at 8,192 all four linears within 2-10 % of bf16 cuBLAS), and split K at M >= 32 on the sum of the four."""
    args = (x, qweight, qzeros, scales, g_idx, bits, zero_offset, bias)
    if x.shape[0] <= 16:
        return gptq_gemv(*args, group_size=group_size, k_offset=k_offset, tiled=tiled)
    return gptq_dequant_mm(*args, group_size=group_size, k_offset=k_offset, tiled=tiled)
