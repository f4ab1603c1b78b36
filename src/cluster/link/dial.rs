//! This node's outgoing links: one dialer per alive node that advertises a link address (its
//! heartbeat's `link`), which connects, authenticates, waits for the peer's inbox to be ready
//! (the link-start marker, see the module docs of [`super`]), then writes the messages queued
//! for that node, several per frame, one write per wake-up, and reads the acknowledgements.
//! A link that breaks is dialled again after a back-off; a node that leaves the alive list loses
//! its dialer. Nothing here decides what a message means: answers go back to the bus's callers.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use redis::aio::ConnectionLike;
use tokio::io::{AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use super::wire::{Frame, Hello, Keys, Opener, Role, Sealer};
use super::{give_back, read_frame, read_hello, LinkError, Links, Queued, Reply, HANDSHAKE, QUEUE};
use crate::cluster::bus::{BusMessage, RedisBus};
use crate::cluster::nodes::NodeInfo;
use crate::cluster::publish::{encode_batch, MAX_BATCH, MAX_BATCH_BYTES};
use crate::cluster::types::NodeId;
use crate::shutdown::Shutdown;

/// First wait before dialling a node again after a failure; doubles up to [`MAX_BACKOFF`].
const BACKOFF: Duration = Duration::from_millis(250);
/// Longest wait between two dials of one node.
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// A link whose oldest unacknowledged frame is older than this is taken as dead.
const STALL: Duration = Duration::from_secs(3);
/// Bytes of sealed frames gathered before one write.
const WRITE_CHUNK: usize = 1024 * 1024;

/// Keeps a link to every alive node that advertises one, until shutdown (links already up stay
/// until the process ends: a draining node still sends).
pub async fn run<C>(
    links: Arc<Links>,
    bus: RedisBus<C>,
    mut alive: watch::Receiver<Vec<NodeInfo>>,
    mut shutdown: Shutdown,
) where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    let mut dialers: HashMap<String, (String, JoinHandle<()>)> = HashMap::new();
    loop {
        let nodes = alive.borrow_and_update().clone();
        let wanted: HashMap<&str, (&str, bool)> = nodes
            .iter()
            .filter(|n| n.id != links.node)
            .filter_map(|n| Some((n.id.as_str(), (n.link.as_deref()?, n.draining))))
            .collect();
        dialers.retain(|id, (addr, task)| {
            let keep = wanted.get(id.as_str()).is_some_and(|(a, _)| a == addr);
            if !keep {
                task.abort();
            }
            keep
        });
        for (id, (addr, draining)) in wanted {
            if draining || dialers.contains_key(id) {
                continue;
            }
            let task = tokio::spawn(dial(links.clone(), bus.clone(), id.to_owned(), addr.into()));
            dialers.insert(id.to_owned(), (addr.to_owned(), task));
        }
        tokio::select! {
            _ = shutdown.recv() => return,
            changed = alive.changed() => if changed.is_err() { return },
        }
    }
}

/// Dials `peer` at `addr` again and again, backing off after failures.
async fn dial<C>(links: Arc<Links>, bus: RedisBus<C>, peer: String, addr: String)
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    let mut backoff = BACKOFF;
    loop {
        let began = Instant::now();
        match link(&links, &bus, &peer, &addr).await {
            Ok(()) => tracing::info!(%peer, "cluster link closed by the peer; dialling again"),
            Err(e) => {
                links.metrics.failed(e.reason());
                tracing::warn!(%peer, %addr, "cluster link to {peer}: {e}; its messages go through Redis");
            }
        }
        backoff = if began.elapsed() > MAX_BACKOFF {
            BACKOFF
        } else {
            (backoff * 2).min(MAX_BACKOFF)
        };
        tokio::time::sleep(backoff).await;
    }
}

/// One link to `peer`: handshake, ready, then messages until it breaks.
async fn link<C>(links: &Links, bus: &RedisBus<C>, peer: &str, addr: &str) -> Result<(), LinkError>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    let stream = tokio::time::timeout(HANDSHAKE, TcpStream::connect(addr))
        .await
        .map_err(|_| LinkError::Timeout)??;
    stream.set_nodelay(true)?;
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::with_capacity(16 * 1024, rd);
    let mine = Hello::new(&links.node);
    let theirs = tokio::time::timeout(HANDSHAKE, async {
        wr.write_all(&mine.encode()).await?;
        read_hello(&mut rd).await
    })
    .await
    .map_err(|_| LinkError::Timeout)??;
    if theirs.node != peer {
        return Err(LinkError::WrongPeer(theirs.node));
    }
    let Keys {
        mut sealer,
        mut opener,
    } = Keys::derive(&links.secrets[0], Role::Dialer, &mine, &theirs);
    let mut out = BytesMut::new();
    sealer.seal(&Frame::Proof, &mut out);
    wr.write_all(&out).await?;
    out.clear();
    let mut buf = Vec::new();
    match tokio::time::timeout(HANDSHAKE, read_frame(&mut rd, &mut opener, &mut buf))
        .await
        .map_err(|_| LinkError::Timeout)??
    {
        Frame::Proof => {}
        _ => return Err(super::wire::WireError::Malformed("expected the proof").into()),
    }

    // From here on the peer's messages queue on this link (unwritten until ready).
    let (queue, mut rx) = mpsc::channel(QUEUE);
    let mut installed = Installed {
        links,
        peer,
        generation: links.install(peer, queue),
        established: false,
    };
    let result = async {
        let marker = BusMessage::link_start(mine.nonce);
        if !matches!(
            bus.publish_only(&NodeId::new(peer), &marker).await,
            Ok(true)
        ) {
            return Err(LinkError::NotReady);
        }
        match tokio::time::timeout(HANDSHAKE, read_frame(&mut rd, &mut opener, &mut buf)).await {
            Ok(Ok(Frame::Ready)) => {}
            Ok(Ok(_)) => {
                return Err(super::wire::WireError::Malformed("expected ready").into());
            }
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(LinkError::NotReady),
        }
        tracing::info!(%peer, "cluster link established");
        links.metrics.outgoing.inc();
        installed.established = true;
        let pending = Mutex::new(VecDeque::new());
        tokio::select! {
            r = write(&mut wr, &mut sealer, &mut rx, &pending) => r,
            r = read(&mut rd, &mut opener, &pending) => r,
            r = stalled(&pending) => r,
        }
    }
    .await;
    drop(installed);
    // Unwritten: through Redis. Written and unanswered: dropped here, so their senders hear
    // `Unavailable`.
    give_back(&mut rx);
    result
}

