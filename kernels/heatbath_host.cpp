// heatbath_host.cpp -- host (CPU) heat bath and overrelaxation sub-steps of the Wilson action
// for SU(2) and SU(3) (Cabibbo-Marinari over SU(2) subgroups), checkerboarded, on
// halo-padded local arrays. The C++ twin of hpcflow/sampling/heatbath.py: the same staple,
// the same SU(2) subgroup order, the same Philox draws (philox.h) at the same counters, the
// same Kennedy-Pendleton / Creutz choice and the same arithmetic in float64, so a sub-step
// reproduces the torch one to rounding (a rejection decision would flip only when a test
// value lies within ~1 ulp of its bound). Also: the unitarity violation used by the sweeps'
// reproject_if_drifted (hpcflow_hb_unitarity_violation).
//
// A sub-step (mu, parity p) updates, in place, U[b, mu, x] for every interior site x of
// global parity p (sum of global coordinates mod 2) of every configuration b of the batch:
//
//   A   = sum_{nu != mu} U_nu(x+mu) U_mu(x+nu)^dag U_nu(x)^dag
//                      + U_nu(x+mu-nu)^dag U_mu(x-nu)^dag U_nu(x-nu)   (staple.cu's formula,
//         accumulated upper, lower per nu like heatbath.staple_mu, in the storage real type)
//   M   = U A                                                          (float64 from here on)
//   for (i, j) in su2_subgroups(N):        N = 2: (0, 1); N = 3: (0, 1), (1, 2), (0, 2)
//       k V = quaternion part of the (i, j) block of M   (a = (M_ii + M_jj*)/2, b = (M_ij - M_ji*)/2)
//       heat bath: X from sqrt(1-x0^2) exp(alpha x0), alpha = 2 beta k / N; w = X V^dag
//       overrelaxation: w = (V^dag)^2
//       rows i, j of U and of M  <-  w [row_i; row_j]
//
// Only links of direction mu and parity p change; their staples read links of other
// directions and U_mu at x +- nu (the other parity), so sites are independent (OpenMP).
// Neighbours wrap periodically on the padded array (su_n.cuh neighbour()), as torch.roll
// does in Lattice.shift: with halo >= 1 (filled by the caller's halo exchange) the interior
// is exact; with halo 0 the array is the periodic torus.
//
// Random numbers: rejection round r of subgroup s of the link with global link index
// l = mu V + site (lexicographic global site, x_0 slowest) of configuration b reads the 6
// float64 uniforms of counter index (b R + r n_sub + s) nl + l, nl = nd V, R = blocks per
// configuration (heatbath._BLOCKS_PER_CONFIG), step `step`.
//
// Flop count per link (used by the benchmark; real flops, complex mul = 6, add = 2):
//   staple: per nu != mu two staples of 2 N x N products (N^2 (8N - 2) flops each:
//           SU(3) 198, SU(2) 60) and 2 accumulations (2 N^2 each):
//           SU(3) 4D: 3 (4 x 198 + 36) = 2484;  SU(2) 4D: 3 (4 x 60 + 16) = 768
//   M = U A: SU(3) 198, SU(2) 60
//   per subgroup: quaternion 12 (a, b, k^2) + sqrt + 4 div; w: 4 entries x (2 cmul + cadd) = 56;
//           rows of U and M: 2 x 2N entries x (2 cmul + cadd) = 56 N  (SU(3) 168, SU(2) 112);
//           heat bath: ~25 flops per accepted round (lam2 / x_kp / x0->x) + 5 log/sin/cos
//   => heat bath SU(3) 4D ~ 2484 + 198 + 3 (16 + 56 + 168 + 25) ~ 3480 flops per link,
//      overrelaxation SU(3) 4D ~ 2484 + 198 + 3 (16 + 56 + 168) ~ 3400 flops per link.
// Transcendentals (log, log1p, cos, sin: ~30 flops each as polynomials; sqrt) and Philox
// (3 blocks x 10 rounds per round, integer) are not counted. 2D: 1/3 of the staple work.
//
// Implementation: W = 8 links of a sub-step at a time, one per lane of GCC vectors (AVX-512
// under -march=native on x86; other targets split the vectors). The staple and all SU(2)
// algebra run lane-wise, Philox runs on 8 counters at once, and the Kennedy-Pendleton rounds
// and X = x0 + i x.sigma use vector log / sin / cos (fdlibm algorithms, < 1 ulp): lanes that
// reject a round are redrawn together, as vectors, until all have accepted; Creutz lanes
// (alpha < 2) continue one by one with libm (out of line). Two ways to feed the lanes:
//
//  * per sub-step (hpcflow_heatbath_substep / hpcflow_overrelax_substep; any halo, any
//    decomposition, 2D and 4D, float32 and float64): W sites gathered across rows and
//    configurations from the interleaved AoS records of the project layout (float64:
//    contiguous loads + 8 x 8 register transposes);
//  * whole sweeps (hpcflow_hb_sweeps_vn; 4D float64 fields of one process without halos,
//    L0, L1, L2 multiples of 4): the field is transposed once per call into a "virtual node"
//    structure of arrays (lane q = one of 2 x 2 x 2 sub-blocks, see VNGeom below), all
//    sub-steps of all its sweeps run there on aligned vector loads (a lane permute across
//    block faces), the unitarity violation that reproject_if_drifted needs is taken from the
//    updated links in registers, and the field is transposed back. Python's sweeps use it
//    for SerialComm (or no comm) on such fields: no exchanges, no copy, no separate check.
//
// Arithmetic as torch's up to rounding: products accumulate like torch's small-matrix bmm
// (acc = 0; acc += a_ik b_kj), the staple as upper, lower per nu, complex / real as
// a * (1 / k) (c10::complex division). 4D builds contract a * b + c into FMAs (2D builds
// keep each product and sum rounded on its own, so their chains are torch's bit for bit up
// to the transcendentals); with FMAs the staple and M = U A differ from torch's in the last
// bits. Other last-ulp differences: torch.sqrt of this torch build is not correctly rounded
// (~0.7% of inputs differ from IEEE sqrt by 1 ulp), and torch's SLEEF log/cos/sin differ from
// libm / fdlibm by <= 1 ulp. Single sub-steps and whole sweeps from ordered starts agree to
// ~1e-14 (a rejection decision flips only when a test value lies within ~1 ulp of its
// bound). Chains of sub-steps amplify such differences where the update is ill-conditioned
// (overrelaxation with small quaternion norms k, hot fields at small beta): the torch code
// itself, fed an input perturbed by 1e-16, moves by as much.
//
// Build (hpcflow.kernels.heatbath_host, through hpcflow.kernels.host.build_library):
//   g++ -O3 -march=native -fopenmp -std=c++17 -shared -fPIC -DHPCFLOW_N=3
//       -DHPCFLOW_REAL=double -DHPCFLOW_ND=4 heatbath_host.cpp -o lib.so
//
// HPCFLOW_HB_FMA (default: 1 for 4D, 0 for 2D): 1 lets GCC contract into FMAs (~8% faster);
// 0 forbids contraction, and SLP vectorisation too (GCC's SLP complex-multiply pattern still
// emits vfmaddsub under -march=native, GCC 12; the lane vectors are explicit anyway).
#ifndef HPCFLOW_HB_FMA
#define HPCFLOW_HB_FMA (HPCFLOW_ND == 4)
#endif
#if HPCFLOW_HB_FMA
#pragma GCC optimize("fp-contract=fast")
#else
#pragma GCC optimize("fp-contract=off", "no-tree-slp-vectorize")
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif
#include <sys/mman.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <mutex>

#include "host_harness.h"
#include "philox.h"
#include "su_n.cuh"

#ifndef HPCFLOW_N
#error "define HPCFLOW_N (2 or 3)"
#endif
#ifndef HPCFLOW_REAL
#error "define HPCFLOW_REAL (double or float)"
#endif
#ifndef HPCFLOW_ND
#error "define HPCFLOW_ND (2 or 4)"
#endif
#ifndef HPCFLOW_HB_TILE
#define HPCFLOW_HB_TILE 4  // x_1 rows per cache tile (4D), see row_coords
#endif

