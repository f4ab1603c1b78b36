//! Applies what the hub decided: deliveries to IDs this node holds go through [`Connections`],
//! deliveries to other IDs through the [`Bus`]; replies, acks and resumes change the connection's
//! own entry. This is what the session layer calls: [`Router::join`], [`Router::handle_text`],
//! [`Router::disconnect`] and, from a timer, [`Router::expire`].
//!
//! Delivery results come back here, so this is where "nothing lost without a word" is kept: a
//! message that can be neither delivered nor held is answered with `undelivered` to its sender,
//! and a recipient too slow to take it is detached (its ID reserved) in both the local table and
//! the registry.

use std::time::Instant;

use super::bus::{Bus, BusDelivery, Handover, Held, NoBus};
use super::connections::{
    AckError, Connections, Delivery, Detached, Finished, Joining, Outbox, Removed, Taken,
};
use super::delivery::{Envelope, Origin};
use super::flushes::Flushes;
use super::hub::{
    id_frame, replaced_frame, resumed_id_frame, AckRefusal, Attachment, CallObserver, ConnectError,
    Departure, Effect, Effects, Hub, IceServersFor, Outcome, Resumption,
};
use super::outbox::OutboxSender;
use super::protocol::{ClientId, CloseCode, DropReason, ErrorCode, ServerMessage};
use super::registry::{Binding, CallState, Freed, MemoryRegistry, RegisterError, Registry, Stale};
use super::SignalingLimits;

/// The signaling core of one node: the rules ([`Hub`]), the IDs it holds ([`Connections`]) and
/// the way to the others ([`Bus`]). Shared by every session (wrap it in an `Arc`).
pub struct Router<R = MemoryRegistry, B = NoBus, O = OutboxSender> {
    /// The rules, over the registry.
    hub: Hub<R>,
    /// The IDs this node holds: outboxes, logs, reservations.
    connections: Connections<O>,
    /// Delivery to IDs held elsewhere.
    bus: B,
    /// IDs whose log is being moved to the bus right now (see [`Flushes`]).
    flushes: Flushes,
    /// In a cluster, IDs whose connection has a message on its way right now (see
    /// [`Router::wait_sent`]).
    sends: Flushes,
}

impl<O: Outbox> Router<MemoryRegistry, NoBus, O> {
    /// The core of a node that runs alone: a memory registry and no bus.
    pub fn single_node(limits: SignalingLimits) -> Self {
        Self::new(Hub::single_node(limits), NoBus)
    }
}

impl<R: Registry, B: Bus, O: Outbox> Router<R, B, O> {
    /// A router applying `hub`'s decisions, with an empty table sized by the hub's limits.
    pub fn new(hub: Hub<R>, bus: B) -> Self {
        Self {
            connections: Connections::new(hub.limits()),
            hub,
            bus,
            flushes: Flushes::default(),
            sends: Flushes::default(),
        }
    }

    /// Reports call events to `observer` from now on.
    pub fn with_observer(mut self, observer: std::sync::Arc<dyn CallObserver>) -> Self {
        self.hub = self.hub.with_observer(observer);
        self
    }

    /// The rules.
    pub fn hub(&self) -> &Hub<R> {
        &self.hub
    }

    /// The IDs this node holds, for metrics (`len`) and tests.
    pub fn connections(&self) -> &Connections<O> {
        &self.connections
    }

    /// The way to other nodes' IDs.
    pub fn bus(&self) -> &B {
        &self.bus
    }

    /// The limits enforced.
    pub fn limits(&self) -> &SignalingLimits {
        self.hub.limits()
    }

    /// [`Router::join`] for a connection whose address and delivery mode are unknown.
    pub async fn connect(
        &self,
        outbox: O,
        ice_servers: Option<IceServersFor>,
        now: Instant,
    ) -> Result<Attachment, ConnectError> {
        self.join(outbox, ice_servers, Joining::default(), now)
            .await
    }

    /// Admits a new connection: makes room (ending the oldest reservation if the node is full),
    /// claims its ID and token and queues the `id` message. The address counts towards
    /// [`SignalingLimits::reservations_per_ip`], and a connection that opted in to
    /// acknowledgements gets `seq` in every message (see [`super::delivery`]).
    ///
    /// The session layer must hand over the only sending handle of the connection's queue; see
    /// [`Outbox`]. On error, send [`ConnectError::frame`] and close with
    /// [`ConnectError::close_code`].
    pub async fn join(
        &self,
        outbox: O,
        ice_servers: Option<IceServersFor>,
        joining: Joining,
        now: Instant,
    ) -> Result<Attachment, ConnectError> {
        // Boxed, like `disconnect`: a session's future is as large as the largest future it
        // awaits, for the connection's whole life, and this one (an eviction ends a reservation
        // and applies its effects) is larger than a message's. One allocation per connection.
        Box::pin(self.join_unboxed(outbox, ice_servers, joining, now)).await
    }

    /// [`Router::join`], unboxed.
    async fn join_unboxed(
        &self,
        outbox: O,
        ice_servers: Option<IceServersFor>,
        joining: Joining,
        now: Instant,
    ) -> Result<Attachment, ConnectError> {
        // Reservations never lock a live client out: when every place is taken, the oldest
        // reservation makes room (a few tries, in case other connections take the room first).
        let mut tries = 0;
        while !self.connections.admit() {
            tries += 1;
            let evicted = if tries > 4 {
                None
            } else {
                self.connections.evict_oldest()
            };
            let Some(removed) = evicted else {
                return Err(RegisterError::Full.into());
            };
            tracing::debug!(client = %removed.binding.id, "reservation ended to make room for a live client");
            self.end(removed, now).await;
        }
        let (conn, hello) = match self.hub.connect(ice_servers, now).await {
            Ok(joined) => joined,
            Err(e) => {
                self.connections.cancel_admit();
                return Err(e);
            }
        };
        if let Err(e) = self
            .connections
            .attach(conn.binding(), outbox, joining, hello)
        {
            let _ = self.hub.registry().release(conn.binding()).await;
            return Err(e.into());
        }
        Ok(conn)
    }

    /// Handles one text frame from `conn`. Every refusal is answered with an `error` frame on the
    /// connection's own outbox; the connection stays open unless [`Outcome::close`] says otherwise.
    pub async fn handle_text(&self, conn: &mut Attachment, frame: &[u8], now: Instant) -> Outcome {
        // Boxed: the session awaits this for every message, so unboxed its state (the hub's
        // decision and the router's application of it, 768 bytes) would sit in every session's
        // future for the connection's whole life, idle or not. One allocation per message.
        Box::pin(self.handle_text_unboxed(conn, frame, now)).await
    }

