//! The relay over TCP (`turn:?transport=tcp`) and TLS (`turns:`): RFC 8656 framing, allocations
//! tied to the connection, and certificates the gateway can swap at runtime.

#[path = "support/turn_rawclient.rs"]
mod raw;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use callgate::turn::TlsAcceptorSource;
use raw::*;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

struct TestCert {
    der: CertificateDer<'static>,
    acceptor: TlsAcceptor,
}

fn test_cert() -> TestCert {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let der = ck.cert.der().clone();
    let key = PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into());
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(vec![der.clone()], key)
        .unwrap();
    TestCert {
        der,
        acceptor: TlsAcceptor::from(Arc::new(config)),
    }
}

/// An acceptor source the test can swap, as the gateway's certificate reloader would.
fn swappable(initial: TlsAcceptor) -> (TlsAcceptorSource, Arc<Mutex<TlsAcceptor>>) {
    let current = Arc::new(Mutex::new(initial));
    let c = Arc::clone(&current);
    (Arc::new(move || c.lock().unwrap().clone()), current)
}

async fn tls_client(
    addr: std::net::SocketAddr,
    trust: &CertificateDer<'static>,
    user: &str,
) -> std::io::Result<RawClient> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(trust.clone()).unwrap();
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = TcpStream::connect(addr).await?;
    let tls = TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await?;
    Ok(RawClient::stream(tls, user))
}

/// Waits for a counter the engine updates asynchronously (allocation close notifications).
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn tcp_allocates_binds_and_relays_both_ways() {
    let relay = start(test_settings(), None).await;
    let mut client = RawClient::tcp(relay.tcp_addrs()[0], "tcp-user").await;
    let relayed = client.allocate().await.expect("allocates over TCP");
    channel_round_trip(&mut client, relayed).await;
    assert_eq!(relay.stats().snapshot().stream_connections, 1);
    relay.shutdown().await;
}

#[tokio::test]
async fn tcp_refuses_bad_credentials_and_peers() {
    let relay = start(test_settings(), None).await;
    let mut wrong = RawClient::tcp(relay.tcp_addrs()[0], "x").await;
    wrong.password = "nope".into();
    assert_eq!(wrong.allocate().await, Err(401));

    let mut client = RawClient::tcp(relay.tcp_addrs()[0], "y").await;
    client.allocate().await.unwrap();
    let metadata = "169.254.169.254:80".parse().unwrap();
    assert_eq!(client.create_permission(metadata).await.code(), Some(403));
    relay.shutdown().await;
}

#[tokio::test]
async fn closing_the_tcp_connection_releases_its_allocation() {
    let relay = start(test_settings(), None).await;
    let mut client = RawClient::tcp(relay.tcp_addrs()[0], "short-lived").await;
    client.allocate().await.unwrap();
    assert_eq!(relay.stats().snapshot().allocations_active, 1);
    drop(client);
    let stats = Arc::clone(relay.stats());
    eventually("the allocation to close", || {
        let s = stats.snapshot();
        s.allocations_active == 0 && s.stream_connections == 0
    })
    .await;
    assert_eq!(relay.memory().unwrap().ledger_entries, 0);
    eventually("the relay socket to be forgotten", || {
        relay.memory().unwrap().jumbo == (0, 0, 0)
    })
    .await;
    relay.shutdown().await;
}

#[tokio::test]
async fn tls_allocates_binds_and_relays_both_ways() {
    let cert = test_cert();
    let (source, _) = swappable(cert.acceptor.clone());
    let relay = start(test_settings(), Some(source)).await;
    let mut client = tls_client(relay.tls_addrs()[0], &cert.der, "tls-user")
        .await
        .unwrap();
    assert_eq!(client.binding().await.ip().to_string(), "127.0.0.1");
    let relayed = client.allocate().await.expect("allocates over TLS");
    channel_round_trip(&mut client, relayed).await;
    relay.shutdown().await;
}

