//! Where each client ID lives: a live connection's outbox or a reservation waiting for a resume, plus
//! the ID's resume token, call state and delivery log. This module owns that table and its
//! atomicity; it never decides what a message means (that is `hub`) and never touches a socket.
//!
//! [`Directory`] is the seam for running several callgate instances: [`MemoryDirectory`] keeps the
//! table in this process; a Redis-backed one can implement the same few operations (each is one
//! atomic step on at most two IDs) and deliver to connections on other instances through pub/sub,
//! without the hub or the session layer changing.
//!
//! Every map and queue here is bounded: IDs by [`SignalingLimits::max_clients`] (a live client
//! that needs room ends the oldest reservation), reservations per client address by
//! [`SignalingLimits::reservations_per_ip`], each ID's held messages by count and bytes
//! ([`super::delivery`]), all of them together by a global byte budget, and the deadline heap by
//! the number of reservations made within one grace period.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::Rng as _;

use super::delivery::{AckBeyond, Envelope, HoldLimits, Log, Origin, Replay};
use super::protocol::{ClientId, DropReason, ResumeToken};
use super::SignalingLimits;
use crate::limits::IpKey;

/// One live connection's outbound queue, as the hub sees it.
///
/// Pushing must never block: a full queue means a slow reader, and the directory answers it by
/// dropping the outbox (so the connection's writer sees its channel close and hangs up) and keeping
/// the ID reserved for a resume. The directory holds the only long-lived handle to a connection's
/// outbox; the session layer must not keep a clone of the sending side, or it will not notice.
pub trait Outbox: Send + 'static {
    /// Queues one ready-to-send text frame, or hands it back if the queue is full or closed.
    fn try_push(&self, frame: Bytes) -> Result<(), PushError>;

    /// Takes back every frame the connection has not taken yet, oldest first: called when the
    /// connection is detached, so what was never written can wait for the resume instead of being
    /// lost. The default takes nothing.
    fn take_unsent(&self) -> Vec<Bytes> {
        Vec::new()
    }
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

/// What the directory needs to know about a connection that joins.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Joining {
    /// The client's address (IPv6 by /64), for the cap on reservations per address; `None` when
    /// unknown (tests, benches), which no cap applies to.
    pub address: Option<IpKey>,
    /// The client opted in to sequence numbers and acknowledgements (`?seq=1`): its messages carry
    /// `seq` and are held until it acknowledges them.
    pub acks: bool,
}

pub use super::registry::{Binding, CallState, RegisterError, ResumeError, Stale};

/// Why an acknowledgement was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AckError {
    /// The connection no longer holds its ID.
    #[error(transparent)]
    Stale(#[from] Stale),
    /// It acknowledged a number never sent.
    #[error(transparent)]
    Beyond(#[from] AckBeyond),
}

/// A successful resume.
#[derive(Debug)]
pub struct Resumed<O> {
    /// The connection's new binding (the resumed ID, with a new epoch).
    pub binding: Binding,
    /// The outbox of a connection that still held the ID (a half-open socket the client gave up
    /// on); it no longer receives anything and should be told and dropped.
    pub replaced: Option<O>,
    /// How many held messages were replayed after the `id` message.
    pub delivered: usize,
    /// The sequence numbers dropped for the ID since its last resume, told in the `id` message.
    pub missed: Option<(u64, u64)>,
    /// The resuming connection's own outbox overflowed while taking the replay; it has been
    /// detached again (what was not replayed stays held).
    pub overflowed: bool,
    /// The call the ID is in, carried over.
    pub call: CallState,
}

/// What happened to a message handed to [`Directory::deliver`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub enum Delivery {
    /// Queued on the live connection's outbox (and, for a client that acknowledges, held until
    /// it does).
    Sent,
    /// The ID is reserved; the message is held for a resume.
    Queued,
    /// The live connection's outbox was full or closed: it was detached (its outbox dropped) and
    /// the ID reserved, with this message held for the resume.
    Detached,
    /// The message could not be held and is dropped; its sender must be told. `detached` says
    /// whether the live connection was detached for it (a client whose unacknowledged messages
    /// filled its budget, or a slow reader whose reservation had no room left).
    Dropped {
        /// Why.
        reason: DropReason,
        /// Whether a live connection was detached.
        detached: bool,
    },
    /// Nobody holds this ID.
    NoSuchClient,
}

/// An ID that went away for good: its reservation ended, it left, or it was ended to make room.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expired {
    /// The freed ID.
    pub id: ClientId,
    /// The call peer whose call state was reset and who must be told.
    pub peer: Option<ClientId>,
    /// The senders (and message types) of the messages still held for it, never delivered.
    pub lost: Vec<Origin>,
}

