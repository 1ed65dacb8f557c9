"""The multi-LoRA Triton kernels (worker/kernels/lora.py) against their PyTorch reference (`add_lora_reference`),
on the CPU through the Triton interpreter; and the tiny model with the kernels wired in against the
float64 reference with each adapter merged.

Awkward shapes: one token; 7 segments of odd lengths (1 to 40 tokens: every token-tile size); decode rows
(one token each) with base rows among them; ranks 4/8/16 in an r_max-16 pool and a rank-16 slot in an
r_max-64 pool; K and N that are not powers of two or tile multiples; K long enough for decode's K split;
c_attn-like (one part) and gate_up-like (two parts) modules; a part an adapter does not target (rank 0).
Pool lanes past a slot's rank, and slot 0, hold NaN for the kernels: the result is finite and equal to
the reference (which reads zeros there), so the kernels read nothing past the real rank and skip base
rows. Rows outside the segments stay bit-identical. fp32 and fp16 (the interpreter mishandles bf16;
bf16 runs in tests/gpu/test_gpu_lora.py).
"""

from __future__ import annotations

import os
import sys

import pytest

if "worker.kernels.lora" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
    # kernels are bound to the interpreter (or not) when defined: here they were compiled for the GPU by
    # an earlier module (tests/gpu in the same session); run this file on its own instead
    pytest.skip("Triton kernels already compiled for the GPU in this session", allow_module_level=True)
os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere

import torch  # noqa: E402

pytest.importorskip("triton")

from worker.kernels.lora import add_lora, add_lora_reference, lora_shrink  # noqa: E402
from worker.layers.lora import AdapterBatchData  # noqa: E402


def segments(data: AdapterBatchData) -> tuple:
    """The kernels' segment arguments: starts, lens, slots, max_len."""
    return data.starts, data.lens, data.slots, data.max_len


TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (4e-3, 4e-3)}  # (atol, rtol)
LAYERS, MODULES = 3, 5  # the pool's ranks table is [slots, layers, modules]; modules use views of it


def make_pool(P: int, K: int, N: int, r_max: int, slot_ranks: dict[int, list[int]], dtype: torch.dtype, seed: int):
    """(A, B, ranks view [P, slots], clean copies): slot s, part p holds a rank slot_ranks[s][p] adapter;
    lanes past the rank and slot 0 hold NaN in the kernels' copy, zeros in the reference's."""
    g = torch.Generator().manual_seed(seed)
    slots = 1 + max(slot_ranks)
    a = torch.zeros(slots, P, r_max, K)
    b = torch.zeros(slots, P, N, r_max)
    table = torch.zeros(slots, LAYERS, MODULES, dtype=torch.int32)
    ranks = table[:, 1, 2 : 2 + P].t()  # [P, slots], strided like the pool's
    for s, rs in slot_ranks.items():
        for p, r in enumerate(rs):
            if r:
                a[s, p, :r] = torch.randn(r, K, generator=g) / K**0.5
                b[s, p, :, :r] = torch.randn(N, r, generator=g) / r**0.5
            ranks[p, s] = r
    clean = (a.to(dtype), b.to(dtype))
    nan_a, nan_b = a.clone(), b.clone()
    for s in range(slots):
        for p in range(P):
            r = int(ranks[p, s]) if s else 0
            nan_a[s, p, r:] = float("nan")
            nan_b[s, p, :, r:] = float("nan")
    return nan_a.to(dtype), nan_b.to(dtype), ranks, clean


def check(y0: torch.Tensor, x: torch.Tensor, pool, data: AdapterBatchData, touched: torch.Tensor) -> None:
    a, b, ranks, (ca, cb) = pool
    y, ref = y0.clone(), y0.clone()
    add_lora(y, x, a, b, ranks, *segments(data))
    add_lora_reference(ref, x, ca, cb, data.token_idx, data.valid, data.slots)
    assert torch.isfinite(y).all()  # nothing read past a slot's rank, nor from slot 0
    atol, rtol = TOL[x.dtype]
    torch.testing.assert_close(y, ref, atol=atol, rtol=rtol)
    assert torch.equal(y[~touched], y0[~touched])  # rows outside the segments are untouched
    assert not torch.equal(ref[touched], y0[touched])  # the adapters do change the touched rows


