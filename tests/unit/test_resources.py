"""Bounds before work (issue 18, item 7): the up-front memory estimate of ``hpcflow.run.resources``
and the input bounds of the config parser.

What is proven: the audit's 96^4 SU(3) job is refused by ``run``, ``sample`` and ``train`` with
one line giving the estimate and the limit, exit 2, before anything is written; the estimate is
a lower bound of the peak memory real runs use (heat bath, HMC, flow training and sampling,
measured as the growth of the peak RSS of the process); the limit is the smallest cgroup
limit along the process's cgroup path (v2, v1) or MemAvailable, shared by the ranks on a node;
``HPCFLOW_MEMORY_CHECK=off`` lets a job through. Config files: a YAML alias bomb, deep nesting
and an oversized file are one line (no expansion), also through ``--set``; error lines never
print unbounded values; Wilson loops larger than the lattice and a flow step larger than the flow time are refused at config time. HMC
from a hot start of a large lattice (dH < -709) no longer ends in an OverflowError.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hpcflow.config import ConfigError, config_from_dict, load_config
from hpcflow.run import resources
from hpcflow.run.resources import check_memory, estimate_bytes

ROOT = Path(__file__).resolve().parents[2]
BIG = {"lattice": {"shape": [96, 96, 96, 96]}, "group": "su3"}


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != resources.MEMORY_CHECK_ENV}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **extra}


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hpcflow.run.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env or _env(), timeout=600, check=False)


@pytest.mark.parametrize("command,algorithm", [("run", "hmc"), ("sample", "heatbath"), ("train", "flow")])
def test_96_4_su3_is_refused_before_any_work(tmp_path: Path, command: str, algorithm: str) -> None:
    out = tmp_path / "out"
    cfg = tmp_path / "big.yaml"
    cfg.write_text(yaml.safe_dump({**BIG, "algorithm": algorithm, "output": {"dir": str(out)}}))
    r = _cli(command, str(cfg))
    assert r.returncode == 2, r.stderr[-2000:]
    line = r.stderr.strip()
    assert "\n" not in line and "Traceback" not in line, line
    assert "GiB per rank" in line and "may use" in line and "HPCFLOW_MEMORY_CHECK=off" in line, line
    assert not out.exists()


_PEAK = """
import sys
import torch  # noqa: F401  (the baseline includes torch)
from hpcflow.run.cli import main

def hwm():  # this process's peak RSS in KiB (VmHWM: per address space, so not inherited across
    # fork + exec as getrusage's ru_maxrss is: a child of a large pytest process reported its size)
    with open("/proc/self/status") as fh:
        return int(next(x for x in fh if x.startswith("VmHWM:")).split()[1])

