// flow_conv.cpp -- circular k x k convolutions of the U(1) flows' context CNN, on the CPU.
//
// The context network of a 2D coupling layer (hpcflow.flows.context) is a stack of small
// periodic convolutions (batch 64, 2-8 channels, 8x8 sites). oneDNN and GEMM-based paths run
// them at 10-20 GFLOP/s because each call is tiny and NCHW puts only L1 = 8 values in a row.
// Here the batch is the innermost axis: fields are [C, L0, L1, N] (channel, site, site,
// batch), so every (channel, site) holds N contiguous values and one weight multiplies a whole
// SIMD vector of batch entries; accumulators are blocked 4 output channels x 2 vectors.
//
// Geometry: input extents L0 x L1 (a torus: indices wrap, which on a halo-padded local array
// only wraps into the outer halo, as circular padding does); output sites are all sites, or
// (``axis`` = 0 or 1) only the rows start, start + step, ... along that axis (the coupling
// layers need kernel parameters on their active rows only): output [Cout, R0, R1, N].
//
//   out[o, r, n] = b[o] + sum_{c, dy, dx} W[o, c, dy, dx] x[c, y(r) + (dy - p, dx - p), n]
//
// with p = (k - 1) / 2 and an optional leaky ReLU on the output. Backward:
//   gx[c, y, n] = sum_{o, dy, dx : y - (dy - p, dx - p) is an output site r} W[o, c, dy, dx] g[o, r, n]
//                 (times the leaky-ReLU derivative of the input activation, when given)
//   gW[o, c, dy, dx] = sum_{r, n} g[o, r, n] x[c, y(r) + (dy - p, dx - p), n],  gb[o] = sum g[o].
//
// Build: g++ -O3 -march=native -fopenmp -std=c++17 -shared -fPIC flow_conv.cpp (done by
// hpcflow.kernels.conv at first use, cached like the plaquette/staple host library).
// Plain C++ with GCC vector extensions; float and double instances; the thread count is an
// argument (torch's intra-op thread count), not OMP_NUM_THREADS.
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

struct Geo {
    int L0, L1, N, k, p;
    int axis, start, step;  // axis -1: every site is an output site
    int R0, R1;             // output extents
};

inline int wrap(int a, int L) {
    a %= L;
    return a < 0 ? a + L : a;
}

Geo make_geo(int L0, int L1, int N, int k, int axis, int start, int step) {
    Geo g{L0, L1, N, k, (k - 1) / 2, axis, start, step, L0, L1};
    if (axis == 0) g.R0 = (L0 - start + step - 1) / step;
    if (axis == 1) g.R1 = (L1 - start + step - 1) / step;
    return g;
}

// site (y0, y1) of output row (r0, r1)
inline void out_site(const Geo& g, int r0, int r1, int* y0, int* y1) {
    *y0 = g.axis == 0 ? g.start + r0 * g.step : r0;
    *y1 = g.axis == 1 ? g.start + r1 * g.step : r1;
}

// output row index along one axis of site coordinate y (-1 when y is not an output row)
inline int out_row(const Geo& g, int axis, int y) {
    if (g.axis != axis) return y;
    const int d = y - g.start;
    if (d < 0 || d % g.step) return -1;
    return d / g.step;
}

template <typename T>
struct Vec {
    static constexpr int V = 64 / sizeof(T);  // one 512-bit vector (two 256-bit on AVX2)
    typedef T type __attribute__((vector_size(64)));
};

