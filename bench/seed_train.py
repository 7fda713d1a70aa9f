"""Train the L = 16 flows of the seed experiment as a beta-transfer chain (issue 17).

Stage ``b1`` trains from scratch at beta 1; stage ``bK`` (K = 2..7) starts from stage
``b(K-1)``'s model (``train.init_from``), anneals beta linearly from K - 1 to K over the first
quarter of its steps (``train.beta_schedule``), then trains at beta K. Every stage is an
ordinary ``hpcflow train`` run in ``OUT/bK`` (config, metrics.jsonl with the exact-topology
diagnostics, checkpoint.pt), so it checkpoints every ``--checkpoint-every`` steps and this
script resumes where it stopped: run it again with the same arguments (a finished stage is
skipped, an unfinished one continues with ``--resume``).

    OMP_NUM_THREADS=1 python bench/seed_train.py --out runs/l16 --betas 1 2 3 4 5 6 7

The architecture is the seed's (Kanwar et al. 2020: 24 coupling layers, NCP mixtures of 6
components) with CNN hidden channels [16, 16]; float32, Adam, cosine learning rate per stage.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

#: training steps per stage (beta -> steps); later stages need more
STEPS = {1: 3000, 2: 3000, 3: 4000, 4: 5000, 5: 6000, 6: 8000, 7: 12000}


def stage_config(out: Path, beta: int, prev: Path | None, args: argparse.Namespace) -> dict:
    steps = int(args.steps_scale * STEPS.get(beta, 12000))
    train = {"steps": steps, "batch": args.batch, "lr": args.lr, "schedule": "cosine",
             "grad_clip": 10.0, "checkpoint_every": args.checkpoint_every,
             "diagnostics_every": args.diagnostics_every, "gradient": args.gradient}
    if prev is not None:
        train["init_from"] = str(prev / "train" / "checkpoint.pt")
        train["beta_schedule"] = [[0, float(beta - 1)], [max(1, steps // 4), float(beta)]]
    return {
        "backend": "host", "lattice": {"shape": [args.L, args.L]}, "group": "u1",
        "action": {"beta": float(beta)}, "algorithm": "flow",
        "precision": "float64" if beta >= args.float64_from else "float32",
        "seed": 1600 + beta,
        "flow": {"n_layers": 24, "kernel": "ncp", "n_components": 6, "hidden": [16, 16], "kernel_size": 3},
        "train": train, "run": {"measure_every": 1, "progress": False},
        "output": {"dir": str(out / f"b{beta}")},
    }


def finished(run: Path, steps: int) -> bool:
    m = run / "train" / "metrics.jsonl"
    if not (run / "train" / "checkpoint.pt").exists() or not m.exists():
        return False
    last = None
    for line in m.read_text().splitlines():
        try:
            last = json.loads(line)
        except json.JSONDecodeError:
            break
    return last is not None and int(last.get("step", 0)) >= steps


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--betas", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6, 7])
    ap.add_argument("--L", type=int, default=16)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--gradient", choices=("reparam", "path"), default="reparam")
    ap.add_argument("--steps-scale", type=float, default=1.0)
    ap.add_argument("--checkpoint-every", type=int, default=250)
    ap.add_argument("--diagnostics-every", type=int, default=100)
    ap.add_argument("--float64-from", type=int, default=99,
                    help="stages with beta >= this train in float64 (float32 training of the beta-6 "
                    "stage at L = 16 diverged: 394 of its steps 4056-5219 had a non-finite loss)")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    hpcflow = [sys.executable, "-m", "hpcflow"]
    prev: Path | None = None
    for beta in sorted(args.betas):
        cfg = stage_config(args.out, beta, prev, args)
        run = Path(cfg["output"]["dir"])
        path = args.out / f"b{beta}.yaml"
        steps = cfg["train"]["steps"]
        if finished(run, steps):
            print(f"stage beta {beta}: done ({steps} steps)", flush=True)
        else:
            path.write_text(yaml.safe_dump(cfg, sort_keys=False))
            resume = ["--resume"] if (run / "train" / "checkpoint.pt").exists() else []
            print(f"stage beta {beta}: {steps} steps{' (resuming)' if resume else ''}", flush=True)
            r = subprocess.run([*hpcflow, "train", str(path), *resume], cwd=ROOT, check=False,
                               env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
            if r.returncode != 0:
                print(f"stage beta {beta}: hpcflow train exited {r.returncode}", flush=True)
                return r.returncode
        prev = run
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
