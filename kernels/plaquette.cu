// plaquette.cu -- Re tr P_{mu nu}(x) for every interior site and plane (Wilson action).
//
// P_{mu nu}(x) = U_mu(x) U_nu(x+mu) U_mu(x+nu)^dag U_nu(x)^dag   (ARCHITECTURE.md)
// computed as Re tr[(U_mu(x) U_nu(x+mu)) (U_nu(x) U_mu(x+nu))^dag]: two matrix products
// and one Frobenius dot per plane. The project's nominal count (QUDA) is 3582 flops/site
// for SU(3) in 4D; this form does 6 x (2 x 198 + 36) = 2592.
//
// One source for U(1) (N = 1), SU(2), SU(3); T = double or float; ND = 2 or 4.
// One thread per (batch, site) of the halo-padded local array. Output layout
// out[b, plane, x_0, ..., x_{ND-1}] (real), the shape of the torch reference; sites in the
// halo get 0, interior sites the exact value (neighbours wrap on the padded array, so with
// halo 0 the lattice is periodic).
#include "su_n.cuh"

namespace hpcflow {

template <typename T, int N, int ND>
__global__ void plaquette_re_tr_kernel(const cplx<T>* __restrict__ U, T* __restrict__ out,
                                       long long nbatch, int e0, int e1, int e2, int e3,
                                       int h0, int h1, int h2, int h3) {
    constexpr int NP = ND * (ND - 1) / 2;
    constexpr int NN = N * N;
    const Geom<ND> g = make_geom<ND>(e0, e1, e2, e3, h0, h1, h2, h3);
    const long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (tid >= nbatch * g.nsites) return;
    const long long b = tid / g.nsites;
    const long long site = tid - b * g.nsites;
    int x[ND];
    site_coords<ND>(g, site, x);
    T* o = out + b * NP * g.nsites + site;
    if (!is_interior<ND>(g, x)) {
HPCFLOW_UNROLL_DIRS
        for (int p = 0; p < NP; ++p) o[p * g.nsites] = T(0);
        return;
    }
    const cplx<T>* Ub = U + b * ND * g.nsites * NN;
HPCFLOW_UNROLL_DIRS
    for (int mu = 0; mu < ND; ++mu) {
        const Mat<T, N> umu = load<T, N>(Ub + (mu * g.nsites + site) * NN);
        const long long xmu = neighbour<ND>(g, site, x, mu, +1);
HPCFLOW_UNROLL_DIRS
        for (int nu = mu + 1; nu < ND; ++nu) {
            const long long xnu = neighbour<ND>(g, site, x, nu, +1);
            const Mat<T, N> unu = load<T, N>(Ub + (nu * g.nsites + site) * NN);
            const Mat<T, N> a = mul_nn<T, N>(umu, load<T, N>(Ub + (nu * g.nsites + xmu) * NN));
            const Mat<T, N> c = mul_nn<T, N>(unu, load<T, N>(Ub + (mu * g.nsites + xnu) * NN));
            o[plane_index<ND>(mu, nu) * g.nsites] = re_tr_nd<T, N>(a, c);
        }
    }
}

}  // namespace hpcflow

#ifdef HPCFLOW_PTX_CHECK
// Standalone `nvcc -ptx -DHPCFLOW_PTX_CHECK` build: instantiate every supported variant so
// that the compiler checks (and warns about) all of them.
#define HPCFLOW_INST_PLAQ(T, N, ND)                                                         \
    template __global__ void hpcflow::plaquette_re_tr_kernel<T, N, ND>(                      \
        const hpcflow::cplx<T>*, T*, long long, int, int, int, int, int, int, int, int);
HPCFLOW_INST_PLAQ(double, 1, 2)
HPCFLOW_INST_PLAQ(double, 2, 2)
HPCFLOW_INST_PLAQ(double, 3, 2)
HPCFLOW_INST_PLAQ(double, 1, 4)
HPCFLOW_INST_PLAQ(double, 2, 4)
HPCFLOW_INST_PLAQ(double, 3, 4)
HPCFLOW_INST_PLAQ(float, 1, 2)
HPCFLOW_INST_PLAQ(float, 2, 2)
HPCFLOW_INST_PLAQ(float, 3, 2)
HPCFLOW_INST_PLAQ(float, 1, 4)
HPCFLOW_INST_PLAQ(float, 2, 4)
HPCFLOW_INST_PLAQ(float, 3, 4)
#endif
