#!/usr/bin/env bash
# A real single-node Slurm cluster on this machine (root only), for the Slurm test and for
# trying `dynrobust slurm` locally. Facts from ../shared/spec/slurm-local.md.
#   scripts/slurm-local.sh start   # installs slurm-wlm + munge if missing, writes the config, starts the daemons
#   scripts/slurm-local.sh stop
set -euo pipefail
cmd="${1:-start}"
[ "$(id -u)" = 0 ] || { echo "slurm-local: needs root" >&2; exit 2; }

stop() {
  for f in /run/slurmd.pid /run/slurmctld.pid /run/munge/munged.pid; do
    if [ -f "$f" ]; then kill "$(cat "$f")" 2>/dev/null || true; rm -f "$f"; fi
  done
}

install() {
  if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null; then
    echo "slurm-local: installing slurm-wlm, munge" >&2
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm slurmctld slurmd slurm-client munge >/dev/null
  fi
}

configure() {
  local host node
  host="$(hostname -s)"
  node="$(slurmd -C | head -1 | sed -E 's/^NodeName=[^ ]+ //; s/ UpTime=.*//')"
  mkdir -p /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /etc/slurm
  chown slurm:slurm /var/spool/slurmctld /var/log/slurm
  cat > /etc/slurm/slurm.conf <<CONF
ClusterName=local
SlurmctldHost=${host}(127.0.0.1)
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MinJobAge=300
NodeName=${host} ${node} NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=${host} Default=YES MaxTime=INFINITE State=UP
CONF
}

# The daemons outlive this script: give them none of the caller's open files beyond stdio (a
# caller's lock file, e.g. `flock LOCK make test`, would otherwise stay locked by munged).
close_inherited_fds() {
  local fd
  for fd in /proc/$$/fd/*; do
    fd="${fd##*/}"
    [ "$fd" -gt 2 ] 2>/dev/null && eval "exec ${fd}>&-" 2>/dev/null || true
  done
}

start() {
  install
  stop
  configure
  close_inherited_fds
  mkdir -p /run/munge && chown munge:munge /run/munge
  runuser -u munge -- /usr/sbin/munged
  munge -n | unmunge >/dev/null
  slurmctld
  slurmd
  for _ in $(seq 1 60); do
    state="$(sinfo -h -o %t 2>/dev/null | head -1 || true)"
    case "$state" in
      idle*|mix*|alloc*) echo "slurm-local: node $state" >&2; return 0 ;;
      down*|drain*) scontrol update NodeName="$(hostname -s)" State=RESUME 2>/dev/null || true ;;
    esac
    sleep 0.5
  done
  echo "slurm-local: node did not become idle (state: ${state:-none}); see /var/log/slurm/" >&2
  return 1
}

case "$cmd" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
