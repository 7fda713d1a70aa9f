"""Environment failures (issue 18, item 6): a full disk, a read-only file system, permission
denied on the files a run writes. Each ends with ONE line on stderr naming the path and what
to do, and exit status 4 (``hpcflow.exit_codes.EXIT_ENVIRONMENT``), on every rank under MPI;
HDF5 files are closed (no segfault at interpreter exit), nothing committed is lost, and a
rerun with ``--resume`` after freeing space gives the ensemble of an uninterrupted run.
``--debug`` (or ``HPCFLOW_DEBUG=1``) adds the traceback of such expected errors.

Regressions (before): a full disk in ``hpcflow sample`` printed an HDF5 traceback and then
crashed in HDF5's close at exit (rc 139, the temporary segment left behind); a read-only or
unwritable ``output.dir`` was exit 2, the code of bad input.

Real file systems where the machine allows it (we run as root in CI): a small tmpfs (full
disk), a read-only tmpfs, and a process without CAP_DAC_OVERRIDE (root otherwise ignores
permission bits). Where ``mount`` or ``setpriv`` is not permitted the same test injects the
error instead (it never skips); the injected variants run everywhere. Under MPI the commands
run with ``mpirun -n 2`` (launched from this serial tier, as tests/faults/test_mpi_errors.py).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator

import numpy as np
import pytest
import torch
import yaml

from hpcflow.exit_codes import EXIT_BAD_INPUT, EXIT_ENVIRONMENT
from hpcflow.io.ensemble import committed_segments, open_ensemble

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIMEOUT = 300  # a hang guard only (a run takes seconds)

# Runs hpcflow's CLI with injected failures, HPCFLOW_TEST_FAULT = "KIND:ERRNO:ARG[:RANK];...":
#   h5write:ENOSPC:N  the (N+1)-th and later writes of a configuration into a segment fail
#                     after the data went through (as a collective MPI-IO write reports it),
#                     with h5py's message and no errno attribute (recognised from the text);
#   ckpt:ENOSPC:N     the (N+1)-th and later chain checkpoints fail like write(2) (no file name);
#   open:EROFS:DIR    creating or opening for writing anything under DIR fails (EACCES too);
#   noreserve::       segments reserve no space (a file system without fallocate): a full disk
#                     then fails inside HDF5's writes and metadata flushes.
# RANK: only on that MPI rank.
_INJECT = r'''
import builtins, errno, os, sys

def install(kind, num, arg):
    if kind == "noreserve":
        import hpcflow.io.ensemble as ens

        ens._reserve = lambda path, length: None
    elif kind == "h5write":
        import h5py

        real_set, seen = h5py.Dataset.__setitem__, [0]

        def setitem(self, key, value):
            real_set(self, key, value)
            if self.name == "/U":
                seen[0] += 1
                if seen[0] > int(arg):
                    raise OSError("Can't write data (file write failed: filename = '%s', errno = %d, "
                                  "error message = '%s')" % (self.file.filename, num, os.strerror(num)))

        h5py.Dataset.__setitem__ = setitem
    elif kind == "ckpt":
        import hpcflow.io.checkpoint as ck

        real_write, seen = ck.atomic_write_bytes, [0]

        def atomic_write_bytes(path, data, overwrite=True):
            if ".ckpt" in os.path.basename(str(path)):
                seen[0] += 1
                if seen[0] > int(arg):
                    raise OSError(num, os.strerror(num))
            return real_write(path, data, overwrite)

        ck.atomic_write_bytes = atomic_write_bytes
    elif kind == "open":
        top = os.path.abspath(arg)
        real_open, real_mkdir, real_bopen = os.open, os.mkdir, builtins.open

        def under(p):
            p = os.path.abspath(os.fspath(p)) if isinstance(p, (str, bytes, os.PathLike)) else ""
            return p == top or p.startswith(top + os.sep)

        def fake_open(p, flags, *a, **k):
            if under(p) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                raise OSError(num, os.strerror(num), os.fspath(p))
            return real_open(p, flags, *a, **k)

        def fake_mkdir(p, *a, **k):
            if under(p):
                raise OSError(num, os.strerror(num), os.fspath(p))
            return real_mkdir(p, *a, **k)

        def fake_bopen(p, mode="r", *a, **k):
            if under(p) and any(c in mode for c in "wax+"):
                raise OSError(num, os.strerror(num), os.fspath(p))
            return real_bopen(p, mode, *a, **k)

        os.open, os.mkdir, builtins.open = fake_open, fake_mkdir, fake_bopen


me = os.environ.get("OMPI_COMM_WORLD_RANK", "0")
for spec in os.environ["HPCFLOW_TEST_FAULT"].split(";"):
    kind, code, arg, *rank = spec.split(":")
    if not rank or rank[0] == me:
        install(kind, getattr(errno, code) if code else 0, arg)

from hpcflow.run.cli import main

sys.exit(main(sys.argv[1:]))
'''


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OMPI_COMM_WORLD", "PMIX_", "PMI_", "HPCFLOW_DEBUG", "HPCFLOW_TEST_FAULT"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=REPO, OMPI_ALLOW_RUN_AS_ROOT="1",
               OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMPI_MCA_rmaps_base_oversubscribe="1", **extra)
    return env


def _hpcflow(args: list[str], fault: str | None = None, mpi: int = 0, prefix: list[str] | None = None,
             **env: str) -> tuple[int, str, str]:
    """``hpcflow ARGS`` in a fresh process (``mpirun -n MPI`` when ``mpi``), with the injected
    ``fault``; returns (exit status, stdout, stderr)."""
    cmd = [sys.executable, "-c", _INJECT] if fault else [sys.executable, "-m", "hpcflow"]
    if fault:
        env["HPCFLOW_TEST_FAULT"] = fault
    if mpi:
        assert shutil.which("mpirun") is not None, "mpirun not installed: run scripts/bootstrap.sh"
        cmd = ["mpirun", "--oversubscribe", "-n", str(mpi), *cmd]
    r = subprocess.run([*(prefix or []), *cmd, *args], env=_env(**env), cwd=REPO, capture_output=True,
                       text=True, timeout=TIMEOUT, check=False)
    return r.returncode, r.stdout, r.stderr


def _lines(err: str) -> list[str]:
    return [x for x in err.splitlines() if x.startswith("hpcflow:")]


def _one_line(rc: int, err: str, code: int = EXIT_ENVIRONMENT) -> str:
    """The run ended with ``code`` and exactly one ``hpcflow:`` line, no traceback, no crash."""
    assert rc == code, f"exit {rc}, expected {code}:\n{err[-4000:]}"
    lines = _lines(err)
    assert len(lines) == 1, err[-4000:]
    assert "Traceback" not in err and "Segmentation" not in err and "signal" not in err.lower(), err[-4000:]
    return lines[0]


def _cfg(path, out, shape=(8, 8), n_steps=40, every=2, **over) -> str:  # type: ignore[no-untyped-def]
    d = {"lattice": {"shape": list(shape)}, "group": "u1", "algorithm": "heatbath", "seed": 5,
         "backend": "torch", "run": {"n_therm": 1, "n_steps": n_steps, "progress": False},
         "sample": {"checkpoint_every": every}, "measure": {"wilson_loops": []},
         "output": {"dir": str(out)}, **over}
    os.makedirs(path, exist_ok=True)
    p = os.path.join(path, "c.yaml")
    with open(p, "w") as fh:
        yaml.safe_dump(d, fh)
    os.chmod(path, 0o755)
    os.chmod(p, 0o644)
    return p


# ---- real small file systems -------------------------------------------------------------------
def _mount(d: str, opts: str) -> bool:
    os.makedirs(d, exist_ok=True)
    if os.environ.get("HPCFLOW_TEST_NO_MOUNT"):  # exercise the injected fallbacks
        return False
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", d], capture_output=True, text=True,
                       check=False)
    return r.returncode == 0


def _remount(d: str, opts: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{opts}", d], check=True, capture_output=True)


@contextlib.contextmanager
def _tmpfs(d: str, opts: str) -> Iterator[bool]:
    """A tmpfs mounted at ``d`` (True), or False where mounting is not permitted."""
    ok = _mount(d, opts)
    try:
        yield ok
    finally:
        if ok:
            if subprocess.run(["umount", d], capture_output=True, check=False).returncode:
                subprocess.run(["umount", "-l", d], capture_output=True, check=False)


def _without_dac_override() -> list[str] | None:
    """A prefix that runs a command as root without CAP_DAC_OVERRIDE (permission bits then
    apply to root too), or None where that is not possible."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None or os.environ.get("HPCFLOW_TEST_NO_MOUNT"):
        return None
    pre = ["setpriv", "--bounding-set=-dac_override,-dac_read_search",
           "--inh-caps=-dac_override,-dac_read_search"]
    r = subprocess.run([*pre, "true"], capture_output=True, check=False)
    return pre if r.returncode == 0 else None


