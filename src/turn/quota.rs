//! [`AllocationLedger`]: who holds how many allocations, so the front layer can answer 486
//! (Allocation Quota Reached) before the engine creates one.
//!
//! The ledger owns counting only. It learns of allocations from three events the front layer
//! observes — an Allocate request passing authentication (`reserve`), the engine's response
//! (`confirm` / `release`), and the engine's close notification (`release`) — and never touches a
//! socket. Its size is bounded by the total quota: a reservation that would exceed it is refused
//! rather than stored.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::source::source_key;

/// Which listener an allocation came through; with the two socket addresses it names the RFC's
/// 5-tuple.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    /// A UDP listener.
    Udp,
    /// A TCP listener.
    Tcp,
    /// A TLS listener.
    Tls,
}

/// The client side of an allocation: transport, client address, listener address.
pub type AllocationKey = (Transport, SocketAddr, SocketAddr);

/// Why an allocation was refused with 486.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum QuotaExceeded {
    /// The REST user already holds `user-quota` allocations.
    #[error("the user already holds its quota of {0} allocations")]
    User(usize),
    /// The relay already holds `total-quota` allocations.
    #[error("the relay already holds its total quota of {0} allocations")]
    Total(usize),
    /// The client's address (IPv6: its /64) already holds `allocations-per-ip` allocations.
    #[error("the client's address (IPv6: its /64) already holds its quota of {0} allocations")]
    Source(usize),
}

/// A reservation that did not hear back from the engine within this time is forgotten, so a lost
/// response cannot leak quota.
pub const PENDING_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a permission lives without refresh (RFC 8656 §9: 300 s); the ledger forgets peers it
/// has not seen for this long.
pub const PERMISSION_LIFETIME: Duration = Duration::from_secs(300);

/// Refused with 508: the allocation already has this many distinct peer IPs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the allocation already has permissions for {0} peer addresses")]
pub struct TooManyPermissions(pub usize);

#[derive(Debug)]
struct Entry {
    user: Arc<str>,
    /// `Some(since)` until the engine confirms the allocation.
    pending_since: Option<Instant>,
    /// Peer IPs with a live permission (the engine keys permissions by IP), last installed at.
    peers: HashMap<std::net::IpAddr, Instant>,
}

/// Counts allocations per user and in total. Not thread-safe by itself; the front layer keeps it in
/// a mutex held only for these O(1) operations.
#[derive(Debug)]
pub struct AllocationLedger {
    user_quota: usize,
    total_quota: usize,
    source_quota: usize,
    entries: HashMap<AllocationKey, Entry>,
    per_user: HashMap<Arc<str>, usize>,
    /// Allocations per [`source_key`] of the client address: anonymous WebSocket clients each get
    /// their own user, so only this stops one address from taking the total quota.
    per_source: HashMap<IpAddr, usize>,
}

/// What a [`AllocationLedger::reserve`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reservation {
    /// A new slot was taken for this 5-tuple.
    New,
    /// The 5-tuple already had one (a retransmission or a second Allocate the engine will answer
    /// 437); nothing changed.
    Existing,
}

impl AllocationLedger {
    /// A ledger enforcing `user_quota` per user, `source_quota` per client address (IPv6: per
    /// /64) and `total_quota` overall.
    pub fn new(user_quota: usize, total_quota: usize, source_quota: usize) -> Self {
        AllocationLedger {
            user_quota,
            total_quota,
            source_quota,
            entries: HashMap::new(),
            per_user: HashMap::new(),
            per_source: HashMap::new(),
        }
    }

    /// Takes a slot for `user` on `key` or says which quota is full.
    pub fn reserve(
        &mut self,
        key: AllocationKey,
        user: &str,
        now: Instant,
    ) -> Result<Reservation, QuotaExceeded> {
        if self.entries.contains_key(&key) {
            return Ok(Reservation::Existing);
        }
        if self.entries.len() >= self.total_quota {
            self.expire_pending(now);
            if self.entries.len() >= self.total_quota {
                return Err(QuotaExceeded::Total(self.total_quota));
            }
        }
        let source = source_key(key.1.ip());
        if self.per_source.get(&source).copied().unwrap_or(0) >= self.source_quota {
            self.expire_pending(now);
            if self.per_source.get(&source).copied().unwrap_or(0) >= self.source_quota {
                return Err(QuotaExceeded::Source(self.source_quota));
            }
        }
        if self.per_user.get(user).copied().unwrap_or(0) >= self.user_quota {
            self.expire_pending(now);
            if self.per_user.get(user).copied().unwrap_or(0) >= self.user_quota {
                return Err(QuotaExceeded::User(self.user_quota));
            }
        }
        let user: Arc<str> = match self.per_user.get_key_value(user) {
            Some((k, _)) => Arc::clone(k),
            None => Arc::from(user),
        };
        *self.per_user.entry(Arc::clone(&user)).or_insert(0) += 1;
        *self.per_source.entry(source).or_insert(0) += 1;
        self.entries.insert(
            key,
            Entry {
                user,
                pending_since: Some(now),
                peers: HashMap::new(),
            },
        );
        Ok(Reservation::New)
    }

