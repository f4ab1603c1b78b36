//! [`TurnStats`]: the relay's counters, plain atomics that the metrics layer reads and exports. This
//! module must not depend on prometheus; it only counts.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters the relay updates on its hot paths with relaxed atomics. Read them with
/// [`TurnStats::snapshot`].
#[derive(Debug, Default)]
pub struct TurnStats {
    /// Allocations currently alive.
    pub allocations_active: AtomicU64,
    /// Allocations created since start.
    pub allocations_created: AtomicU64,
    /// Allocate requests refused with 486 because the user's quota was full.
    pub quota_hits_user: AtomicU64,
    /// Allocate requests refused with 486 because the total quota was full.
    pub quota_hits_total: AtomicU64,
    /// Allocate requests the engine refused (bad transport, no port free, …).
    pub allocations_failed: AtomicU64,
    /// Requests answered 401 because credentials were wrong, expired or malformed.
    pub auth_failures: AtomicU64,
    /// CreatePermission / ChannelBind requests answered 403, plus datagrams dropped at a relay
    /// socket because their destination is refused.
    pub refused_peers: AtomicU64,
    /// Unauthenticated requests dropped because their source IP exceeded its rate.
    pub rate_limited: AtomicU64,
    /// Datagrams dropped because an allocation exceeded its bandwidth cap.
    pub bandwidth_dropped: AtomicU64,
    /// Datagrams dropped because they were larger than the engine can carry without truncation.
    pub oversized_dropped: AtomicU64,
    /// Payload bytes relayed from clients to peers.
    pub bytes_to_peers: AtomicU64,
    /// Datagrams relayed from clients to peers.
    pub packets_to_peers: AtomicU64,
    /// Payload bytes relayed from peers to clients.
    pub bytes_to_clients: AtomicU64,
    /// Datagrams relayed from peers to clients.
    pub packets_to_clients: AtomicU64,
    /// TCP and TLS client connections currently open.
    pub stream_connections: AtomicU64,
    /// Of those, TLS connections that came in on the HTTPS port (`turn-on-https-port`).
    pub https_port_connections: AtomicU64,
    /// Authenticated requests answered 400 because the engine could read them differently from
    /// the gate (attributes after MESSAGE-INTEGRITY, duplicates, malformed peer addresses).
    pub ambiguous_requests: AtomicU64,
    /// Allocate requests refused with 486 because their source address (IPv6: its /64) held
    /// `allocations-per-ip` allocations.
    pub quota_hits_ip: AtomicU64,
    /// Frames for TCP/TLS clients dropped because the client's write queue was at its byte
    /// budget (the client reads slower than it is sent to).
    pub client_queue_dropped: AtomicU64,
}

/// A copy of [`TurnStats`] at one instant, for exporting and asserting in tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[allow(missing_docs)] // Same fields as TurnStats, documented there.
pub struct TurnStatsSnapshot {
    pub allocations_active: u64,
    pub allocations_created: u64,
    pub quota_hits_user: u64,
    pub quota_hits_total: u64,
    pub allocations_failed: u64,
    pub auth_failures: u64,
    pub refused_peers: u64,
    pub rate_limited: u64,
    pub bandwidth_dropped: u64,
    pub oversized_dropped: u64,
    pub bytes_to_peers: u64,
    pub packets_to_peers: u64,
    pub bytes_to_clients: u64,
    pub packets_to_clients: u64,
    pub stream_connections: u64,
    pub https_port_connections: u64,
    pub ambiguous_requests: u64,
    pub quota_hits_ip: u64,
    pub client_queue_dropped: u64,
}

impl TurnStats {
    /// Reads every counter (each individually atomic; the set is not a consistent cut).
    pub fn snapshot(&self) -> TurnStatsSnapshot {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        TurnStatsSnapshot {
            allocations_active: r(&self.allocations_active),
            allocations_created: r(&self.allocations_created),
            quota_hits_user: r(&self.quota_hits_user),
            quota_hits_total: r(&self.quota_hits_total),
            allocations_failed: r(&self.allocations_failed),
            auth_failures: r(&self.auth_failures),
            refused_peers: r(&self.refused_peers),
            rate_limited: r(&self.rate_limited),
            bandwidth_dropped: r(&self.bandwidth_dropped),
            oversized_dropped: r(&self.oversized_dropped),
            bytes_to_peers: r(&self.bytes_to_peers),
            packets_to_peers: r(&self.packets_to_peers),
            bytes_to_clients: r(&self.bytes_to_clients),
            packets_to_clients: r(&self.packets_to_clients),
            stream_connections: r(&self.stream_connections),
            https_port_connections: r(&self.https_port_connections),
            ambiguous_requests: r(&self.ambiguous_requests),
            quota_hits_ip: r(&self.quota_hits_ip),
            client_queue_dropped: r(&self.client_queue_dropped),
        }
    }

    pub(crate) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn add(counter: &AtomicU64, n: usize) {
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub(crate) fn drop_one(counter: &AtomicU64) {
        // Saturating: a close notification for an allocation we never counted must not wrap.
        let _ = counter.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| v.checked_sub(1));
    }
}
