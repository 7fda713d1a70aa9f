// Philox4x32-10 counter-based random numbers for the host update kernels: the exact mapping
// of hpcflow/rng.py (CounterRNG), so a kernel draws bit for bit the words the torch path
// draws. Keys are computed in Python (CounterRNG._key_site / _key_chain) and passed in.
//
//   counter: c0 = lo(index), c1 = hi(index), c2 = step, c3 = block | kind << 24
//   words:   block b of a (index, step, kind) sequence gives words 4b .. 4b + 3
//   double uniform j: words 2j (a), 2j + 1 (b): k = (a >> 5) 2^26 + (b >> 6), u = k 2^-53
//   float uniform j:  word j: k = w >> 8, u = k 2^-24;  k = 0 is replaced by 1/2 (u in (0, 1))
//   normals (kind 1): uniforms (2i, 2i + 1) -> r cos(2 pi u2), r sin(2 pi u2), r = sqrt(-2 ln u1)
//
// Salmon, Moraes, Dror, Shaw, SC11 (Random123). Header-only, no state: every function is a
// pure function of its arguments, so OpenMP threads call them freely.
#pragma once

#include <cmath>
#include <cstdint>

namespace hpcflow_rng {

constexpr uint32_t kKindUniform = 0;
constexpr uint32_t kKindNormal = 1;

struct Key {
  uint32_t k0, k1;
};

// Philox4x32-10 of counter c (in place) under key (k0, k1).
static inline void philox4x32_10(uint32_t c[4], uint32_t k0, uint32_t k1) {
  for (int r = 0; r < 10; ++r) {
    if (r > 0) {
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    const uint64_t p0 = uint64_t(0xD2511F53u) * c[0];
    const uint64_t p1 = uint64_t(0xCD9E8D57u) * c[2];
    const uint32_t hi0 = uint32_t(p0 >> 32), lo0 = uint32_t(p0);
    const uint32_t hi1 = uint32_t(p1 >> 32), lo1 = uint32_t(p1);
    const uint32_t n0 = hi1 ^ c[1] ^ k0, n2 = hi0 ^ c[3] ^ k1;
    c[0] = n0;
    c[1] = lo1;
    c[2] = n2;
    c[3] = lo0;
  }
}

// The four words of block `block` of the (index, step, kind) sequence.
static inline void block_words(Key key, uint64_t index, uint32_t step, uint32_t kind,
                               uint32_t block, uint32_t w[4]) {
  w[0] = uint32_t(index);
  w[1] = uint32_t(index >> 32);
  w[2] = step;
  w[3] = block | (kind << 24);
  philox4x32_10(w, key.k0, key.k1);
}

static inline double uniform_from_words(uint32_t a, uint32_t b) {
  const uint64_t k = (uint64_t(a >> 5) << 26) | uint64_t(b >> 6);
  return (k == 0 ? 0.5 : double(k)) * 0x1p-53;
}

static inline float uniform_from_word(uint32_t w) {
  const uint32_t k = w >> 8;
  return (k == 0 ? 0.5f : float(k)) * 0x1p-24f;
}

// n float64 uniforms 0 .. n-1 of (index, step) (CounterRNG.uniform(index, step, n)).
static inline void uniforms(Key key, uint64_t index, uint32_t step, int n, double* out) {
  uint32_t w[4];
  for (int j = 0; j < n; j += 2) {
    block_words(key, index, step, kKindUniform, uint32_t(j / 2), w);
    out[j] = uniform_from_words(w[0], w[1]);
    if (j + 1 < n) out[j + 1] = uniform_from_words(w[2], w[3]);
  }
}

// n float32 uniforms (CounterRNG.uniform(..., dtype=torch.float32)).
static inline void uniforms(Key key, uint64_t index, uint32_t step, int n, float* out) {
  uint32_t w[4];
  for (int j = 0; j < n; j += 4) {
    block_words(key, index, step, kKindUniform, uint32_t(j / 4), w);
    for (int q = 0; q < 4 && j + q < n; ++q) out[j + q] = uniform_from_word(w[q]);
  }
}

// n float64 standard normals (CounterRNG.normal(index, step, n)): one block per pair.
static inline void normals(Key key, uint64_t index, uint32_t step, int n, double* out) {
  uint32_t w[4];
  for (int i = 0; 2 * i < n; ++i) {
    block_words(key, index, step, kKindNormal, uint32_t(i), w);
    const double u1 = uniform_from_words(w[0], w[1]);
    const double u2 = uniform_from_words(w[2], w[3]);
    const double r = std::sqrt(-2.0 * std::log(u1));
    const double phi = 2.0 * M_PI * u2;
    out[2 * i] = r * std::cos(phi);
    if (2 * i + 1 < n) out[2 * i + 1] = r * std::sin(phi);
  }
}

// n float32 standard normals: uniforms 2i, 2i + 1 are words 2i, 2i + 1 (two pairs a block).
static inline void normals(Key key, uint64_t index, uint32_t step, int n, float* out) {
  uint32_t w[4];
  for (int i = 0; 2 * i < n; ++i) {
    if (i % 2 == 0) block_words(key, index, step, kKindNormal, uint32_t(i / 2), w);
    const float u1 = uniform_from_word(w[2 * (i % 2)]);
    const float u2 = uniform_from_word(w[2 * (i % 2) + 1]);
    const float r = std::sqrt(-2.0f * std::log(u1));
    const float phi = float(2.0 * M_PI) * u2;
    out[2 * i] = r * std::cos(phi);
    if (2 * i + 1 < n) out[2 * i + 1] = r * std::sin(phi);
  }
}

}  // namespace hpcflow_rng
