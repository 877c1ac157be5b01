// Tests of the CUDA emulation (csrc/sim) and of csrc's kernels run through it.
//
// Built with g++ by tests/csrc/conftest.py together with csrc/sim/cuda_sim.cpp
// and csrc/*.cu (plain, ASan+UBSan and TSan builds).  Usage:
//   sim_tests list            names of the tests
//   sim_tests all             every test except the planted sanitizer bugs
//   sim_tests run NAME...     the named tests
// Exit status 0 when every test passed; each test prints "PASS name (seconds)".
#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <map>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "cuda_compat.h"
#include "guider_fast_cuda.h"

namespace gfc = guider_fast::cuda;

// ------------------------------------------------------------------ a tiny test registry
struct TestFailure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

#define CHECK(cond)                                                                              \
  do {                                                                                           \
    if (!(cond)) {                                                                               \
      std::ostringstream _s;                                                                     \
      _s << __FILE__ << ":" << __LINE__ << ": CHECK(" #cond ") failed";                           \
      throw TestFailure(_s.str());                                                               \
    }                                                                                            \
  } while (0)

#define CHECK_MSG(cond, msg)                                                                     \
  do {                                                                                           \
    if (!(cond)) {                                                                               \
      std::ostringstream _s;                                                                     \
      _s << __FILE__ << ":" << __LINE__ << ": CHECK(" #cond ") failed: " << msg;                  \
      throw TestFailure(_s.str());                                                               \
    }                                                                                            \
  } while (0)

struct Test {
  std::function<void()> fn;
  bool in_all;  // false: planted sanitizer bugs, run only by name
};

std::map<std::string, Test>& registry() {
  static std::map<std::string, Test> r;
  return r;
}

struct Register {
  Register(const char* name, std::function<void()> fn, bool in_all = true) { registry()[name] = Test{fn, in_all}; }
};

#define TEST(name)                                      \
  void test_##name();                                   \
  static Register register_##name(#name, test_##name);  \
  void test_##name()

#define PLANTED(name)                                          \
  void planted_##name();                                       \
  static Register register_##name(#name, planted_##name, false); \
  void planted_##name()

const cuda_sim::Order kOrders[] = {cuda_sim::Order::Forward, cuda_sim::Order::Reverse, cuda_sim::Order::Random};
const char* order_name(cuda_sim::Order o) {
  return o == cuda_sim::Order::Forward ? "forward" : (o == cuda_sim::Order::Reverse ? "reverse" : "random");
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

std::string bits_of(float x) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.9g (0x%08x)", x, __float_as_uint(x));
  return buf;
}

// Expects `fn` to throw cuda_sim::SimError of `kind` whose message contains every one of `needles`.
void expect_sim_error(const std::string& kind, const std::vector<std::string>& needles, const std::function<void()>& fn) {
  for (cuda_sim::Order order : kOrders) {
    cuda_sim::set_thread_order(order, 7);
    try {
      fn();
    } catch (const cuda_sim::SimError& e) {
      CHECK_MSG(e.kind() == kind, "expected " << kind << ", got " << e.kind() << ": " << e.what());
      for (const auto& n : needles) CHECK_MSG(std::string(e.what()).find(n) != std::string::npos, "'" << n << "' not in: " << e.what());
      CHECK(cudaGetLastError() == cudaErrorLaunchFailure);
      continue;
    }
    CHECK_MSG(false, "no " << kind << " error reported (" << order_name(order) << " order)");
  }
  cuda_sim::set_thread_order(cuda_sim::Order::Forward);
}

// ------------------------------------------------------------------ random inputs
struct Matrix {
  gfc::DType dtype;
  int64_t rows, cols, stride_row, stride_col;
  std::vector<uint16_t> half;  // storage for 16-bit dtypes
  std::vector<float> single;   // storage for float32
  std::vector<float> value;    // value[r * cols + c]: the element as float (what the kernel reads)
  gfc::MatrixView view() const {
    const void* p = dtype == gfc::DType::Float32 ? static_cast<const void*>(single.data()) : half.data();
    return gfc::MatrixView{p, dtype, stride_row, stride_col};
  }
  float at(int64_t r, int64_t c) const { return value[r * cols + c]; }
};

float quantize(float x, gfc::DType dtype, uint16_t* bits) {
  if (dtype == gfc::DType::Float16) {
    __half h = __float2half_rn(x);
    *bits = h.__x;
    return __half2float(h);
  }
  __nv_bfloat16 h = __float2bfloat16_rn(x);
  *bits = h.__x;
  return __bfloat162float(h);
}

// zeros: fraction of exact zeros (ternary codes); transposed: column-major storage.
Matrix random_matrix(std::mt19937& rng, gfc::DType dtype, int64_t rows, int64_t cols, double zeros, bool transposed,
                     float scale = 1.0f) {
  Matrix m{dtype, rows, cols, transposed ? 1 : cols, transposed ? rows : 1, {}, {}, {}};
  std::normal_distribution<float> normal(0.0f, scale);
  std::uniform_real_distribution<double> unit(0.0, 1.0);
  const size_t n = static_cast<size_t>(rows * cols);
  m.value.resize(n);
  if (dtype == gfc::DType::Float32) m.single.resize(n); else m.half.resize(n);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      float x = unit(rng) < zeros ? 0.0f : normal(rng);
      const size_t at = static_cast<size_t>(r * m.stride_row + c * m.stride_col);
      if (dtype == gfc::DType::Float32) {
        m.single[at] = x;
      } else {
        x = quantize(x, dtype, &m.half[at]);
      }
      m.value[static_cast<size_t>(r * cols + c)] = x;
    }
  }
  return m;
}

// ------------------------------------------------------------------ CPU reference (the kernels' summation order)
float butterfly(std::array<float, 32> lanes) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    std::array<float, 32> next;
    for (int l = 0; l < 32; ++l) next[l] = lanes[l] + lanes[l ^ offset];
    lanes = next;
  }
  return lanes[0];
}

float p1(float xx, float xy, float yy) { return std::sqrt(std::fmax((xx + -2.0f * xy) + yy, 1e-8f)); }

float ref_distance(const Matrix& t, const Matrix& v, int64_t r, bool euclidean) {
  std::array<float, 32> tt{}, vv{}, tv{}, dd{};
  for (int64_t k = 0; k < t.cols; ++k) {
    const int l = static_cast<int>(k % 32);
    const float a = t.at(r, k), b0 = v.at(r, k);
    if (euclidean) {
      const float diff = a - b0;
      dd[l] = std::fma(diff, diff, dd[l]);
    } else {
      const float b = b0 + 1e-8f;
      tt[l] = std::fma(a, a, tt[l]);
      vv[l] = std::fma(b, b, vv[l]);
      tv[l] = std::fma(a, b, tv[l]);
    }
  }
  if (euclidean) return std::sqrt(butterfly(dd));
  const float stt = butterfly(tt), svv = butterfly(vv), stv = butterfly(tv);
  return p1(stt, stv, svv) - (p1(stt, stt, stt) + p1(svv, svv, svv)) / 2.0f;
}

