"""GPU benchmark against the physical floor (spec/performance.md): P1, P4, P7, P8 (and P5 with --tp, P2/P6
and our side of P3 with --lora).

    python scripts/bench.py --shape 7b --out bench_out/bench.json        # one GPU
    python scripts/bench.py --shape 7b --tp 2 --only decode               # TP decode (spawns 2 ranks)
    python scripts/bench.py --shape 7b --only lora                        # multi-LoRA rows only

Builds a random bf16 checkpoint of the chosen shape in GPU memory (same bytes and FLOPs as the real
one), measures copy bandwidth and bf16 matmul rate in the same run, then decode step time at batch
1/8/32/64/128 with 512-token contexts (eager and CUDA graphs), prefill MFU on 8 x 1024 tokens, and
KV capacity after Warmup. With --lora: decode with N distinct rank-16 adapters (every request its own,
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
import time
from typing import Callable

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from worker.config import QwenConfig  # noqa: E402
from worker.distributed import ParallelContext  # noqa: E402

SHAPES = {
    "7b": dict(hidden_size=4096, num_attention_heads=32, num_hidden_layers=32, intermediate_size=22016,
               vocab_size=151936, seq_length=8192),
    "1.8b": dict(hidden_size=2048, num_attention_heads=16, num_hidden_layers=24, intermediate_size=11008,
                 vocab_size=151936, seq_length=8192),
    "tiny": dict(hidden_size=256, num_attention_heads=2, num_hidden_layers=2, intermediate_size=1024,
                 vocab_size=1024, seq_length=8192),
}


def cuda_time(fn: Callable[[], object], iters: int = 20, warmup: int = 3) -> float:
    """Median seconds per call, with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return times[len(times) // 2]


def copy_bandwidth(device: torch.device) -> float:
    x = torch.empty(2 * 2**30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    t = cuda_time(lambda: y.copy_(x), iters=10)
    del x, y
    return 2 * 2 * 2**30 / t  # read + write


def matmul_rate(device: torch.device) -> float:
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    t = cuda_time(lambda: a @ b, iters=10)
    return 2 * 8192**3 / t


def build_model(shape: str, pctx: ParallelContext, backend_name: str):
    from worker.layers.attention import make_backend
    from worker.models.qwen import FlashQwenForCausalLM

    cfg = QwenConfig.from_dict({"model_type": "qwen", **SHAPES[shape]})
    model = FlashQwenForCausalLM(cfg, pctx, torch.bfloat16, make_backend(backend_name, pctx.device))
    g = torch.Generator(device=pctx.device).manual_seed(pctx.rank)
    for name, p in model.named_parameters():
        if "ln_" in name:
            p.data.fill_(1.0)
        else:
            p.data.normal_(0.0, 0.02, generator=g)
    return model


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def decode_inputs(model, batch: int, ctx_len: int, block_size: int, kv):
    """Static decode inputs: `batch` sequences, each with ctx_len cached tokens, one new token."""
    from worker.layers.context import Seqlen

    dev = model.pctx.device
    per_seq = math.ceil((ctx_len + 1) / block_size)
    tables = torch.arange(1, 1 + batch * per_seq, dtype=torch.int32, device=dev).view(batch, per_seq)
    slots = (tables[:, ctx_len // block_size].long() * block_size + ctx_len % block_size)
    seqlen = Seqlen(input_lengths=torch.full((batch,), ctx_len + 1, dtype=torch.int32, device=dev),
                    cache_lengths=torch.full((batch,), ctx_len, dtype=torch.int32, device=dev),
                    cu_seqlen_q=torch.arange(batch + 1, dtype=torch.int32, device=dev), max_q=1, max_k=ctx_len + 1,
                    ntk_alpha=torch.ones(batch, device=dev))
    ids = torch.randint(0, 1000, (batch,), device=dev)
    pos = torch.full((batch,), ctx_len, dtype=torch.long, device=dev)
    return ids, pos, tables, slots, seqlen


def bench_decode(model, batches: list[int], ctx_len: int, block_size: int, bw: float, graphs: bool) -> list[dict]:
    from worker.engine.kv_cache import KVCache

    c = model.config
    heads = c.num_attention_heads // model.pctx.world_size
    max_batch = max(batches)
    num_blocks = 2 + max_batch * math.ceil((ctx_len + 1) / block_size)
    kv = KVCache(c.num_hidden_layers, num_blocks, block_size, heads, c.head_dim, torch.bfloat16, model.pctx.device)
    kv_per_token = KVCache.bytes_per_token(c.num_hidden_layers, heads, c.head_dim, torch.bfloat16)
    wbytes = weight_bytes(model)
    rows = []
    for b in batches:
        ids, pos, tables, slots, seqlen = decode_inputs(model, b, ctx_len, block_size, kv)

        def step():
            with torch.inference_mode():
                return model(ids, pos, None, kv.layers, tables, slots, seqlen, ctx_len + 1)[0]

        eager = cuda_time(step, iters=10)
        graph_t = None
        if graphs:
            from worker.engine.cuda_graphs import capture

            g, _ = capture(step)
            graph_t = cuda_time(g.replay, iters=30)
        floor = (wbytes + b * (ctx_len + 1) * kv_per_token) / bw
        best = graph_t or eager
        rows.append(dict(batch=b, eager_ms=eager * 1e3, graph_ms=None if graph_t is None else graph_t * 1e3,
                         floor_ms=floor * 1e3, ratio=best / floor, tok_s=b / best))
    del kv
    return rows


def bench_prefill(model, n_seqs: int, seq_len: int, block_size: int, matmul: float) -> dict:
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
    seqlen = Seqlen.for_prefill([seq_len] * n_seqs, None, [1.0] * n_seqs, device=dev)
    ids = torch.randint(0, 1000, (n_seqs * seq_len,), device=dev)
    pos = torch.arange(seq_len, device=dev).repeat(n_seqs)
    last = torch.arange(1, n_seqs + 1, device=dev) * seq_len - 1

    def step():
        with torch.inference_mode():
            return model(ids, pos, seqlen.cu_seqlen_q, kv.layers, tables, slots, seqlen, seq_len,
                         lm_head_indices=last)[0]

    t = cuda_time(step, iters=5, warmup=2)
    H, L, W = c.hidden_size, c.num_hidden_layers, c.mlp_width
    layer_params = 3 * H * H + H * H + 3 * H * W
    tokens = n_seqs * seq_len
    flops = 2 * layer_params * L * tokens + 2 * H * c.vocab_size * n_seqs  # linears + LM head (last tokens)
    flops += L * 4 * H * n_seqs * seq_len * seq_len / 2  # causal attention: QK^T and PV over half the square
    flops /= model.pctx.world_size
    del kv
    return dict(tokens=tokens, ms=t * 1e3, tflops=flops / t / 1e12, mfu=flops / t / matmul)


def bench_kv_capacity(model, block_size: int, memory_fraction: float, kv_dtype: torch.dtype = torch.bfloat16) -> dict:
    from worker.engine.engine import Engine, EngineConfig
    from worker.engine.kv_cache import KVCache
    from worker.pb import generate_pb2 as pb

    class _Tok:  # Warmup sends token ids; only the vocabulary bound is read
        n_real_vocab = model.config.vocab_size
        eos_token_ids = frozenset()

        def encode(self, text):
            return [1] * len(text)

    engine = Engine(model, _Tok(), model.pctx, EngineConfig(block_size=block_size, memory_fraction=memory_fraction,
                                                            kv_cache_dtype=kv_dtype))
    torch.cuda.empty_cache()
    free_before = torch.cuda.mem_get_info(model.pctx.device)[0]
    c = model.config
    per_token = KVCache.bytes_per_token(c.num_hidden_layers, c.num_attention_heads // model.pctx.world_size,
                                        c.head_dim, kv_dtype)
    req = pb.Request(id=0, tokenized_inputs=pb.TokenizedInputs(ids=[1] * 4096),
                     stopping_parameters=pb.StoppingCriteriaParameters(max_new_tokens=16))
    reqs = [pb.Request(id=i, tokenized_inputs=req.tokenized_inputs, stopping_parameters=req.stopping_parameters)
            for i in range(2)]
    total = engine.warmup(pb.WarmupRequest(batch=pb.Batch(id=0, requests=reqs), max_input_length=4096,
                                           max_prefill_tokens=8192, max_new_tokens=16))
    cache_tokens = engine.kv.num_slots
    ideal = free_before / per_token
    out = dict(max_supported_total_tokens=total, cache_tokens=cache_tokens, ideal_tokens=int(ideal),
               ratio=cache_tokens / ideal, per_token_bytes=per_token, free_gib=free_before / 2**30,
               kv_dtype=str(kv_dtype).replace("torch.", ""))
    engine.runner = None  # frees the KV cache (the runner owns it)
    torch.cuda.empty_cache()
    return out


def bench_rpc_overhead(model, tmp_dir: str, batch: int, ctx_len: int, forward_ms: float) -> dict:
    """P7: Decode RPC wall time through a real shard process vs the in-process forward time."""
    import subprocess

    import grpc

    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    from demo_tokenizer import train_bpe_ranks, write_tiktoken_file
    from make_demo_model import _save_sharded, hf_state
    from worker.pb import generate_pb2 as pb
    from worker.pb import generate_pb2_grpc as pb_grpc

    model_dir = os.path.join(tmp_dir, "model")
    os.makedirs(model_dir, exist_ok=True)
    t0 = time.time()
    _save_sharded({k: v.cpu() for k, v in hf_state(model).items()}, model_dir)
    write_tiktoken_file(os.path.join(model_dir, "qwen.tiktoken"), train_bpe_ranks("benchmark text", 0))
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        json.dump({"model_type": "qwen", **shape_of(model.config), "bf16": True}, f)
    save_s = time.time() - t0
    uds = os.path.join(tmp_dir, "sock")
    proc = subprocess.Popen([sys.executable, "-m", "worker.cli", "serve", model_dir, "--uds-path", uds,
                             "--max-total-tokens", str(2 * batch * (ctx_len + 64)), "--log-level", "warning"],
                            cwd=ROOT)
    try:
        deadline = time.time() + 300
        while not os.path.exists(f"{uds}-0"):
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("shard did not start")
            time.sleep(0.5)
        stub = pb_grpc.LoraxServiceStub(grpc.insecure_channel(f"unix://{uds}-0"))
        ids = [(7 * i) % 400 + 1 for i in range(ctx_len)]
        params = pb.NextTokenChooserParameters(temperature=1.0, top_p=1.0, typical_p=1.0, repetition_penalty=1.0)
        stop = pb.StoppingCriteriaParameters(max_new_tokens=60, ignore_eos_token=True)
        warm = pb.Batch(id=0, requests=[pb.Request(id=0, tokenized_inputs=pb.TokenizedInputs(ids=ids),
                                                   parameters=params, stopping_parameters=stop)])
        total = stub.Warmup(pb.WarmupRequest(batch=warm, max_input_length=ctx_len, max_prefill_tokens=8192,
                                             max_new_tokens=60)).max_supported_total_tokens
        info = stub.Info(pb.InfoRequest())
        bs = info.block_size
        per = math.ceil((ctx_len + 59) / bs)
        reqs = []
        for i in range(batch):
            blocks = list(range(1 + i * per, 1 + (i + 1) * per))
            slots = [b * bs + j for b in blocks for j in range(bs)][:ctx_len + 59]
            reqs.append(pb.Request(id=i, tokenized_inputs=pb.TokenizedInputs(ids=ids), parameters=params,
                                   stopping_parameters=stop, blocks=blocks, slots=slots))
        resp = stub.Prefill(pb.PrefillRequest(batch=pb.Batch(id=1, requests=reqs, size=batch)))
        cached = resp.batch
        walls = []
        for step in range(50):
            t = time.perf_counter()
            resp = stub.Decode(pb.DecodeRequest(batches=[cached]))
            walls.append(time.perf_counter() - t)
            cached = resp.batch
        walls = sorted(walls[5:])
        wall_ms = walls[len(walls) // 2] * 1e3
        stub.ClearCache(pb.ClearCacheRequest())
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return dict(batch=batch, rpc_ms=wall_ms, forward_ms=forward_ms, overhead=(wall_ms - forward_ms) / wall_ms,
                checkpoint_save_s=save_s, max_supported_total_tokens=total)


def shape_of(c: QwenConfig) -> dict:
    return dict(hidden_size=c.hidden_size, num_attention_heads=c.num_attention_heads,
                num_hidden_layers=c.num_hidden_layers, intermediate_size=c.intermediate_size,
                vocab_size=c.vocab_size, seq_length=c.seq_length)


def tp_main(rank: int, world: int, port: int, args, queue) -> None:
    """One rank of the TP decode benchmark (P5): NCCL, CUDA graphs, same shape."""
    from worker.distributed import init_from_env, shutdown

    env = dict(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port))
    pctx = init_from_env(env, "cuda")
    bw = copy_bandwidth(pctx.device)
    model = build_model(args.shape, pctx, args.backend)
    rows = bench_decode(model, [int(b) for b in args.tp_batches.split(",")], args.ctx, args.block_size, bw,
                        not args.no_graphs)
    if rank == 0:
        queue.put(rows)
    shutdown(pctx)


def run_tp(args, world: int) -> list[dict]:
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
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--block-size", type=int, default=16)
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
    if not torch.cuda.is_available():
        sys.exit("bench.py needs a CUDA GPU")
    dev = torch.device("cuda", 0)
    torch.cuda.set_device(dev)
    pctx = ParallelContext(0, 1, dev)
    only = set(args.only.split(",")) if args.only != "all" else {"decode", "prefill", "kv"}
    if args.lora:
        only.add("lora")
    res: dict = dict(card=torch.cuda.get_device_name(dev), date=time.strftime("%Y-%m-%d"), shape=args.shape,
                     torch=torch.__version__, command=" ".join(sys.argv))
    res["copy_TBps"] = copy_bandwidth(dev) / 1e12
    res["matmul_TFLOPs"] = matmul_rate(dev) / 1e12
    model = build_model(args.shape, pctx, args.backend)
    res["backend"] = model.backend.name
    res["weight_GB"] = weight_bytes(model) / 1e9
    if "decode" in only:
        res["decode"] = bench_decode(model, [int(b) for b in args.batches.split(",")], args.ctx, args.block_size,
                                     res["copy_TBps"] * 1e12, not args.no_graphs)
    if "prefill" in only:
        res["prefill"] = bench_prefill(model, 8, 1024, args.block_size, res["matmul_TFLOPs"] * 1e12)
    if "kv" in only:
        res["kv"] = bench_kv_capacity(model, args.block_size, args.memory_fraction)
        res["kv_fp8"] = bench_kv_capacity(model, args.block_size, args.memory_fraction, torch.float8_e4m3fn)
    if "lora" in only:
        from bench_lora import bench_lora_decode

        res["lora"] = bench_lora_decode(model, [int(b) for b in args.lora_batches.split(",")], args.ctx,
                                        args.block_size, res["copy_TBps"] * 1e12, args.lora_slots, args.lora_rank,
                                        args.lora_max_rank, args.peer_batch, args.peer_prompt, args.peer_new)
    if "lora" in only or "load" in only:
        import tempfile

        from bench_lora import bench_lora_load

        with tempfile.TemporaryDirectory(dir=args.lora_dir or None) as root:
            res.setdefault("lora", {})["load"] = bench_lora_load(model.config, pctx, root, args.lora_rank,
                                                                 args.lora_load_max_rank, args.lora_load_repeats,
                                                                 args.lora_file_dtypes.split(","))
    if args.rpc_dir and "decode" in res:
        fwd = next(r for r in res["decode"] if r["batch"] == 64)
        res["rpc"] = bench_rpc_overhead(model, args.rpc_dir, 64, args.ctx, fwd["graph_ms"] or fwd["eager_ms"])
    if args.tp:
        del model
        torch.cuda.empty_cache()
        res["tp"] = {int(w): run_tp(args, int(w)) for w in args.tp.split(",")}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)
    print_table(res)


def print_table(res: dict) -> None:
    print(f"\n{res['card']} | {res['shape']} bf16 | backend {res['backend']} | copy {res['copy_TBps']:.2f} TB/s | "
          f"bf16 matmul {res['matmul_TFLOPs']:.0f} TFLOP/s | weights {res['weight_GB']:.2f} GB")
    print("| id | figure | measured | target |\n|---|---|---|---|")
    for row in res.get("decode", []):
        graph = f"{row['graph_ms']:.2f}" if row["graph_ms"] is not None else "-"
        tag = "P1" if row["batch"] == 1 else "  "
        print(f"| {tag} | decode b={row['batch']}: eager {row['eager_ms']:.2f} ms, graph {graph} ms, floor "
              f"{row['floor_ms']:.2f} ms | step/floor {row['ratio']:.2f} ({row['tok_s']:.0f} tok/s) | "
              f"{'<= 1.2' if row['batch'] == 1 else ''} |")
    if "prefill" in res:
        p = res["prefill"]
        print(f"| P4 | prefill 8x1024: {p['ms']:.1f} ms, {p['tflops']:.0f} TFLOP/s | MFU {p['mfu']:.2f} | >= 0.6 |")
    if "rpc" in res:
        r = res["rpc"]
        print(f"| P7 | Decode RPC at b={r['batch']}: {r['rpc_ms']:.2f} ms wall vs {r['forward_ms']:.2f} ms forward "
              f"| overhead {r['overhead']:.1%} | <= 10% |")
    for w, rows in res.get("tp", {}).items():
        base = {row["batch"]: row for row in res.get("decode", [])}
        for row in rows:
            b1 = base.get(row["batch"])
            t_tp = row["graph_ms"] or row["eager_ms"]
            speed = f"{(b1['graph_ms'] or b1['eager_ms']) / t_tp:.2f}x" if b1 else "-"
            print(f"| {'P5' if row['batch'] == 1 and w == 2 else '  '} | TP={w} decode b={row['batch']}: "
                  f"{t_tp:.2f} ms (floor/rank {row['floor_ms']:.2f} ms) | speed-up over TP=1 {speed} | "
                  f"{'>= 1.6x' if row['batch'] == 1 and w == 2 else ''} |")
    if "lora" in res:
        lo = res["lora"]
        for row in lo.get("decode", []):
            p2 = row["batch"] == 32 and row is max((r for r in lo["decode"] if r["batch"] == 32), key=lambda r: r["ratio"])
            mode = row.get("backend", "triton") + (", shrink || base matmul" if row["overlap"] else "")
            print(f"| {'P2' if p2 else '  '} | LoRA decode b={row['batch']}, {row['adapters']} distinct "
                  f"rank-{lo['rank']} adapters (r_max {lo['max_rank']}, {mode}): {row['lora_ms']:.2f} ms vs base "
                  f"{row['base_ms']:.2f} ms (+{row['extra_ms']:.2f} ms; adapter bytes floor "
                  f"{row['lora_floor_ms']:.2f} ms) | {row['ratio']:.3f} | {'>= 0.90' if p2 else ''} |")
        g = lo.get("generate")
        if g:
            print(f"| P3 | ours, {g['batch']} x {g['prompt']} prompts + {g['new_tokens']} tokens, {g['adapters']} "
                  f"adapters: prefill {g['prefill_ms']:.0f} ms, step {g['step_ms']:.2f} ms | {g['tok_s']:.0f} tok/s "
                  f"(decode {g['decode_tok_s']:.0f}) | bench_peer.py |")
        for row in lo.get("load", []):
            print(f"| P6 | LoadAdapter rank {row['rank']}, 5 modules, {row['file_dtype']} file {row['file_MB']:.0f} "
                  f"MB: cold{'' if row['page_cache_dropped'] else ' (page cache kept)'} / after DownloadAdapter / "
                  f"host cache | {row['cold_ms']:.1f} (read {row['cold_read_stage_ms']:.1f}) / "
                  f"{row['after_download_ms']:.1f} / {row['cached_ms']:.1f} ms | "
                  "<= 100 ms |")
    for key in ("kv", "kv_fp8"):
        if key in res:
            k = res[key]
            twice = (f"; {k['cache_tokens'] / res['kv']['cache_tokens']:.2f}x the bf16 cache's tokens"
                     if key == "kv_fp8" and "kv" in res else "")
            print(f"| P8 | KV capacity ({k.get('kv_dtype', 'bfloat16')}) {k['cache_tokens']} tokens of "
                  f"{k['ideal_tokens']} ideal ({k['free_gib']:.1f} GiB free); the router is offered "
                  f"{k['max_supported_total_tokens']} ({k['max_supported_total_tokens'] / k['ideal_tokens']:.2f})"
                  f"{twice} | {k['ratio']:.2f} | >= 0.9 |")


if __name__ == "__main__":
    main()
