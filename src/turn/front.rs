//! [`FrontShared`]: what the listeners do with the gate's verdicts, the same for the UDP front
//! (`udp.rs`) and the stream fronts (`stream.rs`). They read the clocks for the gate, put a
//! reserved port in the engine loop's slot, bind the port a RESERVATION-TOKEN promises, keep the
//! jumbo table in step with the engine's allocations and channels, relay oversized ChannelData,
//! and feed the engine's allocation-closed notifications back.
//!
//! This module carries decisions out; it makes none (the gate does) and owns no socket of its
//! own.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use tokio::sync::{mpsc, watch};
use turn::allocation::AllocationInfo;

use super::gate::{Gate, GateShared, Outbound, Verdict};
use super::jumbo::JumboTable;
use super::quota::{AllocationKey, Transport};
use super::reservation::{PortReservations, ReservedSlot};
use super::route::ClientPath;
use super::stats::TurnStats;

/// The state every listener of one relay acts on besides its own socket.
pub struct FrontShared {
    /// The gate's state, shared by every engine instance.
    pub gate: Arc<GateShared>,
    /// Allocations and channels, for ChannelData too large for the engine.
    pub jumbo: Arc<JumboTable>,
    /// Ports held for RESERVATION-TOKENs.
    pub reservations: Arc<PortReservations>,
    /// Counters.
    pub stats: Arc<TurnStats>,
}

/// What a listener does with a packet from a client once the gate has decided.
#[derive(Debug, PartialEq, Eq)]
pub enum Inbound<'a> {
    /// Hand the engine these bytes: the packet, or the gate's rewrite of it.
    Engine(Cow<'a, [u8]>),
    /// Send these bytes back to the client; the engine never sees the request.
    Reply(Vec<u8>),
    /// Nothing: the gate dropped the packet.
    Dropped,
}

impl FrontShared {
    /// Asks `gate` about `packet` from `src` arriving at `local` (reading the clocks only for
    /// STUN) and does what the verdict asks beside forwarding: moves a reserved port into this
    /// engine loop's `slot`, remembers a ChannelBind for the jumbo table.
    #[inline]
    pub fn inbound<'a>(
        &self,
        gate: &Gate,
        packet: &'a [u8],
        src: SocketAddr,
        local: SocketAddr,
        slot: &ReservedSlot,
    ) -> Inbound<'a> {
        let verdict = match Gate::inbound_data(packet, src) {
            // The media path: ChannelData, decided without a clock; nothing to carry out.
            Some(Verdict::Forward) => return Inbound::Engine(Cow::Borrowed(packet)),
            Some(verdict) => verdict,
            None => gate.inbound(packet, src, local, SystemTime::now(), Instant::now()),
        };
        self.carry_out(gate, verdict, packet, src, local, slot)
    }

    /// Does what `verdict` asks beside forwarding (see [`FrontShared::inbound`]).
    fn carry_out<'a>(
        &self,
        gate: &Gate,
        verdict: Verdict,
        packet: &'a [u8],
        src: SocketAddr,
        local: SocketAddr,
        slot: &ReservedSlot,
    ) -> Inbound<'a> {
        match verdict {
            Verdict::Forward => Inbound::Engine(Cow::Borrowed(packet)),
            Verdict::ForwardRewritten(bytes) => Inbound::Engine(Cow::Owned(bytes)),
            Verdict::ForwardReserved { token, rewritten } => {
                let socket = self.reservations.take(&token);
                *slot.lock().unwrap_or_else(|p| p.into_inner()) = socket;
                Inbound::Engine(rewritten.map_or(Cow::Borrowed(packet), Cow::Owned))
            }
            Verdict::ForwardBind {
                transaction,
                number,
                peer,
            } => {
                let key = (gate.transport(), src, local);
                self.jumbo.bind_requested(key, transaction, number, peer);
                Inbound::Engine(Cow::Borrowed(packet))
            }
            Verdict::Reply(bytes) => Inbound::Reply(bytes),
            Verdict::Drop(_) => Inbound::Dropped,
        }
    }

    /// Shows `gate` what the engine sends to `dst` from `local` (relayed data goes without a look
    /// or a clock) and does what the answer asks beside sending: binds the port a
    /// RESERVATION-TOKEN promises and tells the jumbo table about the allocation, reached through
    /// `path`, or about the channel. Returns the gate's answer: the caller sends unless it is
    /// [`Outbound::Swallow`] or [`Outbound::Primed`].
    #[inline]
    pub fn outbound(
        &self,
        gate: &Gate,
        packet: &[u8],
        dst: SocketAddr,
        local: SocketAddr,
        path: impl FnOnce() -> ClientPath,
    ) -> Outbound {
        if !Gate::outbound_needs_look(packet) {
            return Outbound::Send;
        }
        let now = Instant::now();
        let answer = gate.outbound(packet, dst, local, now);
        let key = (gate.transport(), dst, local);
        match answer {
            Outbound::AllocatedThenSend { relayed, reserve } => {
                if let Some(token) = reserve {
                    self.reservations.reserve(token, relayed, now);
                }
                self.jumbo.allocated(key, relayed, path());
            }
            Outbound::ChannelBindAnswered {
                transaction,
                bound: true,
            } => self.jumbo.bind_confirmed(key, transaction),
            Outbound::ChannelBindAnswered {
                transaction,
                bound: false,
            } => self.jumbo.bind_refused(key, transaction),
            Outbound::Send | Outbound::Swallow | Outbound::Primed => {}
        }
        answer
    }

    /// Relays a client's ChannelData too large for the engine on its bound channel (or counts it
    /// dropped).
    pub async fn relay_oversized(&self, key: &AllocationKey, message: &[u8]) {
        self.jumbo.relay_oversized(key, message, &self.stats).await;
    }

    /// The engine closed the allocation `key`.
    pub fn allocation_closed(&self, key: &AllocationKey) {
        self.jumbo.closed(key);
        self.gate.allocation_closed(key);
    }

    /// Periodic housekeeping at `now`: the gate's maps and expired reservations.
    pub fn maintain(&self, now: Instant) {
        self.gate.maintain(now);
        self.reservations.prune(now);
    }
}

/// Feeds one engine's allocation-closed notifications to the quota ledger and the jumbo table
/// until `shutdown`.
pub async fn forward_closes(
    transport: Transport,
    mut rx: mpsc::Receiver<AllocationInfo>,
    front: Arc<FrontShared>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let info = tokio::select! {
            info = rx.recv() => info,
            _ = shutdown.wait_for(|s| *s) => None,
        };
        let Some(info) = info else { return };
        let t = info.five_tuple;
        front.allocation_closed(&(transport, t.src_addr, t.dst_addr));
    }
}
