// flow_sun.cpp -- fused host kernels of the 4D SU(3) spectral coupling layer (hpcflow/flows/sun.py).
//
// One coupling layer (mu, nu, off) is three kernels, each with its analytic backward:
//   features  Re/Im tr P, Re/Im tr P^2 of the frozen plaquettes of all six planes;
//   context   the CNN's circular 4D convolutions (leaky ReLU between them), each evaluated
//             only on the sites the next one reads (the last one on the active sites);
//   spectral  P = U_mu(x) M (M = U_nu(x+mu) U_mu(x+nu)^dag U_nu(x)^dag) at the active sites,
//             its eigen-decomposition, the NCP maps of the Weyl-alcove coordinates, the new
//             loop P' = V diag(e^{i theta'}) V^dag, the link U_mu(x) <- P' M^dag (= P' P^dag U_mu
//             on SU(3)) and the log-det (with the Weyl factor).
// For inference (log q of a given field) the spectral map also has an inverse, spec_inv (the
// NCP maps inverted by bracketed Newton on the forward's formulas; no backward); the features
// and the context are the forward's, since the layer leaves its frozen loops unchanged.
//
// Layout ("lanes"): the batch is the innermost axis, W = 64 / sizeof(T) entries (8 doubles,
// 16 floats) per vector, so every per-site formula runs on one SIMD vector of batch entries
// with no shuffles:
//   links     U[chunk][mu][site][18][W]   18 = 3 x 3 complex, (re, im) interleaved, row-major
//   features  F[chunk][site][24][W]       channel 4 k + (Re tr P, Im tr P, Re tr P^2, Im tr P^2)
//   CNN       A[chunk][n][C][W]           n = the sites a convolution is evaluated on (a list)
// chunk = batch entries [chunk W, chunk W + W); the caller pads the batch with copies of a
// valid field (their outputs are discarded and their gradients are zero).
//
// Eigen-decomposition (same algorithm as the torch path, sun._su3_eigh): the Cayley transform
// H = i (1 - W)(1 + W)^{-1} of W = e^{i alpha} P is Hermitian with eigenvalues tan(psi/2),
// psi = the eigen-angles of W; alpha is the one of 12 rotations k pi/6 that maximises
// |det(1 + W)| = |2 cos(3 alpha/2) + 2 Re(tr P e^{-i alpha/2})| (a function of tr P only):
// one candidate lies >= pi/4 inside the widest gap (>= 2 pi/3), so |det(1 + W)| >= 0.45 and
// every |1 + e^{i psi}| >= 0.11, cond(1 + W) <= 18 (the torch path's exact widest-gap choice
// gives <= 2; both lose at most ~1 digit). H is diagonalised by cyclic complex Jacobi rotations
// until its off-diagonal norm is below 0.1 eps (1 + |H|) in every lane (at most 10 sweeps;
// 3-5 typically: the convergence is quadratic); Jacobi stays accurate at (near-)degenerate
// spectra.
//
// Backward of the spectral map (derivation in docs/DESIGN.md, "Flows"): for a tangent
// perturbation dP = i X P, Y = V^dag X V, the eigen-angles move by Y_kk, the new loop by
//   (V^dag dP' V)_jk = i Y_jk lambda_k R_jk (j != k),  R_jk = (mu_k - mu_j)/(lambda_k - lambda_j)
// and i mu_k dtheta'_k on the diagonal. R_jk = e^{i(theta'_j + theta'_k - theta_j - theta_k)/2}
// sin(g'/2)/sin(g/2) with g the alcove gap (a, b or c) of the pair: bounded at degenerate
// spectra (limit dg'/dg), unlike the 1/(t_j - t_k) of an eigh backward. The gradient handed
// back is the one of the tangent directions (G_P = i V conj(Z) V^dag P); a flow's parameter
// gradients only ever contract it with tangent vectors, so they are exact.
//
// Vector math (atan, tan, sin, cos, exp, log, log1p) is applied lane by lane in `omp simd`
// loops; glibc's <math.h> declares its vector variants (libmvec) only under __FAST_MATH__, so
// the macro is set around the include (and only there: the file is compiled without
// -ffast-math). Where glibc has no vector variant of a function the loop stays scalar.
//
// Build: g++ -O3 -march=native -fopenmp -std=c++17 -shared -fPIC flow_sun.cpp (done by
// hpcflow.kernels.flow_sun at first use, cached like the other host libraries). The thread
// count is an argument (torch's intra-op thread count).
#ifndef __FAST_MATH__
#define HPCFLOW_UNDEF_FAST_MATH
#define __FAST_MATH__ 1
#endif
#include <math.h>
#ifdef HPCFLOW_UNDEF_FAST_MATH
#undef __FAST_MATH__
#undef HPCFLOW_UNDEF_FAST_MATH
#endif
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#include "philox.h"

