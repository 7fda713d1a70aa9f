"""Benchmark: ``log q`` of given 4D SU(3) configurations (the flow's inverse walk), the torch
path vs the host inverse of ``kernels/flow_sun.cpp``.

What a mixed chain pays after every HMC trajectory: ``FlowUpdate._current_logw``
(``hpcflow.sampling.updates``) calls ``model.log_prob(x[None])`` under ``torch.no_grad``, the
model the flow or a ``DistributedFlow`` (one rank here). Here: the same call on flow samples
(their ``log q`` from the forward is the check), ``L^4``, ``--layers`` layers, ``--hidden``
channels, NCP with ``--components`` components, kernel 3, float64, one thread, for each
``--batch``; the parameters of the initialised flow perturbed by ``--scale`` (a flow far from
the identity).

Modes, timed alternately in one process (``--reps`` rounds, so all see the same machine load):

* ``before``: the code before the host inverse: the layers' torch path (torch plaquettes,
  features and Conv4d, ``su3_spectral(inverse=True)``) with the NCP inverse as it was
  (12 bisection and 30 Newton steps, the kernel's ``s`` and ``log w`` recomputed at each of
  the 42 evaluations; :func:`old_ncp_inverse`);
* ``torch``: the torch path now (Newton stops at the rounding level, constants once): what
  runs when gradients are needed or off the host backend;
* ``host``: :meth:`SUNSpectralCoupling.fused_inverse_walk` (``sun_flow_inverse``).

Reported per configuration (the call's time divided by the batch): the median over rounds of
CPU time (one thread: the work done, also when a busy machine deschedules the process) and of
wall time; ``fwd`` is the host forward (``model(z)``) of the same batch for comparison;
``|dlogq|`` the largest difference between ``log_prob`` and the forward's ``log q``.

    python bench/sun_inverse.py [--L 4] [--layers 16] [--hidden 16] [--components 4]
                                [--batch 1 16] [--reps 5] [--scale 0.02] [--skip-before]
                                [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import time
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any


def old_ncp_inverse(self: Any, y: Any, p: Any) -> tuple[Any, Any]:
    """``IntervalNCPKernel.inverse`` before the host inverse (the reference of ``before``)."""
    import torch

    from hpcflow.flows.kernels1d import ncp_half_angle, newton_step

    k = self.n_components

    def f(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.s_max * torch.tanh(p[..., :k] / self.s_max)
        logw = torch.log_softmax(p[..., k:], dim=-1)
        a, logj = ncp_half_angle(0.5 * math.pi * x.unsqueeze(-1), s)
        return (logw.exp() * ((2.0 / math.pi) * a)).sum(-1), torch.logsumexp(logw + logj, -1)

    with torch.no_grad():
        lo, hi = torch.zeros_like(y), torch.ones_like(y)
        for _ in range(12):
            mid = 0.5 * (lo + hi)
            below = f(mid)[0] < y
            lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
        x = 0.5 * (lo + hi)
        for _ in range(30):
            ym, logj = f(x)
            below = ym < y
            lo, hi = torch.where(below, x, lo), torch.where(below, hi, x)
            xn = x - (ym - y) * torch.exp(-logj)
            x = torch.where((xn > lo) & (xn < hi), xn, 0.5 * (lo + hi))
    x = newton_step(f, x, y).clamp(0.0, 1.0)
    return x, f(x)[1]


@contextlib.contextmanager
def torch_inverse(old_kernel: bool) -> Iterator[None]:
    """The layers' torch inverse (``host_inverse_ready`` False); with ``old_kernel`` the NCP
    inverse before this change too."""
    from hpcflow.flows.kernels1d import IntervalNCPKernel
    from hpcflow.flows.sun import SUNSpectralCoupling

    saved = (SUNSpectralCoupling.host_inverse_ready, IntervalNCPKernel.inverse)
    SUNSpectralCoupling.host_inverse_ready = lambda self, U: False  # type: ignore[method-assign]
    if old_kernel:
        IntervalNCPKernel.inverse = old_ncp_inverse  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        SUNSpectralCoupling.host_inverse_ready, IntervalNCPKernel.inverse = saved  # type: ignore[method-assign]


def time_batch(model: Any, batch: int, modes: list[str], reps: int) -> dict[str, Any]:
    """One row of the table: ``modes`` and the host forward (``fwd``) on ``batch`` flow
    samples, alternately, ``reps`` rounds after a warm-up (library build, plans, pools)."""
    import torch

    from hpcflow.flows.distributed import DistributedFlow

    chain_model = DistributedFlow(model)  # what a chain of hpcflow sample holds on one rank
    ctx: dict[str, Callable[[], contextlib.AbstractContextManager]] = {
        "before": lambda: torch_inverse(True), "torch": lambda: torch_inverse(False),
        "host": contextlib.nullcontext, "fwd": contextlib.nullcontext}
    with torch.no_grad():
        x, logq = model.sample(batch, torch.Generator().manual_seed(batch))
        z, _ = model.inverse(x)
    names = [*modes, "fwd"]
    times: dict[str, list[float]] = {m: [] for m in names}
    walls: dict[str, list[float]] = {m: [] for m in names}
    row: dict[str, Any] = {"batch": batch, "log_q": float(logq.mean())}
    for rep in range(reps + 1):
        for m in names:
            with torch.no_grad(), ctx[m]():
                w, c = time.perf_counter(), time.process_time()
                out = chain_model(z)[0] if m == "fwd" else chain_model.log_prob(x)
                cpu, wall = time.process_time() - c, time.perf_counter() - w
            if rep == 0:  # warm-up
                if m != "fwd":
                    row[m] = {"dlogq": float((out - logq).abs().max())}
                continue
            times[m].append(cpu / batch)
            walls[m].append(wall / batch)
    for m in names:
        row.setdefault(m, {}).update(cpu_ms=1e3 * statistics.median(times[m]),
                                     wall_ms=1e3 * statistics.median(walls[m]))
    return row


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    import torch

    from hpcflow.flows.build import build_flow
    from hpcflow.lattice.geometry import Lattice

    torch.set_num_threads(1)
    lat = Lattice((args.L,) * 4, backend="host")
    cfg = SimpleNamespace(n_layers=args.layers, kernel="ncp", n_components=args.components,
                          n_knots=8, hidden=tuple(args.hidden), kernel_size=3,
                          checkpoint_activations=False)
    torch.manual_seed(0)
    model = build_flow(cfg, lat, "su3", torch.float64)
    with torch.no_grad():  # a trained-looking flow: every parameter perturbed by --scale
        gen = torch.Generator().manual_seed(7)
        for p in model.parameters():
            p.add_(args.scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    modes = ["torch", "host"] if args.skip_before else ["before", "torch", "host"]
    return [{"L": args.L, **time_batch(model, batch, modes, args.reps)} for batch in args.batch]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--L", type=int, default=4)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, nargs="+", default=[16])
    ap.add_argument("--components", type=int, default=4)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--scale", type=float, default=0.02,
                    help="perturbation of the parameters (0.02: log q ~ 280 on 4^4; 0.05 gives a "
                         "map too contracting to invert in float64, log q ~ 7000)")
    ap.add_argument("--skip-before", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = run(args)
    modes = [m for m in ("before", "torch", "host", "fwd") if m in rows[0]]
    print(f"log q per configuration, {args.L}^4, {args.layers} layers, hidden {args.hidden}, "
          f"{args.components} NCP components, float64, 1 thread; ms CPU (wall)")
    print(f"{'batch':>5} " + " ".join(f"{m:>20}" for m in modes) + "   before/host  torch/host"
          + "  |dlogq| host")
    for r in rows:
        cells = " ".join(f"{r[m]['cpu_ms']:10.2f} ({r[m]['wall_ms']:7.2f})" for m in modes)
        ratio = (f"{r['before']['cpu_ms'] / r['host']['cpu_ms']:12.1f}x" if "before" in r
                 else f"{'-':>13}")
        print(f"{r['batch']:>5} {cells} {ratio} {r['torch']['cpu_ms'] / r['host']['cpu_ms']:10.1f}x"
              f"  {r['host']['dlogq']:.1e}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"rows": rows, "args": vars(args)}, fh, indent=1)


if __name__ == "__main__":
    main()
