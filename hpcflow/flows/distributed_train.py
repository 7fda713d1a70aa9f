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
"""

from __future__ import annotations

import time
import zlib
from pathlib import Path
from typing import Any

import torch

from hpcflow.analysis.reweighting import ess
from hpcflow.flows.distributed import DistributedFlow, sum_gradients
from hpcflow.flows.train import Trainer, _check_meta, acceptance_estimate
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
                         dtype=dtype, action=lambda x: model.action(x, float(beta)), progress=progress)
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
        self.model.load_state_dict(ck["model"])
        self.opt.load_state_dict(ck["optimizer"])
        self.sched.load_state_dict(ck["scheduler"])
        self.step = int(ck["step"])

    def compute_gradients(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sample this replica's share of the step's batch, backpropagate, sum the gradients
        over all ranks. Returns ``(local loss share, S, log q)`` (the last two detached)."""
        n_global = int(self.cfg.batch)
        first = self.step * n_global + int(self.comm.rank) * self.local_batch
        x, logq = self.model.sample_counter(self.rng, first, self.local_batch)
        s = self.action(x)
        local = (logq + s).sum() / n_global
        self.opt.zero_grad(set_to_none=False)
        local.backward()
        sum_gradients(self.model.parameters(), self._sum_all)
        return local, s.detach(), logq.detach()

    def train_step(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        local, s, logq = self.compute_gradients()
        params = [p for p in self.model.parameters() if p.grad is not None]
        clip = float(self.cfg.grad_clip)
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(params, clip)
        lr = self.opt.param_groups[0]["lr"]
        self.opt.step()
        self.sched.step()
        self.step += 1
        logw = self._gather(-(s + logq))
        loss = float(self.comm.sum(local.detach().reshape(1))[0])
        return {
            "step": self.step,
            "loss": loss,
            "ess": ess(logw.detach().to(torch.float64).cpu(), strict=False),
            "acceptance": acceptance_estimate(logw),
            "lr": lr,
            "time": time.perf_counter() - t0,
        }
