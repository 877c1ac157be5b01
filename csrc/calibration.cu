// AMSC calibration kernels (the CUDA twin of kernels/calibration.py).
//
// Two launches, no host sync:
//   1. rows (or cached) kernel: one warp per row, kRowsPerBlock rows per block;
//      writes each row's distance and clean-row weight candidate, and the
//      block's distance min and max (partials).
//   2. finish kernel: every block reduces all partials (a few KiB), then writes
//      normalized, clean and weights for its rows (grid-stride).
// All float math is float32 with explicitly rounded intrinsics (__fmaf_rn,
// __fadd_rn, __fmul_rn, __fdiv_rn, __fsqrt_rn), so nvcc's FMA contraction
// and fast-math flags cannot change a bit: the sim build computes the same values.
#include "cuda_compat.h"
#include "constants.h"
#include "guider_fast_cuda.h"

namespace guider_fast {
namespace cuda {
namespace {

constexpr int kWarp = 32;
constexpr unsigned kFull = 0xffffffffu;
constexpr int kRowsWarps = 8;                      // warps per block of the row kernels
constexpr int kRowsThreads = kRowsWarps * kWarp;   // 256
constexpr int kRowsPerWarp = 4;
constexpr int kRowsPerBlock = kRowsWarps * kRowsPerWarp;  // 32 rows: one min/max partial each
constexpr int kFinishThreads = 256;
constexpr int kFinishMaxBlocks = 160;  // > SM count: every block re-reads all partials

constexpr float kImageOffset = static_cast<float>(constants::CALIBRATION_IMAGE_OFFSET);
constexpr float kMinmaxEps = static_cast<float>(constants::CALIBRATION_MINMAX_EPS);
constexpr float kSqrtFloor = static_cast<float>(constants::GEOMLOSS_SQRT_FLOOR);

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ float load(const T* __restrict__ p, int64_t row, int64_t col, int64_t stride_row,
                                      int64_t stride_col) {
  return to_float(p[row * stride_row + col * stride_col]);
}

__device__ __forceinline__ int sign_of(float x) { return (x > 0.0f) - (x < 0.0f); }

__device__ __forceinline__ float warp_sum(float x) {
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) x = __fadd_rn(x, __shfl_xor_sync(kFull, x, offset));
  return x;
}

// GeomLoss's p=1 cost from the expanded square: sqrt(max((xx - 2 xy) + yy, floor)).
__device__ __forceinline__ float geomloss_p1(float xx, float xy, float yy) {
  const float sq = __fadd_rn(__fadd_rn(xx, __fmul_rn(-2.0f, xy)), yy);
  return __fsqrt_rn(fmaxf(sq, kSqrtFloor));
}

// clamp(((s_t + 1)/2 + (s_v + 1)/2)/2, 0, 1), in the reference's operation order.
__device__ __forceinline__ float clean_weight(int score_t, int score_v, int64_t bits) {
  const float nbits = static_cast<float>(bits);
  const float s_t = __fdiv_rn(static_cast<float>(score_t), nbits);
  const float s_v = __fdiv_rn(static_cast<float>(score_v), nbits);
  const float w = __fdiv_rn(__fadd_rn(__fdiv_rn(__fadd_rn(s_t, 1.0f), 2.0f), __fdiv_rn(__fadd_rn(s_v, 1.0f), 2.0f)),
                            2.0f);
  return fminf(fmaxf(w, 0.0f), 1.0f);
}

// The block's min and max of its rows' distances -> partials[block], partials[n_blocks + block].
// Every thread of the block must call it (it holds a barrier); s_lo, s_hi: the
// kernel's kRowsWarps-float __shared__ arrays (declared in the kernel itself, so
// the sim accounts them to it).
// One row's distance and candidate weight (lane 0 writes), folded into the warp's min/max.
__device__ __forceinline__ void finish_row(int lane, int64_t row, float d, int score_t, int score_v,
                                           int64_t bits, float* __restrict__ distance,
                                           float* __restrict__ candidate, float& lo, float& hi) {
  if (lane == 0) {
    distance[row] = d;
    candidate[row] = clean_weight(score_t, score_v, bits);
  }
  lo = fminf(lo, d);
  hi = fmaxf(hi, d);
}

__device__ __forceinline__ void store_partials(float lo, float hi, float* s_lo, float* s_hi,
                                               float* __restrict__ partials, int64_t n_blocks) {
  const int warp = threadIdx.x / kWarp;
  if (threadIdx.x % kWarp == 0) {
    s_lo[warp] = lo;
    s_hi[warp] = hi;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kRowsWarps; ++w) {
      lo = fminf(lo, s_lo[w]);
      hi = fmaxf(hi, s_hi[w]);
    }
    partials[blockIdx.x] = fminf(lo, s_lo[0]);
    partials[n_blocks + blockIdx.x] = fmaxf(hi, s_hi[0]);
  }
}

template <typename TF, typename TC>
__global__ void __launch_bounds__(kRowsThreads)
    calibration_rows_kernel(const TF* __restrict__ t, int64_t t_sr, int64_t t_sc, const TF* __restrict__ v,
                            int64_t v_sr, int64_t v_sc, const TC* __restrict__ uc, int64_t uc_sr, int64_t uc_sc,
                            const TC* __restrict__ tc, int64_t tc_sr, int64_t tc_sc, const TC* __restrict__ vc,
                            int64_t vc_sr, int64_t vc_sc, int64_t batch, int64_t dim, int64_t bits, int euclidean,
                            float* __restrict__ distance, float* __restrict__ candidate, float* __restrict__ partials,
                            int64_t n_blocks) {
  __shared__ float s_lo[kRowsWarps];
  __shared__ float s_hi[kRowsWarps];
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  float lo = INFINITY, hi = -INFINITY;
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + r * kRowsWarps + warp;
    if (row >= batch) break;  // warp-uniform
    float d;
    if (euclidean) {
      float acc = 0.0f;
      for (int64_t k = lane; k < dim; k += kWarp) {
        const float diff = __fsub_rn(load(t, row, k, t_sr, t_sc), load(v, row, k, v_sr, v_sc));
        acc = __fmaf_rn(diff, diff, acc);
      }
      d = __fsqrt_rn(warp_sum(acc));
    } else {
      float tt = 0.0f, vv = 0.0f, tv = 0.0f;
      for (int64_t k = lane; k < dim; k += kWarp) {
        const float a = load(t, row, k, t_sr, t_sc);
        const float b = __fadd_rn(load(v, row, k, v_sr, v_sc), kImageOffset);
        tt = __fmaf_rn(a, a, tt);
        vv = __fmaf_rn(b, b, vv);
        tv = __fmaf_rn(a, b, tv);
      }
      tt = warp_sum(tt);
      vv = warp_sum(vv);
      tv = warp_sum(tv);
      // Debiased one-point divergence; C(t, v') = C(v', t): one dot product serves both.
      const float self = __fadd_rn(geomloss_p1(tt, tt, tt), geomloss_p1(vv, vv, vv));
      d = __fsub_rn(geomloss_p1(tt, tv, vv), __fdiv_rn(self, 2.0f));
    }
    int score_t = 0, score_v = 0;
    for (int64_t base = 0; base < bits; base += kWarp) {
      const int64_t j = base + lane;
      int su = 0, st = 0, sv = 0;
      if (j < bits) {
        su = sign_of(load(uc, row, j, uc_sr, uc_sc));
        st = sign_of(load(tc, row, j, tc_sr, tc_sc));
        sv = sign_of(load(vc, row, j, vc_sr, vc_sc));
      }
      score_t += __popc(__ballot_sync(kFull, su * st > 0)) - __popc(__ballot_sync(kFull, su * st < 0));
      score_v += __popc(__ballot_sync(kFull, su * sv > 0)) - __popc(__ballot_sync(kFull, su * sv < 0));
    }
    finish_row(lane, row, d, score_t, score_v, bits, distance, candidate, lo, hi);
  }
  store_partials(lo, hi, s_lo, s_hi, partials, n_blocks);
}

