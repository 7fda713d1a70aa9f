"""Gauge groups U(1), SU(2), SU(3) on torch tensors: Haar sampling, projection, exp, algebra.

Matrices live in the two trailing dimensions, ``(..., N, N)``; U(1) is stored with
``N = 1``. Lie-algebra elements are anti-Hermitian (traceless for SU(N)) matrices
``X = i sum_a w_a T_a`` with Hermitian generators normalised as ``tr(T_a T_b) = delta_ab/2``
(SU(2): ``T_a = sigma_a / 2``; SU(3): ``T_a = lambda_a / 2``, Gell-Mann); U(1): ``X = i w``.

Hot and cold starts (:func:`random_field`, :func:`cold_field`) build full link fields
``(*batch, nd, *lat.shape, N, N)`` as described in ``docs/DESIGN.md``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from hpcflow.dtypes import complex_dtype, real_dtype
from hpcflow.lattice.geometry import Lattice

__all__ = [
    "GROUP_NAMES",
    "as_group",
    "SU2",
    "SUN",
    "U1",
    "Group",
    "batched_index",
    "cold_field",
    "dagger",
    "draw_normals",
    "get_group",
    "group_for_field",
    "random_field",
]

GROUP_NAMES = ("u1", "su2", "su3")

_COMPLEX = (torch.complex64, torch.complex128)


def dagger(m: torch.Tensor) -> torch.Tensor:
    """Conjugate transpose of the trailing two dimensions."""
    return m.conj().transpose(-1, -2)


def _check_complex(dtype: torch.dtype, name: str = "dtype") -> None:
    if dtype not in _COMPLEX:
        raise TypeError(f"{name} must be torch.complex64 or torch.complex128, got {dtype}")


def _eye(n: int, shape: Sequence[int], dtype: torch.dtype, device: Any) -> torch.Tensor:
    e = torch.eye(n, dtype=dtype, device=device)
    return e.expand(*tuple(shape), n, n).clone()


class Group:
    """A compact gauge group acting on ``(..., N, N)`` complex matrices.

    Subclasses implement the group-specific parts; the attributes are
    ``name``, ``N`` (matrix size in storage), ``n_algebra`` (real dimension of the Lie
    algebra), ``n_haar_normals`` (standard normals per element consumed by :meth:`haar`).
    """

    name: str = ""
    N: int = 0
    n_algebra: int = 0
    n_haar_normals: int = 0

    def __repr__(self) -> str:
        return f"get_group({self.name!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Group) and other.name == self.name

    def __hash__(self) -> int:
        return hash(self.name)

    # ---- basics ------------------------------------------------------------------------
    @staticmethod
    def dagger(m: torch.Tensor) -> torch.Tensor:
        """Conjugate transpose of the trailing two dimensions."""
        return dagger(m)

    def identity(
        self,
        shape: Sequence[int] = (),
        dtype: torch.dtype = torch.complex128,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Identity elements, shape ``(*shape, N, N)``."""
        _check_complex(dtype)
        return _eye(self.N, shape, dtype, device)

    def generators(
        self, dtype: torch.dtype = torch.complex128, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """Hermitian generators ``T_a``, shape ``(n_algebra, N, N)``, ``tr T_a T_b = d_ab/2``."""
        raise NotImplementedError

    def algebra_from_coords(self, w: torch.Tensor) -> torch.Tensor:
        """``X = i sum_a w_a T_a`` from real coordinates ``w`` of shape ``(..., n_algebra)``."""
        self._check_last(w, self.n_algebra, "w")
        cdtype = complex_dtype(w.dtype)
        t = self.generators(cdtype, w.device)
        return 1j * torch.einsum("...a,aij->...ij", w.to(cdtype), t)

    def coords_from_algebra(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`algebra_from_coords`: ``w_a = 2 Re tr(T_a (-i X))``."""
        t = self.generators(x.dtype, x.device)
        return 2.0 * torch.einsum("aji,...ij->...a", t, -1j * x).real

    def traceless_antihermitian(self, m: torch.Tensor) -> torch.Tensor:
        """``TA(M) = (M - M^dag)/2 - tr(M - M^dag)/(2N) 1`` (projection onto the algebra)."""
        a = 0.5 * (m - dagger(m))
        tr = torch.diagonal(a, dim1=-2, dim2=-1).sum(-1) / self.N
        return a - tr[..., None, None] * torch.eye(self.N, dtype=m.dtype, device=m.device)

    def haar(self, normals: torch.Tensor) -> torch.Tensor:
        """Haar-distributed element from ``n_haar_normals`` i.i.d. N(0,1) in the last axis."""
        raise NotImplementedError

    def project(self, m: torch.Tensor) -> torch.Tensor:
        """Project a (near-)group matrix back onto the group."""
        raise NotImplementedError

    def exp(self, x: torch.Tensor) -> torch.Tensor:
        """Exponential map of Lie-algebra elements ``X`` (anti-Hermitian, traceless for SU(N))."""
        return torch.linalg.matrix_exp(x)

    def random_algebra(
        self, normals: torch.Tensor, dtype: torch.dtype = torch.complex128
    ) -> torch.Tensor:
        """Gaussian algebra element ``i sum_a w_a T_a`` from ``n_algebra`` normals (HMC momenta)."""
        return self.algebra_from_coords(normals.to(real_dtype(dtype)))

    # ---- checks ------------------------------------------------------------------------
    @staticmethod
    def _check_last(t: torch.Tensor, n: int, name: str) -> None:
        if t.dim() < 1 or t.shape[-1] != n:
            raise ValueError(
                f"{name} must have last dimension {n}, got shape {tuple(t.shape)}"
            )

    def check_field(self, u: torch.Tensor, name: str = "U") -> None:
        """Raise a clear error unless ``u`` is a complex ``(..., N, N)`` tensor of this group."""
        if not torch.is_tensor(u) or u.dtype not in _COMPLEX:
            got = u.dtype if torch.is_tensor(u) else type(u).__name__
            raise TypeError(f"{name} must be a complex64/complex128 tensor, got {got}")
        if u.dim() < 2 or u.shape[-1] != self.N or u.shape[-2] != self.N:
            raise ValueError(
                f"{name} must end in ({self.N}, {self.N}) for {self.name}, "
                f"got shape {tuple(u.shape)}"
            )


class U1(Group):
    """U(1) stored as ``(..., 1, 1)`` phases."""

    name = "u1"
    N = 1
    n_algebra = 1
    n_haar_normals = 2

    def generators(
        self, dtype: torch.dtype = torch.complex128, device: torch.device | str | None = None
    ) -> torch.Tensor:
        # T = 1 with X = i w: U(1) is abelian and has no trace condition, so the SU(N)
        # normalisation tr T^2 = 1/2 is not used here (U = exp(i w) is the natural angle).
        return torch.ones(1, 1, 1, dtype=dtype, device=device)

    def coords_from_algebra(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., 0, 0].imag.unsqueeze(-1)

    def traceless_antihermitian(self, m: torch.Tensor) -> torch.Tensor:
        # u(1) has no traceless condition: the projection is the anti-Hermitian part i Im M.
        return 0.5 * (m - dagger(m))

    def haar(self, normals: torch.Tensor) -> torch.Tensor:
        # The angle of an isotropic 2D Gaussian is uniform on (-pi, pi].
        self._check_last(normals, 2, "normals")
        theta = torch.atan2(normals[..., 1], normals[..., 0])
        return torch.polar(torch.ones_like(theta), theta)[..., None, None]

    def project(self, m: torch.Tensor) -> torch.Tensor:
        return torch.polar(torch.ones_like(m.real), torch.angle(m))

    def exp(self, x: torch.Tensor) -> torch.Tensor:
        # exp(i Im X) exactly on the unit circle (any rounding-level real part is dropped).
        return torch.polar(torch.ones_like(x.real), x.imag)


class SUN(Group):
    """SU(N) for general N (used for N = 3): QR-based Haar, polar projection, matrix_exp."""

    def __init__(self, n: int) -> None:
        if n < 2:
            raise ValueError(f"SU(N) needs N >= 2, got N={n}")
        self.name = f"su{n}"
        self.N = n
        self.n_algebra = n * n - 1
        self.n_haar_normals = 2 * n * n
        self._gen_cache: dict[tuple, torch.Tensor] = {}

    def generators(
        self, dtype: torch.dtype = torch.complex128, device: torch.device | str | None = None
    ) -> torch.Tensor:
        key = (dtype, str(device))
        if key not in self._gen_cache:
            self._gen_cache[key] = _generalized_gell_mann(self.N).to(dtype=dtype, device=device) / 2
        return self._gen_cache[key]

    def _fix_det(self, q: torch.Tensor) -> torch.Tensor:
        # Divide by det^(1/N) (principal branch): maps U(N) onto SU(N).
        phase = torch.angle(torch.linalg.det(q))
        return q * torch.polar(torch.ones_like(phase), -phase / self.N)[..., None, None]

    def haar(self, normals: torch.Tensor) -> torch.Tensor:
        # Mezzadri, math-ph/0609050: QR of a complex Ginibre matrix with the phases of
        # diag(R) moved into Q is Haar on U(N). Dividing by det^(1/N) commutes with left
        # multiplication by SU(N), so the image measure is left-invariant: Haar on SU(N).
        n = self.N
        self._check_last(normals, 2 * n * n, "normals")
        rdtype = normals.dtype if normals.dtype in (torch.float32, torch.float64) else torch.float64
        z = torch.complex(normals[..., : n * n], normals[..., n * n :]).to(complex_dtype(rdtype))
        z = z.reshape(*normals.shape[:-1], n, n)
        q, r = torch.linalg.qr(z)
        d = torch.diagonal(r, dim1=-2, dim2=-1)
        q = q * (d / d.abs())[..., None, :]
        return self._fix_det(q)

    def project(self, m: torch.Tensor) -> torch.Tensor:
        # Unitary polar factor W = U_svd V_svd^dag maximises Re tr(W^dag M) over U(N);
        # then the determinant phase is removed.
        u, _, vh = torch.linalg.svd(m)
        return self._fix_det(u @ vh)


class SU2(SUN):
    """SU(2): quaternion Haar sampling and a closed-form exponential."""

    def __init__(self) -> None:
        super().__init__(2)
        self.n_haar_normals = 4

    def haar(self, normals: torch.Tensor) -> torch.Tensor:
        # A normalised 4D Gaussian is uniform on S^3 = SU(2), and the uniform measure on S^3
        # is the Haar measure. U = a0 1 + i a.sigma.
        self._check_last(normals, 4, "normals")
        a = normals / torch.linalg.vector_norm(normals, dim=-1, keepdim=True)
        return _su2_from_quaternion(a)

    def exp(self, x: torch.Tensor) -> torch.Tensor:
        # For traceless anti-Hermitian 2x2 X, X^2 = -r^2 1 with r^2 = det X, hence
        # exp(X) = cos(r) 1 + (sin r / r) X. Written in s = r^2 with a Taylor branch near
        # s = 0 so that autograd stays finite at X = 0.
        s = (x[..., 0, 0].imag ** 2 + x[..., 0, 1].abs() ** 2).unsqueeze(-1).unsqueeze(-1)
        small = s < 1e-6
        s_safe = torch.where(small, torch.ones_like(s), s)
        r = torch.sqrt(s_safe)
        c = torch.where(small, 1 - s / 2 + s * s / 24 - s**3 / 720, torch.cos(r))
        sc = torch.where(small, 1 - s / 6 + s * s / 120 - s**3 / 5040, torch.sin(r) / r)
        eye = torch.eye(2, dtype=x.dtype, device=x.device)
        return c * eye + sc * x


def _su2_from_quaternion(a: torch.Tensor) -> torch.Tensor:
    """``a0 1 + i (a1 s1 + a2 s2 + a3 s3)`` from a real ``(..., 4)`` tensor."""
    c = complex_dtype(a.dtype)
    a0, a1, a2, a3 = (a[..., k].to(c) for k in range(4))
    row0 = torch.stack([a0 + 1j * a3, a2 + 1j * a1], -1)
    row1 = torch.stack([-a2 + 1j * a1, a0 - 1j * a3], -1)
    return torch.stack([row0, row1], -2)


def _generalized_gell_mann(n: int) -> torch.Tensor:
    """Generalised Gell-Mann matrices, ``(n^2-1, n, n)``, ``tr(l_a l_b) = 2 delta_ab``.

    Order for n = 2: Pauli (sigma_1, sigma_2, sigma_3); for n = 3: the standard
    lambda_1..lambda_8.
    """
    mats: list[torch.Tensor] = []
    if n == 2:
        s = torch.zeros(3, 2, 2, dtype=torch.complex128)
        s[0, 0, 1] = s[0, 1, 0] = 1
        s[1, 0, 1], s[1, 1, 0] = -1j, 1j
        s[2, 0, 0], s[2, 1, 1] = 1, -1
        return s
    if n == 3:
        lam = torch.zeros(8, 3, 3, dtype=torch.complex128)
        lam[0, 0, 1] = lam[0, 1, 0] = 1
        lam[1, 0, 1], lam[1, 1, 0] = -1j, 1j
        lam[2, 0, 0], lam[2, 1, 1] = 1, -1
        lam[3, 0, 2] = lam[3, 2, 0] = 1
        lam[4, 0, 2], lam[4, 2, 0] = -1j, 1j
        lam[5, 1, 2] = lam[5, 2, 1] = 1
        lam[6, 1, 2], lam[6, 2, 1] = -1j, 1j
        lam[7, 0, 0] = lam[7, 1, 1] = 1 / math.sqrt(3)
        lam[7, 2, 2] = -2 / math.sqrt(3)
        return lam
    for j in range(n):
        for k in range(j + 1, n):
            m = torch.zeros(n, n, dtype=torch.complex128)
            m[j, k] = m[k, j] = 1
            mats.append(m)
            m = torch.zeros(n, n, dtype=torch.complex128)
            m[j, k], m[k, j] = -1j, 1j
            mats.append(m)
    for l_ in range(1, n):
        m = torch.zeros(n, n, dtype=torch.complex128)
        for j in range(l_):
            m[j, j] = 1
        m[l_, l_] = -l_
        mats.append(m * math.sqrt(2 / (l_ * (l_ + 1))))
    return torch.stack(mats)


def get_group(name: str) -> Group:
    """The group called ``name``: one of ``"u1"``, ``"su2"``, ``"su3"`` (case-insensitive)."""
    if not isinstance(name, str):
        raise TypeError(f"group name must be a str, got {type(name).__name__}: {name!r}")
    key = name.strip().lower()
    if key == "u1":
        return U1()
    if key == "su2":
        return SU2()
    if key == "su3":
        return SUN(3)
    raise ValueError(f"unknown gauge group {name!r}; allowed: {', '.join(GROUP_NAMES)}")


def group_for_field(u: torch.Tensor) -> Group:
    """The group implied by the matrix size of a field: N=1 -> u1, 2 -> su2, 3 -> su3."""
    n = u.shape[-1]
    names = {1: "u1", 2: "su2", 3: "su3"}
    if n not in names or u.shape[-2] != n:
        raise ValueError(
            f"field must end in (N, N) with N in (1, 2, 3), got shape {tuple(u.shape)}"
        )
    return get_group(names[n])


def _batch_tuple(batch: Sequence[int] | int) -> tuple[int, ...]:
    b = (batch,) if isinstance(batch, int) else tuple(int(x) for x in batch)
    if any(x < 1 for x in b):
        raise ValueError(f"batch extents must be >= 1, got {b}")
    return b


def batched_index(index: torch.Tensor, size: int, batch: Sequence[int] | int) -> torch.Tensor:
    """``b * size + index`` for every flat (row-major) batch entry ``b``: ``(*batch, *index.shape)``.

    ``size`` is the size of the global index space (``nd * V`` for links, ``V`` for sites),
    so distinct configurations of a batch draw from disjoint counters.
    """
    b = _batch_tuple(batch)
    if not b:
        return index
    nb = math.prod(b)
    offs = torch.arange(nb, device=index.device) * size
    return (offs.view((nb,) + (1,) * index.dim()) + index).reshape(*b, *index.shape)


def draw_normals(rng: Any, index: torch.Tensor, step: int, n: int) -> torch.Tensor:
    """``(*index.shape, n)`` float64 standard normals for the global counters ``index``.

    ``rng`` is a counter-based generator (``hpcflow.rng.CounterRNG``, the production path:
    draws depend only on global indices, so any process grid gives the same numbers) or a
    ``torch.Generator`` (tests and single-rank convenience; *not* decomposition independent,
    ``step`` is ignored).
    """
    if isinstance(rng, torch.Generator):
        out = torch.randn(*index.shape, n, generator=rng, dtype=torch.float64, device=rng.device)
        return out.to(index.device)
    if not hasattr(rng, "normal"):
        raise TypeError(
            "rng must be a CounterRNG (with .normal) or a torch.Generator, "
            f"got {type(rng).__name__}"
        )
    return rng.normal(index, step, n, dtype=torch.float64)


def random_field(
    lat: Lattice,
    group: Group,
    rng: Any,
    step: int = 0,
    batch: Sequence[int] | int = (),
    dtype: torch.dtype = torch.complex128,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Hot start: Haar-random links, shape ``(*batch, nd, *lat.shape, N, N)``.

    With a ``CounterRNG``, link ``(mu, x)`` of configuration ``b`` (flat row-major index
    over ``batch``) uses the normals ``rng.normal(b * nd * V + mu * V + site(x), step,
    n_haar_normals)``, ``V`` the global volume, ``site`` the global lexicographic index: the
    field is the same whatever the process grid, and halo sites get their owners' values.
    Normals are drawn in float64 and the group element cast to ``dtype`` afterwards, so the
    complex64 field is the rounded complex128 one.
    """
    _check_complex(dtype)
    index = batched_index(lat.global_link_index(device), lat.nd * lat.volume, batch)
    normals = draw_normals(rng, index, step, group.n_haar_normals)
    return group.haar(normals).to(dtype)


def cold_field(
    lat: Lattice,
    group: Group,
    batch: Sequence[int] | int = (),
    dtype: torch.dtype = torch.complex128,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Cold start: all links the identity, shape ``(*batch, nd, *lat.shape, N, N)``."""
    b = _batch_tuple(batch)
    return group.identity((*b, lat.nd, *lat.shape), dtype=dtype, device=device)


def as_group(group: Group | str) -> Group:
    """A ``Group`` from a group object or its name (``"u1"``, ``"su2"``, ``"su3"``)."""
    if isinstance(group, str):
        return get_group(group)
    if not hasattr(group, "N") or not hasattr(group, "n_algebra"):
        raise TypeError(f"group must be a Group or one of 'u1', 'su2', 'su3', got {group!r}")
    return group
