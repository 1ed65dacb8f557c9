"""GPTQ and FP8 weights on CUDA: the Triton W4A16/W8A16 kernels against the dequantize-then-matmul
reference in bf16 at Qwen-7B shapes (decode GEMV and prefill GEMM, act order, row shards that are not whole
groups, bias), a CUDA-graph capture of the decode kernel, torch._scaled_mm FP8 against its reference, and a
2-layer model of the 7B width served in Int4 equal to the same model on the reference path.

Tolerance: |ours − ref| <= 2e-2 · (1 + |ref|) (bf16 outputs; the kernels keep dequantized weights in fp32
for the GEMV and round them to bf16 for tl.dot, the reference rounds them to bf16 before cuBLAS).
Run: `pytest -q -m gpu tests/gpu/test_gpu_quant.py`.
"""

from __future__ import annotations

import pytest
import torch

from helpers import GPU_TRITON_MARKS, within

pytestmark = GPU_TRITON_MARKS
pytest.importorskip("triton")

from worker.kernels.gptq import gptq_gemm, gptq_gemv, gptq_matmul, gptq_matmul_reference  # noqa: E402
from worker.quant.fp8 import fp8_matmul_reference, fp8_matmul_scaled_mm, quantize_rows  # noqa: E402
from worker.quant.gptq_format import quantize_rtn  # noqa: E402

CUDA = torch.device("cuda")
TOL = 2e-2
SHAPES = [(4096, 12288), (4096, 22016), (11008, 4096), (4096, 4096)]  # (K, N): c_attn, gate_up, mlp/attn c_proj


def _q(k: int, n: int, bits: int, act: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) / k**0.5
    perm = torch.randperm(k, generator=g) if act else None
    q = quantize_rtn(w, bits, 128, sym=True, perm=perm)
    return [t.to(CUDA) for t in (q.qweight, q.qzeros, q.scales.to(torch.bfloat16), q.g_idx)]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize(("k", "n"), SHAPES)
def test_kernels_match_reference_bf16(bits, k, n):
    qw, qz, s, gi = _q(k, n, bits, act=False)
    bias = torch.randn(n, device=CUDA, dtype=torch.bfloat16)
    for m in (1, 3, 8, 16, 17, 128, 300):
        x = torch.randn(m, k, device=CUDA, dtype=torch.bfloat16)
        ref = gptq_matmul_reference(x, qw, qz, s, gi, bits, 1, bias)
        within(gptq_matmul(x, qw, qz, s, gi, bits, 1, bias, group_size=128), ref, TOL)
        within(gptq_matmul(x, qw, qz, s, gi, bits, 1, bias), ref, TOL)  # through g_idx


