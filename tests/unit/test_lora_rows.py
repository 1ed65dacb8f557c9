"""The kernels of LoRA decode's "gemm" mode (issue 17, P2) on the CPU through the Triton interpreter, each against a
float64 loop written here from its definition on awkward sizes: `lora_expand_rows` over the joint GEMM's output, the
gate|up expand + activation (with mlp.c_proj's shrink partials), the partials' expand and the term alone
(worker/kernels/lora_rows.py), and RMSNorm with c_attn's shrink (worker/kernels/lora_norm.py)."""

from __future__ import annotations

import os
import sys

import pytest

if "worker.kernels.lora" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton kernels already compiled for the GPU in this session", allow_module_level=True)
os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere

import torch  # noqa: E402

pytest.importorskip("triton")

from lora_helpers import term_f64  # noqa: E402
from worker.kernels.lora_rows import lora_expand_rows  # noqa: E402


# block_n 0: the launcher's tile (TILE's 256 columns) at 40 lanes a slot
@pytest.mark.parametrize(
    "P,K,N,r_max,block_n", [(1, 40, 3 * 24, 12, 32), (2, 33, 50, 16, 16), (1, 70, 20, 5, 64), (1, 30, 150, 40, 0)]
)
def test_expand_rows_equals_the_definition(P, K, N, r_max, block_n):
    """Awkward sizes (N not a multiple of the tile, r_max not a power of two); ranks below r_max, the lanes
    past them zero in A and B (the pool's invariant), so the GEMM's h is zero there too (the kernel reads every
    lane); base rows (slot 0) come out as the base output exactly."""
    g = torch.Generator().manual_seed(P * K)
    S = 4
    ranks = torch.tensor([[0, r_max, 3, r_max - 1], [0, 2, r_max, 0]][:P], dtype=torch.int32)
    a = torch.randn(S, P, r_max, K, generator=g) / K**0.5
    b = torch.randn(S, P, N, r_max, generator=g) / r_max**0.5
    for s in range(S):
        for p in range(P):
            a[s, p, ranks[p, s] :] = 0  # the pool's lanes past a rank are zero (the kernel reads B whole)
            b[s, p, :, ranks[p, s] :] = 0
    w = torch.randn(P * N, K, generator=g) / K**0.5
    slots = torch.tensor([2, 0, 1, 3, 3, 0, 1])
    x = torch.randn(len(slots), K, generator=g)
    out = torch.cat([w, a.reshape(-1, K)]) @ x.T
    out = out.T.contiguous()  # [T, P·N + S·P·r_max]: the joint GEMM's output
    for t, s in enumerate(slots.tolist()):
        for p in range(P):
            col = P * N + (s * P + p) * r_max
            assert not out[t, col + int(ranks[p, s]) : col + r_max].any()  # x · 0: what the kernel relies on
    y = lora_expand_rows(out, P * N, b, slots, block_n=block_n)
    assert y.shape == (len(slots), P * N) and y.is_contiguous()
    for t, s in enumerate(slots.tolist()):
        want = (w.double() @ x[t].double()) + term_f64(x[t], a, b, s, ranks)
        torch.testing.assert_close(y[t].double(), want, atol=2e-5, rtol=2e-5)
        if s == 0:
            assert torch.equal(y[t], out[t, : P * N])


