"""Packaging (issue 20, item 1): PEP 621 metadata, the distribution name, the Python floor,
pins that agree everywhere, ``hpcflow --version``, ``python -m hpcflow``, and ``hpcflow info``
warning loudly about a serial h5py; and the package checked as a user gets it: an sdist is
built from a copy of the source files, a wheel from that sdist, the wheel installed with pip
into a fresh venv, and the commands run from that venv outside the checkout.

CI-sized: the fresh venv gets its dependencies (torch, mpi4py, parallel h5py, ...) from the
project's bootstrapped venv through a ``.pth`` line instead of downloading them again; the wheel
itself is installed by pip with ``--no-deps --no-index``, and every requirement of the installed
distribution is then checked against what that venv sees. Nothing here skips: a missing tool
(vermin, pip, setuptools) is a failure.
"""

from __future__ import annotations

import email
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

import hpcflow
from hpcflow.run import info as info_mod

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
DIST = "hpcflow-lattice"
FLOOR = (3, 11)
# files that carry version pins of the runtime stack
PIN_FILES = {
    "bootstrap": ROOT / "scripts" / "bootstrap.sh",
    "Dockerfile": ROOT / "docker" / "Dockerfile",
    "hpcflow.def": ROOT / "docker" / "hpcflow.def",
    "hpcflow-mpich.def": ROOT / "docker" / "hpcflow-mpich.def",
}
IMAGES = ("Dockerfile", "hpcflow.def", "hpcflow-mpich.def")
STACK = ("torch", "numpy", "pyyaml", "tqdm", "matplotlib", "mpi4py", "h5py")
PIN = re.compile(r"(?<![\w.-])([A-Za-z][A-Za-z0-9_.-]*)==([0-9][0-9A-Za-z.+]*)")


def _pins(text: str) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for name, ver in PIN.findall(text):
        out.setdefault(name.lower(), set()).add(ver)
    return out


# ---- metadata -----------------------------------------------------------------------------------
def test_pep621_metadata_name_scripts_and_version() -> None:
    assert PROJECT["name"] == DIST  # 'hpcflow' on PyPI is an unrelated workflow manager
    assert PROJECT["scripts"] == {"hpcflow": "hpcflow.run.cli:main"}
    assert PROJECT["dynamic"] == ["version"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "hpcflow.__version__"}
    assert PYPROJECT["build-system"]["build-backend"] == "setuptools.build_meta"
    # setup.py is only the shim for the model data files: no metadata of its own to drift
    shim = (ROOT / "setup.py").read_text()
    assert "setup(data_files=_model_files())" in shim
    for key in ("name=", "version=", "install_requires", "python_requires", "entry_points"):
        assert key not in shim, key


def test_every_package_is_in_the_wheel_list() -> None:
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "hpcflow").rglob("__init__.py")}
    found.add("hpcflow.kernels")
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    assert listed == found, f"pyproject.toml [tool.setuptools] packages: missing {found - listed}, stale {listed - found}"
    assert PYPROJECT["tool"]["setuptools"]["package-dir"] == {"hpcflow.kernels": "kernels"}


# ---- the Python floor ---------------------------------------------------------------------------
def _floor() -> tuple[int, int]:
    m = re.fullmatch(r">=(\d+)\.(\d+)", PROJECT["requires-python"])
    assert m, PROJECT["requires-python"]
    return int(m.group(1)), int(m.group(2))


def test_python_floor_is_what_the_code_needs_and_what_ci_runs() -> None:
    """The floor is 3.11: the code uses typing.Self and datetime.UTC (3.11), which vermin finds;
    nothing needs a newer Python; and this suite runs on 3.11, so the floor is the tested version."""
    floor = _floor()
    assert floor == FLOOR
    vermin = Path(sys.executable).parent / "vermin"
    exe = str(vermin) if vermin.exists() else shutil.which("vermin")
    if exe is None:
        pytest.fail("vermin not found: pip install vermin (scripts/bootstrap.sh --test does)")
    target = f"{floor[0]}.{floor[1]}"
    r = subprocess.run([exe, f"--target={target}-", "--violations", "--no-tips", "hpcflow", "kernels"],
                       cwd=ROOT, capture_output=True, text=True, check=False, timeout=300)
    assert r.returncode == 0, f"code that needs a Python newer than {target}:\n{r.stdout}{r.stderr}"
    m = re.search(r"Minimum required versions: ([\d.]+)", r.stdout)
    assert m and tuple(int(x) for x in m.group(1).split(".")) == floor, r.stdout
    assert sys.version_info[:2] == floor, (
        f"CI must run on the declared floor {target} (requires-python); this is {sys.version.split()[0]}")
    classifiers = [c for c in PROJECT["classifiers"] if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)]
    assert classifiers == [f"Programming Language :: Python :: {target}"]
    # the linters read the code as that version too
    assert f'target-version = "py{floor[0]}{floor[1]}"' in (ROOT / "ruff.toml").read_text()
    assert f"python_version = {target}" in (ROOT / "setup.cfg").read_text()


