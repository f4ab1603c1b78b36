//! [`SourceLimiter`]: the rate of unauthenticated requests per source key, with the time passed
//! in — so the gate, which owns it, reads no clock and its tests step time themselves.
//!
//! The generic cell rate algorithm (GCRA, the one `governor` implements): each source has a
//! theoretical arrival time; a request conforms while that time is at most `burst - 1` intervals
//! ahead of now, and pushes it one interval further. A source whose time has fallen behind now is
//! indistinguishable from a new one and may be forgotten.
//!
//! Spoofed UDP sources would grow the table by one entry per packet between two
//! [`SourceLimiter::retain_recent`] calls, so it is bounded: at its capacity the idle entries are
//! forgotten, and if that leaves more than half, all are (shed, rather than refusing new sources:
//! refusing would lock every new client out for as long as a spoofing flood lasts, while shedding
//! only hands sources that were rate-limited a fresh burst).
//!
//! This module only counts; it never reads a clock and never does I/O.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::time::{Duration, Instant};

/// Per-source GCRA state, bounded in entries.
#[derive(Debug)]
pub struct SourceLimiter {
    /// Time one request uses up at the sustained rate.
    interval: Duration,
    /// How far ahead of now a source's arrival time may run and still conform.
    tolerance: Duration,
    /// Theoretical arrival time per source key.
    arrivals: HashMap<IpAddr, Instant>,
    /// Entries kept at most (see the module doc).
    capacity: usize,
}

impl SourceLimiter {
    /// `per_second` requests per second per source, `burst` at once, for at most `capacity`
    /// sources.
    pub fn new(per_second: NonZeroU32, burst: NonZeroU32, capacity: usize) -> Self {
        let interval = Duration::from_secs(1) / per_second.get();
        SourceLimiter {
            interval,
            tolerance: interval * (burst.get() - 1),
            arrivals: HashMap::new(),
            capacity,
        }
    }

    /// Whether a request from `key` at `now` is within its source's rate; counts it if so.
    pub fn check(&mut self, key: IpAddr, now: Instant) -> bool {
        if self.arrivals.len() >= self.capacity && !self.arrivals.contains_key(&key) {
            self.retain_recent(now);
            if self.arrivals.len() > self.capacity / 2 {
                self.arrivals.clear();
                tracing::debug!("unauthenticated rate limiter full: shed");
            }
        }
        let arrival = self.arrivals.get(&key).map_or(now, |t| (*t).max(now));
        if arrival.saturating_duration_since(now) > self.tolerance {
            return false;
        }
        self.arrivals.insert(key, arrival + self.interval);
        true
    }

    /// Forgets the sources that are back to a full burst at `now` (as good as new).
    pub fn retain_recent(&mut self, now: Instant) {
        self.arrivals.retain(|_, arrival| *arrival > now);
    }

    /// Gives memory back after [`SourceLimiter::retain_recent`] forgot many sources.
    pub fn shrink_to_fit(&mut self) {
        self.arrivals.shrink_to_fit();
    }

    /// Sources tracked.
    pub fn len(&self) -> usize {
        self.arrivals.len()
    }

    /// Whether no source is tracked.
    pub fn is_empty(&self) -> bool {
        self.arrivals.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(per_second: u32, burst: u32, capacity: usize) -> SourceLimiter {
        let n = |v| NonZeroU32::new(v).unwrap();
        SourceLimiter::new(n(per_second), n(burst), capacity)
    }

    #[test]
    fn a_burst_then_the_sustained_rate() {
        let mut l = limiter(5, 10, 100);
        let a = IpAddr::from([192, 0, 2, 1]);
        let b = IpAddr::from([192, 0, 2, 2]);
        let t0 = Instant::now();
        assert!((0..10).all(|_| l.check(a, t0)), "the burst");
        assert!(!l.check(a, t0), "the eleventh at once");
        assert!(l.check(b, t0), "other sources are not affected");
        assert!(!l.check(a, t0 + Duration::from_millis(199)));
        assert!(
            l.check(a, t0 + Duration::from_millis(200)),
            "one interval on"
        );
        assert!(!l.check(a, t0 + Duration::from_millis(200)));
        let later = t0 + Duration::from_millis(2200);
        assert!((0..10).all(|_| l.check(a, later)), "a full burst again");
    }

    #[test]
    fn idle_sources_are_forgotten_and_the_table_stays_bounded() {
        let mut l = limiter(5, 10, 8);
        let t0 = Instant::now();
        let src = |i: u8| IpAddr::from([198, 51, 100, i]);
        for i in 0..8 {
            assert!(l.check(src(i), t0));
        }
        l.retain_recent(t0 + Duration::from_millis(200));
        assert_eq!(
            l.len(),
            0,
            "one request each: back to a full burst after one interval"
        );
        // Spoofed sources: never more than the capacity, and every new source is answered.
        for i in 0..=255 {
            assert!(l.check(src(i), t0), "{i}");
            assert!(l.len() <= 8);
        }
    }
}
