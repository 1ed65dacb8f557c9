// GPTQ matmul on tensor cores for decode steps of 1 to 64 Int4 rows (served at 3-48, quantized.MMA_MAX_M) and 1 to 32
// Int8 rows (served at 3-32; the Int8 scheme is above gptq_mma_kernel) (issue 16):
// y [M, N] = x [M, K] . dequant(qweight) (+ bias), bf16 in and out, fp32 accumulation. Built with gptq_gemv.cu into
// one library by worker/kernels/gemv_cuda.py; the layout is GPTQGemvWeights's, as there (rows in group order,
// qweight int32 [K/8, N], scales and zeros [G, N] bf16, zeros holding z + zero_offset or one value for all).
//
// Above two rows the GEMVs of gptq_gemv.cu pay an FMA a value for every row, and the dequantize-then-cuBLAS path
// writes and reads W in bf16 (4.5 bytes a weight against bf16's 2): both were slower than bf16 at 8 and 32 rows.
// Here each packed word is read once, whatever the row count, and feeds mma.m16n8k16 as it stands (the mma work
// grows with the 16-row tiles of x; on the H200 it stays ahead of bf16 up to 16 rows, BENCHMARKS.md):
// - A warp owns 32 columns; per 32-row step lane (g = lane / 4, t = lane % 4) loads 16 bytes, word row t of the
//   step for columns 4g .. 4g + 3. One mask-and-or (LOP3) turns nibbles i and i + 4 of a word into the bf16 pair
//   (128 + q_i, 128 + q_(i+4)) exactly, a B fragment of mma.m16n8k16 as it stands: inside a step the k order is
//   permuted (B's k = 2t, 2t + 1 are rows 8t + i, 8t + i + 4), and x's A fragments take the same permutation as
//   they are read from shared memory (8 rows a uint4 reordered 0 4 1 5 2 6 3 7; the block stages x there with
//   cp.async). Each B fragment serves the MT 16-row tiles of x.
// - The mma sums x (128 + q) per 128-row chunk (one group) in fp32; then s (D - (z + 128) sum x) goes into the
//   accumulators, with sum x per row and chunk from shared memory (summed in a fixed order).
// - Split K over blocks as in gptq_gemv.cu: each block stores its fp32 partials, the last to arrive at a column
//   tile sums them in split order (deterministic; 4 columns of a row a thread, all of its threads), adds the bias,
//   writes y and resets the tile's counter. The split count: gemv_cuda.plan_mma.
// - PDL: the first chunks' words are loaded before griddepcontrol.wait (constant data); x after it.
// A first version for one row (M = 1, rows 1-15 of A zero) measured slower than the FMA GEMV there (2026-11-29,
// BENCHMARKS.md); it is the same loop with the other rows of A filled.
// Tried (2026-11-30, H200): x's shared-memory rows padded by 64 bytes, so the fragment loads of rows g and g + 1 in
// one quarter-warp fall on other banks: no change (c_attn at 32 rows 36.8 us against 35.9-37.1), reverted. Each
// warp streaming its chunks through 6 shared-memory stages (cp.async; 72-194 registers instead of 198-255): slower
// at 1-32 rows (c_attn at 8 rows 26.1 against 21.6 us, w2|w1 42.4 against 31.6; the 7B step at batch 8 4.86 against
// 3.96 ms), faster only at 48 (c_attn 51.6 against 59.9 us); reverted (c37b087).

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "gptq_cuda.cuh"  // kChunk, kWordRows, gdc_wait / gdc_go, load_words, pair_bf16, mma_bf16, last_to_arrive

namespace {

constexpr int kMmaWarps = 4;
constexpr int kMmaThreads = 32 * kMmaWarps;
constexpr int kMmaCols = 32 * kMmaWarps;  // columns per block: a warp owns 32

// 8 bf16 of x (k 8t .. 8t + 7 of a step) in the fragments' order: (0 4) (1 5) (2 6) (3 7)
__device__ __forceinline__ uint4 permuted(uint4 v) {
  uint4 p;
  p.x = __byte_perm(v.x, v.z, 0x5410);
  p.y = __byte_perm(v.x, v.z, 0x7632);
  p.z = __byte_perm(v.y, v.w, 0x5410);
  p.w = __byte_perm(v.y, v.w, 0x7632);
  return p;
}

// 4 bf16 of x (k 4t .. 4t + 3 of an Int8 step) in the fragments' order: (0 2) (1 3)
__device__ __forceinline__ uint2 permuted(uint2 v) {
  return make_uint2(__byte_perm(v.x, v.y, 0x5410), __byte_perm(v.x, v.y, 0x7632));
}

// 16 bytes global -> shared without a register round trip (many in flight: no load-use chain per copy)
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(s), "l"(gmem));
}

