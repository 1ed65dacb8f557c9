"""The AutoGPTQ checkpoint format ("v1" zero points), torch only: pack, unpack, dequantize, quantize.

Per linear (K = in, N = out, P = 32 // bits values per int32 word, G groups):
  qweight int32 [K / P, N]: packed along K; row r·P + j of a column sits in bits [bits·j, bits·(j+1)) of
          word r (least significant first);
  qzeros  int32 [G, N / P]: packed along N the same way, each stored zero minus `zero_offset` (1 in v1);
  scales  [G, N]; g_idx int32 [K]: the group of each input row (k // group_size, or a permutation of
          groups under act order).
  w[k, n] = (q[k, n] - (z[g_idx[k], n] + zero_offset)) · s[g_idx[k], n]
Shared by the kernels' reference, the layers and scripts/quantize.py; imports nothing from the worker.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BITS = (4, 8)


def per_word(bits: int) -> int:
    """Values packed in one int32 word (8 for Int4, 4 for Int8)."""
    if bits not in BITS:
        raise ValueError(f"GPTQ bits must be one of {BITS}, got {bits}")
    return 32 // bits


def _shifts(bits: int, device: torch.device) -> torch.Tensor:
    return torch.arange(0, 32, bits, dtype=torch.int32, device=device)  # [P]


def unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """[R, N] int32 words -> [R·P, N] int32 values in [0, 2^bits)."""
    p = per_word(bits)
    vals = (packed[:, None, :] >> _shifts(bits, packed.device)[None, :, None]) & ((1 << bits) - 1)  # [R, P, N]
    return vals.reshape(packed.shape[0] * p, packed.shape[1])


def unpack_cols(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """[G, C] int32 words -> [G, C·P] int32 values (packed along the last dim)."""
    return unpack_rows(packed.t(), bits).t().contiguous()


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """[K, N] integers in [0, 2^bits) -> [K / P, N] int32 words (K a multiple of P)."""
    p = per_word(bits)
    k, n = values.shape
    if k % p:
        raise ValueError(f"{k} rows do not pack into whole {bits}-bit words of {p} values")
    if values.min() < 0 or values.max() >= 1 << bits:
        raise ValueError(f"values outside [0, {1 << bits}) cannot pack into {bits} bits")
    v = values.to(torch.int64).reshape(k // p, p, n) << _shifts(bits, values.device).to(torch.int64)[None, :, None]
    words = v.sum(1)  # [K/P, N] in [0, 2^32): disjoint bit fields, so the sum is the OR
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def pack_cols(values: torch.Tensor, bits: int) -> torch.Tensor:
    """[G, N] integers -> [G, N / P] int32 words packed along N."""
    return pack_rows(values.t(), bits).t().contiguous()


TILE_COLS, TILE_ROWS = 32, 16  # the tiled layout's tile: 32 columns x 16 words (128 rows of Int4)


def tiles(words: torch.Tensor) -> bool:
    """Whether [R, N] words tile (R a multiple of TILE_ROWS, N of TILE_COLS)."""
    return words.dim() == 2 and words.shape[0] % TILE_ROWS == 0 and words.shape[1] % TILE_COLS == 0


def check_tiles(words: torch.Tensor, bits: int) -> None:
    """ValueError unless words [R, N] may be tiled: Int4 (the layout is the Int4 kernels') and `tiles`."""
    if bits != 4 or not tiles(words):
        raise ValueError(
            f"tiled words are Int4's [a multiple of {TILE_ROWS}, a multiple of {TILE_COLS}]: bits {bits}, "
            f"{tuple(words.shape)}"
        )


def tile_words(words: torch.Tensor) -> torch.Tensor:
    """The CUDA GPTQ kernels' tiled layout of row-major words [R, N] int32 (same shape, `tiles`): word (r, n) moves to
    ((n // 32 · R / 16 + r // 16) · 4 + r % 16 // 4) · 128 + (n % 32 // 4 · 4 + r % 4) · 4 + n % 4, so that 16 rows
    of a tile of 32 columns (one 128-row chunk of Int4) are 2 KB in a row, and 4 rows of it (a tensor-core step) 512
    bytes in which lane (g, t) of a warp finds its 16 bytes (columns 4g .. 4g + 3 of row 4s + t) at 16 (4g + t)."""
    if not tiles(words):
        raise ValueError(f"tile_words: {tuple(words.shape)} is not [a multiple of 16, a multiple of 32]")
    R, N = words.shape
    v = words.reshape(R // 16, 4, 4, N // 32, 8, 4)  # [chunk, s, t, tile, g, j]
    return v.permute(3, 0, 1, 4, 2, 5).contiguous().reshape(R, N)  # [tile, chunk, s, g, t, j]


def untile_words(tiled: torch.Tensor) -> torch.Tensor:
    """`tile_words`' inverse."""
    if not tiles(tiled):
        raise ValueError(f"untile_words: {tuple(tiled.shape)} is not [a multiple of 16, a multiple of 32]")
    R, N = tiled.shape
    v = tiled.reshape(N // 32, R // 16, 4, 8, 4, 4)  # [tile, chunk, s, g, t, j]
    return v.permute(1, 2, 4, 0, 3, 5).contiguous().reshape(R, N)  # [chunk, s, t, tile, g, j]


def dequantize(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    zero_offset: int = 1,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """W [K, N] (in, out) in `dtype` (default: the scales' dtype), computed in fp32 then rounded once."""
    q = unpack_rows(qweight, bits)  # [K, N]
    g = g_idx.long()
    z = unpack_cols(qzeros, bits)[g] + zero_offset  # [K, N]
    w = (q - z).float() * scales.float()[g]
    return w.to(dtype or scales.dtype)


def default_g_idx(k: int, group_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """g_idx without act order: row k is in group k // group_size (one group when group_size is -1)."""
    size = k if group_size == -1 else group_size
    return (torch.arange(k, device=device) // size).to(torch.int32)


@dataclass
class Quantized:
    """One linear in the checkpoint layout (the tensors a GPTQ checkpoint stores under its prefix)."""

    qweight: torch.Tensor  # int32 [K / P, N]
    qzeros: torch.Tensor  # int32 [G, N / P]
    scales: torch.Tensor  # fp16 [G, N]
    g_idx: torch.Tensor  # int32 [K]


def group_params(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """AutoGPTQ's min/max quantizer for the columns of w [rows, N]: (scale [N], true zero [N] int64).

    A true zero of 0 is not storable in v1 (stored −1): such columns get zero 1 and scale hi / (maxq − 1)."""
    maxq = (1 << bits) - 1
    w = w.float()
    lo, hi = w.min(0).values.clamp(max=0), w.max(0).values.clamp(min=0)
    if sym:
        hi = torch.maximum(lo.abs(), hi)
        lo = -hi
    scale = (hi - lo) / maxq
    if sym:
        zero = torch.full_like(scale, (maxq + 1) // 2, dtype=torch.int64)
    else:
        zero = torch.round(-lo / scale.clamp_min(1e-30)).to(torch.int64)
        low = zero < 1  # (nearly) all-positive columns: span [-s, hi] with zero 1 instead
        scale = torch.where(low, hi / (maxq - 1), scale)
        zero = zero.clamp(1, maxq)
    return torch.where(scale == 0, torch.ones_like(scale), scale), zero


def quantize_rtn(
    weight: torch.Tensor, bits: int, group_size: int, sym: bool, perm: torch.Tensor | None = None
) -> Quantized:
    """Round-to-nearest GPTQ tensors of weight [N, K] (out, in, as in a float checkpoint).

    `perm` (act order): the order in which input rows are grouped; group i holds rows perm[i·gs : (i+1)·gs],
    so g_idx is a permutation of groups. Rows stay stored in their original order."""
    n, k = weight.shape
    w = weight.t().float()  # [K, N]
    order = torch.arange(k) if perm is None else perm.long().cpu()
    if sorted(order.tolist()) != list(range(k)):
        raise ValueError("perm must be a permutation of the input rows")
    size = k if group_size == -1 else group_size
    n_groups = -(-k // size)
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[order] = (torch.arange(k) // size).to(torch.int32)
    maxq = (1 << bits) - 1
    scales = torch.empty(n_groups, n)
    zeros = torch.empty(n_groups, n, dtype=torch.int64)
    grouped = w[order]  # group g is rows [g·size, (g+1)·size) of the permuted order
    for g in range(n_groups):
        scales[g], zeros[g] = group_params(grouped[g * size : (g + 1) * size], bits, sym)
    scales16 = scales.to(torch.float16)  # stored fp16: quantize against the scale that will be read back
    gi = g_idx.long()
    q = torch.round(w / scales16.float()[gi]).to(torch.int64) + zeros[gi]
    q = q.clamp(0, maxq)
    return Quantized(pack_rows(q, bits), pack_cols(zeros - 1, bits), scales16, g_idx)
