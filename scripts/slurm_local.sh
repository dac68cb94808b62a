#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, to run `./benchmark.sh --slurm` for real (Debian/Ubuntu, as root).
#
#   scripts/slurm_local.sh          # install slurm-wlm and munge if missing, write slurm.conf, start the daemons
#   scripts/slurm_local.sh --stop   # stop the daemons
#
# The node gets every CPU of this machine, a partition named `local`, requeueing on, and 30 s between the
# SIGTERM of a cancelled or requeued job and its SIGKILL (time enough for a checkpoint). No cgroups and no
# accounting: this cluster is for checking the job-array machinery, not for sharing a machine.
set -euo pipefail

if [[ "${1:-}" == "--stop" ]]; then
    pkill -x slurmd || true
    pkill -x slurmctld || true
    pkill -x munged || true
    exit 0
fi
if [[ $EUID -ne 0 ]]; then
    echo "slurm_local.sh: run as root (it installs packages and starts daemons)" >&2
    exit 2
fi

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge
fi

# munge authenticates every message between the SLURM commands and daemons.
[[ -s /etc/munge/munge.key ]] || mungekey --create --keyfile /etc/munge/munge.key
chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged
munge -n | unmunge >/dev/null

node=$(hostname -s)
memory_mb=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=local
SlurmctldHost=$node
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$((memory_mb / $(nproc)))
ReturnToService=2
JobRequeue=1
KillWait=30
MpiDefault=none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
NodeName=$node CPUs=$(nproc) RealMemory=$memory_mb State=UNKNOWN
PartitionName=local Nodes=$node Default=YES MaxTime=INFINITE State=UP
CONF

if pgrep -x slurmctld >/dev/null; then scontrol reconfigure; else slurmctld; fi
pgrep -x slurmd >/dev/null || slurmd
for _ in $(seq 60); do
    if sinfo --noheader --states=idle,mixed,allocated --format=%n 2>/dev/null | grep -qx "$node"; then
        sinfo
        exit 0
    fi
    sleep 1
done
echo "slurm_local.sh: the node did not come up; see /var/log/slurm/" >&2
exit 1
