// Int4 GPTQ GEMV for one decode row (issue 16, P9; two rows: gptq4_gemv_rows at the end of the file):
// y[N] = x[K] . dequant(qweight) (+ bias), bf16 in and out,
// fp32 accumulation. Built by worker/kernels/gemv_cuda.py with nvcc into a small shared library (no PyTorch
// headers) and called through ctypes with raw pointers on PyTorch's current stream; the Triton GEMV
// (worker/kernels/gemv.py) stays the path wherever this one does not apply or cannot be built.
//
// Layout: GPTQGemvWeights's (rows in group order): qweight int32 [K/8, N] (row 8w + j of a column in bits
// [4j, 4j + 4) of word w), scales bf16 [G, N], zeros bf16 [G, N] holding z + zero_offset (or one value for all),
// group g = (k_offset + k) / group_size, group_size a multiple of 128 (or no groups), k_offset a multiple of 128.
//
// Work: a block of 4 warps owns 128 columns (4 per thread: one 16-byte load covers 4 words = 32 values) and a K
// range of whole 128-row chunks (one group or a part of one); warp w takes the range's chunks w, w + 4, ... and
// keeps the next chunk's 16 loads in flight while it multiplies the current one. Value j of a word becomes
// 16 + q exactly with one shift and one mask-and-or under a fixed fp32 exponent (the Triton GEMV's "shift"
// unpack), so a value costs SHF + LOP3 + FFMA; the 16 joins the zero point: s (sum x (16 + q) - (z + 16) sum x).
// Split K over blocks: each block stores its fp32 partial, the last to arrive at a column tile sums all partials
// in split order (deterministic), adds the bias, writes y and resets the tile's counter: one launch.
// PDL: the first chunk's weights are loaded before griddepcontrol.wait (constant data); x after it.
//
// Tried and removed (H200, 2026-11-29): a tensor-core variant, one warp per 32 columns, the packed words used as
// mma.m16n8k16 B fragments as loaded (one mask-and-or gives the bf16 pair (128 + q_i, 128 + q_(i+4)); x's k order
// permuted to match; ~1.1 instructions a value against ~3.8 here), 2 or 4 chunks in flight per warp: slower on every
// 7B/14B/72B shape (c_attn 17.6 vs 13.5 us, 72B w2|w1 89.8 vs 66.0 us). It is in git history (55c67c8, 40ee63a).

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "gptq_cuda.cuh"  // kChunk, kWordRows, gdc_wait / gdc_go, load_words, silu_mul_bf16, last_to_arrive

