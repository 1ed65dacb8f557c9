"""Triton W4A16 / W8A16 GPTQ matmuls: y [M, N] = x [M, K] · dequant(qweight) (+ bias), fp32 accumulation.

One kernel, two launch shapes; every K loop is `tl.range(..., num_stages=NUM_STAGES)`, so its loads are
software-pipelined (cp.async) even without a tl.dot:
  decode (M <= 16): split-K GEMV, grid (M tiles, N tiles, K splits). Either the FMA GEMV (block_m 1: one x
          row per program, no tensor cores, a [BK/P, BN] fp32 accumulator reduced over K once at the end), or
          tl.dot on a 16-row tile (M = 1 padded with masked rows). The splits write fp32 planes summed in a
          fixed order by one small kernel (bias and the cast fused), or fp32-atomic_add into a zeroed buffer.
          The knobs are GemmTiles'; decode_tiles picks them per shape from DECODE_TABLE (filled from
          `scripts/bench_quant.py --only sweep`), else DECODE_M1 / DECODE.
  prefill (M > 16): tiled GEMM. grid (M tiles, N tiles, 1), the whole K per program, tl.dot, output in x's
          dtype with the bias fused.
Dequantization is fused: a qweight word holds P = 32 / bits rows of a column (row r·P + j in bits
[bits·j, bits·(j+1))); each row's group comes from g_idx (act order, or a row-parallel shard whose rows are
not whole groups), or, when the rows of a K tile are known to share one group (GROUP_SIZE > 0: no act
order, tiles aligned to groups), from (K_OFFSET + k) // GROUP_SIZE with one zero/scale load per column,
and then zero and scale apply once per tile: sum_k x_k (q_k − z) s = s (sum_k x_k q_k − z sum_k x_k), the
integers q made exact floats without an int->float conversion ((q | 0x4B000000) as fp32 is 2^23 + q).
The PyTorch reference is worker/kernels/gptq_reference.py; tests compare the two on awkward shapes.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from worker.kernels.gptq_reference import gptq_matmul_reference

__all__ = [
    "DECODE",
    "DECODE_M1",
    "DECODE_TABLE",
    "GemmTiles",
    "decode_tiles",
    "gptq_gemm",
    "gptq_gemv",
    "gptq_matmul",
    "gptq_matmul_reference",
    "split_k_for",
]


# fmt: off
@triton.jit
def _gptq_kernel(x_ptr, qw_ptr, qz_ptr, s_ptr, g_ptr, b_ptr, y_ptr, o_ptr, cnt_ptr, M, N, K, K_PER_SPLIT,
                 K_OFFSET, stride_xm, stride_ym, stride_ys,
                 BITS: tl.constexpr, ZERO_OFFSET: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 NUM_STAGES: tl.constexpr, ATOMIC: tl.constexpr, SERIAL: tl.constexpr,
                 BIAS_LAST: tl.constexpr):
    P: tl.constexpr = 32 // BITS
    HALF: tl.constexpr = P // 2  # values per 16-bit half word
    MAXQ: tl.constexpr = (1 << BITS) - 1
    BKW: tl.constexpr = BLOCK_K // P  # qweight rows (words) per K tile
    MAGIC: tl.constexpr = 0x4B000000  # the bits of 2^23 as fp32: (v | MAGIC) as fp32 is 2^23 + v for v < 2^23
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, offs_n < N
    zero_shift = (offs_n % P) * BITS  # [BN]
    k_lo = pid_k * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
    if BLOCK_M == 1:  # FMA GEMV (no tensor cores): a [BKW, BN] accumulator, reduced over K once at the end
        acc2 = tl.zeros([BKW, BLOCK_N], dtype=tl.float32)
        zacc = tl.zeros([BLOCK_N], dtype=tl.float32)
        x_row = x_ptr + pid_m * stride_xm
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in tl.range(k_lo, k_hi, BLOCK_K, num_stages=NUM_STAGES):  # pipelined (cp.async) loads
        offs_kw = k0 // P + tl.arange(0, BKW)
        mask_w = (offs_kw[:, None] * P < k_hi) & mask_n[None, :]
        words = tl.load(qw_ptr + offs_kw[:, None] * N + offs_n[None, :], mask=mask_w, other=0,
                        eviction_policy="evict_first")  # [BKW, BN], each word read once, coalesced along N
        if GROUP_SIZE > 0:  # the tile's rows share one group: one zero and scale per column
            g = (K_OFFSET + k0) // GROUP_SIZE
            zw = tl.load(qz_ptr + g * (N // P) + offs_n // P, mask=mask_n, other=0)  # [BN]
            z = (((zw >> zero_shift) & MAXQ) + ZERO_OFFSET).to(tl.float32)
            s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        if BLOCK_M == 1:
            if GROUP_SIZE > 0:
                # sum_k x_k (q_k - z) s = s (sum_k x_k q_k - z sum_k x_k). Value j of a word sits at bit SH of
                # its half: (half & MAXQ << SH) | MAGIC is exactly 2^23 + q 2^SH as fp32 (one LOP3, one FADD
                # back to q 2^SH, no shift, no int->float conversion), multiplied by x 2^-SH.
                hi = words >> 16
                t = tl.zeros([BKW, BLOCK_N], dtype=tl.float32)
                xs = tl.zeros([BKW], dtype=tl.float32)
                for j in tl.static_range(P):
                    SH: tl.constexpr = (j % HALF) * BITS
                    xj = tl.load(x_row + offs_kw * P + j, mask=offs_kw * P + j < k_hi, other=0.0).to(tl.float32)
                    xs += xj
                    if j < HALF:
                        f = ((words & (MAXQ << SH)) | MAGIC).to(tl.float32, bitcast=True) - 8388608.0
                    else:
                        f = ((hi & (MAXQ << SH)) | MAGIC).to(tl.float32, bitcast=True) - 8388608.0
                    t += (xj * (1.0 / (1 << SH)))[:, None] * f
                acc2 += t * s[None, :]
                zacc += z * s * tl.sum(xs, axis=0)
            else:  # each row's group through g_idx
                for j in tl.static_range(P):
                    rows = offs_kw * P + j
                    mask_r = rows < k_hi
                    xj = tl.load(x_row + rows, mask=mask_r, other=0.0).to(tl.float32)
                    gk = tl.load(g_ptr + rows, mask=mask_r, other=0)
                    mask_rn = mask_r[:, None] & mask_n[None, :]
                    zw = tl.load(qz_ptr + gk[:, None] * (N // P) + offs_n[None, :] // P, mask=mask_rn, other=0)
                    zj = ((zw >> zero_shift[None, :]) & MAXQ) + ZERO_OFFSET
                    sj = tl.load(s_ptr + gk[:, None] * N + offs_n[None, :], mask=mask_rn, other=0.0).to(tl.float32)
                    qj = (words >> (j * BITS)) & MAXQ
                    acc2 += xj[:, None] * ((qj - zj).to(tl.float32) * sj)
        else:
            # [BKW, BN] words -> [BKW, P, BN] values -> [BK, BN] (row kw·P + j), multiplied on the tensor cores
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < k_hi
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # [BM, BK]
            q = (words[:, None, :] >> (tl.arange(0, P) * BITS)[None, :, None]) & MAXQ
            q = tl.reshape(q, (BLOCK_K, BLOCK_N))
            if GROUP_SIZE > 0:  # exact small integers through the tensor cores, zero and scale once per tile
                qf = (q | MAGIC).to(tl.float32, bitcast=True) - 8388608.0
                dq = tl.dot(x, qf.to(x.dtype), input_precision=DOT_PRECISION)
                xs = tl.sum(x.to(tl.float32), axis=1)  # [BM]
                acc += (dq - xs[:, None] * z[None, :]) * s[None, :]
            else:
                gk = tl.load(g_ptr + offs_k, mask=mask_k, other=0)  # [BK]
                mask_kn = mask_k[:, None] & mask_n[None, :]
                zw = tl.load(qz_ptr + gk[:, None] * (N // P) + offs_n[None, :] // P, mask=mask_kn, other=0)
                z2 = ((zw >> zero_shift[None, :]) & MAXQ) + ZERO_OFFSET
                s2 = tl.load(s_ptr + gk[:, None] * N + offs_n[None, :], mask=mask_kn, other=0.0).to(tl.float32)
                w = (q - z2).to(tl.float32) * s2
                acc += tl.dot(x, w.to(x.dtype), input_precision=DOT_PRECISION)
    if BLOCK_M == 1:
        acc = (tl.sum(acc2, axis=0) - zacc)[None, :]
    if HAS_BIAS:
        if pid_k == 0:
            acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y = y_ptr + pid_k * stride_ys + offs_m[:, None] * stride_ym + offs_n[None, :]
    if ATOMIC:  # fp32 [M, N] zeroed by the caller; the order of the splits' adds is not fixed
        tl.atomic_add(y, acc, mask=mask_m[:, None] & mask_n[None, :], sem="relaxed")
    else:
        tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])
    if SERIAL:  # the last split to finish a tile sums its planes in a fixed order into o (bias, cast)
        tl.debug_barrier()  # every thread's plane stores precede the release below
        tile = cnt_ptr + pid_m * tl.num_programs(1) + pid_n
        if tl.atomic_add(tile, 1, sem="acq_rel") == tl.num_programs(2) - 1:
            tot = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            offs = offs_m[:, None] * stride_ym + offs_n[None, :]
            for sp in range(0, tl.num_programs(2)):
                tot += tl.load(y_ptr + sp * stride_ys + offs, mask=mask_m[:, None] & mask_n[None, :], other=0.0,
                               cache_modifier=".cg")
            if BIAS_LAST:
                tot += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            tl.store(o_ptr + offs, tot.to(o_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])
            tl.atomic_xchg(tile, 0, sem="relaxed")  # ready for the next launch (stream order)


@triton.jit
def _sum_planes_kernel(p_ptr, b_ptr, y_ptr, MN, N, SPLITS, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """y [M, N] = sum of the fp32 split planes [SPLITS, M, N] in a fixed order (+ bias), cast to y's dtype."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for sp in range(SPLITS):
        acc += tl.load(p_ptr + sp * MN + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)
