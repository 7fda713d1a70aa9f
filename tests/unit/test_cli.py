"""The CLI: sub-commands work end to end, bad input gives exit 2 and one line on stderr."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hpcflow.run.cli import EXIT_BAD_INPUT, main

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_config_defaults(capsys):
    assert main(["config", "--defaults"]) == 0
    out = capsys.readouterr().out
    assert yaml.safe_load(out)["lattice"]["shape"] == [8, 8]


def test_config_resolved_with_set(tmp_path, capsys):
    p = tmp_path / "c.yaml"
    p.write_text("group: su2\n")
    assert main(["config", str(p), "--set", "action.beta=3.5", "--set", "lattice.shape=[6,6]"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["group"] == "su2" and cfg["action"]["beta"] == 3.5 and cfg["lattice"]["shape"] == [6, 6]


@pytest.mark.parametrize("args,fragment", [
    (["run", "/nonexistent/x.yaml"], "no such config file"),
    (["config", "--set", "action.beta=-2"], "action.beta"),
    (["run", "--set", "group=su5", "/nonexistent.yaml"], "no such config file"),
])
def test_bad_input_exit_2_one_line(args, fragment, capsys):
    assert main(args) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and fragment in err and err.startswith("hpcflow: ")


def test_info_json(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    for key in ("hpcflow", "python", "torch", "numpy", "h5py", "h5py_mpi", "mpi4py", "mpi_library",
                "gpu_aware_mpi", "cupy"):
        assert key in info
    assert info["torch"]
    # plain text: Open MPI's library string ends in a NUL byte, which made the output binary
    assert not any("\0" in str(v) for v in info.values())
    assert info["backend_auto_cpu"] == "host" and info["host_compiler"]


def test_info_with_config_names_the_backend(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lattice: {shape: [8, 8]}\ngroup: u1\nalgorithm: hmc\n")
    assert main(["info", str(cfg), "--set", "backend=torch"]) == 0
    out = capsys.readouterr().out
    assert "backend_of_config" in out and "torch (backend: torch in" in out
    assert main(["info", str(cfg)]) == 0
    assert "host (backend: auto in" in capsys.readouterr().out


def test_console_script_installed():
    exe = os.path.join(os.path.dirname(sys.executable), "hpcflow")
    r = subprocess.run([exe, "config", "--set", "seed=oops"], capture_output=True, text=True, timeout=120)
    assert r.returncode == EXIT_BAD_INPUT
    assert "key 'seed'" in r.stderr and "oops" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_run_hmc_writes_history_and_summary(tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["run", str(EXAMPLES / "u1_2d_hmc.yaml"), "--set", "algorithm=hmc", "--set", f"output.dir={out}", "--set", "run.n_therm=2",
               "--set", "run.n_steps=6", "--set", "run.progress=false", "--set", "lattice.shape=[4,4]"])
    assert rc == 0
    lines = (out / "history.jsonl").read_text().splitlines()
    assert len(lines) == 6
    rec = json.loads(lines[0])
    assert {"step", "plaquette", "Q", "Q2", "accepted", "dH"} <= set(rec)
    summary = json.loads((out / "summary.json").read_text())
    plaq = summary["observables"]["plaquette"]
    assert {"mean", "error", "tau_int", "tau_int_error", "n", "exact"} <= set(plaq)
    assert plaq["n"] == 6
    assert "plaquette" in capsys.readouterr().out
    assert yaml.safe_load((out / "config.yaml").read_text())["lattice"]["shape"] == [4, 4]


@pytest.mark.parametrize(("argv", "fragment"), [
    (["--beta", "nan", "--L", "8"], "--beta: got nan; allowed: a finite number 0 .. 10000"),
    (["--beta", "inf", "--L", "8"], "--beta: got inf"),
    (["--beta", "1e6", "--L", "8"], "--beta: got 1000000.0"),  # used to allocate ~18 GiB
    (["--beta", "-1", "--L", "8"], "--beta: got -1.0"),
    (["--beta", "2", "--L", "1"], "--L: got 1; allowed: an integer 2 .. 65536"),
])
def test_exact_bounds_are_one_line_errors(argv: list[str], fragment: str, capsys) -> None:
    """Regression (issue 18): ``exact --beta nan`` ended in a traceback and ``--beta 1e6`` tried
    to allocate gigabytes; both are now one line and exit 2 before any work."""
    assert main(["exact", *argv]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1


def test_exact_prints_the_exact_values(capsys) -> None:
    from hpcflow.analysis import u1_2d_exact

    assert main(["exact", "--beta", "2", "--L", "8"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["plaquette"] == u1_2d_exact(2.0, L=8).plaquette
