// Batched Sinkhorn for tiny clouds (n, m <= 32): the CUDA twin of
// kernels/sinkhorn.py::solve_onchip, and its envelope backward.
//
// One warp per problem, kWarps problems per block, no shared memory and no
// block barrier (a warp past the batch returns at once).  Lane l keeps, in
// registers, row l and column l of the (kTile x kTile) cost tile, kTile the
// next of 8, 16, 32 above max(n, m):
//   row[t] = C(x_l, y_t) / eps   (the f-update of row i = l)
//   col[t] = C(x_t, y_l) / eps   (the g-update of column j = l)
// Both from direct differences, sum_k (x_ik - y_jk)^2 in k order, so row[j] of
// lane i and col[i] of lane j are the same bits.  A half-step broadcasts the
// other side's log-weight-plus-potential with kTile warp shuffles and takes each
// log-sum-exp inside its lane (max, then the sum of exp in t order): no
// cross-lane reduction, so the result never depends on thread scheduling; the
// tol test's L1 error is one xor-shuffle tree (every lane gets the same bits,
// so the stop is warp-uniform).  Every iteration runs in this one launch.
//
// The backward rebuilds the plan from f and g: lane l writes grad_x of x_l
// (its row, point by point) and grad_y of y_l (its column); no collective.
#include "cuda_compat.h"
#include "constants.h"
#include "sinkhorn_cuda.h"

