//! Automatic HTTPS: certificates for `acme-domain` obtained and renewed over ACME (RFC 8555).
//!
//! The protocol is instant-acme's; this module decides when to order, answers the challenges on
//! callgate's own listeners and keeps the result under `certs-dir/acme/`. The served certificate
//! lives in [`crate::tls::CertStore`] as always; ACME only calls its `replace`, so a renewal reaches
//! new handshakes at once and never touches an open connection. Without `acme-domain` none of this
//! runs.
//!
//! # Layout
//!
//! | file | what it holds |
//! |---|---|
//! | `task.rs` | [`Acme`]: opened at startup, then the ordering/renewal task (the only CA I/O) |
//! | `challenge.rs` | the HTTP-01 and TLS-ALPN-01 answers while an order is open, and the TLS hook |
//! | `store.rs` | account and certificate files, modes 0700/0600, written atomically |
//! | `schedule.rs` | when to renew and how long to back off — pure |
//! | `failure.rs` | a failed order's reason and the advice to log — pure |
//! | `metrics.rs` | the `callgate_acme_*` families |
//!
//! Arrows point down: `server` and `http::redirect` use this module; it uses `config`, `tls`,
//! `metrics` and `shutdown`, never `http`.
//!
//! Single node only: challenge answers are in this process's memory and the certificate is in
//! this host's certs-dir. Behind a load balancer with several callgate nodes the CA's validation
//! may reach another node; that needs the shared store of the cluster mode (not built yet).

mod challenge;
mod failure;
mod metrics;
mod schedule;
mod store;
mod task;

pub use challenge::{answer_tls_alpn01, ChallengeAnswers, ChallengeResolver, ACME_TLS_ALPN};
pub use failure::FailureReason;
pub use metrics::AcmeMetrics;
pub use schedule::{renew_at, Backoff};
pub use store::{AcmeStore, StoreError, StoredCertificate};
pub use task::{Acme, AcmeSetupError, Listeners};
