"""`hpcflow train` / `hpcflow run` for flows through the command line: reproducible from the
seed, resumable, SU(N) and mixed chains, clear errors for architectures that do not fit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from hpcflow.run.cli import EXIT_BAD_INPUT, EXIT_RESUMABLE, main

DEMO = str(Path(__file__).resolve().parents[2] / "examples" / "u1_2d_hmc.yaml")
TINY = [DEMO, "--set", "algorithm=flow", "--set", "flow.n_layers=2", "--set", "flow.hidden=[4]",
        "--set", "train.steps=4", "--set", "train.batch=4", "--set", "train.checkpoint_every=2",
        "--set", "sample.n_steps=32", "--set", "sample.batch=8", "--set", "run.progress=false"]


def lines(p: Path) -> list[dict]:
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()]


def test_run_is_reproducible_from_the_seed(tmp_path):
    """Same config, two processes' worth of runs: bit-identical training and chain (the
    initial weights come from the config seed, not from torch's global generator)."""
    for d in ("a", "b"):
        assert main(["run", *TINY, "--set", f"output.dir={tmp_path / d}"]) == 0
    assert (tmp_path / "a/history.jsonl").read_text() == (tmp_path / "b/history.jsonl").read_text()
    ma, mb = lines(tmp_path / "a/train/metrics.jsonl"), lines(tmp_path / "b/train/metrics.jsonl")
    assert [r["loss"] for r in ma] == [r["loss"] for r in mb] and len(ma) == 4
    s = json.loads((tmp_path / "a/summary.json").read_text())
    assert s["training_steps"] == 4 and "ess_per_proposal" in s and "reweighted" in s
    assert s["observables"]["Q2"]["exact"] > 0 and s["observables"]["plaquette"]["n"] == 32


def test_train_then_run_resume_does_not_retrain(tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["train", *TINY, "--set", f"output.dir={out}"]) == 0
    ckpt = out / "train" / "checkpoint.pt"
    stamp = ckpt.stat().st_mtime_ns
    assert main(["run", *TINY, "--set", f"output.dir={out}", "--resume"]) == 0
    assert ckpt.stat().st_mtime_ns == stamp  # training was complete: not repeated
    assert len(lines(out / "history.jsonl")) == 32


def test_su2_flow_and_mixed_chains(tmp_path):
    for algo in ("flow", "mixed"):
        out = tmp_path / algo
        assert main(["run", *TINY, "--set", "group=su2", "--set", "lattice.shape=[4,4]",
                     "--set", f"algorithm={algo}", "--set", f"output.dir={out}"]) == 0
        s = json.loads((out / "summary.json").read_text())
        assert s["group"] == "su2" and s["observables"]["plaquette"]["exact_kind"] == "exact infinite volume"


def test_architecture_that_does_not_fit_is_one_line_error(tmp_path, capsys):
    rc = main(["run", *TINY, "--set", "lattice.shape=[6,6]", "--set", f"output.dir={tmp_path}"])
    assert rc == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "6" in err and "u1_2d_hmc.yaml" in err


def test_sigterm_during_training_exits_3_and_resume_finishes(tmp_path):
    out = tmp_path / "o"
    exe = os.path.join(os.path.dirname(sys.executable), "hpcflow")
    args = [exe, "train", *TINY, "--set", "train.steps=100000", "--set", "train.checkpoint_every=1000",
            "--set", f"output.dir={out}"]
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "train" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == EXIT_RESUMABLE, stderr
    done = len(lines(metrics))
    assert (out / "train" / "checkpoint.pt").exists() and "stopped by a signal" in stdout
    assert main(["train", *TINY, "--set", f"train.steps={done + 2}", "--set", "train.checkpoint_every=1000",
                 "--set", f"output.dir={out}", "--resume"]) == 0
    assert [r["step"] for r in lines(metrics)] == list(range(1, done + 3))
