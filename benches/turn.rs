//! Benchmarks of the TURN front layer's per-packet and per-request work, without sockets:
//! ChannelData pass-through (the media hot path), STUN request inspection and authentication,
//! REST credential generation and checking, and the peer policy.
//!
//! Run with `cargo bench --bench turn`. On a shared machine, `cargo bench --profile dev --bench turn
//! -- --quick` gives a fast (unoptimised, so only relative) reading.

use std::hint::black_box;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use callgate::turn::credentials::long_term_key;
use callgate::turn::front::{FrontShared, Inbound};
use callgate::turn::gate::{Gate, GateRules, GateShared};
use callgate::turn::inspect::{
    self, attr, encode_xor_address, integrity_key, method, Class, StunWriter,
};
use callgate::turn::jumbo::JumboTable;
use callgate::turn::peer::PeerSockets;
use callgate::turn::quota::Transport;
use callgate::turn::reservation::{PortReservations, ReservedSlot};
use callgate::turn::{PeerPolicy, TurnCredentials, TurnStats};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

const REALM: &str = "callgate";

/// A gate and the listeners' shared state, as a UDP front holds them.
fn gate() -> (Gate, FrontShared) {
    let stats = Arc::new(TurnStats::default());
    let reservations = Arc::new(PortReservations::new(
        callgate::turn::reservation::loopback(),
        65535,
        0,
    ));
    let relayed = Arc::default();
    let shared = GateShared::new(
        GateRules {
            realm: REALM.into(),
            credentials: TurnCredentials::new(&["bench-secret"]).unwrap(),
            policy: PeerPolicy::default(),
            user_quota: 10,
            total_quota: 10_000,
            allocations_per_ip: 10_000,
            unauthenticated_per_ip_per_sec: 1_000_000,
            relay_ips: callgate::turn::reservation::loopback(),
            max_permissions_per_allocation: 64,
        },
        Arc::clone(&stats),
        Arc::clone(&relayed),
        Arc::clone(&reservations) as _,
    );
    let front = FrontShared {
        gate: Arc::clone(&shared),
        jumbo: Arc::new(JumboTable::new(Arc::new(PeerSockets::new(relayed)))),
        reservations,
        stats,
    };
    (Gate::new(shared, Transport::Udp), front)
}

fn channel_data(len: usize) -> Vec<u8> {
    let mut v = vec![0x40, 0x00];
    v.extend_from_slice(&(len as u16).to_be_bytes());
    v.resize(4 + len, 0xab);
    v
}

fn signed_request(method: u16, creds: &TurnCredentials, peer: Option<SocketAddr>) -> Vec<u8> {
    let c = creds.issue("bench-user", SystemTime::now(), Duration::from_secs(3600));
    let tid = [3u8; 12];
    let mut w = StunWriter::new(method, Class::Request, tid);
    if let Some(p) = peer {
        w.attribute(attr::XOR_PEER_ADDRESS, &encode_xor_address(p, &tid));
    }
    w.attribute(attr::USERNAME, c.username.as_bytes());
    w.attribute(attr::REALM, REALM.as_bytes());
    w.attribute(attr::NONCE, b"nonce-not-primed");
    w.finish_with_integrity(&integrity_key(&long_term_key(
        &c.username,
        REALM,
        &c.password,
    )))
}

fn front_layer(c: &mut Criterion) {
    let (g, front) = gate();
    let slot = ReservedSlot::default();
    let src: SocketAddr = "198.51.100.7:40000".parse().unwrap();
    let local: SocketAddr = "192.0.2.1:3478".parse().unwrap();
    let mut group = c.benchmark_group("front/channel_data_inbound");
    for len in [160usize, 1200] {
        let packet = channel_data(len);
        group.throughput(Throughput::Bytes(len as u64));
        group.bench_with_input(BenchmarkId::from_parameter(len), &packet, |b, p| {
            b.iter(|| {
                let v = front.inbound(&g, black_box(p), src, local, &slot);
                assert!(matches!(v, Inbound::Engine(_)));
            })
        });
    }
    group.finish();

    let packet = channel_data(1200);
    c.bench_function("front/channel_data_outbound", |b| {
        b.iter(|| front.outbound(&g, black_box(&packet), src, local, || unreachable!()))
    });

    // A Send indication: parsed in full by the gate (the relay's slow data path, ChannelData's
    // twin for clients without channels).
    let tid = [5u8; 12];
    let mut w = StunWriter::new(method::SEND, Class::Indication, tid);
    w.attribute(
        attr::XOR_PEER_ADDRESS,
        &encode_xor_address("8.8.8.8:5000".parse().unwrap(), &tid),
    );
    w.attribute(0x0013, &[0xab; 160]);
    let send = w.finish();
    c.bench_function("front/send_indication_inbound", |b| {
        b.iter(|| {
            let v = front.inbound(&g, black_box(&send), src, local, &slot);
            assert!(matches!(v, Inbound::Engine(_)));
        })
    });

    let creds = TurnCredentials::new(&["bench-secret"]).unwrap();
    let perm = signed_request(
        method::CREATE_PERMISSION,
        &creds,
        Some("8.8.8.8:5000".parse().unwrap()),
    );
    c.bench_function("front/inspect_create_permission", |b| {
        b.iter(|| inspect::inspect(black_box(&perm)).unwrap())
    });
    let parsed = inspect::StunMessage::parse(&perm).unwrap();
    let c0 = creds.issue("bench-user", SystemTime::now(), Duration::from_secs(3600));
    let key = integrity_key(&long_term_key(&c0.username, REALM, &c0.password));
    c.bench_function("front/verify_message_integrity", |b| {
        b.iter(|| black_box(&parsed).integrity_matches(&key))
    });
    // The whole authenticated path minus the nonce check (unprimed gates answer 438 after
    // parsing; this measures parse + nonce lookup + reply encoding, the unauthenticated cost).
    c.bench_function("front/unauthenticated_request_reply", |b| {
        let (g, _) = gate();
        let unsigned = Gate::priming_request();
        b.iter(|| {
            g.inbound(
                black_box(&unsigned),
                src,
                local,
                SystemTime::now(),
                Instant::now(),
            )
        })
    });
}

