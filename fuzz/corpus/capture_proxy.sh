#!/usr/bin/env bash
# Captures seed corpora for proxy_header from a real HAProxy: it forwards loopback connections
# (IPv4 and IPv6) to a tiny listener with `send-proxy` (v1) and `send-proxy-v2` (with and without
# TLVs); the listener stores the first bytes of each connection. Each seed is prefixed with one
# chunking-seed byte, as the target expects. Usage: capture_proxy.sh <free base port>
set -euo pipefail
base=$1
here=$(cd "$(dirname "$0")" && pwd)
out="$here/proxy_header"
mkdir -p "$out"
work=$(mktemp -d)
cat > "$work/haproxy.cfg" <<CFG
defaults
  mode tcp
  timeout connect 2s
  timeout client 2s
  timeout server 2s
frontend v1
  bind 127.0.0.1:$((base + 1))
  bind [::1]:$((base + 1))
  default_backend v1
backend v1
  server s 127.0.0.1:$base send-proxy
frontend v2
  bind 127.0.0.1:$((base + 2))
  bind [::1]:$((base + 2))
  default_backend v2
backend v2
  server s 127.0.0.1:$base send-proxy-v2
frontend v2tlv
  bind 127.0.0.1:$((base + 3))
  default_backend v2tlv
backend v2tlv
  server s 127.0.0.1:$base send-proxy-v2 proxy-v2-options authority,unique-id,crc32c
  unique-id-format %{+X}o%ci:%cp
CFG
python3 - "$base" "$out" <<'PY' &
import hashlib, os, socket, sys
base, out = int(sys.argv[1]), sys.argv[2]
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", base)); s.listen()
for _ in range(5):
    c, _ = s.accept(); c.settimeout(1); data = b""
    try:
        while len(data) < 600:
            chunk = c.recv(600)
            if not chunk: break
            data += chunk
    except socket.timeout:
        pass
    seed = b"\x07" + data
    open(os.path.join(out, hashlib.sha1(seed).hexdigest()), "wb").write(seed)
    c.close()
PY
listener=$!
sleep 0.5
haproxy -f "$work/haproxy.cfg" -D -p "$work/pid"
sleep 0.5
send() { python3 -c "import socket,sys; c=socket.create_connection((sys.argv[1], int(sys.argv[2]))); c.sendall(b'GET / HTTP/1.1\r\nHost: x\r\n\r\n'); import time; time.sleep(0.3)" "$1" "$2"; }
send 127.0.0.1 $((base + 1)); send ::1 $((base + 1))
send 127.0.0.1 $((base + 2)); send ::1 $((base + 2))
send 127.0.0.1 $((base + 3))
wait "$listener"
kill "$(cat "$work/pid")"
rm -rf "$work"
ls "$out" | wc -l
