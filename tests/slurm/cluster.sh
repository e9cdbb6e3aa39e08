#!/usr/bin/env bash
# A real Slurm cluster on this machine, for tests: munged, slurmctld and one or two slurmd, all with
# their config, state, sockets, logs and pid files under one directory; nothing in /etc is changed
# (the munge key Debian's package made is used). Needs root and Debian's slurmctld slurmd
# slurm-client munge packages (`install` adds them with apt-get).
#
#   tests/slurm/cluster.sh install
#   tests/slurm/cluster.sh start DIR     # then: export SLURM_CONF=DIR/slurm.conf; sbatch ...
#   tests/slurm/cluster.sh start2 DIR    # two nodes, each slurmd in its own network namespace
#   tests/slurm/cluster.sh stop DIR      # stops exactly the daemons start started, by pid
#
# Two nodes on one machine: each slurmd runs in a network namespace of its own (dgan-n1, dgan-n2)
# with one interface, gan0, at 10.213.0.1 or .2 on a bridge (dgan-br, 10.213.0.254) that slurmctld
# listens on. A job's processes inherit their node's namespace, so the two nodes of a job really
# talk over the network (GLOO_SOCKET_IFNAME=gan0), as on a cluster; they share the file system, as
# a cluster shares its checkpoint and data storage.
set -euo pipefail

install() {
    # iproute2 (ip) for the two-node cluster's network namespaces; nsenter is in util-linux
    command -v slurmctld >/dev/null && command -v munged >/dev/null && command -v ip >/dev/null && return 0
    export DEBIAN_FRONTEND=noninteractive
    local packages="slurmctld slurmd slurm-client munge iproute2"
    apt-get install -y -q $packages >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null && apt-get install -y -q $packages >/dev/null; }
}

start() {
    local dir=$1 nodes=${2:-1} host cpus mem port munge ctl_host node_lines
    mkdir -p "$dir"/{state,spool}
    [ "$nodes" = 1 ] && mkdir -p "$dir/spool/$(hostname -s)"
    dir=$(cd "$dir" && pwd)
    # munged runs as the munge user, who must reach its folder: not under a private (0700) test dir
    munge=$(mktemp -d /tmp/dist_gan_munge.XXXXXX)
    echo "$munge" > "$dir/munge.path"
    host=$(hostname -s); cpus=$(nproc)
    mem=$(( $(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo) * 9 / 10 ))
    port=${SLURM_TEST_PORT:-$(free_port_pair)}
    [ -s /etc/munge/munge.key ] || { dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null;
                                    chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key; }
    chown munge:munge "$munge"; chmod 755 "$munge"
    runuser -u munge -- /usr/sbin/munged --socket="$munge/munge.socket" \
        --pid-file="$munge/munged.pid" --log-file="$munge/munged.log" \
        --seed-file="$munge/munged.seed" --force
    if [ "$nodes" = 1 ]; then
        ctl_host=$host
        node_lines="NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=test Nodes=$host Default=YES MaxTime=INFINITE State=UP"
    else
        make_network "$dir"
        ctl_host="$host($BRIDGE_ADDR)"
        mkdir -p "$dir"/spool/dgnode{1,2}
        # Both nodes report the machine's cores (slurmd refuses fewer than it finds); memory is split.
        node_lines="NodeName=dgnode1 NodeAddr=${NET_PREFIX}.1 CPUs=$cpus RealMemory=$(( mem / 2 )) State=UNKNOWN
NodeName=dgnode2 NodeAddr=${NET_PREFIX}.2 CPUs=$cpus RealMemory=$(( mem / 2 )) State=UNKNOWN
PartitionName=test Nodes=dgnode[1-2] Default=YES MaxTime=INFINITE State=UP"
    fi
    cat > "$dir/slurm.conf" <<CONF
ClusterName=disttest
SlurmctldHost=$ctl_host
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
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd-%n.log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
KillWait=60
# keep finished jobs' records for the tests' scontrol show job, however slow the machine
MinJobAge=3600
$node_lines
CONF
    export SLURM_CONF=$dir/slurm.conf
    slurmctld -f "$SLURM_CONF"
    if [ "$nodes" = 1 ]; then
        slurmd -f "$SLURM_CONF"
    else
        # nsenter enters only the network namespace; `ip netns exec` would also remount /sys,
        # hiding the cgroup file system slurmd needs.
        nsenter --net=/run/netns/dgan-n1 slurmd -f "$SLURM_CONF" -N dgnode1
        nsenter --net=/run/netns/dgan-n2 slurmd -f "$SLURM_CONF" -N dgnode2
    fi
    for _ in $(seq 60); do
        [ "$(sinfo -h -N -o %t 2>/dev/null | grep -cx idle)" = "$nodes" ] \
            && { echo "slurm up ($nodes node(s)): SLURM_CONF=$SLURM_CONF"; return 0; }
        sleep 0.5
    done
    echo "slurm did not come up; logs in $dir" >&2
    tail -5 "$dir"/slurmctld.log "$dir"/slurmd-*.log >&2 || true
    return 1
}

