//! Cluster membership: this node's heartbeat in Redis, and which other nodes are alive.
//!
//! Every [`HEARTBEAT_INTERVAL`] one Lua script (one round trip) does, with Redis's own clock:
//! - `SET cg:node:{id}:alive {info} PX 5000`: the node's advertised addresses, `draining`
//!   flag and the highest bus payload version it reads ([`BUS_READS`]), gone by itself [`ALIVE_TTL`] after the node stops (kill -9 included);
//! - `HSET cg:nodes {id} {now-ms}` and `PEXPIRE cg:nodes`: the list of nodes to look at, which
//!   expires as a whole if every node stops;
//! - reads every listed node's alive key; a node whose key is gone and whose last heartbeat is
//!   older than the stale bound (resume grace + [`ALIVE_TTL`]) is removed from `cg:nodes`.
//!
//! So `cg:nodes` holds at most the nodes that beat within the stale bound, and every key has a
//! TTL. On SIGTERM the server calls [`Membership::start_draining`] before anything else (the flag
//! is in Redis before `/readyz` turns 503), and [`Membership::leave`] after the last connection
//! is gone. A Redis outage only costs heartbeats: the node keeps serving, and the loop resumes
//! by itself when Redis returns.
//!
//! After each heartbeat the nodes' advertised payload versions go into [`BusReaders`], which the
//! bus asks before it puts several messages in one `PUBLISH`: a node that does not advertise
//! batches (one of the previous release, which drops them) gets each message alone, so a rolling
//! upgrade loses nothing. A change is seen at the next heartbeat, within [`HEARTBEAT_INTERVAL`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use prometheus::IntGauge;
use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Mutex, Notify};

use super::publish::BATCH_VERSION;
use super::redis::{Redis, RedisError};
use crate::metrics::Metrics;

/// How often a node writes its heartbeat and reads the others'.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);

/// Lifetime of a heartbeat: a node that stops beating counts as gone this long after its last.
pub const ALIVE_TTL: Duration = Duration::from_secs(5);

/// The highest bus payload version this node reads (batches, [`BATCH_VERSION`]), as its
/// heartbeat advertises it.
pub const BUS_READS: u8 = BATCH_VERSION;

/// `cg:nodes`: node ID → Redis time (ms) of its last heartbeat.
pub const NODES_KEY: &str = "cg:nodes";

/// The key of a node's heartbeat: `cg:node:{id}:alive`.
pub fn alive_key(node_id: &str) -> String {
    format!("cg:node:{node_id}:alive")
}

/// What a node says about itself in its heartbeat (JSON in its alive key).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// The node's `node-id`.
    pub id: String,
    /// Where its HTTPS listener is bound (what a load balancer targets).
    pub https: String,
    /// The TURN host (or external IP) it hands to browsers: media must reach this node's relay.
    pub turn: Option<String>,
    /// Shutting down: it accepts no new clients and is closing the ones it has (1001).
    pub draining: bool,
    /// The highest bus payload version the node reads ([`BUS_READS`] on this version). Absent
    /// (0) from the heartbeat of a node older than this field, which reads version 2 only.
    #[serde(default)]
    pub bus_reads: u8,
    /// Where the node accepts direct links from the other nodes (`cluster-advertise`), if it
    /// does. Absent from the heartbeat of a node without `cluster-listen` or older than this
    /// field: such a node gets every message by `PUBLISH`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<String>,
}

/// The payload version each alive node reads, by node ID, from the last heartbeat: written by
/// the heartbeat loop, read by the bus before each `PUBLISH`. Clones share the table. A node not
/// in it (unknown, gone, or this node before its first heartbeat) counts as reading version 2
/// only, so nothing it cannot read is sent to it.
#[derive(Clone, Debug, Default)]
pub struct BusReaders(Arc<RwLock<HashMap<String, u8>>>);

impl BusReaders {
    /// Replaces the table with what `alive` advertises.
    pub fn set(&self, alive: &[NodeInfo]) {
        let table = alive.iter().map(|n| (n.id.clone(), n.bus_reads)).collect();
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = table;
    }

    /// Whether `node` advertises that it reads batch payloads ([`BATCH_VERSION`]).
    pub fn reads_batches(&self, node: &str) -> bool {
        let table = self.0.read().unwrap_or_else(PoisonError::into_inner);
        table.get(node).is_some_and(|&v| v >= BATCH_VERSION)
    }
}

