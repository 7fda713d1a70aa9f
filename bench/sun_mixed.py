"""Mixed chains in 4D SU(3) (issue 21, item 4): flow proposals interleaved with HMC
trajectories, against HMC alone, at the beta of a trained ladder stage (``bench/sun_ladder.py``).

The trained flow of ``--stage`` (``<stage>/flow``: its ``train/checkpoint.pt`` and
``config.yaml``) is made a model directory (``<out>/model``, ``model.json`` with the weights'
sha256) and sampled through ``flow.model``; every chain is ``hpcflow run`` (resumable) on the
stage's lattice and beta:

* ``hmc``: ``algorithm: hmc`` (``--md-steps`` Omelyan steps, trajectory ``--tau``);
* ``mixed-<pattern>``: ``algorithm: mixed`` with ``mixed.pattern`` (default ``flow hmc``: one
  flow proposal, then one trajectory, as one cycle = one stored state).

Reported per chain: stored states, CPU seconds per state (the process's CPU time over the
chain, measurements included, from ``summary.json``'s wall time with one thread), acceptance
per step kind, tau_int of the plaquette and of E(t) at the final flow time (Gamma method, in
stored states), and the cost per independent measurement ``2 tau_int x seconds per state``;
the ratio is HMC's cost over the mixed chain's (> 1: the mixed chain is cheaper). The
plaquettes of all chains agree (shown with errors).

    OMP_NUM_THREADS=1 python bench/sun_mixed.py --stage runs/sun_ladder/b2 --out runs/sun_mixed_b2
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from sun_ladder import energy, gamma, history  # noqa: E402


def make_model(stage: Path, out: Path) -> Path:
    from hpcflow.models import write_model_json

    d = out / "model"
    if not (d / "model.json").exists():
        d.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(stage / "flow" / "train" / "checkpoint.pt", d / "checkpoint.pt")
        shutil.copyfile(stage / "flow" / "config.yaml", d / "config.yaml")
        cfg = yaml.safe_load((d / "config.yaml").read_text())
        write_model_json(d, f"sun-ladder-{stage.name}", cfg, {"source": str(stage)})
    return d


def chain_config(args: argparse.Namespace, stage_cfg: dict, algo: str, pattern: list[str] | None,
                 model: Path, out: Path) -> dict:
    cfg = {
        "lattice": stage_cfg["lattice"], "group": "su3", "action": {"beta": stage_cfg["action"]["beta"]},
        "algorithm": algo, "backend": "host", "precision": "float64", "seed": args.seed,
        "hmc": {"n_steps": args.md_steps, "tau": args.tau, "integrator": "omelyan"},
        "run": {"n_therm": args.therm, "n_steps": args.steps, "measure_every": 1, "progress": False,
                "plots": False, "start": "hot"},
        "measure": {"wilson_loops": [[1, 1]], "flow_time": args.flow_time, "flow_eps": 0.05,
                    "flow_every": args.flow_every},
        "output": {"dir": str(out)},
    }
    if algo == "mixed":
        cfg["flow"] = {"model": str(model)}
        cfg["mixed"] = {"pattern": list(pattern or [])}
        cfg["sample"] = {"n_therm": args.therm, "n_steps": args.steps, "batch": 64}
    return cfg


def run(cfg: dict, path: Path) -> None:
    out = Path(cfg["output"]["dir"])
    if (out / "summary.json").exists():
        return
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    cmd = [sys.executable, "-m", "hpcflow", "run", str(path)] + (["--resume"] if out.exists() else [])
    r = subprocess.run(cmd, cwd=ROOT, check=False, capture_output=True, text=True)
    (path.parent / (path.stem + ".log")).write_text(r.stdout + r.stderr)
    if r.returncode != 0:
        raise SystemExit(f"{path}: hpcflow run exited {r.returncode}: {r.stderr.strip()[-600:]}")


def report(args: argparse.Namespace, name: str, out: Path) -> dict:
    s = json.loads((out / "summary.json").read_text())
    rows = history(out)
    kinds: dict[str, list[float]] = {}
    for r in rows:
        if r.get("accepted") is not None:
            kinds.setdefault(str(r.get("kind")), []).append(float(r["accepted"]))
    P = gamma(np.array([r["plaquette"] for r in rows]))
    e = energy(rows, args.flow_time)
    E = gamma(e[np.isfinite(e)])
    if E.get("tau_int") is not None:  # E is measured every flow_every states: tau in states
        E = {**E, "tau_int": E["tau_int"] * args.flow_every, "tau_int_error": E["tau_int_error"] * args.flow_every}
    sps = float(s["seconds"]) / max(1, len(rows))
    return {"chain": name, "states": len(rows), "seconds_per_state": sps,
            "acceptance": {k: float(np.mean(v)) for k, v in kinds.items()},
            "plaquette": P, "E": E,
            "cost_P": 2 * P["tau_int"] * sps if P.get("tau_int") else None,
            "cost_E": 2 * E["tau_int"] * sps if E.get("tau_int") else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", type=Path, required=True, help="a bench/sun_ladder.py stage directory (b<beta>)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--patterns", nargs="+", default=["flow,hmc"], help="mixed.pattern values, comma-separated")
    ap.add_argument("--steps", type=int, default=4000, help="stored states per chain")
    ap.add_argument("--therm", type=int, default=100)
    ap.add_argument("--md-steps", type=int, default=10)
    ap.add_argument("--tau", type=float, default=1.0)
    ap.add_argument("--flow-time", type=float, default=1.0)
    ap.add_argument("--flow-every", type=int, default=20)
    ap.add_argument("--seed", type=int, default=5)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    stage_cfg = yaml.safe_load((args.stage / "flow" / "config.yaml").read_text())
    model = make_model(args.stage, args.out)
    chains = [("hmc", "hmc", None)] + [(f"mixed-{p.replace(',', '-')}", "mixed", p.split(","))
                                       for p in args.patterns]
    rows = []
    for name, algo, pattern in chains:
        out = args.out / name
        run(chain_config(args, stage_cfg, algo, pattern, model, out), args.out / f"{name}.yaml")
        rows.append(report(args, name, out))
        print(json.dumps(rows[-1]), flush=True)
    (args.out / "mixed.json").write_text(json.dumps(rows, indent=1) + "\n")
    base = rows[0]
    print(f"\n4D SU(3) {'x'.join(map(str, stage_cfg['lattice']['shape']))}, beta {stage_cfg['action']['beta']}; "
          f"HMC {args.md_steps} Omelyan steps, tau {args.tau}; {args.steps} states per chain\n")
    print("| chain | s/state | acceptance | plaquette | tau_int(P) | tau_int(E) | cost/indep. P (s) "
          "| cost/indep. E (s) | HMC/this (P) | HMC/this (E) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        def t(e: dict) -> str:
            return "-" if e.get("tau_int") is None else f"{e['tau_int']:.1f} +- {e['tau_int_error']:.1f}"

        def ratio(k: str, r: dict = r) -> str:
            return "-" if not (r[k] and base[k]) else f"{base[k] / r[k]:.2f}"
        acc = ", ".join(f"{k} {v:.3f}" for k, v in r["acceptance"].items())
        P = r["plaquette"]
        pl = "-" if P.get("mean") is None else f"{P['mean']:.5f} +- {P['error']:.5f}"
        cP = "-" if r["cost_P"] is None else f"{r['cost_P']:.3g}"
        cE = "-" if r["cost_E"] is None or not math.isfinite(r["cost_E"]) else f"{r['cost_E']:.3g}"
        print(f"| {r['chain']} | {r['seconds_per_state']:.4f} | {acc} | {pl} | {t(r['plaquette'])} | {t(r['E'])} | "
              f"{cP} | {cE} | {ratio('cost_P')} | {ratio('cost_E')} |")


if __name__ == "__main__":
    main()
