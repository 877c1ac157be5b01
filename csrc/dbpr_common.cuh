// Device helpers shared by the DBPR kernels (dbpr.cu: forward and backward;
// dbpr_step.cu: the fused training steps).  Internal linkage: each kernel file
// gets its own copy.
#pragma once

#include "cuda_compat.h"
#include "guider_fast_cuda.h"

namespace guider_fast {
namespace cuda {
namespace {

constexpr int kWarp = 32;
constexpr unsigned kFull = 0xffffffffu;
// Warps (triplets, or sorted runs) per block of the one-warp-per-item kernels.
constexpr int kWarps = 8;
constexpr int kThreads = kWarps * kWarp;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// Round-to-nearest-even stores of a float32 value into a table of each dtype.
__device__ __forceinline__ void store_float(float* p, float x) { *p = x; }
__device__ __forceinline__ void store_float(__half* p, float x) { *p = __float2half_rn(x); }
__device__ __forceinline__ void store_float(__nv_bfloat16* p, float x) { *p = __float2bfloat16_rn(x); }

__device__ __forceinline__ float load_weight(const void* w, int dtype, int64_t at) {
  switch (dtype) {
    case 1: return __half2float(static_cast<const __half*>(w)[at]);
    case 2: return __bfloat162float(static_cast<const __nv_bfloat16*>(w)[at]);
    default: return static_cast<const float*>(w)[at];
  }
}

__device__ __forceinline__ float warp_sum(float x) {
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) x = __fadd_rn(x, __shfl_xor_sync(kFull, x, offset));
  return x;
}

// (logsigmoid(x), sigmoid(-x)) without overflow for any finite x.
__device__ __forceinline__ void logsigmoid_and_sigmoid_neg(float x, float* log_sig, float* sig_neg) {
  const float e = expf(-fabsf(x));
  const float one_plus = __fadd_rn(1.0f, e);
  *log_sig = __fsub_rn(fminf(x, 0.0f), log1pf(e));
  *sig_neg = x >= 0.0f ? __fdiv_rn(e, one_plus) : __fdiv_rn(1.0f, one_plus);
}

// Negative k of a triplet from the lanes' partial dots un = u.n, nn = n.n: returns
// margin = pos_score - <u, n>; adds |n|^2 to *squares and logsigmoid(margin),
// sigmoid(-margin) (also returned in *sig_neg) to the running sums.
__device__ __forceinline__ float score_negative(float pos_score, float un, float nn, float* squares,
                                                float* log_sig_sum, float* sig_sum, float* sig_neg) {
  const float margin = __fsub_rn(pos_score, warp_sum(un));
  *squares = __fadd_rn(*squares, warp_sum(nn));
  float log_sig;
  logsigmoid_and_sigmoid_neg(margin, &log_sig, sig_neg);
  *log_sig_sum = __fadd_rn(*log_sig_sum, log_sig);
  *sig_sum = __fadd_rn(*sig_sum, *sig_neg);
  return margin;
}

inline bool valid_dtype(DType d) { return d == DType::Float32 || d == DType::Float16 || d == DType::BFloat16; }

}  // namespace
}  // namespace cuda
}  // namespace guider_fast
