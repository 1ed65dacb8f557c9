"""The Int4 tensor-core GEMV for 1-8 rows (worker/kernels/gptq_tc.cu, weights as mma's A operand) per 7B linear:

    PYTHONPATH=. python scripts/gpu_check_tc.py [--rows 1,2,4,8] [--sweep]

For each 7B Int4 shape (random packed weights, group 128, sym) and row count: µs and TB/s (packed bytes + scales) of
gptq_tc as served (x loaded as quantized.TC_STAGE says, at gemv_cuda.plan_tc's plan) and of what serves that row count
without it (the FMA GEMV at 1-2 rows, gptq_mma at 3-8), weights cycled past L2 (copies totalling >= 256 MB, one CUDA
graph), and gptq_tc's max error against the fp32 reference beside the reference's own bf16 rounding. --sweep: also
gptq_tc at other warps a block and K splits, staged and not.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_common import copies_past_l2, each_7b_linear, graphed_time, random_int4_linear  # noqa: E402
from worker.kernels.gemv import gemv_weights  # noqa: E402
from worker.kernels.gemv_cuda import CHUNK, MMA_SMEM, cuda_gemv, plan_tc, tc_smem  # noqa: E402
from worker.kernels.gptq_reference import gptq_matmul_reference  # noqa: E402
from worker.layers.quantized import CUDA_GEMV_MAX_M, TC_STAGE  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,2,4,8")
    ap.add_argument("--sweep", action="store_true")
    args = ap.parse_args()
    rows = [int(m) for m in args.rows.split(",")]
    each_7b_linear(lambda name, K, N, g, dev: shape(name, K, N, rows, args.sweep, g, dev))


def shape(name: str, K: int, N: int, rows: list[int], sweep: bool, g: torch.Generator, dev: torch.device) -> None:
    qweight, qzeros, scales, g_idx = random_int4_linear(K, N, g, dev)
    nbytes = qweight.numel() * 4 + scales.numel() * 2
    copies = copies_past_l2(nbytes)
    ws = [gemv_weights(qweight.clone(), qzeros, scales, 4, 1, 128, 0) for _ in range(copies)]
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    for m in rows:
        x = torch.randn(m, K, device=dev, generator=g).to(torch.bfloat16)
        ref = gptq_matmul_reference(x.float(), qweight, qzeros, scales.float(), g_idx, 4, 1, None)
        err = (cuda_gemv(x, ws[0], None, tc=True, stage=TC_STAGE).float() - ref).abs().max().item()
        rounding = (ref.to(torch.bfloat16).float() - ref).abs().max().item()

        def tc(i: int, x: torch.Tensor = x, **kw) -> torch.Tensor:
            return cuda_gemv(x, ws[i], None, pdl=True, tc=True, **{"stage": TC_STAGE, **kw})

        def without(i: int, x: torch.Tensor = x, m: int = m) -> torch.Tensor:
            return cuda_gemv(x, ws[i], None, pdl=True, mma=m > CUDA_GEMV_MAX_M)

        t_tc, t_old = graphed_time(tc, copies), graphed_time(without, copies)
        per, splits, warps = plan_tc(N, K, sms, m, TC_STAGE)
        print(
            f"{name:12s} M {m}: tc {t_tc * 1e6:6.1f} us {nbytes / t_tc / 1e12:4.2f} TB/s (plan: {warps} warps, "
            f"{splits} splits) | served {t_old * 1e6:6.1f} us | err {err:.1e} "
            f"(bf16 rounding {rounding:.1e})",
            flush=True,
        )
        if not sweep:
            continue
        out = []
        for stage in (True, False):
            for w in (2, 4, 8, 16):
                for s in (1, 2, 4):
                    p = -(-(K // CHUNK) // s)
                    if tc_smem(m, p, w, stage) > MMA_SMEM or p < w or (not stage and w > 8):
                        continue
                    t = graphed_time(functools.partial(tc, warps=w, splits=s, stage=stage), copies)
                    out.append((t, f"{'staged' if stage else 'warp x'} w{w} s{s}: {t * 1e6:.1f}"))
        out.sort()
        print(f"{'':12s} M {m}: best " + ", ".join(o[1] for o in out[:8]), flush=True)


if __name__ == "__main__":
    main()
