// What the CUDA GPTQ kernels share (gptq_gemv.cu, gptq_mma.cu, gptq_tc.cu, gptq_bulk.cu): the K chunk, PDL's
// instructions, the packed words' load, the bf16 pairs and mma of the tensor-core kernels, the activation's rounding,
// split K's arrival, the tensor-core GEMVs' scales, accumulation and epilogue.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace {

constexpr int kChunk = 128;  // K rows per chunk (gemv_cuda.CHUNK)
constexpr int kWordRows = kChunk / 8;

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900  // PDL's instructions (a no-op launched without the attribute)
__device__ __forceinline__ void gdc_wait() { asm volatile("griddepcontrol.wait;" ::: "memory"); }
__device__ __forceinline__ void gdc_go() { asm volatile("griddepcontrol.launch_dependents;" ::: "memory"); }
#else
__device__ __forceinline__ void gdc_wait() {}
__device__ __forceinline__ void gdc_go() {}
#endif

// 16 bytes of packed words, read once: past L1 (no reuse within a block)
__device__ __forceinline__ uint4 load_words(const uint4* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// nibbles 0 and 4 of w -> the bf16 pair (128 + q0, 128 + q4): (w & 0x000F000F) | 0x43004300 in one LOP3
__device__ __forceinline__ uint32_t pair_bf16(uint32_t w) {
  uint32_t r;
  asm("lop3.b32 %0, %1, 0x000F000F, 0x43004300, 0xEA;" : "=r"(r) : "r"(w));
  return r;
}

// D += A (16 x 16, rows g and g + 8 of this lane: a0 a1 for k 2t, 2t + 1; a2 a3 for k 2t + 8, 2t + 9) . B (16 x 8)
__device__ __forceinline__ void mma_bf16(float* d, uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                         uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// up * silu(gate) rounded as fused.silu_mul (worker/kernels/fused.py): silu = g / (1 + expf(-g)) in fp32, rounded to
// bf16, times up in fp32, rounded to bf16 (the value mlp.c_proj's input holds without the fusion)
__device__ __forceinline__ float silu_mul_bf16(__nv_bfloat16 gate, __nv_bfloat16 up) {
  const float g = __bfloat162float(gate);
  const float act = __bfloat162float(__float2bfloat16_rn(__fdiv_rn(g, __fadd_rn(1.0f, expf(-g)))));
  return __bfloat162float(__float2bfloat16_rn(__fmul_rn(__bfloat162float(up), act)));
}

// A launch's configuration (cudaLaunchKernelEx(&l.config, ...)) with PDL's attribute where asked; `allow` lets a kernel
// have more than 48 KB of dynamic shared memory when its launch asks for that much.
struct PdlLaunch {
  cudaLaunchConfig_t config = {};
  cudaLaunchAttribute attr[1];
  PdlLaunch(dim3 grid, dim3 block, size_t smem, int pdl, cudaStream_t stream) {
    config.gridDim = grid;
    config.blockDim = block;
    config.dynamicSmemBytes = smem;
    config.stream = stream;
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    config.attrs = attr;
    config.numAttrs = pdl ? 1 : 0;
  }
  PdlLaunch(const PdlLaunch&) = delete;  // config.attrs points into this object
  template <typename Kernel>
  cudaError_t allow(Kernel kernel) const {
    if (config.dynamicSmemBytes <= 48 * 1024) return cudaSuccess;
    return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)config.dynamicSmemBytes);
  }
};

// The tensor-core GEMVs (gptq_tc.cu, gptq_bulk.cu): a block's columns, and rows at most (mma's N)
constexpr int kTcCols = 32;
constexpr int kTcRows = 8;

// Chunk c's scales (and zeros) for columns n .. n + 3; at groups of one chunk (Qwen's 128) without the division's
// ~25 instructions a chunk
template <bool kZeros>
__device__ __forceinline__ void tc_scales(uint2& s4, uint2& z4, const __nv_bfloat16* scales,
                                          const __nv_bfloat16* zeros, int c, int n, int N, int k_offset,
                                          int group_size) {
  const int group = group_size == kChunk ? k_offset / kChunk + c : (k_offset + c * kChunk) / group_size;
  const size_t gi = (size_t)group * N + n;
  s4 = *reinterpret_cast<const uint2*>(scales + gi);
  if (kZeros) z4 = *reinterpret_cast<const uint2*>(zeros + gi);
}

