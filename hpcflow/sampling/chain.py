"""The one Markov-chain loop of hpcflow, and where its configurations go (sinks).

:class:`Chain` drives any :class:`hpcflow.sampling.updates.Update`: Markov step
``s = 1 .. n_therm + n_steps``; after ``n_therm`` steps every ``measure_every``-th state is
*stored* (handed to the sink); a stop request (SIGTERM/SIGUSR1/SIGINT through
``hpcflow.signals.StopFlag``) is agreed on by every rank after each step, the sink commits
what it has and checkpoints, and the chain returns ``EXIT_RESUMABLE``. A checkpoint is
``{**update.state(), "step": s, **sink fields}``: the RNG is counter based, so ``s`` and the
update's state are the whole chain state and a resumed chain is the uninterrupted one.

Sinks (all with the same small protocol, :class:`Sink`):

* :class:`MemorySink`: rows in memory (library calls: ``flow_chain``, ``mixed_chain``);
* :class:`HistorySink`: ``hpcflow run``: measurements per stored state in
  ``history.jsonl`` and a chain checkpoint every ``checkpoint_every`` steps;
* ``hpcflow.run.sample.EnsembleSink``: ``hpcflow sample``: segment files with the
  two-phase commit protocol of the ensemble.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from hpcflow.exit_codes import EXIT_OK, EXIT_RESUMABLE
from hpcflow.lattice.geometry import Collective, Comm
from hpcflow.sampling.updates import StepInfo, Update

__all__ = ["Chain", "HistorySink", "MemorySink", "Sink"]


class Sink(Protocol):
    """Where a chain's stored states go; also owns the chain's checkpoint files.

    ``recover(resume)`` (collective) returns the checkpoint state to continue from, or None;
    ``store`` sees every stored state, then ``on_step`` every step; ``stop`` commits and
    checkpoints after a stop request; ``finish`` after the last step. ``snapshot(step)``
    (set by the chain) gives the checkpoint state at ``step``.
    """

    snapshot: Callable[[int], dict[str, Any]]

    def recover(self, resume: bool | None) -> dict[str, Any] | None: ...

    def on_step(self, step: int, info: StepInfo) -> None: ...

    def store(self, step: int, info: StepInfo, update: Update) -> None: ...

    def stop(self, step: int) -> None: ...

    def finish(self, step: int) -> None: ...

    def fields(self) -> dict[str, Any]: ...


class Chain:
    """``n_therm + n_steps`` steps of ``update``, states stored into ``sink``.

    ``control``: what the ranks agree with (``allgather_object``): the chain's group, or the
    world when several groups must stop together. ``stop``: an object with
    ``stop_requested`` (a ``StopFlag``), or None. ``progress``: a callable ``(step, info)``
    called after every step (progress bars, logs), or None.
    """

    def __init__(self, update: Update, sink: Sink, control: Collective, n_therm: int, n_steps: int,
                 measure_every: int = 1, stop: Any = None,
                 progress: Callable[[int, StepInfo], None] | None = None) -> None:
        if n_therm < 0 or n_steps < 0 or measure_every < 1:
            raise ValueError(f"need n_therm >= 0, n_steps >= 0, measure_every >= 1; got "
                             f"{n_therm}, {n_steps}, {measure_every}")
        self.update, self.sink, self.control = update, sink, control
        self.n_therm, self.n_steps, self.measure_every = int(n_therm), int(n_steps), int(measure_every)
        self.total = self.n_therm + self.n_steps
        self.stop, self.progress = stop, progress
        self.first_step = 0
        sink.snapshot = self.snapshot

    def stored(self, step: int) -> bool:
        k = step - self.n_therm
        return k > 0 and k % self.measure_every == 0

    @property
    def n_stored_total(self) -> int:
        return self.n_steps // self.measure_every

    def snapshot(self, step: int) -> dict[str, Any]:
        return {**self.update.state(), "step": step, **self.sink.fields()}

    def _stop_agreed(self) -> bool:
        mine = bool(self.stop is not None and self.stop.stop_requested)
        return any(self.control.allgather_object(mine))

    def run(self, resume: bool | None = None) -> int:
        """Run to the end or to a stop request: ``EXIT_OK`` or ``EXIT_RESUMABLE``."""
        st = self.sink.recover(resume)
        self.update.start(st)
        step = 0 if st is None else int(st["step"])
        self.first_step = step
        while step < self.total:
            step += 1
            info = self.update.advance(step)
            if self.stored(step):
                self.sink.store(step, info, self.update)
            self.sink.on_step(step, info)  # after store: a checkpoint here holds this step's row
            if self.progress is not None:
                self.progress(step, info)
            if self._stop_agreed() and step < self.total:
                self.sink.stop(step)
                return EXIT_RESUMABLE
        self.sink.finish(step)
        return EXIT_OK


class MemorySink:
    """Every stored state's row (``update.row()``), kind and acceptance, and every flow
    proposal's ``log_w``/``plaquette``/``Q``, in memory; no checkpoints (``state`` given to
    :meth:`recover` instead, for continuations)."""

    def __init__(self, state: dict[str, Any] | None = None) -> None:
        self._state = state
        self.rows: list[dict[str, float]] = []
        self.kinds: list[str] = []
        self.accepted: list[bool] = []
        self.proposals: list[dict[str, float]] = []
        self.snapshot: Callable[[int], dict[str, Any]] = lambda step: {}

    def recover(self, resume: bool | None) -> dict[str, Any] | None:
        return self._state

    def on_step(self, step: int, info: StepInfo) -> None:
        if info.proposal is not None:
            self.proposals.append(info.proposal)

    def store(self, step: int, info: StepInfo, update: Update) -> None:
        self.rows.append(update.row())
        self.kinds.append(info.kind)
        self.accepted.append(info.accepted)

    def stop(self, step: int) -> None:
        pass

    def finish(self, step: int) -> None:
        pass

    def fields(self) -> dict[str, Any]:
        return {}

    def arrays(self) -> dict[str, np.ndarray]:
        """Per stored state ``S, logq, logw, plaquette, Q, accepted, kind``; per proposal
        ``proposal_logw, proposal_plaquette, proposal_Q``."""
        out: dict[str, np.ndarray] = {}
        for key, name in (("S", "S"), ("log_q", "logq"), ("log_w", "logw"), ("plaquette", "plaquette"),
                          ("Q", "Q")):
            out[name] = np.asarray([r.get(key, math.nan) for r in self.rows], dtype=np.float64)
        out["accepted"] = np.asarray(self.accepted, dtype=bool)
        out["kind"] = np.asarray(self.kinds)
        for key in ("log_w", "plaquette", "Q"):
            out["proposal_" + key.replace("log_w", "logw")] = np.asarray(
                [p[key] for p in self.proposals], dtype=np.float64)
        return out


def _json_safe(v: Any) -> Any:
    """NaN and infinities as ``None`` (strict JSON), recursively through lists and dicts."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    return v


class HistorySink:
    """``hpcflow run``: a measurement record per stored state, in ``<out>/history.jsonl``.

    ``measure(links, index) -> dict`` gives the observables of stored state number ``index``
    (0-based; NaN becomes ``null`` in the history, vectors are lists; ``measure_seconds``: the
    time spent in it); the record is
    ``{"step", "kind", **measure, "accepted", **step extras (HMC: dH, exp_mdH), and for flow
    chains S, logq, logw}``. The chain checkpoint (``<out>/checkpoints/run.ckpt``, written
    atomically by the root rank with the *global* state, so a resume may use another process
    grid) holds the records so far and the flow proposals' data; it is written every
    ``checkpoint_every`` steps, after a stop request and at the end. The history always equals
    the checkpointed records plus what followed. ``log(msg)`` prints on the root rank.
    """

    def __init__(self, out: str, comm: Comm, measure: Callable[[Any, int], dict[str, Any]],
                 fingerprint: str, checkpoint_every: int, writer: bool | None = None,
                 flow: bool = False, log: Callable[[str], None] = print) -> None:
        self.out, self.comm, self.measure, self.fp = out, comm, measure, fingerprint
        self.K = int(checkpoint_every)
        self.writer = comm.is_root if writer is None else writer
        self.flow, self.log = flow, log
        self.records: list[dict[str, Any]] = []
        self.proposals: list[list[float]] = []
        self.ckpt_dir = os.path.join(out, "checkpoints")
        self.ckpt = os.path.join(self.ckpt_dir, "run.ckpt")
        self.snapshot: Callable[[int], dict[str, Any]] = lambda step: {}
        self._fh: Any = None
        self._last_ckpt = -1
        self.t0 = time.perf_counter()
        self.measure_seconds = 0.0

    def recover(self, resume: bool | None) -> dict[str, Any] | None:
        from hpcflow.io.checkpoint import load_checkpoint

        st = None
        if resume:
            if os.path.exists(self.ckpt):
                st = load_checkpoint(self.ckpt, fingerprint=self.fp)
                self.records = list(st.get("records", []))
                self.proposals = [list(p) for p in st.get("proposals", [])]
                self.log(f"hpcflow: resuming chain at step {int(st['step']) + 1} from {self.ckpt_dir}")
                self._last_ckpt = int(st["step"])
            else:
                self.log(f"hpcflow: --resume: no checkpoint in {self.ckpt_dir}; starting a fresh chain")
        if self.writer:  # the history always equals the checkpointed records plus what follows
            self._fh = open(os.path.join(self.out, "history.jsonl"), "w", encoding="utf-8")
            self._fh.writelines(json.dumps(r) + "\n" for r in self.records)
            self._fh.flush()
        self.t0 = time.perf_counter()
        return st

    def on_step(self, step: int, info: StepInfo) -> None:
        if info.proposal is not None:
            p = info.proposal
            self.proposals.append([p["log_w"], p["plaquette"], p["Q"]])
        if self.K and step % self.K == 0:
            self._checkpoint(step)

    def store(self, step: int, info: StepInfo, update: Update) -> None:
        t = time.perf_counter()
        m = self.measure(update.links(), len(self.records))  # index: stored configurations before it
        self.measure_seconds += time.perf_counter() - t
        rec: dict[str, Any] = {"step": step, "kind": info.kind, **_json_safe(m)}
        if info.kind != "heatbath" or self.flow:
            rec["accepted"] = float(info.accepted)
        rec.update(info.extra)
        if self.flow:
            row = update.row()
            rec.update(S=row["S"], logq=row["log_q"], logw=row["log_w"])
        self.records.append(rec)
        if self._fh is not None:
            self._fh.write(json.dumps(rec) + "\n")
            self._fh.flush()

    def _checkpoint(self, step: int) -> None:
        from hpcflow.io.checkpoint import save_checkpoint

        if step == self._last_ckpt:
            return
        state = self.snapshot(step)  # collective (gathers the global field)
        if self.writer:
            os.makedirs(self.ckpt_dir, exist_ok=True)
            save_checkpoint(self.ckpt, state, fingerprint=self.fp)
        self._last_ckpt = step
        self.comm.barrier()

    def stop(self, step: int) -> None:
        self._checkpoint(step)
        self.close()

    def finish(self, step: int) -> None:
        self._checkpoint(step)
        self.close()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    @property
    def last_checkpoint(self) -> int:
        """The step of the last checkpoint written (-1: none)."""
        return self._last_ckpt

    def fields(self) -> dict[str, Any]:
        return {"records": self.records if self.writer else [],
                "proposals": self.proposals if self.writer else []}
