"""The multi-LoRA decode rows of scripts/bench.py (`--only lora`): P2 (graphed decode with every request on
its own adapter vs base, per LoRA backend) and our side of P3 (bench_peer.py's workload). P6 (LoadAdapter
latency) is in bench_adapter_load.py."""

from __future__ import annotations

import math
import time
from types import SimpleNamespace
from typing import Any

import torch

from bench_common import cuda_time, weight_bytes


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
) -> dict:
    """P2: graphed decode with every request on its own adapter vs graphed base-only decode (the same
    GraphedDecode, the same inputs); and our side of P3 (prefill + decode of bench_peer's workload)."""
    from worker.adapters.pool import AdapterManager
    from worker.engine.cuda_graphs import GraphedDecode
    from worker.engine.kv_cache import KVCache

    c, dev = model.config, model.pctx.device
    if max(batches + [peer_batch]) > slots:
        raise SystemExit(f"--lora-slots {slots} < the largest batch: every request needs its own adapter")
    mgr = AdapterManager("", model, model.pctx, model.dtype, max_rank, slots)
    mgr.attach(SimpleNamespace(model=model, batches={}, adapters=None))
    fill_random_adapters(mgr, slots, rank, alpha=2.0 * rank)
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
    variants = (
        [("torch", False)]
        + ([("triton", False)] if mgr.kernels is not None else [])
        + ([("triton", True)] if mgr.shrink_stream is not None else [])
    )
    graphs: GraphedDecode | None = None
    for k, (backend, overlap) in enumerate(variants):
        if k:  # the previous variant's graphs go before the next capture
            graphs = None
            torch.cuda.empty_cache()
        for owner, name in lora_linears(model):  # batched bmm, or the kernels (shrink beside the base matmul)
            term = getattr(owner, name).lora
            term.kernels = mgr.kernels if backend == "triton" else None
            term.stream = mgr.shrink_stream if overlap else None
        t0 = time.time()
        graphs = GraphedDecode(model, kv, max_batch, per_seq, num_blocks - 1, adapter_pools=True)
        capture_s[f"{backend}{'-overlap' if overlap else ''}"] = time.time() - t0
        for b in batches:
            batch: Any = SimpleNamespace(requests=reqs[:b])  # a Batch as far as graphs.run reads it
            bucket = next(s for s in graphs.sizes if s >= b)
            graphs.run(batch, None)  # fills the static inputs of this bucket
            base = cuda_time(graphs.graphs[(bucket, False)][0].replay, iters=30)
            graphs.run(batch, list(range(1, b + 1)))  # request i on slot i + 1: b distinct adapters
            lora = cuda_time(graphs.graphs[(bucket, True)][0].replay, iters=30)
            floor = (wbytes + b * (ctx_len + 1) * kv_per_token) / bw
            rows.append(
                dict(
                    batch=b,
                    adapters=b,
                    backend=backend,
                    overlap=overlap,
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


def bench_generate(
    model: Any, graphs: Any, kv: Any, reqs: list[SimpleNamespace], prompt: int, new_tokens: int
) -> dict[str, Any]:
    """Our side of P3, bench_peer's workload: len(reqs) prompts of `prompt` tokens, `new_tokens` new tokens,
    every request its own adapter (request i on slot i + 1): one eager prefill with adapters, then graphed
    adapter decode steps."""
    from worker.layers.context import Seqlen
    from worker.layers.lora import AdapterBatchData

    dev = model.pctx.device
    n, L = len(reqs), prompt
    tables = torch.tensor([r.blocks for r in reqs], dtype=torch.int32, device=dev)
    kv_slots = torch.tensor([r.slots[p] for r in reqs for p in range(L)], dtype=torch.long, device=dev)
    seqlen = Seqlen.for_prefill([L] * n, None, [1.0] * n, device=dev)
    ids = torch.randint(0, 1000, (n * L,), device=dev)
    pos = torch.arange(L, device=dev).repeat(n)
    last = torch.arange(1, n + 1, device=dev) * L - 1
    data = AdapterBatchData.build(list(range(1, n + 1)), [L] * n, dev)

    def prefill() -> torch.Tensor:
        with torch.inference_mode():
            return model(
                ids, pos, seqlen.cu_seqlen_q, kv.layers, tables, kv_slots, seqlen, L, data, lm_head_indices=last
            )[0]

    prefill_t = cuda_time(prefill, iters=3, warmup=1)
    batch = SimpleNamespace(requests=reqs)
    graphs.run(batch, list(range(1, n + 1)))
    bucket = next(s for s in graphs.sizes if s >= n)
    step_t = cuda_time(graphs.graphs[(bucket, True)][0].replay, iters=30)
    gen_s = prefill_t + (new_tokens - 1) * step_t
    return dict(
        batch=n,
        prompt=L,
        new_tokens=new_tokens,
        adapters=n,
        prefill_ms=prefill_t * 1e3,
        step_ms=step_t * 1e3,
        tok_s=n * new_tokens / gen_s,
        decode_tok_s=n / step_t,
    )
