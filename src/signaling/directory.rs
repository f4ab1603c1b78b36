//! Where each client ID lives: a live connection's outbox or a reservation waiting for a resume, plus
//! the ID's resume token and call state. This module owns that table and its atomicity; it never
//! decides what a message means (that is `hub`) and never touches a socket.
//!
//! [`Directory`] is the seam for running several callgate instances: [`MemoryDirectory`] keeps the
//! table in this process; a Redis-backed one can implement the same few operations (each is one
//! atomic step on at most two IDs) and deliver to connections on other instances through pub/sub,
//! without the hub or the session layer changing.
//!
//! Every map and queue here is bounded: IDs by [`SignalingLimits::max_clients`], each reservation's
//! queue by message count and bytes, all queues together by a global byte budget, and the deadline
//! heap by the number of reservations made within one grace period.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::Rng as _;

use super::protocol::{ClientId, ResumeToken};
use super::SignalingLimits;

/// One live connection's outbound queue, as the hub sees it.
///
/// Pushing must never block: a full queue means a slow reader, and the directory answers it by
/// dropping the outbox (so the connection's writer sees its channel close and hangs up) and keeping
/// the ID reserved for a resume. The directory holds the only long-lived handle to a connection's
/// outbox; the session layer must not keep a clone of the sending side, or it will not notice.
pub trait Outbox: Send + 'static {
    /// Queues one ready-to-send text frame, or hands it back if the queue is full or closed.
    fn try_push(&self, frame: Bytes) -> Result<(), PushError>;
}

/// Why a frame could not be queued; the frame comes back so it can be kept for a resume.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    /// The connection reads too slowly and its queue is full.
    #[error("The connection's outbound queue is full.")]
    Full(Bytes),
    /// The connection's writer is gone.
    #[error("The connection's outbound queue is closed.")]
    Closed(Bytes),
}

impl PushError {
    /// The frame that was not queued.
    pub fn into_frame(self) -> Bytes {
        match self {
            Self::Full(frame) | Self::Closed(frame) => frame,
        }
    }
}

/// Which connection currently holds an ID.
///
/// The epoch changes whenever the ID moves to another connection (a resume), so a connection that
/// was taken over or detached cannot act on the ID any more: its operations fail with [`Stale`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Binding {
    /// The ID the connection holds.
    pub id: ClientId,
    /// Which holder of the ID this is; unique per directory.
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
    const fn mirror(self, me: ClientId) -> Self {
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

/// The connection no longer holds its ID: another connection resumed it, or it was detached for
/// reading too slowly, or it already left.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("This connection no longer holds its ID.")]
pub struct Stale;

/// Why a new connection could not be given an ID.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RegisterError {
    /// [`SignalingLimits::max_clients`] IDs are live or reserved.
    #[error("The server holds as many clients as it is configured for.")]
    Full,
    /// Random draws kept hitting taken IDs; the ID space is too crowded for the ID length.
    #[error("No free client ID was found; the ID length is too short for this many clients.")]
    NoFreeId,
    /// The connection's outbox did not take the `id` message.
    #[error("The new connection's outbound queue did not accept its first message.")]
    OutboxRejected,
}

/// Why a resume was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ResumeError {
    /// No such ID is held (never issued, expired, or already freed) — or it is the resuming
    /// connection's own ID. Deliberately indistinguishable from a wrong token on the wire.
    #[error("The ID is not held by anyone who can be resumed.")]
    Unknown,
    /// The token does not match the ID's current token.
    #[error("The resume token does not match.")]
    TokenMismatch,
    /// The resuming connection is itself in a call and would abandon it.
    #[error("The resuming connection is in a call of its own.")]
    InCall,
    /// The resuming connection no longer holds its own ID.
    #[error(transparent)]
    Stale(#[from] Stale),
}

/// A successful resume.
#[derive(Debug)]
pub struct Resumed<O> {
    /// The connection's new binding (the resumed ID, with a new epoch).
    pub binding: Binding,
    /// The outbox of a connection that still held the ID (a half-open socket the client gave up
    /// on); it no longer receives anything and should be told and dropped.
    pub replaced: Option<O>,
    /// How many queued messages were delivered after the `id` message.
    pub delivered: usize,
    /// The resuming connection's own outbox overflowed while taking the queue; it has been
    /// detached again (the undelivered rest stays queued).
    pub overflowed: bool,
    /// The call the ID is in, carried over.
    pub call: CallState,
}

