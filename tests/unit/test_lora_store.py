"""Decode's adapter term written whole into an unzeroed buffer (`lora_expand(store=True)`, LoraTerm's
"side_store" mode) and the shrink's K split aimed at more programs per SM (`per_sm`), against the PyTorch
reference on the CPU through the Triton interpreter (fp32 and fp16).

The buffer starts as NaN: every row and column must be written, base rows (slot 0) and a part an adapter
does not target (rank 0) with exact zeros.
"""

from __future__ import annotations

import os
import sys
from types import SimpleNamespace

import pytest

if "worker.kernels.lora" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton kernels already compiled for the GPU in this session", allow_module_level=True)
os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere

import torch  # noqa: E402

pytest.importorskip("triton")

from test_lora_kernels import SHAPES, TOL, make_pool, segments  # noqa: E402

from worker.kernels import lora as kernels  # noqa: E402
from worker.kernels.lora import add_lora_reference, lora_expand, lora_shrink  # noqa: E402
from worker.layers.lora import AdapterBatchData, LoraTerm  # noqa: E402

SLOT_RANKS = {1: [4, 4], 2: [16, 16], 3: [8, 0]}  # slot 3: the second part not targeted


def ranks_for(P: int) -> dict[int, list[int]]:
    return {s: r[:P] for s, r in SLOT_RANKS.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("P,K,N,r_max", SHAPES)
def test_expand_store_writes_every_row(dtype, P, K, N, r_max):
    a, b, ranks, (ca, cb) = make_pool(P, K, N, r_max, ranks_for(P), dtype, seed=11)
    data = AdapterBatchData.for_decode(torch.tensor([2, 0, 1, 3, 3, 0, 2]))
    x = torch.randn(7, K, generator=torch.Generator().manual_seed(1)).to(dtype)
    delta = torch.full((7, P * N), float("nan"), dtype=dtype)
    lora_expand(delta, lora_shrink(x, a, ranks, *segments(data)), b, ranks, *segments(data), store=True)
    ref = torch.zeros(7, P * N, dtype=dtype)
    add_lora_reference(ref, x, ca, cb, data.token_idx, data.valid, data.slots)
    assert torch.isfinite(delta).all()  # every row and column written
    torch.testing.assert_close(delta, ref, atol=TOL[dtype][0], rtol=TOL[dtype][1])
    assert not delta[data.slots == 0].any()  # base rows: exact zeros
    if P == 2:
        assert not delta[3:5, N:].any() and delta[3:5, :N].any()  # slot 3's untargeted part: zeros


def test_expand_store_needs_one_segment_per_row():
    """A prefill batch (or decode rows of base requests left out of the segments) would leave rows
    unwritten: refused, naming the segments."""
    a, b, ranks, _ = make_pool(1, 96, 120, 16, {1: [4]}, torch.float32, seed=1)
    for data, rows in (
        (AdapterBatchData.build([1, 0], [3, 2], "cpu"), 5),
        (AdapterBatchData.build([1, 0], [1, 1], "cpu"), 2),
    ):
        h = lora_shrink(torch.randn(rows, 96), a, ranks, *segments(data))
        with pytest.raises(
            ValueError,
            match=f"store needs one segment per row of y \\(1 segments, max_len {data.max_len}, {rows} rows\\)",
        ):
            lora_expand(torch.zeros(rows, 120), h, b, ranks, *segments(data), store=True)


@pytest.mark.parametrize(
    "slots,tokens", [([2, 0, 1, 3], None), ([2, 0, 1, 0], [1, 1, 1, 1])]
)  # graphed decode (every row a segment); eager decode of build() (base rows are no segment)
def test_lora_term_side_store_equals_side(slots, tokens):
    """LoraTerm "side_store" (no stream on the CPU) gives "side"'s result, bit for bit, and where base rows
    are no segment it falls back to zeroing the buffer (no ValueError, base rows exact); its per_sm field
    reaches the shrink's K split."""
    P, K, N, r_max = 2, 600, 72, 16  # K long enough for a K split
    a, b, ranks, (ca, cb) = make_pool(P, K, N, r_max, ranks_for(P), torch.float32, seed=5)
    sl = torch.tensor(slots)
    data = AdapterBatchData.for_decode(sl) if tokens is None else AdapterBatchData.build(slots, tokens, "cpu")
    g = torch.Generator().manual_seed(3)
    x, y0 = torch.randn(len(slots), K, generator=g), torch.randn(len(slots), P * N, generator=g)
    out, splits = {}, []

    def shrink(*args, **kw):  # the real shrink; records its K split
        h = kernels.lora_shrink(*args, **kw)
        splits.append(h.shape[0])
        return h

    spy = SimpleNamespace(shrink_buffer=kernels.shrink_buffer, lora_shrink=shrink, lora_expand=kernels.lora_expand)
    for mode, per_sm in (("side", 2), ("side_store", 2), ("side_store", 16)):
        term = LoraTerm(a, b, ranks, spy, None, decode=mode, per_sm=per_sm)
        out[mode, per_sm] = term.apply(lambda: y0.clone(), x, data)
    ref = y0.clone()
    add_lora_reference(ref, x, ca, cb, data.token_idx, data.valid, data.slots)
    assert torch.equal(out["side_store", 2], out["side", 2])
    for y in out.values():
        torch.testing.assert_close(y, ref, atol=2e-5, rtol=2e-5)
        assert torch.equal(y[sl == 0], y0[sl == 0])
    assert splits[0] == splits[1] <= splits[2], splits
    assert tokens or splits[1] < splits[2], splits  # per_sm reaches the shrink (4 segments: room to split)


def test_shrink_per_sm_splits_k_finer():
    """per_sm raises decode's K split (more, smaller programs); the expand still sums the partials right."""
    P, K, N, r_max = 1, 600, 48, 64
    a, b, ranks, (ca, cb) = make_pool(P, K, N, r_max, ranks_for(P), torch.float32, seed=8)
    data = AdapterBatchData.for_decode(torch.tensor([2, 0, 1, 3]))
    x, y0 = torch.randn(4, K), torch.randn(4, N)
    ref = y0.clone()
    add_lora_reference(ref, x, ca, cb, data.token_idx, data.valid, data.slots)
    splits = []
    for per_sm in (2, 8):
        h = lora_shrink(x, a, ranks, *segments(data), decode_k=16, per_sm=per_sm)
        splits.append(h.shape[0])
        y = y0.clone()
        lora_expand(y, h, b, ranks, *segments(data))
        torch.testing.assert_close(y, ref, atol=2e-5, rtol=2e-5)
    assert splits[1] > splits[0] > 1, splits
