"""Read and validate PEFT LoRA adapters for Qwen v1, and cut them for this rank.

Targets: attn.c_attn, attn.c_proj, mlp.c_proj, mlp.w1, mlp.w2 — dispatched by the full key path
(`c_proj` alone names two different modules). Scale alpha/r (or alpha/sqrt(r) with rsLoRA) is folded
into B: by read_adapter on the host, or, for read_adapter_bytes (the file's bytes as they are, for a fast
load), when the pool copies B into its slot. Only safetensors are read unless `allow_bin` explicitly permits a weights-only
`.bin` (torch.load(weights_only=True)).
"""
from __future__ import annotations

import concurrent.futures
import json
import math
import os
import re
import struct
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from safetensors import safe_open

from worker.config import QwenConfig
from worker.errors import FailedPrecondition, InvalidArgument, NotFound
from worker.weights import shard_packed, shard_tensor

MODULES = ("attn.c_attn", "attn.c_proj", "mlp.c_proj", "mlp.w1", "mlp.w2")
COLUMN = {"attn.c_attn", "mlp.w1", "mlp.w2"}  # A whole, B split like the base output
ROW = {"attn.c_proj", "mlp.c_proj"}  # A split on its input dim, B whole
CONFIG_FILE, WEIGHTS_FILE, BIN_FILE = "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"
_KEY = re.compile(r"^base_model\.model\.transformer\.h\.(\d+)\.(attn\.c_attn|attn\.c_proj|mlp\.c_proj|mlp\.w1|"
                  r"mlp\.w2)\.lora_([AB])(?:\.[A-Za-z0-9_-]+)?\.weight$")


@dataclass
class LoraAdapter:
    """Full (unsharded) LoRA weights on the host, scale folded into B (fp32 unless read for a pool dtype)."""

    rank: int
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]  # (layer, module) -> (A [r, in], B [out, r])

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.weights.values())


def module_dims(config: QwenConfig, module: str) -> tuple[int, int]:
    """(in, out) of a target module, full size."""
    H, w = config.hidden_size, config.mlp_width
    return {"attn.c_attn": (H, 3 * H), "attn.c_proj": (H, H), "mlp.c_proj": (w, H),
            "mlp.w1": (H, w), "mlp.w2": (H, w)}[module]


def resolve_adapter_dir(root: str, adapter_id: str) -> str:
    """The adapter directory for `adapter_id` under `root`; rejects anything that escapes the root
    (`..`, absolute paths elsewhere, symlinks pointing out)."""
    if not adapter_id or "\x00" in adapter_id:
        raise InvalidArgument(f"invalid adapter id {adapter_id!r}")
    if ".." in adapter_id.replace("\\", "/").split("/"):
        raise InvalidArgument(f"adapter id {adapter_id!r} contains '..': adapters load only from under the "
                              "adapter root")
    root_real = os.path.realpath(root)
    candidate = adapter_id if os.path.isabs(adapter_id) else os.path.join(root_real, adapter_id)
    real = os.path.realpath(candidate)
    if os.path.commonpath([real, root_real]) != root_real:
        raise InvalidArgument(f"adapter id {adapter_id!r} resolves outside the adapter root {root}")
    if not os.path.isdir(real):
        raise NotFound(f"adapter {adapter_id!r} not found under the adapter root {root}")
    for name in (CONFIG_FILE, WEIGHTS_FILE, BIN_FILE):  # links may point elsewhere under the root (HF cache blobs)
        file = os.path.join(real, name)
        if os.path.lexists(file) and os.path.commonpath([os.path.realpath(file), root_real]) != root_real:
            raise InvalidArgument(f"adapter {adapter_id!r}: {name} is a link that resolves outside the adapter "
                                  f"root {root}")
    return real


def _adapter_config(path: str, max_rank: int) -> tuple[int, float]:
    """(rank r, scale) from the adapter's adapter_config.json, refusing what this worker cannot serve."""
    cfg_path = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(cfg_path):
        raise NotFound(f"adapter at {path} has no adapter_config.json")
    try:
        with open(cfg_path) as f:
            acfg = json.load(f)
    except json.JSONDecodeError as exc:
        raise InvalidArgument(f"{cfg_path} is not valid JSON: {exc}") from exc
    if acfg.get("peft_type", "LORA") != "LORA":
        raise FailedPrecondition(f"adapter {path}: peft_type {acfg.get('peft_type')!r} is not supported (LORA only)")
    if acfg.get("use_dora"):
        raise FailedPrecondition(f"adapter {path}: DoRA (use_dora=true) is not supported")
    if acfg.get("modules_to_save"):
        raise FailedPrecondition(f"adapter {path}: modules_to_save {acfg['modules_to_save']} (full replacement "
                                 "matrices) is not supported")
    if acfg.get("rank_pattern") or acfg.get("alpha_pattern"):
        raise FailedPrecondition(f"adapter {path}: per-module rank_pattern/alpha_pattern is not supported")
    if acfg.get("fan_in_fan_out"):
        raise FailedPrecondition(f"adapter {path}: fan_in_fan_out=true does not apply to Qwen's Linear layers")
    r = int(acfg.get("r", 0))
    if r < 1:
        raise InvalidArgument(f"adapter {path}: rank r={r} must be positive")
    if r > max_rank:
        raise FailedPrecondition(f"adapter {path}: rank {r} exceeds the configured maximum --max-lora-rank {max_rank}")
    alpha = float(acfg.get("lora_alpha", r))
    return r, alpha / math.sqrt(r) if acfg.get("use_rslora") else alpha / r