/// What happened to a frame handed to [`Directory::deliver`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub enum Delivery {
    /// Queued on the live connection's outbox.
    Sent,
    /// The ID is reserved; the frame waits for a resume.
    Queued,
    /// The live connection's outbox was full or closed: it was detached (its outbox dropped) and
    /// the ID reserved, with this frame first in its queue.
    Detached,
    /// The ID is reserved and its queue is full: the frame was dropped and the reservation ends
    /// now. Call [`Directory::expire`] to free it and notify its peer.
    Overflowed,
    /// Nobody holds this ID.
    NoSuchClient,
}

/// A reservation that ended without a resume.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Expired {
    /// The freed ID.
    pub id: ClientId,
    /// The call peer whose call state was reset and who must be told.
    pub peer: Option<ClientId>,
}

/// The routing table, ID reservations, resume tokens and call states, behind operations that are
/// each atomic on at most two IDs.
///
/// Implementations must keep these invariants: IDs are unique among live and reserved entries; call
/// states are symmetric (see [`CallState`]); a reservation's queued frames are delivered in arrival
/// order before anything newer; every operation is non-blocking apart from short internal locks.
pub trait Directory: Send + Sync {
    /// A live connection's outbound queue.
    type Outbox: Outbox;

    /// Gives a new connection a fresh random ID and token, and pushes `hello(id, token)` (the `id`
    /// message) as its first frame before anyone can send to it.
    fn register(
        &self,
        outbox: Self::Outbox,
        now: Instant,
        hello: impl FnOnce(ClientId, &ResumeToken) -> Bytes,
    ) -> Result<Binding, RegisterError>;

    /// Moves `target` to the connection holding `current`, if `token` is `target`'s token and
    /// `current` is idle. `current`'s own ID is freed, `target` gets a new token and epoch, and the
    /// connection receives `hello(target, new_token)` followed by everything queued for `target`,
    /// in order. A live holder of `target` is replaced.
    fn resume(
        &self,
        current: Binding,
        target: ClientId,
        token: &ResumeToken,
        now: Instant,
        hello: impl FnOnce(ClientId, &ResumeToken) -> Bytes,
    ) -> Result<Resumed<Self::Outbox>, ResumeError>;

    /// The connection dropped: its outbox is released and the ID is reserved until
    /// `now + resume_grace`, keeping its call. Returns false if the binding was already stale.
    fn detach(&self, binding: Binding, now: Instant) -> bool;

    /// The connection left for good: the ID is freed now and its call peer (returned) reset to idle.
    fn release(&self, binding: Binding) -> Result<Option<ClientId>, Stale>;

    /// Frees every reservation whose deadline is at or before `now`, appending them to `expired`,
    /// and returns the next deadline, if any.
    fn expire(&self, now: Instant, expired: &mut Vec<Expired>) -> Option<Instant>;

    /// The call state of a live connection's ID.
    fn call_state(&self, binding: Binding) -> Result<CallState, Stale>;

    /// Atomically reads the call states of the live connection's ID and of `peer` (`None` if
    /// nobody holds `peer`), lets `rule` choose the connection's new state, and sets the peer's to
    /// match: paired when the new state names `peer`, idle when it leaves a call with `peer`.
    /// The rule may only return `Idle`, a state naming `peer`, or the current state unchanged.
    fn update_call<E: From<Stale>>(
        &self,
        binding: Binding,
        peer: ClientId,
        rule: impl FnOnce(CallState, Option<CallState>) -> Result<CallState, E>,
    ) -> Result<CallState, E>;

    /// Queues `frame` for whoever holds `to`, live or reserved. Never blocks.
    fn deliver(&self, to: ClientId, frame: Bytes, now: Instant) -> Delivery;

    /// Queues `frame` for the connection itself (replies and errors), if it still holds its ID.
    fn reply(&self, binding: Binding, frame: Bytes, now: Instant) -> Result<Delivery, Stale>;

    /// How many IDs are live or reserved.
    fn len(&self) -> usize;

    /// Whether no ID is live or reserved.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Number of independently locked shards; IDs are random, so they spread evenly.
const SHARDS: usize = 64;

/// Random draws tried before giving up on finding a free ID.
const ID_DRAWS: usize = 32;

/// The in-process [`Directory`]: sharded `std::sync::Mutex`es, never held across anything slow.
pub struct MemoryDirectory<O> {
    /// The table, split by `id % SHARDS` so concurrent sessions rarely contend.
    shards: Box<[Mutex<Shard<O>>]>,
    /// Reservation deadlines, earliest first. Entries whose slot moved on are skipped when popped.
    deadlines: Mutex<BinaryHeap<Reverse<Deadline>>>,
    /// The knobs this table needs (copied, so the hot path reads them without indirection).
    limits: DirectoryLimits,
    /// Live plus reserved IDs, checked against `max_clients` before inserting.
    clients: AtomicUsize,
    /// Bytes queued in all reservations together, checked against the global budget.
    queued_bytes: AtomicUsize,
    /// Source of binding epochs.
    next_epoch: AtomicU64,
}

/// The subset of [`SignalingLimits`] the directory enforces.
#[derive(Clone, Debug)]
struct DirectoryLimits {
    /// Smallest ID with the configured number of digits.
    id_low: u64,
    /// One past the largest such ID.
    id_high: u64,
    grace: Duration,
    queue_messages: usize,
    queue_bytes: usize,
    queue_bytes_total: usize,
    max_clients: usize,
}

/// One lock's worth of the table.
type Shard<O> = HashMap<ClientId, Slot<O>>;

/// A reservation's deadline, tagged with the epoch it was made for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Deadline {
    at: Instant,
    id: ClientId,
    epoch: u64,
}

