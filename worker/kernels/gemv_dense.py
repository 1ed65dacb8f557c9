"""Triton GEMV of a dense weight [N, K] for decode batches (M <= 16): bf16/fp16 linears where it beats cuBLAS
(`dense_tiles`), and e4m3 weights with a scale per output row (worker/kernels/fp8_matmul.py).

M = 1 accumulates x · w elementwise in a [BLOCK_N, BLOCK_K] fp32 tile and reduces it once after the loop
(no shuffles per tile), the next tile's load in flight while this one is multiplied; M > 1 uses tl.dot.
Split-K and its fused, deterministic reduction are worker/kernels/gemv.py's.

Two opt-in candidates for the batch-1 decode floor (issue 17, P1; default off until the GPU check
scripts/gpu_check_p1.py shows them faster): `act` reads x as [gate | up] and applies up * silu(gate) while loading
it (fused.silu_mul_rn, rounded as the separate kernel, so the result equals dense_gemv(silu_mul(x)) bit for bit)
for mlp.c_proj, and `pdl` launches with programmatic dependent launch (worker/kernels/pdl.py): the first weight
tile is loaded before waiting for the previous kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from worker.kernels.fused import silu_mul_rn
from worker.kernels.gemv import GemvTiles, _finish, _plan, counters_for
from worker.kernels.pdl import active, gdc_go, gdc_wait, launch_options

DENSE = GemvTiles(block_n=32, block_k=256, num_warps=4, num_stages=3)  # block_k: columns
DENSE_PF0 = GemvTiles(block_n=32, block_k=256, num_warps=4, num_stages=3, prefetch=False)
DENSE_N64 = GemvTiles(block_n=64, block_k=128, num_warps=4, num_stages=3)
# (K, N) per rank -> (largest M, tiles) in increasing M where dense_gemv beat cuBLAS (M <= 8); every other
# shape and M stays on F.linear. Measured on an H200 on 2026-11-29 (Triton 3.6, weights cycled past L2,
# scripts/gpu_check_gemv.py), Qwen-7B at TP 1:
# - c_attn 4096 x 12288: M = 1 27.8 vs 29.7 us, M = 8 27.4 vs 29.3 us.
# - w2|w1 4096 x 22016: M = 1 (no prefetch) 46.0 vs 47.7 us; M = 8 with 64 x 128 tiles 45.1 vs 47.6 us.
# - attn.c_proj 4096 x 4096 and mlp.c_proj 11008 x 4096: cuBLAS as fast or faster (14.1 vs 13.7, 30.2 vs 28.5).
DENSE_GEMV_PLAN: dict[tuple[int, int], tuple[tuple[int, GemvTiles], ...]] = {
    (4096, 12288): ((8, DENSE_PF0),),
    (4096, 22016): ((1, DENSE_PF0), (8, DENSE_N64)),
}


def dense_tiles(k: int, n: int, m: int) -> GemvTiles | None:
    """The GEMV's tiles for x [m, k] · w [n, k]ᵀ where measured faster than cuBLAS, else None."""
    for max_m, tiles in DENSE_GEMV_PLAN.get((k, n), ()):
        if m <= max_m:
            return tiles
    return None


def act_tiles(k: int, n: int, m: int) -> GemvTiles:
    """The act GEMV's tiles (DecodeKernels.act_gemv): the plan's where it has the shape, else DENSE (M = 1,
    prefetching) or DENSE_N64 (M > 1); not measured yet (scripts/gpu_check_p1.py)."""
    return dense_tiles(k, n, m) or (DENSE if m == 1 else DENSE_N64)


# fmt: off
@triton.jit
def _x_tile(x_ptr, offs_m, offs_k, k_hi, M, K, stride_xm, ACT: tl.constexpr, LIBDEVICE: tl.constexpr,
            BLOCK_M: tl.constexpr):
    """x [BLOCK_M, len(offs_k)] ([len(offs_k)] when BLOCK_M is 1) in x's dtype (0 outside); ACT: up * silu(gate)
    of x = [gate | up] ([M, 2K])."""
    if BLOCK_M == 1:
        ptrs = x_ptr + offs_k
        mask = offs_k < k_hi
    else:
        ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]
        mask = (offs_m < M)[:, None] & (offs_k < k_hi)[None, :]
    x = tl.load(ptrs, mask=mask, other=0.0)
    if ACT:
        x = silu_mul_rn(x, tl.load(ptrs + K, mask=mask, other=0.0), LIBDEVICE)
    return x


