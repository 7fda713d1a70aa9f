"""No silent overwrite (issue 18, item 3), and ``hpcflow ensemble verify`` wiring.

Regressions: ``hpcflow run`` without ``--resume`` in a directory with results truncated
history, summary and checkpoint; ``run --resume`` with a changed config was refused but had
already rewritten ``config.yaml``; ``train`` without ``--resume`` replaced the model an
existing ensemble was sampled with (that ensemble could never be resumed); ``train --resume``
without a checkpoint silently started afresh. Now: results mean ``--resume`` or ``--fresh``
(which moves them aside into ``previous-<time>/`` first), a refused command changes no file,
and a model that chains were sampled with is never replaced.
"""

from __future__ import annotations

import os
import shutil

import pytest
import yaml

from hpcflow.io.ensemble import open_ensemble
from hpcflow.io.lock import LOCK_NAME
from hpcflow.run.cli import EXIT_BAD_INPUT, EXIT_OK, main


def baseline(out, **run) -> dict:  # type: ignore[no-untyped-def]
    return {"lattice": {"shape": [4, 4]}, "group": "u1", "algorithm": "hmc", "seed": 3,
            "action": {"beta": 2.0}, "hmc": {"n_steps": 3}, "backend": "torch",
            "run": {"n_therm": 2, "n_steps": 5, "measure_every": 1, "progress": False, **run},
            "sample": {"checkpoint_every": 2}, "measure": {"wilson_loops": []},
            "output": {"dir": str(out)}}


def flow(out, steps: int = 3) -> dict:
    return {"lattice": {"shape": [4, 4]}, "group": "u1", "algorithm": "flow", "seed": 9,
            "action": {"beta": 1.0}, "flow": {"n_layers": 2, "hidden": [4], "kernel_size": 3},
            "train": {"steps": steps, "batch": 4, "lr": 0.01, "schedule": "constant",
                      "checkpoint_every": 2},
            "run": {"measure_every": 1, "progress": False},
            "sample": {"n_therm": 1, "n_steps": 6, "batch": 4, "checkpoint_every": 3},
            "measure": {"wilson_loops": []}, "output": {"dir": str(out)}}


def cfg_file(tmp_path, cfg: dict, name: str = "c.yaml") -> str:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(cfg))
    return str(p)


def files(root) -> dict[str, bytes]:  # type: ignore[no-untyped-def]
    """Every file under ``root`` (but the lock file) with its bytes."""
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            if n != LOCK_NAME:
                with open(os.path.join(d, n), "rb") as fh:
                    out[os.path.relpath(os.path.join(d, n), root)] = fh.read()
    return out


def one_line(capsys) -> str:  # type: ignore[no-untyped-def]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hpcflow: "), err
    return err[0]


# ---- hpcflow run ------------------------------------------------------------------------------
def test_run_over_results_needs_resume_or_fresh(tmp_path, capsys) -> None:
    out = tmp_path / "out"
    c = cfg_file(tmp_path, baseline(out))
    assert main(["run", c]) == EXIT_OK
    before = files(out)
    capsys.readouterr()
    assert main(["run", c]) == EXIT_BAD_INPUT  # used to truncate history, summary, checkpoint
    line = one_line(capsys)
    for name in ("history.jsonl", "summary.json", "checkpoints/run.ckpt", "--resume", "--fresh"):
        assert name in line
    assert files(out) == before
    # --fresh: the old results go to previous-<time>/ intact; the new run is the same chain
    assert main(["run", c, "--fresh"]) == EXIT_OK
    assert "--fresh: moved" in capsys.readouterr().out
    prev = [n for n in os.listdir(out) if n.startswith("previous-")]
    assert len(prev) == 1
    assert files(out / prev[0]) == before
    now = files(out)
    assert now["history.jsonl"] == before["history.jsonl"]
    with pytest.raises(SystemExit) as e:  # argparse: exclusive options
        main(["run", c, "--resume", "--fresh"])
    assert e.value.code == EXIT_BAD_INPUT


