//! The registry a cluster node's hub runs on: [`RedisRegistry`] behind the hub's
//! [`Registry`] trait, with the call state of this node's live IDs cached in memory.
//!
//! Every call rule (offer, reply, cancel, hang-up) is one Redis script, so two nodes can never
//! both win a callee. Relays (candidates, ringing, renegotiation) only check the *sender's* call
//! state; that is read from the cache, so a relayed message costs no registry round trip. The
//! cache holds exactly this node's live bindings: filled by `claim` and `resume`, updated by
//! every transition this node applies (the sender's new state, and the mirror state of a peer
//! that is also held here), emptied by `detach`, `release`, `expire` and kicks. A transition made
//! on another node reaches a local ID as a message (`video-answer-request`, `server-reply`,
//! `close-call-server`); the node's inbox then re-reads that ID's state from Redis
//! ([`ClusterRegistry::sync_call`]) before delivering it, so the client cannot answer a state the
//! cache has not seen yet.
//!
//! # What an outage means for each operation
//!
//! The trait types some operations as `Result<_, Stale>` or infallible; a Redis outage is never
//! turned into `Stale` (which would close the connection with 1008):
//!
//! - `claim`, `resume`: `Unavailable` (the client gets `cluster_unavailable`): a new ID needs
//!   Redis to be unique, a resume needs it to find the ID.
//! - `transition` between two IDs this node holds live: decided here, from the cache, with the
//!   hub's own rules ([`apply`]); both IDs are marked dirty and their states written back when
//!   Redis answers again ([`ClusterRegistry::reconcile`]). While Redis is out this node is the only
//!   one that can change them: every other node's change to an ID goes through Redis, and so does
//!   a resume of it elsewhere. (If only this node lost Redis, another node may have changed one of
//!   them meanwhile: the write-back wins, and the other node's peer is reset and told
//!   `close-call-server`.)
//! - `transition` with a peer elsewhere: `Unavailable` (`cluster_unavailable`). Each transition
//!   is operation `op` of this node, recorded in the ID's hash when applied. One whose answer
//!   never came (Redis frozen: it may run it later, or never got it) is remembered, at most one
//!   per binding and [`MAX_UNRESOLVED`] per node, and made certain when Redis answers again
//!   (`lua/resolve.lua`): not applied → fenced, a late copy is refused; applied → the client was
//!   told it failed, so the call is ended (an offer or accept is undone) and both clients are told
//!   `close-call-server` ([`Correction`]).
//! - `call_state`: answered from the cache; a live local binding is always in it.
//! - `detach`, `release`: done here at once (the peer named by the cache is told); what the node
//!   knew of the ID is kept ([`MAX_DEPARTED`] at most) and the reconcile writes its call state
//!   back, then reserves it for what is left of its grace, or frees it (a peer on another node
//!   whose call that ends is told `close-call-server`, `peer_gone`). A transition of the ID
//!   whose outcome is unknown stays remembered after it left, and the reconcile settles it as
//!   for a live one (before, it was dropped, and a call Redis ended or started late was ended only
//!   by the ID's reservation or lease running out, its peer left in it meanwhile).
//! - `expire`: a local peer still in a call with the expired ID is reset here (and written
//!   back); an ID that dropped during the outage is freed by the reconcile.
//! - `locate`, `refresh`: logged; the keys' TTLs make Redis converge by themselves.
//!
//! After an outage, [`ClusterRegistry::reconcile`] runs before this node's next cross-node
//! transition or resume (they wait for it) and, from the node's reconcile task, within a quarter
//! second of Redis answering: it resolves the remembered transitions, then writes back every live
//! ID (`lua/write_back.lua`): dirty call states, and keys Redis lost (restarted empty, or leases
//! that ran out while it was frozen) put back with their call state and resume token.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use redis::aio::ConnectionLike;

use super::registry::{token_digest, Known, RedisRegistry, Refreshed, Resolved};
use super::types::{
    Binding, BindingError, CallState, Claim, Freed, Location, NodeId, RegisterError, ResumeError,
    Stale, Takeover, Transition, TransitionError, Unavailable,
};
use crate::signaling::protocol::{ClientId, EndReason, ResumeToken};
use crate::signaling::registry::{apply, Registry};

