"""hpcflow.run.campaign: campaign YAML validation, expansion, scripts, (re)submission logic, status.

Submission is checked against a recording fake of sbatch/squeue/scancel here; the real
scheduler is exercised in tests/slurm/test_slurm_campaign.py.
"""

from __future__ import annotations

import json
import os
import re
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
    """Records sbatch/scancel calls; a job array's tasks go into ``queue`` (``<array>_<i>`` ->
    state). Without accounting (``sacct=False``) sacct fails as Slurm's does and squeue answers
    (``squeue -r``: one line per task); with it, sacct answers in its --parsable2 format."""

    def __init__(self, sacct: bool = False) -> None:
        self.calls: list[list[str]] = []
        self.queue: dict[str, str] = {}
        self.next = 100
        self.sacct = sacct

    def _listed(self, cmd: list[str]) -> list[str]:
        arrays = cmd[cmd.index("-j") + 1].split(",")
        return [t for t in self.queue if t.split("_")[0] in arrays]

    def __call__(self, cmd: list[str], **kw: Any) -> subprocess.CompletedProcess:
        self.calls.append(cmd)
        if cmd[0] == "sbatch":
            self.next += 1
            spec = next(a for a in cmd if a.startswith("--array="))[len("--array="):].split("%")[0]
            for part in spec.split(","):
                lo, _, hi = part.partition("-")
                for i in range(int(lo), int(hi or lo) + 1):
                    self.queue[f"{self.next}_{i}"] = "PENDING"
            return subprocess.CompletedProcess(cmd, 0, f"{self.next}\n", "")
        if cmd[0] == "sacct":
            if not self.sacct:
                return subprocess.CompletedProcess(cmd, 1, "", "Slurm accounting storage is disabled\n")
            out = "".join(f"{t}|{self.queue[t]}|0:0\n{t}.batch|{self.queue[t]}|0:0\n" for t in self._listed(cmd))
            return subprocess.CompletedProcess(cmd, 0, out, "")
        if cmd[0] == "squeue":
            assert "-r" in cmd  # one line per array task
            out = "".join(f"{t} {self.queue[t]}\n" for t in self._listed(cmd))
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
    s = cp.render_script(c, c.stages[1], [ch])
    for line in ("#SBATCH --signal=TERM@120", "#SBATCH --requeue", "#SBATCH --partition=gpu",
                 'scontrol requeue "$task"', "resume=(--resume)",
                 'srun --cpus-per-task="$cpt" --cpu-bind=cores --mpi=pmi2 /opt/bin/hpcflow run "$config"'):
        assert line in s
    p = tmp_path / "s.sh"
    p.write_text(s)
    assert subprocess.run(["bash", "-n", str(p)], check=False).returncode == 0
    no_resume = _load(tmp_path, _raw(stages={"train": {"command": "run", "resume": False}}))
    s = cp.render_script(no_resume, no_resume.stages[0], [ch])
    assert "resume=(--resume)" not in s and "resume=(--fresh)" in s


@pytest.mark.parametrize(("command", "resume", "model", "first", "rerun"), [
    ("run", True, False, [], ["--resume"]),
    ("train", True, True, [], ["--resume"]),
    ("train", True, False, [], []),      # train --resume without a checkpoint is an error
    ("sample", True, False, [], []),     # sample continues from its chain checkpoints by itself
    ("sample", True, True, [], []),
    ("run", False, False, [], ["--fresh"]),
    ("train", False, True, [], ["--fresh"]),
    ("sample", False, True, [], ["--fresh"]),
])
def test_rerun_flags(tmp_path: Path, command: str, resume: bool, model: bool, first: list, rerun: list) -> None:
    """What a rerun (requeued, or resubmitted after a failure) passes to hpcflow, by bash with stubs:
    resume true continues (run --resume; train --resume only with a training checkpoint; sample by
    itself), resume false starts afresh (--fresh moves the earlier attempt's results aside)."""
    flow = {"lattice.shape": [4, 4], "group": "u1", "algorithm": "flow"}
    stages = {"train": {"resume": resume if command == "train" else True}}
    if command != "train":
        stages["s"] = {"command": command, "after": ["train"], "resume": resume}
    c = _load(tmp_path, _raw(config=flow, beta=[1.0], chains=1, hpcflow="hpcflow", stages=stages))
    st = next(s for s in c.stages if s.command == command and (command == "train" or s.name == "s"))
    ch = cp.expand_chains(c)[0]
    paths = cp.job_paths(c, ch, st)
    Path(paths["script"]).parent.mkdir(parents=True)
    Path(paths["script"]).write_text(cp.render_script(c, st))
    out = Path(cp.job_config(c, ch, st)["output"]["dir"])
    if model:
        (out / "train").mkdir(parents=True)
        (out / "train" / "checkpoint.pt").write_bytes(b"x")
    stubs, log = tmp_path / "stubs", tmp_path / "log"
    log.mkdir()
    _stubs(stubs, log)
    (stubs / "hpcflow").write_text(_STUB.format(name="hpcflow", body="exit 0"))
    (stubs / "hpcflow").chmod(0o755)
    env = {"PATH": f"{stubs}:/usr/bin:/bin", "STUB_LOG": str(log), "SLURM_JOB_ID": "9", "SLURM_ARRAY_JOB_ID": "8",
           "SLURM_ARRAY_TASK_ID": "0"}
    for restarts, want in (("0", first), ("1", rerun)):
        for f in log.iterdir():
            f.unlink()
        if restarts == "0":
            Path(paths["status"]).unlink(missing_ok=True)
        r = subprocess.run(["bash", paths["script"]], env={**env, "SLURM_RESTART_COUNT": restarts},
                           capture_output=True, text=True, timeout=60, check=False)
        assert r.returncode == 0, r.stderr
        assert _args(log, "hpcflow") == [[command, paths["config"], *want]]
    # resubmitted (a new job, no restart count) after an attempt that left its status file
    for f in log.iterdir():
        f.unlink()
    r = subprocess.run(["bash", paths["script"]], env={**env, "SLURM_RESTART_COUNT": "0"},
                       capture_output=True, text=True, timeout=60, check=False)
    assert _args(log, "hpcflow") == [[command, paths["config"], *rerun]]