namespace {

using hpcflow::cplx;
using hpcflow::Mat;

constexpr double kTwoPi = 2.0 * 3.14159265358979323846;  // == Python 2 * math.pi

// SU(2) subgroups (heatbath.su2_subgroups) as compile-time tables.
template <int N>
struct Subgroups;
template <>
struct Subgroups<2> {
    static constexpr int n = 1;
    static constexpr int i[1] = {0};
    static constexpr int j[1] = {1};
};
template <>
struct Subgroups<3> {
    static constexpr int n = 3;
    static constexpr int i[3] = {0, 1, 0};
    static constexpr int j[3] = {1, 2, 2};
};

// ---- lanes: W sites at a time --------------------------------------------------------------
// Every arithmetic operation below acts lane by lane on GCC vectors of W reals, so each lane
// computes exactly the scalar (and torch) expression of its link; W sites of the sub-step
// (gathered across rows and configurations) are processed together.
constexpr int W = 8;
typedef double vd __attribute__((vector_size(W * sizeof(double))));
typedef float vf __attribute__((vector_size(W * sizeof(float))));
typedef long long vi __attribute__((vector_size(W * sizeof(long long))));

template <typename T>
struct VecOf;
template <>
struct VecOf<double> {
    using type = vd;
};
template <>
struct VecOf<float> {
    using type = vf;
};

// p[idx[l]] for each lane (idx in reals)
inline __attribute__((always_inline)) vd gather(const double* p, const vi& idx) {
#ifdef __AVX512F__
    return (vd)_mm512_i64gather_pd((__m512i)idx, p, 8);
#else
    vd r;
    for (int l = 0; l < W; ++l) r[l] = p[idx[l]];
    return r;
#endif
}
inline __attribute__((always_inline)) vf gather(const float* p, const vi& idx) {
#ifdef __AVX512F__
    return (vf)_mm512_i64gather_ps((__m512i)idx, p, 4);
#else
    vf r;
    for (int l = 0; l < W; ++l) r[l] = p[idx[l]];
    return r;
#endif
}

// The N x N matrices at p + off[l] (one per lane) as a matrix of lane vectors.
template <typename V, typename T, int N>
inline __attribute__((always_inline)) Mat<V, N> gather_mat(const T* p, const vi& off) {
    Mat<V, N> a;
HPCFLOW_UNROLL
    for (int k = 0; k < N * N; ++k) {
        a.m[k].re = gather(p + 2 * k, off);
        a.m[k].im = gather(p + 2 * k + 1, off);
    }
    return a;
}

#ifdef __AVX512F__
// float64: blocks of 8 reals of the 8 lanes' matrices are loaded contiguously and transposed
// in registers (24 two-source permutes per 8 x 8 block), cheaper than 8 gathers; a tail of
// 2 reals (SU(3)) is gathered. Same values as gather_mat, in the layout of Mat<vd, N>.
inline __attribute__((always_inline)) void transpose8x8(__m512d r[8]) {
    const __m512i lo2 = _mm512_setr_epi64(0, 1, 8, 9, 4, 5, 12, 13);
    const __m512i hi2 = _mm512_setr_epi64(2, 3, 10, 11, 6, 7, 14, 15);
    const __m512i lo4 = _mm512_setr_epi64(0, 1, 2, 3, 8, 9, 10, 11);
    const __m512i hi4 = _mm512_setr_epi64(4, 5, 6, 7, 12, 13, 14, 15);
    __m512d t[8], u[8];
    for (int q = 0; q < 4; ++q) {
        t[2 * q] = _mm512_unpacklo_pd(r[2 * q], r[2 * q + 1]);      // e0 e2 e4 e6 of 2 rows
        t[2 * q + 1] = _mm512_unpackhi_pd(r[2 * q], r[2 * q + 1]);  // e1 e3 e5 e7
    }
    for (int q = 0; q < 2; ++q) {
        u[4 * q + 0] = _mm512_permutex2var_pd(t[4 * q], lo2, t[4 * q + 2]);      // e0 e4
        u[4 * q + 1] = _mm512_permutex2var_pd(t[4 * q], hi2, t[4 * q + 2]);      // e2 e6
        u[4 * q + 2] = _mm512_permutex2var_pd(t[4 * q + 1], lo2, t[4 * q + 3]);  // e1 e5
        u[4 * q + 3] = _mm512_permutex2var_pd(t[4 * q + 1], hi2, t[4 * q + 3]);  // e3 e7
    }
    r[0] = _mm512_permutex2var_pd(u[0], lo4, u[4]);
    r[4] = _mm512_permutex2var_pd(u[0], hi4, u[4]);
    r[2] = _mm512_permutex2var_pd(u[1], lo4, u[5]);
    r[6] = _mm512_permutex2var_pd(u[1], hi4, u[5]);
    r[1] = _mm512_permutex2var_pd(u[2], lo4, u[6]);
    r[5] = _mm512_permutex2var_pd(u[2], hi4, u[6]);
    r[3] = _mm512_permutex2var_pd(u[3], lo4, u[7]);
    r[7] = _mm512_permutex2var_pd(u[3], hi4, u[7]);
}

template <>
inline __attribute__((always_inline)) Mat<vd, 2> gather_mat<vd, double, 2>(const double* p,
                                                                           const vi& off) {
    Mat<vd, 2> a;
    __m512d r[8];
    for (int l = 0; l < 8; ++l) r[l] = _mm512_loadu_pd(p + off[l]);
    transpose8x8(r);
    for (int k = 0; k < 4; ++k) a.m[k] = {(vd)r[2 * k], (vd)r[2 * k + 1]};
    return a;
}

template <>
inline __attribute__((always_inline)) Mat<vd, 3> gather_mat<vd, double, 3>(const double* p,
                                                                           const vi& off) {
    Mat<vd, 3> a;
    for (int blk = 0; blk < 2; ++blk) {
        __m512d r[8];
        for (int l = 0; l < 8; ++l) r[l] = _mm512_loadu_pd(p + off[l] + 8 * blk);
        transpose8x8(r);
        for (int k = 0; k < 4; ++k) a.m[4 * blk + k] = {(vd)r[2 * k], (vd)r[2 * k + 1]};
    }
    a.m[8] = {gather(p + 16, off), gather(p + 17, off)};
    return a;
}
#endif

// complex vectors (float64 lanes)
struct C {
    vd re, im;
};
inline __attribute__((always_inline)) C cmul(const C& a, const C& b) {
    return {a.re * b.re - a.im * b.im, a.re * b.im + a.im * b.re};
}
inline __attribute__((always_inline)) C cadd(const C& a, const C& b) {
    return {a.re + b.re, a.im + b.im};
}
inline __attribute__((always_inline)) C conj(const C& a) { return {a.re, -a.im}; }
inline __attribute__((always_inline)) C neg(const C& a) { return {-a.re, -a.im}; }

struct W2 {
    C w00, w01, w10, w11;
};

inline __attribute__((always_inline)) vd vsqrt(vd x) {
#ifdef __AVX512F__
    return (vd)_mm512_sqrt_pd((__m512d)x);
#else
    for (int l = 0; l < W; ++l) x[l] = std::sqrt(x[l]);
    return x;
#endif
}

// ---- geometry of one call -----------------------------------------------------------------
template <int ND>
struct Layout {
    hpcflow::Geom<ND> g;
    int lo[ND], hi[ND];    // interior range of padded coordinates
    long long gofs[ND];    // global coordinate of padded coordinate 0 (origin - halo)
    long long gs[ND];      // global extents
    long long gvol;        // global volume V
    long long nrows;       // interior rows (dims 0 .. ND-2) per configuration
};

template <int ND>
Layout<ND> make_layout(const int* ext, const int* halo, const long long* origin,
                       const long long* gshape) {
    Layout<ND> L;
    int e[4] = {1, 1, 1, 1}, h[4] = {0, 0, 0, 0};
    for (int d = 0; d < ND; ++d) {
        e[d] = ext[d];
        h[d] = halo[d];
    }
    L.g = hpcflow::make_geom<ND>(e[0], e[1], e[2], e[3], h[0], h[1], h[2], h[3]);
    L.gvol = 1;
    L.nrows = 1;
    for (int d = 0; d < ND; ++d) {
        L.lo[d] = halo[d];
        L.hi[d] = ext[d] - halo[d];
        L.gofs[d] = origin[d] - halo[d];
        L.gs[d] = gshape[d];
        L.gvol *= gshape[d];
        if (d < ND - 1) L.nrows *= (L.hi[d] - L.lo[d]);
    }
    return L;
}

inline long long pmod(long long a, long long n) {
    long long r = a % n;
    return r < 0 ? r + n : r;
}

// Lanes of one group: offset (in reals) of the configuration's field, padded site,
// padded coordinates, counter index.
template <int ND>
struct Lanes {
    vi ubase;
    vi site;
    vi x[ND];  // x[d][l]
    uint64_t index[W];  // counter index of round 0, subgroup 0: b R nl + mu V + global site
    int n;  // active lanes (the others repeat lane 0 and are not written back)
};

// Site offset of x + step * d_hat (step = +-1) per lane, periodic on the padded array
// (su_n.cuh neighbour()); xd: the lanes' coordinate d.
template <int ND>
inline __attribute__((always_inline)) vi shift(const hpcflow::Geom<ND>& g, const vi& xd, int d,
                                               int step) {
    const long long e = g.ext[d], st = g.stride[d];
    if (step > 0) return xd + 1 >= e ? vi{} + (1 - e) * st : vi{} + st;
    return xd - 1 < 0 ? vi{} + (e - 1) * st : vi{} - st;
}

// ---- staple of U_mu(x) (storage real T, like heatbath.staple_mu) -------------------------
// A = sum_{nu != mu} U_nu(x+mu) U_mu(x+nu)^dag U_nu(x)^dag + U_nu(x+mu-nu)^dag U_mu(x-nu)^dag U_nu(x-nu)
// accumulated upper then lower for each nu from 0 (torch: A = A + upper; A = A + lower), the
// products in su_n.cuh's order, which is the order of torch's small-matrix bmm.
template <typename T, int N, int ND>
inline __attribute__((always_inline)) Mat<typename VecOf<T>::type, N> staple_mu(
    const T* __restrict__ Ur, const hpcflow::Geom<ND>& g, const Lanes<ND>& L, int mu) {
    using namespace hpcflow;
    using V = typename VecOf<T>::type;
    constexpr long long NN2 = 2 * N * N;
    const long long ns = g.nsites;
    const vi b = L.ubase;
    const vi xmu = L.site + shift<ND>(g, L.x[mu], mu, +1);
    Mat<V, N> acc;
HPCFLOW_UNROLL
    for (int k = 0; k < N * N; ++k) acc.m[k] = {V{}, V{}};
    for (int nu = 0; nu < ND; ++nu) {
        if (nu == mu) continue;
        const vi dp = shift<ND>(g, L.x[nu], nu, +1), dm = shift<ND>(g, L.x[nu], nu, -1);
        const vi xnu = L.site + dp, xmnu = L.site + dm, xmu_mnu = xmu + dm;
        const vi o_nu_xmu = b + (nu * ns + xmu) * NN2;
        const vi o_mu_xnu = b + (mu * ns + xnu) * NN2;
        const vi o_nu_x = b + (nu * ns + L.site) * NN2;
        const vi o_mu_xmnu = b + (mu * ns + xmnu) * NN2;
        const vi o_nu_xmu_mnu = b + (nu * ns + xmu_mnu) * NN2;
        const vi o_nu_xmnu = b + (nu * ns + xmnu) * NN2;
        const Mat<V, N> upper =
            mul_nd<V, N>(mul_nd<V, N>(gather_mat<V, T, N>(Ur, o_nu_xmu),
                                      gather_mat<V, T, N>(Ur, o_mu_xnu)),
                         gather_mat<V, T, N>(Ur, o_nu_x));
        const Mat<V, N> lower =
            mul_dn<V, N>(mul_nn<V, N>(gather_mat<V, T, N>(Ur, o_mu_xmnu),
                                      gather_mat<V, T, N>(Ur, o_nu_xmu_mnu)),
                         gather_mat<V, T, N>(Ur, o_nu_xmnu));
HPCFLOW_UNROLL
        for (int k = 0; k < N * N; ++k) {
            acc.m[k].re += upper.m[k].re;
            acc.m[k].im += upper.m[k].im;
        }
HPCFLOW_UNROLL
        for (int k = 0; k < N * N; ++k) {
            acc.m[k].re += lower.m[k].re;
            acc.m[k].im += lower.m[k].im;
        }
    }
    return acc;
}

// ---- SU(2) pieces (float64, as heatbath.py) -----------------------------------------------
// (k, a, b): block (i, j) of M has quaternion part k [[a, b], [-b*, a*]] (_normalised_quaternion)
template <int N>
inline __attribute__((always_inline)) vd normalised_quaternion(const C* M, int i, int j, C& va,
                                                               C& vb) {
    const C mii = M[i * N + i], mjj = M[j * N + j], mij = M[i * N + j], mji = M[j * N + i];
    const C a = {0.5 * (mii.re + mjj.re), 0.5 * (mii.im - mjj.im)};
    const C b = {0.5 * (mij.re - mji.re), 0.5 * (mij.im + mji.im)};
    const vd k = vsqrt(a.re * a.re + a.im * a.im + b.re * b.re + b.im * b.im);
    // torch divides complex by real as a * (1 / k) (c10::complex division with d = 0);
    // k = 0 (measure zero) leaves the weight flat: V = 1
    const auto safe = k > 1e-300;
    const vd rk = 1.0 / (safe ? k : vd{} + 1.0);
    va = {safe ? a.re * rk : vd{} + 1.0, safe ? a.im * rk : vd{}};
    vb = {safe ? b.re * rk : vd{}, safe ? b.im * rk : vd{}};
    return k;
}

// rows i, j of an N x N matrix <- w [row_i; row_j]  (_apply_rows)
template <int N>
inline __attribute__((always_inline)) void apply_rows(const W2& w, C* A, int i, int j) {
HPCFLOW_UNROLL
    for (int c = 0; c < N; ++c) {
        const C ai = A[i * N + c], aj = A[j * N + c];
        A[i * N + c] = cadd(cmul(w.w00, ai), cmul(w.w01, aj));
        A[j * N + c] = cadd(cmul(w.w10, ai), cmul(w.w11, aj));
    }
}

// 2x2 product a b of [[a00, a01], [a10, a11]] matrices (torch: acc = 0 + p0 + p1)
inline __attribute__((always_inline)) W2 mul2(const W2& a, const W2& b) {
    return {cadd(cmul(a.w00, b.w00), cmul(a.w01, b.w10)),
            cadd(cmul(a.w00, b.w01), cmul(a.w01, b.w11)),
            cadd(cmul(a.w10, b.w00), cmul(a.w11, b.w10)),
            cadd(cmul(a.w10, b.w01), cmul(a.w11, b.w11))};
}

inline __attribute__((always_inline)) W2 su2_dagger(const C& va, const C& vb) {
    // [[a, b], [-b*, a*]]^dag = [[a*, -b], [b*, a]]
    return {conj(va), neg(vb), conj(vb), va};
}

struct HBParams {
    hpcflow_rng::Key key;
    uint32_t step;
    double beta;
    long long blocks_per_config;
    int max_rounds;
    double kp_alpha_min;
};

// x0 and direction uniforms (d0, d1) for one link and subgroup (_su2_x0); false when the
// rejection did not finish in max_rounds rounds.
// Rounds first_round, first_round + 1, ...; u0 (optional) holds the uniforms of first_round.
inline bool su2_x0(double alpha, const HBParams& P, uint64_t index, uint64_t stride, int n_sub,
                   int sub, double& x0, double& d0, double& d1, int first_round = 0,
                   const double* u0 = nullptr) {
    alpha = alpha > 1e-300 ? alpha : 1e-300;
    const bool use_kp = alpha >= P.kp_alpha_min;
    const double span = use_kp ? 0.0 : -std::expm1(-2.0 * alpha);
    double u[6];
    for (int rnd = first_round; rnd < P.max_rounds; ++rnd) {
        const uint64_t ctr = index + (uint64_t)((long long)rnd * n_sub + sub) * stride;
        if (u0 && rnd == first_round)
            for (int q = 0; q < 6; ++q) u[q] = u0[q];
        else
            hpcflow_rng::uniforms(P.key, ctr, P.step, 6, u);
        double xs;
        bool acc;
        if (use_kp) {
            const double c = std::cos(kTwoPi * u[1]);
            double lam2 = -(std::log(u[0]) + c * c * std::log(u[2]));
            lam2 = lam2 / (2.0 * alpha);
            xs = 1.0 - 2.0 * lam2;
            acc = u[3] * u[3] <= 1.0 - lam2;
        } else {
            xs = 1.0 + std::log1p(-u[0] * span) / alpha;
            acc = u[1] * u[1] <= 1.0 - xs * xs;
        }
        if (acc) {
            x0 = xs < -1.0 ? -1.0 : (xs > 1.0 ? 1.0 : xs);
            d0 = u[4];
            d1 = u[5];
            return true;
        }
    }
    return false;
}

// Philox4x32-10 on W counters at once (philox.h's mapping, lane by lane): the 6 float64
// uniforms of (index[l], step) for every lane, u[q][l].
typedef unsigned long long vu __attribute__((vector_size(W * sizeof(unsigned long long))));

inline __attribute__((always_inline)) vu mul32(const vu& a, unsigned long long m) {
#ifdef __AVX512F__
    return (vu)_mm512_mul_epu32((__m512i)a, (__m512i)(vu{} + m));
#else
    return (a & 0xFFFFFFFFull) * m;  // both < 2^32: the 64-bit product is exact
#endif
}

inline void uniforms6_vec(hpcflow_rng::Key key, const vu& index, uint32_t step, vd u[6]) {
    const vu lo32 = vu{} + 0xFFFFFFFFull;
    for (int blk = 0; blk < 3; ++blk) {
        vu c0 = index & lo32, c1 = index >> 32, c2 = vu{} + (unsigned long long)step,
           c3 = vu{} + (unsigned long long)blk;  // kind 0 (uniform)
        uint32_t k0 = key.k0, k1 = key.k1;
        for (int r = 0; r < 10; ++r) {
            if (r > 0) {
                k0 += 0x9E3779B9u;
                k1 += 0xBB67AE85u;
            }
            const vu p0 = mul32(c0, 0xD2511F53ull), p1 = mul32(c2, 0xCD9E8D57ull);
            const vu n0 = (p1 >> 32) ^ c1 ^ (unsigned long long)k0;
            const vu n2 = (p0 >> 32) ^ c3 ^ (unsigned long long)k1;
            // the high halves of c1, c3 (and so of c0, c2) are not cleared here: the products
            // read only the low 32 bits, and the words are masked once after the rounds
            c0 = n0;
            c1 = p1;
            c2 = n2;
            c3 = p0;
        }
        c0 &= lo32;
        c1 &= lo32;
        c2 &= lo32;
        c3 &= lo32;
        // uniform 2 blk from words (c0, c1), uniform 2 blk + 1 from (c2, c3)
        const vu ka = ((c0 >> 5) << 26) | (c1 >> 6);
        const vu kb = ((c2 >> 5) << 26) | (c3 >> 6);
        const vd fa = __builtin_convertvector(ka, vd), fb = __builtin_convertvector(kb, vd);
        u[2 * blk] = (ka == 0 ? vd{} + 0.5 : fa) * 0x1p-53;
        u[2 * blk + 1] = (kb == 0 ? vd{} + 0.5 : fb) * 0x1p-53;
    }
}

// ---- vector log, sin, cos (fdlibm's algorithms, < 1 ulp) -----------------------------------
// Lane-wise ports of fdlibm e_log.c and k_sin.c / k_cos.c (Cody-Waite reduction by pi/2 in
// two parts, enough for the arguments used here: 2 pi u with u in (0, 1)). Like glibc's
// scalar functions (and torch's SLEEF ones) they are accurate to < 1 ulp, so they differ
// from either at most in the last bit, as those two differ from each other.
typedef long long vs64 __attribute__((vector_size(W * sizeof(long long))));

// log(x) for positive normal x
inline __attribute__((always_inline)) vd vlog(vd x) {
    const double ln2_hi = 6.93147180369123816490e-01, ln2_lo = 1.90821492927058770002e-10,
                 Lg1 = 6.666666666666735130e-01, Lg2 = 3.999999999940941908e-01,
                 Lg3 = 2.857142874366239149e-01, Lg4 = 2.222219843214978396e-01,
                 Lg5 = 1.818357216161805012e-01, Lg6 = 1.531383769920937332e-01,
                 Lg7 = 1.479819860511658591e-01;
    vs64 bits = (vs64)x;
    vs64 hx = bits >> 32;  // high word (x > 0)
    vs64 k = (hx >> 20) - 1023;
    hx &= 0x000fffff;
    const vs64 i0 = (hx + 0x95f64) & 0x100000;
    // normalise x to [sqrt(2)/2, sqrt(2)): high word hx | (i0 ^ 0x3ff00000)
    bits = ((hx | (i0 ^ 0x3ff00000)) << 32) | (bits & 0xffffffffLL);
    k += i0 >> 20;
    const vd f = (vd)bits - 1.0;
    const vd s = f / (2.0 + f);
    const vd dk = __builtin_convertvector(k, vd);
    const vd z = s * s;
    const vd w = z * z;
    const vd t1 = w * (Lg2 + w * (Lg4 + w * Lg6));
    const vd t2 = z * (Lg1 + w * (Lg3 + w * (Lg5 + w * Lg7)));
    const vs64 i = (hx - 0x6147a) | (0x6b851 - hx);
    const vd R = t2 + t1;
    const vd hfsq = 0.5 * f * f;
    const vd big = dk * ln2_hi - ((hfsq - (s * (hfsq + R) + dk * ln2_lo)) - f);
    const vd small = dk * ln2_hi - ((s * (f - R) - dk * ln2_lo) - f);
    return i > 0 ? big : small;
}

// sin and cos of x in [0, 2 pi]
inline __attribute__((always_inline)) void vsincos(vd x, vd& sn, vd& cs) {
    const double invpio2 = 6.36619772367581382433e-01, pio2_1 = 1.57079632673412561417e+00,
                 pio2_1t = 6.07710050650619224932e-11;
    const double S1 = -1.66666666666666324348e-01, S2 = 8.33333333332248946124e-03,
                 S3 = -1.98412698298579493134e-04, S4 = 2.75573137070700676789e-06,
                 S5 = -2.50507602534068634195e-08, S6 = 1.58969099521155010221e-10;
    const double C1 = 4.16666666666666019037e-02, C2 = -1.38888888888741095749e-03,
                 C3 = 2.48015872894767294178e-05, C4 = -2.75573143513906633035e-07,
                 C5 = 2.08757232129817482790e-09, C6 = -1.13596475577881948265e-11;
    const vd fn = __builtin_convertvector(__builtin_convertvector(x * invpio2 + 0.5, vs64), vd);
    const vs64 n = __builtin_convertvector(fn, vs64);
    const vd y = (x - fn * pio2_1) - fn * pio2_1t;  // n <= 4: fn * pio2_1 is exact
    const vd z = y * y;
    // __kernel_sin(y, 0)
    const vd v = z * y;
    const vd rs = S2 + z * (S3 + z * (S4 + z * (S5 + z * S6)));
    const vd ks = y + v * (S1 + z * rs);
    // __kernel_cos(y, 0)
    const vd rc = z * (C1 + z * (C2 + z * (C3 + z * (C4 + z * (C5 + z * C6)))));
    const vd ay = y < 0 ? -y : y;
    const vd c_small = 1.0 - (0.5 * z - z * rc);
    // |y| >= 0.3: qx = |y|/4 rounded to its high word (fdlibm: x > 0.78125 -> 0.28125)
    vd qx = (vd)((vs64)(ay * 0.25) & ((vs64){} + (long long)0xffffffff00000000LL));
    qx = ay > 0.78125 ? vd{} + 0.28125 : qx;
    const vd hz = 0.5 * z - qx;
    const vd c_big = (1.0 - qx) - (hz - z * rc);
    const vd kc = ay < 0.3 ? c_small : c_big;
    const vs64 q = n & 3;
    sn = q == 0 ? ks : (q == 1 ? kc : (q == 2 ? -ks : -kc));
    cs = q == 0 ? kc : (q == 1 ? -ks : (q == 2 ? -kc : ks));
}

// Creutz lanes (cr) of one subgroup: one by one with libm, round 0's uniforms u reused
// (su2_x0); writes their x0, d0, d1. Returns the lanes whose rejection did not finish.
__attribute__((noinline)) int creutz_lanes(const vd& alpha, const vs64& cr, const HBParams& P,
                                           const vu& idx0, uint64_t nl, int n_sub, int s,
                                           const vd* u, vd& x0, vd& d0, vd& d1) {
    int failed = 0;
    for (int l = 0; l < W; ++l) {
        if (!cr[l]) continue;
        const double ul[6] = {u[0][l], u[1][l], u[2][l], u[3][l], u[4][l], u[5][l]};
        double x0l = 0.0, d0l = 0.5, d1l = 0.0;
        if (!su2_x0(alpha[l], P, idx0[l], nl, n_sub, s, x0l, d0l, d1l, 0, ul)) ++failed;
        x0[l] = x0l;
        d0[l] = d0l;
        d1[l] = d1l;
    }
    return failed;
}

// ---- the update of W links held in lanes ---------------------------------------------------
// Uc (float64 lanes) <- the heat-bath / overrelaxation update of the links Uc with staples Ac;
// idx0: counter index of round 0, subgroup 0 of each lane; lanes >= nact are idle (their
// results are not used). Returns the number of active links whose rejection did not finish.
// Kennedy-Pendleton lanes that reject a round are redrawn together as vectors (the same
// counters, the same formulas as su2_x0) until all have accepted; Creutz lanes (alpha < 2)
// continue one by one with libm.
template <bool OR, int N>
inline __attribute__((always_inline)) int update_core(C* Uc, const C* Ac, const vu& idx0,
                                                      int nact, const HBParams& P, uint64_t nl) {
    constexpr int NN = N * N;
    constexpr int NSUB = Subgroups<N>::n;
    C M[NN];
    // M = U A (torch's small-matrix bmm: acc = 0; acc += a_ik b_kj)
HPCFLOW_UNROLL
    for (int i = 0; i < N; ++i)
HPCFLOW_UNROLL
        for (int j = 0; j < N; ++j) {
            vd re = vd{}, im = vd{};
HPCFLOW_UNROLL
            for (int k = 0; k < N; ++k) {
                const C a = Uc[i * N + k], c = Ac[k * N + j];
                re += a.re * c.re - a.im * c.im;
                im += a.re * c.im + a.im * c.re;
            }
            M[i * N + j] = {re, im};
        }
    int failed = 0;
    vs64 live{};
    for (int l = 0; l < W; ++l) live[l] = l < nact ? -1 : 0;
HPCFLOW_UNROLL
    for (int s = 0; s < NSUB; ++s) {
        const int i = Subgroups<N>::i[s], j = Subgroups<N>::j[s];
        C va, vb;
        const vd k = normalised_quaternion<N>(M, i, j, va, vb);
        W2 w;
        if constexpr (OR) {
            const W2 vd_ = su2_dagger(va, vb);
            w = mul2(vd_, vd_);
        } else {
            const vd alpha = k * (2.0 * P.beta / N);  // torch: 2 beta k / N (to rounding)
            C xa = {vd{} + 1.0, vd{}}, xb = {vd{}, vd{}};
            const vu idx = idx0 + (unsigned long long)s * nl;
            // round 0 of all lanes: counters idx, drawn together
            vd u[6];
            uniforms6_vec(P.key, idx, P.step, u);
            const vd al = alpha > 1e-300 ? alpha : vd{} + 1e-300;
            const vs64 kp = (vs64)(al >= P.kp_alpha_min);
            vd x0, d0 = u[4], d1 = u[5];
            vs64 pend;
            {
                vd sn, c;
                vsincos(kTwoPi * u[1], sn, c);
                vd lam2 = -(vlog(u[0]) + c * c * vlog(u[2]));
                lam2 = lam2 / (2.0 * al);
                const vd x_kp = 1.0 - 2.0 * lam2;
                const vs64 acc = (u[3] * u[3] <= 1.0 - lam2) & kp;
                x0 = x_kp < -1.0 ? vd{} - 1.0 : (x_kp > 1.0 ? vd{} + 1.0 : x_kp);
                pend = ~acc & kp & live;
            }
            // Kennedy-Pendleton lanes that rejected: further rounds as vectors
            for (int rnd = 1; rnd < P.max_rounds; ++rnd) {
                bool any = false;
                for (int l = 0; l < W; ++l) any |= pend[l] != 0;
                if (!any) break;
                vd ur[6];
                uniforms6_vec(P.key, idx + (unsigned long long)rnd * NSUB * nl, P.step, ur);
                vd sn, c;
                vsincos(kTwoPi * ur[1], sn, c);
                vd lam2 = -(vlog(ur[0]) + c * c * vlog(ur[2]));
                lam2 = lam2 / (2.0 * al);
                const vd x_kp = 1.0 - 2.0 * lam2;
                const vs64 acc = (ur[3] * ur[3] <= 1.0 - lam2) & pend;
                const vd xc = x_kp < -1.0 ? vd{} - 1.0 : (x_kp > 1.0 ? vd{} + 1.0 : x_kp);
                x0 = acc ? xc : x0;
                d0 = acc ? ur[4] : d0;
                d1 = acc ? ur[5] : d1;
                pend &= ~acc;
            }
            const vs64 cr = ~kp & live;
            bool any_cr = false;
            for (int l = 0; l < W; ++l) {
                failed += pend[l] != 0;
                any_cr |= cr[l] != 0;
            }
            if (__builtin_expect(any_cr, 0))  // out of line: no spills on the common path
                failed += creutz_lanes(alpha, cr, P, idx0, nl, NSUB, s, u, x0, d0, d1);
            // X = x0 + i x.sigma (_su2_from_x0), all lanes
            const vd r2 = 1.0 - x0 * x0;
            const vd r = vsqrt(r2 > 0.0 ? r2 : vd{});
            const vd cos_t = 2.0 * d0 - 1.0;
            const vd s2 = 1.0 - cos_t * cos_t;
            const vd sin_t = vsqrt(s2 > 0.0 ? s2 : vd{});
            vd sph, cph;
            vsincos(kTwoPi * d1, sph, cph);
            const vd rs = r * sin_t;
            xa = {x0, r * cos_t};
            xb = {rs * sph, rs * cph};
            const W2 X = {xa, xb, neg(conj(xb)), conj(xa)};
            w = mul2(X, su2_dagger(va, vb));  // w = X V^dag
        }
        apply_rows<N>(w, Uc, i, j);
        if (s + 1 < NSUB) apply_rows<N>(w, M, i, j);
    }
    return failed;
}

// ---- one group of W links (AoS field, gathers) -------------------------------------------------
// Staple, M = U A and the SU(2) subgroup passes for the lanes of L; writes back the active
// lanes. Returns the number of links whose heat-bath rejection did not finish.
template <bool OR, typename T, int N, int ND>
int update_group(T* __restrict__ Ur, const hpcflow::Geom<ND>& g, const Lanes<ND>& L, int mu,
                 const HBParams& P, uint64_t nl) {
    using V = typename VecOf<T>::type;
    constexpr int NN = N * N;
    const Mat<V, N> A = staple_mu<T, N, ND>(Ur, g, L, mu);
    const vi o_link = L.ubase + (mu * g.nsites + L.site) * (2 * NN);
    const Mat<V, N> Ut = gather_mat<V, T, N>(Ur, o_link);
    C Uc[NN], Ac[NN];
HPCFLOW_UNROLL
    for (int k = 0; k < NN; ++k) {
        Uc[k] = {__builtin_convertvector(Ut.m[k].re, vd), __builtin_convertvector(Ut.m[k].im, vd)};
        Ac[k] = {__builtin_convertvector(A.m[k].re, vd), __builtin_convertvector(A.m[k].im, vd)};
    }
    vu idx;
    for (int l = 0; l < W; ++l) idx[l] = L.index[l];
    const int failed = update_core<OR, N>(Uc, Ac, idx, L.n, P, nl);
    for (int l = 0; l < L.n; ++l) {
        T* up = Ur + o_link[l];
HPCFLOW_UNROLL
        for (int k = 0; k < NN; ++k) {
            up[2 * k] = (T)Uc[k].re[l];
            up[2 * k + 1] = (T)Uc[k].im[l];
        }
    }
    return failed;
}

// Row r (0 <= r < nrows) of the update order -> its padded coordinates x_0 .. x_{ND-2}.
// 4D: tiles of kTile x_1 values, inside a tile x_0, then x_1, then x_2 (fastest): the rows a
// tile reads (x_0 +- 1, x_1 +- 1, x_2 +- 1) stay in cache while the tile is swept, instead
// of three whole x_0 slabs (16^4 SU(3): 7 MB). 2D: rows are x_0.
constexpr int kTile = HPCFLOW_HB_TILE;
template <int ND>
inline void row_coords(const Layout<ND>& Ly, long long r, int* x) {
    if constexpr (ND == 4) {
        const long long n0 = Ly.hi[0] - Ly.lo[0], n1 = Ly.hi[1] - Ly.lo[1],
                        n2 = Ly.hi[2] - Ly.lo[2];
        const long long per_tile = (long long)kTile * n0 * n2;
        const long long t = r / per_tile;
        long long k = r - t * per_tile;
        const long long w = n1 - t * kTile < kTile ? n1 - t * kTile : kTile;
        x[0] = Ly.lo[0] + (int)(k / (w * n2));
        k -= (x[0] - Ly.lo[0]) * w * n2;
        x[1] = Ly.lo[1] + (int)(t * kTile + k / n2);
        x[2] = Ly.lo[2] + (int)(k % n2);
    } else {
        for (int d = ND - 2; d >= 0; --d) {
            const int n = Ly.hi[d] - Ly.lo[d];
            x[d] = Ly.lo[d] + (int)(r % n);
            r /= n;
        }
    }
}

// ---- the sub-step ---------------------------------------------------------------------------
// OR = true: overrelaxation; else heat bath. Interior sites of global parity `parity` are
// enumerated row by row (rows = coordinates 0 .. ND-2, the last coordinate stepping by 2) and
// packed W at a time into lane groups (across rows and configurations); OpenMP threads take
// contiguous ranges of rows. Returns the number of links whose rejection did not finish.
template <bool OR, typename T, int N, int ND>
long long substep(T* __restrict__ Ur, long long nbatch, const Layout<ND>& Ly, int mu, int parity,
                  const HBParams& P) {
    constexpr int NN = N * N;
    constexpr int LAST = ND - 1;
    const hpcflow::Geom<ND>& g = Ly.g;
    const uint64_t nl = (uint64_t)ND * (uint64_t)Ly.gvol;
    const long long batch_stride = (long long)ND * g.nsites * 2 * NN;  // reals per configuration
    const long long total_rows = nbatch * Ly.nrows;
    long long failed = 0;
#pragma omp parallel reduction(+ : failed)
    {
        int nth = 1, tid = 0;
#ifdef _OPENMP
        nth = omp_get_num_threads();
        tid = omp_get_thread_num();
#endif
        const long long r0 = total_rows * tid / nth, r1 = total_rows * (tid + 1) / nth;
        Lanes<ND> L;
        L.n = 0;
        auto flush = [&]() {
            for (int l = L.n; l < W; ++l) {  // idle lanes repeat lane 0 (not written back)
                L.ubase[l] = L.ubase[0];
                L.site[l] = L.site[0];
                L.index[l] = L.index[0];
                for (int d = 0; d < ND; ++d) L.x[d][l] = L.x[d][0];
            }
            failed += update_group<OR, T, N, ND>(Ur, g, L, mu, P, nl);
            L.n = 0;
        };
        for (long long br = r0; br < r1; ++br) {
            const long long b = br / Ly.nrows;
            long long r = br - b * Ly.nrows;
            int x[ND];
            row_coords<ND>(Ly, r, x);
            long long gsite_row = 0, psum = 0, site_row = 0;
            for (int d = 0; d < ND - 1; ++d) {
                const long long gc = pmod(Ly.gofs[d] + x[d], Ly.gs[d]);
                gsite_row = gsite_row * Ly.gs[d] + gc;
                psum += gc;
                site_row += x[d] * g.stride[d];
            }
            gsite_row *= Ly.gs[LAST];
            int xl0 = Ly.lo[LAST];
            if (((psum + pmod(Ly.gofs[LAST] + xl0, Ly.gs[LAST])) & 1) != parity) ++xl0;
            // counter index of the link without the round/subgroup term:
            // b R nl + mu V + global site; the global x_{ND-1} advances by 2 (mod extent)
            const uint64_t base = (uint64_t)b * (uint64_t)P.blocks_per_config * nl +
                                  (uint64_t)mu * (uint64_t)Ly.gvol + (uint64_t)gsite_row;
            long long gl = pmod(Ly.gofs[LAST] + xl0, Ly.gs[LAST]);
            for (int xl = xl0; xl < Ly.hi[LAST]; xl += 2) {
                const int l = L.n;
                x[LAST] = xl;
                L.ubase[l] = b * batch_stride;
                L.site[l] = site_row + xl;
                for (int d = 0; d < ND; ++d) L.x[d][l] = x[d];
                L.index[l] = base + (uint64_t)gl;
                gl += 2;
                if (gl >= Ly.gs[LAST]) gl -= Ly.gs[LAST];
                if (++L.n == W) flush();
            }
        }
        if (L.n) flush();
    }
    return failed;
}

// max(max_ij |(U^dag U - 1)_ij|, |det U - 1|) of one link, in float64.
template <typename T, int N>
inline double link_violation(const T* p) {
    constexpr int NN = N * N;
    double re[NN], im[NN];
    for (int k = 0; k < NN; ++k) {
        re[k] = (double)p[2 * k];
        im[k] = (double)p[2 * k + 1];
    }
    double v = 0.0;  // squared: one sqrt per link at the end
    for (int i = 0; i < N; ++i)
        for (int j = 0; j < N; ++j) {
            double sr = 0.0, si = 0.0;
            for (int k = 0; k < N; ++k) {  // conj(U_ki) U_kj
                sr += re[k * N + i] * re[k * N + j] + im[k * N + i] * im[k * N + j];
                si += re[k * N + i] * im[k * N + j] - im[k * N + i] * re[k * N + j];
            }
            if (i == j) sr -= 1.0;
            const double a = sr * sr + si * si;
            v = a > v ? a : v;
        }
    double dr, di;
    if constexpr (N == 2) {
        dr = re[0] * re[3] - im[0] * im[3] - (re[1] * re[2] - im[1] * im[2]);
        di = re[0] * im[3] + im[0] * re[3] - (re[1] * im[2] + im[1] * re[2]);
    } else {
        // cofactor expansion along row 0; cm: U_a U_b - U_c U_d
        auto cm = [&](int a, int b, int c, int d, double& r, double& i_) {
            r = re[a] * re[b] - im[a] * im[b] - (re[c] * re[d] - im[c] * im[d]);
            i_ = re[a] * im[b] + im[a] * re[b] - (re[c] * im[d] + im[c] * re[d]);
        };
        double c0r, c0i, c1r, c1i, c2r, c2i;
        cm(4, 8, 5, 7, c0r, c0i);
        cm(5, 6, 3, 8, c1r, c1i);
        cm(3, 7, 4, 6, c2r, c2i);
        dr = re[0] * c0r - im[0] * c0i + re[1] * c1r - im[1] * c1i + re[2] * c2r - im[2] * c2i;
        di = re[0] * c0i + im[0] * c0r + re[1] * c1i + im[1] * c1r + re[2] * c2i + im[2] * c2r;
    }
    const double dv = (dr - 1.0) * (dr - 1.0) + di * di;
    return std::sqrt(dv > v ? dv : v);
}

// max over interior links of max(max_ij |(U^dag U - 1)_ij|, |det U - 1|) (hmc.unitarity_violation,
// computed in float64 from the stored links; equal to rounding).
template <typename T, int N, int ND>
double unitarity_violation(const T* __restrict__ Ur, long long nbatch, const Layout<ND>& Ly) {
    const hpcflow::Geom<ND>& g = Ly.g;
    const long long nrows = nbatch * ND * Ly.nrows;  // (b, mu, interior row)
    double vmax = 0.0;
#pragma omp parallel for schedule(static) reduction(max : vmax)
    for (long long q = 0; q < nrows; ++q) {
        const long long bm = q / Ly.nrows;  // b ND + mu
        long long r = q - bm * Ly.nrows, site_row = 0;
        for (int d = ND - 2; d >= 0; --d) {
            const int n = Ly.hi[d] - Ly.lo[d];
            site_row += (Ly.lo[d] + r % n) * g.stride[d];
            r /= n;
        }
        for (int xl = Ly.lo[ND - 1]; xl < Ly.hi[ND - 1]; ++xl) {
            const double v = link_violation<T, N>(Ur + (bm * g.nsites + site_row + xl) * 2 * N * N);
            vmax = v > vmax ? v : vmax;
        }
    }
    return vmax;
}

// ---- whole sweeps on a "virtual node" structure-of-arrays copy (4D, float64, no halo) --------
// The periodic L0 x L1 x L2 x L3 lattice (L0, L1, L2 multiples of 4, L3 even) is cut into
// 2 x 2 x 2 blocks of l = (L0/2, L1/2, L2/2, L3) sites; lane q (bits q0 q1 q2) of a vector holds
// block (q0, q1, q2), so the 8 lanes of one scratch vector are the 8 sites
// x = y + (q0 l0, q1 l1, q2 l2, 0) of one block coordinate y, all of the same parity (l0, l1,
// l2 are even). The scratch S[b][mu][y][k][re|im][q] holds every link this way: a link
// matrix of 8 sites is 18 contiguous aligned vectors, a neighbour y +- d_hat inside the block
// is the same lane of another y, and across the block face (d < 3) the lane q ^ (1 << d) of
// y's opposite face site (one in-register permute). The field is transposed into S once per
// call, all sub-steps of all sweeps run on S with plain vector loads, and S is transposed back.
// Arithmetic, order of the sub-steps and random counters are those of the AoS path above.
struct VNGeom {
    int l[4];             // block extents
    long long st[4];      // strides of y in the block (sites)
    long long vol8;       // sites per block (V / 8)
    long long gst[4];     // strides of the global lexicographic site
    long long V;          // global volume
    vu loff;              // global-site offset of lane q relative to lane 0
};

inline VNGeom make_vn(const int* ext) {
    VNGeom G;
    for (int d = 0; d < 4; ++d) G.l[d] = d < 3 ? ext[d] / 2 : ext[d];
    G.st[3] = 1;
    G.gst[3] = 1;
    for (int d = 2; d >= 0; --d) {
        G.st[d] = G.st[d + 1] * G.l[d + 1];
        G.gst[d] = G.gst[d + 1] * ext[d + 1];
    }
    G.vol8 = G.st[0] * G.l[0];
    G.V = G.gst[0] * ext[0];
    for (int q = 0; q < W; ++q) {
        long long o = 0;
        for (int d = 0; d < 3; ++d)
            if ((q >> d) & 1) o += (long long)G.l[d] * G.gst[d];
        G.loff[q] = (unsigned long long)o;
    }
    return G;
}

constexpr int kVNReals = 2 * 9 * W;  // reals of one SU(3) lane matrix (SU(2): fewer used)
#ifndef HPCFLOW_HB_VN_TILE
#define HPCFLOW_HB_VN_TILE 2  // y_1 values per cache tile of the sub-steps (a power of 2)
#endif
constexpr int kVNTile = HPCFLOW_HB_VN_TILE;
#ifndef HPCFLOW_HB_VN_OUT_THP
#define HPCFLOW_HB_VN_OUT_THP 1  // madvise a fresh output to huge pages (~6% at 16^4)
#endif

// lane permutation out[q] = in[q ^ m]
inline __attribute__((always_inline)) vd lperm(const vd& v, int m) {
    switch (m) {
        case 0: return v;
        case 1: return __builtin_shuffle(v, (vi){1, 0, 3, 2, 5, 4, 7, 6});
        case 2: return __builtin_shuffle(v, (vi){2, 3, 0, 1, 6, 7, 4, 5});
        case 3: return __builtin_shuffle(v, (vi){3, 2, 1, 0, 7, 6, 5, 4});
        case 4: return __builtin_shuffle(v, (vi){4, 5, 6, 7, 0, 1, 2, 3});
        case 5: return __builtin_shuffle(v, (vi){5, 4, 7, 6, 1, 0, 3, 2});
        case 6: return __builtin_shuffle(v, (vi){6, 7, 4, 5, 2, 3, 0, 1});
        default: return __builtin_shuffle(v, (vi){7, 6, 5, 4, 3, 2, 1, 0});
    }
}

template <int N>
inline __attribute__((always_inline)) Mat<vd, N> vn_load0(const double* p) {
    Mat<vd, N> a;
HPCFLOW_UNROLL
    for (int k = 0; k < N * N; ++k) {
        a.m[k].re = *(const vd*)(p + (2 * k) * W);
        a.m[k].im = *(const vd*)(p + (2 * k + 1) * W);
    }
    return a;
}

// lane-permuted load (m: xor mask of the lanes), without branches: one permute per vector
#ifdef __AVX512F__
alignas(64) const long long kLanePerm[8][8] = {
    {0, 1, 2, 3, 4, 5, 6, 7}, {1, 0, 3, 2, 5, 4, 7, 6}, {2, 3, 0, 1, 6, 7, 4, 5},
    {3, 2, 1, 0, 7, 6, 5, 4}, {4, 5, 6, 7, 0, 1, 2, 3}, {5, 4, 7, 6, 1, 0, 3, 2},
    {6, 7, 4, 5, 2, 3, 0, 1}, {7, 6, 5, 4, 3, 2, 1, 0}};
template <int N>
inline __attribute__((always_inline)) Mat<vd, N> vn_load(const double* p, int m) {
    const __m512i ix = _mm512_load_si512(kLanePerm[m]);
    Mat<vd, N> a;
HPCFLOW_UNROLL
    for (int k = 0; k < N * N; ++k) {
        a.m[k].re = (vd)_mm512_permutexvar_pd(ix, _mm512_load_pd(p + (2 * k) * W));
        a.m[k].im = (vd)_mm512_permutexvar_pd(ix, _mm512_load_pd(p + (2 * k + 1) * W));
    }
    return a;
}
#else
template <int N>
inline __attribute__((always_inline)) Mat<vd, N> vn_load(const double* p, int m) {
    Mat<vd, N> a;
HPCFLOW_UNROLL
    for (int k = 0; k < N * N; ++k) {
        a.m[k].re = lperm(*(const vd*)(p + (2 * k) * W), m);
        a.m[k].im = lperm(*(const vd*)(p + (2 * k + 1) * W), m);
    }
    return a;
}
#endif

// neighbour of block coordinate y along d by step (+-1): y index and lane mask
struct VNb {
    long long ys;
    int m;
};
inline __attribute__((always_inline)) VNb vn_nb(const VNGeom& G, const int* y, long long ys, int d,
                                                int step) {
    const int n = G.l[d];
    int yd = y[d] + step;
    int m = 0;
    if (yd == n) {
        yd = 0;
        m = d < 3 ? 1 << d : 0;
    } else if (yd < 0) {
        yd = n - 1;
        m = d < 3 ? 1 << d : 0;
    }
    return {ys + (long long)(yd - y[d]) * G.st[d], m};
}

// max(|U^dag U - 1|^2 entries, |det U - 1|^2) per lane (link_violation, squared, lane-wise)
template <int N>
inline __attribute__((always_inline)) vd vn_violation2(const C* U) {
    vd v{};
HPCFLOW_UNROLL
    for (int i = 0; i < N; ++i)
HPCFLOW_UNROLL
        for (int j = i; j < N; ++j) {  // (U^dag U)_ji = conj((U^dag U)_ij)
            vd sr{}, si{};
HPCFLOW_UNROLL
            for (int k = 0; k < N; ++k) {
                const C a = U[k * N + i], b = U[k * N + j];
                sr += a.re * b.re + a.im * b.im;
                si += a.re * b.im - a.im * b.re;
            }
            if (i == j) sr -= 1.0;
            const vd a = sr * sr + si * si;
            v = a > v ? a : v;
        }
    C det;
    if constexpr (N == 2) {
        det = {cmul(U[0], U[3]).re - cmul(U[1], U[2]).re, cmul(U[0], U[3]).im - cmul(U[1], U[2]).im};
    } else {
        auto cm = [&](int a, int b, int c, int d) {
            const C p = cmul(U[a], U[b]), q = cmul(U[c], U[d]);
            return C{p.re - q.re, p.im - q.im};
        };
        const C c0 = cm(4, 8, 5, 7), c1 = cm(5, 6, 3, 8), c2 = cm(3, 7, 4, 6);
        const C t0 = cmul(U[0], c0), t1 = cmul(U[1], c1), t2 = cmul(U[2], c2);
        det = {t0.re + t1.re + t2.re, t0.im + t1.im + t2.im};
    }
    const vd dv = (det.re - 1.0) * (det.re - 1.0) + det.im * det.im;
    return dv > v ? dv : v;
}

// One sub-step (mu, parity) on the scratch; returns failed links, raises *viol2 (squared
// violation of the updated links).
template <bool OR, int N>
long long vn_substep(double* __restrict__ S, long long nbatch, const VNGeom& G, int mu, int parity,
                     const HBParams& P, double* viol2) {
    constexpr int NN = N * N;
    constexpr long long MR = kVNReals;  // reals per lane matrix in S
    const uint64_t nl = 4ull * (uint64_t)G.V;
    const long long nrows = nbatch * G.l[0] * G.l[1] * G.l[2];
    long long failed = 0;
    double vmax = 0.0;
#pragma omp parallel for schedule(static) reduction(+ : failed) reduction(max : vmax)
    for (long long r = 0; r < nrows; ++r) {
        // rows in tiles of kVNTile y_1 values: (b, tile, y_0, y_1 in tile, y_2), so the rows at
        // y_0 +- 1 are still in cache when reused
        const long long per_b = (long long)G.l[0] * G.l[1] * G.l[2];
        const long long b = r / per_b;
        long long t = r - b * per_b;
        int y[4];
        int tile_w = kVNTile;
        while (G.l[1] % tile_w) tile_w /= 2;
        const long long per_tile = (long long)tile_w * G.l[0] * G.l[2];
        const int tl = (int)(t / per_tile);
        t -= tl * per_tile;
        y[2] = (int)(t % G.l[2]);
        t /= G.l[2];
        y[1] = tl * tile_w + (int)(t % tile_w);
        y[0] = (int)(t / tile_w);
        const double* Sb = S + b * 4 * G.vol8 * MR;
        double* Sm = S + (b * 4 + mu) * G.vol8 * MR;
        const unsigned long long cbase =
            (unsigned long long)b * (unsigned long long)P.blocks_per_config * nl +
            (unsigned long long)mu * (unsigned long long)G.V;
        vd vv{};
        for (y[3] = (y[0] + y[1] + y[2] + parity) & 1; y[3] < G.l[3]; y[3] += 2) {
            const long long ys = y[0] * G.st[0] + y[1] * G.st[1] + y[2] * G.st[2] + y[3];
            // staple (storage precision = float64 here), as staple_mu
            const VNb xmu = vn_nb(G, y, ys, mu, +1);
            Mat<vd, N> acc;
HPCFLOW_UNROLL
            for (int k = 0; k < NN; ++k) acc.m[k] = {vd{}, vd{}};
            for (int nu = 0; nu < 4; ++nu) {
                if (nu == mu) continue;
                const double* Snu = Sb + nu * G.vol8 * MR;
                const VNb xnu = vn_nb(G, y, ys, nu, +1), xmnu = vn_nb(G, y, ys, nu, -1);
                // x + mu - nu: (x - nu) shifted by mu; the lane masks compose by xor
                const long long xmu_mnu = xmu.ys + (xmnu.ys - ys);
                const int m_mu_mnu = xmu.m ^ xmnu.m;
                const Mat<vd, N> upper = hpcflow::mul_nd<vd, N>(
                    hpcflow::mul_nd<vd, N>(vn_load<N>(Snu + xmu.ys * MR, xmu.m),
                                           vn_load<N>(Sm + xnu.ys * MR, xnu.m)),
                    vn_load0<N>(Snu + ys * MR));
                const Mat<vd, N> lower = hpcflow::mul_dn<vd, N>(
                    hpcflow::mul_nn<vd, N>(vn_load<N>(Sm + xmnu.ys * MR, xmnu.m),
                                           vn_load<N>(Snu + xmu_mnu * MR, m_mu_mnu)),
                    vn_load<N>(Snu + xmnu.ys * MR, xmnu.m));
HPCFLOW_UNROLL
                for (int k = 0; k < NN; ++k) {
                    acc.m[k].re += upper.m[k].re;
                    acc.m[k].im += upper.m[k].im;
                }
HPCFLOW_UNROLL
                for (int k = 0; k < NN; ++k) {
                    acc.m[k].re += lower.m[k].re;
                    acc.m[k].im += lower.m[k].im;
                }
            }
            double* up = Sm + ys * MR;
            const Mat<vd, N> Ut = vn_load0<N>(up);
            C Uc[NN], Ac[NN];
HPCFLOW_UNROLL
            for (int k = 0; k < NN; ++k) {
                Uc[k] = {Ut.m[k].re, Ut.m[k].im};
                Ac[k] = {acc.m[k].re, acc.m[k].im};
            }
            vu idx0{};
            if constexpr (!OR) {
                const long long gs0 =
                    y[0] * G.gst[0] + y[1] * G.gst[1] + y[2] * G.gst[2] + y[3];
                idx0 = G.loff + (cbase + (unsigned long long)gs0);
            }
            failed += update_core<OR, N>(Uc, Ac, idx0, W, P, nl);
HPCFLOW_UNROLL
            for (int k = 0; k < NN; ++k) {
                *(vd*)(up + (2 * k) * W) = Uc[k].re;
                *(vd*)(up + (2 * k + 1) * W) = Uc[k].im;
            }
            const vd v2 = vn_violation2<N>(Uc);
            vv = v2 > vv ? v2 : vv;
        }
        for (int q = 0; q < W; ++q) vmax = vv[q] > vmax ? vv[q] : vmax;
    }
    if (vmax > *viol2) *viol2 = vmax;
    return failed;
}

// AoS field U[b][mu][x][N][N] (complex128) <-> scratch S (to_s: U -> S)
template <int N>
void vn_transpose(double* __restrict__ S, double* __restrict__ U, long long nbatch,
                  const VNGeom& G, const int* ext, bool to_s) {
    constexpr int NN2 = 2 * N * N;
    constexpr long long MR = kVNReals;
    const long long nmat = nbatch * 4 * G.vol8;
#pragma omp parallel for schedule(static)
    for (long long q = 0; q < nmat; ++q) {
        const long long bm = q / G.vol8, ys = q - bm * G.vol8;
        long long t = ys;
        int y[4];
        for (int d = 3; d >= 0; --d) {
            y[d] = (int)(t % G.l[d]);
            t /= G.l[d];
        }
        const long long g0 = y[0] * G.gst[0] + y[1] * G.gst[1] + y[2] * G.gst[2] + y[3];
        double* s = S + q * MR;
        double* u0 = U + (bm * G.V + g0) * NN2;
        (void)ext;
        const vi off = (vi)G.loff * NN2;
        if (to_s) {
            const Mat<vd, N> a = gather_mat<vd, double, N>(u0, off);
HPCFLOW_UNROLL
            for (int k = 0; k < N * N; ++k) {
                *(vd*)(s + (2 * k) * W) = a.m[k].re;
                *(vd*)(s + (2 * k + 1) * W) = a.m[k].im;
            }
            continue;
        }
#ifdef __AVX512F__
        constexpr int NB = NN2 / 8;  // whole 8 x 8 blocks
HPCFLOW_UNROLL
        for (int blk = 0; blk < NB; ++blk) {
            __m512d r[8];
            for (int l = 0; l < 8; ++l) r[l] = _mm512_load_pd(s + (8 * blk + l) * W);
            transpose8x8(r);
            for (int l = 0; l < 8; ++l) _mm512_storeu_pd(u0 + off[l] + 8 * blk, r[l]);
        }
        for (int l = 0; l < W; ++l)
            for (int k = 8 * NB; k < NN2; ++k) u0[off[l] + k] = s[k * W + l];
#else
        for (int l = 0; l < W; ++l)
            for (int k = 0; k < NN2; ++k) u0[off[l] + k] = s[k * W + l];
#endif
    }
}

// scratch of the sweeps (grow only; calls serialised)
std::mutex g_vn_mutex;
double* g_vn_buf = nullptr;
size_t g_vn_cap = 0;

// 2 MiB aligned, transparent huge pages where the kernel allows them: the sub-steps read the
// scratch along ~10 streams at once, and 4 KiB pages would miss the TLB on most of them
// (16^4 SU(3): 38 MB = 9200 small pages).
inline double* vn_scratch(size_t n) {
    if (n > g_vn_cap) {
        std::free(g_vn_buf);
        constexpr size_t huge = size_t(1) << 21;
        const size_t bytes = ((n * sizeof(double) + huge - 1) / huge) * huge;
        g_vn_buf = static_cast<double*>(std::aligned_alloc(huge, bytes));
#ifdef MADV_HUGEPAGE
        if (g_vn_buf) madvise(g_vn_buf, bytes, MADV_HUGEPAGE);
#endif
        g_vn_cap = g_vn_buf ? n : 0;
    }
    return g_vn_buf;
}

using real_t = HPCFLOW_REAL;
constexpr int kN = HPCFLOW_N;
constexpr int kND = HPCFLOW_ND;
static_assert(kN == 2 || kN == 3, "heatbath_host.cpp: N must be 2 or 3");
static_assert(kND == 2 || kND == 4, "heatbath_host.cpp: ND must be 2 or 4");

}  // namespace

