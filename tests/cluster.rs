//! Cluster plumbing against a real `redis-server`, real `callgate` binaries and a real HAProxy
//! started from `ops/haproxy/haproxy.cfg`: membership, node death, drain, Redis trouble, the load
//! balancer. Without redis-server (or haproxy) these tests print why and pass — except under
//! `CI=true`, where a missing tool fails them.
//!
//! Cross-node calls and resumes are in tests/cluster_calls.rs.

mod common;
#[path = "support/haproxy.rs"]
mod haproxy;
#[path = "support/nodes.rs"]
mod nodes;
#[path = "support/redis.rs"]
mod redis_server;

use std::net::SocketAddr;
use std::time::Duration;

use common::{connect, Ws};
use haproxy::Haproxy;
use nodes::Cluster;
use redis::Commands;
use redis_server::RedisServer;
use serde_json::Value;

const ALIVE: &str = "callgate_cluster_nodes_alive";
const REDIS_UP: &str = "callgate_redis_up";
const OPEN_WEBSOCKETS: &str = "callgate_websocket_connections_open";
const OFFER: &str = r#"{"type":"offer","sdp":"v=0\r\no=- 4611731400430051336 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n"}"#;
const ANSWER: &str =
    r#"{"type":"answer","sdp":"v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n"}"#;

/// Opens `wss://localhost/socket` at `addr` (a node or the balancer) and reads the `id` message.
async fn join(cluster: &Cluster, addr: SocketAddr) -> (Ws, u64) {
    let mut ws = open_socket(cluster, addr).await;
    let hello = ws.recv().await;
    assert_eq!(hello["type"], "id", "{hello}");
    (ws, hello["id"].as_u64().expect("numeric id"))
}

/// Opens `wss://localhost/socket` at `addr`, reading nothing.
async fn open_socket(cluster: &Cluster, addr: SocketAddr) -> Ws {
    let tls = connect(&cluster.tls(), addr).await.expect("TLS connects");
    let host = format!("localhost:{}", addr.port());
    Ws::upgrade(tls, &host, "/socket", None)
        .await
        .expect("WebSocket upgrade")
}

/// A calls B and B accepts.
async fn call(a: &mut Ws, a_id: u64, b: &mut Ws, b_id: u64) {
    a.send(&format!(
        r#"{{"type":"video-offer-request","id":{a_id},"calleeId":{b_id},"offer":{OFFER}}}"#
    ))
    .await;
    let incoming = b.recv().await;
    assert_eq!(incoming["type"], "video-answer-request", "{incoming}");
    b.send(&format!(
        r#"{{"type":"client-reply","reply":"1","id":{b_id},"callerId":{a_id},"answer":{ANSWER}}}"#
    ))
    .await;
    let reply = a.recv().await;
    assert_eq!(reply["type"], "server-reply", "{reply}");
}

/// What a node wrote in its alive key, if the key exists.
fn heartbeat(redis: &RedisServer, node: &str) -> Option<Value> {
    let json: Option<String> = redis.client().get(format!("cg:node:{node}:alive")).unwrap();
    json.map(|j| serde_json::from_str(&j).unwrap())
}

/// Awaits `cg:nodes` no longer listing `node`, re-reading it every 200 ms; panics after `within`.
async fn wait_until_unlisted(redis: &RedisServer, node: &str, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    let mut ticks = tokio::time::interval(Duration::from_millis(200));
    loop {
        ticks.tick().await;
        let listed: bool = redis.client().hexists("cg:nodes", node).unwrap();
        if !listed {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{node} still in cg:nodes after {within:?}"
        );
    }
}