/// The routing table, ID reservations, resume tokens, call states and delivery logs, behind
/// operations that are each atomic on at most two IDs.
///
/// Implementations must keep these invariants: IDs are unique among live and reserved entries; call
/// states are symmetric (see [`CallState`]); an ID's messages are numbered and delivered in the
/// order they were given to it, without duplicates; every operation is non-blocking apart from
/// short internal locks.
pub trait Directory: Send + Sync {
    /// A live connection's outbound queue.
    type Outbox: Outbox;

    /// Gives a new connection a fresh random ID and token, and pushes `hello(id, token)` (the `id`
    /// message) as its first frame before anyone can send to it. When every ID is taken, the
    /// oldest reservation is ended to make room and appended to `evicted` (its peer and senders
    /// must be told).
    fn register(
        &self,
        outbox: Self::Outbox,
        joining: Joining,
        now: Instant,
        hello: impl FnOnce(ClientId, &ResumeToken) -> Bytes,
        evicted: &mut Vec<Expired>,
    ) -> Result<Binding, RegisterError>;

    /// Moves `target` to the connection holding `current`, if `token` is `target`'s token and
    /// `current` is idle. `current`'s own ID is freed, `target` gets a new token and epoch, and the
    /// connection receives `hello(target, new_token, missed)` followed by every held message after
    /// `last_seq` (or, without it, every message not yet handed to a connection), in order. A live
    /// holder of `target` is replaced.
    #[allow(clippy::too_many_arguments)]
    fn resume(
        &self,
        current: Binding,
        target: ClientId,
        token: &ResumeToken,
        last_seq: Option<u64>,
        now: Instant,
        hello: impl FnOnce(ClientId, &ResumeToken, Option<(u64, u64)>) -> Bytes,
    ) -> Result<Resumed<Self::Outbox>, ResumeError>;

    /// The connection dropped: its outbox is released and the ID is reserved until
    /// `now + resume_grace`, keeping its call and held messages. If its address already holds
    /// [`SignalingLimits::reservations_per_ip`] reservations, the ID is freed at once instead and
    /// returned (its peer and senders must be told).
    fn detach(&self, binding: Binding, now: Instant) -> Result<Option<Expired>, Stale>;

    /// The connection left for good: the ID is freed now and its call peer reset to idle.
    fn release(&self, binding: Binding) -> Result<Expired, Stale>;

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

    /// Numbers `message` and queues it for whoever holds `to`, live or reserved. Never blocks.
    fn deliver(&self, to: ClientId, message: Envelope, now: Instant) -> Delivery;

    /// Queues `message` for the connection itself (replies and errors), if it still holds its ID.
    fn reply(&self, binding: Binding, message: Envelope, now: Instant) -> Result<Delivery, Stale>;

    /// The connection processed every message up to `seq`: what is held up to it is freed.
    fn ack(&self, binding: Binding, seq: u64) -> Result<(), AckError>;

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
    /// Bytes held in all delivery logs together, checked against the global budget.
    held_bytes: AtomicUsize,
    /// Reservations per client address. Locked after a shard lock, never before one.
    reserved_per_ip: Mutex<HashMap<IpKey, usize>>,
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
    /// How long a reservation lasts.
    grace: Duration,
    /// What one ID and all IDs together may hold.
    hold: HoldLimits,
    /// Most IDs, live and reserved.
    max_clients: usize,
    /// Most reservations per client address.
    reservations_per_ip: usize,
}

/// One lock's worth of the table.
type Shard<O> = HashMap<ClientId, Slot<O>>;

/// A reservation's deadline, tagged with the epoch it was made for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Deadline {
    /// When it is due.
    at: Instant,
    /// The reserved ID.
    id: ClientId,
    /// The holder it was made for; a resume or a new reservation makes this entry stale.
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
    /// Sequence numbers and held messages.
    log: Log,
    /// Whether the latest connection acknowledges (its messages carry `seq` and are held).
    acks: bool,
    /// The latest connection's address, for the per-address reservation cap.
    address: Option<IpKey>,
}

/// Whether a connection holds the ID.
enum Presence<O> {
    /// A connection is attached and reading.
    Live(O),
    /// No connection; waiting for a resume until `until`.
    Reserved {
        /// When the ID is freed if nobody resumes it.
        until: Instant,
    },
    /// Being removed by the operation holding the lock (a resume takes the outbox first).
    Leaving,
}

