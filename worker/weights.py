"""Safetensors checkpoint reader (single file or sharded with an index) and tensor-parallel slicing.

Files are memory-mapped by `safetensors.safe_open`; a rank reads only its own slice of each tensor
(`get_slice`), converts it to the model dtype and moves it to its device. Only safetensors are ever
read: no pickle.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from safetensors import safe_open


class WeightError(ValueError):
    """A checkpoint that does not match the model (missing tensor, wrong shape, unreadable file)."""


# ---------------------------------------------------------------- slicing rules (pure functions)
def shard_range(size: int, rank: int, world_size: int, what: str = "dimension") -> tuple[int, int]:
    """[start, stop) of rank's even share of `size`; an uneven split is an error, never a silent pad."""
    if size % world_size:
        raise WeightError(f"{what} of size {size} does not divide across {world_size} shards")
    step = size // world_size
    return rank * step, (rank + 1) * step


def shard_tensor(t: torch.Tensor, dim: int, rank: int, world_size: int, what: str = "tensor") -> torch.Tensor:
    """Rank's contiguous slice of `t` along `dim`."""
    start, stop = shard_range(t.shape[dim], rank, world_size, what)
    return t.narrow(dim, start, stop - start)


def shard_packed(
    t: torch.Tensor, dim: int, sizes: Sequence[int], rank: int, world_size: int, what: str = "tensor"
) -> torch.Tensor:
    """For a tensor packing several blocks along `dim` (e.g. q, k, v of c_attn), shard each block
    separately and concatenate the rank's pieces: [q_r; k_r; v_r]."""
    if sum(sizes) != t.shape[dim]:
        raise WeightError(f"{what}: packed sizes {list(sizes)} do not add up to {t.shape[dim]}")
    pieces, offset = [], 0
    for size in sizes:
        block = t.narrow(dim, offset, size)
        pieces.append(shard_tensor(block, dim, rank, world_size, what))
        offset += size
    return torch.cat(pieces, dim=dim)


def unshard_packed(parts: Sequence[torch.Tensor], dim: int, n_blocks: int) -> torch.Tensor:
    """Inverse of shard_packed over all ranks' parts (used by tests and debugging)."""
    per_rank = [p.chunk(n_blocks, dim=dim) for p in parts]
    return torch.cat([torch.cat([r[b] for r in per_rank], dim=dim) for b in range(n_blocks)], dim=dim)


