"""Issue 19 item 2: per-configuration observables in the ensemble rows and the run history.

Every stored observable is checked against an independent computation: the rows against the
observables recomputed from the stored links, the run history (run == sample, new columns
included), the 4D energy densities against direct formulas, t0/w0 against curves with known
crossings, the `kind` column of mixed chains, and the measurement-cost default by counting
Wilson-flow steps (never by timing)."""

from __future__ import annotations

import json
import math
import os
import shutil

import numpy as np
import pytest
import torch

from hpcflow.config import config_from_dict
from hpcflow.io import open_ensemble
from hpcflow.lattice import observables as obs
from hpcflow.lattice.geometry import Lattice
from hpcflow.lattice.groups import cold_field, get_group, random_field
from hpcflow.rng import CounterRNG
from hpcflow.run.driver import run
from hpcflow.run.measurements import Measurer, auto_flow_every, flow_steps
from hpcflow.run.sample import EXIT_OK, ensemble_dir, sample


def _cfg(out, **over):  # type: ignore[no-untyped-def]
    d = {"lattice": {"shape": [8, 8]}, "group": "u1", "algorithm": "heatbath", "seed": 7,
         "action": {"beta": 2.0}, "heatbath": {"n_overrelax": 1},
         "flow": {"n_layers": 2, "hidden": [4], "kernel_size": 3},
         "train": {"steps": 4, "batch": 8, "lr": 0.01, "checkpoint_every": 4},
         "mixed": {"pattern": ["flow", "heatbath", "hmc"]},
         "hmc": {"n_steps": 4, "tau": 0.6},
         "run": {"n_therm": 2, "n_steps": 12, "measure_every": 2, "progress": False, "plots": False},
         "sample": {"n_therm": 2, "n_steps": 12, "batch": 4, "checkpoint_every": 4},
         "measure": {"wilson_loops": [[1, 1], [2, 2], [1, 3]]},
         "output": {"dir": str(out)}}
    for k, v in over.items():
        d[k] = {**d[k], **v} if isinstance(v, dict) and isinstance(d.get(k), dict) else v
    return config_from_dict(d)


def _history(out) -> list[dict]:  # type: ignore[no-untyped-def]
    with open(os.path.join(out, "history.jsonl"), encoding="utf-8") as fh:
        return [json.loads(x) for x in fh]


def _as_float(v):  # type: ignore[no-untyped-def]
    return np.asarray([math.nan if x is None else x for x in v] if isinstance(v, list) else
                      (math.nan if v is None else v), dtype=np.float64)


def _run_equals_sample(tmp_path, cfg_of, algorithm_flow: bool = False):  # type: ignore[no-untyped-def]
    a, b = tmp_path / "run", tmp_path / "sample"
    assert run(cfg_of(a)).exit_code == EXIT_OK
    if algorithm_flow:
        os.makedirs(b / "train")
        shutil.copy(a / "train" / "checkpoint.pt", b / "train" / "checkpoint.pt")
    assert sample(cfg_of(b), use_mpi=False) == EXIT_OK
    hist = _history(a)
    rec = open_ensemble(ensemble_dir(cfg_of(b))).records(0)
    assert [h["step"] for h in hist] == list(rec["step"])
    skip = {"step", "kind", "accepted", "S", "logq", "logw", "dH", "exp_mdH"}
    keys = set(hist[0]) - skip
    assert keys <= set(rec), keys - set(rec)
    for k in keys:
        got = np.stack([_as_float(h[k]) for h in hist])
        np.testing.assert_allclose(got, rec[k], rtol=1e-12, atol=1e-14, equal_nan=True, err_msg=k)
    return hist, rec


