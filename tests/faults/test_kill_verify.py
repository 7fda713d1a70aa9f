"""Fault injection around verification (issue 18): SIGKILL while an ensemble is verified, and
while a run resumes (its tail check included), then resume.

What is proven: ``verify_ensemble`` and ``check_tail`` only read. A process killed at random
moments inside them (it verifies in a loop; each kill lands mid-verification) leaves every
file of the ensemble byte for byte as it was and creates none, and the ensemble still
verifies. A ``sample`` resume SIGKILLed at random moments (start-up, tail check, sampling,
commits) leaves a run that the next resume completes into the uninterrupted ensemble,
configuration for configuration, which then verifies clean.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import torch
import yaml

from hpcflow.io.ensemble import SegmentWriter, open_ensemble, verify_ensemble
from hpcflow.lattice import Lattice, get_group, random_field
from hpcflow.rng import CounterRNG

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}


def _tree(d: str) -> dict[str, str]:
    out = {}
    for dd, _, names in os.walk(d):
        for n in names:
            with open(os.path.join(dd, n), "rb") as fh:
                out[os.path.join(dd, n)] = hashlib.sha256(fh.read()).hexdigest()
    return out


_LOOP = """
import sys
from hpcflow.io.ensemble import check_tail, verify_ensemble
root = sys.argv[1]
while True:
    assert verify_ensemble(root) == []
    check_tail(root, 0, "fp", n_segments=3)
    print("ok", flush=True)
"""


def test_sigkill_during_verification_changes_nothing(tmp_path) -> None:
    rng = random.Random(99)
    root = str(tmp_path / "ens")
    lat = Lattice((6, 6, 6, 6))
    g = get_group("su3")
    for k in range(3):
        w = SegmentWriter(root, 0, k, lat, 8, torch.complex128, 3, {"beta": 5.5}, fingerprint="fp")
        for s in range(8):
            w.append(random_field(lat, g, CounterRNG(7), step=8 * k + s), {"chain": 0, "step": 8 * k + s + 1})
        w.commit()
    before = _tree(root)
    for _ in range(5):
        p = subprocess.Popen([sys.executable, "-c", _LOOP, root], env=_env(), cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
        assert p.stdout is not None
        line = p.stdout.readline()  # one full pass done: imports are behind, the loop is verifying
        assert line == "ok\n", p.stderr.read() if p.stderr else line
        time.sleep(rng.uniform(0.0, 0.2))
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=30)
        assert p.returncode == -signal.SIGKILL
        assert _tree(root) == before
    assert verify_ensemble(root) == []


def _cfg(out: str) -> dict:
    return {"lattice": {"shape": [12, 12]}, "group": "u1", "algorithm": "heatbath", "seed": 31,
            "action": {"beta": 2.0}, "heatbath": {"n_overrelax": 1},
            "run": {"n_therm": 2, "n_steps": 400, "measure_every": 1},
            "sample": {"checkpoint_every": 5}, "output": {"dir": out}}


def _write_cfg(d: str) -> str:
    os.makedirs(d, exist_ok=True)
    p = os.path.join(d, "run.yaml")
    with open(p, "w") as fh:
        yaml.safe_dump(_cfg(os.path.join(d, "out")), fh)
    return p


def _cmd(cfg: str) -> list[str]:
    return [sys.executable, "-m", "hpcflow.run.sample", cfg]


def _read(root: str) -> tuple[dict, list[torch.Tensor]]:
    ens = open_ensemble(root)
    return ens.records(0), [U for _, U in ens.iter_configs(0)]


def _stamp(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_mtime_ns)


def _kill_soon_after(p: subprocess.Popen, ckpt: str, *, deadline: float, commits: int, delay: float) -> None:
    """Return at ``deadline`` seconds, or ``delay`` after the process has replaced its checkpoint
    ``commits`` times, or when it has ended, whichever is first (polled every millisecond)."""
    t0, seen, n = time.time(), _stamp(ckpt), 0
    while p.poll() is None and time.time() - t0 < deadline:
        s = _stamp(ckpt)
        if s != seen:
            seen, n = s, n + 1
            if n >= commits:
                time.sleep(delay)
                return
        time.sleep(0.001)


def test_sigkill_during_resume_then_resume(tmp_path) -> None:
    rng = random.Random(2718)
    ref_cfg = _write_cfg(str(tmp_path / "ref"))
    r = subprocess.run(_cmd(ref_cfg), env=_env(), cwd=REPO, capture_output=True, text=True, timeout=300,
                       check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    ref = _read(str(tmp_path / "ref" / "out" / "ensemble"))
    cfg = _write_cfg(str(tmp_path / "run"))
    root = str(tmp_path / "run" / "out" / "ensemble")
    ckpt = str(tmp_path / "run" / "out" / "checkpoints" / "chain000.ckpt")
    last, landed = 0, 0
    for i in range(4):
        p = subprocess.Popen(_cmd(cfg), env=_env(), cwd=REPO, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
        if i == 0:  # the first run: let it commit, so every later start resumes (and checks the tail)
            t0 = time.time()
            while p.poll() is None and not os.path.exists(ckpt) and time.time() - t0 < 120:
                time.sleep(0.005)
        # a random moment of the (re)start: imports, recovery and tail check, the first steps. The
        # kill comes at a random time or just after the k-th checkpoint commit this start makes,
        # whichever is first: a fast machine must not run the chain to its end between kills
        # (CI once did, with a purely timed kill).
        _kill_soon_after(p, ckpt, deadline=rng.uniform(0.3, 2.5), commits=rng.randint(1, 3),
                         delay=rng.uniform(0.0, 0.01))
        if p.poll() is None:
            landed += 1
            os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=30)
        recs, _ = _read(root)
        n = len(recs["step"])
        assert n >= last and list(recs["step"]) == list(range(3, 3 + n))
        last = n
    assert landed >= 3 and last < 400, f"kills landed {landed}, committed {last}"
    r = subprocess.run(_cmd(cfg), env=_env(), cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    got = _read(root)
    for k in ref[0]:
        np.testing.assert_array_equal(got[0][k], ref[0][k], err_msg=k)
    assert all(torch.equal(a, b) for a, b in zip(got[1], ref[1])) and len(got[1]) == len(ref[1])
    assert verify_ensemble(root) == []