#[tokio::test]
async fn two_nodes_see_each_other_and_a_killed_node_is_gone_within_seconds() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let cluster = Cluster::new(redis.url());
    let a = cluster.start("node-a", &["--resume-grace", "2s"]).await;
    let mut b = cluster.start("node-b", &["--resume-grace", "2s"]).await;
    for node in [&a, &b] {
        node.wait_for_metric(ALIVE, |n| n == 2.0, Duration::from_secs(10))
            .await;
        assert_eq!(node.metric(REDIS_UP).await, 1.0);
    }

    // What Redis holds per node, every key with a TTL.
    let info = heartbeat(&redis, "node-b").expect("node-b's heartbeat");
    assert_eq!(info["draining"], false);
    assert_eq!(info["turn"], "127.0.0.1");
    assert_eq!(info["https"], b.https.to_string());
    assert_eq!(info["bus_reads"], 3, "it advertises reading batch payloads");
    let mut r = redis.client();
    let alive_ttl: i64 = redis::cmd("PTTL")
        .arg("cg:node:node-b:alive")
        .query(&mut r)
        .unwrap();
    assert!((1..=5000).contains(&alive_ttl), "{alive_ttl}");
    let list_ttl: i64 = redis::cmd("PTTL").arg("cg:nodes").query(&mut r).unwrap();
    assert!(list_ttl > 0, "cg:nodes has no TTL: {list_ttl}");

    // kill -9: no goodbye; the alive key's TTL (5 s) and the 1 s heartbeat tell node-a.
    b.kill();
    let took = a
        .wait_for_metric(ALIVE, |n| n == 1.0, Duration::from_secs(10))
        .await;
    assert!(took <= Duration::from_secs(7), "seen gone after {took:?}");
    assert!(heartbeat(&redis, "node-b").is_none());
    // And after the stale bound (resume grace 2 s + 5 s) it is dropped from the list.
    wait_until_unlisted(&redis, "node-b", Duration::from_secs(12)).await;
    assert!(redis
        .client()
        .hexists::<_, _, bool>("cg:nodes", "node-a")
        .unwrap());
}

#[tokio::test]
async fn sigterm_marks_the_node_draining_in_redis_before_readyz_turns_503() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let cluster = Cluster::new(redis.url());
    let mut a = cluster
        .start("node-a", &["--shutdown-drain-delay", "3s"])
        .await;
    let b = cluster.start("node-b", &[]).await;
    b.wait_for_metric(ALIVE, |n| n == 2.0, Duration::from_secs(10))
        .await;
    assert_eq!(a.readyz().await, Some(200));
    let (mut client, _) = join(&cluster, a.https).await;

    a.terminate();
    a.wait_for_log("marked draining in Redis", Duration::from_secs(5))
        .await;
    let info = heartbeat(&redis, "node-a").expect("still alive while draining");
    assert_eq!(info["draining"], true, "{info}");
    // During the drain delay the node still runs and answers, but not ready.
    a.wait_for_log("/readyz now reports 503", Duration::from_secs(5))
        .await;
    assert_eq!(a.readyz().await, Some(503));
    assert!(a.is_running());
    b.wait_for_metric(
        "callgate_cluster_nodes_draining",
        |n| n == 1.0,
        Duration::from_secs(5),
    )
    .await;
    // Redis first, then /readyz.
    let marked = a.log_position("marked draining in Redis").unwrap();
    let unready = a
        .log_position("/readyz now reports 503")
        .expect("readyz line");
    assert!(marked < unready, "{}", a.log_text());

    // Then its clients are told to reconnect elsewhere, and it leaves the cluster.
    assert_eq!(client.expect_close().await, Some(1001));
    assert_eq!(a.wait_exit(Duration::from_secs(20)).await, Some(0));
    assert!(
        heartbeat(&redis, "node-a").is_none(),
        "alive key left behind"
    );
    let listed: bool = redis.client().hexists("cg:nodes", "node-a").unwrap();
    assert!(!listed, "node-a still listed after leaving");
    b.wait_for_metric(ALIVE, |n| n == 1.0, Duration::from_secs(3))
        .await;
}

