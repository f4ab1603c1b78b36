//! Caps and rate limits shared by the listeners and the signaling sessions.
//!
//! - [`ConnectionLimit`]: the global connection cap. A connection holds a [`ConnectionPermit`] for
//!   its whole life, WebSocket included; when none is left, new connections are closed at accept,
//!   before any TLS work is spent on them.
//! - [`AddressLimit`]: open connections per client address on every listener (IPv6 keyed by its
//!   /64), taken at accept before the global permit and before any TLS or PROXY-header work, so one
//!   host cannot fill the global cap with silent connections.
//! - [`PerIpLimits`]: WebSocket upgrades per second and open WebSockets per client address (IPv6
//!   keyed by its /64, since one host usually owns a whole /64). Maps are pruned, so rotating source
//!   addresses cannot grow memory without bound.
//! - [`SessionRates`]: per-connection message rate and new-call rate (governor token buckets).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};
use prometheus::IntCounter;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The most open client connections over all listeners.
#[derive(Debug)]
pub struct ConnectionLimit {
    /// One permit per allowed connection.
    permits: Arc<Semaphore>,
    /// The configured maximum, for log lines.
    max: usize,
    /// Connections refused since start (`callgate_rate_limited_total{limit="max_connections"}`).
    refused: IntCounter,
    /// When the last "limit reached" warning was logged, in ms since `started`, so a flood
    /// produces one line every few seconds rather than one per connection.
    last_warning_ms: AtomicU64,
    /// Reference point for `last_warning_ms`.
    started: Instant,
}

/// Proof that a connection fits under the limit; dropping it frees the slot.
pub type ConnectionPermit = OwnedSemaphorePermit;

/// How often the "limit reached" warning may be logged.
const WARNING_INTERVAL: Duration = Duration::from_secs(10);

impl ConnectionLimit {
    /// A limit of `max` concurrent connections.
    pub fn new(max: usize, refused: IntCounter) -> Arc<Self> {
        Arc::new(ConnectionLimit {
            permits: Arc::new(Semaphore::new(max)),
            max,
            refused,
            last_warning_ms: AtomicU64::new(0),
            started: Instant::now(),
        })
    }

    /// A permit for a new connection, or `None` (logged, counted) when the limit is reached.
    pub fn try_admit(&self) -> Option<ConnectionPermit> {
        match self.permits.clone().try_acquire_owned() {
            Ok(permit) => Some(permit),
            Err(_) => {
                self.refused.inc();
                let refused = self.refused.get();
                let now =
                    self.started.elapsed().as_millis() as u64 + WARNING_INTERVAL.as_millis() as u64;
                let last = self.last_warning_ms.load(Ordering::Relaxed);
                if now.saturating_sub(last) >= WARNING_INTERVAL.as_millis() as u64
                    && self
                        .last_warning_ms
                        .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                        .is_ok()
                {
                    tracing::warn!(
                        max_connections = self.max,
                        refused_total = refused,
                        "connection limit reached: refusing new connections (raise max-connections if this is legitimate load)"
                    );
                }
                None
            }
        }
    }

    /// Connections refused since start.
    pub fn refused(&self) -> u64 {
        self.refused.get()
    }

    /// Connections currently open.
    pub fn open(&self) -> usize {
        self.max - self.permits.available_permits()
    }
}

/// Open connections per client address, on every listener.
#[derive(Debug)]
pub struct AddressLimit {
    /// Open connections per address; an entry is removed when its count drops to zero, so the map
    /// holds at most one entry per open connection.
    open: Mutex<HashMap<IpKey, u32>>,
    /// Most open connections per address (`connections-per-ip`).
    max_per_ip: u32,
    /// Connections refused (`callgate_rate_limited_total{limit="connections_per_ip"}`).
    refused: IntCounter,
    /// Throttles the log lines naming refused addresses.
    refusal_log: RefusalLog,
}

/// One open connection counted against its address; dropping it gives the slot back.
#[derive(Debug)]
pub struct AddressSlot {
    /// The limit the slot belongs to.
    limit: Arc<AddressLimit>,
    /// The address (or /64) it is counted against.
    key: IpKey,
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut open = self.limit.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = open.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.key);
            }
        }
    }
}

impl AddressLimit {
    /// At most `max_per_ip` open connections per address; refusals are counted in `refused`.
    pub fn new(max_per_ip: u32, refused: IntCounter) -> Arc<Self> {
        Arc::new(AddressLimit {
            open: Mutex::new(HashMap::new()),
            max_per_ip,
            refused,
            refusal_log: RefusalLog::new(),
        })
    }

