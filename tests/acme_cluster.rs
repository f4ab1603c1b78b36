//! Automatic HTTPS for a cluster: real `callgate` nodes sharing a real `redis-server`, a real
//! ACME server (pebble + challtestsrv) and, in front, HAProxy from `ops/haproxy/haproxy.cfg` — the
//! CA's validation goes through the balancer, so it lands on a node that may not be the one that
//! ordered. One order serves every node; renewal reaches every node; a node killed mid-order
//! leaves its lock to lapse and another completes; a failed order hands the lock back and its
//! back-off is the cluster's; one node asks the CA for renewal information and the others read
//! its answer; Redis down leaves every node serving.
//! Without pebble, redis-server or haproxy these tests print why and pass — except under
//! `CI=true`, where a missing tool fails them.

mod common;
#[path = "support/haproxy.rs"]
mod haproxy;
#[path = "support/nodes.rs"]
mod nodes;
#[path = "support/pebble.rs"]
mod pebble;
#[path = "support/redis.rs"]
mod redis_server;

use std::net::SocketAddr;
use std::time::Duration;

use common::{tls_client, H1};
use haproxy::Haproxy;
use nodes::{Cluster, Node};
use pebble::{free_port, pebble_installed, PebblePlan, PebbleSettings};
use redis::Commands;
use redis_server::RedisServer;
use rustls::pki_types::{CertificateDer, ServerName};

/// The name ordered; challtestsrv resolves every name to 127.0.0.1.
const NAME: &str = "call.callgate.test";
const ORDERS: &str = "callgate_acme_orders_total";
const FIRST: &str = "callgate_acme_certificates_issued_total{kind=\"first\"}";
const RENEWAL: &str = "callgate_acme_certificates_issued_total{kind=\"renewal\"}";
const EXPIRY: &str = "callgate_certificate_expiry_timestamp_seconds";

/// The Redis key prefix of `plan`'s directory (`cg:acme:<slug>:`).
fn prefix(plan: &PebblePlan) -> String {
    format!("cg:acme:127.0.0.1_{}_dir:", plan.listen)
}

