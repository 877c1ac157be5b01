// guider_fast's CUDA backend: the only interface a binding uses.
//
// Raw device pointers, sizes and a stream; no torch headers.  Every function
// validates its sizes, enqueues its kernels on `stream` and returns the launch
// status (cudaSuccess, or the error of the first failed launch; an invalid
// argument returns cudaErrorInvalidValue and launches nothing).  Nothing is
// read back to the host: the ops can be captured in a CUDA graph.
//
// Under GUIDER_FAST_CUDA_SIM the same functions run on the CPU emulation
// (csrc/sim) and take host pointers.
#pragma once

#include <cstdint>

#ifdef GUIDER_FAST_CUDA_SIM
#include "sim/cuda_sim.h"
#else
#include <cuda_runtime_api.h>
#endif

namespace guider_fast {
namespace cuda {

enum class DType : int32_t { Float32 = 0, Float16 = 1, BFloat16 = 2 };

// A (rows, cols) matrix of `dtype` elements; strides in elements (any sign-free layout).
struct MatrixView {
  const void* data;
  DType dtype;
  int64_t stride_row;
  int64_t stride_col;
};

// ------------------------------------------------------------------ calibration (AMSC)
//
// Semantics of guider_fast.reference.calibration.calibrate for (B, d) rows,
// computed in float32 whatever the input dtype, as the Triton kernels do:
//   distance   "geomloss": C(t, v') - (C(t, t) + C(v', v'))/2 with v' = v + 1e-8 and
//              C(x, y) = sqrt(max((|x|^2 - 2 x.y) + |y|^2, 1e-8)), so C(x, x) is
//              exactly sqrt(1e-8) (GeomLoss's expanded cost leaves cancellation
//              residue there); "euclidean": |t - v|.
//   normalized (distance - min) / ((max - min) + 1e-7) over the batch;
//   clean      normalized < threshold (stored as 0/1 bytes: torch.bool storage);
//   weights    clean ? clamp(((s_t + 1)/2 + (s_v + 1)/2)/2, 0, 1) : 1 with
//              s_x = (sign(u) . sign(x)) / bits, sign(0) = 0 (ternary codes).
// Min and max ignore NaN distances (fminf/fmaxf), the reference propagates them.
struct CalibrationOutputs {
  float* weights;     // (B,)
  uint8_t* clean;     // (B,)
  float* distance;    // (B,)
  float* normalized;  // (B,)
  float* workspace;   // calibration_workspace_floats(B) floats, no initialisation needed
};

// Floats of scratch the calibration launches need for a batch of `batch` rows.
int64_t calibration_workspace_floats(int64_t batch);

// t, v: (batch, dim) features (one dtype); u_code, t_code, v_code: (batch, bits)
// hash-layer outputs (one dtype, any of the three).  batch >= 1, dim >= 0, bits >= 1.
cudaError_t calibrate_rows(MatrixView t, MatrixView v, MatrixView u_code, MatrixView t_code, MatrixView v_code,
                           int64_t batch, int64_t dim, int64_t bits, float threshold, bool euclidean,
                           const CalibrationOutputs& out, cudaStream_t stream);

// Frozen-item cache (guider_fast.calibration.calibrate_items): distance and
// codes of item items[r] gathered from item_distance (n_items,) and packed
// codes (n_items, words) int64 (bit j of word j / 64: code_j < 0 in *_sign,
// code_j != 0 in *_nonzero); u_code (batch, bits) is packed in-kernel.
// words == ceil(bits / 64).  Indices are not range-checked (the caller validates).
cudaError_t calibrate_cached(const int64_t* items, const float* item_distance, MatrixView u_code,
                             const int64_t* text_sign, const int64_t* text_nonzero, const int64_t* image_sign,
                             const int64_t* image_nonzero, int64_t words, int64_t batch, int64_t bits,
                             float threshold, const CalibrationOutputs& out, cudaStream_t stream);

// ------------------------------------------------------------------ DBPR forward
//
// Gather-and-score (the CUDA twin of kernels/dbpr.py's forward): triplet b has
// user row u = user_table[users[b]], positive p = item_table[pos_items[b]] and K
// negatives n_k = item_table[neg_items[b, k]]; margin_bk = <u, p> - <u, n_k>,
// s_bk = sigmoid(-margin_bk), c_b = w_b * scale / K (w = 1 without weights):
//   rows[b]        -w_b * mean_k logsigmoid(margin_bk) + (l2 / 2) (|u|^2 + |p|^2 + sum_k |n_k|^2)
//   coef[b, 0]     -c_b sum_k s_bk        (the score coefficients G, (B, K+1) row-major)
//   coef[b, 1 + k]  c_b s_bk
//   log_sig[b]     mean_k logsigmoid(margin_bk)
//   margins[b, k]  margin_bk              ((B, K) row-major; may be null: not stored)
// float32 math whatever the table dtype (both tables one dtype).  Indices are
// not range-checked (the caller validates).  batch >= 1, k_neg >= 1, dim >= 0.
struct DbprForwardOutputs {
  float* rows;     // (B,)
  float* coef;     // (B, K + 1)
  float* log_sig;  // (B,)
  float* margins;  // (B, K) or null
};

cudaError_t dbpr_forward(MatrixView user_table, MatrixView item_table, const int64_t* users,
                         const int64_t* pos_items, const int64_t* neg_items, int64_t neg_stride_row,
                         int64_t neg_stride_col, const void* weights, DType weights_dtype, int64_t weights_stride,
                         int64_t batch, int64_t k_neg, int64_t dim, float scale, float l2,
                         const DbprForwardOutputs& out, cudaStream_t stream);

// ------------------------------------------------------------------ DBPR backward
//
// Table gradients from dbpr_forward's coefficients G (B, K+1) and the per-triplet
// output gradients grad_rows (B,) (stride grad_stride), atomic scatter as
// kernels/dbpr.py's backward (mode "atomic"): with g_bj = coef[b, j] grad_rows[b],
//   grad_item[pos_items[b]]    += g_b0 u_b
//   grad_item[neg_items[b, k]] += g_b(1+k) u_b
//   grad_user[users[b]]        += g_b0 p_b + sum_k g_b(1+k) n_bk
// grad_user (n_users, dim) and grad_item (n_items, dim): float32, row-major,
// zeroed by the caller (it adds into them).  float32 math, relaxed float
// atomics: duplicate rows' sums vary with the order the atomics land in.
// Indices are not range-checked (the caller validates).  batch >= 1, k_neg >= 1, dim >= 0.
cudaError_t dbpr_backward(MatrixView user_table, MatrixView item_table, const int64_t* users,
                          const int64_t* pos_items, const int64_t* neg_items, int64_t neg_stride_row,
                          int64_t neg_stride_col, const float* coef, const float* grad_rows, int64_t grad_stride,
                          int64_t batch, int64_t k_neg, int64_t dim, float* grad_user, float* grad_item,
                          cudaStream_t stream);

// ------------------------------------------------------------------ DBPR fused training step
//
// kernels/dbpr.py's fused_step (duplicates="sorted") in place: the forward of
// dbpr_forward (scale, l2 as there), then every row of the batch updated once
// with the sum of its occurrences' gradients, all computed from the rows as they
// were before the step (dense autograd followed by the optimizer):
//   grad_user[r] = sum_{b: users[b] = r} (G_b0 p_b + sum_k G_b(1+k) n_bk) + l2 scale count_r u_r
//   grad_item[r] = sum_{occurrences o of r} G_o u_b(o)                     + l2 scale count_r i_r
//   SGD:      row -= lr grad
//   Adagrad:  acc[r] += sum_d grad_d^2 / D;  row -= lr (grad / (sqrt(acc[r]) + ADAGRAD_EPS))
// (both accumulators given: row-wise Adagrad; both null: SGD).  Three launches:
// user runs (score, stash each user's summed gradient), item runs (update in place
// from the unchanged user rows), stashed user updates.  One warp per sorted run;
// each sum in sorted-occurrence order with fixed reduction trees: the result
// does not depend on thread scheduling.  float32 math, one rounding per stored row.
//
// The runs are the caller's stable sorts (guider_fast.reference.dbpr_step._sort_rows):
// user_keys (B,) = sort(users), user_order (B,) the triplet of each sorted position;
// item occurrences o < B are triplet o's positive and o = B + b K + k negative k of
// triplet b: item_keys (B (K+1),) = sort(occurrence rows), item_order their o.
// Neither sortedness nor ranges are checked here (the caller validates).
struct DbprSortedRuns {
  const int64_t* user_keys;
  const int64_t* user_order;
  const int64_t* item_keys;
  const int64_t* item_order;
};

struct DbprStepOutputs {
  float* rows;       // (B,) the per-triplet terms (loss = scale * sum)
  float* margins;    // (B, K)
  float* workspace;  // dbpr_step_workspace_floats(B, K, D) floats, no initialisation needed
};

int64_t dbpr_step_workspace_floats(int64_t batch, int64_t k_neg, int64_t dim);

// The tables are written through their views (data is cast to non-const).
// user_acc (n_users,), item_acc (n_items,): float32 row-wise Adagrad sums, or both null.
// batch >= 1, k_neg >= 1, dim >= 0, batch (k_neg + 1) < 2^31.
cudaError_t dbpr_step(MatrixView user_table, MatrixView item_table, const int64_t* users, const int64_t* pos_items,
                      const int64_t* neg_items, int64_t neg_stride_row, int64_t neg_stride_col, const void* weights,
                      DType weights_dtype, int64_t weights_stride, const DbprSortedRuns& runs, float* user_acc,
                      float* item_acc, int64_t batch, int64_t k_neg, int64_t dim, float lr, float l2, float scale,
                      const DbprStepOutputs& out, cudaStream_t stream);

// kernels/dbpr.py's atomic_sgd_step (duplicates="atomic", Hogwild SGD) on float32
// tables: one warp per triplet, the rows and coefficients in registers; every row
// of a block is read before the block adds -lr grad to any with relaxed atomics
// (the decay l2 scale n of a negative re-reads its row, as the Triton kernel does: with l2 != 0
// that plain read races with other warps' atomic adds to a duplicate row; l2 = 0 reads nothing).
// Blocks of up to 32 triplets (16 for strided tables); later blocks may see earlier blocks' updates.
// dim <= kDbprAtomicMaxDim (the registers' bound); rows and margins as dbpr_step's.
constexpr int64_t kDbprAtomicMaxDim = 256;

cudaError_t dbpr_atomic_sgd_step(MatrixView user_table, MatrixView item_table, const int64_t* users,
                                 const int64_t* pos_items, const int64_t* neg_items, int64_t neg_stride_row,
                                 int64_t neg_stride_col, const void* weights, DType weights_dtype,
                                 int64_t weights_stride, int64_t batch, int64_t k_neg, int64_t dim, float lr, float l2,
                                 float scale, float* rows, float* margins, cudaStream_t stream);

}  // namespace cuda
}  // namespace guider_fast
