#!/usr/bin/env bash
# Stop the single-node SLURM cluster started by start.sh (by the pids it recorded) and cancel its jobs.
# Its state stays in $BLENDEXP_SLURM_DIR for inspection; start.sh starts afresh from the same folder.
set -uo pipefail
DIR=${BLENDEXP_SLURM_DIR:-/tmp/blendexp-slurm}
export SLURM_CONF=$DIR/slurm.conf
[ -f "$SLURM_CONF" ] && timeout 10 scancel --full --user="$(id -un)" 2>/dev/null
for daemon in slurmd slurmctld munged; do
  pidfile=$DIR/$daemon.pid
  pid=$(cat "$pidfile" 2>/dev/null || true)
  # a stale pid file (e.g. after a reboot) may name another process by now: only stop our daemon
  if [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$daemon" ]; then
    kill "$pid"
    for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
  fi
  rm -f "$pidfile"
done
echo "slurm: stopped"
