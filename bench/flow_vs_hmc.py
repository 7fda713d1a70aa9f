"""Benchmark: the seed experiment of Kanwar et al. 2020 (arXiv 2003.06413) at a size 2 cores can
run. 2D U(1) at several beta: flow + independence Metropolis vs HMC vs heat bath, measured in
one run: tau_int of Q (Gamma method), cost per step, cost per independent Q sample
(= cost per step x 2 tau_int). Prints a table, writes JSON and a PNG plot.

Target: at the largest beta, the flow is >= 100x cheaper than HMC per independent Q sample.
Flow training time is reported separately (it is paid once per ensemble). ``--init-from``
starts the training from an earlier flow's checkpoint (beta annealing: train at beta 6,
continue at 7); the earlier training's time is then not included.

A tau_int estimate is honest only for chains much longer than tau: where ``n < 50 tau_int``
the estimate is flagged and printed as a lower bound (``>=``), and so is every ratio built on it.
``--clock cpu`` times in process CPU seconds (with ``--threads 1``: the wall time on an idle
core), for shared machines. ``--backend`` (config ``backend:``) applies to every algorithm:
``host`` (default) runs the flow's context CNN and NCP kernels and HMC's plaquette/staple as
the C++ host kernels, ``torch`` the pure-torch paths.

    python bench/flow_vs_hmc.py --L 8 --betas 2 3 4 --train-steps 1000 --n 4000 --n-local 20000 \
        --threads 1 --clock cpu --out bench_out/flow_vs_hmc

The largest beta measured (bench/RESULTS.md): beta 7 at 8x8 with a flow trained at beta 6
(direct training at beta 7 is unstable and seed-dependent), one process per core:

    A="--L 8 --layers 24 --hidden 16 16 --batch 128 --hmc-steps 10 --hmc-tau 1.0 --threads 1 --clock cpu"
    python bench/flow_vs_hmc.py $A --betas 6 --train-steps 4000 --lr 5e-4 --n 40000 \
        --n-local 80000 --therm 500 --baselines hmc --out b6
    python bench/flow_vs_hmc.py $A --betas 7 --train-steps 0 --init-from b6/flow_b6.0/train/checkpoint.pt \
        --n 160000 --n-local 400000 --therm 2000 --baselines hmc --seed 4 --out b7
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from hpcflow.analysis.gamma import gamma_method
from hpcflow.flows import build_u1_flow, links_from_angles
from hpcflow.flows.train import Trainer
from hpcflow.lattice.geometry import Lattice
from hpcflow.lattice.groups import get_group
from hpcflow.lattice.observables import topological_charge_u1_2d
from hpcflow.rng import CounterRNG
from hpcflow.sampling.flow_chains import metropolis_chain
from hpcflow.sampling.heatbath import heatbath_sweep
from hpcflow.sampling.hmc import HMC


@dataclass(frozen=True)
class TrainCfg:
    steps: int
    batch: int = 64
    lr: float = 1e-3
    schedule: str = "cosine"
    grad_clip: float = 10.0
    checkpoint_every: int = 10**9
    log_every: int = 50


MIN_CHAIN_OVER_TAU = 50


def _tau(q: np.ndarray) -> dict:
    """tau_int of Q by the Gamma method; a lower bound where the chain is < 50 tau long."""
    g = gamma_method(q)
    tau = float(g.tau_int)
    return {"tau_Q": tau, "tau_Q_err": float(g.tau_int_error), "n": len(q),
            "tau_lower_bound": bool(len(q) < MIN_CHAIN_OVER_TAU * tau)}


def run_flow(lat, beta, args, out: Path) -> dict:
    arch = SimpleNamespace(n_layers=args.layers, kernel="ncp", n_components=args.components,
                           n_knots=8, hidden=tuple(args.hidden), kernel_size=3)
    torch.manual_seed(10 * args.seed)
    model = build_u1_flow(arch, lat, torch.float32)
    if args.init_from is not None:
        _init_from(model, arch, lat, args.init_from)
    t0 = args.clock()
    Trainer(model, lat, beta, TrainCfg(args.train_steps, batch=args.batch, lr=args.lr), out / f"flow_b{beta}", seed=10 * args.seed + 1,
            dtype=torch.float32, progress=False).train()
    t_train = args.clock() - t0
    model = model.double().eval()  # sample in float64: the chain's exactness bookkeeping
    t0 = args.clock()
    res = metropolis_chain(model, lat, beta, args.n, 500, CounterRNG(10 * args.seed + 2))
    t = (args.clock() - t0) / args.n
    return {"cost_s": t, **_tau(np.asarray(res["Q"])), "acceptance": float(res["accepted"].mean()),
            "train_s": t_train}


def _init_from(model, arch, lat, path: Path) -> None:
    """Start training from the weights of a flow trained before (e.g. at a lower beta)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        meta, state = ckpt["meta"], ckpt["model"]
    except (OSError, KeyError, TypeError, RuntimeError) as e:
        raise SystemExit(f"--init-from {path}: not a training checkpoint ({e})") from None
    want = {"lattice": list(lat.shape), "n_layers": arch.n_layers, "kernel": arch.kernel,
            "n_components": arch.n_components, "hidden": list(arch.hidden),
            "kernel_size": arch.kernel_size}
    got = {k: meta.get("arch", {}).get(k) for k in want}
    got["lattice"] = meta.get("lattice")
    got["hidden"] = list(got["hidden"] or [])
    bad = {k: (got[k], v) for k, v in want.items() if got[k] != v}
    if bad:
        raise SystemExit(f"--init-from {path}: architecture differs from this run's "
                         + ", ".join(f"{k} {g} != {w}" for k, (g, w) in bad.items()))
    model.load_state_dict(state)
    print(f"flow initialised from {path} (trained at beta {meta.get('beta')}, "
          f"{ckpt.get('step')} steps; that training time is not counted here)")


