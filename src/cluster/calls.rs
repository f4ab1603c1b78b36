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
//! - `claim`, `resume`, `transition`: `Unavailable` (the client gets `cluster_unavailable`).
//!   Redis may still run a script the node gave up on; for an offer that matters (the caller
//!   would be "calling" a callee never told), so the node remembers the offer, and the same offer
//!   sent again is taken as that one rather than refused as `already_in_call`.
//! - `call_state`: answered from the cache; a live local binding is always in it.
//! - `detach`: the ID is reserved locally; Redis keeps it live until its lease runs out (nobody
//!   refreshes it), which is a reservation of about a lease.
//! - `release`: the peer named by the cache is still told `close-call-server`; Redis forgets the
//!   ID when its lease runs out.
//! - `expire`, `locate`, `refresh`: logged; the keys' TTLs make Redis converge by themselves.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use redis::aio::ConnectionLike;

use super::registry::{RedisRegistry, Refreshed};
use super::types::{
    Binding, BindingError, CallState, Claim, Freed, Location, NodeId, RegisterError, ResumeError,
    Stale, Takeover, Transition, TransitionError, Unavailable,
};
use crate::signaling::protocol::{ClientId, ResumeToken};
use crate::signaling::registry::Registry;

/// The hub's registry on a cluster node. See the module docs.
pub struct ClusterRegistry<C> {
    /// The shared table.
    redis: RedisRegistry<C>,
    /// This node's live IDs: epoch and call state.
    calls: Mutex<HashMap<ClientId, (u64, CallState)>>,
    /// Offers Redis did not answer in time (binding → callee): the script may still have run.
    /// The same offer sent again is then taken as that offer, not refused as a call already
    /// going. At most one per live ID, dropped with it.
    uncertain: Mutex<HashMap<Binding, ClientId>>,
}

