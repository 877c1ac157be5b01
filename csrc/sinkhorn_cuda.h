// guider_fast's CUDA Sinkhorn for tiny clouds (n, m <= 32): the entry points of
// csrc/sinkhorn.cu, for the binding to include next to guider_fast_cuda.h.
//
// Same conventions as guider_fast_cuda.h: raw device pointers (host pointers
// under GUIDER_FAST_CUDA_SIM), sizes, a stream; validated sizes, enqueued
// kernels, the launch status returned (cudaErrorInvalidValue and nothing
// launched for a bad argument); no host sync, capturable in a CUDA graph.
//
// Inputs are float32 and contiguous: x (B, n, d), y (B, m, d), a (B, n), b (B, m)
// (the binding converts, as the Triton twin's loads do); zero weights are padding.
#pragma once

#include <cstdint>

// cudaError_t and cudaStream_t (the sim's under GUIDER_FAST_CUDA_SIM), as the other ops see them.
#include "guider_fast_cuda.h"

namespace guider_fast {
namespace cuda {

// Largest n and m of sinkhorn_tiny / sinkhorn_tiny_envelope (one warp per problem).
constexpr int64_t kSinkhornTinyMaxPoints = 32;

// Outputs of sinkhorn_tiny, float32 / int32, contiguous, no initialisation needed.
struct SinkhornTinyOutputs {
  float* f;               // (B, n)
  float* g;               // (B, m)
  float* marginal_error;  // (B,)
  int32_t* iterations;    // (B,)
};

// Batched log-domain Sinkhorn, the semantics of kernels/sinkhorn.py::solve_onchip:
//   C_ij = |x_i - y_j|^2 / 2 (p = 2) or |x_i - y_j| (p = 1), from direct differences
//   (the reference centres and expands |x|^2 - 2 x.y + |y|^2; see csrc/README.md);
//   f_i = -eps LSE_j(log b_j + g_j/eps - C_ij/eps), then g_j likewise from f (POT's order),
//   from f = g = 0.  With use_tol, every problem stops on its own at the first
//   iteration it > 0 with it % SINKHORN_CHECK_EVERY == 0 whose L1 row-marginal error
//   sum_i |a_i (exp(min((f_i - f_next_i)/eps, 80)) - 1)| is <= tol (f, g kept from
//   before that step); otherwise after n_iters iterations, the error then taken from
//   one more f-update (not applied).  iterations: the iterations run.
// batch >= 1, 1 <= n, m <= kSinkhornTinyMaxPoints, d >= 1, p in {1, 2}, eps > 0,
// 0 <= n_iters <= INT32_MAX.
cudaError_t sinkhorn_tiny(const float* x, const float* y, const float* a, const float* b, int64_t batch,
                          int64_t n, int64_t m, int64_t d, int p, float eps, int64_t n_iters, bool use_tol,
                          float tol, const SinkhornTinyOutputs& out, cudaStream_t stream);

// The envelope backward of guider_fast.reference.sinkhorn.EnvelopeValue for the same
// sizes: with w_ij = exp(max(log a_i + log b_j + (f_i + g_j - C_ij)/eps, EXP_FLOOR)),
// 0 where a_i = 0 or b_j = 0, and for p = 1 divided by max(C_ij, DISTANCE_FLOOR)
// (0 where C_ij = 0):
//   grad_x_i = scale_b sum_j w_ij (x_i - y_j),   grad_y_j = scale_b sum_i w_ij (y_j - x_i),
// i.e. scale_b sum_j P_ij grad_x C(x_i, y_j) (scale: the (B,) grad of the value).
// grad_x (B, n, d), grad_y (B, m, d): float32, written in full.
cudaError_t sinkhorn_tiny_envelope(const float* x, const float* y, const float* a, const float* b,
                                   const float* f, const float* g, const float* scale, int64_t batch, int64_t n,
                                   int64_t m, int64_t d, int p, float eps, float* grad_x, float* grad_y,
                                   cudaStream_t stream);

}  // namespace cuda
}  // namespace guider_fast
