"""The Triton attention kernels (through the `triton` backend) against their PyTorch references
(ops.store_kv, TorchAttention), on the CPU through the Triton interpreter.

Every case uses awkward sizes (one token, odd lengths, many sequences, contexts over many blocks),
shuffled non-contiguous block tables, and a cache whose unused rows are NaN: a kernel that reads a
row outside a sequence's context turns its output into NaN. fp32 and fp16 (the interpreter mishandles
bf16 loads; bf16 runs in tests/gpu).
"""

from __future__ import annotations

import os
import sys

import pytest

if "worker.kernels.triton_attention" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
    # kernels are bound to the interpreter (or not) when they are defined: here they were compiled for
    # the GPU by an earlier module (tests/gpu in the same session); run this file on its own instead
    pytest.skip("Triton kernels already compiled for the GPU in this session", allow_module_level=True)
os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere

import random  # noqa: E402

import torch  # noqa: E402

pytest.importorskip("triton")

from helpers import within  # noqa: E402
from worker.kernels.paged_decode import choose_num_splits  # noqa: E402
from worker.kernels.paged_prefill import prefill_tile_map  # noqa: E402
from worker.kernels.triton_attention import Tiles  # noqa: E402
from worker.layers.attention import TorchAttention  # noqa: E402
from worker.layers.attention_triton import TritonAttention  # noqa: E402
from worker.layers.context import ForwardContext, Seqlen  # noqa: E402
from worker.ops import store_kv  # noqa: E402

HEADS, HEAD_DIM, BLOCK = 2, 16, 8
TOL = {torch.float32: 2e-5, torch.float16: 2e-3}  # atol and rtol: fp16 outputs of O(1) are within ~2 ulp
# small tiles so that short sequences still span several query and key tiles
SMALL = dict(tiles=Tiles(prefill_m=16, prefill_n=16, decode_n=8))