impl<C> ClusterRegistry<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    /// The registry over `redis`, with an empty cache.
    pub fn new(redis: RedisRegistry<C>) -> Self {
        Self {
            redis,
            calls: Mutex::new(HashMap::new()),
            uncertain: Mutex::new(HashMap::new()),
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
            .map(|(&id, &(epoch, _))| Binding { id, epoch })
            .collect()
    }

    /// The cached call state of `id` if this node holds it live: its binding and state.
    pub fn cached(&self, id: ClientId) -> Option<(Binding, CallState)> {
        self.lock()
            .get(&id)
            .map(|&(epoch, state)| (Binding { id, epoch }, state))
    }

    /// Forgets `binding` (its connection was kicked, or Redis says it is lost).
    pub fn forget(&self, binding: Binding) {
        self.uncertain().remove(&binding);
        let mut calls = self.lock();
        if calls.get(&binding.id).is_some_and(|e| e.0 == binding.epoch) {
            calls.remove(&binding.id);
        }
    }

    /// Re-reads `id`'s call state from Redis, if this node holds it live: a transition made on
    /// another node changed it. On an outage the cached state stays.
    pub async fn sync_call(&self, id: ClientId) {
        let Some((binding, _)) = self.cached(id) else {
            return;
        };
        match self.redis.call_state(binding).await {
            Ok(state) => self.set(binding, state),
            Err(BindingError::Stale(Stale)) => self.forget(binding),
            Err(BindingError::Unavailable(Unavailable)) => {
                tracing::debug!(client = %id, "call state not re-read: Redis unavailable");
            }
        }
    }

    /// Renews this node's live IDs' leases (see [`RedisRegistry::refresh`]).
    pub async fn refresh_leases(&self, node: &NodeId) -> Result<Refreshed, Unavailable> {
        let live = self.live();
        self.redis.refresh(node, &live).await
    }

    fn set(&self, binding: Binding, state: CallState) {
        if let Some(entry) = self.lock().get_mut(&binding.id) {
            if entry.0 == binding.epoch {
                entry.1 = state;
            }
        }
    }

    /// Sets a local peer's state (its epoch is whatever this node holds).
    fn set_peer(&self, peer: ClientId, state: CallState) {
        if let Some(entry) = self.lock().get_mut(&peer) {
            entry.1 = state;
        }
    }

    /// Removes `binding`, returning its cached state.
    fn take(&self, binding: Binding) -> Option<CallState> {
        self.uncertain().remove(&binding);
        let mut calls = self.lock();
        match calls.get(&binding.id) {
            Some(&(epoch, state)) if epoch == binding.epoch => {
                calls.remove(&binding.id);
                Some(state)
            }
            _ => None,
        }
    }

    /// A peer whose call the registry reset to Idle.
    fn reset_peer(&self, freed: &Freed) {
        if let Some(peer) = freed.peer {
            let mut calls = self.lock();
            if let Some(entry) = calls.get_mut(&peer) {
                if entry.1.peer() == Some(freed.id) {
                    entry.1 = CallState::Idle;
                }
            }
        }
    }

    /// The uncertain offers; a panic elsewhere while holding it leaves a valid map.
    fn uncertain(&self) -> MutexGuard<'_, HashMap<Binding, ClientId>> {
        self.uncertain
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The cache; a panic elsewhere while holding it leaves a valid map.
    fn lock(&self) -> MutexGuard<'_, HashMap<ClientId, (u64, CallState)>> {
        self.calls.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl<C> Registry for ClusterRegistry<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    async fn claim(&self, node: &NodeId, now: Instant) -> Result<Claim, RegisterError> {
        let claim = self.redis.claim(node, now).await?;
        self.lock()
            .insert(claim.binding.id, (claim.binding.epoch, CallState::Idle));
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
        let takeover = self.redis.resume(current, target, token, node, now).await?;
        let mut calls = self.lock();
        if calls.get(&current.id).is_some_and(|e| e.0 == current.epoch) {
            calls.remove(&current.id);
        }
        calls.insert(target, (takeover.binding.epoch, takeover.call));
        Ok(takeover)
    }

    async fn detach(&self, binding: Binding, now: Instant, grace: Duration) -> Result<(), Stale> {
        self.take(binding);
        match self.redis.detach(binding, now, grace).await {
            Ok(()) => Ok(()),
            Err(BindingError::Stale(stale)) => Err(stale),
            Err(BindingError::Unavailable(_)) => {
                tracing::debug!(client = %binding.id, "detach not written: Redis unavailable; the ID's lease ends it");
                Ok(())
            }
        }
    }

    async fn release(&self, binding: Binding) -> Result<Freed, Stale> {
        let cached = self.take(binding);
        match self.redis.release(binding).await {
            Ok(freed) => {
                self.reset_peer(&freed);
                Ok(freed)
            }
            Err(BindingError::Stale(stale)) => Err(stale),
            Err(BindingError::Unavailable(_)) => {
                let freed = Freed {
                    id: binding.id,
                    peer: cached.and_then(CallState::peer),
                };
                self.reset_peer(&freed);
                Ok(freed)
            }
        }
    }

    async fn expire(&self, binding: Binding) -> Option<Freed> {
        self.take(binding);
        match self.redis.expire(binding).await {
            Ok(freed) => {
                if let Some(freed) = &freed {
                    self.reset_peer(freed);
                }
                freed
            }
            Err(Unavailable) => {
                tracing::debug!(client = %binding.id, "expire not written: Redis unavailable; the key's TTL ends it");
                None
            }
        }
    }

    async fn call_state(&self, binding: Binding) -> Result<CallState, Stale> {
        match self.lock().get(&binding.id) {
            Some(&(epoch, state)) if epoch == binding.epoch => Ok(state),
            _ => Err(Stale),
        }
    }

    async fn transition(
        &self,
        binding: Binding,
        peer: ClientId,
        t: Transition,
    ) -> Result<CallState, TransitionError> {
        let retried = self.uncertain().remove(&binding);
        match self.redis.transition(binding, peer, t).await {
            Ok(mine) => {
                self.set(binding, mine);
                self.set_peer(peer, mine.mirror(binding.id));
                Ok(mine)
            }
            // The offer that timed out had been applied after all: this is it, sent again.
            Err(TransitionError::AlreadyInCall {
                state: state @ CallState::Calling { peer: callee },
                ..
            }) if t == Transition::Offer && retried == Some(peer) && callee == peer => {
                self.set(binding, state);
                self.set_peer(peer, state.mirror(binding.id));
                Ok(state)
            }
            Err(TransitionError::Unavailable) => {
                if t == Transition::Offer {
                    self.uncertain().insert(binding, peer);
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
