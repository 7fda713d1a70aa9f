"""Ship a trained flow: copy an ``hpcflow train`` output into ``models/NAME/`` with a model card.

``models/NAME/`` gets ``checkpoint.pt`` (the trainer's checkpoint, unchanged), ``config.yaml``
(the run's resolved configuration), ``metrics.jsonl`` (the training curve with its exact-
topology diagnostics) and ``CARD.md``: architecture, training recipe and budget (steps, and
wall seconds, the trainer's per-step times, of this stage and of the stages it was
warm-started from), the last diagnostics (KL gap to the exact -log Z, ESS,
acceptance estimate, charge-sector TV distance), the chain's measured acceptance and tau_int(Q)
when a ``bench/topo_analyse.py`` JSON is given, and the sha256 of the weights file.

    python bench/ship_model.py /work/runs/l16/b3 u1-L16-b3 [--analysis topo_analysis.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from pathlib import Path

import yaml

from hpcflow.models import write_model_json

ROOT = Path(__file__).resolve().parents[1]


def _metrics(run: Path) -> list[dict]:
    rows = []
    p = run / "train" / "metrics.jsonl"
    if p.exists():
        for line in p.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return rows


def _lineage(run: Path) -> list[tuple[Path, dict, list[dict]]]:
    """This stage and the stages it was warm-started from (train.init_from), oldest first."""
    out = []
    seen = set()
    while run is not None and run not in seen and (run / "config.yaml").exists():
        seen.add(run)
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        out.append((run, cfg, _metrics(run)))
        src = (cfg.get("train") or {}).get("init_from")
        run = Path(src).parent.parent if src else None
    return out[::-1]


def card(name: str, run: Path, sha: str, analysis: dict | None) -> str:
    stages = _lineage(run)
    cfg = stages[-1][1]
    fl = cfg["flow"]
    beta = float(cfg["action"]["beta"])
    lines = [f"# {name}", "",
             f"2D U(1) gauge-equivariant flow, lattice {cfg['lattice']['shape']}, beta = {beta:g}, "
             f"{cfg.get('precision', 'float64')}.", "",
             "## Architecture",
             f"{fl['n_layers']} plaquette coupling layers, kernel {fl.get('kernel', 'ncp')} "
             f"({fl.get('n_components', '-')} components), CNN hidden {fl['hidden']}, kernel size "
             f"{fl.get('kernel_size', 3)}; uniform (Haar) prior.", "",
             "## Training recipe and budget (reverse KL, Adam)", "",
             "| stage | lattice | beta | steps | batch | lr (schedule) | beta schedule | warm start | wall s |",
             "|---|---|---|---|---|---|---|---|---|"]
    total = 0.0
    for r, c, m in stages:
        t = c["train"]
        cpu = sum(float(x.get("time", 0.0)) for x in m)
        total += cpu
        ws = Path(t["init_from"]).parent.parent.name if t.get("init_from") else "-"
        lines.append(f"| {r.name} | {c['lattice']['shape']} | {c['action']['beta']} | {len(m)} | {t['batch']} | "
                     f"{t['lr']} ({t.get('schedule', 'constant')}) | {t.get('beta_schedule') or '-'} | {ws} | {cpu:.0f} |")
    lines += ["", f"Total training wall time (one thread on the 2-core development VM, both cores busy with other jobs): "
              f"{total:.0f} s ({total / 3600:.2f} h).", ""]
    diag = [x for x in stages[-1][2] if "diagnostics" in x]
    if diag:
        d = diag[-1]["diagnostics"]
        lines += ["## Quality at the end of training (batch diagnostics, exact reference)",
                  f"Step {diag[-1]['step']}, batch {d.get('batch')}: KL gap to the exact -log Z "
                  f"{d['kl_gap']:.2f} nats, ESS per proposal {d['ess']:.3f}, acceptance estimate "
                  f"{d['acceptance']:.3f}, charge-sector total-variation distance {d['q_tv']:.3f}, "
                  f"<Q^2> of the batch {d['q2']:.2f} (exact {d['q2_exact']:.3f}).", ""]
    if analysis:
        rows = [r for r in analysis.get("rows", analysis if isinstance(analysis, list) else [])
                if str(r.get("algo", "")).startswith("flow") and abs(float(r.get("beta", -1)) - beta) < 1e-9]
        if rows:
            r = rows[0]
            lines += ["## Sampling (bench/topo_flow.py, independence Metropolis)",
                      "```", json.dumps({k: r[k] for k in r if not isinstance(r[k], (list, dict))}, indent=1), "```", ""]
    else:
        lines += ["## Sampling", "tau_int(Q) and the chain's acceptance: not measured yet (see bench/RESULTS.md).", ""]
    lines += ["## Use", "Sample with it by name (no training; the architecture, lattice, group, beta and "
              "precision default to the model's):", "```yaml", "algorithm: flow",
              f"flow: {{model: {name}}}", "sample: {n_steps: 2000, batch: 256}", "output: {dir: out}", "```",
              "then `hpcflow sample CONFIG` (or `hpcflow run CONFIG`).", ""]
    lines += ["## Files", f"`checkpoint.pt` sha256 `{sha}` (the trainer's checkpoint: model, optimizer and "
              "RNG state; `hpcflow.flows.train.load_flow_checkpoint` reads it; `model.json` holds the same "
              "sha256 and every run checks it before sampling); `config.yaml` the run's "
              "configuration; `metrics.jsonl` the training curve.", ""]
    return "\n".join(lines)


def model_extra(run: Path, analysis: dict | None, beta: float) -> dict:
    """Summary figures for ``model.json``: training steps and the chain's measured quality."""
    m = _metrics(run)
    out: dict = {"training_steps": int(m[-1]["step"]) if m else 0}
    rows = [r for r in (analysis or {}).get("rows", [])
            if str(r.get("algo", "")).startswith("flow") and abs(float(r.get("beta", -1)) - beta) < 1e-9]
    if rows:
        r = rows[0]
        out["chain"] = {k: r[k] for k in ("acceptance", "tau_Q", "tau_Q_err", "tau_Q_lower_bound", "Q2",
                                           "Q2_err", "Q2_exact", "n_total") if k in r}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("name")
    ap.add_argument("--analysis", type=Path)
    ap.add_argument("--models", type=Path, default=ROOT / "models")
    args = ap.parse_args(argv)
    ck = args.run / "train" / "checkpoint.pt"
    if not ck.is_file() or not (args.run / "config.yaml").is_file():
        raise SystemExit(f"{args.run}: not a finished `hpcflow train` output (config.yaml, train/checkpoint.pt)")
    dest = args.models / args.name
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(ck, dest / "checkpoint.pt")
    shutil.copyfile(args.run / "config.yaml", dest / "config.yaml")
    shutil.copyfile(args.run / "train" / "metrics.jsonl", dest / "metrics.jsonl")
    sha = hashlib.sha256((dest / "checkpoint.pt").read_bytes()).hexdigest()
    analysis = json.loads(args.analysis.read_text()) if args.analysis else None
    (dest / "CARD.md").write_text(card(args.name, args.run, sha, analysis))
    cfg = yaml.safe_load((dest / "config.yaml").read_text())
    write_model_json(dest, args.name, cfg, model_extra(args.run, analysis, float(cfg["action"]["beta"])))
    print(f"{dest}: sha256 {sha}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
