//! The real `callgate` binary: configuration checks, signals, draining.

mod common;
#[path = "support/turn_rawclient.rs"]
mod raw;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::*;
use http_body_util::BodyExt;
use hyper::StatusCode;

const BIN: &str = env!("CARGO_BIN_EXE_callgate");

/// A running binary whose stderr (JSON logs) is read line by line.
struct Running {
    child: Child,
    lines: mpsc::Receiver<String>,
    https: SocketAddr,
    /// Every listener URL from the "callgate ready" line.
    listeners: Vec<String>,
}

impl Running {
    fn start(dir: &Path, extra: &[&str]) -> Running {
        let mut child = Command::new(BIN)
            .args([
                "--https-listen",
                "127.0.0.1:0",
                "--http-listen",
                "off",
                "--metrics-listen",
                "127.0.0.1:0",
                "--listening-ip",
                "127.0.0.1",
                "--listening-port",
                "0",
                "--tls-listening-port",
                "0",
                "--log-format",
                "json",
            ])
            .arg("--public-dir")
            .arg(dir.join("public"))
            .arg("--certs-dir")
            .arg(dir.join("certs"))
            .args(extra)
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut running = Running {
            child,
            lines,
            https: "0.0.0.0:0".parse().unwrap(),
            listeners: Vec::new(),
        };
        let ready = running.wait_for_log("callgate ready");
        let event: serde_json::Value = serde_json::from_str(&ready).unwrap();
        let url = event["listeners"].as_str().unwrap();
        running.listeners = url.split(", ").map(str::to_owned).collect();
        let first = &running.listeners[0];
        running.https = first.trim_start_matches("https://").parse().unwrap();
        running
    }

    /// The first listener with this scheme (e.g. "turn+udp").
    fn listener(&self, scheme: &str) -> SocketAddr {
        let prefix = format!("{scheme}://");
        self.listeners
            .iter()
            .find_map(|l| l.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("no {scheme} listener in {:?}", self.listeners))
            .parse()
            .unwrap()
    }

    /// Blocks until a log line contains `needle`, returning it; panics after 30 s.
    fn wait_for_log(&self, needle: &str) -> String {
        loop {
            let line = self
                .lines
                .recv_timeout(Duration::from_secs(30))
                .unwrap_or_else(|_| panic!("no log line containing {needle:?}"));
            if line.contains(needle) {
                return line;
            }
        }
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([format!("-{name}"), self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for exit (at most 30 s) and returns the exit code.
    fn wait(mut self) -> Option<i32> {
        let pid = self.child.id();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || tx.send(self.child.wait().unwrap().code()));
        rx.recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
                panic!("callgate did not exit within 30 s");
            })
    }
}

fn temp_app() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    copy_public(dir.path());
    dir
}

fn trust(dir: &Path) -> tokio_rustls::TlsConnector {
    tls_client(&[read_cert(&dir.join("certs/cert.pem"))], &[b"http/1.1"])
}

#[test]
fn check_config_rejects_a_bad_file_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("callgate.toml");
    std::fs::write(
        &file,
        "https-listen = \"0.0.0.0:8443\"\nidle-timeout = \"forever\"\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&file)
        .arg("check-config")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("idle-timeout"), "{stderr}");
    assert!(stderr.contains("callgate.toml"), "{stderr}");

    std::fs::write(&file, "htps-listen = \"0.0.0.0:8443\"\n").unwrap();
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&file)
        .arg("check-config")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("htps-listen"));

    let out = Command::new(BIN)
        .args(["--max-connections", "0", "check-config"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("max-connections: must be at least 1"));
}

#[test]
fn check_config_prints_the_effective_config_with_flags_over_env_over_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("callgate.toml");
    std::fs::write(
        &file,
        "https-listen = \"127.0.0.1:1111\"\nhttp-listen = \"127.0.0.1:2222\"\nidle-timeout = 90\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&file)
        .args(["--https-listen", "127.0.0.1:3333", "check-config"])
        .env("CALLGATE_HTTP_LISTEN", "off")
        .env("CALLGATE_IDLE_TIMEOUT", "2m")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        printed.contains("https-listen = \"127.0.0.1:3333\""),
        "{printed}"
    );
    assert!(printed.contains("http-listen = \"off\""), "{printed}");
    assert!(printed.contains("idle-timeout = \"120s\""), "{printed}");
}