@triton.jit
def _dense_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, part_ptr, cnt_ptr, M, N, K, K_PER_SPLIT, SPLITS, stride_xm,
                  stride_wn, stride_ym, HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, REDUCE: tl.constexpr,
                  PREFETCH: tl.constexpr, STAGES: tl.constexpr, ACT: tl.constexpr, LIBDEVICE: tl.constexpr,
                  PDL: tl.constexpr,
                  DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """w [N, K] (nn.Linear's layout, K contiguous; bf16/fp16/fp32 or e4m3 with a scale per row), split-K."""
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    mask_n = offs_n < N
    cols = tl.arange(0, BLOCK_K)
    k_lo = pid_k * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
    w_rows = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn
    if BLOCK_M == 1:
        acc2 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)  # reduced over K once, after the loop
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if PREFETCH:
        nxt = tl.load(w_rows + (k_lo + cols)[None, :], mask=mask_n[:, None] & (k_lo + cols < k_hi)[None, :], other=0.0)
    else:
        nxt = tl.zeros([BLOCK_N, BLOCK_K], dtype=w_ptr.dtype.element_ty)
    gdc_wait(PDL)  # PDL: only the (constant) weights were read before the previous kernel finished
    gdc_go(PDL)
    for k0 in tl.range(k_lo, k_hi, BLOCK_K, num_stages=STAGES):  # STAGES > 1: cp.async ring in shared memory
        offs_k = k0 + cols
        if PREFETCH:  # the next tile in flight (registers) while this one is multiplied
            w = nxt
            nk = offs_k + BLOCK_K
            nxt = tl.load(w_rows + nk[None, :], mask=mask_n[:, None] & (nk < k_hi)[None, :], other=0.0)
        else:
            w = tl.load(w_rows + offs_k[None, :], mask=mask_n[:, None] & (offs_k < k_hi)[None, :], other=0.0)
        x = _x_tile(x_ptr, offs_m, offs_k, k_hi, M, K, stride_xm, ACT, LIBDEVICE, BLOCK_M)
        if BLOCK_M == 1:
            acc2 += w.to(tl.float32) * x.to(tl.float32)[None, :]
        else:
            acc += tl.dot(x, tl.trans(w.to(x.dtype)), input_precision=DOT_PRECISION)
    if BLOCK_M == 1:
        acc = tl.sum(acc2, axis=1)[None, :]
    if HAS_SCALE:
        acc = acc * tl.load(s_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    _finish(acc, b_ptr, y_ptr, part_ptr, cnt_ptr, pid_n, pid_k, M, N, SPLITS, stride_ym, offs_m, offs_n,
            HAS_BIAS, REDUCE)
# fmt: on


def dense_gemv(
    x: torch.Tensor,  # [M <= 16, K]
    weight: torch.Tensor,  # [N, K]
    bias: torch.Tensor | None = None,
    counters: torch.Tensor | None = None,
    tiles: GemvTiles = DENSE,
    split_k: int | None = None,
    scale: torch.Tensor | None = None,  # [N] fp32: weight row n's scale (e4m3 weights)
    act: bool = False,
    pdl: bool = False,
) -> torch.Tensor:
    """F.linear(x, weight · scale, bias) for decode batches, fp32 accumulation; counters: `counters_for(N)` kept
    by the caller (None: zeroed per call). act: x is [M, 2K] = [gate | up] and the input is fused.silu_mul(x);
    pdl: programmatic dependent launch (a no-op where worker/kernels/pdl.py says it is unavailable)."""
    M, K = x.shape[0], x.shape[1] // 2 if act else x.shape[1]
    N = weight.shape[0]
    if M > 16 or weight.shape[1] != K or weight.stride(1) != 1 or (act and x.shape[1] != 2 * K):
        raise ValueError(
            f"x {list(x.shape)} for a GEMV with a weight of {list(weight.shape)} (act {act}; M <= 16, rows contiguous)"
        )
    x = x.contiguous()
    on = active(pdl, x.device)
    split_k, k_per_split, y, part = _plan(x, N, K, tiles, split_k)
    _dense_kernel[(triton.cdiv(N, tiles.block_n), split_k)](
        x, weight, scale if scale is not None else weight, bias if bias is not None else weight, y, part,
        counters if counters is not None else counters_for(N, x.device), M, N, K, k_per_split, split_k,
        x.stride(0), weight.stride(0), y.stride(0), HAS_SCALE=scale is not None, HAS_BIAS=bias is not None,
        REDUCE=split_k > 1,
        PREFETCH=tiles.prefetch and M == 1, STAGES=1 if tiles.prefetch and M == 1 else tiles.num_stages,
        ACT=act, LIBDEVICE=not _INTERPRETED, PDL=on,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        BLOCK_M=1 if M == 1 else 16, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages, **launch_options(on),
    )  # fmt: skip
    return y


_INTERPRETED = not isinstance(_dense_kernel, triton.runtime.JITFunction)  # no libdevice under the interpreter
