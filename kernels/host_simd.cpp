// host_simd.cpp -- CPU-only plaquette field and staple sum with SIMD lanes across sites: the
// production host backend (the harness build of plaquette.cu / staple.cu stays the
// verification of the CUDA sources, and gives the same values).
//
// The harness build runs the CUDA kernels as scalar code: one CUDA thread = one site, links
// read as interleaved (re, im) records of N*N complex numbers (array of structures); a CPU
// core then does ~3 flops per cycle. Here the same SU(N) algebra of su_n.cuh is instantiated
// with T = a GCC vector of W reals (W = HPCFLOW_SIMD_BYTES / sizeof(real)), so one
// instruction advances W sites along the fastest lattice dimension x_{ND-1}:
//
//  1. transpose: each x_0 slab of the links is copied into a scratch of tiles
//     S[mu][row][c][k][re|im][l], row = the coordinates x_1 .. x_{ND-2}, c the tile,
//     k the matrix element, l the lane; tile c holds x_{ND-1} = j0 + c W + l taken
//     periodically on the padded array (mod ext), one extra tile after the last (the +1
//     neighbour along x_{ND-1}) and, for the staple, one before the first (the -1
//     neighbour). A neighbour along x_{ND-1} is one two-source permute of adjacent tiles.
//     Slabs go through a window of 2 (plaquette) or 3 (staple: x_0 - 1, x_0, x_0 + 1)
//     scratch slabs, so the field is read from memory about once. When that window would
//     exceed HPCFLOW_SIMD_WINDOW_BYTES (default 8 MiB; one slab of a 24^3 x L SU(3) float64
//     lattice is ~9 MB), the slabs are cut into blocks of x_1 (plus the neighbour rows of
//     x_1 +- 1, transposed twice) and the x_0 sweep runs once per block, so the window stays
//     in cache (24^4: 1.7-1.9x faster plaquette, 1.3x faster staple);
//  2. compute: per row, W lanes at a time, the formulas of plaquette.cu and staple.cu (the
//     staple with its last products accumulated in place, so equal to rounding).
//
// Same outputs as the CUDA kernels: plaquette out[b, plane, x_0 .. x_{ND-1}] (real), staple
// out[b, mu, x_0 .. x_{ND-1}, i, j] (complex, interleaved); values on the computed sites,
// 0 on halo sites (unless all_sites); neighbours wrap on the padded array. The scratch is
// kept between calls (grow only); calls are serialised by a mutex.
//
// Build (hpcflow.kernels.host, cached like host_lib.cpp):
//   g++ -O3 -march=native -fopenmp -std=c++17 -shared -fPIC -DHPCFLOW_N=3
//       -DHPCFLOW_REAL=double -DHPCFLOW_ND=4 [-DHPCFLOW_SIMD_BYTES=64] host_simd.cpp
#include <sys/mman.h>

#include <algorithm>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <new>
#include <type_traits>
#include <utility>
#include <vector>

#include "host_harness.h"
#include "su_n.cuh"

#ifndef HPCFLOW_N
#error "define HPCFLOW_N (1, 2 or 3)"
#endif
#ifndef HPCFLOW_REAL
#error "define HPCFLOW_REAL (double or float)"
#endif
#ifndef HPCFLOW_ND
#error "define HPCFLOW_ND (2 or 4)"
#endif
#ifndef HPCFLOW_SIMD_BYTES
#define HPCFLOW_SIMD_BYTES 32
#endif

