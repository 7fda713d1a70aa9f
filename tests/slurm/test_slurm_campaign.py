"""Campaigns through a real Slurm: slurmctld + slurmd on localhost (scripts/slurm_test_cluster.sh).

What these tests prove, with the real ``sbatch``/``squeue``/``scontrol`` of Debian's slurm-wlm:
* a flow campaign (scan x chains; ``hpcflow train`` trains a 2D U(1) flow, then ``hpcflow
  sample`` runs one domain-decomposed flow chain on 2 ranks with that model) runs every stage to
  completion, each chain's sampling job starts only after its training job ended (Slurm's
  job-completion log), the sample stage's HDF5 ensemble holds the expected configurations
  (made with the trained model: its sha256 is in the file attributes), and ``hpcflow campaign
  status`` reports the committed count and acceptance read from that ensemble;
* a campaign submitted again submits nothing once everything is done;
* each stage is one job array (chain i = index i), the sample array depends (afterok) on the
  train array, and the campaign reads their states with squeue (this cluster has no
  accounting, so sacct fails and the fallback is what runs; the sacct parser is tested on
  recorded output in tests/unit/test_campaign.py);
* an array task stopped by ``scontrol requeue <array>_<i>`` runs again under the same ids and
  the campaign completes, with the dependent stage waiting for the rerun;
* a stage that exits 3 (stopped, resumable) requeues its own array task and reruns with
  ``--resume``;
* a campaign directory and hpcflow path full of shell and sbatch syntax reach Slurm and the job
  literally (the real sbatch parses the '#SBATCH' lines; nothing is executed).
If the daemons cannot start, the fixture FAILS with the reason (never skips): CI must not
pass without the scheduler tier.

No wait here is a clock window: each waits for a scheduler state (squeue's state and reason;
finished jobs stay visible, MinJobAge=600) or a file a job writes, and fails at once when a job
it waits on ended otherwise. ``SAFETY_NET_S`` only bounds a scheduler that never gets there; a
requeued job is released from its BeginTime hold by its state (see :func:`_release`), and would
start by itself well within the bound if it were not.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from hpcflow.run import campaign as cp
from hpcflow.run.campaign.slurm import queue_states

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


#: Only a safety net: every wait below is for a scheduler state or a file the job writes, and
#: fails at once when a job it waits on has ended another way. A requeued job that is never
#: released still starts by itself after Slurm's ~2 minute BeginTime, well inside this bound.
SAFETY_NET_S = 900
TERMINAL = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL",
                      "DEADLINE", "OUT_OF_MEMORY", "SPECIAL_EXIT"})


def _states(ids) -> dict[str, tuple[str, str]]:
    """Slurm's state and reason of each job (MinJobAge=600 keeps finished jobs visible)."""
    ids = [str(i) for i in ids]
    if not ids:
        return {}
    r = subprocess.run(["squeue", "-h", "-r", "-t", "all", "-j", ",".join(ids), "-o", "%i %T %r"], check=False,
                       capture_output=True, text=True)
    out = {}
    for line in r.stdout.splitlines():
        parts = line.split(None, 2)
        if len(parts) >= 2:
            out[parts[0]] = (parts[1], parts[2] if len(parts) > 2 else "")
    return out


def _diag(slurm_dir: Path, camp_dir: Path | None = None) -> str:
    """What the scheduler and the jobs say, for a failure message."""
    q = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%i %j %T %r"], check=False, capture_output=True,
                       text=True).stdout
    ctld = (slurm_dir / "log" / "slurmctld.log").read_text()[-1500:]
    slurmd = (slurm_dir / "log" / "slurmd.log").read_text()[-800:]
    logs = ""
    if camp_dir is not None and (camp_dir / "logs").is_dir():
        for f in sorted((camp_dir / "logs").iterdir()):
            logs += f"\n--- {f.name}: {f.read_text(errors='replace')[-600:]}"
        for f in sorted((camp_dir / "status").glob("*.json")) if (camp_dir / "status").is_dir() else []:
            logs += f"\n--- {f.name}: {f.read_text(errors='replace')}"
    return f"squeue: {q!r}\nslurmctld: {ctld}\nslurmd: {slurmd}{logs}"


