"""The CUDA Int4 GEMV (worker/kernels/gptq_gemv.cu via gemv_cuda.py; DecodeKernels.gptq_cuda), the tensor-core GEMV
with the weights as mma's A operand (gptq_tc.cu; DecodeKernels.gptq_tc) and the tensor-core matmul (gptq_mma.cu;
DecodeKernels.gptq_mma) on the GPU: against the fp32 dequantize-then-matmul reference on awkward shapes (a partial
column tile, chunks not a multiple of the splits, no groups, groups of 256, a row shard starting inside a group, asym
zeros, a bias), deterministic and equal under CUDA graph replay, at 1 and 2 rows (GEMV), 1 to 8 (gptq_tc, x staged or
not) and 1 to 64 (mma); the activation kernels bit for bit against fused.silu_mul then the GEMV; and GPTQ models
decoding through each close to the Triton path's logits."""

from __future__ import annotations

import functools

import pytest
import torch

from helpers import GPU_TINY, replayed
from paged import Paged
from random_weights import random_checkpoint
from worker.distributed import ParallelContext

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
CUDA = torch.device("cuda", 0)


SHAPES = [
    (640, 152, 128, True, True, 0),  # 5 chunks, 2 column tiles (the second of 24 columns)
    (1408, 4104, -1, False, False, 0),  # no groups: one scale row
    (2048, 264, 256, True, False, 128),  # groups of 256, the shard's first row in the middle of a group
    (11008, 4096, 128, False, True, 0),  # 7B mlp.c_proj: split K, the last split shorter
]


@pytest.mark.parametrize("M", [1, 2])
@pytest.mark.parametrize("K,N,group,asym,bias,k_offset", SHAPES)
def test_cuda_gemv_equals_the_reference(K, N, group, asym, bias, k_offset, M):
    _check(K, N, group, asym, bias, k_offset, M, mma=False)


@pytest.mark.parametrize("M", [1, 3, 16, 17, 32])
@pytest.mark.parametrize("K,N,group,asym,bias,k_offset", SHAPES)
def test_cuda_mma_int8_equals_the_reference(K, N, group, asym, bias, k_offset, M):
    """gptq_mma's Int8 (the low and high nibbles of each byte summed by two mma) at 1 to 32 rows."""
    _check(K, N, group, asym, bias, k_offset, M, mma=True, bits=8)


@pytest.mark.parametrize("M", [1, 3, 8, 16, 17, 40, 64])
@pytest.mark.parametrize("K,N,group,asym,bias,k_offset", SHAPES)
def test_cuda_mma_equals_the_reference(K, N, group, asym, bias, k_offset, M):
    """gptq4_mma (DecodeKernels.gptq_mma) at 1 to 64 rows: partial 16-row tiles (3, 17, 40), one to four tiles."""
    _check(K, N, group, asym, bias, k_offset, M, mma=True)


