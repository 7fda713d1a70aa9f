// su_n.cuh -- small complex type, N x N matrix algebra and lattice indexing shared by the
// plaquette and staple kernels. Compiles under nvcc, NVRTC (CuPy RawModule) and, through
// host_harness.h, as plain C++ with g++.
//
// Memory layout (DESIGN.md): a gauge field is U[b, mu, x_0, ..., x_{Nd-1}, i, j], complex,
// C-contiguous, with x_0 slowest. One thread handles one site and reads each link as N*N
// consecutive complex numbers. Neighbouring threads therefore read addresses N*N*16 bytes
// apart (complex128): for SU(3) a warp touches 32 strided 144-byte chunks, i.e. accesses
// are only partially coalesced (each 144-byte record spans 2-3 cache sectors, all of which
// are used). A structure-of-arrays layout U[b, mu, i, j, x] would make every load fully
// coalesced; we keep the project-wide layout so kernels run without a conversion pass, and
// rely on L1/L2 to serve neighbouring records read by adjacent threads.
#ifndef HPCFLOW_SU_N_CUH
#define HPCFLOW_SU_N_CUH

#ifndef __CUDACC__
#ifndef HPCFLOW_HOST_HARNESS_H
#error "compile host builds through host_harness.h"
#endif
#endif

// Full unrolling of the compile-time matrix loops (nvcc/NVRTC and g++ spell it apart).
// Direction loops (mu, nu) stay rolled on both: fully unrolled, the 4D SU(3) staple kernel
// spilled 8 KB per thread on sm_90 (255 registers) and ran 1.7x slower on the CPU
// (instruction cache); rolled it uses 180 registers without spills (ptxas -v).
#ifdef __CUDACC__
#define HPCFLOW_UNROLL _Pragma("unroll")
#define HPCFLOW_UNROLL_DIRS _Pragma("unroll 1")
#else
#define HPCFLOW_UNROLL _Pragma("GCC unroll 16")
#define HPCFLOW_UNROLL_DIRS
#endif

