// Torch binding of csrc/guider_fast_cuda.h: argument checks, output allocation, launch.
//
// The op schemas and fake kernels live in Python (guider_fast/_library_cuda.py,
// namespace guider_fast_cuda::, apart from the Triton ops under guider_fast::);
// this file only registers implementations, with TORCH_LIBRARY_IMPL:
//   * real build (nvcc, CUDA torch): the CUDA key; device pointers, the current
//     stream of the tensors' device; importable as guider_fast._C (empty module).
//   * emulation build (GUIDER_FAST_CUDA_SIM, g++): the CPU key; the same kernel
//     sources run on csrc/sim's fibers, on host pointers (a test vehicle).
// Every check names the op and the argument; nothing here syncs the device.
#ifndef GUIDER_FAST_CUDA_SIM
#include <Python.h>  // first, as Python asks
#endif

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <exception>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#ifdef GUIDER_FAST_CUDA_SIM
#include <mutex>
#else
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

// After the torch headers: under the sim it defines CUDA's qualifiers as macros.
#include "guider_fast_cuda.h"
#include "samples_loss_cuda.h"
#include "sinkhorn_cuda.h"

namespace gfc = guider_fast::cuda;

namespace {

#ifdef GUIDER_FAST_CUDA_SIM
constexpr c10::DeviceType kDeviceType = c10::DeviceType::CPU;
constexpr const char* kDeviceWhat = "a CPU tensor (this is the CPU emulation build of the CUDA kernels)";
#else
constexpr c10::DeviceType kDeviceType = c10::DeviceType::CUDA;
constexpr const char* kDeviceWhat = "a CUDA tensor";
#endif

constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();

std::string dtype_name(at::ScalarType t) { return std::string(c10::toString(t)); }

// All of an op's tensors on one device of the build's type (the first tensor's).
void check_device(const char* op, const char* name, const at::Tensor& x, const char* first_name,
                  const at::Tensor& first) {
  TORCH_CHECK(x.device().type() == kDeviceType, op, ": argument '", name, "' must be ", kDeviceWhat, ", got a ",
              x.device().str(), " tensor");
  TORCH_CHECK(x.device() == first.device(), op, ": argument '", name, "' is on ", x.device().str(), " but '",
              first_name, "' is on ", first.device().str(), ": all tensors must be on one device");
}

gfc::DType float_dtype(const char* op, const char* name, const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat: return gfc::DType::Float32;
    case at::kHalf: return gfc::DType::Float16;
    case at::kBFloat16: return gfc::DType::BFloat16;
    default:
      TORCH_CHECK(false, op, ": argument '", name, "' must be float32, float16 or bfloat16, got ",
                  dtype_name(x.scalar_type()));
  }
  return gfc::DType::Float32;  // unreachable
}

void check_dtype(const char* op, const char* name, const at::Tensor& x, at::ScalarType want) {
  TORCH_CHECK(x.scalar_type() == want, op, ": argument '", name, "' must be ", dtype_name(want), ", got ",
              dtype_name(x.scalar_type()));
}

void check_same_dtype(const char* op, const char* name, const at::Tensor& x, const char* like_name,
                      const at::Tensor& like) {
  TORCH_CHECK(x.scalar_type() == like.scalar_type(), op, ": argument '", name, "' must have the dtype of '",
              like_name, "' (", dtype_name(like.scalar_type()), "), got ", dtype_name(x.scalar_type()));
}

void check_rank(const char* op, const char* name, const at::Tensor& x, int64_t rank, const char* what) {
  TORCH_CHECK(x.dim() == rank, op, ": argument '", name, "' must be ", what, " (", rank, "-D), got shape ",
              x.sizes());
}

void check_size(const char* op, const char* name, const at::Tensor& x, int64_t dim, int64_t want,
                const char* what) {
  TORCH_CHECK(x.size(dim) == want, op, ": argument '", name, "' must have size ", want, " in dimension ", dim, " (",
              what, "), got shape ", x.sizes());
}

void check_contiguous(const char* op, const char* name, const at::Tensor& x) {
  TORCH_CHECK(x.is_contiguous(), op, ": argument '", name, "' must be contiguous (the kernel indexes it densely), "
              "got strides ", x.strides(), " for shape ", x.sizes());
}

void check_int32(const char* op, const char* name, int64_t value, const char* what) {
  TORCH_CHECK(value <= kInt32Max, op, ": argument '", name, "': ", what, " is ", value,
              ", over the kernels' 32-bit limit ", kInt32Max);
}

void check_nonempty(const char* op, const char* name, int64_t value, const char* what) {
  TORCH_CHECK(value >= 1, op, ": argument '", name, "' has ", value, " ", what, ", needs at least 1");
}

