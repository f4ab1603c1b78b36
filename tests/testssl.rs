//! testssl.sh (Debian package `testssl.sh`, command `testssl`) against the real server's HTTPS and
//! TURN-over-TLS listeners: no finding rated MEDIUM or higher, other than the few only a public
//! CA's certificate can clear, which are listed in [`PUBLIC_CA_ONLY`].
//!
//! The scan stays on loopback and makes no outside lookups: `--nodns none`, and no `--phone-out`
//! (so no CRL download or OCSP query). It runs the checks that matter for a TLS endpoint —
//! protocols, cipher categories, forward secrecy, server preference, certificate, vulnerabilities
//! (and HTTP security headers on HTTPS) — and leaves out the per-cipher listing and the client
//! simulations, which report nothing rated and take most of a full run's time.
//!
//! Without `testssl` these tests print why and pass — except under `CI=true`, where a missing tool
//! is a failure.

mod common;

use std::time::{Duration, Instant};

use common::TestServer;
use tokio::process::Command;

/// Findings a self-signed (development) certificate always has and only a certificate from a
/// public CA can clear, with why. Anything else rated MEDIUM or higher fails the test.
const PUBLIC_CA_ONLY: [(&str, &str); 5] = [
    (
        "cert_chain_of_trust",
        "self-signed: no public CA vouches for it",
    ),
    (
        "cert_revocation",
        "neither CRL nor OCSP URI: only a CA publishes revocation",
    ),
    ("OCSP_stapling", "no OCSP responder to staple from"),
    (
        "certificate_transparency",
        "only CA-issued certificates are logged",
    ),
    ("DNS_CAArecord", "a DNS record of the real domain"),
];

/// Findings about the scanning host, not the server.
const SCANNER_ONLY: [(&str, &str); 1] = [(
    "engine_problem",
    "the local OpenSSL lacks the GOST engine; says nothing about the server",
)];

/// Checks that must appear in the report, so that a scan that silently did nothing fails.
const EXPECTED: [&str; 8] = [
    "TLS1_3",
    "cipherlist_STRONG",
    "PFS",
    "cipher_order",
    "cert_validityPeriod",
    "cert_expirationStatus",
    "heartbleed",
    "ROBOT",
];

/// The testssl binary, or `None` (test skipped) outside CI.
fn testssl() -> Option<String> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .flat_map(|p| [p.join("testssl"), p.join("testssl.sh")])
            .find(|p| p.is_file())
    });
    match found {
        Some(p) => Some(p.to_string_lossy().into_owned()),
        None if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("testssl is required under CI=true: apt-get install testssl.sh")
        }
        None => {
            eprintln!("skipping: testssl not found (apt-get install testssl.sh)");
            None
        }
    }
}

/// One finding of testssl's flat JSON output.
#[derive(Debug, serde::Deserialize)]
struct Finding {
    id: String,
    severity: String,
    finding: String,
}

/// Scans `addr` and returns its findings.
async fn scan(testssl: &str, addr: std::net::SocketAddr, http: bool) -> Vec<Finding> {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("findings.json");
    let mut args = vec![
        "--quiet",
        "--color",
        "0",
        "--nodns",
        "none",
        "--warnings",
        "off",
        "--connect-timeout",
        "30",
        "--openssl-timeout",
        "30",
        "--protocols",
        "--std",
        "--fs",
        "--server-preference",
        "--server-defaults",
        "--vulnerable",
    ];
    if http {
        args.push("--headers");
    }
    let target = addr.to_string();
    let json_arg = json.to_string_lossy().into_owned();
    args.extend(["--jsonfile", &json_arg, &target]);
    let started = Instant::now();
    let run = Command::new(testssl)
        .args(&args)
        .env("TMPDIR", dir.path())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(600), run)
        .await
        .expect("testssl finishes within 10 minutes")
        .expect("testssl runs");
    eprintln!(
        "testssl {target}: {:.0?}, exit {:?}",
        started.elapsed(),
        output.status.code()
    );
    let text = std::fs::read_to_string(&json).unwrap_or_else(|e| {
        panic!(
            "testssl wrote no JSON ({e}); its output:\n{}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    });
    serde_json::from_str(&text).expect("testssl's JSON is a list of findings")
}

/// Whether a finding is a scan problem (testssl's WARN, e.g. "check failed because of connect
/// problem" on a loaded machine) rather than a verdict about the server.
fn scan_problem(f: &Finding) -> bool {
    f.severity == "WARN" && !SCANNER_ONLY.iter().any(|(id, _)| f.id == *id)
}

/// Scans `addr`, once more if the first scan had a problem (a loaded CI machine makes single
/// checks time out); the second scan's findings are final.
async fn scan_twice_if_needed(
    testssl: &str,
    addr: std::net::SocketAddr,
    http: bool,
) -> Vec<Finding> {
    let findings = scan(testssl, addr, http).await;
    if !findings.iter().any(scan_problem) {
        return findings;
    }
    eprintln!("testssl {addr}: scan problems, scanning again");
    scan(testssl, addr, http).await
}

/// Fails on every finding rated MEDIUM or higher (or WARN: a scan problem) not in the exception
/// lists, and on a report missing the expected checks.
fn assert_clean(listener: &str, findings: &[Finding]) {
    for finding in findings {
        eprintln!(
            "{listener}: {:8} {} {}",
            finding.severity, finding.id, finding.finding
        );
    }
    // With several certificates testssl suffixes ids with " <cert#N>".
    let base = |f: &Finding| f.id.split_whitespace().next().unwrap_or("").to_owned();
    let excepted = |id: &str| {
        PUBLIC_CA_ONLY
            .iter()
            .chain(SCANNER_ONLY.iter())
            .any(|(known, _)| *known == id)
    };
    let bad: Vec<String> = findings
        .iter()
        .filter(|f| matches!(f.severity.as_str(), "MEDIUM" | "HIGH" | "CRITICAL" | "WARN"))
        .filter(|f| !excepted(&base(f)))
        .map(|f| format!("{} {}: {}", f.severity, f.id, f.finding))
        .collect();
    assert!(
        bad.is_empty(),
        "{listener}: testssl findings rated MEDIUM or higher:\n{}",
        bad.join("\n")
    );
    for id in EXPECTED {
        assert!(
            findings.iter().any(|f| base(f) == id),
            "{listener}: testssl did not report {id}; the scan did not run fully"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn https_listener_passes_testssl() {
    let Some(testssl) = testssl() else { return };
    let server = TestServer::start(|_, _| {}).await;
    let findings = scan_twice_if_needed(&testssl, server.addrs.https, true).await;
    assert_clean("HTTPS", &findings);
    assert!(
        findings
            .iter()
            .any(|f| f.id == "HSTS_time" && f.severity == "OK"),
        "HTTPS: HSTS not reported as OK"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn turn_tls_listener_passes_testssl() {
    let Some(testssl) = testssl() else { return };
    let server = TestServer::start(|_, _| {}).await;
    let turn_tls = *server.addrs.turn_tls.first().expect("TURN-TLS listener");
    let findings = scan_twice_if_needed(&testssl, turn_tls, false).await;
    assert_clean("TURN-TLS", &findings);
    server.stop().await;
}
