//! Which IDs' logs are being moved to the bus right now, and a bounded wait for one.
//!
//! When a client of this node drops in a cluster, the router moves its unacknowledged log to the
//! bus's held place one message at a time; a newer message for that ID must be held after the
//! log, not between its messages. This is the one place in signaling that waits on a timer
//! (tokio's), kept out of the router so the core itself reads no clock: the wait is bounded
//! because two flushes that each tell the other's client something must not wait for each other
//! for ever.
//!
//! The same marks serve a second purpose in the router: which IDs' connections have a message
//! of theirs on its way right now (the session awaits its delivery), so a node handing an ID
//! over to another waits until it is out (see `Router::wait_sent`).

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use tokio::sync::watch;

use super::protocol::ClientId;

/// Longest a message waits for the flush of its recipient's log (a flush is one held-stream
/// write per message, each within the bus's 1 s timeout).
const FLUSH_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// The IDs whose log a flush is moving to the bus's held place, one message after another. A
/// message for such an ID that would be held too (from another node's inbox, or a local sender)
/// waits until the flush is done, so it is held after the log it is newer than: without this, a
/// candidate that arrived while a dropped client's last messages were being moved overtook
/// them (a resume delivered 19 before 18).
#[derive(Default)]
pub struct Flushes {
    /// One entry per flush in progress; its sender is dropped when the flush ends.
    ids: Mutex<HashMap<ClientId, watch::Receiver<()>>>,
}

impl Flushes {
    /// Marks `id` as flushing until the returned guard is dropped.
    pub fn start(&self, id: ClientId) -> watch::Sender<()> {
        let (done, rx) = watch::channel(());
        self.lock().insert(id, rx);
        done
    }

    /// Ends `id`'s flush (`done` is the guard [`Flushes::start`] returned).
    pub fn end(&self, id: ClientId, done: watch::Sender<()>) {
        self.lock().remove(&id);
        drop(done);
    }

    /// Waits for the flush of `id`'s log, if one is in progress, at most [`FLUSH_WAIT`] (two
    /// flushes that each tell the other's client something must not wait for each other for
    /// ever; past the bound the message is held as before, possibly ahead of the log).
    pub async fn wait(&self, id: ClientId) {
        self.wait_within(id, FLUSH_WAIT).await;
    }

    /// Waits until `id` is not marked (at once if it is not), at most `bound`.
    pub async fn wait_within(&self, id: ClientId, bound: std::time::Duration) {
        let rx = self.lock().get(&id).cloned();
        if let Some(mut rx) = rx {
            // Err once the mark's sender is dropped: the work is done.
            let done = async { while rx.changed().await.is_ok() {} };
            let _ = tokio::time::timeout(bound, done).await;
        }
    }

    /// Whether `id`'s log is being moved right now.
    pub fn contains(&self, id: ClientId) -> bool {
        self.lock().contains_key(&id)
    }

    /// How many flushes are in progress.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no flush is in progress.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// The map; a panic elsewhere while holding it leaves nothing half-written.
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ClientId, watch::Receiver<()>>> {
        self.ids.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