int sgn(float x) { return (x > 0) - (x < 0); }

float ref_weight(int st, int sv, int64_t bits) {
  const float fb = static_cast<float>(bits);
  const float a = static_cast<float>(st) / fb, b = static_cast<float>(sv) / fb;
  const float w = ((a + 1.0f) / 2.0f + (b + 1.0f) / 2.0f) / 2.0f;
  return std::fmin(std::fmax(w, 0.0f), 1.0f);
}

struct Outputs {
  std::vector<float> weights, distance, normalized;
  std::vector<uint8_t> clean;
  explicit Outputs(int64_t b) : weights(b), distance(b), normalized(b), clean(b) {}
  bool operator==(const Outputs& o) const {
    return same_bits(weights, o.weights) && same_bits(distance, o.distance) && same_bits(normalized, o.normalized) &&
           clean == o.clean;
  }
};

void ref_finish(Outputs& out, const std::vector<float>& candidate, float threshold) {
  float lo = INFINITY, hi = -INFINITY;
  for (float d : out.distance) {
    lo = std::fmin(lo, d);
    hi = std::fmax(hi, d);
  }
  const float range = (hi - lo) + 1e-7f;
  for (size_t i = 0; i < out.distance.size(); ++i) {
    out.normalized[i] = (out.distance[i] - lo) / range;
    out.clean[i] = out.normalized[i] < threshold;
    out.weights[i] = out.clean[i] ? candidate[i] : 1.0f;
  }
}

void compare(const Outputs& got, const Outputs& want, const std::string& what) {
  for (size_t i = 0; i < got.weights.size(); ++i) {
    CHECK_MSG(__float_as_uint(got.distance[i]) == __float_as_uint(want.distance[i]),
              what << " row " << i << " distance " << bits_of(got.distance[i]) << " vs " << bits_of(want.distance[i]));
    CHECK_MSG(__float_as_uint(got.normalized[i]) == __float_as_uint(want.normalized[i]),
              what << " row " << i << " normalized " << bits_of(got.normalized[i]) << " vs "
                   << bits_of(want.normalized[i]));
    CHECK_MSG(got.clean[i] == want.clean[i], what << " row " << i << " clean");
    CHECK_MSG(__float_as_uint(got.weights[i]) == __float_as_uint(want.weights[i]),
              what << " row " << i << " weight " << bits_of(got.weights[i]) << " vs " << bits_of(want.weights[i]));
  }
}

// ------------------------------------------------------------------ calibration: rows
struct RowsCase {
  int64_t batch, dim, bits;
  gfc::DType feat, code;
  bool euclidean, transposed;
};

Outputs run_rows(const RowsCase& c, const Matrix& t, const Matrix& v, const Matrix& u, const Matrix& tc,
                 const Matrix& vc, float threshold) {
  Outputs out(c.batch);
  std::vector<float> workspace(static_cast<size_t>(gfc::calibration_workspace_floats(c.batch)), NAN);
  gfc::CalibrationOutputs o{out.weights.data(), out.clean.data(), out.distance.data(), out.normalized.data(),
                            workspace.data()};
  const cudaError_t status = gfc::calibrate_rows(t.view(), v.view(), u.view(), tc.view(), vc.view(), c.batch, c.dim,
                                                 c.bits, threshold, c.euclidean, o, nullptr);
  CHECK_MSG(status == cudaSuccess, cudaGetErrorString(status) << ": " << cuda_sim::last_error_message());
  return out;
}

void check_rows(const std::vector<RowsCase>& cases) {
  std::mt19937 rng(1234);
  for (const RowsCase& c : cases) {
    const Matrix t = random_matrix(rng, c.feat, c.batch, c.dim, 0.0, c.transposed);
    // v close to t on some rows (clean ones), far on others.
    Matrix v = random_matrix(rng, c.feat, c.batch, c.dim, 0.0, false, 0.5f);
    const Matrix u = random_matrix(rng, c.code, c.batch, c.bits, 0.2, false);
    const Matrix tc = random_matrix(rng, c.code, c.batch, c.bits, 0.2, c.transposed);
    const Matrix vc = random_matrix(rng, c.code, c.batch, c.bits, 0.2, false);
    const float threshold = 0.6f;
    Outputs want(c.batch);
    std::vector<float> candidate(c.batch);
    for (int64_t r = 0; r < c.batch; ++r) {
      want.distance[r] = ref_distance(t, v, r, c.euclidean);
      int st = 0, sv = 0;
      for (int64_t j = 0; j < c.bits; ++j) {
        st += sgn(u.at(r, j)) * sgn(tc.at(r, j));
        sv += sgn(u.at(r, j)) * sgn(vc.at(r, j));
      }
      candidate[r] = ref_weight(st, sv, c.bits);
    }
    ref_finish(want, candidate, threshold);
    std::ostringstream what;
    what << "rows B=" << c.batch << " d=" << c.dim << " bits=" << c.bits << " feat=" << int(c.feat)
         << " code=" << int(c.code) << (c.euclidean ? " euclidean" : " geomloss") << (c.transposed ? " strided" : "");
    std::vector<Outputs> results;
    for (cuda_sim::Order order : kOrders) {
      cuda_sim::set_thread_order(order, 99);
      results.push_back(run_rows(c, t, v, u, tc, vc, threshold));
      compare(results.back(), want, what.str() + " " + order_name(order));
    }
    CHECK_MSG(results[0] == results[1] && results[0] == results[2], what.str() << ": thread orders disagree");
  }
  cuda_sim::set_thread_order(cuda_sim::Order::Forward);
}

constexpr gfc::DType F32 = gfc::DType::Float32, F16 = gfc::DType::Float16, BF16 = gfc::DType::BFloat16;

TEST(calibration_rows) {
  // Every batch, feature and code size of the sweep appears with every dtype;
  // odd sizes straddle the warp (32), word (64) and block (32 rows) boundaries.
  check_rows({
      {1, 1, 1, F32, F32, false, false},     {1, 5, 63, F16, BF16, true, false},
      {7, 64, 64, F32, F16, false, false},    {7, 70, 65, BF16, F32, false, true},
      {33, 5, 130, F16, F16, false, false},   {33, 1, 64, BF16, BF16, true, false},
      {33, 70, 1, F32, BF16, true, true},     {130, 64, 65, F32, F32, false, false},
      {130, 70, 130, BF16, F16, false, false}, {130, 5, 63, F16, F32, true, false},
      {7, 0, 5, F32, F32, false, false},
  });
}

TEST(calibration_rows_small) {  // the sanitizer builds' share of the sweep
  check_rows({{1, 1, 1, F32, F32, false, false},
              {7, 70, 65, BF16, F16, false, true},
              {33, 5, 130, F16, BF16, true, false}});
}

// ------------------------------------------------------------------ calibration: cached
struct Packed {
  std::vector<int64_t> sign, nonzero;
};

