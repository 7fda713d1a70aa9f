"""``hpcflow plot`` (issue 19 item 4): the PNGs are generated, non-trivial in size, and titled
with group, lattice, beta, algorithm and chain (the title is also the PNG's ``Title`` text,
which is what is read back here)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hpcflow.analysis.plots import write_plots
from hpcflow.io.ensemble import Ensemble
from hpcflow.run.cli import EXIT_BAD_INPUT, EXIT_OK, main
from tests.unit.test_measure_cli import _write_ensemble

MIN_BYTES = 20_000  # an empty 1100 px figure is ~10 kB; these hold several panels of data


def _title(path: Path) -> str:
    with Image.open(path) as im:
        return str(im.text.get("Title", ""))  # type: ignore[attr-defined]


def _run_dir(tmp_path: Path, chains: int = 2, n: int = 300) -> Path:
    out = tmp_path / "run"
    _write_ensemble(str(out / "ensemble"), n_rows=n, chains=chains, algorithm="flow", seg=150,
                    columns=lambda rng, c, k: {"plaquette": 0.5 + 0.05 * rng.standard_normal(k),
                                               "S": rng.standard_normal(k),
                                               "accepted": (rng.random(k) < 0.4).astype(int),
                                               "log_q": rng.standard_normal(k), "log_w": rng.standard_normal(k)})
    (out / "train").mkdir()
    rows = [{"step": s, "loss": -60.0 - 5 * (1 - np.exp(-s / 10)), "ess": 0.1, "acceptance": 0.2, "lr": 1e-3,
             "beta": 1.5, "batch": 32, "time": 0.1} for s in range(1, 41)]
    (out / "train" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4')
    (out / "config.yaml").write_text("group: u1\nlattice:\n  shape: [4, 4]\naction:\n  beta: 1.5\n"
                                     "train:\n  batch: 32\n")
    return out


def test_plot_command_writes_titled_pngs(tmp_path, capsys) -> None:
    out = _run_dir(tmp_path)
    assert main(["plot", str(out), "--skip", "50", "--max-q-configs", "120"]) == EXIT_OK
    text = capsys.readouterr().out
    names = ["history_chain000.png", "history_chain001.png", "autocorrelation.png", "topology.png", "training.png"]
    for n in names:
        p = out / "plots" / n
        assert f"wrote {p}" in text
        assert p.stat().st_size > MIN_BYTES, (n, p.stat().st_size)
    label = "u1 4x4, beta 1.5, flow"
    assert _title(out / "plots" / "history_chain001.png") == f"Monte Carlo history: {label}, chain 1"
    assert _title(out / "plots" / "autocorrelation.png") == \
        f"Normalised autocorrelation: {label}, chains 0-1 (replicas); skip 50, bin 1"
    topo = _title(out / "plots" / "topology.png")
    assert topo.startswith(f"Topological charge: {label}, chains 0-1 (replicas)")
    assert "Q from the links of 240 of 600 configurations" in topo  # capped: said in the title
    assert "topology: Q computed from the links of 240 of 600 configurations" in text
    assert _title(out / "plots" / "training.png") == "Training: u1 4x4, beta 1.5, batch 32"
    assert not list((out / "plots").glob(".*"))  # no temporary files left


def test_write_plots_of_an_ensemble_dir_and_a_q_column(tmp_path, monkeypatch) -> None:
    """An ensemble directory alone; a stored Q column is used instead of the links; more
    chains than max_chains: history of the first ones only."""
    root = tmp_path / "x" / "ensemble"
    _write_ensemble(str(root), n_rows=200, chains=3, algorithm="hmc", seg=100)
    orig = Ensemble.records

    def records(self, chain=None):  # noqa: ANN001, ANN202
        r = orig(self, chain)
        r["Q"] = np.where(np.arange(len(r["step"])) % 7 == 0, 1.0, 0.0)
        return r
    monkeypatch.setattr(Ensemble, "records", records)
    notes: list[str] = []
    got = write_plots(root, out=tmp_path / "figs", max_chains=2, log=notes.append)
    assert [p.name for p in got] == ["history_chain000.png", "history_chain001.png", "autocorrelation.png",
                                     "topology.png"]
    assert all(p.parent == tmp_path / "figs" and p.stat().st_size > MIN_BYTES for p in got)
    assert "(Q column)" in _title(tmp_path / "figs" / "topology.png")
    assert any("chains 0, 1 of 3" in n for n in notes)
    # default destination: the run folder above <output.dir>/ensemble
    assert write_plots(root, max_chains=1)[0] == tmp_path / "x" / "plots" / "history_chain000.png"


def test_plot_bad_input_is_one_line(tmp_path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    assert main(["plot", str(tmp_path / "empty")]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nothing to plot" in err
    assert main(["plot", str(tmp_path / "nope")]) == EXIT_BAD_INPUT
    assert "no such directory" in capsys.readouterr().err
    assert main(["plot", str(tmp_path), "--skip", "-2"]) == EXIT_BAD_INPUT


@pytest.mark.parametrize("group", ["su2"])
def test_no_topology_without_q_outside_2d_u1(tmp_path, group: str) -> None:
    root = tmp_path / "ensemble"
    _write_ensemble(str(root), n_rows=60, chains=1, group=group, seg=60)
    notes: list[str] = []
    got = write_plots(root, out=tmp_path / "f", log=notes.append)
    assert [p.name for p in got] == ["history_chain000.png", "autocorrelation.png"]
    assert any("no topological-charge plot" in n for n in notes)


def test_run_of_a_baseline_writes_its_plots_from_the_history(tmp_path, monkeypatch) -> None:
    """Issue 19 item 4: plots are written at the end of `run` too (heat bath: history,
    autocorrelation and topology from history.jsonl), titled like the ensemble's; HPCFLOW_PLOTS=off
    (the test suite's setting) skips them."""
    import yaml

    monkeypatch.delenv("HPCFLOW_PLOTS", raising=False)

    cfg = tmp_path / "hb.yaml"
    cfg.write_text(yaml.safe_dump({"lattice": {"shape": [8, 8]}, "algorithm": "heatbath", "action": {"beta": 2.0},
                                   "run": {"n_therm": 5, "n_steps": 120, "progress": False},
                                   "output": {"dir": str(tmp_path / "o")}}))
    assert main(["run", str(cfg)]) == EXIT_OK
    plots = tmp_path / "o" / "plots"
    for name in ("history_chain000.png", "autocorrelation.png", "topology.png"):
        assert (plots / name).stat().st_size > MIN_BYTES, name
    assert _title(plots / "history_chain000.png") == "Monte Carlo history: u1 8x8, beta 2, heatbath, chain 0"
    assert _title(plots / "topology.png").startswith("Topological charge: u1 8x8, beta 2, heatbath")
    # and by hpcflow plot on the run directory
    assert main(["plot", str(tmp_path / "o")]) == EXIT_OK


def test_hpcflow_plots_off_skips_the_end_of_run_plots(tmp_path, monkeypatch) -> None:
    import yaml

    monkeypatch.setenv("HPCFLOW_PLOTS", "OFF")
    cfg = tmp_path / "hb.yaml"
    cfg.write_text(yaml.safe_dump({"lattice": {"shape": [4, 4]}, "algorithm": "heatbath", "action": {"beta": 2.0},
                                   "run": {"n_therm": 2, "n_steps": 20, "progress": False},
                                   "output": {"dir": str(tmp_path / "o")}}))
    assert main(["run", str(cfg)]) == EXIT_OK
    assert not (tmp_path / "o" / "plots").exists()
    assert main(["plot", str(tmp_path / "o")]) == EXIT_OK  # the command draws them regardless
    assert (tmp_path / "o" / "plots" / "history_chain000.png").exists()
