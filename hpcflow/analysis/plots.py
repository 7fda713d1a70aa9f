"""PNG plots of an ensemble and its training (``hpcflow plot DIR``; matplotlib, Agg).

:func:`write_plots` writes, into ``<output dir>/plots/`` by default, each titled with group,
lattice, beta, algorithm and chain(s):

* ``history_chainCCC.png`` -- Monte Carlo history of every stored observable of chain ``CCC``
  (the first ``max_chains`` chains) against the stored step, the thermalisation cut
  (``skip`` rows, shaded), the Gamma-method mean and error band after the cut and, for 2D
  U(1), the exact plaquette and action; 0/1 series (``accepted``) as a moving average;
* ``autocorrelation.png`` -- per observable the normalised autocorrelation ``rho(t)`` and
  ``tau_int(W)`` (chains as replicas, after the cut and binning) with the chosen window ``W``
  and ``tau_int``;
* ``topology.png`` -- topological-charge history and histogram, for 2D U(1) beside the exact
  sector weights :func:`hpcflow.analysis.exact.u1_2d_charge_distribution`; ``Q`` from a ``Q``
  row column when stored, else (2D U(1) only) computed from the stored links of at most
  ``max_q_configs`` evenly spaced configurations per chain (said in the title);
* for an ``hpcflow run`` directory (no ensemble): the same history, autocorrelation and
  topology plots from ``history.jsonl`` (one chain);
* ``training.png`` -- the training curves of ``train/metrics.jsonl`` with title and, for 2D
  U(1), the exact ``-log Z`` line (:func:`hpcflow.flows.train.plot_metrics`).

* ``flow_energy.png`` -- 4D: ``t^2 E(t)`` of the Wilson flow (rows ``t2E_clov``, ``t2E_plaq`` on
  the segment attribute ``flow_times``), averaged over the flowed configurations after the
  cut (chains as replicas, Gamma-method error per flow time), with the reference value 0.3
  that defines ``t0`` and the mean ``t0/a^2`` of the rows where the flow reaches it.

Every file is written under a temporary name and renamed.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from hpcflow.analysis.ensemble import EnsembleSeries, format_value, load_series
from hpcflow.analysis.gamma import autocorrelation, gamma_method
from hpcflow.io.ensemble import EnsembleError

__all__ = ["plot_autocorrelation", "plot_flow_energy", "plot_history", "plot_topology", "plot_training",
           "resolve_plot_dirs", "write_plots"]

_DPI = 110


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path, title: str) -> Path:
    """Save under a temporary name and rename; the title also goes into the PNG's ``Title`` text."""
    plt = _plt()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.png")
    try:
        fig.savefig(tmp, dpi=_DPI, metadata={"Title": title, "Software": "hpcflow"})
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if tmp.exists():
            tmp.unlink()
    return path


def _is_ensemble(d: Path) -> bool:
    return d.is_dir() and any(p.is_dir() and p.name.startswith("chain") and p.name[5:].isdigit()
                              for p in d.iterdir())


def resolve_plot_dirs(target: str | os.PathLike) -> tuple[Path, Path | None, Path | None]:
    """``(output dir, ensemble dir or None, train/metrics.jsonl or None)`` of an output
    directory (holding ``ensemble/`` and/or ``train/``) or an ensemble directory."""
    t = Path(target)
    if not t.is_dir():
        raise EnsembleError(f"{t}: no such directory")
    if _is_ensemble(t):
        out = t.parent if t.name == "ensemble" else t
        ens: Path | None = t
    else:
        out = t
        ens = t / "ensemble" if _is_ensemble(t / "ensemble") else None
    metrics = out / "train" / "metrics.jsonl"
    if ens is None and not metrics.is_file() and not (out / "history.jsonl").is_file():
        raise EnsembleError(f"{t}: neither an ensemble (chainNNN/ folders) nor an output directory with "
                            "ensemble/ or train/metrics.jsonl: nothing to plot")
    return out, ens, metrics if metrics.is_file() else None


def _title(ser: EnsembleSeries, what: str, chains: str) -> str:
    return f"{what}: {ser.label}, {chains}"


def _chains_label(chains: list[int]) -> str:
    if len(chains) == 1:
        return f"chain {chains[0]}"
    if chains == list(range(chains[0], chains[-1] + 1)):
        return f"chains {chains[0]}-{chains[-1]} (replicas)"
    return "chains " + ",".join(map(str, chains)) + " (replicas)"


def _u1_2d(ser: EnsembleSeries) -> bool:
    lat = np.atleast_1d(ser.attrs.get("lattice", []))
    return ser.attrs.get("group") == "u1" and lat.size == 2 and ser.attrs.get("beta") is not None


