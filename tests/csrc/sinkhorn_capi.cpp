// C entry points over csrc/sinkhorn_cuda.h for test_sim_sinkhorn.py (ctypes), sim build only.
//
// Built into its own library (conftest.py's sinkhorn block) that also carries
// sim_capi.cpp's entry points and error guard (included, not repeated): the
// gf_sim_set_order / gf_sim_fiber_switches the tests use come from there.
#include "sim_capi.cpp"
#include "sinkhorn_cuda.h"

extern "C" {

// tol < 0: no tol test.  f (B, n), g (B, m), error (B,), iterations (B,) int32.
int gf_sim_sinkhorn_tiny(const float* x, const float* y, const float* a, const float* b, long long batch, long long n,
                         long long m, long long d, int p, float eps, long long n_iters, float tol, float* f, float* g,
                         float* error_out, int* iterations, char* error, int error_len) {
  const gfc::SinkhornTinyOutputs out{f, g, error_out, reinterpret_cast<int32_t*>(iterations)};
  return guarded(error, error_len, [&] {
    return gfc::sinkhorn_tiny(x, y, a, b, batch, n, m, d, p, eps, n_iters, tol >= 0.0f, tol, out, nullptr);
  });
}

int gf_sim_sinkhorn_tiny_envelope(const float* x, const float* y, const float* a, const float* b, const float* f,
                                  const float* g, const float* scale, long long batch, long long n, long long m,
                                  long long d, int p, float eps, float* grad_x, float* grad_y, char* error,
                                  int error_len) {
  return guarded(error, error_len, [&] {
    return gfc::sinkhorn_tiny_envelope(x, y, a, b, f, g, scale, batch, n, m, d, p, eps, grad_x, grad_y, nullptr);
  });
}

}  // extern "C"
