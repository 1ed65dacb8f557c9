// Paged decode attention in CUDA for bf16 caches and head_dim 128 (issue 16 P9, DecodeKernels.attn_cuda): one new
// token a sequence, already stored in the cache, over its whole context. The same function as paged_decode.py's
// Triton kernels (fp32 scores in log2 units, online softmax, log-sum-exp merge), summed in another order.
//
// Why: at batch 1 the Triton kernel ended ~8.5 us after RoPE + store on the H200 (7B, 512 tokens) for ~2 us of KV
// bytes, however early it launched: after its PDL wait came the table, K and V loads of its second tile, the partials'
// stores, an atomic arrival and the merge's loads, each a trip to memory. Here
// - a thread block cluster of kSplits blocks (8 at batch 1, 4 at batch 2: paged_decode_cuda.FORMS) owns one
//   (sequence, head); block s of it the s-th share of the 32-key chunks of the cached keys, all but the newest; the
//   newest key is the last block's warp 0's, from registers (kRope: its raw row, rotated and stored here) or read
//   after the wait (the store before this kernel wrote it), folded into that warp's softmax after its chunks;
// - before griddepcontrol.wait each block reads its context length, its block-table entries and the K and V rows of
//   its first kDepth chunks (at 8 x 2, all of a context of up to 513 tokens: the newest key needs no chunk): in a
//   decode step only the newest token's K and V are written by a kernel that may still run when this one starts
//   (RoPE + store or the store; at pdl.EARLY also the c_attn GEMV before it, which writes only qkv): pdl.level's
//   rule, what is read before the wait is written before the step;
// - after it: q, the newest row, the later chunks (a ring of kDepth in registers);
// - each warp keeps an online softmax over its 8 keys of every chunk (their dot products summed by a transpose-
//   reduce); the block merges its 4 warps in shared memory and the cluster's rank 0 merges the blocks' partials over
//   distributed shared memory (no global partials, no atomics), in rank order: deterministic.
// Measured (H200, 7B Int4 step, 512-token contexts: 513 keys a step; BENCHMARKS.md, 2026-11-30, eleventh): the
// newest key outside the chunks and the transpose-reduce took batch 1 from 1.835-1.839 to 1.791-1.795 ms and batch 2
// from 1.940-1.942 to 1.889-1.893. Before, the chunks counted the newest key: 17 of them at 513 keys, so 3 a block,
// one read after the wait, and two blocks idle. Tried (same runs): the rotary rows and slot read before the wait, the
// cluster's second barrier dropped (each block writing its partial into rank 0's shared memory, then arrive / wait),
// 4 x 4 at batch 2: none faster. attn.c_proj and its norm fold inside this kernel at one sequence (each block its
// eighth of the head's rows of the Int4 weight, the heads' products summed by the last head at each tile through fp32
// partials; 2026-12-01, second): within two bf16 roundings of the fp32 reference, but the step 1.89-2.19 ms against
// 1.78 (4386baf, 7bfc99b).
// Lane l holds dims 4l .. 4l + 3 of q, K and V (8 bytes a row).

#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "gptq_cuda.cuh"  // gdc_wait / gdc_go

namespace cg = cooperative_groups;

namespace {

constexpr int kDim = 128;                  // head_dim
constexpr int kWarps = 4;                  // a block's warps
constexpr int kKeys = 8;                   // keys a warp takes of each chunk
constexpr int kChunkKeys = kWarps * kKeys; // 32 keys a chunk
constexpr float kNegBig = -1.0e30f;        // a finite "minus infinity": empty shares never give NaN

struct Rows {  // this lane's 8 bytes of K and V for the warp's keys of one chunk
  uint2 k[kKeys], v[kKeys];
};

struct Cache {
  const __nv_bfloat16* kc;
  const __nv_bfloat16* vc;
  const int* table;  // this sequence's block-table row
  long long stride_cb, stride_cr, head_off;
  int block_shift;
};

__device__ __forceinline__ long long row_of(const Cache& c, int pos, int lane) {
  const int blk = c.table[pos >> c.block_shift];
  return (long long)blk * c.stride_cb + (long long)(pos & ((1 << c.block_shift) - 1)) * c.stride_cr + c.head_off +
         4 * lane;
}

// keys p0 .. p0 + kKeys - 1 of this warp: rows at or past `stop` are 0 (not read)
__device__ __forceinline__ void load_rows(Rows& r, const Cache& c, int p0, int stop, int lane) {
#pragma unroll
  for (int j = 0; j < kKeys; ++j) {
    r.k[j] = r.v[j] = make_uint2(0u, 0u);
    if (p0 + j < stop) {
      const long long o = row_of(c, p0 + j, lane);
      r.k[j] = *reinterpret_cast<const uint2*>(c.kc + o);
      r.v[j] = *reinterpret_cast<const uint2*>(c.vc + o);
    }
  }
}

__device__ __forceinline__ float4 widen(uint2 u) {
  const float2 a = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&u.x));
  const float2 b = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&u.y));
  return make_float4(a.x, a.y, b.x, b.y);
}

