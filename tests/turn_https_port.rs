//! TURN over TLS on the HTTPS port (`turn-on-https-port`, issue 14): the HTTPS listener routes each
//! TLS connection by its ClientHello's ALPN (`stun.turn` → TURN, `h2`/`http/1.1` → HTTP) or, with
//! no ALPN (what browsers send for `turns:`), by its first bytes (a STUN header → TURN, anything
//! else → HTTP); HTTPS, HTTP/2 and WebSockets keep working beside it; coturn's `turnutils_uclient`
//! relays through it with zero loss. Without the coturn tools the uclient test prints why and
//! passes — except under `CI=true`, where a missing tool is a failure.

mod common;

#[path = "support/uclient.rs"]
mod uclient;

use std::process::Output;
use std::time::Duration;

use common::*;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::process::Command;
use uclient::{lost_packets, received_packets};

const SECRET: &str = "https-port-secret";
const WAIT: Duration = Duration::from_secs(5);

/// A server whose relay accepts `SECRET` and may relay to loopback (uclient's peers are there).
async fn server(on_https_port: Option<bool>) -> TestServer {
    TestServer::start(|_, o| {
        o.static_auth_secret = Some(vec![SECRET.parse().unwrap()]);
        o.allowed_peer_ip = Some(vec!["127.0.0.1/32".parse().unwrap()]);
        o.relay_ip = Some("127.0.0.1".parse().unwrap());
        o.turn_on_https_port = on_https_port;
        o.metrics_token = None;
    })
    .await
}

/// A STUN Binding request with transaction id `tid`.
fn binding_request(tid: [u8; 12]) -> Vec<u8> {
    let mut m = vec![0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xA4, 0x42];
    m.extend_from_slice(&tid);
    m
}

/// Sends a Binding request on `stream` and returns the answer's message type, checking that it
/// is a STUN message for the same transaction.
async fn binding<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S) -> u16 {
    let tid = *b"turnport-tid";
    stream.write_all(&binding_request(tid)).await.unwrap();
    stream.flush().await.unwrap();
    let mut header = [0u8; 20];
    tokio::time::timeout(WAIT, stream.read_exact(&mut header))
        .await
        .expect("a STUN answer in time")
        .expect("a STUN answer, not a closed connection");
    assert_eq!(&header[4..8], &[0x21, 0x12, 0xA4, 0x42], "{header:?}");
    assert_eq!(&header[8..20], &tid);
    let len = usize::from(u16::from_be_bytes([header[2], header[3]]));
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).await.unwrap();
    u16::from_be_bytes([header[0], header[1]])
}

/// Binding success response.
const BINDING_SUCCESS: u16 = 0x0101;

#[tokio::test]
async fn a_client_with_no_alpn_sending_stun_gets_turn_and_one_sending_http_gets_http() {
    let server = server(None).await;
    let https = server.addrs.https;

    // What Chromium does for `turns:`: no ALPN, then STUN.
    let mut turn = connect(&server.client(&[]), https).await.unwrap();
    assert_eq!(turn.get_ref().1.alpn_protocol(), None);
    assert_eq!(binding(&mut turn).await, BINDING_SUCCESS);
    // An SRE can tell these apart from 5349's.
    let metrics = scrape(&server, None).await;
    let text = String::from_utf8_lossy(&metrics.body);
    assert_eq!(
        sample(&text, "callgate_turn_https_port_connections_open"),
        Some(1.0),
        "{text}"
    );

    // `curl --no-alpn`: no ALPN, then HTTP/1.1.
    let tls = connect(&server.client(&[]), https).await.unwrap();
    let mut h1 = H1::over(tls).await;
    let fetched = h1.get("/healthz").await;
    assert_eq!(fetched.status, 200, "{fetched:?}");
    server.stop().await;
}

#[tokio::test]
async fn stun_turn_among_other_protocols_wins() {
    let server = server(None).await;
    // What coturn's turnutils_uclient -S offers.
    let alpn: &[&[u8]] = &[b"http/1.1", b"stun.turn", b"stun.nat-discovery"];
    let mut turn = connect(&server.client(alpn), server.addrs.https)
        .await
        .unwrap();
    assert_eq!(
        turn.get_ref().1.alpn_protocol(),
        Some(&b"stun.turn"[..]),
        "the server selects stun.turn"
    );
    assert_eq!(binding(&mut turn).await, BINDING_SUCCESS);

    // Only HTTP protocols offered: HTTP, even if the client then sends STUN (it is not sniffed).
    let mut http = connect(&server.client(&[b"http/1.1"]), server.addrs.https)
        .await
        .unwrap();
    http.write_all(&binding_request(*b"not-for-turn"))
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(WAIT, http.read_to_end(&mut answer)).await;
    assert!(
        answer.is_empty() || answer.starts_with(b"HTTP/1.1 4"),
        "an HTTP error or a close, not STUN: {answer:?}"
    );
    server.stop().await;
}