def test_u1_rows_match_links_and_run(tmp_path) -> None:
    """2D U(1): kind, W_RxT, |P|, Q (an integer), Q2 per row; equal to the observables of the
    stored links and to `hpcflow run`'s history."""
    hist, rec = _run_equals_sample(tmp_path, _cfg)
    assert list(rec["kind"]) == [b"heatbath"] * 6
    for k in ("W_1x1", "W_2x2", "W_1x3", "polyakov_abs", "Q", "Q2"):
        assert k in rec and np.all(np.isfinite(rec[k]))
    np.testing.assert_allclose(rec["W_1x1"], rec["plaquette"], rtol=1e-13)
    ens = open_ensemble(ensemble_dir(_cfg(tmp_path / "sample")))
    lat = Lattice((8, 8))
    for i in range(len(rec["step"])):
        U = ens.config(0, i)
        assert float(obs.topological_charge_u1_2d(U, lat)) == pytest.approx(rec["Q"][i], abs=1e-12)
        assert abs(rec["Q"][i] - round(rec["Q"][i])) < 1e-9 and rec["Q2"][i] == rec["Q"][i] ** 2
        assert float(obs.wilson_loop(U, lat, 2, 2)) == pytest.approx(rec["W_2x2"][i], abs=1e-13)
        assert float(obs.wilson_loop(U, lat, 1, 3)) == pytest.approx(rec["W_1x3"][i], abs=1e-13)
        assert abs(complex(obs.polyakov_loop(U, lat))) == pytest.approx(rec["polyakov_abs"][i], abs=1e-13)


def test_mixed_chain_kind_column(tmp_path) -> None:
    """Mixed chains store the kind of step of every row (the pattern), and run == sample."""
    hist, rec = _run_equals_sample(tmp_path, lambda o: _cfg(o, algorithm="mixed", measure={"wilson_loops": [[1, 1]]}),
                                   algorithm_flow=True)
    want = [("flow", "heatbath", "hmc")[(s - 1) % 3] for s in rec["step"]]
    assert [k.decode() for k in rec["kind"]] == want == [h["kind"] for h in hist]
    from hpcflow.analysis.ensemble import measure_ensemble

    rep = measure_ensemble(ensemble_dir(_cfg(tmp_path / "sample")))
    assert set(rep["acceptance_by_kind"]) == {"flow", "heatbath", "hmc"}


def _cfg4(out, **measure):  # type: ignore[no-untyped-def]
    m = {"wilson_loops": [[1, 1], [1, 2]], "flow_time": 0.2, "flow_eps": 0.05, "flow_every": 2, **measure}
    return _cfg(out, lattice={"shape": [4, 4, 4, 4]}, group="su3", action={"beta": 6.0},
                run={"n_therm": 1, "n_steps": 8, "measure_every": 2, "progress": False, "plots": False},
                measure=m)


def test_4d_flowed_rows_equal_run_and_follow_flow_every(tmp_path) -> None:
    """4D SU(3): rows 0, 2 (flow_every 2) carry Q (clover after flow), t^2 E on the grid,
    t0, w0; rows 1, 3 hold NaN there; run's history holds the same (null for NaN)."""
    hist, rec = _run_equals_sample(tmp_path, _cfg4)
    assert rec["t2E_clov"].shape == rec["t2E_plaq"].shape == (4, 4)
    flowed = np.isfinite(rec["Q"])
    np.testing.assert_array_equal(flowed, [True, False, True, False])
    assert np.all(np.isfinite(rec["t2E_clov"][flowed])) and np.all(np.isnan(rec["t2E_clov"][~flowed]))
    ens = open_ensemble(ensemble_dir(_cfg4(tmp_path / "sample")))
    np.testing.assert_allclose(ens.attrs["flow_times"], [0.05, 0.1, 0.15, 0.2])
    lat = Lattice((4, 4, 4, 4))
    U = ens.config(0, 0)
    V = obs.wilson_flow(U, lat, 0.05, 4)
    assert float(obs.topological_charge_clover(V, lat)) == pytest.approx(rec["Q"][0], abs=1e-10)
    assert 0.04 * float(obs.energy_density_clover(V, lat)) == pytest.approx(rec["t2E_clov"][0, -1], rel=1e-10)
    assert 0.04 * float(obs.energy_density_plaquette(V, lat)) == pytest.approx(rec["t2E_plaq"][0, -1], rel=1e-10)
    assert hist[1]["Q"] is None and hist[1]["t2E_clov"] == [None] * 4


