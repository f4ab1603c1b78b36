//! A cluster node's signaling: the hub's router over the Redis registry ([`ClusterRegistry`])
//! and the Redis bus ([`ClusterBus`]), and the tasks that keep the node in step with the others.
//!
//! - **inbox**: this node's subscription. A message for an ID a connection here holds (at the
//!   epoch it was routed by) is numbered and queued here; one for an ID that is not live here
//!   (reserved, or moved on) goes to the ID's held stream, where its resume — on any node — finds
//!   it. A kick closes the connection it names (the ID was resumed elsewhere) and, when it names
//!   the new home, answers it with one handover message carrying what the connection held, which
//!   the new home replays before anything newer ([`ClusterBus::hand_over`](Bus::hand_over) waits
//!   for it), once nothing for the ID is on its way here (a message its connection is delivering,
//!   the move of its log to the held stream). A barrier from a node whose route moved off this
//!   one is answered in order with everything else ([`Routes`]' docs). After a gap in the
//!   subscription, what was held for this node's live IDs meanwhile is delivered. A draining node keeps reading until its own clients are gone, then leaves the
//!   channel cleanly (nothing Redis counted as received is dropped unread).
//! - **leases**: every `grace / 3`, this node's live IDs' keys are renewed (one pipelined round
//!   trip per 256 IDs); bindings Redis no longer gives to this node are closed so their clients
//!   resume. Each renewal also records what was numbered for each acknowledging client (its
//!   delivery record), so a resume elsewhere after this node dies can tell a quiet call lost
//!   nothing (see `lua/resume.lua`). The same pass asks, in one pipelined round trip, whether each local client's call
//!   peer on another node is still held anywhere: a peer whose ID no node holds any more in two
//!   passes in a row (its node died and nobody resumed it) ends the call, and the client is told
//!   `close-call-server` (`peer_gone`).
//! - **reconcile**: after a Redis outage, brings Redis up to date with what this node decided
//!   and settles what it does not know ([`ClusterRegistry::reconcile`]); tells the clients whose
//!   calls that ended.
//! - **orphans**: every few seconds, messages held for IDs that expired unresumed are taken and
//!   their senders told `undelivered` (`recipient_gone`).
//!
//! A single node runs none of this: its router is the memory registry and `NoBus`.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts};
use redis::aio::ConnectionLike;
use tokio::sync::oneshot;

use super::behind::{self, Behind};
use super::bus::{
    self, BusEvent, BusKind, BusMessage, BusSettings, Flushed, Hold, RedisBus, Subscription,
};
use super::calls::ClusterRegistry;
use super::link::Links;
use super::nodes::BusReaders;
use super::redis::{Redis, RedisConnection};
use super::registry::{RedisRegistry, RegistrySettings};
use super::route::{self, RouteSettings, Routes};
use super::types::{Binding, CallState, Freed, NodeId};
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;
use crate::signaling::bus::{Bus, BusDelivery, BusUnavailable, Handover, Held};
use crate::signaling::delivery::Envelope;
use crate::signaling::hub::{CallEvent, Effect, Hub};
use crate::signaling::protocol::{ClientId, DropReason, EndReason, ServerKind, ServerMessage};
use crate::signaling::registry::Registry as _;
use crate::signaling::router::Router;
use crate::signaling::session::SessionHub;
use crate::signaling::SignalingLimits;

/// The registry of a cluster node's hub.
pub type NodeRegistry = ClusterRegistry<RedisConnection>;
/// The bus of a cluster node's hub.
pub type NodeBus = ClusterBus<RedisConnection>;
/// A cluster node's router, as its sessions use it.
pub type NodeRouter = SessionHub<NodeRegistry, NodeBus>;

/// How often the orphan sweep runs, and how many IDs it takes per run.
const ORPHAN_SWEEP: (Duration, usize) = (Duration::from_secs(2), 64);

/// How often the node checks whether Redis must be brought up to date after an outage (a check
/// of two counters; Redis is asked only when there is something to do).
const RECONCILE_EVERY: Duration = Duration::from_millis(250);

/// After the subscription comes back, when to look for held messages a second time.
const RESUBSCRIBE_SECOND_LOOK: Duration = Duration::from_secs(2);

/// How long a resume waits for the node that held the ID to hand over what it held; past this,
/// that node counts as failed (what it had not had confirmed is reported lost). Longer than
/// [`HANDOVER_SETTLE`] plus a `PUBLISH`, so a node that waited its whole bound is still heard.
const HANDOVER_WAIT: Duration = Duration::from_secs(3);

/// Longest a node asked to hand an ID over waits for what it still has on its way for that ID:
/// a message the ID's connection here is delivering, and the move of a dropped ID's log to its
/// held stream (each bounded by Redis's 1 s command timeout per step).
const HANDOVER_SETTLE: Duration = Duration::from_secs(2);

