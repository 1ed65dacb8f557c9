"""Paged prefill in Triton: causal attention of each sequence's new tokens over its cached prefix.

Grid (query tiles of all sequences, heads); the tile -> (sequence, tile index) map is built with torch
ops (no host sync). A tile at absolute positions cache_len + [m*BM, (m+1)*BM) walks the key tiles below
its first query without masks, then the diagonal tiles with the causal mask. Keys and values come from
the paged cache (new tokens already stored) or, without a cache, straight from the new tokens' k/v.
fp8 keys enter tl.dot widened exactly to the query dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from worker.kernels.triton_attention import LOG2E, NEG_BIG, Tiles, check_cache, pow2, rows_contiguous, scale_args
from worker.ops import Scale


@triton.jit
def _kv_rows(
    pos,
    mask,
    seq,
    h,
    kv_start,
    tables_ptr,
    stride_tb,
    stride_b,
    stride_r,
    stride_h,
    PAGED: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """Element offsets of key positions `pos` of sequence `seq`, head h: paged cache or packed k/v."""
    if PAGED:
        blk = tl.load(tables_ptr + seq.to(tl.int64) * stride_tb + pos // BLOCK_SIZE, mask=mask, other=0)
        return blk.to(tl.int64) * stride_b + (pos % BLOCK_SIZE) * stride_r + h * stride_h
    else:
        return (kv_start + pos).to(tl.int64) * stride_r + h * stride_h


@triton.jit
def _prefill_tile(
    q,
    acc,
    m_i,
    l_i,
    k_ptr,
    v_ptr,
    rows,
    pos,
    q_pos,
    key_end,
    scale_log2e,
    HEAD_DIM: tl.constexpr,
    CAUSAL_MASK: tl.constexpr,
):
    """One key tile (element offsets `rows` of key positions `pos`) into the running softmax."""
    d = tl.arange(0, HEAD_DIM)
    if CAUSAL_MASK:
        valid = pos < key_end
        k = tl.load(k_ptr + rows[:, None] + d[None, :], mask=valid[:, None], other=0.0)
        v = tl.load(v_ptr + rows[:, None] + d[None, :], mask=valid[:, None], other=0.0)
    else:
        k = tl.load(k_ptr + rows[:, None] + d[None, :])
        v = tl.load(v_ptr + rows[:, None] + d[None, :])
    s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision="ieee") * scale_log2e  # [BM, BN]
    if CAUSAL_MASK:
        s = tl.where((pos[None, :] <= q_pos[:, None]) & valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision="ieee")
    return acc, m_new, l_i


@triton.jit(do_not_specialize=["num_seqs", "stride_tb"])  # one compile for any batch / table width
def _prefill_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    tables_ptr,
    cu_q_ptr,
    cache_lens_ptr,
    tile_seq_ptr,
    tile_m_ptr,
    k_scale_ptr,
    v_scale_ptr,
    num_seqs,
    scale_log2e,
    stride_qt,
    stride_qh,
    stride_b,
    stride_r,
    stride_h,
    stride_tb,
    stride_ot,
    stride_oh,
    PAGED: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SCALED: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    tile = tl.program_id(0)
    h = tl.program_id(1)
    seq = tl.load(tile_seq_ptr + tile)
    if seq >= num_seqs:  # the grid is an upper bound on the number of tiles
        return
    q_start = tl.load(cu_q_ptr + seq)
    n_new = tl.load(cu_q_ptr + seq + 1) - q_start
    cache_len = 0
    if PAGED:
        cache_len = tl.load(cache_lens_ptr + seq)
    first_i = tl.load(tile_m_ptr + tile) * BLOCK_M
    i = first_i + tl.arange(0, BLOCK_M)  # index among the sequence's new tokens
    row_ok = i < n_new
    q_pos = cache_len + i  # absolute positions: query q_pos sees keys 0..q_pos
    d = tl.arange(0, HEAD_DIM)
    q_rows = (q_start + i).to(tl.int64) * stride_qt + h * stride_qh
    q = tl.load(q_ptr + q_rows[:, None] + d[None, :], mask=row_ok[:, None], other=0.0)
    if SCALED:  # fp8 keys enter tl.dot widened exactly to q's dtype; their scale multiplies the scores
        scale_log2e = scale_log2e * tl.load(k_scale_ptr)

    key_end = cache_len + tl.minimum(n_new, first_i + BLOCK_M)  # exclusive: the tile's last query + 1
    full_end = ((cache_len + first_i) // BLOCK_N) * BLOCK_N  # keys below: visible to every query of the tile
    m_i = tl.full([BLOCK_M], NEG_BIG, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    if PREFETCH:  # the next tile's table entries load while this tile computes (off the K/V loads' path)
        pos = tl.arange(0, BLOCK_N)
        rows = _kv_rows(
            pos, pos < full_end, seq, h, q_start, tables_ptr, stride_tb, stride_b, stride_r, stride_h, PAGED, BLOCK_SIZE
        )
        for _n0 in range(0, full_end, BLOCK_N):
            nxt = pos + BLOCK_N
            rows_next = _kv_rows(
                nxt,
                nxt < full_end,
                seq,
                h,
                q_start,
                tables_ptr,
                stride_tb,
                stride_b,
                stride_r,
                stride_h,
                PAGED,
                BLOCK_SIZE,
            )
            acc, m_i, l_i = _prefill_tile(
                q, acc, m_i, l_i, k_ptr, v_ptr, rows, pos, q_pos, key_end, scale_log2e, HEAD_DIM, False
            )
            pos, rows = nxt, rows_next
    else:
        for n0 in range(0, full_end, BLOCK_N):
            pos = n0 + tl.arange(0, BLOCK_N)
            rows = _kv_rows(
                pos, pos >= 0, seq, h, q_start, tables_ptr, stride_tb, stride_b, stride_r, stride_h, PAGED, BLOCK_SIZE
            )
            acc, m_i, l_i = _prefill_tile(
                q, acc, m_i, l_i, k_ptr, v_ptr, rows, pos, q_pos, key_end, scale_log2e, HEAD_DIM, False
            )
    for n0 in range(full_end, key_end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        rows = _kv_rows(
            pos, pos < key_end, seq, h, q_start, tables_ptr, stride_tb, stride_b, stride_r, stride_h, PAGED, BLOCK_SIZE
        )
        acc, m_i, l_i = _prefill_tile(
            q, acc, m_i, l_i, k_ptr, v_ptr, rows, pos, q_pos, key_end, scale_log2e, HEAD_DIM, True
        )
    out = acc / tl.maximum(l_i, 1e-30)[:, None]
    if SCALED:
        out = out * tl.load(v_scale_ptr)
    o_rows = (q_start + i).to(tl.int64) * stride_ot + h * stride_oh
    tl.store(out_ptr + o_rows[:, None] + d[None, :], out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


def prefill_tile_map(cu_seqlen_q: torch.Tensor, num_tokens: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Query tile -> (sequence, tile index within it), with torch ops on cu_seqlen_q's device (no sync).

    The map has num_tokens // block_m + B entries (an upper bound on the tiles); spare entries point
    at sequence B, which the kernel skips."""
    num_seqs = cu_seqlen_q.numel() - 1
    n_new = (cu_seqlen_q[1:] - cu_seqlen_q[:-1]).long()  # [B]
    tiles = (n_new + block_m - 1) // block_m
    ends = torch.cumsum(tiles, 0)  # [B]
    t = torch.arange(num_tokens // block_m + num_seqs, device=cu_seqlen_q.device)
    seq = torch.searchsorted(ends, t, right=True)  # [grid]: first sequence whose tiles end after t
    first_tile = (ends - tiles)[seq.clamp(max=num_seqs - 1)]
    return seq.to(torch.int32), (t - first_tile).to(torch.int32)


def paged_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor | None,
    v_cache: torch.Tensor | None,
    block_tables: torch.Tensor | None,
    cu_seqlen_q: torch.Tensor,
    cache_lens: torch.Tensor | None,
    scale: float,
    tiles: Tiles,
    k_scale: Scale = None,
    v_scale: Scale = None,
) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its cached prefix (k_cache given, new tokens
    already stored) or over the new tokens alone (k_cache None; tables, cache lengths and scales unused).

    q, k, v: [T, heads, head_dim]; block_tables: [B, max_blocks] int32; cu_seqlen_q: [B+1] int32;
    cache_lens: [B] int32 tokens cached before this step. Returns [T, heads, head_dim] in q's dtype.
    """
    T, H, D = q.shape
    pow2(D, "head_dim")
    q = rows_contiguous(q)
    out = torch.empty(T, H, D, dtype=q.dtype, device=q.device)
    if T == 0:
        return out
    cu = cu_seqlen_q
    fp8_cache = k_cache is not None and k_cache.element_size() == 1
    block_m, block_n, warps, stages = tiles.prefill(q.dtype, fp8_cache, paged=k_cache is not None)
    tile_seq, tile_m = prefill_tile_map(cu, T, block_m)
    if k_cache is not None:
        assert v_cache is not None and block_tables is not None and cache_lens is not None
        check_cache(k_cache, v_cache, H, D)
        ks, vs, scaled = scale_args(k_scale, v_scale, q)
        keys, values, block_size = k_cache, v_cache, pow2(k_cache.shape[1], "block_size")
        tables, lens = block_tables, cache_lens
        strides = k_cache.stride()[:3]
    else:
        ks, vs, scaled = q, q, False
        keys, values, block_size = rows_contiguous(k), rows_contiguous(v), 1
        if keys.stride() != values.stride():
            keys, values = keys.contiguous(), values.contiguous()
        tables, lens = cu, cu  # unused
        strides = (0, keys.stride(0), keys.stride(1))
    _prefill_kernel[(tile_seq.numel(), H)](
        q,
        keys,
        values,
        out,
        tables,
        cu,
        lens,
        tile_seq,
        tile_m,
        ks,
        vs,
        cu.numel() - 1,
        scale * LOG2E,
        q.stride(0),
        q.stride(1),
        *strides,
        tables.stride(0),
        out.stride(0),
        out.stride(1),
        PAGED=k_cache is not None,
        BLOCK_SIZE=block_size,
        HEAD_DIM=D,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        SCALED=scaled,
        PREFETCH=tiles.prefill_prefetch and k_cache is not None,
        num_warps=warps,
        num_stages=stages,
    )
    return out
