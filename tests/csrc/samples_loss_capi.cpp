// C entry points over csrc/samples_loss_cuda.h for test_sim_samples_loss.py (ctypes), sim build only.
//
// Built into its own library (conftest.py's samples-loss block) that also carries
// sim_capi.cpp's entry points and error guard (included, not repeated): the
// gf_sim_set_order the tests use comes from there.
#include "sim_capi.cpp"
#include "samples_loss_cuda.h"

extern "C" {

// The default plan (samples_loss_onchip).
int gf_sim_samples_loss(const float* x, const float* y, const float* a, const float* b, const float* eps_list,
                        long long n_eps, long long batch, long long n, long long m, long long d, int p, int debias,
                        float* out, char* error, int error_len) {
  return guarded(error, error_len, [&] {
    return gfc::samples_loss_onchip(x, y, a, b, eps_list, n_eps, batch, n, m, d, p, debias != 0, out, nullptr);
  });
}

// An explicit plan: plan[4] = rows_xy, rows_xx, rows_yy, stage_points.
int gf_sim_samples_loss_planned(const float* x, const float* y, const float* a, const float* b,
                                const float* eps_list, long long n_eps, long long batch, long long n, long long m,
                                long long d, int p, int debias, const long long* plan, float* out, char* error,
                                int error_len) {
  gfc::SamplesLossPlan chosen;
  chosen.rows_xy = plan[0];
  chosen.rows_xx = plan[1];
  chosen.rows_yy = plan[2];
  chosen.stage_points = plan[3] != 0;
  return guarded(error, error_len, [&] {
    return gfc::samples_loss_onchip_planned(x, y, a, b, eps_list, n_eps, batch, n, m, d, p, debias != 0, chosen,
                                            out, nullptr);
  });
}

// samples_loss_plan into plan[4]; returns samples_loss_shared_bytes of it.
long long gf_sim_samples_loss_plan(long long n, long long m, long long d, int debias, long long budget,
                                   long long* plan) {
  const gfc::SamplesLossPlan chosen = gfc::samples_loss_plan(n, m, d, debias != 0, budget);
  plan[0] = chosen.rows_xy;
  plan[1] = chosen.rows_xx;
  plan[2] = chosen.rows_yy;
  plan[3] = chosen.stage_points ? 1 : 0;
  return gfc::samples_loss_shared_bytes(n, m, d, debias != 0, chosen);
}

}  // extern "C"
