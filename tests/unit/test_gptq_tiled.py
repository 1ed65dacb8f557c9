"""The tiled Int4 word layout (DecodeKernels.gptq_tiled): gptq_format.tile_words against the address the CUDA kernels
compute (written here from its description), the Triton matmuls reading it under the interpreter (the same values as
row-major words, bit for bit: only addresses change), and the GPTQ layer re-laying its words in place and handing the
layout to every path (the CUDA kernels faked; their bits are tests/gpu/test_gpu_gemv_cuda.py's)."""

from __future__ import annotations

import os
import sys

import pytest

if "worker.kernels.gptq" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton kernels already compiled for the GPU in this session", allow_module_level=True)
os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

pytest.importorskip("triton")

from worker.kernels import gemv_cuda  # noqa: E402
from worker.kernels.gptq import GemmTiles, gptq_dequantize, gptq_gemm, gptq_gemv, gptq_matmul_reference  # noqa: E402
from worker.quant.gptq_format import quantize_rtn, tile_words, untile_words  # noqa: E402

SMALL = GemmTiles(block_m=16, block_n=32, block_k=16, num_warps=4, num_stages=1)


def _address(r: int, n: int, rows: int) -> int:
    """Where word (r, n) of a [rows, N] matrix lives tiled: 32-column tiles, each a run of 128-row chunks (16 words
    down), each chunk 4 steps of 4 words down, a step's 32 lanes (g = column // 4 within the tile, t = row within the
    step) 16 bytes each, lane 4g + t."""
    tile, chunk, step, t = n // 32, r // 16, r % 16 // 4, r % 4
    g, j = n % 32 // 4, n % 4
    lane = 4 * g + t
    return ((tile * (rows // 16) + chunk) * 4 + step) * 128 + lane * 4 + j


@pytest.mark.parametrize(("rows", "cols"), [(16, 32), (48, 96), (32, 160)])
def test_tile_words_puts_each_word_where_the_kernels_read_it(rows, cols):
    words = torch.arange(rows * cols, dtype=torch.int32).reshape(rows, cols)
    flat = tile_words(words).flatten()
    want = torch.empty_like(flat)
    for r in range(rows):
        for n in range(cols):
            want[_address(r, n, rows)] = words[r, n]
    assert torch.equal(flat, want)
    assert torch.equal(untile_words(tile_words(words)), words)


def test_tile_words_refuses_shapes_that_do_not_tile():
    for shape in [(8, 32), (16, 40), (32,)]:
        with pytest.raises(ValueError, match="multiple of 16"):
            tile_words(torch.zeros(shape, dtype=torch.int32))


def _case(n: int, k: int, group_size: int, act: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) / k**0.5
    perm = torch.randperm(k, generator=g) if act else None
    return quantize_rtn(w, 4, group_size, sym=False, perm=perm)


@pytest.mark.parametrize(
    ("m", "n", "k", "gs", "act"), [(1, 64, 256, 128, False), (3, 96, 384, 32, True), (20, 32, 128, -1, False)]
)
def test_triton_matmuls_read_tiled_words_as_row_major(m, n, k, gs, act):
    q = _case(n, k, gs, act, seed=m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(5))
    bias = torch.randn(n)
    tiled = tile_words(q.qweight)
    assert not torch.equal(tiled, q.qweight)
    rows = (q.qzeros, q.scales, q.g_idx, 4, 1, bias)
    for split in (1, 2):
        want = gptq_gemv(x, q.qweight, *rows, split_k=split, tiles=SMALL)
        assert torch.equal(gptq_gemv(x, tiled, *rows, split_k=split, tiles=SMALL, tiled=True), want)
    assert torch.equal(gptq_gemm(x, tiled, *rows, tiles=SMALL, tiled=True), gptq_gemm(x, q.qweight, *rows, tiles=SMALL))
    w = gptq_dequantize(q.qweight, q.qzeros, q.scales, q.g_idx, 4, 1, dtype=torch.float32, block_k=16, block_n=32)
    w_tiled = gptq_dequantize(tiled, q.qzeros, q.scales, q.g_idx, 4, 1, dtype=torch.float32, block_k=16, block_n=32,
                              tiled=True)  # fmt: skip
    assert torch.equal(w_tiled, w)
    assert torch.equal(gptq_matmul_reference(x, tiled, *rows, tiled=True), gptq_matmul_reference(x, q.qweight, *rows))


def test_tiled_words_are_int4_that_tile():
    q = _case(40, 128, 128, False, seed=1)
    with pytest.raises(ValueError, match="tiled words"):
        gptq_gemv(torch.zeros(1, 128), q.qweight, q.qzeros, q.scales, q.g_idx, 4, tiled=True)  # 40 columns


def _layer(row: bool = False, bits: int = 4):
    from worker.distributed import ParallelContext
    from worker.kernels.gemv import gemv_weights
    from worker.layers.quantized import GPTQColumnParallelLinear, GPTQRowParallelLinear
    from worker.quant.config import GPTQConfig

    cpu = ParallelContext(device=torch.device("cpu"))
    quant = GPTQConfig(bits, 128, True, False, "test")
    n = 128 if row else 256
    layer = (
        GPTQRowParallelLinear(256, n, False, cpu, torch.bfloat16, quant)
        if row
        else GPTQColumnParallelLinear(256, [n], False, cpu, torch.bfloat16, quant)
    )
    q = quantize_rtn(torch.randn(n, 256, generator=torch.Generator().manual_seed(3)) / 16, bits, 128, sym=True)
    layer._copy(q.qweight, q.qzeros, q.scales, q.g_idx, 0)
    # as build_gemv leaves it on a GPU
    layer.gemv = gemv_weights(layer.qweight, layer.qzeros, layer.scales, bits, quant.zero_offset, 128, 0)
    return layer, q


def _fake_cuda(monkeypatch):
    calls: list[dict[str, object]] = []

    def fake(x, w, b, pdl=False, mma=False, tc=False, stage=True, act=False, pair=False):
        calls.append(dict(rows=x.shape[0], tiled=w.tiled, tc=tc, mma=mma, stage=stage, act=act))
        return torch.zeros(x.shape[0], w.qweight.shape[1], dtype=x.dtype)

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(gemv_cuda, "library", lambda major, minor: object())  # built
    monkeypatch.setattr(gemv_cuda, "cuda_gemv", fake)
    return calls


def test_the_layer_tiles_its_words_in_place_and_every_path_reads_them(monkeypatch):
    """gptq_tiled with gptq_cuda, gptq_tc and gptq_mma: qweight tiled in place, the decode kernels get tiled weights
    (one row: gptq_tc; five: gptq_mma), a prefill-sized matmul the same values as row-major; without it (or without
    gptq_mma, whose steps the Triton GEMV would then take) the words go back to row-major."""
    from worker.layers.decode_kernels import DecodeKernels

    calls = _fake_cuda(monkeypatch)
    layer, q = _layer()
    x = torch.randn(60, 256, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    want = layer(x)
    served = dict(gptq_cuda=True, gptq_tc=True, gptq_mma=True)
    layer.set_decode_kernels(DecodeKernels(**served, gptq_tiled=True))
    assert layer.tiled and layer.gemv.tiled
    assert torch.equal(layer.qweight, tile_words(q.qweight))
    assert torch.equal(layer(x), want)  # 60 rows: the matmul, told the layout
    layer(x[:1])
    layer(x[:5])
    assert [(c["rows"], c["tiled"], c["tc"], c["mma"]) for c in calls] == [
        (1, True, True, False),
        (5, True, False, True),
    ]
    for off in (DecodeKernels(**served), DecodeKernels(gptq_cuda=True, gptq_tc=True, gptq_tiled=True)):
        layer.set_decode_kernels(DecodeKernels(**served, gptq_tiled=True))
        layer.set_decode_kernels(off)
        assert not layer.tiled and not layer.gemv.tiled and torch.equal(layer.qweight, q.qweight)
    assert torch.equal(layer(x), want)


def test_int8_words_stay_row_major(monkeypatch):
    from worker.layers.decode_kernels import DecodeKernels

    _fake_cuda(monkeypatch)
    layer, q = _layer(bits=8)
    layer.set_decode_kernels(DecodeKernels(gptq_cuda=True, gptq_tc=True, gptq_mma=True, gptq_tiled=True))
    assert not layer.tiled and torch.equal(layer.qweight, q.qweight)


def test_the_activation_at_one_row_takes_gptq_tc_when_tiled(monkeypatch):
    """gptq_act's one-row product runs on the FMA GEMV, which reads row-major words only: tiled, gptq_tc (x staged)."""
    from worker.layers.decode_kernels import DecodeKernels

    calls = _fake_cuda(monkeypatch)
    layer, _ = _layer(row=True)
    gate_up = torch.zeros(1, 512, dtype=torch.bfloat16)
    for tiled in (False, True):
        layer.set_decode_kernels(DecodeKernels(gptq_cuda=True, gptq_tc=True, gptq_mma=True, gptq_act=True,
                                               gptq_tiled=tiled))  # fmt: skip
        layer.forward_act(gate_up)
    assert [(c["tiled"], c["tc"], c["act"]) for c in calls] == [(False, False, True), (True, True, True)]
