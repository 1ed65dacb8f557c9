"""Tile choices of the decode GEMVs (worker/kernels/gemv.py, gemv_dense.py): the dataclass and the named GPTQ
M = 1 candidates that scripts/gpu_check_gemv.py measures; the layers take `default_tiles`."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GemvTiles:
    block_n: int = 128
    block_k: int = 128  # rows per tile: divides the group or holds whole groups (M = 1 only; gemv.py `_tile_k`)
    num_warps: int = 4
    num_stages: int = 3
    programs_per_sm: int = 4  # split-K target; 0: no split-K (each program owns a full-K strip of columns)
    prefetch: bool = True  # M = 1: load the next tile's words before multiplying this one's (registers); False:
    # Triton's pipeliner keeps num_stages - 1 tiles in flight (cp.async into shared memory), as for M > 1's tl.dot
    unpack: str = "shift"  # "shift" (`_biased`; M > 1: Int4 only) or "mask" (`_values`)
    dot: bool = False  # M = 1 too through the M > 1 path (tl.dot over 16 rows, 15 masked)
    dot_unpack: str | None = None  # the unpack of the tl.dot path (M > 1, or dot); None: `unpack`


# Named M = 1 tiles per bits (M > 1 keeps one group per tile: gemv.py `_tile_k`). H200, 2026-11-29 (Triton 3.6, weights
# cycled past L2): "g1mask" (one group per tile, 128 x 16 words, the mask unpack) took the 14B/72B Int4 GEMVs to
# 1.3-1.5 TB/s (28.4 us for K 13696 x N 5120; x1.45 vs bf16 cuBLAS). Its sm_90 loop issues ~6.3 instructions a
# value (cuobjdump; 4 programs of 4 warps per SM at 122 registers) and its register prefetch is scheduled ~60%
# into the loop: instruction- and latency-bound, not memory-bound. "g1" is the same tile with the shift unpack
# and bf16 x read in int32 pairs (~4.8 a value): the default, by construction; revert to "g1mask" (the measured
# kernel, unchanged) if the GPU says otherwise. "g1pipe"/"g1pipe4"/"g2pipe" let Triton's pipeliner keep 2-3
# tiles in flight (cp.async, issued at the loop top; ~4.8 a value).
# g2/g2pps2 put 2 groups' rows in a tile (16 KB of words per load; ~250 registers, 2 programs per SM: hence
# g2pps2), g1n256w8 8 warps over 256 columns, g1dot M = 1 through tl.dot (~6.0 a value), "strip" one program
# per full-K strip of 32 columns (no split-K). All measured by scripts/gpu_check_gemv.py.
GEMV_TILES: dict[str, dict[int, GemvTiles]] = {
    # M > 1 through the mask unpack: on the H200 (2026-11-29) "g1mask" beat "g1"'s shift unpack at M = 8 on all four
    # 7B Int4 shapes (c_attn 32.8 vs 44.6 us, attn.c_proj 17.9 vs 23.4, w2|w1 50.8 vs 82.9, mlp.c_proj 33.9 vs 48.4)
    "g1": {4: GemvTiles(block_k=128, dot_unpack="mask"), 8: GemvTiles(block_k=64, dot_unpack="mask")},
    "g1n256w8": {
        4: GemvTiles(block_n=256, block_k=128, num_warps=8),
        8: GemvTiles(block_n=256, block_k=64, num_warps=8),
    },
    "g1mask": {4: GemvTiles(block_k=128, unpack="mask"), 8: GemvTiles(block_k=64, unpack="mask")},
    "g1dot": {4: GemvTiles(block_k=128, dot=True), 8: GemvTiles(block_k=64, dot=True)},
    "g1pipe": {4: GemvTiles(block_k=128, prefetch=False), 8: GemvTiles(block_k=64, prefetch=False)},
    "g1pipe4": {
        4: GemvTiles(block_k=128, prefetch=False, num_stages=4),
        8: GemvTiles(block_k=64, prefetch=False, num_stages=4),
    },
    "g2pipe": {4: GemvTiles(block_k=256, prefetch=False), 8: GemvTiles(block_k=128, prefetch=False)},
    "g2": {4: GemvTiles(block_k=256), 8: GemvTiles(block_k=128)},
    "g2pps2": {4: GemvTiles(block_k=256, programs_per_sm=2), 8: GemvTiles(block_k=128, programs_per_sm=2)},
    "strip": {
        4: GemvTiles(block_n=32, block_k=512, programs_per_sm=0),
        8: GemvTiles(block_n=32, block_k=256, programs_per_sm=0),
    },
}
GEMV_DEFAULT = "g1"  # measured on the H200 (2026-11-29): M = 1 Int4 7B step 3.18 ms vs bf16 4.61 ms (x1.45)


def default_tiles(bits: int, name: str = GEMV_DEFAULT) -> GemvTiles:
    return GEMV_TILES[name][bits]
