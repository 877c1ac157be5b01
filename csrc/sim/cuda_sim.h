// cuda_sim: a CPU emulation of the subset of CUDA C++ that guider_fast's kernels use.
//
// The kernel sources (csrc/*.cu) are compiled unchanged by nvcc and, with
// GUIDER_FAST_CUDA_SIM defined, by g++ against this header.  Every CUDA thread
// of a block runs as a ucontext fiber; a fiber parks at each collective
// (__syncthreads*, __syncwarp, __shfl*_sync, __ballot/__any/__all_sync) and the
// scheduler completes a warp collective once every lane of its mask has arrived
// at the same op with the same mask from the same call site, and releases a
// barrier once every thread of the block has arrived.  One block runs at a
// time, so static __shared__ variables are plain function-local statics.
// Misuse is reported as cuda_sim::SimError (kernel name, block and thread
// ids); launch-limit violations set the CUDA error that cudaGetLastError()
// returns, as the CUDA runtime does.  See csrc/README.md for what is not covered.
#pragma once

#ifndef GUIDER_FAST_CUDA_SIM
#error "cuda_sim.h is the CPU emulation of CUDA: include it only with GUIDER_FAST_CUDA_SIM defined"
#endif

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

// ------------------------------------------------------------------ qualifiers
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// A static __shared__ variable is a function-local static: one block runs at a
// time, and the sim refills it with 0xFF bytes (NaN floats) before every block.
#define __shared__ static
// (__restrict__ is a g++ keyword already.)

// ------------------------------------------------------------------ runtime types
struct uint3 {
  unsigned int x, y, z;
};

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
};

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDeviceFunction = 98,
  cudaErrorLaunchFailure = 719,
};
typedef cudaError_t cudaError;

enum cudaFuncAttribute {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
  cudaFuncAttributePreferredSharedMemoryCarveout = 9,
};

struct CUstream_st;
typedef CUstream_st* cudaStream_t;

// ------------------------------------------------------------------ the sim's API
namespace cuda_sim {

constexpr int kWarpSize = 32;
constexpr unsigned kMaxThreadsPerBlock = 1024;
constexpr size_t kStaticSharedLimit = 48 * 1024;        // per block, without opt-in
constexpr size_t kDefaultDynamicSharedLimit = 48 * 1024;  // static + dynamic, without opt-in
constexpr size_t kOptInSharedLimit = 227 * 1024;         // sm_90: static + dynamic, with opt-in

// What went wrong inside a kernel; `kind` is one of the names below.
//   barrier_exited      a __syncthreads reached while other threads of the block had exited
//   barrier_divergence  threads of one block waiting at different __syncthreads call sites
//   lane_exited         a warp collective whose mask names a lane that has exited
//   lane_outside_mask   a shuffle reading a lane outside its mask, or a caller outside its own mask
//   collective_mismatch lanes of one mask at different ops / call sites / masks
//   deadlock            live threads parked where no collective can complete
//   invalid_argument    e.g. a shuffle width that is not a power of two in [1, 32]
//   kernel_exception    a C++ exception escaped the kernel body
class SimError : public std::runtime_error {
 public:
  SimError(std::string kind, const std::string& what) : std::runtime_error(what), kind_(std::move(kind)) {}
  const std::string& kind() const { return kind_; }

 private:
  std::string kind_;
};

enum class Order { Forward = 0, Reverse = 1, Random = 2 };
// The order in which each block's runnable threads are resumed (re-drawn every
// round for Random).  Defaults from the environment: GF_SIM_ORDER=forward|reverse|random,
// GF_SIM_SEED=<integer>.
void set_thread_order(Order order, uint64_t seed = 0);
Order thread_order();
// Why the last failing launch failed (kept until the next failing launch).
const char* last_error_message();
// Launches and fiber switches so far (for the tests' cost measurements).
uint64_t launches();
uint64_t fiber_switches();

// Per-thread built-in variables.
uint3 thread_idx();
uint3 block_idx();
dim3 block_dim();
dim3 grid_dim();
void* dynamic_shared();

enum class Op : int {
  SyncThreads = 0,
  SyncWarp,
  Shfl,
  ShflUp,
  ShflDown,
  ShflXor,
  Ballot,
  Any,
  All,
};
// Parks the calling thread at a collective and returns its result (barrier:
// the count/and/or reduction of `value` selected by `arg`).
uint64_t collective(Op op, unsigned mask, uint64_t value, int arg, int width, const char* file, int line);

struct LaunchConfig {
  dim3 grid, block;
  size_t shared_bytes;
  cudaStream_t stream;
};
cudaError_t launch(const void* kernel, const LaunchConfig& config, const std::function<void()>& body);
cudaError_t set_attribute(const void* kernel, cudaFuncAttribute attribute, int value);
cudaError_t take_last_error();
cudaError_t peek_last_error();

template <class... P>
struct Launcher {
  void (*kernel)(P...);
  LaunchConfig config;
  template <class... A>
  void operator()(A&&... args) const {
    // Parameters are passed by value, converted to the kernel's types as nvcc does.
    std::tuple<typename std::decay<P>::type...> params(static_cast<P>(std::forward<A>(args))...);
    auto fn = kernel;
    launch(reinterpret_cast<const void*>(kernel), config, [&params, fn] { std::apply(fn, params); });
  }
};

template <class... P>
Launcher<P...> make_launcher(void (*kernel)(P...), dim3 grid, dim3 block, size_t shared_bytes = 0,
                             cudaStream_t stream = nullptr) {
  return Launcher<P...>{kernel, LaunchConfig{grid, block, shared_bytes, stream}};
}

template <class T>
inline uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of a type over 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  return bits;
}

