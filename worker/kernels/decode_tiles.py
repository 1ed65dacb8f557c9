"""The jit helpers of the paged decode kernels (worker/kernels/paged_decode.py): one key tile's K/V rows
through the block table, the online-softmax step (one running softmax per program, or per row: LANES),
and the log-sum-exp merge of split partials."""

from __future__ import annotations

import triton
import triton.language as tl

from worker.kernels.triton_attention import NEG_BIG


@triton.jit
def load_tile(
    kc_ptr,
    vc_ptr,
    table_ptr,
    n0,
    end,
    h,
    stride_cb,
    stride_cr,
    stride_ch,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """K and V rows of key positions [n0, n0 + BLOCK_N) of one head (rows at or past `end` are 0, not read)."""
    pos = n0 + tl.arange(0, BLOCK_N)
    valid = pos < end
    blk = tl.load(table_ptr + pos // BLOCK_SIZE, mask=valid, other=0)
    rows = blk.to(tl.int64) * stride_cb + (pos % BLOCK_SIZE) * stride_cr + h * stride_ch
    d = tl.arange(0, HEAD_DIM)
    k = tl.load(kc_ptr + rows[:, None] + d[None, :], mask=valid[:, None], other=0.0)
    v = tl.load(vc_ptr + rows[:, None] + d[None, :], mask=valid[:, None], other=0.0)
    return k, v, valid


@triton.jit
def softmax_step(q, k, v, valid, m_i, l_i, acc, LANES: tl.constexpr):
    """Online-softmax step over one tile. q: [D] (log2 units); k, v: [BLOCK_N, D]. LANES: m_i, l_i are
    [BLOCK_N] and acc [BLOCK_N, D] (one running softmax per row); else m_i, l_i scalars, acc [D]."""
    s = tl.sum(k.to(tl.float32) * q[None, :], 1)  # [BLOCK_N]
    if LANES:
        s = tl.where(valid, s, NEG_BIG)  # a row never valid keeps m = NEG_BIG: its p = 1 terms (v = 0 there)
        m_new = tl.maximum(m_i, s)  # get weight exp2(NEG_BIG - max m) = 0 in the merge after the loop
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new)
        acc = acc * alpha[:, None] + p[:, None] * v.to(tl.float32)
        l_i = l_i * alpha + p
    else:
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 0))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new)
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), 0)
        l_i = l_i * alpha + tl.sum(p, 0)
    return m_new, l_i, acc


@triton.jit
def merge_splits(
    m_ptr, l_ptr, acc_ptr, out_ptr, part0, num_splits, HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, CG: tl.constexpr
):
    """Log-sum-exp merge of one (sequence, head)'s split partials at part0 .. part0 + num_splits - 1 into
    out_ptr[:HEAD_DIM]. CG: read past L1 (partials written by other programs of the same launch)."""
    s = tl.arange(0, BLOCK_S)
    ok = s < num_splits
    part = part0 + s
    d = tl.arange(0, HEAD_DIM)
    rows = acc_ptr + part.to(tl.int64)[:, None] * HEAD_DIM + d[None, :]
    if CG:
        m = tl.load(m_ptr + part, mask=ok, other=NEG_BIG, cache_modifier=".cg")
        l_sum = tl.load(l_ptr + part, mask=ok, other=0.0, cache_modifier=".cg")
        acc = tl.load(rows, mask=ok[:, None], other=0.0, cache_modifier=".cg")
    else:
        m = tl.load(m_ptr + part, mask=ok, other=NEG_BIG)
        l_sum = tl.load(l_ptr + part, mask=ok, other=0.0)
        acc = tl.load(rows, mask=ok[:, None], other=0.0)
    w = tl.exp2(m - tl.max(m, 0))  # [S]: empty splits carry l = 0, acc = 0
    out = tl.sum(w[:, None] * acc, 0) / tl.maximum(tl.sum(w * l_sum, 0), 1e-30)
    tl.store(out_ptr + d, out.to(out_ptr.dtype.element_ty))
