"""Safetensors reader (single file, sharded + index) and the tensor-parallel slicing helpers."""

import json

import pytest
import torch
from safetensors.torch import save_file

from worker.weights import WeightError, Weights, shard_packed, shard_tensor, unshard_packed


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(12, 6, generator=g),
        "b.weight": torch.randn(6, 10, generator=g),
        "c.bias": torch.randn(12, generator=g),
    }


def test_single_file_and_dtype(tmp_path):
    t = _tensors()
    save_file(t, str(tmp_path / "model.safetensors"))
    w = Weights(str(tmp_path), torch.bfloat16)
    got = w.get("a.weight", (12, 6))
    assert got.dtype == torch.bfloat16 and torch.equal(got, t["a.weight"].bfloat16())
    assert set(w.names()) == set(t)


def test_sharded_index(tmp_path):
    t = _tensors()
    save_file({"a.weight": t["a.weight"]}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"b.weight": t["b.weight"], "c.bias": t["c.bias"]}, str(tmp_path / "model-00002-of-00002.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps(
            {
                "weight_map": {
                    "a.weight": "model-00001-of-00002.safetensors",
                    "b.weight": "model-00002-of-00002.safetensors",
                    "c.bias": "model-00002-of-00002.safetensors",
                }
            }
        )
    )
    w = Weights(str(tmp_path), torch.float32)
    for name, ref in t.items():
        assert torch.equal(w.get(name), ref)


def test_errors_name_tensor_and_shapes(tmp_path):
    save_file(_tensors(), str(tmp_path / "model.safetensors"))
    w = Weights(str(tmp_path), torch.float32)
    with pytest.raises(WeightError, match=r"'missing\.weight' is missing"):
        w.get("missing.weight")
    with pytest.raises(WeightError, match=r"'a\.weight': expected shape \(6, 12\), found \(12, 6\)"):
        w.get("a.weight", (6, 12))
    with pytest.raises(WeightError, match="does not divide"):
        w.get_sharded("b.weight", 1, 0, 3)


def test_no_pickles(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(WeightError, match="never loaded"):
        Weights(str(tmp_path), torch.float32)


def test_truncated_file(tmp_path):
    save_file(_tensors(), str(tmp_path / "model.safetensors"))
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightError, match="cannot read .*model.safetensors"):
        Weights(str(tmp_path), torch.float32).get("b.weight")


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shard_and_reassemble(tmp_path, world):
    g = torch.Generator().manual_seed(1)
    full = torch.randn(24, 12, generator=g)
    save_file({"x": full}, str(tmp_path / "model.safetensors"))
    w = Weights(str(tmp_path), torch.float32)
    rows = [w.get_sharded("x", 0, r, world) for r in range(world)]
    cols = [w.get_sharded("x", 1, r, world) for r in range(world)]
    assert torch.equal(torch.cat(rows, 0), full) and torch.equal(torch.cat(cols, 1), full)
    assert all(torch.equal(a, shard_tensor(full, 0, r, world)) for r, a in enumerate(rows))
    # packed q/k/v: each block split on its own; reading from disk equals the in-memory rule
    packed = [w.get_packed_sharded("x", 0, [8, 8, 8], r, world) for r in range(world)] if 8 % world == 0 else None
    if packed is not None:
        assert torch.equal(unshard_packed(packed, 0, 3), full)
        for r, p in enumerate(packed):
            assert torch.equal(p, shard_packed(full, 0, [8, 8, 8], r, world))
            q, k, v = p.chunk(3)  # rank r holds q_r, k_r, v_r, not a contiguous slice of the fused rows
            n = 8 // world
            assert torch.equal(q, full[r * n : (r + 1) * n]) and torch.equal(k, full[8 + r * n : 8 + (r + 1) * n])
