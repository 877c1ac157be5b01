// The fused DBPR training steps (the CUDA twins of kernels/dbpr.py's fused_step and
// atomic_sgd_step); semantics in guider_fast_cuda.h.
//
// Sorted-exact step, three launches, one warp per sorted position (a warp that is
// not at the start of a run of equal keys exits at once):
//   1. user runs: score the run's triplets (the user row's |u|^2 once per run), store
//      margins, G and the terms, and sum the user's gradient into its stash slot
//      (each lane owns its features: a read-modify-write without races);
//   2. item runs: the run's occurrences 32 at a time, each lane holding one
//      occurrence's coefficient and triplet in registers (broadcast by shuffles),
//      summed against the (unchanged) user rows; SGD or row-wise Adagrad in place;
//   3. stashed user updates.
// Rows are walked in chunks of 32 x V features, V = 16 bytes / element size when both
// tables are contiguous and 16-byte aligned (vector loads and stores), else V = 1
// with any strides: no compile-time bound on D.  Row-wise Adagrad needs the whole
// row's |grad|^2 first: with more than one chunk it recomputes the chunks (same
// order, same bits) rather than keeping D floats.
//
// Atomic step: one warp per triplet holding u, the user's gradient and the
// positive's step in registers (D <= kDbprAtomicMaxDim); a barrier between the
// block's reads and its atomic adds.
#include "constants.h"
#include "dbpr_common.cuh"

