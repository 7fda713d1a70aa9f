"""bench/topo_chains.py (long resumable U(1) chains of the topological charge) and
bench/topo_analyse.py: a killed and resumed chain gives bit for bit the series of an
uninterrupted one; every step equals the library's own update (torch path: ``HMC.trajectory``,
``heatbath_or_sweep``) and the stored Q / plaquette equal ``topological_charge_u1_2d`` /
``average_plaquette`` on the same configurations. Small lattices, a second or two in all.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hpcflow.lattice.action import average_plaquette
from hpcflow.lattice.geometry import Lattice
from hpcflow.lattice.observables import topological_charge_u1_2d
from hpcflow.sampling.heatbath import heatbath_or_sweep, heatbath_sweep
from hpcflow.sampling.hmc import HMC

ROOT = Path(__file__).resolve().parents[2]


def _load(name: str):  # type: ignore[no-untyped-def]
    if name in sys.modules:
        return sys.modules[name]
    sys.path.insert(0, str(ROOT / "bench"))  # topo_analyse imports topo_chains
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


tc = _load("topo_chains")

SMALL = {"n_therm": 100, "tune_block": 50, "verify_steps": 200}


def _cfg(algo: str, beta: float = 2.0, L: int = 8, chain: int = 0, **kw):  # type: ignore[no-untyped-def]
    return tc.ChainConfig(algo=algo, beta=beta, L=L, seed=5, chain=chain, n_chains=2,
                          **{**SMALL, "tau": 1.0, **kw})


def _series(d: Path) -> dict:
    s = tc.load_series(d)
    return {k: s[k] for k in ("q", "plaq", "acc", "dH") if k in s}


@pytest.mark.parametrize("algo", tc.ALGOS)
def test_resume_after_kill_gives_the_uninterrupted_series(tmp_path, algo):
    n, every = 700, 128
    ref = tc.chain_dir(tmp_path / "a", algo, 2.0, 8, 0)
    tc.Chain(_cfg(algo), ref, log=lambda s: None).run(n, resume=False, checkpoint_every_steps=every)

    d = tc.chain_dir(tmp_path / "b", algo, 2.0, 8, 0)
    with pytest.raises(tc.SimulatedKill):  # killed after 300 steps: 256 committed
        tc.Chain(_cfg(algo), d, log=lambda s: None).run(n, resume=False, checkpoint_every_steps=every,
                                                        abort_after=300)
    assert tc.load_series(d)["n"] == 256
    # a chunk written after the last committed state (killed between chunk and state): dropped
    (d / "chunk_0000000256.npz").write_bytes(b"partial")
    with pytest.raises(SystemExit, match="--resume"):
        tc.Chain(_cfg(algo), d, log=lambda s: None).run(n, resume=False)
    with pytest.raises(SystemExit, match="other settings"):
        tc.Chain(_cfg(algo, n_therm=99), d, log=lambda s: None).run(n, resume=True)
    # resumed in two more pieces (checkpoint every 100), then extended to the full length
    tc.Chain(_cfg(algo), d, log=lambda s: None).run(500, resume=True, checkpoint_every_steps=100)
    res = tc.Chain(_cfg(algo), d, log=lambda s: None).run(n, resume=True, checkpoint_every_steps=every)
    assert res["n_new"] == 200

    a, b = _series(ref), _series(d)
    assert a.keys() == b.keys() and a["q"].size == n
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
    assert np.array_equal(tc.load_field(ref), tc.load_field(d))
    assert tc.Chain(_cfg(algo), d, log=lambda s: None).run(n, resume=True)["n_new"] == 0

    meta = json.loads((d / "meta.json").read_text())
    assert meta["complete"] and meta["n_steps_done"] == n and meta["segments"] == 4
    assert meta["algo"] == algo and meta["start"] == "cold" and meta["cpu_s_per_step"] > 0
    assert meta["n_tunnel"] == int(np.count_nonzero(np.diff(a["q"]))) > 10
    if algo.startswith("hmc"):
        assert 0.75 < meta["acceptance"] < 0.95 and meta["eps"] > 0 and meta["n_md"] >= 1
        assert meta["acceptance_tuning"] is not None
    if algo == "hmc":
        assert meta["n_md"] == 5
    if algo == "hmc-long":
        assert meta["tau"] == 1.0 and meta["n_md"] * meta["eps"] == pytest.approx(1.0)
    # the chains are independent per chain index
    other = tc.chain_dir(tmp_path / "a", algo, 2.0, 8, 1)
    tc.Chain(_cfg(algo, chain=1), other, log=lambda s: None).run(200, resume=False)
    assert not np.array_equal(_series(other)["plaq"], a["plaq"][:200])


@pytest.mark.parametrize("algo", tc.ALGOS)
def test_steps_and_q_match_the_library(tmp_path, algo):
    """Each step of the runner equals the library's update on the same configuration (its
    default torch path, an independent implementation; to rounding), and the stored integer Q
    and plaquette equal topological_charge_u1_2d / average_plaquette of the same fields."""
    L, beta, n = 8, 2.0, 60
    lat = Lattice((L, L))  # backend "torch"
    ch = tc.Chain(_cfg(algo, start="hot"), tmp_path, log=lambda s: None)
    ch.thermalise()
    st = ch.st
    q, plaq = np.zeros(n, np.int16), np.zeros(n)
    acc, dH = np.zeros(n, np.uint8), np.zeros(n, np.float32)
    hmc = HMC(lat, "u1", beta, st.n_md, st.tau, "leapfrog", ch.rng) if algo.startswith("hmc") else None
    q_lib = []
    for i in range(n):
        step = st.step_base + i
        U0 = torch.from_numpy(ch.A.copy()).reshape(2, L, L, 1, 1)
        ch._run_block(1, i, q, plaq, acc, dH, step)
        U1 = torch.from_numpy(ch.A.copy()).reshape(2, L, L, 1, 1)
        if hmc is not None:
            ref, a, d = hmc.trajectory(U0, step)
            assert bool(a) == bool(acc[i]) and float(d) == pytest.approx(float(dH[i]), abs=1e-5)
        elif algo == "heatbath":
            ref = heatbath_sweep(U0, lat, "u1", beta, ch.rng, step)
        else:
            ref = heatbath_or_sweep(U0, lat, "u1", beta, ch.rng, step, n_or=1)
        assert float((ref - U1).abs().max()) < 1e-10
        ql = float(topological_charge_u1_2d(U1, lat))
        assert abs(ql - round(ql)) < 1e-9
        q_lib.append(round(ql))
        assert plaq[i] == pytest.approx(float(average_plaquette(U1, lat)), abs=1e-13)
    assert q.tolist() == q_lib
    assert len(set(q_lib)) > 1  # Q moved: the comparison is not vacuous
    if hmc is not None:
        assert 0 < acc.sum() < n or acc.all()


def test_measure_charge_of_a_unit_instanton():
    """A field with constant field strength 2 pi / V on every plaquette has Q = 1 (and
    -1 for the conjugate field), as topological_charge_u1_2d says."""
    L = 6
    a = 2 * np.pi / L**2
    x0, x1 = np.meshgrid(np.arange(L), np.arange(L), indexing="ij")
    th0 = np.where(x0 == L - 1, -a * L * x1, 0.0)
    th1 = a * x0
    U = np.exp(1j * np.stack([th0, th1]))
    for sign in (1, -1):
        V = U if sign == 1 else U.conj().copy()
        q, p = tc.Measure(L)(V)
        Vt = torch.from_numpy(V).reshape(2, L, L, 1, 1)
        assert q == pytest.approx(sign, abs=1e-12)
        assert q == pytest.approx(float(topological_charge_u1_2d(Vt, Lattice((L, L)))), abs=1e-12)
        assert p == pytest.approx(np.cos(a), abs=1e-14)
        assert tc.geometric_charge(V) == pytest.approx(sign, abs=1e-12)


def test_analysis_flags_and_table(tmp_path):
    ta = _load("topo_analyse")
    for algo in ("heatbath", "hmc"):
        for c in range(2):
            tc.Chain(_cfg(algo, beta=6.0, chain=c), tc.chain_dir(tmp_path, algo, 6.0, 8, c),
                     log=lambda s: None).run(400, resume=False)
    assert ta.main([str(tmp_path)]) == 0
    rows = {r["algo"]: r for r in json.loads((tmp_path / "topo_analysis.json").read_text())["rows"]}
    for algo, r in rows.items():
        assert r["n_chains"] == 2 and r["n_per_chain"] == [400, 400]
        # 400 steps at beta 6 on 8x8: far too short, the tau estimate must be flagged
        assert "short" in r["flags"] or "few-tunnel" in r["flags"], (algo, r["flags"])
        assert r["tau_Q_lower_bound"]
        assert r["Q2_exact"] > 0 and r["cpu_s_per_step"] > 0
    assert 0.75 < rows["hmc"]["acceptance"] < 0.95
