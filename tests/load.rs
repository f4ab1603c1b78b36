//! `callgate-load` against a real server in this process, over real TLS: each scenario runs briefly
//! with a few connections and must finish with zero errors and one parseable JSON line. These are
//! correctness tests of the tool (and of the gateway under a little concurrent load), never timing
//! tests.

mod common;

use std::path::Path;

use callgate::config::Options;
use common::TestServer;

/// Per-IP and per-connection limits out of the way, as docs/PERFORMANCE.md tells a load test to.
fn generous(_dir: &Path, o: &mut Options) {
    o.ws_upgrades_per_second = Some(100_000);
    o.ws_connections_per_ip = Some(100_000);
    o.ws_messages_per_second = Some(100_000);
    o.ws_message_burst = Some(100_000);
    o.ws_calls_per_minute = Some(100_000);
}

/// Runs `callgate-load <args>` against `server`, trusting its certificate and reading this
/// process's /proc as the server's; returns the JSON line after checking the exit status.
async fn load(server: &TestServer, args: &[&str]) -> serde_json::Value {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_callgate-load"))
        .arg("--target")
        .arg(server.addrs.https.to_string())
        .arg("--ca")
        .arg(&server.cert_path)
        .arg("--server-pid")
        .arg(std::process::id().to_string())
        .args(args)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(std::time::Duration::from_secs(60), output)
        .await
        .expect("callgate-load finishes within 60 s")
        .expect("callgate-load runs");
    let stdout = String::from_utf8(output.stdout).expect("UTF-8 output");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{args:?} failed:\n{stderr}\n{stdout}"
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "exactly one JSON line on stdout: {stdout}");
    serde_json::from_str(lines[0]).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_closed_loop_completes_round_trips_without_errors() {
    let server = TestServer::start(generous).await;
    let report = load(
        &server,
        &[
            "relay",
            "--pairs",
            "3",
            "--duration",
            "1",
            "--warmup",
            "0.2",
        ],
    )
    .await;
    assert_eq!(report["scenario"], "relay");
    assert_eq!(report["mode"], "closed");
    assert_eq!(report["errors"], 0, "{report}");
    assert_eq!(report["lost"], 0, "{report}");
    let round_trips = report["round_trips"].as_u64().unwrap();
    assert!(round_trips > 0, "{report}");
    assert_eq!(report["latency"]["count"].as_u64(), Some(round_trips));
    assert!(
        report["server"]["rss_kib"].as_u64().unwrap() > 0,
        "{report}"
    );
    assert!(report["server"]["cpu_us_per_message"].as_f64().unwrap() > 0.0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_open_loop_sends_every_scheduled_offer() {
    let server = TestServer::start(generous).await;
    let report = load(
        &server,
        &[
            "relay",
            "--pairs",
            "4",
            "--rate",
            "100",
            "--duration",
            "1",
            "--warmup",
            "0.2",
        ],
    )
    .await;
    assert_eq!(report["mode"], "open");
    assert_eq!(report["errors"], 0, "{report}");
    assert_eq!(report["lost"], 0, "{report}");
    // 100 round trips/s for 1 s, every one scheduled in the window and answered.
    assert_eq!(report["round_trips"], 100, "{report}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_all_open_and_stay_open() {
    let server = TestServer::start(generous).await;
    let report = load(
        &server,
        &[
            "--sources",
            "4",
            "idle",
            "--connections",
            "40",
            "--hold",
            "1",
            "--settle",
            "0.2",
        ],
    )
    .await;
    assert_eq!(report["open"], 40, "{report}");
    assert_eq!(report["dropped"], 0, "{report}");
    assert_eq!(report["errors"], 0, "{report}");
    assert!(report["probe"]["count"].as_u64().unwrap() > 0, "{report}");
    assert!(report["server"]["rss_per_connection_bytes"].is_number());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_cycles_complete_without_errors() {
    let server = TestServer::start(generous).await;
    let report = load(&server, &["churn", "--rate", "20", "--duration", "1"]).await;
    assert_eq!(report["scheduled"], 20, "{report}");
    assert_eq!(report["completed"], 20, "{report}");
    assert_eq!(report["errors"], 0, "{report}");
    server.stop().await;
}

#[tokio::test]
async fn refuses_targets_that_are_not_loopback() {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_callgate-load"))
        .args(["--target", "192.0.2.1:443", "--insecure", "relay"])
        .output()
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("not a loopback address"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_spreads_pairs_over_several_targets() {
    let first = TestServer::start(generous).await;
    let second = TestServer::start(generous).await;
    // One trust file for both servers' certificates, as for a cluster's nodes.
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("both.pem");
    let mut pem = std::fs::read(&first.cert_path).unwrap();
    pem.extend(std::fs::read(&second.cert_path).unwrap());
    std::fs::write(&ca, pem).unwrap();
    let targets = format!("{},{}", first.addrs.https, second.addrs.https);
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_callgate-load"))
        .args(["--target", &targets, "--ca"])
        .arg(&ca)
        .args(["--server-pid", &std::process::id().to_string()])
        // Two independent servers, not a cluster: each pair must stay on its node.
        .args(["relay", "--pairs", "4", "--placement", "local"])
        .args(["--duration", "1", "--warmup", "0.2"])
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(std::time::Duration::from_secs(60), output)
        .await
        .expect("callgate-load finishes within 60 s")
        .expect("callgate-load runs");
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(
        output.status.success(),
        "{}\n{stdout}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(report["nodes"], 2, "{report}");
    assert_eq!(report["placement"], "local", "{report}");
    assert_eq!(report["errors"], 0, "{report}");
    assert!(report["round_trips"].as_u64().unwrap() > 0, "{report}");
    // Pairs took the servers in turn: each set up two of the four calls.
    for server in [&first, &second] {
        let text = String::from_utf8(common::scrape(server, None).await.body.to_vec()).unwrap();
        assert_eq!(
            common::sample(&text, "callgate_calls_attempted_total"),
            Some(2.0),
            "{text}"
        );
    }
    first.stop().await;
    second.stop().await;
}
