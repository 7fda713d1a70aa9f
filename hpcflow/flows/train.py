"""Reverse-KL training of a flow, data-parallel over the ranks of a ``comm``.

Loss per global batch (ALGORITHMS.md): ``L = mean(log q(U) + S(U)) = KL(q || p) - log Z``.
Each rank draws ``batch / size`` samples from its own stream
(``spawn_seed(seed, "train", rank)``), backpropagates its share of the global mean, and the
gradients are summed over ranks on one flat buffer (``comm.sum``), so the update equals the
single-rank update on the same global batch. Checkpoints hold the model, optimizer,
scheduler, step and every rank's generator state; ``train(resume=True)`` continues bit for
bit as an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from hpcflow.analysis.reweighting import ess
from hpcflow.flows.u1 import u1_action
from hpcflow.io.checkpoint import atomic_torch_save
from hpcflow.lattice.geometry import Lattice, Reducer, SerialComm

__all__ = [
    "Trainer",
    "acceptance_estimate",
    "load_flow_checkpoint",
    "make_scheduler",
    "plot_metrics",
]

SCHEDULES = ("constant", "cosine", "step")


def acceptance_estimate(logw: torch.Tensor) -> float:
    """Estimated acceptance of the independence-Metropolis chain with these proposals.

    At equilibrium the chain's state ``x`` follows ``p`` and a proposal ``y`` follows ``q``,
    so the acceptance is ``E_{x~p} E_{y~q} min(1, w(y) / w(x))`` with ``w = p / q``. The
    batch estimates it by self-normalised importance weights for ``x`` and the other batch
    members for ``y``: ``sum_i W_i mean_{j != i} min(1, w_j / w_i)``, ``W = softmax(log w)``
    (no random numbers, independent of the batch order; consistent, biased for tiny batches).
    Comparing each proposal with the previous one instead (as if every proposal were
    accepted) overestimates the acceptance of a poorly trained model several times.
    """
    logw = logw.detach().to(torch.float64).reshape(-1)
    n = len(logw)
    if n < 2:
        return float("nan")
    a = torch.exp(torch.clamp(logw[None, :] - logw[:, None], max=0.0))  # a[i, j] = min(1, w_j/w_i)
    a.fill_diagonal_(0.0)
    return float((torch.softmax(logw, 0) * a.sum(1) / (n - 1)).sum())


def make_scheduler(opt: torch.optim.Optimizer, schedule: str, steps: int):
    """``constant``; ``cosine`` (annealed to 0 over ``steps``); ``step`` (x0.5 every steps/4)."""
    if schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    if schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps))
    if schedule == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, steps // 4), gamma=0.5)
    raise ValueError(f"train.schedule must be one of {list(SCHEDULES)}, got {schedule!r}")


def _check_meta(meta: dict[str, Any], expect: dict[str, Any], path: Path) -> None:
    for key in ("group", "lattice", "beta", "arch"):
        if key in expect and meta.get(key) != expect[key]:
            raise ValueError(
                f"checkpoint {path}: {key} is {meta.get(key)!r} but this run has {expect[key]!r}"
            )


def load_flow_checkpoint(model: torch.nn.Module, path: str | Path, beta: float | None = None) -> dict:
    """Load model weights from a training checkpoint after checking group, lattice, architecture
    (and beta when given); returns the checkpoint dict. For ``hpcflow run`` with a flow."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"flow checkpoint {path} does not exist (run `hpcflow train` first)")
    ck = torch.load(path, map_location="cpu", weights_only=False)
    expect = {"group": model.arch["group"], "lattice": model.arch["lattice"], "arch": model.arch}
    if beta is not None:
        expect["beta"] = float(beta)
    _check_meta(ck["meta"], expect, path)
    model.load_state_dict(ck["model"])
    return ck