/// Transitions with a peer elsewhere whose outcome a node does not know yet, at most. Each
/// binding has at most one (its next transition waits for the reconcile that resolves it); past
/// this many, an unanswered transition is logged and not tracked.
pub const MAX_UNRESOLVED: usize = 4096;

/// One of this node's live IDs.
struct Local {
    /// The epoch it is held at.
    epoch: u64,
    /// Its call state.
    state: CallState,
    /// Its resume token's digest, to put back if Redis loses it.
    token: String,
    /// Changed here while Redis could not be told.
    dirty: bool,
    /// Changes made here (so a write-back clears `dirty` only if nothing changed meanwhile).
    changes: u64,
}

/// Departures Redis could not be told of that a node keeps for its reconcile, at most (one per
/// connection that left during an outage); beyond that they are left to their keys' leases.
pub const MAX_DEPARTED: usize = 16_384;

/// A live ID that left this node while Redis could not be told.
struct Departed {
    /// What the node knew of it.
    local: Local,
    /// Reserved for this long from `at` (its connection dropped); `None`: freed (it left, or
    /// its reservation ended).
    grace: Option<Duration>,
    /// When it left.
    at: Instant,
}

/// A transition Redis did not answer in time.
#[derive(Clone, Copy, Debug)]
struct Unresolved {
    /// Its peer.
    peer: ClientId,
    /// What it asked.
    t: Transition,
    /// Its operation number.
    op: u64,
}

/// A client to tell `close-call-server` (`peer`, `reason`): its call ended in a way nobody told
/// it yet — a transition the sender was told had failed was applied after all, or another
/// node's call was replaced by this node's write-back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Correction {
    /// Whom to tell.
    pub to: ClientId,
    /// The call's other side.
    pub peer: ClientId,
    /// Why it ended.
    pub reason: EndReason,
}

/// What [`ClusterRegistry::reconcile`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reconciled {
    /// Transitions whose outcome became certain.
    pub resolved: usize,
    /// Dirty call states written.
    pub written: usize,
    /// Keys Redis had lost, put back.
    pub restored: usize,
}

/// What the node must still do after reconciles: close stale connections, tell clients.
#[derive(Debug, Default)]
pub struct Followups {
    /// Bindings this node no longer holds: close their connections.
    pub lost: Vec<Binding>,
    /// Clients to tell `close-call-server`.
    pub corrections: Vec<Correction>,
}

/// The hub's registry on a cluster node. See the module docs.
pub struct ClusterRegistry<C> {
    /// The shared table.
    redis: RedisRegistry<C>,
    /// This node.
    node: NodeId,
    /// This node's live IDs.
    calls: Mutex<HashMap<ClientId, Local>>,
    /// Transitions with a peer elsewhere that Redis did not answer in time.
    unresolved: Mutex<HashMap<Binding, Unresolved>>,
    /// IDs that left while Redis could not be told.
    departed: Mutex<HashMap<Binding, Departed>>,
    /// The last operation number given out.
    ops: AtomicU64,
    /// Failures to reach Redis (and changes decided without it), counted.
    trouble: AtomicU64,
    /// `trouble` as of the start of the last reconcile that succeeded.
    settled: AtomicU64,
    /// One reconcile at a time.
    reconciling: tokio::sync::Mutex<()>,
    /// What reconciles found for the node to do.
    followups: Mutex<Followups>,
}

