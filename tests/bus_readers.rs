//! Rolling upgrades against a real `redis-server`: a node batches several messages into one
//! `PUBLISH` (payload version 3) only to a node whose heartbeat advertises that it reads them. A
//! node of the previous release (its heartbeat has no `bus_reads`; it drops a batch with a
//! warning, its senders not told) gets every message in a `PUBLISH` of its own, version 2, even
//! under load; an upgrade or a rollback is seen within a few seconds. The heartbeats are real
//! [`Membership`]s, the previous release's is its exact JSON, and what arrives is read by a raw
//! subscriber that looks at each payload's version byte. Without redis-server the tests print
//! why and pass — except under `CI=true`, where a missing server fails them.

#[path = "support/redis.rs"]
mod redis_support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use callgate::cluster::bus::{node_channel, BusKind, BusMessage, BusSettings, Records, RedisBus};
use callgate::cluster::nodes::{BusReaders, Membership, NodeInfo, NodeMetrics, BUS_READS};
use callgate::cluster::publish::BATCH_VERSION;
use callgate::cluster::redis::{Redis, RedisConnection, RedisMetrics};
use callgate::cluster::types::NodeId;
use callgate::metrics::Metrics;
use callgate::signaling::delivery::Origin;
use callgate::signaling::protocol::{ClientId, MessageKind, ServerKind};
use futures_util::StreamExt as _;
use redis_support::RedisServer;
use tokio::sync::mpsc;

/// How many messages each burst sends at once.
const N: u64 = 200;

/// How soon a change in a node's heartbeat must be acted on ("within a few seconds").
const PICKED_UP: Duration = Duration::from_secs(3);

/// The heartbeat a node of the previous release writes: no `bus_reads`.
const PREVIOUS_RELEASE: &str = r#"{"id":"old","https":"127.0.0.1:1","turn":null,"draining":false}"#;

/// A Redis connection as a node opens it, with its own metrics registry.
fn open(redis: &RedisServer) -> Redis {
    let metrics = Metrics::new();
    Redis::open(
        &redis.url().parse().expect("a valid redis URL"),
        RedisMetrics::register(&metrics),
    )
    .expect("opens")
}

/// Starts `id`'s real heartbeat, advertising `bus_reads`; its view of the others goes to `readers`.
fn heartbeat(redis: &RedisServer, id: &str, bus_reads: u8, readers: BusReaders) -> Membership {
    let metrics = Metrics::new();
    Membership::start(
        open(redis),
        NodeInfo {
            id: id.into(),
            https: "127.0.0.1:1".into(),
            turn: None,
            draining: false,
            bus_reads,
            link: None,
        },
        Duration::from_secs(30),
        NodeMetrics::register(&metrics),
        readers,
    )
}

/// Writes `old`'s heartbeat as `json`, the way a running node would (its alive key and its
/// `cg:nodes` entry).
fn advertise_old(redis: &RedisServer, json: &str) {
    let mut raw = redis.client();
    redis::pipe()
        .cmd("SET")
        .arg("cg:node:old:alive")
        .arg(json)
        .arg("PX")
        .arg(60_000)
        .ignore()
        .cmd("HSET")
        .arg("cg:nodes")
        .arg("old")
        .arg(0)
        .ignore()
        .exec(&mut raw)
        .expect("writes old's heartbeat");
}

/// The sending node: its bus and its membership (which fills the bus's readers).
struct Sender {
    bus: RedisBus<RedisConnection>,
    membership: Membership,
}

/// This node ("me", current release) with a bus that asks its membership who reads batches.
fn sender(redis: &RedisServer) -> Sender {
    let readers = BusReaders::default();
    let membership = heartbeat(redis, "me", BUS_READS, readers.clone());
    let conn = open(redis);
    let bus = RedisBus::with_readers(
        conn.client().clone(),
        conn.connection(),
        BusSettings {
            held_messages: 4,
            held_bytes: 1024,
            held_bytes_total: 1 << 20,
            grace: Duration::from_secs(30),
            timeout: Duration::from_secs(5),
        },
        readers,
    );
    Sender { bus, membership }
}

