// GeomLoss's SamplesLoss("sinkhorn") on chip for clouds of up to 256 points: the CUDA twin
// of kernels/sinkhorn.py::samples_loss_potentials (annealed, symmetric averaged updates,
// debiasing, the last extrapolation), every step of the schedule in one launch.
//
// One block per problem, 32 ceil(max(n, m) / 32) threads (<= 256); thread t owns row t of
// the x side (f_ba, f_aa; t < n) and column t of the y side (g_ab, g_bb; t < m), keeps its
// potentials in registers and takes each of its soft-mins alone, in index order: no
// cross-thread reduction anywhere, so no result depends on thread scheduling.  One step
// (init, each eps, the extrapolation) = every thread writes log w + potential / eps into a
// shared buffer, one __syncthreads, every thread reads the whole other side.  The buffer is
// double-buffered (step s writes buffer s % 2): a thread still reading step s's values is
// never overwritten, because step s + 2's writers have all passed step s + 1's barrier.
//
// Where the cost entries come from.  A 256 x 256 float32 tile is 256 KiB, over sm_90's
// 227 KiB of shared memory per block, and debiasing needs three (xy, xx, yy: 768 KiB);
// registers cannot hold them either (256 threads x 128 registers = 128 KiB, most of it
// needed).  So the kernel caches what fits and recomputes the rest (SamplesLossPlan):
//   * all tiles fit (n = m <= 137 debiased, <= 239 without, at 227 KiB): all cached; the
//     fill reads the points from global memory once, nothing is recomputed;
//   * otherwise the points are staged in shared memory if they fit, at stride d | 1 (odd),
//     so the 32 lanes reading their own points' feature k hit 32 different banks (an even
//     stride such as 64 would put them all in one bank); the other point of an entry is the
//     same address for the whole warp (a broadcast).  The rest of the budget caches rows of
//     C(x, y) first, which serve both the f- and the g-update (2 n m entries per step, the
//     tiles of the debiasing terms only n^2 and m^2), then of C(x, x), then C(y, y);
//   * the uncached entries are recomputed (d subtractions and FMAs each, every step), from
//     the staged points, or from global memory when even the points do not fit (d >= 110
//     at n = m = 256; correct, the slow path).  Staging can take nearly all of the budget
//     (d = 109 at n = m = 256 leaves no C(x, y) row cached): which split is fastest needs a
//     GPU to measure; samples_loss_onchip_planned takes any plan.
// Cached tiles are read conflict-free: C(x, y) has an odd row stride (m | 1), so the row
// update (lane i reads row i) and the column update (lane j reads column j) both touch 32
// banks; C(x, x) and C(y, y) are read by columns (lane i reads C[j][i], consecutive), the
// fill storing C(u_i, u_j) there so that no symmetry is assumed.  Caching only trades
// memory for recomputation: a cached entry and its recomputation are the same function of
// the same floats (sum_k (u_k - v_k)^2 in k order, FMAs), so every plan gives the same bits
// (the tests check that); costs never depend on which thread computed them.
//
// The soft-min is an online log-sum-exp in 4 interleaved chains (entry o goes to chain
// o % 4, whatever its source): one exp per entry (the Triton twin's two-pass form would
// read or recompute every entry twice), and 4 independent dependency chains per thread
// for the latency a one-block-per-SM launch cannot hide with other warps.  The chains are
// combined in a fixed order.  Float math uses explicitly rounded intrinsics (no FMA
// contraction differs between nvcc and the sim); expf / logf are the GPU's (within ~2 ulp
// of the host libm the sim uses).
//
// Costs from direct differences, as csrc/sinkhorn.cu: the twin expands
// |x|^2 - 2 x.y + |y|^2, whose float32 rounding is ~u (|x|^2 + |y|^2) per entry (and whose
// self-costs C(x_i, x_i) are not exactly 0); the direct form is within ~(d + 2) ulp of C.
#include "cuda_compat.h"
#include "constants.h"
#include "samples_loss_cuda.h"