    /// [`Router::handle_text`], unboxed.
    async fn handle_text_unboxed(
        &self,
        conn: &mut Attachment,
        frame: &[u8],
        now: Instant,
    ) -> Outcome {
        // In a cluster the message is marked on its way until it is delivered, held or
        // reported, so a handover of this ID to another node waits for it (`wait_sent`).
        let id = conn.id();
        let sending = self.bus.holds_reserved().then(|| self.sends.start(id));
        let effects = self.hub.handle_text(conn, frame, now).await;
        let outcome = self.apply(Some(conn), effects, now).await;
        if let Some(done) = sending {
            self.sends.end(id, done);
        }
        outcome
    }

    /// Answers a frame the session layer refused itself (too large, binary, rate limited, too many
    /// calls) with an `error` frame, counting it as a violation.
    pub async fn reject(&self, conn: &mut Attachment, code: ErrorCode, now: Instant) -> Outcome {
        // Boxed, like `handle_text`.
        let effects = self.hub.reject(conn, code);
        Box::pin(self.apply(Some(conn), effects, now)).await
    }

    /// The connection is gone. See [`Departure`] for the difference between a drop and a leave.
    pub async fn disconnect(&self, conn: Attachment, departure: Departure, now: Instant) {
        // Boxed, like `join`: its state would otherwise sit in every session's future.
        Box::pin(self.disconnect_unboxed(conn, departure, now)).await
    }

    /// [`Router::disconnect`], unboxed.
    async fn disconnect_unboxed(&self, conn: Attachment, departure: Departure, now: Instant) {
        let binding = conn.binding();
        let registry = self.hub.registry();
        let gone = match departure {
            // In a cluster the ID's log moves to the bus: marked before the local table calls
            // the ID reserved, so no message for it is held before the log (see `Flushes`).
            Departure::Dropped => match (
                self.bus
                    .holds_reserved()
                    .then(|| self.flushes.start(binding.id)),
                self.connections.detach(binding, now),
            ) {
                (flushing, Ok(Detached::Reserved)) => {
                    let grace = self.connections.grace();
                    let _ = registry.detach(binding, now, grace).await;
                    self.flush_marked(binding, now).await;
                    if let Some(done) = flushing {
                        self.flushes.end(binding.id, done);
                    }
                    None
                }
                (flushing, Ok(Detached::Freed(lost))) => {
                    if let Some(done) = flushing {
                        self.flushes.end(binding.id, done);
                    }
                    tracing::debug!(client = %binding.id, "address holds its share of reservations; ID freed");
                    registry
                        .release(binding)
                        .await
                        .ok()
                        .map(|freed| (freed, lost))
                }
                // Detached already (too slow), or taken over by a resume.
                (flushing, Err(Stale)) => {
                    if let Some(done) = flushing {
                        self.flushes.end(binding.id, done);
                    }
                    None
                }
            },
            Departure::Left => match registry.release(binding).await {
                Ok(freed) => {
                    let lost = self.connections.remove(binding).unwrap_or_default();
                    Some((freed, lost))
                }
                Err(Stale) => None,
            },
        };
        if let Some((freed, lost)) = gone {
            let effects = self.hub.gone(freed, lost, now);
            let _ = self.apply(None, effects, now).await;
        }
    }

    /// Ends every reservation due at `now`, telling each one's call peer with `close-call-server`
    /// (reason `peer_gone`). Returns the next deadline: the session layer's timer should sleep until
    /// then, or for [`SignalingLimits::resume_grace`] when `None` (a reservation made later is due
    /// no sooner than that).
    pub async fn expire(&self, now: Instant) -> Option<Instant> {
        let mut expired = Vec::new();
        loop {
            let next = self.connections.expire(now, &mut expired);
            if expired.is_empty() {
                return next;
            }
            for removed in expired.drain(..) {
                self.end(removed, now).await;
            }
        }
    }

    /// The connection's call state, for metrics and tests.
    pub async fn call_state(&self, conn: &Attachment) -> Result<CallState, Stale> {
        self.hub.call_state(conn).await
    }

    /// A reservation made here ended: free it in the registry (unless a resume elsewhere won) and
    /// tell its peer and the senders of what it held.
    async fn end(&self, removed: Removed, now: Instant) {
        let freed = self
            .hub
            .registry()
            .expire(removed.binding)
            .await
            .unwrap_or(Freed {
                id: removed.binding.id,
                peer: None,
            });
        let effects = self.hub.gone(freed, removed.lost, now);
        let _ = self.apply(None, effects, now).await;
    }

    /// Marks a binding the local table detached (too slow) as reserved in the registry too.
    async fn detached(&self, binding: Binding, now: Instant, outcome: &mut Outcome) {
        tracing::debug!(client = %binding.id, "outbox full; detached");
        outcome.detached_peer = Some(binding.id);
        let grace = self.connections.grace();
        let _ = self.hub.registry().detach(binding, now, grace).await;
        self.flush(binding, now).await;
    }

    /// In a cluster, moves what a just-reserved ID holds here into the bus's held place, where a
    /// resume on any node finds it (see [`Bus::holds_reserved`]); what cannot be held is
    /// reported to its senders. Nothing on a single node.
    async fn flush(&self, binding: Binding, now: Instant) {
        if !self.bus.holds_reserved() {
            return;
        }
        let done = self.flushes.start(binding.id);
        self.flush_marked(binding, now).await;
        self.flushes.end(binding.id, done);
    }

    /// [`Router::flush`], for a caller that marked the flush in [`Flushes`] already.
    async fn flush_marked(&self, binding: Binding, now: Instant) {
        if !self.bus.holds_reserved() {
            return;
        }
        let mut outcome = Outcome::default();
        let taken = self.connections.take_log(binding);
        if let Some(missed) = taken.missed {
            // Not reported yet: a resume on another node must tell the client.
            self.bus.hold_missed(binding, missed).await;
        }
        for (frame, origin) in taken.frames {
            let envelope = Envelope::from_parts(frame.kind, frame.bytes.to_vec(), origin);
            if let Some(Effect::Deliver { to, envelope }) =
                self.send_on_bus(binding.id, envelope).await
            {
                // Boxed: a delivery can detach a slow sender, which flushes again (rare).
                Box::pin(self.deliver_or_tell(to, envelope, now, &mut outcome)).await;
            }
        }
    }

    /// Waits until the log of `to` (reserved here just now) is in the bus's held place, so a
    /// message for it held after this comes after that log. At once if no flush is in progress.
    pub async fn wait_flushed(&self, to: ClientId) {
        self.flushes.wait(to).await;
    }

    /// Whether the log of `to` (reserved here just now) is being moved to the bus right now.
    pub fn is_flushing(&self, to: ClientId) -> bool {
        self.flushes.contains(to)
    }