#[tokio::test]
async fn redis_going_away_is_one_log_line_and_a_metric_and_it_comes_back_by_itself() {
    let Some(mut redis) = RedisServer::start() else {
        return;
    };
    let cluster = Cluster::new(redis.url());
    let a = cluster.start("node-a", &[]).await;
    let b = cluster.start("node-b", &[]).await;
    a.wait_for_metric(ALIVE, |n| n == 2.0, Duration::from_secs(10))
        .await;
    let (mut caller, caller_id) = join(&cluster, a.https).await;
    let (mut callee, callee_id) = join(&cluster, a.https).await;
    call(&mut caller, caller_id, &mut callee, callee_id).await;
    let candidate = |n: u32| {
        format!(
            r#"{{"type":"ice-candidate","clientId":{callee_id},"candidate":{{"candidate":"candidate:{n} 1 udp 1 127.0.0.1 9 typ host","sdpMid":"0","sdpMLineIndex":0}}}}"#
        )
    };

    redis.stop();
    a.wait_for_metric(REDIS_UP, |up| up == 0.0, Duration::from_secs(5))
        .await;
    // Several heartbeats fail (one per second) ...
    let errors = "callgate_redis_errors_total{kind=\"connection\"}";
    let timeouts = "callgate_redis_errors_total{kind=\"timeout\"}";
    let failed_at_outage = a.metric(errors).await + a.metric(timeouts).await;
    // ... while the call between two clients of this node goes on (relays need no Redis).
    caller.send(&candidate(1)).await;
    let relayed = callee.recv().await;
    assert_eq!(relayed["type"], "ice-candidate", "{relayed}");
    let mut ticks = tokio::time::interval(Duration::from_millis(200));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        ticks.tick().await;
        let failed = a.metric(errors).await + a.metric(timeouts).await;
        if failed >= failed_at_outage + 3.0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {failed} failed Redis commands after 10 s without Redis"
        );
    }
    // ... and the operator reads one line about it, not one per failed command.
    assert_eq!(a.log_count("Redis is unreachable"), 1, "{}", a.log_text());
    assert_eq!(a.log_count("panicked"), 0, "{}", a.log_text());
    assert_eq!(
        a.readyz().await,
        Some(200),
        "a Redis outage is not a node outage"
    );

    redis.restart();
    for node in [&a, &b] {
        node.wait_for_metric(REDIS_UP, |up| up == 1.0, Duration::from_secs(10))
            .await;
        // Redis came back empty: the heartbeats write everything again.
        node.wait_for_metric(ALIVE, |n| n == 2.0, Duration::from_secs(10))
            .await;
        assert_eq!(node.log_count("Redis is reachable again"), 1);
    }
    // The call between the two clients is still up.
    caller.send(&candidate(2)).await;
    let relayed = callee.recv().await;
    assert_eq!(relayed["type"], "ice-candidate", "{relayed}");
}

#[tokio::test]
async fn haproxy_from_ops_spreads_websockets_and_takes_out_dead_and_draining_nodes() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let cluster = Cluster::new(redis.url());
    // Only HAProxy (connecting from 127.0.0.2) is trusted for the PROXY header.
    let trusted = [
        "--proxy-protocol-from",
        "127.0.0.2",
        "--shutdown-drain-delay",
        "5s",
    ];
    let a = cluster.start("node-a", &trusted).await;
    let b = cluster.start("node-b", &trusted).await;
    let Some(balancer) = Haproxy::start(&[a.https, b.https], "127.0.0.2".parse().unwrap()) else {
        return;
    };

    // leastconn: the first WebSocket goes to one node, the second to the other; each node got
    // a valid PROXY v2 header (without one it refuses HAProxy's connections outright).
    let (_first, _) = join(&cluster, balancer.addr).await;
    let on_a = a.metric(OPEN_WEBSOCKETS).await == 1.0;
    let (mut second, _) = join(&cluster, balancer.addr).await;
    for node in [&a, &b] {
        node.wait_for_metric(OPEN_WEBSOCKETS, |n| n == 1.0, Duration::from_secs(5))
            .await;
    }
    // Kill the node that took the first client; the second client is on the survivor.
    let (mut victim, survivor, victim_name) = if on_a {
        (a, b, "node1")
    } else {
        (b, a, "node2")
    };

    victim.kill();
    // The health check (GET /readyz over TLS every second, fall 2) takes it out ...
    balancer.wait_for_log(&format!("{victim_name} is DOWN"), Duration::from_secs(10));
    // ... and every new client lands on the live node.
    let mut joined = Vec::new();
    for _ in 0..4 {
        joined.push(join(&cluster, balancer.addr).await);
    }
    survivor
        .wait_for_metric(OPEN_WEBSOCKETS, |n| n == 5.0, Duration::from_secs(5))
        .await;
    // The client on the surviving node did not notice.
    second.send(r#"{"type":"ping"}"#).await;
    let pong = second.recv().await;
    assert_eq!(pong["type"], "pong", "{pong}");

    // A draining node answers /readyz with 503: the layer-7 check (over TLS, with its own PROXY
    // header) sees it and takes the node out while it still runs.
    let survivor_name = if on_a { "node2" } else { "node1" };
    survivor.terminate();
    let down = balancer.wait_for_log(&format!("{survivor_name} is DOWN"), Duration::from_secs(10));
    assert!(down.contains("Layer7 wrong status, code: 503"), "{down}");
}