namespace guider_fast {
namespace cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kMaxThreads = static_cast<int>(kSamplesLossMaxPoints);
constexpr int kChains = 4;
constexpr float kSqrtFloor = static_cast<float>(constants::GEOMLOSS_SQRT_FLOOR);
constexpr float kLogZero = static_cast<float>(constants::GEOMLOSS_LOG_ZERO);
// float32's smallest normal: the reference's clamp_min(finfo.tiny) before log.
constexpr float kFloatTiny = 1.17549435e-38f;
constexpr int64_t kStaticSharedDefault = 48 * 1024;  // dynamic shared memory without the opt-in

// Offsets (in floats) of the dynamic shared memory of one plan, computed on the host.
struct Layout {
  int h;             // floats of one potential buffer; buffers at 0 and h
  int xs, ys;        // staged points (stage_points)
  int point_stride;  // of the staged points: d | 1
  int txy, ld_xy;    // rows_xy rows of C(x, y), row stride m | 1
  int txx, tyy;      // rows_xx x n of C(x, x), rows_yy x m of C(y, y)
  int64_t floats;    // total
};

// C(u, v) from its squared distance: |u - v|^2 / 2 or GeomLoss's floored sqrt.
template <int P>
__device__ __forceinline__ float cost_of(float sq) {
  return P == 2 ? __fmul_rn(0.5f, sq) : __fsqrt_rn(fmaxf(sq, kSqrtFloor));
}

// sum_k (u_k - v_k)^2 in k order: the one definition of a cost entry (fill and recompute).
__device__ __forceinline__ float squared_distance(const float* u, const float* v, int64_t d) {
  float sq = 0.0f;
  for (int64_t k = 0; k < d; ++k) {
    const float diff = __fsub_rn(u[k], v[k]);
    sq = __fmaf_rn(diff, diff, sq);
  }
  return sq;
}

__device__ __forceinline__ float geomloss_log_weight(float w) {
  return w > 0.0f ? logf(fmaxf(w, kFloatTiny)) : kLogZero;
}

// Online log-sum-exp in kChains chains.
struct Lse {
  float top[kChains], sum[kChains];

