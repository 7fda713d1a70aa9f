#!/usr/bin/env bash
# The MPI test tier: tests/parallel under mpirun at 1, 2 and 4 ranks (oversubscribed).
# Fails when mpi4py/pytest-mpi/mpirun are missing, when any rank reports a failure, an
# error or a SKIPPED test, when no test ran, or when a run hangs (timeout per run).
# Usage: scripts/run_mpi_tests.sh [extra pytest args]   (env: HPCFLOW_MPI_SIZES="1 2 4",
#        HPCFLOW_MPI_TIMEOUT=600, HPCFLOW_TEST_RESULTS=dir to keep rank-0 JUnit files)
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
py="${HPCFLOW_VENV:-$here/.venv}/bin/python"
sizes="${HPCFLOW_MPI_SIZES:-1 2 4}"
limit="${HPCFLOW_MPI_TIMEOUT:-600}"
log() { echo "[run_mpi_tests] $*" >&2; }

command -v mpirun >/dev/null || { log "FAIL: mpirun not found (install openmpi-bin: scripts/bootstrap.sh)"; exit 1; }
"$py" -c "from mpi4py import MPI" 2>/dev/null || { log "FAIL: mpi4py does not import in $py"; exit 1; }
"$py" -c "import pytest_mpi" 2>/dev/null || { log "FAIL: pytest-mpi is not installed in $py"; exit 1; }

work="$(mktemp -d "${TMPDIR:-/tmp}/hpcflow-mpi.XXXXXX")"
trap 'rm -rf "$work"' EXIT
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# Open MPI as root on a container, more ranks than cores
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
status=0
for p in $sizes; do
  log "== $p rank(s) =="
  # each rank writes its own JUnit file (rank from Open MPI, MPICH/PMI or Slurm)
  timeout -k 10 "$limit" mpirun --oversubscribe --allow-run-as-root -n "$p" \
    bash -c 'r="${OMPI_COMM_WORLD_RANK:-${PMI_RANK:-${SLURM_PROCID:-0}}}";
             [ "$r" = 0 ] || exec >"'"$work"'/np'"$p"'-rank$r.out" 2>&1;
             exec "$0" -m pytest --with-mpi -q -p no:cacheprovider --color=no tests/parallel \
               --junitxml="'"$work"'/np'"$p"'-rank$r.xml" "$@"' "$py" "$@"
  rc=$?
  [ $rc -eq 124 ] && log "FAIL: $p ranks timed out after ${limit}s (deadlock?)"
  if [ $rc -ne 0 ]; then
    log "FAIL: mpirun -n $p exited with $rc"; status=1
    for f in "$work"/np"$p"-rank*.out; do [ -f "$f" ] && { log "--- tail of $(basename "$f")"; tail -n 30 "$f" >&2; }; done
  fi
  "$py" - "$work" "$p" <<'PY' || status=1
import glob, os, sys
import xml.etree.ElementTree as ET
work, p = sys.argv[1], int(sys.argv[2])
files = sorted(glob.glob(os.path.join(work, f"np{p}-rank*.xml")))
bad = []
if len(files) != p:
    bad.append(f"expected {p} JUnit files (one per rank), found {len(files)}")
counts = set()
for f in files:
    root = ET.parse(f).getroot()
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    n = sum(int(s.get("tests", 0)) for s in suites)
    fail = sum(int(s.get("failures", 0)) + int(s.get("errors", 0)) for s in suites)
    skip = sum(int(s.get("skipped", 0)) for s in suites)
    counts.add(n)
    name = os.path.basename(f)
    if n == 0:
        bad.append(f"{name}: no test ran")
    if fail:
        bad.append(f"{name}: {fail} failed")
    if skip:
        skipped = [c.get("classname", "") + "::" + c.get("name", "") for c in root.iter("testcase")
                   if c.find("skipped") is not None]
        bad.append(f"{name}: {skip} skipped (a skipped MPI test is a failure): {skipped[:5]}")
if len(counts) > 1:
    bad.append(f"ranks ran different numbers of tests: {sorted(counts)}")
for b in bad:
    print(f"[run_mpi_tests] FAIL ({p} ranks): {b}", file=sys.stderr)
if not bad:
    print(f"[run_mpi_tests] {p} rank(s): {min(counts)} tests passed on every rank", file=sys.stderr)
sys.exit(1 if bad else 0)
PY
  # rank 0's file joins the suite summary of scripts/test.sh
  if [ -n "${HPCFLOW_TEST_RESULTS:-}" ] && [ -f "$work/np$p-rank0.xml" ]; then
    cp "$work/np$p-rank0.xml" "$HPCFLOW_TEST_RESULTS/mpi-np$p.xml"
  fi
done
[ $status -eq 0 ] && log "MPI tier passed at $sizes ranks" || log "MPI tier FAILED"
exit $status