namespace guider_fast {
namespace cuda {
namespace {

constexpr int kWarp = 32;
constexpr unsigned kFull = 0xffffffffu;
constexpr int kWarps = 4;  // problems per block
constexpr int kThreads = kWarps * kWarp;
constexpr int kCheckEvery = static_cast<int>(constants::SINKHORN_CHECK_EVERY);
constexpr float kExpFloor = static_cast<float>(constants::EXP_FLOOR);
constexpr float kDistanceFloor = static_cast<float>(constants::DISTANCE_FLOOR);
// The row-marginal error's cap on (f_before - f_after)/eps (the reference's clamp(max=80)).
constexpr float kRatioLogCap = 80.0f;

// row[t] = |x_lane - y_t|^2, col[t] = |x_t - y_lane|^2 (t < kTile); points past n or
// m read as 0, so those entries stay finite (the weights mask them).  t outer, k
// inner: one point's address live at a time (k outer keeps 2 kTile of them).
template <int kTile>
__device__ __forceinline__ void squared_distances(const float* __restrict__ xp, const float* __restrict__ yp, int n,
                                                  int m, int64_t d, int lane, float (&row)[kTile],
                                                  float (&col)[kTile]) {
  const float* x_own = xp + (lane < n ? lane : 0) * d;
  const float* y_own = yp + (lane < m ? lane : 0) * d;
  const bool x_on = lane < n, y_on = lane < m;
GF_UNROLL
  for (int t = 0; t < kTile; ++t) {
    const float* x_t = xp + (t < n ? t : 0) * d;
    const float* y_t = yp + (t < m ? t : 0) * d;
    const bool x_t_on = t < n, y_t_on = t < m;
    float r = 0.0f, c = 0.0f;
    for (int64_t k = 0; k < d; ++k) {
      const float dr = __fsub_rn(x_on ? x_own[k] : 0.0f, y_t_on ? y_t[k] : 0.0f);  // x_lane - y_t
      const float dc = __fsub_rn(x_t_on ? x_t[k] : 0.0f, y_on ? y_own[k] : 0.0f);  // x_t - y_lane
      r = __fmaf_rn(dr, dr, r);
      c = __fmaf_rn(dc, dc, c);
    }
    row[t] = r;
    col[t] = c;
  }
}

// |x - y|^2 / 2 (p = 2) or |x - y| (p = 1) from the squared distance.
__device__ __forceinline__ float cost_of(float sq, int p) { return p == 2 ? __fmul_rn(0.5f, sq) : __fsqrt_rn(sq); }

__device__ __forceinline__ float log_weight(float w) { return w > 0.0f ? logf(w) : -INFINITY; }

// log w + potential / eps, -inf for a zero weight (also when the potential is not finite).
__device__ __forceinline__ float log_term(float log_w, float potential, float inv_eps) {
  return log_w == -INFINITY ? -INFINITY : __fadd_rn(log_w, __fmul_rn(potential, inv_eps));
}

// -eps * LSE_t(h_t - scaled[t]), h_t the value of lane t; every lane of the warp calls it.
template <int kTile>
__device__ __forceinline__ float softmin(const float (&scaled)[kTile], float h, float eps) {
  float z[kTile];
  float z_max = -INFINITY;
GF_UNROLL
  for (int t = 0; t < kTile; ++t) {
    z[t] = __fsub_rn(__shfl_sync(kFull, h, t), scaled[t]);
    z_max = fmaxf(z_max, z[t]);
  }
  float sum = 0.0f;
GF_UNROLL
  for (int t = 0; t < kTile; ++t) sum = __fadd_rn(sum, expf(__fsub_rn(z[t], z_max)));
  return __fmul_rn(-eps, __fadd_rn(z_max, logf(sum)));
}

__device__ __forceinline__ float warp_sum(float x) {
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) x = __fadd_rn(x, __shfl_xor_sync(kFull, x, offset));
  return x;
}

// sum_i |a_i (exp(min((f_before_i - f_after_i)/eps, 80)) - 1)| over the lanes i < n.
__device__ __forceinline__ float row_marginal_error(float f_before, float f_after, float a, bool in_row,
                                                    float inv_eps) {
  const float ratio = expf(fminf(__fmul_rn(__fsub_rn(f_before, f_after), inv_eps), kRatioLogCap));
  return warp_sum(in_row ? fabsf(__fmul_rn(a, __fsub_rn(ratio, 1.0f))) : 0.0f);
}

template <int kTile>
__global__ void __launch_bounds__(kThreads)
    sinkhorn_tiny_kernel(const float* __restrict__ x, const float* __restrict__ y, const float* __restrict__ a,
                         const float* __restrict__ b, int64_t batch, int n, int m, int64_t d, int p, float eps,
                         int n_iters, int use_tol, float tol, float* __restrict__ f_out, float* __restrict__ g_out,
                         float* __restrict__ error_out, int32_t* __restrict__ iterations_out) {
  const int lane = threadIdx.x % kWarp;
  const int64_t problem = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / kWarp;
  if (problem >= batch) return;  // the whole warp; nothing below waits for other warps
  float row[kTile], col[kTile];
  squared_distances<kTile>(x + problem * n * d, y + problem * m * d, n, m, d, lane, row, col);
  const float inv_eps = __fdiv_rn(1.0f, eps);
GF_UNROLL
  for (int t = 0; t < kTile; ++t) {
    row[t] = __fmul_rn(cost_of(row[t], p), inv_eps);
    col[t] = __fmul_rn(cost_of(col[t], p), inv_eps);
  }
  const bool in_row = lane < n, in_col = lane < m;
  const float a_lane = in_row ? a[problem * n + lane] : 0.0f;
  const float log_a = log_weight(a_lane);
  const float log_b = log_weight(in_col ? b[problem * m + lane] : 0.0f);

  // f_i, g_j of i = j = lane; the loop is warp-uniform (error is the same in every lane).
  float f = 0.0f, g = 0.0f, error = 0.0f;
  int it = 0;
  bool done = false;
  while (it < n_iters && !done) {
    const float f_new = softmin<kTile>(row, log_term(log_b, g, inv_eps), eps);
    if (use_tol && it > 0 && it % kCheckEvery == 0) {
      error = row_marginal_error(f, f_new, a_lane, in_row, inv_eps);
      done = error <= tol;
    }
    if (!done) {
      f = f_new;
      g = softmin<kTile>(col, log_term(log_a, f, inv_eps), eps);
      ++it;
    }
  }
  if (!done) {  // the error of the returned plan, from one more f-update (not applied)
    const float f_next = softmin<kTile>(row, log_term(log_b, g, inv_eps), eps);
    error = row_marginal_error(f, f_next, a_lane, in_row, inv_eps);
  }
  if (in_row) f_out[problem * n + lane] = f;
  if (in_col) g_out[problem * m + lane] = g;
  if (lane == 0) {
    error_out[problem] = error;
    iterations_out[problem] = it;
  }
}

// The reference's envelope weight of one plan entry: exp(max(log P_ij, EXP_FLOOR)),
// 0 on padding, for p = 1 times 1 / max(C, DISTANCE_FLOOR) (0 where C = 0).
// (/ eps as * (1/eps), as the forward's updates.)
__device__ __forceinline__ float envelope_weight(float f_i, float g_j, float cost, float a_i, float b_j, int p,
                                                 float inv_eps) {
  if (!(a_i > 0.0f && b_j > 0.0f)) return 0.0f;
  const float log_plan = __fadd_rn(__fadd_rn(__fmul_rn(__fadd_rn(__fsub_rn(f_i, cost), g_j), inv_eps), logf(a_i)),
                                   logf(b_j));
  const float w = expf(fmaxf(log_plan, kExpFloor));
  if (p == 2) return w;
  return cost > 0.0f ? __fmul_rn(w, __fdiv_rn(1.0f, fmaxf(cost, kDistanceFloor))) : 0.0f;
}

// out = scale * sum_{t < count} w_t (own - other_t) for one point `own` (d floats)
// against the other cloud's points other_t, w_t = weight(t, cost(own, other_t)).
// t outer: each entry's cost (sum_k in k order, the forward's bits) and weight,
// then its term added into `out`, the lane's own row of the gradient (float32
// storage between the adds: the bits of a register accumulator, without the
// one live address per point that a k-outer loop hoists).
template <class Weight>
__device__ __forceinline__ void pull(const float* __restrict__ own, const float* __restrict__ other, int count,
                                     int64_t d, int p, float scale, Weight weight, float* __restrict__ out) {
  for (int64_t k = 0; k < d; ++k) out[k] = 0.0f;
  for (int t = 0; t < count; ++t) {
    const float* other_t = other + t * d;
    float sq = 0.0f;
    for (int64_t k = 0; k < d; ++k) {
      const float diff = __fsub_rn(own[k], other_t[k]);
      sq = __fmaf_rn(diff, diff, sq);
    }
    const float w = weight(t, cost_of(sq, p));
    if (w == 0.0f) continue;  // padding (and p = 1 at coincident points): adds exactly nothing
    for (int64_t k = 0; k < d; ++k) out[k] = __fmaf_rn(w, __fsub_rn(own[k], other_t[k]), out[k]);
  }
  for (int64_t k = 0; k < d; ++k) out[k] = __fmul_rn(scale, out[k]);
}

__global__ void __launch_bounds__(kThreads)
    sinkhorn_tiny_envelope_kernel(const float* __restrict__ x, const float* __restrict__ y,
                                  const float* __restrict__ a, const float* __restrict__ b,
                                  const float* __restrict__ f, const float* __restrict__ g,
                                  const float* __restrict__ scale, int64_t batch, int n, int m, int64_t d, int p,
                                  float eps, float* __restrict__ grad_x, float* __restrict__ grad_y) {
  const int lane = threadIdx.x % kWarp;
  const int64_t problem = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / kWarp;
  if (problem >= batch) return;
  const float* xp = x + problem * n * d;
  const float* yp = y + problem * m * d;
  const float* ap = a + problem * n;
  const float* bp = b + problem * m;
  const float* fp = f + problem * n;
  const float* gp = g + problem * m;
  const float s = scale[problem];
  const float inv_eps = __fdiv_rn(1.0f, eps);
  if (lane < n) {  // grad_x of x_i, i = lane: w_it over the columns t
    const float a_i = ap[lane], f_i = fp[lane];
    auto weight = [&](int t, float cost) { return envelope_weight(f_i, gp[t], cost, a_i, bp[t], p, inv_eps); };
    pull(xp + lane * d, yp, m, d, p, s, weight, grad_x + (problem * n + lane) * d);
  }
  if (lane < m) {  // grad_y of y_j, j = lane: w_tj over the rows t
    const float b_j = bp[lane], g_j = gp[lane];
    auto weight = [&](int t, float cost) { return envelope_weight(fp[t], g_j, cost, ap[t], b_j, p, inv_eps); };
    pull(yp + lane * d, xp, n, d, p, s, weight, grad_y + (problem * m + lane) * d);
  }
}

bool valid_sizes(int64_t batch, int64_t n, int64_t m, int64_t d, int p, float eps) {
  const int64_t blocks = (batch + kWarps - 1) / kWarps;
  return batch >= 1 && blocks <= 2147483647 && n >= 1 && n <= kSinkhornTinyMaxPoints && m >= 1 &&
         m <= kSinkhornTinyMaxPoints && d >= 1 && (p == 1 || p == 2) && eps > 0.0f;
}

dim3 grid_for(int64_t batch) { return dim3(static_cast<unsigned>((batch + kWarps - 1) / kWarps)); }

// kTile for the larger cloud: 8, 16 or 32.
int tile_for(int64_t n, int64_t m) {
  const int64_t points = n > m ? n : m;
  return points <= 8 ? 8 : (points <= 16 ? 16 : 32);
}

template <int kTile>
cudaError_t launch_solve(const float* x, const float* y, const float* a, const float* b, int64_t batch, int n,
                         int m, int64_t d, int p, float eps, int n_iters, bool use_tol, float tol,
                         const SinkhornTinyOutputs& out, cudaStream_t stream) {
  auto kernel = &sinkhorn_tiny_kernel<kTile>;
  GF_LAUNCH(kernel, grid_for(batch), dim3(kThreads), 0, stream)
  (x, y, a, b, batch, n, m, d, p, eps, n_iters, use_tol ? 1 : 0, tol, out.f, out.g, out.marginal_error,
   out.iterations);
  return cudaGetLastError();
}

}  // namespace

cudaError_t sinkhorn_tiny(const float* x, const float* y, const float* a, const float* b, int64_t batch,
                          int64_t n, int64_t m, int64_t d, int p, float eps, int64_t n_iters, bool use_tol,
                          float tol, const SinkhornTinyOutputs& out, cudaStream_t stream) {
  if (!valid_sizes(batch, n, m, d, p, eps) || n_iters < 0 || n_iters > 2147483647 || !x || !y || !a || !b ||
      !out.f || !out.g || !out.marginal_error || !out.iterations) {
    return cudaErrorInvalidValue;
  }
  const int ni = static_cast<int>(n), mi = static_cast<int>(m), iters = static_cast<int>(n_iters);
  switch (tile_for(n, m)) {
    case 8: return launch_solve<8>(x, y, a, b, batch, ni, mi, d, p, eps, iters, use_tol, tol, out, stream);
    case 16: return launch_solve<16>(x, y, a, b, batch, ni, mi, d, p, eps, iters, use_tol, tol, out, stream);
    default: return launch_solve<32>(x, y, a, b, batch, ni, mi, d, p, eps, iters, use_tol, tol, out, stream);
  }
}

cudaError_t sinkhorn_tiny_envelope(const float* x, const float* y, const float* a, const float* b,
                                   const float* f, const float* g, const float* scale, int64_t batch, int64_t n,
                                   int64_t m, int64_t d, int p, float eps, float* grad_x, float* grad_y,
                                   cudaStream_t stream) {
  if (!valid_sizes(batch, n, m, d, p, eps) || !x || !y || !a || !b || !f || !g || !scale || !grad_x || !grad_y) {
    return cudaErrorInvalidValue;
  }
  GF_LAUNCH(sinkhorn_tiny_envelope_kernel, grid_for(batch), dim3(kThreads), 0, stream)
  (x, y, a, b, f, g, scale, batch, static_cast<int>(n), static_cast<int>(m), d, p, eps, grad_x, grad_y);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace guider_fast
