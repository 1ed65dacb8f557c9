"""The Triton GPTQ kernels (worker/kernels/gptq.py) against the dequantize-then-matmul reference, on the
CPU through the Triton interpreter (fp32 and fp16; bf16 runs in tests/gpu): Int4/Int8, awkward M, N, K,
act order (g_idx gathers), row shards whose rows are not whole groups (k_offset), bias, split-K; every
decode knob of GemmTiles (FMA GEMV or tl.dot for M = 1, pipeline stages, split-K through fp32 planes summed
by one kernel or fp32 atomics, the one-zero/scale-per-group path and the g_idx path) at least once."""

from __future__ import annotations

import os
import sys
from dataclasses import replace

import pytest

if "worker.kernels.gptq" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton kernels already compiled for the GPU in this session", allow_module_level=True)
os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

pytest.importorskip("triton")

from helpers import within  # noqa: E402
from worker.kernels import gptq  # noqa: E402
from worker.kernels.gptq import GemmTiles, gptq_gemm, gptq_gemv, gptq_matmul_reference  # noqa: E402
from worker.quant.gptq_format import quantize_rtn  # noqa: E402

TOL = {torch.float32: 1e-5, torch.float16: 3e-3}
SMALL = GemmTiles(block_m=16, block_n=32, block_k=16, num_warps=4, num_stages=1)
FMA = GemmTiles(block_m=1, block_n=32, block_k=16, num_warps=4, num_stages=2, dot=False)


def _quant(n: int, k: int, bits: int, group_size: int, act_order: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) / k**0.5
    perm = torch.randperm(k, generator=g) if act_order else None
    return quantize_rtn(w, bits, group_size, sym=False, perm=perm)


CASES = [  # (M, N, K, bits, group_size, act_order)
    (1, 40, 72, 4, 24, False),
    (3, 56, 64, 8, 16, True),
    (7, 24, 96, 4, -1, False),
    (16, 40, 48, 4, 16, True),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("m", "n", "k", "bits", "gs", "act"), CASES)
def test_gemv_split_k_matches_reference(m, n, k, bits, gs, act, dtype):
    q = _quant(n, k, bits, gs, act, seed=m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1)).to(dtype)
    bias = torch.randn(n).to(dtype)
    args = (x, q.qweight, q.qzeros, q.scales.to(dtype), q.g_idx, bits, 1, bias)
    ref = gptq_matmul_reference(*args)
    for tiles in (SMALL, FMA):
        for split in (1, 3):
            out = gptq_gemv(*args, split_k=split, tiles=tiles)
            assert out.dtype == dtype
            within(out, ref, TOL[dtype])


@pytest.mark.parametrize(("m", "n", "k", "bits", "gs", "act"), [(37, 40, 72, 4, 24, False), (21, 24, 64, 8, 16, True)])
def test_gemm_matches_reference(m, n, k, bits, gs, act):
    q = _quant(n, k, bits, gs, act, seed=m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(2))
    args = (x, q.qweight, q.qzeros, q.scales, q.g_idx, bits, 1, None)
    within(gptq_gemm(*args, tiles=SMALL), gptq_matmul_reference(*args), TOL[torch.float32])


