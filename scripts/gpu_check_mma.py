"""The Int4 tensor-core matmul (worker/kernels/gptq_mma.cu, DecodeKernels.gptq_mma) per 7B linear and row count:

    PYTHONPATH=. python scripts/gpu_check_mma.py [--rows 1,4,8,16,32,64] [--splits 2,4,8]

For each 7B Int4 shape (random packed weights, group 128, sym) and each row count: µs and GB/s (packed bytes) of
gptq4_mma, of what serves that row count without it (the FMA GEMV at 1-2 rows, the Triton GEMV at 3-8, dequantize
+ cuBLAS above) and of bf16 cuBLAS on a dense weight of the same shape; weights cycled past L2 (copies totalling
>= 256 MB, one CUDA graph), and the mma result's max error against the fp32 reference. --splits: also gptq4_mma
at each of these K splits instead of its plan's (gemv_cuda.plan_mma), where the shared memory allows.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_common import copies_past_l2, each_7b_linear, graphed_time, random_int4_linear  # noqa: E402
from worker.kernels.gemv import gemv_weights, quant_gemv  # noqa: E402
from worker.kernels.gemv_cuda import cuda_gemv, mma_max_chunks, plan_mma  # noqa: E402
from worker.kernels.gptq import gptq_dequant_mm  # noqa: E402
from worker.kernels.gptq_reference import gptq_matmul_reference  # noqa: E402
from worker.layers.quantized import CUDA_GEMV_MAX_M, GEMV_MAX_M  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,4,8,16,32,64")
    ap.add_argument("--splits", default="")
    args = ap.parse_args()
    rows, splits = [int(m) for m in args.rows.split(",")], [int(s) for s in args.splits.split(",") if s]
    each_7b_linear(lambda name, K, N, g, dev: shape(name, K, N, rows, splits, g, dev))


def shape(name: str, K: int, N: int, rows: list[int], splits: list[int], g: torch.Generator, dev: torch.device) -> None:
    qweight, qzeros, scales, g_idx = random_int4_linear(K, N, g, dev)
    nbytes = qweight.numel() * 4 + scales.numel() * 2
    copies = copies_past_l2(nbytes)
    qs = [qweight.clone() for _ in range(copies)]
    ws = [gemv_weights(q, qzeros, scales, 4, 1, 128, 0) for q in qs]
    dense = [torch.randn(N, K, device=dev, generator=g).to(torch.bfloat16) for _ in range(max(2, copies // 4))]
    for m in rows:
        x = torch.randn(m, K, device=dev, generator=g).to(torch.bfloat16)
        ref = gptq_matmul_reference(x.float(), qweight, qzeros, scales.float(), g_idx, 4, 1, None)
        err = (cuda_gemv(x, ws[0], None, mma=True).float() - ref).abs().max().item()
        rounding = (ref.to(torch.bfloat16).float() - ref).abs().max().item()

        def mma(i: int, x: torch.Tensor = x) -> torch.Tensor:
            return cuda_gemv(x, ws[i], None, pdl=True, mma=True)

        def without(i: int, x: torch.Tensor = x, m: int = m) -> torch.Tensor:
            if m <= CUDA_GEMV_MAX_M:
                return cuda_gemv(x, ws[i], None, pdl=True)
            if m <= GEMV_MAX_M:
                return quant_gemv(x, ws[i], None, pdl=True)
            return gptq_dequant_mm(x, qs[i], qzeros, scales, g_idx, 4, 1, group_size=128)

        def bf16(i: int, x: torch.Tensor = x) -> torch.Tensor:
            return torch.nn.functional.linear(x, dense[i])

        t_mma, t_old, t_bf = graphed_time(mma, copies), graphed_time(without, copies), graphed_time(bf16, len(dense))
        print(
            f"{name:12s} M {m:3d}: mma {t_mma * 1e6:7.1f} us {nbytes / t_mma / 1e9:5.0f} GB/s | without "
            f"{t_old * 1e6:7.1f} us | bf16 {t_bf * 1e6:7.1f} us | err {err:.1e} (bf16 rounding {rounding:.1e})"
        )
        plan = plan_mma(N, K, torch.cuda.get_device_properties(dev).multi_processor_count, m)
        swept = []
        for s in splits:
            per = -(-(K // 128) // s)
            if per > mma_max_chunks(m):
                continue

            def split(i: int, x: torch.Tensor = x, s: int = s) -> torch.Tensor:
                return cuda_gemv(x, ws[i], None, pdl=True, mma=True, splits=s)

            swept.append(f"{s}: {graphed_time(split, copies) * 1e6:.1f}")
        if swept:
            print(f"{'':12s} M {m:3d}: plan {plan[1]} splits of {plan[0]} chunks; us at splits " + ", ".join(swept))


if __name__ == "__main__":
    main()
