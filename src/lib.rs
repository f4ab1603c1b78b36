//! callgate: one binary for browser video calls — HTTPS and the web app, WebSocket signaling, and an
//! embedded TURN relay — that can face the public internet without nginx, coturn or pm2 beside it.
//!
//! # Layout
//!
//! | file | what it holds |
//! |---|---|
//! | `main.rs` | parse [`config::Config`], start logging, run [`server`] until a signal |
//! | `config.rs` | the one `Config`: CLI flags, `CALLGATE_*` env vars, TOML file, validation |
//! | `server.rs` | binds every listener, starts the subsystems, owns the one shutdown path |
//! | `shutdown.rs` | the [`shutdown::Shutdown`] handle every connection task selects on |
//! | `limits.rs` | connection caps and per-IP rate limiters shared by the listeners |
//! | `metrics.rs` | Prometheus registry and pre-resolved metric handles |
//! | `tls/` | certificate loading, dev-certificate generation, hot reload |
//! | `http/` | accept loop (handshake and header timeouts, connection cap), routes, static files, security headers |
//! | `signaling/` | WebSocket sessions (`session`), the call rules without I/O (`hub`), wire messages (`protocol`), where each ID lives (`directory`) |
//! | `turn/` | the embedded TURN relay: REST credentials, peer policy, TCP/TLS framing |
//!
//! Dependencies point down: `server` → `http` → `signaling` → (`config`, `tls`, `metrics`, `limits`).
//! `signaling::hub`, `signaling::protocol`, `turn::policy` and `turn::credentials` do no I/O: they take
//! input (and the current time) and return what to do, so they are tested and benched without sockets.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod config;
pub mod http;
pub mod limits;
pub mod metrics;
pub mod server;
pub mod shutdown;
pub mod signaling;
pub mod tls;
pub mod turn;
