"""`hpcflow run` checkpoints and resume: a stopped and resumed chain equals an uninterrupted
one measurement for measurement; a signal stops it with exit 3 and a checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpcflow.run.cli import EXIT_RESUMABLE, main

DEMO = str(Path(__file__).resolve().parents[2] / "examples" / "u1_2d_hmc.yaml")
BASE = [DEMO, "--set", "algorithm=hmc", "--set", "lattice.shape=[4,4]", "--set", "run.n_therm=3", "--set", "run.progress=false",
        "--set", "sample.checkpoint_every=2"]


def history(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "history.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("algorithm", ["hmc", "heatbath"])
def test_extend_by_resume_equals_uninterrupted(tmp_path, algorithm):
    ref, part = tmp_path / "ref", tmp_path / "part"
    args = ["run", "--set", f"algorithm={algorithm}", *BASE]
    assert main([*args, "--set", f"output.dir={ref}", "--set", "run.n_steps=9"]) == 0
    assert main([*args, "--set", f"output.dir={part}", "--set", "run.n_steps=5"]) == 0
    assert main([*args, "--set", f"output.dir={part}", "--set", "run.n_steps=9", "--resume"]) == 0
    a, b = history(ref), history(part)
    assert len(a) == 9 and a == b  # bit-identical floats through JSON


def test_resume_without_checkpoint_starts_fresh(tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["run", *BASE, "--set", f"output.dir={out}", "--set", "run.n_steps=3", "--resume"]) == 0
    assert "starting a fresh chain" in capsys.readouterr().out
    assert len(history(out)) == 3


def test_resume_with_other_config_is_refused(tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["run", *BASE, "--set", f"output.dir={out}", "--set", "run.n_steps=3"]) == 0
    before = (out / "history.jsonl").read_bytes()
    rc = main(["run", *BASE, "--set", f"output.dir={out}", "--set", "action.beta=3.0", "--resume"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "run.ckpt" in err and len(err.strip().splitlines()) == 1
    assert (out / "history.jsonl").read_bytes() == before


def test_sigterm_checkpoints_and_exits_3_then_resume_completes(tmp_path):
    out = tmp_path / "o"
    exe = os.path.join(os.path.dirname(sys.executable), "hpcflow")
    cmd = [exe, "run", "--set", "algorithm=hmc", *BASE, "--set", f"output.dir={out}",
           "--set", "run.n_steps=100000"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    hist = out / "history.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not hist.exists() or len(hist.read_text().splitlines()) < 5):
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == EXIT_RESUMABLE, stderr
    assert "stopped by SIGTERM" in stdout
    done = len(history(out))
    assert (out / "checkpoints" / "run.ckpt").exists() and done >= 5
    # resume with a short total: finishes at once from the checkpoint, nothing lost
    n = done  # the checkpoint holds every measurement made before the stop
    assert main(["run", "--set", "algorithm=hmc", *BASE, "--set", f"output.dir={out}",
                 "--set", f"run.n_steps={n + 2}", "--resume"]) == 0
    h = history(out)
    assert [r["step"] for r in h] == list(range(4, 4 + n + 2))
