// The fused DBPR training step on CPU: forward, backward and the optimizer update of the
// embedding tables in place, in one pass over the batch's indices and one sweep over its
// triplets.  Registered as torch.ops.guider_fast_cpu.dbpr_step (CPU key); the schema is
// defined here (TORCH_LIBRARY_FRAGMENT), so this file brings its own op to the extension
// built from csrc/cpu/*.cpp (guider_fast/_cpu_build.py).  Python: backend="cpu" of
// guider_fast.dbpr_step (guider_fast/dbpr.py), what backend="auto" takes on CPU.
//
// Semantics: those of guider_fast/reference/dbpr_step.py, for both duplicate policies:
// the gradients of every occurrence of a row are summed, then applied once, and every
// gradient comes from the pre-step rows.  Same formulas, same folding of -lr into the SGD
// coefficients, float32 math, 16-bit tables read into float32 and rounded once on
// write-back (to nearest even), float32 Adagrad accumulators.  Only the order of the
// additions inside a row's sum differs (triplet order here, positives first then
// negatives there), so results agree within float32 rounding, not bitwise.  Everything
// runs in a fixed order on one thread: steps are bit-identical from run to run.
//
// Why this shape (measured at 100k users x 1M items, D = 64, B = 65,536, one thread;
// benchmarks/results/dbpr_cpu.md): the torch step spends its time in separate passes
// that each gather random rows again (index_select, embedding_bag, index_add_), plus a
// sort.  Here:
//  * no sort: two bits per table row (seen, seen again; 256 KiB for 1M rows, in L2, kept
//    between steps and cleared after each) find the rows that occur more than once, and a
//    small hash table of those rows alone numbers their partial sums and marks each one's
//    first and last occurrence.  Rows that occur once (most item rows of a large
//    catalogue) need no partial sum at all; the others get one, numbered compactly, so the
//    sums stay in cache.  (A dense int32 row -> slot map, 4 MiB for 1M items, missed the
//    cache on most of its accesses and cost 3 ms a step here, against 1.1-1.3 ms now);
//  * one sweep over the triplets gathers each triplet's K + 2 rows once, scores them,
//    and hands each row's contribution on: a single occurrence applies it to the row at
//    once, a repeated row's first occurrence writes its sum, later ones add, and its last
//    one adds and applies the total.  A row is written only after every triplet that
//    reads it (its last occurrence), so each row is read once and written once while its
//    line is still in cache: the least traffic an exact step can do;
//  * the log-sigmoids of a block of triplets are vectorised (Sleef through ATen's
//    Vectorized<float>); libm's scalar expf / log1pf per triplet cost ~100 ns a triplet;
//  * every random access (table rows, partial sums, bitmap words, accumulators) is
//    prefetched a fixed distance ahead: one thread is bound by memory latency, not
//    bandwidth or arithmetic, and prefetching is what keeps misses in flight;
//  * D = 32 / 64 / 128 and K = 1 are compiled with D and K fixed (constant-length row
//    loops: a few vector instructions each, memcpy inlined), the 16-lane dot's reduction
//    is written out with AVX-512 intrinsics (the same additions in the same order), the
//    index passes do not branch on whether a row repeats (a user row repeats in about
//    every other triplet: such branches mispredict half the time).  These changes leave
//    every result bit-identical;
//  * the buffers are per thread and reused across steps (thread_local), 2 MiB-aligned
//    and advised for huge pages when large: allocating them afresh costs page faults on
//    every step, and random accesses on 4 KiB pages miss the TLB.
//  Measured 2026-12-02 (AMD EPYC guest, benchmarks/results/dbpr_cpu.md): ~1.6x the
//  previous version (dense slot map, runtime D) on 4 KiB pages.

#include <ATen/ATen.h>
#include <ATen/cpu/vec/vec.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include "../constants.h"

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace guider_fast_cpu {
namespace {

constexpr double kAdagradEps = guider_fast::constants::ADAGRAD_EPS;
// Prefetch distances: triplets ahead in the scoring sweep, occurrences ahead in the
// marking pass.  Tuned on the shape above (flat from 16 to 32 triplets; 8 to 12 leave
// misses exposed, 48 is slower).
constexpr int64_t kTripletsAhead = 16;
// Triplets scored together (their log-sigmoids are vectorised).  8 measured ~5% faster
// than 16 or 32 (the block's prefetches are issued in a burst from its scoring loop) and
// faster than 4.
constexpr int64_t kBlock = 8;
constexpr int64_t kIndicesAhead = 32;
constexpr int64_t kLine = 64;

inline void prefetch_read(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t o = 0; o < bytes; o += kLine) __builtin_prefetch(c + o, 0, 3);
}

// Into L2 (prefetcht1), not L1: a prefetch into L1 holds one of its ~16 fill buffers until
// the line arrives, which caps the misses in flight; into L2 measured 12-15% faster here.
inline void prefetch_write(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t o = 0; o < bytes; o += kLine) __builtin_prefetch(c + o, 1, 2);
}

