// host_lib.cpp -- the CUDA kernels of this folder built as a host shared library.
//
// Build (done by hpcflow.kernels.host at first use, cached per source hash and flags):
//   g++ -O3 -march=native -fopenmp -std=c++17 -shared -fPIC
//       -DHPCFLOW_N=3 -DHPCFLOW_REAL=double -DHPCFLOW_ND=4 host_lib.cpp -o lib.so
// One library per (N, real type, ND): only the needed template instances are compiled.
#include "host_harness.h"

#include "plaquette.cu"
#include "staple.cu"

#ifndef HPCFLOW_N
#error "define HPCFLOW_N (1, 2 or 3)"
#endif
#ifndef HPCFLOW_REAL
#error "define HPCFLOW_REAL (double or float)"
#endif
#ifndef HPCFLOW_ND
#error "define HPCFLOW_ND (2 or 4)"
#endif

namespace {

using real_t = HPCFLOW_REAL;
using cplx_t = hpcflow::cplx<real_t>;
constexpr unsigned int kBlock = 64;

unsigned int n_blocks(long long total) { return (unsigned int)((total + kBlock - 1) / kBlock); }

long long n_sites(const int* ext) {
    long long v = 1;
    for (int d = 0; d < HPCFLOW_ND; ++d) v *= ext[d];
    return v;
}

// Unused trailing dimensions (ND = 2) get extent 1 and halo 0.
void pad4(const int* ext, const int* halo, int* e, int* h) {
    for (int d = 0; d < 4; ++d) {
        e[d] = d < HPCFLOW_ND ? ext[d] : 1;
        h[d] = d < HPCFLOW_ND ? halo[d] : 0;
    }
}

}  // namespace

extern "C" {

// Configuration this library was built for, so the loader can check it.
void hpcflow_config(int* n, int* nd, int* real_bytes) {
    *n = HPCFLOW_N;
    *nd = HPCFLOW_ND;
    *real_bytes = (int)sizeof(real_t);
}

void hpcflow_plaquette_re_tr(const void* U, void* out, long long nbatch, const int* ext,
                             const int* halo) {
    int e[4], h[4];
    pad4(ext, halo, e, h);
    hpcflow_host::host_launch(hpcflow::plaquette_re_tr_kernel<real_t, HPCFLOW_N, HPCFLOW_ND>,
                              n_blocks(nbatch * n_sites(ext)), kBlock,
                              static_cast<const cplx_t*>(U), static_cast<real_t*>(out), nbatch,
                              e[0], e[1], e[2], e[3], h[0], h[1], h[2], h[3]);
}

void hpcflow_staple_sum(const void* U, const void* w, void* out, long long nbatch,
                        int all_sites, int dagger, const int* ext, const int* halo) {
    int e[4], h[4];
    pad4(ext, halo, e, h);
    hpcflow_host::host_launch(hpcflow::staple_sum_kernel<real_t, HPCFLOW_N, HPCFLOW_ND>,
                              n_blocks(nbatch * n_sites(ext)), kBlock,
                              static_cast<const cplx_t*>(U), static_cast<const real_t*>(w),
                              static_cast<cplx_t*>(out), nbatch, all_sites, dagger, e[0],
                              e[1], e[2], e[3], h[0], h[1], h[2], h[3]);
}

}  // extern "C"
