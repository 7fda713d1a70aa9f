"""Statistics of a stored ensemble (``hpcflow measure``): the analysis side of
:mod:`hpcflow.io.ensemble`, which only reads.

* :func:`load_series` -- the per-chain series of every stored observable after the
  thermalisation cut (``skip`` stored rows per chain) and binning (``bin_size`` rows per bin).
* :func:`measure_ensemble` -- the report ``hpcflow measure`` prints: Gamma-method mean, error,
  ``tau_int`` with its error for every observable, combined (chains as replicas) and per chain;
  per-kind acceptance when the rows carry a ``kind`` column; the proposal ESS estimated from
  the chain states' ``log w``; warnings. Strict JSON: a number that cannot be computed is
  ``null`` with a ``"note"``.
* :func:`format_table` -- the report as a table for a paper, values rounded to their errors
  (``0.6988(19)``); :func:`format_value` the rounding.
* :func:`export_pyerrors` -- the analysed series through pyerrors' own JSON export.

Observables are every numeric row column except the bookkeeping ones (:data:`BOOKKEEPING`),
so columns added later (``Q``, Wilson loops, ...) are measured without a change here; the
``accepted`` column is reported as ``acceptance``. Every row is a state of an exact Markov
chain, already distributed as ``p = exp(-S)/Z`` (a flow chain's independence-Metropolis steps
included), so the states are averaged plainly; reweighting them by ``w = p/q`` would be biased
(issue 19: 7.9 sigma on the demo's ensemble) and is not done.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hpcflow.analysis.gamma import FLAGS, GammaResult, gamma_method, gamma_method_derived
from hpcflow.io.ensemble import Ensemble, EnsembleError, open_ensemble

__all__ = [
    "HistoryRecords",
    "BOOKKEEPING",
    "EnsembleSeries",
    "export_pyerrors",
    "format_table",
    "format_value",
    "load_series",
    "measure_ensemble",
]

#: Row columns that are no observables.
BOOKKEEPING = ("chain", "step", "checksum", "multiplicity", "kind")
#: Row column naming the update of a step in mixed chains ('flow', 'heatbath', 'hmc'), if stored.
KIND_COLUMN = "kind"
_DISPLAY = {"accepted": "acceptance"}
_FIRST = ("plaquette", "S", "accepted")
#: A chain shorter than this many tau_int gives unreliable errors (Wolff 2004, section 3.3).
SHORT_CHAIN_TAUS = 50
#: Flow chains: acceptance or ESS per proposal below this means heavy-tailed importance weights.
LOW_FLOW_QUALITY = 0.05
#: Chains whose means disagree with a p-value below this are named in the warnings.
CHAIN_P_MIN = 1e-3


@dataclass
class EnsembleSeries:
    """The analysed series of an ensemble (after ``skip`` and ``bin_size``).

    ``observables[name][chain]``: the binned series of the finite values of that chain
    (``name`` as printed: ``acceptance`` for the ``accepted`` column); ``index[name][chain]``:
    the stored step number of the first row of each value (pyerrors' configuration numbers);
    ``raw[name][chain]`` and ``steps[chain]``: the unbinned rows after the cut (for plots);
    ``kinds[chain]``: the step kind of each unbinned row after the cut, if a ``kind`` column
    is stored; ``rows[chain]``: stored rows before the cut; ``omitted``: columns without a
    finite value, with the reason; ``notes``: what was dropped and why.
    """

    root: str
    attrs: dict[str, Any]
    chains: list[int]
    skip: int
    bin_size: int
    rows: dict[int, int]
    steps: dict[int, np.ndarray]
    raw: dict[str, dict[int, np.ndarray]]
    observables: dict[str, dict[int, np.ndarray]]
    index: dict[str, dict[int, np.ndarray]]
    kinds: dict[int, np.ndarray] | None = None
    omitted: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        """``group lattice, beta, algorithm`` for titles and headers."""
        a = self.attrs
        lat = "x".join(str(int(n)) for n in np.atleast_1d(a.get("lattice", [])))
        beta = a.get("beta")
        parts = [f"{a.get('group', '?')} {lat}".strip(),
                 f"beta {float(beta):g}" if beta is not None else "beta ?",
                 str(a.get("algorithm", "?"))]
        return ", ".join(parts)


def _kind_labels(col: np.ndarray, attrs: dict[str, Any]) -> np.ndarray:
    """The ``kind`` column as strings: bytes/str as stored; integer codes through the
    ``kinds`` attribute (names by code) when the segments have one, else ``kind<code>``."""
    if col.dtype.kind in "SO":
        return np.array([v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in col])
    if col.dtype.kind == "U":
        return col.astype(str)
    names = attrs.get("kinds")
    if names is not None:
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in np.atleast_1d(names)]
        return np.array([names[int(v)] if 0 <= int(v) < len(names) else f"kind{int(v)}" for v in col])
    return np.array([f"kind{int(v)}" for v in col])


def _bin(x: np.ndarray, b: int) -> np.ndarray:
    n = x.size // b
    return x[: n * b].reshape(n, b).mean(axis=1) if b > 1 else x


def _check_int(name: str, v: Any, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
    return int(v)


class HistoryRecords:
    """The measurement history of ``hpcflow run`` (``history.jsonl``, with ``config.yaml`` for
    the labels) read as a one-chain ensemble: ``chains``, ``attrs``, ``records(0)`` and
    ``root`` as :class:`~hpcflow.io.ensemble.Ensemble` has them, for :func:`load_series` and the
    plots. ``null`` (a value not measured at that step) becomes NaN; a truncated last line (a
    killed run) is left out; ``time`` is bookkeeping."""

    def __init__(self, out_dir: str | os.PathLike) -> None:
        import json

        from hpcflow.yamlio import YAMLReadError, read_yaml

        d = os.fspath(out_dir)
        path = os.path.join(d, "history.jsonl")
        rows: list[dict[str, Any]] = []
        try:
            with open(path, encoding="utf-8") as fh:
                for line in fh:
                    if line.strip():
                        try:
                            rows.append(json.loads(line))
                        except json.JSONDecodeError:
                            break
        except OSError as e:
            raise EnsembleError(f"{path}: cannot read the history ({e.strerror})") from None
        if len(rows) < 2:
            raise EnsembleError(f"{path}: fewer than 2 measurements; nothing to plot")
        try:
            cfg = read_yaml(os.path.join(d, "config.yaml")) or {}
        except YAMLReadError:
            cfg = {}
        cfg = cfg if isinstance(cfg, dict) else {}
        self.root = d
        self.chains = [0]
        self.attrs: dict[str, Any] = {
            "group": cfg.get("group"), "lattice": list((cfg.get("lattice") or {}).get("shape") or []),
            "beta": (cfg.get("action") or {}).get("beta"), "algorithm": cfg.get("algorithm"),
            "action": (cfg.get("action") or {}).get("name", "wilson")}
        keys = [k for k in rows[0] if k != "time"]
        rec: dict[str, np.ndarray] = {"step": np.asarray([r.get("step", i) for i, r in enumerate(rows)],
                                                         dtype=np.int64)}
        for k in keys:
            if k == "step":
                continue
            vals = [r.get(k) for r in rows]
            if k == KIND_COLUMN:
                rec[k] = np.asarray([str(v or "").encode() for v in vals], dtype="S16")
                continue
            if any(isinstance(v, list) for v in vals):
                width = max(len(v) for v in vals if isinstance(v, list))
                rec[k] = np.asarray([[np.nan if x is None else x for x in v] if isinstance(v, list) and len(v) == width
                                     else [np.nan] * width for v in vals], dtype=np.float64)
                continue
            if all(v is None or isinstance(v, (int, float, bool)) for v in vals):
                rec[k] = np.asarray([np.nan if v is None else float(v) for v in vals], dtype=np.float64)
        self._rec = rec

    def records(self, chain: int | None = None) -> dict[str, np.ndarray]:
        return self._rec


def load_series(root: str | os.PathLike | Ensemble | HistoryRecords, chain: int | None = None, skip: int = 0,
                bin_size: int = 1) -> EnsembleSeries:
    """Read the rows of an ensemble (verified, :func:`hpcflow.io.open_ensemble`) and cut and
    bin them: the first ``skip`` stored rows of each chain are dropped (thermalisation), then
    ``bin_size`` consecutive rows are averaged (an incomplete last bin is dropped). Non-finite
    values (``log_q``/``log_w`` of HMC or heat-bath states) are left out per column.
    ``root`` may be an open :class:`~hpcflow.io.ensemble.Ensemble` (its verified rows are reused)."""
    skip = _check_int("skip", skip, 0)
    bin_size = _check_int("bin_size", bin_size, 1)
    ens = root if isinstance(root, (Ensemble, HistoryRecords)) else open_ensemble(root)
    chains = list(ens.chains) if chain is None else [int(chain)]
    attrs = ens.attrs
    recs = {c: ens.records(c) for c in chains}
    if not recs or all(len(r["step"]) == 0 for r in recs.values()):
        raise EnsembleError(f"{ens.root}: no committed configurations; nothing to measure")
    first = next(iter(recs.values()))
    cols = [k for k in _FIRST if k in first] + [k for k in first if k not in _FIRST]
    cols = [k for k in cols if k not in BOOKKEEPING and np.asarray(first[k]).dtype.kind in "fiub"]
    out = EnsembleSeries(root=ens.root, attrs=attrs, chains=chains, skip=skip, bin_size=bin_size,
                         rows={c: int(len(r["step"])) for c, r in recs.items()}, steps={}, raw={},
                         observables={}, index={})
    for c, r in recs.items():
        out.steps[c] = np.asarray(r["step"], dtype=np.int64)[skip:]
        mult = np.asarray(r.get("multiplicity", np.ones(0)))
        if mult.size and np.any(mult != 1):
            out.notes.append(f"chain {c}: {int(np.sum(mult != 1))} rows have multiplicity != 1; "
                             "each row is counted once")
    if KIND_COLUMN in first:
        out.kinds = {c: _kind_labels(np.asarray(r[KIND_COLUMN]), attrs)[skip:] for c, r in recs.items()}
    short = [c for c in chains if out.rows[c] - skip < 2 * bin_size]
    if short:
        out.notes.append(f"chain{'s' if len(short) > 1 else ''} {', '.join(map(str, short))}: fewer than "
                         f"2 values after --skip {skip} and --bin {bin_size} "
                         f"({', '.join(str(out.rows[c]) for c in short)} stored rows); left out")
    # a column with several values per row (shape (rows, m)) is analysed as m columns "name[j]"
    parts: list[tuple[str, str, int | None]] = []
    for k in cols:
        nd = np.asarray(first[k]).ndim
        if nd == 1:
            parts.append((_DISPLAY.get(k, k), k, None))
        elif nd == 2:
            parts += [(f"{k}[{j}]", k, j) for j in range(np.asarray(first[k]).shape[1])]
        else:
            out.omitted[k] = f"{nd - 1}-dimensional values per row: not analysed"
    for name, k, j in parts:
        raw: dict[int, np.ndarray] = {}
        obs: dict[int, np.ndarray] = {}
        idx: dict[int, np.ndarray] = {}
        n_bad = n_all = 0
        for c, r in recs.items():
            x = np.asarray(r[k], dtype=np.float64)
            x = (x if j is None else x[:, j])[skip:]
            good = np.isfinite(x)
            n_bad += int(x.size - good.sum())
            n_all += int(x.size)
            raw[c] = x
            xs, st = x[good], out.steps[c][good]
            b = _bin(xs, bin_size)
            if b.size >= 2:
                obs[c] = b
                idx[c] = st[: b.size * bin_size: bin_size]
        if n_all and n_bad == n_all:
            out.omitted[name] = "no finite values (not recorded by this algorithm)"
            continue
        if n_bad:
            out.notes.append(f"{name}: {n_bad} of {n_all} rows after the cut are not finite (not recorded "
                             "for those steps) and left out")
        out.raw[name] = raw
        if obs:
            out.observables[name] = obs
            out.index[name] = idx
    if not out.observables:
        raise EnsembleError(f"{ens.root}: fewer than 2 values per chain after --skip {skip} and --bin "
                            f"{bin_size} (stored rows per chain: {', '.join(map(str, out.rows.values()))}); "
                            "nothing to measure")
    return out


# ---- statistics -----------------------------------------------------------------------------
def _gamma(series: Sequence[np.ndarray], S: float, bias_correction: bool) -> GammaResult:
    with warnings.catch_warnings():  # what went wrong is in the flags, reported as warnings
        warnings.simplefilter("ignore", RuntimeWarning)
        return gamma_method(list(series) if len(series) > 1 else series[0], S=S,
                            bias_correction=bias_correction)


def _entry(g: GammaResult) -> dict[str, Any]:
    """One strict-JSON statistics entry; what cannot be given is null with a note."""
    e: dict[str, Any] = {"mean": g.mean, "error": g.error, "tau_int": g.tau_int,
                         "tau_int_error": g.tau_int_error, "window": g.window, "n": g.n,
                         "flags": list(g.flags)}
    if "constant" in g.flags:
        e.update(error=None, tau_int=None, tau_int_error=None, window=None, note=FLAGS["constant"])
    elif "nonpositive_sum" in g.flags:
        e.update(tau_int=None, tau_int_error=None, window=None, note=FLAGS["nonpositive_sum"])
    elif "window_limit" in g.flags:
        e["note"] = FLAGS["window_limit"]
    if e["tau_int"] is not None and g.n < SHORT_CHAIN_TAUS * max(g.tau_int, 0.5):
        e["flags"].append("short")
    for k in ("mean", "error", "tau_int", "tau_int_error"):
        if e[k] is not None and not math.isfinite(e[k]):  # cannot happen for finite input
            e[k] = None
            e.setdefault("note", f"{k} is not finite")
    return e


def _stats(per_chain: dict[int, np.ndarray], S: float, bc: bool) -> dict[str, Any]:
    chains = sorted(per_chain)
    e = _entry(_gamma([per_chain[c] for c in chains], S, bc))
    e["chains"] = {str(c): _entry(_gamma([per_chain[c]], S, bc)) for c in chains}
    if len(chains) > 1:
        e["chain_consistency"] = _consistency(e["mean"], [e["chains"][str(c)] for c in chains])
    return e


def _consistency(mean: float, entries: list[dict[str, Any]]) -> dict[str, Any]:
    """``chi^2 = sum_c (m_c - m)^2 / err_c^2`` of the chain means about the combined mean,
    ``dof = n_chains - 1``, and its p-value (chains with an error only)."""
    from hpcflow.analysis.topology import chi2_sf

    use = [x for x in entries if x["error"] is not None and x["error"] > 0]
    if len(use) < 2:
        return {"chi2": None, "dof": None, "p": None, "note": "fewer than 2 chains with an error"}
    chi2 = float(sum((x["mean"] - mean) ** 2 / x["error"] ** 2 for x in use))
    dof = len(use) - 1
    return {"chi2": chi2, "dof": dof, "p": float(chi2_sf(chi2, dof))}


def _ess_entry(per_chain_logw: dict[int, np.ndarray], S: float, bc: bool) -> dict[str, Any] | None:
    """ESS per proposal of the flow, ``ESS/N = (E_q w)^2 / E_q w^2 = 1 / (E_p[w] E_p[1/w])``,
    estimated from the chain states (distributed as ``p``) and their ``log w``: with ``w = Z p/q``,
    ``E_q w = Z``, ``E_q w^2 = Z E_p w`` and ``E_p[1/w] = 1/Z``. Error by the Gamma method of
    the derived quantity (chains as replicas)."""
    chains = sorted(per_chain_logw)
    if not chains:
        return None

    def one(cs: list[int]) -> dict[str, Any]:
        lw = [per_chain_logw[c] for c in cs]
        allw = np.concatenate(lw)
        if np.ptp(allw) == 0.0:
            return {"mean": 1.0, "error": None, "tau_int": None, "tau_int_error": None, "window": None,
                    "n": int(allw.size), "flags": ["constant"], "note": FLAGS["constant"]}
        mid = 0.5 * (float(allw.max()) + float(allw.min()))
        if np.ptp(allw) > 1200.0:  # w or 1/w would overflow: the estimate only, from logs
            from hpcflow.analysis.reweighting import logsumexp

            val = math.exp(2 * math.log(allw.size) - logsumexp(allw - mid) - logsumexp(mid - allw))
            return {"mean": val, "error": None, "tau_int": None, "tau_int_error": None, "window": None,
                    "n": int(allw.size), "flags": [],
                    "note": "log w spans more than 1200: value from log-sums, no error"}
        w = [np.exp(x - mid) for x in lw]
        iw = [np.exp(mid - x) for x in lw]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            g = gamma_method_derived([w if len(w) > 1 else w[0], iw if len(iw) > 1 else iw[0]],
                                     lambda a, b: 1.0 / (a * b),
                                     lambda a, b: (-1.0 / (a * a * b), -1.0 / (a * b * b)),
                                     S=S, bias_correction=bc)
        return _entry(g)

    e = one(chains)
    e["chains"] = {str(c): one([c]) for c in chains}
    e["method"] = ("1 / (<w> <1/w>) over the chain states (distributed as p), = (E_q w)^2 / E_q w^2 "
                   "of the flow's proposals")
    return e


def _proposal_weights(ser: EnsembleSeries) -> dict[str, Any] | None:
    """The flow proposals' weight summary that ``hpcflow sample`` keeps in its chain
    checkpoints (``<output.dir>/checkpoints/chainCCC.ckpt`` beside ``<output.dir>/ensemble``;
    :class:`hpcflow.analysis.reweighting.WeightStats`): per chain and pooled ``{n, ess,
    ess_lognormal, max_weight}``, from the proposals of every step up to the checkpoint. Only
    chains whose checkpoint matches the committed rows are used; None when there are none."""
    from hpcflow.analysis.reweighting import WeightStats
    from hpcflow.io.checkpoint import CheckpointError, load_checkpoint

    ckdir = os.path.join(os.path.dirname(os.path.abspath(ser.root)), "checkpoints")
    per: dict[str, Any] = {}
    pooled = WeightStats()
    for c in ser.chains:
        path = os.path.join(ckdir, f"chain{c:03d}.ckpt")
        if not os.path.exists(path):
            continue
        try:
            st = load_checkpoint(path)
        except CheckpointError:
            continue
        d = st.get("proposal_weights")
        if not d or int(st.get("n_rows", -1)) != ser.rows.get(c):
            continue
        ws = WeightStats.from_dict(d)
        if ws.n == 0:
            continue
        pooled = pooled.merge(ws)
        per[str(c)] = {"n": ws.n, "ess": ws.ess, "ess_lognormal": ws.ess_lognormal, "max_weight": ws.max_weight}
    if not per:
        return None
    return {"n": pooled.n, "ess": pooled.ess, "ess_lognormal": pooled.ess_lognormal,
            "max_weight": pooled.max_weight, "chains": per,
            "method": "every flow proposal of the chains (the sampler's running sums of w, w^2 and log w)"}


def measure_ensemble(root: str | os.PathLike, chain: int | None = None, skip: int = 0, bin_size: int = 1,
                     S: float = 1.5, bias_correction: bool = True,
                     series: EnsembleSeries | None = None) -> dict[str, Any]:
    """The report of ``hpcflow measure`` (strict JSON; :func:`format_table` prints it).

    ``{"ensemble": {path, group, lattice, beta, action, algorithm, chains, rows},
    "analysis": {method, S, bias_correction, skip, bin, units},
    "observables": {name: entry}, "acceptance_by_kind": {kind: entry} (with a ``kind`` column),
    "proposal_ess": entry (rows with finite log w), "proposal_weights": {n, ess, ess_lognormal,
    max_weight, chains} (the sampler's summary of every proposal, when its chain checkpoints are
    beside the ensemble), "omitted": {column: reason},
    "warnings": [line], "notes": [line]}``. An entry is ``{mean, error, tau_int, tau_int_error,
    window, n, flags, [note], chains: {chain: entry}, [chain_consistency: {chi2, dof, p}]}``,
    combined over the chains as replicas; ``n`` counts the analysed values (bins). Gamma method
    (Wolff 2004, S = 1.5) with the bias correction of his eq. (49) by default. ``flags``: the
    codes of :data:`hpcflow.analysis.gamma.FLAGS` and ``short`` (``n < 50 tau_int``).
    ``series``: the :func:`load_series` result to use instead of reading ``root`` again.
    """
    ser = series if series is not None else load_series(root, chain=chain, skip=skip, bin_size=bin_size)
    a = ser.attrs
    lattice = [int(n) for n in np.atleast_1d(a.get("lattice", []))]
    report: dict[str, Any] = {
        "ensemble": {"path": ser.root, "group": a.get("group"), "lattice": lattice,
                     "beta": None if a.get("beta") is None else float(a["beta"]),
                     "action": a.get("action"), "algorithm": a.get("algorithm"),
                     "chains": ser.chains, "rows": {str(c): n for c, n in ser.rows.items()}},
        "analysis": {"method": "Gamma method (Wolff 2004, hep-lat/0306017), chains as replicas",
                     "S": float(S), "bias_correction": bool(bias_correction), "skip": ser.skip,
                     "bin": ser.bin_size,
                     "units": "tau_int and window in units of the analysed values: "
                              + ("stored rows" if ser.bin_size == 1 else f"bins of {ser.bin_size} stored rows")},
        "observables": {name: _stats(per, S, bias_correction) for name, per in ser.observables.items()},
    }
    if ser.kinds is not None and "acceptance" in ser.raw:
        by_kind: dict[str, Any] = {}
        labels = sorted({str(k) for c in ser.chains for k in ser.kinds[c]})
        for kind in labels:
            per = {}
            for c in ser.chains:
                x = ser.raw["acceptance"][c][ser.kinds[c] == kind]
                b = _bin(x[np.isfinite(x)], ser.bin_size)
                if b.size >= 2:
                    per[c] = b
            if per:
                by_kind[kind] = _stats(per, S, bias_correction)
        report["acceptance_by_kind"] = by_kind
    if "log_w" in ser.observables and a.get("algorithm") in ("flow", "mixed"):
        # per state, not binned: the ESS is a nonlinear function of the states' weights
        lw = {c: x[np.isfinite(x)] for c, x in ser.raw["log_w"].items()}
        ess = _ess_entry({c: x for c, x in lw.items() if x.size >= 2}, S, bias_correction)
        if ess is not None:
            report["proposal_ess"] = ess
        pw = _proposal_weights(ser)
        if pw is not None:
            report["proposal_weights"] = pw
    report["omitted"] = dict(ser.omitted)
    report["warnings"] = _warnings(report, ser)
    report["notes"] = list(ser.notes) + _notes(report, ser)
    return report


def _warnings(report: dict[str, Any], ser: EnsembleSeries) -> list[str]:
    out: list[str] = []
    units = "values" if ser.bin_size == 1 else "bins"

    def check(label: str, e: dict[str, Any]) -> None:
        flags = e.get("flags", [])
        tail = []
        if "window_limit" in flags:
            tail.append("the window search hit its limit W_max = N/2: tau_int and the error are lower bounds")
        if "nonpositive_sum" in flags:
            tail.append("the autocorrelation sum went negative: the naive error is shown, tau_int is not known")
        if "short" in flags:
            tail.append(f"N = {e['n']} {units} < {SHORT_CHAIN_TAUS} tau_int = "
                        f"{SHORT_CHAIN_TAUS * max(e['tau_int'], 0.5):.0f}: the error and tau_int are unreliable")
        if tail:
            out.append(f"{label}: " + "; ".join(tail))

    def each(name: str, e: dict[str, Any]) -> None:
        check(f"{name} (all chains)" if len(e["chains"]) > 1 else name, e)
        if len(e["chains"]) > 1:
            for c, ec in e["chains"].items():
                check(f"{name} chain {c}", ec)
            cc = e.get("chain_consistency") or {}
            if cc.get("p") is not None and cc["p"] < CHAIN_P_MIN:
                out.append(f"{name}: the chains disagree (chi2 = {cc['chi2']:.1f} for {cc['dof']} dof, "
                           f"p = {cc['p']:.1e}): a chain is not thermalised (--skip) or the errors are "
                           "underestimated")

    for name, e in report["observables"].items():
        each(name, e)
    for kind, e in report.get("acceptance_by_kind", {}).items():
        each(f"acceptance[{kind}]", e)
    algo = report["ensemble"]["algorithm"]
    acc = report["observables"].get("acceptance")
    if algo == "flow" and acc is not None:
        from hpcflow.analysis.reweighting import MIN_EFFECTIVE

        n_acc = int(round(sum(float(np.nansum(x)) for x in ser.raw.get("acceptance", {}).values())))
        if "acceptance" in ser.raw and n_acc < MIN_EFFECTIVE:
            out.append(f"only {n_acc} accepted proposals in the analysed rows: the chains visited at most "
                       f"{n_acc + len(ser.chains)} distinct configurations (< {MIN_EFFECTIVE}); every estimate "
                       "rests on them whatever its error (a stuck chain also hides its autocorrelation)")
        if acc["mean"] < LOW_FLOW_QUALITY:
            out.append(f"flow acceptance {acc['mean']:.3g} < {LOW_FLOW_QUALITY}: the importance weights are "
                       "heavy-tailed and the chain sticks; errors and tau_int of every observable cannot be "
                       "trusted (train the flow longer)")
    if algo == "mixed":
        flow = report.get("acceptance_by_kind", {}).get("flow")
        if flow is not None and flow["mean"] < LOW_FLOW_QUALITY:
            out.append(f"flow-step acceptance {flow['mean']:.3g} < {LOW_FLOW_QUALITY}: the flow proposals are "
                       "hardly ever accepted; the chain moves by its local steps only")
        if "acceptance_by_kind" not in report and acc is not None:
            out.append("mixed chain without a 'kind' column: 'acceptance' averages the flow steps with the "
                       "always-accepted local steps and is not the flow acceptance")
    pw = report.get("proposal_weights")
    if pw is not None:
        from hpcflow.analysis.reweighting import HEAVY_WEIGHT, MIN_EFFECTIVE

        n_eff = pw["n"] * min(pw["ess"], pw["ess_lognormal"])
        if n_eff < MIN_EFFECTIVE or pw["max_weight"] > HEAVY_WEIGHT:
            out.append(f"flow proposals: {n_eff:.1f} effective of {pw['n']} (ESS per proposal {pw['ess']:.3g}, "
                       f"log-normal estimate {pw['ess_lognormal']:.3g}), largest normalised weight "
                       f"{pw['max_weight']:.3g}: heavy-tailed importance weights")
    ess = report.get("proposal_ess")
    if ess is not None and ess["mean"] < LOW_FLOW_QUALITY:
        out.append(f"ESS per proposal {ess['mean']:.3g} < {LOW_FLOW_QUALITY} (estimated from the chain states): "
                   "heavy-tailed importance weights; errors from such a chain cannot be trusted")
    return out


def _notes(report: dict[str, Any], ser: EnsembleSeries) -> list[str]:
    out = []
    if "proposal_ess" in report:
        out.append("ESS/proposal (est.): estimated from the chain states' log w as 1/(<w> <1/w>) = "
                   "(E_q w)^2 / E_q w^2; too high when the flow puts weight where the chain never goes"
                   + ("" if "proposal_weights" in report else
                      "; the largest normalised proposal weight is not known (no chain checkpoints beside "
                      "the ensemble)"))
    pw = report.get("proposal_weights")
    if pw is not None:
        out.append(f"flow proposals (every proposal, from the chain checkpoints): {pw['n']}, ESS per proposal "
                   f"{pw['ess']:.3g} (log-normal estimate {pw['ess_lognormal']:.3g}), largest normalised weight "
                   f"{pw['max_weight']:.3g}")
    for name, why in report["omitted"].items():
        out.append(f"{name}: {why}")
    return out


# ---- text output ---------------------------------------------------------------------------
def format_value(mean: float | None, error: float | None, digits: int = 2) -> str:
    """``mean`` rounded to ``error`` with ``digits`` significant digits of the error in
    parentheses: ``0.6988(19)``, ``1.23(12)``, ``12.3(1.4)``, ``1230(160)``; scientific below
    1e-4 or from 1e6: ``1.23(45)e-07``. No error: 6 significant digits."""
    if mean is None or not math.isfinite(mean):
        return "-"
    if error is None or not math.isfinite(error) or error <= 0:
        return f"{mean:.6g}"
    scale = max(abs(mean), error)
    if scale != 0 and (scale < 1e-4 or scale >= 1e6):
        e10 = math.floor(math.log10(scale))
        return format_value(mean / 10 ** e10, error / 10 ** e10, digits) + f"e{e10:+03d}"
    dec = digits - 1 - math.floor(math.log10(error))
    err_r = round(error, dec)
    if err_r >= 10 ** (digits - dec):  # 0.0996 -> 0.10: one digit fewer
        dec -= 1
        err_r = round(error, dec)
    if dec > 0:
        err_digits = round(err_r * 10 ** dec)
        if err_r >= 1:  # the error reaches the integer part: write it out, 12.3(1.4)
            return f"{mean:.{dec}f}({err_r:.{dec}f})"
        return f"{mean:.{dec}f}({err_digits})"
    q = 10 ** (-dec)
    return f"{round(mean / q) * q:.0f}({round(err_r / q) * q:.0f})"


def _tau(e: dict[str, Any]) -> str:
    if e.get("tau_int") is None:
        return "-"
    return format_value(e["tau_int"], e["tau_int_error"] or None, digits=1)


def format_table(report: dict[str, Any]) -> str:
    """The report as text: header, one line per observable and chain (``all`` = combined; the
    chain lines only with several chains), values rounded to their errors, then warnings."""
    ens, an = report["ensemble"], report["analysis"]
    lat = "x".join(map(str, ens["lattice"]))
    beta = "?" if ens["beta"] is None else f"{ens['beta']:g}"
    rows = ens["rows"]
    lines = [f"ensemble {ens['path']}",
             f"{ens['group']} {lat}, beta {beta}, {ens['action']} action, {ens['algorithm']}; "
             f"{len(ens['chains'])} chain{'s' if len(ens['chains']) != 1 else ''}, "
             f"{sum(rows.values())} stored rows"
             + (f" ({', '.join(map(str, rows.values()))})" if len(rows) > 1 else ""),
             f"Gamma method, S = {an['S']:g}, {'with' if an['bias_correction'] else 'without'} bias correction; "
             f"--skip {an['skip']} rows per chain, --bin {an['bin']}; tau_int in units of "
             + ("stored rows" if an["bin"] == 1 else f"bins of {an['bin']} rows"),
             ""]
    head = f"{'observable':<22} {'chain':>5}  {'value':<22} {'tau_int':<10} {'N':>8}"
    lines += [head, "-" * len(head)]

    def put(name: str, e: dict[str, Any]) -> None:
        several = len(e.get("chains", {})) > 1
        rows_ = [("all", e)] + (list(e["chains"].items()) if several else [])
        for k, (c, x) in enumerate(rows_):
            val = format_value(x["mean"], x["error"])
            if x["error"] is None:
                val += " (constant)" if "constant" in x.get("flags", []) else " (no error)"
            elif "nonpositive_sum" in x.get("flags", []):
                val += " naive"
            mark = " !" if {"short", "window_limit", "nonpositive_sum"} & set(x.get("flags", [])) else ""
            lines.append(f"{name if k == 0 else '':<22} {c:>5}  {val:<22} {_tau(x) + mark:<10} {x['n']:>8}")

    for name, e in report["observables"].items():
        put(name, e)
    for kind, e in report.get("acceptance_by_kind", {}).items():
        put(f"acceptance[{kind}]", e)
    if "proposal_ess" in report:
        put("ESS/proposal (est.)", report["proposal_ess"])
    if report.get("warnings"):
        lines += ["", "warnings (! in the table):"] + [f"  * {w}" for w in report["warnings"]]
    if report.get("notes"):
        lines += ["", "notes:"] + [f"  * {n}" for n in report["notes"]]
    return "\n".join(lines)


# ---- pyerrors ------------------------------------------------------------------------------
def _pyerrors() -> Any:
    try:
        import pyerrors  # type: ignore[import-untyped]
    except ImportError:
        raise EnsembleError("--pyerrors needs the optional package pyerrors: pip install pyerrors") from None
    return pyerrors


def _ensemble_name(root: str) -> str:
    path = os.path.abspath(root).rstrip(os.sep)
    base = os.path.basename(path)
    if base == "ensemble":
        base = os.path.basename(os.path.dirname(path)) or base
    return base.replace("|", "_") or "ensemble"


def export_pyerrors(root: str | os.PathLike, path: str | os.PathLike, chain: int | None = None, skip: int = 0,
                    bin_size: int = 1, series: EnsembleSeries | None = None) -> str:
    """Write the analysed series (after ``skip`` and ``bin_size``) of every observable as
    pyerrors ``Obs`` through pyerrors' own JSON export (``pyerrors.input.json.dump_dict_to_json``;
    read back with ``pyerrors.input.json.load_json_dict``). Keys: the observable names, and
    ``acceptance[KIND]`` with a ``kind`` column. Each chain is a replica ``NAME|chainCCC`` of
    the ensemble ``NAME`` (the run's folder); configuration numbers are the stored steps of the
    first row of each value. ``path`` must end in ``.json`` or ``.json.gz`` (gzipped);
    written under a temporary name and renamed. Returns the path. pyerrors is optional
    (missing: one-line :class:`EnsembleError`). ``series``: as in :func:`measure_ensemble`."""
    pe = _pyerrors()
    from pyerrors.input.json import dump_dict_to_json  # type: ignore[import-untyped]

    path = os.fspath(path)
    if not (path.endswith(".json") or path.endswith(".json.gz")):
        raise EnsembleError(f"--pyerrors {path}: the file name must end in .json or .json.gz")
    ser = series if series is not None else load_series(root, chain=chain, skip=skip, bin_size=bin_size)
    name = _ensemble_name(ser.root)

    def obs(per: dict[int, np.ndarray], idx: dict[int, np.ndarray]) -> Any:
        cs = sorted(per)
        idl = []
        for c in cs:
            st = [int(s) for s in idx[c]]
            d = st[1] - st[0] if len(st) > 1 else 1
            regular = d > 0 and all(b - a == d for a, b in zip(st, st[1:]))
            idl.append(range(st[0], st[-1] + d, d) if regular else st)
        return pe.Obs([per[c] for c in cs], [f"{name}|chain{c:03d}" for c in cs], idl=idl)

    od: dict[str, Any] = {k: obs(per, ser.index[k]) for k, per in ser.observables.items()}
    if ser.kinds is not None and "acceptance" in ser.raw:
        for kind in sorted({str(k) for c in ser.chains for k in ser.kinds[c]}):
            per, idx = {}, {}
            for c in ser.chains:
                sel = (ser.kinds[c] == kind) & np.isfinite(ser.raw["acceptance"][c])
                b = _bin(ser.raw["acceptance"][c][sel], ser.bin_size)
                if b.size >= 2:
                    per[c] = b
                    idx[c] = ser.steps[c][sel][: b.size * ser.bin_size: ser.bin_size]
            if per:
                od[f"acceptance[{kind}]"] = obs(per, idx)
    a = ser.attrs
    desc = {"hpcflow": "hpcflow measure --pyerrors", "ensemble": ser.root, "group": a.get("group"),
            "lattice": [int(n) for n in np.atleast_1d(a.get("lattice", []))],
            "beta": None if a.get("beta") is None else float(a["beta"]), "algorithm": a.get("algorithm"),
            "skip": ser.skip, "bin": ser.bin_size,
            "values": "per chain (replica): the stored rows after --skip, averaged in bins of --bin rows"}
    folder = os.path.dirname(os.path.abspath(path))
    gz = path.endswith(".gz")
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}" + (".json.gz" if gz else ".json"))
    try:
        dump_dict_to_json(od, tmp, description=desc, gz=gz)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
