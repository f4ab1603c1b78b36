//! Caps shared by the listeners: the global connection limit.
//!
//! A connection holds a [`ConnectionPermit`] for its whole life, WebSocket included; when none is
//! left, new connections are closed at accept, before any TLS work is spent on them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The most open client connections over all listeners.
#[derive(Debug)]
pub struct ConnectionLimit {
    /// One permit per allowed connection.
    permits: Arc<Semaphore>,
    /// The configured maximum, for log lines.
    max: usize,
    /// Connections refused since start (for metrics).
    refused: AtomicU64,
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
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(ConnectionLimit {
            permits: Arc::new(Semaphore::new(max)),
            max,
            refused: AtomicU64::new(0),
            last_warning_ms: AtomicU64::new(0),
            started: Instant::now(),
        })
    }

    /// A permit for a new connection, or `None` (logged, counted) when the limit is reached.
    pub fn try_admit(&self) -> Option<ConnectionPermit> {
        match self.permits.clone().try_acquire_owned() {
            Ok(permit) => Some(permit),
            Err(_) => {
                let refused = self.refused.fetch_add(1, Ordering::Relaxed) + 1;
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
        self.refused.load(Ordering::Relaxed)
    }

    /// Connections currently open.
    pub fn open(&self) -> usize {
        self.max - self.permits.available_permits()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_past_the_cap_and_frees_on_drop() {
        let limit = ConnectionLimit::new(2);
        let a = limit.try_admit().unwrap();
        let _b = limit.try_admit().unwrap();
        assert!(limit.try_admit().is_none());
        assert_eq!(limit.refused(), 1);
        assert_eq!(limit.open(), 2);
        drop(a);
        assert!(limit.try_admit().is_some());
    }
}