namespace {

template <typename T>
struct VT {
    static constexpr int W = 64 / sizeof(T);
    typedef T v __attribute__((vector_size(64)));
    typedef int64_t mi __attribute__((vector_size(8 * (64 / sizeof(T)))));
};
template <>
struct VT<float> {
    static constexpr int W = 16;
    typedef float v __attribute__((vector_size(64)));
    typedef int32_t mi __attribute__((vector_size(64)));
};

constexpr double kPi = 3.14159265358979323846264338327950288;
constexpr double kTwoPi = 6.28318530717958647692528676655900577;

template <typename V>
inline V vload(const void* p) {
    V r;
    std::memcpy(&r, p, sizeof(V));
    return r;
}
template <typename V>
inline void vstore(void* p, const V& a) {
    std::memcpy(p, &a, sizeof(V));
}
template <typename V, typename S>
inline V splat(S s) {
    return V{} + s;
}

// lane-wise libm (vectorised by libmvec where glibc provides it)
#define HPCFLOW_VMATH(NAME, FN)                                                      \
    template <typename V>                                                            \
    inline V NAME(V x) {                                                             \
        constexpr int W = sizeof(V) / sizeof(x[0]);                                  \
        typedef typename std::remove_reference<decltype(x[0])>::type S;              \
        S in[W], out[W];                                                             \
        std::memcpy(in, &x, sizeof(V));                                              \
        _Pragma("omp simd") for (int l = 0; l < W; ++l) out[l] = std::FN(in[l]);     \
        V r;                                                                         \
        std::memcpy(&r, out, sizeof(V));                                             \
        return r;                                                                    \
    }
HPCFLOW_VMATH(vsin, sin)
HPCFLOW_VMATH(vcos, cos)
HPCFLOW_VMATH(vtan, tan)
HPCFLOW_VMATH(vatan, atan)
HPCFLOW_VMATH(vexp, exp)
HPCFLOW_VMATH(vlog, log)
HPCFLOW_VMATH(vlog1p, log1p)
HPCFLOW_VMATH(vtanh, tanh)
HPCFLOW_VMATH(vsqrt, sqrt)
HPCFLOW_VMATH(vfloor, floor)
HPCFLOW_VMATH(vround, round)
#undef HPCFLOW_VMATH
template <typename V>
inline V vatan2(V y, V x) {
    constexpr int W = sizeof(V) / sizeof(x[0]);
    typedef typename std::remove_reference<decltype(x[0])>::type S;
    S a[W], b[W], out[W];
    std::memcpy(a, &y, sizeof(V));
    std::memcpy(b, &x, sizeof(V));
    _Pragma("omp simd") for (int l = 0; l < W; ++l) out[l] = std::atan2(a[l], b[l]);
    V r;
    std::memcpy(&r, out, sizeof(V));
    return r;
}

// ---- complex 3 x 3 matrices of lane vectors --------------------------------------------------
template <typename V>
struct Cx {
    V r, i;
};
template <typename V>
struct M3 {
    Cx<V> m[9];
};

template <typename V>
inline Cx<V> cmul(const Cx<V>& a, const Cx<V>& b) {
    return {a.r * b.r - a.i * b.i, a.r * b.i + a.i * b.r};
}
template <typename V>
inline Cx<V> cmulc(const Cx<V>& a, const Cx<V>& b) {  // a conj(b)
    return {a.r * b.r + a.i * b.i, a.i * b.r - a.r * b.i};
}
template <typename V>
inline Cx<V> cadd(const Cx<V>& a, const Cx<V>& b) {
    return {a.r + b.r, a.i + b.i};
}
template <typename V>
inline Cx<V> csub(const Cx<V>& a, const Cx<V>& b) {
    return {a.r - b.r, a.i - b.i};
}

template <typename T, typename V>
inline M3<V> mload(const T* p) {  // p: 18 lane vectors (re, im interleaved)
    constexpr int W = VT<T>::W;
    M3<V> a;
    for (int k = 0; k < 9; ++k) {
        a.m[k].r = vload<V>(p + (2 * k) * W);
        a.m[k].i = vload<V>(p + (2 * k + 1) * W);
    }
    return a;
}
template <typename T, typename V>
inline void mstore(T* p, const M3<V>& a) {
    constexpr int W = VT<T>::W;
    for (int k = 0; k < 9; ++k) {
        vstore(p + (2 * k) * W, a.m[k].r);
        vstore(p + (2 * k + 1) * W, a.m[k].i);
    }
}
template <typename T, typename V>
inline void madd_to(T* p, const M3<V>& a) {
    constexpr int W = VT<T>::W;
    for (int k = 0; k < 9; ++k) {
        vstore(p + (2 * k) * W, vload<V>(p + (2 * k) * W) + a.m[k].r);
        vstore(p + (2 * k + 1) * W, vload<V>(p + (2 * k + 1) * W) + a.m[k].i);
    }
}

// a b, a b^dag, a^dag b, a^dag
template <typename V>
inline M3<V> mul_nn(const M3<V>& a, const M3<V>& b) {
    M3<V> c;
    for (int i = 0; i < 3; ++i)
        for (int j = 0; j < 3; ++j) {
            V re = a.m[3 * i].r * b.m[j].r - a.m[3 * i].i * b.m[j].i;
            V im = a.m[3 * i].r * b.m[j].i + a.m[3 * i].i * b.m[j].r;
            for (int k = 1; k < 3; ++k) {
                re += a.m[3 * i + k].r * b.m[3 * k + j].r - a.m[3 * i + k].i * b.m[3 * k + j].i;
                im += a.m[3 * i + k].r * b.m[3 * k + j].i + a.m[3 * i + k].i * b.m[3 * k + j].r;
            }
            c.m[3 * i + j] = {re, im};
        }
    return c;
}
template <typename V>
inline M3<V> mul_nd(const M3<V>& a, const M3<V>& b) {
    M3<V> c;
    for (int i = 0; i < 3; ++i)
        for (int j = 0; j < 3; ++j) {
            // sum_k a_ik conj(b_jk)
            V re = a.m[3 * i].r * b.m[3 * j].r + a.m[3 * i].i * b.m[3 * j].i;
            V im = a.m[3 * i].i * b.m[3 * j].r - a.m[3 * i].r * b.m[3 * j].i;
            for (int k = 1; k < 3; ++k) {
                re += a.m[3 * i + k].r * b.m[3 * j + k].r + a.m[3 * i + k].i * b.m[3 * j + k].i;
                im += a.m[3 * i + k].i * b.m[3 * j + k].r - a.m[3 * i + k].r * b.m[3 * j + k].i;
            }
            c.m[3 * i + j] = {re, im};
        }
    return c;
}
template <typename V>
inline M3<V> mul_dn(const M3<V>& a, const M3<V>& b) {
    M3<V> c;
    for (int i = 0; i < 3; ++i)
        for (int j = 0; j < 3; ++j) {
            // sum_k conj(a_ki) b_kj
            V re = a.m[i].r * b.m[j].r + a.m[i].i * b.m[j].i;
            V im = a.m[i].r * b.m[j].i - a.m[i].i * b.m[j].r;
            for (int k = 1; k < 3; ++k) {
                re += a.m[3 * k + i].r * b.m[3 * k + j].r + a.m[3 * k + i].i * b.m[3 * k + j].i;
                im += a.m[3 * k + i].r * b.m[3 * k + j].i - a.m[3 * k + i].i * b.m[3 * k + j].r;
            }
            c.m[3 * i + j] = {re, im};
        }
    return c;
}
template <typename V>
inline M3<V> dag(const M3<V>& a) {
    M3<V> c;
    for (int i = 0; i < 3; ++i)
        for (int j = 0; j < 3; ++j) c.m[3 * i + j] = {a.m[3 * j + i].r, -a.m[3 * j + i].i};
    return c;
}

// ---- geometry ------------------------------------------------------------------------------
struct Geo4 {
    int L[4];
    int64_t V;
    int64_t stride[4];
};
inline Geo4 make_geo(const int* L) {
    Geo4 g;
    for (int d = 0; d < 4; ++d) g.L[d] = L[d];
    g.stride[3] = 1;
    for (int d = 2; d >= 0; --d) g.stride[d] = g.stride[d + 1] * L[d + 1];
    g.V = g.stride[0] * L[0];
    return g;
}
inline void coords(const Geo4& g, int64_t s, int* x) {
    for (int d = 3; d >= 0; --d) {
        x[d] = (int)(s % g.L[d]);
        s /= g.L[d];
    }
}
// site s + step * e_d (periodic on the local array, like Lattice.shift / torch.roll)
inline int64_t hop(const Geo4& g, int64_t s, const int* x, int d, int step) {
    int y = x[d] + step;
    y = ((y % g.L[d]) + g.L[d]) % g.L[d];
    return s + (int64_t)(y - x[d]) * g.stride[d];
}

template <typename T>
inline const T* link_ptr(const T* U, int64_t V, int64_t chunk, int mu, int64_t s) {
    return U + (((chunk * 4 + mu) * V + s) * 18) * VT<T>::W;
}
template <typename T>
inline T* link_ptr(T* U, int64_t V, int64_t chunk, int mu, int64_t s) {
    return U + (((chunk * 4 + mu) * V + s) * 18) * VT<T>::W;
}

const int kPlanes[6][2] = {{0, 1}, {0, 2}, {0, 3}, {1, 2}, {1, 3}, {2, 3}};

// ================================================================================================
// features
// ================================================================================================
template <typename T>
void feat_fwd(const T* U, const uint8_t* frozen, const int* L, int64_t nchunk, T* F, int threads) {
    using V = typename VT<T>::v;
    constexpr int W = VT<T>::W;
    const Geo4 g = make_geo(L);
#pragma omp parallel for schedule(static) num_threads(threads) collapse(2)
    for (int64_t c = 0; c < nchunk; ++c)
        for (int64_t s = 0; s < g.V; ++s) {
            int x[4];
            coords(g, s, x);
            T* out = F + ((c * g.V + s) * 24) * W;
            for (int k = 0; k < 6; ++k) {
                if (!frozen[k * g.V + s]) {
                    for (int f = 0; f < 4; ++f) vstore(out + (4 * k + f) * W, V{});
                    continue;
                }
                const int a = kPlanes[k][0], b = kPlanes[k][1];
                const M3<V> A = mload<T, V>(link_ptr(U, g.V, c, a, s));
                const M3<V> B = mload<T, V>(link_ptr(U, g.V, c, b, hop(g, s, x, a, 1)));
                const M3<V> C = mload<T, V>(link_ptr(U, g.V, c, a, hop(g, s, x, b, 1)));
                const M3<V> D = mload<T, V>(link_ptr(U, g.V, c, b, s));
                const M3<V> P = mul_nd(mul_nd(mul_nn(A, B), C), D);
                V t1r = P.m[0].r + P.m[4].r + P.m[8].r, t1i = P.m[0].i + P.m[4].i + P.m[8].i;
                V t2r = V{}, t2i = V{};
                for (int i = 0; i < 3; ++i)
                    for (int j = 0; j < 3; ++j) {
                        const Cx<V> z = cmul(P.m[3 * i + j], P.m[3 * j + i]);
                        t2r += z.r;
                        t2i += z.i;
                    }
                vstore(out + (4 * k) * W, t1r);
                vstore(out + (4 * k + 1) * W, t1i);
                vstore(out + (4 * k + 2) * W, t2r);
                vstore(out + (4 * k + 3) * W, t2i);
            }
        }
}

// the four link gradients of the frozen plaquettes of site s (added to gU)
template <typename T>
inline void feat_bwd_site(const T* U, const T* gF, const uint8_t* frozen, const Geo4& g, int64_t c,
                          int64_t s, T* gU) {
    using V = typename VT<T>::v;
    constexpr int W = VT<T>::W;
    int x[4];
    coords(g, s, x);
    const T* gin = gF + ((c * g.V + s) * 24) * W;
    for (int k = 0; k < 6; ++k) {
        if (!frozen[k * g.V + s]) continue;
        const int a = kPlanes[k][0], b = kPlanes[k][1];
        const int64_t sa = hop(g, s, x, a, 1), sb = hop(g, s, x, b, 1);
        const M3<V> A = mload<T, V>(link_ptr(U, g.V, c, a, s));
        const M3<V> B = mload<T, V>(link_ptr(U, g.V, c, b, sa));
        const M3<V> C = mload<T, V>(link_ptr(U, g.V, c, a, sb));
        const M3<V> D = mload<T, V>(link_ptr(U, g.V, c, b, s));
        const V g0 = vload<V>(gin + (4 * k) * W), g1 = vload<V>(gin + (4 * k + 1) * W);
        const V g2 = vload<V>(gin + (4 * k + 2) * W), g3 = vload<V>(gin + (4 * k + 3) * W);
        const M3<V> AB = mul_nn(A, B);
        const M3<V> Q = mul_nd(AB, C);
        const M3<V> P = mul_nd(Q, D);
        // dL = Re tr(K dP), K = (g0 - i g1) 1 + 2 (g2 - i g3) P
        M3<V> K;
        const V c2r = T(2) * g2, c2i = T(-2) * g3;
        for (int e = 0; e < 9; ++e) K.m[e] = cmul(Cx<V>{c2r, c2i}, P.m[e]);
        for (int d = 0; d < 3; ++d) {
            K.m[4 * d].r += g0;
            K.m[4 * d].i -= g1;
        }
        const M3<V> DK = mul_dn(D, K);      // D^dag K
        const M3<V> GD = mul_nn(K, Q);      // K A B C^dag
        const M3<V> GC = mul_nn(DK, AB);    // D^dag K A B
        const M3<V> E = mul_dn(C, DK);      // C^dag D^dag K
        const M3<V> GBd = mul_nn(E, A);     // G_B^dag
        const M3<V> GAd = mul_nn(B, E);     // G_A^dag
        madd_to(link_ptr(gU, g.V, c, a, s), dag(GAd));
        madd_to(link_ptr(gU, g.V, c, b, sa), dag(GBd));
        madd_to(link_ptr(gU, g.V, c, a, sb), GC);
        madd_to(link_ptr(gU, g.V, c, b, s), GD);
    }
}

// gU += d(features)/dU^T gF. Sites write to x, x + a, x + b: x_0 slabs of one parity are
// processed in parallel (slab t writes to slabs t and t + 1 only), when L_0 is even.
template <typename T>
void feat_bwd(const T* U, const T* gF, const uint8_t* frozen, const int* L, int64_t nchunk, T* gU,
              int threads) {
    const Geo4 g = make_geo(L);
    const int64_t slab = g.stride[0];
    if (threads > 1 && g.L[0] % 2 == 0 && g.L[0] >= 2) {
        for (int par = 0; par < 2; ++par) {
#pragma omp parallel for schedule(static) num_threads(threads) collapse(2)
            for (int64_t c = 0; c < nchunk; ++c)
                for (int t = par; t < g.L[0]; t += 2)
                    for (int64_t s = t * slab; s < (t + 1) * slab; ++s)
                        feat_bwd_site(U, gF, frozen, g, c, s, gU);
        }
    } else {
#pragma omp parallel for schedule(static) num_threads(threads)
        for (int64_t c = 0; c < nchunk; ++c)
            for (int64_t s = 0; s < g.V; ++s) feat_bwd_site(U, gF, frozen, g, c, s, gU);
    }
}

// ================================================================================================
// 4D convolutions on site lists
// ================================================================================================
// dst[c][r][o][:] (+)= bias[o] + sum_{taps q, i} Wt[q][i][o] src[c][map(site(r) + sign (d_q - p))][i][:]
// over the taps whose source exists (map >= 0); then leaky ReLU (relu) or the leaky-ReLU
// derivative of act (act != null: dst *= act > 0 ? 1 : slope).
struct ConvGeo {
    Geo4 g;
    int k, p, ntap, sign;
};

inline int wrap(int a, int L) {
    a %= L;
    return a < 0 ? a + L : a;
}

// source rows (compact indices, -1 = none) of the taps of site s
inline void tap_rows(const ConvGeo& cg, int64_t s, const int32_t* map, int32_t* rows) {
    int x[4];
    coords(cg.g, s, x);
    int w[4][16];
    for (int d = 0; d < 4; ++d)
        for (int t = 0; t < cg.k; ++t) w[d][t] = wrap(x[d] + cg.sign * (t - cg.p), cg.g.L[d]);
    int q = 0;
    for (int t0 = 0; t0 < cg.k; ++t0)
        for (int t1 = 0; t1 < cg.k; ++t1)
            for (int t2 = 0; t2 < cg.k; ++t2) {
                const int64_t base = w[0][t0] * cg.g.stride[0] + w[1][t1] * cg.g.stride[1] +
                                     w[2][t2] * cg.g.stride[2];
                for (int t3 = 0; t3 < cg.k; ++t3) rows[q++] = map[base + w[3][t3]];
            }
}

// NS sites x OB output channels in registers; rows[n][q]: source row of tap q for site n
// zg (optional): per source row, bit k set when input channels 4k..4k+3 are zero there (the
// features of a non-frozen plane); those channels are skipped when zero for all NS sources
template <typename T, int OB, int NS>
inline void conv_block(const T* src, int64_t cin, const int32_t* const* rows, int ntap, const T* Wt,
                       int64_t cout, int64_t o0, const T* bias, T* const* dst, int relu, T slope,
                       const T* const* act, const uint8_t* zg) {
    using V = typename VT<T>::v;
    constexpr int W = VT<T>::W;
    V acc[NS][OB];
    for (int n = 0; n < NS; ++n)
        for (int o = 0; o < OB; ++o) acc[n][o] = bias ? splat<V>(bias[o0 + o]) : V{};
    for (int q = 0; q < ntap; ++q) {
        const T* sp[NS];
        bool any = false;
        for (int n = 0; n < NS; ++n) {
            const int32_t r = rows[n][q];
            sp[n] = r >= 0 ? src + (int64_t)r * cin * W : nullptr;
            any = any || r >= 0;
        }
        if (!any) continue;
        bool all = true;
        for (int n = 0; n < NS; ++n) all = all && sp[n] != nullptr;
        const T* wq = Wt + (int64_t)q * cin * cout + o0;
        if (all && zg) {
            unsigned zm = 0xffu;
            for (int n = 0; n < NS; ++n) zm &= zg[rows[n][q]];
            for (int64_t k = 0; 4 * k < cin; ++k) {
                if ((zm >> k) & 1u) continue;
                for (int64_t i = 4 * k; i < 4 * k + 4; ++i) {
                    V xv[NS];
                    for (int n = 0; n < NS; ++n) xv[n] = vload<V>(sp[n] + i * W);
                    const T* wi = wq + i * cout;
                    for (int o = 0; o < OB; ++o) {
                        const T wv = wi[o];
                        for (int n = 0; n < NS; ++n) acc[n][o] += wv * xv[n];
                    }
                }
            }
        } else if (all) {
            for (int64_t i = 0; i < cin; ++i) {
                V xv[NS];
                for (int n = 0; n < NS; ++n) xv[n] = vload<V>(sp[n] + i * W);
                const T* wi = wq + i * cout;
                for (int o = 0; o < OB; ++o) {
                    const T wv = wi[o];
                    for (int n = 0; n < NS; ++n) acc[n][o] += wv * xv[n];
                }
            }
        } else {
            for (int64_t i = 0; i < cin; ++i) {
                V xv[NS];
                for (int n = 0; n < NS; ++n) xv[n] = sp[n] ? vload<V>(sp[n] + i * W) : V{};
                const T* wi = wq + i * cout;
                for (int o = 0; o < OB; ++o) {
                    const T wv = wi[o];
                    for (int n = 0; n < NS; ++n) acc[n][o] += wv * xv[n];
                }
            }
        }
    }
    for (int n = 0; n < NS; ++n)
        for (int o = 0; o < OB; ++o) {
            V a = acc[n][o];
            if (relu) a = a > T(0) ? a : a * slope;
            if (act) {
                const V h = vload<V>(act[n] + (o0 + o) * W);
                a = h > T(0) ? a : a * slope;
            }
            vstore(dst[n] + (o0 + o) * W, a);
        }
}

// all output channels of ns <= kSiteBlock sites: output blocks of 8 channels x 3 sites (4 x 6,
// 2 x 12, 1 x 12 for the last channels), 24 accumulators, 11 loads per 24 FMAs (the weights are
// broadcast from memory, so wider output blocks would be load bound)
constexpr int kSiteBlock = 12;

template <typename T, int OB, int NS>
inline void conv_oblock(const T* src, int64_t cin, const int32_t* const* rows, int ntap, const T* Wt,
                        int64_t cout, int64_t o0, const T* bias, T* const* dst, int relu, T slope,
                        const T* const* act, int ns, const uint8_t* zg) {
    int n = 0;
    for (; n + NS <= ns; n += NS)
        conv_block<T, OB, NS>(src, cin, rows + n, ntap, Wt, cout, o0, bias, dst + n, relu, slope,
                              act ? act + n : nullptr, zg);
    for (; n < ns; ++n)
        conv_block<T, OB, 1>(src, cin, rows + n, ntap, Wt, cout, o0, bias, dst + n, relu, slope,
                             act ? act + n : nullptr, zg);
}

template <typename T>
inline void conv_sites(const T* src, int64_t cin, const int32_t* const* rows, int ntap, const T* Wt,
                       int64_t cout, const T* bias, T* const* dst, int relu, T slope,
                       const T* const* act, int ns, const uint8_t* zg) {
    int64_t o0 = 0;
    for (; o0 + 8 <= cout; o0 += 8)
        conv_oblock<T, 8, 3>(src, cin, rows, ntap, Wt, cout, o0, bias, dst, relu, slope, act, ns, zg);
    if (o0 + 4 <= cout) {
        conv_oblock<T, 4, 6>(src, cin, rows, ntap, Wt, cout, o0, bias, dst, relu, slope, act, ns, zg);
        o0 += 4;
    }
    if (o0 + 2 <= cout) {
        conv_oblock<T, 2, 12>(src, cin, rows, ntap, Wt, cout, o0, bias, dst, relu, slope, act, ns, zg);
        o0 += 2;
    }
    if (o0 < cout)
        conv_oblock<T, 1, 12>(src, cin, rows, ntap, Wt, cout, o0, bias, dst, relu, slope, act, ns, zg);
}

// dst[c][dst_rows[r]] (dst_rows null: r) for the sites `sites[r]` (full indices, in this order);
// src rows through `map` (full index -> row, -1 = absent)
template <typename T>
void conv_run(const T* src, int64_t nsrc, int64_t cin, const int32_t* map, const int64_t* sites,
              int64_t nsites, const int64_t* dst_rows, int64_t ndst, const ConvGeo& cg, const T* Wt,
              const T* bias, int64_t cout, T* dst, int relu, T slope, const T* act, int64_t nchunk,
              const uint8_t* zg, int threads) {
    constexpr int W = VT<T>::W;
    constexpr int NS = kSiteBlock;
    const int64_t nblk = (nsites + NS - 1) / NS;
#pragma omp parallel num_threads(threads)
    {
        std::vector<int32_t> rowbuf((size_t)NS * cg.ntap);
#pragma omp for schedule(static) collapse(2)
        for (int64_t c = 0; c < nchunk; ++c)
            for (int64_t b = 0; b < nblk; ++b) {
                const int64_t r0 = b * NS;
                const int ns = (int)std::min<int64_t>(NS, nsites - r0);
                const int32_t* rows[NS];
                T* dptr[NS];
                const T* aptr[NS];
                for (int n = 0; n < ns; ++n) {
                    tap_rows(cg, sites[r0 + n], map, rowbuf.data() + (size_t)n * cg.ntap);
                    rows[n] = rowbuf.data() + (size_t)n * cg.ntap;
                    const int64_t row = dst_rows ? dst_rows[r0 + n] : r0 + n;
                    dptr[n] = dst + ((c * ndst + row) * cout) * W;
                    aptr[n] = act ? act + ((c * ndst + row) * cout) * W : nullptr;
                }
                conv_sites<T>(src + (c * nsrc * cin) * W, cin, rows, cg.ntap, Wt, cout, bias, dptr,
                              relu, slope, act ? aptr : nullptr, ns, zg && cin % 4 == 0 ? zg : nullptr);
            }
    }
}

// gWt[q][i][o] = sum_{c, r, lanes} x[c][row(r, q)][i] g[c][r][o];  gb[o] = sum g[c][r][o].
// Rows are taken in blocks of kRowBlock (their g rows and the x rows they read stay in cache);
// per block and tap, IB x OB lane-vector sums (24 registers) are added into acc[q][i][o][:],
// reduced over the lanes at the end.
constexpr int kRowBlock = 192;

template <typename T, int IB, int OB>
inline void wgrad_block(const T* xc, int64_t cin, const T* gc, int64_t cout, const int32_t* rows,
                        int64_t nsites_all, int q, int64_t r0, int64_t r1, int64_t i0, int64_t o0,
                        T* acc, bool first, bool last, int ntap, T* gW, const uint8_t* zg) {
    using V = typename VT<T>::v;
    constexpr int W = VT<T>::W;
    V a[IB][OB];
    for (int ii = 0; ii < IB; ++ii)
        for (int o = 0; o < OB; ++o)
            a[ii][o] = first ? V{} : vload<V>(acc + (((int64_t)q * cin + i0 + ii) * cout + o0 + o) * W);
    const int32_t* rq = rows + (int64_t)q * nsites_all;
    for (int64_t r = r0; r < r1; ++r) {
        const int32_t row = rq[r];
        if (row < 0) continue;
        if (zg && ((zg[row] >> (i0 / 4)) & 1u)) continue;  // the block's 4 channels are zero
        const T* xr = xc + ((int64_t)row * cin + i0) * W;
        const T* gr = gc + (r * cout + o0) * W;
        // IB x vectors and one g vector at a time: 24 + IB + 1 registers (no spills)
        V xv[IB];
        for (int ii = 0; ii < IB; ++ii) xv[ii] = vload<V>(xr + ii * W);
        for (int o = 0; o < OB; ++o) {
            const V gv = vload<V>(gr + o * W);
            for (int ii = 0; ii < IB; ++ii) a[ii][o] += xv[ii] * gv;
        }
    }
    for (int ii = 0; ii < IB; ++ii)
        for (int o = 0; o < OB; ++o) {
            if (last) {  // lane sum, in torch's layout gW[o][i][q] (added over chunks)
                T sum = T(0);
                for (int l = 0; l < W; ++l) sum += a[ii][o][l];
                gW[((o0 + o) * cin + i0 + ii) * ntap + q] += sum;
            } else {
                vstore(acc + (((int64_t)q * cin + i0 + ii) * cout + o0 + o) * W, a[ii][o]);
            }
        }
}

template <typename T, int OB>
inline void wgrad_tap(const T* xc, int64_t cin, const T* gc, int64_t cout, const int32_t* rows,
                      int64_t nsites_all, int q, int64_t r0, int64_t r1, int64_t o0, T* acc,
                      bool first, bool last, int ntap, T* gW) {
    constexpr int IB = 24 / OB;
    int64_t i0 = 0;
    for (; i0 + IB <= cin; i0 += IB)
        wgrad_block<T, IB, OB>(xc, cin, gc, cout, rows, nsites_all, q, r0, r1, i0, o0, acc, first, last, ntap, gW, nullptr);
    for (; i0 + 2 <= cin; i0 += 2)
        wgrad_block<T, 2, OB>(xc, cin, gc, cout, rows, nsites_all, q, r0, r1, i0, o0, acc, first, last, ntap, gW, nullptr);
    for (; i0 < cin; ++i0)
        wgrad_block<T, 1, OB>(xc, cin, gc, cout, rows, nsites_all, q, r0, r1, i0, o0, acc, first, last, ntap, gW, nullptr);
}

// input channels in groups of 4 (zg: rows where a group is zero are skipped)
template <typename T, int OB>
inline void wgrad_tap_g4(const T* xc, int64_t cin, const T* gc, int64_t cout, const int32_t* rows,
                         int64_t nsites_all, int q, int64_t r0, int64_t r1, int64_t o0, T* acc,
                         bool first, bool last, int ntap, T* gW, const uint8_t* zg) {
    for (int64_t i0 = 0; i0 < cin; i0 += 4)
        wgrad_block<T, 4, OB>(xc, cin, gc, cout, rows, nsites_all, q, r0, r1, i0, o0, acc, first, last, ntap, gW, zg);
}

// rows per block: all of them when a chunk's g and x arrays fit in ~1 MiB (no partial sums
// in memory), else kRowBlock
template <typename T>
void conv_wgrad(const T* x, int64_t nsrc, int64_t cin, const int32_t* map, const int64_t* sites,
                int64_t nsites, const ConvGeo& cg, const T* g, int64_t cout, T* gW, T* gb,
                int64_t nchunk, const uint8_t* zg, int threads) {
    constexpr int W = VT<T>::W;
    // source rows, tap-major: rows[q][r]
    std::vector<int32_t> rows((size_t)nsites * cg.ntap);
#pragma omp parallel num_threads(threads)
    {
        std::vector<int32_t> buf(cg.ntap);
#pragma omp for schedule(static)
        for (int64_t r = 0; r < nsites; ++r) {
            tap_rows(cg, sites[r], map, buf.data());
            for (int q = 0; q < cg.ntap; ++q) rows[(size_t)q * nsites + r] = buf[q];
        }
    }
    const int64_t bytes = (nsites * cout + nsrc * cin) * W * (int64_t)sizeof(T);
    const int64_t rb = bytes <= (1 << 20) ? std::max<int64_t>(nsites, 1) : kRowBlock;
    const int64_t nblk = (nsites + rb - 1) / rb;
    std::unique_ptr<T[]> acc(nblk > 1 ? new T[(size_t)cg.ntap * cin * cout * W] : nullptr);
    std::memset(gW, 0, sizeof(T) * cg.ntap * cin * cout);
    for (int64_t c = 0; c < nchunk; ++c) {
        const T* xc = x + (c * nsrc * cin) * W;
        const T* gc = g + (c * nsites * cout) * W;
        for (int64_t b = 0; b < nblk; ++b) {
            const int64_t r0 = b * rb, r1 = std::min(nsites, r0 + rb);
            const bool first = b == 0, last = b == nblk - 1;
            T* ap = acc.get();
#pragma omp parallel for schedule(static) num_threads(threads)
            for (int q = 0; q < cg.ntap; ++q) {
                int64_t o0 = 0;
                if (zg && cin % 4 == 0) {
                    for (; o0 + 6 <= cout; o0 += 6)
                        wgrad_tap_g4<T, 6>(xc, cin, gc, cout, rows.data(), nsites, q, r0, r1, o0, ap, first, last, cg.ntap, gW, zg);
                    for (; o0 + 2 <= cout; o0 += 2)
                        wgrad_tap_g4<T, 2>(xc, cin, gc, cout, rows.data(), nsites, q, r0, r1, o0, ap, first, last, cg.ntap, gW, zg);
                    for (; o0 < cout; ++o0)
                        wgrad_tap_g4<T, 1>(xc, cin, gc, cout, rows.data(), nsites, q, r0, r1, o0, ap, first, last, cg.ntap, gW, zg);
                }
                for (; o0 + 8 <= cout; o0 += 8)
                    wgrad_tap<T, 8>(xc, cin, gc, cout, rows.data(), nsites, q, r0, r1, o0, ap, first, last, cg.ntap, gW);
                for (; o0 + 4 <= cout; o0 += 4)
                    wgrad_tap<T, 4>(xc, cin, gc, cout, rows.data(), nsites, q, r0, r1, o0, ap, first, last, cg.ntap, gW);
                for (; o0 + 2 <= cout; o0 += 2)
                    wgrad_tap<T, 2>(xc, cin, gc, cout, rows.data(), nsites, q, r0, r1, o0, ap, first, last, cg.ntap, gW);
                for (; o0 < cout; ++o0)
                    wgrad_tap<T, 1>(xc, cin, gc, cout, rows.data(), nsites, q, r0, r1, o0, ap, first, last, cg.ntap, gW);
            }
        }
    }
    for (int64_t o = 0; o < cout; ++o) {
        T s = T(0);
        for (int64_t c = 0; c < nchunk; ++c)
            for (int64_t r = 0; r < nsites; ++r) {
                const T* gr = g + ((c * nsites + r) * cout + o) * W;
                for (int l = 0; l < W; ++l) s += gr[l];
            }
        gb[o] = s;
    }
}

// ================================================================================================
// spectral map
// ================================================================================================
// Eigen-angles phi[3] and eigenvectors (columns of E) of SU(3) P: Cayley transform + Jacobi.
template <typename T, typename V>
inline void su3_eig(const M3<V>& P, M3<V>& E, V* phi) {
    typedef typename VT<T>::mi MI;
    const V tr = P.m[0].r + P.m[4].r + P.m[8].r, ti = P.m[0].i + P.m[4].i + P.m[8].i;
    // alpha = k pi / 6 maximising |det(1 + e^{i alpha} P)| / 2 = |cos(3 alpha/2) + Re(t e^{-i alpha/2})|
    V best = splat<V>(T(-1)), ca = splat<V>(T(1)), sa = V{}, alpha = V{};
    for (int k = 0; k < 12; ++k) {
        const double h = k * kPi / 12.0;
        const V f = splat<V>(T(std::cos(3.0 * h))) + tr * T(std::cos(h)) + ti * T(std::sin(h));
        const V af = f < T(0) ? -f : f;
        const MI better = af > best;
        best = better ? af : best;
        ca = better ? splat<V>(T(std::cos(2.0 * h))) : ca;
        sa = better ? splat<V>(T(std::sin(2.0 * h))) : sa;
        alpha = better ? splat<V>(T(2.0 * h)) : alpha;
    }
    // A = 1 + W, Bm = 1 - W, W = e^{i alpha} P
    M3<V> A, Bm;
    for (int e = 0; e < 9; ++e) {
        const Cx<V> w = cmul(Cx<V>{ca, sa}, P.m[e]);
        A.m[e] = w;
        Bm.m[e] = {-w.r, -w.i};
    }
    for (int d = 0; d < 3; ++d) {
        A.m[4 * d].r += T(1);
        Bm.m[4 * d].r += T(1);
    }
    // adj(A) / det(A)
    M3<V> adj;
    auto cof = [&](int i0, int j0, int i1, int j1) {  // a_{i0 j0} a_{i1 j1} - a_{i0 j1} a_{i1 j0}
        return csub(cmul(A.m[3 * i0 + j0], A.m[3 * i1 + j1]), cmul(A.m[3 * i0 + j1], A.m[3 * i1 + j0]));
    };
    adj.m[0] = cof(1, 1, 2, 2);
    adj.m[1] = cof(0, 2, 2, 1);
    adj.m[2] = cof(0, 1, 1, 2);
    adj.m[3] = cof(1, 2, 2, 0);
    adj.m[4] = cof(0, 0, 2, 2);
    adj.m[5] = cof(0, 2, 1, 0);
    adj.m[6] = cof(1, 0, 2, 1);
    adj.m[7] = cof(0, 1, 2, 0);
    adj.m[8] = cof(0, 0, 1, 1);
    const Cx<V> det = cadd(cadd(cmul(A.m[0], adj.m[0]), cmul(A.m[1], adj.m[3])), cmul(A.m[2], adj.m[6]));
    const V dn = det.r * det.r + det.i * det.i;
    const Cx<V> idet = {det.r / dn, -det.i / dn};
    M3<V> H = mul_nn(Bm, adj);
    for (int e = 0; e < 9; ++e) {
        const Cx<V> z = cmul(H.m[e], idet);
        H.m[e] = {-z.i, z.r};  // times i
    }
    // Hermitian part
    for (int i = 0; i < 3; ++i) {
        H.m[4 * i].i = V{};
        for (int j = i + 1; j < 3; ++j) {
            const Cx<V> a = H.m[3 * i + j], b = H.m[3 * j + i];
            const Cx<V> h = {T(0.5) * (a.r + b.r), T(0.5) * (a.i - b.i)};
            H.m[3 * i + j] = h;
            H.m[3 * j + i] = {h.r, -h.i};
        }
    }
    for (int e = 0; e < 9; ++e) E.m[e] = {V{}, V{}};
    for (int d = 0; d < 3; ++d) E.m[4 * d].r = splat<V>(T(1));
    const T eps = std::numeric_limits<T>::epsilon();
    const int pairs[3][2] = {{0, 1}, {0, 2}, {1, 2}};
    for (int sweep = 0; sweep < 10; ++sweep) {
        const V dd = H.m[0].r * H.m[0].r + H.m[4].r * H.m[4].r + H.m[8].r * H.m[8].r;
        V off = V{};
        for (int pq = 0; pq < 3; ++pq) {
            const Cx<V> h = H.m[3 * pairs[pq][0] + pairs[pq][1]];
            off += h.r * h.r + h.i * h.i;
        }
        bool done = true;
        const MI conv = off <= eps * eps * T(1e-2) * (dd + T(1));
        for (int l = 0; l < VT<T>::W; ++l) done = done && conv[l];
        if (done) break;
        for (int pq = 0; pq < 3; ++pq) {
            const int p = pairs[pq][0], q = pairs[pq][1];
            const Cx<V> h = H.m[3 * p + q];
            // |h| and e^{-i phi} = conj(h) / |h| scaled by max(|Re h|, |Im h|): no underflow of
            // |h|^2 (an inexact |e| would make the rotation non-unitary)
            const V hr = h.r < T(0) ? -h.r : h.r, hi = h.i < T(0) ? -h.i : h.i;
            const V hm = hr > hi ? hr : hi;
            const MI nz = hm > T(0);
            const V hms = nz ? hm : splat<V>(T(1));
            const V xr = h.r / hms, xi = h.i / hms;
            const V nn = vsqrt(xr * xr + xi * xi);
            const V rs = nz ? hm * nn : splat<V>(T(1));
            const V er = nz ? xr / nn : splat<V>(T(1)), ei = nz ? -xi / nn : V{};
            const V th = (H.m[4 * q].r - H.m[4 * p].r) / (T(2) * rs);
            const V ath = th < T(0) ? -th : th;
            V t = splat<V>(T(1)) / (ath + vsqrt(th * th + T(1)));
            t = th < T(0) ? -t : t;
            t = nz ? t : V{};
            t = ath < T(1e150) ? t : V{};
            const V c = splat<V>(T(1)) / vsqrt(t * t + T(1)), s = t * c;
            // columns: (X_kp, X_kq) <- (c X_kp - s e^{-i phi} X_kq, s X_kp + c e^{-i phi} X_kq)
            const Cx<V> e = {er, ei};
            for (int k = 0; k < 3; ++k) {
                const Cx<V> xp = H.m[3 * k + p], xq = cmul(e, H.m[3 * k + q]);
                H.m[3 * k + p] = {c * xp.r - s * xq.r, c * xp.i - s * xq.i};
                H.m[3 * k + q] = {s * xp.r + c * xq.r, s * xp.i + c * xq.i};
                const Cx<V> vp = E.m[3 * k + p], vq = cmul(e, E.m[3 * k + q]);
                E.m[3 * k + p] = {c * vp.r - s * vq.r, c * vp.i - s * vq.i};
                E.m[3 * k + q] = {s * vp.r + c * vq.r, s * vp.i + c * vq.i};
            }
            // rows with G^dag: (X_pk, X_qk) <- (c X_pk - s e^{i phi} X_qk, s X_pk + c e^{i phi} X_qk)
            const Cx<V> ec = {er, -ei};
            for (int k = 0; k < 3; ++k) {
                const Cx<V> xp = H.m[3 * p + k], xq = cmul(ec, H.m[3 * q + k]);
                H.m[3 * p + k] = {c * xp.r - s * xq.r, c * xp.i - s * xq.i};
                H.m[3 * q + k] = {s * xp.r + c * xq.r, s * xp.i + c * xq.i};
            }
            H.m[3 * p + q] = {V{}, V{}};
            H.m[3 * q + p] = {V{}, V{}};
            H.m[4 * p].i = V{};
            H.m[4 * q].i = V{};
        }
    }
    for (int m = 0; m < 3; ++m) phi[m] = T(2) * vatan(H.m[4 * m].r) - alpha;
}

// Weyl alcove of eigen-angles (sun.su3_alcove): rank[m] of eigenvector m in the descending
// order of the lifted angles th[m]; a = theta_0 - theta_1, b = theta_1 - theta_2
template <typename T, typename V>
inline void su3_alcove(const V* phi_in, V* th, V* rank, V& a, V& b) {
    const T pi = T(kPi), tpi = T(kTwoPi);
    V ph[3];
    for (int m = 0; m < 3; ++m) {
        const V x = phi_in[m] + pi;
        ph[m] = x - tpi * vfloor(x / tpi) - pi;
    }
    const V n = vround((ph[0] + ph[1] + ph[2]) / tpi);
    V hi[3], lo[3];
    for (int m = 0; m < 3; ++m) {
        V above = V{}, below = V{};
        for (int o = 0; o < 3; ++o) {
            if (o == m) continue;
            above += ph[o] > ph[m] ? splat<V>(T(1)) : V{};
            below += ph[o] < ph[m] ? splat<V>(T(1)) : V{};
            if (o < m) {
                above += ph[o] == ph[m] ? splat<V>(T(1)) : V{};
                below += ph[o] == ph[m] ? splat<V>(T(1)) : V{};
            }
        }
        hi[m] = above == T(0) ? splat<V>(T(1)) : V{};
        lo[m] = below == T(0) ? splat<V>(T(1)) : V{};
    }
    for (int m = 0; m < 3; ++m) {
        th[m] = ph[m] - tpi * (n == T(1) ? hi[m] : V{}) + tpi * (n == T(-1) ? lo[m] : V{});
    }
    for (int m = 0; m < 3; ++m) {
        V r = V{};
        for (int o = 0; o < 3; ++o) {
            if (o == m) continue;
            r += th[o] > th[m] ? splat<V>(T(1)) : V{};
            if (o < m) r += th[o] == th[m] ? splat<V>(T(1)) : V{};
        }
        rank[m] = r;
    }
    V s[3] = {V{}, V{}, V{}};
    for (int m = 0; m < 3; ++m)
        for (int r = 0; r < 3; ++r) s[r] += rank[m] == T(r) ? th[m] : V{};
    a = s[0] - s[1];
    b = s[1] - s[2];
}

// value of sorted slot r (0, 1, 2) for eigenvector m
template <typename T, typename V>
inline V pick(const V& rank, const V* sorted) {
    return rank == T(0) ? sorted[0] : (rank == T(1) ? sorted[1] : sorted[2]);
}

constexpr int kMaxK = 16;

// NCP mixture on [0, 1] (kernels1d.IntervalNCPKernel): forward state for the backward
template <typename V>
struct NCP {
    V x, g, l, Gp, c2, es[kMaxK], s[kMaxK], w[kMaxK], y[kMaxK], d[kMaxK], r[kMaxK];
};

template <typename T, typename V>
inline void ncp_fwd(const V& x, const V* p, int K, T smax, NCP<V>& st) {
    const T hpi = T(kPi / 2), tpi_inv = T(2.0 / kPi);
    st.x = x;
    V amax = p[K];
    for (int k = 1; k < K; ++k) amax = p[K + k] > amax ? p[K + k] : amax;
    V esum = V{};
    V logw[kMaxK];
    for (int k = 0; k < K; ++k) esum += vexp(p[K + k] - amax);
    // (a_k - max) - log(sum): as torch.log_softmax; max + log(sum) first would round the
    // small log(sum) to the ulp of max (1e-14 for logits ~ 60: w = 1 - 3e-13 off by 2%)
    const V lse = vlog(esum);
    for (int k = 0; k < K; ++k) {
        logw[k] = (p[K + k] - amax) - lse;
        st.w[k] = vexp(logw[k]);
        st.s[k] = smax * vtanh(p[k] / smax);
    }
    const V z = hpi * x;
    const V cz = vcos(z);
    const V tz = vtan(z);
    st.c2 = cz * cz;
    V g = V{}, lj[kMaxK], lmax = splat<V>(-std::numeric_limits<T>::infinity());
    for (int k = 0; k < K; ++k) {
        st.es[k] = vexp(st.s[k]);
        st.y[k] = tpi_inv * vatan(st.es[k] * tz);
        const V Q = vexp(-st.s[k]) * st.c2 + st.es[k] * (T(1) - st.c2);
        lj[k] = -vlog(Q);
        st.d[k] = splat<V>(T(1)) / Q;
        g += st.w[k] * st.y[k];
        const V t = logw[k] + lj[k];
        lmax = t > lmax ? t : lmax;
    }
    V ssum = V{};
    for (int k = 0; k < K; ++k) ssum += vexp(logw[k] + lj[k] - lmax);
    st.l = lmax + vlog(ssum);
    st.g = g;
    st.Gp = vexp(st.l);
    for (int k = 0; k < K; ++k) st.r[k] = vexp(logw[k] + lj[k] - st.l);
}

// xbar, pbar[2K] from the cotangents of g (gbar) and log g' (lbar)
template <typename T, typename V>
inline void ncp_bwd(const NCP<V>& st, int K, T smax, const V& gbar, const V& lbar, V& xbar, V* pbar) {
    const T pi = T(kPi);
    const V s2z = vsin(pi * st.x);
    V dlx = V{};
    for (int k = 0; k < K; ++k) {
        const V ies = splat<V>(T(1)) / st.es[k];
        const V dljx = T(-0.5) * pi * s2z * (st.es[k] - ies) * st.d[k];
        const V dys = (T(1) / pi) * s2z * st.d[k];
        const V dljs = -(st.es[k] * (T(1) - st.c2) - ies * st.c2) * st.d[k];
        dlx += st.r[k] * dljx;
        const V sbar = gbar * st.w[k] * dys + lbar * st.r[k] * dljs;
        const V sr = st.s[k] / smax;
        pbar[k] = sbar * (T(1) - sr * sr);
        pbar[K + k] = gbar * st.w[k] * (st.y[k] - st.g) + lbar * (st.r[k] - st.w[k]);
    }
    xbar = gbar * st.Gp + lbar * dlx;
}

template <typename T, typename V>
inline V log_weyl(const V& a, const V& b) {
    const V c = T(kTwoPi) - a - b;
    const V sa = vsin(T(0.5) * a), sb = vsin(T(0.5) * b), sc = vsin(T(0.5) * c);
    return vlog(T(4) * sa * sa) + vlog(T(4) * sb * sb) + vlog(T(4) * sc * sc);
}

// everything the backward needs of one active loop
template <typename V>
struct Spec {
    M3<V> E;
    V th[3], rank[3], a, b, u, v, a2, b2, u2, v2, thn[3], feat[5], p2[kMaxK * 2];
    NCP<V> n1, n2;
    V logdet;
};

// eig: 21 lane vectors (E, then the 3 angles) saved by the forward for the backward; compute
// and store them when `have` is false, else read them
template <typename T, typename V>
inline void spec_core(const M3<V>& P, const V* prm, int K, T smax, Spec<V>& S, M3<V>& P2,
                      T* eig, bool have) {
    constexpr int W = VT<T>::W;
    const T tpi = T(kTwoPi), pi = T(kPi);
    V phi[3];
    if (have) {
        S.E = mload<T, V>(eig);
        for (int m = 0; m < 3; ++m) phi[m] = vload<V>(eig + (18 + m) * W);
    } else {
        su3_eig<T, V>(P, S.E, phi);
        if (eig) {
            mstore<T, V>(eig, S.E);
            for (int m = 0; m < 3; ++m) vstore(eig + (18 + m) * W, phi[m]);
        }
    }
    su3_alcove<T, V>(phi, S.th, S.rank, S.a, S.b);
    S.u = S.a / tpi;
    S.v = S.b / (tpi - S.a);
    const int k2 = 2 * K;
    ncp_fwd<T, V>(S.u, prm, K, smax, S.n1);
    const V x = pi * S.u;
    S.feat[0] = splat<V>(T(1));
    S.feat[1] = vcos(x);
    S.feat[2] = vsin(x);
    S.feat[3] = vcos(T(2) * x);
    S.feat[4] = vsin(T(2) * x);
    for (int j = 0; j < k2; ++j) {
        V acc = V{};
        for (int f = 0; f < 5; ++f) acc += prm[k2 + f * k2 + j] * S.feat[f];
        S.p2[j] = acc;
    }
    ncp_fwd<T, V>(S.v, S.p2, K, smax, S.n2);
    S.u2 = S.n1.g;
    S.v2 = S.n2.g;
    S.a2 = tpi * S.u2;
    S.b2 = (tpi - S.a2) * S.v2;
    const V tn[3] = {(T(2) * S.a2 + S.b2) / T(3), (S.b2 - S.a2) / T(3), -(S.a2 + T(2) * S.b2) / T(3)};
    Cx<V> mu[3];
    for (int m = 0; m < 3; ++m) {
        S.thn[m] = pick<T, V>(S.rank[m], tn);
        mu[m] = {vcos(S.thn[m]), vsin(S.thn[m])};
    }
    // P2 = E diag(mu) E^dag
    for (int i = 0; i < 3; ++i)
        for (int j = 0; j < 3; ++j) {
            Cx<V> acc = {V{}, V{}};
            for (int m = 0; m < 3; ++m) acc = cadd(acc, cmul(mu[m], cmulc(S.E.m[3 * i + m], S.E.m[3 * j + m])));
            P2.m[3 * i + j] = acc;
        }
    S.logdet = S.n1.l + S.n2.l + vlog1p(-S.u2) - vlog1p(-S.u) + log_weyl<T, V>(S.a2, S.b2) -
               log_weyl<T, V>(S.a, S.b);
}

template <typename T>
inline int64_t slab_of(const Geo4& g, int64_t s) {
    return s / g.stride[0];
}

// the new active links `fresh` written into U; ld[c] = the sum of the per-loop log-dets ldsite
template <typename T>
void spec_commit(T* U, const Geo4& g, const int64_t* act, int64_t nact, int mu, int64_t nchunk,
                 const T* fresh, const T* ldsite, T* ld) {
    using V = typename VT<T>::v;
    constexpr int W = VT<T>::W;
    for (int64_t c = 0; c < nchunk; ++c) {
        V acc = V{};
        for (int64_t i = 0; i < nact; ++i) {
            acc += vload<V>(ldsite + (c * nact + i) * W);
            std::memcpy(link_ptr(U, g.V, c, mu, act[i]), fresh + ((c * nact + i) * 18) * W,
                        sizeof(T) * 18 * W);
        }
        vstore(ld + c * W, acc);
    }
}

// In place on the field U: the new active links are computed into `fresh` first (a link may
// be read by another active loop on a halo-padded array) and then written; `save` (if given)
// receives the old ones, which the backward writes back.
template <typename T>
void spec_fwd(T* U, const T* prm, int64_t np, const int64_t* act, int64_t nact, const T* wts,
              int mu, int nu, int K, T smax, const int* L, int64_t nchunk, T* fresh, T* save,
              T* ldsite, T* ld, T* eig, int threads) {
    using V = typename VT<T>::v;
    constexpr int W = VT<T>::W;
    const Geo4 g = make_geo(L);
#pragma omp parallel for schedule(static) num_threads(threads) collapse(2)
    for (int64_t c = 0; c < nchunk; ++c)
        for (int64_t i = 0; i < nact; ++i) {
            const int64_t s = act[i];
            int x[4];
            coords(g, s, x);
            const M3<V> A = mload<T, V>(link_ptr(U, g.V, c, mu, s));
            const M3<V> B = mload<T, V>(link_ptr(U, g.V, c, nu, hop(g, s, x, mu, 1)));
            const M3<V> C = mload<T, V>(link_ptr(U, g.V, c, mu, hop(g, s, x, nu, 1)));
            const M3<V> D = mload<T, V>(link_ptr(U, g.V, c, nu, s));
            const M3<V> M = mul_nd(mul_nd(B, C), D);
            const M3<V> P = mul_nn(A, M);
            V p[kMaxK * 12];
            const T* pp = prm + ((c * nact + i) * np) * W;
            for (int e = 0; e < np; ++e) p[e] = vload<V>(pp + e * W);
            Spec<V> S;
            M3<V> P2;
            spec_core<T, V>(P, p, K, smax, S, P2, eig ? eig + ((c * nact + i) * 21) * W : nullptr, false);
            mstore<T, V>(fresh + ((c * nact + i) * 18) * W, mul_nd(P2, M));
            if (save) mstore<T, V>(save + ((c * nact + i) * 18) * W, A);
            vstore(ldsite + (c * nact + i) * W, S.logdet * wts[i]);
        }
    spec_commit<T>(U, g, act, nact, mu, nchunk, fresh, ldsite, ld);
}

template <typename T>
inline void spec_bwd_site(const T* U, const T* prm, int64_t np, int64_t s, int64_t i, const T wt,
                          int mu, int nu, int K, T smax, const Geo4& g, int64_t c, int64_t nact,
                          const T* gnew, const T* gld, T* gU, T* gprm, T* eig) {
    using V = typename VT<T>::v;
    constexpr int W = VT<T>::W;
    const T tpi = T(kTwoPi), pi = T(kPi);
    int x[4];
    coords(g, s, x);
    const int64_t smu = hop(g, s, x, mu, 1), snu = hop(g, s, x, nu, 1);
    const M3<V> A = mload<T, V>(link_ptr(U, g.V, c, mu, s));
    const M3<V> B = mload<T, V>(link_ptr(U, g.V, c, nu, smu));
    const M3<V> C = mload<T, V>(link_ptr(U, g.V, c, mu, snu));
    const M3<V> D = mload<T, V>(link_ptr(U, g.V, c, nu, s));
    const M3<V> BC = mul_nd(B, C);
    const M3<V> M = mul_nd(BC, D);
    const M3<V> P = mul_nn(A, M);
    V p[kMaxK * 12];
    const T* pp = prm + ((c * nact + i) * np) * W;
    for (int e = 0; e < np; ++e) p[e] = vload<V>(pp + e * W);
    Spec<V> S;
    M3<V> P2;
    spec_core<T, V>(P, p, K, smax, S, P2, eig ? eig + ((c * nact + i) * 21) * W : nullptr, eig != nullptr);
    const V gl = vload<V>(gld + c * W) * wt;
    const M3<V> gU2 = mload<T, V>(gnew + ((c * nact + i) * 18) * W);
    // U' = P2 M^dag
    const M3<V> GP2 = mul_nn(gU2, M);
    M3<V> GM = mul_dn(gU2, P2);
    // spectral map: Z in the eigenbasis
    const M3<V> Gt = mul_nn(mul_dn(S.E, GP2), S.E);
    V h[3];
    for (int m = 0; m < 3; ++m) {
        const V mr = vcos(S.thn[m]), mi = vsin(S.thn[m]);
        h[m] = mr * Gt.m[4 * m].i - mi * Gt.m[4 * m].r;
    }
    V hs[3] = {V{}, V{}, V{}};
    for (int m = 0; m < 3; ++m)
        for (int r = 0; r < 3; ++r) hs[r] += S.rank[m] == T(r) ? h[m] : V{};
    const V c2 = tpi - S.a2 - S.b2, c1 = tpi - S.a - S.b;
    auto cot = [](const V& y) { return vcos(T(0.5) * y) / vsin(T(0.5) * y); };
    const V ct2a = cot(S.a2), ct2b = cot(S.b2), ct2c = cot(c2);
    const V cta = cot(S.a), ctb = cot(S.b), ctc = cot(c1);
    const V gA2 = (T(2) * hs[0] - hs[1] - hs[2]) / T(3) + gl * (ct2a - ct2c);
    const V gB2 = (hs[0] + hs[1] - T(2) * hs[2]) / T(3) + gl * (ct2b - ct2c);
    const V v2bar = gB2 * (tpi - S.a2);
    const V u2bar = tpi * (gA2 - gB2 * S.v2) - gl / (T(1) - S.u2);
    const int k2 = 2 * K;
    V vbar, p2bar[kMaxK * 2], ubar, p1bar[kMaxK * 2];
    ncp_bwd<T, V>(S.n2, K, smax, v2bar, gl, vbar, p2bar);
    ncp_bwd<T, V>(S.n1, K, smax, u2bar, gl, ubar, p1bar);
    const V xx = pi * S.u;
    const V dfeat[5] = {V{}, -pi * S.feat[2], pi * S.feat[1], T(-2) * pi * S.feat[4], T(2) * pi * S.feat[3]};
    T* gp = gprm + ((c * nact + i) * np) * W;
    (void)xx;
    for (int j = 0; j < k2; ++j) {
        vstore(gp + j * W, p1bar[j]);
        V dp = V{};
        for (int f = 0; f < 5; ++f) {
            vstore(gp + (k2 + f * k2 + j) * W, p2bar[j] * S.feat[f]);
            dp += p[k2 + f * k2 + j] * dfeat[f];
        }
        ubar += p2bar[j] * dp;
    }
    ubar += gl / (T(1) - S.u);
    const V tma = tpi - S.a;
    const V abar = ubar / tpi + vbar * S.b / (tma * tma) - gl * (cta - ctc);
    const V bbar = vbar / tma - gl * (ctb - ctc);
    const V tbar[3] = {abar, bbar - abar, -bbar};
    // off-diagonal: Z_jk = conj(Gt_jk) i ratio e^{i beta_jk}, beta = (th'_j + th'_k + th_k - th_j)/2
    const V sa = vsin(T(0.5) * S.a), sb = vsin(T(0.5) * S.b), sc = vsin(T(0.5) * c1);
    const V lim_bc = (tpi - S.a2) / tma * S.n2.Gp;
    const V ra = sa != T(0) ? vsin(T(0.5) * S.a2) / sa : S.n1.Gp;
    const V rb = sb != T(0) ? vsin(T(0.5) * S.b2) / sb : lim_bc;
    const V rc = sc != T(0) ? vsin(T(0.5) * c2) / sc : lim_bc;
    M3<V> Zc;  // conj(Z)
    for (int j = 0; j < 3; ++j)
        for (int k = 0; k < 3; ++k) {
            if (j == k) {
                Zc.m[4 * j] = {pick<T, V>(S.rank[j], tbar), V{}};
                continue;
            }
            const V rsum = S.rank[j] + S.rank[k];  // 1: (0,1) a; 3: (1,2) b; 2: (0,2) c
            const V ratio = rsum == T(1) ? ra : (rsum == T(3) ? rb : rc);
            const V beta = T(0.5) * (S.thn[j] + S.thn[k] + S.th[k] - S.th[j]);
            // i ratio e^{i beta} conj(Gt_jk); conj of it
            const Cx<V> e = {-ratio * vsin(beta), ratio * vcos(beta)};
            const Cx<V> z = cmulc(e, Gt.m[3 * j + k]);
            Zc.m[3 * j + k] = {z.r, -z.i};
        }
    // G_P = i E conj(Z) E^dag P
    M3<V> GP = mul_nn(mul_nd(mul_nn(S.E, Zc), S.E), P);
    for (int e = 0; e < 9; ++e) GP.m[e] = {-GP.m[e].i, GP.m[e].r};
    // P = A M
    const M3<V> GA = mul_nd(GP, M);
    const M3<V> AG = mul_dn(A, GP);
    for (int e = 0; e < 9; ++e) GM.m[e] = cadd(GM.m[e], AG.m[e]);
    // M = B C^dag D^dag
    const M3<V> GB = mul_nn(mul_nn(GM, D), C);
    const M3<V> GC = mul_nn(mul_dn(D, dag(GM)), B);
    const M3<V> GD = mul_dn(GM, BC);
    madd_to(link_ptr(gU, g.V, c, mu, s), GA);
    madd_to(link_ptr(gU, g.V, c, nu, smu), GB);
    madd_to(link_ptr(gU, g.V, c, mu, snu), GC);
    madd_to(link_ptr(gU, g.V, c, nu, s), GD);
}

// In place: on entry U is the layer's output and gU the gradient of its output; on exit U is
// the layer's input (the saved links written back) and gU the gradient of the input.
template <typename T>
void spec_bwd(T* U, const T* save, const T* prm, int64_t np, const int64_t* act, int64_t nact,
              const T* wts, int mu, int nu, int K, T smax, const int* L, int64_t nchunk, T* gnew,
              const T* gld, T* gU, T* gprm, T* eig, int threads) {
    constexpr int W = VT<T>::W;
    const Geo4 g = make_geo(L);
    for (int64_t c = 0; c < nchunk; ++c)
        for (int64_t i = 0; i < nact; ++i) {
            std::memcpy(link_ptr(U, g.V, c, mu, act[i]), save + ((c * nact + i) * 18) * W,
                        sizeof(T) * 18 * W);
            T* gl = link_ptr(gU, g.V, c, mu, act[i]);
            std::memcpy(gnew + ((c * nact + i) * 18) * W, gl, sizeof(T) * 18 * W);
            std::memset(gl, 0, sizeof(T) * 18 * W);
        }
    // writes go to slabs x_0 and x_0 + 1 (mu or nu = 0): one parity of slabs at a time
    const bool color = g.L[0] % 2 == 0 && threads > 1;
    for (int par = 0; par < (color ? 2 : 1); ++par) {
#pragma omp parallel for schedule(static) num_threads(color ? threads : 1) collapse(2)
        for (int64_t c = 0; c < nchunk; ++c)
            for (int64_t i = 0; i < nact; ++i) {
                if (color && slab_of<T>(g, act[i]) % 2 != par) continue;
                spec_bwd_site<T>(U, prm, np, act[i], i, wts[i], mu, nu, K, smax, g, c, nact, gnew,
                                 gld, gU, gprm, eig);
            }
    }
}

// ================================================================================================
// inverse of the spectral map (inference: log q of a given field; no backward)
// ================================================================================================
// The active loop P' of U is an output of the forward; its pre-image P has the same
// eigenvectors and the alcove point (a, b) with g_1(u) = u', g_2(v | u) = v' (u = a/2pi,
// v = b/(2pi - a)): u first, then g_2's parameters at u, then v. Each 1D inverse is a
// bracketed, safeguarded Newton iteration on the forward's own formulas (ncp_eval).

// the constants of one NCP mixture, as ncp_fwd computes them: weights and e^{+-s_k}
template <typename V>
struct NCPc {
    V w[kMaxK], es[kMaxK], ies[kMaxK];
};

template <typename T, typename V>
inline void ncp_consts(const V* p, int K, T smax, NCPc<V>& c) {
    V amax = p[K];
    for (int k = 1; k < K; ++k) amax = p[K + k] > amax ? p[K + k] : amax;
    V esum = V{};
    for (int k = 0; k < K; ++k) esum += vexp(p[K + k] - amax);
    const V lse = vlog(esum);
    for (int k = 0; k < K; ++k) {
        c.w[k] = vexp((p[K + k] - amax) - lse);
        const V s = smax * vtanh(p[k] / smax);
        c.es[k] = vexp(s);
        c.ies[k] = vexp(-s);
    }
}

// g(x) (ncp_fwd's sum, term by term) and g'(x)
template <typename T, typename V>
inline void ncp_eval(const NCPc<V>& c, int K, const V& x, V& g, V& gp) {
    const T hpi = T(kPi / 2), tpi_inv = T(2.0 / kPi);
    const V z = hpi * x;
    const V cz = vcos(z);
    const V tz = vtan(z);
    const V c2 = cz * cz;
    g = V{};
    gp = V{};
    for (int k = 0; k < K; ++k) {
        g += c.w[k] * (tpi_inv * vatan(c.es[k] * tz));
        gp += c.w[k] / (c.ies[k] * c2 + c.es[k] * (T(1) - c2));
    }
}

// x in [0, 1] with g(x) = y: from the mixture of the components' inverses (exact for one
// component), Newton steps, a step that leaves the bracket [lo, hi] (g(lo) < y <= g(hi))
// replaced by its midpoint, so every lane converges. A lane stops after its first Newton step
// below the rounding level of the root, 16 eps (x + y / g') (g is known to a few eps of y, which
// moves the root by y / g' per eps): 3-6 steps typically (quadratic convergence), at most
// kNewtonMax; its x is then frozen, so a lane's result does not depend on the others.
constexpr int kNewtonMax = 60;

template <typename T, typename V>
inline V ncp_inverse(const NCPc<V>& c, int K, const V& y) {
    typedef typename VT<T>::mi MI;
    const T hpi = T(kPi / 2), tpi_inv = T(2.0 / kPi);
    const T tol = T(16) * std::numeric_limits<T>::epsilon();
    const V one = splat<V>(T(1));
    const V ty = vtan(hpi * y);
    V x = V{};
    for (int k = 0; k < K; ++k) x += c.w[k] * (tpi_inv * vatan(c.ies[k] * ty));
    x = x < T(0) ? V{} : (x > T(1) ? one : x);
    V lo = V{}, hi = one;
    MI done = MI{};
    for (int it = 0; it < kNewtonMax; ++it) {
        V g, gp;
        ncp_eval<T, V>(c, K, x, g, gp);
        const MI below = g < y;
        lo = below ? x : lo;
        hi = below ? hi : x;
        const V dx = (g - y) / gp;
        const V xn = x - dx;
        const MI inside = (xn >= lo) & (xn <= hi);
        const V adx = dx < T(0) ? -dx : dx;
        const MI conv = inside & (adx <= tol * (x + y / gp));
        x = done ? x : (inside ? xn : T(0.5) * (lo + hi));
        done = done | conv;
        bool all = true;
        for (int l = 0; l < VT<T>::W; ++l) all = all && done[l];
        if (all) break;
    }
    return x;
}

// pre-image P of the loop P2 (an output of spec_core) and the forward's log-det at P
template <typename T, typename V>
inline void spec_inv_core(const M3<V>& P2, const V* prm, int K, T smax, M3<V>& P, V& logdet) {
    const T tpi = T(kTwoPi), pi = T(kPi);
    M3<V> E;
    V phi[3], th2[3], rank[3], a2, b2;
    su3_eig<T, V>(P2, E, phi);
    su3_alcove<T, V>(phi, th2, rank, a2, b2);
    const V u2 = a2 / tpi, v2 = b2 / (tpi - a2);
    NCPc<V> cs;
    ncp_consts<T, V>(prm, K, smax, cs);
    const V u = ncp_inverse<T, V>(cs, K, u2);
    // g_2's parameters at u (spec_core)
    const V x = pi * u;
    const V feat[5] = {splat<V>(T(1)), vcos(x), vsin(x), vcos(T(2) * x), vsin(T(2) * x)};
    const int k2 = 2 * K;
    V p2[kMaxK * 2];
    for (int j = 0; j < k2; ++j) {
        V acc = V{};
        for (int f = 0; f < 5; ++f) acc += prm[k2 + f * k2 + j] * feat[f];
        p2[j] = acc;
    }
    ncp_consts<T, V>(p2, K, smax, cs);
    const V v = ncp_inverse<T, V>(cs, K, v2);
    const V a = tpi * u, b = (tpi - a) * v;
    const V tn[3] = {(T(2) * a + b) / T(3), (b - a) / T(3), -(a + T(2) * b) / T(3)};
    Cx<V> ev[3];
    for (int m = 0; m < 3; ++m) {
        const V t = pick<T, V>(rank[m], tn);
        ev[m] = {vcos(t), vsin(t)};
    }
    // P = E diag(ev) E^dag
    for (int i = 0; i < 3; ++i)
        for (int j = 0; j < 3; ++j) {
            Cx<V> acc = {V{}, V{}};
            for (int m = 0; m < 3; ++m) acc = cadd(acc, cmul(ev[m], cmulc(E.m[3 * i + m], E.m[3 * j + m])));
            P.m[3 * i + j] = acc;
        }
    NCP<V> n1, n2;
    ncp_fwd<T, V>(u, prm, K, smax, n1);
    ncp_fwd<T, V>(v, p2, K, smax, n2);
    // The Weyl factors as 2 sum log|sin(y'/2) / sin(y/2)| over the gaps y = a, b, c (log_weyl's
    // difference). sin(c/2) = sin((a + b)/2) is taken from the smaller of the two angles: near
    // the identity (a, b -> 0, c -> 2 pi) c = 2 pi - a - b has lost the digits that a + b keeps.
    // At a closed gap the ratio is its limit dy'/dy along the alcove's coordinate lines (g_1'
    // for a; (2 pi - a')/(2 pi - a) g_2' for b and c, spec_bwd_site's ratios), so an exactly
    // degenerate loop (a cold field) has a finite log-det where log_weyl's is log 0 - log 0
    // (at the identity the limit depends on the direction of approach: there is no unique one).
    const V ab = a + b, ab2 = a2 + b2, c1 = tpi - ab, c2 = tpi - ab2;
    const V sa = vsin(T(0.5) * a), sb = vsin(T(0.5) * b);
    const V sc = vsin(T(0.5) * (c1 < ab ? c1 : ab)), sc2 = vsin(T(0.5) * (c2 < ab2 ? c2 : ab2));
    const V lim_bc = (tpi - a2) / (tpi - a) * n2.Gp;
    const V ra = sa != T(0) ? vsin(T(0.5) * a2) / sa : n1.Gp;
    const V rb = sb != T(0) ? vsin(T(0.5) * b2) / sb : lim_bc;
    const V rc = sc != T(0) ? sc2 / sc : lim_bc;
    const V r = ra * rb * rc;
    logdet = n1.l + n2.l + vlog1p(-u2) - vlog1p(-u) + T(2) * vlog(r < T(0) ? -r : r);
}

// Inverse of spec_fwd, in place on U: each active loop P' of U is mapped to its pre-image P and
// U_mu(x) <- P M^dag (through `fresh`, as spec_fwd); ld receives the forward's log-dets at the
// pre-images, weighted and summed as spec_fwd's (the inverse's log-det is minus it).
template <typename T>
void spec_inv(T* U, const T* prm, int64_t np, const int64_t* act, int64_t nact, const T* wts,
              int mu, int nu, int K, T smax, const int* L, int64_t nchunk, T* fresh, T* ldsite,
              T* ld, int threads) {
    using V = typename VT<T>::v;
    constexpr int W = VT<T>::W;
    const Geo4 g = make_geo(L);
#pragma omp parallel for schedule(static) num_threads(threads) collapse(2)
    for (int64_t c = 0; c < nchunk; ++c)
        for (int64_t i = 0; i < nact; ++i) {
            const int64_t s = act[i];
            int x[4];
            coords(g, s, x);
            const M3<V> A = mload<T, V>(link_ptr(U, g.V, c, mu, s));
            const M3<V> B = mload<T, V>(link_ptr(U, g.V, c, nu, hop(g, s, x, mu, 1)));
            const M3<V> C = mload<T, V>(link_ptr(U, g.V, c, mu, hop(g, s, x, nu, 1)));
            const M3<V> D = mload<T, V>(link_ptr(U, g.V, c, nu, s));
            const M3<V> M = mul_nd(mul_nd(B, C), D);
            V p[kMaxK * 12];
            const T* pp = prm + ((c * nact + i) * np) * W;
            for (int e = 0; e < np; ++e) p[e] = vload<V>(pp + e * W);
            M3<V> P;
            V logdet;
            spec_inv_core<T, V>(mul_nn(A, M), p, K, smax, P, logdet);
            mstore<T, V>(fresh + ((c * nact + i) * 18) * W, mul_nd(P, M));
            vstore(ldsite + (c * nact + i) * W, logdet * wts[i]);
        }
    spec_commit<T>(U, g, act, nact, mu, nchunk, fresh, ldsite, ld);
}

// ================================================================================================
// Haar SU(3) from 18 normals (lattice.groups.SUN.haar): Q of the QR decomposition of the
// Ginibre matrix z = complex(n[0:9], n[9:18]) (row-major) with R_jj > 0, which Gram-Schmidt
// with one reorthogonalisation (CGS2) gives to rounding, then divided by det^(1/3)
// (principal branch). Output: interleaved complex128 [n][9].
// ================================================================================================
// Haar links 8 at a time (lanes = links). From the counter-based normals of
// CounterRNG.normal(index, 0, 18) (philox.h's mapping: Philox4x32-10 on 64-bit integer lanes,
// Box-Muller on double lanes), or from given normals.
typedef uint64_t u64x8 __attribute__((vector_size(64)));
typedef double f64x8 __attribute__((vector_size(64)));

inline void philox_lanes(u64x8 c[4], uint32_t k0, uint32_t k1) {
    const u64x8 m32 = u64x8{} + 0xffffffffull;
    for (int r = 0; r < 10; ++r) {
        if (r > 0) {
            k0 += 0x9E3779B9u;
            k1 += 0xBB67AE85u;
        }
        const u64x8 p0 = c[0] * 0xD2511F53ull, p1 = c[2] * 0xCD9E8D57ull;
        const u64x8 n0 = (p1 >> 32) ^ c[1] ^ (u64x8{} + k0);
        const u64x8 n2 = (p0 >> 32) ^ c[3] ^ (u64x8{} + k1);
        c[0] = n0 & m32;
        c[1] = p1 & m32;
        c[2] = n2 & m32;
        c[3] = p0 & m32;
    }
}

inline f64x8 uniform_lanes(const u64x8& a, const u64x8& b) {
    const u64x8 k = ((a >> 5) << 26) | (b >> 6);
    const f64x8 u = __builtin_convertvector(k, f64x8);
    return (k == 0 ? f64x8{} + 0.5 : u) * 0x1p-53;
}

// a[18] normals per lane -> nl matrices at out (interleaved complex): columns of the Ginibre
// matrix by Gram-Schmidt with one reorthogonalisation, divided by det^(1/3)
inline void haar_lanes(const f64x8* a, double* out, int nl) {
    typedef f64x8 V;
    V qr[3][3], qi[3][3];  // [column][row]
    for (int j = 0; j < 3; ++j) {
        V vr[3], vi[3];
        for (int i = 0; i < 3; ++i) {
            vr[i] = a[3 * i + j];
            vi[i] = a[9 + 3 * i + j];
        }
        for (int pass = 0; pass < 2; ++pass)
            for (int k = 0; k < j; ++k) {
                V cr = V{}, ci = V{};
                for (int i = 0; i < 3; ++i) {
                    cr += qr[k][i] * vr[i] + qi[k][i] * vi[i];
                    ci += qr[k][i] * vi[i] - qi[k][i] * vr[i];
                }
                for (int i = 0; i < 3; ++i) {
                    vr[i] -= qr[k][i] * cr - qi[k][i] * ci;
                    vi[i] -= qr[k][i] * ci + qi[k][i] * cr;
                }
            }
        V nn = V{};
        for (int i = 0; i < 3; ++i) nn += vr[i] * vr[i] + vi[i] * vi[i];
        const V inv = 1.0 / vsqrt(nn);
        for (int i = 0; i < 3; ++i) {
            qr[j][i] = vr[i] * inv;
            qi[j][i] = vi[i] * inv;
        }
    }
    V dr = V{}, di = V{};
    for (int j = 0; j < 3; ++j) {
        const int j1 = (j + 1) % 3, j2 = (j + 2) % 3;
        // entry (i, j) = q[j][i]; cofactor of (0, j) = e(1,j1) e(2,j2) - e(1,j2) e(2,j1)
        const V p1r = qr[j1][1] * qr[j2][2] - qi[j1][1] * qi[j2][2];
        const V p1i = qr[j1][1] * qi[j2][2] + qi[j1][1] * qr[j2][2];
        const V p2r = qr[j2][1] * qr[j1][2] - qi[j2][1] * qi[j1][2];
        const V p2i = qr[j2][1] * qi[j1][2] + qi[j2][1] * qr[j1][2];
        const V cr = p1r - p2r, ci = p1i - p2i;
        dr += qr[j][0] * cr - qi[j][0] * ci;
        di += qr[j][0] * ci + qi[j][0] * cr;
    }
    const V ph = -vatan2(di, dr) / 3.0;
    const V er = vcos(ph), ei = vsin(ph);
    for (int i = 0; i < 3; ++i)
        for (int j = 0; j < 3; ++j) {
            const V orr = qr[j][i] * er - qi[j][i] * ei, oi = qr[j][i] * ei + qi[j][i] * er;
            for (int l = 0; l < nl; ++l) {
                double* o = out + l * 18;
                o[2 * (3 * i + j)] = orr[l];
                o[2 * (3 * i + j) + 1] = oi[l];
            }
        }
}

// from given normals [n][18], 8 matrices at a time
void haar_su3(const double* nrm, int64_t n, double* out, int threads) {
    const int64_t nblk = (n + 7) / 8;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t bk = 0; bk < nblk; ++bk) {
        f64x8 a[18];
        for (int l = 0; l < 8; ++l) {
            const double* src = nrm + std::min(bk * 8 + l, n - 1) * 18;
            for (int e = 0; e < 18; ++e) a[e][l] = src[e];
        }
        haar_lanes(a, out + bk * 8 * 18, (int)std::min<int64_t>(8, n - bk * 8));
    }
}

