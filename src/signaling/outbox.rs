//! A connection's outbox: the bounded queue the router pushes ready-to-send frames into without ever
//! blocking, and the session drains.
//!
//! A tokio `mpsc` channel did this before, but it allocates a 32-slot block and two cache-line
//! aligned headers up front (≈ 1.6 KB per connection, 13% of an idle connection's memory) and
//! pays a semaphore for its bound. Here one mutex guards a `VecDeque` that holds no memory while
//! empty. The router and the session each take the lock for a push or a pop; nothing else shares it.
//!
//! There is one sender. Dropping it is how the router tells the session "this connection is done"
//! (another connection resumed its ID, or its queue overflowed): the receiver then sees the end
//! after the frames already queued.
//!
//! A queue is bounded in frames and in bytes, and all queues together by one [`OutboxBudget`]:
//! once that is spent, a connection with more than [`PRESSURE_BYTES`] queued counts as too slow
//! (its push fails, and the router detaches it), while one that keeps up still gets its frames.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use super::connections::{Outbox, PushError};
use super::protocol::ServerFrame;

/// Under global pressure, a queue holding more than this many bytes refuses new frames. One
/// largest message: a client that keeps up rarely has more waiting.
pub const PRESSURE_BYTES: usize = 64 * 1024;

/// The byte budget shared by every connection's outbox.
#[derive(Debug)]
pub struct OutboxBudget {
    /// Most bytes queued over all outboxes (soft: see [`PRESSURE_BYTES`]).
    limit: usize,
    /// Bytes queued now.
    used: AtomicUsize,
}

impl OutboxBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            limit,
            used: AtomicUsize::new(0),
        })
    }

    /// Bytes queued over all outboxes now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }
}

/// How much one outbox may hold.
#[derive(Clone, Debug)]
pub struct OutboxLimits {
    /// Most frames queued.
    pub frames: usize,
    /// Most bytes queued.
    pub bytes: usize,
    /// The budget over all outboxes, if any.
    pub budget: Option<Arc<OutboxBudget>>,
}

/// A new outbox holding at most `capacity` frames (of any size, outside any shared budget).
pub fn channel(capacity: usize) -> (OutboxSender, OutboxReceiver) {
    bounded(OutboxLimits {
        frames: capacity,
        bytes: usize::MAX,
        budget: None,
    })
}

/// A new outbox holding what `limits` allow.
pub fn bounded(limits: OutboxLimits) -> (OutboxSender, OutboxReceiver) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            frames: VecDeque::new(),
            bytes: 0,
            waker: None,
            sender_gone: false,
            receiver_gone: false,
            reused: false,
        }),
        limits,
    });
    (
        OutboxSender {
            shared: shared.clone(),
        },
        OutboxReceiver { shared },
    )
}

/// The router's end: pushes frames, never waits.
#[derive(Debug)]
pub struct OutboxSender {
    /// The queue, shared with the receiver.
    shared: Arc<Shared>,
}

/// The session's end: takes frames in order, then sees the end once the sender is dropped.
#[derive(Debug)]
pub struct OutboxReceiver {
    /// The queue, shared with the sender.
    shared: Arc<Shared>,
}

/// What both ends share.
#[derive(Debug)]
struct Shared {
    /// The frames and who is still there.
    state: Mutex<State>,
    /// Most frames and bytes queued at once.
    limits: OutboxLimits,
}

/// The queue proper.
#[derive(Debug)]
struct State {
    /// Frames not yet taken by the session.
    frames: VecDeque<ServerFrame>,
    /// Their total length.
    bytes: usize,
    /// The session waiting for a frame, if it is.
    waker: Option<Waker>,
    /// The sender was dropped: no more frames will come.
    sender_gone: bool,
    /// The receiver was dropped: frames pushed now would never be sent.
    receiver_gone: bool,
    /// A frame has been taken since the queue first emptied: from then on a small emptied queue
    /// keeps its memory (a connection in use will get more frames), before that it lets go of it
    /// (after its `id` message, an idle connection may get nothing for hours).
    reused: bool,
}

impl Shared {
    /// The state; a panic elsewhere while holding the lock leaves it consistent (every change
    /// is one field at a time), so a poisoned lock is used as is.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Outbox for OutboxSender {
    fn try_push(&self, frame: ServerFrame) -> Result<(), PushError> {
        let mut state = self.shared.lock();
        if state.receiver_gone {
            return Err(PushError::Closed(frame));
        }
        let len = frame.len();
        let limits = &self.shared.limits;
        if state.frames.len() >= limits.frames || state.bytes.saturating_add(len) > limits.bytes {
            return Err(PushError::Full(frame));
        }
        if let Some(budget) = &limits.budget {
            let used = budget.used.fetch_add(len, Ordering::Relaxed) + len;
            if used > budget.limit && state.bytes > PRESSURE_BYTES {
                budget.used.fetch_sub(len, Ordering::Relaxed);
                return Err(PushError::Full(frame));
            }
        }
        state.bytes += len;
        state.frames.push_back(frame);
        let waker = state.waker.take();
        drop(state);
        if let Some(waker) = waker {
            waker.wake();
        }
        Ok(())
    }