extern "C" {

// Configuration this library was built for, so the loader can check it.
void hpcflow_hb_config(int* n, int* nd, int* real_bytes) {
    *n = kN;
    *nd = kND;
    *real_bytes = (int)sizeof(real_t);
}

// Heat bath of U[b, mu, x] on interior sites of global parity `parity`, in place.
// U: C-contiguous (nbatch, ND, *ext, N, N) complex; ext/halo: padded extents and halo widths;
// origin: global coordinate of the first interior site; gshape: global extents (even).
// key: CounterRNG.key_site. Returns the number of links whose rejection did not finish in
// max_rounds rounds (0 on success; those links keep partial updates and the caller raises).
long long hpcflow_heatbath_substep(void* U, long long nbatch, const int* ext, const int* halo,
                                   const long long* origin, const long long* gshape, int mu,
                                   int parity, double beta, unsigned int k0, unsigned int k1,
                                   unsigned int step, long long blocks_per_config,
                                   int max_rounds, double kp_alpha_min) {
    const Layout<kND> L = make_layout<kND>(ext, halo, origin, gshape);
    HBParams P{{k0, k1}, step, beta, blocks_per_config, max_rounds, kp_alpha_min};
    return substep<false, real_t, kN, kND>(static_cast<real_t*>(U), nbatch, L, mu, parity, P);
}

// Overrelaxation of U[b, mu, x] on interior sites of global parity `parity`, in place.
void hpcflow_overrelax_substep(void* U, long long nbatch, const int* ext, const int* halo,
                               const long long* origin, const long long* gshape, int mu,
                               int parity) {
    const Layout<kND> L = make_layout<kND>(ext, halo, origin, gshape);
    HBParams P{{0u, 0u}, 0u, 0.0, 0, 0, 0.0};
    substep<true, real_t, kN, kND>(static_cast<real_t*>(U), nbatch, L, mu, parity, P);
}

// Unitarity violation of the interior links (see unitarity_violation above).
double hpcflow_hb_unitarity_violation(const void* U, long long nbatch, const int* ext,
                                      const int* halo) {
    long long o[kND] = {}, gs[kND];
    for (int d = 0; d < kND; ++d) gs[d] = ext[d];
    const Layout<kND> L = make_layout<kND>(ext, halo, o, gs);
    return unitarity_violation<real_t, kN, kND>(static_cast<const real_t*>(U), nbatch, L);
}

// Whole sweeps of a periodic 4D float64 field without halos (L0, L1, L2 multiples of 4, L3
// even): sweep 0 is a heat-bath sweep when first_hb, every other one overrelaxation; the
// sub-steps, draws and arithmetic of the per-sub-step entries above. Uin -> Uout (may
// alias). After each sweep the unitarity violation of the field (all links) is computed; when
// it exceeds tol the call stops there (the caller re-projects and continues). *done: sweeps
// done, *viol: violation after the last. Returns the number of links whose rejection did not
// finish (0 on success; then *done counts the failed sweep too). Returns -1 if unsupported.
long long hpcflow_hb_sweeps_vn(const void* Uin, void* Uout, long long nbatch, const int* ext,
                               int n_sweeps, int first_hb, double beta, unsigned int k0,
                               unsigned int k1, unsigned int step, long long blocks_per_config,
                               int max_rounds, double kp_alpha_min, double tol, int* done,
                               double* viol) {
    *done = 0;
    *viol = 0.0;
    if constexpr (kND != 4 || sizeof(real_t) != 8) {
        return -1;
    } else {
        for (int d = 0; d < 3; ++d)
            if (ext[d] % 4) return -1;
        if (ext[3] % 2) return -1;
        std::lock_guard<std::mutex> lock(g_vn_mutex);
        const VNGeom G = make_vn(ext);
        double* S = vn_scratch((size_t)nbatch * 4 * G.vol8 * kVNReals);
        if (!S) return -1;
        vn_transpose<kN>(S, const_cast<double*>(static_cast<const double*>(Uin)), nbatch, G, ext,
                         true);
        HBParams P{{k0, k1}, step, beta, blocks_per_config, max_rounds, kp_alpha_min};
        long long failed = 0;
        for (int sw = 0; sw < n_sweeps; ++sw) {
            const bool hb = sw == 0 && first_hb;
            double v2 = 0.0;
            for (int mu = 0; mu < 4; ++mu)
                for (int p = 0; p < 2; ++p)
                    failed += hb ? vn_substep<false, kN>(S, nbatch, G, mu, p, P, &v2)
                                 : vn_substep<true, kN>(S, nbatch, G, mu, p, P, &v2);
            *done = sw + 1;
            *viol = std::sqrt(v2);
            if (failed || *viol > tol) break;
        }
#if defined(MADV_HUGEPAGE) && HPCFLOW_HB_VN_OUT_THP
        {  // a fresh output (torch.empty_like) is faulted in by the transpose: huge pages
            const uintptr_t huge = uintptr_t(1) << 21;
            const uintptr_t a = reinterpret_cast<uintptr_t>(Uout);
            const uintptr_t e = a + (uintptr_t)nbatch * 4 * G.V * 2 * kN * kN * sizeof(double);
            const uintptr_t a2 = (a + huge - 1) & ~(huge - 1), e2 = e & ~(huge - 1);
            if (e2 > a2) madvise(reinterpret_cast<void*>(a2), e2 - a2, MADV_HUGEPAGE);
        }
#endif
        vn_transpose<kN>(S, static_cast<double*>(Uout), nbatch, G, ext, false);
        return failed;
    }
}

}  // extern "C"