template <typename TC>
__global__ void __launch_bounds__(kRowsThreads)
    calibration_cached_kernel(const int64_t* __restrict__ items, const float* __restrict__ item_distance,
                              const TC* __restrict__ uc, int64_t uc_sr, int64_t uc_sc,
                              const unsigned long long* __restrict__ text_sign,
                              const unsigned long long* __restrict__ text_nonzero,
                              const unsigned long long* __restrict__ image_sign,
                              const unsigned long long* __restrict__ image_nonzero, int64_t words, int64_t batch,
                              int64_t bits, float* __restrict__ distance, float* __restrict__ candidate,
                              float* __restrict__ partials, int64_t n_blocks) {
  __shared__ float s_lo[kRowsWarps];
  __shared__ float s_hi[kRowsWarps];
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  float lo = INFINITY, hi = -INFINITY;
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + r * kRowsWarps + warp;
    if (row >= batch) break;  // warp-uniform
    const int64_t item = items[row];
    const float d = item_distance[item];
    int score_t = 0, score_v = 0;
    for (int64_t w = 0; w < words; ++w) {
      // The user's 64 codes of word w: lane l holds bits l and l + 32.
      const int64_t j_lo = w * 64 + lane, j_hi = j_lo + kWarp;
      const float c_lo = j_lo < bits ? load(uc, row, j_lo, uc_sr, uc_sc) : 0.0f;
      const float c_hi = j_hi < bits ? load(uc, row, j_hi, uc_sr, uc_sc) : 0.0f;
      const unsigned long long user_sign =
          static_cast<unsigned long long>(__ballot_sync(kFull, c_lo < 0.0f)) |
          (static_cast<unsigned long long>(__ballot_sync(kFull, c_hi < 0.0f)) << 32);
      const unsigned long long user_nonzero =
          static_cast<unsigned long long>(__ballot_sync(kFull, c_lo != 0.0f)) |
          (static_cast<unsigned long long>(__ballot_sync(kFull, c_hi != 0.0f)) << 32);
      const int64_t at = item * words + w;
      const unsigned long long both_t = user_nonzero & text_nonzero[at];
      const unsigned long long both_v = user_nonzero & image_nonzero[at];
      score_t += __popcll(both_t) - 2 * __popcll((user_sign ^ text_sign[at]) & both_t);
      score_v += __popcll(both_v) - 2 * __popcll((user_sign ^ image_sign[at]) & both_v);
    }
    finish_row(lane, row, d, score_t, score_v, bits, distance, candidate, lo, hi);
  }
  store_partials(lo, hi, s_lo, s_hi, partials, n_blocks);
}

