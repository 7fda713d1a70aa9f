// flow_ncp.cpp -- the NCP-mixture circle bijection of the U(1) coupling layers, on the CPU.
//
// h(x) = sum_k w_k g_k(x) + t  (mod 2 pi),  w = softmax(a),  g_k(x) = 2 atan(e^{s_k} tan(x/2))
// mapped to [0, 2 pi), and log h'(x) = log sum_k w_k d_k(x) with
// d_k = 1 / (e^{-s_k} cos^2(x/2) + e^{s_k} sin^2(x/2))  (hpcflow/flows/circular.py).
//
// Parameters are channel-first: p[P, M] with P = 2K + 1 rows (s_1..K, a_1..K, t), M sites;
// x, y, logj are [M]. The backward applies the analytic
// derivatives from quantities the forward saves (no tan in them, so they stay finite where
// tan(x/2) overflows):
//   dg_k/dx = d_k                       dg_k/ds_k = sin(x) d_k
//   dd_k/dx = -d_k^2 sinh(s_k) sin(x)   dd_k/ds_k = -d_k^2 (e^{s_k} sin^2 - e^{-s_k} cos^2)
//   dy/da_j = w_j (g_j - ybar)          dlogj/da_j = w_j (d_j / D - 1),  D = sum w d
//   dy/dt = 1                           dlogj/dt = 0
// Thread count is an argument (torch's intra-op thread count).
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int kMaxK = 64;

template <typename T>
inline T two_pi() { return T(6.283185307179586476925286766559); }

// torch.remainder(v, 2 pi): v - 2 pi floor(v / 2 pi)
template <typename T>
inline T rem2pi(T v) { return v - two_pi<T>() * std::floor(v / two_pi<T>()); }

// Per site, saved by the forward for the backward (aux[AUX(K), M], row-major):
// w_1..K, g_1..K, d_1..K, e^{s_1..K}, cos^2(x/2), sin(x), ybar, D.
inline int aux_rows(int K) { return 4 * K + 4; }

template <typename T>
inline void eval(T x, const T* p, int64_t M, int K, int64_t m, T* w, T* g, T* d, T* es, T* c2o,
                 T* sxo, T* ybar, T* D) {
    const T h = T(0.5) * x;
    const T sh = std::sin(h), ch = std::cos(h);
    const T th = sh / ch;  // tan(x/2); +-inf at x = pi gives atan = +-pi/2, as torch.tan does
    const T c2 = ch * ch, s2 = sh * sh;
    *c2o = c2;
    *sxo = T(2) * sh * ch;
    T amax = p[(int64_t)K * M + m];
    for (int k = 1; k < K; ++k) amax = std::fmax(amax, p[(int64_t)(K + k) * M + m]);
    T esum = T(0);
    for (int k = 0; k < K; ++k) {
        w[k] = std::exp(p[(int64_t)(K + k) * M + m] - amax);
        esum += w[k];
    }
    T yb = T(0), dd = T(0);
    for (int k = 0; k < K; ++k) {
        w[k] /= esum;
        es[k] = std::exp(p[(int64_t)k * M + m]);
        g[k] = rem2pi<T>(T(2) * std::atan(es[k] * th));
        d[k] = T(1) / (c2 / es[k] + es[k] * s2);
        yb += w[k] * g[k];
        dd += w[k] * d[k];
    }
    *ybar = yb;
    *D = dd;
}

template <typename T>
void ncp_fwd(const T* x, const T* p, T* y, T* logj, T* aux, int64_t M, int K, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t m = 0; m < M; ++m) {
        T w[kMaxK], g[kMaxK], d[kMaxK], es[kMaxK], c2, sx, ybar, D;
        eval<T>(x[m], p, M, K, m, w, g, d, es, &c2, &sx, &ybar, &D);
        y[m] = rem2pi<T>(ybar + p[(int64_t)2 * K * M + m]);
        logj[m] = std::log(D);
        if (aux) {
            for (int k = 0; k < K; ++k) {
                aux[(int64_t)k * M + m] = w[k];
                aux[(int64_t)(K + k) * M + m] = g[k];
                aux[(int64_t)(2 * K + k) * M + m] = d[k];
                aux[(int64_t)(3 * K + k) * M + m] = es[k];
            }
            aux[(int64_t)(4 * K) * M + m] = c2;
            aux[(int64_t)(4 * K + 1) * M + m] = sx;
            aux[(int64_t)(4 * K + 2) * M + m] = ybar;
            aux[(int64_t)(4 * K + 3) * M + m] = D;
        }
    }
}

template <typename T>
void ncp_bwd(const T* aux, const T* gy, const T* gl, T* gx, T* gp, int64_t M, int K,
             int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t m = 0; m < M; ++m) {
        const T c2 = aux[(int64_t)(4 * K) * M + m], sx = aux[(int64_t)(4 * K + 1) * M + m];
        const T ybar = aux[(int64_t)(4 * K + 2) * M + m], D = aux[(int64_t)(4 * K + 3) * M + m];
        const T s2 = T(1) - c2;
        const T a = gy ? gy[m] : T(0), b = gl ? gl[m] : T(0);
        const T bD = b / D;
        T dlx = T(0);
        for (int k = 0; k < K; ++k) {
            const T w = aux[(int64_t)k * M + m], g = aux[(int64_t)(K + k) * M + m];
            const T d = aux[(int64_t)(2 * K + k) * M + m], es = aux[(int64_t)(3 * K + k) * M + m];
            const T ems = T(1) / es, wd = w * d;
            dlx -= wd * d * (es - ems);
            gp[(int64_t)k * M + m] = a * wd * sx - bD * wd * d * (es * s2 - ems * c2);
            gp[(int64_t)(K + k) * M + m] = a * w * (g - ybar) + b * w * (d / D - T(1));
        }
        gp[(int64_t)2 * K * M + m] = a;
        gx[m] = a * D + bD * dlx * T(0.5) * sx;
    }
}

}  // namespace

extern "C" {

int hpcflow_ncp_max_components() { return kMaxK; }
int hpcflow_ncp_aux_rows(int K) { return aux_rows(K); }

#define HPCFLOW_NCP_API(T, S)                                                                   \
    void hpcflow_ncp_fwd_##S(const T* x, const T* p, T* y, T* logj, T* aux, long long M, int K, \
                             int threads) {                                                     \
        ncp_fwd<T>(x, p, y, logj, aux, M, K, threads);                                          \
    }                                                                                           \
    void hpcflow_ncp_bwd_##S(const T* aux, const T* gy, const T* gl, T* gx, T* gp, long long M, \
                             int K, int threads) {                                              \
        ncp_bwd<T>(aux, gy, gl, gx, gp, M, K, threads);                                         \
    }

HPCFLOW_NCP_API(float, f)
HPCFLOW_NCP_API(double, d)

}  // extern "C"