def _read_all(root: str, chain: int = 0) -> tuple[dict, list[torch.Tensor]]:
    ens = open_ensemble(root)  # opens and verifies every committed segment
    return ens.records(chain), [U for _, U in ens.iter_configs(chain)]


def _assert_same(got, ref) -> None:  # type: ignore[no-untyped-def]
    for k in ref[0]:
        np.testing.assert_array_equal(got[0][k], ref[0][k], err_msg=k)
    assert len(got[1]) == len(ref[1]) and all(torch.equal(a, b) for a, b in zip(got[1], ref[1]))


def _tmp_segments(out: str) -> list[str]:
    found = []
    for dirpath, _, names in os.walk(os.path.join(out, "ensemble")):
        found += [os.path.join(dirpath, n) for n in names if n.endswith(".tmp")]
    return found


# ---- read-only output directory, permission denied, bad input ------------------------------------
@pytest.mark.parametrize("command", ["run", "sample"])
def test_read_only_output_dir_one_line_exit_4(tmp_path, command: str) -> None:
    mnt = str(tmp_path / "ro")
    with _tmpfs(mnt, "ro,size=1m") as mounted:
        cfg = _cfg(str(tmp_path), mnt)
        rc, _, err = _hpcflow([command, cfg], fault=None if mounted else f"open:EROFS:{mnt}")
        line = _one_line(rc, err)
    assert mnt in line and "read-only" in line.lower(), line


