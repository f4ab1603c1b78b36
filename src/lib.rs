//! callgate: one binary for browser video calls — HTTPS and the web app, WebSocket signaling, and an
//! embedded TURN relay — that can face the public internet without nginx, coturn or pm2 beside it.
//!
//! # Layout
//!
//! | file | what it holds |
//! |---|---|
//! | `main.rs` | parse [`config::Config`], start logging, run [`server`] until a signal |
//! | `config.rs` | the one `Config`, made of the subsystems' settings types as sections: CLI flags, `CALLGATE_*` env vars, TOML file, defaults, validation; `config/values.rs`: how setting values are written (durations, addresses, secrets) |
//! | `server.rs` | binds every listener, starts the subsystems, owns the one shutdown path |
//! | `shutdown.rs` | the [`shutdown::Shutdown`] handle every connection task selects on |
//! | `limits.rs` | the global connection cap, the per-address connection cap, per-address and per-connection rate limits (governor) |
//! | `metrics.rs` | Prometheus registry, pre-resolved metric handles, the call observer, TURN export |
//! | `acme/` | automatic certificates over ACME: ordering and renewal, challenge answers, storage (see its own Layout) |
//! | `tls/` | certificate loading (`load`), dev-certificate generation (`dev_cert`), hot reload (`reload`) |
//! | `http/` | accept loop with admission (per-address and global caps) and timeouts (`mod`), idle/stall/close limits of a connection (`lifetime`), PROXY protocol (`proxy_protocol`), routes and `/api/turn-credentials` (`routes`), the WebSocket upgrade with its origin check and ICE servers (`websocket`), static files held in memory (`static_files`) and the range policy (`ranges`), security headers, the redirect listener, the metrics listener (`admin`) |
//! | `signaling/` | upgraded WebSocket sessions (`session`) and what they report (`observer`), their frames (`wire`) and send queues (`outbox`), the call rules without I/O (`hub`) and what applies them (`router`), wire messages (`protocol`), the shared ID table (`registry`), this node's IDs (`connections`), other nodes' IDs (`bus`) |
//! | `cluster/` | scale-out over Redis (`redis-url`): the shared connection with its metrics (`redis`), node membership, heartbeats and drain (`nodes`), the Redis registry and bus, direct links between nodes (`link`, `cluster-listen`) (see its own Layout) |
//! | `turn/` | the embedded TURN relay: a front layer before the `turn` crate's engine (see its own Layout) |
//!
//! Dependencies point down: `server` → `http` → (`signaling`, `metrics`, `turn::credentials`);
//! `metrics` → `signaling` (it implements signaling's observer hooks); `signaling` → (`limits`,
//! `shutdown`) only, checked by `tests/signaling_layout.rs`. `config` sits beside `server`, above
//! the subsystems: its sections are their settings types (`ConnectionSettings`, `SessionSettings`,
//! `OriginPolicy`, `SignalingLimits`, `TurnSettings`), which it fills from flags, environment and
//! file; `config::values` imports nothing from the crate. `turn` shares only the certificate store
//! and the credential secret with the rest. `acme` sits beside `signaling`: `server` starts it and
//! `http::redirect` reads its challenge answers; it uses only `config`, `tls`, `metrics` and
//! `shutdown`. `cluster` (only with `redis-url`) sits beside `signaling`: `server` opens its Redis
//! connection and membership and calls it first on shutdown; it uses `config::values`, `metrics`
//! and signaling's types. `signaling::hub`, `signaling::registry`, `signaling::connections`,
//! `signaling::protocol`, `turn::policy`, `turn::gate` and
//! `turn::credentials` do no I/O: they take input (and the current time) and return what to do, so
//! they are tested and benched without sockets.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod acme;
pub mod cluster;
pub mod config;
pub mod http;
pub mod limits;
pub mod metrics;
pub mod server;
pub mod shutdown;
pub mod signaling;
pub mod tls;
pub mod turn;