// A chunk's products into acc [column 4g + j][row 2t + r]: acc += s (D - (z + 128) sum x), D from the two mma tiles
// (da: (col 4g, row 2t), (4g, 2t + 1), (4g + 1, 2t), (4g + 1, 2t + 1); db: columns 4g + 2, + 3), sx0 / sx1 x's
// chunk sums of rows 2t and 2t + 1
template <bool kZeros>
__device__ __forceinline__ void tc_accumulate(float (&acc)[4][2], const float* da, const float* db, float sx0,
                                              float sx1, uint2 s4, uint2 z4, float zero) {
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
}

// Split K, by every thread once the block's partials are stored: whether this block is the last of its column tile
// to arrive (it then fences, sums the partials in split order and resets the tile's counter).
__device__ __forceinline__ bool last_to_arrive(int* counters, int splits) {
  __shared__ int last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(counters + blockIdx.x, 1) == splits - 1;
  __syncthreads();
  return last;
}

// The tensor-core GEMVs' end: each warp's acc into red [warps of the block][kTcRows][kTcCols], summed in warp order
// (of half h at kPair); y = the sum (+ bias), or at kPair y [m, nh] = up * silu(gate), each half's sum (+ bias)
// rounded to bf16 first, then fused.silu_mul's rounding; over K splits the partials summed in split order by the last
// block of the column tile to arrive.
template <bool kBias, bool kPair>
__device__ __forceinline__ void tc_epilogue(const float (&acc)[4][2], float* red, int half, int warps, int nb, int nh,
                                            int N, int m, const __nv_bfloat16* bias, __nv_bfloat16* y,
                                            float* partial, int* counters, int splits) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  float* rw = red + (threadIdx.x >> 5) * kTcRows * kTcCols;
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
  if constexpr (kPair) {  // (splits == 1)
    for (int i = threadIdx.x; i < m * kTcCols; i += blockDim.x) {
      const int row = i / kTcCols, col = nb + i % kTcCols;
      if (col >= nh) continue;
      const float gs = kBias ? sum(i, 0) + __bfloat162float(bias[col]) : sum(i, 0);
      const float us = kBias ? sum(i, 1) + __bfloat162float(bias[nh + col]) : sum(i, 1);
      y[(size_t)row * nh + col] =
          __float2bfloat16_rn(silu_mul_bf16(__float2bfloat16_rn(gs), __float2bfloat16_rn(us)));
    }
    return;
  }
  if (splits == 1) {
    for (int i = threadIdx.x; i < m * kTcCols; i += blockDim.x) {
      const int row = i / kTcCols, col = nb + i % kTcCols;
      if (col < N) y[(size_t)row * N + col] = __float2bfloat16_rn(kBias ? sum(i) + __bfloat162float(bias[col]) : sum(i));
    }
    return;
  }
  for (int i = threadIdx.x; i < m * kTcCols; i += blockDim.x) {
    const int row = i / kTcCols, col = nb + i % kTcCols;
    if (col < N) partial[((size_t)blockIdx.y * m + row) * N + col] = sum(i);
  }
  if (!last_to_arrive(counters, splits)) return;
  __threadfence();
  for (int i = threadIdx.x; i < m * kTcCols; i += blockDim.x) {
    const int row = i / kTcCols, col = nb + i % kTcCols;
    if (col >= N) continue;
    float u = 0.f;
    for (int s = 0; s < splits; ++s) u += __ldcg(partial + ((size_t)s * m + row) * N + col);
    y[(size_t)row * N + col] = __float2bfloat16_rn(kBias ? u + __bfloat162float(bias[col]) : u);
  }
  if (threadIdx.x == 0) counters[blockIdx.x] = 0;  // ready for the next launch
}

}  // namespace
