//! Benchmarks of the signaling hot paths, without sockets: what one text frame costs from the
//! moment the session hands it to the hub until the ready-to-send frame sits in the peer's outbox.
//!
//! Every hub bench runs against a single node's [`Router`] (memory registry, no bus) over the real outboxes the sessions use, holding [`CLIENTS`] registered clients (half of them paired in calls), and each
//! iteration moves to another pair so the routing table is not artificially hot in cache. SDP
//! payloads are 1, 3 and 10 KB of realistic text (JSON-escaped `\r\n`, candidates, fingerprints).
//!
//! | group | what one iteration is |
//! |---|---|
//! | `wire` | reading one masked client frame (header, payload, unmasking) and encoding + writing one server frame |
//! | `parse` | `protocol::parse` of one client message (shape check + serde, borrowed payload) |
//! | `hub` | `Router::handle_text` of one message (parse, rules, routing, serialise, push) + the peer's pop; `offer-acked` with a receiver that opted in to `seq` and acks every 16 messages, as the web app does |
//! | `call` | a whole call set-up and tear-down: `video-offer-request`, `client-reply`, `close-call-client` |
//! | `routing` | offers through one shared hub from 1, 2 and 4 threads at once (shard lock contention) |
//! | `resume` | a dropped client, N 1 KB messages queued for it, a new connection resuming the ID |
//!
//! `cargo bench --bench signaling` measures; `cargo test --all-targets` runs each bench once
//! (criterion's test mode) to prove it still works. No timing is ever asserted.

use std::time::{Duration, Instant};

use bytes::Bytes;
use callgate::signaling::bus::NoBus;
use callgate::signaling::connections::Joining;
use callgate::signaling::hub::{Attachment, Departure};
use callgate::signaling::outbox::{self, OutboxReceiver, OutboxSender};
use callgate::signaling::protocol;
use callgate::signaling::registry::{ready, MemoryRegistry};
use callgate::signaling::router::Router;
use callgate::signaling::wire::{FrameReader, OpCode, Outgoing};
use callgate::signaling::SignalingLimits;
use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};

/// Registered clients in every hub fixture: "thousands", as on a busy instance.
const CLIENTS: usize = 10_000;

/// SDP sizes (bytes of the whole JSON payload object) every SDP-carrying message is measured at.
const SDP_SIZES: [usize; 3] = [1024, 3 * 1024, 10 * 1024];

type BenchHub = Router<MemoryRegistry, NoBus, OutboxSender>;

/// One registered client: its standing with the hub and the far end of its outbox.
struct Client {
    attachment: Attachment,
    outbox: OutboxReceiver,
    /// The resume token from the last `id` message.
    token: String,
    /// Frames popped so far (for a client that acks: the last `seq` it processed).
    seq: u64,
}

impl Client {
    fn id(&self) -> u64 {
        self.attachment.id().get()
    }

    /// Pops one frame, as the session's writer would; panics if there is none (a bench bug).
    fn pop(&mut self) -> Bytes {
        self.seq += 1;
        self.outbox
            .try_recv()
            .expect("a frame for this client")
            .bytes
    }
}

/// A hub with `n` registered clients; the first `paired` of them are in calls two by two
/// (client 2k with 2k+1). Every `id` and set-up frame has been drained.
fn fixture(n: usize, paired: usize) -> (BenchHub, Vec<Client>) {
    fixture_with(n, paired, Joining::default())
}

/// [`fixture`] with every client joining as `joining` says (e.g. opted in to acks).
fn fixture_with(n: usize, paired: usize, joining: Joining) -> (BenchHub, Vec<Client>) {
    let limits = SignalingLimits::default();
    assert!(
        limits.max_clients >= 2 * n,
        "room for the clients and the resume bench's extras"
    );
    let hub = Router::single_node(limits);
    let now = Instant::now();
    let mut clients: Vec<Client> = (0..n)
        .map(|_| {
            let (tx, mut rx) = outbox::channel(128);
            let attachment = ready(hub.join(tx, None, joining, now)).expect("room");
            let token = token_of(&rx.try_recv().expect("id message").bytes);
            Client {
                attachment,
                outbox: rx,
                token,
                seq: 0,
            }
        })
        .collect();
    let offer = sdp("offer", 1024);
    for pair in clients[..paired].chunks_exact_mut(2) {
        let [a, b] = pair else { unreachable!() };
        let request = format!(
            r#"{{"type":"video-offer-request","id":{},"calleeId":{},"offer":{offer}}}"#,
            a.id(),
            b.id()
        );
        expect_ok(ready(hub.handle_text(
            &mut a.attachment,
            request.as_bytes(),
            now,
        )));
        b.pop();
        let reply = format!(
            r#"{{"type":"client-reply","reply":"1","id":{},"callerId":{},"answer":{offer}}}"#,
            b.id(),
            a.id()
        );
        expect_ok(ready(hub.handle_text(
            &mut b.attachment,
            reply.as_bytes(),
            now,
        )));
        a.pop();
    }
    (hub, clients)
}

