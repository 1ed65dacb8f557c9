"""M = 1 GPTQ GEMV on a column-packed layout made once at load ("npack"): a candidate to the row-packed
kernel in worker/kernels/gemv.py (scripts/gpu_check_gemv2.py measures both; the layers keep gemv.py's).

Why a second layout: AutoGPTQ packs P = 32 / bits consecutive rows of one column into a word, so a thread
holding c columns multiplies each x value it loads (and converts, and sums for the zero term) by only c
words' worth of values (c = 4 for 16-byte loads): with the per-tile scale epilogue that costs ~1.8 of the
~4.8 sm_90 instructions a weight value. Here word w of row k packs columns j · (N / P) + w (j < P), so one x
value feeds all P values of each word it meets, and per value the loop is one shift, one mask-and-or
(`_biased`'s exponent trick: 2^(23 - T) + q, exact) and one FFMA. Partial sums stay per row until the
group's last tile, where they are reduced over rows and take the group's scale and zero once.
Rows are in group order (`group_order`); a row shard starting inside a tile (K_OFFSET) starts at a
negative, masked tile; split-K reduces through gemv.py's `_finish` (last arriver, split order).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from worker.kernels.gemv import NO_GROUPS, GPTQGemvWeights, _finish, _sm_count
from worker.quant.gptq_format import unpack_rows


@dataclass(frozen=True)
class NpackTiles:
    """BLOCK_K rows (divides the group) by block_w words (block_w · P columns) per tile."""

    block_w: int = 256
    block_k: int = 16
    num_warps: int = 4
    programs_per_sm: int = 4  # split-K target (one wave); 0: no split-K
    num_stages: int = 1  # the loads are unrolled in the row loop; Triton's pipeliner adds nothing


NPACK_TILES: dict[str, NpackTiles] = {
    "np": NpackTiles(),  # 2 words a thread (8 B loads), 16 rows in flight: 8 KB a program
    "np_w128": NpackTiles(block_w=128, block_k=32),  # 1 word a thread, 32 rows in flight
    "np_w512": NpackTiles(block_w=512, block_k=8),  # 4 words a thread (16 B loads), 8 rows in flight
    "np_w8": NpackTiles(block_w=256, block_k=16, num_warps=8),  # 1 word a thread
    "np_pps8": NpackTiles(programs_per_sm=8),
    "np_k32": NpackTiles(block_k=32),  # 16 KB a program in flight
    "np_w512pps2": NpackTiles(block_w=512, block_k=8, programs_per_sm=2),  # np_w512's ~210 registers: 2 a SM
}


@dataclass
class NpackWeights:
    """One linear in the column-packed layout: qweight int32 [K, N / P], scales/zeros as in gemv.py."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    zero: int
    bits: int
    group_size: int
    k_offset: int
    counters: torch.Tensor


