"""The multi-LoRA decode rows of scripts/bench.py (`--only lora`): P2 (graphed decode with every request on
its own adapter vs base, per LoRA backend and decode mode), then our side of P3 (bench_generate.py, on the
served mode's graphs; the peer's side: bench_peer.py `peer_generate`). P6 (LoadAdapter latency) is in
bench_adapter_load.py. Run alone, P3's generate-heavy row in one command:

    python scripts/bench_lora.py            # 32 x 128 -> 128, 32 adapters: ours whole, HF + PEFT extrapolated
    python scripts/bench_lora.py --no-peer  # ours only (and the P2 rows at batch 32)
"""

from __future__ import annotations

import math
import time
from types import SimpleNamespace
from typing import Any

import torch

from bench_common import cuda_time, print_kernel_table, weight_bytes
from bench_generate import bench_generate


def fill_random_adapters(mgr, n: int, rank: int, alpha: float, seed: int = 0) -> None:
    """Slots 1..n of the pool hold random rank-`rank` adapters on all five modules, written straight into
    the pool as LoadAdapter leaves them (A; B with alpha/rank folded in) with their ranks set."""
    g = torch.Generator(device=mgr.pctx.device).manual_seed(seed)
    for a, b in mgr.slots.stacked.values():  # a: [slots, P, r_max, in]; b: [slots, P, out, r_max]
        a[1 : n + 1, :, :rank].normal_(0.0, a.shape[-1] ** -0.5, generator=g)
        b[1 : n + 1, :, :, :rank].normal_(0.0, 0.02 * alpha / rank, generator=g)
    mgr.slots.ranks[1 : n + 1] = rank


def lora_bytes(mgr, rank: int) -> int:
    """Bytes of one rank-`rank` adapter on all modules (what a step reads per distinct adapter)."""
    return sum(
        rank * (a.shape[1] * a.shape[-1] + b.shape[1] * b.shape[2]) * a.element_size()
        for a, b in mgr.slots.stacked.values()
    )


def lora_linears(model) -> list[tuple[object, str]]:
    return [(t.owner, t.attr) for t in model.lora_targets()]


def unwrap_lora(model) -> None:
    for owner, name in lora_linears(model):
        setattr(owner, name, getattr(owner, name).base)


def parse_variant(label: str) -> tuple[str, list[str], dict[str, int], list[str]]:
    """A --modes entry MODE[+KERNEL...][@BNxW[xNORM_BN]][-off=KEY+KEY...] -> (LoraTerm decode mode, DecodeKernels
    fields switched on besides the benchmark's, the lora_rows.TILE entries it sets (the expands' block_n and
    num_warps, lora_norm_shrink's norm_block_n; the others keep the served tile), the targets left without their
    term)."""
    rest, _, off = label.partition("-off=")
    rest, _, tile = rest.partition("@")
    mode, *extra = rest.split("+")
    sizes = dict(zip(("block_n", "num_warps", "norm_block_n"), map(int, tile.split("x")))) if tile else {}
    return mode, extra, sizes, off.split("+") if off else []


