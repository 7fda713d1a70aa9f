"""Fault injection: a 2-rank sampling run is SIGKILLed at random moments, then resumed.

What is proven (crash rule, ARCHITECTURE.md): after each SIGKILL of the whole ``mpirun``
job (mpirun and every rank: the whole session), at random moments, most of them while a segment is open for
parallel HDF5 writing, every committed file opens and reads, the committed count never
decreases, no configuration checksum appears twice, and the final ensemble equals the
uninterrupted reference run (same seed, same 2-rank grid) configuration for
configuration, bit for bit. The same for two flow chains (one rank each, ``n_workers = 2``)
with a tiny model trained in the test: the Metropolis state and proposal counter in the
chain checkpoints make the resumed chains the uninterrupted ones.

Signals through mpirun: SIGUSR1 sent to ``mpirun`` (Open MPI forwards SIGUSR1/SIGUSR2 to
the ranks) stops a 2-rank run with a checkpoint and exit status 3, and the rerun completes
the identical ensemble. (SIGTERM to ``mpirun`` is not forwarded as a stop request: Open MPI
sends SIGTERM to the ranks and SIGKILL about 2 s later, so for a scheduler-less or PBS job
the stop signal must be SIGUSR1; see docs/DESIGN.md, "Exit status".) Runs in the serial
pytest tier; it launches ``mpirun -n 2``.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml

from hpcflow.io.ensemble import committed_segments, open_ensemble

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
N_KILLS = 5


def _cfg(out: str) -> dict:
    return {"lattice": {"shape": [16, 16]}, "group": "u1", "algorithm": "heatbath", "seed": 2024,
            "action": {"beta": 2.0}, "grid": [2, 1], "heatbath": {"n_overrelax": 1},
            "run": {"n_therm": 2, "n_steps": 60, "measure_every": 1},
            "sample": {"checkpoint_every": 3}, "output": {"dir": out}}


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO, "OMPI_ALLOW_RUN_AS_ROOT": "1",
            "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1", "OMPI_MCA_rmaps_base_oversubscribe": "1"}


# 50 segments of 3: three kills, each 1-4 segments after the last, land well before the end
N_FLOW = 150


def _flow_cfg(out: str) -> dict:
    return {"lattice": {"shape": [8, 8]}, "group": "u1", "algorithm": "flow", "seed": 77,
            "action": {"beta": 1.0}, "flow": {"n_layers": 2, "hidden": [4], "kernel_size": 3},
            "train": {"steps": 3, "batch": 8, "lr": 0.01},
            "run": {"measure_every": 1, "progress": False},
            "sample": {"n_therm": 2, "n_steps": N_FLOW, "batch": 5, "checkpoint_every": 3, "n_workers": 2},
            "output": {"dir": out}}


def _cmd(cfg_path: str) -> list[str]:
    return ["mpirun", "--oversubscribe", "-n", "2", sys.executable, "-m", "hpcflow.run.sample",
            cfg_path]


def _write_cfg(d: str, make=_cfg) -> str:  # type: ignore[no-untyped-def]
    os.makedirs(d, exist_ok=True)
    p = os.path.join(d, "run.yaml")
    with open(p, "w") as fh:
        yaml.safe_dump(make(os.path.join(d, "out")), fh)
    return p


def _read_all(root: str, chain: int = 0) -> tuple[dict, list[torch.Tensor]]:
    ens = open_ensemble(root)  # opens every committed segment
    return ens.records(chain), [U for _, U in ens.iter_configs(chain)]


def _assert_same(got, ref) -> None:  # type: ignore[no-untyped-def]
    for k in ref[0]:
        np.testing.assert_array_equal(got[0][k], ref[0][k], err_msg=k)
    assert len(got[1]) == len(ref[1]) and all(torch.equal(a, b) for a, b in zip(got[1], ref[1]))


def _session_pids(sid: int) -> list[int]:
    """Every live process of session ``sid`` (field 6 of /proc/PID/stat)."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:
            out.append(int(d))
    return out


