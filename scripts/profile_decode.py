"""Where does a decode step's GPU time go? Kernel time by name for one step (torch profiler).

python scripts/profile_decode.py --shape 7b --batch 1 [--decode-kernels pdl,rope_store,act_gemv | none]
                                 [--quant int4|int8|fp8]  (random quantized weights, as bench_quant.py)

--decode-kernels as serve's (worker/layers/decode_kernels.py, issue 17 P1; default: the served set).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

from bench_common import DecodeInputs, build_model, cuda_time, print_kernel_table  # noqa: E402
from worker.distributed import ParallelContext  # noqa: E402
from worker.engine.cuda_graphs import capture  # noqa: E402
from worker.engine.kv_cache import KVCache  # noqa: E402
from worker.layers.decode_kernels import SERVED, apply_decode_kernels, parse_decode_kernels  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="7b")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--decode-kernels", default=",".join(SERVED), help="'none' or a comma list of DecodeKernels fields")
    ap.add_argument("--quant", default="bf16", help="bf16 or a bench_quant.py mode (int4, int8, fp8)")
    args = ap.parse_args()
    dev = torch.device("cuda", 0)
    if args.quant == "bf16":
        model = build_model(args.shape, ParallelContext(0, 1, dev), "auto")
    else:
        from bench_quant import MODES, build

        model = build(args.shape, MODES[args.quant], device=dev)
    opts = parse_decode_kernels(args.decode_kernels)
    apply_decode_kernels(model.transformer, opts)
    print(opts)
    c = model.config
    kv = KVCache(
        c.num_hidden_layers,
        2 + args.batch * (args.ctx // 16 + 2),
        16,
        c.num_attention_heads,
        c.head_dim,
        torch.bfloat16,
        dev,
    )
    step = DecodeInputs.build(model, args.batch, args.ctx, 16).step(model, kv.layers)

    print_kernel_table(step, top=25, warmup=3)  # one eager step's kernels
    graph, _ = capture(step)
    print(f"graphed step {cuda_time(graph.replay, iters=30) * 1e3:.3f} ms")


if __name__ == "__main__":
    main()