/// Longest wait for one Redis operation of the registry or the bus, and for a message's answer
/// from another node (by `PUBLISH` or a direct link).
pub const BUS_TIMEOUT: Duration = Duration::from_secs(1);

/// Events waiting between the subscription task and the inbox.
const INBOX_CAPACITY: usize = 1024;

/// While draining, how often the inbox looks whether any ID is still live here (a cheap look at
/// the node's own table), and the longest it stays subscribed after the shutdown signal.
const INBOX_DRAIN_CHECK: Duration = Duration::from_millis(20);
/// See [`INBOX_DRAIN_CHECK`]: well under the shutdown timeout, well over closing every client.
const INBOX_DRAIN_MAX: Duration = Duration::from_secs(5);

/// `callgate_cluster_messages_total{direction}`: messages between nodes; and what the node still
/// has to settle with Redis after an outage.
#[derive(Clone)]
pub struct ClusterMetrics {
    /// Published to another node's inbox and received by it.
    pub sent: IntCounter,
    /// Taken from this node's inbox.
    pub received: IntCounter,
    /// `callgate_cluster_unsettled{kind="transitions"}`: call-state changes with a client of
    /// another node whose outcome this node does not know yet.
    pub unsettled_transitions: IntGauge,
    /// `callgate_cluster_unsettled{kind="departures"}`: IDs that left this node while Redis
    /// could not be told.
    pub unsettled_departures: IntGauge,
    /// `callgate_cluster_call_corrections_total`: clients told `close-call-server` because a
    /// call-state change ran after its sender was told it failed, or this node's write-back
    /// replaced a call another node made during an outage.
    pub corrections: IntCounter,
}

impl ClusterMetrics {
    /// Registers the family in `metrics`' registry (on every node: zeros on a single node).
    pub fn register(metrics: &Metrics) -> ClusterMetrics {
        let family = IntCounterVec::new(
            Opts::new(
                "cluster_messages_total",
                "Signaling messages between cluster nodes: sent = published to the node holding \
                 the recipient and received there; received = taken from this node's inbox. \
                 Messages between two clients of one node never appear here.",
            ),
            &["direction"],
        )
        .expect("valid metric");
        metrics.register(Box::new(family.clone()));
        let unsettled = IntGaugeVec::new(
            Opts::new(
                "cluster_unsettled",
                "What this node still has to settle with Redis after an outage: transitions = \
                 cross-node call-state changes whose outcome it does not know; departures = IDs \
                 that left while Redis could not be told. 0 when Redis is fine.",
            ),
            &["kind"],
        )
        .expect("valid metric");
        metrics.register(Box::new(unsettled.clone()));
        let corrections = IntCounter::new(
            "cluster_call_corrections_total",
            "Clients told close-call-server after a Redis outage: a call-state change Redis ran \
             after its sender was told it failed, or a call another node made meanwhile that \
             this node's write-back replaced.",
        )
        .expect("valid metric");
        metrics.register(Box::new(corrections.clone()));
        ClusterMetrics {
            sent: family.with_label_values(&["sent"]),
            received: family.with_label_values(&["received"]),
            unsettled_transitions: unsettled.with_label_values(&["transitions"]),
            unsettled_departures: unsettled.with_label_values(&["departures"]),
            corrections,
        }
    }
}

/// The hub's [`Bus`] on a cluster node: [`Routes`] (cached route, one `PUBLISH`, or the held
/// stream), kicks and held-stream replays.
pub struct ClusterBus<C> {
    /// Route cache, publishing and holding.
    routes: Routes<C>,
    /// Counts what crosses nodes.
    metrics: ClusterMetrics,
    /// This node, named in kicks so the kicked node knows where to hand over.
    node: NodeId,
    /// Resumes here waiting for another node's handover, by ID and new epoch: at most one per
    /// resume in progress, each removed when its wait ends.
    handovers: Mutex<HashMap<(ClientId, u64), oneshot::Sender<Flushed>>>,
    /// Messages from the inbox waiting behind the flush of their recipient's log (see
    /// [`behind`]), with the epoch they were routed by.
    behind: Behind<(Option<u64>, Envelope)>,
}

impl<C> ClusterBus<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    /// A bus over `routes`, for the node `node`.
    pub fn new(routes: Routes<C>, metrics: ClusterMetrics, node: NodeId) -> Self {
        Self {
            routes,
            metrics,
            node,
            handovers: Mutex::new(HashMap::new()),
            behind: Behind::new(INBOX_CAPACITY),
        }
    }

    /// Passes a handover to the resume waiting for it; gives it back if none waits (it gave up).
    fn handed_over(&self, to: ClientId, epoch: u64, flushed: Flushed) -> Result<(), Flushed> {
        let waiting = self
            .handovers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&(to, epoch));
        match waiting {
            Some(tx) => tx.send(flushed),
            None => Err(flushed),
        }
    }

    /// The routes, for the node's tasks.
    pub fn routes(&self) -> &Routes<C> {
        &self.routes
    }
}

