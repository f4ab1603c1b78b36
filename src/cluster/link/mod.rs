//! Direct links between cluster nodes (`cluster-listen`): the bus messages a `PUBLISH` carries,
//! node to node over one authenticated, encrypted TCP connection per direction, with no Redis
//! round trip. Redis keeps the registry, held streams and membership, and stays the path to any
//! node with no established link.
//!
//! # Layout
//!
//! | file | what it holds |
//! |---|---|
//! | `wire.rs` | the protocol without I/O: hellos, keys from `static-auth-secret`, sealed numbered frames |
//! | `dial.rs` | this node's outgoing links: one per alive node that advertises a link address, redialled after a break |
//! | `accept.rs` | the listener: bounded handshakes, one link per peer node, messages into this node's inbox, acknowledgements |
//! | `mod.rs` | [`Links`]: the established links by node, what sends use, the link-start rendezvous, metrics |
//!
//! # The rules
//!
//! - A link carries messages one way: node A dials node B to send A→B; B acknowledges each frame
//!   with one answer per message — taken by the inbox, or nobody reads the inbox (B's inbox left
//!   its channel while draining): the answers a `PUBLISH` gives, and the caller does what it does
//!   for those. A link that breaks answers its unacknowledged messages `Unavailable` (the sender is
//!   told), and never re-sends them through Redis; messages it had not written yet go through
//!   Redis (nothing of them reached B).
//! - Order: a message through Redis followed by one through a just-established link could reach
//!   B's inbox in the wrong order (a `PUBLISH`'s answer means "in B's subscription socket"). So
//!   once the link is authenticated, A queues B's messages on the link without writing them,
//!   `PUBLISH`es a link-start marker (behind whatever it published to B before) and writes only
//!   when B, whose inbox has read that marker, says [`Frame::Ready`](wire::Frame::Ready). B's inbox
//!   reads the links' messages before its subscription's, so a message acknowledged on a link
//!   that then broke is handled before anything the sender publishes after it.

pub mod accept;
pub mod dial;
pub mod wire;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts};
use tokio::sync::{mpsc, oneshot};

use super::bus::BusMessage;
use super::types::Unavailable;
use crate::metrics::Metrics;

/// Longest a link's handshake may take (hellos, proofs, and the link-start marker's round),
/// from either side.
pub const HANDSHAKE: Duration = Duration::from_secs(5);
/// Most incoming connections in their handshake at once; beyond that a new one is closed.
pub const HANDSHAKES: usize = 32;
/// Most incoming links at once (one per peer node): a cluster is far smaller; beyond this a new
/// node's link is refused (it keeps using Redis).
pub const MAX_INCOMING: usize = 256;
/// Messages waiting for one link's writer.
pub const QUEUE: usize = 4096;
/// Messages waiting for this node's inbox from all links together.
pub const INBOX: usize = 1024;

/// What became of one message handed to a link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Reply {
    /// The peer's inbox took it.
    Taken,
    /// The peer's inbox no longer reads (draining): hold it, as for a `PUBLISH` nobody received.
    Nobody,
    /// The link broke after writing it: whether the peer has it is unknown.
    Unavailable,
    /// Never written (the link broke or closed first, or it is too large for a frame): send it
    /// through Redis instead.
    Unwritten,
}

/// One message waiting for a link's writer.
pub(crate) struct Queued {
    /// The encoded [`BusMessage`].
    pub payload: Bytes,
    /// Where its answer goes.
    pub reply: oneshot::Sender<Reply>,
}

/// An established (or starting) outgoing link, as senders see it.
struct Outbound {
    /// Tells the link apart from a later one to the same node.
    generation: u64,
    /// The link writer's queue.
    queue: mpsc::Sender<Queued>,
}

/// The `reason`s of `callgate_cluster_link_failures_total`.
const REASONS: [&str; 9] = [
    "auth",
    "hello",
    "oversize",
    "malformed",
    "busy",
    "timeout",
    "io",
    "not_ready",
    "replaced",
];

/// `callgate_cluster_link*` metrics.
#[derive(Clone)]
pub struct LinkMetrics {
    /// `callgate_cluster_links{direction="out"}`: links this node sends on.
    pub outgoing: IntGauge,
    /// `callgate_cluster_links{direction="in"}`: links this node reads.
    pub incoming: IntGauge,
    /// `callgate_cluster_sent_total{path="link"}`: messages to other nodes sent on a link.
    pub by_link: IntCounter,
    /// `callgate_cluster_sent_total{path="redis"}`: messages to other nodes sent by `PUBLISH`.
    pub by_redis: IntCounter,
    /// `callgate_cluster_link_failures_total{reason}`: links refused or broken.
    failures: IntCounterVec,
}