namespace hpcflow {

// Interleaved (re, im): the layout of cuDoubleComplex/cuComplex, std::complex and torch's
// complex128/complex64, so device and host code read torch storage directly.
template <typename T>
struct alignas(2 * sizeof(T)) cplx {
    T re, im;
};

// An N x N complex matrix held in registers; loops below have compile-time bounds, so
// the compiler unrolls the SU(3) products fully.
template <typename T, int N>
struct Mat {
    cplx<T> m[N * N];
};

template <typename T, int N>
__device__ __forceinline__ Mat<T, N> load(const cplx<T>* __restrict__ p) {
    Mat<T, N> a;
HPCFLOW_UNROLL
    for (int k = 0; k < N * N; ++k) a.m[k] = p[k];
    return a;
}

template <typename T, int N>
__device__ __forceinline__ void store(cplx<T>* __restrict__ p, const Mat<T, N>& a) {
HPCFLOW_UNROLL
    for (int k = 0; k < N * N; ++k) p[k] = a.m[k];
}

// store a^dagger
template <typename T, int N>
__device__ __forceinline__ void store_dagger(cplx<T>* __restrict__ p, const Mat<T, N>& a) {
HPCFLOW_UNROLL
    for (int i = 0; i < N; ++i)
HPCFLOW_UNROLL
        for (int j = 0; j < N; ++j) p[i * N + j] = {a.m[j * N + i].re, -a.m[j * N + i].im};
}

template <typename T, int N>
__device__ __forceinline__ void set_zero(Mat<T, N>& a) {
HPCFLOW_UNROLL
    for (int k = 0; k < N * N; ++k) a.m[k] = {T{}, T{}};
}

// c = a b
template <typename T, int N>
__device__ __forceinline__ Mat<T, N> mul_nn(const Mat<T, N>& a, const Mat<T, N>& b) {
    Mat<T, N> c;
HPCFLOW_UNROLL
    for (int i = 0; i < N; ++i)
HPCFLOW_UNROLL
        for (int j = 0; j < N; ++j) {
            T re = T{}, im = T{};
HPCFLOW_UNROLL
            for (int k = 0; k < N; ++k) {
                const cplx<T> x = a.m[i * N + k], y = b.m[k * N + j];
                re += x.re * y.re - x.im * y.im;
                im += x.re * y.im + x.im * y.re;
            }
            c.m[i * N + j] = {re, im};
        }
    return c;
}

// c = a b^dagger
template <typename T, int N>
__device__ __forceinline__ Mat<T, N> mul_nd(const Mat<T, N>& a, const Mat<T, N>& b) {
    Mat<T, N> c;
HPCFLOW_UNROLL
    for (int i = 0; i < N; ++i)
HPCFLOW_UNROLL
        for (int j = 0; j < N; ++j) {
            T re = T{}, im = T{};
HPCFLOW_UNROLL
            for (int k = 0; k < N; ++k) {
                const cplx<T> x = a.m[i * N + k], y = b.m[j * N + k];
                re += x.re * y.re + x.im * y.im;
                im += x.im * y.re - x.re * y.im;
            }
            c.m[i * N + j] = {re, im};
        }
    return c;
}

// c = a^dagger b
template <typename T, int N>
__device__ __forceinline__ Mat<T, N> mul_dn(const Mat<T, N>& a, const Mat<T, N>& b) {
    Mat<T, N> c;
HPCFLOW_UNROLL
    for (int i = 0; i < N; ++i)
HPCFLOW_UNROLL
        for (int j = 0; j < N; ++j) {
            T re = T{}, im = T{};
HPCFLOW_UNROLL
            for (int k = 0; k < N; ++k) {
                const cplx<T> x = a.m[k * N + i], y = b.m[k * N + j];
                re += x.re * y.re + x.im * y.im;
                im += x.re * y.im - x.im * y.re;
            }
            c.m[i * N + j] = {re, im};
        }
    return c;
}

// acc += w * a
template <typename T, int N>
__device__ __forceinline__ void axpy(Mat<T, N>& acc, T w, const Mat<T, N>& a) {
HPCFLOW_UNROLL
    for (int k = 0; k < N * N; ++k) {
        acc.m[k].re += w * a.m[k].re;
        acc.m[k].im += w * a.m[k].im;
    }
}

// Re tr(a b^dagger) = sum_ij Re(a_ij conj(b_ij)): the closing product of a plaquette
// without forming the third matrix (4 N^2 flops instead of 8 N^3).
template <typename T, int N>
__device__ __forceinline__ T re_tr_nd(const Mat<T, N>& a, const Mat<T, N>& b) {
    T s = T{};
HPCFLOW_UNROLL
    for (int k = 0; k < N * N; ++k) s += a.m[k].re * b.m[k].re + a.m[k].im * b.m[k].im;
    return s;
}

// Halo-padded local geometry: padded extents ext[d] and halo width halo[d] per dimension
// (0 for dimensions that are not padded). Neighbours wrap periodically on the padded
// array, exactly like torch.roll in Lattice.shift: with halo 0 this is the periodic torus,
// with halo >= 1 wrapped (garbage) values reach only the halo layers.
template <int ND>
struct Geom {
    int ext[ND];
    int halo[ND];
    long long stride[ND];  // site stride of dimension d (x_0 slowest)
    long long nsites;      // sites of the padded array
};

template <int ND>
__device__ __forceinline__ Geom<ND> make_geom(int e0, int e1, int e2, int e3, int h0, int h1,
                                             int h2, int h3) {
    Geom<ND> g;
    const int e[4] = {e0, e1, e2, e3};
    const int h[4] = {h0, h1, h2, h3};
    long long s = 1;
HPCFLOW_UNROLL
    for (int d = ND - 1; d >= 0; --d) {
        g.ext[d] = e[d];
        g.halo[d] = h[d];
        g.stride[d] = s;
        s *= e[d];
    }
    g.nsites = s;
    return g;
}

// 32-bit division: the loaders require fewer than 2^31 sites per local array, and int
// division is several times cheaper than 64-bit division on CPUs and GPUs.
template <int ND>
__device__ __forceinline__ void site_coords(const Geom<ND>& g, long long site, int* x) {
    int s = (int)site;
    HPCFLOW_UNROLL
    for (int d = ND - 1; d >= 0; --d) {
        x[d] = s % g.ext[d];
        s /= g.ext[d];
    }
}

template <int ND>
__device__ __forceinline__ bool is_interior(const Geom<ND>& g, const int* x) {
    bool in = true;
HPCFLOW_UNROLL
    for (int d = 0; d < ND; ++d) in = in && x[d] >= g.halo[d] && x[d] < g.ext[d] - g.halo[d];
    return in;
}

// Site index of x + step * mu_hat (step = +1 or -1), periodic on the padded array.
template <int ND>
__device__ __forceinline__ long long neighbour(const Geom<ND>& g, long long site, const int* x,
                                               int mu, int step) {
    int y = x[mu] + step;
    if (y >= g.ext[mu]) y -= g.ext[mu];
    if (y < 0) y += g.ext[mu];
    return site + (long long)(y - x[mu]) * g.stride[mu];
}

// Index of plane (mu, nu), mu < nu, in the order (0,1), (0,2), ..., (ND-2, ND-1).
template <int ND>
__device__ __forceinline__ int plane_index(int mu, int nu) {
    return mu * ND - mu * (mu + 1) / 2 + (nu - mu - 1);
}

}  // namespace hpcflow

#endif  // HPCFLOW_SU_N_CUH