impl<C> Bus for ClusterBus<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    async fn send(&self, to: ClientId, envelope: Envelope) -> BusDelivery {
        match self.routes.deliver(to, None, envelope).await {
            route::BusDelivery::Delivered => {
                self.metrics.sent.inc();
                BusDelivery::Delivered
            }
            route::BusDelivery::Held => BusDelivery::Held,
            route::BusDelivery::NoSuchClient => BusDelivery::NoSuchClient,
            route::BusDelivery::Dropped(reason) => BusDelivery::Dropped(reason),
            route::BusDelivery::Unavailable => BusDelivery::Unavailable,
        }
    }

    async fn send_unless_here(
        &self,
        to: ClientId,
        envelope: Envelope,
    ) -> Result<BusDelivery, Envelope> {
        let delivery = self
            .routes
            .deliver_unless_at(to, None, envelope, Some(&self.node))
            .await?;
        Ok(match delivery {
            route::BusDelivery::Delivered => {
                self.metrics.sent.inc();
                BusDelivery::Delivered
            }
            route::BusDelivery::Held => BusDelivery::Held,
            route::BusDelivery::NoSuchClient => BusDelivery::NoSuchClient,
            route::BusDelivery::Dropped(reason) => BusDelivery::Dropped(reason),
            route::BusDelivery::Unavailable => BusDelivery::Unavailable,
        })
    }

    fn holds_reserved(&self) -> bool {
        true
    }

    async fn take_held(&self, to: ClientId) -> Vec<Envelope> {
        match self.routes.bus().take_held(to).await {
            Ok(held) => held
                .into_iter()
                .filter(|m| m.kind == BusKind::Deliver)
                .map(BusMessage::into_envelope)
                .collect(),
            Err(_) => {
                tracing::warn!(client = %to, "messages held for a resumed ID could not be taken: Redis unavailable; they are reported to their senders when they expire");
                Vec::new()
            }
        }
    }

    async fn read_held(&self, to: Binding) -> Result<Held, BusUnavailable> {
        let read = self
            .routes
            .bus()
            .read_held(to)
            .await
            .map_err(|_| BusUnavailable)?;
        let mut held = Held {
            cursor: read.cursor,
            ..Held::default()
        };
        for message in read.messages {
            match message.kind {
                BusKind::Deliver => held.messages.push(message.into_envelope()),
                BusKind::Missed => held.missed = merge(held.missed, message.missed_range()),
                BusKind::Kick
                | BusKind::Flushed
                | BusKind::LinkStart
                | BusKind::Sync
                | BusKind::Synced => {}
            }
        }
        Ok(held)
    }

    async fn trim_held(&self, to: ClientId, cursor: String) {
        for _ in 0..2 {
            if self.routes.bus().trim_held(to, &cursor).await.is_ok() {
                return;
            }
        }
        tracing::warn!(client = %to, "messages held for a resumed ID were delivered but could not be deleted: Redis unavailable; a later resume may deliver them again");
    }

    async fn hold_missed(&self, binding: Binding, missed: (u64, u64)) {
        let marker = BusMessage::missed(binding.id, binding.epoch, missed);
        if !matches!(self.routes.bus().hold_marker(&marker).await, Ok(true)) {
            tracing::debug!(client = %binding.id, ?missed, "missed range not held: the ID moved on or Redis is unavailable");
        }
    }

    async fn hand_over(&self, node: &NodeId, old: Binding, new: Binding) -> Handover {
        let (tx, rx) = oneshot::channel();
        self.handovers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert((new.id, new.epoch), tx);
        let to = bus::Handover {
            node: self.node.clone(),
            epoch: new.epoch,
        };
        let kick = BusMessage::kick_to(old.id, old.epoch, &to);
        let answer = match self.routes.bus().send(node, &kick).await {
            // Somebody listens on its channel: wait for its answer, a bounded time.
            Ok(true) => tokio::time::timeout(HANDOVER_WAIT, rx)
                .await
                .ok()
                .and_then(Result::ok),
            // Nobody does: it is dead (or cut off from Redis).
            Ok(false) | Err(_) => None,
        };
        self.handovers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&(new.id, new.epoch));
        match answer {
            Some(flushed) => Handover::Flushed(Held {
                messages: flushed
                    .messages
                    .into_iter()
                    .filter(|m| m.kind == BusKind::Deliver)
                    .map(BusMessage::into_envelope)
                    .collect(),
                missed: flushed.missed,
                cursor: None,
            }),
            None => Handover::Unanswered,
        }
    }

    fn went_elsewhere(&self, to: ClientId) -> bool {
        self.routes.went_elsewhere(to, &self.node)
    }

    async fn settle_here(&self, to: ClientId) {
        self.routes.sync_if_moved(to, &self.node).await;
    }

    async fn kick(&self, node: &NodeId, binding: Binding) {
        let kick = BusMessage::kick(binding.id, binding.epoch);
        if let Err(e) = self.routes.bus().send(node, &kick).await {
            tracing::debug!(client = %binding.id, %node, "kick not sent: {e}");
        }
    }
}