/// What [`Slot::deliver`] needs from the directory.
struct Shared<'a> {
    /// The directory's limits.
    limits: &'a DirectoryLimits,
    /// Bytes held over all IDs.
    held_bytes: &'a AtomicUsize,
    /// Reservations per client address.
    reserved_per_ip: &'a Mutex<HashMap<IpKey, usize>>,
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
                hold: HoldLimits {
                    messages: limits.resume_queue_messages,
                    bytes: limits.resume_queue_bytes,
                    bytes_total: limits.resume_queue_bytes_total,
                },
                max_clients: limits.max_clients,
                reservations_per_ip: limits.reservations_per_ip,
            },
            clients: AtomicUsize::new(0),
            held_bytes: AtomicUsize::new(0),
            reserved_per_ip: Mutex::new(HashMap::new()),
            next_epoch: AtomicU64::new(1),
        }
    }

    /// Bytes currently held for all IDs (for metrics and tests).
    pub fn held_bytes(&self) -> usize {
        self.held_bytes.load(Ordering::Relaxed)
    }

    /// Reservation deadlines still tracked, including stale ones (for tests of boundedness).
    pub fn pending_deadlines(&self) -> usize {
        lock(&self.deadlines).len()
    }

    /// Addresses that hold reservations (for tests of boundedness).
    pub fn reserving_addresses(&self) -> usize {
        lock(&self.reserved_per_ip).len()
    }

    fn shard(&self, id: ClientId) -> MutexGuard<'_, Shard<O>> {
        lock(&self.shards[shard_of(id)])
    }

    fn shared(&self) -> Shared<'_> {
        Shared {
            limits: &self.limits,
            held_bytes: &self.held_bytes,
            reserved_per_ip: &self.reserved_per_ip,
        }
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
    /// If `f` returns true in its second value, `a`'s slot is removed before the locks are released
    /// and accounted for; what it held is returned with `f`'s result.
    fn with_two<R>(
        &self,
        a: ClientId,
        b: ClientId,
        f: impl FnOnce(Option<&mut Slot<O>>, Option<&mut Slot<O>>) -> (R, bool),
    ) -> (R, Option<Vec<Origin>>) {
        debug_assert_ne!(a, b);
        let (ia, ib) = (shard_of(a), shard_of(b));
        let (result, removed) = if ia == ib {
            let mut shard = lock(&self.shards[ia]);
            // Two `&mut` into one map: lift `b` out for the duration (rare: 1 pair in SHARDS).
            let mut sb = shard.remove(&b);
            let (result, remove_a) = f(shard.get_mut(&a), sb.as_mut());
            if let Some(sb) = sb {
                shard.insert(b, sb);
            }
            let removed = remove_a.then(|| shard.remove(&a)).flatten();
            let lost = removed.map(|slot| self.forget(slot));
            (result, lost)
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
            let lost = removed.map(|slot| self.forget(slot));
            (result, lost)
        };
        (result, removed)
    }

    /// Accounts for a slot that left the table (called under its shard lock): the client count,
    /// its reservation, its held bytes. Returns the senders of what it still held.
    fn forget(&self, mut slot: Slot<O>) -> Vec<Origin> {
        self.clients.fetch_sub(1, Ordering::Relaxed);
        if let Presence::Reserved { .. } = slot.presence {
            self.shared().unreserve(slot.address);
        }
        slot.log.discard(&self.held_bytes)
    }

    /// Removes `id` if `pred` holds for its slot, resetting its call peer. Returns `None` if `pred`
    /// failed, else the ID's departure.
    fn remove_if(&self, id: ClientId, pred: impl Fn(&Slot<O>) -> bool) -> Option<Expired> {
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
                let peer = slot.call.peer();
                debug_assert!(peer.is_none(), "a call began with a reserved or leaving ID");
                let lost = self.forget(slot);
                Some(Expired { id, peer, lost })
            }
            Some(peer) => {
                let (reset, lost) = self.with_two(id, peer, |slot, peer_slot| {
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
                });
                Some(Expired {
                    id,
                    peer: reset?,
                    lost: lost.unwrap_or_default(),
                })
            }
        }
    }

    /// Ends the oldest reservation to make room for a live client. Returns false if there is none.
    fn evict_oldest(&self, evicted: &mut Vec<Expired>) -> bool {
        loop {
            let Some(Reverse(oldest)) = lock(&self.deadlines).pop() else {
                return false;
            };
            let ended = self.remove_if(oldest.id, |s| {
                s.epoch == oldest.epoch && matches!(s.presence, Presence::Reserved { .. })
            });
            if let Some(ended) = ended {
                evicted.push(ended);
                return true;
            }
        }
    }
}

impl Shared<'_> {
    /// Counts a reservation for `address`; with `enforce`, refuses it (false) if the address holds
    /// its share already.
    fn reserve(&self, address: Option<IpKey>, enforce: bool) -> bool {
        let Some(address) = address else {
            return true;
        };
        let mut per_ip = lock(self.reserved_per_ip);
        let held = per_ip.entry(address).or_insert(0);
        if enforce && *held >= self.limits.reservations_per_ip {
            return false;
        }
        *held += 1;
        true
    }

    /// A reservation for `address` ended.
    fn unreserve(&self, address: Option<IpKey>) {
        let Some(address) = address else { return };
        let mut per_ip = lock(self.reserved_per_ip);
        if let Some(held) = per_ip.get_mut(&address) {
            *held -= 1;
            if *held == 0 {
                per_ip.remove(&address);
            }
        }
    }
}

