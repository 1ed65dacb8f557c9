"""The decode half of scripts/tune_attention.py: loop variants, split counts, split policies, and the
compile-ahead pool (spawned processes fill Triton's on-disk cache with every variant first)."""

from __future__ import annotations

import math
import multiprocessing as mp
import time
from dataclasses import asdict, replace
from typing import Any

import torch

from tune_cases import DecodeCase, PrefillCase, Shape, max_error, time_per_call
from worker.kernels.paged_decode import choose_num_splits, paged_decode
from worker.kernels.triton_attention import Tiles

LOOP_KNOBS = (
    "decode_n",
    "decode_warps",
    "decode_stages",
    "decode_lanes",
    "decode_prefetch",
    "decode_fused_reduce",
    "decode_newest_apart",
)
SPLITS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
POLICIES = [  # (ctas_per_sm, min_tiles, max_splits) candidates for Tiles' split policy
    (c, t, s) for c in (1, 2, 4, 8, 16) for t in (1, 2, 4) for s in (16, 32, 64)
]
OLD = Tiles(decode_n=32, decode_warps=4, decode_stages=1)  # before issue #17 (+ K and V loads issued together)
OLD_POLICY = (2, 2, 16)


def geomean(times: list[float | None]) -> float | None:
    """Geometric mean, None if any time is missing (a failed or skipped measurement)."""
    ok = [x for x in times if x is not None]
    return math.prod(ok) ** (1 / len(ok)) if ok and len(ok) == len(times) else None


def name(t: Tiles) -> str:
    """Compact label: n64 w4 s2 +lanes +prefetch."""
    label = f"n{t.decode_n} w{t.decode_warps} s{t.decode_stages}"
    label += (" +lanes" if t.decode_lanes else "") + (" +prefetch" if t.decode_prefetch else "")
    return label + (" +fused" if t.decode_fused_reduce else "") + (" +apart" if t.decode_newest_apart else "")


def spec(t: Tiles) -> str:
    """Tiles.parse() input for the loop knobs."""
    return ",".join(f"{k}={int(v)}" for k, v in asdict(t).items() if k in LOOP_KNOBS)


def variants(quick: bool, head_dim: int = 128, smoke: bool = False) -> list[Tiles]:
    """Loop variants worth timing: accumulators that fit in registers (lanes keep [n, head_dim] fp32)
    and pipeline buffers within ~160 KB of shared memory (bf16 K and V tiles per extra stage)."""
    if smoke:  # the interpreter: three variants, small tiles
        return [
            Tiles(decode_n=8, decode_stages=1),
            Tiles(decode_n=8, decode_stages=2, decode_lanes=True),
            Tiles(decode_n=16, decode_stages=2, decode_prefetch=True),
        ]
    out = []
    tiles_n = (32, 64) if quick else (32, 64, 128)
    for n in tiles_n:
        for w in (4, 8):
            for st in (1, 2, 3) if quick else (1, 2, 3, 4):
                for lanes in (False, True):
                    if lanes and n * head_dim // (32 * w) > 64:  # fp32 accumulator registers per thread
                        continue
                    if (st - 1) * n * head_dim * 2 * 2 > 160 * 1024:
                        continue
                    out.append(Tiles(decode_n=n, decode_warps=w, decode_stages=st, decode_lanes=lanes))
    for n in (32, 64):
        for st in (1, 2):
            for lanes in (False, True):
                out.append(
                    Tiles(decode_n=n, decode_warps=4, decode_stages=st, decode_lanes=lanes, decode_prefetch=True)
                )
    return out


def policy_splits(t: Tiles, policy: tuple[int, int, int], batch: int, heads: int, ctx: int, sms: int) -> int:
    c, m, s = policy
    return choose_num_splits(batch, heads, ctx, t.decode_n, sms, max_splits=s, ctas_per_sm=c, min_tiles=m)


