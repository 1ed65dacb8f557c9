"""The CUDA Int4 GEMV (worker/kernels/gptq_gemv.cu) on the GPU against the Triton GEMV and the reference:

    PYTHONPATH=. python scripts/gpu_check_gemv_cuda.py

Per 7B/14B/72B Int4 shape at one row (random packed weights, group 128, asym zeros and a bias on the first
shape): the max error of both kernels against the fp32 dequantize-then-matmul reference (and the bf16 rounding
of that reference, for scale), graph replay == eager, and µs / GB/s of each with the weights cycled past L2
(copies totalling >= 256 MB, in one CUDA graph).
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_common import cuda_time, gptq_library_ready  # noqa: E402
from gpu_check_gemv import SHAPES  # noqa: E402
from worker.kernels.gemv import gemv_weights, quant_gemv  # noqa: E402
from worker.kernels.gemv_cuda import cuda_gemv, supports  # noqa: E402
from worker.kernels.gptq_reference import gptq_matmul_reference  # noqa: E402


def main() -> None:
    dev = torch.device("cuda", 0)
    if not gptq_library_ready(dev):
        return
    g = torch.Generator(device=dev).manual_seed(0)
    for i, (name, (K, N)) in enumerate(SHAPES.items()):
        G = K // 128
        qweight = torch.randint(-(2**31), 2**31 - 1, (K // 8, N), device=dev, dtype=torch.int32, generator=g)
        if i == 0:  # asym: a zero per group and column
            qzeros = torch.randint(-(2**31), 2**31 - 1, (G, N // 8), device=dev, dtype=torch.int32, generator=g)
        else:  # sym: stored 7 everywhere (one zero for all)
            qzeros = torch.full((G, N // 8), 0x77777777, device=dev, dtype=torch.int32)
        scales = (torch.rand(G, N, device=dev, generator=g) * 0.02 + 0.001).to(torch.bfloat16)
        g_idx = (torch.arange(K, device=dev) // 128).to(torch.int32)
        zero_offset = 1
        gw = gemv_weights(qweight, qzeros, scales, 4, zero_offset, 128, 0)
        why = supports(gw, torch.bfloat16)
        if why:
            print(f"{name}: not served: {why}")
            continue
        bias = (torch.randn(N, device=dev, generator=g) * 0.1).to(torch.bfloat16) if i == 0 else None
        x = torch.randn(1, K, device=dev, generator=g).to(torch.bfloat16)
        ref = gptq_matmul_reference(x.float(), qweight, qzeros, scales.float(), g_idx, 4, zero_offset, None)
        if bias is not None:
            ref = ref + bias.float()
        yc = cuda_gemv(x, gw, bias, pdl=True)
        yt = quant_gemv(x, gw, bias, pdl=True)
        err_c = (yc.float() - ref).abs().max().item()
        err_t = (yt.float() - ref).abs().max().item()
        err_bf = (ref.to(torch.bfloat16).float() - ref).abs().max().item()
        again = torch.equal(cuda_gemv(x, gw, bias, pdl=True), yc)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            yg = cuda_gemv(x, gw, bias, pdl=True)
        graph.replay()
        torch.cuda.synchronize()
        same = torch.equal(yg, yc)
        # timing: copies of the weights past L2, one graph of all of them
        nbytes = qweight.numel() * 4 + scales.numel() * 2 + (gw.zeros.numel() * 2 if gw.zeros is not None else 0)
        copies = max(2, -(-256 * 2**20 // nbytes))
        ws = [gemv_weights(qweight.clone(), qzeros, scales.clone(), 4, zero_offset, 128, 0) for _ in range(copies)]
        times = {}
        for label, fn in (("cuda", cuda_gemv), ("triton", quant_gemv)):
            fn(x, ws[0], bias, pdl=True)
            gr = torch.cuda.CUDAGraph()
            with torch.cuda.graph(gr):
                for wc in ws:
                    fn(x, wc, bias, pdl=True)
            times[label] = cuda_time(gr.replay, iters=20) / copies
        print(
            f"{name:16s} K {K:5d} N {N:5d}: err cuda {err_c:.2e} triton {err_t:.2e} "
            f"(bf16 rounding {err_bf:.2e}) "
            f"repeat {'==' if again else '!='} graph {'==' if same else '!='} | "
            + "  ".join(f"{k} {t * 1e6:6.1f} us {nbytes / t / 1e9:6.0f} GB/s" for k, t in times.items())
            + f"  x{times['triton'] / times['cuda']:.2f}"
        )
        del ws


if __name__ == "__main__":
    main()
