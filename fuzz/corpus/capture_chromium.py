#!/usr/bin/env python3
"""Captures seeds for stun_inspect, turn_differential and turn_framing from Chromium's TURN client.

Starts callgate (TURN on 127.0.0.1, ephemeral ports, a static-auth-secret, loopback peers allowed),
a UDP and a TCP capture forwarder in front of its TURN ports, a tiny HTTP server on loopback for
the test page, and headless Debian `chromium` on that page. In the page two RTCPeerConnections with
`iceTransportPolicy: 'relay'` — first with only `turn:127.0.0.1:<fwd>?transport=udp`, then with
only `?transport=tcp`, REST credentials computed from the secret as src/turn/credentials.rs does —
connect to each other, exchange data-channel messages and a few seconds of fake video, then close
(Chromium deallocates with a Refresh of LIFETIME 0). So Chromium does Allocate (401, then
authenticated), CreatePermission, ChannelBind, Send/Data indications, ChannelData and Refresh.

What passes the forwarder is stored, named by SHA-1 of the content like the other seeds:
  * stun_inspect: datagrams of both directions, a few per message shape (type and attribute
    types, or ChannelData size class), at most 1500 bytes;
  * turn_differential: client-to-server STUN datagrams, a few per shape (the target's input is
    one datagram, as capture_turn_differential.py records it);
  * turn_framing: each TCP direction's byte stream, cut at a frame boundary to at most 1500 bytes,
    once from the start (Allocate ... ChannelBind) and once from its first ChannelData frame.
Only loopback traffic. Usage, from the repository root, after `cargo build --release`:

    python3 fuzz/corpus/capture_chromium.py [--dry-run]

(CALLGATE_BIN overrides target/release/callgate; CHROMIUM_PATH overrides /usr/bin/chromium;
--dry-run prints what would be stored without writing.)"""

import base64
import hashlib
import hmac
import http.server
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
SECRET = "chromium-seed-secret-0123456789"
LIMIT = 1500
PER_SHAPE = 2
METHODS = {0x001: "Binding", 0x003: "Allocate", 0x004: "Refresh", 0x006: "Send", 0x007: "Data",
           0x008: "CreatePermission", 0x009: "ChannelBind"}
CLASSES = {0: "request", 1: "indication", 2: "success", 3: "error"}

PAGE = r"""<!doctype html><meta charset="utf-8"><title>capture</title><script>
const cfg = %CONFIG%;
const log = [];
async function pair(url) {
  const ice = { iceServers: [{ urls: url, username: cfg.username, credential: cfg.credential }],
                iceTransportPolicy: 'relay' };
  const a = new RTCPeerConnection(ice), b = new RTCPeerConnection(ice);
  a.onicecandidate = (e) => e.candidate && b.addIceCandidate(e.candidate);
  b.onicecandidate = (e) => e.candidate && a.addIceCandidate(e.candidate);
  let stream = null;
  try {
    stream = await navigator.mediaDevices.getUserMedia({ video: { width: 320, height: 240 } });
    for (const t of stream.getTracks()) a.addTrack(t, stream);
  } catch (e) { log.push('no fake video: ' + e); }
  const frames = new Promise((ok) => { b.ontrack = () => ok(); });
  const dc = a.createDataChannel('seed');
  const echoed = new Promise((ok) => {
    let n = 0;
    dc.onmessage = () => { if (++n === 20) ok(); };
  });
  b.ondatachannel = (e) => { e.channel.onmessage = (m) => e.channel.send('echo ' + m.data); };
  await a.setLocalDescription(); await b.setRemoteDescription(a.localDescription);
  await b.setLocalDescription(); await a.setRemoteDescription(b.localDescription);
  await new Promise((ok) => { dc.onopen = ok; });
  for (let i = 0; i < 20; i++) dc.send('m'.repeat(1 + i * 37) + i);
  await echoed;
  if (stream) { await frames; await new Promise((ok) => setTimeout(ok, 3000)); }
  const stats = await a.getStats();
  let pairInfo = '';
  stats.forEach((s) => { if (s.type === 'local-candidate' && s.candidateType === 'relay') pairInfo = s.relayProtocol; });
  log.push(url + ' connected, relay protocol ' + pairInfo);
  if (stream) stream.getTracks().forEach((t) => t.stop());
  a.close(); b.close();
  await new Promise((ok) => setTimeout(ok, 1000)); // let Chromium send its Refresh(0)s
}
(async () => {
  let ok = true;
  for (const url of cfg.urls) {
    try {
      await Promise.race([pair(url), new Promise((_, no) => setTimeout(() => no(new Error('timeout')), 30000))]);
    } catch (e) { ok = false; log.push(url + ' failed: ' + e); }
  }
  await fetch('/done', { method: 'POST', body: JSON.stringify({ ok, log }) });
})();
</script>"""


