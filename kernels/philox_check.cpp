// Exported entry points of philox.h for tests/kernels/test_philox_host.py: the host
// kernels' draws equal hpcflow.rng.CounterRNG's bit for bit (double) / to rounding (float).
#include "philox.h"

extern "C" {
void hpcflow_philox_block(unsigned k0, unsigned k1, long long index, unsigned step, unsigned kind,
                          unsigned block, unsigned* out) {
  hpcflow_rng::block_words({k0, k1}, (uint64_t)index, step, kind, block, out);
}
void hpcflow_philox_uniform_d(unsigned k0, unsigned k1, const long long* index, long long n_index,
                              unsigned step, int n, double* out) {
  for (long long i = 0; i < n_index; ++i)
    hpcflow_rng::uniforms({k0, k1}, (uint64_t)index[i], step, n, out + i * n);
}
void hpcflow_philox_uniform_f(unsigned k0, unsigned k1, const long long* index, long long n_index,
                              unsigned step, int n, float* out) {
  for (long long i = 0; i < n_index; ++i)
    hpcflow_rng::uniforms({k0, k1}, (uint64_t)index[i], step, n, out + i * n);
}
void hpcflow_philox_normal_d(unsigned k0, unsigned k1, const long long* index, long long n_index,
                             unsigned step, int n, double* out) {
  for (long long i = 0; i < n_index; ++i)
    hpcflow_rng::normals({k0, k1}, (uint64_t)index[i], step, n, out + i * n);
}
void hpcflow_philox_normal_f(unsigned k0, unsigned k1, const long long* index, long long n_index,
                             unsigned step, int n, float* out) {
  for (long long i = 0; i < n_index; ++i)
    hpcflow_rng::normals({k0, k1}, (uint64_t)index[i], step, n, out + i * n);
}
}