r0 = hwm()
rc = main(sys.argv[1:])
print("PEAK", r0, hwm(), rc)
"""


def _peak(tmp_path: Path, name: str, command: str, raw: dict) -> tuple[int, str]:
    """``(peak RSS in bytes, the PEAK line)`` of ``hpcflow COMMAND`` on ``raw`` in a fresh process."""
    raw = {**raw, "run": {**raw.get("run", {}), "progress": False, "plots": False},
           "output": {"dir": str(tmp_path / name)}}
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    r = subprocess.run([sys.executable, "-c", _PEAK, command, str(cfg)], capture_output=True, text=True,
                       cwd=ROOT, env=_env(), timeout=600, check=False)
    line = [x for x in r.stdout.splitlines() if x.startswith("PEAK")]
    assert line, r.stderr[-2000:]
    _, _, r1, rc = line[-1].split()
    assert rc == "0", r.stderr[-2000:]
    return int(r1) * 1024, line[-1]


# (command, the job, the same job on a tiny lattice): the difference of the measured peaks is
# compared with the difference of the estimates, so that the start-up (imports, kernels, MPI)
# cancels whatever its own peak is
CASES = [
    ("run", {"lattice": {"shape": [16, 16, 16, 16]}, "group": "su3", "algorithm": "heatbath",
             "run": {"n_therm": 0, "n_steps": 1}, "measure": {"flow_time": 0.04, "flow_eps": 0.02}}, [4, 4, 4, 4]),
    ("run", {"lattice": {"shape": [16, 16, 16, 16]}, "group": "su3", "algorithm": "hmc", "hmc": {"n_steps": 2},
             "run": {"n_therm": 0, "n_steps": 1}, "measure": {"flow_time": 0}}, [4, 4, 4, 4]),
    ("train", {"lattice": {"shape": [48, 48]}, "algorithm": "flow", "flow": {"n_layers": 8, "hidden": [16, 16]},
               "train": {"steps": 2, "batch": 64}}, [8, 8]),
]


@pytest.mark.parametrize("command,raw,tiny", CASES)
def test_the_estimate_is_a_lower_bound_of_the_measured_peak(tmp_path: Path, command: str, raw: dict,
                                                            tiny: list[int]) -> None:
    small = {**raw, "lattice": {"shape": tiny}}
    big_peak, big_line = _peak(tmp_path, "big", command, raw)
    small_peak, small_line = _peak(tmp_path, "small", command, small)
    grown = big_peak - small_peak
    est, how = estimate_bytes(config_from_dict(raw), command)
    est -= estimate_bytes(config_from_dict(small), command)[0]
    assert est > 50 * 2**20, how  # a real amount, so that the comparison means something
    print(f"MARGIN {command} {est / 2**20:.0f} MiB estimate, {grown / 2**20:.0f} MiB measured")
    assert est <= grown, (f"estimate {est / 2**20:.0f} MiB > measured peak difference {grown / 2**20:.0f} MiB "
                          f"({big_line}; tiny: {small_line}): {how}")


def _fake_cgroup(tmp_path: Path, v2_limits: dict[str, str]) -> tuple[str, str]:
    root = tmp_path / "cg"
    for rel, value in v2_limits.items():
        d = root / rel
        d.mkdir(parents=True, exist_ok=True)
        (d / "memory.max").write_text(value + "\n")
    proc = tmp_path / "proc_cgroup"
    proc.write_text("0::/user.slice/job42/step0\n")
    return str(proc), str(root)


def test_cgroup_v2_limit_is_the_smallest_along_the_path(tmp_path: Path) -> None:
    proc, root = _fake_cgroup(tmp_path, {"user.slice": "max", "user.slice/job42": str(8 << 30),
                                         "user.slice/job42/step0": str(12 << 30)})
    assert resources._cgroup_limit(proc, root) == 8 << 30
    proc, root = _fake_cgroup(tmp_path / "b", {"user.slice/job42/step0": "max"})
    assert resources._cgroup_limit(proc, root) is None


def test_cgroup_v1_limit(tmp_path: Path) -> None:
    root = tmp_path / "cg"
    (root / "memory" / "job7").mkdir(parents=True)
    (root / "memory" / "job7" / "memory.limit_in_bytes").write_text(str(3 << 30))
    (root / "memory" / "memory.limit_in_bytes").write_text(str(2**63 - 4096))  # "unlimited"
    proc = tmp_path / "proc_cgroup"
    proc.write_text("4:cpu,cpuacct:/job7\n3:memory:/job7\n")
    assert resources._cgroup_limit(str(proc), str(root)) == 3 << 30


def test_limit_is_shared_by_the_ranks_on_a_node(monkeypatch) -> None:
    monkeypatch.setattr(resources, "_cgroup_limit", lambda: 16 << 30)
    monkeypatch.setattr(resources, "_mem_available", lambda: 20 << 30)
    monkeypatch.delenv("OMPI_COMM_WORLD_LOCAL_SIZE", raising=False)
    monkeypatch.delenv("MPI_LOCALNRANKS", raising=False)
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "4")
    limit, src = resources.memory_limit()
    assert limit == 4 << 30 and "cgroup" in src and "4 ranks" in src
    monkeypatch.setattr(resources, "_cgroup_limit", lambda: None)
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_SIZE", "2")
    limit, src = resources.memory_limit()
    assert limit == 10 << 30 and "MemAvailable" in src


def test_check_memory_refuses_and_the_switch_lets_it_through(monkeypatch) -> None:
    cfg = config_from_dict({"lattice": {"shape": [16, 16, 16, 16]}, "group": "su3", "algorithm": "hmc"})
    need, _ = estimate_bytes(cfg, "run")
    monkeypatch.setattr(resources, "memory_limit", lambda: (need - 1, "test limit"))
    monkeypatch.delenv(resources.MEMORY_CHECK_ENV, raising=False)
    with pytest.raises(ConfigError, match="test limit"):
        check_memory(cfg, "run")
    monkeypatch.setattr(resources, "memory_limit", lambda: (need, "test limit"))
    check_memory(cfg, "run")  # exactly the estimate fits
    monkeypatch.setattr(resources, "memory_limit", lambda: (1, "test limit"))
    monkeypatch.setenv(resources.MEMORY_CHECK_ENV, "off")
    check_memory(cfg, "run")
    # more ranks per chain: less per rank (the lattice is split; halos added)
    assert estimate_bytes(cfg, "run", ranks_per_chain=4)[0] < need


# ---- config bounds ------------------------------------------------------------------------
BOMB = """\
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
"""


def test_yaml_alias_bomb_in_a_config_is_one_line(tmp_path: Path) -> None:
    p = tmp_path / "bomb.yaml"
    p.write_text(BOMB)
    with pytest.raises(ConfigError, match="aliases expand"):
        load_config(p)
    r = _cli("run", str(p))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "aliases expand" in r.stderr, r.stderr


def test_deep_nesting_and_oversized_files_are_one_line(tmp_path: Path) -> None:
    deep = tmp_path / "deep.yaml"
    deep.write_text("a: " + "[" * 200 + "]" * 200 + "\n")
    with pytest.raises(ConfigError, match="nested deeper"):
        load_config(deep)
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * (1 << 21) + "\n")
    with pytest.raises(ConfigError, match="larger than"):
        load_config(big)
    with pytest.raises(ConfigError, match="aliases expand"):  # through --set as well
        _set_bomb()


def _set_bomb() -> None:
    layers = ["&l0 [" + ",".join(["lol"] * 9) + "]"]
    for i in range(1, 9):
        layers.append(f"&l{i} [" + ",".join([f"*l{i - 1}"] * 9) + "]")
    load_config(None, ["run.n_steps=[" + ", ".join(layers) + "]"])


def test_error_lines_never_print_unbounded_values(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        config_from_dict({"action": {"beta": "x" * 100000}})
    assert len(str(e.value)) < 600 and "characters" in str(e.value)
    with pytest.raises(ConfigError) as e:
        config_from_dict({"y" * 100000: 1})
    assert len(str(e.value)) < 1000
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"lattice": {"shape": list(range(2, 50000))}}))
    r = _cli("run", str(p))
    assert r.returncode == 2 and len(r.stderr) < 1000, r.stderr[:2000]


@pytest.mark.parametrize("raw,key,allowed", [
    ({"lattice": {"shape": [4, 4]}, "measure": {"wilson_loops": [[1, 1], [5, 1]]}}, "measure.wilson_loops[1]",
     "R and T <= 4"),
    ({"lattice": {"shape": [8, 8, 8, 6]}, "measure": {"wilson_loops": [[7, 2]]}}, "measure.wilson_loops[0]",
     "R and T <= 6"),
    ({"measure": {"flow_time": 0.1, "flow_eps": 0.5}}, "measure.flow_eps", "<= measure.flow_time"),
])
def test_measurement_settings_are_checked_against_the_lattice(raw: dict, key: str, allowed: str) -> None:
    with pytest.raises(ConfigError) as e:
        config_from_dict(raw)
    assert f"key '{key}'" in str(e.value) and allowed in str(e.value), str(e.value)


def test_default_loops_fit_the_smallest_lattice() -> None:
    cfg = config_from_dict({"lattice": {"shape": [2, 2]}})
    assert max(max(x) for x in cfg.measure.wilson_loops) <= 2


def test_hmc_hot_start_with_dh_below_minus_709_does_not_overflow(tmp_path: Path) -> None:
    """A hot start of SU(3) 14^4 at beta 2: the first trajectory's dH is about -900 (exp(-dH)
    overflows a float); before the fix math.exp raised OverflowError and the run ended in a traceback."""
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"lattice": {"shape": [14, 14, 14, 14]}, "group": "su3", "algorithm": "hmc",
                                 "hmc": {"n_steps": 2}, "run": {"n_therm": 0, "n_steps": 1, "progress": False},
                                 "measure": {"flow_time": 0}, "output": {"dir": str(tmp_path / "o")}}))
    r = _cli("run", str(p))
    assert r.returncode == 0, r.stderr[-2000:]
    row = json.loads((tmp_path / "o" / "history.jsonl").read_text().splitlines()[0])
    assert row["dH"] < -709 and row["exp_mdH"] == float("inf")