namespace {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kCols = 128;       // columns per block: 32 lanes x 4
// 16 + q of value J of a word (exact): q moved to mantissa bits [19, 23) under the exponent of 16. `mask` is
// 0x00780000 passed in as a kernel argument: with both constants immediates ptxas splits the mask-and-or in two.
template <int J>
__device__ __forceinline__ float biased(uint32_t w, uint32_t mask) {
  constexpr int kShift = 19 - 4 * J;
  uint32_t moved = kShift >= 0 ? (w << (kShift >= 0 ? kShift : 0)) : (w >> (kShift < 0 ? -kShift : 0));
  return __uint_as_float((moved & mask) | 0x41800000u);
}

__device__ __forceinline__ void word_dot(uint32_t w, const float* xv, float& acc, uint32_t mask) {
  acc = fmaf(xv[0], biased<0>(w, mask), acc);
  acc = fmaf(xv[1], biased<1>(w, mask), acc);
  acc = fmaf(xv[2], biased<2>(w, mask), acc);
  acc = fmaf(xv[3], biased<3>(w, mask), acc);
  acc = fmaf(xv[4], biased<4>(w, mask), acc);
  acc = fmaf(xv[5], biased<5>(w, mask), acc);
  acc = fmaf(xv[6], biased<6>(w, mask), acc);
  acc = fmaf(xv[7], biased<7>(w, mask), acc);
}

// The warp's sum of one 128-row chunk of x, each lane holding 4 values at xc.
__device__ __forceinline__ float chunk_sum(const float* xc) {
  float s = (xc[0] + xc[1]) + (xc[2] + xc[3]);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  return s;
}

// Column i's sum over the block's warps, r: the warps' sums [kWarps][kCols].
__device__ __forceinline__ float warps_sum(const float* r, int i) {
  float t = r[i];
  for (int v = 1; v < kWarps; ++v) t += r[v * kCols + i];
  return t;
}

// kAct: x is mlp's gate_up row [gate (K) | up (K)] and the product's input is up * silu(gate) (silu_mul_bf16),
// computed while x is staged (DecodeKernels.gptq_act: the SiLU-mul launch before mlp.c_proj goes)
template <bool kZeros, bool kBias, bool kAct = false>
__global__ void __launch_bounds__(kThreads) gptq4_gemv_kernel(
    const __nv_bfloat16* __restrict__ x, const uint4* __restrict__ qw, const __nv_bfloat16* __restrict__ scales,
    const __nv_bfloat16* __restrict__ zeros, float zero, const __nv_bfloat16* __restrict__ bias,
    __nv_bfloat16* __restrict__ y, float* __restrict__ partial, int* __restrict__ counters, int N, int K,
    int k_offset, int group_size, int chunks_per_split, int splits, uint32_t mask) {
  extern __shared__ float smem[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int n = blockIdx.x * kCols + lane * 4;
  const bool live = n < N;
  const int n4 = N >> 2;
  const int total_chunks = K / kChunk;
  const int c0 = blockIdx.y * chunks_per_split;
  const int c1 = min(c0 + chunks_per_split, total_chunks);
  float* xs = smem;                                  // [chunks_per_split * 128] x of the block's rows
  float* xsum = smem + chunks_per_split * kChunk;    // [chunks_per_split] sum of x per chunk
  float* red = xsum + chunks_per_split;              // [kWarps][kCols] the warps' sums

  uint4 w[kWordRows];
  int c = c0 + warp;
  if (c < c1 && live) {
#pragma unroll
    for (int r = 0; r < kWordRows; ++r) w[r] = load_words(qw + (size_t)(c * kWordRows + r) * n4 + (n >> 2));
  }
  gdc_wait();
  for (int i = threadIdx.x; i < (c1 - c0) * kChunk; i += kThreads) {
    const int k = c0 * kChunk + i;
    xs[i] = kAct ? silu_mul_bf16(x[k], x[K + k]) : __bfloat162float(x[k]);
  }
  __syncthreads();
  for (int cc = warp; cc < c1 - c0; cc += kWarps) {
    const float s = chunk_sum(xs + cc * kChunk + lane * 4);
    if (lane == 0) xsum[cc] = s;
  }
  __syncthreads();
  gdc_go();

  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  for (; c < c1; c += kWarps) {
    uint4 cur[kWordRows];
#pragma unroll
    for (int r = 0; r < kWordRows; ++r) cur[r] = w[r];
    const int cn = c + kWarps;
    if (cn < c1 && live) {
#pragma unroll
      for (int r = 0; r < kWordRows; ++r) w[r] = load_words(qw + (size_t)(cn * kWordRows + r) * n4 + (n >> 2));
    }
    if (live) {
      float part[4] = {0.f, 0.f, 0.f, 0.f};
      const float* xc = xs + (c - c0) * kChunk;
#pragma unroll
      for (int r = 0; r < kWordRows; ++r) {
        const float4 xa = *reinterpret_cast<const float4*>(xc + r * 8);
        const float4 xb = *reinterpret_cast<const float4*>(xc + r * 8 + 4);
        const float xv[8] = {xa.x, xa.y, xa.z, xa.w, xb.x, xb.y, xb.z, xb.w};
        word_dot(cur[r].x, xv, part[0], mask);
        word_dot(cur[r].y, xv, part[1], mask);
        word_dot(cur[r].z, xv, part[2], mask);
        word_dot(cur[r].w, xv, part[3], mask);
      }
      const size_t g = (size_t)((k_offset + c * kChunk) / group_size) * N + n;
      const float sx = xsum[c - c0];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float s = __bfloat162float(scales[g + j]);
        const float z = (kZeros ? __bfloat162float(zeros[g + j]) : zero) + 16.f;
        acc[j] = fmaf(s, part[j] - z * sx, acc[j]);
      }
    }
  }

#pragma unroll
  for (int j = 0; j < 4; ++j) red[warp * kCols + lane * 4 + j] = acc[j];
  __syncthreads();
  if (splits == 1) {
    if (warp == 0 && live) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        float t = warps_sum(red, lane * 4 + j);
        if (kBias) t += __bfloat162float(bias[n + j]);
        y[n + j] = __float2bfloat16_rn(t);
      }
    }
    return;
  }
  if (warp == 0 && live) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      partial[(size_t)blockIdx.y * N + n + j] = warps_sum(red, lane * 4 + j);
    }
  }
  if (!last_to_arrive(counters, splits)) return;
  __threadfence();
  if (warp == 0 && live) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      float t = 0.f;
      for (int s = 0; s < splits; ++s) t += __ldcg(partial + (size_t)s * N + n + j);
      if (kBias) t += __bfloat162float(bias[n + j]);
      y[n + j] = __float2bfloat16_rn(t);
    }
  }
  if (threadIdx.x == 0) counters[blockIdx.x] = 0;  // ready for the next launch
}

