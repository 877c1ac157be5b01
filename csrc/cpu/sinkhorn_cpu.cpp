// CPU fast path of guider_fast's Sinkhorn and SamplesLoss (backend="cpu"), ops
// torch.ops.guider_fast_cpu.* (schemas below; fake kernels in guider_fast/_library_cpu.py).
//
// The torch reference (guider_fast/reference/sinkhorn.py) writes and rereads a (B, n, m)
// buffer in every half-iteration.  Here each problem's cost matrix is solved problem by
// problem, so it stays in cache for all iterations, and no exponential is ever stored:
//
// * a row soft-min  f_i = -eps LSE_j (h_j - C_ij / eps)  is two passes over the row in L1
//   (max, then sum of exp), both recomputing z from the cost (one FMA, cheaper than a store);
// * a column soft-min  g_j = -eps LSE_i (u_i - C_ij / eps)  folds blocks of kBlockRows rows
//   into running (max, sum) vectors over the columns: one max over the block, one rescale of
//   the sums per block, then one exp per entry;
// * a Sinkhorn iteration is both at once: after a block of rows has its new f, the same rows
//   (still in L1) are folded into the g accumulators, so the cost is read once per iteration;
// * small clouds (m <= kVerticalMaxCols) solve the row soft-min as a column soft-min of a
//   transposed copy: 16 rows per vector and no horizontal reductions.
//
// Every exp argument is clamped at EXP_FLOOR (-80): below it exp() would be a float32
// subnormal, which costs ~100x on x86, while the term is < 2e-35 next to the maximum's 1.
// exp is ATen's Vectorized<float>::exp_u20 (a degree-5 polynomial, within 20 ulp); the
// accuracy this gives is measured in tests/ops/test_cpu_fast_path.py and stays inside the
// float32 rows of tests/ops/tolerances.py.
//
// Built for one instruction set (CPU_CAPABILITY, set by guider_fast/_cpu_build.py, which
// names the library after it); at::parallel_for runs problems on torch's intra-op threads.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "../constants.h"

namespace {

using Vec = at::vec::Vectorized<float>;
namespace K = guider_fast::constants;

constexpr int64_t kW = Vec::size();
constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kExpFloor = static_cast<float>(K::EXP_FLOOR);
constexpr int64_t kCheckEvery = static_cast<int64_t>(K::SINKHORN_CHECK_EVERY);
// Rows folded into the column accumulators at once: the per-block rescale of the sums costs
// 1/16 exp per entry; measured 2-14% faster than 8 rows and 7-15% faster than 4 (the z
// vectors of 16 rows nearly fill the 32 vector registers of AVX-512).
constexpr int kBlockRows = 16;
// Up to this many columns, row soft-mins run on a transposed copy (vertical reductions):
// measured 1.5x faster at m = 32, 1.1x at 128, even at 256 (benchmarks/results/sinkhorn_cpu.md); wide rows
// amortise their horizontal reductions and need no second copy of the cost.
constexpr int64_t kVerticalMaxCols = 128;

inline Vec vexp(const Vec& z) { return z.exp_u20(); }

inline Vec floor_exp(const Vec& z) { return vexp(at::vec::clamp_min(z, Vec(kExpFloor))); }

// exp(z), exactly 0 below EXP_FLOOR: for weights that go on into matrix products, where a
// floor value of 1.8e-35 times a small coordinate would be a subnormal (slow in BLAS too).
inline Vec weight_exp(const Vec& z) {
  return Vec::blendv(Vec(0.0f), vexp(at::vec::clamp_min(z, Vec(kExpFloor))), z > Vec(kExpFloor));
}

inline float reduce_max(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::clamp_min(a, b); }, v);
}

inline float reduce_sum(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, v);
}

// ------------------------------------------------------------------------------- soft-mins

