//! The signaling edge under attack and under bad networks, against the real server over real TLS:
//! no message is lost without a word, and one client (or many addresses) cannot take what belongs
//! to everyone. Each attack test also measures an honest client on another address and prints
//! its latency (reported, never asserted: the machine is shared).

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use common::*;
use rustls::pki_types::ServerName;
use serde_json::{json, Value};
use tokio::net::TcpSocket;

const OFFER: &str =
    r#"{"type":"offer","sdp":"v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n"}"#;

fn id_of(hello: &Value) -> u64 {
    hello["id"].as_u64().expect("numeric id")
}

/// Opens a WebSocket at `path` from the loopback source address `127.0.0.<host>`: Linux routes
/// all of 127/8 to `lo`, so each host number is a distinct client address to the server.
async fn open_from(server: &TestServer, host: u8, path: &str) -> Result<Ws, UpgradeRefused> {
    let socket = TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::new(
            IpAddr::V4(Ipv4Addr::new(127, 0, 0, host)),
            0,
        ))
        .unwrap();
    let tcp = socket
        .connect(server.addrs.https)
        .await
        .map_err(|_| UpgradeRefused(None))?;
    let tls = server
        .client(&[b"http/1.1"])
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .map_err(|_| UpgradeRefused(None))?;
    Ws::handshake(server, tls, path, None).await
}

/// Joins from `127.0.0.<host>` and reads the `id` message.
async fn join_from(server: &TestServer, host: u8, path: &str) -> (Ws, Value) {
    let mut ws = open_from(server, host, path).await.expect("upgrade");
    let hello = ws.recv().await;
    assert_eq!(hello["type"], "id", "{hello}");
    (ws, hello)
}

/// A calls B and B accepts. Returns the last `seq` B processed (0 if B did not opt in).
async fn call(a: &mut Ws, b: &mut Ws, b_id: u64) -> u64 {
    a.send(&format!(
        r#"{{"type":"video-offer-request","calleeId":{b_id},"offer":{OFFER}}}"#
    ))
    .await;
    let incoming = b.recv().await;
    assert_eq!(incoming["type"], "video-answer-request");
    let a_id = incoming["callerId"].as_u64().unwrap();
    b.send(&format!(
        r#"{{"type":"client-reply","reply":"1","callerId":{a_id},"answer":{OFFER}}}"#
    ))
    .await;
    assert_eq!(a.recv().await["type"], "server-reply");
    incoming["seq"].as_u64().unwrap_or(0)
}

/// An app-level ping answered by the very next frame: nothing else was queued for `ws`.
async fn assert_nothing_pending(ws: &mut Ws) {
    ws.send(r#"{"type":"ping"}"#).await;
    let next = ws.recv().await;
    assert_eq!(next["type"], "pong", "unexpected message: {next}");
}

/// A renegotiation offer of about 3 KB, numbered `n`.
fn big_offer(to: u64, n: usize) -> String {
    let sdp =
        "a=candidate:1467250027 1 udp 2122260223 192.168.1.20 46243 typ host\\r\\n".repeat(40);
    format!(
        r#"{{"type":"offer","clientId":{to},"offer":{{"type":"offer","n":{n},"sdp":"{sdp}"}}}}"#
    )
}

/// Latency percentiles of an honest client, printed for the record.
fn report(what: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize];
    println!(
        "{what}: honest round trips n={} p50={:?} p99={:?} max={:?}",
        samples.len(),
        at(0.5),
        at(0.99),
        samples[samples.len() - 1]
    );
}

/// One honest round trip: C sends a candidate to its call peer D, D receives it.
async fn round_trip(c: &mut Ws, d: &mut Ws, d_id: u64, n: usize) -> Duration {
    let start = Instant::now();
    c.send(&format!(
        r#"{{"type":"ice-candidate","clientId":{d_id},"candidate":{n}}}"#
    ))
    .await;
    let got = d.recv().await;
    assert_eq!(got["candidate"], n, "{got}");
    start.elapsed()
}

