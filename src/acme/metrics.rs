//! The ACME families in callgate's registry: orders, renewals, failures by reason, next renewal.

use prometheus::{Gauge, IntCounter, IntCounterVec, Opts};

use super::failure::FailureReason;
use crate::metrics::Metrics;

/// Pre-resolved handles for the `callgate_acme_*` families.
#[derive(Clone)]
pub struct AcmeMetrics {
    /// `callgate_acme_orders_total`: orders started (first certificate and renewals).
    pub orders: IntCounter,
    /// `callgate_acme_certificates_issued_total{kind="first"}`.
    pub issued_first: IntCounter,
    /// `callgate_acme_certificates_issued_total{kind="renewal"}`.
    pub issued_renewal: IntCounter,
    /// `callgate_acme_failures_total{reason}`, indexed like [`FailureReason::ALL`].
    failures: Vec<IntCounter>,
    /// `callgate_acme_next_renewal_timestamp_seconds`: when the next order is due (Unix time);
    /// while orders fail it stays at the time the order first became due. 0 without ACME.
    pub next_renewal: Gauge,
}

impl AcmeMetrics {
    /// Registers the families in `metrics`' registry (always, so dashboards and alerts see
    /// zeros on a server without ACME rather than no series).
    pub fn register(metrics: &Metrics) -> AcmeMetrics {
        Self::families(metrics).expect("the ACME metric definitions are valid")
    }

    fn families(metrics: &Metrics) -> prometheus::Result<AcmeMetrics> {
        let orders = IntCounter::new(
            "acme_orders_total",
            "ACME orders started (first certificates and renewals).",
        )?;
        let issued = IntCounterVec::new(
            Opts::new(
                "acme_certificates_issued_total",
                "Certificates obtained over ACME and now served, by kind (first, renewal).",
            ),
            &["kind"],
        )?;
        let failures = IntCounterVec::new(
            Opts::new(
                "acme_failures_total",
                "Failed ACME orders, by reason (dns, unreachable, rate_limited, refused, \
                 directory, storage, other).",
            ),
            &["reason"],
        )?;
        let next_renewal = Gauge::new(
            "acme_next_renewal_timestamp_seconds",
            "Unix time at which the next ACME order is due; stays at the first due time while \
             orders fail; 0 without ACME.",
        )?;
        metrics.register(Box::new(orders.clone()));
        metrics.register(Box::new(issued.clone()));
        metrics.register(Box::new(failures.clone()));
        metrics.register(Box::new(next_renewal.clone()));
        Ok(AcmeMetrics {
            orders,
            issued_first: issued.with_label_values(&["first"]),
            issued_renewal: issued.with_label_values(&["renewal"]),
            failures: FailureReason::ALL
                .iter()
                .map(|r| failures.with_label_values(&[r.label()]))
                .collect(),
            next_renewal,
        })
    }

    /// Counts one failed order.
    pub fn failed(&self, reason: FailureReason) {
        let index = FailureReason::ALL
            .iter()
            .position(|r| *r == reason)
            .expect("ALL lists every reason");
        self.failures[index].inc();
    }
}
