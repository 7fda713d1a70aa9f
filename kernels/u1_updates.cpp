// u1_updates.cpp -- host (CPU) HMC trajectories, heat-bath and overrelaxation sweeps of the
// 2D U(1) Wilson action, whole updates in one call. The C++ twin of hpcflow/sampling/hmc.py
// (HMC.trajectory with leapfrog / omelyan) and hpcflow/sampling/heatbath.py (heatbath_sweep,
// overrelax_sweep) for U(1), nd = 2, one rank (periodic, unpadded arrays): the same Philox
// draws (philox.h) at the same counters, the same integrator schedule, the same accept rule,
// so the results equal the torch path's to rounding (~1e-15 per operation; a Metropolis or
// von Mises accept decision would differ only if a test value fell within rounding of its
// bound).
//
// Layout: U[b][mu][x0][x1] interleaved (re, im) of type T (double: complex128, float:
// complex64), b < B, mu in {0, 1}; site x = x0 L1 + x1, global link index l = mu V + x
// (Lattice.global_link_index), nl = 2 V. Plaquette p(x) = U_0(x) U_1(x+0) [U_1(x) U_0(x+1)]^*,
// action S = -beta sum_x Re p(x). HMC works in double (float fields are read into double and
// the result rounded). The sweeps compute the staples and the overrelaxation reflection in T
// (as the torch path: complex64 staples for complex64 fields), the von Mises draw and the new
// heat-bath link in double, and round every new link to T at once, as torch stores it. Built
// with -ffp-contract=off (products round like torch's non-FMA vector code) and
// -fno-math-errno -fno-trapping-math (value-preserving; they let GCC vectorise sqrt/selects).
//
// HMC (hmc.py): momenta w_l = CounterRNG.normal(b nl + l, step, 1) (T precision, as
// sample_momenta draws them), H = sum w^2 / 2 + S, force F_mu(x) = beta Im(U_mu(x) A_mu(x)),
// which in 2D is  F_0(x) = beta (q(x) - q(x-1)),  F_1(x) = beta (q(x-0) - q(x)),
// q = Im p; momentum update w -= c F, link update U -> exp(i eps w) U. The links are kept as
// U(t) = U(0) exp(i delta(t)) with delta the summed rotation angle, so
// p(t) = p(0) exp(i Delta(t)), Delta(x) = delta_0(x) + delta_1(x+0) - delta_0(x+1) - delta_1(x):
// no atan2 of the input, one sincos per plaquette and force. Leapfrog:
//   w -= eps/2 F; n times { delta += eps w; w -= (eps or eps/2 at the end) F },
// Omelyan (lam):
//   w -= lam eps F; n times { delta += eps/2 w; w -= (1 - 2 lam) eps F; delta += eps/2 w;
//                             w -= (2 lam eps or lam eps at the end) F }
// (the merged half-steps of hmc.py). dH = H1 - H0; accept iff isfinite(dH) and
// u_b < exp(-dH) with u_b = CounterRNG.uniform_scalar(step, B)[b]. If any entry is accepted
// and max |U'^* U' - 1| over all new fields exceeds `tol`, they are projected (U/|U| by
// polar/atan2) as reproject_if_drifted does; rejected entries get the old links.
//
// Heat bath (heatbath.py): sub-steps (mu, parity) in the order mu = 0, 1; parity 0, 1; every
// link U_mu(x) of that global parity (x0 + x1) % 2 gets the staple (staple_mu's order)
//   A = U_nu(x+mu) U_mu(x+nu)^* U_nu(x)^* + U_nu(x+mu-nu)^* U_mu(x-nu)^* U_nu(x-nu),
// kappa = beta |A|, and phi from Best-Fisher von Mises (von_mises(): wrapped-Cauchy
// envelope, kappa < 1e-5 series for s, kappa < 1e-8 uniform angle); round r reads the 3
// float64 uniforms of counter index b R nl + l + r nl (R = _BLOCKS_PER_CONFIG), `step`. The
// new link is exp(i (phi - arg A)), formed as (cos phi + i sin phi) A^* / |A| with
// cos phi = w, sin phi = +-sqrt((1 - w)(1 + w)) (= exp(i (acos(w) sign - arg A)) to rounding).
// Overrelaxation: U -> U^* (ph^*)^2, ph = A (1 / max(|A|, 1e-300)) (theta -> -theta - 2 arg A;
// torch divides a complex tensor by a real one as a product with the reciprocal).
// Each sweep ends with the reproject_if_drifted check above.
//
// sincos of arbitrary arguments uses a branch-free Cody-Waite + Cephes-polynomial kernel
// (relative error ~1 ulp) that GCC vectorises; batch entries run in parallel (OpenMP).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "philox.h"