namespace {

using real_t = HPCFLOW_REAL;
constexpr int N = HPCFLOW_N;
constexpr int ND = HPCFLOW_ND;
constexpr int NN = N * N;
constexpr int NP = ND * (ND - 1) / 2;
constexpr int LAST = ND - 1;
constexpr int W = HPCFLOW_SIMD_BYTES / (int)sizeof(real_t);
static_assert(W >= 1 && W * (int)sizeof(real_t) == HPCFLOW_SIMD_BYTES, "bad HPCFLOW_SIMD_BYTES");

typedef real_t vec __attribute__((vector_size(HPCFLOW_SIMD_BYTES)));
// Same vector, alignment of one real: for unaligned loads and stores.
typedef real_t vec_u __attribute__((vector_size(HPCFLOW_SIMD_BYTES), aligned(sizeof(real_t))));

using VMat = hpcflow::Mat<vec, N>;

// Geometry of the padded local array and of the scratch. Lanes cover x_{ND-1} in [j0, j1)
// (the interior, or every site for the all-sites staple) in nchunk vectors; a scratch block
// (mu, row) holds tiles c = -lead .. nchunk.
//
// x_1 blocks (ND = 4, large slabs): the scratch then holds the rows of x_1 in a block only,
// [bx_first, bx_first + bx_ext) (mod ext[1]) as local x_1 = 0 .. bx_ext - 1, of which local
// [bx_c0, bx_c1) are computed and the others are the neighbours' rows (one after, and for the
// staple one before). Rows of the scratch ("local rows") are x_1 (local) x the other row
// coordinates; unblocked, local rows are the rows of the slab.
struct Layout {
    long long nbatch;
    int ext[ND], halo[ND];
    long long slab_rows;  // rows per slab: prod_{0 < d < ND-1} ext[d] (1 for ND = 2)
    long long plane_rows; // rows per x_1 value: slab_rows / ext[1] (ND = 4), 1 (ND = 2)
    bool blocked;         // x_1 blocks, as above
    int bx_first, bx_ext, bx_c0, bx_c1;
    long long local_rows; // scratch rows per slab: bx_ext * plane_rows
    long long nsites;     // sites of the padded local array
    int len;              // ext[ND-1]: sites per row
    int j0, j1;           // lane range of the computed x_{ND-1}
    int nchunk;           // vectors per row over [j0, j1)
    int lead;             // tiles before the first chunk (0 or 1)
    long long row_stride[ND];  // rows between neighbours in dimension 0 < d < ND-1