  __device__ __forceinline__ void reset() {
GF_UNROLL
    for (int c = 0; c < kChains; ++c) {
      top[c] = -INFINITY;
      sum[c] = 0.0f;
    }
  }
  // One exp whichever of z and the running max is larger: exp(-|z - top|) is the factor
  // that rescales the smaller side.  From top = -inf: z > top, sum = 0 * 0 + 1.
  __device__ __forceinline__ void add(int c, float z) {
    const float e = expf(-fabsf(__fsub_rn(z, top[c])));
    if (z > top[c]) {
      sum[c] = __fmaf_rn(sum[c], e, 1.0f);
      top[c] = z;
    } else {
      sum[c] = __fadd_rn(sum[c], e);
    }
  }
  // -eps (max + log sum): the chains merged in c order (an empty chain adds 0 * 0).
  __device__ __forceinline__ float softmin(float eps) const {
    float best = top[0];
GF_UNROLL
    for (int c = 1; c < kChains; ++c) best = fmaxf(best, top[c]);
    float total = 0.0f;
GF_UNROLL
    for (int c = 0; c < kChains; ++c) total = __fmaf_rn(sum[c], expf(__fsub_rn(top[c], best)), total);
    return __fmul_rn(-eps, __fadd_rn(best, logf(total)));
  }
};

// -eps LSE_o(h_o - C_o / eps) over o < count for one owner point `own`: entries o < cached
// read from tile[o * tile_stride], the others recomputed against others + o * point_stride
// (kOwnFirst: C(own, other), else C(other, own)), four at a time (chains o % 4).
template <int P, bool kOwnFirst>
__device__ __forceinline__ float softmin(const float* __restrict__ h, int count, const float* tile,
                                         int64_t tile_stride, int cached, const float* own, const float* others,
                                         int64_t point_stride, int64_t d, float eps, float inv_eps) {
  Lse lse;
  lse.reset();
  for (int base = 0; base < cached; base += kChains) {
GF_UNROLL
    for (int c = 0; c < kChains; ++c) {
      const int o = base + c;
      if (o < cached) lse.add(c, __fmaf_rn(-tile[o * tile_stride], inv_eps, h[o]));
    }
  }
  // The first group may start inside the cached range (cached % 4 != 0): those entries are
  // computed and dropped, so that chain c still holds exactly the entries o = c mod 4.
  for (int base = cached - cached % kChains; base < count; base += kChains) {
    const float* other[kChains];
    float sq[kChains];
GF_UNROLL
    for (int c = 0; c < kChains; ++c) {
      other[c] = others + static_cast<int64_t>(base + c < count ? base + c : count - 1) * point_stride;
      sq[c] = 0.0f;
    }
    for (int64_t k = 0; k < d; ++k) {
      const float own_k = own[k];
GF_UNROLL
      for (int c = 0; c < kChains; ++c) {
        const float diff = kOwnFirst ? __fsub_rn(own_k, other[c][k]) : __fsub_rn(other[c][k], own_k);
        sq[c] = __fmaf_rn(diff, diff, sq[c]);
      }
    }
GF_UNROLL
    for (int c = 0; c < kChains; ++c) {
      const int o = base + c;
      if (o >= cached && o < count) lse.add(c, __fmaf_rn(-cost_of<P>(sq[c]), inv_eps, h[o]));
    }
  }
  return lse.softmin(eps);
}

// The schedule's eps of step s: step 0 (init) at eps_list[0], steps 1..n_eps the list,
// step n_eps + 1 (the extrapolation) at its last value.
__device__ __forceinline__ float step_eps(const float* eps_list, int n_eps, int s) {
  return eps_list[s == 0 ? 0 : (s <= n_eps ? s - 1 : n_eps - 1)];
}

// (kMaxThreads, 2): registers capped at 128 (the ptxas gate's bound; 2 full blocks per SM
// when shared memory allows).  With kMaxThreads alone, nvcc 13 chose 64 registers and spilled.
template <int P, bool kDebias>
__global__ void __launch_bounds__(kMaxThreads, 2)
    samples_loss_kernel(const float* __restrict__ x, const float* __restrict__ y, const float* __restrict__ a,
                        const float* __restrict__ b, const float* __restrict__ eps_list, int n_eps, int n, int m,
                        int64_t d, int rows_xy, int rows_xx, int rows_yy, int stage_points, Layout layout,
                        float* __restrict__ out) {
  GF_EXTERN_SHARED(float, smem);
  const int t = threadIdx.x, threads = blockDim.x;
  const int lane = t % kWarp, warp = t / kWarp, warps = threads / kWarp;
  const int64_t problem = blockIdx.x;
  const float* xp = x + problem * n * d;
  const float* yp = y + problem * m * d;

  // Points for the fill and the recomputation: staged (stride d | 1) or in place (stride d).
  const float* px = xp;
  const float* py = yp;
  int64_t ps = d;
  if (stage_points) {  // block-uniform
    float* xs = smem + layout.xs;
    float* ys = smem + layout.ys;
    for (int i = warp; i < n; i += warps)
      for (int64_t k = lane; k < d; k += kWarp) xs[i * layout.point_stride + k] = xp[i * d + k];
    for (int j = warp; j < m; j += warps)
      for (int64_t k = lane; k < d; k += kWarp) ys[j * layout.point_stride + k] = yp[j * d + k];
    __syncthreads();
    px = xs;
    py = ys;
    ps = layout.point_stride;
  }
  // The cached rows (lane-consecutive stores); step 0's barrier orders them before any read.
  float* txy = smem + layout.txy;
  float* txx = smem + layout.txx;
  float* tyy = smem + layout.tyy;
  for (int i = warp; i < rows_xy; i += warps)
    for (int j = lane; j < m; j += kWarp)
      txy[i * layout.ld_xy + j] = cost_of<P>(squared_distance(px + i * ps, py + j * ps, d));
  if (kDebias) {  // row j of these tiles holds C(u_i, u_j) at column i: read by columns below
    for (int j = warp; j < rows_xx; j += warps)
      for (int i = lane; i < n; i += kWarp) txx[j * n + i] = cost_of<P>(squared_distance(px + i * ps, px + j * ps, d));
    for (int j = warp; j < rows_yy; j += warps)
      for (int i = lane; i < m; i += kWarp) tyy[j * m + i] = cost_of<P>(squared_distance(py + i * ps, py + j * ps, d));
  }

  const bool has_row = t < n, has_col = t < m;
  const float log_a = has_row ? geomloss_log_weight(a[problem * n + t]) : 0.0f;
  const float log_b = has_col ? geomloss_log_weight(b[problem * m + t]) : 0.0f;
  const float* own_x = px + (has_row ? t : 0) * ps;
  const float* own_y = py + (has_col ? t : 0) * ps;
  // Row t of C(x, y): all cached or all recomputed; column t: rows i < rows_xy cached.
  const int row_cached = t < rows_xy ? m : 0;

  // From zero potentials, log w + 0 / eps = log w exactly: step 0 is the init's soft-min.
  float f_ba = 0.0f, g_ab = 0.0f, f_aa = 0.0f, g_bb = 0.0f;
  float f_new = 0.0f, g_new = 0.0f, f_aa_new = 0.0f, g_bb_new = 0.0f;
  for (int s = 0; s <= n_eps + 1; ++s) {
    const float eps = step_eps(eps_list, n_eps, s);
    const float inv_eps = __fdiv_rn(1.0f, eps);
    float* h = smem + (s & 1) * layout.h;  // [log a + f_ba/e (n) | log b + g_ab/e (m) | f_aa (n) | g_bb (m)]
    if (has_row) {
      h[t] = __fmaf_rn(f_ba, inv_eps, log_a);
      if (kDebias) h[n + m + t] = __fmaf_rn(f_aa, inv_eps, log_a);
    }
    if (has_col) {
      h[n + t] = __fmaf_rn(g_ab, inv_eps, log_b);
      if (kDebias) h[2 * n + m + t] = __fmaf_rn(g_bb, inv_eps, log_b);
    }
    __syncthreads();
    float ft_ba = 0.0f, gt_ab = 0.0f, ft_aa = 0.0f, gt_bb = 0.0f;
    if (has_row) {
      ft_ba = softmin<P, true>(h + n, m, txy + t * layout.ld_xy, 1, row_cached, own_x, py, ps, d, eps, inv_eps);
      if (kDebias) ft_aa = softmin<P, true>(h + n + m, n, txx + t, n, rows_xx, own_x, px, ps, d, eps, inv_eps);
    }
    if (has_col) {
      gt_ab = softmin<P, false>(h, n, txy + t, layout.ld_xy, rows_xy, own_y, px, ps, d, eps, inv_eps);
      if (kDebias) gt_bb = softmin<P, true>(h + 2 * n + m, m, tyy + t, m, rows_yy, own_y, py, ps, d, eps, inv_eps);
    }
    if (s == 0) {
      f_ba = ft_ba, g_ab = gt_ab, f_aa = ft_aa, g_bb = gt_bb;
    } else if (s <= n_eps) {
      f_ba = __fmul_rn(0.5f, __fadd_rn(f_ba, ft_ba));
      g_ab = __fmul_rn(0.5f, __fadd_rn(g_ab, gt_ab));
      f_aa = __fmul_rn(0.5f, __fadd_rn(f_aa, ft_aa));
      g_bb = __fmul_rn(0.5f, __fadd_rn(g_bb, gt_bb));
    } else {
      f_new = ft_ba, g_new = gt_ab, f_aa_new = ft_aa, g_bb_new = gt_bb;
    }
  }

  float* o = out + problem * (2 * layout.h);  // samples_loss_packed_floats(n, m, kDebias)
  if (has_row) {
    o[t] = f_ba;
    o[n + m + t] = f_new;
    if (kDebias) {
      o[2 * n + 2 * m + t] = f_aa;
      o[3 * n + 3 * m + t] = f_aa_new;
    }
  }
  if (has_col) {
    o[n + t] = g_ab;
    o[2 * n + m + t] = g_new;
    if (kDebias) {
      o[3 * n + 2 * m + t] = g_bb;
      o[4 * n + 3 * m + t] = g_bb_new;
    }
  }
}

bool valid_sizes(int64_t batch, int64_t n, int64_t m, int64_t d) {
  return batch >= 1 && batch <= 2147483647 && n >= 1 && n <= kSamplesLossMaxPoints && m >= 1 &&
         m <= kSamplesLossMaxPoints && d >= 1 && d <= 2147483647;
}

// The layout of a plan; floats = -1 if the plan is out of range.
Layout layout_of(int64_t n, int64_t m, int64_t d, bool debias, const SamplesLossPlan& plan) {
  Layout l{};
  l.floats = -1;
  if (plan.rows_xy < 0 || plan.rows_xy > n || plan.rows_xx < 0 || plan.rows_xx > (debias ? n : 0) ||
      plan.rows_yy < 0 || plan.rows_yy > (debias ? m : 0)) {
    return l;
  }
  const int64_t point_stride = d | 1;
  const int64_t points = plan.stage_points ? (n + m) * point_stride : 0;
  if (points > kSamplesLossSharedBudget) return l;  // keeps every offset below in int range
  int64_t at = 0;
  l.h = static_cast<int>(samples_loss_packed_floats(n, m, debias) / 2);
  at += 2 * l.h;
  l.point_stride = static_cast<int>(plan.stage_points ? point_stride : 0);
  l.xs = static_cast<int>(at);
  l.ys = static_cast<int>(at + (plan.stage_points ? n * point_stride : 0));
  at += points;
  l.ld_xy = static_cast<int>(m | 1);
  l.txy = static_cast<int>(at);
  at += plan.rows_xy * l.ld_xy;
  l.txx = static_cast<int>(at);
  at += plan.rows_xx * n;
  l.tyy = static_cast<int>(at);
  at += plan.rows_yy * m;
  l.floats = at;
  return l;
}

template <int P, bool kDebias>
cudaError_t launch(const float* x, const float* y, const float* a, const float* b, const float* eps_list,
                   int64_t n_eps, int64_t batch, int64_t n, int64_t m, int64_t d, const SamplesLossPlan& plan,
                   const Layout& layout, float* out, cudaStream_t stream) {
  auto kernel = &samples_loss_kernel<P, kDebias>;
  const int64_t bytes = layout.floats * static_cast<int64_t>(sizeof(float));
  if (bytes > kStaticSharedDefault) {
    const cudaError_t status =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
    if (status != cudaSuccess) return status;
  }
  const int64_t points = n > m ? n : m;
  const unsigned threads = static_cast<unsigned>((points + kWarp - 1) / kWarp * kWarp);
  GF_LAUNCH(kernel, dim3(static_cast<unsigned>(batch)), dim3(threads), static_cast<size_t>(bytes), stream)
  (x, y, a, b, eps_list, static_cast<int>(n_eps), static_cast<int>(n), static_cast<int>(m), d,
   static_cast<int>(plan.rows_xy), static_cast<int>(plan.rows_xx), static_cast<int>(plan.rows_yy),
   plan.stage_points ? 1 : 0, layout, out);
  return cudaGetLastError();
}

}  // namespace