/// Everything the directory knows about one ID.
struct Slot<O> {
    /// What a reconnecting client must show to take the ID back.
    token: ResumeToken,
    /// Which connection holds the ID (see [`Binding`]).
    epoch: u64,
    /// The ID's call, which survives a reconnect.
    call: CallState,
    /// Live outbox or reservation.
    presence: Presence<O>,
}

enum Presence<O> {
    /// A connection is attached and reading.
    Live(O),
    /// No connection; waiting for a resume until the deadline.
    Reserved(Reservation),
}

struct Reservation {
    /// When the ID is freed if nobody resumes it.
    until: Instant,
    /// Frames that arrived meanwhile, oldest first.
    queue: VecDeque<Bytes>,
    /// Total length of `queue`.
    bytes: usize,
}

impl<O: Outbox> MemoryDirectory<O> {
    /// An empty directory enforcing `limits`. `id_digits` is clamped to 6..=15 so IDs stay exact
    /// JavaScript numbers and the ID space is never tiny.
    pub fn new(limits: &SignalingLimits) -> Self {
        let digits = u32::from(limits.id_digits.clamp(6, 15));
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            deadlines: Mutex::new(BinaryHeap::new()),
            limits: DirectoryLimits {
                id_low: 10u64.pow(digits - 1),
                id_high: 10u64.pow(digits),
                grace: limits.resume_grace,
                queue_messages: limits.resume_queue_messages,
                queue_bytes: limits.resume_queue_bytes,
                queue_bytes_total: limits.resume_queue_bytes_total,
                max_clients: limits.max_clients,
            },
            clients: AtomicUsize::new(0),
            queued_bytes: AtomicUsize::new(0),
            next_epoch: AtomicU64::new(1),
        }
    }

    /// Bytes currently queued for reserved IDs (for metrics and tests).
    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes.load(Ordering::Relaxed)
    }

    /// Reservation deadlines still tracked, including stale ones (for tests of boundedness).
    pub fn pending_deadlines(&self) -> usize {
        lock(&self.deadlines).len()
    }

    fn shard(&self, id: ClientId) -> MutexGuard<'_, Shard<O>> {
        lock(&self.shards[shard_of(id)])
    }

    fn epoch(&self) -> u64 {
        self.next_epoch.fetch_add(1, Ordering::Relaxed)
    }

    fn schedule(&self, deadline: Option<Deadline>) {
        if let Some(deadline) = deadline {
            lock(&self.deadlines).push(Reverse(deadline));
        }
    }

    /// Runs `f` with both slots locked (shards taken in index order, so two callers never deadlock).
    /// If `f` returns true in its second value, `a`'s slot is removed before the locks are released.
    fn with_two<R>(
        &self,
        a: ClientId,
        b: ClientId,
        f: impl FnOnce(Option<&mut Slot<O>>, Option<&mut Slot<O>>) -> (R, bool),
    ) -> R {
        debug_assert_ne!(a, b);
        let (ia, ib) = (shard_of(a), shard_of(b));
        let (result, remove_a, removed) = if ia == ib {
            let mut shard = lock(&self.shards[ia]);
            // Two `&mut` into one map: lift `b` out for the duration (rare: 1 pair in SHARDS).
            let mut sb = shard.remove(&b);
            let (result, remove_a) = f(shard.get_mut(&a), sb.as_mut());
            if let Some(sb) = sb {
                shard.insert(b, sb);
            }
            let removed = remove_a.then(|| shard.remove(&a)).flatten();
            (result, remove_a, removed)
        } else {
            let (mut ga, mut gb) = if ia < ib {
                let ga = lock(&self.shards[ia]);
                (ga, lock(&self.shards[ib]))
            } else {
                let gb = lock(&self.shards[ib]);
                (lock(&self.shards[ia]), gb)
            };
            let (result, remove_a) = f(ga.get_mut(&a), gb.get_mut(&b));
            let removed = remove_a.then(|| ga.remove(&a)).flatten();
            (result, remove_a, removed)
        };
        if remove_a {
            if let Some(slot) = removed {
                self.forget(slot);
            }
        }
        result
    }

    /// Accounts for a slot that left the table (its outbox, if any, is dropped here, outside locks).
    fn forget(&self, slot: Slot<O>) {
        self.clients.fetch_sub(1, Ordering::Relaxed);
        if let Presence::Reserved(r) = slot.presence {
            self.queued_bytes.fetch_sub(r.bytes, Ordering::Relaxed);
        }
    }

    /// Removes `id` if `pred` holds for its slot, resetting its call peer. Returns `None` if `pred`
    /// failed, else the peer that was reset.
    fn remove_if(&self, id: ClientId, pred: impl Fn(&Slot<O>) -> bool) -> Option<Option<ClientId>> {
        // The peer can only change from Some to None while we do not hold the lock (the peer hangs
        // up), so one re-check under both locks is enough.
        let peer = {
            let shard = self.shard(id);
            let slot = shard.get(&id).filter(|s| pred(s))?;
            slot.call.peer()
        };
        match peer {
            None => {
                let mut shard = self.shard(id);
                shard.get(&id).filter(|s| pred(s))?;
                let slot = shard.remove(&id)?;
                drop(shard);
                let peer = slot.call.peer();
                debug_assert!(peer.is_none(), "a call began with a reserved or leaving ID");
                self.forget(slot);
                Some(peer)
            }
            Some(peer) => self.with_two(id, peer, |slot, peer_slot| {
                let Some(slot) = slot.filter(|s| pred(s)) else {
                    return (None, false);
                };
                let mut reset = None;
                if let Some(p) = peer_slot {
                    if p.call.peer() == Some(id) {
                        p.call = CallState::Idle;
                        reset = Some(peer);
                    }
                }
                slot.call = CallState::Idle;
                (Some(reset), true)
            }),
        }
    }
}

