"""Triton W4A16 / W8A16 GPTQ GEMV for decode batches (M <= 16): y [M, N] = x [M, K] · dequant(qweight) (+ bias).

Built to read the packed words at copy speed instead of shuffling them:
- Rows arrive in group order (act-order checkpoints are permuted at load, x once per call; see
  `group_order`), so each K tile of BLOCK_K rows lies in one group (or, M = 1, holds whole groups:
  `_tile_groups`): one scale and zero row per tile (group), and Σ_k x_k (q_k − z) s = s · (Σ_k x_k q_k −
  z Σ_k x_k) moves the zero and scale out of the inner loop.
- Value J of a word: "shift" (`_biased`, the default) moves it under a fixed fp32 exponent with one shift and
  one mask-and-or, giving 2^(23 - T) + q exactly (16 + q for Int4, 256 + q for Int8); the bias joins the zero
  point (z + ZBIAS), so M = 1 pays one FFMA per value, and M > 1 (Int4: 16 + q is exact in bf16) feeds it to
  tl.dot as is. "mask" (`_values`) is `(w & (MAXQ << sh)) | 0x4B000000` read as fp32 = 2^23 + q·2^sh, less
  2^23, with 2^−sh folded into x (M = 1) or multiplied back (M > 1).
- M = 1 with bf16 x reads x as int32 pairs (one load, one shift or mask a value; X_PAIRS). With the shift
  unpack and its mask as a runtime argument, the sm_90 loop is ~4.8 instructions a value for Int4 (the mask
  unpack's was 6.3; scripts/gemv_compile.py reports registers, cuobjdump -sass counts the loop).
- Tried and dropped (issue 16): a column-packed copy for M = 1 (8 columns of one row a word, so one x value
  feeds a whole word; ~4.0 loop instructions a value) was 2.5-10x slower than this kernel on every 7B shape on
  the H200 (2026-11-29; c_attn Int4 41.8 vs 16.3 us at best, a decode step 14.7 vs 3.19 ms): fewer loop
  instructions did not make it faster. Its kernel and checks are in git history (26b57e1 to 85dad87).
- Split-K fills the SMs; the last split of an N tile to arrive sums the fp32 partials in split order
  (deterministic), adds the bias, writes y in x's dtype and resets its arrival counter: one launch.
Row-parallel shards whose first row is not a tile boundary (K_OFFSET) start at a negative, masked
tile. The PyTorch reference is worker/kernels/gptq_reference.py (tests/unit/test_gemv.py).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from worker.kernels.gemv_tiles import GemvTiles, default_tiles
from worker.kernels.pdl import active, gdc_go, gdc_wait, launch_options
from worker.quant.gptq_format import unpack_cols

NO_GROUPS = 1 << 30  # GROUP_SIZE for a checkpoint without groups (group_size -1): every row in group 0


@triton.jit
def _values(words, high, J: tl.constexpr, BITS: tl.constexpr):
    """q · 2^sh (fp32, exact) of value J of each word, sh = BITS · (J mod P/2)."""
    HALF: tl.constexpr = 16 // BITS
    src = words if J < HALF else high
    bits = (src & (((1 << BITS) - 1) << (BITS * (J % HALF)))) | 0x4B000000
    return bits.to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _biased(words, mask_t, J: tl.constexpr, BITS: tl.constexpr):
    """2^(23 - T) + q (fp32, exact) of value J of each word: one shift puts q at mantissa bits [T, T + BITS) under
    a fixed exponent, T = 23 - BITS - 4 for Int4 (+16: small, so x · (16 + q) summed over a word stays exact to
    ~2^-19) and 15 for Int8 (+256). One SHF, one LOP3 and the FFMA per value; the bias joins the zero point.
    mask_t is a runtime argument: as an immediate, ptxas re-creates it before most LOP3s (sm_90: 5.6 -> 5.2
    instructions a value for Int4 once it is not)."""
    T: tl.constexpr = 19 if BITS == 4 else 15  # the bias 2^(23 - T) is quant_gemv's ZBIAS
    SH: tl.constexpr = T - BITS * J
    if SH >= 0:
        moved = words << SH
    else:
        moved = words >> -SH
    bits = (moved & mask_t) | ((127 + 23 - T) << 23)  # mask_t = MAXQ << T
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _words(qw_ptr, kw, k_hi, N, offs_n, mask_n, P: tl.constexpr):
    """The packed words of word rows kw [BKW] (rows outside [0, k_hi) read as 0), [BKW, BLOCK_N]."""
    mask = (kw >= 0) & (kw * P < k_hi)
    return tl.load(qw_ptr + kw[:, None] * N + offs_n[None, :], mask=mask[:, None] & mask_n[None, :], other=0)


@triton.jit
def _finish(
    acc,
    b_ptr,
    y_ptr,
    part_ptr,
    cnt_ptr,
    pid_n,
    pid_k,
    M,
    N,
    SPLITS,
    stride_ym,
    offs_m,
    offs_n,
    HAS_BIAS: tl.constexpr,
    REDUCE: tl.constexpr,
):
    """y tile = acc (+ bias) in y's dtype; split-K: store the fp32 partial, and the split that arrives last
    sums all partials in split order and resets the tile's counter."""
    mask_n = offs_n < N
    mask = (offs_m < M)[:, None] & mask_n[None, :]
    out = offs_m[:, None] * stride_ym + offs_n[None, :]
    if REDUCE:
        plane = offs_m[:, None] * N + offs_n[None, :]
        tl.store(part_ptr + pid_k * M * N + plane, acc, mask=mask)
        tl.debug_barrier()  # every thread's partial stored before the release below
        if tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel", scope="gpu") == SPLITS - 1:
            tot = tl.zeros_like(acc)
            for i in range(SPLITS):
                tot += tl.load(part_ptr + i * M * N + plane, mask=mask, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                tot += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptr + out, tot.to(y_ptr.dtype.element_ty), mask=mask)
            tl.atomic_xchg(cnt_ptr + pid_n, 0, sem="relaxed", scope="gpu")  # ready for the next launch
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + out, acc.to(y_ptr.dtype.element_ty), mask=mask)


