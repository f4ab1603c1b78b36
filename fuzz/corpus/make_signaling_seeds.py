#!/usr/bin/env python3
"""Writes seed corpora for signaling_message (client messages as the web app sends them, from
docs/PROTOCOL.md and the integration tests) and ws_frame (the same messages framed and masked as a
browser sends them: whole, fragmented, with pings, pongs and a close). Run from anywhere."""
import hashlib, json, os, struct

here = os.path.dirname(os.path.abspath(__file__))
SDP = ("v=0\r\no=- 4611731400430051336 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n"
       "a=group:BUNDLE 0 1\r\na=extmap-allow-mixed\r\na=msid-semantic: WMS\r\n"
       "m=audio 9 UDP/TLS/RTP/SAVPF 111 63 9 0 8 13 110 126\r\nc=IN IP4 0.0.0.0\r\n"
       "a=rtcp:9 IN IP4 0.0.0.0\r\na=ice-ufrag:9DfZ\r\na=ice-pwd:c4Tm5u8Tpn3ZKo0m3s1lG4Wq\r\n"
       "a=ice-options:trickle\r\na=fingerprint:sha-256 3B:2F:8E:91:5C:7A:AA:01:9E:5D:7C:62:"
       "0B:14:9F:6A:3E:21:D0:88:4B:6F:17:C2:51:E9:0A:33:7D:85:C4:16\r\na=setup:actpass\r\n"
       "a=mid:0\r\na=sendrecv\r\na=rtpmap:111 opus/48000/2\r\na=fmtp:111 minptime=10;useinbandfec=1\r\n")
CANDIDATE = {"candidate": "candidate:842163049 1 udp 1677729535 203.0.113.7 46154 typ srflx "
             "raddr 0.0.0.0 rport 0 generation 0 ufrag 9DfZ network-cost 999",
             "sdpMid": "0", "sdpMLineIndex": 0, "usernameFragment": "9DfZ"}
MESSAGES = [
    {"type": "ping"},
    {"type": "pong"},
    {"type": "video-offer-request", "id": 111111111, "calleeId": 222222222,
     "offer": {"type": "offer", "sdp": SDP}},
    {"type": "client-reply", "reply": "1", "id": 222222222, "callerId": 111111111,
     "answer": {"type": "answer", "sdp": SDP}},
    {"type": "client-reply", "reply": "0", "id": 222222222, "callerId": 111111111, "answer": None},
    {"type": "ice-candidate", "id": 111111111, "clientId": 222222222, "candidate": CANDIDATE},
    {"type": "close-call-client", "id": 111111111, "clientId": 222222222},
    {"type": "cancel", "id": 111111111, "clientId": 222222222},
    {"type": "offer", "id": 111111111, "clientId": 222222222, "offer": {"type": "offer", "sdp": SDP}},
    {"type": "answer", "id": 222222222, "clientId": 111111111, "answer": {"type": "answer", "sdp": SDP}},
    {"type": "normal", "id": 111111111, "message": "hello \u00e9\\n \"quoted\""},
    {"type": "resume", "id": 111111111, "token": "Wj8hbKq3Vt0yQ7n2LmA5xw"},
    {"type": "resume", "id": 111111111, "token": "Wj8hbKq3Vt0yQ7n2LmA5xw", "last_seq": 41},
    {"type": "ack", "seq": 41},
]

def write(target, data):
    os.makedirs(os.path.join(here, target), exist_ok=True)
    with open(os.path.join(here, target, hashlib.sha1(data).hexdigest()), "wb") as f:
        f.write(data)

def frame(opcode, payload, fin=True, mask=b"\x1f\x8b\x3c\x5e"):
    head = bytes([(0x80 if fin else 0) | opcode])
    n = len(payload)
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + struct.pack(">H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack(">Q", n)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))

for m in MESSAGES:
    text = json.dumps(m, separators=(",", ":"), ensure_ascii=False).encode()
    write("signaling_message", text)
    if len(text) <= 150:  # ws_frame's limit is 200 bytes: short messages whole, plus a split
        write("ws_frame", b"\x05" + frame(1, text))
    half = len(text) // 2
    write("ws_frame", b"\x2a" + frame(1, text[:60], fin=False) + frame(9, b"hb")
          + frame(0, text[60:120], fin=True))
write("ws_frame", b"\x00" + frame(9, b"") + frame(10, b"1701") + frame(8, struct.pack(">H", 1000) + b"bye"))
write("ws_frame", b"\x03" + frame(2, bytes(range(40))) + frame(8, b""))
write("ws_frame", b"\x09" + frame(1, b"x" * 300) + frame(1, b'{"type":"ping"}'))
write("signaling_message", b'{"type":"ping","nested":' + b"[" * 40 + b"]" * 40 + b"}")
write("signaling_message", b'  {"type":"normal","id":"111111111","message":123}')
print("written")