def stun_shape(data):
    """For a STUN message: its type and its attribute types in order; None for anything else."""
    if len(data) < 20 or data[0] >= 0x40 or data[4:8] != b"\x21\x12\xa4\x42":
        return None
    types, at = [], 20
    while at + 4 <= len(data):
        t = int.from_bytes(data[at:at + 2], "big")
        n = int.from_bytes(data[at + 2:at + 4], "big")
        types.append(t)
        at += 4 + (n + 3) // 4 * 4
    return (data[:2], tuple(types))


def describe(data):
    """'Allocate request', 'ChannelData', ... for the summary."""
    if data and 0x40 <= data[0] < 0x80:
        return "ChannelData"
    if stun_shape(data) is None:
        return "other"
    typ = int.from_bytes(data[:2], "big")
    m = (typ & 0x000F) | ((typ & 0x00E0) >> 1) | ((typ & 0x3E00) >> 2)
    c = ((typ >> 4) & 1) | ((typ >> 7) & 2)
    return f"{METHODS.get(m, hex(m))} {CLASSES[c]}"


def frames(stream):
    """Splits a TURN-over-TCP stream into (start, wire length) frames; stops at a partial one."""
    out, at = [], 0
    while len(stream) - at >= 4:
        if stream[at] < 0x40:
            wire = 20 + int.from_bytes(stream[at + 2:at + 4], "big")
        elif stream[at] < 0x80:
            n = 4 + int.from_bytes(stream[at + 2:at + 4], "big")
            wire = (n + 3) // 4 * 4
        else:
            break
        if len(stream) - at < wire:
            break
        out.append((at, wire))
        at += wire
    return out


def window(stream, start):
    """Whole frames from `start`, as many as fit in LIMIT bytes."""
    end = start
    for at, wire in frames(stream):
        if at < start:
            continue
        if at + wire - start > LIMIT:
            break
        end = at + wire
    return stream[start:end]


class Capture:
    """The forwarders' record: datagrams (with direction) and TCP streams."""

    def __init__(self):
        self.lock = threading.Lock()
        self.datagrams = []  # (from_client, bytes)
        self.streams = []  # [bytearray up, bytearray down] per TCP connection

    def datagram(self, from_client, data):
        with self.lock:
            self.datagrams.append((from_client, bytes(data)))


def udp_forwarder(front, turn_port, cap, stop):
    backs = {}
    front.settimeout(0.2)

    def pump(client, back):
        while not stop.is_set():
            try:
                data = back.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            cap.datagram(False, data)
            front.sendto(data, client)

    while not stop.is_set():
        try:
            data, client = front.recvfrom(65536)
        except socket.timeout:
            continue
        cap.datagram(True, data)
        back = backs.get(client)
        if back is None:
            back = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            back.connect(("127.0.0.1", turn_port))
            back.settimeout(0.2)
            backs[client] = back
            threading.Thread(target=pump, args=(client, back), daemon=True).start()
        back.send(data)


def tcp_forwarder(front, turn_port, cap, stop):
    front.settimeout(0.2)

    def pipe(src, dst, buf):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                with cap.lock:
                    if len(buf) < 1 << 20:
                        buf.extend(data)
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    while not stop.is_set():
        try:
            conn, _ = front.accept()
        except socket.timeout:
            continue
        conn.settimeout(None)
        up = socket.create_connection(("127.0.0.1", turn_port))
        bufs = [bytearray(), bytearray()]
        with cap.lock:
            cap.streams.append(bufs)
        threading.Thread(target=pipe, args=(conn, up, bufs[0]), daemon=True).start()
        threading.Thread(target=pipe, args=(up, conn, bufs[1]), daemon=True).start()