impl LinkMetrics {
    /// Registers the families in `metrics`' registry (on every node: zeros without links).
    pub fn register(metrics: &Metrics) -> Self {
        let links = IntGaugeVec::new(
            Opts::new(
                "cluster_links",
                "Direct links to other cluster nodes (cluster-listen) established now: out = this \
                 node sends on it, in = this node reads it.",
            ),
            &["direction"],
        )
        .expect("valid metric");
        let sent = IntCounterVec::new(
            Opts::new(
                "cluster_sent_total",
                "Messages to other cluster nodes by path, on nodes with cluster-listen: link = a \
                 direct link (no Redis round trip), redis = PUBLISH (no link established).",
            ),
            &["path"],
        )
        .expect("valid metric");
        let failures = IntCounterVec::new(
            Opts::new(
                "cluster_link_failures_total",
                "Direct links refused or closed, by reason: auth (wrong static-auth-secret, or a \
                 frame altered or replayed), hello (not a callgate link), oversize, malformed, \
                 busy (too many handshakes), timeout, io (connection failed or broke), \
                 not_ready (the link-start marker did not come through), replaced.",
            ),
            &["reason"],
        )
        .expect("valid metric");
        // Every reason from the start, at 0, so a dashboard or an alert has a series to read.
        for reason in REASONS {
            failures.with_label_values(&[reason]);
        }
        metrics.register(Box::new(links.clone()));
        metrics.register(Box::new(sent.clone()));
        metrics.register(Box::new(failures.clone()));
        Self {
            outgoing: links.with_label_values(&["out"]),
            incoming: links.with_label_values(&["in"]),
            by_link: sent.with_label_values(&["link"]),
            by_redis: sent.with_label_values(&["redis"]),
            failures,
        }
    }

    /// Counts a refused or broken link.
    pub fn failed(&self, reason: &str) {
        self.failures.with_label_values(&[reason]).inc();
    }
}

/// This node's links: what the bus sends on, what the listener and the dialers share.
pub struct Links {
    /// This node's `node-id`.
    node: String,
    /// `static-auth-secret`s, the one that seals first.
    secrets: Vec<Vec<u8>>,
    /// Longest a sender waits for its answer (the bus timeout).
    timeout: Duration,
    /// Outgoing links by peer node ID; a starting link is here already (messages queue on it).
    outbound: Mutex<HashMap<String, Outbound>>,
    /// Numbers links (outgoing and incoming).
    generations: AtomicU64,
    /// Incoming links waiting for their link-start marker, by the dialer's nonce.
    starting: Mutex<HashMap<[u8; wire::NONCE_BYTES], oneshot::Sender<()>>>,
    /// Incoming links by peer node ID: a newer link from the same node stops the older.
    incoming: Mutex<HashMap<String, (u64, oneshot::Sender<()>)>>,
    /// Into this node's inbox.
    inbound: mpsc::Sender<BusMessage>,
    /// The inbox's end, until the inbox takes it.
    inbox: Mutex<Option<mpsc::Receiver<BusMessage>>>,
    /// Counts.
    metrics: LinkMetrics,
}

impl std::fmt::Debug for Links {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Links")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

/// A map behind a mutex; a panic elsewhere while holding it leaves nothing half-written.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Links {
    /// Links for node `node`, authenticated with `secrets` (the first seals; any opens), senders
    /// waiting at most `timeout` for an answer.
    pub fn new<S: AsRef<[u8]>>(
        node: &str,
        secrets: &[S],
        timeout: Duration,
        metrics: LinkMetrics,
    ) -> Arc<Self> {
        assert!(!secrets.is_empty(), "links need static-auth-secret");
        let (inbound, inbox) = mpsc::channel(INBOX);
        Arc::new(Self {
            node: node.to_owned(),
            secrets: secrets.iter().map(|s| s.as_ref().to_vec()).collect(),
            timeout,
            outbound: Mutex::new(HashMap::new()),
            generations: AtomicU64::new(0),
            starting: Mutex::new(HashMap::new()),
            incoming: Mutex::new(HashMap::new()),
            inbound,
            inbox: Mutex::new(Some(inbox)),
            metrics,
        })
    }

    /// The messages the links take, for this node's inbox (once; `None` after).
    pub fn take_inbox(&self) -> Option<mpsc::Receiver<BusMessage>> {
        lock(&self.inbox).take()
    }