// Dot product with 16 independent partial sums, combined in a fixed order: the compiler
// vectorises the lanes without reassociating anything (no -ffast-math needed), and the
// result does not depend on the vector width.
template <typename A>
__attribute__((always_inline)) inline A dot(const A* __restrict a, const A* __restrict b, int64_t n) {
  constexpr int W = 16;
  A part[W] = {};
  int64_t d = 0;
  for (; d + W <= n; d += W)
    for (int j = 0; j < W; ++j) part[j] += a[d + j] * b[d + j];
  A tail = 0;
  for (; d < n; ++d) tail += a[d] * b[d];
  for (int w = W / 2; w >= 1; w /= 2)
    for (int j = 0; j < w; ++j) part[j] += part[j + w];
  return part[0] + tail;
}

#ifdef __AVX512F__
// The same sums in the same order, the 16 lanes in one register: the compiler vectorises
// the lanes above but turns the halving tree into a loop through the stack (~40
// instructions a dot, three dots a triplet).  Lane j accumulates fma(a, b, part) as the
// vectorised loop above does (GCC contracts part[j] += a * b into an fma with -mfma); then
// part[j] += part[j + 8], += part[j + 4], += part[j + 2], += part[j + 1], + tail.
template <>
__attribute__((always_inline)) inline float dot<float>(const float* __restrict a, const float* __restrict b,
                                                       int64_t n) {
  __m512 part = _mm512_setzero_ps();
  int64_t d = 0;
  for (; d + 16 <= n; d += 16) part = _mm512_fmadd_ps(_mm512_loadu_ps(a + d), _mm512_loadu_ps(b + d), part);
  float tail = 0;
  for (; d < n; ++d) tail += a[d] * b[d];
  const __m256 s8 = _mm256_add_ps(_mm512_castps512_ps256(part),
                                  _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(part), 1)));
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  const __m128 s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1));
  return _mm_cvtss_f32(s1) + tail;
}
#endif

#ifdef __linux__
constexpr size_t kHugePage = size_t(2) << 20;
#endif

// Memory for a grow-only workspace buffer: 64-byte aligned, and from 2 MiB on, aligned to
// and advised for transparent huge pages (the bitmaps, hash tables and sums are accessed at random:
// on 4 KiB pages most of those accesses would also miss the TLB).
inline void* allocate(size_t bytes) {
  size_t align = kLine;
#ifdef __linux__
  if (bytes >= kHugePage) align = kHugePage;
#endif
  bytes = (bytes + align - 1) / align * align;
  void* p = std::aligned_alloc(align, bytes);
  TORCH_CHECK(p != nullptr, "guider_fast_cpu::dbpr_step: out of memory for ", bytes, " bytes of workspace");
#ifdef __linux__
  if (align == kHugePage) madvise(p, bytes, MADV_HUGEPAGE);  // advice only: failure is harmless
#endif
  return p;
}

// A grow-only buffer, reused across steps (its contents do not survive a growth).
template <typename V>
struct Buffer {
  struct Free {
    void operator()(V* p) const { std::free(p); }
  };
  std::unique_ptr<V, Free> data;
  size_t size = 0;
  V* get(size_t n) {
    if (n > size) {
      data.reset();
      data.reset(static_cast<V*>(allocate(std::max<size_t>(n, 1) * sizeof(V))));
      size = n;
    }
    return data.get();
  }
};

// Per occurrence of a row in the batch, what the scoring sweep does with its gradient
// contribution: kSingle, the row's only occurrence: apply it to the row at once;
// otherwise the index of the row's partial sum, with kFirst (write the sum) or kLast
// (add, then apply the total to the row) or neither (add).
constexpr uint32_t kSingle = 1u << 31;
constexpr uint32_t kFirst = 1u << 30;
constexpr uint32_t kLast = 1u << 29;
constexpr uint32_t kSumIndex = kLast - 1;

// Two bits per table row, interleaved by 64-row words (word 2w: "seen", word 2w + 1:
// "seen again"): 1M item rows take 256 KiB, which stays in L2, where a dense int32
// row -> slot map (4 MiB) missed the cache on most of its random accesses and needed a
// reset pass of random writes.  All zero between calls (the Codes guard clears the words
// it set, also on errors).
struct Bits {
  Buffer<uint64_t> buffer;
  size_t rows = 0;
  uint64_t* get(int64_t n) {
    if (static_cast<size_t>(n) > rows) {
      const size_t words = 2 * ((static_cast<size_t>(n) + 63) / 64);
      uint64_t* p = buffer.get(words);
      std::fill(p, p + words, uint64_t(0));
      rows = n;
    }
    return buffer.data.get();
  }
  size_t words() const { return 2 * ((rows + 63) / 64); }
};

