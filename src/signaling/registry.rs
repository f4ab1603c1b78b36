//! What every node must agree on about a client ID: which node holds it, which holder it is (the
//! epoch), its resume token, whether it is live or reserved, and its call state. Nothing here knows
//! a connection, a queue or a socket: those stay on the node that holds the ID
//! ([`super::connections`]).
//!
//! [`Registry`] is the seam between one node and a cluster. Every operation is one atomic
//! compare-and-set on at most two IDs, with no caller code run inside it: the call rules a client
//! message can ask for are the [`Transition`] enum, so a Redis implementation can run each operation
//! as one small script. [`MemoryRegistry`] keeps the table in this process (the single-node
//! default): sharded mutexes, never held across an `.await`, so its futures are ready at once.
//!
//! Deadlines are not kept here. A node that detaches an ID schedules its expiry itself and calls
//! [`Registry::expire`] when it is due; `expire` frees the ID only if it is still reserved by the same
//! holder, so a resume on any node wins over a late expiry.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use rand::Rng as _;

use super::protocol::{ClientId, ResumeToken};
use super::SignalingLimits;

/// Which node holds an ID. A single node uses [`NodeId::local`]; in a cluster each node is named by
/// its `node-id` setting.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(Arc<str>);

impl NodeId {
    /// A node named `name`.
    pub fn new(name: &str) -> Self {
        Self(Arc::from(name))
    }

    /// The one node of a server that runs alone.
    pub fn local() -> Self {
        Self::new("local")
    }

    /// The node's name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for NodeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Which holder of an ID a connection is.
///
/// The epoch changes whenever the ID moves to another connection (a resume, on any node), so a
/// connection that was taken over or detached cannot act on the ID any more: its operations fail
/// with [`Stale`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Binding {
    /// The ID the connection holds.
    pub id: ClientId,
    /// Which holder of the ID this is; unique per registry (one counter for the whole cluster).
    pub epoch: u64,
}

/// Where an ID stands in a call. Pairs are symmetric: if A is `Calling { peer: B }` then B is
/// `Called { peer: A }`, and `InCall` is mutual. "Ended" is not a state: the call returns to `Idle`
/// and the peer is told with `close-call-server`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum CallState {
    /// No call; may start or receive one.
    #[default]
    Idle,
    /// Sent an offer to `peer`, waiting for its reply.
    Calling {
        /// The callee.
        peer: ClientId,
    },
    /// Received an offer from `peer`, not answered yet.
    Called {
        /// The caller.
        peer: ClientId,
    },
    /// Answered; media is (being) set up between the two.
    InCall {
        /// The other party.
        peer: ClientId,
    },
}

impl CallState {
    /// The other party, if there is a call in any phase.
    pub const fn peer(self) -> Option<ClientId> {
        match self {
            Self::Idle => None,
            Self::Calling { peer } | Self::Called { peer } | Self::InCall { peer } => Some(peer),
        }
    }

    /// The state the peer must be in when `me` is in `self`.
    pub const fn mirror(self, me: ClientId) -> Self {
        match self {
            Self::Idle => Self::Idle,
            Self::Calling { .. } => Self::Called { peer: me },
            Self::Called { .. } => Self::Calling { peer: me },
            Self::InCall { .. } => Self::InCall { peer: me },
        }
    }

    /// A word for error messages.
    pub const fn describe(self) -> &'static str {
        match self {
            Self::Idle => "idle",
            Self::Calling { .. } => "calling",
            Self::Called { .. } => "ringing",
            Self::InCall { .. } => "in a call",
        }
    }
}

/// The connection no longer holds its ID (it was resumed elsewhere, or detached).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("This connection no longer holds its ID.")]
pub struct Stale;

/// Why a new connection got no ID.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RegisterError {
    /// The node holds as many clients as it is configured for.
    #[error("The server holds as many clients as it is configured for.")]
    Full,
    /// Every random draw hit a taken ID.
    #[error("No free client ID was found; the ID length is too short for this many clients.")]
    NoFreeId,
    /// The new connection's queue refused the `id` message.
    #[error("The new connection's outbound queue did not accept its first message.")]
    OutboxRejected,
    /// The shared registry (Redis) cannot be reached.
    #[error("The cluster's shared registry cannot be reached.")]
    Unavailable,
}

/// Why a resume failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ResumeError {
    /// Nobody holds the ID (never given out, or its reservation ended), or it is the resuming
    /// connection's own.
    #[error("The ID is not held by anyone who can be resumed.")]
    Unknown,
    /// The token is not the ID's current token.
    #[error("The resume token does not match.")]
    TokenMismatch,
    /// The resuming connection has a call of its own.
    #[error("The resuming connection is in a call of its own.")]
    InCall,
    /// The resuming connection lost its own ID meanwhile.
    #[error(transparent)]
    Stale(#[from] Stale),
    /// The shared registry (Redis) cannot be reached.
    #[error("The cluster's shared registry cannot be reached.")]
    Unavailable,
}

