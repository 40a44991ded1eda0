#!/usr/bin/env bash
# Start a real two-node SLURM cluster on this one Debian machine, as root, without systemd.
#
#   sudo docker/slurm/local-cluster.sh          # install (first time), configure, start; idempotent
#   sudo docker/slurm/local-cluster.sh stop     # stop both slurmd, slurmctld and munged
#
# It is what `pytest -m slurm` (tests/e2e/test_slurm.py) and the CI's slurm step run against: two nodes
# dpnode0 and dpnode1, each a `slurmd -N <node>` on this host with NodeAddr=127.0.0.1 and its own Port
# (6831, 6832), its own spool dir, pid file and log (`%n` in slurm.conf); the names resolve to 127.0.0.1
# through /etc/hosts, so everything stays on loopback. Each node declares all $(nproc) CPUs (the two
# share them: jobs oversubscribe the machine). One partition `debug` (the default) holds both, so
# `sbatch --nodes=1 ...` runs on one of them and `srun -N2 -n2 printenv SLURM_NODEID` answers 0 and 1.
# Munge authentication, no cgroups (ProctrackType=proctrack/linuxproc, TaskPlugin=task/none), no
# accounting database. Jobs may be requeued (JobRequeue=1), which is what Lightning's
# SLURMEnvironment(auto_requeue=True) does on SIGUSR1. Logs: /var/log/slurm/slurmctld.log and
# /var/log/slurm/slurmd-<node>.log.
#
# A slurmd of the former one-node cluster (/run/slurmd.pid, node $(hostname -s)) is stopped when this
# configuration replaces it.
set -euo pipefail

if [ "$(id -u)" != 0 ]; then
  echo "local-cluster.sh must run as root (it installs packages and starts daemons)" >&2
  exit 1
fi

NODES=(dpnode0 dpnode1)
PORTS=(6831 6832)

# the daemon of a pid file is alive (and is a slurm or munge daemon: a stale pid file may name a reused pid)
running() {
  [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null \
    && case "$(cat "/proc/$(cat "$1")/comm" 2>/dev/null)" in slurm*|munged) true ;; *) false ;; esac
}
# stop the daemons of these pid files and wait (up to 30 s) until they have exited
stop_pids() {
  local pidfile pids=()
  for pidfile in "$@"; do
    if running "$pidfile"; then
      pids+=("$(cat "$pidfile")")
      kill "${pids[-1]}"
    fi
  done
  for _ in $(seq 300); do
    local alive=0 pid
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && return 0
    sleep 0.1
  done
  echo "daemons ${pids[*]} did not exit within 30 s" >&2
  return 1
}
# every slurmd: the former single node's (/run/slurmd.pid) and one per node (/run/slurmd-<node>.pid)
slurmd_pidfiles() { ls /run/slurmd.pid /run/slurmd-*.pid 2>/dev/null || true; }

if [ "${1:-}" = stop ]; then
  # shellcheck disable=SC2046
  stop_pids $(slurmd_pidfiles) /run/slurmctld.pid
  stop_pids /run/munge/munged.pid
  exit 0
fi
# --- packages -------------------------------------------------------------------------------------
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
   || ! command -v munged >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
fi

HOST=$(hostname -s)
CPUS=$(nproc)
MEM_MB=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 512 ))
CONF_DIR=/etc/slurm
mkdir -p "$CONF_DIR" /var/spool/slurmctld /var/log/slurm /run/munge /var/lib/munge /var/log/munge /etc/munge
for node in "${NODES[@]}"; do mkdir -p "/var/spool/slurmd/$node"; done