class Batch:
    """A paged batch like the runner builds: new tokens `new[i]` after `cached[i]` cached ones, blocks
    drawn from a shuffled free list, the new tokens' K/V stored in the cache, unused cache rows NaN."""

    def __init__(
        self,
        new: list[int],
        cached: list[int],
        dtype: torch.dtype,
        *,
        heads: int = HEADS,
        head_dim: int = HEAD_DIM,
        block: int = BLOCK,
        prefill: bool = True,
        seed: int = 0,
    ):
        g = torch.Generator().manual_seed(seed)
        total = [c + n for c, n in zip(cached, new)]
        need = [-(-t // block) for t in total]
        num_blocks = sum(need) + 3
        free = list(range(num_blocks))
        random.Random(seed).shuffle(free)
        pad = free.pop()  # table padding points at a NaN block: reading past a sequence's blocks shows
        self.blocks = [[free.pop() for _ in range(n)] for n in need]
        width = max(need)
        self.tables = torch.tensor([b + [pad] * (width - len(b)) for b in self.blocks], dtype=torch.int32)
        shape = (num_blocks, block, heads, head_dim)
        self.k_cache = torch.full(shape, float("nan"), dtype=dtype)
        self.v_cache = torch.full(shape, float("nan"), dtype=dtype)
        flat_k, flat_v = self.k_cache.view(-1, heads, head_dim), self.v_cache.view(-1, heads, head_dim)
        for b, c in enumerate(cached):  # the cached prefix
            s = self.slots_of(b, 0, c, block)
            flat_k[s] = torch.randn(c, heads, head_dim, generator=g).to(dtype)
            flat_v[s] = torch.randn(c, heads, head_dim, generator=g).to(dtype)
        T = sum(new)
        qkv = (torch.randn(T, 3, heads, head_dim, generator=g) * 2).to(dtype)  # like c_attn(x).view(...)
        self.q, self.k, self.v = qkv.unbind(1)  # non-contiguous views, as in the model
        self.slots = torch.cat([self.slots_of(b, c, t, block) for b, (c, t) in enumerate(zip(cached, total))])
        store_kv(self.k, self.v, self.k_cache, self.v_cache, self.slots)
        seqlen = Seqlen.for_prefill(new, cached)
        positions = torch.cat([torch.arange(c, t) for c, t in zip(cached, total)])
        self.ctx = ForwardContext(
            is_prefill=prefill,
            positions=positions,
            slots=self.slots,
            block_tables=self.tables,
            seqlen=seqlen,
            cos=torch.ones(T, head_dim // 2),
            sin=torch.zeros(T, head_dim // 2),
            logn=None,
            lm_head_indices=None,
        )
        self.scale = head_dim**-0.5

    def slots_of(self, b: int, start: int, stop: int, block: int) -> torch.Tensor:
        return torch.tensor(
            [self.blocks[b][p // block] * block + p % block for p in range(start, stop)], dtype=torch.long
        )

    def attend(self, backend, cache: bool = True, **kw) -> torch.Tensor:
        kc, vc = (self.k_cache, self.v_cache) if cache else (None, None)
        return backend.attend(self.q, self.k, self.v, kc, vc, self.ctx, self.scale, **kw)


def close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.dtype == ref.dtype
    within(out, ref, TOL[dtype])


DTYPES = [torch.float32, torch.float16]


# ----------------------------------------------------------------------------------------- store
@pytest.mark.parametrize("heads,cache_dtype", [(2, torch.float32), (3, torch.float16)])
def test_store_matches_store_kv(heads, cache_dtype):
    g = torch.Generator().manual_seed(0)
    T, nb, bs = 13, 6, 8
    kv = torch.randn(T, 2, heads, HEAD_DIM, generator=g)  # fp32 rows into an fp16 cache: converts
    k, v = kv.unbind(1)
    slots = torch.randperm(nb * bs, generator=g)[:T]
    ours = [torch.randn(nb, bs, heads, HEAD_DIM, generator=g).to(cache_dtype) for _ in range(2)]
    ref = [c.clone() for c in ours]
    TritonAttention().store(k, v, *ours, slots)
    store_kv(k, v, *ref, slots)
    assert torch.equal(ours[0], ref[0]) and torch.equal(ours[1], ref[1])


def test_store_skips_padding_slots_and_applies_scale():
    g = torch.Generator().manual_seed(1)
    k, v = torch.randn(2, 5, HEADS, HEAD_DIM, generator=g).unbind(0)
    slots = torch.tensor([3, -1, 17, -1, 0])
    ours = [torch.zeros(4, BLOCK, HEADS, HEAD_DIM) for _ in range(2)]
    ref = [c.clone() for c in ours]
    TritonAttention().store(k, v, *ours, slots, k_scale=2.0, v_scale=0.5)
    keep = slots >= 0
    store_kv(k[keep] / 2.0, v[keep] / 0.5, *ref, slots[keep])
    torch.testing.assert_close(ours[0], ref[0])
    torch.testing.assert_close(ours[1], ref[1])


# --------------------------------------------------------------------------------------- prefill
PREFILL = {
    "one_token": ([1], [0]),
    "odd_lengths": ([1, 3, 17, 33], [0, 0, 0, 0]),
    "seven_seqs": ([5, 1, 20, 2, 9, 33, 4], [0] * 7),
    "suffix": ([1, 3, 17, 9, 33], [5, 0, 16, 31, 2]),
    "suffix_long_cache": ([2, 40], [70, 23]),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(PREFILL))
def test_prefill_paged_matches_torch(case, dtype):
    new, cached = PREFILL[case]
    b = Batch(new, cached, dtype, seed=len(case))
    close(b.attend(TritonAttention(**SMALL)), b.attend(TorchAttention()), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_without_cache_matches_torch(dtype):
    b = Batch([1, 3, 17, 33, 2], [0] * 5, dtype, seed=3)
    close(b.attend(TritonAttention(**SMALL), cache=False), b.attend(TorchAttention(), cache=False), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block,block_m,block_n,head_dim", [(8, 64, 8, 16), (32, 16, 16, 16), (16, 16, 32, 64)])
def test_prefill_tile_shapes(block, block_m, block_n, head_dim, dtype):
    """Key tiles smaller than, equal to and larger than a cache block; query tiles of 16 and 64 (fp32
    caps prefill tiles at 32 x 32)."""
    b = Batch([3, 17, 45], [19, 0, 6], dtype, block=block, head_dim=head_dim, seed=4)
    backend = TritonAttention(tiles=Tiles(prefill_m=block_m, prefill_n=block_n))
    close(b.attend(backend), b.attend(TorchAttention()), dtype)


def test_prefill_tile_map():
    cu = torch.tensor([0, 1, 1, 18, 50, 53], dtype=torch.int32)  # lengths 1, 0, 17, 32, 3
    seq, m = prefill_tile_map(cu, 53, 16)
    assert seq.numel() == 53 // 16 + 5
    pairs = [(s, t) for s, t in zip(seq.tolist(), m.tolist()) if s < 5]
    assert pairs == [(0, 0), (2, 0), (2, 1), (3, 0), (3, 1), (4, 0)]
    assert all(s == 5 for s in seq.tolist()[len(pairs) :])


# ---------------------------------------------------------------------------------------- decode
def decode_batch(contexts: list[int], dtype: torch.dtype, **kw) -> Batch:
    return Batch([1] * len(contexts), [c - 1 for c in contexts], dtype, prefill=False, **kw)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_splits", [None, 1, 3, 16])
def test_decode_matches_torch(num_splits, dtype):
    """Contexts of very different lengths in one batch; 16 splits leave most splits of short ones empty."""
    b = decode_batch([1, 2, 9, 100, 33, 64, 17], dtype, seed=5)
    close(b.attend(TritonAttention(**SMALL), num_splits=num_splits), b.attend(TorchAttention()), dtype)


@pytest.mark.parametrize("block,block_n,head_dim", [(8, 32, 16), (32, 8, 16), (16, 16, 64)])
def test_decode_tile_shapes(block, block_n, head_dim):
    b = decode_batch([1, 47, 130], torch.float32, block=block, head_dim=head_dim, seed=6)
    backend = TritonAttention(tiles=Tiles(decode_n=block_n), num_splits=4)
    close(b.attend(backend), b.attend(TorchAttention()), torch.float32)


def test_decode_empty_context_gives_zeros():
    """A padded row (context length 0, e.g. a CUDA-graph batch filled up) yields 0, not NaN, and leaves
    the other rows alone."""
    b = decode_batch([5, 1, 12], torch.float32, seed=7)
    ref = b.attend(TorchAttention())
    b.ctx.seqlen.input_lengths[1] = 0
    for splits in (1, 3):
        out = b.attend(TritonAttention(**SMALL), num_splits=splits)
        assert torch.equal(out[1], torch.zeros_like(out[1]))
        close(out[[0, 2]], ref[[0, 2]], torch.float32)


# the decode loop's variants (Tiles.decode_*): software-pipelined loads, per-row softmax lanes, register prefetch
VARIANTS = {
    "plain": Tiles(decode_n=8, decode_stages=1),
    "stages3": Tiles(decode_n=8, decode_stages=3),
    "lanes": Tiles(decode_n=8, decode_lanes=True, decode_stages=2),
    "prefetch": Tiles(decode_n=16, decode_prefetch=True, decode_stages=2),
    "lanes_prefetch": Tiles(decode_n=8, decode_lanes=True, decode_prefetch=True, decode_stages=1),
    "fused": Tiles(decode_n=8, decode_lanes=True, decode_fused_reduce=True),  # the last split merges
    # (the variants above fold the newest key in apart from the tiles, by the last split: the default) the newest key
    # in the tiles with the cached ones: per-row lanes and fused, and plain
    "together": Tiles(decode_n=8, decode_lanes=True, decode_fused_reduce=True, decode_newest_apart=False),
    "together_plain": Tiles(decode_n=8, decode_stages=1, decode_newest_apart=False),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_decode_variants_match_torch(variant):
    """Every loop variant on contexts shorter than one tile, odd lengths and 130 keys over 17 tiles, and whose newest
    key starts a tile (1, 9, 17, 33: but for the "together" variants it gets no tile); one split, a few, and more
    splits than some contexts have tiles (empty splits); a padding row gives 0."""
    b = decode_batch([1, 7, 130, 33, 64, 2, 17, 9], torch.float32, seed=8)
    ref = b.attend(TorchAttention())
    b.ctx.seqlen.input_lengths[5] = 0  # a padding row
    for splits in (1, 3, 16):
        out = b.attend(TritonAttention(tiles=VARIANTS[variant]), num_splits=splits)
        assert torch.equal(out[5], torch.zeros_like(out[5]))
        close(out[:5], ref[:5], torch.float32)
        close(out[6:], ref[6:], torch.float32)


@pytest.mark.parametrize("variant", ["plain", "lanes_prefetch"])
def test_decode_variants_fp16(variant):
    b = decode_batch([3, 61, 100], torch.float16, seed=9)
    out = b.attend(TritonAttention(tiles=VARIANTS[variant]), num_splits=5)
    close(out, b.attend(TorchAttention()), torch.float16)


@pytest.mark.parametrize("variant", ["plain", "lanes", "prefetch", "fused", "together"])
def test_decode_variants_fp8_cache_with_scales(variant):
    """fp8 (e4m3) caches with K and V scales (a tensor and a float) against the reference's dequantised
    attention over the same fp8 cache; NaN-coded unused rows stay NaN in fp8."""
    fp8 = torch.float8_e4m3fn
    b = decode_batch([1, 45, 97], torch.float32, seed=10)
    k_scale, v_scale = torch.tensor(0.05), 0.02
    b.k_cache = (b.k_cache * 4 / k_scale).clamp(-448, 448).to(fp8)  # K ~ 4, some values clamp
    b.v_cache = (b.v_cache / v_scale).clamp(-448, 448).to(fp8)
    ref = b.attend(TorchAttention(), k_scale=k_scale, v_scale=v_scale)
    for splits in (1, 4):
        out = b.attend(TritonAttention(tiles=VARIANTS[variant]), num_splits=splits, k_scale=k_scale, v_scale=v_scale)
        close(out, ref, torch.float32)


def test_fused_reduction_leaves_its_counters_at_zero():
    """The fused reduction's arrival counters (shared by every call of a backend, as a CUDA graph replays
    them) are back at 0 after each call, so the next call (another batch, other split counts) is right."""
    backend = TritonAttention(tiles=VARIANTS["fused"])
    for contexts, splits, seed in (([5, 90, 1], 4, 13), ([33, 2, 64, 17, 8], 16, 14), ([5, 90, 1], 4, 13)):
        b = decode_batch(contexts, torch.float32, seed=seed)
        close(b.attend(backend, num_splits=splits), b.attend(TorchAttention()), torch.float32)
        (counters,) = backend.workspace.buffers[torch.device("cpu")]
        assert counters.numel() >= len(contexts) * HEADS and not counters.any()


def test_choose_num_splits():
    # batch 1, 32 heads on 132 SMs, 4 programs per SM wanted: ceil(528 / 32) = 17 splits
    assert choose_num_splits(1, 32, 8192, 64, 132, max_splits=32, ctas_per_sm=4, min_tiles=2) == 17
    # batch 16: 512 programs per split, so 2 splits reach 528
    assert choose_num_splits(16, 32, 8192, 64, 132, max_splits=32, ctas_per_sm=4, min_tiles=2) == 2
    # a context of 100 keys has one tile of 64 (< min_tiles): one split
    assert choose_num_splits(1, 32, 100, 64, 132, max_splits=32, ctas_per_sm=4, min_tiles=2) == 1
    # 512 keys = 8 tiles of 64, at least 2 tiles per split: 4 splits
    assert choose_num_splits(1, 32, 512, 64, 132, max_splits=32, ctas_per_sm=4, min_tiles=2) == 4
    assert choose_num_splits(64, 32, 4096, 64, 132, max_splits=32, ctas_per_sm=4, min_tiles=2) == 1  # full already
    assert choose_num_splits(1, 1, 1 << 20, 64, 132, max_splits=32, ctas_per_sm=4, min_tiles=2) == 32  # the cap
    # Tiles carries the policy's knobs
    tiles = Tiles(decode_n=32, decode_ctas_per_sm=8, decode_min_tiles=4, decode_max_splits=64)
    assert tiles.decode_splits(1, 32, 1 << 15, 132) == 33
    assert tiles.decode_splits(1, 32, 256, 132) == 2


def test_tiles_parse():
    t = Tiles.parse("decode_n=128, decode_lanes=1,decode_prefetch=false,prefill_stages=4")
    assert (t.decode_n, t.decode_lanes, t.decode_prefetch, t.prefill_stages) == (128, True, False, 4)
    assert Tiles.parse("") == Tiles()
    for bad in ("decode_q=2", "decode_n", "decode_n=48", "decode_stages=0"):
        with pytest.raises(ValueError):
            Tiles.parse(bad)


# ----------------------------------------------------------------------------------------- model
def test_model_with_triton_backend_matches_torch_backend(tmp_path):
    """The tiny model over the paged driver (shuffled blocks of 4): prefill, decode, suffix prefill."""
    from helpers import TINY, write_checkpoint
    from paged import Paged
    from random_weights import random_checkpoint
    from worker.models.qwen import FlashQwenForCausalLM

    path = write_checkpoint(str(tmp_path / "ckpt"), TINY, random_checkpoint(TINY, 0))
    models = [
        FlashQwenForCausalLM.from_pretrained(path, dtype=torch.float32, backend=be, progress=False)
        for be in (TorchAttention(), TritonAttention(**SMALL))
    ]
    runners = [Paged(m, seed=2) for m in models]
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (1, 6, 19)]
    starts = [0, 0, 0]
    for step in range(3):  # prefill, decode, decode
        outs = [r.step([0, 1, 2], seqs, starts, [1.0] * 3, prefill=step == 0) for r in runners]
        for a, b in zip(*outs):
            torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
        starts = [len(s) for s in seqs]
        seqs = [s + [int(o[-1].argmax())] for s, o in zip(seqs, outs[0])]
    seqs[1] += [7, 8, 9, 10, 11]  # suffix prefill after a cached prefix
    outs = [r.step([0, 1, 2], seqs, starts, [1.0] * 3, prefill=True) for r in runners]
    for a, b in zip(*outs):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
