"""Flow chains of the seed experiment beyond the seed (issue 17, item 4): 2D U(1) at L = 32
with flows obtained by volume transfer from the shipped L = 16 models, sampled by a
domain-decomposed worker group (``mpirun -n --ranks``, ``grid [ranks, 1]``), written in the
chain layout of ``bench/topo_chains.py`` so that ``bench/topo_analyse.py`` analyses them with
the L = 32 baselines.

Per beta (directory ``<work>/b<beta>``):

1. ``train/``: ``hpcflow train`` at L = ``--L`` with ``train.init_from`` the shipped model
   ``u1-L16-b<beta>`` (its architecture and precision), ``--steps`` (>= 1) fine-tuning steps
   with the batch ``--batch``;
2. ``model/``: that checkpoint as a model directory (``model.json`` with its sha256);
3. ``chainNN/``: ``mpirun -n ranks hpcflow sample`` with ``flow.model`` the model directory,
   ``grid [ranks, 1]``, seed ``--seed + NN``, ``sample.n_steps --n-steps`` (after
   ``--therm``), every state stored with its geometric Q, plaquette, accept flag and log w;
4. ``<out>/flow-mpi<ranks>_L<L>_b<beta>/chainNN/``: the ensemble's rows converted to the
   ``topo_chains`` layout (``q``, ``plaq``, ``acc``, ``logw``; ``meta.json`` with the CPU
   seconds per step = the ranks' CPU time (``RUSAGE_CHILDREN`` around ``mpirun``) / steps,
   start-up and the end-of-run plots included, and the training budget).

    OMP_NUM_THREADS=1 python bench/topo_mpi_flow.py --betas 4 5 --work runs/l32_flow \\
        --out runs/topo_L32 --steps 300 --n-steps 20000
    python bench/topo_analyse.py runs/topo_L32 --json bench/results/seed_L32.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]


def cpu_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run(cmd: list[str], log: Path, env: dict | None = None) -> float:
    """Run ``cmd``; returns the CPU seconds of its process tree."""
    c0 = cpu_children()
    r = subprocess.run(cmd, cwd=ROOT, check=False, capture_output=True, text=True, env=env)
    log.write_text(r.stdout + r.stderr)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {r.returncode}: {r.stderr.strip()[-600:]}")
    return cpu_children() - c0


def train(args: argparse.Namespace, beta: float, d: Path) -> Path:
    from hpcflow.models import resolve_model, write_model_json

    src = resolve_model(f"u1-L16-b{beta:g}")
    model = d / "model"
    if (model / "model.json").exists():
        return model
    cfg = yaml.safe_load((src.path / "config.yaml").read_text())
    cfg["lattice"] = {"shape": [args.L, args.L]}
    tr = cfg["train"]
    tr.update(steps=args.steps, batch=args.batch, init_from=str(src.checkpoint), beta_schedule=None,
              checkpoint_every=50, diagnostics_every=0)
    cfg["output"] = {"dir": str(d / "train")}
    cfg["run"] = {**cfg.get("run", {}), "progress": False, "plots": False}
    d.mkdir(parents=True, exist_ok=True)
    path = d / "train.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    cmd = [sys.executable, "-m", "hpcflow", "train", str(path)]
    if (d / "train").exists():
        cmd.append("--resume")
    t0 = time.time()
    cpu = run(cmd, d / "train.log")
    model.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(d / "train" / "train" / "checkpoint.pt", model / "checkpoint.pt")
    shutil.copyfile(d / "train" / "config.yaml", model / "config.yaml")
    write_model_json(model, f"u1-L{args.L}-b{beta:g}-transfer", yaml.safe_load((model / "config.yaml").read_text()),
                     {"source": src.name, "fine_tuning_steps": args.steps, "training_cpu_s": cpu,
                      "training_wall_s": time.time() - t0, "training_steps": args.steps})
    return model


def chain(args: argparse.Namespace, beta: float, d: Path, model: Path, i: int) -> None:
    from hpcflow.analysis.ensemble import load_series

    name = f"flow-mpi{args.ranks}_L{args.L}_b{beta:g}"
    dest = args.out / name / f"chain{i:02d}"
    if (dest / "state.npz").exists():
        return
    out = d / f"chain{i:02d}"
    cfg = {"flow": {"model": str(model)}, "action": {"beta": float(beta)}, "seed": args.seed + i,
           "grid": [args.ranks, 1], "backend": "host",
           "sample": {"n_steps": args.n_steps, "n_therm": args.therm, "batch": args.prop_batch,
                      "checkpoint_every": 2000},
           "run": {"measure_every": 1, "progress": False, "plots": False},
           "measure": {"wilson_loops": [[1, 1]]}, "output": {"dir": str(out)}}
    path = d / f"chain{i:02d}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    env = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    cmd = ["mpirun", "--oversubscribe", "-n", str(args.ranks), sys.executable, "-m", "hpcflow", "sample", str(path)]
    t0 = time.time()
    cpu = run(cmd, d / f"chain{i:02d}.log", env)
    wall = time.time() - t0
    ser = load_series(out / "ensemble")
    c = ser.chains[0]
    q = np.rint(ser.raw["Q"][c]).astype(np.int16)
    plaq = ser.raw["plaquette"][c]
    acc = ser.raw["acceptance"][c].astype(bool) if "acceptance" in ser.raw else np.ones(q.size, bool)
    logw = ser.raw["log_w"][c] if "log_w" in ser.raw else np.full(q.size, np.nan)
    n = int(q.size)
    dest.mkdir(parents=True, exist_ok=True)
    np.savez(dest / "chunk_0000000000.npz", q=q, plaq=plaq, acc=acc, logw=logw)
    meta_model = json.loads((model / "model.json").read_text())
    state = {"state": {"chunks": [[0, n]], "n_done": n},
             "config": {"algo": f"flow-mpi{args.ranks}", "L": args.L, "beta": float(beta)}}
    np.savez(dest / "state.npz", state_json=np.asarray(json.dumps(state)))
    meta = {"format": "hpcflow-topo-flow-chain/1 (from an hpcflow sample ensemble)", "algo": f"flow-mpi{args.ranks}",
            "beta": float(beta), "L": args.L, "seed": args.seed + i, "chain": i, "n_therm": args.therm,
            "n_steps_done": n, "complete": True, "ranks": args.ranks, "grid": [args.ranks, 1],
            "ensemble": str(out / "ensemble"), "cpu_s_per_step": cpu / n, "wall_s_per_step": wall / n,
            "cpu_note": "CPU of all ranks and of mpirun, start-up and thermalisation included",
            "model": str(model), "model_sha256": meta_model.get("sha256"), "source_model": meta_model.get("source"),
            "training_steps": meta_model.get("fine_tuning_steps"),
            "training_wall_s": meta_model.get("training_wall_s")}
    (dest / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--betas", type=float, nargs="+", default=[4.0, 5.0])
    ap.add_argument("--L", type=int, default=32)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True, help="topo_chains layout root (beside the baselines)")
    ap.add_argument("--steps", type=int, default=300, help="fine-tuning steps at L (>= 1)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--chains", type=int, default=4)
    ap.add_argument("--n-steps", type=int, default=20000)
    ap.add_argument("--therm", type=int, default=100)
    ap.add_argument("--prop-batch", type=int, default=64)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--seed", type=int, default=100)
    args = ap.parse_args()
    for beta in args.betas:
        d = args.work / f"b{beta:g}"
        model = train(args, beta, d)
        for i in range(args.chains):
            chain(args, beta, d, model, i)
            print(f"beta {beta:g} chain {i} done", flush=True)


if __name__ == "__main__":
    main()