namespace guider_fast {
namespace cuda {
namespace {

// Triplets per block of the atomic step: 32, or 16 on the strided (V = 1) path,
// whose addressing needs more than the 64 registers a 1024-thread block leaves.
template <int V>
constexpr int atomic_warps() {
  return V > 1 ? 32 : 16;
}
constexpr int kAtomicSlots = static_cast<int>(kDbprAtomicMaxDim / kWarp);  // features per lane
constexpr float kAdagradEps = static_cast<float>(constants::ADAGRAD_EPS);

// V consecutive elements of a row, loaded or stored as one 16-byte access when V > 1.
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

// Lane `lane`'s features of the chunk at `base`: d0 = base + lane V, ..., d0 + V - 1.
// V > 1: unit column stride, 16-byte aligned rows and dim % V == 0 (all V in or out).
template <typename T, int V>
__device__ __forceinline__ void load_pack(const T* row, int64_t sc, int64_t d0, int64_t dim, float (&x)[V]) {
  if constexpr (V > 1) {
    if (d0 < dim) {
      const Pack<T, V> p = *reinterpret_cast<const Pack<T, V>*>(row + d0);
      for (int j = 0; j < V; ++j) x[j] = to_float(p.v[j]);
    } else {
      for (int j = 0; j < V; ++j) x[j] = 0.0f;
    }
  } else {
    x[0] = d0 < dim ? to_float(row[d0 * sc]) : 0.0f;
  }
}

template <typename T, int V>
__device__ __forceinline__ void store_pack(T* row, int64_t sc, int64_t d0, int64_t dim, const float (&x)[V]) {
  if (d0 >= dim) return;
  if constexpr (V > 1) {
    Pack<T, V> p;
    for (int j = 0; j < V; ++j) store_float(&p.v[j], x[j]);
    *reinterpret_cast<Pack<T, V>*>(row + d0) = p;
  } else {
    store_float(row + d0 * sc, x[0]);
  }
}

// Per-lane partial sums a.b and b.b over the lane's features of whole rows.
template <typename T, int V>
__device__ __forceinline__ void lane_dots(const T* a, int64_t a_sc, const T* b, int64_t b_sc, int64_t dim, int lane,
                                          float* ab, float* bb) {
  for (int64_t base = 0; base < dim; base += kWarp * V) {
    const int64_t d0 = base + lane * V;
    float x[V], y[V];
    load_pack<T, V>(a, a_sc, d0, dim, x);
    load_pack<T, V>(b, b_sc, d0, dim, y);
    for (int j = 0; j < V; ++j) {
      *ab = __fmaf_rn(x[j], y[j], *ab);
      *bb = __fmaf_rn(y[j], y[j], *bb);
    }
  }
}

// acc[d] += g * row[d] over the lane's features (acc: the warp's float32 stash row).
template <typename T, int V>
__device__ __forceinline__ void lane_axpy(float g, const T* row, int64_t sc, int64_t dim, int lane, float* acc) {
  for (int64_t base = 0; base < dim; base += kWarp * V) {
    const int64_t d0 = base + lane * V;
    if (d0 >= dim) continue;
    float x[V];
    load_pack<T, V>(row, sc, d0, dim, x);
    // Product rounded, then added (no fma): a row whose terms cancel (a negative equal to
    // its positive) sums to exactly 0, as torch's index_add_ of products does.
    for (int j = 0; j < V; ++j) acc[d0 + j] = __fadd_rn(acc[d0 + j], __fmul_rn(g, x[j]));
  }
}

// Whether sorted position s starts a run of equal keys (warp-uniform).
__device__ __forceinline__ bool run_start(const int64_t* keys, int64_t s) { return s == 0 || keys[s - 1] != keys[s]; }

__device__ __forceinline__ int64_t run_end(const int64_t* keys, int64_t s, int64_t n) {
  const int64_t key = keys[s];
  int64_t end = s + 1;
  while (end < n && keys[end] == key) ++end;
  return end;
}

// The optimizer on one row from its summed gradient, chunk by chunk:
// grad_of(d0, g) writes the lane's gradient features at d0 (warp-uniform calls:
// it may shuffle).  Every occurrence adds l2 scale row to the gradient (decay).
template <typename T, int V, class GradOf>
__device__ __forceinline__ void update_row(T* row, int64_t sc, int64_t dim, int lane, float decay, float lr,
                                           float* acc, GradOf&& grad_of) {
  // The chunk's gradient with the decay, and the row's current values.
  auto chunk = [&](int64_t d0, float (&g)[V], float (&x)[V]) {
    grad_of(d0, g);
    load_pack<T, V>(row, sc, d0, dim, x);
    for (int j = 0; j < V; ++j) g[j] = __fmaf_rn(decay, x[j], g[j]);
  };
  float denom = 1.0f;
  if (acc) {  // row-wise Adagrad: acc += mean_d grad_d^2 before the row moves
    const float before = *acc;
    float squares = 0.0f;
    for (int64_t base = 0; base < dim; base += kWarp * V) {
      float g[V], x[V];
      chunk(base + lane * V, g, x);
      for (int j = 0; j < V; ++j) squares = __fmaf_rn(g[j], g[j], squares);
    }
    const float total = __fadd_rn(before, __fdiv_rn(warp_sum(squares), static_cast<float>(dim)));
    if (lane == 0) *acc = total;
    denom = __fadd_rn(__fsqrt_rn(total), kAdagradEps);
  }
  for (int64_t base = 0; base < dim; base += kWarp * V) {
    const int64_t d0 = base + lane * V;
    float g[V], x[V];
    chunk(d0, g, x);
    for (int j = 0; j < V; ++j) x[j] = __fsub_rn(x[j], __fmul_rn(lr, acc ? __fdiv_rn(g[j], denom) : g[j]));
    store_pack<T, V>(row, sc, d0, dim, x);
  }
}

// Launch 1: per user run, score its triplets and stash the user's summed gradient
// (without the decay) at stash[s * dim] for the run starting at sorted position s.
template <typename T, int V>
__global__ void __launch_bounds__(kThreads, 1)
    dbpr_user_runs_kernel(const T* __restrict__ user, int64_t u_sr, int64_t u_sc, const T* __restrict__ item,
                          int64_t i_sr, int64_t i_sc, const int64_t* __restrict__ user_keys,
                          const int64_t* __restrict__ user_order, const int64_t* __restrict__ pos_items,
                          const int64_t* __restrict__ neg_items, int64_t n_sr, int64_t n_sc,
                          const void* __restrict__ weights, int weights_dtype, int64_t w_stride, int64_t batch,
                          int64_t k_neg, int64_t dim, float scale, float l2, float* __restrict__ rows,
                          float* __restrict__ margins, float* __restrict__ coef, float* __restrict__ stash) {
  const int lane = threadIdx.x % kWarp;
  const int64_t s = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / kWarp;
  if (s >= batch || !run_start(user_keys, s)) return;  // warp-uniform; no barrier below
  const T* u = user + user_keys[s] * u_sr;
  float* grad = stash + s * dim;
  float uu = 0.0f;
  for (int64_t base = 0; base < dim; base += kWarp * V) {
    const int64_t d0 = base + lane * V;
    float x[V];
    load_pack<T, V>(u, u_sc, d0, dim, x);
    for (int j = 0; j < V; ++j) {
      uu = __fmaf_rn(x[j], x[j], uu);
      if (d0 < dim) grad[d0 + j] = 0.0f;
    }
  }
  uu = warp_sum(uu);
  const float c_scale = __fdiv_rn(scale, static_cast<float>(k_neg));
  const int64_t end = run_end(user_keys, s, batch);
  for (int64_t t = s; t < end; ++t) {
    const int64_t b = user_order[t];
    const T* p = item + pos_items[b] * i_sr;
    float up = 0.0f, pp = 0.0f;
    lane_dots<T, V>(u, u_sc, p, i_sc, dim, lane, &up, &pp);
    const float pos_score = warp_sum(up);
    float squares = __fadd_rn(uu, warp_sum(pp));
    const float w = weights ? load_weight(weights, weights_dtype, b * w_stride) : 1.0f;
    const float c = __fmul_rn(w, c_scale);
    float log_sig_sum = 0.0f, sig_sum = 0.0f;
    for (int64_t k = 0; k < k_neg; ++k) {
      const T* n = item + neg_items[b * n_sr + k * n_sc] * i_sr;
      float un = 0.0f, nn = 0.0f;
      lane_dots<T, V>(u, u_sc, n, i_sc, dim, lane, &un, &nn);
      float sig_neg;
      const float margin = score_negative(pos_score, un, nn, &squares, &log_sig_sum, &sig_sum, &sig_neg);
      const float g = __fmul_rn(c, sig_neg);  // every lane holds G_b(1+k)
      if (lane == 0) {
        margins[b * k_neg + k] = margin;
        coef[b * (k_neg + 1) + 1 + k] = g;
      }
      lane_axpy<T, V>(g, n, i_sc, dim, lane, grad);
    }
    const float g0 = __fmul_rn(-c, sig_sum);
    if (lane == 0) {
      coef[b * (k_neg + 1)] = g0;
      rows[b] = __fadd_rn(__fmul_rn(-w, __fdiv_rn(log_sig_sum, static_cast<float>(k_neg))),
                          __fmul_rn(__fmul_rn(0.5f, l2), squares));
    }
    lane_axpy<T, V>(g0, p, i_sc, dim, lane, grad);
  }
}

// Launch 2: per item run, sum G_o u_b(o) over its occurrences (in sorted order) and
// update the row in place.  Occurrence o < B: triplet o's positive (column 0);
// o >= B: negative (o - B) % K of triplet (o - B) / K (column 1 + that).
template <typename T, int V>
__global__ void __launch_bounds__(kThreads, 1)
    dbpr_item_runs_kernel(const T* __restrict__ user, int64_t u_sr, int64_t u_sc, T* __restrict__ item, int64_t i_sr,
                          int64_t i_sc, const int64_t* __restrict__ item_keys, const int64_t* __restrict__ item_order,
                          const int64_t* __restrict__ users, const float* __restrict__ coef, int64_t batch,
                          int64_t k_neg, int64_t dim, float lr, float l2_scale, float* __restrict__ acc) {
  const int lane = threadIdx.x % kWarp;
  const int64_t n_occ = batch * (k_neg + 1);
  const int64_t s = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / kWarp;
  if (s >= n_occ || !run_start(item_keys, s)) return;  // warp-uniform
  const int64_t key = item_keys[s], end = run_end(item_keys, s, n_occ);
  auto grad_of = [&](int64_t d0, float (&g)[V]) {
    for (int j = 0; j < V; ++j) g[j] = 0.0f;
    for (int64_t first = s; first < end; first += kWarp) {
      // Lane i holds occurrence first + i: its coefficient and its triplet.
      float mine = 0.0f;
      int trip = 0;
      if (first + lane < end) {
        const int64_t o = item_order[first + lane];
        const int64_t neg = o - batch;
        trip = static_cast<int>(o < batch ? o : neg / k_neg);
        mine = coef[static_cast<int64_t>(trip) * (k_neg + 1) + (o < batch ? 0 : 1 + neg % k_neg)];
      }
      const int count = static_cast<int>(end - first < kWarp ? end - first : kWarp);
      for (int i = 0; i < count; ++i) {
        const float gi = __shfl_sync(kFull, mine, i);
        const int ti = __shfl_sync(kFull, trip, i);
        float x[V];
        load_pack<T, V>(user + users[ti] * u_sr, u_sc, d0, dim, x);
        for (int j = 0; j < V; ++j) g[j] = __fadd_rn(g[j], __fmul_rn(gi, x[j]));  // no fma: see lane_axpy
      }
    }
  };
  const float decay = __fmul_rn(l2_scale, static_cast<float>(end - s));
  update_row<T, V>(item + key * i_sr, i_sc, dim, lane, decay, lr, acc ? acc + key : nullptr, grad_of);
}

// Launch 3: each user run's stashed gradient applied to its row.
template <typename T, int V>
__global__ void __launch_bounds__(kThreads, 1)
    dbpr_apply_stash_kernel(T* __restrict__ user, int64_t u_sr, int64_t u_sc, const int64_t* __restrict__ user_keys,
                            const float* __restrict__ stash, int64_t batch, int64_t dim, float lr, float l2_scale,
                            float* __restrict__ acc) {
  const int lane = threadIdx.x % kWarp;
  const int64_t s = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / kWarp;
  if (s >= batch || !run_start(user_keys, s)) return;  // warp-uniform
  const int64_t key = user_keys[s];
  const float* grad = stash + s * dim;
  auto grad_of = [&](int64_t d0, float (&g)[V]) {
    for (int j = 0; j < V; ++j) g[j] = d0 < dim ? grad[d0 + j] : 0.0f;
  };
  const float decay = __fmul_rn(l2_scale, static_cast<float>(run_end(user_keys, s, batch) - s));
  update_row<T, V>(user + key * u_sr, u_sc, dim, lane, decay, lr, acc ? acc + key : nullptr, grad_of);
}

// The atomic (Hogwild) SGD step on float32 tables: lane features d = c 32 V + lane V + j.
template <int V>
__global__ void __launch_bounds__(atomic_warps<V>() * kWarp)
    dbpr_atomic_sgd_kernel(float* __restrict__ user, int64_t u_sr, int64_t u_sc, float* __restrict__ item,
                           int64_t i_sr, int64_t i_sc, const int64_t* __restrict__ users,
                           const int64_t* __restrict__ pos_items, const int64_t* __restrict__ neg_items, int64_t n_sr,
                           int64_t n_sc, const void* __restrict__ weights, int weights_dtype, int64_t w_stride,
                           int64_t batch, int64_t k_neg, int64_t dim, float scale, float l2, float lr,
                           float* __restrict__ rows, float* __restrict__ margins) {
  constexpr int kChunks = kAtomicSlots / V;
  const int lane = threadIdx.x % kWarp;
  const int64_t b = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarp) + threadIdx.x / kWarp;
  const bool valid = b < batch;  // warp-uniform; no early exit: every thread meets the barrier
  const float l2_scale = __fmul_rn(l2, scale);
  float u[kChunks][V], du[kChunks][V], dp[kChunks][V];  // u, dL/du, the positive's gradient
  float c = 0.0f, g0 = 0.0f;
  float* u_row = nullptr;
  float* p_row = nullptr;
  if (valid) {
    u_row = user + users[b] * u_sr;
    p_row = item + pos_items[b] * i_sr;
    float uu = 0.0f, up = 0.0f, pp = 0.0f;
    for (int ch = 0; ch < kChunks; ++ch) {
      const int64_t d0 = static_cast<int64_t>(ch) * kWarp * V + lane * V;
      float p[V];
      load_pack<float, V>(u_row, u_sc, d0, dim, u[ch]);
      load_pack<float, V>(p_row, i_sc, d0, dim, p);
      for (int j = 0; j < V; ++j) {
        uu = __fmaf_rn(u[ch][j], u[ch][j], uu);
        up = __fmaf_rn(u[ch][j], p[j], up);
        pp = __fmaf_rn(p[j], p[j], pp);
        du[ch][j] = __fmul_rn(l2_scale, u[ch][j]);
      }
    }
    const float pos_score = warp_sum(up);
    float squares = __fadd_rn(warp_sum(uu), warp_sum(pp));
    const float w = weights ? load_weight(weights, weights_dtype, b * w_stride) : 1.0f;
    c = __fmul_rn(w, __fdiv_rn(scale, static_cast<float>(k_neg)));
    float log_sig_sum = 0.0f, sig_sum = 0.0f;
    for (int64_t k = 0; k < k_neg; ++k) {
      const float* n_row = item + neg_items[b * n_sr + k * n_sc] * i_sr;
      float un = 0.0f, nn = 0.0f;
      for (int ch = 0; ch < kChunks; ++ch) {
        const int64_t d0 = static_cast<int64_t>(ch) * kWarp * V + lane * V;
        float n[V];
        load_pack<float, V>(n_row, i_sc, d0, dim, n);
        for (int j = 0; j < V; ++j) {
          un = __fmaf_rn(u[ch][j], n[j], un);
          nn = __fmaf_rn(n[j], n[j], nn);
        }
      }
      float sig_neg;
      const float margin = score_negative(pos_score, un, nn, &squares, &log_sig_sum, &sig_sum, &sig_neg);
      const float g = __fmul_rn(c, sig_neg);
      if (lane == 0) margins[b * k_neg + k] = margin;
      for (int ch = 0; ch < kChunks; ++ch) {  // the row again (an L1 hit) rather than D more registers
        float n[V];
        load_pack<float, V>(n_row, i_sc, static_cast<int64_t>(ch) * kWarp * V + lane * V, dim, n);
        for (int j = 0; j < V; ++j) du[ch][j] = __fadd_rn(du[ch][j], __fmul_rn(g, n[j]));  // no fma: see lane_axpy
      }
    }
    g0 = __fmul_rn(-c, sig_sum);
    for (int ch = 0; ch < kChunks; ++ch) {
      const int64_t d0 = static_cast<int64_t>(ch) * kWarp * V + lane * V;
      float p[V];
      load_pack<float, V>(p_row, i_sc, d0, dim, p);
      for (int j = 0; j < V; ++j) {
        du[ch][j] = __fadd_rn(du[ch][j], __fmul_rn(g0, p[j]));
        dp[ch][j] = __fmaf_rn(g0, u[ch][j], __fmul_rn(l2_scale, p[j]));
      }
    }
    if (lane == 0) {
      rows[b] = __fadd_rn(__fmul_rn(-w, __fdiv_rn(log_sig_sum, static_cast<float>(k_neg))),
                          __fmul_rn(__fmul_rn(0.5f, l2), squares));
    }
  }
  __syncthreads();  // every row of the block is read before the block adds to any
  if (!valid) return;
  for (int64_t k = 0; k < k_neg; ++k) {
    // G_b(1+k) again from the stored margin (lane 0's store, ordered by the barrier): the same bits.
    float log_sig, sig_neg;
    logsigmoid_and_sigmoid_neg(margins[b * k_neg + k], &log_sig, &sig_neg);
    const float g = __fmul_rn(c, sig_neg);
    float* n_row = item + neg_items[b * n_sr + k * n_sc] * i_sr;
    for (int ch = 0; ch < kChunks; ++ch) {
      const int64_t d0 = static_cast<int64_t>(ch) * kWarp * V + lane * V;
      if (d0 >= dim) continue;
      // The decay re-reads the row, as Triton's kernel does: a plain load that races with
      // other warps' atomic adds to a duplicate row (Hogwild, reported by ThreadSanitizer),
      // so it is skipped when there is no decay (l2 = 0, the only case the dispatcher sends).
      float n[V] = {};
      if (l2_scale != 0.0f) load_pack<float, V>(n_row, i_sc, d0, dim, n);
      for (int j = 0; j < V; ++j)
        atomicAdd(n_row + (d0 + j) * i_sc, __fmul_rn(-lr, __fmaf_rn(g, u[ch][j], __fmul_rn(l2_scale, n[j]))));
    }
  }
  for (int ch = 0; ch < kChunks; ++ch) {
    const int64_t d0 = static_cast<int64_t>(ch) * kWarp * V + lane * V;
    if (d0 >= dim) continue;
    for (int j = 0; j < V; ++j) {
      atomicAdd(p_row + (d0 + j) * i_sc, __fmul_rn(-lr, dp[ch][j]));
      atomicAdd(u_row + (d0 + j) * u_sc, __fmul_rn(-lr, du[ch][j]));
    }
  }
}

// 16-byte accesses when every row of both tables is 16-byte aligned and whole packs.
template <typename T>
bool packs_fit(const MatrixView& a, const MatrixView& b, int64_t dim) {
  constexpr int64_t kPack = 16 / sizeof(T);
  for (const MatrixView* m : {&a, &b}) {
    if (m->stride_col != 1 || reinterpret_cast<uintptr_t>(m->data) % 16 != 0 ||
        (m->stride_row * static_cast<int64_t>(sizeof(T))) % 16 != 0) {
      return false;
    }
  }
  return dim % kPack == 0;
}

unsigned step_grid(int64_t positions) { return static_cast<unsigned>((positions + kWarps - 1) / kWarps); }

template <typename T, int V>
cudaError_t launch_step(const MatrixView& ut, const MatrixView& it, const int64_t* users, const int64_t* pos,
                        const int64_t* neg, int64_t n_sr, int64_t n_sc, const void* weights, DType wd,
                        int64_t w_stride, const DbprSortedRuns& runs, float* user_acc, float* item_acc,
                        int64_t batch, int64_t k_neg, int64_t dim, float lr, float l2, float scale,
                        const DbprStepOutputs& out, cudaStream_t stream) {
  T* user = static_cast<T*>(const_cast<void*>(ut.data));
  T* item = static_cast<T*>(const_cast<void*>(it.data));
  float* coef = out.workspace;
  float* stash = out.workspace + batch * (k_neg + 1);
  const float l2_scale = l2 * scale;
  auto user_runs = &dbpr_user_runs_kernel<T, V>;
  GF_LAUNCH(user_runs, dim3(step_grid(batch)), dim3(kThreads), 0, stream)
  (user, ut.stride_row, ut.stride_col, item, it.stride_row, it.stride_col, runs.user_keys, runs.user_order, pos, neg,
   n_sr, n_sc, weights, static_cast<int>(wd), w_stride, batch, k_neg, dim, scale, l2, out.rows, out.margins, coef,
   stash);
  cudaError_t status = cudaGetLastError();
  if (status != cudaSuccess) return status;
  auto item_runs = &dbpr_item_runs_kernel<T, V>;
  GF_LAUNCH(item_runs, dim3(step_grid(batch * (k_neg + 1))), dim3(kThreads), 0, stream)
  (user, ut.stride_row, ut.stride_col, item, it.stride_row, it.stride_col, runs.item_keys, runs.item_order, users,
   coef, batch, k_neg, dim, lr, l2_scale, item_acc);
  status = cudaGetLastError();
  if (status != cudaSuccess) return status;
  auto apply = &dbpr_apply_stash_kernel<T, V>;
  GF_LAUNCH(apply, dim3(step_grid(batch)), dim3(kThreads), 0, stream)
  (user, ut.stride_row, ut.stride_col, runs.user_keys, stash, batch, dim, lr, l2_scale, user_acc);
  return cudaGetLastError();
}

template <typename T>
cudaError_t dispatch_step(const MatrixView& ut, const MatrixView& it, const int64_t* users, const int64_t* pos,
                          const int64_t* neg, int64_t n_sr, int64_t n_sc, const void* weights, DType wd,
                          int64_t w_stride, const DbprSortedRuns& runs, float* user_acc, float* item_acc,
                          int64_t batch, int64_t k_neg, int64_t dim, float lr, float l2, float scale,
                          const DbprStepOutputs& out, cudaStream_t stream) {
  constexpr int kPack = 16 / sizeof(T);
  return packs_fit<T>(ut, it, dim)
             ? launch_step<T, kPack>(ut, it, users, pos, neg, n_sr, n_sc, weights, wd, w_stride, runs, user_acc,
                                     item_acc, batch, k_neg, dim, lr, l2, scale, out, stream)
             : launch_step<T, 1>(ut, it, users, pos, neg, n_sr, n_sc, weights, wd, w_stride, runs, user_acc,
                                 item_acc, batch, k_neg, dim, lr, l2, scale, out, stream);
}

}  // namespace

int64_t dbpr_step_workspace_floats(int64_t batch, int64_t k_neg, int64_t dim) {
  return batch * (k_neg + 1) + batch * dim;  // G (B, K+1), then the user stash (B, D)
}

cudaError_t dbpr_step(MatrixView user_table, MatrixView item_table, const int64_t* users, const int64_t* pos_items,
                      const int64_t* neg_items, int64_t neg_stride_row, int64_t neg_stride_col, const void* weights,
                      DType weights_dtype, int64_t weights_stride, const DbprSortedRuns& runs, float* user_acc,
                      float* item_acc, int64_t batch, int64_t k_neg, int64_t dim, float lr, float l2, float scale,
                      const DbprStepOutputs& out, cudaStream_t stream) {
  if (batch < 1 || k_neg < 1 || dim < 0 || batch * (k_neg + 1) > 2147483647 || !users || !pos_items ||
      !neg_items || !runs.user_keys || !runs.user_order || !runs.item_keys || !runs.item_order || !out.rows ||
      !out.margins || !out.workspace || (dim > 0 && (!user_table.data || !item_table.data)) ||
      !valid_dtype(user_table.dtype) || item_table.dtype != user_table.dtype ||
      (weights && !valid_dtype(weights_dtype)) || (user_acc == nullptr) != (item_acc == nullptr)) {
    return cudaErrorInvalidValue;
  }
  switch (user_table.dtype) {
    case DType::Float32:
      return dispatch_step<float>(user_table, item_table, users, pos_items, neg_items, neg_stride_row,
                                  neg_stride_col, weights, weights_dtype, weights_stride, runs, user_acc, item_acc,
                                  batch, k_neg, dim, lr, l2, scale, out, stream);
    case DType::Float16:
      return dispatch_step<__half>(user_table, item_table, users, pos_items, neg_items, neg_stride_row,
                                   neg_stride_col, weights, weights_dtype, weights_stride, runs, user_acc, item_acc,
                                   batch, k_neg, dim, lr, l2, scale, out, stream);
    case DType::BFloat16:
      return dispatch_step<__nv_bfloat16>(user_table, item_table, users, pos_items, neg_items, neg_stride_row,
                                          neg_stride_col, weights, weights_dtype, weights_stride, runs, user_acc,
                                          item_acc, batch, k_neg, dim, lr, l2, scale, out, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t dbpr_atomic_sgd_step(MatrixView user_table, MatrixView item_table, const int64_t* users,
                                 const int64_t* pos_items, const int64_t* neg_items, int64_t neg_stride_row,
                                 int64_t neg_stride_col, const void* weights, DType weights_dtype,
                                 int64_t weights_stride, int64_t batch, int64_t k_neg, int64_t dim, float lr, float l2,
                                 float scale, float* rows, float* margins, cudaStream_t stream) {
  if (batch < 1 || batch > 2147483647 || k_neg < 1 || dim < 0 || dim > kDbprAtomicMaxDim || !users || !pos_items ||
      !neg_items || !rows || !margins || (dim > 0 && (!user_table.data || !item_table.data)) ||
      user_table.dtype != DType::Float32 || item_table.dtype != DType::Float32 ||
      (weights && !valid_dtype(weights_dtype))) {
    return cudaErrorInvalidValue;
  }
  const bool packs = packs_fit<float>(user_table, item_table, dim);
  const int64_t most = packs ? atomic_warps<4>() : atomic_warps<1>();
  const int64_t warps = batch < most ? batch : most;
  const unsigned grid = static_cast<unsigned>((batch + warps - 1) / warps);
  auto kernel = packs ? &dbpr_atomic_sgd_kernel<4> : &dbpr_atomic_sgd_kernel<1>;
  GF_LAUNCH(kernel, dim3(grid), dim3(static_cast<unsigned>(warps * kWarp)), 0, stream)
  (static_cast<float*>(const_cast<void*>(user_table.data)), user_table.stride_row, user_table.stride_col,
   static_cast<float*>(const_cast<void*>(item_table.data)), item_table.stride_row, item_table.stride_col, users,
   pos_items, neg_items, neg_stride_row, neg_stride_col, weights, static_cast<int>(weights_dtype), weights_stride,
   batch, k_neg, dim, scale, l2, lr, rows, margins);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace guider_fast
