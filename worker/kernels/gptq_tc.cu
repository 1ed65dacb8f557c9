// Int4 GPTQ product for decode steps of 1 to 8 rows on tensor cores, the weights as mma's A operand (issue 16, P9;
// served at 1-2 rows, DecodeKernels.gptq_tc): y [M, N] = x [M, K] . dequant(qweight) (+ bias), bf16 in and out, fp32
// accumulation. Built with gptq_gemv.cu and gptq_mma.cu into one library by worker/kernels/gemv_cuda.py; the layout is
// GPTQGemvWeights's, as there.
//
// Why: at one row the FMA GEMV (gptq_gemv.cu) spends ~3.8 instructions a value (shift, mask-and-or, FFMA and the
// loop's), about as long as the words take to arrive at 7B widths, and gptq_mma.cu puts x's rows in mma's 16-row A
// tile (15 of 16 rows zero at one row). Here the weights are A and x is B:
// - mma.m16n8k16's M is 16 columns of W, its N the (up to 8) rows of x, its K 16 rows of the product's K. A warp
//   owns 32 columns; per 32-row step lane (g = lane / 4, t = lane % 4) loads 16 bytes, word row t of the step for
//   columns 4g .. 4g + 3 (words w0..w3). One LOP3 turns nibbles i and i + 4 of a word into the bf16 pair
//   (128 + q_i, 128 + q_(i+4)) exactly (P_i, gptq_mma.cu's pair_bf16). Tile A is columns 4g (A row g) and 4g + 1
//   (A row g + 8), tile B columns 4g + 2 and 4g + 3; the step's first mma takes P_0 as k pair 2t and P_1 as k pair
//   2t + 8, the second P_2 and P_3, so x's B fragments are its 8 values of word row t reordered 0 4 1 5 | 2 6 3 7.
// - Lane (g, t) takes row g of x (zero for g >= m); its D holds columns (4g, 4g + 1 | 4g + 2, 4g + 3) x rows 2t,
//   2t + 1. Per 128-row chunk (one group): acc += s (D - (z + 128) sum x).
// - x two ways (kStage). Unstaged (served): each warp loads its chunks' x beside their words, in the same ring of
//   kTcDepth chunks, and sums them by mma with an all-ones A (two more a step: D's rows are then x's sums, rows 2t
//   and 2t + 1 in this lane, where ~17 conversions and adds a step and 4 shuffles a chunk did it before), so nothing
//   waits block-wide before the loop. Staged: the block copies x's rows into shared memory after
//   griddepcontrol.wait (rows padded so a quarter-warp's 16-byte reads fall on distinct banks) with their chunk sums;
//   the served two-row activation (kAct) takes this form, since unstaged every warp would compute up * silu(gate)
//   for its chunks, all 32 lanes over 8 rows' slots.
// - A block is 32 columns and W warps splitting its K range by chunks (warp w: chunks w, w + W, ...); the warps'
//   sums meet in shared memory and are added in warp order (deterministic). K may also be split over blocks, summed
//   in split order by the last block to arrive, as in gptq_gemv.cu. The plan: gemv_cuda.plan_tc.
// - PDL: the ring's first chunks of words and scales are loaded before griddepcontrol.wait (constant data), x after.
// kAct: x's row r is mlp's gate_up row [gate (K) | up (K)], and the product's input is up * silu(gate) with
// fused.silu_mul's rounding (DecodeKernels.gptq_act).
// kNorm (DecodeKernels.norm_fold; unstaged, no act, NormFold): the residual add + RMSNorm between two linears folded
// into them. kNorm 1 (the producer, attn.c_proj or mlp.c_proj, any K split): s = rn(rn(product + bias) + residual), as
// fused.rms_norm's sum, goes to `sum`; y = rn(s * weight); sq [m][column tiles] holds each block's sum of s^2 over its
// 32 columns (a warp's butterfly). kNorm 2 (the consumer, c_attn or the gate_up pair): each row of the product is
// scaled by rsqrt(sum of its sq_in * inv_n + eps) (the sum in a fixed order, the same in every block) before the bias:
// RMSNorm(s) . W = rsqrt(mean s^2 + eps) (s * weight) . W, without the normalized row rounded to bf16 between.
// kPair: the product is mlp's gate_up [gate (N/2) | up (N/2)] and y its activation, up * silu(gate) [M, N/2]
// (DecodeKernels.gptq_act_out): block b owns gate columns 32b .. 32b + 31 with its first W/2 warps and the same up
// columns with the others, each half splitting K as a block of W/2 warps would; the epilogue rounds each sum (plus its
// bias) to bf16 as the GEMV's output would be, then applies fused.silu_mul's rounding. No K split over blocks; W from
// gemv_cuda.plan_tc_pair (all blocks in one wave).
// Measured on the H200 (BENCHMARKS.md, 2026-11-30): the 7B Int4 step at batch 1 2.462 ms against the FMA GEMV's
// 2.615; batch 2 2.909 against 3.75; with kPair on gate_up (gptq_act_out) 2.26-2.30 / 2.37-2.39 ms; x's sums by mma
// and groups without a division 2.14-2.16 / 2.25; 3 chunks in flight (12 warps an SM) 2.10-2.11 / 2.18-2.19. Tried
// and removed: a cp.async ring of 2-4 chunks a warp in shared memory (64-80 registers; the step 3.0-3.2 ms: L2 hit rate
// 61 % against 5 %, DRAM at 24 %; 97fa31d), x loaded as its chunk starts instead of in the ring (121-128 registers, 16
// warps an SM: 2.18-2.51 ms at 2-4 chunks in flight), 4 chunks in flight a warp, every chunk of a warp copied into
// shared memory before the wait (cp.async; c_attn 21.4 against 12.9 us), an L2 prefetch of a warp's chunks past the
// ring (cp.async.bulk.prefetch.L2; the step 2.910 against 2.759 ms), x compact at 1-2 rows (4 values a lane, the B
// fragments gathered by shuffles, 3-4 chunks in flight: the step 2.41-2.96 against 2.35-2.38 ms at batch 1, 2.75-3.36
// against 2.47 at batch 2; code in git history: 7c8b0f5), K's splits of a column tile in one thread block cluster,
// rank 0 adding the blocks' sums from their shared memory instead of partials and counters (mlp.c_proj's 4 x 3; the
// twelfth session: the step 1.986-2.000 against 1.784-1.793 ms at batch 1, 2.088-2.101 against 1.876-1.889 at batch
// 2, and slower still with attn.c_proj split too; code in git history: f0ad3ec); unstaged blocks of 11-12 warps, a
// column tile's every chunk in its warps' rings (launch bounds 384: attn.c_proj at 12 x 1 1.809-1.820 against
// 1.786-1.800 ms at batch 1, mlp.c_proj at 12 x 1 unsplit 1.786-1.794, the same; 2d45d7c). Also slower on the plans
// (twelfth session, batch 1): attn.c_proj at 4 x 1 1.923-1.928 and 4 x 2 1.834-1.835 against 8 x 1 1.787-1.789,
// mlp.c_proj at 4 x 2 1.886-1.891, c_attn at 2 x 1 1.952-1.962, gate_up's pair at 2 warps 2.203-2.215.
// kOne (2026-11-30, tenth): at one row x's chunk sums take one all-ones mma a step, row 0's values in B's columns 0 and
// 1: the step 1.829-1.834 against 1.838-1.844 ms (batch 2, its forms recompiled: 1.934-1.935 against 1.942-1.948). The
// sums' 8 mma a chunk bound ~0.08 ms of the batch-1 step (all removed, wrong values); tried and slower: one mma a row
// and chunk over B's 8 columns with two shuffles at the chunk's end (2.06-2.08 against 1.84-1.86: the chain delays the
// ring's next loads), and kOne's form chosen by a runtime branch instead of the template (1.881-1.883; batch 2 slower).
// Hopper's bulk copies (2026-12-01, second): the words through shared memory by cp.async.bulk with mbarriers, a ring
// of 2-8 chunks a warp (the step 2.30-2.89 ms against 1.79; not committed) or every chunk of a block requested before
// the PDL wait (2.03 against 1.79; c_attn alone 12.2 against 9.0 us; 0bf7387), bit for bit the register ring's values:
// slower.

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "gptq_cuda.cuh"  // kChunk, kWordRows, gdc_wait / gdc_go, load_words, pair_bf16, mma_bf16, and more

