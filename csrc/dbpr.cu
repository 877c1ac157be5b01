// DBPR forward and backward kernels (the CUDA twins of kernels/dbpr.py's
// _dbpr_forward_kernel and of _dbpr_scatter_kernel's atomic mode).
//
// One warp per triplet, kWarps triplets per block.  The lanes stride over the
// D features; each dot product is a per-lane FMA chain reduced by a fixed
// xor-shuffle tree, so the result does not depend on thread scheduling.  The
// user row is re-read per negative (an L1 hit) instead of kept in registers:
// no compile-time bound on D.  Sums use explicitly rounded intrinsics (no FMA
// contraction by nvcc); expf/log1pf are CUDA's libm on the GPU and the host's
// in the sim (a few ulp apart: see csrc/README.md).
#include "dbpr_common.cuh"

namespace guider_fast {
namespace cuda {
namespace {

template <typename T>
__global__ void __launch_bounds__(kThreads)
    dbpr_forward_kernel(const T* __restrict__ user, int64_t u_sr, int64_t u_sc, const T* __restrict__ item,
                        int64_t i_sr, int64_t i_sc, const int64_t* __restrict__ users,
                        const int64_t* __restrict__ pos_items, const int64_t* __restrict__ neg_items, int64_t n_sr,
                        int64_t n_sc, const void* __restrict__ weights, int weights_dtype, int64_t w_stride,
                        int64_t batch, int64_t k_neg, int64_t dim, float scale, float l2, float* __restrict__ rows,
                        float* __restrict__ coef, float* __restrict__ log_sig_out, float* __restrict__ margins) {
  const int lane = threadIdx.x % kWarp;
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / kWarp;
  if (b >= batch) return;  // warp-uniform; the kernel has no barrier
  const T* u = user + users[b] * u_sr;
  const T* p = item + pos_items[b] * i_sr;
  float up = 0.0f, uu = 0.0f, pp = 0.0f;
  for (int64_t d = lane; d < dim; d += kWarp) {
    const float x = to_float(u[d * u_sc]), y = to_float(p[d * i_sc]);
    up = __fmaf_rn(x, y, up);
    uu = __fmaf_rn(x, x, uu);
    pp = __fmaf_rn(y, y, pp);
  }
  const float pos_score = warp_sum(up);
  float squares = __fadd_rn(warp_sum(uu), warp_sum(pp));
  const float w = weights ? load_weight(weights, weights_dtype, b * w_stride) : 1.0f;
  const float c = __fmul_rn(w, __fdiv_rn(scale, static_cast<float>(k_neg)));
  float log_sig_sum = 0.0f, sig_sum = 0.0f;
  for (int64_t k = 0; k < k_neg; ++k) {
    const T* n = item + neg_items[b * n_sr + k * n_sc] * i_sr;
    float un = 0.0f, nn = 0.0f;
    for (int64_t d = lane; d < dim; d += kWarp) {
      const float x = to_float(u[d * u_sc]), y = to_float(n[d * i_sc]);
      un = __fmaf_rn(x, y, un);
      nn = __fmaf_rn(y, y, nn);
    }
    float sig_neg;
    const float margin = score_negative(pos_score, un, nn, &squares, &log_sig_sum, &sig_sum, &sig_neg);
    if (lane == 0) {
      if (margins) margins[b * k_neg + k] = margin;
      coef[b * (k_neg + 1) + 1 + k] = __fmul_rn(c, sig_neg);
    }
  }
  if (lane == 0) {
    const float mean = __fdiv_rn(log_sig_sum, static_cast<float>(k_neg));
    coef[b * (k_neg + 1)] = __fmul_rn(-c, sig_sum);
    log_sig_out[b] = mean;
    rows[b] = __fadd_rn(__fmul_rn(-w, mean), __fmul_rn(__fmul_rn(0.5f, l2), squares));
  }
}

// Backward (kernels/dbpr.py's _dbpr_scatter_kernel, atomic mode): with
// g_bj = coef[b, j] * grad_rows[b], j = 0 the positive and j = 1 + k the negatives,
//   grad_item[pos_b]  += g_b0 u_b,   grad_item[n_bk] += g_b(1+k) u_b,
//   grad_user[user_b] += g_b0 p_b + sum_k g_b(1+k) n_bk   (one atomic per feature).
// One warp per triplet, the lanes over D (the d loop is outer: no bound on D).
// Relaxed float atomics into dense float32 (rows, D) row-major gradients: the
// sums of duplicate rows depend on the order the atomics land in.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    dbpr_backward_kernel(const T* __restrict__ user, int64_t u_sr, int64_t u_sc, const T* __restrict__ item,
                         int64_t i_sr, int64_t i_sc, const int64_t* __restrict__ users,
                         const int64_t* __restrict__ pos_items, const int64_t* __restrict__ neg_items, int64_t n_sr,
                         int64_t n_sc, const float* __restrict__ coef, const float* __restrict__ grad_rows,
                         int64_t g_stride, int64_t batch, int64_t k_neg, int64_t dim, float* __restrict__ grad_user,
                         float* __restrict__ grad_item) {
  const int lane = threadIdx.x % kWarp;
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / kWarp;
  if (b >= batch) return;  // warp-uniform; no collectives below
  const float grad = grad_rows[b * g_stride];
  const float* c = coef + b * (k_neg + 1);
  const int64_t pos = pos_items[b];
  const T* u = user + users[b] * u_sr;
  const T* p = item + pos * i_sr;
  float* gu = grad_user + users[b] * dim;
  const float g0 = __fmul_rn(c[0], grad);
  for (int64_t d = lane; d < dim; d += kWarp) {
    const float ud = to_float(u[d * u_sc]);
    float du = __fmul_rn(g0, to_float(p[d * i_sc]));
    atomicAdd(grad_item + pos * dim + d, __fmul_rn(g0, ud));
    for (int64_t k = 0; k < k_neg; ++k) {
      const int64_t neg = neg_items[b * n_sr + k * n_sc];
      const float gk = __fmul_rn(c[1 + k], grad);
      du = __fmaf_rn(gk, to_float(item[neg * i_sr + d * i_sc]), du);
      atomicAdd(grad_item + neg * dim + d, __fmul_rn(gk, ud));
    }
    atomicAdd(gu + d, du);
  }
}

template <typename T>
cudaError_t launch_backward(const MatrixView& ut, const MatrixView& it, const int64_t* users, const int64_t* pos,
                            const int64_t* neg, int64_t n_sr, int64_t n_sc, const float* coef,
                            const float* grad_rows, int64_t g_stride, int64_t batch, int64_t k_neg, int64_t dim,
                            float* grad_user, float* grad_item, cudaStream_t stream) {
  auto kernel = &dbpr_backward_kernel<T>;
  const unsigned grid = static_cast<unsigned>((batch + kWarps - 1) / kWarps);
  GF_LAUNCH(kernel, dim3(grid), dim3(kThreads), 0, stream)
  (static_cast<const T*>(ut.data), ut.stride_row, ut.stride_col, static_cast<const T*>(it.data), it.stride_row,
   it.stride_col, users, pos, neg, n_sr, n_sc, coef, grad_rows, g_stride, batch, k_neg, dim, grad_user, grad_item);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch(const MatrixView& ut, const MatrixView& it, const int64_t* users, const int64_t* pos,
                   const int64_t* neg, int64_t n_sr, int64_t n_sc, const void* weights, DType wd, int64_t w_stride,
                   int64_t batch, int64_t k_neg, int64_t dim, float scale, float l2, const DbprForwardOutputs& out,
                   cudaStream_t stream) {
  auto kernel = &dbpr_forward_kernel<T>;
  const unsigned grid = static_cast<unsigned>((batch + kWarps - 1) / kWarps);
  GF_LAUNCH(kernel, dim3(grid), dim3(kThreads), 0, stream)
  (static_cast<const T*>(ut.data), ut.stride_row, ut.stride_col, static_cast<const T*>(it.data), it.stride_row,
   it.stride_col, users, pos, neg, n_sr, n_sc, weights, static_cast<int>(wd), w_stride, batch, k_neg, dim, scale, l2,
   out.rows, out.coef, out.log_sig, out.margins);
  return cudaGetLastError();
}

}  // namespace

cudaError_t dbpr_backward(MatrixView user_table, MatrixView item_table, const int64_t* users,
                          const int64_t* pos_items, const int64_t* neg_items, int64_t neg_stride_row,
                          int64_t neg_stride_col, const float* coef, const float* grad_rows, int64_t grad_stride,
                          int64_t batch, int64_t k_neg, int64_t dim, float* grad_user, float* grad_item,
                          cudaStream_t stream) {
  if (batch < 1 || k_neg < 1 || dim < 0 || !users || !pos_items || !neg_items || !coef || !grad_rows ||
      (dim > 0 && (!user_table.data || !item_table.data || !grad_user || !grad_item)) ||
      !valid_dtype(user_table.dtype) || item_table.dtype != user_table.dtype ||
      (batch + kWarps - 1) / kWarps > 2147483647) {
    return cudaErrorInvalidValue;
  }
  if (dim == 0) return cudaSuccess;  // nothing to add
  switch (user_table.dtype) {
    case DType::Float32:
      return launch_backward<float>(user_table, item_table, users, pos_items, neg_items, neg_stride_row,
                                    neg_stride_col, coef, grad_rows, grad_stride, batch, k_neg, dim, grad_user,
                                    grad_item, stream);
    case DType::Float16:
      return launch_backward<__half>(user_table, item_table, users, pos_items, neg_items, neg_stride_row,
                                     neg_stride_col, coef, grad_rows, grad_stride, batch, k_neg, dim, grad_user,
                                     grad_item, stream);
    case DType::BFloat16:
      return launch_backward<__nv_bfloat16>(user_table, item_table, users, pos_items, neg_items, neg_stride_row,
                                            neg_stride_col, coef, grad_rows, grad_stride, batch, k_neg, dim,
                                            grad_user, grad_item, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t dbpr_forward(MatrixView user_table, MatrixView item_table, const int64_t* users,
                         const int64_t* pos_items, const int64_t* neg_items, int64_t neg_stride_row,
                         int64_t neg_stride_col, const void* weights, DType weights_dtype, int64_t weights_stride,
                         int64_t batch, int64_t k_neg, int64_t dim, float scale, float l2,
                         const DbprForwardOutputs& out, cudaStream_t stream) {
  if (batch < 1 || k_neg < 1 || dim < 0 || !users || !pos_items || !neg_items || !out.rows || !out.coef ||
      !out.log_sig || (dim > 0 && (!user_table.data || !item_table.data)) || !valid_dtype(user_table.dtype) ||
      item_table.dtype != user_table.dtype || (weights && !valid_dtype(weights_dtype)) ||
      (batch + kWarps - 1) / kWarps > 2147483647) {
    return cudaErrorInvalidValue;
  }
  switch (user_table.dtype) {
    case DType::Float32:
      return launch<float>(user_table, item_table, users, pos_items, neg_items, neg_stride_row, neg_stride_col,
                           weights, weights_dtype, weights_stride, batch, k_neg, dim, scale, l2, out, stream);
    case DType::Float16:
      return launch<__half>(user_table, item_table, users, pos_items, neg_items, neg_stride_row, neg_stride_col,
                            weights, weights_dtype, weights_stride, batch, k_neg, dim, scale, l2, out, stream);
    case DType::BFloat16:
      return launch<__nv_bfloat16>(user_table, item_table, users, pos_items, neg_items, neg_stride_row,
                                   neg_stride_col, weights, weights_dtype, weights_stride, batch, k_neg, dim, scale,
                                   l2, out, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace guider_fast