/// A fresh ID and its token.
#[derive(Clone, Debug)]
pub struct Claim {
    /// The ID with its first epoch, live on the claiming node.
    pub binding: Binding,
    /// The token a later connection needs to resume the ID.
    pub token: ResumeToken,
}

/// The call-state changes a client message can ask for (the rules, as data: no closures).
///
/// Each applies atomically to the sender's ID and the named peer. "Both Idle" resets the peer only
/// if its call is with the sender, so a stale pair can never break another call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    /// `video-offer-request`: me Idle and peer Idle → me `Calling { peer }`, peer `Called { me }`.
    /// Me not Idle → [`TransitionError::AlreadyInCall`]; peer unknown →
    /// [`TransitionError::UnknownPeer`]; peer not Idle → [`TransitionError::Busy`].
    Offer,
    /// `client-reply` accepted: me `Called { peer }` → both `InCall`. Else `WrongState(mine)`.
    Accept,
    /// `client-reply` declined: me `Called { peer }` → both Idle. Else `WrongState(mine)`.
    Decline,
    /// `cancel`: me `Calling { peer }` → both Idle. Else `WrongState(mine)`.
    Cancel,
    /// `close-call-client`: me in any phase with peer → both Idle. Else `WrongState(mine)`.
    Hangup,
}

/// Why a [`Transition`] was refused; nothing changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TransitionError {
    /// The binding no longer holds its ID.
    #[error(transparent)]
    Stale(#[from] Stale),
    /// An offer while the sender already has a call.
    #[error("The sender is already {} with {peer}.", state.describe())]
    AlreadyInCall {
        /// The current call's peer.
        peer: ClientId,
        /// The sender's current state.
        state: CallState,
    },
    /// An offer to an ID nobody holds.
    #[error("Nobody holds the called ID.")]
    UnknownPeer,
    /// An offer to an ID that has a call already.
    #[error("The called ID is busy with another call.")]
    Busy,
    /// The sender's call state does not allow this transition with this peer.
    #[error("The sender's call is {}, which does not allow this.", .0.describe())]
    WrongState(CallState),
    /// The shared registry (Redis) cannot be reached.
    #[error("The cluster's shared registry cannot be reached.")]
    Unavailable,
}

/// A resume's result: the target ID now belongs to the resuming connection.
#[derive(Clone, Debug)]
pub struct Takeover {
    /// The target ID with its new epoch, on the resuming node.
    pub binding: Binding,
    /// The target's new token (the old one no longer works).
    pub token: ResumeToken,
    /// Where the ID was held (live or reserved); may be this node or a dead one.
    pub previous_node: NodeId,
    /// A connection (most likely half-open) held it live: that node must kick it.
    pub was_live: bool,
    /// The previous holder's epoch, so its node can tell which connection to kick.
    pub previous_epoch: u64,
    /// The call state carried over.
    pub call: CallState,
    /// In a cluster, when the previous home's last delivery record still vouches for everything
    /// the ID was sent: the highest `seq` it had numbered for it, with nothing sent to the ID
    /// since. A client that processed that much lost nothing if that home died. `None`: unknown.
    pub quiet_through: Option<u64>,
}

/// An ID that was freed. If it had a call, the peer's call was reset to Idle and must be told.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Freed {
    /// The freed ID.
    pub id: ClientId,
    /// Its call peer, whose call the registry reset to Idle.
    pub peer: Option<ClientId>,
}

/// Where an ID is held.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    /// The node holding it.
    pub node: NodeId,
    /// The holder's epoch.
    pub epoch: u64,
    /// Live (a connection holds it) or reserved (waiting for a resume).
    pub live: bool,
}

/// The shared table of IDs. See the module docs; every method is one atomic step.
///
/// Futures are `Send` so sessions can run on any worker thread. The memory version's are ready at
/// once; a network version's may fail with an `Unavailable` error instead of blocking forever.
pub trait Registry: Send + Sync + 'static {
    /// A fresh random ID ([`SignalingLimits::id_digits`]) and token, live on `node`. Retries on
    /// collision; [`RegisterError::NoFreeId`] after 32 draws.
    fn claim(
        &self,
        node: &NodeId,
        now: Instant,
    ) -> impl Future<Output = Result<Claim, RegisterError>> + Send;

    /// Moves `target` to `node` if `token` matches and `current` is Idle; frees `current`'s own ID.
    fn resume(
        &self,
        current: Binding,
        target: ClientId,
        token: &ResumeToken,
        node: &NodeId,
        now: Instant,
    ) -> impl Future<Output = Result<Takeover, ResumeError>> + Send;

    /// The connection dropped: the ID stays reserved (call kept) for `grace`. Stale if it moved.
    fn detach(
        &self,
        binding: Binding,
        now: Instant,
        grace: Duration,
    ) -> impl Future<Output = Result<(), Stale>> + Send;

    /// Frees the ID now (the client left). Resets the peer's call to Idle and returns it.
    fn release(&self, binding: Binding) -> impl Future<Output = Result<Freed, Stale>> + Send;

    /// Frees `binding` only if it is still reserved with that epoch (a resume elsewhere wins).
    fn expire(&self, binding: Binding) -> impl Future<Output = Option<Freed>> + Send;

    /// The call state of a live binding.
    fn call_state(&self, binding: Binding)
        -> impl Future<Output = Result<CallState, Stale>> + Send;

    /// Applies one transition atomically to `binding`'s ID and `peer`; returns the sender's new
    /// state.
    fn transition(
        &self,
        binding: Binding,
        peer: ClientId,
        t: Transition,
    ) -> impl Future<Output = Result<CallState, TransitionError>> + Send;

    /// Where an ID is held, or `None` if nobody holds it.
    fn locate(&self, id: ClientId) -> impl Future<Output = Option<Location>> + Send;

    /// Keeps this node's live IDs from expiring (Redis: their keys' TTL). The memory version keeps
    /// no TTLs and does nothing.
    fn refresh(&self, node: &NodeId, live: &[Binding]) -> impl Future<Output = ()> + Send;
}

