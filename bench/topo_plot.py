"""Plot of the seed experiment (Kanwar et al. 2020, arXiv 2003.06413, Fig. 4 style): tau_int of
the topological charge against beta on a log axis, one series per algorithm (flow, hmc,
hmc-long, heatbath, hb-or), from the JSON of bench/topo_analyse.py; a second panel shows the
cost per independent Q sample (``2 tau_int x CPU seconds per step``) against beta.

* error bars: the Gamma-method error of tau_int (and of the cost through it);
* rows flagged by topo_analyse (``tau_Q_lower_bound``: short chains, few tunnellings, a frozen
  chain, no window) are lower bounds: open markers with an upward arrow;
* the seed paper's quoted beta = 7 values (flow ~10, heat bath ~4000, HMC ~15000; L = 16) are
  drawn as grey star markers labelled "seed (quoted)": reference points, not measurements.

    python bench/topo_plot.py topo_out/topo_analysis.json [--out topo_out/topo_tau.png] [--L 16]
    python bench/topo_plot.py topo_out            # runs topo_analyse on the folder first
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

#: Kanwar et al. 2020 (arXiv 2003.06413), L = 16, beta = 7: tau_int(Q) as quoted in the brief
#: of this experiment (read off the paper's figure: order-of-magnitude reference values)
SEED_BETA7 = {"flow": 10.0, "heatbath": 4000.0, "hmc": 15000.0}

STYLE = {  # algo: (colour, marker, label)
    "flow": ("C3", "o", "flow + independence Metropolis"),
    "hmc": ("C0", "s", "HMC (5 leapfrog steps)"),
    "hmc-long": ("C9", "D", "HMC (tau = 2)"),
    "heatbath": ("C2", "v", "heat bath"),
    "hb-or": ("C1", "^", "heat bath + overrelaxation"),
}
SEED_LABEL = {"flow": "flow", "heatbath": "heat bath", "hmc": "HMC"}


def _style(algo: str, i: int) -> tuple[str, str, str]:
    if algo in STYLE:
        return STYLE[algo]
    if algo.startswith("flow"):
        return (f"C{4 + i % 5}", "o", f"flow ({algo})")
    return (f"C{4 + i % 5}", "x", algo)


def load_rows(source: Path) -> list[dict]:
    """Rows of a topo_analyse JSON file, or of the analysis of a chain folder."""
    source = Path(source)
    if source.is_dir():
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import topo_analyse

        path = source / "topo_analysis.json"
        if topo_analyse.main([str(source), "--json", str(path)]) != 0:
            raise SystemExit(f"topo_analyse failed on {source}")
        source = path
    try:
        data = json.loads(source.read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"{source}: not a topo_analyse JSON file ({e})") from None
    rows = data.get("rows") if isinstance(data, dict) else data
    if not isinstance(rows, list):
        raise SystemExit(f"{source}: no 'rows' list")
    return [r for r in rows if r.get("n_chains") and r.get("tau_Q") is not None]


def _finite(x) -> bool:  # type: ignore[no-untyped-def]
    return x is not None and isinstance(x, (int, float)) and math.isfinite(x)


def plot(rows: list[dict], out: Path, L: int | None = None, seed_ref: bool = True, title: str | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    if L is None and rows:
        L = max(int(r["L"]) for r in rows)
    rows = [r for r in rows if L is None or int(r["L"]) == L]
    algos: list[str] = []
    for r in rows:
        if r["algo"] not in algos:
            algos.append(r["algo"])
    order = ["flow", "hmc", "hmc-long", "heatbath", "hb-or"]
    algos.sort(key=lambda a: (order.index(a) if a in order else (0.5 if a.startswith("flow") else 99), a))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    ax_tau, ax_cost = axes
    n = max(len(algos), 1)
    handles = []
    for i, algo in enumerate(algos):
        col, mk, label = _style(algo, i)
        rr = sorted((r for r in rows if r["algo"] == algo), key=lambda r: r["beta"])
        dx = 0.06 * (i - (n - 1) / 2)  # side by side at each beta
        for ax, key in ((ax_tau, "tau_Q"), (ax_cost, "cost_per_indep_Q_s")):
            xs, ys = [], []
            for r in rr:
                y = r.get(key)
                if not _finite(y) or y <= 0:
                    continue
                b = float(r["beta"]) + dx
                if key == "tau_Q":
                    err = r.get("tau_Q_err")
                else:
                    cpu = r.get("cpu_s_per_step")
                    err = 2.0 * r["tau_Q_err"] * cpu if _finite(cpu) and _finite(r.get("tau_Q_err")) else None
                err = err if _finite(err) else 0.0
                xs.append(b)
                ys.append(y)
                if r.get("tau_Q_lower_bound"):
                    # a lower bound: open marker, upward arrow (one factor 2 long on the log axis)
                    ax.errorbar([b], [y], yerr=[[0.0], [y]], lolims=[True], fmt=mk, mfc="none", mec=col,
                                ecolor=col, ms=7, capsize=0, elinewidth=1.0, zorder=3)
                else:
                    lo = min(err, 0.999 * y)
                    ax.errorbar([b], [y], yerr=[[lo], [err]], fmt=mk, color=col, ms=6, capsize=3, zorder=3)
            if xs:
                ax.plot(xs, ys, "-", color=col, lw=0.8, alpha=0.6, zorder=2)
        handles.append(Line2D([], [], color=col, marker=mk, ls="-", label=label))
    seed_ref = seed_ref and (L is None or L == 16)
    if seed_ref:
        for a, tau in SEED_BETA7.items():
            col = _style(a, 0)[0]
            ax_tau.plot([7.0 + 0.22], [tau], marker="*", ms=13, color=col, mec="k", mew=0.6, ls="none", zorder=4)
            ax_tau.annotate(f"seed {SEED_LABEL[a]}", (7.22, tau), textcoords="offset points", xytext=(9, -3),
                            fontsize=7, color="0.3")
        handles.append(Line2D([], [], color="0.5", marker="*", mec="k", ms=11, ls="none",
                              label="Kanwar et al. 2020, beta = 7 (quoted)"))
    handles.append(Line2D([], [], color="0.3", marker="o", mfc="none", ls="none",
                          label="open / arrow: lower bound (flagged)"))
    ax_tau.set(yscale="log", xlabel="beta", ylabel="tau_int(Q)  [steps]")
    ax_cost.set(yscale="log", xlabel="beta", ylabel="CPU seconds per independent Q sample")
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
        betas = sorted({float(r["beta"]) for r in rows} | ({7.0} if seed_ref else set()))
        if betas:
            ax.set_xlim(min(betas) - 0.5, max(betas) + 0.7)
    ax_tau.legend(handles=handles, fontsize=7, loc="best")
    fig.suptitle(title or f"2D U(1), L = {L}: topological charge autocorrelation")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source", type=Path, help="topo_analyse JSON, or a chain folder (analysed first)")
    ap.add_argument("--out", type=Path, default=None, help="PNG (default: topo_tau.png beside the JSON)")
    ap.add_argument("--L", type=int, default=None, help="lattice size to plot (default: the largest)")
    ap.add_argument("--no-seed-ref", action="store_true", help="leave out the seed paper's quoted values")
    args = ap.parse_args(argv)
    rows = load_rows(args.source)
    if not rows:
        raise SystemExit(f"{args.source}: no analysed rows to plot")
    base = args.source if args.source.is_dir() else args.source.parent
    out = plot(rows, args.out or base / "topo_tau.png", args.L, seed_ref=not args.no_seed_ref)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
