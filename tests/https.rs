//! The HTTPS foundation over real TLS sockets: certificates, ALPN, static files, headers, limits.

mod common;

use std::time::Duration;

use common::*;
use hyper::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn serves_the_app_over_http1_and_http2_with_the_generated_certificate() {
    let server = TestServer::start(|_, _| {}).await;
    assert!(
        server.cert_path.exists(),
        "a development certificate was generated"
    );

    let h1 = connect(&server.client(&[b"http/1.1"]), server.addrs.https)
        .await
        .unwrap();
    assert_eq!(h1.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let page = H1::over(h1).await.get("/").await;
    assert_eq!(page.status, StatusCode::OK);
    assert_eq!(page.version, hyper::Version::HTTP_11);
    assert!(std::str::from_utf8(&page.body)
        .unwrap()
        .contains("<title>callgate</title>"));
    assert_eq!(page.headers["content-type"], "text/html; charset=utf-8");

    let h2 = connect(&server.client(&[b"h2", b"http/1.1"]), server.addrs.https)
        .await
        .unwrap();
    assert_eq!(h2.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let mut h2 = H2::over(h2).await;
    let script = h2.get("/scripts/client.js").await;
    assert_eq!(script.status, StatusCode::OK);
    assert_eq!(script.version, hyper::Version::HTTP_2);
    assert!(script.headers["content-type"]
        .to_str()
        .unwrap()
        .contains("javascript"));
    let css = h2.get("/styles/styles.css").await;
    assert!(css.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/css"));
    server.stop().await;
}

#[tokio::test]
async fn refuses_a_client_that_does_not_trust_the_certificate() {
    let server = TestServer::start(|_, _| {}).await;
    let other = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let stranger = tls_client(&[other.cert.der().clone()], &[b"http/1.1"]);
    assert!(connect(&stranger, server.addrs.https).await.is_err());
    server.stop().await;
}

#[tokio::test]
async fn etag_revalidation_ranges_head_and_errors() {
    let server = TestServer::start(|_, _| {}).await;
    let tls = connect(&server.client(&[b"http/1.1"]), server.addrs.https)
        .await
        .unwrap();
    let mut client = H1::over(tls).await;

    let first = client.get("/scripts/client.js").await;
    let etag = first.headers["etag"].clone();
    assert!(first.headers.contains_key("last-modified"));
    assert_eq!(
        first.headers["cache-control"],
        "public, max-age=600, must-revalidate"
    );
    let page = client.get("/").await;
    assert_eq!(
        page.headers["cache-control"], "no-cache",
        "index.html must be revalidated"
    );

    let mut conditional = get("/scripts/client.js");
    conditional.headers_mut().insert("if-none-match", etag);
    let not_modified = client.send(conditional).await.unwrap();
    assert_eq!(not_modified.status, StatusCode::NOT_MODIFIED);
    assert!(not_modified.body.is_empty());

    let mut ranged = get("/scripts/client.js");
    ranged
        .headers_mut()
        .insert("range", "bytes=0-9".parse().unwrap());
    let partial = client.send(ranged).await.unwrap();
    assert_eq!(partial.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(partial.body, first.body.slice(0..10));

    let mut head = get("/");
    *head.method_mut() = hyper::Method::HEAD;
    let head = client.send(head).await.unwrap();
    assert_eq!(head.status, StatusCode::OK);
    assert!(head.body.is_empty());
    assert_eq!(head.headers["content-length"], page.body.len().to_string());

    let missing = client.get("/nope.html").await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert_eq!(&missing.body[..], b"not found\n");

    let mut post = get("/");
    *post.method_mut() = hyper::Method::POST;
    let post = client.send(post).await.unwrap();
    assert_eq!(post.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(post.headers["allow"], "GET, HEAD");
    server.stop().await;
}

#[tokio::test]
async fn serves_precompressed_files_to_clients_that_accept_them() {
    let server = TestServer::start(|dir, _| {
        std::fs::write(dir.join("public/big.txt"), "plain").unwrap();
        std::fs::write(dir.join("public/big.txt.gz"), "pretend-gzip").unwrap();
    })
    .await;
    let tls = connect(&server.client(&[b"http/1.1"]), server.addrs.https)
        .await
        .unwrap();
    let mut client = H1::over(tls).await;
    let mut gz = get("/big.txt");
    gz.headers_mut()
        .insert("accept-encoding", "gzip, br".parse().unwrap());
    let gz = client.send(gz).await.unwrap();
    assert_eq!(gz.headers["content-encoding"], "gzip");
    assert_eq!(&gz.body[..], b"pretend-gzip");
    assert!(gz.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    assert_eq!(gz.headers["vary"], "accept-encoding");
    let plain = client.get("/big.txt").await;
    assert!(!plain.headers.contains_key("content-encoding"));
    assert_eq!(&plain.body[..], b"plain");
    server.stop().await;
}

#[tokio::test]
async fn no_form_of_path_traversal_reads_outside_public() {
    let server = TestServer::start(|dir, _| {
        std::fs::write(dir.join("secret.txt"), "TOP SECRET").unwrap();
        std::os::unix::fs::symlink(dir.join("secret.txt"), dir.join("public/link.txt")).unwrap();
        std::os::unix::fs::symlink(dir, dir.join("public/up")).unwrap();
        std::fs::write(dir.join("public/.hidden"), "dotfile").unwrap();
    })
    .await;
    let attempts = [
        "/../secret.txt",
        "/%2e%2e/secret.txt",
        "/%2E%2E/secret.txt",
        "/scripts/..%2f..%2fsecret.txt",
        "/scripts/%2e%2e%2f%2e%2e%2fsecret.txt",
        "/..%5csecret.txt",
        "/scripts\\..\\..\\secret.txt",
        "/secret.txt%00.html",
        "/link.txt",
        "/up/secret.txt",
        "/.hidden",
        "/%252e%252e/secret.txt",
    ];
    for path in attempts {
        // Raw bytes on the wire: no client-side normalisation of the path.
        let tls = connect(&server.client(&[b"http/1.1"]), server.addrs.https)
            .await
            .unwrap();
        let response = raw_exchange(
            tls,
            &format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"),
        )
        .await;
        let status_line = response.lines().next().unwrap_or_default().to_owned();
        assert!(
            !response.contains("TOP SECRET") && !response.contains("dotfile"),
            "{path} leaked: {response}"
        );
        assert!(
            status_line.contains(" 400 ") || status_line.contains(" 404 "),
            "{path} answered {status_line}"
        );
    }
    server.stop().await;
}

async fn raw_exchange<S>(mut stream: S, request: &str) -> String
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = stream.read_to_end(&mut out).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn security_headers_are_on_every_https_response() {
    let server = TestServer::start(|_, _| {}).await;
    for path in ["/", "/nope", "/healthz", "/%2e%2e/x"] {
        let response = https_get(&server, path).await;
        let h = &response.headers;
        assert_eq!(h["strict-transport-security"], "max-age=31536000", "{path}");
        assert_eq!(h["x-content-type-options"], "nosniff", "{path}");
        assert_eq!(h["referrer-policy"], "no-referrer", "{path}");
        let csp = h["content-security-policy"].to_str().unwrap();
        for directive in [
            "default-src 'none'",
            "connect-src 'self'",
            "media-src 'self' blob: mediastream:",
            "frame-ancestors 'none'",
        ] {
            assert!(
                csp.contains(directive),
                "{path}: CSP lacks {directive}: {csp}"
            );
        }
        let permissions = h["permissions-policy"].to_str().unwrap();
        for feature in [
            "camera=(self)",
            "microphone=(self)",
            "display-capture=(self)",
        ] {
            assert!(permissions.contains(feature), "{path}: {permissions}");
        }
    }
    server.stop().await;
}

#[tokio::test]
async fn plain_http_only_redirects_and_answers_health() {
    let server = TestServer::start(|_, _| {}).await;
    let http = server.addrs.http.unwrap();
    let https_port = server.addrs.https.port();
    let mut client = H1::over(TcpStream::connect(http).await.unwrap()).await;

    let mut req = get("/call?id=123");
    req.headers_mut().insert(
        "host",
        format!("localhost:{}", http.port()).parse().unwrap(),
    );
    let redirect = client.send(req).await.unwrap();
    assert_eq!(redirect.status, StatusCode::PERMANENT_REDIRECT);
    assert_eq!(
        redirect.headers["location"],
        format!("https://localhost:{https_port}/call?id=123")
    );

    let health = client.get("/healthz").await;
    assert_eq!(health.status, StatusCode::OK);
    assert_eq!(&health.body[..], b"ok\n");

    let mut bad_host = get("/");
    bad_host
        .headers_mut()
        .insert("host", "evil.example/@x".parse().unwrap());
    assert_eq!(
        client.send(bad_host).await.unwrap().status,
        StatusCode::BAD_REQUEST
    );
    server.stop().await;
}

#[tokio::test]
async fn acme_challenges_are_served_over_plain_http_from_the_configured_directory() {
    let server = TestServer::start(|dir, o| {
        std::fs::create_dir(dir.join("acme")).unwrap();
        std::fs::write(dir.join("acme/tok-EN_42"), "tok-EN_42.keyauth").unwrap();
        std::fs::write(dir.join("secret.txt"), "TOP SECRET").unwrap();
        o.acme_challenge_dir = Some(dir.join("acme"));
    })
    .await;
    let mut client = H1::over(
        TcpStream::connect(server.addrs.http.unwrap())
            .await
            .unwrap(),
    )
    .await;
    let found = client.get("/.well-known/acme-challenge/tok-EN_42").await;
    assert_eq!(
        (found.status, &found.body[..]),
        (StatusCode::OK, &b"tok-EN_42.keyauth"[..])
    );
    let missing = client.get("/.well-known/acme-challenge/nope").await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    // Anything that is not a plain token is just redirected, never read.
    let escape = client
        .get("/.well-known/acme-challenge/..%2f..%2fsecret.txt")
        .await;
    assert_eq!(escape.status, StatusCode::PERMANENT_REDIRECT);
    assert!(!String::from_utf8_lossy(&escape.body).contains("SECRET"));
    server.stop().await;
}

#[tokio::test]
async fn health_and_readiness() {
    let server = TestServer::start(|_, _| {}).await;
    let health = https_get(&server, "/healthz").await;
    assert_eq!(
        (health.status, &health.body[..]),
        (StatusCode::OK, &b"ok\n"[..])
    );
    assert_eq!(health.headers["cache-control"], "no-store");
    let ready = https_get(&server, "/readyz").await;
    assert_eq!(
        (ready.status, &ready.body[..]),
        (StatusCode::OK, &b"ready\n"[..])
    );
    server.stop().await;
}

#[tokio::test]
async fn hot_reload_serves_the_new_certificate_to_new_connections_only() {
    let server = TestServer::start(|_, _| {}).await;
    let old_cert = server.cert_der();
    let mut status = server.certs.subscribe();

    // An open connection made with the old certificate.
    let old_client = server.client(&[b"http/1.1"]);
    let mut old_conn = H1::over(connect(&old_client, server.addrs.https).await.unwrap()).await;
    assert_eq!(old_conn.get("/healthz").await.status, StatusCode::OK);

    let new_cert = write_new_cert(&server.cert_path, &server.key_path);
    // (A reload may catch the new key before the new certificate and fail once first.)
    let failures_before =
        tokio::time::timeout(Duration::from_secs(10), status.wait_for(|s| s.reloads == 1))
            .await
            .expect("reload observed")
            .unwrap()
            .failures;

    // New connections get the new certificate; a client trusting only the old one now fails.
    let both = tls_client(&[old_cert.clone(), new_cert.clone()], &[b"http/1.1"]);
    let fresh = connect(&both, server.addrs.https).await.unwrap();
    assert_eq!(fresh.get_ref().1.peer_certificates().unwrap()[0], new_cert);
    // (A fresh client: the old one could resume its TLS session without seeing a certificate.)
    let trusts_old_only = tls_client(std::slice::from_ref(&old_cert), &[b"http/1.1"]);
    assert!(connect(&trusts_old_only, server.addrs.https).await.is_err());
    // The old connection keeps working.
    assert_eq!(old_conn.get("/healthz").await.status, StatusCode::OK);

    // A broken key keeps the current certificate serving and reports why.
    std::fs::write(&server.key_path, "not a key").unwrap();
    let failed = tokio::time::timeout(
        Duration::from_secs(10),
        status.wait_for(|s| s.failures > failures_before),
    )
    .await
    .expect("failed reload observed")
    .unwrap()
    .clone();
    let error = failed.last_error.unwrap();
    assert!(
        error.contains("key.pem") && error.contains("no private key found"),
        "{error}"
    );
    let still = connect(&both, server.addrs.https).await.unwrap();
    assert_eq!(still.get_ref().1.peer_certificates().unwrap()[0], new_cert);
    server.stop().await;
}

#[tokio::test]
async fn a_slow_header_sender_is_cut_off_while_others_are_served() {
    let server = TestServer::start(|_, o| {
        o.header_read_timeout = Some(callgate::config::Seconds(Duration::from_secs(1)));
    })
    .await;
    let slow = connect(&server.client(&[b"http/1.1"]), server.addrs.https)
        .await
        .unwrap();
    let (mut slow_read, mut slow_write) = tokio::io::split(slow);
    let request = format!(
        "GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Padding: {}\r\n\r\n",
        "a".repeat(100)
    );
    // One byte every 50 ms: the whole head would take over 6 s, far over the 1 s limit.
    let dribble = tokio::spawn(async move {
        let mut sent = 0;
        for byte in request.as_bytes() {
            if slow_write.write_all(&[*byte]).await.is_err() {
                break;
            }
            sent += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        (sent, request.len())
    });
    // Meanwhile, another client is served normally.
    let fetched = https_get(&server, "/").await;
    assert_eq!(fetched.status, StatusCode::OK);

    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), slow_read.read_to_end(&mut answer))
        .await
        .expect("the server closes the slow connection")
        .ok();
    assert!(
        !dribble.is_finished(),
        "cut off before the head was complete"
    );
    dribble.abort();
    let text = String::from_utf8_lossy(&answer);
    assert!(
        !text.contains("200 OK"),
        "the slow request must not be served: {text}"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_silent_tls_client_is_cut_off_by_the_handshake_timeout() {
    let server = TestServer::start(|_, o| {
        o.tls_handshake_timeout = Some(callgate::config::Seconds(Duration::from_millis(500)));
    })
    .await;
    let mut silent = TcpStream::connect(server.addrs.https).await.unwrap();
    let mut buf = [0u8; 16];
    let closed = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut buf)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "connection closed by the server"
    );
    server.stop().await;
}

#[tokio::test]
async fn idle_http2_connections_are_closed() {
    let server = TestServer::start(|_, o| {
        o.idle_timeout = Some(callgate::config::Seconds(Duration::from_secs(1)));
    })
    .await;
    let tls = connect(&server.client(&[b"h2"]), server.addrs.https)
        .await
        .unwrap();
    let mut h2 = H2::over(tls).await;
    assert_eq!(h2.get("/healthz").await.status, StatusCode::OK);
    tokio::time::timeout(Duration::from_secs(10), &mut h2.closed)
        .await
        .expect("idle connection closed by the server")
        .unwrap()
        .ok();
    server.stop().await;
}

#[tokio::test]
async fn connections_over_the_cap_are_refused_and_others_still_served() {
    let server = TestServer::start(|_, o| o.max_connections = Some(2)).await;
    let client = server.client(&[b"http/1.1"]);
    let mut a = H1::over(connect(&client, server.addrs.https).await.unwrap()).await;
    let mut b = H1::over(connect(&client, server.addrs.https).await.unwrap()).await;
    assert_eq!(a.get("/healthz").await.status, StatusCode::OK);
    assert_eq!(b.get("/healthz").await.status, StatusCode::OK);
    assert!(
        connect(&client, server.addrs.https).await.is_err(),
        "third connection refused"
    );
    assert_eq!(
        a.get("/healthz").await.status,
        StatusCode::OK,
        "existing connections unaffected"
    );
    drop(a);
    // Once a slot is free, new connections are served again.
    let mut served = false;
    for _ in 0..50 {
        if let Ok(tls) = connect(&client, server.addrs.https).await {
            served = H1::over(tls).await.send(get("/healthz")).await.is_ok();
            if served {
                break;
            }
        }
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(served, "a freed slot admits a new connection");
    server.stop().await;
}

#[tokio::test]
async fn the_default_wildcard_listener_is_dual_stack() {
    let server = TestServer::start(|_, o| {
        o.https_listen = Some("[::]:0".parse().unwrap());
        o.connections_per_ip = Some(2);
    })
    .await;
    let port = server.addrs.https.port();
    let client = server.client(&[b"http/1.1"]);
    // IPv4 clients arrive as ::ffff:127.0.0.1 and are counted as 127.0.0.1: two are served over
    // IPv4, a third is refused at accept, and IPv6 (another address) is still served.
    let v4 = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut a = H1::over(connect(&client, v4).await.unwrap()).await;
    assert_eq!(
        a.get("/healthz").await.status,
        StatusCode::OK,
        "served over IPv4"
    );
    let _b = connect(&client, v4).await.unwrap();
    assert!(
        connect(&client, v4).await.is_err(),
        "the per-address cap sees IPv4-mapped clients as their IPv4 address"
    );
    let v6 = std::net::SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port));
    let tls = connect(&client, v6).await.unwrap();
    assert_eq!(
        H1::over(tls).await.get("/healthz").await.status,
        StatusCode::OK,
        "served over IPv6"
    );
    server.stop().await;
}