/// The heartbeat: write mine, list the alive ones, forget stale ones. See the module docs.
///
/// KEYS[1] = cg:nodes, KEYS[2] = my alive key; ARGV = my id, my info, alive TTL ms, stale ms,
/// cg:nodes TTL ms. Returns [id, info, id, info, …] of the nodes alive (me included).
const HEARTBEAT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
redis.call('HSET', KEYS[1], ARGV[1], now)
redis.call('PEXPIRE', KEYS[1], ARGV[5])
local listed = redis.call('HGETALL', KEYS[1])
local alive = {}
local stale = tonumber(ARGV[4])
for i = 1, #listed, 2 do
  local id, seen = listed[i], tonumber(listed[i + 1])
  local info = redis.call('GET', 'cg:node:' .. id .. ':alive')
  if info then
    alive[#alive + 1] = id
    alive[#alive + 1] = info
  elseif seen == nil or now - seen > stale then
    redis.call('HDEL', KEYS[1], id)
  end
end
return alive
";

/// Pre-resolved handles for the `callgate_cluster_nodes_*` gauges.
#[derive(Clone)]
pub struct NodeMetrics {
    /// `callgate_cluster_nodes_alive`: nodes whose heartbeat is current, this one included.
    pub alive: IntGauge,
    /// `callgate_cluster_nodes_draining`: of those, the ones shutting down.
    pub draining: IntGauge,
}

impl NodeMetrics {
    /// Registers the gauges in `metrics`' registry (on every node; 0 without redis-url).
    pub fn register(metrics: &Metrics) -> NodeMetrics {
        let alive = IntGauge::new(
            "cluster_nodes_alive",
            "Cluster nodes whose heartbeat in Redis is current, this one included; 0 without \
             redis-url; keeps its last value while Redis is unreachable.",
        )
        .expect("valid metric");
        let draining = IntGauge::new(
            "cluster_nodes_draining",
            "Cluster nodes alive but shutting down (draining).",
        )
        .expect("valid metric");
        metrics.register(Box::new(alive.clone()));
        metrics.register(Box::new(draining.clone()));
        NodeMetrics { alive, draining }
    }
}

/// What the heartbeat task and the [`Membership`] handle share.
struct Inner {
    /// The shared connection.
    redis: Redis,
    /// This node's advertised info; `draining` is taken from the flag below at each write.
    info: NodeInfo,
    /// Set once by [`Membership::start_draining`].
    draining: AtomicBool,
    /// Stale bound: how long after its last heartbeat a silent node is dropped from `cg:nodes`.
    stale_after: Duration,
    /// The heartbeat script (EVALSHA; reloaded on NOSCRIPT by redis-rs).
    script: redis::Script,
    /// Serialises writes, so a slow heartbeat cannot land after the draining one and undo it.
    writing: Mutex<()>,
    /// The nodes seen alive at the last successful heartbeat.
    alive: watch::Sender<Vec<NodeInfo>>,
    /// Gauges.
    metrics: NodeMetrics,
    /// Where the alive nodes' payload versions go after each heartbeat.
    readers: BusReaders,
    /// Stops the heartbeat loop.
    stop: Notify,
}

/// This node's membership: its heartbeat task, and the view of the others.
pub struct Membership {
    /// Shared with the task.
    inner: Arc<Inner>,
    /// The heartbeat loop.
    task: tokio::task::JoinHandle<()>,
}

impl Membership {
    /// Starts beating at once and every [`HEARTBEAT_INTERVAL`]. `info.draining` is ignored (a
    /// node starts serving). `resume_grace` sets the stale bound (a dead node's clients may
    /// resume elsewhere for that long; its entry is kept until then). After each heartbeat the
    /// alive nodes' payload versions go into `readers` (the bus's).
    pub fn start(
        redis: Redis,
        info: NodeInfo,
        resume_grace: Duration,
        metrics: NodeMetrics,
        readers: BusReaders,
    ) -> Membership {
        let inner = Arc::new(Inner {
            redis,
            info: NodeInfo {
                draining: false,
                ..info
            },
            draining: AtomicBool::new(false),
            stale_after: resume_grace + ALIVE_TTL,
            script: redis::Script::new(HEARTBEAT),
            writing: Mutex::new(()),
            alive: watch::Sender::new(Vec::new()),
            metrics,
            readers,
            stop: Notify::new(),
        });
        let task = tokio::spawn(beat(inner.clone()));
        Membership { inner, task }
    }

    /// This node's ID.
    pub fn node_id(&self) -> &str {
        &self.inner.info.id
    }

    /// The nodes alive at the last heartbeat (updated every second while Redis answers).
    pub fn alive(&self) -> watch::Receiver<Vec<NodeInfo>> {
        self.inner.alive.subscribe()
    }

    /// Marks this node draining in Redis now (and in every later heartbeat). Returns once Redis
    /// has it, or with the error after at most the command timeout: shutdown goes on either way.
    pub async fn start_draining(&self) -> Result<(), RedisError> {
        self.inner.draining.store(true, Ordering::Relaxed);
        write(&self.inner).await.map(|_| ())
    }

    /// Stops the heartbeat and removes this node from Redis (its alive key and its `cg:nodes`
    /// entry), so the others count it gone at once rather than after [`ALIVE_TTL`].
    pub async fn leave(mut self) {
        self.inner.stop.notify_one();
        let _ = (&mut self.task).await;
        let mut pipe = redis::pipe();
        pipe.del(alive_key(&self.inner.info.id))
            .ignore()
            .hdel(NODES_KEY, &self.inner.info.id)
            .ignore();
        match self.inner.redis.pipeline::<()>(&pipe).await {
            Ok(()) => tracing::info!(node = %self.inner.info.id, "left the cluster"),
            Err(e) => tracing::warn!(
                node = %self.inner.info.id,
                "could not remove this node from Redis ({e}); the others see it gone within {ALIVE_TTL:?}"
            ),
        }
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The heartbeat loop: one write every interval until stopped; failures are counted and logged
/// by [`Redis`], and the next tick simply tries again.
async fn beat(inner: Arc<Inner>) {
    let mut ticks = tokio::time::interval(HEARTBEAT_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Whether the last heartbeat was refused for a reason other than an outage (which `Redis`
    // logs itself): such a refusal is logged once, not every second.
    let mut refused = false;
    loop {
        tokio::select! {
            _ = inner.stop.notified() => return,
            _ = ticks.tick() => {}
        }
        match write(&inner).await {
            Ok(alive) => {
                refused = false;
                let draining = alive.iter().filter(|n| n.draining).count();
                inner.metrics.alive.set(alive.len() as i64);
                inner.metrics.draining.set(draining as i64);
                inner.readers.set(&alive);
                inner.alive.send_replace(alive);
            }
            Err(e) if !e.is_outage() && !refused => {
                refused = true;
                tracing::error!(
                    node = %inner.info.id,
                    "Redis refuses this node's heartbeat ({e}); the other nodes do not see it. \
                     Check the Redis user's ACL (docs/SECURITY.md, \"Cluster\")"
                );
            }
            Err(_) => {}
        }
    }
}

/// One heartbeat: runs the script and parses the alive nodes it returns.
async fn write(inner: &Inner) -> Result<Vec<NodeInfo>, RedisError> {
    let _writing = inner.writing.lock().await;
    let info = NodeInfo {
        draining: inner.draining.load(Ordering::Relaxed),
        ..inner.info.clone()
    };
    let json = serde_json::to_string(&info).expect("NodeInfo serialises");
    let mut invocation = inner.script.prepare_invoke();
    invocation
        .key(NODES_KEY)
        .key(alive_key(&info.id))
        .arg(&info.id)
        .arg(json)
        .arg(ALIVE_TTL.as_millis() as u64)
        .arg(inner.stale_after.as_millis() as u64)
        .arg((inner.stale_after + Duration::from_secs(60)).as_millis() as u64);
    let listed: Vec<String> = inner.redis.script(&invocation).await?;
    Ok(parse_alive(&listed))
}

/// [id, info, …] → the infos that parse; a foreign or damaged entry is skipped, not fatal.
fn parse_alive(listed: &[String]) -> Vec<NodeInfo> {
    listed
        .chunks_exact(2)
        .filter_map(|pair| serde_json::from_str::<NodeInfo>(&pair[1]).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn damaged_entries_are_skipped() {
        let good = serde_json::to_string(&NodeInfo {
            id: "a".into(),
            https: "10.0.0.1:443".into(),
            turn: Some("a.example.com".into()),
            draining: true,
            bus_reads: BUS_READS,
            link: None,
        })
        .unwrap();
        let listed = vec!["a".into(), good, "b".into(), "{not json".into()];
        let alive = parse_alive(&listed);
        assert_eq!(alive.len(), 1);
        assert!(alive[0].draining);
        assert_eq!(alive[0].bus_reads, BUS_READS);
    }

    /// The heartbeat of the previous release has no `bus_reads`; it must parse (as "reads 2"),
    /// and ours must parse on a node of the previous release (which ignores unknown fields).
    #[test]
    fn heartbeats_of_either_release_parse_on_the_other_and_only_v3_readers_get_batches() {
        let old = r#"{"id":"old","https":"10.0.0.1:443","turn":null,"draining":false}"#;
        let new = serde_json::to_string(&NodeInfo {
            id: "new".into(),
            https: "10.0.0.2:443".into(),
            turn: None,
            draining: false,
            bus_reads: BUS_READS,
            link: None,
        })
        .unwrap();
        let alive = parse_alive(&["old".into(), old.into(), "new".into(), new.clone()]);
        assert_eq!(alive.len(), 2);
        assert_eq!(alive[0].bus_reads, 0);

        /// `NodeInfo` as the previous release declares it.
        #[derive(Deserialize)]
        #[allow(dead_code)]
        struct PreviousNodeInfo {
            id: String,
            https: String,
            turn: Option<String>,
            draining: bool,
        }
        assert_eq!(
            serde_json::from_str::<PreviousNodeInfo>(&new).unwrap().id,
            "new"
        );

        let readers = BusReaders::default();
        assert!(!readers.reads_batches("new"), "unknown: no batches");
        readers.set(&alive);
        assert!(readers.reads_batches("new"));
        assert!(!readers.reads_batches("old"));
        assert!(!readers.reads_batches("elsewhere"));
        readers.set(&alive[..1]);
        assert!(!readers.reads_batches("new"), "gone: no batches");
    }
}