def _until(pred, what: str, slurm_dir: Path, jobs=(), camp_dir: Path | None = None) -> None:
    """Wait until ``pred()``; fail at once if one of ``jobs`` ended (any final state) first."""
    deadline = time.monotonic() + SAFETY_NET_S
    while True:
        if pred():
            return
        ended = {j: s for j, (s, _) in _states(jobs).items() if s in TERMINAL}
        if ended and not pred():
            pytest.fail(f"job(s) {ended} ended while waiting for {what}\n{_diag(slurm_dir, camp_dir)}")
        if time.monotonic() > deadline:
            pytest.fail(f"safety net: {SAFETY_NET_S} s without {what}\n{_diag(slurm_dir, camp_dir)}")
        time.sleep(0.2)


def _release(jid: str) -> None:
    """Let a requeued job (PENDING, reason BeginTime: Slurm holds it ~2 minutes) start now.

    Slurm revokes the first run's launch credential with a time stamp in whole seconds, and a
    relaunch whose credential is not strictly newer is refused and the job killed (slurmd:
    "Job N already killed, do not launch batch job"); that is why Slurm itself waits. The
    revocation happened before the job showed as pending, so releasing it after the next full
    second can never collide with it, whatever the machine's speed.
    """
    nxt = math.floor(time.time()) + 1.001
    while time.time() < nxt:
        time.sleep(nxt - time.time())
    subprocess.run(["scontrol", "update", f"JobId={jid}", "StartTime=now"], check=True, capture_output=True,
                   text=True)


def _run_to_completion(jobs, slurm_dir: Path, camp_dir: Path | None = None) -> dict[str, tuple[str, str]]:
    """Drive ``jobs`` to their final states by the scheduler's state alone: a job pending on its
    BeginTime (requeued) is released (:func:`_release`); dependants and running jobs are left to
    Slurm. Fails at once when a job ends in another state than COMPLETED."""
    jobs = [str(j) for j in jobs]
    released: dict[str, float] = {}
    deadline = time.monotonic() + SAFETY_NET_S
    while True:
        st = _states(jobs)
        bad = {j: s for j, s in st.items() if s[0] in TERMINAL and s[0] != "COMPLETED"}
        if bad:
            pytest.fail(f"job(s) ended {bad}, not COMPLETED\n{_diag(slurm_dir, camp_dir)}")
        if len(st) == len(jobs) and all(s[0] == "COMPLETED" for s in st.values()):
            return st
        for j, (state, reason) in st.items():
            # once per requeue; again only if Slurm put the begin time back (another requeue)
            if state == "PENDING" and reason == "BeginTime" and time.monotonic() - released.get(j, -1e9) > 10:
                _release(j)
                released[j] = time.monotonic()
        if time.monotonic() > deadline:
            pytest.fail(f"safety net: {SAFETY_NET_S} s and jobs {st} not all COMPLETED\n{_diag(slurm_dir, camp_dir)}")
        time.sleep(0.2)


def _jobcomp(slurm_dir: Path) -> list[dict]:
    """Slurm's own completion records (jobcomp/filetxt): JobId, JobState, StartTime, EndTime, ...;
    ``Task`` is the array task as the campaign records it (``<ArrayJobId>_<ArrayTaskId>``)."""
    recs = []
    for line in (slurm_dir / "log" / "jobcomp.log").read_text().splitlines():
        r = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
        arr = r.get("ArrayJobId", "0")
        r["Task"] = f"{arr}_{r.get('ArrayTaskId')}" if arr not in ("", "0") else r["JobId"]
        recs.append(r)
    return recs