def bench_lora_decode(
    model,
    batches: list[int],
    ctx_len: int,
    block_size: int,
    bw: float,
    slots: int,
    rank: int,
    max_rank: int,
    peer_batch: int,
    peer_prompt: int,
    peer_new: int,
    decode_modes: tuple[str, ...] = ("local", "side"),
    profile: bool = False,
    pool_rank: int | None = None,
    mix: tuple[int, int] = (0, 0),
) -> dict:
    """P2: graphed decode with every request on its own adapter vs graphed base-only decode (the same
    GraphedDecode, the same inputs), for the torch path and the kernels (shrink beside the base matmul or
    not, and each LoraTerm decode mode of `decode_modes`); and our side of P3 (bench_peer's workload: the
    whole generate, prefill and every decode step)."""
    from dataclasses import replace

    from worker.adapters.pool import AdapterManager
    from worker.engine.cuda_graphs import GraphedDecode
    from worker.engine.kv_cache import KVCache
    from worker.kernels import lora_rows
    from worker.layers.decode_kernels import apply_decode_kernels

    c, dev = model.config, model.pctx.device
    if max(batches + [peer_batch]) > slots:
        raise SystemExit(f"--lora-slots {slots} < the largest batch: every request needs its own adapter")
    mgr = AdapterManager("", model, model.pctx, model.dtype, max_rank, slots, pool_rank=pool_rank)
    big, count = mix  # the first `count` slots hold rank-`big` adapters instead (a pool of mixed ranks)
    if max(rank, big) > max_rank:
        raise SystemExit(f"adapters of rank {max(rank, big)} do not fit pools of max rank {max_rank}")
    mgr.slots.set_rank(mgr.slots.rank_for(max(rank, big)))  # as loading them would (before the targets are wrapped)
    mgr.attach(SimpleNamespace(model=model, batches={}, adapters=None))
    fill_random_adapters(mgr, slots, rank, alpha=2.0 * rank)
    if count:
        fill_random_adapters(mgr, count, big, alpha=2.0 * big, seed=1)
    heads = c.num_attention_heads // model.pctx.world_size
    per_seq = math.ceil((max(ctx_len + 1, peer_prompt + peer_new)) / block_size)
    max_batch = max(batches + [peer_batch])
    num_blocks = 2 + max_batch * per_seq
    kv = KVCache(c.num_hidden_layers, num_blocks, block_size, heads, c.head_dim, torch.bfloat16, dev)
    kv_per_token = KVCache.bytes_per_token(c.num_hidden_layers, heads, c.head_dim, torch.bfloat16)
    reqs = []
    for i in range(max_batch):
        blocks = list(range(1 + i * per_seq, 1 + (i + 1) * per_seq))
        reqs.append(
            SimpleNamespace(
                ids=[(7 * i + j) % 1000 + 1 for j in range(ctx_len + 1)],
                blocks=blocks,
                slots=[blocks[p // block_size] * block_size + p % block_size for p in range(ctx_len + 1)],
                ntk_alpha=1.0,
                n_cached=0,
            )
        )
    wbytes, per_adapter = weight_bytes(model), lora_bytes(mgr, rank)
    rows, capture_s = [], {}
    triton = mgr.kernels is not None
    side = mgr.shrink_stream is not None
    # the modes the manager chose per target for this shape and pool (--lora-decode auto): the variant "auto" keeps them
    chosen = [getattr(owner, name).lora.decode for owner, name in lora_linears(model)]
    served = chosen[0] if len(set(chosen)) == 1 else "auto"
    variants = (  # (backend, side stream, LoraTerm.decode); the served configuration last (the generate's)
        [("torch", False, "two")]
        + ([("triton", False, "two")] if triton else [])
        + ([("triton", True, "two")] if triton and side else [])
        + ([("triton", m.startswith(("side", "gemm", "auto")), m) for m in decode_modes] if triton else [])
    )
    if triton and variants[-1][2] != served:
        variants.append(("triton", served != "two" and side, served))
    graphs: GraphedDecode | None = None
    kernels = model.transformer.layers()[0].attn.rotary.opts  # the decode kernels the benchmark was given
    unwrapped: list[tuple[Any, str, Any]] = []
    served_tile = dict(lora_rows.TILE)
    for k, (backend, overlap, label) in enumerate(variants):
        if k:  # the previous variant's graphs go before the next capture
            graphs = None
            torch.cuda.empty_cache()
        for owner, attr, wrapper in unwrapped:  # the previous variant's "-off" targets get their wrappers back
            setattr(owner, attr, wrapper)
        unwrapped = []
        mode, extra, sizes, off = parse_variant(label)
        lora_rows.TILE.update({**served_tile, **sizes})
        apply_decode_kernels(model.transformer, replace(kernels, **dict.fromkeys(extra, True)))
        for (owner, name), picked in zip(lora_linears(model), chosen):  # batched bmm, or the kernels
            term = getattr(owner, name).lora
            term.kernels = mgr.kernels if backend == "triton" else None
            term.stream = mgr.shrink_stream if overlap else None
            term.decode = picked if mode == "auto" else mode
        for t in model.lora_targets():
            if t.key in off:
                unwrapped.append((t.owner, t.attr, getattr(t.owner, t.attr)))
                setattr(t.owner, t.attr, unwrapped[-1][2].base)
        t0 = time.time()
        graphs = GraphedDecode(model, kv, max_batch, per_seq, num_blocks - 1, adapter_pools=True)
        capture_s[f"{backend}{'-overlap' if overlap else ''}{'' if label == 'two' else '-' + label}"] = time.time() - t0
        for b in batches:
            batch: Any = SimpleNamespace(requests=reqs[:b])  # a Batch as far as graphs.run reads it
            graphs.run(batch, None)  # fills the static inputs of this bucket
            base_g = graphs.graphs[graphs.last_key][0]
            base = cuda_time(base_g.replay, iters=30)
            graphs.run(batch, list(range(1, b + 1)))  # request i on slot i + 1: b distinct adapters
            lora_g = graphs.graphs[graphs.last_key][0]
            lora = cuda_time(lora_g.replay, iters=30)
            if profile:
                for name, g in (("base", base_g), (label, lora_g)):
                    print(f"-- kernels of one graphed step, b={b}, {name}")
                    print_kernel_table(g.replay, top=18)
            floor = (wbytes + b * (ctx_len + 1) * kv_per_token) / bw
            rows.append(
                dict(
                    batch=b,
                    adapters=b,
                    backend=backend,
                    overlap=overlap,
                    decode_mode=label,
                    base_ms=base * 1e3,
                    lora_ms=lora * 1e3,
                    ratio=base / lora,
                    extra_ms=(lora - base) * 1e3,
                    lora_floor_ms=b * per_adapter / bw * 1e3,
                    base_floor_ms=floor * 1e3,
                    base_tok_s=b / base,
                    lora_tok_s=b / lora,
                )
            )
    assert graphs is not None  # the served configuration's (the last variant's), for the generate workload
    out = dict(
        rank=rank,
        max_rank=max_rank,
        pool_rank=mgr.slots.rank,
        mix=mix,
        slots=slots,
        alpha=2.0 * rank,
        adapter_MB=per_adapter / 1e6,
        graph_capture_s=capture_s,
        decode=rows,
        generate=bench_generate(model, graphs, kv, reqs[:peer_batch], peer_prompt, peer_new),
    )
    del graphs, kv
    unwrap_lora(model)
    del mgr
    torch.cuda.empty_cache()
    return out


def bench_pool_growth(model, slots: int, pool_rank: int, max_rank: int, max_batch: int, ctx_len: int) -> dict:
    """The LoadAdapter that grows the pools (AdapterManager._fit_rank: the steps in flight waited for, every pool
    re-laid out at more lanes a slot, the decode graphs with adapters captured again), timed over serve's decode
    graphs (batch buckets up to `max_batch`, contexts up to `ctx_len`) for a pool of `slots` slots."""
    from worker.adapters.pool import AdapterManager
    from worker.engine.cuda_graphs import GraphedDecode
    from worker.engine.kv_cache import KVCache

    c, dev = model.config, model.pctx.device
    mgr = AdapterManager("", model, model.pctx, model.dtype, max_rank, slots, pool_rank=pool_rank)
    engine = SimpleNamespace(model=model, batches={}, adapters=None)
    mgr.attach(engine)
    per_seq = math.ceil((ctx_len + 1) / 16)
    heads = c.num_attention_heads // model.pctx.world_size
    kv = KVCache(c.num_hidden_layers, 2 + per_seq, 16, heads, c.head_dim, torch.bfloat16, dev)
    t0 = time.perf_counter()
    graphs = GraphedDecode(model, kv, max_batch, per_seq, 1 + per_seq, adapter_pools=True)
    capture_s = time.perf_counter() - t0
    engine.adapter_pool_changed = graphs.recapture_adapters
    rows = []
    for r in (2 * pool_rank, max_rank):
        if r <= mgr.slots.rank or r > max_rank:
            continue
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        mgr._fit_rank(r)
        torch.cuda.synchronize()
        rows.append(dict(lanes=r, ms=(time.perf_counter() - t0) * 1e3))
    out = dict(slots=slots, max_batch=max_batch, graphs=len(graphs.graphs), capture_all_s=capture_s, grow=rows)
    del graphs, kv
    unwrap_lora(model)
    torch.cuda.empty_cache()
    return out


def main() -> None:
    """P3 (and P2 at the same batch) in one command: ours, then the peer on the same GPU."""
    import argparse
    import json

    from bench_common import add_decode_kernels_arg, build_model, copy_bandwidth, with_decode_kernels
    from bench_peer import peer_generate
    from worker.distributed import ParallelContext

    ap = argparse.ArgumentParser(description="P3: " + (bench_lora_decode.__doc__ or "").split("\n")[0])
    ap.add_argument("--shape", default="7b")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--slots", type=int, default=0, help="adapter slots in the pool (0: --batch; all hold an adapter)")
    ap.add_argument(
        "--mix",
        default="",
        help="RANK:COUNT: the first COUNT slots hold rank-RANK adapters, the others --rank ones (the pools' lanes then "
        "fit RANK, as serve's grow when such an adapter loads)",
    )
    ap.add_argument("--max-rank", type=int, default=0, help="the pools' r_max (0: --rank; the server's default is 64)")
    ap.add_argument(
        "--pool-rank",
        type=int,
        default=0,
        help="the pools' lanes a slot before the adapters load (serve's --lora-pool-rank; 0: its default, 16 or "
        "--max-rank if smaller); they grow to fit --rank as serve's would",
    )
    ap.add_argument(
        "--modes",
        default="side_store,gemm",
        help="LoraTerm decode modes to time (comma-separated; gemm: served where it applies; auto: each target in the "
        "mode serve's --lora-decode auto picks for this pool; MODE+KERNEL: that mode "
        "with a DecodeKernels field switched on besides --decode-kernels, e.g. gemm+act_gemv; MODE@BNxW: the "
        "expands' tile, e.g. gemm@128x4; MODE-off=KEY+KEY: without those targets' term, e.g. "
        "gemm-off=attn.c_proj+mlp.c_proj). The served mode runs last (added if it is not) and its graphs run P3's "
        "generate",
    )
    ap.add_argument("--ctx", type=int, default=512, help="the P2 rows' context (P3's is --prompt)")
    ap.add_argument("--peer-steps", type=int, default=8, help="decode steps the peer runs (then extrapolated)")
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--profile", action="store_true", help="print each graph's kernel times (torch profiler)")
    ap.add_argument("--out", default="", help="JSON of the results (optional)")
    ap.add_argument(
        "--lanes-max-share",
        type=float,
        default=None,
        help="worker/adapters/slots.py LANES_MAX_SHARE for this run's pools (which targets get K lanes; e.g. 0.1: "
        "mlp.c_proj's only at the 7B shape with 32 rank-16 slots)",
    )
    ap.add_argument(
        "--growth",
        type=int,
        default=0,
        help="also time the LoadAdapter that grows the pools from 16 lanes a slot to 32 and --max-rank, over serve's "
        "decode graphs of this many rows (its default: 128) and 8 slots",
    )
    ap.add_argument(
        "--joint-max-share",
        type=float,
        default=None,
        help="worker/adapters/slots.py JOINT_MAX_SHARE for this run (where --lora-decode auto takes gemm)",
    )
    add_decode_kernels_arg(ap)
    args = ap.parse_args()
    from worker.adapters import slots

    if args.joint_max_share is not None:
        slots.JOINT_MAX_SHARE = args.joint_max_share
    if args.lanes_max_share is not None:
        slots.LANES_MAX_SHARE = args.lanes_max_share
    dev = torch.device("cuda", 0)
    pctx = ParallelContext(0, 1, dev)
    model = build_model(args.shape, pctx, "auto")
    print(f"decode kernels: {with_decode_kernels(model, args.decode_kernels)}")
    b = args.batch
    mix = tuple(map(int, args.mix.split(":"))) if args.mix else (0, 0)
    ours = bench_lora_decode(
        model,
        [b],
        args.ctx,
        16,
        copy_bandwidth(dev),
        args.slots or b,
        args.rank,
        args.max_rank or max(args.rank, mix[0]),
        b,
        args.prompt,
        args.new,
        tuple(args.modes.split(",")),
        args.profile,
        args.pool_rank or None,
        mix,  # type: ignore[arg-type]
    )
    del model
    torch.cuda.empty_cache()
    res: dict[str, Any] = dict(card=torch.cuda.get_device_name(dev), ours=ours)
    mixed = f", {ours['mix'][1]} of rank {ours['mix'][0]}" if args.mix else ""
    print(f"pools: {ours['pool_rank']} lanes a slot of {ours['max_rank']} (adapters of rank {args.rank}{mixed})")
    for row in ours["decode"]:
        mode = row["backend"] + ("+side stream" if row["overlap"] else "") + f" decode={row['decode_mode']}"
        print(f"P2 b={b}: {mode:32s} {row['lora_ms']:.2f} vs {row['base_ms']:.2f} ms  ratio {row['ratio']:.3f}")
    g = ours["generate"]
    print(f"P3 ours: {b} x {args.prompt} -> {args.new}, {b} adapters: {g['tok_s']:.0f} tok/s ({g['method']}; ")
    print(f"   {g['generate_s']:.3f} s, prefill {g['prefill_ms']:.1f} ms, step {g['step_ms']:.2f} ms)")
    if not args.no_peer:
        peer = res["peer"] = peer_generate(args.shape, b, args.prompt, args.new, args.rank, args.peer_steps)
        res["P3"], res["P3_decode"] = g["tok_s"] / peer["tok_s"], g["decode_tok_s"] / peer["decode_tok_s"]
        print(f"P3 peer (HF + PEFT): {peer['tok_s']:.1f} tok/s ({peer['method']}; prefill {peer['prefill_s']:.2f} s,")
        print(f"   step {peer['step_ms']:.0f} ms)")
        print(f"P3 = {res['P3']:.0f}x end to end, {res['P3_decode']:.0f}x decode only (target >= 100x; spec 150x)")
    if args.growth:
        model = build_model(args.shape, pctx, "auto")
        with_decode_kernels(model, args.decode_kernels)
        res["growth"] = grow = bench_pool_growth(model, 8, 16, args.max_rank or 64, args.growth, 16384)
        for row in grow["grow"]:
            print(
                f"pool growth to {row['lanes']} lanes a slot: {row['ms']:.0f} ms ({grow['graphs']} decode graphs; "
                f"capturing them all at start-up took {grow['capture_all_s']:.1f} s)"
            )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