def test_train_checkpoint_is_hpcflows() -> None:
    """The campaign's rerun test looks for the file that 'hpcflow train --resume' needs."""
    from hpcflow.run.campaign.slurm import TRAIN_CHECKPOINT
    from hpcflow.run.outdir import MODEL

    assert TRAIN_CHECKPOINT == MODEL


def test_dry_run_prints_and_submits_nothing(tmp_path: Path) -> None:
    c = _load(tmp_path, _raw())
    fake, printed = FakeSlurm(), []
    cp.submit(c, dry_run=True, run=fake, out=printed.append)
    assert fake.calls == []
    # one job array per stage, every chain an index
    assert sum(p.startswith("#!/bin/bash") for p in printed) == 2
    assert sum("--array=0-3 " in p for p in printed) == 2
    assert not Path(c.dir).exists()


@pytest.mark.parametrize("sacct", [False, True], ids=["squeue", "sacct"])
def test_submit_dependencies_and_resubmission(tmp_path: Path, sacct: bool) -> None:
    """One job array per stage (chain i = index i), the sample array afterok on the train array;
    resubmission puts exactly the unfinished chains in a new array; scheduler state from sacct,
    or from squeue when accounting is off."""
    c = _load(tmp_path, _raw(beta=[1.0], chains=2))
    fake = FakeSlurm(sacct=sacct)
    state = cp.submit(c, run=fake, out=lambda s: None)
    sb = fake.sbatches()
    assert len(sb) == 2 and not any(a.startswith("--dependency") for a in sb[0])
    assert "--array=0-1" in sb[0] and "--array=0-1" in sb[1]
    assert sb[0][-1].endswith("scripts/train.sbatch") and sb[1][-1].endswith("scripts/sample.sbatch")
    assert "--dependency=afterok:101" in sb[1]
    assert state["jobs"]["beta1-c1/sample"]["job_id"] == "102_1"
    assert state["jobs"]["beta1-c1/sample"]["array_job_id"] == "102"
    assert json.loads((Path(c.dir) / "campaign_state.json").read_text()) == state
    assert (Path(c.dir) / "configs" / "beta1-c0.train.yaml").exists()
    assert (Path(c.dir) / "configs" / "beta1-c1.train.yaml").exists()
    asked = [x[0] for x in fake.calls if x[0] in ("sacct", "squeue")]
    assert asked == []  # nothing known before the first submission

    # all still queued: nothing to do
    cp.submit(c, run=fake, out=lambda s: None)
    assert len(fake.sbatches()) == 2
    assert [x[0] for x in fake.calls if x[0] in ("sacct", "squeue")] == (["sacct"] if sacct else ["sacct", "squeue"])

    # train of chain 1 failed (gone): its train again, and its sample (cancelled) after it;
    # chain 0's tasks stay
    del fake.queue["101_1"]
    state = cp.submit(c, run=fake, out=lambda s: None)
    assert ["scancel", "102_1"] in fake.calls and ["scancel", "102_0"] not in fake.calls
    new_train, new_sample = fake.sbatches()[2:]
    assert new_train[-1].endswith("train.sbatch") and "--array=1" in new_train
    assert "--array=1" in new_sample and "--dependency=afterok:103" in new_sample
    assert state["jobs"]["beta1-c1/train"]["history"] == ["101_1", "103_1"]
    assert state["jobs"]["beta1-c0/sample"]["job_id"] == "102_0"

    # chain 1's train done (status file written by the job), its sample lost: alone, no dependency
    status = Path(c.dir) / "status"
    status.mkdir()
    (status / "beta1-c1.train.json").write_text(json.dumps({"state": "done", "job_id": "103_1"}))
    del fake.queue["103_1"], fake.queue["104_1"]
    cp.submit(c, run=fake, out=lambda s: None)
    last = fake.sbatches()[4]
    assert len(fake.sbatches()) == 5 and last[-1].endswith("sample.sbatch") and "--array=1" in last
    assert not any(a.startswith("--dependency") for a in last)