void haar_su3_counter(uint32_t k0, uint32_t k1, const int64_t* index, int64_t n, double* out,
                      int threads) {
    typedef f64x8 V;
    const int64_t nblk = (n + 7) / 8;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t bk = 0; bk < nblk; ++bk) {
        u64x8 idx;
        for (int l = 0; l < 8; ++l) idx[l] = (uint64_t)index[std::min(bk * 8 + l, n - 1)];
        V a[18];
        for (int i = 0; i < 9; ++i) {  // block i: normals 2i, 2i + 1
            u64x8 c[4] = {idx & 0xffffffffull, idx >> 32, u64x8{},
                          u64x8{} + (uint64_t)((uint32_t)i | (hpcflow_rng::kKindNormal << 24))};
            philox_lanes(c, k0, k1);
            const V u1 = uniform_lanes(c[0], c[1]), u2 = uniform_lanes(c[2], c[3]);
            const V r = vsqrt(-2.0 * vlog(u1));
            const V phi = (2.0 * M_PI) * u2;
            a[2 * i] = r * vcos(phi);
            a[2 * i + 1] = r * vsin(phi);
        }
        haar_lanes(a, out + bk * 8 * 18, (int)std::min<int64_t>(8, n - bk * 8));
    }
}

// ================================================================================================
// clover charge (lattice.observables.topological_charge_clover) on the lanes layout:
// Q = -(1/4 pi^2) sum_x Re tr(F01 F23 - F02 F13 + F03 F12), F = TA(sum of the 4 leaves / 4)
// ================================================================================================
template <typename T>
void clover_q(const T* U, const uint8_t* interior, const int* L, int64_t nchunk, T* out, int threads) {
    using V = typename VT<T>::v;
    constexpr int W = VT<T>::W;
    const Geo4 g = make_geo(L);
    std::vector<T> dens((size_t)nchunk * g.V * W);
#pragma omp parallel for schedule(static) num_threads(threads) collapse(2)
    for (int64_t c = 0; c < nchunk; ++c)
        for (int64_t s = 0; s < g.V; ++s) {
            V d = V{};
            if (interior[s]) {
                int x[4];
                coords(g, s, x);
                M3<V> F[6];
                for (int k = 0; k < 6; ++k) {
                    const int mu = kPlanes[k][0], nu = kPlanes[k][1];
                    const int64_t xpm = hop(g, s, x, mu, 1), xpn = hop(g, s, x, nu, 1);
                    const int64_t xmm = hop(g, s, x, mu, -1), xmn = hop(g, s, x, nu, -1);
                    int y[4];
                    coords(g, xmm, y);
                    const int64_t xmmpn = hop(g, xmm, y, nu, 1), xmmmn = hop(g, xmm, y, nu, -1);
                    coords(g, xmn, y);
                    const int64_t xmnpm = hop(g, xmn, y, mu, 1);
                    auto ld = [&](int d, int64_t site) { return mload<T, V>(link_ptr(U, g.V, c, d, site)); };
                    const M3<V> Umx = ld(mu, s), Unx = ld(nu, s);
                    // L1 = U_mu(x) U_nu(x+mu) U_mu(x+nu)^dag U_nu(x)^dag
                    M3<V> Q = mul_nd(mul_nd(mul_nn(Umx, ld(nu, xpm)), ld(mu, xpn)), Unx);
                    // L2 = U_nu(x) U_mu(x-mu+nu)^dag U_nu(x-mu)^dag U_mu(x-mu)
                    const M3<V> L2 = mul_nn(mul_nd(mul_nd(Unx, ld(mu, xmmpn)), ld(nu, xmm)), ld(mu, xmm));
                    // L3 = U_nu(x-nu)^dag U_mu(x-nu) U_nu(x-nu+mu) U_mu(x)^dag
                    const M3<V> L3 = mul_nd(mul_nn(mul_dn(ld(nu, xmn), ld(mu, xmn)), ld(nu, xmnpm)), Umx);
                    // L4 = U_mu(x-mu)^dag U_nu(x-mu-nu)^dag U_mu(x-mu-nu) U_nu(x-nu)
                    const M3<V> L4 = mul_nn(mul_nn(mul_dn(ld(mu, xmm), dag(ld(nu, xmmmn))), ld(mu, xmmmn)), ld(nu, xmn));
                    for (int e = 0; e < 9; ++e) Q.m[e] = cadd(cadd(Q.m[e], L2.m[e]), cadd(L3.m[e], L4.m[e]));
                    // TA(Q / 4) = (Q - Q^dag)/8 - tr(...)/3
                    M3<V>& f = F[k];
                    for (int i = 0; i < 3; ++i)
                        for (int j = 0; j < 3; ++j) {
                            const Cx<V> a = Q.m[3 * i + j], b = Q.m[3 * j + i];
                            f.m[3 * i + j] = {T(0.125) * (a.r - b.r), T(0.125) * (a.i + b.i)};
                        }
                    const V tr3 = (f.m[0].i + f.m[4].i + f.m[8].i) / T(3);
                    for (int i = 0; i < 3; ++i) f.m[4 * i].i -= tr3;
                }
                auto trp = [](const M3<V>& a, const M3<V>& b) {
                    V r = V{};
                    for (int i = 0; i < 3; ++i)
                        for (int j = 0; j < 3; ++j) r += a.m[3 * i + j].r * b.m[3 * j + i].r - a.m[3 * i + j].i * b.m[3 * j + i].i;
                    return r;
                };
                d = trp(F[0], F[5]) - trp(F[1], F[4]) + trp(F[2], F[3]);
            }
            vstore(dens.data() + (c * g.V + s) * W, d);
        }
    for (int64_t c = 0; c < nchunk; ++c) {
        V acc = V{};
        for (int64_t s = 0; s < g.V; ++s) acc += vload<V>(dens.data() + (c * g.V + s) * W);
        vstore(out + c * W, acc * T(-1.0 / (4.0 * kPi * kPi)));
    }
}

