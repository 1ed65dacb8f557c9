// What the CUDA GPTQ kernels share (gptq_gemv.cu, gptq_mma.cu): the K chunk, PDL's instructions, the packed
// words' load. Included inside each file's anonymous namespace.
#pragma once

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

}  // namespace
