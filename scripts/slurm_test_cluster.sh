#!/usr/bin/env bash
# A private one-node Slurm cluster on localhost, for the real-scheduler tests.
#
#   scripts/slurm_test_cluster.sh start DIR   install slurm-wlm + munge if missing (root), write
#                                             DIR/slurm.conf, start munged, slurmctld and slurmd,
#                                             wait until the node is idle; prints the line
#                                             SLURM_CONF=DIR/slurm.conf on stdout
#   scripts/slurm_test_cluster.sh stop DIR    stop exactly the daemons started for DIR (by pid file)
#
# Everything (munge key and socket, state, spool, logs, pid files) lives under DIR, the
# ClusterName is unique and the ports are free ephemeral ones, so several test clusters can
# run side by side on one machine and none touches /etc/slurm. Daemons and jobs run as root
# (SlurmUser=root): this is a test fixture, not a production set-up.
# Plugins: select/cons_tres, proctrack/linuxproc, task/none (no cgroups needed in containers).
# SLURM_TEST_TASK_PLUGIN=task/affinity makes slurmd bind each task to its CPUs
# (sched_setaffinity, still no cgroups); SLURM_TEST_CPUS=N advertises N CPUs (default: the
# machine's, at least 4). A binding test needs the real count (SLURM_TEST_CPUS=$(nproc)):
# affinity masks of advertised CPUs the machine lacks cannot be applied.
set -euo pipefail
log() { echo "[slurm_test_cluster] $*" >&2; }
die() { log "error: $*"; exit 1; }

mode="${1:-}"
dir="${2:-}"
[ "$mode" = "start" ] || [ "$mode" = "stop" ] || die "usage: $0 start|stop DIR (got mode '${mode}')"
[ -n "$dir" ] || die "usage: $0 $mode DIR (DIR missing)"

stop_pidfile() {
  local f="$1" pid
  [ -f "$f" ] || return 0
  pid="$(cat "$f" 2>/dev/null || true)"
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$f"
}

if [ "$mode" = "stop" ]; then
  [ -d "$dir" ] || exit 0
  if [ -f "$dir/slurm.conf" ]; then
    # cancel whatever is left so no job step outlives the daemons
    SLURM_CONF="$dir/slurm.conf" scancel --quiet --full --user=root 2>/dev/null || true
  fi
  stop_pidfile "$dir/run/slurmd.pid"
  stop_pidfile "$dir/run/slurmctld.pid"
  stop_pidfile "$dir/run/munged.pid"
  log "stopped the cluster in $dir"
  exit 0
fi

# ---- packages ---------------------------------------------------------------------------
need=()
for b in slurmctld slurmd sbatch munged; do command -v "$b" >/dev/null 2>&1 || need+=("$b"); done
if [ ${#need[@]} -gt 0 ]; then
  [ "$(id -u)" -eq 0 ] || die "missing ${need[*]}; needs root to install: apt-get install slurm-wlm munge"
  log "installing slurm-wlm and munge (missing: ${need[*]})"
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=600 update -qq
  apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
fi
[ "$(id -u)" -eq 0 ] || die "the test cluster runs its daemons as root (SlurmUser=root); run as root"

mkdir -p "$dir"/{run,log,state,spool,munge}
dir="$(cd "$dir" && pwd)"
# one cluster per DIR: starting again over live daemons would rewrite slurm.conf (new ports)
# and the pid files, leaving the old daemons running unstoppable by 'stop'
for f in "$dir"/run/munged.pid "$dir"/run/slurmctld.pid "$dir"/run/slurmd.pid; do
  pid="$(cat "$f" 2>/dev/null || true)"
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    die "a test cluster is already running in $dir (pid $pid from $f); stop it first: $0 stop $dir"
  fi
done
chmod 700 "$dir/munge"

# ---- munge: a private key and socket ----------------------------------------------------
if [ ! -f "$dir/munge/munge.key" ]; then
  dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
  chmod 400 "$dir/munge/munge.key"
fi
munged --force --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.sock" \
  --pid-file="$dir/run/munged.pid" --log-file="$dir/log/munged.log" \
  --seed-file="$dir/munge/munged.seed" 2>>"$dir/log/munged.log" \
  || die "munged did not start: $(tail -n 3 "$dir/log/munged.log" | tr '\n' ' ')"

# ---- slurm.conf -------------------------------------------------------------------------
free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
ctld_port="$(free_port)"
slurmd_port="$(free_port)"
while [ "$slurmd_port" = "$ctld_port" ]; do slurmd_port="$(free_port)"; done
node="$(hostname -s)"
ncpu="$(nproc)"
# Advertise at least 4 CPUs so a 2-task job and a dependent job fit on a 2-core machine;
# config_overrides lets slurmd accept more CPUs than the hardware has.
cpus=$(( ncpu < 4 ? 4 : ncpu ))
case "${SLURM_TEST_CPUS:-}" in
  '') ;;
  *[!0-9]*|0) die "SLURM_TEST_CPUS must be a positive integer (got '${SLURM_TEST_CPUS}')" ;;
  *) cpus="$SLURM_TEST_CPUS" ;;