impl Sender {
    /// Waits (at most [`PICKED_UP`]) until this node's heartbeat has seen `node` advertise
    /// `bus_reads`, and returns how long that took.
    async fn sees(&self, node: &str, bus_reads: u8) -> Duration {
        let started = Instant::now();
        let mut alive = self.membership.alive();
        tokio::time::timeout(
            PICKED_UP,
            alive.wait_for(|nodes| {
                nodes
                    .iter()
                    .any(|n| n.id == node && n.bus_reads == bus_reads)
            }),
        )
        .await
        .unwrap_or_else(|_| panic!("{node} advertising {bus_reads} not seen within {PICKED_UP:?}"))
        .expect("membership runs");
        started.elapsed()
    }

    /// Sends `messages` to `node` all at once; every sender must hear "received".
    async fn burst(&self, node: &str, messages: &[BusMessage]) {
        let node = NodeId::new(node);
        let answers =
            futures_util::future::join_all(messages.iter().map(|m| self.bus.send(&node, m))).await;
        assert!(answers.iter().all(|a| *a == Ok(true)), "{answers:?}");
    }
}

/// A raw subscriber of `node`'s inbox: every payload as it arrived.
async fn inbox(redis: &RedisServer, node: &str) -> mpsc::UnboundedReceiver<Bytes> {
    let client = redis::Client::open(redis.url()).expect("a valid URL");
    let mut pubsub = client
        .get_async_pubsub()
        .await
        .expect("subscriber connects");
    pubsub
        .subscribe(node_channel(&NodeId::new(node)))
        .await
        .expect("subscribes");
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = pubsub.into_on_message();
        while let Some(m) = messages.next().await {
            if tx
                .send(Bytes::from(m.get_payload_bytes().to_vec()))
                .is_err()
            {
                return;
            }
        }
    });
    rx
}

