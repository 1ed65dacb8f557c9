"""The Triton GPTQ kernels (worker/kernels/gptq.py) against the dequantize-then-matmul reference, on the
CPU through the Triton interpreter (fp32 and fp16; bf16 runs in tests/gpu): Int4/Int8, awkward M, N, K,
act order (g_idx gathers), row shards whose rows are not whole groups (k_offset), bias, split-K."""

from __future__ import annotations

import os
import sys

import pytest

if "worker.kernels.gptq" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton kernels already compiled for the GPU in this session", allow_module_level=True)
os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

pytest.importorskip("triton")

from helpers import within  # noqa: E402
from worker.kernels.gptq import GemmTiles, gptq_gemm, gptq_gemv, gptq_matmul_reference  # noqa: E402
from worker.quant.gptq_format import quantize_rtn  # noqa: E402

TOL = {torch.float32: 1e-5, torch.float16: 3e-3}
SMALL = GemmTiles(block_m=16, block_n=32, block_k=16, num_warps=4, num_stages=1)


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
    for split in (1, 3):
        out = gptq_gemv(*args, split_k=split, tiles=SMALL)
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
    for gs, off in ((32, 48), (0, 0)):
        within(gptq_gemv(*args, split_k=2, group_size=gs, k_offset=off, tiles=SMALL), ref, TOL[torch.float32])
    wrong = gptq_gemv(*args, split_k=1, group_size=16, k_offset=0, tiles=SMALL)  # tiles aligned to 16, wrong groups
    assert (wrong - ref).abs().max() > 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("n", "k", "bits", "gs", "act"), [(40, 72, 4, 24, False), (56, 64, 8, 16, True),
                                                          (24, 96, 4, -1, False), (136, 48, 4, 16, True)])  # fmt: skip
def test_dequantize_equals_the_reference_bit_for_bit(n, k, bits, gs, act, dtype):
    """gptq_dequantize's W is the reference's `dequantize` exactly (each value (q - z) · s in fp32, rounded once):
    awkward N and K against the tiles, act order (g_idx), no grouping, the group hint where tiles align; and on a
    row shard that is not whole groups (k_offset) with the hint."""
    from worker.kernels.gptq import gptq_dequantize
    from worker.quant.gptq_format import dequantize

    q = _quant(n, k, bits, gs, act, seed=n + k)
    scales = q.scales.to(dtype)
    want = dequantize(q.qweight, q.qzeros, scales, q.g_idx, bits, 1, dtype)
    for block_k, block_n in ((16, 32), (32, 64)):
        got = gptq_dequantize(q.qweight, q.qzeros, scales, q.g_idx, bits, 1, dtype=dtype, block_k=block_k,
                              block_n=block_n)  # fmt: skip
        assert got.shape == (k, n) and got.dtype == dtype and torch.equal(got, want)
    if not act and gs > 0 and gs % 16 == 0:
        got = gptq_dequantize(q.qweight, q.qzeros, scales, q.g_idx, bits, 1, gs, 0, dtype, block_k=16, block_n=32)
        assert torch.equal(got, want)
    if not act and gs == 24:  # rows [48, 72) of groups of 24 read with the hint at tiles of 8 rows
        p = 32 // bits
        got = gptq_dequantize(q.qweight[48 // p :], q.qzeros, scales, q.g_idx[48:], bits, 1, gs, 48, dtype,
                              block_k=8, block_n=32)  # fmt: skip
        assert torch.equal(got, want[48:])


@pytest.mark.parametrize(("m", "bits", "act"), [(17, 4, False), (37, 8, True)])
def test_matmul_above_16_rows_dequantizes_then_multiplies(monkeypatch, m, bits, act):
    """gptq_matmul: up to 16 rows the split-K kernel (within fp32 rounding of the reference), above that W dequantized
    once, a dense matmul and the bias add: the reference's own operations, so its values exactly."""
    from worker.kernels import gptq

    q = _quant(40, 64, bits, 16, act, seed=m)
    bias = torch.randn(40)
    calls = []
    real = gptq.gptq_dequantize
    monkeypatch.setattr(gptq, "gptq_dequantize", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    for rows in (16, m):
        x = torch.randn(rows, 64, generator=torch.Generator().manual_seed(rows))
        args = (x, q.qweight, q.qzeros, q.scales, q.g_idx, bits, 1, bias)
        out, ref = gptq.gptq_matmul(*args, group_size=0 if act else 16), gptq_matmul_reference(*args)
        within(out, ref, TOL[torch.float32])
        assert len(calls) == (rows > 16) and (rows <= 16 or torch.equal(out, ref))


def test_v2_zero_offset():
    q = _quant(16, 32, 4, 16, False, seed=5)
    x = torch.randn(1, 32)
    for off in (0, 1):
        args = (x, q.qweight, q.qzeros, q.scales.float(), q.g_idx, 4, off, None)
        within(gptq_gemv(*args, split_k=2, tiles=SMALL), gptq_matmul_reference(*args), TOL[torch.float32])


def test_model_through_the_kernels_equals_the_reference_path(tmp_path):
    """Every GPTQ layer of an Int4 act-order model (and an Int8 one) switched to the kernels' entry point:
    prefill (GEMM) and one-token decode (GEMV) logits equal the dequantize-then-matmul path's."""
    from gptq_helpers import gptq_checkpoint, prefill_and_decode
    from helpers import TINY
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
            assert len(layers) == 8 and all(m.group_hint == 32 and (m.perm is not None) == act for m in layers)
            if kernels:
                for m in layers:
                    m.matmul = gptq_matmul
            outs.append(prefill_and_decode(model, [list(range(3, 22)), [5, 9]]))
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