// LSE_j (h_j - k_j * inv_eps) over one row of m entries.
float row_lse(const float* k, const float* h, int64_t m, float inv_eps) {
  const Vec neg(-inv_eps);
  Vec mx0(-kInf), mx1(-kInf);
  int64_t c = 0;
  for (; c + 2 * kW <= m; c += 2 * kW) {
    mx0 = at::vec::clamp_min(mx0, at::vec::fmadd(Vec::loadu(k + c), neg, Vec::loadu(h + c)));
    mx1 = at::vec::clamp_min(mx1, at::vec::fmadd(Vec::loadu(k + c + kW), neg, Vec::loadu(h + c + kW)));
  }
  for (; c < m; c += kW) {
    const int rem = static_cast<int>(std::min<int64_t>(kW, m - c));
    Vec z = at::vec::fmadd(Vec::loadu(k + c, rem), neg, Vec::loadu(h + c, rem));
    mx0 = at::vec::clamp_min(mx0, Vec::set(Vec(-kInf), z, rem));
  }
  const float top = reduce_max(at::vec::clamp_min(mx0, mx1));
  if (!(top > -kInf)) return -kInf;  // every column has zero weight: no mass (callers avoid it)
  const Vec vtop(top);
  Vec s0(0.0f), s1(0.0f);
  c = 0;
  for (; c + 2 * kW <= m; c += 2 * kW) {
    s0 += floor_exp(at::vec::fmadd(Vec::loadu(k + c), neg, Vec::loadu(h + c)) - vtop);
    s1 += floor_exp(at::vec::fmadd(Vec::loadu(k + c + kW), neg, Vec::loadu(h + c + kW)) - vtop);
  }
  for (; c < m; c += kW) {
    const int rem = static_cast<int>(std::min<int64_t>(kW, m - c));
    Vec e = floor_exp(at::vec::fmadd(Vec::loadu(k + c, rem), neg, Vec::loadu(h + c, rem)) - vtop);
    s0 += Vec::set(Vec(0.0f), e, rem);
  }
  return top + std::log(reduce_sum(s0 + s1));
}

// Folds NR rows (pointers rowp, row terms u) into the running column log-sum-exp (M, S):
// LSE_c = M_c + log S_c over the rows folded so far, z_rc = u_r - K_rc * inv_eps.
template <int NR>
void fold_rows(const float* const* rowp, const float* u, int64_t cols, float inv_eps, float* M, float* S) {
  const Vec neg(-inv_eps);
  Vec uu[NR];
  for (int r = 0; r < NR; ++r) uu[r] = Vec(u[r]);
  for (int64_t c = 0; c < cols; c += kW) {
    const int rem = static_cast<int>(std::min<int64_t>(kW, cols - c));
    const bool full = rem == kW;
    Vec z[NR];
    Vec top(-kInf);
    for (int r = 0; r < NR; ++r) {
      const Vec kv = full ? Vec::loadu(rowp[r] + c) : Vec::loadu(rowp[r] + c, rem);
      z[r] = at::vec::fmadd(kv, neg, uu[r]);
      top = at::vec::clamp_min(top, z[r]);
    }
    const Vec m_old = full ? Vec::loadu(M + c) : Vec::loadu(M + c, rem);
    const Vec s_old = full ? Vec::loadu(S + c) : Vec::loadu(S + c, rem);
    const Vec m_new = at::vec::clamp_min(top, m_old);
    // m_old = -inf before the first block: the clamp makes exp() 0-ish and S is 0 there.
    Vec s = s_old * floor_exp(m_old - m_new);
    for (int r = 0; r < NR; ++r) s += floor_exp(z[r] - m_new);
    if (full) {
      m_new.store(M + c);
      s.store(S + c);
    } else {
      m_new.store(M + c, rem);
      s.store(S + c, rem);
    }
  }
}

void fold_any(const float* const* rowp, const float* u, int count, int64_t cols, float inv_eps, float* M,
              float* S) {
  switch (count) {
    case 1: return fold_rows<1>(rowp, u, cols, inv_eps, M, S);
    case 2: return fold_rows<2>(rowp, u, cols, inv_eps, M, S);
    case 3: return fold_rows<3>(rowp, u, cols, inv_eps, M, S);
    case 4: return fold_rows<4>(rowp, u, cols, inv_eps, M, S);
    case 5: return fold_rows<5>(rowp, u, cols, inv_eps, M, S);
    case 6: return fold_rows<6>(rowp, u, cols, inv_eps, M, S);
    case 7: return fold_rows<7>(rowp, u, cols, inv_eps, M, S);
    case 8: return fold_rows<8>(rowp, u, cols, inv_eps, M, S);
    case 9: return fold_rows<9>(rowp, u, cols, inv_eps, M, S);
    case 10: return fold_rows<10>(rowp, u, cols, inv_eps, M, S);
    case 11: return fold_rows<11>(rowp, u, cols, inv_eps, M, S);
    case 12: return fold_rows<12>(rowp, u, cols, inv_eps, M, S);
    case 13: return fold_rows<13>(rowp, u, cols, inv_eps, M, S);
    case 14: return fold_rows<14>(rowp, u, cols, inv_eps, M, S);
    case 15: return fold_rows<15>(rowp, u, cols, inv_eps, M, S);
    case 16: return fold_rows<16>(rowp, u, cols, inv_eps, M, S);
    default: TORCH_CHECK(false, "guider_fast_cpu: internal error, fold of ", count, " rows");
  }
}

