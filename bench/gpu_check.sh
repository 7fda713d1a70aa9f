#!/usr/bin/env bash
# One-shot GPU check of the CUDA kernels (issue 4): the GPU tests and the GPU kernel
# benchmark, for a node with a CUDA GPU, a CUDA build of torch and cupy already installed
# (an HPC GPU node's module environment, or a lent device machine: nothing is downloaded).
#
#   bash bench/gpu_check.sh            # logs and JSON in $OUT (default ./gpu_check_out)
#   PYTHON=/path/to/python bash bench/gpu_check.sh
#
# Steps: versions and device; hpcflow installed editable without dependencies (they must be
# there: numpy, pyyaml, h5py, mpi4py, tqdm, matplotlib, pytest); tests/kernels/
# test_kernels_cuda.py (kernels vs torch reference, autograd, streams, the benchmark's smoke
# test); bench/kernels.py --device cuda at 24^4, 32^4, 48^4 (effective bandwidth as a
# fraction of nominal peak and of a device copy; target >= 60% of peak). Exit status: that
# of the tests, else of the benchmark.
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
py="${PYTHON:-python3}"
out="${OUT:-$here/gpu_check_out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"
log="$out/gpu_check.log"
: >"$log"
step() { echo "== $*" | tee -a "$log"; }

step "versions"
"$py" - <<'PY' 2>&1 | tee -a "$log"
import torch
print("torch", torch.__version__, "CUDA", torch.version.cuda, "GPU available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0))
try:
    import cupy
    print("cupy", cupy.__version__)
except ImportError as exc:
    print("cupy missing:", exc)
PY

# the GPU tests skip without a GPU or cupy: refuse here rather than report skipped tests as a pass
"$py" -c "import torch, cupy, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null || {
    echo "gpu_check: needs a CUDA GPU that torch sees and cupy ($py); nothing was checked" | tee -a "$log"; exit 2; }

step "install hpcflow (editable, no dependencies, no downloads)"
if ! "$py" -c "import hpcflow.kernels" 2>/dev/null; then
    "$py" -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tee -a "$log" || {
        echo "gpu_check: could not install hpcflow into $py's environment" | tee -a "$log"; exit 1; }
fi

step "GPU tests: tests/kernels/test_kernels_cuda.py"
"$py" -m pytest -q -p no:cacheprovider -ra tests/kernels/test_kernels_cuda.py 2>&1 | tee -a "$log"
rc_tests=${PIPESTATUS[0]}

step "GPU kernel benchmark"
"$py" bench/kernels.py --device cuda --sizes 24 32 48 --reps 10 --json "$out/kernels_gpu.json" 2>&1 | tee -a "$log"
rc_bench=${PIPESTATUS[0]}

step "done: tests rc=$rc_tests, benchmark rc=$rc_bench (log: $log)"
[ "$rc_tests" -ne 0 ] && exit "$rc_tests"
exit "$rc_bench"
