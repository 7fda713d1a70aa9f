"""Scheduler signals end every command resumably (issue 18, item 9).

Regression: ``timeout --preserve-status -s TERM 30 hpcflow run examples/demo.yaml --set
train.steps=20 --set sample.n_steps=2000000`` ended with exit 143, no checkpoint, no history,
nothing printed (a flow chain under ``hpcflow run``), while the README promises exit 3 after
a checkpoint. Here the demo (scaled down: the signal is sent once the chain, or the
training, is under way) and every algorithm (heat bath, HMC, flow, mixed) under ``run``,
``train`` and ``sample`` get SIGTERM (and SIGUSR1 for some) from outside, as a scheduler
sends it: each ends with exit 3 and a checkpoint, and the resumed command continues the same
chain: it equals an uninterrupted run, record for record and configuration for
configuration (training: loss for loss and weight for weight).

Real processes (the console script) get the signal; every wait is on a file (history line,
committed segment, metrics row), never on a clock guess; the stopped run is then extended to
a few steps past its stop, so the signal always lands mid-chain.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from hpcflow.io.ensemble import committed_segments, open_ensemble
from hpcflow.run.cli import EXIT_OK, EXIT_RESUMABLE, main

REPO = Path(__file__).resolve().parents[2]
HPCFLOW = os.path.join(os.path.dirname(sys.executable), "hpcflow")
ENV = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMIX_", "PMI_"))}
ENV["OMP_NUM_THREADS"] = "1"
HUGE = 10**7
FLOWS = ("flow", "mixed")


def config(out, algorithm: str) -> dict:
    return {"lattice": {"shape": [4, 4]}, "group": "u1", "algorithm": algorithm, "seed": 21,
            "action": {"beta": 1.5}, "backend": "torch",
            "hmc": {"n_steps": 3, "tau": 0.5}, "heatbath": {"n_overrelax": 1},
            "flow": {"n_layers": 2, "hidden": [4], "kernel_size": 3},
            "train": {"steps": 3, "batch": 4, "lr": 0.01, "schedule": "constant", "checkpoint_every": 2},
            "mixed": {"pattern": ["flow", "heatbath", "hmc"]},
            "run": {"n_therm": 2, "n_steps": HUGE, "measure_every": 1, "progress": False},
            "sample": {"n_therm": 2, "n_steps": HUGE, "batch": 4, "checkpoint_every": 4},
            "measure": {"wilson_loops": [[1, 1]]}, "output": {"dir": str(out)}}


def steps_key(algorithm: str) -> str:
    return "sample.n_steps" if algorithm in FLOWS else "run.n_steps"


def write(path: Path, cfg: dict) -> str:
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.fixture
def one_thread():  # type: ignore[no-untyped-def]
    """In-process training as in the 1-thread child (bitwise comparisons of trained weights)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def interrupt(args: list[str], ready, log: Path, sig: int = signal.SIGTERM) -> tuple[int, str]:  # type: ignore[no-untyped-def]
    """Start ``hpcflow ARGS``, wait until ``ready()``, send ``sig``; (exit status, output)."""
    with open(log, "w") as fh:
        p = subprocess.Popen([HPCFLOW, *args], env=ENV, stdout=fh, stderr=subprocess.STDOUT,
                             start_new_session=True)
        t0 = time.time()
        while not ready():
            if p.poll() is not None:
                pytest.fail(f"ended (rc {p.returncode}) before the signal: {log.read_text()[-2000:]}")
            assert time.time() - t0 < 240, "timed out waiting for the run to get going"
            time.sleep(0.02)
        p.send_signal(sig)
        rc = p.wait(timeout=300)
    return rc, log.read_text()


def lines(p: Path) -> list[dict]:
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()] if p.exists() else []


def n_lines(p: Path) -> int:
    try:
        return len(p.read_text().splitlines())
    except FileNotFoundError:
        return 0


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    """The tiny flow every sample test samples with (trained once)."""
    d = tmp_path_factory.mktemp("model")
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", write(d / "c.yaml", config(d / "out", "flow"))]) == EXIT_OK
    finally:
        torch.set_num_threads(torch_threads)
    return d / "out" / "train" / "checkpoint.pt"


def with_model(out: Path, model: Path) -> None:
    (out / "train").mkdir(parents=True)
    shutil.copy(model, out / "train" / "checkpoint.pt")


SIG = {"TERM": signal.SIGTERM, "USR1": signal.SIGUSR1}
RUN_CASES = [("heatbath", "TERM"), ("hmc", "TERM"), ("flow", "TERM"), ("mixed", "TERM"), ("mixed", "USR1"),
             ("heatbath", "USR1")]