__device__ __forceinline__ uint2 narrow(float4 f) {
  const __nv_bfloat162 a = __floats2bfloat162_rn(f.x, f.y), b = __floats2bfloat162_rn(f.z, f.w);
  return make_uint2(*reinterpret_cast<const uint32_t*>(&a), *reinterpret_cast<const uint32_t*>(&b));
}

__device__ __forceinline__ float rot(float a, float c, float b, float s, bool plus) {  // a c -/+ b s without FMA
  return plus ? __fadd_rn(__fmul_rn(a, c), __fmul_rn(b, s)) : __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s));
}

// kRope: RoPE (rotate-half over all 128 dims) of this lane's dims of one head's row, as fused._rotate_heads computes
// it (fp32 products and sums without FMA, rounded to bf16), then times logn (bf16) where given; lanes 0-15 hold the
// first half (x1), lanes 16-31 the second (x2), the partner's four values one shuffle away
__device__ __forceinline__ uint2 rope_row(uint2 raw, const float* cos_t, const float* sin_t, const float* logn_t,
                                          int lane) {
  const float4 x = widen(raw);
  float4 y;
  y.x = __shfl_xor_sync(0xffffffffu, x.x, 16), y.y = __shfl_xor_sync(0xffffffffu, x.y, 16);
  y.z = __shfl_xor_sync(0xffffffffu, x.z, 16), y.w = __shfl_xor_sync(0xffffffffu, x.w, 16);
  const float4 cs = *reinterpret_cast<const float4*>(cos_t + 4 * (lane & 15));
  const float4 sn = *reinterpret_cast<const float4*>(sin_t + 4 * (lane & 15));
  const bool hi = lane >= 16;  // x1 c - x2 s (lanes 0-15), x2 c + x1 s (16-31)
  const float4 o = make_float4(rot(x.x, cs.x, y.x, sn.x, hi), rot(x.y, cs.y, y.y, sn.y, hi),
                               rot(x.z, cs.z, y.z, sn.z, hi), rot(x.w, cs.w, y.w, sn.w, hi));
  uint2 r = narrow(o);
  if (logn_t != nullptr) {  // out * logn.to(bf16), rounded to bf16
    const float g = __bfloat162float(__float2bfloat16_rn(*logn_t));
    const float4 w = widen(r);
    r = narrow(make_float4(__fmul_rn(w.x, g), __fmul_rn(w.y, g), __fmul_rn(w.z, g), __fmul_rn(w.w, g)));
  }
  return r;
}

// kRope's inputs: the step's new k and v rows (views of qkv, q's raw rows in `q`), cos / sin [B, 64] fp32, logn [B]
// fp32 or null, the new rows' cache slots [B] int64 (< 0: a padded row, not stored)
struct RopeArgs {
  const __nv_bfloat16* k;
  const __nv_bfloat16* v;
  const float* cos;
  const float* sin;
  const float* logn;
  const long long* slots;
  int stride_kt, stride_kh, stride_vt, stride_vh, stride_cos, stride_sin;
};

