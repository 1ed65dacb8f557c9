"""The GPTQ GEMV (worker/kernels/gemv.py) against the dequantize-then-matmul reference on the CPU through the
Triton interpreter (fp32 and fp16; bf16 runs in scripts/gpu_check_gemv.py): Int4/Int8, M 1..16, N not a
multiple of the tile, K not a multiple of the group, groups 32/64/128/none, act order (rows permuted at
load, x per call), sym (one zero) and asym zeros, row shards starting inside a tile, split-K with the fused
reduction (its counters must be back at zero after each call), M = 1 tiles of several groups and both M = 1
unpackings (shift and mask; M = 1 through tl.dot too); the dense
GEMV for float and e4m3 weights, and the float linears' per-shape, per-M choice of it."""

from __future__ import annotations

import os
import sys

import pytest

if "worker.kernels.gemv" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton kernels already compiled for the GPU in this session", allow_module_level=True)
os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

pytest.importorskip("triton")

from helpers import within  # noqa: E402
from worker.kernels.gemv import GemvTiles, gemv_weights, quant_gemv  # noqa: E402
from worker.kernels.gptq_reference import gptq_matmul_reference, group_order  # noqa: E402
from worker.quant.gptq_format import quantize_rtn  # noqa: E402

TOL = {torch.float32: 1e-5, torch.float16: 3e-3}


def _quant(n: int, k: int, bits: int, group_size: int, act_order: bool, sym: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) / k**0.5
    perm = torch.randperm(k, generator=g) if act_order else None
    return quantize_rtn(w, bits, group_size, sym=sym, perm=perm)