/// Number of shards of the memory registry (a power of two).
const SHARDS: usize = 64;

/// Random draws before a claim gives up.
const ID_DRAWS: usize = 32;

/// The registry of a single node: the table in this process.
pub struct MemoryRegistry {
    /// The table, sharded by ID so unrelated clients rarely share a lock.
    shards: Box<[Mutex<HashMap<ClientId, Entry>>]>,
    /// Lowest ID (inclusive).
    id_low: u64,
    /// Highest ID (exclusive).
    id_high: u64,
    /// The next epoch given out.
    next_epoch: AtomicU64,
}

/// One ID's shared state.
#[derive(Clone, Debug)]
struct Entry {
    /// The node that holds it.
    node: NodeId,
    /// Which holder it is.
    epoch: u64,
    /// What a resume must present.
    token: ResumeToken,
    /// A connection holds it (else it is reserved, waiting for a resume).
    live: bool,
    /// Its call.
    call: CallState,
}

impl Entry {
    fn is_live(&self, epoch: u64) -> bool {
        self.live && self.epoch == epoch
    }
}

impl MemoryRegistry {
    /// An empty registry drawing IDs of `limits.id_digits` digits.
    pub fn new(limits: &SignalingLimits) -> Self {
        let digits = u32::from(limits.id_digits.clamp(6, 15));
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            id_low: 10u64.pow(digits - 1),
            id_high: 10u64.pow(digits),
            next_epoch: AtomicU64::new(1),
        }
    }

    /// IDs held, live and reserved.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(s).len()).sum()
    }

    /// Whether no ID is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn epoch(&self) -> u64 {
        self.next_epoch.fetch_add(1, Ordering::Relaxed)
    }

    fn shard(&self, id: ClientId) -> MutexGuard<'_, HashMap<ClientId, Entry>> {
        lock(&self.shards[shard_of(id)])
    }

    /// Runs `f` on the entries of `a` and `b` (distinct IDs) under their shard locks, taken in shard
    /// order so two such calls never deadlock. `f` returns its result and whether to remove `a`.
    fn with_two<R>(
        &self,
        a: ClientId,
        b: ClientId,
        f: impl FnOnce(Option<&mut Entry>, Option<&mut Entry>) -> (R, bool),
    ) -> R {
        debug_assert_ne!(a, b);
        let (ia, ib) = (shard_of(a), shard_of(b));
        if ia == ib {
            let mut shard = lock(&self.shards[ia]);
            // Take b out so both can be borrowed mutably; put it back after.
            let mut eb = shard.remove(&b);
            let (result, remove_a) = f(shard.get_mut(&a), eb.as_mut());
            if let Some(eb) = eb {
                shard.insert(b, eb);
            }
            if remove_a {
                shard.remove(&a);
            }
            result
        } else {
            let (mut ga, mut gb) = if ia < ib {
                let ga = lock(&self.shards[ia]);
                (ga, lock(&self.shards[ib]))
            } else {
                let gb = lock(&self.shards[ib]);
                (lock(&self.shards[ia]), gb)
            };
            let (result, remove_a) = f(ga.get_mut(&a), gb.get_mut(&b));
            if remove_a {
                ga.remove(&a);
            }
            result
        }
    }

    /// Removes `id` if `pred` holds for its entry, resetting its peer's call if that call is with
    /// `id`.
    fn free_if(&self, id: ClientId, pred: impl Fn(&Entry) -> bool) -> Option<Freed> {
        let peer = {
            let mut shard = self.shard(id);
            let entry = shard.get(&id).filter(|e| pred(e))?;
            match entry.call.peer() {
                None => {
                    shard.remove(&id);
                    return Some(Freed { id, peer: None });
                }
                Some(peer) => peer,
            }
        };
        // The call may have changed between the two locks: check again under both.
        self.with_two(id, peer, |entry, peer_entry| {
            let Some(entry) = entry.filter(|e| pred(e)) else {
                return (None, false);
            };
            let mut reset = None;
            if let Some(p) = peer_entry {
                if entry.call.peer() == Some(peer) && p.call.peer() == Some(id) {
                    p.call = CallState::Idle;
                    reset = Some(peer);
                }
            }
            (Some(Freed { id, peer: reset }), true)
        })
    }

    /// A transition between an ID and itself: nothing can pair, so it is refused.
    fn transition_self(
        &self,
        binding: Binding,
        t: Transition,
    ) -> Result<CallState, TransitionError> {
        let shard = self.shard(binding.id);
        let mine = shard
            .get(&binding.id)
            .filter(|e| e.is_live(binding.epoch))
            .ok_or(Stale)?
            .call;
        Err(match (t, mine.peer()) {
            (Transition::Offer, Some(peer)) => TransitionError::AlreadyInCall { peer, state: mine },
            (Transition::Offer, None) => TransitionError::UnknownPeer,
            _ => TransitionError::WrongState(mine),
        })
    }
}

