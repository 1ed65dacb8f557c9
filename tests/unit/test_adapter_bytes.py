"""LoadAdapter's fast path keeps the safetensors file's bytes as they are and folds the scale into B while
filling a slot. Every slot must hold exactly read_adapter's values (scale applied in fp32, rounded once to
the pool dtype), cut for this TP rank: for each file dtype, pool dtype and TP rank, on the first fill and
on a reload from the host copy (the fold must never touch the host copy)."""

from __future__ import annotations

import os

import pytest
import torch

from helpers import TINY
from lora_helpers import load, manager, write_adapter
from worker.adapters.host import HostAdapter, read_adapter_bytes
from worker.adapters.peft import MODULES, module_dims, read_adapter
from worker.adapters.pool import AdapterManager
from worker.config import QwenConfig
from worker.distributed import ParallelContext
from worker.errors import InvalidArgument
from worker.pb import generate_pb2 as pb

CONFIG = QwenConfig.from_dict(TINY)
RANK, ALPHA, MAX_RANK = 3, 7.0, 8  # scale 7/3: not a power of two, so rounding order shows


def _shard(module: str, a: torch.Tensor, b: torch.Tensor, rank: int, world: int):
    """This rank's (A, B), spelled out: the c_proj layers cut A's input columns; c_attn cuts B's q, k and v
    rows each; w1 and w2 cut B's rows."""
    if module in ("attn.c_proj", "mlp.c_proj"):
        return a.chunk(world, 1)[rank], b
    if module == "attn.c_attn":
        return a, torch.cat([block.chunk(world, 0)[rank] for block in b.chunk(3, 0)])
    return a, b.chunk(world, 0)[rank]


def _expected(path: str, pool_dtype: torch.dtype, rank: int, world: int):
    adapter = read_adapter(path, CONFIG, MAX_RANK, dtype=pool_dtype)
    return {key: _shard(key[1], a, b, rank, world) for key, (a, b) in adapter.weights.items()}


def _manager(root: str, pool_dtype: torch.dtype, rank: int = 0, world: int = 1, num_slots: int = 2) -> AdapterManager:
    return manager(root, CONFIG, ParallelContext(rank, world), pool_dtype, MAX_RANK, num_slots)


def _assert_slot_holds(mgr: AdapterManager, slot: int, expect: dict) -> None:
    assert expect.keys() == {key for key in mgr.slots.pools if key in expect}
    for key, (a, b) in expect.items():
        a_pool, b_pool = mgr.slots.pools[key]
        assert torch.equal(a_pool[slot, :RANK], a), key
        assert torch.equal(b_pool[slot, :, :RANK], b), key
        assert not a_pool[slot, RANK:].any() and not b_pool[slot, :, RANK:].any(), key


