"""MPI process grid, halo exchange (autograd-aware) and reductions: the ``comm`` protocol.

This is the only module of hpcflow that talks to MPI. ``mpi4py.MPI`` is imported lazily
(inside functions) so that importing hpcflow never initialises MPI as a side effect.

Decomposition (see ``hpcflow.comm.decomp``): a periodic Cartesian communicator of
``grid = (g_0, ..., g_{Nd-1})`` ranks; the rank at coordinates ``c`` owns the block of
``L_d / g_d`` sites starting at ``c_d * L_d / g_d`` in every dimension. Its local array is
padded by ``halo`` layers on both sides of every decomposed dimension (``g_d > 1``); the
other dimensions are whole on every rank, so ``Lattice.shift`` (a periodic roll) is exact
there without any halo.

Halo exchange (ALGORITHMS.md): dimension after dimension, each rank sends the ``width``
deep boundary slabs of its interior to its two neighbours with non-blocking
``Isend``/``Irecv`` on contiguous buffers; a slab spans the whole array in the other
dimensions, halos already received included, so edges and corners (``x + mu - nu``) are
filled. The backward pass is the adjoint: in reverse dimension order, halo gradients go
back to the owning rank and are added to the interior slabs they were copied from.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from hpcflow.comm.decomp import auto_grid, check_grid, local_extents, local_origin
from hpcflow.comm.fields import check_field, place_interior
from hpcflow.lattice.geometry import Lattice

__all__ = [
    "LatticeComm",
    "ProcessGrid",
    "gpu_aware_mpi",
    "halo_exchange",
    "world_size",
]

# Reductions of at most this many elements are done by an all-gather and a sum in rank
# order: bitwise identical on every rank and for every MPI reduction algorithm, which keeps
# Metropolis decisions identical on all ranks of a chain.
_ORDERED_SUM_MAX = 1 << 14


def _mpi() -> Any:
    from mpi4py import MPI

    return MPI


def world_size() -> int:
    """Number of ranks in ``COMM_WORLD`` (1 in a plain, non-mpirun process)."""
    return int(_mpi().COMM_WORLD.Get_size())


def gpu_aware_mpi() -> bool:
    """Whether the MPI library accepts CUDA device buffers (Open MPI's CUDA support query)."""
    MPI = _mpi()
    query = getattr(MPI, "Query_cuda_support", None)
    if query is None:
        return False
    try:
        return bool(query())
    except Exception:  # noqa: BLE001 - a library without the extension raises here
        return False


class _Wire:
    """Turns tensors into MPI buffers: the one place that does host staging.

    CPU tensors are passed as numpy views (zero copy). CUDA tensors are passed as device
    buffers when the MPI library is GPU-aware, otherwise staged through host memory.
    """

    def __init__(self, gpu_aware: bool) -> None:
        self.gpu_aware = gpu_aware

    def send(self, t: torch.Tensor) -> tuple[Any, torch.Tensor]:
        t = t.detach().resolve_conj().resolve_neg().contiguous()
        if t.device.type != "cpu":
            if not self.gpu_aware:
                t = t.cpu()  # host staging (synchronises with the producing stream)
            else:
                # MPI reads device memory outside torch's streams: finish pending kernels
                torch.cuda.synchronize(t.device)
        return self._buf(t), t

    def recv(self, shape: Sequence[int], like: torch.Tensor) -> tuple[Any, torch.Tensor]:
        dev = like.device if (like.device.type == "cpu" or self.gpu_aware) else "cpu"
        t = torch.empty(tuple(shape), dtype=like.dtype, device=dev)
        return self._buf(t), t

    @staticmethod
    def _buf(t: torch.Tensor) -> Any:
        if t.device.type == "cpu":
            return t.numpy()
        # GPU-aware path: mpi4py reads __cuda_array_interface__; bytes avoid dtype mapping.
        return [t.view(torch.uint8) if t.dim() else t.reshape(1).view(torch.uint8), _mpi().BYTE]


class ProcessGrid:
    """Periodic Cartesian process grid over a global lattice.

    ``ProcessGrid(global_shape, grid=None, comm=None)``: ``grid`` as in the config (one rank
    count per dimension) or ``None`` for :func:`auto_grid`; ``comm`` an mpi4py communicator
    (default ``COMM_WORLD``). The grid is validated on every rank before any collective
    call, so a bad grid raises the same ``ValueError`` everywhere and never hangs.
    """

    def __init__(
        self,
        global_shape: Sequence[int],
        grid: Sequence[int] | None = None,
        comm: Any = None,
    ) -> None:
        MPI = _mpi()
        self.comm = MPI.COMM_WORLD if comm is None else comm
        size = self.comm.Get_size()
        gs = tuple(int(x) for x in global_shape)
        dims = auto_grid(size, gs) if grid is None else check_grid(gs, grid, size)
        self.global_shape: tuple[int, ...] = gs
        self.dims: tuple[int, ...] = tuple(dims)
        self.nd = len(gs)
        self.local_shape: tuple[int, ...] = local_extents(gs, dims)
        # reorder=False: rank numbering is the row-major one of hpcflow.comm.decomp
        self.cart = self.comm.Create_cart(list(dims), periods=[True] * self.nd, reorder=False)
        self.rank: int = self.cart.Get_rank()
        self.size: int = size
        self.coords: tuple[int, ...] = tuple(self.cart.Get_coords(self.rank))
        self.origin: tuple[int, ...] = local_origin(gs, dims, self.coords)
        # (minus, plus) neighbour of every dimension
        self.neighbours: tuple[tuple[int, int], ...] = tuple(
            tuple(self.cart.Shift(d, 1)) for d in range(self.nd)
        )
        # one communicator per dimension along the lines of ranks that share the other
        # coordinates (ordered products such as the Polyakov loop run over these)
        self.lines = tuple(
            self.cart.Sub([e == d for e in range(self.nd)]) for d in range(self.nd)
        )

    @property
    def decomposed_dims(self) -> tuple[int, ...]:
        return tuple(d for d in range(self.nd) if self.dims[d] > 1)

    def lattice(self, halo: int = 1, pad_all: bool = False) -> Lattice:
        """The :class:`Lattice` of this rank's local array with ``halo`` layers.

        Halos are on the decomposed dimensions only (all dimensions if ``pad_all``).
        ``halo`` must be >= 1 when the lattice is decomposed, and at most the local extent.
        """
        if not isinstance(halo, int) or halo < 0:
            raise ValueError(f"halo must be an int >= 0, got {halo!r}")
        padded = tuple(range(self.nd)) if pad_all else self.decomposed_dims
        if halo == 0 and self.decomposed_dims:
            raise ValueError(
                f"halo must be >= 1 on the process grid {list(self.dims)}, got 0"
            )
        for d in padded:
            if halo > self.local_shape[d]:
                raise ValueError(
                    f"halo {halo} exceeds the local extent {self.local_shape[d]} of dimension "
                    f"{d} (lattice {list(self.global_shape)} on grid {list(self.dims)}); "
                    f"use a halo <= local extent or fewer ranks in that dimension"
                )
        return Lattice(
            self.global_shape,
            self.local_shape,
            self.origin,
            halo=halo if padded else 0,
            padded_dims=padded,
        )

    def split(self, n_groups: int, grid: Sequence[int] | None = None) -> tuple[int, ProcessGrid]:
        """Split the ranks into ``n_groups`` consecutive worker groups, each with its own grid.

        Returns ``(group_index, grid_of_this_group)``. Used by sampling: one Markov chain
        per group.
        """
        if not isinstance(n_groups, int) or n_groups < 1 or self.size % n_groups:
            raise ValueError(
                f"n_groups must be a positive divisor of the {self.size} ranks, got {n_groups!r}"
            )
        per = self.size // n_groups
        # validate the group grid on every rank before the collective Split
        if grid is None:
            auto_grid(per, self.global_shape)
        else:
            check_grid(self.global_shape, grid, per)
        color = self.comm.Get_rank() // per
        sub = self.comm.Split(color, key=self.comm.Get_rank())
        return color, ProcessGrid(self.global_shape, grid, comm=sub)

    def free(self) -> None:
        """Release the communicators this grid created."""
        for c in self.lines:
            c.Free()
        self.cart.Free()
        self.lines = ()

    def __repr__(self) -> str:
        return (
            f"ProcessGrid(global_shape={self.global_shape}, dims={self.dims}, rank={self.rank}, "
            f"coords={self.coords})"
        )


# ---- halo exchange -----------------------------------------------------------------------


class _Exchanger:
    """Geometry of one exchange: which axes, widths and neighbours (no autograd here)."""

    def __init__(self, grid: ProcessGrid, wire: _Wire, lat: Lattice, inner: int, width: int):
        self.grid, self.wire, self.lat, self.inner, self.width = grid, wire, lat, inner, width

    def _axis(self, f: torch.Tensor, d: int) -> int:
        return f.dim() - self.inner - self.lat.nd + d

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        """Fill the halos of ``f`` (modified in place and returned)."""
        h, w = self.lat.halo, self.width
        for d in self.lat.padded_dims:
            ax, n = self._axis(f, d), self.lat.local_shape[d]
            lo_send, hi_send = (h, w), (h + n - w, w)
            lo_halo, hi_halo = (h - w, w), (h + n, w)
            minus, plus = self.grid.neighbours[d]
            if self.grid.dims[d] == 1:
                f.narrow(ax, *hi_halo).copy_(f.narrow(ax, *lo_send))
                f.narrow(ax, *lo_halo).copy_(f.narrow(ax, *hi_send))
                continue
            # tag 2d: travelling to the plus neighbour, 2d + 1: to the minus neighbour
            self._swap(
                f,
                ax,
                sends=[(f.narrow(ax, *lo_send), minus, 2 * d + 1), (f.narrow(ax, *hi_send), plus, 2 * d)],
                recvs=[(hi_halo, plus, 2 * d + 1, False), (lo_halo, minus, 2 * d, False)],
            )
        return f

    def adjoint(self, g: torch.Tensor) -> torch.Tensor:
        """Adjoint of :meth:`forward`: move halo entries of ``g`` back to their owners, add."""
        h, w = self.lat.halo, self.width
        for d in reversed(self.lat.padded_dims):
            ax, n = self._axis(g, d), self.lat.local_shape[d]
            lo_own, hi_own = (h, w), (h + n - w, w)
            lo_halo, hi_halo = (h - w, w), (h + n, w)
            minus, plus = self.grid.neighbours[d]
            lo = g.narrow(ax, *lo_halo).clone()
            hi = g.narrow(ax, *hi_halo).clone()
            g.narrow(ax, *lo_halo).zero_()
            g.narrow(ax, *hi_halo).zero_()
            if self.grid.dims[d] == 1:
                g.narrow(ax, *lo_own).add_(hi)
                g.narrow(ax, *hi_own).add_(lo)
                continue
            self._swap(
                g,
                ax,
                sends=[(hi, plus, 2 * d), (lo, minus, 2 * d + 1)],
                recvs=[(lo_own, minus, 2 * d, True), (hi_own, plus, 2 * d + 1, True)],
            )
        return g

    def _swap(self, f: torch.Tensor, ax: int, sends: list, recvs: list) -> None:
        MPI = _mpi()
        cart = self.grid.cart
        reqs, keep, landing = [], [], []
        for (start, length), src, tag, add in recvs:
            shape = list(f.shape)
            shape[ax] = length
            buf, t = self.wire.recv(shape, f)
            reqs.append(cart.Irecv(buf, source=src, tag=tag))
            landing.append((start, length, t, add))
        for slab, dst, tag in sends:
            buf, t = self.wire.send(slab)
            keep.append(t)  # the buffer must live until Waitall
            reqs.append(cart.Isend(buf, dest=dst, tag=tag))
        MPI.Request.Waitall(reqs)
        for start, length, t, add in landing:
            dst = f.narrow(ax, start, length)
            if add:
                dst.add_(t.to(f.device))
            else:
                dst.copy_(t.to(f.device))


class _HaloExchange(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, f: torch.Tensor, ex: _Exchanger) -> torch.Tensor:  # type: ignore[override]
        ctx.ex = ex
        return ex.forward(f.clone())

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return _HaloAdjoint.apply(g, ctx.ex), None


class _HaloAdjoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, g: torch.Tensor, ex: _Exchanger) -> torch.Tensor:  # type: ignore[override]
        ctx.ex = ex
        return ex.adjoint(g.clone())

    @staticmethod
    def backward(ctx: Any, gg: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return _HaloExchange.apply(gg, ctx.ex), None


def halo_exchange(
    f: torch.Tensor,
    lat: Lattice,
    grid: ProcessGrid,
    width: int | None = None,
    inner: int = 2,
    gpu_aware: bool = False,
) -> torch.Tensor:
    """Return ``f`` with its halos filled from the neighbouring ranks (autograd-aware).

    ``f``: link field ``(*B, Nd, *lat.shape, N, N)``, site matrix field (``inner=2``) or
    scalar site field (``inner=0``), any dtype. ``width`` (default ``lat.halo``, at most
    ``lat.halo``) is the number of halo layers to fill, innermost first. The input is not
    modified.
    """
    check_field(f, lat, inner)
    if lat.global_shape != grid.global_shape or lat.local_shape != grid.local_shape:
        raise ValueError(
            f"lattice (global {lat.global_shape}, local {lat.local_shape}) does not belong to "
            f"the process grid (global {grid.global_shape}, local {grid.local_shape})"
        )
    if width is not None and (not isinstance(width, int) or width < 1):
        raise ValueError(f"width must be an int >= 1, got {width!r}")
    if not lat.padded_dims or lat.halo == 0:
        # nothing is padded: every dimension is whole on this rank and rolls are exact
        return f
    w = lat.halo if width is None else width
    if w > lat.halo:
        raise ValueError(f"width must be at most the lattice halo {lat.halo}, got {width}")
    ex = _Exchanger(grid, _Wire(gpu_aware), lat, inner, w)
    return _HaloExchange.apply(f, ex)


# ---- reductions --------------------------------------------------------------------------


class _AllSum(torch.autograd.Function):
    """Global sum; the backward is the identity because every rank continues with the same
    (replicated) result, so d L / d t_local = d L / d sum on every rank."""

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor, lc: LatticeComm) -> torch.Tensor:  # type: ignore[override]
        return lc._sum_nograd(t)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return g, None