/// Awaits `node` having the next order to itself: it holds the ordering lock (`<node>:<fence>`),
/// or it failed the last order and backs off (the `pause` is its: no other node orders before
/// it retries).
async fn wait_for_lock(redis: &RedisServer, plan: &PebblePlan, node: &str, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let lock: Option<String> = redis.client().get(format!("{}lock", prefix(plan))).unwrap();
        let pause: Option<String> = redis
            .client()
            .get(format!("{}pause", prefix(plan)))
            .unwrap();
        if lock
            .as_deref()
            .is_some_and(|v| v.starts_with(&format!("{node}:")))
            || pause.as_deref() == Some(node)
        {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{node} did not take the ACME lock within {within:?} (lock {lock:?}, pause {pause:?})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `flags` with `--acme-retry-delay` set to `delay`.
fn with_retry_delay(mut flags: Vec<String>, delay: &str) -> Vec<String> {
    let at = flags
        .iter()
        .position(|f| f == "--acme-retry-delay")
        .expect("the plan sets a retry delay");
    flags[at + 1] = delay.to_owned();
    flags
}

/// An open HTTPS connection to `addr` verifying `NAME` against `root`.
async fn open(addr: SocketAddr, root: &CertificateDer<'static>) -> std::io::Result<H1> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let tls = tls_client(std::slice::from_ref(root), &[b"http/1.1"])
        .connect(ServerName::try_from(NAME).unwrap(), tcp)
        .await?;
    Ok(H1::over(tls).await)
}

/// The leaf a client verifying `NAME` against `root` gets from `node`, after a page is served.
async fn served_leaf(
    node: &Node,
    root: &CertificateDer<'static>,
) -> std::io::Result<CertificateDer<'static>> {
    let tcp = tokio::net::TcpStream::connect(node.https).await?;
    let tls = tls_client(std::slice::from_ref(root), &[b"http/1.1"])
        .connect(ServerName::try_from(NAME).unwrap(), tcp)
        .await?;
    let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    let page = H1::over(tls).await.get("/").await;
    assert_eq!(page.status, 200);
    Ok(leaf)
}

/// Awaits `node` serving a leaf (verified for NAME) that `accept`s; returns it.
async fn wait_for_leaf(
    node: &Node,
    root: &CertificateDer<'static>,
    within: Duration,
    accept: impl Fn(&CertificateDer<'static>) -> bool,
) -> CertificateDer<'static> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Ok(leaf) = served_leaf(node, root).await {
            if accept(&leaf) {
                return leaf;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "node {} did not serve the expected certificate within {within:?}:\n{}",
            node.id,
            node.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Flags for an ACME node behind the test balancer (which connects from 127.0.0.2).
fn node_flags(plan: &PebblePlan) -> Vec<String> {
    let mut flags = plan.flags(NAME, "tls-alpn-01");
    flags.extend(
        [
            "--proxy-protocol-from",
            "127.0.0.2/32",
            "--header-read-timeout",
            "2m",
        ]
        .map(str::to_owned),
    );
    flags
}

fn refs(flags: &[String]) -> Vec<&str> {
    flags.iter().map(String::as_str).collect()
}

/// A field of the shared certificate hash.
fn cert_field(redis: &RedisServer, plan: &PebblePlan, field: &str) -> Option<String> {
    redis
        .client()
        .hget(format!("{}cert", prefix(plan)), field)
        .unwrap()
}

#[tokio::test]
async fn one_order_serves_every_node_and_renewal_reaches_both_through_the_balancer() {
    if !pebble_installed() {
        return;
    }
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let plan = PebblePlan::new(dir.path());
    let cluster = Cluster::new(redis.url());
    let flags = node_flags(&plan);

    // Node A starts alone while the CA is not up yet: it takes the lock, fails ("directory"),
    // and keeps the lock through its back-off.
    let a = cluster
        .start_with_certs("node-a", &dir.path().join("a"), &refs(&flags))
        .await;
    wait_for_lock(&redis, &plan, "node-a", Duration::from_secs(20)).await;
    let b = cluster
        .start_with_certs("node-b", &dir.path().join("b"), &refs(&flags))
        .await;
    // Every connection through the balancer goes to B (the first live server): the CA's
    // TLS-ALPN-01 validation reaches the node that did NOT order.
    let Some(balancer) = Haproxy::start_balanced(
        &[b.https, a.https],
        "127.0.0.2".parse().unwrap(),
        Some("first"),
    ) else {
        return;
    };
    let pebble = plan
        .start(PebbleSettings {
            http_port: free_port(),
            tls_port: balancer.addr.port(),
            validity_seconds: 24,
            blocked: vec![],
            dns_down: false,
        })
        .await;
    a.wait_for_metric(FIRST, |v| v == 1.0, Duration::from_secs(90))
        .await;
    let root = pebble.issuing_root().await;

    // Both nodes serve the one certificate, obtained by one order on A; B never ordered.
    let first = served_leaf(&a, &root).await.unwrap();
    wait_for_leaf(&b, &root, Duration::from_secs(10), |l| *l == first).await;
    assert_eq!(b.metric(ORDERS).await, 0.0, "{}", b.log_text());
    assert_eq!(b.metric(FIRST).await, 0.0);
    assert!(
        b.log_count("serving the cluster's challenge answers") >= 1,
        "B answered the validation with A's challenge answers:\n{}",
        b.log_text()
    );
    // The CA's validation went through the balancer to B (node1 there), not to A.
    let validation = balancer.wait_for_log("callgate_nodes/node", Duration::from_secs(10));
    assert!(validation.contains("callgate_nodes/node1"), "{validation}");
    // Each node reports the expiry of the certificate it serves: the same one.
    let expiry = a.metric(EXPIRY).await;
    assert!(expiry > 0.0);
    b.wait_for_metric(EXPIRY, |v| v == expiry, Duration::from_secs(5))
        .await;

    // The key in Redis is sealed; the chain is public.
    let key = cert_field(&redis, &plan, "key").expect("the certificate key is shared");
    assert!(!key.contains("PRIVATE KEY"), "{key}");
    assert!(cert_field(&redis, &plan, "chain")
        .unwrap()
        .contains("BEGIN CERTIFICATE"));
    let account: String = redis
        .client()
        .hget(format!("{}account", prefix(&plan)), "sealed")
        .unwrap();
    assert!(!account.contains("key_pkcs8") && !account.contains('{'));

    // A connection open on B with the first certificate...
    let mut kept = open(b.https, &root).await.unwrap();
    assert_eq!(kept.get("/").await.status, 200);
    // ...renewal (a third of the 24 s lifetime left) reaches both nodes...
    let renewed = wait_for_leaf(&a, &root, Duration::from_secs(60), |l| *l != first).await;
    wait_for_leaf(&b, &root, Duration::from_secs(10), |l| *l != first).await;
    let renewals = a.metric(RENEWAL).await + b.metric(RENEWAL).await;
    assert!(renewals >= 1.0, "renewals counted on the ordering node");
    b.wait_for_metric(EXPIRY, |v| v > expiry, Duration::from_secs(5))
        .await;
    assert_ne!(renewed, first);
    // ...and the open connection keeps working.
    assert_eq!(kept.get("/").await.status, 200);
    // One first order in all, whoever renewed.
    assert_eq!(a.metric(FIRST).await + b.metric(FIRST).await, 1.0);
    drop(balancer);
}

#[tokio::test]
async fn a_node_killed_mid_order_lets_another_complete_and_redis_down_keeps_every_node_serving() {
    if !pebble_installed() {
        return;
    }
    let Some(mut redis) = RedisServer::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let plan = PebblePlan::new(dir.path());
    let cluster = Cluster::new(redis.url());
    let flags = node_flags(&plan);

    // The "CA" accepts connections and never answers: node A's order hangs with the lock held.
    let hole = std::net::TcpListener::bind(("127.0.0.1", plan.listen)).unwrap();
    hole.set_nonblocking(true).unwrap();
    let mut a = cluster
        .start_with_certs("node-a", &dir.path().join("a"), &refs(&flags))
        .await;
    wait_for_lock(&redis, &plan, "node-a", Duration::from_secs(20)).await;
    a.wait_for_log("ACME: ordering a certificate", Duration::from_secs(10))
        .await;
    let mut held = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while held.is_empty() {
        if let Ok((conn, _)) = hole.accept() {
            held.push(conn);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "A never called the CA"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    a.kill();
    let killed = tokio::time::Instant::now();
    drop((held, hole));

    // B starts, waits for A's lock to lapse, and orders through the real CA.
    let b = cluster
        .start_with_certs("node-b", &dir.path().join("b"), &refs(&flags))
        .await;
    let pebble = plan
        .start(PebbleSettings {
            http_port: free_port(),
            tls_port: b.https.port(),
            validity_seconds: 0,
            blocked: vec![],
            dns_down: false,
        })
        .await;
    b.wait_for_metric(FIRST, |v| v == 1.0, Duration::from_secs(90))
        .await;
    // Within the lock's TTL (A's lock lapses) plus B's start and one order.
    let took = killed.elapsed();
    assert!(
        took < callgate::acme::LOCK_TTL + Duration::from_secs(15),
        "B took over {took:?} after A died mid-order"
    );
    let root = pebble.issuing_root().await;
    let leaf = served_leaf(&b, &root).await.unwrap();

    // A comes back: it loads the cluster's certificate and orders nothing.
    let a = cluster
        .start_with_certs("node-a", &dir.path().join("a"), &refs(&flags))
        .await;
    wait_for_leaf(&a, &root, Duration::from_secs(10), |l| *l == leaf).await;
    assert_eq!(a.metric(ORDERS).await, 0.0);

    // Redis goes away: both keep serving the certificate.
    redis.stop();
    for node in [&a, &b] {
        node.wait_for_metric("callgate_redis_up", |v| v == 0.0, Duration::from_secs(10))
            .await;
        assert_eq!(served_leaf(node, &root).await.unwrap(), leaf, "{}", node.id);
    }
    // And a node restarted while Redis is still down serves its certs-dir copy.
    let mut a = a;
    a.kill();
    let a = cluster
        .start_with_certs("node-a", &dir.path().join("a"), &refs(&flags))
        .await;
    assert_eq!(served_leaf(&a, &root).await.unwrap(), leaf);
    assert_eq!(a.metric(ORDERS).await, 0.0);
}

#[tokio::test]
async fn http_01_is_answered_by_a_node_that_did_not_order() {
    if !pebble_installed() {
        return;
    }
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let plan = PebblePlan::new(dir.path());
    let cluster = Cluster::new(redis.url());
    let mut flags = plan.flags(NAME, "http-01");
    flags.extend(["--http-listen", "127.0.0.1:0"].map(str::to_owned));

    // A takes the lock while the CA is down; the CA's HTTP-01 requests then go to B only.
    let a = cluster
        .start_with_certs("node-a", &dir.path().join("a"), &refs(&flags))
        .await;
    wait_for_lock(&redis, &plan, "node-a", Duration::from_secs(20)).await;
    let b = cluster
        .start_with_certs("node-b", &dir.path().join("b"), &refs(&flags))
        .await;
    let pebble = plan
        .start(PebbleSettings {
            http_port: b.http.expect("B's plain-HTTP listener").port(),
            tls_port: free_port(),
            validity_seconds: 0,
            blocked: vec![],
            dns_down: false,
        })
        .await;
    a.wait_for_metric(FIRST, |v| v == 1.0, Duration::from_secs(90))
        .await;
    let root = pebble.issuing_root().await;
    let leaf = served_leaf(&a, &root).await.unwrap();
    wait_for_leaf(&b, &root, Duration::from_secs(10), |l| *l == leaf).await;
    assert_eq!(b.metric(ORDERS).await, 0.0, "{}", b.log_text());
    assert!(b.log_count("serving the cluster's challenge answers") >= 1);
}

#[tokio::test]
async fn http_01_through_haproxy_port_80_reaches_the_node_that_did_not_order() {
    if !pebble_installed() {
        return;
    }
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let plan = PebblePlan::new(dir.path());
    let cluster = Cluster::new(redis.url());
    // As an SRE deploys it: http-listen on every node, behind the shipped haproxy.cfg, which
    // forwards port 80 with the PROXY header (so the nodes trust the balancer's address there).
    let mut flags = plan.flags(NAME, "http-01");
    flags.extend(
        [
            "--http-listen",
            "127.0.0.1:0",
            "--proxy-protocol-from",
            "127.0.0.2/32",
        ]
        .map(str::to_owned),
    );

    // A takes the lock while the CA is down; then B joins.
    let a = cluster
        .start_with_certs("node-a", &dir.path().join("a"), &refs(&flags))
        .await;
    wait_for_lock(&redis, &plan, "node-a", Duration::from_secs(20)).await;
    let b = cluster
        .start_with_certs("node-b", &dir.path().join("b"), &refs(&flags))
        .await;
    // Port 80 of the balancer goes to B only: the CA's HTTP-01 request cannot reach the orderer.
    let Some(balancer) = Haproxy::start_with_http(
        &[a.https, b.https],
        &[b.http.expect("B's plain-HTTP listener")],
        "127.0.0.2".parse().unwrap(),
    ) else {
        return;
    };
    let pebble = plan
        .start(PebbleSettings {
            http_port: balancer.http_addr.port(),
            tls_port: free_port(),
            validity_seconds: 0,
            blocked: vec![],
            dns_down: false,
        })
        .await;
    a.wait_for_metric(FIRST, |v| v == 1.0, Duration::from_secs(90))
        .await;
    let root = pebble.issuing_root().await;
    // Issued on A's order, served by both.
    let leaf = served_leaf(&a, &root).await.unwrap();
    wait_for_leaf(&b, &root, Duration::from_secs(10), |l| *l == leaf).await;
    assert_eq!(b.metric(ORDERS).await, 0.0, "{}", b.log_text());
    assert!(
        b.log_count("serving the cluster's challenge answers") >= 1,
        "{}",
        b.log_text()
    );
    // The CA's request came through HAProxy's port 80 (its tcplog line names the frontend and
    // the server it picked: B, the only one).
    let validation = balancer.wait_for_log("callgate_http ", Duration::from_secs(10));
    assert!(
        validation.contains("callgate_nodes_http/node1"),
        "{validation}"
    );
}

#[tokio::test]
async fn a_failed_order_hands_the_lock_back_and_the_back_off_is_the_clusters() {
    if !pebble_installed() {
        return;
    }
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let plan = PebblePlan::new(dir.path());
    let cluster = Cluster::new(redis.url());
    let flags = with_retry_delay(node_flags(&plan), "4s");
    let key = |name: &str| format!("{}{name}", prefix(&plan));
    let pttl = |name: &str| -> i64 {
        redis::cmd("PTTL")
            .arg(key(name))
            .query(&mut redis.client())
            .unwrap()
    };

    // The CA is down: A's first order fails. A backs off, and holds no lock while it does: the
    // lock covers the attempt only; the back-off is in Redis, A's to retry first.
    let mut a = cluster
        .start_with_certs("node-a", &dir.path().join("a"), &refs(&flags))
        .await;
    a.wait_for_log(
        "ACME: could not obtain a certificate",
        Duration::from_secs(20),
    )
    .await;
    let failures: Option<u32> = redis.client().get(key("failures")).unwrap();
    assert_eq!(failures, Some(1));
    let pause: Option<String> = redis.client().get(key("pause")).unwrap();
    assert_eq!(pause.as_deref(), Some("node-a"));
    let lock: Option<String> = redis.client().get(key("lock")).unwrap();
    assert_eq!(lock, None, "A keeps no lock through its back-off");

    // A dies while backing off. B waits out the cluster's back-off (4 s + 5 s of grace, from
    // A's failure), not A's death, and not one attempt sooner: the CA is not hammered.
    a.kill();
    let b = cluster
        .start_with_certs("node-b", &dir.path().join("b"), &refs(&flags))
        .await;
    assert!(pttl("pause") > 0, "the back-off outlives A");
    assert_eq!(b.metric(ORDERS).await, 0.0, "B orders during the back-off");
    // Its attempt fails too (the CA is still down), and the back-off doubles from the
    // cluster's count: 8 s, not the 4 s of a first failure.
    b.wait_for_log(
        "ACME: could not obtain a certificate",
        Duration::from_secs(20),
    )
    .await;
    let failures: Option<u32> = redis.client().get(key("failures")).unwrap();
    assert_eq!(failures, Some(2));
    let pause: Option<String> = redis.client().get(key("pause")).unwrap();
    assert_eq!(pause.as_deref(), Some("node-b"));
    let left = pttl("pause");
    assert!(
        left > 10_000,
        "the second failure pauses 8 s + 5 s: {left} ms left"
    );
    assert_eq!(b.metric(ORDERS).await, 1.0);

    // The CA comes back: B obtains the certificate after its back-off, which then ends.
    let pebble = plan
        .start(PebbleSettings {
            http_port: free_port(),
            tls_port: b.https.port(),
            validity_seconds: 0,
            blocked: vec![],
            dns_down: false,
        })
        .await;
    b.wait_for_metric(FIRST, |v| v == 1.0, Duration::from_secs(30))
        .await;
    let root = pebble.issuing_root().await;
    served_leaf(&b, &root).await.unwrap();
    let gone: (bool, bool) = (
        redis.client().exists(key("failures")).unwrap(),
        redis.client().exists(key("pause")).unwrap(),
    );
    assert_eq!(gone, (false, false), "a success clears the back-off");
}

#[tokio::test]
async fn an_orderer_killed_while_its_challenge_is_pending_is_replaced_within_the_lock_ttl() {
    if !pebble_installed() {
        return;
    }
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let plan = PebblePlan::new(dir.path());
    let cluster = Cluster::new(redis.url());
    let flags = node_flags(&plan);
    let key = |name: &str| format!("{}{name}", prefix(&plan));

    // A node listed alive that never loads the challenge answers: the orderer waits for it
    // (up to 10 s) before telling the CA to validate, which keeps its order open long enough
    // to kill it with the challenge pending.
    let mut conn = redis.client();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let _: () = conn.hset("cg:nodes", "slow-node", now_ms).unwrap();
    let _: () = conn.set_ex("cg:node:slow-node:alive", "{}", 120).unwrap();

    // A takes the lock first (the CA is down); B waits.
    let mut a = cluster
        .start_with_certs("node-a", &dir.path().join("a"), &refs(&flags))
        .await;
    wait_for_lock(&redis, &plan, "node-a", Duration::from_secs(20)).await;
    let b = cluster
        .start_with_certs("node-b", &dir.path().join("b"), &refs(&flags))
        .await;
    let pebble = plan
        .start(PebbleSettings {
            http_port: free_port(),
            tls_port: b.https.port(),
            validity_seconds: 0,
            blocked: vec![],
            dns_down: false,
        })
        .await;
    // A's next attempt reaches the CA and publishes its challenge answers: kill -9 it then.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let published: bool = conn.exists(key("challenges")).unwrap();
        if published {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "A published no challenge:\n{}",
            a.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    a.kill();
    let killed = tokio::time::Instant::now();
    let lock: Option<String> = conn.get(key("lock")).unwrap();
    assert!(
        lock.is_some_and(|l| l.starts_with("node-a:")),
        "A held the lock"
    );
    let issued: bool = conn.exists(key("cert")).unwrap();
    assert!(!issued, "A finished its order before it was killed");
    let _: () = conn.del("cg:node:slow-node:alive").unwrap();

    // B takes over when A's lock lapses, orders, and serves the certificate.
    b.wait_for_metric(FIRST, |v| v == 1.0, Duration::from_secs(60))
        .await;
    let took = killed.elapsed();
    assert!(
        took < callgate::acme::LOCK_TTL + Duration::from_secs(15),
        "B took over {took:?} after A died with its challenge pending"
    );
    let root = pebble.issuing_root().await;
    served_leaf(&b, &root).await.unwrap();
}

#[tokio::test]
async fn one_node_asks_the_ca_for_renewal_information_and_the_others_read_its_answer() {
    if !pebble_installed() {
        return;
    }
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let plan = PebblePlan::new(dir.path());
    let cluster = Cluster::new(redis.url());
    let flags = node_flags(&plan);
    let a = cluster
        .start_with_certs("node-a", &dir.path().join("a"), &refs(&flags))
        .await;
    let b = cluster
        .start_with_certs("node-b", &dir.path().join("b"), &refs(&flags))
        .await;
    let pebble = plan
        .start(PebbleSettings {
            http_port: free_port(),
            tls_port: a.https.port(),
            validity_seconds: 0,
            blocked: vec![],
            dns_down: false,
        })
        .await;
    let root = pebble.issuing_root().await;
    let leaf = wait_for_leaf(&a, &root, Duration::from_secs(90), |_| true).await;
    wait_for_leaf(&b, &root, Duration::from_secs(10), |l| *l == leaf).await;
    assert_eq!(a.metric(FIRST).await + b.metric(FIRST).await, 1.0);
    // Both have looked at the renewal information of the served certificate (the next-renewal
    // gauge is set just after, to a time in the future).
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as f64;
    for node in [&a, &b] {
        node.wait_for_metric(
            "callgate_acme_next_renewal_timestamp_seconds",
            |v| v > now,
            Duration::from_secs(10),
        )
        .await;
    }
    // One node asked and shared the answer (sealed) ...
    let shared: String = redis.client().get(format!("{}ari", prefix(&plan))).unwrap();
    assert!(!shared.contains("unsupported"), "{shared}");
    // ... and only the orderer, which had the account open, spoke to the CA: the directory was
    // fetched once (by the order's new account). Without the shared answer the other node
    // fetched it again to ask (Debian's pebble has no renewal information, so the ask itself
    // ends there).
    assert_eq!(
        plan.log_count("GET /dir "),
        1,
        "requests for the directory in pebble's log"
    );
}

#[tokio::test]
async fn renewal_information_is_asked_once_per_period_by_one_node_of_many() {
    use callgate::acme::{AriAnswer, AriTurn, Sealer, SharedStore};
    use callgate::cluster::redis::{Redis, RedisMetrics};
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let metrics = callgate::metrics::Metrics::new();
    let url: callgate::config::RedisUrl = redis.url().parse().unwrap();
    let conn = Redis::open(&url, RedisMetrics::register(&metrics)).unwrap();
    let secret = [nodes::SECRET];
    let stores: Vec<SharedStore> = ["node-a", "node-b", "node-c"]
        .iter()
        .map(|node| {
            SharedStore::new(
                conn.clone(),
                node,
                "https://ca.test/dir",
                Sealer::new(&secret).unwrap(),
            )
        })
        .collect();
    let (cert, period) = ("aki.serial", 3600);
    let start = 1_900_000_000;
    let mut asked = 0;
    // Four renewal-check periods; in each, every node looks three times.
    for p in 0..4 {
        let now = start + p * period;
        for look in 0..3 {
            for (i, store) in stores.iter().enumerate() {
                match store.renewal_info(cert, now + look).await.unwrap() {
                    AriTurn::Ask => {
                        asked += 1;
                        // While it asks the CA, the others wait for its answer.
                        for (j, other) in stores.iter().enumerate() {
                            if i != j {
                                let turn = other.renewal_info(cert, now + look).await.unwrap();
                                assert_eq!(turn, AriTurn::Wait);
                            }
                        }
                        let answer = AriAnswer {
                            cert: cert.into(),
                            due: Some(now + 100),
                            next_check: now + period,
                            unsupported: false,
                        };
                        store.save_renewal_info(&answer, now).await.unwrap();
                    }
                    AriTurn::Answer(answer) => assert_eq!(answer.due, Some(now + 100)),
                    AriTurn::Wait => panic!("nobody is asking, yet node {i} waits"),
                }
            }
        }
    }
    assert_eq!(asked, 4, "one CA request per period for the whole cluster");
    // Another certificate (renewed meanwhile): the stored answer is not about it.
    let now = start + 3 * period + 10;
    assert_eq!(
        stores[1].renewal_info("aki.other", now).await.unwrap(),
        AriTurn::Ask
    );
    // The shared answer is sealed and expires; so does a node's turn to ask.
    let key = "cg:acme:ca.test_dir:ari";
    let stored: String = redis.client().get(key).unwrap();
    assert!(!stored.contains(cert), "{stored}");
    for name in [key, "cg:acme:ca.test_dir:ari-ask"] {
        let ttl: i64 = redis::cmd("PTTL")
            .arg(name)
            .query(&mut redis.client())
            .unwrap();
        assert!(ttl > 0, "{name} has no TTL");
    }
}

#[tokio::test]
async fn the_ordering_lock_is_exclusive_lapses_and_fences_out_a_node_that_lost_it() {
    use callgate::acme::{Sealer, SharedError, SharedStore};
    use callgate::cluster::redis::{Redis, RedisMetrics};
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let metrics = callgate::metrics::Metrics::new();
    let url: callgate::config::RedisUrl = redis.url().parse().unwrap();
    let conn = Redis::open(&url, RedisMetrics::register(&metrics)).unwrap();
    let directory = "https://ca.test/dir";
    let secret = [nodes::SECRET];
    let a = SharedStore::new(
        conn.clone(),
        "node-a",
        directory,
        Sealer::new(&secret).unwrap(),
    );
    let b = SharedStore::new(conn, "node-b", directory, Sealer::new(&secret).unwrap());
    let ttl = Duration::from_millis(600);

    // One holder at a time; the holder may extend its own lock.
    let lock_a = a.acquire(None, ttl).await.unwrap().expect("free");
    assert_eq!(b.acquire(None, ttl).await.unwrap(), None);
    assert_eq!(
        a.acquire(Some(&lock_a), ttl).await.unwrap(),
        Some(lock_a.clone())
    );
    // A stops renewing (dead, paused): the lock lapses and B takes it with a new token.
    tokio::time::sleep(ttl + Duration::from_millis(200)).await;
    let lock_b = b.acquire(None, ttl * 10).await.unwrap().expect("lapsed");
    assert_ne!(lock_a, lock_b);
    assert!(lock_b.value().starts_with("node-b:"));

    // A, unaware, tries to store its certificate: refused, and it cannot renew or retake.
    let cert = rcgen::generate_simple_self_signed(vec![NAME.into()]).unwrap();
    let (chain, key) = (cert.cert.pem(), cert.signing_key.serialize_pem());
    let stale = a.save_certificate(&lock_a, &chain, &key).await;
    assert!(matches!(stale, Err(SharedError::Fenced)), "{stale:?}");
    assert!(!a.renew(&lock_a, ttl).await.unwrap());
    assert_eq!(a.acquire(Some(&lock_a), ttl).await.unwrap(), None);
    assert!(
        a.certificate().await.unwrap().is_none(),
        "nothing was written"
    );

    // B stores it; A reads it back (key opened); in Redis the key is sealed.
    b.save_certificate(&lock_b, &chain, &key).await.unwrap();
    let shared = a.certificate().await.unwrap().expect("stored");
    assert_eq!(
        (shared.chain.as_str(), shared.key.as_str()),
        (chain.as_str(), key.as_str())
    );
    assert_eq!(shared.version, lock_b.value());
    let stored: String = redis
        .client()
        .hget("cg:acme:ca.test_dir:cert", "key")
        .unwrap();
    assert!(!stored.contains("PRIVATE KEY"));
    // A node with another secret cannot open it.
    let other_conn = Redis::open(
        &url,
        RedisMetrics::register(&callgate::metrics::Metrics::new()),
    )
    .unwrap();
    let other = SharedStore::new(
        other_conn,
        "node-c",
        directory,
        Sealer::new(&["a-different-secret-0123"]).unwrap(),
    );
    assert!(matches!(
        other.certificate().await,
        Err(SharedError::Seal(_))
    ));
    // Released, the lock is free again.
    b.release(&lock_b).await;
    assert!(a.acquire(None, ttl).await.unwrap().is_some());
}