/// An outgoing link in [`Links`]: taken out (and uncounted) when the link ends, also when its
/// dialer is aborted (the node left the alive list).
struct Installed<'a> {
    /// Where it is installed.
    links: &'a Links,
    /// The peer node.
    peer: &'a str,
    /// Which link to `peer` this is.
    generation: u64,
    /// Counted in `callgate_cluster_links{direction="out"}`.
    established: bool,
}

impl Drop for Installed<'_> {
    fn drop(&mut self) {
        self.links.uninstall(self.peer, self.generation);
        if self.established {
            self.links.metrics.outgoing.dec();
        }
    }
}

/// Frames written and not acknowledged yet, oldest first: number, when, each message's reply.
type Pending = Mutex<VecDeque<Written>>;

/// A frame written and not acknowledged yet: its number, when, each message's reply.
type Written = (u64, Instant, Vec<oneshot::Sender<Reply>>);

/// The pending frames; a panic elsewhere while holding them leaves nothing half-written.
fn lock(pending: &Pending) -> std::sync::MutexGuard<'_, VecDeque<Written>> {
    pending.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Ends (with [`LinkError::Stalled`]) once the oldest unacknowledged frame is older than
/// [`STALL`]: the peer or the path is gone without a word.
async fn stalled(pending: &Pending) -> Result<(), LinkError> {
    let mut check = tokio::time::interval(STALL / 3);
    loop {
        check.tick().await;
        let oldest = lock(pending).front().map(|(_, at, _)| at.elapsed());
        if oldest.is_some_and(|age| age > STALL) {
            return Err(LinkError::Stalled);
        }
    }
}

/// Writes what is queued: as many messages per frame as the batch bounds allow, every frame
/// ready by then in one write. Ends (`Ok`) when the queue closes.
async fn write<W>(
    wr: &mut W,
    sealer: &mut Sealer,
    rx: &mut mpsc::Receiver<Queued>,
    pending: &Pending,
) -> Result<(), LinkError>
where
    W: tokio::io::AsyncWrite + Unpin,
{
    let mut out = BytesMut::with_capacity(64 * 1024);
    loop {
        let Some(first) = rx.recv().await else {
            return Ok(());
        };
        let mut next = Some(first);
        while let Some(first) = next.take() {
            frame(first, rx, sealer, pending, &mut out);
            if out.len() < WRITE_CHUNK {
                next = rx.try_recv().ok();
            }
        }
        wr.write_all(&out).await?;
        out.clear();
    }
}

/// Seals `first` and whatever is queued behind it (up to the batch bounds) as one frame into
/// `out`, less what its caller stopped waiting for, and notes it pending.
fn frame(
    first: Queued,
    rx: &mut mpsc::Receiver<Queued>,
    sealer: &mut Sealer,
    pending: &Pending,
    out: &mut BytesMut,
) {
    let mut bytes = first.payload.len();
    let mut batch = vec![first];
    while batch.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
        match rx.try_recv() {
            Ok(next) => {
                bytes += next.payload.len();
                batch.push(next);
            }
            Err(_) => break,
        }
    }
    batch.retain(|queued| !queued.reply.is_closed());
    // Too large for one frame (a big handover): through Redis.
    let (batch, large): (Vec<_>, Vec<_>) = batch
        .into_iter()
        .partition(|q| q.payload.len() <= MAX_BATCH_BYTES);
    for queued in large {
        let _ = queued.reply.send(Reply::Unwritten);
    }
    let payload = match batch.as_slice() {
        [] => return,
        [only] => only.payload.clone(),
        many => encode_batch(many.iter().map(|q| &q.payload)),
    };
    let n = sealer.seal(&Frame::Messages(payload), out);
    let replies = batch.into_iter().map(|q| q.reply).collect();
    lock(pending).push_back((n, Instant::now(), replies));
}

/// Reads acknowledgements and answers each message's caller; ends the link if the peer answers
/// something else.
async fn read<R>(rd: &mut R, opener: &mut Opener, pending: &Pending) -> Result<(), LinkError>
where
    R: tokio::io::AsyncRead + Unpin,
{
    let mut buf = Vec::new();
    loop {
        let frame = read_frame(rd, opener, &mut buf).await?;
        let Frame::Ack { frame, taken } = frame else {
            return Err(super::wire::WireError::Malformed("expected an acknowledgement").into());
        };
        let Some((n, _, replies)) = lock(pending).pop_front() else {
            return Err(super::wire::WireError::Malformed("an acknowledgement of nothing").into());
        };
        if n != frame || taken.len() != replies.len() {
            return Err(super::wire::WireError::Malformed("an acknowledgement out of step").into());
        }
        for (reply, taken) in replies.into_iter().zip(taken) {
            let _ = reply.send(if taken { Reply::Taken } else { Reply::Nobody });
        }
    }
}
