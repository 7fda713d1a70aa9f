"""bench/topo_flow.py (flow + independence-Metropolis chains of Q in the layout of
bench/topo_chains.py) and bench/topo_plot.py.

A tiny U(1) flow is trained for a few steps by ``hpcflow train`` (the driver, in process) on
4x4 at beta 1 (poorly trained: acceptance ~0.15), in float64 so that the chain can be compared
bit for bit with the library's own ``flow_chain``. Checked: resume after a kill gives the
uninterrupted series bit for bit; each step is the library's chain (Q, plaquette, accept flag,
proposal log w); the stored Q is the charge of the accepted configurations by an independent
implementation (``topological_charge_u1_2d`` on the links); the accept flags follow
``log u < log w' - log w`` from the stored log w; rejected steps repeat the state; <Q^2> agrees
with the exact finite-volume value; topo_analyse reads the output; the refusals are one line.
A few seconds in all.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
BETA, L = 1.0, 4


def _load(name: str):  # type: ignore[no-untyped-def]
    if name in sys.modules:
        return sys.modules[name]
    sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


tf = _load("topo_flow")
tc = _load("topo_chains")


def _raw(out: Path, steps: int = 40, **kw) -> dict:  # type: ignore[no-untyped-def]
    raw = {"lattice": {"shape": [L, L]}, "group": "u1", "action": {"beta": BETA}, "algorithm": "flow",
           "precision": "float64", "backend": "auto", "seed": 3,
           "flow": {"n_layers": 2, "kernel": "ncp", "n_components": 2, "hidden": [4], "kernel_size": 3},
           "train": {"steps": steps, "batch": 32, "lr": 0.01, "checkpoint_every": steps, "log_every": steps},
           "run": {"progress": False}, "output": {"dir": str(out)}}
    raw.update(kw)
    return raw


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A finished `hpcflow train` run (config.yaml + train/checkpoint.pt), a few steps."""
    from hpcflow.config import config_from_dict
    from hpcflow.run import driver

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("flow_run")
    assert driver.train(config_from_dict(_raw(out))).exit_code == 0
    assert (out / "config.yaml").is_file() and (out / "train" / "checkpoint.pt").is_file()
    return out


@pytest.fixture(scope="module")
def fm(run_dir):  # type: ignore[no-untyped-def]
    return tf.load_model(run_dir)


def _cfg(fm, chain: int = 0, **kw):  # type: ignore[no-untyped-def]
    base = {"beta": BETA, "L": L, "seed": 5, "chain": chain, "n_chains": 2, "model_sha256": fm.sha256,
            "n_therm": 100, "batch": 64, "backend": fm.backend, "precision": fm.precision}
    return tf.FlowChainConfig(**{**base, **kw})


def _series(d: Path) -> dict:
    s = tc.load_series(d)
    return {k: s[k] for k in ("q", "plaq", "acc", "logw")}


def test_resume_after_kill_gives_the_uninterrupted_series(tmp_path, fm):
    n, every = 700, 128
    ref = tc.chain_dir(tmp_path / "a", "flow", BETA, L, 0)
    tf.FlowChain(fm, _cfg(fm), ref, log=lambda s: None).run(n, resume=False, checkpoint_every_steps=every)

    d = tc.chain_dir(tmp_path / "b", "flow", BETA, L, 0)
    with pytest.raises(tc.SimulatedKill):  # killed after 300 steps: 256 committed (mid-batch)
        tf.FlowChain(fm, _cfg(fm), d, log=lambda s: None).run(n, resume=False, checkpoint_every_steps=every,
                                                              abort_after=300)
    assert tc.load_series(d)["n"] == 256
    (d / "chunk_0000000256.npz").write_bytes(b"partial")  # written after the last state: dropped
    with pytest.raises(SystemExit, match="--resume"):
        tf.FlowChain(fm, _cfg(fm), d, log=lambda s: None).run(n, resume=False)
    with pytest.raises(SystemExit, match="other settings"):
        tf.FlowChain(fm, _cfg(fm, batch=32), d, log=lambda s: None).run(n, resume=True)
    tf.FlowChain(fm, _cfg(fm), d, log=lambda s: None).run(500, resume=True, checkpoint_every_steps=100)
    res = tf.FlowChain(fm, _cfg(fm), d, log=lambda s: None).run(n, resume=True, checkpoint_every_steps=every)
    assert res["n_new"] == 200

    a, b = _series(ref), _series(d)
    assert a["q"].size == n
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
    assert np.array_equal(tf.load_field(ref), tf.load_field(d))
    assert tf.FlowChain(fm, _cfg(fm), d, log=lambda s: None).run(n, resume=True)["n_new"] == 0
    meta = json.loads((d / "meta.json").read_text())
    assert meta["complete"] and meta["n_steps_done"] == n and meta["segments"] == 4
    assert meta["model_sha256"] == fm.sha256 and meta["training_steps"] == 40
    assert meta["arch"]["n_layers"] == 2 and meta["precision"] == "float64"
    assert meta["acceptance"] == pytest.approx(a["acc"].mean()) and meta["cpu_s_per_proposal"] > 0
    assert meta["n_tunnel"] == int(np.count_nonzero(np.diff(a["q"]))) > 10
    assert "git_commit" in meta["provenance"]
    # another chain index: an independent stream
    other = tc.chain_dir(tmp_path / "a", "flow", BETA, L, 1)
    tf.FlowChain(fm, _cfg(fm, chain=1), other, log=lambda s: None).run(200, resume=False)
    assert not np.array_equal(_series(other)["logw"], a["logw"][:200])