__device__ __forceinline__ uint4 to_bf16x8(const float* v) {
  uint4 out;
  __nv_bfloat16* o = reinterpret_cast<__nv_bfloat16*>(&out);
#pragma unroll
  for (int i = 0; i < 8; ++i) o[i] = __float2bfloat16_rn(v[i]);
  return out;
}

// The steps of a 128-row chunk: 32 rows (Int4, 4 word rows of 8 values) or 16 (Int8, 4 word rows of 4 values)
template <int BITS>
constexpr int kSteps = BITS == 4 ? 4 : 8;

// Chunk c's words for this lane (word rows 4s + t of its kSteps steps, columns 4g .. 4g + 3; `base` at column 4g)
// and its group's scales and zeros for columns n .. n + 7.
// (kTiled, Int4 only: `base` is tiled_base's plus t)
template <int BITS, bool kZeros, bool kTiled>
__device__ __forceinline__ void load_chunk(uint4* words, uint4& s8, uint4& z8, const uint4* base,
                                           const __nv_bfloat16* scales, const __nv_bfloat16* zeros, int c, int n4,
                                           bool live, int n, int N, int k_offset, int group_size, int t) {
  constexpr int kRows = kChunk * BITS / 32;  // word rows of a chunk
  static_assert(!kTiled || BITS == 4, "tiled words are Int4's");
  if (live) {
#pragma unroll
    for (int s = 0; s < kSteps<BITS>; ++s)
      words[s] = load_words(kTiled ? base + (size_t)c * 128 + s * 32 : base + (size_t)(c * kRows + s * 4 + t) * n4);
  }
  if (n < N) {
    const size_t gi = (size_t)((k_offset + c * kChunk) / group_size) * N + n;
    s8 = *reinterpret_cast<const uint4*>(scales + gi);
    if (kZeros) z8 = *reinterpret_cast<const uint4*>(zeros + gi);
  }
}

