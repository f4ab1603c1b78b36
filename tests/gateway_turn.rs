//! The gateway's TURN relay as browsers use it: ICE servers in the `id` message, credentials tied to
//! the client's ID that the relay accepts, relayed data, and the relay's metrics.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use tokio::net::UdpSocket;
use turn::client::{Client, ClientConfig};
use webrtc_util::Conn;

async fn turn_client(server: SocketAddr, username: &str, password: &str) -> Client {
    let conn = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let client = Client::new(ClientConfig {
        stun_serv_addr: server.to_string(),
        turn_serv_addr: server.to_string(),
        username: username.to_owned(),
        password: password.to_owned(),
        realm: "callgate".into(),
        software: String::new(),
        rto_in_ms: 0,
        conn: Arc::new(conn),
        vnet: None,
    })
    .await
    .unwrap();
    client.listen().await.unwrap();
    client
}

/// The TURN entry (the one with credentials) of an `iceServers` array.
fn turn_entry(ice: &Value) -> (Vec<String>, String, String) {
    let entry = ice
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s.get("username").is_some())
        .expect("a TURN server with credentials");
    let urls = entry["urls"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u.as_str().unwrap().to_owned())
        .collect();
    (
        urls,
        entry["username"].as_str().unwrap().to_owned(),
        entry["credential"].as_str().unwrap().to_owned(),
    )
}

