"""The opt-in decode kernel candidates (worker/layers/decode_kernels.py, issue 17 P1) on the CPU through the
Triton interpreter (fp32 and fp16; bf16 and the PDL launches themselves run in scripts/gpu_check_p1.py):

- act GEMV: dense_gemv(gate_up, w, act=True) equals dense_gemv(silu_mul(gate_up), w) bit for bit (same tiles,
  same split-K order; the activation rounds as the SiLU-mul kernel), M = 1 (elementwise path) and M > 1
  (tl.dot), N and K not multiples of the tile, split-K 1..3, prefetch on and off; and the fp64 product.
- the model: the tiny model with mlp.c_proj taking the act GEMV gives the reference (unfused) model's logits.
- PDL is off under the interpreter (and off the GPU): the flag changes nothing there.
"""

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
from worker import ops  # noqa: E402
from worker.kernels.fused import silu_mul  # noqa: E402
from worker.kernels.gemv import GemvTiles, counters_for  # noqa: E402
from worker.kernels.gemv_dense import dense_gemv  # noqa: E402

TOL = {torch.float32: 1e-5, torch.float16: 3e-3}


def _gate_up(m: int, k: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (3 * torch.randn(m, 2 * k, generator=g)).to(dtype)  # gate over [-9, 9]: silu's whole curve


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("m", "n", "k"), [(1, 40, 200), (3, 24, 520), (8, 56, 64)])
def test_act_gemv_equals_silu_mul_then_gemv(m, n, k, dtype):
    """Bitwise equal to the two-kernel path, close to the fp64 product of ops.silu_mul's input, counters
    back at zero."""
    gu = _gate_up(m, k, dtype, seed=m + k)
    g = torch.Generator().manual_seed(n)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(dtype)
    counters = counters_for(n, gu.device)
    act = silu_mul(gu)
    ref = torch.nn.functional.linear(ops.silu_mul(gu).double(), w.double())
    for split, prefetch in ((1, True), (2, False), (3, True)):
        tiles = GemvTiles(block_n=16, block_k=64, num_warps=4, num_stages=1, prefetch=prefetch)
        fused = dense_gemv(gu, w, None, counters, tiles, split_k=split, act=True)
        two = dense_gemv(act, w, None, counters, tiles, split_k=split)
        assert fused.shape == (m, n) and fused.dtype == dtype
        assert torch.equal(fused, two), (split, prefetch, (fused - two).abs().max())
        within(fused, ref, TOL[dtype])
        assert int(counters.abs().sum()) == 0


def test_act_gemv_refuses_a_gate_up_of_the_wrong_width():
    w = torch.randn(16, 64)
    with pytest.raises(ValueError, match=r"x \[2, 100\].*act True"):
        dense_gemv(torch.randn(2, 100), w, act=True)


def test_pdl_is_off_under_the_interpreter_and_changes_nothing():
    from worker.kernels.pdl import active, launch_options

    x = torch.randn(3, 96)
    w = torch.randn(40, 96)
    tiles = GemvTiles(block_n=16, block_k=32, num_warps=4, num_stages=1)
    assert not active(True, x.device) and launch_options(False) == {}
    assert torch.equal(dense_gemv(x, w, None, None, tiles, pdl=True), dense_gemv(x, w, None, None, tiles))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_model_with_the_act_gemv_matches_the_reference_model(tmp_path, monkeypatch, dtype):
    """Every mlp.c_proj given act counters (as DecodeKernels(act_gemv=True) does on CUDA) decodes through the act
    GEMV (and prefill, above GEMV_MAX_M rows, through SiLU-mul + F.linear); logits equal the unfused model's:
    fp32 within 1e-4, fp16 within 2e-2 (logits of O(4); the GEMV sums in another order than F.linear)."""
    from helpers import TINY, write_checkpoint
    from paged import Paged
    from random_weights import random_checkpoint
    from worker.layers.decode_kernels import DecodeKernels
    from worker.layers.linear import RowParallelLinear
    from worker.models.qwen import FlashQwenForCausalLM

    cfg = {**TINY, "seq_length": 8}
    path = write_checkpoint(str(tmp_path / "ckpt"), cfg, random_checkpoint(cfg, 3))
    ref = FlashQwenForCausalLM.from_pretrained(path, dtype=dtype, progress=False, fused=False)
    model = FlashQwenForCausalLM.from_pretrained(path, dtype=dtype, progress=False, fused=True)
    for layer in model.transformer.layers():
        layer.mlp.c_proj.set_decode_kernels(DecodeKernels(act_gemv=True))
        assert layer.mlp.c_proj.act_counters is None  # the CPU has no act GEMV of its own
        layer.mlp.c_proj.act_counters = counters_for(cfg["hidden_size"], torch.device("cpu"))
    calls: list[int] = []
    forward_act = RowParallelLinear.forward_act

    def spy(self, gate_up):
        calls.append(gate_up.shape[0])
        return forward_act(self, gate_up)

    monkeypatch.setattr(RowParallelLinear, "forward_act", spy)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    runners = [Paged(m, seed=2) for m in (ref, model)]
    seqs = [[5, 9, 2, 7, 1, 3, 8, 4, 6, 11, 12], [3, 1], [40, 41, 42]]
    starts, alphas = [0, 0, 0], [1.0, 1.0, 1.0]
    for step in range(3):  # prefill (17 rows: no act GEMV), then two decode steps of 3 rows
        outs = [r.step([0, 1, 2], seqs, starts, alphas, prefill=step == 0) for r in runners]
        for a, b in zip(*outs):
            torch.testing.assert_close(b, a, atol=tol, rtol=0)
        starts = [len(s) for s in seqs]
        seqs = [s + [int(o[-1].argmax())] for s, o in zip(seqs, outs[0])]
    assert calls == [3] * (2 * cfg["num_hidden_layers"])