#[tokio::test]
async fn the_id_message_offers_turns_on_the_https_port_unless_turned_off() {
    let server = server(None).await;
    let (_ws, hello) = Ws::join(&server).await;
    let wanted = format!(
        "turns:localhost:{}?transport=tcp",
        server.addrs.https.port()
    );
    let urls = turn_urls(&hello["iceServers"]);
    assert!(urls.contains(&wanted), "{urls:?}");
    // The TURN TLS port stays.
    let tls_port = format!(
        "turns:localhost:{}?transport=tcp",
        server.addrs.turn_tls[0].port()
    );
    assert!(urls.contains(&tls_port), "{urls:?}");
    server.stop().await;

    let server = server_off().await;
    let (_ws, hello) = Ws::join(&server).await;
    let urls = turn_urls(&hello["iceServers"]);
    assert!(
        !urls
            .iter()
            .any(|u| u.contains(&format!(":{}?", server.addrs.https.port()))),
        "{urls:?}"
    );
    // And STUN on the HTTPS port is not answered as TURN.
    let mut tls = connect(&server.client(&[]), server.addrs.https)
        .await
        .unwrap();
    tls.write_all(&binding_request(*b"turned-off!!"))
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(WAIT, tls.read_to_end(&mut answer)).await;
    assert!(
        answer.is_empty() || answer.starts_with(b"HTTP/1.1 4"),
        "{answer:?}"
    );
    server.stop().await;
}

async fn server_off() -> TestServer {
    server(Some(false)).await
}

/// Every URL of the TURN entry (the one with credentials).
fn turn_urls(ice: &Value) -> Vec<String> {
    ice.as_array()
        .unwrap()
        .iter()
        .filter(|s| s.get("username").is_some())
        .flat_map(|s| s["urls"].as_array().unwrap().clone())
        .map(|u| u.as_str().unwrap().to_owned())
        .collect()
}

async fn run(program: &str, args: &[&str]) -> Output {
    let child = Command::new(program).args(args).kill_on_drop(true).output();
    tokio::time::timeout(Duration::from_secs(60), child)
        .await
        .unwrap_or_else(|_| panic!("{program} {args:?} did not finish"))
        .expect("tool runs")
}

#[tokio::test]
async fn coturn_uclient_relays_through_the_https_port_while_https_and_websockets_work() {
    if !require_tool("turnutils_uclient", "coturn") {
        return;
    }
    let server = server(None).await;
    let port = server.addrs.https.port().to_string();
    let uclient = async {
        let args = [
            "-t",
            "-S",
            "-y",
            "-n",
            "100",
            "-m",
            "2",
            "-l",
            "170",
            "-z",
            "5",
            "-u",
            "coturn-user",
            "-W",
            SECRET,
            "-p",
            &port,
            "127.0.0.1",
        ];
        run("turnutils_uclient", &args).await
    };
    let web = async {
        // Meanwhile, on the same port: HTTP/2, HTTP/1.1 and a WebSocket.
        for _ in 0..5 {
            let tls = connect(&server.client(&[b"h2"]), server.addrs.https)
                .await
                .unwrap();
            assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
            let mut h2 = H2::over(tls).await;
            assert_eq!(h2.get("/healthz").await.status, 200);
            let tls = connect(&server.client(&[b"http/1.1"]), server.addrs.https)
                .await
                .unwrap();
            let mut h1 = H1::over(tls).await;
            assert_eq!(h1.get("/").await.status, 200);
            let (_ws, hello) = Ws::join(&server).await;
            assert!(hello["id"].is_number(), "{hello}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    let (out, ()) = tokio::join!(uclient, web);
    let t = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "uclient failed:\n{t}");
    assert_eq!(lost_packets(&t), Some(0), "uclient lost packets:\n{t}");
    assert!(received_packets(&t).unwrap_or(0) >= 100, "no traffic:\n{t}");
    server.stop().await;
}

#[tokio::test]
async fn turn_connections_on_the_https_port_keep_their_per_address_slot() {
    let server = TestServer::start(|_, o| {
        o.static_auth_secret = Some(vec![SECRET.parse().unwrap()]);
        o.connections_per_ip = Some(2);
    })
    .await;
    let https = server.addrs.https;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut turn = connect(&server.client(&[]), https).await.unwrap();
        assert_eq!(binding(&mut turn).await, BINDING_SUCCESS);
        held.push(turn);
    }
    // Both slots are held by TURN connections: a third connection from the address is refused.
    let third = async {
        let mut tls = connect(&server.client(&[b"http/1.1"]), https).await?;
        tls.write_all(b"GET /healthz HTTP/1.1\r\nhost: localhost\r\n\r\n")
            .await?;
        let mut buf = [0u8; 1];
        match tls.read(&mut buf).await? {
            0 => Err(std::io::Error::other("closed")),
            _ => Ok(()),
        }
    };
    let refused = tokio::time::timeout(WAIT, third).await.expect("an answer");
    assert!(refused.is_err(), "a third connection was served");
    // A TURN connection ending gives its slot back.
    drop(held.pop());
    let fetched = tokio::time::timeout(WAIT, async {
        loop {
            if let Ok(tls) = connect(&server.client(&[b"http/1.1"]), https).await {
                break H1::over(tls).await.get("/healthz").await;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the freed slot is usable");
    assert_eq!(fetched.status, 200);
    server.stop().await;
}