def _pair_keys(path: str, config: QwenConfig, r: int,
               shapes: dict[str, tuple[int, ...]]) -> dict[tuple[int, str], tuple[str, str]]:
    """(layer, module) -> (key of lora_A, key of lora_B), every name and shape checked against the base model."""
    pairs: dict[tuple[int, str], dict[str, str]] = {}
    for key in shapes:
        m = _KEY.match(key)
        if m is None:
            raise FailedPrecondition(f"adapter {path}: unsupported tensor {key!r} (LoRA on c_attn, attn.c_proj, "
                                     "mlp.c_proj, w1, w2 only)")
        layer, module, which = int(m.group(1)), m.group(2), m.group(3)
        if layer >= config.num_hidden_layers:
            raise InvalidArgument(f"adapter {path}: {key} names layer {layer}; the base model has "
                                  f"{config.num_hidden_layers} layers")
        pairs.setdefault((layer, module), {})[which] = key
    if not pairs:
        raise InvalidArgument(f"adapter {path}: no LoRA tensors found")
    out = {}
    for (layer, module), ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise InvalidArgument(f"adapter {path}: layer {layer} {module} has lora_{next(iter(ab))} but not both")
        a, b = shapes[ab["A"]], shapes[ab["B"]]
        d_in, d_out = module_dims(config, module)
        if tuple(a) != (r, d_in) or tuple(b) != (d_out, r):
            raise InvalidArgument(f"adapter {path}: layer {layer} {module}: lora_A {tuple(a)} / lora_B "
                                  f"{tuple(b)} do not match the base model (expected {(r, d_in)} / {(d_out, r)})"
                                  " — was it trained for another base model?")
        out[(layer, module)] = (ab["A"], ab["B"])
    return out


def read_adapter(path: str, config: QwenConfig, max_rank: int, allow_bin: bool = False,
                 dtype: torch.dtype = torch.float32) -> LoraAdapter:
    """The adapter at `path`, validated, in `dtype` (B scaled in fp32, then rounded once to `dtype`)."""
    r, scale = _adapter_config(path, max_rank)
    tensors = _read_tensors(path, allow_bin)
    pairs = _pair_keys(path, config, r, {k: tuple(t.shape) for k, t in tensors.items()})
    return LoraAdapter(r, {key: (tensors[ka].to(dtype).contiguous(), (tensors[kb].float() * scale).to(dtype).contiguous())
                           for key, (ka, kb) in pairs.items()})


@dataclass(frozen=True)
class TensorAt:
    """Where one tensor lies in a flat byte buffer."""

    offset: int
    shape: tuple[int, ...]
    dtype: torch.dtype

    def view(self, buf: torch.Tensor) -> torch.Tensor:
        n = math.prod(self.shape) * self.dtype.itemsize
        return buf[self.offset:self.offset + n].view(self.dtype).view(self.shape)


@dataclass(eq=False)
class HostAdapter:
    """An adapter's A and B as bytes in one flat uint8 buffer (`tensors()` gives the views). B is still to be
    multiplied by `scale` (1.0: folded in). `cut`: the tensors are already this TP rank's shard (else the
    whole adapter). A copy may replace `buf` with a byte-identical one (same layout)."""

    rank: int
    scale: float
    buf: torch.Tensor
    layout: dict[tuple[int, str], tuple[TensorAt, TensorAt]]
    pinned: bool = False
    cut: bool = False

    @property
    def nbytes(self) -> int:
        return self.buf.numel()

    def tensors(self, buf: Optional[torch.Tensor] = None) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
        """(A, B) per (layer, module), views of `buf` (default: this copy's own), B without the scale."""
        buf = self.buf if buf is None else buf
        return {key: (a.view(buf), b.view(buf)) for key, (a, b) in self.layout.items()}

    def folded(self, dtype: torch.dtype, cut: Optional[Callable] = None) -> LoraAdapter:
        """New tensors with read_adapter's values: A in `dtype`, B times the scale in fp32 rounded once to
        `dtype`; each pair first through `cut(key, a, b)` when given (this rank's shard)."""
        out = {}
        for key, (a, b) in self.tensors().items():
            if cut is not None:
                a, b = cut(key, a, b)
            out[key] = (a.to(dtype, copy=True), (b.float() * self.scale).to(dtype))
        return LoraAdapter(self.rank, out)

    @classmethod
    def from_weights(cls, adapter: LoraAdapter, alloc: Optional[Callable[[int], torch.Tensor]] = None,
                     cut: bool = False) -> "HostAdapter":
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
_readers: Optional[concurrent.futures.ThreadPoolExecutor] = None