fn credentials(c: &mut Criterion) {
    let creds = TurnCredentials::new(&["new-secret", "old-secret"]).unwrap();
    let now = SystemTime::now();
    c.bench_function("credentials/issue", |b| {
        b.iter(|| creds.issue(black_box("caller-1234"), now, Duration::from_secs(3600)))
    });
    let issued = creds.issue("caller-1234", now, Duration::from_secs(3600));
    c.bench_function("credentials/check_password", |b| {
        b.iter(|| creds.check_password(black_box(&issued.username), &issued.password, now))
    });
    c.bench_function("credentials/long_term_key", |b| {
        b.iter(|| long_term_key(black_box(&issued.username), REALM, &issued.password))
    });
}

fn policy(c: &mut Criterion) {
    let default = PeerPolicy::default();
    let configured = PeerPolicy {
        allowed: (0..8)
            .map(|i| format!("203.0.{i}.0/24").parse().unwrap())
            .collect(),
        denied: (0..8)
            .map(|i| format!("198.18.{i}.0/24").parse().unwrap())
            .collect(),
        allow_private_peers: false,
    };
    let mut group = c.benchmark_group("policy/check");
    for addr in [
        "8.8.8.8",
        "169.254.169.254",
        "::ffff:127.0.0.1",
        "2001:4860::8888",
        "64:ff9b::a9fe:a9fe",
    ] {
        let ip: IpAddr = addr.parse().unwrap();
        group.bench_with_input(BenchmarkId::new("default", addr), &ip, |b, ip| {
            b.iter(|| default.check(black_box(*ip)))
        });
        group.bench_with_input(BenchmarkId::new("16_ranges", addr), &ip, |b, ip| {
            b.iter(|| configured.check(black_box(*ip)))
        });
        let compiled = configured.compile();
        group.bench_with_input(
            BenchmarkId::new("16_ranges_compiled", addr),
            &ip,
            |b, ip| b.iter(|| compiled.check(black_box(*ip))),
        );
    }
    // What a relay socket checks for every datagram it sends (peer.rs), with the relay's own
    // address known.
    let compiled = default.compile();
    compiled.set_own_addresses(callgate::turn::policy::OwnAddresses::new(
        ["192.0.2.1".parse().unwrap()],
        ["192.0.2.1".parse().unwrap()],
        ["0.0.0.0:3478".parse().unwrap()],
    ));
    for addr in ["8.8.8.8:5000", "[2001:4860::8888]:5000"] {
        let peer: SocketAddr = addr.parse().unwrap();
        group.bench_with_input(BenchmarkId::new("per_datagram", addr), &peer, |b, p| {
            b.iter(|| compiled.check_peer(black_box(*p), |_| false))
        });
    }
    group.finish();
}

/// A relayed frame queued towards a TCP/TLS client and taken by its writer: the byte-bounded
/// queue beside the frame-counted tokio channel it replaced (same run, same frame).
fn stream_queue(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let frame = channel_data(1200);
    let (queue, mut rx) = callgate::turn::write_queue::channel(
        callgate::turn::write_queue::DEFAULT_WRITE_QUEUE_BYTES,
        Arc::new(TurnStats::default()),
    );
    c.bench_function("stream/write_queue_push_recv", |b| {
        b.iter(|| {
            queue.push(black_box(frame.clone()));
            rt.block_on(rx.recv())
        })
    });
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(256);
    c.bench_function("stream/frame_counted_mpsc_try_send_recv", |b| {
        b.iter(|| {
            let _ = tx.try_send(black_box(frame.clone()));
            rt.block_on(rx.recv())
        })
    });
}

criterion_group!(benches, front_layer, credentials, policy, stream_queue);
criterion_main!(benches);
