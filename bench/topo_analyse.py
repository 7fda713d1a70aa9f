"""Analysis of the chains of bench/topo_chains.py: tau_int of the topological charge per
(algorithm, beta, L), the seed experiment's baseline numbers (Kanwar et al. 2020, arXiv
2003.06413, Fig. 4: HMC and heat bath at L = 16, beta = 1..7).

Per (algo, beta, L), with the chains as replicas of one ensemble (Wolff's Gamma method,
``hpcflow.analysis.gamma.gamma_method``, S = 1.5):

* ``tau_int(Q)`` and its error (also per chain), the summation window;
* ``<Q^2>`` with its error against the exact finite-volume value
  (``hpcflow.analysis.exact.u1_2d_q2``) and the pull; ``<cos P>`` against
  ``u1_2d_plaquette``;
  The plaquette's Gamma-method error misses its slow component: ``<cos P>`` in the sector Q is
  lower by ``~ (2 pi Q / V)^2 / 2``, so at large beta an error of ``<Q^2>`` moves it by
  several of its (fast-fluctuation) errors. ``plaq_pull_Qcorr`` removes that part,
  ``(2 pi^2 / V^2) (<Q^2> - <Q^2>_exact)``, and is the pull to judge the update by;
* the chain length in units of ``tau_int`` (shortest chain), the number of tunnelling events
  (steps where Q changed; total and per chain);
* CPU time per step (from the chains' meta.json) and the cost per independent Q sample,
  ``2 tau_int x CPU time per step``; HMC: acceptance, ``eps``, ``n_md``, ``<exp(-dH)>`` (= 1).

Flow chains (bench/topo_flow.py, algorithm names ``flow*``) are read the same way: one step
is one proposal, so the CPU time per step is the CPU time per proposal (training not
included: ``training_wall_s`` is reported beside it); their rows add the acceptance (from the
stored accept flags), the ESS per proposal of the stored proposals' ``log w``, and the model
(path, sha256, training steps, precision, backend).

Flags: ``short`` where the shortest chain is < 50 tau_int; ``few-tunnel`` where fewer than
``--min-tunnel`` (20) tunnelling events occurred in all chains together; ``frozen`` where a
chain never changed Q; ``no-window`` where the Gamma method found no window. A frozen or
rarely tunnelling chain makes the Gamma method *underestimate* tau_int (the autocorrelation it
cannot see is not in the estimate): flagged tau values (and costs) are lower bounds, printed
with ``>=``.

    python bench/topo_analyse.py topo_out [--json topo_out/analysis.json] [--discard 0]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from topo_chains import ALGOS, load_series  # noqa: E402

MIN_CHAIN_OVER_TAU = 50
MIN_TUNNEL = 20
#: <cos P> in the sector Q is lower by ~ (2 pi Q / V)^2 / 2 (the flux spread over V plaquettes)
_PLAQ_Q2 = 0.5 * (2 * math.pi) ** 2


def _gamma(x, **kw):  # type: ignore[no-untyped-def]
    """``gamma_method`` with its 'no window' warning turned into a flag."""
    from hpcflow.analysis.gamma import gamma_method

    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        g = gamma_method(x, **kw)
    return g, any("no window" in str(m.message) for m in w)


def find_chains(root: Path) -> dict[tuple[str, int, float], list[Path]]:
    groups: dict[tuple[str, int, float], list[Path]] = {}
    for state in sorted(Path(root).rglob("state.npz")):
        with np.load(state) as z:
            cfg = json.loads(str(z["state_json"]))["config"]
        groups.setdefault((cfg["algo"], int(cfg["L"]), float(cfg["beta"])), []).append(state.parent)
    return groups


def analyse_group(algo: str, L: int, beta: float, dirs: list[Path], discard: int = 0,
                  max_steps: int | None = None, min_tunnel: int = MIN_TUNNEL) -> dict:
    from hpcflow.analysis.exact import u1_2d_plaquette, u1_2d_q2

    chains = []
    for d in dirs:
        s = load_series(d)
        sl = slice(discard, None if max_steps is None else discard + max_steps)
        q, plaq = s["q"][sl].astype(np.float64), s["plaq"][sl]
        if q.size < 4:
            continue
        chains.append({"dir": str(d), "q": q, "plaq": plaq, "acc": s.get("acc", None),
                       "dH": s.get("dH", None), "logw": s.get("logw", None), "meta": s["meta"],
                       "state": s["state"], "sl": sl})
    if not chains:
        return {"algo": algo, "L": L, "beta": beta, "n_chains": 0}
    qs = [c["q"] for c in chains]
    n_each = [q.size for q in qs]
    g, no_win = _gamma(qs)
    g_q2, _ = _gamma([q * q for q in qs])
    g_pl, _ = _gamma([c["plaq"] for c in chains])
    per_chain = []
    for c in chains:
        gc, nw = _gamma(c["q"])
        tun = int(np.count_nonzero(np.diff(c["q"])))
        per_chain.append({"dir": c["dir"], "n": int(c["q"].size), "tau_Q": gc.tau_int,
                          "tau_Q_err": gc.tau_int_error, "window": gc.window, "no_window": nw,
                          "n_tunnel": tun, "mean_Q": float(c["q"].mean()),
                          "mean_Q2": float((c["q"] ** 2).mean()),
                          "cpu_s_per_step": c["meta"].get("cpu_s_per_step")})
    tunnel = sum(p["n_tunnel"] for p in per_chain)
    frozen = any(p["n_tunnel"] == 0 for p in per_chain)
    tau = g.tau_int
    cpu = [(c["meta"].get("cpu_s_per_step"), c["state"].get("n_done", 0)) for c in chains]
    cpu = [(t, n) for t, n in cpu if t]
    cpu_step = sum(t * n for t, n in cpu) / sum(n for _, n in cpu) if cpu else float("nan")
    q2_exact = u1_2d_q2(beta, L=L)
    pl_exact = u1_2d_plaquette(beta, L=L)
    length_over_tau = min(n_each) / tau if tau > 0 else float("inf")
    flags = []
    if length_over_tau < MIN_CHAIN_OVER_TAU:
        flags.append("short")
    if tunnel < min_tunnel:
        flags.append("few-tunnel")
    if frozen:
        flags.append("frozen")
    if no_win:
        flags.append("no-window")
    m0 = chains[0]["meta"]
    row = {
        "algo": algo, "L": L, "beta": beta, "n_chains": len(chains), "n_per_chain": n_each,
        "n_total": int(sum(n_each)),
        "tau_Q": tau, "tau_Q_err": g.tau_int_error, "window": g.window,
        "tau_Q_lower_bound": bool(flags),
        "length_over_tau": length_over_tau, "n_tunnel": tunnel,
        "n_tunnel_min_chain": min(p["n_tunnel"] for p in per_chain),
        "Q_mean": g.mean, "Q_mean_err": g.error,
        "Q2": g_q2.mean, "Q2_err": g_q2.error, "tau_Q2": g_q2.tau_int, "Q2_exact": q2_exact,
        "Q2_pull": (g_q2.mean - q2_exact) / g_q2.error if g_q2.error > 0 else float("nan"),
        "plaq": g_pl.mean, "plaq_err": g_pl.error, "tau_plaq": g_pl.tau_int, "plaq_exact": pl_exact,
        "plaq_pull": (g_pl.mean - pl_exact) / g_pl.error if g_pl.error > 0 else float("nan"),
        "plaq_pull_Qcorr": ((g_pl.mean + _PLAQ_Q2 / (L * L) ** 2 * (g_q2.mean - q2_exact) - pl_exact) / g_pl.error
                            if g_pl.error > 0 else float("nan")),
        "cpu_s_per_step": cpu_step, "cost_per_indep_Q_s": 2.0 * tau * cpu_step,
        "flags": flags, "per_chain": per_chain,
        "start": m0.get("start"), "seed": m0.get("seed"), "n_therm": m0.get("n_therm"),
        "discard": discard,
    }
    if algo.startswith("hmc"):
        acc = np.concatenate([c["acc"][c["sl"]] for c in chains if c["acc"] is not None])
        dH = np.concatenate([c["dH"][c["sl"]] for c in chains if c["dH"] is not None]).astype(np.float64)
        row.update(acceptance=float(acc.mean()) if acc.size else None,
                   exp_mdH=float(np.mean(np.exp(-dH))) if dH.size else None,
                   exp_mdH_err=float(np.std(np.exp(-dH)) / math.sqrt(dH.size)) if dH.size else None,
                   eps=m0.get("eps"), n_md=m0.get("n_md"), tau_md=m0.get("tau"))
    if algo == "hb-or":
        row["n_or"] = m0.get("n_or")
    if is_flow(algo):
        from hpcflow.analysis.reweighting import ess

        acc = np.concatenate([c["acc"][c["sl"]] for c in chains if c["acc"] is not None])
        lw = np.concatenate([c["logw"][c["sl"]] for c in chains if c["logw"] is not None])
        row.update(acceptance=float(acc.mean()) if acc.size else None,
                   ess_per_proposal=ess(lw, strict=False) if lw.size else None,
                   cpu_s_per_proposal=cpu_step,
                   **{k: m0.get(k) for k in ("model", "model_sha256", "training_steps", "training_wall_s",
                                             "precision", "backend", "batch")})
    return row


def is_flow(algo: str) -> bool:
    """Chains of bench/topo_flow.py (``--name`` flow, flow-<tag>)."""
    return algo.startswith("flow")


def _order(algo: str) -> int:
    if is_flow(algo):
        return -1
    return {a: i for i, a in enumerate(ALGOS)}.get(algo, 99)


def _fmt_tau(r: dict) -> str:
    ge = ">=" if r["tau_Q_lower_bound"] else ""
    return f"{ge}{r['tau_Q']:.4g} +/- {r['tau_Q_err']:.2g}"


def markdown(rows: list[dict]) -> str:
    head = ("| algo | L | beta | chains x N | tau_int(Q) | N/tau | Q changes | <Q^2> | exact | pull "
            "| <cos P> pull (Q-corr) | us/step (CPU) | cost/indep Q [ms] | HMC eps x n (acc); flow acc | flags |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if not r.get("n_chains"):
            continue
        ge = ">=" if r["tau_Q_lower_bound"] else ""
        hmc = (f"{r['eps']:.4g} x {r['n_md']} ({r['acceptance']:.3f})" if r["algo"].startswith("hmc") and
               r.get("eps") else "")
        if is_flow(r["algo"]) and r.get("acceptance") is not None:
            hmc = f"acc {r['acceptance']:.3f}, ESS/N {r['ess_per_proposal']:.3f}"
        lines.append(
            f"| {r['algo']} | {r['L']} | {r['beta']:g} | {r['n_chains']} x {min(r['n_per_chain']):,} | "
            f"{_fmt_tau(r)} | {r['length_over_tau']:.3g} | {r['n_tunnel']} (min {r['n_tunnel_min_chain']}) | "
            f"{r['Q2']:.4g} +/- {r['Q2_err']:.2g} | {r['Q2_exact']:.4g} | {r['Q2_pull']:+.2f} | "
            f"{r['plaq_pull']:+.2f} ({r['plaq_pull_Qcorr']:+.2f}) | {1e6 * r['cpu_s_per_step']:.1f} | "
            f"{ge}{1e3 * r['cost_per_indep_Q_s']:.4g} | {hmc} | {', '.join(r['flags'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", type=Path, help="the --out folder of bench/topo_chains.py")
    ap.add_argument("--json", type=Path, default=None, help="default: ROOT/topo_analysis.json")
    ap.add_argument("--discard", type=int, default=0, help="steps dropped at the start of each chain")
    ap.add_argument("--max-steps", type=int, default=None, help="use at most this many steps per chain")
    ap.add_argument("--min-tunnel", type=int, default=MIN_TUNNEL)
    ap.add_argument("--per-chain", action="store_true", help="print tau_int per chain too")
    args = ap.parse_args(argv)
    groups = find_chains(args.root)
    if not groups:
        raise SystemExit(f"no chains (state.npz) under {args.root}")
    rows = []
    for (algo, L, beta) in sorted(groups, key=lambda k: (k[1], k[2], _order(k[0]), k[0])):
        rows.append(analyse_group(algo, L, beta, groups[(algo, L, beta)], args.discard, args.max_steps,
                                  args.min_tunnel))
    print(markdown(rows))
    print(f"\nflags: short = shortest chain < {MIN_CHAIN_OVER_TAU} tau_int; few-tunnel = < {args.min_tunnel} "
          "changes of Q in all chains; frozen = a chain never changed Q. Flagged tau_int (and costs) are "
          "lower bounds: the Gamma method cannot see autocorrelations longer than the tunnelling it observed.")
    if args.per_chain:
        for r in rows:
            for p in r.get("per_chain", []):
                print(f"{r['algo']:9s} beta {r['beta']:g} {Path(p['dir']).name}: n {p['n']:,} tau_Q "
                      f"{p['tau_Q']:.4g} +/- {p['tau_Q_err']:.2g} Q changes {p['n_tunnel']} <Q> {p['mean_Q']:+.3f} "
                      f"<Q^2> {p['mean_Q2']:.3f}")
    path = args.json or args.root / "topo_analysis.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"rows": rows, "args": {k: str(v) for k, v in vars(args).items()}}, indent=1,
                              default=float))
    tmp.replace(path)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