#[test]
fn check_config_masks_secrets() {
    let out = Command::new(BIN)
        .args([
            "--static-auth-secret",
            "turn-secret-0123456789",
            "check-config",
        ])
        .env("CALLGATE_METRICS_TOKEN", "metrics-token-0123456789")
        .env("CALLGATE_TURN_API_KEY", "api-key-0123456789abcdef")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8_lossy(&out.stdout);
    for secret in [
        "turn-secret-0123456789",
        "metrics-token-0123456789",
        "api-key-0123456789abcdef",
    ] {
        assert!(!printed.contains(secret), "{secret} printed:\n{printed}");
    }
    assert!(printed.contains("metrics-token = \"***\""), "{printed}");
    assert!(
        printed.contains("static-auth-secret = [\"***\"]"),
        "{printed}"
    );
}

#[test]
fn the_example_config_in_ops_is_valid() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("ops/callgate.toml");
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&example)
        .arg("check-config")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn cargo_run_starts_the_gateway() {
    // The README's first command is `cargo run --release`; with the load generator beside the
    // gateway, cargo must know which binary that means.
    let out = Command::new(env!("CARGO"))
        .args(["run", "--quiet", "--", "--version"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "cargo run failed: {stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.starts_with("callgate "), "{stdout}");
}

#[test]
fn help_lists_every_setting() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--https-listen",
        "--http-listen",
        "--tls-cert",
        "--public-dir",
        "--max-connections",
        "--shutdown-timeout",
        "--log-format",
        "CALLGATE_HTTPS_LISTEN",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}");
    }
}

