"""The kernels of LoRA decode's "gemm" mode (worker/kernels/lora_rows.py, lora_norm.py) compiled on CUDA, in bf16 at
Qwen-7B sizes with PDL on: against fp32 references and the kernels they replace (the unit tests,
tests/unit/test_lora_rows.py, check the same kernels' logic under the interpreter).
Run: `pytest -q -s -m gpu tests/gpu/test_gpu_lora_rows.py`.
"""

from __future__ import annotations

import pytest
import torch

from helpers import GPU_TRITON_MARKS

pytestmark = GPU_TRITON_MARKS
pytest.importorskip("triton")

from worker.kernels import lora as kernels  # noqa: E402
from worker.layers.lora import AdapterBatchData  # noqa: E402

CUDA = torch.device("cuda")


@pytest.mark.parametrize("P,K,N", [(1, 4096, 12288 + 40), (2, 4096, 11008), (1, 11008, 4096)])
def test_joint_gemm_expand_rows_bf16(P, K, N):
    """The "gemm" decode path at 7B-like sizes in bf16 (batch 33, 32 rank-16 adapters, a base row, a rank-8
    slot; PDL on): the joint GEMM + lora_expand_rows within twice the bf16 reference's own error of the fp32
    reference, base rows equal to the wider GEMM's base columns; the gate|up launch equals the expand then
    fused.silu_mul bit for bit, and with the consumer's shrink (lora_act_shrink) its partials sum to act · A2ᵀ and
    their expand adds B2 h."""
    from worker.kernels.fused import silu_mul

    g = torch.Generator(device=CUDA).manual_seed(P + N)
    S, R, T = 33, 16, 33
    weight = (torch.randn(P * N + S * P * R, K, device=CUDA, generator=g) * K**-0.5).to(torch.bfloat16)
    a = weight[P * N :].view(S, P, R, K)
    a[0].zero_()
    a[S - 1, :, 8:].zero_()
    b = (torch.randn(S, P, N, R, device=CUDA, generator=g) * R**-0.5).to(torch.bfloat16)
    b[0].zero_()
    b[S - 1, :, :, 8:].zero_()
    slots = torch.tensor([0, *range(1, T)], device=CUDA)
    x = torch.randn(T, K, device=CUDA, generator=g).to(torch.bfloat16)
    out = torch.nn.functional.linear(x, weight)
    y = kernels.lora_expand_rows(out, P * N, b, slots, pdl=True)
    data = AdapterBatchData.for_decode(slots)
    ref = torch.nn.functional.linear(x, weight[: P * N])
    ref32 = torch.nn.functional.linear(x.float(), weight[: P * N].float())
    kernels.add_lora_reference(ref, x, a, b, data.token_idx, data.valid, data.slots)
    kernels.add_lora_reference(ref32, x.float(), a.float(), b.float(), data.token_idx, data.valid, data.slots)
    err, ref_err = ((t.float() - ref32).abs().max().item() for t in (y, ref))
    assert err <= 2 * ref_err, (err, ref_err)
    assert torch.equal(y[0], out[0, : P * N])
    if P == 2:
        act, none = kernels.lora_expand_rows_silu_mul(out, P * N, b, slots, pdl=True)
        assert torch.equal(act, silu_mul(y)) and none is None
        # mlp.c_proj's shrink in the same launch (lora_act_shrink): its h from the partials vs a bf16 matmul of act
        a2 = torch.zeros(S, 1, R, N, device=CUDA, dtype=torch.bfloat16)
        a2[1:, :, :8].normal_(0.0, N**-0.5, generator=g)
        b2 = torch.zeros(S, 1, K, R, device=CUDA, dtype=torch.bfloat16)
        b2[1:, :, :, :8].normal_(0.0, 0.02, generator=g)
        act2, parts = kernels.lora_expand_rows_silu_mul(out, P * N, b, slots, pdl=True, shrink=a2)
        assert torch.equal(act2, act)
        h = torch.einsum("tn,trn->tr", act.float(), a2[slots, 0].float())
        torch.testing.assert_close(parts.sum(1)[:, :R], h, atol=1e-3, rtol=1e-3)
        y0 = torch.randn(T, K, device=CUDA, generator=g).to(torch.bfloat16)
        y2 = kernels.lora_expand_rows_partials(y0, parts, b2, slots, pdl=True)
        want = y0.float() + torch.einsum("tr,tkr->tk", h.to(torch.bfloat16).float(), b2[slots, 0].float())
        torch.testing.assert_close(y2.float(), want, atol=2e-2, rtol=2e-2)
        assert torch.equal(y2[0], y0[0])
        # lora_term_first: the same term alone, which the base GEMM then adds (addmm): y0 + term rounded once
        term = kernels.lora_term_rows_partials(parts, b2, slots, pdl=True)
        assert torch.equal(torch.add(y0, term), y2) and not term[0].any()