template <bool kZeros, bool kBias, bool kAct = false>
cudaError_t launch(const void* x, const void* qw, const void* scales, const void* zeros, float zero, const void* bias,
                   void* y, float* partial, int* counters, int N, int K, int k_offset, int group_size,
                   int chunks_per_split, int splits, int pdl, cudaStream_t stream) {
  PdlLaunch l(dim3((N + kCols - 1) / kCols, splits), dim3(kThreads),
              (chunks_per_split * (kChunk + 1) + kWarps * kCols) * sizeof(float), pdl, stream);
  auto kernel = gptq4_gemv_kernel<kZeros, kBias, kAct>;  // <= 48 KB of shared memory: gemv_cuda.plan's MAX_CHUNKS
  return cudaLaunchKernelEx(&l.config, kernel, static_cast<const __nv_bfloat16*>(x), static_cast<const uint4*>(qw),
                            static_cast<const __nv_bfloat16*>(scales), static_cast<const __nv_bfloat16*>(zeros), zero,
                            static_cast<const __nv_bfloat16*>(bias), static_cast<__nv_bfloat16*>(y), partial, counters,
                            N, K, k_offset, group_size, chunks_per_split, splits, 0x00780000u);
}

// The same product for MT rows at once (gptq4_gemv_rows, 2 rows): x, its chunk sums and the partials per row, no
// next-chunk loads in flight (the rows' sums take those registers). A kernel of its own: folding the row count into
// the one-row kernel slowed that one (BENCHMARKS.md, 2026-11-30); at 4 and 8 rows the Triton GEMV is faster.
template <int MT, bool kZeros, bool kBias>
__global__ void __launch_bounds__(kThreads) gptq4_gemv_rows_kernel(
    const __nv_bfloat16* __restrict__ x, const uint4* __restrict__ qw, const __nv_bfloat16* __restrict__ scales,
    const __nv_bfloat16* __restrict__ zeros, float zero, const __nv_bfloat16* __restrict__ bias,
    __nv_bfloat16* __restrict__ y, float* __restrict__ partial, int* __restrict__ counters, int N, int K,
    int k_offset, int group_size, int chunks_per_split, int splits, uint32_t mask, int m) {
  extern __shared__ float smem[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int n = blockIdx.x * kCols + lane * 4;
  const bool live = n < N;
  const int n4 = N >> 2;
  const int total_chunks = K / kChunk;
  const int c0 = blockIdx.y * chunks_per_split;
  const int c1 = min(c0 + chunks_per_split, total_chunks);
  const int span = chunks_per_split * kChunk;
  float* xs = smem;                                  // [MT][span] x of the block's rows (rows >= m: zero)
  float* xsum = smem + MT * span;                    // [MT][chunks_per_split] sum of x per chunk
  float* red = xsum + MT * chunks_per_split;         // [MT][kWarps][kCols] the warps' sums

  int c = c0 + warp;
  gdc_wait();
  const int len = (c1 - c0) * kChunk;
#pragma unroll
  for (int row = 0; row < MT; ++row) {
    for (int j = threadIdx.x; j < len; j += kThreads)
      xs[row * span + j] = row < m ? __bfloat162float(x[(size_t)row * K + c0 * kChunk + j]) : 0.f;
  }
  __syncthreads();
  for (int cc = warp; cc < c1 - c0; cc += kWarps) {
#pragma unroll
    for (int row = 0; row < MT; ++row) {
      const float s = chunk_sum(xs + row * span + cc * kChunk + lane * 4);
      if (lane == 0) xsum[row * chunks_per_split + cc] = s;
    }
  }
  __syncthreads();
  gdc_go();

  float acc[MT][4];
#pragma unroll
  for (int row = 0; row < MT; ++row)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[row][j] = 0.f;
  for (; c < c1; c += kWarps) {
    if (live) {
      uint4 cur[kWordRows];
#pragma unroll
      for (int r = 0; r < kWordRows; ++r) cur[r] = load_words(qw + (size_t)(c * kWordRows + r) * n4 + (n >> 2));
      float part[MT][4];
#pragma unroll
      for (int row = 0; row < MT; ++row)
#pragma unroll
        for (int j = 0; j < 4; ++j) part[row][j] = 0.f;
      const int off = (c - c0) * kChunk;
#pragma unroll
      for (int r = 0; r < kWordRows; ++r) {
#pragma unroll
        for (int row = 0; row < MT; ++row) {
          const float* xc = xs + row * span + off + r * 8;
          const float4 xa = *reinterpret_cast<const float4*>(xc);
          const float4 xb = *reinterpret_cast<const float4*>(xc + 4);
          const float xv[8] = {xa.x, xa.y, xa.z, xa.w, xb.x, xb.y, xb.z, xb.w};
          word_dot(cur[r].x, xv, part[row][0], mask);
          word_dot(cur[r].y, xv, part[row][1], mask);
          word_dot(cur[r].z, xv, part[row][2], mask);
          word_dot(cur[r].w, xv, part[row][3], mask);
        }
      }
      const size_t g = (size_t)((k_offset + c * kChunk) / group_size) * N + n;
      float sx[MT];
#pragma unroll
      for (int row = 0; row < MT; ++row) sx[row] = xsum[row * chunks_per_split + c - c0];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float s = __bfloat162float(scales[g + j]);
        const float z = (kZeros ? __bfloat162float(zeros[g + j]) : zero) + 16.f;
#pragma unroll
        for (int row = 0; row < MT; ++row) acc[row][j] = fmaf(s, part[row][j] - z * sx[row], acc[row][j]);
      }
    }
  }

#pragma unroll
  for (int row = 0; row < MT; ++row)
#pragma unroll
    for (int j = 0; j < 4; ++j) red[(row * kWarps + warp) * kCols + lane * 4 + j] = acc[row][j];
  __syncthreads();
  if (splits == 1) {
    if (warp == 0 && live) {
      for (int row = 0; row < m; ++row) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          float t = red[row * kWarps * kCols + lane * 4 + j];
          for (int v = 1; v < kWarps; ++v) t += red[(row * kWarps + v) * kCols + lane * 4 + j];
          if (kBias) t += __bfloat162float(bias[n + j]);
          y[(size_t)row * N + n + j] = __float2bfloat16_rn(t);
        }
      }
    }
    return;
  }
  if (warp == 0 && live) {
    for (int row = 0; row < m; ++row) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        float t = red[row * kWarps * kCols + lane * 4 + j];
        for (int v = 1; v < kWarps; ++v) t += red[(row * kWarps + v) * kCols + lane * 4 + j];
        partial[((size_t)blockIdx.y * m + row) * N + n + j] = t;
      }
    }
  }
  if (!last_to_arrive(counters, splits)) return;
  __threadfence();
  if (warp == 0 && live) {
    for (int row = 0; row < m; ++row) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        float t = 0.f;
        for (int s = 0; s < splits; ++s) t += __ldcg(partial + ((size_t)s * m + row) * N + n + j);
        if (kBias) t += __bfloat162float(bias[n + j]);
        y[(size_t)row * N + n + j] = __float2bfloat16_rn(t);
      }
    }
  }
  if (threadIdx.x == 0) counters[blockIdx.x] = 0;  // ready for the next launch
}

