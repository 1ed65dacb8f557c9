"""LoRA decode's K lanes (DecodeKernels.lora_k_lanes, issue 17, P2): mlp.c_proj's B as extra input columns beside its
base weight (worker/adapters/slots.py `joint_layout`), h written into its slot's lanes of the GEMM's input by the
gate|up launch (the last program of a row to arrive sums the row's partials: worker/kernels/lora_rows.py
`_h_into_lanes`), and the base GEMM over the lanes giving base + term. On the CPU through the Triton interpreter,
against float64 written here from the definition (y[t] = W x[t] (+ b) + B[s] A[s] x[t])."""

from __future__ import annotations

import os
import sys

import pytest

if "worker.kernels.lora" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton kernels already compiled for the GPU in this session", allow_module_level=True)
os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere

import torch  # noqa: E402

pytest.importorskip("triton")

from lora_helpers import lora_target  # noqa: E402
from worker.adapters import slots as slots_mod  # noqa: E402
from worker.adapters.slots import LANE_ALIGN, SlotPool, joint_layout  # noqa: E402
from worker.distributed import ParallelContext  # noqa: E402
from worker.kernels import lora as kernels  # noqa: E402
from worker.kernels import lora_rows  # noqa: E402
from worker.layers import lora as lora_layer  # noqa: E402
from worker.layers.linear import ColumnParallelLinear, RowParallelLinear  # noqa: E402
from worker.layers.lora import AdapterBatchData, LoraTerm  # noqa: E402

CPU = ParallelContext(device=torch.device("cpu"))


def test_joint_layout_with_lanes_keeps_the_base_and_puts_b_beside_it():
    """With lanes the base weight is the top left of an allocation whose row pitch is a multiple of LANE_ALIGN:
    its values and forward are unchanged and a later load writes through; the A rows below and the lanes beside
    it start at zero; without lanes the layout is the plain joint one."""
    g = torch.Generator().manual_seed(5)
    col = ColumnParallelLinear(6, [8, 4], True, CPU, torch.float32)
    col.weight.data.normal_(generator=g)
    col.bias.data.normal_(generator=g)
    w0, b0 = col.weight.clone(), col.bias.clone()
    x = torch.randn(3, 6, generator=g)
    y0 = col(x)
    joint = joint_layout(col, (3, 1, 2, 6), torch.float32, CPU.device, lanes=6)
    assert joint is not None and joint.lanes is not None and joint.lane_count() == 6
    assert joint.weight.shape == (12 + 6, 6) and joint.lanes.shape == (12, 12) and joint.out == 12
    assert joint.weight.stride(0) % LANE_ALIGN == 0 and joint.lanes.data_ptr() == joint.weight.data_ptr()
    assert torch.equal(col.weight, w0) and torch.equal(col.bias, b0) and torch.equal(col(x), y0)
    assert not joint.weight[12:].any() and not joint.lanes[:, 6:].any()
    col.store(torch.ones(12, 6), torch.full((12,), 2.0))
    assert torch.equal(joint.lanes[:, :6], torch.ones(12, 6))
    plain = joint_layout(RowParallelLinear(6, 5, False, CPU, torch.float32), (2, 1, 3, 6), torch.float32, CPU.device)
    assert plain is not None and plain.lanes is None and plain.lane_count() == 0 and plain.weight.is_contiguous()


