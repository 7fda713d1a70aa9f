"""Rank-aware logging: rank 0 logs at info, the other ranks at warning (ARCHITECTURE.md).

Optional per-rank log files (``<log_dir>/rank<r>.log``) record every rank at the full
level, which is what one wants when a single rank misbehaves on a production machine.
"""

from __future__ import annotations

import logging
import os

__all__ = ["rank_logger"]

_TAG = "_hpcflow_rank_handler"


def rank_logger(
    rank: int,
    name: str = "hpcflow",
    level: int = logging.INFO,
    log_dir: str | os.PathLike | None = None,
) -> logging.Logger:
    """Configure and return the logger ``name`` for this ``rank``.

    Console (stderr): ``level`` on rank 0, ``max(level, WARNING)`` elsewhere; messages carry
    ``[rank r]``. With ``log_dir``, each rank also writes ``rank<r>.log`` at ``level``.
    Calling it again replaces the handlers it added before (idempotent).
    """
    if not isinstance(rank, int) or rank < 0:
        raise ValueError(f"rank must be an int >= 0, got {rank!r}")
    logger = logging.getLogger(name)
    for h in list(logger.handlers):
        if getattr(h, _TAG, False):
            logger.removeHandler(h)
            h.close()
    fmt = logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s")
    console = logging.StreamHandler()
    console.setLevel(level if rank == 0 else max(level, logging.WARNING))
    console.setFormatter(fmt)
    setattr(console, _TAG, True)
    logger.addHandler(console)
    if log_dir is not None:
        os.makedirs(log_dir, exist_ok=True)
        fh = logging.FileHandler(os.path.join(os.fspath(log_dir), f"rank{rank}.log"))
        fh.setLevel(level)
        fh.setFormatter(fmt)
        setattr(fh, _TAG, True)
        logger.addHandler(fh)
    logger.setLevel(level)
    logger.propagate = False
    return logger
