"""Campaigns through a real Slurm: slurmctld + slurmd on localhost (scripts/slurm_test_cluster.sh).

What these tests prove, with the real ``sbatch``/``squeue``/``scontrol`` of Debian's slurm-wlm:
* a flow campaign (scan x chains; ``hpcflow train`` trains a 2D U(1) flow, then ``hpcflow
  sample`` runs one domain-decomposed flow chain on 2 ranks with that model) runs every stage to
  completion, each chain's sampling job starts only after its training job ended (Slurm's
  job-completion log), the sample stage's HDF5 ensemble holds the expected configurations
  (made with the trained model: its sha256 is in the file attributes), and ``hpcflow campaign
  status`` reports the committed count and acceptance read from that ensemble;
* a campaign submitted again submits nothing once everything is done;
* a job stopped by ``scontrol requeue`` runs again under the same job id and the campaign
  completes, with the dependent stage waiting for the rerun;
* a stage that exits 3 (stopped, resumable) is requeued by its own batch script and rerun with
  ``--resume``.
If the daemons cannot start, the fixture FAILS with the reason (never skips): CI must not
pass without the scheduler tier.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from hpcflow.run import campaign as cp

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "scripts" / "slurm_test_cluster.sh"
HPCFLOW = str(Path(sys.executable).parent / "hpcflow")


@pytest.fixture(scope="session")
def slurm(tmp_path_factory: pytest.TempPathFactory):
    """A private one-node Slurm; yields the cluster directory, SLURM_CONF set while it lives."""
    d = tmp_path_factory.mktemp("slurm")
    r = subprocess.run(["bash", str(CLUSTER), "start", str(d)], check=False, capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        subprocess.run(["bash", str(CLUSTER), "stop", str(d)], check=False, capture_output=True, timeout=120)
        pytest.fail(f"the Slurm test cluster did not start (rc {r.returncode}): {r.stderr.strip()[-2000:]}")
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(d / "slurm.conf")
    try:
        yield d
    finally:
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old
        subprocess.run(["bash", str(CLUSTER), "stop", str(d)], check=False, capture_output=True, timeout=120)


def _base(n_steps: int) -> dict:
    """2D U(1) 4x4 HMC: the tiniest real chain (the stand-in for train/sample until flows land)."""
    return {"lattice.shape": [4, 4], "group": "u1", "algorithm": "hmc",
            "hmc": {"n_steps": 4, "tau": 0.5},
            "run": {"n_therm": 2, "n_steps": n_steps, "progress": False},
            "measure": {"wilson_loops": [[1, 1]]}}


def _flow_base(n_steps: int) -> dict:
    """2D U(1) 8x8 flow (2 layers, hidden [4]), a few training steps and a short chain (8x8 so
    the 2-rank grid [2, 1] of the sample stage has local extents >= the layers' halo)."""
    return {"lattice.shape": [8, 8], "group": "u1", "algorithm": "flow",
            "flow": {"n_layers": 2, "hidden": [4], "kernel_size": 3},
            "train": {"steps": 4, "batch": 8, "lr": 0.01, "checkpoint_every": 2},
            "sample": {"n_therm": 2, "n_steps": n_steps, "batch": 8, "checkpoint_every": 4},
            "run": {"measure_every": 1, "progress": False}}


def _write(tmp: Path, raw: dict) -> Path:
    p = tmp / "campaign.yaml"
    p.write_text(yaml.safe_dump(raw, sort_keys=False))
    return p


def _wait(pred, timeout: float, what: str, slurm_dir: Path) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():
            return
        time.sleep(0.5)
    q = subprocess.run(["squeue", "-h", "-o", "%i %T %r"], check=False, capture_output=True, text=True).stdout
    log = (slurm_dir / "log" / "slurmctld.log").read_text()[-1500:]
    pytest.fail(f"timed out after {timeout} s waiting for {what}; squeue: {q!r}; slurmctld: {log}")


def _queue_empty() -> bool:
    r = subprocess.run(["squeue", "-h"], check=False, capture_output=True, text=True)
    return r.returncode == 0 and not r.stdout.strip()


def _jobcomp(slurm_dir: Path) -> list[dict]:
    """Slurm's own completion records (jobcomp/filetxt): JobId, JobState, StartTime, EndTime, ..."""
    recs = []
    for line in (slurm_dir / "log" / "jobcomp.log").read_text().splitlines():
        recs.append(dict(kv.split("=", 1) for kv in line.split() if "=" in kv))
    return recs


def _status(c: cp.Campaign, chain: str, stage: str) -> dict:
    return json.loads((Path(c.dir) / "status" / f"{chain}.{stage}.json").read_text())


def _release_when_pending(jid: str, slurm_dir: Path) -> None:
    """Requeued jobs wait ~2 minutes (BeginTime); make the rerun eligible now."""
    def pending() -> bool:
        r = subprocess.run(["squeue", "-h", "-j", jid, "-o", "%T"], check=False, capture_output=True, text=True)
        return r.stdout.strip() == "PENDING"
    _wait(pending, 60, f"job {jid} pending again after requeue", slurm_dir)
    subprocess.run(["scontrol", "update", f"JobId={jid}", "StartTime=now"], check=True,
                   capture_output=True, text=True)


def test_campaign_train_then_sample(slurm: Path, tmp_path: Path) -> None:
    """Two chains: hpcflow train (1 rank), then hpcflow sample (2 ranks via srun --mpi=pmix,
    one decomposed flow chain): all finish, in order, ensembles complete, status from HDF5."""
    from hpcflow.io import open_ensemble
    from hpcflow.io.checkpoint import file_sha256

    n = 12
    path = _write(tmp_path, {
        "name": "order", "seed": 11, "dir": "camp", "config": _flow_base(n), "beta": [1.0], "chains": 2,
        "hpcflow": HPCFLOW,
        "stages": {"train": {"resume": False},
                   "sample": {"after": ["train"], "set": {"grid": [2, 1]},
                              "resources": {"ntasks_per_node": 2}}}})
    assert cp.main([str(path)]) == 0
    c = cp.load_campaign(path)
    _wait(_queue_empty, 150, "the campaign's jobs to finish", slurm)
    state = json.loads((Path(c.dir) / "campaign_state.json").read_text())
    rows = cp.campaign_status(c)
    assert len(rows) == 2
    comp = {r["JobId"]: r for r in _jobcomp(slurm)}
    for row in rows:
        for st in ("train", "sample"):
            assert row["stages"][st]["state"] == "done", (row, _status(c, row["chain"], st))
        tj = state["jobs"][f"{row['chain']}/train"]["job_id"]
        sj = state["jobs"][f"{row['chain']}/sample"]["job_id"]
        assert comp[tj]["JobState"] == "COMPLETED" and comp[sj]["JobState"] == "COMPLETED"
        # ISO timestamps compare as strings; afterok: sampling starts after training ended
        assert comp[sj]["StartTime"] >= comp[tj]["EndTime"], (comp[tj], comp[sj])
        assert comp[tj]["ProcCnt"] == "1" and comp[sj]["ProcCnt"] == "2"
        out = Path(c.dir) / "chains" / row["chain"]
        model = out / "train" / "checkpoint.pt"
        assert model.stat().st_mtime <= (out / "ensemble").stat().st_mtime
        ens = open_ensemble(str(out / "ensemble"))
        rec = ens.records(0)
        assert ens.n_committed() == n and list(rec["step"]) == list(range(3, n + 3))
        attrs = ens.attrs
        assert attrs["algorithm"] == "flow" and int(attrs["ranks_per_chain"]) == 2
        assert attrs["model_sha256"] == file_sha256(str(model))  # sampled with the trained flow
        assert int(attrs["seed"]) == row["seed"]  # the chain seed derived by the campaign reached hpcflow
        # hpcflow campaign status: configurations and acceptance from the HDF5 ensemble
        assert row["configs"] == n
        assert row["acceptance"] == float(rec["accepted"].mean())
    table = cp.format_status(c, rows)
    assert "2/2 chains finished" in table
    assert f"{rows[0]['acceptance']:.3f}" in table
    # nothing left to do: a second submission submits no job
    before = state["jobs"]
    assert cp.main([str(path)]) == 0
    after = json.loads((Path(c.dir) / "campaign_state.json").read_text())["jobs"]
    assert after == before


def test_scontrol_requeue_resumes_to_completion(slurm: Path, tmp_path: Path) -> None:
    """A running train job stopped by 'scontrol requeue' reruns (same id) and the chain completes."""
    n = 10
    path = _write(tmp_path, {
        "name": "requeue", "seed": 5, "dir": "camp", "config": _base(n), "beta": [1.0], "chains": 1,
        "hpcflow": HPCFLOW,
        "stages": {"train": {"command": "run", "set": {"output.dir": "{chain_dir}/train",
                                                       "run.n_steps": 400}, "resume": False},
                   "sample": {"command": "run", "after": ["train"], "resume": False}}})
    c = cp.load_campaign(path)
    state = cp.submit(c, out=lambda s: None)
    tj = state["jobs"]["beta1-c0/train"]["job_id"]
    sj = state["jobs"]["beta1-c0/sample"]["job_id"]
    status_file = Path(c.dir) / "status" / "beta1-c0.train.json"
    _wait(lambda: status_file.exists() and _status(c, "beta1-c0", "train")["state"] == "running",
          60, "the train job to start", slurm)
    subprocess.run(["scontrol", "requeue", tj], check=True, capture_output=True, text=True)
    _release_when_pending(tj, slurm)
    _wait(_queue_empty, 150, "the requeued campaign to finish", slurm)
    train = _status(c, "beta1-c0", "train")
    assert train["state"] == "done" and train["restarts"] == 1 and train["job_id"] == tj
    assert _status(c, "beta1-c0", "sample")["state"] == "done"
    comp = [r for r in _jobcomp(slurm) if r["JobId"] in (tj, sj)]
    final_train = [r for r in comp if r["JobId"] == tj and r["JobState"] == "COMPLETED"]
    sample = [r for r in comp if r["JobId"] == sj]
    assert len(final_train) == 1 and len(sample) == 1 and sample[0]["JobState"] == "COMPLETED"
    assert sample[0]["StartTime"] >= final_train[0]["EndTime"]
    hist = (Path(c.dir) / "chains" / "beta1-c0" / "train" / "history.jsonl").read_text().splitlines()
    assert len(hist) == 400  # the rerun produced the whole chain again, not a truncated one


def test_exit_3_requeues_and_resumes(slurm: Path, tmp_path: Path) -> None:
    """hpcflow exiting 3 (stopped, resumable): the batch script requeues itself, rerun gets --resume.

    The stage command is a wrapper that logs its arguments, exits 3 on the first attempt (what
    hpcflow does after a pre-time-limit SIGTERM) and runs the real hpcflow afterwards.
    """
    calls = tmp_path / "calls.txt"
    wrapper = tmp_path / "hpcflow-wrapper"
    wrapper.write_text(f"""#!/bin/bash
echo "$*" >> {calls}
if [ "$(wc -l < {calls})" -eq 1 ]; then exit 3; fi
args=()
for a in "$@"; do [ "$a" = --resume ] || args+=("$a"); done
exec {HPCFLOW} "${{args[@]}}"
""")
    wrapper.chmod(0o755)
    path = _write(tmp_path, {
        "name": "exit3", "seed": 3, "dir": "camp", "config": _base(8), "beta": [1.0], "chains": 1,
        "hpcflow": str(wrapper), "stages": {"sample": {"command": "run"}}})
    c = cp.load_campaign(path)
    state = cp.submit(c, out=lambda s: None)
    jid = state["jobs"]["beta1-c0/sample"]["job_id"]
    status_file = Path(c.dir) / "status" / "beta1-c0.sample.json"
    _wait(lambda: status_file.exists() and _status(c, "beta1-c0", "sample")["state"] == "requeued",
          60, "the first attempt to exit 3", slurm)
    _release_when_pending(jid, slurm)
    _wait(_queue_empty, 120, "the self-requeued job to finish", slurm)
    lines = calls.read_text().splitlines()
    assert len(lines) == 2 and "--resume" not in lines[0] and lines[1].endswith("--resume"), lines
    st = _status(c, "beta1-c0", "sample")
    assert st["state"] == "done" and st["restarts"] == 1 and st["job_id"] == jid
    rows = cp.campaign_status(c)
    assert rows[0]["configs"] == 8