impl<C> ClusterRegistry<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    /// The registry of `node` over `redis`, with an empty cache.
    pub fn new(redis: RedisRegistry<C>, node: NodeId) -> Self {
        Self {
            redis,
            node,
            calls: Mutex::new(HashMap::new()),
            unresolved: Mutex::new(HashMap::new()),
            departed: Mutex::new(HashMap::new()),
            ops: AtomicU64::new(0),
            trouble: AtomicU64::new(0),
            settled: AtomicU64::new(0),
            reconciling: tokio::sync::Mutex::new(()),
            followups: Mutex::new(Followups::default()),
        }
    }

    /// The Redis registry itself (for the refresh task, which needs what it found).
    pub fn redis(&self) -> &RedisRegistry<C> {
        &self.redis
    }

    /// This node's live bindings, as the cache knows them (for the lease refresh).
    pub fn live(&self) -> Vec<Binding> {
        self.lock()
            .iter()
            .map(|(&id, l)| Binding { id, epoch: l.epoch })
            .collect()
    }

    /// The cached call state of `id` if this node holds it live: its binding and state.
    pub fn cached(&self, id: ClientId) -> Option<(Binding, CallState)> {
        self.lock()
            .get(&id)
            .map(|l| (Binding { id, epoch: l.epoch }, l.state))
    }

    /// Forgets `binding` (its connection was kicked, or Redis says it is lost).
    pub fn forget(&self, binding: Binding) {
        self.unresolved().remove(&binding);
        let mut calls = self.lock();
        if calls
            .get(&binding.id)
            .is_some_and(|l| l.epoch == binding.epoch)
        {
            calls.remove(&binding.id);
        }
    }

    /// Re-reads `id`'s call state from Redis, if this node holds it live: a transition made on
    /// another node changed it. On an outage the cached state stays; so does a state this node
    /// decided that Redis has not been told yet.
    pub async fn sync_call(&self, id: ClientId) {
        let Some((binding, _)) = self.cached(id) else {
            return;
        };
        if self.lock().get(&id).is_some_and(|l| l.dirty) {
            return;
        }
        match self.redis.call_state(binding).await {
            Ok(state) => {
                if let Some(l) = self.lock().get_mut(&id) {
                    if l.epoch == binding.epoch && !l.dirty {
                        l.state = state;
                    }
                }
            }
            Err(BindingError::Stale(Stale)) => self.forget(binding),
            Err(BindingError::Unavailable(Unavailable)) => {
                self.note_trouble();
                tracing::debug!(client = %id, "call state not re-read: Redis unavailable");
            }
        }
    }

    /// Renews this node's live IDs' leases (see [`RedisRegistry::refresh`]); after an outage,
    /// reconciles instead (which renews them too).
    ///
    /// Records each live ID's `high_water` too (see [`RedisRegistry::refresh_recording`]).
    pub async fn refresh_leases(
        &self,
        node: &NodeId,
        high_water: impl Fn(Binding) -> Option<u64>,
    ) -> Result<Refreshed, Unavailable> {
        if self.needs_reconcile() {
            let done = self.reconcile().await?;
            return Ok(Refreshed {
                renewed: self.live().len(),
                restored: done.restored,
                lost: Vec::new(),
            });
        }
        let live = self.live();
        match self.redis.refresh_recording(node, &live, high_water).await {
            Ok(refreshed) => {
                if refreshed.restored > 0 {
                    // Put back idle and without a token: the next reconcile writes both.
                    self.note_trouble();
                }
                Ok(refreshed)
            }
            Err(e) => {
                self.note_trouble();
                Err(e)
            }
        }
    }

    /// Whether Redis may not know everything this node decided, or a transition's outcome is
    /// unknown: [`reconcile`](Self::reconcile) has work.
    pub fn needs_reconcile(&self) -> bool {
        self.trouble.load(Ordering::Acquire) != self.settled.load(Ordering::Acquire)
    }

    /// What this node still has to settle with Redis: transitions whose outcome it does not
    /// know, and IDs that left while Redis could not be told.
    pub fn unsettled(&self) -> (usize, usize) {
        (self.unresolved().len(), self.departed().len())
    }

    /// What reconciles left for the node to do (taken: each is returned once).
    pub fn take_followups(&self) -> Followups {
        std::mem::take(&mut *self.followups())
    }

    /// Brings Redis up to date with this node after an outage: makes every unresolved
    /// transition's outcome certain (queuing [`Correction`]s for the ones applied after their
    /// sender was told they failed), then writes back every live ID (dirty call states, lost keys
    /// with their state and token, leases). Bindings Redis gives to someone else are forgotten
    /// and queued as lost. Does nothing when there is nothing to do.
    pub async fn reconcile(&self) -> Result<Reconciled, Unavailable> {
        let _one = self.reconciling.lock().await;
        let mut done = Reconciled::default();
        if !self.needs_reconcile() {
            return Ok(done);
        }
        let start = self.trouble.load(Ordering::Acquire);
        let unresolved: Vec<(Binding, Unresolved)> =
            self.unresolved().iter().map(|(&b, &u)| (b, u)).collect();
        for (binding, u) in unresolved {
            match self.redis.resolve(binding, u.op).await {
                Ok(None) => {}
                Ok(Some(Resolved::NotApplied(state))) => self.set(binding, state),
                Ok(Some(Resolved::Applied(state))) => self.undo(binding, u, state).await?,
                Err(e) => {
                    self.note_trouble();
                    return Err(e);
                }
            }
            self.unresolved().remove(&binding);
            done.resolved += 1;
        }
        let op = self.next_op();
        let (mut known, changes): (Vec<Known>, Vec<u64>) = self
            .lock()
            .iter()
            .map(|(&id, l)| (known_of(Binding { id, epoch: l.epoch }, l), l.changes))
            .unzip();
        let live = known.len();
        let departed: Vec<(Binding, Option<Duration>, Instant)> = {
            let departed = self.departed();
            // A freed one is only released below: writing it back could put back a key that
            // is gone for good.
            known.extend(
                departed
                    .iter()
                    .filter(|(_, d)| d.grace.is_some())
                    .map(|(&b, d)| known_of(b, &d.local)),
            );
            departed.iter().map(|(&b, d)| (b, d.grace, d.at)).collect()
        };
        let written = match self.redis.write_back(&self.node, &known, op).await {
            Ok(written) => written,
            Err(e) => {
                self.note_trouble();
                return Err(e);
            }
        };
        let (known, gone) = known.split_at(live);
        let lost: Vec<Binding> = written
            .lost
            .iter()
            .copied()
            .filter(|b| !gone.iter().any(|k| k.binding == *b))
            .collect();
        self.settle_departed(departed).await?;
        {
            let mut calls = self.lock();
            for (k, changes) in known.iter().zip(changes) {
                if let Some(l) = calls.get_mut(&k.binding.id) {
                    if k.dirty && l.epoch == k.binding.epoch && l.changes == changes {
                        l.dirty = false;
                        done.written += 1;
                    }
                }
            }
        }
        done.restored = written.restored;
        for &binding in &lost {
            self.forget(binding);
        }
        let mut corrections: Vec<Correction> = written
            .displaced
            .iter()
            .filter(|&&(_, other)| self.cached(other).is_none())
            .map(|&(me, other)| Correction {
                to: other,
                peer: me,
                reason: EndReason::Hangup,
            })
            .collect();
        for &(me, peer) in &written.broken {
            // Its peer resumed elsewhere before this write-back, into a call state without me.
            if let Some(l) = self.lock().get_mut(&me) {
                if l.state.peer() == Some(peer) {
                    l.state = CallState::Idle;
                }
            }
            for (to, peer) in [(me, peer), (peer, me)] {
                corrections.push(Correction {
                    to,
                    peer,
                    reason: EndReason::Hangup,
                });
            }
        }
        {
            let mut followups = self.followups();
            followups.lost.extend(lost);
            followups.corrections.extend(corrections);
        }
        self.settled.store(start, Ordering::Release);
        if done != Reconciled::default() {
            tracing::info!(
                resolved = done.resolved,
                written = done.written,
                restored = done.restored,
                "redis registry: reconciled with Redis after an outage"
            );
        }
        Ok(done)
    }

    /// Tells Redis of the IDs that left during the outage (their call states were just written
    /// back): a dropped connection's ID is reserved for what is left of its grace, one that left
    /// is freed, and a peer on another node whose call that reset is told.
    async fn settle_departed(
        &self,
        departed: Vec<(Binding, Option<Duration>, Instant)>,
    ) -> Result<(), Unavailable> {
        let now = Instant::now();
        for (binding, grace, at) in departed {
            let left = grace.and_then(|g| g.checked_sub(now.duration_since(at)));
            let outcome = match left {
                Some(left) if !left.is_zero() => {
                    self.redis.detach(binding, now, left).await.map(|()| None)
                }
                _ => self.redis.release(binding).await.map(Some),
            };
            match outcome {
                Ok(Some(Freed {
                    peer: Some(peer), ..
                })) if !self.holds(peer) => {
                    self.followups().corrections.push(Correction {
                        to: peer,
                        peer: binding.id,
                        reason: EndReason::PeerGone,
                    });
                }
                Ok(_) | Err(BindingError::Stale(_)) => {}
                Err(BindingError::Unavailable(e)) => {
                    self.note_trouble();
                    return Err(e);
                }
            }
            self.departed().remove(&binding);
        }
        Ok(())
    }

    /// Keeps what the node knew of `binding`, which left while Redis could not be told.
    fn depart(&self, binding: Binding, local: Option<Local>, grace: Option<Duration>) {
        self.note_trouble();
        let mut departed = self.departed();
        if let Some(d) = departed.get_mut(&binding) {
            // Its reservation ended too.
            d.grace = grace;
            return;
        }
        let Some(local) = local else { return };
        if departed.len() >= MAX_DEPARTED {
            tracing::warn!(client = %binding.id, "a departure Redis was not told of is left to its lease: too many");
            return;
        }
        departed.insert(
            binding,
            Departed {
                local,
                grace,
                at: Instant::now(),
            },
        );
    }

    /// A transition the sender was told had failed was applied: end what it started (an offer
    /// or an accept) and queue the clients to tell.
    async fn undo(
        &self,
        binding: Binding,
        u: Unresolved,
        state: CallState,
    ) -> Result<(), Unavailable> {
        let me = binding.id;
        let reason = match u.t {
            Transition::Cancel => EndReason::Cancelled,
            _ => EndReason::Hangup,
        };
        let ended = match (u.t, state) {
            (Transition::Offer, CallState::Calling { peer }) if peer == u.peer => {
                // The callee was never told of the offer: cancel it quietly.
                self.end_here(binding, u.peer, Transition::Cancel).await?;
                false
            }
            (Transition::Accept, CallState::InCall { peer }) if peer == u.peer => {
                self.end_here(binding, u.peer, Transition::Hangup).await?;
                true
            }
            (Transition::Offer | Transition::Accept, state) => {
                self.set(binding, state);
                false
            }
            (_, state) => {
                self.set(binding, state);
                true
            }
        };
        tracing::info!(client = %me, peer = %u.peer, transition = ?u.t, told = ended, "a transition Redis ran after its sender was told it failed was undone or reported");
        if ended {
            let mut followups = self.followups();
            followups.corrections.push(Correction {
                to: u.peer,
                peer: me,
                reason,
            });
            followups.corrections.push(Correction {
                to: me,
                peer: u.peer,
                reason,
            });
        }
        Ok(())
    }

    /// Ends `binding`'s call with `peer` in Redis (an undo).
    async fn end_here(
        &self,
        binding: Binding,
        peer: ClientId,
        t: Transition,
    ) -> Result<(), Unavailable> {
        let op = self.next_op();
        let ended = if self.cached(binding.id).is_some_and(|(b, _)| b == binding) {
            self.redis.transition_op(binding, peer, t, Some(op)).await
        } else {
            // Its connection left during the outage: its ID may be reserved by now.
            self.redis.transition_departed(binding, peer, t, op).await
        };
        match ended {
            Ok(state) | Err(TransitionError::WrongState(state)) => {
                self.set(binding, state);
                self.set_peer(peer, state.mirror(binding.id));
                Ok(())
            }
            Err(TransitionError::Unavailable) => {
                self.note_trouble();
                Err(Unavailable)
            }
            Err(_) => Ok(()),
        }
    }

    /// Decides `t` from the cache, for two IDs this node holds live while Redis cannot be
    /// asked; both are written back later.
    fn decide_here(
        &self,
        binding: Binding,
        peer: ClientId,
        t: Transition,
    ) -> Result<CallState, TransitionError> {
        self.note_trouble();
        let mut calls = self.lock();
        let mine = calls
            .get(&binding.id)
            .filter(|l| l.epoch == binding.epoch)
            .map(|l| l.state)
            .ok_or(Stale)?;
        let theirs = calls.get(&peer).map(|l| l.state);
        let (new, peer_new) = apply(t, binding.id, peer, mine, theirs)?;
        for (id, state) in [(binding.id, Some(new)), (peer, peer_new)] {
            if let (Some(l), Some(state)) = (calls.get_mut(&id), state) {
                l.state = state;
                l.dirty = true;
                l.changes += 1;
            }
        }
        tracing::debug!(client = %binding.id, %peer, transition = ?t, "call decided on this node: Redis unavailable");
        Ok(new)
    }

    /// A fresh operation number.
    fn next_op(&self) -> u64 {
        self.ops.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// Redis could not be reached (or was not asked): a reconcile is due.
    fn note_trouble(&self) {
        self.trouble.fetch_add(1, Ordering::AcqRel);
    }

    /// Whether this node holds `id` live.
    fn holds(&self, id: ClientId) -> bool {
        self.lock().contains_key(&id)
    }

    /// Sets `binding`'s cached state, or that of its departure (written back by the reconcile).
    fn set(&self, binding: Binding, state: CallState) {
        if let Some(l) = self.lock().get_mut(&binding.id) {
            if l.epoch == binding.epoch {
                l.state = state;
                return;
            }
        }
        if let Some(d) = self.departed().get_mut(&binding) {
            d.local.state = state;
        }
    }

    /// Sets a local peer's state (its epoch is whatever this node holds).
    fn set_peer(&self, peer: ClientId, state: CallState) {
        if let Some(l) = self.lock().get_mut(&peer) {
            l.state = state;
        }
    }

    /// Starts caching a live binding.
    fn insert(&self, binding: Binding, state: CallState, token: &ResumeToken) {
        let local = Local {
            epoch: binding.epoch,
            state,
            token: token_digest(token),
            dirty: false,
            changes: 0,
        };
        self.lock().insert(binding.id, local);
    }

    /// Removes `binding`, returning what the cache knew of it. A transition of it whose outcome
    /// is unknown stays remembered: the connection left (or its reservation ended), but the next
    /// reconcile still makes that outcome certain and tells the peer if the call must end.
    fn take(&self, binding: Binding) -> Option<Local> {
        let mut calls = self.lock();
        match calls.get(&binding.id) {
            Some(l) if l.epoch == binding.epoch => calls.remove(&binding.id),
            _ => None,
        }
    }

    /// The departures Redis was not told of; a panic elsewhere while holding it leaves a valid
    /// map.
    fn departed(&self) -> MutexGuard<'_, HashMap<Binding, Departed>> {
        self.departed.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A peer whose call the registry reset to Idle; `dirty` if Redis was not told.
    fn reset_peer(&self, freed: &Freed, dirty: bool) {
        if let Some(peer) = freed.peer {
            let mut calls = self.lock();
            if let Some(l) = calls.get_mut(&peer) {
                if l.state.peer() == Some(freed.id) {
                    l.state = CallState::Idle;
                    if dirty {
                        l.dirty = true;
                        l.changes += 1;
                    }
                }
            }
        }
    }

    /// The unresolved transitions; a panic elsewhere while holding it leaves a valid map.
    fn unresolved(&self) -> MutexGuard<'_, HashMap<Binding, Unresolved>> {
        self.unresolved
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The follow-ups; a panic elsewhere while holding it leaves a valid value.
    fn followups(&self) -> MutexGuard<'_, Followups> {
        self.followups
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The cache; a panic elsewhere while holding it leaves a valid map.
    fn lock(&self) -> MutexGuard<'_, HashMap<ClientId, Local>> {
        self.calls.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// What a write-back needs of a cached ID.
fn known_of(binding: Binding, local: &Local) -> Known {
    Known {
        binding,
        token: local.token.clone(),
        call: local.state,
        dirty: local.dirty,
    }
}

impl<C> Registry for ClusterRegistry<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    async fn claim(&self, node: &NodeId, now: Instant) -> Result<Claim, RegisterError> {
        let claim = self.redis.claim(node, now).await?;
        self.insert(claim.binding, CallState::Idle, &claim.token);
        Ok(claim)
    }

    async fn resume(
        &self,
        current: Binding,
        target: ClientId,
        token: &ResumeToken,
        node: &NodeId,
        now: Instant,
    ) -> Result<Takeover, ResumeError> {
        if self.needs_reconcile() {
            // What this node decided while Redis was out must be there before an ID moves.
            self.reconcile().await?;
        }
        let takeover = self.redis.resume(current, target, token, node, now).await?;
        self.take(current);
        self.insert(takeover.binding, takeover.call, &takeover.token);
        Ok(takeover)
    }

    async fn detach(&self, binding: Binding, now: Instant, grace: Duration) -> Result<(), Stale> {
        let local = self.take(binding);
        match self.redis.detach(binding, now, grace).await {
            Ok(()) => {
                if local.as_ref().is_some_and(|l| l.dirty) {
                    // Reserved in Redis with a call state from before the outage: the
                    // reconcile writes this node's.
                    self.depart(binding, local, Some(grace));
                }
                Ok(())
            }
            Err(BindingError::Stale(stale)) => Err(stale),
            Err(BindingError::Unavailable(_)) => {
                tracing::debug!(client = %binding.id, "detach not written: Redis unavailable; written when it answers");
                self.depart(binding, local, Some(grace));
                Ok(())
            }
        }
    }

    async fn release(&self, binding: Binding) -> Result<Freed, Stale> {
        let local = self.take(binding);
        match self.redis.release(binding).await {
            Ok(freed) => {
                self.departed().remove(&binding);
                self.reset_peer(&freed, false);
                Ok(freed)
            }
            Err(BindingError::Stale(stale)) => Err(stale),
            Err(BindingError::Unavailable(_)) => {
                let freed = Freed {
                    id: binding.id,
                    peer: local.as_ref().and_then(|l| l.state.peer()),
                };
                self.reset_peer(&freed, true);
                self.depart(binding, local, None);
                Ok(freed)
            }
        }
    }

    async fn expire(&self, binding: Binding) -> Option<Freed> {
        self.take(binding);
        match self.redis.expire(binding).await {
            Ok(freed) => {
                // Freed in Redis: nothing of it is left to write back (a write-back would put
                // the key back).
                self.departed().remove(&binding);
                if let Some(freed) = &freed {
                    self.reset_peer(freed, false);
                }
                freed
            }
            Err(Unavailable) => {
                self.depart(binding, None, None);
                // A live local peer still in a call with it: reset here, told by the caller of
                // this, written back later.
                let peer = self
                    .lock()
                    .iter()
                    .find(|(_, l)| l.state.peer() == Some(binding.id))
                    .map(|(&id, _)| id);
                tracing::debug!(client = %binding.id, ?peer, "expire not written: Redis unavailable; written when it answers");
                let freed = Freed {
                    id: binding.id,
                    peer,
                };
                if peer.is_some() {
                    self.reset_peer(&freed, true);
                    return Some(freed);
                }
                None
            }
        }
    }

    async fn call_state(&self, binding: Binding) -> Result<CallState, Stale> {
        match self.lock().get(&binding.id) {
            Some(l) if l.epoch == binding.epoch => Ok(l.state),
            _ => Err(Stale),
        }
    }

    async fn transition(
        &self,
        binding: Binding,
        peer: ClientId,
        t: Transition,
    ) -> Result<CallState, TransitionError> {
        let local_pair = peer != binding.id && self.holds(peer);
        if self.needs_reconcile() {
            if local_pair {
                return self.decide_here(binding, peer, t);
            }
            // Redis must learn what this node decided, and this binding's last transition must
            // be certain, before anything else is asked of it.
            self.reconcile().await?;
        }
        let op = self.next_op();
        match self.redis.transition_op(binding, peer, t, Some(op)).await {
            Ok(mine) => {
                self.set(binding, mine);
                self.set_peer(peer, mine.mirror(binding.id));
                Ok(mine)
            }
            Err(TransitionError::Unavailable) => {
                self.note_trouble();
                if local_pair {
                    // Whatever Redis does with it later, the write-back wins.
                    return self.decide_here(binding, peer, t);
                }
                let mut unresolved = self.unresolved();
                if unresolved.len() < MAX_UNRESOLVED {
                    unresolved.insert(binding, Unresolved { peer, t, op });
                } else {
                    tracing::warn!(client = %binding.id, "a transition's outcome is unknown and not tracked: too many unresolved");
                }
                Err(TransitionError::Unavailable)
            }
            Err(e) => {
                // A refusal names the sender's true state: keep the cache honest.
                match e {
                    TransitionError::WrongState(state)
                    | TransitionError::AlreadyInCall { state, .. } => self.set(binding, state),
                    TransitionError::Stale(_) => self.forget(binding),
                    _ => {}
                }
                Err(e)
            }
        }
    }

    async fn locate(&self, id: ClientId) -> Option<Location> {
        self.redis.locate(id).await.ok().flatten()
    }

    async fn refresh(&self, node: &NodeId, live: &[Binding]) {
        if let Err(Unavailable) = self.redis.refresh(node, live).await {
            tracing::debug!("lease refresh failed: Redis unavailable");
        }
    }
}
