"""P2 proxy: an adapter term's expand inside its base GEMM, as extra K (the "K-append" layout), against the served
term-then-GEMM sequence (lora_term_rows_partials, then cuBLAS adding it as C) and the base GEMM alone.

The K-append layout: one allocation [out + S·r, in + S·r] per target holds the base weight (top left), the A pool
(rows below it) and every slot's B as columns beside it (B[s][n, l] at column in + s·r + l), so
linear([x, h scattered into its slot's lanes], W[:out]) = x·Wᵀ + h·B[slot]ᵀ in one GEMM, and the base alone is the
strided view W[:out, :in]. Qwen-7B shapes, 32 layers of distinct weights, batch 32, 32 distinct rank-16 adapters,
each variant replayed from a CUDA graph.

    PYTHONPATH=. python scripts/gpu_check_lora_kexpand.py
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gpu_check_lora import BATCH, DT, LAYERS, RANK, graph_ms  # noqa: E402  (the same P2 shapes)
from worker.kernels import lora_rows  # noqa: E402

SLOTS = BATCH + 1
SHAPES = {"c_attn": (4096, 12288, True, 2), "mlp.c_proj": (11008, 4096, False, 43)}  # K, N, bias, h tiles


def main() -> None:
    g = torch.Generator(device="cuda").manual_seed(1)
    for name, (K, N, has_bias, tiles) in SHAPES.items():
        for align in (1, 64, 128, 256):
            check(name, K, N, has_bias, tiles, g, align)


def check(name: str, K: int, N: int, has_bias: bool, tiles: int, g: torch.Generator, align: int) -> None:
    """The variants with the joint allocation's row pitch K + S·r rounded up to a multiple of `align` elements."""
    slots = torch.arange(1, BATCH + 1, device="cuda")
    sr = SLOTS * RANK
    layers = []
    for _ in range(LAYERS):
        joint = torch.zeros(N + sr, -(-(K + sr) // align) * align, device="cuda", dtype=DT)
        joint[:N, :K].normal_(0, K**-0.5, generator=g)
        b_cols = joint[:N, K : K + sr].view(N, SLOTS, RANK)
        b_cols[:, 1:].normal_(0, RANK**-0.5, generator=g)
        b_pool = b_cols.permute(1, 0, 2).unsqueeze(1)  # [S, 1, N, r] strided view
        dense = joint[:N, :K].contiguous()
        bias = (torch.randn(N, device="cuda", generator=g) * 0.1).to(DT) if has_bias else None
        layers.append((joint, dense, b_pool, bias))
    x = torch.randn(BATCH, K, device="cuda", generator=g).to(DT)
    h = (torch.randn(BATCH, RANK, device="cuda", generator=g)).to(DT)
    parts = torch.zeros(BATCH, tiles, RANK, device="cuda")
    parts[:, 0] = h.float()
    xj = torch.zeros(BATCH, K + sr, device="cuda", dtype=DT)
    xj[:, :K] = x
    for t in range(BATCH):
        xj[t, K + (t + 1) * RANK : K + (t + 2) * RANK] = h[t]
    b_contig = [lay[2].contiguous() for lay in layers]

    def base() -> None:
        for _, dense, _, bias in layers:
            F.linear(x, dense, bias)

    def base_strided() -> None:
        for joint, _, _, bias in layers:
            F.linear(x, joint[:N, :K], bias)

    def served() -> None:
        for (_, dense, _, bias), bc in zip(layers, b_contig):
            c = lora_rows.lora_term_rows_partials(parts, bc, slots, True, bias=bias)
            c.addmm_(x, dense.t())

    def kexpand() -> None:
        for joint, _, _, bias in layers:
            F.linear(xj, joint[:N, : K + sr], bias)

    joint, dense, b_pool, bias = layers[0]
    ref = F.linear(x.float(), dense.float(), None if bias is None else bias.float())
    ref += torch.einsum("tr,tnr->tn", h.float(), b_pool[slots, 0].float())
    c = lora_rows.lora_term_rows_partials(parts, b_contig[0], slots, True, bias=bias).addmm_(x, dense.t())
    k = F.linear(xj, joint[:N, : K + sr], bias)
    errs = [(t.float() - ref).abs().max().item() for t in (c, k)]
    print(f"{name}, pitch {joint.stride(0)}: max err vs fp32: served {errs[0]:.5f}, K-append {errs[1]:.5f}")
    for label, fn in (("base", base), ("base strided", base_strided), ("served", served), ("K-append", kexpand)):
        ms = [graph_ms(fn) for _ in range(3)]
        print(f"{name:10s} {label:14s} " + " ".join(f"{m / LAYERS * 1e3:6.2f}" for m in ms) + " us a layer")


if __name__ == "__main__":
    main()
