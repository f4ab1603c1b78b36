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
//! | `shared.rs` | cluster mode: the ordering lock, challenge answers, account and certificate in Redis, and every node's follower |
//! | `seal.rs` | AES-256-GCM sealing of the keys kept in Redis, keyed from `static-auth-secret` — pure |
//! | `schedule.rs` | when to renew and how long to back off — pure |
//! | `failure.rs` | a failed order's reason and the advice to log — pure |
//! | `metrics.rs` | the `callgate_acme_*` families |
//!
//! Arrows point down: `server` and `http::redirect` use this module; it uses `config`, `tls`,
//! `metrics`, `shutdown` and (cluster mode) `cluster::redis`, never `http`.
//!
//! # Several nodes
//!
//! On a single node, challenge answers are in this process's memory and the certificate is in
//! this host's certs-dir. With `redis-url` ([`Acme::share`]), the nodes share one certificate
//! through Redis (`shared.rs`): one node at a time orders (a lock with a TTL and a fencing token,
//! held for one attempt; the back-off after a failure is the cluster's), one node at a time asks
//! the CA for renewal information and the others read its answer, every node serves the
//! challenge answers (so the CA's validation may land on any node behind the balancer) and loads
//! the issued certificate; keys in Redis are sealed (`seal.rs`). Each node still keeps its
//! certs-dir copy, so a restart without Redis serves the last certificate.

mod challenge;
mod failure;
mod metrics;
mod schedule;
mod seal;
mod shared;
mod store;
mod task;

pub use challenge::{answer_tls_alpn01, ChallengeAnswers, ChallengeResolver, ACME_TLS_ALPN};
pub use failure::FailureReason;
pub use metrics::AcmeMetrics;
pub use schedule::{renew_at, Backoff};
pub use seal::{SealError, Sealer};
pub use shared::{AriAnswer, AriTurn, PublishedChallenges, SharedError, SharedStore, LOCK_TTL};
pub use store::{AcmeStore, StoreError, StoredCertificate};
pub use task::{Acme, AcmeSetupError, Listeners};