def test_read_only_output_dir_injected_one_line_exit_4(tmp_path) -> None:
    out = str(tmp_path / "out")
    rc, _, err = _hpcflow(["run", _cfg(str(tmp_path), out)], fault=f"open:EROFS:{out}")
    line = _one_line(rc, err)
    assert out in line and "read-only" in line.lower(), line


@pytest.mark.parametrize("command", ["run", "sample"])
def test_permission_denied_on_output_dir_one_line_exit_4(tmp_path, command: str) -> None:
    base = tmp_path / "w"
    out = base / "out"
    cfg = _cfg(str(base), out)
    out.mkdir()
    pre = _without_dac_override()
    if pre is not None:
        os.chmod(tmp_path, 0o755)
        out.chmod(0o555)  # only root's CAP_DAC_OVERRIDE could write here: the process has none
    try:
        rc, _, err = _hpcflow([command, cfg], fault=None if pre else f"open:EACCES:{out}", prefix=pre)
    finally:
        out.chmod(0o755)
    line = _one_line(rc, err)
    assert str(out) in line and "permission denied" in line.lower() and "writable" in line, line


def test_bad_paths_the_user_gave_stay_exit_2(tmp_path) -> None:
    rc, _, err = _hpcflow(["config", str(tmp_path / "missing.yaml")])
    assert "missing.yaml" in _one_line(rc, err, EXIT_BAD_INPUT)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    rc, _, err = _hpcflow(["run", _cfg(str(tmp_path), blocker)])
    assert str(blocker) in _one_line(rc, err, EXIT_BAD_INPUT)


# ---- a full disk ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sample_reference(tmp_path_factory) -> tuple[dict, list[torch.Tensor]]:
    d = str(tmp_path_factory.mktemp("ref"))
    rc, _, err = _hpcflow(["sample", _cfg(d, os.path.join(d, "out"))])
    assert rc == 0, err[-3000:]
    return _read_all(os.path.join(d, "out", "ensemble"))


def _check_full_disk_stop(out: str, rc: int, err: str) -> None:
    line = _one_line(rc, err)
    assert "no space left on device" in line.lower() and "--resume" in line, line
    assert out in line, line
    ens = os.path.join(out, "ensemble")
    assert committed_segments(ens, 0), "nothing was committed before the disk filled"
    open_ensemble(ens)  # every committed segment opens and verifies
    assert _tmp_segments(out) == [], "the uncommitted temporary segment was left behind"