// the online-softmax step of this warp over its keys p0 .. p0 + kKeys - 1 (valid below `stop`)
__device__ __forceinline__ void softmax_step(const Rows& r, const float4 q, int p0, int stop, float& m, float& l,
                                             float4& acc) {
  float s[kKeys];
#pragma unroll
  for (int j = 0; j < kKeys; ++j) {
    const float4 k = widen(r.k[j]);
    s[j] = q.x * k.x + q.y * k.y + q.z * k.z + q.w * k.w;
  }
  // summed over the warp by a transpose-reduce: rounds 16, 8 and 4 halve the values a lane adds (after them lane l
  // holds a partial of key 4 (l >> 4 & 1) + 2 (l >> 3 & 1) + (l >> 2 & 1)), rounds 2 and 1 finish the sums, and each
  // key's sum comes from a lane that holds it: 17 shuffles where a butterfly a key took 40
  const int lane = threadIdx.x & 31;
  const bool h16 = lane & 16, h8 = lane & 8, h4 = lane & 4;
  float t4[4], t2[2];
#pragma unroll
  for (int j = 0; j < 4; ++j) t4[j] = (h16 ? s[j + 4] : s[j]) + __shfl_xor_sync(0xffffffffu, h16 ? s[j] : s[j + 4], 16);
#pragma unroll
  for (int j = 0; j < 2; ++j) t2[j] = (h8 ? t4[j + 2] : t4[j]) + __shfl_xor_sync(0xffffffffu, h8 ? t4[j] : t4[j + 2], 8);
  float t1 = (h4 ? t2[1] : t2[0]) + __shfl_xor_sync(0xffffffffu, h4 ? t2[0] : t2[1], 4);
  t1 += __shfl_xor_sync(0xffffffffu, t1, 2);
  t1 += __shfl_xor_sync(0xffffffffu, t1, 1);
#pragma unroll
  for (int j = 0; j < kKeys; ++j) s[j] = __shfl_sync(0xffffffffu, t1, (j & 4) << 2 | (j & 2) << 2 | (j & 1) << 2);
  float mx = m;
#pragma unroll
  for (int j = 0; j < kKeys; ++j)
    if (p0 + j < stop) mx = fmaxf(mx, s[j]);
  const float alpha = exp2f(m - mx);
  l *= alpha;
  acc.x *= alpha, acc.y *= alpha, acc.z *= alpha, acc.w *= alpha;
#pragma unroll
  for (int j = 0; j < kKeys; ++j) {
    const float p = p0 + j < stop ? exp2f(s[j] - mx) : 0.f;
    const float4 v = widen(r.v[j]);
    l += p;
    acc.x += p * v.x, acc.y += p * v.y, acc.z += p * v.z, acc.w += p * v.w;
  }
  m = mx;
}

// the log-sum-exp merge of n partial softmaxes (max, sum, acc) in index order: (max, sum, acc) of all of them (an empty
// one, sum = acc = 0, adds nothing whatever its weight)
template <int kN>
__device__ __forceinline__ float3 lse_merge(const float* m, const float* l, const float* a) {
  float mm = kNegBig;
#pragma unroll
  for (int i = 0; i < kN; ++i) mm = fmaxf(mm, m[i]);
  float ll = 0.f, aa = 0.f;
#pragma unroll
  for (int i = 0; i < kN; ++i) {
    const float e = exp2f(m[i] - mm);
    ll += l[i] * e, aa += a[i] * e;
  }
  return make_float3(mm, ll, aa);
}

