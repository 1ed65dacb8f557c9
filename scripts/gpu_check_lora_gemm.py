"""P2 proxy without attention: LoraTerm's "gemm" decode mode (the shrink inside the base GEMM over the joint
weight, then worker/kernels/lora_rows.py's expand writing the output) against "side_store" and the base
matmuls alone. Qwen-7B shapes, 32 layers of distinct weights, batch 32, 32 distinct rank-16 adapters, each
variant replayed from a CUDA graph; also each module's share and the GEMM with the A rows alone.

    PYTHONPATH=. python scripts/gpu_check_lora_gemm.py
"""

from __future__ import annotations

import os
import sys
from functools import partial

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gpu_check_lora import BATCH, DT, LAYERS, MODULES, RANK, graph_ms  # noqa: E402  (the same P2 shapes)
from worker.kernels import lora as two  # noqa: E402
from worker.kernels.lora_reference import add_lora_reference  # noqa: E402
from worker.layers.lora import AdapterBatchData, JointWeight, LoraTerm  # noqa: E402

SLOTS = BATCH + 1  # slot 0 (the base) and one adapter per row


def main() -> None:
    g = torch.Generator(device="cuda").manual_seed(1)
    data = AdapterBatchData.for_decode(torch.arange(1, BATCH + 1, device="cuda"))
    layers: dict[str, list[tuple[JointWeight, torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
    for m, (P, K, N) in MODULES.items():
        layers[m] = []
        for _ in range(LAYERS):
            weight = torch.empty(P * N + SLOTS * P * RANK, K, device="cuda", dtype=DT).normal_(0, K**-0.5, generator=g)
            a = weight[P * N :].view(SLOTS, P, RANK, K)
            a[0].zero_()
            b = (torch.randn(SLOTS, P, N, RANK, device="cuda", generator=g) * RANK**-0.5).to(DT)
            b[0].zero_()
            ranks = torch.full((P, SLOTS), RANK, dtype=torch.int32, device="cuda")
            ranks[:, 0] = 0
            layers[m].append((JointWeight(weight, None, P * N), a, b, ranks))
    xs = {m: torch.randn(BATCH, K, device="cuda").to(DT) for m, (P, K, N) in MODULES.items()}
    stream = torch.cuda.Stream()

    def terms(mode: str, pdl: bool = True) -> dict[str, list[LoraTerm]]:
        return {
            m: [LoraTerm(a, b, r, two, stream, mode, joint=j, pdl=pdl) for j, a, b, r in layers[m]] for m in MODULES
        }

    for m, (P, _, N) in MODULES.items():  # the gemm mode against the reference on one layer of each module
        j, a, b, ranks = layers[m][0]
        x, w = xs[m], j.weight[: P * N]
        ref, ref32 = F.linear(x, w), F.linear(x.float(), w.float())
        add_lora_reference(ref, x, a, b, data.token_idx, data.valid, data.slots)
        add_lora_reference(ref32, x.float(), a.float(), b.float(), data.token_idx, data.valid, data.slots)
        y = terms("gemm")[m][0].apply(partial(F.linear, x, w), x, data)
        e_new, e_ref = ((t.float() - ref32).abs().max().item() for t in (y, ref))
        print(f"check {m}: gemm max err {e_new:.4f} vs the bf16 reference's {e_ref:.4f} (both vs fp32)")

    outs: dict[str, torch.Tensor] = {}

    def run(kind: str, modules: tuple[str, ...], lora: dict[str, list[LoraTerm]] | None = None) -> None:
        for layer in range(LAYERS):
            for m in modules:
                P, _, N = MODULES[m]
                j = layers[m][layer][0]
                x, w = xs[m], j.weight[: P * N]
                if kind == "base":
                    outs[m] = F.linear(x, w)
                elif kind == "gemm only":  # the GEMM with the A rows, no expand
                    outs[m] = F.linear(x, j.weight)
                else:
                    assert lora is not None
                    outs[m] = lora[m][layer].apply(partial(F.linear, x, w), x, data)

    every = tuple(MODULES)
    t_base = graph_ms(partial(run, "base", every), 20)
    print(f"base matmuls, {LAYERS} layers, batch {BATCH}: {t_base:.3f} ms")
    variants = {
        "side_store": terms("side_store"),
        "gemm": terms("gemm", pdl=False),
        "gemm, PDL": terms("gemm"),
    }
    for name in ["gemm only", *variants]:
        t = graph_ms(partial(run, name, every, variants.get(name)), 20)
        print(f"  {name:24s} {t:8.3f} ms  extra {t - t_base:6.3f} ms  ratio {t_base / t:.3f}")
    for m in MODULES:  # each module's share
        tb, ts, tg = (graph_ms(partial(run, k, (m,), variants.get(k)), 20) for k in ("base", "side_store", "gemm"))
        print(f"  {m:12s} base {tb:.3f} ms, extra: side_store {ts - tb:.3f}, gemm {tg - tb:.3f}")


if __name__ == "__main__":
    main()