def read_adapter_bytes(path: str, config: QwenConfig, max_rank: int,
                       into: Callable[[int], Optional[torch.Tensor]]) -> Optional[HostAdapter]:
    """The adapter at `path` with its safetensors data section read unconverted, in parallel pieces, into
    the uint8 buffer `into(nbytes)` returns (e.g. pinned staging memory: no CPU pass over the values).
    safetensors validates the file first; the header whose offsets are used is then read from the same
    open file as the data and checked again (every tensor's extent matches its shape and dtype, the
    extents tile the data section, names, shapes and dtypes are the ones safetensors saw), so a file
    replaced meanwhile is an error, not garbage. The checks on names and shapes are read_adapter's. None
    when this path does not apply (no safetensors file, a non-float or misaligned tensor, or `into`
    declines the size): read_adapter then reads it, with its errors."""
    r, scale = _adapter_config(path, max_rank)
    st = os.path.join(path, WEIGHTS_FILE)
    if not os.path.isfile(st):
        return None
    try:
        with safe_open(st, framework="pt") as h:
            meta = {k: h.get_slice(k) for k in h.keys()}
            meta = {k: (tuple(s.get_shape()), s.get_dtype()) for k, s in meta.items()}
    except Exception as exc:  # truncated or corrupt
        raise InvalidArgument(f"cannot read {st}: {exc}") from exc
    pairs = _pair_keys(path, config, r, {k: shape for k, (shape, _) in meta.items()})
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
        _pread_all(fd, buf[:end], 8 + n)
    except (OSError, ValueError, KeyError, TypeError) as exc:  # json.JSONDecodeError is a ValueError
        raise InvalidArgument(f"cannot read {st}: {exc}") from exc
    finally:
        os.close(fd)
    return HostAdapter(r, scale, buf[:end], {key: (ats[ka], ats[kb]) for key, (ka, kb) in pairs.items()})


def _pread_all(fd: int, buf: torch.Tensor, start: int) -> None:
    """Fill the uint8 tensor `buf` with the open file's bytes from `start` on, READ_CHUNK pieces in parallel."""
    global _readers
    if _readers is None:
        _readers = concurrent.futures.ThreadPoolExecutor(8, thread_name_prefix="adapter-read")
    view, total = memoryview(buf.numpy()), buf.numel()

    def piece(offset: int) -> None:
        stop = min(offset + READ_CHUNK, total)
        while offset < stop:
            got = os.preadv(fd, [view[offset:stop]], start + offset)
            if got <= 0:
                raise ValueError("the file ends before its header says")
            offset += got

    futures = [_readers.submit(piece, o) for o in range(0, total, READ_CHUNK)]
    concurrent.futures.wait(futures)  # all of them: none may still read once the caller closes the fd
    for future in futures:
        future.result()


def _read_tensors(path: str, allow_bin: bool) -> dict[str, torch.Tensor]:
    st = os.path.join(path, WEIGHTS_FILE)
    if os.path.isfile(st):
        try:  # mmap'd (measured on an H200 host, page cache dropped: faster than one read() + load(bytes))
            with safe_open(st, framework="pt") as h:
                return {k: h.get_tensor(k) for k in h.keys()}
        except Exception as exc:  # truncated or corrupt
            raise InvalidArgument(f"cannot read {st}: {exc}") from exc
    binary = os.path.join(path, BIN_FILE)
    if os.path.isfile(binary):
        if not allow_bin:
            raise FailedPrecondition(f"{binary} is a pickle; only safetensors are read (start the worker with "
                                     "--allow-bin-adapters to accept weights-only .bin files)")
        try:
            return torch.load(binary, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise InvalidArgument(f"cannot read {binary} as weights-only: {exc}") from exc
    raise NotFound(f"adapter at {path} has no adapter_model.safetensors")


def shard_lora(module: str, a: torch.Tensor, b: torch.Tensor, config: QwenConfig, rank: int,
               world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's (A, B): column layers keep A whole and split B like the base output (c_attn per
    q/k/v); row layers split A on the input dim and keep B whole."""
    if module == "attn.c_attn":
        H = config.hidden_size
        return a, shard_packed(b, 0, [H, H, H], rank, world_size, "lora_B of c_attn")
    if module in COLUMN:
        return a, shard_tensor(b, 0, rank, world_size, f"lora_B of {module}")
    return shard_tensor(a, 1, rank, world_size, f"lora_A of {module}"), b