// acc[o][j] = bias[o] + sum_q coef[o * cstride + q] * src[q][n0 + j V ..], o < OB, j < NV;
// then optional leaky ReLU and store to dst + o * ostride + n0.
template <typename T, int NV, int OB>
inline void block(const T* const* src, int nsrc, const T* coef, int64_t cstride, const T* bias,
                  T* dst, int64_t ostride, int n0, int relu, T slope) {
    using vec = typename Vec<T>::type;
    constexpr int V = Vec<T>::V;
    vec acc[OB][NV];
    for (int o = 0; o < OB; ++o)
        for (int j = 0; j < NV; ++j) acc[o][j] = (bias ? bias[o] : T(0)) + vec{};
    for (int q = 0; q < nsrc; ++q) {
        vec v[NV];
        for (int j = 0; j < NV; ++j) std::memcpy(&v[j], src[q] + n0 + j * V, sizeof(vec));
        for (int o = 0; o < OB; ++o) {
            const T w = coef[o * cstride + q];
            for (int j = 0; j < NV; ++j) acc[o][j] += w * v[j];
        }
    }
    for (int o = 0; o < OB; ++o)
        for (int j = 0; j < NV; ++j) {
            vec a = acc[o][j];
            if (relu) a = a > T(0) ? a : a * slope;
            std::memcpy(dst + o * ostride + n0 + j * V, &a, sizeof(vec));
        }
}

// All outputs of one site: nout rows of coef (stride cstride) against the nsrc source rows.
template <typename T>
void site_outputs(const T* const* src, int nsrc, const T* coef, int64_t cstride, const T* bias,
                  int nout, T* dst, int64_t ostride, int N, int relu, T slope) {
    constexpr int V = Vec<T>::V;
    int n0 = 0;
    for (; n0 + 2 * V <= N; n0 += 2 * V) {
        int o = 0;
        for (; o + 4 <= nout; o += 4)
            block<T, 2, 4>(src, nsrc, coef + o * cstride, cstride, bias ? bias + o : nullptr,
                           dst + o * ostride, ostride, n0, relu, slope);
        for (; o < nout; ++o)
            block<T, 2, 1>(src, nsrc, coef + o * cstride, cstride, bias ? bias + o : nullptr,
                           dst + o * ostride, ostride, n0, relu, slope);
    }
    for (; n0 + V <= N; n0 += V)
        for (int o = 0; o < nout; ++o)
            block<T, 1, 1>(src, nsrc, coef + o * cstride, cstride, bias ? bias + o : nullptr,
                           dst + o * ostride, ostride, n0, relu, slope);
    for (; n0 < N; ++n0)
        for (int o = 0; o < nout; ++o) {
            T a = bias ? bias[o] : T(0);
            for (int q = 0; q < nsrc; ++q) a += coef[o * cstride + q] * src[q][n0];
            if (relu && !(a > T(0))) a *= slope;
            dst[o * ostride + n0] = a;
        }
}

template <typename T>
void conv_fwd(const T* x, const T* W, const T* b, T* out, int cin, int cout, const Geo& g,
              int relu, T slope, int threads) {
    const int N = g.N, k = g.k, nsite = g.R0 * g.R1, nsrc = cin * k * k;
    const int64_t ostride = (int64_t)nsite * N;
#pragma omp parallel num_threads(threads)
    {
        std::vector<const T*> src(nsrc);
#pragma omp for schedule(static)
        for (int s = 0; s < nsite; ++s) {
            int y0, y1;
            out_site(g, s / g.R1, s % g.R1, &y0, &y1);
            int q = 0;
            for (int c = 0; c < cin; ++c)
                for (int dy = 0; dy < k; ++dy)
                    for (int dx = 0; dx < k; ++dx)
                        src[q++] = x + ((int64_t)(c * g.L0 + wrap(y0 + dy - g.p, g.L0)) * g.L1 +
                                        wrap(y1 + dx - g.p, g.L1)) * N;
            site_outputs<T>(src.data(), nsrc, W, nsrc, b, cout, out + (int64_t)s * N, ostride, N,
                            relu, slope);
        }
    }
}

