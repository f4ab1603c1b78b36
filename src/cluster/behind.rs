//! Messages from the inbox that wait, per ID, behind the flush of that ID's log.
//!
//! A message from another node for a client that just dropped here must be held after the log the
//! node is moving to the client's held stream (see `signaling::flushes`). The inbox used to wait
//! for that flush inline (up to 2 s), and every message behind it — for any ID — waited too. Now
//! the message waits in a queue of its own ID ([`Behind`]), drained in order once the flush is
//! done ([`drain`]); messages for other IDs go on at once, and a later message for the same ID
//! joins the queue, so its order is kept. The queues are bounded in all (a full set makes the
//! inbox wait inline again, as before: back-pressure, never loss).

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::signaling::protocol::ClientId;

/// What waits behind flushes, per ID, bounded in all.
pub struct Behind<T> {
    /// The queues and their total length.
    inner: Mutex<Queues<T>>,
    /// Most items waiting, in all queues together.
    capacity: usize,
    /// IDs with a queue, so the common case (nothing flushing) costs the inbox one atomic load
    /// per message, no lock.
    queued_ids: AtomicUsize,
}

/// The queues of [`Behind`].
struct Queues<T> {
    /// Per ID, oldest first; an ID has an entry exactly while something waits for it or is being
    /// handled by its [`drain`].
    by_id: HashMap<ClientId, VecDeque<T>>,
    /// Items in all queues.
    len: usize,
}

impl<T> Behind<T> {
    /// Empty, holding at most `capacity` items in all.
    pub fn new(capacity: usize) -> Self {
        Self {
            inner: Mutex::new(Queues {
                by_id: HashMap::new(),
                len: 0,
            }),
            capacity,
            queued_ids: AtomicUsize::new(0),
        }
    }

    /// Queues `item` behind what already waits for `id`, whatever the room (an item for an ID
    /// with a queue must not overtake it); gives it back when nothing waits for `id`.
    ///
    /// Costs one atomic load when no ID has a queue. Seeing none while another task starts one
    /// is harmless: [`Behind::start`] then joins it.
    pub fn push(&self, id: ClientId, item: T) -> Result<(), T> {
        if self.queued_ids.load(Ordering::Acquire) == 0 {
            return Err(item);
        }
        let mut inner = self.lock();
        let Some(queue) = inner.by_id.get_mut(&id) else {
            return Err(item);
        };
        queue.push_back(item);
        inner.len += 1;
        Ok(())
    }

    /// Starts a queue for `id` with `item`: `Ok(true)`, and a [`drain`] must empty it. Joins
    /// `id`'s queue if it has one by now (`Ok(false)`: its drain takes it). Gives `item` back
    /// when `capacity` items wait already and `id` has no queue (the caller then waits for the
    /// flush itself).
    pub fn start(&self, id: ClientId, item: T) -> Result<bool, T> {
        let mut inner = self.lock();
        if let Some(queue) = inner.by_id.get_mut(&id) {
            queue.push_back(item);
            inner.len += 1;
            return Ok(false);
        }
        if inner.len >= self.capacity {
            return Err(item);
        }
        inner.by_id.insert(id, VecDeque::from([item]));
        inner.len += 1;
        self.queued_ids.fetch_add(1, Ordering::AcqRel);
        Ok(true)
    }

    /// The next item for `id`; `None` once none is left, and from then on nothing waits for
    /// `id` (its next message is not queued).
    pub fn next(&self, id: ClientId) -> Option<T> {
        let mut inner = self.lock();
        let queue = inner.by_id.get_mut(&id)?;
        match queue.pop_front() {
            Some(item) => {
                inner.len -= 1;
                Some(item)
            }
            None => {
                inner.by_id.remove(&id);
                self.queued_ids.fetch_sub(1, Ordering::AcqRel);
                None
            }
        }
    }

    /// Items waiting, in all queues.
    pub fn len(&self) -> usize {
        self.lock().len
    }

    /// Whether nothing waits (and no queue is being drained).
    pub fn is_empty(&self) -> bool {
        self.lock().by_id.is_empty()
    }