def _exact_lines(ser: EnsembleSeries) -> dict[str, float]:
    """Exact 2D U(1) values of the stored observables (plaquette, S), {} elsewhere."""
    if not _u1_2d(ser) or ser.attrs.get("action", "wilson") != "wilson":
        return {}
    from hpcflow.analysis.exact import u1_2d_plaquette

    vol = int(np.prod(np.atleast_1d(ser.attrs["lattice"])))
    beta = float(ser.attrs["beta"])
    p = u1_2d_plaquette(beta, volume=vol)
    return {"plaquette": p, "S": -beta * vol * p}


def _binary(x: np.ndarray) -> bool:
    f = x[np.isfinite(x)]
    return f.size > 0 and bool(np.all((f == 0) | (f == 1)))


def _gamma_quiet(series: list[np.ndarray]) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return gamma_method(series if len(series) > 1 else series[0], bias_correction=True)


def plot_history(full: EnsembleSeries, chain: int, path: Path, skip: int = 0) -> Path:
    """Monte Carlo history of every observable of one chain (``full``: loaded without a cut)."""
    plt = _plt()
    names = list(full.raw)
    steps = full.steps[chain]
    exact = _exact_lines(full)
    fig, axes = plt.subplots(len(names), 1, figsize=(10, 1.9 * len(names) + 1.0), sharex=True, squeeze=False)
    cut_step = steps[skip] if 0 < skip < steps.size else None
    for ax, name in zip(axes[:, 0], names):
        x = full.raw[name][chain]
        ok = np.isfinite(x)
        label = name
        if _binary(x):
            k = max(1, int(ok.sum()) // 100)
            y = np.convolve(x[ok], np.ones(k) / k, mode="valid")
            ax.plot(steps[ok][k - 1:], y, lw=0.8, color="C0")
            label = f"{name}\n(moving avg {k})" if k > 1 else name
        else:
            ax.plot(steps[ok], x[ok], lw=0.5 if ok.sum() > 500 else 0.9, color="C0",
                    marker="" if ok.sum() > 200 else ".", ms=3)
        after = x[skip:][np.isfinite(x[skip:])]
        if after.size >= 2:
            g = _gamma_quiet([after])
            lo_step = cut_step if cut_step is not None else steps[0]
            ax.axhline(g.mean, color="C1", lw=1.0, label=f"mean {format_value(g.mean, g.error or None)}")
            if g.error > 0:
                ax.fill_between([lo_step, steps[-1]], g.mean - g.error, g.mean + g.error, color="C1", alpha=0.3,
                                lw=0)
        if name in exact:
            ax.axhline(exact[name], color="k", ls=":", lw=1.0, label=f"exact {exact[name]:.6g}")
        if cut_step is not None:
            ax.axvspan(steps[0], cut_step, color="0.85", lw=0)
            ax.axvline(cut_step, color="C3", ls="--", lw=1.0, label=f"cut: {skip} rows")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right", fontsize=7, framealpha=0.8)
    axes[-1, 0].set_xlabel("Monte Carlo step")
    title = _title(full, "Monte Carlo history", f"chain {chain}")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return _save(fig, path, title)


def plot_autocorrelation(ser: EnsembleSeries, path: Path) -> Path:
    """``rho(t)`` and ``tau_int(W)`` of every observable (chains as replicas, after cut and bins)."""
    plt = _plt()
    names = list(ser.observables)
    fig, axes = plt.subplots(len(names), 2, figsize=(10, 1.9 * len(names) + 1.0), squeeze=False)
    unit = "rows" if ser.bin_size == 1 else f"bins of {ser.bin_size}"
    for (ax_r, ax_t), name in zip(axes, names):
        per = ser.observables[name]
        reps = [per[c] for c in sorted(per)]
        g = _gamma_quiet(reps)
        n = sum(r.size for r in reps)
        if "constant" in g.flags:
            for ax in (ax_r, ax_t):
                ax.text(0.5, 0.5, f"{name}: constant", ha="center", va="center", transform=ax.transAxes)
                ax.set_yticks([])
            continue
        w_max = max(r.size for r in reps) // 2
        rho = autocorrelation(reps if len(reps) > 1 else reps[0], max(w_max, 2))
        t_show = int(min(rho.size, max(3 * max(g.window, 1), 20)))
        t = np.arange(t_show)
        ax_r.plot(t, rho[:t_show], marker=".", ms=3, lw=0.8)
        ax_r.axhline(0.0, color="0.5", lw=0.6)
        ax_r.axvline(g.window, color="C3", ls="--", lw=1.0, label=f"W = {g.window}")
        ax_r.set_ylabel(f"{name}\nrho(t)")
        ax_r.legend(loc="upper right", fontsize=7)
        ax_r.grid(alpha=0.3)
        tau_w = 0.5 + np.cumsum(rho[1:t_show])
        ws = np.arange(1, t_show)
        err = 2 * tau_w * np.sqrt(np.clip(ws - tau_w + 0.5, 0, None) / n)
        ax_t.plot(ws, tau_w, lw=0.9)
        ax_t.fill_between(ws, tau_w - err, tau_w + err, alpha=0.25, lw=0)
        ax_t.axvline(g.window, color="C3", ls="--", lw=1.0)
        tau_label = ("naive error: autocorrelation sum < 0" if "nonpositive_sum" in g.flags else
                     f"tau_int = {format_value(g.tau_int, g.tau_int_error or None, 1)}"
                     + (" (window limit)" if "window_limit" in g.flags else ""))
        ax_t.axhline(g.tau_int, color="C1", lw=1.0, label=tau_label)
        ax_t.set_ylabel("tau_int(W)")
        ax_t.legend(loc="lower right", fontsize=7)
        ax_t.grid(alpha=0.3)
    axes[-1, 0].set_xlabel(f"t ({unit})")
    axes[-1, 1].set_xlabel(f"W ({unit})")
    extra = f"; skip {ser.skip}, bin {ser.bin_size}" if ser.skip or ser.bin_size > 1 else ""
    title = _title(ser, "Normalised autocorrelation", _chains_label(sorted(ser.chains)) + extra)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return _save(fig, path, title)


def _charges(root: str, ser: EnsembleSeries, max_configs: int,
             log: Callable[[str], None]) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray], str] | None:
    """``({chain: steps}, {chain: Q}, source)``: the ``Q`` column, else the geometric charge of
    the stored 2D U(1) links (at most ``max_configs`` evenly spaced configurations per chain)."""
    if "Q" in ser.raw:
        steps = {c: ser.steps[c][np.isfinite(ser.raw["Q"][c])] for c in ser.chains}
        return steps, {c: ser.raw["Q"][c][np.isfinite(ser.raw["Q"][c])] for c in ser.chains}, "Q column"
    if not _u1_2d(ser) or max_configs == 0:
        return None
    import torch

    from hpcflow.io.ensemble import open_ensemble
    from hpcflow.lattice.geometry import Lattice
    from hpcflow.lattice.observables import topological_charge_u1_2d

    ens = open_ensemble(root, verify="rows")
    lat = Lattice(tuple(int(n) for n in np.atleast_1d(ser.attrs["lattice"])))
    steps_out, q_out = {}, {}
    used = total = 0
    for c in ser.chains:
        n = ser.steps[c].size
        idx = np.arange(n) if n <= max_configs else np.unique(np.linspace(0, n - 1, max_configs).round().astype(int))
        qs = []
        for lo in range(0, idx.size, 256):
            u = torch.stack([ens.config(c, int(i)) for i in idx[lo:lo + 256]])
            qs.append(topological_charge_u1_2d(u.to(torch.complex128), lat).numpy())
        q_out[c] = np.rint(np.concatenate(qs)) if qs else np.zeros(0)
        steps_out[c] = ser.steps[c][idx]
        used, total = used + idx.size, total + n
    src = "Q from the links" + (f" of {used} of {total} configurations (evenly spaced)" if used < total else "")
    if used < total:
        log(f"topology: Q computed from the links of {used} of {total} configurations (--max-q-configs)")
    return steps_out, q_out, src


