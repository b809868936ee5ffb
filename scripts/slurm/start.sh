#!/usr/bin/env bash
# Start a single-node SLURM cluster on this machine for the sweep tests and local sweeps: munged, slurmctld and
# slurmd, all state under $BLENDEXP_SLURM_DIR (default /tmp/blendexp-slurm). Installs slurm-wlm and munge with
# apt-get when they are missing (needs root). Idempotent: a running cluster is left as it is.
# Then: export SLURM_CONF=$BLENDEXP_SLURM_DIR/slurm.conf   (sbatch, squeue, scancel and submitit read it)
# Each task is bound to the CPUs SLURM gave it (task/affinity), as cgroups do on real clusters: a job asking for
# one CPU computes on one core, so array tasks and DDP ranks never share a core.
set -euo pipefail
DIR=${BLENDEXP_SLURM_DIR:-/tmp/blendexp-slurm}
PORT=${BLENDEXP_SLURM_PORT:-6817}          # slurmctld; slurmd listens on PORT+1
export SLURM_CONF=$DIR/slurm.conf

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
  echo "slurm: installing slurm-wlm and munge" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
fi

alive() { [ "$(cat "/proc/$(cat "$DIR/$1.pid" 2>/dev/null)/comm" 2>/dev/null)" = "$1" ]; }
if alive munged && alive slurmctld && alive slurmd && sinfo -h >/dev/null 2>&1; then
  echo "slurm: already running" >&2
  echo "export SLURM_CONF=$SLURM_CONF"
  exit 0
fi
"$(dirname "$0")/stop.sh" >/dev/null 2>&1 || true

mkdir -p "$DIR"/{state,spool,log,munge}
chmod 700 "$DIR/munge"
if [ ! -f "$DIR/munge/munge.key" ]; then
  head -c 1024 /dev/urandom >"$DIR/munge/munge.key"
  chmod 400 "$DIR/munge/munge.key"
fi
munged --force --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.sock" --pid-file="$DIR/munged.pid" \
  --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed"

HOST=$(hostname -s)
CPUS=$(nproc); [ "$CPUS" -ge 2 ] || CPUS=2                       # a 2-job sweep runs both jobs at once
MEM=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
cat >"$SLURM_CONF" <<CONF
ClusterName=blendexp
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.sock
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
KillWait=10
MinJobAge=600
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF

slurmctld -c -f "$SLURM_CONF"   # -c: no jobs recovered from an earlier cluster in this folder
slurmd -f "$SLURM_CONF" -N "$HOST"
for _ in $(seq 60); do
  if sinfo -h -o %t 2>/dev/null | grep -qE '^(idle|mix|alloc)'; then
    echo "slurm: started ($DIR)" >&2
    echo "export SLURM_CONF=$SLURM_CONF"
    exit 0
  fi
  sleep 1
done
echo "slurm: the node did not become idle within 60 s; logs in $DIR/log" >&2
sinfo -N -l >&2 || true
exit 1