    /// Waits, at most `bound`, until no message from `id`'s connection here is on its way (its
    /// session is inside [`Router::handle_text`]): a node handing `id` over to the node it
    /// resumed on answers only then, so a message the client sent here is published before
    /// anything it sends there (each session awaits its message's delivery before reading the
    /// next one; this extends that across the move). At once on a single node.
    pub async fn wait_sent(&self, id: ClientId, bound: std::time::Duration) {
        self.sends.wait_within(id, bound).await;
    }

    /// How many reserved IDs' logs are being moved to the bus right now.
    pub fn flushes_in_progress(&self) -> usize {
        self.flushes.len()
    }

    /// A message from another node for `to`, routed by `epoch`: delivered if a connection here
    /// holds `to` live (at that epoch, when given). Otherwise it comes back, for the caller to hold
    /// in the shared held place (the ID is reserved, or moved on).
    pub async fn deliver_from_bus(
        &self,
        to: ClientId,
        epoch: Option<u64>,
        envelope: Envelope,
        now: Instant,
    ) -> Result<(), Envelope> {
        match self.connections.live_epoch(to) {
            Some(live) if epoch.is_none_or(|e| e == live) => {
                // Numbered here, the ID's home; a number given by a node it left goes. What that
                // node forwards after a takeover which the client said it processed is dropped.
                let (envelope, seq) = envelope.unsealed();
                if seq.is_some_and(|seq| seq <= self.connections.processed_elsewhere(to)) {
                    return Ok(());
                }
                let mut outcome = Outcome::default();
                self.deliver_or_tell(to, envelope, now, &mut outcome).await;
                Ok(())
            }
            _ => Err(envelope),
        }
    }

    /// Another node took over `binding`'s ID while a connection here still held it: that
    /// connection is told `session_replaced` and closed, and what it held for the client goes to
    /// the ID's new home. Returns whether a connection here held it.
    pub async fn kick(&self, binding: Binding, now: Instant) -> bool {
        let Some(held) = self.kick_for_handover(binding, now) else {
            return false;
        };
        self.forward(binding.id, held, now).await;
        true
    }

    /// Like [`Router::kick`], but what the connection held comes back, for the caller to hand to
    /// the ID's new home in one message (so it is replayed there before anything newer).
    pub fn kick_for_handover(&self, binding: Binding, now: Instant) -> Option<Taken> {
        self.connections.kick(binding, replaced_frame(), now)
    }

    /// Sends what a kicked connection held on to wherever `id` is now, one message at a time
    /// (when the handover message could not be sent); what goes nowhere is reported.
    pub async fn forward(&self, id: ClientId, held: Taken, now: Instant) {
        let mut outcome = Outcome::default();
        for (frame, origin) in held.frames {
            let envelope = Envelope::from_parts(frame.kind, frame.bytes.to_vec(), origin);
            if let Some(Effect::Deliver { to, envelope }) = self.send_on_bus(id, envelope).await {
                self.deliver_or_tell(to, envelope, now, &mut outcome).await;
            }
        }
    }

    /// Delivers one effect that is not an answer to a connection (a notice for a sender, from a
    /// node task).
    pub async fn apply_effect(&self, effect: Effect, now: Instant) {
        let effects = Effects {
            list: std::iter::once(effect).collect(),
            outcome: Outcome::default(),
        };
        let _ = self.apply(None, effects, now).await;
    }

    /// An ID went away for good outside this node's own timers (a cluster task found it): its
    /// peer and the senders of what was held for it are told, as [`Hub::gone`] says.
    pub async fn gone(&self, freed: Freed, lost: Vec<Origin>, now: Instant) {
        let effects = self.hub.gone(freed, lost, now);
        let _ = self.apply(None, effects, now).await;
    }

    /// Sends through the bus; the `undelivered` notice for the sender if it went nowhere.
    async fn send_on_bus(&self, to: ClientId, envelope: Envelope) -> Option<Effect> {
        let origin = envelope.origin();
        match self.bus.send(to, envelope).await {
            BusDelivery::Delivered | BusDelivery::Held => None,
            BusDelivery::NoSuchClient => {
                self.hub.undelivered(to, DropReason::RecipientGone, origin)
            }
            BusDelivery::Dropped(reason) => self.hub.undelivered(to, reason, origin),
            BusDelivery::Unavailable => self.hub.undelivered(to, DropReason::ServerBusy, origin),
        }
    }

    /// Does what `effects` say, in order; `conn` is the connection they answer, if any.
    async fn apply(
        &self,
        mut conn: Option<&mut Attachment>,
        effects: Effects,
        now: Instant,
    ) -> Outcome {
        let Effects { list, mut outcome } = effects;
        for effect in list {
            match effect {
                Effect::Deliver { to, envelope } => {
                    // The common case (a local ID took it or held it) awaits nothing; the rest
                    // (a slow peer, a drop to report, another node) is boxed so its state does
                    // not sit in every message's future.
                    let origin = envelope.origin();
                    if self.bus.went_elsewhere(to) && self.connections.live_epoch(to).is_some() {
                        // `to` just moved here while this node's earlier messages for it went
                        // to its old node: those come first (rare; boxed).
                        Box::pin(self.bus.settle_here(to)).await;
                    }
                    match self.deliver_local(to, envelope, now) {
                        Ok((Delivery::Sent | Delivery::Queued, _)) => {}
                        local => {
                            let rest = self.deliver_rest(to, origin, local, now, &mut outcome);
                            Box::pin(rest).await;
                        }
                    }
                }
                Effect::Reply(envelope) => {
                    let Some(conn) = conn.as_deref() else {
                        debug_assert!(false, "a reply with no connection");
                        continue;
                    };
                    match self.connections.reply(conn.binding(), envelope, now) {
                        Ok((Delivery::Sent, _)) => {}
                        Ok((_, detached)) => {
                            outcome.close = Some(CloseCode::PolicyViolation);
                            if let Some(binding) = detached {
                                let grace = self.connections.grace();
                                let detach = self.hub.registry().detach(binding, now, grace);
                                let _ = Box::pin(detach).await;
                                Box::pin(self.flush(binding, now)).await;
                            }
                        }
                        Err(Stale) => outcome.close = Some(CloseCode::PolicyViolation),
                    }
                }
                Effect::Ack { seq } => {
                    let Some(conn) = conn.as_deref_mut() else {
                        debug_assert!(false, "an ack with no connection");
                        continue;
                    };
                    let refusal = match self.connections.ack(conn.binding(), seq) {
                        Ok(()) => continue,
                        Err(AckError::Stale(stale)) => AckRefusal::Stale(stale),
                        Err(AckError::Beyond(beyond)) => AckRefusal::Beyond(beyond),
                    };
                    let refused = self.hub.refuse_ack(conn, refusal);
                    outcome.close = outcome.close.or(refused.outcome.close);
                    outcome.error = refused.outcome.error;
                    // A refusal is answered with replies only (boxed: rare).
                    Box::pin(async {
                        for effect in refused.list {
                            if let Effect::Reply(envelope) = effect {
                                self.reply(conn, envelope, now, &mut outcome).await;
                            }
                        }
                    })
                    .await;
                }
                Effect::TakeOver(resumption) => {
                    // Boxed: rare, and its state would otherwise sit in every message's future.
                    Box::pin(self.take_over(*resumption, now, &mut outcome)).await;
                }
            }
        }
        outcome
    }