#[tokio::test]
async fn tls_uses_the_certificate_current_at_each_handshake() {
    let first = test_cert();
    let second = test_cert();
    let (source, current) = swappable(first.acceptor.clone());
    let relay = start(test_settings(), Some(source)).await;
    let addr = relay.tls_addrs()[0];
    assert!(tls_client(addr, &first.der, "a").await.is_ok());
    *current.lock().unwrap() = second.acceptor.clone();
    assert!(
        tls_client(addr, &first.der, "a").await.is_err(),
        "old certificate no longer served"
    );
    let mut client = tls_client(addr, &second.der, "a").await.unwrap();
    assert!(client.allocate().await.is_ok());
    relay.shutdown().await;
}

#[tokio::test]
async fn no_tls_acceptor_means_no_tls_listener() {
    let relay = start(test_settings(), None).await;
    assert!(relay.tls_addrs().is_empty());
    assert_eq!(relay.tcp_addrs().len(), 1);
    let mut settings = test_settings();
    settings.tcp_port = None;
    settings.udp_port = None;
    let relay2 = start(settings, None).await;
    assert!(relay2.tcp_addrs().is_empty() && relay2.udp_addrs().is_empty());
    relay.shutdown().await;
    relay2.shutdown().await;
}

async fn closed_by_server(stream: &mut TcpStream) -> bool {
    use tokio::io::AsyncReadExt;
    let mut b = [0u8; 1];
    matches!(
        tokio::time::timeout(WAIT, stream.read(&mut b)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

#[tokio::test]
async fn stream_connections_per_ip_are_capped() {
    let mut settings = test_settings();
    settings.max_stream_connections_per_ip = 2;
    let relay = start(settings, None).await;
    let addr = relay.tcp_addrs()[0];
    let mut first = RawClient::tcp(addr, "v").await;
    let mut second = RawClient::tcp(addr, "v").await;
    // Both are served (a Binding round trip proves they were accepted and counted).
    first.binding().await;
    second.binding().await;
    let mut third = TcpStream::connect(addr).await.unwrap();
    assert!(
        closed_by_server(&mut third).await,
        "third connection from one IP is closed"
    );
    drop(first);
    // Once one closes, a new one is accepted again. The close is noticed asynchronously: wait
    // for the connection gauge, then retry briefly (the per-IP slot is freed just after it).
    let stats = Arc::clone(relay.stats());
    eventually("the first connection to close", || {
        stats.snapshot().stream_connections == 1
    })
    .await;
    let binding = callgate::turn::gate::Gate::priming_request(); // any request gets an answer
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut c = TcpStream::connect(addr).await.unwrap();
        let _ = c.write_all(&binding).await;
        let mut b = [0u8; 20];
        if let Ok(Ok(20)) =
            tokio::time::timeout(Duration::from_millis(500), c.read_exact(&mut b)).await
        {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "slot never freed");
    }
    relay.shutdown().await;
}

#[tokio::test]
async fn silent_stream_connections_are_closed_quickly() {
    let mut settings = test_settings();
    settings.tls_handshake_timeout = Duration::from_millis(200);
    let relay = start(settings, None).await;
    let mut silent = TcpStream::connect(relay.tcp_addrs()[0]).await.unwrap();
    let started = tokio::time::Instant::now();
    assert!(closed_by_server(&mut silent).await);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    // A client that authenticated is not bound by the deadline.
    let mut talker = RawClient::tcp(relay.tcp_addrs()[0], "w").await;
    talker.allocate().await.unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    talker.binding().await;
    relay.shutdown().await;
}

/// Writes unauthenticated STUN and garbage (framed as ChannelData) every 20 ms until the relay
/// closes the connection; returns how long that took.
async fn busy_unauthenticated_client(addr: std::net::SocketAddr) -> Duration {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let started = tokio::time::Instant::now();
    let (mut r, mut w) = TcpStream::connect(addr).await.unwrap().into_split();
    let binding: [u8; 20] = [
        0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xa4, 0x42, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,
    ];
    let unauthenticated_allocate = callgate::turn::gate::Gate::priming_request();
    let garbage = b"GET / HTTP/1.1\r\n\r\n";
    let reader = tokio::spawn(async move {
        let mut buf = [0u8; 4096];
        while matches!(r.read(&mut buf).await, Ok(n) if n > 0) {}
    });
    let writer = async {
        loop {
            for frame in [&binding[..], &unauthenticated_allocate, garbage] {
                if w.write_all(frame).await.is_err() {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::select! {
        _ = reader => {}
        _ = writer => {}
        _ = tokio::time::sleep(Duration::from_secs(5)) => panic!("still connected after 5 s"),
    }
    started.elapsed()
}

#[tokio::test]
async fn unauthenticated_stream_connections_are_cut_however_much_they_send() {
    let mut settings = test_settings();
    settings.tls_handshake_timeout = Duration::from_millis(500);
    let relay = start(settings, None).await;
    let lasted = busy_unauthenticated_client(relay.tcp_addrs()[0]).await;
    assert!(
        lasted >= Duration::from_millis(450) && lasted < Duration::from_secs(3),
        "cut after {lasted:?}; the deadline is 500 ms from accept, however busy the client"
    );
    relay.shutdown().await;
}

#[tokio::test]
async fn tcp_relays_channel_data_larger_than_the_engine_buffer() {
    let relay = start(test_settings(), None).await;
    let mut client = RawClient::tcp(relay.tcp_addrs()[0], "walt").await;
    client.allocate().await.unwrap();
    jumbo_round_trip(&mut client).await;
    assert_eq!(relay.stats().snapshot().oversized_dropped, 0);
    relay.shutdown().await;
}

#[tokio::test]
async fn shutdown_does_not_wait_for_stalled_tls_handshakes() {
    let cert = test_cert();
    let (source, _) = swappable(cert.acceptor.clone());
    let mut settings = test_settings();
    settings.tls_handshake_timeout = Duration::from_secs(60);
    let relay = start(settings, Some(source)).await;
    let _stalled = TcpStream::connect(relay.tls_addrs()[0]).await.unwrap();
    // Let the relay accept it (a Binding on UDP is answered after the accept loop ran).
    let mut probe = RawClient::udp(relay.udp_addrs()[0], "z").await;
    probe.binding().await;
    tokio::time::timeout(Duration::from_secs(5), relay.shutdown())
        .await
        .expect("shutdown within 5 s despite a 60 s handshake timeout");
}

#[tokio::test]
async fn a_client_that_stops_reading_has_relayed_data_dropped_and_counted_not_queued() {
    let relay = start(test_settings(), None).await;
    let mut stalled = RawClient::tcp(relay.tcp_addrs()[0], "stalled").await;
    let relayed = stalled.allocate().await.expect("allocates over TCP");
    let (peer, peer_addr) = peer_socket().await;
    assert_eq!(stalled.channel_bind(0x4000, peer_addr).await.code(), None);

    // The client never reads again. Once the kernel's buffers on both ends are full, what the
    // peer sends can only wait in the connection's write queue, which is bounded in bytes.
    let payload = vec![7u8; 1200];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut sent = 0u64;
    while relay.stats().snapshot().client_queue_dropped == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no drop counted after {sent} datagrams ({} MB)",
            (sent * 1200) >> 20
        );
        for _ in 0..100 {
            peer.send_to(&payload, relayed).await.unwrap();
            sent += 1;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // The relay is not blocked by the stalled client: another one is served at once.
    let mut other = RawClient::tcp(relay.tcp_addrs()[0], "other").await;
    let other_relayed = other
        .allocate()
        .await
        .expect("allocates beside the stalled client");
    channel_round_trip(&mut other, other_relayed).await;
    relay.shutdown().await;
}