def test_refused_resume_changes_no_file(tmp_path, capsys) -> None:
    """The config.yaml regression: a resume refused for another config rewrote it first."""
    out = tmp_path / "out"
    assert main(["run", cfg_file(tmp_path, baseline(out))]) == EXIT_OK
    before = files(out)
    other = baseline(out)
    other["action"]["beta"] = 3.0
    capsys.readouterr()
    assert main(["run", cfg_file(tmp_path, other, "other.yaml"), "--resume"]) == EXIT_BAD_INPUT
    assert "run.ckpt" in one_line(capsys)
    assert files(out) == before
    assert yaml.safe_load((out / "config.yaml").read_text())["action"]["beta"] == 2.0


def test_resume_extends_and_rewrites_config_only_when_accepted(tmp_path) -> None:
    out = tmp_path / "out"
    assert main(["run", cfg_file(tmp_path, baseline(out))]) == EXIT_OK
    assert main(["run", cfg_file(tmp_path, baseline(out, n_steps=8)), "--resume"]) == EXIT_OK
    assert yaml.safe_load((out / "config.yaml").read_text())["run"]["n_steps"] == 8
    assert len((out / "history.jsonl").read_text().splitlines()) == 8


# ---- hpcflow train ----------------------------------------------------------------------------
def test_train_rules(tmp_path, capsys) -> None:
    out = tmp_path / "out"
    c = cfg_file(tmp_path, flow(out))
    assert main(["train", c, "--resume"]) == EXIT_BAD_INPUT  # used to start afresh silently
    line = one_line(capsys)
    assert "no training checkpoint to resume" in line and "checkpoint.pt" in line
    assert not (out / "train").exists() and not (out / "config.yaml").exists()
    assert main(["train", c]) == EXIT_OK
    before = files(out)
    capsys.readouterr()
    assert main(["train", c]) == EXIT_BAD_INPUT  # used to replace the model
    assert "train/checkpoint.pt" in one_line(capsys)
    assert main(["train", c, "--resume"]) == EXIT_OK  # complete: not repeated, nothing touched
    assert "not repeated" in capsys.readouterr().out
    assert files(out) == before
    assert main(["run", c]) == EXIT_BAD_INPUT  # a flow run would retrain: the model is a result
    assert "train/checkpoint.pt" in one_line(capsys)
    assert main(["train", cfg_file(tmp_path, flow(out, steps=5), "more.yaml"), "--resume"]) == EXIT_OK
    assert len((out / "train" / "metrics.jsonl").read_text().splitlines()) == 5


def test_a_model_that_chains_were_sampled_with_is_never_replaced(tmp_path, capsys) -> None:
    out = tmp_path / "out"
    c = cfg_file(tmp_path, flow(out))
    assert main(["train", c]) == EXIT_OK
    assert main(["sample", c]) == EXIT_OK
    before = files(out)
    capsys.readouterr()
    more = cfg_file(tmp_path, flow(out, steps=5), "more.yaml")
    assert main(["train", more, "--resume"]) == EXIT_BAD_INPUT
    line = one_line(capsys)
    assert "chain000.ckpt" in line and "replace the model" in line and "--fresh" in line
    assert main(["run", more, "--resume"]) == EXIT_BAD_INPUT  # run would train further too
    one_line(capsys)
    assert files(out) == before
    # the ensemble still resumes with its model
    assert main(["sample", c, "--set", "sample.n_steps=9"]) == EXIT_OK
    assert open_ensemble(os.path.join(out, "ensemble")).n_committed() == 9
    # --fresh moves the ensemble, its chain checkpoints and the model aside together
    kept = files(out)
    assert main(["train", more, "--fresh"]) == EXIT_OK
    prev = [n for n in os.listdir(out) if n.startswith("previous-")]
    assert len(prev) == 1 and files(out / prev[0]) == kept
    assert not (out / "ensemble").exists()
    assert not (out / "checkpoints").exists() or not os.listdir(out / "checkpoints")
    assert len((out / "train" / "metrics.jsonl").read_text().splitlines()) == 5


