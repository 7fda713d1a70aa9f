"""Unit tests of the heat bath and overrelaxation (hpcflow.sampling.heatbath).

The conditional-distribution tests build configurations in which every updated link has
the same staple (links in direction 1 set to 1, links in direction 0 set to a constant G):
then ``A_0(x) = 2 G^dag`` in 2D and one sub-step yields many independent draws from the
exact one-link conditional ``exp((beta/N) Re tr(U A))``, which is compared with its density.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from hpcflow.lattice.action import staple_sum, wilson_action
from hpcflow.lattice.geometry import Lattice, SerialComm
from hpcflow.lattice.groups import get_group, random_field
from hpcflow.rng import CounterRNG
from hpcflow.sampling.heatbath import (
    checkerboard_masks,
    heatbath_or_sweep,
    heatbath_substep,
    heatbath_sweep,
    overrelax_substep,
    overrelax_sweep,
    staple_mu,
    von_mises,
)
from hpcflow.sampling.hmc import unitarity_violation

CASES = [("u1", (4, 6)), ("su2", (4, 4)), ("su3", (2, 2, 2, 4))]


class SelfHaloComm(SerialComm):
    """One rank owning the whole lattice stored with a halo: exchange fills the halo
    periodically from the interior, as the MPI exchange does from neighbours."""

    decomposed = True  # halos to fill, like a LatticeComm

    def exchange(self, f: torch.Tensor, lat: Lattice, inner: int = 2, width: int | None = None) -> torch.Tensor:
        g = f[lat.interior_slices(inner)]
        for d in range(lat.nd):
            axis = g.dim() - inner - lat.nd + d
            start = lat.origin[d] - lat.halo
            idx = torch.remainder(torch.arange(start, start + lat.shape[d]), lat.global_shape[d])
            g = g.index_select(axis, idx)
        return g


def _twisted(lat: Lattice, G: torch.Tensor, batch: int) -> torch.Tensor:
    """U_0(x) = G, U_1(x) = 1 (2D): every plaquette is 1 and every A_0(x) = 2 G^dag."""
    N = G.shape[-1]
    U = torch.zeros(batch, 2, *lat.shape, N, N, dtype=torch.complex128)
    U[:, 0] = G
    U[:, 1] = torch.eye(N, dtype=torch.complex128)
    return U


def _chi2(samples: np.ndarray, density, lo: float, hi: float, n_bins: int) -> float:
    """Pearson chi^2 of a histogram against a density integrated per bin (fine trapezoid)."""
    edges = np.linspace(lo, hi, n_bins + 1)
    counts, _ = np.histogram(samples, edges)
    probs = []
    for a, b in itertools.pairwise(edges):
        x = np.linspace(a, b, 201)
        probs.append(np.trapezoid(density(x), x))
    p = np.array(probs) / np.sum(probs)
    expect = p * len(samples)
    return float(np.sum((counts - expect) ** 2 / expect))


# chi^2 with k = n_bins - 1 degrees of freedom: mean k, sd sqrt(2k); a correct sampler
# exceeds k + 6 sd with probability ~1e-6, a wrong normalisation of beta gives thousands.
def _chi2_bound(n_bins: int) -> float:
    k = n_bins - 1
    return k + 6 * math.sqrt(2 * k)


@pytest.mark.parametrize("name,shape", CASES)
def test_staple_mu_matches_staple_sum(name, shape):
    g, lat = get_group(name), Lattice(shape)
    U = random_field(lat, g, CounterRNG(1), 0, batch=(2,))
    A = staple_sum(U, lat)
    for mu in range(lat.nd):
        assert float((staple_mu(U, lat, mu) - A[:, mu]).abs().max()) < 1e-13


@pytest.mark.parametrize("name,shape", CASES)
def test_checkerboard_links_updated_together_share_no_staple(name, shape):
    """Changing every link of a sub-step leaves the staples of those links unchanged, while
    changing the other parity does change them (so the check can fail)."""
    g, lat = get_group(name), Lattice(shape)
    rng = CounterRNG(2)
    U = random_field(lat, g, rng, 0)
    R = random_field(lat, g, rng, 1)
    for mu, _parity, mask in checkerboard_masks(lat):
        A0 = staple_mu(U, lat, mu)[mask]
        V = U.clone()
        V[mu][mask] = (R[mu] @ U[mu])[mask]
        assert float((staple_mu(V, lat, mu)[mask] - A0).abs().max()) < 1e-14
        W = U.clone()
        W[mu][~mask] = (R[mu] @ U[mu])[~mask]
        assert float((staple_mu(W, lat, mu)[mask] - A0).abs().max()) > 1e-3
    covered = sum(m.sum() for _, _, m in checkerboard_masks(lat))
    assert int(covered) == lat.nd * lat.volume


def test_odd_extent_is_rejected():
    g, lat = get_group("u1"), Lattice((4, 5))
    U = random_field(lat, g, CounterRNG(0), 0)
    with pytest.raises(ValueError, match="even extents"):
        heatbath_sweep(U, lat, g, 1.0, CounterRNG(0), 0)
    with pytest.raises(ValueError, match="beta"):
        heatbath_sweep(random_field(Lattice((4, 4)), g, CounterRNG(0), 0), Lattice((4, 4)), g,
                       -1.0, CounterRNG(0), 0)
    with pytest.raises(ValueError, match="n_or"):
        heatbath_or_sweep(U, Lattice((4, 4)), g, 1.0, CounterRNG(0), 0, n_or=-1)


@pytest.mark.parametrize("kappa", [0.3, 2.0, 12.0])
def test_von_mises_sampler_density(kappa):
    """40 000 von Mises draws match exp(kappa cos phi) (chi^2, 40 bins, 6 sd bound)."""
    n = 40_000
    phi = von_mises(torch.full((n,), kappa, dtype=torch.float64), CounterRNG(3),
                    torch.arange(n), 5, n).numpy()
    chi2 = _chi2(phi, lambda x: np.exp(kappa * np.cos(x)), -np.pi, np.pi, 40)
    assert chi2 < _chi2_bound(40), chi2


@pytest.mark.parametrize("beta", [0.4, 3.0])
def test_u1_heatbath_link_conditional(beta):
    """One U(1) sub-step on a twisted field (A = 2 e^{-i psi}): theta has density
    exp(2 beta cos(theta - psi)); 32 000 links, chi^2 over 40 bins within 6 sd."""
    g, lat, psi = get_group("u1"), Lattice((8, 8)), 1.0
    G = torch.tensor([[complex(math.cos(psi), math.sin(psi))]], dtype=torch.complex128)
    U = _twisted(lat, G, 1000)
    mask = checkerboard_masks(lat)[0][2]
    V = heatbath_substep(U, lat, g, beta, CounterRNG(4), 7, mu=0, parity=0)
    theta = torch.angle(V[:, 0][:, mask][..., 0, 0]).reshape(-1).numpy()
    assert float((V[:, 0][:, ~mask] - U[:, 0][:, ~mask]).abs().max()) == 0.0
    chi2 = _chi2(theta, lambda x: np.exp(2 * beta * np.cos(x - psi)), -np.pi, np.pi, 40)
    assert chi2 < _chi2_bound(40), chi2


@pytest.mark.parametrize("beta", [0.5, 3.0])  # alpha = 1 (Creutz branch) and 6 (Kennedy-Pendleton)
def test_su2_heatbath_link_conditional(beta):
    """SU(2) sub-step on a twisted field (A = 2 G^dag): W = U G^dag has a0 density
    sqrt(1 - a0^2) exp(2 beta a0) (chi^2, 40 bins, 6 sd) and an isotropic direction
    (mean of the unit 3-vector 0 within 5 standard errors)."""
    g, lat = get_group("su2"), Lattice((8, 8))
    G = random_field(Lattice((1, 1)), g, CounterRNG(5), 0)[0, 0, 0]
    U = _twisted(lat, G, 1000)
    mask = checkerboard_masks(lat)[0][2]
    V = heatbath_substep(U, lat, g, beta, CounterRNG(6), 3, mu=0, parity=0)
    W = (V[:, 0][:, mask] @ G.mH).reshape(-1, 2, 2)
    a0 = W[:, 0, 0].real.numpy()
    alpha = 2 * beta
    chi2 = _chi2(a0, lambda x: np.sqrt(np.clip(1 - x * x, 0, None)) * np.exp(alpha * x),
                 -1.0, 1.0, 40)
    assert chi2 < _chi2_bound(40), chi2
    vec = torch.stack((W[:, 0, 1].imag, W[:, 0, 1].real, W[:, 0, 0].imag), -1)
    unit = vec / vec.norm(dim=-1, keepdim=True)
    # each component of a uniform unit vector has variance 1/3
    assert float(unit.mean(0).abs().max()) < 5 * math.sqrt(1 / 3 / unit.shape[0])


def _su3_one_link_mean(b: float, n: int = 256) -> float:
    """<(1/3) Re tr W> under exp((b/3) Re tr W) dW on SU(3): Weyl eigen-angle integral."""
    t = np.arange(n) * 2 * np.pi / n
    t1, t2 = np.meshgrid(t, t, indexing="ij")
    t3 = -t1 - t2
    z = [np.exp(1j * t1), np.exp(1j * t2), np.exp(1j * t3)]
    weyl = np.abs((z[0] - z[1]) * (z[0] - z[2]) * (z[1] - z[2])) ** 2
    re_tr = np.cos(t1) + np.cos(t2) + np.cos(t3)
    w = weyl * np.exp(b / 3 * re_tr)
    return float(np.sum(w * re_tr / 3) / np.sum(w))


def test_su3_cabibbo_marinari_link_conditional():
    """Repeated CM heat-bath hits of one link class on a twisted SU(3) field (A = 2 G^dag)
    sample exp((2 beta/3) Re tr(U G^dag)): <(1/3) Re tr(U G^dag)> matches the Weyl-integral
    value within 4 standard errors (2048 independent links, 8 hits each after 4 of burn-in;
    the error is from per-link means, so autocorrelation along the hits is included)."""
    g, lat, beta = get_group("su3"), Lattice((8, 8)), 2.5
    G = random_field(Lattice((1, 1)), g, CounterRNG(7), 0)[0, 0, 0]
    U = _twisted(lat, G, 64)
    mask = checkerboard_masks(lat)[0][2]
    rng = CounterRNG(8)
    series = []
    for step in range(12):
        U = heatbath_substep(U, lat, g, beta, rng, step, mu=0, parity=0)
        if step >= 4:
            W = U[:, 0][:, mask] @ G.mH
            series.append(torch.diagonal(W, dim1=-2, dim2=-1).sum(-1).real.reshape(-1) / 3)
    per_link = torch.stack(series).mean(0)
    mean, err = float(per_link.mean()), float(per_link.std()) / math.sqrt(per_link.numel())
    exact = _su3_one_link_mean(2 * beta)
    assert abs(mean - exact) < 4 * err, (mean, exact, err)
    assert err < 5e-3


@pytest.mark.parametrize("name,shape", CASES)
def test_overrelaxation_keeps_action_and_is_an_involution(name, shape):
    """OR sweeps keep the Wilson action to 1e-12 (relative) while moving the links. For U(1)
    and SU(2) one OR sub-step applied twice is the identity (a reflection); for SU(3) each
    subgroup step is one, but their product over the three subgroups is not (it keeps the
    measure, which is what balance needs)."""
    g, lat, beta = get_group(name), Lattice(shape), 2.3
    rng = CounterRNG(9)
    U = random_field(lat, g, rng, 0)
    U = heatbath_sweep(U, lat, g, beta, rng, 1)
    S0 = float(wilson_action(U, lat, beta))
    V = overrelax_sweep(U, lat, g, beta)
    assert float((V - U).abs().max()) > 1e-2
    assert abs(float(wilson_action(V, lat, beta)) - S0) < 1e-12 * abs(S0)
    if g.N <= 2:
        W = overrelax_substep(overrelax_substep(U, lat, g, beta, 1, 0), lat, g, beta, 1, 0)
        assert float((W - U).abs().max()) < 1e-12


@pytest.mark.parametrize("name,shape", CASES)
def test_links_stay_on_group(name, shape):
    """After heat-bath + OR sweeps links are unitary with det 1 to 1e-12."""
    g, lat = get_group(name), Lattice(shape)
    rng = CounterRNG(10)
    U = random_field(lat, g, rng, 0)
    for step in range(5):
        U = heatbath_or_sweep(U, lat, g, 2.0, rng, step, n_or=2)
    assert unitarity_violation(U, lat) < 1e-12


@pytest.mark.parametrize("name,shape", CASES)
def test_halo_padded_rank_equals_serial(name, shape):
    """Heat bath + OR on a halo-padded local array (exchange before each sub-step, interior
    updates, global link indices for draws) equals the serial sweep to 1e-12."""
    g, lat = get_group(name), Lattice(shape)
    lat_p = Lattice(shape, halo=1)
    rng = CounterRNG(11)
    U = random_field(lat, g, rng, 0)
    Up = torch.full((lat.nd, *lat_p.shape, g.N, g.N), 5.0 + 1.0j, dtype=U.dtype)
    Up[lat_p.interior_slices(2)] = U
    comm = SelfHaloComm()
    for step in range(2):
        U = heatbath_or_sweep(U, lat, g, 1.5, rng, step, n_or=1)
        Up = heatbath_or_sweep(Up, lat_p, g, 1.5, rng, step, n_or=1, comm=comm)
    assert float((Up[lat_p.interior_slices(2)] - U).abs().max()) < 1e-12


def test_batch_entry_zero_is_the_unbatched_chain():
    g, lat = get_group("su3"), Lattice((4, 4))
    rng = CounterRNG(12)
    U = random_field(lat, g, rng, 0, batch=(3,))
    Vb = heatbath_sweep(U, lat, g, 3.0, rng, 1)
    V0 = heatbath_sweep(U[0], lat, g, 3.0, rng, 1)
    assert float((Vb[0] - V0).abs().max()) < 1e-13
    assert Vb.shape == U.shape


def test_complex64_sweeps():
    """complex64 fields: dtype kept, links on the group to 1e-5, and the sweep agrees with the
    complex128 sweep of the same field on at least 99% of the links (to 1e-4; a rejection
    decision may flip on rounding for the rest)."""
    g, lat = get_group("su2"), Lattice((8, 8))
    rng = CounterRNG(13)
    U = random_field(lat, g, rng, 0)
    V64 = heatbath_or_sweep(U, lat, g, 2.0, rng, 1)
    V32 = heatbath_or_sweep(U.to(torch.complex64), lat, g, 2.0, rng, 1)
    assert V32.dtype == torch.complex64
    assert unitarity_violation(V32, lat) < 1e-5
    close = ((V32.to(torch.complex128) - V64).abs().amax((-2, -1)) < 1e-4).double().mean()
    assert float(close) > 0.99
