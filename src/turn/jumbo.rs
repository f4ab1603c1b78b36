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
//!   through the client's listener ([`ClientPath`]).
//!
//! The table learns relay sockets from the generator (by port), allocations from the engine's
//! Allocate success responses, and channels from ChannelBind requests the gate let through once the
//! engine answers them with success. It forgets them when the allocation closes. It must never
//! relay to a peer the engine has not bound a channel to.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};

use tokio::net::UdpSocket;
use tokio::sync::mpsc;

use super::peer::PeerSocket;
use super::quota::AllocationKey;
use super::stats::TurnStats;

/// Pending ChannelBind requests remembered at most (a bound: entries wait only for the engine's
/// answer, normally microseconds).
const MAX_PENDING_BINDS: usize = 4096;

/// How a relay socket reaches its client without going through the engine.
#[derive(Clone)]
pub enum ClientPath {
    /// Through the UDP listening socket the client talks to.
    Udp {
        /// The listening socket (any SO_REUSEPORT sibling sends from the same address).
        socket: Arc<UdpSocket>,
        /// The client's address.
        client: SocketAddr,
    },
    /// Through the TCP/TLS connection's write queue (frames are padded by the sender).
    Stream {
        /// The connection's bounded write queue.
        queue: mpsc::Sender<Vec<u8>>,
    },
}

impl ClientPath {
    /// Sends one ChannelData frame to the client without waiting: a full socket buffer or write
    /// queue drops the frame, as UDP would. Returns whether it was handed on.
    ///
    /// Not `async` on purpose: relay sockets call this from inside their receive future, which
    /// every idle allocation keeps allocated; an awaited send would make that future several
    /// hundred bytes larger for a path that is almost never taken.
    pub fn send(&self, frame: Vec<u8>) -> bool {
        match self {
            ClientPath::Udp { socket, client } => socket.try_send_to(&frame, *client).is_ok(),
            ClientPath::Stream { queue } => queue
                .try_send(super::stream::frame_for_stream(&frame))
                .is_ok(),
        }
    }
}

/// The channels and client path of one relay socket.
#[derive(Default)]
pub struct JumboRoute {
    /// Set when the engine confirms the allocation.
    pub client: Option<ClientPath>,
    /// Bound channels: (number, peer). A handful per allocation; scanned only for oversized
    /// datagrams.
    pub channels: Vec<(u16, SocketAddr)>,
}

impl JumboRoute {
    /// The channel bound to `peer`, if any.
    pub fn channel_for(&self, peer: SocketAddr) -> Option<u16> {
        self.channels
            .iter()
            .find(|(_, p)| *p == peer)
            .map(|(n, _)| *n)
    }

    /// The peer bound to channel `number`, if any.
    pub fn peer_for(&self, number: u16) -> Option<SocketAddr> {
        self.channels
            .iter()
            .find(|(n, _)| *n == number)
            .map(|(_, p)| *p)
    }

    /// Records a confirmed binding (RFC 8656: a channel and a peer are bound to each other only).
    pub fn bind(&mut self, number: u16, peer: SocketAddr) {
        self.channels.retain(|(n, p)| *n != number && *p != peer);
        self.channels.push((number, peer));
    }
}

/// What the relay knows about allocations beyond the engine, for oversized ChannelData.
#[derive(Default)]
pub struct JumboTable {
    /// By relayed address: (IPv4?, port), since the advertised IP may be an external one.
    by_port: Mutex<HashMap<(bool, u16), Weak<PeerSocket>>>,
    by_allocation: Mutex<HashMap<AllocationKey, Weak<PeerSocket>>>,
    pending_binds: Mutex<HashMap<PendingBind, (u16, SocketAddr)>>,
}

/// A ChannelBind awaiting the engine's answer: the allocation and the transaction ID.
type PendingBind = (AllocationKey, [u8; 12]);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl JumboTable {
    /// A relay socket was created for the relayed address `relayed`.
    pub fn register(&self, relayed: SocketAddr, socket: Weak<PeerSocket>) {
        lock(&self.by_port).insert((relayed.is_ipv4(), relayed.port()), socket);
    }

    /// Whether `relayed` is the relayed address of a live allocation of this relay (by family and
    /// port: the advertised IP may be an external one). The peer policy lets such peers through
    /// although they are the relay's own address, so relayed callers can reach each other.
    pub fn is_relayed(&self, relayed: SocketAddr) -> bool {
        lock(&self.by_port)
            .get(&(relayed.is_ipv4(), relayed.port()))
            .is_some_and(|w| w.strong_count() > 0)
    }

    /// The relay socket for `relayed` is gone.
    pub fn unregister(&self, relayed: SocketAddr) {
        let k = (relayed.is_ipv4(), relayed.port());
        let mut by_port = lock(&self.by_port);
        if by_port.get(&k).is_some_and(|w| w.strong_count() == 0) {
            by_port.remove(&k);
        }
    }

    /// The engine confirmed the allocation `key` on `relayed`; its client is reached by `path`.
    pub fn allocated(&self, key: AllocationKey, relayed: SocketAddr, path: ClientPath) {
        let k = (relayed.is_ipv4(), relayed.port());
        let Some(socket) = lock(&self.by_port).get(&k).and_then(Weak::upgrade) else {
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
        let route = match super::inspect::inspect(message) {
            Ok(super::inspect::Packet::ChannelData { number, len }) => self
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
            lock(&self.by_port).len(),
            lock(&self.by_allocation).len(),
            lock(&self.pending_binds).len(),
        )
    }
}

/// Builds a ChannelData message (without stream padding).
pub fn channel_data(number: u16, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(4 + payload.len());
    v.extend_from_slice(&number.to_be_bytes());
    v.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    v.extend_from_slice(payload);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_channel_and_a_peer_are_bound_to_each_other_only() {
        let a: SocketAddr = "192.0.2.1:1".parse().unwrap();
        let b: SocketAddr = "192.0.2.2:2".parse().unwrap();
        let mut r = JumboRoute::default();
        r.bind(0x4000, a);
        r.bind(0x4001, b);
        assert_eq!(r.peer_for(0x4000), Some(a));
        assert_eq!(r.channel_for(b), Some(0x4001));
        r.bind(0x4000, a); // refresh
        assert_eq!(r.channels.len(), 2);
        r.bind(0x4002, a); // rebinding a peer to another channel replaces the old pair
        assert_eq!(r.channel_for(a), Some(0x4002));
        assert_eq!(r.peer_for(0x4000), None);
    }

    #[test]
    fn a_full_client_queue_drops_the_frame_instead_of_waiting() {
        let (queue, mut rx) = mpsc::channel(1);
        let path = ClientPath::Stream { queue };
        assert!(path.send(channel_data(0x4000, b"first")));
        assert!(!path.send(channel_data(0x4000, b"second")), "queue full");
        assert!(rx.try_recv().is_ok());
        assert!(path.send(channel_data(0x4000, b"third")));
    }

    #[test]
    fn channel_data_layout() {
        assert_eq!(
            channel_data(0x4001, &[9, 8, 7]),
            [0x40, 0x01, 0, 3, 9, 8, 7]
        );
    }
}