struct Stream {
  Bits bits;
  Buffer<int64_t> hash;   // repeated rows: (row << 32 | sum index), -1 empty; open addressing
  Buffer<int32_t> last;   // per repeated row: its last occurrence
  Buffer<int32_t> listed;  // the occurrences of repeated rows
  Buffer<uint32_t> code;  // per occurrence
};

struct Workspace {
  Stream users, items;
  Buffer<int64_t> item_index;  // the batch's item occurrences, flat (K > 1)
  Buffer<float> sums;     // partial sums of the repeated rows
  Buffer<float> scratch;  // one block of triplets: rows, contribution, log-sigmoids
};

Workspace& workspace() {
  thread_local Workspace ws;
  return ws;
}

// Codes for the occurrences of one table's rows, in the order the scoring sweep visits
// them; the bits are clear again when the constructor returns or throws.  No per-row state
// beyond two bits: one pass marks each row seen / seen again (and range-checks, before
// anything is written); a second lists the occurrences of repeated rows; a third, over
// that list only, numbers the repeated rows' partial sums in order of first occurrence (a
// small hash table of repeated rows: ~6% of the distinct items at B = 65,536 on 1M items,
// ~30% of the users) and marks first and last occurrences.  The codes are those a dense
// row -> slot map gives.
class Codes {
 public:
  // row_of(o): the row of occurrence o; fail(o, row) throws the out-of-range error.
  template <typename RowOf, typename Fail>
  Codes(Stream& st, int64_t n_occ, int64_t n_rows, RowOf row_of, Fail fail)
      : bits_(st.bits.get(n_rows)), words_(st.bits.words()) {
    code_ = st.code.get(n_occ);
    // A range error throws from here (no destructor runs): clear the bits set so far
    // before rethrowing.
    int64_t o = 0;
    try {
      mark_and_number(st, n_occ, n_rows, row_of, fail, o);
    } catch (...) {
      clear(row_of, o);
      throw;
    }
    clear(row_of, n_occ);
  }
  Codes(const Codes&) = delete;
  Codes& operator=(const Codes&) = delete;

  const uint32_t* code() const { return code_; }
  int64_t repeated() const { return repeated_; }

 private:
  template <typename RowOf, typename Fail>
  void mark_and_number(Stream& st, int64_t n_occ, int64_t n_rows, RowOf& row_of, Fail& fail, int64_t& o) {
    // Mark (no branch on the bits); o counts the occurrences marked, for clear().
    for (; o < n_occ; ++o) {
      if (o + kIndicesAhead < n_occ) {
        const int64_t ahead = row_of(o + kIndicesAhead);
        if (ahead >= 0 && ahead < n_rows) __builtin_prefetch(bits_ + 2 * (ahead >> 6), 1, 3);
      }
      const int64_t r = row_of(o);
      if (r < 0 || r >= n_rows) fail(o, r);
      uint64_t* w = bits_ + 2 * (r >> 6);
      const uint64_t m = uint64_t(1) << (r & 63);
      const uint64_t seen = w[0], again = w[1];
      repeated_ += (seen & ~again & m) != 0;
      w[1] = again | (seen & m);
      w[0] = seen | m;
    }
    // Number the repeated rows' sums.
    const int64_t repeated = repeated_;
    int shift = 4;
    while ((int64_t(1) << shift) < 2 * repeated) ++shift;
    const int64_t size = int64_t(1) << shift;
    int64_t* hash = st.hash.get(size);
    std::fill(hash, hash + size, int64_t(-1));
    int32_t* last = st.last.get(std::max<int64_t>(repeated, 1));
    // Without branches on the data (a user row is repeated in about every other triplet at
    // B = 65,536 on 100k users: branches on it mispredict half the time): first every
    // occurrence is single and the repeated ones are listed, then those are numbered.
    int32_t* listed = st.listed.get(std::max<int64_t>(n_occ, 1));
    int64_t n_listed = 0;
    for (int64_t q = 0; q < n_occ; ++q) {
      const int64_t r = row_of(q);
      code_[q] = kSingle;
      listed[n_listed] = static_cast<int32_t>(q);
      n_listed += (bits_[2 * (r >> 6) + 1] >> (r & 63)) & 1;
    }
    int64_t count = 0;
    for (int64_t i = 0; i < n_listed; ++i) {
      const int64_t q = listed[i];
      const int64_t r = row_of(q);
      uint64_t h = (static_cast<uint64_t>(r) * 0x9E3779B97F4A7C15ull) >> (64 - shift);
      int64_t e;
      while ((e = hash[h]) >= 0 && (e >> 32) != r) h = (h + 1) & (size - 1);
      const bool fresh = e < 0;
      const int64_t m = fresh ? count : (e & 0xffffffff);
      hash[h] = (r << 32) | m;
      code_[q] = static_cast<uint32_t>(m) | (fresh ? kFirst : 0u);
      last[m] = static_cast<int32_t>(q);
      count += fresh;
    }
    for (int64_t m = 0; m < count; ++m) code_[last[m]] |= kLast;
  }