def test_cli_resume_equals_one_run(tmp_path, run_dir):
    common = ["--model", str(run_dir), "--chains", "2", "--seed", "9", "--batch", "64", "--therm", "10"]
    assert tf.main(common + ["--n-steps", "400", "--out", str(tmp_path / "one")]) == 0
    assert tf.main(common + ["--n-steps", "150", "--out", str(tmp_path / "two")]) == 0
    assert tf.main(common + ["--n-steps", "400", "--out", str(tmp_path / "two"), "--resume"]) == 0
    for c in range(2):
        a = _series(tc.chain_dir(tmp_path / "one", "flow", BETA, L, c))
        b = _series(tc.chain_dir(tmp_path / "two", "flow", BETA, L, c))
        assert a["q"].size == 400 and all(np.array_equal(a[k], b[k]) for k in a)


def test_chain_is_the_library_chain_and_q_is_the_charge(tmp_path, fm):
    """Every step equals hpcflow.sampling.flow_chains.flow_chain with the chain's CounterRNG
    (proposals n_therm.. of it); accepted configurations have the stored Q by the links'
    charge (lattice.observables); the flags follow the stored log w and the accept uniforms."""
    from hpcflow.flows.u1 import links_from_angles
    from hpcflow.lattice.geometry import Lattice
    from hpcflow.lattice.observables import topological_charge_u1_2d
    from hpcflow.rng import CounterRNG
    from hpcflow.sampling.flow_chains import flow_chain
    from hpcflow.sampling.metropolis import ACCEPT_STEP

    n, cfg = 600, _cfg(fm)
    d = tc.chain_dir(tmp_path, "flow", BETA, L, 0)
    ch = tf.FlowChain(fm, cfg, d, log=lambda s: None)
    ch.run(n, resume=False)
    s, meta = _series(d), json.loads((d / "meta.json").read_text())
    nt = cfg.n_therm
    rng = CounterRNG(meta["chain_seed"], 0)
    lib = flow_chain(fm.model, BETA, nt + n, cfg.batch, rng)
    assert np.array_equal(s["acc"].astype(bool), lib["accepted"][nt:])
    assert np.array_equal(s["logw"], lib["proposal_logw"][nt:])
    assert np.array_equal(s["plaq"], lib["plaquette"][nt:])
    assert np.array_equal(s["q"], np.rint(lib["Q"][nt:]).astype(np.int16))
    assert 0.05 < s["acc"].mean() < 0.6 and len(set(s["q"].tolist())) > 2

    # the accept flags from the stored log w: accept iff log u < log w' - log w
    st = tc.load_series(d)["state"]
    p = torch.arange(nt, nt + n)
    logu = np.log(rng.uniform(p, ACCEPT_STEP, 1)[:, 0].numpy())
    cur = st["start_logw"]
    for i in range(n):
        acc = logu[i] < s["logw"][i] - cur
        assert acc == bool(s["acc"][i]), i
        if acc:
            cur = s["logw"][i]
        elif i:  # rejected: the state (and its Q, plaquette) repeats
            assert s["q"][i] == s["q"][i - 1] and s["plaq"][i] == s["plaq"][i - 1]

    # Q of the accepted proposals, regenerated and measured on the links by an independent code
    lat = Lattice((L, L))
    acc_idx = np.flatnonzero(s["acc"])[:200]
    with torch.inference_mode():
        for first in sorted({(nt + i) // cfg.batch * cfg.batch for i in acc_idx}):
            x, _ = fm.model.sample_counter(rng, first, cfg.batch)
            for i in acc_idx[(nt + acc_idx) // cfg.batch * cfg.batch == first]:
                U = links_from_angles(x[nt + i - first].to(torch.float64))
                qv = float(topological_charge_u1_2d(U, lat))
                assert abs(qv - round(qv)) < 1e-9 and round(qv) == s["q"][i], i
    x_last = torch.from_numpy(tf.load_field(d)).to(torch.float64)
    assert round(float(topological_charge_u1_2d(links_from_angles(x_last), lat))) == s["q"][-1]


def test_exact_q2_and_analysis(tmp_path, fm):
    """<Q^2> of a poorly trained flow's exact chain (4 x 10000 steps, 4x4, beta 1) agrees with
    hpcflow.analysis.exact.u1_2d_q2 within 3 Gamma-method sigma; topo_analyse reads the flow
    chains (acceptance, ESS, model, CPU time per proposal)."""
    ta = _load("topo_analyse")
    for c in range(4):
        tf.FlowChain(fm, _cfg(fm, chain=c, n_chains=4, batch=256, seed=1), tc.chain_dir(tmp_path, "flow", BETA, L, c),
                     log=lambda s: None).run(10_000, resume=False)
    assert ta.main([str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "topo_analysis.json").read_text())["rows"]
    assert len(rows) == 1
    r = rows[0]
    assert r["algo"] == "flow" and r["n_chains"] == 4 and r["n_per_chain"] == [10_000] * 4
    assert abs(r["Q2_pull"]) < 3, (r["Q2"], r["Q2_err"], r["Q2_exact"])
    assert abs(r["plaq_pull_Qcorr"]) < 4
    assert 0.05 < r["acceptance"] < 0.6 and 0 < r["ess_per_proposal"] < 1
    assert r["model_sha256"] == fm.sha256 and r["training_steps"] == 40 and r["precision"] == "float64"
    assert r["cpu_s_per_proposal"] > 0 and r["cost_per_indep_Q_s"] == pytest.approx(2 * r["tau_Q"] * r["cpu_s_per_step"])
    assert not r["tau_Q_lower_bound"] and 1 < r["tau_Q"] < 200


def test_refusals(tmp_path, run_dir, fm):
    import shutil

    import yaml

    with pytest.raises(SystemExit, match="no config.yaml"):
        tf.load_model(tmp_path)
    bad = tmp_path / "nockpt"
    bad.mkdir()
    shutil.copy(run_dir / "config.yaml", bad / "config.yaml")
    with pytest.raises(SystemExit, match="missing model"):
        tf.load_model(bad)
    # not a 2D U(1) model
    su2 = tmp_path / "su2"
    shutil.copytree(run_dir, su2)
    raw = yaml.safe_load((su2 / "config.yaml").read_text())
    raw["group"] = "su2"
    (su2 / "config.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(SystemExit, match="needs a 2D U\\(1\\) flow"):
        tf.load_model(su2)
    # training not finished (train.steps beyond the checkpoint's step)
    unf = tmp_path / "unfinished"
    shutil.copytree(run_dir, unf)
    raw = yaml.safe_load((unf / "config.yaml").read_text())
    raw["train"]["steps"] = 1000
    (unf / "config.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(SystemExit, match="allow-unfinished"):
        tf.load_model(unf)
    assert tf.load_model(unf, allow_unfinished=True).train_step == 40
    # beta other than the model's: refused unless asked for
    args = ["--model", str(run_dir), "--n-steps", "50", "--out", str(tmp_path / "o"), "--chains", "1",
            "--batch", "32", "--therm", "0"]
    with pytest.raises(SystemExit, match="allow-beta-mismatch"):
        tf.main(args + ["--beta", "1.5"])
    assert tf.main(args + ["--beta", "1.5", "--allow-beta-mismatch"]) == 0
    meta = json.loads((tc.chain_dir(tmp_path / "o", "flow", 1.5, L, 0) / "meta.json").read_text())
    assert meta["beta"] == 1.5 and meta["model_beta"] == BETA
    assert meta["n_therm"] == 0 and meta["acceptance"] > 0


def test_plot_writes_png(tmp_path):
    tp = _load("topo_plot")
    rows = []
    for b in (1.0, 3.0, 7.0):
        for algo, tau, cpu in (("flow", 2 * b, 8e-4), ("hmc", 3 * math.exp(b), 2e-4), ("heatbath", math.exp(b), 1e-4)):
            lb = algo != "flow" and b == 7.0
            rows.append({"algo": algo, "L": 16, "beta": b, "n_chains": 4, "tau_Q": tau, "tau_Q_err": 0.1 * tau,
                         "tau_Q_lower_bound": lb, "cpu_s_per_step": cpu, "cost_per_indep_Q_s": 2 * tau * cpu,
                         "flags": ["short"] if lb else []})
    src = tmp_path / "a.json"
    src.write_text(json.dumps({"rows": rows}))
    assert tp.main([str(src), "--out", str(tmp_path / "p.png")]) == 0
    data = (tmp_path / "p.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
