// cuda_sim runtime: fibers, the collective scheduler, launch checks.  See cuda_sim.h.
//
// Under ThreadSanitizer this file is built WITHOUT -fsanitize=thread (with
// GF_SIM_TSAN defined): the scheduler's own bookkeeping is invisible to TSan,
// every fiber switch is announced with __tsan_switch_to_fiber(..., no_sync),
// and the only happens-before edges TSan sees are the ones CUDA guarantees:
// launch start -> every thread, a barrier's arrivals -> its departures, a warp
// collective's arrivals -> its lanes' departures (and, because one block runs
// after the other here, one block's end -> the next block's start).
#ifndef GUIDER_FAST_CUDA_SIM
#define GUIDER_FAST_CUDA_SIM 1
#endif
#include "cuda_sim.h"

#include <cxxabi.h>
#include <dlfcn.h>
#include <elf.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <numeric>
#include <random>
#include <sstream>
#include <vector>

#ifdef GF_SIM_TSAN
#include <sanitizer/tsan_interface.h>
extern "C" void AnnotateNewMemory(const char* file, int line, const volatile void* mem, size_t size);
#endif

namespace cuda_sim {
namespace {

// ------------------------------------------------------------------ TSan hooks
#ifdef GF_SIM_TSAN
inline void* tsan_current() { return __tsan_get_current_fiber(); }
inline void* tsan_create() { return __tsan_create_fiber(0); }
inline void tsan_destroy(void* f) { __tsan_destroy_fiber(f); }
inline void tsan_switch(void* f) { __tsan_switch_to_fiber(f, __tsan_switch_to_fiber_no_sync); }
inline void tsan_release(void* a) { __tsan_release(a); }
inline void tsan_acquire(void* a) { __tsan_acquire(a); }
#else
inline void* tsan_current() { return nullptr; }
inline void* tsan_create() { return nullptr; }
inline void tsan_destroy(void*) {}
inline void tsan_switch(void*) {}
inline void tsan_release(void*) {}
inline void tsan_acquire(void*) {}
#endif

constexpr size_t kStackBytes = 64 * 1024;  // ASan's swapcontext interceptor clears the whole stack

enum class State { Runnable, Parked, Exited, Failed };

struct Fiber {
  ucontext_t context;
  char* stack = nullptr;  // usable stack (a guard page sits below it)
  unsigned linear = 0;
  uint3 idx{0, 0, 0};
  State state = State::Runnable;
  // The collective it is parked at.
  Op op = Op::SyncThreads;
  unsigned mask = 0;
  uint64_t value = 0;
  int arg = 0;
  int width = 0;
  const char* file = "";
  int line = 0;
  uint64_t result = 0;
  unsigned acquire_mask = 0;  // lanes whose release to acquire on resume (warp collectives)
  int acquire_gens[kWarpSize] = {};
  bool acquire_barrier = false;
  int barrier_gen = 0;
  void* tsan_fiber = nullptr;
  int release_gen = 0;  // which of this fiber's two TSan sync words its last release used
  char tsan_sync[2] = {0, 0};
};

struct Symbol {
  std::string name;  // demangled
  std::string mangled;
  size_t static_shared = 0;
  std::vector<std::pair<char*, size_t>> shared_ranges;  // the kernel's static locals
};

struct Settings {
  Order order = Order::Forward;
  uint64_t seed = 0;
  Settings() {
    if (const char* o = std::getenv("GF_SIM_ORDER")) {
      std::string s(o);
      if (s == "reverse") order = Order::Reverse;
      else if (s == "random") order = Order::Random;
      else if (s == "forward" || s.empty()) order = Order::Forward;
      else {
        std::fprintf(stderr, "cuda_sim: GF_SIM_ORDER=%s is not forward|reverse|random\n", o);
        std::abort();
      }
    }
    if (const char* s = std::getenv("GF_SIM_SEED")) seed = std::strtoull(s, nullptr, 10);
  }
};

Settings& settings() {
  static Settings s;
  return s;
}

// One launch in flight (launches are synchronous and not reentrant).
struct Run {
  const Symbol* symbol = nullptr;
  LaunchConfig config{};
  uint3 block{0, 0, 0};
  const std::function<void()>* body = nullptr;
  std::vector<Fiber*> fibers;
  Fiber* current = nullptr;
  ucontext_t scheduler;
  void* scheduler_tsan = nullptr;
  unsigned char* dynamic_shared = nullptr;
  std::string error_kind, error_text;
  char launch_sync = 0, exit_sync = 0, barrier_sync[2] = {0, 0};
  int barrier_gen = 0;
};

Run* g_run = nullptr;
cudaError_t g_last_error = cudaSuccess;
std::string g_last_message;
uint64_t g_launches = 0, g_switches = 0;
std::map<const void*, int> g_max_dynamic;  // cudaFuncAttributeMaxDynamicSharedMemorySize per kernel
std::vector<char*> g_stack_pool;

std::string fmt3(uint3 v) {
  std::ostringstream s;
  s << "(" << v.x << "," << v.y << "," << v.z << ")";
  return s.str();
}

const char* op_name(Op op) {
  switch (op) {
    case Op::SyncThreads: return "__syncthreads";
    case Op::SyncWarp: return "__syncwarp";
    case Op::Shfl: return "__shfl_sync";
    case Op::ShflUp: return "__shfl_up_sync";
    case Op::ShflDown: return "__shfl_down_sync";
    case Op::ShflXor: return "__shfl_xor_sync";
    case Op::Ballot: return "__ballot_sync";
    case Op::Any: return "__any_sync";
    case Op::All: return "__all_sync";
  }
  return "?";
}

std::string describe(const Fiber& f) {
  std::ostringstream s;
  s << "thread " << fmt3(f.idx);
  if (f.state == State::Exited) {
    s << " (exited)";
  } else if (f.state == State::Parked) {
    s << " at " << op_name(f.op);
    if (f.op != Op::SyncThreads) {
      char m[16];
      std::snprintf(m, sizeof m, "0x%08x", f.mask);
      s << "(mask " << m << ")";
    }
    s << " " << f.file << ":" << f.line;
  }
  return s.str();
}

[[noreturn]] void fail(const std::string& kind, const std::string& text) {
  std::ostringstream s;
  s << "cuda_sim: " << kind << " in kernel " << (g_run && g_run->symbol ? g_run->symbol->name : "?")
    << " block " << (g_run ? fmt3(g_run->block) : "?") << ": " << text;
  throw SimError(kind, s.str());
}

// ------------------------------------------------------------------ symbols (name, static shared)
struct ElfImage {
  std::vector<char> bytes;
  bool ok = false;
};

std::map<std::string, std::unique_ptr<ElfImage>> g_images;
std::map<const void*, std::unique_ptr<Symbol>> g_symbols;

const ElfImage& image(const std::string& path) {
  auto& slot = g_images[path];
  if (!slot) {
    slot.reset(new ElfImage);
    FILE* f = std::fopen(path.c_str(), "rb");
    if (f) {
      std::fseek(f, 0, SEEK_END);
      long n = std::ftell(f);
      std::fseek(f, 0, SEEK_SET);
      if (n > 0) {
        slot->bytes.resize(static_cast<size_t>(n));
        slot->ok = std::fread(slot->bytes.data(), 1, slot->bytes.size(), f) == slot->bytes.size();
      }
      std::fclose(f);
    }
  }
  return *slot;
}

std::string demangle(const std::string& mangled) {
  int status = 0;
  char* out = abi::__cxa_demangle(mangled.c_str(), nullptr, nullptr, &status);
  std::string name = (status == 0 && out) ? out : mangled;
  std::free(out);
  return name;
}

// The kernel's name and its static __shared__ variables: the function-local
// statics whose mangled names are _ZZ<kernel encoding>E..., read from the ELF
// symbol table (.symtab) of the file that holds the kernel.
const Symbol& symbol(const void* kernel) {
  auto& slot = g_symbols[kernel];
  if (slot) return *slot;
  slot.reset(new Symbol);
  Dl_info info{};
  if (!dladdr(kernel, &info) || !info.dli_fname) {
    slot->name = "<unknown kernel>";
    return *slot;
  }
  std::string path = info.dli_fname;
  if (path.empty() || path.find('/') == std::string::npos) path = "/proc/self/exe";
  const ElfImage& img = image(path);
  const uintptr_t base = reinterpret_cast<uintptr_t>(info.dli_fbase);
  if (img.ok && img.bytes.size() > sizeof(Elf64_Ehdr)) {
    const char* data = img.bytes.data();
    const auto* eh = reinterpret_cast<const Elf64_Ehdr*>(data);
    const bool relocatable = eh->e_type == ET_DYN;
    const auto* sh = reinterpret_cast<const Elf64_Shdr*>(data + eh->e_shoff);
    for (int pass = 0; pass < 2 && slot->mangled.empty(); ++pass) {
      const unsigned want = pass == 0 ? SHT_SYMTAB : SHT_DYNSYM;
      for (unsigned i = 0; i < eh->e_shnum; ++i) {
        if (sh[i].sh_type != want) continue;
        const auto* syms = reinterpret_cast<const Elf64_Sym*>(data + sh[i].sh_offset);
        const size_t count = sh[i].sh_size / sizeof(Elf64_Sym);
        const char* strtab = data + sh[sh[i].sh_link].sh_offset;
        auto address = [&](const Elf64_Sym& s) { return (relocatable ? base : 0) + s.st_value; };
        for (size_t k = 0; k < count; ++k) {
          if (ELF64_ST_TYPE(syms[k].st_info) == STT_FUNC && address(syms[k]) == reinterpret_cast<uintptr_t>(kernel)) {
            slot->mangled = strtab + syms[k].st_name;
            break;
          }
        }
        if (slot->mangled.size() > 2 && slot->mangled.compare(0, 2, "_Z") == 0) {
          const std::string prefix = "_ZZ" + slot->mangled.substr(2) + "E";
          for (size_t k = 0; k < count; ++k) {
            const char* name = strtab + syms[k].st_name;
            if (ELF64_ST_TYPE(syms[k].st_info) == STT_OBJECT && std::strncmp(name, prefix.c_str(), prefix.size()) == 0) {
              slot->static_shared += syms[k].st_size;
              slot->shared_ranges.emplace_back(reinterpret_cast<char*>(address(syms[k])), syms[k].st_size);
            }
          }
        }
        if (!slot->mangled.empty()) break;
      }
    }
  }
  if (slot->mangled.empty() && info.dli_sname) slot->mangled = info.dli_sname;
  slot->name = slot->mangled.empty() ? "<unknown kernel>" : demangle(slot->mangled);
  return *slot;
}

// ------------------------------------------------------------------ fibers
char* take_stack() {
  if (!g_stack_pool.empty()) {
    char* s = g_stack_pool.back();
    g_stack_pool.pop_back();
    return s;
  }
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  void* p = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) throw std::bad_alloc();
  mprotect(p, page, PROT_NONE);  // overflow of a fiber's stack faults instead of corrupting its neighbour
  return static_cast<char*>(p) + page;
}

void switch_to_scheduler(Fiber* f) {
  ++g_switches;
  tsan_switch(g_run->scheduler_tsan);
  swapcontext(&f->context, &g_run->scheduler);
}

void resume(Fiber* f) {
  ++g_switches;
  g_run->current = f;
  tsan_switch(f->tsan_fiber);
  swapcontext(&g_run->scheduler, &f->context);
  g_run->current = nullptr;
}

void fiber_entry() {
  Run* run = g_run;
  Fiber* f = run->current;
  tsan_acquire(&run->launch_sync);
  try {
    (*run->body)();
    f->state = State::Exited;
  } catch (const std::exception& e) {
    run->error_kind = "kernel_exception";
    run->error_text = describe(*f) + ": " + e.what();
    f->state = State::Failed;
  } catch (...) {
    run->error_kind = "kernel_exception";
    run->error_text = describe(*f) + ": unknown exception";
    f->state = State::Failed;
  }
  tsan_release(&run->exit_sync);
  switch_to_scheduler(f);
  std::abort();  // an exited fiber is never resumed
}

// Fails from inside a fiber: record, hand control back, never return.
[[noreturn]] void fiber_fail(Fiber* f, const std::string& kind, const std::string& text) {
  g_run->error_kind = kind;
  g_run->error_text = text;
  f->state = State::Failed;
  switch_to_scheduler(f);
  std::abort();
}

// ------------------------------------------------------------------ scheduling
bool same_collective(const Fiber& a, const Fiber& b) {
  return a.op == b.op && a.mask == b.mask && a.width == b.width && a.line == b.line &&
         (a.file == b.file || std::strcmp(a.file, b.file) == 0);
}

int source_lane(const Fiber& f, int lane) {
  const int width = f.width;
  const int base = lane & ~(width - 1);
  switch (f.op) {
    case Op::Shfl: return base + (f.arg & (width - 1));
    case Op::ShflUp: return lane - f.arg < base ? lane : lane - f.arg;
    case Op::ShflDown: return lane + f.arg >= base + width ? lane : lane + f.arg;
    case Op::ShflXor: return (lane ^ f.arg) >= base + width ? lane : (lane ^ f.arg);
    default: return lane;
  }
}

// Completes the warp collective `lead` is parked at if every lane of its mask is
// parked at the same one.  With `diagnose` (no other progress is possible) a
// lane that is elsewhere is an error; without it the collective just waits.
bool try_complete_warp(std::vector<Fiber*>& warp, unsigned lanes_present, Fiber& lead, bool diagnose) {
  const unsigned mask = lead.mask;
  for (int j = 0; j < kWarpSize; ++j) {
    if (!(mask >> j & 1u)) continue;
    if (!(lanes_present >> j & 1u)) {
      fail("lane_exited", describe(lead) + " names lane " + std::to_string(j) +
                              ", which does not exist in this block (the block ends before it)");
    }
    Fiber& other = *warp[j];
    if (other.state == State::Exited) {
      fail("lane_exited", describe(lead) + " names lane " + std::to_string(j) + ", " + describe(other));
    }
    if (other.state == State::Runnable) return false;
    if (same_collective(lead, other)) continue;
    if (!diagnose) return false;
    if (other.op == Op::SyncThreads) {
      fail("deadlock", describe(lead) + " waits for lane " + std::to_string(j) + ", which waits at " +
                           describe(other) + ": neither can complete");
    }
    fail("collective_mismatch", "lanes of one mask disagree: " + describe(lead) + " vs " + describe(other));
  }
  uint64_t vote = 0;
  bool any = false, all = true;
  for (int j = 0; j < kWarpSize; ++j) {
    if (mask >> j & 1u) {
      const bool p = warp[j]->value != 0;
      vote |= static_cast<uint64_t>(p) << j;
      any = any || p;
      all = all && p;
    }
  }
  for (int j = 0; j < kWarpSize; ++j) {
    if (!(mask >> j & 1u)) continue;
    Fiber& f = *warp[j];
    switch (f.op) {
      case Op::Shfl:
      case Op::ShflUp:
      case Op::ShflDown:
      case Op::ShflXor: {
        const int src = source_lane(f, j);
        if (src != j && !(mask >> src & 1u)) {
          fail("lane_outside_mask", describe(f) + " reads lane " + std::to_string(src) + ", outside its mask");
        }
        f.result = warp[src]->value;
        break;
      }
      case Op::Ballot: f.result = vote; break;
      case Op::Any: f.result = any; break;
      case Op::All: f.result = all; break;
      default: f.result = 0; break;
    }
  }
  for (int j = 0; j < kWarpSize; ++j) {
    if (!(mask >> j & 1u)) continue;
    Fiber& f = *warp[j];
    f.acquire_mask = mask;
    for (int k = 0; k < kWarpSize; ++k) {
      if (mask >> k & 1u) f.acquire_gens[k] = warp[k]->release_gen;
    }
    f.state = State::Runnable;
  }
  return true;
}

// (Out of line: getcontext "returns twice", which would make g++ warn about run_block's locals.)
__attribute__((noinline)) void init_fiber(Fiber* f) {
  f->state = State::Runnable;
  f->acquire_mask = 0;
  f->acquire_barrier = false;
  f->release_gen = 0;
  getcontext(&f->context);
  f->context.uc_stack.ss_sp = f->stack;
  f->context.uc_stack.ss_size = kStackBytes;
  f->context.uc_link = nullptr;
  makecontext(&f->context, fiber_entry, 0);
  f->tsan_fiber = tsan_create();
}

void run_block(Run& run, std::mt19937_64& rng) {
  const dim3 b = run.config.block;
  const unsigned n = b.x * b.y * b.z;
  std::vector<unsigned> order(n);
  std::iota(order.begin(), order.end(), 0u);
  const Order mode = settings().order;
  if (mode == Order::Reverse) std::reverse(order.begin(), order.end());
  for (unsigned i = 0; i < n; ++i) init_fiber(run.fibers[i]);
  const unsigned n_warps = (n + kWarpSize - 1) / kWarpSize;
  std::vector<std::vector<Fiber*>> warps(n_warps, std::vector<Fiber*>(kWarpSize, nullptr));
  for (unsigned i = 0; i < n; ++i) warps[i / kWarpSize][i % kWarpSize] = run.fibers[i];
  auto check = [&] {
    if (!run.error_kind.empty()) fail(run.error_kind, run.error_text);
  };
  for (;;) {
    if (mode == Order::Random) std::shuffle(order.begin(), order.end(), rng);
    for (unsigned i : order) {
      Fiber* f = run.fibers[i];
      if (f->state == State::Runnable) {
        resume(f);
        check();
      }
    }
    unsigned live = 0, at_barrier = 0;
    for (Fiber* f : run.fibers) {
      if (f->state != State::Exited) ++live;
      if (f->state == State::Parked && f->op == Op::SyncThreads) ++at_barrier;
    }
    if (live == 0) break;
    auto warp_pass = [&](bool diagnose) {
      bool progressed = false;
      for (unsigned w = 0; w < n_warps; ++w) {
        const unsigned in_warp = std::min<unsigned>(kWarpSize, n - w * kWarpSize);
        const unsigned present = in_warp == 32 ? 0xffffffffu : ((1u << in_warp) - 1u);
        for (unsigned j = 0; j < in_warp; ++j) {
          Fiber& f = *warps[w][j];
          if (f.state == State::Parked && f.op != Op::SyncThreads) {
            progressed = try_complete_warp(warps[w], present, f, diagnose) || progressed;
          }
        }
      }
      return progressed;
    };
    if (warp_pass(false)) continue;
    // Nothing runnable and no warp collective can complete.  Unless every live
    // thread waits at a barrier, say why the stuck warp collective is stuck.
    if (at_barrier != live) {
      warp_pass(true);
      fail("deadlock", "live threads are parked where no collective can complete");
    }
    const Fiber* exited = nullptr;
    const Fiber* first = nullptr;
    for (Fiber* f : run.fibers) {
      if (f->state == State::Exited) {
        if (!exited) exited = f;
      } else if (!first) {
        first = f;
      } else if (f->line != first->line || std::strcmp(f->file, first->file) != 0) {
        fail("barrier_divergence", "threads wait at different barriers: " + describe(*first) + " vs " + describe(*f));
      }
    }
    if (exited) {
      fail("barrier_exited", describe(*first) + " while " + describe(*exited) + " (and " +
                                 std::to_string(n - live - 1) + " more) already exited: the barrier can never complete");
    }
    unsigned count = 0;
    for (Fiber* f : run.fibers) count += f->value != 0;
    for (Fiber* f : run.fibers) {
      f->result = f->arg == 0 ? count : (f->arg == 1 ? count == n : count != 0);
      f->acquire_barrier = true;
      f->barrier_gen = run.barrier_gen;
      f->state = State::Runnable;
    }
    run.barrier_gen ^= 1;
  }
  for (Fiber* f : run.fibers) {
    tsan_destroy(f->tsan_fiber);
    f->tsan_fiber = nullptr;
  }
}

void set_error(cudaError_t code, const std::string& text) {
  g_last_error = code;
  g_last_message = text;
}

}  // namespace