/// Everything a cluster node's signaling needs, made from the node's Redis connection; its bus
/// batches only to the nodes `readers` (filled by membership) says read batches, and sends on
/// `links` to the nodes it has a direct link to.
pub fn router(
    redis: &Redis,
    node: NodeId,
    limits: SignalingLimits,
    metrics: ClusterMetrics,
    readers: BusReaders,
    links: Option<Arc<Links>>,
) -> NodeRouter {
    let grace = limits.resume_grace;
    let timeout = BUS_TIMEOUT;
    let registry = RedisRegistry::new(
        redis.connection(),
        RegistrySettings {
            id_digits: limits.id_digits,
            lease: lease(grace),
            timeout,
        },
    );
    let bus = RedisBus::with_readers(
        redis.client().clone(),
        redis.connection(),
        BusSettings {
            held_messages: limits.resume_queue_messages,
            held_bytes: limits.resume_queue_bytes,
            held_bytes_total: limits.resume_queue_bytes_total,
            grace,
            timeout,
        },
        readers,
    );
    let bus = match links {
        Some(links) => bus.with_links(links),
        None => bus,
    };
    let routes = Routes::new(
        registry.clone(),
        bus,
        RouteSettings {
            max_routes: limits.max_clients,
            ttl: Duration::from_secs(2),
        },
    )
    .syncing_as(node.clone());
    let hub = Hub::new(
        ClusterRegistry::new(registry, node.clone()),
        node.clone(),
        limits,
    );
    Router::new(hub, ClusterBus::new(routes, metrics, node))
}

/// A live ID's lease: a grace period plus the refresh period, so a dead node's IDs stay
/// resumable for at least a grace period.
pub fn lease(grace: Duration) -> Duration {
    grace + refresh_period(grace)
}

/// How often live IDs' leases are renewed.
fn refresh_period(grace: Duration) -> Duration {
    (grace / 3).max(Duration::from_millis(200))
}

/// Starts the node's tasks (see the module docs); they end at shutdown.
pub fn spawn(router: Arc<NodeRouter>, shutdown: &Shutdown) {
    let node = router.hub().node().clone();
    let subscription = router.bus().routes().bus().subscribe(&node, INBOX_CAPACITY);
    let linked = router
        .bus()
        .routes()
        .bus()
        .links()
        .and_then(|links| links.take_inbox());
    tokio::spawn(inbox(
        router.clone(),
        subscription,
        linked,
        shutdown.clone(),
    ));
    tokio::spawn(leases(router.clone(), shutdown.clone()));
    tokio::spawn(reconcile(router.clone(), shutdown.clone()));
    tokio::spawn(orphans(router, shutdown.clone()));
}

/// Receives this node's messages until it has left its channel at shutdown.
///
/// A draining node keeps reading while it closes its clients (1001): what other nodes published
/// to it meanwhile — Redis counted it received — is held in each ID's stream for its resume, or
/// sent on to where it resumed. Once no ID is live here and no dropped client's log is still
/// being moved to its held stream (or after [`INBOX_DRAIN_MAX`]) the
/// subscription leaves the channel cleanly, everything Redis sent before that is handled, and
/// only then does the inbox end; from then on senders find no subscriber and hold the messages
/// themselves. (Before, the inbox ended at the signal and what was in flight to it was lost.)
///
/// Messages from direct links (`linked`, see [`super::link`]) are read before the
/// subscription's: one a link acknowledged is handled before anything its sender publishes
/// after the link broke. Leaving the channel closes them too (links answer "nobody" from then).
async fn inbox(
    router: Arc<NodeRouter>,
    mut subscription: Subscription,
    mut linked: Option<tokio::sync::mpsc::Receiver<BusMessage>>,
    mut shutdown: Shutdown,
) {
    let mut draining: Option<Instant> = None;
    let mut unsubscribed = false;
    let mut check = tokio::time::interval(INBOX_DRAIN_CHECK);
    loop {
        let event = tokio::select! {
            biased;
            Some(message) = next_linked(&mut linked) => {
                route::in_inbox(receive(&router, message)).await;
                continue;
            }
            _ = shutdown.recv(), if draining.is_none() => {
                draining = Some(Instant::now());
                continue;
            }
            _ = check.tick(), if draining.is_some() && !unsubscribed => {
                let since = draining.map_or(Duration::ZERO, |at| at.elapsed());
                let settled = router.hub().registry().live().is_empty()
                    && router.flushes_in_progress() == 0
                    && router.bus().behind.is_empty();
                if settled || since >= INBOX_DRAIN_MAX {
                    tracing::debug!(?since, "cluster inbox leaving its channel");
                    subscription.unsubscribe();
                    if let Some(linked) = &mut linked {
                        linked.close();
                    }
                    unsubscribed = true;
                }
                continue;
            }
            event = subscription.next() => event,
        };
        match event {
            None => {
                // Left the channel: what the links took before closing is handled too.
                if let Some(linked) = &mut linked {
                    linked.close();
                    while let Some(message) = linked.recv().await {
                        route::in_inbox(receive(&router, message)).await;
                    }
                }
                return;
            }
            Some(BusEvent::Subscribed { resumed: false }) => {
                tracing::info!(node = %router.hub().node(), "cluster inbox subscribed");
            }
            Some(BusEvent::Subscribed { resumed: true }) => {
                tracing::info!(
                    "cluster inbox subscribed again; delivering what was held meanwhile"
                );
                take_held_for_live(&router).await;
                // A sender that found no subscriber just before this may hold its message just
                // after: look once more, a moment later.
                let router = router.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(RESUBSCRIBE_SECOND_LOOK).await;
                    take_held_for_live(&router).await;
                });
            }
            Some(BusEvent::Message(message)) => {
                route::in_inbox(receive(&router, message)).await;
            }
        }
    }
}

