"""DecodeKernels.norm_fold's plumbing on the CPU (its kernels: tests/gpu/test_gpu_norm_fold.py).

The model's folded decode (FlashQwenModel.forward through FlashQwenLayer.forward_folded: ln_2 into attn.c_proj and
gate_up, each ln_1 but the first into the previous block's mlp.c_proj and c_attn, the last block's mlp output to ln_f)
with the linears' folded methods written here from Deferred's definition in PyTorch (x = s * weight, each 32-column
tile's sum of s², the consumer's rows scaled by rsqrt(mean(s²) + eps)) equals the unfolded decode in fp32, and it ran
the 2 RMSNorms left (the first ln_1, ln_f). `folds_norms` says no at prefill, with adapters and without the fused
kernels, and yes where the four linears fold and gate_up gives its activation."""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F

from helpers import TINY, write_checkpoint
from paged import Paged
from random_weights import random_checkpoint
from worker.layers.decode_kernels import DecodeKernels, apply_decode_kernels
from worker.layers.linear import ColumnParallelLinear, RowParallelLinear
from worker.layers.norm import Deferred, RMSNorm
from worker.models.qwen import FlashQwenForCausalLM, FlashQwenModel


def _forward_norm(self, x, residual, norm):
    s = self(x) + residual
    squares = (s**2).view(s.shape[0], -1, 32).sum(-1)
    return Deferred(s * norm.weight, squares, norm.eps), s


def _forward_scaled(self, d):
    rstd = torch.rsqrt(d.squares.sum(-1, keepdim=True) / d.x.shape[1] + d.eps)
    y = F.linear(d.x, self.weight) * rstd
    return y if self.bias is None else y + self.bias


def _forward_silu_mul(self, x):
    gate, up = (_forward_scaled(self, x) if isinstance(x, Deferred) else self(x)).chunk(2, -1)
    return up * F.silu(gate)


def _model(tmp_path):
    path = write_checkpoint(str(tmp_path / "ckpt"), TINY, random_checkpoint(TINY, 4))  # ln weights 1 + 0.1 N(0, 1)
    return FlashQwenForCausalLM.from_pretrained(path, dtype=torch.float32, progress=False, fused=False)


def test_the_folded_decode_equals_the_unfolded_one(tmp_path, monkeypatch):
    monkeypatch.setattr(RowParallelLinear, "forward_norm", _forward_norm, raising=False)
    monkeypatch.setattr(ColumnParallelLinear, "forward_scaled", _forward_scaled, raising=False)
    monkeypatch.setattr(ColumnParallelLinear, "forward_silu_mul", _forward_silu_mul, raising=False)
    norms: list[int] = []
    forward = RMSNorm.forward
    monkeypatch.setattr(RMSNorm, "forward", lambda self, *a: norms.append(1) or forward(self, *a))
    model = _model(tmp_path)
    runners = [Paged(model, seed=3), Paged(model, seed=3)]
    seqs = [[5, 9, 2, 7, 1, 3, 8], [3, 1, 4]]
    out = [r.step([0, 1], seqs, [0, 0], [1.0, 1.0], True) for r in runners][0]
    seqs = [s + [int(o[-1].argmax())] for s, o in zip(seqs, out)]
    for rows in ([0, 1], [1], [0, 1]):  # decode steps of 2 rows and 1
        got = []
        for fold, r in zip((False, True), runners):
            folds = (lambda self, ctx, n: not ctx.is_prefill) if fold else (lambda self, ctx, n: False)
            monkeypatch.setattr(FlashQwenModel, "folds_norms", folds)
            norms.clear()
            got.append(
                r.step(rows, [seqs[i] for i in rows], [len(seqs[i]) - 1 for i in rows], [1.0] * len(rows), False)
            )
            assert len(norms) == (2 if fold else 2 * TINY["num_hidden_layers"] + 1)
        for a, b in zip(*got):
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
        for i, o in zip(rows, got[0]):
            seqs[i] = seqs[i] + [int(o[-1].argmax())]


def test_folds_norms_says_when(tmp_path, monkeypatch):
    model = _model(tmp_path)
    t = model.transformer
    decode = SimpleNamespace(is_prefill=False, adapter_data=None)
    assert not t.folds_norms(decode, 1)  # float linears have no folded launch
    for cls in (ColumnParallelLinear, RowParallelLinear):
        monkeypatch.setattr(cls, "folds_norm", lambda self, m: m <= 2, raising=False)
    assert not t.folds_norms(decode, 1)  # the PyTorch norms (fused off)
    t.ln_f.fused = True
    assert not t.folds_norms(decode, 1)  # gate_up does not give its activation (gptq_act_out off)
    apply_decode_kernels(t, DecodeKernels(gptq_act_out=True))
    assert t.folds_norms(decode, 1) and t.folds_norms(decode, 2)
    assert not t.folds_norms(decode, 3)  # a linear does not fold at 3 rows
    assert not t.folds_norms(SimpleNamespace(is_prefill=True, adapter_data=None), 1)
    assert not t.folds_norms(SimpleNamespace(is_prefill=False, adapter_data=object()), 1)


def test_the_fold_arguments_are_checked_naming_the_tensor():
    """gemv_cuda's kNorm operands (no GPU needed): the producer's residual, weight, sums and squares and the
    consumer's squares must be contiguous tensors of their shapes and dtypes, else a ValueError names the one."""
    import pytest

    from worker.kernels.gemv_cuda import _fold_args

    bf = torch.bfloat16
    M, N, K = 2, 4096, 11008
    good = dict(
        norm_out=(torch.zeros(M, N, dtype=bf), torch.ones(N, dtype=bf)),
        sums=torch.zeros(M, N, dtype=bf),
        squares=torch.zeros(M, N // 32),
        row_scale=None,
    )
    fold, form = _fold_args(M, N, K, bf, **good)
    assert form == 1 and fold.sum == good["sums"].data_ptr() and fold.sq == good["squares"].data_ptr()
    for name, bad in (
        ("squares", dict(squares=torch.zeros(M, N // 16))),
        ("residual", dict(norm_out=(torch.zeros(M, N), torch.ones(N, dtype=bf)))),
        ("weight", dict(norm_out=(torch.zeros(M, N, dtype=bf), torch.ones(N + 1, dtype=bf)))),
        ("sums", dict(sums=None)),
        ("sums", dict(sums=torch.zeros(N, M, dtype=bf).t())),
    ):
        with pytest.raises(ValueError, match=f"norm_out's {name} must be"):
            _fold_args(M, N, K, bf, **{**good, **bad})
    squares = torch.rand(M, 128)
    fold, form = _fold_args(M, N, K, bf, None, None, None, (squares, 1e-6))
    assert form == 2 and fold.tiles_in == 128 and fold.inv_n == pytest.approx(1 / K) and fold.eps == pytest.approx(1e-6)
    with pytest.raises(ValueError, match="row_scale's squares must be"):
        _fold_args(1, N, K, bf, None, None, None, (squares, 1e-6))  # 2 rows of squares for 1 row
    assert _fold_args(M, N, K, bf, None, None, None, None)[1] == 0