template <class T>
inline T from_bits(uint64_t bits) {
  T v;
  std::memcpy(&v, &bits, sizeof(T));
  return v;
}

}  // namespace cuda_sim

#define threadIdx (::cuda_sim::thread_idx())
#define blockIdx (::cuda_sim::block_idx())
#define blockDim (::cuda_sim::block_dim())
#define gridDim (::cuda_sim::grid_dim())
constexpr int warpSize = 32;

// <<<grid, block, shmem, stream>>> under nvcc, the sim's launcher here.
#define GF_LAUNCH(kernel, grid, block, shmem, stream) ::cuda_sim::make_launcher(kernel, grid, block, shmem, stream)
// extern __shared__ T name[]: the block's dynamic shared memory.
#define GF_EXTERN_SHARED(type, name) type* name = static_cast<type*>(::cuda_sim::dynamic_shared())

inline cudaError_t cudaGetLastError() { return ::cuda_sim::take_last_error(); }
inline cudaError_t cudaPeekAtLastError() { return ::cuda_sim::peek_last_error(); }
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
const char* cudaGetErrorString(cudaError_t error);
template <class F>
inline cudaError_t cudaFuncSetAttribute(F* kernel, cudaFuncAttribute attribute, int value) {
  return ::cuda_sim::set_attribute(reinterpret_cast<const void*>(kernel), attribute, value);
}

// ------------------------------------------------------------------ collectives
inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  ::cuda_sim::collective(::cuda_sim::Op::SyncThreads, 0u, 0, 0, 0, file, line);
}
inline int __syncthreads_count(int predicate, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return static_cast<int>(::cuda_sim::collective(::cuda_sim::Op::SyncThreads, 0u, predicate != 0, 0, 0, file, line));
}
inline int __syncthreads_and(int predicate, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return static_cast<int>(::cuda_sim::collective(::cuda_sim::Op::SyncThreads, 0u, predicate != 0, 1, 0, file, line));
}
inline int __syncthreads_or(int predicate, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return static_cast<int>(::cuda_sim::collective(::cuda_sim::Op::SyncThreads, 0u, predicate != 0, 2, 0, file, line));
}
inline void __syncwarp(unsigned mask = 0xffffffffu, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  ::cuda_sim::collective(::cuda_sim::Op::SyncWarp, mask, 0, 0, 0, file, line);
}
template <class T>
inline T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize, const char* file = __builtin_FILE(),
                     int line = __builtin_LINE()) {
  return ::cuda_sim::from_bits<T>(::cuda_sim::collective(::cuda_sim::Op::Shfl, mask, ::cuda_sim::to_bits(var),
                                                         src_lane, width, file, line));
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                        const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return ::cuda_sim::from_bits<T>(::cuda_sim::collective(::cuda_sim::Op::ShflUp, mask, ::cuda_sim::to_bits(var),
                                                         static_cast<int>(delta), width, file, line));
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                          const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return ::cuda_sim::from_bits<T>(::cuda_sim::collective(::cuda_sim::Op::ShflDown, mask, ::cuda_sim::to_bits(var),
                                                         static_cast<int>(delta), width, file, line));
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize,
                         const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return ::cuda_sim::from_bits<T>(::cuda_sim::collective(::cuda_sim::Op::ShflXor, mask, ::cuda_sim::to_bits(var),
                                                         lane_mask, width, file, line));
}
inline unsigned __ballot_sync(unsigned mask, int predicate, const char* file = __builtin_FILE(),
                              int line = __builtin_LINE()) {
  return static_cast<unsigned>(
      ::cuda_sim::collective(::cuda_sim::Op::Ballot, mask, predicate != 0, 0, 0, file, line));
}
inline int __any_sync(unsigned mask, int predicate, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return static_cast<int>(::cuda_sim::collective(::cuda_sim::Op::Any, mask, predicate != 0, 0, 0, file, line));
}
inline int __all_sync(unsigned mask, int predicate, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return static_cast<int>(::cuda_sim::collective(::cuda_sim::Op::All, mask, predicate != 0, 0, 0, file, line));
}