def test_cold_field_has_zero_energy_and_no_scale() -> None:
    lat = Lattice((4, 4, 4, 4))
    U = cold_field(lat, get_group("su3"), dtype=torch.complex128)
    assert float(obs.energy_density_clover(U, lat)) == pytest.approx(0.0, abs=1e-14)
    assert float(obs.energy_density_plaquette(U, lat)) == pytest.approx(0.0, abs=1e-14)
    V, ts, ec, ep = obs.flow_energy(U, lat, 0.05, 6, every=2)
    assert ts == pytest.approx([0.1, 0.2, 0.3]) and max(map(abs, ec + ep)) < 1e-14
    assert math.isnan(obs.flow_scale_t0(ts, [t * t * e for t, e in zip(ts, ec)]))
    assert math.isnan(obs.flow_scale_w0(ts, [t * t * e for t, e in zip(ts, ep)]))


def _ta(x: torch.Tensor) -> torch.Tensor:
    a = (x - x.conj().transpose(-1, -2)) / 2
    n = x.shape[-1]
    tr = torch.diagonal(a, dim1=-2, dim2=-1).sum(-1)
    return a - tr[..., None, None] / n * torch.eye(n, dtype=x.dtype)


def test_energy_densities_on_a_random_field_match_direct_formulas() -> None:
    """Clover and plaquette E on a random SU(3) field against a direct torch.roll computation
    (the four leaves written out)."""
    lat = Lattice((4, 4, 4, 4))
    U = random_field(lat, get_group("su3"), CounterRNG(3), step=0, dtype=torch.complex128)

    def sh(f, mu, k):  # noqa: ANN001, ANN202 - f(x + k mu) of a site field (*shape, N, N)
        return torch.roll(f, -k, dims=mu)

    def d(f):  # noqa: ANN001, ANN202
        return f.conj().transpose(-1, -2)

    ec = ep = 0.0
    for mu in range(4):
        for nu in range(mu + 1, 4):
            a, b = U[mu], U[nu]
            p = a @ sh(b, mu, 1) @ d(sh(a, nu, 1)) @ d(b)
            ep += 2 * float((3 - torch.diagonal(p, dim1=-2, dim2=-1).sum(-1).real).sum())
            leaves = (p
                      + b @ d(sh(sh(a, mu, -1), nu, 1)) @ d(sh(b, mu, -1)) @ sh(a, mu, -1)
                      + d(sh(a, mu, -1)) @ d(sh(sh(b, mu, -1), nu, -1)) @ sh(sh(a, mu, -1), nu, -1) @ sh(b, nu, -1)
                      + d(sh(b, nu, -1)) @ sh(a, nu, -1) @ sh(sh(b, mu, 1), nu, -1) @ d(a))
            f = _ta(leaves / 4)
            ec += -float(torch.diagonal(f @ f, dim1=-2, dim2=-1).sum(-1).real.sum())
    assert float(obs.energy_density_clover(U, lat)) == pytest.approx(ec / 256, rel=1e-12)
    assert float(obs.energy_density_plaquette(U, lat)) == pytest.approx(ep / 256, rel=1e-12)


def test_t0_w0_interpolation_of_constructed_curves() -> None:
    ts = [0.05 * j for j in range(1, 21)]
    # linear t^2 E = a t: W = t d/dt (a t) = a t; crossings exact under linear interpolation
    a = 0.75
    assert obs.flow_scale_t0(ts, [a * t for t in ts]) == pytest.approx(0.3 / a, rel=1e-12)
    assert obs.flow_scale_w0(ts, [a * t for t in ts]) == pytest.approx(math.sqrt(0.3 / a), rel=1e-12)
    # quadratic c t^2: t0 = sqrt(0.3/c); W = 2 c t^2 -> w0^2 = sqrt(0.15/c) (grid accuracy)
    c = 1.5
    fine = [0.001 * j for j in range(1, 1001)]
    assert obs.flow_scale_t0(fine, [c * t * t for t in fine]) == pytest.approx(math.sqrt(0.3 / c), rel=1e-4)
    assert obs.flow_scale_w0(fine, [c * t * t for t in fine]) ** 2 == pytest.approx(math.sqrt(0.15 / c), rel=1e-3)
    # not reached: NaN
    assert math.isnan(obs.flow_scale_t0(ts, [0.01 * t for t in ts]))
    assert math.isnan(obs.flow_scale_w0(ts, [0.01 * t for t in ts]))