// ================================================================================================
// layout conversions
// ================================================================================================
// complex field rows src[b][x][18] (b < nb) <-> lanes dst[c][x][18][W]; pack pads the lanes
// b >= nb with copies of entry nb - 1; unpack drops them
// blocks of kPackBlock x-rows: the destination block (kPackBlock * 18 * W reals) stays in L1
// while the W source rows are read sequentially
constexpr int64_t kPackBlock = 24;

template <typename T>
void lanes_pack(const T* src, int64_t nb, int64_t nx, T* dst, int threads) {
    constexpr int W = VT<T>::W;
    const int64_t nchunk = (nb + W - 1) / W, nblk = (nx + kPackBlock - 1) / kPackBlock;
#pragma omp parallel for schedule(static) num_threads(threads) collapse(2)
    for (int64_t c = 0; c < nchunk; ++c)
        for (int64_t bk = 0; bk < nblk; ++bk) {
            const int64_t x0 = bk * kPackBlock, x1 = std::min(nx, x0 + kPackBlock);
            T* d = dst + ((c * nx + x0) * 18) * W;
            for (int l = 0; l < W; ++l) {
                const T* sp = src + (std::min(c * W + l, nb - 1) * nx + x0) * 18;
                const int64_t n = (x1 - x0) * 18;
                for (int64_t e = 0; e < n; ++e) d[e * W + l] = sp[e];
            }
        }
}

