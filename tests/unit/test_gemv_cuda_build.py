"""The CUDA Int4 GEMV's host side (worker/kernels/gemv_cuda.py) on a CPU: which layouts it serves (`supports`), how it
splits K (`plan`), that nvcc builds the .cu for sm_90 where nvcc is installed (no GPU needed), and the message when
there is none. The kernel's values are checked on the GPU (tests/gpu/test_gpu_gemv_cuda.py)."""

from __future__ import annotations

import ctypes
import sys

import pytest
import torch

from worker.kernels import gemv_cuda
from worker.kernels.gemv import NO_GROUPS, GPTQGemvWeights


def _weights(K: int, N: int, bits: int = 4, group: int = 128, k_offset: int = 0) -> GPTQGemvWeights:
    G = 1 if group == NO_GROUPS else -(-(k_offset + K) // group)
    scales = torch.ones(G, N, dtype=torch.bfloat16)
    return GPTQGemvWeights(
        torch.zeros(K * bits // 32, N, dtype=torch.int32), scales, None, 8, bits, group, k_offset,
        torch.zeros(N, dtype=torch.int32),
    )  # fmt: skip


def test_supports_names_what_it_lacks():
    bf16 = torch.bfloat16
    assert gemv_cuda.supports(_weights(4096, 12288), bf16) is None
    assert gemv_cuda.supports(_weights(4096, 12288, group=NO_GROUPS), bf16) is None
    assert gemv_cuda.supports(_weights(2048, 264, group=256, k_offset=128), bf16) is None
    assert "Int4" in gemv_cuda.supports(_weights(4096, 128, bits=8), bf16)
    assert gemv_cuda.supports(_weights(4096, 128, bits=8), bf16, mma=True) is None  # the tensor-core matmul's Int8
    assert "Int4 or Int8" in gemv_cuda.supports(_weights(4096, 128, bits=8), torch.float16, mma=True)
    assert "Int4" in gemv_cuda.supports(_weights(4096, 128), torch.float16)
    assert "N a multiple of 8" in gemv_cuda.supports(_weights(4096, 132), bf16)
    assert "row 64" in gemv_cuda.supports(_weights(4096, 128, k_offset=64), bf16)
    assert "groups of a multiple of 128" in gemv_cuda.supports(_weights(4096, 128, group=64), bf16)


@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize("N,K", [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008), (152, 640), (65536, 24576)])
def test_plan_covers_every_chunk_once(N, K, rows):
    per, splits = gemv_cuda.plan(N, K, 132, rows)
    chunks = K // 128
    mt = rows  # the kernel's rows
    assert per * (splits - 1) < chunks <= per * splits  # no empty split, none missing
    assert per <= gemv_cuda.MAX_CHUNKS and mt * (per * 129 + 4 * 128) * 4 <= 48 * 1024  # the kernel's shared memory
    if per < gemv_cuda.max_chunks(rows):
        assert splits <= -(-chunks // 4)  # at most one split per 4 chunks (a block's 4 warps share a split)
        assert -(-N // 128) * splits <= 3 * 132 or splits == 1  # one wave at 3 blocks per SM


def test_library_without_nvcc_says_so(monkeypatch):
    monkeypatch.setattr(gemv_cuda, "find_nvcc", lambda: None)
    gemv_cuda.library.cache_clear()
    try:
        assert gemv_cuda.library(9, 0) == "no nvcc (set CUDA_HOME)"
    finally:
        gemv_cuda.library.cache_clear()


def test_nvcc_builds_the_kernel(tmp_path, monkeypatch):
    if gemv_cuda.find_nvcc() is None:
        pytest.skip("no nvcc on this machine")
    monkeypatch.setenv("QWEN_WORKER_CACHE", str(tmp_path))
    gemv_cuda.library.cache_clear()
    try:
        lib = gemv_cuda.library(9, 0)
    except OSError as e:  # built, but this machine has no CUDA driver to load it against
        assert list(tmp_path.glob("gptq_gemv_*.so")), e
        return
    finally:
        gemv_cuda.library.cache_clear()
    assert isinstance(lib, ctypes.CDLL), lib
    assert lib.gptq4_gemv_error(0) == b"no error"


def _layer(bits: int = 4):
    from worker.distributed import ParallelContext
    from worker.layers.quantized import GPTQColumnParallelLinear
    from worker.quant.config import GPTQConfig

    cpu = ParallelContext(device=torch.device("cpu"))
    quant = GPTQConfig(bits, 128, True, False, "test")
    layer = GPTQColumnParallelLinear(256, [256], False, cpu, torch.bfloat16, quant)
    layer.gemv = _weights(256, 256, bits=bits)  # as build_gemv leaves it on a GPU
    return layer


def test_the_layer_keeps_the_triton_gemv_with_one_warning_when_the_kernel_cannot_serve(monkeypatch, caplog):
    """gptq_cuda where the library is not there (no nvcc) or the layout is not served: the Triton GEMV, one warning
    naming why for all the linears; the choice is made once per linear, when the decode kernels arrive."""
    import logging

    from worker.layers import quantized
    from worker.layers.decode_kernels import DecodeKernels

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(gemv_cuda, "library", lambda major, minor: "no nvcc (set CUDA_HOME)")
    quantized._warn_once.cache_clear()
    layers = [_layer(), _layer()]
    with caplog.at_level(logging.WARNING, logger="worker"):
        for layer in layers:
            layer.set_decode_kernels(DecodeKernels(gptq_cuda=True))
            assert layer._cuda_gemv is False and layer._cuda_gemv_serves(torch.bfloat16) is False
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "gptq_cuda" in warnings[0] and "no nvcc" in warnings[0], warnings
    monkeypatch.setattr(gemv_cuda, "library", lambda major, minor: object())  # built
    fp16 = _layer()
    assert fp16._cuda_gemv_serves(torch.float16) is False  # not a layout it serves: Int4 with bf16 only
    assert "bf16" in caplog.records[-1].getMessage()
    assert _layer()._cuda_gemv_serves(torch.bfloat16) is True


def test_steps_of_up_to_2_rows_take_the_cuda_gemv_and_others_the_triton_one(monkeypatch):
    """Routing in the layer: gptq_cuda and 1-2 rows -> cuda_gemv (with the layer's PDL choice); 3-8 rows or the flag
    off -> the Triton GEMV; more rows -> neither (the tiled GEMM)."""
    from worker.kernels import gemv as triton_gemv
    from worker.layers import quantized
    from worker.layers.decode_kernels import DecodeKernels

    assert quantized.CUDA_GEMV_MAX_M == gemv_cuda.MAX_ROWS  # the layer's bound is the kernels' (not imported on CPU)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(gemv_cuda, "library", lambda major, minor: object())
    calls: list[tuple[str, int, bool]] = []
    monkeypatch.setattr(
        gemv_cuda,
        "cuda_gemv",
        lambda x, w, b, pdl, mma=False, tc=False, stage=True: (
            calls.append(("mma" if mma else "cuda", x.shape[0], pdl)) or x
        ),
    )
    monkeypatch.setattr(triton_gemv, "quant_gemv", lambda x, w, b, pdl: calls.append(("triton", x.shape[0], pdl)) or x)
    layer = _layer()
    layer.set_decode_kernels(DecodeKernels(pdl=True, gptq_cuda=True))
    monkeypatch.setattr(layer, "matmul", lambda x, *args, **kw: calls.append(("gemm", x.shape[0], False)) or x)
    for rows in (1, 2, 3, 8, 9):
        layer._mm(torch.zeros(rows, 256, dtype=torch.bfloat16), None)
    layer.set_decode_kernels(DecodeKernels(pdl=False))
    layer._mm(torch.zeros(1, 256, dtype=torch.bfloat16), None)
    want = [("cuda", 1, True), ("cuda", 2, True), ("triton", 3, True), ("triton", 8, True), ("gemm", 9, False)]
    assert calls == [*want, ("triton", 1, False)]


def _routes(monkeypatch, bits: int):
    """A GPTQ layer of `bits` on a pretend sm_90 with the library built, and the list of the paths its matmuls take:
    ("cuda" | "tc" | "mma", rows) for gemv_cuda.cuda_gemv, ("triton", rows) for the Triton GEMV, ("gemm", rows)
    otherwise."""
    from worker.kernels import gemv as triton_gemv

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(gemv_cuda, "library", lambda major, minor: object())
    calls: list[tuple[str, int]] = []

    def cuda(
        x: torch.Tensor, w: object, b: object, pdl: bool, mma: bool = False, tc: bool = False, stage: bool = True
    ) -> torch.Tensor:
        calls.append(("mma" if mma else "tc" if tc else "cuda", x.shape[0]))
        return x

    def triton(x: torch.Tensor, w: object, b: object, pdl: bool) -> torch.Tensor:
        calls.append(("triton", x.shape[0]))
        return x

    def gemm(x: torch.Tensor, *args: object, **kw: object) -> torch.Tensor:
        calls.append(("gemm", x.shape[0]))
        return x

    monkeypatch.setattr(gemv_cuda, "cuda_gemv", cuda)
    monkeypatch.setattr(triton_gemv, "quant_gemv", triton)
    layer = _layer(bits)
    monkeypatch.setattr(layer, "matmul", gemm)
    return layer, calls


def test_gptq_mma_takes_steps_of_up_to_64_rows(monkeypatch):
    """gptq_mma: the tensor-core matmul takes every decode step of up to 48 rows (MMA_MAX_M, within the kernel's 64)
    except the 1-2 rows that gptq_cuda, where it is on too, gives the FMA GEMV; more rows take the GEMM path."""
    from worker.layers import quantized
    from worker.layers.decode_kernels import DecodeKernels

    assert quantized.MMA_MAX_M == {4: 48, 8: 32} and all(
        quantized.MMA_MAX_M[b] <= gemv_cuda.MMA_MAX_ROWS[b] for b in (4, 8)
    )
    layer, calls = _routes(monkeypatch, bits=4)
    layer.set_decode_kernels(DecodeKernels(gptq_cuda=True, gptq_mma=True))
    for rows in (1, 2, 3, 9, 48, 49):
        layer._mm(torch.zeros(rows, 256, dtype=torch.bfloat16), None)
    assert calls == [("cuda", 1), ("cuda", 2), ("mma", 3), ("mma", 9), ("mma", 48), ("gemm", 49)]
    calls.clear()
    layer.set_decode_kernels(DecodeKernels(gptq_mma=True))
    for rows in (1, 2):
        layer._mm(torch.zeros(rows, 256, dtype=torch.bfloat16), None)
    assert calls == [("mma", 1), ("mma", 2)]


def test_gptq_tc_takes_one_and_two_rows(monkeypatch):
    """gptq_tc (with gptq_cuda): 1-2 rows (TC_MIN_M..TC_MAX_M) take the tensor-core GEMV instead of the FMA GEMVs;
    3 rows and up are gptq_mma's as before; without gptq_cuda it takes nothing."""
    from worker.layers import quantized
    from worker.layers.decode_kernels import DecodeKernels

    assert (quantized.TC_MIN_M, quantized.TC_MAX_M) == (1, 2) and quantized.TC_MAX_M <= gemv_cuda.TC_MAX_ROWS
    layer, calls = _routes(monkeypatch, bits=4)
    layer.set_decode_kernels(DecodeKernels(gptq_cuda=True, gptq_mma=True, gptq_tc=True))
    for rows in (1, 2, 3):
        layer._mm(torch.zeros(rows, 256, dtype=torch.bfloat16), None)
    assert calls == [("tc", 1), ("tc", 2), ("mma", 3)]
    calls.clear()
    layer.set_decode_kernels(DecodeKernels(gptq_mma=True, gptq_tc=True))  # gptq_tc rides on gptq_cuda
    layer._mm(torch.zeros(2, 256, dtype=torch.bfloat16), None)
    assert calls == [("mma", 2)]


@pytest.mark.parametrize("rows", [1, 2, 3, 8])
@pytest.mark.parametrize("N,K", [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008), (152, 640), (8192, 24576)])
def test_plan_tc_unstaged_fills_the_sms_with_two_chunks_a_warp(N, K, rows):
    per, splits, warps = gemv_cuda.plan_tc(N, K, 132, rows, stage=False)
    chunks, tiles = K // 128, -(-N // 32)
    assert per * (splits - 1) < chunks <= per * splits
    assert warps <= 8 and gemv_cuda.tc_smem(rows, per, warps, stage=False) <= gemv_cuda.MMA_SMEM
    assert gemv_cuda.TC_WARPS_PER_SM == 12  # 3 chunks in flight a warp: 160-166 registers
    assert splits == 1 or (per >= 2 * warps and tiles * warps * (splits - 1) < 12 * 132)
    if (N, K) == (4096, 11008):  # 7B mlp.c_proj: 86 chunks, 7.2 a warp at 4 warps x 3 splits (>= TC_LONG_K 6)
        assert (warps, splits) == (4, 3)
    if (N, K) == (4096, 4096):  # 7B attn.c_proj: 32 chunks, too few to split (2.7 a warp): 8 warps fill ~8 an SM
        assert (warps, splits) == (8, 1)
    if (N, K) == (152, 640):  # 5 tiles: 8 warps, 5 chunks (no split leaves 2 chunks a warp)
        assert (warps, splits) == (5, 1)


@pytest.mark.parametrize("rows", [1, 2, 3, 8])
@pytest.mark.parametrize("N,K", [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008), (152, 640), (8192, 24576)])
def test_plan_tc_covers_every_chunk_within_its_shared_memory(N, K, rows):
    per, splits, warps = gemv_cuda.plan_tc(N, K, 132, rows)
    chunks = K // 128
    assert per * (splits - 1) < chunks <= per * splits  # no empty split, none missing
    assert gemv_cuda.tc_smem(rows, per, warps) <= gemv_cuda.MMA_SMEM
    assert 1 <= warps <= min(16, per) and (
        splits == 1 or gemv_cuda.tc_smem(rows, -(-chunks // (splits - 1)), warps) > gemv_cuda.MMA_SMEM
    )


@pytest.mark.parametrize("rows", [1, 8, 16, 17, 32, 48, 64])
@pytest.mark.parametrize("N,K", [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008), (152, 640), (65536, 24576)])
def test_plan_mma_covers_every_chunk_within_its_shared_memory(N, K, rows):
    per, splits = gemv_cuda.plan_mma(N, K, 132, rows)
    chunks = K // 128
    assert per * (splits - 1) < chunks <= per * splits  # no empty split, none missing
    assert rows * per * (128 * 2 + 4) <= gemv_cuda.MMA_SMEM  # x of the split and its sums
    tiles = -(-N // 128)
    assert tiles * splits >= 132 or splits == chunks  # fills the H200's 132 SMs where K allows
    assert splits <= 16 or per == gemv_cuda.mma_max_chunks(rows)  # many splits only when shared memory forces them


def _row_layer():
    from worker.distributed import ParallelContext
    from worker.layers.quantized import GPTQRowParallelLinear
    from worker.quant.config import GPTQConfig

    cpu = ParallelContext(device=torch.device("cpu"))
    layer = GPTQRowParallelLinear(256, 128, True, cpu, torch.bfloat16, GPTQConfig(4, 128, True, False, "test"))
    layer.gemv = _weights(256, 128)  # as build_gemv leaves it on a GPU
    layer.bias.data.fill_(0.5)
    return layer


def test_gptq_act_fuses_the_activation_into_mlp_c_proj_at_one_row_or_two_with_gptq_tc(monkeypatch):
    """gptq_act (with gptq_cuda, the CUDA GEMV serving the layout): a GPTQ row-parallel linear takes gate_up at one
    decode row and runs the FMA act GEMV on it (act=True, no bias inside), then adds its bias after the reduce; with
    gptq_tc two rows too, on gptq_tc with x staged (three rows never); without gptq_tc two rows, act order (a row
    permutation), gptq_cuda off or gptq_act off keep the activation outside."""
    from worker.layers.decode_kernels import DecodeKernels

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(gemv_cuda, "library", lambda major, minor: object())
    calls: list[tuple[int, bool, object]] = []

    def fake(x, w, b, pdl, act=False, tc=False, stage=True):
        calls.append((x.shape[1], act, b, tc, stage))
        return torch.zeros(x.shape[0], 128, dtype=x.dtype)

    monkeypatch.setattr(gemv_cuda, "cuda_gemv", fake)
    layer = _row_layer()
    one, two = torch.zeros(1, 512, dtype=torch.bfloat16), torch.zeros(2, 512, dtype=torch.bfloat16)
    layer.set_decode_kernels(DecodeKernels(gptq_cuda=True, gptq_act=True, gptq_tc=True))
    assert layer.fuses_act(two) is True and layer.fuses_act(torch.zeros(3, 512, dtype=torch.bfloat16)) is False
    layer.forward_act(two)
    layer.forward_act(one)
    assert calls == [(512, True, None, True, True), (512, True, None, False, True)]  # two rows: gptq_tc, staged
    calls.clear()
    for kernels, want in [
        (DecodeKernels(gptq_cuda=True, gptq_act=True), True),
        (DecodeKernels(gptq_cuda=True), False),
        (DecodeKernels(gptq_act=True), False),
    ]:
        layer.set_decode_kernels(kernels)
        assert layer.fuses_act(one) is want and layer.fuses_act(two) is False
    layer.set_decode_kernels(DecodeKernels(gptq_cuda=True, gptq_act=True))
    y = layer.forward_act(one)
    assert calls == [(512, True, None, False, True)] and torch.equal(y, torch.full((1, 128), 0.5, dtype=torch.bfloat16))
    layer.perm = torch.arange(256)  # act order: the GEMV's rows are permuted, gate_up's are not
    assert layer.fuses_act(one) is False


def test_gptq_mma_serves_int8_up_to_32_rows_and_gptq_cuda_leaves_it_the_small_steps(monkeypatch, caplog):
    """An Int8 linear: the FMA GEMV does not serve it (Int4 only; one warning says so), so with gptq_cuda and gptq_mma
    the steps of 3 to 32 rows (MMA_MIN_M[8], MMA_MAX_M[8]: the kernel's 2 tiles) take the tensor-core matmul, 1-2
    rows the Triton GEMV (faster at one row), more rows the GEMM path; without gptq_mma the Triton GEMV keeps its 1-8
    rows."""
    import logging

    from worker.layers import quantized
    from worker.layers.decode_kernels import DecodeKernels

    assert quantized.MMA_MAX_M[8] == 32 == gemv_cuda.MMA_MAX_ROWS[8] and quantized.MMA_MIN_M[8] == 3
    quantized._warn_once.cache_clear()
    layer, calls = _routes(monkeypatch, bits=8)
    with caplog.at_level(logging.WARNING, logger="worker"):
        layer.set_decode_kernels(DecodeKernels(gptq_cuda=True, gptq_mma=True))
    assert layer._cuda_gemv is False and layer._cuda_mma is True
    assert [r.getMessage() for r in caplog.records if "Int4" in r.getMessage()], caplog.records
    for rows in (1, 2, 3, 32, 33):
        layer._mm(torch.zeros(rows, 256, dtype=torch.bfloat16), None)
    assert calls == [("triton", 1), ("triton", 2), ("mma", 3), ("mma", 32), ("gemm", 33)]
    calls.clear()
    layer.set_decode_kernels(DecodeKernels(gptq_cuda=True))
    for rows in (1, 8):
        layer._mm(torch.zeros(rows, 256, dtype=torch.bfloat16), None)
    assert calls == [("triton", 1), ("triton", 8)]


def test_gptq_act_out_gives_the_activation_from_gate_up_at_the_steps_gptq_tc_serves(monkeypatch):
    """gptq_act_out (with gptq_cuda and gptq_tc, the CUDA GEMV serving the layout): a GPTQ gate_up (two equal parts)
    at one and two decode rows runs gptq_tc's pair epilogue (unstaged, its bias inside) and returns what it gives; three
    rows, a one-part linear, Int8, or any of the three flags off give None (the caller runs gate_up, then the
    activation). The model's MLP then hands that activation to mlp.c_proj without running gate_up's forward. A bad
    pair request is refused naming it, before any launch."""
    from worker.distributed import ParallelContext
    from worker.layers.decode_kernels import DecodeKernels
    from worker.layers.quantized import GPTQColumnParallelLinear
    from worker.quant.config import GPTQConfig

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(gemv_cuda, "library", lambda major, minor: object())
    calls: list[dict] = []

    def fake(x, w, b, pdl, **kw):
        calls.append(dict(rows=x.shape[0], bias=b, **kw))
        return torch.full((x.shape[0], 128), 2.0, dtype=x.dtype)

    real = gemv_cuda.cuda_gemv
    monkeypatch.setattr(gemv_cuda, "cuda_gemv", fake)
    cpu = ParallelContext(device=torch.device("cpu"))

    def gate_up(bits: int = 4, sizes: tuple[int, ...] = (128, 128)):
        layer = GPTQColumnParallelLinear(
            256, list(sizes), True, cpu, torch.bfloat16, GPTQConfig(bits, 128, True, False, "t")
        )
        layer.gemv = _weights(256, 256, bits=bits)
        return layer

    on = DecodeKernels(gptq_cuda=True, gptq_tc=True, gptq_act_out=True)
    layer = gate_up()
    layer.set_decode_kernels(on)
    for rows in (1, 2):
        y = layer.forward_silu_mul(torch.zeros(rows, 256, dtype=torch.bfloat16))
        assert y is not None and torch.equal(y, torch.full((rows, 128), 2.0, dtype=torch.bfloat16))
    assert [c["rows"] for c in calls] == [1, 2]
    assert all(c["pair"] and c["tc"] and c["stage"] is False and c["bias"] is layer.bias for c in calls)
    assert layer.forward_silu_mul(torch.zeros(3, 256, dtype=torch.bfloat16)) is None
    for kernels in (
        DecodeKernels(gptq_cuda=True, gptq_tc=True),
        DecodeKernels(gptq_cuda=True, gptq_act_out=True),
        DecodeKernels(gptq_tc=True, gptq_act_out=True),
    ):
        layer.set_decode_kernels(kernels)
        assert layer.forward_silu_mul(torch.zeros(1, 256, dtype=torch.bfloat16)) is None
    for other in (gate_up(sizes=(256,)), gate_up(bits=8)):
        other.set_decode_kernels(on)
        assert other.forward_silu_mul(torch.zeros(1, 256, dtype=torch.bfloat16)) is None
    assert len(calls) == 2

    from worker.models.qwen import QwenMLP

    mlp = QwenMLP.__new__(QwenMLP)
    torch.nn.Module.__init__(mlp)
    mlp.gate_up = layer
    mlp.act = type("Act", (), {"fused": True})()
    mlp.c_proj = lambda act, ctx: ("c_proj", act)
    layer.set_decode_kernels(on)
    layer.forward = lambda *a: pytest.fail("gate_up's forward runs beside its activation")
    name, act = mlp.forward(torch.zeros(1, 256, dtype=torch.bfloat16), None)
    assert name == "c_proj" and act.shape == (1, 128)

    with pytest.raises(ValueError, match="pair"):
        real(torch.zeros(1, 256, dtype=torch.bfloat16), _weights(256, 256), None, tc=True, stage=True, pair=True)


def test_plan_tc_pair_keeps_the_gate_up_blocks_in_one_wave():
    """plan_tc_pair: the most of 8, 4, 2 warps whose n / 2 / 32 blocks fit in one wave at 12 warps an SM, each half's
    warps at most its chunks: 7B's gate_up (344 blocks on 132 SMs) 4 warps (8 would give one block an SM, 132 < 344),
    its TP=2 shard (172 blocks) 4 too (172 > 132), a gate_up of two chunks 4 (2 a half), one too wide for 4 a block
    (600 blocks > 3 x 132) 2."""
    assert gemv_cuda.TC_WARPS_PER_SM == 12
    assert gemv_cuda.plan_tc_pair(22016, 4096, 132) == 4
    assert gemv_cuda.plan_tc_pair(11008, 4096, 132) == 4
    assert gemv_cuda.plan_tc_pair(2 * 32 * 100, 4096, 132) == 8  # 100 blocks: one an SM
    assert gemv_cuda.plan_tc_pair(1024, 256, 132) == 4
    assert gemv_cuda.plan_tc_pair(2 * 32 * 600, 4096, 132) == 2  # 600 blocks > 132 x 4
    for n, k in ((22016, 4096), (11008, 4096), (1024, 256), (2 * 32 * 600, 4096), (304, 640)):
        w = gemv_cuda.plan_tc_pair(n, k, 132)
        blocks = -(-(n // 2) // 32)
        assert w in (2, 4, 8) and w // 2 <= max(1, k // 128)
        assert w == 2 or blocks <= 132 * (12 // w)


def test_a_build_includes_the_headers_given_wherever_each_file_lies(tmp_path, monkeypatch):
    """cuda_build.build compiles copies of the sources and headers side by side: a source edited in a directory of its
    own includes the header given (the original), and an edited header given instead is the one included; two files
    of one name are refused. A fake nvcc writes the text each source's #include resolves to beside the source."""
    from worker.kernels.cuda_build import BuildError, build

    nvcc = tmp_path / "nvcc"
    nvcc.write_text(
        "#!" + sys.executable + "\n"
        "import os, re, sys\n"
        "a = sys.argv; out = a[a.index('-o') + 1]; text = ''\n"
        "for src in [x for x in a[1:] if x.endswith('.cu')]:\n"
        "    for name in re.findall(r'#include \"(.+)\"', open(src).read()):\n"
        "        text += open(os.path.join(os.path.dirname(src), name)).read()\n"
        "open(out, 'w').write(text)\n"
    )
    nvcc.chmod(0o755)
    monkeypatch.setenv("QWEN_WORKER_CACHE", str(tmp_path / "cache"))
    edited, original = tmp_path / "edited", tmp_path / "kernels"
    edited.mkdir(), original.mkdir()
    (edited / "k.cu").write_text('#include "h.cuh"\n// edited\n')
    (original / "h.cuh").write_text("// the original header\n")
    (edited / "h.cuh").write_text("// an edited header\n")
    lib = build("k", (str(edited / "k.cu"),), (str(original / "h.cuh"),), 9, 0, str(nvcc))
    assert open(lib).read() == "// the original header\n"
    lib = build("k", (str(edited / "k.cu"),), (str(edited / "h.cuh"),), 9, 0, str(nvcc))
    assert open(lib).read() == "// an edited header\n"
    with pytest.raises(BuildError, match="share a name"):
        build("k", (str(edited / "k.cu"),), (str(edited / "h.cuh"), str(original / "h.cuh")), 9, 0, str(nvcc))