# ---- pins ---------------------------------------------------------------------------------------
def test_pins_agree_between_bootstrap_images_pyproject_and_readme() -> None:
    pins = {k: _pins(p.read_text()) for k, p in PIN_FILES.items()}
    versions: dict[str, str] = {}
    for name in STACK:
        seen = {k: pins[k].get(name) for k in PIN_FILES}
        assert all(v is not None and len(v) == 1 for v in seen.values()), (name, seen)
        assert len(set.union(*seen.values())) == 1, f"{name} pinned differently: {seen}"
        versions[name] = next(iter(seen["bootstrap"]))
    cupy = {k: pins[k].get("cupy-cuda12x") for k in IMAGES}
    assert all(v is not None and len(v) == 1 for v in cupy.values()) and len(set.union(*cupy.values())) == 1, cupy
    versions["cupy-cuda12x"] = next(iter(cupy["Dockerfile"]))
    # the images' build tools agree with each other
    for tool in ("setuptools", "wheel", "cython", "pkgconfig"):
        assert len({frozenset(pins[k].get(tool, ())) for k in IMAGES}) == 1, tool

    reqs = {Requirement(r).name.lower(): Requirement(r) for r in PROJECT["dependencies"]}
    assert set(reqs) == set(STACK), set(reqs) ^ set(STACK)
    # torch is exact (a newer release would pull its CUDA wheels); the rest are ranges that
    # contain the pinned versions
    assert str(reqs["torch"].specifier) == f"=={versions['torch']}"
    for name in STACK:
        assert versions[name] in reqs[name].specifier, (name, versions[name], str(reqs[name].specifier))
    (cupy_req,) = [Requirement(r) for r in PROJECT["optional-dependencies"]["cuda"]]
    assert cupy_req.name == "cupy-cuda12x" and str(cupy_req.specifier) == f"=={versions['cupy-cuda12x']}"
    # the test tools: the same list in bootstrap.sh --test and the 'test' extra
    m = re.search(r"^test_tools=\(([^)]*)\)", PIN_FILES["bootstrap"].read_text(), re.MULTILINE)
    assert m is not None
    assert sorted(m.group(1).split()) == sorted(PROJECT["optional-dependencies"]["test"])
    # the README names the same versions (torch and CuPy at least) and no other
    readme = _pins((ROOT / "README.md").read_text())
    assert {"torch", "cupy-cuda12x"} <= set(readme)
    for name in versions:
        assert readme.get(name, {versions[name]}) == {versions[name]}, (name, readme.get(name))
    # the images take torch from PyTorch's CUDA 12.8 index, matching their CUDA 12.8 base
    for k in IMAGES:
        text = PIN_FILES[k].read_text()
        assert "nvidia/cuda:12.8" in text and "download.pytorch.org/whl/cu128" in text, k


# ---- hpcflow info, --version --------------------------------------------------------------------
class _SerialConfig:
    mpi = False


def test_info_warns_loudly_when_h5py_lacks_mpi(monkeypatch, capsys) -> None:
    import h5py

    from hpcflow.run.cli import main

    monkeypatch.setattr(h5py, "get_config", lambda: _SerialConfig())
    assert main(["info", "--json"]) == 0
    out, err = capsys.readouterr()
    info = json.loads(out)
    assert info["h5py_mpi"] is False
    (w,) = [w for w in info["warnings"] if w.startswith("h5py")]
    assert "without MPI" in w and "HDF5_MPI=ON" in w and "--no-binary=h5py" in w
    assert f"hpcflow info: WARNING: {w}" in err.splitlines()
    assert main(["info"]) == 0
    out, err = capsys.readouterr()
    assert "WARNING" in err and "without MPI" in err
    assert re.search(r"^warnings\s+1 \(on stderr\)$", out, re.MULTILINE), out


