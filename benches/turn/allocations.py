#!/usr/bin/env python3
"""Opens N UDP TURN allocations against a server and holds them until stdin closes.

    allocations.py PORT N MODE SECRET      MODE: alloc | perm | chan

Unlike turnutils_uclient, every allocation is made exactly once (no retransmitted Allocate that
leaves a second allocation behind) and the state per allocation is chosen: `alloc` only
allocates; `perm` adds one CreatePermission; `chan` adds one ChannelBind (which also installs the
permission) and sends one 100-byte ChannelData. Allocations are paired (2k <-> 2k+1): each one's
peer is the other's relayed address. REST credentials: base64(HMAC-SHA1(SECRET, "expiry:user")).
Prints "ready N" once everything is set up. Standard library only.
"""
import base64
import hashlib
import hmac
import os
import socket
import struct
import sys
import time

COOKIE = 0x2112A442
ALLOCATE, CREATE_PERMISSION, CHANNEL_BIND = 0x0003, 0x0008, 0x0009
USERNAME, MESSAGE_INTEGRITY, ERROR_CODE, CHANNEL_NUMBER = 0x0006, 0x0008, 0x0009, 0x000C
XOR_PEER_ADDRESS, REALM, NONCE, XOR_RELAYED_ADDRESS, REQUESTED_TRANSPORT = (
    0x0012, 0x0014, 0x0015, 0x0016, 0x0019)


def attr(kind, value):
    return struct.pack("!HH", kind, len(value)) + value + b"\0" * ((4 - len(value) % 4) % 4)


def xor_address(ip, port):
    xip = bytes(a ^ b for a, b in zip(socket.inet_aton(ip), struct.pack("!I", COOKIE)))
    return struct.pack("!BBH", 0, 1, port ^ (COOKIE >> 16)) + xip


def parse_xor_address(v):
    port = struct.unpack("!H", v[2:4])[0] ^ (COOKIE >> 16)
    ip = bytes(a ^ b for a, b in zip(v[4:8], struct.pack("!I", COOKIE)))
    return socket.inet_ntoa(ip), port


def message(kind, attrs, key=None):
    tid = os.urandom(12)
    body = b"".join(attrs)
    if key:
        header = struct.pack("!HHI", kind, len(body) + 24, COOKIE) + tid
        body += attr(MESSAGE_INTEGRITY, hmac.new(key, header + body, hashlib.sha1).digest())
    return struct.pack("!HHI", kind, len(body), COOKIE) + tid + body


def parse(data):
    kind, length, _ = struct.unpack("!HHI", data[:8])
    attrs, i = {}, 20
    while i < 20 + length:
        t, n = struct.unpack("!HH", data[i:i + 4])
        attrs[t] = data[i + 4:i + 4 + n]
        i += 4 + n + ((4 - n % 4) % 4)
    return kind, attrs


def error_code(attrs):
    v = attrs.get(ERROR_CODE, b"\0\0\0\0")
    return v[2] * 100 + v[3]


def main():
    port, n, mode, secret = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    server = ("127.0.0.1", port)
    user = f"{int(time.time()) + 86400}:allocations"
    password = base64.b64encode(
        hmac.new(secret.encode(), user.encode(), hashlib.sha1).digest()).decode()
    realm = nonce = key = None

    def transact(sock, msg):
        for _ in range(10):
            sock.sendto(msg, server)
            try:
                return parse(sock.recv(2048))
            except socket.timeout:
                continue
        sys.exit("no answer from the server")

    def authenticated(sock, kind, attrs):
        nonlocal nonce
        while True:
            extra = [attr(USERNAME, user.encode()), attr(REALM, realm), attr(NONCE, nonce)]
            answer, got = transact(sock, message(kind, attrs + extra, key))
            if answer & 0x0110 == 0x0100:
                return got
            if error_code(got) == 438:  # stale nonce: retry with the new one
                nonce = got[NONCE]
                continue
            sys.exit(f"request {kind:#06x} refused with {error_code(got)}")

    transport = attr(REQUESTED_TRANSPORT, bytes([17, 0, 0, 0]))
    sockets, relayed = [], []
    for _ in range(n):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(0.5)
        if nonce is None:
            _, got = transact(sock, message(ALLOCATE, [transport]))
            realm, nonce = got[REALM], got[NONCE]
            key = hashlib.md5(f"{user}:".encode() + realm + f":{password}".encode()).digest()
        got = authenticated(sock, ALLOCATE, [transport])
        relayed.append(parse_xor_address(got[XOR_RELAYED_ADDRESS]))
        sockets.append(sock)
    if mode in ("perm", "chan"):
        for i, sock in enumerate(sockets):
            peer = relayed[i ^ 1] if i ^ 1 < n else relayed[i]
            attrs = [attr(XOR_PEER_ADDRESS, xor_address(*peer))]
            if mode == "chan":
                attrs.append(attr(CHANNEL_NUMBER, struct.pack("!HH", 0x4000, 0)))
            authenticated(sock, CHANNEL_BIND if mode == "chan" else CREATE_PERMISSION, attrs)
        if mode == "chan":
            for sock in sockets:
                sock.sendto(struct.pack("!HH", 0x4000, 100) + b"x" * 100, server)
    print("ready", len(sockets), flush=True)
    sys.stdin.read()


if __name__ == "__main__":
    main()
