#!/usr/bin/env bash
# A real single-node SLURM on this machine, for tests/test_slurm.py (needs root; Debian/Ubuntu).
# Installs slurm-wlm and munge if missing, writes a one-node cluster with two fake GPUs
# (character devices on the NVIDIA major number, declared as GRES) and starts munged, slurmctld
# and slurmd. Idempotent. It never touches a slurm.conf it did not write.
set -euo pipefail
MARK="# stagediff test cluster"
CONF=/etc/slurm/slurm.conf

if [ -f "$CONF" ] && ! grep -q "$MARK" "$CONF"; then
  echo "start_slurm.sh: $CONF exists and is not ours; refusing to replace a real cluster's config" >&2
  exit 1
fi
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq slurm-wlm munge >/dev/null
fi

HOST=$(hostname -s)
CPUS=$(nproc)
MEM=$(( $(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo) * 3 / 4 ))
for i in 0 1; do [ -e /dev/nvidia$i ] || mknod /dev/nvidia$i c 195 $i; done
mkdir -p /etc/slurm /var/spool/slurmd /var/spool/slurmctld /var/log/slurm /run/munge /var/log/munge

cat > "$CONF" <<CONF
$MARK
ClusterName=local
SlurmctldHost=$HOST
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SlurmUser=root
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmdSpoolDir=/var/spool/slurmd
StateSaveLocation=/var/spool/slurmctld
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# No slurmdbd: no sacct, so Snakemake polls with --slurm-status-command squeue, and finished
# jobs stay visible to squeue/scontrol for an hour.
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MinJobAge=3600
GresTypes=gpu
DefMemPerCPU=1000
NodeName=$HOST CPUs=$CPUS RealMemory=$MEM Gres=gpu:2 State=UNKNOWN
PartitionName=main Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
CONF
echo "NodeName=$HOST Name=gpu File=/dev/nvidia[0-1]" > /etc/slurm/gres.conf

if [ ! -s /etc/munge/munge.key ]; then
  mkdir -p /etc/munge
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown -R munge: /etc/munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
chmod 400 /etc/munge/munge.key
pgrep -x munged >/dev/null || su -s /bin/sh munge -c /usr/sbin/munged
pgrep -x slurmctld >/dev/null || slurmctld
pgrep -x slurmd >/dev/null || slurmd

for _ in $(seq 60); do
  state=$(sinfo -h -n "$HOST" -o %t 2>/dev/null || true)
  case "$state" in idle*|mix*|alloc*) exit 0 ;; esac
  sleep 1
done
echo "start_slurm.sh: node $HOST did not come up (state: ${state:-none}); see /var/log/slurm/" >&2
exit 1
