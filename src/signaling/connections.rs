//! What this node holds for the IDs it is home to: each live connection's outbox, each ID's
//! delivery [`Log`] (sequence numbers, held messages, acks), the deadlines of the reservations
//! this node made, reservations per client address, and the cap on clients. Nothing here is
//! shared with other nodes (that is [`super::registry`]), and nothing here decides what a message
//! means (that is [`super::hub`]); no socket is touched.
//!
//! Sequence numbers are given out here, by the node that holds the ID, never by the registry.
//!
//! Every map and queue here is bounded: entries by [`SignalingLimits::max_clients`] (a live client
//! that needs room ends the oldest reservation), reservations per client address by
//! [`SignalingLimits::reservations_per_ip`], each ID's held messages by count and bytes
//! ([`super::delivery`]), all of them together by a global byte budget, and the deadline heap by
//! the number of reservations made within one grace period.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use super::delivery::{AckBeyond, Envelope, HoldLimits, Log, Origin, Replay};
use super::protocol::{ClientId, DropReason, ServerFrame, ServerKind};
use super::registry::{Binding, RegisterError, Stale};
use super::SignalingLimits;
use crate::limits::IpKey;

/// One live connection's outbound queue, as the node sees it.
///
/// Pushing must never block: a full queue means a slow reader, and the node answers it by
/// dropping the outbox (so the connection's writer sees its channel close and hangs up) and keeping
/// the ID reserved for a resume. [`Connections`] holds the only long-lived handle to a
/// connection's outbox; the session layer must not keep a clone of the sending side, or it will not
/// notice.
pub trait Outbox: Send + 'static {
    /// Queues one ready-to-send text frame, or hands it back if the queue is full or closed.
    fn try_push(&self, frame: ServerFrame) -> Result<(), PushError>;

    /// Takes back every frame the connection has not taken yet, oldest first: called when the
    /// connection is detached, so what was never written can wait for the resume instead of being
    /// lost. The default takes nothing.
    fn take_unsent(&self) -> Vec<ServerFrame> {
        Vec::new()
    }
}

/// Why a frame could not be queued; the frame comes back so it can be kept for a resume.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    /// The connection reads too slowly and its queue is full.
    #[error("The connection's outbound queue is full.")]
    Full(ServerFrame),
    /// The connection's writer is gone.
    #[error("The connection's outbound queue is closed.")]
    Closed(ServerFrame),
}

impl PushError {
    /// The frame that was not queued.
    pub fn into_frame(self) -> ServerFrame {
        match self {
            Self::Full(frame) | Self::Closed(frame) => frame,
        }
    }
}

/// What the node needs to know about a connection that joins.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Joining {
    /// The client's address (IPv6 by /64), for the cap on reservations per address; `None` when
    /// unknown (tests, benches), which no cap applies to.
    pub address: Option<IpKey>,
    /// The client opted in to sequence numbers and acknowledgements (`?seq=1`): its messages carry
    /// `seq` and are held until it acknowledges them.
    pub acks: bool,
}

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

/// What happened to a message given to [`Connections::deliver`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub enum Delivery {
    /// Queued on the recipient's live connection.
    Sent,
    /// Held for the recipient's resume (it is reserved).
    Queued,
    /// The recipient's outbox was full: it was detached (now reserved) and the message is held
    /// for its resume.
    Detached,
    /// Not held: the budget is spent or the recipient is gone. Its sender must be told.
    Dropped {
        /// Why.
        reason: DropReason,
        /// The recipient was also detached for not keeping up.
        detached: bool,
    },
}

/// The result of a detach.
#[derive(Debug, PartialEq, Eq)]
pub enum Detached {
    /// The ID is reserved until its deadline.
    Reserved,
    /// Its address holds its share of reservations: the entry is gone; these senders' held
    /// messages will never be delivered.
    Freed(Vec<Origin>),
}

/// What a resume did on this node.
#[derive(Debug)]
pub struct TakenOver<O> {
    /// A connection that held the ID live here, now replaced (it was sent `session_replaced`).
    pub replaced: Option<O>,
    /// Held messages replayed after the `id` message.
    pub delivered: usize,
    /// The missed range reported in the `id` message.
    pub missed: Option<(u64, u64)>,
    /// The backlog did not fit the connection's queue: it is detached again (reserved).
    pub overflowed: bool,
    /// Messages that were waiting behind an earlier deferred resume of the ID here (which this
    /// one overtook), not numbered: to be delivered after the replay.
    pub waiting: Vec<Envelope>,
}

/// What [`Connections::finish_takeover`] did with a deferred resume's backlog.
#[derive(Debug, Default)]
pub struct Finished {
    /// What became of each message (replayed, then those that arrived while deferred), with
    /// who caused it: a drop must be reported to its sender.
    pub results: Vec<(Option<Origin>, Delivery)>,
    /// The connection could not take it all and is detached (reserved): the registry must learn.
    pub detached: Option<Binding>,
    /// Messages for an entry that is gone meanwhile (kicked by yet another resume): to be sent
    /// on to wherever the ID is now.
    pub leftover: Vec<Envelope>,
}

/// What a kicked or flushed entry held.
#[derive(Debug, Default)]
pub struct Taken {
    /// The held frames, in sequence order, with who caused each.
    pub frames: Vec<(ServerFrame, Option<Origin>)>,
    /// The range dropped for the ID and not yet reported to its client.
    pub missed: Option<(u64, u64)>,
}

/// An entry that was removed (expired or evicted), with the senders whose held messages die.
#[derive(Debug, PartialEq, Eq)]
pub struct Removed {
    /// The binding that held it.
    pub binding: Binding,
    /// Who caused each message still held.
    pub lost: Vec<Origin>,
}

/// Number of shards (a power of two).
const SHARDS: usize = 64;