// An int64 index vector (B,), B in [1, 2^31): returns B.
int64_t check_index_vector(const char* op, const char* name, const at::Tensor& x, const char* what) {
  check_dtype(op, name, x, at::kLong);
  check_rank(op, name, x, 1, "an index vector (B,)");
  check_contiguous(op, name, x);
  check_nonempty(op, name, x.size(0), what);
  check_int32(op, name, x.size(0), "the batch size");
  return x.size(0);
}

gfc::MatrixView view(const at::Tensor& x, gfc::DType dtype) {
  return gfc::MatrixView{x.data_ptr(), dtype, x.stride(0), x.stride(1)};
}

#ifdef GUIDER_FAST_CUDA_SIM
// The sim runs one block at a time in process-global state: one launch at a time.
std::mutex& sim_mutex() {
  static std::mutex m;
  return m;
}

// Indices are not range-checked by the kernels (the caller validates on the GPU,
// where a check costs a sync); on host tensors the check is free, and an
// out-of-range index would read outside the buffer.
void check_index_range(const char* op, const char* name, const at::Tensor& idx, int64_t n_rows, const char* table) {
  if (idx.numel() == 0) return;
  const auto [lo, hi] = at::aminmax(idx);
  const int64_t low = lo.item<int64_t>(), high = hi.item<int64_t>();
  TORCH_CHECK(low >= 0 && high < n_rows, op, ": argument '", name, "' holds indices in [", low, ", ", high,
              "], outside the ", n_rows, " rows of '", table, "'");
}
#else
void check_index_range(const char*, const char*, const at::Tensor&, int64_t, const char*) {}
#endif

// Runs `launch(stream)` on the device of `like` and turns its status into an error.
template <class F>
void run(const char* op, const at::Tensor& like, F&& launch) {
  cudaError_t status;
#ifdef GUIDER_FAST_CUDA_SIM
  (void)like;
  std::lock_guard<std::mutex> lock(sim_mutex());
  try {
    status = launch(static_cast<cudaStream_t>(nullptr));
  } catch (const std::exception& e) {
    TORCH_CHECK(false, op, ": the CUDA emulation reported a kernel error: ", e.what());
  }
  TORCH_CHECK(status == cudaSuccess, op, ": launch failed: ", cudaGetErrorString(status), " (",
              cuda_sim::last_error_message(), ")");
#else
  const c10::cuda::CUDAGuard guard(like.device());
  status = launch(c10::cuda::getCurrentCUDAStream(like.device().index()).stream());
  TORCH_CHECK(status == cudaSuccess, op, ": launch failed: ", cudaGetErrorString(status));
#endif
}

// ------------------------------------------------------------------ calibration

struct CalibrationResult {
  at::Tensor weights, clean, distance, normalized, workspace;

  explicit CalibrationResult(int64_t batch, const at::Tensor& like) {
    const auto f32 = like.options().dtype(at::kFloat);
    weights = at::empty({batch}, f32);
    clean = at::empty({batch}, like.options().dtype(at::kBool));
    distance = at::empty({batch}, f32);
    normalized = at::empty({batch}, f32);
    workspace = at::empty({gfc::calibration_workspace_floats(batch)}, f32);
  }
  gfc::CalibrationOutputs outputs() {
    return gfc::CalibrationOutputs{weights.data_ptr<float>(), reinterpret_cast<uint8_t*>(clean.data_ptr<bool>()),
                                   distance.data_ptr<float>(), normalized.data_ptr<float>(),
                                   workspace.data_ptr<float>()};
  }
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> tuple() const {
    return {weights, clean, distance, normalized};
  }
};

