"""The M = 1 GPTQ GEMV candidates, bf16, one H200 session (issue 16, P9): the row-packed kernel's tile sets
(worker/kernels/gemv.py; the default first) against the column-packed kernel (worker/kernels/gemv_npack.py):

    PYTHONPATH=. python scripts/gpu_check_gemv2.py            # on the H200: < 150 s, SUMMARY block printed last
    PYTHONPATH=. python scripts/gpu_check_gemv2.py --compile  # on a CPU: sm_90 registers, loop instructions a value

1. PASS/FAIL of every candidate on awkward cases against the fp32 reference (Int4/Int8, act order, asym zeros,
   a row shard starting inside a tile, N not a multiple of the tile, split-K auto and 3).
2. Timings on the 7B linears (Int4, act order off and on: on adds the per-call gather of x the layer does;
   Int8; the TP 4 mlp.c_proj shard of rank 1, whose first row 2752 is inside a group), weights cycled past L2
   in CUDA graphs, each candidate first checked against the reference on the same weights; GB/s counts the
   bytes a call must read.
3. SUMMARY: per line the fastest passing candidate, its us and GB/s, its speed-up over the default (the
   row-packed "g1") and over bf16 cuBLAS. The default changes only where a candidate is faster AND passes.
   Always exits 0.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gpu_check_gemv import LINES, Line, bf16_us, close, copies, run_candidates  # noqa: E402
from worker.kernels.gemv import gemv_weights, quant_gemv  # noqa: E402
from worker.kernels.gemv_npack import NPACK_TILES, npack_gemv, npack_weights  # noqa: E402
from worker.kernels.gemv_tiles import GEMV_DEFAULT, GEMV_TILES  # noqa: E402
from worker.kernels.gptq_reference import gptq_matmul_reference, group_order  # noqa: E402
from worker.quant.gptq_format import quantize_rtn  # noqa: E402

START = time.time()
WATCHDOG_S, BUDGET_S = 140, 125  # no new line after BUDGET_S; the watchdog prints the summary
ROW_PACKED = [GEMV_DEFAULT, "g1mask", "g1pipe", "g2", "g2pps2"]  # "g1pipe"/"g2": see the correctness section
SHAPES = [  # (label, K, N, first global row of the shard, act order)
    ("7b c_attn", 4096, 12288, 0, False),
    ("7b attn.c_proj", 4096, 4096, 0, False),
    ("7b w2|w1", 4096, 22016, 0, False),
    ("7b mlp.c_proj", 11008, 4096, 0, False),
    ("7b c_attn act", 4096, 12288, 0, True),
    ("7b w2|w1 act", 4096, 22016, 0, True),
    ("7b mlp.c_proj tp4r1", 2752, 4096, 2752, False),
]


def summary() -> None:
    print(f"== SUMMARY ({time.time() - START:.0f} s; us per call; default = row-packed {GEMV_DEFAULT})")
    for line in LINES:
        base = line.times.get(GEMV_DEFAULT)
        best = min(line.times, key=line.times.__getitem__) if line.times else None
        gain = f"  x{base / line.times[best]:4.2f} vs default" if base and best else ""
        print(line.text() + gain)
    print("apply: a column-packed winner (np*) exact on every line -> worker/layers/quantized.py build_gemv keeps")
    print("npack_weights(...) for M = 1 and _mm calls npack_gemv; a row-packed one -> GEMV_DEFAULT", flush=True)


def candidates(bits: int, bias: torch.Tensor | None, split: int | None = None, rows: tuple = ()) -> dict[str, Callable]:
    """name -> fn(x, (row-packed weights, column-packed weights)) -> y: the row-packed tile sets `rows`
    (default: ROW_PACKED) and every column-packed one."""
    cands: dict[str, Callable[[torch.Tensor, Any], torch.Tensor]] = {}
    for nm in rows or ROW_PACKED:
        cands[nm] = partial(lambda t, x, w: quant_gemv(x, w[0], bias, tiles=t, split_k=split), GEMV_TILES[nm][bits])
    for nm, t in NPACK_TILES.items():
        cands[nm] = partial(lambda t, x, w: npack_gemv(x, w[1], bias, tiles=t, split_k=split), t)
    return cands


def correctness_case(n: int, k: int, bits: int, gs: int, act: bool, sym: bool, lo: int) -> None:
    """Rows [lo, k) of a random RTN-quantized linear with bias; act order only with lo = 0 (a row shard of an
    act-order checkpoint is not in whole groups: the layers serve it through gptq.py, not the GEMV)."""
    g = torch.Generator().manual_seed(n + k + bits)
    w = torch.randn(n, k, generator=g) / k**0.5
    q = quantize_rtn(w, bits, gs, sym=sym, perm=torch.randperm(k, generator=g) if act else None)
    p = 32 // bits
    qw, g_idx = q.qweight[lo // p :].cuda(), q.g_idx[lo:].cuda()
    qz, sc = q.qzeros.cuda(), q.scales.to(torch.bfloat16).cuda()
    x = torch.randn(1, k - lo, generator=g).to(torch.bfloat16).cuda()
    bias = torch.randn(n, generator=g).to(torch.bfloat16).cuda()
    ref = gptq_matmul_reference(x.float(), qw, qz, sc.float(), g_idx, bits, 1, bias.float())
    qw_sorted, perm = group_order(qw, g_idx, bits)
    gw = gemv_weights(qw_sorted, qz, sc, bits, 1, gs, lo)
    both = (gw, npack_weights(gw))
    xp = x if perm is None else x[:, perm]
    for split in (None, 3):
        for nm, fn in candidates(bits, bias, split, (GEMV_DEFAULT,)).items():
            try:
                ok, rel = close(fn(xp, both), ref)
                ok &= int(gw.counters.abs().sum()) == 0
                res = f"rel {rel:.1e}"
            except Exception as exc:  # a failing candidate is a finding
                ok, res = False, f"{type(exc).__name__}: {str(exc)[:200]}"
            print(f"{'PASS' if ok else 'FAIL'} int{bits} {nm:8s} N={n} K={k} gs={gs} act={act} sym={sym} lo={lo}"
                  f" split={split} {res}", flush=True)  # fmt: skip


def correctness() -> None:
    print("== correctness (bf16 x, M = 1, vs the fp32 reference; rel = max err / max |ref|, PASS <= 1e-2; the")
    print("   row-packed tile sets other than the default: scripts/gpu_check_gemv.py, and each timing line below)")
    cases = ((520, 1408, True, True, 0), (520, 1408, False, False, 200))  # sym: the timings' compiled variant
    for bits in (4, 8):
        for n, k, act, sym, lo in cases:
            correctness_case(n, k, bits, 128, act, sym, lo)


def time_line(label: str, k: int, n: int, lo: int, act: bool, bits: int) -> None:
    p, g0 = 32 // bits, lo // 128
    groups = (lo + k - 1) // 128 + 1
    words = [torch.randint(-(2**31), 2**31 - 1, (k // p, n), dtype=torch.int32, device="cuda")]
    words += [torch.randint_like(words[0], -(2**31), 2**31 - 1) for _ in range(copies(words[0].numel() * 4) - 1)]
    scales = torch.rand(groups, n, device="cuda").to(torch.bfloat16) * 1e-3
    qzeros = torch.full((groups, n // p), 0x77777777 if bits == 4 else 0x7F7F7F7F, dtype=torch.int32, device="cuda")
    g_idx = ((torch.arange(k, device="cuda") + lo) // 128).to(torch.int32)
    x = torch.randn(1, k, device="cuda").to(torch.bfloat16)
    bias = torch.randn(n, device="cuda").to(torch.bfloat16)  # as in c_attn; shares the checks' compiled variants
    perm = torch.randperm(k, device="cuda") if act else None  # the layer's gather of x (rows already sorted)
    line = Line(label, f"int{bits}", 1, default=GEMV_DEFAULT)
    line.nbytes = words[0].numel() * 4 + scales[g0:].numel() * 2 + x.numel() * 2 + n * 4
    LINES.append(line)
    ws = []
    for wd in words:
        gw = gemv_weights(wd, qzeros, scales, bits, 1, 128, lo)
        ws.append((gw, npack_weights(gw)))
    ref = gptq_matmul_reference(x.float(), words[0], qzeros, scales.float(), g_idx, bits, 1, bias.float())
    xs = x if perm is None else x[:, torch.argsort(perm)]  # x[:, perm] per call gives back x
    cands: dict[str, Callable[[Any], object]] = {
        nm: partial(lambda f, w: f(xs if perm is None else xs.index_select(1, perm), w), fn)
        for nm, fn in candidates(bits, bias).items()
    }
    run_candidates(line, cands, ref, ws)
    del words, ws
    line.bf16_us = bf16_us(k, n, 1, x)


def timings() -> None:
    print("== timings (CUDA graphs over weight copies > L2; M = 1)")
    for label, k, n, lo, act in SHAPES:
        for bits in (4, 8) if not act and not lo else (4,):
            if time.time() - START > BUDGET_S:
                print(f"skipped {label} int{bits}: time budget", flush=True)
                continue
            try:
                time_line(label, k, n, lo, act, bits)
            except Exception as exc:
                print(f"FAIL {label} int{bits}: {type(exc).__name__}: {str(exc)[:300]}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--compile", action="store_true", help="CPU: compile the column-packed variants for sm_90")
    if ap.parse_args().compile:
        from gemv_compile import compile_npack

        compile_npack()
        return
    if not torch.cuda.is_available():
        print("no CUDA device: nothing checked (use --compile on a CPU)")
        return

    def timeout() -> None:
        print(f"TIMEOUT at {WATCHDOG_S} s: stopped", flush=True)
        summary()
        os._exit(0)

    watchdog = threading.Timer(WATCHDOG_S, timeout)
    watchdog.daemon = True
    watchdog.start()
    import triton

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    try:
        correctness()
    except Exception as exc:
        print(f"FAIL correctness: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
    timings()
    summary()
    os._exit(0)


if __name__ == "__main__":
    main()