__global__ void __launch_bounds__(kFinishThreads)
    calibration_finish_kernel(const float* __restrict__ distance, const float* __restrict__ candidate,
                              const float* __restrict__ partials, int64_t n_blocks, int64_t batch, float threshold,
                              float* __restrict__ normalized, uint8_t* __restrict__ clean,
                              float* __restrict__ weights) {
  __shared__ float s_lo[kFinishThreads / kWarp];
  __shared__ float s_hi[kFinishThreads / kWarp];
  float lo = INFINITY, hi = -INFINITY;
  for (int64_t i = threadIdx.x; i < n_blocks; i += kFinishThreads) {
    lo = fminf(lo, partials[i]);
    hi = fmaxf(hi, partials[n_blocks + i]);
  }
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) {
    lo = fminf(lo, __shfl_xor_sync(kFull, lo, offset));
    hi = fmaxf(hi, __shfl_xor_sync(kFull, hi, offset));
  }
  if (threadIdx.x % kWarp == 0) {
    s_lo[threadIdx.x / kWarp] = lo;
    s_hi[threadIdx.x / kWarp] = hi;
  }
  __syncthreads();
  lo = s_lo[0];
  hi = s_hi[0];
  for (int w = 1; w < kFinishThreads / kWarp; ++w) {
    lo = fminf(lo, s_lo[w]);
    hi = fmaxf(hi, s_hi[w]);
  }
  const float range = __fadd_rn(__fsub_rn(hi, lo), kMinmaxEps);
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kFinishThreads + threadIdx.x; row < batch;
       row += static_cast<int64_t>(gridDim.x) * kFinishThreads) {
    const float n = __fdiv_rn(__fsub_rn(distance[row], lo), range);
    const bool is_clean = n < threshold;
    normalized[row] = n;
    clean[row] = is_clean ? 1 : 0;
    weights[row] = is_clean ? candidate[row] : 1.0f;
  }
}