// ------------------------------------------------------------------ public API
void set_thread_order(Order order, uint64_t seed) {
  settings().order = order;
  settings().seed = seed;
}
Order thread_order() { return settings().order; }
const char* last_error_message() { return g_last_message.c_str(); }
uint64_t launches() { return g_launches; }
uint64_t fiber_switches() { return g_switches; }

static Fiber& current_fiber(const char* what) {
  if (!g_run || !g_run->current) {
    std::fprintf(stderr, "cuda_sim: %s used outside a kernel\n", what);
    std::abort();
  }
  return *g_run->current;
}

uint3 thread_idx() { return current_fiber("threadIdx").idx; }
uint3 block_idx() { return current_fiber("blockIdx"), g_run->block; }
dim3 block_dim() { return current_fiber("blockDim"), g_run->config.block; }
dim3 grid_dim() { return current_fiber("gridDim"), g_run->config.grid; }
void* dynamic_shared() { return current_fiber("dynamic shared memory"), static_cast<void*>(g_run->dynamic_shared); }

uint64_t collective(Op op, unsigned mask, uint64_t value, int arg, int width, const char* file, int line) {
  Fiber& f = current_fiber(op_name(op));
  const int lane = static_cast<int>(f.linear % kWarpSize);
  f.op = op;
  f.mask = op == Op::SyncThreads ? 0u : mask;
  f.value = value;
  f.arg = arg;
  f.width = (op == Op::Shfl || op == Op::ShflUp || op == Op::ShflDown || op == Op::ShflXor) ? width : 0;
  f.file = file ? file : "";
  f.line = line;
  if (op != Op::SyncThreads && !(mask >> lane & 1u)) {
    char m[16];
    std::snprintf(m, sizeof m, "0x%08x", mask);
    fiber_fail(&f, "lane_outside_mask",
               describe(f) + ": the calling lane " + std::to_string(lane) + " is not in its own mask " + m);
  }
  if (f.width != 0 && (width < 1 || width > kWarpSize || (width & (width - 1)) != 0)) {
    fiber_fail(&f, "invalid_argument", describe(f) + ": width " + std::to_string(width) +
                                           " is not a power of two in [1, 32]");
  }
  f.state = State::Parked;
  // Release this thread's writes to whoever completes the collective with it.
  if (op == Op::SyncThreads) {
    tsan_release(&g_run->barrier_sync[g_run->barrier_gen]);
  } else {
    f.release_gen ^= 1;
    tsan_release(&f.tsan_sync[f.release_gen]);
  }
  switch_to_scheduler(&f);
  if (f.acquire_barrier) {
    tsan_acquire(&g_run->barrier_sync[f.barrier_gen]);
    f.acquire_barrier = false;
  }
  if (f.acquire_mask) {
    const unsigned warp0 = f.linear - static_cast<unsigned>(lane);
    for (int k = 0; k < kWarpSize; ++k) {
      if (f.acquire_mask >> k & 1u) tsan_acquire(&g_run->fibers[warp0 + k]->tsan_sync[f.acquire_gens[k]]);
    }
    f.acquire_mask = 0;
  }
  return f.result;
}

