"""Gauge-invariant observables: Wilson and Polyakov loops, topological charge, Wilson flow.

Conventions as in :mod:`hpcflow.lattice.action`. Functions that return global averages
sum over interior sites and reduce with ``comm.sum`` (identity on one rank); all neighbour
access goes through ``lat.shift``, so on a halo-padded array the interior is exact when the
halo covers the reach of the quantity (stated per function).
"""

from __future__ import annotations

import math

import torch

from hpcflow.lattice.action import check_link_field, link, plaquette, staple_sum
from hpcflow.lattice.geometry import Comm, Lattice, as_comm
from hpcflow.lattice.groups import dagger, group_for_field

__all__ = [
    "T0_REFERENCE",
    "W0_REFERENCE",
    "clover_field_strength",
    "energy_density_clover",
    "energy_density_plaquette",
    "flow_energy",
    "flow_scale_t0",
    "flow_scale_w0",
    "polyakov_loop",
    "topological_charge_clover",
    "topological_charge_u1_2d",
    "wilson_flow",
    "wilson_flow_force",
    "wilson_line",
    "wilson_loop",
]


def _trace(m: torch.Tensor) -> torch.Tensor:
    return torch.diagonal(m, dim1=-2, dim2=-1).sum(-1)


def _check_positive_int(name: str, v: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    return v


def wilson_line(u: torch.Tensor, lat: Lattice, mu: int, length: int) -> torch.Tensor:
    """``L(x) = U_mu(x) U_mu(x+mu) ... U_mu(x+(length-1) mu)``, site matrix field (reach length-1)."""
    umu = link(u, lat, mu)
    line = umu
    for k in range(1, length):
        line = line @ lat.shift(umu, mu, k)
    return line


def wilson_loop(u: torch.Tensor, lat: Lattice, r: int, t: int, comm: Comm | None = None) -> torch.Tensor:
    """Rectangular ``R x T`` Wilson loop ``(1/N) Re tr W``, shape ``(*B)``.

    ``W(x) = L_mu^R(x) L_nu^T(x+R mu) L_mu^R(x+T nu)^dag L_nu^T(x)^dag``, averaged over
    interior sites, all planes and both orientations (R along mu and T along nu, and
    vice versa). Reach ``max(R, T)`` (forward only): a halo-padded array needs
    ``halo >= max(R, T)``.
    """
    check_link_field(u, lat)
    _check_positive_int("R", r)
    _check_positive_int("T", t)
    n = u.shape[-1]
    acc = None
    for mu, nu in lat.planes():
        for a, b in ((mu, nu), (nu, mu)):
            la_r = wilson_line(u, lat, a, r)
            lb_t = wilson_line(u, lat, b, t)
            # Re tr(X Y^dag) = Re sum X * conj(Y): X = L_a(x) L_b(x+R a), Y = L_b(x) L_a(x+T b)
            x = la_r @ lat.shift(lb_t, a, r)
            y = lb_t @ lat.shift(la_r, b, t)
            re = (x * y.conj()).real.sum((-1, -2))
            s = lat.interior_sum(re, inner=0)
            acc = s if acc is None else acc + s
    assert acc is not None  # nd >= 2: at least one plane
    total = as_comm(comm).sum(acc)
    return total / (n * 2 * lat.n_planes * lat.volume)


def polyakov_loop(u: torch.Tensor, lat: Lattice, comm: Comm | None = None) -> torch.Tensor:
    """Polyakov loop ``(1/N) tr prod_t U_{nd-1}(xs, t)``, averaged over spatial sites, complex ``(*B)``.

    The ordered product runs along the last direction over this rank's interior time slices.
    When the time direction is split over ranks (``local_shape[-1] < global_shape[-1]``),
    ``comm.ordered_product(segment, nd - 1)`` (:mod:`hpcflow.comm`) multiplies the segments of
    the ranks along the time line in order; each of the ``g_t`` ranks of a line then holds the
    whole loop, hence the division by ``g_t``. Spatial directions may be decomposed too.
    """
    check_link_field(u, lat)
    nd = lat.nd
    lt = lat.global_shape[-1]
    g_t = lt // lat.local_shape[-1]
    if g_t > 1 and not as_comm(comm).decomposed:
        # a serial comm's ordered_product is the identity: it would give a local loop
        raise NotImplementedError(
            "polyakov_loop needs the last direction local to one rank "
            f"(local extent {lat.local_shape[-1]}, global {lt}) or a decomposed comm "
            "(hpcflow.comm.LatticeComm)"
        )
    ut = link(u, lat, nd - 1)[lat.interior_slices(inner=2)]
    # ordered product over the time slices of the interior: U(xs, 0) U(xs, 1) ...
    prod = ut.select(-3, 0)
    for k in range(1, lat.local_shape[-1]):
        prod = prod @ ut.select(-3, k)
    if g_t > 1:
        prod = as_comm(comm).ordered_product(prod, nd - 1)
    tr = _trace(prod)  # (*B, *spatial interior)
    n = u.shape[-1]
    spatial_dims = tuple(range(-(nd - 1), 0))
    local = tr.sum(dim=spatial_dims) if nd > 1 else tr
    return as_comm(comm).sum(local) / (n * g_t * (lat.volume // lt))


def topological_charge_u1_2d(u: torch.Tensor, lat: Lattice, comm: Comm | None = None) -> torch.Tensor:
    """Geometric charge of 2D U(1): ``Q = (1/2pi) sum_x arg P_01(x)``, ``arg`` in ``(-pi, pi]``.

    An exact integer on the torus: the link angles cancel in the sum of raw plaquette angles,
    so only the ``2 pi`` wrappings into ``(-pi, pi]`` survive. Shape ``(*B)``, real.
    """
    check_link_field(u, lat)
    if lat.nd != 2 or u.shape[-1] != 1:
        raise ValueError(
            f"topological_charge_u1_2d needs a 2D U(1) field, got nd={lat.nd}, N={u.shape[-1]}"
        )
    theta = torch.angle(plaquette(u, lat, 0, 1)[..., 0, 0])
    # torch.angle gives [-pi, pi]; move -pi to +pi so arg lies in (-pi, pi]
    theta = torch.where(theta <= -math.pi, theta + 2 * math.pi, theta)
    return as_comm(comm).sum(lat.interior_sum(theta, inner=0)) / (2 * math.pi)


# ---- gradient (Wilson) flow ---------------------------------------------------------------


def wilson_flow_force(u: torch.Tensor, lat: Lattice) -> torch.Tensor:
    """Flow generator ``Z_mu(x) = -TA(U_mu(x) A_mu(x))`` (shape of ``U``, Lie algebra).

    With ``S = -(beta/N) Re tr(U A) + ...``, the derivative along ``U -> exp(s X) U`` is
    ``-(beta/N) tr(X TA(U A))``; for anti-Hermitian ``X``, ``tr(X X) <= 0``, so ``X = -TA(UA)``
    is the direction of steepest descent. This is Luscher's ``Z = -g0^2 d S_W`` (arXiv
    1006.4518, eq. (1.3)-(1.4)) in lattice units, independent of ``beta``.
    """
    g = group_for_field(u)
    return -g.traceless_antihermitian(u @ staple_sum(u, lat))


def wilson_flow(
    u: torch.Tensor, lat: Lattice, eps: float, n_steps: int, comm=None
) -> torch.Tensor:
    """Integrate ``dV/dt = Z(V) V`` for ``n_steps`` steps of size ``eps`` (Luscher RK3).

    Luscher, arXiv 1006.4518, eq. (C.1)-(C.3) with ``Z_i = eps Z(W_i)``:
    ``W1 = exp(Z0/4) W0``, ``W2 = exp(8/9 Z1 - 17/36 Z0) W1``,
    ``W3 = exp(3/4 Z2 - 8/9 Z1 + 17/36 Z0) W2``. Each stage exchanges halos first (reach of
    the force is 1). Returns the flowed field ``V(t = n_steps * eps)``. With
    ``lat.backend`` resolving to ``host`` (and no gradient needed) the same steps run on the
    host kernels (``hpcflow.kernels.md_host``); halo links are then left as the last
    exchange made them (exchange before reading them, as every consumer does).
    """
    check_link_field(u, lat)
    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 0:
        raise ValueError(f"n_steps must be a non-negative int, got {n_steps!r}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps!r}")
    from hpcflow.kernels import dispatch

    if dispatch.host_path(u, lat):
        from hpcflow.kernels import md_host

        if md_host.supports_md_host(u, lat):
            # the same RK3 on the host kernels (equal to rounding on interior links)
            return md_host.wilson_flow_host(u, lat, eps, n_steps, comm)
    g = group_for_field(u)
    cm = as_comm(comm)
    w = u
    for _ in range(n_steps):
        w = cm.exchange(w, lat)
        z0 = eps * wilson_flow_force(w, lat)
        w = g.exp(0.25 * z0) @ w
        w = cm.exchange(w, lat)
        z1 = eps * wilson_flow_force(w, lat)
        w = g.exp((8.0 / 9.0) * z1 - (17.0 / 36.0) * z0) @ w
        w = cm.exchange(w, lat)
        z2 = eps * wilson_flow_force(w, lat)
        w = g.exp(0.75 * z2 - (8.0 / 9.0) * z1 + (17.0 / 36.0) * z0) @ w
    return w


# ---- clover field strength and the 4D topological charge ------------------------------------


def clover_field_strength(u: torch.Tensor, lat: Lattice) -> torch.Tensor:
    """Clover ``F_{mu nu}(x) = TA(Q_{mu nu}(x) / 4)`` per plane, ``(*B, n_planes, *shape, N, N)``.

    ``Q_{mu nu}(x)`` is the sum of the four plaquettes in the (mu, nu) plane based at ``x``,
    all with the same orientation; each is ``P_{mu nu}`` of a neighbouring site transported
    to ``x``. TA = traceless anti-Hermitian part (for U(1): ``i Im``). Reach 1.
    """
    check_link_field(u, lat)
    g = group_for_field(u)
    out = []
    for mu, nu in lat.planes():
        umu, unu = link(u, lat, mu), link(u, lat, nu)
        p = plaquette(u, lat, mu, nu)  # leaf at x
        # leaf at x from P(x - mu): U_mu(y)^dag P(y) U_mu(y), y = x - mu
        q = p + lat.shift(dagger(umu) @ p @ umu, mu, -1)
        # leaf from P(x - nu): U_nu(y)^dag P(y) U_nu(y), y = x - nu
        q = q + lat.shift(dagger(unu) @ p @ unu, nu, -1)
        # leaf from P(x - mu - nu): G^dag P(y) G, G = U_mu(y) U_nu(y + mu)
        gg = umu @ lat.shift(unu, mu)
        q = q + lat.shift(lat.shift(dagger(gg) @ p @ gg, mu, -1), nu, -1)
        out.append(g.traceless_antihermitian(0.25 * q))
    return torch.stack(out, dim=-(lat.nd + 3))


def topological_charge_clover(u: torch.Tensor, lat: Lattice, comm: Comm | None = None) -> torch.Tensor:
    """Clover charge ``Q = -(1/32 pi^2) sum_x eps_{mu nu rho sigma} tr(F_{mu nu} F_{rho sigma})``.

    ``F`` anti-Hermitian (Luscher, arXiv 1006.4518, eq. (5.1)); equivalently ``+1/(32 pi^2)``
    with the Hermitian ``-i F``. The 24 epsilon terms reduce to
    ``Q = -(1/4 pi^2) sum_x tr(F01 F23 - F02 F13 + F03 F12)``. 4D only, real ``(*B)``;
    near-integer after enough Wilson flow. Reach 1.
    """
    check_link_field(u, lat)
    if lat.nd != 4:
        raise ValueError(f"topological_charge_clover needs nd=4, got nd={lat.nd}")
    f = clover_field_strength(u, lat)
    # planes order: (0,1) (0,2) (0,3) (1,2) (1,3) (2,3)
    fp = [f.select(-(lat.nd + 3), k) for k in range(6)]

    def trp(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        # tr(A B) = sum_ij A_ij B_ji; real for anti-Hermitian A, B
        return (a * b.transpose(-1, -2)).sum((-1, -2)).real

    dens = trp(fp[0], fp[5]) - trp(fp[1], fp[4]) + trp(fp[2], fp[3])
    local = lat.interior_sum(dens, inner=0)
    return -as_comm(comm).sum(local) / (4 * math.pi**2)


def energy_density_clover(u: torch.Tensor, lat: Lattice, comm: Comm | None = None) -> torch.Tensor:
    """Clover action density ``<E> = -(1/V) sum_x sum_{mu<nu} tr(F_{mu nu} F_{mu nu})``.

    Equals ``(1/4) G^a_{mu nu} G^a_{mu nu}`` summed over all ``mu, nu`` for ``F = G^a T^a``
    (Luscher, arXiv 1006.4518, eq. (3.1)-(3.2)); ``t^2 <E>`` sets the scale ``t_0``. ``(*B)``.
    """
    check_link_field(u, lat)
    f = clover_field_strength(u, lat)
    dens = -(f * f.transpose(-1, -2)).sum((-1, -2)).real.sum(-(lat.nd + 1))
    return as_comm(comm).sum(lat.interior_sum(dens, inner=0)) / lat.volume


# ---- Wilson-flow scale setting (t0, w0) -------------------------------------------------------

#: Reference values of the scale-setting conditions: t^2 E(t0) = 0.3 (Luscher, arXiv 1006.4518,
#: eq. (3.5)) and t d/dt [t^2 E(t)] at t = w0^2 equals 0.3 (BMW, arXiv 1203.4469, eq. (2.2)).
T0_REFERENCE = 0.3
W0_REFERENCE = 0.3


def energy_density_plaquette(u: torch.Tensor, lat: Lattice, comm: Comm | None = None) -> torch.Tensor:
    """Plaquette action density ``E = (2/V) sum_x sum_{mu<nu} Re tr(1 - P_{mu nu}(x))``, ``(*B)``.

    The plaquette discretisation of Luscher's ``E`` (arXiv 1006.4518, section 3.2): for smooth
    fields ``P = exp(F)``, ``2 Re tr(1 - P) = -tr(F F) + O(a^2)``, so it agrees with
    :func:`energy_density_clover` to ``O(a^2)``. Reach 1.
    """
    from hpcflow.lattice.action import average_plaquette

    check_link_field(u, lat)
    n = u.shape[-1]
    return 2.0 * lat.n_planes * n * (1.0 - average_plaquette(u, lat, comm=comm))


def flow_energy(u: torch.Tensor, lat: Lattice, eps: float, n_steps: int, every: int = 1,
                comm: Comm | None = None) -> tuple[torch.Tensor, list[float], list[float], list[float]]:
    """Wilson-flow ``u`` for ``n_steps`` steps of ``eps``, measuring ``E`` every ``every`` steps.

    Returns ``(V(t_end), times, E_clover, E_plaquette)`` at the grid ``t_j = eps * min(j *
    every, n_steps)``, ``j = 1 .. ceil(n_steps / every)`` (the last point is the end of the
    flow). :func:`wilson_flow` is called once per grid interval.
    """
    _check_positive_int("every", every)
    cm = as_comm(comm)
    w = u
    done = 0
    times: list[float] = []
    ec: list[float] = []
    ep: list[float] = []
    while done < n_steps:
        k = min(every, n_steps - done)
        w = wilson_flow(w, lat, eps, k, comm=comm)
        done += k
        w = cm.exchange(w, lat)  # the measurements read the halos
        times.append(eps * done)
        ec.append(float(energy_density_clover(w, lat, comm=comm)))
        ep.append(float(energy_density_plaquette(w, lat, comm=comm)))
    return w, times, ec, ep


def _first_crossing(t: list[float] | torch.Tensor, f: list[float] | torch.Tensor, ref: float) -> float:
    """The first ``t`` where the piecewise-linear ``f(t)`` reaches ``ref`` from below (NaN: never)."""
    ts = [float(x) for x in t]
    fs = [float(x) for x in f]
    for j in range(1, len(ts)):
        a, b = fs[j - 1], fs[j]
        if a < ref <= b:
            return ts[j - 1] + (ref - a) * (ts[j] - ts[j - 1]) / (b - a)
    return math.nan


def flow_scale_t0(times: list[float], t2e: list[float], ref: float = T0_REFERENCE) -> float:
    """``t0/a^2``: the flow time where ``t^2 E(t)`` first reaches ``ref`` (0.3), by linear
    interpolation on the grid ``times`` (the point ``t = 0``, where ``t^2 E = 0``, prepended).
    NaN when the flow does not reach it (``measure.flow_time`` too small)."""
    return _first_crossing([0.0, *times], [0.0, *t2e], ref)


def flow_scale_w0(times: list[float], t2e: list[float], ref: float = W0_REFERENCE) -> float:
    """``w0/a``: ``sqrt(t)`` where ``W(t) = t d/dt [t^2 E(t)]`` first reaches ``ref`` (0.3; BMW,
    arXiv 1203.4469). ``d/dt`` by differences between neighbouring grid points (``t = 0``
    prepended), ``W`` at the midpoints, the crossing by linear interpolation. NaN when the flow
    does not reach it."""
    ts = [0.0, *(float(x) for x in times)]
    fs = [0.0, *(float(x) for x in t2e)]
    mid = [(ts[j] + ts[j + 1]) / 2 for j in range(len(ts) - 1)]
    w = [m * (fs[j + 1] - fs[j]) / (ts[j + 1] - ts[j]) for j, m in enumerate(mid)]
    tw = _first_crossing([0.0, *mid], [0.0, *w], ref)
    return math.sqrt(tw) if tw == tw else math.nan