@pytest.mark.parametrize("where", ["tmpfs", "tmpfs-noreserve", "segment", "checkpoint"])
def test_full_disk_in_sample_ends_cleanly_and_resume_completes(tmp_path, sample_reference, where: str) -> None:
    """``where``: a real 256 KiB tmpfs that the ensemble (20 segments of 17 KiB) does not fit
    (the space reservation of a new segment fails; ``-noreserve``: as on a file system
    without fallocate, a write or a metadata flush inside HDF5 fails), injected into segment
    writes where mounting is not permitted; or ENOSPC injected into the writes of a
    configuration (h5py's message only) or of a chain checkpoint (an errno, no path)."""
    mnt = str(tmp_path / "disk")
    with _tmpfs(mnt, "size=256k") if where.startswith("tmpfs") else contextlib.nullcontext(False) as mounted:
        out = os.path.join(mnt, "out")
        cfg = _cfg(str(tmp_path), out)
        fault = {"segment": "h5write:ENOSPC:5", "checkpoint": "ckpt:ENOSPC:2",
                 "tmpfs-noreserve": "noreserve::"}.get(where)
        if where.startswith("tmpfs") and not mounted:
            fault = "h5write:ENOSPC:5"
        rc, _, err = _hpcflow(["sample", cfg], fault=fault)
        _check_full_disk_stop(out, rc, err)
        if mounted:
            _remount(mnt, "size=16m")  # space freed
        rc, _, err = _hpcflow(["sample", cfg, "--resume"])
        assert rc == 0, err[-3000:]
        _assert_same(_read_all(os.path.join(out, "ensemble")), sample_reference)


@pytest.fixture(scope="module")
def run_reference(tmp_path_factory) -> str:
    d = str(tmp_path_factory.mktemp("ref"))
    rc, _, err = _hpcflow(["run", _cfg(d, os.path.join(d, "out"), shape=(32, 32))])
    assert rc == 0, err[-3000:]
    with open(os.path.join(d, "out", "history.jsonl")) as fh:
        return fh.read()


@pytest.mark.parametrize("where", ["tmpfs", "checkpoint"])
def test_full_disk_in_run_ends_cleanly_and_resume_completes(tmp_path, run_reference: str, where: str) -> None:
    """``hpcflow run`` (history and chain checkpoints, 32 KiB each on a 32x32 lattice): the
    second checkpoint does not fit into a 64 KiB tmpfs (injected where mounting is not
    permitted); ``--resume`` after freeing space ends with the uninterrupted history."""
    mnt = str(tmp_path / "disk")
    with _tmpfs(mnt, "size=64k") if where == "tmpfs" else contextlib.nullcontext(False) as mounted:
        out = os.path.join(mnt, "out")
        cfg = _cfg(str(tmp_path), out, shape=(32, 32))
        rc, _, err = _hpcflow(["run", cfg], fault=None if mounted else "ckpt:ENOSPC:1")
        line = _one_line(rc, err)
        assert "no space left on device" in line.lower() and "--resume" in line and out in line, line
        assert os.path.exists(os.path.join(out, "checkpoints", "run.ckpt"))
        if mounted:
            _remount(mnt, "size=16m")
        rc, _, err = _hpcflow(["run", cfg, "--resume"])
        assert rc == 0, err[-3000:]
        with open(os.path.join(out, "history.jsonl")) as fh:
            assert fh.read() == run_reference


# ---- --debug -------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["before", "after", "env"])
def test_debug_adds_the_traceback_of_expected_errors(tmp_path, how: str) -> None:
    missing = str(tmp_path / "missing.yaml")
    rc, _, err = _hpcflow(["config", missing])
    assert "Traceback" not in err and _one_line(rc, err, EXIT_BAD_INPUT)
    args = {"before": ["--debug", "config", missing], "after": ["config", missing, "--debug"],
            "env": ["config", missing]}[how]
    line = _lines(err)[0]
    rc, _, err = _hpcflow(args, **({"HPCFLOW_DEBUG": "1"} if how == "env" else {}))
    assert rc == EXIT_BAD_INPUT and "Traceback" in err and "ConfigError" in err, err[-3000:]
    assert err.rstrip().splitlines()[-1] == line, err[-3000:]  # the same line, last


