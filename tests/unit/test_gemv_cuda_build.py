"""The CUDA Int4 GEMV's host side (worker/kernels/gemv_cuda.py) on a CPU: which layouts it serves (`supports`), how it
splits K (`plan`), that nvcc builds the .cu for sm_90 where nvcc is installed (no GPU needed), and the message when
there is none. The kernel's values are checked on the GPU (tests/gpu/test_gpu_gemv_cuda.py)."""

from __future__ import annotations

import ctypes

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
    assert "Int4" in gemv_cuda.supports(_weights(4096, 128), torch.float16)
    assert "N a multiple of 8" in gemv_cuda.supports(_weights(4096, 132), bf16)
    assert "row 64" in gemv_cuda.supports(_weights(4096, 128, k_offset=64), bf16)
    assert "groups of a multiple of 128" in gemv_cuda.supports(_weights(4096, 128, group=64), bf16)


@pytest.mark.parametrize("N,K", [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008), (152, 640), (65536, 24576)])
def test_plan_covers_every_chunk_once(N, K):
    per, splits = gemv_cuda.plan(N, K, 132)
    chunks = K // 128
    assert per * (splits - 1) < chunks <= per * splits  # no empty split, none missing
    assert per <= gemv_cuda.MAX_CHUNKS and (per * 129 + 4 * 128) * 4 <= 48 * 1024  # the kernel's shared memory
    if per < gemv_cuda.MAX_CHUNKS:
        assert splits <= -(-chunks // 4)  # at most one split per 4 chunks (a block's 4 warps share a split)
        assert -(-N // 128) * splits <= 3 * 132 or splits == 1  # one wave at 3 blocks per SM


def test_library_without_nvcc_says_so(monkeypatch):
    monkeypatch.setattr(gemv_cuda, "_nvcc", lambda: None)
    gemv_cuda.library.cache_clear()
    try:
        assert gemv_cuda.library(9, 0) == "no nvcc (set CUDA_HOME)"
    finally:
        gemv_cuda.library.cache_clear()


def test_nvcc_builds_the_kernel(tmp_path, monkeypatch):
    if gemv_cuda._nvcc() is None:
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
