"""Multi-LoRA: a batch mixing the base model and three adapters of different ranks equals, per request,
the reference with that adapter merged into the weights; merges; validation; pool lifecycle."""

from __future__ import annotations

import os

import pytest
import torch

from helpers import TINY, write_checkpoint
from lora_helpers import attach_manager, load, write_adapter
from paged import Paged
from random_weights import random_checkpoint
from reference import merge_lora, ref_forward
from worker.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from worker.models.qwen import FlashQwenForCausalLM

CFG = {**TINY, "seq_length": 16}


@pytest.fixture()
def setup(tmp_path):
    return _setup(tmp_path)


def _setup(tmp_path, **kw):
    state = random_checkpoint(CFG, seed=21)
    model = FlashQwenForCausalLM.from_pretrained(
        write_checkpoint(str(tmp_path / "ckpt"), CFG, state), dtype=torch.float32, progress=False
    )
    root = str(tmp_path / "adapters")
    adapters = {
        "a4": write_adapter(root, "a4", CFG, 4, 8, seed=1),
        "a8": write_adapter(root, "a8", CFG, 8, 16, seed=2, use_rslora=True),
        "a16": write_adapter(root, "nested/a16", CFG, 16, 16, seed=3, targets=("c_attn", "w2", "mlp.c_proj")),
    }
    mgr, engine = attach_manager(model, root, max_rank=16, num_slots=4, **kw)
    return state, model, root, adapters, mgr, engine


def test_mixed_batch_prefill_and_decode(setup):
    state, model, root, adapters, mgr, _ = setup
    for i, name in enumerate(["a4", "a8", "nested/a16"], start=1):
        load(mgr, i, name)
    _check_mixed_batch(state, model, adapters, mgr)


def test_pools_grow_as_larger_adapters_load(tmp_path):
    """Pools that start at 4 lanes a slot: the rank-4 adapter fits; the rank-8 and rank-16 ones re-lay them out
    (slots.SlotPool.set_rank: the loaded slots kept), each time after asking the engine to re-capture its graphs with
    adapters. Requests prefilled on the rank-4 adapter before the growth decode on after it, and a new mixed batch
    runs, each equal to the float64 reference with its adapter merged."""
    state, model, _, adapters, mgr, engine = _setup(tmp_path, pool_rank=4)
    grown = []
    engine.adapter_pool_changed = lambda: grown.append(mgr.slots.rank) or 0
    load(mgr, 1, "a4")
    assert mgr.slots.rank == 4 and not grown
    merged = merge_lora(state, *adapters["a4"])
    g = torch.Generator().manual_seed(8)
    seqs = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (7, 10)]  # base, a4
    lens, slots = [len(s) for s in seqs], [0, mgr.entries[1].slot]
    paged = Paged(model)
    out = paged.step([0, 1], seqs, [0, 0], [1.0, 1.0], True, slots)
    for i, (name, lanes) in enumerate([("a8", 8), ("nested/a16", 16)], start=2):
        for s, o in zip(seqs, out):
            s.append(int(o[-1].argmax()))
        load(mgr, i, name)  # between two decode steps of the running requests
        assert mgr.slots.rank == lanes and all(
            getattr(t.owner, t.attr).lora.a_pool.shape[2] == lanes for t in model.lora_targets()
        )
        out = paged.step([0, 1], seqs, [len(s) - 1 for s in seqs], [1.0, 1.0], False, slots)
        for s, n, weights, o in zip(seqs, lens, (state, merged), out):
            ref = ref_forward(weights, CFG, s, prompt_len=n)[-1]
            assert (o[-1].double() - ref).abs().max().item() <= 1e-4
    assert grown == [8, 16]
    _check_mixed_batch(state, model, adapters, mgr)