Packed pack(const Matrix& codes) {
  const int64_t words = (codes.cols + 63) / 64;
  Packed p{std::vector<int64_t>(codes.rows * words, 0), std::vector<int64_t>(codes.rows * words, 0)};
  for (int64_t r = 0; r < codes.rows; ++r) {
    for (int64_t j = 0; j < codes.cols; ++j) {
      const uint64_t bit = 1ull << (j % 64);
      if (codes.at(r, j) < 0) p.sign[r * words + j / 64] = static_cast<int64_t>(static_cast<uint64_t>(p.sign[r * words + j / 64]) | bit);
      if (codes.at(r, j) != 0) p.nonzero[r * words + j / 64] = static_cast<int64_t>(static_cast<uint64_t>(p.nonzero[r * words + j / 64]) | bit);
    }
  }
  return p;
}

void check_cached(const std::vector<std::array<int64_t, 2>>& sizes) {
  std::mt19937 rng(4321);
  const int64_t n_items = 11;
  for (const auto& size : sizes) {
    for (gfc::DType code : {F32, F16, BF16}) {
      const int64_t batch = size[0], bits = size[1], words = (bits + 63) / 64;
      const Matrix item_t = random_matrix(rng, F32, n_items, bits, 0.2, false);
      const Matrix item_v = random_matrix(rng, F32, n_items, bits, 0.2, false);
      const Packed pt = pack(item_t), pv = pack(item_v);
      std::vector<float> item_distance(n_items);
      std::uniform_real_distribution<float> dist(0.0f, 3.0f);
      for (float& d : item_distance) d = dist(rng);
      std::vector<int64_t> items(batch);
      std::uniform_int_distribution<int64_t> pick(0, n_items - 1);
      for (int64_t& i : items) i = pick(rng);
      const Matrix u = random_matrix(rng, code, batch, bits, 0.2, batch % 2 == 1);
      Outputs want(batch);
      std::vector<float> candidate(batch);
      for (int64_t r = 0; r < batch; ++r) {
        want.distance[r] = item_distance[items[r]];
        int st = 0, sv = 0;
        for (int64_t j = 0; j < bits; ++j) {
          st += sgn(u.at(r, j)) * sgn(item_t.at(items[r], j));
          sv += sgn(u.at(r, j)) * sgn(item_v.at(items[r], j));
        }
        candidate[r] = ref_weight(st, sv, bits);
      }
      const float threshold = 0.5f;
      ref_finish(want, candidate, threshold);
      std::vector<Outputs> results;
      for (cuda_sim::Order order : kOrders) {
        cuda_sim::set_thread_order(order, 5);
        Outputs out(batch);
        std::vector<float> workspace(static_cast<size_t>(gfc::calibration_workspace_floats(batch)), NAN);
        gfc::CalibrationOutputs o{out.weights.data(), out.clean.data(), out.distance.data(), out.normalized.data(),
                                  workspace.data()};
        const cudaError_t status =
            gfc::calibrate_cached(items.data(), item_distance.data(), u.view(), pt.sign.data(), pt.nonzero.data(),
                                  pv.sign.data(), pv.nonzero.data(), words, batch, bits, threshold, o, nullptr);
        CHECK_MSG(status == cudaSuccess, cuda_sim::last_error_message());
        std::ostringstream what;
        what << "cached B=" << batch << " bits=" << bits << " code=" << int(code) << " " << order_name(order);
        compare(out, want, what.str());
        results.push_back(out);
      }
      CHECK_MSG(results[0] == results[1] && results[0] == results[2], "cached: thread orders disagree");
    }
  }
  cuda_sim::set_thread_order(cuda_sim::Order::Forward);
}

TEST(calibration_cached) { check_cached({{1, 1}, {7, 63}, {33, 64}, {130, 65}, {33, 130}}); }

TEST(calibration_cached_small) { check_cached({{7, 65}}); }

TEST(calibration_invalid_arguments) {
  const uint64_t before = cuda_sim::launches();
  float f[4] = {0, 0, 0, 0};
  uint8_t c[4];
  std::vector<float> ws(64);
  gfc::CalibrationOutputs o{f, c, f, f, ws.data()};
  gfc::MatrixView m{f, F32, 1, 1};
  CHECK(gfc::calibrate_rows(m, m, m, m, m, 0, 1, 1, 0.5f, false, o, nullptr) == cudaErrorInvalidValue);
  CHECK(gfc::calibrate_rows(m, m, m, m, m, 1, 1, 0, 0.5f, false, o, nullptr) == cudaErrorInvalidValue);
  gfc::MatrixView h{f, F16, 1, 1};
  CHECK(gfc::calibrate_rows(m, h, m, m, m, 1, 1, 1, 0.5f, false, o, nullptr) == cudaErrorInvalidValue);
  gfc::MatrixView bad{f, static_cast<gfc::DType>(7), 1, 1};
  CHECK(gfc::calibrate_rows(bad, bad, m, m, m, 1, 1, 1, 0.5f, false, o, nullptr) == cudaErrorInvalidValue);
  int64_t words[1] = {0};
  CHECK(gfc::calibrate_cached(words, f, m, words, words, words, words, 2, 1, 64, 0.5f, o, nullptr) ==
        cudaErrorInvalidValue);
  CHECK(cuda_sim::launches() == before);  // nothing was launched
}

// ------------------------------------------------------------------ DBPR forward
struct DbprCase {
  int64_t batch, k_neg, dim;
  gfc::DType table;
  int weights;  // -1: none, else the weights' DType
  float scale, l2;
};

struct DbprOut {
  std::vector<float> rows, coef, log_sig, margins;
  DbprOut(int64_t b, int64_t k) : rows(b), coef(b * (k + 1)), log_sig(b), margins(b * k) {}
  bool operator==(const DbprOut& o) const {
    return same_bits(rows, o.rows) && same_bits(coef, o.coef) && same_bits(log_sig, o.log_sig) &&
           same_bits(margins, o.margins);
  }
};

float ref_dot(const Matrix& a, int64_t ra, const Matrix& b, int64_t rb) {
  std::array<float, 32> lanes{};
  for (int64_t d = 0; d < a.cols; ++d) lanes[d % 32] = std::fma(a.at(ra, d), b.at(rb, d), lanes[d % 32]);
  return butterfly(lanes);
}

