"""The adapter pools' lanes a slot (worker/adapters/slots.py `SlotPool.rank`): the allocations hold --max-lora-rank
lanes, the pools are views of the first r, and `set_rank` re-lays them out at more lanes keeping every slot's values,
for each kind of storage (A below a float base weight, B in that weight's K lanes, tensors of their own), and points
the wrapped targets' terms at the new views. The manager's growth on load, checked against the float64 reference, is
in test_lora.py."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

from lora_helpers import lora_target
from worker.adapters import slots as slots_mod
from worker.adapters.slots import START_RANK, SlotPool
from worker.distributed import ParallelContext
from worker.layers.linear import ColumnParallelLinear, RowParallelLinear

CPU = ParallelContext(device=torch.device("cpu"))


def _targets() -> list[Any]:
    g = torch.Generator().manual_seed(3)
    c_attn = ColumnParallelLinear(32, [8, 8, 8], True, CPU, torch.float32)
    gate_up = ColumnParallelLinear(32, [16, 16], False, CPU, torch.float32)
    c_proj = RowParallelLinear(16, 32, False, CPU, torch.float32)
    other = RowParallelLinear(32, 32, False, CPU, torch.float64)  # another dtype than the pool's: no joint layout
    for lin in (c_attn, gate_up, c_proj, other):
        lin.weight.data.normal_(generator=g)
    assert c_attn.bias is not None
    c_attn.bias.data.normal_(generator=g)
    return [
        lora_target("attn.c_attn", c_attn, ("attn.c_attn",)),
        lora_target("mlp.gate_up", gate_up, ("mlp.w2", "mlp.w1")),
        lora_target("mlp.c_proj", c_proj, ("mlp.c_proj",)),
        lora_target("attn.c_proj", other, ("attn.c_proj",)),
    ]


@pytest.mark.parametrize("budget", [slots_mod.RELAYOUT_BYTES, 1])  # all slots at once; one slot at a time
def test_set_rank_keeps_every_slot_in_each_kind_of_storage(monkeypatch, budget):
    """Growing 4 -> 8 -> 16 lanes a slot, then shrinking back to 4 (the largest rank held), keeps every slot's lanes,
    zeroes the rest, and leaves the base weights as they were."""
    monkeypatch.setattr(slots_mod, "LANES_MAX_SHARE", 100.0)  # mlp.c_proj's B in K lanes at this small width
    monkeypatch.setattr(slots_mod, "RELAYOUT_BYTES", budget)
    targets = _targets()
    bases = {t.key: (t.owner.lin.weight.clone(), getattr(t.owner.lin, "bias", None)) for t in targets}
    bases = {k: (w, None if b is None else b.clone()) for k, (w, b) in bases.items()}
    pool = SlotPool(targets, CPU, torch.float32, max_rank=16, num_slots=3, rank=4)
    assert pool.joints[(0, "mlp.c_proj")].lanes is not None  # the three kinds are all here
    assert (0, "attn.c_proj") not in pool.joints and (0, "attn.c_attn") in pool.joints
    g = torch.Generator().manual_seed(9)
    ranks = {1: 4, 2: 1, 3: 3}
    written = {}
    for (layer, module), (a, b) in pool.pools.items():
        for slot, r in ranks.items():
            wa, wb = torch.randn(r, a.shape[-1], generator=g), torch.randn(b.shape[1], r, generator=g)
            a[slot, :r], b[slot, :, :r] = wa, wb
            written[(layer, module, slot)] = (wa, wb)
    for slot, r in ranks.items():
        pool.ranks[slot] = r
    for r in (8, 16, 4):
        pool.set_rank(r)
        assert pool.rank == r
        for (layer, module), (a, b) in pool.pools.items():
            assert a.shape[1] == r and b.shape[2] == r, module
            assert not a[0].any() and not b[0].any()  # slot 0: the base model
            for slot, rank in ranks.items():
                wa, wb = written[(layer, module, slot)]
                assert torch.equal(a[slot, :rank], wa) and torch.equal(b[slot, :, :rank], wb), (module, slot, r)
                assert not a[slot, rank:].any() and not b[slot, :, rank:].any(), (module, slot, r)
        for t in targets:
            lin, (w0, b0) = t.owner.lin, bases[t.key]
            assert torch.equal(lin.weight, w0) and (b0 is None or torch.equal(lin.bias, b0)), t.key
            joint = pool.joints.get((0, t.key))
            if joint is not None:  # the base rows, then slots x parts x r A rows, one allocation with the base
                parts = len(t.modules)
                assert joint.weight.shape[0] == joint.out + 4 * parts * r
                assert joint.weight.data_ptr() == lin.weight.data_ptr()
                assert torch.equal(joint.weight[: joint.out], w0)
        lanes = pool.joints[(0, "mlp.c_proj")].lanes
        assert lanes is not None and lanes.shape[1] == 16 + 4 * r
        assert torch.equal(lanes[:, 16 + 2 * r : 16 + 2 * r + 1], written[(0, "mlp.c_proj", 2)][1])  # slot 2's B


def test_set_rank_points_the_terms_at_the_new_views_and_chooses_their_modes_again():
    targets = _targets()
    pool = SlotPool(targets, CPU, torch.float32, max_rank=32, num_slots=2, rank=2)
    pool.wrap_targets(SimpleNamespace(), None, "auto")  # a kernels module: "gemm" is open to the float targets
    terms = {t.key: t.owner.lin.lora for t in targets}
    # c_attn: 3 x 2 A rows over 24 base rows (<= 55 %): gemm; at 32 lanes a slot 96 rows: past the share
    assert terms["attn.c_attn"].decode == "gemm"
    pool.set_rank(32)
    for t in targets:
        term, (a, b) = terms[t.key], pool.stacked[(0, t.key)]
        assert term.a_pool is a and term.b_pool is b and term.joint is pool.joints.get((0, t.key))
        assert term.a_pool.shape[2] == 32
    assert terms["attn.c_attn"].decode == "two"


def test_rank_for_and_the_bounds():
    pool = SlotPool(_targets(), CPU, torch.float32, max_rank=48, num_slots=2)
    assert pool.rank == START_RANK == 16
    assert [pool.rank_for(r) for r in (1, 16, 17, 33, 48)] == [16, 16, 32, 48, 48]  # powers of two, up to r_max
    assert SlotPool(_targets(), CPU, torch.float32, max_rank=8, num_slots=2).rank == 8
    with pytest.raises(ValueError, match="outside 1..48"):
        pool.set_rank(64)
    pool.ranks[1] = 20
    with pytest.raises(ValueError, match="below the rank 20"):
        pool.set_rank(8)
    with pytest.raises(ValueError, match="outside 1..8"):
        SlotPool(_targets(), CPU, torch.float32, max_rank=8, num_slots=2, rank=9)


def test_engine_hook_recaptures_and_handles_a_failed_capture(monkeypatch):
    """Engine.adapter_pool_changed: no graphs (or none with adapters) -> nothing; else the adapter graphs captured
    again. A failed capture: on one shard the adapter steps go eager (the graphs dropped them); under TP the shard
    exits (its peers wait in the captures' collectives)."""
    from worker.engine import engine as engine_mod
    from worker.engine.engine import Engine

    def shard(world: int, graphs: object) -> SimpleNamespace:
        return SimpleNamespace(runner=SimpleNamespace(graphs=graphs), pctx=SimpleNamespace(world_size=world))

    assert Engine.adapter_pool_changed(shard(1, None)) == 0
    assert Engine.adapter_pool_changed(SimpleNamespace(runner=None)) == 0
    assert Engine.adapter_pool_changed(shard(1, SimpleNamespace(has_lora=False))) == 0
    ok = SimpleNamespace(has_lora=True, recapture_adapters=lambda: 7)
    assert Engine.adapter_pool_changed(shard(2, ok)) == 7

    def fail() -> int:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    bad = SimpleNamespace(has_lora=True, recapture_adapters=fail)
    assert Engine.adapter_pool_changed(shard(1, bad)) == 0
    exits: list[int] = []
    monkeypatch.setattr(engine_mod.os, "_exit", exits.append)
    assert Engine.adapter_pool_changed(shard(2, bad)) == 0
    assert exits == [1]


def test_auto_takes_gemm_on_wider_shares_only_up_to_32_lanes():
    """auto: the A rows may add up to 55 % of the base rows at up to 32 lanes a slot, and up to 25 % past them (where
    every slot's lanes cost their bytes whatever its adapter's rank: scripts/bench_lora.py --mix)."""
    kernels = SimpleNamespace()

    def mode(out: int, rank: int) -> str:
        target = lora_target("attn.c_proj", RowParallelLinear(16, out, False, CPU, torch.float32), ("attn.c_proj",))
        pool = SlotPool([target], CPU, torch.float32, max_rank=64, num_slots=1, rank=rank)  # 2 slots x rank A rows
        return pool.decode_mode((0, "attn.c_proj"), kernels, None, "auto")

    assert slots_mod.JOINT_SHARE_LANES == 32
    assert mode(128, 32) == "gemm"  # 64 rows: 50 %
    assert mode(96, 32) == "two"  # 67 %
    assert mode(256, 64) == "two"  # 128 rows: 50 %
    assert mode(512, 64) == "gemm"  # 25 %
