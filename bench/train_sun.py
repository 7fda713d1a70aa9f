"""Benchmark: the 4D SU(3) flow's training step and proposals, torch path vs host kernels.

Default mode (issue 21, "Speed"): the configuration of the issue (``lattice [L]^4``, su3,
``action.beta`` 1, ``flow.n_layers`` 8, ``flow.hidden [8]``, NCP with 2 components, kernel 3,
``train.batch`` 8, ``backend: host``, one thread), for each ``L`` (default 4 and 8):

* **step**: one ``Trainer.train_step`` of ``hpcflow train`` (prior draw, flow forward, Wilson
  action, backward, gradient clipping, fused Adam, schedule), in ms;
* **proposals/s**: ``--prop-batch`` proposals as ``hpcflow sample`` draws them
  (``FlowUpdate``: counter-based prior draws, the flow as a ``DistributedFlow`` on one rank,
  action, plaquette and clover charge), under ``torch.no_grad``;
* **GEMM fraction**: a flop count of the step (below) divided by the step time, as a fraction
  of the float64 GEMM rate (``torch.matmul`` 512 x 512, MKL) measured in the same run.

``before`` is the code before the host kernels of ``kernels/flow_sun.cpp`` (the layers' torch
path, torch Philox normals and QR Haar draws, the torch clover charge; the plaquette and the
action ran on the host kernels then too), ``after`` the host kernels; the two share the model and the inputs and are timed
alternately in one process (``--reps`` rounds), so both see the same machine load. Reported:
the median over rounds of CPU time per call (one thread: CPU time is the work done, also
when a busy machine deschedules the process) and wall time; the speed-up is the ratio of the
medians. ``--skip-before`` times only the host path.

Flop count (per step; multiply-add = 2 flops): the context CNN's convolutions where they are
evaluated (last one on the active sites, earlier ones on the sites the next reads; forward,
weight gradient and input gradient each ``2 n_out k^4 C_in C_out`` per batch entry, the first
layer without the input gradient), the plaquettes of the features (720 flops per frozen
plaquette forward, 2600 backward), the spectral map (4000 forward, 12000 backward per active
loop, a rough count of its matrix products, Cayley transform and Jacobi rotations) and the
action (plaquette and staple, 12,900 flops per site). The convolutions are > 85% of it.

``--scaling``: the earlier mode of this script (training step time and peak memory versus
volume, with and without activation checkpointing; each size in a fresh subprocess).

    python bench/train_sun.py [--L 4 8] [--reps 3] [--prop-batch 16] [--skip-before]
    python bench/train_sun.py --scaling [--L 4 6 8] [--batch 2] [--layers 4]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any


# ---- default mode: before/after -----------------------------------------------------------
@contextlib.contextmanager
def torch_path() -> Iterator[None]:
    """The code before the host kernels: the layers' torch path (``host_ready`` False), the
    torch Philox normals and QR Haar draws of ``lattice.groups`` (``_host_haar`` False) and the
    torch clover charge (``host_observables`` False)."""
    from hpcflow.flows.prior import HaarPriorSUN
    from hpcflow.flows.sun import SUNSpectralCoupling, SUNTheory

    saved = (SUNSpectralCoupling.host_ready, HaarPriorSUN._host_haar, SUNTheory.host_observables)
    SUNSpectralCoupling.host_ready = lambda self, U: False  # type: ignore[method-assign]
    HaarPriorSUN._host_haar = lambda self, device: False  # type: ignore[method-assign]
    SUNTheory.host_observables = lambda self, U: False  # type: ignore[method-assign]
    try:
        yield
    finally:
        (SUNSpectralCoupling.host_ready, HaarPriorSUN._host_haar,  # type: ignore[method-assign]
         SUNTheory.host_observables) = saved


def gemm_rate(n: int = 512, calls: int = 6) -> float:
    """float64 ``torch.matmul`` rate in flop/s (best of ``calls``)."""
    import torch

    a = torch.randn(n, n, dtype=torch.float64)
    b = torch.randn(n, n, dtype=torch.float64)
    a @ b
    best = math.inf
    for _ in range(calls):
        t = time.process_time()
        a @ b
        best = min(best, time.process_time() - t)
    return 2.0 * n**3 / max(best, 1e-9)


def step_flops(model: Any, batch: int) -> float:
    """Flop count of one training step (module docstring)."""
    total = 0.0
    lat = model.lat
    for i, layer in enumerate(model.layers):
        plan = layer._host_plan()
        k4 = plan.kernel_size**4
        for j, (cp, conv) in enumerate(zip(plan.convs, layer.net.convs, strict=True)):
            cout, cin = conv.weight.shape[:2]
            one = 2.0 * cp.sites.numel() * k4 * cin * cout * batch
            total += one * (2 if (i == 0 and j == 0) else 3)
        frozen = float(plan.frozen.sum())
        total += frozen * batch * (720 + (2600 if i > 0 else 0))
        total += plan.active.numel() * batch * (4000 + 12000)
    total += lat.volume * batch * 12900.0
    return total


def speed_one(ext: int, args: argparse.Namespace, out_dir: str) -> dict:
    """Before/after figures at ``L = ext`` (module docstring); one row."""
    import torch

    from hpcflow.flows.build import build_flow
    from hpcflow.flows.distributed import DistributedFlow
    from hpcflow.flows.train import Trainer
    from hpcflow.lattice.geometry import Lattice
    from hpcflow.rng import CounterRNG

    lat = Lattice((ext,) * 4, backend="host")
    cfg = SimpleNamespace(n_layers=args.layers, kernel="ncp", n_components=2, n_knots=8,
                          hidden=tuple(args.hidden), kernel_size=3, checkpoint_activations=False)
    torch.manual_seed(0)
    model = build_flow(cfg, lat, "su3", torch.float64)
    with torch.no_grad():  # a trained-looking flow: the zero-initialised last layer perturbed
        gen = torch.Generator().manual_seed(7)
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    # hpcflow train's Trainer (fused Adam, gradient clipping, cosine schedule) and the
    # sampler's proposals (hpcflow.sampling.updates.FlowUpdate: the model as a
    # DistributedFlow, counter-based prior draws, action and observables)
    train_cfg = SimpleNamespace(steps=10**6, batch=args.batch, lr=1e-4, schedule="cosine",
                                grad_clip=10.0, checkpoint_every=10**6, log_every=10**6)
    trainer = Trainer(model, lat, args.beta, train_cfg, out_dir, seed=1, dtype=torch.float64,
                      progress=False, action_at=lambda x, b: model.action(x, b))
    sampler = DistributedFlow(model)
    rng = CounterRNG(1)
    first = [0]

    def step() -> None:
        trainer.train_step()

    def proposals() -> None:
        with torch.no_grad():
            x, _ = sampler.sample_counter(rng, first[0], args.prop_batch)
            sampler.action(x, args.beta)
            sampler.observables(x)
        first[0] += args.prop_batch

    modes = ["after"] if args.skip_before else ["before", "after"]
    ctx: dict[str, Callable[[], contextlib.AbstractContextManager]] = {
        "before": torch_path, "after": contextlib.nullcontext}
    res: dict[str, dict[str, list[float]]] = {m: {"step": [], "step_wall": [], "prop": [],
                                                  "prop_wall": []} for m in modes}
    gemm = []
    for m in modes:  # warm-up: library build, allocator pools, plans
        with ctx[m]():
            step()
            proposals()
    for _ in range(args.reps):
        gemm.append(gemm_rate())
        for m in modes:
            with ctx[m]():
                for name, fn in (("step", step), ("prop", proposals)):
                    w, c = time.perf_counter(), time.process_time()
                    fn()
                    res[m][name].append(time.process_time() - c)
                    res[m][name + "_wall"].append(time.perf_counter() - w)
    rate = statistics.median(gemm)
    flops = step_flops(model, args.batch)
    row: dict[str, Any] = {"L": ext, "volume": lat.volume, "batch": args.batch,
                           "prop_batch": args.prop_batch, "gemm_gflops": rate / 1e9,
                           "step_gflop": flops / 1e9}
    for m in modes:
        st = statistics.median(res[m]["step"])
        pr = statistics.median(res[m]["prop"])
        row[m] = {"step_ms": 1e3 * st, "step_wall_ms": 1e3 * statistics.median(res[m]["step_wall"]),
                  "proposals_per_s": args.prop_batch / pr,
                  "proposals_per_s_wall": args.prop_batch / statistics.median(res[m]["prop_wall"]),
                  "gemm_fraction": flops / st / rate}
        print(f"L={ext} {m:6s}  step {row[m]['step_ms']:9.1f} ms (wall {row[m]['step_wall_ms']:9.1f})"
              f"  proposals/s {row[m]['proposals_per_s']:8.2f} (wall {row[m]['proposals_per_s_wall']:8.2f})"
              f"  {flops / 1e9:.2f} GFLOP/step = {row[m]['gemm_fraction']:.3f} of GEMM "
              f"({rate / 1e9:.1f} GFLOP/s)", flush=True)
    if "before" in row:
        row["speedup_step"] = row["before"]["step_ms"] / row["after"]["step_ms"]
        row["speedup_proposals"] = row["after"]["proposals_per_s"] / row["before"]["proposals_per_s"]
        print(f"L={ext} speed-up: step {row['speedup_step']:.1f}x, proposals "
              f"{row['speedup_proposals']:.1f}x", flush=True)
    return row


def speed(args: argparse.Namespace) -> None:
    import tempfile

    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="train_sun_") as tmp:
        rows = [speed_one(ext, args, tmp) for ext in args.L]
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"rows": rows, "args": vars(args)}, fh, indent=1)


# ---- --scaling: step time and peak memory vs volume --------------------------------------
def _one(args: argparse.Namespace) -> dict:
    import torch

    from hpcflow.flows.build import build_flow
    from hpcflow.lattice.action import wilson_action
    from hpcflow.lattice.geometry import Lattice

    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    ext = int(args.L[0])
    lat = Lattice((ext,) * 4)
    cfg = SimpleNamespace(n_layers=args.layers, kernel="ncp", n_components=2, n_knots=4,
                          hidden=tuple(args.hidden), kernel_size=args.kernel_size,
                          checkpoint_activations=bool(args.checkpoint))
    torch.manual_seed(0)
    model = build_flow(cfg, lat, "su3", torch.float64).to(dev)
    model.prior.sample(args.batch, torch.Generator().manual_seed(2))  # lazy init outside the peak
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(1)

    def step() -> None:
        z = model.prior.sample(args.batch, gen).to(dev)
        U, logq = model.push(z)
        loss = (logq + wilson_action(U, lat, args.beta)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    # peak memory of the first step in this fresh process (a warm-up step would already have
    # raised the RSS high-water mark); timings after it
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated(dev) - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / args.steps
    return {"L": ext, "volume": lat.volume, "checkpoint": bool(args.checkpoint), "batch": args.batch,
            "step_s": dt, "peak_bytes": int(peak), "device": str(dev)}


def _fit(v: list[float], y: list[float]) -> float:
    """Least-squares slope of log y against log V (y: seconds or bytes, all > 0)."""
    lx, ly = [math.log(a) for a in v], [math.log(b) for b in y]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    den = sum((a - mx) ** 2 for a in lx)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / den if den else float("nan")


def scaling(args: argparse.Namespace) -> None:
    rows = []
    for ck in (0, 1):
        for L in args.L:
            cmd = [sys.executable, __file__, "--scaling", "--one", "--L", str(L), "--checkpoint",
                   str(ck), "--batch", str(args.batch), "--layers", str(args.layers),
                   "--kernel-size", str(args.kernel_size), "--steps", str(args.steps), "--beta",
                   str(args.beta), "--threads", str(args.threads), "--device", args.device,
                   "--hidden", *map(str, args.hidden)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            row = json.loads(out.strip().splitlines()[-1])
            row["bytes_per_site_per_batch"] = row["peak_bytes"] / (row["volume"] * row["batch"])
            rows.append(row)
            print(f"L={L:2d} V={row['volume']:5d} checkpoint={bool(ck)!s:5}  step {row['step_s']:8.3f} s  "
                  f"peak {row['peak_bytes'] / 2**20:9.1f} MiB  "
                  f"{row['bytes_per_site_per_batch'] / 1024:8.1f} KiB/site/batch", flush=True)
    fits = {}
    for ck in (False, True):
        sel = [r for r in rows if r["checkpoint"] == ck]
        v = [r["volume"] for r in sel]
        fits[f"checkpoint={ck}"] = {"time_exponent": _fit(v, [r["step_s"] for r in sel]),
                                    "memory_exponent": _fit(v, [r["peak_bytes"] for r in sel])}
        print(f"checkpoint={ck}: time ~ V^{fits[f'checkpoint={ck}']['time_exponent']:.2f}, "
              f"peak memory ~ V^{fits[f'checkpoint={ck}']['memory_exponent']:.2f}")
    for L in args.L:
        a = [r for r in rows if r["L"] == L]
        if len(a) == 2:
            print(f"L={L}: checkpointing saves {1 - a[1]['peak_bytes'] / max(a[0]['peak_bytes'], 1):.0%} "
                  f"memory at {a[1]['step_s'] / a[0]['step_s']:.2f}x the step time")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"rows": rows, "fits": fits}, fh, indent=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scaling", action="store_true", help="step time and peak memory vs volume")
    ap.add_argument("--L", type=int, nargs="+", default=None)
    ap.add_argument("--batch", type=int, default=None, help="training batch (8; --scaling: 2)")
    ap.add_argument("--layers", type=int, default=None, help="coupling layers (8; --scaling: 4)")
    ap.add_argument("--hidden", type=int, nargs="*", default=[8])
    ap.add_argument("--beta", type=float, default=None, help="(1.0; --scaling: 5.0)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3, help="alternating rounds (default mode)")
    ap.add_argument("--prop-batch", type=int, default=16, help="proposals per call (default mode)")
    ap.add_argument("--skip-before", action="store_true", help="time the host path only")
    ap.add_argument("--kernel-size", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2, help="timed steps (--scaling)")
    ap.add_argument("--device", default="cpu", help="(--scaling)")
    ap.add_argument("--json", default=None, help="write the rows here")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--checkpoint", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.scaling:
        args.L = args.L or [4, 6, 8]
        args.batch = args.batch or 2
        args.layers = args.layers or 4
        args.beta = 5.0 if args.beta is None else args.beta
        if args.one:
            print(json.dumps(_one(args)))
            return
        scaling(args)
        return
    args.L = args.L or [4, 8]
    args.batch = args.batch or 8
    args.layers = args.layers or 8
    args.beta = 1.0 if args.beta is None else args.beta
    speed(args)


if __name__ == "__main__":
    main()
