//! [`RelayedPorts`]: which relayed addresses belong to live allocations of this relay, readable
//! without a lock.
//!
//! The peer policy refuses the relay's own addresses as peers, except a live relayed address of
//! this same relay, so that two relayed callers can reach each other. A relay socket asks this for
//! every datagram it sends to an own address (a relay whose peers are on loopback or on its own
//! LAN address asks it per packet), so the answer is one bit per port in atomics: one load to read,
//! set when a relay socket is made, cleared when it is dropped. Relay sockets of one family bind
//! one IP, so the family and the port name a socket; the advertised IP may be an external one and
//! is not kept.
//!
//! This module holds numbers only; it never binds or owns a socket.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// 64 ports per word.
const WORDS: usize = (u16::MAX as usize + 1) / 64;

/// The live relayed ports of one relay, per address family: 16 KiB in all.
pub struct RelayedPorts {
    /// IPv4 relay sockets, one bit per port.
    v4: Box<[AtomicU64]>,
    /// IPv6 relay sockets, one bit per port.
    v6: Box<[AtomicU64]>,
    /// Bits set, for the bounded-memory checks.
    live: AtomicUsize,
}

impl Default for RelayedPorts {
    fn default() -> Self {
        let words = || (0..WORDS).map(|_| AtomicU64::new(0)).collect();
        RelayedPorts {
            v4: words(),
            v6: words(),
            live: AtomicUsize::new(0),
        }
    }
}

impl RelayedPorts {
    /// The word and bit of `relayed`'s family and port.
    fn slot(&self, relayed: SocketAddr) -> (&AtomicU64, u64) {
        let port = usize::from(relayed.port());
        let words = if relayed.is_ipv4() {
            &self.v4
        } else {
            &self.v6
        };
        (&words[port / 64], 1 << (port % 64))
    }

    /// A relay socket now lives on `relayed`'s family and port.
    pub fn insert(&self, relayed: SocketAddr) {
        let (word, bit) = self.slot(relayed);
        if word.fetch_or(bit, Ordering::Release) & bit == 0 {
            self.live.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The relay socket on `relayed`'s family and port is gone.
    pub fn remove(&self, relayed: SocketAddr) {
        let (word, bit) = self.slot(relayed);
        if word.fetch_and(!bit, Ordering::Release) & bit != 0 {
            self.live.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Whether a relay socket lives on `relayed`'s family and port (its IP is not looked at).
    pub fn contains(&self, relayed: SocketAddr) -> bool {
        let (word, bit) = self.slot(relayed);
        word.load(Ordering::Acquire) & bit != 0
    }

    /// How many relay sockets live.
    pub fn len(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }

    /// Whether no relay socket lives.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_kept_per_family_and_forgotten() {
        let set = RelayedPorts::default();
        let v4: SocketAddr = "192.0.2.1:50000".parse().unwrap();
        let external: SocketAddr = "203.0.113.9:50000".parse().unwrap();
        let v6: SocketAddr = "[2001:db8::1]:50000".parse().unwrap();
        assert!(!set.contains(v4));
        set.insert(v4);
        set.insert(v4);
        assert_eq!(set.len(), 1);
        assert!(set.contains(external), "the IP is not part of the key");
        assert!(!set.contains(v6), "nor is the other family");
        assert!(!set.contains("192.0.2.1:50001".parse().unwrap()));
        for port in [0, 63, 64, u16::MAX] {
            set.insert(SocketAddr::new(v6.ip(), port));
            assert!(set.contains(SocketAddr::new(v6.ip(), port)));
        }
        set.remove(v4);
        set.remove(v4);
        assert!(!set.contains(v4));
        assert_eq!(set.len(), 4);
    }
}