template <typename T>
void lanes_unpack(const T* src, int64_t nb, int64_t nx, T* dst, int threads) {
    constexpr int W = VT<T>::W;
    const int64_t nchunk = (nb + W - 1) / W, nblk = (nx + kPackBlock - 1) / kPackBlock;
#pragma omp parallel for schedule(static) num_threads(threads) collapse(2)
    for (int64_t c = 0; c < nchunk; ++c)
        for (int64_t bk = 0; bk < nblk; ++bk) {
            const int64_t x0 = bk * kPackBlock, x1 = std::min(nx, x0 + kPackBlock);
            const T* sp = src + ((c * nx + x0) * 18) * W;
            const int nl = (int)std::min<int64_t>(W, nb - c * W);
            for (int l = 0; l < nl; ++l) {
                T* d = dst + ((c * W + l) * nx + x0) * 18;
                const int64_t n = (x1 - x0) * 18;
                for (int64_t e = 0; e < n; ++e) d[e] = sp[e * W + l];
            }
        }
}

// torch weight w[o][c][q] -> tap-major wt[q][c][o] (fwd) or wt[q][o][c] (bwd input)
template <typename T>
void weight_layout(const T* w, int64_t cout, int64_t cin, int64_t ntap, int transposed, T* out) {
    if (transposed) {
        for (int64_t q = 0; q < ntap; ++q)
            for (int64_t o = 0; o < cout; ++o)
                for (int64_t c = 0; c < cin; ++c) out[(q * cout + o) * cin + c] = w[(o * cin + c) * ntap + q];
    } else {
        for (int64_t q = 0; q < ntap; ++q)
            for (int64_t c = 0; c < cin; ++c)
                for (int64_t o = 0; o < cout; ++o) out[(q * cin + c) * cout + o] = w[(o * cin + c) * ntap + q];
    }
}

}  // namespace

