#!/usr/bin/env bash
# callgate TURN relay vs coturn, UDP ChannelData echoed by coturn's turnutils_uclient.
# Loopback only. Every server this script starts is stopped on exit (trap EXIT).
#
#   cargo build --release && benches/turn/compare.sh            # all scenarios, 3 rounds
#   ROUNDS=5 SCENARIOS="40k 60k" benches/turn/compare.sh
#   CALLGATE_OLD=/tmp/callgate-main benches/turn/compare.sh   # also interleave an older build
#
# Each run starts a fresh server, runs one uclient load against it, then reads from /proc:
# CPU (utime+stime delta), VmHWM (peak RSS) and VmRSS, and where the kernel dropped datagrams:
# in the server's own sockets (listener and relay ports, from /proc/net/udp) or elsewhere (the
# rest of the system-wide UDP receive-buffer errors, i.e. uclient's sockets on this otherwise
# UDP-quiet box); the server is then stopped. Runs are interleaved [callgate_old,] callgate,
# coturn, ... and `uptime` is logged before each.
# Output: one CSV line per run on stdout (and in $OUT if set).
set -euo pipefail

cd "$(dirname "$0")/../.."
CALLGATE=${CALLGATE:-target/release/callgate}
CALLGATE_OLD=${CALLGATE_OLD:-}
SERVERS="callgate coturn"
[[ -z $CALLGATE_OLD ]] || SERVERS="callgate_old $SERVERS"
ROUNDS=${ROUNDS:-3}
SCENARIOS=${SCENARIOS:-"40k 60k sat flood idle1000 idle5000"}
SECRET=${SECRET:-compare-secret-0123456789}
CG_PORT=${CG_PORT:-34780}
CT_PORT=${CT_PORT:-34790}
OUT=${OUT:-/dev/null}
HZ=$(getconf CLK_TCK)

TMP=$(mktemp -d /tmp/turn-compare.XXXXXX)
SERVER_PID=""
stop_server() {
    if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill "$SERVER_PID" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    SERVER_PID=""
}
cleanup() { stop_server; rm -rf "$TMP"; }
trap cleanup EXIT
trap 'exit 130' INT TERM

ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

# Scenario -> uclient arguments. -y: clients in pairs echo to each other through the relay,
# -c: no RTCP allocation, -l 1000: 1000-byte ChannelData, -z: ms between packets per client.
scenario_args() {
    case "$1" in
        # nominal offered load = clients x 1000/z per second; uclient is single-threaded and
        # reaches far less on this box (see docs/PERFORMANCE-TURN.md), so the achieved rate
        # is reported as recv / transmit_s.
        40k) echo "-m 40 -n 2000 -z 1" ;;
        60k) echo "-m 60 -n 2000 -z 1" ;;
        sat) echo "-m 60 -n 2000 -z 1" ;;     # per process; two processes, see one_run
        flood) echo "-m 100 -n 1000 -z 0" ;;  # no pacing: as fast as one uclient goes
        idle1000 | idle5000) echo "-m 1000 -n 1 -z 1000 -h" ;;  # per uclient process, see one_run
        c*x*z*) # generic: c<clients>x<messages>z<interval ms>, e.g. c160x500z1
            local c=${1#c} ; local n=${c#*x}
            echo "-m ${c%%x*} -n ${n%%z*} -z ${1##*z}" ;;
        *) echo "unknown scenario $1" >&2; exit 2 ;;
    esac
}

wait_udp_port() { # wait until something listens on 127.0.0.1:$1/udp
    for _ in $(seq 100); do
        ss -Hlnu "sport = :$1" | grep -q . && return 0
        sleep 0.1
    done
    echo "server did not bind udp port $1" >&2; return 1
}

start_callgate_old() { start_callgate "$CALLGATE_OLD"; }

