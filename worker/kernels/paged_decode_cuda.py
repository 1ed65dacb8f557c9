"""The CUDA paged decode attention (worker/kernels/paged_decode.cu; DecodeKernels.attn_cuda, issue 16 P9): bf16
caches, head_dim 128, unscaled; one thread block cluster a (sequence, head) of 8 blocks at batch 1 and 4 at batch 2
(`FORMS`), below LONG_CONTEXT tokens, the first 64 or 96 keys of each block's share read before the PDL wait;
optionally (`Rope`) RoPE and the new rows' store inside. Built on first use with nvcc (worker/kernels/cuda_build.py)
into its own library; where nvcc is missing or the build fails, `library` says why and the backend keeps the Triton
kernels.
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
from typing import Any, NamedTuple

import torch

from worker.kernels.cuda_build import BuildError, build, find_nvcc
from worker.kernels.triton_attention import LOG2E

_HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = (os.path.join(_HERE, "paged_decode.cu"),)
HEADERS = (os.path.join(_HERE, "gptq_cuda.cuh"),)
HEAD_DIM = 128
# The cluster's blocks (a sequence and head's shares) and the 32-key chunks in flight a block, by decode batch: 256
# blocks at both. On the H200 (7B Int4 step, 512-token contexts, served kernels; BENCHMARKS.md, 2026-11-30, seventh):
# batch 1 at 8 x 2 1.928-1.934 ms against 1.98-2.04 for 4 x 2, 4 x 3, 4 x 4 and 2.08-2.09 with the Triton kernels;
# batch 2 at 4 x 3 2.099-2.109 against 2.165-2.187 with the Triton kernels and 2.215 at 8 x 2. The backend takes it at
# decode batches of at most MAX_BATCH (at 8, 8 x 2 measured 4.26 against 4.08 ms with the Triton kernels).
FORMS = {1: (8, 2), 2: (4, 3)}
MAX_BATCH = max(FORMS)
# The backend takes the kernel at steps whose longest context is below LONG_CONTEXT[rows] tokens: its forms are sized
# for short contexts, and from there the Triton split kernels (splits sized to the context) were faster on the H200
# (7B step; BENCHMARKS.md, 2026-11-30, tenth and eleventh). Int4, CUDA against Triton (eleventh): batch 1 2.05 / 2.16 /
# 2.40 / 2.62 ms at 1,536 / 2,048 / 3,072 / 4,000 tokens against 2.16 / 2.24 / 2.37 / 2.49; batch 2 2.26 / 2.47 / 2.85
# / 3.22 against 2.26 / 2.39 / 2.62 / 2.83. bf16 at 4k / 8k / 32k (tenth): batch 1 5.14 / 6.15 / 12.05 against 4.92 /
# 5.50 / 8.94, batch 2 5.85 / 7.50 / 17.37 against 5.28 / 6.22 / 11.97 (16-block clusters at batch 1 and 8 x 2 at batch
# 2 in between). A graph serves every context up to its own longest, so the engine captures the buckets of these rows
# twice where contexts can reach the threshold (engine/cuda_graphs.py).
LONG_CONTEXT = {1: 3072, 2: 2048}


def form_for(batch: int) -> tuple[int, int]:
    """(splits, depth) of the kernel at this batch (one of the .cu's forms)."""
    return FORMS.get(batch, FORMS[MAX_BATCH])


@functools.cache
def library(major: int, minor: int) -> ctypes.CDLL | str:
    """The built library for compute capability major.minor, or why there is none (a message)."""
    if major < 9:
        return f"it needs thread block clusters (sm_90+), the device is sm_{major}{minor}"
    try:
        path = build("paged_decode", SOURCES, HEADERS, major, minor, find_nvcc())
    except BuildError as e:
        return str(e)
    lib = ctypes.CDLL(path)
    p, i, ll = ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong
    lib.paged_decode_bf16.restype = i
    lib.paged_decode_bf16.argtypes = [
        *(p, p, p, p, p, p, ctypes.c_float, i, i, i, i, ll, ll, ll, i, i, i, i, i, p),
        *(p, p, i, i, i, i, p, p, i, i, p, p),  # RoPE's: k, v and their strides, cos, sin and theirs, logn, slots
        *(i, i),  # the cluster's blocks, the chunks in flight a block
    ]
    lib.paged_decode_error.restype = ctypes.c_char_p
    lib.paged_decode_error.argtypes = [i]
    return lib


def supports(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    tables: torch.Tensor,
    lens: torch.Tensor,
    scaled: bool,
) -> str | None:
    """None when the kernel serves this decode; else what it lacks."""
    if scaled or q.dtype != torch.bfloat16 or k_cache.dtype != torch.bfloat16:
        return f"it serves unscaled bf16 caches only (q {q.dtype}, cache {k_cache.dtype}, scaled {scaled})"
    if q.shape[-1] != HEAD_DIM:
        return f"it serves head_dim {HEAD_DIM} only (got {q.shape[-1]})"
    if k_cache.shape[2] != q.shape[1]:
        return f"it needs one cache head a query head (q {q.shape[1]}, cache {k_cache.shape[2]})"
    bs = k_cache.shape[1]
    if bs & (bs - 1) or k_cache.stride(-1) != 1:
        return f"it needs a power-of-two block size and unit stride on head_dim (block size {bs})"
    if v_cache.stride() != k_cache.stride() or v_cache.dtype != k_cache.dtype or v_cache.shape != k_cache.shape:
        return "it needs K and V caches of one layout"
    if q.stride(-1) != 1 or any(t.stride(i) % 4 or t.data_ptr() % 8 for t in (q, k_cache, v_cache) for i in (0, 1)):
        return "it reads 8-byte vectors of q and the caches (unit stride on head_dim, 8-byte aligned rows)"
    if tables.dtype != torch.int32 or lens.dtype != torch.int32 or tables.stride(-1) != 1 or lens.stride(0) != 1:
        return f"it needs int32 tables (unit stride on a row) and lengths (got {tables.dtype}, {lens.dtype})"
    if not q.is_cuda:
        return "it runs on CUDA devices only"
    return None


class Rope(NamedTuple):
    """The step's raw new k and v rows [B, H, 128] (views of qkv), cos / sin [B, 64] fp32, logn [B] fp32 or None, and
    the new rows' cache slots [B] int64 (< 0: a padded row)."""

    k: torch.Tensor
    v: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    logn: torch.Tensor | None
    slots: torch.Tensor


def rope_serves(q: torch.Tensor, rope: Rope) -> str | None:
    """None when the kernel can apply this RoPE itself (full rotary over 128 dims, the layouts it reads)."""
    k, v, cos, sin, logn, slots = rope
    if cos.shape != (q.shape[0], HEAD_DIM // 2) or sin.shape != cos.shape or cos.dtype != torch.float32:
        return f"it rotates all {HEAD_DIM} dims with fp32 cos / sin [B, {HEAD_DIM // 2}] (got {tuple(cos.shape)})"
    if any(t.stride(-1) != 1 or t.stride(0) % 4 or t.data_ptr() % 16 for t in (cos, sin)):
        return "it reads cos / sin rows as 16-byte vectors"
    if k.shape != q.shape or v.shape != q.shape or k.dtype != q.dtype or v.dtype != q.dtype:
        return "it needs k and v as q (bf16 [B, H, 128])"
    if any(t.stride(-1) != 1 or t.stride(0) % 4 or t.stride(1) % 4 or t.data_ptr() % 8 for t in (k, v)):
        return "it reads 8-byte vectors of k and v (unit stride on head_dim, 8-byte aligned rows)"
    if slots.shape != (q.shape[0],) or (logn is not None and logn.shape != (q.shape[0],)):
        return f"it needs a slot (and logn) a sequence (slots {tuple(slots.shape)})"
    if (
        slots.dtype != torch.int64
        or slots.stride(0) != 1
        or (logn is not None and (logn.dtype, logn.stride(0)) != (torch.float32, 1))
    ):
        return "it needs contiguous int64 slots and fp32 logn"
    return None


def paged_decode_cuda(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    pdl: bool = False,
    rope: Rope | None = None,
) -> torch.Tensor:
    """paged_decode (worker/kernels/paged_decode.py) for what `supports` accepts: q [B, H, 128] bf16, caches
    [blocks, block_size, H, 128] bf16 of one layout, block_tables [B, width] int32, context_lens [B] int32 (0: a
    padding row, output 0). pdl: launched with programmatic dependent launch. Returns [B, H, 128] bf16.
    rope (`rope_serves`): q and rope's k, v are the step's raw rows; the kernel rotates q (times logn) and k as
    fused.rotary_ does, and stores k and v into their slots as rope_store would (the cache bit for bit the same), so
    neither RoPE + store nor the store runs before it. The warp that takes the newest key (the last block of the
    sequence and head's cluster) stores it: a row of length 0 stores nothing, so its slot must be < 0 (graph padding
    rows have length 1 or slot -1)."""
    why = supports(q, k_cache, v_cache, block_tables, context_lens, False)
    if why is None and rope is not None:
        why = rope_serves(q, rope)
    if why is not None:
        raise ValueError(f"paged_decode_cuda: {why}")
    lib = library(*torch.cuda.get_device_capability(q.device))
    if isinstance(lib, str):
        raise RuntimeError(f"paged_decode_cuda: {lib}")
    B, H, D = q.shape
    out = torch.empty(B, H, D, dtype=q.dtype, device=q.device)
    code = lib.paged_decode_bf16(
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), block_tables.data_ptr(), context_lens.data_ptr(),
        out.data_ptr(), scale * LOG2E, B, H, q.stride(0), q.stride(1), *k_cache.stride()[:3],
        block_tables.stride(0), out.stride(0), out.stride(1), int(math.log2(k_cache.shape[1])), int(pdl),
        torch.cuda.current_stream(q.device).cuda_stream, *_rope_args(rope), *form_for(B),
    )  # fmt: skip
    if code != 0:
        raise RuntimeError(f"paged_decode_cuda: {lib.paged_decode_error(code).decode()}")
    return out


def _rope_args(rope: Rope | None) -> tuple[Any, ...]:
    if rope is None:
        return (None, None, 0, 0, 0, 0, None, None, 0, 0, None, None)
    k, v, cos, sin, logn, slots = rope
    return (
        k.data_ptr(), v.data_ptr(), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.data_ptr(),
        sin.data_ptr(), cos.stride(0), sin.stride(0), logn.data_ptr() if logn is not None else None, slots.data_ptr(),
    )  # fmt: skip