// Column accumulators of one column soft-min.
struct ColumnLse {
  std::vector<float> M, S;
  // Staged rows: pointers and row terms, folded kBlockRows at a time.
  const float* rowp[kBlockRows];
  float u[kBlockRows];
  int staged = 0;
  int64_t cols = 0;
  float inv_eps = 0.0f;

  void reset(int64_t columns, float inverse_eps) {
    cols = columns;
    inv_eps = inverse_eps;
    M.assign(columns, -kInf);
    S.assign(columns, 0.0f);
    staged = 0;
  }
  void add(const float* row, float term) {
    rowp[staged] = row;
    u[staged] = term;
    if (++staged == kBlockRows) flush();
  }
  void flush() {
    if (staged > 0) fold_any(rowp, u, staged, cols, inv_eps, M.data(), S.data());
    staged = 0;
  }
  // out_c = -eps * LSE_c  (a column no row reached: +inf, as -eps * log 0).
  void finish(float eps, float* out) {
    flush();
    for (int64_t c = 0; c < cols; c += kW) {
      const int rem = static_cast<int>(std::min<int64_t>(kW, cols - c));
      Vec lse = Vec::loadu(M.data() + c, rem) + Vec::loadu(S.data() + c, rem).log();
      (lse * Vec(-eps)).store(out + c, rem);
    }
  }
};

// One (rows x cols) row-major matrix of a problem, and the soft-mins along either axis.
// Row soft-mins use a transposed copy when the rows are short (see kVerticalMaxCols).
class Matrix {
 public:
  Matrix(const float* data, int64_t rows, int64_t cols, bool vertical_rows)
      : k_(data), rows_(rows), cols_(cols), vertical_(vertical_rows) {
    if (vertical_) {
      t_.resize(rows * cols);
      for (int64_t i = 0; i < rows; ++i)
        for (int64_t j = 0; j < cols; ++j) t_[j * rows + i] = data[i * cols + j];
    }
  }
  int64_t rows() const { return rows_; }
  int64_t cols() const { return cols_; }
  const float* row(int64_t i) const { return k_ + i * cols_; }

  // out_i = -eps LSE_j (h_j - K_ij / eps); col_valid[j]: h_j is finite (zero weights are skipped
  // on the vertical path, where they would cost a full row of work for no mass).
  void row_softmin(const float* h, const uint8_t* col_valid, float eps, float* out, ColumnLse& acc) const {
    const float inv_eps = 1.0f / eps;
    if (vertical_) {
      acc.reset(rows_, inv_eps);
      for (int64_t j = 0; j < cols_; ++j)
        if (col_valid[j]) acc.add(t_.data() + j * rows_, h[j]);
      acc.finish(eps, out);
      return;
    }
    for (int64_t i = 0; i < rows_; ++i) out[i] = -eps * row_lse(row(i), h, cols_, inv_eps);
  }

  // out_j = -eps LSE_i (u_i - K_ij / eps) over the rows with row_valid[i].
  void col_softmin(const float* u, const uint8_t* row_valid, float eps, float* out, ColumnLse& acc) const {
    acc.reset(cols_, 1.0f / eps);
    for (int64_t i = 0; i < rows_; ++i)
      if (row_valid[i]) acc.add(row(i), u[i]);
    acc.finish(eps, out);
  }

  // Both soft-mins in one pass over the matrix (the rows' block is still in L1 when its
  // rows are folded into the columns): out_rows from h; out_cols from the row terms
  // u_i = row_base_i + (use_new_rows ? out_rows_i : row_pot_i) / eps.
  void both_softmins(const float* h, const uint8_t* col_valid, const float* row_base, const float* row_pot,
                     bool use_new_rows, const uint8_t* row_valid, float eps, float* out_rows, float* out_cols,
                     ColumnLse& row_acc, ColumnLse& col_acc) const {
    const float inv_eps = 1.0f / eps;
    if (vertical_) {
      row_softmin(h, col_valid, eps, out_rows, row_acc);
      const float* pot = use_new_rows ? out_rows : row_pot;
      col_acc.reset(cols_, inv_eps);
      for (int64_t i = 0; i < rows_; ++i)
        if (row_valid[i]) col_acc.add(row(i), row_base[i] + pot[i] * inv_eps);
      col_acc.finish(eps, out_cols);
      return;
    }
    col_acc.reset(cols_, inv_eps);
    for (int64_t i0 = 0; i0 < rows_; i0 += kBlockRows) {
      const int64_t i1 = std::min(rows_, i0 + kBlockRows);
      for (int64_t i = i0; i < i1; ++i) out_rows[i] = -eps * row_lse(row(i), h, cols_, inv_eps);
      const float* pot = use_new_rows ? out_rows : row_pot;
      for (int64_t i = i0; i < i1; ++i)
        if (row_valid[i]) col_acc.add(row(i), row_base[i] + pot[i] * inv_eps);
    }
    col_acc.finish(eps, out_cols);
  }

