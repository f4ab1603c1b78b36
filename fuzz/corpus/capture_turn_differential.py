#!/usr/bin/env python3
"""Records real TURN client messages as seeds for the `turn_differential` fuzz target.

Starts coturn's `turnserver` on loopback, puts a UDP proxy in front of it, runs coturn's
`turnutils_uclient` through the proxy in a few modes (channels, Send indications, DONT-FRAGMENT,
EVEN-PORT, client-to-client), and writes every distinct client-to-server datagram to
`fuzz/corpus/turn_differential/<sha1>` (a few per message shape). Only loopback traffic. Usage, from the repository root:

    python3 fuzz/corpus/capture_turn_differential.py
"""

import hashlib
import os
import socket
import subprocess
import sys
import threading
import time

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "turn_differential")
SECRET = "fuzz-seed-secret-0123456789"


def free_udp_port():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def proxy(listen, server, seen, stop):
    """Forwards datagrams between clients and `server`; records the clients' ones."""
    front = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    front.bind(("127.0.0.1", listen))
    front.settimeout(0.2)
    backs = {}  # client address -> socket towards the server

    def pump_back(client, back):
        while not stop.is_set():
            try:
                data = back.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            front.sendto(data, client)

    while not stop.is_set():
        try:
            data, client = front.recvfrom(65536)
        except socket.timeout:
            continue
        if data and data[0] < 0x40:  # STUN, not ChannelData
            seen.add(data)
        back = backs.get(client)
        if back is None:
            back = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            back.connect(("127.0.0.1", server))
            back.settimeout(0.2)
            backs[client] = back
            threading.Thread(target=pump_back, args=(client, back), daemon=True).start()
        back.send(data)


def shape(data):
    """The message type and its attribute types, in order: seeds are kept per shape."""
    types, at = [], 20
    while at + 4 <= len(data):
        t = int.from_bytes(data[at:at + 2], "big")
        n = int.from_bytes(data[at + 2:at + 4], "big")
        types.append(t)
        at += 4 + (n + 3) // 4 * 4
    return (data[:2], tuple(types))


def main():
    os.makedirs(OUT, exist_ok=True)
    server_port, proxy_port = free_udp_port(), free_udp_port()
    turnserver = subprocess.Popen(
        [
            "turnserver", "-n", "--no-cli", "--no-tls", "--no-dtls", "--no-tcp",
            "--listening-ip=127.0.0.1", "--relay-ip=127.0.0.1",
            f"--listening-port={server_port}", "--allow-loopback-peers",
            "--use-auth-secret", f"--static-auth-secret={SECRET}", "--realm=callgate",
            "--min-port=40000", "--max-port=40999", "--log-file=stdout",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    seen, stop = set(), threading.Event()
    t = threading.Thread(target=proxy, args=(proxy_port, server_port, seen, stop), daemon=True)
    t.start()
    time.sleep(1)
    base = ["turnutils_uclient", "-n", "3", "-m", "1", "-l", "120", "-u", "seed",
            "-W", SECRET, "-p", str(proxy_port)]
    modes = [[], ["-y"], ["-c"], ["-c", "-y"], ["-g"], ["-y", "-g"]]
    try:
        for extra in modes:
            subprocess.run(base + extra + ["127.0.0.1"], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=30, check=False)
    finally:
        stop.set()
        turnserver.terminate()
        turnserver.wait()
    kept = {}
    for data in sorted(seen):
        kept.setdefault(shape(data), []).append(data)
    written = 0
    for same in kept.values():
        for data in same[:3]:  # a few of each shape, not thousands of Send indications
            with open(os.path.join(OUT, hashlib.sha1(data).hexdigest()), "wb") as f:
                f.write(data)
            written += 1
    print(f"{written} client messages of {len(kept)} shapes in {OUT}", file=sys.stderr)
    return 0 if seen else 1


if __name__ == "__main__":
    sys.exit(main())