# fmt: on


@dataclass(frozen=True)
class GemmTiles:
    """Launch knobs. block_m 1 (or dot False in gptq_gemv): the FMA GEMV, one x row per program; else tl.dot
    on a block_m-row tile (M = 1 padded with masked rows). num_stages: the K loop's software pipeline depth
    (tl.range). split_k 0: split_k_for's choice. atomic: splits fp32-atomic_add into a zeroed buffer (the
    order of the adds is not fixed) instead of writing fp32 planes summed by one small kernel (deterministic).
    serial (without atomic): the last split of each tile to finish sums the planes in the GEMV kernel itself
    (no second launch; deterministic; per-device tile counters, so GEMVs on one device must not run
    concurrently on several streams; planes are used while the counters are not yet allocated in a CUDA
    graph capture: an eager call allocates them)."""

    block_m: int = 64
    block_n: int = 64
    block_k: int = 32
    num_warps: int = 4
    num_stages: int = 2
    split_k: int = 0
    dot: bool = True
    atomic: bool = False
    serial: bool = False


DECODE = GemmTiles(block_m=16, block_n=64, block_k=64, num_warps=4, num_stages=3)  # 2 <= M <= 16
DECODE_M1 = GemmTiles(block_m=1, block_n=128, block_k=128, num_warps=4, num_stages=4, dot=False)  # M = 1

