//! Automatic HTTPS against a real ACME server: Debian's `pebble` with `pebble-challtestsrv` as the
//! DNS that resolves the test name to 127.0.0.1. Pebble's validation ports point at callgate's
//! test listeners, so TLS-ALPN-01 and HTTP-01 are answered by the real server over real sockets.
//! Without the tools these tests print why and pass, except under `CI=true`, where a missing tool
//! is a failure.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use callgate::config::{AcmeChallenge, Options, Seconds};
use common::*;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

/// The name callgate orders a certificate for; challtestsrv resolves every name to 127.0.0.1.
const NAME: &str = "call.callgate.test";

/// Whether pebble and challtestsrv are installed (in CI a missing one fails the test).
fn pebble_installed() -> bool {
    require_tool("pebble", "pebble") && require_tool("pebble-challtestsrv", "pebble")
}

/// A free loopback TCP port (bound and released; good enough on loopback in one test).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A free loopback port for both UDP and TCP (the DNS server binds both).
fn free_dns_port() -> u16 {
    loop {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = udp.local_addr().unwrap().port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// Pebble's own TLS: a small CA and a leaf for 127.0.0.1/localhost signed by it (rustls refuses
/// a self-signed CA certificate used as a server certificate).
struct PebbleTls {
    ca_pem: PathBuf,
    cert_pem: PathBuf,
    key_pem: PathBuf,
    ca_der: CertificateDer<'static>,
}

impl PebbleTls {
    fn generate(dir: &Path) -> PebbleTls {
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "pebble test CA");
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
        let leaf_params =
            rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let leaf = leaf_params.signed_by(&leaf_key, &ca).unwrap();
        let tls = PebbleTls {
            ca_pem: dir.join("pebble-ca.pem"),
            cert_pem: dir.join("pebble-cert.pem"),
            key_pem: dir.join("pebble-key.pem"),
            ca_der: ca.der().clone(),
        };
        std::fs::write(&tls.ca_pem, ca.pem()).unwrap();
        std::fs::write(&tls.cert_pem, leaf.pem()).unwrap();
        std::fs::write(&tls.key_pem, leaf_key.serialize_pem()).unwrap();
        tls
    }
}

/// What a pebble instance is told at start.
struct PebbleSettings {
    /// Where callgate's plain-HTTP listener is (HTTP-01 is validated there).
    http_port: u16,
    /// Where callgate's HTTPS listener is (TLS-ALPN-01 is validated there).
    tls_port: u16,
    /// Certificate lifetime in seconds (0: pebble's default of five years).
    validity_seconds: u64,
    /// Names pebble refuses to issue for.
    blocked: Vec<String>,
    /// Point pebble at a DNS server that is not there, so no name resolves.
    dns_down: bool,
}

/// A running pebble and its DNS, killed on drop.
struct Pebble {
    listen: u16,
    management: u16,
    tls_ca: CertificateDer<'static>,
    _children: Vec<Child>,
}

/// Ports and TLS files decided before pebble starts (callgate needs the directory URL first).
struct PebblePlan {
    dir: PathBuf,
    listen: u16,
    management: u16,
    tls: PebbleTls,
}

impl PebblePlan {
    fn new(dir: &Path) -> PebblePlan {
        PebblePlan {
            dir: dir.to_owned(),
            listen: free_port(),
            management: free_port(),
            tls: PebbleTls::generate(dir),
        }
    }

    fn directory(&self) -> String {
        format!("https://127.0.0.1:{}/dir", self.listen)
    }

    /// Sets callgate's ACME options to order `NAME` from this pebble.
    fn configure(&self, options: &mut Options, domain: &str, challenge: AcmeChallenge) {
        options.acme_domain = Some(vec![domain.to_owned()]);
        options.acme_email = Some("ops@callgate.test".into());
        options.acme_directory = Some(self.directory());
        options.acme_directory_ca = Some(self.tls.ca_pem.clone());
        options.acme_challenge = Some(challenge);
        options.acme_retry_delay = Some(Seconds(Duration::from_secs(1)));
    }

    async fn start(&self, settings: PebbleSettings) -> Pebble {
        let dns = free_dns_port();
        let log = |name: &str| {
            Stdio::from(std::fs::File::create(self.dir.join(format!("{name}.log"))).unwrap())
        };
        let challtestsrv = Command::new("pebble-challtestsrv")
            .args([
                "-defaultIPv4",
                "127.0.0.1",
                "-defaultIPv6",
                "",
                "-dns01",
                &format!("127.0.0.1:{dns}"),
                "-http01",
                "",
                "-https01",
                "",
                "-tlsalpn01",
                "",
                "-management",
                &format!("127.0.0.1:{}", free_port()),
            ])
            .stdout(log("challtestsrv"))
            .stderr(log("challtestsrv.err"))
            .kill_on_drop(true)
            .spawn()
            .expect("pebble-challtestsrv starts");
        let config = serde_json::json!({
            "pebble": {
                "listenAddress": format!("127.0.0.1:{}", self.listen),
                "managementListenAddress": format!("127.0.0.1:{}", self.management),
                "certificate": self.tls.cert_pem,
                "privateKey": self.tls.key_pem,
                "httpPort": settings.http_port,
                "tlsPort": settings.tls_port,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": false,
                "domainBlocklist": settings.blocked,
                "certificateValidityPeriod": settings.validity_seconds,
            }
        });
        let config_path = self.dir.join("pebble.json");
        std::fs::write(&config_path, config.to_string()).unwrap();
        let pebble = Command::new("pebble")
            .arg("-config")
            .arg(&config_path)
            .args([
                "-dnsserver",
                &format!(
                    "127.0.0.1:{}",
                    if settings.dns_down {
                        free_dns_port()
                    } else {
                        dns
                    }
                ),
            ])
            .env("PEBBLE_VA_NOSLEEP", "1")
            .stdout(log("pebble"))
            .stderr(log("pebble.err"))
            .kill_on_drop(true)
            .spawn()
            .expect("pebble starts");
        let running = Pebble {
            listen: self.listen,
            management: self.management,
            tls_ca: self.tls.ca_der.clone(),
            _children: vec![challtestsrv, pebble],
        };
        running.wait_until_listening().await;
        running
    }
}

impl Pebble {
    async fn wait_until_listening(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        for port in [self.listen, self.management] {
            while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "pebble did not listen on {port}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    /// The root that signs the certificates this pebble issues (new at every pebble start).
    async fn issuing_root(&self) -> CertificateDer<'static> {
        let tls = connect(
            &tls_client(std::slice::from_ref(&self.tls_ca), &[b"http/1.1"]),
            SocketAddr::from(([127, 0, 0, 1], self.management)),
        )
        .await
        .expect("pebble's management port speaks TLS with the test CA");
        let pem = H1::over(tls).await.get("/roots/0").await;
        assert_eq!(pem.status, 200);
        use rustls::pki_types::pem::PemObject;
        CertificateDer::from_pem_slice(&pem.body).expect("a PEM root")
    }
}

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