def test_info_is_quiet_with_parallel_h5py(capsys) -> None:
    """The CI venv has h5py built against parallel HDF5 (bootstrap.sh): no warning."""
    info = info_mod.collect_info()
    assert info["h5py_mpi"] is True and info["warnings"] == []
    assert "WARNING" not in capsys.readouterr().err


def test_stack_warnings_name_each_missing_piece() -> None:
    w = info_mod.stack_warnings({"h5py": None, "mpi4py": None, "error": "mpi4py not importable: boom"})
    assert len(w) == 2 and w[0].startswith("h5py is not importable") and "boom" in w[1]
    assert info_mod.stack_warnings({"h5py": "3.16.0", "h5py_mpi": True, "mpi4py": "4.1.2"}) == []


def test_version_flag(capsys) -> None:
    from hpcflow.run.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"hpcflow {hpcflow.__version__}"


# ---- the wheel as a user gets it ------------------------------------------------------------------
SOURCE_FILES = ("pyproject.toml", "setup.py", "README.md")
SOURCE_DIRS = ("hpcflow", "kernels", "models")


def _run(cmd: list[str], cwd: Path, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert r.returncode == 0, f"{cmd}: exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """sdist from a copy of the source files -> wheel from the unpacked sdist -> pip install of
    the wheel into a fresh venv; the venv sees the bootstrapped stack through a .pth line."""
    tmp = tmp_path_factory.mktemp("packaging")
    src = tmp / "src"
    src.mkdir()
    for f in SOURCE_FILES:
        shutil.copy2(ROOT / f, src / f)
    junk = shutil.ignore_patterns("__pycache__", "*.pyc", "*.so", "*.egg-info")
    for d in SOURCE_DIRS:
        shutil.copytree(ROOT / d, src / d, ignore=junk)
    sdist_dir = tmp / "sdist"
    r = _run([sys.executable, "-c", "import sys; from setuptools import build_meta as b; print(b.build_sdist(sys.argv[1]))",
              str(sdist_dir)], cwd=src)
    sdist = sdist_dir / r.stdout.strip().splitlines()[-1]
    with tarfile.open(sdist) as t:
        sdist_names = t.getnames()
        if hasattr(tarfile, "data_filter"):  # 3.11.4+
            t.extractall(tmp / "unpacked", filter="data")
        else:
            t.extractall(tmp / "unpacked")
    (unpacked,) = (tmp / "unpacked").iterdir()
    wheels = tmp / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
          "-w", str(wheels), str(unpacked)], cwd=tmp)
    (whl,) = wheels.glob("*.whl")

    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], cwd=tmp)
    py = venv / "bin" / "python"
    _run([str(py), "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--disable-pip-version-check", str(whl)],
         cwd=tmp)
    # the runtime stack of the bootstrapped venv (torch, mpi4py, parallel h5py, ...), after the
    # fresh venv's own site-packages
    purelib = _run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp).stdout.strip()
    (Path(purelib) / "_hpcflow_test_stack.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    work = tmp / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HPCFLOW_MODELS", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS="1", PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}")
    return {"sdist_names": sdist_names, "whl": whl, "venv": venv, "py": py, "work": work, "env": env}


def test_sdist_and_wheel_carry_everything(installed: dict) -> None:
    names = set(installed["sdist_names"])
    top = installed["sdist_names"][0].split("/")[0]
    for f in (*SOURCE_FILES, "models/u1-L16-b1/checkpoint.pt", "kernels/plaquette.cu", "hpcflow/run/info.py"):
        assert f"{top}/{f}" in names, f
    whl: Path = installed["whl"]
    assert whl.name.startswith(f"hpcflow_lattice-{hpcflow.__version__}-py3-none-any")
    z = zipfile.ZipFile(whl)
    wnames = set(z.namelist())
    data = f"hpcflow_lattice-{hpcflow.__version__}.data/data/share/hpcflow/models"
    for m in sorted(d.name for d in (ROOT / "models").iterdir() if d.is_dir()):
        assert f"{data}/{m}/checkpoint.pt" in wnames and f"{data}/{m}/model.json" in wnames
    for f in ("hpcflow/__main__.py", "hpcflow/kernels/plaquette.cu", "hpcflow/kernels/host_simd.cpp",
              "hpcflow/kernels/philox.h", "hpcflow/kernels/su_n.cuh"):
        assert f in wnames, f
    meta = email.message_from_bytes(z.read(f"hpcflow_lattice-{hpcflow.__version__}.dist-info/METADATA"))
    assert meta["Name"] == DIST and meta["Version"] == hpcflow.__version__
    assert meta["Requires-Python"] == PROJECT["requires-python"]
    assert f"torch=={_pins(PIN_FILES['bootstrap'].read_text())['torch'].pop()}" in meta.get_all("Requires-Dist")
    assert "cuda" in meta.get_all("Provides-Extra")
    ep = z.read(f"hpcflow_lattice-{hpcflow.__version__}.dist-info/entry_points.txt").decode()
    assert "hpcflow = hpcflow.run.cli:main" in ep


def test_installed_requirements_are_met_by_the_stack(installed: dict) -> None:
    """What `pip check` does, for this distribution only: each requirement of the installed
    hpcflow-lattice (no extras) is satisfied by what its venv sees (the bootstrapped stack)."""
    code = r"""
import importlib.metadata as m, json
from packaging.requirements import Requirement
bad = []
for r in map(Requirement, m.requires("hpcflow-lattice") or []):
    if r.marker is not None and not r.marker.evaluate({"extra": ""}):
        continue
    try:
        v = m.version(r.name)
    except m.PackageNotFoundError:
        bad.append(f"{r}: not installed"); continue
    if not r.specifier.contains(v, prereleases=True):
        bad.append(f"{r}: {v} installed")
print(json.dumps(bad))
"""
    r = _run([str(installed["py"]), "-c", code], cwd=installed["work"], env=installed["env"])
    assert json.loads(r.stdout) == []


def _cli(installed: dict, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return _run([str(installed["venv"] / "bin" / "hpcflow"), *args], cwd=installed["work"], env=installed["env"],
                timeout=timeout)


def test_fresh_venv_commands(installed: dict) -> None:
    venv: Path = installed["venv"]
    where = _run([str(installed["py"]), "-c", "import hpcflow, hpcflow.kernels as k; print(hpcflow.__file__); "
                  "print(k.__file__)"], cwd=installed["work"], env=installed["env"]).stdout.split()
    assert all(Path(p).is_relative_to(venv) for p in where), where  # not the checkout
    assert _cli(installed, "--version").stdout.strip() == f"hpcflow {hpcflow.__version__}"
    r = _run([str(installed["py"]), "-m", "hpcflow", "--version"], cwd=installed["work"], env=installed["env"])
    assert r.stdout.strip() == f"hpcflow {hpcflow.__version__}"
    r = _cli(installed, "info", "--json")
    info = json.loads(r.stdout)
    assert info["hpcflow"] == hpcflow.__version__ and info["h5py_mpi"] is True
    assert info["warnings"] == [] and "WARNING" not in r.stderr
    models = json.loads(_cli(installed, "models", "--json").stdout)
    (b1,) = [m for m in models if m["name"] == "u1-L16-b1"]
    assert Path(b1["path"]) == venv / "share" / "hpcflow" / "models" / "u1-L16-b1"
    assert "u1-L16-b1" in _cli(installed, "models").stdout


def test_fresh_venv_runs_a_chain_and_samples_a_shipped_model(installed: dict) -> None:
    work: Path = installed["work"]
    (work / "hb.yaml").write_text(
        "lattice: {shape: [4, 4]}\ngroup: u1\naction: {beta: 1.0}\nalgorithm: heatbath\n"
        "run: {n_therm: 2, n_steps: 10, progress: false}\noutput: {dir: hb}\n")
    _cli(installed, "run", "hb.yaml")
    summary = json.loads((work / "hb" / "summary.json").read_text())
    assert "plaquette" in json.dumps(summary)
    (work / "flow.yaml").write_text(
        "flow: {model: u1-L16-b1}\nseed: 5\nsample: {n_steps: 8, batch: 8}\nrun: {progress: false}\n"
        "output: {dir: flow}\n")
    _cli(installed, "sample", "flow.yaml")
    assert any((work / "flow" / "ensemble").rglob("*.h5"))
