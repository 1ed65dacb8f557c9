"""The paged KV cache: per layer, K and V as [num_blocks, block_size, kv_heads_per_shard, head_dim].

An fp8 (e4m3) cache stores clamp(x / scale, ±448) and reads fp8 → fp32 × scale, with one K scale and
one V scale per layer (`k_scales`/`v_scales`, fp32 [num_layers] on the device, 1.0 until the engine
sets them from the checkpoint or from Warmup's calibration). Other dtypes store a plain cast.

Slot `s` is row `s % block_size` of block `s // block_size`. Blocks are owned either by the router
(`requires_block_allocator=true`: requests arrive with blocks and slots) or, for requests that come
without blocks (Warmup, standalone use), by the shard's own allocator over a reserved tail of blocks
that is never reported to the router.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value; torch's cast turns anything larger into NaN
Scale = Union[float, torch.Tensor, None]  # a python float or a 0-d fp32 tensor (None: no scaling)
KV_DTYPES = {"fp8_e4m3": FP8, "fp8": FP8, "float8_e4m3fn": FP8}  # --kv-cache-dtype names beyond torch_dtype's


def quantize(x: torch.Tensor, dtype: torch.dtype, scale: Scale = None) -> torch.Tensor:
    """x in the cache's `dtype`: x / scale (fp32) when scaled, clamped to ±448 for fp8, then cast."""
    if scale is not None:
        x = x.float() / scale
    if dtype == FP8:
        x = x.float().clamp(-FP8_MAX, FP8_MAX)
    return x.to(dtype)


def dequantize(x: torch.Tensor, scale: Scale = None) -> torch.Tensor:
    """Cached rows back to numbers: fp32 x × scale (None: x as stored)."""
    return x if scale is None else x.float() * scale


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slots: torch.Tensor, k_scale: Scale = None, v_scale: Scale = None) -> None:
    """Write new keys/values [T, heads, head_dim] into their slots [T] (reference implementation)."""
    nb, bs, h, d = k_cache.shape
    for x, cache, scale in ((k, k_cache, k_scale), (v, v_cache, v_scale)):
        x = quantize(x, cache.dtype, scale)
        if cache.dtype == FP8:  # index_copy_ has no fp8 kernel on CPU: copy the bytes
            cache, x = cache.view(torch.uint8), x.view(torch.uint8)
        cache.view(nb * bs, h, d).index_copy_(0, slots, x)


def scales_from_amax(amax: torch.Tensor, margin: float = 2.0) -> torch.Tensor:
    """fp8 scales from calibrated maxima |x|: amax × margin / 448, so the largest value seen maps to
    448 / margin; a zero or non-finite maximum (nothing seen) gives 1.0."""
    scale = amax.float() * margin / FP8_MAX
    ok = torch.isfinite(scale) & (scale > 0)
    return torch.where(ok, scale.clamp(min=1e-12), torch.ones_like(scale))


def parse_kv_dtype(name: str) -> Optional[torch.dtype]:
    """`--kv-cache-dtype`: auto (None: the model dtype), fp8_e4m3 / fp8, or a float dtype name."""
    from worker.weights import torch_dtype

    if name == "auto":
        return None
    return KV_DTYPES.get(name) or torch_dtype(name)


@dataclass
class KVCache:
    num_layers: int
    num_blocks: int
    block_size: int
    num_heads: int  # per shard
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    layers: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    k_scales: Optional[torch.Tensor] = None  # [num_layers] fp32: stored K = K / k_scales[layer] (fp8 only)
    v_scales: Optional[torch.Tensor] = None  # [num_layers] fp32

    def __post_init__(self) -> None:
        if not self.layers:
            shape = (self.num_blocks, self.block_size, self.num_heads, self.head_dim)
            self.layers = [(torch.zeros(shape, dtype=self.dtype, device=self.device),
                            torch.zeros(shape, dtype=self.dtype, device=self.device))
                           for _ in range(self.num_layers)]
        ones = dict(dtype=torch.float32, device=self.device)
        if self.k_scales is None:
            self.k_scales = torch.ones(self.num_layers, **ones)
        if self.v_scales is None:
            self.v_scales = torch.ones(self.num_layers, **ones)

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def is_fp8(self) -> bool:
        return self.dtype == FP8

    def set_scales(self, k_scales: Sequence[float] | torch.Tensor, v_scales: Sequence[float] | torch.Tensor) -> None:
        """Overwrite the per-layer scales in place (kernels and captured CUDA graphs read them through
        pointers, so they see the new values)."""
        for dst, src in ((self.k_scales, k_scales), (self.v_scales, v_scales)):
            src = torch.as_tensor(src, dtype=torch.float32).reshape(-1)
            if src.numel() != self.num_layers or not bool(torch.isfinite(src).all() and (src > 0).all()):
                raise ValueError(f"KV scales must be {self.num_layers} finite positive numbers, got {src.tolist()}")
            dst.copy_(src)

    @staticmethod
    def bytes_per_token(num_layers: int, num_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * num_heads * head_dim * elem


class BlockAllocator:
    """Free list over blocks [first, first + count): the shard's own blocks for requests without any.

    Plain Python (no torch), so it is easy to test; `allocate` is all-or-nothing.
    """

    def __init__(self, first: int, count: int):
        self.first = first
        self.count = count
        self._free = list(range(first + count - 1, first - 1, -1))  # pop() hands out the lowest first

    @property
    def free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise MemoryError(f"need {n} KV blocks, only {len(self._free)} of the shard's {self.count} are free")
        return [self._free.pop() for _ in range(n)]

    def release(self, blocks: list[int]) -> None:
        for b in blocks:
            if not self.first <= b < self.first + self.count:
                raise ValueError(f"block {b} is not one of the shard's own blocks")
        self._free.extend(sorted(blocks, reverse=True))
