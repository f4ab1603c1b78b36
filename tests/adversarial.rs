//! The HTTPS edge under attack: each test drives the real server (real TLS, real sockets) the way an
//! attacker would and asserts two things: the attacker is cut off within its limit, and an honest
//! client on another address (127.0.0.2, which Linux loopback accepts as a source) is still served.
//! The honest client's latency is printed, never time-asserted.
//!
//! Tests here count the process's file descriptors, so they run one at a time (a shared lock);
//! every loop is bounded and the file stays well under two minutes in a debug build. The
//! signaling attacks live in tests/adversarial_signaling.rs.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use callgate::config::Seconds;
use common::*;
use hyper::StatusCode;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// One attack at a time: the descriptor counts must see only their own test.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The honest client's source address.
const HONEST: [u8; 4] = [127, 0, 0, 2];

/// A TCP connection to `to` from `from` (any port).
async fn tcp_from(from: [u8; 4], to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(IpAddr::from(from), 0))?;
    socket.connect(to).await
}

/// GET `path` over a fresh TLS connection from 127.0.0.2; returns the status and the latency.
async fn honest_get(server: &TestServer, path: &str) -> (StatusCode, Duration) {
    let started = Instant::now();
    let tcp = tcp_from(HONEST, server.addrs.https).await.unwrap();
    let tls = server
        .client(&[b"h2", b"http/1.1"])
        .connect(
            rustls::pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .expect("the honest client's handshake");
    let fetched = H1::over(tls).await.send(get(path)).await.unwrap();
    (fetched.status, started.elapsed())
}

/// Checks the honest client is served and prints its latency.
async fn honest_client_is_served(server: &TestServer, during: &str) {
    let (status, latency) = honest_get(server, "/healthz").await;
    assert_eq!(status, StatusCode::OK, "honest client during {during}");
    println!("honest client during {during}: served in {latency:?}");
}

/// Open descriptors of this process (client and server sides both live here).
fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Waits until `stream` is closed by the server (EOF or reset), reading and discarding what
/// arrives; `None` if it is still open after `limit`.
async fn closed_within<S: AsyncRead + Unpin>(stream: &mut S, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut buf = vec![0u8; 16 * 1024];
    tokio::time::timeout(limit, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return started.elapsed(),
                Ok(_) => {}
            }
        }
    })
    .await
    .ok()
}

