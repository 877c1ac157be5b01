// guider_fast's CUDA on-chip SamplesLoss (GeomLoss "sinkhorn", n, m <= 256): the entry
// points of csrc/samples_loss.cu, for the binding to include next to guider_fast_cuda.h.
//
// Same conventions as guider_fast_cuda.h: raw device pointers (host pointers under
// GUIDER_FAST_CUDA_SIM), sizes, a stream; validated sizes, enqueued kernels, the launch
// status returned (cudaErrorInvalidValue and nothing launched for a bad argument); no
// host sync.  Launches set cudaFuncAttributeMaxDynamicSharedMemorySize when they need
// more than 48 KiB (a host-side attribute, not a stream operation).
//
// Inputs are float32 and contiguous: x (B, n, d), y (B, m, d), a (B, n), b (B, m)
// (the binding converts, as the Triton twin's loads do); zero weights are padding.
#pragma once

#include <cstdint>

// cudaError_t and cudaStream_t (the sim's under GUIDER_FAST_CUDA_SIM), as the other ops see them.
#include "guider_fast_cuda.h"

namespace guider_fast {
namespace cuda {

// Largest n and m of samples_loss_onchip (one block per problem, one thread per point).
constexpr int64_t kSamplesLossMaxPoints = 256;
// Dynamic shared memory the default plan may use per block: sm_90's opt-in limit
// (227 KiB; the kernel has no static shared memory).  Other GPUs have less (sm_80
// 163 KiB, sm_86/89 99 KiB): plan with their cudaDevAttrMaxSharedMemoryPerBlockOptin.
constexpr int64_t kSamplesLossSharedBudget = 227 * 1024;

// Floats per problem of the packed output: 2 (n + m), 4 (n + m) with debiasing.
constexpr int64_t samples_loss_packed_floats(int64_t n, int64_t m, bool debias) {
  return 2 * (n + m) * (debias ? 2 : 1);
}

// Where the kernel takes its cost entries from (csrc/samples_loss.cu's header says why).
// Rows cached: C(x_i, y_j) for i < rows_xy, C(x_i, x_j) for i < rows_xx, C(y_i, y_j) for
// i < rows_yy sit in shared memory; every other entry is recomputed in each soft-min from
// the points, copied to shared memory (stride d, or d + 1 when d is even: no bank conflicts)
// when stage_points, else read from global memory.  The plan changes no bit of the result.
struct SamplesLossPlan {
  int64_t rows_xy = 0;  // 0..n
  int64_t rows_xx = 0;  // 0..n, 0 without debiasing
  int64_t rows_yy = 0;  // 0..m, 0 without debiasing
  bool stage_points = false;
};

// The default plan within shared_budget_bytes: every cost tile cached if they all fit
// (points then read once from global memory); otherwise the points staged if they fit,
// and the rest of the budget to C(x, y) rows first (each is read twice per update: the
// f- and the g-soft-min), then C(x, x), then C(y, y).  Needs valid sizes (below).
SamplesLossPlan samples_loss_plan(int64_t n, int64_t m, int64_t d, bool debias, int64_t shared_budget_bytes);

// Dynamic shared memory of a launch with this plan (potential double buffers of
// 2 (n + m) floats, x2 with debiasing, plus the staged points and cached rows), or -1
// for invalid sizes or a plan out of range.
int64_t samples_loss_shared_bytes(int64_t n, int64_t m, int64_t d, bool debias, const SamplesLossPlan& plan);

// GeomLoss's SamplesLoss("sinkhorn") potentials (geomloss 0.3.1 sinkhorn_tensorized; the
// semantics of kernels/sinkhorn.py::samples_loss_potentials, the Triton twin), per problem:
//   C(u, v) = |u - v|^2 / 2 (p = 2) or sqrt(max(|u - v|^2, GEOMLOSS_SQRT_FLOOR)) (p = 1),
//     from direct differences sum_k (u_k - v_k)^2 in k order (the twin expands
//     |u|^2 - 2 u.v + |v|^2; see csrc/README.md);
//   log w = log(max(w, FLT_MIN)) for w > 0, GEOMLOSS_LOG_ZERO (-1e5) for w = 0;
//   S_eps(C, h)_i = -eps LSE_j(h_j - C_ij / eps)  (as h_j + (-C_ij) * (1/eps), fma-rounded);
//   at e_0 = eps_list[0]:  f_ba = S(C_xy, log b), g_ab = S(C_yx, log a),
//                          f_aa = S(C_xx, log a), g_bb = S(C_yy, log b)  (debias);
//   for each e in eps_list, from the old values of all four (symmetric, averaged):
//     f_ba <- (f_ba + S_e(C_xy, log b + g_ab / e)) / 2,  g_ab <- (g_ab + S_e(C_yx, log a + f_ba / e)) / 2,
//     f_aa <- (f_aa + S_e(C_xx, log a + f_aa / e)) / 2,  g_bb <- (g_bb + S_e(C_yy, log b + g_bb / e)) / 2;
//   the last extrapolation at e = eps_list[n_eps - 1]:
//     f_new = S_e(C_xy, log b + g_ab / e), g_new = S_e(C_yx, log a + f_ba / e),
//     f_aa_new = S_e(C_xx, log a + f_aa / e), g_bb_new = S_e(C_yy, log b + g_bb / e).
// out (B, samples_loss_packed_floats(n, m, debias)), float32, contiguous, written in full:
//   [f_ba (n), g_ab (m), f_new (n), g_new (m)] and with debias [f_aa (n), g_bb (m),
//   f_aa_new (n), g_bb_new (m)] after them: the twin's layout, consumed by
//   guider_fast/ot.py::_TritonSamplesLossValue (value = sum a (f_new - f_aa_new) + sum b (g_new - g_bb_new)).
// Potentials of zero-weight points are computed too (as the reference does).
// eps_list: device pointer to n_eps float32 values, each > 0 and finite (not checked:
//   reading them would sync; guider_fast.reference.samples_loss.schedule gives such lists).
// batch in [1, 2^31 - 1], 1 <= n, m <= kSamplesLossMaxPoints, 1 <= d <= INT32_MAX, p in {1, 2},
// 1 <= n_eps <= 2^31 - 3.  Uses the default plan with kSamplesLossSharedBudget.
cudaError_t samples_loss_onchip(const float* x, const float* y, const float* a, const float* b,
                                const float* eps_list, int64_t n_eps, int64_t batch, int64_t n, int64_t m, int64_t d,
                                int p, bool debias, float* out, cudaStream_t stream);

// The same with an explicit plan (a device with less shared memory, tuning, and the tests
// that prove every plan gives the same bits).  Invalid plan (rows out of range, more than
// kSamplesLossSharedBudget bytes): cudaErrorInvalidValue, nothing launched.
cudaError_t samples_loss_onchip_planned(const float* x, const float* y, const float* a, const float* b,
                                        const float* eps_list, int64_t n_eps, int64_t batch, int64_t n, int64_t m,
                                        int64_t d, int p, bool debias, const SamplesLossPlan& plan, float* out,
                                        cudaStream_t stream);

}  // namespace cuda
}  // namespace guider_fast
