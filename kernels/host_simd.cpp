// host_simd.cpp -- CPU-only plaquette field with SIMD lanes across sites (the production
// host backend of the plaquette; the harness build of plaquette.cu stays the verification
// of the CUDA source).
//
// The harness build runs plaquette.cu as scalar code: one CUDA thread = one site, links read
// as interleaved (re, im) records of N*N complex numbers (array of structures). A CPU core
// then does ~3 flops per cycle. Here the same SU(N) algebra of su_n.cuh is instantiated with
// T = a GCC vector of W reals (W = HPCFLOW_SIMD_BYTES / sizeof(real)), so one instruction
// advances W sites along the fastest lattice dimension x_{ND-1}:
//
//  1. transpose: the links are copied into a structure-of-arrays scratch
//     S[b][mu][row][k][re|im][j], row = the site's coordinates x_0 .. x_{ND-2}, k the matrix
//     element, j = x_{ND-1} (each row is padded and filled periodically on the padded array,
//     S[..][j] = U at x_{ND-1} = j mod ext, so the +1 neighbour along x_{ND-1} of any lane
//     is the next element: an unaligned vector load);
//  2. compute: per row, W lanes at a time over the interior x_{ND-1} range: for each plane,
//     Re tr[(U_mu(x) U_nu(x+mu)) (U_nu(x) U_mu(x+nu))^dag], the formula of plaquette.cu.
//
// Same output as plaquette.cu: out[b, plane, x_0 .. x_{ND-1}], exact value on interior sites,
// 0 on halo sites; neighbours wrap on the padded array. The transposition is one extra pass
// over the field (read once, write once); the scratch is kept between calls (grow only).
//
// Build (hpcflow.kernels.host, cached like host_lib.cpp):
//   g++ -O3 -march=native -fopenmp -std=c++17 -shared -fPIC -DHPCFLOW_N=3
//       -DHPCFLOW_REAL=double -DHPCFLOW_ND=4 [-DHPCFLOW_SIMD_BYTES=64] host_simd.cpp
#include <cstddef>
#include <mutex>
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
constexpr int W = HPCFLOW_SIMD_BYTES / (int)sizeof(real_t);
static_assert(W >= 1 && W * (int)sizeof(real_t) == HPCFLOW_SIMD_BYTES, "bad HPCFLOW_SIMD_BYTES");

typedef real_t vec __attribute__((vector_size(HPCFLOW_SIMD_BYTES)));
// Same vector, alignment of one real: for unaligned loads and stores.
typedef real_t vec_u __attribute__((vector_size(HPCFLOW_SIMD_BYTES), aligned(sizeof(real_t))));

using VMat = hpcflow::Mat<vec, N>;

struct Layout {
    long long nbatch;
    int ext[ND], halo[ND];
    long long slab_rows;  // rows per slab: prod_{0 < d < ND-1} ext[d] (1 for ND = 2)
    long long nsites;     // sites of the padded local array
    int len;              // ext[ND-1]: sites per row
    int h;                // halo[ND-1]
    int nchunk;           // vectors per row over the interior x_{ND-1} range
    long long row_stride[ND];  // row_stride[d]: rows between neighbours in dimension d < ND-1

    static constexpr long long tile = 2 * NN * W;  // one tile: [k][re|im][W lanes]
    // one (mu, row) block: nchunk tiles + one for the +1 neighbour of the last lanes
    long long block() const { return (nchunk + 1) * tile; }
    long long slab_size() const { return ND * slab_rows * block(); }
    // offset of block (mu, row) in a scratch slab
    long long off(int mu, long long row) const { return (mu * slab_rows + row) * block(); }
};

Layout make_layout(long long nbatch, const int* ext, const int* halo) {
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
    l.len = ext[ND - 1];
    l.nsites = rows * l.len;
    l.h = halo[ND - 1];
    const int interior = l.len - 2 * l.h;
    l.nchunk = interior > 0 ? (interior + W - 1) / W : 0;
    return l;
}

// Coordinate d (0 < d < ND-1) of a row of a slab, and the row one step up in d (periodic
// on the padded array, like neighbour() in su_n.cuh).
inline int row_coord(const Layout& l, long long row, int d) {
    return (int)((row / l.row_stride[d]) % l.ext[d]);
}