template <int MT, bool kZeros, bool kBias>
cudaError_t launch_rows_as(const void* x, const void* qw, const void* scales, const void* zeros, float zero,
                           const void* bias, void* y, float* partial, int* counters, int N, int K, int k_offset,
                           int group_size, int chunks_per_split, int splits, int pdl, cudaStream_t stream, int m) {
  PdlLaunch l(dim3((N + kCols - 1) / kCols, splits), dim3(kThreads),
              MT * (chunks_per_split * (kChunk + 1) + kWarps * kCols) * sizeof(float), pdl, stream);
  auto kernel = gptq4_gemv_rows_kernel<MT, kZeros, kBias>;  // <= 48 KB of shared memory: gemv_cuda.max_chunks
  return cudaLaunchKernelEx(&l.config, kernel, static_cast<const __nv_bfloat16*>(x), static_cast<const uint4*>(qw),
                            static_cast<const __nv_bfloat16*>(scales), static_cast<const __nv_bfloat16*>(zeros), zero,
                            static_cast<const __nv_bfloat16*>(bias), static_cast<__nv_bfloat16*>(y), partial, counters,
                            N, K, k_offset, group_size, chunks_per_split, splits, 0x00780000u, m);
}

}  // namespace

extern "C" int gptq4_gemv_rows(const void* x, const void* qw, const void* scales, const void* zeros, float zero,
                               const void* bias, void* y, float* partial, int* counters, int N, int K, int k_offset,
                               int group_size, int chunks_per_split, int splits, int pdl, void* stream, int m) {
  if (m != 2 || (pdl & kTiled)) return static_cast<int>(cudaErrorInvalidValue);  // row-major words only
  auto launch2 = zeros != nullptr
                     ? (bias != nullptr ? launch_rows_as<2, true, true> : launch_rows_as<2, true, false>)
                     : (bias != nullptr ? launch_rows_as<2, false, true> : launch_rows_as<2, false, false>);
  return static_cast<int>(launch2(x, qw, scales, zeros, zero, bias, y, partial, counters, N, K, k_offset, group_size,
                                  chunks_per_split, splits, pdl, static_cast<cudaStream_t>(stream), m));
}

