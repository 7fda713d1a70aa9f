// md_host.cpp -- host (g++/OpenMP) kernels of the HMC molecular dynamics and of the Wilson
// (gradient) flow for SU(N)/U(1) gauge fields, the torch path of hpcflow/sampling/hmc.py and
// hpcflow/lattice/observables.py (wilson_flow) reproduced to rounding.
//
// Build (done by hpcflow.kernels.md_host at first use, cached per source hash and flags):
//   g++ -O3 -march=native -fopenmp -std=c++17 -shared -fPIC
//       -DHPCFLOW_N=3 -DHPCFLOW_REAL=double -DHPCFLOW_ND=4 md_host.cpp -o lib.so
//
// Fields: U, P, A, X are C-contiguous complex arrays [b, mu, x_0 .. x_{ND-1}, i, j] (the
// project-wide layout, su_n.cuh) on halo-padded local arrays of extents ext[d] with halo
// widths halo[d]. Every kernel acts on interior links only (halo links are left as they
// are, exactly like torch.where(mask, ...) in hmc.py: they are refreshed by comm.exchange).
// The staple sum A comes from the existing staple kernels (host_simd.cpp / staple.cu).
//
// Exponentials (must agree with hpcflow.lattice.groups.*.exp to rounding):
//   N = 1: exp(X) = (cos Im X, sin Im X)                    (U1.exp: torch.polar)
//   N = 2: exp(X) = cos r 1 + (sin r / r) X, r^2 = s = (Im X_00)^2 + |X_01|^2, with the same
//          Taylor branch for s < 1e-6 as SU2.exp
//   N = 3: exact Cayley-Hamilton form exp(X) = f0 1 + f1 X + f2 X^2, the f_k summed from the
//          Taylor series with the recursion X^{k+1} = X X^k reduced by X^3 = t X^2 - e2 X + d
//          (t = tr X, e2 = (t^2 - tr X^2)/2, d = det X; valid for any 3x3 matrix), after
//          scaling X by 2^-s so that |X|_F <= 1 and followed by s squarings. Terms are summed
//          until |X|^k/k! < 2^-60 (double) / 2^-30 (float): ~1e-16 relative, like
//          torch.linalg.matrix_exp (degree-18 Taylor with scaling and squaring).
//
// Flop counts per link (real additions + multiplications, SU(3), complex mul = 6, add = 2):
//   3x3 complex product: 27 mul + 18 add = 27*6 + 18*2 = 198
//   momentum update  P -= eps k TA(U A):  U A 198 + TA 48 + scale/subtract 36        ->  282
//   link update      U <- exp(eps P) U:   eps P 18 + Y^2 198 + invariants (t, tr Y^2,
//                                         e2, det) 90 + series 36 per term (~12 terms at
//                                         |eps P|_F ~ 0.15: 432) + f0 + f1 Y + f2 Y^2 132
//                                         + exp U 198                               -> ~1070
//   kinetic energy   0.5 sum |P_ij|^2:    36
//   staple sum (host_simd.cpp, not here): 2574
//   flow stage: U A + TA + X combination ~290 + exp and product ~1050               -> ~1340
// Per site and Omelyan trajectory (4D, n steps: 2n+1 forces, 2n link updates, 2 actions):
//   (2n+1) * 4 * (2574 + 282) + 2n * 4 * 1070 + 2 * (6 * 630 + 4 * 36)
//   = 333,000 flops for n = 10 (momenta draws, accept and unitarity check not counted).
// Measured (SU(3) float64, Omelyan 10 steps, tau = 1, whole HMC.trajectory incl. the momenta
// drawn here, alternating old/new in one process; GEMM = torch.matmul 1024^2 float64 in the
// same run): 1 thread 8^4 17.0 us/site (19.7 GFLOP/s, 22% of GEMM), 16^4 19.5 us/site (18%);
// 2 threads 8^4 9.5 (18%), 16^4 9.8 (18%); before: 21.2 / 30.7 (1 thread), 12.5 / 15.8 (2).
// Limits: the staple kernel (host_simd.cpp, ~50%: 21 per trajectory), the link update (~25%,
// SIMD across sites for SU(3)), the momentum update (~10%, memory), the momenta (~4%).
// The link update (and the flow's exp) for SU(3) runs W = 64 bytes of lanes across sites
// (vexp/vmul below), with the series for traceless anti-Hermitian Y (t = 0, e2 real, d
// imaginary: 18 flops a term); the momentum update stays scalar (a SIMD variant was slower:
// memory) and returns sum Re tr(U A) on request (the Wilson action of the HMC energies);
// fusing it with the following link update measured slower (0.31 vs 0.29 us/site, 8^4).
#include "host_harness.h"

