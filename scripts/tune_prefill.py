"""The prefill half of scripts/tune_attention.py: the Triton prefill kernel's tiles on fresh prompts, over
the new tokens' k/v (no cache) and over the paged cache (bf16; fp8 for the best three), and torch's
varlen_attn (FlashAttention-2, what TritonAttention uses for fresh prompts when it is available)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict
from functools import partial
from typing import Any

import torch

from tune_cases import PrefillCase, max_error, time_eager
from worker.kernels.paged_prefill import paged_prefill
from worker.kernels.triton_attention import Tiles
from worker.layers.attention_triton import torch_varlen_attn

KNOBS = ("prefill_m", "prefill_n", "prefill_warps", "prefill_stages")


def configs(quick: bool, smoke: bool = False) -> list[Tiles]:
    """(BLOCK_M, BLOCK_N, warps, stages): the default first, then larger tiles for Hopper's wgmma."""
    if smoke:
        return [Tiles(prefill_m=16, prefill_n=16, prefill_warps=4, prefill_stages=2)]
    grid = [(64, 32, 4, 3), (64, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 8, 2), (128, 128, 8, 2)]
    if not quick:
        grid += [
            (64, 128, 4, 3),
            (128, 32, 8, 3),
            (64, 64, 4, 4),
            (128, 64, 8, 4),
            (64, 32, 4, 2),
        ]  # (128, 64, 4): spills
    return [Tiles(prefill_m=m, prefill_n=n, prefill_warps=w, prefill_stages=s) for m, n, w, s in grid]


def spec(t: Tiles) -> str:
    return ",".join(f"{k}={v}" for k, v in asdict(t).items() if k in KNOBS)


def parse_cases(text: str) -> list[list[int]]:
    """ "32768;1024x8" -> [[32768], [1024] * 8]."""
    out = []
    for item in filter(None, text.split(";")):
        n, _, b = item.partition("x")
        out.append([int(n)] * int(b or 1))
    return out


def measure(sw: Any, case: PrefillCase, label: str, run: Callable[[], torch.Tensor], paged: bool) -> float | None:
    """Check rows against the fp32 reference, then time one call; records and returns seconds (None: failed)."""
    rec: dict[str, Any] = dict(kind="prefill", kv=case.kv, case=case_name(case.lens), config=label)
    if sw.out_of_time():
        sw.skipped += 1
        return None
    sec = None
    try:
        out = run()
        err = max(max_error(out[i0:i1], case.reference(i0, i1, paged)) for i0, i1 in case.check_rows())
        rec["err"] = err if math.isfinite(err) else None
        if err <= 1.0:
            sec = time_eager(run, sw.device)
            flops = case.flops(sw.shape.heads * sw.shape.head_dim)
            rec.update(ms=sec * 1e3, TFLOPs=flops / sec / 1e12, mfu=flops / sec / sw.matmul_flops)
        else:
            rec["error"] = "wrong result"
    except Exception as exc:  # compile failures (out of resources), unsupported builds
        rec["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    sw.results.append(rec)
    return sec


def case_name(lens: list[int]) -> str:
    """ "32768", "1024x8", or "9+17" for unequal prompts."""
    if len(set(lens)) == 1:
        return f"{lens[0]}" if len(lens) == 1 else f"{lens[0]}x{len(lens)}"
    return "+".join(map(str, lens))


def triton_run(c: PrefillCase, t: Tiles, paged: bool) -> Callable[[], torch.Tensor]:
    if paged:
        return partial(
            paged_prefill, c.q, c.k, c.v, c.k_cache, c.v_cache, c.tables, c.cu, c.cache_lens, c.scale, t, *c.scales
        )
    return partial(paged_prefill, c.q, c.k, c.v, None, None, None, c.cu, None, c.scale, t)


def prefill_rows(sw: Any, lens: list[int], kinds: list[str]) -> list[tuple[str, float]]:
    """(label, seconds) of every config that passed on prompts `lens`."""
    rows: list[tuple[str, float]] = []
    case = PrefillCase.build(lens, "bf16", sw.shape, sw.device, sw.act)
    varlen = torch_varlen_attn() if sw.device.type == "cuda" else None
    if varlen is not None:
        n = max(lens)
        run = partial(varlen, case.q, case.k, case.v, case.cu, case.cu, n, n, scale=case.scale, window_size=(-1, 0))
        sec = measure(sw, case, "varlen_attn", run, False)
        if sec is not None:
            rows.append(("varlen_attn (FA2: fresh prompts now)", sec))
    paged_times = []
    for t in configs(sw.quick, sw.smoke):
        for paged in (False, True):
            label = f"triton {'paged' if paged else 'no-cache'} {spec(t)}"
            sec = measure(sw, case, label, triton_run(case, t, paged), paged)
            if sec is not None:
                rows.append((label, sec))
                if paged:
                    paged_times.append((sec, t))
    del case
    if "fp8" in kinds:
        c8 = PrefillCase.build(lens, "fp8", sw.shape, sw.device, sw.act)
        for _, t in sorted(paged_times, key=lambda p: p[0])[:3]:
            sec = measure(sw, c8, f"triton paged fp8 {spec(t)}", triton_run(c8, t, True), True)
            if sec is not None:
                rows.append((f"triton paged fp8 {spec(t)}", sec))
    if sw.device.type == "cuda":
        torch.cuda.empty_cache()
    return sorted(rows, key=lambda r: r[1])


def sweep(sw: Any, kinds: list[str], cases: list[list[int]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    hidden = sw.shape.heads * sw.shape.head_dim
    for lens in cases:
        name = case_name(lens)
        flops = sum(4.0 * hidden * n * (n + 1) / 2 for n in lens)
        rows = prefill_rows(sw, lens, kinds)
        out[name] = [dict(config=label, ms=s * 1e3, mfu=flops / s / sw.matmul_flops) for label, s in rows]
        print(f"\nprefill {name} ({flops / 1e12:.2f} TFLOP of attention per layer), fastest first:")
        for label, s in rows[:8]:
            print(f"  {s * 1e3:9.3f} ms  MFU {flops / s / sw.matmul_flops:5.2f}  {label}")
    return out