void check_dbpr(const std::vector<DbprCase>& cases) {
  std::mt19937 rng(777);
  for (const DbprCase& c : cases) {
    const int64_t n_users = 9, n_items = 17;
    const Matrix users_t = random_matrix(rng, c.table, n_users, c.dim, 0.0, false);
    const Matrix items_t = random_matrix(rng, c.table, n_items, c.dim, 0.0, c.batch % 2 == 1);
    std::uniform_int_distribution<int64_t> pick_u(0, n_users - 1), pick_i(0, n_items - 1);
    std::vector<int64_t> users(c.batch), pos(c.batch), neg(c.batch * c.k_neg);
    for (auto& x : users) x = pick_u(rng);
    for (auto& x : pos) x = pick_i(rng);
    for (auto& x : neg) x = pick_i(rng);
    Matrix wm = random_matrix(rng, c.weights < 0 ? F32 : static_cast<gfc::DType>(c.weights), c.batch, 1, 0.0, false);
    const void* weights = c.weights < 0 ? nullptr : wm.view().data;
    // The CPU reference, in the kernel's order.
    DbprOut want(c.batch, c.k_neg);
    for (int64_t b = 0; b < c.batch; ++b) {
      const float pos_score = ref_dot(users_t, users[b], items_t, pos[b]);
      float squares = ref_dot(users_t, users[b], users_t, users[b]) + ref_dot(items_t, pos[b], items_t, pos[b]);
      const float w = weights ? wm.at(b, 0) : 1.0f;
      const float cb = w * (c.scale / static_cast<float>(c.k_neg));
      float ls_sum = 0.0f, s_sum = 0.0f;
      for (int64_t k = 0; k < c.k_neg; ++k) {
        const int64_t n = neg[b * c.k_neg + k];
        const float margin = pos_score - ref_dot(users_t, users[b], items_t, n);
        squares = squares + ref_dot(items_t, n, items_t, n);
        const float e = std::exp(-std::fabs(margin));
        const float ls = std::fmin(margin, 0.0f) - std::log1p(e);
        const float sn = margin >= 0.0f ? e / (1.0f + e) : 1.0f / (1.0f + e);
        ls_sum += ls;
        s_sum += sn;
        want.margins[b * c.k_neg + k] = margin;
        want.coef[b * (c.k_neg + 1) + 1 + k] = cb * sn;
      }
      const float mean = ls_sum / static_cast<float>(c.k_neg);
      want.coef[b * (c.k_neg + 1)] = -cb * s_sum;
      want.log_sig[b] = mean;
      want.rows[b] = -w * mean + (0.5f * c.l2) * squares;
    }
    std::vector<DbprOut> results;
    for (cuda_sim::Order order : kOrders) {
      cuda_sim::set_thread_order(order, 13);
      DbprOut out(c.batch, c.k_neg);
      const gfc::DbprForwardOutputs o{out.rows.data(), out.coef.data(), out.log_sig.data(), out.margins.data()};
      const cudaError_t status = gfc::dbpr_forward(
          users_t.view(), items_t.view(), users.data(), pos.data(), neg.data(), c.k_neg, 1, weights,
          c.weights < 0 ? F32 : static_cast<gfc::DType>(c.weights), wm.stride_row, c.batch, c.k_neg, c.dim, c.scale,
          c.l2, o, nullptr);
      CHECK_MSG(status == cudaSuccess, cuda_sim::last_error_message());
      std::ostringstream what;
      what << "dbpr B=" << c.batch << " K=" << c.k_neg << " D=" << c.dim << " table=" << int(c.table) << " "
           << order_name(order);
      for (size_t i = 0; i < out.rows.size(); ++i) {
        CHECK_MSG(__float_as_uint(out.rows[i]) == __float_as_uint(want.rows[i]),
                  what.str() << " rows[" << i << "] " << bits_of(out.rows[i]) << " vs " << bits_of(want.rows[i]));
        CHECK_MSG(__float_as_uint(out.log_sig[i]) == __float_as_uint(want.log_sig[i]), what.str() << " log_sig");
      }
      CHECK_MSG(same_bits(out.coef, want.coef), what.str() << " coef");
      CHECK_MSG(same_bits(out.margins, want.margins), what.str() << " margins");
      results.push_back(out);
    }
    CHECK_MSG(results[0] == results[1] && results[0] == results[2], "dbpr: thread orders disagree");
  }
  cuda_sim::set_thread_order(cuda_sim::Order::Forward);
}

TEST(dbpr_forward) {
  check_dbpr({
      {1, 1, 1, F32, -1, 1.0f, 0.0f},      {7, 3, 5, F16, 0, 1.0f, 0.0f},
      {33, 1, 64, BF16, 1, 0.5f, 0.01f},   {33, 4, 70, F32, 2, 1.0f, 0.1f},
      {130, 2, 64, F32, 0, 2.0f, 0.0f},    {9, 5, 0, F32, -1, 1.0f, 0.5f},
  });
}

TEST(dbpr_forward_small) { check_dbpr({{7, 3, 33, BF16, 0, 1.0f, 0.1f}}); }

TEST(dbpr_invalid_arguments) {
  float f[8] = {};
  int64_t idx[2] = {0, 0};
  const gfc::DbprForwardOutputs o{f, f, f, nullptr};
  gfc::MatrixView m{f, F32, 1, 1}, h{f, F16, 1, 1};
  CHECK(gfc::dbpr_forward(m, m, idx, idx, idx, 1, 1, nullptr, F32, 1, 1, 0, 1, 1.0f, 0.0f, o, nullptr) ==
        cudaErrorInvalidValue);
  CHECK(gfc::dbpr_forward(m, h, idx, idx, idx, 1, 1, nullptr, F32, 1, 1, 1, 1, 1.0f, 0.0f, o, nullptr) ==
        cudaErrorInvalidValue);
  // Margins are optional.
  CHECK(gfc::dbpr_forward(m, m, idx, idx, idx, 1, 1, nullptr, F32, 1, 1, 1, 1, 1.0f, 0.0f, o, nullptr) == cudaSuccess);
}

// ------------------------------------------------------------------ sim self-tests: planted kernels
__global__ void barrier_after_exit_kernel(float* out) {
  if (threadIdx.x >= 16) return;
  __syncthreads();
  out[threadIdx.x] = 1.0f;
}

TEST(sim_barrier_exited) {
  std::vector<float> out(64);
  expect_sim_error("barrier_exited", {"barrier_after_exit_kernel", "block (0,0,0)", "exited"}, [&] {
    GF_LAUNCH(barrier_after_exit_kernel, dim3(1), dim3(64), 0, nullptr)(out.data());
  });
}

__global__ void divergent_barrier_kernel(float* out) {
  if (threadIdx.x < 40) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1.0f;
}

TEST(sim_barrier_divergence) {
  std::vector<float> out(64);
  expect_sim_error("barrier_divergence", {"divergent_barrier_kernel", "sim_tests.cpp"}, [&] {
    GF_LAUNCH(divergent_barrier_kernel, dim3(1), dim3(64), 0, nullptr)(out.data());
  });
}

__global__ void shuffle_exited_lane_kernel(float* out) {
  const int lane = threadIdx.x % 32;
  if (lane >= 16) return;
  out[threadIdx.x] = __shfl_sync(0xffffffffu, 1.0f * lane, 0);
}

TEST(sim_shuffle_exited_lane) {
  std::vector<float> out(32);
  expect_sim_error("lane_exited", {"shuffle_exited_lane_kernel", "__shfl_sync", "exited"}, [&] {
    GF_LAUNCH(shuffle_exited_lane_kernel, dim3(1), dim3(32), 0, nullptr)(out.data());
  });
}