/// The rule of `t` for the sender `me` in `mine`, with `peer` in `theirs` (`None`: nobody holds
/// it). Returns both new states (the peer's only if it changes) or the refusal.
pub fn apply(
    t: Transition,
    me: ClientId,
    peer: ClientId,
    mine: CallState,
    theirs: Option<CallState>,
) -> Result<(CallState, Option<CallState>), TransitionError> {
    let with_peer = mine.peer() == Some(peer);
    // "Both Idle" touches the peer only if its call is with me.
    let peer_idle = theirs
        .filter(|s| s.peer() == Some(me))
        .map(|_| CallState::Idle);
    match t {
        Transition::Offer => {
            if let Some(current) = mine.peer() {
                return Err(TransitionError::AlreadyInCall {
                    peer: current,
                    state: mine,
                });
            }
            match theirs {
                None => Err(TransitionError::UnknownPeer),
                Some(CallState::Idle) => Ok((
                    CallState::Calling { peer },
                    Some(CallState::Called { peer: me }),
                )),
                Some(_) => Err(TransitionError::Busy),
            }
        }
        Transition::Accept => match mine {
            CallState::Called { .. } if with_peer => match theirs {
                Some(CallState::Calling { peer: p }) if p == me => Ok((
                    CallState::InCall { peer },
                    Some(CallState::InCall { peer: me }),
                )),
                // The caller is gone or moved on (its departure resets me at once, so this is a
                // race inside one step): pairing with it would break symmetry.
                _ => Err(TransitionError::WrongState(mine)),
            },
            _ => Err(TransitionError::WrongState(mine)),
        },
        Transition::Decline => match mine {
            CallState::Called { .. } if with_peer => Ok((CallState::Idle, peer_idle)),
            _ => Err(TransitionError::WrongState(mine)),
        },
        Transition::Cancel => match mine {
            CallState::Calling { .. } if with_peer => Ok((CallState::Idle, peer_idle)),
            _ => Err(TransitionError::WrongState(mine)),
        },
        Transition::Hangup if with_peer => Ok((CallState::Idle, peer_idle)),
        Transition::Hangup => Err(TransitionError::WrongState(mine)),
    }
}

impl Registry for MemoryRegistry {
    async fn claim(&self, node: &NodeId, _now: Instant) -> Result<Claim, RegisterError> {
        let mut rng = rand::rng();
        for _ in 0..ID_DRAWS {
            let id = ClientId::new(rng.random_range(self.id_low..self.id_high));
            let mut shard = self.shard(id);
            let std::collections::hash_map::Entry::Vacant(slot) = shard.entry(id) else {
                continue;
            };
            let token = ResumeToken::random(&mut rng);
            let epoch = self.epoch();
            slot.insert(Entry {
                node: node.clone(),
                epoch,
                token: token.clone(),
                live: true,
                call: CallState::Idle,
            });
            return Ok(Claim {
                binding: Binding { id, epoch },
                token,
            });
        }
        Err(RegisterError::NoFreeId)
    }

    async fn resume(
        &self,
        current: Binding,
        target: ClientId,
        token: &ResumeToken,
        node: &NodeId,
        _now: Instant,
    ) -> Result<Takeover, ResumeError> {
        if current.id == target {
            // Holding the ID already: nothing to take back. Checked for liveness only.
            let shard = self.shard(current.id);
            shard
                .get(&current.id)
                .filter(|e| e.is_live(current.epoch))
                .ok_or(Stale)?;
            return Err(ResumeError::Unknown);
        }
        let new_token = ResumeToken::random(&mut rand::rng());
        let epoch = self.epoch();
        self.with_two(current.id, target, |cur, tgt| {
            let Some(cur) = cur.filter(|e| e.is_live(current.epoch)) else {
                return (Err(ResumeError::Stale(Stale)), false);
            };
            if cur.call != CallState::Idle {
                return (Err(ResumeError::InCall), false);
            }
            let Some(tgt) = tgt else {
                return (Err(ResumeError::Unknown), false);
            };
            if !tgt.token.matches(token) {
                return (Err(ResumeError::TokenMismatch), false);
            }
            let takeover = Takeover {
                binding: Binding { id: target, epoch },
                token: new_token.clone(),
                previous_node: std::mem::replace(&mut tgt.node, node.clone()),
                was_live: tgt.live,
                previous_epoch: tgt.epoch,
                call: tgt.call,
                // One process: no node can die while another resumes its IDs.
                quiet_through: None,
            };
            tgt.epoch = epoch;
            tgt.token = new_token;
            tgt.live = true;
            // The resuming connection's own ID is freed (it is Idle: no peer to tell).
            (Ok(takeover), true)
        })
    }