impl<O: Outbox> Slot<O> {
    fn is_live(&self, epoch: u64) -> bool {
        self.epoch == epoch && matches!(self.presence, Presence::Live(_))
    }

    /// Turns a live slot into a reservation (the outbox is dropped with the old presence) and
    /// returns its deadline. With `enforce`, refuses (`None`) if its address holds its share.
    fn reserve(
        &mut self,
        now: Instant,
        shared: &Shared<'_>,
        id: ClientId,
        enforce: bool,
    ) -> Option<Deadline> {
        if !shared.reserve(self.address, enforce) {
            return None;
        }
        if let Presence::Live(outbox) = &self.presence {
            // Frames never written wait for the resume. A client that acknowledges holds them
            // already; for one that does not, they go back into its log under their numbers.
            let unsent = outbox.take_unsent();
            if !self.acks {
                self.log
                    .requeue_unsent(unsent, shared.limits.hold, shared.held_bytes);
            }
        }
        let until = now + shared.limits.grace;
        self.presence = Presence::Reserved { until };
        Some(Deadline {
            at: until,
            id,
            epoch: self.epoch,
        })
    }

    /// Numbers `message` and pushes it to the live outbox or holds it; see [`Delivery`]. Returns a
    /// deadline to schedule when the slot became a reservation.
    fn deliver(
        &mut self,
        message: Envelope,
        now: Instant,
        shared: &Shared<'_>,
        id: ClientId,
    ) -> (Delivery, Option<Deadline>) {
        let seq = self.log.next_seq();
        let origin = message.origin();
        let frame = message.seal(self.acks.then_some(seq));
        let hold = shared.limits.hold;
        match &self.presence {
            Presence::Live(outbox) => {
                if self.acks {
                    if let Err(reason) =
                        self.log
                            .hold(seq, frame.clone(), origin, hold, shared.held_bytes, true)
                    {
                        // Its unacknowledged messages fill its budget: it does not keep up.
                        let deadline = self.reserve(now, shared, id, false);
                        let dropped = Delivery::Dropped {
                            reason,
                            detached: true,
                        };
                        return (dropped, deadline);
                    }
                }
                match outbox.try_push(frame) {
                    Ok(()) => {
                        self.log.sent(seq);
                        (Delivery::Sent, None)
                    }
                    Err(e) => {
                        let deadline = self.reserve(now, shared, id, false);
                        if !self.acks {
                            // The frame that did not fit is kept, so a resume gets it.
                            let held = self.log.hold(
                                seq,
                                e.into_frame(),
                                origin,
                                hold,
                                shared.held_bytes,
                                false,
                            );
                            if let Err(reason) = held {
                                let dropped = Delivery::Dropped {
                                    reason,
                                    detached: true,
                                };
                                return (dropped, deadline);
                            }
                        }
                        (Delivery::Detached, deadline)
                    }
                }
            }
            Presence::Reserved { until } if *until > now => {
                match self
                    .log
                    .hold(seq, frame, origin, hold, shared.held_bytes, false)
                {
                    Ok(()) => (Delivery::Queued, None),
                    Err(reason) => (
                        Delivery::Dropped {
                            reason,
                            detached: false,
                        },
                        None,
                    ),
                }
            }
            // Due (the expiry task has not run yet) or being removed: it will not come back.
            Presence::Reserved { .. } | Presence::Leaving => (
                Delivery::Dropped {
                    reason: DropReason::RecipientGone,
                    detached: false,
                },
                None,
            ),
        }
    }
}

impl<O: Outbox> Directory for MemoryDirectory<O> {
    type Outbox = O;