inline long long row_up(const Layout& l, long long row, int d) {
    return row_coord(l, row, d) + 1 < l.ext[d] ? row + l.row_stride[d]
                                               : row - (long long)(l.ext[d] - 1) * l.row_stride[d];
}

inline bool interior(const Layout& l, int d, int x) { return x >= l.halo[d] && x < l.ext[d] - l.halo[d]; }

inline vec loadu(const real_t* p) { return *reinterpret_cast<const vec_u*>(p); }
inline void storeu(real_t* p, vec v) { *reinterpret_cast<vec_u*>(p) = v; }

// The matrix of tile c of a scratch block (lanes j = h + c W + l).
inline VMat load_mat(const real_t* __restrict__ blk, int c) {
    const real_t* t = blk + c * Layout::tile;
    VMat a;
HPCFLOW_UNROLL
    for (int k = 0; k < NN; ++k) {
        a.m[k].re = loadu(t + (2 * k) * W);
        a.m[k].im = loadu(t + (2 * k + 1) * W);
    }
    return a;
}

// Lanes shifted by one (j + 1): the +1 neighbour along x_{ND-1}, from tiles c and c + 1
// (one two-source permute per vector: lanes 1..W of the concatenation a|b).
typedef std::conditional_t<sizeof(real_t) == 8, long long, int> lane_int;
typedef lane_int lane_mask __attribute__((vector_size(HPCFLOW_SIMD_BYTES)));

template <std::size_t... I>
constexpr lane_mask shift_mask(std::index_sequence<I...>) {
    return lane_mask{(lane_int)(I + 1)...};
}

inline vec shift1(vec a, vec b) {
    constexpr lane_mask m = shift_mask(std::make_index_sequence<W>{});
    return __builtin_shuffle(a, b, m);
}

inline VMat load_mat_shift(const real_t* __restrict__ blk, int c) {
    const real_t* t = blk + c * Layout::tile;
    const real_t* u = t + Layout::tile;
    VMat a;
HPCFLOW_UNROLL
    for (int k = 0; k < NN; ++k) {
        a.m[k].re = shift1(loadu(t + (2 * k) * W), loadu(u + (2 * k) * W));
        a.m[k].im = shift1(loadu(t + (2 * k + 1) * W), loadu(u + (2 * k + 1) * W));
    }
    return a;
}

inline VMat load_nbr(const real_t* __restrict__ blk, int c, bool shifted) {
    return shifted ? load_mat_shift(blk, c) : load_mat(blk, c);
}

// Slab x_0 = t of batch entry b of U (interleaved AoS) into scratch slab S (tiles, lanes
// j = h + c W + l taken periodically mod ext). Work-shared: call inside a parallel region.
void transpose_slab(const real_t* __restrict__ U, real_t* __restrict__ S, const Layout& l,
                    long long b, int t) {
#pragma omp for collapse(2) schedule(static)
    for (int mu = 0; mu < ND; ++mu)
        for (long long row = 0; row < l.slab_rows; ++row) {
            const long long site0 = ((long long)t * l.slab_rows + row) * l.len;
            const real_t* src = U + ((b * ND + mu) * l.nsites + site0) * (2 * NN);
            real_t* dst = S + l.off(mu, row);
            for (int c = 0; c <= l.nchunk; ++c)
                for (int q = 0; q < W; ++q) {
                    const int j = l.h + c * W + q;
                    const real_t* s = src + (long long)(j < l.len ? j : j % l.len) * (2 * NN);
                    real_t* d = dst + c * Layout::tile + q;
HPCFLOW_UNROLL
                    for (int k = 0; k < 2 * NN; ++k) d[k * W] = s[k];
                }
        }
}

