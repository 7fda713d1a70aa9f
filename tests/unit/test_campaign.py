"""hpcflow.run.campaign: campaign YAML validation, expansion, scripts, (re)submission logic, status.

Submission is checked against a recording fake of sbatch/squeue/scancel here; the real
scheduler is exercised in tests/slurm/test_slurm_campaign.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from hpcflow.run import campaign as cp

ROOT = Path(__file__).resolve().parents[2]


def _raw(**kw: Any) -> dict:
    raw = {"name": "t", "seed": 9, "dir": "camp",
           "config": {"lattice.shape": [4, 4], "group": "u1", "algorithm": "hmc", "run": {"n_steps": 5}},
           "beta": [1.0, 2.0], "chains": 2, "hpcflow": "/opt/bin/hpcflow",
           "stages": {"train": {"command": "run", "set": {"output.dir": "{chain_dir}/train"}},
                      "sample": {"command": "run", "after": ["train"]}}}
    raw.update(kw)
    return {k: v for k, v in raw.items() if v is not None}  # None: leave the key out


def _load(tmp_path: Path, raw: dict) -> cp.Campaign:
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(raw))
    return cp.load_campaign(p)


class FakeSlurm:
    """Records sbatch/scancel calls; squeue answers from ``queue`` (job id -> state)."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.queue: dict[str, str] = {}
        self.next = 100

    def __call__(self, cmd: list[str], **kw: Any) -> subprocess.CompletedProcess:
        self.calls.append(cmd)
        if cmd[0] == "sbatch":
            self.next += 1
            self.queue[str(self.next)] = "PENDING"
            return subprocess.CompletedProcess(cmd, 0, f"{self.next}\n", "")
        if cmd[0] == "squeue":
            ids = cmd[cmd.index("-j") + 1].split(",")
            out = "".join(f"{i} {self.queue[i]}\n" for i in ids if i in self.queue)
            return subprocess.CompletedProcess(cmd, 0, out, "")
        if cmd[0] == "scancel":
            self.queue.pop(cmd[1], None)
            return subprocess.CompletedProcess(cmd, 0, "", "")
        raise AssertionError(f"unexpected command {cmd}")

    def sbatches(self) -> list[list[str]]:
        return [c for c in self.calls if c[0] == "sbatch"]


def test_expand_chains_seeds_and_configs(tmp_path: Path) -> None:
    c = _load(tmp_path, _raw())
    chains = cp.expand_chains(c)
    assert [ch.id for ch in chains] == ["beta1-c0", "beta1-c1", "beta2-c0", "beta2-c1"]
    assert len({ch.seed for ch in chains}) == 4 and all(0 <= ch.seed < 2**63 for ch in chains)
    # seeds are keyed by the scan point: adding a beta keeps the seeds of existing chains
    more = cp.expand_chains(_load(tmp_path, _raw(beta=[0.5, 1.0, 2.0])))
    assert {ch.id: ch.seed for ch in more if ch.id in {x.id for x in chains}} == {x.id: x.seed for x in chains}
    train, sample = c.stages
    cfg = cp.job_config(c, chains[3], train)
    assert cfg["action"]["beta"] == 2.0 and cfg["seed"] == chains[3].seed
    assert cfg["output"]["dir"] == str(Path(c.dir) / "chains" / "beta2-c1" / "train")
    assert cp.job_config(c, chains[3], sample)["output"]["dir"] == str(Path(c.dir) / "chains" / "beta2-c1")


def test_scan_formats(tmp_path: Path) -> None:
    c = _load(tmp_path, _raw(beta={"start": 1.0, "stop": 2.0, "num": 3}))
    assert c.axes == (("action.beta", (1.0, 1.5, 2.0)),)
    c = _load(tmp_path, _raw(beta=None, scan={"action.beta": {"start": 1.0, "stop": 2.0, "step": 0.5},
                                              "hmc.tau": [0.5, 1.0]}))
    assert c.axes == (("action.beta", (1.0, 1.5, 2.0)), ("hmc.tau", (0.5, 1.0)))
    assert len(cp.expand_chains(c)) == 3 * 2 * 2


@pytest.mark.parametrize("beta", ["1.0-2.0", {"from": 1.0, "to": 2.0}, [1.0, "x"], [], 2.0, [1.0, 1.0]])
def test_unknown_beta_format(tmp_path: Path, beta: Any) -> None:
    with pytest.raises(cp.CampaignError, match=r"key 'beta': got .*; allowed: "):
        _load(tmp_path, _raw(beta=beta))