def _count_flow_steps(monkeypatch) -> list[int]:  # type: ignore[no-untyped-def]
    calls: list[int] = []
    real = obs.wilson_flow

    def counting(u, lat, eps, n_steps, comm=None):  # type: ignore[no-untyped-def]
        calls.append(int(n_steps))
        return real(u, lat, eps, n_steps, comm=comm)

    monkeypatch.setattr(obs, "wilson_flow", counting)
    return calls


def test_flow_every_default_keeps_flow_under_20_percent_of_updates(tmp_path, monkeypatch) -> None:
    """The shipped 4D heat-bath example (measure settings and measure_every as shipped; a
    smaller lattice and chain): Wilson-flow steps <= 20% of the updates, counted."""
    from hpcflow.config import load_config

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cfg = load_config(os.path.join(root, "examples", "su3_4d_heatbath.yaml"),
                      ["lattice.shape=[4,4,4,4]", "run.n_therm=0", "run.n_steps=100", "run.plots=false",
                       "run.progress=false", f"output.dir={tmp_path}"])
    assert cfg.measure.flow_every == 0  # the default: automatic
    n_flow = flow_steps(cfg)
    every = auto_flow_every(n_flow, cfg.run.measure_every)
    calls = _count_flow_steps(monkeypatch)
    assert sample(cfg, use_mpi=False) == EXIT_OK
    updates = cfg.run.n_therm + cfg.run.n_steps
    assert sum(calls) <= 0.2 * updates
    rows = cfg.run.n_steps // cfg.run.measure_every
    assert sum(calls) == n_flow * len(range(0, rows, every))
    rec = open_ensemble(ensemble_dir(cfg)).records(0)
    assert int(np.isfinite(rec["Q"]).sum()) == len(range(0, rows, every))
    # the default 4D settings (flow_time 1, eps 0.02, every configuration stored): 1 in 250
    assert auto_flow_every(50, 1) == 250
    for n, me in ((50, 1), (10, 5), (25, 3), (1, 1)):
        assert n / (auto_flow_every(n, me) * me) <= 0.2 + 1e-12


def test_measurer_flows_every_flow_every_th_configuration(monkeypatch) -> None:
    cfg = _cfg4("/nonexistent", flow_every=3)
    lat = Lattice((4, 4, 4, 4))
    from hpcflow.lattice.geometry import SerialComm

    m = Measurer(cfg, lat, SerialComm())
    calls = _count_flow_steps(monkeypatch)
    U = cold_field(lat, get_group("su3"), dtype=torch.complex128)
    got = [m(U, i) for i in range(7)]
    assert sum(calls) == 3 * 4  # rows 0, 3, 6; 4 flow steps each
    assert [not math.isnan(g["Q"]) for g in got] == [True, False, False, True, False, False, True]


def test_4d_flow_energy_plot(tmp_path) -> None:
    """Issue 19 item 4: the t^2 E(t) curves of a 4D ensemble (plaquette and clover E on the
    stored flow-time grid) are drawn, titled, by write_plots (and hpcflow plot)."""
    from PIL import Image

    from hpcflow.analysis.plots import write_plots

    cfg = _cfg4(tmp_path / "s", flow_every=1)
    assert sample(cfg, use_mpi=False) == EXIT_OK
    paths = write_plots(str(tmp_path / "s"))
    fe = tmp_path / "s" / "plots" / "flow_energy.png"
    assert fe in paths and fe.stat().st_size > 20_000
    with Image.open(fe) as im:
        title = str(im.text.get("Title", ""))  # type: ignore[attr-defined]
    assert title.startswith("Wilson flow t^2 E(t): su3 4x4x4x4, beta 6") and "chain 0" in title, title