def _status(c: cp.Campaign, chain: str, stage: str) -> dict:
    return json.loads((Path(c.dir) / "status" / f"{chain}.{stage}.json").read_text())


def _status_is(c: cp.Campaign, chain: str, stage: str, state: str) -> bool:
    f = Path(c.dir) / "status" / f"{chain}.{stage}.json"
    try:
        return json.loads(f.read_text())["state"] == state
    except (OSError, ValueError, KeyError):
        return False  # not written yet (or being replaced: the job writes it atomically)


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
    state = json.loads((Path(c.dir) / "campaign_state.json").read_text())
    _run_to_completion([j["job_id"] for j in state["jobs"].values()], slurm, Path(c.dir))
    rows = cp.campaign_status(c)
    assert len(rows) == 2
    comp = {r["Task"]: r for r in _jobcomp(slurm)}
    # one job array per stage: chain i is index i of both
    for st in ("train", "sample"):
        ids = [state["jobs"][f"{ch.id}/{st}"]["job_id"] for ch in cp.expand_chains(c)]
        assert len({i.split("_")[0] for i in ids}) == 1 and [i.split("_")[1] for i in ids] == ["0", "1"], ids
    # this cluster runs without accounting: sacct fails and the state comes from squeue -r
    r = subprocess.run(["sacct", "-j", "1"], check=False, capture_output=True, text=True)
    assert r.returncode != 0 and "accounting storage is disabled" in (r.stdout + r.stderr), r
    all_ids = [j["job_id"] for j in state["jobs"].values()]
    assert queue_states(all_ids, subprocess.run) == {i: "COMPLETED" for i in all_ids}
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
    """A running train job stopped by 'scontrol requeue' reruns (same id) and the chain completes.

    The requeue must land while hpcflow runs: the stage command is a wrapper that, on the first
    attempt, starts the real hpcflow, waits until it has measured a configuration and freezes it
    (SIGSTOP) before telling the test, so the run cannot finish before the requeue, however fast
    the machine. Slurm's requeue sends SIGCONT and SIGTERM to the job; the rerun runs hpcflow.
    """
    n = 400
    calls, frozen = tmp_path / "calls.txt", tmp_path / "frozen"
    hist_file = tmp_path / "camp" / "chains" / "beta1-c0" / "train" / "history.jsonl"
    wrapper = tmp_path / "hpcflow-wrapper"
    wrapper.write_text(f"""#!/bin/bash
echo "$*" >> '{calls}'
if [ "$(wc -l < '{calls}')" -eq 1 ]; then
  '{HPCFLOW}' "$@" & pid=$!
  until [ -s '{hist_file}' ]; do
    kill -0 $pid 2>/dev/null || {{ echo "hpcflow ended before the requeue" >&2; exit 97; }}
    sleep 0.01
  done
  kill -STOP $pid
  [ "$(wc -l < '{hist_file}')" -lt {n} ] || {{ echo "hpcflow finished before the requeue" >&2; exit 97; }}
  touch '{frozen}'
  wait $pid
  exit $?
fi
exec '{HPCFLOW}' "$@"
""")
    wrapper.chmod(0o755)
    path = _write(tmp_path, {
        "name": "requeue", "seed": 5, "dir": "camp", "config": _base(n), "beta": [1.0], "chains": 1,
        "hpcflow": str(wrapper),
        "stages": {"train": {"command": "run", "set": {"output.dir": "{chain_dir}/train",
                                                       "run.n_steps": n}, "resume": False},
                   "sample": {"command": "run", "after": ["train"], "resume": False}}})
    c = cp.load_campaign(path)
    state = cp.submit(c, out=lambda s: None)
    tj = state["jobs"]["beta1-c0/train"]["job_id"]
    sj = state["jobs"]["beta1-c0/sample"]["job_id"]
    _until(frozen.exists, "hpcflow of the train job to be running (frozen mid-chain)", slurm, [tj, sj],
           Path(c.dir))
    subprocess.run(["scontrol", "requeue", tj], check=True, capture_output=True, text=True)
    _run_to_completion([tj, sj], slurm, Path(c.dir))
    train = _status(c, "beta1-c0", "train")
    assert train["state"] == "done" and train["restarts"] == 1 and train["job_id"] == tj
    assert _status(c, "beta1-c0", "sample")["state"] == "done"
    first, again, _ = calls.read_text().splitlines()  # train twice, sample once
    # resume: false -> the rerun starts afresh, moving the interrupted attempt's results aside
    assert not first.endswith(("--fresh", "--resume")) and again.endswith("--fresh"), (first, again)
    comp = [r for r in _jobcomp(slurm) if r["Task"] in (tj, sj)]
    final_train = [r for r in comp if r["Task"] == tj and r["JobState"] == "COMPLETED"]
    sample = [r for r in comp if r["Task"] == sj]
    assert len(final_train) == 1 and len(sample) == 1 and sample[0]["JobState"] == "COMPLETED"
    assert sample[0]["StartTime"] >= final_train[0]["EndTime"]
    hist = hist_file.read_text().splitlines()
    assert len(hist) == n  # the rerun produced the whole chain again, not a truncated one


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
    # the rerun is driven by the scheduler's state (requeued -> pending on BeginTime -> released
    # -> running -> completed), never by a clock window
    _run_to_completion([jid], slurm, Path(c.dir))
    lines = calls.read_text().splitlines()
    assert len(lines) == 2 and "--resume" not in lines[0] and lines[1].endswith("--resume"), lines
    st = _status(c, "beta1-c0", "sample")
    assert st["state"] == "done" and st["restarts"] == 1 and st["job_id"] == jid
    rows = cp.campaign_status(c)
    assert rows[0]["configs"] == 8


