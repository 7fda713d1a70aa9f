"""The 4D SU(3) beta ladder (issue 21, item 3): flows on 4^4 trained up a ladder of betas,
each stage warm-started from the previous one with beta annealing, sampled as an exact
chain and compared with a heat-bath run at the same beta.

Per stage ``beta`` (directory ``<out>/b<beta>``):

* ``flow/``: ``hpcflow run`` with ``algorithm: flow`` (training, then the independence-Metropolis
  chain of ``--chain`` proposals); the first stage trains from the seeded weights, each later
  one from the previous stage's ``train/checkpoint.pt`` (``train.init_from``) with
  ``train.beta_schedule: {from: previous beta, steps: steps/4}``;
* ``hb/``: ``hpcflow run`` with ``algorithm: heatbath`` (one heat-bath + one overrelaxation
  sweep per step), ``--hb-steps`` steps after ``--hb-therm``.

Both measure the plaquette on every state and the Wilson flow (``measure.flow_time``
``--flow-time``, ``flow_eps`` 0.05) every ``--flow-every`` stored states. Every stage and run
resumes (``--resume`` of hpcflow), so the script can be stopped and restarted. The report
(``<out>/ladder.json`` and a Markdown table on stdout): training steps and CPU seconds,
flow acceptance, ESS per proposal (independent proposals), tau_int of the plaquette and of
E(t) = t^2E(t)/t^2 at the final flow time (Gamma method, in chain steps), the flow chain's and
the heat bath's plaquette with errors, and their difference in sigma.

    OMP_NUM_THREADS=1 python bench/sun_ladder.py --out runs/sun_ladder --betas 0.5 1 2 3 4

``--transfer-beta B`` (after the ladder has a stage at ``B``): the volume transfer to
``--transfer-L`` (8), decomposed on ``--ranks`` (2) MPI ranks (``grid [ranks, 1, 1, 1]``):
``<out>/b<B>/L<L>/flow`` is ``mpirun -n ranks hpcflow run`` with ``train.init_from`` the 4^4
stage's checkpoint (``--transfer-steps`` fine-tuning steps with batch ``--transfer-batch``, then
a chain of ``--transfer-chain`` proposals, both decomposed), ``<out>/b<B>/L<L>/hb`` a one-rank heat-bath
run at the same beta; the report row (``<out>/transfer.json``) is the ladder's for that pair,
plus the transferred model's loss and ESS before any fine-tuning (its first training row).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]


def flow_config(args: argparse.Namespace, beta: float, out: Path, prev: tuple[float, Path] | None) -> dict:
    train = {"steps": args.steps if prev is None else args.steps_next, "batch": args.batch, "lr": args.lr,
             "schedule": "cosine", "grad_clip": 10.0, "checkpoint_every": 100, "log_every": 100}
    if prev is not None:
        train["init_from"] = str(prev[1] / "flow" / "train" / "checkpoint.pt")
        train["beta_schedule"] = {"from": float(prev[0]), "steps": max(1, train["steps"] // 4)}
    return {
        "lattice": {"shape": [args.L] * 4}, "group": "su3", "action": {"beta": float(beta)},
        "algorithm": "flow", "backend": "host", "precision": "float64", "seed": args.seed,
        "flow": {"n_layers": args.layers, "kernel": "ncp", "n_components": args.components,
                 "hidden": list(args.hidden), "kernel_size": 3},
        "train": train,
        "sample": {"n_steps": args.chain, "batch": 256, "checkpoint_every": 1000},
        "run": {"measure_every": 1, "progress": False, "plots": False},
        "measure": {"wilson_loops": [[1, 1]], "flow_time": args.flow_time, "flow_eps": 0.05,
                    "flow_every": args.flow_every},
        "output": {"dir": str(out)},
    }


def hb_config(args: argparse.Namespace, beta: float, out: Path) -> dict:
    return {
        "lattice": {"shape": [args.L] * 4}, "group": "su3", "action": {"beta": float(beta)},
        "algorithm": "heatbath", "heatbath": {"n_overrelax": 1}, "backend": "host", "seed": args.seed,
        "run": {"n_therm": args.hb_therm, "n_steps": args.hb_steps, "measure_every": 1, "progress": False,
                "plots": False, "start": "hot"},
        "measure": {"wilson_loops": [[1, 1]], "flow_time": args.flow_time, "flow_eps": 0.05,
                    "flow_every": args.flow_every},
        "output": {"dir": str(out)},
    }


def hpcflow_run(cfg: dict, path: Path, ranks: int = 1, command: str = "run") -> None:
    """``hpcflow run`` (or ``train``; ``--resume`` when the directory holds an earlier,
    unfinished run); under ``mpirun -n ranks`` when ``ranks > 1``."""
    out = Path(cfg["output"]["dir"])
    metrics = out / "train" / "metrics.jsonl"
    if (out / "summary.json").exists() or (command == "train" and metrics.exists()
                                           and len(metrics.read_text().splitlines()) >= cfg["train"]["steps"]):
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    cmd = [sys.executable, "-m", "hpcflow", command, str(path)]
    if out.exists():
        cmd.append("--resume")
    env = None
    if ranks > 1:
        import os

        cmd = ["mpirun", "--oversubscribe", "-n", str(ranks), *cmd]
        env = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    r = subprocess.run(cmd, cwd=ROOT, check=False, capture_output=True, text=True, env=env)
    (path.parent / (path.stem + ".log")).write_text(r.stdout + r.stderr)
    if r.returncode != 0:
        raise SystemExit(f"{path}: hpcflow run exited {r.returncode}: {r.stderr.strip()[-600:]}")


def history(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "history.jsonl").read_text().splitlines() if x.strip()]


def gamma(x: np.ndarray) -> dict:
    from hpcflow.analysis import gamma_method

    x = np.asarray([v for v in x if v is not None and math.isfinite(v)], dtype=np.float64)
    if x.size < 4:
        return {"mean": None, "error": None, "tau_int": None, "tau_int_error": None, "n": int(x.size)}
    g = gamma_method(x)
    return {"mean": g.mean, "error": g.error, "tau_int": g.tau_int, "tau_int_error": g.tau_int_error,
            "n": int(x.size)}


def energy(rows: list[dict], t: float) -> np.ndarray:
    """E(t) at the final flow time of each flowed row: t^2 E(t) (clover) / t^2; NaN elsewhere."""
    out = []
    for r in rows:
        v = r.get("t2E_clov")
        out.append(v[-1] / (t * t) if isinstance(v, list) and v and v[-1] is not None else math.nan)
    return np.asarray(out, dtype=np.float64)


def transfer(args: argparse.Namespace, beta: float) -> dict | None:
    """The volume transfer of stage ``beta`` to ``--transfer-L``, decomposed on ``--ranks``."""
    src = args.out / f"b{beta:g}"
    d = src / f"L{args.transfer_L}"
    small = argparse.Namespace(**{**vars(args), "L": args.transfer_L, "steps": args.transfer_steps,
                                  "steps_next": args.transfer_steps, "chain": args.transfer_chain,
                                  "hb_steps": args.transfer_hb_steps, "batch": args.transfer_batch})
    cfg = flow_config(small, beta, d / "flow", None)
    cfg["train"]["init_from"] = str(src / "flow" / "train" / "checkpoint.pt")
    cfg["train"]["checkpoint_every"] = 20
    cfg["sample"]["batch"] = 16
    cfg["grid"] = [args.ranks, 1, 1, 1]  # fine-tuning and chain on the decomposed worker group
    hpcflow_run(cfg, d / "flow.yaml", ranks=args.ranks)
    hpcflow_run(hb_config(small, beta, d / "hb"), d / "hb.yaml")
    rep = stage_report(small, beta, d)
    first = json.loads((d / "flow" / "train" / "metrics.jsonl").read_text().splitlines()[0])
    rep.update(L=args.transfer_L, ranks=args.ranks, source=str(src / "flow"),
               transferred_loss=first.get("loss"), transferred_ess=first.get("ess"))
    return rep


def stage_report(args: argparse.Namespace, beta: float, d: Path) -> dict:
    fs = json.loads((d / "flow" / "summary.json").read_text())
    hs = json.loads((d / "hb" / "summary.json").read_text())
    metrics = [json.loads(x) for x in (d / "flow" / "train" / "metrics.jsonl").read_text().splitlines() if x]
    fr, hr = history(d / "flow"), history(d / "hb")
    fp, hp = gamma(np.array([r["plaquette"] for r in fr])), gamma(np.array([r["plaquette"] for r in hr]))
    fe, he = energy(fr, args.flow_time), energy(hr, args.flow_time)
    fE, hE = gamma(fe[np.isfinite(fe)]), gamma(he[np.isfinite(he)])
    dev = None
    if fp["error"] and hp["error"]:
        dev = (fp["mean"] - hp["mean"]) / math.hypot(fp["error"], hp["error"])
    return {
        "beta": beta, "train_steps": len(metrics), "train_cpu_s": sum(float(m.get("time", 0.0)) for m in metrics),
        "acceptance": fs.get("acceptance"), "ess_per_proposal": fs.get("ess_per_proposal"),
        "reweighted": fs.get("reweighted"), "chain_steps": len(fr),
        "flow_seconds_per_step": fs.get("seconds_per_update"),
        "flow_plaquette": fp, "flow_E": fE, "hb_plaquette": hp, "hb_E": hE,
        "hb_seconds_per_step": hs.get("seconds_per_update"), "plaquette_deviation_sigma": dev,
        "flow_every": args.flow_every,
    }


def fmt(e: dict) -> str:
    from hpcflow.analysis.ensemble import format_value

    return "-" if e.get("mean") is None else format_value(e["mean"], e["error"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--betas", type=float, nargs="+", default=[0.5, 1.0, 2.0, 3.0, 4.0])
    ap.add_argument("--L", type=int, default=4)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--components", type=int, default=4)
    ap.add_argument("--hidden", type=int, nargs="+", default=[16])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--steps", type=int, default=3000, help="training steps of the first stage")
    ap.add_argument("--steps-next", type=int, default=2000, help="training steps of each later stage")
    ap.add_argument("--chain", type=int, default=20000, help="flow proposals per chain")
    ap.add_argument("--hb-steps", type=int, default=20000)
    ap.add_argument("--hb-therm", type=int, default=200)
    ap.add_argument("--flow-time", type=float, default=1.0)
    ap.add_argument("--flow-every", type=int, default=20)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--transfer-beta", type=float, default=None, help="volume-transfer this stage (after the ladder)")
    ap.add_argument("--transfer-L", type=int, default=8)
    ap.add_argument("--transfer-steps", type=int, default=200)
    ap.add_argument("--transfer-chain", type=int, default=2000)
    ap.add_argument("--transfer-batch", type=int, default=4,
                    help="training batch at the transfer size")
    ap.add_argument("--transfer-hb-steps", type=int, default=4000)
    ap.add_argument("--ranks", type=int, default=2)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.transfer_beta is not None:
        rep = transfer(args, args.transfer_beta)
        print(json.dumps(rep), flush=True)
        (args.out / "transfer.json").write_text(json.dumps(rep, indent=1) + "\n")
        return
    rows, prev = [], None
    for beta in args.betas:
        d = args.out / f"b{beta:g}"
        if not args.report_only:
            hpcflow_run(flow_config(args, beta, d / "flow", prev), d / "flow.yaml")
            hpcflow_run(hb_config(args, beta, d / "hb"), d / "hb.yaml")
        if not ((d / "flow" / "summary.json").exists() and (d / "hb" / "summary.json").exists()):
            break
        rows.append(stage_report(args, beta, d))
        print(json.dumps(rows[-1]), flush=True)
        (args.out / "ladder.json").write_text(json.dumps(rows, indent=1) + "\n")
        prev = (beta, d)
    print(f"\n4D SU(3) {args.L}^4; flow {args.layers} layers, hidden {args.hidden}, NCP x {args.components}, "
          f"batch {args.batch}; E at t = {args.flow_time}, every {args.flow_every} states\n")
    print("| beta | train steps | train CPU s | acceptance (accepted) | ESS/proposal | tau_int(P) flow | "
          "tau_int(E) flow | tau_int(P) HB | tau_int(E) HB | plaquette flow | plaquette HB | dev |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        def tau(e: dict, every: int = 1) -> str:
            return "-" if e.get("tau_int") is None else f"{every * e['tau_int']:.1f} +- {every * e['tau_int_error']:.1f}"
        dev = r["plaquette_deviation_sigma"]
        n_acc = round(r["acceptance"] * r["chain_steps"])
        print(f"| {r['beta']:g} | {r['train_steps']} | {r['train_cpu_s']:.0f} | {r['acceptance']:.3g} ({n_acc}) | "
              f"{r['ess_per_proposal']:.3g} | {tau(r['flow_plaquette'])} | {tau(r['flow_E'], r['flow_every'])} | "
              f"{tau(r['hb_plaquette'])} | {tau(r['hb_E'], r['flow_every'])} | {fmt(r['flow_plaquette'])} | "
              f"{fmt(r['hb_plaquette'])} | {'-' if dev is None else f'{dev:+.1f}'} |")


if __name__ == "__main__":
    main()
