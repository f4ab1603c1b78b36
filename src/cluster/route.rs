//! Delivery to an ID another node holds: where it is (a small route cache in front of
//! [`RedisRegistry::locate`]), then one `PUBLISH` to that node, or the ID's held stream when
//! nobody is live for it. This is the cluster side of hubcore's `Bus::send(to, envelope)`.
//!
//! Between two peers that keep talking the route is cached, so a relayed message costs one
//! `PUBLISH` and no registry read (and no Redis round trip at all on a direct link between the
//! two nodes, `cluster-listen`: see [`super::link`]). A cached route goes stale when the ID moves; that is noticed
//! when the node named is gone (`PUBLISH` reaches nobody) or the held stream answers that the
//! epoch moved, and otherwise bounded by the cache's TTL (a node that receives a message for an
//! epoch it no longer holds forwards it). The cache is bounded in entries.
//!
//! **A route that moves keeps each sender's order.** While a cached route names a node the ID
//! left, that node sends each message on to the ID's new home; once the route is read again this
//! node publishes to the new home directly, and its next message could overtake the last one the
//! old node is still sending on. So the first `PUBLISH` for an ID to a node other than the one
//! its messages last went to (within [`SYNC_WINDOW`]) waits for a barrier: a [`BusKind::Sync`]
//! through the old node's channel, which that node answers once it has handled everything
//! before it (delivered, held or sent on), at most [`SYNC_WAIT`]. A node that is gone answers
//! nothing and is not waited for (nobody received the barrier). Only nodes made with
//! [`Routes::syncing_as`] do this.
//!
//! [`BusKind::Sync`]: super::bus::BusKind::Sync

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionLike, ConnectionManager};
use tokio::sync::oneshot;

use super::bus::{BusMessage, Hold, RedisBus};
use super::registry::RedisRegistry;
use super::types::{CallState, NodeId};
use crate::signaling::delivery::Envelope;
use crate::signaling::protocol::{ClientId, DropReason};

/// What became of a message handed to [`Routes::deliver`] (hubcore's `BusDelivery`, plus
/// `Dropped`: a held stream that is full must be reported to the sender like a local one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub enum BusDelivery {
    /// The node holding the ID took it (it numbers and queues or holds it there).
    Delivered,
    /// Nobody holds the ID live right now; the message is held for its resume.
    Held,
    /// No node holds the ID.
    NoSuchClient,
    /// The ID's held budget is spent: the sender must be told.
    Dropped(DropReason),
    /// Redis cannot be reached; the message is lost and its sender must be told.
    Unavailable,
}

/// How the route cache behaves.
#[derive(Clone, Copy, Debug)]
pub struct RouteSettings {
    /// Most routes kept; when full, expired ones go, then all (a cache, not a table).
    pub max_routes: usize,
    /// How long a route is trusted without a registry read. Short (a second or two): it bounds
    /// how long messages take a detour through a node the ID has left.
    pub ttl: Duration,
}

/// One cached route.
#[derive(Clone, Debug)]
struct Route {
    /// The node holding the ID.
    node: NodeId,
    /// The holder's epoch.
    epoch: u64,
    /// Live on that node (else reserved: its messages go to the held stream).
    live: bool,
    /// When it was read from the registry.
    read_at: Instant,
}

/// The route cache and the delivery rule.
pub struct Routes<C = ConnectionManager> {
    /// Where IDs are, when the cache does not know.
    registry: RedisRegistry<C>,
    /// Publishing and holding.
    bus: RedisBus<C>,
    /// Cached routes, bounded by `settings.max_routes`.
    cache: Mutex<HashMap<ClientId, Route>>,
    /// Bounds.
    settings: RouteSettings,
    /// This node, named in barriers; `None`: no barriers (see the module docs).
    node: Option<NodeId>,
    /// Where each ID's messages last went from here, and when; bounded like `cache`.
    hops: Mutex<HashMap<ClientId, (NodeId, Instant)>>,
    /// Barriers waiting for their answer, by token (one per route change in progress).
    syncs: Mutex<HashMap<u64, oneshot::Sender<()>>>,
    /// The next barrier's token.
    next_sync: AtomicU64,
}