 private:
  const float* k_;
  int64_t rows_, cols_;
  bool vertical_;
  std::vector<float> t_;
};

// h_j = base_j + pot_j / eps
void shifted(const float* base, const float* pot, int64_t count, float eps, float* out) {
  const float inv_eps = 1.0f / eps;
  for (int64_t j = 0; j < count; ++j) out[j] = base[j] + pot[j] * inv_eps;
}

// sum_i a_i |exp((f_before_i - f_after_i) / eps) - 1|  (reference: _row_marginal_error)
float row_marginal_error(const float* f_before, const float* f_after, const float* a, int64_t n, float eps) {
  float total = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    const float ratio = std::exp(std::min((f_before[i] - f_after[i]) / eps, 80.0f));
    total += std::abs(a[i] * (ratio - 1.0f));
  }
  return total;
}

// ----------------------------------------------------------------------------- checks

void check_float_contiguous(const char* op, const char* name, const at::Tensor& t, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu(), op, ": argument '", name, "' must be a CPU tensor, got ", t.device().str());
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": argument '", name, "' must be float32, got ",
              c10::toString(t.scalar_type()));
  TORCH_CHECK(t.dim() == dim, op, ": argument '", name, "' must have ", dim, " dimensions, got shape ",
              t.sizes());
}

void check_shape(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef want) {
  TORCH_CHECK(t.sizes() == want, op, ": argument '", name, "' must have shape ", want, ", got ", t.sizes());
}

void check_eps(const char* op, double eps) {
  TORCH_CHECK(std::isfinite(eps) && eps > 0, op, ": argument 'eps' must be positive and finite, got ", eps);
}

std::vector<uint8_t> positive(const float* w, int64_t count) {
  std::vector<uint8_t> out(count);
  for (int64_t i = 0; i < count; ++i) out[i] = w[i] > 0.0f;
  return out;
}

std::vector<float> log_weights(const float* w, int64_t count) {
  std::vector<float> out(count);
  for (int64_t i = 0; i < count; ++i) out[i] = w[i] > 0.0f ? std::log(w[i]) : -kInf;
  return out;
}

// --------------------------------------------------------------------------------- ops

