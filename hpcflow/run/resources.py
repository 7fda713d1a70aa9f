"""Bounds before work: an up-front memory estimate of a job against the memory it may use.

A 96^4 SU(3) lattice used to allocate for half a minute before failing. ``run``, ``train``
and ``sample`` call :func:`check_memory` first: it estimates the memory one rank needs for
the configured job (:func:`estimate_bytes`) and compares it with what this process may use
(:func:`memory_limit`): the cgroup limit of this process (v2 ``memory.max``, v1
``memory.limit_in_bytes``) or, without one, ``MemAvailable`` of ``/proc/meminfo``; divided
among the ranks of the job on this node (``OMPI_COMM_WORLD_LOCAL_SIZE``,
``MPI_LOCALNRANKS``, ``SLURM_NTASKS_PER_NODE``). A job that needs more is refused with one
line giving both numbers (a ``ConfigError``, exit 2) before anything is allocated or
written. ``HPCFLOW_MEMORY_CHECK=off`` skips the check (e.g. where swap or a different
accounting makes the limit meaningless).

The estimate counts only what the algorithm cannot do without (a lower bound of the real
peak, never a guess that refuses a job that would fit): link fields of the rank's local
volume with their halos, times the fields each update keeps alive (heat bath 4, HMC 6: links,
start links, momenta, force, staples, a temporary), the Wilson-flow measurement in 4D (4),
and for flows the batch: ``batch`` configurations plus the context network's hidden channels
and the plaquette angles per site and sample, of one layer when sampling and of every layer
in training (stored for the backward pass; one with ``flow.checkpoint_activations``).
Measured peaks (``tests/unit/test_resources.py`` checks the bound on real runs) are 1.5-2x
the estimate for U(1) flows and heat bath, and far above it for small SU(N) flows.
"""

from __future__ import annotations

import math
import os
from typing import Any

from hpcflow.config import Config, ConfigError

__all__ = ["MEMORY_CHECK_ENV", "check_memory", "estimate_bytes", "memory_limit"]

MEMORY_CHECK_ENV = "HPCFLOW_MEMORY_CHECK"
_FIELDS = {"heatbath": 4, "hmc": 6}
_GIB = float(1 << 30)


def _real_bytes(cfg: Config) -> int:
    return 8 if cfg.precision == "float64" else 4


