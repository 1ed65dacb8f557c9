"""The column-packed M = 1 GPTQ GEMV (worker/kernels/gemv_npack.py) against the dequantize-then-matmul
reference on the CPU through the Triton interpreter (fp32 and fp16; bf16 runs in scripts/gpu_check_gemv2.py):
the repacking itself against an independent bit-by-bit unpacking, Int4/Int8, act order (rows sorted into group
order at load, x permuted), sym and asym zeros, groups 32/64/128/none, row shards starting inside a tile, N
not a multiple of the tile, split-K with the fused reduction (counters back at zero), and refused inputs."""

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
from worker.kernels.gemv import gemv_weights  # noqa: E402
from worker.kernels.gemv_npack import NpackTiles, npack_gemv, npack_weights, pack_columns  # noqa: E402
from worker.kernels.gptq_reference import gptq_matmul_reference, group_order  # noqa: E402
from worker.quant.gptq_format import quantize_rtn  # noqa: E402

TOL = {torch.float32: 1e-5, torch.float16: 3e-3}
TILES = NpackTiles(block_w=4, block_k=16, num_warps=1)  # 32 (Int4) or 16 (Int8) columns a program


@pytest.mark.parametrize("bits", [4, 8])
def test_pack_columns_puts_column_j_nw_plus_w_in_value_j_of_word_w(bits):
    """Read back bit by bit from the format description: row k of the AutoGPTQ tensor is bits
    [bits · (k mod P), +bits) of word row k // P; the repacked word w of row k holds column j · N/P + w at
    bits [bits · j, +bits)."""
    p, k, n = 32 // bits, 16, 24
    qweight = torch.randint(-(2**31), 2**31 - 1, (k // p, n), dtype=torch.int64).to(torch.int32)
    cols = pack_columns(qweight, bits)
    assert cols.shape == (k, n // p) and cols.dtype == torch.int32
    for row in range(k):
        for col in range(n):
            want = (int(qweight[row // p, col]) >> (bits * (row % p))) & ((1 << bits) - 1)
            got = (int(cols[row, col % (n // p)]) >> (bits * (col // (n // p)))) & ((1 << bits) - 1)
            assert got == want, (row, col)


CASES = [  # (N, K, bits, group_size, act_order, sym, first row of the shard)
    (40, 328, 4, 128, False, False, 0),  # K ends inside a tile and a group, N = 1.25 tiles
    (48, 384, 4, 128, True, False, 0),
    (40, 456, 4, 64, False, True, 72),  # a row shard starting inside a tile (72 = 4.5 tiles)
    (24, 384, 8, 128, True, True, 0),
    (20, 296, 8, 32, False, False, 40),
    (32, 200, 4, -1, False, True, 0),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("n", "k", "bits", "gs", "act", "sym", "lo"), CASES)
def test_npack_gemv_matches_reference(n, k, bits, gs, act, sym, lo, dtype):
    g = torch.Generator().manual_seed(n + k)
    w = torch.randn(n, k, generator=g) / k**0.5
    q = quantize_rtn(w, bits, gs, sym=sym, perm=torch.randperm(k, generator=g) if act else None)
    p = 32 // bits
    qweight, g_idx = q.qweight[lo // p :], q.g_idx[lo:]
    x = torch.randn(1, k - lo, generator=g).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype)
    scales = q.scales.to(dtype)
    ref = gptq_matmul_reference(x, qweight, q.qzeros, scales, g_idx, bits, 1, bias)
    sorted_qw, perm = group_order(qweight, g_idx, bits)
    nw = npack_weights(gemv_weights(sorted_qw, q.qzeros, scales, bits, 1, gs, lo))
    assert (nw.zeros is None) == sym
    xp = x if perm is None else x[:, perm]
    for split in (1, 2, 3):
        out = npack_gemv(xp, nw, bias if split != 2 else None, tiles=TILES, split_k=split)
        assert out.dtype == dtype
        within(out, ref if split != 2 else ref - bias, TOL[dtype])
        assert int(nw.counters.abs().sum()) == 0


def test_bad_inputs_are_refused():
    q = quantize_rtn(torch.randn(24, 256), 4, 64, sym=False)
    nw = npack_weights(gemv_weights(q.qweight, q.qzeros, q.scales, 4, 1, 64, 0))
    with pytest.raises(ValueError, match="M = 1"):
        npack_gemv(torch.randn(2, 256), nw, tiles=TILES)
    with pytest.raises(ValueError, match=r"x \[1, 128\]"):
        npack_gemv(torch.randn(1, 128), nw, tiles=TILES)
    with pytest.raises(ValueError, match="must divide the group"):
        npack_gemv(torch.randn(1, 256), nw, tiles=NpackTiles(block_w=4, block_k=128, num_warps=1))
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_columns(torch.zeros(4, 12, dtype=torch.int32), 4)


def test_model_decode_of_one_sequence_through_npack_equals_the_reference_path(tmp_path, monkeypatch):
    """An Int4 act-order model, group 128, with build_gemv(npack=...): the 1-sequence decode step goes through
    the column-packed GEMV in every GPTQ layer, and prefill and decode logits equal the reference path's."""
    from gptq_helpers import gptq_checkpoint, prefill_and_decode
    from helpers import TINY
    from random_weights import random_checkpoint
    from worker.kernels import gemv_npack
    from worker.layers.quantized import _GPTQ
    from worker.models.qwen import FlashQwenForCausalLM

    cfg = {**TINY, "hidden_size": 256, "kv_channels": 64, "intermediate_size": 512, "seq_length": 16}
    path, _ = gptq_checkpoint(str(tmp_path / "q4"), cfg, random_checkpoint(cfg, seed=9), 4, 128, False, True)
    monkeypatch.setitem(gemv_npack.NPACK_TILES, "test", TILES)
    calls: list[int] = []
    real = gemv_npack.npack_gemv
    monkeypatch.setattr(gemv_npack, "npack_gemv", lambda *a, **k: calls.append(1) or real(*a, **k))
    outs = []
    for npack in (None, "test"):
        model = FlashQwenForCausalLM.from_pretrained(path, dtype=torch.float32, progress=False)
        layers = [m for m in model.modules() if isinstance(m, _GPTQ)]
        if npack:
            for m in layers:
                m.build_gemv(npack)
                assert m.gemv_m1 is not None and m.perm is not None
        outs.append(prefill_and_decode(model, [list(range(3, 14))]))
    assert len(calls) >= len(layers)  # the decode step's M = 1 rows took it in every layer
    for a, b in zip(*outs):
        within(b, a, 1e-5)