#include "su_n.cuh"
#include "philox.h"

#include <cmath>
#include <cstring>

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
constexpr int N = HPCFLOW_N;
constexpr int ND = HPCFLOW_ND;
constexpr int NN = N * N;
using Mat = hpcflow::Mat<real_t, N>;

// ---- geometry: interior links of the padded array ---------------------------------------
struct Interior {
    long long nsites;        // sites of the padded array
    long long nint;          // interior sites
    int lo[ND], len[ND];     // interior start and length per dimension
    long long stride[ND];    // site stride of dimension d (x_0 slowest)
};

Interior make_interior(const int* ext, const int* halo) {
    Interior g;
    long long s = 1, n = 1;
    for (int d = ND - 1; d >= 0; --d) {
        g.stride[d] = s;
        s *= ext[d];
        g.lo[d] = halo[d];
        g.len[d] = ext[d] - 2 * halo[d];
        n *= g.len[d];
    }
    g.nsites = s;
    g.nint = n;
    return g;
}

// padded site index of the i-th interior site (x_{ND-1} fastest)
inline long long interior_site(const Interior& g, long long i) {
    long long site = 0;
    for (int d = ND - 1; d >= 0; --d) {
        const long long q = i / g.len[d];
        site += (g.lo[d] + (i - q * g.len[d])) * g.stride[d];
        i = q;
    }
    return site;
}

// ---- small algebra ------------------------------------------------------------------------
// TA(M) = (M - M^dag)/2 - tr(M - M^dag)/(2N) 1 (for N = 1: (M - M^dag)/2), as in groups.py
inline Mat traceless_antihermitian(const Mat& m) {
    Mat a;
HPCFLOW_UNROLL
    for (int i = 0; i < N; ++i)
HPCFLOW_UNROLL
        for (int j = 0; j < N; ++j) {
            const cplx_t x = m.m[i * N + j], y = m.m[j * N + i];
            a.m[i * N + j] = {real_t(0.5) * (x.re - y.re), real_t(0.5) * (x.im + y.im)};
        }
#if HPCFLOW_N > 1
    {
        real_t tr_re = 0, tr_im = 0;
HPCFLOW_UNROLL
        for (int i = 0; i < N; ++i) {
            tr_re += a.m[i * N + i].re;
            tr_im += a.m[i * N + i].im;
        }
        tr_re /= real_t(N);
        tr_im /= real_t(N);
HPCFLOW_UNROLL
        for (int i = 0; i < N; ++i) {
            a.m[i * N + i].re -= tr_re;
            a.m[i * N + i].im -= tr_im;
        }
    }
#endif
    return a;
}

inline cplx_t cmul(cplx_t a, cplx_t b) {
    return {a.re * b.re - a.im * b.im, a.re * b.im + a.im * b.re};
}
inline cplx_t cadd(cplx_t a, cplx_t b) { return {a.re + b.re, a.im + b.im}; }
inline cplx_t csub(cplx_t a, cplx_t b) { return {a.re - b.re, a.im - b.im}; }