  // Zero the words of the first n occurrences' rows (or all words, when that is fewer).
  template <typename RowOf>
  void clear(RowOf& row_of, int64_t n) {
    if (static_cast<int64_t>(words_) <= 2 * n) {
      std::fill(bits_, bits_ + words_, uint64_t(0));
      return;
    }
    for (int64_t o = 0; o < n; ++o) {
      uint64_t* w = bits_ + 2 * (row_of(o) >> 6);
      w[0] = 0;
      w[1] = 0;
    }
  }

  uint64_t* bits_;
  size_t words_;
  int64_t repeated_ = 0;
  uint32_t* code_ = nullptr;
};

[[noreturn]] void index_error(const char* name, int64_t index, int64_t position, int64_t rows) {
  // IndexError in Python, as the Python-side range checks raise.
  TORCH_CHECK_INDEX(false, "guider_fast_cpu::dbpr_step: ", name, " has indices outside [0, ", rows, "): ",
                    index, " at position ", position);
}

// For the n margins m of a block: log_sigmoid(m) and sigmoid(-m), through one exp and one
// log1p of e = exp(-|m|) in (0, 1] (no overflow): log_sigmoid(m) = min(m, 0) - log1p(e),
// sigmoid(-m) = e / (1 + e) for m >= 0, else 1 / (1 + e).  ATen's Vectorized<float>
// (Sleef's exp and log1p, within 1 ulp, in the AVX2 / AVX-512 builds): calling libm's scalar
// expf / log1pf per triplet measured ~100 ns a triplet, more than all the rest of the math.
void log_sigmoids(const float* __restrict m, float* __restrict log_sig, float* __restrict sig, int64_t n) {
  using Vec = at::vec::Vectorized<float>;
  const Vec zero(0.0f), one(1.0f);
  for (int64_t i = 0; i < n; i += Vec::size()) {
    const int64_t count = std::min<int64_t>(Vec::size(), n - i);
    const Vec x = Vec::loadu(m + i, count);
    const Vec e = (zero - x.abs()).exp();
    (at::vec::minimum(x, zero) - e.log1p()).store(log_sig + i, count);
    const Vec r = one / (one + e);
    Vec::blendv(r, e * r, x >= zero).store(sig + i, count);
  }
}

// Row arithmetic on D floats.  __restrict (the rows never overlap) lets the compiler
// vectorise these without run-time overlap checks, which at D = 64 cost as much as the work.
inline void load_row(float* __restrict dst, const float* __restrict src, int64_t n) {
  std::memcpy(dst, src, n * sizeof(float));
}
template <typename T>
inline void load_row(float* __restrict dst, const T* __restrict src, int64_t n) {
  for (int64_t d = 0; d < n; ++d) dst[d] = static_cast<float>(src[d]);
}
inline void difference(float* __restrict out, const float* __restrict a, const float* __restrict b, int64_t n) {
  for (int64_t d = 0; d < n; ++d) out[d] = a[d] - b[d];
}
// out = c x (+ l2 y)
inline void scaled(float* __restrict out, float c, const float* __restrict x, float l2, const float* __restrict y,
                   int64_t n) {
  if (l2 != 0.0f) {
    for (int64_t d = 0; d < n; ++d) out[d] = c * x[d] + l2 * y[d];
  } else {
    for (int64_t d = 0; d < n; ++d) out[d] = c * x[d];
  }
}
inline void add_scaled(float* __restrict out, float c, const float* __restrict x, int64_t n) {
  for (int64_t d = 0; d < n; ++d) out[d] += c * x[d];
}
inline void add(float* __restrict out, const float* __restrict x, int64_t n) {
  for (int64_t d = 0; d < n; ++d) out[d] += x[d];
}

struct Problem {
  int64_t batch, k, dim;
  int64_t user_rows, item_rows;
  int64_t user_stride, item_stride;  // elements between rows
  const int64_t* users;
  const int64_t* pos;
  const int64_t* neg;  // (B, K) row-major
  double lr, l2, scale;
  bool adagrad;
};

