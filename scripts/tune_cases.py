"""Inputs, references and timing for scripts/tune_attention.py: one layer's paged decode / prefill at the
7B attention shape (32 heads x 128, blocks of 16) over bf16 or fp8 caches. Runs on CUDA, or on the CPU
under TRITON_INTERPRET=1 with tiny shapes (the script's --smoke mode, used by its unit test)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

import torch

import bench_common  # noqa: F401  (puts the repository on sys.path)
from worker.engine.cuda_graphs import capture
from worker.layers.attention import causal_attention
from worker.ops import FP8, dequantize, gather_context, store_kv

KV_KINDS = ("bf16", "fp8")  # "bf16": a cache in the activation dtype (bf16 on the GPU, fp16 in --smoke)
TOL = 2e-2  # |ours - ref| <= TOL (1 + |ref|): bf16 outputs (tests/gpu/test_gpu_kernels.py's bound)


@dataclass(frozen=True)
class Shape:
    heads: int = 32
    head_dim: int = 128
    block: int = 16


def fill_(cache: torch.Tensor, gen: torch.Generator, std: float, scale: float | None) -> None:
    """Random N(0, std) rows (/ scale, clamped, for fp8) written in chunks (no full-size fp32 temporary)."""
    flat = cache.view(-1)
    for part in flat.split(1 << 26):
        x = torch.randn(part.shape, generator=gen, device=part.device) * std
        if scale is not None:
            x = (x / scale).clamp(-448.0, 448.0)
        part.copy_(x.to(cache.dtype))


@dataclass
class DecodeCase:
    """`batch` sequences of `ctx` cached keys (the new token's included), `copies` independent caches (like
    layers: together larger than L2, so every timed read comes from HBM). q: [B, heads, head_dim] bf16."""

    ctx: int
    batch: int
    kv: str  # "bf16" | "fp8"
    q: torch.Tensor
    caches: list[tuple[torch.Tensor, torch.Tensor]]  # per copy: K, V [blocks, block, heads, head_dim]
    tables: list[torch.Tensor]  # per copy: [B, ceil(ctx / block)] int32, shuffled blocks
    lens: torch.Tensor  # [B] int32, all ctx
    scales: tuple[torch.Tensor | None, torch.Tensor | None]
    scale: float
    kv_bytes: int  # K and V bytes of one copy (the decode's floor traffic)
    ref: torch.Tensor | None = field(default=None, repr=False)  # [B, heads, head_dim] fp32, copy 0

    @classmethod
    def build(
        cls,
        ctx: int,
        batch: int,
        kv: str,
        shape: Shape,
        device: torch.device,
        min_bytes: int,
        act: torch.dtype = torch.bfloat16,
        seed: int = 0,
    ) -> DecodeCase:
        dtype = FP8 if kv == "fp8" else act
        g = torch.Generator(device=device).manual_seed(seed)
        per_seq = math.ceil(ctx / shape.block)
        n_blocks = batch * per_seq + 1
        kv_bytes = 2 * batch * ctx * shape.heads * shape.head_dim * dtype.itemsize
        copies = max(1, min(32, math.ceil(min_bytes / kv_bytes)))
        scales: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)
        if dtype == FP8:
            scales = (torch.tensor(0.02, device=device), torch.tensor(0.01, device=device))
        caches, tables = [], []
        for _ in range(copies):
            kc = torch.empty(n_blocks, shape.block, shape.heads, shape.head_dim, dtype=dtype, device=device)
            vc = torch.empty_like(kc)
            fill_(kc, g, 1.0, None if scales[0] is None else float(scales[0]))
            fill_(vc, g, 1.0, None if scales[1] is None else float(scales[1]))
            caches.append((kc, vc))
            perm = torch.randperm(n_blocks - 1, generator=g, device=device)[: batch * per_seq] + 1
            tables.append(perm.to(torch.int32).view(batch, per_seq))
        q = torch.randn(batch, shape.heads, shape.head_dim, generator=g, device=device).to(act)
        lens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
        return cls(ctx, batch, kv, q, caches, tables, lens, scales, shape.head_dim**-0.5, kv_bytes)

    def reference(self) -> torch.Tensor:
        """fp32 attention of each row over copy 0's cache, dequantised (worker.ops / TorchAttention's math)."""
        if self.ref is None:
            kc, vc = self.caches[0]
            rows = []
            for b in range(self.batch):
                keys = gather_context(kc, self.tables[0][b], self.ctx)
                values = gather_context(vc, self.tables[0][b], self.ctx)
                keys, values = dequantize(keys.float(), self.scales[0]), dequantize(values.float(), self.scales[1])
                rows.append(causal_attention(self.q[b : b + 1].float(), keys, values, self.scale))
            self.ref = torch.cat(rows)
        return self.ref


@dataclass
class PrefillCase:
    """Fresh prompts of `lens` tokens: q, k, v [T, heads, head_dim] (bf16), and the same K/V stored in a
    paged cache (bf16 or fp8) with shuffled blocks for the paged path."""

    lens: list[int]
    kv: str
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    cu: torch.Tensor  # [B + 1] int32
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    tables: torch.Tensor  # [B, max blocks] int32
    cache_lens: torch.Tensor  # [B] int32 zeros: nothing cached before the step
    scales: tuple[torch.Tensor | None, torch.Tensor | None]
    scale: float
    refs: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict, repr=False)

    @classmethod
    def build(
        cls,
        lens: list[int],
        kv: str,
        shape: Shape,
        device: torch.device,
        act: torch.dtype = torch.bfloat16,
        seed: int = 0,
    ) -> PrefillCase:
        g = torch.Generator(device=device).manual_seed(seed)
        T, H, D = sum(lens), shape.heads, shape.head_dim
        qkv = torch.randn(T, 3, H, D, generator=g, device=device).to(act)
        q, k, v = qkv.unbind(1)  # non-contiguous views, as in the model
        per = [math.ceil(n / shape.block) for n in lens]
        n_blocks = sum(per) + 1
        perm = (torch.randperm(n_blocks - 1, generator=g, device=device) + 1).to(torch.int32)
        width = max(per)
        tables = torch.zeros(len(lens), width, dtype=torch.int32, device=device)
        slots, start, blk = [], 0, 0
        for i, (n, nb) in enumerate(zip(lens, per)):
            tables[i, :nb] = perm[blk : blk + nb]
            pos = torch.arange(n, device=device)
            slots.append(tables[i, pos // shape.block].long() * shape.block + pos % shape.block)
            start, blk = start + n, blk + nb
        dtype = FP8 if kv == "fp8" else act
        scales = (None, None) if dtype != FP8 else (torch.tensor(0.01, device=device),) * 2
        kc = torch.zeros(n_blocks, shape.block, H, D, dtype=dtype, device=device)
        vc = torch.zeros_like(kc)
        store_kv(k, v, kc, vc, torch.cat(slots), *scales)
        cu = torch.tensor([0] + [sum(lens[: i + 1]) for i in range(len(lens))], dtype=torch.int32, device=device)
        zeros = torch.zeros(len(lens), dtype=torch.int32, device=device)
        return cls(lens, kv, q, k, v, cu, kc, vc, tables, zeros, scales, D**-0.5)

    def flops(self, hidden: int) -> float:
        """Causal attention's QK and PV FLOPs of one layer: 4 hidden per (query, visible key) pair (2 T^2
        hidden for one fresh T-token prompt, spec/performance.md P4L)."""
        return sum(4.0 * hidden * n * (n + 1) / 2 for n in self.lens)

    def check_rows(self) -> list[tuple[int, int]]:
        """Query row ranges [i0, i1) checked against the reference: each prompt's first 64 and last 128."""
        out, start = [], 0
        for n in self.lens:
            out += [(start, start + min(n, 64)), (start + max(0, n - 128), start + n)]
            start += n
        return out

    def reference(self, i0: int, i1: int, paged: bool) -> torch.Tensor:
        """fp32 causal attention of rows [i0, i1) (one prompt) over its keys so far; paged: the cache's
        (dequantised) keys, else the bf16 k/v."""
        key = (i0, i1) if not paged else (i0, -i1)
        if key not in self.refs:
            seq = int(torch.searchsorted(self.cu, torch.tensor(i0, device=self.cu.device), right=True)) - 1
            s = int(self.cu[seq])
            if paged:
                keys = gather_context(self.k_cache, self.tables[seq], i1 - s)
                values = gather_context(self.v_cache, self.tables[seq], i1 - s)
                keys, values = dequantize(keys.float(), self.scales[0]), dequantize(values.float(), self.scales[1])
            else:
                keys, values = self.k[s:i1].float(), self.v[s:i1].float()
            self.refs[key] = causal_attention(self.q[i0:i1].float(), keys, values, self.scale)
        return self.refs[key]


def max_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / (TOL (1 + |ref|)): <= 1 passes; NaN/inf count as failures (inf)."""
    out = out.float()
    if not torch.isfinite(out).all():
        return math.inf
    return ((out - ref.float()).abs() / (TOL * (1 + ref.float().abs()))).max().item()


def time_per_call(fn: Callable[[], object], calls: int, device: torch.device, iters: int = 10) -> float:
    """Seconds per call of `fn`, which makes `calls` kernel calls: replayed from a CUDA graph on CUDA (no
    launch gaps, as graphed decode), wall clock on the CPU (the interpreter: a smoke test only)."""
    if device.type != "cuda":
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) / calls
    graph, _ = capture(cast(Callable[[], torch.Tensor], fn), warmup=1)  # (its output is not kept)
    t = bench_common.cuda_time(graph.replay, iters=iters, warmup=2)
    del graph
    return t / calls


def time_eager(fn: Callable[[], object], device: torch.device, iters: int = 5) -> float:
    """Seconds per call without graphs (prefill: one call is milliseconds, launch cost is noise)."""
    if device.type != "cuda":
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    return bench_common.cuda_time(fn, iters=iters, warmup=1)
