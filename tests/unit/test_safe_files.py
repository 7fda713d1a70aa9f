"""Safe files (issue 18, item 5): temporary files are created exclusively and never followed
through symlinks; committed files are regular files.

Each test plants a symlink at the name a writer used to open by a predictable path
(``.segNNNNNN.h5.tmp``, ``.NAME.tmp.PID``) pointing at a victim file, and checks that the
victim keeps its bytes and that what gets committed is a regular file.
"""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest
import torch

from hpcflow.io.checkpoint import atomic_torch_save, atomic_write_bytes, load_checkpoint, save_checkpoint
from hpcflow.io.ensemble import EnsembleError, SegmentWriter, open_ensemble, remove_uncommitted, segment_path
from hpcflow.io.ildg import write_ildg
from hpcflow.lattice import Lattice, get_group, random_field
from hpcflow.rng import CounterRNG

VICTIM = b"precious data that must survive\n"


def _victim(tmp_path) -> str:  # type: ignore[no-untyped-def]
    p = tmp_path / "victim.txt"
    p.write_bytes(VICTIM)
    return str(p)


def _regular(path: str) -> bool:
    return stat.S_ISREG(os.lstat(path).st_mode)


def test_segment_temp_symlink_is_refused_not_followed(tmp_path) -> None:
    victim = _victim(tmp_path)
    root = str(tmp_path / "ens")
    lat = Lattice((4, 4))
    U = random_field(lat, get_group("u1"), CounterRNG(1))
    w = SegmentWriter(root, 0, 0, lat, 1, torch.complex128, 1, {})
    w.append(U, {"step": 1})
    w.commit()
    tmp = os.path.join(root, "chain000", ".seg000001.h5.tmp")
    for target in (victim, str(tmp_path / "does-not-exist")):  # live and dangling links
        os.symlink(target, tmp)
        with pytest.raises(EnsembleError, match="temporary segment already exists"):
            SegmentWriter(root, 0, 1, lat, 1, torch.complex128, 1, {})
        assert open(victim, "rb").read() == VICTIM
        assert not os.path.exists(tmp_path / "does-not-exist")
        assert os.path.islink(tmp)  # left alone
        assert remove_uncommitted(root, 0) == [tmp]  # removes the link itself, not its target
        assert open(victim, "rb").read() == VICTIM
    w = SegmentWriter(root, 0, 1, lat, 1, torch.complex128, 1, {})
    w.append(U, {"step": 2})
    assert w.commit() == segment_path(root, 0, 1)
    assert all(_regular(segment_path(root, 0, k)) for k in (0, 1))
    assert open_ensemble(root).n_committed() == 2


def test_segment_replaced_by_a_symlink_before_the_commit_is_not_committed(tmp_path) -> None:
    victim = _victim(tmp_path)
    root = str(tmp_path / "ens")
    lat = Lattice((4, 4))
    w = SegmentWriter(root, 0, 0, lat, 1, torch.complex128, 1, {})
    w.append(random_field(lat, get_group("u1"), CounterRNG(1)), {"step": 1})
    w.prepare()
    os.unlink(w.tmp)
    os.symlink(victim, w.tmp)
    with pytest.raises(EnsembleError, match="not a regular file"):
        w.publish()
    assert not os.path.lexists(segment_path(root, 0, 0)) and open(victim, "rb").read() == VICTIM


def _plant_predictable(path: str, victim: str) -> list[str]:
    """Symlinks at every name the old writer would have used (``.NAME.tmp.PID``)."""
    d, b = os.path.split(path)
    links = [os.path.join(d, f".{b}.tmp.{os.getpid()}"), os.path.join(d, f".{b}.tmp")]
    for p in links:
        os.symlink(victim, p)
    return links


