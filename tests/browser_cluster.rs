//! A browser call across two cluster nodes, and the call surviving the death of one of them:
//! runs `tests/e2e/cluster_call.test.js` (real Chromium through playwright-core, fake camera)
//! against a real `redis-server`, two real `callgate` nodes sharing it, and a real HAProxy
//! started from `ops/haproxy/haproxy.cfg`.
//!
//! The placement is fixed so the test always exercises the cross-node path: page 1 opens the app
//! through HAProxy, whose `balance` is set to `first` here (every other option is the shipped
//! file's), so it lands on node A while A lives and on node B once A is gone; page 2 opens node B
//! directly. The JavaScript test stops node A itself (by the PID given here) at the moment it
//! chooses — SIGKILL (death) in one test, SIGTERM (drain: /readyz 503, then WebSockets closed
//! with 1001) in the other — then checks that page 1 resumes on B with the same ID and the call
//! goes on.
//!
//! Needs `node`, `/usr/bin/chromium`, `tests/e2e/node_modules` (`npm ci --prefix tests/e2e`),
//! `redis-server` and `haproxy`. Without them the test explains what is missing and passes,
//! except under `CI=true`, where a missing tool is a failure.

mod common;
#[path = "support/haproxy.rs"]
mod haproxy;
#[path = "support/nodes.rs"]
mod nodes;
#[path = "support/redis.rs"]
mod redis_server;

use std::path::Path;
use std::process::Command;

use haproxy::Haproxy;
use nodes::Cluster;
use redis_server::RedisServer;

const CHROMIUM: &str = "/usr/bin/chromium";

/// What is missing to run the browser side, in words a developer can act on.
fn missing_prerequisites(e2e: &Path) -> Vec<String> {
    let mut missing = Vec::new();
    let node = Command::new("node").arg("--version").output();
    if !matches!(&node, Ok(out) if out.status.success()) {
        missing.push("`node` is not on PATH (apt-get install nodejs npm)".to_owned());
    }
    if !Path::new(CHROMIUM).exists() {
        missing.push(format!(
            "{CHROMIUM} does not exist (apt-get install chromium)"
        ));
    }
    if !e2e.join("node_modules").join("playwright-core").exists() {
        missing.push(format!(
            "{}/node_modules is not installed (npm ci --prefix tests/e2e)",
            e2e.display()
        ));
    }
    missing
}

/// One cluster browser run at a time: each starts Chromium, two nodes and HAProxy.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test]
async fn a_browser_call_across_two_nodes_survives_the_death_of_one() {
    cluster_call("SIGKILL").await;
}

#[tokio::test]
async fn a_browser_call_across_two_nodes_survives_a_drain_of_one() {
    cluster_call("SIGTERM").await;
}

/// Runs `cluster_call.test.js`, which stops node A with `signal` mid-call (`SIGKILL`: death;
/// `SIGTERM`: drain, clients told 1001 after `shutdown-drain-delay`).
async fn cluster_call(signal: &str) {
    let _serial = ONE_AT_A_TIME.lock().await;
    let e2e = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("e2e");
    let missing = missing_prerequisites(&e2e);
    if !missing.is_empty() {
        let why = format!(
            "the cluster browser test cannot run: {}",
            missing.join("; ")
        );
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{why}");
        }
        eprintln!("skipping: {why}");
        return;
    }
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let cluster = Cluster::new(redis.url());
    let (cert, _) = cluster.dev_cert();
    let settings = [
        // Only HAProxy's connections (from 127.0.0.2) carry a PROXY header; page 2 connects to
        // node B directly from 127.0.0.1, as a plain client.
        "--proxy-protocol-from",
        "127.0.0.2",
        // Both browsers are on this machine: the relays must reach each other on loopback.
        "--allowed-peer-ip",
        "127.0.0.1",
        // A drained node answers /readyz 503 this long before it closes its WebSockets with
        // 1001: HAProxy (check every 1 s, fall 2) has taken it out by then.
        "--shutdown-drain-delay",
        "3s",
    ];
    let a = cluster.start("node-a", &settings).await;
    let b = cluster.start("node-b", &settings).await;
    let Some(balancer) = Haproxy::start_balanced(
        &[a.https, b.https],
        "127.0.0.2".parse().unwrap(),
        Some("first"),
    ) else {
        return;
    };

    let output = tokio::process::Command::new("node")
        .args(["--test", "--test-reporter=spec", "cluster_call.test.js"])
        .current_dir(&e2e)
        .env("CHROMIUM_PATH", CHROMIUM)
        .env(
            "CALLGATE_CLUSTER_LB",
            format!("https://127.0.0.1:{}", balancer.addr.port()),
        )
        .env("CALLGATE_CLUSTER_NODE_B", format!("https://{}", b.https))
        .env(
            "CALLGATE_CLUSTER_NODE_A_PID",
            a.pid().expect("node A runs").to_string(),
        )
        .env(
            "CALLGATE_CLUSTER_METRICS_A",
            format!("http://{}/metrics", a.metrics),
        )
        .env(
            "CALLGATE_CLUSTER_METRICS_B",
            format!("http://{}/metrics", b.metrics),
        )
        .env("CALLGATE_CLUSTER_CERT", &cert)
        .env("CALLGATE_CLUSTER_STOP", signal)
        .output()
        .await
        .expect("node starts");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    eprintln!("{stderr}");
    if !output.status.success() {
        eprintln!("--- node A's log\n{}", a.log_text());
        eprintln!("--- node B's log\n{}", b.log_text());
    }
    assert!(
        output.status.success(),
        "the cluster browser test failed ({}); its output and the nodes' logs are above",
        output.status
    );
    // Node A is gone (killed, or drained and exited), and node B served both pages to the end.
    let mut a = a;
    if signal == "SIGTERM" {
        assert_eq!(
            a.wait_exit(std::time::Duration::from_secs(15)).await,
            Some(0),
            "a drained node exits 0"
        );
    }
    assert!(!a.is_running(), "the browser test stopped node A");
    assert!(
        b.log_count("panicked") == 0,
        "node B panicked:\n{}",
        b.log_text()
    );
}
