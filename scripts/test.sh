#!/usr/bin/env bash
# The whole hpcflow test suite on a fresh machine: installs what is missing (scripts/bootstrap.sh),
# then runs
#   1. the serial tier: unit, physics (statistical), kernels (nvcc PTX + host-compiled numerics);
#   2. the MPI tier: tests/parallel under mpirun at 1, 2 and 4 ranks (scripts/run_mpi_tests.sh);
#   3. the type-check tier: mypy hpcflow against scripts/mypy_baseline.json (scripts/typecheck.py;
#      one JUnit testcase, failed by any file with more errors than its baseline);
# and prints one closing line 'tests: N passed, N failed, N skipped' over all tiers.
# A tier that did not run (MPI missing, h5py without MPI, no test collected) fails the suite.
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
bash scripts/bootstrap.sh --test || { echo "test.sh: bootstrap failed" >&2; exit 1; }
py="${HPCFLOW_VENV:-$here/.venv}/bin/python"
results="$(mktemp -d "${TMPDIR:-/tmp}/hpcflow-tests.XXXXXX")"
export HPCFLOW_TEST_RESULTS="$results"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
status=0

echo "== serial tier: unit, physics, kernels =="
"$py" -m pytest tests --ignore=tests/parallel -q -p no:cacheprovider --junitxml="$results/serial.xml" "$@"
rc=$?
if [ $rc -eq 5 ]; then echo "test.sh: serial tier collected no tests" >&2; status=1
elif [ $rc -ne 0 ]; then status=1; fi

echo "== MPI tier: 1, 2 and 4 ranks =="
if [ -f scripts/run_mpi_tests.sh ]; then
  bash scripts/run_mpi_tests.sh || status=1
else
  echo "test.sh: scripts/run_mpi_tests.sh is missing: the MPI tier cannot run" >&2; status=1
fi

echo "== type-check tier: mypy against its baseline =="
"$py" scripts/typecheck.py --junitxml="$results/typecheck.xml" || status=1

"$py" scripts/junit_summary.py "$results" || status=1
exit $status
