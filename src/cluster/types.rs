//! The registry's vocabulary for the Redis code: hubcore's types from `signaling/registry.rs`,
//! plus the two a network backend needs that a map in memory does not.
//!
//! The Redis operations that the [`Registry`](crate::signaling::registry::Registry) trait types as
//! `Result<_, Stale>` or infallible (detach, release, expire, call_state, locate, refresh) return
//! [`BindingError`] or [`Unavailable`] here, so a Redis outage is never mistaken for a stale
//! binding or an unknown ID. The trait adapter in [`super::calls`] decides what an outage means
//! for each of them (see its docs); the hub's own error enums (`RegisterError`, `ResumeError`,
//! `TransitionError`) carry `Unavailable` themselves, and the client gets `cluster_unavailable`.

pub use crate::signaling::registry::{
    Binding, CallState, Claim, Freed, Location, NodeId, RegisterError, ResumeError, Stale,
    Takeover, Transition, TransitionError,
};

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