// Batched log-domain Sinkhorn on a precomputed cost (B, n, m), POT's update order from g = 0.
// Returns (f (B, n), g (B, m), marginal_error (B,), iterations (B,) int32); each problem stops
// at the first check (every SINKHORN_CHECK_EVERY iterations) where its row-marginal L1 error
// is <= tol, as the reference's loop does for the whole batch.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sinkhorn(const at::Tensor& cost_in, const at::Tensor& a_in,
                                                                    const at::Tensor& b_in, double eps_d,
                                                                    int64_t n_iters, std::optional<double> tol) {
  const char* op = "guider_fast_cpu::sinkhorn";
  check_float_contiguous(op, "cost", cost_in, 3);
  const int64_t batch = cost_in.size(0), n = cost_in.size(1), m = cost_in.size(2);
  check_float_contiguous(op, "a", a_in, 2);
  check_float_contiguous(op, "b", b_in, 2);
  check_shape(op, "a", a_in, {batch, n});
  check_shape(op, "b", b_in, {batch, m});
  check_eps(op, eps_d);
  TORCH_CHECK(n_iters >= 1, op, ": argument 'n_iters' must be >= 1, got ", n_iters);
  const at::Tensor cost = cost_in.contiguous(), a = a_in.contiguous(), b = b_in.contiguous();
  at::Tensor f = at::zeros({batch, n}, cost.options());
  at::Tensor g = at::zeros({batch, m}, cost.options());
  at::Tensor error = at::empty({batch}, cost.options());
  at::Tensor iterations = at::empty({batch}, cost.options().dtype(at::kInt));
  const float eps = static_cast<float>(eps_d);
  const bool use_tol = tol.has_value();
  const float tol_f = use_tol ? static_cast<float>(*tol) : 0.0f;
  const float* cost_p = cost.data_ptr<float>();
  const float* a_p = a.data_ptr<float>();
  const float* b_p = b.data_ptr<float>();
  float* f_p = f.data_ptr<float>();
  float* g_p = g.data_ptr<float>();
  float* err_p = error.data_ptr<float>();
  int32_t* it_p = iterations.data_ptr<int32_t>();

  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    ColumnLse row_acc, col_acc;
    std::vector<float> h(m), u(n), f_new(n);
    for (int64_t p = begin; p < end; ++p) {
      const float* ap = a_p + p * n;
      const float* bp = b_p + p * m;
      float* fp = f_p + p * n;
      float* gp = g_p + p * m;
      const Matrix c(cost_p + p * n * m, n, m, m <= kVerticalMaxCols);
      const std::vector<uint8_t> a_valid = positive(ap, n), b_valid = positive(bp, m);
      const std::vector<float> log_a = log_weights(ap, n), log_b = log_weights(bp, m);
      int64_t done = n_iters;
      bool stopped = false;
      for (int64_t it = 0; it < n_iters; ++it) {
        shifted(log_b.data(), gp, m, eps, h.data());
        if (use_tol && it > 0 && it % kCheckEvery == 0) {
          // A check: the whole f update first, so that a stop returns the (f, g) it was measured on.
          c.row_softmin(h.data(), b_valid.data(), eps, f_new.data(), row_acc);
          const float err = row_marginal_error(fp, f_new.data(), ap, n, eps);
          if (err <= tol_f) {
            err_p[p] = err;
            done = it;
            stopped = true;
            break;
          }
          std::copy(f_new.begin(), f_new.end(), fp);
          shifted(log_a.data(), fp, n, eps, u.data());
          c.col_softmin(u.data(), a_valid.data(), eps, gp, col_acc);
        } else {
          c.both_softmins(h.data(), b_valid.data(), log_a.data(), nullptr, true, a_valid.data(), eps, fp, gp,
                          row_acc, col_acc);
        }
      }
      if (!stopped) {
        shifted(log_b.data(), gp, m, eps, h.data());
        c.row_softmin(h.data(), b_valid.data(), eps, f_new.data(), row_acc);
        err_p[p] = row_marginal_error(fp, f_new.data(), ap, n, eps);
      }
      it_p[p] = static_cast<int32_t>(done);
    }
  });
  return {f, g, error, iterations};
}