/// `N` distinct messages, numbered from `from`.
fn messages(from: u64) -> Vec<BusMessage> {
    (from..from + N)
        .map(|n| BusMessage {
            kind: BusKind::Deliver,
            call: None,
            to: ClientId::new(100_000_000 + n % 7),
            epoch: Some(n),
            origin: Some(Origin {
                from: ClientId::new(200_000_000 + n),
                kind: MessageKind::IceCandidate,
            }),
            server_kind: ServerKind::IceCandidate,
            frame: Bytes::from(format!(r#"{{"type":"ice-candidate","n":{n}}}"#)),
        })
        .collect()
}

/// Reads payloads until all of `sent` (numbered in order) has arrived, each once; returns the payloads' version
/// bytes (one per `PUBLISH`).
async fn receive(inbox: &mut mpsc::UnboundedReceiver<Bytes>, sent: &[BusMessage]) -> Vec<u8> {
    let mut versions = Vec::new();
    let mut got = Vec::new();
    while got.len() < sent.len() {
        let payload = tokio::time::timeout(Duration::from_secs(5), inbox.recv())
            .await
            .unwrap_or_else(|_| panic!("only {} of {} messages arrived", got.len(), sent.len()))
            .expect("subscriber runs");
        versions.push(payload[0]);
        got.extend(Records::new(payload).map(|m| m.expect("a readable message")));
    }
    // Concurrent senders have no order among themselves (each one's own messages keep theirs:
    // it awaits each answer before its next), so compare as sets.
    got.sort_by_key(|m| m.epoch);
    assert!(got == sent, "every message arrives once, unchanged");
    versions
}

/// Nothing more arrives on `inbox` for a moment.
async fn nothing_more(inbox: &mut mpsc::UnboundedReceiver<Bytes>) {
    let extra = tokio::time::timeout(Duration::from_millis(300), inbox.recv()).await;
    assert!(extra.is_err(), "unexpected payload: {extra:?}");
}

/// Whether every payload was a single version-2 message (what the previous release reads).
fn all_single(versions: &[u8]) -> bool {
    versions.iter().all(|&v| v == 2)
}

#[tokio::test]
async fn a_previous_release_node_gets_each_message_alone_under_load_and_a_current_one_gets_batches()
{
    let Some(redis) = RedisServer::start() else {
        return;
    };
    advertise_old(&redis, PREVIOUS_RELEASE);
    let _new = heartbeat(&redis, "new", BUS_READS, BusReaders::default());
    let me = sender(&redis);
    let mut old_inbox = inbox(&redis, "old").await;
    let mut new_inbox = inbox(&redis, "new").await;
    me.sees("old", 0).await;
    me.sees("new", BUS_READS).await;

    // The test runtime has one thread: all N sends queue before the sender task first runs, the
    // very case that made one batch before.
    let sent = messages(0);
    me.burst("old", &sent).await;
    let versions = receive(&mut old_inbox, &sent).await;
    assert_eq!(versions.len() as u64, N, "one PUBLISH per message");
    assert!(all_single(&versions), "{versions:?}");
    nothing_more(&mut old_inbox).await;

    let sent = messages(N);
    me.burst("new", &sent).await;
    let versions = receive(&mut new_inbox, &sent).await;
    assert!(versions.contains(&BATCH_VERSION), "{versions:?}");
    assert!(
        (versions.len() as u64) < N / 2,
        "{} PUBLISHes",
        versions.len()
    );
    nothing_more(&mut old_inbox).await;

    // A node nobody has heard of (no heartbeat) gets singles too: every sender is answered.
    let mut unknown_inbox = inbox(&redis, "unknown").await;
    let sent = messages(2 * N);
    me.burst("unknown", &sent).await;
    let versions = receive(&mut unknown_inbox, &sent).await;
    assert!(all_single(&versions), "{versions:?}");
}

#[tokio::test]
async fn an_upgrade_and_a_rollback_of_one_node_are_acted_on_within_a_few_seconds() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    advertise_old(&redis, PREVIOUS_RELEASE);
    let me = sender(&redis);
    let mut old_inbox = inbox(&redis, "old").await;
    me.sees("old", 0).await;

    // "old" is upgraded in place (same node-id): its heartbeat now advertises batches.
    let upgraded = PREVIOUS_RELEASE.replace('}', &format!(r#","bus_reads":{BUS_READS}}}"#));
    advertise_old(&redis, &upgraded);
    let took = me.sees("old", BUS_READS).await;
    eprintln!("upgrade seen after {took:?}");
    let sent = messages(0);
    me.burst("old", &sent).await;
    let versions = receive(&mut old_inbox, &sent).await;
    assert!(versions.contains(&BATCH_VERSION), "{versions:?}");

    // Rolled back to the previous release: singles again.
    advertise_old(&redis, PREVIOUS_RELEASE);
    let took = me.sees("old", 0).await;
    eprintln!("rollback seen after {took:?}");
    let sent = messages(N);
    me.burst("old", &sent).await;
    let versions = receive(&mut old_inbox, &sent).await;
    assert_eq!(versions.len() as u64, N, "{versions:?}");
    assert!(all_single(&versions), "{versions:?}");

    // Gone (its alive key removed): unknown, so singles; within a heartbeat.
    advertise_old(&redis, &upgraded);
    me.sees("old", BUS_READS).await;
    let mut raw = redis.client();
    redis::cmd("DEL")
        .arg("cg:node:old:alive")
        .exec(&mut raw)
        .expect("DEL");
    let mut alive = me.membership.alive();
    tokio::time::timeout(
        PICKED_UP,
        alive.wait_for(|nodes| nodes.iter().all(|n| n.id != "old")),
    )
    .await
    .expect("old seen gone")
    .expect("membership runs");
    let sent = messages(2 * N);
    me.burst("old", &sent).await;
    let versions = receive(&mut old_inbox, &sent).await;
    assert!(all_single(&versions), "{versions:?}");
}
