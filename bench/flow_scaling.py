"""Domain-decomposed 4D SU(3) flow training step: weak scaling, halo fraction, memory per rank.

Run with two ranks (all ratios are measured in this one run):

    mpirun -n 2 .venv/bin/python bench/flow_scaling.py [--local 4 4 4 16] [--steps 3]

The halo-padded local array is (L + 2 halo) / L larger than the owned block along a split axis
(halo = CNN reach + 1), so memory halves only when L >> 2 halo; on tiny blocks it does not.

* weak scaling: one training step (sample, log q, action, backward, gradient sum) with the same
  local volume, first on rank 0 alone (global = local), then on both ranks (global = 2 x local,
  split along the last axis); efficiency = t(1 rank) / t(2 ranks);
* halo fraction: wall time inside the forward halo exchanges / step time (2 ranks);
* activation memory per rank for the same global lattice on 1 and 2 ranks: bytes of the tensors
  autograd saves for the backward pass (``saved_tensors_hooks``; on CUDA also the peak
  allocation). It must roughly halve.
Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from mpi4py import MPI

from hpcflow.comm import LatticeComm, ProcessGrid
from hpcflow.config import FlowConfig
from hpcflow.flows.build import build_flow
from hpcflow.flows.distributed import DistributedFlow, sum_gradients
from hpcflow.lattice.geometry import Lattice
from hpcflow.rng import CounterRNG


class TimedComm:
    """Forwards the comm protocol, timing the (forward) halo exchanges."""

    def __init__(self, lc: LatticeComm) -> None:
        self.lc, self.t_exchange = lc, 0.0
        self.rank, self.size, self.is_root = lc.rank, lc.size, lc.is_root

    def exchange(self, f, lat, inner=2, width=None):  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        out = self.lc.exchange(f, lat, inner=inner, width=width)
        self.t_exchange += time.perf_counter() - t0
        return out

    def sum(self, t):  # type: ignore[no-untyped-def]
        return self.lc.sum(t)

    def local_lattice(self, *a, **k):  # type: ignore[no-untyped-def]
        return self.lc.local_lattice(*a, **k)


def _step(model: DistributedFlow, comm, batch: int, step: int) -> dict[str, float]:  # type: ignore[no-untyped-def]
    saved = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[0] += t.numel() * t.element_size()
        return t

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        x, logq = model.sample_counter(CounterRNG(1, 2), step * batch, batch)
        loss = (logq + model.action(x, 5.0)).mean()
    model.zero_grad()
    loss.backward()
    sum_gradients(model.parameters(), comm.sum)
    out = {"time": time.perf_counter() - t0, "saved_bytes": float(saved[0])}
    if torch.cuda.is_available():
        out["peak_bytes"] = float(torch.cuda.max_memory_allocated())
    return out


def _measure(gs, grid, comm, cfg, batch, steps, device):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    flow = build_flow(cfg, Lattice(gs), "su3").to(device)
    lc = TimedComm(LatticeComm(ProcessGrid(gs, grid, comm=comm)))
    model = DistributedFlow(flow, lc)
    _step(model, lc, batch, 0)  # warm-up
    lc.t_exchange = 0.0
    rows = [_step(model, lc, batch, s + 1) for s in range(steps)]
    t = min(r["time"] for r in rows)
    return {"time": t, "halo_fraction": lc.t_exchange / sum(r["time"] for r in rows),
            "saved_bytes": rows[-1]["saved_bytes"], "peak_bytes": rows[-1].get("peak_bytes", 0.0),
            "local": list(model.lat.local_shape), "halo": model.lat.halo}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--local", type=int, nargs=4, default=[4, 4, 4, 16], help="local extents (split axis last; keep it >> 2 x halo)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=2)
    args = ap.parse_args()
    world = MPI.COMM_WORLD
    if world.Get_size() != 2:
        raise SystemExit("run with exactly 2 ranks: mpirun -n 2 python bench/flow_scaling.py")
    rank = world.Get_rank()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = FlowConfig(n_layers=2, hidden=(8,), kernel_size=3, kernel="spline", n_knots=4)
    loc = tuple(args.local)
    big = loc[:3] + (2 * loc[3],)
    solo = world.Split(0 if rank == 0 else MPI.UNDEFINED, key=rank)
    res: dict[str, dict] = {}
    if rank == 0:
        res["weak_1"] = _measure(loc, (1, 1, 1, 1), solo, cfg, args.batch, args.steps, device)
        res["strong_1"] = _measure(big, (1, 1, 1, 1), solo, cfg, args.batch, args.steps, device)
    world.Barrier()
    res["weak_2"] = _measure(big, (1, 1, 1, 2), world, cfg, args.batch, args.steps, device)
    if rank != 0:
        return
    eff = res["weak_1"]["time"] / res["weak_2"]["time"]
    mem = res["weak_2"]["saved_bytes"] / res["strong_1"]["saved_bytes"]
    print(f"4D SU(3) flow training step, {device}, local {list(loc)}, batch {args.batch}, "
          f"2 layers hidden (8,)")
    print(f"  1 rank  global {list(loc)}: {res['weak_1']['time'] * 1e3:8.1f} ms")
    print(f"  2 ranks global {list(big)}: {res['weak_2']['time'] * 1e3:8.1f} ms  "
          f"(halo {res['weak_2']['halo']}, exchange {100 * res['weak_2']['halo_fraction']:.1f}% of the step)")
    print(f"  weak-scaling efficiency 1 -> 2 ranks: {eff:.2f}")
    print(f"  activation memory, global {list(big)}: 1 rank {res['strong_1']['saved_bytes'] / 2**20:.1f} MiB, "
          f"2 ranks {res['weak_2']['saved_bytes'] / 2**20:.1f} MiB per rank (ratio {mem:.2f})")
    print(json.dumps({"bench": "flow_scaling", "device": device, "weak_efficiency": eff,
                      "halo_fraction": res["weak_2"]["halo_fraction"], "memory_ratio": mem, **res}))


if __name__ == "__main__":
    main()
