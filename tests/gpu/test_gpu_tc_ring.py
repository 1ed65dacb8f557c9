"""gptq_tc's words by bulk copies (gemv_cuda.TC_TMA; gptq_tc.cu's kTma, sm_90): every chunk of a block's words comes
into shared memory by Hopper's bulk copies issued before the PDL wait, TC_TMA chunks a copy, instead of through the
register ring (scales, zeros and x keep theirs). The arithmetic is the register ring's, chunk for chunk in the same
order, so every form it serves (plain, split K, the gate | up pair where its blocks fit, the norm fold's producer and
consumer; 1-2 rows; sym and asym; with and without a bias) must give the register ring's outputs bit for bit (those
are held to the fp32 reference in test_gpu_gemv_cuda.py and test_gpu_norm_fold.py), eagerly and under CUDA graph
replay, at copies of 1, 3 (not dividing the chunks) and 8 chunks; row-major words keep the register ring."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from helpers import replayed

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9, reason="needs CUDA on sm_90+"
    ),
]
CUDA = torch.device("cuda", 0)


def _tiled_int4(K: int, N: int, asym: bool, g: torch.Generator):
    from worker.kernels.gemv import gemv_weights
    from worker.quant.gptq_format import tile_words

    qweight = torch.randint(-(2**31), 2**31 - 1, (K // 8, N), device=CUDA, dtype=torch.int32, generator=g)
    if asym:
        qzeros = torch.randint(-(2**31), 2**31 - 1, (K // 128, N // 8), device=CUDA, dtype=torch.int32, generator=g)
    else:
        qzeros = torch.full((K // 128, N // 8), 0x77777777, device=CUDA, dtype=torch.int32)
    scales = (torch.rand(K // 128, N, device=CUDA, generator=g) * 0.02 + 0.001).to(torch.bfloat16)
    w = gemv_weights(qweight, qzeros, scales, 4, 1, 128, 0)
    return dataclasses.replace(w, qweight=tile_words(w.qweight), tiled=True, counters=torch.zeros_like(w.counters))


@pytest.fixture
def flags(monkeypatch):
    """The launch flags of every gptq_tc call (the ring's bit and depth), recorded."""
    from worker.kernels import gemv_cuda

    lib = gemv_cuda.library(*torch.cuda.get_device_capability(CUDA))
    seen: list[int] = []
    real = lib.gptq_tc

    def spy(*args):
        seen.append(args[15])
        return real(*args)

    monkeypatch.setattr(lib, "gptq_tc", spy)
    return seen


def _forms(K: int, N: int, M: int, g: torch.Generator, bias: torch.Tensor | None):
    """(name, kwargs) of each gptq_tc form the ring serves at this shape."""
    residual = torch.randn(M, N, device=CUDA, generator=g).to(torch.bfloat16)
    weight = (torch.rand(N, device=CUDA, generator=g) + 0.5).to(torch.bfloat16)
    squares = torch.rand(M, 128, device=CUDA, generator=g) * K / 128
    forms = [
        ("plain", dict(b=bias)),
        ("split3", dict(b=bias, splits=3)),
        ("producer", dict(b=bias, norm_out=(residual, weight))),
        ("consumer", dict(b=bias, row_scale=(squares, 1e-6))),
    ]
    if N % 64 == 0:
        forms += [("pair", dict(b=bias, pair=True)), ("pair_consumer", dict(b=bias, pair=True, row_scale=(squares, 1e-6)))]
    return forms


def _run(x, w, kw):
    from worker.kernels.gemv_cuda import TC_COLS, cuda_gemv

    kw = dict(kw)
    b = kw.pop("b")
    out: list[torch.Tensor] = []
    if "norm_out" in kw:
        M, N = x.shape[0], w.scales.shape[1]
        sums = torch.full((M, N), float("nan"), device=CUDA, dtype=torch.bfloat16)
        squares = torch.full((M, -(-N // TC_COLS)), float("nan"), device=CUDA)
        kw.update(sums=sums, squares=squares)
        out = [sums, squares]
    return [cuda_gemv(x, w, b, pdl=True, tc=True, stage=False, **kw), *out]


@pytest.mark.parametrize("copy", [1, 3, 8])
@pytest.mark.parametrize("M", [1, 2])
@pytest.mark.parametrize(
    "K,N,asym,bias",
    [(4096, 12288, False, True), (11008, 4096, True, False), (640, 320, True, True), (2048, 22016, False, False)],
)  # fmt: skip
def test_bulk_copies_give_the_register_rings_bits(K, N, asym, bias, M, copy, flags, monkeypatch):
    from worker.kernels import gemv_cuda

    g = torch.Generator(device=CUDA).manual_seed(K + N + M + copy)
    w = _tiled_int4(K, N, asym, g)
    b = (torch.randn(N, device=CUDA, generator=g) * 0.5).to(torch.bfloat16) if bias else None
    x = torch.randn(M, K, device=CUDA, generator=g).to(torch.bfloat16)
    for name, kw in _forms(K, N, M, g, b):
        monkeypatch.setattr(gemv_cuda, "TC_TMA", 0)
        flags.clear()
        want = _run(x, w, kw)
        assert flags and not flags[-1] & gemv_cuda.LAUNCH_TMA, name
        monkeypatch.setattr(gemv_cuda, "TC_TMA", copy)
        flags.clear()
        got = _run(x, w, kw)
        # the pair's blocks hold both halves' words: three 4-warp blocks an SM fit up to K 2048 (64 chunks)
        if not name.startswith("pair") or K <= 2048:
            assert flags[-1] & gemv_cuda.LAUNCH_TMA and flags[-1] >> 8 == copy, (name, flags)
        for a, e in zip(got, want):
            assert torch.equal(a, e), (name, (a.float() - e.float()).abs().max().item())
        again = replayed(lambda: _run(x, w, kw))  # noqa: B023
        for a, e in zip(again, want):
            assert torch.equal(a, e), name
        assert not w.counters.any(), name  # split K's counters reset for the next launch


def test_row_major_words_keep_the_register_ring(flags, monkeypatch):
    """The copies take tiled words only (tiling needs whole 32-column tiles): row-major words keep the registers."""
    from worker.kernels import gemv_cuda
    from worker.kernels.gemv import gemv_weights

    g = torch.Generator(device=CUDA).manual_seed(5)
    qweight = torch.randint(-(2**31), 2**31 - 1, (80, 152), device=CUDA, dtype=torch.int32, generator=g)
    qzeros = torch.randint(-(2**31), 2**31 - 1, (5, 19), device=CUDA, dtype=torch.int32, generator=g)
    scales = (torch.rand(5, 152, device=CUDA, generator=g) * 0.02 + 0.001).to(torch.bfloat16)
    w = gemv_weights(qweight, qzeros, scales, 4, 1, 128, 0)
    x = torch.randn(1, 640, device=CUDA, generator=g).to(torch.bfloat16)
    monkeypatch.setattr(gemv_cuda, "TC_TMA", 4)
    y = gemv_cuda.cuda_gemv(x, w, None, pdl=True, tc=True, stage=False)
    assert flags and not flags[-1] & gemv_cuda.LAUNCH_TMA
    monkeypatch.setattr(gemv_cuda, "TC_TMA", 0)
    assert torch.equal(gemv_cuda.cuda_gemv(x, w, None, pdl=True, tc=True, stage=False), y)


def test_the_copies_fit_the_plans_blocks_in_shared_memory():
    """tc_tma_copy: TC_TMA where the plan's blocks an SM fit its shared memory with all their words (the 7B c_attn,
    attn.c_proj and mlp.c_proj), 0 (the register ring) where they do not (the 7B gate | up pair: 3 blocks of 128 KB)."""
    from worker.kernels import gemv_cuda as gc

    sms = torch.cuda.get_device_properties(CUDA).multi_processor_count
    old = gc.TC_TMA
    try:
        gc.TC_TMA = 4
        for n, k in ((12288, 4096), (4096, 4096), (4096, 11008)):
            per, _, warps = gc.plan_tc(n, k, sms, 1, stage=False)
            assert gc.tc_tma_copy(per, warps, False) == 4, (n, k)
            blocks = max(1, gc.TC_WARPS_PER_SM // warps)
            assert blocks * (gc.tc_tma_smem(per, warps, 8, False) + 1024) <= gc.SMEM_PER_SM
        assert gc.tc_tma_copy(4096 // 128, gc.plan_tc_pair(22016, 4096, sms), True) == 0
    finally:
        gc.TC_TMA = old