// DC > 0: D known at compile time (DC == P.dim): every row loop below has a constant trip
// count, so the compiler unrolls it into a few vector instructions with no loop or call
// overhead (memcpy of a row included); DC == 0: any D.
template <typename T, int64_t DC, int64_t KC>
double run(const Problem& P, T* user, T* item, const float* weights, float* user_acc, float* item_acc,
           float* margins) {
  using A = float;
  const int64_t B = P.batch, K = KC > 0 ? KC : P.k, D = DC > 0 ? DC : P.dim, KI = K + 1;
  Workspace& ws = workspace();

  // ---- codes: one pass over each table's indices (range-checked before anything is written)
  Codes user_codes(ws.users, B, P.user_rows, [&](int64_t o) { return P.users[o]; },
                   [&](int64_t o, int64_t r) { index_error("users", r, o, P.user_rows); });
  // The item occurrences in sweep order (p_b, n_b0 .. n_b,K-1), flat: finding occurrence
  // o's row by o / (K + 1) instead costs an integer division per lookup, which measured
  // as much as the map accesses themselves.
  // For K = 1, occurrence o is pos[o / 2] or neg[o / 2] (a shift and a select).
  auto item_fail = [&](int64_t o, int64_t r) {
    const int64_t b = o / KI, j = o - b * KI;
    if (j == 0) index_error("pos_items", r, b, P.item_rows);
    index_error("neg_items", r, b * K + j - 1, P.item_rows);
  };
  const int64_t* item_index = nullptr;
  if (K != 1) {
    int64_t* flat = ws.item_index.get(B * KI);
    for (int64_t b = 0; b < B; ++b) {
      flat[b * KI] = P.pos[b];
      for (int64_t j = 0; j < K; ++j) flat[b * KI + 1 + j] = P.neg[b * K + j];
    }
    item_index = flat;
  }
  const int64_t* pos_rows = P.pos;
  const int64_t* neg_rows = P.neg;
  auto codes_of_items = [&]() {
    if (K == 1) {
      return Codes(ws.items, B * KI, P.item_rows,
                   [=](int64_t o) { return (o & 1) ? neg_rows[o >> 1] : pos_rows[o >> 1]; }, item_fail);
    }
    return Codes(ws.items, B * KI, P.item_rows, [=](int64_t o) { return item_index[o]; }, item_fail);
  };
  Codes item_codes = codes_of_items();
  const uint32_t* ucode = user_codes.code();
  const uint32_t* icode = item_codes.code();
  A* sums = ws.sums.get((user_codes.repeated() + item_codes.repeated()) * D);
  A* user_sums = sums;
  A* item_sums = sums + user_codes.repeated() * D;

  // ---- the scoring sweep: margins, loss, gradient contributions, and each row's update
  // as soon as its last occurrence has contributed.  A row is written only after every
  // triplet that reads it (its last occurrence is in this or an earlier triplet), and each
  // block of triplets copies its rows to `rows` before any of them is written: every
  // gradient comes from the pre-step rows, exactly as if all rows were read before any
  // is written.  Blocks of kBlock triplets: load and score them all (their rows' misses
  // overlap), then the log-sigmoids of the block at once (vectorised), then update.
  // SGD folds -lr into the coefficients (the sums are then of -lr * gradient), as the
  // torch step does.
  const A g_scale = static_cast<A>(P.adagrad ? P.scale : -P.lr * P.scale);
  const A l2s = static_cast<A>(P.l2) * g_scale;
  const A inv_k = A(1) / static_cast<A>(K);
  const int64_t row_bytes = D * static_cast<int64_t>(sizeof(T));
  const int64_t sum_bytes = D * static_cast<int64_t>(sizeof(A));
  const int64_t per_triplet = (K + 3) * D;  // u, p, n_0 .. n_{K-1}, p - n (K = 1)
  A* rows = ws.scratch.get(kBlock * per_triplet + D + 3 * kBlock * K);
  A* g = rows + kBlock * per_triplet;  // the contribution being emitted
  A* log_sig = g + D;
  A* sig = log_sig + kBlock * K;
  A* block_margins = sig + kBlock * K;

  // Row update: SGD row += g (g already holds -lr * gradient); row-wise Adagrad
  // acc += mean(g^2) (float32), row -= lr g / (sqrt(acc) + eps).  16-bit tables: float32
  // update, rounded once (to nearest even).
  auto apply = [&](T* __restrict row, float* acc) {
    if (acc != nullptr) {
      const A mean_sq = dot(g, g, D) / static_cast<A>(D);
      const float total = *acc + static_cast<float>(mean_sq);
      *acc = total;
      const A step = static_cast<A>(-P.lr) / (std::sqrt(static_cast<A>(total)) + static_cast<A>(kAdagradEps));
      for (int64_t d = 0; d < D; ++d) g[d] *= step;
    }
    if constexpr (std::is_same_v<T, A>) {
      add(row, g, D);
    } else {
      for (int64_t d = 0; d < D; ++d) row[d] = static_cast<T>(static_cast<float>(row[d]) + g[d]);
    }
  };
  auto emit = [&](T* table, int64_t stride, int64_t r, uint32_t code, A* table_sums, float* acc) {
    if (code & kSingle) {
      apply(table + r * stride, acc == nullptr ? nullptr : acc + r);
      return;
    }
    A* sum = table_sums + (code & kSumIndex) * D;
    if (code & kFirst) {
      std::memcpy(sum, g, sum_bytes);
    } else if (code & kLast) {
      add(g, sum, D);  // the total: earlier occurrences' sum, plus this one
      apply(table + r * stride, acc == nullptr ? nullptr : acc + r);
    } else {
      add(sum, g, D);
    }
  };
  float* uacc = P.adagrad ? user_acc : nullptr;
  float* iacc = P.adagrad ? item_acc : nullptr;

  double loss = 0.0;
  for (int64_t start = 0; start < B; start += kBlock) {
    const int64_t n_block = std::min(kBlock, B - start);
    // Load and score the block.
    for (int64_t t = 0; t < n_block; ++t) {
      const int64_t b = start + t;
      if (b + kTripletsAhead < B) {
        const int64_t a = b + kTripletsAhead;
        prefetch_write(user + P.users[a] * P.user_stride, row_bytes);
        prefetch_write(item + P.pos[a] * P.item_stride, row_bytes);
        for (int64_t j = 0; j < K; ++j) prefetch_write(item + P.neg[a * K + j] * P.item_stride, row_bytes);
        if (uacc != nullptr) {
          __builtin_prefetch(uacc + P.users[a], 1, 3);
          __builtin_prefetch(iacc + P.pos[a], 1, 3);
          for (int64_t j = 0; j < K; ++j) __builtin_prefetch(iacc + P.neg[a * K + j], 1, 3);
        }
        // The partial sums of repeated rows (one prefetch either way: a single occurrence
        // prefetches its row again).
        const uint32_t cu = ucode[a];
        prefetch_write((cu & kSingle) ? static_cast<const void*>(user + P.users[a] * P.user_stride)
                                      : static_cast<const void*>(user_sums + (cu & kSumIndex) * D),
                       sum_bytes);
        for (int64_t j = 0; j < KI; ++j) {
          const uint32_t c = icode[a * KI + j];
          const int64_t r = j == 0 ? P.pos[a] : P.neg[a * K + j - 1];
          prefetch_write((c & kSingle) ? static_cast<const void*>(item + r * P.item_stride)
                                       : static_cast<const void*>(item_sums + (c & kSumIndex) * D),
                         sum_bytes);
        }
      }
      A* u = rows + t * per_triplet;
      A* p = u + D;
      load_row(u, user + P.users[b] * P.user_stride, D);
      load_row(p, item + P.pos[b] * P.item_stride, D);
      for (int64_t j = 0; j < K; ++j) load_row(p + (1 + j) * D, item + P.neg[b * K + j] * P.item_stride, D);
      // Margins <u, p> - <u, n_k>; for K = 1 as <u, p - n>, as the torch step forms them.
      if (K == 1) {
        A* diff = p + 2 * D;
        difference(diff, p, p + D, D);
        block_margins[t] = dot(u, diff, D);
      } else {
        const A up = dot(u, p, D);
        for (int64_t j = 0; j < K; ++j) block_margins[t * K + j] = up - dot(u, p + (1 + j) * D, D);
      }
    }
    std::memcpy(margins + start * K, block_margins, n_block * K * sizeof(A));
    log_sigmoids(block_margins, log_sig, sig, n_block * K);

    // Loss, coefficients, contributions, updates.
    for (int64_t t = 0; t < n_block; ++t) {
      const int64_t b = start + t;
      const A* u = rows + t * per_triplet;
      const A* p = u + D;
      const A w = weights == nullptr ? A(1) : weights[b];
      double mean_log_sig = 0.0;
      for (int64_t j = 0; j < K; ++j) mean_log_sig += static_cast<double>(log_sig[t * K + j]);
      double row_loss = -static_cast<double>(w) * mean_log_sig / static_cast<double>(K);
      if (P.l2 != 0.0) {
        double sq = 0.0;
        for (int64_t j = 0; j < K + 2; ++j) sq += static_cast<double>(dot(u + j * D, u + j * D, D));
        row_loss += 0.5 * P.l2 * sq;
      }
      loss += row_loss;

      // s_k = sigmoid(-m_k) c / K with c = w g_scale; S = sum_k s_k.
      const A coef = w * g_scale * inv_k;
      A* s = sig + t * K;
      A s_total = 0;
      for (int64_t j = 0; j < K; ++j) {
        s[j] *= coef;
        s_total += s[j];
      }
      // User: sum_k s_k n_k - S p (+ l2 u); for K = 1, -s (p - n).
      if (K == 1) {
        scaled(g, -s[0], p + 2 * D, l2s, u, D);
      } else {
        scaled(g, -s_total, p, l2s, u, D);
        for (int64_t j = 0; j < K; ++j) add_scaled(g, s[j], p + (1 + j) * D, D);
      }
      emit(user, P.user_stride, P.users[b], ucode[b], user_sums, uacc);
      // Positive: -S u (+ l2 p); negative k: s_k u (+ l2 n_k).
      for (int64_t j = 0; j < KI; ++j) {
        scaled(g, j == 0 ? -s_total : s[j - 1], u, l2s, p + j * D, D);
        emit(item, P.item_stride, j == 0 ? P.pos[b] : P.neg[b * K + j - 1], icode[b * KI + j], item_sums, iacc);
      }
    }
  }
  return loss;
}