@pytest.mark.parametrize("writer", ["bytes", "checkpoint", "torch", "ildg"])
def test_atomic_writers_never_follow_planted_symlinks(tmp_path, writer: str) -> None:
    victim = _victim(tmp_path)
    path = str(tmp_path / "out" / "file.bin")
    os.makedirs(os.path.dirname(path))
    links = _plant_predictable(path, victim)
    U = random_field(Lattice((2, 2, 2, 2)), get_group("su3"), CounterRNG(2))
    for _ in range(2):  # create, then replace
        if writer == "bytes":
            atomic_write_bytes(path, b"new content")
        elif writer == "checkpoint":
            save_checkpoint(path, {"step": 3}, "fp")
        elif writer == "torch":
            atomic_torch_save({"w": torch.ones(2)}, path)
        else:
            write_ildg(path, U, overwrite=True)
    assert open(victim, "rb").read() == VICTIM
    assert _regular(path)
    assert all(os.path.islink(p) for p in links)  # the planted links are not touched either
    assert sorted(os.listdir(os.path.dirname(path))) == sorted([os.path.basename(p) for p in links] + ["file.bin"])
    if writer == "checkpoint":
        assert load_checkpoint(path, "fp")["step"] == 3


def test_committed_name_that_is_a_symlink_is_replaced_not_followed(tmp_path) -> None:
    victim = _victim(tmp_path)
    path = str(tmp_path / "c.ckpt")
    os.symlink(victim, path)
    save_checkpoint(path, {"step": 1})
    assert _regular(path) and open(victim, "rb").read() == VICTIM
    # without overwrite, a symlink (even dangling) at the name is an existing file
    dangling = str(tmp_path / "d.lime")
    os.symlink(str(tmp_path / "nowhere"), dangling)
    with pytest.raises(FileExistsError):
        atomic_write_bytes(dangling, b"x", overwrite=False)
    assert not os.path.exists(tmp_path / "nowhere") and os.path.islink(dangling)


def test_temp_permissions_follow_the_umask_and_errors_name_the_target(tmp_path) -> None:
    old = os.umask(0o027)
    try:
        atomic_write_bytes(tmp_path / "f", b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "f").st_mode) == 0o640
    with pytest.raises(FileNotFoundError) as ei:
        atomic_write_bytes(tmp_path / "missing" / "f", b"x")
    assert ei.value.filename == str(tmp_path / "missing" / "f")


def test_sample_run_with_planted_symlinks_never_writes_the_victim(tmp_path) -> None:
    """A real ``sample`` run: symlinks to a victim planted at the temporary names of the next
    segments and of the checkpoint while the chain runs. The run stops with one line instead of
    writing through them; the committed files are regular; the rerun completes."""
    from hpcflow.config import config_from_dict
    from hpcflow.run.sample import EXIT_OK, chain_checkpoint_path, ensemble_dir, sample
    from hpcflow.signals import StopFlag

    victim = _victim(tmp_path)
    cfg = config_from_dict({
        "lattice": {"shape": [6, 6]}, "group": "u1", "algorithm": "heatbath", "seed": 5,
        "action": {"beta": 2.0}, "run": {"n_therm": 1, "n_steps": 8, "measure_every": 1},
        "sample": {"checkpoint_every": 3}, "output": {"dir": str(tmp_path / "run")}})
    root = ensemble_dir(cfg)
    ck = chain_checkpoint_path(cfg, 0)

    class Planter(StopFlag):
        polls = 0

        @property  # type: ignore[override]
        def stop_requested(self) -> bool:
            self.polls += 1
            if self.polls == 2:  # segment 0 is open: plant at the names of what comes next
                for k in (1, 2):
                    os.symlink(victim, os.path.join(root, "chain000", f".seg{k:06d}.h5.tmp"))
                os.makedirs(os.path.dirname(ck), exist_ok=True)
                for name in (ck, ck + ".next"):
                    _plant_predictable(name, victim)
            return False

        @stop_requested.setter
        def stop_requested(self, v: bool) -> None:
            pass

    with pytest.raises(EnsembleError, match="seg000001.h5.tmp: temporary segment already exists"):
        sample(cfg, use_mpi=False, stop=Planter())
    assert open(victim, "rb").read() == VICTIM
    assert _regular(segment_path(root, 0, 0)) and _regular(ck)
    assert open_ensemble(root).n_committed() == 3
    # the rerun removes the leftover temporary links (never their target) and completes
    assert sample(cfg, use_mpi=False) == EXIT_OK
    assert open(victim, "rb").read() == VICTIM
    assert open_ensemble(root).n_committed() == 8
    for k in range(3):
        assert _regular(segment_path(root, 0, k))
    assert _regular(ck)
    r = open_ensemble(root).records(0)
    assert np.all(np.diff(r["step"]) == 1)