esac
task_plugin="${SLURM_TEST_TASK_PLUGIN:-task/none}"
case "$task_plugin" in
  task/none|task/affinity) ;;
  *) die "SLURM_TEST_TASK_PLUGIN must be task/none or task/affinity (got '${task_plugin}')" ;;
esac
cluster="hpcflowtest$(date +%s)$$"

cat >"$dir/slurm.conf" <<EOF
# written by scripts/slurm_test_cluster.sh: a private one-node test cluster
ClusterName=${cluster}
SlurmctldHost=${node}(127.0.0.1)
SlurmctldPort=${ctld_port}
SlurmdPort=${slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=${dir}/munge/munge.sock
StateSaveLocation=${dir}/state
SlurmdSpoolDir=${dir}/spool
SlurmctldPidFile=${dir}/run/slurmctld.pid
SlurmdPidFile=${dir}/run/slurmd.pid
SlurmctldLogFile=${dir}/log/slurmctld.log
SlurmdLogFile=${dir}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=${task_plugin}
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SlurmdParameters=config_overrides
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=5
MinJobAge=600
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=${dir}/log/jobcomp.log
JobAcctGatherType=jobacct_gather/none
NodeName=${node} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=${node} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
export SLURM_CONF="$dir/slurm.conf"

slurmctld -f "$SLURM_CONF" 2>>"$dir/log/slurmctld.stderr" \
  || die "slurmctld did not start: $(tail -n 3 "$dir/log/slurmctld.log" 2>/dev/null | tr '\n' ' ')"
slurmd -f "$SLURM_CONF" -N "$node" 2>>"$dir/log/slurmd.stderr" \
  || die "slurmd did not start: $(tail -n 3 "$dir/log/slurmd.log" 2>/dev/null | tr '\n' ' ')"

# wait for the scheduler to report the node idle; the bound is only a safety net (a loaded,
# fresh machine can take long to start the daemons), a daemon that died fails at once
state=""
for _ in $(seq 600); do
  state="$(sinfo -h -n "$node" -o %T 2>/dev/null | head -n 1 || true)"
  case "$state" in idle*) break ;; esac
  for f in slurmctld slurmd; do
    pid="$(cat "$dir/run/$f.pid" 2>/dev/null || true)"
    if [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null; then
      die "$f (pid $pid) exited while the node came up: $(tail -n 3 "$dir/log/$f.log" 2>/dev/null | tr '\n' ' ')"
    fi
  done
  sleep 0.5
done
case "$state" in
  idle*) ;;
  *) die "node ${node} not idle after 300 s (state '${state}'); slurmctld: $(tail -n 3 "$dir/log/slurmctld.log" 2>/dev/null | tr '\n' ' ') slurmd: $(tail -n 3 "$dir/log/slurmd.log" 2>/dev/null | tr '\n' ' ')" ;;
esac
log "cluster ${cluster} up: node ${node} idle, ctld port ${ctld_port}"
echo "SLURM_CONF=$SLURM_CONF"