def plot_topology(ser: EnsembleSeries, steps: dict[int, np.ndarray], q: dict[int, np.ndarray], source: str,
                  path: Path, cut: dict[int, int] | None = None, max_chains: int = 4) -> Path:
    """Charge history (first ``max_chains`` chains) and the histogram of all charges from the
    cut on (``cut[chain]``: the first step kept), with Gamma-method errors of the sector
    fractions; 2D U(1): the exact ``P(Q)``."""
    plt = _plt()
    fig, (ax_h, ax_p) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [1.6, 1]})
    chains = sorted(q)
    for k, c in enumerate(chains[:max_chains]):
        ax_h.plot(steps[c], q[c], lw=0.6, drawstyle="steps-post", color=f"C{k}", label=f"chain {c}")
    if cut:
        ax_h.axvline(min(cut.values()), color="C3", ls="--", lw=1.0, label="cut")
    ax_h.set_xlabel("Monte Carlo step")
    ax_h.set_ylabel("Q")
    ax_h.set_title(source, fontsize=9)
    ax_h.yaxis.get_major_locator().set_params(integer=True)
    ax_h.grid(alpha=0.3)
    ax_h.legend(loc="upper right", fontsize=7)
    after = {c: q[c][steps[c] >= cut[c]] if cut and c in cut else q[c] for c in chains}
    after = {c: v for c, v in after.items() if v.size >= 2}
    if after:
        allq = np.concatenate(list(after.values())).astype(int)
        qs = np.arange(allq.min(), allq.max() + 1)
        frac, err = [], []
        for v in qs:
            ind = [(after[c] == v).astype(float) for c in sorted(after)]
            g = _gamma_quiet(ind)
            frac.append(g.mean)
            err.append(g.error)
        ax_p.bar(qs, frac, yerr=err, color="C0", alpha=0.6, capsize=2, label=f"{allq.size} configurations")
        g2 = _gamma_quiet([after[c] ** 2 for c in sorted(after)])
        txt = f"<Q^2> = {format_value(g2.mean, g2.error or None)}"
        if _u1_2d(ser):
            from hpcflow.analysis.exact import u1_2d_charge_distribution, u1_2d_q2

            vol = int(np.prod(np.atleast_1d(ser.attrs["lattice"])))
            beta = float(ser.attrs["beta"])
            qe, pe = u1_2d_charge_distribution(beta, volume=vol)
            keep = pe > 1e-4 * pe.max()
            ax_p.plot(qe[keep], pe[keep], "o", color="k", ms=4, label="exact P(Q)")
            txt += f", exact {u1_2d_q2(beta, volume=vol):.4g}"
        ax_p.set_title(txt, fontsize=9)
        ax_p.set_xlabel("Q")
        ax_p.xaxis.get_major_locator().set_params(integer=True)
        ax_p.set_ylabel("fraction")
        ax_p.grid(alpha=0.3)
        ax_p.legend(loc="upper right", fontsize=7)
    title = _title(ser, "Topological charge", _chains_label(chains))
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return _save(fig, path, f"{title} ({source})")