# Per-shape decode tiles: (bits, 1 for M = 1 else 16, K, N) -> GemmTiles, from `scripts/bench_quant.py --only
# sweep` on the target GPU (it prints the lines to paste). Missing shapes use DECODE_M1 / DECODE.
DECODE_TABLE: dict[tuple[int, int, int, int], GemmTiles] = {}


def decode_tiles(bits: int, m: int, k: int, n: int) -> GemmTiles:
    """The decode GEMV's tiles for x [m, k] times an [k, n] weight of `bits`."""
    bucket = 1 if m == 1 else 16
    return DECODE_TABLE.get((bits, bucket, k, n), DECODE_M1 if m == 1 else DECODE)


_COUNTERS: dict[int, torch.Tensor] = {}
_MAX_TILES = 1 << 16


def _counters(device: torch.device) -> torch.Tensor | None:
    """The device's zeroed int32 tile counters for serial split-K (each finishing program resets its own);
    None under a CUDA graph capture before an eager call allocated them."""
    key = device.index or 0 if device.type == "cuda" else -1
    if key not in _COUNTERS:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        _COUNTERS[key] = torch.zeros(_MAX_TILES, dtype=torch.int32, device=device)
    return _COUNTERS[key]


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


def _group_size_const(group_size: int, k_offset: int, block_k: int, k_per_split: int) -> int:
    """GROUP_SIZE for the kernel: group_size when every K tile lies inside one group, else 0 (g_idx)."""
    if group_size <= 0 or group_size % block_k or k_offset % block_k or k_per_split % block_k:
        return 0
    return group_size