start2() { start "$1" 2; }

free_port_pair() {
    # two consecutive ports (slurmctld's, slurmd's) that nothing listens on: a client that reaches
    # another program on the controller's port fails with "Insane message length"
    local port
    for _ in $(seq 50); do
        port=$(( 16817 + RANDOM % 2000 ))
        if ! ss -Htan "( sport = :$port or sport = :$((port + 1)) )" 2>/dev/null | grep -q .; then
            echo "$port"; return 0
        fi
    done
    echo "$port"
}

NET_PREFIX=10.213.0
BRIDGE_ADDR=$NET_PREFIX.254

make_network() {
    # A bridge in this namespace and, per node, a namespace joined to it by a veth pair. Exits with
    # status 3 when this machine does not allow it (no CAP_NET_ADMIN, no bridge or veth support).
    local dir=$1 i tool
    for tool in ip nsenter; do
        command -v "$tool" >/dev/null || { echo "cannot make network namespaces here: no $tool" >&2; exit 3; }
    done
    # what a run that was killed before its teardown left behind (these names are ours)
    ip netns del dgan-n1 2>/dev/null || true; ip netns del dgan-n2 2>/dev/null || true
    # a run killed half-way can leave the host ends of the veth pairs behind
    ip link del dgan-v1 2>/dev/null || true; ip link del dgan-v2 2>/dev/null || true
    ip link del dgan-br 2>/dev/null || true
    if ! ip link add dgan-br type bridge 2>"$dir/network.err" \
            || ! ip netns add dgan-n1 2>>"$dir/network.err"; then
        echo "cannot make network namespaces and a bridge here: $(cat "$dir/network.err")" >&2
        ip link del dgan-br 2>/dev/null || true
        exit 3
    fi
    ip netns del dgan-n1
    echo dgan-br > "$dir/network"
    ip addr add "$BRIDGE_ADDR/24" dev dgan-br
    ip link set dgan-br up
    for i in 1 2; do
        ip netns add "dgan-n$i"
        echo "dgan-n$i" >> "$dir/network"
        ip link add "dgan-v$i" type veth peer name gan0 netns "dgan-n$i"
        ip link set "dgan-v$i" master dgan-br up
        ip netns exec "dgan-n$i" ip addr add "$NET_PREFIX.$i/24" dev gan0
        ip netns exec "dgan-n$i" ip link set gan0 up
        ip netns exec "dgan-n$i" ip link set lo up
    done
}

remove_network() {
    # Deleting a namespace deletes its veth end, and with it the pair.
    local dir=$1 name
    [ -f "$dir/network" ] || return 0
    while read -r name; do
        case $name in
            dgan-br) ip link del dgan-br 2>/dev/null || true ;;
            *) ip netns del "$name" 2>/dev/null || true ;;
        esac
    done < "$dir/network"
    rm -f "$dir/network"
}

stop() {
    local dir=$1 pidfile pid munge
    munge=$(cat "$dir/munge.path" 2>/dev/null || echo /nonexistent)
    for pidfile in "$dir"/slurmd-*.pid "$dir/slurmctld.pid" "$munge/munged.pid"; do
        [ -s "$pidfile" ] || continue
        pid=$(cat "$pidfile")
        kill "$pid" 2>/dev/null || continue
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill -9 "$pid" 2>/dev/null || true
    done
    [ -d "$munge" ] && rm -rf "$munge"
    remove_network "$dir"
    return 0
}

"$@"
