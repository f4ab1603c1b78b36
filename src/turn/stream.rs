//! TURN over TCP and TLS (RFC 8656 §3.1, `turn:?transport=tcp` and `turns:`): STUN and ChannelData
//! framing on a byte stream, and one engine instance per client connection.
//!
//! The engine only speaks datagrams through a `Conn`, so each accepted connection becomes a
//! [`StreamFront`]: `recv_from` returns one frame at a time (after the [`Gate`]), `send_to` queues
//! one frame on a bounded writer (ChannelData padded to 4 bytes as streams require). Giving every
//! connection its own engine `Server` ties the allocation's life to the connection, as the RFC
//! asks: when the connection ends, the engine's read loop ends and closes its allocations.
//! Relayed traffic to peers is still UDP.
//!
//! A connection is on a short clock until it authenticates: it must get a success answer to an
//! authenticated request (which the engine only gives after the gate and the engine both checked
//! MESSAGE-INTEGRITY) within the handshake timeout of being accepted, whatever else it sends; only
//! then does the long idle timeout apply. Garbage or unauthenticated STUN cannot hold a connection
//! slot for longer.
//!
//! This module owns framing and connection lifetimes; it must never make policy decisions (the gate
//! does) and never let a slow client block the engine (the write queue, bounded in bytes, drops
//! when full, like UDP).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant as Deadline;
use turn::server::config::{ConnConfig, ServerConfig};
use turn::server::Server;
use webrtc_util::Conn;

use super::framing::{frame_for_stream, frame_length};
use super::front::{forward_closes, FrontShared, Inbound};
use super::gate::{Gate, Outbound, PRIMING_ADDR};
use super::inspect::{self, method, Class, Packet};
use super::quota::Transport;
use super::reservation::ReservedSlot;
use super::route::ClientPath;
use super::source::source_key;
use super::stats::TurnStats;
use super::write_queue::{self, WriteQueue, WriteQueueReceiver};

/// Where the TLS listener gets its acceptor, called once per connection so a certificate the
/// gateway reloads is used by the next handshake. The gateway owns loading and reloading.
pub type TlsAcceptorSource = Arc<dyn Fn() -> tokio_rustls::TlsAcceptor + Send + Sync>;

/// Makes a relay-socket generator for each engine read loop, sharing that loop's reserved slot.
pub type GeneratorFactory = Arc<
    dyn Fn(ReservedSlot) -> Box<dyn turn::relay::RelayAddressGenerator + Send + Sync> + Send + Sync,
>;

/// Reads whole frames from a byte stream into one reused buffer.
struct FrameReader {
    inner: BufReader<Box<dyn AsyncRead + Unpin + Send>>,
    buf: Vec<u8>,
}

impl FrameReader {
    async fn next_frame(&mut self) -> std::io::Result<usize> {
        let mut header = [0u8; 4];
        self.inner.read_exact(&mut header).await?;
        let (len, wire) = frame_length(header).map_err(std::io::Error::other)?;
        self.buf.resize(wire, 0);
        self.buf[..4].copy_from_slice(&header);
        self.inner.read_exact(&mut self.buf[4..wire]).await?;
        Ok(len)
    }
}

/// Everything a stream listener needs, shared by its connections.
pub struct StreamContext {
    /// Gate state and tables shared with every listener.
    pub front: Arc<FrontShared>,
    /// Relay socket generators for each connection's engine.
    pub generator: GeneratorFactory,
    /// `realm`.
    pub realm: String,
    /// Counters.
    pub stats: Arc<TurnStats>,
    /// Cap on concurrent TCP plus TLS connections, shared by every stream listener.
    pub connections: Arc<Semaphore>,
    /// Concurrent connections per source IP.
    pub per_ip: Arc<PerIpConnections>,
    /// TLS handshake deadline, and how long a connection may go on without authenticating.
    pub handshake_timeout: Duration,
    /// Silence after which an authenticated connection is closed.
    pub idle_timeout: Duration,
    /// Bytes queued for one client before further frames are dropped.
    pub write_queue_bytes: usize,
    /// Flips to true on relay shutdown.
    pub shutdown: watch::Receiver<bool>,
}