DTYPES = [torch.float32, torch.float16]
SHAPES = [  # (P, K, N, r_max): c_attn-like, gate_up-like, row-parallel-like with K split at decode
    (1, 96, 3 * 40, 16),
    (2, 80, 72, 16),
    (1, 600, 48, 64),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("P,K,N,r_max", SHAPES)
def test_prefill_segments(dtype, P, K, N, r_max):
    ranks = {1: [4] * P, 2: [8] * P, 3: [16] * P, 4: [16, 0][:P] if P == 2 else [16]}  # slot 4: w1 not targeted
    pool = make_pool(P, K, N, r_max, ranks, dtype, seed=K)
    lengths = [1, 5, 3, 17, 9, 2, 40, 6]
    slots = [1, 0, 2, 3, 4, 1, 3, 0]  # base requests (slot 0) are no segment
    T = sum(lengths)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, K, generator=g).to(dtype)
    y0 = torch.randn(T, P * N, generator=g).to(dtype)
    data = AdapterBatchData.build(slots, lengths, "cpu")
    assert data.slots.numel() == 6 and data.max_len == 40
    touched = torch.tensor([s != 0 for s, n in zip(slots, lengths) for _ in range(n)])
    check(y0, x, pool, data, touched)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("P,K,N,r_max", SHAPES)
