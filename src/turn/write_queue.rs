//! [`WriteQueue`]: what a TCP or TLS client connection holds for its client, bounded in bytes.
//!
//! The engine and the relay sockets hand frames to a stream client without waiting (a slow client
//! must never block the relay). Counting frames would not bound memory: 256 frames of up to 65 KB
//! each are 16.8 MB per connection. The queue instead accepts a frame only while the bytes queued
//! stay within a budget; beyond it the frame is dropped, as a congested UDP path would drop it, and
//! counted in [`TurnStats::client_queue_dropped`]. WebRTC media over TURN is loss-tolerant, and a
//! STUN response lost this way is retransmitted by the client.
//!
//! This module only queues and counts; it never blocks and never decides what to send.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::mpsc;

use super::stats::TurnStats;

/// Bytes one stream client may have queued by default: 256 KiB, three maximum-size frames or
/// about 170 ms of a 12 Mbit/s video call — more than a client that reads at all ever needs.
pub const DEFAULT_WRITE_QUEUE_BYTES: usize = 256 * 1024;

/// The sending side: cloned into every path that writes to one client connection.
#[derive(Clone)]
pub struct WriteQueue {
    /// Frames towards the connection's writer task.
    tx: mpsc::UnboundedSender<Vec<u8>>,
    /// Bytes in `tx` not yet taken by the writer; shared with [`WriteQueueReceiver`].
    queued: Arc<AtomicUsize>,
    /// The most `queued` may reach.
    budget: usize,
    /// Where drops are counted.
    stats: Arc<TurnStats>,
}

/// The receiving side, owned by the connection's writer task.
pub struct WriteQueueReceiver {
    /// Frames from every [`WriteQueue`] clone.
    rx: mpsc::UnboundedReceiver<Vec<u8>>,
    /// Decremented as frames are taken.
    queued: Arc<AtomicUsize>,
}

/// A queue holding at most `budget` bytes (an empty queue still takes one frame of any size, so
/// a budget below the largest frame cannot stall a connection).
pub fn channel(budget: usize, stats: Arc<TurnStats>) -> (WriteQueue, WriteQueueReceiver) {
    let (tx, rx) = mpsc::unbounded_channel();
    let queued = Arc::new(AtomicUsize::new(0));
    (
        WriteQueue {
            tx,
            queued: Arc::clone(&queued),
            budget,
            stats,
        },
        WriteQueueReceiver { rx, queued },
    )
}

impl WriteQueue {
    /// Queues `frame` if it fits in the budget and the connection is still open; otherwise drops
    /// it (counting a drop for a full queue). Returns whether it was queued. Never waits.
    pub fn push(&self, frame: Vec<u8>) -> bool {
        let len = frame.len();
        let before = self.queued.fetch_add(len, Ordering::AcqRel);
        if before > 0 && before + len > self.budget {
            self.queued.fetch_sub(len, Ordering::AcqRel);
            TurnStats::bump(&self.stats.client_queue_dropped);
            return false;
        }
        if self.tx.send(frame).is_err() {
            // The writer is gone: the connection is closing and nobody will read this.
            self.queued.fetch_sub(len, Ordering::AcqRel);
            return false;
        }
        true
    }

    /// Bytes queued and not yet taken by the writer.
    pub fn queued_bytes(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }
}

impl WriteQueueReceiver {
    /// The next frame, or `None` once every [`WriteQueue`] clone is gone.
    pub async fn recv(&mut self) -> Option<Vec<u8>> {
        let frame = self.rx.recv().await?;
        self.queued.fetch_sub(frame.len(), Ordering::AcqRel);
        Some(frame)
    }

    /// Whether no frame is waiting right now (the writer then flushes).
    pub fn is_empty(&self) -> bool {
        self.rx.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stalled_client_holds_at_most_the_budget_and_drops_are_counted() {
        let stats = Arc::new(TurnStats::default());
        let (queue, mut rx) = channel(DEFAULT_WRITE_QUEUE_BYTES, Arc::clone(&stats));
        // The largest frame a stream carries: ChannelData with 65,535 bytes, padded.
        let frame = vec![0x40; 65_540];
        let accepted = (0..256).filter(|_| queue.push(frame.clone())).count();
        // A queue of 256 frames would have taken all of them: 16.8 MB for one client.
        assert_eq!(accepted, 3, "256 KiB holds three maximum-size frames");
        assert!(queue.queued_bytes() <= DEFAULT_WRITE_QUEUE_BYTES);
        assert_eq!(stats.snapshot().client_queue_dropped, 253);

        // Small frames still fit in what is left, and the writer taking one frees its bytes.
        assert!(queue.push(vec![0x40; 100]));
        assert!(rx.recv().await.is_some());
        assert!(
            queue.push(frame.clone()),
            "room again after the writer took a frame"
        );
        assert!(!queue.push(frame.clone()));
    }

    #[tokio::test]
    async fn an_empty_queue_takes_one_frame_larger_than_the_budget() {
        let (queue, mut rx) = channel(1000, Arc::new(TurnStats::default()));
        assert!(queue.push(vec![0; 5000]));
        assert!(!queue.push(vec![0; 1]));
        assert_eq!(rx.recv().await.unwrap().len(), 5000);
        assert_eq!(queue.queued_bytes(), 0);
        assert!(queue.push(vec![0; 1]));
    }

    #[tokio::test]
    async fn frames_for_a_closed_connection_are_refused_without_counting_a_drop() {
        let stats = Arc::new(TurnStats::default());
        let (queue, rx) = channel(1000, Arc::clone(&stats));
        drop(rx);
        assert!(!queue.push(vec![0; 10]));
        assert_eq!(queue.queued_bytes(), 0);
        assert_eq!(stats.snapshot().client_queue_dropped, 0);
    }
}