#[tokio::test]
async fn clients_get_ice_servers_whose_credentials_the_relay_accepts() {
    let server = TestServer::start(|_, o| {
        o.allowed_peer_ip = Some(vec!["127.0.0.1/32".parse().unwrap()]);
        o.metrics_token = None;
    })
    .await;
    let udp = server.addrs.turn_udp[0];
    let (tcp, tls) = (server.addrs.turn_tcp[0], server.addrs.turn_tls[0]);

    let (a, hello_a) = Ws::join(&server).await;
    let (_b, hello_b) = Ws::join(&server).await;
    let ice = &hello_a["iceServers"];
    assert!(
        ice.as_array()
            .unwrap()
            .iter()
            .any(|s| s["urls"][0] == format!("stun:localhost:{}", udp.port())),
        "{ice}"
    );
    let (urls, user_a, pass_a) = turn_entry(ice);
    assert_eq!(
        urls,
        [
            format!("turn:localhost:{}?transport=udp", udp.port()),
            format!("turn:localhost:{}?transport=tcp", tcp.port()),
            format!("turns:localhost:{}?transport=tcp", tls.port()),
            // turn-on-https-port (default on): TURN over TLS on the HTTPS port too.
            format!(
                "turns:localhost:{}?transport=tcp",
                server.addrs.https.port()
            ),
        ]
    );
    let (expiry, user) = user_a.split_once(':').unwrap();
    assert_eq!(
        user,
        hello_a["id"].as_u64().unwrap().to_string(),
        "credentials name the client's ID"
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let expiry: u64 = expiry.parse().unwrap();
    assert!(
        (now + 3500..=now + 3600).contains(&expiry),
        "valid for an hour"
    );

    // Both clients allocate on the relay with what the signaling server gave them, and relay
    // data to each other as a browser pair would.
    let (_, user_b, pass_b) = turn_entry(&hello_b["iceServers"]);
    let alice = turn_client(udp, &user_a, &pass_a).await;
    let bob = turn_client(udp, &user_b, &pass_b).await;
    let alice_relay = alice
        .allocate()
        .await
        .expect("allocation with signaling-issued credentials");
    let bob_relay = bob
        .allocate()
        .await
        .expect("allocation with signaling-issued credentials");
    let (alice_addr, bob_addr) = (
        alice_relay.local_addr().unwrap(),
        bob_relay.local_addr().unwrap(),
    );
    bob_relay.send_to(b"knock", alice_addr).await.unwrap();
    let mut buf = [0u8; 64];
    for i in 0..5u8 {
        alice_relay.send_to(&[b'a', i], bob_addr).await.unwrap();
        let (n, from) = tokio::time::timeout(Duration::from_secs(5), bob_relay.recv_from(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!((&buf[..n], from), (&[b'a', i][..], alice_addr));
    }

    // A wrong password is refused.
    let mallory = turn_client(udp, &user_a, "not-the-password").await;
    assert!(mallory.allocate().await.is_err());

    let text = String::from_utf8(scrape(&server, None).await.body.to_vec()).unwrap();
    assert_eq!(
        sample(&text, "callgate_turn_allocations_active"),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            r#"callgate_turn_allocations_total{outcome="created"}"#
        ),
        Some(2.0)
    );
    assert!(sample(&text, "callgate_turn_auth_failures_total").unwrap() >= 1.0);
    assert!(
        sample(
            &text,
            r#"callgate_turn_relayed_packets_total{direction="to_peer"}"#
        )
        .unwrap()
            >= 5.0
    );
    assert!(
        sample(
            &text,
            r#"callgate_turn_relayed_bytes_total{direction="to_client"}"#
        )
        .unwrap()
            >= 10.0
    );

    // After a resume, the id message carries fresh credentials for the resumed ID.
    let a_id = hello_a["id"].as_u64().unwrap();
    drop(a.ws);
    let (mut again, _) = Ws::join(&server).await;
    again
        .send_json(json!({"type":"resume","id":a_id,"token":hello_a["token"]}))
        .await;
    let resumed = again.recv().await;
    assert_eq!(resumed["id"], a_id);
    let (_, user, _) = turn_entry(&resumed["iceServers"]);
    assert!(user.ends_with(&format!(":{a_id}")), "{user}");
    server.stop().await;
}

#[tokio::test]
async fn a_configured_turn_host_is_used_in_the_urls() {
    let server = TestServer::start(|_, o| o.turn_host = Some("turn.example.com".into())).await;
    let (_a, hello) = Ws::join(&server).await;
    let (urls, _, _) = turn_entry(&hello["iceServers"]);
    assert!(
        urls.iter().all(|u| u.contains("turn.example.com:")),
        "{urls:?}"
    );
    server.stop().await;
}

#[tokio::test]
async fn with_turn_off_the_id_message_has_no_ice_servers() {
    let server = TestServer::start(|_, o| o.turn = Some(false)).await;
    let (_a, hello) = Ws::join(&server).await;
    assert!(
        hello.get("iceServers").is_none_or(|v| v.is_null()),
        "{hello}"
    );
    assert!(server.addrs.turn_udp.is_empty());
    server.stop().await;
}

#[tokio::test]
async fn the_credentials_endpoint_needs_its_api_key() {
    let key = "api-key-0123456789abcdef";
    let server = TestServer::start(|_, o| o.turn_api_key = Some(key.parse().unwrap())).await;
    let tls = connect(&server.client(&[b"http/1.1"]), server.addrs.https)
        .await
        .unwrap();
    let mut client = H1::over(tls).await;
    assert_eq!(
        client.get("/api/turn-credentials").await.status,
        hyper::StatusCode::UNAUTHORIZED
    );
    let mut wrong = get("/api/turn-credentials");
    wrong.headers_mut().insert(
        "authorization",
        "Bearer nope-nope-nope-nope".parse().unwrap(),
    );
    assert_eq!(
        client.send(wrong).await.unwrap().status,
        hyper::StatusCode::UNAUTHORIZED
    );

    let mut right = get("/api/turn-credentials?user=app-42");
    right
        .headers_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    let issued = client.send(right).await.unwrap();
    assert_eq!(issued.status, hyper::StatusCode::OK);
    assert_eq!(issued.headers["cache-control"], "no-store");
    let body: Value = serde_json::from_slice(&issued.body).unwrap();
    let (_, user, password) = turn_entry(&body["iceServers"]);
    assert!(user.ends_with(":app-42"), "{user}");
    assert!(body["expiresAt"].as_u64().is_some());
    // The relay accepts them.
    let client = turn_client(server.addrs.turn_udp[0], &user, &password).await;
    client
        .allocate()
        .await
        .expect("allocation with API-issued credentials");
    server.stop().await;

    // Without a configured key the endpoint does not exist.
    let server = TestServer::start(|_, _| {}).await;
    assert_eq!(
        https_get(&server, "/api/turn-credentials").await.status,
        hyper::StatusCode::NOT_FOUND
    );
    server.stop().await;
}

#[tokio::test]
async fn the_unauthenticated_request_rate_per_address_is_configurable() {
    let server = TestServer::start(|_, o| o.turn_unauthenticated_per_ip = Some(1)).await;
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    // Ten STUN Binding requests at once: with 1/s (burst 2) only the first two are answered.
    for n in 0..10u8 {
        let mut request = vec![0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xA4, 0x42];
        request.extend([n; 12]);
        socket
            .send_to(&request, server.addrs.turn_udp[0])
            .await
            .unwrap();
    }
    let mut answered = 0;
    let mut buf = [0u8; 512];
    // Absence of answers can only be observed by waiting a bounded time for them.
    while let Ok(Ok(_)) =
        tokio::time::timeout(Duration::from_millis(500), socket.recv_from(&mut buf)).await
    {
        answered += 1;
    }
    assert!((1..=2).contains(&answered), "{answered} of 10 answered");
    server.stop().await;
}
