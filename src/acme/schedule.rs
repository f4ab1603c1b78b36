//! When to order: renewal times and back-off after failures — pure functions of times in,
//! decisions out (Unix seconds; certificates are dated by the wall clock).
//!
//! Renewal starts when a third of the certificate's lifetime is left (30 days of Let's Encrypt's
//! 90, 2 days of a 6-day certificate), unless the CA's ACME Renewal Information (RFC 9773) names a
//! window, which then wins. Failed orders are retried after `retry-delay`, doubling up to six
//! hours; a rate limit's own time to wait is honoured when it is later.

use std::time::Duration;

/// The longest wait between two attempts after failures.
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(6 * 3600);

/// When to renew a certificate valid from `not_before` to `not_after` (Unix seconds) without
/// renewal information: when a third of its lifetime is left.
pub fn renew_at(not_before: i64, not_after: i64) -> i64 {
    let lifetime = (not_after - not_before).max(0);
    not_after - lifetime / 3
}

/// What scheduling needs to know about the stored certificate.
#[derive(Debug, Clone, Copy)]
pub struct CertificateDates<'a> {
    /// The DNS names it is valid for (lowercase).
    pub names: &'a [String],
    /// Validity start, Unix seconds.
    pub not_before: i64,
    /// Validity end, Unix seconds.
    pub not_after: i64,
}

/// When the next order is due (Unix seconds): `now` if there is no certificate, it has expired
/// or it lacks one of `domains`; otherwise the CA's renewal-information time `ari` if it gave
/// one, else [`renew_at`].
pub fn order_due(
    cert: Option<CertificateDates<'_>>,
    domains: &[String],
    ari: Option<i64>,
    now: i64,
) -> i64 {
    let usable = cert
        .filter(|c| c.not_after > now && domains.iter().all(|d| c.names.iter().any(|n| n == d)));
    match usable {
        None => now,
        Some(c) => ari.unwrap_or_else(|| renew_at(c.not_before, c.not_after)),
    }
}

/// A time inside a CA's suggested renewal window `[start, end)`: `fraction` (from a random source,
/// in `[0, 1)`) of the way through, so that many servers do not renew at the same instant.
pub fn renew_in_window(start: i64, end: i64, fraction: f64) -> i64 {
    let span = (end - start).max(0) as f64;
    start + (span * fraction.clamp(0.0, 1.0)) as i64
}

/// Consecutive failures and the wait before the next attempt.
#[derive(Debug, Clone)]
pub struct Backoff {
    /// The first wait.
    first: Duration,
    /// Failures since the last success.
    failures: u32,
}

impl Backoff {
    /// No failures yet; the first retry waits `first`.
    pub fn new(first: Duration) -> Self {
        Backoff { first, failures: 0 }
    }

    /// Records a failure and returns how long to wait before the next attempt: `first`, doubled for
    /// each earlier failure, at most [`MAX_RETRY_DELAY`] — but never sooner than `not_before`
    /// (a CA's "retry after", relative to now), which may be longer.
    pub fn failed(&mut self, not_before: Option<Duration>) -> Duration {
        let doubled = self
            .first
            .saturating_mul(1u32 << self.failures.min(20))
            .min(MAX_RETRY_DELAY.max(self.first));
        self.failures = self.failures.saturating_add(1);
        doubled.max(not_before.unwrap_or_default())
    }

    /// Continues from `failures` earlier failures (the cluster's count, kept in Redis), so the
    /// next [`Backoff::failed`] doubles from there.
    pub fn resume(&mut self, failures: u32) {
        self.failures = failures;
    }

    /// Failures since the last success.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// A success: the next failure waits `first` again.
    pub fn succeeded(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renews_with_a_third_of_the_lifetime_left() {
        let day = 86_400;
        // Let's Encrypt's 90 days: renew 60 days in, 30 left.
        assert_eq!(renew_at(0, 90 * day), 60 * day);
        // A short-lived 6-day certificate: 2 days left.
        assert_eq!(renew_at(1000, 1000 + 6 * day), 1000 + 4 * day);
        // Garbage dates do not schedule into the past beyond expiry.
        assert_eq!(renew_at(10, 5), 5);
    }

    #[test]
    fn orders_at_once_without_a_usable_certificate() {
        let domains = vec!["a.example.com".to_owned(), "b.example.com".to_owned()];
        let only_a = vec!["a.example.com".to_owned()];
        let dates = |names: &[String], not_after| {
            let due = |ari| {
                let cert = CertificateDates {
                    names,
                    not_before: 0,
                    not_after,
                };
                order_due(Some(cert), &domains, ari, 1000)
            };
            (due(None), due(Some(4000)))
        };
        assert_eq!(order_due(None, &domains, None, 1000), 1000, "none yet");
        assert_eq!(dates(&domains, 900), (1000, 1000), "expired");
        assert_eq!(dates(&only_a, 9000), (1000, 1000), "a name was added");
        assert_eq!(
            dates(&domains, 9000),
            (6000, 4000),
            "a third left; ARI wins"
        );
    }

    #[test]
    fn ari_window_picks_a_point_inside() {
        assert_eq!(renew_in_window(100, 200, 0.0), 100);
        assert_eq!(renew_in_window(100, 200, 0.5), 150);
        assert!(renew_in_window(100, 200, 0.999) < 200);
        assert_eq!(renew_in_window(100, 50, 0.5), 100);
    }

    #[test]
    fn backoff_doubles_to_a_cap_and_honours_retry_after() {
        let mut b = Backoff::new(Duration::from_secs(60));
        assert_eq!(b.failed(None), Duration::from_secs(60));
        assert_eq!(b.failed(None), Duration::from_secs(120));
        assert_eq!(b.failed(None), Duration::from_secs(240));
        for _ in 0..30 {
            b.failed(None);
        }
        assert_eq!(b.failed(None), MAX_RETRY_DELAY);
        // A rate limit asking for a day wins over the cap.
        let day = Duration::from_secs(86_400);
        assert_eq!(b.failed(Some(day)), day);
        b.succeeded();
        assert_eq!(b.failures(), 0);
        assert_eq!(b.failed(None), Duration::from_secs(60));
        // Three failures elsewhere in the cluster: the next waits 8 times the first.
        b.resume(3);
        assert_eq!(b.failed(None), Duration::from_secs(480));
    }
}
