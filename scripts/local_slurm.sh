#!/usr/bin/env bash
# A single-node SLURM on this machine, for `make test-slurm` (tests/test_slurm_cluster.py) and for trying
# scripts/slurm.sbatch and hydra/launcher=slurm without a cluster. Debian/Ubuntu, as root:
#
#   bash scripts/local_slurm.sh up       # install slurm-wlm and munge (apt) if missing, configure, start
#   bash scripts/local_slurm.sh status   # the daemons and the partition
#   bash scripts/local_slurm.sh down     # stop the daemons (the packages and the config stay)
#
# One node `localhost` (this machine's CPUs, up to LOCAL_SLURM_CPUS, and 80% of its memory) in one
# partition `cpu`; proctrack/linuxproc and task/none (no cgroups needed, so it runs in containers); no
# accounting; JobRequeue=1 and a short KillWait, so that time limits and requeues happen in seconds. Both
# commands are idempotent: `up` on a running cluster rewrites nothing and restarts nothing unless the
# config changed. State and logs: /var/lib/slurm-local, /var/log/slurm-local.
set -euo pipefail

CONF_DIR=/etc/slurm
CONF="$CONF_DIR/slurm.conf"
STATE=/var/lib/slurm-local
LOGS=/var/log/slurm-local
RUN=/run/slurm-local
CPUS="${LOCAL_SLURM_CPUS:-2}"

die() { echo "local_slurm.sh: $*" >&2; exit 2; }

need_root() {
  if [[ "$(id -u)" != 0 ]]; then die "run as root (it installs packages and starts system daemons)"; fi
}

install_packages() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
     && command -v sbatch >/dev/null; then
    return
  fi
  command -v apt-get >/dev/null || die "slurm-wlm and munge are missing and apt-get is not available: install them"
  apt-get update
  DEBIAN_FRONTEND=noninteractive apt-get install -y slurm-wlm munge
}

write_config() {
  local cpus mem_mb
  cpus="$(nproc)"
  if (( cpus > CPUS )); then cpus=$CPUS; fi
  mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 8 / 10 ))
  mkdir -p "$CONF_DIR" "$STATE/ctld" "$STATE/d" "$LOGS" "$RUN"
  chown -R slurm:slurm "$STATE/ctld" "$LOGS" 2>/dev/null || true
  local new
  new="$(cat <<EOF
# written by scripts/local_slurm.sh (itdiffusion): a single-node test cluster
ClusterName=itdlocal
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobRequeue=1
KillWait=5
MinJobAge=300
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=cpu Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
)"
  if [[ -f "$CONF" ]] && [[ "$(cat "$CONF")" == "$new" ]]; then
    return 1  # unchanged
  fi
  printf '%s\n' "$new" >"$CONF"
  return 0
}

munge_up() {
  if [[ ! -s /etc/munge/munge.key ]]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
  chown munge:munge /etc/munge/munge.key 2>/dev/null || true
  chmod 400 /etc/munge/munge.key
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
  if ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
    rm -f /run/munge/munged.pid
    if id munge >/dev/null 2>&1; then
      su -s /bin/sh munge -c "munged" || munged --force
    else
      munged --force
    fi
    for _ in $(seq 20); do munge -n </dev/null | unmunge >/dev/null 2>&1 && return; sleep 0.5; done
    die "munged did not start (see /var/log/munge/munged.log)"
  fi
}

pid_alive() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

up() {
  need_root
  install_packages
  local changed=0
  if write_config; then changed=1; fi
  munge_up
  if (( changed )); then
    stop_daemons
  fi
  if ! pid_alive "$RUN/slurmctld.pid"; then slurmctld -f "$CONF"; fi
  if ! pid_alive "$RUN/slurmd.pid"; then slurmd -f "$CONF" -N localhost; fi
  for _ in $(seq 60); do
    if sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
      scontrol update nodename=localhost state=resume >/dev/null 2>&1 || true
      status
      return
    fi
    sleep 1
  done
  scontrol update nodename=localhost state=resume >/dev/null 2>&1 || true
  sinfo -h -o %T | grep -qE '^(idle|mixed|allocated)' \
    || die "the node did not come up: see $LOGS/slurmctld.log and $LOGS/slurmd.log"
  status
}

stop_one() {  # stop_one <pid file>: TERM, then wait up to 10 s
  local pidfile="$1"
  if pid_alive "$pidfile"; then
    local pid
    pid="$(cat "$pidfile")"
    kill "$pid"
    for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  fi
  rm -f "$pidfile"
}

stop_daemons() {
  stop_one "$RUN/slurmd.pid"
  stop_one "$RUN/slurmctld.pid"
}

down() {
  need_root
  if command -v scancel >/dev/null && pid_alive "$RUN/slurmctld.pid"; then
    scancel --user="$(id -un)" 2>/dev/null || true
  fi
  stop_daemons
  if [[ -f /run/munge/munged.pid ]] && kill -0 "$(cat /run/munge/munged.pid)" 2>/dev/null; then
    kill "$(cat /run/munge/munged.pid)"
  fi
  echo "local SLURM stopped"
}

status() {
  local s
  for d in slurmctld slurmd; do
    if pid_alive "$RUN/$d.pid"; then s="running (pid $(cat "$RUN/$d.pid"))"; else s="stopped"; fi
    echo "$d: $s"
  done
  if pid_alive "$RUN/slurmctld.pid"; then sinfo; fi
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
