#!/bin/bash
# hpcflow under PBS Pro / OpenPBS.   qsub -v CONFIG=run.yaml,CMD=run jobs/pbs.sh
# PBS has no "signal before the limit": 'timeout' sends SIGUSR1 to mpirun MARGIN seconds
# before the walltime (Open MPI's mpirun forwards USR1/USR2 to the ranks; SIGTERM would kill
# them ~2 s later); hpcflow checkpoints and exits 3,
# and the job resubmits itself with RESUME=1 (qrerun would restart it without --resume).
#PBS -N hpcflow
#PBS -l select=2:ncpus=32:mpiprocs=32
#PBS -l walltime=04:00:00
#PBS -j oe
#PBS -r y
set -uo pipefail
cd "${PBS_O_WORKDIR:-.}"
config="${CONFIG:?qsub -v CONFIG=FILE.yaml}"
cmd="${CMD:-run}"
walltime_s="${WALLTIME_S:-14400}"   # keep equal to walltime above
margin_s="${MARGIN_S:-300}"
case "$cmd" in
  train|sample|run) ;;
  *) printf '%s: the command must be train, sample or run (got %q)\n' "$0" "$cmd" >&2; exit 2 ;;
esac
# plain digits only: bash arithmetic would evaluate anything else as an expression (and run
# the command substitutions in it)
for v in walltime_s margin_s; do
  case "${!v}" in
    ''|*[!0-9]*) printf '%s: %s must be a number of seconds (got %q)\n' "$0" "${v^^}" "${!v}" >&2; exit 2 ;;
  esac
done
[ "$walltime_s" -gt "$margin_s" ] || { echo "$0: WALLTIME_S must be larger than MARGIN_S" >&2; exit 2; }
case "$config" in
  *,*) printf '%s: CONFIG must not contain a comma (qsub -v cannot pass it on resubmission): %q\n' "$0" "$config" >&2; exit 2 ;;
esac
export OMP_NUM_THREADS=1
resume=()
[ "${RESUME:-0}" = 1 ] && resume=(--resume)
timeout --signal=USR1 --kill-after=120 "$((walltime_s - margin_s))" \
  mpirun hpcflow "$cmd" "$config" "${resume[@]}"
rc=$?
if [ "$rc" -eq 3 ]; then
  qsub -v "CONFIG=$config,CMD=$cmd,RESUME=1,WALLTIME_S=$walltime_s,MARGIN_S=$margin_s" "$0" && exit 0
fi
# any other status ends the job: 0 done; 1 a bug, 2 bad input, 4 the file system (full,
# quota, read-only, permission denied) fail it, never requeued: a rerun would meet the same
# disk (free space, then resubmit with --resume)
exit "$rc"