extern "C" {

int hpcflow_sun_lanes(int dbl) { return dbl ? VT<double>::W : VT<float>::W; }

int hpcflow_sun_max_components() { return kMaxK; }

void hpcflow_sun_haar(const double* nrm, int64_t n, double* out, int threads) {
    haar_su3(nrm, n, out, threads);
}

void hpcflow_sun_haar_counter(uint32_t k0, uint32_t k1, const int64_t* index, int64_t n,
                              double* out, int threads) {
    haar_su3_counter(k0, k1, index, n, out, threads);
}

#define HPCFLOW_SUN_API(T, S)                                                                        \
    void hpcflow_sun_feat_fwd_##S(const T* U, const uint8_t* frozen, const int* L, int64_t nchunk,  \
                                  T* F, int threads) {                                               \
        feat_fwd<T>(U, frozen, L, nchunk, F, threads);                                               \
    }                                                                                                \
    void hpcflow_sun_feat_bwd_##S(const T* U, const T* gF, const uint8_t* frozen, const int* L,      \
                                  int64_t nchunk, T* gU, int threads) {                              \
        feat_bwd<T>(U, gF, frozen, L, nchunk, gU, threads);                                          \
    }                                                                                                \
    void hpcflow_sun_conv_##S(const T* src, int64_t nsrc, int64_t cin, const int32_t* map,          \
                              const int64_t* sites, int64_t nsites, const int64_t* dst_rows,        \
                              int64_t ndst, const int* L, int k, int sign, const T* Wt,             \
                              const T* bias, int64_t cout, T* dst, int relu, double slope,          \
                              const T* act, int64_t nchunk, const uint8_t* zg, int threads) {       \
        ConvGeo cg{make_geo(L), k, (k - 1) / 2, k * k * k * k, sign};                                \
        conv_run<T>(src, nsrc, cin, map, sites, nsites, dst_rows, ndst, cg, Wt, bias, cout, dst,   \
                    relu, T(slope), act, nchunk, zg, threads);                                       \
    }                                                                                                \
    void hpcflow_sun_conv_wgrad_##S(const T* x, int64_t nsrc, int64_t cin, const int32_t* map,      \
                                    const int64_t* sites, int64_t nsites, const int* L, int k,      \
                                    const T* g, int64_t cout, T* gWt, T* gb, int64_t nchunk,        \
                                    const uint8_t* zg, int threads) {                                \
        ConvGeo cg{make_geo(L), k, (k - 1) / 2, k * k * k * k, 1};                                   \
        conv_wgrad<T>(x, nsrc, cin, map, sites, nsites, cg, g, cout, gWt, gb, nchunk, zg, threads); \
    }                                                                                                \
    void hpcflow_sun_pack_##S(const T* src, int64_t nb, int64_t nx, T* dst, int threads) {         \
        lanes_pack<T>(src, nb, nx, dst, threads);                                                    \
    }                                                                                                \
    void hpcflow_sun_unpack_##S(const T* src, int64_t nb, int64_t nx, T* dst, int threads) {       \
        lanes_unpack<T>(src, nb, nx, dst, threads);                                                  \
    }                                                                                                \
    void hpcflow_sun_weights_##S(const T* w, int64_t cout, int64_t cin, int64_t ntap,              \
                                 int transposed, T* out) {                                           \
        weight_layout<T>(w, cout, cin, ntap, transposed, out);                                       \
    }                                                                                                \
    void hpcflow_sun_clover_q_##S(const T* U, const uint8_t* interior, const int* L,                \
                                  int64_t nchunk, T* out, int threads) {                             \
        clover_q<T>(U, interior, L, nchunk, out, threads);                                           \
    }                                                                                                \
    void hpcflow_sun_spec_fwd_##S(T* U, const T* prm, int64_t np, const int64_t* act, int64_t nact, \
                                  const T* wts, int mu, int nu, int K, double smax, const int* L,   \
                                  int64_t nchunk, T* fresh, T* save, T* ldsite, T* ld, T* eig,      \
                                  int threads) {                                                     \
        spec_fwd<T>(U, prm, np, act, nact, wts, mu, nu, K, T(smax), L, nchunk, fresh, save, ldsite, \
                    ld, eig, threads);                                                               \
    }                                                                                                \
    void hpcflow_sun_spec_bwd_##S(T* U, const T* save, const T* prm, int64_t np,                    \
                                  const int64_t* act, int64_t nact, const T* wts, int mu, int nu,   \
                                  int K, double smax, const int* L, int64_t nchunk, T* gnew,        \
                                  const T* gld, T* gU, T* gprm, T* eig, int threads) {               \
        spec_bwd<T>(U, save, prm, np, act, nact, wts, mu, nu, K, T(smax), L, nchunk, gnew, gld, gU, \
                    gprm, eig, threads);                                                             \
    }                                                                                                \
    void hpcflow_sun_spec_inv_##S(T* U, const T* prm, int64_t np, const int64_t* act, int64_t nact, \
                                  const T* wts, int mu, int nu, int K, double smax, const int* L,   \
                                  int64_t nchunk, T* fresh, T* ldsite, T* ld, int threads) {         \
        spec_inv<T>(U, prm, np, act, nact, wts, mu, nu, K, T(smax), L, nchunk, fresh, ldsite, ld,   \
                    threads);                                                                        \
    }

HPCFLOW_SUN_API(double, d)
HPCFLOW_SUN_API(float, f)

}  // extern "C"