    async fn detach(&self, binding: Binding, _now: Instant, _grace: Duration) -> Result<(), Stale> {
        let mut shard = self.shard(binding.id);
        let entry = shard
            .get_mut(&binding.id)
            .filter(|e| e.is_live(binding.epoch))
            .ok_or(Stale)?;
        entry.live = false;
        Ok(())
    }

    async fn release(&self, binding: Binding) -> Result<Freed, Stale> {
        self.free_if(binding.id, |e| e.epoch == binding.epoch)
            .ok_or(Stale)
    }

    async fn expire(&self, binding: Binding) -> Option<Freed> {
        self.free_if(binding.id, |e| e.epoch == binding.epoch && !e.live)
    }

    async fn call_state(&self, binding: Binding) -> Result<CallState, Stale> {
        let shard = self.shard(binding.id);
        match shard.get(&binding.id) {
            Some(e) if e.is_live(binding.epoch) => Ok(e.call),
            _ => Err(Stale),
        }
    }

    async fn transition(
        &self,
        binding: Binding,
        peer: ClientId,
        t: Transition,
    ) -> Result<CallState, TransitionError> {
        let me = binding.id;
        if peer == me {
            return self.transition_self(binding, t);
        }
        self.with_two(me, peer, |mine, theirs| {
            let Some(mine) = mine.filter(|e| e.is_live(binding.epoch)) else {
                return (Err(TransitionError::Stale(Stale)), false);
            };
            match apply(t, me, peer, mine.call, theirs.as_ref().map(|e| e.call)) {
                Ok((new, peer_new)) => {
                    mine.call = new;
                    if let (Some(theirs), Some(peer_new)) = (theirs, peer_new) {
                        theirs.call = peer_new;
                    }
                    (Ok(new), false)
                }
                Err(e) => (Err(e), false),
            }
        })
    }

    async fn locate(&self, id: ClientId) -> Option<Location> {
        self.shard(id).get(&id).map(|e| Location {
            node: e.node.clone(),
            epoch: e.epoch,
            live: e.live,
        })
    }

    async fn refresh(&self, _node: &NodeId, _live: &[Binding]) {}
}

fn shard_of(id: ClientId) -> usize {
    (id.get() as usize) & (SHARDS - 1)
}

