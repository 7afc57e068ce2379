#!/usr/bin/env bash
# A throwaway Ceph S3 gateway (radosgw) on 127.0.0.1, for mr's s3:// tests
# and for trying s3:// locally:
#
#   eval "$(tests/s3/radosgw.sh start DIR)"    # prints export lines (also in DIR/env)
#   ...                                        # AWS_ENDPOINT_URL=http://127.0.0.1:PORT etc.
#   tests/s3/radosgw.sh stop DIR               # then delete DIR yourself
#
# start makes sure Debian's radosgw, ceph-mon and ceph-osd are installed
# (apt-get, as root or through sudo), then runs a one-monitor, one-OSD
# cluster and radosgw whose every file (config, data, sockets, pid files,
# logs) is under DIR, so several instances can run side by side. The OSD
# keeps objects in memory (memstore): nothing survives a stop. Debian 12's
# Ceph 16 has no standalone backend (dbstore) for radosgw, hence the cluster.
# An S3 user with a fixed access key and secret is made; clients must use
# path-style requests (http://127.0.0.1:PORT/BUCKET/KEY). start on a DIR that
# is already running prints its env and exits 0.
#
# Settings (environment):
#   MR_S3_PORT           radosgw's port (default: a free one)
#   MR_S3_MEMSTORE_MIB   the OSD's size in MiB (2048); memstore does not enforce
#                        it: the OSD's memory grows by ~2x what is stored
#   MR_S3_ACCESS_KEY     the user's access key (MRTESTACCESSKEY00000)
#   MR_S3_SECRET_KEY     the user's secret (mrtestsecretkey...)
#   MR_S3_TIMEOUT        seconds start waits for each step (60)
#   MR_S3_STOP_TIMEOUT   seconds stop waits for a daemon before SIGKILL (15)
# Progress goes to stderr, the export lines alone to stdout.
# Exit status 77: Ceph cannot be installed on this machine; 2: usage.
set -euo pipefail

packages="radosgw ceph-mon ceph-osd"
tools="ceph ceph-mon ceph-osd monmaptool radosgw radosgw-admin"
rgw_name=client.rgw.mr   # radosgw's name in the config
osd_id=0                 # the first OSD of a new cluster is always osd.0
access_key=${MR_S3_ACCESS_KEY:-MRTESTACCESSKEY00000}
secret_key=${MR_S3_SECRET_KEY:-mrtestsecretkey0000000000000000000000000}
timeout=${MR_S3_TIMEOUT:-60}
stop_timeout=${MR_S3_STOP_TIMEOUT:-15}
memstore_mib=${MR_S3_MEMSTORE_MIB:-2048}

say() { echo "radosgw.sh: $*" >&2; }
die() { say "$*"; exit 1; }

