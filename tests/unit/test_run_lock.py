"""One writer per run directory (issue 18, item 1): the lock of ``<output.dir>/.hpcflow.lock``.

Regressions: two ``hpcflow sample`` (or ``run``, ``train``) on the same output.dir both ran
and both exited 0: a committed configuration was all zeros, or the directory ended up with
the second run's data only. Now the second process is refused with one line naming the
holder (host, pid, start time) and exit 2, and the first run's files are intact (its stopped
and resumed ensemble equals an uninterrupted one). The lock is dropped by the kernel when the
holder dies: a SIGKILLed run, or one killed while it takes the lock, never blocks its resume.

Real processes throughout (the lock is between processes); every wait is on a file or on
the lock's record, never on a clock guess.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml

from hpcflow.io.ensemble import committed_segments, open_ensemble, verify_ensemble
from hpcflow.io.lock import LOCK_ENV, LOCK_NAME, DirectoryLocked, DirLock, LockUnavailable, holder_of
from hpcflow.run.cli import EXIT_BAD_INPUT, EXIT_OK, EXIT_RESUMABLE, main

HPCFLOW = os.path.join(os.path.dirname(sys.executable), "hpcflow")
# plain processes even when this file runs inside an mpirun job
ENV = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMIX_", "PMI_"))}
ENV["OMP_NUM_THREADS"] = "1"
HUGE = 10**7


def baseline_cfg(out, beta: float = 2.0, n_steps: int = HUGE, algorithm: str = "heatbath") -> dict:
    return {"lattice": {"shape": [6, 6]}, "group": "u1", "algorithm": algorithm, "seed": 11,
            "action": {"beta": beta}, "hmc": {"n_steps": 4}, "backend": "torch",
            "run": {"n_therm": 2, "n_steps": n_steps, "measure_every": 1, "progress": False},
            "sample": {"checkpoint_every": 4}, "measure": {"wilson_loops": []},
            "output": {"dir": str(out)}}


def flow_cfg(out, beta: float = 1.0, steps: int = HUGE) -> dict:
    return {"lattice": {"shape": [4, 4]}, "group": "u1", "algorithm": "flow", "seed": 5,
            "action": {"beta": beta}, "flow": {"n_layers": 2, "hidden": [4], "kernel_size": 3},
            "train": {"steps": steps, "batch": 4, "lr": 0.01, "schedule": "constant",
                      "checkpoint_every": 1000},
            "run": {"progress": False}, "output": {"dir": str(out)}}


def write(path, cfg: dict) -> str:
    with open(path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(cfg, fh)
    return str(path)


def start(args: list[str], log) -> subprocess.Popen:  # type: ignore[no-untyped-def]
    out = open(log, "w")  # noqa: SIM115 - closed by the OS with the child
    return subprocess.Popen([HPCFLOW, *args], env=ENV, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)


def wait_for(pred, p: subprocess.Popen, what: str, timeout: float = 180) -> None:  # type: ignore[no-untyped-def]
    t0 = time.time()
    while not pred():
        assert p.poll() is None, f"the run ended (rc {p.returncode}) before {what}"
        assert time.time() - t0 < timeout, f"timed out waiting for {what}"
        time.sleep(0.02)


def holder_pid(d) -> int | None:  # type: ignore[no-untyped-def]
    rec = holder_of(d)
    return None if rec is None else rec.get("pid")


def refused_line(r: subprocess.CompletedProcess, holder: subprocess.Popen) -> str:
    assert r.returncode == EXIT_BAD_INPUT, r.stdout + r.stderr
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1, r.stderr
    line = lines[0]
    assert line.startswith("hpcflow: ") and "in use by another hpcflow process" in line
    assert f"pid {holder.pid}" in line and f"host {socket.gethostname()}" in line and "started 20" in line
    return line


def second(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([HPCFLOW, *args], env=ENV, capture_output=True, text=True, timeout=300,
                          check=False)


def stop(p: subprocess.Popen, sig: int = signal.SIGTERM) -> int:
    p.send_signal(sig)
    return p.wait(timeout=300)


def ensemble(out) -> tuple[dict, list[torch.Tensor]]:  # type: ignore[no-untyped-def]
    ens = open_ensemble(os.path.join(out, "ensemble"))
    return ens.records(0), [U for _, U in ens.iter_configs(0)]


def assert_same(a, b) -> None:  # type: ignore[no-untyped-def]
    assert set(a[0]) == set(b[0])
    for k in a[0]:
        np.testing.assert_array_equal(a[0][k], b[0][k], err_msg=k)
    assert len(a[1]) == len(b[1]) and all(torch.equal(x, y) for x, y in zip(a[1], b[1]))


def finish_and_compare(tmp_path, cfg_path: str, out, min_rows: int = 4) -> None:  # type: ignore[no-untyped-def]
    """Resume the stopped sample run to n rows + 3 (in-process) and compare with an
    uninterrupted run of that length: the first run's ensemble is intact, row for row."""
    n = open_ensemble(os.path.join(out, "ensemble")).n_committed()
    assert n >= min_rows
    assert main(["sample", cfg_path, "--set", f"run.n_steps={n + 3}"]) == EXIT_OK
    ref = tmp_path / "ref"
    assert main(["sample", cfg_path, "--set", f"run.n_steps={n + 3}", "--set", f"output.dir={ref}"]) == EXIT_OK
    assert_same(ensemble(out), ensemble(ref))