@pytest.mark.parametrize("M", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("K,N,group,asym,bias,k_offset", SHAPES)
def test_cuda_tc_equals_the_reference(K, N, group, asym, bias, k_offset, M):
    """gptq_tc (the weights as mma's A operand, x's rows as its N) at 1 to 8 rows."""
    _check(K, N, group, asym, bias, k_offset, M, mma=False, tc=True)


@pytest.mark.parametrize(
    "warps,splits,stage", [(1, 1, True), (3, 1, True), (16, 1, True), (4, 3, True), (8, 2, True), (3, 1, False),
                           (8, 2, False)]
)  # fmt: skip
def test_cuda_tc_plans_agree(warps, splits, stage):
    """gptq_tc at other warps a block and K splits than its plan, x staged by the block or loaded by each warp: the
    same values within the reference's rounding (the sums' order differs), each deterministic."""
    _check(11008, 4104, 128, True, True, 0, 3, mma=False, tc=dict(warps=warps, splits=splits, stage=stage))


@pytest.mark.parametrize("M", [1, 2, 5, 8])
@pytest.mark.parametrize("K,N,group,asym,bias,k_offset", SHAPES)
def test_cuda_tc_unstaged_equals_the_reference(K, N, group, asym, bias, k_offset, M):
    """gptq_tc with each warp loading its chunks' x (no block staging; sums by shuffles)."""
    _check(K, N, group, asym, bias, k_offset, M, mma=False, tc=dict(stage=False, warps=4))


def _check(K, N, group, asym, bias, k_offset, M, mma, bits=4, tc=False):
    from worker.kernels.gemv import gemv_weights
    from worker.kernels.gemv_cuda import cuda_gemv, library, plan, plan_mma, supports
    from worker.kernels.gptq_reference import gptq_matmul_reference

    assert not isinstance(library(*torch.cuda.get_device_capability(CUDA)), str)
    g = torch.Generator(device=CUDA).manual_seed(K + N)
    rows = k_offset + K
    G = 1 if group == -1 else -(-rows // group)
    p = 32 // bits  # values a word
    qweight = torch.randint(-(2**31), 2**31 - 1, (K // p, N), device=CUDA, dtype=torch.int32, generator=g)
    if asym:
        qzeros = torch.randint(-(2**31), 2**31 - 1, (G, N // p), device=CUDA, dtype=torch.int32, generator=g)
    else:  # sym: the middle of the range stored everywhere, less the v1 offset
        qzeros = torch.full((G, N // p), 0x77777777 if bits == 4 else 0x7F7F7F7F, device=CUDA, dtype=torch.int32)
    scales = (torch.rand(G, N, device=CUDA, generator=g) * 0.02 + 0.001).to(torch.bfloat16)
    g_idx = torch.zeros(K, device=CUDA, dtype=torch.int32)
    if group != -1:
        g_idx = ((k_offset + torch.arange(K, device=CUDA)) // group).to(torch.int32)
    w = gemv_weights(qweight, qzeros, scales, bits, 1, group, k_offset)
    assert supports(w, torch.bfloat16, mma=mma) is None and (w.zeros is not None) == asym
    b = (torch.randn(N, device=CUDA, generator=g) * 0.1).to(torch.bfloat16) if bias else None
    x = torch.randn(M, K, device=CUDA, generator=g).to(torch.bfloat16)
    ref = gptq_matmul_reference(x.float(), qweight, qzeros, scales.float(), g_idx, bits, 1)
    ref = ref if b is None else ref + b.float()
    kw = dict(mma=mma) if not tc else dict(tc=True, **(tc if isinstance(tc, dict) else {}))
    y = cuda_gemv(x, w, b, pdl=True, **kw)
    err = (y.float() - ref).abs().max().item()
    rounding = (ref.to(torch.bfloat16).float() - ref).abs().max().item()
    assert err <= rounding + 1e-3 * ref.abs().max().item(), (err, rounding)
    assert torch.equal(cuda_gemv(x, w, b, **kw), y)  # deterministic, PDL or not
    assert torch.equal(replayed(lambda: cuda_gemv(x, w, b, pdl=True, **kw)), y)
    assert not w.counters.any()  # the split-K counters are reset for the next launch
    if K == 11008 and not tc:
        assert (plan_mma if mma else plan)(N, K, torch.cuda.get_device_properties(CUDA).multi_processor_count, M)[1] > 1


def _decode(
    path: str,
    gptq_cuda: bool,
    batch: int,
    mma: bool = False,
    act: bool = False,
    tc: bool = False,
    act_out=False,
    tiled=False,
) -> tuple[list[torch.Tensor], list[bool]]:
    from worker.layers.attention_triton import TritonAttention
    from worker.layers.decode_kernels import DecodeKernels, where_applies
    from worker.layers.quantized import _GPTQ
    from worker.models.qwen import FlashQwenForCausalLM

    kernels = DecodeKernels(
        pdl=True, gptq_cuda=gptq_cuda, gptq_mma=mma, gptq_act=act, gptq_tc=tc, gptq_act_out=act_out, gptq_tiled=tiled
    )
    kernels = where_applies(kernels, CUDA)
    model = FlashQwenForCausalLM.from_pretrained(
        path, ParallelContext(0, 1, CUDA), torch.bfloat16, TritonAttention(), progress=False, decode_kernels=kernels
    )
    g = torch.Generator().manual_seed(1)
    ids = list(range(batch))
    tokens = [torch.randint(0, 512, (15,), generator=g).tolist() for _ in ids]  # the same for both runs (no argmax)
    seqs = [t[:11] for t in tokens]
    p = Paged(model, num_blocks=16 * batch)
    p.step(ids, seqs, [0] * batch, [1.0] * batch, True)
    logits = []
    for i in range(11, 15):
        for seq, t in zip(seqs, tokens):
            seq.append(t[i])
        out = p.step(ids, seqs, [len(s) - 1 for s in seqs], [1.0] * batch, False)
        logits += [o[-1].float().cpu() for o in out]
    if act_out:  # whether each layer's gate_up gives the activation (forward_silu_mul) at this batch
        x = torch.zeros(batch, model.config.hidden_size, device=CUDA, dtype=torch.bfloat16)
        return logits, [layer.mlp.gate_up.forward_silu_mul(x) is not None for layer in model.transformer.layers()]  # type: ignore[operator]
    if act:  # whether each layer's mlp.c_proj takes gate_up at one row (forward_act), instead of the GEMVs used
        return logits, [
            layer.mlp.c_proj.fuses_act(
                torch.empty(batch, 2 * layer.mlp.c_proj.in_features, device=CUDA, dtype=torch.bfloat16)
            )
            for layer in model.transformer.layers()
        ]
    if tiled:  # whether each GPTQ linear's words are tiled
        return logits, [m.tiled for m in model.modules() if isinstance(m, _GPTQ)]
    if tc:  # whether each GPTQ linear takes gptq_tc at this batch
        return logits, [m._takes_tc(batch) for m in model.modules() if isinstance(m, _GPTQ)]
    return logits, [bool(m._cuda_mma if mma else m._cuda_gemv) for m in model.modules() if isinstance(m, _GPTQ)]


@pytest.mark.parametrize("batch", [1, 2])
def test_a_gptq_model_decodes_through_the_cuda_gemv(tmp_path, batch):
    from gptq_helpers import gptq_checkpoint

    state = random_checkpoint(GPU_TINY, seed=9)
    path, _ = gptq_checkpoint(str(tmp_path / "q"), GPU_TINY, state, 4, 128, False, True)  # asym, act order
    triton, used_t = _decode(path, False, batch)
    cuda, used_c = _decode(path, True, batch)
    assert used_c and all(used_c) and not any(used_t)
    for a, b in zip(triton, cuda):  # the same function; the GEMVs sum in other orders (bf16 outputs per layer)
        assert (a - b).abs().max().item() <= 0.02 * a.abs().max().item(), (a - b).abs().max()


@pytest.mark.parametrize("bits,batch", [(4, 3), (4, 8), (4, 24), (8, 8), (8, 24)])
def test_a_gptq_model_decodes_through_the_mma_kernel(tmp_path, bits, batch):
    """gptq_mma: a GPTQ model (asym, act order; Int4 and Int8) decoding through the tensor-core matmul
    in every GPTQ linear gives the Triton path's logits (the GEMV up to 8 rows, dequantize + cuBLAS above) within
    bf16's per-layer rounding."""
    from gptq_helpers import gptq_checkpoint

    state = random_checkpoint(GPU_TINY, seed=9)
    path, _ = gptq_checkpoint(str(tmp_path / "q"), GPU_TINY, state, bits, 128, False, True)
    triton, used_t = _decode(path, False, batch)
    mma, used_m = _decode(path, False, batch, mma=True)
    assert used_m and all(used_m) and not any(used_t)
    for a, b in zip(triton, mma):
        assert (a - b).abs().max().item() <= 0.02 * a.abs().max().item(), (a - b).abs().max()


def _int4_group128(K: int, N: int, asym: bool, g: torch.Generator):
    """Random Int4 weights with groups of 128 in the GEMV's layout: asym zeros, or sym (the v1 offset's 7 stored)."""
    from worker.kernels.gemv import gemv_weights

    qweight = torch.randint(-(2**31), 2**31 - 1, (K // 8, N), device=CUDA, dtype=torch.int32, generator=g)
    if asym:
        qzeros = torch.randint(-(2**31), 2**31 - 1, (K // 128, N // 8), device=CUDA, dtype=torch.int32, generator=g)
    else:
        qzeros = torch.full((K // 128, N // 8), 0x77777777, device=CUDA, dtype=torch.int32)
    scales = (torch.rand(K // 128, N, device=CUDA, generator=g) * 0.02 + 0.001).to(torch.bfloat16)
    return gemv_weights(qweight, qzeros, scales, 4, 1, 128, 0)


@pytest.mark.parametrize("K,N,asym", [(11008, 4096, False), (640, 152, True)])
def test_act_gemv_equals_silu_mul_then_the_gemv(K, N, asym):
    """gptq_act's kernel: the GEMV of gate_up [1, 2K] with the activation computed while staging equals
    fused.silu_mul then the plain GEMV bit for bit (the same rounding of up * silu(gate), the same sums)."""
    from worker.kernels.fused import silu_mul
    from worker.kernels.gemv_cuda import cuda_gemv

    g = torch.Generator(device=CUDA).manual_seed(K)
    w = _int4_group128(K, N, asym, g)
    gate_up = (torch.randn(1, 2 * K, device=CUDA, generator=g) * 3).to(torch.bfloat16)
    want = cuda_gemv(silu_mul(gate_up), w, None, pdl=True)
    got = cuda_gemv(gate_up, w, None, pdl=True, act=True)
    assert torch.equal(got, want)
    rows = (torch.randn(5, 2 * K, device=CUDA, generator=g) * 3).to(torch.bfloat16)  # gptq_tc: up to 8 rows
    for stage in (True, False):
        want = cuda_gemv(silu_mul(rows), w, None, pdl=True, tc=True, stage=stage, warps=4)
        assert torch.equal(cuda_gemv(rows, w, None, pdl=True, act=True, tc=True, stage=stage, warps=4), want)
    with pytest.raises(ValueError, match="act"):
        cuda_gemv(gate_up[:, :K], w, None, act=True)


def test_a_gptq_model_decodes_the_same_with_the_act_gemv(tmp_path):
    """gptq_act in a GPTQ model (no act order) at batch 1: the logits equal those without it bit for bit, and every
    layer's mlp.c_proj took the fused path."""
    from gptq_helpers import gptq_checkpoint

    state = random_checkpoint(GPU_TINY, seed=5)
    path, _ = gptq_checkpoint(str(tmp_path / "q"), GPU_TINY, state, 4, 128, True, False)
    plain, _ = _decode(path, True, 1)
    fused, took = _decode(path, True, 1, act=True)
    assert took and all(took), took
    assert all(torch.equal(a, b) for a, b in zip(plain, fused))


@pytest.mark.parametrize("batch", [1, 2])
def test_a_gptq_model_decodes_through_the_tc_gemv(tmp_path, batch, monkeypatch):
    """gptq_tc: a GPTQ model (asym, act order) at batch 1 and 2 with every GPTQ linear on the tensor-core GEMV gives
    the Triton path's logits within bf16's per-layer rounding; without act order at 2 rows, gptq_act's activation
    inside it (x staged) gives the logits of the same kernel without it bit for bit."""
    from gptq_helpers import gptq_checkpoint
    from worker.layers import quantized

    state = random_checkpoint(GPU_TINY, seed=9)
    path, _ = gptq_checkpoint(str(tmp_path / "q"), GPU_TINY, state, 4, 128, False, True)
    triton, _ = _decode(path, False, batch)
    tc, used = _decode(path, True, batch, tc=True)
    assert used and all(used)
    for a, b in zip(triton, tc):
        assert (a - b).abs().max().item() <= 0.02 * a.abs().max().item(), (a - b).abs().max()
    if batch == 2:
        monkeypatch.setattr(quantized, "TC_STAGE", True)  # the act kernel stages x: compare like with like
        path, _ = gptq_checkpoint(str(tmp_path / "p"), GPU_TINY, state, 4, 128, True, False)
        plain, _ = _decode(path, True, batch, tc=True)
        fused, took = _decode(path, True, batch, act=True, tc=True)
        assert took and all(took), took
        assert all(torch.equal(a, b) for a, b in zip(plain, fused))


@pytest.mark.parametrize("M", [1, 2, 5])
@pytest.mark.parametrize(
    "K,N,asym,bias", [(4096, 22016, False, False), (640, 304, True, True), (1408, 520, False, True)]
)
def test_tc_pair_equals_the_gemv_then_silu_mul(K, N, asym, bias, M):
    """gptq_act_out's kernel (gptq_tc's kPair): the activation of a gate_up GEMV [M, N] = [gate | up] from its epilogue
    equals fused.silu_mul of the same kernel's output with the same warps a half, bit for bit (7B's gate_up; halves of
    152 and 260 columns: partial tiles; asym zeros and a bias on both halves), under graph replay too; odd warps, a
    staged x and a K split are refused."""
    from worker.kernels.fused import silu_mul
    from worker.kernels.gemv_cuda import cuda_gemv

    g = torch.Generator(device=CUDA).manual_seed(K + N + M)
    w = _int4_group128(K, N, asym, g)
    b = (torch.randn(N, device=CUDA, generator=g) * 0.5).to(torch.bfloat16) if bias else None
    x = torch.randn(M, K, device=CUDA, generator=g).to(torch.bfloat16)
    for half in (2, 4):
        want = silu_mul(cuda_gemv(x, w, b, pdl=True, tc=True, stage=False, warps=half, splits=1))
        got = cuda_gemv(x, w, b, pdl=True, tc=True, stage=False, pair=True, warps=2 * half)
        assert got.shape == (M, N // 2) and torch.equal(got, want)
    assert torch.equal(replayed(lambda: cuda_gemv(x, w, b, pdl=True, tc=True, stage=False, pair=True, warps=8)), got)
    for bad in (dict(warps=3), dict(stage=True), dict(splits=2)):
        with pytest.raises(ValueError, match="pair"):
            cuda_gemv(x, w, b, tc=True, pair=True, **{"stage": False, **bad})


@pytest.mark.parametrize("batch", [1, 2])
def test_a_gptq_model_decodes_the_same_with_the_activation_from_gate_up(tmp_path, batch):
    """gptq_act_out in a GPTQ model (asym, act order) at batch 1 and 2: every layer's gate_up gives the activation and
    the logits equal those of gptq_tc with the activation in its own kernel bit for bit (the same sums a half, the
    same rounding)."""
    from gptq_helpers import gptq_checkpoint

    state = random_checkpoint(GPU_TINY, seed=9)
    path, _ = gptq_checkpoint(str(tmp_path / "q"), GPU_TINY, state, 4, 128, False, True)
    plain, _ = _decode(path, True, batch, tc=True)
    fused, took = _decode(path, True, batch, tc=True, act_out=True)
    assert took and all(took), took
    assert all(torch.equal(a, b) for a, b in zip(plain, fused))


@pytest.mark.parametrize(
    "K,N,asym,bias", [(4096, 12288, False, True), (11008, 4096, True, False), (640, 320, True, True)]
)  # fmt: skip
def test_tiled_words_give_the_row_major_bits(K, N, asym, bias):
    """DecodeKernels.gptq_tiled: gptq_tc (1-2 rows: plain, split K, x staged, the activation inside, the pair) and
    gptq_mma (3-48 rows) on words in gptq_format.tile_words' layout give the row-major kernels' values bit for bit
    (only addresses change), under graph replay too; the FMA GEMVs refuse tiled words."""
    import dataclasses

    from worker.kernels.gemv_cuda import cuda_gemv
    from worker.quant.gptq_format import tile_words

    g = torch.Generator(device=CUDA).manual_seed(K + N)
    w = _int4_group128(K, N, asym, g)
    t = dataclasses.replace(w, qweight=tile_words(w.qweight), tiled=True, counters=torch.zeros_like(w.counters))
    b = (torch.randn(N, device=CUDA, generator=g) * 0.5).to(torch.bfloat16) if bias else None
    cases = [dict(rows=m, tc=True, stage=False) for m in (1, 2)]
    cases += [dict(rows=1, tc=True, stage=False, splits=3), dict(rows=2, tc=True, stage=True)]
    cases += [dict(rows=m, mma=True) for m in (3, 16, 48)]
    if not bias:
        cases += [dict(rows=m, tc=True, stage=True, act=True) for m in (1, 2)]
    if N % 64 == 0:
        cases += [dict(rows=m, tc=True, stage=False, pair=True) for m in (1, 2)]
    for case in cases:
        kw = {k: v for k, v in case.items() if k != "rows"}
        width = 2 * K if kw.get("act") else K
        x = torch.randn(case["rows"], width, device=CUDA, generator=g).to(torch.bfloat16)
        bb = None if kw.get("act") else b
        want = cuda_gemv(x, w, bb, pdl=True, **kw)
        assert torch.equal(cuda_gemv(x, t, bb, pdl=True, **kw), want), case
        assert torch.equal(replayed(functools.partial(cuda_gemv, x, t, bb, pdl=True, **kw)), want), case
    with pytest.raises(ValueError, match="tiled"):
        cuda_gemv(torch.zeros(1, K, device=CUDA, dtype=torch.bfloat16), t, b)  # the FMA GEMV


@pytest.mark.parametrize("batch", [1, 2, 5])
def test_a_gptq_model_decodes_the_same_with_tiled_words(tmp_path, batch):
    """gptq_tiled in a GPTQ model (asym): every GPTQ linear's words tiled, the logits (prefill through the Triton
    matmul, decode through gptq_tc or gptq_mma) equal the row-major model's bit for bit."""
    from gptq_helpers import gptq_checkpoint

    state = random_checkpoint(GPU_TINY, seed=11)
    path, _ = gptq_checkpoint(str(tmp_path / "q"), GPU_TINY, state, 4, 128, False, False)
    plain, _ = _decode(path, True, batch, mma=True, tc=True)
    tiled, took = _decode(path, True, batch, mma=True, tc=True, tiled=True)
    assert took and all(took), took
    assert all(torch.equal(a, b) for a, b in zip(plain, tiled))