__global__ void shuffle_outside_mask_kernel(float* out) {
  const int lane = threadIdx.x % 32;
  if (lane < 16) out[threadIdx.x] = __shfl_sync(0x0000ffffu, 1.0f * lane, 20);  // lane 20 is not in the mask
}

__global__ void caller_outside_mask_kernel(float* out) {
  const int lane = threadIdx.x % 32;
  if (lane == 3) out[lane] = __shfl_sync(0x1u, 1.0f, 0);
}

__global__ void partial_warp_kernel(float* out) {
  out[threadIdx.x] = __shfl_down_sync(0xffffffffu, 1.0f, 1);  // a 40-thread block: lanes 8..31 of warp 1 do not exist
}

TEST(sim_shuffle_outside_mask) {
  std::vector<float> out(64);
  expect_sim_error("lane_outside_mask", {"shuffle_outside_mask_kernel", "reads lane 20"}, [&] {
    GF_LAUNCH(shuffle_outside_mask_kernel, dim3(1), dim3(32), 0, nullptr)(out.data());
  });
  expect_sim_error("lane_outside_mask", {"caller_outside_mask_kernel", "not in its own mask"}, [&] {
    GF_LAUNCH(caller_outside_mask_kernel, dim3(1), dim3(32), 0, nullptr)(out.data());
  });
  expect_sim_error("lane_exited", {"partial_warp_kernel", "does not exist"}, [&] {
    GF_LAUNCH(partial_warp_kernel, dim3(1), dim3(40), 0, nullptr)(out.data());
  });
}

__global__ void mismatch_site_kernel(unsigned* out) {
  const int lane = threadIdx.x % 32;
  if (lane % 2 == 0) {
    out[lane] = __ballot_sync(0xffffffffu, 1);
  } else {
    out[lane] = __ballot_sync(0xffffffffu, 0);
  }
}

__global__ void mismatch_op_kernel(unsigned* out) {
  const int lane = threadIdx.x % 32;
  out[lane] = lane < 8 ? __ballot_sync(0xffffffffu, 1) : static_cast<unsigned>(__any_sync(0xffffffffu, 1));
}

__global__ void mismatch_mask_kernel(unsigned* out) {
  const int lane = threadIdx.x % 32;
  __syncwarp(lane == 0 ? 0x3u : 0xffffffffu);  // lane 0 and 1 disagree on the mask
  out[lane] = 1;
}

TEST(sim_collective_mismatch) {
  std::vector<unsigned> out(32);
  expect_sim_error("collective_mismatch", {"mismatch_site_kernel", "__ballot_sync", "disagree"}, [&] {
    GF_LAUNCH(mismatch_site_kernel, dim3(1), dim3(32), 0, nullptr)(out.data());
  });
  expect_sim_error("collective_mismatch", {"mismatch_op_kernel", "__any_sync"}, [&] {
    GF_LAUNCH(mismatch_op_kernel, dim3(1), dim3(32), 0, nullptr)(out.data());
  });
  expect_sim_error("collective_mismatch", {"mismatch_mask_kernel", "0x00000003"}, [&] {
    GF_LAUNCH(mismatch_mask_kernel, dim3(1), dim3(32), 0, nullptr)(out.data());
  });
}