/// The next message from the direct links; never, without links; `None` once they are closed
/// and read to the end.
async fn next_linked(
    linked: &mut Option<tokio::sync::mpsc::Receiver<BusMessage>>,
) -> Option<BusMessage> {
    match linked {
        Some(linked) => linked.recv().await,
        None => std::future::pending().await,
    }
}

/// Delivers what was held for this node's live IDs while its subscription was down (senders
/// found no subscriber and held their messages). Read, delivered, then trimmed: what cannot be
/// read now stays held for the second look or the ID's next resume.
async fn take_held_for_live(router: &NodeRouter) {
    for binding in router.hub().registry().live() {
        let Ok(held) = router.bus().read_held(binding).await else {
            tracing::debug!(client = %binding.id, "held messages not read: Redis unavailable; they stay held");
            continue;
        };
        for envelope in held.messages {
            deliver_here(router, binding.id, Some(binding.epoch), envelope).await;
        }
        if let Some(cursor) = held.cursor {
            router.bus().trim_held(binding.id, cursor).await;
        }
    }
}

/// One message from another node.
async fn receive(router: &Arc<NodeRouter>, message: BusMessage) {
    match message.kind {
        BusKind::Kick => {
            let Some(epoch) = message.epoch else { return };
            let binding = Binding {
                id: message.to,
                epoch,
            };
            router.hub().registry().forget(binding);
            match message.handover() {
                // In the inbox, not a task of its own: its answer must leave after whatever
                // this inbox received for the ID before the kick (sent on to the new home
                // through the same per-node queue). Its wait for what is on its way is bounded
                // (HANDOVER_SETTLE) and usually nothing.
                Some(handover) => hand_over(router, binding, handover).await,
                None => {
                    if router.kick(binding, Instant::now()).await {
                        tracing::debug!(client = %binding.id, "connection closed: its ID was resumed on another node");
                    }
                }
            }
        }
        BusKind::Flushed => {
            let Some(epoch) = message.epoch else { return };
            let flushed = match Flushed::decode(message.frame.clone()) {
                Ok(flushed) => flushed,
                Err(e) => {
                    tracing::warn!(error = %e, client = %message.to, "redis bus: skipped a handover");
                    return;
                }
            };
            if let Err(late) = router.bus().handed_over(message.to, epoch, flushed) {
                // The resume stopped waiting: deliver what came, late rather than never.
                tracing::debug!(client = %message.to, "a handover came after its resume stopped waiting");
                for m in late
                    .messages
                    .into_iter()
                    .filter(|m| m.kind == BusKind::Deliver)
                {
                    deliver_here(router, message.to, Some(epoch), m.into_envelope()).await;
                }
            }
        }
        // Only ever in held streams.
        BusKind::Missed => {}
        BusKind::LinkStart => {
            if let Some(links) = router.bus().routes().bus().links() {
                links.started(&message.frame);
            }
        }
        // Another node's route to `to` moved off this node: everything it sent here before is
        // handled (this inbox goes in order), so it may publish to the new home now.
        BusKind::Sync => {
            let Some(node) = message.sync_from() else {
                return;
            };
            let answer = BusMessage::synced(&message);
            if let Err(e) = router.bus().routes().bus().send(&node, &answer).await {
                tracing::debug!(client = %message.to, %node, "barrier not answered: {e}");
            }
        }
        BusKind::Synced => {
            if let Some(token) = message.epoch {
                router.bus().routes().synced(token);
            }
        }
        BusKind::Deliver => {
            router.bus().metrics.received.inc();
            let (to, epoch) = (message.to, message.epoch);
            if matches!(
                message.server_kind,
                ServerKind::VideoAnswerRequest
                    | ServerKind::ServerReply
                    | ServerKind::CloseCallServer
            ) {
                // Another node changed this ID's call: re-read it before the client can answer.
                let registry = router.hub().registry();
                let before = registry.cached(to).map(|(_, state)| state);
                registry.sync_call(to).await;
                let after = registry.cached(to).map(|(_, state)| state);
                if let Some(event) = remote_call_event(to, before, after) {
                    router.hub().observe(event, Instant::now());
                }
            }
            deliver_in_order(router, to, epoch, message.into_envelope()).await;
        }
    }
}

