// C entry points over csrc/guider_fast_cuda.h for the pytest side (ctypes), sim build only.
//
// Each returns the cudaError_t of the call, or -1 when the sim reported a
// kernel error (its message is copied into `error`, `error_len` bytes).
#include <cstring>

#include "guider_fast_cuda.h"

namespace gfc = guider_fast::cuda;

namespace {

void copy_message(const char* text, char* error, int error_len) {
  if (error && error_len > 0) {
    std::strncpy(error, text, static_cast<size_t>(error_len) - 1);
    error[error_len - 1] = '\0';
  }
}

template <class F>
int guarded(char* error, int error_len, F&& fn) {
  try {
    const cudaError_t status = fn();
    if (status != cudaSuccess) copy_message(cuda_sim::last_error_message(), error, error_len);
    return static_cast<int>(status);
  } catch (const std::exception& e) {
    copy_message(e.what(), error, error_len);
    return -1;
  }
}

}  // namespace

extern "C" {

void gf_sim_set_order(int order, unsigned long long seed) {
  cuda_sim::set_thread_order(static_cast<cuda_sim::Order>(order), seed);
}

unsigned long long gf_sim_fiber_switches() { return cuda_sim::fiber_switches(); }

long long gf_sim_calibration_workspace_floats(long long batch) { return gfc::calibration_workspace_floats(batch); }

// views: 5 x (data pointer) and strides[10] = (row, col) per matrix in the order t, v, u, tc, vc.
int gf_sim_calibrate_rows(const void* t, const void* v, int feat_dtype, const void* u, const void* tc, const void* vc,
                          int code_dtype, const long long* strides, long long batch, long long dim, long long bits,
                          float threshold, int euclidean, float* weights, unsigned char* clean, float* distance,
                          float* normalized, float* workspace, char* error, int error_len) {
  const auto fd = static_cast<gfc::DType>(feat_dtype), cd = static_cast<gfc::DType>(code_dtype);
  const gfc::MatrixView mt{t, fd, strides[0], strides[1]}, mv{v, fd, strides[2], strides[3]},
      mu{u, cd, strides[4], strides[5]}, mtc{tc, cd, strides[6], strides[7]}, mvc{vc, cd, strides[8], strides[9]};
  const gfc::CalibrationOutputs out{weights, clean, distance, normalized, workspace};
  return guarded(error, error_len, [&] {
    return gfc::calibrate_rows(mt, mv, mu, mtc, mvc, batch, dim, bits, threshold, euclidean != 0, out, nullptr);
  });
}

int gf_sim_calibrate_cached(const long long* items, const float* item_distance, const void* u, int code_dtype,
                            long long u_stride_row, long long u_stride_col, const long long* text_sign,
                            const long long* text_nonzero, const long long* image_sign, const long long* image_nonzero,
                            long long words, long long batch, long long bits, float threshold, float* weights,
                            unsigned char* clean, float* distance, float* normalized, float* workspace, char* error,
                            int error_len) {
  const gfc::MatrixView mu{u, static_cast<gfc::DType>(code_dtype), u_stride_row, u_stride_col};
  const gfc::CalibrationOutputs out{weights, clean, distance, normalized, workspace};
  auto w = [](const long long* p) { return reinterpret_cast<const int64_t*>(p); };
  return guarded(error, error_len, [&] {
    return gfc::calibrate_cached(w(items), item_distance, mu, w(text_sign), w(text_nonzero), w(image_sign),
                                 w(image_nonzero), words, batch, bits, threshold, out, nullptr);
  });
}

// weights may be null (weights_dtype then ignored); margins may be null.
int gf_sim_dbpr_forward(const void* user_table, long long u_stride_row, long long u_stride_col, const void* item_table,
                        long long i_stride_row, long long i_stride_col, int table_dtype, const long long* users,
                        const long long* pos_items, const long long* neg_items, long long neg_stride_row,
                        long long neg_stride_col, const void* weights, int weights_dtype, long long weights_stride,
                        long long batch, long long k_neg, long long dim, float scale, float l2, float* rows,
                        float* coef, float* log_sig, float* margins, char* error, int error_len) {
  const auto td = static_cast<gfc::DType>(table_dtype);
  const gfc::MatrixView ut{user_table, td, u_stride_row, u_stride_col}, it{item_table, td, i_stride_row, i_stride_col};
  const gfc::DbprForwardOutputs out{rows, coef, log_sig, margins};
  auto w = [](const long long* p) { return reinterpret_cast<const int64_t*>(p); };
  return guarded(error, error_len, [&] {
    return gfc::dbpr_forward(ut, it, w(users), w(pos_items), w(neg_items), neg_stride_row, neg_stride_col, weights,
                             static_cast<gfc::DType>(weights_dtype), weights_stride, batch, k_neg, dim, scale, l2,
                             out, nullptr);
  });
}

// grad_user (n_users, dim), grad_item (n_items, dim): float32 row-major, zeroed by the caller.
int gf_sim_dbpr_backward(const void* user_table, long long u_stride_row, long long u_stride_col,
                         const void* item_table, long long i_stride_row, long long i_stride_col, int table_dtype,
                         const long long* users, const long long* pos_items, const long long* neg_items,
                         long long neg_stride_row, long long neg_stride_col, const float* coef,
                         const float* grad_rows, long long grad_stride, long long batch, long long k_neg,
                         long long dim, float* grad_user, float* grad_item, char* error, int error_len) {
  const auto td = static_cast<gfc::DType>(table_dtype);
  const gfc::MatrixView ut{user_table, td, u_stride_row, u_stride_col}, it{item_table, td, i_stride_row, i_stride_col};
  auto w = [](const long long* p) { return reinterpret_cast<const int64_t*>(p); };
  return guarded(error, error_len, [&] {
    return gfc::dbpr_backward(ut, it, w(users), w(pos_items), w(neg_items), neg_stride_row, neg_stride_col, coef,
                              grad_rows, grad_stride, batch, k_neg, dim, grad_user, grad_item, nullptr);
  });
}

// The fused steps, in place on the tables.  keys/orders: the sorted runs (DbprSortedRuns);
// user_acc/item_acc both null for SGD; workspace: gf_sim_dbpr_step_workspace_floats floats.
long long gf_sim_dbpr_step_workspace_floats(long long batch, long long k_neg, long long dim) {
  return gfc::dbpr_step_workspace_floats(batch, k_neg, dim);
}

int gf_sim_dbpr_step(void* user_table, long long u_stride_row, long long u_stride_col, void* item_table,
                     long long i_stride_row, long long i_stride_col, int table_dtype, const long long* users,
                     const long long* pos_items, const long long* neg_items, long long neg_stride_row,
                     long long neg_stride_col, const void* weights, int weights_dtype, long long weights_stride,
                     const long long* user_keys, const long long* user_order, const long long* item_keys,
                     const long long* item_order, float* user_acc, float* item_acc, long long batch,
                     long long k_neg, long long dim, float lr, float l2, float scale, float* rows, float* margins,
                     float* workspace, char* error, int error_len) {
  const auto td = static_cast<gfc::DType>(table_dtype);
  const gfc::MatrixView ut{user_table, td, u_stride_row, u_stride_col}, it{item_table, td, i_stride_row, i_stride_col};
  auto w = [](const long long* p) { return reinterpret_cast<const int64_t*>(p); };
  const gfc::DbprSortedRuns runs{w(user_keys), w(user_order), w(item_keys), w(item_order)};
  const gfc::DbprStepOutputs out{rows, margins, workspace};
  return guarded(error, error_len, [&] {
    return gfc::dbpr_step(ut, it, w(users), w(pos_items), w(neg_items), neg_stride_row, neg_stride_col, weights,
                          static_cast<gfc::DType>(weights_dtype), weights_stride, runs, user_acc, item_acc, batch,
                          k_neg, dim, lr, l2, scale, out, nullptr);
  });
}

int gf_sim_dbpr_atomic_sgd_step(void* user_table, long long u_stride_row, long long u_stride_col, void* item_table,
                                long long i_stride_row, long long i_stride_col, const long long* users,
                                const long long* pos_items, const long long* neg_items, long long neg_stride_row,
                                long long neg_stride_col, const void* weights, int weights_dtype,
                                long long weights_stride, long long batch, long long k_neg, long long dim, float lr,
                                float l2, float scale, float* rows, float* margins, char* error, int error_len) {
  const gfc::MatrixView ut{user_table, gfc::DType::Float32, u_stride_row, u_stride_col},
      it{item_table, gfc::DType::Float32, i_stride_row, i_stride_col};
  auto w = [](const long long* p) { return reinterpret_cast<const int64_t*>(p); };
  return guarded(error, error_len, [&] {
    return gfc::dbpr_atomic_sgd_step(ut, it, w(users), w(pos_items), w(neg_items), neg_stride_row, neg_stride_col,
                                     weights, static_cast<gfc::DType>(weights_dtype), weights_stride, batch, k_neg,
                                     dim, lr, l2, scale, rows, margins, nullptr);
  });
}

}  // extern "C"
