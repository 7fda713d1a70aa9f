"""Hybrid parallelism: ``world = replicas x domain grid`` (data parallel x domain decomposition).

The ``P`` ranks of the world communicator are split into ``R`` consecutive replica groups of
``P / R`` ranks. Each group holds one copy of the model and decomposes the lattice over its
own :class:`ProcessGrid` (``grid``, or :func:`auto_grid` of ``P / R`` ranks); world rank
``w`` belongs to replica ``w // (P / R)`` and sits at domain rank ``w % (P / R)``. A second
split joins the ranks with the same domain rank across replicas (the *cross* communicator,
whose rank is the replica index): data-parallel reductions of per-replica quantities run there.

Gradients are summed over **all** world ranks (each rank holds the partial gradient of its
sub-lattice and its replica's batch share) on one flat buffer with MPI's own ``Reduce`` and
``Bcast``: the broadcast makes the result bitwise identical on every rank, so replicated
parameters never drift apart (an ``Allreduce`` is not guaranteed to be, by the MPI standard).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from hpcflow.comm.decomp import auto_grid, check_grid
from hpcflow.comm.mpi import LatticeComm, ProcessGrid, _mpi, _Wire

__all__ = ["HybridGrid", "ReplicaComm", "check_replicas"]


def check_replicas(replicas: Any, size: int) -> int:
    """Validate the replica count (``train.replicas``) against the number of ranks."""
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        raise ValueError(f"train.replicas must be an int >= 1, got {replicas!r}")
    if size % replicas:
        raise ValueError(
            f"train.replicas {replicas} does not divide the {size} ranks; the world is split "
            f"into replicas x domain ranks, so replicas must be a divisor of {size}"
        )
    return replicas


class ReplicaComm:
    """The :class:`hpcflow.lattice.geometry.Reducer` protocol over the data-parallel
    dimension, as the ``Trainer`` sees it (only ``rank``/``size``/``is_root``/``sum``/``max``:
    it is no full ``Comm``, since the replicas share no lattice to exchange halos of).

    ``rank`` = replica index, ``size`` = number of replicas, ``is_root`` = world rank 0.
    ``sum`` adds per-replica values (identical within a replica) over the replicas, in replica
    order (bitwise identical everywhere); ``max`` is over the whole world (stop flags).
    """

    def __init__(self, hybrid: HybridGrid) -> None:
        self._h = hybrid
        self.rank: int = hybrid.replica
        self.size: int = hybrid.replicas
        self.is_root: bool = hybrid.world_rank == 0

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        return self._h.sum_replicas(t)

    def max(self, t: torch.Tensor) -> torch.Tensor:
        return self._h.max(t)


class HybridGrid:
    """``HybridGrid(global_shape, replicas=1, grid=None, comm=None)``: see the module docstring.

    ``domain``: the :class:`LatticeComm` of this rank's replica group (halo exchange and
    domain sums of the decomposed model); ``replica`` / ``replicas``; ``world_rank`` /
    ``world_size``; ``replica_comm``: :class:`ReplicaComm` for the trainer. All arguments are
    validated on every rank before the first collective call, so bad input raises the same
    ``ValueError`` everywhere and never hangs.

    It implements :class:`hpcflow.lattice.geometry.Collective` over the whole world
    (``is_root``, ``max``, ``barrier``, ``allgather_object``: the chain's stop agreement), not
    the lattice ``Comm`` protocol: that is ``domain``'s.
    """

    def __init__(
        self,
        global_shape: Sequence[int],
        replicas: int = 1,
        grid: Sequence[int] | None = None,
        comm: Any = None,
    ) -> None:
        MPI = _mpi()
        self.world = MPI.COMM_WORLD if comm is None else comm
        self.world_size: int = self.world.Get_size()
        self.world_rank: int = self.world.Get_rank()
        self.replicas = check_replicas(replicas, self.world_size)
        per = self.world_size // self.replicas
        gs = tuple(int(x) for x in global_shape)
        if grid is None:
            auto_grid(per, gs)
        else:
            check_grid(gs, grid, per)
        self.replica: int = self.world_rank // per
        self.domain_size: int = per
        self._dom = self.world.Split(self.replica, key=self.world_rank)
        self.domain = LatticeComm(ProcessGrid(gs, grid, comm=self._dom))
        # rank in the cross communicator == replica index (key orders by world rank)
        self.cross = self.world.Split(self.world_rank % per, key=self.world_rank)
        self._wire = _Wire(self.domain.gpu_aware)
        self.replica_comm = ReplicaComm(self)

    @property
    def is_root(self) -> bool:
        return self.world_rank == 0

    def sum_all(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over every world rank (gradients), bitwise identical on all ranks (Reduce + Bcast)."""
        if self.world_size == 1:
            return t
        MPI = _mpi()
        buf, host = self._wire.send(t)
        out_buf, out = self._wire.recv(host.shape, host)
        self.world.Reduce(buf, out_buf, op=MPI.SUM, root=0)
        self.world.Bcast(out_buf, root=0)
        return out.to(t.device)

    def sum_replicas(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over the replicas of a per-replica value, in replica order (all-gather then add)."""
        if self.replicas == 1:
            return t
        buf, host = self._wire.send(t)
        all_buf, allt = self._wire.recv((self.replicas,) + tuple(host.shape), host)
        self.cross.Allgather(buf, all_buf)
        acc = allt[0].clone()
        for r in range(1, self.replicas):
            acc += allt[r]
        return acc.to(t.device)

    def max(self, t: torch.Tensor) -> torch.Tensor:
        """Element-wise maximum over every world rank (real tensors; stop flags)."""
        if self.world_size == 1:
            return t
        buf, host = self._wire.send(t)
        out_buf, out = self._wire.recv(host.shape, host)
        self.world.Allreduce(buf, out_buf, op=_mpi().MAX)
        return out.to(t.device)

    def barrier(self) -> None:
        """Wait for every world rank."""
        self.world.Barrier()

    def allgather_object(self, obj: Any) -> list[Any]:
        """Every world rank's ``obj`` (e.g. stop requests that all replica groups agree on)."""
        return self.world.allgather(obj)

    def free(self) -> None:
        """Release the communicators this object created."""
        self.domain.grid.free()
        self.cross.Free()
        self._dom.Free()

    def __repr__(self) -> str:
        return (
            f"HybridGrid(replicas={self.replicas}, domain={self.domain.grid.dims}, "
            f"world_rank={self.world_rank}, replica={self.replica})"
        )
