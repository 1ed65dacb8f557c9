"""An adapter's host copy (HostAdapter: A and B as bytes in one flat buffer) and the fast reader that fills
one straight from a safetensors file's data section.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

import torch
from safetensors import safe_open

from worker.adapters.peft import WEIGHTS_FILE, LoraAdapter, adapter_config, pair_keys
from worker.config import QwenConfig
from worker.errors import InvalidArgument

Key = tuple[int, str]  # (layer, PEFT module)
Pair = tuple[torch.Tensor, torch.Tensor]  # (A [r, in], B [out, r])


@dataclass(frozen=True)
class TensorAt:
    """Where one tensor lies in a flat byte buffer."""

    offset: int
    shape: tuple[int, ...]
    dtype: torch.dtype

    def view(self, buf: torch.Tensor) -> torch.Tensor:
        n = math.prod(self.shape) * self.dtype.itemsize
        return buf[self.offset : self.offset + n].view(self.dtype).view(self.shape)


@dataclass(eq=False)
class HostAdapter:
    """An adapter's A and B as bytes in one flat uint8 buffer (`tensors()` gives the views). B is still to be
    multiplied by `scale` (1.0: folded in). `cut`: the tensors are already this TP rank's shard (else the
    whole adapter). A copy may replace `buf` with a byte-identical one (same layout)."""

    rank: int
    scale: float
    buf: torch.Tensor
    layout: dict[Key, tuple[TensorAt, TensorAt]]
    pinned: bool = False
    cut: bool = False

    @property
    def nbytes(self) -> int:
        return self.buf.numel()

    def tensors(self, buf: torch.Tensor | None = None) -> dict[Key, Pair]:
        """(A, B) per (layer, module), views of `buf` (default: this copy's own), B without the scale."""
        buf = self.buf if buf is None else buf
        return {key: (a.view(buf), b.view(buf)) for key, (a, b) in self.layout.items()}

    def folded(
        self, dtype: torch.dtype, cut: Callable[[Key, torch.Tensor, torch.Tensor], Pair] | None = None
    ) -> LoraAdapter:
        """New tensors with read_adapter's values: A in `dtype`, B times the scale in fp32 rounded once to
        `dtype`; each pair first through `cut(key, a, b)` when given (this rank's shard)."""
        out = {}
        for key, (a, b) in self.tensors().items():
            if cut is not None:
                a, b = cut(key, a, b)
            out[key] = (a.to(dtype, copy=True), (b.float() * self.scale).to(dtype))
        return LoraAdapter(self.rank, out)

    @classmethod
    def from_weights(
        cls, adapter: LoraAdapter, alloc: Callable[[int], torch.Tensor] | None = None, cut: bool = False
    ) -> HostAdapter:
        """Pack an adapter whose scale is folded in already into one buffer from `alloc(nbytes)` (default:
        a new pageable one)."""
        layout, offset = {}, 0
        for key, pair in adapter.weights.items():
            ats = []
            for t in pair:
                offset = -(-offset // t.element_size()) * t.element_size()
                ats.append(TensorAt(offset, tuple(t.shape), t.dtype))
                offset += t.numel() * t.element_size()
            layout[key] = (ats[0], ats[1])
        buf = (alloc or (lambda n: torch.empty(n, dtype=torch.uint8)))(offset)[:offset]
        for key, pair in adapter.weights.items():
            for at, t in zip(layout[key], pair):
                at.view(buf).copy_(t)
        return cls(adapter.rank, 1.0, buf, layout, pinned=buf.is_pinned(), cut=cut)


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
READ_CHUNK = 4 << 20  # parallel pread pieces (H200 host, 72 MB file: page cache dropped 41 ms, cached 5 ms)


def read_adapter_bytes(
    path: str,
    config: QwenConfig,
    max_rank: int,
    into: Callable[[int], torch.Tensor | None],
    readers: concurrent.futures.Executor | None = None,
) -> HostAdapter | None:
    """The adapter at `path` with its safetensors data section read unconverted into the uint8 buffer
    `into(nbytes)` returns (e.g. pinned staging memory: no CPU pass over the values), in READ_CHUNK pieces
    on `readers` (None: one after another here).

    safetensors validates the file first; the header whose offsets are used is then read from the same
    open file as the data and checked again (extents match shapes and dtypes and tile the data section;
    names, shapes and dtypes are the ones safetensors saw), so a file replaced meanwhile is an error, not
    garbage. Names and shapes are checked as read_adapter does. None when this path does not apply (no
    safetensors file, a non-float or misaligned tensor, or `into` declines the size): read_adapter then
    reads it, with its errors."""
    r, scale = adapter_config(path, max_rank)
    st = os.path.join(path, WEIGHTS_FILE)
    if not os.path.isfile(st):
        return None
    try:
        with safe_open(st, framework="pt") as h:
            meta = {k: h.get_slice(k) for k in h.keys()}
            meta = {k: (tuple(s.get_shape()), s.get_dtype()) for k, s in meta.items()}
    except Exception as exc:  # truncated or corrupt
        raise InvalidArgument(f"cannot read {st}: {exc}") from exc
    pairs = pair_keys(path, config, r, {k: shape for k, (shape, _) in meta.items()})
    try:
        fd = os.open(st, os.O_RDONLY)
    except OSError as exc:
        raise InvalidArgument(f"cannot read {st}: {exc}") from exc
    try:
        size = os.fstat(fd).st_size
        (n,) = struct.unpack("<Q", os.pread(fd, 8, 0).ljust(8, b"\0"))
        if n > size - 8:
            raise ValueError(f"a header of {n} bytes in a file of {size}")
        header = json.loads(os.pread(fd, n, 8))
        ats, extents = {}, []
        for key, (shape, dtype_name) in meta.items():
            info = header.get(key)
            if not isinstance(info, dict) or info.get("dtype") != dtype_name or tuple(info.get("shape", ())) != shape:
                raise ValueError(f"{key!r} changed while the file was being read")
            dtype = _ST_DTYPES.get(dtype_name)
            begin, stop = (int(x) for x in info["data_offsets"])
            if dtype is None or begin % dtype.itemsize:
                return None
            if stop - begin != math.prod(shape) * dtype.itemsize:
                raise ValueError(f"{key!r}: data_offsets {begin}..{stop} do not hold {shape} of {dtype_name}")
            ats[key] = TensorAt(begin, shape, dtype)
            extents.append((begin, stop))
        end = 0
        for begin, stop in sorted(extents):
            if begin != end:
                raise ValueError(f"tensor data at {begin} where {end} was expected")
            end = stop
        if end != size - 8 - n:
            raise ValueError(f"the tensors hold {end} bytes, the data section {size - 8 - n}")
        buf = into(end)
        if buf is None:
            return None
        _pread_all(fd, buf[:end], 8 + n, readers)
    except (OSError, ValueError, KeyError, TypeError) as exc:  # json.JSONDecodeError is a ValueError
        raise InvalidArgument(f"cannot read {st}: {exc}") from exc
    finally:
        os.close(fd)
    return HostAdapter(r, scale, buf[:end], {key: (ats[ka], ats[kb]) for key, (ka, kb) in pairs.items()})


def _pread_all(fd: int, buf: torch.Tensor, start: int, readers: concurrent.futures.Executor | None) -> None:
    """Fill the uint8 tensor `buf` with the open file's bytes from `start` on, in READ_CHUNK pieces."""
    view, total = buf.numpy().data, buf.numel()

    def piece(offset: int) -> None:
        stop = min(offset + READ_CHUNK, total)
        while offset < stop:
            got = os.preadv(fd, [view[offset:stop]], start + offset)
            if got <= 0:
                raise ValueError("the file ends before its header says")
            offset += got

    if readers is None:
        for offset in range(0, total, READ_CHUNK):
            piece(offset)
        return
    futures = [readers.submit(piece, o) for o in range(0, total, READ_CHUNK)]
    concurrent.futures.wait(futures)  # all of them: none may still read once the caller closes the fd
    for future in futures:
        future.result()
