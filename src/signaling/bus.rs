//! Delivery to an ID that another node holds. The [`Bus`] is asked only for IDs this node does not
//! hold (see [`super::router`]); on a single node every ID is local, so [`NoBus`] answers
//! [`BusDelivery::NoSuchClient`] and is never on a hot path.
//!
//! A cluster's bus (Redis: PUBLISH to the home node's channel, and a bounded per-ID stream for
//! messages that found nobody live) implements the same trait. The receiving node numbers the
//! message in the recipient's log (sequence numbers are given out by the ID's home node only) and
//! reports drops to the sender the same way a local delivery does.

use std::future::Future;

use super::delivery::Envelope;
use super::protocol::{ClientId, DropReason};
use super::registry::{Binding, NodeId};

/// What became of a message handed to the bus.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub enum BusDelivery {
    /// The node holding the ID took it (it numbers and queues or holds it there).
    Delivered,
    /// Nobody holds the ID live right now; the message is held for its resume.
    Held,
    /// No node holds the ID.
    NoSuchClient,
    /// The ID's held budget (or the cluster's) is spent: the sender must be told why.
    Dropped(DropReason),
    /// The bus cannot be reached; the message is lost and its sender must be told.
    Unavailable,
}

/// What was held elsewhere for an ID that just resumed on this node, read but not yet deleted.
#[derive(Debug, Default)]
pub struct Held {
    /// The messages, oldest first; those an old home numbered still carry its `seq`.
    pub messages: Vec<Envelope>,
    /// The `seq` range an old home had to drop and never reported.
    pub missed: Option<(u64, u64)>,
    /// Where the read ended, for [`Bus::trim_held`] once the messages are delivered; `None`
    /// when nothing was held.
    pub cursor: Option<String>,
}

/// The bus could not be reached (a Redis error or timeout).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("The bus between nodes cannot be reached.")]
pub struct BusUnavailable;

/// What the node that held an ID live answered when the ID was resumed here.
#[derive(Debug)]
pub enum Handover {
    /// It closed its connection and sent everything it held, and the range it dropped.
    Flushed(Held),
    /// It did not answer in time, or nobody listens on its channel: it is dead (or cut off), and
    /// what it had numbered for the client after the client's `last_seq` is unknown.
    Unanswered,
}

/// Delivery to IDs held by other nodes.
pub trait Bus: Send + Sync + 'static {
    /// Sends `envelope` to whichever node holds `to`.
    fn send(&self, to: ClientId, envelope: Envelope) -> impl Future<Output = BusDelivery> + Send;

    /// Like [`Bus::send`], but gives `envelope` back when `to` turns out to be held live by this
    /// very node (it resumed here while the message chased it), for the caller to deliver here:
    /// sent through the bus to itself it could be overtaken by the sender's next message,
    /// delivered here directly.
    fn send_unless_here(
        &self,
        to: ClientId,
        envelope: Envelope,
    ) -> impl Future<Output = Result<BusDelivery, Envelope>> + Send {
        async move { Ok(self.send(to, envelope).await) }
    }

    /// Whether messages for an ID reserved on this node go through the bus too (a cluster: into
    /// the one durable held place every node's resume reads), rather than into the local log.
    fn holds_reserved(&self) -> bool {
        false
    }

    /// Takes what was held for `to` while nobody held it live, oldest first (a cluster's resume
    /// replays it). Nothing on a single node, whose local log holds everything.
    fn take_held(&self, to: ClientId) -> impl Future<Output = Vec<Envelope>> + Send {
        let _ = to;
        std::future::ready(Vec::new())
    }

    /// Reads (without deleting) what is held for `to` while nobody held it live, if the ID is
    /// still at `to.epoch`; [`Bus::trim_held`] deletes it once delivered, so a lost answer can be
    /// read again. Nothing on a single node.
    fn read_held(&self, to: Binding) -> impl Future<Output = Result<Held, BusUnavailable>> + Send {
        let _ = to;
        std::future::ready(Ok(Held::default()))
    }

    /// Deletes what [`Bus::read_held`] read for `to`, up to `cursor`.
    fn trim_held(&self, to: ClientId, cursor: String) -> impl Future<Output = ()> + Send {
        let _ = (to, cursor);
        std::future::ready(())
    }

    /// Notes in `binding`'s held place that its messages `missed` were dropped here and not yet
    /// reported, so a resume on any node tells the client.
    fn hold_missed(&self, binding: Binding, missed: (u64, u64)) -> impl Future<Output = ()> + Send {
        let _ = (binding, missed);
        std::future::ready(())
    }

    /// Asks `node` to close the connection holding `old` (the ID was resumed here, as `new`,
    /// while that half-open connection still held it, or while `node` held it reserved) and to
    /// hand over what it held, once nothing for the ID is on its way there any more; waits a
    /// bounded time for the answer. Never called on a single node.
    fn hand_over(
        &self,
        node: &NodeId,
        old: Binding,
        new: Binding,
    ) -> impl Future<Output = Handover> + Send {
        let _ = (node, old, new);
        std::future::ready(Handover::Unanswered)
    }

    /// Asks `node` to close the connection holding `binding`: the ID was resumed here while that
    /// (half-open) connection still held it. Nothing to do on a single node.
    fn kick(&self, node: &NodeId, binding: Binding) -> impl Future<Output = ()> + Send {
        let _ = (node, binding);
        std::future::ready(())
    }

    /// Whether this node sent messages for `to` to another node lately, so a delivery here must
    /// first wait for [`Bus::settle_here`]: `to` just moved here, and what went to its old node
    /// may still be on its way back. Asked before every local delivery: cheap, no I/O.
    fn went_elsewhere(&self, to: ClientId) -> bool {
        let _ = to;
        false
    }

    /// Waits (bounded) until what this node sent `to`'s old node for it has been handled there,
    /// so a local delivery does not overtake it (a barrier through that node). Never called on a
    /// single node.
    fn settle_here(&self, to: ClientId) -> impl Future<Output = ()> + Send {
        let _ = to;
        std::future::ready(())
    }
}

/// The bus of a node that runs alone: there is no other node, so no other ID.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoBus;

impl Bus for NoBus {
    async fn send(&self, _to: ClientId, _envelope: Envelope) -> BusDelivery {
        BusDelivery::NoSuchClient
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signaling::registry::ready;

    #[test]
    fn a_lone_node_knows_no_other_id() {
        let envelope = Envelope::new(&crate::signaling::protocol::ServerMessage::Pong);
        assert_eq!(
            ready(NoBus.send(ClientId::new(123_456_789), envelope)),
            BusDelivery::NoSuchClient
        );
    }
}
