//! `callgate-load` across the nodes of a real cluster: two `callgate` binaries sharing one real
//! `redis-server`, every pair's caller on one node and its callee on the other, so every
//! forwarded message crosses between the nodes. A correctness test of the tool and of the
//! cross-node path under a little concurrent load — never a timing test (docs/PERFORMANCE.md has
//! the numbers). Without redis-server it prints why and passes, except under `CI=true`.

mod common;
#[path = "support/nodes.rs"]
mod nodes;
#[path = "support/redis.rs"]
mod redis_server;

use std::time::Duration;

use nodes::Cluster;
use redis_server::RedisServer;

/// Per-IP and per-connection limits out of the way, as docs/PERFORMANCE.md tells a load test to.
const GENEROUS: [&str; 10] = [
    "--ws-upgrades-per-second",
    "100000",
    "--ws-connections-per-ip",
    "100000",
    "--ws-messages-per-second",
    "100000",
    "--ws-message-burst",
    "100000",
    "--ws-calls-per-minute",
    "100000",
];

const SENT: &str = r#"callgate_cluster_messages_total{direction="sent"}"#;
const RECEIVED: &str = r#"callgate_cluster_messages_total{direction="received"}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_pairs_across_two_nodes_lose_nothing_and_every_message_crosses() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let cluster = Cluster::new(redis.url());
    let (cert, _) = cluster.dev_cert();
    let a = cluster.start("node-a", &GENEROUS).await;
    let b = cluster.start("node-b", &GENEROUS).await;
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_callgate-load"))
        .args(["--target", &format!("{},{}", a.https, b.https), "--ca"])
        .arg(&cert)
        .args([
            "--server-pid",
            &format!("{},{}", a.pid().unwrap(), b.pid().unwrap()),
        ])
        .args([
            "relay",
            "--pairs",
            "8",
            "--rate",
            "100",
            "--placement",
            "cross",
        ])
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
        "{}\n{stdout}\n--- node A\n{}\n--- node B\n{}",
        String::from_utf8_lossy(&output.stderr),
        a.log_text(),
        b.log_text()
    );
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(report["nodes"], 2, "{report}");
    assert_eq!(report["placement"], "cross", "{report}");
    assert_eq!(report["errors"], 0, "{report}");
    assert_eq!(report["lost"], 0, "{report}");
    // 100 round trips/s for 1 s, every one scheduled in the window and answered.
    assert_eq!(report["round_trips"], 100, "{report}");
    assert!(report["server"]["cpu_us_per_message"].as_f64().unwrap() > 0.0);
    // Each node's own CPU over the window, in the order of --server-pid; both worked.
    let per_node = report["server"]["cpu_s_per_pid"].as_array().unwrap();
    assert_eq!(per_node.len(), 2, "{report}");
    assert!(
        per_node.iter().all(|cpu| cpu.as_f64().unwrap() > 0.0),
        "{report}"
    );
    // Each pair's offers go A → B and its answers B → A: both nodes sent and received at least
    // the 2 × (100 + warm-up) messages of the run, each exactly once.
    for node in [&a, &b] {
        let (sent, received) = (node.metric(SENT).await, node.metric(RECEIVED).await);
        assert!(
            sent >= 100.0 && received >= 100.0,
            "node {}: sent {sent}, received {received}",
            node.id
        );
    }
    let total_sent = a.metric(SENT).await + b.metric(SENT).await;
    let total_received = a.metric(RECEIVED).await + b.metric(RECEIVED).await;
    assert_eq!(
        total_sent, total_received,
        "every published message arrived once"
    );
}

const IN_PROGRESS: &str = "callgate_calls_in_progress";
const ANSWERED: &str = r#"callgate_calls_total{outcome="answered"}"#;
const UNANSWERED: &str = r#"callgate_calls_total{outcome="unanswered"}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// Failed before xnode's `177ec00`: Answered was observed on the callee's node and Offered and Ended
/// on the caller's, so all 8 answered calls also counted as unanswered and calls_in_progress stayed
/// at 4 on each callee's node.
async fn call_metrics_add_up_across_nodes_after_every_call_ended() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let cluster = Cluster::new(redis.url());
    let (cert, _) = cluster.dev_cert();
    let a = cluster.start("node-a", &GENEROUS).await;
    let b = cluster.start("node-b", &GENEROUS).await;
    // 8 calls, each between the two nodes; callgate-load hangs every one up before it exits.
    let status = tokio::process::Command::new(env!("CARGO_BIN_EXE_callgate-load"))
        .args(["--target", &format!("{},{}", a.https, b.https), "--ca"])
        .arg(&cert)
        .args([
            "relay",
            "--pairs",
            "8",
            "--rate",
            "40",
            "--placement",
            "cross",
        ])
        .args(["--duration", "0.5", "--warmup", "0"])
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .status()
        .await
        .expect("callgate-load runs");
    assert!(status.success());
    let sum = |series: &'static str| {
        let (a, b) = (&a, &b);
        async move { a.metric(series).await + b.metric(series).await }
    };
    assert_eq!(sum(ANSWERED).await, 8.0, "each answered call counted once");
    assert_eq!(
        sum(UNANSWERED).await,
        0.0,
        "no answered call counted as unanswered"
    );
    for node in [&a, &b] {
        node.wait_for_metric(IN_PROGRESS, |n| n == 0.0, Duration::from_secs(5))
            .await;
    }
}