/// [`deliver_here`] for the inbox, without holding up other IDs: a message for an ID whose
/// dropped client's log is being flushed waits in that ID's queue behind the flush ([`behind`]),
/// and so does every later message for it until the queue is empty, so their order is kept;
/// the inbox goes on with the next message. (Before, the inbox waited for the flush — up to
/// 2 s when Redis is slow — and every message behind it, for any ID, waited too.)
async fn deliver_in_order(
    router: &Arc<NodeRouter>,
    to: ClientId,
    epoch: Option<u64>,
    envelope: Envelope,
) {
    let queues = &router.bus().behind;
    let Err((epoch, envelope)) = queues.push(to, (epoch, envelope)) else {
        return;
    };
    let now = Instant::now();
    let Err(envelope) = router.deliver_from_bus(to, epoch, envelope, now).await else {
        return;
    };
    if router.is_flushing(to) {
        match queues.start(to, (epoch, envelope)) {
            // Joined a queue another receiver started just now: its drain takes it.
            Ok(false) => {}
            Ok(true) => {
                let router = router.clone();
                tokio::spawn(async move {
                    let queues = &router.bus().behind;
                    let flushed = router.wait_flushed(to);
                    behind::drain(queues, to, flushed, |(epoch, envelope)| {
                        hold_here(&router, to, epoch, envelope)
                    })
                    .await;
                });
            }
            // As many wait already as the inbox holds: wait here (back-pressure).
            Err((epoch, envelope)) => {
                router.wait_flushed(to).await;
                hold_here(router, to, epoch, envelope).await;
            }
        }
        return;
    }
    hold_here(router, to, epoch, envelope).await;
}

/// The ID was resumed on `handover.node` while this node held it (live, or reserved after a
/// drop): closes the connection and sends what it held there in one message, which that node
/// replays before anything newer. An empty answer when nothing here holds it, so the new home
/// need not wait out its bound.
///
/// The answer waits (at most [`HANDOVER_SETTLE`]) until nothing for the ID is on its way here:
/// a message its connection was delivering when the kick came (else the client's next message,
/// sent from the new home, could overtake it: window 1 of the ordering review), and the move of
/// a dropped connection's log to the held stream (else the new home read the stream half
/// written, and the rest, sent on later, came after newer messages: window 2).
async fn hand_over(router: &NodeRouter, binding: Binding, handover: bus::Handover) {
    let now = Instant::now();
    let taken = router.kick_for_handover(binding, now).unwrap_or_default();
    let settled = async {
        router.wait_sent(binding.id, HANDOVER_SETTLE).await;
        router.wait_flushed(binding.id).await;
    };
    if tokio::time::timeout(HANDOVER_SETTLE, settled)
        .await
        .is_err()
    {
        tracing::debug!(client = %binding.id, "handing over with a message or a log move still on its way");
    }
    let flushed = Flushed {
        messages: taken
            .frames
            .iter()
            .map(|(frame, origin)| {
                let envelope = Envelope::from_parts(frame.kind, frame.bytes.to_vec(), *origin);
                BusMessage::new(binding.id, Some(handover.epoch), None, envelope)
            })
            .collect(),
        missed: taken.missed,
    };
    let answer = BusMessage::flushed(binding.id, handover.epoch, &flushed);
    match router
        .bus()
        .routes()
        .bus()
        .send(&handover.node, &answer)
        .await
    {
        Ok(true) => {
            tracing::debug!(client = %binding.id, node = %handover.node, held = flushed.messages.len(), "connection closed and handed over: its ID was resumed on another node");
        }
        _ => {
            // The new home is gone too: send each on to wherever the ID is now.
            router.forward(binding.id, taken, now).await;
        }
    }
}

/// Two missed ranges as one.
fn merge(a: Option<(u64, u64)>, b: Option<(u64, u64)>) -> Option<(u64, u64)> {
    match (a, b) {
        (Some((f1, l1)), Some((f2, l2))) => Some((f1.min(f2), l1.max(l2))),
        (a, b) => a.or(b),
    }
}