def test_decode_rows(dtype, P, K, N, r_max):
    """One token per row (the CUDA-graph layout): base rows (slot 0) stay exact."""
    pool = make_pool(P, K, N, r_max, {1: [4] * P, 2: [16] * P, 3: [8] * P}, dtype, seed=3)
    slots = torch.tensor([2, 0, 1, 3, 3, 0, 2])
    g = torch.Generator().manual_seed(2)
    x = torch.randn(7, K, generator=g).to(dtype)
    y0 = torch.randn(7, P * N, generator=g).to(dtype)
    data = AdapterBatchData.for_decode(slots)
    if K == 600:  # decode splits K over programs: the expand sums the partials
        assert lora_shrink(x, pool[0], pool[2], *segments(data)).shape[0] > 1
    check(y0, x, pool, data, slots != 0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_token(dtype):
    pool = make_pool(2, 80, 72, 16, {1: [8, 8]}, dtype, seed=4)
    x = torch.randn(1, 80).to(dtype)
    y0 = torch.randn(1, 144).to(dtype)
    check(y0, x, pool, AdapterBatchData.build([1], [1], "cpu"), torch.tensor([True]))
    check(y0, x, pool, AdapterBatchData.for_decode(torch.tensor([1])), torch.tensor([True]))


def test_shrink_partials_sum_to_x_at():
    """The shrink's fp32 partial sums over the K split add up to x · A[slot]ᵀ on each real rank lane."""
    pool = make_pool(1, 600, 8, 16, {1: [16], 2: [4]}, torch.float32, seed=5)
    x = torch.randn(3, 600)
    slots = torch.tensor([1, 2, 1])
    data = AdapterBatchData.for_decode(slots)
    h = lora_shrink(x, pool[0], pool[2], *segments(data))
    assert h.dtype == torch.float32 and h.shape[0] > 1
    clean_a = pool[3][0]
    for t, (s, r) in enumerate(((1, 16), (2, 4), (1, 16))):
        expect = x[t].double() @ clean_a[s, 0, :r].double().t()
        torch.testing.assert_close(h[:, t, 0, :r].sum(0).double(), expect, atol=1e-5, rtol=1e-5)


def _segments(T: int, segs: list[tuple[int, int]]) -> AdapterBatchData:
    """Requests covering T tokens: the (start, length) segments on adapter slot 1, base requests between."""
    slots, tokens, pos = [], [], 0
    for start, n in segs:
        if start > pos:
            slots.append(0)
            tokens.append(start - pos)
        slots.append(1)
        tokens.append(n)
        pos = start + n
    if pos < T:
        slots.append(0)
        tokens.append(T - pos)
    data = AdapterBatchData.build(slots, tokens, "cpu")
    assert data is not None
    return data


@pytest.mark.parametrize(
    "T, segs, K", [(8192, [(8176, 16)], 11008), (4096, [(0, 4096)], 4096), (300, [(5, 7), (100, 200)], 600)]
)
def test_plan_caps_the_partial_sums(T, segs, K, monkeypatch):
    """A long prefill with one short adapter request keeps the shrink's fp32 partial sums within the
    budget (uncapped on an H100/H200: 172 K splits of [8192 tokens, 64 lanes] = 360 MB); the splits still
    cover K."""
    from worker.kernels import lora as kernels
    from worker.kernels.lora import H_BUDGET, _plan, shrink_buffer

    monkeypatch.setattr(kernels, "_num_sms", lambda device: 132)  # the GPU's programs, not the interpreter's

    x, a_pool = torch.zeros(T, K), torch.zeros(2, 1, 64, K)
    data = _segments(T, segs)
    plan = _plan(x, a_pool, data.slots.shape[0], data.max_len)
    assert plan.k_per_split * plan.split >= K and plan.split & (plan.split - 1) == 0
    assert shrink_buffer(x, a_pool, data.slots.shape[0], data.max_len).numel() * 4 <= max(H_BUDGET, T * 64 * 4)


def test_plan_compiles_few_split_variants(monkeypatch):
    """SPLIT_K is a compile-time constant: decode batches of 1..256 rows and prefills of 1..64 segments
    give a handful of distinct values per module width (each a fresh Triton compile), not one per shape."""
    from worker.kernels import lora as kernels
    from worker.kernels.lora import _plan

    monkeypatch.setattr(kernels, "_num_sms", lambda device: 132)

    for K in (4096, 11008, 600):
        a_pool = torch.zeros(2, 2, 16, K)
        splits = {_plan(torch.zeros(n, K), a_pool, n, 1).split for n in range(1, 257)}  # decode: n rows
        splits |= {_plan(torch.zeros(40 * n, K), a_pool, n, 33).split for n in range(1, 65)}  # n segments of 33
        assert len(splits) <= 8 and all(s & (s - 1) == 0 for s in splits), (K, sorted(splits))  # 1 ... 128


def test_model_with_kernels_vs_reference(tmp_path):
    """The tiny model with the kernels wired into every adapter-aware linear (interpreted here; on CUDA
    the manager picks them itself) equals the float64 reference with each adapter merged, in a batch that
    mixes the base model and three adapters of ranks 4, 8 and 16 (one touching only 3 modules)."""
    from helpers import TINY, write_checkpoint
    from lora_helpers import attach_manager, load, write_adapter
    from paged import Paged
    from random_weights import random_checkpoint
    from reference import merge_lora, ref_forward
    from worker.kernels import lora as kernels
    from worker.layers.rotary import ntk_alpha
    from worker.models.qwen import FlashQwenForCausalLM

    cfg = {**TINY, "seq_length": 16}
    state = random_checkpoint(cfg, seed=21)
    model = FlashQwenForCausalLM.from_pretrained(
        write_checkpoint(str(tmp_path / "ckpt"), cfg, state), dtype=torch.float32, progress=False
    )
    root = str(tmp_path / "adapters")
    adapters = [
        write_adapter(root, "a4", cfg, 4, 8, seed=1),
        write_adapter(root, "a8", cfg, 8, 16, seed=2),
        write_adapter(root, "a16", cfg, 16, 16, seed=3, targets=("c_attn", "w2", "mlp.c_proj")),
    ]
    mgr, _ = attach_manager(model, root, max_rank=16, num_slots=4)
    for t in model.lora_targets():
        getattr(t.owner, t.attr).lora.kernels = kernels
    for i, name in enumerate(["a4", "a8", "a16"], start=1):
        load(mgr, i, name)
    assert mgr.slots.ranks[mgr.entries[3].slot, 0].tolist() == [16, 0, 16, 0, 16]  # c_attn, attn.c_proj, w2, w1, c_proj
    merged = [state] + [merge_lora(state, *ad) for ad in adapters]
    g = torch.Generator().manual_seed(5)
    lengths, which = [6, 9, 3, 20], [0, 1, 2, 3]
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]
    slots = [mgr.entries[i].slot if i else 0 for i in which]
    alphas = [ntk_alpha(n, cfg["seq_length"], True) for n in lengths]
    paged = Paged(model)
    out = paged.step(list(range(4)), prompts, [0] * 4, alphas, True, slots)
    worst = max(
        (o.double() - ref_forward(merged[a], cfg, p)).abs().max().item() for p, a, o in zip(prompts, which, out)
    )
    seqs = [p + [int(o[-1].argmax())] for p, o in zip(prompts, out)]
    out = paged.step(list(range(4)), seqs, [len(s) - 1 for s in seqs], alphas, False, slots)
    worst = max(
        worst,
        max(
            (o[-1].double() - ref_forward(merged[a], cfg, s, prompt_len=len(p))[-1]).abs().max().item()
            for s, p, a, o in zip(seqs, prompts, which, out)
        ),
    )
    assert worst <= 1e-4, worst
    from worker.pb import generate_pb2 as pb

    slot = mgr.entries[3].slot
    mgr.offload(pb.OffloadAdapterRequest(adapter_index=3))
    assert not mgr.slots.ranks[slot].any()  # a freed slot costs the kernels nothing


