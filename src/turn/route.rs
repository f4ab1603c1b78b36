//! [`JumboRoute`] and [`ClientPath`]: how one relay socket reaches its client with ChannelData too
//! large for the engine's 1500-byte buffers (see `jumbo.rs` for why), on the channels the engine
//! bound.
//!
//! This module holds one allocation's route and sends on it without waiting; it never decides
//! whether a datagram may be relayed (the engine's channel binding and the peer policy do).

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::UdpSocket;

use super::framing::frame_for_stream;
use super::write_queue::WriteQueue;

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
        /// The connection's write queue, bounded in bytes.
        queue: WriteQueue,
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
            ClientPath::Stream { queue } => queue.push(frame_for_stream(&frame)),
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
    use crate::turn::stats::TurnStats;

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

    #[tokio::test]
    async fn a_full_client_queue_drops_the_frame_instead_of_waiting() {
        let stats = Arc::new(TurnStats::default());
        let (queue, mut rx) = super::super::write_queue::channel(8, Arc::clone(&stats));
        let path = ClientPath::Stream { queue };
        assert!(path.send(channel_data(0x4000, b"first")));
        assert!(!path.send(channel_data(0x4000, b"second")), "queue full");
        assert!(rx.recv().await.is_some());
        assert!(path.send(channel_data(0x4000, b"third")));
        assert_eq!(stats.snapshot().client_queue_dropped, 1);
    }

    #[test]
    fn channel_data_layout() {
        assert_eq!(
            channel_data(0x4001, &[9, 8, 7]),
            [0x40, 0x01, 0, 3, 9, 8, 7]
        );
    }
}