    /// Queues a message for the connection itself; if it cannot take it, the connection must
    /// close.
    async fn reply(
        &self,
        conn: &Attachment,
        envelope: Envelope,
        now: Instant,
        outcome: &mut Outcome,
    ) {
        match self.connections.reply(conn.binding(), envelope, now) {
            Ok((Delivery::Sent, _)) => {}
            Ok((_, detached)) => {
                outcome.close = Some(CloseCode::PolicyViolation);
                if let Some(binding) = detached {
                    let grace = self.connections.grace();
                    let _ = self.hub.registry().detach(binding, now, grace).await;
                    self.flush(binding, now).await;
                }
            }
            Err(Stale) => outcome.close = Some(CloseCode::PolicyViolation),
        }
    }

    /// Moves the resuming connection onto the ID the registry gave it.
    async fn take_over(&self, resumption: Resumption, now: Instant, outcome: &mut Outcome) {
        let Resumption {
            from,
            takeover,
            last_seq,
            ice_servers,
        } = resumption;
        let heartbeat = self.limits().heartbeat_interval;
        let (id, token) = (takeover.binding.id, &takeover.token);
        // From another node: its backlog (what it held, what the held stream holds) comes
        // first, so the `id` message and everything for the ID wait until it is here.
        let remote = self.bus.holds_reserved() && takeover.previous_node != *self.hub.node();
        let taken = self.connections.take_over(
            from,
            takeover.binding,
            takeover.previous_epoch,
            last_seq,
            now,
            |missed| id_frame(id, token, true, missed, heartbeat, ice_servers.as_deref()),
            replaced_frame(),
            remote,
        );
        tracing::debug!(
            client = %id,
            delivered = taken.delivered,
            missed = ?taken.missed,
            replaced = taken.replaced.is_some(),
            "took over"
        );
        if remote && !taken.overflowed {
            self.take_over_from_elsewhere(
                &takeover,
                last_seq,
                ice_servers.as_deref(),
                now,
                outcome,
            )
            .await;
            return;
        }
        if takeover.was_live && takeover.previous_node != *self.hub.node() {
            tracing::debug!(client = %id, node = %takeover.previous_node, "resumed from a live connection on another node; kicking it there");
            let previous = Binding {
                id,
                epoch: takeover.previous_epoch,
            };
            self.bus.kick(&takeover.previous_node, previous).await;
        }
        if taken.overflowed {
            outcome.close = Some(CloseCode::PolicyViolation);
            let grace = self.connections.grace();
            let _ = self
                .hub
                .registry()
                .detach(takeover.binding, now, grace)
                .await;
            self.flush(takeover.binding, now).await;
        } else if self.bus.holds_reserved() {
            self.replay_held(takeover.binding, last_seq, now, outcome)
                .await;
        }
        for envelope in taken.waiting {
            self.deliver_or_tell(id, envelope, now, outcome).await;
        }
    }

    /// In a cluster, after a resume: numbering continues after what the client saw, then what was
    /// held for the ID while nobody held it live (on any node) is delivered in order, leaving out
    /// what the client says it processed (`last_seq`: numbers given by the node it left). The
    /// held place is read, delivered, then trimmed, so an answer lost to a timeout is read
    /// again; if it cannot be read twice the connection is closed with 1013 and the messages
    /// stay held for the client's next resume.
    async fn replay_held(
        &self,
        binding: Binding,
        last_seq: Option<u64>,
        now: Instant,
        outcome: &mut Outcome,
    ) {
        if let Some(seq) = last_seq {
            self.connections.continue_after(binding, seq);
        }
        let Some(held) = self.read_held(binding, outcome).await else {
            return;
        };
        for envelope in unprocessed(held.messages, last_seq) {
            self.deliver_or_tell(binding.id, envelope, now, outcome)
                .await;
        }
        if let Some(cursor) = held.cursor {
            self.bus.trim_held(binding.id, cursor).await;
        }
    }

    /// Reads what is held for `binding`, trying twice; `None` (and the connection closed with
    /// 1013: the messages stay held for its next resume) if the bus cannot answer.
    async fn read_held(&self, binding: Binding, outcome: &mut Outcome) -> Option<Held> {
        for _ in 0..2 {
            if let Ok(held) = self.bus.read_held(binding).await {
                return Some(held);
            }
        }
        tracing::warn!(client = %binding.id, "messages held for a resumed ID could not be read: Redis unavailable; closing with 1013 so the client resumes again and gets them");
        outcome.close = Some(CloseCode::TryAgainLater);
        None
    }