    static constexpr long long tile = 2 * NN * W;  // one tile: [k][re|im][W lanes]
    long long block() const { return (lead + nchunk + 1) * tile; }  // one (mu, row) block
    long long slab_size() const { return ND * local_rows * block(); }
    // tile c (>= -lead) of block (mu, local row) of a scratch slab
    const real_t* tile_at(const real_t* slab, int mu, long long row, int c) const {
        return slab + (mu * local_rows + row) * block() + (c + lead) * tile;
    }
    // the slab row of a local row
    long long global_row(long long row) const {
        if (!blocked) return row;
        const long long lx = row / plane_rows, rest = row - lx * plane_rows;
        long long gx = bx_first + lx;
        while (gx < 0) gx += ext[1];
        while (gx >= ext[1]) gx -= ext[1];
        return gx * plane_rows + rest;
    }
    // no blocks: the whole slab
    void unblock() {
        blocked = false;
        bx_first = bx_c0 = 0;
        bx_ext = bx_c1 = ND > 2 ? ext[1] : 1;
        local_rows = slab_rows;
    }
    // the block computing x_1 in [first, first + n), with `before` neighbour rows before it
    // (0 for the plaquette, 1 for the staple) and one after
    void block_x1(int first, int n, int before) {
        blocked = true;
        bx_first = first - before;
        bx_c0 = before;
        bx_c1 = before + n;
        bx_ext = before + n + 1;
        local_rows = bx_ext * plane_rows;
    }
};

Layout make_layout(long long nbatch, const int* ext, const int* halo, bool all_lanes, int lead) {
    Layout l;
    l.nbatch = nbatch;
    for (int d = 0; d < ND; ++d) {
        l.ext[d] = ext[d];
        l.halo[d] = halo[d];
    }
    long long rows = 1;
    for (int d = ND - 2; d >= 0; --d) {
        l.row_stride[d] = rows;
        rows *= ext[d];
    }
    l.slab_rows = rows / ext[0];
    l.plane_rows = ND > 2 ? l.slab_rows / ext[1] : 1;
    l.len = ext[LAST];
    l.nsites = rows * l.len;
    l.j0 = all_lanes ? 0 : halo[LAST];
    l.j1 = all_lanes ? l.len : l.len - halo[LAST];
    l.nchunk = l.j1 > l.j0 ? (l.j1 - l.j0 + W - 1) / W : 0;
    l.lead = lead;
    l.unblock();
    return l;
}

inline int wrap(long long x, int n) { return (int)(((x % n) + n) % n); }

// Coordinate d (0 < d < ND-1) of a row of a slab, and the rows one step up / down in d
// (periodic on the padded array, like neighbour() in su_n.cuh).
inline int row_coord(const Layout& l, long long row, int d) {
    return (int)((row / l.row_stride[d]) % l.ext[d]);
}

inline long long row_step(const Layout& l, long long row, int d, int step) {
    if (d == 1 && l.blocked) return row + step * l.plane_rows;  // the block holds the neighbours
    const int x = row_coord(l, row, d);
    return row + (long long)(wrap(x + step, l.ext[d]) - x) * l.row_stride[d];
}

inline bool interior(const Layout& l, int d, int x) {
    return x >= l.halo[d] && x < l.ext[d] - l.halo[d];
}

inline bool row_interior(const Layout& l, int t, long long row) {
    bool in = interior(l, 0, t);
    row = l.global_row(row);
    for (int d = 1; d < LAST; ++d) in = in && interior(l, d, row_coord(l, row, d));
    return in;
}

inline vec loadu(const real_t* p) { return *reinterpret_cast<const vec_u*>(p); }
inline void storeu(real_t* p, vec v) { *reinterpret_cast<vec_u*>(p) = v; }

// Lanes shifted by +1 (j + 1, from tiles c and c + 1) or -1 (j - 1, from tiles c - 1 and
// c): one two-source permute of the concatenation a|b per vector.
typedef std::conditional_t<sizeof(real_t) == 8, long long, int> lane_int;
typedef lane_int lane_mask __attribute__((vector_size(HPCFLOW_SIMD_BYTES)));

template <int OFFSET, std::size_t... I>
constexpr lane_mask shift_mask(std::index_sequence<I...>) {
    return lane_mask{(lane_int)(I + OFFSET)...};
}

template <int STEP>
inline VMat load_tiles(const real_t* __restrict__ t) {
    VMat a;
    if constexpr (STEP == 0) {
HPCFLOW_UNROLL
        for (int k = 0; k < NN; ++k) {
            a.m[k].re = loadu(t + (2 * k) * W);
            a.m[k].im = loadu(t + (2 * k + 1) * W);
        }
    } else {
        // +1: lanes 1..W of (tile c | tile c+1); -1: lanes W-1..2W-2 of (tile c-1 | tile c)
        constexpr lane_mask m = shift_mask<STEP == 1 ? 1 : W - 1>(std::make_index_sequence<W>{});
        const real_t* lo = STEP == 1 ? t : t - Layout::tile;
        const real_t* hi = lo + Layout::tile;
HPCFLOW_UNROLL
        for (int k = 0; k < NN; ++k) {
            a.m[k].re = __builtin_shuffle(loadu(lo + (2 * k) * W), loadu(hi + (2 * k) * W), m);
            a.m[k].im = __builtin_shuffle(loadu(lo + (2 * k + 1) * W), loadu(hi + (2 * k + 1) * W), m);
        }
    }
    return a;
}

// acc += op(a) op(b), op = identity or dagger (A_DAG, B_DAG), accumulated in place: the
// last product of a staple goes straight into the staple sum (no intermediate matrix, no
// separate axpy), each real product one FMA.
template <bool A_DAG, bool B_DAG>
inline void mul_acc(VMat& acc, const VMat& a, const VMat& b) {
HPCFLOW_UNROLL
    for (int i = 0; i < N; ++i)
HPCFLOW_UNROLL
        for (int j = 0; j < N; ++j) {
            vec re = acc.m[i * N + j].re, im = acc.m[i * N + j].im;
HPCFLOW_UNROLL
            for (int k = 0; k < N; ++k) {
                const hpcflow::cplx<vec>& x = A_DAG ? a.m[k * N + i] : a.m[i * N + k];
                const hpcflow::cplx<vec>& y = B_DAG ? b.m[j * N + k] : b.m[k * N + j];
                // (xr + i sx xi)(yr + i sy yi), s = -1 for a conjugated factor
                re += x.re * y.re;
                if constexpr (A_DAG != B_DAG) re += x.im * y.im; else re -= x.im * y.im;
                if constexpr (B_DAG) im -= x.re * y.im; else im += x.re * y.im;
                if constexpr (A_DAG) im -= x.im * y.re; else im += x.im * y.re;
            }
            acc.m[i * N + j] = {re, im};
        }
}

inline void scale(VMat& a, vec w) {
HPCFLOW_UNROLL
    for (int k = 0; k < NN; ++k) {
        a.m[k].re *= w;
        a.m[k].im *= w;
    }
}

// A lattice position relative to the lanes of a row: a scratch slab of the window, a row
// of it, and a lane shift along x_{ND-1}.
struct Loc {
    const real_t* slab;
    int dslab;  // x_0 offset (-1, 0, +1)
    long long row;
    int shift;  // x_{ND-1} offset (-1, 0, +1)
};

// x + sum_d dx[d] d_hat for the lanes of (slab window[1], row).
inline Loc locate(const Layout& l, const real_t* const window[3], long long row, const int* dx) {
    Loc p{window[1 + dx[0]], dx[0], row, dx[LAST]};
    for (int d = 1; d < LAST; ++d)
        if (dx[d] != 0) p.row = row_step(l, p.row, d, dx[d]);
    return p;
}

// Link U_mu at position p, lanes of chunk c.
inline VMat link(const Layout& l, const Loc& p, int mu, int c) {
    const real_t* t = l.tile_at(p.slab, mu, p.row, c);
    return p.shift == 0 ? load_tiles<0>(t) : p.shift > 0 ? load_tiles<1>(t) : load_tiles<-1>(t);
}

// Slab x_0 = t of batch entry b of U (interleaved AoS) into scratch slab S. Work-shared:
// call inside a parallel region (implicit barrier at the end).
void transpose_slab(const real_t* __restrict__ U, real_t* __restrict__ S, const Layout& l,
                    long long b, int t) {
#pragma omp for collapse(2) schedule(static)
    for (int mu = 0; mu < ND; ++mu)
        for (long long row = 0; row < l.local_rows; ++row) {
            const long long site0 = ((long long)t * l.slab_rows + l.global_row(row)) * l.len;
            const real_t* src = U + ((b * ND + mu) * l.nsites + site0) * (2 * NN);
            for (int c = -l.lead; c <= l.nchunk; ++c) {
                real_t* d = const_cast<real_t*>(l.tile_at(S, mu, row, c));
                int x = l.j0 + c * W;  // periodic, without a division per lane
                while (x < 0) x += l.len;
                while (x >= l.len) x -= l.len;
                for (int q = 0; q < W; ++q, x = x + 1 < l.len ? x + 1 : 0) {
                    const real_t* s = src + (long long)x * (2 * NN);
HPCFLOW_UNROLL
                    for (int k = 0; k < 2 * NN; ++k) d[k * W + q] = s[k];
                }
            }
        }
}

// ---------------------------------------------------------------------------- plaquette

void plaquette_slab(const real_t* const window[3], real_t* __restrict__ out, const Layout& l,
                    long long b, int t) {
#pragma omp for schedule(static)
    for (long long row = l.bx_c0 * l.plane_rows; row < l.bx_c1 * l.plane_rows; ++row) {
        real_t* o = out + b * NP * l.nsites + ((long long)t * l.slab_rows + l.global_row(row)) * l.len;
        const int lo = row_interior(l, t, row) ? l.j0 : l.len;  // halo rows: all zero
        for (int p = 0; p < NP; ++p) {
            for (int j = 0; j < lo; ++j) o[p * l.nsites + j] = real_t(0);
            for (int j = l.j1 > lo ? l.j1 : lo; j < l.len; ++j) o[p * l.nsites + j] = real_t(0);
        }
        if (lo == l.len) continue;
        Loc here{window[1], 0, row, 0}, up[ND];
        for (int d = 0; d < ND; ++d) {
            int dx[ND] = {};
            dx[d] = 1;
            up[d] = locate(l, window, row, dx);
        }
        for (int c = 0; c < l.nchunk; ++c) {
            const int j = l.j0 + c * W;
            const int count = l.j1 - j < W ? l.j1 - j : W;
            vec res[NP];
HPCFLOW_UNROLL_DIRS
            for (int mu = 0; mu < ND; ++mu) {
                const VMat umu = link(l, here, mu, c);
HPCFLOW_UNROLL_DIRS
                for (int nu = mu + 1; nu < ND; ++nu) {
                    // Re tr[(U_mu(x) U_nu(x+mu)) (U_nu(x) U_mu(x+nu))^dag], as plaquette.cu
                    const VMat a = hpcflow::mul_nn<vec, N>(umu, link(l, up[mu], nu, c));
                    const VMat cm = hpcflow::mul_nn<vec, N>(link(l, here, nu, c), link(l, up[nu], mu, c));
                    res[hpcflow::plane_index<ND>(mu, nu)] = hpcflow::re_tr_nd<vec, N>(a, cm);
                }
            }
            if (count == W) {
                for (int p = 0; p < NP; ++p) storeu(o + p * l.nsites + j, res[p]);
            } else {
                for (int p = 0; p < NP; ++p)
                    for (int q = 0; q < count; ++q) o[p * l.nsites + j + q] = res[p][q];
            }
        }
    }
}

// ------------------------------------------------------------------------------- staple

// Per-thread weights of one row, lanes of every chunk: w(plane, x) and w(plane, x - nu).
struct RowWeights {
    std::vector<real_t> at;  // [NP][nchunk W]
    std::vector<real_t> dn;  // [nu][NP][nchunk W]
};

void gather_weights(const real_t* __restrict__ w, const Layout& l, long long b, int t,
                    const Loc& p, real_t* __restrict__ dst) {
    const int span = l.nchunk * W;
    const long long site_row = ((long long)wrap(t + p.dslab, l.ext[0]) * l.slab_rows + l.global_row(p.row)) * l.len;
    for (int pl = 0; pl < NP; ++pl) {
        const real_t* src = w + (b * NP + pl) * l.nsites + site_row;
        int x = wrap((long long)l.j0 + p.shift, l.len);
        for (int q = 0; q < span; ++q, x = x + 1 < l.len ? x + 1 : 0) dst[pl * span + q] = src[x];
    }
}

void staple_slab(const real_t* const window[3], const real_t* __restrict__ w,
                 real_t* __restrict__ out, const Layout& l, long long b, int t, bool all_sites,
                 bool dagger, RowWeights& rw) {
    const int span = l.nchunk * W;
#pragma omp for schedule(static)
    for (long long row = l.bx_c0 * l.plane_rows; row < l.bx_c1 * l.plane_rows; ++row) {
        const long long site_row = ((long long)t * l.slab_rows + l.global_row(row)) * l.len;
        const bool in = all_sites || row_interior(l, t, row);
        const int lo = in ? l.j0 : l.len;
        const int hi = in ? l.j1 : l.len;
        for (int mu = 0; mu < ND; ++mu) {
            real_t* o = out + ((b * ND + mu) * l.nsites + site_row) * (2 * NN);
            for (int j = 0; j < l.len; ++j)
                if (j < lo || j >= hi)
                    for (int k = 0; k < 2 * NN; ++k) o[(long long)j * 2 * NN + k] = real_t(0);
        }
        if (!in || l.nchunk == 0) continue;
        // positions x + mu, x + nu, x - nu, x + mu - nu of the lanes of this row
        const Loc here{window[1], 0, row, 0};
        Loc up[ND], dn[ND], up_dn[ND][ND];
        for (int d = 0; d < ND; ++d) {
            int dx[ND] = {};
            dx[d] = 1;
            up[d] = locate(l, window, row, dx);
            dx[d] = -1;
            dn[d] = locate(l, window, row, dx);
            for (int e = 0; e < ND; ++e) {
                if (e == d) continue;
                int dy[ND] = {};
                dy[d] = 1;
                dy[e] = -1;
                up_dn[d][e] = locate(l, window, row, dy);
            }
        }
        if (w) {
            gather_weights(w, l, b, t, here, rw.at.data());
            for (int nu = 0; nu < ND; ++nu) gather_weights(w, l, b, t, dn[nu], rw.dn.data() + nu * NP * span);
        }
        for (int c = 0; c < l.nchunk; ++c) {
            const int j = l.j0 + c * W;
            const int count = l.j1 - j < W ? l.j1 - j : W;
HPCFLOW_UNROLL_DIRS
            for (int mu = 0; mu < ND; ++mu) {
                VMat acc;
                hpcflow::set_zero<vec, N>(acc);
HPCFLOW_UNROLL_DIRS
                for (int nu = 0; nu < ND; ++nu) {
                    if (nu == mu) continue;
                    const int p = mu < nu ? hpcflow::plane_index<ND>(mu, nu) : hpcflow::plane_index<ND>(nu, mu);
                    // as staple.cu: U_nu(x+mu) U_mu(x+nu)^dag U_nu(x)^dag
                    //             + U_nu(x+mu-nu)^dag U_mu(x-nu)^dag U_nu(x-nu)
                    // upper = P U_nu(x)^dag, P = U_nu(x+mu) U_mu(x+nu)^dag;
                    // lower = Q^dag U_nu(x-nu), Q = U_mu(x-nu) U_nu(x+mu-nu); the weights
                    // (real) scale P and Q, the last products accumulate into acc.
                    VMat P = hpcflow::mul_nd<vec, N>(link(l, up[mu], nu, c), link(l, up[nu], mu, c));
                    VMat Q = hpcflow::mul_nn<vec, N>(link(l, dn[nu], mu, c), link(l, up_dn[mu][nu], nu, c));
                    if (w) {
                        scale(P, loadu(rw.at.data() + p * span + c * W));
                        scale(Q, loadu(rw.dn.data() + (nu * NP + p) * span + c * W));
                    }
                    mul_acc<false, true>(acc, P, link(l, here, nu, c));
                    mul_acc<true, false>(acc, Q, link(l, dn[nu], nu, c));
                }
                real_t* o = out + ((b * ND + mu) * l.nsites + site_row + j) * (2 * NN);
                for (int q = 0; q < count; ++q)
HPCFLOW_UNROLL
                    for (int r = 0; r < N; ++r)
HPCFLOW_UNROLL
                        for (int s = 0; s < N; ++s) {
                            real_t* e = o + (long long)q * 2 * NN + 2 * (r * N + s);
                            if (dagger) {
                                e[0] = acc.m[s * N + r].re[q];
                                e[1] = -acc.m[s * N + r].im[q];
                            } else {
                                e[0] = acc.m[r * N + s].re[q];
                                e[1] = acc.m[r * N + s].im[q];
                            }
                        }
            }
        }
    }
}

// ------------------------------------------------------------------------------ drivers

// Slabs in x_0 order through a window of scratch slabs: slot(t) holds slab t (mod ext).
template <int SLOTS>
struct Window {
    real_t* base;
    long long size;
    real_t* slot(int t) const { return base + (long long)(((t % SLOTS) + SLOTS) % SLOTS) * size; }
};

// x_1 block size: the computed x_1 per block, so that SLOTS scratch slabs of a block fit in
// the window budget (HPCFLOW_SIMD_WINDOW_BYTES, default 8 MiB: on 24^4 SU(3) float64 a
// window of whole slabs is 18.6 MB (plaquette) and falls out of a shared last-level cache).
// `before`: neighbour rows before the block (0 plaquette, 1 staple). ext[1] = no blocks.
int x1_block(const Layout& l, int slots, int before) {
    if (ND < 4) return l.ext[ND > 2 ? 1 : 0];
    long long budget = 8ll << 20;  // hpcflow.kernels.host.SIMD_WINDOW_BYTES
    if (const char* e = std::getenv("HPCFLOW_SIMD_WINDOW_BYTES")) {
        const long long v = std::atoll(e);
        if (v > 0) budget = v;
    }
    const long long plane = (long long)ND * l.plane_rows * l.block() * (long long)sizeof(real_t);
    if ((long long)slots * l.ext[1] * plane <= budget) return l.ext[1];
    long long n = budget / ((long long)slots * plane) - (before + 1);
    if (n < 1) n = 1;
    return n + before + 1 >= l.ext[1] ? l.ext[1] : (int)n;
}

// Layout of block k (computed x_1 in [k n, min((k + 1) n, ext[1]))), or the whole slab.
Layout block_layout(const Layout& l, int n, int k, int before) {
    Layout lb = l;
    if (n < lb.ext[ND > 2 ? 1 : 0]) {
        const int first = k * n;
        lb.block_x1(first, std::min(n, lb.ext[1] - first), before);
    }
    return lb;
}

int x1_blocks(const Layout& l, int n) {
    const int e = l.ext[ND > 2 ? 1 : 0];
    return n < e ? (e + n - 1) / n : 1;
}

// The slab size of the largest block (the window slots' stride).
long long max_slab_size(const Layout& l, int n, int before) {
    return block_layout(l, n, 0, before).slab_size();
}

void plaquette_field(const real_t* __restrict__ U, real_t* __restrict__ out, real_t* S,
                     const Layout& l, int n) {
    const Window<2> win{S, max_slab_size(l, n, 0)};
#pragma omp parallel
    for (long long b = 0; b < l.nbatch; ++b)
        for (int k = 0; k < x1_blocks(l, n); ++k) {
            const Layout lb = block_layout(l, n, k, 0);
            transpose_slab(U, win.slot(0), lb, b, 0);
            for (int t = 0; t < lb.ext[0]; ++t) {
                // slab t + 1 (0 at the wrap) into the other slot; implicit barriers between
                transpose_slab(U, win.slot(t + 1), lb, b, wrap(t + 1, lb.ext[0]));
                const real_t* const window[3] = {nullptr, win.slot(t), win.slot(t + 1)};
                plaquette_slab(window, out, lb, b, t);
            }
        }
}

void staple_field(const real_t* __restrict__ U, const real_t* __restrict__ w,
                  real_t* __restrict__ out, real_t* S, const Layout& l, int n, bool all_sites,
                  bool dagger) {
    const Window<3> win{S, max_slab_size(l, n, 1)};
#pragma omp parallel
    {
        RowWeights rw;
        if (w) {
            rw.at.resize((size_t)NP * l.nchunk * W);
            rw.dn.resize((size_t)ND * NP * l.nchunk * W);
        }
        for (long long b = 0; b < l.nbatch; ++b)
            for (int k = 0; k < x1_blocks(l, n); ++k) {
                const Layout lb = block_layout(l, n, k, 1);
                transpose_slab(U, win.slot(-1), lb, b, wrap(-1, lb.ext[0]));
                transpose_slab(U, win.slot(0), lb, b, 0);
                for (int t = 0; t < lb.ext[0]; ++t) {
                    transpose_slab(U, win.slot(t + 1), lb, b, wrap(t + 1, lb.ext[0]));
                    const real_t* const window[3] = {win.slot(t - 1), win.slot(t), win.slot(t + 1)};
                    staple_slab(window, w, out, lb, b, t, all_sites, dagger, rw);  // barrier: t-1 free
                }
            }
    }
}

std::mutex scratch_mutex;
// Grow only (no page faults on repeated calls), 2 MiB aligned and advised for transparent
// huge pages: the window spans thousands of 4 KiB pages, more than the TLB holds.
real_t* scratch = nullptr;
long long scratch_size = 0;

real_t* scratch_for(long long size) {
    if (scratch_size < size) {
        std::free(scratch);
        constexpr size_t huge = 2u << 20;
        const size_t bytes = ((size_t)size * sizeof(real_t) + huge - 1) / huge * huge;
        scratch = static_cast<real_t*>(std::aligned_alloc(huge, bytes));
        if (!scratch) throw std::bad_alloc();
#ifdef MADV_HUGEPAGE
        madvise(scratch, bytes, MADV_HUGEPAGE);
#endif
        std::memset(scratch, 0, bytes);
        scratch_size = (long long)(bytes / sizeof(real_t));
    }
    return scratch;
}

}  // namespace