namespace {

using hpcflow_rng::Key;

// ---- vectorisable sin / cos ---------------------------------------------------------------
__attribute__((always_inline)) inline void sincos_poly(double x, double& s_out, double& c_out) {
  const double big = 6755399441055744.0;  // 1.5 2^52: t - big is x 2/pi rounded to an integer j
  const double t = x * 0.63661977236758134308 + big;
  int64_t bits;
  std::memcpy(&bits, &t, sizeof bits);
  const int64_t q = bits & 3;  // j mod 4 (the low mantissa bits of t; two's complement for j < 0)
  const double j = t - big;
  // Cody-Waite: pi/2 = P1 + P2 + P3 (fdlibm's 33 + 33 + rest bits)
  double r = x - j * 1.57079632673412561417e+00;
  r = r - j * 6.07710050630396597660e-11;
  r = r - j * 2.02226624879595063154e-21;
  const double z = r * r;
  // Cephes sin.c polynomials on [-pi/4, pi/4]
  const double ps = ((((1.58962301576546568060e-10 * z - 2.50507477628578072866e-8) * z +
                       2.75573136213857245213e-6) * z - 1.98412698295895385996e-4) * z +
                     8.33333333332211858878e-3) * z - 1.66666666666666307295e-1;
  const double pc = ((((-1.13585365213876817300e-11 * z + 2.08757008419747316778e-9) * z -
                       2.75573141792967388112e-7) * z + 2.48015872888517045348e-5) * z -
                     1.38888888888730564116e-3) * z + 4.16666666666665929218e-2;
  const double sr = r + r * z * ps;
  const double cr = 1.0 - 0.5 * z + z * z * pc;
  // quadrant q: sin x = (sr, cr, -sr, -cr)[q], cos x = (cr, -sr, -cr, sr)[q]
  const double s = (q & 1) ? cr : sr;
  const double c = (q & 1) ? sr : cr;
  s_out = (q & 2) ? -s : s;
  c_out = ((q + 1) & 2) ? -c : c;
}

// ---- small helpers --------------------------------------------------------------------------
// f(x + 1_0) and f(x - 1_0) / f(x + 1_1), f(x - 1_1) as arrays (torch.roll of one site field)
inline void roll0(const double* f, double* out, int L0, int L1, int dir) {
  // out(x0, x1) = f(x0 + dir, x1)
  for (int x0 = 0; x0 < L0; ++x0) {
    const int y0 = (x0 + dir + L0) % L0;
    std::memcpy(out + (size_t)x0 * L1, f + (size_t)y0 * L1, sizeof(double) * L1);
  }
}

inline void roll1(const double* f, double* out, int L0, int L1, int dir) {
  // out(x0, x1) = f(x0, x1 + dir)
  for (int x0 = 0; x0 < L0; ++x0) {
    const double* a = f + (size_t)x0 * L1;
    double* o = out + (size_t)x0 * L1;
    if (dir > 0) {
      std::memcpy(o, a + 1, sizeof(double) * (L1 - 1));
      o[L1 - 1] = a[0];
    } else {
      std::memcpy(o + 1, a, sizeof(double) * (L1 - 1));
      o[0] = a[L1 - 1];
    }
  }
}

template <typename T>
double max_violation(const T* U, int64_t n_links) {
  double m = 0.0;
  for (int64_t i = 0; i < n_links; ++i) {
    const double re = U[2 * i], im = U[2 * i + 1];
    const double d = std::fabs(re * re + im * im - 1.0);
    m = d > m ? d : m;
  }
  return m;
}

template <typename T>
void project(T* U, int64_t n_links) {
  for (int64_t i = 0; i < n_links; ++i) {
    const double th = std::atan2((double)U[2 * i + 1], (double)U[2 * i]);
    U[2 * i] = (T)std::cos(th);
    U[2 * i + 1] = (T)std::sin(th);
  }
}

// ---- HMC ------------------------------------------------------------------------------------
struct HmcWork {
  std::vector<double> pr, pi;    // plaquette p(0) per site
  std::vector<double> w, delta;  // momenta, rotation angles per link (2 V)
  std::vector<double> q, F, t0, t1, sn, cs;
  explicit HmcWork(int V)
      : pr(V), pi(V), w(2 * V), delta(2 * V, 0.0), q(V), F(2 * V), t0(V), t1(V), sn(2 * V),
        cs(2 * V) {}
};

// Delta(x) of the current rotation angles into t0 (uses t1 as scratch)
inline void plaquette_delta(HmcWork& h, int L0, int L1) {
  const int V = L0 * L1;
  const double* d0 = h.delta.data();
  const double* d1 = h.delta.data() + V;
  double* D = h.t0.data();
  double* tmp = h.t1.data();
  roll0(d1, tmp, L0, L1, +1);  // delta_1(x + 0)
#pragma omp simd
  for (int x = 0; x < V; ++x) D[x] = d0[x] + tmp[x];
  roll1(d0, tmp, L0, L1, +1);  // delta_0(x + 1)
#pragma omp simd
  for (int x = 0; x < V; ++x) D[x] = D[x] - tmp[x] - d1[x];
}

// force F = beta Im(U A) per link (2 V) for the current angles
inline void hmc_force(HmcWork& h, int L0, int L1, double beta) {
  const int V = L0 * L1;
  plaquette_delta(h, L0, L1);
  const double* D = h.t0.data();
  const double* pr = h.pr.data();
  const double* pi = h.pi.data();
  double* q = h.q.data();
#pragma omp simd
  for (int x = 0; x < V; ++x) {
    double s, c;
    sincos_poly(D[x], s, c);
    q[x] = pi[x] * c + pr[x] * s;  // Im(p(0) e^{i Delta})
  }
  double* F0 = h.F.data();
  double* F1 = h.F.data() + V;
  double* tmp = h.t1.data();
  roll1(q, tmp, L0, L1, -1);  // q(x - 1)
#pragma omp simd
  for (int x = 0; x < V; ++x) F0[x] = beta * (q[x] - tmp[x]);
  roll0(q, tmp, L0, L1, -1);  // q(x - 0)
#pragma omp simd
  for (int x = 0; x < V; ++x) F1[x] = beta * (tmp[x] - q[x]);
}

inline void update_momenta(HmcWork& h, int n, double c) {
  double* w = h.w.data();
  const double* F = h.F.data();
#pragma omp simd
  for (int l = 0; l < n; ++l) w[l] = w[l] - c * F[l];
}

inline void update_links(HmcWork& h, int n, double e) {
  double* d = h.delta.data();
  const double* w = h.w.data();
#pragma omp simd
  for (int l = 0; l < n; ++l) d[l] = d[l] + e * w[l];
}

// one trajectory of configuration b: writes U1 into out, returns dH
template <typename T>
double hmc_one(const T* U, T* out, int L0, int L1, double beta, int n_steps, double tau,
               int omelyan, double lam, Key ks, uint32_t step, uint64_t index0) {
  const int V = L0 * L1, nl = 2 * V;
  HmcWork h(V);
  // plaquette p(0) = (U0(x) U1(x+0)) (U1(x) U0(x+1))^*
  std::vector<double> ur(nl), ui(nl);
  for (int l = 0; l < nl; ++l) {
    ur[l] = (double)U[2 * l];
    ui[l] = (double)U[2 * l + 1];
  }
  for (int x0 = 0; x0 < L0; ++x0) {
    const int xp0 = (x0 + 1) % L0;
    for (int x1 = 0; x1 < L1; ++x1) {
      const int x = x0 * L1 + x1, x_0 = xp0 * L1 + x1, x_1 = x0 * L1 + (x1 + 1) % L1;
      // a = U0(x) U1(x+0), b = U1(x) U0(x+1)
      const double ar = ur[x] * ur[V + x_0] - ui[x] * ui[V + x_0];
      const double ai = ur[x] * ui[V + x_0] + ui[x] * ur[V + x_0];
      const double br = ur[V + x] * ur[x_1] - ui[V + x] * ui[x_1];
      const double bi = ur[V + x] * ui[x_1] + ui[V + x] * ur[x_1];
      h.pr[x] = ar * br + ai * bi;
      h.pi[x] = ai * br - ar * bi;
    }
  }
  // momenta: CounterRNG.normal(index0 + l, step, 1) in the field's precision
  for (int l = 0; l < nl; ++l) {
    T z;
    hpcflow_rng::normals(ks, index0 + (uint64_t)l, step, 1, &z);
    h.w[l] = (double)z;
  }
  double K0 = 0.0, S0 = 0.0;
  for (int l = 0; l < nl; ++l) K0 += h.w[l] * h.w[l];
  for (int x = 0; x < V; ++x) S0 += h.pr[x];
  K0 *= 0.5;
  S0 *= -beta;

  const double eps = tau / n_steps;
  if (!omelyan) {
    hmc_force(h, L0, L1, beta);
    update_momenta(h, nl, 0.5 * eps);
    for (int i = 0; i < n_steps; ++i) {
      update_links(h, nl, eps);
      hmc_force(h, L0, L1, beta);
      update_momenta(h, nl, i < n_steps - 1 ? eps : 0.5 * eps);
    }
  } else {
    hmc_force(h, L0, L1, beta);
    update_momenta(h, nl, lam * eps);
    for (int i = 0; i < n_steps; ++i) {
      update_links(h, nl, 0.5 * eps);
      hmc_force(h, L0, L1, beta);
      update_momenta(h, nl, (1.0 - 2.0 * lam) * eps);
      update_links(h, nl, 0.5 * eps);
      hmc_force(h, L0, L1, beta);
      update_momenta(h, nl, (i < n_steps - 1 ? 2.0 : 1.0) * lam * eps);
    }
  }
  // final action from p(0) e^{i Delta}
  plaquette_delta(h, L0, L1);
  double S1 = 0.0, K1 = 0.0;
  {
    const double* D = h.t0.data();
    double* c1 = h.q.data();
#pragma omp simd
    for (int x = 0; x < V; ++x) {
      double s, c;
      sincos_poly(D[x], s, c);
      c1[x] = h.pr[x] * c - h.pi[x] * s;
    }
    for (int x = 0; x < V; ++x) S1 += c1[x];
    S1 *= -beta;
  }
  for (int l = 0; l < nl; ++l) K1 += h.w[l] * h.w[l];
  K1 *= 0.5;
  // U1 = exp(i delta) U
  {
    const double* d = h.delta.data();
    double* sn = h.sn.data();
    double* cs = h.cs.data();
#pragma omp simd
    for (int l = 0; l < nl; ++l) {
      double s, c;
      sincos_poly(d[l], s, c);
      sn[l] = s;
      cs[l] = c;
    }
    for (int l = 0; l < nl; ++l) {
      out[2 * l] = (T)(cs[l] * ur[l] - sn[l] * ui[l]);
      out[2 * l + 1] = (T)(cs[l] * ui[l] + sn[l] * ur[l]);
    }
  }
  return (K1 + S1) - (K0 + S0);
}

template <typename T>
void hmc_trajectory(const T* U, T* out, uint8_t* acc, double* dH, int B, int L0, int L1,
                    double beta, int n_steps, double tau, int omelyan, double lam, uint32_t ks0,
                    uint32_t ks1, uint32_t kc0, uint32_t kc1, uint32_t step, double tol,
                    int n_threads) {
  const int64_t nl = 2LL * L0 * L1;
  const Key ks{ks0, ks1};
#pragma omp parallel for num_threads(n_threads) if (B > 1 && n_threads > 1) schedule(static)
  for (int b = 0; b < B; ++b)
    dH[b] = hmc_one<T>(U + 2 * nl * b, out + 2 * nl * b, L0, L1, beta, n_steps, tau, omelyan,
                       lam, ks, step, (uint64_t)b * (uint64_t)nl);
  // Metropolis: uniform_scalar(step, B) under the chain key
  std::vector<double> u(B);
  hpcflow_rng::uniforms(Key{kc0, kc1}, 0, step, B, u.data());
  bool any = false;
  for (int b = 0; b < B; ++b) {
    acc[b] = (std::isfinite(dH[b]) && u[b] < std::exp(-dH[b])) ? 1 : 0;
    any = any || acc[b];
  }
  if (any && max_violation(out, nl * B) > tol) project(out, nl * B);
  for (int b = 0; b < B; ++b)
    if (!acc[b]) std::memcpy(out + 2 * nl * b, U + 2 * nl * b, sizeof(T) * 2 * nl);
}

// ---- heat bath / overrelaxation -------------------------------------------------------------
template <typename T>
struct SweepWork {
  std::vector<T> ur, ui;                             // links 2 V, storage precision
  std::vector<double> ar, ai, m, k, s, y, u0, u1, u2, cph, sph;  // per selected link
  std::vector<int> site;                             // selected sites
  std::vector<double> ok;
  explicit SweepWork(int V)
      : ur(2 * V), ui(2 * V), ar(V / 2), ai(V / 2), m(V / 2), k(V / 2), s(V / 2), y(V / 2),
        u0(V / 2), u1(V / 2), u2(V / 2), cph(V / 2), sph(V / 2), site(V / 2), ok(V / 2) {}
};

template <typename R>
inline void cmul(R ar, R ai, R br, R bi, R& cr, R& ci) {
  cr = ar * br - ai * bi;
  ci = ar * bi + ai * br;
}

// staples of the links (mu, parity) into w.ar / w.ai, their sites into w.site; returns count.
// Computed in T like the torch path (complex64 staples for complex64 fields).
template <typename T>
inline int gather_staples(SweepWork<T>& w, int L0, int L1, int mu, int parity) {
  const int V = L0 * L1, nu = 1 - mu;
  const T* ur = w.ur.data();
  const T* ui = w.ui.data();
  const int omu = mu * V, onu = nu * V;
  int n = 0;
  for (int x0 = 0; x0 < L0; ++x0) {
    const int p0 = (x0 + 1) % L0, m0 = (x0 + L0 - 1) % L0;
    for (int x1 = (x0 + parity) & 1; x1 < L1; x1 += 2) {
      const int p1 = (x1 + 1) % L1, m1 = (x1 + L1 - 1) % L1;
      const int x = x0 * L1 + x1;
      // x + mu, x + nu, x - nu, x + mu - nu
      int xpmu, xpnu, xmnu, xpmumnu;
      if (mu == 0) {
        xpmu = p0 * L1 + x1;
        xpnu = x0 * L1 + p1;
        xmnu = x0 * L1 + m1;
        xpmumnu = p0 * L1 + m1;
      } else {
        xpmu = x0 * L1 + p1;
        xpnu = p0 * L1 + x1;
        xmnu = m0 * L1 + x1;
        xpmumnu = m0 * L1 + p1;
      }
      // upper: (U_nu(x+mu) U_mu(x+nu)^*) U_nu(x)^*
      T tr, ti, ur1, ui1;
      cmul(ur[onu + xpmu], ui[onu + xpmu], ur[omu + xpnu], -ui[omu + xpnu], tr, ti);
      cmul(tr, ti, ur[onu + x], -ui[onu + x], ur1, ui1);
      // lower: (U_nu(x+mu-nu)^* U_mu(x-nu)^*) U_nu(x-nu)
      T lr, li, ur2, ui2;
      cmul(ur[onu + xpmumnu], -ui[onu + xpmumnu], ur[omu + xmnu], -ui[omu + xmnu], lr, li);
      cmul(lr, li, ur[onu + xmnu], ui[onu + xmnu], ur2, ui2);
      w.ar[n] = (double)(T)(ur1 + ur2);
      w.ai[n] = (double)(T)(ui1 + ui2);
      w.site[n] = x;
      ++n;
    }
  }
  return n;
}

// one Best-Fisher round for link i: returns accepted, sets cos/sin of phi
inline bool vm_round_scalar(double k, double s, const double u[3], double& cph, double& sph) {
  if (k < 1e-8) {
    const double phi = M_PI * (2.0 * u[2] - 1.0);
    cph = std::cos(phi);
    sph = std::sin(phi);
    return true;
  }
  const double z = std::cos(M_PI * u[0]);
  const double w = (1.0 + s * z) / (s + z);
  const double y = k * (s - w);
  const bool acc = (y * (2.0 - y) - u[1] >= 0) || (std::log(y / u[1]) + 1.0 - y >= 0);
  if (!acc) return false;
  const double wc = std::min(std::max(w, -1.0), 1.0);
  const double sp = std::sqrt(std::max((1.0 - wc) * (1.0 + wc), 0.0));
  cph = wc;
  sph = u[2] < 0.5 ? -sp : sp;
  return true;
}

template <typename T>
void heatbath_substep(SweepWork<T>& w, int L0, int L1, int mu, int parity, double beta, Key ks,
                      uint32_t step, uint64_t index0, uint64_t nl) {
  const int V = L0 * L1;
  const int n = gather_staples(w, L0, L1, mu, parity);
  double *ar = w.ar.data(), *ai = w.ai.data(), *m = w.m.data(), *k = w.k.data(),
         *s = w.s.data(), *y = w.y.data(), *u0 = w.u0.data(), *u1 = w.u1.data(),
         *u2 = w.u2.data(), *cph = w.cph.data(), *sph = w.sph.data();
  double* ok = w.ok.data();
  const int* site = w.site.data();
  // von_mises parameters
#pragma omp simd
  for (int i = 0; i < n; ++i) {
    m[i] = std::sqrt(ar[i] * ar[i] + ai[i] * ai[i]);
    const double kk = std::max(beta * m[i], 1e-300);
    const double r = 1.0 + std::sqrt(1.0 + 4.0 * kk * kk);
    const double rho = (r - std::sqrt(2.0 * r)) / (2.0 * kk);
    s[i] = kk < 1e-5 ? 1.0 / kk + kk : (1.0 + rho * rho) / (2.0 * rho);
    k[i] = kk;
  }
  // round 0 for all links: draws, then a vectorised proposal
  const uint64_t base = index0 + (uint64_t)mu * V;
  for (int i = 0; i < n; ++i) {
    double u[3];
    hpcflow_rng::uniforms(ks, base + (uint64_t)site[i], step, 3, u);
    u0[i] = u[0];
    u1[i] = u[1];
    u2[i] = u[2];
  }
#pragma omp simd
  for (int i = 0; i < n; ++i) {
    double zs, z;
    sincos_poly(M_PI * u0[i], zs, z);
    const double ww = (1.0 + s[i] * z) / (s[i] + z);
    const double yy = k[i] * (s[i] - ww);
    const double wc = std::min(std::max(ww, -1.0), 1.0);
    const double sp = std::sqrt(std::max((1.0 - wc) * (1.0 + wc), 0.0));
    double fs, fc;
    sincos_poly(M_PI * (2.0 * u2[i] - 1.0), fs, fc);
    const bool flat = k[i] < 1e-8;
    cph[i] = flat ? fc : wc;
    sph[i] = flat ? fs : (u2[i] < 0.5 ? -sp : sp);
    ok[i] = (flat | (yy * (2.0 - yy) - u1[i] >= 0)) ? 1.0 : 0.0;
    y[i] = yy;
  }
  for (int i = 0; i < n; ++i) {
    if (ok[i] != 0.0) continue;
    if (std::log(y[i] / u1[i]) + 1.0 - y[i] >= 0) continue;
    // further rounds r >= 1 for this link
    bool done = false;
    for (uint64_t rnd = 1; rnd < 10000 && !done; ++rnd) {
      double u[3];
      hpcflow_rng::uniforms(ks, base + (uint64_t)site[i] + rnd * nl, step, 3, u);
      done = vm_round_scalar(k[i], s[i], u, cph[i], sph[i]);
    }
    if (!done) {  // as von_mises: give up (never happens in practice); keep a flat angle
      cph[i] = 1.0;
      sph[i] = 0.0;
    }
  }
  // U = exp(i (phi - arg A)) = (cos phi + i sin phi) A^* / |A|; stored in T
  T* ur = w.ur.data() + (size_t)mu * V;
  T* ui = w.ui.data() + (size_t)mu * V;
  for (int i = 0; i < n; ++i) {
    const bool z = !(m[i] > 0.0);
    const double ca = z ? 1.0 : ar[i] / m[i];
    const double sa = z ? 0.0 : ai[i] / m[i];
    ur[site[i]] = (T)(cph[i] * ca + sph[i] * sa);
    ui[site[i]] = (T)(sph[i] * ca - cph[i] * sa);
  }
}

template <typename T>
void overrelax_substep(SweepWork<T>& w, int L0, int L1, int mu, int parity) {
  // all in T, as the torch path: ph = A / max(|A|, 1e-300), U' = U^* (ph^*)^2
  const int V = L0 * L1;
  const int n = gather_staples(w, L0, L1, mu, parity);
  T* ur = w.ur.data() + (size_t)mu * V;
  T* ui = w.ui.data() + (size_t)mu * V;
  for (int i = 0; i < n; ++i) {
    const T ar = (T)w.ar[i], ai = (T)w.ai[i];
    const T a = std::max(std::hypot(ar, ai), (T)1e-300);
    const T inv = (T)1 / a;                           // torch divides by a real tensor
    const T pr = ar * inv, pim = -(ai * inv);          // as a product with its reciprocal
    const T qr = pr * pr - pim * pim, qi = pr * pim + pim * pr;  // conj(ph)^2
    const int x = w.site[i];
    const T vr = ur[x], vi = -ui[x];                   // conj(U)
    ur[x] = vr * qr - vi * qi;
    ui[x] = vr * qi + vi * qr;
  }
}

// mode 0: heat bath, 1: overrelaxation
template <typename T>
void sweep(const T* U, T* out, int B, int L0, int L1, double beta, uint32_t ks0, uint32_t ks1,
           uint32_t step, uint64_t blocks_per_config, int mode, double tol, int n_threads) {
  const int V = L0 * L1;
  const int64_t nl = 2LL * V;
#pragma omp parallel for num_threads(n_threads) if (B > 1 && n_threads > 1) schedule(static)
  for (int b = 0; b < B; ++b) {
    SweepWork<T> w(V);
    const T* Ub = U + 2 * nl * b;
    for (int64_t l = 0; l < nl; ++l) {
      w.ur[l] = Ub[2 * l];
      w.ui[l] = Ub[2 * l + 1];
    }
    const uint64_t index0 = (uint64_t)b * blocks_per_config * (uint64_t)nl;
    for (int mu = 0; mu < 2; ++mu)
      for (int p = 0; p < 2; ++p) {
        if (mode == 0)
          heatbath_substep<T>(w, L0, L1, mu, p, beta, Key{ks0, ks1}, step, index0, nl);
        else
          overrelax_substep<T>(w, L0, L1, mu, p);
      }
    T* ob = out + 2 * nl * b;
    for (int64_t l = 0; l < nl; ++l) {
      ob[2 * l] = w.ur[l];
      ob[2 * l + 1] = w.ui[l];
    }
  }
  if (max_violation(out, nl * B) > tol) project(out, nl * B);
}

}  // namespace

