"""c_attn's adapter term beside its base GEMM, added by the RoPE step (DecodeKernels.lora_side_term, issue 17, P2): the
term kernel sums ln_1's partials of h and multiplies by B (on the pool's side stream on a GPU; here, the CPU through
the Triton interpreter, on the one stream), c_attn's base GEMM keeps its bias, and the RoPE + KV-store kernel (or one
add without rope_store) adds the term to q, k and v. Against the float64 reference model with each adapter merged."""

from __future__ import annotations

import os
import sys

import pytest

if "worker.kernels.lora" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton kernels already compiled for the GPU in this session", allow_module_level=True)
os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere

import torch  # noqa: E402

pytest.importorskip("triton")

from worker.adapters import slots as slots_mod  # noqa: E402
from worker.layers import lora as lora_layer  # noqa: E402
from worker.layers.decode_kernels import DecodeKernels, apply_decode_kernels  # noqa: E402


@pytest.mark.parametrize("rope_store", [True, False])
def test_model_decode_with_the_side_term_equals_the_reference(tmp_path, monkeypatch, rope_store):
    """The tiny model (fused kernels, fp32) decoding a mixed batch (two adapters and a base row) with the served LoRA
    kernels and lora_side_term: c_attn's term launch runs once a layer, the RoPE + KV-store kernel adds it (with
    rope_store) or torch adds it before the separate rotary, and the logits equal the float64 reference with each
    adapter merged."""
    from lora_helpers import count_launches, interpreted_lora_decode
    from reference import ref_forward

    monkeypatch.setattr(slots_mod, "LANES_MAX_SHARE", 4.0)
    run = interpreted_lora_decode(tmp_path, seed=37, fused=True, lens=(4, 7, 3), which=(2, 0, 1))
    opts = DecodeKernels(
        rope_store=rope_store,
        lora_act_shrink=True,
        lora_term_first=True,
        lora_norm_shrink=True,
        lora_k_lanes=True,
        lora_side_term=True,
    )
    apply_decode_kernels(run.model, opts)
    for term in run.terms:
        term.decode = "gemm"
    assert all(term.side_term for term in run.terms)
    monkeypatch.setattr(lora_layer, "JOINT_MIN_ROWS", 1)
    launches = count_launches(monkeypatch)
    out = run.paged.step([0, 1, 2], run.seqs, [len(s) - 1 for s in run.seqs], run.alphas, False, run.slots)
    layers = run.cfg["num_hidden_layers"]
    assert launches.count("_expand_rows_partials_kernel") == layers  # c_attn's term
    assert launches.count("_rope_store_kernel") == layers * rope_store
    for s, p, a, o in zip(run.seqs, run.prompts, run.which, out):
        worst = (o[-1].double() - ref_forward(run.merged[a], run.cfg, s, prompt_len=len(p))[-1]).abs().max().item()
        assert worst <= 1e-4, worst


def test_apply_partials_term_is_base_plus_term_and_off_without_the_flag():
    """LoraTerm.apply_partials_term: with side_term, (base(), term) where base() is the caller's base matmul (its bias
    kept) and term each row's B[s] h (h: the partials' sum; zeros on base rows), float64 here; without the flag,
    apply_partials' one tensor (the term inside) and None."""
    from worker.kernels import lora as kernels
    from worker.layers.lora import AdapterBatchData, JointWeight, LoraTerm

    g = torch.Generator().manual_seed(5)
    S, N, r, tiles = 3, 40, 4, 2
    b = torch.randn(S, 1, N, r, generator=g)
    b[0] = 0
    ranks = torch.tensor([[0, 4, 4]], dtype=torch.int32)
    parts = torch.randn(4, tiles, r, generator=g)
    slots = torch.tensor([1, 0, 2, 1])
    data = AdapterBatchData.for_decode(slots)
    x = torch.randn(4, 8, generator=g)
    base_out = torch.randn(4, N, generator=g)
    joint = JointWeight(torch.zeros(N + S * r, 8), None, N)
    on = LoraTerm(torch.zeros(S, 1, r, 8), b, ranks, kernels, None, decode="gemm", joint=joint, side_term=True)
    y, term = on.apply_partials_term(lambda: base_out.clone(), x, parts, data)
    assert torch.equal(y, base_out) and term is not None
    for t, s in enumerate(slots.tolist()):
        want = b[s, 0].double() @ parts[t].double().sum(0)
        torch.testing.assert_close(term[t].double(), want, atol=1e-5, rtol=1e-5)
    off = LoraTerm(torch.zeros(S, 1, r, 8), b, ranks, kernels, None, decode="gemm", joint=joint)
    y_off, none = off.apply_partials_term(lambda: base_out.clone(), x, parts, data)
    assert none is None
    torch.testing.assert_close(y_off, base_out + term)