/// The node-local table.
pub struct Connections<O> {
    /// Entries by ID, sharded so unrelated clients rarely share a lock.
    shards: Box<[Mutex<Shard<O>>]>,
    /// When each reservation made here ends, soonest first. Stale entries (the ID resumed or
    /// left meanwhile) are skipped when popped.
    deadlines: Mutex<BinaryHeap<Reverse<Deadline>>>,
    /// The limits.
    limits: Limits,
    /// Entries held (live and reserved), counted before the entry exists so the cap is exact.
    clients: AtomicUsize,
    /// Bytes held over all logs.
    held_bytes: AtomicUsize,
    /// Reservations per client address.
    reserved_per_ip: Mutex<HashMap<IpKey, usize>>,
}

/// The limits [`Connections`] reads.
#[derive(Clone, Debug)]
struct Limits {
    /// How long a reservation lasts.
    grace: Duration,
    /// Per-ID and global budgets of held messages.
    hold: HoldLimits,
    /// Most entries.
    max_clients: usize,
    /// Most reservations per address.
    reservations_per_ip: usize,
}

/// One shard of the table.
type Shard<O> = HashMap<ClientId, Slot<O>>;

/// A reservation's end, in the heap.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Deadline {
    /// When it ends.
    at: Instant,
    /// Whose.
    id: ClientId,
    /// Which holder's (a resume changes it, making this deadline stale).
    epoch: u64,
}

/// One local ID.
struct Slot<O> {
    /// The holder's epoch (as in the registry).
    epoch: u64,
    /// Live or reserved.
    presence: Presence<O>,
    /// Sequence numbers and held messages.
    log: Log,
    /// The client opted in to acknowledgements.
    acks: bool,
    /// The client's address, for the reservations cap.
    address: Option<IpKey>,
    /// While a resume from another node waits for what the old home held: messages for the ID,
    /// not yet numbered, delivered after that backlog (see [`Connections::finish_takeover`]).
    pending: Option<Pending>,
}

/// Messages waiting behind a resume's backlog. Bounded like a held log (messages and bytes per
/// ID, and counted in the global held budget, hard); it lasts at most the handover wait.
#[derive(Debug, Default)]
struct Pending {
    /// The messages, in arrival order.
    messages: Vec<Envelope>,
    /// Their JSON length.
    bytes: usize,
}

/// Whether a connection holds the ID.
enum Presence<O> {
    /// A connection holds it: frames go to its outbox.
    Live(O),
    /// Waiting for a resume until `until`.
    Reserved {
        /// The deadline.
        until: Instant,
    },
}

/// What a slot's operations read besides the slot.
struct Shared<'a> {
    /// The limits.
    limits: &'a Limits,
    /// The global held-bytes counter.
    held_bytes: &'a AtomicUsize,
    /// Reservations per address.
    reserved_per_ip: &'a Mutex<HashMap<IpKey, usize>>,
}