# fmt: off
@triton.jit
def _tile_groups(s, z, s_ptr, z_ptr, g, k0, k_hi, N, offs_n, mask_n, rows, ZERO: tl.constexpr,
                 GROUP_SIZE: tl.constexpr, ROWS_PER_GROUP: tl.constexpr, TILE_GROUPS: tl.constexpr,
                 BLOCK_N: tl.constexpr, ZBIAS: tl.constexpr):
    """[BKW, BLOCK_N] scales and zeros of a tile of TILE_GROUPS whole groups (group g first): row r takes
    group g + r // ROWS_PER_GROUP's (groups past the split's end, whose rows are masked, read 0); zeros + ZBIAS
    (s and z: group g's, z biased already)."""
    grp = (rows // ROWS_PER_GROUP)[:, None]
    s2 = tl.zeros([ROWS_PER_GROUP * TILE_GROUPS, BLOCK_N], dtype=tl.float32) + s[None, :]
    z2 = tl.zeros([ROWS_PER_GROUP * TILE_GROUPS, BLOCK_N], dtype=tl.float32) + z[None, :]
    for i in tl.static_range(1, TILE_GROUPS):
        live = mask_n & (offs_n * 0 + k0 + i * GROUP_SIZE < k_hi)  # a tensor mask (the interpreter needs one)
        si = tl.load(s_ptr + (g + i) * N + offs_n, mask=live, other=0.0).to(tl.float32)
        s2 = tl.where(grp == i, si[None, :], s2)
        if ZERO < 0:
            zi = tl.load(z_ptr + (g + i) * N + offs_n, mask=live, other=0.0).to(tl.float32) + ZBIAS
            z2 = tl.where(grp == i, zi[None, :], z2)
    return s2, z2
# fmt: on


# fmt: off
@triton.jit
def _gemv_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, y_ptr, part_ptr, cnt_ptr, M, N, K, K_PER_SPLIT, K_OFFSET,
                 MASK_T, SPLITS, stride_xm, stride_ym,
                 BITS: tl.constexpr, ZERO: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr,
                 REDUCE: tl.constexpr, PREFETCH: tl.constexpr, STAGES: tl.constexpr, SHIFT: tl.constexpr,
                 X_PAIRS: tl.constexpr,
                 ZBIAS: tl.constexpr, PDL: tl.constexpr,
                 DOT_PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TILE_GROUPS: tl.constexpr):
    P: tl.constexpr = 32 // BITS
    HALF: tl.constexpr = 16 // BITS
    BKW: tl.constexpr = BLOCK_K // P
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    mask_n, mask_m = offs_n < N, offs_m < M
    rows = tl.arange(0, BKW)
    k_lo = pid_k * K_PER_SPLIT - K_OFFSET % BLOCK_K  # tiles aligned to BLOCK_K in the global row numbering
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
    if BLOCK_M == 1:
        acc2 = tl.zeros([BKW, BLOCK_N], dtype=tl.float32)  # reduced over rows once, after the loop
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if PREFETCH:
        nxt = _words(qw_ptr, k_lo // P + rows, k_hi, N, offs_n, mask_n, P)
    else:
        nxt = tl.zeros([BKW, BLOCK_N], dtype=tl.int32)
    gdc_wait(PDL)  # PDL: only the (constant) packed weights were read before the previous kernel finished
    gdc_go(PDL)
    for k0 in tl.range(k_lo, k_hi, BLOCK_K, num_stages=STAGES):  # STAGES > 1: cp.async ring in shared memory
        kw = k0 // P + rows  # word rows (k0 is a multiple of P)
        mask_w = (kw >= 0) & (kw * P < k_hi)
        if PREFETCH:  # the next tile's words in flight (registers) while this one's are multiplied
            words = nxt
            nxt = _words(qw_ptr, kw + BKW, k_hi, N, offs_n, mask_n, P)
        else:
            words = _words(qw_ptr, kw, k_hi, N, offs_n, mask_n, P)
        high = words >> 16  # (unused by the M = 1 SHIFT unpack: dropped by the compiler)
        g = (K_OFFSET + k0) // GROUP_SIZE
        s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        if ZERO >= 0:
            z = tl.full([BLOCK_N], ZERO, tl.float32)
        else:
            z = tl.load(z_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        if SHIFT:  # the values carry + ZBIAS: taken off with the zero
            z = z + ZBIAS
        if BLOCK_M == 1:
            part2 = tl.zeros([BKW, BLOCK_N], dtype=tl.float32)
            sx = tl.zeros([BKW], dtype=tl.float32)
            for j in tl.static_range(P):
                if X_PAIRS:  # bf16 x read as int32 pairs (x_ptr: the int32 view): one load and one op a value less
                    xw = tl.load(x_ptr + kw * (P // 2) + j // 2, mask=mask_w, other=0)
                    if j % 2 == 0:
                        xj = (xw << 16).to(tl.float32, bitcast=True)
                    else:
                        xj = (xw & -65536).to(tl.float32, bitcast=True)
                else:
                    xj = tl.load(x_ptr + kw * P + j, mask=mask_w, other=0.0).to(tl.float32)
                sx += xj
                if SHIFT:  # part2 is Σ x (2^(23 - T) + q): the bias is taken off with the zero below
                    part2 += xj[:, None] * _biased(words, MASK_T, j, BITS)
                else:
                    part2 += (xj * (1.0 / (1 << (BITS * (j % HALF)))))[:, None] * _values(words, high, j, BITS)
            if TILE_GROUPS == 1:
                acc2 += s[None, :] * (part2 - z[None, :] * sx[:, None])
            else:  # the tile spans TILE_GROUPS groups: each word row takes its group's scale and zero
                s2, z2 = _tile_groups(s, z, s_ptr, z_ptr, g, k0, k_hi, N, offs_n, mask_n, rows, ZERO,
                                      GROUP_SIZE, BKW // TILE_GROUPS, TILE_GROUPS, BLOCK_N, ZBIAS)
                acc2 += s2 * (part2 - z2 * sx[:, None])
        else:
            part = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            sxm = tl.zeros([BLOCK_M], dtype=tl.float32)
            for j in tl.static_range(P):
                xj = tl.load(x_ptr + offs_m[:, None] * stride_xm + (kw * P + j)[None, :],
                             mask=mask_m[:, None] & mask_w[None, :], other=0.0)  # [BM, BKW]
                sxm += tl.sum(xj.to(tl.float32), axis=1)
                if SHIFT:  # Int4 only: 16 + q is exact in bf16/fp16
                    q = _biased(words, MASK_T, j, BITS)
                else:
                    q = _values(words, high, j, BITS) * (1.0 / (1 << (BITS * (j % HALF))))
                part += tl.dot(xj, q.to(xj.dtype), input_precision=DOT_PRECISION)
            acc += s[None, :] * (part - z[None, :] * sxm[:, None])
    if BLOCK_M == 1:
        acc = tl.sum(acc2, axis=0)[None, :]
    _finish(acc, b_ptr, y_ptr, part_ptr, cnt_ptr, pid_n, pid_k, M, N, SPLITS, stride_ym, offs_m, offs_n,
            HAS_BIAS, REDUCE)
# fmt: on


@dataclass
class GPTQGemvWeights:
    """One linear in the GEMV's layout: rows in group order (`group_order`), scales [G, N], zero points
    z + zero_offset as floats [G, N] in the scales' dtype (None when one value `zero` serves all, as in
    every sym checkpoint), arrival counters for the fused split-K reduction (zero between launches)."""

    qweight: torch.Tensor  # int32 [K / P, N]
    scales: torch.Tensor
    zeros: torch.Tensor | None
    zero: int  # -1: read `zeros`
    bits: int
    group_size: int  # > 0; NO_GROUPS for a checkpoint without groups
    k_offset: int  # the shard's first global row
    counters: torch.Tensor
    tiled: bool = False  # qweight in gptq_format.tile_words' layout (Int4; the CUDA gptq_tc and gptq_mma read it)


def gemv_weights(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    bits: int,
    zero_offset: int,
    group_size: int,
    k_offset: int,
) -> GPTQGemvWeights:
    """The GEMV's view of rows already in group order whose row k (global k_offset + k) is in group
    (k_offset + k) // group_size (group_size -1: no groups). Shares qweight and scales."""
    zeros = (unpack_cols(qzeros, bits) + zero_offset).to(scales.dtype)
    uniform = zeros.numel() > 0 and bool((zeros == zeros.flatten()[0]).all())
    return GPTQGemvWeights(
        qweight=qweight,
        scales=scales,
        zeros=None if uniform else zeros,
        zero=int(zeros.flatten()[0]) if uniform else -1,
        bits=bits,
        group_size=NO_GROUPS if group_size == -1 else group_size,
        k_offset=k_offset,
        counters=counters_for(qweight.shape[1], qweight.device),
    )


def _fits(group_size: int, block_k: int, bits: int, m: int) -> bool:
    """M = 1: a tile holds whole groups or lies in one; M > 1 (tl.dot): in one group, 16 word rows or more."""
    p = 32 // bits
    if m > 1:
        return group_size % block_k == 0 and block_k % (16 * p) == 0
    return block_k % p == 0 and (group_size % block_k == 0 or block_k % group_size == 0)


def _tile_k(w: GPTQGemvWeights, tiles: GemvTiles, m: int) -> int:
    """The tile's rows for M rows of x: M > 1 falls back to 16 word rows where tiles.block_k spans groups."""
    if m == 1 or _fits(w.group_size, tiles.block_k, w.bits, m):
        return tiles.block_k
    return 16 * (32 // w.bits)


def gemv_fits(w: GPTQGemvWeights, tiles: GemvTiles) -> bool:
    """The tiles serve both M = 1 and M > 1 for this linear's groups."""
    return _fits(w.group_size, tiles.block_k, w.bits, 1) and _fits(w.group_size, _tile_k(w, tiles, 2), w.bits, 2)


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def splits_for(n: int, span: int, tiles: GemvTiles, device: torch.device) -> int:
    """K splits for at most programs_per_sm programs per SM (one wave; 1 off CUDA), one K tile or more each."""
    if device.type != "cuda" or tiles.programs_per_sm == 0:
        return 1
    programs = tiles.programs_per_sm * _sm_count(device.index or 0)
    return max(1, min(triton.cdiv(span, tiles.block_k), programs // triton.cdiv(n, tiles.block_n)))


def counters_for(n: int, device: torch.device) -> torch.Tensor:
    """Arrival counters of the fused split-K reduction for N columns (any block_n >= 16), zero."""
    return torch.zeros(triton.cdiv(n, 16), dtype=torch.int32, device=device)


def _plan(x: torch.Tensor, n: int, span: int, tiles: GemvTiles, split_k: int | None):
    """(splits, rows per split, y [M, n] in x's dtype, the fp32 partials [splits, M, n] or y)."""
    split_k = split_k or splits_for(n, span, tiles, x.device)
    k_per_split = triton.cdiv(triton.cdiv(span, split_k), tiles.block_k) * tiles.block_k
    split_k = triton.cdiv(span, k_per_split)
    y = torch.empty(x.shape[0], n, device=x.device, dtype=x.dtype)
    part = torch.empty(split_k, x.shape[0], n, device=x.device, dtype=torch.float32) if split_k > 1 else y
    return split_k, k_per_split, y, part


def quant_gemv(
    x: torch.Tensor,  # [M <= 16, K], its columns in the weight's row order
    w: GPTQGemvWeights,
    bias: torch.Tensor | None = None,
    tiles: GemvTiles | None = None,
    split_k: int | None = None,
    pdl: bool = False,
) -> torch.Tensor:
    """y [M, N] in x's dtype (fp32 accumulation); split_k None: ~programs_per_sm programs per SM. pdl: launch with
    programmatic dependent launch (worker/kernels/pdl.py; plainly where it is unavailable)."""
    tiles = tiles or default_tiles(w.bits)
    M, K = x.shape
    N, p = w.qweight.shape[1], 32 // w.bits
    if M > 16 or K != w.qweight.shape[0] * p or w.tiled:
        raise ValueError(
            f"x [{M}, {K}] for a GEMV of {w.qweight.shape[0]} words x {p} rows (M <= 16, row-major words; tiled "
            f"{w.tiled})"
        )
    dot = M > 1 or tiles.dot
    bk = _tile_k(w, tiles, 2 if dot else 1)
    if not _fits(w.group_size, bk, w.bits, 2 if dot else 1):
        raise ValueError(
            f"block_k {bk} for M = {M} must divide the group ({w.group_size})"
            + (" and hold 16 word rows" if dot else " or be a multiple of it")
        )
    tiles = dataclasses.replace(tiles, block_k=bk)
    unpack = (tiles.dot_unpack or tiles.unpack) if dot else tiles.unpack
    shift = unpack == "shift" and (w.bits == 4 or not dot)  # 256 + q (Int8) is not exact in bf16
    prefetch = tiles.prefetch and not dot
    x = x.contiguous()
    split_k, k_per_split, y, part = _plan(x, N, K + w.k_offset % bk, tiles, split_k)
    grid = (triton.cdiv(N, tiles.block_n), split_k)
    pairs = x.dtype == torch.bfloat16 and not dot and tiles.unpack == "shift" and x.storage_offset() % 2 == 0
    zeros, b = w.zeros if w.zeros is not None else w.scales, bias if bias is not None else w.scales
    on = active(pdl, x.device)
    _gemv_kernel[grid](
        x.view(torch.int32) if pairs else x, w.qweight, w.scales, zeros, b, y, part, w.counters, M, N, K,
        k_per_split, w.k_offset, ((1 << w.bits) - 1) << (19 if w.bits == 4 else 15), split_k, x.stride(0), y.stride(0),
        BITS=w.bits, ZERO=w.zero, GROUP_SIZE=w.group_size, HAS_BIAS=bias is not None, REDUCE=split_k > 1,
        PREFETCH=prefetch, STAGES=1 if prefetch else tiles.num_stages, SHIFT=shift, X_PAIRS=pairs,
        ZBIAS=(16 if w.bits == 4 else 256) if shift else 0, PDL=on,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        BLOCK_M=16 if dot else 1, BLOCK_N=tiles.block_n, BLOCK_K=bk, TILE_GROUPS=max(1, bk // w.group_size),
        num_warps=tiles.num_warps, num_stages=tiles.num_stages, **launch_options(on),
    )  # fmt: skip
    return y