# -------------------------------------------------------------- decode in one launch per module
def one_launch(kind: str, tiles=None, sync=None):
    """The one-launch decode kernel `kind` ("sync", with the DecodeWorkspace `sync`, or "local") as
    f(y, x, a, b, ranks, starts, slots)."""
    from worker.kernels.lora_decode import LocalTiles, add_lora_decode, add_lora_decode_local

    def add(y, x, a, b, ranks, starts, slots) -> None:
        if kind == "local":
            add_lora_decode_local(y, x, a, b, ranks, starts, slots, tiles or LocalTiles())
        else:
            add_lora_decode(y, x, a, b, ranks, starts, slots, sync)

    return add


def check_one_launch(add, P, K, N, r_max, dtype) -> None:
    """`add` on decode rows with base rows among them, twice (as a CUDA graph replays): equal to the
    reference, base rows exact."""
    pool = make_pool(P, K, N, r_max, {1: [4] * P, 2: [16] * P, 3: [8, 0][:P] if P == 2 else [8]}, dtype, seed=6)
    a, b, ranks, (ca, cb) = pool
    for seed, slots in ((2, [2, 0, 1, 3, 3, 0, 2]), (3, [0, 1, 1])):
        data = AdapterBatchData.for_decode(torch.tensor(slots))
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(len(slots), K, generator=g).to(dtype)
        y0 = torch.randn(len(slots), P * N, generator=g).to(dtype)
        y, ref = y0.clone(), y0.clone()
        add(y, x, a, b, ranks, data.starts, data.slots)
        add_lora_reference(ref, x, ca, cb, data.token_idx, data.valid, data.slots)
        assert torch.isfinite(y).all()
        torch.testing.assert_close(y, ref, atol=TOL[dtype][0], rtol=TOL[dtype][1])
        base = data.slots == 0
        assert torch.equal(y[base], y0[base]) and not torch.equal(ref[~base], y0[~base])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("P,K,N,r_max", SHAPES)
@pytest.mark.parametrize("kind", ["sync", "local"])
def test_decode_in_one_launch(kind, dtype, P, K, N, r_max):
    """Both one-launch kernels; the counters of "sync" are back to 0 after each launch."""
    from worker.kernels.paged_decode import DecodeWorkspace

    sync = DecodeWorkspace()
    check_one_launch(one_launch(kind, sync=sync), P, K, N, r_max, dtype)
    if kind == "sync":
        (counters,) = sync.buffers[torch.device("cpu")]
        assert not counters.any()


@pytest.mark.parametrize(
    "n_split,block_k,block_n", [(3, 16, 16), (5, 32, 16), (64, 64, 32)]
)  # output ranges not a multiple of the tile, more ranges than tiles, K tail
def test_decode_local_tiles(n_split, block_k, block_n):
    """add_lora_decode_local at tunable tiles on awkward sizes (K 600 with a 16-wide K tile, N 3 * 40)."""
    from worker.kernels.lora_decode import LocalTiles

    for P, K, N, r_max in SHAPES:
        check_one_launch(one_launch("local", LocalTiles(n_split, block_k, block_n)), P, K, N, r_max, torch.float32)