# ---------------------------------------------------------------- the reader
class Weights:
    """Name → tensor access over one or several safetensors files."""

    def __init__(self, model_dir: str, dtype: torch.dtype, device: torch.device | str = "cpu"):
        self.model_dir = model_dir
        self.dtype = dtype
        self.device = torch.device(device)
        self._file_of: dict[str, str] = self._index(model_dir)
        self._handles: dict[str, Any] = {}  # path -> safe_open handle

    @staticmethod
    def _index(model_dir: str) -> dict[str, str]:
        index_path = os.path.join(model_dir, "model.safetensors.index.json")
        if os.path.isfile(index_path):
            try:
                with open(index_path) as f:
                    index = json.load(f)
            except (OSError, ValueError) as exc:
                raise WeightError(f"{index_path} is not readable JSON: {exc}") from exc
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise WeightError(f"{index_path} has no 'weight_map' of tensor name -> file name")
            for fn in set(weight_map.values()):
                if not os.path.isfile(os.path.join(model_dir, fn)):
                    raise WeightError(f"{index_path} names {fn}, which is missing")
            return {name: os.path.join(model_dir, fn) for name, fn in weight_map.items()}
        files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
        if not files:
            hint = (
                " (.bin/.pt pickles are never loaded: convert to safetensors)"
                if any(f.endswith((".bin", ".pt")) for f in os.listdir(model_dir))
                else ""
            )
            raise WeightError(f"no *.safetensors files in {model_dir}{hint}")
        out: dict[str, str] = {}
        for fn in files:
            path = os.path.join(model_dir, fn)
            try:
                with safe_open(path, framework="pt") as h:
                    for name in h.keys():
                        out[name] = path
            except Exception as exc:  # truncated / corrupt file
                raise WeightError(f"cannot read {path}: {exc}") from exc
        return out

    def names(self) -> Iterable[str]:
        return self._file_of.keys()

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def _slice(self, name: str) -> Any:
        path = self._file_of.get(name)
        if path is None:
            index = os.path.join(self.model_dir, "model.safetensors.index.json")
            where = index if os.path.isfile(index) else f"the *.safetensors files in {self.model_dir}"
            raise WeightError(f"tensor {name!r} is missing from the checkpoint: {where} does not list it")
        handle = self._handles.get(path)
        if handle is None:
            try:
                handle = safe_open(path, framework="pt")
            except Exception as exc:  # truncated / corrupt file
                raise WeightError(f"cannot read {path}: {exc}") from exc
            self._handles[path] = handle
        return handle.get_slice(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def dtype_of(self, name: str) -> str:
        """The stored dtype's safetensors name (e.g. "I32", "F16", "BF16")."""
        return str(self._slice(name).get_dtype())

    def _finish(self, t: torch.Tensor) -> torch.Tensor:
        """Floating-point tensors in the model dtype; integer ones (packed GPTQ words, g_idx) as stored."""
        return (t.to(dtype=self.dtype) if t.is_floating_point() else t).to(self.device)

    def get(self, name: str, expected_shape: Sequence[int] | None = None) -> torch.Tensor:
        """The whole tensor, checked against `expected_shape`."""
        self.check_shape(name, expected_shape)
        return self._finish(self._slice(name)[:])

    def scalar(self, name: str) -> float:
        """A one-element tensor (e.g. an fp8 KV scale) as a python float, read at full precision."""
        t = self._slice(name)[...]  # `[:]` fails on 0-d tensors
        if t.numel() != 1:
            raise WeightError(f"tensor {name!r}: expected one number, found shape {tuple(t.shape)}")
        return float(t.float().reshape(()))

    def check_shape(self, name: str, expected_shape: Sequence[int] | None) -> None:
        found = self.shape(name)
        if expected_shape is not None and tuple(expected_shape) != found:
            raise WeightError(
                f"{self._file_of[name]}: tensor {name!r}: expected shape {tuple(expected_shape)}, found {found}"
            )

    def get_sharded(
        self, name: str, dim: int, rank: int, world_size: int, expected_shape: Sequence[int] | None = None
    ) -> torch.Tensor:
        """Rank's contiguous slice along `dim`, reading only that slice from disk."""
        self.check_shape(name, expected_shape)
        sl = self._slice(name)
        shape = sl.get_shape()
        start, stop = shard_range(shape[dim], rank, world_size, f"{name} dim {dim}")
        index = tuple(slice(None) if d != dim else slice(start, stop) for d in range(len(shape)))
        return self._finish(sl[index])

    def get_packed_sharded(
        self,
        name: str,
        dim: int,
        sizes: Sequence[int],
        rank: int,
        world_size: int,
        expected_shape: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Rank's pieces of each packed block (see shard_packed), reading only those rows."""
        self.check_shape(name, expected_shape)
        sl = self._slice(name)
        shape = sl.get_shape()
        if sum(sizes) != shape[dim]:
            raise WeightError(f"{name}: packed sizes {list(sizes)} do not add up to {shape[dim]}")
        pieces, offset = [], 0
        for size in sizes:
            start, stop = shard_range(size, rank, world_size, f"{name} block")
            index = tuple(slice(None) if d != dim else slice(offset + start, offset + stop) for d in range(len(shape)))
            pieces.append(sl[index])
            offset += size
        return self._finish(torch.cat(pieces, dim=dim))


def torch_dtype(name: str) -> torch.dtype:
    table = {
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
        "half": torch.float16,
        "float32": torch.float32,
        "fp32": torch.float32,
        "float": torch.float32,
    }
    if name not in table:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(table)}")
    return table[name]