int64_t row_blocks(int64_t batch) { return (batch + kRowsPerBlock - 1) / kRowsPerBlock; }

bool valid_dtype(DType d) { return d == DType::Float32 || d == DType::Float16 || d == DType::BFloat16; }

cudaError_t finish(const CalibrationOutputs& out, int64_t batch, float threshold, cudaStream_t stream) {
  const int64_t n_blocks = row_blocks(batch);
  const int64_t blocks = (batch + kFinishThreads - 1) / kFinishThreads;
  const unsigned grid = static_cast<unsigned>(blocks < kFinishMaxBlocks ? blocks : kFinishMaxBlocks);
  GF_LAUNCH(calibration_finish_kernel, dim3(grid), dim3(kFinishThreads), 0, stream)
  (out.distance, out.workspace, out.workspace + batch, n_blocks, batch, threshold, out.normalized, out.clean,
   out.weights);
  return cudaGetLastError();
}

template <typename TF, typename TC>
cudaError_t launch_rows(const MatrixView& t, const MatrixView& v, const MatrixView& u, const MatrixView& tc,
                        const MatrixView& vc, int64_t batch, int64_t dim, int64_t bits, bool euclidean,
                        const CalibrationOutputs& out, cudaStream_t stream) {
  const int64_t n_blocks = row_blocks(batch);
  auto kernel = &calibration_rows_kernel<TF, TC>;
  GF_LAUNCH(kernel, dim3(static_cast<unsigned>(n_blocks)), dim3(kRowsThreads), 0, stream)
  (static_cast<const TF*>(t.data), t.stride_row, t.stride_col, static_cast<const TF*>(v.data), v.stride_row,
   v.stride_col, static_cast<const TC*>(u.data), u.stride_row, u.stride_col, static_cast<const TC*>(tc.data),
   tc.stride_row, tc.stride_col, static_cast<const TC*>(vc.data), vc.stride_row, vc.stride_col, batch, dim, bits,
   euclidean ? 1 : 0, out.distance, out.workspace, out.workspace + batch, n_blocks);
  return cudaGetLastError();
}

template <typename TF>
cudaError_t rows_by_code(DType code, const MatrixView& t, const MatrixView& v, const MatrixView& u,
                         const MatrixView& tc, const MatrixView& vc, int64_t batch, int64_t dim, int64_t bits,
                         bool euclidean, const CalibrationOutputs& out, cudaStream_t stream) {
  switch (code) {
    case DType::Float32: return launch_rows<TF, float>(t, v, u, tc, vc, batch, dim, bits, euclidean, out, stream);
    case DType::Float16: return launch_rows<TF, __half>(t, v, u, tc, vc, batch, dim, bits, euclidean, out, stream);
    case DType::BFloat16:
      return launch_rows<TF, __nv_bfloat16>(t, v, u, tc, vc, batch, dim, bits, euclidean, out, stream);
  }
  return cudaErrorInvalidValue;
}

