"""Lattice geometry: the local array a rank holds, its global coordinates, and shifts.

Every neighbour access in physics code goes through :meth:`Lattice.shift`, a periodic
roll of the local array. On a single rank this is the periodic torus. On a halo-padded
local array (domain decomposition) the roll wraps garbage only into the outer ``halo``
layers, so every quantity whose reach is at most ``halo`` is exact on the interior: the
decomposed code exchanges halos, runs the very same physics, and keeps the interior.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

__all__ = ["Collective", "Comm", "Lattice", "Reducer", "SerialComm", "as_comm"]


@dataclass(frozen=True)
class Lattice:
    """Geometry of one local array.

    ``global_shape``: extents of the whole periodic lattice. ``local_shape``: extents of the
    interior this rank owns (default: the whole lattice). ``origin``: global coordinate of
    the first *interior* site. ``halo``: width of the halo on each side of each dimension
    that is padded (``padded_dims``; default all dims when ``halo > 0``). ``backend``:
    implementation of plaquette/staple (``hpcflow.kernels.dispatch``: "auto", "torch",
    "host", "cuda"), chosen once from the config.
    """

    global_shape: tuple[int, ...]
    local_shape: tuple[int, ...] | None = None
    origin: tuple[int, ...] | None = None
    halo: int = 0
    padded_dims: tuple[int, ...] | None = None
    backend: str = "torch"
    _cache: dict = field(default_factory=dict, compare=False, repr=False, hash=False)

    def __post_init__(self) -> None:
        gs = tuple(int(x) for x in self.global_shape)
        object.__setattr__(self, "global_shape", gs)
        if self.local_shape is None:
            object.__setattr__(self, "local_shape", gs)
        else:
            object.__setattr__(self, "local_shape", tuple(int(x) for x in self.local_shape))
        if self.origin is None:
            object.__setattr__(self, "origin", (0,) * len(gs))
        else:
            object.__setattr__(self, "origin", tuple(int(x) for x in self.origin))
        if self.padded_dims is None:
            dims = tuple(range(len(gs))) if self.halo > 0 else ()
            object.__setattr__(self, "padded_dims", dims)
        else:
            object.__setattr__(self, "padded_dims", tuple(int(d) for d in self.padded_dims))
        if len(self.local_shape) != len(gs) or len(self.origin) != len(gs):
            raise ValueError("global_shape, local_shape and origin must have the same length")
        if self.halo < 0:
            raise ValueError(f"halo must be >= 0, got {self.halo}")
        if self.backend not in ("auto", "torch", "host", "cuda"):
            raise ValueError(
                f"backend must be one of 'auto', 'torch', 'host', 'cuda', got {self.backend!r}"
            )

    # ---- sizes ------------------------------------------------------------------------
    @property
    def nd(self) -> int:
        return len(self.global_shape)

    @property
    def shape(self) -> tuple[int, ...]:
        """Extents of the local array including halos."""
        return tuple(
            n + (2 * self.halo if d in self.padded_dims else 0)
            for d, n in enumerate(self.local_shape)
        )

    @property
    def volume(self) -> int:
        """Number of sites of the global lattice."""
        v = 1
        for n in self.global_shape:
            v *= n
        return v

    @property
    def local_volume(self) -> int:
        v = 1
        for n in self.local_shape:
            v *= n
        return v

    @property
    def n_planes(self) -> int:
        return self.nd * (self.nd - 1) // 2

    def planes(self) -> list[tuple[int, int]]:
        """Planes (mu, nu), mu < nu, in the order used by per-plane fields."""
        return [(mu, nu) for mu in range(self.nd) for nu in range(mu + 1, self.nd)]

    # ---- index helpers ------------------------------------------------------------------
    def site_dim(self, mu: int, inner: int = 2) -> int:
        """Axis (negative) of direction ``mu`` in a field with ``inner`` trailing dims."""
        return -(inner + self.nd) + mu

    def shift(self, f: torch.Tensor, mu: int, step: int = 1, inner: int = 2) -> torch.Tensor:
        """``f(x + step * mu_hat)`` with periodic wrap of the local array."""
        return torch.roll(f, shifts=-step, dims=self.site_dim(mu, inner))

    def _start(self, d: int) -> int:
        return self.halo if d in self.padded_dims else 0

    def interior_slices(self, inner: int = 2) -> tuple:
        """Index tuple that crops a field (trailing ``inner`` dims) to the interior."""
        sl = tuple(
            slice(self._start(d), self._start(d) + self.local_shape[d]) for d in range(self.nd)
        )
        return (Ellipsis,) + sl + (slice(None),) * inner

    def interior(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Bool mask over ``shape``: True on sites this rank owns."""
        m = torch.zeros(self.shape, dtype=torch.bool, device=device)
        m[self.interior_slices(inner=0)] = True
        return m

    def global_coords(self, device: torch.device | str | None = None) -> torch.Tensor:
        """LongTensor ``(nd, *shape)``: global coordinate of every array site (mod extents)."""
        key = ("coords", str(device))
        if key not in self._cache:
            axes = []
            for d in range(self.nd):
                start = self.origin[d] - self._start(d)
                axes.append(
                    torch.remainder(
                        torch.arange(start, start + self.shape[d], device=device),
                        self.global_shape[d],
                    )
                )
            grids = torch.meshgrid(*axes, indexing="ij")
            self._cache[key] = torch.stack(grids, 0)
        return self._cache[key]

    def global_site_index(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Lexicographic global site index (x_0 slowest) of every array site."""
        c = self.global_coords(device)
        idx = torch.zeros(self.shape, dtype=torch.long, device=device)
        for d in range(self.nd):
            idx = idx * self.global_shape[d] + c[d]
        return idx

    def global_link_index(self, device: torch.device | str | None = None) -> torch.Tensor:
        """LongTensor ``(nd, *shape)``: ``mu * V + site`` for every link of the array."""
        s = self.global_site_index(device)
        mus = torch.arange(self.nd, device=device).view((self.nd,) + (1,) * self.nd)
        return mus * self.volume + s.unsqueeze(0)

    def parity(self, device: torch.device | str | None = None) -> torch.Tensor:
        """``(sum_mu x_mu) % 2`` of the global coordinates, over the array."""
        return self.global_coords(device).sum(0) % 2

    def interior_sum(self, f: torch.Tensor, inner: int = 0) -> torch.Tensor:
        """Sum of a site field over interior sites (the ``nd + inner`` trailing dims)."""
        g = f[self.interior_slices(inner)]
        return g.sum(dim=tuple(range(-(self.nd + inner), 0)))


class Reducer(Protocol):
    """The smallest comm protocol: who am I, and sums / maxima over a group of ranks.

    What a data-parallel trainer needs (``hpcflow.comm.hybrid.ReplicaComm`` implements only
    this). ``sum`` and ``max`` are collective: every member calls them, and every member gets
    the same (bitwise identical) result.
    """

    @property
    def rank(self) -> int: ...

    @property
    def size(self) -> int: ...

    @property
    def is_root(self) -> bool: ...

    def sum(self, t: torch.Tensor) -> torch.Tensor: ...

    def max(self, t: torch.Tensor) -> torch.Tensor: ...


class Collective(Protocol):
    """The collective calls that keep the ranks of a run in step (stop agreement, writers).

    Every :class:`Comm` is one; so is ``hpcflow.comm.hybrid.HybridGrid`` (the whole world of
    replicas x domains), which is no :class:`Comm` (it has no lattice of its own).
    """

    @property
    def is_root(self) -> bool: ...

    def max(self, t: torch.Tensor) -> torch.Tensor: ...

    def barrier(self) -> None: ...

    def allgather_object(self, obj: Any) -> list[Any]: ...


class Comm(Reducer, Protocol):
    """The comm protocol of one lattice: what physics and the chain engine call.

    Implemented completely by :class:`SerialComm` (one rank owns the whole lattice; every
    reduction is the identity) and ``hpcflow.comm.LatticeComm`` (MPI domain decomposition).
    Physics code takes ``comm: Comm | None`` (``None`` = :class:`SerialComm`, see
    :func:`as_comm`) and never asks which implementation it holds: ``decomposed`` says
    whether the lattice is split over a process grid (``LatticeComm``, even of one rank), and
    ``local_lattice`` gives this rank's :class:`Lattice` either way.
    """

    @property
    def decomposed(self) -> bool: ...

    def local_lattice(
        self, global_shape: Sequence[int] | None = None, halo: int = 1, pad_all: bool = False
    ) -> Lattice: ...

    def exchange(
        self, f: torch.Tensor, lat: Lattice, inner: int = 2, width: int | None = None
    ) -> torch.Tensor: ...

    def mean(self, t: torch.Tensor) -> torch.Tensor: ...

    def min(self, t: torch.Tensor) -> torch.Tensor: ...

    def bcast(self, t: torch.Tensor, root: int = 0) -> torch.Tensor: ...

    def barrier(self) -> None: ...

    def allgather_object(self, obj: Any) -> list[Any]: ...

    def bcast_object(self, obj: Any, root: int = 0) -> Any: ...

    def any_error(self, exc: BaseException | None) -> None: ...

    def gather_field(self, f: torch.Tensor, lat: Lattice, inner: int = 2) -> torch.Tensor: ...

    def ordered_product(self, m: torch.Tensor, dim: int) -> torch.Tensor: ...


class SerialComm:
    """The :class:`Comm` protocol of one rank owning the whole lattice: no halos, no MPI;
    every reduction is the identity."""

    rank = 0
    size = 1
    is_root = True
    decomposed = False

    def local_lattice(
        self, global_shape: Sequence[int] | None = None, halo: int = 1, pad_all: bool = False
    ) -> Lattice:
        """The whole lattice without halos (``halo`` is ignored: whole dimensions wrap exactly
        through :meth:`Lattice.shift`). ``pad_all`` needs halos filled by an exchange, which a
        serial comm does not do: ``ValueError``."""
        if global_shape is None:
            raise ValueError("SerialComm.local_lattice needs the global_shape (there is no process grid)")
        if pad_all:
            raise ValueError("pad_all needs a decomposed comm (hpcflow.comm.LatticeComm) to fill "
                             "the halos, got SerialComm")
        return Lattice(tuple(global_shape))

    def exchange(
        self, f: torch.Tensor, lat: Lattice, inner: int = 2, width: int | None = None
    ) -> torch.Tensor:
        return f

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def max(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def min(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def bcast(self, t: torch.Tensor, root: int = 0) -> torch.Tensor:
        return t

    def barrier(self) -> None:
        pass

    def allgather_object(self, obj: Any) -> list[Any]:
        return [obj]

    def bcast_object(self, obj: Any, root: int = 0) -> Any:
        return obj

    def any_error(self, exc: BaseException | None) -> None:
        if exc is not None:
            raise exc

    def gather_field(self, f: torch.Tensor, lat: Lattice, inner: int = 2) -> torch.Tensor:
        return f

    def ordered_product(self, m: torch.Tensor, dim: int) -> torch.Tensor:
        return m


def as_comm(comm: Comm | None) -> Comm:
    """``comm``, or :class:`SerialComm` for ``None`` (a single-rank run)."""
    return SerialComm() if comm is None else comm


def check_shape(shape: Sequence[int]) -> tuple[int, ...]:
    s = tuple(int(x) for x in shape)
    if any(x < 1 for x in s):
        raise ValueError(f"lattice extents must be >= 1, got {list(s)}")
    return s
