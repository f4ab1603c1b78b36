//! Behind a TCP load balancer: the PROXY protocol header from trusted balancers gives per-address
//! limits the real client address; nobody else can claim an address with it.

mod common;

use common::*;
use rustls::pki_types::ServerName;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// A WebSocket through a "load balancer" that prefixes `header` to the TLS stream.
async fn ws_via(server: &TestServer, header: &[u8]) -> Result<Ws, UpgradeRefused> {
    let mut tcp = TcpStream::connect(server.addrs.https).await.unwrap();
    tcp.write_all(header).await.unwrap();
    let tls = server
        .client(&[b"http/1.1"])
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .map_err(|_| UpgradeRefused(None))?;
    Ws::handshake(server, tls, "/socket", None).await
}

#[tokio::test]
async fn per_address_limits_see_the_client_named_by_a_trusted_balancer() {
    let server = TestServer::start(|_, o| {
        o.proxy_protocol_from = Some(vec!["127.0.0.1/32".parse().unwrap()]);
        o.ws_connections_per_ip = Some(1);
    })
    .await;
    let mut first = ws_via(&server, b"PROXY TCP4 203.0.113.9 127.0.0.1 40001 443\r\n")
        .await
        .unwrap();
    assert_eq!(first.recv().await["type"], "id");
    // Same client behind the balancer: over its limit of one.
    let mut second = ws_via(&server, b"PROXY TCP4 203.0.113.9 127.0.0.1 40002 443\r\n")
        .await
        .unwrap();
    assert_eq!(second.recv().await["code"], "too_many_connections");
    // Another client through the same balancer is a different address.
    let mut other = ws_via(&server, b"PROXY TCP4 198.51.100.4 127.0.0.1 40003 443\r\n")
        .await
        .unwrap();
    assert_eq!(other.recv().await["type"], "id");
    // A trusted balancer must send the header.
    assert!(ws_via(&server, b"").await.is_err());
    server.stop().await;
}

#[tokio::test]
async fn an_untrusted_peer_cannot_claim_an_address() {
    let server = TestServer::start(|_, _| {}).await;
    // Without proxy-protocol-from, a PROXY header is just garbage in front of TLS.
    assert!(
        ws_via(&server, b"PROXY TCP4 203.0.113.9 127.0.0.1 40001 443\r\n")
            .await
            .is_err()
    );
    // Ordinary clients are unaffected.
    let (_a, hello) = Ws::join(&server).await;
    assert_eq!(hello["type"], "id");
    server.stop().await;
}

#[tokio::test]
async fn the_connection_cap_counts_the_client_a_trusted_balancer_names_not_the_balancer() {
    let server = TestServer::start(|_, o| {
        o.proxy_protocol_from = Some(vec!["127.0.0.1/32".parse().unwrap()]);
        o.connections_per_ip = Some(2);
    })
    .await;
    let via = |client: &'static str, port: u16| {
        let header = format!("PROXY TCP4 {client} 127.0.0.1 {port} 443\r\n");
        let server = &server;
        async move {
            let mut tcp = TcpStream::connect(server.addrs.https).await.unwrap();
            tcp.write_all(header.as_bytes()).await.unwrap();
            server
                .client(&[b"http/1.1"])
                .connect(ServerName::try_from("localhost").unwrap(), tcp)
                .await
        }
    };
    // Two connections from one client through the balancer: its cap of two.
    let _a = via("203.0.113.9", 40001).await.unwrap();
    let _b = via("203.0.113.9", 40002).await.unwrap();
    assert!(
        via("203.0.113.9", 40003).await.is_err(),
        "a third from the same client is refused"
    );
    // The balancer itself (127.0.0.1) already has three connections open; other clients through
    // it are still admitted, since the balancer's own address is not capped per address.
    let mut others = Vec::new();
    for port in 0..4 {
        others.push(via("198.51.100.4", 41000 + port).await);
    }
    assert_eq!(
        others.iter().filter(|c| c.is_ok()).count(),
        2,
        "another client gets its own two"
    );
    let third = via("192.0.2.1", 42000).await.unwrap();
    assert_eq!(
        H1::over(third).await.get("/healthz").await.status,
        hyper::StatusCode::OK
    );
    server.stop().await;
}