def run_local(lat, beta, args, kind: str) -> dict:
    group = get_group("u1")
    rng = CounterRNG(10 * args.seed + 3)
    theta = 2 * np.pi * torch.rand((2, *lat.shape), generator=torch.Generator().manual_seed(10 * args.seed + 4),
                                   dtype=torch.float64)
    U = links_from_angles(theta)
    hmc = HMC(lat, group, beta, args.hmc_steps, args.hmc_tau, "leapfrog", rng=rng)

    def step(U: torch.Tensor, i: int) -> torch.Tensor:
        if kind == "hmc":
            return hmc.trajectory(U, i)[0]
        return heatbath_sweep(U, lat, group, beta, rng, i)

    for i in range(args.therm):
        U = step(U, i)
    n = args.n_local
    q = np.empty(n)
    t0 = args.clock()
    for i in range(n):
        U = step(U, args.therm + i)
        q[i] = float(topological_charge_u1_2d(U, lat))
    t = (args.clock() - t0) / n
    out = {"cost_s": t, **_tau(q)}
    if kind == "hmc":
        out["acceptance"] = hmc.acceptance
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--L", type=int, default=8)
    ap.add_argument("--betas", type=float, nargs="+", default=[1.0, 2.0, 3.0, 4.0])
    ap.add_argument("--n", type=int, default=4000, help="flow chain length (proposals)")
    ap.add_argument("--n-local", type=int, default=None,
                    help="HMC / heat-bath chain length (default: --n); long enough for 50 tau")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    ap.add_argument("--therm", type=int, default=200)
    ap.add_argument("--train-steps", type=int, default=500)
    ap.add_argument("--batch", type=int, default=64, help="flow training batch")
    ap.add_argument("--lr", type=float, default=1e-3, help="flow training learning rate (cosine-annealed)")
    ap.add_argument("--baselines", nargs="+", choices=["hmc", "heatbath"], default=["hmc", "heatbath"],
                    help="which baselines to run (the ratios need hmc)")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--components", type=int, default=6)
    ap.add_argument("--hidden", type=int, nargs="*", default=[8, 8])
    ap.add_argument("--hmc-steps", type=int, default=5)
    ap.add_argument("--hmc-tau", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--backend", choices=["host", "torch"], default="host",
                    help="kernels for every algorithm: host (C++) or torch")
    ap.add_argument("--seed", type=int, default=0,
                    help="offset of every seed (flow init, training, chains): independent repeats")
    ap.add_argument("--init-from", type=Path, default=None,
                    help="start flow training from this checkpoint.pt (same architecture; e.g. a "
                         "flow trained at a lower beta: beta annealing)")
    ap.add_argument("--out", type=Path, default=Path("bench_out/flow_vs_hmc"))
    args = ap.parse_args()
    args.n_local = args.n if args.n_local is None else args.n_local
    args.clock = time.perf_counter if args.clock == "wall" else time.process_time
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    lat = Lattice((args.L, args.L), backend=args.backend)
    rows = []
    for beta in args.betas:
        algos = (("flow", lambda b: run_flow(lat, b, args, args.out)),
                 ("hmc", lambda b: run_local(lat, b, args, "hmc")),
                 ("heatbath", lambda b: run_local(lat, b, args, "heatbath")))
        for name, fn in algos:
            if name != "flow" and name not in args.baselines:
                continue
            r = fn(beta)
            r.update(algorithm=name, beta=beta, cost_per_indep_s=r["cost_s"] * 2 * r["tau_Q"])
            rows.append(r)
            ge = ">=" if r["tau_lower_bound"] else "  "
            print(f"beta {beta:4.1f} {name:9s} cost/step {r['cost_s'] * 1e3:8.3f} ms  "
                  f"tau_int(Q) {ge}{r['tau_Q']:8.2f} +/- {r['tau_Q_err']:.2f} (n {r['n']})  "
                  f"cost/indep {ge}{r['cost_per_indep_s'] * 1e3:9.2f} ms"
                  + (f"  acc {r['acceptance']:.3f}" if "acceptance" in r else ""), flush=True)
    bmax = max(args.betas)
    at = {r["algorithm"]: r for r in rows if r["beta"] == bmax}
    c = {k: r["cost_per_indep_s"] for k, r in at.items()}
    base = [k for k in ("hmc", "heatbath") if k in c]
    ratio = {f"{k}_over_flow": c[k] / c["flow"] for k in base}
    # a lower-bounded baseline tau makes the ratio a lower bound, a lower-bounded flow tau an
    # upper bound; with both bounded the ratio is not determined by these chains
    def _kind(k: str) -> str:
        flow_b, base_b = at["flow"]["tau_lower_bound"], at[k]["tau_lower_bound"]
        if flow_b and base_b:
            return "undetermined: both chains shorter than 50 tau_int"
        return "upper bound" if flow_b else "lower bound" if base_b else "estimate"

    for k in base:
        ratio[f"{k}_over_flow_kind"] = _kind(k)
    label = {"hmc": "HMC", "heatbath": "heat bath"}
    print(f"\nbeta = {bmax}: " + "; ".join(
        f"{label[k]} / flow cost per independent Q sample = {ratio[f'{k}_over_flow']:.1f} "
        f"({ratio[f'{k}_over_flow_kind']}" + ("; target >= 100)" if k == "hmc" else ")")
        for k in base))
    (args.out / "results.json").write_text(json.dumps({"rows": rows, "ratio": ratio,
                                                       "args": vars(args)}, default=str, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name in ("flow", "hmc", "heatbath"):
        rr = [r for r in rows if r["algorithm"] == name]
        if not rr:
            continue
        b = [r["beta"] for r in rr]
        axes[0].errorbar(b, [r["tau_Q"] for r in rr], [r["tau_Q_err"] for r in rr], label=name,
                         marker="o", capsize=3)
        axes[1].plot(b, [r["cost_per_indep_s"] * 1e3 for r in rr], marker="o", label=name)
    axes[0].set(yscale="log", xlabel="beta", ylabel="tau_int(Q)")
    axes[1].set(yscale="log", xlabel="beta", ylabel="ms per independent Q sample")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(f"2D U(1), L = {args.L}")
    fig.tight_layout()
    fig.savefig(args.out / "flow_vs_hmc.png", dpi=100)
    print(f"wrote {args.out / 'results.json'} and {args.out / 'flow_vs_hmc.png'}")


if __name__ == "__main__":
    main()
