//! Publishing to other nodes' inboxes, coalesced: one sender task per destination node (per
//! channel) takes everything queued for that node and sends it as **one** `PUBLISH` whose payload
//! carries all of it ([`encode_batch`]; `bus::Records` reads it back).
//!
//! There is no timer: a message that finds fewer than [`IN_FLIGHT`] `PUBLISH`es to its node
//! awaiting their answer is published at once, on its own, as it always was. Only while that
//! many are out do further messages queue, and the next `PUBLISH` takes them all (Nagle without
//! the wait, and with a window of [`IN_FLIGHT`] instead of one, so a message does not wait a
//! whole round trip just because another one is out). Under load a
//! cross-node message then costs a fraction of a `PUBLISH`, a fraction of Redis's fan-out and a
//! fraction of a wake-up of the receiving node's inbox; when idle it costs what it did.
//!
//! Each caller still gets its own answer — the `PUBLISH`'s (received by a subscriber, by nobody,
//! or Redis unavailable) — so what the caller does on failure (hold the message in the ID's
//! stream, or tell its sender) is per message, exactly as without coalescing. One queue per
//! destination node keeps each ID's messages in the order they were queued. A caller waits at
//! most the bus timeout for its answer, queueing included; a message whose caller stopped waiting
//! is not published.
//!
//! Bounds: a queue holds at most [`QUEUE`] messages (a full queue makes callers wait, within
//! their timeout), a `PUBLISH` carries at most [`MAX_BATCH`] messages and about
//! [`MAX_BATCH_BYTES`], and a sender task whose node has been quiet for [`IDLE`] ends, so the
//! tasks are bounded by the nodes messages go to.
//!
//! Only to a node that reads batches: the publisher asks [`Batches`] before each `PUBLISH`, and
//! sends what queued for any other node (one of the previous release, during a rolling upgrade)
//! as one `PUBLISH` per message — version 2, which every release reads — pipelined in one round
//! trip, in queue order, each caller getting its own `PUBLISH`'s answer.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::{BufMut as _, Bytes, BytesMut};
use futures_util::stream::{FuturesUnordered, StreamExt as _};
use redis::aio::ConnectionLike;
use tokio::sync::{mpsc, oneshot};

use super::types::Unavailable;

/// Most messages waiting for one destination node.
pub const QUEUE: usize = 4096;
/// Most messages in one `PUBLISH`.
pub const MAX_BATCH: usize = 128;
/// A `PUBLISH` stops taking more messages once its payload reaches this many bytes.
pub const MAX_BATCH_BYTES: usize = 256 * 1024;
/// Most `PUBLISH`es to one node awaiting their answer; messages queue (and share the next one)
/// only while this many are out. Each caller awaits its own answer before its next message, so
/// one sender's messages never overtake each other whatever this is.
pub const IN_FLIGHT: usize = 4;
/// A destination node's sender task ends after this long without a message.
pub const IDLE: Duration = Duration::from_secs(30);

/// First byte of a payload carrying several messages ([`encode_batch`]); a single message keeps
/// its own version byte (2), byte for byte what it was before batches.
pub const BATCH_VERSION: u8 = 3;

/// One payload carrying several encoded messages, for one `PUBLISH`: [`BATCH_VERSION`], then for
/// each message its length (u32, big-endian) and its bytes. Held streams keep single messages;
/// only the channel carries batches.
pub fn encode_batch<'a>(messages: impl Iterator<Item = &'a Bytes> + Clone) -> Bytes {
    let len = 1 + messages.clone().map(|m| 4 + m.len()).sum::<usize>();
    let mut out = BytesMut::with_capacity(len);
    out.put_u8(BATCH_VERSION);
    for message in messages {
        out.put_u32(u32::try_from(message.len()).expect("a bus message is far below 4 GiB"));
        out.put_slice(message);
    }
    out.freeze()
}

/// Whether the node behind a channel reads batch payloads ([`BATCH_VERSION`]), asked before
/// each `PUBLISH` of several messages.
pub type Batches = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// What a `PUBLISH` answered: `Ok(true)` a subscriber received it, `Ok(false)` nobody did.
type Answer = Result<bool, Unavailable>;

/// One message waiting for its node's next `PUBLISH`.
struct Queued {
    /// The encoded [`BusMessage`](super::bus::BusMessage).
    payload: Bytes,
    /// Where the `PUBLISH`'s answer goes.
    reply: oneshot::Sender<Answer>,
}