def test_expand_rows_rejects_mismatched_shapes():
    out = torch.zeros(3, 10 + 2 * 4)
    b = torch.zeros(2, 1, 10, 4)
    with pytest.raises(ValueError, match="lora_expand_rows: out"):
        lora_expand_rows(out, 10, b, torch.zeros(2, dtype=torch.long))  # 2 slots for 3 rows
    with pytest.raises(ValueError, match="B pool"):
        lora_expand_rows(torch.zeros(3, 10 + 3 * 4), 10, b, torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("P,N,r_max", [(2, 50, 16), (2, 37, 12)])
def test_expand_rows_silu_mul_is_the_expand_then_silu_mul(P, N, r_max):
    """The gate|up launch equals lora_expand_rows then fused.silu_mul bit for bit, and up · silu(gate) of the
    definition (float64) within fp32 rounding; a pool of another part count is refused."""
    from worker.kernels.fused import silu_mul
    from worker.kernels.lora_rows import lora_expand_rows_silu_mul

    g = torch.Generator().manual_seed(N)
    S, K = 3, 29
    ranks = torch.tensor([[0, r_max, 5], [0, 3, r_max]], dtype=torch.int32)
    a = torch.randn(S, P, r_max, K, generator=g) / K**0.5
    b = torch.randn(S, P, N, r_max, generator=g) / r_max**0.5
    for s in range(S):
        for p in range(P):
            a[s, p, ranks[p, s] :] = 0
            b[s, p, :, ranks[p, s] :] = 0
    w = torch.randn(P * N, K, generator=g) / K**0.5
    slots = torch.tensor([1, 0, 2, 2, 1])
    x = torch.randn(len(slots), K, generator=g)
    out = (torch.cat([w, a.reshape(-1, K)]) @ x.T).T.contiguous()
    y, none = lora_expand_rows_silu_mul(out, P * N, b, slots, block_n=32)
    assert torch.equal(y, silu_mul(lora_expand_rows(out, P * N, b, slots, block_n=32))) and none is None
    for t, s in enumerate(slots.tolist()):
        gate_up = w.double() @ x[t].double() + term_f64(x[t], a, b, s, ranks)
        want = gate_up[N:] * torch.nn.functional.silu(gate_up[:N])
        torch.testing.assert_close(y[t].double(), want, atol=2e-5, rtol=2e-5)
    with pytest.raises(ValueError, match="2 parts, not 1"):
        lora_expand_rows_silu_mul(out[:, : N + S * r_max], N, b[:, :1].contiguous(), slots)


@pytest.mark.parametrize("N,r2,block_n", [(50, 5, 16), (37, 12, 32), (150, 40, 0)])
def test_act_shrink_partials_and_their_expand_equal_the_definition(N, r2, block_n):
    """lora_act_shrink: the gate|up launch also writes the consumer's h in fp32 partials per tile; its output is
    unchanged bit for bit, the partials sum to act · A2ᵀ (float64, act the launch's own output), lanes past a slot's
    rank stay zero; lora_expand_rows_partials then gives y0 + B2 h (float64, h the summed partials); base rows
    (slot 0) keep y0 exactly. Awkward sizes: N not a multiple of the tile, r2_max not a power of two."""
    from worker.kernels.lora_rows import lora_expand_rows_partials, lora_expand_rows_silu_mul, lora_term_rows_partials

    g = torch.Generator().manual_seed(N + r2)
    S, K, r_max, N2 = 3, 29, 8, 23  # N2: the consumer's output width
    ranks = torch.tensor([[0, r_max, 5], [0, 3, r_max]], dtype=torch.int32)
    ranks2 = torch.tensor([[0, r2, 2]], dtype=torch.int32)
    a = torch.randn(S, 2, r_max, K, generator=g) / K**0.5
    b = torch.randn(S, 2, N, r_max, generator=g) / r_max**0.5
    a2 = torch.randn(S, 1, r2, N, generator=g) / N**0.5
    b2 = torch.randn(S, 1, N2, r2, generator=g) / r2**0.5
    for s in range(S):
        for p in range(2):
            a[s, p, ranks[p, s] :] = 0
            b[s, p, :, ranks[p, s] :] = 0
        a2[s, 0, ranks2[0, s] :] = 0
        b2[s, 0, :, ranks2[0, s] :] = 0
    w = torch.randn(2 * N, K, generator=g) / K**0.5
    slots = torch.tensor([1, 0, 2, 2, 1])
    x = torch.randn(len(slots), K, generator=g)
    out = (torch.cat([w, a.reshape(-1, K)]) @ x.T).T.contiguous()
    plain, _ = lora_expand_rows_silu_mul(out, 2 * N, b, slots, block_n=block_n)
    act, parts = lora_expand_rows_silu_mul(out, 2 * N, b, slots, block_n=block_n, shrink=a2)
    assert torch.equal(act, plain)
    tile = block_n or 256  # the expands' default tile keeps its columns at 64 lanes (r2 40)
    assert parts is not None and parts.shape == (len(slots), -(-N // tile), 1 << (r2 - 1).bit_length())
    h = parts.double().sum(1)
    y0 = torch.randn(len(slots), N2, generator=g)
    y = lora_expand_rows_partials(y0, parts, b2, slots, block_n=16)
    for t, s in enumerate(slots.tolist()):
        want_h = a2[s, 0].double() @ act[t].double()
        torch.testing.assert_close(h[t, :r2], want_h, atol=1e-5, rtol=1e-5)
        assert not h[t, r2:].any()
        want = y0[t].double() + b2[s, 0].double() @ h[t, :r2]
        torch.testing.assert_close(y[t].double(), want, atol=2e-5, rtol=2e-5)
    assert torch.equal(y[1], y0[1])
    # lora_term_first: the term alone, each row's B2 h rounded once (float64 h: the summed partials); base rows zero
    term = lora_term_rows_partials(parts, b2, slots, block_n=16)
    assert term.shape == (len(slots), N2) and term.dtype == b2.dtype
    for t, s in enumerate(slots.tolist()):
        torch.testing.assert_close(term[t].double(), b2[s, 0].double() @ h[t, :r2], atol=2e-5, rtol=2e-5)
    assert not term[1].any()
    with pytest.raises(ValueError, match="lora_term_rows_partials"):
        lora_term_rows_partials(parts, b2, slots[1:])
    with pytest.raises(ValueError, match="consumer's A pool"):
        lora_expand_rows_silu_mul(out, 2 * N, b, slots, shrink=a2[:, :, :, 1:])
    with pytest.raises(ValueError, match="lora_expand_rows_partials"):
        lora_expand_rows_partials(y0, parts, b2[:, :, 1:], slots)


@pytest.mark.parametrize(
    "H,block_n,r_max,residual", [(50, 16, 5, True), (64, 32, 8, False), (37, 64, 3, True), (1100, 0, 40, True)]
)
def test_norm_shrink_equals_the_norm_and_the_definition(H, block_n, r_max, residual):
    """lora_norm_shrink's launch: its (out, s) equal fused.rms_norm's (bit for bit here; the same formula per
    column), its fp32 partials per tile sum to A[slot] · out (float64, out the launch's own output), base rows
    (slot 0, a zero pool slot) get zero partials. Awkward sizes: H not a multiple of the tile, r_max not a power
    of two; without a residual s is x itself."""
    from worker.kernels.fused import rms_norm
    from worker.kernels.lora_norm import rms_norm_shrink

    g = torch.Generator().manual_seed(H + r_max)
    S, T = 3, 5
    a = torch.randn(S, 1, r_max, H, generator=g) / H**0.5
    a[0] = 0
    a[2, :, r_max - 1 :] = 0
    w = torch.randn(H, generator=g)
    x = torch.randn(T, H, generator=g)
    res = torch.randn(T, H, generator=g) if residual else None
    slots = torch.tensor([1, 0, 2, 2, 1])
    out, total, parts = rms_norm_shrink(x, w, 1e-6, res, a, slots, block_n=block_n)
    want_out, want_total = rms_norm(x, w, 1e-6, res)
    assert torch.equal(out, want_out) and torch.equal(total, want_total)
    if not residual:
        assert total is x
    tile = block_n or 512  # the default tile at 64 lanes (r_max 40): 2048 columns x 16 lanes / 64
    assert parts.shape == (T, -(-H // tile), 1 << (r_max - 1).bit_length())
    h = parts.double().sum(1)
    for t, s in enumerate(slots.tolist()):
        torch.testing.assert_close(h[t, :r_max], a[s, 0].double() @ out[t].double(), atol=1e-5, rtol=1e-5)
        assert not h[t, r_max:].any()
    assert not parts[1].any()
    with pytest.raises(ValueError, match="rms_norm_shrink"):
        rms_norm_shrink(x, w, 1e-6, res, a[:, :, :, 1:], slots)


def test_tiles_shrink_past_sixteen_lanes_a_slot():
    """lora_rows.tile_columns: the measured tiles (r_max 16) up to 16 lanes, then columns x lanes kept at the tile's
    x 16, never under 16 columns nor above the tile's; ln_1's shrink takes it (its 2048 columns spilled at serve's
    default --max-lora-rank 64: scripts/lora_compile.py)."""
    from worker.kernels.lora_rows import norm_columns, tile_columns

    assert [tile_columns(256, r) for r in (1, 8, 16, 32, 64, 128, 512)] == [256, 256, 256, 128, 64, 32, 16]
    assert tile_columns(8, 64) == 8 and tile_columns(2048, 16) == 2048
    assert [norm_columns(r) for r in (8, 16, 32, 64)] == [2048, 2048, 1024, 512]
