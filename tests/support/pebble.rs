//! A real ACME server for tests: Debian's `pebble`, with `pebble-challtestsrv` as the DNS that
//! resolves every name to 127.0.0.1. Pebble's validation ports are set per test (a callgate
//! listener, or a load balancer in front of several). Needs `mod common;` in the test crate.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use callgate::config::{AcmeChallenge, Options, Seconds};
use rustls::pki_types::CertificateDer;
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

use crate::common::{connect, require_tool, tls_client, H1};

/// Whether pebble and challtestsrv are installed (in CI a missing one fails the test).
pub fn pebble_installed() -> bool {
    require_tool("pebble", "pebble") && require_tool("pebble-challtestsrv", "pebble")
}

/// A free loopback TCP port (bound and released; good enough on loopback in one test).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A free loopback port for both UDP and TCP (the DNS server binds both).
pub fn free_dns_port() -> u16 {
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
pub struct PebbleTls {
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
pub struct PebbleSettings {
    /// Where callgate's plain-HTTP listener is (HTTP-01 is validated there).
    pub http_port: u16,
    /// Where callgate's HTTPS listener is (TLS-ALPN-01 is validated there).
    pub tls_port: u16,
    /// Certificate lifetime in seconds (0: pebble's default of five years).
    pub validity_seconds: u64,
    /// Names pebble refuses to issue for.
    pub blocked: Vec<String>,
    /// Point pebble at a DNS server that is not there, so no name resolves.
    pub dns_down: bool,
}

/// A running pebble and its DNS, killed on drop.
pub struct Pebble {
    pub listen: u16,
    pub management: u16,
    pub tls_ca: CertificateDer<'static>,
    _children: Vec<Child>,
}

/// Ports and TLS files decided before pebble starts (callgate needs the directory URL first).
pub struct PebblePlan {
    dir: PathBuf,
    /// The directory's port (known before pebble starts).
    pub listen: u16,
    management: u16,
    tls: PebbleTls,
}

impl PebblePlan {
    pub fn new(dir: &Path) -> PebblePlan {
        PebblePlan {
            dir: dir.to_owned(),
            listen: free_port(),
            management: free_port(),
            tls: PebbleTls::generate(dir),
        }
    }

    /// How many lines of pebble's log (every request it handles is one: "GET /dir -> calling
    /// handler()") contain `needle`, so far.
    pub fn log_count(&self, needle: &str) -> usize {
        std::fs::read_to_string(self.dir.join("pebble.log"))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(needle))
            .count()
    }

    pub fn directory(&self) -> String {
        format!("https://127.0.0.1:{}/dir", self.listen)
    }

    /// Sets callgate's ACME options to order `NAME` from this pebble.
    pub fn configure(&self, options: &mut Options, domain: &str, challenge: AcmeChallenge) {
        options.acme_domain = Some(vec![domain.to_owned()]);
        options.acme_email = Some("ops@callgate.test".into());
        options.acme_directory = Some(self.directory());
        options.acme_directory_ca = Some(self.tls.ca_pem.clone());
        options.acme_challenge = Some(challenge);
        options.acme_retry_delay = Some(Seconds(Duration::from_secs(1)));
    }

    /// The same ACME settings as command-line flags, for a `callgate` binary.
    pub fn flags(&self, domain: &str, challenge: &str) -> Vec<String> {
        [
            "--acme-domain",
            domain,
            "--acme-email",
            "ops@callgate.test",
            "--acme-directory",
            &self.directory(),
            "--acme-directory-ca",
            self.tls.ca_pem.to_str().unwrap(),
            "--acme-challenge",
            challenge,
            "--acme-retry-delay",
            "1s",
        ]
        .map(str::to_owned)
        .to_vec()
    }

    pub async fn start(&self, settings: PebbleSettings) -> Pebble {
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
    pub async fn wait_until_listening(&self) {
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
    pub async fn issuing_root(&self) -> CertificateDer<'static> {
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