def test_debug_adds_the_traceback_of_environment_errors(tmp_path) -> None:
    out = str(tmp_path / "out")
    cfg = _cfg(str(tmp_path), out)
    rc, _, err = _hpcflow(["--debug", "run", cfg], fault=f"open:EROFS:{out}")
    assert rc == EXIT_ENVIRONMENT and "Traceback" in err, err[-3000:]
    last = err.rstrip().splitlines()[-1]
    assert last.startswith("hpcflow:") and out in last and "read-only" in last.lower(), err[-3000:]


def test_environment_errors_are_recognised() -> None:
    from hpcflow.exit_codes import EnvironmentFailure, environment_errno

    assert environment_errno(OSError(errno.ENOSPC, "No space left on device")) == errno.ENOSPC
    assert environment_errno(OSError(errno.EDQUOT, "Disk quota exceeded", "/x")) == errno.EDQUOT
    assert environment_errno(OSError(errno.EROFS, "Read-only file system", "/x")) == errno.EROFS
    h5 = RuntimeError("Unable to flush file's cached information (file write failed: errno = 28, "
                      "error message = 'No space left on device', buf = 0x0)")
    assert environment_errno(h5) == errno.ENOSPC
    assert environment_errno(OSError(errno.ENOENT, "No such file or directory", "/x")) is None
    # permission denied counts where the caller says the path is the run's output
    pe = PermissionError(errno.EACCES, "Permission denied", "/x")
    assert environment_errno(pe) is None and environment_errno(pe, access=True) == errno.EACCES
    try:  # a wrapper raised while handling one (the lock's LockUnavailable, ...)
        try:
            raise OSError(errno.EROFS, "Read-only file system", "/out/.hpcflow.lock")
        except OSError:
            raise ValueError("/out/.hpcflow.lock: cannot open the lock file") from None
    except ValueError as e:
        assert environment_errno(e) == errno.EROFS
    f = EnvironmentFailure(errno.ENOSPC, "/out/x: No space left on device")
    assert "/out/x" in str(f) and "--resume" in str(f) and environment_errno(f) == errno.ENOSPC


# ---- under MPI: one line, the same exit code on every rank, no hang ------------------------------
def test_full_disk_under_mpirun_one_line_exit_4_and_resume(tmp_path) -> None:
    """One chain on a 2-rank grid: the segments are written collectively (``mpio``); the
    resumed ensemble equals an uninterrupted 2-rank run (the action's global sums add in
    another order than on one rank)."""
    ref = str(tmp_path / "ref")
    rc, _, err = _hpcflow(["sample", _cfg(ref, os.path.join(ref, "out"), grid=[2, 1])], mpi=2)
    assert rc == 0, err[-3000:]
    mnt = str(tmp_path / "disk")
    with _tmpfs(mnt, "size=256k") as mounted:
        out = os.path.join(mnt, "out")
        cfg = _cfg(str(tmp_path), out, grid=[2, 1])
        rc, _, err = _hpcflow(["sample", cfg], fault=None if mounted else "h5write:ENOSPC:5:1", mpi=2)
        _check_full_disk_stop(out, rc, err)
        assert not _lines(err)[0].startswith("hpcflow: [rank"), err[-3000:]  # agreed, not aborted
        if mounted:
            _remount(mnt, "size=16m")
        rc, _, err = _hpcflow(["sample", cfg, "--resume"], mpi=2)
        assert rc == 0, err[-3000:]
        _assert_same(_read_all(os.path.join(out, "ensemble")), _read_all(os.path.join(ref, "out", "ensemble")))


@pytest.mark.parametrize("command", ["run", "sample"])
def test_checkpoint_enospc_on_rank_0_only_under_mpirun(tmp_path, command: str) -> None:
    """Rank 0 alone writes chain checkpoints: its error is agreed with the other rank (which
    would otherwise wait for it in a collective until the job is aborted)."""
    out = str(tmp_path / "out")
    cfg = _cfg(str(tmp_path), out, grid=[2, 1], shape=(8, 8))
    rc, _, err = _hpcflow([command, cfg], fault="ckpt:ENOSPC:1:0", mpi=2, HPCFLOW_SETTLE_S="60")
    line = _one_line(rc, err)
    assert not line.startswith("hpcflow: [rank") and "no space left on device" in line.lower(), line