def test_shell_and_sbatch_syntax_in_paths_stays_literal(slurm: Path, tmp_path: Path) -> None:
    """A campaign directory and an hpcflow path full of shell and sbatch syntax (spaces, $( ),
    backticks, quotes, ';', '#', '%'): the real sbatch reads the '#SBATCH' lines as meant (the
    log lands at the literal path, '%j' expanded and a literal '%' kept), the job runs none of
    it (no marker file anywhere) and hpcflow gets the literal config path."""
    stub_dir = tmp_path / "bin dir $(touch PWNED1)" / "`touch PWNED2`;'x'"
    stub_dir.mkdir(parents=True)
    rec = tmp_path / "argv.bin"
    stub = stub_dir / "hpcflow"
    stub.write_text(f"#!/bin/bash\nprintf '%s\\0' \"$@\" > {shlex.quote(str(rec))}\n")
    stub.chmod(0o755)
    path = _write(tmp_path, {
        "name": "hostile", "dir": "camp dir/$(touch PWNED3)/`touch PWNED4`/a;touch PWNED5/q'\"/50%j%%/#x",
        "config": _base(2), "beta": [1.0], "hpcflow": str(stub), "slurm": {"mpi": "none"},
        "stages": {"sample": {"command": "run", "resume": False}}})
    c = cp.load_campaign(path)
    (ch,), (st,) = cp.expand_chains(c), c.stages
    state = cp.submit(c, out=lambda s: None)
    jid = state["jobs"][f"{ch.id}/{st.name}"]["job_id"]
    _run_to_completion([jid], slurm, Path(c.dir))
    paths = cp.job_paths(c, ch, st)
    assert rec.read_bytes().split(b"\0")[:-1] == [b"run", paths["config"].encode()]
    assert (Path(c.dir) / "logs" / f"{st.name}.{jid}.out").is_file()  # jid: <array id>_<index>
    assert sorted(p.name for p in (Path(c.dir) / "logs").iterdir()) == [f"{st.name}.{jid}.out"]
    assert _status(c, ch.id, st.name)["state"] == "done"
    assert not list(tmp_path.rglob("PWNED*")) and not list(ROOT.glob("PWNED*"))