usage() { echo "usage: $0 start|stop DIR" >&2; exit 2; }
[ $# -eq 2 ] || usage
case $1 in start | stop) ;; *) usage ;; esac
action=$1
dir=$(realpath -m -- "$2")
# The directory goes into ceph.conf unquoted, and into unix socket paths
# (at most 107 bytes).
[[ $dir =~ ^[A-Za-z0-9/._+-]+$ ]] || die "DIR may hold only letters, digits and / . _ + -: $dir"
[ ${#dir} -le 80 ] || die "DIR is too long for Ceph's admin sockets (at most 80 characters): $dir"
conf=$dir/ceph.conf
run=$dir/run
# Every ceph tool reads this file alone (-c as well, below), nothing in /etc/ceph.
export CEPH_CONF=$conf
# Ceph 16's clients first fetch their config from the monitor, and then build
# their monitor map without the fsid until the monitor sends its own: a
# command sent before that is refused ('wrong fsid'). An OSD whose boot-time
# crush commands are refused dies (about 1 start in 2 on a busy machine), so
# the daemons skip that fetch (--no-mon-config; the config file has it all,
# and in ceph.conf it has no effect); the ceph and radosgw-admin tools fetch
# it anyway (librados), so start retries them.
export CEPH_ARGS=--no-mon-config

# --- daemons of this instance ---------------------------------------------

# The pid of the daemon NAME (mon.a, osd.0, client.rgw.mr) if it is running,
# checked against its command line so that a reused pid is never taken.
daemon_pid() {
    local f=$run/$1.pid pid
    [ -s "$f" ] || return 1
    pid=$(<"$f")
    [[ $pid =~ ^[0-9]+$ ]] && is_ours "$pid" && echo "$pid"
}

# Whether process PID is a Ceph daemon started with this instance's config.
is_ours() {
    local arg found=""
    [ -r "/proc/$1/cmdline" ] || return 1
    while IFS= read -r -d '' arg; do
        [ "$arg" = "$conf" ] && found=1
    done <"/proc/$1/cmdline"
    [ -n "$found" ] || return 1
    case $(readlink "/proc/$1/exe" 2>/dev/null) in
        */ceph-mon | */ceph-osd | */radosgw) return 0 ;;
    esac
    return 1
}

# Pids of this instance's daemons, with or without a pid file (one that died
# in start before writing it, say).
our_pids() {
    local p
    for p in /proc/[0-9]*; do
        p=${p#/proc/}
        is_ours "$p" 2>/dev/null && echo "$p"
    done
    return 0
}

# Stops each daemon of this instance, radosgw first: SIGTERM, then SIGKILL
# after MR_S3_STOP_TIMEOUT seconds.
stop_instance() {
    local name pid pids=() deadline
    for name in "$rgw_name" "osd.$osd_id" mon.a; do
        pid=$(daemon_pid "$name") || continue
        say "stopping $name (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        pids+=("$pid")
        deadline=$((SECONDS + stop_timeout))
        while is_ours "$pid" && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
        if is_ours "$pid"; then
            say "$name (pid $pid) still runs after ${stop_timeout}s: SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
    for pid in $(our_pids); do
        say "stopping a daemon without a pid file (pid $pid)"
        kill -KILL "$pid" 2>/dev/null || true
        pids+=("$pid")
    done
    deadline=$((SECONDS + 5))
    for pid in ${pids[@]+"${pids[@]}"}; do
        while is_ours "$pid" && [ $SECONDS -lt $deadline ]; do sleep 0.1; done
        ! is_ours "$pid" || die "pid $pid does not stop"
    done
    rm -f "$run"/*.pid
}

# The HTTP status radosgw answers GET / with (000: no answer).
http_status() {
    if command -v curl >/dev/null; then
        curl -s -o /dev/null -m 5 -w '%{http_code}' "http://127.0.0.1:$1/" || true
    else
        (
            exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 0
            printf 'GET / HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' >&3
            read -r -t 5 _ code _ <&3 && echo "$code"
        ) 2>/dev/null || true
    fi
}

# Whether DIR's instance runs whole and answers.
running() {
    [ -s "$dir/env" ] && [ -s "$dir/port" ] &&
        daemon_pid mon.a >/dev/null && daemon_pid "osd.$osd_id" >/dev/null &&
        daemon_pid "$rgw_name" >/dev/null &&
        case $(http_status "$(<"$dir/port")") in 200 | 403) true ;; *) false ;; esac
}

# One start or stop at a time on DIR: tests running in parallel may share one
# instance, each calling start. The daemons do not inherit the lock (9>&-).
lock() {
    command -v flock >/dev/null || return 0
    exec 9>>"$dir/lock"
    flock -w $((2 * timeout + stop_timeout * 3)) 9 || die "$dir is locked by another start or stop"
}

if [ "$action" = stop ]; then
    [ -f "$conf" ] || { say "no instance in $dir (no ceph.conf)"; exit 0; }
    lock
    stop_instance
    say "stopped; $dir is left for you to delete"
    exit 0
fi

# --- start ------------------------------------------------------------------

# DIR is made private, or must be ours already: another user's directory
# could hold symlinks that turn our writes (as root, perhaps) into theirs,
# or an env file of theirs that the caller then evals.
mkdir -p -m 700 "$dir"
[ -O "$dir" ] && [ ! -L "$dir" ] || die "$dir is not a directory of yours: use a new one (mktemp -d)"
chmod 700 "$dir"
lock
if [ -f "$conf" ]; then
    if running; then
        say "already running in $dir"
        cat "$dir/env"
        exit 0
    fi
    die "$dir holds an instance that is not running (or only in part): run '$0 stop $dir', delete $dir, and start again"
fi

have_ceph() {
    local t
    for t in $tools; do command -v "$t" >/dev/null || return 1; done
}

if ! have_ceph; then
    if [ "$(id -u)" -eq 0 ]; then
        sudo=()
    elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
        sudo=(sudo -n)
    else
        echo "Ceph is missing; install it with: sudo apt-get install --no-install-recommends $packages" >&2
        exit 77
    fi
    command -v apt-get >/dev/null ||
        { echo "no apt-get: install Ceph's radosgw, ceph-mon and ceph-osd (16 or later) yourself" >&2; exit 77; }
    say "installing $packages (apt-get)"
    install() {
        # (env: sudo would drop DEBIAN_FRONTEND given before it)
        "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $packages >&2
    }
    # A machine's package lists may be missing or stale: update them once.
    install || { "${sudo[@]}" apt-get update -q >&2 && install; } ||
        { echo "apt-get could not install $packages" >&2; exit 77; }
    have_ceph || { echo "installed $packages, but some of $tools are still missing" >&2; exit 77; }
fi

[[ $memstore_mib =~ ^[0-9]+$ ]] && [ "$memstore_mib" -gt 0 ] || die "MR_S3_MEMSTORE_MIB must be a number of MiB: $memstore_mib"

# A TCP port on 127.0.0.1 that nothing listens on, other than those in $@.
free_port() {
    local p
    for _ in $(seq 50); do
        if command -v python3 >/dev/null; then
            p=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
        else
            p=$((20000 + RANDOM % 30000))
            ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null || continue
        fi
        case " $* " in *" $p "*) continue ;; esac
        echo "$p"
        return 0
    done
    die "found no free port"
}

t0=$SECONDS
rm -f "$dir/env"
started=""
# A start that fails stops what it started and shows the logs' ends.
on_exit() {
    local rc=$? f
    [ -z "$started" ] || return 0
    for f in "$dir"/log/*.log; do
        [ -s "$f" ] || continue
        echo "== the end of $f" >&2
        tail -n 15 "$f" >&2
    done
    say "start failed (logs above, in $dir/log)"
    stop_instance || true
    exit $((rc == 0 ? 1 : rc))
}
trap on_exit EXIT

mon_port=$(free_port)
if [ -n "${MR_S3_PORT:-}" ]; then
    [[ $MR_S3_PORT =~ ^[0-9]+$ ]] || die "MR_S3_PORT must be a port number: $MR_S3_PORT"
    port=$MR_S3_PORT
    [ "$port" != "$mon_port" ] || mon_port=$(free_port "$port")
    [ "$(http_status "$port")" = 000 ] || die "something answers on 127.0.0.1:$port (MR_S3_PORT) already"
else
    port=$(free_port "$mon_port")
fi
fsid=$(cat /proc/sys/kernel/random/uuid)
osd_uuid=$(cat /proc/sys/kernel/random/uuid)
mkdir -p "$run" "$dir/log" "$dir/crash" "$dir/mon" "$dir/osd/osd.$osd_id" "$dir/rgw"

# $name (mon.a, osd.0, client.rgw.mr) is expanded by Ceph.
cat >"$conf" <<EOF
# A throwaway cluster made by tests/s3/radosgw.sh: no authentication, one
# monitor, one OSD in memory, one copy of everything, all files here.
[global]
fsid = $fsid
mon_host = v1:127.0.0.1:$mon_port
public_addr = 127.0.0.1
cluster_addr = 127.0.0.1
ms_bind_msgr2 = false
ms_bind_ipv6 = false
auth_cluster_required = none
auth_service_required = none
auth_client_required = none
keyring = $dir/keyring
run_dir = $run
crash_dir = $dir/crash
log_file = $dir/log/\$name.log
mon_cluster_log_file = $dir/log/cluster.log
mon_data = $dir/mon/\$name
osd_data = $dir/osd/\$name
rgw_data = $dir/rgw/\$name
rgw_luarocks_location = $dir/rgw/luarocks
osd_objectstore = memstore
memstore_device_bytes = $((memstore_mib * 1024 * 1024))
osd_pool_default_size = 1
osd_pool_default_min_size = 1
mon_allow_pool_size_one = true
mon_warn_on_pool_no_redundancy = false
osd_crush_chooseleaf_type = 0
# radosgw makes 7 pools: few placement groups each, and no autoscaler.
osd_pool_default_pg_num = 8
osd_pool_default_pgp_num = 8
osd_pool_default_pg_autoscale_mode = off
mon_max_pg_per_osd = 1000
mon_allow_pool_delete = true
mon_data_avail_crit = 1
# The monitor commits a change (a pool radosgw makes, say) within 0.1 s, not 1.
paxos_propose_interval = 0.1

[mon]
admin_socket = $run/\$name.asok
pid_file = $run/\$name.pid

[osd]
admin_socket = $run/\$name.asok
pid_file = $run/\$name.pid

[$rgw_name]
admin_socket = $run/\$name.asok
pid_file = $run/\$name.pid
# Without tcp_nodelay each small GET takes ~40 ms (Nagle and delayed ACKs).
rgw_frontends = beast endpoint=127.0.0.1:$port tcp_nodelay=1
rgw_thread_pool_size = 64
EOF
echo "$port" >"$dir/port"

# Runs a ceph tool on this cluster, never for longer than MR_S3_TIMEOUT. The
# daemons fork and keep running.
c() { timeout "$timeout" "$1" -c "$conf" "${@:2}" 9>&-; }
# Runs "$@" until it succeeds, 5 times at most (see CEPH_ARGS above).
retry() {
    for _ in 1 2 3 4; do
        "$@" && return 0
        sleep 0.5
    done
    "$@"
}

say "monitor on 127.0.0.1:$mon_port"
c monmaptool --create --fsid "$fsid" --addv a "[v1:127.0.0.1:$mon_port]" "$dir/monmap" >"$dir/log/start.log" 2>&1
c ceph-mon --mkfs -i a --monmap "$dir/monmap" >>"$dir/log/start.log" 2>&1
c ceph-mon -i a 2>>"$dir/log/start.log"
say "OSD ($memstore_mib MiB in memory)"
# (osd new is idempotent with the same uuid.)
id=$(retry c ceph --connect-timeout "$timeout" osd new "$osd_uuid" 2>>"$dir/log/start.log")
[ "$id" = "$osd_id" ] || die "ceph osd new gave OSD id '$id', not $osd_id"
c ceph-osd -i "$osd_id" --mkfs --osd-uuid "$osd_uuid" >>"$dir/log/start.log" 2>&1
c ceph-osd -i "$osd_id" 2>>"$dir/log/start.log"
deadline=$((SECONDS + timeout))
until c ceph --connect-timeout "$timeout" osd dump 2>/dev/null | grep -q "^osd\.$osd_id up "; do
    [ $SECONDS -lt $deadline ] || die "OSD not up after ${timeout}s"
    daemon_pid "osd.$osd_id" >/dev/null || die "the OSD died"
    sleep 0.3
done

say "radosgw on 127.0.0.1:$port"
c radosgw -n "$rgw_name" 2>>"$dir/log/start.log"
deadline=$((SECONDS + timeout))
while :; do
    case $(http_status "$port") in 200 | 403) break ;; esac
    [ $SECONDS -lt $deadline ] || die "radosgw does not answer on 127.0.0.1:$port after ${timeout}s"
    daemon_pid "$rgw_name" >/dev/null || die "radosgw died"
    sleep 0.3
done

say "S3 user mr (access key $access_key)"
make_user() {
    c radosgw-admin user create --uid=mr --display-name="mr tests" \
        --access-key="$access_key" --secret-key="$secret_key" >"$dir/log/user.json" ||
        c radosgw-admin user info --uid=mr >"$dir/log/user.json"
}
retry make_user 2>>"$dir/log/start.log"

# radosgw's default zonegroup accepts us-east-1 (or none) as the region.
cat >"$dir/env" <<EOF
export AWS_ENDPOINT_URL=http://127.0.0.1:$port
export AWS_ACCESS_KEY_ID=$access_key
export AWS_SECRET_ACCESS_KEY=$secret_key
export AWS_REGION=us-east-1
export AWS_DEFAULT_REGION=us-east-1
export AWS_ALLOW_HTTP=true
EOF
started=1
say "ready in $((SECONDS - t0))s: $dir (stop: $0 stop $dir)"
cat "$dir/env"