template <typename T>
void conv_bwd_input(const T* gout, const T* W, const T* act, T* gx, int cin, int cout,
                    const Geo& g, T slope, int threads) {
    const int N = g.N, k = g.k, kk = k * k, nin = g.L0 * g.L1;
    const int64_t gstride = (int64_t)g.R0 * g.R1 * N, xstride = (int64_t)nin * N;
#pragma omp parallel num_threads(threads)
    {
        std::vector<const T*> src(cout * kk);
        std::vector<T> coef((size_t)cin * cout * kk);
#pragma omp for schedule(static)
        for (int s = 0; s < nin; ++s) {
            const int y0 = s / g.L1, y1 = s % g.L1;
            int q = 0;
            for (int dy = 0; dy < k; ++dy) {
                const int r0 = out_row(g, 0, wrap(y0 - dy + g.p, g.L0));
                if (r0 < 0) continue;
                for (int dx = 0; dx < k; ++dx) {
                    const int r1 = out_row(g, 1, wrap(y1 - dx + g.p, g.L1));
                    if (r1 < 0) continue;
                    for (int o = 0; o < cout; ++o) {
                        src[q] = gout + o * gstride + ((int64_t)r0 * g.R1 + r1) * N;
                        for (int c = 0; c < cin; ++c)
                            coef[(size_t)c * cout * kk + q] = W[((o * cin + c) * k + dy) * k + dx];
                        ++q;
                    }
                }
            }
            T* dst = gx + (int64_t)s * N;
            if (q == 0) {
                for (int c = 0; c < cin; ++c) std::memset(dst + c * xstride, 0, sizeof(T) * N);
                continue;
            }
            site_outputs<T>(src.data(), q, coef.data(), (int64_t)cout * kk, nullptr, cin, dst,
                            xstride, N, 0, slope);
            if (act) {  // leaky-ReLU derivative of the input activation (act > 0 iff z > 0)
                for (int c = 0; c < cin; ++c) {
                    T* d = dst + c * xstride;
                    const T* a = act + c * xstride + (int64_t)s * N;
                    for (int n = 0; n < N; ++n) d[n] = a[n] > T(0) ? d[n] : d[n] * slope;
                }
            }
        }
    }
}

// gW[q] = sum_{s, n} g[s, n] x[off[s, q] + n] for KK = k*k taps held in registers; N = nv V.
template <typename T, int KK>
inline void weight_sums(const T* gp, const T* xc, const int64_t* off, int nsite, int nv, T* gW) {
    using vec = typename Vec<T>::type;
    constexpr int V = Vec<T>::V;
    vec acc[KK];
    for (int q = 0; q < KK; ++q) acc[q] = vec{};
    for (int s = 0; s < nsite; ++s) {
        const T* gs = gp + (int64_t)s * nv * V;
        const int64_t* os = off + (size_t)s * KK;
        for (int j = 0; j < nv; ++j) {
            vec a;
            std::memcpy(&a, gs + j * V, sizeof(vec));
            for (int q = 0; q < KK; ++q) {
                vec bb;
                std::memcpy(&bb, xc + os[q] + j * V, sizeof(vec));
                acc[q] += a * bb;
            }
        }
    }
    for (int q = 0; q < KK; ++q) {
        T sum = T(0);
        for (int l = 0; l < V; ++l) sum += acc[q][l];
        gW[q] = sum;
    }
}