SAMPLE_CASES = [("heatbath", "TERM"), ("hmc", "TERM"), ("flow", "TERM"), ("mixed", "TERM"), ("flow", "USR1")]
TRAIN_CASES = [("flow", "TERM"), ("mixed", "TERM"), ("flow", "USR1")]


# ---- hpcflow run ------------------------------------------------------------------------------
@pytest.mark.parametrize("algorithm,sig", RUN_CASES)
def test_run_signal_exit_3_checkpoint_and_resume_is_the_same_chain(tmp_path, algorithm, sig) -> None:
    out, ref = tmp_path / "out", tmp_path / "ref"
    c = write(tmp_path / "c.yaml", config(out, algorithm))
    hist = out / "history.jsonl"
    rc, log = interrupt(["run", c], lambda: n_lines(hist) >= 5, tmp_path / "run.log", SIG[sig])
    assert rc == EXIT_RESUMABLE, log[-2000:]
    assert f"stopped by SIG{sig}" in log and (out / "checkpoints" / "run.ckpt").exists()
    done = len(lines(hist))  # the checkpoint holds every measurement made before the stop
    assert done >= 5
    n = done + 3
    assert main(["run", c, "--resume", "--set", f"{steps_key(algorithm)}={n}"]) == EXIT_OK
    if algorithm in FLOWS:  # the reference samples with the same model file (no retraining)
        with_model(ref, out / "train" / "checkpoint.pt")
    assert main(["run", c, "--resume", "--set", f"{steps_key(algorithm)}={n}", "--set", f"output.dir={ref}"]) == EXIT_OK
    got, want = lines(hist), lines(ref / "history.jsonl")
    assert len(got) == n and got == want  # bit-identical floats through JSON
    assert json.loads((out / "summary.json").read_text())["observables"]["plaquette"]["n"] == n


def test_demo_sigterm_in_the_flow_chain(tmp_path) -> None:
    """The issue's command, scaled down: SIGTERM once the demo's flow chain is under way."""
    out, ref = tmp_path / "out", tmp_path / "ref"
    demo = str(REPO / "examples" / "demo.yaml")
    common = [demo, "--set", "train.steps=20", "--set", "run.progress=false"]
    hist = out / "history.jsonl"
    rc, log = interrupt(["run", *common, "--set", "sample.n_steps=2000000", "--set", f"output.dir={out}"],
                        lambda: n_lines(hist) >= 20, tmp_path / "demo.log")
    assert rc == EXIT_RESUMABLE, log[-2000:]
    assert "stopped by SIGTERM" in log and (out / "checkpoints" / "run.ckpt").exists()
    n = len(lines(hist)) + 5
    assert main(["run", *common, "--resume", "--set", f"sample.n_steps={n}", "--set", f"output.dir={out}"]) == EXIT_OK
    with_model(ref, out / "train" / "checkpoint.pt")
    assert main(["run", *common, "--resume", "--set", f"sample.n_steps={n}", "--set", f"output.dir={ref}"]) == EXIT_OK
    assert lines(hist) == lines(ref / "history.jsonl") and len(lines(hist)) == n
    assert (out / "summary.json").exists()


def test_demo_sigterm_during_training_under_run(tmp_path, one_thread) -> None:
    """SIGTERM while `hpcflow run` trains: exit 3 with the training checkpoint; the resumed
    run finishes the training and samples the chain of an uninterrupted run."""
    out, ref = tmp_path / "out", tmp_path / "ref"
    demo = str(REPO / "examples" / "demo.yaml")
    common = [demo, "--set", "train.schedule=constant", "--set", "run.progress=false",
              "--set", "sample.n_steps=40", "--set", "sample.n_therm=2"]
    metrics = out / "train" / "metrics.jsonl"
    rc, log = interrupt(["run", *common, "--set", "train.steps=100000", "--set", f"output.dir={out}"],
                        lambda: n_lines(metrics) >= 2, tmp_path / "demo.log")
    assert rc == EXIT_RESUMABLE, log[-2000:]
    assert "training stopped by a signal" in log and (out / "train" / "checkpoint.pt").exists()
    done = torch.load(out / "train" / "checkpoint.pt", weights_only=False)["step"]
    k = done + 2
    assert main(["run", *common, "--resume", "--set", f"train.steps={k}", "--set", f"output.dir={out}"]) == EXIT_OK
    assert main(["run", *common, "--set", f"train.steps={k}", "--set", f"output.dir={ref}"]) == EXIT_OK
    assert [r["loss"] for r in lines(metrics)] == [r["loss"] for r in lines(ref / "train" / "metrics.jsonl")]
    assert lines(out / "history.jsonl") == lines(ref / "history.jsonl")