def _aligned_block_k(block_k: int, group_size: int, k_offset: int, least: int) -> int:
    """block_k halved (not below `least`) until the tiles align to groups at k_offset (a row shard that is
    not whole groups, e.g. 7B's mlp.c_proj at TP 4, offset 2752 = 21.5 groups of 128), so the one-zero/scale
    path still applies; unchanged when no such block_k exists."""
    bk = block_k
    while group_size > 0 and (group_size % bk or k_offset % bk) and bk // 2 >= least and bk % 2 == 0:
        bk //= 2
    return bk if group_size > 0 and not (group_size % bk or k_offset % bk) else block_k


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
) -> torch.Tensor:
    M, K = x.shape
    N = qweight.shape[1]
    p = 32 // bits
    if K != qweight.shape[0] * p or tiles.block_k % p:
        raise ValueError(f"x has {K} columns for {qweight.shape[0]} words of {p} rows (block_k {tiles.block_k})")
    x = x.contiguous()
    k_per_split = triton.cdiv(triton.cdiv(K, split_k), tiles.block_k) * tiles.block_k
    split_k = triton.cdiv(K, k_per_split)
    gs = _group_size_const(group_size, k_offset, tiles.block_k, k_per_split)
    planes = split_k > 1 and not tiles.atomic
    atomic = split_k > 1 and tiles.atomic
    grid = (triton.cdiv(M, tiles.block_m), triton.cdiv(N, tiles.block_n), split_k)
    counters = _counters(x.device) if planes and tiles.serial and grid[0] * grid[1] <= _MAX_TILES else None
    serial = counters is not None
    out = torch.empty((M, N), device=x.device, dtype=x.dtype) if planes else None
    if planes:
        y = torch.empty((split_k, M, N), device=x.device, dtype=torch.float32)
    elif atomic:
        y = torch.zeros((1, M, N), device=x.device, dtype=torch.float32)
    else:
        y = torch.empty((1, M, N), device=x.device, dtype=x.dtype)
    _gptq_kernel[grid](
        x, qweight, qzeros, scales, g_idx, bias if bias is not None else scales, y,
        out if out is not None else y, counters if counters is not None else g_idx,
        M, N, K, k_per_split, k_offset, x.stride(0), y.stride(1), 0 if atomic else y.stride(0),
        BITS=bits, ZERO_OFFSET=zero_offset, GROUP_SIZE=gs, HAS_BIAS=bias is not None and not planes,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",  # fp32 stays fp32 (no TF32)
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, NUM_STAGES=tiles.num_stages,
        ATOMIC=atomic, SERIAL=serial, BIAS_LAST=serial and bias is not None,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )  # fmt: skip
    if atomic:
        return y[0].to(x.dtype)
    if out is None:
        return y[0]
    if serial:
        return out
    block = 1024
    _sum_planes_kernel[(triton.cdiv(M * N, block),)](
        y, bias if bias is not None else y, out, M * N, N, split_k, HAS_BIAS=bias is not None, BLOCK=block, num_warps=4
    )
    return out


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
    tiles: GemmTiles | None = None,
) -> torch.Tensor:
    """Decode: split-K (split_k None: tiles.split_k, or ~4 programs per SM when that is 0). tiles None:
    decode_tiles' per-shape choice. group_size > 0 promises g_idx[k] == (k_offset + k) // group_size (no act
    order), letting aligned tiles read one zero/scale row."""
    M, K = x.shape
    N = qweight.shape[1]
    if tiles is None:
        tiles = decode_tiles(bits, M, K, N)
    p = 32 // bits
    fma = tiles.block_m == 1 or not tiles.dot
    bk = _aligned_block_k(tiles.block_k, group_size, k_offset, p if fma else 16)
    tiles = replace(tiles, block_m=1 if fma else max(16, tiles.block_m), block_k=bk)
    if split_k is None:
        split_k = tiles.split_k or split_k_for(N, K, tiles.block_n, tiles.block_k, x.device)
    return _launch(x, qweight, qzeros, scales, g_idx, bits, zero_offset, bias, tiles, split_k, group_size, k_offset)


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
) -> torch.Tensor:
    """Prefill: tiled GEMM over the whole K, bias fused, output in x's dtype."""
    if tiles is None:
        tiles = GemmTiles(block_m=64 if x.shape[0] <= 64 else 128, block_n=128, block_k=32, num_warps=8, num_stages=3)
    return _launch(x, qweight, qzeros, scales, g_idx, bits, zero_offset, bias, tiles, 1, group_size, k_offset)


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
) -> torch.Tensor:
    """x [M, K] -> [M, N]: the GEMV for M <= 16, the GEMM above (the layers' entry point on CUDA)."""
    args = (x, qweight, qzeros, scales, g_idx, bits, zero_offset, bias)
    if x.shape[0] <= 16:
        return gptq_gemv(*args, group_size=group_size, k_offset=k_offset)
    return gptq_gemm(*args, group_size=group_size, k_offset=k_offset)