// ------------------------------------------------------------------ integer intrinsics
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x)); }
inline unsigned __brev(unsigned x) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
  return r;
}

// ------------------------------------------------------------------ float intrinsics (host libm)
// Host libm, correctly rounded where IEEE requires it: GPU approximations
// (__expf, __logf, rsqrtf) differ by a few ulp; see csrc/README.md.
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __powf(float x, float y) { return std::pow(x, y); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __fdividef(float x, float y) { return x / y; }
inline float __fsqrt_rn(float x) { return std::sqrt(x); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __saturatef(float x) { return x != x ? 0.0f : (x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x)); }
inline float __int_as_float(int x) { return ::cuda_sim::from_bits<float>(static_cast<uint32_t>(x)); }
inline int __float_as_int(float x) { return static_cast<int>(static_cast<uint32_t>(::cuda_sim::to_bits(x))); }
inline float __uint_as_float(unsigned x) { return ::cuda_sim::from_bits<float>(x); }
inline unsigned __float_as_uint(float x) { return static_cast<unsigned>(::cuda_sim::to_bits(x)); }

// ------------------------------------------------------------------ atomics
// Relaxed host atomics: ThreadSanitizer sees them as atomics, so mixing one
// with a plain access to the same word is still reported.
inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  return __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
}
inline float atomicAdd(float* p, float v) {
  uint32_t* word = reinterpret_cast<uint32_t*>(p);
  uint32_t old = __atomic_load_n(word, __ATOMIC_RELAXED);
  for (;;) {
    uint32_t next = __float_as_uint(__uint_as_float(old) + v);
    if (__atomic_compare_exchange_n(word, &old, next, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
      return __uint_as_float(old);
    }
  }
}
inline int atomicMin(int* p, int v) {
  int old = __atomic_load_n(p, __ATOMIC_RELAXED);
  while (v < old && !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
  return old;
}
inline int atomicMax(int* p, int v) {
  int old = __atomic_load_n(p, __ATOMIC_RELAXED);
  while (v > old && !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
  return old;
}
inline int atomicExch(int* p, int v) { return __atomic_exchange_n(p, v, __ATOMIC_RELAXED); }
inline int atomicCAS(int* p, int compare, int v) {
  __atomic_compare_exchange_n(p, &compare, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
  return compare;
}
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

// ------------------------------------------------------------------ half precision
// Storage-only 16-bit types with explicit conversions (the only ones guider_fast
// uses: torch builds with CUDA_NO_HALF_CONVERSIONS and friends).
struct __half {
  uint16_t __x;
};
struct __nv_bfloat16 {
  uint16_t __x;
};

inline float __half2float(__half h) {
  const uint32_t sign = static_cast<uint32_t>(h.__x & 0x8000u) << 16;
  uint32_t exponent = (h.__x >> 10) & 0x1fu;
  uint32_t mantissa = h.__x & 0x3ffu;
  uint32_t bits;
  if (exponent == 0x1f) {
    bits = sign | 0x7f800000u | (mantissa << 13);
  } else if (exponent != 0) {
    bits = sign | ((exponent + 112u) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {
    bits = sign;
  } else {  // subnormal: normalise
    exponent = 113u;
    while ((mantissa & 0x400u) == 0) {
      mantissa <<= 1;
      --exponent;
    }
    bits = sign | (exponent << 23) | ((mantissa & 0x3ffu) << 13);
  }
  return __uint_as_float(bits);
}

inline __half __float2half_rn(float f) {
  const uint32_t x = __float_as_uint(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t abs = x & 0x7fffffffu;
  if (abs >= 0x7f800000u) return __half{static_cast<uint16_t>(sign | 0x7c00u | (abs > 0x7f800000u ? 0x200u : 0u))};
  if (abs >= 0x477ff000u) return __half{static_cast<uint16_t>(sign | 0x7c00u)};  // rounds past 65504
  if (abs < 0x38800000u) {  // subnormal half (or zero): round abs / 2^-24 to an integer, ties to even
    const float scaled = __uint_as_float(abs) * 16777216.0f;  // exact: power-of-two scaling
    return __half{static_cast<uint16_t>(sign | static_cast<uint16_t>(std::nearbyint(scaled)))};
  }
  const uint32_t rounded = abs + 0x0fffu + ((abs >> 13) & 1u);  // round mantissa to 10 bits, ties to even
  return __half{static_cast<uint16_t>(sign | (((rounded >> 13) - (112u << 10)) & 0x7fffu))};
}

inline float __bfloat162float(__nv_bfloat16 h) { return __uint_as_float(static_cast<uint32_t>(h.__x) << 16); }

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  const uint32_t x = __float_as_uint(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{static_cast<uint16_t>((x >> 16) | 0x40u)};
  const uint32_t rounded = x + 0x7fffu + ((x >> 16) & 1u);
  return __nv_bfloat16{static_cast<uint16_t>(rounded >> 16)};
}