def test_missing_train_section(tmp_path: Path) -> None:
    with pytest.raises(cp.CampaignError, match="stage 'sample': 'after' names 'train', which is not a stage"):
        _load(tmp_path, _raw(stages={"sample": {"command": "run", "after": ["train"]}}))
    flow = {"lattice.shape": [4, 4], "algorithm": "flow"}
    with pytest.raises(cp.CampaignError, match="needs a trained flow.*add a stages.train section"):
        _load(tmp_path, _raw(config=flow, stages={"sample": {}}))
    with pytest.raises(cp.CampaignError, match="missing key 'stages'"):
        _load(tmp_path, {k: v for k, v in _raw().items() if k != "stages"})


def test_cyclic_dependency(tmp_path: Path) -> None:
    stages = {"train": {"command": "run", "after": ["sample"]}, "sample": {"command": "run", "after": ["train"]}}
    with pytest.raises(cp.CampaignError, match=r"cyclic dependency (train -> sample -> train|sample -> train -> sample);"):
        _load(tmp_path, _raw(stages=stages))


@pytest.mark.parametrize(("change", "match"), [
    ({"chains": 0}, "key 'chains': got 0; allowed: an integer >= 1"),
    ({"name": "a b"}, "key 'name'"),
    ({"slurm": {"mpi": "openmpi"}}, "key 'slurm.mpi': got 'openmpi'; allowed: pmix, pmi2, none"),
    ({"stages": {"train": {"command": "fit"}}}, "key 'stages.train.command': got 'fit'"),
    ({"stages": {"train": {"command": "run", "resources": {"time": "soon"}}}}, "stages.train.resources.time"),
    ({"stages": {"train": {"command": "run", "set": {"run.n_steps": 0}}}}, r"chain beta1-c0, stage train.*run.n_steps"),
    ({"bogus": 1}, "key 'bogus'"),
])
def test_bad_campaign_fails_before_submission(tmp_path: Path, change: dict, match: str,
                                              capsys: pytest.CaptureFixture) -> None:
    """Every error is found while loading, so main() exits 2 and never reaches sbatch."""
    with pytest.raises(cp.CampaignError, match=match):
        _load(tmp_path, _raw(**change))
    assert cp.main([str(tmp_path / "c.yaml")]) == 2
    assert capsys.readouterr().err.startswith("hpcflow campaign: ")
    assert not (tmp_path / "camp").exists()


def test_script_requeues_and_resumes(tmp_path: Path) -> None:
    c = _load(tmp_path, _raw(slurm={"mpi": "pmi2", "signal_seconds": 120, "partition": "gpu"}))
    ch = cp.expand_chains(c)[0]
    s = cp.render_script(c, ch, c.stages[1])
    for line in ("#SBATCH --signal=TERM@120", "#SBATCH --requeue", "#SBATCH --partition=gpu",
                 'scontrol requeue "$SLURM_JOB_ID"', "resume=(--resume)", "srun --mpi=pmi2 /opt/bin/hpcflow run "):
        assert line in s
    p = tmp_path / "s.sh"
    p.write_text(s)
    assert subprocess.run(["bash", "-n", str(p)], check=False).returncode == 0
    no_resume = _load(tmp_path, _raw(stages={"train": {"command": "run", "resume": False}}))
    assert "resume=(--resume)" not in cp.render_script(no_resume, ch, no_resume.stages[0])


def test_dry_run_prints_and_submits_nothing(tmp_path: Path) -> None:
    c = _load(tmp_path, _raw())
    fake, printed = FakeSlurm(), []
    cp.submit(c, dry_run=True, run=fake, out=printed.append)
    assert fake.calls == []
    assert sum(p.startswith("#!/bin/bash") for p in printed) == 8
    assert not Path(c.dir).exists()