/// An `h2` client over a TLS connection from `from`, advertising `window` as its stream window.
async fn h2_client(
    server: &TestServer,
    from: [u8; 4],
    window: u32,
) -> (
    h2::client::SendRequest<Bytes>,
    h2::client::Connection<tokio_rustls::client::TlsStream<TcpStream>, Bytes>,
) {
    let tcp = tcp_from(from, server.addrs.https).await.unwrap();
    let tls = server
        .client(&[b"h2"])
        .connect(
            rustls::pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    h2::client::Builder::new()
        .initial_window_size(window)
        .handshake(tls)
        .await
        .unwrap()
}

fn h2_get(path: &str) -> hyper::Request<()> {
    hyper::Request::get(format!("https://localhost{path}"))
        .body(())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_slowloris_connections_are_capped_per_address_and_cut() {
    let _serial = SERIAL.lock().await;
    let server = TestServer::start(|_, o| {
        o.connections_per_ip = Some(64);
        o.header_read_timeout = Some(Seconds(Duration::from_secs(3)));
        o.tls_handshake_timeout = Some(Seconds(Duration::from_secs(3)));
    })
    .await;
    // Open all 1,000 TCP connections first (the kernel completes them; the server admits or
    // closes each at accept), then try to speak TLS and dribble a request head on each.
    let mut sockets = Vec::new();
    for _ in 0..1000 {
        sockets.push(TcpStream::connect(server.addrs.https).await.unwrap());
    }
    let handshakes = Arc::new(AtomicUsize::new(0));
    let served = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut attackers = Vec::new();
    for tcp in sockets {
        let connector = server.client(&[b"http/1.1"]);
        let handshakes = handshakes.clone();
        let served = served.clone();
        attackers.push(tokio::spawn(async move {
            let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
            let Ok(Ok(mut tls)) =
                tokio::time::timeout(Duration::from_secs(20), connector.connect(name, tcp)).await
            else {
                return;
            };
            handshakes.fetch_add(1, Ordering::Relaxed);
            let head = format!(
                "GET / HTTP/1.1\r\nHost: localhost\r\nX-Pad: {}",
                "a".repeat(200)
            );
            for byte in head.bytes() {
                if tls.write_all(&[byte]).await.is_err() {
                    break;
                }
                let mut probe = [0u8; 512];
                match tokio::time::timeout(Duration::from_millis(100), tls.read(&mut probe)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => return,
                    Ok(Ok(n)) => {
                        if String::from_utf8_lossy(&probe[..n]).contains(" 200 ") {
                            served.fetch_add(1, Ordering::Relaxed);
                        }
                        return;
                    }
                    Err(_) => {}
                }
            }
        }));
    }
    honest_client_is_served(&server, "1,000 slowloris connections").await;
    for attacker in attackers {
        tokio::time::timeout(Duration::from_secs(30), attacker)
            .await
            .expect("every slowloris connection ends")
            .unwrap();
    }
    let elapsed = started.elapsed();
    let admitted = handshakes.load(Ordering::Relaxed);
    println!("slowloris: {admitted} of 1000 connections admitted, all cut after {elapsed:?}");
    assert!(
        admitted <= 64,
        "at most connections-per-ip (64) admitted, got {admitted}"
    );
    assert!(admitted > 0, "the cap admits up to 64");
    assert_eq!(
        served.load(Ordering::Relaxed),
        0,
        "no dribbled request is served"
    );
    assert!(
        elapsed < Duration::from_secs(15),
        "cut by the 3 s header timeout, not left open ({elapsed:?})"
    );
    let metrics = scrape_from(&server, [127, 0, 0, 3]).await;
    let refused = sample(
        &metrics,
        "callgate_rate_limited_total{limit=\"connections_per_ip\"}",
    )
    .unwrap();
    assert!(refused >= 936.0, "refusals are counted: {refused}");
    server.stop().await;
}

/// `/metrics` text fetched from source address `from`.
async fn scrape_from(server: &TestServer, from: [u8; 4]) -> String {
    let tcp = tcp_from(from, server.addrs.metrics.unwrap()).await.unwrap();
    let fetched = H1::over(tcp).await.send(get("/metrics")).await.unwrap();
    String::from_utf8(fetched.body.to_vec()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_listener_caps_connections_per_address() {
    let _serial = SERIAL.lock().await;
    let server = TestServer::start(|_, o| o.connections_per_ip = Some(3)).await;
    // Each listener is attacked from its own address, so no test waits for another's slots.
    for (listener, addr, attacker) in [
        ("redirect", server.addrs.http.unwrap(), [127, 0, 0, 10]),
        ("metrics", server.addrs.metrics.unwrap(), [127, 0, 0, 11]),
        ("https", server.addrs.https, [127, 0, 0, 12]),
    ] {
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(tcp_from(attacker, addr).await.unwrap());
        }
        let mut over = tcp_from(attacker, addr).await.unwrap();
        assert!(
            closed_within(&mut over, Duration::from_secs(5))
                .await
                .is_some(),
            "{listener}: the fourth connection from one address is closed at once"
        );
        for mut admitted in held {
            assert!(
                closed_within(&mut admitted, Duration::from_millis(100))
                    .await
                    .is_none(),
                "{listener}: the first three stay open"
            );
        }
        let mut other = tcp_from(HONEST, addr).await.unwrap();
        assert!(
            closed_within(&mut other, Duration::from_millis(300))
                .await
                .is_none(),
            "{listener}: another address is still admitted"
        );
    }
    honest_client_is_served(&server, "the per-address cap").await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_window_http2_clients_hold_no_descriptors_and_are_cut() {
    let _serial = SERIAL.lock().await;
    let server = TestServer::start(|_, o| {
        o.response_stall_timeout = Some(Seconds(Duration::from_secs(2)));
    })
    .await;
    let before = open_fds();
    let mut connections = Vec::new();
    for _ in 0..3 {
        let (mut sender, connection) = h2_client(&server, [127, 0, 0, 1], 0).await;
        let closed = tokio::spawn(async move {
            let started = Instant::now();
            let _ = connection.await;
            started.elapsed()
        });
        let mut pending = Vec::new();
        for _ in 0..100 {
            sender = sender.ready().await.unwrap();
            pending.push(
                sender
                    .send_request(h2_get("/scripts/client.js"), true)
                    .unwrap(),
            );
        }
        // Headers arrive (they are not flow-controlled); the bodies cannot. Every stream is
        // kept open: the responses (with their bodies) are held, never read.
        let mut responses = Vec::new();
        for (response, send) in pending {
            let response = tokio::time::timeout(Duration::from_secs(10), response)
                .await
                .expect("response headers")
                .unwrap();
            assert_eq!(response.status(), StatusCode::OK);
            responses.push((response, send));
        }
        connections.push((sender, responses, closed));
    }
    let during = open_fds();
    println!("zero-window: {before} descriptors before, {during} with 300 streams held");
    assert!(
        during < before + 40,
        "300 stalled streams must not hold a descriptor each ({before} -> {during})"
    );
    honest_client_is_served(&server, "300 zero-window HTTP/2 streams").await;
    for (_sender, _responses, closed) in connections {
        let lived = tokio::time::timeout(Duration::from_secs(20), closed)
            .await
            .expect("the server drops a connection whose responses never move")
            .unwrap();
        println!("zero-window connection cut after {lived:?}");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_pings_do_not_keep_an_idle_connection_open() {
    let _serial = SERIAL.lock().await;
    let server = TestServer::start(|_, o| {
        o.idle_timeout = Some(Seconds(Duration::from_secs(1)));
    })
    .await;
    let (mut sender, mut connection) = h2_client(&server, [127, 0, 0, 1], 65_535).await;
    let mut pings = connection.ping_pong().unwrap();
    let closed = tokio::spawn(async move {
        let started = Instant::now();
        let _ = connection.await;
        started.elapsed()
    });
    sender = sender.ready().await.unwrap();
    let (response, _) = sender.send_request(h2_get("/healthz"), true).unwrap();
    assert_eq!(response.await.unwrap().status(), StatusCode::OK);
    // A PING every 200 ms: traffic, but no request.
    let pinger = tokio::spawn(async move {
        for _ in 0..100 {
            if pings.ping(h2::Ping::opaque()).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let lived = tokio::time::timeout(Duration::from_secs(15), closed)
        .await
        .expect("PINGs alone must not keep the connection open")
        .unwrap();
    println!("pinging idle connection closed after {lived:?}");
    pinger.abort();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_never_finishes_is_dropped_after_the_close_deadline() {
    let _serial = SERIAL.lock().await;
    let server = TestServer::start(|_, o| {
        o.response_stall_timeout = Some(Seconds(Duration::from_secs(300)));
        o.shutdown_timeout = Some(Seconds(Duration::from_secs(1)));
    })
    .await;
    let (mut sender, connection) = h2_client(&server, [127, 0, 0, 1], 0).await;
    let closed = tokio::spawn(connection);
    sender = sender.ready().await.unwrap();
    let (response, _send) = sender
        .send_request(h2_get("/scripts/client.js"), true)
        .unwrap();
    // The response (and its body) is held, never read: the stream stays open.
    let response = response.await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    // Shutdown starts a graceful close; the stream can never finish (zero window).
    let started = Instant::now();
    server.stop().await;
    tokio::time::timeout(Duration::from_secs(10), closed)
        .await
        .expect("dropped once the close deadline (shutdown-timeout) passes")
        .unwrap()
        .ok();
    println!(
        "unfinishable connection dropped {:?} after shutdown began",
        started.elapsed()
    );
    drop((sender, response));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapid_reset_ends_the_connection_and_others_are_served() {
    let _serial = SERIAL.lock().await;
    let server = TestServer::start(|_, _| {}).await;
    let (mut sender, connection) = h2_client(&server, [127, 0, 0, 1], 65_535).await;
    let closed = tokio::spawn(connection);
    let mut opened = 0;
    for _ in 0..10_000 {
        sender = match sender.ready().await {
            Ok(sender) => sender,
            Err(_) => break,
        };
        match sender.send_request(h2_get("/scripts/client.js"), true) {
            Ok((_, mut stream)) => {
                stream.send_reset(h2::Reason::CANCEL);
                opened += 1;
            }
            Err(_) => break,
        }
        if closed.is_finished() {
            break;
        }
    }
    let ended = tokio::time::timeout(Duration::from_secs(20), closed)
        .await
        .expect("the server ends a rapid-reset connection")
        .unwrap();
    let reason = ended.as_ref().err().and_then(|e| e.reason());
    println!(
        "rapid reset: {opened} streams opened and reset before the server ended it ({reason:?})"
    );
    assert!(opened < 10_000, "cut before the attack finished");
    // The server sends GOAWAY ENHANCE_YOUR_CALM and closes; a client still writing may see the
    // reset of the closed socket before it reads the GOAWAY.
    let io_error = ended
        .as_ref()
        .err()
        .is_some_and(|e| e.is_io() || e.is_go_away());
    assert!(
        reason == Some(h2::Reason::ENHANCE_YOUR_CALM) || io_error,
        "ended by the server: {ended:?}"
    );
    honest_client_is_served(&server, "a rapid-reset attack").await;
    server.stop().await;
}

/// One HTTP/2 frame header.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_continuation_flood_is_cut_at_the_header_list_limit() {
    let _serial = SERIAL.lock().await;
    let server = TestServer::start(|_, _| {}).await;
    let tcp = TcpStream::connect(server.addrs.https).await.unwrap();
    let tls = server
        .client(&[b"h2"])
        .connect(
            rustls::pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    let (mut reader, mut writer) = tokio::io::split(tls);
    // Read until the server ends the connection; remember whether it said GOAWAY first.
    let watcher = tokio::spawn(async move {
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match reader.read(&mut buf).await {
                Ok(0) | Err(_) => return seen,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
    });
    let mut preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    preface.extend(frame(0x4, 0, 0, &[])); // SETTINGS
                                           // HEADERS without END_HEADERS: `:method GET`, `:scheme https`, `:path /`, then only
                                           // CONTINUATION frames, each full of 4 KiB literal header fields, never ending the block.
    preface.extend(frame(0x1, 0x1, 1, &[0x82, 0x87, 0x84]));
    writer.write_all(&preface).await.unwrap();
    let mut field = vec![0x00, 0x05];
    field.extend_from_slice(b"x-pad");
    field.extend_from_slice(&[0x7f, 0x81, 0x1f]); // value length 127 + 0x1f81 = 4096
    field.extend(std::iter::repeat_n(b'a', 4096));
    let mut block = Vec::new();
    while block.len() + field.len() <= 16 * 1024 {
        block.extend_from_slice(&field);
    }
    let continuation = frame(0x9, 0, 1, &block);
    let mut sent = 0usize;
    for _ in 0..4096 {
        // 4,096 × 16 KiB = 64 MiB offered; the header list limit is 16 KiB.
        let write = tokio::time::timeout(Duration::from_secs(5), writer.write_all(&continuation));
        match write.await {
            Ok(Ok(())) => sent += continuation.len(),
            _ => break,
        }
        if watcher.is_finished() {
            break;
        }
    }
    let seen = tokio::time::timeout(Duration::from_secs(10), watcher)
        .await
        .expect("the server ends the connection")
        .unwrap();
    println!("CONTINUATION flood: {sent} bytes written before the server closed");
    assert!(
        sent < 4096 * continuation.len(),
        "cut before 64 MiB of header block was accepted"
    );
    // Frames the server sent: SETTINGS, SETTINGS ack, and a GOAWAY or RST_STREAM for the flood.
    let mut at = 0;
    let mut kinds = Vec::new();
    while at + 9 <= seen.len() {
        let len = (usize::from(seen[at]) << 16)
            | (usize::from(seen[at + 1]) << 8)
            | usize::from(seen[at + 2]);
        kinds.push(seen[at + 3]);
        at += 9 + len;
    }
    assert!(
        kinds.contains(&0x7) || kinds.contains(&0x3),
        "the server says why (GOAWAY or RST_STREAM), frames seen: {kinds:?}"
    );
    honest_client_is_served(&server, "a CONTINUATION flood").await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_ranges_get_the_file_once() {
    let _serial = SERIAL.lock().await;
    let server = TestServer::start(|_, _| {}).await;
    let whole = https_get(&server, "/scripts/client.js").await;
    let tls = connect(&server.client(&[b"http/1.1"]), server.addrs.https)
        .await
        .unwrap();
    let mut client = H1::over(tls).await;
    let mut flood = get("/scripts/client.js");
    let ranges = vec!["0-"; 2000].join(",");
    flood
        .headers_mut()
        .insert("range", format!("bytes={ranges}").parse().unwrap());
    let answer = client.send(flood).await.unwrap();
    println!(
        "2,000 x '0-': {} with {} bytes (file: {} bytes)",
        answer.status,
        answer.body.len(),
        whole.body.len()
    );
    assert_eq!(answer.status, StatusCode::OK, "the Range header is ignored");
    assert_eq!(answer.body, whole.body, "the file once");

    let mut few = get("/scripts/client.js");
    few.headers_mut()
        .insert("range", "bytes=0-9,20-29".parse().unwrap());
    let few = client.send(few).await.unwrap();
    assert_eq!(few.status, StatusCode::PARTIAL_CONTENT);
    assert!(few.body.len() < 400, "two 10-byte parts and their headers");

    let mut beyond = get("/scripts/client.js");
    beyond.headers_mut().insert(
        "range",
        format!("bytes={}-", whole.body.len()).parse().unwrap(),
    );
    let beyond = client.send(beyond).await.unwrap();
    assert_eq!(beyond.status, StatusCode::RANGE_NOT_SATISFIABLE);
    honest_client_is_served(&server, "range floods").await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_listener_cuts_silent_and_idle_connections() {
    let _serial = SERIAL.lock().await;
    let server = TestServer::start(|_, o| {
        o.header_read_timeout = Some(Seconds(Duration::from_secs(1)));
        o.idle_timeout = Some(Seconds(Duration::from_secs(1)));
    })
    .await;
    let metrics = server.addrs.metrics.unwrap();
    // Silent: never sends a request head.
    let mut silent = TcpStream::connect(metrics).await.unwrap();
    let lived = closed_within(&mut silent, Duration::from_secs(10))
        .await
        .expect("a silent metrics connection is closed by the header timeout");
    println!("silent metrics connection closed after {lived:?}");
    // Slow: a request head dribbled a byte every 100 ms never completes.
    let mut slow = TcpStream::connect(metrics).await.unwrap();
    let started = Instant::now();
    let mut cut = false;
    for byte in b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Pad: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa" {
        if slow.write_all(&[*byte]).await.is_err() {
            cut = true;
            break;
        }
        if closed_within(&mut slow, Duration::from_millis(100))
            .await
            .is_some()
        {
            cut = true;
            break;
        }
    }
    assert!(cut, "a dribbled metrics request is cut off");
    println!("slow metrics request cut after {:?}", started.elapsed());
    let text = scrape_from(&server, [127, 0, 0, 2]).await;
    assert!(
        text.contains("callgate_build_info"),
        "the scraper is served"
    );
    server.stop().await;
}
