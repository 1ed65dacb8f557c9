"""Kernel timings on one GPU, to pick defaults on the card at hand (no assertions; the kernels' correctness
is in tests/gpu/test_gpu_kernels.py and test_gpu_fused.py), at Qwen-7B shapes in bf16:

    python scripts/bench_kernels.py                      # both tables
    python scripts/bench_kernels.py --only attention     # one layer's paged attention, per tile choice
    python scripts/bench_kernels.py --only fused         # one layer's elementwise ops, reference vs fused
    python scripts/bench_kernels.py --only lora          # decode LoRA per module: two launches vs one

attention: decode (batch 32 x 512 context) and prefill (8 x 1024 tokens) of one layer, for the default tiles
and a few others. fused: residual add + ln_2, RoPE + logn on q and k, silu * up, residual add + next ln_1,
inside CUDA graphs (launch cost gone, as in graphed decode).
"""

from __future__ import annotations

import argparse
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

import bench_common  # noqa: F401  (puts the repository on sys.path)
from worker.kernels import fused
from worker.layers.context import ForwardContext, Seqlen
from worker.ops import rotary_cos_sin, store_kv

CUDA = torch.device("cuda")
HIDDEN, HEADS, HEAD_DIM, WIDTH, BLOCK = 4096, 32, 128, 11008, 16
EPS = 1e-6  # RMSNorm epsilon