impl<O: Outbox> Connections<O> {
    /// An empty table enforcing `limits`.
    pub fn new(limits: &SignalingLimits) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            deadlines: Mutex::new(BinaryHeap::new()),
            limits: Limits {
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
        }
    }

    /// How long a reservation lasts.
    pub fn grace(&self) -> Duration {
        self.limits.grace
    }

    /// Entries held, live and reserved.
    pub fn len(&self) -> usize {
        self.clients.load(Ordering::Relaxed)
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes held over all logs.
    pub fn held_bytes(&self) -> usize {
        self.held_bytes.load(Ordering::Relaxed)
    }

    /// Deadlines in the heap (stale ones included).
    pub fn pending_deadlines(&self) -> usize {
        lock(&self.deadlines).len()
    }

    /// Addresses holding at least one reservation.
    pub fn reserving_addresses(&self) -> usize {
        lock(&self.reserved_per_ip).len()
    }

    /// Whether this node holds `id` (live or reserved).
    pub fn holds(&self, id: ClientId) -> bool {
        self.shard(id).contains_key(&id)
    }

    /// Takes a place for one more entry; false when the table is full (see [`Self::evict_oldest`]).
    /// A place taken must be filled by [`Self::attach`] or given back by [`Self::cancel_admit`].
    pub fn admit(&self) -> bool {
        if self.clients.fetch_add(1, Ordering::Relaxed) >= self.limits.max_clients {
            self.clients.fetch_sub(1, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// Gives back a place taken by [`Self::admit`] that no entry filled.
    pub fn cancel_admit(&self) {
        self.clients.fetch_sub(1, Ordering::Relaxed);
    }

    /// Adds a live entry for a fresh ID in a place taken by [`Self::admit`], after pushing its
    /// `hello` (the `id` message). If the outbox refuses it, the place is given back.
    pub fn attach(
        &self,
        binding: Binding,
        outbox: O,
        joining: Joining,
        hello: ServerFrame,
    ) -> Result<(), RegisterError> {
        if outbox.try_push(hello).is_err() {
            self.cancel_admit();
            return Err(RegisterError::OutboxRejected);
        }
        let slot = Slot {
            epoch: binding.epoch,
            presence: Presence::Live(outbox),
            log: Log::default(),
            acks: joining.acks,
            address: joining.address,
            pending: None,
        };
        if let Some(old) = self.shard(binding.id).insert(binding.id, slot) {
            // The registry gave out an ID this node still held: only after a registry loss.
            tracing::warn!(client = %binding.id, epoch = old.epoch, "a fresh ID replaced a local entry");
            self.forget(old);
        }
        Ok(())
    }

    /// Ends the oldest reservation to make room for a live client; `None` if there is none.
    pub fn evict_oldest(&self) -> Option<Removed> {
        loop {
            let Reverse(oldest) = lock(&self.deadlines).pop()?;
            let binding = Binding {
                id: oldest.id,
                epoch: oldest.epoch,
            };
            let removed = self.remove_if(binding, |s| {
                s.epoch == oldest.epoch && matches!(s.presence, Presence::Reserved { .. })
            });
            if let Some(lost) = removed {
                return Some(Removed { binding, lost });
            }
        }
    }

    /// The connection dropped: its outbox is released and the ID reserved until
    /// `now + resume_grace`, keeping its held messages. If its address already holds its share of
    /// reservations, the entry is removed instead.
    pub fn detach(&self, binding: Binding, now: Instant) -> Result<Detached, Stale> {
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
                Ok(Detached::Reserved)
            }
            None => Ok(Detached::Freed(self.remove(binding).unwrap_or_default())),
        }
    }

    /// Removes `binding`'s entry (live or reserved), returning who caused each held message.
    pub fn remove(&self, binding: Binding) -> Option<Vec<Origin>> {
        self.remove_if(binding, |s| s.epoch == binding.epoch)
    }

    /// Removes every reservation due at `now`, appending them to `expired`; returns the next
    /// deadline, if any.
    pub fn expire(&self, now: Instant, expired: &mut Vec<Removed>) -> Option<Instant> {
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
            let binding = Binding {
                id: due.id,
                epoch: due.epoch,
            };
            let removed = self.remove_if(binding, |s| {
                s.epoch == due.epoch
                    && matches!(s.presence, Presence::Reserved { until } if until <= now)
            });
            if let Some(lost) = removed {
                expired.push(Removed { binding, lost });
            }
        }
    }

    /// The connection `from` (live, Idle) resumed `to.id`, which the registry moved to this node
    /// under the epoch `to.epoch` (it was held under `previous_epoch`). Moves `from`'s outbox to
    /// `to`, sends the `id` message made by `hello(missed)` and replays what is held, in order;
    /// `from`'s own entry is removed. A live holder here is replaced (told `session_replaced`
    /// through `replaced_frame`, and its outbox dropped). If `to` is not held here (it was on
    /// another node), it starts with an empty log.
    ///
    /// With `defer` (a resume from another node, whose backlog is still to come), nothing is sent
    /// yet: messages for the ID wait, unnumbered, until [`Self::finish_takeover`] sends the `id`
    /// message and the backlog first.
    #[allow(clippy::too_many_arguments)]
    pub fn take_over(
        &self,
        from: Binding,
        to: Binding,
        previous_epoch: u64,
        last_seq: Option<u64>,
        now: Instant,
        hello: impl FnOnce(Option<(u64, u64)>) -> ServerFrame,
        replaced_frame: ServerFrame,
        defer: bool,
    ) -> TakenOver<O> {
        let shared = self.shared();
        // The resuming connection's own entry goes; its outbox moves.
        let mine = self.shard(from.id).remove(&from.id);
        let mut removed_mine = false;
        let (outbox, address, acks) = match mine {
            Some(mut slot) if slot.epoch == from.epoch => {
                removed_mine = true;
                let presence =
                    std::mem::replace(&mut slot.presence, Presence::Reserved { until: now });
                if let Presence::Reserved { .. } = presence {
                    // Detached between the registry's check and now (a slow reader).
                    shared.unreserve(slot.address);
                }
                let _ = slot.log.discard(&self.held_bytes);
                let outbox = match presence {
                    Presence::Live(outbox) => Some(outbox),
                    Presence::Reserved { .. } => None,
                };
                (outbox, slot.address, slot.acks)
            }
            Some(other) => {
                // Not ours to remove after all.
                self.shard(from.id).insert(from.id, other);
                (None, None, false)
            }
            None => (None, None, false),
        };
        if removed_mine {
            self.clients.fetch_sub(1, Ordering::Relaxed);
        }
        let mut shard = self.shard(to.id);
        let local = matches!(shard.get(&to.id), Some(s) if s.epoch == previous_epoch);
        if !local {
            if let Some(old) = shard.remove(&to.id) {
                // A leftover of an older holder: the registry moved on without it.
                let _ = self.forget(old);
            }
            self.clients.fetch_add(1, Ordering::Relaxed);
        }
        let tgt = shard.entry(to.id).or_insert_with(|| Slot {
            epoch: to.epoch,
            presence: Presence::Reserved { until: now },
            log: Log::default(),
            acks,
            address,
            pending: None,
        });
        tgt.epoch = to.epoch;
        let new_presence = match outbox {
            Some(outbox) => Presence::Live(outbox),
            None => Presence::Reserved { until: now },
        };
        let replaced = match std::mem::replace(&mut tgt.presence, new_presence) {
            Presence::Live(old) => {
                // Best effort: the old connection is most likely already dead.
                let _ = old.try_push(replaced_frame);
                Some(old)
            }
            Presence::Reserved { .. } if local => {
                shared.unreserve(tgt.address);
                None
            }
            Presence::Reserved { .. } => None,
        };
        tgt.address = address;
        tgt.acks = acks;
        let waiting = tgt.take_pending(&self.held_bytes);
        if defer {
            if let Presence::Live(_) = tgt.presence {
                let bytes = waiting.iter().map(|m| m.json().len()).sum();
                self.held_bytes.fetch_add(bytes, Ordering::Relaxed);
                tgt.pending = Some(Pending {
                    bytes,
                    messages: waiting,
                });
                drop(shard);
                return TakenOver {
                    replaced,
                    delivered: 0,
                    missed: None,
                    overflowed: false,
                    waiting: Vec::new(),
                };
            }
        }
        let Replay {
            frames: replay,
            missed,
        } = tgt.log.resume(last_seq, &self.held_bytes);
        let hello = hello(missed);
        let (mut overflowed, mut delivered, mut sent_through) = (true, 0, None);
        if let Presence::Live(outbox) = &tgt.presence {
            overflowed = outbox.try_push(hello).is_err();
            for (seq, frame) in replay {
                if overflowed || outbox.try_push(frame).is_err() {
                    overflowed = true;
                    break;
                }
                delivered += 1;
                sent_through = Some(seq);
            }
        }
        if let Some(seq) = sent_through {
            tgt.log.sent(seq);
            if !tgt.acks {
                // A client that does not acknowledge is not replayed anything twice.
                tgt.log.release_through(seq, &self.held_bytes);
            }
        }
        let deadline = if overflowed {
            match tgt.presence {
                Presence::Live(_) => tgt.reserve(now, &shared, to.id, false),
                // No outbox to move: reserve it properly.
                Presence::Reserved { .. } => {
                    shared.reserve(tgt.address, false);
                    let until = now + shared.limits.grace;
                    tgt.presence = Presence::Reserved { until };
                    Some(Deadline {
                        at: until,
                        id: to.id,
                        epoch: to.epoch,
                    })
                }
            }
        } else {
            None
        };
        drop(shard);
        self.schedule(deadline);
        TakenOver {
            replaced,
            delivered,
            missed,
            overflowed,
            waiting,
        }
    }

    /// Ends a deferred resume of `binding` (see [`Self::take_over`]): sends `hello`, then numbers
    /// and sends `replay` (the backlog from elsewhere, in order), then what arrived meanwhile, all
    /// under one lock so nothing overtakes them. If the connection cannot take it all it is
    /// detached (reserved) and the rest held, as for any slow reader.
    pub fn finish_takeover(
        &self,
        binding: Binding,
        hello: ServerFrame,
        replay: Vec<Envelope>,
        now: Instant,
    ) -> Finished {
        let shared = self.shared();
        let mut finished = Finished::default();
        let mut deadline = None;
        {
            let mut shard = self.shard(binding.id);
            let Some(slot) = shard
                .get_mut(&binding.id)
                .filter(|s| s.epoch == binding.epoch)
            else {
                finished.leftover = replay;
                return finished;
            };
            let pending = slot.take_pending(&self.held_bytes);
            let took_hello = match &slot.presence {
                Presence::Live(outbox) => outbox.try_push(hello).is_ok(),
                Presence::Reserved { .. } => false,
            };
            if !took_hello {
                deadline = match slot.presence {
                    Presence::Live(_) => slot.reserve(now, &shared, binding.id, false),
                    Presence::Reserved { until } if until > now => None,
                    Presence::Reserved { .. } => {
                        shared.reserve(slot.address, false);
                        let until = now + shared.limits.grace;
                        slot.presence = Presence::Reserved { until };
                        Some(Deadline {
                            at: until,
                            id: binding.id,
                            epoch: binding.epoch,
                        })
                    }
                };
            }
            for message in replay.into_iter().chain(pending) {
                let origin = message.origin();
                let (delivery, reserved) = slot.deliver(message, now, &shared, binding.id);
                deadline = deadline.or(reserved);
                finished.results.push((origin, delivery));
            }
        }
        finished.detached = deadline.map(|d| Binding {
            id: d.id,
            epoch: d.epoch,
        });
        self.schedule(deadline);
        finished
    }

    /// Numbers `message` and queues it for whoever holds `to` here, live or reserved. Never
    /// blocks. When the recipient is detached for not keeping up, its binding comes back too (the
    /// registry must learn it is reserved). If this node does not hold `to`, the message comes
    /// back (for the bus).
    pub fn deliver(
        &self,
        to: ClientId,
        message: Envelope,
        now: Instant,
    ) -> Result<(Delivery, Option<Binding>), Envelope> {
        let (delivery, deadline) = {
            let mut shard = self.shard(to);
            match shard.get_mut(&to) {
                Some(slot) => slot.deliver(message, now, &self.shared(), to),
                None => return Err(message),
            }
        };
        let detached = deadline.map(|d| Binding {
            id: d.id,
            epoch: d.epoch,
        });
        self.schedule(deadline);
        Ok((delivery, detached))
    }

    /// Like [`Self::deliver`], to a live connection's own ID.
    pub fn reply(
        &self,
        binding: Binding,
        message: Envelope,
        now: Instant,
    ) -> Result<(Delivery, Option<Binding>), Stale> {
        let (delivery, deadline) = {
            let mut shard = self.shard(binding.id);
            let slot = shard
                .get_mut(&binding.id)
                .filter(|s| s.is_live(binding.epoch))
                .ok_or(Stale)?;
            slot.deliver(message, now, &self.shared(), binding.id)
        };
        let detached = deadline.map(|_| binding);
        self.schedule(deadline);
        Ok((delivery, detached))
    }

    /// The client processed everything up to `seq`.
    pub fn ack(&self, binding: Binding, seq: u64) -> Result<(), AckError> {
        let mut shard = self.shard(binding.id);
        let slot = shard
            .get_mut(&binding.id)
            .filter(|s| s.is_live(binding.epoch))
            .ok_or(Stale)?;
        slot.log.ack(seq, &self.held_bytes)?;
        Ok(())
    }

    /// The epoch of `id`'s live connection here, if a connection here holds it.
    pub fn live_epoch(&self, id: ClientId) -> Option<u64> {
        self.shard(id)
            .get(&id)
            .filter(|s| matches!(s.presence, Presence::Live(_)))
            .map(|s| s.epoch)
    }

    /// Whether `id` is reserved here (its connection dropped; waiting for a resume).
    pub fn is_reserved(&self, id: ClientId) -> bool {
        self.shard(id)
            .get(&id)
            .is_some_and(|s| matches!(s.presence, Presence::Reserved { .. }))
    }

    /// Takes what the reserved `binding` holds (see [`Log::take_held`]) and the range it dropped
    /// (which stays, for a resume here); empty if it is not reserved here at that epoch.
    pub fn take_log(&self, binding: Binding) -> Taken {
        let mut shard = self.shard(binding.id);
        match shard.get_mut(&binding.id) {
            Some(slot)
                if slot.epoch == binding.epoch
                    && matches!(slot.presence, Presence::Reserved { .. }) =>
            {
                Taken {
                    frames: slot.log.take_held(&self.held_bytes),
                    missed: slot.log.missed(),
                }
            }
            _ => Taken::default(),
        }
    }

    /// The ID was resumed on another node while `binding`'s connection here still held it: the
    /// connection is sent `replaced` and its outbox dropped (its session closes), the entry goes,
    /// and what it held comes back (to be forwarded to the ID's new home). `None` if `binding` is
    /// not held here.
    pub fn kick(&self, binding: Binding, replaced: ServerFrame, now: Instant) -> Option<Taken> {
        let mut slot = {
            let mut shard = self.shard(binding.id);
            shard
                .get(&binding.id)
                .filter(|s| s.epoch == binding.epoch)?;
            shard.remove(&binding.id)?
        };
        self.clients.fetch_sub(1, Ordering::Relaxed);
        let mut frames = Vec::new();
        match std::mem::replace(&mut slot.presence, Presence::Reserved { until: now }) {
            Presence::Live(outbox) => {
                if !slot.acks {
                    // Never written, so never read: they go with the ID. (A client that
                    // acknowledges holds them in its log already.)
                    frames.extend(
                        outbox
                            .take_unsent()
                            .into_iter()
                            .filter(|f| f.kind != ServerKind::Id)
                            .map(|f| (f, None)),
                    );
                }
                let _ = outbox.try_push(replaced);
            }
            Presence::Reserved { .. } => self.shared().unreserve(slot.address),
        }
        let missed = slot.log.missed();
        frames.extend(slot.log.take_held(&self.held_bytes));
        // What waited behind a deferred resume here comes after, unnumbered.
        let waiting = slot.take_pending(&self.held_bytes);
        frames.extend(waiting.into_iter().map(|m| {
            let origin = m.origin();
            (m.seal(None), origin)
        }));
        Some(Taken { frames, missed })
    }

    /// The last number `id`'s client said it processed on the node it resumed from (0: none).
    pub fn processed_elsewhere(&self, id: ClientId) -> u64 {
        self.shard(id)
            .get(&id)
            .map_or(0, |s| s.log.processed_elsewhere())
    }

    /// For a cluster's delivery record: the highest `seq` given out to `binding`, if its client
    /// acknowledges and nothing for it waits unnumbered (behind a resume's backlog). A client that
    /// processed that much has everything this node was given for it so far.
    pub fn high_water(&self, binding: Binding) -> Option<u64> {
        self.shard(binding.id)
            .get(&binding.id)
            .filter(|s| s.epoch == binding.epoch && s.acks && s.pending.is_none())
            .map(|s| s.log.last_seq())
    }

    /// After a resume from another node: numbering for `binding` continues after `seq`.
    pub fn continue_after(&self, binding: Binding, seq: u64) {
        if let Some(slot) = self
            .shard(binding.id)
            .get_mut(&binding.id)
            .filter(|s| s.epoch == binding.epoch)
        {
            slot.log.continue_after(seq);
        }
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

    fn schedule(&self, deadline: Option<Deadline>) {
        if let Some(deadline) = deadline {
            lock(&self.deadlines).push(Reverse(deadline));
        }
    }

    /// Removes `binding.id` if `pred` holds for its slot.
    fn remove_if(&self, binding: Binding, pred: impl Fn(&Slot<O>) -> bool) -> Option<Vec<Origin>> {
        let slot = {
            let mut shard = self.shard(binding.id);
            shard.get(&binding.id).filter(|s| pred(s))?;
            shard.remove(&binding.id)?
        };
        Some(self.forget(slot))
    }

    /// Accounts for a slot taken out of the table; returns who caused each message it held.
    fn forget(&self, mut slot: Slot<O>) -> Vec<Origin> {
        self.clients.fetch_sub(1, Ordering::Relaxed);
        if let Presence::Reserved { .. } = slot.presence {
            self.shared().unreserve(slot.address);
        }
        let waiting = slot.take_pending(&self.held_bytes);
        let mut lost = slot.log.discard(&self.held_bytes);
        lost.extend(waiting.iter().filter_map(Envelope::origin));
        lost
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

    /// Ends a deferred resume's wait: what waited, in order, its bytes given back to the global
    /// budget.
    fn take_pending(&mut self, held_total: &AtomicUsize) -> Vec<Envelope> {
        let Some(pending) = self.pending.take() else {
            return Vec::new();
        };
        held_total.fetch_sub(pending.bytes, Ordering::Relaxed);
        pending.messages
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
        let hold = shared.limits.hold;
        if let (Some(pending), Presence::Live(_)) = (&mut self.pending, &self.presence) {
            // A resume's backlog is still to come: this waits behind it, not yet numbered.
            let len = message.json().len();
            let reason = if pending.messages.len() >= hold.messages
                || pending.bytes + len > hold.bytes
            {
                Some(DropReason::QueueFull)
            } else if shared.held_bytes.fetch_add(len, Ordering::Relaxed) + len > hold.bytes_total {
                shared.held_bytes.fetch_sub(len, Ordering::Relaxed);
                Some(DropReason::ServerBusy)
            } else {
                None
            };
            if let Some(reason) = reason {
                let dropped = Delivery::Dropped {
                    reason,
                    detached: false,
                };
                return (dropped, None);
            }
            pending.bytes += len;
            pending.messages.push(message);
            return (Delivery::Queued, None);
        }
        let seq = self.log.next_seq();
        let origin = message.origin();
        let frame = message.seal(self.acks.then_some(seq));
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
            // Due (the expiry task has not run yet): it will not come back.
            Presence::Reserved { .. } => (
                Delivery::Dropped {
                    reason: DropReason::RecipientGone,
                    detached: false,
                },
                None,
            ),
        }
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

    use super::{Outbox, PushError};
    use crate::signaling::protocol::ServerFrame;

    /// The test's view of one connection's queue. The node holds a clone.
    #[derive(Clone)]
    pub(crate) struct TestOutbox(Arc<Mutex<Inner>>);

    struct Inner {
        frames: Vec<ServerFrame>,
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
                .map(|f| String::from_utf8(f.bytes.to_vec()).unwrap())
                .collect()
        }

        /// Whether the node has dropped its handle (the connection was detached or replaced).
        pub(crate) fn dropped_by_node(&self) -> bool {
            Arc::strong_count(&self.0) == 1
        }
    }

    impl Outbox for TestOutbox {
        fn try_push(&self, frame: ServerFrame) -> Result<(), PushError> {
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
    use std::cell::RefCell;
    use std::collections::HashSet;

    use super::test_outbox::TestOutbox;
    use super::*;
    use bytes::Bytes;

    use crate::signaling::protocol::{
        ErrorCode, MessageKind, ResumeToken, ServerKind, ServerMessage,
    };

    /// A frame of `text` of kind `kind`.
    fn text_frame(kind: ServerKind, text: String) -> ServerFrame {
        ServerFrame {
            kind,
            bytes: Bytes::from(text),
        }
    }
    use crate::signaling::registry::{
        ready, CallState, MemoryRegistry, NodeId, Registry, ResumeError, Transition,
    };

    /// The node-local table with a memory registry beside it, applied the way the router does:
    /// the directory these tests were first written against, rebuilt from the two halves.
    struct Dir<O> {
        conns: Connections<O>,
        registry: MemoryRegistry,
        tokens: RefCell<HashMap<ClientId, ResumeToken>>,
    }

    /// An ID freed for good, as the router learns of it.
    #[derive(Debug, PartialEq, Eq)]
    struct Expired {
        id: ClientId,
        peer: Option<ClientId>,
        lost: Vec<Origin>,
    }

    /// A resume's result.
    struct Resumed {
        binding: Binding,
        delivered: usize,
        missed: Option<(u64, u64)>,
    }

    impl<O: Outbox> std::ops::Deref for Dir<O> {
        type Target = Connections<O>;
        fn deref(&self) -> &Connections<O> {
            &self.conns
        }
    }

    impl<O: Outbox> Dir<O> {
        fn new(limits: &SignalingLimits) -> Self {
            Self {
                conns: Connections::new(limits),
                registry: MemoryRegistry::new(limits),
                tokens: RefCell::new(HashMap::new()),
            }
        }

        fn end(&self, removed: Removed) -> Expired {
            let freed = ready(self.registry.expire(removed.binding)).expect("reserved in both");
            Expired {
                id: freed.id,
                peer: freed.peer,
                lost: removed.lost,
            }
        }

        fn register(
            &self,
            outbox: O,
            joining: Joining,
            now: Instant,
            hello: impl FnOnce(ClientId, &ResumeToken) -> ServerFrame,
            evicted: &mut Vec<Expired>,
        ) -> Result<Binding, RegisterError> {
            let mut tries = 0;
            while !self.conns.admit() {
                tries += 1;
                let removed = (tries <= 4).then(|| self.conns.evict_oldest()).flatten();
                evicted.push(self.end(removed.ok_or(RegisterError::Full)?));
            }
            let claim = ready(self.registry.claim(&NodeId::local(), now))?;
            let frame = hello(claim.binding.id, &claim.token);
            self.conns.attach(claim.binding, outbox, joining, frame)?;
            self.tokens
                .borrow_mut()
                .insert(claim.binding.id, claim.token);
            Ok(claim.binding)
        }

        fn token(&self, id: ClientId) -> ResumeToken {
            self.tokens.borrow()[&id].clone()
        }

        fn detach(&self, binding: Binding, now: Instant) -> Result<Option<Expired>, Stale> {
            match self.conns.detach(binding, now)? {
                Detached::Reserved => {
                    ready(self.registry.detach(binding, now, self.conns.grace()))?;
                    Ok(None)
                }
                Detached::Freed(lost) => {
                    let freed = ready(self.registry.release(binding))?;
                    Ok(Some(Expired {
                        id: freed.id,
                        peer: freed.peer,
                        lost,
                    }))
                }
            }
        }

        fn release(&self, binding: Binding) -> Result<Expired, Stale> {
            let freed = ready(self.registry.release(binding))?;
            let lost = self.conns.remove(binding).unwrap_or_default();
            Ok(Expired {
                id: freed.id,
                peer: freed.peer,
                lost,
            })
        }

        fn expire(&self, now: Instant, expired: &mut Vec<Expired>) -> Option<Instant> {
            let mut removed = Vec::new();
            let next = self.conns.expire(now, &mut removed);
            expired.extend(removed.into_iter().map(|r| self.end(r)));
            next
        }

        fn deliver(&self, to: ClientId, message: Envelope, now: Instant) -> Delivery {
            let (delivery, detached) = self
                .conns
                .deliver(to, message, now)
                .unwrap_or_else(|_| panic!("{to} is not held here"));
            if let Some(binding) = detached {
                ready(self.registry.detach(binding, now, self.conns.grace())).unwrap();
            }
            delivery
        }

        fn call_state(&self, binding: Binding) -> Result<CallState, Stale> {
            ready(self.registry.call_state(binding))
        }

        fn resume(
            &self,
            current: Binding,
            target: ClientId,
            token: &ResumeToken,
            last_seq: Option<u64>,
            now: Instant,
            hello: impl FnOnce(ClientId, &ResumeToken, Option<(u64, u64)>) -> ServerFrame,
        ) -> Result<Resumed, ResumeError> {
            let node = NodeId::local();
            let took = ready(self.registry.resume(current, target, token, &node, now))?;
            let taken = self.conns.take_over(
                current,
                took.binding,
                took.previous_epoch,
                last_seq,
                now,
                |missed| hello(target, &took.token, missed),
                text_frame(
                    ServerKind::Error(ErrorCode::SessionReplaced),
                    "replaced".into(),
                ),
                false,
            );
            self.tokens.borrow_mut().insert(target, took.token.clone());
            Ok(Resumed {
                binding: took.binding,
                delivered: taken.delivered,
                missed: taken.missed,
            })
        }
    }

    fn directory(limits: SignalingLimits) -> Dir<TestOutbox> {
        Dir::new(&limits)
    }

    fn hello(id: ClientId, _: &ResumeToken) -> ServerFrame {
        text_frame(ServerKind::Id, format!("hello {id}"))
    }

    fn join(
        dir: &Dir<TestOutbox>,
        joining: Joining,
        capacity: usize,
    ) -> Result<(Binding, TestOutbox), RegisterError> {
        let outbox = TestOutbox::with_capacity(capacity);
        let mut evicted = Vec::new();
        let binding = dir.register(outbox.clone(), joining, Instant::now(), hello, &mut evicted)?;
        assert!(evicted.is_empty(), "{evicted:?}");
        Ok((binding, outbox))
    }

    fn register(dir: &Dir<TestOutbox>) -> (Binding, TestOutbox) {
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
        Envelope::from_parts(ServerKind::IceCandidate, json, Some(origin))
    }

    fn notice() -> Envelope {
        Envelope::new(&ServerMessage::Pong)
    }

    fn resume_hello(id: ClientId, _: &ResumeToken, missed: Option<(u64, u64)>) -> ServerFrame {
        text_frame(ServerKind::Id, format!("resumed {id} missed {missed:?}"))
    }

    fn address(last: u8) -> Option<IpKey> {
        Some(IpKey::of(std::net::IpAddr::from([192, 0, 2, last])))
    }

    /// A resume from another node (deferred): what arrives for the ID before its backlog is in
    /// waits, unnumbered, and goes out after the `id` message and the backlog; beyond the ID's
    /// budget it is dropped for its sender to be told. (Before, it went out at once, ahead of the
    /// backlog.)
    #[test]
    fn a_deferred_resume_sends_the_id_message_then_the_backlog_then_what_arrived_meanwhile() {
        let limits = SignalingLimits {
            resume_queue_messages: 3,
            ..SignalingLimits::default()
        };
        let conns: Connections<TestOutbox> = Connections::new(&limits);
        let now = Instant::now();
        let outbox = TestOutbox::with_capacity(64);
        let from = Binding {
            id: ClientId::new(111_111),
            epoch: 1,
        };
        assert!(conns.admit());
        conns
            .attach(
                from,
                outbox.clone(),
                Joining::default(),
                hello(from.id, &ResumeToken::random(&mut rand::rng())),
            )
            .unwrap();
        outbox.take();
        let to = Binding {
            id: ClientId::new(222_222),
            epoch: 5,
        };
        let replaced = text_frame(ServerKind::Error(ErrorCode::SessionReplaced), "x".into());
        let taken = conns.take_over(from, to, 4, None, now, |_| unreachable!(), replaced, true);
        assert!(!taken.overflowed);
        assert!(outbox.take().is_empty(), "nothing before the backlog");
        let peer = Binding {
            id: ClientId::new(333_333),
            epoch: 2,
        };
        for len in [20, 21, 22] {
            let (delivery, _) = conns.deliver(to.id, message(peer, len), now).unwrap();
            assert_eq!(delivery, Delivery::Queued);
        }
        let (over, _) = conns.deliver(to.id, message(peer, 23), now).unwrap();
        assert_eq!(
            over,
            Delivery::Dropped {
                reason: DropReason::QueueFull,
                detached: false
            }
        );
        assert_eq!(
            conns.held_bytes(),
            20 + 21 + 22,
            "counted in the global budget"
        );
        let resumed = text_frame(ServerKind::Id, "resumed".into());
        let backlog = vec![message(peer, 30), message(peer, 31)];
        let finished = conns.finish_takeover(to, resumed, backlog, now);
        assert_eq!(conns.held_bytes(), 0);
        assert!(finished.detached.is_none() && finished.leftover.is_empty());
        assert_eq!(finished.results.len(), 5);
        assert!(finished.results.iter().all(|(_, d)| *d == Delivery::Sent));
        let got = outbox.take();
        assert_eq!(got[0], "resumed");
        let lengths: Vec<usize> = got[1..].iter().map(String::len).collect();
        assert_eq!(lengths, [30, 31, 20, 21, 22]);
        // Done waiting: the next goes straight out.
        let (next, _) = conns.deliver(to.id, message(peer, 24), now).unwrap();
        assert_eq!(next, Delivery::Sent);
    }

    /// A deferred resume overtaken by another one (a kick from a node that resumed the ID
    /// since, or a resume here) hands on what waited for it instead of dropping it silently.
    #[test]
    fn what_waits_behind_a_deferred_resume_survives_a_kick_or_a_second_resume() {
        let conns: Connections<TestOutbox> = Connections::new(&SignalingLimits::default());
        let now = Instant::now();
        let replaced = || text_frame(ServerKind::Error(ErrorCode::SessionReplaced), "x".into());
        let peer = Binding {
            id: ClientId::new(333_333),
            epoch: 2,
        };
        let defer = |from: Binding, to: Binding, previous: u64| {
            let outbox = TestOutbox::with_capacity(64);
            assert!(conns.admit());
            let token = ResumeToken::random(&mut rand::rng());
            conns
                .attach(
                    from,
                    outbox.clone(),
                    Joining::default(),
                    hello(from.id, &token),
                )
                .unwrap();
            let taken = conns.take_over(
                from,
                to,
                previous,
                None,
                now,
                |_| unreachable!(),
                replaced(),
                true,
            );
            assert!(!taken.overflowed);
            outbox
        };
        let id = ClientId::new(222_222);
        let first = Binding { id, epoch: 5 };
        defer(
            Binding {
                id: ClientId::new(111_111),
                epoch: 1,
            },
            first,
            4,
        );
        let (delivery, _) = conns.deliver(id, message(peer, 40), now).unwrap();
        assert_eq!(delivery, Delivery::Queued);
        // Kicked (resumed elsewhere meanwhile): the waiting message comes back with the log.
        let taken = conns.kick(first, replaced(), now).unwrap();
        assert_eq!(conns.held_bytes(), 0);
        assert_eq!(taken.frames.len(), 1);
        assert_eq!(taken.frames[0].0.len(), 40);
        assert_eq!(taken.frames[0].1.map(|o| o.from), Some(peer.id));

        // Deferred again, then resumed here by another connection before it finished.
        let second = Binding { id, epoch: 7 };
        defer(
            Binding {
                id: ClientId::new(444_444),
                epoch: 6,
            },
            second,
            6,
        );
        let (delivery, _) = conns.deliver(id, message(peer, 41), now).unwrap();
        assert_eq!(delivery, Delivery::Queued);
        let outbox = TestOutbox::with_capacity(64);
        let from = Binding {
            id: ClientId::new(555_555),
            epoch: 8,
        };
        assert!(conns.admit());
        let token = ResumeToken::random(&mut rand::rng());
        conns
            .attach(from, outbox, Joining::default(), hello(from.id, &token))
            .unwrap();
        let third = Binding { id, epoch: 9 };
        let taken = conns.take_over(
            from,
            third,
            7,
            None,
            now,
            |_| text_frame(ServerKind::Id, "id".into()),
            replaced(),
            false,
        );
        assert_eq!(taken.waiting.len(), 1);
        assert_eq!(taken.waiting[0].json().len(), 41);
        assert_eq!(conns.held_bytes(), 0);
        let (next, _) = conns.deliver(id, message(peer, 42), now).unwrap();
        assert_eq!(next, Delivery::Sent, "nothing waits any more");
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
        assert!(dir
            .conns
            .shards
            .iter()
            .all(|s| s.lock().unwrap().is_empty()));
        assert!(dir.registry.is_empty());
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
        let token = dir.token(a.id);
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
        assert!(!outbox.dropped_by_node());
        assert_eq!(dir.deliver(a.id, notice(), now), Delivery::Detached);
        assert!(outbox.dropped_by_node());
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
        let token = dir.token(b.id);
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
        let dir: Dir<OutboxSender> = Dir::new(&SignalingLimits::default());
        let now = Instant::now();
        let join_real = |dir: &Dir<OutboxSender>| {
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
            let envelope = Envelope::from_parts(ServerKind::Offer, json, Some(origin));
            let delivery = dir.deliver(b.id, envelope, now);
            assert_eq!(delivery, Delivery::Sent);
        }
        // The session wrote the first one; its socket then died.
        assert_eq!(&b_rx.try_recv().unwrap().bytes[..], br#"{"n":0}"#);
        assert_eq!(dir.detach(b, now), Ok(None));
        assert_eq!(b_rx.try_recv(), None, "taken back from the dead connection");
        assert!(b_rx.is_closed());
        let json = br#"{"n":4}"#.to_vec();
        assert_eq!(
            dir.deliver(
                b.id,
                Envelope::from_parts(ServerKind::Offer, json, None),
                now
            ),
            Delivery::Queued
        );
        let (fresh, mut fresh_rx) = join_real(&dir);
        let token = dir.token(b.id);
        let resumed = dir
            .resume(fresh, b.id, &token, None, now, resume_hello)
            .unwrap();
        assert_eq!((resumed.delivered, resumed.missed), (4, None));
        fresh_rx.try_recv().expect("resumed hello");
        for n in 1..5 {
            let frame = fresh_rx.try_recv().unwrap();
            assert_eq!(frame.bytes, Bytes::from(format!(r#"{{"n":{n}}}"#)));
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
        assert!(outbox.dropped_by_node());
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
        ready(dir.registry.transition(a, b.id, Transition::Offer)).unwrap();
        assert_eq!(dir.call_state(b), Ok(CallState::Called { peer: a.id }));
        assert_eq!(dir.release(b).map(|e| e.peer), Ok(Some(a.id)));
        assert_eq!(dir.call_state(a), Ok(CallState::Idle));
        assert!(dir.conns.deliver(b.id, notice(), Instant::now()).is_err());
    }

    #[test]
    fn call_states_stay_symmetric() {
        let dir = directory(SignalingLimits::default());
        let (a, _) = register(&dir);
        let (b, _) = register(&dir);
        ready(dir.registry.transition(a, b.id, Transition::Offer)).unwrap();
        assert_eq!(dir.call_state(b), Ok(CallState::Called { peer: a.id }));
        ready(dir.registry.transition(b, a.id, Transition::Accept)).unwrap();
        assert_eq!(dir.call_state(a), Ok(CallState::InCall { peer: b.id }));
        ready(dir.registry.transition(a, b.id, Transition::Hangup)).unwrap();
        assert_eq!(dir.call_state(a), Ok(CallState::Idle));
        assert_eq!(dir.call_state(b), Ok(CallState::Idle));
    }
}