// kRope: q, k, v are the step's raw rows; RoPE (and logn for q) here, and the newest k and v stored into the cache by
// the warp that takes the newest key (which keeps them in registers)
// kSplits: blocks a cluster (the context's shares; 8 is the portable cluster size); kDepth: chunks in flight a block
// (read before the wait: kDepth x 32 keys of each share)
template <bool kRope, int kSplits, int kDepth>
__global__ void __launch_bounds__(kWarps * 32) paged_decode_kernel(
    const __nv_bfloat16* q, __nv_bfloat16* kc, __nv_bfloat16* vc, const int* __restrict__ tables,
    const int* __restrict__ lens, __nv_bfloat16* __restrict__ out, float scale_log2e, int stride_qt, int stride_qh,
    long long stride_cb, long long stride_cr, long long stride_ch, int stride_tb, int stride_ot, int stride_oh,
    int block_shift, RopeArgs rope) {
  cg::cluster_group cluster = cg::this_cluster();
  const int split = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const Cache c{kc, vc, tables + (size_t)b * stride_tb, stride_cb, stride_cr, (long long)h * stride_ch, block_shift};
  // before the wait: written before this step (lengths, tables, every K/V row but the newest). The shares split the
  // chunks of the cached keys, all but the newest; the newest key is the last block's warp 0's
  const int ctx = lens[b];
  const int newest = ctx - 1;
  const int chunks = (newest + kChunkKeys - 1) / kChunkKeys;
  const int per = (chunks + kSplits - 1) / kSplits;
  const int c0 = split * per, c1 = min(c0 + per, chunks);
  const bool owner = split == kSplits - 1 && warp == 0 && newest >= 0;
  Rows buf[kDepth];
#pragma unroll
  for (int i = 0; i < kDepth; ++i)  // chunks past this block's share: none
    load_rows(buf[i], c, (c0 + i) * kChunkKeys + warp * kKeys, c0 + i < c1 ? newest : 0, lane);
  gdc_wait();
  gdc_go();
  uint2 qraw = *reinterpret_cast<const uint2*>(q + (size_t)b * stride_qt + (size_t)h * stride_qh + 4 * lane);
  uint2 k_new = make_uint2(0u, 0u), v_new = make_uint2(0u, 0u);
  if constexpr (kRope) {
    const float* logn = rope.logn != nullptr ? rope.logn + b : nullptr;
    const float* cos_t = rope.cos + (size_t)b * rope.stride_cos;
    const float* sin_t = rope.sin + (size_t)b * rope.stride_sin;
    qraw = rope_row(qraw, cos_t, sin_t, logn, lane);
    if (owner) {  // the whole warp: the shuffles of rope_row
      const size_t kt = (size_t)b * rope.stride_kt + (size_t)h * rope.stride_kh + 4 * lane;
      const size_t vt = (size_t)b * rope.stride_vt + (size_t)h * rope.stride_vh + 4 * lane;
      k_new = rope_row(*reinterpret_cast<const uint2*>(rope.k + kt), cos_t, sin_t, nullptr, lane);
      v_new = *reinterpret_cast<const uint2*>(rope.v + vt);
      const long long slot = rope.slots[b];
      if (slot >= 0) {
        const long long o = (slot >> block_shift) * stride_cb + (slot & ((1 << block_shift) - 1)) * stride_cr +
                            (long long)h * stride_ch + 4 * lane;
        *reinterpret_cast<uint2*>(kc + o) = k_new;
        *reinterpret_cast<uint2*>(vc + o) = v_new;
      }
    }
  } else if (owner) {  // the newest row, stored by a kernel before this one
    const long long o = row_of(c, newest, lane);
    k_new = *reinterpret_cast<const uint2*>(kc + o);
    v_new = *reinterpret_cast<const uint2*>(vc + o);
  }
  float4 qf = widen(qraw);
  qf.x *= scale_log2e, qf.y *= scale_log2e, qf.z *= scale_log2e, qf.w *= scale_log2e;
  float s_new = 0.f;  // the newest key's score (its warp's), summed before the chunks so that its shuffles overlap them
  if (owner) {
    const float4 kf = widen(k_new);
    s_new = qf.x * kf.x + qf.y * kf.y + qf.z * kf.z + qf.w * kf.w;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) s_new += __shfl_xor_sync(0xffffffffu, s_new, off);
  }
  float m = kNegBig, l = 0.f;
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
  for (int cb = c0; cb < c1; cb += kDepth) {
#pragma unroll
    for (int i = 0; i < kDepth; ++i) {
      const int cc = cb + i;
      if (cc >= c1) break;
      softmax_step(buf[i], qf, cc * kChunkKeys + warp * kKeys, newest, m, l, acc);
      if (cc + kDepth < c1) load_rows(buf[i], c, (cc + kDepth) * kChunkKeys + warp * kKeys, newest, lane);
    }
  }
  if (owner) {  // the newest key into the warp's online softmax
    const float mx = fmaxf(m, s_new), alpha = exp2f(m - mx), p = exp2f(s_new - mx);
    const float4 v = widen(v_new);
    l = l * alpha + p;
    acc.x = acc.x * alpha + p * v.x, acc.y = acc.y * alpha + p * v.y;
    acc.z = acc.z * alpha + p * v.z, acc.w = acc.w * alpha + p * v.w;
    m = mx;
  }

  // the block's partial: its warps merged (in warp order), then read by rank 0 over distributed shared memory
  __shared__ float wm[kWarps], wl[kWarps];
  __shared__ __align__(16) float wacc[kWarps][kDim];  // float4 stores
  __shared__ float part[2 + kDim];  // (max, sum, acc[kDim]) of this block
  if (lane == 0) wm[warp] = m, wl[warp] = l;
  *reinterpret_cast<float4*>(&wacc[warp][4 * lane]) = acc;
  __syncthreads();
  const int d = threadIdx.x;  // kWarps * 32 == kDim: one dim a thread
  float mw[kWarps], lw[kWarps], aw[kWarps];
