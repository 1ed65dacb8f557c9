"""GPU benchmark against the physical floor (spec/performance.md): P1, P1L, P4, P4L, P7, P8 (and P5 with --tp, P2/P6
and our side of P3 with --lora).

    python scripts/bench.py --shape 7b --out bench_out/bench.json        # one GPU
    python scripts/bench.py --shape 7b --tp 2 --only decode               # TP decode (spawns 2 ranks)
    python scripts/bench.py --shape 7b --only lora                        # multi-LoRA rows only

Builds a random bf16 checkpoint of the chosen shape in GPU memory (same bytes and FLOPs as the real
one), measures copy bandwidth and bf16 matmul rate in the same run, then decode step time at batch
1/8/32/64/128 with 512-token contexts (eager and CUDA graphs) and at 2k/8k/32k contexts for batch 1 and 16
(P1L, `--ctx`; rows whose KV does not fit are skipped), prefill MFU on 8 x 1024 tokens and one 32,768-token
prompt (P4L, NTK active), and
KV capacity after Warmup. The model runs the decode kernels `serve` runs (--decode-kernels, default the served set;
'none': the kernels before issue 17). With --lora: decode with N distinct rank-16 adapters (every request its own,
all five modules) against base-only decode, both replayed from the served CUDA graphs
(GraphedDecode(adapter_pools=True)) — P2; LoadAdapter latency from local safetensors, cold and from the
host cache — P6; and the mixed-adapter generate workload of scripts/bench_peer.py (prefill of
32 x 512 tokens + 15 decode steps at batch 32, 32 adapters) — our side of P3. Prints a table last and
writes JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from typing import Any

import torch

from bench_adapter_load import bench_lora_load
from bench_common import (
    ROOT,
    SHAPES,
    DecodeInputs,
    add_decode_kernels_arg,
    build_model,
    copy_bandwidth,
    cuda_time,
    matmul_rate,
    weight_bytes,
    with_decode_kernels,
)
from bench_lora import bench_lora_decode
from bench_serving import bench_kv_capacity, bench_rpc_overhead
from bench_table import print_table
from worker.distributed import ParallelContext


def bench_decode(
    model: Any, batches: list[int], ctx_len: int, block_size: int, bw: float, graphs: bool
) -> list[dict[str, Any]]:
    """P1 / P1L (and P5 per rank): decode step time per batch size, eager and replayed from a CUDA graph,
    against the time to read the weights and every sequence's KV once at copy bandwidth `bw`. Batches
    whose KV does not fit in 90 % of the free memory are skipped (reported with skipped=True)."""
    from worker.engine.kv_cache import KVCache

    c = model.config
    heads = c.num_attention_heads // model.pctx.world_size
    kv_per_token = KVCache.bytes_per_token(c.num_hidden_layers, heads, c.head_dim, torch.bfloat16)
    free = torch.cuda.mem_get_info(model.pctx.device)[0] if torch.cuda.is_available() else 1 << 62
    fits = [b for b in batches if b * (ctx_len + 1 + block_size) * kv_per_token < 0.9 * free - (2 << 30)]
    rows: list[dict[str, Any]] = [dict(batch=b, ctx=ctx_len, skipped=True) for b in batches if b not in fits]
    if not fits:
        return rows
    num_blocks = 2 + max(fits) * math.ceil((ctx_len + 1) / block_size)
    kv = KVCache(c.num_hidden_layers, num_blocks, block_size, heads, c.head_dim, torch.bfloat16, model.pctx.device)
    wbytes = weight_bytes(model)
    for b in fits:
        step = DecodeInputs.build(model, b, ctx_len, block_size).step(model, kv.layers)
        eager = cuda_time(step, iters=10)
        graph_t = None
        if graphs:
            from worker.engine.cuda_graphs import capture

            g, _ = capture(step)
            graph_t = cuda_time(g.replay, iters=30)
            del g
        floor = (wbytes + b * (ctx_len + 1) * kv_per_token) / bw
        best = graph_t or eager
        rows.append(
            dict(
                batch=b,
                ctx=ctx_len,
                eager_ms=eager * 1e3,
                graph_ms=None if graph_t is None else graph_t * 1e3,
                floor_ms=floor * 1e3,
                ratio=best / floor,
                tok_s=b / best,
            )
        )
    del kv
    torch.cuda.empty_cache()
    return rows


def bench_prefill(model: Any, n_seqs: int, seq_len: int, block_size: int, matmul: float) -> dict[str, Any]:
    """P4 / P4L: prefill of n_seqs x seq_len fresh tokens; model FLOP/s (linears, LM head of the last
    tokens, causal attention's QK and PV) against the measured bf16 matmul rate."""
    from worker.engine.kv_cache import KVCache
    from worker.layers.context import Seqlen

    c = model.config
    dev = model.pctx.device
    heads = c.num_attention_heads // model.pctx.world_size
    per_seq = math.ceil(seq_len / block_size)
    kv = KVCache(c.num_hidden_layers, 1 + n_seqs * per_seq, block_size, heads, c.head_dim, torch.bfloat16, dev)
    tables = torch.arange(1, 1 + n_seqs * per_seq, dtype=torch.int32, device=dev).view(n_seqs, per_seq)
    slots = (tables.long()[:, :, None] * block_size + torch.arange(block_size, device=dev)).view(n_seqs, -1)
    slots = slots[:, :seq_len].reshape(-1)
    from worker.ops import ntk_alpha

    alpha = ntk_alpha(seq_len, c.seq_length, True)  # > 1 past seq_length: dynamic NTK, as served
    seqlen = Seqlen.for_prefill([seq_len] * n_seqs, None, [alpha] * n_seqs, device=dev)
    ids = torch.randint(0, 1000, (n_seqs * seq_len,), device=dev)
    pos = torch.arange(seq_len, device=dev).repeat(n_seqs)
    last = torch.arange(1, n_seqs + 1, device=dev) * seq_len - 1

    def step() -> torch.Tensor:
        with torch.inference_mode():
            return model(ids, pos, seqlen.cu_seqlen_q, kv.layers, tables, slots, seqlen, seq_len, lm_head_indices=last)[
                0
            ]

    t = cuda_time(step, iters=5, warmup=2)
    H, L, W = c.hidden_size, c.num_hidden_layers, c.mlp_width
    layer_params = 3 * H * H + H * H + 3 * H * W
    tokens = n_seqs * seq_len
    flops = 2 * layer_params * L * tokens + 2 * H * c.vocab_size * n_seqs  # linears + LM head (last tokens)
    flops += L * 4 * H * n_seqs * seq_len * seq_len / 2  # causal attention: QK^T and PV over half the square
    flops /= model.pctx.world_size
    return dict(tokens=tokens, ms=t * 1e3, tflops=flops / t / 1e12, mfu=flops / t / matmul)


def served_model(args: argparse.Namespace, pctx: ParallelContext) -> tuple[Any, str]:
    """The random-weight model of args.shape with the decode kernels `serve` would run (--decode-kernels), and
    their names."""
    model = build_model(args.shape, pctx, args.backend)
    return model, with_decode_kernels(model, args.decode_kernels)


def tp_main(rank: int, world: int, port: int, args: argparse.Namespace, queue: Any) -> None:
    """One rank of the TP decode benchmark (P5): NCCL, CUDA graphs, same shape."""
    from worker.distributed import init_from_env, shutdown

    env = dict(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    pctx = init_from_env(env, "cuda")
    bw = copy_bandwidth(pctx.device)
    model, _ = served_model(args, pctx)
    rows = bench_decode(
        model, [int(b) for b in args.tp_batches.split(",")], args.ctx, args.block_size, bw, not args.no_graphs
    )
    if rank == 0:
        queue.put(rows)
    shutdown(pctx)


def run_tp(args: argparse.Namespace, world: int) -> list[dict[str, Any]]:
    import torch.multiprocessing as mp

    from worker.launcher import free_port

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=tp_main, args=(r, world, port, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    rows = queue.get(timeout=900)
    for p in procs:
        p.join(timeout=120)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="7b", choices=list(SHAPES))
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--batches", default="1,8,32,64,128")
    ap.add_argument(
        "--ctx",
        default="512,2048,8192,32768",
        help="decode contexts: the first for P1 (--batches) and the LoRA / RPC / TP rows; the rest are P1L rows",
    )
    ap.add_argument("--prefill-long", type=int, default=32768, help="P4L: one prompt of this many tokens (0: skip)")
    ap.add_argument("--long-batches", default="1,16", help="batch sizes of the long-context (P1L) decode rows")
    ap.add_argument("--block-size", type=int, default=16)
    add_decode_kernels_arg(ap)
    ap.add_argument("--no-graphs", action="store_true")
    ap.add_argument("--only", default="all", help="comma list of: decode, prefill, kv, lora, load (P6 alone)")
    ap.add_argument("--memory-fraction", type=float, default=0.95)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench_out", "bench.json"))
    ap.add_argument("--tp", default="", help="comma list of TP sizes for the decode TP table, e.g. 2 or 2,4")
    ap.add_argument("--tp-batches", default="1,8,32")
    ap.add_argument("--rpc-dir", default="", help="directory for P7's on-disk checkpoint (empty: skip P7)")
    ap.add_argument("--lora", action="store_true", help="also the multi-LoRA rows (P2, P6, our side of P3)")
    ap.add_argument("--lora-batches", default="8,32,128")
    ap.add_argument("--lora-slots", type=int, default=128, help="adapter pool slots (>= the largest batch)")
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--lora-max-rank", type=int, default=16, help="the pool's r_max for P2 (64 = the server's default)")
    ap.add_argument("--lora-load-max-rank", type=int, default=64, help="the pool's r_max for P6")
    ap.add_argument("--lora-load-repeats", type=int, default=5)
    ap.add_argument("--lora-file-dtypes", default="bf16,fp32", help="adapter file dtypes for P6")
    ap.add_argument("--lora-dir", default="", help="directory for P6's adapter files (default: a temp dir)")
    ap.add_argument("--peer-batch", type=int, default=32)
    ap.add_argument("--peer-prompt", type=int, default=512)
    ap.add_argument("--peer-new", type=int, default=16)
    args = ap.parse_args()
    ctxs = [int(x) for x in str(args.ctx).split(",")]
    args.ctx = ctxs[0]  # the base context of every other row
    if not torch.cuda.is_available():
        sys.exit("bench.py needs a CUDA GPU")
    dev = torch.device("cuda", 0)
    torch.cuda.set_device(dev)
    pctx = ParallelContext(0, 1, dev)
    only = set(args.only.split(",")) if args.only != "all" else {"decode", "prefill", "kv"}
    if args.lora:
        only.add("lora")
    res: dict[str, Any] = dict(
        card=torch.cuda.get_device_name(dev),
        date=time.strftime("%Y-%m-%d"),
        shape=args.shape,
        torch=torch.__version__,
        command=" ".join(sys.argv),
    )
    res["copy_TBps"] = copy_bandwidth(dev) / 1e12
    res["matmul_TFLOPs"] = matmul_rate(dev) / 1e12
    model, res["decode_kernels"] = served_model(args, pctx)
    res["backend"] = model.backend.name
    res["weight_GB"] = weight_bytes(model) / 1e9
    if "decode" in only:
        res["decode"] = bench_decode(
            model,
            [int(b) for b in args.batches.split(",")],
            args.ctx,
            args.block_size,
            res["copy_TBps"] * 1e12,
            not args.no_graphs,
        )
        for ctx in ctxs[1:]:  # P1L: long contexts (decode reads every sequence's KV)
            res["decode"] += bench_decode(
                model,
                [int(b) for b in args.long_batches.split(",")],
                ctx,
                args.block_size,
                res["copy_TBps"] * 1e12,
                not args.no_graphs,
            )
    if "prefill" in only:
        res["prefill"] = bench_prefill(model, 8, 1024, args.block_size, res["matmul_TFLOPs"] * 1e12)
        if args.prefill_long:
            res["prefill_long"] = bench_prefill(
                model, 1, args.prefill_long, args.block_size, res["matmul_TFLOPs"] * 1e12
            )
    if "kv" in only:
        res["kv"] = bench_kv_capacity(model, args.block_size, args.memory_fraction)
        res["kv_fp8"] = bench_kv_capacity(model, args.block_size, args.memory_fraction, torch.float8_e4m3fn)
    if "lora" in only:
        res["lora"] = bench_lora_decode(
            model,
            [int(b) for b in args.lora_batches.split(",")],
            args.ctx,
            args.block_size,
            res["copy_TBps"] * 1e12,
            args.lora_slots,
            args.lora_rank,
            args.lora_max_rank,
            args.peer_batch,
            args.peer_prompt,
            args.peer_new,
        )
    if "lora" in only or "load" in only:
        with tempfile.TemporaryDirectory(dir=args.lora_dir or None) as root:
            res.setdefault("lora", {})["load"] = bench_lora_load(
                model.config,
                pctx,
                root,
                args.lora_rank,
                args.lora_load_max_rank,
                args.lora_load_repeats,
                args.lora_file_dtypes.split(","),
            )
    if args.rpc_dir and "decode" in res:
        fwd = next(r for r in res["decode"] if r["batch"] == 64 and r["ctx"] == args.ctx and not r.get("skipped"))
        res["rpc"] = bench_rpc_overhead(model, args.rpc_dir, 64, args.ctx, fwd["graph_ms"] or fwd["eager_ms"])
    if args.tp:
        del model
        torch.cuda.empty_cache()
        res["tp"] = {int(w): run_tp(args, int(w)) for w in args.tp.split(",")}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)
    print_table(res)


if __name__ == "__main__":
    main()