    /// A resume of an ID another node held: the old home hands over what it held (or is found
    /// dead), the held place is read, and only then does the client get its `id` message and
    /// the backlog, in order, before anything sent to it since. A dead old home's unconfirmed
    /// messages are unknown: the client is told `"missed":[last_seq+1,null]` and its call peer
    /// (the only client that could have sent it anything) `undelivered` with `node_failed` —
    /// unless the dead home's last delivery record
    /// ([`Takeover::quiet_through`](super::registry::Takeover::quiet_through)) shows the client
    /// processed everything it was sent.
    async fn take_over_from_elsewhere(
        &self,
        takeover: &super::registry::Takeover,
        last_seq: Option<u64>,
        ice_servers: Option<&serde_json::value::RawValue>,
        now: Instant,
        outcome: &mut Outcome,
    ) {
        let binding = takeover.binding;
        let id = binding.id;
        let mut backlog = Vec::new();
        let mut missed = None;
        let mut node_failed = false;
        if let Some(seq) = last_seq {
            // Now, not once the backlog is here: what the old home sends on meanwhile (its log's
            // move to the held stream found the ID moved) is checked against it on arrival.
            self.connections.continue_after(binding, seq);
        }
        // Asked even when the ID was reserved there: the node it dropped from may still be
        // moving its log to the held stream, and answers once that is done (a dead one at once:
        // nobody listens). Only a live holder's silence means messages may be lost.
        tracing::debug!(client = %id, node = %takeover.previous_node, live = takeover.was_live, "resumed from another node; asking it to hand over");
        let old = Binding {
            id,
            epoch: takeover.previous_epoch,
        };
        match self
            .bus
            .hand_over(&takeover.previous_node, old, binding)
            .await
        {
            Handover::Flushed(held) => {
                backlog.extend(held.messages);
                missed = merge(missed, held.missed);
            }
            Handover::Unanswered if takeover.was_live => {
                // Only a client that acknowledges (it says `last_seq`) has a delivery record
                // to be exact about; for one that does not, nothing is known, as on one node,
                // and nobody is alarmed. One that processed everything the dead node's last
                // record says it had numbered, with nothing sent to it since, lost nothing.
                let quiet = matches!(
                    (last_seq, takeover.quiet_through),
                    (Some(seen), Some(through)) if seen >= through
                );
                node_failed = last_seq.is_some() && !quiet;
                if node_failed {
                    tracing::info!(client = %id, node = %takeover.previous_node, "the node that held a resumed ID did not answer; what it numbered after the client's last_seq is reported lost");
                } else {
                    tracing::info!(client = %id, node = %takeover.previous_node, "the node that held a resumed ID did not answer; its last delivery record shows nothing lost");
                }
            }
            // Reserved there: its log went to the held stream when it dropped (or the node
            // died while moving it, which nothing here can tell).
            Handover::Unanswered => {}
        }
        let held = self.read_held(binding, outcome).await;
        let cursor = held.as_ref().and_then(|h| h.cursor.clone());
        if let Some(held) = held {
            backlog.extend(held.messages);
            missed = merge(missed, held.missed);
        }
        // Numbers never go back: on after what the client saw and what was dropped.
        let after = last_seq
            .unwrap_or(0)
            .max(missed.map_or(0, |(_, last)| last));
        if after > 0 {
            self.connections.continue_after(binding, after);
        }
        let lost_from = last_seq.filter(|_| node_failed).map(|last| last + 1);
        let hello = resumed_id_frame(
            id,
            &takeover.token,
            true,
            missed,
            lost_from,
            self.limits().heartbeat_interval,
            ice_servers,
        );
        let replay = unprocessed(backlog, last_seq);
        let finished = self
            .connections
            .finish_takeover(binding, hello, replay, now);
        if let Some(cursor) = cursor {
            self.bus.trim_held(id, cursor).await;
        }
        self.settle_finished(id, finished, now, outcome).await;
        if node_failed {
            if let Some(peer) = takeover.call.peer() {
                let notice = ServerMessage::Undelivered {
                    to: id,
                    reason: DropReason::NodeFailed,
                    count: 0,
                    request: None,
                };
                self.deliver_or_tell(peer, Envelope::new(&notice), now, outcome)
                    .await;
            }
        }
    }

    /// Reports what a deferred resume could not deliver, and detaches a connection that could
    /// not take its backlog.
    async fn settle_finished(
        &self,
        id: ClientId,
        finished: Finished,
        now: Instant,
        outcome: &mut Outcome,
    ) {
        for (origin, delivery) in finished.results {
            if let Delivery::Dropped { reason, .. } = delivery {
                if let Some(Effect::Deliver { to, envelope }) =
                    self.hub.undelivered(id, reason, origin)
                {
                    self.deliver_or_tell(to, envelope, now, outcome).await;
                }
            }
        }
        if let Some(binding) = finished.detached {
            outcome.close = Some(CloseCode::PolicyViolation);
            self.detached(binding, now, outcome).await;
        }
        for envelope in finished.leftover {
            if let Some(Effect::Deliver { to, envelope }) = self.send_on_bus(id, envelope).await {
                self.deliver_or_tell(to, envelope, now, outcome).await;
            }
        }
    }

    /// Hands a message for `to` to the local table, unless a cluster holds it elsewhere: an ID
    /// reserved here has its messages held on the bus (one place every node's resume reads), so
    /// it comes back like a message for an ID this node does not hold.
    fn deliver_local(
        &self,
        to: ClientId,
        envelope: Envelope,
        now: Instant,
    ) -> Result<(Delivery, Option<Binding>), Envelope> {
        if self.bus.holds_reserved() && self.connections.is_reserved(to) {
            return Err(envelope);
        }
        self.connections.deliver(to, envelope, now)
    }

    /// Delivers to `to`, here or through the bus, telling the sender if it can be neither
    /// delivered nor held (for the cluster's paths: flushes, forwards, replays, notices).
    async fn deliver_or_tell(
        &self,
        to: ClientId,
        envelope: Envelope,
        now: Instant,
        outcome: &mut Outcome,
    ) {
        let origin = envelope.origin();
        match self.deliver_local(to, envelope, now) {
            Ok((Delivery::Sent | Delivery::Queued, _)) => {}
            local => Box::pin(self.deliver_rest(to, origin, local, now, outcome)).await,
        }
    }

    /// Finishes a delivery the local table did not simply take: a detached (slow) recipient, a
    /// drop to report to the sender with `undelivered` (a notice from the server, which nobody is
    /// told about in turn), or an ID this node does not hold (the bus).
    async fn deliver_rest(
        &self,
        to: ClientId,
        origin: Option<Origin>,
        local: Result<(Delivery, Option<Binding>), Envelope>,
        now: Instant,
        outcome: &mut Outcome,
    ) {
        let notice = self.settle(to, origin, local, now, outcome).await;
        if let Some(Effect::Deliver { to, envelope }) = notice {
            let local = self.deliver_local(to, envelope, now);
            let notice = self.settle(to, None, local, now, outcome).await;
            debug_assert!(notice.is_none(), "a server notice has no sender to tell");
        }
    }