def test_slot_pool_gives_lanes_to_mlp_c_proj_only():
    """mlp.c_proj (LANE_TARGETS; one part, slots·r_max within LANES_MAX_SHARE of its input width) gets lanes and its
    B pool is a view of them (a write to B shows in the lanes at in + s·r_max + l); c_attn, attn.c_proj and gate|up
    keep a B of their own, and so does mlp.c_proj when its lanes would be too wide."""
    targets = [
        lora_target("attn.c_attn", ColumnParallelLinear(64, [16, 16, 16], True, CPU, torch.float32), ("attn.c_attn",)),
        lora_target("attn.c_proj", RowParallelLinear(64, 64, False, CPU, torch.float32), ("attn.c_proj",)),
        lora_target("mlp.gate_up", ColumnParallelLinear(64, [32, 32], False, CPU, torch.float32), ("mlp.w2", "mlp.w1")),
        lora_target("mlp.c_proj", RowParallelLinear(32, 64, False, CPU, torch.float32), ("mlp.c_proj",)),
    ]
    pool = SlotPool(targets, CPU, torch.float32, max_rank=2, num_slots=2)  # 3 slots x 2 = 6 lanes
    has = {key: pool.joints[(0, key)].lanes is not None for _, key in pool.joints}
    assert has == {"attn.c_attn": False, "attn.c_proj": False, "mlp.gate_up": False, "mlp.c_proj": True}
    joint, (_, b) = pool.joints[(0, "mlp.c_proj")], pool.stacked[(0, "mlp.c_proj")]
    assert b.shape == (3, 1, joint.out, 2)
    b[2, 0, 5, 1] = 7.0
    assert joint.lanes[5, 32 + 2 * 2 + 1] == 7.0 and joint.lanes[:, 32:].count_nonzero() == 1
    narrow = SlotPool(targets[3:], CPU, torch.float32, max_rank=4, num_slots=2)  # 12 lanes > a quarter of 32
    assert narrow.joints[(0, "mlp.c_proj")].lanes is None


def _check_lanes(joint_in, width, h_f64, slots, r_max, S):
    """Each row's lanes: its slot's r_max lanes equal h (float64) to fp32 rounding, every other lane exactly zero."""
    for t, s in enumerate(slots.tolist()):
        lanes = joint_in[t, width:].view(S, r_max)
        torch.testing.assert_close(lanes[s].double(), h_f64[t], atol=1e-5, rtol=1e-5)
        others = torch.cat([lanes[:s], lanes[s + 1 :]])
        assert not others.any(), (t, s)


@pytest.mark.parametrize("N,r2,block_n", [(50, 5, 16), (37, 12, 32), (40, 4, 64)])
def test_act_shrink_into_lanes(N, r2, block_n):
    """The gate|up launch with lanes: the activation (the joint input's first N columns) equals the launch without
    lanes bit for bit; each row's lanes hold h = A2[slot] · act (float64) in its slot's lanes and zeros in every
    other slot's (a base row, slot 0, all zeros); the row counters are back at zero; lanes without the consumer's A
    pool are refused. Awkward sizes: N not a multiple of the tile, r2_max not a power of two, one tile."""
    from worker.kernels.lora_rows import lora_expand_rows_silu_mul

    g = torch.Generator().manual_seed(N + r2)
    S, K, r_max = 3, 29, 8
    ranks = torch.tensor([[0, r_max, 5], [0, 3, r_max]], dtype=torch.int32)
    a = torch.randn(S, 2, r_max, K, generator=g) / K**0.5
    b = torch.randn(S, 2, N, r_max, generator=g) / r_max**0.5
    for s in range(S):  # the pool's invariant: zeros past each slot's rank (slot 0: rank 0), which the kernel reads
        for p in range(2):
            a[s, p, ranks[p, s] :] = 0
            b[s, p, :, ranks[p, s] :] = 0
    a2 = torch.randn(S, 1, r2, N, generator=g) / N**0.5
    a2[0] = 0
    a2[2, :, r2 - 2 :] = 0  # a rank below r2_max
    w = torch.randn(2 * N, K, generator=g) / K**0.5
    slots = torch.tensor([1, 0, 2, 2, 1])
    x = torch.randn(len(slots), K, generator=g)
    out = (torch.cat([w, a.reshape(-1, K)]) @ x.T).T.contiguous()
    plain, _ = lora_expand_rows_silu_mul(out, 2 * N, b, slots, block_n=block_n, shrink=a2)
    act, joint_in = lora_expand_rows_silu_mul(out, 2 * N, b, slots, block_n=block_n, shrink=a2, lanes=True)
    assert joint_in is not None and joint_in.shape == (len(slots), N + S * r2)
    assert torch.equal(act, plain) and act.data_ptr() == joint_in.data_ptr()
    h = torch.stack([a2[s, 0].double() @ act[t].double() for t, s in enumerate(slots.tolist())])
    _check_lanes(joint_in, N, h, slots, r2, S)
    assert not lora_rows.row_counters(len(slots), out.device).any()
    with pytest.raises(ValueError, match="need its A pool"):
        lora_expand_rows_silu_mul(out, 2 * N, b, slots, lanes=True)