cudaError_t set_attribute(const void* kernel, cudaFuncAttribute attribute, int value) {
  const Symbol& sym = symbol(kernel);
  if (attribute == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value < 0 || static_cast<size_t>(value) + sym.static_shared > kOptInSharedLimit) {
      set_error(cudaErrorInvalidValue, "cudaFuncSetAttribute(" + sym.name + ", MaxDynamicSharedMemorySize, " +
                                           std::to_string(value) + "): static (" + std::to_string(sym.static_shared) +
                                           " B) + dynamic shared memory exceeds 227 KiB");
      return cudaErrorInvalidValue;
    }
    g_max_dynamic[kernel] = value;
  }
  return cudaSuccess;
}

cudaError_t take_last_error() {
  cudaError_t e = g_last_error;
  g_last_error = cudaSuccess;
  return e;
}
cudaError_t peek_last_error() { return g_last_error; }

cudaError_t launch(const void* kernel, const LaunchConfig& config, const std::function<void()>& body) {
  if (g_run) {
    std::fprintf(stderr, "cuda_sim: kernel launch from inside a kernel (dynamic parallelism) is not emulated\n");
    std::abort();
  }
  const Symbol& sym = symbol(kernel);
  const dim3 b = config.block, g = config.grid;
  const uint64_t threads = static_cast<uint64_t>(b.x) * b.y * b.z;
  auto reject = [&](cudaError_t code, const std::string& why) {
    set_error(code, "launch of " + sym.name + ": " + why);
    return code;
  };
  if (threads == 0 || threads > kMaxThreadsPerBlock || b.x > 1024 || b.y > 1024 || b.z > 64) {
    return reject(cudaErrorInvalidConfiguration, "block " + fmt3({b.x, b.y, b.z}) +
                                                     " (at most 1024 threads; x, y <= 1024, z <= 64)");
  }
  if (g.x == 0 || g.y == 0 || g.z == 0 || g.x > 2147483647u || g.y > 65535 || g.z > 65535) {
    return reject(cudaErrorInvalidConfiguration, "grid " + fmt3({g.x, g.y, g.z}) +
                                                     " (x <= 2^31 - 1, y, z <= 65535, none 0)");
  }
  if (sym.static_shared > kStaticSharedLimit) {
    return reject(cudaErrorInvalidValue, "static shared memory " + std::to_string(sym.static_shared) +
                                             " B exceeds 48 KiB per block (ptxas rejects it)");
  }
  auto attr = g_max_dynamic.find(kernel);
  const size_t dynamic_limit = attr != g_max_dynamic.end() ? static_cast<size_t>(attr->second)
                                                           : kDefaultDynamicSharedLimit - sym.static_shared;
  if (config.shared_bytes > dynamic_limit) {
    return reject(cudaErrorInvalidValue,
                  "dynamic shared memory " + std::to_string(config.shared_bytes) + " B exceeds the kernel's limit " +
                      std::to_string(dynamic_limit) +
                      " B (static + dynamic <= 48 KiB unless cudaFuncSetAttribute(MaxDynamicSharedMemorySize) opts in)");
  }
  ++g_launches;
  Run run;
  run.symbol = &sym;
  run.config = config;
  run.body = &body;
  run.scheduler_tsan = tsan_current();
  const unsigned n = static_cast<unsigned>(threads);
  run.fibers.resize(n);
  for (unsigned i = 0; i < n; ++i) {
    Fiber* f = new Fiber;
    f->stack = take_stack();
    f->linear = i;
    f->idx = uint3{i % b.x, (i / b.x) % b.y, i / (b.x * b.y)};
    run.fibers[i] = f;
  }
  g_run = &run;
  std::mt19937_64 rng(settings().seed * 0x9E3779B97F4A7C15ull + g_launches);
  std::vector<unsigned char> dyn;
  auto cleanup = [&] {
    for (Fiber* f : run.fibers) {
      if (f->tsan_fiber) tsan_destroy(f->tsan_fiber);
      g_stack_pool.push_back(f->stack);
      delete f;
    }
    run.fibers.clear();
    g_run = nullptr;
  };
  try {
    for (unsigned z = 0; z < g.z; ++z) {
      for (unsigned y = 0; y < g.y; ++y) {
        for (unsigned x = 0; x < g.x; ++x) {
          run.block = uint3{x, y, z};
          // Fresh, poisoned shared memory per block: uninitialised reads show up as NaN.
          std::vector<unsigned char>(config.shared_bytes, 0xFF).swap(dyn);
          run.dynamic_shared = dyn.empty() ? nullptr : dyn.data();
          for (const auto& range : sym.shared_ranges) {
            std::memset(range.first, 0xFF, range.second);
#ifdef GF_SIM_TSAN
            AnnotateNewMemory(__FILE__, __LINE__, range.first, range.second);
#endif
          }
          tsan_release(&run.launch_sync);
          run.barrier_gen = 0;
          run_block(run, rng);
          tsan_acquire(&run.exit_sync);
        }
      }
    }
  } catch (const std::exception& e) {
    cleanup();
    set_error(cudaErrorLaunchFailure, e.what());
    throw;
  }
  cleanup();
  return cudaSuccess;
}

}  // namespace cuda_sim

const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDeviceFunction: return "invalid device function";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
  }
  return "unknown error";
}