def test_submit_dependencies_and_resubmission(tmp_path: Path) -> None:
    c = _load(tmp_path, _raw(beta=[1.0], chains=1))
    fake = FakeSlurm()
    state = cp.submit(c, run=fake, out=lambda s: None)
    sb = fake.sbatches()
    assert len(sb) == 2 and not any(a.startswith("--dependency") for a in sb[0])
    assert "--dependency=afterok:101" in sb[1]
    assert state["jobs"]["beta1-c0/sample"]["job_id"] == "102"
    assert json.loads((Path(c.dir) / "campaign_state.json").read_text()) == state
    assert (Path(c.dir) / "configs" / "beta1-c0.train.yaml").exists()

    # both still queued: nothing to do
    cp.submit(c, run=fake, out=lambda s: None)
    assert len(fake.sbatches()) == 2

    # train failed (gone from the queue); sample still pending on it -> both replaced
    del fake.queue["101"]
    state = cp.submit(c, run=fake, out=lambda s: None)
    assert ["scancel", "102"] in fake.calls
    assert fake.sbatches()[2][-1].endswith("beta1-c0.train.sbatch")
    assert "--dependency=afterok:103" in fake.sbatches()[3]
    assert state["jobs"]["beta1-c0/train"]["history"] == ["101", "103"]

    # train done (status file written by the job), sample lost: sample alone, no dependency
    status = Path(c.dir) / "status"
    status.mkdir()
    (status / "beta1-c0.train.json").write_text(json.dumps({"state": "done", "job_id": "103"}))
    fake.queue.clear()
    cp.submit(c, run=fake, out=lambda s: None)
    last = fake.sbatches()[4]
    assert len(fake.sbatches()) == 5 and last[-1].endswith("beta1-c0.sample.sbatch")
    assert not any(a.startswith("--dependency") for a in last)


def test_status_table(tmp_path: Path) -> None:
    c = _load(tmp_path, _raw(beta=[1.0], chains=1))
    fake = FakeSlurm()
    cp.submit(c, run=fake, out=lambda s: None)
    fake.queue["101"] = "RUNNING"
    out = Path(c.dir) / "chains" / "beta1-c0"
    out.mkdir(parents=True)
    recs = [{"step": i, "plaquette": 0.5, "accepted": float(i % 4 != 0)} for i in range(8)]
    (out / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"step": 8, "plaq')
    rows = cp.campaign_status(c, run=fake)
    assert rows[0]["stages"]["train"] == {"job_id": "101", "state": "running", "restarts": 0}
    assert rows[0]["stages"]["sample"]["state"] == "pending"
    assert rows[0]["configs"] == 8  # the cut last line is not a committed measurement
    assert rows[0]["acceptance"] == pytest.approx(6 / 8)
    table = cp.format_status(c, rows)
    assert "0/1 chains finished" in table and "101 running" in table and "0.750" in table


def test_example_campaign_is_valid() -> None:
    c = cp.load_campaign(ROOT / "jobs" / "campaign_beta_scan.yaml")
    assert [s.name for s in c.stages] == ["train", "sample"] and len(cp.expand_chains(c)) == 6


_SINGLETON_PROBE = r"""
import json, subprocess, sys
from mpi4py import MPI
MPI.COMM_WORLD.Get_size()  # an MPI singleton: Open MPI setenv()s PMIX_*/OMPI_MCA_ess... in this process
from hpcflow.run.campaign import slurm
seen = {}
def run(cmd, **kw):
    if cmd[0] == "sbatch":
        seen["env"] = subprocess.run(["env", "-0"], capture_output=True, text=True, env=kw.get("env")).stdout
        return subprocess.CompletedProcess(cmd, 0, "7\n", "")
    raise AssertionError(cmd)
slurm._sbatch("job.sbatch", [], run)
names = [kv.split("=", 1)[0] for kv in seen["env"].split("\0") if kv]
print(json.dumps(names))
"""


def test_sbatch_gets_no_mpi_singleton_state(tmp_path: Path) -> None:
    """Regression: ``hpcflow campaign`` run from a process that had initialised MPI (a singleton:
    mpi4py imported, e.g. the test process itself) passed Open MPI's singleton variables
    (``OMPI_MCA_ess=singleton``, ``PMIX_NAMESPACE``, ``OMPI_MCA_orte_precondition_transports``...)
    through sbatch into the job, where two concurrent ``srun --mpi=pmix`` jobs then shared one
    vader shared-memory namespace: halo exchanges hung or segfaulted. The job's environment is
    the user's, without the launcher's state; user tuning (OMPI_MCA_btl...) is kept."""
    env = {**os.environ, "OMPI_MCA_btl": "self,vader", "PMIX_RANK": "5", "OMPI_COMM_WORLD_RANK": "1"}
    r = subprocess.run([sys.executable, "-c", _SINGLETON_PROBE], capture_output=True, text=True,
                       env=env, cwd=tmp_path, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    names = json.loads(r.stdout)
    leaked = [n for n in names if n.startswith(("PMIX_", "ORTE_", "OMPI_COMM_WORLD_", "OMPI_MCA_ess",
                                                 "OMPI_MCA_orte_", "OMPI_MCA_pmix", "OMPI_APP_CTX"))]
    assert leaked == []
    assert "OMPI_MCA_btl" in names and "PATH" in names
