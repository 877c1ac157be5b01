// The memory floor of a DBPR training step on CPU, for benchmarks/dbpr_contenders.py: the
// row traffic that any step must do, with no arithmetic to speak of and nothing else.
//
//   rmw(user, item, users, pos, neg, ahead): for each triplet, in batch order, read its
//       K + 2 rows (user row, positive, K negatives: D float32 each) and write them back
//       (row += 1e-7): each row read once and written once per occurrence, the least a
//       step touches.
//   gather(...): the same reads, no writes (the floor of a forward pass).
//
// `ahead` = how many triplets ahead the rows are prefetched (0: none; then only the
// out-of-order core overlaps the misses).  Built by torch.utils.cpp_extension.load with
// -O3 -march=native: a measurement of this machine, never shipped.

#include <torch/extension.h>

#include <cstdint>

namespace {

struct Rows {
  float* user;
  float* item;
  const int64_t* users;
  const int64_t* pos;
  const int64_t* neg;
  int64_t batch, k, dim;
};

Rows rows_of(torch::Tensor& user, torch::Tensor& item, const torch::Tensor& users, const torch::Tensor& pos,
             const torch::Tensor& neg) {
  TORCH_CHECK(user.scalar_type() == torch::kFloat && item.scalar_type() == torch::kFloat && user.is_contiguous() &&
                  item.is_contiguous(), "dbpr_floor: contiguous float32 tables");
  TORCH_CHECK(users.scalar_type() == torch::kLong && pos.scalar_type() == torch::kLong &&
                  neg.scalar_type() == torch::kLong && users.is_contiguous() && pos.is_contiguous() &&
                  neg.is_contiguous() && neg.dim() == 2, "dbpr_floor: contiguous int64 indices, neg (B, K)");
  return {user.data_ptr<float>(), item.data_ptr<float>(), users.data_ptr<int64_t>(), pos.data_ptr<int64_t>(),
          neg.data_ptr<int64_t>(), users.size(0), neg.size(1), user.size(1)};
}

// Into L2 (prefetcht1): measured faster than into L1 here (11.4 vs 9.5 M triplets/s read +
// write at 100k x 1M, D = 64): an L1 prefetch holds a fill buffer until its line arrives.
inline void prefetch_row(const float* row, int64_t dim, bool write) {
  const char* c = reinterpret_cast<const char*>(row);
  for (int64_t o = 0; o < dim * 4; o += 64) {
    if (write) {
      __builtin_prefetch(c + o, 1, 2);
    } else {
      __builtin_prefetch(c + o, 0, 2);
    }
  }
}

template <bool Write>
double sweep(const Rows& r, int64_t ahead) {
  // Reads are summed into 16 independent lanes: one running sum would make the sweep a
  // chain of dependent adds (bound by add latency, not memory).
  float lanes[16] = {};
  for (int64_t b = 0; b < r.batch; ++b) {
    if (ahead > 0 && b + ahead < r.batch) {
      const int64_t a = b + ahead;
      prefetch_row(r.user + r.users[a] * r.dim, r.dim, Write);
      prefetch_row(r.item + r.pos[a] * r.dim, r.dim, Write);
      for (int64_t j = 0; j < r.k; ++j) prefetch_row(r.item + r.neg[a * r.k + j] * r.dim, r.dim, Write);
    }
    for (int64_t j = -2; j < r.k; ++j) {
      float* row = j == -2 ? r.user + r.users[b] * r.dim
                           : r.item + (j == -1 ? r.pos[b] : r.neg[b * r.k + j]) * r.dim;
      if (Write) {
        for (int64_t d = 0; d < r.dim; ++d) row[d] += 1e-7f;
      } else {
        int64_t d = 0;
        for (; d + 16 <= r.dim; d += 16)
          for (int l = 0; l < 16; ++l) lanes[l] += row[d + l];
        for (; d < r.dim; ++d) lanes[0] += row[d];
      }
    }
  }
  float sum = 0.0f;
  for (float lane : lanes) sum += lane;
  return sum;
}

double rmw(torch::Tensor user, torch::Tensor item, torch::Tensor users, torch::Tensor pos, torch::Tensor neg,
           int64_t ahead) {
  return sweep<true>(rows_of(user, item, users, pos, neg), ahead);
}

double gather(torch::Tensor user, torch::Tensor item, torch::Tensor users, torch::Tensor pos, torch::Tensor neg,
              int64_t ahead) {
  return sweep<false>(rows_of(user, item, users, pos, neg), ahead);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rmw", &rmw, "read and write back every row of every triplet");
  m.def("gather", &gather, "read every row of every triplet");
}