impl<O: Outbox> Slot<O> {
    fn is_live(&self, epoch: u64) -> bool {
        self.epoch == epoch && matches!(self.presence, Presence::Live(_))
    }

    /// Pushes to the live outbox or the reservation queue; see [`Delivery`]. Returns a deadline to
    /// schedule when the slot became (or must end as) a reservation.
    fn deliver(
        &mut self,
        frame: Bytes,
        now: Instant,
        limits: &DirectoryLimits,
        queued_total: &AtomicUsize,
        id: ClientId,
    ) -> (Delivery, Option<Deadline>) {
        match &mut self.presence {
            Presence::Live(outbox) => match outbox.try_push(frame) {
                Ok(()) => (Delivery::Sent, None),
                Err(e) => {
                    let until = now + limits.grace;
                    let mut reservation = Reservation {
                        until,
                        queue: VecDeque::new(),
                        bytes: 0,
                    };
                    // The frame that did not fit is kept, so a resume loses nothing from here on.
                    let _ = reservation.push(e.into_frame(), limits, queued_total);
                    self.presence = Presence::Reserved(reservation);
                    let deadline = Deadline {
                        at: until,
                        id,
                        epoch: self.epoch,
                    };
                    (Delivery::Detached, Some(deadline))
                }
            },
            Presence::Reserved(reservation) => {
                if reservation.until <= now {
                    // Already ending (overflowed or due): nothing more is kept.
                    return (Delivery::Overflowed, None);
                }
                match reservation.push(frame, limits, queued_total) {
                    Ok(()) => (Delivery::Queued, None),
                    Err(()) => {
                        reservation.until = now;
                        let deadline = Deadline {
                            at: now,
                            id,
                            epoch: self.epoch,
                        };
                        (Delivery::Overflowed, Some(deadline))
                    }
                }
            }
        }
    }
}

impl Reservation {
    fn push(
        &mut self,
        frame: Bytes,
        limits: &DirectoryLimits,
        queued_total: &AtomicUsize,
    ) -> Result<(), ()> {
        let len = frame.len();
        if self.queue.len() >= limits.queue_messages || self.bytes + len > limits.queue_bytes {
            return Err(());
        }
        if queued_total.fetch_add(len, Ordering::Relaxed) + len > limits.queue_bytes_total {
            queued_total.fetch_sub(len, Ordering::Relaxed);
            return Err(());
        }
        self.bytes += len;
        self.queue.push_back(frame);
        Ok(())
    }
}

impl<O: Outbox> Directory for MemoryDirectory<O> {
    type Outbox = O;