    fn register(
        &self,
        outbox: O,
        joining: Joining,
        _now: Instant,
        hello: impl FnOnce(ClientId, &ResumeToken) -> Bytes,
        evicted: &mut Vec<Expired>,
    ) -> Result<Binding, RegisterError> {
        // Reservations never lock a live client out: when every ID is taken, the oldest
        // reservation makes room (a few tries, in case other connections take the room first).
        let mut tries = 0;
        while self.clients.fetch_add(1, Ordering::Relaxed) >= self.limits.max_clients {
            self.clients.fetch_sub(1, Ordering::Relaxed);
            tries += 1;
            if tries > 4 || !self.evict_oldest(evicted) {
                return Err(RegisterError::Full);
            }
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
                log: Log::default(),
                acks: joining.acks,
                address: joining.address,
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
        last_seq: Option<u64>,
        now: Instant,
        hello: impl FnOnce(ClientId, &ResumeToken, Option<(u64, u64)>) -> Bytes,
    ) -> Result<Resumed<O>, ResumeError> {
        if current.id == target {
            // Holding the ID already; nothing to take back. Checked for liveness only.
            self.call_state(current)?;
            return Err(ResumeError::Unknown);
        }
        let new_token = ResumeToken::random(&mut rand::rng());
        let epoch = self.epoch();
        let shared = self.shared();
        let ((result, deadline), _) = self.with_two(current.id, target, |cur, tgt| {
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
            let Presence::Live(outbox) = std::mem::replace(&mut cur.presence, Presence::Leaving)
            else {
                unreachable!("checked live above");
            };
            tgt.token = new_token;
            tgt.epoch = epoch;
            let replaced = match std::mem::replace(&mut tgt.presence, Presence::Live(outbox)) {
                Presence::Live(old) => Some(old),
                Presence::Reserved { .. } => {
                    shared.unreserve(tgt.address);
                    None
                }
                Presence::Leaving => unreachable!("only inside an operation"),
            };
            tgt.address = cur.address;
            tgt.acks = cur.acks;
            let Replay {
                frames: replay,
                missed,
            } = tgt.log.resume(last_seq, shared.held_bytes);
            let hello = hello(target, &tgt.token, missed);
            let Presence::Live(outbox) = &tgt.presence else {
                unreachable!("just attached");
            };
            let mut overflowed = outbox.try_push(hello).is_err();
            let mut delivered = 0;
            let mut sent_through = None;
            for (seq, frame) in replay {
                if overflowed || outbox.try_push(frame).is_err() {
                    overflowed = true;
                    break;
                }
                delivered += 1;
                sent_through = Some(seq);
            }
            if let Some(seq) = sent_through {
                tgt.log.sent(seq);
                if !tgt.acks {
                    // A client that does not acknowledge is not replayed anything twice.
                    tgt.log.release_through(seq, shared.held_bytes);
                }
            }
            let deadline = overflowed
                .then(|| tgt.reserve(now, &shared, target, false))
                .flatten();
            let resumed = Resumed {
                binding: Binding { id: target, epoch },
                replaced,
                delivered,
                missed,
                overflowed,
                call: tgt.call,
            };
            ((Ok(resumed), deadline), true)
        });
        self.schedule(deadline);
        result
    }

    fn detach(&self, binding: Binding, now: Instant) -> Result<Option<Expired>, Stale> {
        let shared = self.shared();
        let reserved = {
            let mut shard = self.shard(binding.id);
            let slot = shard
                .get_mut(&binding.id)
                .filter(|s| s.is_live(binding.epoch))
                .ok_or(Stale)?;
            slot.reserve(now, &shared, binding.id, true)
        };
        match reserved {
            Some(deadline) => {
                self.schedule(Some(deadline));
                Ok(None)
            }
            // Its address holds its share of reservations: the ID is freed as if it had left.
            None => Ok(self.remove_if(binding.id, |s| s.is_live(binding.epoch))),
        }
    }

    fn release(&self, binding: Binding) -> Result<Expired, Stale> {
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
                    && matches!(s.presence, Presence::Reserved { until } if until <= now)
            });
            if let Some(ended) = ended {
                expired.push(ended);
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
        let (result, _) = self.with_two(me, peer, |mine, theirs| {
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
        });
        result
    }

    fn deliver(&self, to: ClientId, message: Envelope, now: Instant) -> Delivery {
        let (delivery, deadline) = {
            let mut shard = self.shard(to);
            match shard.get_mut(&to) {
                Some(slot) => slot.deliver(message, now, &self.shared(), to),
                None => (Delivery::NoSuchClient, None),
            }
        };
        self.schedule(deadline);
        delivery
    }

    fn reply(&self, binding: Binding, message: Envelope, now: Instant) -> Result<Delivery, Stale> {
        let (delivery, deadline) = {
            let mut shard = self.shard(binding.id);
            let slot = shard
                .get_mut(&binding.id)
                .filter(|s| s.is_live(binding.epoch))
                .ok_or(Stale)?;
            slot.deliver(message, now, &self.shared(), binding.id)
        };
        self.schedule(deadline);
        Ok(delivery)
    }