def test_read_only_output_dir_under_mpirun_one_line_exit_4(tmp_path) -> None:
    mnt = str(tmp_path / "ro")
    with _tmpfs(mnt, "ro,size=1m") as mounted:
        cfg = _cfg(str(tmp_path), mnt, grid=[2, 1])
        rc, _, err = _hpcflow(["sample", cfg], fault=None if mounted else f"open:EROFS:{mnt}", mpi=2)
        line = _one_line(rc, err)
    assert mnt in line and "read-only" in line.lower(), line


# ---- job templates: requeue on 3 only --------------------------------------------------------------
_STUB = """#!/bin/bash
printf '%s ' "$@" >> "$STUB_LOG/{name}"
printf '\\n' >> "$STUB_LOG/{name}"
{body}
"""


@pytest.mark.parametrize("name", ["slurm_single_node.sh", "slurm_multi_node.sh", "slurm_gpu.sh", "pbs.sh",
                                  "mpirun.sh"])
def test_job_templates_do_not_requeue_an_environment_failure(tmp_path, name: str) -> None:
    """``jobs/*.sh`` with stub schedulers and an hpcflow that exits 3 (stopped, resumable),
    then 4 (disk full): 3 requeues (Slurm ``scontrol requeue``, PBS ``qsub``, the mpirun loop
    reruns with ``--resume``); 4 ends the job with 4, nothing requeued."""
    stubs, log = tmp_path / "stubs", tmp_path / "log"
    stubs.mkdir()
    log.mkdir()
    bodies = {"srun": 'while [ "${1#-}" != "$1" ]; do shift; done\nexec "$@"',
              # options with a value (pbs.sh: --hostfile F -n N --map-by M --bind-to B -x VAR)
              "mpirun": 'while [ "${1#-}" != "$1" ]; do case "$1" in -n|--hostfile|--map-by|--bind-to|-x) '
                        'shift;; esac; shift; done\nexec "$@"',
              "timeout": 'while [ "${1#-}" != "$1" ]; do shift; done\nshift\nexec "$@"',
              "scontrol": "exit 0", "qsub": "exit 0",
              # 3 on the first call, then the code in STUB_RC
              "hpcflow": '[ "$(wc -l < "$STUB_LOG/hpcflow")" -le 1 ] && exit 3\nexit "$STUB_RC"'}
    for tool, body in bodies.items():
        (stubs / tool).write_text(_STUB.format(name=tool, body=body))
        (stubs / tool).chmod(0o755)
    nodefile = tmp_path / "nodefile"  # pbs.sh gives mpirun the node file (exit 2 without one)
    nodefile.write_text("localhost\n")
    env = {"PATH": f"{stubs}:/usr/bin:/bin", "STUB_LOG": str(log), "SLURM_JOB_ID": "5", "HOME": str(tmp_path),
           "SLURM_RESTART_COUNT": "0", "PBS_O_WORKDIR": str(tmp_path), "CONFIG": "c.yaml", "CMD": "run",
           "PBS_NODEFILE": str(nodefile)}
    script = os.path.join(REPO, "jobs", name)
    args = ["2", "c.yaml", "run"] if name == "mpirun.sh" else ([] if name == "pbs.sh" else ["c.yaml", "run"])

    def job() -> int:
        return subprocess.run(["bash", script, *args], cwd=tmp_path, env={**env, "STUB_RC": "4"},
                              capture_output=True, text=True, timeout=60, check=False).returncode

    def calls(tool: str) -> list[str]:
        p = log / tool
        return [ln.strip() for ln in p.read_text().splitlines()] if p.exists() else []

    if name == "mpirun.sh":  # one job: 3, rerun with --resume, 4, end
        assert job() == EXIT_ENVIRONMENT
        assert calls("hpcflow") == ["run c.yaml", "run c.yaml --resume"]
        return
    assert job() == 0 and len(calls("scontrol") + calls("qsub")) == 1  # 3: requeued
    for f in log.iterdir():
        if f.name != "hpcflow":
            f.unlink()
    assert job() == EXIT_ENVIRONMENT  # the rerun meets the full disk: the job fails
    assert calls("scontrol") == [] and calls("qsub") == [] and len(calls("hpcflow")) == 2