def plot_flow_energy(ens: Any, ser: EnsembleSeries, path: Path, skip: int = 0) -> Path | None:
    """``t^2 E(t)`` of the stored Wilson-flow grid (None when the ensemble holds none)."""
    times = np.atleast_1d(np.asarray(ser.attrs.get("flow_times", []), dtype=np.float64))
    curves: dict[str, list[np.ndarray]] = {}
    t0s: dict[str, list[float]] = {}
    for c in ser.chains:
        rec = ens.records(c)
        for kind in ("clov", "plaq"):
            v = rec.get(f"t2E_{kind}")
            if v is None or np.ndim(v) != 2 or v.shape[1] != times.size or times.size == 0:
                continue
            v = np.asarray(v, dtype=np.float64)[skip:]
            keep = np.all(np.isfinite(v), axis=1)
            if keep.sum() >= 2:
                curves.setdefault(kind, []).append(v[keep])
            t0 = np.asarray(rec.get(f"t0_{kind}", np.full(len(rec["step"]), np.nan)), dtype=np.float64)[skip:]
            t0s.setdefault(kind, []).extend(t0[np.isfinite(t0)].tolist())
    if not curves:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    colours = {"clov": "tab:blue", "plaq": "tab:orange"}
    names = {"clov": "clover E", "plaq": "plaquette E"}
    n_cfg = 0
    for kind, reps in curves.items():
        n_cfg = max(n_cfg, sum(r.shape[0] for r in reps))
        mean, err = np.empty(times.size), np.empty(times.size)
        for j in range(times.size):
            g = _gamma_quiet([r[:, j] for r in reps])
            mean[j], err[j] = g.mean, g.error
        ax.plot(times, mean, color=colours[kind], label=f"{names[kind]} ({sum(r.shape[0] for r in reps)} configs)")
        ax.fill_between(times, mean - err, mean + err, color=colours[kind], alpha=0.3, lw=0)
        if t0s.get(kind):
            t0_mean = float(np.mean(t0s[kind]))
            ax.axvline(t0_mean, color=colours[kind], ls=":", lw=1,
                       label=f"t0/a^2 = {t0_mean:.4g} ({names[kind]}, mean of {len(t0s[kind])})")
    ax.axhline(0.3, color="k", ls="--", lw=0.8, label="0.3 (defines t0)")
    ax.set_xlabel("flow time t/a^2")
    ax.set_ylabel("t^2 E(t)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    title = _title(ser, "Wilson flow t^2 E(t)", _chains_label(sorted(ser.chains)))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path, title)


def _training_meta(out_dir: Path, ser: EnsembleSeries | None) -> dict[str, Any]:
    """Group, lattice and beta for the training plot: ``config.yaml`` of the output directory,
    else the ensemble's attributes."""
    cfg = out_dir / "config.yaml"
    if cfg.is_file():
        import yaml

        try:
            d = yaml.safe_load(cfg.read_text()) or {}
            return {"group": d.get("group"), "lattice": (d.get("lattice") or {}).get("shape"),
                    "beta": (d.get("action") or {}).get("beta"),
                    "batch": (d.get("train") or {}).get("batch")}
        except (OSError, yaml.YAMLError, AttributeError):
            pass
    if ser is not None:
        return {"group": ser.attrs.get("group"), "lattice": list(np.atleast_1d(ser.attrs.get("lattice", []))),
                "beta": ser.attrs.get("beta")}
    return {}


def plot_training(metrics: Path, path: Path, meta: dict[str, Any]) -> Path | None:
    """``train/metrics.jsonl`` drawn by :func:`hpcflow.flows.train.plot_metrics` (title, exact line)."""
    from hpcflow.flows.train import plot_metrics

    rows = []
    for line in Path(metrics).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a kill
    if not rows:
        return None
    plot_metrics(rows, Path(path), meta=meta)
    return Path(path)


def write_plots(target: str | os.PathLike, out: str | os.PathLike | None = None, skip: int = 0, bin_size: int = 1,
                max_q_configs: int = 2000, max_chains: int = 4,
                log: Callable[[str], None] | None = None) -> list[Path]:
    """Write every plot of the module docstring for ``target`` (an output directory or an
    ensemble directory) into ``out`` (default ``<output dir>/plots``); returns the paths.

    ``skip``: the thermalisation cut (stored rows per chain), drawn and used for the statistics;
    ``bin_size``: bins for the autocorrelation plot; ``max_q_configs``: at most this many
    configurations per chain whose charge is computed from the links (no ``Q`` column; 0: none);
    ``max_chains``: history plots for the first this many chains. ``log``: where notes go
    (e.g. ``print``). Callable at the end of ``run``/``sample`` with the output directory.
    """
    say = log or (lambda s: None)
    out_dir, ens_dir, metrics = resolve_plot_dirs(target)
    dest = Path(out) if out is not None else out_dir / "plots"
    written: list[Path] = []
    ser = None
    if ens_dir is not None:
        from hpcflow.io.ensemble import open_ensemble

        ens = open_ensemble(ens_dir)  # read and verified once for both series
        full = load_series(ens, skip=0, bin_size=1)
        ser = load_series(ens, skip=skip, bin_size=bin_size)
        shown = sorted(full.chains)[:max_chains]
        if len(full.chains) > max_chains:
            say(f"history: chains {', '.join(map(str, shown))} of {len(full.chains)} (max_chains)")
        for c in shown:
            written.append(plot_history(full, c, dest / f"history_chain{c:03d}.png", skip=skip))
        written.append(plot_autocorrelation(ser, dest / "autocorrelation.png"))
        got = _charges(str(ens_dir), full, max_q_configs, say)
        if got is not None:
            steps, q, src = got
            cut = {c: int(full.steps[c][skip]) if skip < full.steps[c].size else int(full.steps[c][-1]) + 1
                   for c in full.chains if full.steps[c].size} if skip else None
            written.append(plot_topology(full, steps, q, src, dest / "topology.png", cut=cut, max_chains=max_chains))
        else:
            say("topology: no Q column and not 2D U(1): no topological-charge plot")
        fe = plot_flow_energy(ens, full, dest / "flow_energy.png", skip=skip)
        if fe is not None:
            written.append(fe)
    elif (out_dir / "history.jsonl").is_file():  # hpcflow run: the measurement history
        from hpcflow.analysis.ensemble import HistoryRecords

        hist = HistoryRecords(out_dir)
        full = load_series(hist, skip=0, bin_size=1)
        ser = load_series(hist, skip=skip, bin_size=bin_size)
        written.append(plot_history(full, 0, dest / "history_chain000.png", skip=skip))
        written.append(plot_autocorrelation(ser, dest / "autocorrelation.png"))
        if "Q" in full.raw:
            got = _charges(str(out_dir), full, 0, say)
            if got is not None:
                written.append(plot_topology(full, got[0], got[1], got[2], dest / "topology.png",
                                             max_chains=max_chains))
    if metrics is not None:
        p = plot_training(metrics, dest / "training.png", _training_meta(out_dir, ser))
        if p is not None:
            written.append(p)
    return written