start_callgate() {
    mkdir -p "$TMP/certs"
    "${1:-$CALLGATE}" --https-listen 127.0.0.1:0 --http-listen off --metrics-listen off \
        --certs-dir "$TMP/certs" --public-dir "$TMP" --log-level warn \
        --listening-ip 127.0.0.1 --listening-port "$CG_PORT" --tls-listening-port off \
        --turn-tcp false --relay-ip 127.0.0.1 --min-port 40000 --max-port 49999 \
        --static-auth-secret "$SECRET" --allowed-peer-ip 127.0.0.1/32 \
        --user-quota 100000 --total-quota 100000 --allocations-per-ip 100000 >"$TMP/callgate.log" 2>&1 &
    SERVER_PID=$!
    wait_udp_port "$CG_PORT"
    PORT=$CG_PORT
    RELAY_PORTS="40000 49999"
}

start_coturn() {
    cat >"$TMP/turnserver.conf" <<CONF
listening-ip=127.0.0.1
relay-ip=127.0.0.1
listening-port=$CT_PORT
min-port=50000
max-port=59999
use-auth-secret
static-auth-secret=$SECRET
realm=compare
allow-loopback-peers
no-tls
no-dtls
no-tcp
no-cli
no-multicast-peers
log-file=$TMP/coturn.log
simple-log
pidfile=$TMP/coturn.pid
CONF
    /usr/bin/turnserver -c "$TMP/turnserver.conf" >"$TMP/coturn.out" 2>&1 &
    SERVER_PID=$!
    wait_udp_port "$CT_PORT"
    PORT=$CT_PORT
    RELAY_PORTS="50000 59999"
}

server_sockets() { # sockets the server process holds (callgate: listener + one relay socket
    # per allocation; coturn: listener threads + relay socket and per-client UDP session socket)
    { find "/proc/$SERVER_PID/fd" -lname 'socket:*' 2>/dev/null || true; } | wc -l
}
server_drops() { # datagrams dropped by the server's sockets: its listening port and relay range
    # shellcheck disable=SC2086 # RELAY_PORTS is "low high"
    python3 - "$PORT" $RELAY_PORTS <<'PY'
import sys
port, lo, hi = map(int, sys.argv[1:])
total = 0
for line in open("/proc/net/udp").readlines()[1:] + open("/proc/net/udp6").readlines()[1:]:
    f = line.split()
    p = int(f[1].rsplit(":", 1)[1], 16)
    if p == port or lo <= p <= hi:
        total += int(f[-1])
print(total)
PY
}
rcvbuf_errors() { # system-wide UDP receive-buffer drops (Udp: RcvbufErrors in /proc/net/snmp)
    awk '/^Udp:/ { if (!h) { for (i = 1; i <= NF; i++) if ($i == "RcvbufErrors") c = i; h = 1 } else print $c }' /proc/net/snmp
}
cpu_ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
status_kb() { awk -v k="$2:" '$1==k {print $2}' "/proc/$1/status"; }

