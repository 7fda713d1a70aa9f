"""Reverse-KL training of a flow, data-parallel over the ranks of a ``comm``.

Loss per global batch (ALGORITHMS.md): ``L = mean(log q(U) + S(U)) = KL(q || p) - log Z``.
Each rank draws ``batch / size`` samples from its own stream
(``spawn_seed(seed, "train", rank)``), backpropagates its share of the global mean, and the
gradients are summed over ranks on one flat buffer (``comm.sum``), so the update equals the
single-rank update on the same global batch. Checkpoints hold the model, optimizer,
scheduler, step and every rank's generator state; ``train(resume=True)`` continues bit for
bit as an uninterrupted run.

Training toolkit for high beta and large volume (``train.*`` keys, docs/DESIGN.md "Training
toolkit"):

* ``beta_schedule``: the beta of each step's action follows a piecewise-linear schedule in
  the step number (:func:`scheduled_beta`), ending at ``action.beta``; checkpoints record the
  final beta, so sampling checks are unchanged; a resume continues the schedule exactly.
* ``init_from``: warm start from the weights of a flow trained on another lattice (and/or
  beta), checked by :func:`hpcflow.flows.build.transfer_problem`; path and sha256 recorded.
* ``gradient: path``: the path-gradient estimator (:func:`path_log_prob`).
* ``accumulate``: ``k`` micro-batches of ``train.batch`` per optimizer step.
* ``diagnostics_every``: 2D U(1) diagnostics of the training batch in the metrics.
"""

from __future__ import annotations

import hashlib
import io
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
    "GRADIENTS",
    "TrainSetupError",
    "Trainer",
    "acceptance_estimate",
    "load_flow_checkpoint",
    "make_scheduler",
    "path_log_prob",
    "plot_metrics",
    "scheduled_beta",
]

SCHEDULES = ("constant", "cosine", "step")
GRADIENTS = ("reparam", "path")
#: consecutive skipped steps (non-finite loss or gradient) after which training stops as diverged
MAX_SKIPPED_IN_A_ROW = 10


class TrainSetupError(ValueError):
    """A ``train.*`` setting that does not fit the model or the files, as the one-line config
    error ``key 'train.X': got V (type); allowed: A`` (the driver prefixes the config file)."""


def _setup_error(key: str, value: Any, allowed: str) -> TrainSetupError:
    shown = "null" if value is None else str(value)
    return TrainSetupError(f"key '{key}': got {shown} ({type(value).__name__}); allowed: {allowed}")


def scheduled_beta(points: Any, step: int, final: float) -> float:
    """Beta of training step ``step`` (0-based: the step being computed).

    ``points``: ``((0, b_0), ..., (s_n, b_n))`` (``None``: no schedule, ``final``).
    Piecewise linear between the points, ``b_n`` from step ``s_n`` on; a function of the step
    number only, so a resumed run continues the schedule bit for bit.
    """
    if not points:
        return float(final)
    if step >= points[-1][0]:
        return float(points[-1][1])
    for (s0, b0), (s1, b1) in zip(points, points[1:]):
        if s0 <= step < s1:
            return float(b0 + (b1 - b0) * ((step - s0) / (s1 - s0)))
    return float(points[0][1])  # pragma: no cover (step < 0)


class _LogProb(torch.nn.Module):
    """``flow.log_prob`` as a module's ``forward`` (for ``torch.func.functional_call``)."""

    flow: Any  # a GaugeFlow (a registered submodule: its parameters are ``flow.<name>``)

    def __init__(self, flow: torch.nn.Module) -> None:
        super().__init__()
        self.flow = flow

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.flow.log_prob(x)


def path_log_prob(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``log q_theta'(x)`` through the inverse flow, with ``theta'`` a detached copy of the
    parameters: the gradient reaches the parameters only through ``x`` (the path).

    Path-gradient estimator (Vaitl, Nicoli, Nakajima, Kessel 2022, arXiv 2207.07115): with
    ``x = T_theta(z)``, the reverse-KL gradient is
    ``d/dtheta E_z[log q_theta(x) + S(x)] = E_z[(d_x log q_theta(x) + d_x S(x)) dx/dtheta]
    + E_z[d_theta log q_theta(x)|_x]``, and the last (score) term has zero mean
    (``E_q[d_theta log q] = d_theta int q = 0``). Backpropagating
    ``path_log_prob(model, x) + S(x)`` gives the first term alone: same expectation, and a
    variance that vanishes as ``q -> p`` (then ``log q - log p`` is constant in ``x``).
    """
    params = {f"flow.{name}": p.detach() for name, p in model.named_parameters()}
    return torch.func.functional_call(_LogProb(model), params, (x,))


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


def plot_metrics(rows: list[dict[str, Any]], path: Path, meta: dict[str, Any] | None = None) -> None:
    """PNG with loss, ESS, acceptance and learning rate against step (matplotlib, Agg).

    ``meta`` (``group``, ``lattice``, ``beta``, ``batch``; e.g. ``Trainer._meta()``) titles the
    figure; for 2D U(1) the loss panel also shows the exact ``-log Z`` at each row's beta
    (:func:`hpcflow.analysis.exact.u1_2d_log_z`; loss + log Z = KL(q||p) >= 0)."""
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
    meta = meta or {}
    lat = [int(n) for n in (meta.get("lattice") or [])]
    if meta.get("group") == "u1" and len(lat) == 2:
        from hpcflow.analysis.exact import u1_2d_log_z

        betas = [float(r.get("beta", meta.get("beta") or 0.0)) for r in rows]
        log_z = {b: u1_2d_log_z(b, volume=lat[0] * lat[1]) for b in set(betas)}
        axes[0, 0].plot(steps, [-log_z[b] for b in betas], "k:", lw=1.2, label="exact -log Z (loss >= -log Z)")
        axes[0, 0].legend(loc="upper right", fontsize=7)
    title = ""
    if meta:
        beta = meta.get("beta")
        title = (f"Training: {meta.get('group', '?')} {'x'.join(map(str, lat))}, "
                 f"beta {'?' if beta is None else f'{float(beta):g}'}"
                 + (f", batch {meta['batch']}" if meta.get("batch") else ""))
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    tmp = Path(path).with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100, metadata={"Title": title} if title else None)
    plt.close(fig)
    os.replace(tmp, path)


def _jsonable(v: Any) -> Any:
    """Plain JSON values of a diagnostics result (tensors and numpy arrays as lists)."""
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, torch.Tensor):
        return _jsonable(v.detach().cpu().tolist())
    if hasattr(v, "tolist") and not isinstance(v, (str, bytes)):  # numpy arrays and scalars
        return _jsonable(v.tolist())
    return v


class Trainer:
    """Reverse-KL trainer; ``Trainer(...).train(resume=False) -> list of metric rows``.

    Writes ``<out_dir>/train/{checkpoint.pt, metrics.jsonl, metrics.png}`` on the root rank.
    ``action_at(x, beta) -> S`` is the action of the theory at a given beta (needed with
    ``train.beta_schedule``); ``action(x) -> S`` the action at the final ``beta`` (without a
    schedule only); neither: the U(1) Wilson action on angles.

    ``train_cfg`` may omit the toolkit keys (``beta_schedule``, ``init_from``, ``gradient``,
    ``accumulate``, ``diagnostics_every``): their defaults are today's training. Metric rows:
    ``step, loss, ess, acceptance, lr, beta`` (the beta of the step's loss), ``batch`` (the
    effective batch ``accumulate x train.batch``), ``time``; ``init_from`` in the first row of
    a warm start; ``diagnostics`` every ``diagnostics_every`` steps.
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
        action_at: Callable[[torch.Tensor, float], torch.Tensor] | None = None,
    ) -> None:
        from hpcflow.config import BetaScheduleError, beta_schedule_points

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
        steps, batch = int(train_cfg.steps), int(train_cfg.batch)
        size = int(self.comm.size)
        if batch % size:
            raise ValueError(f"train.batch {batch} must be a multiple of the number of ranks {size}")
        if str(train_cfg.schedule) not in SCHEDULES:
            raise ValueError(f"train.schedule must be one of {list(SCHEDULES)}, got {train_cfg.schedule!r}")
        self.local_batch = batch // size
        # ---- toolkit keys (absent on older config objects: today's training) ----
        self.accumulate = getattr(train_cfg, "accumulate", 1)
        if isinstance(self.accumulate, bool) or not isinstance(self.accumulate, int) or self.accumulate < 1:
            raise _setup_error("train.accumulate", self.accumulate, "an integer >= 1")
        self.gradient = str(getattr(train_cfg, "gradient", "reparam"))
        if self.gradient not in GRADIENTS:
            raise _setup_error("train.gradient", self.gradient, ", ".join(GRADIENTS))
        if self.gradient == "path":
            from hpcflow.flows.build import missing_inverse

            missing = missing_inverse(self.model)
            if missing is not None:
                raise _setup_error("train.gradient", "path",
                                   f"reparam for this architecture: {missing} has no inverse, which the "
                                   "path gradient needs to evaluate log q at the sample")
        try:
            self.beta_points = beta_schedule_points(getattr(train_cfg, "beta_schedule", None),
                                                    self.beta, steps)
        except BetaScheduleError as e:
            raise _setup_error(e.key, e.value, e.allowed) from None
        init_from = getattr(train_cfg, "init_from", None)
        self.init_from = None if init_from is None else str(init_from)
        self.init_record: dict[str, Any] | None = None
        self.diagnostics_every = int(getattr(train_cfg, "diagnostics_every", 0) or 0)
        if self.diagnostics_every < 0:
            raise _setup_error("train.diagnostics_every", self.diagnostics_every, "an integer >= 0")
        if self.diagnostics_every:
            arch = getattr(self.model, "arch", {})
            if arch.get("group") != "u1" or len(lat.global_shape) != 2:
                raise _setup_error("train.diagnostics_every", self.diagnostics_every,
                                   "0 for this model (the diagnostics are for 2D U(1) flows)")
            try:
                from hpcflow.flows.diagnostics import u1_diagnostics  # noqa: F401
            except ImportError as e:
                raise _setup_error("train.diagnostics_every", self.diagnostics_every,
                                   f"0 (off): hpcflow.flows.diagnostics cannot be imported ({e})") from None
        # ---- the action at a given beta ----
        if action_at is not None:
            self.action_at = action_at
        elif action is not None:
            if self.beta_points is not None:
                raise ValueError("train.beta_schedule needs the action at any beta: pass "
                                 "action_at=(x, beta) -> S instead of a fixed-beta action")
            fixed = action
            self.action_at = lambda x, b: fixed(x)
        else:
            self.action_at = lambda th, b: u1_action(th, lat, b)
        self.action = lambda x: self.action_at(x, self.beta)
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
        self.skipped_in_a_row = 0  # steps skipped for a non-finite loss or gradient (train_step)
        self.skipped_total = 0

    # ---- metadata and checkpoints ------------------------------------------------------
    @property
    def effective_batch(self) -> int:
        """Samples per optimizer step: ``accumulate x train.batch``."""
        return int(self.cfg.batch) * self.accumulate

    def beta_at(self, step: int) -> float:
        """The beta of the loss of step ``step`` (0-based), :func:`scheduled_beta`."""
        return scheduled_beta(self.beta_points, step, self.beta)

    def _meta(self) -> dict[str, Any]:
        arch = getattr(self.model, "arch", {})
        return {
            "group": arch.get("group"),
            "lattice": list(self.lat.global_shape),
            "beta": self.beta,  # the final beta: what the model is trained for and sampled at
            "arch": arch,
            "dtype": str(self.dtype),
            "batch": int(self.cfg.batch),
            "ranks": int(self.comm.size),
            "accumulate": self.accumulate,
            "gradient": self.gradient,
            "beta_schedule": None if self.beta_points is None else [list(p) for p in self.beta_points],
            "init_from": self.init_record,
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
                "skipped": [self.skipped_in_a_row, self.skipped_total],
                "model": self.model.state_dict(),
                "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(),
                "generators": gstate.view(self.comm.size, -1),
            },
            self.ckpt_path,
        )

    def _restore(self, ck: dict[str, Any]) -> None:
        """Model, optimizer, scheduler, step and the warm-start record of a checkpoint."""
        self.model.load_state_dict(ck["model"])
        self.skipped_in_a_row, self.skipped_total = (int(x) for x in ck.get("skipped", (0, 0)))
        self.opt.load_state_dict(ck["optimizer"])
        self.sched.load_state_dict(ck["scheduler"])
        self.step = int(ck["step"])
        self.init_record = ck["meta"].get("init_from")

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
        self._restore(ck)
        self.gen.set_state(ck["generators"][self.comm.rank].clone())

    def warm_start(self) -> dict[str, Any]:
        """``train.init_from``: load the weights of a flow checkpoint trained on another lattice
        size and/or beta (same group and architecture; :func:`transfer_problem`) into the model;
        the optimizer stays fresh. Returns (and keeps for the checkpoint meta) the record
        ``{path, sha256, lattice, beta, step}`` of the source."""
        from hpcflow.flows.build import transfer_problem

        key, path = "train.init_from", Path(str(self.init_from))
        what = "a flow checkpoint written by `hpcflow train` (train/checkpoint.pt)"
        if not path.is_file():
            raise _setup_error(key, str(path), f"{what}; no such file")
        data = path.read_bytes()
        try:
            ck = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
            raise _setup_error(key, str(path), f"{what}; it cannot be read ({type(e).__name__})") from None
        if not isinstance(ck, dict) or not isinstance(ck.get("meta"), dict) or "model" not in ck:
            raise _setup_error(key, str(path), f"{what}; it holds no model and meta")
        problem = transfer_problem(ck["meta"], getattr(self.model, "arch", {}))
        if problem is not None:
            raise _setup_error(key, str(path), f"a checkpoint of the same group and architecture whose "
                                               f"mask periods divide both lattices; {problem}")
        try:
            self.model.load_state_dict(ck["model"])
        except RuntimeError as e:
            first = str(e).strip().splitlines()[-1].strip()
            raise _setup_error(key, str(path), f"{what} of this architecture ({first})") from None
        meta = ck["meta"]
        self.init_record = {
            "path": os.path.abspath(path),
            "sha256": hashlib.sha256(data).hexdigest(),
            "lattice": meta.get("lattice"),
            "beta": meta.get("beta"),
            "step": ck.get("step"),
        }
        return self.init_record

    # ---- one optimisation step ---------------------------------------------------------
    def _draw(self, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, log q)`` of micro-batch ``micro`` of this step, this rank's share: the next
        ``local_batch`` draws of the rank's generator."""
        return self.model.sample(self.local_batch, self.gen)

    def _sum_gradients(self) -> None:
        """Sum the parameter gradients over the ranks (one flat buffer)."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.comm.size > 1:
            flat = self.comm.sum(torch.cat([p.grad.reshape(-1) for p in params]))
            i = 0
            for p in params:
                p.grad.copy_(flat[i : i + p.numel()].view_as(p))
                i += p.numel()

    def _global_field(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's samples on the whole lattice (the domain-decomposed trainer gathers)."""
        return x

    def _gradients(self, beta: float, keep_x: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Zero the gradients, then for each of the ``accumulate`` micro-batches draw, evaluate
        the loss share ``sum(log q + S) / (accumulate * batch)`` at ``beta`` and backpropagate
        (``reparam``: that loss; ``path``: the same with ``log q`` from :func:`path_log_prob`);
        sum the gradients over the ranks. Returns ``(loss share, S, log q, [x])``, detached;
        ``S``/``log q`` of all micro-batches in draw order, ``x`` only with ``keep_x``."""
        n_total = int(self.cfg.batch) * self.accumulate
        self.opt.zero_grad(set_to_none=False)
        local: torch.Tensor | None = None
        ss, qs, xs = [], [], []
        for m in range(self.accumulate):
            x, logq = self._draw(m)
            s = self.action_at(x, beta)
            loss = (logq + s).sum() / n_total
            if self.gradient == "path":
                (path_log_prob(self.model, x) + s).sum().div(n_total).backward()
            else:
                loss.backward()
            local = loss.detach() if local is None else local + loss.detach()
            ss.append(s.detach())
            qs.append(logq.detach())
            if keep_x:
                xs.append(x.detach())
        self._sum_gradients()
        assert local is not None
        return local, torch.cat(ss), torch.cat(qs), xs

    def _diagnostics(self, xs: list[torch.Tensor], s: torch.Tensor, logq: torch.Tensor,
                     beta: float) -> dict[str, Any]:
        """``hpcflow.flows.diagnostics.u1_diagnostics`` on the step's global batch (imported
        here: the module is optional until the option is used)."""
        from hpcflow.flows.diagnostics import u1_diagnostics

        x = torch.cat([self._global_field(x) for x in xs])
        phi = self._gather(x.reshape(-1)).reshape(-1, *x.shape[1:])
        out = u1_diagnostics(phi, self._gather(logq), self._gather(s), beta,
                             tuple(int(n) for n in self.lat.global_shape))
        return _jsonable(dict(out))

    def train_step(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        beta = self.beta_at(self.step)
        diag = self.diagnostics_every > 0 and (self.step + 1) % self.diagnostics_every == 0
        local, s, logq, xs = self._gradients(beta, keep_x=diag)
        params = [p for p in self.model.parameters() if p.grad is not None]
        clip = float(self.cfg.grad_clip)
        # the gradients are already summed over ranks: every rank sees the same norm and loss
        norm = float(torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else math.inf))
        loss = float(self.comm.sum(local.reshape(1))[0])
        lr = self.opt.param_groups[0]["lr"]
        skipped = not (math.isfinite(norm) and math.isfinite(loss))
        if skipped:
            # a non-finite loss or gradient (float32 at high beta: one extreme sample of the
            # batch) must not reach the weights: the optimizer step is skipped; the step count
            # and the learning-rate schedule advance, so a resume stays bit for bit
            self.opt.zero_grad(set_to_none=True)
            self.skipped_in_a_row += 1
            self.skipped_total += 1
        else:
            self.opt.step()
            self.skipped_in_a_row = 0
        self.sched.step()
        self.step += 1
        logw = self._gather(-(s + logq))
        row: dict[str, Any] = {
            "step": self.step,
            "loss": loss,
            "ess": ess(logw.detach().to(torch.float64).cpu(), strict=False),
            "acceptance": acceptance_estimate(logw),
            "lr": lr,
            "beta": beta,
            "batch": self.effective_batch,
            "time": time.perf_counter() - t0,
        }
        if skipped:
            row["skipped"] = True
        if self.step == 1 and self.init_record is not None:
            row["init_from"] = self.init_record
        if diag:
            row["diagnostics"] = self._diagnostics(xs, s, logq, beta)
        return row

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
        uninterrupted run. Without ``resume``, ``train.init_from`` (when set) loads the source
        weights first. ``stop``: an object with ``stop_requested`` (e.g.
        :class:`hpcflow.signals.StopFlag`); when set on any rank, every rank checkpoints after
        the current step and returns, with ``self.stopped`` True.
        """
        self.stopped = False
        rows: list[dict[str, Any]] = []
        if resume:
            self.load_checkpoint()
            rows = self._read_metrics(self.step)
        elif self.init_from is not None:
            self.warm_start()
        if self.comm.is_root:
            self.dir.mkdir(parents=True, exist_ok=True)
            with open(self.metrics_path, "w") as fh:
                fh.writelines(json.dumps(r) + "\n" for r in rows)
        steps = int(self.cfg.steps)
        end = steps if stop_at is None else min(steps, int(stop_at))
        bar = None
        if self.progress and self.comm.is_root:
            from hpcflow.progress import Progress

            bar = Progress(steps, "hpcflow train", initial=self.step)
        log_every, ck_every = int(self.cfg.log_every), int(self.cfg.checkpoint_every)
        try:
            while self.step < end:
                row = self.train_step()
                if self.skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
                    raise FloatingPointError(
                        f"training diverged: a non-finite loss or gradient in {self.skipped_in_a_row} steps in "
                        f"a row up to step {self.step} (each step was skipped; the weights are those of step "
                        f"{self.step - self.skipped_in_a_row}); lower train.lr or train with precision: float64")
                rows.append(row)
                if self.comm.is_root:
                    with open(self.metrics_path, "a") as fh:
                        fh.write(json.dumps(row) + "\n")
                    if bar is not None:
                        bar.update(1)
                        if self.step % log_every == 0:
                            post = {"loss": f"{row['loss']:.3f}", "ess": f"{row['ess']:.3f}",
                                    "acc": f"{row['acceptance']:.3f}"}
                            if self.beta_points is not None:
                                post["beta"] = f"{row['beta']:.4g}"
                            bar.set_postfix(**post)
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
            plot_metrics(rows, self.dir / "metrics.png", meta=self._meta())
        return rows
