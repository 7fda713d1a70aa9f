"""Issue 19 item 5: logs for batch jobs. Without a terminal, progress is plain lines (no
carriage return, one every 10% or 60 s); `hpcflow sample` prints what it starts, its progress
and a closing summary, also when stopped by a signal."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys

from hpcflow.progress import Progress

LINE = re.compile(r"^hpcflow sample chain 0: step (\d+)/(\d+) \((\d+)%\), [0-9.e+]+ steps/s, "
                  r"(ETA [0-9a-z ]+|[0-9a-z ]+), acceptance \d\.\d{3}$")


def test_plain_lines_every_ten_percent() -> None:
    buf = io.StringIO()
    p = Progress(1000, "hpcflow run hmc", stream=buf)
    assert not p.tty
    for i in range(1000):
        p.update(1, accepted=i % 4 != 0)
    p.close()
    text = buf.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert 10 <= len(lines) <= 11 and lines[-1].startswith("hpcflow run hmc: step 1000/1000 (100%)")
    assert lines[-1].endswith("acceptance 0.750")
    assert lines[0].startswith("hpcflow run hmc: step 100/1000 (10%)") and "ETA" in lines[0]


def test_seconds_trigger_and_disabled(monkeypatch) -> None:
    import hpcflow.progress as pr

    now = [0.0]
    monkeypatch.setattr(pr.time, "monotonic", lambda: now[0])
    buf = io.StringIO()
    p = Progress(10**6, "x", stream=buf, every_seconds=60)
    for _ in range(5):
        now[0] += 61.0
        p.update(1)
    assert len(buf.getvalue().splitlines()) == 5  # one per minute, far below 10%
    off = io.StringIO()
    q = Progress(10, "x", stream=off, enabled=False)
    q.update(10)
    q.close()
    assert off.getvalue() == ""


def _yaml(tmp_path, n_steps: int) -> str:  # type: ignore[no-untyped-def]
    p = tmp_path / "c.yaml"
    p.write_text("lattice: {shape: [8, 8]}\ngroup: u1\naction: {beta: 2.0}\nalgorithm: hmc\n"
                 f"run: {{n_therm: 5, n_steps: {n_steps}, plots: false}}\nsample: {{checkpoint_every: 10}}\n"
                 "measure: {wilson_loops: [[1, 1]]}\n"
                 f"output: {{dir: {tmp_path / 'out'}}}\n")
    return str(p)


def test_sample_batch_log(tmp_path) -> None:
    """stderr to a file: no '\\r', at most ~11 progress lines; stdout: start, chain, summary."""
    cfg = _yaml(tmp_path, 60)
    with open(tmp_path / "err.txt", "w") as err:
        r = subprocess.run([sys.executable, "-m", "hpcflow", "sample", cfg], stdout=subprocess.PIPE,
                           stderr=err, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert r.returncode == 0, r.stdout
    text = (tmp_path / "err.txt").read_text()
    assert "\r" not in text
    prog = [ln for ln in text.splitlines() if ln.startswith("hpcflow sample chain 0:")]
    assert 1 <= len(prog) <= 11, text
    assert all(LINE.match(ln) for ln in prog), prog
    assert prog[-1].startswith("hpcflow sample chain 0: step 65/65 (100%)")
    out = r.stdout.splitlines()
    assert out[0].startswith(f"hpcflow sample: {cfg}: hmc u1 8x8 beta=2.0; 1 chain x 1 rank(s)")
    assert "hpcflow sample: chain 0: fresh start" in out
    done = [ln for ln in out if ln.startswith("hpcflow sample: done: ")]
    assert len(done) == 1 and "60 configurations committed in 1 chain (60 this run, acceptance " in done[0]
    assert "updates" in done[0] and "measurements" in done[0]


class _StopAfter:
    """A stop flag that asks to stop after ``n`` checks (as a signal would)."""

    def __init__(self, n: int) -> None:
        self.n, self.signal_name = n, None

    @property
    def stop_requested(self) -> bool:
        self.n -= 1
        if self.n < 0:
            self.signal_name = "SIGTERM"
        return self.n < 0

    def __enter__(self):  # type: ignore[no-untyped-def]
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def test_sample_summary_when_stopped_and_resume_point(tmp_path, capsys) -> None:
    from hpcflow.config import load_config
    from hpcflow.exit_codes import EXIT_RESUMABLE
    from hpcflow.run.sample import sample

    cfg = load_config(_yaml(tmp_path, 40), ["run.progress=false"])
    assert sample(cfg, use_mpi=False, stop=_StopAfter(27)) == EXIT_RESUMABLE
    out = capsys.readouterr().out
    line = [ln for ln in out.splitlines() if ln.startswith("hpcflow sample: stopped by SIGTERM: ")]
    assert len(line) == 1 and "23 configurations committed" in line[0] and "rerun the same command" in line[0]
    assert sample(cfg, use_mpi=False) == 0
    out = capsys.readouterr().out
    assert "hpcflow sample: chain 0: resuming after step 28 (23 configurations in 3 segments committed)" in out
    assert "hpcflow sample: done: 40 configurations committed in 1 chain (17 this run" in out
