//! What a signaling session reports about itself, for whoever counts it (the `metrics` module
//! implements [`SessionObserver`]). Signaling defines the events and calls the hook; it imports
//! nothing from `metrics`, so the dependency points from metrics down to signaling.

use super::protocol::{ErrorCode, MessageKind, ServerKind};

/// Why a WebSocket closed (a bounded label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The client closed it (close frame or end of stream).
    Client,
    /// No pong for too long.
    HeartbeatTimeout,
    /// Its outbound queue overflowed, or a write stalled.
    SlowClient,
    /// Another connection resumed its ID.
    Replaced,
    /// Repeated violations (1008), broken framing (1002) or text that is not UTF-8 (1007).
    Policy,
    /// A message over the size limit (1009).
    TooBig,
    /// Refused right after the upgrade (per-address cap, server full).
    Refused,
    /// Server shutdown (1001).
    Shutdown,
}

/// A limit a session enforced by refusing something.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionLimit {
    /// Open WebSockets per address.
    ConnectionsPerIp,
    /// Messages per second per connection.
    Messages,
    /// New calls per minute per connection.
    Calls,
    /// The node holds as many clients as it may (max clients).
    ServerFull,
}

/// One thing a session did that is worth counting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionEvent {
    /// A WebSocket session started.
    Opened,
    /// A session ended.
    Closed(CloseReason),
    /// The router handled a text message (`kind` `None`: it did not parse), answering `error`.
    Handled {
        /// The message's type.
        kind: Option<MessageKind>,
        /// The error it drew, if any.
        error: Option<ErrorCode>,
    },
    /// The session itself answered with this error (size, rate, frame type, refusal).
    Error(ErrorCode),
    /// A frame of this kind went to the socket.
    Sent(ServerKind),
    /// A limit refused something.
    Limited(SessionLimit),
    /// The connection's outbound queue overflowed or a write stalled.
    OutboxOverflow,
    /// No pong came back in time.
    HeartbeatTimeout,
}

/// Receives [`SessionEvent`]s. Called on the session's task for every frame sent: keep it cheap
/// and never block.
pub trait SessionObserver: Send + Sync {
    /// One event.
    fn session_event(&self, event: SessionEvent);
}

/// An observer that counts nothing (tests, tools).
#[derive(Debug, Clone, Copy, Default)]
pub struct Unobserved;

impl SessionObserver for Unobserved {
    fn session_event(&self, _event: SessionEvent) {}
}