/// Finding 4: B's network stalls (its socket stops reading), A sends 40 offers of 3 KB, B's
/// connection dies and B resumes. The server had written the offers into socket buffers that died
/// with the connection; before acknowledgements B got 0 of 40 and A was told nothing.
#[tokio::test]
async fn a_peer_whose_connection_died_with_messages_in_flight_gets_all_of_them_on_resume() {
    let server = TestServer::start(|_, _| {}).await;
    let (mut a, _) = Ws::join(&server).await;
    let (mut b, hb) = join_from(&server, 1, "/socket?seq=1").await;
    let b_id = id_of(&hb);
    let last_seq = call(&mut a, &mut b, b_id).await;

    // B stops reading; A sends 40 offers and learns from its own pong that all were handled.
    for n in 0..40 {
        a.send(&big_offer(b_id, n)).await;
    }
    assert_nothing_pending(&mut a).await;
    // B's connection dies with the offers in its buffers.
    drop(b);

    let (mut b2, _) = join_from(&server, 1, "/socket?seq=1").await;
    b2.send_json(json!({"type":"resume","id":b_id,"token":hb["token"],"last_seq":last_seq}))
        .await;
    let resumed = b2.recv().await;
    assert_eq!(
        (resumed["type"].as_str(), id_of(&resumed)),
        (Some("id"), b_id)
    );
    assert_eq!(resumed["resumed"], true);
    assert!(resumed.get("missed").is_none(), "{resumed}");
    // Everything B gets before the answer to its own ping.
    b2.send(r#"{"type":"ping"}"#).await;
    let mut offers = Vec::new();
    loop {
        let m = b2.recv().await;
        if m["type"] == "pong" {
            break;
        }
        assert_eq!(m["type"], "offer", "{m}");
        offers.push(m);
    }
    assert_eq!(offers.len(), 40, "B gets every offer A sent");
    assert!(last_seq > 0, "an opted-in client's messages carry seq");
    for (n, offer) in offers.iter().enumerate() {
        assert_eq!(offer["offer"]["n"], n, "in order, none twice");
        assert_eq!(offer["seq"], last_seq + 1 + n as u64, "numbering continues");
    }
    // A was told nothing, because nothing was lost.
    assert_nothing_pending(&mut a).await;
    server.stop().await;
}

/// The same stall with a small per-ID budget: what did not fit is dropped, B learns the exact
/// range it missed, and A gets one `undelivered` per dropped offer. Nothing vanishes silently.
#[tokio::test]
async fn over_the_per_id_budget_the_peer_learns_the_missed_range_and_the_sender_is_told() {
    let server = TestServer::start(|_, o| {
        o.resume_queue_bytes = Some(64 * 1024);
    })
    .await;
    let (mut a, _) = Ws::join(&server).await;
    let (mut b, hb) = join_from(&server, 1, "/socket?seq=1").await;
    let b_id = id_of(&hb);
    let last_seq = call(&mut a, &mut b, b_id).await;
    for n in 0..40 {
        a.send(&big_offer(b_id, n)).await;
    }
    // A's answers: one `undelivered` per offer that could not be held, then the pong.
    a.send(r#"{"type":"ping"}"#).await;
    let mut undelivered = 0;
    loop {
        let m = a.recv().await;
        if m["type"] == "pong" {
            break;
        }
        assert_eq!(
            (m["type"].as_str(), m["code"].as_str()),
            (Some("error"), Some("undelivered")),
            "{m}"
        );
        assert_eq!(m["clientId"], b_id);
        assert_eq!(m["request"], "offer");
        assert_eq!(m["reason"], "queue_full");
        undelivered += 1;
    }
    assert!(undelivered > 0, "64 KiB cannot hold 40 × 3 KB");
    // Operators see it too.
    let metrics = scrape(&server, None).await;
    assert_eq!(
        sample(
            std::str::from_utf8(&metrics.body).unwrap(),
            r#"callgate_signaling_errors_sent_total{code="undelivered"}"#
        ),
        Some(undelivered as f64)
    );
    drop(b);

    let (mut b2, _) = join_from(&server, 1, "/socket?seq=1").await;
    b2.send_json(json!({"type":"resume","id":b_id,"token":hb["token"],"last_seq":last_seq}))
        .await;
    let resumed = b2.recv().await;
    assert_eq!(resumed["resumed"], true);
    let delivered = 40 - undelivered;
    let first_missed = last_seq + delivered + 1;
    assert_eq!(
        resumed["missed"],
        json!([first_missed, last_seq + 40]),
        "the missed range names exactly the dropped offers"
    );
    for n in 0..delivered {
        let offer = b2.recv().await;
        assert_eq!(offer["offer"]["n"], n, "{offer}");
    }
    assert_nothing_pending(&mut b2).await;
    println!("held {delivered} of 40 offers; {undelivered} reported undelivered to the sender");
    server.stop().await;
}

/// 10,000 messages a second from one client: refused with `rate_limited`, then the connection is
/// closed with 1008; an honest call on another address keeps working meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_messages_a_second_from_one_client_are_cut_by_the_rate_limit() {
    let server = TestServer::start(|_, _| {}).await;
    let (mut c, _) = join_from(&server, 1, "/socket").await;
    let (mut d, hd) = join_from(&server, 1, "/socket").await;
    let d_id = id_of(&hd);
    call(&mut c, &mut d, d_id).await;

    let (mut attacker, _) = join_from(&server, 2, "/socket").await;
    let flood = tokio::spawn(async move {
        let start = Instant::now();
        let mut sent = 0u32;
        // 10,000 a second for one second, in bursts of 100 every 10 ms.
        'flood: for _ in 0..100 {
            for _ in 0..100 {
                let frame = fastwebsockets::Frame::text(fastwebsockets::Payload::Borrowed(
                    br#"{"type":"ping"}"#,
                ));
                if attacker.ws.write_frame(frame).await.is_err() {
                    break 'flood;
                }
                sent += 1;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let (mut pongs, mut limited, mut told, mut close) = (0, 0, false, None);
        loop {
            match attacker.next().await {
                Event::Text(text) => {
                    let m: Value = serde_json::from_str(&text).unwrap();
                    match (m["type"].as_str(), m["code"].as_str()) {
                        (Some("pong"), _) => pongs += 1,
                        (Some("error"), Some("rate_limited")) => limited += 1,
                        (Some("error"), Some("too_many_violations")) => told = true,
                        _ => {}
                    }
                }
                Event::Close(code, _) => {
                    close = code;
                    break;
                }
                Event::Ended(_) => break,
                Event::Other(_) => {}
            }
        }
        (sent, pongs, limited, told, close, start.elapsed())
    });
    let mut samples = Vec::new();
    let mut n = 0;
    while !flood.is_finished() {
        samples.push(round_trip(&mut c, &mut d, d_id, n).await);
        n += 1;
        // The honest client stays within its own 20 messages a second.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (sent, pongs, limited, told, close, took) = flood.await.unwrap();
    println!("flood: {sent} sent, {pongs} answered, {limited} rate_limited, close {close:?} after {took:?}");
    // The close frame (1008) is sent, but the flooder's own unread writes make the server's
    // socket reset the connection, which may discard it before it is read.
    assert!(
        told,
        "the flooder is told it is closed for repeated violations"
    );
    assert!(matches!(close, Some(1008) | None), "{close:?}");
    assert!(
        pongs <= 60 + 20,
        "no more than the burst plus a second's rate got through: {pongs}"
    );
    assert!(limited >= 1);
    // The honest call still works after the attack.
    samples.push(round_trip(&mut c, &mut d, d_id, n).await);
    report("message flood", samples);
    server.stop().await;
}

/// A client that never reads while its peer keeps sending: it is detached once its outbound queue
/// reaches its byte budget (not after 128 frames of up to 64 KiB each), the sender hears about
/// what could not be held, and an honest call on another address is unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_is_cut_off_at_its_byte_budget() {
    let server = TestServer::start(|_, o| {
        o.ws_outbox_bytes = Some(320 * 1024);
        o.ws_write_timeout = Some(callgate::config::Seconds(Duration::from_secs(2)));
        o.ws_messages_per_second = Some(1000);
        o.ws_message_burst = Some(1000);
    })
    .await;
    let (mut c, _) = join_from(&server, 1, "/socket").await;
    let (mut d, hd) = join_from(&server, 1, "/socket").await;
    let d_id = id_of(&hd);
    call(&mut c, &mut d, d_id).await;

    let (mut sender, _) = join_from(&server, 3, "/socket").await;
    let (mut sleeper, hs) = join_from(&server, 4, "/socket").await;
    let sleeper_id = id_of(&hs);
    call(&mut sender, &mut sleeper, sleeper_id).await;
    // The sleeper never reads again. The sender pushes 60 KB candidates at it (24 MB in all, far
    // more than any socket buffer) and reads its own answers.
    let blob = "y".repeat(60 * 1024);
    let flood = tokio::spawn(async move {
        let mut undelivered = 0;
        for _ in 0..400 {
            sender
                .send(&format!(
                    r#"{{"type":"ice-candidate","clientId":{sleeper_id},"candidate":"{blob}"}}"#
                ))
                .await;
        }
        sender.send(r#"{"type":"ping"}"#).await;
        loop {
            let m = sender.recv().await;
            match m["type"].as_str() {
                Some("pong") => break,
                Some("error") => {
                    assert_eq!(m["code"], "undelivered", "{m}");
                    undelivered += 1;
                }
                _ => {}
            }
        }
        undelivered
    });
    let mut samples = Vec::new();
    let mut n = 0;
    while !flood.is_finished() {
        samples.push(round_trip(&mut c, &mut d, d_id, n).await);
        n += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let undelivered = flood.await.unwrap();
    assert!(
        undelivered > 0,
        "what the sleeper's reservation could not hold was reported"
    );
    // The sleeper was cut off: after what its socket buffers held, its stream ends.
    let mut texts = 0;
    let end = loop {
        match sleeper.next().await {
            Event::Text(_) => texts += 1,
            other => break other,
        }
    };
    println!("sleeper: {texts} frames before {end:?}; sender told of {undelivered} undelivered");
    assert!(
        texts < 400,
        "the server stopped queueing for a client that does not read"
    );
    assert!(
        matches!(end, Event::Close(Some(1008), _) | Event::Ended(_)),
        "cut off with 1008 (or reset): {end:?}"
    );
    samples.push(round_trip(&mut c, &mut d, d_id, n).await);
    report("client that never reads", samples);
    server.stop().await;
}

/// Connect-and-drop churn from many source addresses: each address holds at most
/// `reservations-per-ip` reserved IDs, reservations never lock a live client out (the oldest is
/// ended to make room), and the owner of a surviving reservation can still resume it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_and_drop_churn_cannot_fill_the_directory() {
    let server = TestServer::start(|_, o| {
        o.max_clients = Some(40);
        o.reservations_per_ip = Some(4);
    })
    .await;
    // 16 addresses × 8 connections, each dropped with 1001 (which reserves the ID): 128 would-be
    // reservations, 64 after the per-address cap, more than the 40 IDs the server holds.
    let start = Instant::now();
    let mut tokens = Vec::new();
    for host in 2..18u8 {
        for _ in 0..8 {
            let (mut ws, hello) = join_from(&server, host, "/socket").await;
            ws.ws
                .write_frame(fastwebsockets::Frame::close(1001, b"churn"))
                .await
                .unwrap();
            // The server answers the close after it has reserved (or freed) the ID.
            assert_eq!(ws.expect_close().await, Some(1001));
            tokens.push((host, id_of(&hello), hello["token"].clone()));
        }
    }
    println!("churn: 128 connect-and-drops in {:?}", start.elapsed());

    // An honest newcomer still gets an ID.
    let joined = Instant::now();
    let (_honest, hello) = join_from(&server, 1, "/socket").await;
    assert!(id_of(&hello) > 0);
    println!("churn: honest client joined in {:?}", joined.elapsed());

    // The last address's first 4 drops were reserved, the other 4 freed at once.
    let mut resumed = 0;
    for (_, id, token) in tokens.iter().filter(|(host, ..)| *host == 17) {
        let (mut ws, _) = join_from(&server, 1, "/socket").await;
        ws.send_json(json!({"type":"resume","id":id,"token":token}))
            .await;
        let answer = ws.recv().await;
        match answer["type"].as_str() {
            Some("id") => resumed += 1,
            _ => assert_eq!(answer["code"], "resume_failed", "{answer}"),
        }
    }
    assert_eq!(resumed, 4, "reservations per address are capped at 4");
    server.stop().await;
}