    fn register(
        &self,
        outbox: O,
        _now: Instant,
        hello: impl FnOnce(ClientId, &ResumeToken) -> Bytes,
    ) -> Result<Binding, RegisterError> {
        if self.clients.fetch_add(1, Ordering::Relaxed) >= self.limits.max_clients {
            self.clients.fetch_sub(1, Ordering::Relaxed);
            return Err(RegisterError::Full);
        }
        let mut rng = rand::rng();
        for _ in 0..ID_DRAWS {
            let id = ClientId::new(rng.random_range(self.limits.id_low..self.limits.id_high));
            let mut shard = self.shard(id);
            let std::collections::hash_map::Entry::Vacant(entry) = shard.entry(id) else {
                continue;
            };
            let token = ResumeToken::random(&mut rng);
            if outbox.try_push(hello(id, &token)).is_err() {
                drop(shard);
                self.clients.fetch_sub(1, Ordering::Relaxed);
                return Err(RegisterError::OutboxRejected);
            }
            let epoch = self.epoch();
            entry.insert(Slot {
                token,
                epoch,
                call: CallState::Idle,
                presence: Presence::Live(outbox),
            });
            return Ok(Binding { id, epoch });
        }
        self.clients.fetch_sub(1, Ordering::Relaxed);
        Err(RegisterError::NoFreeId)
    }

    fn resume(
        &self,
        current: Binding,
        target: ClientId,
        token: &ResumeToken,
        now: Instant,
        hello: impl FnOnce(ClientId, &ResumeToken) -> Bytes,
    ) -> Result<Resumed<O>, ResumeError> {
        if current.id == target {
            // Holding the ID already; nothing to take back. Checked for liveness only.
            self.call_state(current)?;
            return Err(ResumeError::Unknown);
        }
        let new_token = ResumeToken::random(&mut rand::rng());
        let epoch = self.epoch();
        let limits = &self.limits;
        let queued_total = &self.queued_bytes;
        let (result, deadline) = self.with_two(current.id, target, |cur, tgt| {
            let Some(cur) = cur.filter(|s| s.is_live(current.epoch)) else {
                return ((Err(ResumeError::Stale(Stale)), None), false);
            };
            if cur.call != CallState::Idle {
                return ((Err(ResumeError::InCall), None), false);
            }
            let Some(tgt) = tgt else {
                return ((Err(ResumeError::Unknown), None), false);
            };
            if !tgt.token.matches(token) {
                return ((Err(ResumeError::TokenMismatch), None), false);
            }
            // Take the resuming connection's outbox; its own slot is removed by `with_two`.
            let placeholder = Presence::Reserved(Reservation {
                until: now,
                queue: VecDeque::new(),
                bytes: 0,
            });
            let Presence::Live(outbox) = std::mem::replace(&mut cur.presence, placeholder) else {
                unreachable!("checked live above");
            };
            let hello = hello(target, &new_token);
            tgt.token = new_token;
            tgt.epoch = epoch;
            let (replaced, mut queue, queued_bytes) =
                match std::mem::replace(&mut tgt.presence, Presence::Live(outbox)) {
                    Presence::Live(old) => (Some(old), VecDeque::new(), 0),
                    Presence::Reserved(r) => (None, r.queue, r.bytes),
                };
            queued_total.fetch_sub(queued_bytes, Ordering::Relaxed);
            let mut delivered = 0usize;
            let mut overflowed = false;
            let mut deadline = None;
            for frame in std::iter::once(hello).chain(queue.drain(..)) {
                if overflowed {
                    if let Presence::Reserved(r) = &mut tgt.presence {
                        let _ = r.push(frame, limits, queued_total);
                    }
                    continue;
                }
                let (delivery, d) = tgt.deliver(frame, now, limits, queued_total, target);
                match delivery {
                    Delivery::Sent => delivered += 1,
                    _ => {
                        overflowed = true;
                        deadline = d;
                    }
                }
            }
            let resumed = Resumed {
                binding: Binding { id: target, epoch },
                replaced,
                // The `id` message is not one of the queued messages.
                delivered: delivered.saturating_sub(1),
                overflowed,
                call: tgt.call,
            };
            ((Ok(resumed), deadline), true)
        });
        self.schedule(deadline);
        result
    }

    fn detach(&self, binding: Binding, now: Instant) -> bool {
        let until = now + self.limits.grace;
        let detached = {
            let mut shard = self.shard(binding.id);
            match shard.get_mut(&binding.id) {
                Some(slot) if slot.is_live(binding.epoch) => {
                    slot.presence = Presence::Reserved(Reservation {
                        until,
                        queue: VecDeque::new(),
                        bytes: 0,
                    });
                    true
                }
                _ => false,
            }
        };
        if detached {
            self.schedule(Some(Deadline {
                at: until,
                id: binding.id,
                epoch: binding.epoch,
            }));
        }
        detached
    }