    /// The metrics.
    pub fn metrics(&self) -> &LinkMetrics {
        &self.metrics
    }

    /// Whether a link to `node` is established (or starting).
    pub fn has_link(&self, node: &str) -> bool {
        lock(&self.outbound)
            .get(node)
            .is_some_and(|o| !o.queue.is_closed())
    }

    /// Sends `payload` (an encoded [`BusMessage`]) to `node` on its link and waits (at most the
    /// bus timeout) for the answer: `Ok(true)` its inbox took it, `Ok(false)` nobody reads there,
    /// `Err` unknown. `None`: no link to `node`, or the message was not written — send it
    /// through Redis.
    pub async fn send(&self, node: &str, payload: Bytes) -> Option<Result<bool, Unavailable>> {
        let queue = lock(&self.outbound).get(node)?.queue.clone();
        let (reply, answer) = oneshot::channel();
        let wait = async {
            if queue.send(Queued { payload, reply }).await.is_err() {
                return Reply::Unwritten;
            }
            answer.await.unwrap_or(Reply::Unavailable)
        };
        let sent = tokio::time::timeout(self.timeout, wait)
            .await
            .unwrap_or(Reply::Unavailable);
        match sent {
            Reply::Taken => {
                self.metrics.by_link.inc();
                Some(Ok(true))
            }
            Reply::Nobody => Some(Ok(false)),
            Reply::Unavailable => Some(Err(Unavailable)),
            Reply::Unwritten => None,
        }
    }

    /// A link-start marker with `nonce` reached this node's inbox: the link waiting for it may
    /// say ready. A marker no link waits for (it timed out, or the marker is forged) is ignored.
    pub fn started(&self, nonce: &[u8]) {
        let Ok(nonce) = <[u8; wire::NONCE_BYTES]>::try_from(nonce) else {
            return;
        };
        if let Some(ready) = lock(&self.starting).remove(&nonce) {
            let _ = ready.send(());
        }
    }

    /// A fresh link number.
    fn generation(&self) -> u64 {
        self.generations.fetch_add(1, Ordering::Relaxed)
    }

    /// Puts an outgoing link to `node` in place (replacing any older one): senders queue on it
    /// from now on. Its number, for [`Links::uninstall`].
    fn install(&self, node: &str, queue: mpsc::Sender<Queued>) -> u64 {
        let generation = self.generation();
        lock(&self.outbound).insert(node.to_owned(), Outbound { generation, queue });
        generation
    }

    /// Takes the outgoing link `generation` to `node` out, if it is still the one in place.
    fn uninstall(&self, node: &str, generation: u64) {
        let mut outbound = lock(&self.outbound);
        if outbound
            .get(node)
            .is_some_and(|o| o.generation == generation)
        {
            outbound.remove(node);
        }
    }

    /// Waits for the link-start marker with `nonce` (see [`Links::started`]).
    fn await_start(&self, nonce: [u8; wire::NONCE_BYTES]) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        let mut starting = lock(&self.starting);
        // Entries of handshakes that gave up are removed by them; this bound is a backstop.
        if starting.len() >= 4 * HANDSHAKES {
            starting.retain(|_, tx| !tx.is_closed());
        }
        starting.insert(nonce, tx);
        rx
    }

    /// Forgets the wait for `nonce` (the handshake ended either way).
    fn forget_start(&self, nonce: &[u8; wire::NONCE_BYTES]) {
        lock(&self.starting).remove(nonce);
    }

    /// Registers an incoming link from `node`, stopping the older one from that node if any.
    /// Its number and the signal that a newer link replaced it; `None` when [`MAX_INCOMING`]
    /// other nodes have one already.
    fn accept_from(&self, node: &str) -> Option<(u64, oneshot::Receiver<()>)> {
        let generation = self.generation();
        let (stop, stopped) = oneshot::channel();
        let mut incoming = lock(&self.incoming);
        if incoming.len() >= MAX_INCOMING && !incoming.contains_key(node) {
            return None;
        }
        if let Some((_, older)) = incoming.insert(node.to_owned(), (generation, stop)) {
            let _ = older.send(());
        }
        Some((generation, stopped))
    }

    /// The incoming link `generation` from `node` ended.
    fn accepted_ended(&self, node: &str, generation: u64) {
        let mut incoming = lock(&self.incoming);
        if incoming.get(node).is_some_and(|(g, _)| *g == generation) {
            incoming.remove(node);
        }
    }
}

