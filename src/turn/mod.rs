//! The embedded TURN relay around the `turn` crate (webrtc-rs).
//!
//! The engine does the RFC 8656 state machine (allocations, permissions, channels, lifetimes). This
//! module puts a thin front layer before it that sees every packet first and closes the engine's
//! gaps: REST credentials, 401 instead of 400, a bounded nonce table, per-IP rate limits on
//! unauthenticated requests, the peer policy (403), allocation quotas (486), DONT-FRAGMENT, TCP and
//! TLS listeners, socket buffers and metrics. See `docs/TURN.md`.
//!
//! # Layout
//!
//! | file | what it holds |
//! |---|---|
//! | `credentials.rs` | TURN REST API credentials: issue, verify, ICE servers — no I/O |
//! | `policy.rs` | which peer addresses may be relayed to — a pure function |
//! | `inspect.rs` | zero-copy STUN/ChannelData reading and the few responses we write — no I/O |
//! | `quota.rs` | the allocation ledger behind 486 Allocation Quota Reached — no I/O |
//! | `gate.rs` | the front layer's decisions for every inbound and outbound packet — no I/O |
//! | `udp.rs` | a UDP listening socket as the engine's `Conn` |
//! | `stream.rs` | TCP/TLS framing and one engine instance per connection |
//! | `peer.rs` | relay sockets towards peers: port range, bandwidth cap, counters, policy |
//! | `source.rs` | [`source::source_key`]: per-address limits count IPv4 per address, IPv6 per /64 |
//! | `reservation.rs` | ports held for RESERVATION-TOKEN (EVEN-PORT), which the engine never honours |
//! | `jumbo.rs` | relaying ChannelData too large for the engine's 1500-byte buffers |
//! | `relay.rs` | [`Relay::start`] and [`RunningRelay`]: binding, wiring, shutdown |
//! | `settings.rs` | [`TurnSettings`], coturn's knobs with safe defaults |
//! | `stats.rs` | [`TurnStats`], atomic counters for the metrics layer |
//! | `error.rs` | [`TurnError`] |
//!
//! This module must never fork or copy the engine: it wraps it through its public seams
//! (`webrtc_util::Conn`, `AuthHandler`, `RelayAddressGenerator`, `alloc_close_notify`).

pub mod credentials;
pub mod error;
pub mod gate;
pub mod inspect;
pub mod jumbo;
pub mod peer;
pub mod policy;
pub mod quota;
mod relay;
pub mod reservation;
pub mod settings;
pub mod source;
pub mod stats;
pub mod stream;
pub mod udp;

pub use credentials::{IceServer, IceServers, IssuedCredential, TurnCredentials, TurnEndpoints};
pub use error::TurnError;
pub use policy::{PeerFilter, PeerPolicy, PeerRefusal};
pub use relay::{Relay, RunningRelay, TlsAcceptorSource};
pub use settings::{ExternalIp, RelayIp, RelayIps, TurnSettings};
pub use stats::{TurnStats, TurnStatsSnapshot};
