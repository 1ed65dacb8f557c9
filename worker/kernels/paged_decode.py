"""Paged decode (one new token per sequence, already stored in the cache): flash-decoding in Triton.

Grid (batch, heads, num_splits): a split owns an equal share of its own sequence's key tiles (computed
in-kernel from the context lengths, so a fixed num_splits works under CUDA graphs) and writes fp32
(max, sum, acc) partials; a second kernel merges the splits with the log-sum-exp rule. One split
writes the output directly. fp8 keys and values are widened to fp32 exactly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from worker.kernels.triton_attention import LOG2E, NEG_BIG, Tiles, check_cache, pow2, rows_contiguous, scale_args
from worker.ops import Scale


@triton.jit
def _decode_split_kernel(
    q_ptr,
    kc_ptr,
    vc_ptr,
    tables_ptr,
    lens_ptr,
    out_ptr,
    m_ptr,
    l_ptr,
    acc_ptr,
    k_scale_ptr,
    v_scale_ptr,
    scale_log2e,
    num_splits,
    stride_qt,
    stride_qh,
    stride_cb,
    stride_cr,
    stride_ch,
    stride_tb,
    stride_ot,
    stride_oh,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DIRECT: tl.constexpr,
    SCALED: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    num_heads = tl.num_programs(1)
    ctx_len = tl.load(lens_ptr + b)
    tiles_per_split = tl.cdiv(tl.cdiv(ctx_len, BLOCK_N), num_splits)
    start = split * tiles_per_split * BLOCK_N
    end = tl.minimum(start + tiles_per_split * BLOCK_N, ctx_len)

    d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + b.to(tl.int64) * stride_qt + h * stride_qh + d).to(tl.float32) * scale_log2e
    if SCALED:  # scores q·(k_fp8 × k_scale) = (q × k_scale)·k_fp8
        q = q * tl.load(k_scale_ptr)
    m_i = tl.full([], NEG_BIG, tl.float32)
    l_i = tl.zeros([], tl.float32)
    acc = tl.zeros([HEAD_DIM], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        valid = pos < end
        blk = tl.load(tables_ptr + b.to(tl.int64) * stride_tb + pos // BLOCK_SIZE, mask=valid, other=0)
        rows = blk.to(tl.int64) * stride_cb + (pos % BLOCK_SIZE) * stride_cr + h * stride_ch
        k = tl.load(kc_ptr + rows[:, None] + d[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
        s = tl.where(valid, tl.sum(k * q[None, :], 1), float("-inf"))  # [BLOCK_N], log2 units
        m_new = tl.maximum(m_i, tl.max(s, 0))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new)
        v = tl.load(vc_ptr + rows[:, None] + d[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * v, 0)
        l_i = l_i * alpha + tl.sum(p, 0)
        m_i = m_new
    if SCALED:  # Σ p (v_fp8 × v_scale) = v_scale Σ p v_fp8 (the split merge is linear in acc)
        acc = acc * tl.load(v_scale_ptr)

    if DIRECT:  # a single split: l_i >= 1 unless the context is empty (padding), then the output is 0
        out = acc / tl.maximum(l_i, 1e-30)
        tl.store(out_ptr + b.to(tl.int64) * stride_ot + h * stride_oh + d, out.to(out_ptr.dtype.element_ty))
    else:
        part = (b * num_heads + h) * num_splits + split
        tl.store(m_ptr + part, m_i)
        tl.store(l_ptr + part, l_i)
        tl.store(acc_ptr + part.to(tl.int64) * HEAD_DIM + d, acc)


@triton.jit
def _decode_reduce_kernel(
    m_ptr, l_ptr, acc_ptr, out_ptr, num_splits, stride_ot, stride_oh, HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    num_heads = tl.num_programs(1)
    s = tl.arange(0, BLOCK_S)
    ok = s < num_splits
    part = (b * num_heads + h) * num_splits + s
    m = tl.load(m_ptr + part, mask=ok, other=NEG_BIG)
    l_sum = tl.load(l_ptr + part, mask=ok, other=0.0)
    d = tl.arange(0, HEAD_DIM)
    acc = tl.load(acc_ptr + part.to(tl.int64)[:, None] * HEAD_DIM + d[None, :], mask=ok[:, None], other=0.0)
    w = tl.exp2(m - tl.max(m, 0))  # [S]: empty splits carry l = 0, acc = 0
    out = tl.sum(w[:, None] * acc, 0) / tl.maximum(tl.sum(w * l_sum, 0), 1e-30)
    tl.store(out_ptr + b.to(tl.int64) * stride_ot + h * stride_oh + d, out.to(out_ptr.dtype.element_ty))


def choose_num_splits(batch: int, heads: int, max_k: int, block_n: int, sm_count: int, max_splits: int = 16) -> int:
    """Splits per (sequence, head): enough programs to fill the GPU (~2 per SM), each split covering at
    least two key tiles of the longest context, at most `max_splits`."""
    by_length = max(1, max_k // (2 * block_n))
    by_occupancy = max(1, -(-2 * sm_count // max(1, batch * heads)))
    return max(1, min(max_splits, by_length, by_occupancy))


def paged_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    max_k: int,
    scale: float,
    tiles: Tiles,
    num_splits: int | None = None,
    k_scale: Scale = None,
    v_scale: Scale = None,
) -> torch.Tensor:
    """Attention of each sequence's one new token over its whole cached context.

    q: [B, heads, head_dim] (row b is sequence b); block_tables: [B, max_blocks] int32; context_lens: [B]
    int32 (0: a padding row, output 0); max_k: the longest context (picks num_splits when None).
    Returns [B, heads, head_dim] in q's dtype.
    """
    B, H, D = q.shape
    pow2(D, "head_dim")
    q = rows_contiguous(q)
    check_cache(k_cache, v_cache, H, D)
    ks, vs, scaled = scale_args(k_scale, v_scale, q)
    if num_splits is None:
        sm_count = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 4
        num_splits = choose_num_splits(B, H, max_k, tiles.decode_n, sm_count)
    out = torch.empty(B, H, D, dtype=q.dtype, device=q.device)
    if B == 0:
        return out
    m_part = l_part = acc_part = out  # fp32 partials of the splits (unused at 1 split)
    if num_splits > 1:
        m_part = torch.empty(B, H, num_splits, dtype=torch.float32, device=q.device)
        l_part = torch.empty(B, H, num_splits, dtype=torch.float32, device=q.device)
        acc_part = torch.empty(B, H, num_splits, D, dtype=torch.float32, device=q.device)
    _decode_split_kernel[(B, H, num_splits)](
        q,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        out,
        m_part,
        l_part,
        acc_part,
        ks,
        vs,
        scale * LOG2E,
        num_splits,
        q.stride(0),
        q.stride(1),
        *k_cache.stride()[:3],
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        BLOCK_SIZE=pow2(k_cache.shape[1], "block_size"),
        HEAD_DIM=D,
        BLOCK_N=tiles.decode_n,
        DIRECT=num_splits == 1,
        SCALED=scaled,
        num_warps=tiles.decode_warps,
    )
    if num_splits > 1:
        _decode_reduce_kernel[(B, H)](
            m_part,
            l_part,
            acc_part,
            out,
            num_splits,
            out.stride(0),
            out.stride(1),
            HEAD_DIM=D,
            BLOCK_S=triton.next_power_of_2(num_splits),
            num_warps=1 if D <= 64 else 2,
        )
    return out
