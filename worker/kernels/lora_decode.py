"""Multi-LoRA for decode (one token per segment) in ONE launch per module instead of two (shrink, expand).

Work items (segment fastest): P·SPLIT shrink items per segment, then P·N_TILES expand items. A program
takes the next item from a ticket counter when it starts (as single-pass scans assign tiles), so every
shrink item is taken before any expand item, by a program already running. Shrinks write their fp32
partial sums of h = x · A[slot, p]ᵀ and count themselves in an arrival counter per (segment, part); the
expands of that (segment, part) wait for SPLIT arrivals, then add (Σ_split h) · B[slot, p]ᵀ to their
output tile of y in place. A wait is only ever for a running program, whatever order the GPU dispatches
programs in. The program taking the last ticket resets it, the last expand of a (segment, part) its
counters: a CUDA graph replays with the same buffer.

Numerics and the K split are those of worker/kernels/lora.py (`_plan`, the reference in lora_reference.py);
segments of slot 0 or rank 0 return at once. The decode path of `LoraTerm` uses it when `decode == "sync"`.
Measured slower than the two launches on an H200 (68.5 vs 43.4 us per layer at batch 32).

`add_lora_decode_local` (`decode == "local"`) is one launch without counters: each program recomputes its
row's h over all of K and expands one output range, trading L2 re-reads of A for the second launch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from worker.kernels.lora import _num_sms, _plan
from worker.kernels.lora_rows import tile_columns
from worker.kernels.paged_decode import DecodeWorkspace


# fmt: off
@triton.jit
def _decode_lora_kernel(x_ptr, a_ptr, b_ptr, y_ptr, h_ptr, sync_ptr, starts_ptr, slots_ptr, ranks_ptr,
                        K, K_PER_SPLIT, N, N_TILES, NUM_SYNC,
                        stride_xt, stride_as, stride_ap, stride_ar, stride_hs, stride_ht, stride_hp,
                        stride_bs, stride_bp, stride_bn, stride_yt, stride_rp, stride_rs,
                        P: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                        BLOCK_N: tl.constexpr):
    # work items in the order programs start (a ticket), not by program id: a waiting expand only ever
    # waits for shrinks already running, whatever order the GPU dispatches programs in
    total = tl.num_programs(0)
    ticket = tl.atomic_add(sync_ptr + 2 * NUM_SYNC, 1, sem="relaxed", scope="gpu")
    if ticket == total - 1:  # every ticket is taken: ready for the next launch
        tl.atomic_xchg(sync_ptr + 2 * NUM_SYNC, 0, sem="relaxed", scope="gpu")
    num_segs = NUM_SYNC // P
    seg = ticket % num_segs
    z = ticket // num_segs
    shrink = z < P * SPLIT_K
    e = z - P * SPLIT_K  # the expand programs' index
    part = tl.where(shrink, z // SPLIT_K, e // N_TILES)
    slot = tl.load(slots_ptr + seg).to(tl.int64)
    rank = tl.load(ranks_ptr + part * stride_rp + slot * stride_rs)
    if (slot == 0) | (rank == 0):
        return
    row = tl.load(starts_ptr + seg).to(tl.int64)  # the segment's one token
    sync = seg * P + part
    h_base = h_ptr + row * stride_ht + part * stride_hp
    if shrink:  # h[split, row, part, :rank] over this program's K range (GEMV)
        split = z % SPLIT_K
        k_lo = split * K_PER_SPLIT
        k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
        a_base = a_ptr + slot * stride_as + part * stride_ap
        for r0 in range(0, rank, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            mask_r = offs_r < rank
            acc = tl.zeros([BLOCK_R], dtype=tl.float32)
            for k0 in range(k_lo, k_hi, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                mask_k = offs_k < k_hi
                x = tl.load(x_ptr + row * stride_xt + offs_k, mask=mask_k, other=0.0)
                a = tl.load(a_base + offs_r[:, None] * stride_ar + offs_k[None, :],
                            mask=mask_r[:, None] & mask_k[None, :], other=0.0)
                acc += tl.sum(a.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)
            tl.store(h_base + split * stride_hs + offs_r, acc, mask=mask_r)
        tl.debug_barrier()  # every thread's partial sums are stored before the release
        tl.atomic_add(sync_ptr + sync, 1, sem="release", scope="gpu")
    else:  # y[row, part·N + n-tile] += (Σ_split h) · B[slot, part, n-tile, :rank]ᵀ
        arrived = tl.atomic_add(sync_ptr + sync, 0, sem="acquire", scope="gpu")
        while arrived < SPLIT_K:
            arrived = tl.atomic_add(sync_ptr + sync, 0, sem="acquire", scope="gpu")
        dtype = y_ptr.dtype.element_ty
        offs_n = (e % N_TILES) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        b_base = b_ptr + slot * stride_bs + part * stride_bp
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for r0 in range(0, rank, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            mask_r = offs_r < rank
            h = tl.zeros([BLOCK_R], dtype=tl.float32)
            for s in tl.static_range(SPLIT_K):  # written by other programs of this launch: past L1
                h += tl.load(h_base + s * stride_hs + offs_r, mask=mask_r, other=0.0, cache_modifier=".cg")
            h = h.to(dtype)  # the reference's h is a model-dtype tensor
            b = tl.load(b_base + offs_n[:, None] * stride_bn + offs_r[None, :],
                        mask=mask_n[:, None] & mask_r[None, :], other=0.0)
            acc += tl.sum(b.to(tl.float32) * h.to(tl.float32)[None, :], axis=1)
        y_ptrs = y_ptr + row * stride_yt + part * N + offs_n
        y = tl.load(y_ptrs, mask=mask_n, other=0.0)
        tl.store(y_ptrs, (y.to(tl.float32) + acc.to(dtype).to(tl.float32)).to(dtype), mask=mask_n)
        if tl.atomic_add(sync_ptr + NUM_SYNC + sync, 1, sem="acq_rel", scope="gpu") == N_TILES - 1:
            tl.atomic_xchg(sync_ptr + sync, 0, sem="relaxed", scope="gpu")  # the last expand: reset both
            tl.atomic_xchg(sync_ptr + NUM_SYNC + sync, 0, sem="relaxed", scope="gpu")
# fmt: on


def _check(name: str, y: torch.Tensor, x: torch.Tensor, a_pool: torch.Tensor, b_pool: torch.Tensor) -> None:
    """The shapes and unit strides the decode kernels assume, else a ValueError naming what is wrong."""
    _, P, N, _ = b_pool.shape
    if a_pool.shape[-1] != x.shape[1] or a_pool.stride(-1) != 1 or x.stride(-1) != 1 or b_pool.stride(-1) != 1:
        raise ValueError(f"{name}: x {tuple(x.shape)} / A pool {tuple(a_pool.shape)} (unit stride on K)")
    if y.shape[1] != P * N or y.stride(-1) != 1:
        raise ValueError(f"{name}: y {tuple(y.shape)}, B pool {tuple(b_pool.shape)}")


def add_lora_decode(
    y: torch.Tensor,
    x: torch.Tensor,
    a_pool: torch.Tensor,
    b_pool: torch.Tensor,
    ranks: torch.Tensor,
    starts: torch.Tensor,
    slots: torch.Tensor,
    workspace: DecodeWorkspace,
) -> None:
    """y[t, p·N:(p+1)·N] += B[s, p] A[s, p] x[t] for the one token t = starts[i] of each segment i (slot
    s = slots[i]), in one launch. y: [T, P·N]; x: [T, K]; a_pool: [slots, P, r_max, K]; b_pool:
    [slots, P, N, r_max]; ranks: [P, slots] int32; starts, slots: [S]; workspace: its counters (kept)."""
    _check("add_lora_decode", y, x, a_pool, b_pool)
    T, K = x.shape
    _, P, N, r_max = b_pool.shape
    S = slots.shape[0]
    if S == 0 or T == 0:
        return
    plan = _plan(x, a_pool, S, 1)
    block_n = 256
    n_tiles = triton.cdiv(N, block_n)
    h = torch.empty(plan.split, T, P, r_max, dtype=torch.float32, device=x.device)
    sync = workspace.counters(2 * S * P + 1, x.device)  # arrivals [S·P], departures [S·P], the ticket
    strides = (x.stride(0), *a_pool.stride()[:3], *h.stride()[:3], *b_pool.stride()[:3], y.stride(0), *ranks.stride())
    tiles = dict(P=P, SPLIT_K=plan.split, BLOCK_R=16, BLOCK_K=plan.block_k, BLOCK_N=block_n)
    grid = (S * P * (plan.split + n_tiles),)  # tickets: (segment fastest) shrinks of every part, then expands
    _decode_lora_kernel[grid](
        x,
        a_pool,
        b_pool,
        y,
        h,
        sync,
        starts,
        slots,
        ranks,
        K,
        plan.k_per_split,
        N,
        n_tiles,
        S * P,
        *strides,
        **tiles,
        num_warps=4,
    )


# fmt: off
@triton.jit
def _decode_lora_local_kernel(x_ptr, a_ptr, b_ptr, y_ptr, starts_ptr, slots_ptr, ranks_ptr, K, N, N_PER_PROG, N_SPLIT,
                              stride_xt, stride_as, stride_ap, stride_ar, stride_bs, stride_bp, stride_bn, stride_yt,
                              stride_rp, stride_rs,
                              BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    seg = tl.program_id(0)
    part = tl.program_id(1) // N_SPLIT
    n_lo = (tl.program_id(1) % N_SPLIT) * N_PER_PROG
    slot = tl.load(slots_ptr + seg).to(tl.int64)
    rank = tl.load(ranks_ptr + part * stride_rp + slot * stride_rs)
    if (slot == 0) | (rank == 0) | (n_lo >= N):
        return
    dtype = y_ptr.dtype.element_ty
    row = tl.load(starts_ptr + seg).to(tl.int64)  # the segment's one token
    offs_r = tl.arange(0, BLOCK_R)  # BLOCK_R >= r_max: h is one register tile
    mask_r = offs_r < rank
    a_base = a_ptr + slot * stride_as + part * stride_ap
    acc_h = tl.zeros([BLOCK_R], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):  # h = x[row] · A[slot, part]ᵀ over all of K (other programs of the row: L2)
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + row * stride_xt + offs_k, mask=mask_k, other=0.0)
        a = tl.load(a_base + offs_r[:, None] * stride_ar + offs_k[None, :], mask=mask_r[:, None] & mask_k[None, :],
                    other=0.0)
        acc_h += tl.sum(a.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)
    h = acc_h.to(dtype).to(tl.float32)  # the reference's h is a model-dtype tensor
    b_base = b_ptr + slot * stride_bs + part * stride_bp
    y_base = y_ptr + row * stride_yt + part * N
    n_hi = tl.minimum(n_lo + N_PER_PROG, N)
    for n0 in range(n_lo, n_hi, BLOCK_N):  # y[row, part·N + n-range] += h · B[slot, part, n-range]ᵀ
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n_hi
        b = tl.load(b_base + offs_n[:, None] * stride_bn + offs_r[None, :], mask=mask_n[:, None] & mask_r[None, :],
                    other=0.0)
        acc = tl.sum(b.to(tl.float32) * h[None, :], axis=1)
        y = tl.load(y_base + offs_n, mask=mask_n, other=0.0)
        tl.store(y_base + offs_n, (y.to(tl.float32) + acc.to(dtype).to(tl.float32)).to(dtype), mask=mask_n)
# fmt: on


@dataclass(frozen=True)
class LocalTiles:
    """Tiles of `add_lora_decode_local` (at r_max 16; wider ranks keep the lanes: fewer K or N per tile);
    n_split 0: enough output ranges per (row, part) for ~2 programs per SM. Triton does not pipeline these
    plain loads, so each loop step waits for its tiles: large tiles keep enough bytes in flight."""

    n_split: int = 0
    block_k: int = 512
    block_n: int = 512
    num_warps: int = 8  # ~108 registers at r_max 16 on sm_90: two programs per SM


def _n_split(tiles: LocalTiles, rows: int, P: int, N: int, block_n: int, device: torch.device) -> int:
    if tiles.n_split:
        return tiles.n_split
    return max(1, min(triton.cdiv(N, block_n), triton.cdiv(2 * _num_sms(device), rows * P)))


def add_lora_decode_local(
    y: torch.Tensor,
    x: torch.Tensor,
    a_pool: torch.Tensor,
    b_pool: torch.Tensor,
    ranks: torch.Tensor,
    starts: torch.Tensor,
    slots: torch.Tensor,
    tiles: LocalTiles = LocalTiles(),
) -> None:
    """`add_lora_decode` without any sync between programs: one launch, grid (segment, part × output range);
    every program computes its row's h over all of K itself (the same A re-read by the row's other programs
    comes from L2), then adds h · Bᵀ over its output range. Pays where N ≫ K (c_attn, gate_up); where K ≫ N
    (mlp.c_proj) the redundant A reads dominate. Same arguments and numerics as `add_lora_decode`."""
    _check("add_lora_decode_local", y, x, a_pool, b_pool)
    T, K = x.shape
    _, P, N, r_max = b_pool.shape
    S = slots.shape[0]
    if S == 0 or T == 0:
        return
    block_r = max(16, triton.next_power_of_2(r_max))
    block_n = tile_columns(tiles.block_n, block_r)  # the tiles' lanes do not grow with r_max
    n_split = _n_split(tiles, S, P, N, block_n, x.device)
    n_per_prog = triton.cdiv(triton.cdiv(N, n_split), block_n) * block_n
    strides = (x.stride(0), *a_pool.stride()[:3], *b_pool.stride()[:3], y.stride(0), *ranks.stride())
    consts = dict(BLOCK_R=block_r, BLOCK_K=tile_columns(tiles.block_k, block_r), BLOCK_N=block_n)
    grid = (S, P * n_split)
    _decode_lora_local_kernel[grid](
        x,
        a_pool,
        b_pool,
        y,
        starts,
        slots,
        ranks,
        K,
        N,
        n_per_prog,
        n_split,
        *strides,
        **consts,
        num_warps=tiles.num_warps,
    )