#[test]
fn help_says_which_directory_certbot_webroot_needs_and_lists_the_acme_settings() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    // certbot --webroot -w W writes W/.well-known/acme-challenge/<token>; callgate reads DIR/<token>.
    assert!(
        help.contains("For `certbot --webroot -w W` pass W/.well-known/acme-challenge (not W)"),
        "{help}"
    );
    for flag in [
        "--acme-domain",
        "--acme-email",
        "--acme-directory ",
        "--acme-directory-ca",
        "--acme-challenge ",
        "--acme-retry-delay",
        "CALLGATE_ACME_DOMAIN",
        "https://acme-staging-v02.api.letsencrypt.org/directory",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_reports_not_ready_finishes_in_flight_downloads_and_exits() {
    let dir = temp_app();
    let big: Vec<u8> = (0..16 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
    std::fs::write(dir.path().join("public/big.bin"), &big).unwrap();
    let running = Running::start(
        dir.path(),
        &["--shutdown-drain-delay", "1s", "--shutdown-timeout", "20s"],
    );
    let tls = trust(dir.path());

    // A download in flight: read only its head before the signal.
    let conn = connect(&tls, running.https).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(conn))
            .await
            .unwrap();
    tokio::spawn(connection);
    let response = sender.send_request(get("/big.bin")).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);

    running.signal("TERM");
    // The log line comes after readiness is withdrawn (the signal's own line comes before).
    running.wait_for_log("/readyz now reports 503");
    // During the drain delay new requests are still answered, but readiness is withdrawn.
    let ready = H1::over(connect(&tls, running.https).await.unwrap())
        .await
        .get("/readyz")
        .await;
    assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE);

    // The in-flight download completes in full.
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body.len(), big.len());
    assert!(body[..] == big[..]);

    running.wait_for_log("shutdown complete");
    let code = tokio::task::spawn_blocking(move || running.wait())
        .await
        .unwrap();
    assert_eq!(code, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_live_turn_allocations_stops_the_relay_within_the_shutdown_timeout() {
    let dir = temp_app();
    let running = Running::start(
        dir.path(),
        &[
            "--static-auth-secret",
            raw::SECRET,
            "--shutdown-timeout",
            "5s",
        ],
    );
    let udp = running.listener("turn+udp");
    let tcp = running.listener("turn+tcp");
    let mut over_udp = raw::RawClient::udp(udp, "udp-user").await;
    over_udp.allocate().await.expect("allocates over UDP");
    let mut over_tcp = raw::RawClient::tcp(tcp, "tcp-user").await;
    over_tcp.allocate().await.expect("allocates over TCP");
    // A TLS client mid-handshake too: it must not hold the exit either.
    let _stalled_tls = tokio::net::TcpStream::connect(running.listener("turns"))
        .await
        .unwrap();

    let started = std::time::Instant::now();
    running.signal("TERM");
    // The drain, bounded by shutdown-timeout, includes the relay: it completes, not times out.
    // (Were the relay still running at the timeout, the log would say "shutdown timeout reached"
    // and this would fail when the process exits.)
    running.wait_for_log("shutdown complete");
    let code = tokio::task::spawn_blocking(move || running.wait())
        .await
        .unwrap();
    assert_eq!(code, Some(0));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "exited after {:?}",
        started.elapsed()
    );
    // Every relay socket is closed with the process.
    tokio::net::UdpSocket::bind(udp)
        .await
        .expect("UDP port free");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_exits_at_once() {
    let dir = temp_app();
    let running = Running::start(dir.path(), &["--shutdown-drain-delay", "60s"]);
    running.signal("TERM");
    running.wait_for_log("SIGTERM received");
    running.signal("INT");
    let code = tokio::task::spawn_blocking(move || running.wait())
        .await
        .unwrap();
    assert_eq!(code, Some(130));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_certificate() {
    let dir = temp_app();
    let running = Running::start(dir.path(), &["--tls-reload-interval", "1h"]);
    let new_cert = write_new_cert(
        &dir.path().join("certs/cert.pem"),
        &dir.path().join("certs/key.pem"),
    );
    running.signal("HUP");
    running.wait_for_log("certificate reloaded");
    let fresh = connect(
        &tls_client(std::slice::from_ref(&new_cert), &[b"http/1.1"]),
        running.https,
    )
    .await
    .unwrap();
    assert_eq!(fresh.get_ref().1.peer_certificates().unwrap()[0], new_cert);
    running.signal("TERM");
    let code = tokio::task::spawn_blocking(move || running.wait())
        .await
        .unwrap();
    assert_eq!(code, Some(0));
}

#[test]
fn a_missing_certificate_file_is_a_clear_startup_error() {
    let dir = temp_app();
    let out = Command::new(BIN)
        .args([
            "--https-listen",
            "127.0.0.1:0",
            "--http-listen",
            "off",
            "--tls-cert",
        ])
        .arg(dir.path().join("nope.pem"))
        .arg("--tls-key")
        .arg(dir.path().join("nope.key"))
        .arg("--public-dir")
        .arg(dir.path().join("public"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("nope.pem: cannot read"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_addresses_are_logged_for_operators() {
    let dir = temp_app();
    let running = Running::start(dir.path(), &["--ws-upgrades-per-second", "1"]);
    let tls = trust(dir.path());
    let upgrade = || {
        hyper::Request::get("/socket")
            .header("host", "localhost")
            .header("upgrade", "websocket")
            .header("connection", "upgrade")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
            .header("sec-websocket-version", "13")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap()
    };
    let mut statuses = Vec::new();
    for _ in 0..3 {
        let mut client = H1::over(connect(&tls, running.https).await.unwrap()).await;
        statuses.push(client.send(upgrade()).await.unwrap().status);
    }
    assert!(
        statuses.contains(&StatusCode::TOO_MANY_REQUESTS),
        "{statuses:?}"
    );
    let line = running.wait_for_log("refused by a per-address limit");
    let event: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(event["client"], "127.0.0.1");
    assert_eq!(event["limit"], "ws-upgrades-per-second");
    running.signal("TERM");
    let code = tokio::task::spawn_blocking(move || running.wait())
        .await
        .unwrap();
    assert_eq!(code, Some(0));
}