extern "C" int gptq4_gemv(const void* x, const void* qw, const void* scales, const void* zeros, float zero,
                          const void* bias, void* y, float* partial, int* counters, int N, int K, int k_offset,
                          int group_size, int chunks_per_split, int splits, int pdl, void* stream) {
  if (pdl & kTiled) return static_cast<int>(cudaErrorInvalidValue);  // row-major words only
  auto launch1 = zeros != nullptr ? (bias != nullptr ? launch<true, true> : launch<true, false>)
                                  : (bias != nullptr ? launch<false, true> : launch<false, false>);
  return static_cast<int>(launch1(x, qw, scales, zeros, zero, bias, y, partial, counters, N, K, k_offset, group_size,
                                  chunks_per_split, splits, pdl, static_cast<cudaStream_t>(stream)));
}

// x: the gate_up row [2K]; no bias (a row-parallel linear's is added after the reduce)
extern "C" int gptq4_gemv_act(const void* x, const void* qw, const void* scales, const void* zeros, float zero,
                              const void* bias, void* y, float* partial, int* counters, int N, int K, int k_offset,
                              int group_size, int chunks_per_split, int splits, int pdl, void* stream) {
  if (bias != nullptr || (pdl & kTiled)) return static_cast<int>(cudaErrorInvalidValue);  // row-major words only
  auto launch1 = zeros != nullptr ? launch<true, false, true> : launch<false, false, true>;
  return static_cast<int>(launch1(x, qw, scales, zeros, zero, bias, y, partial, counters, N, K, k_offset, group_size,
                                  chunks_per_split, splits, pdl, static_cast<cudaStream_t>(stream)));
}

extern "C" const char* gptq4_gemv_error(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }
