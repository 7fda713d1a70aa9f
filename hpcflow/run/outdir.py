"""What ``run``, ``train`` and ``sample`` may do with their ``output.dir``.

:func:`output_dir` is the first thing each of these commands does, before anything in the
directory is read or written:

1. **One writer**: the root rank takes the directory's lock (:class:`hpcflow.io.lock.DirLock`,
   ``<output.dir>/.hpcflow.lock``) and every rank learns the outcome (:func:`agreed`), so no
   rank touches a file without it; a second process gets one line naming the holder (exit 2).
2. **No silent overwrite** (root, agreed): ``run`` and ``train`` refuse to start over results
   of an earlier run (:func:`blocking_results`) unless ``--resume`` (continue them) or
   ``--fresh``; ``train --resume`` needs a training checkpoint.
3. ``--fresh`` moves the earlier results (:func:`fresh_items`) into
   ``<output.dir>/previous-<UTC time>/`` (renames in the same file system) and starts over;
   what depends on a model (ensembles, chain checkpoints, the run's chain) moves with it.

The lock is held until the command ends. :func:`model_references` names what was sampled
with the current ``train/checkpoint.pt`` (training further would replace that model).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import sys
from collections.abc import Iterator
from typing import Any

from hpcflow.io.lock import DirLock, RunDirError, move_aside
from hpcflow.run.world import agreed, world_control

__all__ = ["MODEL", "RUN_FILES", "ResultsPresent", "blocking_results", "fresh_items",
           "model_references", "output_dir"]

MODEL = os.path.join("train", "checkpoint.pt")
RUN_FILES = ("history.jsonl", "summary.json", os.path.join("checkpoints", "run.ckpt"))
_FLOW = ("flow", "mixed")


class ResultsPresent(RunDirError):
    """``run``/``train`` without ``--resume`` in a directory that holds results."""


def _chain_checkpoints(out: str) -> list[str]:
    d = os.path.join(out, "checkpoints")
    try:
        names = sorted(os.listdir(d))
    except OSError:
        return []
    return [os.path.join("checkpoints", n) for n in names
            if n.startswith("chain") and (n.endswith(".ckpt") or n.endswith(".ckpt.next"))]


def _exists(out: str, names: tuple[str, ...] | list[str]) -> list[str]:
    return [n for n in names if os.path.lexists(os.path.join(out, n))]


def blocking_results(out: str, command: str, algorithm: str) -> list[str]:
    """What in ``out`` a fresh ``run``/``train`` would overwrite (relative paths)."""
    if command == "run":
        return _exists(out, list(RUN_FILES) + ([MODEL] if algorithm in _FLOW else []))
    if command == "train":
        return _exists(out, [MODEL])
    return []


def fresh_items(out: str, command: str, algorithm: str) -> list[str]:
    """What ``--fresh`` moves aside, dependants first (an ensemble before its model)."""
    sampled = ["ensemble"] + _chain_checkpoints(out)  # chains of `hpcflow sample`
    run = list(RUN_FILES) + ["config.yaml"]
    if command == "sample":
        items = sampled
    elif command == "run" and algorithm not in _FLOW:
        items = run + ["plots"]  # plots: drawn from the old history
    else:  # train, or run of a flow: a new model; everything sampled with the old one goes too
        items = sampled + run + ["train", "plots"]  # plots: of the old model's training and chains
    return _exists(out, items)


def model_references(out: str, algorithm: str) -> list[str]:
    """What in ``out`` was sampled with the current ``train/checkpoint.pt``: chain checkpoints
    that record its sha256 (an unreadable one counts), committed segments without any
    checkpoint, and the chain of ``hpcflow run`` (for flow/mixed configs)."""
    from hpcflow.io.checkpoint import CheckpointError, file_sha256, load_checkpoint

    model = os.path.join(out, MODEL)
    if not os.path.isfile(model):
        return []
    sha = file_sha256(model)
    refs = []
    ckpts = _chain_checkpoints(out)
    for name in ckpts:
        try:
            st = load_checkpoint(os.path.join(out, name))
        except CheckpointError:
            refs.append(name)
            continue
        if st.get("model_sha256", "") == sha:
            refs.append(name)
    ens = os.path.join(out, "ensemble")
    if not ckpts and os.path.isdir(ens):
        for d in sorted(os.listdir(ens)):
            p = os.path.join(ens, d)
            if d.startswith("chain") and os.path.isdir(p) and any(
                    n.startswith("seg") and n.endswith(".h5") for n in os.listdir(p)):
                refs.append(os.path.join("ensemble", d))
    if algorithm in _FLOW and os.path.exists(os.path.join(out, RUN_FILES[2])):
        refs.append(RUN_FILES[2])
    return refs


def _prepare(out: str, command: str, algorithm: str, resume: bool | None, fresh: bool) -> None:
    """Root rank, lock held: refuse, or move aside (``fresh``), before anything is written."""
    if fresh:
        dest, moved = move_aside(out, fresh_items(out, command, algorithm))
        if moved:
            shown = ", ".join(moved[:6]) + (f" and {len(moved) - 6} more" if len(moved) > 6 else "")
            print(f"hpcflow: --fresh: moved {shown} to {dest}", flush=True)
        return
    if command in ("run", "train") and not resume:
        present = blocking_results(out, command, algorithm)
        if present:
            raise ResultsPresent(
                f"{out}: holds the results of an earlier {command} ({', '.join(present)}); rerun with "
                f"--resume to continue from them, or with --fresh to move them aside (into "
                f"{os.path.join(out, 'previous-<time>')}) and start over")
    if command == "train" and resume and not os.path.isfile(os.path.join(out, MODEL)):
        raise RunDirError(f"{os.path.join(out, MODEL)}: no training checkpoint to resume; start the "
                          "training without --resume")


def _command_line() -> str:
    argv = list(sys.argv)
    if argv and os.path.basename(argv[0]) in ("hpcflow", "__main__.py"):
        argv[0] = "hpcflow"
    return shlex.join(argv)


@contextlib.contextmanager
def output_dir(cfg: Any, command: str, resume: bool | None = None, fresh: bool = False,
               use_mpi: bool | None = None) -> Iterator[Any]:
    """``with output_dir(cfg, "run"|"train"|"sample", resume, fresh) as ctl:`` the command's
    body, holding the lock of ``cfg.output.dir``; ``ctl``: the world control
    (:func:`hpcflow.run.world.world_control`). Collective under MPI. Raises (on every rank)
    :class:`hpcflow.io.lock.RunDirError` subclasses: locked, results present, nothing to resume.
    """
    if fresh and resume:
        raise ValueError("--fresh and --resume exclude each other")
    ctl = world_control(use_mpi)
    lock = DirLock(cfg.output.dir, command=_command_line())
    agreed(ctl, lock.acquire)
    try:
        agreed(ctl, _prepare, cfg.output.dir, command, cfg.algorithm, resume, fresh)
        yield ctl
        ctl.barrier()  # every rank is done with the directory before the lock goes
    finally:
        if ctl.is_root:
            lock.release()
