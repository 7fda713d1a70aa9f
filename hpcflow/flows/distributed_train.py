"""Reverse-KL training of a :class:`DistributedFlow` over ``replicas x domain`` ranks.

Each replica group holds one copy of the parameters and decomposes the lattice over its domain
grid (:class:`hpcflow.comm.hybrid.HybridGrid`). Training samples are counter-RNG prior draws:
sample ``n`` of step ``t`` is proposal number ``t * batch + n`` of the stream
:data:`TRAIN_STREAM`, replica ``r`` taking ``n`` in ``[r b, (r + 1) b)`` with ``b = batch /
replicas``. The draws are keyed by global link index, so every ``replicas x grid`` layout sees
the same global batch, and the update equals the single-rank update on that batch (to rounding):

* loss ``L = (1/batch) sum_n (log q_n + S_n)``; ``log q`` and ``S`` are domain sums (identical on
  the ranks of a domain), their backward is the identity, so ``backward`` leaves on each rank
  the partial gradient of its sub-lattice and its replica's samples;
* the partial gradients are summed over **all** ranks on one flat buffer
  (:meth:`HybridGrid.sum_all`, MPI Reduce + Bcast: bitwise identical everywhere).

The RNG state is ``(seed, step)``: a checkpoint holds model, optimizer, scheduler and step, and
a resumed run continues exactly, on the same or on another ``replicas x grid`` layout.

With ``train.accumulate = k`` micro-batch ``m`` of step ``t`` takes the proposals
``(t k + m) batch + n``: the ``k`` micro-batches of a step are exactly the proposals of one
step with ``k x batch`` and ``accumulate: 1``, so the two give the same update up to the order
of the floating-point sums. The toolkit keys (``beta_schedule``, ``init_from``, ``gradient``,
``diagnostics_every``) act as in :class:`hpcflow.flows.train.Trainer`.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

import torch

from hpcflow.flows.distributed import DistributedFlow, sum_gradients
from hpcflow.flows.train import Trainer, _check_meta
from hpcflow.io.checkpoint import atomic_torch_save
from hpcflow.lattice.geometry import SerialComm

__all__ = ["TRAIN_STREAM", "DistributedTrainer"]

# CounterRNG stream of training draws: distinct from the sampling streams 0 and 1
TRAIN_STREAM = zlib.crc32(b"train")


class DistributedTrainer(Trainer):
    """``DistributedTrainer(model, beta, train_cfg, out_dir, hybrid=None, seed=0, dtype, progress)``.

    ``model``: a :class:`DistributedFlow` whose ``comm`` is ``hybrid.domain`` (or a
    ``SerialComm`` with ``hybrid=None``: one rank). ``train.batch`` must be a multiple of the
    replica count. Same files, metrics and ``train(resume, stop_at, stop)`` as :class:`Trainer`.
    """

    def __init__(
        self,
        model: DistributedFlow,
        beta: float,
        train_cfg: Any,
        out_dir: str | Path,
        hybrid: Any = None,
        seed: int = 0,
        dtype: torch.dtype = torch.float64,
        progress: bool = True,
    ) -> None:
        from hpcflow.rng import CounterRNG

        if not isinstance(model, DistributedFlow):
            raise TypeError(f"model must be a DistributedFlow, got {type(model).__name__}")
        if hybrid is not None and model.comm is not hybrid.domain:
            raise ValueError("model.comm must be hybrid.domain (the model's domain communicator)")
        self.hybrid = hybrid
        comm = hybrid.replica_comm if hybrid is not None else SerialComm()
        super().__init__(model, model.lat, beta, train_cfg, out_dir, comm=comm, seed=seed,
                         dtype=dtype, progress=progress,
                         action_at=lambda x, b: model.action(x, float(b)))
        self.rng = CounterRNG(int(seed), TRAIN_STREAM)

    def _sum_all(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.hybrid is None else self.hybrid.sum_all(t)

    def _meta(self) -> dict[str, Any]:
        meta = super()._meta()
        meta["sampler"] = "counter"
        meta["replicas"] = int(self.comm.size)
        meta["grid"] = list(self.hybrid.domain.grid.dims) if self.hybrid is not None else None
        return meta

    def save_checkpoint(self) -> None:
        # no per-rank generator: the counter RNG state is (seed, step)
        if self.comm.is_root:
            self._write_checkpoint()
        if self.hybrid is not None:
            # committed for everybody: no rank can read an older checkpoint afterwards
            self.hybrid.barrier()

    def _write_checkpoint(self) -> None:
        atomic_torch_save(
            {
                "meta": self._meta(),
                "step": self.step,
                "model": self.model.state_dict(),
                "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(),
            },
            self.ckpt_path,
        )

    def load_checkpoint(self) -> None:
        if not self.ckpt_path.exists():
            raise ValueError(f"--resume: no checkpoint at {self.ckpt_path}")
        ck = torch.load(self.ckpt_path, map_location="cpu", weights_only=False)
        _check_meta(ck["meta"], self._meta(), self.ckpt_path)
        if ck["meta"].get("sampler") != "counter":
            raise ValueError(
                f"checkpoint {self.ckpt_path}: written by the data-parallel Trainer (per-rank "
                f"torch generators); resume it with the same trainer"
            )
        self._restore(ck)

    def _draw(self, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Micro-batch ``micro`` of this step, this replica's share: proposals
        ``(step * accumulate + micro) * batch + rank * local_batch + [0, local_batch)``."""
        n_global = int(self.cfg.batch)
        first = (self.step * self.accumulate + micro) * n_global + int(self.comm.rank) * self.local_batch
        return self.model.sample_counter(self.rng, first, self.local_batch)

    def _sum_gradients(self) -> None:
        sum_gradients(self.model.parameters(), self._sum_all)

    def _global_field(self, x: torch.Tensor) -> torch.Tensor:
        flow: Any = self.model  # a DistributedFlow: the domain's comm and local lattice
        return flow.comm.gather_field(x, flow.lat, inner=flow.inner)

    def compute_gradients(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sample this replica's share of the step's batch (all ``accumulate`` micro-batches),
        backpropagate, sum the gradients over all ranks. Returns ``(local loss share, S,
        log q)``, detached."""
        local, s, logq, _ = self._gradients(self.beta_at(self.step))
        return local, s, logq
