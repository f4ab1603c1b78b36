//! The registry's vocabulary as CLUSTER-DESIGN.md spells it, for the Redis implementation to be
//! written and tested before the `hubcore` branch's `signaling/registry.rs` exists.
//!
//! Plain data only, shaped like hubcore's `signaling/registry.rs` (commit 2ca22e9): when the
//! branches merge, this file becomes one `pub use crate::signaling::registry::{...}` line plus
//! [`Unavailable`] and [`BindingError`]. The Redis code imports these names from here only.
//!
//! One deliberate addition, because a network backend can fail where a map in memory cannot: the
//! operations the design types as `Result<_, Stale>` or infallible (detach, release, expire,
//! call_state, locate, refresh) return [`BindingError`] or [`Unavailable`] here, so a Redis outage
//! is never mistaken for a stale binding or an unknown ID.

use std::fmt;
use std::sync::Arc;

use crate::signaling::protocol::{ClientId, ResumeToken};
pub use crate::signaling::registry::{Binding, CallState, Stale};

/// Which node holds an ID. Single node: one fixed id ("local"). Cluster: the `node-id` setting.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(Arc<str>);

impl NodeId {
    /// Wraps a node name as configured.
    pub fn new(name: &str) -> Self {
        Self(Arc::from(name))
    }

    /// The one node of a server that runs alone.
    pub fn local() -> Self {
        Self::new("local")
    }

    /// The name, as written into Redis and into the node's bus channel.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A freshly claimed ID: live on the claiming node.
#[derive(Clone, Debug)]
pub struct Claim {
    /// The new ID with its first epoch.
    pub binding: Binding,
    /// The secret the client resumes with; the registry keeps only its digest.
    pub token: ResumeToken,
}

/// The call-state changes a client message can ask for (replaces `update_call`'s closures).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    /// video-offer-request: me Idle and peer Idle -> me Calling{peer}, peer Called{me}.
    /// me not Idle -> AlreadyInCall; peer unknown -> UnknownPeer; peer not Idle -> Busy.
    Offer,
    /// client-reply accepted: me Called{peer} -> both InCall.    else WrongState(mine)
    Accept,
    /// client-reply declined: me Called{peer} -> both Idle.       else WrongState(mine)
    Decline,
    /// cancel: me Calling{peer} -> both Idle.                     else WrongState(mine)
    Cancel,
    /// close-call-client: me in any phase with peer -> both Idle. else WrongState(mine)
    Hangup,
}

/// Why a transition was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TransitionError {
    /// The binding no longer holds its ID.
    #[error(transparent)]
    Stale(#[from] Stale),
    /// An offer while a call is going.
    #[error("You are already {} with {peer}; hang up first.", state.describe())]
    AlreadyInCall {
        /// The current call's peer.
        peer: ClientId,
        /// The current call's phase.
        state: CallState,
    },
    /// Nobody holds the called ID.
    #[error("Nobody with that ID is connected.")]
    UnknownPeer,
    /// The callee is in a call of its own.
    #[error("The called client is busy.")]
    Busy,
    /// The message does not fit the caller's call state (its current state is given).
    #[error("That message does not fit your call state ({}).", .0.describe())]
    WrongState(CallState),
    /// The registry's backend cannot be reached; the client gets a clear code, not a violation.
    #[error("The cluster registry cannot be reached right now.")]
    Unavailable,
}

/// A successful resume: the target ID now belongs to the resuming connection.
#[derive(Clone, Debug)]
pub struct Takeover {
    /// The target with a new epoch, on this node.
    pub binding: Binding,
    /// The new token.
    pub token: ResumeToken,
    /// Where it was (live or reserved); may be this node or a dead one.
    pub previous_node: NodeId,
    /// A half-open connection held it: that node must kick it.
    pub was_live: bool,
    /// The previous holder's epoch, so its node can tell which connection to kick.
    pub previous_epoch: u64,
    /// The call, carried over.
    pub call: CallState,
}

/// An ID freed for good. `peer`'s call was reset to Idle: tell it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Freed {
    /// The freed ID.
    pub id: ClientId,
    /// The call peer whose state was reset, if the ID was in a call.
    pub peer: Option<ClientId>,
}

/// Where an ID is held.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    /// The node holding it (live) or that held it last (reserved).
    pub node: NodeId,
    /// Its current holder's epoch.
    pub epoch: u64,
    /// A connection holds it now (`false`: reserved, waiting for a resume).
    pub live: bool,
}

/// The registry's backend (Redis) could not be reached or answered nonsense in time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("The cluster registry cannot be reached right now.")]
pub struct Unavailable;

/// Why an operation on a binding failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BindingError {
    /// The binding no longer holds its ID.
    #[error(transparent)]
    Stale(#[from] Stale),
    /// The backend cannot be reached.
    #[error(transparent)]
    Unavailable(#[from] Unavailable),
}

/// Why a new connection could not be given an ID (as hubcore's, with `Unavailable`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RegisterError {
    /// The node holds as many clients as it is configured for (never returned by Redis).
    #[error("The server holds as many clients as it is configured for.")]
    Full,
    /// Random draws kept hitting taken IDs; the ID space is too crowded for the ID length.
    #[error("No free client ID was found; the ID length is too short for this many clients.")]
    NoFreeId,
    /// The new connection's queue refused the `id` message (never returned by Redis).
    #[error("The new connection's outbound queue did not accept its first message.")]
    OutboxRejected,
    /// The shared registry (Redis) cannot be reached.
    #[error("The cluster's shared registry cannot be reached.")]
    Unavailable,
}

/// Why a resume was refused (as hubcore's, with `Unavailable`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ResumeError {
    /// No such ID is held (never issued, expired, or already freed) — or it is the resuming
    /// connection's own ID. Deliberately indistinguishable from a wrong token on the wire.
    #[error("The ID is not held by anyone who can be resumed.")]
    Unknown,
    /// The token does not match the ID's current token.
    #[error("The resume token does not match.")]
    TokenMismatch,
    /// The resuming connection is itself in a call and would abandon it.
    #[error("The resuming connection is in a call of its own.")]
    InCall,
    /// The resuming connection no longer holds its own ID.
    #[error(transparent)]
    Stale(#[from] Stale),
    /// The shared registry (Redis) cannot be reached.
    #[error("The cluster's shared registry cannot be reached.")]
    Unavailable,
}

impl From<Unavailable> for RegisterError {
    fn from(Unavailable: Unavailable) -> Self {
        Self::Unavailable
    }
}

impl From<Unavailable> for ResumeError {
    fn from(Unavailable: Unavailable) -> Self {
        Self::Unavailable
    }
}

impl From<Unavailable> for TransitionError {
    fn from(Unavailable: Unavailable) -> Self {
        Self::Unavailable
    }
}