    fn release(&self, binding: Binding) -> Result<Option<ClientId>, Stale> {
        self.remove_if(binding.id, |s| s.epoch == binding.epoch)
            .ok_or(Stale)
    }

    fn expire(&self, now: Instant, expired: &mut Vec<Expired>) -> Option<Instant> {
        loop {
            let due = {
                let mut heap = lock(&self.deadlines);
                match heap.peek() {
                    Some(Reverse(d)) if d.at <= now => heap.pop().map(|Reverse(d)| d),
                    Some(Reverse(d)) => return Some(d.at),
                    None => return None,
                }
            };
            let Some(due) = due else { continue };
            let ended = self.remove_if(due.id, |s| {
                s.epoch == due.epoch
                    && matches!(&s.presence, Presence::Reserved(r) if r.until <= now)
            });
            if let Some(peer) = ended {
                expired.push(Expired { id: due.id, peer });
            }
        }
    }

    fn call_state(&self, binding: Binding) -> Result<CallState, Stale> {
        let shard = self.shard(binding.id);
        match shard.get(&binding.id) {
            Some(slot) if slot.is_live(binding.epoch) => Ok(slot.call),
            _ => Err(Stale),
        }
    }

    fn update_call<E: From<Stale>>(
        &self,
        binding: Binding,
        peer: ClientId,
        rule: impl FnOnce(CallState, Option<CallState>) -> Result<CallState, E>,
    ) -> Result<CallState, E> {
        let me = binding.id;
        if peer == me {
            let mut shard = self.shard(me);
            let slot = shard
                .get_mut(&me)
                .filter(|s| s.is_live(binding.epoch))
                .ok_or(Stale)?;
            let new = rule(slot.call, None)?;
            if new.peer().is_none() {
                slot.call = new;
            }
            return Ok(new);
        }
        self.with_two(me, peer, |mine, theirs| {
            let Some(mine) = mine.filter(|s| s.is_live(binding.epoch)) else {
                return (Err(Stale.into()), false);
            };
            let new = match rule(mine.call, theirs.as_ref().map(|s| s.call)) {
                Ok(new) => new,
                Err(e) => return (Err(e), false),
            };
            debug_assert!(
                new.peer().is_none() || new.peer() == Some(peer) || new == mine.call,
                "a rule may only end a call, pair with `peer`, or change nothing"
            );
            match theirs {
                Some(theirs) if new.peer() == Some(peer) => theirs.call = new.mirror(me),
                Some(theirs) if theirs.call.peer() == Some(me) => theirs.call = CallState::Idle,
                // Pairing with an ID nobody holds would break symmetry: change nothing.
                None if new.peer() == Some(peer) => return (Ok(mine.call), false),
                _ => {}
            }
            mine.call = new;
            (Ok(new), false)
        })
    }

    fn deliver(&self, to: ClientId, frame: Bytes, now: Instant) -> Delivery {
        let (delivery, deadline) = {
            let mut shard = self.shard(to);
            match shard.get_mut(&to) {
                Some(slot) => slot.deliver(frame, now, &self.limits, &self.queued_bytes, to),
                None => (Delivery::NoSuchClient, None),
            }
        };
        self.schedule(deadline);
        delivery
    }

    fn reply(&self, binding: Binding, frame: Bytes, now: Instant) -> Result<Delivery, Stale> {
        let (delivery, deadline) = {
            let mut shard = self.shard(binding.id);
            let slot = shard
                .get_mut(&binding.id)
                .filter(|s| s.is_live(binding.epoch))
                .ok_or(Stale)?;
            slot.deliver(frame, now, &self.limits, &self.queued_bytes, binding.id)
        };
        self.schedule(deadline);
        Ok(delivery)
    }

    fn len(&self) -> usize {
        self.clients.load(Ordering::Relaxed)
    }
}

fn shard_of(id: ClientId) -> usize {
    (id.get() % SHARDS as u64) as usize
}

/// Locks a mutex, carrying on after a panic elsewhere: every update here leaves the table
/// consistent between statements, so a poisoned lock holds usable data.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// An [`Outbox`] for tests: a shared `Vec` with a capacity, so tests can read what a client got and
/// make a client slow.
#[cfg(test)]
pub(crate) mod test_outbox {
    use std::sync::{Arc, Mutex};

    use bytes::Bytes;

    use super::{Outbox, PushError};

    /// The test's view of one connection's queue. The directory holds a clone.
    #[derive(Clone)]
    pub(crate) struct TestOutbox(Arc<Mutex<Inner>>);

    struct Inner {
        frames: Vec<Bytes>,
        capacity: usize,
    }

