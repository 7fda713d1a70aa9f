// staple.cu -- staple sum A_mu(x) of the Wilson action, plain or weighted.
//
// A_mu(x) = sum_{nu != mu} [ U_nu(x+mu) U_mu(x+nu)^dag U_nu(x)^dag
//                           + U_nu(x+mu-nu)^dag U_mu(x-nu)^dag U_nu(x-nu) ]
// so that the part of sum_P Re tr P containing U_mu(x) is Re tr(U_mu(x) A_mu(x))
// (ARCHITECTURE.md). The upper staple closes the plaquette P_{mu nu} based at x, the lower
// one the plaquette based at x - nu.
//
// Weighted form (the backward of the plaquette field): with real weights w[b, plane, x]
// the kernel accumulates w(plane, base) x staple, which is d/dU of
// sum_{x, plane} w(plane, x) Re tr P(x) (as Re tr(U A)); torch's gradient convention for a
// real loss of complex U is A^dag, written when `dagger` is set.
//
// Modes: all_sites == 0 computes interior sites only (halo sites get 0): the physics
// staple for heat bath and HMC forces. all_sites == 1 computes every site of the padded
// array, which the gradient of an interior sum needs (links in the halo enter interior
// plaquettes; with halo 0 both modes coincide).
//
// One thread per (batch, site), handling the ND links of that site. Output has the layout
// of U: out[b, mu, x_0, ..., x_{ND-1}, i, j].
#include "su_n.cuh"

namespace hpcflow {

template <typename T, int N, int ND>
__global__ void staple_sum_kernel(const cplx<T>* __restrict__ U, const T* __restrict__ w,
                                  cplx<T>* __restrict__ out, long long nbatch, int all_sites,
                                  int dagger, int e0, int e1, int e2, int e3, int h0, int h1,
                                  int h2, int h3) {
    constexpr int NP = ND * (ND - 1) / 2;
    constexpr int NN = N * N;
    const Geom<ND> g = make_geom<ND>(e0, e1, e2, e3, h0, h1, h2, h3);
    const long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (tid >= nbatch * g.nsites) return;
    const long long b = tid / g.nsites;
    const long long site = tid - b * g.nsites;
    int x[ND];
    site_coords<ND>(g, site, x);
    cplx<T>* ob = out + b * ND * g.nsites * NN;
    if (!all_sites && !is_interior<ND>(g, x)) {
        Mat<T, N> z;
        set_zero<T, N>(z);
HPCFLOW_UNROLL_DIRS
        for (int mu = 0; mu < ND; ++mu) store<T, N>(ob + (mu * g.nsites + site) * NN, z);
        return;
    }
    const cplx<T>* Ub = U + b * ND * g.nsites * NN;
    const T* wb = w ? w + b * NP * g.nsites : w;
HPCFLOW_UNROLL_DIRS
    for (int mu = 0; mu < ND; ++mu) {
        const long long xmu = neighbour<ND>(g, site, x, mu, +1);
        Mat<T, N> acc;
        set_zero<T, N>(acc);
HPCFLOW_UNROLL_DIRS
        for (int nu = 0; nu < ND; ++nu) {
            if (nu == mu) continue;
            const int p = mu < nu ? plane_index<ND>(mu, nu) : plane_index<ND>(nu, mu);
            const long long xnu = neighbour<ND>(g, site, x, nu, +1);
            const long long xmnu = neighbour<ND>(g, site, x, nu, -1);
            // x + mu - nu: xmu differs from x only in direction mu != nu
            const long long xmu_mnu = neighbour<ND>(g, xmu, x, nu, -1);
            const Mat<T, N> upper =
                mul_nd<T, N>(mul_nd<T, N>(load<T, N>(Ub + (nu * g.nsites + xmu) * NN),
                                          load<T, N>(Ub + (mu * g.nsites + xnu) * NN)),
                             load<T, N>(Ub + (nu * g.nsites + site) * NN));
            const Mat<T, N> lower =
                mul_dn<T, N>(mul_nn<T, N>(load<T, N>(Ub + (mu * g.nsites + xmnu) * NN),
                                          load<T, N>(Ub + (nu * g.nsites + xmu_mnu) * NN)),
                             load<T, N>(Ub + (nu * g.nsites + xmnu) * NN));
            axpy<T, N>(acc, wb ? wb[p * g.nsites + site] : T(1), upper);
            axpy<T, N>(acc, wb ? wb[p * g.nsites + xmnu] : T(1), lower);
        }
        if (dagger)
            store_dagger<T, N>(ob + (mu * g.nsites + site) * NN, acc);
        else
            store<T, N>(ob + (mu * g.nsites + site) * NN, acc);
    }
}

}  // namespace hpcflow

#ifdef HPCFLOW_PTX_CHECK
// Standalone `nvcc -ptx -DHPCFLOW_PTX_CHECK` build: instantiate every supported variant.
#define HPCFLOW_INST_STAPLE(T, N, ND)                                                       \
    template __global__ void hpcflow::staple_sum_kernel<T, N, ND>(                           \
        const hpcflow::cplx<T>*, const T*, hpcflow::cplx<T>*, long long, int, int, int, int, \
        int, int, int, int, int, int);
HPCFLOW_INST_STAPLE(double, 1, 2)
HPCFLOW_INST_STAPLE(double, 2, 2)
HPCFLOW_INST_STAPLE(double, 3, 2)
HPCFLOW_INST_STAPLE(double, 1, 4)
HPCFLOW_INST_STAPLE(double, 2, 4)
HPCFLOW_INST_STAPLE(double, 3, 4)
HPCFLOW_INST_STAPLE(float, 1, 2)
HPCFLOW_INST_STAPLE(float, 2, 2)
HPCFLOW_INST_STAPLE(float, 3, 2)
HPCFLOW_INST_STAPLE(float, 1, 4)
HPCFLOW_INST_STAPLE(float, 2, 4)
HPCFLOW_INST_STAPLE(float, 3, 4)
#endif