def _tiles(bits: int, group_size: int) -> GemvTiles:
    """The smallest legal tile (16 word rows), unless the group is smaller (then too small for M > 1)."""
    bk = 16 * (32 // bits)
    return GemvTiles(block_n=32, block_k=bk, num_warps=4, num_stages=1)


CASES = [  # (M, N, K, bits, group_size, act_order, sym)
    (1, 40, 328, 4, 128, False, False),  # K = 2.56 groups, N = 1.25 tiles
    (3, 56, 256, 8, 64, True, False),
    (1, 24, 384, 8, 128, True, True),
    (8, 48, 200, 4, -1, False, True),
    (16, 40, 256, 4, 128, True, False),
    (5, 24, 96, 8, 32, False, False),  # Int8 tile of 64 rows in groups of 32: not servable (see below)
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("m", "n", "k", "bits", "gs", "act", "sym"), CASES)
def test_gemv_matches_reference(m, n, k, bits, gs, act, sym, dtype):
    q = _quant(n, k, bits, gs, act, sym, seed=m + k)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(m, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype)
    scales = q.scales.to(dtype)
    ref = gptq_matmul_reference(x, q.qweight, q.qzeros, scales, q.g_idx, bits, 1, bias)
    qweight, perm = group_order(q.qweight, q.g_idx, bits)
    assert (perm is None) == (not act)
    w = gemv_weights(qweight, q.qzeros, scales, bits, 1, gs, 0)
    assert (w.zeros is None) == sym
    xp = x if perm is None else x[:, perm]
    tiles = _tiles(bits, gs)
    if gs != -1 and gs % tiles.block_k:
        with pytest.raises(ValueError, match="block_k"):
            quant_gemv(xp, w, bias, tiles=tiles)
        return
    for split in (1, 2, 3):
        unpack, dot = ("mask" if split == 2 else "shift"), split == 3  # dot: M = 1 through tl.dot as well
        tiles = GemvTiles(tiles.block_n, tiles.block_k, 4, 1, prefetch=split != 3, unpack=unpack, dot=dot)
        out = quant_gemv(xp, w, bias if split != 2 else None, tiles=tiles, split_k=split)
        assert out.dtype == dtype
        within(out, ref if split != 2 else ref - bias, TOL[dtype])
        assert int(w.counters.abs().sum()) == 0


@pytest.mark.parametrize(
    ("bits", "gs", "bk", "sym", "lo"),
    [(4, 32, 128, False, 0), (4, 64, 256, True, 0), (8, 32, 64, False, 96), (8, 16, 64, False, 0)],
)
def test_m1_tiles_holding_several_groups(bits, gs, bk, sym, lo):
    """M = 1 tiles of 2-4 whole groups (each word row takes its own group's scale and zero): K = 328 ends
    inside a tile and a group, a row shard may start inside a tile; split-K 1/2/3. Such tiles are too big for
    M > 1's single-group dot: M = 2 falls back to 16 word rows (or is refused where the group is smaller).
    Both M = 1 unpackings: "shift" (biased values, the bias taken off with the zeros) and "mask"."""
    k, n, p = 328 + lo, 40, 32 // bits
    q = _quant(n, k, bits, gs, False, sym, seed=bk + gs)
    qweight, g_idx = q.qweight[lo // p :], q.g_idx[lo:]
    x = torch.randn(2, k - lo, generator=torch.Generator().manual_seed(8))
    bias = torch.randn(n, generator=torch.Generator().manual_seed(9))
    ref = gptq_matmul_reference(x, qweight, q.qzeros, q.scales.float(), g_idx, bits, 1, bias)
    w = gemv_weights(qweight, q.qzeros, q.scales.float(), bits, 1, gs, lo)
    for split in (1, 2, 3):
        unpack = "mask" if split == 3 else "shift"
        tiles = GemvTiles(block_n=32, block_k=bk, num_warps=4, num_stages=1, prefetch=split != 2, unpack=unpack)
        within(quant_gemv(x[:1], w, bias, tiles=tiles, split_k=split), ref[:1], TOL[torch.float32])
        assert int(w.counters.abs().sum()) == 0
    if gs % (16 * p):
        with pytest.raises(ValueError, match="block_k"):
            quant_gemv(x, w, bias, tiles=tiles)
    else:
        within(quant_gemv(x, w, bias, tiles=tiles), ref, TOL[torch.float32])


@pytest.mark.parametrize("bits", [4, 8])
def test_bf16_x_read_as_int32_pairs(bits):
    """M = 1 with bf16 x reads x as int32 pairs (bit operations, which the interpreter runs exactly; scales fp32
    here): equal to the reference of the same bf16 values, for both unpackings, split-K 1 and 2."""
    q = _quant(40, 384, bits, 128, False, False, seed=11)
    x = torch.randn(1, 384, generator=torch.Generator().manual_seed(12)).to(torch.bfloat16)
    ref = gptq_matmul_reference(x.double(), q.qweight, q.qzeros, q.scales.double(), q.g_idx, bits, 1)
    w = gemv_weights(q.qweight, q.qzeros, q.scales.float(), bits, 1, 128, 0)
    for split, unpack in ((1, "shift"), (2, "mask")):
        tiles = GemvTiles(block_n=32, block_k=64, num_warps=4, num_stages=1, unpack=unpack)
        out = quant_gemv(x, w, tiles=tiles, split_k=split)
        assert out.dtype == torch.bfloat16
        within(out.double(), ref, 1e-2)


@pytest.mark.parametrize("bits", [4, 8])
def test_row_shard_starting_inside_a_tile(bits):
    """Rows [192, 448) of a K = 512, group 128 linear: the shard's first tile starts 64 rows before its
    first row (masked), tiles stay inside groups; a shard told the wrong offset reads the wrong groups."""
    q = _quant(24, 512, bits, 128, False, False, seed=3)
    p = 32 // bits
    lo, hi = 192, 448
    qweight, g_idx = q.qweight[lo // p : hi // p], q.g_idx[lo:hi]
    x = torch.randn(2, hi - lo, generator=torch.Generator().manual_seed(4))
    ref = gptq_matmul_reference(x, qweight, q.qzeros, q.scales.float(), g_idx, bits, 1)
    tiles = GemvTiles(block_n=32, block_k=128, num_warps=4, num_stages=1)
    for m in (1, 2):
        w = gemv_weights(qweight, q.qzeros, q.scales.float(), bits, 1, 128, lo)
        for split in (1, 2):
            within(quant_gemv(x[:m], w, tiles=tiles, split_k=split), ref[:m], TOL[torch.float32])
    wrong = gemv_weights(qweight, q.qzeros, q.scales.float(), bits, 1, 128, 0)
    assert (quant_gemv(x[:1], wrong, tiles=tiles) - ref[:1]).abs().max() > 1e-3


def test_bad_shapes_are_refused():
    q = _quant(16, 128, 4, 128, False, True, seed=5)
    w = gemv_weights(q.qweight, q.qzeros, q.scales.float(), 4, 1, 128, 0)
    with pytest.raises(ValueError, match="M <= 16"):
        quant_gemv(torch.randn(1, 120), w)
    with pytest.raises(ValueError, match="M <= 16"):
        quant_gemv(torch.randn(17, 128), w)


def test_model_decode_through_the_gemv_equals_the_reference_path(tmp_path):
    """Every GPTQ layer of an Int4 act-order model (rows permuted at load) and an Int8 sym one, group 128:
    with the GEMV built (as on CUDA) the 2-sequence decode step goes through it, and prefill and decode
    logits equal the dequantize-then-matmul path's."""
    from gptq_helpers import gptq_checkpoint, prefill_and_decode
    from helpers import TINY
    from random_weights import random_checkpoint
    from worker.kernels.gptq import gptq_matmul
    from worker.layers.quantized import _GPTQ
    from worker.models.qwen import FlashQwenForCausalLM

    cfg = {**TINY, "hidden_size": 256, "kv_channels": 64, "intermediate_size": 512, "seq_length": 16}
    state = random_checkpoint(cfg, seed=9)
    for bits, act in ((4, True), (8, False)):
        path, _ = gptq_checkpoint(str(tmp_path / f"q{bits}"), cfg, state, bits, 128, not act, act)
        outs = []
        for kernels in (False, True):
            model = FlashQwenForCausalLM.from_pretrained(path, dtype=torch.float32, progress=False)
            layers = [m for m in model.modules() if isinstance(m, _GPTQ)]
            assert len(layers) == 8 and all((m.perm is not None) == act and m.group_hint == 128 for m in layers)
            if kernels:
                for m in layers:
                    m.matmul = gptq_matmul
                    m.build_gemv()
                    assert m.gemv is not None and (m.gemv.zeros is None) == (not act)
            outs.append(prefill_and_decode(model, [list(range(3, 14)), [5, 9]]))
        for a, b in zip(*outs):
            within(b, a, 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("m", "n", "k"), [(1, 40, 200), (3, 24, 520), (8, 56, 64), (16, 40, 136)])
def test_dense_gemv_matches_linear(m, n, k, dtype):
    """The float GEMV (weight [N, K], split-K, prefetch on and off) equals F.linear in fp64, bias or not,
    and leaves its counters at zero."""
    from worker.kernels.gemv import counters_for
    from worker.kernels.gemv_dense import dense_gemv

    g = torch.Generator().manual_seed(m + n)
    x, w, b = (torch.randn(*s, generator=g).to(dtype) for s in ((m, k), (n, k), (n,)))
    counters = counters_for(n, x.device)
    for split, bias, prefetch in ((1, b, True), (2, None, False), (3, b, True)):
        tiles = GemvTiles(block_n=16, block_k=64, num_warps=4, num_stages=1, prefetch=prefetch)
        out = dense_gemv(x, w, bias, counters, tiles=tiles, split_k=split)
        ref = torch.nn.functional.linear(x.double(), w.double(), None if bias is None else bias.double())
        assert out.dtype == dtype
        within(out, ref, TOL[dtype])
        assert int(counters.abs().sum()) == 0
    with pytest.raises(ValueError, match="M <= 16"):
        dense_gemv(x, w.t().contiguous().t())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("m", "n", "k"), [(1, 40, 200), (3, 24, 520)])
def test_fp8_gemv_matches_w8a16_reference(m, n, k, dtype):
    """e4m3 weights with a scale per row through the dense GEMV (every named tile, split-K 1 and 3, bias or
    not) equal the dequantize-then-matmul reference; "splitk" names the previous kernel."""
    from worker.kernels.fp8_matmul import FP8_GEMV_TILES, w8a16_gemv, w8a16_reference
    from worker.kernels.gemv_dense import dense_gemv
    from worker.quant.fp8 import quantize_rows

    g = torch.Generator().manual_seed(m + k)
    wq, ws = quantize_rows(torch.randn(n, k, generator=g))
    x, b = torch.randn(m, k, generator=g).to(dtype), torch.randn(n, generator=g).to(dtype)
    ref = w8a16_reference(x.double(), wq, ws[:, 0].double(), b.double())
    for name, tiles in FP8_GEMV_TILES.items():
        within(w8a16_gemv(x, wq, ws[:, 0], b, tiles=name), ref, TOL[dtype])
        if tiles is not None:
            small = GemvTiles(tiles.block_n, 64, num_warps=4, num_stages=1, prefetch=tiles.prefetch)
            out = dense_gemv(x, wq, None, None, small, split_k=3, scale=ws[:, 0])
            within(out, ref - b.double(), TOL[dtype])


def test_dense_plan_picks_tiles_per_shape_and_m():
    """The measured choices: c_attn (4096 x 12288) up to M = 8 with one tile, w2|w1 (4096 x 22016) with
    another above M = 1, the c_proj shapes never (cuBLAS)."""
    from worker.kernels.gemv_dense import DENSE_N64, DENSE_PF0, dense_tiles

    assert [dense_tiles(4096, 12288, m) for m in (1, 8, 9)] == [DENSE_PF0, DENSE_PF0, None]
    assert [dense_tiles(4096, 22016, m) for m in (1, 2, 8, 9)] == [DENSE_PF0, DENSE_N64, DENSE_N64, None]
    assert dense_tiles(4096, 4096, 1) is None and dense_tiles(11008, 4096, 1) is None


def test_float_linears_take_the_gemv_only_for_decode_batches_of_a_chosen_shape(monkeypatch):
    """A column and a row linear given GEMV counters (as for a DENSE_GEMV_PLAN shape on CUDA) answer the M its
    plan lists through the kernel with that M's tiles and other M through F.linear, all equal to the fp64
    product."""
    import worker.kernels.gemv as gemv
    import worker.kernels.gemv_dense as gemv_dense
    from worker.distributed import ParallelContext
    from worker.layers.linear import ColumnParallelLinear, RowParallelLinear, _gemv_counters

    calls: list[tuple[int, int]] = []
    kernel = gemv_dense.dense_gemv
    small, wide = GemvTiles(16, 32, 4, 1), GemvTiles(32, 16, 4, 1)

    def spy(x, w, bias, counters, tiles, **kw):
        calls.append((x.shape[0], tiles.block_n))
        return kernel(x, w, bias, counters, tiles, **kw)

    monkeypatch.setattr(gemv_dense, "dense_gemv", spy)
    monkeypatch.setitem(gemv_dense.DENSE_GEMV_PLAN, (64, 48), ((1, small), (4, wide)))
    pctx = ParallelContext(device=torch.device("cpu"))
    assert _gemv_counters(64, 48, pctx.device) is None  # the CPU always takes F.linear
    col = ColumnParallelLinear(64, [48], True, pctx, torch.float32)
    row = RowParallelLinear(64, 48, False, pctx, torch.float32)
    g = torch.Generator().manual_seed(6)
    for layer in (col, row):
        layer.weight.data.copy_(torch.randn(48, 64, generator=g))
        layer.gemv_counters = gemv.counters_for(48, pctx.device)
    assert col.bias is not None
    col.bias.data.copy_(torch.randn(48, generator=g))
    for m in (1, 4, 8, 9):
        x = torch.randn(m, 64, generator=g)
        within(col(x), x.double() @ col.weight.double().t() + col.bias.double(), 1e-5)
        within(row.partial(x), x.double() @ row.weight.double().t(), 1e-5)
    assert calls == [(1, 16), (1, 16), (4, 32), (4, 32)]


def test_gptq_layers_launch_their_gemv_with_the_model_decode_kernels(tmp_path, monkeypatch):
    """DecodeKernels(pdl=True) given to the model reaches every GPTQ layer's decode GEMV (the served default on
    sm_90+; worker/kernels/pdl.py makes it a plain launch where PDL is unavailable, as here)."""
    from gptq_helpers import gptq_checkpoint, prefill_and_decode
    from helpers import TINY
    from random_weights import random_checkpoint
    from worker.kernels import gemv
    from worker.kernels.gptq import gptq_matmul
    from worker.layers.decode_kernels import DecodeKernels, apply_decode_kernels
    from worker.layers.quantized import _GPTQ
    from worker.models.qwen import FlashQwenForCausalLM

    cfg = {**TINY, "hidden_size": 256, "kv_channels": 64, "intermediate_size": 512, "seq_length": 16}
    path, _ = gptq_checkpoint(str(tmp_path / "q4"), cfg, random_checkpoint(cfg, seed=3), 4, 128, True, False)
    model = FlashQwenForCausalLM.from_pretrained(path, dtype=torch.float32, progress=False)
    for m in model.modules():
        if isinstance(m, _GPTQ):
            m.matmul = gptq_matmul
            m.build_gemv()
    real, seen = gemv.quant_gemv, []

    def spy(x, w, bias=None, tiles=None, split_k=None, pdl=False):
        seen.append(pdl)
        return real(x, w, bias, tiles, split_k, pdl)

    monkeypatch.setattr(gemv, "quant_gemv", spy)
    apply_decode_kernels(model.transformer, DecodeKernels(pdl=True))
    prefill_and_decode(model, [list(range(3, 14)), [5, 9]])
    assert len(seen) == 8 and all(seen)  # 4 GPTQ layers x 2 blocks, decode step only
    seen.clear()
    apply_decode_kernels(model.transformer, DecodeKernels())
    prefill_and_decode(model, [list(range(3, 14)), [5, 9]])
    assert len(seen) == 8 and not any(seen)