def _check_mixed_batch(state, model, adapters, mgr) -> None:
    """A batch of the base model and the three adapters (adapter 1 twice), prefill then four decode steps, equals
    the float64 reference with each adapter merged into the weights."""
    merged = {
        0: state,
        1: merge_lora(state, *adapters["a4"]),
        2: merge_lora(state, *adapters["a8"]),
        3: merge_lora(state, *adapters["a16"]),
    }
    g = torch.Generator().manual_seed(5)
    lengths = [6, 9, 3, 20, 11]
    which = [0, 1, 2, 3, 1]  # base and three adapters; adapter 1 twice
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]
    slots = [mgr.entries[i].slot if i else 0 for i in which]
    paged = Paged(model)
    out = paged.step(list(range(5)), prompts, [0] * 5, [1.0, 1.0, 1.0, 3.0, 1.0], True, slots)
    worst = 0.0
    for p, a, o in zip(prompts, which, out):
        worst = max(worst, (o.double() - ref_forward(merged[a], CFG, p)).abs().max().item())
    seqs = [list(p) for p in prompts]
    for _ in range(4):
        for s, o in zip(seqs, out):
            s.append(int(o[-1].argmax()))
        out = paged.step(list(range(5)), seqs, [len(s) - 1 for s in seqs], [1.0, 1.0, 1.0, 3.0, 1.0], False, slots)
    for s, p, a, o in zip(seqs, prompts, which, out):
        worst = max(worst, (o[-1].double() - ref_forward(merged[a], CFG, s, prompt_len=len(p))[-1]).abs().max().item())
    assert worst <= 1e-4, worst
    # the adapters really change the output (the test would not notice a no-op otherwise)
    assert (ref_forward(merged[1], CFG, prompts[1]) - ref_forward(state, CFG, prompts[1])).abs().max() > 1e-2


def _independent_merge(ts, ws, strategy, density, sign_total, gen):
    """The merge formulas written out again, tensor by tensor (TIES: trim, elect sign, disjoint mean)."""
    if strategy == "linear":
        return sum(w * t for w, t in zip(ws, ts))
    trimmed = []
    for t in ts:
        k = int(density * t.numel())
        flat = t.flatten().clone()
        keep = flat.abs().argsort(descending=True)[:k]
        m = torch.zeros_like(flat)
        m[keep] = flat[keep]
        trimmed.append(m.view_as(t))
    stack = torch.stack(trimmed)
    elect = torch.sign(stack.sum(0) if sign_total else stack.sign().sum(0))
    elect[elect == 0] = 1
    agree = stack.sign() == elect
    num = sum(w * t * a for w, t, a in zip(ws, trimmed, agree))
    return num / agree.sum(0).clamp(min=1)


@pytest.mark.parametrize(
    "strategy,density,sign", [("linear", 1.0, "TOTAL"), ("ties", 0.5, "TOTAL"), ("ties", 0.3, "FREQUENCY")]
)
def test_merge_equals_independent_computation(setup, strategy, density, sign):
    from worker.adapters.peft import read_adapter
    from worker.pb import generate_pb2 as pb

    state, model, root, adapters, mgr, _ = setup
    write_adapter(root, "b8", CFG, 8, 16, seed=9)
    load(
        mgr,
        1,
        "a8",
        "b8",
        strategy=pb.MergeStrategy.Value(strategy.upper()),
        weights=[0.7, 0.4],
        density=density,
        sign=pb.MajoritySignMethod.Value(sign),
    )
    a = read_adapter(os.path.join(root, "a8"), model.config, 16)
    b = read_adapter(os.path.join(root, "b8"), model.config, 16)
    host = mgr.entries[1].host
    assert host.scale == 1.0  # a merge is read through read_adapter: the scales are folded in already
    host = host.tensors()
    for key in a.weights:
        for j in (0, 1):  # A and B merged separately
            expect = _independent_merge(
                [a.weights[key][j], b.weights[key][j]], [0.7, 0.4], strategy, density, sign == "TOTAL", None
            )
            assert torch.allclose(host[key][j], expect, atol=1e-6), (key, j)