// Re tr P for every site of slab t (interior rows; halo x_{ND-1} lanes zeroed) from the
// scratch slabs `cur` (x_0 = t) and `nxt` (x_0 = t + 1). Work-shared.
void plaquette_slab(const real_t* __restrict__ cur, const real_t* __restrict__ nxt,
                    real_t* __restrict__ out, const Layout& l, long long b, int t) {
    constexpr int last = ND - 1;
#pragma omp for schedule(static)
    for (long long row = 0; row < l.slab_rows; ++row) {
        real_t* o = out + b * NP * l.nsites + ((long long)t * l.slab_rows + row) * l.len;
        bool in = interior(l, 0, t);
        for (int d = 1; d < last; ++d) in = in && interior(l, d, row_coord(l, row, d));
        if (!in) {
            for (int p = 0; p < NP; ++p)
                for (int j = 0; j < l.len; ++j) o[p * l.nsites + j] = real_t(0);
            continue;
        }
        for (int p = 0; p < NP; ++p) {
            for (int j = 0; j < l.h; ++j) o[p * l.nsites + j] = real_t(0);
            for (int j = l.len - l.h; j < l.len; ++j) o[p * l.nsites + j] = real_t(0);
        }
        const real_t* at_up[ND];  // slab of x + d_hat
        for (int d = 0; d < ND; ++d) at_up[d] = d == 0 ? nxt : cur;
        long long row_of[ND];
        row_of[0] = row;
        for (int d = 1; d < last; ++d) row_of[d] = row_up(l, row, d);
        row_of[last] = row;  // the last dimension moves along the lanes (shift)
        for (int c = 0; c < l.nchunk; ++c) {
            const int j = l.h + c * W;
            const int count = l.len - l.h - j < W ? l.len - l.h - j : W;
            vec res[NP];
HPCFLOW_UNROLL_DIRS
            for (int mu = 0; mu < ND; ++mu) {
                const VMat umu = load_mat(cur + l.off(mu, row), c);
HPCFLOW_UNROLL_DIRS
                for (int nu = mu + 1; nu < ND; ++nu) {
                    const VMat unu = load_mat(cur + l.off(nu, row), c);
                    // U_nu(x + mu) and U_mu(x + nu)
                    const VMat a = hpcflow::mul_nn<vec, N>(
                        umu, load_nbr(at_up[mu] + l.off(nu, row_of[mu]), c, mu == last));
                    const VMat cm = hpcflow::mul_nn<vec, N>(
                        unu, load_nbr(at_up[nu] + l.off(mu, row_of[nu]), c, nu == last));
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

// The whole field: slabs in x_0 order through a window of two scratch slabs (kept in the
// last-level cache for lattices up to ~24^3 x L SU(3) float64), so the field is read from
// memory once; slab 0 is transposed again at the wrap (x_0 = ext-1 needs x_0 = 0).
void plaquette_field(const real_t* __restrict__ U, real_t* __restrict__ out, real_t* S,
                     const Layout& l) {
    real_t* slot[2] = {S, S + l.slab_size()};
#pragma omp parallel
    for (long long b = 0; b < l.nbatch; ++b) {
        transpose_slab(U, slot[0], l, b, 0);
        for (int t = 0; t < l.ext[0]; ++t) {
            const int tn = t + 1 < l.ext[0] ? t + 1 : 0;
            real_t* cur = slot[t & 1];
            real_t* nxt = slot[(t + 1) & 1];
            transpose_slab(U, nxt, l, b, tn);  // implicit barrier: nxt is complete
            plaquette_slab(cur, nxt, out, l, b, t);  // implicit barrier: cur is free
        }
    }
}

std::mutex scratch_mutex;
std::vector<real_t> scratch;  // grow only: no page faults on repeated calls

}  // namespace

extern "C" {

void hpcflow_simd_config(int* n, int* nd, int* real_bytes, int* lanes) {
    *n = N;
    *nd = ND;
    *real_bytes = (int)sizeof(real_t);
    *lanes = W;
}

// U: complex [nbatch, ND, sites...] interleaved; out: real [nbatch, NP, sites...].
void hpcflow_plaquette_re_tr_simd(const void* U, void* out, long long nbatch, const int* ext,
                                  const int* halo) {
    const Layout l = make_layout(nbatch, ext, halo);
    std::lock_guard<std::mutex> guard(scratch_mutex);
    const long long size = 2 * l.slab_size();
    if ((long long)scratch.size() < size) scratch.resize((size_t)size);
    plaquette_field(static_cast<const real_t*>(U), static_cast<real_t*>(out), scratch.data(), l);
}

}  // extern "C"