template <typename TC>
cudaError_t launch_cached(const int64_t* items, const float* item_distance, const MatrixView& u,
                          const int64_t* ts, const int64_t* tn, const int64_t* vs, const int64_t* vn, int64_t words,
                          int64_t batch, int64_t bits, const CalibrationOutputs& out, cudaStream_t stream) {
  const int64_t n_blocks = row_blocks(batch);
  using Word = const unsigned long long*;
  auto kernel = &calibration_cached_kernel<TC>;
  GF_LAUNCH(kernel, dim3(static_cast<unsigned>(n_blocks)), dim3(kRowsThreads), 0, stream)
  (items, item_distance, static_cast<const TC*>(u.data), u.stride_row, u.stride_col, reinterpret_cast<Word>(ts),
   reinterpret_cast<Word>(tn), reinterpret_cast<Word>(vs), reinterpret_cast<Word>(vn), words, batch, bits,
   out.distance, out.workspace, out.workspace + batch, n_blocks);
  return cudaGetLastError();
}

bool valid_outputs(const CalibrationOutputs& out) {
  return out.weights && out.clean && out.distance && out.normalized && out.workspace;
}

}  // namespace

int64_t calibration_workspace_floats(int64_t batch) { return batch + 2 * row_blocks(batch); }

cudaError_t calibrate_rows(MatrixView t, MatrixView v, MatrixView u_code, MatrixView t_code, MatrixView v_code,
                           int64_t batch, int64_t dim, int64_t bits, float threshold, bool euclidean,
                           const CalibrationOutputs& out, cudaStream_t stream) {
  if (batch < 1 || dim < 0 || bits < 1 || !valid_outputs(out) || (dim > 0 && (!t.data || !v.data)) ||
      !u_code.data || !t_code.data || !v_code.data || !valid_dtype(t.dtype) || v.dtype != t.dtype ||
      !valid_dtype(u_code.dtype) || t_code.dtype != u_code.dtype || v_code.dtype != u_code.dtype ||
      row_blocks(batch) > 2147483647) {
    return cudaErrorInvalidValue;
  }
  cudaError_t status = cudaErrorInvalidValue;
  switch (t.dtype) {
    case DType::Float32:
      status = rows_by_code<float>(u_code.dtype, t, v, u_code, t_code, v_code, batch, dim, bits, euclidean, out, stream);
      break;
    case DType::Float16:
      status = rows_by_code<__half>(u_code.dtype, t, v, u_code, t_code, v_code, batch, dim, bits, euclidean, out, stream);
      break;
    case DType::BFloat16:
      status = rows_by_code<__nv_bfloat16>(u_code.dtype, t, v, u_code, t_code, v_code, batch, dim, bits, euclidean,
                                           out, stream);
      break;
  }
  if (status != cudaSuccess) return status;
  return finish(out, batch, threshold, stream);
}

cudaError_t calibrate_cached(const int64_t* items, const float* item_distance, MatrixView u_code,
                             const int64_t* text_sign, const int64_t* text_nonzero, const int64_t* image_sign,
                             const int64_t* image_nonzero, int64_t words, int64_t batch, int64_t bits,
                             float threshold, const CalibrationOutputs& out, cudaStream_t stream) {
  if (batch < 1 || bits < 1 || words != (bits + 63) / 64 || !valid_outputs(out) || !items || !item_distance ||
      !u_code.data || !text_sign || !text_nonzero || !image_sign || !image_nonzero || !valid_dtype(u_code.dtype) ||
      row_blocks(batch) > 2147483647) {
    return cudaErrorInvalidValue;
  }
  cudaError_t status = cudaErrorInvalidValue;
  switch (u_code.dtype) {
    case DType::Float32:
      status = launch_cached<float>(items, item_distance, u_code, text_sign, text_nonzero, image_sign, image_nonzero,
                                    words, batch, bits, out, stream);
      break;
    case DType::Float16:
      status = launch_cached<__half>(items, item_distance, u_code, text_sign, text_nonzero, image_sign, image_nonzero,
                                     words, batch, bits, out, stream);
      break;
    case DType::BFloat16:
      status = launch_cached<__nv_bfloat16>(items, item_distance, u_code, text_sign, text_nonzero, image_sign,
                                            image_nonzero, words, batch, bits, out, stream);
      break;
  }
  if (status != cudaSuccess) return status;
  return finish(out, batch, threshold, stream);
}

}  // namespace cuda
}  // namespace guider_fast
