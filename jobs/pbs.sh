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
# Site settings: the project to charge and the queue (or qsub -A PROJECT -q QUEUE ...)
##PBS -A PROJECT
##PBS -q QUEUE
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
# Launcher. Open MPI without PBS/TM support (Debian's, for one) does not see the PBS
# allocation: a plain mpirun would start every rank on the first node. So mpirun gets the
# node file PBS writes (one line per MPI slot: mpiprocs per chunk) and as many ranks as it has
# lines, each bound to its cores. HPCFLOW_PBS_LAUNCHER=mpiexec uses the site's TM-aware mpiexec
# (PBS Pro's, or Open MPI built --with-tm) instead, which reads the allocation itself.
launcher="${HPCFLOW_PBS_LAUNCHER:-mpirun}"
case "$launcher" in
  mpirun|mpiexec) ;;
  *) printf '%s: HPCFLOW_PBS_LAUNCHER must be mpirun or mpiexec (got %q)\n' "$0" "$launcher" >&2; exit 2 ;;
esac
# OpenMP threads per rank: PBS sets OMP_NUM_THREADS from ompthreads= of the select (default 1)
threads="${OMP_NUM_THREADS:-1}"
case "$threads" in
  ''|*[!0-9]*|0) printf '%s: OMP_NUM_THREADS must be a positive integer (got %q)\n' "$0" "$threads" >&2; exit 2 ;;
esac
export OMP_NUM_THREADS="$threads" OMP_PLACES=cores OMP_PROC_BIND=close
if [ "$launcher" = mpirun ]; then
  nodefile="${PBS_NODEFILE:-}"
  [ -n "$nodefile" ] || { echo "$0: PBS_NODEFILE is not set (not inside a PBS job?)" >&2; exit 2; }
  [ -r "$nodefile" ] || { printf '%s: PBS_NODEFILE %q is not readable\n' "$0" "$nodefile" >&2; exit 2; }
  nranks="$(grep -c . "$nodefile")"
  [ "$nranks" -gt 0 ] || { printf '%s: PBS_NODEFILE %q lists no host\n' "$0" "$nodefile" >&2; exit 2; }
  launch=(mpirun --hostfile "$nodefile" -n "$nranks" --map-by "slot:PE=$threads" --bind-to core
          -x OMP_NUM_THREADS -x OMP_PLACES -x OMP_PROC_BIND)
else
  launch=(mpiexec)
fi
resume=()
[ "${RESUME:-0}" = 1 ] && resume=(--resume)
timeout --signal=USR1 --kill-after=120 "$((walltime_s - margin_s))" \
  "${launch[@]}" hpcflow "$cmd" "$config" "${resume[@]}"
rc=$?
if [ "$rc" -eq 3 ]; then
  qsub -v "CONFIG=$config,CMD=$cmd,RESUME=1,WALLTIME_S=$walltime_s,MARGIN_S=$margin_s" "$0" && exit 0
fi
# any other status ends the job: 0 done; 1 a bug, 2 bad input, 4 the file system (full,
# quota, read-only, permission denied) fail it, never requeued: a rerun would meet the same
# disk (free space, then resubmit with --resume)
exit "$rc"