// exp(X) for the group of this build (see the header).
inline Mat group_exp(const Mat& x) {
    Mat e;
#if HPCFLOW_N == 1
    {
        const real_t th = x.m[0].im;
        e.m[0] = {std::cos(th), std::sin(th)};
    }
#elif HPCFLOW_N == 2
    {
        const real_t a = x.m[0].im, br = x.m[1].re, bi = x.m[1].im;
        const real_t ab = std::hypot(br, bi);  // torch: x[..., 0, 1].abs() ** 2
        const real_t s = a * a + ab * ab;
        real_t c, sc;
        if (s < real_t(1e-6)) {
            c = 1 - s / 2 + s * s / 24 - s * s * s / 720;
            sc = 1 - s / 6 + s * s / 120 - s * s * s / 5040;
        } else {
            const real_t r = std::sqrt(s);
            c = std::cos(r);
            sc = std::sin(r) / r;
        }
HPCFLOW_UNROLL
        for (int k = 0; k < 4; ++k) e.m[k] = {sc * x.m[k].re, sc * x.m[k].im};
        e.m[0].re += c;
        e.m[3].re += c;
    }
#elif HPCFLOW_N == 3
    {
        // scaling: |X|_F <= 1 after X <- 2^-s X (exact)
        real_t nrm2 = 0;
HPCFLOW_UNROLL
        for (int k = 0; k < 9; ++k) nrm2 += x.m[k].re * x.m[k].re + x.m[k].im * x.m[k].im;
        int s = 0;
        Mat y = x;
        if (nrm2 > real_t(1)) {
            s = (int)std::ceil(0.5 * std::log2((double)nrm2));
            const real_t f = std::ldexp(real_t(1), -s);
HPCFLOW_UNROLL
            for (int k = 0; k < 9; ++k) y.m[k] = {f * y.m[k].re, f * y.m[k].im};
            nrm2 *= f * f;
        }
        const Mat y2 = hpcflow::mul_nn(y, y);
        // invariants: t = tr Y, tr Y^2, d = det Y, e2 = (t^2 - tr Y^2)/2
        const cplx_t t = cadd(cadd(y.m[0], y.m[4]), y.m[8]);
        const cplx_t t2 = cadd(cadd(y2.m[0], y2.m[4]), y2.m[8]);
        const cplx_t tt = cmul(t, t);
        const cplx_t e2 = {real_t(0.5) * (tt.re - t2.re), real_t(0.5) * (tt.im - t2.im)};
        const cplx_t m0 = csub(cmul(y.m[4], y.m[8]), cmul(y.m[5], y.m[7]));
        const cplx_t m1 = csub(cmul(y.m[3], y.m[8]), cmul(y.m[5], y.m[6]));
        const cplx_t m2 = csub(cmul(y.m[3], y.m[7]), cmul(y.m[4], y.m[6]));
        const cplx_t d = cadd(csub(cmul(y.m[0], m0), cmul(y.m[1], m1)), cmul(y.m[2], m2));
        // Taylor series in the basis (1, Y, Y^2): Y^k/k! = al 1 + be Y + ga Y^2
        cplx_t al = {1, 0}, be = {0, 0}, ga = {0, 0};
        cplx_t f0 = al, f1 = be, f2 = ga;
        const real_t tol = sizeof(real_t) == 8 ? real_t(8.7e-19) : real_t(9.3e-10);
        const real_t rho = std::sqrt(nrm2);
        real_t bound = 1;
        for (int k = 1; k < 40; ++k) {
            const real_t inv = real_t(1) / real_t(k);
            // Y^{k} = Y Y^{k-1}: al' = ga d, be' = al - ga e2, ga' = be + ga t
            const cplx_t na = cmul(ga, d);
            const cplx_t nb = csub(al, cmul(ga, e2));
            const cplx_t nc = cadd(be, cmul(ga, t));
            al = {na.re * inv, na.im * inv};
            be = {nb.re * inv, nb.im * inv};
            ga = {nc.re * inv, nc.im * inv};
            f0 = cadd(f0, al);
            f1 = cadd(f1, be);
            f2 = cadd(f2, ga);
            bound *= rho * inv;
            if (bound < tol) break;
        }
HPCFLOW_UNROLL
        for (int k = 0; k < 9; ++k) e.m[k] = cadd(cmul(f1, y.m[k]), cmul(f2, y2.m[k]));
        e.m[0] = cadd(e.m[0], f0);
        e.m[4] = cadd(e.m[4], f0);
        e.m[8] = cadd(e.m[8], f0);
        for (int k = 0; k < s; ++k) e = hpcflow::mul_nn(e, e);
    }
#else
#error "HPCFLOW_N must be 1, 2 or 3"
#endif
    return e;
}

inline Mat scaled(const Mat& a, real_t c) {
    Mat r;
HPCFLOW_UNROLL
    for (int k = 0; k < NN; ++k) r.m[k] = {c * a.m[k].re, c * a.m[k].im};
    return r;
}

#if HPCFLOW_N == 3
// ---- SU(3) exponential with SIMD lanes across links ------------------------------------------
// W links at once in structure-of-arrays form (re[k][lane], im[k][lane]); every loop over
// lanes is a `#pragma omp simd` loop, so -O3 -march=native maps lanes onto vector registers.
// Same algorithm as group_exp: scale to |Y|_F <= 1, Cayley-Hamilton/Taylor coefficients,
// f0 + f1 Y + f2 Y^2, squarings (lane-masked), then exp(Y) U.
constexpr int W = 64 / (int)sizeof(real_t);  // 8 doubles / 16 floats: one AVX-512 vector

struct VM {
    alignas(64) real_t re[9][W];
    alignas(64) real_t im[9][W];
};