def _kill_job(sid: int) -> None:
    """SIGKILL the whole mpirun job: mpirun and every rank. Open MPI puts each rank in a
    process group of its own, so killpg(mpirun) alone leaves the ranks running (and
    committing) until they notice mpirun is gone; the ranks share mpirun's session, so kill
    the session, ranks first."""
    for pid in sorted(_session_pids(sid), key=lambda q: q == sid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _wait_session_gone(sid: int, limit: float = 120.0) -> None:
    """Wait until every process of session ``sid`` has exited (killed ranks included), instead
    of sleeping a fixed time; ``limit`` only turns a hang into a failure."""
    t0 = time.time()
    while _session_pids(sid):
        assert time.time() - t0 < limit, f"processes of session {sid} still alive after SIGKILL"
        time.sleep(0.005)


def _until(p: subprocess.Popen, cond, limit: float = 170.0) -> bool:  # type: ignore[no-untyped-def]
    """Poll ``cond`` every millisecond while ``p`` runs: True once it holds, False if ``p``
    ended first. ``limit`` only turns a hang into a failure (it never lets the test go on)."""
    t0 = time.time()
    while p.poll() is None:
        if cond():
            return True
        assert time.time() - t0 < limit, "no progress: the run hangs"
        time.sleep(0.001)
    return False


def _require_mpirun() -> None:
    # a missing MPI must fail this tier, never skip it (scripts/bootstrap.sh installs it)
    assert shutil.which("mpirun") is not None, "mpirun not installed: run scripts/bootstrap.sh"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):  # type: ignore[no-untyped-def]
    """The uninterrupted 2-rank heat-bath run."""
    _require_mpirun()
    d = tmp_path_factory.mktemp("ref")
    r = subprocess.run(_cmd(_write_cfg(str(d))), env=_env(), cwd=REPO, capture_output=True, text=True,
                       timeout=170, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    ref = _read_all(str(d / "out" / "ensemble"))
    assert len(ref[0]["step"]) == 60
    return ref


def test_sigkill_at_random_moments_then_resume(tmp_path, reference) -> None:
    rng = random.Random(12345)
    ref = reference
    cfg = _write_cfg(str(tmp_path / "run"))
    root = str(tmp_path / "run" / "out" / "ensemble")
    chain_dir = os.path.join(root, "chain000")
    last, during_write = 0, 0
    for _ in range(N_KILLS):
        p = subprocess.Popen(_cmd(cfg), env=_env(), cwd=REPO, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
        # kill on progress, not after a wall-clock delay (a fast machine can finish the chain
        # within a fixed delay): once this run has committed 0-3 segments beyond what the last
        # one left and has a segment open, then a random 0-10 ms, which lands inside or between
        # the collective HDF5 writes
        target = len(committed_segments(root, 0)) + rng.randint(0, 3)
        _until(p, lambda t=target: len(committed_segments(root, 0)) >= t and os.path.isdir(chain_dir)
               and any(n.endswith(".tmp") for n in os.listdir(chain_dir)))
        time.sleep(rng.uniform(0.0, 0.01))
        if p.poll() is None:
            during_write += any(n.endswith(".tmp") for n in os.listdir(chain_dir))
            _kill_job(p.pid)
        p.wait(timeout=30)
        _wait_session_gone(p.pid)
        recs, Us = _read_all(root)
        n = len(recs["step"])
        assert n >= last, f"committed count decreased from {last} to {n}"
        assert len(set(recs["checksum"].tolist())) == n, "a configuration was committed twice"
        assert list(recs["step"]) == list(range(3, 3 + n))
        last = n
    assert during_write >= 1, "no kill landed while a segment was being written"
    r = subprocess.run(_cmd(cfg), env=_env(), cwd=REPO, capture_output=True, text=True, timeout=170,
                       check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    _assert_same(_read_all(root), ref)


def test_sigusr1_to_mpirun_stops_with_checkpoint_then_resume(tmp_path, reference) -> None:
    """SIGUSR1 to mpirun (not to the ranks): exit 3, checkpoint written, rerun == reference."""
    cfg = _write_cfg(str(tmp_path / "run"))
    root = str(tmp_path / "run" / "out" / "ensemble")
    ckpt = str(tmp_path / "run" / "out" / "checkpoints" / "chain000.ckpt")
    p = subprocess.Popen(_cmd(cfg), env=_env(), cwd=REPO, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    first = os.path.join(root, "chain000", "seg000000.h5")
    assert _until(p, lambda: os.path.exists(first)), "the run ended before the signal; make it longer"
    p.send_signal(signal.SIGUSR1)  # to mpirun only
    _, err = p.communicate(timeout=120)
    assert p.returncode == 3, err[-2000:]
    assert os.path.exists(ckpt)
    n = open_ensemble(root).n_committed()
    assert 3 <= n < 60, f"{n} committed rows after the stop"
    r = subprocess.run(_cmd(cfg), env=_env(), cwd=REPO, capture_output=True, text=True, timeout=170,
                       check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    _assert_same(_read_all(root), reference)


def test_flow_chains_sigkill_then_resume(tmp_path) -> None:
    """Two flow chains (one rank each) SIGKILLed 3 times at random moments, then resumed:
    counts monotone, no duplicate checksum within a chain, final == uninterrupted run."""
    _require_mpirun()
    from hpcflow.config import load_config
    from hpcflow.flows.build import build_model
    from hpcflow.flows.train import Trainer
    from hpcflow.lattice.geometry import Lattice

    rng = random.Random(4321)
    cfgs = {}
    for name in ("ref", "run"):
        cfgs[name] = _write_cfg(str(tmp_path / name), _flow_cfg)
    c = load_config(cfgs["ref"])
    lat = Lattice(c.lattice.shape)
    Trainer(build_model(c, lat), lat, c.action.beta, c.train, c.output.dir, seed=c.seed, progress=False).train()
    os.makedirs(tmp_path / "run" / "out" / "train")
    shutil.copy(tmp_path / "ref" / "out" / "train" / "checkpoint.pt",
                tmp_path / "run" / "out" / "train" / "checkpoint.pt")
    r = subprocess.run(_cmd(cfgs["ref"]), env=_env(), cwd=REPO, capture_output=True, text=True,
                       timeout=170, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    ref_root = str(tmp_path / "ref" / "out" / "ensemble")
    refs = [_read_all(ref_root, ch) for ch in (0, 1)]
    assert all(len(x[0]["step"]) == N_FLOW for x in refs)
    assert 0 < refs[0][0]["accepted"].sum() < N_FLOW, "want accepts and rejects"
    root = str(tmp_path / "run" / "out" / "ensemble")
    last, landed = [0, 0], 0
    for _ in range(3):
        p = subprocess.Popen(_cmd(cfgs["run"]), env=_env(), cwd=REPO, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
        # Kill on progress, not on a wall-clock delay: a tiny flow chain commits a segment
        # every few ms on an idle machine, so "0.2 s after the first file" can already be past
        # the end of the chain (seen in CI). Wait until this run has committed 1-4 segments
        # more than the last one left (so the kill lands after resume, mid-chain), then a
        # random 0-10 ms, which puts it inside or between HDF5 writes.
        target = len(committed_segments(root, 0)) + rng.randint(1, 4)
        _until(p, lambda t=target: len(committed_segments(root, 0)) >= t)
        time.sleep(rng.uniform(0.0, 0.01))
        if p.poll() is None:
            landed += 1
            _kill_job(p.pid)
        p.wait(timeout=30)
        _wait_session_gone(p.pid)
        for ch in (0, 1):
            if not os.path.isdir(os.path.join(root, f"chain{ch:03d}")):
                continue
            recs, _ = _read_all(root, ch)
            n = len(recs["step"])
            assert n >= last[ch], f"chain {ch}: committed count decreased from {last[ch]} to {n}"
            assert list(recs["step"]) == list(range(3, 3 + n))
            last[ch] = n
    assert landed == 3 and min(last) < N_FLOW, f"not every kill landed mid-chain (kills {landed}, counts {last})"
    r = subprocess.run(_cmd(cfgs["run"]), env=_env(), cwd=REPO, capture_output=True, text=True,
                       timeout=170, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    for ch in (0, 1):
        _assert_same(_read_all(root, ch), refs[ch])