def start_callgate(certs):
    binary = os.environ.get("CALLGATE_BIN", os.path.join(ROOT, "target", "release", "callgate"))
    args = [binary, "--https-listen", "127.0.0.1:0", "--http-listen", "off", "--metrics-listen", "off",
            "--listening-ip", "127.0.0.1", "--listening-port", "0", "--tls-listening-port", "off",
            "--allowed-peer-ip", "127.0.0.1", "--static-auth-secret", SECRET,
            "--public-dir", os.path.join(ROOT, "public"), "--certs-dir", certs, "--log-format", "json"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines = []
    deadline = time.time() + 30
    for line in proc.stderr:
        lines.append(line)
        if "callgate ready" in line:
            break
        if time.time() > deadline:
            break
    text = "".join(lines)
    udp = re.search(r"turn\+udp://127\.0\.0\.1:(\d+)", text)
    tcp = re.search(r"turn\+tcp://127\.0\.0\.1:(\d+)", text)
    if not (udp and tcp):
        proc.kill()
        sys.exit("callgate did not report its TURN listeners:\n" + text)
    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
    return proc, int(udp.group(1)), int(tcp.group(1))


def serve_page(config):
    result = {}
    done = threading.Event()
    page = PAGE.replace("%CONFIG%", json.dumps(config)).encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            result.update(json.loads(body))
            self.send_response(204)
            self.end_headers()
            done.set()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, result, done


def keep(kind, data, kept):
    """Stores `data` for target `kind` unless PER_SHAPE seeds of its shape are already there."""
    if kind == "turn_framing":
        shape = (data[:2], len(data) // 500)
    else:
        shape = stun_shape(data)
        if shape is None:  # ChannelData: by channel-free size class
            shape = ("channeldata", min(len(data) // 300, 4))
    same = kept.setdefault((kind, shape), set())
    if len(same) >= PER_SHAPE:
        return
    same.add(bytes(data))


def main():
    dry_run = "--dry-run" in sys.argv
    tmp = tempfile.mkdtemp(prefix="callgate-seeds-")
    callgate, turn_udp, turn_tcp = start_callgate(os.path.join(tmp, "certs"))
    cap, stop = Capture(), threading.Event()
    ufront = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    ufront.bind(("127.0.0.1", 0))
    tfront = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tfront.bind(("127.0.0.1", 0))
    tfront.listen()
    threading.Thread(target=udp_forwarder, args=(ufront, turn_udp, cap, stop), daemon=True).start()
    threading.Thread(target=tcp_forwarder, args=(tfront, turn_tcp, cap, stop), daemon=True).start()

    username = f"{int(time.time()) + 3600}:chromium-seed"
    credential = base64.b64encode(hmac.new(SECRET.encode(), username.encode(), hashlib.sha1).digest()).decode()
    config = {"username": username, "credential": credential,
              "urls": [f"turn:127.0.0.1:{ufront.getsockname()[1]}?transport=udp",
                       f"turn:127.0.0.1:{tfront.getsockname()[1]}?transport=tcp"]}
    server, result, done = serve_page(config)
    chromium = subprocess.Popen(
        [os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium"), "--headless=new", "--no-sandbox",
         "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--use-fake-device-for-media-stream",
         "--use-fake-ui-for-media-stream", f"--user-data-dir={os.path.join(tmp, 'profile')}",
         f"http://127.0.0.1:{server.server_address[1]}/"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        finished = done.wait(120)
    finally:
        os.killpg(chromium.pid, signal.SIGTERM)
        chromium.wait()
        time.sleep(0.5)
        stop.set()
        callgate.terminate()
        callgate.wait()
        server.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    print("page:", json.dumps(result, indent=1) if finished else "no answer within 120 s", file=sys.stderr)

    kept, seen_types = {}, {}
    for from_client, data in cap.datagrams:
        what = describe(data)
        seen_types[("udp", what)] = seen_types.get(("udp", what), 0) + 1
        if len(data) > LIMIT:
            continue
        keep("stun_inspect", data, kept)
        if from_client and stun_shape(data) is not None:
            keep("turn_differential", data, kept)
    for up, down in cap.streams:
        for stream in (bytes(up), bytes(down)):
            for at, wire in frames(stream):
                what = describe(stream[at:at + wire])
                seen_types[("tcp", what)] = seen_types.get(("tcp", what), 0) + 1
            starts = [0] + [at for at, _ in frames(stream) if 0x40 <= stream[at] < 0x80][:1]
            for start in starts:
                piece = window(stream, start)
                if piece:
                    keep("turn_framing", piece, kept)
    for (transport, what), n in sorted(seen_types.items()):
        print(f"{transport:3} {n:6}  {what}", file=sys.stderr)
    written = {}
    for (kind, _), same in kept.items():
        for data in same:
            written[kind] = written.get(kind, 0) + 1
            if dry_run:
                continue
            os.makedirs(os.path.join(HERE, kind), exist_ok=True)
            with open(os.path.join(HERE, kind, hashlib.sha1(data).hexdigest()), "wb") as f:
                f.write(data)
    print("seeds:", written, "(dry run)" if dry_run else "", file=sys.stderr)
    return 0 if finished and result.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
