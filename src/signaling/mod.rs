//! WebSocket signaling: the seed's message format, made unspoofable, long-lived and resumable.
//!
//! | file | what it owns |
//! |---|---|
//! | `protocol.rs` | the JSON on the wire: client and server messages, error and close codes |
//! | `hub.rs` | the rules: who may send what to whom, call states, resume — returns effects, no I/O |
//! | `registry.rs` | what nodes share per ID: home node, epoch, token, live or reserved, call state; the call transitions |
//! | `connections.rs` | what this node holds per ID: live outboxes, delivery logs, reservation deadlines, per-address counts |
//! | `bus.rs` | delivery to IDs held by other nodes (`NoBus` on a single node) |
//! | `router.rs` | applies the hub's effects: local IDs through `connections`, others through `bus` |
//! | `flushes.rs` | which IDs' logs are being moved to the bus, and the bounded (timed) wait for one |
//! | `delivery.rs` | what each ID is owed: sequence numbers, messages held until acknowledged |
//! | `outbox.rs` | a connection's bounded queue of frames to send, filled by the router |
//! | `session.rs` | one upgraded WebSocket: the session loop, heartbeat, size and rate limits |
//! | `observer.rs` | what sessions report (opens, closes, messages, limits) for metrics to count |
//! | `wire.rs` | WebSocket frames in and out, with no buffer kept between messages |
//!
//! The WebSocket session (read loop, write queue, heartbeat, size and rate limits) sits on top and
//! calls [`router::Router`] with each text frame and the current time; the router asks
//! [`hub::Hub`] what the frame means and applies the answer. The hub and the router are generic
//! over the [`registry::Registry`] and the [`bus::Bus`], so a cluster plugs in Redis versions of
//! both without the session changing.

use std::time::Duration;

pub mod bus;
pub mod connections;
pub mod delivery;
pub mod flushes;
pub mod hub;
pub mod observer;
pub mod outbox;
pub mod protocol;
pub mod registry;
pub mod router;
pub mod session;
pub mod wire;

/// Default WebSocket ping interval (`ws-heartbeat-interval`): the session pings this often and
/// the hub advertises it in the `id` message.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(20);

/// Every knob the signaling core needs, with defaults that are safe on the public internet.
///
/// The main `Config` maps onto this; the hub, the registry and the connections table each read the
/// fields they use.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct SignalingLimits {
    /// Number of decimal digits in a client ID (6..=15, so IDs stay exact JavaScript numbers).
    /// Default 9: a billion IDs, so a random guess hits a live client with negligible odds.
    pub id_digits: u8,
    /// How long a dropped connection's ID stays reserved for a resume. Default 30 s: long enough
    /// for a Wi-Fi to mobile handover, short enough that the peer is not left waiting.
    pub resume_grace: Duration,
    /// Most messages held for one ID (unacknowledged, or arrived while it is reserved). Default
    /// 64, far above a call setup's worth of candidates; beyond it messages are dropped and their
    /// senders told (`undelivered`).
    pub resume_queue_messages: usize,
    /// Most bytes held for one ID. Default 256 KiB (four 64 KiB messages).
    pub resume_queue_bytes: usize,
    /// Most bytes held for all IDs together, so many dropped clients cannot exhaust memory.
    /// Default 64 MiB.
    pub resume_queue_bytes_total: usize,
    /// Most IDs (live and reserved) held at once. When full, the oldest reservation is ended to
    /// make room for a live client; with only live IDs, connects get `server_full`.
    /// Default 100 000.
    pub max_clients: usize,
    /// Most reserved IDs per client address (IPv6 per /64); a further drop from the address frees
    /// its ID at once. Default 16, so connect-and-drop churn cannot fill the node.
    pub reservations_per_ip: usize,
    /// Deepest nesting of objects and arrays accepted in a message. Default 32; an SDP object
    /// needs 2.
    pub max_nesting_depth: usize,
    /// Rule violations (bad JSON, spoofed IDs, ...) tolerated per connection before the hub asks for
    /// a close with 1008. Default 16.
    pub max_violations: u32,
    /// Failed resume attempts tolerated per connection before the hub asks for a close with 1008.
    /// Default 3: a real client needs one.
    pub max_resume_failures: u32,
    /// WebSocket ping interval advertised in the `id` message (the session layer does the pinging;
    /// the config links this to `ws-heartbeat-interval`). Default 20 s.
    pub heartbeat_interval: Duration,
    /// Longest `normal` text written to the log, in characters. Default 200.
    pub max_logged_chars: usize,
}

impl Default for SignalingLimits {
    fn default() -> Self {
        Self {
            id_digits: 9,
            resume_grace: Duration::from_secs(30),
            resume_queue_messages: 64,
            resume_queue_bytes: 256 * 1024,
            resume_queue_bytes_total: 64 * 1024 * 1024,
            max_clients: 100_000,
            reservations_per_ip: 16,
            max_nesting_depth: 32,
            max_violations: 16,
            max_resume_failures: 3,
            heartbeat_interval: HEARTBEAT_INTERVAL,
            max_logged_chars: 200,
        }
    }
}