// MT 16-row tiles of x (rows >= m read as zeros); kDepth chunks of words in flight per warp (a ring unrolled by
// kDepth). Shared memory: x's m rows over the block's K range [m][chunks_per_split * 16] uint4 (as in memory; the
// fragments permute what they read), then its sums [m][chunks_per_split].
// Int8 (BITS 8): a word holds 4 rows of a column; the low and the high nibbles of its bytes are two Int4 words as
// above (one LOP3 each gives the pairs (ql_0, ql_2), (ql_1, ql_3), (qh_0, qh_2), (qh_1, qh_3)), summed by two mma into
// D_lo = sum x (128 + ql) and D_hi = sum x (128 + qh): sum x q = 16 D_hi + D_lo - 2176 sum x. A step is 16 rows,
// x's order (0 2) (1 3) inside each 4.
template <int BITS, int MT, int kDepth, bool kZeros, bool kBias, bool kTiled>
__global__ void __launch_bounds__(kMmaThreads) gptq_mma_kernel(
    const __nv_bfloat16* __restrict__ x, const uint4* __restrict__ qw, const __nv_bfloat16* __restrict__ scales,
    const __nv_bfloat16* __restrict__ zeros, float zero, const __nv_bfloat16* __restrict__ bias,
    __nv_bfloat16* __restrict__ y, float* __restrict__ partial, int* __restrict__ counters, int N, int K,
    int k_offset, int group_size, int chunks_per_split, int splits, int m) {
  extern __shared__ uint4 smem4[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int nw = blockIdx.x * kMmaCols + warp * 32;  // the warp's first column
  const int n4 = N >> 2;
  const bool live = nw + 4 * g < N;  // this lane's 4 columns of the loads (N % 4 == 0)
  const int c0 = blockIdx.y * chunks_per_split;
  const int c1 = min(c0 + chunks_per_split, K / kChunk);
  const int span = chunks_per_split * (kChunk / 8);  // uint4 of a row in xs
  uint4* xs = smem4;
  float* xsum = reinterpret_cast<float*>(smem4 + m * span);

  const int n = nw + 8 * t;  // this lane's 8 output columns n .. n + 7 (N % 8 == 0: whole or none)
  // the ring, slot i for the chunk c with (c - c0) % kDepth == i: its words, and its group's scales and zeros for
  // columns n .. n + 7 (in flight as long as the words)
  uint4 buf[kDepth][kSteps<BITS>], sbuf[kDepth], zbuf[kDepth];
  const uint4* base = kTiled ? tiled_base(qw, (nw >> 2) + g, K / kChunk) + t : qw + (nw >> 2) + g;
#pragma unroll
  for (int i = 0; i < kDepth; ++i) {
#pragma unroll
    for (int s = 0; s < kSteps<BITS>; ++s) buf[i][s] = make_uint4(0u, 0u, 0u, 0u);
    sbuf[i] = zbuf[i] = make_uint4(0u, 0u, 0u, 0u);
    if (c0 + i < c1)
      load_chunk<BITS, kZeros, kTiled>(buf[i], sbuf[i], zbuf[i], base, scales, zeros, c0 + i, n4, live, n, N, k_offset,
                                       group_size, t);
  }
  gdc_wait();
  const int len = (c1 - c0) * (kChunk / 8);
  for (int i = threadIdx.x; i < m * len; i += kMmaThreads) {
    const int row = i / len, j = i - row * len;
    cp_async16(xs + row * span + j, x + (size_t)row * K + (size_t)c0 * kChunk + j * 8);
  }
  asm volatile("cp.async.wait_all;" ::: "memory");
  __syncthreads();
  const int chunks = c1 - c0;
  for (int rc = threadIdx.x; rc < m * chunks; rc += kMmaThreads) {  // sum of x per row and chunk, a thread each
    const int row = rc / chunks, cc = rc - row * chunks;
    const uint4* p = xs + row * span + cc * (kChunk / 8);
    float a[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int i = 0; i < kChunk / 8; ++i) {  // starting at the lane's own 16 bytes: no bank conflicts
      const int q = (i + lane) % (kChunk / 8);
      const uint4 v = p[q];
      const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
      float2 f0 = __bfloat1622float2(h[0]), f1 = __bfloat1622float2(h[1]);
      float2 f2 = __bfloat1622float2(h[2]), f3 = __bfloat1622float2(h[3]);
      a[i % 4] += ((f0.x + f0.y) + (f1.x + f1.y)) + ((f2.x + f2.y) + (f3.x + f3.y));
    }
    xsum[row * chunks_per_split + cc] = (a[0] + a[1]) + (a[2] + a[3]);
  }
  __syncthreads();
  gdc_go();

  float acc[MT][2][8] = {};  // [tile][rows g, g + 8][column]
  for (int cb = c0; cb < c1; cb += kDepth) {
#pragma unroll
    for (int i = 0; i < kDepth; ++i) {
      const int c = cb + i;
      if (c >= c1) break;
      uint4 cur[kSteps<BITS>];
#pragma unroll
      for (int s = 0; s < kSteps<BITS>; ++s) cur[s] = buf[i][s];
      const uint4 s8 = sbuf[i], z8 = zbuf[i];
      if (c + kDepth < c1)
        load_chunk<BITS, kZeros, kTiled>(buf[i], sbuf[i], zbuf[i], base, scales, zeros, c + kDepth, n4, live, n, N,
                                         k_offset, group_size, t);
      float d[MT][4][4] = {};                    // this chunk's sums x (128 + q) (Int8: of the low nibbles)
      float dh[BITS == 8 ? MT : 1][4][4] = {};  // Int8: of the high nibbles
#pragma unroll
      for (int s = 0; s < kSteps<BITS>; ++s) {
        const uint32_t words[4] = {cur[s].x, cur[s].y, cur[s].z, cur[s].w};
        uint32_t b[4][4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          b[j][0] = pair_bf16(words[j]);
          b[j][1] = pair_bf16(words[j] >> 4);
          b[j][2] = pair_bf16(words[j] >> 8);
          b[j][3] = pair_bf16(words[j] >> 12);
        }
        if constexpr (BITS == 4) {
          const uint4* xr = xs + (c - c0) * (kChunk / 8) + s * 4 + t;
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            const int r0 = mt * 16 + g;
            const uint4 lo = r0 < m ? permuted(xr[r0 * span]) : make_uint4(0u, 0u, 0u, 0u);
            const uint4 hi = r0 + 8 < m ? permuted(xr[(r0 + 8) * span]) : make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
            for (int j = 0; j < 4; ++j) {
              mma_bf16(d[mt][j], lo.x, hi.x, lo.y, hi.y, b[j][0], b[j][1]);
              mma_bf16(d[mt][j], lo.z, hi.z, lo.w, hi.w, b[j][2], b[j][3]);
            }
          }
        } else {  // rows 16s + 4t .. + 3: low nibbles (b[j][0], b[j][2]), high (b[j][1], b[j][3])
          const uint2* xr = reinterpret_cast<const uint2*>(xs) + (c - c0) * (kChunk / 4) + s * 4 + t;
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            const int r0 = mt * 16 + g;
            const uint2 lo = r0 < m ? permuted(xr[r0 * 2 * span]) : make_uint2(0u, 0u);
            const uint2 hi = r0 + 8 < m ? permuted(xr[(r0 + 8) * 2 * span]) : make_uint2(0u, 0u);
#pragma unroll
            for (int j = 0; j < 4; ++j) {
              mma_bf16(d[mt][j], lo.x, hi.x, lo.y, hi.y, b[j][0], b[j][2]);
              mma_bf16(dh[mt][j], lo.x, hi.x, lo.y, hi.y, b[j][1], b[j][3]);
            }
          }
        }
      }
      if constexpr (BITS == 8) {  // 16 D_hi + D_lo = sum x (q + 2176): the zero below takes the 2176 off
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) d[mt][j][e] = fmaf(16.f, dh[mt][j][e], d[mt][j][e]);
      }
      constexpr float kBiasQ = BITS == 4 ? 128.f : 2176.f;  // what the unpacked values carry beside q
      if (n < N) {  // d[mt][j]: rows (g, g, g + 8, g + 8) x columns (n + j, n + 4 + j, n + j, n + 4 + j)
        const __nv_bfloat16* sv = reinterpret_cast<const __nv_bfloat16*>(&s8);
        float sc[8], z[8];
        if (kZeros) {
          const __nv_bfloat16* zv = reinterpret_cast<const __nv_bfloat16*>(&z8);
#pragma unroll
          for (int k = 0; k < 8; ++k) z[k] = __bfloat162float(zv[k]) + kBiasQ;
        } else {
#pragma unroll
          for (int k = 0; k < 8; ++k) z[k] = zero + kBiasQ;
        }
#pragma unroll
        for (int k = 0; k < 8; ++k) sc[k] = __bfloat162float(sv[k]);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int row = mt * 16 + g + 8 * h;
            const float sx = row < m ? xsum[row * chunks_per_split + (c - c0)] : 0.f;
#pragma unroll
            for (int j = 0; j < 4; ++j) {
              acc[mt][h][j] = fmaf(sc[j], d[mt][j][2 * h] - z[j] * sx, acc[mt][h][j]);
              acc[mt][h][4 + j] = fmaf(sc[4 + j], d[mt][j][2 * h + 1] - z[4 + j] * sx, acc[mt][h][4 + j]);
            }
          }
        }
      }
    }
  }

  const bool mine = n < N;
  auto each_row = [&](auto&& put) {  // put(row, the row's 8 sums) for this lane's rows below m
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = mt * 16 + g + 8 * h;
        if (row < m) put(row, acc[mt][h]);
      }
  };
  if (splits == 1) {
    if (mine) {
      each_row([&](int row, const float* a) {
        float v[8];
#pragma unroll
        for (int c = 0; c < 8; ++c) v[c] = a[c] + (kBias ? __bfloat162float(bias[n + c]) : 0.f);
        *reinterpret_cast<uint4*>(y + (size_t)row * N + n) = to_bf16x8(v);
      });
    }
    return;
  }
  if (mine) {
    each_row([&](int row, const float* a) {
      float4* p = reinterpret_cast<float4*>(partial + ((size_t)blockIdx.y * m + row) * N + n);
      p[0] = make_float4(a[0], a[1], a[2], a[3]);
      p[1] = make_float4(a[4], a[5], a[6], a[7]);
    });
  }
  if (!last_to_arrive(counters, splits)) return;
  __threadfence();
  const int col0 = blockIdx.x * kMmaCols;  // the tile's partials, 4 columns of a row a thread, summed in split order
  for (int i = threadIdx.x; i < m * (kMmaCols / 4); i += kMmaThreads) {
    const int row = i / (kMmaCols / 4), col = col0 + 4 * (i % (kMmaCols / 4));
    if (col >= N) continue;
    float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 4
    for (int s = 0; s < splits; ++s) {
      const float4 a = __ldcg(reinterpret_cast<const float4*>(partial + ((size_t)s * m + row) * N + col));
      v.x += a.x, v.y += a.y, v.z += a.z, v.w += a.w;
    }
    if (kBias) {
      v.x += __bfloat162float(bias[col]), v.y += __bfloat162float(bias[col + 1]);
      v.z += __bfloat162float(bias[col + 2]), v.w += __bfloat162float(bias[col + 3]);
    }
    __nv_bfloat162 o[2] = {__floats2bfloat162_rn(v.x, v.y), __floats2bfloat162_rn(v.z, v.w)};
    *reinterpret_cast<uint2*>(y + (size_t)row * N + col) = *reinterpret_cast<const uint2*>(o);
  }
  if (threadIdx.x == 0) counters[blockIdx.x] = 0;  // ready for the next launch
}

