"""Benchmark: SU(3) 4D flow training step time and peak memory versus lattice volume.

For each extent ``L`` (default 4, 6, 8) and with/without activation checkpointing, one
reverse-KL training step (prior draw, flow forward, Wilson action, backward, Adam step) at a
fixed batch is timed, and the step's peak memory is measured: ``torch.cuda.max_memory_allocated``
on a GPU, else the growth of the process's peak RSS during the steps (each configuration runs in
a fresh subprocess so peaks do not leak between them). Printed: a table, the scaling exponent
``a`` of ``time ~ V^a`` and ``memory ~ V^a`` (least squares in log-log), and the peak bytes per
site per batch element. Ratios are measured in one run on one machine.

    python bench/train_sun.py [--L 4 6 8] [--batch 2] [--layers 4] [--device cpu] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from types import SimpleNamespace


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--L", type=int, nargs="+", default=[4, 6, 8])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, nargs="*", default=[8])
    ap.add_argument("--kernel-size", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--beta", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None, help="write the rows and fits here")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--checkpoint", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(_one(args)))
        return
    rows = []
    for ck in (0, 1):
        for L in args.L:
            cmd = [sys.executable, __file__, "--one", "--L", str(L), "--checkpoint", str(ck),
                   "--batch", str(args.batch), "--layers", str(args.layers), "--kernel-size",
                   str(args.kernel_size), "--steps", str(args.steps), "--beta", str(args.beta),
                   "--threads", str(args.threads), "--device", args.device, "--hidden",
                   *map(str, args.hidden)]
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


if __name__ == "__main__":
    main()
