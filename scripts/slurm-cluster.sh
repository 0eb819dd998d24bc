#!/usr/bin/env bash
# A single-node Slurm cluster on this machine, for tests/integration/test_slurm.py and for trying
# `iwae sweep --executor slurm` by hand (docs/cluster.md). Debian's slurm-wlm and munge, as root; no accounting
# database (no slurmdbd: sacct fails, as on many small clusters); no cgroups (it works in a container).
#
#   scripts/slurm-cluster.sh install      apt-get install slurm-wlm and munge, if missing (root only)
#   scripts/slurm-cluster.sh start [DIR]  write DIR/slurm.conf, start munged, slurmctld and slurmd in the background,
#                                         wait until the node takes jobs; prints the line `export SLURM_CONF=...`
#   scripts/slurm-cluster.sh status [DIR] the daemons, `sinfo` and the jobs of the last hour; exit 1 if it is down
#   scripts/slurm-cluster.sh stop [DIR]   list the jobs of the last hour, then stop the daemons that `start` started
#                                         (by their recorded process ids)
#
# DIR (default $IWAE_SLURM_DIR, else ${TMPDIR:-/tmp}/iwae-slurm) holds everything: the configuration, munge's key
# and socket, the daemons' state, spool, logs and process ids. Clients (sbatch, squeue, the tests) find the
# cluster through SLURM_CONF=DIR/slurm.conf. The ports are 6817 (slurmctld) and 6818 (slurmd) unless
# IWAE_SLURM_PORT (slurmctld's; slurmd takes the next one) says otherwise.
set -euo pipefail

COMMAND="${1:-}"
DIR="${2:-${IWAE_SLURM_DIR:-${TMPDIR:-/tmp}/iwae-slurm}}"
PORT="${IWAE_SLURM_PORT:-6817}"
DAEMONS=(slurmd slurmctld munged)  # stopped in this order (started in the reverse one)

say() { echo "slurm-cluster: $*" >&2; }
die() { say "$*"; exit 1; }

running() {  # running NAME: whether DIR/NAME.pid names a live process of that program
    local pid
    pid="$(cat "$DIR/$1.pid" 2>/dev/null)" || return 1
    [[ "$pid" =~ ^[0-9]+$ ]] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$1" ]
}

cmd_install() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null; then
        return 0
    fi
    [ "$(id -u)" = 0 ] || die "installing Slurm needs root (apt-get); run as root or install slurm-wlm and munge"
    command -v apt-get >/dev/null || die "no apt-get here: install Slurm (slurmctld, slurmd, sbatch) and munge"
    say "apt-get install slurm-wlm munge"
    export DEBIAN_FRONTEND=noninteractive
    local log
    log="$(mktemp)"
    # The package lists may be missing or stale on a fresh machine: update them once if the install fails.
    if ! apt-get install -y -qq --no-install-recommends slurm-wlm munge >"$log" 2>&1; then
        apt-get update -qq >>"$log" 2>&1 || true
        apt-get install -y -qq --no-install-recommends slurm-wlm munge >>"$log" 2>&1 \
            || { tail -20 "$log" >&2; die "apt-get install slurm-wlm munge failed (log: $log)"; }
    fi
    rm -f "$log"
}

write_config() {
    local node
    # The node as slurmd sees this machine (its name, CPUs, sockets, cores, threads and memory).
    node="$(slurmd -C | head -1)"
    [[ "$node" == NodeName=* ]] || die "slurmd -C did not describe this machine: $node"
    cat >"$DIR/slurm.conf" <<EOF
# Written by scripts/slurm-cluster.sh: one node, no accounting, no cgroups.
ClusterName=iwae-test
SlurmctldHost=$(hostname -s)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$DIR/munge/munge.socket
CredType=cred/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.daemon.pid
SlurmdPidFile=$DIR/slurmd.daemon.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
# Ended jobs stay listed by squeue for an hour: 'status' and 'stop' show what the cluster ran (no sacct here).
MinJobAge=3600
SlurmctldTimeout=30
SlurmdTimeout=30
$node State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=1-00:00:00 State=UP
EOF
}