    /// The queues; a panic elsewhere while holding them leaves them whole.
    fn lock(&self) -> MutexGuard<'_, Queues<T>> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Once `flushed` is done, hands what waits for `id` to `handle`, one item after another in
/// order (each finished before the next), until none is left.
pub async fn drain<T, F, Fut>(behind: &Behind<T>, id: ClientId, flushed: impl Future, mut handle: F)
where
    F: FnMut(T) -> Fut,
    Fut: Future<Output = ()>,
{
    flushed.await;
    while let Some(item) = behind.next(id) {
        handle(item).await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use tokio::sync::mpsc;
    use tokio::time::Instant;

    use super::*;
    use crate::signaling::flushes::Flushes;

    /// What the inbox does with one message (a number) for `id`: queued behind `id`'s queue, or
    /// handled now unless `id` is flushing, in which case a queue starts and a drain task
    /// empties it once the flush is done (or after the flush wait's bound).
    fn receive(
        flushes: &Arc<Flushes>,
        behind: &Arc<Behind<u32>>,
        handled: &mpsc::UnboundedSender<(ClientId, u32)>,
        id: ClientId,
        n: u32,
    ) {
        let Err(n) = behind.push(id, n) else { return };
        if flushes.contains(id) {
            if behind.start(id, n) == Ok(true) {
                let (flushes, behind, handled) = (flushes.clone(), behind.clone(), handled.clone());
                tokio::spawn(async move {
                    drain(&behind, id, flushes.wait(id), |n| {
                        let _ = handled.send((id, n));
                        std::future::ready(())
                    })
                    .await;
                });
                return;
            }
            unreachable!("room for the test's few");
        }
        let _ = handled.send((id, n));
    }

    #[tokio::test(start_paused = true)]
    async fn a_flushing_id_holds_up_only_its_own_messages_which_keep_their_order() {
        let flushes = Arc::new(Flushes::default());
        let behind = Arc::new(Behind::new(16));
        let (tx, mut rx) = mpsc::unbounded_channel();
        let (dropped, other) = (ClientId::new(111_111_111), ClientId::new(222_222_222));
        let done = flushes.start(dropped);
        let started = Instant::now();

        receive(&flushes, &behind, &tx, dropped, 1);
        receive(&flushes, &behind, &tx, other, 10);
        receive(&flushes, &behind, &tx, dropped, 2);
        receive(&flushes, &behind, &tx, other, 11);
        // The other ID's messages go on at once, without waiting for the flush.
        assert_eq!(rx.recv().await, Some((other, 10)));
        assert_eq!(rx.recv().await, Some((other, 11)));
        assert_eq!(started.elapsed(), Duration::ZERO);
        assert_eq!(behind.len(), 2);

        // The flush ends a second later: the dropped ID's messages follow, in order, and a
        // message that arrives meanwhile still queues behind them.
        tokio::time::sleep(Duration::from_secs(1)).await;
        receive(&flushes, &behind, &tx, dropped, 3);
        flushes.end(dropped, done);
        for n in 1..=3 {
            assert_eq!(rx.recv().await, Some((dropped, n)));
        }
        assert_eq!(started.elapsed(), Duration::from_secs(1));
        tokio::task::yield_now().await;
        assert!(behind.is_empty(), "the drain leaves no queue behind");
        // Nothing flushes now: the next message is handled at once.
        receive(&flushes, &behind, &tx, dropped, 4);
        assert_eq!(rx.recv().await, Some((dropped, 4)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_flush_that_never_ends_holds_its_ids_messages_only_for_the_flush_waits_bound() {
        let flushes = Arc::new(Flushes::default());
        let behind = Arc::new(Behind::new(16));
        let (tx, mut rx) = mpsc::unbounded_channel();
        let stuck = ClientId::new(333_333_333);
        let _never = flushes.start(stuck);
        let started = Instant::now();
        receive(&flushes, &behind, &tx, stuck, 1);
        receive(&flushes, &behind, &tx, stuck, 2);
        assert_eq!(rx.recv().await, Some((stuck, 1)));
        assert_eq!(rx.recv().await, Some((stuck, 2)));
        assert_eq!(started.elapsed(), Duration::from_secs(2));
    }

    #[test]
    fn the_queues_are_bounded_in_all_but_a_queued_ids_messages_always_join_it() {
        let behind = Behind::new(2);
        let (a, b, c) = (
            ClientId::new(111_111_111),
            ClientId::new(222_222_222),
            ClientId::new(333_333_333),
        );
        assert_eq!(behind.push(a, 1), Err(1), "no queue yet");
        assert_eq!(behind.start(a, 1), Ok(true));
        assert_eq!(behind.start(b, 2), Ok(true));
        // Full: a new queue is refused (the inbox waits inline instead)...
        assert_eq!(behind.start(c, 3), Err(3));
        // ...but a queued ID's next messages join its queue, so they cannot overtake it.
        assert_eq!(behind.push(a, 4), Ok(()));
        assert_eq!(behind.start(a, 5), Ok(false), "one queue per ID, one drain");
        assert_eq!(behind.len(), 4);
        for n in [1, 4, 5] {
            assert_eq!(behind.next(a), Some(n));
        }
        assert_eq!(behind.next(a), None);
        assert_eq!(behind.push(a, 6), Err(6), "the drained queue is gone");
        assert_eq!(behind.len(), 1);
        assert_eq!(behind.next(b), Some(2));
        assert_eq!(behind.next(b), None);
        assert_eq!(behind.push(b, 7), Err(7), "no queue: no lock taken either");
    }
}