def test_bad_adapters_clear_errors(setup, tmp_path):
    state, model, root, adapters, mgr, _ = setup
    import json
    import shutil

    with pytest.raises(InvalidArgument, match=r"'\.\.'"):
        load(mgr, 1, "../ckpt")
    os.symlink(str(tmp_path / "ckpt"), os.path.join(root, "escape"))
    with pytest.raises(InvalidArgument, match="outside the adapter root"):
        load(mgr, 1, "escape")
    with pytest.raises(InvalidArgument, match="outside the adapter root"):
        load(mgr, 1, str(tmp_path / "ckpt"))
    with pytest.raises(NotFound, match="not found"):
        load(mgr, 1, "nope")
    big = {**CFG, "hidden_size": 128, "kv_channels": 32}
    write_adapter(root, "other_base", big, 4, 8, seed=1)
    with pytest.raises(InvalidArgument, match="do not match the base model"):
        load(mgr, 1, "other_base")
    write_adapter(root, "r32", CFG, 32, 8, seed=1)
    with pytest.raises(FailedPrecondition, match="exceeds the configured maximum"):
        load(mgr, 1, "r32")
    for flag, needle in (({"use_dora": True}, "DoRA"), ({"modules_to_save": ["wte"]}, "modules_to_save")):
        shutil.copytree(os.path.join(root, "a4"), os.path.join(root, f"v{needle}"))
        path = os.path.join(root, f"v{needle}", "adapter_config.json")
        json.dump({**json.load(open(path)), **flag}, open(path, "w"))
        with pytest.raises(FailedPrecondition, match=needle):
            load(mgr, 1, f"v{needle}")
    shutil.copytree(os.path.join(root, "a4"), os.path.join(root, "trunc"))
    f = os.path.join(root, "trunc", "adapter_model.safetensors")
    data = open(f, "rb").read()
    open(f, "wb").write(data[: len(data) // 2])
    with pytest.raises(InvalidArgument, match="cannot read"):
        load(mgr, 1, "trunc")
    os.makedirs(os.path.join(root, "pickled"))
    shutil.copy(os.path.join(root, "a4", "adapter_config.json"), os.path.join(root, "pickled"))
    open(os.path.join(root, "pickled", "adapter_model.bin"), "wb").write(b"\x80\x04K\x01.")
    with pytest.raises(FailedPrecondition, match="only safetensors"):
        load(mgr, 1, "pickled")
    assert mgr.entries == {} and mgr.stats()["adapter_slots_used"] == 0  # nothing half-loaded


def test_load_offload_200_cycles_no_leak_and_busy_never_evicted(setup):
    from types import SimpleNamespace

    from worker.pb import generate_pb2 as pb

    state, model, root, adapters, mgr, engine = setup
    names = ["a4", "a8", "nested/a16"]
    for k in range(3, 8):
        write_adapter(root, f"x{k}", CFG, 4, 4, seed=100 + k)
        names.append(f"x{k}")
    baseline = [p.clone() for pair in mgr.slots.pools.values() for p in pair]
    # a live batch uses index 1: it must survive every eviction
    engine.batches[7] = SimpleNamespace(requests=[SimpleNamespace(adapter_index=1)])
    load(mgr, 1, "a4")
    slot1 = mgr.entries[1].slot
    for cycle in range(200):
        index = 2 + cycle % 7  # 7 more adapters than the 3 remaining slots
        load(mgr, index, names[1 + cycle % 7])
        assert mgr.entries[1].slot == slot1
        if cycle % 3 == 0:
            mgr.offload(pb.OffloadAdapterRequest(adapter_index=index))
    with pytest.raises(FailedPrecondition, match="live batch"):
        mgr.offload(pb.OffloadAdapterRequest(adapter_index=1))
    with pytest.raises(FailedPrecondition, match="live batch"):  # nor replaced by another adapter
        load(mgr, 1, "a8")
    load(mgr, 1, "a4")  # loading the same adapter again is a no-op
    assert mgr.entries[1].slot == slot1
    # outputs still right for the busy adapter after all that churn
    p = list(range(30, 41))
    out = Paged(model).step([0], [p], [0], [1.0], True, [slot1])[0]
    assert (out.double() - ref_forward(merge_lora(state, *adapters["a4"]), CFG, p)).abs().max() <= 1e-4
    # memory back to baseline: offload everything; the pool is all zeros again, host cache bounded
    engine.batches.clear()
    for i in list(mgr.entries):
        if mgr.entries[i].slot is not None:
            mgr.offload(pb.OffloadAdapterRequest(adapter_index=i))
    after = [p.clone() for pair in mgr.slots.pools.values() for p in pair]
    assert all(torch.equal(a, b) for a, b in zip(baseline, after))
    assert mgr.stats()["adapter_slots_used"] == 0
    assert (
        mgr.stats()["adapter_host_bytes"]
        <= mgr.host_cache
        * max(e.rank for e in mgr.entries.values())
        * 4
        * 10
        * CFG["hidden_size"]
        * CFG["num_hidden_layers"]
    )


def test_all_slots_busy_is_resource_exhausted(setup):
    from types import SimpleNamespace

    state, model, root, adapters, mgr, engine = setup
    for k in range(5):
        write_adapter(root, f"y{k}", CFG, 4, 4, seed=200 + k)
    for i in range(1, 5):
        load(mgr, i, f"y{i - 1}")
    engine.batches[1] = SimpleNamespace(requests=[SimpleNamespace(adapter_index=i) for i in range(1, 5)])
    with pytest.raises(ResourceExhausted, match="adapter slots"):
        load(mgr, 5, "y4")


def test_dare_merges(setup):
    """DARE at density 1 keeps everything (equals LINEAR / TIES); at density d it keeps ~d of the
    entries, rescaled by 1/d, and is seeded (the same on every shard and every reload)."""
    from worker.adapters.merge import merge_adapters
    from worker.adapters.peft import read_adapter
    from worker.pb import generate_pb2 as pb

    LINEAR, TIES, DARE_LINEAR, DARE_TIES = (
        pb.MergeStrategy.LINEAR,
        pb.MergeStrategy.TIES,
        pb.MergeStrategy.DARE_LINEAR,
        pb.MergeStrategy.DARE_TIES,
    )
    TOTAL = pb.MajoritySignMethod.TOTAL

    state, model, root, adapters, mgr, _ = setup
    write_adapter(root, "b8", CFG, 8, 16, seed=9)
    a = read_adapter(os.path.join(root, "a8"), model.config, 16)
    b = read_adapter(os.path.join(root, "b8"), model.config, 16)
    w = [0.6, 0.4]
    for dare, plain in ((DARE_LINEAR, LINEAR), (DARE_TIES, TIES)):
        m1 = merge_adapters([a, b], w, dare, 1.0, TOTAL)
        m2 = merge_adapters([a, b], w, plain, 1.0, TOTAL)
        assert all(torch.allclose(m1.weights[k][j], m2.weights[k][j]) for k in m1.weights for j in (0, 1))
    half = merge_adapters([a, a], [1.0, 0.0], DARE_LINEAR, 0.5, TOTAL)
    again = merge_adapters([a, a], [1.0, 0.0], DARE_LINEAR, 0.5, TOTAL)
    key = next(iter(a.weights))
    kept = half.weights[key][1] != 0
    assert 0.35 < kept.float().mean().item() < 0.65  # ~density of B's entries survive
    assert torch.allclose(half.weights[key][1][kept], a.weights[key][1][kept] / 0.5)  # rescaled by 1/d
    assert torch.equal(half.weights[key][1], again.weights[key][1])  # seeded


def test_remote_sources_need_a_local_copy(setup):
    from worker.pb import generate_pb2 as pb

    state, model, root, adapters, mgr, _ = setup
    for source in (pb.AdapterSource.HUB, pb.AdapterSource.S3, pb.AdapterSource.PBASE):
        req = pb.LoadAdapterRequest(
            adapter_parameters=pb.AdapterParameters(adapter_ids=["org/remote-only"]),
            adapter_source=source,
            adapter_index=1,
        )
        with pytest.raises(FailedPrecondition, match="network access"):
            mgr.load(req)
    # a HUB id that exists under the adapter root is served from there
    req = pb.LoadAdapterRequest(
        adapter_parameters=pb.AdapterParameters(adapter_ids=["a4"]),
        adapter_source=pb.AdapterSource.HUB,
        adapter_index=1,
    )
    assert mgr.load(req).loaded


def test_adapter_files_linked_outside_the_root_are_refused(setup, tmp_path):
    """Files inside an adapter directory may be links that stay under the root (an HF cache's snapshots
    link into its blobs); a link that leaves the root is refused, naming the file."""
    state, model, root, adapters, mgr, _ = setup
    outside = tmp_path / "outside"
    write_adapter(str(outside), "x", CFG, 4, 8, seed=4)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        inside = os.path.join(root, f"link-{name}")
        write_adapter(root, f"link-{name}", CFG, 4, 8, seed=4)
        os.replace(os.path.join(inside, name), os.path.join(root, f"blob-{name}"))
        os.symlink(os.path.join(root, f"blob-{name}"), os.path.join(inside, name))
        load(mgr, 1, f"link-{name}")  # under the root: served
        os.remove(os.path.join(inside, name))
        os.symlink(str(outside / "x" / name), os.path.join(inside, name))
        with pytest.raises(InvalidArgument, match=f"{name} is a link that resolves outside the adapter root"):
            load(mgr, 2, f"link-{name}")
        assert 2 not in mgr.entries


@pytest.mark.parametrize("world", [2, 4])
def test_tp_cut_rules_reassemble_the_full_lora_term(world):
    """Every LoRA target under TP: each rank's cut (A, B), applied as its layer applies it (column-parallel:
    this rank's output columns, in place within each packed block like the base weight; row-parallel: a
    partial sum over this rank's input columns), reassembles x Aᵀ Bᵀ of the whole adapter."""
    from lora_helpers import shapes_only
    from worker.config import QwenConfig
    from worker.layers.linear import ColumnParallelLinear
    from worker.layers.lora_tp import lora_parts
    from worker.weights import unshard_packed

    config = QwenConfig.from_dict(CFG)
    g = torch.Generator().manual_seed(0)
    targets = [shapes_only(config, rank, world).lora_targets() for rank in range(world)]
    for per_rank in zip(*targets):
        bases = [getattr(t.owner, t.attr) for t in per_rank]
        parts = [lora_parts(base, len(per_rank[0].modules)) for base in bases]
        for p, module in enumerate(per_rank[0].modules):
            full = parts[0][p]
            a, b = torch.randn(5, full.d_in, generator=g), torch.randn(full.d_out, 5, generator=g)
            x = torch.randn(3, full.d_in, generator=g)
            shards = [ps[p].cut(a, b, rank, world) for rank, ps in enumerate(parts)]
            for (a_r, b_r), ps in zip(shards, parts):
                assert (a_r.shape[1], b_r.shape[0]) == ps[p].shard_dims(world), module
            if isinstance(bases[0], ColumnParallelLinear):
                ys = [x @ a_r.t() @ b_r.t() for a_r, b_r in shards]  # [T, out / world] each
                y = unshard_packed(ys, 1, len(full.blocks))
            else:
                xs = x.chunk(world, 1)  # each rank's input columns
                y = sum(x_r @ a_r.t() @ b_r.t() for x_r, (a_r, b_r) in zip(xs, shards))
            torch.testing.assert_close(y, x @ a.t() @ b.t(), msg=module)
    c_attn = lora_parts(getattr(targets[0][0].owner, targets[0][0].attr), 1)[0]
    assert not c_attn.row and len(c_attn.blocks) == 3  # q, k and v cut separately (by heads)
