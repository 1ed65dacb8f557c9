"""What a read of a 7B linear's packed Int4 weights costs on its own, as the GEMVs are measured (issue 16, P9):

    PYTHONPATH=. python scripts/gpu_check_read.py

For each 7B Int4 shape, in one CUDA graph with the weights cycled past L2 (as gpu_check_tc.py / gpu_check_mma.py
time the GEMVs): a Triton kernel that only reads the packed words (every program sums its part into one int, with
PDL as the served kernels launch) in the GEMVs' pattern (a program per 128 or 32 columns and K split) and
contiguously (a program per 64 KB), and an empty kernel's launch. The GEMV's time less the read's is what its
arithmetic, x and the reduction cost; the read less bytes / copy bandwidth is the pattern's and the launch's.
"""

from __future__ import annotations

import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_common import LINEARS_7B, copies_past_l2, copy_bandwidth, graphed_time  # noqa: E402
from worker.kernels.pdl import gdc_go, gdc_wait, launch_options  # noqa: E402


@triton.jit
def _read_tiles(q, out, N, ROWS_PER: tl.constexpr, BLOCK_R: tl.constexpr, COLS: tl.constexpr, PDL: tl.constexpr):
    tile, split = tl.program_id(0), tl.program_id(1)
    cols = tile * COLS + tl.arange(0, COLS)
    acc = tl.zeros([BLOCK_R, COLS], dtype=tl.int32)
    for r in range(0, ROWS_PER, BLOCK_R):
        rows = split * ROWS_PER + r + tl.arange(0, BLOCK_R)
        acc ^= tl.load(q + rows[:, None] * N + cols[None, :], cache_modifier=".cg")
    gdc_wait(PDL)
    gdc_go(PDL)
    tl.store(out + tile * tl.num_programs(1) + split, tl.sum(tl.sum(acc, 1), 0))


@triton.jit
def _read_flat(q, out, PER: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pid = tl.program_id(0)
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for i in range(0, PER, BLOCK):
        acc ^= tl.load(q + pid * PER + i + tl.arange(0, BLOCK), cache_modifier=".cg")
    gdc_wait(PDL)
    gdc_go(PDL)
    tl.store(out + pid, tl.sum(acc, 0))


@triton.jit
def _empty(out, PDL: tl.constexpr):
    gdc_wait(PDL)
    gdc_go(PDL)
    tl.store(out + tl.program_id(0), 1)


def main() -> None:
    dev = torch.device("cuda", 0)
    bw = copy_bandwidth(dev)
    print(f"{torch.cuda.get_device_name(dev)}: copy {bw / 1e12:.2f} TB/s")
    out = torch.zeros(1 << 16, device=dev, dtype=torch.int32)
    opts = launch_options(True)
    print(f"empty kernel, 132 programs: {graphed_time(lambda i: _empty[(132,)](out, True, **opts), 64) * 1e6:.2f} us")
    for name, (K, N) in LINEARS_7B.items():
        shape(name, K, N, bw, out, opts, dev)


def shape(name: str, K: int, N: int, bw: float, out: torch.Tensor, opts: dict, dev: torch.device) -> None:
    q = torch.randint(-(2**31), 2**31 - 1, (K // 8, N), device=dev, dtype=torch.int32)
    nbytes = q.numel() * 4
    copies = copies_past_l2(nbytes)
    qs = [q.clone() for _ in range(copies)]
    rows = K // 8
    line = f"{name:12s} {nbytes / 1e6:5.1f} MB, at copy speed {nbytes / bw * 1e6:5.1f} us |"
    for cols, block_r in ((128, 16), (32, 64)):
        for splits in (1, 2, 4, 8):
            if rows % (splits * block_r):
                continue
            per = rows // splits

            def tiles(i: int, per: int = per, splits: int = splits, cols: int = cols, block_r: int = block_r) -> None:
                _read_tiles[(N // cols, splits)](qs[i], out, N, per, block_r, cols, True, **opts)

            line += f" {cols}-col tiles x{splits} {graphed_time(tiles, copies) * 1e6:5.1f}"

    def flat(i: int) -> None:
        _read_flat[(q.numel() // 16384,)](qs[i], out, 16384, 2048, True, **opts)

    print(line + f" | flat {graphed_time(flat, copies) * 1e6:5.1f} us", flush=True)


if __name__ == "__main__":
    main()
