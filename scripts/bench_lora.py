"""The multi-LoRA rows of scripts/bench.py (`--only lora`): P2 (graphed decode with every request on its
own adapter vs base, per LoRA backend), our side of P3 (bench_peer.py's workload) and P6 (LoadAdapter
latency, cold and from the host cache)."""
from __future__ import annotations

import json
import math
import os
import time

import torch

from bench import cuda_time, weight_bytes
from worker.config import QwenConfig
from worker.distributed import ParallelContext


def fill_random_adapters(mgr, n: int, rank: int, alpha: float, seed: int = 0) -> None:
    """Slots 1..n of the pool hold random rank-`rank` adapters on all five modules, written straight into
    the pool as LoadAdapter leaves them (A; B with alpha/rank folded in) with their ranks set."""
    g = torch.Generator(device=mgr.pctx.device).manual_seed(seed)
    for a, b in mgr.slots.stacked.values():  # a: [slots, P, r_max, in]; b: [slots, P, out, r_max]
        a[1:n + 1, :, :rank].normal_(0.0, a.shape[-1] ** -0.5, generator=g)
        b[1:n + 1, :, :, :rank].normal_(0.0, 0.02 * alpha / rank, generator=g)
    mgr.slots.ranks[1:n + 1] = rank


def lora_bytes(mgr, rank: int) -> int:
    """Bytes of one rank-`rank` adapter on all modules (what a step reads per distinct adapter)."""
    return sum(rank * (a.shape[1] * a.shape[-1] + b.shape[1] * b.shape[2]) * a.element_size()
               for a, b in mgr.slots.stacked.values())


def lora_linears(model) -> list[tuple[object, str]]:
    return [(t.owner, t.attr) for t in model.lora_targets()]


def unwrap_lora(model) -> None:
    for owner, name in lora_linears(model):
        setattr(owner, name, getattr(owner, name).base)