// u_code (B, bits) and the codes shaped like it: one float dtype, sign-free strides.
gfc::DType check_codes(const char* op, const at::Tensor& u_code, int64_t batch) {
  check_rank(op, "u_code", u_code, 2, "(B, bits) hash-layer output");
  check_size(op, "u_code", u_code, 0, batch, "one code per row of the batch");
  check_nonempty(op, "u_code", u_code.size(1), "bits");
  check_int32(op, "u_code", u_code.size(1), "the code length");
  return float_dtype(op, "u_code", u_code);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> calibrate_rows(
    const at::Tensor& t, const at::Tensor& v, const at::Tensor& u_code, const at::Tensor& t_code,
    const at::Tensor& v_code, double threshold, bool euclidean) {
  const char* op = "guider_fast_cuda::calibrate_rows";
  check_device(op, "t", t, "t", t);
  for (const auto& [name, x] : {std::pair<const char*, const at::Tensor&>{"v", v}, {"u_code", u_code},
                                {"t_code", t_code}, {"v_code", v_code}}) {
    check_device(op, name, x, "t", t);
  }
  check_rank(op, "t", t, 2, "(B, d) rows");
  const int64_t batch = t.size(0), dim = t.size(1);
  check_nonempty(op, "t", batch, "rows");
  check_int32(op, "t", batch, "the batch size");
  const gfc::DType feat = float_dtype(op, "t", t);
  check_same_dtype(op, "v", v, "t", t);
  check_rank(op, "v", v, 2, "(B, d) rows");
  TORCH_CHECK(v.sizes() == t.sizes(), op, ": argument 'v' must have the shape of 't' ", t.sizes(), ", got ",
              v.sizes());
  const gfc::DType code = check_codes(op, u_code, batch);
  for (const auto& [name, x] : {std::pair<const char*, const at::Tensor&>{"t_code", t_code}, {"v_code", v_code}}) {
    check_same_dtype(op, name, x, "u_code", u_code);
    TORCH_CHECK(x.sizes() == u_code.sizes(), op, ": argument '", name, "' must have the shape of 'u_code' ",
                u_code.sizes(), ", got ", x.sizes());
  }
  CalibrationResult out(batch, t);
  run(op, t, [&](cudaStream_t stream) {
    return gfc::calibrate_rows(view(t, feat), view(v, feat), view(u_code, code), view(t_code, code),
                               view(v_code, code), batch, dim, u_code.size(1), static_cast<float>(threshold),
                               euclidean, out.outputs(), stream);
  });
  return out.tuple();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> calibrate_cached(
    const at::Tensor& items, const at::Tensor& item_distance, const at::Tensor& u_code, const at::Tensor& text_sign,
    const at::Tensor& text_nonzero, const at::Tensor& image_sign, const at::Tensor& image_nonzero,
    double threshold) {
  const char* op = "guider_fast_cuda::calibrate_cached";
  const std::pair<const char*, const at::Tensor&> packed[] = {
      {"text_sign", text_sign}, {"text_nonzero", text_nonzero}, {"image_sign", image_sign},
      {"image_nonzero", image_nonzero}};
  check_device(op, "items", items, "items", items);
  check_device(op, "item_distance", item_distance, "items", items);
  check_device(op, "u_code", u_code, "items", items);
  for (const auto& [name, x] : packed) check_device(op, name, x, "items", items);
  const int64_t batch = check_index_vector(op, "items", items, "rows");
  check_dtype(op, "item_distance", item_distance, at::kFloat);
  check_rank(op, "item_distance", item_distance, 1, "the per-item distances (n_items,)");
  check_contiguous(op, "item_distance", item_distance);
  const int64_t n_items = item_distance.size(0);
  const gfc::DType code = check_codes(op, u_code, batch);
  const int64_t bits = u_code.size(1), words = (bits + 63) / 64;
  for (const auto& [name, x] : packed) {
    check_dtype(op, name, x, at::kLong);
    check_rank(op, name, x, 2, "packed codes (n_items, ceil(bits / 64))");
    check_size(op, name, x, 0, n_items, "one row per item of 'item_distance'");
    check_size(op, name, x, 1, words, "ceil(bits / 64) words for the bits of 'u_code'");
    check_contiguous(op, name, x);
  }
  check_index_range(op, "items", items, n_items, "item_distance");
  CalibrationResult out(batch, u_code);
  run(op, items, [&](cudaStream_t stream) {
    return gfc::calibrate_cached(items.data_ptr<int64_t>(), item_distance.data_ptr<float>(), view(u_code, code),
                                 text_sign.data_ptr<int64_t>(), text_nonzero.data_ptr<int64_t>(),
                                 image_sign.data_ptr<int64_t>(), image_nonzero.data_ptr<int64_t>(), words, batch, bits,
                                 static_cast<float>(threshold), out.outputs(), stream);
  });
  return out.tuple();
}

// ------------------------------------------------------------------ DBPR

struct DbprArgs {
  gfc::DType table;
  int64_t batch, k_neg, dim;
};

// The tables (rows, D) of one float dtype and the int64 indices users, pos_items (B,), neg_items (B, K).
DbprArgs check_dbpr(const char* op, const at::Tensor& user_table, const at::Tensor& item_table,
                    const at::Tensor& users, const at::Tensor& pos_items, const at::Tensor& neg_items) {
  check_device(op, "user_table", user_table, "user_table", user_table);
  for (const auto& [name, x] : {std::pair<const char*, const at::Tensor&>{"item_table", item_table},
                                {"users", users}, {"pos_items", pos_items}, {"neg_items", neg_items}}) {
    check_device(op, name, x, "user_table", user_table);
  }
  check_rank(op, "user_table", user_table, 2, "an embedding table (rows, D)");
  check_rank(op, "item_table", item_table, 2, "an embedding table (rows, D)");
  const gfc::DType table = float_dtype(op, "user_table", user_table);
  check_same_dtype(op, "item_table", item_table, "user_table", user_table);
  const int64_t dim = user_table.size(1);
  check_size(op, "item_table", item_table, 1, dim, "the embedding size D of 'user_table'");
  const int64_t batch = check_index_vector(op, "users", users, "triplets");
  check_index_vector(op, "pos_items", pos_items, "triplets");
  check_size(op, "pos_items", pos_items, 0, batch, "one positive per triplet of 'users'");
  check_dtype(op, "neg_items", neg_items, at::kLong);
  check_rank(op, "neg_items", neg_items, 2, "an index matrix (B, K)");
  check_size(op, "neg_items", neg_items, 0, batch, "K negatives per triplet of 'users'");
  check_nonempty(op, "neg_items", neg_items.size(1), "negatives per triplet");
  check_int32(op, "neg_items", neg_items.size(1), "the number of negatives K");
  check_index_range(op, "users", users, user_table.size(0), "user_table");
  check_index_range(op, "pos_items", pos_items, item_table.size(0), "item_table");
  check_index_range(op, "neg_items", neg_items, item_table.size(0), "item_table");
  return DbprArgs{table, batch, neg_items.size(1), dim};
}

struct TripletWeights {
  const void* data = nullptr;
  gfc::DType dtype = gfc::DType::Float32;
  int64_t stride = 0;
};

TripletWeights check_weights(const char* op, const std::optional<at::Tensor>& weights, const at::Tensor& like,
                          int64_t batch) {
  TripletWeights w;
  if (weights.has_value()) {
    check_device(op, "weights", *weights, "user_table", like);
    check_rank(op, "weights", *weights, 1, "one weight per triplet (B,)");
    check_size(op, "weights", *weights, 0, batch, "one weight per triplet of 'users'");
    w.dtype = float_dtype(op, "weights", *weights);
    w.data = weights->data_ptr();
    w.stride = weights->stride(0);
  }
  return w;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dbpr_forward(const at::Tensor& user_table,
                                                            const at::Tensor& item_table, const at::Tensor& users,
                                                            const at::Tensor& pos_items, const at::Tensor& neg_items,
                                                            const std::optional<at::Tensor>& weights) {
  const char* op = "guider_fast_cuda::dbpr_forward";
  const DbprArgs a = check_dbpr(op, user_table, item_table, users, pos_items, neg_items);
  const TripletWeights w = check_weights(op, weights, user_table, a.batch);
  const auto f32 = user_table.options().dtype(at::kFloat);
  at::Tensor rows = at::empty({a.batch}, f32), coef = at::empty({a.batch, a.k_neg + 1}, f32),
             log_sig = at::empty({a.batch}, f32);
  const gfc::DbprForwardOutputs out{rows.data_ptr<float>(), coef.data_ptr<float>(), log_sig.data_ptr<float>(),
                                    nullptr};
  run(op, user_table, [&](cudaStream_t stream) {
    return gfc::dbpr_forward(view(user_table, a.table), view(item_table, a.table), users.data_ptr<int64_t>(),
                             pos_items.data_ptr<int64_t>(), neg_items.data_ptr<int64_t>(), neg_items.stride(0),
                             neg_items.stride(1), w.data, w.dtype, w.stride, a.batch, a.k_neg, a.dim, 1.0f, 0.0f, out,
                             stream);
  });
  return {rows, coef, log_sig};
}

std::tuple<at::Tensor, at::Tensor> dbpr_backward(const at::Tensor& user_table, const at::Tensor& item_table,
                                                 const at::Tensor& users, const at::Tensor& pos_items,
                                                 const at::Tensor& neg_items, const at::Tensor& coef,
                                                 const at::Tensor& grad_rows) {
  const char* op = "guider_fast_cuda::dbpr_backward";
  const DbprArgs a = check_dbpr(op, user_table, item_table, users, pos_items, neg_items);
  check_device(op, "coef", coef, "user_table", user_table);
  check_device(op, "grad_rows", grad_rows, "user_table", user_table);
  check_dtype(op, "coef", coef, at::kFloat);
  check_rank(op, "coef", coef, 2, "the forward's coefficients (B, K+1)");
  check_size(op, "coef", coef, 0, a.batch, "one row per triplet of 'users'");
  check_size(op, "coef", coef, 1, a.k_neg + 1, "K+1 for the K columns of 'neg_items'");
  check_contiguous(op, "coef", coef);
  check_dtype(op, "grad_rows", grad_rows, at::kFloat);
  check_rank(op, "grad_rows", grad_rows, 1, "the per-triplet output gradients (B,)");
  check_size(op, "grad_rows", grad_rows, 0, a.batch, "one per triplet of 'users'");
  const auto f32 = user_table.options().dtype(at::kFloat);
  at::Tensor grad_user = at::zeros({user_table.size(0), a.dim}, f32);
  at::Tensor grad_item = at::zeros({item_table.size(0), a.dim}, f32);
  run(op, user_table, [&](cudaStream_t stream) {
    return gfc::dbpr_backward(view(user_table, a.table), view(item_table, a.table), users.data_ptr<int64_t>(),
                              pos_items.data_ptr<int64_t>(), neg_items.data_ptr<int64_t>(), neg_items.stride(0),
                              neg_items.stride(1), coef.data_ptr<float>(), grad_rows.data_ptr<float>(),
                              grad_rows.stride(0), a.batch, a.k_neg, a.dim, grad_user.data_ptr<float>(),
                              grad_item.data_ptr<float>(), stream);
  });
  return {grad_user, grad_item};
}

// ------------------------------------------------------------------ DBPR fused steps

// A sorted index vector (keys) or its stable sort's order, of `n` entries.
void check_sorted_vector(const char* op, const char* name, const at::Tensor& x, const at::Tensor& like, int64_t n,
                         const char* what) {
  check_device(op, name, x, "user_table", like);
  check_dtype(op, name, x, at::kLong);
  check_rank(op, name, x, 1, what);
  check_size(op, name, x, 0, n, what);
  check_contiguous(op, name, x);
}

#ifdef GUIDER_FAST_CUDA_SIM
// On host tensors the runs' invariants cost nothing to check: sorted keys, and keys
// equal to the rows their order points at (a wrong sort would write the wrong rows).
void check_runs(const char* op, const char* keys_name, const at::Tensor& keys, const at::Tensor& order,
                const at::Tensor& rows) {
  TORCH_CHECK(keys.numel() < 2 || (keys.slice(0, 1) >= keys.slice(0, 0, -1)).all().item<bool>(), op,
              ": argument '", keys_name, "' must be sorted (a stable torch.sort of the rows)");
  TORCH_CHECK(rows.index_select(0, order).equal(keys), op, ": argument '", keys_name,
              "' must equal the rows at its order (keys[i] == rows[order[i]])");
}
#else
void check_runs(const char*, const char*, const at::Tensor&, const at::Tensor&, const at::Tensor&) {}
#endif

std::tuple<at::Tensor, at::Tensor> dbpr_step(const at::Tensor& user_table, const at::Tensor& item_table,
                                             const at::Tensor& users, const at::Tensor& pos_items,
                                             const at::Tensor& neg_items, const std::optional<at::Tensor>& weights,
                                             const at::Tensor& user_keys, const at::Tensor& user_order,
                                             const at::Tensor& item_keys, const at::Tensor& item_order,
                                             const std::optional<at::Tensor>& user_accumulator,
                                             const std::optional<at::Tensor>& item_accumulator, double lr,
                                             double l2, double scale) {
  const char* op = "guider_fast_cuda::dbpr_step";
  const DbprArgs a = check_dbpr(op, user_table, item_table, users, pos_items, neg_items);
  const TripletWeights w = check_weights(op, weights, user_table, a.batch);
  const int64_t n_occ = a.batch * (a.k_neg + 1);
  check_int32(op, "neg_items", n_occ, "the number of item occurrences B (K+1)");
  check_sorted_vector(op, "user_keys", user_keys, user_table, a.batch, "the sorted users (B,)");
  check_sorted_vector(op, "user_order", user_order, user_table, a.batch, "the sort order of 'users' (B,)");
  check_sorted_vector(op, "item_keys", item_keys, user_table, n_occ, "the sorted item occurrences (B (K+1),)");
  check_sorted_vector(op, "item_order", item_order, user_table, n_occ, "their sort order (B (K+1),)");
  check_index_range(op, "user_order", user_order, a.batch, "users");
  check_index_range(op, "item_order", item_order, n_occ, "the item occurrences");
  check_runs(op, "user_keys", user_keys, user_order, users);
  check_runs(op, "item_keys", item_keys, item_order, at::cat({pos_items, neg_items.reshape(-1)}));
  TORCH_CHECK(user_accumulator.has_value() == item_accumulator.has_value(), op,
              ": arguments 'user_accumulator' and 'item_accumulator' must be given together (row-wise Adagrad) "
              "or both omitted (SGD)");
  float* user_acc = nullptr;
  float* item_acc = nullptr;
  if (user_accumulator.has_value()) {
    const std::pair<const char*, const at::Tensor&> accs[] = {{"user_accumulator", *user_accumulator},
                                                              {"item_accumulator", *item_accumulator}};
    const int64_t n_rows[] = {user_table.size(0), item_table.size(0)};
    for (int i = 0; i < 2; ++i) {
      const auto& [name, acc] = accs[i];
      check_device(op, name, acc, "user_table", user_table);
      check_dtype(op, name, acc, at::kFloat);
      check_rank(op, name, acc, 1, "one float32 sum per table row");
      check_size(op, name, acc, 0, n_rows[i], i == 0 ? "the rows of 'user_table'" : "the rows of 'item_table'");
      check_contiguous(op, name, acc);
    }
    user_acc = user_accumulator->data_ptr<float>();
    item_acc = item_accumulator->data_ptr<float>();
  }
  const auto f32 = user_table.options().dtype(at::kFloat);
  at::Tensor rows = at::empty({a.batch}, f32), margins = at::empty({a.batch, a.k_neg}, f32);
  at::Tensor workspace = at::empty({gfc::dbpr_step_workspace_floats(a.batch, a.k_neg, a.dim)}, f32);
  const gfc::DbprSortedRuns runs{user_keys.data_ptr<int64_t>(), user_order.data_ptr<int64_t>(),
                                 item_keys.data_ptr<int64_t>(), item_order.data_ptr<int64_t>()};
  const gfc::DbprStepOutputs out{rows.data_ptr<float>(), margins.data_ptr<float>(), workspace.data_ptr<float>()};
  run(op, user_table, [&](cudaStream_t stream) {
    return gfc::dbpr_step(view(user_table, a.table), view(item_table, a.table), users.data_ptr<int64_t>(),
                          pos_items.data_ptr<int64_t>(), neg_items.data_ptr<int64_t>(), neg_items.stride(0),
                          neg_items.stride(1), w.data, w.dtype, w.stride, runs, user_acc, item_acc, a.batch, a.k_neg,
                          a.dim, static_cast<float>(lr), static_cast<float>(l2), static_cast<float>(scale), out,
                          stream);
  });
  return {rows, margins};
}

std::tuple<at::Tensor, at::Tensor> dbpr_atomic_sgd_step(const at::Tensor& user_table, const at::Tensor& item_table,
                                                        const at::Tensor& users, const at::Tensor& pos_items,
                                                        const at::Tensor& neg_items,
                                                        const std::optional<at::Tensor>& weights, double lr,
                                                        double l2, double scale) {
  const char* op = "guider_fast_cuda::dbpr_atomic_sgd_step";
  const DbprArgs a = check_dbpr(op, user_table, item_table, users, pos_items, neg_items);
  check_dtype(op, "user_table", user_table, at::kFloat);
  TORCH_CHECK(a.dim <= gfc::kDbprAtomicMaxDim, op, ": argument 'user_table' has D = ", a.dim,
              " features, over the atomic step's ", gfc::kDbprAtomicMaxDim,
              " (its rows live in registers; the sorted step has no bound)");
  const TripletWeights w = check_weights(op, weights, user_table, a.batch);
  const auto f32 = user_table.options().dtype(at::kFloat);
  at::Tensor rows = at::empty({a.batch}, f32), margins = at::empty({a.batch, a.k_neg}, f32);
  run(op, user_table, [&](cudaStream_t stream) {
    return gfc::dbpr_atomic_sgd_step(view(user_table, a.table), view(item_table, a.table), users.data_ptr<int64_t>(),
                                     pos_items.data_ptr<int64_t>(), neg_items.data_ptr<int64_t>(),
                                     neg_items.stride(0), neg_items.stride(1), w.data, w.dtype, w.stride, a.batch,
                                     a.k_neg, a.dim, static_cast<float>(lr), static_cast<float>(l2),
                                     static_cast<float>(scale), rows.data_ptr<float>(), margins.data_ptr<float>(),
                                     stream);
  });
  return {rows, margins};
}

// ------------------------------------------------------------------ Sinkhorn (tiny clouds)

struct CloudSizes {
  int64_t batch, n, m, d;
};

// x (B, n, d), y (B, m, d), a (B, n), b (B, m): float32, contiguous, one device, n, m <= max_points.
CloudSizes check_clouds(const char* op, const at::Tensor& x, const at::Tensor& y, const at::Tensor& a,
                        const at::Tensor& b, int64_t max_points, const char* kernel) {
  check_device(op, "x", x, "x", x);
  const std::pair<const char*, const at::Tensor&> others[] = {{"y", y}, {"a", a}, {"b", b}};
  for (const auto& [name, t] : others) check_device(op, name, t, "x", x);
  check_rank(op, "x", x, 3, "a batch of point clouds (B, n, d)");
  check_rank(op, "y", y, 3, "a batch of point clouds (B, m, d)");
  const CloudSizes s{x.size(0), x.size(1), y.size(1), x.size(2)};
  check_nonempty(op, "x", s.batch, "problems");
  check_nonempty(op, "x", s.n, "points");
  check_nonempty(op, "y", s.m, "points");
  check_nonempty(op, "x", s.d, "features");
  check_size(op, "y", y, 0, s.batch, "one cloud per problem of 'x'");
  check_size(op, "y", y, 2, s.d, "the feature size of 'x'");
  TORCH_CHECK(s.n <= max_points && s.m <= max_points, op, ": clouds of ", s.n, " and ", s.m, " points: the ", kernel,
              " takes at most ", max_points, " points per cloud");
  check_int32(op, "x", s.batch, "the number of problems");
  check_rank(op, "a", a, 2, "one weight per point of 'x' (B, n)");
  check_rank(op, "b", b, 2, "one weight per point of 'y' (B, m)");
  check_size(op, "a", a, 0, s.batch, "one row per problem");
  check_size(op, "a", a, 1, s.n, "one weight per point of 'x'");
  check_size(op, "b", b, 0, s.batch, "one row per problem");
  check_size(op, "b", b, 1, s.m, "one weight per point of 'y'");
  const std::pair<const char*, const at::Tensor&> all[] = {{"x", x}, {"y", y}, {"a", a}, {"b", b}};
  for (const auto& [name, t] : all) {
    check_dtype(op, name, t, at::kFloat);
    check_contiguous(op, name, t);
  }
  return s;
}

constexpr const char* kTinyKernel = "tiny-cloud kernel (one warp per problem)";

void check_sinkhorn_scalars(const char* op, double eps, int64_t p) {
  TORCH_CHECK(p == 1 || p == 2, op, ": argument 'p' must be 1 or 2, got ", p);
  TORCH_CHECK(eps > 0.0 && std::isfinite(static_cast<float>(eps)), op,
              ": argument 'eps' must be positive and finite in float32, got ", eps);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sinkhorn_tiny(const at::Tensor& x, const at::Tensor& y,
                                                                         const at::Tensor& a, const at::Tensor& b,
                                                                         double eps, int64_t p, int64_t n_iters,
                                                                         std::optional<double> tol) {
  const char* op = "guider_fast_cuda::sinkhorn_tiny";
  const CloudSizes s = check_clouds(op, x, y, a, b, gfc::kSinkhornTinyMaxPoints, kTinyKernel);
  check_sinkhorn_scalars(op, eps, p);
  TORCH_CHECK(n_iters >= 0 && n_iters <= kInt32Max, op, ": argument 'n_iters' must be in [0, ", kInt32Max,
              "], got ", n_iters);
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor f = at::empty({s.batch, s.n}, f32), g = at::empty({s.batch, s.m}, f32);
  at::Tensor error = at::empty({s.batch}, f32), iterations = at::empty({s.batch}, x.options().dtype(at::kInt));
  const gfc::SinkhornTinyOutputs out{f.data_ptr<float>(), g.data_ptr<float>(), error.data_ptr<float>(),
                                     iterations.data_ptr<int32_t>()};
  run(op, x, [&](cudaStream_t stream) {
    return gfc::sinkhorn_tiny(x.data_ptr<float>(), y.data_ptr<float>(), a.data_ptr<float>(), b.data_ptr<float>(),
                              s.batch, s.n, s.m, s.d, static_cast<int>(p), static_cast<float>(eps), n_iters,
                              tol.has_value(), tol.has_value() ? static_cast<float>(*tol) : 0.0f, out, stream);
  });
  return {f, g, error, iterations};
}

std::tuple<at::Tensor, at::Tensor> sinkhorn_tiny_envelope(const at::Tensor& x, const at::Tensor& y,
                                                          const at::Tensor& a, const at::Tensor& b,
                                                          const at::Tensor& f, const at::Tensor& g, double eps,
                                                          int64_t p, const at::Tensor& scale) {
  const char* op = "guider_fast_cuda::sinkhorn_tiny_envelope";
  const CloudSizes s = check_clouds(op, x, y, a, b, gfc::kSinkhornTinyMaxPoints, kTinyKernel);
  check_sinkhorn_scalars(op, eps, p);
  const std::tuple<const char*, const at::Tensor&, int64_t, const char*> potentials[] = {
      {"f", f, s.n, "one potential per point of 'x' (B, n)"}, {"g", g, s.m, "one potential per point of 'y' (B, m)"}};
  for (const auto& [name, t, points, what] : potentials) {
    check_device(op, name, t, "x", x);
    check_dtype(op, name, t, at::kFloat);
    check_rank(op, name, t, 2, what);
    check_size(op, name, t, 0, s.batch, "one row per problem");
    check_size(op, name, t, 1, points, what);
    check_contiguous(op, name, t);
  }
  check_device(op, "scale", scale, "x", x);
  check_dtype(op, "scale", scale, at::kFloat);
  check_rank(op, "scale", scale, 1, "the gradient of each problem's value (B,)");
  check_size(op, "scale", scale, 0, s.batch, "one per problem");
  check_contiguous(op, "scale", scale);
  at::Tensor grad_x = at::empty({s.batch, s.n, s.d}, x.options()), grad_y = at::empty({s.batch, s.m, s.d}, x.options());
  run(op, x, [&](cudaStream_t stream) {
    return gfc::sinkhorn_tiny_envelope(x.data_ptr<float>(), y.data_ptr<float>(), a.data_ptr<float>(),
                                       b.data_ptr<float>(), f.data_ptr<float>(), g.data_ptr<float>(),
                                       scale.data_ptr<float>(), s.batch, s.n, s.m, s.d, static_cast<int>(p),
                                       static_cast<float>(eps), grad_x.data_ptr<float>(), grad_y.data_ptr<float>(),
                                       stream);
  });
  return {grad_x, grad_y};
}

// ------------------------------------------------------------------ SamplesLoss (on chip)

#ifndef GUIDER_FAST_CUDA_SIM
// The device's opt-in shared memory per block (sm_90: 227 KiB), capped at the plan's budget.
int64_t shared_budget(const at::Tensor& like) {
  int value = 0;
  const cudaError_t status =
      cudaDeviceGetAttribute(&value, cudaDevAttrMaxSharedMemoryPerBlockOptin, like.device().index());
  TORCH_CHECK(status == cudaSuccess, "guider_fast_cuda::samples_loss_onchip: cannot read the device's shared "
              "memory limit: ", cudaGetErrorString(status));
  return std::min<int64_t>(value, gfc::kSamplesLossSharedBudget);
}
#endif

at::Tensor samples_loss_onchip(const at::Tensor& x, const at::Tensor& y, const at::Tensor& a, const at::Tensor& b,
                               at::ArrayRef<double> eps_list, int64_t p, bool debias) {
  const char* op = "guider_fast_cuda::samples_loss_onchip";
  const CloudSizes s = check_clouds(op, x, y, a, b, gfc::kSamplesLossMaxPoints, "on-chip kernel (one block per problem)");
  TORCH_CHECK(p == 1 || p == 2, op, ": argument 'p' must be 1 or 2, got ", p);
  const int64_t n_eps = static_cast<int64_t>(eps_list.size());
  TORCH_CHECK(n_eps >= 1, op, ": argument 'eps_list' is empty, needs at least one epsilon");
  check_int32(op, "eps_list", n_eps + 2, "the schedule's length + 2");
  std::vector<float> eps32(eps_list.begin(), eps_list.end());
  for (size_t i = 0; i < eps32.size(); ++i) {
    TORCH_CHECK(eps32[i] > 0.0f && std::isfinite(eps32[i]), op, ": argument 'eps_list' must hold positive values "
                "finite in float32, got ", eps_list[i], " at position ", i);
  }
  // One small host-to-device copy of the schedule (the Triton twin uploads it the same way).
  const at::Tensor eps = at::tensor(eps32, at::TensorOptions().dtype(at::kFloat)).to(x.device());
  at::Tensor out = at::empty({s.batch, gfc::samples_loss_packed_floats(s.n, s.m, debias)}, x.options());
#ifdef GUIDER_FAST_CUDA_SIM
  run(op, x, [&](cudaStream_t stream) {
    return gfc::samples_loss_onchip(x.data_ptr<float>(), y.data_ptr<float>(), a.data_ptr<float>(),
                                    b.data_ptr<float>(), eps.data_ptr<float>(), n_eps, s.batch, s.n, s.m, s.d,
                                    static_cast<int>(p), debias, out.data_ptr<float>(), stream);
  });
#else
  const gfc::SamplesLossPlan plan = gfc::samples_loss_plan(s.n, s.m, s.d, debias, shared_budget(x));
  run(op, x, [&](cudaStream_t stream) {
    return gfc::samples_loss_onchip_planned(x.data_ptr<float>(), y.data_ptr<float>(), a.data_ptr<float>(),
                                            b.data_ptr<float>(), eps.data_ptr<float>(), n_eps, s.batch, s.n, s.m,
                                            s.d, static_cast<int>(p), debias, plan, out.data_ptr<float>(), stream);
  });
#endif
  return out;
}

}  // namespace

#ifdef GUIDER_FAST_CUDA_SIM
TORCH_LIBRARY_IMPL(guider_fast_cuda, CPU, m) {
#else
TORCH_LIBRARY_IMPL(guider_fast_cuda, CUDA, m) {
#endif
  m.impl("calibrate_rows", TORCH_FN(calibrate_rows));
  m.impl("calibrate_cached", TORCH_FN(calibrate_cached));
  m.impl("dbpr_forward", TORCH_FN(dbpr_forward));
  m.impl("dbpr_backward", TORCH_FN(dbpr_backward));
  m.impl("dbpr_step", TORCH_FN(dbpr_step));
  m.impl("dbpr_atomic_sgd_step", TORCH_FN(dbpr_atomic_sgd_step));
  m.impl("sinkhorn_tiny", TORCH_FN(sinkhorn_tiny));
  m.impl("sinkhorn_tiny_envelope", TORCH_FN(sinkhorn_tiny_envelope));
  m.impl("samples_loss_onchip", TORCH_FN(samples_loss_onchip));
}

#ifndef GUIDER_FAST_CUDA_SIM
// `import guider_fast._C` loads this library, whose TORCH_LIBRARY_IMPL block
// registers the kernels; the module itself is empty.
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "guider_fast._C",
                               "guider_fast's CUDA kernels, registered as torch.ops.guider_fast_cuda.*", -1, nullptr,
                               nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module);
}
#endif