template <int BITS, int MT, bool kZeros, bool kBias, bool kTiled>
cudaError_t launch_mma(const void* x, const void* qw, const void* scales, const void* zeros, float zero,
                       const void* bias, void* y, float* partial, int* counters, int N, int K, int k_offset,
                       int group_size, int chunks_per_split, int splits, int pdl, cudaStream_t stream, int m) {
  constexpr int kDepth = BITS == 4 && MT <= 2 ? 4 : 2;  // registers: the accumulators grow with MT (and Int8)
  const size_t smem = (size_t)m * chunks_per_split * ((kChunk / 8) * sizeof(uint4) + sizeof(float));
  PdlLaunch l(dim3((N + kMmaCols - 1) / kMmaCols, splits), dim3(kMmaThreads), smem, pdl, stream);
  auto kernel = gptq_mma_kernel<BITS, MT, kDepth, kZeros, kBias, kTiled>;
  if (cudaError_t e = l.allow(kernel)) return e;
  return cudaLaunchKernelEx(&l.config, kernel, static_cast<const __nv_bfloat16*>(x), static_cast<const uint4*>(qw),
                            static_cast<const __nv_bfloat16*>(scales), static_cast<const __nv_bfloat16*>(zeros), zero,
                            static_cast<const __nv_bfloat16*>(bias), static_cast<__nv_bfloat16*>(y), partial, counters,
                            N, K, k_offset, group_size, chunks_per_split, splits, m);
}