fn expect_ok(outcome: callgate::signaling::hub::Outcome) {
    assert_eq!(outcome.error, None, "the bench sent a refused message");
}

/// A session description as browsers send it, `{"type":"offer","sdp":"v=0\r\n..."}`, padded
/// with realistic media lines to about `size` bytes of JSON.
fn sdp(kind: &str, size: usize) -> String {
    let mut sdp = String::from(
        "v=0\\r\\no=- 4611731400430051336 2 IN IP4 127.0.0.1\\r\\ns=-\\r\\nt=0 0\\r\\n\
         a=group:BUNDLE 0 1\\r\\na=extmap-allow-mixed\\r\\na=msid-semantic: WMS stream\\r\\n",
    );
    let lines = [
        "m=video 9 UDP/TLS/RTP/SAVPF 96 97 102 103 104 105 106 107 108 109 127 125 39 40 45 46 98 99 100 101 112 113 116 117 118\\r\\n",
        "c=IN IP4 0.0.0.0\\r\\na=rtcp:9 IN IP4 0.0.0.0\\r\\na=ice-ufrag:Xk2f\\r\\na=ice-pwd:8Zq3bW7yV1nT4kR9mJ2pL6sD\\r\\n",
        "a=fingerprint:sha-256 4A:AD:B9:B1:3F:82:18:3B:54:02:12:DF:3E:5D:49:6B:19:E5:7C:AB:3C:4B:9F:50:8D:E8:12:7B:7A:0E:44:33\\r\\n",
        "a=setup:actpass\\r\\na=mid:1\\r\\na=sendrecv\\r\\na=rtcp-mux\\r\\na=rtcp-rsize\\r\\n",
        "a=rtpmap:96 VP8/90000\\r\\na=rtcp-fb:96 goog-remb\\r\\na=rtcp-fb:96 transport-cc\\r\\na=rtcp-fb:96 ccm fir\\r\\na=rtcp-fb:96 nack\\r\\n",
        "a=candidate:1467250027 1 udp 2122260223 192.168.1.20 46243 typ host generation 0 network-id 1\\r\\n",
        "a=fmtp:102 level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42001f\\r\\n",
        "a=ssrc:3735928559 cname:kLq9Xw2vB7nP3tYz\\r\\na=ssrc:3735928559 msid:stream track-video\\r\\n",
    ];
    let overhead = r#"{"type":"offer","sdp":""}"#.len();
    let mut i = 0;
    while sdp.len() + overhead < size {
        sdp.push_str(lines[i % lines.len()]);
        i += 1;
    }
    sdp.truncate(size.saturating_sub(overhead));
    // Never end inside an escape sequence.
    while sdp.ends_with('\\') {
        sdp.pop();
    }
    format!(r#"{{"type":"{kind}","sdp":"{sdp}"}}"#)
}

fn kib(size: usize) -> String {
    format!("{}KB", size / 1024)
}

/// A masked client text frame carrying `payload`, as a browser sends it.
fn client_frame(payload: &[u8]) -> Vec<u8> {
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    let mut frame = vec![0x81];
    match payload.len() {
        n if n < 126 => frame.push(0x80 | n as u8),
        n => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
    }
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

fn wire(c: &mut Criterion) {
    let mut group = c.benchmark_group("wire");
    let waker = std::task::Waker::noop();
    for size in SDP_SIZES {
        let message = format!(
            r#"{{"type":"offer","clientId":123456789,"offer":{}}}"#,
            sdp("offer", size)
        );
        let frame = client_frame(message.as_bytes());
        group.throughput(Throughput::Bytes(frame.len() as u64));
        group.bench_with_input(BenchmarkId::new("read", kib(size)), &frame, |b, frame| {
            let mut cx = std::task::Context::from_waker(waker);
            b.iter(|| {
                let mut reader = FrameReader::new(64 * 1024);
                let mut io: &[u8] = frame;
                match reader.poll_frame(&mut io, &mut cx) {
                    std::task::Poll::Ready(Ok(frame)) => frame,
                    other => panic!("a whole frame was in memory: {other:?}"),
                }
            })
        });
        group.bench_with_input(
            BenchmarkId::new("write", kib(size)),
            &message,
            |b, message| {
                let mut cx = std::task::Context::from_waker(waker);
                let mut sink = tokio::io::sink();
                b.iter(|| {
                    let mut out = Outgoing::default();
                    out.push(OpCode::Text, message.as_bytes());
                    assert!(out.poll_send(&mut sink, &mut cx).is_ready());
                })
            },
        );
    }
    group.finish();
}

fn parse(c: &mut Criterion) {
    let mut group = c.benchmark_group("parse");
    for size in SDP_SIZES {
        let frame = format!(
            r#"{{"type":"offer","clientId":123456789,"offer":{}}}"#,
            sdp("offer", size)
        );
        group.throughput(Throughput::Bytes(frame.len() as u64));
        group.bench_with_input(BenchmarkId::new("offer", kib(size)), &frame, |b, frame| {
            b.iter(|| protocol::parse(frame.as_bytes(), 32).expect("valid"))
        });
        let frame = format!(
            r#"{{"type":"video-offer-request","id":111111111,"calleeId":123456789,"offer":{}}}"#,
            sdp("offer", size)
        );
        group.bench_with_input(
            BenchmarkId::new("video-offer-request", kib(size)),
            &frame,
            |b, frame| b.iter(|| protocol::parse(frame.as_bytes(), 32).expect("valid")),
        );
    }
    let frame = ice_candidate(123456789);
    group.throughput(Throughput::Bytes(frame.len() as u64));
    group.bench_function("ice-candidate", |b| {
        b.iter(|| protocol::parse(frame.as_bytes(), 32).expect("valid"))
    });
    group.finish();
}

fn ice_candidate(to: u64) -> String {
    format!(
        r#"{{"type":"ice-candidate","clientId":{to},"candidate":{{"candidate":"candidate:1467250027 1 udp 2122260223 192.168.1.20 46243 typ host generation 0 ufrag Xk2f network-id 1","sdpMid":"0","sdpMLineIndex":0,"usernameFragment":"Xk2f"}}}}"#
    )
}

/// Relayed messages between call peers, one `handle_text` plus the receiver's pop per iteration,
/// rotating over all pairs.
fn hub(c: &mut Criterion) {
    let (hub, mut clients) = fixture(CLIENTS, CLIENTS);
    let pairs = CLIENTS / 2;
    let mut group = c.benchmark_group("hub");
    for size in SDP_SIZES {
        for kind in ["offer", "answer"] {
            // Pre-built frames, one per pair (A → B): building them is not the server's work.
            let frames: Vec<String> = (0..pairs)
                .map(|p| {
                    let to = clients[2 * p + 1].id();
                    format!(
                        r#"{{"type":"{kind}","clientId":{to},"{kind}":{}}}"#,
                        sdp(kind, size)
                    )
                })
                .collect();
            group.throughput(Throughput::Bytes(frames[0].len() as u64));
            let mut next = 0;
            group.bench_function(BenchmarkId::new(kind, kib(size)), |b| {
                b.iter(|| {
                    let p = next % pairs;
                    next += 1;
                    let (a, rest) = clients[2 * p..].split_first_mut().expect("pair");
                    expect_ok(ready(hub.handle_text(
                        &mut a.attachment,
                        frames[p].as_bytes(),
                        Instant::now(),
                    )));
                    rest[0].pop()
                })
            });
        }
    }
    let frames: Vec<String> = (0..pairs)
        .map(|p| ice_candidate(clients[2 * p + 1].id()))
        .collect();
    group.throughput(Throughput::Bytes(frames[0].len() as u64));
    let mut next = 0;
    group.bench_function("ice-candidate", |b| {
        b.iter(|| {
            let p = next % pairs;
            next += 1;
            let (a, rest) = clients[2 * p..].split_first_mut().expect("pair");
            expect_ok(ready(hub.handle_text(
                &mut a.attachment,
                frames[p].as_bytes(),
                Instant::now(),
            )));
            rest[0].pop()
        })
    });
    // Answered on the sender's own outbox.
    group.throughput(Throughput::Elements(1));
    let mut next = 0;
    group.bench_function("ping", |b| {
        b.iter(|| {
            let client = &mut clients[next % CLIENTS];
            next += 1;
            expect_ok(ready(hub.handle_text(
                &mut client.attachment,
                br#"{"type":"ping"}"#,
                Instant::now(),
            )));
            client.pop()
        })
    });
    // Logged (no subscriber here, so this is the parse and the disabled-log check), never routed.
    let mut next = 0;
    group.bench_function("normal", |b| {
        b.iter(|| {
            let client = &mut clients[next % CLIENTS];
            next += 1;
            expect_ok(ready(hub.handle_text(
                &mut client.attachment,
                br#"{"type":"normal","message":"hello from the other side"}"#,
                Instant::now(),
            )))
        })
    });
    // A refused message: the error path (parse, rule check, error frame) must stay cheap too.
    // `not_in_call` is an ordinary race, not a violation, so it never closes the connection.
    let frames: Vec<String> = (0..pairs)
        .map(|p| {
            let stranger = clients[(2 * p + 3) % CLIENTS].id();
            format!(r#"{{"type":"ice-candidate","clientId":{stranger},"candidate":null}}"#)
        })
        .collect();
    let mut next = 0;
    group.bench_function("refused-not-in-call", |b| {
        b.iter(|| {
            let p = next % pairs;
            next += 1;
            let a = &mut clients[2 * p];
            let outcome =
                ready(hub.handle_text(&mut a.attachment, frames[p].as_bytes(), Instant::now()));
            assert_eq!(outcome.close, None);
            a.pop()
        })
    });
    group.finish();
    hub_acked(c);
}

/// 3 KB offers to receivers that opted in to `seq`: each message is numbered in place and held
/// (one refcount) until the receiver's ack, sent every 16 messages as the web app does.
fn hub_acked(c: &mut Criterion) {
    let acks = Joining {
        address: None,
        acks: true,
    };
    let (hub, mut clients) = fixture_with(CLIENTS, CLIENTS, acks);
    let pairs = CLIENTS / 2;
    let frames: Vec<String> = (0..pairs)
        .map(|p| {
            let to = clients[2 * p + 1].id();
            format!(
                r#"{{"type":"offer","clientId":{to},"offer":{}}}"#,
                sdp("offer", 3 * 1024)
            )
        })
        .collect();
    let mut group = c.benchmark_group("hub");
    group.throughput(Throughput::Bytes(frames[0].len() as u64));
    let mut next = 0;
    group.bench_function(BenchmarkId::new("offer-acked", "3KB"), |b| {
        b.iter(|| {
            // 16 messages to one receiver, which then acks (as the web app does), then the next
            // pair: every receiver's unacknowledged backlog stays within its budget.
            let p = (next / 16) % pairs;
            next += 1;
            let (a, rest) = clients[2 * p..].split_first_mut().expect("pair");
            expect_ok(ready(hub.handle_text(
                &mut a.attachment,
                frames[p].as_bytes(),
                Instant::now(),
            )));
            let receiver = &mut rest[0];
            let frame = receiver.pop();
            if receiver.seq % 16 == 0 {
                let ack = format!(r#"{{"type":"ack","seq":{}}}"#, receiver.seq);
                expect_ok(ready(hub.handle_text(
                    &mut receiver.attachment,
                    ack.as_bytes(),
                    Instant::now(),
                )));
            }
            frame
        })
    });
    group.finish();
}

/// Call set-up and tear-down with every SDP size: the state-changing messages.
fn call(c: &mut Criterion) {
    let (hub, mut clients) = fixture(CLIENTS, 0);
    let pairs = CLIENTS / 2;
    let mut group = c.benchmark_group("call");
    for size in SDP_SIZES {
        let offers: Vec<(String, String, String)> = (0..pairs)
            .map(|p| {
                let (a, b) = (clients[2 * p].id(), clients[2 * p + 1].id());
                (
                    format!(
                        r#"{{"type":"video-offer-request","id":{a},"calleeId":{b},"offer":{}}}"#,
                        sdp("offer", size)
                    ),
                    format!(
                        r#"{{"type":"client-reply","reply":"1","id":{b},"callerId":{a},"answer":{}}}"#,
                        sdp("answer", size)
                    ),
                    format!(r#"{{"type":"close-call-client","id":{a},"clientId":{b}}}"#),
                )
            })
            .collect();
        // Three messages per iteration: offer request, accept, hang up.
        group.throughput(Throughput::Elements(3));
        let mut next = 0;
        group.bench_function(BenchmarkId::new("setup-teardown", kib(size)), |bench| {
            bench.iter(|| {
                let p = next % pairs;
                next += 1;
                let (request, reply, hangup) = &offers[p];
                let (a, rest) = clients[2 * p..].split_first_mut().expect("pair");
                let b = &mut rest[0];
                let now = Instant::now();
                expect_ok(ready(hub.handle_text(
                    &mut a.attachment,
                    request.as_bytes(),
                    now,
                )));
                b.pop();
                expect_ok(ready(hub.handle_text(
                    &mut b.attachment,
                    reply.as_bytes(),
                    now,
                )));
                a.pop();
                expect_ok(ready(hub.handle_text(
                    &mut a.attachment,
                    hangup.as_bytes(),
                    now,
                )));
                b.pop()
            })
        });
    }
    group.finish();
}

/// Offers between call peers from several threads at once through one hub: the sharded directory
/// under contention. Each thread owns its own pairs (as each session owns its connection).
fn routing(c: &mut Criterion) {
    let (hub, mut clients) = fixture(CLIENTS, CLIENTS);
    let frames: Vec<String> = clients
        .chunks_exact(2)
        .map(|pair| {
            format!(
                r#"{{"type":"offer","clientId":{},"offer":{}}}"#,
                pair[1].id(),
                sdp("offer", 3 * 1024)
            )
        })
        .collect();
    let mut group = c.benchmark_group("routing");
    group.throughput(Throughput::Elements(1));
    for threads in [1usize, 2, 4] {
        group.bench_function(BenchmarkId::new("offer-3KB-threads", threads), |b| {
            b.iter_custom(|iters| {
                let per_thread = iters.div_ceil(threads as u64);
                let chunk = CLIENTS / threads;
                let start = Instant::now();
                std::thread::scope(|scope| {
                    for (t, mine) in clients.chunks_mut(chunk).enumerate() {
                        let hub = &hub;
                        let frames = &frames[t * chunk / 2..];
                        scope.spawn(move || {
                            let pairs = mine.len() / 2;
                            for i in 0..per_thread as usize {
                                let p = i % pairs;
                                let (a, rest) = mine[2 * p..].split_first_mut().expect("pair");
                                expect_ok(ready(hub.handle_text(
                                    &mut a.attachment,
                                    frames[p].as_bytes(),
                                    Instant::now(),
                                )));
                                rest[0].pop();
                            }
                        });
                    }
                });
                // Per message across all threads: wall time over the total sent.
                let elapsed = start.elapsed();
                elapsed.mul_f64(iters as f64 / (per_thread * threads as u64) as f64)
            })
        });
    }
    group.finish();
}

/// What a cluster node adds to every client message (`Router::handle_text` marks the message
/// on its way for a handover to wait for: one insert and one remove in a shared map); a single
/// node does none of it. Compare with `routing/offer-3KB-threads/1` of the same run.
fn marks(c: &mut Criterion) {
    use callgate::signaling::flushes::Flushes;
    use callgate::signaling::protocol::ClientId;
    let marks = Flushes::default();
    let mut group = c.benchmark_group("marks");
    group.throughput(Throughput::Elements(1));
    group.bench_function("message-on-its-way", |b| {
        let mut n = 100_000_000u64;
        b.iter(|| {
            n += 1;
            let id = ClientId::new(n % 10_000 + 100_000_000);
            let done = marks.start(id);
            marks.end(id, done);
        })
    });
    group.finish();
}

/// The resume path: B drops, A keeps sending 1 KB offers that queue for B's reserved ID, then a
/// new connection resumes B and receives its new `id` and the backlog.
fn resume(c: &mut Criterion) {
    let (hub, clients) = fixture(CLIENTS, CLIENTS);
    let mut pairs: Vec<(Client, Option<Client>)> = Vec::new();
    let mut clients = clients.into_iter();
    while let (Some(a), Some(b)) = (clients.next(), clients.next()) {
        pairs.push((a, Some(b)));
    }
    let frames: Vec<String> = pairs
        .iter()
        .map(|(_, b)| {
            let to = b.as_ref().expect("connected").id();
            format!(
                r#"{{"type":"offer","clientId":{to},"offer":{}}}"#,
                sdp("offer", 1024)
            )
        })
        .collect();
    let mut group = c.benchmark_group("resume");
    for queued in [1usize, 8, 64] {
        group.throughput(Throughput::Elements(queued as u64));
        let mut next = 0;
        let count = pairs.len();
        group.bench_function(BenchmarkId::new("queue-then-resume-1KB", queued), |bench| {
            bench.iter_batched(
                || {
                    // The reconnecting client's new socket, with its throwaway ID (not measured).
                    let p = next % count;
                    next += 1;
                    let (tx, mut rx) = outbox::channel(128);
                    let attachment = ready(hub.connect(tx, None, Instant::now())).expect("room");
                    let token = token_of(&rx.try_recv().expect("id message").bytes);
                    let fresh = Client {
                        attachment,
                        outbox: rx,
                        token,
                        seq: 0,
                    };
                    (p, fresh)
                },
                |(p, mut fresh)| {
                    let now = Instant::now();
                    let (a, slot) = &mut pairs[p];
                    let b = slot.take().expect("connected");
                    let (id, token) = (b.id(), b.token);
                    ready(hub.disconnect(b.attachment, Departure::Dropped, now));
                    for _ in 0..queued {
                        expect_ok(ready(hub.handle_text(
                            &mut a.attachment,
                            frames[p].as_bytes(),
                            now,
                        )));
                    }
                    let resume = format!(r#"{{"type":"resume","id":{id},"token":"{token}"}}"#);
                    expect_ok(ready(hub.handle_text(
                        &mut fresh.attachment,
                        resume.as_bytes(),
                        now,
                    )));
                    fresh.token = token_of(&fresh.pop());
                    for _ in 0..queued {
                        fresh.pop();
                    }
                    *slot = Some(fresh);
                },
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

fn token_of(id_frame: &[u8]) -> String {
    let value: serde_json::Value = serde_json::from_slice(id_frame).expect("id frame is JSON");
    value["token"].as_str().expect("token").to_owned()
}

/// TURN on the HTTPS port (issue 14): what routing adds. Per connection: reading the ClientHello's
/// ALPN and, without ALPN, the first bytes. Per forwarded WebSocket message: the HTTP side now
/// reads through `Prefixed` (the replay of the peeked bytes), compared here with reading directly.
fn https_port(c: &mut Criterion) {
    use callgate::http::proxy_protocol::Prefixed;
    use callgate::http::tls_route;
    use tokio::io::AsyncReadExt;

    let mut group = c.benchmark_group("https_port");
    let uclient: [&[u8]; 3] = [b"http/1.1", b"stun.turn", b"stun.nat-discovery"];
    group.bench_function("alpn-uclient", |b| {
        b.iter(|| tls_route::by_alpn(Some(std::hint::black_box(uclient).into_iter())))
    });
    let stun = [
        0u8, 1, 0, 0, 0x21, 0x12, 0xA4, 0x42, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,
    ];
    group.bench_function("sniff-stun", |b| {
        b.iter(|| tls_route::by_first_bytes(std::hint::black_box(&stun)))
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let message = client_frame(sdp("offer", 3 * 1024).as_bytes());
    let mut buf = vec![0u8; message.len()];
    group.throughput(Throughput::Elements(1));
    group.bench_function(BenchmarkId::new("ws-message-3KB", "direct"), |b| {
        b.iter(|| {
            let mut reader = std::hint::black_box(&message[..]);
            rt.block_on(reader.read_exact(&mut buf)).unwrap();
        })
    });
    group.bench_function(BenchmarkId::new("ws-message-3KB", "routed"), |b| {
        b.iter(|| {
            let mut reader =
                Prefixed::with_prefix(Bytes::new(), std::hint::black_box(&message[..]));
            rt.block_on(reader.read_exact(&mut buf)).unwrap();
        })
    });
    group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(50)
}

criterion_group! {
    name = benches;
    config = config();
    targets = wire, parse, hub, call, routing, marks, resume, https_port
}
criterion_main!(benches);
