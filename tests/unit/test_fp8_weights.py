"""FP8 weights quantized at load (`--quantize fp8`): per-output-channel e4m3 weights, per-token e4m3
activations. The error bound comes from e4m3 itself (3 mantissa bits: a normal value rounds to within
2^-4 of itself, relative; below 2^-6 the subnormal step is 2^-9, so within 2^-10 absolute, in scaled units)."""

from __future__ import annotations

import pytest
import torch

import reference
from helpers import TINY, write_checkpoint
from paged import Paged
from random_weights import random_checkpoint
from worker.layers.fp8_linear import FP8ColumnParallelLinear, FP8RowParallelLinear
from worker.models.qwen import FlashQwenForCausalLM
from worker.quant.fp8 import FP8_MAX, fp8_matmul_reference, quantize_rows

REL, SUB = 2.0**-4, 2.0**-10  # e4m3: relative rounding of normals, absolute rounding of subnormals (scaled)


def _bound(v: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Largest |v̂ − v| e4m3 allows for v quantized with `scale` (max |v| per row maps to 448)."""
    return REL * v.abs() + SUB * scale


def test_rows_quantize_within_the_e4m3_bound():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 80, generator=g) * torch.logspace(-3, 1, 24)[:, None]  # rows of very different size
    wq, s = quantize_rows(w)
    assert wq.dtype == torch.float8_e4m3fn and s.shape == (24, 1)
    assert torch.allclose(s[:, 0], w.abs().amax(1) / FP8_MAX)
    deq = wq.double() * s.double()
    assert ((deq - w.double()).abs() <= _bound(w.double(), s.double())).all()
    assert torch.equal(quantize_rows(torch.zeros(2, 16))[0].float(), torch.zeros(2, 16))  # no NaN from 0/0


def test_matmul_within_the_e4m3_bound_of_the_float_product():
    """|Σ x̂ŵ − Σ xw| <= Σ (|x̂ − x| |w| + |x̂| |ŵ − w|): each term bounded by e4m3's rounding."""
    g = torch.Generator().manual_seed(1)
    x, w, b = torch.randn(5, 64, generator=g), torch.randn(40, 64, generator=g) / 8, torch.randn(40, generator=g)
    wq, ws = quantize_rows(w)
    y = fp8_matmul_reference(x, wq, ws[:, 0], b)
    exact = x.double() @ w.double().t() + b.double()
    xs = x.abs().amax(1, keepdim=True).double() / FP8_MAX
    dx = _bound(x.double(), xs)  # [M, K]
    dw = _bound(w.double(), ws.double())  # [N, K]
    bound = dx @ w.double().abs().t() + (x.double().abs() + dx) @ dw.t() + 1e-5
    assert ((y.double() - exact).abs() <= bound).all()
    assert (y.double() - exact).abs().max() > 1e-4  # it did quantize


def test_fp8_model_equals_reference_with_the_same_quantized_operands(tmp_path, monkeypatch):
    """`--quantize fp8` on a float checkpoint: the five linears hold e4m3 weights; logits equal the float64
    reference whose linears use the same e4m3 weights and per-token e4m3 activations (torch's own e4m3 cast
    as the rounding), everything else (wte, norms, lm_head) float."""
    cfg = {**TINY, "seq_length": 16}
    state = random_checkpoint(cfg, seed=4)
    path = write_checkpoint(str(tmp_path / "ckpt"), cfg, state)
    model = FlashQwenForCausalLM.from_pretrained(path, dtype=torch.float32, progress=False, quantize="fp8")
    layer = model.transformer.layers()[0]
    assert isinstance(layer.attn.c_attn, FP8ColumnParallelLinear) and isinstance(layer.mlp.c_proj, FP8RowParallelLinear)
    assert layer.mlp.gate_up.weight.dtype == torch.float8_e4m3fn
    assert model.lm_head.weight.dtype == torch.float32 and model.transformer.wte.weight.dtype == torch.float32

    def e4m3(t: torch.Tensor) -> torch.Tensor:  # per-row scaled e4m3 round trip, in float64
        s = t.abs().amax(-1, keepdim=True) / FP8_MAX
        return (t / s).float().to(torch.float8_e4m3fn).double() * s

    def fp8_linear(x, st, name):
        y = e4m3(x) @ e4m3(st[name + ".weight"].double()).T
        b = st.get(name + ".bias")
        return y if b is None else y + b.double()

    monkeypatch.setattr(reference, "_linear", fp8_linear)
    prompts = [[1, 2, 3, 4, 5, 6, 7], [200, 100]]
    out = Paged(model).step([0, 1], prompts, [0, 0], [1.0, 1.0], True)
    for p, o in zip(prompts, out):
        ref = reference.ref_forward(state, cfg, p)
        # same operands: only fp32 vs float64 arithmetic differs (an e4m3 rounding flipped at a tie would
        # show as ~1e-2; deterministic inputs, none here)
        assert (o.double() - ref).abs().max().item() <= 1e-4
    monkeypatch.undo()
    plain = reference.ref_forward(state, cfg, prompts[0])
    assert (out[0].double() - plain).abs().max() > 1e-3  # the weights really are e4m3


def test_fp8_needs_a_float_checkpoint(tmp_path):
    from gptq_helpers import gptq_checkpoint
    from worker.config import ConfigError

    cfg = {**TINY, "seq_length": 16}
    path, _ = gptq_checkpoint(str(tmp_path / "q"), cfg, random_checkpoint(cfg, seed=1), 4, 32, True, False)
    with pytest.raises(ConfigError, match="--quantize fp8 needs a floating-point checkpoint"):
        FlashQwenForCausalLM.from_pretrained(path, dtype=torch.float32, progress=False, quantize="fp8")


def test_fp8_layers_rebuild_their_matmul_for_the_model_decode_kernels(tmp_path, monkeypatch):
    """DecodeKernels(pdl=True) reaches every FP8 linear: each rebuilds its matmul so the decode GEMV launches
    with PDL (the served default on sm_90+), and pdl=False rebuilds it plainly."""
    from worker.layers import fp8_linear
    from worker.layers.decode_kernels import DecodeKernels, apply_decode_kernels

    cfg = {**TINY, "seq_length": 16}
    path = write_checkpoint(str(tmp_path / "ckpt"), cfg, random_checkpoint(cfg, seed=4))
    model = FlashQwenForCausalLM.from_pretrained(path, dtype=torch.float32, progress=False, quantize="fp8")
    layers = [m for m in model.modules() if isinstance(m, fp8_linear._FP8)]
    real, built = fp8_linear.fp8_matmul_for, []

    def spy(device, out_features, pdl=False):
        built.append(pdl)
        return real(device, out_features, pdl)

    monkeypatch.setattr(fp8_linear, "fp8_matmul_for", spy)
    apply_decode_kernels(model.transformer, DecodeKernels(pdl=True))
    assert len(layers) == 4 * cfg["num_hidden_layers"] and built == [True] * len(layers)
    built.clear()
    apply_decode_kernels(model.transformer, DecodeKernels())
    assert built == [False] * len(layers)