/// Locks a mutex, carrying on after a panic elsewhere: every update here leaves the table
/// consistent between statements, so a poisoned lock holds usable data.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Polls a future that must be ready at once (every [`MemoryRegistry`] future is).
///
/// # Panics
///
/// If the future is not ready on its first poll.
pub fn ready<F: Future>(future: F) -> F::Output {
    let mut future = std::pin::pin!(future);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match future.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(output) => output,
        std::task::Poll::Pending => panic!("a memory registry future was not ready at once"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: ClientId = ClientId::new(100_000_001);
    const PEER: ClientId = ClientId::new(100_000_002);
    const OTHER: ClientId = ClientId::new(100_000_003);

    fn registry() -> MemoryRegistry {
        MemoryRegistry::new(&SignalingLimits::default())
    }

    fn claim(reg: &MemoryRegistry) -> Binding {
        ready(reg.claim(&NodeId::local(), Instant::now()))
            .expect("room")
            .binding
    }

    /// Every state `me` can be in, relative to `PEER` and to a third party.
    fn my_states() -> [CallState; 7] {
        [
            CallState::Idle,
            CallState::Calling { peer: PEER },
            CallState::Called { peer: PEER },
            CallState::InCall { peer: PEER },
            CallState::Calling { peer: OTHER },
            CallState::Called { peer: OTHER },
            CallState::InCall { peer: OTHER },
        ]
    }

    /// Every state the peer can be in (`None`: nobody holds it).
    fn peer_states() -> [Option<CallState>; 8] {
        [
            None,
            Some(CallState::Idle),
            Some(CallState::Calling { peer: ME }),
            Some(CallState::Called { peer: ME }),
            Some(CallState::InCall { peer: ME }),
            Some(CallState::Calling { peer: OTHER }),
            Some(CallState::Called { peer: OTHER }),
            Some(CallState::InCall { peer: OTHER }),
        ]
    }

    /// The expected result of each transition, written out case by case (the spec in
    /// CLUSTER-DESIGN.md), independently of `apply`'s code.
    fn expected(
        t: Transition,
        mine: CallState,
        theirs: Option<CallState>,
    ) -> Result<(CallState, Option<CallState>), TransitionError> {
        use CallState::*;
        let theirs_with_me = theirs.filter(|s| s.peer() == Some(ME));
        let both_idle = (Idle, theirs_with_me.map(|_| Idle));
        match (t, mine) {
            (Transition::Offer, Idle) => match theirs {
                None => Err(TransitionError::UnknownPeer),
                Some(Idle) => Ok((Calling { peer: PEER }, Some(Called { peer: ME }))),
                Some(_) => Err(TransitionError::Busy),
            },
            (Transition::Offer, s) => Err(TransitionError::AlreadyInCall {
                peer: s.peer().unwrap(),
                state: s,
            }),
            (Transition::Accept, Called { peer: PEER }) => match theirs {
                Some(Calling { peer: ME }) => {
                    Ok((InCall { peer: PEER }, Some(InCall { peer: ME })))
                }
                _ => Err(TransitionError::WrongState(mine)),
            },
            (Transition::Decline, Called { peer: PEER }) => Ok(both_idle),
            (Transition::Cancel, Calling { peer: PEER }) => Ok(both_idle),
            (Transition::Hangup, Calling { peer: PEER })
            | (Transition::Hangup, Called { peer: PEER })
            | (Transition::Hangup, InCall { peer: PEER }) => Ok(both_idle),
            _ => Err(TransitionError::WrongState(mine)),
        }
    }

    #[test]
    fn every_transition_from_every_pair_of_states_follows_the_table() {
        let all = [
            Transition::Offer,
            Transition::Accept,
            Transition::Decline,
            Transition::Cancel,
            Transition::Hangup,
        ];
        let mut cases = 0;
        for t in all {
            for mine in my_states() {
                for theirs in peer_states() {
                    let got = apply(t, ME, PEER, mine, theirs);
                    assert_eq!(
                        got,
                        expected(t, mine, theirs),
                        "{t:?} from {mine:?} / {theirs:?}"
                    );
                    if let Ok((new, peer_new)) = got {
                        // A pair formed or kept is symmetric.
                        if let Some(p) = new.peer() {
                            assert_eq!(p, PEER);
                            assert_eq!(peer_new, Some(new.mirror(ME)), "{t:?}");
                        }
                        // A third party's call is never touched.
                        if theirs.and_then(CallState::peer) == Some(OTHER) {
                            assert_eq!(peer_new, None, "{t:?} touched another call");
                        }
                    }
                    cases += 1;
                }
            }
        }
        assert_eq!(cases, 5 * 7 * 8);
    }

    #[test]
    fn offer_accept_hangup_keep_both_ids_symmetric() {
        let reg = registry();
        let (a, b) = (claim(&reg), claim(&reg));
        let state = |x: Binding| ready(reg.call_state(x)).unwrap();

        let mine = ready(reg.transition(a, b.id, Transition::Offer)).unwrap();
        assert_eq!(mine, CallState::Calling { peer: b.id });
        assert_eq!(state(b), CallState::Called { peer: a.id });

        // The caller cannot accept its own offer; the callee can.
        assert_eq!(
            ready(reg.transition(a, b.id, Transition::Accept)),
            Err(TransitionError::WrongState(CallState::Calling {
                peer: b.id
            }))
        );
        ready(reg.transition(b, a.id, Transition::Accept)).unwrap();
        assert_eq!(state(a), CallState::InCall { peer: b.id });
        assert_eq!(state(b), CallState::InCall { peer: a.id });

        // A cancel after the answer is refused; a hang-up from either side ends it for both.
        assert_eq!(
            ready(reg.transition(a, b.id, Transition::Cancel)),
            Err(TransitionError::WrongState(CallState::InCall {
                peer: b.id
            }))
        );
        ready(reg.transition(b, a.id, Transition::Hangup)).unwrap();
        assert_eq!((state(a), state(b)), (CallState::Idle, CallState::Idle));
    }

    #[test]
    fn decline_and_cancel_free_both_and_a_busy_callee_is_untouched() {
        let reg = registry();
        let (a, b, c) = (claim(&reg), claim(&reg), claim(&reg));
        let state = |x: Binding| ready(reg.call_state(x)).unwrap();

        ready(reg.transition(a, b.id, Transition::Offer)).unwrap();
        // c calls b, who is ringing: busy, and nobody's state changes.
        assert_eq!(
            ready(reg.transition(c, b.id, Transition::Offer)),
            Err(TransitionError::Busy)
        );
        assert_eq!(state(c), CallState::Idle);
        assert_eq!(state(b), CallState::Called { peer: a.id });
        // a, calling, cannot call again.
        assert_eq!(
            ready(reg.transition(a, c.id, Transition::Offer)),
            Err(TransitionError::AlreadyInCall {
                peer: b.id,
                state: CallState::Calling { peer: b.id }
            })
        );
        ready(reg.transition(b, a.id, Transition::Decline)).unwrap();
        assert_eq!((state(a), state(b)), (CallState::Idle, CallState::Idle));

        ready(reg.transition(c, a.id, Transition::Offer)).unwrap();
        ready(reg.transition(c, a.id, Transition::Cancel)).unwrap();
        assert_eq!((state(a), state(c)), (CallState::Idle, CallState::Idle));
    }

    #[test]
    fn transitions_with_oneself_or_nobody_are_refused() {
        let reg = registry();
        let a = claim(&reg);
        let nobody = ClientId::new(999_999_999);
        assert_eq!(
            ready(reg.transition(a, nobody, Transition::Offer)),
            Err(TransitionError::UnknownPeer)
        );
        assert_eq!(
            ready(reg.transition(a, a.id, Transition::Offer)),
            Err(TransitionError::UnknownPeer)
        );
        for t in [
            Transition::Accept,
            Transition::Decline,
            Transition::Cancel,
            Transition::Hangup,
        ] {
            assert_eq!(
                ready(reg.transition(a, a.id, t)),
                Err(TransitionError::WrongState(CallState::Idle))
            );
            assert_eq!(
                ready(reg.transition(a, nobody, t)),
                Err(TransitionError::WrongState(CallState::Idle))
            );
        }
        assert_eq!(ready(reg.call_state(a)), Ok(CallState::Idle));
    }

    #[test]
    fn ids_have_the_configured_digits_are_unique_and_not_sequential() {
        let reg = MemoryRegistry::new(&SignalingLimits {
            id_digits: 6,
            ..SignalingLimits::default()
        });
        let ids: Vec<u64> = (0..200).map(|_| claim(&reg).id.get()).collect();
        assert!(ids.iter().all(|id| (100_000..1_000_000).contains(id)));
        let mut unique = ids.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), ids.len());
        let sequential = ids.windows(2).filter(|w| w[1] == w[0] + 1).count();
        assert!(sequential < 5, "{sequential} sequential IDs");
        assert_eq!(reg.len(), 200);
    }

    #[test]
    fn a_stale_binding_can_do_nothing() {
        let reg = registry();
        let (a, b) = (claim(&reg), claim(&reg));
        let old = Binding {
            epoch: a.epoch + 1000,
            ..a
        };
        assert_eq!(ready(reg.call_state(old)), Err(Stale));
        assert_eq!(
            ready(reg.transition(old, b.id, Transition::Offer)),
            Err(TransitionError::Stale(Stale))
        );
        assert_eq!(
            ready(reg.detach(old, Instant::now(), Duration::ZERO)),
            Err(Stale)
        );
        assert_eq!(ready(reg.release(old)), Err(Stale));
        assert_eq!(ready(reg.expire(old)), None);
        assert_eq!(ready(reg.call_state(b)), Ok(CallState::Idle));
    }

    #[test]
    fn a_detached_id_keeps_its_call_and_expires_only_with_its_epoch() {
        let reg = registry();
        let (a, b) = (claim(&reg), claim(&reg));
        ready(reg.transition(a, b.id, Transition::Offer)).unwrap();
        ready(reg.transition(b, a.id, Transition::Accept)).unwrap();

        // A live ID does not expire; a detached one is no longer live for its old binding.
        assert_eq!(ready(reg.expire(a)), None);
        ready(reg.detach(a, Instant::now(), Duration::from_secs(30))).unwrap();
        assert_eq!(ready(reg.call_state(a)), Err(Stale));
        assert_eq!(
            ready(reg.locate(a.id)),
            Some(Location {
                node: NodeId::local(),
                epoch: a.epoch,
                live: false
            })
        );
        // The peer keeps its call while a is reserved; the expiry resets it and names it.
        assert_eq!(
            ready(reg.call_state(b)),
            Ok(CallState::InCall { peer: a.id })
        );
        assert_eq!(
            ready(reg.expire(a)),
            Some(Freed {
                id: a.id,
                peer: Some(b.id)
            })
        );
        assert_eq!(ready(reg.call_state(b)), Ok(CallState::Idle));
        assert_eq!(ready(reg.locate(a.id)), None);
        assert_eq!(ready(reg.expire(a)), None);
    }

    #[test]
    fn release_frees_at_once_and_resets_the_peer() {
        let reg = registry();
        let (a, b) = (claim(&reg), claim(&reg));
        ready(reg.transition(a, b.id, Transition::Offer)).unwrap();
        assert_eq!(
            ready(reg.release(b)),
            Ok(Freed {
                id: b.id,
                peer: Some(a.id)
            })
        );
        assert_eq!(ready(reg.call_state(a)), Ok(CallState::Idle));
        assert_eq!(ready(reg.release(b)), Err(Stale));
        assert_eq!(
            ready(reg.release(a)),
            Ok(Freed {
                id: a.id,
                peer: None
            })
        );
        assert!(reg.is_empty());
    }

    #[test]
    fn resume_moves_the_id_with_its_call_and_a_new_token() {
        let reg = registry();
        let node_b = NodeId::new("b");
        let claim_a = ready(reg.claim(&NodeId::local(), Instant::now())).unwrap();
        let (a, peer) = (claim_a.binding, claim(&reg));
        ready(reg.transition(peer, a.id, Transition::Offer)).unwrap();
        ready(reg.transition(a, peer.id, Transition::Accept)).unwrap();
        ready(reg.detach(a, Instant::now(), Duration::from_secs(30))).unwrap();

        let fresh = ready(reg.claim(&node_b, Instant::now())).unwrap().binding;
        let wrong = ResumeToken::random(&mut rand::rng());
        assert_eq!(
            ready(reg.resume(fresh, a.id, &wrong, &node_b, Instant::now())).err(),
            Some(ResumeError::TokenMismatch)
        );
        let nobody = ClientId::new(999_999_999);
        assert_eq!(
            ready(reg.resume(fresh, nobody, &claim_a.token, &node_b, Instant::now())).err(),
            Some(ResumeError::Unknown)
        );
        assert_eq!(
            ready(reg.resume(fresh, fresh.id, &claim_a.token, &node_b, Instant::now())).err(),
            Some(ResumeError::Unknown)
        );

        let took = ready(reg.resume(fresh, a.id, &claim_a.token, &node_b, Instant::now())).unwrap();
        assert_eq!(took.binding.id, a.id);
        assert_ne!(took.binding.epoch, a.epoch);
        assert_eq!(took.previous_node, NodeId::local());
        assert_eq!(took.previous_epoch, a.epoch);
        assert!(!took.was_live);
        assert_eq!(took.call, CallState::InCall { peer: peer.id });
        // The old token no longer works, the new one does; the fresh ID is gone.
        assert!(!took.token.matches(&claim_a.token));
        assert_eq!(ready(reg.locate(fresh.id)), None);
        assert_eq!(ready(reg.locate(a.id)).unwrap().node, node_b);
        assert_eq!(ready(reg.call_state(took.binding)), Ok(took.call));
        // The old epoch's expiry comes too late: the resume won.
        assert_eq!(ready(reg.expire(a)), None);
        assert_eq!(
            ready(reg.call_state(peer)),
            Ok(CallState::InCall { peer: a.id })
        );
        // A stale resumer and one in a call are refused.
        assert_eq!(
            ready(reg.resume(fresh, a.id, &took.token, &node_b, Instant::now())).err(),
            Some(ResumeError::Stale(Stale))
        );
        assert_eq!(
            ready(reg.resume(peer, a.id, &took.token, &node_b, Instant::now())).err(),
            Some(ResumeError::InCall)
        );
    }

    #[test]
    fn resuming_a_live_id_says_so_so_its_node_can_kick_the_old_connection() {
        let reg = registry();
        let claim_a = ready(reg.claim(&NodeId::local(), Instant::now())).unwrap();
        let fresh = claim(&reg);
        let took = ready(reg.resume(
            fresh,
            claim_a.binding.id,
            &claim_a.token,
            &NodeId::local(),
            Instant::now(),
        ))
        .unwrap();
        assert!(took.was_live);
        assert_eq!(ready(reg.call_state(claim_a.binding)), Err(Stale));
    }

    #[test]
    fn two_ids_in_one_shard_pair_and_part_cleanly() {
        let reg = registry();
        let mut bindings: Vec<Binding> = (0..300).map(|_| claim(&reg)).collect();
        bindings.sort_by_key(|b| shard_of(b.id));
        let pair = bindings
            .windows(2)
            .find(|w| shard_of(w[0].id) == shard_of(w[1].id))
            .expect("300 IDs over 64 shards share one");
        let (a, b) = (pair[0], pair[1]);
        ready(reg.transition(a, b.id, Transition::Offer)).unwrap();
        assert_eq!(
            ready(reg.call_state(b)),
            Ok(CallState::Called { peer: a.id })
        );
        assert_eq!(
            ready(reg.release(a)),
            Ok(Freed {
                id: a.id,
                peer: Some(b.id)
            })
        );
        assert_eq!(ready(reg.call_state(b)), Ok(CallState::Idle));
        assert_eq!(reg.len(), 299);
    }

    /// Random transitions among a few IDs, from every one: the table stays symmetric throughout.
    #[test]
    fn call_states_stay_symmetric() {
        let reg = registry();
        let ids: Vec<Binding> = (0..4).map(|_| claim(&reg)).collect();
        let all = [
            Transition::Offer,
            Transition::Accept,
            Transition::Decline,
            Transition::Cancel,
            Transition::Hangup,
        ];
        let mut rng = rand::rng();
        for _ in 0..5000 {
            let me = ids[rng.random_range(0..ids.len())];
            let peer = ids[rng.random_range(0..ids.len())].id;
            let t = all[rng.random_range(0..all.len())];
            let _ = ready(reg.transition(me, peer, t));
            for x in &ids {
                let state = ready(reg.call_state(*x)).unwrap();
                if let Some(p) = state.peer() {
                    let other = ids.iter().find(|b| b.id == p).unwrap();
                    assert_eq!(ready(reg.call_state(*other)).unwrap(), state.mirror(x.id));
                }
            }
        }
    }
}