def bench_lora_decode(model, batches: list[int], ctx_len: int, block_size: int, bw: float, slots: int, rank: int,
                      max_rank: int, peer_batch: int, peer_prompt: int, peer_new: int) -> dict:
    """P2: graphed decode with every request on its own adapter vs graphed base-only decode (the same
    GraphedDecode, the same inputs); and our side of P3 (prefill + decode of bench_peer's workload)."""
    from types import SimpleNamespace

    from worker.adapters.pool import AdapterManager
    from worker.engine.cuda_graphs import GraphedDecode
    from worker.engine.kv_cache import KVCache
    from worker.layers.context import Seqlen
    from worker.layers.lora import AdapterBatchData

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
        reqs.append(SimpleNamespace(ids=[(7 * i + j) % 1000 + 1 for j in range(ctx_len + 1)], blocks=blocks,
                                    slots=[blocks[p // block_size] * block_size + p % block_size
                                           for p in range(ctx_len + 1)], ntk_alpha=1.0, n_cached=0))
    wbytes, per_adapter = weight_bytes(model), lora_bytes(mgr, rank)
    rows, capture_s = [], {}
    variants = [("torch", False)] + ([("triton", False)] if mgr.kernels is not None else []) + (
        [("triton", True)] if mgr.shrink_stream is not None else [])
    for k, (backend, overlap) in enumerate(variants):
        for owner, name in lora_linears(model):  # batched bmm, or the kernels (shrink beside the base matmul)
            term = getattr(owner, name).lora
            term.kernels = mgr.kernels if backend == "triton" else None
            term.stream = mgr.shrink_stream if overlap else None
        t0 = time.time()
        graphs = GraphedDecode(model, kv, max_batch, per_seq, num_blocks - 1, adapter_pools=True)
        capture_s[f"{backend}{'-overlap' if overlap else ''}"] = time.time() - t0
        for b in batches:
            batch = SimpleNamespace(requests=reqs[:b])
            bucket = next(s for s in graphs.sizes if s >= b)
            graphs.run(batch, None)  # fills the static inputs of this bucket
            base = cuda_time(graphs.graphs[(bucket, False)][0].replay, iters=30)
            graphs.run(batch, list(range(1, b + 1)))  # request i on slot i + 1: b distinct adapters
            lora = cuda_time(graphs.graphs[(bucket, True)][0].replay, iters=30)
            floor = (wbytes + b * (ctx_len + 1) * kv_per_token) / bw
            rows.append(dict(batch=b, adapters=b, backend=backend, overlap=overlap, base_ms=base * 1e3,
                             lora_ms=lora * 1e3, ratio=base / lora, extra_ms=(lora - base) * 1e3,
                             lora_floor_ms=b * per_adapter / bw * 1e3, base_floor_ms=floor * 1e3,
                             base_tok_s=b / base, lora_tok_s=b / lora))
        if k == len(variants) - 1:
            break  # keep the served configuration's graphs for the generate workload below
        del graphs
        torch.cuda.empty_cache()
    # our side of P3: bench_peer's workload (peer_batch prompts of peer_prompt tokens, peer_new new tokens,
    # every request its own adapter): one eager prefill with adapters, then graphed adapter decode steps
    n, L = peer_batch, peer_prompt
    tables = torch.tensor([r.blocks for r in reqs[:n]], dtype=torch.int32, device=dev)
    kv_slots = torch.tensor([r.slots[p] for r in reqs[:n] for p in range(L)], dtype=torch.long, device=dev)
    seqlen = Seqlen.for_prefill([L] * n, None, [1.0] * n, device=dev)
    ids = torch.randint(0, 1000, (n * L,), device=dev)
    pos = torch.arange(L, device=dev).repeat(n)
    last = torch.arange(1, n + 1, device=dev) * L - 1
    data = AdapterBatchData.build(list(range(1, n + 1)), [L] * n, dev)

    def prefill():
        with torch.inference_mode():
            return model(ids, pos, seqlen.cu_seqlen_q, kv.layers, tables, kv_slots, seqlen, L, data,
                         lm_head_indices=last)[0]

    prefill_t = cuda_time(prefill, iters=3, warmup=1)
    batch = SimpleNamespace(requests=reqs[:n])
    graphs.run(batch, list(range(1, n + 1)))
    bucket = next(s for s in graphs.sizes if s >= n)
    step_t = cuda_time(graphs.graphs[(bucket, True)][0].replay, iters=30)
    gen_s = prefill_t + (peer_new - 1) * step_t
    generate = dict(batch=n, prompt=L, new_tokens=peer_new, adapters=n, prefill_ms=prefill_t * 1e3,
                    step_ms=step_t * 1e3, tok_s=n * peer_new / gen_s, decode_tok_s=n / step_t)
    out = dict(rank=rank, max_rank=max_rank, slots=slots, alpha=2.0 * rank, adapter_MB=per_adapter / 1e6,
               graph_capture_s=capture_s, decode=rows, generate=generate)
    del graphs, kv
    unwrap_lora(model)
    del mgr
    torch.cuda.empty_cache()
    return out


def write_peft_adapter(path: str, config: QwenConfig, rank: int, alpha: float, dtype: torch.dtype, seed: int) -> int:
    """A PEFT LoRA adapter directory (all five modules of every layer); returns the file's size."""
    from safetensors.torch import save_file

    from worker.adapters.peft import MODULES, module_dims

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config.num_hidden_layers):
        for module in MODULES:
            d_in, d_out = module_dims(config, module)
            prefix = f"base_model.model.transformer.h.{layer}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = (torch.randn(rank, d_in, generator=g) * d_in**-0.5).to(dtype)
            tensors[f"{prefix}.lora_B.weight"] = (torch.randn(d_out, rank, generator=g) * 0.02).to(dtype)
    os.makedirs(path, exist_ok=True)
    file = os.path.join(path, "adapter_model.safetensors")
    save_file(tensors, file)
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
                   "target_modules": ["c_attn", "c_proj", "w1", "w2"], "lora_dropout": 0.0, "bias": "none"}, f)
    return os.path.getsize(file)