#define HPCFLOW_LANES _Pragma("omp simd") for (int l = 0; l < W; ++l)

inline void vmul(const VM& a, const VM& b, VM& c) {
    for (int i = 0; i < 3; ++i)
        for (int j = 0; j < 3; ++j) {
            HPCFLOW_LANES {
                real_t r = 0, m = 0;
                for (int k = 0; k < 3; ++k) {
                    const real_t xr = a.re[i * 3 + k][l], xi = a.im[i * 3 + k][l];
                    const real_t yr = b.re[k * 3 + j][l], yi = b.im[k * 3 + j][l];
                    r += xr * yr - xi * yi;
                    m += xr * yi + xi * yr;
                }
                c.re[i * 3 + j][l] = r;
                c.im[i * 3 + j][l] = m;
            }
        }
}

// E = exp(Y) for the W lanes of y (overwritten by the scaled Y); E into e.
inline void vexp(VM& y, VM& e) {
    alignas(64) real_t rho[W];
    alignas(64) int sc[W];
    HPCFLOW_LANES {
        real_t n2 = 0;
        for (int k = 0; k < 9; ++k) n2 += y.re[k][l] * y.re[k][l] + y.im[k][l] * y.im[k][l];
        rho[l] = n2;
    }
    int smax = 0;
    for (int l = 0; l < W; ++l) {
        sc[l] = 0;
        if (rho[l] > real_t(1)) {
            sc[l] = (int)std::ceil(0.5 * std::log2((double)rho[l]));
            const real_t f = std::ldexp(real_t(1), -sc[l]);
            for (int k = 0; k < 9; ++k) {
                y.re[k][l] *= f;
                y.im[k][l] *= f;
            }
            rho[l] *= f * f;
            smax = sc[l] > smax ? sc[l] : smax;
        }
    }
    real_t rmax2 = 0;
    for (int l = 0; l < W; ++l) rmax2 = rho[l] > rmax2 ? rho[l] : rmax2;
    const real_t rmax = std::sqrt(rmax2);
    const real_t tol = sizeof(real_t) == 8 ? real_t(8.7e-19) : real_t(9.3e-10);
    int kmax = 1;
    {
        real_t bound = 1;
        for (; kmax < 40; ++kmax) {
            bound *= rmax / real_t(kmax);
            if (bound < tol) break;
        }
    }
    VM y2;
    vmul(y, y, y2);
    alignas(64) real_t tr[W], ti[W], e2r[W], e2i[W], dr[W], di[W];
    HPCFLOW_LANES {
        const cplx_t t = {y.re[0][l] + y.re[4][l] + y.re[8][l], y.im[0][l] + y.im[4][l] + y.im[8][l]};
        const cplx_t t2 = {y2.re[0][l] + y2.re[4][l] + y2.re[8][l],
                           y2.im[0][l] + y2.im[4][l] + y2.im[8][l]};
        const cplx_t tt = cmul(t, t);
        cplx_t m[9];
        for (int k = 0; k < 9; ++k) m[k] = {y.re[k][l], y.im[k][l]};
        const cplx_t m0 = csub(cmul(m[4], m[8]), cmul(m[5], m[7]));
        const cplx_t m1 = csub(cmul(m[3], m[8]), cmul(m[5], m[6]));
        const cplx_t m2 = csub(cmul(m[3], m[7]), cmul(m[4], m[6]));
        const cplx_t d = cadd(csub(cmul(m[0], m0), cmul(m[1], m1)), cmul(m[2], m2));
        tr[l] = t.re;
        ti[l] = t.im;
        e2r[l] = real_t(0.5) * (tt.re - t2.re);
        e2i[l] = real_t(0.5) * (tt.im - t2.im);
        dr[l] = d.re;
        di[l] = d.im;
    }
    alignas(64) real_t ar[W], ai[W], br[W], bi[W], gr[W], gi[W];
    alignas(64) real_t f0r[W], f0i[W], f1r[W], f1i[W], f2r[W], f2i[W];
    HPCFLOW_LANES {
        ar[l] = 1; ai[l] = 0; br[l] = 0; bi[l] = 0; gr[l] = 0; gi[l] = 0;
        f0r[l] = 1; f0i[l] = 0; f1r[l] = 0; f1i[l] = 0; f2r[l] = 0; f2i[l] = 0;
    }
    {
        // Y anti-Hermitian and traceless (eps P, X of the flow): t = 0, e2 = -tr(Y^2)/2 real,
        // d = det Y imaginary; their other parts are rounding (~1e-17 |Y|), dropped.
        // al' = ga d = i dI ga, be' = al - ga e2, ga' = be (all / k): 18 flops a term, not 36
        for (int k = 1; k <= kmax; ++k) {
            const real_t inv = real_t(1) / real_t(k);
            HPCFLOW_LANES {
                const real_t nar = -gi[l] * di[l], nai = gr[l] * di[l];
                const real_t nbr = ar[l] - gr[l] * e2r[l], nbi = ai[l] - gi[l] * e2r[l];
                const real_t ncr = br[l], nci = bi[l];
                ar[l] = nar * inv; ai[l] = nai * inv;
                br[l] = nbr * inv; bi[l] = nbi * inv;
                gr[l] = ncr * inv; gi[l] = nci * inv;
                f0r[l] += ar[l]; f0i[l] += ai[l];
                f1r[l] += br[l]; f1i[l] += bi[l];
                f2r[l] += gr[l]; f2i[l] += gi[l];
            }
        }
    }
    for (int k = 0; k < 9; ++k) {
        const bool diag = k == 0 || k == 4 || k == 8;
        HPCFLOW_LANES {
            real_t r = f1r[l] * y.re[k][l] - f1i[l] * y.im[k][l] + f2r[l] * y2.re[k][l] -
                       f2i[l] * y2.im[k][l];
            real_t m = f1r[l] * y.im[k][l] + f1i[l] * y.re[k][l] + f2r[l] * y2.im[k][l] +
                       f2i[l] * y2.re[k][l];
            if (diag) {
                r += f0r[l];
                m += f0i[l];
            }
            e.re[k][l] = r;
            e.im[k][l] = m;
        }
    }
    for (int q = 0; q < smax; ++q) {  // squarings, only lanes with q < sc
        VM sq;
        vmul(e, e, sq);
        for (int l = 0; l < W; ++l)
            if (q < sc[l])
                for (int k = 0; k < 9; ++k) {
                    e.re[k][l] = sq.re[k][l];
                    e.im[k][l] = sq.im[k][l];
                }
    }
}
#undef HPCFLOW_LANES
#endif

