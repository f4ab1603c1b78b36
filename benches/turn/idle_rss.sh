#!/usr/bin/env bash
# RSS per held allocation, made exactly once each by allocations.py (see its docstring).
#
#   cargo build --release && benches/turn/idle_rss.sh 1000 chan        # alloc | perm | chan
#   benches/turn/idle_rss.sh 1000 alloc heaptrack -o /tmp/ht          # any wrapper before the binary
#
# Starts callgate on 127.0.0.1 (the compare.sh flags, with the unauthenticated-request limit
# raised so setup takes seconds, not N/20 s), reads VmRSS, opens N allocations, waits SETTLE
# seconds, reads VmRSS and the socket count again, prints one line, stops everything (trap EXIT).
set -euo pipefail
cd "$(dirname "$0")/../.."
N=${1:-1000}; MODE=${2:-chan}; shift 2 || true
CALLGATE=${CALLGATE:-target/release/callgate}
PORT=${PORT:-34880}; SECRET=${SECRET:-compare-secret-0123456789}; SETTLE=${SETTLE:-3}
if ss -Hlnu "sport = :$PORT" | grep -q .; then echo "udp port $PORT is busy" >&2; exit 1; fi
TMP=$(mktemp -d /tmp/turn-idle.XXXXXX)
SERVER_PID="" DRIVER_PID=""
cleanup() {
    exec 3>&- 2>/dev/null || true
    [[ -z $DRIVER_PID ]] || wait "$DRIVER_PID" 2>/dev/null || true
    [[ -z $SERVER_PID ]] || { kill -INT "$SERVER_PID" 2>/dev/null || true; wait 2>/dev/null || true; }
    rm -rf "$TMP"
}
trap cleanup EXIT
mkdir -p "$TMP/certs"
"$@" "$CALLGATE" --https-listen 127.0.0.1:0 --http-listen off --metrics-listen off \
    --certs-dir "$TMP/certs" --public-dir "$TMP" --log-level warn \
    --listening-ip 127.0.0.1 --listening-port "$PORT" --tls-listening-port off \
    --turn-tcp false --relay-ip 127.0.0.1 --min-port 20000 --max-port 29999 \
    --static-auth-secret "$SECRET" --allowed-peer-ip 127.0.0.1/32 \
    --user-quota 100000 --total-quota 100000 --allocations-per-ip 100000 --turn-unauthenticated-per-ip 100000 \
    >"$TMP/server.log" 2>&1 &
for _ in $(seq 100); do ss -Hlnu "sport = :$PORT" | grep -q . && break; sleep 0.2; done
sleep 1
SERVER_PID=$(pgrep -n -f -- "$CALLGATE --https-listen") # the binary itself, under any wrapper
rss() { awk '$1 == "VmRSS:" {print $2}' "/proc/$SERVER_PID/status"; }
# Anonymous RSS only: the file-backed part (the binary's pages) depends on the page cache (a
# freshly built binary maps ~0.5 MiB more at start through fault-around), not on the relay.
anon() { awk '$1 == "RssAnon:" {print $2}' "/proc/$SERVER_PID/status"; }
sockets() { find "/proc/$SERVER_PID/fd" -lname 'socket:*' | wc -l; }
rss0=$(rss); anon0=$(anon); sock0=$(sockets)
mkfifo "$TMP/hold"
python3 benches/turn/allocations.py "$PORT" "$N" "$MODE" "$SECRET" <"$TMP/hold" >"$TMP/driver.out" 2>&1 &
DRIVER_PID=$!
exec 3>"$TMP/hold"
until grep -q ready "$TMP/driver.out"; do
    kill -0 "$DRIVER_PID" 2>/dev/null || { cat "$TMP/driver.out" >&2; exit 1; }
    sleep 0.5
done
sleep "$SETTLE"
rss1=$(rss); anon1=$(anon); allocs=$(($(sockets) - sock0))
echo "mode=$MODE allocations=$allocs rss_start_kb=$rss0 rss_kb=$rss1 delta_kb=$((rss1 - rss0))" \
    "bytes_per_allocation=$(((rss1 - rss0) * 1024 / allocs))" \
    "anon_delta_kb=$((anon1 - anon0)) anon_bytes_per_allocation=$(((anon1 - anon0) * 1024 / allocs))"