def _local_volume(cfg: Config, ranks_per_chain: int) -> int:
    """Sites of one rank's local array, with a halo of the measured loops' reach on every side
    of each decomposed dimension (an even split of the lattice over ``ranks_per_chain``)."""
    shape = list(cfg.lattice.shape)
    if cfg.grid is not None:
        grid = list(cfg.grid)
    else:  # the factorisation is made at run time: split the longest extents first
        grid, left = [1] * len(shape), max(1, int(ranks_per_chain))
        for f in _prime_factors(left):
            d = max(range(len(shape)), key=lambda i: shape[i] // grid[i] if shape[i] % (grid[i] * f) == 0 else -1)
            if shape[d] % (grid[d] * f) == 0:
                grid[d] *= f
    halo = max([1] + [max(r, t) for r, t in cfg.measure.wilson_loops])
    return math.prod(n // p + (2 * halo if p > 1 else 0) for n, p in zip(shape, grid))


def _prime_factors(n: int) -> list[int]:
    out, f = [], 2
    while f * f <= n:
        while n % f == 0:
            out.append(f)
            n //= f
        f += 1
    if n > 1:
        out.append(n)
    return sorted(out, reverse=True)


def estimate_bytes(cfg: Config, command: str, ranks_per_chain: int = 1) -> tuple[int, str]:
    """``(bytes, how)``: the memory one rank needs at least for ``command`` (``run``, ``train``
    or ``sample``) of ``cfg`` with ``ranks_per_chain`` ranks sharing a lattice."""
    nd, nc = cfg.nd, cfg.n_colors
    sites = _local_volume(cfg, ranks_per_chain)
    field = nd * sites * nc * nc * 2 * _real_bytes(cfg)  # complex links
    parts: list[tuple[str, int]] = []
    algo = cfg.algorithm
    if algo not in _FIELDS:
        parts.append(("the chain's link field", field))
    if algo in _FIELDS:
        parts.append((f"{_FIELDS[algo]} link fields for {algo}", _FIELDS[algo] * field))
    else:
        steps = set(cfg.mixed.pattern) - {"flow"} if algo == "mixed" else set()
        for kind in sorted(steps):
            parts.append((f"{_FIELDS[kind]} link fields for {kind}", _FIELDS[kind] * field))
        fl = cfg.flow
        n_planes = nd * (nd - 1) // 2
        # what one coupling layer keeps per site and sample: its context network's hidden
        # channels and the plaquette angles (a lower bound: measured peaks are 1.6-1.8x this)
        per_site = sum(fl.hidden) + 2 * n_planes
        if command == "train" or (command == "run" and cfg.flow.model is None):
            batch = cfg.train.batch // max(1, cfg.train.replicas)
            layers = 1 if fl.checkpoint_activations else fl.n_layers
            parts.append((f"training batch {batch}: {batch} configurations and the activations of {layers} "
                          "layers for the backward pass",
                          batch * (field + layers * per_site * sites * _real_bytes(cfg))))
        if command in ("run", "sample"):
            batch = cfg.sample.batch
            parts.append((f"sampling batch {batch}: {batch} proposals and one layer's activations",
                          batch * (field + per_site * sites * _real_bytes(cfg))))
    if nd == 4 and cfg.measure.flow_time > 0:
        parts.append(("4 link fields for the Wilson-flow measurement", 4 * field))
    total = sum(b for _, b in parts)
    how = f"one link field {field / _GIB:.3g} GiB ({'x'.join(map(str, cfg.lattice.shape))}"
    how += f" over {ranks_per_chain} ranks" if ranks_per_chain > 1 else ""
    how += f", {cfg.group}, {cfg.precision})" + "".join(f"; {name} {b / _GIB:.3g} GiB" for name, b in parts)
    return total, how


def _read_int(path: str) -> int | None:
    try:
        with open(path, encoding="ascii") as fh:
            text = fh.read().strip()
    except OSError:
        return None
    if not text.isdigit():
        return None  # "max": no limit
    v = int(text)
    return v if v < (1 << 60) else None


def _cgroup_limit(proc_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> int | None:
    """This process's cgroup memory limit (v2 or v1), the smallest along its path, or None."""
    limits: list[int] = []
    try:
        with open(proc_cgroup, encoding="ascii") as fh:
            lines = fh.read().splitlines()
    except OSError:
        lines = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":  # v2: memory.max in every ancestor
            base = os.path.join(root, path.lstrip("/"))
            while True:
                v = _read_int(os.path.join(base, "memory.max"))
                if v is not None:
                    limits.append(v)
                if os.path.normpath(base) == os.path.normpath(root):
                    break
                base = os.path.dirname(base)
        elif "memory" in controllers.split(","):
            for base in (os.path.join(root, "memory", path.lstrip("/")), os.path.join(root, "memory")):
                v = _read_int(os.path.join(base, "memory.limit_in_bytes"))
                if v is not None:
                    limits.append(v)
    return min(limits) if limits else None


def _mem_available(meminfo: str = "/proc/meminfo") -> int | None:
    try:
        with open(meminfo, encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _ranks_on_node() -> int:
    for var in ("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "SLURM_NTASKS_PER_NODE"):
        v = os.environ.get(var, "").split("(")[0].split(",")[0]
        if v.isdigit() and int(v) > 0:
            return int(v)
    return 1


def memory_limit() -> tuple[int | None, str]:
    """``(bytes, source)`` one rank of this job may use, or ``(None, why)`` when unknown."""
    cg = _cgroup_limit()
    avail = _mem_available()
    if cg is not None and (avail is None or cg <= avail):
        total, src = cg, "the cgroup memory limit"
    elif avail is not None:
        total, src = avail, "MemAvailable"
    else:
        return None, "unknown"
    n = _ranks_on_node()
    return total // n, src + (f" shared by {n} ranks on this node" if n > 1 else "")


def check_memory(cfg: Config, command: str, ranks_per_chain: int = 1) -> None:
    """Refuse (one-line :class:`ConfigError`) a job whose estimate exceeds :func:`memory_limit`."""
    if os.environ.get(MEMORY_CHECK_ENV, "").lower() in ("off", "0", "false", "no"):
        return
    need, how = estimate_bytes(cfg, command, ranks_per_chain)
    limit, src = memory_limit()
    if limit is None or need <= limit:
        return
    raise ConfigError(f"{cfg.source}: the configured {command} needs at least {need / _GIB:.3g} GiB per rank, "
                      f"more than the {limit / _GIB:.3g} GiB it may use ({src}): {how}. Use more ranks "
                      f"(grid), a smaller lattice or batch, or set {MEMORY_CHECK_ENV}=off to try anyway")


def describe(cfg: Config, command: str, ranks_per_chain: int = 1) -> dict[str, Any]:
    """The estimate and the limit, for ``hpcflow info`` and logs."""
    need, how = estimate_bytes(cfg, command, ranks_per_chain)
    limit, src = memory_limit()
    return {"estimate_bytes": need, "estimate": how, "limit_bytes": limit, "limit_source": src}