    impl TestOutbox {
        pub(crate) fn with_capacity(capacity: usize) -> Self {
            Self(Arc::new(Mutex::new(Inner {
                frames: Vec::new(),
                capacity,
            })))
        }

        /// Takes every frame received so far, as text.
        pub(crate) fn take(&self) -> Vec<String> {
            let mut inner = self.0.lock().unwrap();
            inner
                .frames
                .drain(..)
                .map(|f| String::from_utf8(f.to_vec()).unwrap())
                .collect()
        }

        /// Whether the directory has dropped its handle (the connection was detached or replaced).
        pub(crate) fn dropped_by_directory(&self) -> bool {
            Arc::strong_count(&self.0) == 1
        }
    }

    impl Outbox for TestOutbox {
        fn try_push(&self, frame: Bytes) -> Result<(), PushError> {
            let mut inner = self.0.lock().unwrap();
            if inner.frames.len() >= inner.capacity {
                return Err(PushError::Full(frame));
            }
            inner.frames.push(frame);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::test_outbox::TestOutbox;
    use super::*;

    fn directory(limits: SignalingLimits) -> MemoryDirectory<TestOutbox> {
        MemoryDirectory::new(&limits)
    }

    fn hello(id: ClientId, _: &ResumeToken) -> Bytes {
        Bytes::from(format!("hello {id}"))
    }

    fn register(dir: &MemoryDirectory<TestOutbox>) -> (Binding, TestOutbox) {
        let outbox = TestOutbox::with_capacity(1000);
        let binding = dir.register(outbox.clone(), Instant::now(), hello).unwrap();
        (binding, outbox)
    }

    #[test]
    fn ids_have_the_configured_digits_are_unique_and_not_sequential() {
        for digits in [6u8, 9, 12, 15] {
            let dir = directory(SignalingLimits {
                id_digits: digits,
                ..SignalingLimits::default()
            });
            let mut seen = HashSet::new();
            let mut ids = Vec::new();
            for _ in 0..2000 {
                let (binding, outbox) = register(&dir);
                let id = binding.id.get();
                assert_eq!(id.to_string().len(), usize::from(digits), "{id}");
                assert!(seen.insert(id), "{id} issued twice");
                assert_eq!(outbox.take(), [format!("hello {id}")]);
                ids.push(id);
            }
            let sequential = ids.windows(2).filter(|w| w[1] == w[0] + 1).count();
            assert!(sequential < 3, "{sequential} sequential pairs");
            assert_eq!(dir.len(), 2000);
        }
    }

    #[test]
    fn a_crowded_id_space_is_refused_rather_than_reused() {
        let dir = directory(SignalingLimits {
            id_digits: 6,
            max_clients: 10,
            ..SignalingLimits::default()
        });
        let held: Vec<_> = (0..10).map(|_| register(&dir)).collect();
        let refused = dir.register(TestOutbox::with_capacity(8), Instant::now(), hello);
        assert_eq!(refused.unwrap_err(), RegisterError::Full);
        assert_eq!(dir.len(), 10);
        dir.release(held[0].0).unwrap();
        register(&dir);
        assert_eq!(dir.len(), 10);
    }

    #[test]
    fn connect_detach_expire_cycles_leave_nothing_behind() {
        let limits = SignalingLimits::default();
        let dir = directory(limits.clone());
        let start = Instant::now();
        let mut expired = Vec::new();
        for round in 0..20u32 {
            let now = start + limits.resume_grace * round * 2;
            let bindings: Vec<_> = (0..200).map(|_| register(&dir)).collect();
            for (i, (binding, _)) in bindings.iter().enumerate() {
                if i % 2 == 0 {
                    assert!(dir.detach(*binding, now));
                    // Messages queued for the reservation are dropped with it.
                    assert_eq!(
                        dir.deliver(binding.id, Bytes::from_static(b"late"), now),
                        Delivery::Queued
                    );
                } else {
                    dir.release(*binding).unwrap();
                }
            }
            assert_eq!(dir.len(), 100);
            assert!(dir.queued_bytes() > 0);
            let next = dir.expire(now, &mut expired);
            assert_eq!(next, Some(now + limits.resume_grace));
            assert_eq!(dir.expire(now + limits.resume_grace, &mut expired), None);
        }
        assert_eq!(expired.len(), 20 * 100);
        assert!(dir.is_empty());
        assert_eq!(dir.queued_bytes(), 0);
        assert_eq!(dir.pending_deadlines(), 0);
        assert!(dir.shards.iter().all(|s| s.lock().unwrap().is_empty()));
    }

    #[test]
    fn reservation_queues_are_bounded_by_count_and_bytes() {
        let limits = SignalingLimits {
            resume_queue_messages: 4,
            resume_queue_bytes: 100,
            ..SignalingLimits::default()
        };
        let dir = directory(limits);
        let now = Instant::now();
        let (a, _) = register(&dir);
        dir.detach(a, now);
        for _ in 0..4 {
            assert_eq!(
                dir.deliver(a.id, Bytes::from_static(b"x"), now),
                Delivery::Queued
            );
        }
        assert_eq!(
            dir.deliver(a.id, Bytes::from_static(b"x"), now),
            Delivery::Overflowed
        );
        let mut expired = Vec::new();
        dir.expire(now, &mut expired);
        assert_eq!(
            expired,
            [Expired {
                id: a.id,
                peer: None
            }]
        );

        let (b, _) = register(&dir);
        dir.detach(b, now);
        let big = Bytes::from(vec![b'y'; 101]);
        assert_eq!(dir.deliver(b.id, big, now), Delivery::Overflowed);
        assert_eq!(dir.queued_bytes(), 0);
    }

    #[test]
    fn the_global_queue_budget_holds_across_reservations() {
        let dir = directory(SignalingLimits {
            resume_queue_bytes_total: 1000,
            ..SignalingLimits::default()
        });
        let now = Instant::now();
        let mut queued = 0;
        for _ in 0..20 {
            let (b, _) = register(&dir);
            dir.detach(b, now);
            if dir.deliver(b.id, Bytes::from(vec![0; 300]), now) == Delivery::Queued {
                queued += 1;
            }
        }
        assert_eq!(queued, 3);
        assert!(dir.queued_bytes() <= 1000);
    }

    #[test]
    fn a_full_outbox_detaches_and_keeps_the_frame() {
        let dir = directory(SignalingLimits::default());
        let now = Instant::now();
        let outbox = TestOutbox::with_capacity(1); // only room for the `id` message
        let a = dir.register(outbox.clone(), now, hello).unwrap();
        assert!(!outbox.dropped_by_directory());
        assert_eq!(
            dir.deliver(a.id, Bytes::from_static(b"one"), now),
            Delivery::Detached
        );
        assert!(outbox.dropped_by_directory());
        assert_eq!(dir.call_state(a), Err(Stale));
        assert_eq!(
            dir.deliver(a.id, Bytes::from_static(b"two"), now),
            Delivery::Queued
        );
        assert_eq!(dir.queued_bytes(), 6);
        assert!(!dir.detach(a, now), "already detached");
    }

    #[test]
    fn two_ids_in_one_shard_pair_and_part_cleanly() {
        let dir = directory(SignalingLimits::default());
        let mut by_shard: HashMap<usize, (Binding, TestOutbox)> = HashMap::new();
        let (a, b) = loop {
            let (binding, outbox) = register(&dir);
            if let Some((other, _)) = by_shard.get(&shard_of(binding.id)) {
                break (*other, binding);
            }
            by_shard.insert(shard_of(binding.id), (binding, outbox));
        };
        dir.update_call(a, b.id, |_, theirs| {
            assert_eq!(theirs, Some(CallState::Idle));
            Ok::<_, Stale>(CallState::Calling { peer: b.id })
        })
        .unwrap();
        assert_eq!(dir.call_state(b), Ok(CallState::Called { peer: a.id }));
        assert_eq!(dir.release(b), Ok(Some(a.id)));
        assert_eq!(dir.call_state(a), Ok(CallState::Idle));
        assert_eq!(
            dir.deliver(b.id, Bytes::new(), Instant::now()),
            Delivery::NoSuchClient
        );
    }

    #[test]
    fn call_states_stay_symmetric() {
        let dir = directory(SignalingLimits::default());
        let (a, _) = register(&dir);
        let (b, _) = register(&dir);
        let begin = |mine: CallState, theirs: Option<CallState>| -> Result<CallState, Stale> {
            assert_eq!(mine, CallState::Idle);
            assert_eq!(theirs, Some(CallState::Idle));
            Ok(CallState::Calling { peer: b.id })
        };
        dir.update_call(a, b.id, begin).unwrap();
        assert_eq!(dir.call_state(b), Ok(CallState::Called { peer: a.id }));
        dir.update_call(b, a.id, |_, _| {
            Ok::<_, Stale>(CallState::InCall { peer: a.id })
        })
        .unwrap();
        assert_eq!(dir.call_state(a), Ok(CallState::InCall { peer: b.id }));
        dir.update_call(a, b.id, |_, _| Ok::<_, Stale>(CallState::Idle))
            .unwrap();
        assert_eq!(dir.call_state(a), Ok(CallState::Idle));
        assert_eq!(dir.call_state(b), Ok(CallState::Idle));
    }
}
