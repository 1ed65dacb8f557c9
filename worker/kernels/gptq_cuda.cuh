// What the CUDA GPTQ kernels share (gptq_gemv.cu, gptq_mma.cu, gptq_tc.cu): the K chunk, PDL's instructions, the
// packed words' load, the bf16 pairs and mma of the tensor-core kernels, the activation's rounding, split K's arrival.
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

// Int4 words tiled (the host's gptq_format.tile_words: [N / 32][K / 128][4 steps][8][4] uint4, a warp's step 512
// contiguous bytes): the 16 bytes of columns 4 c4 .. 4 c4 + 3, word row 4 s + t of chunk c are at
// tiled_base(qw, c4, chunks) + 128 c + 32 s + t (`chunks`: K / 128).
__device__ __forceinline__ const uint4* tiled_base(const uint4* qw, int c4, int chunks) {
  return qw + (size_t)(c4 >> 3) * chunks * 128 + (c4 & 7) * 4;
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

// The host's launch flags (the `pdl` argument of the entry points): bit 0 PDL's attribute, bit 1 the words tiled
// (tiled_base; Int4 only)
constexpr int kPdl = 1, kTiled = 2;

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
    config.numAttrs = (pdl & kPdl) ? 1 : 0;
  }
  PdlLaunch(const PdlLaunch&) = delete;  // config.attrs points into this object
  template <typename Kernel>
  cudaError_t allow(Kernel kernel) const {
    if (config.dynamicSmemBytes <= 48 * 1024) return cudaSuccess;
    return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)config.dynamicSmemBytes);
  }
};

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

}  // namespace