/// Answers everything still queued on a link that closes `Unwritten` (its senders use Redis).
fn give_back(queue: &mut mpsc::Receiver<Queued>) {
    queue.close();
    while let Ok(queued) = queue.try_recv() {
        let _ = queued.reply.send(Reply::Unwritten);
    }
}

/// Why a link ended or was refused (the metric's `reason` and the log line).
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The protocol was broken (see [`wire::WireError`]).
    #[error(transparent)]
    Wire(#[from] wire::WireError),
    /// The connection failed or broke.
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    /// A step of the handshake took longer than [`HANDSHAKE`].
    #[error("the handshake took too long")]
    Timeout,
    /// The node at the advertised address is another node.
    #[error("the node at that address is {0}, not the one advertised there")]
    WrongPeer(String),
    /// The link-start marker could not be published or was not seen in time.
    #[error("the link-start marker did not come through Redis in time")]
    NotReady,
    /// The peer stopped acknowledging messages.
    #[error("the peer stopped acknowledging")]
    Stalled,
    /// [`MAX_INCOMING`] other nodes have a link already.
    #[error("{MAX_INCOMING} other nodes have a link already")]
    TooMany,
}

impl LinkError {
    /// The `reason` label of `callgate_cluster_link_failures_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Wire(e) => e.reason(),
            Self::Io(_) => "io",
            Self::Timeout | Self::Stalled => "timeout",
            Self::WrongPeer(_) => "hello",
            Self::NotReady => "not_ready",
            Self::TooMany => "busy",
        }
    }
}

/// Reads one frame's sealed body (after checking its length) into `buf` and opens it.
async fn read_frame<R>(
    rd: &mut R,
    opener: &mut wire::Opener,
    buf: &mut Vec<u8>,
) -> Result<wire::Frame, LinkError>
where
    R: tokio::io::AsyncRead + Unpin,
{
    use tokio::io::AsyncReadExt as _;
    let len = wire::Opener::check_len(rd.read_u32().await?)?;
    buf.resize(len, 0);
    rd.read_exact(buf).await?;
    Ok(wire::Frame::decode(opener.open(buf)?)?)
}

/// Reads the peer's hello.
async fn read_hello<R>(rd: &mut R) -> Result<wire::Hello, LinkError>
where
    R: tokio::io::AsyncRead + Unpin,
{
    use tokio::io::AsyncReadExt as _;
    let mut head = [0u8; wire::HELLO_HEAD];
    rd.read_exact(&mut head).await?;
    let (nonce, len) = wire::Hello::head(&head)?;
    let mut id = vec![0u8; len];
    rd.read_exact(&mut id).await?;
    Ok(wire::Hello::with_id(nonce, &id)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn links() -> Arc<Links> {
        let metrics = LinkMetrics::register(&Metrics::new());
        Links::new(
            "me",
            &["0123456789abcdef0123"],
            Duration::from_secs(1),
            metrics,
        )
    }

    /// One incoming link per peer (a newer one stops the older), at most [`MAX_INCOMING`] peers.
    #[test]
    fn incoming_links_are_one_per_peer_and_bounded() {
        let links = links();
        let (first, mut stopped) = links.accept_from("peer-0").unwrap();
        let (second, _) = links.accept_from("peer-0").unwrap();
        assert_ne!(first, second);
        assert_eq!(stopped.try_recv(), Ok(()), "the older link is told to stop");
        // The older one ending does not take the newer one out.
        links.accepted_ended("peer-0", first);
        assert!(lock(&links.incoming).contains_key("peer-0"));
        for n in 1..MAX_INCOMING {
            assert!(links.accept_from(&format!("peer-{n}")).is_some());
        }
        assert!(links.accept_from("one-too-many").is_none());
        assert!(
            links.accept_from("peer-7").is_some(),
            "a known peer may replace its link"
        );
        links.accepted_ended("peer-0", second);
        assert!(links.accept_from("one-too-many").is_some());
    }

    /// No link: the bus sends through Redis. A closed link: what was never written too.
    #[tokio::test]
    async fn without_an_open_link_a_message_goes_through_redis() {
        let links = links();
        assert_eq!(links.send("peer", Bytes::from_static(b"x")).await, None);
        let (queue, rx) = mpsc::channel(1);
        let generation = links.install("peer", queue);
        assert!(links.has_link("peer"));
        drop(rx);
        assert_eq!(links.send("peer", Bytes::from_static(b"x")).await, None);
        links.uninstall("peer", generation);
        assert!(!links.has_link("peer"));
    }
}