def measure(sw: Any, case: DecodeCase, t: Tiles, splits: int, memo: dict) -> float | None:
    """Check once against the fp32 reference, then time (seconds per layer call); None if it fails."""
    key = (case.kv, case.ctx, case.batch, spec(t), splits)
    if key in memo:
        return memo[key]
    if sw.out_of_time():
        sw.skipped += 1
        return None
    ks, vs = case.scales

    def call(i: int) -> torch.Tensor:
        kc, vc = case.caches[i]
        return paged_decode(
            case.q, kc, vc, case.tables[i], case.lens, case.ctx, case.scale, t, splits, ks, vs, sw.decode_ws
        )

    rec: dict[str, Any] = dict(
        kind="decode", kv=case.kv, ctx=case.ctx, batch=case.batch, variant=name(t), tiles=spec(t), splits=splits
    )
    sec = None
    try:
        err = max_error(call(0), case.reference())
        rec["err"] = err if math.isfinite(err) else None
        if err <= 1.0:
            sec = time_per_call(lambda: [call(i) for i in range(len(case.caches))], len(case.caches), sw.device)
            rec.update(ms=sec * 1e3, GBps=case.kv_bytes / sec / 1e9, floor_ratio=sec * sw.copy_Bps / case.kv_bytes)
        else:
            rec["error"] = "wrong result"
    except Exception as exc:  # compile failures (out of resources), launch errors: recorded, never picked
        rec["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    sw.results.append(rec)
    memo[key] = sec
    return sec


def case_of(sw: Any, cases: dict[tuple[int, int], DecodeCase], kv: str, ctx: int, b: int) -> DecodeCase:
    """The row's case, built on first use; one row's caches live at a time (32k x 16 is 17 GB in bf16)."""
    if (ctx, b) not in cases:
        cases.clear()
        if sw.device.type == "cuda":
            torch.cuda.empty_cache()
        cases[(ctx, b)] = DecodeCase.build(ctx, b, kv, sw.shape, sw.device, sw.min_bytes, sw.act)
    return cases[(ctx, b)]


def sweep(sw: Any, kinds: list[str], ctxs: list[int], batches: list[int], top: int) -> dict[str, Any]:
    """Stage 1 (loop variants at the anchor rows), stage 2 (split counts on every row); prints per row."""
    H = sw.shape.heads
    out: dict[str, Any] = {}
    anchor_ctx = 8192 if 8192 in ctxs else max(ctxs)
    for kv in kinds:
        memo: dict = {}
        cases: dict[tuple[int, int], DecodeCase] = {}
        tiles = variants(sw.quick, sw.shape.head_dim, sw.smoke)
        for b in batches:  # one anchor row's caches at a time
            case = case_of(sw, cases, kv, anchor_ctx, b)
            for t in tiles:
                measure(sw, case, t, t.decode_splits(b, H, anchor_ctx, sw.sm_count), memo)
        ranked = []
        for t in tiles:
            key = [(kv, anchor_ctx, b, spec(t), t.decode_splits(b, H, anchor_ctx, sw.sm_count)) for b in batches]
            g = geomean([memo.get(k) for k in key])
            if g is not None:
                ranked.append((g, t))
        ranked.sort(key=lambda r: r[0])
        best_tiles = [t for _, t in ranked[:top]]
        best_tiles += [replace(t, decode_fused_reduce=True) for t in best_tiles[:2]]  # one launch, no reduce kernel
        # the newest key in a tile of its own or apart, whichever the best two lack
        best_tiles += [replace(t, decode_newest_apart=not t.decode_newest_apart) for t in best_tiles[:2]]
        print(
            f"\ndecode {kv}: stage 1, {len(ranked)} variants ok at ctx {anchor_ctx}; best: "
            + "; ".join(f"{name(t)} {g * 1e3:.3f} ms" for g, t in ranked[:top])
        )
        rows = []
        for ctx in ctxs:
            for b in batches:
                case = case_of(sw, cases, kv, ctx, b)
                for t in best_tiles + [OLD, Tiles()]:
                    cands = {s for s in SPLITS if s <= math.ceil(ctx / t.decode_n)}
                    cands |= {policy_splits(t, p, b, H, ctx, sw.sm_count) for p in POLICIES + [OLD_POLICY]}
                    if t in (OLD, Tiles()) and t not in best_tiles:
                        cands = {
                            policy_splits(
                                t,
                                OLD_POLICY
                                if t == OLD
                                else (t.decode_ctas_per_sm, t.decode_min_tiles, t.decode_max_splits),
                                b,
                                H,
                                ctx,
                                sw.sm_count,
                            )
                        }
                    for s in sorted(cands):
                        measure(sw, case, t, s, memo)
                rows.append(row_summary(sw, case, best_tiles, memo))
        out[kv] = dict(
            variants=[dict(variant=name(t), tiles=spec(t), geomean_ms=g * 1e3) for g, t in ranked],
            rows=rows,
            policy=best_policy(sw, kv, ctxs, batches, best_tiles, memo),
        )
        print_rows(kv, rows, out[kv]["policy"])
    return out


def row_summary(sw: Any, case: DecodeCase, best_tiles: list[Tiles], memo: dict) -> dict[str, Any]:
    kv, ctx, b = case.kv, case.ctx, case.batch
    found = [
        (sec, t, s)
        for (k, c, bb, sp, s), sec in memo.items()
        if (k, c, bb) == (kv, ctx, b) and sec is not None
        for t in [Tiles.parse(sp)]
    ]
    floor = case.kv_bytes / sw.copy_Bps
    row: dict[str, Any] = dict(ctx=ctx, batch=b, floor_ms=floor * 1e3)
    if found:
        sec, t, s = min(found, key=lambda f: f[0])
        row.update(
            best_ms=sec * 1e3,
            best=name(t),
            tiles=spec(t),
            splits=s,
            GBps=case.kv_bytes / sec / 1e9,
            floor_ratio=sec / floor,
        )
    for label, t, pol in (("old", OLD, OLD_POLICY), ("default", Tiles(), None)):
        p = pol or (t.decode_ctas_per_sm, t.decode_min_tiles, t.decode_max_splits)
        s = policy_splits(t, p, b, sw.shape.heads, ctx, sw.sm_count)
        sec = memo.get((kv, ctx, b, spec(t), s))
        row[f"{label}_ms"] = None if sec is None else sec * 1e3
        row[f"{label}_splits"] = s
    return row


def best_policy(sw: Any, kv: str, ctxs: list[int], batches: list[int], best_tiles: list[Tiles], memo: dict) -> Any:
    """The (variant, split policy) with the lowest geometric-mean time over all rows."""
    best = None
    for t in best_tiles:
        for p in POLICIES:
            times = [
                memo.get((kv, c, b, spec(t), policy_splits(t, p, b, sw.shape.heads, c, sw.sm_count)))
                for c in ctxs
                for b in batches
            ]
            g = geomean(times)
            if g is not None and (best is None or g < best[0]):
                best = (g, t, p)
    if best is None:
        return None
    g, t, (c, m, s) = best
    tiles = replace(t, decode_ctas_per_sm=c, decode_min_tiles=m, decode_max_splits=s)
    return dict(
        geomean_ms=g * 1e3,
        tiles=spec(t) + f",decode_ctas_per_sm={c},decode_min_tiles={m},decode_max_splits={s}",
        repr=repr(tiles),
    )


def print_rows(kv: str, rows: list[dict[str, Any]], policy: Any) -> None:
    print(f"decode {kv}: per row, best config | split policy now (Tiles()) | before issue #17")
    for r in rows:
        best = (
            f"{r['best_ms']:8.3f} ms {r['GBps']:6.0f} GB/s ({1 / r['floor_ratio']:4.0%} of copy, "
            f"x{r['floor_ratio']:.2f} the KV floor)  "
            f"{r['best']} splits {r['splits']}"
            if "best_ms" in r
            else "   (no config passed)"
        )
        now = "-" if r["default_ms"] is None else f"{r['default_ms']:.3f} ms (splits {r['default_splits']})"
        old = "-" if r["old_ms"] is None else f"{r['old_ms']:.3f} ms (splits {r['old_splits']})"
        print(f"  ctx {r['ctx']:6d} b {r['batch']:3d}: {best} | {now} | {old}")
    if policy:
        print(f"  best default over all rows: Tiles.parse({policy['tiles']!r})  geomean {policy['geomean_ms']:.3f} ms")


def _warm(job: tuple[str, str, str, tuple[int, int, int]]) -> str:
    """Compile one variant (in a spawned process) on a tiny case with the real run's specialisation."""
    kind, kv, tiles_spec, (heads, head_dim, block) = job
    try:
        shape, dev, t = Shape(heads, head_dim, block), torch.device("cuda", 0), Tiles.parse(tiles_spec)
        if kind == "decode":
            c = DecodeCase.build(2 * t.decode_n, 1, kv, shape, dev, 0)
            for splits in (2,):  # the split kernel (one split's direct form compiles later, for the best few)
                paged_decode(c.q, *c.caches[0], c.tables[0], c.lens, c.ctx, c.scale, t, splits, *c.scales)
        else:
            from worker.kernels.paged_prefill import paged_prefill

            p = PrefillCase.build([200], kv, shape, dev)
            paged_prefill(p.q, p.k, p.v, p.k_cache, p.v_cache, p.tables, p.cu, p.cache_lens, p.scale, t, *p.scales)
            if kv == "bf16":
                paged_prefill(p.q, p.k, p.v, None, None, None, p.cu, None, p.scale, t)
        torch.cuda.synchronize()
        return ""
    except Exception as exc:  # the main process records it when it meets the config
        return f"{kind} {tiles_spec}: {type(exc).__name__}"


def precompile(sw: Any, kinds: list[str], jobs: int, prefill: bool) -> None:
    """Fill Triton's on-disk cache with every decode variant (and prefill tile) from `jobs` processes."""
    import tune_prefill

    s = (sw.shape.heads, sw.shape.head_dim, sw.shape.block)
    work = [
        ("decode", kv, spec(t), s)
        for kv in kinds
        for t in variants(sw.quick, sw.shape.head_dim, sw.smoke) + [OLD, Tiles()]
    ]
    if prefill:
        work += [("prefill", "bf16", tune_prefill.spec(t), s) for t in tune_prefill.configs(sw.quick)]
    t0 = time.monotonic()
    try:
        with mp.get_context("spawn").Pool(jobs) as pool:
            timeout = max(30.0, (sw.deadline - time.monotonic()) / 2)
            failed = [f for f in pool.map_async(_warm, work, chunksize=1).get(timeout=timeout) if f]
        print(f"compiled {len(work)} kernels ahead in {time.monotonic() - t0:.0f} s ({len(failed)} failed)")
    except Exception as exc:  # the sweep then compiles inline
        print(f"compile-ahead pool failed ({type(exc).__name__}: {exc}); compiling inline")