def test_array_limit_and_spec(tmp_path: Path) -> None:
    from hpcflow.run.campaign.slurm import array_spec

    assert array_spec([3, 0, 1, 2, 7, 9, 10]) == "0-3,7,9-10" and array_spec([5], 2) == "5%2"
    c = _load(tmp_path, _raw(slurm={"array_limit": 1}))
    fake = FakeSlurm()
    cp.submit(c, run=fake, out=lambda s: None)
    assert [x[2] for x in fake.sbatches()] == ["--array=0-3%1"] * 2
    with pytest.raises(cp.CampaignError, match="slurm.max_array_size = 3 chains"):
        _load(tmp_path, _raw(chains=2, slurm={"max_array_size": 3}))
    with pytest.raises(cp.CampaignError, match="slurm.array_limit"):
        _load(tmp_path, _raw(slurm={"array_limit": "2;x"}))


def test_sacct_parser_real_format() -> None:
    """Recorded ``sacct --noheader --parsable2 --allocations --format=JobID,State,ExitCode`` of a
    Slurm 22.05 cluster with accounting (array 2001 of 4 tasks: done, requeued/pending,
    failed, cancelled; a pending compressed remainder; a plain job; steps are skipped)."""
    from hpcflow.run.campaign.slurm import parse_sacct, parse_squeue

    text = ("2001_0|COMPLETED|0:0\n2001_0.batch|COMPLETED|0:0\n2001_1|PENDING|0:0\n2001_2|FAILED|4:0\n"
            "2001_2.batch|FAILED|4:0\n2001_3|CANCELLED by 0|0:0\n2002_[0-2,5%2]|PENDING|0:0\n"
            "2003|RUNNING|0:0\n2003.0|RUNNING|0:0\n")
    assert parse_sacct(text) == {"2001_0": "COMPLETED", "2001_1": "PENDING", "2001_2": "FAILED",
                                 "2001_3": "CANCELLED", "2002_0": "PENDING", "2002_1": "PENDING",
                                 "2002_2": "PENDING", "2002_5": "PENDING", "2003": "RUNNING"}
    assert parse_squeue("7_1 RUNNING\n7_[2-3] PENDING\n8 COMPLETED\n") == {
        "7_1": "RUNNING", "7_2": "PENDING", "7_3": "PENDING", "8": "COMPLETED"}


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