def test_apply_partials_over_lanes_is_base_plus_term():
    """LoraTerm.apply_partials given the producer's joint input (2-D: h, rounded, in each row's slot's lanes, zeros
    in the others') runs one GEMM over the lanes: y = W x + B[s] h (float64; the row-parallel bias is the wrapper's,
    after the reduce), never the base alone; base rows (slot 0) get W x."""
    g = torch.Generator().manual_seed(12)
    K, N, S, r = 96, 24, 3, 4
    lin = RowParallelLinear(K, N, False, CPU, torch.float32)
    lin.weight.data.normal_(generator=g)
    pool = SlotPool([lora_target("mlp.c_proj", lin, ("mlp.c_proj",))], CPU, torch.float32, max_rank=r, num_slots=S - 1)
    joint, (a, b) = pool.joints[(0, "mlp.c_proj")], pool.stacked[(0, "mlp.c_proj")]
    assert joint.lanes is not None and joint.lane_count() == S * r
    b[1:].normal_(generator=g)
    b[2, :, :, 3:] = 0
    ranks = torch.tensor([[0, 4, 3]], dtype=torch.int32)
    term = LoraTerm(a, b, ranks, kernels, None, decode="gemm", joint=joint, k_lanes=True)
    assert term.input_lanes() and not LoraTerm(a, b, ranks, kernels, None, decode="gemm", joint=joint).input_lanes()
    slots = torch.tensor([2, 0, 1, 1, 2, 0])
    joint_in = torch.zeros(len(slots), K + S * r)
    joint_in[:, :K] = torch.randn(len(slots), K, generator=g)
    h = torch.randn(len(slots), r, generator=g)
    for t, s in enumerate(slots.tolist()):
        joint_in[t, K + s * r : K + (s + 1) * r] = h[t] if s else 0.0
    x = joint_in[:, :K]
    data = AdapterBatchData.for_decode(slots)
    y = term.apply_partials(lambda: pytest.fail("the base GEMM runs over the lanes"), x, joint_in, data)
    for t, s in enumerate(slots.tolist()):
        want = lin.weight.double() @ x[t].double() + (b[s, 0].double() @ h[t].double() if s else 0.0)
        torch.testing.assert_close(y[t].double(), want, atol=2e-5, rtol=2e-5)


def test_model_decode_with_k_lanes_equals_the_reference(tmp_path, monkeypatch):
    """The tiny model (fused kernels, Triton interpreter, lanes let in by LANES_MAX_SHARE) decoding with adapters
    in "gemm" mode with lora_k_lanes and the served kernels around it: mlp.c_proj has lanes and no term launch of its
    own (c_attn keeps its term-only launch, attn.c_proj its expand), and the logits equal the float64 reference with
    each adapter merged."""
    from lora_helpers import count_launches, interpreted_lora_decode
    from reference import ref_forward
    from worker.layers.decode_kernels import DecodeKernels

    monkeypatch.setattr(slots_mod, "LANES_MAX_SHARE", 4.0)
    run = interpreted_lora_decode(tmp_path, seed=29, fused=True, lens=(4, 7, 3), which=(2, 0, 1))
    opts = DecodeKernels(lora_act_shrink=True, lora_term_first=True, lora_norm_shrink=True, lora_k_lanes=True)
    for term in run.terms:
        term.decode = "gemm"
        term.set_decode_kernels(opts)
    lanes = {t.key for t in run.model.lora_targets() if getattr(t.owner, t.attr).lora.input_lanes()}
    assert lanes == {"mlp.c_proj"}
    monkeypatch.setattr(lora_layer, "JOINT_MIN_ROWS", 1)
    launches = count_launches(monkeypatch)
    out = run.paged.step([0, 1, 2], run.seqs, [len(s) - 1 for s in run.seqs], run.alphas, False, run.slots)
    layers = run.cfg["num_hidden_layers"]
    assert launches.count("_expand_rows_partials_kernel") == layers  # c_attn's term before its GEMM
    assert launches.count("_expand_rows_kernel") == layers  # attn.c_proj's
    assert launches.count("_norm_shrink_kernel") == layers and launches.count("_expand_rows_act_kernel") == layers
    for s, p, a, o in zip(run.seqs, run.prompts, run.which, out):
        worst = (o[-1].double() - ref_forward(run.merged[a], run.cfg, s, prompt_len=len(p))[-1]).abs().max().item()
        assert worst <= 1e-4, worst