// The envelope backward's plan weights, in place over a cost block (B, r, m) of rows r:
// W_ij = scale_b [a_i > 0][b_j > 0] exp(log a_i + log b_j + (f_i + g_j - C_ij) / eps), divided by
// C_ij for p=1 (0 where C_ij = 0): the reference's _envelope_block times the upstream scale,
// except that entries below exp(EXP_FLOOR) are 0 rather than exp(EXP_FLOOR) (see weight_exp).  Returns (row sums (B, r), column sums (B, m)); the point gradients are then
// rowsum_i x_i - (W y)_i and colsum_j y_j - (W^T x)_j (two matrix products, left to BLAS).
std::tuple<at::Tensor, at::Tensor> plan_weights_(at::Tensor& cost, const at::Tensor& a_in, const at::Tensor& b_in,
                                                 const at::Tensor& f_in, const at::Tensor& g_in, double eps_d,
                                                 int64_t p_norm, const at::Tensor& scale_in) {
  const char* op = "guider_fast_cpu::plan_weights_";
  check_float_contiguous(op, "cost", cost, 3);
  TORCH_CHECK(cost.is_contiguous(), op, ": argument 'cost' must be contiguous (it is overwritten in place)");
  const int64_t batch = cost.size(0), rows = cost.size(1), m = cost.size(2);
  for (const auto& [name, t, count] : {std::tuple<const char*, const at::Tensor&, int64_t>{"a", a_in, rows},
                                       {"f", f_in, rows}, {"b", b_in, m}, {"g", g_in, m}}) {
    check_float_contiguous(op, name, t, 2);
    check_shape(op, name, t, {batch, count});
  }
  check_float_contiguous(op, "scale", scale_in, 1);
  check_shape(op, "scale", scale_in, {batch});
  check_eps(op, eps_d);
  TORCH_CHECK(p_norm == 1 || p_norm == 2, op, ": argument 'p' must be 1 or 2, got ", p_norm);
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous(), f = f_in.contiguous(), g = g_in.contiguous(),
                   scale = scale_in.contiguous();
  at::Tensor rowsum = at::empty({batch, rows}, cost.options());
  at::Tensor colsum = at::zeros({batch, m}, cost.options());
  const float eps = static_cast<float>(eps_d), inv_eps = 1.0f / eps;
  const float distance_floor = static_cast<float>(K::DISTANCE_FLOOR);
  float* w_p = cost.data_ptr<float>();
  const float *a_p = a.data_ptr<float>(), *b_p = b.data_ptr<float>(), *f_p = f.data_ptr<float>(),
              *g_p = g.data_ptr<float>(), *s_p = scale.data_ptr<float>();
  float *rs_p = rowsum.data_ptr<float>(), *cs_p = colsum.data_ptr<float>();
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> col(m), mask(m);
    for (int64_t q = begin; q < end; ++q) {
      for (int64_t j = 0; j < m; ++j) {
        const float bj = b_p[q * m + j];
        mask[j] = bj > 0.0f ? s_p[q] : 0.0f;
        col[j] = bj > 0.0f ? std::log(bj) + g_p[q * m + j] * inv_eps : 0.0f;
      }
      float* colsum_q = cs_p + q * m;
      for (int64_t i = 0; i < rows; ++i) {
        float* w = w_p + (q * rows + i) * m;
        const float ai = a_p[q * rows + i];
        if (!(ai > 0.0f)) {
          std::fill(w, w + m, 0.0f);
          rs_p[q * rows + i] = 0.0f;
          continue;
        }
        const Vec row_term(std::log(ai) + f_p[q * rows + i] * inv_eps), neg(-inv_eps);
        Vec total(0.0f);
        for (int64_t c = 0; c < m; c += kW) {
          const int rem = static_cast<int>(std::min<int64_t>(kW, m - c));
          const Vec cv = Vec::loadu(w + c, rem);
          Vec wv = weight_exp(at::vec::fmadd(cv, neg, row_term + Vec::loadu(col.data() + c, rem))) *
                   Vec::loadu(mask.data() + c, rem);
          if (p_norm == 1) {
            const Vec inverse = Vec(1.0f) / at::vec::clamp_min(cv, Vec(distance_floor));
            wv = Vec::blendv(Vec(0.0f), wv * inverse, cv > Vec(0.0f));
          }
          wv = Vec::set(Vec(0.0f), wv, rem);
          wv.store(w + c, rem);
          total += wv;
          (Vec::loadu(colsum_q + c, rem) + wv).store(colsum_q + c, rem);
        }
        rs_p[q * rows + i] = reduce_sum(total);
      }
    }
  });
  return {rowsum, colsum};
}

// GeomLoss's last-extrapolation backward weights, in place over its cost (B, n, m):
// W_ij = scale_i softmax_j(col_j - C_ij / eps), divided by C_ij for p=1 where C_ij is above
// GeomLoss's sqrt floor (its gradient is 0 where the cost is clamped).  Rows are normalised by
// their own log-sum-exp, so the extrapolated potential's rounding does not enter.  Returns
// the row sums (B, n); the gradient is rowsum_i u_i - (W v)_i.
at::Tensor softmax_weights_(at::Tensor& cost, const at::Tensor& col_in, const at::Tensor& scale_in, double eps_d,
                            int64_t p_norm) {
  const char* op = "guider_fast_cpu::softmax_weights_";
  check_float_contiguous(op, "cost", cost, 3);
  TORCH_CHECK(cost.is_contiguous(), op, ": argument 'cost' must be contiguous (it is overwritten in place)");
  const int64_t batch = cost.size(0), n = cost.size(1), m = cost.size(2);
  check_float_contiguous(op, "col", col_in, 2);
  check_shape(op, "col", col_in, {batch, m});
  check_float_contiguous(op, "scale", scale_in, 2);
  check_shape(op, "scale", scale_in, {batch, n});
  check_eps(op, eps_d);
  TORCH_CHECK(p_norm == 1 || p_norm == 2, op, ": argument 'p' must be 1 or 2, got ", p_norm);
  const at::Tensor col = col_in.contiguous(), scale = scale_in.contiguous();
  at::Tensor rowsum = at::empty({batch, n}, cost.options());
  const float inv_eps = 1.0f / static_cast<float>(eps_d);
  const float cost_floor = std::sqrt(static_cast<float>(K::GEOMLOSS_SQRT_FLOOR));
  float* w_p = cost.data_ptr<float>();
  const float *col_p = col.data_ptr<float>(), *s_p = scale.data_ptr<float>();
  float* rs_p = rowsum.data_ptr<float>();
  at::parallel_for(0, batch * n, 64, [&](int64_t begin, int64_t end) {
    const Vec neg(-inv_eps);
    for (int64_t r = begin; r < end; ++r) {
      const float* h = col_p + (r / n) * m;
      float* w = w_p + r * m;
      const float top = row_lse(w, h, m, inv_eps);  // weights sum to 1: exp(z - lse)
      const Vec vtop(top);
      Vec total(0.0f);
      const Vec factor(s_p[r]);
      for (int64_t c = 0; c < m; c += kW) {
        const int rem = static_cast<int>(std::min<int64_t>(kW, m - c));
        const Vec cv = Vec::loadu(w + c, rem);
        Vec wv = weight_exp(at::vec::fmadd(cv, neg, Vec::loadu(h + c, rem)) - vtop) * factor;
        if (p_norm == 1) wv = Vec::blendv(Vec(0.0f), wv / cv, cv > Vec(cost_floor));
        wv = Vec::set(Vec(0.0f), wv, rem);
        wv.store(w + c, rem);
        total += wv;
      }
      rs_p[r] = reduce_sum(total);
    }
  });
  return rowsum;
}