/// Counts open stream connections per source IP, so one address cannot take the whole cap.
pub struct PerIpConnections {
    limit: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// Held by a connection; gives its per-IP slot back when dropped.
pub struct PerIpPermit {
    book: Arc<PerIpConnections>,
    ip: IpAddr,
}

impl PerIpConnections {
    /// At most `limit` concurrent connections per IP.
    pub fn new(limit: usize) -> Self {
        PerIpConnections {
            limit,
            open: Mutex::new(HashMap::new()),
        }
    }

    /// Takes a slot for `ip`, or `None` if it already has `limit` connections.
    pub fn admit(book: &Arc<Self>, ip: IpAddr) -> Option<PerIpPermit> {
        let mut open = book.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(ip).or_insert(0);
        if *n >= book.limit {
            return None;
        }
        *n += 1;
        Some(PerIpPermit {
            book: Arc::clone(book),
            ip,
        })
    }

    /// Source IPs with at least one open connection.
    pub fn tracked(&self) -> usize {
        self.open.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

impl Drop for PerIpPermit {
    fn drop(&mut self) {
        let mut open = self.book.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// A bound TCP listener, plain or TLS.
pub struct StreamListener {
    /// The socket.
    pub listener: TcpListener,
    /// `Some` for `turns:`.
    pub tls: Option<TlsAcceptorSource>,
}

/// Accepts connections until shutdown, then waits for them to close.
pub async fn accept_loop(l: StreamListener, ctx: Arc<StreamContext>) {
    let mut conns = JoinSet::new();
    let mut shutdown = ctx.shutdown.clone();
    loop {
        tokio::select! {
            accepted = l.listener.accept() => {
                let (tcp, peer) = match accepted {
                    Ok(v) => v,
                    Err(e) => {
                        // EMFILE and friends: back off briefly instead of spinning.
                        tracing::warn!("TURN accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Ok(permit) = Arc::clone(&ctx.connections).try_acquire_owned() else {
                    tracing::debug!(%peer, "TURN stream connection cap reached");
                    continue;
                };
                let Some(per_ip) = PerIpConnections::admit(&ctx.per_ip, source_key(peer.ip())) else {
                    tracing::debug!(%peer, "TURN stream connections per IP cap reached");
                    continue;
                };
                conns.spawn(serve(tcp, peer, l.tls.clone(), Arc::clone(&ctx), (permit, per_ip)));
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            _ = shutdown.changed() => break,
        }
    }
    while conns.join_next().await.is_some() {}
}

struct ConnectionCount(Arc<TurnStats>);

impl Drop for ConnectionCount {
    fn drop(&mut self) {
        TurnStats::drop_one(&self.0.stream_connections);
    }
}

async fn serve(
    tcp: TcpStream,
    peer: SocketAddr,
    tls: Option<TlsAcceptorSource>,
    ctx: Arc<StreamContext>,
    permits: (OwnedSemaphorePermit, PerIpPermit),
) {
    let _ = tcp.set_nodelay(true);
    let Ok(local) = tcp.local_addr() else { return };
    match tls {
        Some(source) => {
            let acceptor = source();
            let mut shutdown = ctx.shutdown.clone();
            let handshake = tokio::time::timeout(ctx.handshake_timeout, acceptor.accept(tcp));
            let handshake = tokio::select! {
                r = handshake => r,
                _ = shutdown.wait_for(|s| *s) => return,
            };
            match handshake {
                Ok(Ok(stream)) => {
                    let (r, w) = tokio::io::split(stream);
                    let io = (Transport::Tls, Box::new(r) as _, Box::new(w) as _);
                    run(io, peer, local, ctx, permits).await;
                }
                Ok(Err(e)) => tracing::debug!(%peer, "TURN TLS handshake failed: {e}"),
                Err(_) => tracing::debug!(%peer, "TURN TLS handshake timed out"),
            }
        }
        None => {
            let (r, w) = tcp.into_split();
            run(
                (Transport::Tcp, Box::new(r), Box::new(w)),
                peer,
                local,
                ctx,
                permits,
            )
            .await;
        }
    }
}

/// A connection's transport and its two halves.
type StreamIo = (
    Transport,
    Box<dyn AsyncRead + Unpin + Send>,
    Box<dyn AsyncWrite + Unpin + Send>,
);

/// Hands TLS connections accepted elsewhere (the HTTPS port, after routing by ClientHello or by
/// the first bytes) to the TURN stream front: the same gate, quotas, connection caps (the stream
/// cap and the per-address cap are taken here, as on the TURN ports), unauthenticated deadline and
/// idle timeout as a connection to the TURN TLS port.
#[derive(Clone)]
pub struct StreamHandoff {
    ctx: Arc<StreamContext>,
}

impl std::fmt::Debug for StreamHandoff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamHandoff").finish_non_exhaustive()
    }
}

impl StreamHandoff {
    /// A handoff into `ctx`'s connections.
    pub fn new(ctx: Arc<StreamContext>) -> Self {
        StreamHandoff { ctx }
    }

    /// Serves `stream` (already past its TLS handshake, with any bytes read to route it put back)
    /// as a TURN-over-TLS connection from `peer` until it ends. Returns at once, closing it, when
    /// the TURN stream caps are full.
    pub async fn serve<S>(&self, stream: S, peer: SocketAddr, local: SocketAddr)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let ctx = Arc::clone(&self.ctx);
        let Ok(permit) = Arc::clone(&ctx.connections).try_acquire_owned() else {
            tracing::debug!(%peer, "TURN stream connection cap reached (HTTPS port)");
            return;
        };
        let Some(per_ip) = PerIpConnections::admit(&ctx.per_ip, source_key(peer.ip())) else {
            tracing::debug!(%peer, "TURN stream connections per IP cap reached (HTTPS port)");
            return;
        };
        TurnStats::bump(&ctx.stats.https_port_connections);
        let _count = HttpsPortCount(Arc::clone(&ctx.stats));
        let (r, w) = tokio::io::split(stream);
        let io = (Transport::Tls, Box::new(r) as _, Box::new(w) as _);
        run(io, peer, local, ctx, (permit, per_ip)).await;
    }
}

/// Keeps `https_port_connections` counting one connection until dropped.
struct HttpsPortCount(Arc<TurnStats>);

impl Drop for HttpsPortCount {
    fn drop(&mut self) {
        TurnStats::drop_one(&self.0.https_port_connections);
    }
}

/// Runs one TURN stream connection: its engine, its writer, its lifetime.
async fn run(
    (transport, reader, writer): StreamIo,
    peer: SocketAddr,
    local: SocketAddr,
    ctx: Arc<StreamContext>,
    _permits: (OwnedSemaphorePermit, PerIpPermit),
) {
    TurnStats::bump(&ctx.stats.stream_connections);
    let _count = ConnectionCount(Arc::clone(&ctx.stats));

    let (tx, rx) = write_queue::channel(ctx.write_queue_bytes, Arc::clone(&ctx.stats));
    let writer_task = tokio::spawn(write_loop(writer, rx));
    let gate = Arc::new(Gate::new(Arc::clone(&ctx.front.gate), transport));
    let front = Arc::new(StreamFront {
        reader: tokio::sync::Mutex::new(FrameReader {
            inner: BufReader::with_capacity(16 * 1024, reader),
            buf: Vec::with_capacity(2048),
        }),
        tx,
        peer,
        local,
        gate: Arc::clone(&gate),
        front: Arc::clone(&ctx.front),
        injected: Mutex::new(Some(Gate::priming_request())),
        ended: Notify::new(),
        shutdown: ctx.shutdown.clone(),
        idle_timeout: ctx.idle_timeout,
        unauthenticated_until: Deadline::now() + ctx.handshake_timeout,
        authenticated: AtomicBool::new(false),
        reserved: ReservedSlot::default(),
    });
    let (close_tx, close_rx) = mpsc::channel(16);
    tokio::spawn(forward_closes(
        transport,
        close_rx,
        Arc::clone(&ctx.front),
        ctx.shutdown.clone(),
    ));
    let engine = Server::new(ServerConfig {
        conn_configs: vec![ConnConfig {
            conn: Arc::clone(&front) as Arc<dyn Conn + Send + Sync>,
            relay_addr_generator: (ctx.generator)(Arc::clone(&front.reserved)),
        }],
        realm: ctx.realm.clone(),
        auth_handler: Arc::new(ctx.front.gate.auth_handler()),
        channel_bind_timeout: Duration::ZERO,
        alloc_close_notify: Some(close_tx),
    })
    .await;
    let engine = match engine {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!(%peer, "could not start a TURN engine for a stream connection: {e}");
            return;
        }
    };
    front.ended.notified().await;
    let _ = engine.close().await;
    drop(engine);
    writer_task.abort();
}

async fn write_loop(mut writer: Box<dyn AsyncWrite + Unpin + Send>, mut rx: WriteQueueReceiver) {
    while let Some(frame) = rx.recv().await {
        if writer.write_all(&frame).await.is_err() {
            return;
        }
        if rx.is_empty() && writer.flush().await.is_err() {
            return;
        }
    }
    let _ = writer.shutdown().await;
}

/// One TCP or TLS client connection as the engine sees it.
pub struct StreamFront {
    reader: tokio::sync::Mutex<FrameReader>,
    /// Frames to the client, bounded in bytes.
    tx: WriteQueue,
    peer: SocketAddr,
    local: SocketAddr,
    /// This connection's gate (its engine's nonce).
    gate: Arc<Gate>,
    /// Where the gate's verdicts are carried out.
    front: Arc<FrontShared>,
    injected: Mutex<Option<Vec<u8>>>,
    /// Notified when `recv_from` fails for good (EOF, error, idle, shutdown).
    ended: Notify,
    shutdown: watch::Receiver<bool>,
    idle_timeout: Duration,
    /// Until [`StreamFront::authenticated`], the connection is closed at this instant, whatever it
    /// sends: silent, garbage-sending or never-authenticating connections cannot hold the cap.
    unauthenticated_until: Deadline,
    /// Set once the engine answered an authenticated request with success; from then on the
    /// connection is closed only after `idle_timeout` of silence.
    authenticated: AtomicBool,
    /// Shared with this connection's relay-socket generator (RESERVATION-TOKEN).
    reserved: ReservedSlot,
}

impl StreamFront {
    /// When the next read gives up: the fixed unauthenticated deadline, or `idle_timeout` from now.
    fn read_deadline(&self) -> Deadline {
        if self.authenticated.load(Ordering::Relaxed) {
            Deadline::now() + self.idle_timeout
        } else {
            self.unauthenticated_until
        }
    }

    /// Notes an engine answer to the client: a success response to anything but Binding means a
    /// request authenticated (the engine checks MESSAGE-INTEGRITY on all of them, after the gate).
    fn observe_answer(&self, packet: &[u8]) {
        if self.authenticated.load(Ordering::Relaxed) {
            return;
        }
        if let Ok(Packet::Stun(m)) = inspect::inspect(packet) {
            if m.class == Class::Success && m.method != method::BINDING {
                self.authenticated.store(true, Ordering::Relaxed);
            }
        }
    }

    fn end(&self) -> webrtc_util::Error {
        self.ended.notify_one();
        webrtc_util::Error::ErrUseClosedNetworkConn
    }

    fn queue(&self, frame: Vec<u8>) {
        // A full queue means the client reads slower than it is sent to: drop (counted), as UDP
        // would.
        self.tx.push(frame);
    }
}

#[async_trait]
impl Conn for StreamFront {
    async fn connect(&self, _addr: SocketAddr) -> webrtc_util::Result<()> {
        Err(std::io::Error::other("already connected").into())
    }

    async fn recv(&self, _buf: &mut [u8]) -> webrtc_util::Result<usize> {
        Err(std::io::Error::other("use recv_from").into())
    }

    async fn recv_from(&self, buf: &mut [u8]) -> webrtc_util::Result<(usize, SocketAddr)> {
        let mut reader = self.reader.lock().await;
        let mut shutdown = self.shutdown.clone();
        self.reserved
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        loop {
            if *shutdown.borrow() {
                return Err(self.end());
            }
            let injected = self
                .injected
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take();
            if let Some(p) = injected {
                let n = p.len().min(buf.len());
                buf[..n].copy_from_slice(&p[..n]);
                return Ok((n, PRIMING_ADDR));
            }
            if self.gate.needs_priming(Instant::now()) {
                // A connection older than the nonce rotation: fetch a fresh nonce first.
                let p = Gate::priming_request();
                buf[..p.len()].copy_from_slice(&p);
                return Ok((p.len(), PRIMING_ADDR));
            }
            let len = tokio::select! {
                r = tokio::time::timeout_at(self.read_deadline(), reader.next_frame()) => match r {
                    Ok(Ok(len)) => len,
                    Ok(Err(_)) | Err(_) => return Err(self.end()),
                },
                _ = shutdown.changed() => return Err(self.end()),
            };
            let frame = &reader.buf[..len];
            let inbound =
                self.front
                    .inbound(&self.gate, frame, self.peer, self.local, &self.reserved);
            let forward = match inbound {
                Inbound::Engine(forward) => forward,
                Inbound::Reply(v) => {
                    self.queue(v);
                    continue;
                }
                Inbound::Dropped => continue,
            };
            if forward.len() > buf.len() {
                // Too large for the engine: relay it on its bound channel ourselves.
                let key = (self.gate.transport(), self.peer, self.local);
                self.front.relay_oversized(&key, &forward).await;
                continue;
            }
            buf[..forward.len()].copy_from_slice(&forward);
            return Ok((forward.len(), self.peer));
        }
    }

    async fn send(&self, _buf: &[u8]) -> webrtc_util::Result<usize> {
        Err(std::io::Error::other("use send_to").into())
    }

    async fn send_to(&self, buf: &[u8], target: SocketAddr) -> webrtc_util::Result<usize> {
        let path = || ClientPath::Stream {
            queue: self.tx.clone(),
        };
        match self
            .front
            .outbound(&self.gate, buf, target, self.local, path)
        {
            Outbound::Swallow | Outbound::Primed => return Ok(buf.len()),
            _ => {}
        }
        if target == self.peer {
            self.observe_answer(buf);
            self.queue(frame_for_stream(buf));
        }
        Ok(buf.len())
    }

    fn local_addr(&self) -> webrtc_util::Result<SocketAddr> {
        Ok(self.local)
    }

    fn remote_addr(&self) -> Option<SocketAddr> {
        Some(self.peer)
    }

    async fn close(&self) -> webrtc_util::Result<()> {
        // Called by the engine when an allocation closes; the connection may carry on (a client
        // can allocate again). The connection ends when the client or the relay closes it.
        Ok(())
    }

    fn as_any(&self) -> &(dyn std::any::Any + Send + Sync) {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_ip_connections_are_capped_and_released() {
        let book = Arc::new(PerIpConnections::new(2));
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let p1 = PerIpConnections::admit(&book, a).unwrap();
        let _p2 = PerIpConnections::admit(&book, a).unwrap();
        assert!(PerIpConnections::admit(&book, a).is_none());
        let pb = PerIpConnections::admit(&book, b).unwrap();
        drop(p1);
        assert!(PerIpConnections::admit(&book, a).is_some());
        drop(pb);
        assert_eq!(
            book.tracked(),
            1,
            "b forgotten once its last connection closed"
        );
    }

    #[tokio::test]
    async fn reads_back_to_back_frames_from_a_stream() {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&frame_for_stream(&[0x40, 0x01, 0, 3, 1, 2, 3]));
        let stun = Gate::priming_request();
        bytes.extend_from_slice(&stun);
        let mut r = FrameReader {
            inner: BufReader::new(Box::new(std::io::Cursor::new(bytes))),
            buf: Vec::new(),
        };
        let n = r.next_frame().await.unwrap();
        assert_eq!(&r.buf[..n], &[0x40, 0x01, 0, 3, 1, 2, 3]);
        let n = r.next_frame().await.unwrap();
        assert_eq!(&r.buf[..n], &stun[..]);
        assert!(r.next_frame().await.is_err(), "EOF");
    }
}