template <int BITS, int MT, bool kTiled = false>
cudaError_t launch_tiles(const void* x, const void* qw, const void* scales, const void* zeros, float zero,
                         const void* bias, void* y, float* partial, int* counters, int N, int K, int k_offset,
                         int group_size, int chunks_per_split, int splits, int pdl, cudaStream_t stream, int m) {
  auto f = zeros != nullptr ? (bias != nullptr ? launch_mma<BITS, MT, true, true, kTiled>
                                               : launch_mma<BITS, MT, true, false, kTiled>)
                            : (bias != nullptr ? launch_mma<BITS, MT, false, true, kTiled>
                                               : launch_mma<BITS, MT, false, false, kTiled>);
  return f(x, qw, scales, zeros, zero, bias, y, partial, counters, N, K, k_offset, group_size, chunks_per_split,
           splits, pdl, stream, m);
}

}  // namespace

// m rows of x: 1 to 64 for Int4 (bits 4), 1 to 32 for Int8 (bits 8); pdl: launch flags (gptq_cuda.cuh's kPdl, kTiled:
// Int4 only); the host (gemv_cuda.plan_mma) keeps the shared memory within what the device allows
extern "C" int gptq_mma(const void* x, const void* qw, const void* scales, const void* zeros, float zero,
                        const void* bias, void* y, float* partial, int* counters, int N, int K, int k_offset,
                        int group_size, int chunks_per_split, int splits, int pdl, void* stream, int m, int bits) {
  auto s = static_cast<cudaStream_t>(stream);
  const int tiles = (m + 15) / 16;
  const bool tiled = pdl & kTiled;
  if (m < 1 || tiles > (bits == 4 ? 4 : 2) || (bits != 4 && bits != 8) || (tiled && bits != 4))
    return static_cast<int>(cudaErrorInvalidValue);
  auto f = bits == 8 ? (tiles == 1 ? launch_tiles<8, 1> : launch_tiles<8, 2>)
           : tiles == 1 ? (tiled ? launch_tiles<4, 1, true> : launch_tiles<4, 1>)
           : tiles == 2 ? (tiled ? launch_tiles<4, 2, true> : launch_tiles<4, 2>)
           : tiles == 3 ? (tiled ? launch_tiles<4, 3, true> : launch_tiles<4, 3>)
                        : (tiled ? launch_tiles<4, 4, true> : launch_tiles<4, 4>);
  return static_cast<int>(f(x, qw, scales, zeros, zero, bias, y, partial, counters, N, K, k_offset, group_size,
                            chunks_per_split, splits, pdl, s, m));
}