/// What a local client's call state change, made on another node, means for call metrics (which
/// count each call on its caller's node: see `metrics::CallMetrics`).
fn remote_call_event(
    me: ClientId,
    before: Option<CallState>,
    after: Option<CallState>,
) -> Option<CallEvent> {
    match (before?, after?) {
        (CallState::Calling { peer }, CallState::InCall { peer: now }) if peer == now => {
            Some(CallEvent::Answered {
                caller: me,
                callee: peer,
            })
        }
        (CallState::Calling { peer }, CallState::Idle) => Some(CallEvent::Declined {
            caller: me,
            callee: peer,
        }),
        (CallState::InCall { peer }, CallState::Idle) => Some(CallEvent::Ended {
            by: peer,
            peer: me,
            reason: EndReason::Hangup,
        }),
        _ => None,
    }
}

/// Delivers to `to` if a connection here holds it at `epoch`; else holds it for the ID's resume
/// (or sends it on, if the ID moved), telling the sender if neither works.
async fn deliver_here(router: &NodeRouter, to: ClientId, epoch: Option<u64>, envelope: Envelope) {
    let now = Instant::now();
    let Err(envelope) = router.deliver_from_bus(to, epoch, envelope, now).await else {
        return;
    };
    // Just dropped here: held after what its log still held.
    router.wait_flushed(to).await;
    hold_here(router, to, epoch, envelope).await;
}

/// Holds a message for `to`, which no connection here holds (at `epoch`), for the ID's resume, or
/// sends it on if the ID moved; tells the sender if neither works.
async fn hold_here(router: &NodeRouter, to: ClientId, epoch: Option<u64>, envelope: Envelope) {
    let now = Instant::now();
    let routes = router.bus().routes();
    let origin = envelope.origin();
    // Known to have moved on (an earlier message found it so): sent on with one `PUBLISH`. A
    // node whose cached route still names this one sends everything through here for up to
    // the route's TTL; a hold and a registry read for each would let them queue up here.
    if epoch.is_some_and(|epoch| routes.moved_on(to, epoch)) {
        let reason = match router.bus().send(to, envelope).await {
            BusDelivery::Delivered | BusDelivery::Held => return,
            BusDelivery::NoSuchClient => DropReason::RecipientGone,
            BusDelivery::Dropped(reason) => reason,
            BusDelivery::Unavailable => DropReason::ServerBusy,
        };
        tracing::debug!(client = %to, %reason, "message from another node not sent on; sender told");
        if let Some(notice) = router.hub().undelivered(to, reason, origin) {
            router.apply_effect(notice, now).await;
        }
        return;
    }
    routes.forget(to);
    let message = BusMessage::new(to, epoch, None, envelope);
    let reason = match routes.bus().hold(&message).await {
        Ok(Hold::Held) => return,
        Ok(Hold::Moved) => {
            // Resumed on another node meanwhile: send it there (one more locate).
            match router.bus().send(to, message.into_envelope()).await {
                BusDelivery::Delivered | BusDelivery::Held => return,
                BusDelivery::NoSuchClient => DropReason::RecipientGone,
                BusDelivery::Dropped(reason) => reason,
                BusDelivery::Unavailable => DropReason::ServerBusy,
            }
        }
        Ok(Hold::NoSuchClient) => DropReason::RecipientGone,
        Ok(Hold::Dropped(reason)) => reason,
        Err(_) => DropReason::ServerBusy,
    };
    tracing::debug!(client = %to, %reason, "message from another node not delivered; sender told");
    if let Some(notice) = router.hub().undelivered(to, reason, origin) {
        router.apply_effect(notice, now).await;
    }
}

/// Renews this node's leases, closes what Redis says it lost, and ends calls whose peer no node
/// holds any more.
async fn leases(router: Arc<NodeRouter>, mut shutdown: Shutdown) {
    let registry = router.hub().registry();
    let node = router.hub().node().clone();
    let mut ticks = tokio::time::interval(refresh_period(router.limits().resume_grace));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut missing_before = HashSet::new();
    loop {
        tokio::select! {
            _ = shutdown.recv() => return,
            _ = ticks.tick() => {}
        }
        let high_water = |binding| router.connections().high_water(binding);
        match registry.refresh_leases(&node, high_water).await {
            Ok(refreshed) => {
                for binding in refreshed.lost {
                    registry.forget(binding);
                    if router.kick(binding, Instant::now()).await {
                        tracing::info!(client = %binding.id, "connection closed: Redis no longer gives its ID to this node");
                    }
                }
            }
            Err(_) => {
                tracing::debug!("lease refresh failed: Redis unavailable");
                continue;
            }
        }
        // Calls whose peer is on another node: is the peer still held anywhere? One pipelined
        // round trip for all of them.
        let calls: Vec<(Binding, ClientId, CallState)> = registry
            .live()
            .into_iter()
            .filter_map(|binding| {
                let (_, state) = registry.cached(binding.id)?;
                let peer = state.peer()?;
                (!router.connections().holds(peer)).then_some((binding, peer, state))
            })
            .collect();
        let peers: Vec<ClientId> = calls.iter().map(|&(_, peer, _)| peer).collect();
        let Ok(held) = registry.redis().held(&peers).await else {
            continue;
        };
        // Gone only if missing twice in a row: after Redis restarted empty, the peer's node may
        // not have put its IDs back yet (it does within a quarter second of Redis answering).
        let mut missing = HashSet::new();
        for ((binding, peer, state), held) in calls.into_iter().zip(held) {
            if held {
                continue;
            }
            if missing_before.contains(&peer) {
                peer_gone(&router, binding, peer, state).await;
            } else {
                missing.insert(peer);
            }
        }
        missing_before = missing;
    }
}

