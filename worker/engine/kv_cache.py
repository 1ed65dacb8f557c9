"""The paged KV cache: per layer, K and V as [num_blocks, block_size, kv_heads_per_shard, head_dim].

An fp8 (e4m3) cache stores clamp(x / scale, ±448) and reads fp8 → fp32 × scale (worker.ops), with one K
scale and one V scale per layer (`k_scales`/`v_scales`, fp32 [num_layers] on the device, 1.0 until the engine
sets them from the checkpoint or from Warmup's calibration). Other dtypes store a plain cast.

Slot `s` is row `s % block_size` of block `s // block_size`. Blocks are owned either by the router
(`requires_block_allocator=true`: requests arrive with blocks and slots) or, for requests that come
without blocks (Warmup, standalone use), by the shard's own allocator over a reserved tail of blocks
that is never reported to the router.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from worker.ops import FP8, scales_from_amax

# the store / gather / fp8 maths lives in worker.ops; scales_from_amax is re-exported for the engine
__all__ = ["FP8", "KV_DTYPES", "BlockAllocator", "KVCache", "parse_kv_dtype", "scales_from_amax"]

KV_DTYPES = {"fp8_e4m3": FP8, "fp8": FP8, "float8_e4m3fn": FP8}  # --kv-cache-dtype names beyond torch_dtype's


def parse_kv_dtype(name: str) -> torch.dtype | None:
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
    k_scales: torch.Tensor | None = None  # [num_layers] fp32: stored K = K / k_scales[layer] (fp8 only)
    v_scales: torch.Tensor | None = None  # [num_layers] fp32

    def __post_init__(self) -> None:
        if not self.layers:
            shape = (self.num_blocks, self.block_size, self.num_heads, self.head_dim)
            self.layers = [
                (
                    torch.zeros(shape, dtype=self.dtype, device=self.device),
                    torch.zeros(shape, dtype=self.dtype, device=self.device),
                )
                for _ in range(self.num_layers)
            ]
        if self.k_scales is None:
            self.k_scales = torch.ones(self.num_layers, dtype=torch.float32, device=self.device)
        if self.v_scales is None:
            self.v_scales = torch.ones(self.num_layers, dtype=torch.float32, device=self.device)

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
            assert dst is not None  # set in __post_init__
            src = torch.as_tensor(src, dtype=torch.float32).reshape(-1)
            if src.numel() != self.num_layers or not bool(torch.isfinite(src).all() and (src > 0).all()):
                raise ValueError(f"KV scales must be {self.num_layers} finite positive numbers, got {src.tolist()}")
            dst.copy_(src)

    @property
    def nbytes(self) -> int:
        """Bytes of the K and V tensors."""
        return sum(k.nbytes + v.nbytes for k, v in self.layers)

    def amax(self) -> torch.Tensor:
        """[num_layers, 2] fp32: each layer's max |K| and |V| over the whole cache (fp8 calibration)."""
        return torch.stack([torch.stack([k.abs().amax(), v.abs().amax()]) for k, v in self.layers]).float()

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