def test_flow_run_resume_skips_finished_training_without_touching_the_model(tmp_path) -> None:
    out = tmp_path / "out"
    c = cfg_file(tmp_path, flow(out, steps=3))  # 3 % checkpoint_every != 0: the last save
    assert main(["train", c]) == EXIT_OK
    model = (out / "train" / "checkpoint.pt").read_bytes()
    stamp = (out / "train" / "checkpoint.pt").stat().st_mtime_ns
    assert main(["run", c, "--resume"]) == EXIT_OK
    assert (out / "train" / "checkpoint.pt").read_bytes() == model
    assert (out / "train" / "checkpoint.pt").stat().st_mtime_ns == stamp
    assert len((out / "history.jsonl").read_text().splitlines()) == 6


# ---- hpcflow sample ---------------------------------------------------------------------------
def test_sample_fresh_moves_the_ensemble_aside_and_keeps_the_model(tmp_path, capsys) -> None:
    out = tmp_path / "out"
    c = cfg_file(tmp_path, flow(out))
    assert main(["train", c]) == EXIT_OK
    assert main(["sample", c]) == EXIT_OK
    first = open_ensemble(os.path.join(out, "ensemble")).records(0)
    model = (out / "train" / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    assert main(["sample", c, "--fresh"]) == EXIT_OK
    assert "--fresh: moved ensemble, checkpoints/chain000.ckpt to" in capsys.readouterr().out
    prev = [n for n in os.listdir(out) if n.startswith("previous-")]
    assert len(prev) == 1 and sorted(os.listdir(out / prev[0])) == ["checkpoints", "ensemble"]
    assert (out / "train" / "checkpoint.pt").read_bytes() == model
    again = open_ensemble(os.path.join(out, "ensemble")).records(0)
    old = open_ensemble(os.path.join(out, prev[0], "ensemble")).records(0)
    for k in first:  # same seed, same model: the same chain again; the old one intact
        assert list(again[k]) == list(first[k]) == list(old[k])


# ---- hpcflow ensemble verify ------------------------------------------------------------------
def test_ensemble_verify_wiring(tmp_path, capsys, monkeypatch) -> None:
    import hpcflow.io.ensemble as ens

    calls = []

    def fake(root):  # type: ignore[no-untyped-def]
        calls.append(root)
        return [f"{root}/chain000/seg000001.h5: row 3 (step 7): checksum mismatch", "second problem"]

    monkeypatch.setattr(ens, "verify_ensemble", fake)
    assert main(["ensemble", "verify", str(tmp_path)]) == 1
    cap = capsys.readouterr()
    assert cap.out.splitlines() == fake(str(tmp_path)) and "2 problem(s)" in cap.err
    monkeypatch.setattr(ens, "verify_ensemble", lambda root: [])
    assert main(["ensemble", "verify", str(tmp_path)]) == EXIT_OK
    assert capsys.readouterr().out.strip() == f"{tmp_path}: ok"
    assert calls == [str(tmp_path), str(tmp_path)]


def test_ensemble_verify_on_a_real_ensemble(tmp_path, capsys) -> None:
    out = tmp_path / "out"
    c = cfg_file(tmp_path, baseline(out, n_steps=3))
    assert main(["sample", c]) == EXIT_OK
    capsys.readouterr()
    assert main(["ensemble", "verify", str(out / "ensemble")]) == EXIT_OK
    assert capsys.readouterr().out.strip().endswith(": ok")
    seg = out / "ensemble" / "chain000" / "seg000000.h5"
    raw = bytearray(seg.read_bytes())
    shutil.copy(seg, tmp_path / "orig.h5")
    import h5py

    with h5py.File(seg, "r") as f:  # the middle of the file may be HDF5 metadata: aim at U
        off = f["U"].id.get_offset() + f["U"].id.get_storage_size() // 2
    raw[off] ^= 0xFF  # a bit flip somewhere in the configurations
    seg.write_bytes(bytes(raw))
    assert main(["ensemble", "verify", str(out / "ensemble")]) == 1
    assert "seg000000.h5" in capsys.readouterr().out
