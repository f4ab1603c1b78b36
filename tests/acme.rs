//! Automatic HTTPS against a real ACME server: Debian's `pebble` with `pebble-challtestsrv` as the
//! DNS that resolves the test name to 127.0.0.1. Pebble's validation ports point at callgate's
//! test listeners, so TLS-ALPN-01 and HTTP-01 are answered by the real server over real sockets.
//! Without the tools these tests print why and pass, except under `CI=true`, where a missing tool
//! is a failure.

mod common;
#[path = "support/pebble.rs"]
mod pebble;

use std::path::Path;
use std::time::Duration;

use callgate::config::AcmeChallenge;
use common::*;
use pebble::{free_port, pebble_installed, PebblePlan, PebbleSettings};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;

/// The name callgate orders a certificate for; challtestsrv resolves every name to 127.0.0.1.
const NAME: &str = "call.callgate.test";

/// Waits until the server's certificate has been replaced `count` times in all.
async fn wait_for_issue(server: &TestServer, count: u64, within: Duration) {
    let mut status = server.certs.subscribe();
    tokio::time::timeout(within, status.wait_for(|s| s.reloads >= count))
        .await
        .unwrap_or_else(|_| panic!("no ACME certificate #{count} within {within:?}"))
        .unwrap();
}

/// Scrapes `series` until `done` holds for its value (or fails after `within`).
async fn wait_for_metric(
    server: &TestServer,
    series: &str,
    within: Duration,
    done: impl Fn(f64) -> bool,
) -> f64 {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let text = String::from_utf8(scrape(server, None).await.body.to_vec()).unwrap();
        if let Some(value) = sample(&text, series).filter(|v| done(*v)) {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{series} did not reach the expected value within {within:?}:\n{}",
            text.lines()
                .filter(|l| l.starts_with("callgate_acme"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn metric(server: &TestServer, series: &str) -> Option<f64> {
    let text = String::from_utf8(scrape(server, None).await.body.to_vec()).unwrap();
    sample(&text, series)
}

/// The leaf certificate a client verifying `name` against `root` gets from the HTTPS listener.
async fn served_leaf(
    server: &TestServer,
    root: &CertificateDer<'static>,
    name: &str,
) -> std::io::Result<CertificateDer<'static>> {
    let tcp = TcpStream::connect(server.addrs.https).await?;
    let tls = tls_client(std::slice::from_ref(root), &[b"http/1.1"])
        .connect(ServerName::try_from(name.to_owned()).unwrap(), tcp)
        .await?;
    let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    // The certificate serves the app, not just a handshake.
    let page = H1::over(tls).await.get("/").await;
    assert_eq!(page.status, 200);
    Ok(leaf)
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// Starts a callgate with ACME from `plan`, its certs in `certs`.
async fn callgate(
    plan: &PebblePlan,
    certs: &Path,
    domain: &str,
    challenge: AcmeChallenge,
) -> TestServer {
    let certs = certs.to_owned();
    TestServer::start(|_, options| {
        options.certs_dir = Some(certs);
        plan.configure(options, domain, challenge);
    })
    .await
}

#[tokio::test]
async fn obtains_serves_and_keeps_a_certificate_over_tls_alpn_01() {
    if !pebble_installed() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let plan = PebblePlan::new(dir.path());
    let certs = dir.path().join("certs");
    let server = callgate(&plan, &certs, NAME, AcmeChallenge::TlsAlpn01).await;
    let pebble = plan
        .start(PebbleSettings {
            http_port: free_port(), // nothing there: only TLS-ALPN-01 can succeed
            tls_port: server.addrs.https.port(),
            validity_seconds: 0,
            blocked: vec![],
            dns_down: false,
        })
        .await;
    wait_for_issue(&server, 1, Duration::from_secs(60)).await;

    let root = pebble.issuing_root().await;
    let leaf = served_leaf(&server, &root, NAME)
        .await
        .expect("the ACME certificate verifies for the name against pebble's root");
    // Orders: the one that succeeded, plus any tried before pebble was listening.
    let early = metric(
        &server,
        "callgate_acme_failures_total{reason=\"directory\"}",
    )
    .await
    .unwrap_or(0.0);
    assert_eq!(
        metric(&server, "callgate_acme_orders_total").await,
        Some(1.0 + early)
    );
    assert_eq!(
        metric(
            &server,
            "callgate_acme_certificates_issued_total{kind=\"first\"}"
        )
        .await,
        Some(1.0)
    );
    let next = metric(&server, "callgate_acme_next_renewal_timestamp_seconds")
        .await
        .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        next > now + 86_400.0,
        "next renewal is far ahead: {next} vs {now}"
    );

    // Safe modes on everything ACME keeps.
    let store = std::fs::read_dir(certs.join("acme"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    assert_eq!(mode(&certs.join("acme")), 0o700);
    assert_eq!(mode(&store), 0o700);
    for file in ["account.json", "cert.pem", "key.pem"] {
        assert_eq!(mode(&store.join(file)), 0o600, "{file}");
    }
    server.stop().await;
    drop(pebble);

    // A restart serves the stored certificate at once and orders nothing, even with the CA gone.
    let again = callgate(&plan, &certs, NAME, AcmeChallenge::TlsAlpn01).await;
    let served = served_leaf(&again, &root, NAME)
        .await
        .expect("the stored certificate is served from the start");
    assert_eq!(served, leaf);
    // Let the task look at the certificate and schedule its renewal, then check it did not order.
    wait_for_metric(
        &again,
        "callgate_acme_next_renewal_timestamp_seconds",
        Duration::from_secs(10),
        |v| v > now + 86_400.0,
    )
    .await;
    assert_eq!(
        metric(&again, "callgate_acme_orders_total").await,
        Some(0.0)
    );
    again.stop().await;
}

#[tokio::test]
async fn renews_a_short_lived_certificate_over_http_01_without_dropping_a_connection() {
    if !pebble_installed() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let plan = PebblePlan::new(dir.path());
    let server = callgate(
        &plan,
        &dir.path().join("certs"),
        NAME,
        AcmeChallenge::Http01,
    )
    .await;
    let pebble = plan
        .start(PebbleSettings {
            http_port: server.addrs.http.unwrap().port(),
            tls_port: free_port(), // nothing there: only HTTP-01 can succeed
            validity_seconds: 9,
            blocked: vec![],
            dns_down: false,
        })
        .await;
    wait_for_issue(&server, 1, Duration::from_secs(60)).await;
    let root = pebble.issuing_root().await;
    let first = served_leaf(&server, &root, NAME).await.unwrap();

    // A connection opened on the first certificate...
    let tcp = TcpStream::connect(server.addrs.https).await.unwrap();
    let tls = tls_client(std::slice::from_ref(&root), &[b"http/1.1"])
        .connect(ServerName::try_from(NAME).unwrap(), tcp)
        .await
        .unwrap();
    let mut open = H1::over(tls).await;
    assert_eq!(open.get("/").await.status, 200);

    // ...renewal with a third of the 9 s lifetime left (about 6 s in)...
    wait_for_issue(&server, 2, Duration::from_secs(60)).await;
    let second = served_leaf(&server, &root, NAME).await.unwrap();
    assert_ne!(first, second, "new handshakes get the renewed certificate");
    assert!(
        metric(
            &server,
            "callgate_acme_certificates_issued_total{kind=\"renewal\"}"
        )
        .await
        .unwrap()
            >= 1.0
    );
    // ...and the open connection keeps working.
    assert_eq!(open.get("/").await.status, 200);
    server.stop().await;
}

#[tokio::test]
async fn keeps_serving_and_retries_while_the_ca_is_down_or_refuses() {
    if !pebble_installed() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let plan = PebblePlan::new(dir.path());
    // The CA is down: the order fails as "directory", the development certificate keeps serving.
    let server = callgate(&plan, &dir.path().join("a"), NAME, AcmeChallenge::Auto).await;
    wait_for_metric(
        &server,
        "callgate_acme_failures_total{reason=\"directory\"}",
        Duration::from_secs(20),
        |v| v >= 1.0,
    )
    .await;
    // While failing, the due time stays in the past (what CallgateAcmeRenewalFailing watches).
    let due = metric(&server, "callgate_acme_next_renewal_timestamp_seconds")
        .await
        .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(due > 0.0 && due <= now, "due {due}, now {now}");
    let dev = https_get(&server, "/").await;
    assert_eq!(
        dev.status, 200,
        "the development certificate is still served"
    );
    assert_eq!(server.certs.subscribe().borrow().reloads, 0);

    // A second server whose name the CA refuses.
    let refused = callgate(
        &plan,
        &dir.path().join("b"),
        "blocked.callgate.test",
        AcmeChallenge::Auto,
    )
    .await;

    // The CA comes up: the retry (back-off from 1 s) gets the first server its certificate.
    let pebble = plan
        .start(PebbleSettings {
            http_port: server.addrs.http.unwrap().port(),
            tls_port: server.addrs.https.port(),
            validity_seconds: 0,
            blocked: vec!["blocked.callgate.test".into()],
            dns_down: false,
        })
        .await;
    wait_for_issue(&server, 1, Duration::from_secs(60)).await;
    let root = pebble.issuing_root().await;
    served_leaf(&server, &root, NAME).await.unwrap();

    // The refused order is counted as such and the refused server keeps its dev certificate.
    wait_for_metric(
        &refused,
        "callgate_acme_failures_total{reason=\"refused\"}",
        Duration::from_secs(60),
        |v| v >= 1.0,
    )
    .await;
    assert_eq!(https_get(&refused, "/").await.status, 200);
    assert_eq!(refused.certs.subscribe().borrow().reloads, 0);
    refused.stop().await;
    server.stop().await;
}

#[tokio::test]
async fn auto_falls_back_to_http_01_when_the_ca_cannot_reach_the_https_port() {
    if !pebble_installed() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let plan = PebblePlan::new(dir.path());
    let server = callgate(&plan, &dir.path().join("certs"), NAME, AcmeChallenge::Auto).await;
    let pebble = plan
        .start(PebbleSettings {
            http_port: server.addrs.http.unwrap().port(),
            tls_port: free_port(), // "443" is closed: TLS-ALPN-01 fails as unreachable
            validity_seconds: 0,
            blocked: vec![],
            dns_down: false,
        })
        .await;
    wait_for_issue(&server, 1, Duration::from_secs(60)).await;
    assert!(
        metric(
            &server,
            "callgate_acme_failures_total{reason=\"unreachable\"}"
        )
        .await
        .unwrap()
            >= 1.0,
        "TLS-ALPN-01 was tried first and failed as unreachable"
    );
    let root = pebble.issuing_root().await;
    served_leaf(&server, &root, NAME).await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn a_name_the_ca_cannot_resolve_is_reported_as_dns() {
    if !pebble_installed() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();

    let plan = PebblePlan::new(dir.path());
    let server = callgate(&plan, &dir.path().join("certs"), NAME, AcmeChallenge::Auto).await;
    let _pebble = plan
        .start(PebbleSettings {
            http_port: server.addrs.http.unwrap().port(),
            tls_port: server.addrs.https.port(),
            validity_seconds: 0,
            blocked: vec![],
            dns_down: true,
        })
        .await;
    wait_for_metric(
        &server,
        "callgate_acme_failures_total{reason=\"dns\"}",
        Duration::from_secs(60),
        |v| v >= 1.0,
    )
    .await;
    assert_eq!(server.certs.subscribe().borrow().reloads, 0);
    assert_eq!(https_get(&server, "/").await.status, 200);
    server.stop().await;
}
