#!/bin/bash
# hpcflow with a plain mpirun (workstation, cloud VM, a site without a scheduler):
#   jobs/mpirun.sh NRANKS CONFIG.yaml [train|sample|run]
# With CHUNK_S set, each attempt gets SIGUSR1 after CHUNK_S seconds (hpcflow checkpoints and
# exits 3; Open MPI forwards USR1 to the ranks, while SIGTERM to mpirun kills them ~2 s later)
# and is restarted with --resume: the same stop/resume cycle a batch system drives.
# Ctrl-C / SIGTERM to this script stops for good (the checkpoint stays; rerun with --resume).
set -uo pipefail
n="${1:?usage: $0 NRANKS CONFIG.yaml [train|sample|run]}"
config="${2:?usage: $0 NRANKS CONFIG.yaml [train|sample|run]}"
cmd="${3:-run}"
case "$cmd" in
  train|sample|run) ;;
  *) printf '%s: the command must be train, sample or run (got %q)\n' "$0" "$cmd" >&2; exit 2 ;;
esac
case "$n" in
  ''|*[!0-9]*) printf '%s: NRANKS must be a positive integer (got %q)\n' "$0" "$n" >&2; exit 2 ;;
esac
case "${CHUNK_S:-}" in
  *[!0-9]*) printf '%s: CHUNK_S must be a number of seconds (got %q)\n' "$0" "$CHUNK_S" >&2; exit 2 ;;
esac
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
stop=0
trap 'stop=1' TERM INT
resume=()
while :; do
  if [ -n "${CHUNK_S:-}" ]; then
    timeout --signal=USR1 --kill-after=120 "$CHUNK_S" mpirun -n "$n" hpcflow "$cmd" "$config" "${resume[@]}"
  else
    mpirun -n "$n" hpcflow "$cmd" "$config" "${resume[@]}"
  fi
  rc=$?
  if [ "$rc" -eq 3 ] && [ "$stop" -eq 0 ]; then
    resume=(--resume)   # "requeue": run again from the checkpoint
    continue
  fi
  # anything else ends: 0 done, 1 a bug, 2 bad input, 4 the file system (full, quota,
  # read-only, permission denied): not rerun, it would meet the same disk
  exit "$rc"
done
