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
//! Arrows point down: each file uses only files above it in its own layer or in a lower one, and
//! no file imports one that imports it back (`tests/turn_layout.rs` checks the last column against
//! the code). The gate decides — bytes, addresses and the time in, a [`gate::Verdict`] or
//! [`gate::Outbound`] out — and the files of the edge (`front`, `udp`, `stream`, `peer`,
//! `reservation`, `relay`) own the sockets, clocks and tasks and carry the verdicts out.
//!
//! | file | what it holds | uses |
//! |---|---|---|
//! | `source.rs` | [`source::source_key`]: per-address limits count IPv4 per address, IPv6 per /64 | — |
//! | `stats.rs` | [`TurnStats`], atomic counters for the metrics layer | — |
//! | `error.rs` | [`TurnError`] | — |
//! | `credentials.rs` | TURN REST API credentials: issue, verify, ICE servers — no I/O | — |
//! | `policy.rs` | which peer addresses may be relayed to — a pure function | — |
//! | `inspect.rs` | zero-copy STUN/ChannelData reading and the few responses we write — no I/O | — |
//! | `framing.rs` | where a STUN or ChannelData message ends on a TCP/TLS stream — no I/O | — |
//! | `relayed.rs` | the live relayed ports, lock-free, for the policy's relay-to-relay exception | — |
//! | `bind.rs` | binding UDP sockets with the relay's socket options | — |
//! | `limiter.rs` | per-source rate of unauthenticated requests (GCRA), the time passed in — no I/O | — |
//! | `quota.rs` | the allocation ledger behind 486 Allocation Quota Reached — no I/O | `source` |
//! | `write_queue.rs` | a TCP/TLS client's outgoing frames, bounded in bytes | `stats` |
//! | `settings.rs` | [`TurnSettings`], coturn's knobs with safe defaults | `credentials`, `error`, `policy`, `write_queue` |
//! | `gate.rs` | the front layer's decisions for every inbound and outbound packet — no I/O | `credentials`, `inspect`, `limiter`, `policy`, `quota`, `relayed`, `settings`, `source`, `stats` |
//! | `reservation.rs` | ports held for RESERVATION-TOKEN (EVEN-PORT), which the engine never honours | `bind`, `gate`, `settings` |
//! | `route.rs` | how one relay socket reaches its client with oversized ChannelData | `framing`, `write_queue` |
//! | `peer.rs` | relay sockets towards peers: port range, bandwidth cap, counters, policy; their registry | `bind`, `policy`, `relayed`, `reservation`, `route`, `settings`, `stats` |
//! | `jumbo.rs` | relaying ChannelData too large for the engine's 1500-byte buffers | `inspect`, `peer`, `quota`, `route`, `stats` |
//! | `front.rs` | carrying the gate's verdicts out, for every listener | `gate`, `jumbo`, `quota`, `reservation`, `route`, `stats` |
//! | `udp.rs` | a UDP listening socket as the engine's `Conn` | `front`, `gate`, `quota`, `reservation`, `route` |
//! | `stream.rs` | TCP/TLS connections, one engine instance per connection | `framing`, `front`, `gate`, `inspect`, `quota`, `reservation`, `route`, `source`, `stats`, `write_queue` |
//! | `relay.rs` | [`Relay::start`] and [`RunningRelay`]: binding, wiring, shutdown | `bind`, `credentials`, `error`, `front`, `gate`, `jumbo`, `peer`, `quota`, `relayed`, `reservation`, `settings`, `stats`, `stream`, `udp` |
//!
//! This module must never fork or copy the engine: it wraps it through its public seams
//! (`webrtc_util::Conn`, `AuthHandler`, `RelayAddressGenerator`, `alloc_close_notify`).

pub mod bind;
pub mod credentials;
pub mod error;
pub mod framing;
pub mod front;
pub mod gate;
pub mod inspect;
pub mod jumbo;
pub mod limiter;
pub mod peer;
pub mod policy;
pub mod quota;
mod relay;
pub mod relayed;
pub mod reservation;
pub mod route;
pub mod settings;
pub mod source;
pub mod stats;
pub mod stream;
pub mod udp;
pub mod write_queue;

pub use credentials::{IceServer, IceServers, IssuedCredential, TurnCredentials, TurnEndpoints};
pub use error::TurnError;
pub use policy::{PeerFilter, PeerPolicy, PeerRefusal};
pub use relay::{Relay, RelayMemory, RunningRelay};
pub use settings::{ExternalIp, RelayIp, RelayIps, TurnSettings};
pub use stats::{TurnStats, TurnStatsSnapshot};
pub use stream::TlsAcceptorSource;