#[tokio::test]
async fn rediss_urls_connect_over_tls_to_a_redis_the_system_trusts() {
    let mut cluster = Cluster::without_redis();
    let (cert, key) = cluster.dev_cert();
    let Some(redis) = RedisServer::start_tls(&cert, &key) else {
        return;
    };
    cluster.redis_url = redis.url();
    assert!(cluster.redis_url.starts_with("rediss://"));

    // Without the CA among its trusted roots a node refuses the server: not up, and it says so.
    let untrusting = cluster.start("node-u", &[]).await;
    untrusting
        .wait_for_log("Redis is unreachable", Duration::from_secs(10))
        .await;
    assert_eq!(untrusting.metric(REDIS_UP).await, 0.0);
    drop(untrusting);

    // rustls-native-certs reads SSL_CERT_FILE: the nodes trust the test certificate and join.
    cluster.env("SSL_CERT_FILE", cert.to_str().unwrap());
    let a = cluster.start("node-a", &[]).await;
    let b = cluster.start("node-b", &[]).await;
    for node in [&a, &b] {
        node.wait_for_metric(ALIVE, |n| n == 2.0, Duration::from_secs(10))
            .await;
        assert_eq!(node.metric(REDIS_UP).await, 1.0);
    }
}

#[test]
fn check_config_names_what_cluster_mode_needs_and_masks_the_password() {
    let bin = env!("CARGO_BIN_EXE_callgate");
    let check = |extra: &[&str]| {
        let out = std::process::Command::new(bin)
            .env("CALLGATE_REDIS_URL", "redis://:s3cret-pass@10.0.0.5:6379/0")
            .args(extra)
            .arg("check-config")
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!text.contains("s3cret-pass"), "password printed:\n{text}");
        (out.status.success(), text)
    };
    let (ok, text) = check(&[]);
    assert!(!ok);
    assert!(
        text.contains("static-auth-secret: is required with redis-url"),
        "{text}"
    );
    let (ok, text) = check(&["--static-auth-secret", nodes::SECRET]);
    assert!(!ok);
    assert!(
        text.contains("turn-host: (or external-ip) is required"),
        "{text}"
    );
    let (ok, text) = check(&[
        "--static-auth-secret",
        nodes::SECRET,
        "--external-ip",
        "203.0.113.7",
        "--node-id",
        "call-1",
    ]);
    assert!(ok, "{text}");
    assert!(
        text.contains("redis-url = \"redis://***@10.0.0.5:6379/0\""),
        "{text}"
    );
    assert!(text.contains("node-id = \"call-1\""), "{text}");
}

