"""P9: quantized weights on one GPU. Random weights of a Qwen shape quantized in memory (GPTQ Int4/Int8 words
with sym zeros and group 128, or FP8 e4m3 with per-channel scales), bf16 embeddings, norms and lm_head.

    python scripts/bench_quant.py --shape 7b --out bench_out/quant_7b.json       # bf16, int4, int8, fp8
    python scripts/bench_quant.py --shape 72b --modes int4 --batches 1,8,32      # 72B-shaped Int4 + KV capacity
    python scripts/bench_quant.py --shape 7b --only linears                      # per-linear kernel timings
    python scripts/bench_quant.py --only sweep --batches 1,8 --budget-s 120      # decode GEMV knobs, M = 1, 8
    python scripts/bench_quant.py --only quality --demo-dir .demo                # demo model Int4/Int8/FP8 vs bf16

decode: one decode step (512-token contexts, replayed from a CUDA graph) at each batch, against its floor:
the bytes one step must read (quantized words + scales + zeros, lm_head and norms; wte is a gather; every
sequence's KV) at the copy bandwidth measured in the same run. Int4/bf16 speed-up at batch 1 is the P9 ratio.
prefill: MFU of 8 x 1024 tokens against the measured bf16 matmul rate (scripts/bench.py's FLOP count).
linears: each 7B-shape linear at M = 1/8/32/128: bf16 F.linear, the GPTQ Triton kernel (Int4, Int8), FP8
through torch._scaled_mm and (M <= 16) the Triton W8A16 kernel: the data behind FP8_TRITON_MAX_M.
kv: P8 (Warmup's KV capacity) with the quantized weights resident.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
from collections.abc import Callable
from typing import Any

import torch

from bench_common import SHAPES, DecodeInputs, copy_bandwidth, cuda_time, matmul_rate
from worker.config import QwenConfig
from worker.distributed import ParallelContext
from worker.quant.config import FP8Config, GPTQConfig, QuantConfig

SHAPES_Q = {
    **SHAPES,
    "72b": dict(
        hidden_size=8192,
        num_attention_heads=64,
        num_hidden_layers=80,
        intermediate_size=49152,
        vocab_size=152064,
        seq_length=32768,
    ),
}
MODES: dict[str, QuantConfig | None] = {
    "bf16": None,
    "int4": GPTQConfig(4, 128, True, False, source="bench"),
    "int8": GPTQConfig(8, 128, True, False, source="bench"),
    "fp8": FP8Config(),
}
CUDA = torch.device("cuda")


def build(shape: str, quant: QuantConfig | None, backend: str = "triton", device: torch.device = CUDA) -> Any:
    """The model with random weights: bf16 N(0, 0.02²) floats, random GPTQ words with sym zeros (0x77777777 /
    0x7F7F7F7F) and scales ~ 0.02 / 8 per step, or e4m3 weights with per-channel scales."""
    from worker.layers.attention import make_backend
    from worker.layers.fp8_linear import _FP8
    from worker.layers.quantized import _GPTQ
    from worker.models.qwen import FlashQwenForCausalLM

    cfg = QwenConfig.from_dict({"model_type": "qwen", **SHAPES_Q[shape]})
    pctx = ParallelContext(device=device)
    model = FlashQwenForCausalLM(cfg, pctx, torch.bfloat16, make_backend(backend, device), quant=quant)
    g = torch.Generator(device=device).manual_seed(0)
    for name, p in model.named_parameters():
        if p.dtype == torch.float8_e4m3fn:
            p.data.copy_((torch.randn(p.shape, device=device, generator=g) * 50).clamp(-448, 448))
        elif "ln_" in name:
            p.data.fill_(1.0)
        else:
            p.data.normal_(0.0, 0.02, generator=g)
    for m in model.modules():
        if isinstance(m, _GPTQ):
            bits = m.quant.bits
            m.qweight.random_(-(2**31), 2**31 - 1, generator=g)
            m.qzeros.fill_(0x77777777 if bits == 4 else 0x7F7F7F7F)
            m.scales.uniform_(0.5 * 0.02 / 2 ** (bits - 1), 0.02 / 2 ** (bits - 1), generator=g)
            k = m.g_idx.numel()
            m.g_idx.copy_((m.k_offset + torch.arange(k, device=device)) // 128)
            m.group_hint = 128
        if isinstance(m, _FP8):
            m.w_scale.fill_(0.02 / 100)
    return model


def step_bytes(model: Any) -> int:
    """Bytes one decode step reads besides the KV: every parameter and buffer except wte (a gather)."""
    wte = model.transformer.wte.weight
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors if t is not wte)


def bench_decode(model: Any, batches: list[int], ctx: int, bw: float) -> list[dict[str, Any]]:
    from worker.engine.cuda_graphs import capture
    from worker.engine.kv_cache import KVCache

    c, block = model.config, 16
    per_token = KVCache.bytes_per_token(c.num_hidden_layers, c.num_attention_heads, c.head_dim, torch.bfloat16)
    free = torch.cuda.mem_get_info(CUDA)[0]
    fits = [b for b in batches if b * (ctx + 1 + block) * per_token < 0.8 * free - (4 << 30)]
    rows: list[dict[str, Any]] = [dict(batch=b, skipped=True) for b in batches if b not in fits]
    if not fits:
        return rows
    kv = KVCache(c.num_hidden_layers, 2 + max(fits) * math.ceil((ctx + 1) / block), block, c.num_attention_heads,
                 c.head_dim, torch.bfloat16, CUDA)  # fmt: skip
    wbytes = step_bytes(model)
    for b in fits:
        graph, _ = capture(DecodeInputs.build(model, b, ctx, block).step(model, kv.layers))
        t = cuda_time(graph.replay, iters=30)
        del graph
        floor = (wbytes + b * (ctx + 1) * per_token) / bw
        rows.append(dict(batch=b, ctx=ctx, graph_ms=t * 1e3, floor_ms=floor * 1e3, ratio=t / floor))
    del kv
    torch.cuda.empty_cache()
    return rows


def bench_linears(batches: list[int]) -> list[dict[str, Any]]:
    """Per 7B linear: ms of bf16 F.linear, the GPTQ kernel at Int4/Int8 and FP8 _scaled_mm, per M."""
    from worker.kernels.fp8_matmul import w8a16_matmul
    from worker.kernels.gptq import gptq_matmul
    from worker.quant.fp8 import fp8_matmul_scaled_mm, quantize_rows

    rows = []
    for name, k, n in (("c_attn", 4096, 12288), ("attn.c_proj", 4096, 4096), ("gate_up", 4096, 22016),
                       ("mlp.c_proj", 11008, 4096)):  # fmt: skip
        w = torch.randn(n, k, device=CUDA, dtype=torch.bfloat16) * 0.02
        wq, ws = quantize_rows(w)
        gi = (torch.arange(k, device=CUDA) // 128).to(torch.int32)
        packed = {}
        for bits in (4, 8):
            p = 32 // bits
            qw = torch.randint(-(2**31), 2**31 - 1, (k // p, n), device=CUDA, dtype=torch.int32)
            qz = torch.full((k // 128, n // p), 0x77777777 if bits == 4 else 0x7F7F7F7F, device=CUDA, dtype=torch.int32)
            packed[bits] = (qw, qz, torch.rand(k // 128, n, device=CUDA, dtype=torch.bfloat16) * 1e-3, gi, bits)
        for m in batches:
            x = torch.randn(m, k, device=CUDA, dtype=torch.bfloat16)
            row: dict[str, Any] = dict(linear=name, K=k, N=n, M=m)
            row["bf16_ms"] = cuda_time(lambda: torch.nn.functional.linear(x, w), iters=50) * 1e3  # noqa: B023
            for bits, args in packed.items():
                row[f"int{bits}_ms"] = cuda_time(lambda: gptq_matmul(x, *args, group_size=128), iters=50) * 1e3  # noqa: B023
            row["fp8_scaled_mm_ms"] = cuda_time(lambda: fp8_matmul_scaled_mm(x, wq, ws[:, 0]), iters=50) * 1e3  # noqa: B023
            if m <= 16:
                row["fp8_w8a16_ms"] = cuda_time(lambda: w8a16_matmul(x, wq, ws[:, 0]), iters=50) * 1e3  # noqa: B023
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def quality(out_dir: str, dtype: torch.dtype = torch.bfloat16) -> list[dict[str, Any]]:
    """The demo model (scripts/make_demo_model.py, built in out_dir) in Int4 / Int8 (GPTQ copies made by
    scripts/quantize.py as `make demo` makes them) and FP8 vs bf16, on its training texts (CPU is enough):
    sentences reproduced greedily, teacher-forced next-token agreement with bf16, and loss."""
    from demo import quantized_copy
    from make_demo_model import BASE_TEXTS, ensure, full_forward, greedy
    from worker.models.qwen import FlashQwenForCausalLM
    from worker.tokenizer import QwenTokenizer

    ensure(out_dir)
    src = os.path.join(out_dir, "model")
    tok = QwenTokenizer.from_dir(src)
    runs = {
        "bf16": (src, "none"),
        "int4": (quantized_copy(src, os.path.join(out_dir, "model-int4"), 4), "auto"),
        "int8": (quantized_copy(src, os.path.join(out_dir, "model-int8"), 8), "auto"),
        "fp8": (src, "fp8"),
    }
    base_argmax: list[torch.Tensor] = []
    rows = []
    for mode, (path, quantize) in runs.items():
        model = FlashQwenForCausalLM.from_pretrained(path, dtype=dtype, progress=False, quantize=quantize)
        same = total = exact = 0
        loss = 0.0
        for k, (prompt, cont) in enumerate(BASE_TEXTS):
            p, c = tok.encode(prompt), tok.encode(cont) + [tok.endoftext_id]
            with torch.no_grad():
                logits = full_forward(model, [p + c])[len(p) - 1 : -1].float()  # predicting c
            loss += torch.nn.functional.cross_entropy(logits, torch.tensor(c), reduction="sum").item()
            if mode == "bf16":
                base_argmax.append(logits.argmax(-1))
            same += int((logits.argmax(-1) == base_argmax[k]).sum())
            total += len(c)
            exact += greedy(model, p, len(c), tok.endoftext_id) == c
        rows.append(dict(mode=mode, sentences=f"{exact}/{len(BASE_TEXTS)}", agreement=same / total, loss=loss / total))
        print(json.dumps(rows[-1]), flush=True)
    return rows


ROTATE_BYTES = 200e6  # the sweep cycles weight copies of at least this many bytes (H200's L2: 50 MB)
LINEARS_7B = (("c_attn", 4096, 12288), ("attn.c_proj", 4096, 4096), ("gate_up", 4096, 22016),
              ("mlp.c_proj", 11008, 4096))  # fmt: skip


def graph_time(fns: list[Any], calls: int = 24, replays: int = 5) -> float:
    """Seconds per call of `fns` (cycled: one per weight copy, so the 50 MB L2 does not hold the weights as it
    would not across a model's layers), replayed from a CUDA graph of `calls` calls: GPU time, no launch cost
    (decode runs from CUDA graphs)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fns[i % len(fns)]()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    del graph
    return start.elapsed_time(end) / 1e3 / (calls * replays)


def _tile_candidates(bits: int, m: int) -> list[Any]:
    """The tile variants tried first (each one Triton compile): M = 1 FMA GEMV and tl.dot on 16 rows; M > 1
    tl.dot (and one FMA, one program per row)."""
    from worker.kernels.gptq import GemmTiles

    fma = [(128, 128, 4, 4), (64, 128, 4, 4), (256, 128, 8, 4), (128, 64, 4, 6), (256, 64, 4, 4), (128, 128, 8, 3),
           (64, 64, 2, 6), (256, 128, 4, 2)]  # fmt: skip
    dot = [(64, 128, 4, 3), (128, 128, 4, 3), (128, 64, 4, 4), (256, 128, 8, 3), (64, 64, 4, 4)]
    out = []
    if m == 1:
        out += [GemmTiles(1, bn, bk, w, st, dot=False) for bn, bk, w, st in fma]
        out += [GemmTiles(16, bn, bk, w, st) for bn, bk, w, st in dot[:3]]
    else:
        out += [GemmTiles(16, bn, bk, w, st) for bn, bk, w, st in dot]
        out += [GemmTiles(1, 128, 128, 4, 4, dot=False)]
    return out


def _sweep_shape(name: str, k: int, n: int, m: int, bits: int, over: Callable[[], bool]) -> dict[str, Any]:
    """One shape of sweep_gemv: the rows of every config tried and the best one."""
    import dataclasses

    from worker.kernels.gptq import GemmTiles, decode_tiles, gptq_gemv, gptq_matmul_reference

    g = torch.Generator(device=CUDA).manual_seed(k + n + m + bits)
    p = 32 // bits
    qbytes = k // p * n * 4 + k // 128 * n * 2 + k // 128 * n // p * 4
    ws = []
    for _ in range(max(2, math.ceil(ROTATE_BYTES / qbytes))):
        qw = torch.randint(-(2**31), 2**31 - 1, (k // p, n), device=CUDA, dtype=torch.int32, generator=g)
        qz = torch.randint(-(2**31), 2**31 - 1, (k // 128, n // p), device=CUDA, dtype=torch.int32, generator=g)
        s = (torch.rand(k // 128, n, device=CUDA, generator=g) * 2e-3).to(torch.bfloat16)
        ws.append((qw, qz, s))
    gi = (torch.arange(k, device=CUDA) // 128).to(torch.int32)
    x = torch.randn(m, k, device=CUDA, dtype=torch.bfloat16)
    ref = gptq_matmul_reference(x, *ws[0], gi, bits).float()
    wf = [
        torch.randn(n, k, device=CUDA, dtype=torch.bfloat16)
        for _ in range(max(2, math.ceil(ROTATE_BYTES / (n * k * 2))))
    ]
    bf16_us = graph_time([functools.partial(torch.nn.functional.linear, x, w) for w in wf]) * 1e6
    del wf
    rows: list[dict[str, Any]] = []
    best: dict[str, Any] = {}

    def trial(tiles: GemmTiles, split: int | None) -> float | None:
        def call(w: tuple[torch.Tensor, ...]) -> torch.Tensor:
            return gptq_gemv(x, w[0], w[1], w[2], gi, bits, 1, None, split, 128, 0, tiles)

        row: dict[str, Any] = dict(K=k, N=n, M=m, bits=bits, **dataclasses.asdict(tiles), split=split)
        try:
            err = ((call(ws[0]).float() - ref).abs() / (1 + ref.abs())).max().item()
            if not err <= 2e-2:
                raise AssertionError(f"max relative error {err}")
            t = graph_time([functools.partial(call, w) for w in ws])
        except Exception as e:  # a config that does not compile, fit or match: recorded, skipped
            row["error"] = f"{type(e).__name__}: {str(e)[:3000]}"
            rows.append(row)
            print("config failed", json.dumps(dict(row, error=f"{type(e).__name__}: ...{str(e)[-400:]}")), flush=True)
            return None
        row.update(us=t * 1e6, gbps=qbytes / t / 1e9)
        rows.append(row)
        if not best or t * 1e6 < best["us"]:
            best.update(tiles=tiles, split=split, us=t * 1e6, gbps=qbytes / t / 1e9)
        return t

    default_s = trial(decode_tiles(bits, m, k, n), None)
    for tiles in _tile_candidates(bits, m):
        if over():
            break
        trial(tiles, None)
    if best:  # stage 2: split-K and the reduction (planes + sum kernel, serial planes, atomics), best tiles
        tb = best["tiles"]
        for mode in ("planes", "serial", "atomic"):
            for split in (1, 2, 4, 8, 16, 32):
                if over() or k // split < tb.block_k or (mode != "planes" and split == 1):
                    continue
                trial(dataclasses.replace(tb, atomic=mode == "atomic", serial=mode == "serial"), split)
    ws.clear()
    torch.cuda.empty_cache()
    summary = dict(linear=name, K=k, N=n, M=m, bits=bits, bf16_us=bf16_us, default_us=default_s and default_s * 1e6)
    return dict(rows=rows, best=dict(summary, **best) if best else None)


def sweep_gemv(
    budget_s: float = 120.0, bits_list: tuple[int, ...] = (4, 8), ms: tuple[int, ...] = (1, 8)
) -> dict[str, Any]:
    """Decode GEMV knobs per 7B linear at M = 1 and 8, Int4 and Int8: stage 1 times every tile variant
    (_tile_candidates) with the automatic split-K; stage 2 sweeps split_k x (planes, atomics) for each shape's
    best tiles. Every config is checked once against the reference (bf16, 2e-2 · (1 + |ref|)) before it is
    timed; timings are CUDA-graph replays cycling weight copies of >= 200 MB (no L2 reuse). Prints the best
    config per shape with GB/s of the bytes read (words, scales, zeros) and bf16 F.linear's time, and the
    DECODE_TABLE lines to paste into worker/kernels/gptq.py. Stops exploring past budget_s (the best so far
    is reported)."""
    import dataclasses
    import time

    from worker.kernels.gptq import DECODE_TABLE

    t0 = time.perf_counter()
    saved = dict(DECODE_TABLE)
    DECODE_TABLE.clear()  # "default" below is the built-in DECODE_M1 / DECODE
    rows: list[dict[str, Any]] = []
    lines, bests = [], []
    for bits in bits_list:
        for m in ms:
            for name, k, n in LINEARS_7B:
                if time.perf_counter() - t0 > budget_s:
                    break
                res = _sweep_shape(name, k, n, m, bits, lambda: time.perf_counter() - t0 > budget_s)
                rows += res["rows"]
                b = res["best"]
                if b is None:
                    continue
                t = dataclasses.replace(b["tiles"], split_k=b["split"] or 0)
                print(
                    f"best int{bits} M={m} {name} K={k} N={n}: {b['us']:.1f} us {b['gbps']:.0f} GB/s; bf16 "
                    f"{b['bf16_us']:.1f} us ({b['bf16_us'] / b['us']:.2f}x); default {b['default_us']} us; {t} "
                    f"[{time.perf_counter() - t0:.0f} s]",
                    flush=True,
                )
                lines.append(
                    f"    {(bits, 1 if m == 1 else 16, k, n)}: GemmTiles({t.block_m}, {t.block_n}, {t.block_k}, "
                    f"{t.num_warps}, {t.num_stages}, split_k={t.split_k}, dot={t.dot}, atomic={t.atomic}, "
                    f"serial={t.serial}),  # "
                    f"{name} M={m} {b['us']:.1f} us {b['gbps']:.0f} GB/s, bf16 {b['bf16_us']:.1f} us"
                )
                bests.append(dict(b, tiles=dataclasses.asdict(t)))
    DECODE_TABLE.update(saved)
    print("DECODE_TABLE entries for worker/kernels/gptq.py (paste inside the dict):")
    print("\n".join(lines), flush=True)
    return dict(rows=rows, best=bests, table_lines=lines, elapsed_s=time.perf_counter() - t0)


def main() -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="7b", choices=sorted(SHAPES_Q))
    ap.add_argument("--modes", default="bf16,int4,int8,fp8")
    ap.add_argument("--batches", default="1,8,32,128")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--only", choices=["decode", "linears", "sweep", "quality"], default=None)
    ap.add_argument("--demo-dir", default=".demo", help="--only quality: the demo model's directory")
    ap.add_argument("--no-prefill", action="store_true")
    ap.add_argument("--kv", action="store_true", help="also P8: Warmup's KV capacity with these weights")
    ap.add_argument("--out", default=None)
    ap.add_argument("--budget-s", type=float, default=120.0, help="--only sweep: stop exploring after this long")
    ap.add_argument("--sweep-bits", default="4,8", help="--only sweep: weight bits to sweep")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    if args.only == "quality":  # CPU is enough
        print(json.dumps(quality(args.demo_dir), indent=1))
        return
    bw, rate = copy_bandwidth(CUDA), matmul_rate(CUDA)
    res: dict[str, Any] = dict(shape=args.shape, copy_gbps=bw / 1e9, matmul_tflops=rate / 1e12, modes={})
    print(f"copy {bw / 1e9:.0f} GB/s, bf16 matmul {rate / 1e12:.0f} TFLOP/s", flush=True)
    if args.only == "linears":
        res["linears"] = bench_linears(batches)
    elif args.only == "sweep":
        bits = tuple(int(b) for b in args.sweep_bits.split(","))
        res["sweep"] = sweep_gemv(args.budget_s, bits, tuple(b for b in batches if b <= 16) or (1, 8))
    else:
        for mode in args.modes.split(","):
            model = build(args.shape, MODES[mode])
            entry: dict[str, Any] = dict(
                step_gb=step_bytes(model) / 1e9, decode=bench_decode(model, batches, args.ctx, bw)
            )
            if args.only is None and not args.no_prefill:
                from bench import bench_prefill

                entry["prefill"] = bench_prefill(model, 8, 1024, 16, rate)
            if args.kv:
                from bench_serving import bench_kv_capacity

                entry["kv"] = bench_kv_capacity(model, 16, 0.9)
            res["modes"][mode] = entry
            print(mode, json.dumps(entry), flush=True)
            del model
            torch.cuda.empty_cache()
        modes = res["modes"]
        if "bf16" in modes:
            base = {r["batch"]: r.get("graph_ms") for r in modes["bf16"]["decode"]}
            for entry in modes.values():
                for r in entry["decode"]:
                    if r.get("graph_ms") and base.get(r["batch"]):
                        r["speedup_vs_bf16"] = base[r["batch"]] / r["graph_ms"]
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)
    if args.only == "sweep":  # every row is in --out; the tail of the output stays the summary and table
        print(json.dumps(res["sweep"]["best"], indent=None))
        print("\n".join(res["sweep"]["table_lines"]), f"\nsweep took {res['sweep']['elapsed_s']:.0f} s")
    else:
        print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
