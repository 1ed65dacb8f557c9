"""Sweep the Triton paged-attention kernels' knobs on one GPU and print the best per row (issue #17, P1L/P4L).

    python scripts/tune_attention.py --out bench_out/tune_attention.json            # ~4 min on an H200
    python scripts/tune_attention.py --quick --out bench_out/tune_quick.json        # fewer variants
    TRITON_INTERPRET=1 python scripts/tune_attention.py --smoke --out /tmp/t.json   # CPU, tiny (its unit test)

Decode: one layer at the 7B attention shape (32 heads x 128, blocks of 16), bf16 and fp8 caches, contexts
2k/8k/32k at batch 1 and 16. Stage 1 times every loop variant (Tiles.decode_n / warps / stages / lanes /
prefetch) at 8k x {1, 16} with the split policy's count; stage 2 sweeps the split count of the best
variants on every row (the fixed list plus what each candidate split policy would pick). A row prints its
best time, KV GB/s and time / (KV bytes / copy bandwidth): the KV-only floor, the device-to-device copy
measured in the same run (read + write). Each timed call cycles through enough cache copies (like
layers) to exceed L2, replayed from a CUDA graph as graphed decode is.
Prefill: the Triton kernel's tiles (paged and no-cache paths; fp8 paged for the best three) and torch's
varlen_attn (what fresh prompts use now) on one 32,768-token prompt and 8 x 1024, MFU against the measured
bf16 matmul rate, attention FLOPs 2 T^2 hidden per prompt (spec/performance.md P4L).
Every config is checked once on its own inputs against the fp32 reference before it is timed; failures
(wrong results, compile errors) are listed and never picked. --budget-s stops sweeping when spent.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

import tune_decode
import tune_prefill
from bench_common import copy_bandwidth, matmul_rate
from tune_cases import KV_KINDS, Shape
from worker.kernels.paged_decode import DecodeWorkspace


@dataclass
class Sweep:
    """What the sweep knows: the card's floors, the shape, the deadline, every measurement."""

    device: torch.device
    shape: Shape
    act: torch.dtype
    copy_Bps: float
    matmul_flops: float
    sm_count: int
    deadline: float
    min_bytes: int
    quick: bool
    smoke: bool = False
    results: list[dict[str, Any]] = field(default_factory=list)
    skipped: int = 0
    decode_ws: DecodeWorkspace = field(default_factory=DecodeWorkspace)  # the fused reduction's counters

    def out_of_time(self) -> bool:
        return time.monotonic() > self.deadline


def cpu_copy_bandwidth() -> float:
    x = torch.empty(1 << 24, dtype=torch.uint8)
    t0 = time.perf_counter()
    x.clone()
    return 2 * x.numel() / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="JSON file for every measurement")
    ap.add_argument("--kv", default=",".join(KV_KINDS), help="cache kinds: bf16, fp8")
    ap.add_argument("--ctx", default="2048,8192,32768", help="decode contexts")
    ap.add_argument("--batches", default="1,16", help="decode batch sizes")
    ap.add_argument("--prefill", default="32768;1024x8", help="prefill cases: N (one prompt) or NxB, ';'-separated")
    ap.add_argument("--only", default="decode,prefill")
    ap.add_argument("--quick", action="store_true", help="fewer decode variants and prefill tiles")
    ap.add_argument("--top", type=int, default=4, help="decode variants kept for the split sweep")
    ap.add_argument("--budget-s", type=float, default=220.0, help="stop starting new measurements after this")
    ap.add_argument("--min-mb", type=int, default=1024, help="cache bytes cycled per timed call (> L2)")
    ap.add_argument("--jobs", type=int, default=8, help="processes compiling kernels ahead (0: compile inline)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (TRITON_INTERPRET=1)")
    args = ap.parse_args()
    t_start = time.monotonic()
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            sys.exit("--smoke runs the kernels in the Triton interpreter: set TRITON_INTERPRET=1")
        device, shape, act = torch.device("cpu"), Shape(heads=2, head_dim=16, block=4), torch.float16
        bw, peak, sms, args.jobs = cpu_copy_bandwidth(), 1e9, 2, 0
    else:
        if not torch.cuda.is_available():
            sys.exit("tune_attention.py needs a CUDA GPU (or --smoke on the CPU)")
        device, shape, act = torch.device("cuda", 0), Shape(), torch.bfloat16
        torch.cuda.set_device(device)
        bw, peak = copy_bandwidth(device), matmul_rate(device)
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    sw = Sweep(
        device,
        shape,
        act,
        bw,
        peak,
        sms,
        t_start + args.budget_s,
        args.min_mb << 20 if not args.smoke else 0,
        args.quick or args.smoke,
        args.smoke,
    )
    import triton

    res: dict[str, Any] = dict(
        card=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (interpreter smoke run)",
        date=time.strftime("%Y-%m-%d %H:%M"),
        torch=torch.__version__,
        triton=triton.__version__,
        command=" ".join(sys.argv),
        copy_TBps=bw / 1e12,
        matmul_TFLOPs=peak / 1e12,
        sm_count=sms,
        shape=asdict(shape),
    )
    print(f"{res['card']}: copy {bw / 1e12:.2f} TB/s (read + write), bf16 matmul {peak / 1e12:.0f} TFLOP/s, {sms} SMs")
    only = set(args.only.split(","))
    kinds = args.kv.split(",")
    ctxs = [int(c) for c in args.ctx.split(",")] if not args.smoke else [7, 40]
    batches = [int(b) for b in args.batches.split(",")] if not args.smoke else [1, 3]
    if args.jobs > 0:
        tune_decode.precompile(sw, kinds, args.jobs, "prefill" in only)
    if "decode" in only:
        res["decode"] = tune_decode.sweep(sw, kinds, ctxs, batches, args.top)
    if "prefill" in only:
        cases = [[9, 17], [33]] if args.smoke else tune_prefill.parse_cases(args.prefill)
        res["prefill"] = tune_prefill.sweep(sw, kinds, cases)
    res["measurements"] = sw.results
    res["skipped_for_time"] = sw.skipped
    res["wall_s"] = time.monotonic() - t_start
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1, default=lambda x: None if isinstance(x, float) and math.isinf(x) else str(x))
    print(f"\n{len(sw.results)} measurements in {res['wall_s']:.0f} s ({sw.skipped} skipped for time) -> {args.out}")


if __name__ == "__main__":
    main()