// GeomLoss's annealed symmetric loop (reference: annealed_potentials) and its last
// extrapolation, per problem on precomputed GeomLoss costs C(x, y) and, debiased, C(x, x),
// C(y, y).  a_log / b_log are GeomLoss's log weights; a, b say which points carry mass (rows
// of zero weight are skipped in column reductions, where the reference adds exp(-1e5) = 0).
// Returns (B, 2 (n + m) (1 + debias)): f_ba, g_ab, f_new, g_new[, f_aa, g_bb, f_aa_new, g_bb_new].
at::Tensor samples_loss(const at::Tensor& c_xy_in, const std::optional<at::Tensor>& c_xx_in,
                        const std::optional<at::Tensor>& c_yy_in, const at::Tensor& a_in, const at::Tensor& b_in,
                        const at::Tensor& a_log_in, const at::Tensor& b_log_in, at::ArrayRef<double> eps_list) {
  const char* op = "guider_fast_cpu::samples_loss";
  check_float_contiguous(op, "c_xy", c_xy_in, 3);
  const int64_t batch = c_xy_in.size(0), n = c_xy_in.size(1), m = c_xy_in.size(2);
  const bool debias = c_xx_in.has_value();
  TORCH_CHECK(debias == c_yy_in.has_value(), op, ": arguments 'c_xx' and 'c_yy' must both be given (debiased) ",
              "or both be None");
  if (debias) {
    check_float_contiguous(op, "c_xx", *c_xx_in, 3);
    check_shape(op, "c_xx", *c_xx_in, {batch, n, n});
    check_float_contiguous(op, "c_yy", *c_yy_in, 3);
    check_shape(op, "c_yy", *c_yy_in, {batch, m, m});
  }
  for (const auto& [name, t, count] : {std::tuple<const char*, const at::Tensor&, int64_t>{"a", a_in, n},
                                       {"a_log", a_log_in, n}, {"b", b_in, m}, {"b_log", b_log_in, m}}) {
    check_float_contiguous(op, name, t, 2);
    check_shape(op, name, t, {batch, count});
  }
  TORCH_CHECK(!eps_list.empty(), op, ": argument 'eps_list' must not be empty");
  for (double e : eps_list) check_eps(op, e);
  const at::Tensor c_xy = c_xy_in.contiguous(), a = a_in.contiguous(), b = b_in.contiguous(),
                   a_log = a_log_in.contiguous(), b_log = b_log_in.contiguous();
  const at::Tensor c_xx = debias ? c_xx_in->contiguous() : at::Tensor();
  const at::Tensor c_yy = debias ? c_yy_in->contiguous() : at::Tensor();
  const int64_t width = 2 * (n + m) * (debias ? 2 : 1);
  at::Tensor packed = at::empty({batch, width}, c_xy.options());
  const std::vector<float> eps_f(eps_list.begin(), eps_list.end());
  const float *cxy_p = c_xy.data_ptr<float>(), *a_p = a.data_ptr<float>(), *b_p = b.data_ptr<float>(),
              *la_p = a_log.data_ptr<float>(), *lb_p = b_log.data_ptr<float>();
  const float* cxx_p = debias ? c_xx.data_ptr<float>() : nullptr;
  const float* cyy_p = debias ? c_yy.data_ptr<float>() : nullptr;
  float* out_p = packed.data_ptr<float>();

  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    ColumnLse row_acc, col_acc;
    std::vector<float> h(std::max(n, m)), ft(n), gt(m), zeros(n, 0.0f);
    for (int64_t q = begin; q < end; ++q) {
      const float* la = la_p + q * n;
      const float* lb = lb_p + q * m;
      const std::vector<uint8_t> a_valid = positive(a_p + q * n, n), b_valid = positive(b_p + q * m, m);
      float* out = out_p + q * width;
      float *f_ba = out, *g_ab = f_ba + n, *f_new = g_ab + m, *g_new = f_new + n;
      float *f_aa = g_new + m, *g_bb = f_aa + n, *f_aa_new = g_bb + m, *g_bb_new = f_aa_new + n;
      const Matrix cxy(cxy_p + q * n * m, n, m, m <= kVerticalMaxCols);
      std::optional<Matrix> cxx, cyy;
      if (debias) {
        cxx.emplace(cxx_p + q * n * n, n, n, n <= kVerticalMaxCols);
        cyy.emplace(cyy_p + q * m * m, m, m, m <= kVerticalMaxCols);
      }
      auto self_update = [&](const Matrix& c, const float* lw, const uint8_t* valid, float* pot, int64_t size,
                             float eps, float* out_pot) {
        shifted(lw, pot, size, eps, h.data());
        c.row_softmin(h.data(), valid, eps, out_pot, row_acc);
      };
      const float eps0 = eps_f.front();
      // First potentials from the weights alone (reference: softmin_ of the log weights).
      cxy.both_softmins(lb, b_valid.data(), la, zeros.data(), false, a_valid.data(), eps0, f_ba, g_ab, row_acc,
                        col_acc);
      if (debias) {
        cxx->row_softmin(la, a_valid.data(), eps0, f_aa, row_acc);
        cyy->row_softmin(lb, b_valid.data(), eps0, g_bb, row_acc);
      }
      for (const float eps : eps_f) {
        // Symmetric (Jacobi) updates: both halves from the previous potentials, then averaged.
        shifted(lb, g_ab, m, eps, h.data());
        cxy.both_softmins(h.data(), b_valid.data(), la, f_ba, false, a_valid.data(), eps, ft.data(), gt.data(),
                          row_acc, col_acc);
        for (int64_t i = 0; i < n; ++i) f_ba[i] = (f_ba[i] + ft[i]) * 0.5f;
        for (int64_t j = 0; j < m; ++j) g_ab[j] = (g_ab[j] + gt[j]) * 0.5f;
        if (debias) {
          self_update(*cxx, la, a_valid.data(), f_aa, n, eps, ft.data());
          self_update(*cyy, lb, b_valid.data(), g_bb, m, eps, gt.data());
          for (int64_t i = 0; i < n; ++i) f_aa[i] = (f_aa[i] + ft[i]) * 0.5f;
          for (int64_t j = 0; j < m; ++j) g_bb[j] = (g_bb[j] + gt[j]) * 0.5f;
        }
      }
      // The last extrapolation (the step GeomLoss differentiates), at the last eps.
      const float eps = eps_f.back();
      shifted(lb, g_ab, m, eps, h.data());
      cxy.both_softmins(h.data(), b_valid.data(), la, f_ba, false, a_valid.data(), eps, f_new, g_new, row_acc,
                        col_acc);
      if (debias) {
        self_update(*cxx, la, a_valid.data(), f_aa, n, eps, f_aa_new);
        self_update(*cyy, lb, b_valid.data(), g_bb, m, eps, g_bb_new);
      }
    }
  });
  return packed;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(guider_fast_cpu, m) {
  m.def("sinkhorn(Tensor cost, Tensor a, Tensor b, float eps, int n_iters, float? tol) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("plan_weights_(Tensor(a!) cost, Tensor a, Tensor b, Tensor f, Tensor g, float eps, int p, "
        "Tensor scale) -> (Tensor, Tensor)");
  m.def("softmax_weights_(Tensor(a!) cost, Tensor col, Tensor scale, float eps, int p) -> Tensor");
  m.def("samples_loss(Tensor c_xy, Tensor? c_xx, Tensor? c_yy, Tensor a, Tensor b, Tensor a_log, "
        "Tensor b_log, float[] eps_list) -> Tensor");
}

TORCH_LIBRARY_IMPL(guider_fast_cpu, CPU, m) {
  m.impl("sinkhorn", &sinkhorn);
  m.impl("plan_weights_", &plan_weights_);
  m.impl("softmax_weights_", &softmax_weights_);
  m.impl("samples_loss", &samples_loss);
}
