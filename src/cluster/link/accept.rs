//! The link listener (`cluster-listen`): authenticates dialling nodes, then passes the messages
//! they send to this node's inbox and acknowledges each frame.
//!
//! Bounds on what an unauthenticated peer can hold: at most [`HANDSHAKES`] connections in their
//! handshake at once (one more is closed at once), each for at most [`HANDSHAKE`]; before the
//! dialer's proof opens, this side has sent its hello and nothing else, and reads at most a hello
//! and one frame of [`MAX_FRAME`](super::wire::MAX_FRAME) bytes. After the proof: one link per
//! peer node (a newer one replaces the older), at most [`MAX_INCOMING`](super::MAX_INCOMING) peers, frames capped, any
//! frame that does not open ends the link. Every refusal is one log line and `callgate_cluster_link_failures_total{reason}`.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use super::wire::{Frame, Hello, Keys, Opener};
use super::{read_frame, read_hello, LinkError, Links, HANDSHAKE, HANDSHAKES};
use crate::cluster::bus::Records;
use crate::shutdown::Shutdown;

/// Accepts links until shutdown (links already up go on while the inbox reads).
pub async fn serve(listener: TcpListener, links: Arc<Links>, mut shutdown: Shutdown) {
    let handshakes = Arc::new(Semaphore::new(HANDSHAKES));
    loop {
        let (stream, from) = tokio::select! {
            _ = shutdown.recv() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::debug!(error = %e, "cluster link listener: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = handshakes.clone().try_acquire_owned() else {
            links.metrics.failed("busy");
            tracing::warn!(%from, "cluster link refused: {HANDSHAKES} handshakes already in progress");
            continue;
        };
        let links = links.clone();
        tokio::spawn(async move {
            if let Err(e) = accepted(&links, stream, permit).await {
                links.metrics.failed(e.reason());
                tracing::warn!(%from, "cluster link from {from} closed: {e}");
            }
        });
    }
}

/// One incoming connection: handshake (holding `permit`), then messages until it ends.
async fn accepted(
    links: &Links,
    stream: TcpStream,
    permit: tokio::sync::OwnedSemaphorePermit,
) -> Result<(), LinkError> {
    stream.set_nodelay(true)?;
    let from: SocketAddr = stream.peer_addr()?;
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::with_capacity(64 * 1024, rd);
    let mine = Hello::new(&links.node);
    let handshake = async {
        wr.write_all(&mine.encode()).await?;
        let theirs = read_hello(&mut rd).await?;
        if theirs.node == links.node {
            return Err(super::wire::WireError::BadNodeId.into());
        }
        let len = Opener::check_len(rd.read_u32().await?)?;
        let mut proof = vec![0u8; len];
        rd.read_exact(&mut proof).await?;
        let keys = Keys::accept(&links.secrets, &theirs, &mine, &proof)?;
        Ok::<_, LinkError>((theirs, keys))
    };
    let (
        theirs,
        Keys {
            mut sealer,
            mut opener,
        },
    ) = tokio::time::timeout(HANDSHAKE, handshake)
        .await
        .map_err(|_| LinkError::Timeout)??;
    drop(permit);
    let peer = theirs.node;
    let started = links.await_start(theirs.nonce);
    let mut out = BytesMut::new();
    sealer.seal(&Frame::Proof, &mut out);
    wr.write_all(&out).await?;
    out.clear();
    // The dialer now publishes the link-start marker; our inbox reads it behind everything that
    // node published to us before.
    let ready = tokio::time::timeout(HANDSHAKE, started).await;
    links.forget_start(&theirs.nonce);
    if !matches!(ready, Ok(Ok(()))) {
        return Err(LinkError::NotReady);
    }
    sealer.seal(&Frame::Ready, &mut out);
    wr.write_all(&out).await?;
    out.clear();

    let (generation, mut replaced) = links.accept_from(&peer).ok_or(LinkError::TooMany)?;
    tracing::info!(%peer, %from, "cluster link from {peer} established");
    links.metrics.incoming.inc();
    let mut buf = Vec::new();
    let result = loop {
        let frame = tokio::select! {
            _ = &mut replaced => {
                links.metrics.failed("replaced");
                break Ok(());
            }
            frame = read_frame(&mut rd, &mut opener, &mut buf) => frame,
        };
        let n = opener.next() - 1;
        let payload = match frame {
            Ok(Frame::Messages(payload)) => payload,
            Ok(_) => break Err(super::wire::WireError::Malformed("expected messages").into()),
            Err(LinkError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => break Ok(()),
            Err(e) => break Err(e),
        };
        let mut taken = Vec::new();
        for record in Records::new(payload) {
            match record {
                Ok(message) => taken.push(links.inbound.send(message).await.is_ok()),
                Err(e) => {
                    // As from the subscription: logged and skipped (the sender's node wrote it).
                    tracing::warn!(error = %e, %peer, "cluster link: skipped a message");
                    taken.push(true);
                }
            }
        }
        sealer.seal(&Frame::Ack { frame: n, taken }, &mut out);
        // More frames already read: their acknowledgements go in the same write.
        if !whole_frame_buffered(rd.buffer()) {
            if let Err(e) = wr.write_all(&out).await {
                break Err(e.into());
            }
            out.clear();
        }
    };
    links.metrics.incoming.dec();
    links.accepted_ended(&peer, generation);
    tracing::info!(%peer, "cluster link from {peer} ended");
    result
}

/// Whether `buffered` (what the reader holds, not yet taken) starts with a whole frame.
fn whole_frame_buffered(buffered: &[u8]) -> bool {
    match buffered.get(..4) {
        Some(len) => {
            let len = u32::from_be_bytes(len.try_into().expect("4 bytes")) as usize;
            buffered.len() >= 4 + len
        }
        None => false,
    }
}