@pytest.mark.parametrize("bits", [4, 8])
def test_group_hint_on_a_row_shard_that_is_not_whole_groups(bits):
    """A row-parallel shard holds rows [48, 96) of a K=96, group 32 linear (1.5 groups): with the
    group_size hint the aligned tiles read one zero/scale row, else each row gathers through g_idx; both
    equal the reference, and a wrong k_offset would not."""
    q = _quant(24, 96, bits, 32, False, seed=3)
    p = 32 // bits
    rows = slice(48, 96)
    qweight, g_idx = q.qweight[48 // p : 96 // p], q.g_idx[rows]
    x = torch.randn(2, 48, generator=torch.Generator().manual_seed(4))
    args = (x, qweight, q.qzeros, q.scales.float(), g_idx, bits, 1, None)
    ref = gptq_matmul_reference(*args)
    for tiles in (SMALL, FMA, FMA_WIDE):
        for gs, off in ((32, 48), (0, 0)):
            within(gptq_gemv(*args, split_k=2, group_size=gs, k_offset=off, tiles=tiles), ref, TOL[torch.float32])
        wrong = gptq_gemv(*args, split_k=1, group_size=16, k_offset=0, tiles=tiles)  # aligned to 16, wrong groups
        assert (wrong - ref).abs().max() > 1e-3


FMA_WIDE = GemmTiles(block_m=1, block_n=16, block_k=32, num_stages=3, dot=False)  # 32 > 48 % 32: halved to 16


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dot", [False, True])
def test_every_decode_knob(bits, dot):
    """M in {1, 3} x {planes (1 stage), atomics (3 stages), serial planes (2 stages)} x {group hint, g_idx}
    x split {tiles.split_k = 2, 1, 99 (more than the K tiles: clamped)}, with bias, on N = 40 (a partial N
    tile) and K = 160 (a partial last K tile): each equals the reference (fp32, 1e-5)."""
    n, k = 40, 160
    q = _quant(n, k, bits, 32, False, seed=bits)
    g = torch.Generator().manual_seed(11)
    bias = torch.randn(n, generator=g)
    for m in (1, 3):
        x = torch.randn(m, k, generator=g)
        args = (x, q.qweight, q.qzeros, q.scales.float(), q.g_idx, bits, 1, bias)
        ref = gptq_matmul_reference(*args)
        for atomic, serial, stages in ((False, False, 1), (True, False, 3), (False, True, 2)):
            tiles = GemmTiles(16, 32, 32, 4, stages, split_k=2, dot=dot, atomic=atomic, serial=serial)
            for gs in (32, 0):
                for split in (None, 1, 99):
                    out = gptq_gemv(*args, split_k=split, group_size=gs, tiles=tiles)
                    within(out, ref, TOL[torch.float32])


def test_split_k_planes_are_deterministic_and_atomics_agree():
    """Planes summed by the second kernel and by each tile's last split (serial) are the same sums in the
    same order: equal bit for bit, twice (the serial counters reset themselves); atomics agree to 1e-6."""
    q = _quant(64, 256, 4, 64, False, seed=12)
    g = torch.Generator().manual_seed(13)
    x, bias = torch.randn(2, 256, generator=g), torch.randn(64, generator=g)
    for b in (None, bias):
        args = (x, q.qweight, q.qzeros, q.scales.float(), q.g_idx, 4, 1, b)
        ref = gptq_matmul_reference(*args)
        for dot in (False, True):
            planes = GemmTiles(16, 32, 32, 4, 2, split_k=8, dot=dot)
            a = gptq_gemv(*args, group_size=64, tiles=planes)
            assert torch.equal(a, gptq_gemv(*args, group_size=64, tiles=planes))
            within(a, ref, TOL[torch.float32])
            for _ in range(2):
                assert torch.equal(a, gptq_gemv(*args, group_size=64, tiles=replace(planes, serial=True)))
            assert not gptq._COUNTERS[-1].any()
            within(gptq_gemv(*args, group_size=64, tiles=replace(planes, atomic=True)), a, 1e-6)


def test_aligned_block_k_for_row_shards():
    assert gptq._aligned_block_k(128, 128, 2752, 8) == 64  # 7B mlp.c_proj at TP 4: offset 21.5 groups
    assert gptq._aligned_block_k(128, 128, 0, 8) == 128
    assert gptq._aligned_block_k(256, 128, 0, 8) == 128
    assert gptq._aligned_block_k(128, 128, 4, 8) == 128  # no aligned block_k >= 8: unchanged (g_idx path)
    assert gptq._aligned_block_k(128, 0, 0, 8) == 128


def test_decode_tiles_table_is_used(monkeypatch):
    """gptq_gemv without tiles takes decode_tiles' per-shape entry: a table entry that cannot run (block_k
    not a multiple of the 8 values of a word) raises, the default runs."""
    q = _quant(24, 64, 4, 32, False, seed=14)
    x = torch.randn(1, 64)
    args = (x, q.qweight, q.qzeros, q.scales.float(), q.g_idx, 4, 1, None)
    within(gptq_gemv(*args, group_size=32), gptq_matmul_reference(*args), TOL[torch.float32])
    monkeypatch.setitem(gptq.DECODE_TABLE, (4, 1, 64, 24), GemmTiles(1, 32, 12, dot=False))
    assert gptq.decode_tiles(4, 1, 64, 24).block_k == 12
    assert gptq.decode_tiles(4, 3, 64, 24) is gptq.DECODE
    with pytest.raises(ValueError, match="block_k 12"):
        gptq_gemv(*args, group_size=32)


def test_v2_zero_offset():
    q = _quant(16, 32, 4, 16, False, seed=5)
    x = torch.randn(1, 32)
    for off in (0, 1):
        args = (x, q.qweight, q.qzeros, q.scales.float(), q.g_idx, 4, off, None)
        for tiles in (SMALL, FMA):
            for gs in (16, 0):
                out = gptq_gemv(*args, split_k=2, group_size=gs, tiles=tiles)
                within(out, gptq_matmul_reference(*args), TOL[torch.float32])


def test_model_through_the_kernels_equals_the_reference_path(tmp_path):
    """Every GPTQ layer of an Int4 act-order model (and an Int8 one) switched to the kernels' entry point:
    prefill (GEMM) and one-token decode (GEMV) logits equal the dequantize-then-matmul path's."""
    from gptq_helpers import gptq_checkpoint
    from helpers import TINY
    from paged import Paged
    from random_weights import random_checkpoint
    from worker.kernels.gptq import gptq_matmul
    from worker.layers.quantized import _GPTQ
    from worker.models.qwen import FlashQwenForCausalLM

    cfg = {**TINY, "seq_length": 16}
    state = random_checkpoint(cfg, seed=8)
    for bits, act in ((4, True), (8, False)):
        path, _ = gptq_checkpoint(str(tmp_path / f"q{bits}"), cfg, state, bits, 32, False, act)
        outs = []
        for kernels in (False, True):
            model = FlashQwenForCausalLM.from_pretrained(path, dtype=torch.float32, progress=False)
            layers = [m for m in model.modules() if isinstance(m, _GPTQ)]
            assert len(layers) == 8 and all(m.group_hint == (0 if act else 32) for m in layers)
            if kernels:
                for m in layers:
                    m.matmul = gptq_matmul
            paged = Paged(model)
            prompts = [list(range(3, 22)), [5, 9]]
            out = paged.step([0, 1], prompts, [0, 0], [1.0, 1.0], True)
            seqs = [p + [7] for p in prompts]
            out += paged.step([0, 1], seqs, [len(s) - 1 for s in seqs], [1.0, 1.0], False)
            outs.append(out)
        for a, b in zip(*outs):
            within(b, a, 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("m", "n", "k"), [(1, 40, 72), (5, 24, 96), (16, 56, 48)])
def test_fp8_w8a16_kernel_matches_reference(m, n, k, dtype):
    from worker.kernels.fp8_matmul import w8a16_matmul, w8a16_reference
    from worker.quant.fp8 import quantize_rows

    g = torch.Generator().manual_seed(m)
    wq, ws = quantize_rows(torch.randn(n, k, generator=g))
    x, bias = torch.randn(m, k, generator=g).to(dtype), torch.randn(n, generator=g).to(dtype)
    ref = w8a16_reference(x, wq, ws[:, 0], bias)
    for split in (1, 2):
        within(w8a16_matmul(x, wq, ws[:, 0], bias, split_k=split, block_n=32, block_k=16), ref, TOL[dtype])
