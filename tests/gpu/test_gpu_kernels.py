"""The Triton attention backend on CUDA against TorchAttention / store_kv, at Qwen-7B shapes (32 heads,
head_dim 128, blocks of 16), in bf16 and fp16, plus CUDA-graph capture of decode. Timings:
scripts/bench_kernels.py --only attention.

Tolerances, on |ours - ref| <= tol * (1 + |ref|) with ref the fp32-math reference rounded to the
input dtype: bf16 2e-2, fp16 4e-3 (prefill rounds the softmax weights to the input dtype before the
P @ V product, as FlashAttention does; decode keeps them in fp32), fp32 1e-4.
Run: `pytest -q -m gpu tests/gpu/test_gpu_kernels.py`.
"""

from __future__ import annotations

import random

import pytest
import torch

from helpers import GPU_TRITON_MARKS, counted_calls, within

pytestmark = GPU_TRITON_MARKS
pytest.importorskip("triton")

from worker.engine.cuda_graphs import capture  # noqa: E402
from worker.kernels.triton_attention import Tiles  # noqa: E402
from worker.layers.attention import TorchAttention  # noqa: E402
from worker.layers.attention_triton import TritonAttention  # noqa: E402
from worker.layers.context import ForwardContext, Seqlen  # noqa: E402
from worker.ops import store_kv  # noqa: E402

HEADS, HEAD_DIM, BLOCK = 32, 128, 16
TOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 1e-4}
DTYPES = [torch.bfloat16, torch.float16]
CUDA = torch.device("cuda")