__global__ void deadlock_kernel(float* out) {
  const int lane = threadIdx.x % 32;
  float x = 1.0f;
  if (threadIdx.x == 5) {
    __syncthreads();  // lane 5 waits for the block, its warp waits for lane 5
  } else if (threadIdx.x < 32) {
    x = __shfl_xor_sync(0xffffffffu, x, 1);
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = x + lane;
}

TEST(sim_deadlock) {
  std::vector<float> out(64);
  expect_sim_error("deadlock", {"deadlock_kernel", "__shfl_xor_sync", "__syncthreads"}, [&] {
    GF_LAUNCH(deadlock_kernel, dim3(1), dim3(64), 0, nullptr)(out.data());
  });
}

__global__ void bad_width_kernel(float* out) { out[threadIdx.x] = __shfl_sync(0xffffffffu, 1.0f, 0, 12); }

TEST(sim_invalid_width) {
  std::vector<float> out(32);
  expect_sim_error("invalid_argument", {"bad_width_kernel", "width 12"}, [&] {
    GF_LAUNCH(bad_width_kernel, dim3(1), dim3(32), 0, nullptr)(out.data());
  });
}

// Missing barrier: each thread reads its neighbour's slot without waiting for it.
template <bool kBarrier>
__global__ void neighbour_kernel(float* out) {
  __shared__ float slot[64];
  slot[threadIdx.x] = 3.0f * threadIdx.x + 1.0f;
  if (kBarrier) __syncthreads();
  out[threadIdx.x] = slot[(threadIdx.x + 1) % 64];
}

std::vector<std::vector<float>> run_orders(void (*kernel)(float*), unsigned threads) {
  std::vector<std::vector<float>> all;
  for (cuda_sim::Order order : kOrders) {
    cuda_sim::set_thread_order(order, 3);
    std::vector<float> out(threads, -1.0f);
    GF_LAUNCH(kernel, dim3(2), dim3(threads), 0, nullptr)(out.data());
    CHECK(cudaGetLastError() == cudaSuccess);
    all.push_back(out);
  }
  cuda_sim::set_thread_order(cuda_sim::Order::Forward);
  return all;
}

TEST(sim_missing_barrier_is_order_dependent) {
  auto good = run_orders(&neighbour_kernel<true>, 64);
  CHECK(same_bits(good[0], good[1]) && same_bits(good[0], good[2]));
  for (unsigned i = 0; i < 64; ++i) CHECK(good[0][i] == 3.0f * ((i + 1) % 64) + 1.0f);
  auto bad = run_orders(&neighbour_kernel<false>, 64);
  CHECK_MSG(!same_bits(bad[0], bad[1]) || !same_bits(bad[0], bad[2]), "the missing barrier went unnoticed");
  // Forward order: thread 63 reads slot 0 (written), the others read slots not yet
  // written in this block: 0xFF poison (NaN), not a previous block's values.
  CHECK(std::isnan(bad[0][0]) && bad[0][63] == 1.0f);
}

// Launch limits.
__global__ void tiny_kernel(float* out) {
  if (threadIdx.x == 0 && threadIdx.y == 0 && out) out[blockIdx.x] = 1.0f;
}

__global__ void big_static_shared_kernel(float* out) {
  __shared__ float big[12545];  // 50180 B > 48 KiB
  big[threadIdx.x] = 1.0f;
  __syncthreads();
  out[threadIdx.x] = big[0];
}

__global__ void dynamic_shared_kernel(float* out, int n) {
  GF_EXTERN_SHARED(float, dyn);
  for (int i = threadIdx.x; i < n; i += blockDim.x) dyn[i] = static_cast<float>(i);
  __syncthreads();
  float s = 0.0f;
  if (threadIdx.x == 0) {
    for (int i = 0; i < n; ++i) s += dyn[i];
    out[blockIdx.x] = s;
  }
}

void expect_launch_error(cudaError_t code, const std::vector<std::string>& needles) {
  const cudaError_t got = cudaGetLastError();
  CHECK_MSG(got == code, "expected " << cudaGetErrorString(code) << ", got " << cudaGetErrorString(got));
  const std::string msg = cuda_sim::last_error_message();
  for (const auto& n : needles) CHECK_MSG(msg.find(n) != std::string::npos, "'" << n << "' not in: " << msg);
  CHECK(cudaGetLastError() == cudaSuccess);  // taken
}

TEST(sim_launch_limits) {
  std::vector<float> out(1024, 0.0f);
  const uint64_t before = cuda_sim::launches();
  GF_LAUNCH(tiny_kernel, dim3(1), dim3(1025), 0, nullptr)(out.data());
  expect_launch_error(cudaErrorInvalidConfiguration, {"tiny_kernel", "1025"});
  GF_LAUNCH(tiny_kernel, dim3(1), dim3(1, 1, 65), 0, nullptr)(out.data());
  expect_launch_error(cudaErrorInvalidConfiguration, {"tiny_kernel", "(1,1,65)"});
  GF_LAUNCH(tiny_kernel, dim3(1, 65536), dim3(32), 0, nullptr)(out.data());
  expect_launch_error(cudaErrorInvalidConfiguration, {"tiny_kernel", "grid"});
  GF_LAUNCH(tiny_kernel, dim3(0), dim3(32), 0, nullptr)(out.data());
  expect_launch_error(cudaErrorInvalidConfiguration, {"grid"});
  GF_LAUNCH(big_static_shared_kernel, dim3(1), dim3(32), 0, nullptr)(out.data());
  expect_launch_error(cudaErrorInvalidValue, {"big_static_shared_kernel", "static shared memory 50180"});
  auto dyn = &dynamic_shared_kernel;
  GF_LAUNCH(dyn, dim3(1), dim3(64), 49 * 1024, nullptr)(out.data(), 49 * 256);
  expect_launch_error(cudaErrorInvalidValue, {"dynamic_shared_kernel", "dynamic shared memory 50176"});
  CHECK(cuda_sim::launches() == before);  // nothing ran
  CHECK(cudaFuncSetAttribute(dyn, cudaFuncAttributeMaxDynamicSharedMemorySize, 228 * 1024) == cudaErrorInvalidValue);
  CHECK(cudaGetLastError() == cudaErrorInvalidValue);
  CHECK(cudaFuncSetAttribute(dyn, cudaFuncAttributeMaxDynamicSharedMemorySize, 100 * 1024) == cudaSuccess);
  const int n = 100 * 256;  // 100 KiB of floats, opted in
  GF_LAUNCH(dyn, dim3(2), dim3(64), 100 * 1024, nullptr)(out.data(), n);
  CHECK(cudaGetLastError() == cudaSuccess);
  CHECK(out[0] == out[1] && out[0] > 3.2e8f);
  GF_LAUNCH(dyn, dim3(1), dim3(64), 100 * 1024 + 4, nullptr)(out.data(), n);
  expect_launch_error(cudaErrorInvalidValue, {"dynamic_shared_kernel", "102404"});
  // A 1024-thread block is fine.
  GF_LAUNCH(tiny_kernel, dim3(3), dim3(32, 32), 0, nullptr)(out.data());
  CHECK(cudaGetLastError() == cudaSuccess && out[2] == 1.0f);
}

// Collective results (the sim itself against CUDA's documented semantics).
__global__ void collectives_kernel(int* out) {
  const int lane = threadIdx.x % 32;
  int* o = out + threadIdx.x * 12;
  o[0] = __shfl_sync(0xffffffffu, lane * 10, 7);
  o[1] = __shfl_sync(0xffffffffu, lane * 10, lane + 3, 8);  // within groups of 8, wraps
  o[2] = __shfl_up_sync(0xffffffffu, lane, 2);
  o[3] = __shfl_down_sync(0xffffffffu, lane, 5, 16);
  o[4] = __shfl_xor_sync(0xffffffffu, lane, 9);
  o[5] = static_cast<int>(__ballot_sync(0xffffffffu, lane % 3 == 0));
  o[6] = __any_sync(0xffffffffu, lane == 31);
  o[7] = __all_sync(0xffffffffu, lane < 31);
  o[8] = __syncthreads_count(threadIdx.x % 5 == 0);
  o[9] = __syncthreads_and(threadIdx.x < 1000);
  o[10] = __syncthreads_or(threadIdx.x == 63);
  long long wide = (static_cast<long long>(lane) << 40) | lane;
  o[11] = static_cast<int>(__shfl_xor_sync(0xffffffffu, wide, 1) >> 40);
}

TEST(sim_collective_semantics) {
  for (cuda_sim::Order order : kOrders) {
    cuda_sim::set_thread_order(order, 11);
    std::vector<int> out(64 * 12, -1);
    GF_LAUNCH(collectives_kernel, dim3(1), dim3(64), 0, nullptr)(out.data());
    CHECK(cudaGetLastError() == cudaSuccess);
    unsigned ballot = 0;
    for (int l = 0; l < 32; l += 3) ballot |= 1u << l;
    for (int t = 0; t < 64; ++t) {
      const int lane = t % 32, *o = out.data() + t * 12;
      CHECK(o[0] == 70);
      CHECK(o[1] == ((lane & ~7) + ((lane + 3) & 7)) * 10);
      CHECK(o[2] == (lane >= 2 ? lane - 2 : lane));
      CHECK(o[3] == ((lane % 16) + 5 < 16 ? lane + 5 : lane));
      CHECK(o[4] == (lane ^ 9));
      CHECK(static_cast<unsigned>(o[5]) == ballot);
      CHECK(o[6] == 1 && o[7] == 0);
      CHECK(o[8] == 13 && o[9] == 1 && o[10] == 1);
      CHECK(o[11] == (lane ^ 1));
    }
  }
  cuda_sim::set_thread_order(cuda_sim::Order::Forward);
}

TEST(sim_half_conversions) {
  for (uint32_t b = 0; b < 65536; ++b) {
    const __half h{static_cast<uint16_t>(b)};
    const float f = __half2float(h);
    if (std::isnan(f)) continue;
    CHECK_MSG(__float2half_rn(f).__x == b, "half 0x" << std::hex << b);
    const __nv_bfloat16 g{static_cast<uint16_t>(b)};
    const float fg = __bfloat162float(g);
    if (!std::isnan(fg)) CHECK_MSG(__float2bfloat16_rn(fg).__x == b, "bf16 0x" << std::hex << b);
  }
  CHECK(__half2float(__half{0x3c00}) == 1.0f && __half2float(__half{0x0001}) == std::ldexp(1.0f, -24));
  CHECK(__float2half_rn(65519.0f).__x == 0x7bff && __float2half_rn(65520.0f).__x == 0x7c00);
  CHECK(__float2half_rn(1.0f + std::ldexp(1.0f, -11)).__x == 0x3c00);  // tie to even
  CHECK(__float2half_rn(std::ldexp(1.0f, -25)).__x == 0 && __float2half_rn(std::ldexp(1.5f, -25)).__x == 1);
  CHECK(__float2bfloat16_rn(1.0f + std::ldexp(1.0f, -8)).__x == 0x3f80);  // tie to even
  CHECK(__float2bfloat16_rn(1.0f + std::ldexp(3.0f, -9)).__x == 0x3f81);  // 0.75 ulp rounds up
}

// ------------------------------------------------------------------ planted bugs for the sanitizer builds
__global__ void oob_shared_kernel(float* out) {
  __shared__ float tile[64];
  float* row = tile;             // (through a pointer: ASan's check, not UBSan's array bounds)
  row[threadIdx.x + 1] = 1.0f;  // PLANTED: thread 63 writes tile[64]
  __syncthreads();
  out[threadIdx.x] = tile[threadIdx.x];
}

PLANTED(planted_oob_shared) {
  std::vector<float> out(64);
  GF_LAUNCH(oob_shared_kernel, dim3(1), dim3(64), 0, nullptr)(out.data());
}

__global__ void oob_global_kernel(float* out, int n) {
  out[threadIdx.x + blockIdx.x * blockDim.x] = 2.0f;  // PLANTED: no bound check against n
  (void)n;
}

PLANTED(planted_oob_global) {
  float* out = new float[60];
  GF_LAUNCH(oob_global_kernel, dim3(1), dim3(64), 0, nullptr)(out, 60);
  delete[] out;
}

__global__ void racy_sum_kernel(int* out) {
  __shared__ int total;
  if (threadIdx.x == 0) total = 0;
  __syncthreads();
  if (threadIdx.x < 2) total += 1;  // PLANTED: non-atomic += from two threads, no barrier between
  __syncthreads();
  if (threadIdx.x == 0) *out = total;
}

PLANTED(planted_race) {
  int out = 0;
  GF_LAUNCH(racy_sum_kernel, dim3(1), dim3(32), 0, nullptr)(&out);
  std::printf("racy_sum_kernel: %d\n", out);
}

PLANTED(planted_missing_barrier) {
  std::vector<float> out(64);
  auto k = &neighbour_kernel<false>;
  GF_LAUNCH(k, dim3(1), dim3(64), 0, nullptr)(out.data());
}

// The race-free twin of planted_race (atomicAdd) must stay quiet under TSan.
__global__ void atomic_sum_kernel(int* out) {
  __shared__ int total;
  if (threadIdx.x == 0) total = 0;
  __syncthreads();
  if (threadIdx.x < 2) atomicAdd(&total, 1);
  __syncthreads();
  if (threadIdx.x == 0) *out = total;
}

TEST(sim_atomics) {
  int out = 0;
  GF_LAUNCH(atomic_sum_kernel, dim3(1), dim3(32), 0, nullptr)(&out);
  CHECK(cudaGetLastError() == cudaSuccess && out == 2);
}

// ------------------------------------------------------------------ main
// ------------------------------------------------------------------ sinkhorn (csrc/sinkhorn.cu)
// The kernels' numerics are checked against the torch reference by test_sim_sinkhorn.py;
// this test runs them in the sanitizer builds: a ragged batch over the three tiles,
// bitwise across thread orders, converged, padded gradients exactly zero.
#include "sinkhorn_cuda.h"

TEST(sinkhorn_tiny_small) {
  const int64_t batch = 3, d = 3;  // TSan: ~10x per fiber switch; a blur that converges in 10-20 iterations
  for (const auto& nm : {std::array<int64_t, 2>{1, 7}, std::array<int64_t, 2>{13, 7}, std::array<int64_t, 2>{32, 13}}) {
    const int64_t n = nm[0], m = nm[1];
    std::mt19937 gen(static_cast<unsigned>(n * 100 + m));
    std::normal_distribution<float> normal;
    std::vector<float> x(batch * n * d), y(batch * m * d), a(batch * n), b(batch * m), scale(batch, 1.0f);
    for (auto& v : x) v = normal(gen);
    for (auto& v : y) v = normal(gen) + 0.5f;
    // Problem q keeps its first n - q % 3 (m - q % 2) points, uniform weights, zero padding.
    for (int64_t i = 0; i < batch * n; ++i) a[i] = (i % n) < std::max<int64_t>(1, n - (i / n) % 3) ? 1.0f : 0.0f;
    for (int64_t j = 0; j < batch * m; ++j) b[j] = (j % m) < m - (j / m) % 2 ? 1.0f : 0.0f;
    for (auto* w : {&a, &b}) {
      const int64_t size = static_cast<int64_t>(w->size()) / batch;
      for (int64_t q = 0; q < batch; ++q) {
        float mass = 0.0f;
        for (int64_t k = 0; k < size; ++k) mass += (*w)[q * size + k];
        for (int64_t k = 0; k < size; ++k) (*w)[q * size + k] /= mass;
      }
    }
    std::vector<float> first;
    for (cuda_sim::Order order : kOrders) {
      cuda_sim::set_thread_order(order, 7);
      std::vector<float> f(batch * n), g(batch * m), err(batch), gx(batch * n * d), gy(batch * m * d);
      std::vector<int32_t> iters(batch);
      const gfc::SinkhornTinyOutputs out{f.data(), g.data(), err.data(), iters.data()};
      CHECK(gfc::sinkhorn_tiny(x.data(), y.data(), a.data(), b.data(), batch, n, m, d, 2, 2.0f, 100, true, 1e-3f,
                               out, nullptr) == cudaSuccess);
      CHECK(gfc::sinkhorn_tiny_envelope(x.data(), y.data(), a.data(), b.data(), f.data(), g.data(), scale.data(),
                                        batch, n, m, d, 1, 2.0f, gx.data(), gy.data(), nullptr) == cudaSuccess);
      for (int64_t p = 0; p < batch; ++p) CHECK_MSG(err[p] <= 1e-3f && iters[p] < 100, "problem " << p << " iterations " << iters[p]);
      for (int64_t i = 0; i < batch * n * d; ++i) CHECK(std::isfinite(gx[i]) && (a[i / d] > 0.0f || gx[i] == 0.0f));
      for (int64_t j = 0; j < batch * m * d; ++j) CHECK(std::isfinite(gy[j]) && (b[j / d] > 0.0f || gy[j] == 0.0f));
      std::vector<float> all = f;
      for (const auto* v : {&g, &err, &gx, &gy}) all.insert(all.end(), v->begin(), v->end());
      for (int32_t it : iters) all.push_back(static_cast<float>(it));
      if (first.empty()) first = all;
      CHECK_MSG(same_bits(first, all), order_name(order));
    }
  }
  cuda_sim::set_thread_order(cuda_sim::Order::Forward, 0);
}

// ------------------------------------------------------------------ DBPR fused steps (csrc/dbpr_step.cu)
// Numerics against the torch step are test_sim_dbpr_step.py's; this test runs the
// three launches of the sorted step (SGD, row-wise Adagrad, a bf16 table) and the
// atomic step in the sanitizer builds, on a duplicate-heavy batch (5 users, 7 items,
// 16 triplets x 2 negatives): sorted results bitwise across thread orders; the atomic
// step (one block here, so every row is read before any update) equal to sorted SGD
// up to the order of its float additions.
struct StepTables {
  Matrix users, items;
  std::vector<float> user_acc, item_acc;
};

// Stable sort of `rows`: (keys, order) as guider_fast.reference.dbpr_step._sort_rows builds them.
void sorted_runs(const std::vector<int64_t>& rows, std::vector<int64_t>* keys, std::vector<int64_t>* order) {
  order->resize(rows.size());
  for (size_t i = 0; i < rows.size(); ++i) (*order)[i] = static_cast<int64_t>(i);
  std::stable_sort(order->begin(), order->end(), [&](int64_t l, int64_t r) { return rows[l] < rows[r]; });
  keys->resize(rows.size());
  for (size_t i = 0; i < rows.size(); ++i) (*keys)[i] = rows[(*order)[i]];
}

std::vector<float> table_bits(const Matrix& m) {
  if (m.dtype == gfc::DType::Float32) return m.single;
  return std::vector<float>(m.half.begin(), m.half.end());
}

TEST(dbpr_step_small) {
  const int64_t batch = 16, k_neg = 2, dim = 33, n_users = 5, n_items = 7;  // 16: one atomic block at D = 33
  std::mt19937 rng(2024);
  std::uniform_int_distribution<int64_t> pick_u(0, n_users - 1), pick_i(0, n_items - 1);
  std::vector<int64_t> users(batch), pos(batch), neg(batch * k_neg);
  for (auto& x : users) x = pick_u(rng);
  for (auto& x : pos) x = pick_i(rng);
  for (auto& x : neg) x = pick_i(rng);
  std::vector<int64_t> occurrences(pos);
  occurrences.insert(occurrences.end(), neg.begin(), neg.end());
  std::vector<int64_t> user_keys, user_order, item_keys, item_order;
  sorted_runs(users, &user_keys, &user_order);
  sorted_runs(occurrences, &item_keys, &item_order);
  const gfc::DbprSortedRuns runs{user_keys.data(), user_order.data(), item_keys.data(), item_order.data()};
  std::vector<float> workspace(gfc::dbpr_step_workspace_floats(batch, k_neg, dim));

  auto fresh = [&](gfc::DType dtype) {
    std::mt19937 table_rng(99);
    StepTables t{random_matrix(table_rng, dtype, n_users, dim, 0.0, false, 0.3f),
                 random_matrix(table_rng, dtype, n_items, dim, 0.0, false, 0.3f),
                 std::vector<float>(n_users, 0.5f), std::vector<float>(n_items, 0.25f)};
    return t;
  };
  auto view = [](Matrix& m) { return m.view(); };
  struct Variant {
    gfc::DType dtype;
    bool adagrad;
    float l2;
  };
  std::vector<float> sgd_users, sgd_items;
  for (const Variant& v : {Variant{F32, false, 0.0f}, Variant{F32, true, 0.01f}, Variant{BF16, false, 0.01f}}) {
    std::vector<float> first;
    for (cuda_sim::Order order : kOrders) {
      cuda_sim::set_thread_order(order, 5);
      StepTables t = fresh(v.dtype);
      std::vector<float> rows(batch), margins(batch * k_neg);
      const gfc::DbprStepOutputs out{rows.data(), margins.data(), workspace.data()};
      const cudaError_t status = gfc::dbpr_step(
          view(t.users), view(t.items), users.data(), pos.data(), neg.data(), k_neg, 1, nullptr, F32, 1, runs,
          v.adagrad ? t.user_acc.data() : nullptr, v.adagrad ? t.item_acc.data() : nullptr, batch, k_neg, dim, 0.1f,
          v.l2, 1.0f, out, nullptr);
      CHECK_MSG(status == cudaSuccess, cuda_sim::last_error_message());
      std::vector<float> all = rows;
      for (const auto& part : {margins, table_bits(t.users), table_bits(t.items), t.user_acc, t.item_acc}) {
        all.insert(all.end(), part.begin(), part.end());
      }
      for (float x : all) CHECK(std::isfinite(x));
      if (first.empty()) first = all;
      CHECK_MSG(same_bits(first, all), "dbpr_step dtype " << int(v.dtype) << " adagrad " << v.adagrad << " "
                                                         << order_name(order));
      if (v.dtype == F32 && !v.adagrad && order == kOrders[0]) sgd_users = t.users.single, sgd_items = t.items.single;
    }
  }
  cuda_sim::set_thread_order(cuda_sim::Order::Forward, 0);
  StepTables t = fresh(F32);
  std::vector<float> rows(batch), margins(batch * k_neg);
  CHECK(gfc::dbpr_atomic_sgd_step(view(t.users), view(t.items), users.data(), pos.data(), neg.data(), k_neg, 1,
                                  nullptr, F32, 1, batch, k_neg, dim, 0.1f, 0.0f, 1.0f, rows.data(), margins.data(),
                                  nullptr) == cudaSuccess);
  for (const auto& [got, want] : {std::pair<const std::vector<float>&, const std::vector<float>&>{t.users.single,
                                                                                                   sgd_users},
                                  {t.items.single, sgd_items}}) {
    for (size_t i = 0; i < got.size(); ++i) {
      CHECK_MSG(std::fabs(got[i] - want[i]) <= 1e-5f * (1.0f + std::fabs(want[i])),
                "atomic vs sorted SGD at " << i << ": " << got[i] << " vs " << want[i]);
    }
  }
}

int main(int argc, char** argv) {
  std::vector<std::string> names;
  const std::string mode = argc > 1 ? argv[1] : "all";
  if (mode == "list") {
    for (const auto& kv : registry()) std::printf("%s%s\n", kv.first.c_str(), kv.second.in_all ? "" : " (planted)");
    return 0;
  }
  if (mode == "all") {
    for (const auto& kv : registry()) {
      if (kv.second.in_all) names.push_back(kv.first);
    }
  } else if (mode == "run") {
    for (int i = 2; i < argc; ++i) names.push_back(argv[i]);
  } else {
    std::fprintf(stderr, "usage: %s list | all | run NAME...\n", argv[0]);
    return 2;
  }
  int failed = 0;
  for (const auto& name : names) {
    auto it = registry().find(name);
    if (it == registry().end()) {
      std::printf("FAIL %s (no such test)\n", name.c_str());
      ++failed;
      continue;
    }
    const auto start = std::chrono::steady_clock::now();
    const uint64_t switches = cuda_sim::fiber_switches();
    try {
      it->second.fn();
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      std::printf("PASS %s (%.3f s, %llu fiber switches)\n", name.c_str(), s,
                  static_cast<unsigned long long>(cuda_sim::fiber_switches() - switches));
    } catch (const std::exception& e) {
      std::printf("FAIL %s: %s\n", name.c_str(), e.what());
      ++failed;
    }
    std::fflush(stdout);
  }
  return failed == 0 ? 0 : 1;
}