# ---- hostile values (issue 18: injection-proof job scripts, one-line errors, bounds) -------
def _refused(tmp_path: Path, raw: Any, key: str, capsys: pytest.CaptureFixture, bad: Any = None,
             text: str | None = None) -> str:
    """Load ``raw`` (or the YAML ``text``): a CampaignError, and 'hpcflow campaign' exits 2 with
    one line naming ``key``; nothing is written next to the campaign file."""
    p = tmp_path / "c.yaml"
    p.write_text(text if text is not None else yaml.safe_dump(raw))
    before = sorted(x.name for x in tmp_path.iterdir())
    with pytest.raises(cp.CampaignError) as ei:
        cp.load_campaign(p)
    msg = str(ei.value)
    assert "\n" not in msg and "\r" not in msg and msg.isprintable(), msg
    assert re.search(rf"key '{re.escape(key)}[.\[']", msg) and "allowed" in msg, msg
    assert len(msg) < 600, len(msg)
    if isinstance(bad, str) and len(bad) < 40:
        assert repr(bad) in msg, msg
    assert cp.main([str(p), "--dry-run"]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err.startswith("hpcflow campaign: ") and out.err.count("\n") == 1, out
    assert sorted(x.name for x in tmp_path.iterdir()) == before
    assert not list(tmp_path.rglob("PWNED*"))
    return msg


HOSTILE_NAMES = ["x\n", "x\ntouch PWNED", "..", ".", ".hidden", "-rf", "a b", "a/b", "$(touch PWNED)",
                 "`touch PWNED`", "a;touch PWNED", "a'b", 'a"b', "x\u2028y", "x\ty", "", "é", "a" * 65]


@pytest.mark.parametrize("bad", HOSTILE_NAMES, ids=repr)
def test_hostile_campaign_name_refused(tmp_path: Path, capsys: pytest.CaptureFixture, bad: str) -> None:
    _refused(tmp_path, _raw(name=bad, dir=None), "name", capsys, bad)
    assert not (tmp_path / "configs").exists() and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("bad", HOSTILE_NAMES, ids=repr)
def test_hostile_stage_name_refused(tmp_path: Path, capsys: pytest.CaptureFixture, bad: str) -> None:
    _refused(tmp_path, _raw(stages={bad: {"command": "run"}}), "stages", capsys, bad)


@pytest.mark.parametrize("bad", ["action.beta\n", "action.beta;touch PWNED", "a b", "action..beta", ".beta",
                                 "action.$(x)", "action.beta-1"], ids=repr)
def test_hostile_scan_key_refused(tmp_path: Path, capsys: pytest.CaptureFixture, bad: str) -> None:
    """Scan keys name a config key and their last part becomes part of every chain id (paths)."""
    _refused(tmp_path, _raw(beta=None, scan={bad: [1.0]}), "scan", capsys)


def test_dotdot_name_cannot_move_the_campaign_out_of_runs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Regression: name '..' and no 'dir' made the campaign directory runs/.. (the file's directory)."""
    sub = tmp_path / "proj"
    sub.mkdir()
    _refused(sub, _raw(name="..", dir=None), "name", capsys, "..")


HOSTILE_SLURM = [
    ("partition", "gpu\ntouch PWNED"), ("partition", "$(touch PWNED)"), ("partition", "`touch PWNED`"),
    ("partition", "gpu; touch PWNED"), ("partition", "gpu batch"), ("partition", "'gpu'"), ("partition", ""),
    ("partition", "gpu\r"), ("partition", "gpu,"), ("account", "proj\n#SBATCH --wrap=x"), ("account", "a,b"),
    ("account", "p$USER"), ("mem", "4G\ntouch PWNED"), ("mem", "4 G"), ("mem", "lots"), ("mem", "-1"),
    ("mem", "4GB"), ("mem", "1" * 20), ("time", "01:00:00\ntouch PWNED"), ("time", "soon"), ("time", "1-2-3"),
    ("time", "1:60"), ("time", "1:2"), ("time", "1-24"), ("time", "1:00:60"), ("time", "-5"), ("time", ""),
    ("time", "9" * 30), ("time", "\u0661\u0662"), ("time", True), ("time", 1.5),
    ("extra", "--qos=normal"), ("extra", ["--qos=normal\ntouch PWNED"]), ("extra", ["--qos=$(touch PWNED)"]),
    ("extra", ["--comment=a b"]), ("extra", ["-p", "gpu"]), ("extra", ["--qos normal"]),
    ("extra", ["--wrap=touch PWNED"]), ("extra", ["--output=/tmp/x"]), ("extra", ["--dependency=afterok:1"]),
    ("extra", ["--partition=gpu"]), ("extra", ["--qos=a'b"]), ("extra", ["--qos=a,b"]), ("extra", ["--x=`y`"]),
    ("extra", ["--constraint=a#b"]), ("extra", ["--constraint=a\\b"]), ("extra", [1]), ("extra", ["--Qos=x"]),
    ("nodes", 0), ("nodes", "2"), ("nodes", 10**7), ("gpus_per_task", -1),
]


@pytest.mark.parametrize(("key", "bad"), HOSTILE_SLURM, ids=repr)
def test_hostile_stage_resources_refused(tmp_path: Path, capsys: pytest.CaptureFixture, key: str, bad: Any) -> None:
    _refused(tmp_path, _raw(stages={"train": {"command": "run", "resources": {key: bad}}}),
             f"stages.train.resources.{key}", capsys, bad)


@pytest.mark.parametrize(("key", "bad"), HOSTILE_SLURM[:12], ids=repr)
def test_hostile_slurm_defaults_refused(tmp_path: Path, capsys: pytest.CaptureFixture, key: str, bad: Any) -> None:
    _refused(tmp_path, _raw(slurm={key: bad}), f"slurm.{key}", capsys, bad)


@pytest.mark.parametrize(("key", "bad"), [
    ("dir", "camp\ntouch PWNED"), ("dir", "camp\\x"), ("dir", "camp\u0085x"), ("dir", ""), ("dir", 3),
    ("hpcflow", "/opt/bin/hpcflow\ntouch PWNED"), ("hpcflow", "hpc\x00flow"), ("hpcflow", " "),
    ("slurm", {"signal_seconds": 0}), ("slurm", {"signal_seconds": 70000}), ("slurm", {"mpi": "pmix\nx"}),
    ("stages", {"train": {"command": "run", "resources": ["--qos=x"]}}),
])
def test_hostile_paths_and_settings_refused(tmp_path: Path, capsys: pytest.CaptureFixture, key: str, bad: Any) -> None:
    msg = _refused(tmp_path, _raw(**{key: bad}), key, capsys)
    assert "Traceback" not in msg


def test_error_shows_bounded_value(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = "gpu" + "x" * 100_000 + "\n$(touch PWNED)"
    msg = _refused(tmp_path, _raw(slurm={"partition": bad}), "slurm.partition", capsys)
    assert "'gpuxxxx" in msg and "100018 characters" in msg and "PWNED" not in msg
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(_raw(**{"x" * 5000 + "\n": 1})))
    with pytest.raises(cp.CampaignError, match=r"key ''xxxx.*\.\.\. \(5001 characters\)': got 1; allowed") as ei:
        cp.load_campaign(tmp_path / "c.yaml")
    assert len(str(ei.value)) < 600 and str(ei.value).isprintable()


def test_allowed_resources_reach_the_script(tmp_path: Path) -> None:
    res = {"partition": "gpu,batch", "account": "proj_1.a-b", "mem": "64G", "time": "1-12:30:00",
           "extra": ["--qos=normal", "--exclusive", "--constraint=intel&(v100|a100)", "--gres=gpu:2",
                     "--mail-type=END,FAIL", "--mail-user=me@example.org"]}
    for t in ("90", "90:30", "2:00:00", "100:00:00", "1-0", "2-12", "2-12:30", "2-12:30:15", 90):
        c = _load(tmp_path, _raw(stages={"train": {"command": "run", "resources": {**res, "time": t}}}))
        assert c.stages[0].resources.time == str(t)
    s = cp.render_script(c, c.stages[0])
    for line in ("#SBATCH --partition=gpu,batch", "#SBATCH --account=proj_1.a-b", "#SBATCH --mem=64G",
                 "#SBATCH --qos=normal", "#SBATCH --exclusive", "#SBATCH --constraint=intel&(v100|a100)",
                 "#SBATCH --gres=gpu:2", "#SBATCH --mail-type=END,FAIL"):
        assert line + "\n" in s


def test_unquoted_yaml_times_stay_slurm_times(tmp_path: Path) -> None:
    """YAML 1.1 reads 02:00:00 as the base-60 integer 7200 (7200 minutes = 5 days for Slurm):
    campaign files read it as the string '02:00:00'."""
    text = yaml.safe_dump(_raw(slurm={"partition": "gpu"})) + "\n"
    text = text.replace("slurm:\n", "slurm:\n  time: 02:00:00\n")
    p = tmp_path / "c.yaml"
    p.write_text(text)
    c = cp.load_campaign(p)
    assert c.stages[0].resources.time == "02:00:00"


def test_render_script_revalidates(tmp_path: Path) -> None:
    """Values that did not come through load_campaign are checked again where they reach the script."""
    import dataclasses

    c = _load(tmp_path, _raw())
    ch, st = cp.expand_chains(c)[0], c.stages[0]
    for bad in (dataclasses.replace(c, name="x\ntouch PWNED"), dataclasses.replace(c, mpi="pmix\nx"),
                dataclasses.replace(c, dir=str(tmp_path / "a\nb")), dataclasses.replace(c, hpcflow="a\nb")):
        with pytest.raises(cp.CampaignError):
            cp.render_script(bad, st, [ch])
    with pytest.raises(cp.CampaignError):
        cp.render_script(c, st, [dataclasses.replace(ch, id="..")])
    with pytest.raises(cp.CampaignError):
        cp.render_script(c, dataclasses.replace(st, resources=dataclasses.replace(
            st.resources, partition="gpu\ntouch PWNED")), [ch])
    with pytest.raises(cp.CampaignError):
        cp.render_script(c, dataclasses.replace(st, command="run; touch PWNED"), [ch])


def _sbatch_directives(script: str) -> list[str]:
    """The arguments sbatch reads from the '#SBATCH' lines (Slurm 22.05 src/sbatch/opt.c:
    get_argument: whitespace separates, quotes group, backslash escapes, an unquoted '#' ends
    the line; parsing stops at the first command line)."""
    args: list[str] = []
    for line in script.splitlines()[1:]:
        if not line.startswith("#SBATCH"):
            if line.strip() and not line.lstrip().startswith("#"):
                break
            continue
        i, s = len("#SBATCH"), line
        while True:
            while i < len(s) and s[i].isspace():
                i += 1
            if i >= len(s):
                break
            arg, q, esc = "", "", False
            while i < len(s) and (q or not s[i].isspace()):
                ch = s[i]
                i += 1
                if esc:
                    esc = False
                elif ch == "\\":
                    esc = True
                    continue
                elif q:
                    if ch == q:
                        q = ""
                        continue
                elif ch in "\"'":
                    q = ch
                    continue
                elif ch == "#":
                    i = len(s)
                    break
                arg += ch
            assert not q, f"unmatched quote in {line!r}"
            if arg:
                args.append(arg)
    return args


def _slurm_fname(pattern: str, job_id: str, array_id: str = "", index: str = "") -> str:
    """Slurm's batch --output file name: '%%' -> '%', '%j' -> the job id, '%A' the array's job
    id, '%a' the array index (the only ones used)."""
    out, i = "", 0
    while i < len(pattern):
        if pattern[i] == "%" and i + 1 < len(pattern):
            nxt = pattern[i + 1]
            assert nxt in "%jAa", f"unexpected Slurm file pattern %{nxt} in {pattern!r}"
            out += {"%": "%", "j": job_id, "A": array_id, "a": index}[nxt]
            i += 2
        else:
            out += pattern[i]
            i += 1
    return out


_STUB = """#!/bin/bash
printf '%s\\0' "$@" >> "$STUB_LOG/{name}.args"
printf '\\n' >> "$STUB_LOG/{name}.calls"
{body}
"""


def _stubs(d: Path, log: Path) -> None:
    d.mkdir(parents=True, exist_ok=True)
    bodies = {"srun": 'while [ "${1#-}" != "$1" ]; do shift; done\nexec "$@"',
              "sbatch": "echo 4242", "scontrol": "exit 0", "squeue": "exit 0", "scancel": "exit 0"}
    for name, body in bodies.items():
        (d / name).write_text(_STUB.format(name=name, body=body))
        (d / name).chmod(0o755)


def _args(log: Path, name: str) -> list[list[str]]:
    p = log / f"{name}.args"
    if not p.exists():
        return []
    n = (log / f"{name}.calls").read_text().count("\n")
    flat = p.read_bytes().decode().split("\0")[:-1]
    assert n == 1, f"{name} called {n} times"
    return [flat]


HOSTILE_DIR = "odd dir/$(touch PWNED1)/`touch PWNED2`/a;touch PWNED3/'q\"/${HOME}x/50%j%%/#c/-- x/é"


def test_shell_special_values_are_literal_in_the_script(tmp_path: Path) -> None:
    """A campaign dir, hpcflow path and campaign file name full of shell syntax are allowed,
    and the generated script, run by bash with stub srun/scontrol/sbatch, executes none of it:
    no marker file appears, the stubs get the literal values, sbatch reads the literal log path."""
    stubs, log = tmp_path / "stubs", tmp_path / "log"
    log.mkdir()
    _stubs(stubs, log)
    hp_dir = tmp_path / "stub bin" / "$(touch PWNED4)" / "`touch PWNED5`;x" / "it's"
    hp_dir.mkdir(parents=True)
    hp = hp_dir / "hpcflow"
    hp.write_text('#!/bin/bash\nprintf \'%s\\0\' "$@" >> "$STUB_LOG/hpcflow.args"\n'
                  'printf \'\\n\' >> "$STUB_LOG/hpcflow.calls"\nexit "${STUB_RC:-0}"\n')
    hp.chmod(0o755)
    src_dir = tmp_path / "src $(touch PWNED6)"
    src_dir.mkdir()
    src = src_dir / "c\ntouch PWNED7\n`touch PWNED8`.yaml"
    src.write_text(yaml.safe_dump(_raw(dir=HOSTILE_DIR, hpcflow=str(hp), beta=[1.0], chains=1,
                                       stages={"sample": {"command": "run"}})))
    c = cp.load_campaign(src)
    assert c.dir == str(src_dir / HOSTILE_DIR)
    (ch,), (st,) = cp.expand_chains(c), c.stages
    fake = FakeSlurm()
    cp.submit(c, run=fake, out=lambda s: None)
    paths = cp.job_paths(c, ch, st)
    script = Path(paths["script"]).read_text()
    assert script.count("\n#SBATCH") == len([ln for ln in script.splitlines() if ln.startswith("#SBATCH")])
    assert subprocess.run(["bash", "-n", paths["script"]], check=False).returncode == 0
    directives = _sbatch_directives(script)
    outs = [a for a in directives if a.startswith("--output=")]
    log_file = os.path.join(os.path.dirname(paths["log"]), f"{st.name}.77_0.out")
    assert len(outs) == 1 and _slurm_fname(outs[0][len("--output="):], "78", "77", "0") == log_file
    assert f"--job-name={c.name}.{st.name}" in directives
    work = tmp_path / "work"
    work.mkdir()
    env = {"PATH": f"{stubs}:/usr/bin:/bin", "STUB_LOG": str(log), "SLURM_JOB_ID": "78", "HOME": str(tmp_path),
           "SLURM_ARRAY_JOB_ID": "77", "SLURM_ARRAY_TASK_ID": "0", "SLURM_CPUS_PER_TASK": "1"}
    for attempt, (rc, restarts) in enumerate([(3, "0"), (0, "1")]):
        for f in log.iterdir():
            f.unlink()
        r = subprocess.run(["bash", paths["script"]], cwd=work, env={**env, "STUB_RC": str(rc),
                           "SLURM_RESTART_COUNT": restarts}, capture_output=True, text=True, timeout=60, check=False)
        assert r.returncode == 0, (attempt, r.stderr)
        assert not list(tmp_path.rglob("PWNED*")), list(tmp_path.rglob("PWNED*"))
        resume = ["--resume"] if attempt else []
        assert _args(log, "srun") == [["--cpus-per-task=1", "--cpu-bind=cores", "--mpi=pmix", str(hp), "run",
                                       paths["config"], *resume]]
        assert _args(log, "hpcflow") == [["run", paths["config"], *resume]]
        status = json.loads(Path(paths["status"]).read_text())
        if rc == 3:
            assert status["state"] == "requeued" and _args(log, "scontrol") == [["requeue", "77_0"]]
        else:
            assert status == {**status, "state": "done", "exit_code": 0, "job_id": "77_0", "chain": ch.id,
                              "restarts": 1}
            assert _args(log, "scontrol") == []
    assert not list(tmp_path.rglob("PWNED*"))


@pytest.mark.parametrize("beta", [[float("nan")], [1.0, float("inf")], [float("-inf")],
                                  {"start": 0.5, "stop": float("inf"), "step": 0.5},
                                  {"start": 0.5, "stop": 1.0, "step": float("nan")},
                                  {"start": float("nan"), "stop": 1.0, "num": 3},
                                  {"start": 1.0, "stop": float("inf"), "num": 3},
                                  {"start": -1e308, "stop": 1e308, "num": 3},
                                  {"start": 0.5, "stop": 1e300, "step": 1e-300},
                                  {"start": 0.5, "stop": 1.0, "num": 10**9},
                                  {"start": 0.5, "stop": 1.0, "step": 1e-12},
                                  {"start": 0.5, "stop": 1.0, "num": 2.5},
                                  [10**400], {"start": 1, "stop": 10**400, "num": 2}], ids=repr)
def test_non_finite_or_huge_scans_refused(tmp_path: Path, capsys: pytest.CaptureFixture, beta: Any) -> None:
    """Regression: NaN/inf bounds ended in OverflowError/ValueError tracebacks; a huge 'num' or a
    tiny 'step' built the value list before any check."""
    import time

    t0 = time.perf_counter()
    _refused(tmp_path, _raw(beta=beta), "beta", capsys)
    assert time.perf_counter() - t0 < 5


@pytest.mark.parametrize(("change", "key"), [({"chains": 10**9}, "chains"), ({"seed": 2**64}, "seed"),
                                             ({"beta": [1.0, 2.0], "chains": 6000}, "chains")])
def test_huge_counts_refused(tmp_path: Path, capsys: pytest.CaptureFixture, change: dict, key: str) -> None:
    _refused(tmp_path, _raw(**change), key, capsys)


def test_colliding_chain_ids_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Chain ids use 6 significant digits; values that differ only beyond them would share a chain
    directory (each would overwrite the other)."""
    msg = _refused(tmp_path, _raw(beta={"start": 1.0, "stop": 1.000002, "num": 3}), "beta", capsys)
    assert "beta1-c0" in msg
    c = _load(tmp_path, _raw(beta=[1e6, 2.5e-7]))
    assert [ch.id for ch in cp.expand_chains(c)][::2] == ["beta1e06-c0", "beta2.5e-07-c0"]


@pytest.mark.parametrize("value", ["{chain_dir.__class__}", "{chain_dir!r}", "{chain_dir:>99999999}", "{0}",
                                   "{}", "{chain_dir[0]}", "{nope}", "{", "}"])
def test_set_placeholders_are_plain_names(tmp_path: Path, capsys: pytest.CaptureFixture, value: str) -> None:
    msg = _refused(tmp_path, _raw(stages={"train": {"command": "run", "set": {"output.dir": value}}}),
                   "stages.train.set.output.dir", capsys)
    assert "{chain_dir}" in msg
    c = _load(tmp_path, _raw(stages={"train": {"command": "run", "set": {"output.dir": "{chain_dir}/t{{x}}"}}}))
    ch = cp.expand_chains(c)[0]
    assert cp.job_config(c, ch, c.stages[0])["output"]["dir"] == ch.dir + "/t{x}"


_BOMB = """name: [&a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"],
  &b [*a, *a, *a, *a, *a, *a, *a, *a, *a], &c [*b, *b, *b, *b, *b, *b, *b, *b, *b],
  &d [*c, *c, *c, *c, *c, *c, *c, *c, *c], &e [*d, *d, *d, *d, *d, *d, *d, *d, *d],
  &f [*e, *e, *e, *e, *e, *e, *e, *e, *e], &g [*f, *f, *f, *f, *f, *f, *f, *f, *f],
  &h [*g, *g, *g, *g, *g, *g, *g, *g, *g], [*h, *h, *h, *h, *h, *h, *h, *h, *h]]
stages: {x: {}}
"""

_BOMB_PROBE = r"""
import json, resource, sys, time, tracemalloc
from hpcflow.run.campaign import spec
with open("/proc/self/statm") as fh:
    vm = int(fh.read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (vm + (512 << 20), resource.getrlimit(resource.RLIMIT_AS)[1]))
tracemalloc.start()
t0 = time.perf_counter()
try:
    spec.load_campaign(sys.argv[1])
    err = None
except spec.CampaignError as e:
    err = str(e)
dt = time.perf_counter() - t0
print(json.dumps({"err": err, "dt": dt, "peak": tracemalloc.get_traced_memory()[1]}))
"""


@pytest.mark.parametrize("where", ["campaign", "base"])
def test_yaml_alias_bomb_fails_fast(tmp_path: Path, where: str) -> None:
    """A 1 KB billion-laughs document (9^9 strings once expanded) is refused while it is read:
    one line, well under a second, a few MB (the child runs under a 512 MB address-space cap)."""
    if where == "campaign":
        (tmp_path / "c.yaml").write_text(_BOMB)
    else:
        (tmp_path / "base.yaml").write_text(_BOMB.replace("name:", "run:").replace("stages: {x: {}}", ""))
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(_raw(base="base.yaml")))
    r = subprocess.run([sys.executable, "-c", _BOMB_PROBE, str(tmp_path / "c.yaml")], capture_output=True,
                       text=True, timeout=120, check=False, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout)
    assert res["err"] and "\n" not in res["err"] and "alias" in res["err"], res
    assert res["dt"] < 1.0 and res["peak"] < 32 << 20, res


@pytest.mark.parametrize(("text", "what"), [
    ("name: &a [*a]\n", "recursive"),
    ("name: " + "[" * 5000 + "]" * 5000 + "\n", "nested"),
    ("name: " + "{a: " * 3000 + "1" + "}" * 3000 + "\n", "nested"),
    ("name: x\n---\nname: y\n", "single document"),
    ("name: [unclosed\n", "line 2"),
    ("\x00\x01", "line"),
])
def test_bad_yaml_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture, text: str, what: str) -> None:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(cp.CampaignError, match=what) as ei:
        cp.load_campaign(p)
    assert "\n" not in str(ei.value) and len(str(ei.value)) < 600
    assert cp.main([str(p), "--dry-run"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_yaml_file_size_and_encoding(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("name: x\n" + "# padding\n" * 200_000)
    with pytest.raises(cp.CampaignError, match="larger than"):
        cp.load_campaign(p)
    p.write_bytes(b"name: \xff\xfe\n")
    with pytest.raises(cp.CampaignError, match="UTF-8"):
        cp.load_campaign(p)


def test_small_anchors_still_work(tmp_path: Path) -> None:
    """Anchors and aliases within the size bound (shared resources, merge keys) are fine."""
    text = yaml.safe_dump({k: v for k, v in _raw().items() if k != "stages"}) + """
stages:
  train: {command: run, resources: &res {ntasks_per_node: 2, time: "01:00:00"}}
  sample: {command: run, after: [train], resources: {<<: *res, mem: 4G}}
"""
    p = tmp_path / "c.yaml"
    p.write_text(text)
    c = cp.load_campaign(p)
    assert c.stages[1].resources.ntasks_per_node == 2 and c.stages[1].resources.mem == "4G"


# ---- job templates (jobs/*.sh) --------------------------------------------------------------
@pytest.mark.parametrize("name", ["pbs.sh", "slurm_single_node.sh", "slurm_multi_node.sh", "slurm_gpu.sh",
                                  "mpirun.sh"])
def test_job_templates_execute_no_values(tmp_path: Path, name: str) -> None:
    """Hostile arguments and environment values reach the templates' commands as literal words
    (no arithmetic or command substitution), and a bad command word is refused (exit 2)."""
    stubs, log = tmp_path / "stubs", tmp_path / "log"
    log.mkdir()
    _stubs(stubs, log)
    bodies = {"mpirun": 'while [ "$1" != hpcflow ]; do shift; done\nexec "$@"',
              "timeout": 'while [ "${1#-}" != "$1" ]; do shift; done\nshift\nexec "$@"',
              "qsub": "exit 0", "hpcflow": "exit 0"}
    for tool, body in bodies.items():
        (stubs / tool).write_text(_STUB.format(name=tool, body=body))
        (stubs / tool).chmod(0o755)
    evil = "margin_s[$(touch PWNED1)]"  # set -u: the name must be a set variable
    cfg = "my cfg $(touch PWNED2) `touch PWNED3`.yaml"
    env = {"PATH": f"{stubs}:/usr/bin:/bin", "STUB_LOG": str(log), "SLURM_JOB_ID": "5",
           "SLURM_RESTART_COUNT": "0", "PBS_O_WORKDIR": str(tmp_path), "CONFIG": cfg, "CMD": "run",
           "WALLTIME_S": evil, "MARGIN_S": "300", "CHUNK_S": "", "HPCFLOW_SRUN_MPI": "pmix",
           "PBS_NODEFILE": str(tmp_path / "nodes")}
    (tmp_path / "nodes").write_text("n1\nn1\nn2\nn2\n")
    script = str(ROOT / "jobs" / name)
    args = ["2", cfg, "run"] if name == "mpirun.sh" else ([] if name == "pbs.sh" else [cfg, "run"])
    r = subprocess.run(["bash", script, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=60, check=False)
    assert not list(tmp_path.rglob("PWNED*")), r.stderr
    if name == "pbs.sh":
        assert r.returncode == 2 and "WALLTIME_S" in r.stderr, r.stderr
        r = subprocess.run(["bash", script], cwd=tmp_path, env={**env, "WALLTIME_S": "3600"},
                           capture_output=True, text=True, timeout=60, check=False)
        assert r.returncode == 0, r.stderr
    else:
        assert r.returncode == 0, r.stderr
    assert _args(log, "hpcflow")[0][:2] == ["run", cfg]
    assert not list(tmp_path.rglob("PWNED*"))
    # the command word is one of train/sample/run
    bad = ["2", cfg, "run;touch PWNED4"] if name == "mpirun.sh" else ([] if name == "pbs.sh" else
                                                                      [cfg, "run;touch PWNED4"])
    r = subprocess.run(["bash", script, *bad], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                       check=False, env={**env, "CMD": "run;touch PWNED4", "WALLTIME_S": "3600"})
    assert r.returncode == 2 and "train, sample or run" in r.stderr, r.stderr