# ---- hpcflow sample ---------------------------------------------------------------------------
@pytest.mark.parametrize("algorithm,sig", SAMPLE_CASES)
def test_sample_signal_exit_3_checkpoint_and_resume_is_the_same_chain(tmp_path, model, algorithm, sig) -> None:
    out, ref = tmp_path / "out", tmp_path / "ref"
    if algorithm in FLOWS:
        with_model(out, model)
        with_model(ref, model)
    c = write(tmp_path / "c.yaml", config(out, algorithm))
    root = str(out / "ensemble")
    rc, log = interrupt(["sample", c], lambda: len(committed_segments(root, 0)) >= 1, tmp_path / "s.log", SIG[sig])
    assert rc == EXIT_RESUMABLE, log[-2000:]
    assert (out / "checkpoints" / "chain000.ckpt").exists()
    n = open_ensemble(root).n_committed() + 3
    assert main(["sample", c, "--set", f"{steps_key(algorithm)}={n}"]) == EXIT_OK
    assert main(["sample", c, "--set", f"{steps_key(algorithm)}={n}", "--set", f"output.dir={ref}"]) == EXIT_OK
    a, b = open_ensemble(root), open_ensemble(str(ref / "ensemble"))
    ra, rb = a.records(0), b.records(0)
    assert len(ra["step"]) == n and set(ra) == set(rb)
    for key in ra:
        np.testing.assert_array_equal(ra[key], rb[key], err_msg=key)
    assert all(torch.equal(x, y) for (_, x), (_, y) in zip(a.iter_configs(0), b.iter_configs(0)))


# ---- hpcflow train ----------------------------------------------------------------------------
@pytest.mark.parametrize("algorithm,sig", TRAIN_CASES)
def test_train_signal_exit_3_checkpoint_and_resume_is_the_same_training(tmp_path, one_thread, algorithm,
                                                                          sig) -> None:
    out, ref = tmp_path / "out", tmp_path / "ref"
    cfg = config(out, algorithm)
    cfg["train"].update(steps=HUGE, checkpoint_every=1000)
    c = write(tmp_path / "c.yaml", cfg)
    metrics = out / "train" / "metrics.jsonl"
    rc, log = interrupt(["train", c], lambda: n_lines(metrics) >= 3, tmp_path / "t.log", SIG[sig])
    assert rc == EXIT_RESUMABLE, log[-2000:]
    assert "training stopped by a signal" in log
    done = torch.load(out / "train" / "checkpoint.pt", weights_only=False)["step"]
    assert done >= 3 and [r["step"] for r in lines(metrics)][:done] == list(range(1, done + 1))
    k = done + 2
    assert main(["train", c, "--resume", "--set", f"train.steps={k}"]) == EXIT_OK
    assert main(["train", c, "--set", f"train.steps={k}", "--set", f"output.dir={ref}"]) == EXIT_OK
    assert lines(metrics) and [r["loss"] for r in lines(metrics)] == [r["loss"] for r in lines(ref / "train" / "metrics.jsonl")]
    a = torch.load(out / "train" / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(ref / "train" / "checkpoint.pt", weights_only=False)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def test_run_sigterm_during_start_up_is_resumable(tmp_path, one_thread) -> None:
    """A signal before training and chain have started (right after the run took its
    output.dir) is not lost: one stop flag covers the whole command, so the run still ends
    with exit 3 and a checkpoint (here after the first training step), and resumes."""
    from hpcflow.io.lock import holder_of

    out, ref = tmp_path / "out", tmp_path / "ref"
    cfg = config(out, "flow")
    cfg["sample"]["n_steps"] = 12
    c = write(tmp_path / "c.yaml", cfg)
    box: dict = {}

    def locked() -> bool:
        rec = holder_of(out)
        return rec is not None and rec.get("pid") == box.get("pid")

    with open(tmp_path / "s.log", "w") as fh:
        p = subprocess.Popen([HPCFLOW, "run", c], env=ENV, stdout=fh, stderr=subprocess.STDOUT,
                             start_new_session=True)
        box["pid"] = p.pid
        t0 = time.time()
        while not locked():
            assert p.poll() is None and time.time() - t0 < 240, (tmp_path / "s.log").read_text()
            time.sleep(0.005)
        p.send_signal(signal.SIGTERM)
        rc = p.wait(timeout=300)
    log = (tmp_path / "s.log").read_text()
    assert rc == EXIT_RESUMABLE, log[-2000:]
    assert "stopped by a signal" in log or "stopped by SIGTERM" in log
    assert main(["run", c, "--resume"]) == EXIT_OK
    assert main(["run", c, "--set", f"output.dir={ref}"]) == EXIT_OK
    assert lines(out / "history.jsonl") == lines(ref / "history.jsonl") and len(lines(ref / "history.jsonl")) == 12
