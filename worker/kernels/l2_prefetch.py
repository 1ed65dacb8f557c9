"""Weights into L2 while the decode step's latency-bound kernels run (issue 16 P9, issue 17 P1; candidate
DecodeKernels.l2_prefetch).

At small decode batches the RoPE + KV-store and the paged decode attention leave DRAM mostly idle for ~10 us a layer
(7B, 512-token contexts), while the GEMVs after them are bound by their weights' bytes. This launch, placed after
c_attn's GEMV, asks the GPU to bring the first `budget` bytes of the next linears' weights (attn.c_proj's, then
gate_up's) into L2 (`cp.async.bulk.prefetch.L2`, sm_90+: fire and forget, one thread of each program issuing
CHUNK-byte requests), so those GEMVs read part of their bytes from L2. No arithmetic changes: a hint only.

PDL: the requests go out before `gdc_wait` (weights are constant), then the kernel waits for the previous one as
every kernel of the chain does, so the next kernel's `gdc_wait` still orders it after c_attn's GEMV.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from worker.kernels.pdl import active, gdc_go, gdc_wait, launch_options

BUDGET = 24 << 20  # bytes prefetched a layer
CHUNK = 64 * 1024  # bytes a request
PROGRAMS = 32  # programs of one launch (one warp each; thread 0 issues)
SEGMENTS = 4  # tensors one launch prefetches from, at most


@triton.jit
def _prefetch(addr, size):
    """cp.async.bulk.prefetch.L2 of `size` bytes (a multiple of 16) at `addr` (16-byte aligned), from thread 0."""
    tl.inline_asm_elementwise(
        "{\n\t.reg .pred pf;\n\t.reg .u32 tx;\n\tmov.u32 tx, %tid.x;\n\tsetp.eq.u32 pf, tx, 0;\n\t"
        "@pf cp.async.bulk.prefetch.L2.global [$1], $2;\n\tmov.u32 $0, 0;\n}",
        "=r,l,r",
        [addr, size],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )


@triton.jit
def _segment(p, n, pid, progs, CHUNK: tl.constexpr):
    for c in range(pid, tl.cdiv(n, CHUNK), progs):
        _prefetch((p + c * CHUNK).to(tl.int64, bitcast=True), tl.minimum(CHUNK, n - c * CHUNK).to(tl.int32))


@triton.jit
def _l2_prefetch_kernel(p0, n0, p1, n1, p2, n2, p3, n3, CHUNK: tl.constexpr, PDL: tl.constexpr):
    pid, progs = tl.program_id(0), tl.num_programs(0)
    _segment(p0, n0, pid, progs, CHUNK)
    _segment(p1, n1, pid, progs, CHUNK)
    _segment(p2, n2, pid, progs, CHUNK)
    _segment(p3, n3, pid, progs, CHUNK)
    gdc_wait(PDL)
    gdc_go(PDL)


def segments(tensors: list[torch.Tensor], budget: int) -> list[tuple[torch.Tensor, int]]:
    """(byte view, bytes) of the first `budget` bytes of `tensors` in order, each length rounded down to 16 bytes
    (the requests' unit); tensors past the budget, empty ones and non-contiguous ones are left out."""
    out: list[tuple[torch.Tensor, int]] = []
    for t in tensors:
        if budget < 16:
            break
        if not t.is_contiguous() or t.numel() == 0 or t.data_ptr() % 16:
            continue
        n = min(t.numel() * t.element_size(), budget) // 16 * 16
        out.append((t.view(-1).view(torch.uint8), n))
        budget -= n
    return out


def l2_prefetch(tensors: list[torch.Tensor], budget: int, pdl: bool = False) -> None:
    """Ask for the first `budget` bytes of `tensors` (in order, at most SEGMENTS of them) in L2; one launch.
    CUDA sm_90+ compiled only (callers check with pdl.active)."""
    segs = segments(tensors, budget)[:SEGMENTS]
    if not segs:
        return
    dev = segs[0][0].device
    args: list[object] = []
    for i in range(SEGMENTS):
        view, n = segs[i] if i < len(segs) else (segs[0][0], 0)
        args += [view, n]
    on = active(pdl, dev)
    _l2_prefetch_kernel[(PROGRAMS,)](*args, CHUNK=CHUNK, PDL=on, num_warps=1, **launch_options(on))