def plot_metrics(rows: list[dict[str, Any]], path: Path) -> None:
    """PNG with loss, ESS, acceptance and learning rate against step (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(2, 2, figsize=(9, 6), sharex=True)
    for ax, key in zip(axes.flat, ("loss", "ess", "acceptance", "lr")):
        ax.plot(steps, [r[key] for r in rows], lw=0.8)
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("step")
    fig.tight_layout()
    tmp = Path(path).with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


class Trainer:
    """Reverse-KL trainer; ``Trainer(...).train(resume=False) -> list of metric rows``.

    Writes ``<out_dir>/train/{checkpoint.pt, metrics.jsonl, metrics.png}`` on the root rank.
    ``action`` defaults to the U(1) Wilson action on angles; pass another ``(x) -> S`` for
    other theories.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        lat: Lattice,
        beta: float,
        train_cfg: Any,
        out_dir: str | Path,
        comm: Reducer | None = None,
        seed: int = 0,
        dtype: torch.dtype = torch.float64,
        action: Callable[[torch.Tensor], torch.Tensor] | None = None,
        progress: bool = True,
    ) -> None:
        self.comm: Reducer = comm if comm is not None else SerialComm()
        self.model = model.to(dtype)
        self.lat = lat
        self.beta = float(beta)
        self.cfg = train_cfg
        self.dtype = dtype
        self.seed = int(seed)
        self.progress = bool(progress)
        self.dir = Path(out_dir) / "train"
        self.ckpt_path = self.dir / "checkpoint.pt"
        self.metrics_path = self.dir / "metrics.jsonl"
        self.action = action or (lambda th: u1_action(th, lat, self.beta))
        steps, batch = int(train_cfg.steps), int(train_cfg.batch)
        size = int(self.comm.size)
        if batch % size:
            raise ValueError(f"train.batch {batch} must be a multiple of the number of ranks {size}")
        if str(train_cfg.schedule) not in SCHEDULES:
            raise ValueError(f"train.schedule must be one of {list(SCHEDULES)}, got {train_cfg.schedule!r}")
        self.local_batch = batch // size
        # fused Adam: one kernel for all parameters instead of ~12 small ops each (the
        # optimizer step was ~10% of a tutorial-size training step on CPU)
        fused = all(p.device.type in ("cpu", "cuda") for p in self.model.parameters())
        self.opt = torch.optim.Adam(self.model.parameters(), lr=float(train_cfg.lr), fused=fused)
        self.sched = make_scheduler(self.opt, str(train_cfg.schedule), steps)
        self.gen = torch.Generator()
        # the string key "train" hashed to an int: spawn_seed takes integer keys only
        from hpcflow.rng import spawn_seed

        self.gen.manual_seed(spawn_seed(self.seed, zlib.crc32(b"train"), int(self.comm.rank)) % 2**63)
        self.step = 0

    # ---- metadata and checkpoints ------------------------------------------------------
    def _meta(self) -> dict[str, Any]:
        arch = getattr(self.model, "arch", {})
        return {
            "group": arch.get("group"),
            "lattice": list(self.lat.global_shape),
            "beta": self.beta,
            "arch": arch,
            "dtype": str(self.dtype),
            "batch": int(self.cfg.batch),
            "ranks": int(self.comm.size),
        }

    def _gather(self, t: torch.Tensor) -> torch.Tensor:
        """All ranks' equally sized 1D tensors, concatenated in rank order (via ``comm.sum``)."""
        n = t.numel()
        buf = torch.zeros(n * self.comm.size, dtype=t.dtype)
        buf[self.comm.rank * n : (self.comm.rank + 1) * n] = t.reshape(-1)
        return self.comm.sum(buf)

    def save_checkpoint(self) -> None:
        gstate = self._gather(self.gen.get_state().to(torch.int64)).to(torch.uint8)
        if not self.comm.is_root:
            return
        atomic_torch_save(
            {
                "meta": self._meta(),
                "step": self.step,
                "model": self.model.state_dict(),
                "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(),
                "generators": gstate.view(self.comm.size, -1),
            },
            self.ckpt_path,
        )

    def load_checkpoint(self) -> None:
        if not self.ckpt_path.exists():
            raise ValueError(f"--resume: no checkpoint at {self.ckpt_path}")
        ck = torch.load(self.ckpt_path, map_location="cpu", weights_only=False)
        _check_meta(ck["meta"], self._meta(), self.ckpt_path)
        if ck["meta"].get("ranks") != self.comm.size:
            raise ValueError(
                f"checkpoint {self.ckpt_path}: written by {ck['meta'].get('ranks')} ranks, "
                f"resumed on {self.comm.size}; the per-rank streams would differ"
            )
        self.model.load_state_dict(ck["model"])
        self.opt.load_state_dict(ck["optimizer"])
        self.sched.load_state_dict(ck["scheduler"])
        self.gen.set_state(ck["generators"][self.comm.rank].clone())
        self.step = int(ck["step"])

    # ---- one optimisation step ---------------------------------------------------------
    def train_step(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        n_global = int(self.cfg.batch)
        theta, logq = self.model.sample(self.local_batch, self.gen)
        s = self.action(theta)
        local = (logq + s).sum() / n_global
        self.opt.zero_grad(set_to_none=False)
        local.backward()
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.comm.size > 1:
            flat = self.comm.sum(torch.cat([p.grad.reshape(-1) for p in params]))
            i = 0
            for p in params:
                p.grad.copy_(flat[i : i + p.numel()].view_as(p))
                i += p.numel()
        clip = float(self.cfg.grad_clip)
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(params, clip)
        lr = self.opt.param_groups[0]["lr"]
        self.opt.step()
        self.sched.step()
        self.step += 1
        logw = self._gather((-(s + logq)).detach())
        loss = float(self.comm.sum(local.detach().reshape(1))[0])
        return {
            "step": self.step,
            "loss": loss,
            "ess": ess(logw.detach().to(torch.float64).cpu(), strict=False),
            "acceptance": acceptance_estimate(logw),
            "lr": lr,
            "time": time.perf_counter() - t0,
        }

    # ---- the loop ----------------------------------------------------------------------
    def _read_metrics(self, upto: int) -> list[dict[str, Any]]:
        rows = []
        if self.metrics_path.exists():
            for line in self.metrics_path.read_text().splitlines():
                if line.strip():
                    r = json.loads(line)
                    if r["step"] <= upto:
                        rows.append(r)
        return rows

    def train(self, resume: bool = False, stop_at: int | None = None,
              stop: Any = None) -> list[dict[str, Any]]:
        """Train to ``train.steps`` (or stop after step ``stop_at``, as a preempted job would).

        ``resume``: continue from ``checkpoint.pt``; metric rows past the checkpoint's step
        (written after it by the interrupted run) are dropped so the log matches an
        uninterrupted run. ``stop``: an object with ``stop_requested`` (e.g.
        :class:`hpcflow.signals.StopFlag`); when set on any rank, every rank checkpoints after
        the current step and returns, with ``self.stopped`` True.
        """
        self.stopped = False
        rows: list[dict[str, Any]] = []
        if resume:
            self.load_checkpoint()
            rows = self._read_metrics(self.step)
        if self.comm.is_root:
            self.dir.mkdir(parents=True, exist_ok=True)
            with open(self.metrics_path, "w") as fh:
                fh.writelines(json.dumps(r) + "\n" for r in rows)
        steps = int(self.cfg.steps)
        end = steps if stop_at is None else min(steps, int(stop_at))
        bar = None
        if self.progress and self.comm.is_root:
            from tqdm import tqdm

            bar = tqdm(total=steps, initial=self.step, desc="train", dynamic_ncols=True)
        log_every, ck_every = int(self.cfg.log_every), int(self.cfg.checkpoint_every)
        try:
            while self.step < end:
                row = self.train_step()
                if not math.isfinite(row["loss"]):
                    raise FloatingPointError(f"training loss is {row['loss']} at step {self.step}")
                rows.append(row)
                if self.comm.is_root:
                    with open(self.metrics_path, "a") as fh:
                        fh.write(json.dumps(row) + "\n")
                    if bar is not None:
                        bar.update(1)
                        if self.step % log_every == 0:
                            bar.set_postfix(loss=f"{row['loss']:.3f}", ess=f"{row['ess']:.3f}",
                                            acc=f"{row['acceptance']:.3f}")
                if self.step % ck_every == 0:
                    self.save_checkpoint()
                if stop is not None:
                    flag = torch.tensor([float(bool(stop.stop_requested))])
                    if float(self.comm.max(flag)[0]) > 0 and self.step < end:
                        self.stopped = True
                        break
        finally:
            if bar is not None:
                bar.close()
        if self.step % ck_every != 0:
            self.save_checkpoint()
        if self.comm.is_root and rows:
            plot_metrics(rows, self.dir / "metrics.png")
        return rows