# ---- the lock itself -------------------------------------------------------------------------
def test_lock_record_refusal_in_process_and_release(tmp_path) -> None:
    d = tmp_path / "out"
    with DirLock(d, command="hpcflow sample x.yaml") as lock:
        rec = holder_of(d)
        assert rec == lock.record and rec["pid"] == os.getpid() and rec["host"] == socket.gethostname()
        assert rec["command"] == "hpcflow sample x.yaml"
        with pytest.raises(DirectoryLocked, match=f"pid {os.getpid()}"):
            DirLock(d).acquire()  # POSIX locks are per process: refused by the registry
        assert lock.held  # the refused attempt did not drop the lock
    assert (d / LOCK_NAME).read_bytes() == b"" and holder_of(d) is None
    with DirLock(d):
        pass


def test_lock_file_that_is_a_symlink_or_output_dir_that_is_a_file(tmp_path) -> None:
    target = tmp_path / "victim"
    target.write_text("keep")
    d = tmp_path / "out"
    d.mkdir()
    os.symlink(target, d / LOCK_NAME)
    with pytest.raises(LockUnavailable, match="symbolic link"):
        DirLock(d).acquire()
    assert target.read_text() == "keep"
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(LockUnavailable, match="cannot create the output directory"):
        DirLock(f).acquire()
    rc = main(["sample", write(tmp_path / "c.yaml", baseline_cfg(f, n_steps=3))])
    assert rc == EXIT_BAD_INPUT