#[tokio::test]
async fn the_redis_connection_times_every_command_and_tells_error_answers_from_outages() {
    use callgate::cluster::redis::{Redis, RedisMetrics, COMMAND_TIMEOUT};
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let metrics = callgate::metrics::Metrics::new();
    let url: callgate::config::RedisUrl = redis.url().parse().unwrap();
    let conn = Redis::open(&url, RedisMetrics::register(&metrics)).unwrap();
    let pong: String = conn.query(&redis::cmd("PING")).await.unwrap();
    assert_eq!(pong, "PONG");
    assert!(conn.is_up());

    // An error answer is Redis being there: counted as "server", still up.
    let _: () = conn
        .query(redis::cmd("SET").arg("k").arg("v"))
        .await
        .unwrap();
    let wrong = conn
        .query::<Option<String>>(redis::cmd("HGET").arg("k").arg("f"))
        .await
        .unwrap_err();
    assert_eq!(wrong.kind(), "server", "{wrong}");
    assert!(conn.is_up());

    // Scripts go through the same connection and survive a flushed script cache (NOSCRIPT).
    let script = redis::Script::new("return redis.call('GET', KEYS[1])");
    let mut call = script.prepare_invoke();
    call.key("k");
    assert_eq!(conn.script::<String>(&call).await.unwrap(), "v");
    let _: () = conn.query(redis::cmd("SCRIPT").arg("FLUSH")).await.unwrap();
    assert_eq!(conn.script::<String>(&call).await.unwrap(), "v");

    // A Redis that hangs (SIGSTOP): the command fails at the timeout, not later, and counts.
    redis.pause();
    let started = std::time::Instant::now();
    let hung = conn.query::<String>(&redis::cmd("PING")).await.unwrap_err();
    let waited = started.elapsed();
    assert_eq!(hung.kind(), "timeout", "{hung}");
    assert!(
        waited >= COMMAND_TIMEOUT && waited < COMMAND_TIMEOUT + Duration::from_millis(500),
        "{waited:?}"
    );
    assert!(!conn.is_up());
    redis.resume();
    let mut ticks = tokio::time::interval(Duration::from_millis(100));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while conn.query::<String>(&redis::cmd("PING")).await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no answer after SIGCONT"
        );
        ticks.tick().await;
    }
    assert!(conn.is_up());

    let text = metrics.encode();
    assert_eq!(common::sample(&text, "callgate_redis_up"), Some(1.0));
    assert_eq!(
        common::sample(&text, "callgate_redis_errors_total{kind=\"server\"}"),
        Some(1.0)
    );
    assert!(common::sample(&text, "callgate_redis_errors_total{kind=\"timeout\"}").unwrap() >= 1.0);
    // PING, SET, HGET, the scripts (EVALSHA, NOSCRIPT, EVAL or LOAD), FLUSH, the hung PING, ...
    assert!(common::sample(&text, "callgate_redis_round_trip_seconds_count").unwrap() >= 7.0);
}

#[tokio::test]
async fn a_node_starts_without_its_redis_and_joins_when_redis_answers() {
    let Some(mut redis) = RedisServer::start() else {
        return;
    };
    redis.stop();
    let cluster = Cluster::new(redis.url());
    let a = cluster.start("node-a", &[]).await;
    assert_eq!(a.readyz().await, Some(200), "serves meanwhile");
    a.wait_for_log("Redis is unreachable", Duration::from_secs(5))
        .await;
    assert_eq!(a.metric(REDIS_UP).await, 0.0);
    // A client cannot get a cluster-wide ID yet: it is told so, and to come back (1013).
    let mut refused = open_socket(&cluster, a.https).await;
    let error = refused.recv().await;
    assert_eq!(error["code"], "cluster_unavailable", "{error}");
    assert_eq!(refused.expect_close().await, Some(1013));

    redis.restart();
    a.wait_for_metric(ALIVE, |n| n == 1.0, Duration::from_secs(10))
        .await;
    assert_eq!(a.metric(REDIS_UP).await, 1.0);
    assert!(heartbeat(&redis, "node-a").is_some());
    let (_client, _) = join(&cluster, a.https).await;
}

/// The ACL docs/SECURITY.md recommends for callgate's Redis user: its keys, its channels, and
/// only the commands it sends (the registry's and bus's, plus membership's `time`, `hgetall`
/// and `hdel`, which run inside the heartbeat script, where Redis 7 checks them too).
const CALLGATE_ACL: &str = "on >acl-test-password-0123 resetkeys ~cg:* resetchannels &cg:node:* \
    -@all +hello +auth +ping +evalsha +script|load +hmget +get +publish +subscribe +unsubscribe \
    +exists +incr +hset +hget +pexpire +del +xlen +xadd +hincrby +pttl +xrange +set \
    +time +hgetall +hdel +incrby +zadd +zrem +zrangebyscore +zremrangebyscore";