    /// Acts on what the local table did with a message for `to`; returns the `undelivered` notice
    /// for the sender if the message can be neither delivered nor held.
    async fn settle(
        &self,
        to: ClientId,
        origin: Option<Origin>,
        local: Result<(Delivery, Option<Binding>), Envelope>,
        now: Instant,
        outcome: &mut Outcome,
    ) -> Option<Effect> {
        match local {
            Ok((Delivery::Sent | Delivery::Queued, _)) => None,
            Ok((Delivery::Detached, detached)) => {
                if let Some(binding) = detached {
                    self.detached(binding, now, outcome).await;
                }
                None
            }
            Ok((Delivery::Dropped { reason, .. }, detached)) => {
                tracing::debug!(client = %to, %reason, "message dropped; sender told");
                if let Some(binding) = detached {
                    self.detached(binding, now, outcome).await;
                }
                self.hub.undelivered(to, reason, origin)
            }
            // Not held here: another node's, or nobody's (or reserved here: held after what
            // its log still holds).
            Err(envelope) => {
                self.flushes.wait(to).await;
                let sent = match self.bus.send_unless_here(to, envelope).await {
                    Ok(sent) => sent,
                    // It resumed here while the message chased it: delivered here, where the
                    // sender's next message goes too, not through this node's own inbox.
                    Err(envelope) => match self.deliver_local(to, envelope, now) {
                        Ok(local) => {
                            return Box::pin(self.settle(to, origin, Ok(local), now, outcome))
                                .await;
                        }
                        Err(envelope) => self.bus.send(to, envelope).await,
                    },
                };
                match sent {
                    BusDelivery::Delivered | BusDelivery::Held | BusDelivery::NoSuchClient => None,
                    BusDelivery::Dropped(reason) => self.hub.undelivered(to, reason, origin),
                    BusDelivery::Unavailable => {
                        self.hub.undelivered(to, DropReason::ServerBusy, origin)
                    }
                }
            }
        }
    }
}

/// The messages of a backlog the client has not processed (numbered after `last_seq` by the node
/// that numbered them, or not numbered), without their old numbers, in order.
fn unprocessed(backlog: Vec<Envelope>, last_seq: Option<u64>) -> Vec<Envelope> {
    backlog
        .into_iter()
        .filter_map(|envelope| {
            let (envelope, seq) = envelope.unsealed();
            let processed = seq.is_some_and(|seq| last_seq.is_some_and(|last| seq <= last));
            (!processed).then_some(envelope)
        })
        .collect()
}

