"""P9: quantized weights on one GPU. Random weights of a Qwen shape quantized in memory (GPTQ Int4/Int8 words
with sym zeros and group 128, or FP8 e4m3 with per-channel scales), bf16 embeddings, norms and lm_head.

    python scripts/bench_quant.py --shape 7b --out bench_out/quant_7b.json       # bf16, int4, int8, fp8
    python scripts/bench_quant.py --shape 7b --batches 1 --only decode           # P9 at batch 1: "P9 ..." lines last
    python scripts/bench_quant.py --shape 72b --modes int4 --batches 1,8,32      # 72B-shaped Int4 + KV capacity
    python scripts/bench_quant.py --shape 7b --only linears                      # per-linear kernel timings
    python scripts/bench_quant.py --only sweep                                   # GEMV tiles x split-K, M = 1
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
import json
import math
import os
import sys
from typing import Any

import torch

from bench_common import (
    SHAPES,
    DecodeInputs,
    add_decode_kernels_arg,
    copy_bandwidth,
    cuda_time,
    matmul_rate,
    with_decode_kernels,
)
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
            m.build_gemv()  # the decode GEMV's view of the random buffers (load() builds it from a checkpoint)
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
    """Per 7B linear: ms of bf16 F.linear, the GPTQ matmul at Int4/Int8 (above 16 rows also the split-K and tiled
    kernels it does not serve there) and FP8 _scaled_mm, per M."""
    import triton

    from worker.kernels.fp8_matmul import w8a16_matmul
    from worker.kernels.gptq import GemmTiles, gptq_gemm, gptq_gemv, gptq_matmul
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
                if m > 16:  # int{bits}_ms is the served dequantize + cuBLAS; the other candidates beside it
                    split = GemmTiles(min(64, triton.next_power_of_2(m)), 64, 64, 4, 2)
                    for label, run in (
                        ("splitk", lambda: gptq_gemv(x, *args, group_size=128, tiles=split)),  # noqa: B023
                        ("tiled", lambda: gptq_gemm(x, *args, group_size=128)),  # noqa: B023
                    ):
                        row[f"int{bits}_{label}_ms"] = cuda_time(run, iters=50) * 1e3
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


def sweep_gemv(bits: int = 4) -> list[dict[str, Any]]:
    """Decode GEMV tiles at M = 1 per 7B linear: (block_n, block_k, warps) x split_k, GB/s of the quantized
    words read; picks the defaults of worker/kernels/gptq.py (DECODE, split_k_for)."""
    from worker.kernels.gptq import GemmTiles, gptq_gemv

    rows = []
    for k, n in ((4096, 12288), (4096, 4096), (4096, 22016), (11008, 4096)):
        p = 32 // bits
        qw = torch.randint(-(2**31), 2**31 - 1, (k // p, n), device=CUDA, dtype=torch.int32)
        qz = torch.full((k // 128, n // p), 0x77777777 if bits == 4 else 0x7F7F7F7F, device=CUDA, dtype=torch.int32)
        s = torch.rand(k // 128, n, device=CUDA, dtype=torch.bfloat16) * 1e-3
        gi = (torch.arange(k, device=CUDA) // 128).to(torch.int32)
        x = torch.randn(1, k, device=CUDA, dtype=torch.bfloat16)
        best = None
        for bn, bk, warps in ((32, 128, 4), (64, 64, 4), (64, 128, 4), (128, 64, 4), (128, 128, 8), (256, 64, 8)):
            for split in (1, 2, 4, 8, 16, 32):
                if k // split < bk:
                    continue
                tiles = GemmTiles(1, bn, bk, warps, 2)
                t = cuda_time(lambda: gptq_gemv(x, qw, qz, s, gi, bits, 1, None, split, 128, 0, tiles), iters=50)  # noqa: B023
                row = dict(K=k, N=n, block_n=bn, block_k=bk, warps=warps, split_k=split, us=t * 1e6,
                           gbps=qw.numel() * 4 / t / 1e9)  # fmt: skip
                rows.append(row)
                if best is None or t < best["us"] / 1e6:
                    best = row
        print("best", json.dumps(best), flush=True)
    return rows


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
    add_decode_kernels_arg(ap)
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
        res["sweep"] = sweep_gemv(4) + sweep_gemv(8)
    else:
        for mode in args.modes.split(","):
            model = build(args.shape, MODES[mode])
            kernels = with_decode_kernels(model, args.decode_kernels)
            decode = bench_decode(model, batches, args.ctx, bw)
            entry: dict[str, Any] = dict(decode_kernels=kernels, step_gb=step_bytes(model) / 1e9, decode=decode)
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
    print(json.dumps(res, indent=1))
    for mode, entry in res["modes"].items():  # P9's numbers last, one line each
        for r in entry["decode"]:
            if r.get("graph_ms"):
                vs = f"x{r['speedup_vs_bf16']:.2f} vs bf16" if "speedup_vs_bf16" in r else "bf16 not run"
                print(f"P9 {args.shape} {mode:5s} batch {r['batch']:3d}: step {r['graph_ms']:7.3f} ms, floor"
                      f" {r['floor_ms']:7.3f} ms, step/floor {r['ratio']:.2f}, {vs}")  # fmt: skip


if __name__ == "__main__":
    main()