#[tokio::test]
async fn membership_works_as_the_restricted_acl_user() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let mut admin = redis.client();
    let mut setuser = redis::cmd("ACL");
    setuser.arg("SETUSER").arg("callgate");
    for rule in CALLGATE_ACL.split_whitespace() {
        setuser.arg(rule);
    }
    let () = setuser.query(&mut admin).unwrap();

    // A user without the heartbeat's commands: the node says so, once, and names the ACL.
    let narrow = CALLGATE_ACL.replace("+time +hgetall +hdel", "");
    let mut setuser = redis::cmd("ACL");
    setuser.arg("SETUSER").arg("narrow");
    for rule in narrow.split_whitespace() {
        setuser.arg(rule);
    }
    let () = setuser.query(&mut admin).unwrap();
    let refused = Cluster::new(format!(
        "redis://narrow:acl-test-password-0123@{}",
        redis.addr
    ));
    let x = refused.start("node-x", &[]).await;
    x.wait_for_log(
        "Redis refuses this node's heartbeat",
        Duration::from_secs(5),
    )
    .await;
    x.wait_for_metric(
        "callgate_redis_errors_total{kind=\"server\"}",
        |n| n >= 3.0,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(x.log_count("Redis refuses this node's heartbeat"), 1);
    assert_eq!(x.metric(ALIVE).await, 0.0);
    drop(x);

    let url = format!("redis://callgate:acl-test-password-0123@{}", redis.addr);
    let cluster = Cluster::new(url);
    let mut a = cluster.start("node-a", &[]).await;
    let b = cluster.start("node-b", &[]).await;
    for node in [&a, &b] {
        node.wait_for_metric(ALIVE, |n| n == 2.0, Duration::from_secs(10))
            .await;
    }
    // Draining and leaving (SET in the script, DEL and HDEL) are allowed too.
    a.terminate();
    assert_eq!(a.wait_exit(Duration::from_secs(20)).await, Some(0));
    assert!(heartbeat(&redis, "node-a").is_none());
    b.wait_for_metric(ALIVE, |n| n == 1.0, Duration::from_secs(3))
        .await;
    for node in [&a, &b] {
        assert_eq!(node.log_count("NOPERM"), 0, "{}", node.log_text());
    }
}

/// Sends one plain HTTP/1.1 request to `addr` and returns the whole response.
async fn plain_get(addr: SocketAddr, host: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let mut response = String::new();
    tokio::time::timeout(
        Duration::from_secs(10),
        stream.read_to_string(&mut response),
    )
    .await
    .expect("the redirect answered within 10 s")
    .unwrap();
    response
}

#[tokio::test]
async fn haproxy_from_ops_forwards_port_80_so_either_node_redirects_to_the_public_https_url() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let cluster = Cluster::new(redis.url());
    let flags = [
        "--proxy-protocol-from",
        "127.0.0.2",
        "--http-listen",
        "127.0.0.1:0",
        "--public-url",
        "https://call.example.test",
    ];
    let a = cluster.start("node-a", &flags).await;
    let b = cluster.start("node-b", &flags).await;
    let http_nodes = [
        a.http.expect("node-a listens for HTTP"),
        b.http.expect("node-b listens for HTTP"),
    ];
    let Some(balancer) = Haproxy::start_with_http(
        &[a.https, b.https],
        &http_nodes,
        "127.0.0.2".parse().unwrap(),
    ) else {
        return;
    };
    // roundrobin spreads the requests over the nodes; each arrives with the PROXY header (a
    // node refuses a trusted balancer's connection without one) and is answered with the
    // public URL, not the node's own port.
    for _ in 0..4 {
        let response = plain_get(balancer.http_addr, "call.example.test", "/?call=123456789").await;
        assert!(response.starts_with("HTTP/1.1 308"), "{response}");
        assert!(
            response
                .to_ascii_lowercase()
                .contains("location: https://call.example.test/?call=123456789"),
            "{response}"
        );
    }
    // The port-80 health check (GET /healthz with its own PROXY header) sees a dead node.
    let mut a = a;
    a.kill();
    balancer.wait_for_log("callgate_nodes_http/node1 is DOWN", Duration::from_secs(10));
    let response = plain_get(balancer.http_addr, "call.example.test", "/").await;
    assert!(response.starts_with("HTTP/1.1 308"), "{response}");
    drop(b);
}