def test_model_decode_step_one_lora_launch_per_module(tmp_path, monkeypatch):
    """The tiny model's decode step with each decode mode on every adapter-aware linear: one LoRA launch per
    module for the one-launch modes (two otherwise), and logits equal to the float64 reference with each
    adapter merged ("side", "side_store" without a stream on the CPU: their separate buffer and add; "gemm":
    the shrink inside the base matmul over the joint weight, here at any batch size, then one expand)."""
    from lora_helpers import count_launches, interpreted_lora_decode
    from reference import ref_forward
    from worker.layers import lora as lora_layer

    run = interpreted_lora_decode(tmp_path, seed=22)
    launches = count_launches(monkeypatch)
    monkeypatch.setattr(lora_layer, "JOINT_MIN_ROWS", 1)
    counts = {}
    ids, starts = [0, 1, 2], [len(s) - 1 for s in run.seqs]
    for mode in ("two", "sync", "local", "side", "side_store", "gemm"):
        for term in run.terms:
            term.decode = mode
        launches.clear()
        out = run.paged.step(ids, run.seqs, starts, run.alphas, False, run.slots)
        counts[mode] = sum("lora" in n or "shrink" in n or "expand" in n for n in launches)
        worst = max(
            (o[-1].double() - ref_forward(run.merged[a], run.cfg, s, prompt_len=len(p))[-1]).abs().max().item()
            for s, p, a, o in zip(run.seqs, run.prompts, run.which, out)
        )
        assert worst <= 1e-4, (mode, worst)
    two, one = 2 * len(run.terms), len(run.terms)
    assert counts == {"two": two, "sync": one, "local": one, "side": two, "side_store": two, "gemm": one}, counts


def test_lora_term_rejects_an_unknown_decode_mode():
    from worker.layers.lora import LoraTerm

    pool = torch.zeros(2, 1, 4, 8)
    with pytest.raises(ValueError, match="decode 'fused'.*'local'"):
        LoraTerm(pool, pool.transpose(2, 3), torch.zeros(1, 2, dtype=torch.int32), decode="fused")


@pytest.mark.parametrize("kind", ["sync", "local"])
def test_one_launch_rejects_mismatched_shapes(kind):
    from worker.kernels.paged_decode import DecodeWorkspace

    a, b, ranks, _ = make_pool(1, 96, 120, 16, {1: [4]}, torch.float32, seed=1)
    add, starts, slots = one_launch(kind, sync=DecodeWorkspace()), torch.zeros(2, dtype=torch.int32), torch.ones(2)
    with pytest.raises(ValueError, match="x \\(2, 95\\)"):
        add(torch.zeros(2, 120), torch.zeros(2, 95), a, b, ranks, starts, slots)
    with pytest.raises(ValueError, match="y \\(2, 119\\)"):
        add(torch.zeros(2, 119), torch.zeros(2, 96), a, b, ranks, starts, slots)


@pytest.mark.parametrize("decode_k,block_n", [(16, 16), (512, 512)])
def test_decode_tiles_of_the_two_launches(decode_k, block_n):
    """The shrink's decode K tile and the expand's N tile (tuning knobs) keep the reference's result."""
    from worker.kernels.lora import lora_expand

    for P, K, N, r_max in SHAPES:
        a, b, ranks, (ca, cb) = make_pool(P, K, N, r_max, {1: [4] * P, 2: [16] * P}, torch.float32, seed=9)
        data = AdapterBatchData.for_decode(torch.tensor([2, 0, 1, 2]))
        x, y = torch.randn(4, K), torch.randn(4, P * N)
        ref = y.clone()
        lora_expand(y, lora_shrink(x, a, ranks, *segments(data), decode_k=decode_k), b, ranks, *segments(data), block_n)
        add_lora_reference(ref, x, ca, cb, data.token_idx, data.valid, data.slots)
        torch.testing.assert_close(y, ref, atol=2e-5, rtol=2e-5)