/// The destination nodes' queues, shared by every clone of a [`Publisher`].
type Queues = Arc<Mutex<HashMap<String, mpsc::Sender<Queued>>>>;

/// Coalescing publisher over the node's command connection; clones share the queues.
#[derive(Clone)]
pub struct Publisher<C> {
    /// The command connection the sender tasks publish on.
    conn: C,
    /// Longest wait for a caller's answer, queueing included, and for one `PUBLISH`.
    timeout: Duration,
    /// How long a destination node's sender task waits for a message before it ends.
    idle: Duration,
    /// One sender per destination channel with a live sender task.
    queues: Queues,
    /// Which channels may get batch payloads.
    batches: Batches,
}

impl<C> Publisher<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    /// A publisher on `conn`, answering every caller within `timeout`; sender tasks end after
    /// [`IDLE`] without messages. It batches to every channel: see [`Publisher::batching`].
    pub fn new(conn: C, timeout: Duration) -> Self {
        Self::with_idle(conn, timeout, IDLE)
    }

    /// Like [`Publisher::new`], with sender tasks ending after `idle` without messages.
    pub fn with_idle(conn: C, timeout: Duration, idle: Duration) -> Self {
        Self {
            conn,
            timeout,
            idle,
            queues: Arc::new(Mutex::new(HashMap::new())),
            batches: Arc::new(|_: &str| true),
        }
    }

    /// Batches only to the channels for which `batches` says yes (asked before each `PUBLISH`);
    /// what queues for any other goes as one `PUBLISH` per message.
    pub fn batching(mut self, batches: impl Fn(&str) -> bool + Send + Sync + 'static) -> Self {
        self.batches = Arc::new(batches);
        self
    }

    /// How many destination channels have a sender task now.
    pub fn senders(&self) -> usize {
        lock(&self.queues).len()
    }

    /// Publishes `payload` (one encoded message) on `channel` (a node's inbox), in the same
    /// `PUBLISH` as whatever else is queued for it by then. `Ok(true)`: a subscriber received it.
    pub async fn publish(&self, channel: &str, payload: Bytes) -> Answer {
        let (reply, answer) = oneshot::channel();
        let queued = Queued { payload, reply };
        let wait = async {
            self.enqueue(channel, queued).await?;
            answer.await.map_err(|_| Unavailable)?
        };
        tokio::time::timeout(self.timeout, wait)
            .await
            .unwrap_or(Err(Unavailable))
    }

    /// Queues `queued` for `channel`, starting its sender task if it has none (or its task just
    /// ended for idleness).
    async fn enqueue(&self, channel: &str, mut queued: Queued) -> Result<(), Unavailable> {
        // Twice at most: a task that ended between our lookup and our send leaves a closed queue,
        // and the next lookup starts a fresh one.
        for _ in 0..2 {
            let sender = self.sender(channel);
            match sender.send(queued).await {
                Ok(()) => return Ok(()),
                Err(mpsc::error::SendError(back)) => queued = back,
            }
        }
        Err(Unavailable)
    }

    /// `channel`'s queue, with a sender task behind it.
    fn sender(&self, channel: &str) -> mpsc::Sender<Queued> {
        let mut queues = lock(&self.queues);
        if let Some(sender) = queues.get(channel).filter(|s| !s.is_closed()) {
            return sender.clone();
        }
        let (sender, receiver) = mpsc::channel(QUEUE);
        queues.insert(channel.to_owned(), sender.clone());
        tokio::spawn(send_all(
            self.conn.clone(),
            channel.to_owned(),
            (self.timeout, self.idle),
            receiver,
            self.queues.clone(),
            self.batches.clone(),
        ));
        sender
    }
}