    fn take_unsent(&self) -> Vec<ServerFrame> {
        self.take_all()
    }
}

impl OutboxSender {
    /// See [`Outbox::take_unsent`].
    fn take_all(&self) -> Vec<ServerFrame> {
        let mut state = self.shared.lock();
        let frames: Vec<ServerFrame> = std::mem::take(&mut state.frames).into();
        if let Some(budget) = &self.shared.limits.budget {
            budget.used.fetch_sub(state.bytes, Ordering::Relaxed);
        }
        state.bytes = 0;
        frames
    }
}

impl Drop for OutboxSender {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        state.sender_gone = true;
        let waker = state.waker.take();
        drop(state);
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

impl OutboxReceiver {
    /// The next frame; `None` once the sender is gone and every frame has been taken.
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<ServerFrame>> {
        let mut state = self.shared.lock();
        if let Some(frame) = pop(&mut state, &self.shared.limits) {
            return Poll::Ready(Some(frame));
        }
        if state.sender_gone {
            return Poll::Ready(None);
        }
        match &mut state.waker {
            Some(waker) if waker.will_wake(cx.waker()) => {}
            slot => *slot = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    /// The next frame if one is queued.
    pub fn try_recv(&mut self) -> Option<ServerFrame> {
        pop(&mut self.shared.lock(), &self.shared.limits)
    }

    /// ServerFrame queued and not yet taken.
    pub fn queued_bytes(&self) -> usize {
        self.shared.lock().bytes
    }

    /// Whether the sender is gone (frames already queued can still be taken).
    pub fn is_closed(&self) -> bool {
        self.shared.lock().sender_gone
    }

    /// Waits for the next frame; `None` once the sender is gone and the queue is empty.
    pub async fn recv(&mut self) -> Option<ServerFrame> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }
}

impl Drop for OutboxReceiver {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        state.receiver_gone = true;
        // Frames nobody will send are freed now, not when the router lets go of the sender.
        state.frames = VecDeque::new();
        if let Some(budget) = &self.shared.limits.budget {
            budget.used.fetch_sub(state.bytes, Ordering::Relaxed);
        }
        state.bytes = 0;
    }
}

/// Takes the oldest frame; the queue's memory goes back once it is empty, unless it is small and
/// the queue is in use (it emptied once before).
///
/// The first time the queue empties it always lets go: an idle connection has been sent its `id`
/// and then nothing, and would otherwise keep 4 slots (160 B) for nothing. A queue that fills
/// again keeps its small allocation, so the relay path allocates no more than before.
fn pop(state: &mut State, limits: &OutboxLimits) -> Option<ServerFrame> {
    let frame = state.frames.pop_front()?;
    state.bytes -= frame.len();
    if let Some(budget) = &limits.budget {
        budget.used.fetch_sub(frame.len(), Ordering::Relaxed);
    }
    if state.frames.is_empty() {
        if state.frames.capacity() > 4 || !state.reused {
            state.frames = VecDeque::new();
        }
        state.reused = true;
    }
    Some(frame)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signaling::protocol::ServerKind;
    use bytes::Bytes;

    /// A frame of `bytes` (its kind does not matter to the queue).
    fn f(bytes: Bytes) -> ServerFrame {
        ServerFrame {
            kind: ServerKind::Pong,
            bytes,
        }
    }

    fn text(frame: Option<ServerFrame>) -> Option<Bytes> {
        frame.map(|f| f.bytes)
    }

    #[tokio::test]
    async fn frames_come_out_in_order_and_the_end_follows_the_last() {
        let (tx, mut rx) = channel(4);
        for text in ["a", "b", "c"] {
            tx.try_push(f(Bytes::from_static(text.as_bytes()))).unwrap();
        }
        assert!(!rx.is_closed());
        drop(tx);
        assert!(rx.is_closed());
        assert_eq!(text(rx.recv().await).as_deref(), Some(&b"a"[..]));
        assert_eq!(text(rx.try_recv()).as_deref(), Some(&b"b"[..]));
        assert_eq!(text(rx.recv().await).as_deref(), Some(&b"c"[..]));
        assert_eq!(rx.recv().await, None);
    }

    #[tokio::test]
    async fn a_full_queue_hands_the_frame_back() {
        let (tx, mut rx) = channel(2);
        tx.try_push(f(Bytes::from_static(b"1"))).unwrap();
        tx.try_push(f(Bytes::from_static(b"2"))).unwrap();
        match tx.try_push(f(Bytes::from_static(b"3"))) {
            Err(PushError::Full(frame)) => assert_eq!(&frame.bytes[..], b"3"),
            other => panic!("expected Full, got {other:?}"),
        }
        assert_eq!(text(rx.try_recv()).as_deref(), Some(&b"1"[..]));
        tx.try_push(f(Bytes::from_static(b"3"))).unwrap();
    }

    #[test]
    fn a_dropped_receiver_closes_the_queue_and_frees_its_frames() {
        let (tx, rx) = channel(8);
        tx.try_push(f(Bytes::from(vec![0; 1000]))).unwrap();
        drop(rx);
        assert_eq!(tx.shared.lock().frames.capacity(), 0);
        match tx.try_push(f(Bytes::from_static(b"late"))) {
            Err(PushError::Closed(frame)) => assert_eq!(&frame.bytes[..], b"late"),
            other => panic!("expected Closed, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_waiting_receiver_is_woken_by_a_push_from_another_task_and_by_the_drop() {
        let (tx, mut rx) = channel(8);
        let waiting = tokio::spawn(async move {
            let first = rx.recv().await;
            let end = rx.recv().await;
            (first, end)
        });
        tokio::task::yield_now().await;
        tx.try_push(f(Bytes::from_static(b"hello"))).unwrap();
        drop(tx);
        let (first, end) = waiting.await.unwrap();
        assert_eq!(text(first).as_deref(), Some(&b"hello"[..]));
        assert_eq!(end, None);
    }

    #[test]
    fn a_queue_is_bounded_in_bytes() {
        let (tx, mut rx) = bounded(OutboxLimits {
            frames: 100,
            bytes: 10,
            budget: None,
        });
        tx.try_push(f(Bytes::from_static(b"123456"))).unwrap();
        assert!(matches!(
            tx.try_push(f(Bytes::from_static(b"12345"))),
            Err(PushError::Full(_))
        ));
        tx.try_push(f(Bytes::from_static(b"1234"))).unwrap();
        assert_eq!(rx.queued_bytes(), 10);
        rx.try_recv().unwrap();
        tx.try_push(f(Bytes::from_static(b"12345"))).unwrap();
    }

    #[test]
    fn the_shared_budget_cuts_the_queue_that_holds_the_most_and_spares_one_that_keeps_up() {
        let budget = OutboxBudget::new(2 * PRESSURE_BYTES);
        let limits = OutboxLimits {
            frames: 1000,
            bytes: usize::MAX,
            budget: Some(budget.clone()),
        };
        let (slow, slow_rx) = bounded(limits.clone());
        let (fast, mut fast_rx) = bounded(limits);
        let chunk = || Bytes::from(vec![0; 16 * 1024]);
        // The slow reader fills the budget and then some.
        let mut queued = 0;
        while slow.try_push(f(chunk())).is_ok() {
            queued += 1;
        }
        assert!(budget.used() >= 2 * PRESSURE_BYTES);
        assert!(queued * 16 * 1024 > PRESSURE_BYTES);
        // A reader that keeps up (its queue is short) still gets every frame.
        for _ in 0..100 {
            fast.try_push(f(chunk())).unwrap();
            fast_rx.try_recv().unwrap();
        }
        // Dropping the slow receiver gives its bytes back.
        drop(slow_rx);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn a_queue_emptied_the_first_time_holds_no_memory_then_keeps_a_small_one() {
        let (tx, mut rx) = channel(128);
        // The `id` message, then silence: an idle connection keeps no queue.
        tx.try_push(f(Bytes::from_static(b"id"))).unwrap();
        rx.try_recv().unwrap();
        assert_eq!(tx.shared.lock().frames.capacity(), 0);
        // A connection in use keeps its few slots between messages.
        tx.try_push(f(Bytes::from_static(b"offer"))).unwrap();
        rx.try_recv().unwrap();
        assert!(tx.shared.lock().frames.capacity() > 0);
        assert!(tx.shared.lock().frames.capacity() <= 4);
    }

    #[test]
    fn an_emptied_queue_gives_its_memory_back() {
        let (tx, mut rx) = channel(128);
        for _ in 0..100 {
            tx.try_push(f(Bytes::from_static(b"x"))).unwrap();
        }
        while rx.try_recv().is_some() {}
        assert_eq!(tx.shared.lock().frames.capacity(), 0);
    }
}