SamplesLossPlan samples_loss_plan(int64_t n, int64_t m, int64_t d, bool debias, int64_t shared_budget_bytes) {
  SamplesLossPlan plan;
  const int64_t budget = shared_budget_bytes / static_cast<int64_t>(sizeof(float));
  const int64_t buffers = samples_loss_packed_floats(n, m, debias);
  const int64_t ld_xy = m | 1;
  const int64_t tiles = n * ld_xy + (debias ? n * n + m * m : 0);
  if (buffers + tiles <= budget) {
    plan.rows_xy = n;
    plan.rows_xx = debias ? n : 0;
    plan.rows_yy = debias ? m : 0;
    return plan;
  }
  int64_t left = budget - buffers;
  const int64_t points = (n + m) * (d | 1);
  plan.stage_points = points <= left;
  if (plan.stage_points) left -= points;
  if (left <= 0) return plan;
  auto take = [&left](int64_t rows, int64_t row_floats) {
    const int64_t fit = left / row_floats < rows ? left / row_floats : rows;
    left -= fit * row_floats;
    return fit;
  };
  plan.rows_xy = take(n, ld_xy);
  if (debias) {
    plan.rows_xx = take(n, n);
    plan.rows_yy = take(m, m);
  }
  return plan;
}

int64_t samples_loss_shared_bytes(int64_t n, int64_t m, int64_t d, bool debias, const SamplesLossPlan& plan) {
  if (!valid_sizes(1, n, m, d)) return -1;
  const Layout layout = layout_of(n, m, d, debias, plan);
  return layout.floats < 0 ? -1 : layout.floats * static_cast<int64_t>(sizeof(float));
}