    /// A slot for one more connection from `ip`, or `None` (counted, logged at most a few times a
    /// second) when it already has `max_per_ip` open.
    pub fn try_take(self: &Arc<Self>, ip: IpAddr) -> Option<AddressSlot> {
        let key = IpKey::of(ip);
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let count = open.entry(key).or_insert(0);
        if *count >= self.max_per_ip {
            drop(open);
            self.refused.inc();
            self.refusal_log.refused(ip, "connections-per-ip");
            return None;
        }
        *count += 1;
        Some(AddressSlot {
            limit: self.clone(),
            key,
        })
    }

    /// Addresses with open connections.
    pub fn tracked(&self) -> usize {
        self.open.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// A client address as rate limits see it: IPv4 as is, IPv6 by its /64 prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpKey(IpAddr);

impl IpKey {
    /// The key for a peer address (IPv4-mapped IPv6 counts as the IPv4 address).
    pub fn of(ip: IpAddr) -> IpKey {
        match ip {
            IpAddr::V4(v4) => IpKey(IpAddr::V4(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpKey(IpAddr::V4(v4)),
                None => {
                    let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                    IpKey(IpAddr::V6(Ipv6Addr::from(prefix)))
                }
            },
        }
    }
}

/// Per-address limits on WebSocket upgrades.
#[derive(Debug)]
pub struct PerIpLimits {
    /// Upgrades per second per address (token bucket).
    upgrades: DefaultKeyedRateLimiter<IpKey>,
    /// Open WebSockets per address; an entry is removed when its count drops to zero.
    open: Mutex<HashMap<IpKey, u32>>,
    /// Most open WebSockets per address.
    max_open_per_ip: u32,
    /// Throttles the log lines naming refused addresses.
    refusal_log: RefusalLog,
}

/// Logs the addresses a limit refuses, so an operator can find an abuser, without letting a flood
/// flood the log: at most 5 lines a second (burst 20); the rest are counted into the next line.
#[derive(Debug)]
struct RefusalLog {
    lines: DefaultDirectRateLimiter,
    suppressed: AtomicU64,
}

impl RefusalLog {
    fn new() -> Self {
        let five = NonZeroU32::new(5).expect("non-zero");
        RefusalLog {
            lines: RateLimiter::direct(
                Quota::per_second(five).allow_burst(NonZeroU32::new(20).expect("non-zero")),
            ),
            suppressed: AtomicU64::new(0),
        }
    }

    fn refused(&self, ip: IpAddr, limit: &'static str) {
        if self.lines.check().is_ok() {
            let also_suppressed = self.suppressed.swap(0, Ordering::Relaxed);
            tracing::warn!(client = %ip, limit, also_suppressed, "refused by a per-address limit");
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Why an upgrade was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IpRefusal {
    /// Too many upgrades per second from this address.
    UpgradeRate,
    /// Too many open WebSockets from this address.
    TooManyOpen,
}

/// One open WebSocket counted against its address; dropping it gives the slot back.
#[derive(Debug)]
pub struct IpSlot {
    limits: Arc<PerIpLimits>,
    key: IpKey,
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut open = self.limits.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = open.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.key);
            }
        }
    }
}

impl PerIpLimits {
    /// `upgrades_per_second` sustained (with a burst of the same size) and `max_open_per_ip`
    /// concurrent WebSockets per address.
    pub fn new(upgrades_per_second: NonZeroU32, max_open_per_ip: u32) -> Arc<Self> {
        Arc::new(PerIpLimits {
            upgrades: RateLimiter::keyed(Quota::per_second(upgrades_per_second)),
            open: Mutex::new(HashMap::new()),
            max_open_per_ip,
            refusal_log: RefusalLog::new(),
        })
    }

    /// Whether `ip` may upgrade now (consumes a token).
    pub fn check_upgrade(&self, ip: IpAddr) -> Result<(), IpRefusal> {
        self.upgrades.check_key(&IpKey::of(ip)).map_err(|_| {
            self.refusal_log.refused(ip, "ws-upgrades-per-second");
            IpRefusal::UpgradeRate
        })
    }

    /// Counts one more open WebSocket for `ip`, or refuses if it has too many.
    pub fn open(self: &Arc<Self>, ip: IpAddr) -> Result<IpSlot, IpRefusal> {
        let key = IpKey::of(ip);
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let count = open.entry(key).or_insert(0);
        if *count >= self.max_open_per_ip {
            drop(open);
            self.refusal_log.refused(ip, "ws-connections-per-ip");
            return Err(IpRefusal::TooManyOpen);
        }
        *count += 1;
        Ok(IpSlot {
            limits: self.clone(),
            key,
        })
    }

    /// Forgets rate-limit state of addresses that have been quiet long enough to be full again.
    /// Called periodically so that a stream of new source addresses cannot grow the map forever.
    pub fn prune(&self) {
        self.upgrades.retain_recent();
        self.upgrades.shrink_to_fit();
    }

    /// Addresses with rate-limit state, and addresses with open WebSockets.
    pub fn tracked(&self) -> (usize, usize) {
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner()).len();
        (self.upgrades.len(), open)
    }
}

/// One connection's token buckets.
#[derive(Debug)]
pub struct SessionRates {
    /// Every text message.
    pub messages: DefaultDirectRateLimiter,
    /// New calls (`video-offer-request`), which stops ID scanning and call spam.
    pub calls: DefaultDirectRateLimiter,
}

impl SessionRates {
    /// `messages_per_second` with `message_burst`, and `calls_per_minute` with a burst of the same.
    pub fn new(
        messages_per_second: NonZeroU32,
        message_burst: NonZeroU32,
        calls_per_minute: NonZeroU32,
    ) -> Self {
        SessionRates {
            messages: RateLimiter::direct(
                Quota::per_second(messages_per_second).allow_burst(message_burst),
            ),
            calls: RateLimiter::direct(Quota::per_minute(calls_per_minute)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_is_keyed_by_its_64_and_mapped_ipv4_by_the_ipv4() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(IpKey::of(a), IpKey::of(b));
        assert_ne!(IpKey::of(a), IpKey::of(c));
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(IpKey::of(mapped), IpKey::of("192.0.2.7".parse().unwrap()));
    }

    #[test]
    fn open_websockets_per_ip_are_capped_and_freed() {
        let limits = PerIpLimits::new(NonZeroU32::new(100).unwrap(), 2);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let a = limits.open(ip).unwrap();
        let _b = limits.open(ip).unwrap();
        assert_eq!(limits.open(ip).unwrap_err(), IpRefusal::TooManyOpen);
        assert!(
            limits.open("192.0.2.2".parse().unwrap()).is_ok(),
            "other addresses unaffected"
        );
        drop(a);
        assert!(limits.open(ip).is_ok());
    }

    #[test]
    fn the_open_map_does_not_keep_closed_addresses() {
        let limits = PerIpLimits::new(NonZeroU32::new(100).unwrap(), 2);
        for i in 0..10_000u32 {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            drop(limits.open(ip).unwrap());
        }
        assert_eq!(limits.tracked().1, 0);
    }

    #[test]
    fn rate_state_of_quiet_addresses_is_pruned() {
        let limits = PerIpLimits::new(NonZeroU32::new(1000).unwrap(), 10);
        for i in 0..5000u32 {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            limits.check_upgrade(ip).unwrap();
        }
        assert_eq!(limits.tracked().0, 5000);
        // At 1000/s a spent token is back within a millisecond; give the buckets time to refill
        // (this is the passing of time under test, not a wait for another task).
        std::thread::sleep(Duration::from_millis(20));
        limits.prune();
        assert_eq!(
            limits.tracked().0,
            0,
            "rotating source addresses leave nothing behind"
        );
    }

    #[test]
    fn upgrade_rate_is_per_address() {
        let limits = PerIpLimits::new(NonZeroU32::new(3).unwrap(), 10);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        for _ in 0..3 {
            limits.check_upgrade(ip).unwrap();
        }
        assert_eq!(limits.check_upgrade(ip), Err(IpRefusal::UpgradeRate));
        limits.check_upgrade("192.0.2.2".parse().unwrap()).unwrap();
    }

    #[test]
    fn connections_per_address_are_capped_per_64_and_freed() {
        let limit = AddressLimit::new(2, IntCounter::new("refused", "test").unwrap());
        let a: IpAddr = "2001:db8::1".parse().unwrap();
        let same_64: IpAddr = "2001:db8::ffff:2".parse().unwrap();
        let first = limit.try_take(a).unwrap();
        let _second = limit.try_take(same_64).unwrap();
        assert!(limit.try_take(a).is_none(), "a third from the same /64");
        assert_eq!(limit.refused.get(), 1);
        assert!(limit.try_take("2001:db8:0:1::1".parse().unwrap()).is_some());
        drop(first);
        assert!(
            limit.try_take(a).is_some(),
            "a closed connection frees its slot"
        );
        for i in 0..1000u32 {
            drop(limit.try_take(IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i))));
        }
        assert_eq!(limit.tracked(), 1, "closed addresses leave nothing behind");
    }

    #[test]
    fn refuses_past_the_cap_and_frees_on_drop() {
        let limit = ConnectionLimit::new(2, IntCounter::new("refused", "test").unwrap());
        let a = limit.try_admit().unwrap();
        let _b = limit.try_admit().unwrap();
        assert!(limit.try_admit().is_none());
        assert_eq!(limit.refused(), 1);
        assert_eq!(limit.open(), 2);
        drop(a);
        assert!(limit.try_admit().is_some());
    }
}
