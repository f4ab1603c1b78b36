//! [`TurnError`]: why the relay could not start.

use std::net::SocketAddr;

/// Why [`Relay::start`](super::Relay::start) failed. Each message says what to change.
#[derive(Debug, thiserror::Error)]
pub enum TurnError {
    /// A setting is missing or contradicts another.
    #[error("invalid TURN settings: {0}")]
    InvalidSettings(String),
    /// A listening socket could not be bound (port in use, address not local, no permission).
    #[error("could not bind the TURN {transport} listener on {addr}: {source}")]
    Bind {
        /// "UDP", "TCP" or "TLS".
        transport: &'static str,
        /// The address asked for.
        addr: SocketAddr,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// A listening IP is a wildcard and this host's addresses could not be listed.
    #[error("could not list this host's addresses to listen on (listening-ip is a wildcard): {0}")]
    HostAddresses(#[source] std::io::Error),
    /// The `turn` engine refused its configuration or failed to start.
    #[error("the TURN engine failed to start: {0}")]
    Engine(#[from] turn::Error),
}