/// A destination node's sender task: takes the first message waiting and everything queued
/// behind it (up to the batch bounds) and publishes it as one payload (within `timeout`), with
/// at most [`IN_FLIGHT`] `PUBLISH`es outstanding; answers every caller of a batch when its
/// `PUBLISH` answers. Ends after `idle` with nothing queued or in flight, publishing what raced
/// in while it was ending.
async fn send_all<C>(
    conn: C,
    channel: String,
    (timeout, idle): (Duration, Duration),
    mut receiver: mpsc::Receiver<Queued>,
    queues: Queues,
    batches: Batches,
) where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    let channel: Arc<str> = channel.into();
    let mut in_flight = FuturesUnordered::new();
    let mut open = true;
    loop {
        let room = in_flight.len() < IN_FLIGHT;
        tokio::select! {
            Some(()) = in_flight.next(), if !in_flight.is_empty() => {}
            first = receiver.recv(), if room => {
                let Some(first) = first else {
                    // Closed and drained: finish what is in flight, then end.
                    while in_flight.next().await.is_some() {}
                    return;
                };
                if let Some(batch) = take_batch(first, &mut receiver) {
                    let batch = (batch.len() > 1 && batches(&channel), batch);
                    in_flight.push(publish_batch(conn.clone(), channel.clone(), batch, timeout));
                }
            }
            () = tokio::time::sleep(idle), if open && in_flight.is_empty() => {
                // Quiet: leave the map (the entry is ours: a new one is only made once ours is
                // closed), then publish whatever raced in before the close.
                lock(&queues).remove(&*channel);
                receiver.close();
                open = false;
            }
            else => return,
        }
    }
}

/// `first` and whatever is queued behind it, up to the batch bounds, less the messages whose
/// caller stopped waiting (it was told the message is lost: do not deliver it anyway).
fn take_batch(first: Queued, receiver: &mut mpsc::Receiver<Queued>) -> Option<Vec<Queued>> {
    let mut bytes = first.payload.len();
    let mut batch = vec![first];
    while batch.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
        match receiver.try_recv() {
            Ok(next) => {
                bytes += next.payload.len();
                batch.push(next);
            }
            Err(_) => break,
        }
    }
    batch.retain(|queued| !queued.reply.is_closed());
    (!batch.is_empty()).then_some(batch)
}

/// Publishes `batch` as one payload on `channel` and answers each of its callers; if the node
/// does not read batches (`batches` false), as one `PUBLISH` per message instead.
async fn publish_batch<C: ConnectionLike>(
    mut conn: C,
    channel: Arc<str>,
    (batches, batch): (bool, Vec<Queued>),
    timeout: Duration,
) {
    let payload = match batch.as_slice() {
        [only] => only.payload.clone(),
        _ if !batches => return publish_each(&mut conn, &channel, batch, timeout).await,
        many => encode_batch(many.iter().map(|queued| &queued.payload)),
    };
    let answer = publish(&mut conn, &channel, &payload, timeout).await;
    for queued in batch {
        let _ = queued.reply.send(answer);
    }
}

/// One `PUBLISH` per message of `batch`, pipelined (one round trip, in order) within `timeout`;
/// each caller gets its own `PUBLISH`'s answer.
async fn publish_each<C: ConnectionLike>(
    conn: &mut C,
    channel: &str,
    batch: Vec<Queued>,
    timeout: Duration,
) {
    let mut pipe = redis::pipe();
    for queued in &batch {
        pipe.cmd("PUBLISH").arg(channel).arg(&queued.payload[..]);
    }
    let answers = match tokio::time::timeout(timeout, pipe.query_async::<Vec<u64>>(conn)).await {
        Ok(Ok(receivers)) if receivers.len() == batch.len() => {
            receivers.into_iter().map(|n| Ok(n > 0)).collect()
        }
        Ok(Ok(_)) | Ok(Err(_)) | Err(_) => {
            tracing::debug!("redis bus: pipelined PUBLISHes failed or timed out");
            vec![Err(Unavailable); batch.len()]
        }
    };
    for (queued, answer) in batch.into_iter().zip(answers) {
        let _ = queued.reply.send(answer);
    }
}

/// One `PUBLISH` within `timeout`.
async fn publish<C: ConnectionLike>(
    conn: &mut C,
    channel: &str,
    payload: &[u8],
    timeout: Duration,
) -> Answer {
    let cmd = redis::cmd("PUBLISH").arg(channel).arg(payload).to_owned();
    match tokio::time::timeout(timeout, cmd.query_async::<u64>(conn)).await {
        Ok(Ok(receivers)) => Ok(receivers > 0),
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "redis bus: PUBLISH failed");
            Err(Unavailable)
        }
        Err(_) => {
            tracing::debug!("redis bus: PUBLISH timed out");
            Err(Unavailable)
        }
    }
}

/// The queues; a panic elsewhere while holding them leaves nothing half-written.
fn lock(queues: &Queues) -> std::sync::MutexGuard<'_, HashMap<String, mpsc::Sender<Queued>>> {
    queues.lock().unwrap_or_else(PoisonError::into_inner)
}
