"""The CUDA Int4 GPTQ GEMVs for decode steps of 1 or 2 rows (worker/kernels/gptq_gemv.cu on FMAs, gptq_tc.cu on
tensor cores with the weights as mma's A operand, up to 8 rows; issue 16, P9) and the tensor-core matmul for up to 64
rows (gptq_mma.cu), built on first use into one library.

nvcc (CUDA_HOME/bin or PATH) compiles the .cu into a shared library (worker/kernels/cuda_build.py); ctypes calls it
with raw pointers on PyTorch's current stream (CUDA graphs capture it like any launch). Where nvcc is missing, the
build fails, or a linear's layout is not one this kernel serves (`supports`), `library` / `cuda_gemv` say so and the
layer keeps the Triton GEMV (worker/kernels/gemv.py).
"""

from __future__ import annotations

import ctypes
import functools
import os

import torch

from worker.kernels.cuda_build import BuildError, build, find_nvcc
from worker.kernels.gemv import NO_GROUPS, GPTQGemvWeights

_HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = tuple(os.path.join(_HERE, f) for f in ("gptq_gemv.cu", "gptq_mma.cu", "gptq_tc.cu"))  # built into one library
HEADERS = (os.path.join(_HERE, "gptq_cuda.cuh"),)  # what they include (part of the build's hash)
CHUNK = 128  # K rows per chunk (the .cu's kChunk)
COLS = 128  # columns per block (kCols, kMmaCols)
MAX_CHUNKS = 88  # chunks per split at one row: x, its sums and the warps' sums stay in 48 KB of shared memory
MAX_ROWS = 2  # rows a launch serves: gptq4_gemv (1) and gptq4_gemv_rows (2; 4 and 8 measured slower than Triton)
MMA_MAX_ROWS = {4: 64, 8: 32}  # rows gptq_mma serves by bits (16-row tiles: 4 for Int4; 2 for Int8, whose registers
# hold two sums a value)
TC_MAX_ROWS = 8  # rows gptq_tc serves (mma's N)
TC_COLS = 32  # its columns per block
TC_WARPS_PER_SM = 12  # its unstaged blocks' warps an SM at most (3 chunks in flight, 160-166 registers a thread: 3
# blocks of 4 warps; the H200's 7B step at batch 1 2.10-2.11 ms against 2.32 with 16 planned, and 2.17 at 2 chunks)
# plan_tc: where 8-warp blocks fit unsplit, 4-warp blocks over K's splits instead when each warp keeps this many chunks
# or more. On the H200 (7B Int4 step, BENCHMARKS.md 2026-11-30 seventh) mlp.c_proj (86 chunks) at 4 warps x 3 splits
# took the batch-1 step to 1.908-1.912 ms from 1.933-1.944 at 8 x 1 (batch 2 2.149-2.151, 2.144-2.153); attn.c_proj (32
# chunks: 2.7 a warp) at 4 x 3 or 4 x 2 to 1.973-1.983 (slower), 8 x 2 2.066-2.077, c_attn at 4 x 2 or 8 x 1 2.04-2.11.
TC_LONG_K = 6
LAUNCH_TILED = 2  # the entry points' `pdl` flags: bit 0 PDL, bit 1 tiled words (gptq_cuda.cuh's kTiled)
MMA_SMEM = 100 * 1024  # gptq_mma's shared memory at most (x of a split and its sums): two blocks per SM


class _NormFold(ctypes.Structure):
    """gptq_tc.cu's NormFold: kNorm's operands."""

    _fields_ = [
        ("residual", ctypes.c_void_p),
        ("weight", ctypes.c_void_p),
        ("sum", ctypes.c_void_p),
        ("sq", ctypes.c_void_p),
        ("sq_in", ctypes.c_void_p),
        ("tiles_in", ctypes.c_int),
        ("eps", ctypes.c_float),
        ("inv_n", ctypes.c_float),
    ]


