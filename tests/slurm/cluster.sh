#!/usr/bin/env bash
# A real one-node Slurm cluster on this machine, for tests: munged, slurmctld and slurmd, all with
# their config, state, sockets, logs and pid files under one directory; nothing in /etc is changed
# (the munge key Debian's package made is used). Needs root and Debian's slurmctld slurmd
# slurm-client munge packages (`install` adds them with apt-get).
#
#   tests/slurm/cluster.sh install
#   tests/slurm/cluster.sh start DIR     # then: export SLURM_CONF=DIR/slurm.conf; sbatch ...
#   tests/slurm/cluster.sh stop DIR      # stops exactly the daemons start started, by pid
set -euo pipefail

install() {
    command -v slurmctld >/dev/null && command -v munged >/dev/null && return 0
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q slurmctld slurmd slurm-client munge >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null && apt-get install -y -q slurmctld slurmd slurm-client munge >/dev/null; }
}

start() {
    local dir=$1 host cpus mem port munge
    mkdir -p "$dir"/{state,spool}
    dir=$(cd "$dir" && pwd)
    # munged runs as the munge user, who must reach its folder: not under a private (0700) test dir
    munge=$(mktemp -d /tmp/dist_gan_munge.XXXXXX)
    echo "$munge" > "$dir/munge.path"
    host=$(hostname -s); cpus=$(nproc)
    mem=$(( $(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo) * 9 / 10 ))
    port=${SLURM_TEST_PORT:-$(( 16817 + RANDOM % 2000 ))}
    [ -s /etc/munge/munge.key ] || { dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null;
                                    chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key; }
    chown munge:munge "$munge"; chmod 755 "$munge"
    runuser -u munge -- /usr/sbin/munged --socket="$munge/munge.socket" \
        --pid-file="$munge/munged.pid" --log-file="$munge/munged.log" \
        --seed-file="$munge/munged.seed" --force
    cat > "$dir/slurm.conf" <<CONF
ClusterName=disttest
SlurmctldHost=$host
SlurmctldPort=$port
SlurmdPort=$((port + 1))
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$munge/munge.socket
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
KillWait=60
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=test Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
    export SLURM_CONF=$dir/slurm.conf
    slurmctld -f "$SLURM_CONF"
    slurmd -f "$SLURM_CONF"
    for _ in $(seq 60); do
        sinfo -h -o %t 2>/dev/null | grep -qx idle && { echo "slurm up: SLURM_CONF=$SLURM_CONF"; return 0; }
        sleep 0.5
    done
    echo "slurm did not come up; logs in $dir" >&2
    tail -5 "$dir"/slurmctld.log "$dir"/slurmd.log >&2 || true
    return 1
}

stop() {
    local dir=$1 pidfile pid munge
    munge=$(cat "$dir/munge.path" 2>/dev/null || echo /nonexistent)
    for pidfile in "$dir/slurmd.pid" "$dir/slurmctld.pid" "$munge/munged.pid"; do
        [ -s "$pidfile" ] || continue
        pid=$(cat "$pidfile")
        kill "$pid" 2>/dev/null || continue
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill -9 "$pid" 2>/dev/null || true
    done
    [ -d "$munge" ] && rm -rf "$munge"
    return 0
}

"$@"
