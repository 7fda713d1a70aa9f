#!/bin/bash
# hpcflow on GPU nodes: one MPI rank per GPU (each rank sees its GPU as cuda:0).
#   sbatch jobs/slurm_gpu.sh CONFIG.yaml [train|sample|run]
#SBATCH --job-name=hpcflow-gpu
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-task=1
#SBATCH --cpus-per-task=8
#SBATCH --time=12:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --signal=TERM@600
#SBATCH --output=hpcflow.%j.out
# Site settings: most centres require an account (project); set them here or on the command
# line (sbatch -A PROJECT -p PARTITION --qos=QOS ...), which overrides these lines.
##SBATCH --account=PROJECT
##SBATCH --partition=PARTITION
##SBATCH --qos=QOS
set -uo pipefail
config="${1:?usage: sbatch $0 CONFIG.yaml [train|sample|run]}"
cmd="${2:-run}"
case "$cmd" in
  train|sample|run) ;;
  *) printf '%s: the command must be train, sample or run (got %q)\n' "$0" "$cmd" >&2; exit 2 ;;
esac
# CPUs and threads (Slurm >= 22.05: srun no longer inherits --cpus-per-task from sbatch, so
# without this every rank and its OpenMP threads would share one CPU): each task gets
# cpus-per-task cores (--cpu-bind=cores), one OpenMP thread per core, pinned inside them.
cpt="${SLURM_CPUS_PER_TASK:-1}"
case "$cpt" in
  ''|*[!0-9]*) printf '%s: SLURM_CPUS_PER_TASK must be a number (got %q)\n' "$0" "$cpt" >&2; exit 2 ;;
esac
export SRUN_CPUS_PER_TASK="$cpt"
export OMP_NUM_THREADS="$cpt" OMP_PLACES=cores OMP_PROC_BIND=close
resume=()
[ "${SLURM_RESTART_COUNT:-0}" -gt 0 ] && resume=(--resume)
srun --mpi=pmix --cpus-per-task="$cpt" --cpu-bind=cores --gpu-bind=single:1 hpcflow "$cmd" "$config" --set device=cuda "${resume[@]}"
rc=$?
if [ "$rc" -eq 3 ]; then
  scontrol requeue "$SLURM_JOB_ID" && exit 0
fi
# any other status ends the job: 0 done; 1 a bug, 2 bad input, 4 the file system (full,
# quota, read-only, permission denied) fail it, never requeued: a rerun would meet the same
# disk (free space, then resubmit with --resume)
exit "$rc"