    /// The engine created the allocation. Returns true if it was pending (so count it once).
    pub fn confirm(&mut self, key: &AllocationKey) -> bool {
        match self.entries.get_mut(key) {
            Some(e) if e.pending_since.is_some() => {
                e.pending_since = None;
                true
            }
            _ => false,
        }
    }

    /// The allocation was refused by the engine or has closed. Returns whether it had been
    /// confirmed (so the caller can decrement its active gauge).
    pub fn release(&mut self, key: &AllocationKey) -> Option<bool> {
        let e = self.entries.remove(key)?;
        if let Some(n) = self.per_user.get_mut(&e.user) {
            *n -= 1;
            if *n == 0 {
                self.per_user.remove(&e.user);
            }
        }
        let source = source_key(key.1.ip());
        if let Some(n) = self.per_source.get_mut(&source) {
            *n -= 1;
            if *n == 0 {
                self.per_source.remove(&source);
            }
        }
        Some(e.pending_since.is_none())
    }

    /// Forgets reservations the engine never answered within [`PENDING_TIMEOUT`].
    pub fn expire_pending(&mut self, now: Instant) {
        let stale: Vec<AllocationKey> = self
            .entries
            .iter()
            .filter(|(_, e)| {
                e.pending_since
                    .is_some_and(|t| now.saturating_duration_since(t) >= PENDING_TIMEOUT)
            })
            .map(|(k, _)| *k)
            .collect();
        for k in stale {
            self.release(&k);
        }
    }

    /// Records that the allocation on `key` is about to get permissions for `ips`, refusing if that
    /// would exceed `cap` distinct live peer IPs. Keys without an allocation are let through
    /// unrecorded (the engine ignores such requests), so the ledger never grows from them.
    pub fn admit_peers(
        &mut self,
        key: &AllocationKey,
        ips: &[std::net::IpAddr],
        cap: usize,
        now: Instant,
    ) -> Result<(), TooManyPermissions> {
        let Some(entry) = self.entries.get_mut(key) else {
            return Ok(());
        };
        let new = ips
            .iter()
            .filter(|ip| !entry.peers.contains_key(ip))
            .count();
        if entry.peers.len() + new > cap {
            entry
                .peers
                .retain(|_, at| now.saturating_duration_since(*at) < PERMISSION_LIFETIME);
            let new = ips
                .iter()
                .filter(|ip| !entry.peers.contains_key(ip))
                .count();
            if entry.peers.len() + new > cap {
                return Err(TooManyPermissions(cap));
            }
        }
        for ip in ips {
            entry.peers.insert(*ip, now);
        }
        Ok(())
    }

    /// Allocations held (pending or confirmed) by `user`.
    pub fn held_by(&self, user: &str) -> usize {
        self.per_user.get(user).copied().unwrap_or(0)
    }