/// Brings Redis up to date after an outage, within [`RECONCILE_EVERY`] of it answering again
/// (see [`ClusterRegistry::reconcile`]), and does what reconciles found: closes connections
/// whose IDs Redis gives to someone else, tells clients whose call ended without a word.
async fn reconcile(router: Arc<NodeRouter>, mut shutdown: Shutdown) {
    let registry = router.hub().registry();
    let mut ticks = tokio::time::interval(RECONCILE_EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.recv() => return,
            _ = ticks.tick() => {}
        }
        if registry.needs_reconcile() {
            if let Err(e) = registry.reconcile().await {
                tracing::debug!("reconcile with Redis failed: {e}");
            }
        }
        follow_up(&router).await;
    }
}

/// Does what the registry's reconciles left to do.
async fn follow_up(router: &NodeRouter) {
    let registry = router.hub().registry();
    let metrics = &router.bus().metrics;
    let (transitions, departures) = registry.unsettled();
    metrics.unsettled_transitions.set(gauge(transitions));
    metrics.unsettled_departures.set(gauge(departures));
    let followups = registry.take_followups();
    metrics
        .corrections
        .inc_by(followups.corrections.len() as u64);
    let now = Instant::now();
    for binding in followups.lost {
        if router.kick(binding, now).await {
            tracing::info!(client = %binding.id, "connection closed: Redis no longer gives its ID to this node");
        }
    }
    for correction in followups.corrections {
        let notice = ServerMessage::CloseCallServer {
            peer: correction.peer,
            reason: correction.reason,
        };
        let effect = Effect::Deliver {
            to: correction.to,
            envelope: Envelope::new(&notice),
        };
        router.apply_effect(effect, now).await;
    }
}

/// A count as a gauge value.
fn gauge(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// `peer` is gone from the whole cluster (its node died, nobody resumed it): `binding`'s call
/// with it ends and its client is told.
async fn peer_gone(router: &NodeRouter, binding: Binding, peer: ClientId, state: CallState) {
    use crate::signaling::registry::Transition;
    tracing::info!(client = %binding.id, %peer, ?state, "call peer gone from the cluster; ending the call");
    if router
        .hub()
        .registry()
        .transition(binding, peer, Transition::Hangup)
        .await
        .is_err()
    {
        return;
    }
    let freed = Freed {
        id: peer,
        peer: Some(binding.id),
    };
    router.gone(freed, Vec::new(), Instant::now()).await;
}

/// Tells the senders of messages held for IDs that expired unresumed.
async fn orphans(router: Arc<NodeRouter>, mut shutdown: Shutdown) {
    let (every, limit) = ORPHAN_SWEEP;
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.recv() => return,
            _ = ticks.tick() => {}
        }
        let Ok(found) = router.bus().routes().bus().take_orphans(limit).await else {
            continue;
        };
        for (id, messages) in found {
            let lost = messages.iter().filter_map(|m| m.origin).collect();
            let freed = Freed { id, peer: None };
            router.gone(freed, lost, Instant::now()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The caller's node counts what its client learns from another node, once per change.
    #[test]
    fn a_call_change_made_elsewhere_is_one_event_for_the_callers_metrics() {
        let (me, peer) = (ClientId::new(111_111_111), ClientId::new(222_222_222));
        let calling = Some(CallState::Calling { peer });
        let in_call = Some(CallState::InCall { peer });
        let idle = Some(CallState::Idle);
        assert_eq!(
            remote_call_event(me, calling, in_call),
            Some(CallEvent::Answered {
                caller: me,
                callee: peer
            })
        );
        assert_eq!(
            remote_call_event(me, calling, idle),
            Some(CallEvent::Declined {
                caller: me,
                callee: peer
            })
        );
        assert!(matches!(
            remote_call_event(me, in_call, idle),
            Some(CallEvent::Ended { by, peer: p, .. }) if by == peer && p == me
        ));
        // The callee's side (called, then in a call) and no change at all: nothing.
        let called = Some(CallState::Called { peer });
        assert_eq!(remote_call_event(me, called, in_call), None);
        assert_eq!(remote_call_event(me, in_call, in_call), None);
        assert_eq!(remote_call_event(me, None, idle), None);
    }
}