template <typename T>
void conv_bwd_weight(const T* gout, const T* x, T* gW, T* gb, int cin, int cout, const Geo& g,
                     int threads) {
    using vec = typename Vec<T>::type;
    constexpr int V = Vec<T>::V;
    const int N = g.N, k = g.k, kk = k * k, nsite = g.R0 * g.R1;
    const int64_t gstride = (int64_t)nsite * N, xstride = (int64_t)g.L0 * g.L1 * N;
    const int nv = N / V;
    // offsets of the k x k input sites of every output site (no integer division in the loop)
    std::vector<int64_t> off((size_t)nsite * kk);
    for (int s = 0; s < nsite; ++s) {
        int y0, y1;
        out_site(g, s / g.R1, s % g.R1, &y0, &y1);
        for (int dy = 0; dy < k; ++dy)
            for (int dx = 0; dx < k; ++dx)
                off[(size_t)s * kk + dy * k + dx] =
                    ((int64_t)wrap(y0 + dy - g.p, g.L0) * g.L1 + wrap(y1 + dx - g.p, g.L1)) * N;
    }
#pragma omp parallel num_threads(threads)
    {
        std::vector<vec> acc(kk);
        std::vector<T> tail(kk);
#pragma omp for schedule(static) collapse(2)
        for (int o = 0; o < cout; ++o)
            for (int c = 0; c < cin; ++c) {
                const T* xc = x + c * xstride;
                if (nv * V == N && (k == 1 || k == 3)) {  // registers hold all k*k sums
                    if (k == 3)
                        weight_sums<T, 9>(gout + o * gstride, xc, off.data(), nsite, nv,
                                          gW + (o * cin + c) * kk);
                    else
                        weight_sums<T, 1>(gout + o * gstride, xc, off.data(), nsite, nv,
                                          gW + (o * cin + c) * kk);
                    continue;
                }
                for (int q = 0; q < kk; ++q) acc[q] = vec{}, tail[q] = T(0);
                for (int s = 0; s < nsite; ++s) {
                    const T* gp = gout + o * gstride + (int64_t)s * N;
                    const int64_t* os = off.data() + (size_t)s * kk;
                    for (int q = 0; q < kk; ++q) {
                        const T* xp = xc + os[q];
                        vec t{};
                        for (int j = 0; j < nv; ++j) {
                            vec a, bb;
                            std::memcpy(&a, gp + j * V, sizeof(vec));
                            std::memcpy(&bb, xp + j * V, sizeof(vec));
                            t += a * bb;
                        }
                        acc[q] += t;
                        if (nv * V < N) {
                            T ts = T(0);
                            for (int n = nv * V; n < N; ++n) ts += gp[n] * xp[n];
                            tail[q] += ts;
                        }
                    }
                }
                for (int q = 0; q < kk; ++q) {
                    T sum = tail[q];
                    for (int l = 0; l < V; ++l) sum += acc[q][l];
                    gW[(o * cin + c) * kk + q] = sum;
                }
            }
#pragma omp for schedule(static)
        for (int o = 0; o < cout; ++o) {
            const T* gp = gout + o * gstride;
            T sum = T(0);
            for (int64_t i = 0; i < gstride; ++i) sum += gp[i];
            gb[o] = sum;
        }
    }
}

}  // namespace

extern "C" {

// Layout and size checks for the loader: bytes of the two real types and vector lanes.
void hpcflow_conv_config(int* float_lanes, int* double_lanes) {
    *float_lanes = Vec<float>::V;
    *double_lanes = Vec<double>::V;
}

#define HPCFLOW_CONV_API(T, S)                                                                   \
    void hpcflow_conv2d_fwd_##S(const T* x, const T* W, const T* b, T* out, int cin, int cout,   \
                                int L0, int L1, int N, int k, int axis, int start, int step,     \
                                int relu, double slope, int threads) {                           \
        conv_fwd<T>(x, W, b, out, cin, cout, make_geo(L0, L1, N, k, axis, start, step), relu,     \
                    T(slope), threads);                                                          \
    }                                                                                            \
    void hpcflow_conv2d_bwd_input_##S(const T* gout, const T* W, const T* act, T* gx, int cin,   \
                                      int cout, int L0, int L1, int N, int k, int axis,          \
                                      int start, int step, double slope, int threads) {          \
        conv_bwd_input<T>(gout, W, act, gx, cin, cout,                                           \
                          make_geo(L0, L1, N, k, axis, start, step), T(slope), threads);         \
    }                                                                                            \
    void hpcflow_conv2d_bwd_weight_##S(const T* gout, const T* x, T* gW, T* gb, int cin,         \
                                       int cout, int L0, int L1, int N, int k, int axis,         \
                                       int start, int step, int threads) {                       \
        conv_bwd_weight<T>(gout, x, gW, gb, cin, cout, make_geo(L0, L1, N, k, axis, start, step), \
                           threads);                                                             \
    }

HPCFLOW_CONV_API(float, f)
HPCFLOW_CONV_API(double, d)

}  // extern "C"