    /// Allocations held in total (pending or confirmed).
    pub fn total(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(port: u16) -> AllocationKey {
        (
            Transport::Udp,
            SocketAddr::from(([192, 0, 2, 1], port)),
            SocketAddr::from(([192, 0, 2, 100], 3478)),
        )
    }

    #[test]
    fn source_quota_counts_ipv4_per_address_and_ipv6_per_64() {
        let now = Instant::now();
        let listener = SocketAddr::from(([192, 0, 2, 100], 3478));
        let from = |ip: &str, port: u16| {
            (
                Transport::Udp,
                SocketAddr::new(ip.parse().unwrap(), port),
                listener,
            )
        };
        let mut l = AllocationLedger::new(100, 100, 2);
        // Each allocation under its own user (as anonymous WebSocket clients are).
        assert!(l.reserve(from("198.51.100.1", 1), "u1", now).is_ok());
        assert!(l.reserve(from("198.51.100.1", 2), "u2", now).is_ok());
        assert_eq!(
            l.reserve(from("198.51.100.1", 3), "u3", now),
            Err(QuotaExceeded::Source(2))
        );
        assert!(
            l.reserve(from("198.51.100.2", 3), "u3", now).is_ok(),
            "another address"
        );
        // Fresh IPv6 addresses in one /64 count together; another /64 does not.
        assert!(l.reserve(from("2001:db8:0:1::1", 1), "v1", now).is_ok());
        assert!(l.reserve(from("2001:db8:0:1::2", 1), "v2", now).is_ok());
        assert_eq!(
            l.reserve(from("2001:db8:0:1:dead:beef::3", 1), "v3", now),
            Err(QuotaExceeded::Source(2))
        );
        assert!(l.reserve(from("2001:db8:0:2::1", 1), "v3", now).is_ok());
        // Releasing one frees its address's slot.
        l.release(&from("2001:db8:0:1::1", 1));
        assert!(l.reserve(from("2001:db8:0:1::9", 1), "v4", now).is_ok());
        // Unanswered reservations expire and free the slot too.
        let later = now + PENDING_TIMEOUT;
        assert!(l.reserve(from("198.51.100.1", 4), "u4", later).is_ok());
    }

    #[test]
    fn user_quota_counts_pending_and_confirmed() {
        let now = Instant::now();
        let mut l = AllocationLedger::new(2, 100, usize::MAX);
        assert_eq!(l.reserve(key(1), "a", now), Ok(Reservation::New));
        assert!(l.confirm(&key(1)));
        assert!(!l.confirm(&key(1)), "confirmed once");
        assert_eq!(l.reserve(key(2), "a", now), Ok(Reservation::New));
        assert_eq!(l.reserve(key(3), "a", now), Err(QuotaExceeded::User(2)));
        assert_eq!(
            l.reserve(key(3), "b", now),
            Ok(Reservation::New),
            "other user"
        );
        assert_eq!(l.held_by("a"), 2);
        assert_eq!(l.release(&key(1)), Some(true));
        assert_eq!(l.release(&key(1)), None, "released once");
        assert_eq!(l.reserve(key(4), "a", now), Ok(Reservation::New));
        assert_eq!(l.total(), 3);
    }

    #[test]
    fn same_five_tuple_does_not_count_twice() {
        let now = Instant::now();
        let mut l = AllocationLedger::new(1, 1, usize::MAX);
        assert_eq!(l.reserve(key(1), "a", now), Ok(Reservation::New));
        assert_eq!(l.reserve(key(1), "a", now), Ok(Reservation::Existing));
        assert_eq!(l.held_by("a"), 1);
    }

    #[test]
    fn total_quota_applies_across_users() {
        let now = Instant::now();
        let mut l = AllocationLedger::new(10, 2, usize::MAX);
        l.reserve(key(1), "a", now).unwrap();
        l.reserve(key(2), "b", now).unwrap();
        assert_eq!(l.reserve(key(3), "c", now), Err(QuotaExceeded::Total(2)));
        assert_eq!(l.release(&key(2)), Some(false), "was still pending");
        assert_eq!(l.reserve(key(3), "c", now), Ok(Reservation::New));
    }

    #[test]
    fn unanswered_reservations_expire() {
        let t0 = Instant::now();
        let mut l = AllocationLedger::new(1, 10, usize::MAX);
        l.reserve(key(1), "a", t0).unwrap();
        assert!(l.reserve(key(2), "a", t0 + Duration::from_secs(1)).is_err());
        assert_eq!(
            l.reserve(key(2), "a", t0 + PENDING_TIMEOUT),
            Ok(Reservation::New)
        );
        assert_eq!(l.total(), 1);
        // Confirmed ones never expire.
        l.confirm(&key(2));
        l.expire_pending(t0 + PENDING_TIMEOUT * 10);
        assert_eq!(l.held_by("a"), 1);
    }

    #[test]
    fn permissions_per_allocation_are_capped_and_expire() {
        let t0 = Instant::now();
        let mut l = AllocationLedger::new(5, 5, usize::MAX);
        let ip = |n: u8| std::net::IpAddr::from([8, 8, 8, n]);
        // No allocation: let through, nothing recorded.
        assert_eq!(l.admit_peers(&key(9), &[ip(1)], 2, t0), Ok(()));
        l.reserve(key(1), "a", t0).unwrap();
        l.confirm(&key(1));
        assert_eq!(l.admit_peers(&key(1), &[ip(1), ip(2)], 2, t0), Ok(()));
        assert_eq!(l.admit_peers(&key(1), &[ip(1)], 2, t0), Ok(()), "refresh");
        assert_eq!(
            l.admit_peers(&key(1), &[ip(3)], 2, t0),
            Err(TooManyPermissions(2))
        );
        // ip(2) expires; ip(1) was refreshed later.
        let later = t0 + PERMISSION_LIFETIME;
        assert_eq!(
            l.admit_peers(&key(1), &[ip(1)], 2, later - Duration::from_secs(1)),
            Ok(())
        );
        assert_eq!(l.admit_peers(&key(1), &[ip(3)], 2, later), Ok(()));
        assert_eq!(
            l.admit_peers(&key(1), &[ip(4)], 2, later),
            Err(TooManyPermissions(2))
        );
    }

    #[test]
    fn per_user_map_shrinks_back_to_empty() {
        let now = Instant::now();
        let mut l = AllocationLedger::new(5, 5, usize::MAX);
        for p in 0..5 {
            l.reserve(key(p), &format!("u{p}"), now).unwrap();
        }
        for p in 0..5 {
            l.release(&key(p));
        }
        assert_eq!(l.total(), 0);
        assert!(l.per_user.is_empty());
    }
}