#pragma unroll
  for (int w = 0; w < kWarps; ++w) mw[w] = wm[w], lw[w] = wl[w], aw[w] = wacc[w][d];
  const float3 blk = lse_merge<kWarps>(mw, lw, aw);
  part[2 + d] = blk.z;
  if (d == 0) part[0] = blk.x, part[1] = blk.y;
  cluster.sync();
  if (cluster.block_rank() == 0) {
    float ms[kSplits], ls[kSplits], as[kSplits];
#pragma unroll
    for (int s = 0; s < kSplits; ++s) {
      const float* p = cluster.map_shared_rank(part, s);
      ms[s] = p[0], ls[s] = p[1], as[s] = p[2 + d];
    }
    const float3 all = lse_merge<kSplits>(ms, ls, as);
    const float ll = all.y, aa = all.z;
    out[(size_t)b * stride_ot + (size_t)h * stride_oh + d] = __float2bfloat16_rn(aa / fmaxf(ll, 1e-30f));
  }
  cluster.sync();  // no block leaves while rank 0 reads its shared memory
}

}  // namespace

// q [B, H, 128] bf16 (unit stride on the last dim), caches [blocks, block_size, H, 128] bf16, tables [B, width] int32,
// lens [B] int32, out [B, H, 128] bf16; block_size = 1 << block_shift. pdl: a PDL launch. k != null: kRope, with k, v
// [B, H, 128] bf16 (unit stride on the last dim), cos / sin [B, 64] fp32 (unit stride), logn [B] fp32 or null, slots
// [B] int64: q, k and v are the raw rows, rotated here, and the new k and v stored into the cache here.
extern "C" int paged_decode_bf16(const void* q, void* kc, void* vc, const void* tables, const void* lens, void* out,
                                 float scale_log2e, int B, int H, int stride_qt, int stride_qh, long long stride_cb,
                                 long long stride_cr, long long stride_ch, int stride_tb, int stride_ot, int stride_oh,
                                 int block_shift, int pdl, void* stream, const void* k, const void* v, int stride_kt,
                                 int stride_kh, int stride_vt, int stride_vh, const void* cos, const void* sin,
                                 int stride_cos, int stride_sin, const void* logn, const void* slots, int splits,
                                 int depth) {
  if (B < 0 || H < 1 || block_shift < 0 || block_shift > 16) return static_cast<int>(cudaErrorInvalidValue);
  if (k != nullptr && (v == nullptr || cos == nullptr || sin == nullptr || slots == nullptr))
    return static_cast<int>(cudaErrorInvalidValue);
  const int form = splits == 8 && depth == 2 ? 0 : splits == 4 && depth == 2 ? 1 : splits == 4 && depth == 3 ? 2
                 : splits == 4 && depth == 4 ? 3 : -1;
  if (form < 0) return static_cast<int>(cudaErrorInvalidValue);
  if (B == 0) return static_cast<int>(cudaSuccess);
  cudaLaunchConfig_t config = {};
  cudaLaunchAttribute attr[2];
  config.gridDim = dim3(splits, H, B);
  config.blockDim = dim3(kWarps * 32);
  config.stream = static_cast<cudaStream_t>(stream);
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = splits;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  attr[1].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[1].val.programmaticStreamSerializationAllowed = 1;
  config.attrs = attr;
  config.numAttrs = pdl ? 2 : 1;
  const RopeArgs rope{static_cast<const __nv_bfloat16*>(k), static_cast<const __nv_bfloat16*>(v),
                      static_cast<const float*>(cos), static_cast<const float*>(sin), static_cast<const float*>(logn),
                      static_cast<const long long*>(slots), stride_kt, stride_kh, stride_vt, stride_vh, stride_cos,
                      stride_sin};
  using Kernel = void (*)(const __nv_bfloat16*, __nv_bfloat16*, __nv_bfloat16*, const int*, const int*,
                          __nv_bfloat16*, float, int, int, long long, long long, long long, int, int, int, int,
                          RopeArgs);
  const Kernel forms[2][4] = {
      {paged_decode_kernel<false, 8, 2>, paged_decode_kernel<false, 4, 2>, paged_decode_kernel<false, 4, 3>,
       paged_decode_kernel<false, 4, 4>},
      {paged_decode_kernel<true, 8, 2>, paged_decode_kernel<true, 4, 2>, paged_decode_kernel<true, 4, 3>,
       paged_decode_kernel<true, 4, 4>}};
  const Kernel kernel = forms[k != nullptr][form];
  return static_cast<int>(cudaLaunchKernelEx(
      &config, kernel, static_cast<const __nv_bfloat16*>(q), static_cast<__nv_bfloat16*>(kc),
      static_cast<__nv_bfloat16*>(vc), static_cast<const int*>(tables), static_cast<const int*>(lens),
      static_cast<__nv_bfloat16*>(out), scale_log2e, stride_qt, stride_qh, stride_cb, stride_cr, stride_ch, stride_tb,
      stride_ot, stride_oh, block_shift, rope));
}

extern "C" const char* paged_decode_error(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }
