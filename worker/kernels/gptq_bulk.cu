// Int4 GPTQ product for decode steps of 1 to 8 rows (served at 1-2: DecodeKernels.gptq_bulk) with the packed weights
// streamed into shared memory by the Tensor Memory Accelerator (issue 16, P9). gptq_tc.cu's arithmetic (the weights as
// mma.m16n8k16's A, x's rows as its N, x's chunk sums by mma with an all-ones A, acc += s (D - (z + 128) sum x)), but
// where gptq_tc keeps 3 chunks a warp in flight in registers (160-166 registers, 12 warps an SM), here a block's
// chunks arrive by TMA in a ring of kStages rounds (a round: one chunk of 128 rows x 32 columns, 2 KB, a warp), all
// of the first kStages rounds asked for before griddepcontrol.wait: at the 7B shapes nearly every chunk a block reads
// is in flight from its launch on.
// - A tensor map a linear (gptq_bulk_map: its words [K / 8, N] as 32-bit elements, boxes of 32 words x 16 rows a
//   warp, 128-byte swizzle) and one 2D copy a round (two at kPair: the gate tile and the up tile) complete on the
//   slot's mbarrier. After every warp has read a slot (__syncthreads), thread 0 asks for the round kStages later.
// - Swizzle: a box row (128 bytes, a word row of the tile) keeps its 16-byte units XOR its row index mod 8. Lane
//   (g = lane / 4, t = lane % 4) reads word row wr = 2t + (s & 1) + 8 (s >> 1) at step s (each step's four rows, one
//   a t), so the 8 lanes of a quarter-warp read units g ^ (wr & 7): all distinct, no bank conflict. Its x values are
//   then K rows 8 wr .. 8 wr + 7 of the chunk (the same for A and B: the K order within a step is mma's own).
// - x: the block stages its rows over the split in shared memory after griddepcontrol.wait, as gptq_tc's kStage.
// - The warps' sums meet in shared memory in warp order, K splits in split order (gptq_tc's epilogue, shared in
//   gptq_cuda.cuh), so the result is deterministic; not gptq_tc's bits (another summation order within a chunk).

#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <string.h>

#include "gptq_cuda.cuh"  // kChunk, kWordRows, gdc_wait / gdc_go, pair_bf16, mma_bf16, tc_scales, tc_epilogue, ...

namespace {

constexpr int kBkCols = 32;                             // columns per block (of each half at kPair)
constexpr int kBkSteps = 4;                             // 32-row steps of a chunk
constexpr int kBkRowBytes = kBkCols * 4;                // a word row of a tile: 128 bytes
constexpr int kBkChunkBytes = kWordRows * kBkRowBytes;  // 2 KB
constexpr int kBkPad = 32;                              // bf16 after each staged row of x
constexpr uint32_t kBkOnes = 0x3F803F80u;               // the bf16 pair (1, 1)

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void bar_init(uint64_t* bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_u32(bar)), "r"(count) : "memory");
}

__device__ __forceinline__ void bar_expect(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_u32(bar)), "r"(bytes) : "memory");
}

__device__ __forceinline__ void bar_wait(uint64_t* bar, uint32_t parity) {
  uint32_t done = 0;
  while (!done) {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}"
        : "=r"(done)
        : "r"(smem_u32(bar)), "r"(parity)
        : "memory");
  }
}

// the map's box at (word column col, word row row) into dst (1024-byte aligned), completing on bar
__device__ __forceinline__ void tma_load(void* dst, const CUtensorMap* map, int col, int row, uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];" ::
          "r"(smem_u32(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(col), "r"(row), "r"(smem_u32(bar))
      : "memory");
}

// bytes [src, src + bytes) into dst (16-byte aligned, bytes a multiple of 16), completing on bar
__device__ __forceinline__ void bulk_load(void* dst, const void* src, uint32_t bytes, uint64_t* bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                   smem_u32(dst)),
               "l"(src), "r"(bytes), "r"(smem_u32(bar))
               : "memory");
}

template <bool kZeros, bool kBias, bool kPair, int kStages>
__global__ void __launch_bounds__(256) gptq_bulk_kernel(
    const __grid_constant__ CUtensorMap map, const __nv_bfloat16* __restrict__ x,
    const __nv_bfloat16* __restrict__ scales, const __nv_bfloat16* __restrict__ zeros, float zero,
    const __nv_bfloat16* __restrict__ bias, __nv_bfloat16* __restrict__ y, float* __restrict__ partial,
    int* __restrict__ counters, int N, int K, int k_offset, int group_size, int chunks_per_split, int splits, int m,
    const uint8_t* __restrict__ flat) {
  extern __shared__ uint8_t smem_raw[];
  __shared__ __align__(8) uint64_t full[kStages];
  uint8_t* smem = smem_raw + ((1024 - (smem_u32(smem_raw) & 1023)) & 1023);  // the swizzle's 1024-byte alignment
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  // kPair: warps [0, W/2) the gate columns, [W/2, W) the up columns; `warp` and `warps` within the half
  const int all = blockDim.x >> 5;
  const int half = kPair ? (int)(threadIdx.x >> 5) / (all >> 1) : 0;
  const int warps = kPair ? all >> 1 : all, warp = (threadIdx.x >> 5) - half * warps;
  const int nh = kPair ? N / 2 : N;     // the columns a half covers
  const int nb = blockIdx.x * kBkCols;  // the block's first column (of its half)
  const int n = half * nh + nb + 4 * g;
  const bool live = nb + 4 * g < nh;
  const int c0 = blockIdx.y * chunks_per_split;
  const int c1 = min(c0 + chunks_per_split, K / kChunk);
  const int rounds = (c1 - c0 + warps - 1) / warps;
  const int stage_bytes = all * kBkChunkBytes;  // a round: a chunk a warp
  const int pitch = chunks_per_split * kChunk + kBkPad;
  __nv_bfloat16* xs = reinterpret_cast<__nv_bfloat16*>(smem + kStages * stage_bytes);
  float* red = reinterpret_cast<float*>(xs + (size_t)m * pitch);  // [all warps][kTcRows][kBkCols]

  auto issue = [&](int r) {  // round r into slot r % kStages (thread 0)
    uint64_t* bar = &full[r % kStages];
    uint8_t* dst = smem + (r % kStages) * stage_bytes;
    const int row = (c0 + r * warps) * kWordRows;
    if (flat) {  // experiment: chunks contiguous, [N / 32][K / 128][2 KB]
      const int chunks = K / kChunk, c = c0 + r * warps, take = min(warps, chunks - c);
      bar_expect(bar, (kPair ? 2 : 1) * take * kBkChunkBytes);
      bulk_load(dst, flat + ((size_t)(nb / kBkCols) * chunks + c) * kBkChunkBytes, take * kBkChunkBytes, bar);
      if (kPair)
        bulk_load(dst + warps * kBkChunkBytes, flat + ((size_t)((nh + nb) / kBkCols) * chunks + c) * kBkChunkBytes,
                  take * kBkChunkBytes, bar);
      return;
    }
    bar_expect(bar, stage_bytes);
    tma_load(dst, &map, nb, row, bar);
    if (kPair) tma_load(dst + warps * kBkChunkBytes, &map, nh + nb, row, bar);
  };
  if (threadIdx.x == 0) {
#pragma unroll
    for (int i = 0; i < kStages; ++i) bar_init(&full[i], 1);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    for (int r = 0; r < min(rounds, kStages); ++r) issue(r);
  }
  uint2 sbuf[kStages], zbuf[kStages];
#pragma unroll
  for (int i = 0; i < kStages; ++i) {
    sbuf[i] = zbuf[i] = make_uint2(0u, 0u);
    const int c = c0 + i * warps + warp;
    if (c < c1 && live) tc_scales<kZeros>(sbuf[i], zbuf[i], scales, zeros, c, n, N, k_offset, group_size);
  }
  gdc_wait();
  const int len = (c1 - c0) * kChunk;
  for (int i = threadIdx.x; i < m * (len / 8); i += blockDim.x) {  // x's rows over the split, 16 bytes a thread
    const int row = i / (len / 8), j = i - row * (len / 8);
    *reinterpret_cast<uint4*>(xs + row * pitch + j * 8) =
        *reinterpret_cast<const uint4*>(x + (size_t)row * K + (size_t)c0 * kChunk + j * 8);
  }
  __syncthreads();  // x staged; the barriers initialized
  gdc_go();

  const __nv_bfloat16* xg = xs + g * pitch;
  float acc[4][2] = {};  // [column 4g + j][row 2t + r]
  auto chunk = [&](const uint8_t* wc, uint2 s4, uint2 z4, int c) {
    float da[4] = {0.f, 0.f, 0.f, 0.f}, db[4] = {0.f, 0.f, 0.f, 0.f}, ds[4] = {0.f, 0.f, 0.f, 0.f};
    const int off = (c - c0) * kChunk;
#pragma unroll
    for (int s = 0; s < kBkSteps; ++s) {
      const int wr = 2 * t + (s & 1) + 8 * (s >> 1);
      uint4 v = make_uint4(0u, 0u, 0u, 0u);
      if (g < m) v = *reinterpret_cast<const uint4*>(xg + off + 8 * wr);
      const uint32_t b0 = __byte_perm(v.x, v.z, 0x5410), b1 = __byte_perm(v.x, v.z, 0x7632);
      const uint32_t b2 = __byte_perm(v.y, v.w, 0x5410), b3 = __byte_perm(v.y, v.w, 0x7632);
      mma_bf16(ds, kBkOnes, kBkOnes, kBkOnes, kBkOnes, b0, b1);
      mma_bf16(ds, kBkOnes, kBkOnes, kBkOnes, kBkOnes, b2, b3);
      const uint4 w = *reinterpret_cast<const uint4*>(wc + wr * kBkRowBytes + ((g ^ (wr & 7)) << 4));
      mma_bf16(da, pair_bf16(w.x), pair_bf16(w.y), pair_bf16(w.x >> 4), pair_bf16(w.y >> 4), b0, b1);
      mma_bf16(da, pair_bf16(w.x >> 8), pair_bf16(w.y >> 8), pair_bf16(w.x >> 12), pair_bf16(w.y >> 12), b2, b3);
      mma_bf16(db, pair_bf16(w.z), pair_bf16(w.w), pair_bf16(w.z >> 4), pair_bf16(w.w >> 4), b0, b1);
      mma_bf16(db, pair_bf16(w.z >> 8), pair_bf16(w.w >> 8), pair_bf16(w.z >> 12), pair_bf16(w.w >> 12), b2, b3);
    }
    if (live) tc_accumulate<kZeros>(acc, da, db, ds[0], ds[1], s4, z4, zero);
  };
  for (int rb = 0; rb < rounds; rb += kStages) {
#pragma unroll
    for (int i = 0; i < kStages; ++i) {
      const int r = rb + i;
      if (r >= rounds) break;
      bar_wait(&full[i], (r / kStages) & 1);
      const int c = c0 + r * warps + warp;
      if (c < c1) chunk(smem + i * stage_bytes + (half * warps + warp) * kBkChunkBytes, sbuf[i], zbuf[i], c);
      if (r + kStages < rounds) {
        __syncthreads();  // every warp has read slot i
        if (threadIdx.x == 0) {
          asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
          issue(r + kStages);
        }
        const int cn = c + kStages * warps;
        if (cn < c1 && live) tc_scales<kZeros>(sbuf[i], zbuf[i], scales, zeros, cn, n, N, k_offset, group_size);
      }
    }
  }
  tc_epilogue<kBias, kPair>(acc, red, half, warps, nb, nh, N, m, bias, y, partial, counters, splits);
}

template <bool kZeros, bool kBias, bool kPair, int kStages>
cudaError_t launch_bulk(const CUtensorMap& map, const void* x, const void* scales, const void* zeros, float zero,
                        const void* bias, void* y, float* partial, int* counters, int N, int K, int k_offset,
                        int group_size, int chunks_per_split, int splits, int pdl, cudaStream_t stream, int m,
                        int warps, const void* flat) {
  const size_t smem = 1024 + (size_t)kStages * warps * kBkChunkBytes +
                      (size_t)m * (chunks_per_split * kChunk + kBkPad) * 2 + (size_t)warps * kTcRows * kBkCols * 4;
  const int cols = kPair ? N / 2 : N;
  PdlLaunch l(dim3((cols + kBkCols - 1) / kBkCols, splits), dim3(32 * warps), smem, pdl, stream);
  auto kernel = gptq_bulk_kernel<kZeros, kBias, kPair, kStages>;
  if (cudaError_t e = l.allow(kernel)) return e;
  // the most shared memory an SM can give (else the driver may carve out room for fewer blocks than fit)
  if (cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                           cudaSharedmemCarveoutMaxShared))
    return e;
  return cudaLaunchKernelEx(&l.config, kernel, map, static_cast<const __nv_bfloat16*>(x),
                            static_cast<const __nv_bfloat16*>(scales), static_cast<const __nv_bfloat16*>(zeros), zero,
                            static_cast<const __nv_bfloat16*>(bias), static_cast<__nv_bfloat16*>(y), partial, counters,
                            N, K, k_offset, group_size, chunks_per_split, splits, m,
                            static_cast<const uint8_t*>(flat));
}