inline long long link_offset(const Interior& g, long long b, int mu, long long site) {
    return (((b * ND + mu) * g.nsites) + site) * NN;
}

}  // namespace

extern "C" {

// Configuration this library was built for, so the loader can check it.
void hpcflow_md_config(int* n, int* nd, int* real_bytes) {
    *n = HPCFLOW_N;
    *nd = HPCFLOW_ND;
    *real_bytes = (int)sizeof(real_t);
}

// (a) P <- P - eps * (k * TA(U A)) on interior links (hmc.py: _update_momenta(P, force, eps)
// with force = (beta/N) TA(U A), k = beta/N). Fused: no force tensor.
void hpcflow_md_update_momenta(const void* U_, const void* A_, void* P_, long long nbatch,
                               const int* ext, const int* halo, double k_, double eps_,
                               double* retr) {
    const Interior g = make_interior(ext, halo);
    const cplx_t* U = static_cast<const cplx_t*>(U_);
    const cplx_t* A = static_cast<const cplx_t*>(A_);
    cplx_t* P = static_cast<cplx_t*>(P_);
    const real_t k = (real_t)k_, eps = (real_t)eps_;
    // (a SIMD-across-sites variant of this loop measured slower: 108 vs 81 ns/site, SU(3)
    // 8^4, 1 thread; the update streams U, A and P and is bound by memory traffic)
    // retr != nullptr: retr[b] = sum_{interior x, mu} Re tr(U A) (= 4 sum_{x, mu<nu} Re tr
    // P_{mu nu}: every plaquette is in the staples of its 4 links), the Wilson action for free.
    for (long long b = 0; b < nbatch; ++b) {
        double acc = 0;
#pragma omp parallel for schedule(static) reduction(+ : acc)
        for (long long i = 0; i < g.nint; ++i) {
            const long long site = interior_site(g, i);
            double s = 0;
            for (int mu = 0; mu < ND; ++mu) {
                const long long o = link_offset(g, b, mu, site);
                const Mat u = hpcflow::load<real_t, N>(U + o), a = hpcflow::load<real_t, N>(A + o);
                const Mat ua = hpcflow::mul_nn(u, a);
HPCFLOW_UNROLL
                for (int q = 0; q < N; ++q) s += (double)ua.m[q * (N + 1)].re;
                const Mat f = traceless_antihermitian(ua);
                cplx_t* p = P + o;
HPCFLOW_UNROLL
                for (int q = 0; q < NN; ++q) {
                    p[q].re -= eps * (k * f.m[q].re);
                    p[q].im -= eps * (k * f.m[q].im);
                }
            }
            acc += s;
        }
        if (retr) retr[b] = acc;
    }
}

// (b) U <- exp(eps P) U on interior links (hmc.py: _update_links).
void hpcflow_md_update_links(void* U_, const void* P_, long long nbatch, const int* ext,
                             const int* halo, double eps_) {
    const Interior g = make_interior(ext, halo);
    cplx_t* U = static_cast<cplx_t*>(U_);
    const cplx_t* P = static_cast<const cplx_t*>(P_);
    const real_t eps = (real_t)eps_;
    const long long total = nbatch * g.nint;
#if HPCFLOW_N == 3
    // W interior sites per block, one direction at a time, lanes across sites
    const long long nblk = (total + W - 1) / W;
#pragma omp parallel for schedule(static)
    for (long long blk = 0; blk < nblk; ++blk) {
        long long off[W];
        int nl = 0;
        for (int l = 0; l < W; ++l) {
            const long long i = blk * W + l;
            if (i < total) {
                const long long b = i / g.nint;
                off[l] = link_offset(g, b, 0, interior_site(g, i - b * g.nint));
                nl = l + 1;
            } else {
                off[l] = -1;
            }
        }
        const long long mstride = g.nsites * NN;
        for (int mu = 0; mu < ND; ++mu) {
            VM y, e, u, r;
            for (int l = 0; l < W; ++l)
                for (int k = 0; k < 9; ++k) {
                    if (l < nl) {
                        const cplx_t p = P[off[l] + mu * mstride + k], v = U[off[l] + mu * mstride + k];
                        y.re[k][l] = eps * p.re;
                        y.im[k][l] = eps * p.im;
                        u.re[k][l] = v.re;
                        u.im[k][l] = v.im;
                    } else {
                        y.re[k][l] = y.im[k][l] = u.re[k][l] = u.im[k][l] = 0;
                    }
                }
            vexp(y, e);
            vmul(e, u, r);
            for (int l = 0; l < nl; ++l)
                for (int k = 0; k < 9; ++k) U[off[l] + mu * mstride + k] = {r.re[k][l], r.im[k][l]};
        }
    }
#else
#pragma omp parallel for schedule(static)
    for (long long i = 0; i < total; ++i) {
        const long long b = i / g.nint, site = interior_site(g, i - b * g.nint);
        for (int mu = 0; mu < ND; ++mu) {
            const long long o = link_offset(g, b, mu, site);
            const Mat e = group_exp(scaled(hpcflow::load<real_t, N>(P + o), eps));
            hpcflow::store<real_t, N>(U + o, hpcflow::mul_nn(e, hpcflow::load<real_t, N>(U + o)));
        }
    }
#endif
}

// exp(eps X) for a plain array of n matrices (tests of the exponential against matrix_exp).
void hpcflow_md_exp(const void* X_, void* out_, long long n, double eps_) {
    const cplx_t* X = static_cast<const cplx_t*>(X_);
    cplx_t* out = static_cast<cplx_t*>(out_);
    const real_t eps = (real_t)eps_;
#pragma omp parallel for schedule(static)
    for (long long i = 0; i < n; ++i)
        hpcflow::store<real_t, N>(out + i * NN,
                                  group_exp(scaled(hpcflow::load<real_t, N>(X + i * NN), eps)));
}

// (c) out[b] = 0.5 sum_{interior x, mu} tr(P^dag P), accumulated in double.
void hpcflow_md_kinetic_energy(const void* P_, double* out, long long nbatch, const int* ext,
                               const int* halo) {
    const Interior g = make_interior(ext, halo);
    const cplx_t* P = static_cast<const cplx_t*>(P_);
    for (long long b = 0; b < nbatch; ++b) {
        double acc = 0;
#pragma omp parallel for schedule(static) reduction(+ : acc)
        for (long long i = 0; i < g.nint; ++i) {
            const long long site = interior_site(g, i);
            double s = 0;
            for (int mu = 0; mu < ND; ++mu) {
                const cplx_t* p = P + link_offset(g, b, mu, site);
HPCFLOW_UNROLL
                for (int q = 0; q < NN; ++q)
                    s += (double)p[q].re * (double)p[q].re + (double)p[q].im * (double)p[q].im;
            }
            acc += s;
        }
        out[b] = 0.5 * acc;
    }
}

// Max over interior links of max_ij |U^dag U - 1|_ij and (N > 1) |det U - 1|
// (hmc.unitarity_violation), in double; out[0] = the max over the whole batch.
void hpcflow_md_unitarity_violation(const void* U_, double* out, long long nbatch,
                                    const int* ext, const int* halo) {
    const Interior g = make_interior(ext, halo);
    const cplx_t* U = static_cast<const cplx_t*>(U_);
    const long long total = nbatch * g.nint;
    double vmax = 0;
#pragma omp parallel for schedule(static) reduction(max : vmax)
    for (long long i = 0; i < total; ++i) {
        const long long b = i / g.nint, site = interior_site(g, i - b * g.nint);
        for (int mu = 0; mu < ND; ++mu) {
            const Mat u = hpcflow::load<real_t, N>(U + link_offset(g, b, mu, site));
            const Mat h = hpcflow::mul_dn(u, u);
            double v = 0;
HPCFLOW_UNROLL
            for (int k = 0; k < NN; ++k) {
                const real_t re = h.m[k].re - (k % (N + 1) == 0 ? real_t(1) : real_t(0));
                const double a = (double)std::hypot(re, h.m[k].im);
                v = a > v ? a : v;
            }
#if HPCFLOW_N == 2
            const cplx_t det = csub(cmul(u.m[0], u.m[3]), cmul(u.m[1], u.m[2]));
#elif HPCFLOW_N == 3
            const cplx_t m0 = csub(cmul(u.m[4], u.m[8]), cmul(u.m[5], u.m[7]));
            const cplx_t m1 = csub(cmul(u.m[3], u.m[8]), cmul(u.m[5], u.m[6]));
            const cplx_t m2 = csub(cmul(u.m[3], u.m[7]), cmul(u.m[4], u.m[6]));
            const cplx_t det = cadd(csub(cmul(u.m[0], m0), cmul(u.m[1], m1)), cmul(u.m[2], m2));
#endif
#if HPCFLOW_N > 1
            const double a = (double)std::hypot(det.re - real_t(1), det.im);
            v = a > v ? a : v;
#endif
            vmax = v > vmax ? v : vmax;
        }
    }
    out[0] = vmax;
}

// (d) One Luscher RK3 stage of the Wilson flow (observables.wilson_flow) on interior links:
//   Z = eps * (-TA(U A))        (eps * wilson_flow_force)
//   X <- a Z + c X               (c = 0: X <- a Z, X not read)
//   U <- exp(X) U
// Stages (a, c) = (1/4, 0), (8/9, -17/9), (3/4, -1) give the exponents 1/4 Z0,
// 8/9 Z1 - 17/36 Z0 and 3/4 Z2 - 8/9 Z1 + 17/36 Z0 of arXiv 1006.4518, eq. (C.1)-(C.3).
void hpcflow_md_flow_stage(void* U_, const void* A_, void* X_, long long nbatch, const int* ext,
                           const int* halo, double eps_, double a_, double c_) {
    const Interior g = make_interior(ext, halo);
    cplx_t* U = static_cast<cplx_t*>(U_);
    const cplx_t* A = static_cast<const cplx_t*>(A_);
    cplx_t* X = static_cast<cplx_t*>(X_);
    const real_t eps = (real_t)eps_, a = (real_t)a_, c = (real_t)c_;
    const bool keep = c_ != 0.0;
    const long long total = nbatch * g.nint;
#pragma omp parallel for schedule(static)
    for (long long i = 0; i < total; ++i) {
        const long long b = i / g.nint, site = interior_site(g, i - b * g.nint);
        for (int mu = 0; mu < ND; ++mu) {
            const long long o = link_offset(g, b, mu, site);
            const Mat u = hpcflow::load<real_t, N>(U + o);
            const Mat f = traceless_antihermitian(hpcflow::mul_nn(u, hpcflow::load<real_t, N>(A + o)));
            Mat x;
HPCFLOW_UNROLL
            for (int q = 0; q < NN; ++q) {
                // z = eps * (-f); x = a z + c x
                const real_t zr = eps * (-f.m[q].re), zi = eps * (-f.m[q].im);
                x.m[q] = {a * zr, a * zi};
                if (keep) {
                    x.m[q].re += c * X[o + q].re;
                    x.m[q].im += c * X[o + q].im;
                }
            }
            hpcflow::store<real_t, N>(X + o, x);
#if HPCFLOW_N != 3
            hpcflow::store<real_t, N>(U + o, hpcflow::mul_nn(group_exp(x), u));
#endif
        }
    }
#if HPCFLOW_N == 3
    // U <- exp(X) U with the SIMD exponential (eps = 1: exact)
    hpcflow_md_update_links(U_, X_, nbatch, ext, halo, 1.0);
#endif
}

// (e) The HMC momenta of hmc.sample_momenta on interior links: for link (b, mu, x) with x
// at global coordinates (origin + interior coordinate) mod gshape, the n_alg normals
// rng.normal(b nd V + mu V + site(x), step, n_alg) (philox.h, key = rng.key_site, in the
// real type of the build like _real_dtype(dtype)), scaled by `scale` and mapped to
// X = i sum_a (scale w_a) T_a (group.algebra_from_coords) with the generators T (n_alg
// complex N x N matrices, row-major (re, im) doubles). Halo links are not written. If
// ke != nullptr, ke[b] = 0.5 sum_{interior} tr(P^dag P) (as hpcflow_md_kinetic_energy).
void hpcflow_md_sample_momenta(void* P_, long long nbatch, const int* ext, const int* halo,
                               const int* origin, const int* gshape, unsigned k0, unsigned k1,
                               long long step, double scale_, const double* gen, int n_alg,
                               double* ke) {
    const Interior g = make_interior(ext, halo);
    cplx_t* P = static_cast<cplx_t*>(P_);
    const hpcflow_rng::Key key{(uint32_t)k0, (uint32_t)k1};
    const real_t scale = (real_t)scale_;
    long long vol = 1;
    for (int d = 0; d < ND; ++d) vol *= gshape[d];
    // the nonzero generator entries per matrix element, in the order of a
    constexpr int MAXA = NN > 1 ? NN - 1 : 1;
    int cnt[NN];
    int ga[NN][MAXA];
    real_t gr[NN][MAXA], gi[NN][MAXA];
    for (int q = 0; q < NN; ++q) {
        cnt[q] = 0;
        for (int a = 0; a < n_alg && a < MAXA; ++a) {
            const double re = gen[2 * (a * NN + q)], im = gen[2 * (a * NN + q) + 1];
            if (re != 0.0 || im != 0.0) {
                ga[q][cnt[q]] = a;
                gr[q][cnt[q]] = (real_t)re;
                gi[q][cnt[q]] = (real_t)im;
                ++cnt[q];
            }
        }
    }
    for (long long b = 0; b < nbatch; ++b) {
        double acc = 0;
#pragma omp parallel for schedule(static) reduction(+ : acc)
        for (long long i = 0; i < g.nint; ++i) {
            // interior coordinates (x_{ND-1} fastest) -> padded site and global site index
            long long rem = i, site = 0, gsite = 0, gstride = 1;
            for (int d = ND - 1; d >= 0; --d) {
                const long long q = rem / g.len[d];
                const int c = (int)(rem - q * g.len[d]);
                rem = q;
                site += (g.lo[d] + c) * g.stride[d];
                long long x = ((long long)origin[d] + c) % gshape[d];
                if (x < 0) x += gshape[d];
                gsite += x * gstride;
                gstride *= gshape[d];
            }
            double s = 0;
            for (int mu = 0; mu < ND; ++mu) {
                const unsigned long long idx =
                    (unsigned long long)(b * ND + mu) * (unsigned long long)vol + (unsigned long long)gsite;
                real_t w[MAXA + 1];
                hpcflow_rng::normals(key, idx, (uint32_t)step, n_alg, w);
                for (int a = 0; a < n_alg; ++a) w[a] = scale * w[a];
                cplx_t* p = P + link_offset(g, b, mu, site);
HPCFLOW_UNROLL
                for (int q = 0; q < NN; ++q) {
                    // X = i (sum_a w_a T_a): re = -sum w Im T, im = sum w Re T
                    real_t sr = 0, si = 0;
                    for (int j = 0; j < cnt[q]; ++j) {
                        const real_t wa = w[ga[q][j]];
                        sr += wa * gr[q][j];
                        si += wa * gi[q][j];
                    }
                    p[q] = {-si, sr};
                    s += (double)si * (double)si + (double)sr * (double)sr;
                }
            }
            acc += s;
        }
        if (ke) ke[b] = 0.5 * acc;
    }
}

}  // extern "C"
