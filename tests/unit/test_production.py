"""Production chains on one rank: stop at any step and resume == uninterrupted run; bad input.

What is proven: the chain is a pure function of (config, seed), so a run stopped by a flag
or a real SIGTERM/SIGINT and then resumed writes the same ensemble, row for row and bit
for bit (configurations, S, plaquette, checksums), as an uninterrupted run; and a
checkpoint from another configuration, a corrupted checkpoint or an existing ensemble
give a clear error and leave every file unchanged.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from hpcflow.config import config_from_dict
from hpcflow.io.checkpoint import CheckpointError
from hpcflow.io.ensemble import EnsembleError, committed_segments, open_ensemble
from hpcflow.run.sample import (
    EXIT_OK,
    EXIT_RESUMABLE,
    chain_checkpoint_path,
    ensemble_dir,
    sample,
)
from hpcflow.signals import StopFlag

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def make_cfg(out, algorithm: str = "heatbath", **run):  # type: ignore[no-untyped-def]
    r = {"n_therm": 2, "n_steps": 9, "measure_every": 1, **run}
    return config_from_dict({
        "lattice": {"shape": [6, 6]}, "group": "u1", "algorithm": algorithm, "seed": 11,
        "action": {"beta": 2.0}, "hmc": {"n_steps": 4}, "run": r,
        "sample": {"checkpoint_every": 4}, "output": {"dir": str(out)}})


class StopAfter(StopFlag):
    """A stop flag that 'receives a signal' after a given number of polls (chain steps)."""

    def __init__(self, polls: int) -> None:
        super().__init__()
        self.left = polls

    @property  # type: ignore[override]
    def stop_requested(self) -> bool:
        self.left -= 1
        return self.left < 0

    @stop_requested.setter
    def stop_requested(self, v: bool) -> None:
        pass


def snapshot(cfg) -> tuple[dict, list[torch.Tensor]]:  # type: ignore[no-untyped-def]
    ens = open_ensemble(ensemble_dir(cfg))
    return ens.records(0), [U for _, U in ens.iter_configs(0)]


def assert_same_ensemble(a, b) -> None:  # type: ignore[no-untyped-def]
    ra, ua = a
    rb, ub = b
    assert set(ra) == set(rb)
    for k in ra:
        np.testing.assert_array_equal(ra[k], rb[k], err_msg=k)
    assert len(ua) == len(ub) and all(torch.equal(x, y) for x, y in zip(ua, ub))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):  # type: ignore[no-untyped-def]
    out = {}
    for alg in ("heatbath", "hmc"):
        cfg = make_cfg(tmp_path_factory.mktemp(f"ref_{alg}"), alg)
        assert sample(cfg, use_mpi=False) == EXIT_OK
        out[alg] = snapshot(cfg)
    return out


@pytest.mark.parametrize("alg", ["heatbath", "hmc"])
def test_stop_and_resume_equals_uninterrupted(tmp_path, reference, alg: str) -> None:
    cfg = make_cfg(tmp_path, alg)
    r, _ = reference[alg]
    assert len(r["step"]) == 9 and list(r["step"]) == list(range(3, 12))
    assert len(set(r["checksum"].tolist())) == len(r["checksum"]) or alg == "hmc"
    # stops during thermalisation, mid-segment, at a segment boundary, then to the end
    counts = []
    for polls in (1, 3, 2, 100):  # stops after steps 2 (therm), 6 (segment boundary), 9 (mid-segment)
        code = sample(cfg, use_mpi=False, stop=StopAfter(polls))
        n = open_ensemble(ensemble_dir(cfg)).n_committed()
        counts.append(n)
        assert code == (EXIT_OK if polls == 100 else EXIT_RESUMABLE)
        assert os.path.exists(chain_checkpoint_path(cfg, 0))
    assert counts == sorted(counts) and counts[-1] == 9
    assert_same_ensemble(snapshot(cfg), reference[alg])
    # a finished chain rerun is a no-op, not a duplicate
    assert sample(cfg, use_mpi=False) == EXIT_OK
    assert_same_ensemble(snapshot(cfg), reference[alg])


def test_foreign_or_corrupted_checkpoint_and_existing_ensemble(tmp_path, reference) -> None:
    cfg = make_cfg(tmp_path)
    assert sample(cfg, use_mpi=False, stop=StopAfter(6)) == EXIT_RESUMABLE
    root = ensemble_dir(cfg)
    ck = chain_checkpoint_path(cfg, 0)

    def files() -> dict[str, bytes]:
        out = {}
        for d, _, names in os.walk(tmp_path):
            for n in names:
                with open(os.path.join(d, n), "rb") as fh:
                    out[os.path.join(d, n)] = fh.read()
        return out

    before = files()
    other = config_from_dict({**_raw(cfg), "action": {"beta": 3.0}})
    with pytest.raises(CheckpointError, match="another configuration"):
        sample(other, use_mpi=False)
    with pytest.raises(EnsembleError, match="already has"):
        sample(cfg, resume=False, use_mpi=False)
    assert files() == before
    raw = before[ck]
    with open(ck, "wb") as fh:
        fh.write(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        sample(cfg, use_mpi=False)
    after = files()
    assert {k: v for k, v in after.items() if k != ck} == {k: v for k, v in before.items() if k != ck}
    assert len(committed_segments(root, 0)) == 2  # steps 3..7 stored: 4 + 1 rows
    with open(ck, "wb") as fh:
        fh.write(raw)
    assert sample(cfg, use_mpi=False) == EXIT_OK
    assert_same_ensemble(snapshot(cfg), reference["heatbath"])
    with pytest.raises(CheckpointError, match="nothing to resume"):
        sample(make_cfg(tmp_path / "fresh"), resume=True, use_mpi=False)


def _raw(cfg) -> dict:  # type: ignore[no-untyped-def]
    from hpcflow.config import config_to_dict

    return config_to_dict(cfg)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_real_signal_exit_3_then_resume(tmp_path, reference, sig) -> None:
    """A real signal to the entry point: exit 3 with a checkpoint; rerunning completes the chain."""
    import yaml

    # long enough that the signal always lands mid-chain on the fast host kernels (the default)
    cfg = config_from_dict({**_raw(make_cfg(tmp_path, n_steps=6000)), "sample": {"checkpoint_every": 500}})
    ref_cfg = config_from_dict({**_raw(cfg), "output": {"dir": str(tmp_path / "ref")}})
    assert sample(ref_cfg, use_mpi=False) == EXIT_OK
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_raw(cfg)))
    cmd = [sys.executable, "-m", "hpcflow.run.sample", str(path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    p = subprocess.Popen(cmd, env=env, cwd=REPO, stderr=subprocess.PIPE, text=True)
    seg0 = os.path.join(ensemble_dir(cfg), "chain000", "seg000000.h5")
    t0 = time.time()
    while not os.path.exists(seg0) and p.poll() is None and time.time() - t0 < 120:
        time.sleep(0.01)
    p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    ck = chain_checkpoint_path(cfg, 0)
    if p.returncode == EXIT_OK:  # the chain won the race and finished: still a valid outcome
        pytest.fail("chain finished before the signal; make the run longer")
    assert p.returncode == EXIT_RESUMABLE, err
    assert os.path.exists(ck)
    n = open_ensemble(ensemble_dir(cfg)).n_committed()
    assert 500 <= n < 6000
    r = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == EXIT_OK, r.stderr
    assert_same_ensemble(snapshot(cfg), snapshot(ref_cfg))


def test_entry_point_bad_input_exit_2(tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("action: {beta: -1}\n")
    r = subprocess.run([sys.executable, "-m", "hpcflow.run.sample", str(bad)], cwd=REPO,
                       env={**os.environ, "PYTHONPATH": REPO}, capture_output=True, text=True,
                       timeout=120, check=False)
    assert r.returncode == 2 and "action.beta" in r.stderr


# ---- flow and mixed chains ---------------------------------------------------------------
FLOW_SEED = 5


def make_flow_cfg(out, algorithm: str = "flow", **sample_kw):  # type: ignore[no-untyped-def]
    s = {"n_therm": 2, "n_steps": 9, "batch": 4, "checkpoint_every": 4, **sample_kw}
    return config_from_dict({
        "lattice": {"shape": [8, 8]}, "group": "u1", "algorithm": algorithm, "seed": FLOW_SEED,
        "action": {"beta": 1.0}, "flow": {"n_layers": 2, "hidden": [4], "kernel_size": 3},
        "train": {"steps": 3, "batch": 8, "lr": 0.01, "checkpoint_every": 3},
        "mixed": {"pattern": ["flow", "heatbath"]}, "heatbath": {"n_overrelax": 0},
        "run": {"measure_every": 1, "progress": False}, "sample": s, "output": {"dir": str(out)}})


def train_tiny(cfg) -> str:  # type: ignore[no-untyped-def]
    """A tiny U(1) flow trained for a few steps (under-trained on purpose: rejections happen)."""
    from hpcflow.flows.build import build_model
    from hpcflow.flows.train import Trainer
    from hpcflow.lattice.geometry import Lattice

    lat = Lattice(cfg.lattice.shape)
    Trainer(build_model(cfg, lat), lat, cfg.action.beta, cfg.train, cfg.output.dir, seed=cfg.seed,
            progress=False).train()
    return os.path.join(cfg.output.dir, "train", "checkpoint.pt")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):  # type: ignore[no-untyped-def]
    d = tmp_path_factory.mktemp("model")
    return train_tiny(make_flow_cfg(d))


def with_model(tmp, model_path):  # type: ignore[no-untyped-def]
    import shutil

    os.makedirs(tmp / "train", exist_ok=True)
    shutil.copy(model_path, tmp / "train" / "checkpoint.pt")


@pytest.fixture(scope="module")
def flow_reference(tmp_path_factory, trained):  # type: ignore[no-untyped-def]
    out = {}
    for alg in ("flow", "mixed"):
        d = tmp_path_factory.mktemp(f"ref_{alg}")
        with_model(d, trained)
        cfg = make_flow_cfg(d, alg)
        assert sample(cfg, use_mpi=False) == EXIT_OK
        out[alg] = snapshot(cfg)
        out["root_" + alg] = ensemble_dir(cfg)
    return out


def test_flow_chain_is_the_metropolis_chain(tmp_path, trained, flow_reference) -> None:
    """Production flow chain 0 == hpcflow.sampling.metropolis.metropolis_chain with the same model,
    CounterRNG(seed, stream 0) and batch: same accept decisions, S, log q, log w, plaquette;
    stored configurations are exp(i theta) of the chain state; the model hash is recorded."""
    from hpcflow.flows.build import build_model
    from hpcflow.flows.train import load_flow_checkpoint
    from hpcflow.flows.u1 import links_from_angles
    from hpcflow.io.checkpoint import file_sha256
    from hpcflow.lattice.geometry import Lattice
    from hpcflow.rng import CounterRNG
    from hpcflow.sampling.flow_chains import metropolis_chain

    cfg = make_flow_cfg(tmp_path)
    lat = Lattice(cfg.lattice.shape)
    model = build_model(cfg, lat)
    load_flow_checkpoint(model, trained, cfg.action.beta)
    model.eval()
    ref = metropolis_chain(model, lat, cfg.action.beta, 11, 4, CounterRNG(FLOW_SEED, 0))
    rec, Us = flow_reference["flow"]
    sl = slice(2, 11)  # after sample.n_therm = 2
    assert list(rec["step"]) == list(range(3, 12))
    np.testing.assert_array_equal(rec["accepted"].astype(bool), ref["accepted"][sl])
    assert 0 < rec["accepted"].sum() < len(rec["accepted"]), "want both accepts and rejects"
    for k, rk in (("S", "S"), ("log_q", "logq"), ("log_w", "logw"), ("plaquette", "plaquette")):
        np.testing.assert_allclose(rec[k], ref[rk][sl], rtol=1e-12, atol=1e-12, err_msg=k)
    np.testing.assert_allclose(rec["log_w"], -rec["S"] - rec["log_q"], rtol=1e-12)
    last = links_from_angles(ref["state"]["x"]).to(torch.complex128)
    assert torch.allclose(Us[-1], last, atol=1e-13)
    assert open_ensemble(flow_reference["root_flow"]).attrs["model_sha256"] == file_sha256(trained)


@pytest.mark.parametrize("alg", ["flow", "mixed"])
def test_flow_stop_and_resume_equals_uninterrupted(tmp_path, trained, flow_reference, alg: str) -> None:
    """A flow (or mixed flow/heat-bath) chain stopped during thermalisation, mid-segment and
    mid-proposal-batch, then resumed, equals the uninterrupted chain bit for bit."""
    with_model(tmp_path, trained)
    cfg = make_flow_cfg(tmp_path, alg)
    counts = []
    for polls in (1, 4, 2, 100):  # stops after steps 2 (therm), 7 (mid-batch), 10, then to the end
        code = sample(cfg, use_mpi=False, stop=StopAfter(polls))
        counts.append(open_ensemble(ensemble_dir(cfg)).n_committed())
        assert code == (EXIT_OK if polls == 100 else EXIT_RESUMABLE)
    assert counts == sorted(counts) and counts[-1] == 9
    assert_same_ensemble(snapshot(cfg), flow_reference[alg])
    rec = flow_reference[alg][0]
    assert np.isfinite(rec["log_q"]).all() and np.isfinite(rec["log_w"]).all()
    if alg == "mixed":  # heat-bath steps (even steps) always accept
        assert rec["accepted"][rec["step"] % 2 == 0].all()


def test_flow_missing_or_foreign_model(tmp_path, trained) -> None:
    """No model, a model for another beta or architecture, or a model replaced mid-chain: one
    clear error, nothing overwritten."""
    cfg = make_flow_cfg(tmp_path)
    with pytest.raises(CheckpointError, match="missing model"):
        sample(cfg, use_mpi=False)
    assert not os.path.exists(chain_checkpoint_path(cfg, 0))
    with_model(tmp_path, trained)
    other_beta = config_from_dict({**_raw(cfg), "action": {"beta": 1.5}})
    with pytest.raises(CheckpointError, match="missing model.*beta"):
        sample(other_beta, use_mpi=False)
    other_arch = config_from_dict({**_raw(cfg), "flow": {"n_layers": 4, "hidden": [4], "kernel_size": 3}})
    with pytest.raises(CheckpointError, match="missing model.*arch"):
        sample(other_arch, use_mpi=False)
    assert not os.path.exists(chain_checkpoint_path(cfg, 0))
    assert sample(cfg, use_mpi=False, stop=StopAfter(4)) == EXIT_RESUMABLE
    ck = chain_checkpoint_path(cfg, 0)
    with open(ck, "rb") as fh:
        before = fh.read()
    train_tiny(config_from_dict({**_raw(cfg), "train": {"steps": 4, "batch": 8, "lr": 0.01}}))
    with pytest.raises(CheckpointError, match="sampled with the model"):
        sample(cfg, use_mpi=False)
    with open(ck, "rb") as fh:
        assert fh.read() == before


# ---- SU(N) flow chains (model hooks) -------------------------------------------------------
def make_su2_cfg(out):  # type: ignore[no-untyped-def]
    return config_from_dict({
        "lattice": {"shape": [4, 4]}, "group": "su2", "algorithm": "flow", "seed": 7,
        "action": {"beta": 1.0}, "flow": {"n_layers": 2, "hidden": [4], "kernel_size": 3},
        "train": {"steps": 2, "batch": 4, "lr": 0.01, "checkpoint_every": 2},
        "run": {"measure_every": 1, "progress": False},
        "sample": {"n_therm": 1, "n_steps": 7, "batch": 3, "checkpoint_every": 3}, "output": {"dir": str(out)}})


@pytest.fixture(scope="module")
def su2_reference(tmp_path_factory):  # type: ignore[no-untyped-def]
    from hpcflow.flows.build import build_model
    from hpcflow.flows.train import Trainer
    from hpcflow.lattice.geometry import Lattice

    d = tmp_path_factory.mktemp("su2")
    cfg = make_su2_cfg(d)
    lat = Lattice(cfg.lattice.shape)
    model = build_model(cfg, lat)
    Trainer(model, lat, cfg.action.beta, cfg.train, cfg.output.dir, seed=cfg.seed, progress=False,
            action=lambda x: model.action(x, cfg.action.beta)).train()
    model_path = os.path.join(cfg.output.dir, "train", "checkpoint.pt")
    assert sample(cfg, use_mpi=False) == EXIT_OK
    return model_path, snapshot(cfg)


def test_su2_flow_chain_is_flow_chain(tmp_path, su2_reference) -> None:
    """A 2D SU(2) production flow chain (through the model hooks) is the chain of ``hpcflow run``
    (``flow_chain``, stream 0, same batches): same accept decisions, S, log q, log w,
    plaquette; the stored configurations are the chain states (SU(2) matrices)."""
    from hpcflow.flows.distributed import DistributedFlow
    from hpcflow.lattice.geometry import Lattice
    from hpcflow.rng import CounterRNG
    from hpcflow.run.sample import load_model
    from hpcflow.sampling.flow_chains import flow_chain

    model_path, (rec, Us) = su2_reference
    with_model(tmp_path, model_path)
    cfg = make_su2_cfg(tmp_path)
    plain, _ = load_model(cfg, Lattice(cfg.lattice.shape))
    ref = flow_chain(DistributedFlow(plain), cfg.action.beta, 8, 3, CounterRNG(7, 0))
    sl = slice(1, 8)  # after sample.n_therm = 1
    assert list(rec["step"]) == list(range(2, 9))
    np.testing.assert_array_equal(rec["accepted"].astype(bool), ref["accepted"][sl])
    assert 0 < rec["accepted"].sum() < len(rec["accepted"]), "want both accepts and rejects"
    for k, rk in (("S", "S"), ("log_q", "logq"), ("log_w", "logw"), ("plaquette", "plaquette")):
        np.testing.assert_allclose(rec[k], ref[rk][sl], rtol=1e-12, atol=1e-12, err_msg=k)
    assert Us[-1].shape == (2, 4, 4, 2, 2) and torch.equal(Us[-1], ref["state"]["x"])
    eye = torch.eye(2, dtype=Us[-1].dtype)
    assert torch.allclose(Us[-1] @ Us[-1].conj().transpose(-1, -2), eye.expand_as(Us[-1]), atol=1e-12)


def test_su2_flow_stop_and_resume_equals_uninterrupted(tmp_path, su2_reference) -> None:
    """An SU(2) flow chain stopped in thermalisation, mid-batch and mid-segment, then resumed,
    equals the uninterrupted chain bit for bit (fields, checksums, every record)."""
    model_path, reference = su2_reference
    with_model(tmp_path, model_path)
    cfg = make_su2_cfg(tmp_path)
    codes = [sample(cfg, use_mpi=False, stop=StopAfter(polls)) for polls in (0, 1, 2, 100)]
    assert codes == [EXIT_RESUMABLE] * 3 + [EXIT_OK]
    assert_same_ensemble(snapshot(cfg), reference)