template <int kStages>
cudaError_t launch_bulk_as(const CUtensorMap& map, const void* x, const void* scales, const void* zeros, float zero,
                           const void* bias, void* y, float* partial, int* counters, int N, int K, int k_offset,
                           int group_size, int chunks_per_split, int splits, int pdl, cudaStream_t stream, int m,
                           int warps, int pair, const void* flat) {
  const bool z = zeros != nullptr, b = bias != nullptr;
  auto f = pair ? (z ? (b ? launch_bulk<true, true, true, kStages> : launch_bulk<true, false, true, kStages>)
                     : (b ? launch_bulk<false, true, true, kStages> : launch_bulk<false, false, true, kStages>))
                : (z ? (b ? launch_bulk<true, true, false, kStages> : launch_bulk<true, false, false, kStages>)
                     : (b ? launch_bulk<false, true, false, kStages> : launch_bulk<false, false, false, kStages>));
  return f(map, x, scales, zeros, zero, bias, y, partial, counters, N, K, k_offset, group_size, chunks_per_split,
           splits, pdl, stream, m, warps, flat);
}

}  // namespace

// The tensor map of a linear's packed words [rows = K / 8, cols = N] int32 for gptq_bulk: boxes of 32 words x box_rows
// (16 a warp of a half), 128-byte swizzle; written to out (128 bytes, any alignment). 0 or a cudaError_t.
// Blocks of gptq_bulk (stages 6, no zeros, no bias, not pair) an SM holds at `smem` bytes of dynamic shared memory
extern "C" int gptq_bulk_occupancy(int warps, int smem) {
  int blocks = 0;
  auto kernel = gptq_bulk_kernel<false, false, false, 6>;
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared);
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, 32 * warps, smem) != cudaSuccess) return -1;
  return blocks;
}

extern "C" int gptq_bulk_map(void* out, const void* qweight, long long rows, long long cols, int box_rows) {
  PFN_cuTensorMapEncodeTiled_v12000 encode = nullptr;
  cudaDriverEntryPointQueryResult found;
  if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", reinterpret_cast<void**>(&encode), 12000,
                                       cudaEnableDefault, &found) != cudaSuccess ||
      found != cudaDriverEntryPointSuccess || encode == nullptr)
    return static_cast<int>(cudaErrorNotSupported);
  if (box_rows < 1 || box_rows > 256 || cols % 4) return static_cast<int>(cudaErrorInvalidValue);
  CUtensorMap map;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(cols), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(cols) * 4};
  const cuuint32_t box[2] = {static_cast<cuuint32_t>(kBkCols), static_cast<cuuint32_t>(box_rows)};
  const cuuint32_t step[2] = {1, 1};
  const CUresult r = encode(&map, CU_TENSOR_MAP_DATA_TYPE_UINT32, 2, const_cast<void*>(qweight), dims, strides, box,
                            step, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                            CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) return static_cast<int>(cudaErrorInvalidValue);
  memcpy(out, &map, sizeof(map));
  return 0;
}

// gptq_tc's product (m rows of x, 1 to 8; pair: y the activation of [gate | up], no K split) with the words from the
// tensor map `map` (gptq_bulk_map, box rows 16 x warps of a half) and `stages` rounds in flight (4, 6 or 8); warps: 1
// to 8 (even at pair). The host (gemv_cuda.plan_bulk) keeps the shared memory within what the device allows.
extern "C" int gptq_bulk(const void* map, const void* x, const void* scales, const void* zeros, float zero,
                         const void* bias, void* y, float* partial, int* counters, int N, int K, int k_offset,
                         int group_size, int chunks_per_split, int splits, int pdl, void* stream, int m, int warps,
                         int pair, int stages, const void* flat) {
  if (m < 1 || m > kTcRows || warps < 1 || warps > 8 || (pair && (splits != 1 || warps % 2 || (N / 2) % 4)))
    return static_cast<int>(cudaErrorInvalidValue);
  CUtensorMap tmap;
  memcpy(&tmap, map, sizeof(tmap));
  auto f = stages == 4 ? launch_bulk_as<4> : stages == 6 ? launch_bulk_as<6> : stages == 8 ? launch_bulk_as<8> : nullptr;
  if (f == nullptr) return static_cast<int>(cudaErrorInvalidValue);
  return static_cast<int>(f(tmap, x, scales, zeros, zero, bias, y, partial, counters, N, K, k_offset, group_size,
                            chunks_per_split, splits, pdl, static_cast<cudaStream_t>(stream), m, warps, pair, flat));
}