def max_chunks(rows: int) -> int:
    """Chunks per split whose shared memory (rows x (chunks x 129 + 512) floats, the kernels' layout) fits 48 KB."""
    return min(MAX_CHUNKS, (12288 // rows - 512) // (CHUNK + 1))


@functools.cache
def library(major: int, minor: int) -> ctypes.CDLL | str:
    """The built library for compute capability major.minor, or why there is none (a message)."""
    try:
        path = build("gptq_gemv", SOURCES, HEADERS, major, minor, find_nvcc())
    except BuildError as e:
        return str(e)
    lib = ctypes.CDLL(path)
    lib.gptq4_gemv.restype = ctypes.c_int
    p, i = ctypes.c_void_p, ctypes.c_int
    lib.gptq4_gemv.argtypes = [p, p, p, p, ctypes.c_float, p, p, p, p, i, i, i, i, i, i, i, p]
    lib.gptq4_gemv_rows.restype = ctypes.c_int
    lib.gptq4_gemv_rows.argtypes = [*lib.gptq4_gemv.argtypes, i]
    lib.gptq4_gemv_act.restype = ctypes.c_int
    lib.gptq4_gemv_act.argtypes = lib.gptq4_gemv.argtypes
    lib.gptq_mma.restype = ctypes.c_int
    lib.gptq_mma.argtypes = [*lib.gptq4_gemv.argtypes, i, i]
    lib.gptq_tc.restype = ctypes.c_int
    lib.gptq_tc.argtypes = [*lib.gptq4_gemv.argtypes, i, i, i, i, i, i, p]
    lib.gptq4_gemv_error.restype = ctypes.c_char_p
    lib.gptq4_gemv_error.argtypes = [i]
    return lib


def supports(w: GPTQGemvWeights, dtype: torch.dtype, mma: bool = False) -> str | None:
    """None when the kernels serve this linear for bf16 rows (the GEMVs, 1 to MAX_ROWS; mma: the tensor-core matmul,
    1 to MMA_MAX_ROWS[bits]); else what it lacks."""
    K, N = w.qweight.shape[0] * (32 // w.bits), w.qweight.shape[1]
    bits = (4, 8) if mma else (4,)
    if w.bits not in bits or dtype != torch.bfloat16 or w.scales.dtype != torch.bfloat16:
        what = "Int4 or Int8" if mma else "Int4"
        return (
            f"it serves {what} with bf16 scales and activations only (bits {w.bits}, {dtype}, scales {w.scales.dtype})"
        )
    if N % 8 or K % CHUNK or w.k_offset % CHUNK:
        return f"it needs N a multiple of 8, K and the shard's first row of {CHUNK} (N {N}, K {K}, row {w.k_offset})"
    if w.group_size != NO_GROUPS and w.group_size % CHUNK:
        return f"it needs groups of a multiple of {CHUNK} rows (got {w.group_size})"
    return None


def plan(n: int, k: int, sms: int, rows: int = 1) -> tuple[int, int]:
    """(chunks per split, splits): ~3 blocks per SM over the column tiles (the kernel uses ~165 registers), each of a
    block's 4 warps a chunk or more, at most max_chunks(rows) a split."""
    tiles, chunks = -(-n // COLS), k // CHUNK
    splits = max(1, min(-(-chunks // 4), (3 * sms) // tiles))
    per = min(-(-chunks // splits), max_chunks(rows))
    return per, -(-chunks // per)


def mma_max_chunks(rows: int) -> int:
    """gptq_mma's chunks per split for `rows` rows: x of the split (rows x chunks x 256 bytes) and its sums (4 bytes
    a row and chunk) within MMA_SMEM."""
    return MMA_SMEM // (rows * (CHUNK * 2 + 4))


def plan_mma(n: int, k: int, sms: int, rows: int) -> tuple[int, int]:
    """(chunks per split, splits) for gptq_mma: the fewest splits whose time is least, taken as waves of 2 blocks
    per SM (its ~200-255 registers allow two) times a block's work in chunks of words (8 KB): its chunks, x staged
    for them (rows x 256 bytes a chunk from L2, counted at half a DRAM byte), its fp32 partials (rows x 512 bytes)
    and one chunk's worth of launch and prologue; at most mma_max_chunks(rows) chunks a split."""
    tiles, chunks, most = -(-n // COLS), k // CHUNK, mma_max_chunks(rows)
    best: tuple[float, int, int] | None = None
    for splits in range(1, chunks + 1):
        per = -(-chunks // splits)
        if per > most or per * (splits - 1) >= chunks:  # too much shared memory, or an empty split
            continue
        cost = -(-(tiles * splits) // (2 * sms)) * (per * (1 + rows / 32) + rows / 16 + 1)
        if best is None or cost < best[0]:
            best = (cost, per, splits)
    assert best is not None
    return best[1], best[2]


def tc_smem(rows: int, per: int, warps: int, stage: bool = True) -> int:
    """gptq_tc's shared memory: x's rows over a split (padded by 64 bytes) and their chunk sums where the block stages
    them, the warps' sums."""
    return (rows * (per * CHUNK + 32) * 2 + rows * per * 4 if stage else 0) + warps * 8 * TC_COLS * 4


def split_evenly(chunks: int, splits: int) -> tuple[int, int]:
    """(chunks per split, splits) for K's `chunks` over about `splits` splits: as even as they go, none empty."""
    per = -(-chunks // splits)
    return per, -(-chunks // per)


def tc_plan(chunks: int, splits: int, warps: int) -> tuple[int, int, int]:
    """plan_tc's form of a choice: (chunks per split, splits, warps a block, at most a split's chunks)."""
    per, splits = split_evenly(chunks, splits)
    return per, splits, min(warps, per)


def plan_tc(n: int, k: int, sms: int, rows: int, stage: bool = True) -> tuple[int, int, int]:
    """(chunks per split, splits, warps a block) for gptq_tc. Staged: 16 warps a block where the 32-column tiles are
    no more than the SMs, else 8 (at most a split's chunks), and the fewest splits whose shared memory fits MMA_SMEM.
    Unstaged (x loaded by each warp): 8 warps where the tiles are no more than the SMs, else 4, and K split so that
    the warps fill ~TC_WARPS_PER_SM an SM, each keeping 2 chunks or more (the 7B linears' sweep on an H200,
    BENCHMARKS.md); where 8 warps stay unsplit, 4 warps over K's splits if each warp still keeps TC_LONG_K chunks."""
    tiles, chunks = -(-n // TC_COLS), k // CHUNK
    if not stage:
        warps = 8 if tiles <= sms else 4
        splits = max(1, min((TC_WARPS_PER_SM * sms) // (tiles * warps), chunks // (2 * warps)))
        split4 = min((TC_WARPS_PER_SM * sms) // (tiles * 4), chunks // 8)
        if warps == 8 and splits == 1 and split4 > 1 and chunks >= TC_LONG_K * 4 * split4:
            warps, splits = 4, split4  # a long K: 4-warp blocks over K's splits fill the SMs better
        return tc_plan(chunks, splits, warps)
    warps = 16 if tiles <= sms else 8
    splits = 1
    while tc_smem(rows, -(-chunks // splits), warps) > MMA_SMEM:
        splits += 1
    return tc_plan(chunks, splits, warps)


def plan_tc_pair(n: int, k: int, sms: int) -> int:
    """gptq_tc's warps a block for mlp's gate | up with the activation in its epilogue (kPair: n / 2 / TC_COLS blocks,
    half the warps on each half): the most of 8, 4, 2 whose blocks all fit in one wave at TC_WARPS_PER_SM warps an SM,
    each half's warps at most its chunks. On the H200 the 7B gate_up (344 blocks) took 4 warps: the batch-1 step
    2.290-2.302 ms against 2.346-2.374 with 8 (two blocks an SM, a second wave), batch 2 2.383-2.384 against
    2.448-2.451 (at 2 chunks in flight and 16 warps an SM; 4 warps still at 12)."""
    blocks, chunks = -(-(n // 2) // TC_COLS), k // CHUNK
    for warps in (8, 4):
        if blocks <= sms * (TC_WARPS_PER_SM // warps) and warps // 2 <= chunks:
            return warps
    return 2


def _fold_args(
    M: int,
    N: int,
    K: int,
    dtype: torch.dtype,
    norm_out: tuple[torch.Tensor, torch.Tensor] | None,
    sums: torch.Tensor | None,
    squares: torch.Tensor | None,
    row_scale: tuple[torch.Tensor, float] | None,
) -> tuple[_NormFold, int]:
    """gptq_tc's NormFold and kNorm form (0: none) for cuda_gemv's norm_out / row_scale, the tensors checked."""
    fold = _NormFold()
    want: dict[str, tuple[torch.Tensor | None, tuple[int, ...], torch.dtype]] = {}
    if norm_out is not None:
        want = dict(
            residual=(norm_out[0], (M, N), dtype), weight=(norm_out[1], (N,), dtype), sums=(sums, (M, N), dtype)
        )
        want["squares"] = (squares, (M, -(-N // TC_COLS)), torch.float32)
    elif row_scale is not None:
        want = dict(squares=(row_scale[0], (M, row_scale[0].shape[-1]), torch.float32))
    for name, (t, shape, dt) in want.items():
        if t is None or tuple(t.shape) != shape or t.dtype != dt or not t.is_contiguous():
            got = "none" if t is None else f"{tuple(t.shape)} {t.dtype}"
            what = "norm_out" if norm_out is not None else "row_scale"
            raise ValueError(f"cuda_gemv: {what}'s {name} must be a contiguous {dt} tensor of {shape}, got {got}")
    if norm_out is not None:
        assert sums is not None and squares is not None
        fold.residual, fold.weight = norm_out[0].data_ptr(), norm_out[1].data_ptr()
        fold.sum, fold.sq = sums.data_ptr(), squares.data_ptr()
        return fold, 1
    if row_scale is not None:
        sq, eps = row_scale
        fold.sq_in, fold.tiles_in, fold.eps, fold.inv_n = sq.data_ptr(), sq.shape[1], eps, 1.0 / K
        return fold, 2
    return fold, 0


@functools.cache
def _sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def cuda_gemv(
    x: torch.Tensor,
    w: GPTQGemvWeights,
    bias: torch.Tensor | None = None,
    pdl: bool = False,
    mma: bool = False,
    splits: int | None = None,
    act: bool = False,
    tc: bool = False,
    warps: int | None = None,
    stage: bool = True,
    pair: bool = False,
    norm_out: tuple[torch.Tensor, torch.Tensor] | None = None,
    sums: torch.Tensor | None = None,
    squares: torch.Tensor | None = None,
    row_scale: tuple[torch.Tensor, float] | None = None,
) -> torch.Tensor:
    """y [M, N] = x [M, K] · dequant(w) (+ bias) in bf16 (fp32 accumulation), M 1 or 2 (MAX_ROWS) on the FMA GEMVs,
    (tc) 1 to TC_MAX_ROWS on gptq_tc (Int4), or (mma) 1 to MMA_MAX_ROWS[bits] on the tensor-core matmul (Int4 or
    Int8); x's columns in the weight's row order; the caller checked `supports` and that `library` built. splits:
    K's splits instead of the plan's, warps: gptq_tc's warps a block (benchmarks). stage: gptq_tc's x staged by the
    block (else loaded by each warp). act (no bias; one row, or gptq_tc's rows): x is mlp's gate_up [M, 2K] =
    [gate | up] and the product's input up * silu(gate), rounded as fused.silu_mul, computed in the GEMV
    (DecodeKernels.gptq_act). pair (tc, unstaged, no act): the product is mlp's gate_up [M, N] = [gate | up] and y its
    activation [M, N / 2], up * silu(gate) of the two halves each rounded to bf16 (fused.silu_mul's values;
    DecodeKernels.gptq_act_out); warps a block from plan_tc_pair, K not split. norm_out / scaled (tc, unstaged, no
    act; DecodeKernels.norm_fold; gptq_tc.cu's kNorm): the product is the producer of a residual add + RMSNorm,
    norm_out = (residual [M, N], the norm's weight [N]) (not at pair): it returns y = rn(s * weight) [M, N] and writes
    s = rn(rn(product + bias) + residual) into `sums` and each 32-column tile's sum of s^2 into `squares` [M, N / 32]
    fp32 (both given, written in place); or the consumer of one, row_scale = (squares [M, tiles] from the producer,
    eps): each row of the product scaled by rsqrt(the row's sum of squares / K + eps) before the bias."""
    lib = library(*torch.cuda.get_device_capability(x.device))
    assert not isinstance(lib, str), lib
    K, N = w.qweight.shape[0] * (32 // w.bits), w.qweight.shape[1]
    M = x.shape[0]
    most = MMA_MAX_ROWS[w.bits] if mma else TC_MAX_ROWS if tc else 1 if act else MAX_ROWS
    width = 2 * K if act else K
    if x.dim() != 2 or x.shape[1] != width or not 1 <= M <= most or (act and (mma or bias is not None)):
        raise ValueError(
            f"cuda_gemv: x {tuple(x.shape)} for 1 to {most} rows of {width}"
            + (" (act: gate_up rows, one unless tc, no bias, no mma)" if act else "")
        )
    if w.tiled and not (tc or mma):
        raise ValueError("cuda_gemv: tiled words (GPTQGemvWeights.tiled) are read by gptq_tc and gptq_mma only")
    if pair and (not tc or stage or act or N % 8 or splits not in (None, 1) or (warps or 0) % 2):
        raise ValueError(
            f"cuda_gemv: pair (gate | up -> activation) needs tc, unstaged, no act, no K split, halves of a multiple "
            f"of 4 columns and an even number of warps; N {N}, tc {tc}, stage {stage}, act {act}, splits {splits}, "
            f"warps {warps}"
        )
    if (norm_out is not None or row_scale is not None) and (not tc or stage or act or (norm_out is not None and pair)):
        raise ValueError(f"cuda_gemv: norm_out / row_scale need tc, unstaged, no act (norm_out: no pair); tc {tc}, "
                         f"stage {stage}, act {act}, pair {pair}")  # fmt: skip
    x = x.contiguous()
    if x.data_ptr() % 16:  # the kernels read x in 16-byte vectors
        x = x.clone()
    sms = _sms(x.device.index or 0)
    if pair:  # no K split
        per, planned, tc_warps = K // CHUNK, 1, warps or plan_tc_pair(N, K, sms)
    elif tc:
        per, planned, planned_warps = plan_tc(N, K, sms, M, stage)
        tc_warps = warps or planned_warps
    else:
        per, planned = (plan_mma if mma else plan)(N, K, sms, M)
    if splits is None:
        splits = planned
    else:  # a measurement's choice (scripts/gpu_check_*.py); shared memory is the caller's to keep (checked for tc)
        per, splits = split_evenly(K // CHUNK, splits)
    if tc and (tc_smem(M, per, tc_warps, stage) > MMA_SMEM or tc_warps > (16 if stage else 8)):
        raise ValueError(
            f"gptq_tc: {tc_warps} warps a block (at most {16 if stage else 8}) and {per} chunks a split take "
            f"{tc_smem(M, per, tc_warps, stage)} bytes of shared memory (at most {MMA_SMEM})"
        )
    y = torch.empty(M, N // 2 if pair else N, dtype=x.dtype, device=x.device)
    part = torch.empty(splits, M, N, dtype=torch.float32, device=x.device) if splits > 1 else y
    stream = torch.cuda.current_stream(x.device).cuda_stream
    args = (
        x.data_ptr(), w.qweight.data_ptr(), w.scales.data_ptr(), w.zeros.data_ptr() if w.zeros is not None else None,
        float(w.zero), bias.data_ptr() if bias is not None else None, y.data_ptr(), part.data_ptr(),
        w.counters.data_ptr(), N, K, w.k_offset, min(w.group_size, 1 << 30), per, splits,
        int(pdl) | (LAUNCH_TILED if w.tiled else 0), stream,
    )  # fmt: skip
    fold, norm = _fold_args(M, N, K, x.dtype, norm_out, sums, squares, row_scale)
    if tc:
        code = lib.gptq_tc(*args, M, tc_warps, int(act), int(stage), int(pair), norm, ctypes.byref(fold))
    elif mma:
        code = lib.gptq_mma(*args, M, w.bits)
    elif act:
        code = lib.gptq4_gemv_act(*args)
    else:
        code = lib.gptq4_gemv(*args) if M == 1 else lib.gptq4_gemv_rows(*args, M)
    if code:
        raise RuntimeError(f"gptq4_gemv: {lib.gptq4_gemv_error(code).decode()}")
    return y
