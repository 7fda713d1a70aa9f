"""Shipped flow models (issue 17, item 3): ``flow.model`` names a trained flow under
``models/`` (or ``$HPCFLOW_MODELS``, or ``share/hpcflow/models`` of an installation), and
``hpcflow sample`` / ``hpcflow run`` sample with it without training.

What is proven: every shipped model's weights match the sha256 of its ``model.json`` (and of
its card); a config naming a model takes the model's lattice, group and architecture (and
its algorithm, beta and precision unless given), and any contradiction, an unknown or malformed
name, a damaged weights file and ``hpcflow train`` on a shipped model are one line and exit 2
with nothing sampled; sampling ``u1-L16-b1`` in a CI-sized run reproduces the exact finite-
volume <Q^2> of 16x16 at beta 1 within 3 sigma (charges measured on the stored configurations);
run fingerprints of configs without ``flow.model`` are those of before the key existed; the
wheel carries the models to ``share/hpcflow/models``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from hpcflow.analysis.exact import u1_2d_q2
from hpcflow.analysis.gamma import gamma_method
from hpcflow.config import ConfigError, config_from_dict, config_to_dict, flow_fingerprint_part, load_config
from hpcflow.io.ensemble import open_ensemble
from hpcflow.lattice.geometry import Lattice
from hpcflow.lattice.observables import topological_charge_u1_2d
from hpcflow.models import ModelError, list_models, resolve_model, verify_model

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted(d.name for d in (ROOT / "models").iterdir() if d.is_dir())


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "HPCFLOW_MODELS"}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **extra}


def _hpcflow(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hpcflow.run.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env or _env(), timeout=timeout, check=False)


def _write(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_model_matches_its_recorded_sha256(name: str) -> None:
    m = resolve_model(name)
    sha = hashlib.sha256(m.checkpoint.read_bytes()).hexdigest()
    assert verify_model(m) == sha == m.meta["sha256"]
    assert sha in (m.path / "CARD.md").read_text()
    cfg = yaml.safe_load((m.path / "config.yaml").read_text())
    assert m.meta["lattice"] == cfg["lattice"]["shape"] and m.meta["beta"] == cfg["action"]["beta"]


def test_shipped_models_are_listed_by_the_cli() -> None:
    assert {m.name for m in list_models()} >= set(SHIPPED) and "u1-L16-b1" in SHIPPED
    r = _hpcflow("models")
    assert r.returncode == 0, r.stderr
    for name in SHIPPED:
        assert name in r.stdout
    js = json.loads(_hpcflow("models", "--json").stdout)
    assert {d["name"] for d in js} >= set(SHIPPED)


def test_config_takes_the_models_lattice_group_architecture_and_defaults() -> None:
    cfg = config_from_dict({"flow": {"model": "u1-L16-b1"}})
    model_cfg = yaml.safe_load((ROOT / "models" / "u1-L16-b1" / "config.yaml").read_text())
    assert list(cfg.lattice.shape) == model_cfg["lattice"]["shape"] == [16, 16]
    assert cfg.group == "u1" and cfg.algorithm == "flow" and cfg.precision == "float32"
    assert cfg.action.beta == model_cfg["action"]["beta"] == 1.0
    for k in ("n_layers", "kernel", "n_components", "n_knots", "kernel_size"):
        assert getattr(cfg.flow, k) == model_cfg["flow"][k]
    assert list(cfg.flow.hidden) == model_cfg["flow"]["hidden"]
    # the defaults may be changed: another beta (exact: the chain's accept step uses its own action),
    # float64, a mixed chain
    cfg = config_from_dict({"flow": {"model": "u1-L16-b1"}, "action": {"beta": 1.5}, "precision": "float64",
                            "algorithm": "mixed"})
    assert (cfg.action.beta, cfg.precision, cfg.algorithm) == (1.5, "float64", "mixed")


@pytest.mark.parametrize("override,key", [
    ("lattice.shape=[8,8]", "lattice.shape"), ("group=su2", "group"), ("flow.n_layers=12", "flow.n_layers"),
    ("flow.hidden=[8,8]", "flow.hidden"), ("flow.kernel=spline", "flow.kernel"),
    ("algorithm=hmc", "algorithm"), ("flow.model=no-such-model", "flow.model"),
    ("flow.model='bad name!'", "flow.model"), ("flow.model=7", "flow.model"),
    ("flow.model=./not/a/dir", "flow.model"),
])
def test_contradictions_and_bad_names_are_one_line_exit_2(tmp_path: Path, override: str, key: str) -> None:
    cfg = _write(tmp_path / "c.yaml", {"flow": {"model": "u1-L16-b1"}, "output": {"dir": str(tmp_path / "o")}})
    with pytest.raises(ConfigError, match=f"key '{key}'"):
        load_config(cfg, [override])
    r = _hpcflow("sample", str(cfg), "--set", override)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and f"'{key}'" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "o").exists()


def test_unknown_name_lists_the_models_that_exist() -> None:
    with pytest.raises(ModelError, match="u1-L16-b1"):
        resolve_model("u1-L16-b99")


def test_train_refuses_a_shipped_model(tmp_path: Path) -> None:
    cfg = _write(tmp_path / "c.yaml", {"flow": {"model": "u1-L16-b1"}, "output": {"dir": str(tmp_path / "o")}})
    r = _hpcflow("train", str(cfg))
    assert r.returncode == 2 and "flow.model" in r.stderr and "init_from" in r.stderr, r.stderr
    assert not (tmp_path / "o").exists()


def _copy_model(src: str, dest: Path) -> Path:
    shutil.copytree(ROOT / "models" / src, dest)
    return dest


def test_models_env_path_first_and_a_directory_reference(tmp_path: Path, monkeypatch) -> None:
    extra = tmp_path / "site-models"
    _copy_model("u1-L16-b2", extra / "my-b2")
    _copy_model("u1-L16-b2", extra / "u1-L16-b1")  # shadows the shipped b1: the env path comes first
    monkeypatch.setenv("HPCFLOW_MODELS", str(extra))
    assert resolve_model("my-b2").path == extra / "my-b2"
    assert resolve_model("u1-L16-b1").meta["beta"] == 2.0
    monkeypatch.delenv("HPCFLOW_MODELS")
    assert resolve_model("u1-L16-b1").meta["beta"] == 1.0
    m = resolve_model(str(extra / "my-b2"))
    assert m.name == "my-b2" and m.meta["beta"] == 2.0
    with pytest.raises(ModelError, match="missing model.json"):
        (extra / "my-b2" / "model.json").unlink()
        resolve_model(str(extra / "my-b2"))


def test_a_damaged_weights_file_is_refused_before_sampling(tmp_path: Path) -> None:
    d = _copy_model("u1-L16-b1", tmp_path / "models" / "damaged")
    raw = bytearray((d / "checkpoint.pt").read_bytes())
    raw[len(raw) // 2] ^= 0x01  # one bit in the weights
    (d / "checkpoint.pt").write_bytes(bytes(raw))
    cfg = _write(tmp_path / "c.yaml", {"flow": {"model": "damaged"}, "sample": {"n_steps": 10, "batch": 8},
                                       "output": {"dir": str(tmp_path / "o")}})
    for cmd in ("sample", "run"):
        r = _hpcflow(cmd, str(cfg), env=_env(HPCFLOW_MODELS=str(tmp_path / "models")))
        assert r.returncode == 2, (cmd, r.stderr)
        assert "sha256" in r.stderr and "damaged" in r.stderr and "Traceback" not in r.stderr, r.stderr
        ens = tmp_path / "o" / "ensemble"
        assert not ens.exists() or not any(ens.rglob("*.h5")), cmd


def test_sampling_u1_L16_b1_reproduces_the_exact_q2(tmp_path: Path) -> None:
    """CI-sized: 3000 independence-Metropolis steps of the shipped beta-1 model (acceptance ~0.7,
    tau_int(Q) ~1), every configuration stored; Q measured on the stored links."""
    out = tmp_path / "o"
    cfg = _write(tmp_path / "c.yaml", {"flow": {"model": "u1-L16-b1"}, "seed": 11,
                                       "sample": {"n_steps": 3000, "batch": 256, "checkpoint_every": 500},
                                       "output": {"dir": str(out)}})
    r = _hpcflow("sample", str(cfg))
    assert r.returncode == 0, r.stderr[-2000:]
    ens = open_ensemble(str(out / "ensemble"))
    lat = Lattice((16, 16))
    q = np.array([float(topological_charge_u1_2d(U, lat)) for _, U in ens.iter_configs(0)])
    assert len(q) == 3000 and np.allclose(q, np.round(q), atol=1e-6)
    g = gamma_method(q ** 2)
    exact = u1_2d_q2(1.0, L=16)
    assert 0.1 < g.error < 1.0  # a real test: the error is small enough to fail a wrong sampler
    assert abs(g.mean - exact) < 3 * g.error, (g.mean, g.error, exact)
    print(f"<Q^2> {g.mean:.3f} +- {g.error:.3f} (tau_int {g.tau_int:.2f}), exact {exact:.3f}")
    assert ens.attrs["model_sha256"] == resolve_model("u1-L16-b1").sha256


def test_run_with_a_shipped_model_skips_training_and_is_the_sample_chain(tmp_path: Path) -> None:
    base = {"flow": {"model": "u1-L16-b1"}, "action": {"beta": 1.2}, "seed": 3,
            "sample": {"n_steps": 40, "batch": 16}, "run": {"progress": False}}
    cfg_r = _write(tmp_path / "r.yaml", {**base, "output": {"dir": str(tmp_path / "r")}})
    cfg_s = _write(tmp_path / "s.yaml", {**base, "output": {"dir": str(tmp_path / "s")}})
    r = _hpcflow("run", str(cfg_r))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "no training" in r.stdout and not (tmp_path / "r" / "train").exists()
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["model"] == "u1-L16-b1" and summary["beta"] == 1.2
    assert _hpcflow("sample", str(cfg_s)).returncode == 0
    hist = [json.loads(x) for x in (tmp_path / "r" / "history.jsonl").read_text().splitlines() if x.strip()]
    recs = open_ensemble(str(tmp_path / "s" / "ensemble")).records(0)
    assert len(hist) == len(recs["step"]) == 40
    np.testing.assert_array_equal([h["accepted"] for h in hist], recs["accepted"])
    # the same states (identical accept/reject decisions); the model's precision is float32 and
    # run's measurement and sample's row compute the plaquette on different code paths
    np.testing.assert_allclose([h["plaquette"] for h in hist], recs["plaquette"], rtol=2e-7)


def test_fingerprints_without_a_model_are_unchanged() -> None:
    cfg = config_from_dict({"algorithm": "flow"})
    d = config_to_dict(cfg)
    assert d["flow"]["model"] is None and "model" not in flow_fingerprint_part(d["flow"])
    cfg_m = config_from_dict({"flow": {"model": "u1-L16-b1"}})
    assert flow_fingerprint_part(config_to_dict(cfg_m)["flow"])["model"] == "u1-L16-b1"


def test_the_wheel_installs_the_models(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        str(ROOT), "-w", str(tmp_path)], capture_output=True, text=True, timeout=300,
                       check=False, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    (whl,) = tmp_path.glob("*.whl")  # (the distribution's name is not the import name)
    names = {n.split(".data/data/", 1)[1] for n in zipfile.ZipFile(whl).namelist() if ".data/data/" in n}
    for name in SHIPPED:
        for f in ("checkpoint.pt", "config.yaml", "model.json", "CARD.md"):
            assert f"share/hpcflow/models/{name}/{f}" in names
    names = set(zipfile.ZipFile(whl).namelist())
    assert "hpcflow/models.py" in names