def test_act_order_and_a_row_shard_of_half_groups():
    """7B's mlp.c_proj at TP 4: 2752 rows per rank = 21.5 groups; act order gathers through g_idx."""
    k, n = 11008, 4096
    for act in (False, True):
        qw, qz, s, gi = _q(k, n, 4, act, seed=1)
        lo, hi = 2752, 2 * 2752  # rank 1
        qw_r, gi_r = qw[lo // 8 : hi // 8], gi[lo:hi]
        for m in (1, 5, 64):
            x = torch.randn(m, hi - lo, device=CUDA, dtype=torch.bfloat16)
            ref = gptq_matmul_reference(x, qw_r, qz, s, gi_r, 4)
            within(gptq_matmul(x, qw_r, qz, s, gi_r, 4, group_size=0 if act else 128, k_offset=lo), ref, TOL)


def test_decode_kernel_in_a_cuda_graph():
    qw, qz, s, gi = _q(4096, 12288, 4, act=False)
    x = torch.randn(1, 4096, device=CUDA, dtype=torch.bfloat16)
    eager = gptq_gemv(x, qw, qz, s, gi, 4, group_size=128)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        gptq_gemv(x, qw, qz, s, gi, 4, group_size=128)  # warm up (compile) outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = gptq_gemv(x, qw, qz, s, gi, 4, group_size=128)
    x.copy_(torch.randn_like(x))
    graph.replay()
    assert torch.equal(out, gptq_gemv(x, qw, qz, s, gi, 4, group_size=128))
    assert not torch.equal(out, eager)


def test_gemm_prefill_tiles():
    qw, qz, s, gi = _q(4096, 4096, 4, act=False)
    x = torch.randn(1000, 4096, device=CUDA, dtype=torch.bfloat16)
    within(gptq_gemm(x, qw, qz, s, gi, 4, group_size=128), gptq_matmul_reference(x, qw, qz, s, gi, 4), TOL)


@pytest.mark.parametrize("m", [1, 3, 16, 17, 256])
def test_fp8_scaled_mm_matches_reference(m):
    w = torch.randn(4096, 4096, device=CUDA) / 64
    wq, ws = quantize_rows(w)
    x = torch.randn(m, 4096, device=CUDA, dtype=torch.bfloat16)
    bias = torch.randn(4096, device=CUDA, dtype=torch.bfloat16)
    out = fp8_matmul_scaled_mm(x, wq, ws[:, 0], bias)
    within(out, fp8_matmul_reference(x, wq, ws[:, 0], bias), TOL)


@pytest.mark.parametrize(("k", "n"), SHAPES)
def test_fp8_w8a16_kernel_matches_reference_bf16(k, n):
    from worker.kernels.fp8_matmul import w8a16_matmul, w8a16_reference

    wq, ws = quantize_rows(torch.randn(n, k, device=CUDA) / k**0.5)
    bias = torch.randn(n, device=CUDA, dtype=torch.bfloat16)
    for m in (1, 4, 16):
        x = torch.randn(m, k, device=CUDA, dtype=torch.bfloat16)
        within(w8a16_matmul(x, wq, ws[:, 0], bias), w8a16_reference(x, wq, ws[:, 0], bias), TOL)


@pytest.mark.parametrize(("k", "n"), SHAPES[:2])
def test_fp8_gemv_tiles_match_reference_bf16(k, n):
    """Every named FP8 GEMV tile set (worker/kernels/fp8_matmul.py) at M 1 and 8, bias included."""
    from worker.kernels.fp8_matmul import FP8_GEMV_TILES, w8a16_gemv, w8a16_reference

    wq, ws = quantize_rows(torch.randn(n, k, device=CUDA) / k**0.5)
    bias = torch.randn(n, device=CUDA, dtype=torch.bfloat16)
    for m in (1, 8):
        x = torch.randn(m, k, device=CUDA, dtype=torch.bfloat16)
        for name in FP8_GEMV_TILES:
            within(w8a16_gemv(x, wq, ws[:, 0], bias, tiles=name), w8a16_reference(x, wq, ws[:, 0], bias), TOL)


@pytest.mark.parametrize("bits", [4, 8])
def test_gemv_named_tiles_match_reference_bf16(bits):
    """Every named GPTQ GEMV tile set (shift and mask unpack, tiles of several groups, cp.async pipelining,
    tl.dot at M = 1, no split-K) at M 1 and 8 on the c_attn shape, act order (rows in group order)."""
    from worker.kernels.gemv import gemv_weights, quant_gemv
    from worker.kernels.gemv_tiles import GEMV_TILES
    from worker.kernels.gptq_reference import group_order

    qweight, qzeros, scales, g_idx = _q(4096, 12288, bits, True, seed=bits)
    sorted_qw, perm = group_order(qweight, g_idx, bits)
    w = gemv_weights(sorted_qw, qzeros, scales, bits, 1, 128, 0)
    for m in (1, 8):
        x = torch.randn(m, 4096, device=CUDA, dtype=torch.bfloat16)
        ref = gptq_matmul_reference(x, qweight, qzeros, scales, g_idx, bits)
        for tiles in GEMV_TILES.values():
            within(quant_gemv(x[:, perm], w, tiles=tiles[bits]), ref, TOL)


def test_int4_model_on_the_kernels_equals_the_reference_path(tmp_path):
    """A 2-layer model of the 7B width (hidden 4096, 32 heads, MLP 11008), bf16, Int4 act order: the layers
    pick the Triton kernels on CUDA; swapping them to the reference gives the same logits and tokens."""
    from gptq_helpers import gptq_checkpoint
    from paged import Paged
    from random_weights import random_checkpoint
    from worker.distributed import ParallelContext
    from worker.layers.attention import make_backend
    from worker.layers.quantized import _GPTQ
    from worker.models.qwen import FlashQwenForCausalLM

    cfg = dict(
        model_type="qwen", hidden_size=4096, num_attention_heads=32, kv_channels=128, num_hidden_layers=2,
        intermediate_size=22016, vocab_size=1024, seq_length=2048,
    )  # fmt: skip
    state = random_checkpoint(cfg, seed=0, dtype=torch.bfloat16)
    path, _ = gptq_checkpoint(str(tmp_path / "q"), cfg, state, 4, 128, True, True)
    pctx = ParallelContext(device=CUDA)
    model = FlashQwenForCausalLM.from_pretrained(path, pctx, torch.bfloat16, make_backend("triton", CUDA), False)
    layers = [m for m in model.modules() if isinstance(m, _GPTQ)]
    assert layers and all(m.matmul is gptq_matmul for m in layers)
    prompts = [list(range(5, 60)), [7, 8, 9]]
    outs = []
    assert all(m.gemv is not None and m.perm is not None for m in layers)  # act order: rows in group order
    gemvs = [m.gemv for m in layers]
    for matmul in (gptq_matmul, gptq_matmul_reference):
        for m, gemv in zip(layers, gemvs):
            m.matmul, m.gemv = matmul, gemv if matmul is gptq_matmul else None  # decode: the GEMV vs the reference
        paged = Paged(model)
        out = paged.step([0, 1], prompts, [0, 0], [1.0, 1.0], True)
        seqs = [p + [int(o[-1].argmax())] for p, o in zip(prompts, out)]
        out += paged.step([0, 1], seqs, [len(s) - 1 for s in seqs], [1.0, 1.0], False)
        outs.append(out)
    for a, b in zip(*outs):
        within(a, b, TOL)
        assert torch.equal(a[-1].argmax(), b[-1].argmax())


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_tp2_over_nccl_equals_reference(tmp_path):
    """tests/unit/test_gptq_tp.py's check on 2 GPUs: fp32 activations through the Triton kernels (IEEE fp32
    dots), Int4 act order and Int8, row shards of 1.5 groups, mixed adapters, within 1e-3 of the float64
    reference (tests/gpu/test_gpu_tp.py's NCCL bound: GPU fp32 kernels and NCCL's summation order)."""
    import os
    import sys

    from helpers import ROOT

    sys.path.insert(0, os.path.join(ROOT, "tests", "unit"))
    from test_gptq_tp import check_tp2

    check_tp2(tmp_path, 1e-3, QWEN_TEST_DEVICE="cuda")