start_daemon() {  # start_daemon NAME COMMAND...: in the background, its own session, its id in DIR/NAME.pid
    local name="$1"
    shift
    setsid "$@" >"$DIR/log/$name.out" 2>&1 </dev/null &
    echo $! >"$DIR/$name.pid"
}

wait_for() {  # wait_for SECONDS WHAT COMMAND...: until COMMAND succeeds
    local seconds="$1" what="$2"
    shift 2
    for _ in $(seq $((seconds * 2))); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.5
    done
    die "$what did not come up in ${seconds}s; logs in $DIR/log"
}

cmd_start() {
    for tool in slurmctld slurmd munged sinfo srun; do
        command -v "$tool" >/dev/null || die "no $tool here: run '$0 install' (as root) first"
    done
    [ "$(id -u)" = 0 ] || die "the daemons run as root here; run '$0 start' as root"
    for name in "${DAEMONS[@]}"; do
        running "$name" && die "$name already runs for $DIR; '$0 stop $DIR' first"
    done
    mkdir -p "$DIR"/{state,spool,log,munge}
    chmod 755 "$DIR/munge"  # the socket is for every user of this machine; the key, for root alone
    # munge's own key for this cluster (1024 random bytes), readable by root alone.
    [ -s "$DIR/munge/munge.key" ] || (umask 077 && head -c 1024 /dev/urandom >"$DIR/munge/munge.key")
    chmod 400 "$DIR/munge/munge.key"
    write_config
    export SLURM_CONF="$DIR/slurm.conf"
    start_daemon munged munged --foreground --force --key-file="$DIR/munge/munge.key" \
        --socket="$DIR/munge/munge.socket" --pid-file="$DIR/munge/munged.pid" \
        --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed"
    wait_for 10 munged test -S "$DIR/munge/munge.socket"
    # -i: go on where the saved state of an earlier start in this DIR cannot be read.
    start_daemon slurmctld slurmctld -D -i
    wait_for 30 slurmctld scontrol ping
    start_daemon slurmd slurmd -D -N "$(hostname -s)"
    wait_for 30 "the node" bash -c '[ "$(sinfo -h -o %t)" = idle ]'
    srun --time=1 true || die "srun true failed on the new cluster; logs in $DIR/log"
    say "up: $(sinfo -h -o '%P %D node %N %t, %c CPUs')"
    echo "export SLURM_CONF=$DIR/slurm.conf"
}

jobs_table() {  # the jobs the cluster knows (queued, running, and ended in the last hour)
    [ -f "$DIR/slurm.conf" ] && running slurmctld || return 0
    SLURM_CONF="$DIR/slurm.conf" squeue --states=all --array --sort=i \
        --format='%.12i %.12j %.10T %.10M %.20S %.20e %R' 2>&1 || true
}

cmd_status() {
    local up=0
    for name in "${DAEMONS[@]}"; do
        if running "$name"; then
            echo "$name: running ($(cat "$DIR/$name.pid"))"
        else
            echo "$name: not running"
            up=1
        fi
    done
    if [ "$up" = 0 ]; then
        SLURM_CONF="$DIR/slurm.conf" sinfo 2>&1 || up=1
    fi
    jobs_table
    return "$up"
}

cmd_stop() {
    local name pid
    if running slurmctld; then
        say "the jobs it ran:"
        jobs_table >&2
    fi
    for name in "${DAEMONS[@]}"; do
        running "$name" || { rm -f "$DIR/$name.pid"; continue; }
        pid="$(cat "$DIR/$name.pid")"
        kill -TERM "$pid"
        for _ in $(seq 40); do
            running "$name" || break
            sleep 0.25
        done
        running "$name" && kill -KILL "$pid"
        rm -f "$DIR/$name.pid"
        say "stopped $name ($pid)"
    done
}

case "$COMMAND" in
    install) cmd_install ;;
    start) cmd_start ;;
    status) cmd_status ;;
    stop) cmd_stop ;;
    *) die "usage: $0 install | start [DIR] | status [DIR] | stop [DIR]" ;;
esac