// kNorm's operands (gemv_cuda._NormFold): the producer's residual, RMSNorm weight, `sum` out and sq out; the consumer's
// sq_in [m][tiles_in], eps and 1 / hidden size
struct NormFold {
  const __nv_bfloat16* residual;
  const __nv_bfloat16* weight;
  __nv_bfloat16* sum;
  float* sq;
  const float* sq_in;
  int tiles_in;
  float eps;
  float inv_n;
};

namespace {

constexpr int kTcCols = 32;   // columns per block
constexpr int kTcRows = 8;    // rows at most (mma's N)
constexpr int kTcSteps = 4;   // 32-row steps of a chunk
// chunks in flight a warp: 3 for the served unstaged plain and pair forms (~160 registers: 12 warps an SM,
// gemv_cuda.TC_WARPS_PER_SM), 2 for the staged and act forms (their registers; 4, every chunk via shared memory, a
// cp.async ring of 2-4 chunks a warp in shared memory, or an L2 prefetch past 2: all slower)
constexpr int kTcDepth = 3, kTcDepthStagedOrAct = 2;
constexpr uint32_t kOnes = 0x3F803F80u;  // the bf16 pair (1, 1)
constexpr int kTcPad = 32;    // bf16 appended to each staged row of x: its pitch is 64 bytes past a multiple of 128

// Chunk c's words for this lane (its 4 steps) and the group's scales and zeros for columns 4g .. 4g + 3
// (kTiled: `base` is tiled_base's plus t)
template <bool kZeros, bool kTiled>
__device__ __forceinline__ void tc_load(uint4* words, uint2& s4, uint2& z4, const uint4* base,
                                        const __nv_bfloat16* scales, const __nv_bfloat16* zeros, int c, int n4,
                                        bool live, int n, int N, int k_offset, int group_size, int t) {
  if (!live) return;
#pragma unroll
  for (int s = 0; s < kTcSteps; ++s)
    words[s] = load_words(kTiled ? base + (size_t)c * 128 + s * 32 : base + (size_t)(c * kWordRows + s * 4 + t) * n4);
  // the chunk's group: at groups of one chunk (Qwen's 128) without the division's ~25 instructions a chunk
  const int group = group_size == kChunk ? k_offset / kChunk + c : (k_offset + c * kChunk) / group_size;
  const size_t gi = (size_t)group * N + n;
  s4 = *reinterpret_cast<const uint2*>(scales + gi);
  if (kZeros) z4 = *reinterpret_cast<const uint2*>(zeros + gi);
}

// x's 8 values of a step for this lane (row g, rows >= m zero): as stored, or (kAct) up * silu(gate) from gate_up. At
// one row (kOne) lanes g == 1 take row 0 as well (their column of the product is row 1's, never stored)
template <bool kAct, bool kOne>
__device__ __forceinline__ void tc_load_x(uint4* xv, uint4* uv, const __nv_bfloat16* x, int c, int K, int g, int t,
                                          int m) {
  const int row = g < m ? g : kOne && g == 1 ? 0 : -1;
#pragma unroll
  for (int s = 0; s < kTcSteps; ++s) {
    xv[s] = uv[s] = make_uint4(0u, 0u, 0u, 0u);
    if (row >= 0) {
      const size_t k = (size_t)c * kChunk + 32 * s + 8 * t;
      if (kAct) {
        xv[s] = *reinterpret_cast<const uint4*>(x + (size_t)row * 2 * K + k);
        uv[s] = *reinterpret_cast<const uint4*>(x + (size_t)row * 2 * K + K + k);
      } else {
        xv[s] = *reinterpret_cast<const uint4*>(x + (size_t)row * K + k);
      }
    }
  }
}

__device__ __forceinline__ uint4 tc_act8(uint4 gate, uint4 up) {  // 8 values of up * silu(gate), bf16
  const __nv_bfloat16* gv = reinterpret_cast<const __nv_bfloat16*>(&gate);
  const __nv_bfloat16* uv = reinterpret_cast<const __nv_bfloat16*>(&up);
  uint4 out;
  __nv_bfloat16* o = reinterpret_cast<__nv_bfloat16*>(&out);
#pragma unroll
  for (int i = 0; i < 8; ++i) o[i] = __float2bfloat16_rn(silu_mul_bf16(gv[i], uv[i]));
  return out;
}

// kStage: the block stages x's rows in shared memory (and their chunk sums) after griddepcontrol.wait; else each warp
// loads its chunks' x beside their words (ring slots) and sums them by mma: no block-wide wait before the loop.
// kOne (unstaged, one row): those sums by one all-ones mma a step instead of two, row 0's values in two columns of B
template <bool kZeros, bool kBias, bool kAct, bool kStage, bool kPair, bool kTiled, int kNorm, bool kOne>
__global__ void __launch_bounds__(kStage ? 512 : 256) gptq_tc_kernel(
    const __nv_bfloat16* __restrict__ x, const uint4* __restrict__ qw, const __nv_bfloat16* __restrict__ scales,
    const __nv_bfloat16* __restrict__ zeros, float zero, const __nv_bfloat16* __restrict__ bias,
    __nv_bfloat16* __restrict__ y, float* __restrict__ partial, int* __restrict__ counters, int N, int K,
    int k_offset, int group_size, int chunks_per_split, int splits, int m, const NormFold nf) {
  constexpr int kDepth = kStage || kAct ? kTcDepthStagedOrAct : kTcDepth;
  extern __shared__ uint4 smem4[];
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  // kPair: warps [0, W/2) the gate columns, [W/2, W) the up columns; `warp` and `warps` within the half
  const int half = kPair ? (int)(threadIdx.x >> 5) / (int)(blockDim.x >> 6) : 0;
  const int warps = kPair ? blockDim.x >> 6 : blockDim.x >> 5, warp = (threadIdx.x >> 5) - half * warps;
  const int nh = kPair ? N / 2 : N;           // the columns a half covers
  const int nb = blockIdx.x * kTcCols;        // the block's first column (of its half)
  const int n = half * nh + nb + 4 * g;       // this lane's columns n .. n + 3 of W (N % 4 == 0: whole or none)
  const bool live = nb + 4 * g < nh;
  const int n4 = N >> 2;
  const int c0 = blockIdx.y * chunks_per_split;
  const int c1 = min(c0 + chunks_per_split, K / kChunk);
  const int chunks = c1 - c0;
  const int pitch = chunks_per_split * kChunk + kTcPad;  // bf16 of a staged row
  __nv_bfloat16* xs = reinterpret_cast<__nv_bfloat16*>(smem4);
  float* xsum = reinterpret_cast<float*>(xs + (kStage ? (size_t)m * pitch : 0));  // [m][chunks_per_split]
  float* red = xsum + (kStage ? m * chunks_per_split : 0);                        // [warps][kTcRows][kTcCols]
  float* rs = red + (blockDim.x >> 5) * kTcRows * kTcCols;                         // kNorm 2: [kTcRows] row scales

  uint4 buf[kDepth][kTcSteps];
  uint2 sbuf[kDepth], zbuf[kDepth];
  uint4 xbuf[kStage ? 1 : kDepth][kTcSteps], ubuf[kStage || !kAct ? 1 : kDepth][kTcSteps];  // !kStage: x (gate, up)
  const uint4* base = kTiled ? tiled_base(qw, n >> 2, K / kChunk) + t : qw + (n >> 2);
#pragma unroll
  for (int i = 0; i < kDepth; ++i) {
    sbuf[i] = zbuf[i] = make_uint2(0u, 0u);
    const int c = c0 + warp + i * warps;
    if (c < c1)
      tc_load<kZeros, kTiled>(buf[i], sbuf[i], zbuf[i], base, scales, zeros, c, n4, live, n, N, k_offset, group_size,
                              t);
  }
  // kNorm's operands of this thread's first item (row threadIdx.x / 32; the epilogue's) and, kNorm 2, its warp's row's
  // first squares, loaded early so the epilogue does not wait on them: the weight (constant) before the wait, the rest
  // after it
  const int row0 = threadIdx.x / kTcCols, col0 = nb + threadIdx.x % kTcCols;
  const bool own0 = kNorm == 1 && row0 < m && col0 < N;
  float w0 = 0.f, r0 = 0.f, sq0[4] = {0.f, 0.f, 0.f, 0.f};
  if (own0) w0 = __bfloat162float(nf.weight[col0]);
  gdc_wait();
  if (own0) r0 = __bfloat162float(nf.residual[(size_t)row0 * N + col0]);
  if (kNorm == 2 && (int)(threadIdx.x >> 5) < m) {
    const float* sq_row = nf.sq_in + (size_t)(threadIdx.x >> 5) * nf.tiles_in;
#pragma unroll
    for (int q = 0; q < 4; ++q)
      if (lane + 32 * q < nf.tiles_in) sq0[q] = __ldcg(sq_row + lane + 32 * q);
  }
  if constexpr (kStage) {
    const int len = chunks * kChunk;
    if (kAct) {
      for (int i = threadIdx.x; i < m * len; i += blockDim.x) {
        const int row = i / len, k = c0 * kChunk + (i - row * len);
        const __nv_bfloat16* xr = x + (size_t)row * 2 * K;
        xs[row * pitch + (i - row * len)] = __float2bfloat16_rn(silu_mul_bf16(xr[k], xr[K + k]));
      }
    } else {
      for (int i = threadIdx.x; i < m * (len / 8); i += blockDim.x) {  // 16 bytes a thread
        const int row = i / (len / 8), j = i - row * (len / 8);
        *reinterpret_cast<uint4*>(xs + row * pitch + j * 8) =
            *reinterpret_cast<const uint4*>(x + (size_t)row * K + (size_t)c0 * kChunk + j * 8);
      }
    }
    __syncthreads();
    for (int rc = threadIdx.x; rc < m * chunks; rc += blockDim.x) {  // sum of x per row and chunk, in a fixed order
      const int row = rc / chunks, cc = rc - row * chunks;
      const __nv_bfloat162* p = reinterpret_cast<const __nv_bfloat162*>(xs + row * pitch + cc * kChunk);
      float a[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll 8
      for (int i = 0; i < kChunk / 2; ++i) {
        const float2 f = __bfloat1622float2(p[i]);
        a[i % 4] += f.x + f.y;
      }
      xsum[row * chunks_per_split + cc] = (a[0] + a[1]) + (a[2] + a[3]);
    }
    __syncthreads();
  } else {
#pragma unroll
    for (int i = 0; i < kDepth; ++i) {
      const int c = c0 + warp + i * warps;
      if (c < c1) tc_load_x<kAct, kOne>(xbuf[i], ubuf[kAct ? i : 0], x, c, K, g, t, m);
    }
  }
  gdc_go();

  // B fragments: row g of x (zero at g >= m); this lane's results are rows 2t, 2t + 1
  const bool xrow = g < m;
  const __nv_bfloat16* xg = xs + g * pitch + 8 * t;
  float acc[4][2] = {};  // [column 4g + j][row 2t + r]
  auto chunk = [&](const uint4* cur, const uint4* xv, uint2 s4, uint2 z4, int c) {
    float da[4] = {0.f, 0.f, 0.f, 0.f}, db[4] = {0.f, 0.f, 0.f, 0.f};
    float ds[4] = {0.f, 0.f, 0.f, 0.f};  // !kStage: x's chunk sums, rows 2t and 2t + 1 (ds[0], ds[1]), by mma
    const int off = (c - c0) * kChunk;
#pragma unroll
    for (int s = 0; s < kTcSteps; ++s) {
      uint4 v = make_uint4(0u, 0u, 0u, 0u);
      if constexpr (kStage) {
        if (xrow) v = *reinterpret_cast<const uint4*>(xg + off + 32 * s);
      } else {
        v = xv[s];
      }
      const uint32_t b0 = __byte_perm(v.x, v.z, 0x5410), b1 = __byte_perm(v.x, v.z, 0x7632);
      const uint32_t b2 = __byte_perm(v.y, v.w, 0x5410), b3 = __byte_perm(v.y, v.w, 0x7632);
      if constexpr (!kStage) {  // all-ones A: every row of D is the sum of its column's values of x
        if constexpr (kOne) {  // row 0's values 0 1 4 5 of each lane in column 0, 2 3 6 7 in column 1 (lanes g == 1)
          mma_bf16(ds, kOnes, kOnes, kOnes, kOnes, g == 1 ? b2 : b0, g == 1 ? b3 : b1);
        } else {  // the step's 32 values of row g in column g
          mma_bf16(ds, kOnes, kOnes, kOnes, kOnes, b0, b1);
          mma_bf16(ds, kOnes, kOnes, kOnes, kOnes, b2, b3);
        }
      }
      const uint32_t w0 = cur[s].x, w1 = cur[s].y, w2 = cur[s].z, w3 = cur[s].w;
      mma_bf16(da, pair_bf16(w0), pair_bf16(w1), pair_bf16(w0 >> 4), pair_bf16(w1 >> 4), b0, b1);
      mma_bf16(da, pair_bf16(w0 >> 8), pair_bf16(w1 >> 8), pair_bf16(w0 >> 12), pair_bf16(w1 >> 12), b2, b3);
      mma_bf16(db, pair_bf16(w2), pair_bf16(w3), pair_bf16(w2 >> 4), pair_bf16(w3 >> 4), b0, b1);
      mma_bf16(db, pair_bf16(w2 >> 8), pair_bf16(w3 >> 8), pair_bf16(w2 >> 12), pair_bf16(w3 >> 12), b2, b3);
    }
    float sx0 = 0.f, sx1 = 0.f;
    const int r0 = 2 * t;
    if constexpr (kStage) {
      sx0 = r0 < m ? xsum[r0 * chunks_per_split + (c - c0)] : 0.f;
      sx1 = r0 + 1 < m ? xsum[(r0 + 1) * chunks_per_split + (c - c0)] : 0.f;
    } else {  // lane (g, t) holds D's columns 2t and 2t + 1: at one row, lanes t == 0 the halves of row 0's sum
      sx0 = kOne ? ds[0] + ds[1] : ds[0], sx1 = kOne ? 0.f : ds[1];
    }
    if (!live) return;  // da: (col 4g, row 2t), (4g, 2t + 1), (4g + 1, 2t), (4g + 1, 2t + 1); db: columns 4g + 2, + 3
    const __nv_bfloat162* sv = reinterpret_cast<const __nv_bfloat162*>(&s4);
    const float2 s01 = __bfloat1622float2(sv[0]), s23 = __bfloat1622float2(sv[1]);
    float z[4];
    if (kZeros) {
      const __nv_bfloat162* zv = reinterpret_cast<const __nv_bfloat162*>(&z4);
      const float2 z01 = __bfloat1622float2(zv[0]), z23 = __bfloat1622float2(zv[1]);
      z[0] = z01.x + 128.f, z[1] = z01.y + 128.f, z[2] = z23.x + 128.f, z[3] = z23.y + 128.f;
    } else {
      z[0] = z[1] = z[2] = z[3] = zero + 128.f;
    }
    acc[0][0] = fmaf(s01.x, da[0] - z[0] * sx0, acc[0][0]);
    acc[0][1] = fmaf(s01.x, da[1] - z[0] * sx1, acc[0][1]);
    acc[1][0] = fmaf(s01.y, da[2] - z[1] * sx0, acc[1][0]);
    acc[1][1] = fmaf(s01.y, da[3] - z[1] * sx1, acc[1][1]);
    acc[2][0] = fmaf(s23.x, db[0] - z[2] * sx0, acc[2][0]);
    acc[2][1] = fmaf(s23.x, db[1] - z[2] * sx1, acc[2][1]);
    acc[3][0] = fmaf(s23.y, db[2] - z[3] * sx0, acc[3][0]);
    acc[3][1] = fmaf(s23.y, db[3] - z[3] * sx1, acc[3][1]);
  };
  for (int cb = c0 + warp; cb < c1; cb += kDepth * warps) {  // the ring: chunk cb + i * warps in slot i
#pragma unroll
    for (int i = 0; i < kDepth; ++i) {
      const int c = cb + i * warps;
      if (c >= c1) break;
      const int cn = c + kDepth * warps;
      if constexpr (kStage) {  // the slot refilled before the chunk's arithmetic
        uint4 cur[kTcSteps];
#pragma unroll
        for (int s = 0; s < kTcSteps; ++s) cur[s] = buf[i][s];
        const uint2 s4 = sbuf[i], z4 = zbuf[i];
        if (cn < c1)
          tc_load<kZeros, kTiled>(buf[i], sbuf[i], zbuf[i], base, scales, zeros, cn, n4, live, n, N, k_offset,
                                  group_size, t);
        chunk(cur, nullptr, s4, z4, c);
      } else {  // after it (registers: the other slot is in flight meanwhile)
        if constexpr (kAct) {
#pragma unroll
          for (int s = 0; s < kTcSteps; ++s) xbuf[i][s] = tc_act8(xbuf[i][s], ubuf[kAct ? i : 0][s]);
        }
        chunk(buf[i], xbuf[i], sbuf[i], zbuf[i], c);
        if (cn < c1) {
          tc_load<kZeros, kTiled>(buf[i], sbuf[i], zbuf[i], base, scales, zeros, cn, n4, live, n, N, k_offset,
                                  group_size, t);
          tc_load_x<kAct, kOne>(xbuf[i], ubuf[kAct ? i : 0], x, cn, K, g, t, m);
        }
      }
    }
  }

  float* rw = red + (half * warps + warp) * kTcRows * kTcCols;
#pragma unroll
  for (int j = 0; j < 4; ++j)
#pragma unroll
    for (int r = 0; r < 2; ++r) rw[(2 * t + r) * kTcCols + 4 * g + j] = acc[j][r];
  __syncthreads();
  // item i: row i / 32, column nb + i % 32, the warps' sums (of half h) in warp order
  auto sum = [&](int i, int h = 0) {
    float v = 0.f;
    for (int w = h * warps; w < (h + 1) * warps; ++w) v += red[(w * kTcRows + i / kTcCols) * kTcCols + i % kTcCols];
    return v;
  };
  // kNorm 2: rs[row] = rsqrt(mean of s^2 + eps) from the producer's tiles (a warp a row, a fixed order), then a sync
  auto row_scales = [&]() {
    if constexpr (kNorm == 2) {
      for (int r = threadIdx.x >> 5; r < m; r += blockDim.x >> 5) {
        float e[4] = {sq0[0], sq0[1], sq0[2], sq0[3]};  // the lane's first four squares: sq0 in this warp's first row
        if (r != (int)(threadIdx.x >> 5)) {
#pragma unroll
          for (int q = 0; q < 4; ++q)
            e[q] = lane + 32 * q < nf.tiles_in ? __ldcg(nf.sq_in + (size_t)r * nf.tiles_in + lane + 32 * q) : 0.f;
        }
        float a = (e[0] + e[1]) + (e[2] + e[3]);
        for (int j = lane + 128; j < nf.tiles_in; j += 32) a += __ldcg(nf.sq_in + (size_t)r * nf.tiles_in + j);
#pragma unroll
        for (int o = 16; o; o >>= 1) a += __shfl_xor_sync(0xffffffffu, a, o);
        if (lane == 0) rs[r] = rsqrtf(a * nf.inv_n + nf.eps);
      }
      __syncthreads();
    }
  };
  auto scaled = [&](float v, int row) {
    if constexpr (kNorm == 2) return v * rs[row];
    return v;
  };
  // y's value for item i (row i / 32, column nb + i % 32) from the product's sum v; kNorm 1: the residual add and
  // RMSNorm's numerator, and the block's sum of s^2 for the row (the whole warp calls it: i's row is the warp's)
  auto put = [&](int i, float v) {
    const int row = i / kTcCols, col = nb + i % kTcCols;
    v = scaled(v, row);
    if constexpr (kNorm == 1) {
      float sq = 0.f;
      if (col < N) {
        const bool first = i == (int)threadIdx.x;  // w0, r0 hold this item's weight and residual
        const float res = first ? r0 : __bfloat162float(nf.residual[(size_t)row * N + col]);
        const float wt = first ? w0 : __bfloat162float(nf.weight[col]);
        const float out = __bfloat162float(__float2bfloat16_rn(kBias ? v + __bfloat162float(bias[col]) : v));
        const __nv_bfloat16 s = __float2bfloat16_rn(out + res);
        nf.sum[(size_t)row * N + col] = s;
        const float sf = __bfloat162float(s);
        y[(size_t)row * N + col] = __float2bfloat16_rn(sf * wt);
        sq = sf * sf;
      }
#pragma unroll
      for (int o = 16; o; o >>= 1) sq += __shfl_xor_sync(0xffffffffu, sq, o);
      if (i % kTcCols == 0) nf.sq[(size_t)row * gridDim.x + blockIdx.x] = sq;
    } else if (col < N) {
      y[(size_t)row * N + col] = __float2bfloat16_rn(kBias ? v + __bfloat162float(bias[col]) : v);
    }
  };
  if constexpr (kPair) {  // y [m, N/2] = up * silu(gate), each rounded to bf16 first (splits == 1)
    row_scales();
    for (int i = threadIdx.x; i < m * kTcCols; i += blockDim.x) {
      const int row = i / kTcCols, col = nb + i % kTcCols;
      if (col >= nh) continue;
      const float gs = kBias ? scaled(sum(i, 0), row) + __bfloat162float(bias[col]) : scaled(sum(i, 0), row);
      const float us = kBias ? scaled(sum(i, 1), row) + __bfloat162float(bias[nh + col]) : scaled(sum(i, 1), row);
      y[(size_t)row * nh + col] =
          __float2bfloat16_rn(silu_mul_bf16(__float2bfloat16_rn(gs), __float2bfloat16_rn(us)));
    }
    return;
  }
  if (splits == 1) {
    row_scales();
    for (int i = threadIdx.x; i < m * kTcCols; i += blockDim.x) put(i, sum(i));  // (warp-uniform: m * 32 items)
    return;
  }
  for (int i = threadIdx.x; i < m * kTcCols; i += blockDim.x) {
    const int row = i / kTcCols, col = nb + i % kTcCols;
    if (col < N) partial[((size_t)blockIdx.y * m + row) * N + col] = sum(i);
  }
  if (!last_to_arrive(counters, splits)) return;
  __threadfence();
  row_scales();
  for (int i = threadIdx.x; i < m * kTcCols; i += blockDim.x) {
    const int row = i / kTcCols, col = nb + i % kTcCols;
    float u = 0.f;
    if (col < N)
      for (int s = 0; s < splits; ++s) u += __ldcg(partial + ((size_t)s * m + row) * N + col);
    put(i, u);
  }
  if (threadIdx.x == 0) counters[blockIdx.x] = 0;  // ready for the next launch
}

template <bool kZeros, bool kBias, bool kAct, bool kStage, bool kPair, bool kTiled, int kNorm>
cudaError_t launch_tc(const void* x, const void* qw, const void* scales, const void* zeros, float zero,
                      const void* bias, void* y, float* partial, int* counters, int N, int K, int k_offset,
                      int group_size, int chunks_per_split, int splits, int pdl, cudaStream_t stream, int m,
                      int warps, const NormFold& nf) {
  const size_t smem = (kStage ? (size_t)m * (chunks_per_split * kChunk + kTcPad) * 2 + (size_t)m * chunks_per_split * 4
                             : 0) +
                      (size_t)warps * kTcRows * kTcCols * 4 + (kNorm == 2 ? kTcRows * 4 : 0);
  const int cols = kPair ? N / 2 : N;
  PdlLaunch l(dim3((cols + kTcCols - 1) / kTcCols, splits), dim3(32 * warps), smem, pdl, stream);
  auto kernel = gptq_tc_kernel<kZeros, kBias, kAct, kStage, kPair, kTiled, kNorm, false>;
  if constexpr (!kStage) {
    if (m == 1) kernel = gptq_tc_kernel<kZeros, kBias, kAct, kStage, kPair, kTiled, kNorm, true>;
  }
  if (cudaError_t e = l.allow(kernel)) return e;
  return cudaLaunchKernelEx(&l.config, kernel, static_cast<const __nv_bfloat16*>(x), static_cast<const uint4*>(qw),
                            static_cast<const __nv_bfloat16*>(scales), static_cast<const __nv_bfloat16*>(zeros), zero,
                            static_cast<const __nv_bfloat16*>(bias), static_cast<__nv_bfloat16*>(y), partial, counters,
                            N, K, k_offset, group_size, chunks_per_split, splits, m, nf);
}

// The launch for a stage / pair / layout / norm form by zeros, bias and act (act: not at kPair nor kNorm)
template <bool kStage, bool kPair, bool kTiled, int kNorm>
int launch_tc_as(const void* x, const void* qw, const void* scales, const void* zeros, float zero, const void* bias,
                 void* y, float* partial, int* counters, int N, int K, int k_offset, int group_size,
                 int chunks_per_split, int splits, int pdl, cudaStream_t stream, int m, int warps, int act,
                 const NormFold& nf) {
  const bool z = zeros != nullptr, b = bias != nullptr;
  auto f = z ? (b ? launch_tc<true, true, false, kStage, kPair, kTiled, kNorm>
                  : launch_tc<true, false, false, kStage, kPair, kTiled, kNorm>)
             : (b ? launch_tc<false, true, false, kStage, kPair, kTiled, kNorm>
                  : launch_tc<false, false, false, kStage, kPair, kTiled, kNorm>);
  if constexpr (!kPair && kNorm == 0) {
    if (act)
      f = z ? launch_tc<true, false, true, kStage, false, kTiled, 0>
            : launch_tc<false, false, true, kStage, false, kTiled, 0>;
  }
  return static_cast<int>(f(x, qw, scales, zeros, zero, bias, y, partial, counters, N, K, k_offset, group_size,
                            chunks_per_split, splits, pdl, stream, m, warps, nf));
}

}  // namespace

// m rows of x (1 to 8), `warps` warps a block (1 to 16; 8 unstaged); act: x's rows are gate_up rows [gate | up] of 2K
// and there is no bias; stage: x staged in shared memory by the block (else each warp loads its own). pair: y is the
// activation of the product's halves [gate | up] (kPair: unstaged, no act, no K split, an even number of warps, N / 2
// a multiple of 4). pdl: launch flags (gptq_cuda.cuh's kPdl, kTiled). norm: kNorm's form (0 none, 1 the producer, not
// at pair; 2 the consumer; unstaged, no act) with its operands at `fold` (a host NormFold, copied into the launch).
// The host (gemv_cuda.plan_tc) keeps the shared memory within what the device allows.
extern "C" int gptq_tc(const void* x, const void* qw, const void* scales, const void* zeros, float zero,
                       const void* bias, void* y, float* partial, int* counters, int N, int K, int k_offset,
                       int group_size, int chunks_per_split, int splits, int pdl, void* stream, int m, int warps,
                       int act, int stage, int pair, int norm, const void* fold) {
  if (m < 1 || m > kTcRows || warps < 1 || warps > (stage ? 16 : 8) || (act && bias != nullptr))
    return static_cast<int>(cudaErrorInvalidValue);
  const bool tiled = pdl & kTiled;
  if (pair && (stage || act || splits != 1 || warps % 2 || (N / 2) % 4)) return static_cast<int>(cudaErrorInvalidValue);
  if (norm < 0 || norm > 2 || (norm && (stage || act || fold == nullptr || (pair && norm == 1))))
    return static_cast<int>(cudaErrorInvalidValue);
  const NormFold nf = norm ? *static_cast<const NormFold*>(fold) : NormFold{};
  auto f = pair    ? (tiled ? launch_tc_as<false, true, true, 0> : launch_tc_as<false, true, false, 0>)
           : stage ? (tiled ? launch_tc_as<true, false, true, 0> : launch_tc_as<true, false, false, 0>)
                   : (tiled ? launch_tc_as<false, false, true, 0> : launch_tc_as<false, false, false, 0>);
  if (norm == 2 && pair) f = tiled ? launch_tc_as<false, true, true, 2> : launch_tc_as<false, true, false, 2>;
  if (norm == 2 && !pair) f = tiled ? launch_tc_as<false, false, true, 2> : launch_tc_as<false, false, false, 2>;
  if (norm == 1) f = tiled ? launch_tc_as<false, false, true, 1> : launch_tc_as<false, false, false, 1>;
  return f(x, qw, scales, zeros, zero, bias, y, partial, counters, N, K, k_offset, group_size, chunks_per_split,
           splits, pdl, static_cast<cudaStream_t>(stream), m, warps, act, nf);
}