extern "C" {

void hpcflow_simd_config(int* n, int* nd, int* real_bytes, int* lanes) {
    *n = N;
    *nd = ND;
    *real_bytes = (int)sizeof(real_t);
    *lanes = W;
}

// The x_1 block (computed x_1 per block; ext[1] = whole slabs) the plaquette (staple = 0) or
// the staple would use for this geometry under the current HPCFLOW_SIMD_WINDOW_BYTES.
int hpcflow_simd_x1_block(const int* ext, const int* halo, int staple, int all_sites) {
    const Layout l = make_layout(1, ext, halo, staple && all_sites, staple ? 1 : 0);
    return staple ? x1_block(l, 3, 1) : x1_block(l, 2, 0);
}

// U: complex [nbatch, ND, sites...] interleaved; out: real [nbatch, NP, sites...].
void hpcflow_plaquette_re_tr_simd(const void* U, void* out, long long nbatch, const int* ext,
                                  const int* halo) {
    const Layout l = make_layout(nbatch, ext, halo, false, 0);
    const int n = x1_block(l, 2, 0);
    std::lock_guard<std::mutex> guard(scratch_mutex);
    real_t* S = scratch_for(2 * max_slab_size(l, n, 0));
    plaquette_field(static_cast<const real_t*>(U), static_cast<real_t*>(out), S, l, n);
}

// The arguments of hpcflow_staple_sum (host_lib.cpp): w real [nbatch, NP, sites...] or
// null; out complex, the layout of U.
void hpcflow_staple_sum_simd(const void* U, const void* w, void* out, long long nbatch,
                             int all_sites, int dagger, const int* ext, const int* halo) {
    const Layout l = make_layout(nbatch, ext, halo, all_sites != 0, 1);
    const int n = x1_block(l, 3, 1);
    std::lock_guard<std::mutex> guard(scratch_mutex);
    real_t* S = scratch_for(3 * max_slab_size(l, n, 1));
    staple_field(static_cast<const real_t*>(U), static_cast<const real_t*>(w),
                 static_cast<real_t*>(out), S, l, n, all_sites != 0, dagger != 0);
}

}  // extern "C"
