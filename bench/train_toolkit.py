"""What the training toolkit buys (issue 17): paired `hpcflow train` runs of 2D U(1) flows,
each evaluated on one large batch of fresh proposals against the exact theory.

Comparisons (one process, runs in sequence on one core; each row is one training run):

* ``anneal``: at ``--beta-high``, direct training vs ``train.beta_schedule`` from
  ``--beta-low`` over the first half, same number of steps and seed.
* ``transfer``: at L = 2 ``--L`` and ``--beta-mid``, training from scratch vs ``train.init_from``
  a flow trained at L = ``--L`` (its training cost reported separately), same fine-tuning steps;
  also the transferred model before any fine-tuning (step 0).
* ``gradient``: at ``--beta-mid``, ``train.gradient: reparam`` vs ``path`` at equal CPU time
  (the path run gets the reparam run's training seconds: it costs more per step).
* ``accumulate``: ``batch B, accumulate 4`` vs ``batch 4B``, same steps: the same estimator
  (equal updates on equal samples, tested); what differs is the peak memory, reported.

Evaluation of a trained model (``evaluate``): ``--eval-batch`` proposals in batches, then
``hpcflow.flows.diagnostics.u1_diagnostics`` on all of them: KL gap to the exact -log Z (nats;
0 for a perfect flow), ESS per proposal, the acceptance estimate of the independence
Metropolis chain, and the total-variation distance of the proposals' charge histogram from
the exact sector weights (``q_tv``: mode coverage). Training seconds are the trainer's per-step wall times.

    OMP_NUM_THREADS=1 python bench/train_toolkit.py --out runs/toolkit --steps 1500
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def base_config(out: Path, L: int, beta: float, steps: int, args: argparse.Namespace, **train) -> dict:
    return {
        "backend": "host", "lattice": {"shape": [L, L]}, "group": "u1", "action": {"beta": float(beta)},
        "algorithm": "flow", "precision": "float32", "seed": args.seed,
        "flow": {"n_layers": args.layers, "kernel": "ncp", "n_components": args.components,
                 "hidden": list(args.hidden), "kernel_size": 3},
        "train": {"steps": int(steps), "batch": args.batch, "lr": args.lr, "schedule": "cosine",
                  "grad_clip": 10.0, "checkpoint_every": 10**6, **train},
        "run": {"measure_every": 1, "progress": False},
        "output": {"dir": str(out)},
    }


def train(cfg: dict, name: str, root: Path) -> dict:
    """Run ``hpcflow train`` on ``cfg`` (skipped when its checkpoint is there); CPU seconds and
    the child's peak RSS."""
    out = Path(cfg["output"]["dir"])
    done = out / "train" / "checkpoint.pt"
    if not done.exists():
        root.mkdir(parents=True, exist_ok=True)
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        t0 = time.time()
        # /usr/bin/time -f %M: this child's own peak RSS in KiB (RUSAGE_CHILDREN would be the
        # maximum over every child so far)
        r = subprocess.run(["/usr/bin/time", "-f", "maxrss_kib %M", sys.executable, "-m", "hpcflow", "train",
                            str(path)], cwd=ROOT, check=False, capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"{name}: hpcflow train exited {r.returncode}: {r.stderr.strip()[-400:]}")
        (out / "bench_wall_s.txt").write_text(f"{time.time() - t0}\n")
        rss = [ln.split()[1] for ln in r.stderr.splitlines() if ln.startswith("maxrss_kib ")]
        (out / "bench_maxrss_kib.txt").write_text(f"{rss[-1] if rss else 0}\n")
    rows = [json.loads(x) for x in (out / "train" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    cpu = sum(float(r.get("time", 0.0)) for r in rows)
    rss = (out / "bench_maxrss_kib.txt")
    return {"train_s": cpu, "steps": len(rows), "maxrss_mib": int(rss.read_text()) / 1024 if rss.exists() else None}


def evaluate(run_dir: Path, n: int, batch: int = 256) -> dict:
    """KL gap, ESS, acceptance estimate and charge coverage of ``n`` fresh proposals."""
    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    from topo_flow import load_model

    from hpcflow.flows.diagnostics import u1_diagnostics
    from hpcflow.flows.u1 import u1_action

    fm = load_model(run_dir, allow_unfinished=True)
    gen = torch.Generator().manual_seed(12345)
    xs, lqs, ss = [], [], []
    with torch.inference_mode():
        for _ in range(max(1, n // batch)):
            x, lq = fm.model.sample(batch, gen)
            x64 = x.to(torch.float64)
            xs.append(x64)
            lqs.append(lq.to(torch.float64))
            ss.append(u1_action(x64, fm.lat, fm.beta))
    d = u1_diagnostics(torch.cat(xs), torch.cat(lqs), torch.cat(ss), fm.beta, (fm.L, fm.L))
    V = fm.L * fm.L
    return {"kl_gap": d["kl_gap"], "kl_gap_per_site": d["kl_gap"] / V if d["kl_gap"] is not None else None,
            "ess": d["ess"], "acceptance": d["acceptance"], "q_tv": d["q_tv"], "n": int(d["batch"])}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--L", type=int, default=8)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--beta-low", type=float, default=2.0)
    ap.add_argument("--beta-mid", type=float, default=3.0)
    ap.add_argument("--beta-high", type=float, default=5.0)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--components", type=int, default=2)
    ap.add_argument("--hidden", type=int, nargs="+", default=[8, 8])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--eval", type=int, default=8192, help="proposals per evaluation")
    ap.add_argument("--only", nargs="+", default=["anneal", "transfer", "gradient", "accumulate"])
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    out, S, L = args.out, args.steps, args.L
    rows: list[dict] = []

    def row(group: str, label: str, run: Path, cost: dict) -> None:
        ev = evaluate(run, args.eval)
        rows.append({"comparison": group, "run": label, **cost, **ev})
        print(json.dumps(rows[-1]), flush=True)

    if "anneal" in args.only:
        b = args.beta_high
        direct = base_config(out / "anneal_direct", L, b, S, args)
        sched = base_config(out / "anneal_schedule", L, b, S, args,
                            beta_schedule=[[0, args.beta_low], [S // 2, b]])
        row("anneal", f"direct at beta {b}", out / "anneal_direct", train(direct, "anneal_direct", out))
        row("anneal", f"schedule {args.beta_low} -> {b} over {S // 2}", out / "anneal_schedule",
            train(sched, "anneal_schedule", out))
    if "transfer" in args.only:
        b = args.beta_mid
        small = base_config(out / "transfer_small", L, b, S, args)
        c_small = train(small, "transfer_small", out)
        row("transfer", f"source: L={L} from scratch", out / "transfer_small", c_small)
        src = out / "transfer_small" / "train" / "checkpoint.pt"
        zero = base_config(out / "transfer_step0", 2 * L, b, 1, args, init_from=str(src))
        zero["train"]["lr"] = 1e-12  # one step that leaves the transferred weights in place
        row("transfer", f"L={2 * L} transferred, no fine-tuning", out / "transfer_step0", train(zero, "transfer_step0", out))
        ft = S // 3
        scratch = base_config(out / "transfer_scratch", 2 * L, b, ft, args)
        fine = base_config(out / "transfer_fine", 2 * L, b, ft, args, init_from=str(src))
        row("transfer", f"L={2 * L} from scratch, {ft} steps", out / "transfer_scratch", train(scratch, "transfer_scratch", out))
        row("transfer", f"L={2 * L} transferred + {ft} steps", out / "transfer_fine", train(fine, "transfer_fine", out))
    if "gradient" in args.only:
        b = args.beta_mid
        rep = base_config(out / "grad_reparam", L, b, S, args, gradient="reparam")
        c_rep = train(rep, "grad_reparam", out)
        row("gradient", f"reparam, {S} steps", out / "grad_reparam", c_rep)
        probe = base_config(out / "grad_probe", L, b, 20, args, gradient="path")
        c_probe = train(probe, "grad_probe", out)
        per_step = c_probe["train_s"] / max(1, c_probe["steps"])
        n_path = max(20, int(c_rep["train_s"] / per_step))
        path = base_config(out / "grad_path", L, b, n_path, args, gradient="path")
        row("gradient", f"path, {n_path} steps (equal CPU)", out / "grad_path", train(path, "grad_path", out))
    if "accumulate" in args.only:
        b = args.beta_mid
        big = base_config(out / "acc_big", L, b, S // 3, args)
        big["train"]["batch"] = 4 * args.batch
        acc = base_config(out / "acc_4", L, b, S // 3, args, accumulate=4)
        row("accumulate", f"batch {4 * args.batch}", out / "acc_big", train(big, "acc_big", out))
        row("accumulate", f"batch {args.batch} x accumulate 4", out / "acc_4", train(acc, "acc_4", out))

    (out / "toolkit.json").write_text(json.dumps(rows, indent=1) + "\n")
    print("\n| comparison | run | steps | train s (wall) | KL gap (nats) | ESS | acceptance | Q TV | peak MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        mib = f"{r['maxrss_mib']:.0f}" if r.get("maxrss_mib") else "-"
        print(f"| {r['comparison']} | {r['run']} | {r['steps']} | {r['train_s']:.0f} | {r['kl_gap']:.2f} | "
              f"{r['ess']:.3f} | {r['acceptance']:.3f} | {r['q_tv']:.3f} | {mib} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