class LatticeComm:
    """The MPI implementation of :class:`hpcflow.lattice.geometry.Comm` (the whole protocol).

    ``LatticeComm(grid)`` with a :class:`ProcessGrid`; ``local_lattice(halo)`` gives this
    rank's :class:`Lattice`. Physics calls ``exchange(f, lat, inner)``, ``sum``, ``max``,
    ``mean``; drivers use ``bcast``, ``bcast_object``, ``gather_field``, ``any_error``.
    """

    def __init__(self, grid: ProcessGrid, gpu_aware: bool | None = None) -> None:
        self.grid = grid
        self.comm = grid.cart
        self.rank: int = grid.rank
        self.size: int = grid.size
        self.is_root: bool = grid.rank == 0
        # detected once; host staging is used for CUDA tensors otherwise
        self.gpu_aware = gpu_aware_mpi() if gpu_aware is None else bool(gpu_aware)
        self._wire = _Wire(self.gpu_aware)

    @property
    def decomposed(self) -> bool:
        """Always True: the lattice lives on a process grid (of one rank, possibly), so
        ``local_lattice`` may carry halos that ``exchange`` fills."""
        return True

    @classmethod
    def create(
        cls, global_shape: Sequence[int], grid: Sequence[int] | None = None, comm: Any = None
    ) -> LatticeComm:
        """Shortcut: ``LatticeComm(ProcessGrid(global_shape, grid, comm))``."""
        return cls(ProcessGrid(global_shape, grid, comm))

    @classmethod
    def from_config(cls, cfg: Any, comm: Any = None) -> LatticeComm:
        """From a :class:`hpcflow.config.Config`: ``cfg.lattice.shape`` and ``cfg.grid``
        (``None``: factorise the number of ranks)."""
        return cls(ProcessGrid(cfg.lattice.shape, getattr(cfg, "grid", None), comm))

    def local_lattice(
        self, global_shape: Sequence[int] | None = None, halo: int = 1, pad_all: bool = False
    ) -> Lattice:
        """This rank's :class:`Lattice` with ``halo`` layers on the decomposed dimensions
        (all dimensions with ``pad_all``); ``global_shape``, if given, must be the grid's."""
        if global_shape is not None and tuple(global_shape) != self.grid.global_shape:
            raise ValueError(
                f"global_shape {list(global_shape)} differs from the process grid's lattice "
                f"{list(self.grid.global_shape)}"
            )
        return self.grid.lattice(halo, pad_all=pad_all)

    # -- protocol ----------------------------------------------------------------------
    def exchange(
        self, f: torch.Tensor, lat: Lattice, inner: int = 2, width: int | None = None
    ) -> torch.Tensor:
        """Fill the halos of ``f`` (autograd-aware); see :func:`halo_exchange`."""
        return halo_exchange(f, lat, self.grid, width=width, inner=inner, gpu_aware=self.gpu_aware)

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """Global sum over the ranks, bitwise identical on every rank (autograd-aware)."""
        if self.size == 1:
            return t
        if t.requires_grad and torch.is_grad_enabled():
            return _AllSum.apply(t, self)
        return self._sum_nograd(t)

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """Mean over the ranks of a per-rank tensor."""
        return self.sum(t) / self.size

    def max(self, t: torch.Tensor) -> torch.Tensor:
        """Global element-wise maximum (real tensors; not differentiable)."""
        if self.size == 1:
            return t
        if t.is_complex():
            raise TypeError(f"max needs a real tensor, got dtype {t.dtype}")
        return self._allreduce(t.detach(), _mpi().MAX)

    def min(self, t: torch.Tensor) -> torch.Tensor:
        """Global element-wise minimum (real tensors; not differentiable)."""
        if self.size == 1:
            return t
        if t.is_complex():
            raise TypeError(f"min needs a real tensor, got dtype {t.dtype}")
        return self._allreduce(t.detach(), _mpi().MIN)

    def _allreduce(self, t: torch.Tensor, op: Any) -> torch.Tensor:
        buf, host = self._wire.send(t)
        out_buf, out = self._wire.recv(host.shape, host)
        self.comm.Allreduce(buf, out_buf, op=op)
        return out.to(t.device)

    def _sum_nograd(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        if t.numel() <= _ORDERED_SUM_MAX:
            buf, host = self._wire.send(t)
            all_buf, allt = self._wire.recv((self.size,) + tuple(host.shape), host)
            self.comm.Allgather(buf, all_buf)
            acc = allt[0].clone()
            for r in range(1, self.size):
                acc += allt[r]
            return acc.to(t.device)
        # large tensors: reduce at the root, then broadcast the one result to everybody
        MPI = _mpi()
        buf, host = self._wire.send(t)
        out_buf, out = self._wire.recv(host.shape, host)
        self.comm.Reduce(buf, out_buf, op=MPI.SUM, root=0)
        self.comm.Bcast(out_buf, root=0)
        return out.to(t.device)

    # -- broadcast, gather, errors --------------------------------------------------------
    def bcast(self, t: torch.Tensor, root: int = 0) -> torch.Tensor:
        """Tensor of the ``root`` rank on every rank (same shape and dtype everywhere)."""
        host = t.detach().resolve_conj().resolve_neg().contiguous().clone()
        if host.device.type != "cpu" and not self.gpu_aware:
            host = host.cpu()
        self.comm.Bcast(self._wire._buf(host), root=root)
        return host.to(t.device)

    def bcast_object(self, obj: Any, root: int = 0) -> Any:
        """Picklable Python object of the ``root`` rank on every rank."""
        return self.comm.bcast(obj, root=root)

    def allgather_object(self, obj: Any) -> list:
        """List of ``obj`` from every rank, in rank order."""
        return self.comm.allgather(obj)

    def barrier(self) -> None:
        self.comm.Barrier()

    def any_error(self, exc: BaseException | None) -> None:
        """Collective error check: if any rank passes an exception, raise on every rank.

        Call on all ranks after a step that may fail on some of them only, so that no rank
        waits forever in the next collective.
        """
        msgs = self.comm.allgather(None if exc is None else f"{type(exc).__name__}: {exc}")
        bad = [(r, m) for r, m in enumerate(msgs) if m is not None]
        if bad:
            r, m = bad[0]
            if exc is not None:
                raise exc
            raise RuntimeError(f"rank {r} failed: {m}")

    def gather_field(self, f: torch.Tensor, lat: Lattice, inner: int = 2) -> torch.Tensor:
        """The global field assembled from every rank's interior, on every rank."""
        check_field(f, lat, inner)
        mine = (lat.origin, f[lat.interior_slices(inner)].detach().resolve_conj().cpu().numpy())
        parts = self.comm.allgather(mine)
        lead = tuple(f.shape[: f.dim() - inner - lat.nd])
        tail = tuple(f.shape[f.dim() - inner :])
        g = torch.empty(lead + lat.global_shape + tail, dtype=f.dtype)
        for origin, arr in parts:
            piece = Lattice(lat.global_shape, lat.local_shape, tuple(origin))
            place_interior(g, torch.from_numpy(arr), piece, inner)
        return g.to(f.device)

    def ordered_product(self, m: torch.Tensor, dim: int) -> torch.Tensor:
        """``M_0 M_1 ... M_{g-1}`` over the ranks along process-grid dimension ``dim``.

        ``m`` (``(..., N, N)``) is this rank's ordered product of its own segment of a line
        of links along ``dim``; the result (same on every rank of the line) is the product
        around the whole periodic line, e.g. the Polyakov loop for ``dim = t``.
        """
        if not 0 <= dim < self.grid.nd:
            raise ValueError(f"dim must be in [0, {self.grid.nd}), got {dim}")
        line = self.grid.lines[dim]
        g = self.grid.dims[dim]
        if g == 1:
            return m
        buf, host = self._wire.send(m)
        all_buf, allm = self._wire.recv((g,) + tuple(host.shape), host)
        line.Allgather(buf, all_buf)  # rank in the line communicator == grid coordinate
        out = allm[0]
        for k in range(1, g):
            out = out @ allm[k]
        return out.to(m.device)
