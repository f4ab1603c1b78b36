//! [`JumboTable`]: relays ChannelData too large for the engine's 1500-byte buffers.
//!
//! The engine reads every client packet and every peer datagram into 1500 bytes, so larger ones
//! would be cut. The fronts and relay sockets read into 64 KiB instead and hand anything that fits
//! to the engine as before; what does not fit is relayed here, for **bound channels only** (a
//! channel implies a permission, so no permission state has to be mirrored):
//!
//! * client → peer: the front looks up the allocation's relay socket and the channel's peer and
//!   sends the payload through the relay socket (policy, bandwidth cap and counters still apply);
//! * peer → client: the relay socket finds the channel bound to the sender and sends ChannelData
//!   through the client's listener ([`ClientPath`](super::route::ClientPath)).
//!
//! The table finds relay sockets in [`PeerSockets`] (by port), learns allocations from the engine's
//! Allocate success responses, and channels from ChannelBind requests the gate let through once the
//! engine answers them with success; the fronts tell it both (the gate's verdicts name them). It
//! forgets an allocation when it closes. It must never relay to a peer the engine has not bound a
//! channel to.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};

use super::inspect::{self, Packet};
use super::peer::{PeerSocket, PeerSockets};
use super::quota::AllocationKey;
use super::route::ClientPath;
use super::stats::TurnStats;

/// Pending ChannelBind requests remembered at most (a bound: entries wait only for the engine's
/// answer, normally microseconds).
const MAX_PENDING_BINDS: usize = 4096;

/// What the relay knows about allocations beyond the engine, for oversized ChannelData.
pub struct JumboTable {
    /// Every live relay socket, by relayed port.
    sockets: Arc<PeerSockets>,
    /// Each confirmed allocation's relay socket.
    by_allocation: Mutex<HashMap<AllocationKey, Weak<PeerSocket>>>,
    /// ChannelBinds the gate let through, until the engine answers them.
    pending_binds: Mutex<HashMap<PendingBind, (u16, SocketAddr)>>,
}

/// A ChannelBind awaiting the engine's answer: the allocation and the transaction ID.
type PendingBind = (AllocationKey, [u8; 12]);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl JumboTable {
    /// A table over the relay sockets registered in `sockets`.
    pub fn new(sockets: Arc<PeerSockets>) -> Self {
        JumboTable {
            sockets,
            by_allocation: Mutex::default(),
            pending_binds: Mutex::default(),
        }
    }

    /// The engine confirmed the allocation `key` on `relayed`; its client is reached by `path`.
    pub fn allocated(&self, key: AllocationKey, relayed: SocketAddr, path: ClientPath) {
        let Some(socket) = self.sockets.get(relayed) else {
            return;
        };
        socket.jumbo_route().client = Some(path);
        lock(&self.by_allocation).insert(key, Arc::downgrade(&socket));
    }

    /// The gate let a ChannelBind through; remember it until the engine answers.
    pub fn bind_requested(&self, key: AllocationKey, tid: [u8; 12], number: u16, peer: SocketAddr) {
        if !lock(&self.by_allocation).contains_key(&key) {
            return;
        }
        let mut pending = lock(&self.pending_binds);
        if pending.len() >= MAX_PENDING_BINDS {
            pending.clear();
        }
        pending.insert((key, tid), (number, peer));
    }

    /// The engine answered the ChannelBind `tid` on `key` with success.
    pub fn bind_confirmed(&self, key: AllocationKey, tid: [u8; 12]) {
        let Some((number, peer)) = lock(&self.pending_binds).remove(&(key, tid)) else {
            return;
        };
        if let Some(socket) = lock(&self.by_allocation).get(&key).and_then(Weak::upgrade) {
            socket.jumbo_route().bind(number, peer);
        }
    }

    /// The engine answered a ChannelBind with an error.
    pub fn bind_refused(&self, key: AllocationKey, tid: [u8; 12]) {
        lock(&self.pending_binds).remove(&(key, tid));
    }

    /// The allocation closed.
    pub fn closed(&self, key: &AllocationKey) {
        lock(&self.by_allocation).remove(key);
    }

    /// Where an oversized ChannelData on channel `number` from `key` goes.
    pub fn to_peer(
        &self,
        key: &AllocationKey,
        number: u16,
    ) -> Option<(Arc<PeerSocket>, SocketAddr)> {
        let socket = lock(&self.by_allocation).get(key).and_then(Weak::upgrade)?;
        let peer = socket.jumbo_route().peer_for(number)?;
        Some((socket, peer))
    }

    /// Relays a client's ChannelData message too large for the engine's buffer on its bound
    /// channel, or counts it as dropped when it is not ChannelData on a channel we track.
    pub async fn relay_oversized(&self, key: &AllocationKey, message: &[u8], stats: &TurnStats) {
        let route = match inspect::inspect(message) {
            Ok(Packet::ChannelData { number, len }) => self
                .to_peer(key, number)
                .map(|(socket, peer)| (socket, peer, len)),
            _ => None,
        };
        match route {
            Some((socket, peer, len)) => {
                let _ = webrtc_util::Conn::send_to(&*socket, &message[4..4 + len], peer).await;
            }
            None => TurnStats::bump(&stats.oversized_dropped),
        }
    }

    /// (relay sockets, allocations, pending binds) tracked, for the bounded-memory checks.
    pub fn sizes(&self) -> (usize, usize, usize) {
        (
            self.sockets.len(),
            lock(&self.by_allocation).len(),
            lock(&self.pending_binds).len(),
        )
    }
}