// The usual embedding widths (and K = 1) get a build with D (and K) fixed at compile time
// (see run).
template <typename T>
double run_any(const Problem& P, T* user, T* item, const float* weights, float* user_acc, float* item_acc,
               float* margins) {
  if (P.k == 1) {
    switch (P.dim) {
      case 32:
        return run<T, 32, 1>(P, user, item, weights, user_acc, item_acc, margins);
      case 64:
        return run<T, 64, 1>(P, user, item, weights, user_acc, item_acc, margins);
      case 128:
        return run<T, 128, 1>(P, user, item, weights, user_acc, item_acc, margins);
      default:
        return run<T, 0, 1>(P, user, item, weights, user_acc, item_acc, margins);
    }
  }
  switch (P.dim) {
    case 64:
      return run<T, 64, 0>(P, user, item, weights, user_acc, item_acc, margins);
    default:
      return run<T, 0, 0>(P, user, item, weights, user_acc, item_acc, margins);
  }
}

void check_table(const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), "guider_fast_cpu::dbpr_step: ", name, " must be a CPU tensor, got ",
              t.device());
  TORCH_CHECK(t.dim() == 2, "guider_fast_cpu::dbpr_step: ", name, " must be a (rows, D) table, got ",
              t.dim(), " dimensions");
  TORCH_CHECK(t.size(1) == 1 || t.stride(1) == 1, "guider_fast_cpu::dbpr_step: ", name,
              " must have contiguous rows (stride(1) == 1), got strides ", t.strides());
  TORCH_CHECK(t.size(0) <= INT32_MAX, "guider_fast_cpu::dbpr_step: ", name, " has ", t.size(0),
              " rows, more than the 2^31 - 1 this kernel indexes");
}