tokio::task_local! {
    /// Set while a node's inbox handles a message ([`in_inbox`]): a barrier's answer
    /// comes through that very inbox, so a delivery made from it (a message sent on) does not
    /// wait for one; it would only wait out [`SYNC_WAIT`].
    static IN_INBOX: ();
}

/// Runs `handling` (a node's inbox handling one message) so that no delivery it makes waits for
/// a barrier's answer, which only that inbox could take.
pub async fn in_inbox<F: std::future::Future>(handling: F) -> F::Output {
    IN_INBOX.scope((), handling).await
}

/// How long after this node last published to an ID's old home a route change waits for a
/// barrier through it: well over the time an inbox takes to handle what it was sent.
pub const SYNC_WINDOW: Duration = Duration::from_secs(10);

/// Longest a route change waits for the old node's answer to its barrier.
pub const SYNC_WAIT: Duration = Duration::from_secs(1);

/// Tries before giving up on an ID that keeps moving while a message chases it.
const ATTEMPTS: usize = 3;

impl<C> Routes<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    /// Routes through `registry` and `bus`.
    pub fn new(registry: RedisRegistry<C>, bus: RedisBus<C>, settings: RouteSettings) -> Self {
        Self {
            registry,
            bus,
            cache: Mutex::new(HashMap::new()),
            settings,
            node: None,
            hops: Mutex::new(HashMap::new()),
            syncs: Mutex::new(HashMap::new()),
            next_sync: AtomicU64::new(1),
        }
    }

    /// Routes of the node `node`, which keeps each sender's order when a route moves with a
    /// barrier through the old node (see the module docs); its inbox must answer
    /// [`BusKind::Sync`](super::bus::BusKind::Sync) and pass
    /// [`BusKind::Synced`](super::bus::BusKind::Synced) to [`Routes::synced`].
    pub fn syncing_as(mut self, node: NodeId) -> Self {
        self.node = Some(node);
        self
    }

    /// A barrier's answer came (its token): the route change waiting for it goes on.
    pub fn synced(&self, token: u64) {
        let waiting = lock(&self.syncs).remove(&token);
        if let Some(tx) = waiting {
            let _ = tx.send(());
        }
    }

    /// Whether the cached route to `id` is live at an epoch after `epoch`: the ID moved on
    /// from the holder a message was routed to, and this cached route is where it is now.
    pub fn moved_on(&self, id: ClientId, epoch: u64) -> bool {
        self.cached(id)
            .is_some_and(|route| route.live && route.epoch > epoch)
    }

    /// Whether `to`'s messages last went to a node other than `node` (within [`SYNC_WINDOW`]),
    /// so delivering to `node` must wait for [`Routes::sync_if_moved`] first. A look at one map.
    pub fn went_elsewhere(&self, to: ClientId, node: &NodeId) -> bool {
        if self.node.is_none() {
            return false;
        }
        lock(&self.hops)
            .get(&to)
            .is_some_and(|(old, at)| old != node && at.elapsed() < SYNC_WINDOW)
    }

    /// Before the first delivery for `to` at `node` (another node, or this one: `to` resumed
    /// here) after its messages went to a third node: a barrier through that node, so nothing
    /// sent there before is overtaken (module docs).
    pub async fn sync_if_moved(&self, to: ClientId, node: &NodeId) {
        let Some(me) = &self.node else { return };
        let old = {
            let mut hops = lock(&self.hops);
            match hops.get_mut(&to) {
                Some((old, at)) if old != node && at.elapsed() < SYNC_WINDOW => {
                    // One barrier per move: what follows goes by the new route.
                    let old = std::mem::replace(old, node.clone());
                    *at = Instant::now();
                    old
                }
                _ => return,
            }
        };
        // Nothing is on its way through this node's own channel (its deliveries here are
        // done when made), and the inbox cannot wait for an answer only it could take.
        if old == *me || IN_INBOX.try_with(|()| ()).is_ok() {
            return;
        }
        let token = self.next_sync.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&self.syncs).insert(token, tx);
        let barrier = BusMessage::sync(to, token, me);
        // Nobody received it (the old node is gone), or Redis failed: nothing to wait for.
        if let Ok(true) = self.bus.send(&old, &barrier).await {
            if tokio::time::timeout(SYNC_WAIT, rx).await.is_err() {
                tracing::debug!(%to, node = %old, "the old node did not answer a route change's barrier in time");
            }
        }
        lock(&self.syncs).remove(&token);
    }

    /// `to`'s messages just went to `node`.
    fn sent_via(&self, to: ClientId, node: &NodeId) {
        if self.node.is_none() {
            return;
        }
        let mut hops = lock(&self.hops);
        match hops.get_mut(&to) {
            Some((last, at)) if last == node => *at = Instant::now(),
            _ => {
                if hops.len() >= self.settings.max_routes {
                    hops.retain(|_, (_, at)| at.elapsed() < SYNC_WINDOW);
                    if hops.len() >= self.settings.max_routes {
                        hops.clear();
                    }
                }
                if self.settings.max_routes > 0 {
                    hops.insert(to, (node.clone(), Instant::now()));
                }
            }
        }
    }

    /// Delivers `envelope` to `to`, held by another node, announcing `to`'s new call state
    /// `call` when the message changes it. One `PUBLISH` on a cached route to a live ID; a
    /// registry read first when the route is not cached; the held stream when nobody is live.
    pub async fn deliver(
        &self,
        to: ClientId,
        call: Option<CallState>,
        envelope: Envelope,
    ) -> BusDelivery {
        match self.deliver_unless_at(to, call, envelope, None).await {
            Ok(delivery) => delivery,
            Err(_) => unreachable!("no node to stop at"),
        }
    }

    /// Like [`Routes::deliver`], but when `to` is live on `here` (this node: the ID resumed here
    /// while the message chased it) the envelope comes back instead of being published to this
    /// node's own inbox, for the caller to deliver here in order.
    pub async fn deliver_unless_at(
        &self,
        to: ClientId,
        call: Option<CallState>,
        envelope: Envelope,
        here: Option<&NodeId>,
    ) -> Result<BusDelivery, Envelope> {
        let mut message = BusMessage::new(to, None, call, envelope);
        for _ in 0..ATTEMPTS {
            let route = match self.cached(to) {
                Some(route) => route,
                None => match self.registry.locate_to_send(to).await {
                    Ok(Some(at)) => self.remember(to, at.node, at.epoch, at.live),
                    Ok(None) => return Ok(BusDelivery::NoSuchClient),
                    Err(_) => return Ok(BusDelivery::Unavailable),
                },
            };
            message.epoch = Some(route.epoch);
            // Whether delivered there, held or handed back: after what went to the old node.
            self.sync_if_moved(to, &route.node).await;
            if route.live && here == Some(&route.node) {
                return Err(message.into_envelope());
            }
            if route.live {
                match self.bus.send(&route.node, &message).await {
                    Ok(true) => {
                        self.sent_via(to, &route.node);
                        return Ok(BusDelivery::Delivered);
                    }
                    // The node is gone or between reconnects: hold, if the ID is still there.
                    Ok(false) => {}
                    Err(_) => return Ok(BusDelivery::Unavailable),
                }
            }
            match self.bus.hold(&message).await {
                Ok(Hold::Held) => return Ok(BusDelivery::Held),
                Ok(Hold::NoSuchClient) => {
                    self.forget(to);
                    return Ok(BusDelivery::NoSuchClient);
                }
                Ok(Hold::Moved) => self.forget(to),
                Ok(Hold::Dropped(reason)) => return Ok(BusDelivery::Dropped(reason)),
                Err(_) => return Ok(BusDelivery::Unavailable),
            }
        }
        tracing::debug!(%to, "an ID kept moving while a message chased it");
        Ok(BusDelivery::Unavailable)
    }

    /// The bus underneath (publishing, holding, subscribing).
    pub fn bus(&self) -> &RedisBus<C> {
        &self.bus
    }

    /// Drops the cached route to `id` (the caller learnt it moved or left).
    pub fn forget(&self, id: ClientId) {
        self.lock().remove(&id);
    }

    /// How many routes are cached (for metrics).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no route is cached.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// A route still within its TTL.
    fn cached(&self, id: ClientId) -> Option<Route> {
        let mut cache = self.lock();
        match cache.get(&id) {
            Some(route) if route.read_at.elapsed() < self.settings.ttl => Some(route.clone()),
            Some(_) => {
                cache.remove(&id);
                None
            }
            None => None,
        }
    }

    /// Caches a route just read, making room first if the cache is full.
    fn remember(&self, id: ClientId, node: NodeId, epoch: u64, live: bool) -> Route {
        let route = Route {
            node,
            epoch,
            live,
            read_at: Instant::now(),
        };
        let mut cache = self.lock();
        if cache.len() >= self.settings.max_routes {
            let ttl = self.settings.ttl;
            cache.retain(|_, r| r.read_at.elapsed() < ttl);
            if cache.len() >= self.settings.max_routes {
                cache.clear();
            }
        }
        if self.settings.max_routes > 0 {
            cache.insert(id, route.clone());
        }
        route
    }

    /// The cache; a panic elsewhere while holding it leaves nothing half-written worth refusing.
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ClientId, Route>> {
        self.cache.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One of the maps; a panic elsewhere while holding it leaves nothing half-written.
fn lock<T>(map: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    map.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::types::{Binding, Transition};
    use crate::signaling::protocol::ResumeToken;

    fn send<T: Send>(_: T) {}

    /// The Registry and Bus traits need `Send` futures, for any connection type that fits: this
    /// compiles only if every operation's future is `Send` whatever `C` is.
    #[allow(dead_code)]
    fn every_operation_future_is_send<C>(routes: &Routes<C>, node: &NodeId, b: Binding)
    where
        C: ConnectionLike + Clone + Send + Sync + 'static,
    {
        let (r, bus) = (&routes.registry, &routes.bus);
        let now = Instant::now();
        let token = ResumeToken::random(&mut rand::rng());
        send(r.claim(node, now));
        send(r.resume(b, b.id, &token, node, now));
        send(r.detach(b, now, Duration::ZERO));
        send(r.release(b));
        send(r.expire(b));
        send(r.call_state(b));
        send(r.transition(b, b.id, Transition::Offer));
        send(r.locate(b.id));
        send(r.refresh(node, &[]));
        send(r.locate_to_send(b.id));
        send(r.refresh_recording(node, &[], |_| None));
        send(r.transition_departed(b, b.id, Transition::Hangup, 1));
        let m = BusMessage::kick(b.id, 1);
        send(bus.send(node, &m));
        send(bus.hold(&m));
        send(bus.take_held(b.id));
        send(routes.deliver(
            b.id,
            None,
            Envelope::new(&crate::signaling::protocol::ServerMessage::Pong),
        ));
        send(routes.deliver_unless_at(
            b.id,
            None,
            Envelope::new(&crate::signaling::protocol::ServerMessage::Pong),
            Some(node),
        ));
    }

    /// The node's shared, instrumented connection (timeouts, `callgate_redis_*` metrics) is one
    /// the registry, bus and routes take as they are.
    #[allow(dead_code)]
    fn the_nodes_shared_connection_fits(
        redis: &crate::cluster::redis::Redis,
    ) -> Routes<impl ConnectionLike> {
        let registry = RedisRegistry::new(
            redis.connection(),
            crate::cluster::registry::RegistrySettings {
                id_digits: 9,
                lease: Duration::from_secs(40),
                timeout: Duration::from_secs(1),
            },
        );
        let bus = RedisBus::new(
            redis.client().clone(),
            redis.connection(),
            crate::cluster::bus::BusSettings {
                held_messages: 64,
                held_bytes: 256 * 1024,
                held_bytes_total: 64 * 1024 * 1024,
                grace: Duration::from_secs(30),
                timeout: Duration::from_secs(1),
            },
        );
        Routes::new(
            registry,
            bus,
            RouteSettings {
                max_routes: 100_000,
                ttl: Duration::from_secs(2),
            },
        )
    }
}