/// Two missed ranges as one (from the lowest first to the highest last).
fn merge(a: Option<(u64, u64)>, b: Option<(u64, u64)>) -> Option<(u64, u64)> {
    match (a, b) {
        (Some((f1, l1)), Some((f2, l2))) => Some((f1.min(f2), l1.max(l2))),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::signaling::connections::test_outbox::TestOutbox;
    use crate::signaling::connections::Joining;
    use crate::signaling::registry::{ready, Location, NodeId};

    type TestRouter = Router<MemoryRegistry, NoBus, TestOutbox>;

    fn offer(from: ClientId, to: ClientId) -> String {
        format!(
            r#"{{"type":"video-offer-request","id":{from},"calleeId":{to},"offer":{{"type":"offer","sdp":"v=0"}}}}"#
        )
    }

    /// A session's future is as large as the largest future it awaits, for the connection's
    /// whole life, so every idle connection pays for the biggest one. The router's futures are
    /// boxed, so none makes a session larger. Unboxed (debug and release alike) a message's was
    /// 768 B, a refusal's 720 B, joining 1,040 B and disconnecting 904 B, and an idle TLS
    /// WebSocket held ≈ 1.1 KB more than before the hub/registry/router split.
    #[test]
    fn the_futures_a_session_awaits_are_small() {
        const SMALL: usize = 256;
        let router: Router = Router::single_node(SignalingLimits::default());
        let now = Instant::now();
        let (outbox, _rx) = crate::signaling::outbox::channel(8);
        let mut conn = ready(router.connect(outbox, None, now)).unwrap();
        let message = std::mem::size_of_val(&router.handle_text(&mut conn, b"{}", now));
        let reject = std::mem::size_of_val(&router.reject(&mut conn, ErrorCode::RateLimited, now));
        let (outbox, _rx) = crate::signaling::outbox::channel(8);
        let join = std::mem::size_of_val(&router.join(outbox, None, Joining::default(), now));
        let disconnect = std::mem::size_of_val(&router.disconnect(conn, Departure::Dropped, now));
        for (what, size) in [
            ("handle_text", message),
            ("reject", reject),
            ("join", join),
            ("disconnect", disconnect),
        ] {
            assert!(size <= SMALL, "{what}'s future is {size} B");
        }
    }

    /// The hub alone decides and touches no queue: an offer comes back as one delivery to the
    /// callee, and nothing reaches the callee until the router applies it.
    #[test]
    fn the_hub_returns_effects_and_pushes_nothing() {
        let router: TestRouter = Router::single_node(SignalingLimits::default());
        let now = Instant::now();
        let (a_out, b_out) = (TestOutbox::with_capacity(8), TestOutbox::with_capacity(8));
        let mut a = ready(router.connect(a_out.clone(), None, now)).unwrap();
        let b = ready(router.connect(b_out.clone(), None, now)).unwrap();
        a_out.take();
        b_out.take();
        let frame = offer(a.id(), b.id());
        let effects = ready(router.hub().handle_text(&mut a, frame.as_bytes(), now));
        assert_eq!(effects.list.len(), 1);
        let Effect::Deliver { to, envelope } = &effects.list[0] else {
            panic!("{:?}", effects.list);
        };
        assert_eq!(*to, b.id());
        assert_eq!(envelope.kind(), protocol_kind());
        assert!(b_out.take().is_empty(), "the hub pushed into an outbox");
        // Applied, it arrives.
        let outcome = ready(router.apply(Some(&mut a), effects, now));
        assert_eq!(outcome.close, None);
        assert_eq!(b_out.take().len(), 1);
    }

    /// A bus that holds everything it is given, as a cluster's held stream does for reserved IDs.
    #[derive(Default)]
    struct HoldingBus {
        held: std::sync::Mutex<Vec<(ClientId, Envelope)>>,
    }

    impl Bus for HoldingBus {
        async fn send(&self, to: ClientId, envelope: Envelope) -> BusDelivery {
            self.held.lock().unwrap().push((to, envelope));
            BusDelivery::Held
        }

        fn holds_reserved(&self) -> bool {
            true
        }

        async fn read_held(&self, to: Binding) -> Result<Held, super::super::bus::BusUnavailable> {
            let mut held = self.held.lock().unwrap();
            let (mine, others) = held.drain(..).partition(|(id, _)| *id == to.id);
            *held = others;
            Ok(Held {
                messages: mine.into_iter().map(|(_, envelope)| envelope).collect(),
                ..Held::default()
            })
        }
    }

    /// In a cluster, a reserved ID's messages live in one place every node's resume reads: what
    /// its log held when it dropped moves to the bus at once, later messages go there directly,
    /// and the resume replays them in order, leaving out what the client says it processed and
    /// numbering on from there. (Fails if the router keeps them in the local log: the bus would
    /// hold nothing and a resume on another node would find nothing.)
    #[test]
    fn in_a_cluster_a_reserved_ids_messages_move_to_the_bus_and_replay_after_last_seq() {
        let limits = SignalingLimits::default();
        let hub = Hub::new(MemoryRegistry::new(&limits), NodeId::local(), limits);
        let router: Router<MemoryRegistry, HoldingBus, TestOutbox> =
            Router::new(hub, HoldingBus::default());
        let now = Instant::now();
        let (a_out, b_out) = (TestOutbox::with_capacity(64), TestOutbox::with_capacity(64));
        let mut a = ready(router.connect(a_out.clone(), None, now)).unwrap();
        let acks = Joining {
            address: None,
            acks: true,
        };
        let b = ready(router.join(b_out.clone(), None, acks, now)).unwrap();
        let hello: serde_json::Value = serde_json::from_str(&b_out.take()[0]).unwrap();
        let token = hello["token"].as_str().unwrap().to_owned();
        let frame = offer(a.id(), b.id());
        let _ = ready(router.handle_text(&mut a, frame.as_bytes(), now));
        let frame = format!(
            r#"{{"type":"ice-candidate","clientId":{},"candidate":{{"candidate":"c1"}}}}"#,
            b.id()
        );
        let _ = ready(router.handle_text(&mut a, frame.as_bytes(), now));
        assert_eq!(
            b_out.take().len(),
            2,
            "offer (seq 1) and candidate (seq 2) sent"
        );

        // Dropped with both unacknowledged: they move to the bus; nothing stays in the log.
        let b_id = b.id();
        ready(router.disconnect(b, super::super::hub::Departure::Dropped, now));
        assert_eq!(router.connections().held_bytes(), 0);
        assert_eq!(router.bus().held.lock().unwrap().len(), 2);
        // A message while reserved goes to the bus too.
        let frame = format!(
            r#"{{"type":"ice-candidate","clientId":{b_id},"candidate":{{"candidate":"c2"}}}}"#
        );
        let _ = ready(router.handle_text(&mut a, frame.as_bytes(), now));
        assert_eq!(router.bus().held.lock().unwrap().len(), 3);
        assert_eq!(router.connections().held_bytes(), 0);

        // Resumed having processed seq 1: the candidate c1 (was seq 2) and c2 follow, once each,
        // numbered on after every number given out (here, on the node that gave out 1 and 2).
        let c_out = TestOutbox::with_capacity(64);
        let mut c = ready(router.join(c_out.clone(), None, acks, now)).unwrap();
        c_out.take();
        let resume = format!(r#"{{"type":"resume","id":{b_id},"token":"{token}","last_seq":1}}"#);
        let outcome = ready(router.handle_text(&mut c, resume.as_bytes(), now));
        assert_eq!(outcome.close, None);
        let got: Vec<serde_json::Value> = c_out
            .take()
            .iter()
            .map(|f| serde_json::from_str(f).unwrap())
            .collect();
        assert_eq!(got.len(), 3, "{got:?}");
        assert_eq!(got[0]["type"], "id");
        assert_eq!(got[1]["candidate"]["candidate"], "c1");
        assert_eq!(got[1]["seq"], 3);
        assert_eq!(got[2]["candidate"]["candidate"], "c2");
        assert_eq!(got[2]["seq"], 4);
        assert!(router.bus().held.lock().unwrap().is_empty());
    }

    /// A cluster bus that holds what it is sent, in order, and makes the first send (a flush's
    /// first message) wait until `gate` opens.
    struct GatedBus {
        held: std::sync::Mutex<Vec<String>>,
        sends: std::sync::atomic::AtomicUsize,
        /// Two permits once the first send waits (one for each future watching for it).
        started: tokio::sync::Semaphore,
        gate: tokio::sync::Semaphore,
    }

    impl Default for GatedBus {
        fn default() -> Self {
            Self {
                held: std::sync::Mutex::default(),
                sends: std::sync::atomic::AtomicUsize::new(0),
                started: tokio::sync::Semaphore::new(0),
                gate: tokio::sync::Semaphore::new(0),
            }
        }
    }

    impl Bus for GatedBus {
        async fn send(&self, _to: ClientId, envelope: Envelope) -> BusDelivery {
            let first = self
                .sends
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                == 0;
            let text = String::from_utf8_lossy(envelope.unsealed().0.json()).into_owned();
            if first {
                self.started.add_permits(2);
                let _permit = self.gate.acquire().await.unwrap();
            }
            self.held.lock().unwrap().push(text);
            BusDelivery::Held
        }

        fn holds_reserved(&self) -> bool {
            true
        }
    }

    /// In a cluster, a dropped client's unacknowledged messages move to the held place one by
    /// one; a message for it that arrives meanwhile is held after them, not in between (a resume
    /// replays the held place in order). Before, it was held at once and a resume delivered it
    /// ahead of older ones (seen across a drain as candidate 19 before 18).
    #[tokio::test]
    async fn a_message_for_a_client_whose_log_is_being_moved_is_held_after_that_log() {
        let limits = SignalingLimits::default();
        let hub = Hub::new(MemoryRegistry::new(&limits), NodeId::local(), limits);
        let router: Router<MemoryRegistry, GatedBus, TestOutbox> =
            Router::new(hub, GatedBus::default());
        let now = Instant::now();
        let (a_out, b_out) = (TestOutbox::with_capacity(64), TestOutbox::with_capacity(64));
        let mut a = ready(router.connect(a_out.clone(), None, now)).unwrap();
        let acks = Joining {
            address: None,
            acks: true,
        };
        let b = ready(router.join(b_out.clone(), None, acks, now)).unwrap();
        let b_id = b.id();
        let candidate = |n: u32| {
            format!(
                r#"{{"type":"ice-candidate","clientId":{b_id},"candidate":{{"candidate":"c{n}"}}}}"#
            )
        };
        let frame = offer(a.id(), b_id);
        let _ = router.handle_text(&mut a, frame.as_bytes(), now).await;
        let _ = router
            .handle_text(&mut a, candidate(1).as_bytes(), now)
            .await;
        assert_eq!(
            b_out.take().len(),
            3,
            "id, offer and c1 sent, none acknowledged"
        );

        // b drops: its log (offer, c1) moves to the bus, the first send held at the gate. While
        // it waits, a sends c2; only then does the gate open.
        let drop_b = router.disconnect(b, super::super::hub::Departure::Dropped, now);
        let send_c2 = async {
            router.bus().started.acquire().await.unwrap().forget();
            let _ = router
                .handle_text(&mut a, candidate(2).as_bytes(), now)
                .await;
        };
        let open = async {
            router.bus().started.acquire().await.unwrap().forget();
            // Everything else runs as far as it can before the flush goes on.
            for _ in 0..20 {
                tokio::task::yield_now().await;
            }
            router.bus().gate.add_permits(1);
        };
        tokio::join!(drop_b, send_c2, open);

        let held = router.bus().held.lock().unwrap().clone();
        let kinds: Vec<String> = held
            .iter()
            .map(|text| {
                let v: serde_json::Value = serde_json::from_str(text).unwrap();
                v["candidate"]["candidate"]
                    .as_str()
                    .map_or_else(|| v["type"].as_str().unwrap().to_owned(), str::to_owned)
            })
            .collect();
        assert_eq!(kinds, ["video-answer-request", "c1", "c2"]);
    }

    /// In a cluster a node handing an ID over to the node it resumed on waits until the message
    /// its connection here is still delivering is out (window 1 of the ordering review: the
    /// client's next message, sent from the new home, overtook it). `wait_sent` pends while the
    /// bus holds the message back and returns once it went; with nothing on its way, at once.
    #[tokio::test]
    async fn wait_sent_pends_while_a_message_of_the_connection_is_on_its_way() {
        use std::time::Duration;
        let limits = SignalingLimits::default();
        let hub = Hub::new(MemoryRegistry::new(&limits), NodeId::local(), limits);
        let router: Router<MemoryRegistry, GatedBus, TestOutbox> =
            Router::new(hub, GatedBus::default());
        let now = Instant::now();
        let mut a = ready(router.connect(TestOutbox::with_capacity(64), None, now)).unwrap();
        // b does not acknowledge: nothing stays in its log, so its drop moves nothing to the bus.
        let b = ready(router.connect(TestOutbox::with_capacity(64), None, now)).unwrap();
        let (a_id, b_id) = (a.id(), b.id());
        let _ = router
            .handle_text(&mut a, offer(a_id, b_id).as_bytes(), now)
            .await;
        router
            .disconnect(b, super::super::hub::Departure::Dropped, now)
            .await;
        router.wait_sent(a_id, Duration::from_secs(2)).await;

        // b is reserved: a's candidate goes to the bus, which holds it back at the gate.
        let candidate = format!(
            r#"{{"type":"ice-candidate","clientId":{b_id},"candidate":{{"candidate":"c1"}}}}"#
        );
        let send = router.handle_text(&mut a, candidate.as_bytes(), now);
        let check = async {
            router.bus().started.acquire().await.unwrap().forget();
            let waited = tokio::time::timeout(
                Duration::from_millis(50),
                router.wait_sent(a_id, Duration::from_secs(2)),
            )
            .await;
            assert!(
                waited.is_err(),
                "wait_sent returned with the message on its way"
            );
            router.bus().gate.add_permits(1);
            let started = std::time::Instant::now();
            router.wait_sent(a_id, Duration::from_secs(2)).await;
            assert!(started.elapsed() < Duration::from_secs(1));
        };
        let (outcome, ()) = tokio::join!(send, check);
        assert_eq!(outcome.close, None);
        assert_eq!(router.bus().held.lock().unwrap().len(), 1);
    }

    /// A cluster bus whose held place cannot be read (Redis times out).
    struct UnreadableBus;

    impl Bus for UnreadableBus {
        async fn send(&self, _to: ClientId, _envelope: Envelope) -> BusDelivery {
            BusDelivery::Held
        }

        fn holds_reserved(&self) -> bool {
            true
        }

        async fn read_held(&self, _to: Binding) -> Result<Held, super::super::bus::BusUnavailable> {
            Err(super::super::bus::BusUnavailable)
        }
    }

    /// Issue 13, gap 4: when the held place cannot be read after a resume, the client still gets
    /// its `id` message (with the new token) and the connection is closed with 1013, so the
    /// client resumes again and the messages, still held, reach it then. (Before, the resume
    /// went on as if nothing was held.)
    #[test]
    fn a_resume_whose_held_messages_cannot_be_read_gets_its_id_and_1013_to_come_back() {
        let limits = SignalingLimits::default();
        let hub = Hub::new(MemoryRegistry::new(&limits), NodeId::local(), limits);
        let router: Router<MemoryRegistry, UnreadableBus, TestOutbox> =
            Router::new(hub, UnreadableBus);
        let now = Instant::now();
        let b_out = TestOutbox::with_capacity(64);
        let b = ready(router.connect(b_out.clone(), None, now)).unwrap();
        let hello: serde_json::Value = serde_json::from_str(&b_out.take()[0]).unwrap();
        let token = hello["token"].as_str().unwrap().to_owned();
        let b_id = b.id();
        ready(router.disconnect(b, super::super::hub::Departure::Dropped, now));
        let c_out = TestOutbox::with_capacity(64);
        let mut c = ready(router.connect(c_out.clone(), None, now)).unwrap();
        c_out.take();
        let resume = format!(r#"{{"type":"resume","id":{b_id},"token":"{token}"}}"#);
        let outcome = ready(router.handle_text(&mut c, resume.as_bytes(), now));
        assert_eq!(outcome.close, Some(CloseCode::TryAgainLater));
        let got = c_out.take();
        let id: serde_json::Value = serde_json::from_str(&got[0]).unwrap();
        assert_eq!(id["resumed"], true, "{got:?}");
    }

    fn protocol_kind() -> crate::signaling::protocol::ServerKind {
        crate::signaling::protocol::ServerKind::VideoAnswerRequest
    }

    /// A recipient too slow to take a message is detached in the registry too, so its ID expires
    /// when its grace is over instead of staying "live" in the shared table for ever.
    #[test]
    fn a_peer_detached_for_being_slow_is_reserved_in_the_registry_and_expires() {
        let limits = SignalingLimits::default();
        let grace = limits.resume_grace;
        let router: TestRouter = Router::single_node(limits);
        let now = Instant::now();
        let a_out = TestOutbox::with_capacity(64);
        let mut a = ready(router.connect(a_out.clone(), None, now)).unwrap();
        // Room for the `id` message only: the offer will not fit.
        let b = ready(router.connect(TestOutbox::with_capacity(1), None, now)).unwrap();
        let frame = offer(a.id(), b.id());
        let outcome = ready(router.handle_text(&mut a, frame.as_bytes(), now));
        assert_eq!(outcome.detached_peer, Some(b.id()));
        assert_eq!(
            ready(router.hub().registry().locate(b.id())),
            Some(Location {
                node: NodeId::local(),
                epoch: b.binding().epoch,
                live: false
            })
        );
        // Not resumed: at the deadline the ID is gone from both tables and the caller is told.
        a_out.take();
        assert_eq!(
            ready(router.expire(now + grace + Duration::from_secs(1))),
            None
        );
        assert_eq!(ready(router.hub().registry().locate(b.id())), None);
        assert!(router.hub().registry().len() == 1);
        assert_eq!(router.connections().len(), 1);
        let told = a_out.take();
        assert!(
            told.iter().any(|f| f.contains("close-call-server")),
            "{told:?}"
        );
    }
}
