"""Benchmark: time per training step and ESS / acceptance after a fixed wall-clock budget, for
the tutorial architecture (arXiv 2101.08176): U(1), L = 8, beta = 2, 16 layers, 2 NCP
components, hidden [8, 8], kernel 3, batch 64, Adam 1e-3, float32.

Reference (public PyTorch implementation, 2-core machine): 45.5 ms/step; ESS 0.078 and
acceptance 0.25 after 1000 steps. Target: at most 0.7x its time per step.

    python bench/train_u1.py --budget 120 --threads 2
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from hpcflow.flows import build_u1_flow
from hpcflow.flows.train import Trainer
from hpcflow.lattice.geometry import Lattice
from hpcflow.rng import CounterRNG
from hpcflow.sampling.metropolis import ess_fraction, metropolis_chain

REFERENCE_MS = 45.5


@dataclass(frozen=True)
class TrainCfg:
    steps: int
    batch: int = 64
    lr: float = 1e-3
    schedule: str = "constant"
    grad_clip: float = 0.0
    checkpoint_every: int = 10**9
    log_every: int = 50


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=120.0, help="wall-clock seconds of training")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", choices=["float32", "float64"], default="float32")
    ap.add_argument("--timing-steps", type=int, default=50)
    ap.add_argument("--sample", type=int, default=4096, help="proposals for final ESS/acceptance")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = torch.float32 if args.precision == "float32" else torch.float64
    lat = Lattice((8, 8))
    arch = SimpleNamespace(n_layers=16, kernel="ncp", n_components=2, n_knots=8, hidden=(8, 8),
                           kernel_size=3, checkpoint_activations=False)
    torch.manual_seed(0)
    model = build_u1_flow(arch, lat, dtype)
    with tempfile.TemporaryDirectory() as tmp:
        tr = Trainer(model, lat, 2.0, TrainCfg(steps=10**9), tmp, seed=0, dtype=dtype, progress=False)
        for _ in range(5):  # warm-up: allocator, oneDNN primitive caches
            tr.train_step()
        t0 = time.perf_counter()
        for _ in range(args.timing_steps):
            tr.train_step()
        ms = (time.perf_counter() - t0) / args.timing_steps * 1e3
        t_end = time.perf_counter() + args.budget
        while time.perf_counter() < t_end:
            tr.train_step()
        steps = tr.step
    res = metropolis_chain(model, lat, 2.0, args.sample, 512, CounterRNG(1))
    out = {
        "ms_per_step": ms,
        "ratio_to_reference": ms / REFERENCE_MS,
        "target_ratio": 0.7,
        "steps_in_budget": steps,
        "budget_s": args.budget,
        "ess_per_proposal": ess_fraction(res["proposal_logw"]),
        "acceptance": float(res["accepted"].mean()),
        "reference": {"ms_per_step": REFERENCE_MS, "ess_after_1000": 0.078, "acceptance_after_1000": 0.25},
        "threads": args.threads,
        "precision": args.precision,
    }
    print(f"{ms:.1f} ms/step ({ms / REFERENCE_MS:.2f}x reference {REFERENCE_MS} ms; target <= 0.7x)")
    print(f"after {steps} steps ({args.budget:.0f} s): ESS {out['ess_per_proposal']:.3f}, "
          f"acceptance {out['acceptance']:.3f}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