void check_index(const char* name, const at::Tensor& t, at::IntArrayRef shape) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kLong && t.is_contiguous(),
              "guider_fast_cpu::dbpr_step: ", name, " must be a contiguous int64 CPU tensor, got ",
              t.scalar_type(), " on ", t.device(), t.is_contiguous() ? "" : " (non-contiguous)");
  TORCH_CHECK(t.sizes() == shape, "guider_fast_cpu::dbpr_step: ", name, " must have shape ", shape,
              ", got ", t.sizes());
}

void check_accumulator(const char* name, const c10::optional<at::Tensor>& acc, int64_t rows) {
  TORCH_CHECK(acc.has_value(), "guider_fast_cpu::dbpr_step: optimizer 'rowwise_adagrad' needs ", name);
  const at::Tensor& a = *acc;
  TORCH_CHECK(a.device().is_cpu() && a.scalar_type() == at::kFloat && a.is_contiguous() && a.dim() == 1 &&
                  a.size(0) == rows,
              "guider_fast_cpu::dbpr_step: ", name, " must be a contiguous float32 CPU tensor of shape (",
              rows, ",), got ", a.scalar_type(), " ", a.sizes());
}

std::tuple<at::Tensor, at::Tensor> dbpr_step(at::Tensor user_table, at::Tensor item_table,
                                             const at::Tensor& users, const at::Tensor& pos_items,
                                             const at::Tensor& neg_items,
                                             const c10::optional<at::Tensor>& weights,
                                             c10::optional<at::Tensor> user_accumulator,
                                             c10::optional<at::Tensor> item_accumulator, double lr,
                                             double l2, double scale, c10::string_view optimizer) {
  check_table("user_table", user_table);
  check_table("item_table", item_table);
  TORCH_CHECK(user_table.scalar_type() == item_table.scalar_type(),
              "guider_fast_cpu::dbpr_step: item_table must have the dtype of user_table (",
              user_table.scalar_type(), "), got ", item_table.scalar_type());
  TORCH_CHECK(user_table.size(1) == item_table.size(1),
              "guider_fast_cpu::dbpr_step: user_table and item_table must have the same D, got ",
              user_table.size(1), " and ", item_table.size(1));
  TORCH_CHECK(users.dim() == 1 && users.size(0) > 0,
              "guider_fast_cpu::dbpr_step: users must be a non-empty (B,) index vector, got shape ",
              users.sizes());
  const int64_t B = users.size(0);
  TORCH_CHECK(neg_items.dim() == 2 && neg_items.size(0) == B && neg_items.size(1) > 0,
              "guider_fast_cpu::dbpr_step: neg_items must have shape (", B, ", K) with K >= 1, got ",
              neg_items.sizes());
  const int64_t K = neg_items.size(1);
  check_index("users", users, {B});
  check_index("pos_items", pos_items, {B});
  check_index("neg_items", neg_items, {B, K});
  TORCH_CHECK(B * (K + 1) <= static_cast<int64_t>(kSumIndex), "guider_fast_cpu::dbpr_step: B (K + 1) = ",
              B * (K + 1), " item occurrences, more than the 2^29 - 1 this kernel indexes");
  const bool adagrad = optimizer == "rowwise_adagrad";
  TORCH_CHECK(adagrad || optimizer == "sgd",
              "guider_fast_cpu::dbpr_step: optimizer must be 'sgd' or 'rowwise_adagrad', got '",
              std::string(optimizer), "'");
  if (adagrad) {
    check_accumulator("user_accumulator", user_accumulator, user_table.size(0));
    check_accumulator("item_accumulator", item_accumulator, item_table.size(0));
  }
  at::Tensor w;
  if (weights.has_value()) {
    w = weights->contiguous();
    TORCH_CHECK(w.device().is_cpu() && at::isFloatingType(w.scalar_type()) && w.dim() == 1 && w.size(0) == B,
                "guider_fast_cpu::dbpr_step: weights must be a float (", B, ",) CPU tensor, got ",
                w.scalar_type(), " ", w.sizes());
  }
  TORCH_CHECK(std::isfinite(lr) && lr > 0, "guider_fast_cpu::dbpr_step: lr must be a finite number > 0, got ", lr);
  TORCH_CHECK(std::isfinite(l2) && l2 >= 0, "guider_fast_cpu::dbpr_step: l2 must be >= 0, got ", l2);

  const at::ScalarType dtype = user_table.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "guider_fast_cpu::dbpr_step: the tables must be float32, float16 or bfloat16, got ", dtype,
              " (float64 tables: the torch backend)");
  at::Tensor margins = at::empty({B, K}, user_table.options().dtype(at::kFloat));
  Problem P{B, K, user_table.size(1), user_table.size(0), item_table.size(0), user_table.stride(0),
            item_table.stride(0), users.data_ptr<int64_t>(), pos_items.data_ptr<int64_t>(),
            neg_items.data_ptr<int64_t>(), lr, l2, scale, adagrad};
  float* ua = adagrad ? user_accumulator->data_ptr<float>() : nullptr;
  float* ia = adagrad ? item_accumulator->data_ptr<float>() : nullptr;
  // The weights in float32, as the torch step takes them (_compute(w).to(float32)).
  if (w.defined()) w = w.to(at::kFloat).contiguous();
  double loss = 0.0;
  const float* wp = w.defined() ? w.data_ptr<float>() : nullptr;
  float* mp = margins.data_ptr<float>();
  if (dtype == at::kFloat) {
    loss = run_any<float>(P, user_table.data_ptr<float>(), item_table.data_ptr<float>(), wp, ua, ia, mp);
  } else if (dtype == at::kHalf) {
    loss = run_any<c10::Half>(P, user_table.data_ptr<c10::Half>(), item_table.data_ptr<c10::Half>(), wp, ua, ia, mp);
  } else {
    loss = run_any<c10::BFloat16>(P, user_table.data_ptr<c10::BFloat16>(), item_table.data_ptr<c10::BFloat16>(), wp,
                              ua, ia, mp);
  }
  at::Tensor loss_t = at::full({}, loss * scale, user_table.options().dtype(at::kFloat));
  return {loss_t, margins};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(guider_fast_cpu, m) {
  m.def(
      "dbpr_step(Tensor(a!) user_table, Tensor(b!) item_table, Tensor users, Tensor pos_items, "
      "Tensor neg_items, Tensor? weights, Tensor(c!)? user_accumulator, Tensor(d!)? item_accumulator, "
      "float lr, float l2, float scale, str optimizer) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(guider_fast_cpu, CPU, m) { m.impl("dbpr_step", &dbpr_step); }

}  // namespace guider_fast_cpu