def test_rms_norm_shrink_bf16():
    """lora_norm_shrink's launch at the 7B width in bf16 (batch 33, 32 rank-16 adapters and a base row, PDL on):
    (out, s) equal fused.rms_norm's bit for bit, the partials sum to A[slot] · out (fp32 reference), zero on the
    base row."""
    from worker.kernels.fused import rms_norm
    from worker.kernels.lora_norm import rms_norm_shrink

    g = torch.Generator(device=CUDA).manual_seed(4096)
    S, R, T, H = 33, 16, 33, 4096
    a = (torch.randn(S, 1, R, H, device=CUDA, generator=g) * H**-0.5).to(torch.bfloat16)
    a[0].zero_()
    w = (1 + 0.1 * torch.randn(H, device=CUDA, generator=g)).to(torch.bfloat16)
    x, res = (torch.randn(T, H, device=CUDA, generator=g).to(torch.bfloat16) for _ in range(2))
    slots = torch.tensor([0, *range(1, T)], device=CUDA)
    out, total, parts = rms_norm_shrink(x, w, 1e-6, res, a, slots, pdl=True)
    want_out, want_total = rms_norm(x, w, 1e-6, res)
    assert torch.equal(out, want_out) and torch.equal(total, want_total)
    h = torch.einsum("tn,trn->tr", out.float(), a[slots, 0].float())
    torch.testing.assert_close(parts.sum(1), h, atol=1e-3, rtol=1e-3)
    assert not parts[0].any()


def test_h_into_lanes_bf16_eager_and_graphed():
    """lora_k_lanes' producer at 7B widths in bf16 (batch 33, 32 rank-16 adapters and a base row, PDL on): the gate|up
    launch with lanes writes the same activation bit for bit as without, each row's lanes hold its h (the partials'
    sum, rounded: fp32 reference) in its slot's lanes and zeros elsewhere, the row counters are zero after every
    launch, and ten replays of a CUDA graph of it equal the eager result bit for bit (the last program to arrive sums
    in tile order, whichever it is)."""
    from worker.kernels.lora_rows import row_counters

    g = torch.Generator(device=CUDA).manual_seed(11008)
    S, R, T, H, N = 33, 16, 33, 4096, 11008
    weight = (torch.randn(2 * N + S * 2 * R, H, device=CUDA, generator=g) * H**-0.5).to(torch.bfloat16)
    b = (torch.randn(S, 2, N, R, device=CUDA, generator=g) * R**-0.5).to(torch.bfloat16)
    a2 = (torch.randn(S, 1, R, N, device=CUDA, generator=g) * N**-0.5).to(torch.bfloat16)
    for t in (weight[2 * N :].view(S, 2, R, H), b, a2):
        t[0].zero_()
    slots = torch.tensor([0, *range(1, T)], device=CUDA)
    x = torch.randn(T, H, device=CUDA, generator=g).to(torch.bfloat16)
    out = torch.nn.functional.linear(x, weight)

    def launch():
        return kernels.lora_expand_rows_silu_mul(out, 2 * N, b, slots, pdl=True, shrink=a2, lanes=True)

    act, joint_in = launch()
    torch.cuda.synchronize()
    assert not row_counters(T, CUDA).any()
    assert torch.equal(act, kernels.lora_expand_rows_silu_mul(out, 2 * N, b, slots, pdl=True, shrink=a2)[0])
    h = torch.einsum("tn,trn->tr", act.float(), a2[slots, 0].float())
    lanes = joint_in[:, N:].view(T, S, R)
    got = lanes[torch.arange(T, device=CUDA), slots]
    torch.testing.assert_close(got.float(), h.to(torch.bfloat16).float(), atol=2e-2, rtol=2e-2)
    mask = torch.ones(T, S, dtype=torch.bool, device=CUDA)
    mask[torch.arange(T, device=CUDA), slots] = False
    assert not lanes[mask].any()
    eager = joint_in.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _, g_joint = launch()
    for _ in range(10):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(g_joint, eager) and not row_counters(T, CUDA).any()
