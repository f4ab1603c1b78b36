//! [`PortReservations`]: RESERVATION-TOKEN honoured (RFC 8656 §7.2, EVEN-PORT with R=1).
//!
//! The engine answers an EVEN-PORT Allocate with a RESERVATION-TOKEN but never reserves anything. The
//! front layer therefore watches for that success response, binds the next-higher port (P+1) itself
//! and keeps the socket under the token for 30 s. When an Allocate presents the token, the front puts
//! the socket in its [`ReservedSlot`], from which the relay-socket generator takes it for that very
//! allocation (the engine handles one request at a time per read loop). Unknown or expired tokens
//! are answered 508 by the gate.
//!
//! The gate asks whether a token is backed through [`ReservedTokens`]; it never holds the sockets.
//! This module owns the reserved sockets and their expiry; it must never hold more than
//! [`MAX_RESERVATIONS`] of them.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::bind::bind_udp_std;
use super::gate::ReservedTokens;
use super::settings::RelayIps;

/// How long a reserved port is held (RFC 8656 §7.2 suggests 30 s).
pub const RESERVATION_LIFETIME: Duration = Duration::from_secs(30);

/// Upper bound of ports held at once; beyond it tokens are not backed (and later get 508).
pub const MAX_RESERVATIONS: usize = 4096;

/// The socket handed from the front to its relay-socket generator for the next allocation.
pub type ReservedSlot = Arc<Mutex<Option<std::net::UdpSocket>>>;

/// Reserved relay ports by token.
pub struct PortReservations {
    relay_ips: RelayIps,
    max_port: u16,
    recv_buffer_bytes: usize,
    held: Mutex<HashMap<[u8; 8], (std::net::UdpSocket, Instant)>>,
}

impl PortReservations {
    /// Reservations binding on the relay IP of each family, never above `max_port`.
    pub fn new(relay_ips: RelayIps, max_port: u16, recv_buffer_bytes: usize) -> Self {
        PortReservations {
            relay_ips,
            max_port,
            recv_buffer_bytes,
            held: Mutex::new(HashMap::new()),
        }
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 8], (std::net::UdpSocket, Instant)>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Binds the port after `relayed`'s (same family) and holds it under `token`. Returns whether
    /// the port is now reserved.
    pub fn reserve(&self, token: [u8; 8], relayed: SocketAddr, now: Instant) -> bool {
        let Some(next) = relayed
            .port()
            .checked_add(1)
            .filter(|p| *p <= self.max_port)
        else {
            return false;
        };
        let Some(ip) = self.relay_ips.for_family(relayed.is_ipv4()) else {
            return false;
        };
        self.prune(now);
        if self.held().len() >= MAX_RESERVATIONS {
            return false;
        }
        let addr = SocketAddr::new(ip.bind, next);
        match bind_udp_std(addr, false, self.recv_buffer_bytes) {
            Ok(socket) => {
                self.held().insert(token, (socket, now));
                true
            }
            Err(e) => {
                tracing::debug!(%addr, "could not reserve the next relay port: {e}");
                false
            }
        }
    }

    /// Whether `token` is backed by a held port at `now`.
    pub fn contains(&self, token: &[u8; 8], now: Instant) -> bool {
        self.held()
            .get(token)
            .is_some_and(|(_, at)| now.saturating_duration_since(*at) < RESERVATION_LIFETIME)
    }

    /// Takes the socket reserved under `token`.
    pub fn take(&self, token: &[u8; 8]) -> Option<std::net::UdpSocket> {
        self.held().remove(token).map(|(s, _)| s)
    }

    /// Releases expired reservations.
    pub fn prune(&self, now: Instant) {
        self.held()
            .retain(|_, (_, at)| now.saturating_duration_since(*at) < RESERVATION_LIFETIME);
    }

    /// Ports currently held.
    pub fn len(&self) -> usize {
        self.held().len()
    }

    /// Whether no port is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl ReservedTokens for PortReservations {
    fn is_backed(&self, token: &[u8; 8], now: Instant) -> bool {
        self.contains(token, now)
    }
}

/// IPv4 loopback as the only relay address (tests, benches).
pub fn loopback() -> RelayIps {
    let ip = std::net::IpAddr::from([127, 0, 0, 1]);
    RelayIps {
        ipv4: Some(super::settings::RelayIp {
            bind: ip,
            advertised: ip,
        }),
        ipv6: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserves_the_next_port_and_expires() {
        let probe = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let p = probe.local_addr().unwrap().port();
        drop(probe);
        let r = PortReservations::new(loopback(), u16::MAX, 0);
        let t0 = Instant::now();
        // Reserve P+1 where P = p - 1, i.e. the port we just saw free.
        if !r.reserve([1; 8], SocketAddr::from(([127, 0, 0, 1], p - 1)), t0) {
            return; // Someone else took the port in between; nothing to assert.
        }
        assert!(r.contains(&[1; 8], t0));
        assert!(!r.contains(&[2; 8], t0));
        assert!(!r.contains(&[1; 8], t0 + RESERVATION_LIFETIME));
        let s = r.take(&[1; 8]).unwrap();
        assert_eq!(s.local_addr().unwrap().port(), p);
        assert!(r.take(&[1; 8]).is_none());
    }

    #[test]
    fn never_beyond_max_port_and_prunes() {
        let r = PortReservations::new(loopback(), 50_000, 0);
        let at = |port| SocketAddr::from(([127, 0, 0, 1], port));
        assert!(!r.reserve([1; 8], at(50_000), Instant::now()));
        assert!(!r.reserve([1; 8], at(u16::MAX), Instant::now()));
        let v6: SocketAddr = "[::1]:4000".parse().unwrap();
        assert!(
            !r.reserve([1; 8], v6, Instant::now()),
            "no IPv6 relay address"
        );
        assert!(r.is_empty());
    }
}
