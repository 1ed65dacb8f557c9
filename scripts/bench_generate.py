"""Our side of P3 (spec/performance.md; bench_peer.py's workload): a whole mixed-adapter generate as a server
runs it, through the graphed adapter decode of scripts/bench_lora.py (`bench_lora_decode` calls it with the
served configuration's graphs)."""

from __future__ import annotations

import math
import time
from types import SimpleNamespace
from typing import Any

import torch

from bench_common import cuda_time


def bench_generate(
    model: Any, graphs: Any, kv: Any, reqs: list[SimpleNamespace], prompt: int, new_tokens: int
) -> dict[str, Any]:
    """Our side of P3, bench_peer's workload: len(reqs) prompts of `prompt` tokens, `new_tokens` new tokens,
    every request its own adapter (request i on slot i + 1), run whole as a server would: one eager prefill
    with adapters, then `new_tokens - 1` graphed adapter decode steps, each fed the previous step's greedy
    tokens (a host sync per step). Wall time of the second run (the first compiles and warms up); the
    prefill and one step are also timed alone."""
    from worker.layers.context import Seqlen
    from worker.layers.lora import AdapterBatchData

    dev, bs = model.pctx.device, kv.block_size
    n, L = len(reqs), prompt
    if math.ceil((L + new_tokens) / bs) > len(reqs[0].blocks):
        raise SystemExit(f"P3: {L} + {new_tokens} tokens do not fit the requests' {len(reqs[0].blocks)} blocks")
    gen = [
        SimpleNamespace(
            ids=[(7 * i + j) % 1000 + 1 for j in range(L)],
            blocks=r.blocks,
            slots=[r.blocks[p // bs] * bs + p % bs for p in range(L + new_tokens)],
            ntk_alpha=1.0,
            n_cached=0,
        )
        for i, r in enumerate(reqs)
    ]
    tables = torch.tensor([r.blocks for r in gen], dtype=torch.int32, device=dev)
    kv_slots = torch.tensor([r.slots[p] for r in gen for p in range(L)], dtype=torch.long, device=dev)
    seqlen = Seqlen.for_prefill([L] * n, None, [1.0] * n, device=dev)
    ids = torch.tensor([t for r in gen for t in r.ids], device=dev)
    pos = torch.arange(L, device=dev).repeat(n)
    last = torch.arange(1, n + 1, device=dev) * L - 1
    adapter_slots = list(range(1, n + 1))
    data = AdapterBatchData.build(adapter_slots, [L] * n, dev)
    batch = SimpleNamespace(requests=gen)

    def prefill() -> torch.Tensor:
        with torch.inference_mode():
            return model(
                ids, pos, seqlen.cu_seqlen_q, kv.layers, tables, kv_slots, seqlen, L, data, lm_head_indices=last
            )[0]

    def generate() -> float:
        for r in gen:
            del r.ids[L:]
            r.n_cached = 0
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        nxt = prefill().argmax(-1).tolist()
        for _ in range(new_tokens - 1):
            for r, t in zip(gen, nxt):
                r.ids.append(t)
            nxt = graphs.run(batch, adapter_slots).argmax(-1).tolist()
        return time.perf_counter() - t0

    generate()
    gen_s = generate()
    prefill_t = cuda_time(prefill, iters=3, warmup=1)
    graphs.run(batch, adapter_slots)
    step_t = cuda_time(graphs.graphs[graphs.last_key][0].replay, iters=30)
    return dict(
        batch=n,
        prompt=L,
        new_tokens=new_tokens,
        adapters=n,
        method="measured: the whole generate (prefill + every decode step with greedy tokens), second run",
        generate_s=gen_s,
        prefill_ms=prefill_t * 1e3,
        step_ms=step_t * 1e3,
        tok_s=n * new_tokens / gen_s,
        decode_tok_s=n / step_t,
    )
