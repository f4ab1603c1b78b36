#!/usr/bin/env python3
"""Captures seed corpora for stun_inspect and turn_framing from a real TURN client.

Sits between coturn's turnutils_uclient and a running callgate as a UDP and a TCP forwarder on
loopback and stores what passes: each datagram (both directions) as a stun_inspect seed, each TCP
direction's byte stream as a turn_framing seed. Usage (callgate's TURN port, e.g. 3478):

    capture_turn.py <turn-port> <listen-port> <secret>

then it runs uclient itself over UDP and over TCP through <listen-port>."""
import hashlib, os, socket, subprocess, sys, threading

turn_port, listen_port, secret = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
here = os.path.dirname(os.path.abspath(__file__))
seen = set()

def save(target, data, limit=1500):
    data = data[:limit]
    name = hashlib.sha1(data).hexdigest()
    if name in seen:
        return
    seen.add(name)
    os.makedirs(os.path.join(here, target), exist_ok=True)
    with open(os.path.join(here, target, name), "wb") as f:
        f.write(data)

def udp():
    front = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    front.bind(("127.0.0.1", listen_port))
    back = {}
    def pump(client, sock):
        while True:
            data = sock.recv(65536)
            save("stun_inspect", data)
            front.sendto(data, client)
    while True:
        data, client = front.recvfrom(65536)
        save("stun_inspect", data)
        if client not in back:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.connect(("127.0.0.1", turn_port))
            back[client] = sock
            threading.Thread(target=pump, args=(client, sock), daemon=True).start()
        back[client].send(data)

def tcp():
    front = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    front.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    front.bind(("127.0.0.1", listen_port))
    front.listen()
    def pipe(src, dst):
        stream = b""
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                stream += data
                dst.sendall(data)
        except OSError:
            pass
        save("turn_framing", stream, limit=4000)
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
    while True:
        conn, _ = front.accept()
        up = socket.create_connection(("127.0.0.1", turn_port))
        threading.Thread(target=pipe, args=(conn, up), daemon=True).start()
        threading.Thread(target=pipe, args=(up, conn), daemon=True).start()

threading.Thread(target=udp, daemon=True).start()
threading.Thread(target=tcp, daemon=True).start()
common = ["turnutils_uclient", "-y", "-n", "5", "-m", "1", "-l", "120", "-u", "seed", "-W", secret,
          "-p", str(listen_port)]
for extra in ([], ["-g"], ["-t"]):
    subprocess.run(common + extra + ["127.0.0.1"], stdout=subprocess.DEVNULL, timeout=60)
subprocess.run(["turnutils_stunclient", "-p", str(listen_port), "127.0.0.1"],
               stdout=subprocess.DEVNULL, timeout=30)
import time; time.sleep(1)
print(len(seen), "seeds")