def test_row_counters_grow_without_freeing_the_smaller_buffer():
    """A batch larger than the counters buffer gets a new one and the old one stays alive (a CUDA graph captured
    with it keeps writing there); batches that fit share the current one."""
    import gc
    import weakref

    device = torch.device("cpu")
    lora_rows._COUNTERS.buffers.pop(device, None)
    small = lora_rows.row_counters(9, device)
    assert not small.any() and lora_rows.row_counters(small.numel(), device) is small
    old = weakref.ref(small)
    big = lora_rows.row_counters(small.numel() + 1, device)
    assert big.numel() > small.numel() and lora_rows.row_counters(20, device) is big
    del small
    gc.collect()
    assert old() is not None  # still referenced by the module


def test_lanes_after_eviction_and_a_lower_rank_refill(tmp_path, monkeypatch):
    """A slot freed and refilled with a lower-rank adapter: mlp.c_proj's B, a view of the weight's K lanes, holds
    the new adapter's B (times its scale) in the first lanes and zeros past its rank, so the GEMM over the lanes adds
    nothing from the evicted adapter; the base weight beside the lanes is untouched."""
    from helpers import TINY
    from lora_helpers import attach_manager, load, write_adapter
    from worker.config import QwenConfig
    from worker.models.qwen import FlashQwenForCausalLM
    from worker.pb import generate_pb2 as pb

    monkeypatch.setattr(slots_mod, "LANES_MAX_SHARE", 4.0)
    model = FlashQwenForCausalLM(QwenConfig.from_dict(TINY), CPU, torch.float32)
    model.transformer.layers()[0].mlp.c_proj.weight.data.normal_()
    base = model.transformer.layers()[0].mlp.c_proj.weight.clone()
    root = str(tmp_path)
    write_adapter(root, "r16", TINY, 16, 16, seed=1)
    tensors, _ = write_adapter(root, "r4", TINY, 4, 8, seed=2)  # alpha 8, rank 4: scale 2
    (key,) = [k for k in tensors if ".h.0.mlp.c_proj.lora_B" in k]
    mgr, _ = attach_manager(model, root, max_rank=16, num_slots=1)
    load(mgr, 1, "r16")
    slot = mgr.entries[1].slot
    mgr.offload(pb.OffloadAdapterRequest(adapter_index=1))
    load(mgr, 2, "r4")
    assert mgr.entries[2].slot == slot
    c_proj = model.transformer.layers()[0].mlp.c_proj
    joint, b = c_proj.lora.joint, c_proj.lora.b_pool
    assert joint is not None and joint.lanes is not None and b.data_ptr() >= joint.lanes.data_ptr()
    width = joint.weight.shape[1]
    lanes = joint.lanes[:, width:].view(joint.out, -1, 16)[:, slot]  # [out, r_max] of the slot
    torch.testing.assert_close(lanes[:, :4], tensors[key].float() * 2.0, atol=1e-6, rtol=1e-6)
    assert not lanes[:, 4:].any() and torch.equal(c_proj.base.weight, base)