def drop_page_cache(path: str) -> bool:
    """Ask the kernel to drop a file's cached pages (best effort: clean pages of a file we wrote)."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        return True
    except (OSError, AttributeError):
        return False


def bench_lora_load(config: QwenConfig, pctx: ParallelContext, root: str, rank: int, max_rank: int,
                    repeats: int, file_dtypes: list[str]) -> list[dict]:
    """P6: LoadAdapter (read, validate, fold the scale, stage in pinned memory, fill a slot; synchronized)
    of a rank-`rank` adapter on all five modules: cold (first read of each file, its pages dropped from
    the page cache first), after a DownloadAdapter of it (the router's order: the file's pages are
    cached by then) and from the host cache (reload after offload). Medians."""
    from worker.adapters.pool import AdapterManager
    from worker.models.qwen import FlashQwenForCausalLM
    from worker.pb import generate_pb2 as pb

    shapes = FlashQwenForCausalLM(config, ParallelContext(pctx.rank, pctx.world_size, torch.device("meta")))
    rows = []
    for name in file_dtypes:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]
        mgr = AdapterManager(root, shapes, pctx, torch.bfloat16, max_rank, num_slots=2)
        host_copy, host_s = mgr._host_copy, []

        phases: list[dict] = []

        def timed_host_copy(*a, **kw):  # the read + validate + scale + pinned staging part of a cold load
            t = time.perf_counter()
            out = host_copy(*a, **kw)
            host_s.append(time.perf_counter() - t)
            return out

        mgr._host_copy = timed_host_copy
        size = 0
        for i in range(repeats + 1):  # adapter 0 warms the code paths up
            size = write_peft_adapter(os.path.join(root, f"{name}-{i}"), config, rank, 2.0 * rank, dtype, seed=i)

        def load(index: int, adapter_id: str) -> float:
            req = pb.LoadAdapterRequest(adapter_parameters=pb.AdapterParameters(adapter_ids=[adapter_id]),
                                        adapter_source=pb.AdapterSource.LOCAL, adapter_index=index)
            torch.cuda.synchronize()
            t = time.perf_counter()
            mgr.load(req)
            torch.cuda.synchronize()
            return time.perf_counter() - t

        def offload(index: int) -> None:
            mgr.offload(pb.OffloadAdapterRequest(adapter_index=index))

        cold, warm, dropped = [], [], True
        for i in range(repeats + 1):
            dropped &= drop_page_cache(os.path.join(root, f"{name}-{i}", "adapter_model.safetensors"))
            t = load(i + 1, f"{name}-{i}")
            phases.append(dict(mgr.last_timing))
            mgr.wait_pinned()  # loads spaced out: the background pinning of the last one is done
            offload(i + 1)
            if i:
                cold.append(t)
        for i in range(repeats):
            warm.append(load(i + 2, f"{name}-{i + 1}"))
            offload(i + 2)
        after_download = []  # the router's order: DownloadAdapter (reads and validates), then LoadAdapter
        for i in range(repeats):
            adapter_id = f"{name}-{i + 1}"
            drop_page_cache(os.path.join(root, adapter_id, "adapter_model.safetensors"))
            mgr.download(pb.DownloadAdapterRequest(adapter_parameters=pb.AdapterParameters(adapter_ids=[adapter_id]),
                                                   adapter_source=pb.AdapterSource.LOCAL))
            after_download.append(load(100 + i, adapter_id))  # a new index: read from the file again
            mgr.wait_pinned()
            offload(100 + i)
        after_download.sort()
        cold.sort()
        warm.sort()
        read = sorted(host_s[1:])
        rows.append(dict(file_dtype=name, file_MB=size / 1e6, rank=rank, max_rank=max_rank, repeats=repeats,
                         page_cache_dropped=dropped, cold_ms=cold[len(cold) // 2] * 1e3,
                         cold_read_stage_ms=read[len(read) // 2] * 1e3,
                         cached_ms=warm[len(warm) // 2] * 1e3, cold_phases_ms=phases[1:],
                         after_download_ms=after_download[len(after_download) // 2] * 1e3,
                         after_download_all_ms=[t * 1e3 for t in after_download],
                         cold_all_ms=[t * 1e3 for t in cold],
                         cached_all_ms=[t * 1e3 for t in warm]))
        del mgr
        torch.cuda.empty_cache()
    return rows