extern "C" {

// HMC trajectories of B configurations U[B][2][L0][L1] (complex128 / complex64) -> out,
// acc[B] (0/1), dH[B]. omelyan: 0 leapfrog, 1 Omelyan(lam). ks/kc: site / chain keys.
void hpcflow_u1_hmc_d(const double* U, double* out, uint8_t* acc, double* dH, int B, int L0,
                      int L1, double beta, int n_steps, double tau, int omelyan, double lam,
                      uint32_t ks0, uint32_t ks1, uint32_t kc0, uint32_t kc1, uint32_t step,
                      double tol, int n_threads) {
  hmc_trajectory<double>(U, out, acc, dH, B, L0, L1, beta, n_steps, tau, omelyan, lam, ks0, ks1,
                         kc0, kc1, step, tol, n_threads);
}
void hpcflow_u1_hmc_f(const float* U, float* out, uint8_t* acc, double* dH, int B, int L0,
                      int L1, double beta, int n_steps, double tau, int omelyan, double lam,
                      uint32_t ks0, uint32_t ks1, uint32_t kc0, uint32_t kc1, uint32_t step,
                      double tol, int n_threads) {
  hmc_trajectory<float>(U, out, acc, dH, B, L0, L1, beta, n_steps, tau, omelyan, lam, ks0, ks1,
                        kc0, kc1, step, tol, n_threads);
}

// One heat-bath (mode 0) or overrelaxation (mode 1) sweep of B configurations -> out.
void hpcflow_u1_sweep_d(const double* U, double* out, int B, int L0, int L1, double beta,
                        uint32_t ks0, uint32_t ks1, uint32_t step, uint64_t blocks_per_config,
                        int mode, double tol, int n_threads) {
  sweep<double>(U, out, B, L0, L1, beta, ks0, ks1, step, blocks_per_config, mode, tol,
                n_threads);
}
void hpcflow_u1_sweep_f(const float* U, float* out, int B, int L0, int L1, double beta,
                        uint32_t ks0, uint32_t ks1, uint32_t step, uint64_t blocks_per_config,
                        int mode, double tol, int n_threads) {
  sweep<float>(U, out, B, L0, L1, beta, ks0, ks1, step, blocks_per_config, mode, tol,
               n_threads);
}

// sin/cos kernel check (tests): n arguments -> s, c
void hpcflow_u1_sincos(const double* x, double* s, double* c, int n) {
#pragma omp simd
  for (int i = 0; i < n; ++i) sincos_poly(x[i], s[i], c[i]);
}

}  // extern "C"