    fn ack(&self, binding: Binding, seq: u64) -> Result<(), AckError> {
        let mut shard = self.shard(binding.id);
        let slot = shard
            .get_mut(&binding.id)
            .filter(|s| s.is_live(binding.epoch))
            .ok_or(Stale)?;
        slot.log.ack(seq, &self.held_bytes)?;
        Ok(())
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
    use crate::signaling::protocol::MessageKind;

    fn directory(limits: SignalingLimits) -> MemoryDirectory<TestOutbox> {
        MemoryDirectory::new(&limits)
    }

    fn hello(id: ClientId, _: &ResumeToken) -> Bytes {
        Bytes::from(format!("hello {id}"))
    }

    fn join(
        dir: &MemoryDirectory<TestOutbox>,
        joining: Joining,
        capacity: usize,
    ) -> Result<(Binding, TestOutbox), RegisterError> {
        let outbox = TestOutbox::with_capacity(capacity);
        let mut evicted = Vec::new();
        let binding = dir.register(outbox.clone(), joining, Instant::now(), hello, &mut evicted)?;
        assert!(evicted.is_empty(), "{evicted:?}");
        Ok((binding, outbox))
    }

    fn register(dir: &MemoryDirectory<TestOutbox>) -> (Binding, TestOutbox) {
        join(dir, Joining::default(), 1000).unwrap()
    }

    /// A relayed message of `len` bytes of JSON from `from`.
    fn message(from: Binding, len: usize) -> Envelope {
        let mut json = format!(r#"{{"x":"{}"}}"#, "y".repeat(len.saturating_sub(8))).into_bytes();
        json.reserve(crate::signaling::protocol::SEQ_ROOM);
        let origin = Origin {
            from: from.id,
            kind: MessageKind::IceCandidate,
        };
        Envelope::relaying(json, origin)
    }

    fn notice() -> Envelope {
        Envelope::new(br#"{"type":"pong"}"#.to_vec())
    }

    fn resume_hello(id: ClientId, _: &ResumeToken, missed: Option<(u64, u64)>) -> Bytes {
        Bytes::from(format!("resumed {id} missed {missed:?}"))
    }

    fn address(last: u8) -> Option<IpKey> {
        Some(IpKey::of(std::net::IpAddr::from([192, 0, 2, last])))
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
    fn a_full_directory_of_live_clients_refuses_and_frees_room_on_release() {
        let dir = directory(SignalingLimits {
            id_digits: 6,
            max_clients: 10,
            ..SignalingLimits::default()
        });
        let held: Vec<_> = (0..10).map(|_| register(&dir)).collect();
        let refused = join(&dir, Joining::default(), 8);
        assert_eq!(refused.err(), Some(RegisterError::Full));
        assert_eq!(dir.len(), 10);
        dir.release(held[0].0).unwrap();
        register(&dir);
        assert_eq!(dir.len(), 10);
    }

    #[test]
    fn reservations_never_lock_out_a_live_client_the_oldest_makes_room() {
        let dir = directory(SignalingLimits {
            max_clients: 4,
            ..SignalingLimits::default()
        });
        let start = Instant::now();
        let (sender, _) = register(&dir);
        let dropped: Vec<_> = (0..3).map(|_| register(&dir).0).collect();
        for (n, binding) in dropped.iter().enumerate() {
            dir.detach(*binding, start + Duration::from_secs(n as u64))
                .unwrap();
        }
        // The oldest reservation holds a message from `sender`.
        assert_eq!(
            dir.deliver(dropped[0].id, message(sender, 50), start),
            Delivery::Queued
        );
        let mut evicted = Vec::new();
        let outbox = TestOutbox::with_capacity(8);
        dir.register(outbox, Joining::default(), start, hello, &mut evicted)
            .expect("room made");
        assert_eq!(evicted.len(), 1);
        assert_eq!(evicted[0].id, dropped[0].id, "the oldest reservation");
        assert_eq!(evicted[0].lost.len(), 1, "its sender is to be told");
        assert_eq!(evicted[0].lost[0].from, sender.id);
        assert_eq!(dir.len(), 4);
        assert_eq!(dir.held_bytes(), 0);
    }

    #[test]
    fn reservations_per_address_are_capped() {
        let dir = directory(SignalingLimits {
            reservations_per_ip: 2,
            ..SignalingLimits::default()
        });
        let now = Instant::now();
        let mut freed = 0;
        for _ in 0..5 {
            let joining = Joining {
                address: address(7),
                acks: false,
            };
            let (binding, _) = join(&dir, joining, 8).unwrap();
            if dir.detach(binding, now).unwrap().is_some() {
                freed += 1;
            }
        }
        assert_eq!(freed, 3, "beyond two, a dropped ID is freed at once");
        assert_eq!(dir.len(), 2);
        // Another address is not affected.
        let (other, _) = join(
            &dir,
            Joining {
                address: address(8),
                acks: false,
            },
            8,
        )
        .unwrap();
        assert_eq!(dir.detach(other, now), Ok(None));
        // Expiry gives the share back.
        let mut expired = Vec::new();
        dir.expire(now + Duration::from_secs(3600), &mut expired);
        assert_eq!(expired.len(), 3);
        assert_eq!(dir.reserving_addresses(), 0);
    }

    #[test]
    fn connect_detach_expire_cycles_leave_nothing_behind() {
        let limits = SignalingLimits::default();
        let dir = directory(limits.clone());
        let start = Instant::now();
        let mut expired = Vec::new();
        let (sender, _) = register(&dir);
        for round in 0..20u32 {
            let now = start + limits.resume_grace * round * 2;
            let bindings: Vec<_> = (0..200).map(|_| register(&dir)).collect();
            for (i, (binding, _)) in bindings.iter().enumerate() {
                if i % 2 == 0 {
                    assert_eq!(dir.detach(*binding, now), Ok(None));
                    // Messages held for the reservation are reported when it ends.
                    assert_eq!(
                        dir.deliver(binding.id, message(sender, 20), now),
                        Delivery::Queued
                    );
                } else {
                    dir.release(*binding).unwrap();
                }
            }
            assert_eq!(dir.len(), 101);
            assert!(dir.held_bytes() > 0);
            let next = dir.expire(now, &mut expired);
            assert_eq!(next, Some(now + limits.resume_grace));
            assert_eq!(dir.expire(now + limits.resume_grace, &mut expired), None);
        }
        assert_eq!(expired.len(), 20 * 100);
        assert!(expired.iter().all(|e| e.lost.len() == 1));
        dir.release(sender).unwrap();
        assert!(dir.is_empty());
        assert_eq!(dir.held_bytes(), 0);
        assert_eq!(dir.pending_deadlines(), 0);
        assert_eq!(dir.reserving_addresses(), 0);
        assert!(dir.shards.iter().all(|s| s.lock().unwrap().is_empty()));
    }

    #[test]
    fn over_its_budget_a_reservation_drops_and_the_resume_reports_the_range() {
        let limits = SignalingLimits {
            resume_queue_messages: 4,
            resume_queue_bytes: 100,
            ..SignalingLimits::default()
        };
        let dir = directory(limits);
        let now = Instant::now();
        let (sender, _) = register(&dir);
        let (a, _) = register(&dir);
        dir.detach(a, now).unwrap();
        for _ in 0..4 {
            assert_eq!(
                dir.deliver(a.id, message(sender, 10), now),
                Delivery::Queued
            );
        }
        for _ in 0..2 {
            assert_eq!(
                dir.deliver(a.id, message(sender, 10), now),
                Delivery::Dropped {
                    reason: DropReason::QueueFull,
                    detached: false
                }
            );
        }
        // The reservation lives on; its owner gets the four and learns it missed 5 and 6.
        let (fresh, outbox) = register(&dir);
        outbox.take();
        let token = {
            let shard = dir.shard(a.id);
            shard[&a.id].token.clone()
        };
        let resumed = dir
            .resume(fresh, a.id, &token, None, now, resume_hello)
            .unwrap();
        assert_eq!((resumed.delivered, resumed.missed), (4, Some((5, 6))));
        let frames = outbox.take();
        assert_eq!(frames[0], format!("resumed {} missed Some((5, 6))", a.id));
        assert_eq!(frames.len(), 5);
        assert_eq!(
            dir.held_bytes(),
            0,
            "a client that does not ack holds nothing once sent"
        );
    }

    #[test]
    fn the_global_budget_holds_across_reservations() {
        let dir = directory(SignalingLimits {
            resume_queue_bytes_total: 1000,
            ..SignalingLimits::default()
        });
        let now = Instant::now();
        let (sender, _) = register(&dir);
        let mut queued = 0;
        for _ in 0..20 {
            let (b, _) = register(&dir);
            dir.detach(b, now).unwrap();
            match dir.deliver(b.id, message(sender, 300), now) {
                Delivery::Queued => queued += 1,
                Delivery::Dropped { reason, .. } => assert_eq!(reason, DropReason::ServerBusy),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(queued, 3);
        assert!(dir.held_bytes() <= 1000);
    }

    #[test]
    fn a_full_outbox_detaches_and_keeps_the_frame() {
        let dir = directory(SignalingLimits::default());
        let now = Instant::now();
        let outbox = TestOutbox::with_capacity(1); // only room for the `id` message
        let a = dir
            .register(
                outbox.clone(),
                Joining::default(),
                now,
                hello,
                &mut Vec::new(),
            )
            .unwrap();
        assert!(!outbox.dropped_by_directory());
        assert_eq!(dir.deliver(a.id, notice(), now), Delivery::Detached);
        assert!(outbox.dropped_by_directory());
        assert_eq!(dir.call_state(a), Err(Stale));
        assert_eq!(dir.deliver(a.id, notice(), now), Delivery::Queued);
        assert_eq!(dir.held_bytes(), 2 * br#"{"type":"pong"}"#.len());
        assert_eq!(dir.detach(a, now), Err(Stale), "already detached");
    }

    #[test]
    fn an_acking_client_gets_what_its_dead_socket_swallowed_and_nothing_twice() {
        let dir = directory(SignalingLimits::default());
        let now = Instant::now();
        let (sender, _) = register(&dir);
        let acks = Joining {
            address: None,
            acks: true,
        };
        let (b, outbox) = join(&dir, acks, 100).unwrap();
        outbox.take();
        for _ in 0..5 {
            assert_eq!(dir.deliver(b.id, message(sender, 20), now), Delivery::Sent);
        }
        let written = outbox.take();
        assert!(written[0].ends_with(r#","seq":1}"#), "{}", written[0]);
        assert!(written[4].ends_with(r#","seq":5}"#));
        // The client read 1 and 2 and said so; its socket died with 3..5 in it.
        dir.ack(b, 2).unwrap();
        assert_eq!(
            dir.ack(b, 9),
            Err(AckError::Beyond(AckBeyond { acked: 9, last: 5 }))
        );
        dir.detach(b, now).unwrap();
        let (fresh, outbox2) = join(&dir, acks, 100).unwrap();
        outbox2.take();
        let token = dir.shard(b.id)[&b.id].token.clone();
        let resumed = dir
            .resume(fresh, b.id, &token, Some(3), now, resume_hello)
            .unwrap();
        assert_eq!(resumed.delivered, 2);
        let frames = outbox2.take();
        assert_eq!(frames[1..], written[3..], "4 and 5, in order, not 3 again");
        // Still held until acknowledged; an ack frees them.
        assert!(dir.held_bytes() > 0);
        dir.ack(resumed.binding, 5).unwrap();
        assert_eq!(dir.held_bytes(), 0);
    }

    /// A client that does not acknowledge: what its connection never took from its outbox (never
    /// written) waits for the resume, in order, with what arrived after.
    #[test]
    fn frames_never_written_before_a_drop_are_kept_for_the_resume() {
        use crate::signaling::outbox::{self, OutboxSender};
        let dir: MemoryDirectory<OutboxSender> = MemoryDirectory::new(&SignalingLimits::default());
        let now = Instant::now();
        let join_real = |dir: &MemoryDirectory<OutboxSender>| {
            let (tx, mut rx) = outbox::channel(16);
            let binding = dir
                .register(tx, Joining::default(), now, hello, &mut Vec::new())
                .unwrap();
            rx.try_recv().expect("hello");
            (binding, rx)
        };
        let (sender, _sender_rx) = join_real(&dir);
        let (b, mut b_rx) = join_real(&dir);
        for n in 0..4 {
            let json = format!(r#"{{"n":{n}}}"#).into_bytes();
            let origin = Origin {
                from: sender.id,
                kind: MessageKind::Offer,
            };
            let delivery = dir.deliver(b.id, Envelope::relaying(json, origin), now);
            assert_eq!(delivery, Delivery::Sent);
        }
        // The session wrote the first one; its socket then died.
        assert_eq!(&b_rx.try_recv().unwrap()[..], br#"{"n":0}"#);
        assert_eq!(dir.detach(b, now), Ok(None));
        assert_eq!(b_rx.try_recv(), None, "taken back from the dead connection");
        assert!(b_rx.is_closed());
        let json = br#"{"n":4}"#.to_vec();
        assert_eq!(
            dir.deliver(b.id, Envelope::new(json), now),
            Delivery::Queued
        );
        let (fresh, mut fresh_rx) = join_real(&dir);
        let token = dir.shard(b.id)[&b.id].token.clone();
        let resumed = dir
            .resume(fresh, b.id, &token, None, now, resume_hello)
            .unwrap();
        assert_eq!((resumed.delivered, resumed.missed), (4, None));
        fresh_rx.try_recv().expect("resumed hello");
        for n in 1..5 {
            let frame = fresh_rx.try_recv().unwrap();
            assert_eq!(frame, Bytes::from(format!(r#"{{"n":{n}}}"#)));
        }
        assert_eq!(dir.held_bytes(), 0);
    }

    #[test]
    fn a_client_that_never_acks_is_detached_at_its_budget() {
        let dir = directory(SignalingLimits {
            resume_queue_messages: 3,
            ..SignalingLimits::default()
        });
        let now = Instant::now();
        let (sender, _) = register(&dir);
        let acks = Joining {
            address: None,
            acks: true,
        };
        let (b, outbox) = join(&dir, acks, 100).unwrap();
        for _ in 0..3 {
            assert_eq!(dir.deliver(b.id, message(sender, 20), now), Delivery::Sent);
        }
        assert_eq!(
            dir.deliver(b.id, message(sender, 20), now),
            Delivery::Dropped {
                reason: DropReason::QueueFull,
                detached: true
            }
        );
        assert!(outbox.dropped_by_directory());
        assert_eq!(dir.call_state(b), Err(Stale));
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
        assert_eq!(dir.release(b).map(|e| e.peer), Ok(Some(a.id)));
        assert_eq!(dir.call_state(a), Ok(CallState::Idle));
        assert_eq!(
            dir.deliver(b.id, notice(), Instant::now()),
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