def test_lock_off_by_environment(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv(LOCK_ENV, "off")
    with DirLock(tmp_path) as a, DirLock(tmp_path) as b:
        assert a.disabled and b.disabled and not a.held
    assert "no lock" in capsys.readouterr().err


_HOLDER = """
import sys, time
from hpcflow.io.lock import DirLock
lock = DirLock(sys.argv[1], command="holder")
lock.acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_other_process_holds_then_dies_by_sigkill(tmp_path) -> None:
    d = tmp_path / "out"
    p = subprocess.Popen([sys.executable, "-c", _HOLDER, str(d)], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "held"
        with pytest.raises(DirectoryLocked) as e:
            DirLock(d).acquire()
        assert e.value.holder is not None and e.value.holder["pid"] == p.pid
        assert f"pid {p.pid}" in str(e.value) and "holder" in str(e.value) and "\n" not in str(e.value)
    finally:
        p.kill()
        p.wait()
    with DirLock(d) as lock:  # the kernel dropped the dead holder's lock
        assert holder_of(d) == lock.record


@pytest.mark.parametrize("content", [b"", b'{"host": "n1", "pi', b"\x00\xff garbage", None])
def test_killed_while_taking_the_lock_leaves_nothing_that_blocks(tmp_path, content) -> None:
    """What a kill during acquisition can leave: an empty lock file (killed after the open),
    a torn record (killed while writing it), garbage, or the full record of a dead process
    (killed after writing it): none of them blocks the next run."""
    d = tmp_path / "out"
    d.mkdir()
    dead = {"host": socket.gethostname(), "pid": 999999, "started": "2020-01-01T00:00:00Z", "command": "x"}
    (d / LOCK_NAME).write_bytes(json.dumps(dead).encode() if content is None else content)
    cfg = write(tmp_path / "c.yaml", baseline_cfg(d, n_steps=3))
    assert main(["sample", cfg]) == EXIT_OK
    assert open_ensemble(os.path.join(d, "ensemble")).n_committed() == 3


# ---- two real processes on one directory --------------------------------------------------------
def test_second_sample_is_refused_and_the_first_ensemble_is_intact(tmp_path) -> None:
    out = tmp_path / "out"
    a = write(tmp_path / "a.yaml", baseline_cfg(out))
    b = write(tmp_path / "b.yaml", baseline_cfg(out, beta=1.5))  # another beta, same directory
    p = start(["sample", a], tmp_path / "a.log")
    try:
        wait_for(lambda: holder_pid(out) == p.pid and len(committed_segments(str(out / "ensemble"), 0)) >= 1,
                 p, "the first run to hold the lock and commit a segment")
        refused_line(second(["sample", b]), p)
        refused_line(second(["sample", b, "--fresh"]), p)  # --fresh moves nothing while locked
        assert p.poll() is None
    finally:
        rc = stop(p)
    assert rc == EXIT_RESUMABLE, (tmp_path / "a.log").read_text()[-2000:]
    assert not any(n.startswith("previous-") for n in os.listdir(out))
    root = str(out / "ensemble")
    assert verify_ensemble(root) == []
    assert float(open_ensemble(root).attrs["beta"]) == 2.0
    finish_and_compare(tmp_path, a, out)


def test_second_run_is_refused_and_the_first_run_is_intact(tmp_path) -> None:
    out = tmp_path / "out"
    a = write(tmp_path / "a.yaml", {**baseline_cfg(out), "sample": {"checkpoint_every": 50}})
    b = write(tmp_path / "b.yaml", baseline_cfg(out, beta=1.5))
    p = start(["run", a], tmp_path / "a.log")
    hist = out / "history.jsonl"
    try:
        wait_for(lambda: holder_pid(out) == p.pid and hist.exists() and len(hist.read_text().splitlines()) >= 3,
                 p, "the first run to hold the lock and measure")
        refused_line(second(["run", b]), p)
        refused_line(second(["run", b, "--resume"]), p)
    finally:
        rc = stop(p)
    assert rc == EXIT_RESUMABLE, (tmp_path / "a.log").read_text()[-2000:]
    assert yaml.safe_load((out / "config.yaml").read_text())["action"]["beta"] == 2.0
    steps = [json.loads(x)["step"] for x in hist.read_text().splitlines()]
    assert steps == list(range(3, 3 + len(steps)))


def test_second_train_is_refused_and_the_first_training_is_intact(tmp_path) -> None:
    out = tmp_path / "out"
    a = write(tmp_path / "a.yaml", flow_cfg(out))
    b = write(tmp_path / "b.yaml", flow_cfg(out, beta=1.5))
    metrics = out / "train" / "metrics.jsonl"
    p = start(["train", a], tmp_path / "a.log")
    try:
        wait_for(lambda: holder_pid(out) == p.pid and metrics.exists() and len(metrics.read_text().splitlines()) >= 2,
                 p, "the first training to hold the lock and take steps")
        refused_line(second(["train", b]), p)
        refused_line(second(["run", b]), p)
    finally:
        rc = stop(p)
    assert rc == EXIT_RESUMABLE, (tmp_path / "a.log").read_text()[-2000:]
    ck = torch.load(out / "train" / "checkpoint.pt", weights_only=False)
    rows = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, ck["step"] + 1)) and ck["meta"]["beta"] == 1.0


def test_sigkill_while_holding_never_blocks_the_resume(tmp_path) -> None:
    out = tmp_path / "out"
    a = write(tmp_path / "a.yaml", baseline_cfg(out))
    p = start(["sample", a], tmp_path / "a.log")
    wait_for(lambda: holder_pid(out) == p.pid and len(committed_segments(str(out / "ensemble"), 0)) >= 2,
             p, "two committed segments")
    os.killpg(p.pid, signal.SIGKILL)
    p.wait(timeout=60)
    assert holder_pid(out) == p.pid  # its record stays in the file, but the lock is gone
    finish_and_compare(tmp_path, a, out)
    assert holder_of(out) is None  # released at the end of the resumed run


def test_sigkill_around_lock_acquisition_then_resume(tmp_path) -> None:
    """Kill 1 lands the moment the lock file appears (inside or right after the acquisition);
    kills 2 and 3 at random moments just after this run took the lock (recovery, first
    steps, first commits). No kill blocks the next run, and the final ensemble equals the
    uninterrupted one."""
    rng = random.Random(1818)
    out = tmp_path / "out"
    a = write(tmp_path / "a.yaml", baseline_cfg(out))
    for i in range(3):
        p = start(["sample", a], tmp_path / f"k{i}.log")
        if i == 0:
            wait_for(lambda: os.path.exists(out / LOCK_NAME), p, "the lock file", timeout=180)
        else:
            wait_for(lambda q=p: holder_pid(out) == q.pid, p, "this run to hold the lock", timeout=180)
            time.sleep(rng.uniform(0.0, 0.3))
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=60)
    finish_and_compare(tmp_path, a, out, min_rows=0)