def pack_columns(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """Row-packed int32 [K / P, N] -> column-packed int32 [K, N / P]: value j of word w of row k is
    column j · (N / P) + w (N must be a multiple of P)."""
    q = unpack_rows(qweight, bits).to(torch.int64)  # [K, N]
    p = 32 // bits
    k, n = q.shape
    if n % p:
        raise ValueError(f"npack GEMV needs N ({n}) to be a multiple of {p} for {bits}-bit weights")
    q = q.view(k, p, n // p)
    words = (q << (bits * torch.arange(p, device=q.device)).view(1, p, 1)).sum(1)
    return (words - ((words >> 31) << 32)).to(torch.int32)  # the int32 with the same 32 bits


def npack_weights(w: GPTQGemvWeights) -> NpackWeights:
    """The column-packed copy of a gemv.py linear (rows already in group order); shares scales and zeros."""
    qweight = pack_columns(w.qweight, w.bits)
    return NpackWeights(qweight, w.scales, w.zeros, w.zero, w.bits, w.group_size, w.k_offset, w.counters)


@triton.jit
def _value(words, mask_t, J: tl.constexpr, BITS: tl.constexpr, T: tl.constexpr):
    """2^(23 - T) + q (fp32, exact) of value J of each word: a constant shift moves it to bit T, one
    mask-and-or adds the exponent."""
    SH: tl.constexpr = T - BITS * J
    if SH >= 0:
        moved = words << SH
    else:
        moved = words >> -SH
    return ((moved & mask_t) | ((127 + 23 - T) << 23)).to(tl.float32, bitcast=True)


@triton.jit
def _unpacked(words, mask_t, BITS: tl.constexpr, T: tl.constexpr):
    """[BLOCK_W, P] values of [BLOCK_W] words (column j = value j): each value from a constant shift, joined
    in registers (tl.join adds a minor, in-thread dimension: the innermost join's pair is the flattened
    index's slowest digit)."""
    v0, v1 = _value(words, mask_t, 0, BITS, T), _value(words, mask_t, 1, BITS, T)
    v2, v3 = _value(words, mask_t, 2, BITS, T), _value(words, mask_t, 3, BITS, T)
    if BITS == 4:
        v4, v5 = _value(words, mask_t, 4, BITS, T), _value(words, mask_t, 5, BITS, T)
        v6, v7 = _value(words, mask_t, 6, BITS, T), _value(words, mask_t, 7, BITS, T)
        even = tl.join(tl.join(v0, v4), tl.join(v2, v6))
        vals = tl.join(even, tl.join(tl.join(v1, v5), tl.join(v3, v7)))
        return tl.reshape(vals, [words.shape[0], 8])
    else:
        return tl.reshape(tl.join(tl.join(v0, v2), tl.join(v1, v3)), [words.shape[0], 4])


# fmt: off
@triton.jit
def _npack_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, y_ptr, part_ptr, cnt_ptr, N, NW, K, K_PER_SPLIT, K_OFFSET,
                  MASK_T, SPLITS,
                  BITS: tl.constexpr, ZERO: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr,
                  REDUCE: tl.constexpr, ROW_MASK: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_K: tl.constexpr):
    P: tl.constexpr = 32 // BITS
    T: tl.constexpr = 19 if BITS == 4 else 15  # value at bits [T, T + BITS) under exponent 23 - T: 2^(23-T) + q
    # (T = 16 would spare Int4's value 4 its shift, but the bias 128 costs fp32 ~4x the cancellation error)
    ZBIAS: tl.constexpr = 1 << (23 - T)
    pid_w, pid_k = tl.program_id(0), tl.program_id(1)
    offs_w = pid_w * BLOCK_W + tl.arange(0, BLOCK_W)
    js = tl.arange(0, P)
    cols = offs_w[:, None] + js[None, :] * NW  # [BLOCK_W, P]: the column of value j of word w
    mask_w = offs_w < NW
    mask_c = mask_w[:, None] & (js[None, :] < P)
    k_lo = pid_k * K_PER_SPLIT - K_OFFSET % BLOCK_K  # tiles aligned to BLOCK_K in the global row numbering
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
    part = tl.zeros([BLOCK_W, P], dtype=tl.float32)  # Σ x (2^(23-T) + q) over the group's rows so far
    sx = tl.sum(tl.zeros([1], dtype=tl.float32), axis=0)  # Σ x of the group so far (a scalar)
    acc = tl.zeros([BLOCK_W, P], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        for r in tl.static_range(BLOCK_K):  # one row of words a step: one x value feeds P values of each word
            if ROW_MASK:  # a shard starting inside a tile, or K not a whole number of tiles
                live = (k0 + r >= 0) & (k0 + r < k_hi)
                words = tl.load(qw_ptr + (k0 + r) * NW + offs_w, mask=mask_w & live, other=0)
                xr = tl.load(x_ptr + k0 + r, mask=live, other=0.0).to(tl.float32)  # one x value for the program
            else:
                words = tl.load(qw_ptr + (k0 + r) * NW + offs_w, mask=mask_w, other=0)
                xr = tl.load(x_ptr + k0 + r).to(tl.float32)
            part += xr * _unpacked(words, MASK_T, BITS, T)
            sx += xr
        gk = K_OFFSET + k0  # global row of the tile's first row
        if ((gk + BLOCK_K) % GROUP_SIZE == 0) | (k0 + BLOCK_K >= k_hi):  # the group's (or split's) last tile
            g = gk // GROUP_SIZE
            s = tl.load(s_ptr + g * N + cols, mask=mask_c, other=0.0).to(tl.float32)
            if ZERO >= 0:
                z = tl.full([BLOCK_W, P], ZERO + ZBIAS, tl.float32)
            else:
                z = tl.load(z_ptr + g * N + cols, mask=mask_c, other=0.0).to(tl.float32) + ZBIAS
            acc += s * (part - z * sx)
            part = tl.zeros([BLOCK_W, P], dtype=tl.float32)
            sx = tl.sum(tl.zeros([1], dtype=tl.float32), axis=0)
    _finish(tl.reshape(acc, [1, BLOCK_W * P]), b_ptr, y_ptr, part_ptr, cnt_ptr, pid_w, pid_k, 1, N, SPLITS, N,
            tl.arange(0, 1), tl.reshape(tl.where(mask_c, cols, N), [BLOCK_W * P]), HAS_BIAS, REDUCE)
# fmt: on


def npack_gemv(
    x: torch.Tensor,  # [1, K] in the weight's row order
    w: NpackWeights,
    bias: torch.Tensor | None = None,
    tiles: NpackTiles | None = None,
    split_k: int | None = None,
) -> torch.Tensor:
    """y [1, N] in x's dtype (fp32 accumulation)."""
    tiles = tiles or NpackTiles()
    p = 32 // w.bits
    K, nw = w.qweight.shape
    N = nw * p
    if x.dim() != 2 or x.shape != (1, K):
        raise ValueError(f"x {list(x.shape)} for an npack GEMV of [{K}, {N}] (M = 1 only)")
    if w.group_size != NO_GROUPS and w.group_size % tiles.block_k:
        raise ValueError(f"block_k {tiles.block_k} must divide the group ({w.group_size})")
    span = K + w.k_offset % tiles.block_k
    n_tiles = triton.cdiv(nw, tiles.block_w)
    if split_k is None:
        split_k = 1
        if x.device.type == "cuda" and tiles.programs_per_sm:
            programs = tiles.programs_per_sm * _sm_count(x.device.index or 0)
            split_k = max(1, min(triton.cdiv(span, tiles.block_k), programs // n_tiles))
    k_per_split = triton.cdiv(triton.cdiv(span, split_k), tiles.block_k) * tiles.block_k
    split_k = triton.cdiv(span, k_per_split)
    y = torch.empty(1, N, device=x.device, dtype=x.dtype)
    part = torch.empty(split_k, 1, N, device=x.device, dtype=torch.float32) if split_k > 1 else y
    if w.counters.numel() < n_tiles:
        raise ValueError(f"{w.counters.numel()} arrival counters for {n_tiles} column tiles")
    zeros, b = w.zeros if w.zeros is not None else w.scales, bias if bias is not None else w.scales
    _npack_kernel[(n_tiles, split_k)](
        x.contiguous(), w.qweight, w.scales, zeros, b, y, part, w.counters, N, nw, K, k_per_split, w.k_offset,
        ((1 << w.bits) - 1) << (19 if w.bits == 4 else 15), split_k,
        BITS=w.bits, ZERO=w.zero, GROUP_SIZE=w.group_size, HAS_BIAS=bias is not None, REDUCE=split_k > 1,
        ROW_MASK=w.k_offset % tiles.block_k != 0 or K % tiles.block_k != 0,
        BLOCK_W=tiles.block_w, BLOCK_K=tiles.block_k, num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )  # fmt: skip
    return y