class Batch:
    """New tokens `new[i]` after `cached[i]` cached ones over shuffled blocks; unused cache rows are NaN."""

    def __init__(
        self,
        new: list[int],
        cached: list[int],
        dtype: torch.dtype,
        prefill: bool = True,
        seed: int = 0,
        spare_blocks: int = 3,
    ):
        g = torch.Generator(device=CUDA).manual_seed(seed)
        total = [c + n for c, n in zip(cached, new)]
        need = [-(-t // BLOCK) for t in total]
        num_blocks = sum(need) + spare_blocks
        free = list(range(num_blocks))
        random.Random(seed).shuffle(free)
        pad = free.pop()
        self.blocks = [[free.pop() for _ in range(n)] for n in need]
        width = max(need)
        self.tables = torch.tensor([b + [pad] * (width - len(b)) for b in self.blocks], dtype=torch.int32, device=CUDA)
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
        self.slots = torch.cat([self.slots_of(b, c, t) for b, (c, t) in enumerate(zip(cached, total))])
        store_kv(self.k, self.v, self.k_cache, self.v_cache, self.slots)
        seqlen = Seqlen.for_prefill(new, cached, device=CUDA)
        dummy = torch.zeros(T, HEAD_DIM // 2, device=CUDA)
        self.ctx = ForwardContext(
            is_prefill=prefill,
            positions=torch.zeros(T, dtype=torch.long, device=CUDA),
            slots=self.slots,
            block_tables=self.tables,
            seqlen=seqlen,
            cos=dummy,
            sin=dummy,
            logn=None,
            lm_head_indices=None,
        )
        self.scale = HEAD_DIM**-0.5

    def slots_of(self, b: int, start: int, stop: int) -> torch.Tensor:
        return torch.tensor(
            [self.blocks[b][p // BLOCK] * BLOCK + p % BLOCK for p in range(start, stop)], dtype=torch.long, device=CUDA
        )

    def attend(self, backend, cache: bool = True, **kw) -> torch.Tensor:
        kc, vc = (self.k_cache, self.v_cache) if cache else (None, None)
        return backend.attend(self.q, self.k, self.v, kc, vc, self.ctx, self.scale, **kw)


def decode_batch(contexts: list[int], dtype: torch.dtype, seed: int = 0) -> Batch:
    return Batch([1] * len(contexts), [c - 1 for c in contexts], dtype, prefill=False, seed=seed)


def close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.dtype == ref.dtype
    within(out, ref, TOL[dtype])


def contexts(n: int, top: int, seed: int) -> list[int]:
    r = random.Random(seed)
    return [1, top] + [r.randint(1, top) for _ in range(n - 2)]


@pytest.mark.parametrize("dtype", DTYPES)
def test_store(dtype):
    g = torch.Generator(device=CUDA).manual_seed(0)
    T, nb = 333, 64
    k, v = torch.randn(2, T, HEADS, HEAD_DIM, generator=g, device=CUDA).unbind(0)  # fp32 -> dtype cache
    slots = torch.randperm(nb * BLOCK, generator=g, device=CUDA)[:T]
    ours = [torch.randn(nb, BLOCK, HEADS, HEAD_DIM, generator=g, device=CUDA).to(dtype) for _ in range(2)]
    ref = [c.clone() for c in ours]
    TritonAttention().store(k, v, *ours, slots)
    store_kv(k, v, *ref, slots)
    assert torch.equal(ours[0], ref[0]) and torch.equal(ours[1], ref[1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,top", [(1, 4096), (7, 1000), (64, 4096)])
@pytest.mark.parametrize("num_splits", [None, 1, 16])
def test_decode(batch, top, num_splits, dtype):
    b = decode_batch(contexts(batch, top, seed=batch) if batch > 1 else [top], dtype, seed=batch)
    close(b.attend(TritonAttention(), num_splits=num_splits), b.attend(TorchAttention()), dtype)


# the loop variants scripts/tune_attention.py sweeps (Tiles.decode_*): pipelined loads, lanes, prefetch
VARIANTS = {
    "n64_s3": Tiles(decode_n=64, decode_stages=3),
    "n64_w8_lanes_s2": Tiles(decode_n=64, decode_warps=8, decode_lanes=True, decode_stages=2),
    "n32_prefetch_s2": Tiles(decode_n=32, decode_prefetch=True, decode_stages=2),
    "n128_w8_s2": Tiles(decode_n=128, decode_warps=8, decode_stages=2),
    "n32_lanes_prefetch": Tiles(decode_n=32, decode_lanes=True, decode_prefetch=True),
    "n64_s2_fused": Tiles(decode_n=64, decode_stages=2, decode_fused_reduce=True),  # the last split merges
    "together": Tiles(decode_newest_apart=False),  # the default loop, the newest key in a tile (not apart)
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("num_splits", [None, 1, 48])
def test_decode_variants(variant, num_splits):
    """8k and odd contexts, a one-token context (most of 48 splits empty), contexts whose newest key starts a tile
    (33, 513), in bf16."""
    b = decode_batch([1, 8192, 33, 5001, 513], torch.bfloat16, seed=11)
    out = b.attend(TritonAttention(tiles=VARIANTS[variant]), num_splits=num_splits)
    close(out, b.attend(TorchAttention()), torch.bfloat16)


@pytest.mark.parametrize("variant", ["n64_s3", "n64_w8_lanes_s2", "n32_prefetch_s2", "n64_s2_fused", "together"])
def test_decode_variants_fp8(variant):
    """fp8 caches (scales on the GPU, read in-kernel) against the reference over the same fp8 cache."""
    fp8 = torch.float8_e4m3fn
    b = decode_batch([3, 4000, 777], torch.bfloat16, seed=12)
    k_scale, v_scale = torch.tensor(0.05, device=CUDA), torch.tensor(0.02, device=CUDA)
    b.k_cache = (b.k_cache.float() * 4 / k_scale).clamp(-448, 448).to(fp8)
    b.v_cache = (b.v_cache.float() / v_scale).clamp(-448, 448).to(fp8)
    ref = b.attend(TorchAttention(), k_scale=k_scale, v_scale=v_scale)
    for splits in (None, 1, 16):
        out = b.attend(TritonAttention(tiles=VARIANTS[variant]), num_splits=splits, k_scale=k_scale, v_scale=v_scale)
        close(out, ref, torch.bfloat16)


PREFILL = {
    "fresh": ([1, 17, 300, 1024, 2000], [0] * 5),
    "suffix": ([1, 17, 300, 1024, 64], [100, 0, 3000, 7, 4000]),
    "many": ([33] * 40, [0, 5, 16, 100] * 10),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(PREFILL))
def test_prefill_paged(case, dtype):
    new, cached = PREFILL[case]
    b = Batch(new, cached, dtype, seed=len(case))
    close(b.attend(TritonAttention()), b.attend(TorchAttention()), dtype)


@pytest.mark.parametrize("dtype", DTYPES + [torch.float32])
@pytest.mark.parametrize("use_varlen", [True, False])
def test_prefill_without_cache(use_varlen, dtype):
    """torch's varlen_attn (bf16/fp16, when importable) and the Triton kernel reading k/v directly."""
    b = Batch([1, 17, 300, 1024, 2000, 3], [0] * 6, dtype, seed=9)
    ref = b.attend(TorchAttention(), cache=False)
    close(b.attend(TritonAttention(use_varlen_attn=use_varlen), cache=False), ref, dtype)


@pytest.mark.parametrize(
    "tiles",
    [Tiles(), VARIANTS["n64_w8_lanes_s2"], VARIANTS["n64_s2_fused"], VARIANTS["together"]],
    ids=["default", "lanes_pipelined", "fused_reduce", "newest_together"],
)
def test_decode_in_cuda_graph(tiles):
    """Fixed num_splits, captured once; new lengths and block tables written in place, then replayed."""
    dtype = torch.bfloat16
    b = decode_batch([1, 700, 33, 2048], dtype, seed=3)
    c = decode_batch([2048, 16, 1, 900], dtype, seed=4)  # same batch size, another state
    backend = TritonAttention(num_splits=8, tiles=tiles)
    static = decode_batch([2048] * 4, dtype, seed=5)  # widest table; caches large enough for both
    static.k_cache = torch.cat([b.k_cache, c.k_cache])
    static.v_cache = torch.cat([b.v_cache, c.v_cache])

    def load(src: Batch, offset: int) -> None:
        static.q.copy_(src.q)
        static.ctx.seqlen.input_lengths.copy_(src.ctx.seqlen.input_lengths)
        static.tables.zero_()
        static.tables[:, : src.tables.shape[1]].copy_(src.tables + offset)

    load(b, 0)
    graph, out = capture(lambda: static.attend(backend), warmup=1)  # compiled and warmed up outside the capture
    for src, offset in ((b, 0), (c, b.k_cache.shape[0])):
        load(src, offset)
        graph.replay()
        close(out, src.attend(TorchAttention()), dtype)


# ------------------------------------------------------------------ the CUDA decode kernel (DecodeKernels.attn_cuda)
def _spoil_newest(b: Batch) -> None:
    """The new rows' slots hold what an earlier step left there."""
    b.k_cache.view(-1, HEADS, HEAD_DIM)[b.slots] = 300.0
    b.v_cache.view(-1, HEADS, HEAD_DIM)[b.slots] = -300.0


def _cuda_backend() -> TritonAttention:
    from worker.kernels.paged_decode_cuda import library

    lib = library(*torch.cuda.get_device_capability())
    if isinstance(lib, str):
        pytest.skip(lib)
    backend = TritonAttention()
    backend.attn_cuda = True
    return backend


@pytest.mark.parametrize("form", [(8, 2), (4, 2), (4, 3), (4, 4)], ids=lambda f: f"{f[0]}x{f[1]}")
@pytest.mark.parametrize("block", [16, 32, 8])
def test_cuda_decode_matches_torch(block, form, monkeypatch):
    """Each form (the cluster's blocks, the chunks in flight a block) on contexts around the 32-key chunks and the
    blocks' shares (the first chunks read before the wait), long ones that loop past them, one key, and a padding
    row (0: output 0). The kernel is called directly: the backend takes it at batches of 1-2 only (MAX_BATCH)."""
    from worker.kernels import paged_decode_cuda

    _cuda_backend()
    monkeypatch.setattr(paged_decode_cuda, "form_for", lambda batch: form)
    lens = [1, 2, 31, 32, 33, 63, 64, 65, 100, 129, 385, 511, 512, 513, 700, 2048, 4097, 9000]
    b = Batch([1] * len(lens), [n - 1 for n in lens], torch.bfloat16, prefill=False, seed=block)

    def ours() -> torch.Tensor:
        n = b.ctx.seqlen.input_lengths
        return paged_decode_cuda.paged_decode_cuda(b.q, b.k_cache, b.v_cache, b.tables, n, b.scale)

    close(ours(), b.attend(TorchAttention()), torch.bfloat16)
    b.ctx.seqlen.input_lengths[3] = 0
    out = ours()
    assert torch.equal(out[3], torch.zeros_like(out[3]))


def test_cuda_decode_serves_batches_of_one_and_two(monkeypatch):
    """The backend with attn_cuda takes the CUDA kernel at 1-2 sequences below their LONG_CONTEXT length (2,047 tokens
    at two rows) and the Triton kernels at 3 sequences or from that length (2,048 at two rows)."""
    from worker.kernels import paged_decode_cuda

    backend = _cuda_backend()
    calls = counted_calls(monkeypatch, paged_decode_cuda, "paged_decode_cuda")
    for lens in ([700], [33, 2047], [5, 64, 513], [33, 2048]):
        b = decode_batch(lens, torch.bfloat16, seed=len(lens))
        close(b.attend(backend), b.attend(TorchAttention()), torch.bfloat16)
    assert calls == [1, 2]


def test_cuda_decode_preload_after_rope_store_in_cuda_graph(monkeypatch):
    """The CUDA kernel reads its first chunks before its PDL wait, all but the newest row, which RoPE + store (at
    pdl.EARLY, letting the attention launch before it waits itself) writes just before: with the newest rows' slots
    spoiled before every replay, replays equal the eager run bit for bit, and that the reference within bf16
    rounding."""
    from worker.kernels import pdl
    from worker.kernels.paged_decode_cuda import paged_decode_cuda
    from worker.kernels.rope_store import rotary_store_

    _cuda_backend()
    monkeypatch.setattr(pdl, "EARLY_GO", {"rope_store"})
    monkeypatch.setattr(pdl, "EARLY_MAX_ROWS", 8)  # served at one row; here 8 sequences (the kernel's 4 x 3 form)
    b = decode_batch([1, 700, 33, 2048, 17, 16, 512, 64], torch.bfloat16, seed=14)
    g = torch.Generator(device=CUDA).manual_seed(14)
    T = 8
    cos, sin = torch.rand(2, T, HEAD_DIM // 2, generator=g, device=CUDA).unbind(0)
    q0, k0, v0 = b.q.contiguous(), b.k.contiguous(), b.v.contiguous()
    q, k = torch.empty_like(q0), torch.empty_like(k0)
    lens = b.ctx.seqlen.input_lengths

    def step() -> torch.Tensor:
        q.copy_(q0)
        k.copy_(k0)
        rotary_store_(q, k, v0, cos, sin, None, b.k_cache, b.v_cache, b.slots, pdl=True)
        return paged_decode_cuda(q, b.k_cache, b.v_cache, b.tables, lens, b.scale, pdl=True)

    _spoil_newest(b)
    ref = step().clone()
    torch_ref = TorchAttention().attend(q, k, v0, b.k_cache, b.v_cache, b.ctx, b.scale)
    close(ref, torch_ref, torch.bfloat16)
    graph, out = capture(step, warmup=1)
    for _ in range(50):
        _spoil_newest(b)
        graph.replay()
        assert torch.equal(out, ref)


@pytest.mark.parametrize("form", [(8, 2), (4, 3)], ids=lambda f: f"{f[0]}x{f[1]}")
@pytest.mark.parametrize("with_logn", [False, True])
def test_cuda_decode_with_rope_equals_rope_store_then_decode(with_logn, form, monkeypatch):
    """kRope: from the raw q, k, v the kernel rotates (logn on q) and stores the new rows itself. Against RoPE + store
    (rope_store.rotary_store_) followed by the kernel without it: the same caches and outputs bit for bit, eager and
    replayed from a CUDA graph (PDL on), the newest rows' slots spoiled before each run; contexts whose newest key
    starts a chunk of its own (1, 33, 129, 257, 385, 513: at 8 x 2, 513 fills every block's share with cached keys)
    or shares one with cached keys, short and long (past the chunks read before the wait); one padded row (length 0,
    slot -1)."""
    from worker.kernels import paged_decode_cuda as pdc
    from worker.kernels.paged_decode_cuda import Rope, paged_decode_cuda
    from worker.kernels.rope_store import rotary_store_

    _cuda_backend()
    monkeypatch.setattr(pdc, "form_for", lambda batch: form)
    lens = [1, 700, 33, 2048, 17, 16, 512, 64, 9000, 5, 513, 385, 129, 257]
    b = decode_batch(lens, torch.bfloat16, seed=15)
    g = torch.Generator(device=CUDA).manual_seed(15)
    T = len(lens)
    cos, sin = (torch.rand(2, T, HEAD_DIM // 2, generator=g, device=CUDA) * 2 - 1).unbind(0)
    logn = (1 + torch.rand(T, generator=g, device=CUDA)) if with_logn else None
    b.ctx.seqlen.input_lengths[9] = 0
    slots = b.slots.clone()
    slots[9] = -1
    q0, k0, v0 = b.q.contiguous(), b.k.contiguous(), b.v.contiguous()
    q, k = torch.empty_like(q0), torch.empty_like(k0)
    tables, n = b.tables, b.ctx.seqlen.input_lengths

    def two_kernels() -> torch.Tensor:
        q.copy_(q0), k.copy_(k0)
        rotary_store_(q, k, v0, cos.contiguous(), sin.contiguous(), logn, b.k_cache, b.v_cache, slots, pdl=True)
        return paged_decode_cuda(q, b.k_cache, b.v_cache, tables, n, b.scale, pdl=True)

    rope = Rope(k0, v0, cos.contiguous(), sin.contiguous(), logn, slots)

    def one_kernel() -> torch.Tensor:
        return paged_decode_cuda(q0, b.k_cache, b.v_cache, tables, n, b.scale, pdl=True, rope=rope)

    def same_caches() -> bool:  # bit for bit (unused rows hold NaN)
        return torch.equal(b.k_cache.view(torch.int16), ref_k) and torch.equal(b.v_cache.view(torch.int16), ref_v)

    _spoil_newest(b)
    ref = two_kernels().clone()
    ref_k, ref_v = b.k_cache.view(torch.int16).clone(), b.v_cache.view(torch.int16).clone()
    _spoil_newest(b)
    out = one_kernel()
    assert torch.equal(out, ref) and same_caches()
    graph, out = capture(one_kernel, warmup=1)
    for _ in range(20):
        _spoil_newest(b)
        graph.replay()
        assert torch.equal(out, ref) and same_caches()