@pytest.mark.parametrize("file_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("pool_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rank,world", [(0, 1), (0, 2), (1, 2)])
def test_slot_from_file_bytes_equals_read_adapter(tmp_path, file_dtype, pool_dtype, rank, world):
    root = str(tmp_path)
    write_adapter(root, "x", TINY, RANK, ALPHA, seed=5, dtype=file_dtype)
    mgr = _manager(root, pool_dtype, rank, world)
    load(mgr, 1, "x")
    entry = mgr.entries[1]
    # the fast path was taken: the host copy is the file's values, the scale not yet applied
    assert entry.host.scale == ALPHA / RANK
    assert all(a.dtype == file_dtype and b.dtype == file_dtype for a, b in entry.host.tensors().values())
    expect = _expected(os.path.join(root, "x"), pool_dtype, rank, world)
    _assert_slot_holds(mgr, entry.slot, expect)
    assert mgr.slots.ranks[entry.slot].tolist() == [[RANK] * 5] * CONFIG.num_hidden_layers
    for _ in range(2):  # reloads from the host copy: the same values, the scale applied once
        mgr.offload(pb.OffloadAdapterRequest(adapter_index=1))
        assert not mgr.slots.ranks.any() and all(not a.any() and not b.any() for a, b in mgr.slots.stacked.values())
        load(mgr, 1, "x")
        _assert_slot_holds(mgr, mgr.entries[1].slot, expect)


def test_host_copy_is_the_file_and_reads_only_what_the_header_names(tmp_path):
    from safetensors.torch import load_file

    write_adapter(str(tmp_path), "x", TINY, RANK, ALPHA, seed=6, dtype=torch.bfloat16, targets=("c_attn", "w1"))
    path = str(tmp_path / "x")
    sizes = []

    def into(n):
        sizes.append(n)
        return torch.full((n + 100,), 0xAB, dtype=torch.uint8)  # larger than asked: only n bytes are used

    host = read_adapter_bytes(path, CONFIG, MAX_RANK, into)
    file = load_file(os.path.join(path, "adapter_model.safetensors"))
    data = os.path.getsize(os.path.join(path, "adapter_model.safetensors"))
    assert sizes == [host.nbytes] and host.nbytes == sum(t.numel() * t.element_size() for t in file.values())
    assert host.nbytes < data  # the header is not part of it
    assert set(host.tensors()) == {(i, m) for i in range(CONFIG.num_hidden_layers) for m in ("attn.c_attn", "mlp.w1")}
    for (layer, module), (a, b) in host.tensors().items():
        prefix = f"base_model.model.transformer.h.{layer}.{module}."
        assert torch.equal(a, file[prefix + "lora_A.weight"]) and torch.equal(b, file[prefix + "lora_B.weight"])
    assert read_adapter_bytes(path, CONFIG, MAX_RANK, lambda n: None) is None  # declined: the caller falls back


def test_truncated_file_is_a_clear_error_and_the_pool_keeps_serving(tmp_path):
    root = str(tmp_path)
    write_adapter(root, "good", TINY, RANK, ALPHA, seed=7)
    write_adapter(root, "cut", TINY, RANK, ALPHA, seed=8)
    file = os.path.join(root, "cut", "adapter_model.safetensors")
    with open(file, "r+b") as f:
        f.truncate(os.path.getsize(file) - 10)
    mgr = _manager(root, torch.float32)
    load(mgr, 1, "good")
    with pytest.raises(InvalidArgument, match="cannot read .*adapter_model.safetensors"):
        load(mgr, 2, "cut")
    assert 2 not in mgr.entries
    _assert_slot_holds(mgr, mgr.entries[1].slot, _expected(os.path.join(root, "good"), torch.float32, 0, 1))


@pytest.mark.parametrize("file_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("pool_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_folded_host_copy_holds_read_adapters_values(tmp_path, file_dtype, pool_dtype):
    """What the pinning thread stores for fast reloads: read_adapter's values, bit for bit, scale 1."""
    write_adapter(str(tmp_path), "x", TINY, RANK, ALPHA, seed=9, dtype=file_dtype)
    path = str(tmp_path / "x")
    host = read_adapter_bytes(path, CONFIG, MAX_RANK, lambda n: torch.empty(n, dtype=torch.uint8))
    before = host.buf.clone()
    sizes = []
    folded = HostAdapter.from_weights(
        host.folded(pool_dtype), lambda n: sizes.append(n) or torch.empty(n + 64, dtype=torch.uint8)
    )
    assert folded.scale == 1.0 and folded.nbytes == sizes[0] and not folded.cut
    assert torch.equal(host.buf, before)  # the source is untouched
    expect = read_adapter(path, CONFIG, MAX_RANK, dtype=pool_dtype).weights
    assert folded.tensors().keys() == expect.keys()
    for key, (a, b) in folded.tensors().items():
        assert torch.equal(a, expect[key][0]) and torch.equal(b, expect[key][1]), key


@pytest.mark.parametrize("rank", [0, 1])
def test_a_cut_host_copy_fills_the_same_slot(tmp_path, rank):
    """Under TP the pinned host copy keeps only this rank's shard (cut=True): a fill from it must not cut
    again, and must give the slot the fast path's values."""
    write_adapter(str(tmp_path), "x", TINY, RANK, ALPHA, seed=10, dtype=torch.bfloat16)
    mgr = _manager(str(tmp_path), torch.bfloat16, rank, 2)
    load(mgr, 1, "x")
    host = mgr.entries[1].host
    cut = HostAdapter.from_weights(host.folded(torch.bfloat16, mgr.slots.cut), cut=True)
    assert cut.nbytes < HostAdapter.from_weights(host.folded(torch.bfloat16)).nbytes  # a shard, not all of it
    before = {k: (a[1].clone(), b[1].clone()) for k, (a, b) in mgr.slots.stacked.items()}
    mgr.offload(pb.OffloadAdapterRequest(adapter_index=1))
    mgr.entries[1].host = cut
    load(mgr, 1, "x")
    slot = mgr.entries[1].slot
    assert all(
        torch.equal(a[slot], before[k][0]) and torch.equal(b[slot], before[k][1])
        for k, (a, b) in mgr.slots.stacked.items()
    )


def test_merged_adapters_are_kept_in_the_pool_dtype(tmp_path):
    """A merge is computed in fp32; its host copy is rounded once to the pool dtype, so that on CUDA it
    fits the staging buffer (a whole adapter at the maximum rank in the pool dtype)."""
    root = str(tmp_path)
    write_adapter(root, "a", TINY, MAX_RANK, ALPHA, seed=11)
    write_adapter(root, "b", TINY, MAX_RANK, ALPHA, seed=12)
    mgr = _manager(root, torch.bfloat16)
    load(mgr, 1, "a", "b", weights=[0.5, 0.5])
    host = mgr.entries[1].host
    assert all(a.dtype == b.dtype == torch.bfloat16 for a, b in host.tensors().values())
    whole = sum(MAX_RANK * sum(module_dims(CONFIG, m)) for m in MODULES) * CONFIG.num_hidden_layers * 2
    assert mgr.slots.adapter_bytes(torch.bfloat16) == whole  # the staging buffer's size
    assert host.nbytes <= whole


def test_a_file_replaced_after_validation_is_a_clear_error(tmp_path, monkeypatch):
    """The offsets used come from the header read with the data (same open file), checked against what
    safetensors validated: a file swapped in between is InvalidArgument, and nothing is registered."""
    import shutil

    import worker.adapters.host as host

    root = str(tmp_path)
    write_adapter(root, "x", TINY, RANK, ALPHA, seed=13, dtype=torch.bfloat16)
    write_adapter(str(tmp_path / "other"), "x", TINY, RANK, ALPHA, seed=14, dtype=torch.float32)
    real_open = host.safe_open

    class SwapAfterValidation:
        def __init__(self, file, **kw):
            self.file, self.inner = file, real_open(file, **kw)

        def __enter__(self):
            return self.inner.__enter__()

        def __exit__(self, *exc):
            self.inner.__exit__(*exc)
            shutil.copy(str(tmp_path / "other" / "x" / "adapter_model.safetensors"), self.file)

    monkeypatch.setattr(host, "safe_open", SwapAfterValidation)
    mgr = _manager(root, torch.float32)
    with pytest.raises(InvalidArgument, match="changed while the file was being read"):
        load(mgr, 1, "x")
    assert mgr.entries == {} and not mgr.slots.ranks.any()


def test_a_fill_that_fails_part_way_leaves_the_slot_zeroed(tmp_path, monkeypatch):
    root = str(tmp_path)
    write_adapter(root, "x", TINY, RANK, ALPHA, seed=15)
    mgr = _manager(root, torch.float32, num_slots=1)
    copy_into = mgr.slots.copy_into

    def fails_after_copying(slot, host, src, ranks, non_blocking):
        copy_into(slot, host, src, ranks, non_blocking)  # every lane written ...
        raise torch.OutOfMemoryError("injected")  # ... then a failure before the fill returns

    monkeypatch.setattr(mgr.slots, "copy_into", fails_after_copying)
    with pytest.raises(torch.OutOfMemoryError):
        load(mgr, 1, "x")
    assert not mgr.slots.ranks.any() and all(not a.any() and not b.any() for a, b in mgr.slots.stacked.values())
    monkeypatch.setattr(mgr.slots, "copy_into", copy_into)
    load(mgr, 1, "x")  # the slot serves again
    _assert_slot_holds(mgr, mgr.entries[1].slot, _expected(os.path.join(root, "x"), torch.float32, 0, 1))
