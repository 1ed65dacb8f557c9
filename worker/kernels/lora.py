"""Segmented multi-LoRA kernels over the fixed-shape slot pool: y[t, part cols] += B[s, p] (A[s, p] x[t]).

Two launches per module, whatever the number of distinct adapters (Punica's SGMV, S-LoRA's MBGMV):
  shrink   h[split, t, p, :rank] = x[t, k-range of split] · A[slot, p, :rank]ᵀ       (fp32 partial sums)
           grid (segment, token tile, part × K split)
  expand   y[t, p·N + n] += (Σ_split h[split, t, p, :rank]) · B[slot, p, n, :rank]ᵀ (in place)
           grid (segment, token tile, part × output tile)
A module's output parts (merged gate_up: w2 → columns [0, N), w1 → [N, 2N)) share one pool and the same
two launches; c_attn is one part (its B covers q|k|v).

Segments arrive as plain tensors: `starts`, `lens` [S] int32 (each segment's first token row and its
length), `slots` [S] (its pool slot), and the host-side `max_len` (the grid; no host sync, so decode is
CUDA-graph capturable). `ranks[p, slot]` (int32; 0 for an empty slot, slot 0 and untargeted modules)
bounds the rank loops and masks the rank lanes: cost follows each slot's true rank, and a segment of
rank 0 returns at once. Decode (one token per segment) uses a GEMV form and splits K over programs to fill
the GPU; prefill uses tl.dot. The K split's partial sums go to separate planes of h that the expand adds
up: no atomics, no zeroing launch. The shrink only reads x, so it may run on a side stream beside the
base matmul.

Numerics follow the reference (`add_lora_reference`, worker/kernels/lora_reference.py): h accumulates in
fp32 and is rounded to the model dtype, the product with B accumulates in fp32 and is rounded to the model
dtype, then added to y (in fp32, rounded once). Only the summation order differs.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from worker.kernels.lora_norm import rms_norm_shrink
from worker.kernels.lora_reference import add_lora_reference
from worker.kernels.lora_rows import (
    lora_expand_rows,
    lora_expand_rows_partials,
    lora_expand_rows_silu_mul,
    lora_term_rows_partials,
)


# Triton kernel signatures stay packed, one line per group of arguments
# fmt: off
@triton.jit
def _shrink_kernel(x_ptr, a_ptr, h_ptr, starts_ptr, lens_ptr, slots_ptr, ranks_ptr, K, K_PER_SPLIT,
                   stride_xt, stride_as, stride_ap, stride_ar, stride_hs, stride_ht, stride_hp, stride_rp, stride_rs,
                   SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    seg = tl.program_id(0)
    m0 = tl.program_id(1) * BLOCK_M
    part = tl.program_id(2) // SPLIT_K
    split = tl.program_id(2) % SPLIT_K
    length = tl.load(lens_ptr + seg)
    slot = tl.load(slots_ptr + seg).to(tl.int64)
    rank = tl.load(ranks_ptr + part * stride_rp + slot * stride_rs)
    if (slot == 0) | (rank == 0) | (m0 >= length):
        return
    start = tl.load(starts_ptr + seg).to(tl.int64)
    k_lo = split * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
    a_base = a_ptr + slot * stride_as + part * stride_ap
    h_base = h_ptr + split * stride_hs + part * stride_hp
    for r0 in range(0, rank, BLOCK_R):  # only the slot's real rank
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < rank
        if BLOCK_M == 1:  # decode, one token: GEMV (multiply and reduce over K)
            acc = tl.zeros([BLOCK_R], dtype=tl.float32)
            for k0 in range(k_lo, k_hi, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                mask_k = offs_k < k_hi
                x = tl.load(x_ptr + (start + m0) * stride_xt + offs_k, mask=mask_k, other=0.0)  # [BK]
                a = tl.load(a_base + offs_r[:, None] * stride_ar + offs_k[None, :],
                            mask=mask_r[:, None] & mask_k[None, :], other=0.0)  # [BR, BK]
                acc += tl.sum(a.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)
            tl.store(h_base + (start + m0) * stride_ht + offs_r, acc, mask=mask_r)
        else:  # a tile of tokens: tl.dot
            offs_m = m0 + tl.arange(0, BLOCK_M)
            mask_m = offs_m < length
            rows = start + offs_m
            acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
            for k0 in range(k_lo, k_hi, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                mask_k = offs_k < k_hi
                x = tl.load(x_ptr + rows[:, None] * stride_xt + offs_k[None, :],
                            mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # [BM, BK]
                a = tl.load(a_base + offs_r[:, None] * stride_ar + offs_k[None, :],
                            mask=mask_r[:, None] & mask_k[None, :], other=0.0)  # [BR, BK]
                acc += tl.dot(x, tl.trans(a), input_precision="ieee")
            tl.store(h_base + rows[:, None] * stride_ht + offs_r[None, :], acc,
                     mask=mask_m[:, None] & mask_r[None, :])


@triton.jit
def _expand_kernel(h_ptr, b_ptr, y_ptr, starts_ptr, lens_ptr, slots_ptr, ranks_ptr, N, N_TILES,
                   stride_hs, stride_ht, stride_hp, stride_bs, stride_bp, stride_bn, stride_yt, stride_rp, stride_rs,
                   SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                   STORE: tl.constexpr):
    seg = tl.program_id(0)
    m0 = tl.program_id(1) * BLOCK_M
    part = tl.program_id(2) // N_TILES
    n0 = (tl.program_id(2) % N_TILES) * BLOCK_N
    length = tl.load(lens_ptr + seg)
    slot = tl.load(slots_ptr + seg).to(tl.int64)
    rank = tl.load(ranks_ptr + part * stride_rp + slot * stride_rs)
    dtype = y_ptr.dtype.element_ty
    start = tl.load(starts_ptr + seg).to(tl.int64)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    y_base = y_ptr + part * N
    if (slot == 0) | (rank == 0) | (m0 >= length):
        if STORE:  # decode into an unzeroed buffer (one row per segment): a skipped row's term is zero
            tl.store(y_base + (start + m0) * stride_yt + offs_n, tl.zeros([BLOCK_N], dtype=dtype), mask=mask_n)
        return
    b_base = b_ptr + slot * stride_bs + part * stride_bp
    h_base = h_ptr + part * stride_hp
    if BLOCK_M == 1:  # decode, one token: GEMV
        row = start + m0
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for r0 in range(0, rank, BLOCK_R):  # the K loop runs over the slot's real rank only
            offs_r = r0 + tl.arange(0, BLOCK_R)
            mask_r = offs_r < rank
            h = tl.zeros([BLOCK_R], dtype=tl.float32)
            for s in tl.static_range(SPLIT_K):  # the shrink's partial sums over K
                h += tl.load(h_base + s * stride_hs + row * stride_ht + offs_r, mask=mask_r, other=0.0)
            h = h.to(dtype)  # the reference's h is a model-dtype tensor
            b = tl.load(b_base + offs_n[:, None] * stride_bn + offs_r[None, :],
                        mask=mask_n[:, None] & mask_r[None, :], other=0.0)  # [BN, BR]
            acc += tl.sum(b.to(tl.float32) * h.to(tl.float32)[None, :], axis=1)
        y_ptrs = y_base + row * stride_yt + offs_n
        if STORE:  # y = the term, rounded once (the caller adds it to the base output)
            tl.store(y_ptrs, acc.to(dtype), mask=mask_n)
        else:
            y = tl.load(y_ptrs, mask=mask_n, other=0.0)
            tl.store(y_ptrs, (y.to(tl.float32) + acc.to(dtype).to(tl.float32)).to(dtype), mask=mask_n)
    else:  # a tile of tokens: tl.dot
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < length
        rows = start + offs_m
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for r0 in range(0, rank, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            mask_r = offs_r < rank
            h_mask = mask_m[:, None] & mask_r[None, :]
            h = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
            for s in range(SPLIT_K):  # a loop, not unrolled: unrolled, Triton staged every split's loads in shared
                # memory (SPLIT_K x BLOCK_M x 64 bytes: 528 KB for one 64-token prompt at the 7B width)
                h += tl.load(h_base + s * stride_hs + rows[:, None] * stride_ht + offs_r[None, :], mask=h_mask,
                             other=0.0)
            b = tl.load(b_base + offs_n[:, None] * stride_bn + offs_r[None, :],
                        mask=mask_n[:, None] & mask_r[None, :], other=0.0)  # [BN, BR]
            acc += tl.dot(h.to(dtype), tl.trans(b), input_precision="ieee")
        y_ptrs = y_base + rows[:, None] * stride_yt + offs_n[None, :]
        y_mask = mask_m[:, None] & mask_n[None, :]
        y = tl.load(y_ptrs, mask=y_mask, other=0.0)
        tl.store(y_ptrs, (y.to(tl.float32) + acc.to(dtype).to(tl.float32)).to(dtype), mask=y_mask)
# fmt: on


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a few programs are enough
    return torch.cuda.get_device_properties(device).multi_processor_count


@dataclass(frozen=True)
class _Plan:
    """Tiles of one module call; a function of shapes and the host-side max_len only (graph-stable)."""

    block_m: int  # token rows per program (1: decode's GEMV form)
    m_tiles: int
    shrink_r: int  # the shrink's rank tile (a tl.dot operand dim when block_m > 1)
    block_k: int
    split: int  # programs splitting K in the shrink (partial sums, added by the expand)
    k_per_split: int


H_BUDGET = 32 * 2**20  # bytes of fp32 partial sums one shrink may allocate (a long prefill caps its K split)


def _block_m(max_len: int) -> int:
    """Token rows per program for segments of up to max_len tokens (1: decode's GEMV form)."""
    return 1 if max_len == 1 else 16 if max_len <= 16 else 32 if max_len <= 32 else 64


def _plan(
    x: torch.Tensor, a_pool: torch.Tensor, num_segments: int, max_len: int, decode_k: int = 256, per_sm: int = 2
) -> _Plan:
    """The K split fills the GPU when the segments alone give too few programs; it is rounded down to a
    power of two (SPLIT_K is a compile-time constant: a handful of variants, not one per batch shape) and
    capped so the partial sums [split, T, P, r_max] stay within H_BUDGET. decode_k: decode's K tile; per_sm:
    the programs per SM decode's K split aims at (prefill: 2)."""
    (T, K), (_, P, r_max, _) = x.shape, a_pool.shape
    block_m = _block_m(max_len)
    if block_m == 1:  # decode: one token per segment
        shrink_r, block_k = 16, decode_k
    else:
        shrink_r, block_k = min(64, max(16, triton.next_power_of_2(r_max))), 64  # one pass over x for r_max <= 64
    m_tiles = triton.cdiv(max_len, block_m)
    programs = num_segments * m_tiles * P
    split = max(
        1,
        min(
            triton.cdiv(K, block_k),
            triton.cdiv((per_sm if block_m == 1 else 2) * _num_sms(x.device), programs),
            H_BUDGET // max(1, T * P * r_max * 4),
        ),
    )
    split = 1 << (split.bit_length() - 1)
    k_per_split = triton.cdiv(triton.cdiv(K, split), 64) * 64  # 128-byte aligned; the K loop masks the tail
    return _Plan(block_m, m_tiles, shrink_r, block_k, split, k_per_split)  # a trailing empty split writes zeros


def shrink_buffer(
    x: torch.Tensor, a_pool: torch.Tensor, num_segments: int, max_len: int, per_sm: int = 2
) -> torch.Tensor:
    """The (uninitialised) output of `lora_shrink` for these inputs: [SPLIT, T, P, r_max] fp32."""
    _, P, r_max, _ = a_pool.shape
    split = _plan(x, a_pool, num_segments, max_len, per_sm=per_sm).split
    return torch.empty(split, x.shape[0], P, r_max, dtype=torch.float32, device=x.device)


def lora_shrink(
    x: torch.Tensor,
    a_pool: torch.Tensor,
    ranks: torch.Tensor,
    starts: torch.Tensor,
    lens: torch.Tensor,
    slots: torch.Tensor,
    max_len: int,
    h: torch.Tensor | None = None,
    decode_k: int = 256,
    per_sm: int = 2,
) -> torch.Tensor:
    """h[split, t, p, :rank] = partial sums of x[t] · A[slot(t), p, :rank]ᵀ over K split `split`, fp32.

    x: [T, K]; a_pool: [slots, P, r_max, K]; ranks: [P, slots] int32; starts, lens, slots: [S] (segments)
    -> h: [SPLIT, T, P, r_max] fp32 (`h`: a `shrink_buffer` to write into), written only at tokens of
    segments with a non-zero rank and rank lanes below it (the expand reads no others). decode_k: decode's
    K tile (a power of two), per_sm: programs per SM its K split aims at (for tuning; `h` must then come
    from this call).
    """
    T, K = x.shape
    _, P, r_max, K_a = a_pool.shape
    if K_a != K or a_pool.stride(-1) != 1 or x.stride(-1) != 1:
        raise ValueError(f"lora_shrink: x {tuple(x.shape)} / A pool {tuple(a_pool.shape)} (unit stride on K)")
    S = slots.shape[0]
    plan = _plan(x, a_pool, S, max_len, decode_k, per_sm)
    if h is None:
        h = torch.empty(plan.split, T, P, r_max, dtype=torch.float32, device=x.device)
    elif h.shape != (plan.split, T, P, r_max) or h.dtype != torch.float32:
        raise ValueError(f"lora_shrink: h {tuple(h.shape)} {h.dtype}, expected {(plan.split, T, P, r_max)} fp32")
    if S == 0 or T == 0:
        return h
    strides = (x.stride(0), *a_pool.stride()[:3], *h.stride()[:3], *ranks.stride())
    tiles = {"SPLIT_K": plan.split, "BLOCK_M": plan.block_m, "BLOCK_R": plan.shrink_r, "BLOCK_K": plan.block_k}
    grid = (S, plan.m_tiles, P * plan.split)
    _shrink_kernel[grid](x, a_pool, h, starts, lens, slots, ranks, K, plan.k_per_split, *strides, **tiles, num_warps=4)
    return h


def lora_expand(
    y: torch.Tensor,
    h: torch.Tensor,
    b_pool: torch.Tensor,
    ranks: torch.Tensor,
    starts: torch.Tensor,
    lens: torch.Tensor,
    slots: torch.Tensor,
    max_len: int,
    block_n: int = 0,
    store: bool = False,
) -> None:
    """y[t, p·N + n] += (Σ_split h[split, t, p]) · B[slot(t), p, n, :rank]ᵀ, in place.

    y: [T, P·N] (row stride free, unit column stride); h from `lora_shrink`; b_pool: [slots, P, N, r_max];
    ranks, starts, lens, slots, max_len: as for `lora_shrink`; block_n: output columns per program (0: the
    default, 256 for decode, else 128; a power of two, for tuning). store: y = the term instead of y += it
    (decode with one segment per row of y, so every row is written: y need not be zeroed first).
    """
    T = y.shape[0]
    _, P, N, r_max = b_pool.shape
    if y.shape[1] != P * N or y.stride(-1) != 1 or b_pool.stride(-1) != 1 or h.shape[1:] != (T, P, r_max):
        raise ValueError(f"lora_expand: y {tuple(y.shape)}, h {tuple(h.shape)}, B pool {tuple(b_pool.shape)}")
    S = slots.shape[0]
    if store and (max_len != 1 or S != T):
        raise ValueError(
            f"lora_expand: store needs one segment per row of y ({S} segments, max_len {max_len}, {T} rows)"
        )
    if S == 0 or T == 0:
        return
    block_m = _block_m(max_len)
    block_n = block_n or (256 if block_m == 1 else 128)
    n_tiles = triton.cdiv(N, block_n)
    strides = (*h.stride()[:3], *b_pool.stride()[:3], y.stride(0), *ranks.stride())
    tiles = {"SPLIT_K": h.shape[0], "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_R": 16, "STORE": store}
    grid = (S, triton.cdiv(max_len, block_m), P * n_tiles)
    _expand_kernel[grid](h, b_pool, y, starts, lens, slots, ranks, N, n_tiles, *strides, **tiles, num_warps=4)


def add_lora(
    y: torch.Tensor,
    x: torch.Tensor,
    a_pool: torch.Tensor,
    b_pool: torch.Tensor,
    ranks: torch.Tensor,
    starts: torch.Tensor,
    lens: torch.Tensor,
    slots: torch.Tensor,
    max_len: int,
) -> None:
    """y[t, p·N:(p+1)·N] += B[s, p] A[s, p] x[t] for every token t of a segment with slot s, in place.

    y: [T, P·N]; x: [T, K]; a_pool: [slots, P, r_max, K]; b_pool: [slots, P, N, r_max]; ranks: [P, slots]
    int32; starts, lens, slots: [S] (segments); max_len: the longest segment.
    """
    h = lora_shrink(x, a_pool, ranks, starts, lens, slots, max_len)
    lora_expand(y, h, b_pool, ranks, starts, lens, slots, max_len)


__all__ = [
    "shrink_buffer",
    "lora_shrink",
    "lora_expand",
    "add_lora",
    "add_lora_reference",
    "lora_expand_rows",
    "lora_expand_rows_partials",
    "lora_expand_rows_silu_mul",
    "lora_term_rows_partials",
    "rms_norm_shrink",
]