# --- node names resolve to loopback (srun, and Lightning's MASTER_ADDR = the first node's name) -----
for node in "${NODES[@]}"; do
  if [ "$(getent ahostsv4 "$node" 2>/dev/null | awk 'NR == 1 {print $1}')" != 127.0.0.1 ]; then
    if getent hosts "$node" >/dev/null; then
      echo "$node resolves to $(getent hosts "$node" | awk '{print $1}'), not 127.0.0.1: fix /etc/hosts" >&2
      exit 1
    fi
    echo "127.0.0.1 $node  # diffproc docker/slurm/local-cluster.sh" >> /etc/hosts
  fi
done

# --- munge ----------------------------------------------------------------------------------------
if [ ! -s /etc/munge/munge.key ]; then
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
fi
chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge
chmod 700 /etc/munge /var/lib/munge /var/log/munge
chmod 755 /run/munge
chmod 400 /etc/munge/munge.key
if ! { [ -s /run/munge/munged.pid ] && kill -0 "$(cat /run/munge/munged.pid)" 2>/dev/null; }; then
  runuser -u munge -- /usr/sbin/munged
fi
for _ in $(seq 50); do munge -n >/dev/null 2>&1 && break; sleep 0.1; done
munge -n | unmunge >/dev/null

# --- slurm.conf -----------------------------------------------------------------------------------
NEW_CONF=$(cat <<EOF
# written by diffproc docker/slurm/local-cluster.sh
ClusterName=diffproc
SlurmctldHost=${HOST}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
ReturnToService=2
JobRequeue=1
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd/%n
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd-%n.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd-%n.log
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
PropagateResourceLimitsExcept=MEMLOCK
KillWait=10
MinJobAge=600
NodeName=${NODES[0]} NodeHostname=${NODES[0]} NodeAddr=127.0.0.1 Port=${PORTS[0]} CPUs=${CPUS} RealMemory=$((MEM_MB / 2)) State=UNKNOWN
NodeName=${NODES[1]} NodeHostname=${NODES[1]} NodeAddr=127.0.0.1 Port=${PORTS[1]} CPUs=${CPUS} RealMemory=$((MEM_MB / 2)) State=UNKNOWN
PartitionName=debug Nodes=${NODES[0]},${NODES[1]} Default=YES MaxTime=INFINITE State=UP
EOF
)
if [ ! -f "$CONF_DIR/slurm.conf" ] || [ "$(cat "$CONF_DIR/slurm.conf")" != "$NEW_CONF" ]; then
  printf '%s\n' "$NEW_CONF" > "$CONF_DIR/slurm.conf"
  stop_slurm=1
else
  stop_slurm=0
fi

if [ "$stop_slurm" = 1 ]; then
  # shellcheck disable=SC2046
  stop_pids $(slurmd_pidfiles) /run/slurmctld.pid
fi
# a slurmd of the former single-node configuration is not part of this cluster
stop_pids /run/slurmd.pid
rm -f /run/slurmd.pid

# --- daemons (each forks into the background and writes its pid file) -----------------------------
running /run/slurmctld.pid || /usr/sbin/slurmctld
for node in "${NODES[@]}"; do
  running "/run/slurmd-$node.pid" || /usr/sbin/slurmd -N "$node"
done

# --- wait for both nodes to accept jobs -----------------------------------------------------------
for _ in $(seq 60); do
  up=0
  for node in "${NODES[@]}"; do
    state=$(sinfo -h -N -n "$node" -o '%T' 2>/dev/null || true)
    case "$state" in
      idle*|mixed*|allocated*) up=$((up + 1)) ;;
      down*|drain*) scontrol update NodeName="$node" State=RESUME >/dev/null 2>&1 || true ;;
    esac
  done
  if [ "$up" = "${#NODES[@]}" ]; then
    echo "SLURM up: nodes ${NODES[*]} on 127.0.0.1 ports ${PORTS[*]} ($CPUS CPUs each), partition debug"
    exit 0
  fi
  sleep 1
done
echo "SLURM did not come up; see /var/log/slurm/slurmctld.log and /var/log/slurm/slurmd-*.log" >&2
sinfo -N >&2 || true
exit 1
