"""Where does a decode step's GPU time go? Kernel time by name for one step (torch profiler).

python scripts/profile_decode.py --shape 7b --batch 1 [--decode-kernels pdl,rope_store,act_gemv | none]
                                 [--quant int4|int8|fp8]  (random quantized weights, as bench_quant.py)

--decode-kernels as serve's (worker/layers/decode_kernels.py, issue 17 P1; default: the served set).
--timeline: also one graph replay's kernels in launch order (CUPTI): the step's span, the kernels' summed time, the
time some kernel runs, and a window of one layer's kernels with each one's start, duration and the gap from the
previous kernel's end (negative: PDL overlap); --edges N: the first and last N kernels too. --tiles: the attention
backend's Tiles (e.g. decode_n=64); --early: kernel families that let the next PDL kernel launch before they wait
(worker/kernels/pdl.py).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

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
    ap.add_argument("--timeline", action="store_true")
    ap.add_argument("--edges", type=int, default=0, help="--timeline: also the step's first and last N kernels")
    ap.add_argument("--tiles", default="", help="Tiles.parse string for the attention backend")
    ap.add_argument("--early", default="", help="comma list of kernel families for worker/kernels/pdl.EARLY_GO")
    args = ap.parse_args()
    dev = torch.device("cuda", 0)
    if args.quant == "bf16":
        model = build_model(args.shape, ParallelContext(0, 1, dev), "auto")
    else:
        from bench_quant import MODES, build

        model = build(args.shape, MODES[args.quant], device=dev)
    if args.tiles:
        from worker.kernels.triton_attention import Tiles

        model.backend.tiles = Tiles.parse(args.tiles)
    if args.early:
        from worker.kernels import pdl

        pdl.EARLY_GO.update(filter(None, args.early.split(",")))
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
    if args.timeline:
        print_timeline(graph.replay, edges=args.edges)


def print_timeline(fn: Callable[[], object], window: int = 14, edges: int = 0) -> None:
    """One call of fn's kernels in start order (see --timeline): `window` from the middle, and the first and last
    `edges` (the step's work outside the layers)."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    ks = sorted(
        ((e.time_range.start, e.time_range.end, e.name) for e in prof.events() if e.device_type.name == "CUDA"),
    )
    if not ks:
        print("timeline: no kernels seen")
        return
    busy, reach = 0.0, ks[0][0]
    for s, e, _ in ks:  # the union of the kernels' intervals
        if e > reach:
            busy += e - max(s, reach)
            reach = e
    span = ks[-1][1] - ks[0][0]
    total = sum(e - s for s, e, _ in ks)
    print(f"timeline: {len(ks)} kernels, span {span:.1f} us, summed {total:.1f} us, some kernel running {busy:.1f} us")
    first = len(ks) // 2
    parts = [("middle", range(first, min(len(ks), first + window)))]
    if edges:
        parts += [("first", range(min(edges, len(ks)))), ("last", range(max(0, len(ks) - edges), len(ks)))]
    for what, rows in parts:
        print(f"{what}:")
        for i in rows:
            s, e, name = ks[i]
            gap = s - ks[i - 1][1] if i else 0.0
            print(f"  +{s - ks[rows[0]][0]:8.2f} us  {e - s:7.2f} us  gap {gap:+6.2f}  {name[:90]}")


if __name__ == "__main__":
    main()