cudaError_t samples_loss_onchip_planned(const float* x, const float* y, const float* a, const float* b,
                                        const float* eps_list, int64_t n_eps, int64_t batch, int64_t n, int64_t m,
                                        int64_t d, int p, bool debias, const SamplesLossPlan& plan, float* out,
                                        cudaStream_t stream) {
  if (!valid_sizes(batch, n, m, d) || (p != 1 && p != 2) || n_eps < 1 || n_eps > 2147483645 || !x || !y || !a ||
      !b || !eps_list || !out) {
    return cudaErrorInvalidValue;
  }
  const Layout layout = layout_of(n, m, d, debias, plan);
  if (layout.floats < 0 || layout.floats * static_cast<int64_t>(sizeof(float)) > kSamplesLossSharedBudget) {
    return cudaErrorInvalidValue;
  }
  if (p == 2) {
    return debias ? launch<2, true>(x, y, a, b, eps_list, n_eps, batch, n, m, d, plan, layout, out, stream)
                  : launch<2, false>(x, y, a, b, eps_list, n_eps, batch, n, m, d, plan, layout, out, stream);
  }
  return debias ? launch<1, true>(x, y, a, b, eps_list, n_eps, batch, n, m, d, plan, layout, out, stream)
                : launch<1, false>(x, y, a, b, eps_list, n_eps, batch, n, m, d, plan, layout, out, stream);
}

cudaError_t samples_loss_onchip(const float* x, const float* y, const float* a, const float* b,
                                const float* eps_list, int64_t n_eps, int64_t batch, int64_t n, int64_t m, int64_t d,
                                int p, bool debias, float* out, cudaStream_t stream) {
  if (!valid_sizes(batch, n, m, d)) return cudaErrorInvalidValue;
  return samples_loss_onchip_planned(x, y, a, b, eps_list, n_eps, batch, n, m, d, p, debias,
                                     samples_loss_plan(n, m, d, debias, kSamplesLossSharedBudget), out, stream);
}

}  // namespace cuda
}  // namespace guider_fast