# one_run SERVER SCENARIO ROUND
one_run() {
    local server=$1 scen=$2 round=$3 load
    load=$(cut -d' ' -f1 /proc/loadavg)
    "start_$server"
    sleep 0.5
    rm -f "$TMP"/uclient*.out
    local rss0 cpu0 t0 t1 cpu1 hwm rss out
    rss0=$(status_kb "$SERVER_PID" VmRSS)
    cpu0=$(cpu_ticks "$SERVER_PID")
    local args
    args=$(scenario_args "$scen")
    t0=$(date +%s.%N)
    allocs=""
    local sock0 err0 sdrop0
    sock0=$(server_sockets)
    err0=$(rcvbuf_errors)
    sdrop0=$(server_drops)
    if [[ $scen == idle* ]]; then
        # N allocations in N/1000 parallel uclient processes of 1000 clients each (uclient sets
        # up its clients one after another, ~0.1 s each). -h keeps the allocations after the
        # last packet. Wait until the server holds N relay sockets (or the count stops growing
        # for 20 s), let it settle 5 s, read RSS, stop the clients.
        local want=${scen#idle} upids=() p last=-1 still=0
        for p in $(seq $((want / 1000))); do
            # shellcheck disable=SC2086 # $args is a list of flags
            turnutils_uclient -y -c $args -l 1000 -u "bench$p" -W "$SECRET" -p "$PORT" 127.0.0.1 \
                >"$TMP/uclient$p.out" 2>&1 &
            upids+=($!)
        done
        for _ in $(seq 300); do
            sleep 2
            allocs=$(($(server_sockets) - sock0))
            ((allocs >= want)) && break
            if ((allocs == last)); then still=$((still + 2)); ((still >= 20)) && break; else still=0; fi
            last=$allocs
        done
        sleep 5
        allocs=$(($(server_sockets) - sock0))
        rss=$(status_kb "$SERVER_PID" VmRSS)
        kill "${upids[@]}" 2>/dev/null || true; wait "${upids[@]}" 2>/dev/null || true
        out=$(cat "$TMP"/uclient*.out)
    else
        # PROCS parallel uclient processes (the box has 2 cores; one uclient is single-threaded).
        local procs=1 upids=() p
        [[ $scen == sat ]] && procs=2
        for p in $(seq "$procs"); do
            # shellcheck disable=SC2086 # $args is a list of flags
            turnutils_uclient -y -c $args -l 1000 -u "bench$p" -W "$SECRET" -p "$PORT" 127.0.0.1 \
                >"$TMP/uclient$p.out" 2>&1 &
            upids+=($!)
        done
        wait "${upids[@]}" || true
        out=$(cat "$TMP"/uclient*.out)
        rss=""
    fi
    echo "$out" >"$TMP/uclient.last"
    t1=$(date +%s.%N)
    cpu1=$(cpu_ticks "$SERVER_PID")
    local sdrop odrop
    sdrop=$(($(server_drops) - sdrop0))
    odrop=$(($(rcvbuf_errors) - err0 - sdrop))
    hwm=$(status_kb "$SERVER_PID" VmHWM)
    [[ -n $rss ]] || rss=$(status_kb "$SERVER_PID" VmRSS)
    stop_server
    local sent recv lost lostpct xmit_s
    # Totals summed over the uclient processes (each prints its own summary once).
    sent=$(sed -n 's/.*start_mclient: tot_send_msgs=\([0-9]*\).*/\1/p' "$TMP"/uclient*.out | paste -sd+ | bc)
    recv=$(sed -n 's/.*start_mclient: tot_send_msgs=[0-9]*, tot_recv_msgs=\([0-9]*\).*/\1/p' "$TMP"/uclient*.out | paste -sd+ | bc)
    lost=$(sed -n 's/.*Total lost packets \([0-9]*\) .*/\1/p' "$TMP"/uclient*.out | paste -sd+ | bc)
    lostpct=""
    [[ -n $sent && $sent -gt 0 && -n $lost ]] && lostpct=$(echo "scale=4; 100 * $lost / $sent" | bc)
    xmit_s=$(sed -n 's/.*Total transmit time is \([0-9]*\).*/\1/p' "$TMP"/uclient*.out | sort -n | tail -1)
    local wall cpu_s
    wall=$(echo "$t1 - $t0" | bc -l)
    cpu_s=$(echo "($cpu1 - $cpu0) / $HZ" | bc -l)
    printf '%s,%s,%s,%s,%.1f,%s,%s,%s,%s,%s,%.2f,%s,%s,%s,%s,%s,%s\n' \
        "$round" "$server" "$scen" "$load" "$wall" "${xmit_s:-}" "${sent:-}" "${recv:-}" "${lost:-}" "${lostpct:-}" \
        "$cpu_s" "$rss0" "$hwm" "$rss" "$allocs" "$sdrop" "$odrop" | tee -a "$OUT"
    [[ -z ${KEEP_OUTPUT:-} ]] || cp "$TMP/uclient.last" "$KEEP_OUTPUT/$server-$scen-$round.txt"
}

{
echo "# $(date -u +%FT%TZ) $(uname -r) cpus=$(nproc) $(turnserver --version 2>&1 | head -1) callgate=$(git rev-parse --short HEAD)"
echo "round,server,scenario,load1,wall_s,transmit_s,sent,recv,lost,lost_pct,server_cpu_s,rss_start_kb,vmhwm_kb,rss_kb,new_server_sockets,server_sock_drops,other_udp_drops"
} | tee -a "$OUT"
for round in $(seq "$ROUNDS"); do
    for scen in $SCENARIOS; do
        for server in $SERVERS; do
            one_run "$server" "$scen" "$round"
        done
    done
done