class PagedBatch:
    """`new[i]` new tokens after `cached[i]` cached ones, over shuffled KV blocks; unused cache rows are NaN."""

    def __init__(self, new: list[int], cached: list[int], dtype: torch.dtype, prefill: bool = True, seed: int = 0):
        g = torch.Generator(device=CUDA).manual_seed(seed)
        total = [c + n for c, n in zip(cached, new)]
        need = [-(-t // BLOCK) for t in total]
        num_blocks = sum(need) + 3
        free = list(range(num_blocks))
        random.Random(seed).shuffle(free)
        pad = free.pop()
        self.blocks = [[free.pop() for _ in range(n)] for n in need]
        width = max(need)
        tables = torch.tensor([b + [pad] * (width - len(b)) for b in self.blocks], dtype=torch.int32, device=CUDA)
        shape = (num_blocks, BLOCK, HEADS, HEAD_DIM)
        self.k_cache = torch.full(shape, float("nan"), dtype=dtype, device=CUDA)
        self.v_cache = torch.full(shape, float("nan"), dtype=dtype, device=CUDA)
        prefix = torch.cat([self.slots_of(b, 0, c) for b, c in enumerate(cached)])
        n = prefix.numel()
        store_kv(
            torch.randn(n, HEADS, HEAD_DIM, generator=g, device=CUDA),
            torch.randn(n, HEADS, HEAD_DIM, generator=g, device=CUDA),
            self.k_cache,
            self.v_cache,
            prefix,
        )
        T = sum(new)
        qkv = (torch.randn(T, 3, HEADS, HEAD_DIM, generator=g, device=CUDA) * 2).to(dtype)
        self.q, self.k, self.v = qkv.unbind(1)  # non-contiguous views, as in the model
        slots = torch.cat([self.slots_of(b, c, t) for b, (c, t) in enumerate(zip(cached, total))])
        store_kv(self.k, self.v, self.k_cache, self.v_cache, slots)
        dummy = torch.zeros(T, HEAD_DIM // 2, device=CUDA)
        self.ctx = ForwardContext(
            is_prefill=prefill,
            positions=torch.zeros(T, dtype=torch.long, device=CUDA),
            slots=slots,
            block_tables=tables,
            seqlen=Seqlen.for_prefill(new, cached, device=CUDA),
            cos=dummy,
            sin=dummy,
            logn=None,
            lm_head_indices=None,
        )

    def slots_of(self, b: int, start: int, stop: int) -> torch.Tensor:
        blocks = self.blocks[b]
        return torch.tensor(
            [blocks[p // BLOCK] * BLOCK + p % BLOCK for p in range(start, stop)], dtype=torch.long, device=CUDA
        )

    def attend(self, backend: Any, cache: bool = True) -> torch.Tensor:
        kc, vc = (self.k_cache, self.v_cache) if cache else (None, None)
        return backend.attend(self.q, self.k, self.v, kc, vc, self.ctx, HEAD_DIM**-0.5)


def time_ms(fn: Callable[[], object], iters: int = 50) -> float:
    """Mean milliseconds per call after one warm-up call."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def graph_ms(fn: Callable[[], object], reps: int = 20, iters: int = 20) -> float:
    """Milliseconds per call of `fn` replayed from a CUDA graph holding `reps` calls."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / (iters * reps)


def attention_table() -> None:
    from worker.kernels.triton_attention import Tiles
    from worker.layers.attention import TorchAttention
    from worker.layers.attention_triton import TritonAttention

    dtype = torch.bfloat16
    d = PagedBatch([1] * 32, [511] * 32, dtype, prefill=False)
    kv_bytes = 2 * 32 * 512 * HEADS * HEAD_DIM * 2
    rows: list[tuple[str, float, float]] = [
        ("decode triton, default", time_ms(lambda: d.attend(TritonAttention())), kv_bytes)
    ]
    for n, w, splits in [(16, 4, 1), (32, 4, 1), (32, 4, 4), (64, 8, 1), (64, 8, 4)]:
        be = TritonAttention(tiles=Tiles(decode_n=n, decode_warps=w), num_splits=splits)
        rows.append((f"decode triton n{n} w{w} splits {splits}", time_ms(partial(d.attend, be)), kv_bytes))
    rows.append(("decode torch reference", time_ms(lambda: d.attend(TorchAttention()), iters=5), kv_bytes))
    p = PagedBatch([1024] * 8, [0] * 8, dtype)
    flops = 8 * 2 * 2 * HEADS * HEAD_DIM * 1024 * 1025 / 2  # causal QK^T and PV
    default = TritonAttention()  # torch's varlen_attn unless it failed (then varlen_attn is None)
    rows += [
        ("prefill no cache, default", time_ms(lambda: p.attend(default, cache=False)), flops),
        ("prefill triton paged, default", time_ms(lambda: p.attend(TritonAttention())), flops),
    ]
    for m, n, w in [(64, 64, 4), (128, 64, 8), (64, 32, 4)]:
        be = TritonAttention(tiles=Tiles(prefill_m=m, prefill_n=n, prefill_warps=w))
        rows.append((f"prefill triton paged m{m} n{n} w{w}", time_ms(partial(p.attend, be)), flops))
    print(
        f"\n{torch.cuda.get_device_name()}: one layer, {HEADS} heads x {HEAD_DIM}, bf16; "
        f"no-cache prefill default = {'varlen_attn' if default.varlen_attn else 'triton'}"
    )
    for name, ms, work in rows:
        per_s = work / (ms * 1e-3)
        rate = f"{per_s / 1e9:7.0f} GB/s KV" if name.startswith("decode") else f"{per_s / 1e12:7.1f} TFLOP/s"
        print(f"  {name:36s} {ms * 1000:9.1f} us {rate}")


@dataclass
class LayerTensors:
    """One layer's elementwise-op operands for T tokens (bf16 activations, fp32 rotary tables)."""

    x: torch.Tensor  # [T, hidden] residual stream
    attn_out: torch.Tensor  # [T, hidden]
    mlp_out: torch.Tensor  # [T, hidden]
    w1: torch.Tensor  # [hidden] ln_1 weight
    w2: torch.Tensor  # [hidden] ln_2 weight
    q: torch.Tensor  # [T, heads, head_dim] view into qkv
    k: torch.Tensor  # [T, heads, head_dim]
    cos: torch.Tensor  # [T, head_dim / 2]
    sin: torch.Tensor  # [T, head_dim / 2]
    logn: torch.Tensor  # [T] all 1: repeated in-place replays keep the values finite
    gate_up: torch.Tensor  # [T, 2 * width]

    @classmethod
    def random(cls, T: int, dtype: torch.dtype) -> LayerTensors:
        def randn(*shape: int, seed: int, dt: torch.dtype = dtype) -> torch.Tensor:
            g = torch.Generator(device=CUDA).manual_seed(seed)
            return torch.randn(*shape, generator=g, device=CUDA).to(dt)

        q, k, _ = randn(T, 3 * HEADS * HEAD_DIM, seed=5).view(T, 3, HEADS, HEAD_DIM).unbind(1)
        positions = torch.arange(T, device=CUDA) + 100
        cos, sin = rotary_cos_sin(positions, torch.ones(T, device=CUDA), HEAD_DIM, 10000.0)
        w1, w2 = ((1 + 0.1 * randn(HIDDEN, seed=i, dt=torch.float32)).to(dtype) for i in (3, 4))
        return cls(
            x=randn(T, HIDDEN, seed=0),
            attn_out=randn(T, HIDDEN, seed=1),
            mlp_out=randn(T, HIDDEN, seed=2),
            w1=w1,
            w2=w2,
            q=q,
            k=k,
            cos=cos,
            sin=sin,
            logn=torch.ones(T, device=CUDA),
            gate_up=randn(T, 2 * WIDTH, seed=6),
        )


def elementwise_reference(t: LayerTensors) -> None:
    h = t.x + t.attn_out
    fused.rms_norm_reference(h, t.w2, EPS)
    fused.rotary_reference(t.q, t.k, t.cos, t.sin, t.logn)
    fused.silu_mul_reference(t.gate_up)
    fused.rms_norm_reference(h + t.mlp_out, t.w1, EPS)


def elementwise_fused(t: LayerTensors) -> None:
    _, h = fused.rms_norm(t.attn_out, t.w2, EPS, t.x)
    fused.rotary_(t.q, t.k, t.cos, t.sin, t.logn)
    fused.silu_mul(t.gate_up)
    fused.rms_norm(t.mlp_out, t.w1, EPS, h)


def fused_table() -> None:
    rows = []
    for T in (1, 128):
        t = LayerTensors.random(T, torch.bfloat16)
        rows.append((T, graph_ms(partial(elementwise_reference, t)), graph_ms(partial(elementwise_fused, t))))
    print(
        f"\n{torch.cuda.get_device_name()}: one layer's elementwise ops, hidden {HIDDEN}, {HEADS} x {HEAD_DIM} "
        f"heads, MLP width {WIDTH}, bf16, in CUDA graphs"
    )
    for T, ref_ms, fused_ms in rows:
        print(
            f"  T={T:4d}  reference {ref_ms * 1000:7.1f} us  fused {fused_ms * 1000:7.1f} us  "
            f"({ref_ms / fused_ms:.1f}x)"
        )


def lora_table(batch: int = 32, rank: int = 16) -> None:
    """One decode step's LoRA term per module at the 7B shapes, `batch` rows on distinct rank-16 adapters:
    shrink + expand (two launches) against kernels/lora_decode.py (one), in CUDA graphs."""
    from worker.kernels.lora import add_lora
    from worker.kernels.lora_decode import add_lora_decode
    from worker.kernels.paged_decode import DecodeWorkspace
    from worker.layers.lora import AdapterBatchData

    modules = {
        "c_attn": (1, HIDDEN, 3 * HIDDEN),
        "attn.c_proj": (1, HIDDEN, HIDDEN),
        "w2|w1": (2, HIDDEN, WIDTH),
        "mlp.c_proj": (1, WIDTH, HIDDEN),
    }
    data = AdapterBatchData.for_decode(torch.arange(1, batch + 1, device=CUDA))
    print(
        f"\n{torch.cuda.get_device_name()}: LoRA term of one module, decode batch {batch}, {batch} adapters of rank "
        f"{rank}, bf16, in CUDA graphs"
    )
    total = [0.0, 0.0]
    for name, (P, K, N) in modules.items():
        a = torch.randn(batch + 1, P, rank, K, device=CUDA).to(torch.bfloat16)
        b = torch.randn(batch + 1, P, N, rank, device=CUDA).to(torch.bfloat16)
        ranks = torch.full((P, batch + 1), rank, dtype=torch.int32, device=CUDA)
        x = torch.randn(batch, K, device=CUDA).to(torch.bfloat16)
        y = torch.zeros(batch, P * N, device=CUDA, dtype=torch.bfloat16)
        sync = DecodeWorkspace()
        two = graph_ms(partial(add_lora, y, x, a, b, ranks, data.starts, data.lens, data.slots, 1))
        one = graph_ms(partial(add_lora_decode, y, x, a, b, ranks, data.starts, data.slots, sync))
        floor = (a.numel() + b.numel()) * 2 * batch / (batch + 1) / 3.3e9  # ms at ~3.3 TB/s of adapter reads
        total[0], total[1] = total[0] + two, total[1] + one
        print(
            f"  {name:12s} two launches {two * 1000:7.1f} us  one launch {one * 1000:7.1f} us  (~{floor * 1000:.1f} us)"
        )
    print(
        f"  per layer: {total[0] * 1000:.1f} us -> {total[1] * 1000:.1f} us; x32 layers: "
        f"{32 * total[0]:.2f} ms -> {32 * total[1]:.2f} ms per decode step"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default="attention,fused,lora", help="comma list of: attention, fused, lora")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_kernels.py needs a CUDA GPU")
    only = set(args.only.split(","))
    if "attention" in only:
        attention_table()
    if "fused" in only:
        fused_table()
    if "lora" in only:
        lora_table()


if __name__ == "__main__":
    main()
