//! The HTTPS and redirect listeners: accept loops, connection limits, timeouts, graceful close.
//!
//! Each accepted TCP connection must get a permit from the global [`ConnectionLimit`], finish its
//! TLS handshake within `tls-handshake-timeout`, send request heads within `header-read-timeout`
//! and show some traffic at least every `idle-timeout`; otherwise it is closed. None of this holds
//! a worker: every connection is its own task, and every wait is bounded. Routing lives in
//! [`routes`], files in [`static_files`], headers in [`headers`].

pub mod admin;
pub mod headers;
pub mod proxy_protocol;
pub mod ranges;
mod redirect;
pub mod routes;
pub mod static_files;

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full};
use hyper::{Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

use proxy_protocol::{Prefixed, TrustedProxies};
use tokio_rustls::TlsAcceptor;

use crate::limits::ConnectionLimit;
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;

pub use redirect::{serve_redirects, RedirectTarget};
pub use routes::App;

/// The body of every response callgate sends.
pub type Body = UnsyncBoxBody<Bytes, io::Error>;

/// Boxes any body whose errors are I/O errors.
pub fn boxed<B>(body: B) -> Body
where
    B: hyper::body::Body<Data = Bytes, Error = io::Error> + Send + 'static,
{
    body.boxed_unsync()
}

/// A small plain-text response.
pub fn text_response(status: StatusCode, text: &'static str) -> Response<Body> {
    let mut response = Response::new(boxed(
        Full::new(Bytes::from_static(text.as_bytes())).map_err(|never: Infallible| match never {}),
    ));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Timeouts and caps for HTTP connections, taken from the config.
#[derive(Debug, Clone)]
pub struct ConnectionSettings {
    /// Deadline for the TLS handshake.
    pub tls_handshake_timeout: Duration,
    /// Deadline for each HTTP/1 request head (and the idle wait before it).
    pub header_read_timeout: Duration,
    /// Close a connection with no reads or writes for this long.
    pub idle_timeout: Duration,
    /// HTTP/2 concurrent stream cap.
    pub h2_max_concurrent_streams: u32,
    /// Load balancers whose connections start with a PROXY header.
    pub trusted_proxies: Arc<TrustedProxies>,
}

impl ConnectionSettings {
    /// The hyper builder: HTTP/1.1 with upgrades and HTTP/2 (no extended CONNECT, so browsers open
    /// WebSockets over HTTP/1.1), with hyper's timer for the header timeout.
    fn builder(&self) -> auto::Builder<TokioExecutor> {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(self.header_read_timeout)
            .keep_alive(true)
            .max_buf_size(64 * 1024);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(self.h2_max_concurrent_streams)
            .max_header_list_size(32 * 1024);
        // No HTTP/2 keep-alive pings: their acks would count as activity and keep idle
        // connections open forever. A dead peer is idle too, and the idle timeout closes it.
        builder
    }
}

/// Accepts TLS connections on `listener` until shutdown and serves each with `app`.
pub async fn serve_https(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    app: Arc<App>,
    settings: ConnectionSettings,
    limit: Arc<ConnectionLimit>,
    metrics: Arc<Metrics>,
    shutdown: Shutdown,
) {
    let builder = Arc::new(settings.builder());
    accept_until_shutdown(listener, &limit, shutdown, |tcp, peer, permit, shutdown| {
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let app = app.clone();
        let builder = builder.clone();
        let settings = settings.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let Some((peer, tcp)) = accept_proxied(tcp, peer, &settings).await else {
                return;
            };
            let conn = Arc::new(ConnectionContext {
                peer,
                _permit: permit,
            });
            let started = std::time::Instant::now();
            let handshake =
                tokio::time::timeout(settings.tls_handshake_timeout, acceptor.accept(tcp));
            let tls = match handshake.await {
                Ok(Ok(tls)) => {
                    metrics.tls.handshakes_ok.inc();
                    metrics
                        .tls
                        .handshake_seconds
                        .observe(started.elapsed().as_secs_f64());
                    tls
                }
                Ok(Err(e)) => {
                    metrics.tls.handshakes_failed.inc();
                    tracing::debug!(%peer, "TLS handshake failed: {e}");
                    return;
                }
                Err(_) => {
                    metrics.tls.handshakes_timeout.inc();
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let service = hyper::service::service_fn(move |req| {
                let app = app.clone();
                let conn = conn.clone();
                async move { Ok::<_, Infallible>(app.handle(req, conn).await) }
            });
            serve_connection(&builder, tls, service, settings.idle_timeout, shutdown).await;
        });
    })
    .await;
}

/// Accepts on `listener` until shutdown. Each connection that fits under `limit` is handed to
/// `admit` (which spawns its task) with its permit and a shutdown handle; the rest are closed.
pub(crate) async fn accept_until_shutdown(
    listener: TcpListener,
    limit: &ConnectionLimit,
    mut shutdown: Shutdown,
    mut admit: impl FnMut(TcpStream, SocketAddr, crate::limits::ConnectionPermit, Shutdown),
) {
    loop {
        let (tcp, peer) = tokio::select! {
            _ = shutdown.recv() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    accept_error(e).await;
                    continue;
                }
            },
        };
        if let Some(permit) = limit.try_admit() {
            admit(tcp, peer, permit, shutdown.clone());
        }
    }
}

/// Reads the PROXY header if `peer` is a trusted load balancer; returns the client's address and
/// the stream to serve, or `None` if a trusted peer sent no valid header in time.
pub(crate) async fn accept_proxied(
    tcp: TcpStream,
    peer: SocketAddr,
    settings: &ConnectionSettings,
) -> Option<(SocketAddr, Prefixed<TcpStream>)> {
    if !settings.trusted_proxies.trusts(peer.ip()) {
        return Some((peer, Prefixed::direct(tcp)));
    }
    match proxy_protocol::read_header(tcp, settings.tls_handshake_timeout).await {
        Ok((client, stream)) => Some((client.unwrap_or(peer), stream)),
        Err(e) => {
            tracing::warn!(%peer, "refusing a load balancer connection: {e}");
            None
        }
    }
}

/// What a request handler knows about its connection.
///
/// Shared by every request on the connection; a WebSocket session keeps it after the upgrade, which
/// keeps the connection counted against `max-connections` for as long as the socket is open.
#[derive(Debug)]
pub struct ConnectionContext {
    /// The client's address as seen by the TCP accept.
    pub peer: SocketAddr,
    /// The connection's slot under the global cap.
    _permit: crate::limits::ConnectionPermit,
}

/// Serves one connection until it ends, goes idle, or shutdown asks it to finish.
async fn serve_connection<I, S>(
    builder: &auto::Builder<TokioExecutor>,
    io: I,
    service: S,
    idle_timeout: Duration,
    mut shutdown: Shutdown,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<
            hyper::Request<hyper::body::Incoming>,
            Response = Response<Body>,
            Error = Infallible,
        > + Send
        + 'static,
    S::Future: Send + 'static,
{
    let (io, activity) = ActivityIo::new(io);
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(conn);
    let mut closing = false;
    loop {
        let idle_deadline = activity.deadline(idle_timeout);
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!("connection ended: {e}");
                }
                return;
            }
            _ = shutdown.recv(), if !closing => {
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = tokio::time::sleep_until(idle_deadline), if !closing => {
                if activity.deadline(idle_timeout) <= tokio::time::Instant::now() {
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
    }
}

/// Waits briefly after an accept error: out of file descriptors must not become a busy loop.
async fn accept_error(e: io::Error) {
    tracing::warn!("accept failed: {e}");
    tokio::time::sleep(Duration::from_millis(50)).await;
}

/// Milliseconds since the process's first call, the clock for [`Activity`].
fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// When the connection last moved a byte, shared between its I/O and its task.
#[derive(Debug, Clone)]
struct Activity(Arc<AtomicU64>);

impl Activity {
    fn touch(&self) {
        self.0.store(now_ms(), Ordering::Relaxed);
    }

    /// The instant the connection counts as idle if nothing happens before then.
    fn deadline(&self, idle: Duration) -> tokio::time::Instant {
        let quiet_for =
            Duration::from_millis(now_ms().saturating_sub(self.0.load(Ordering::Relaxed)));
        tokio::time::Instant::now() + idle.saturating_sub(quiet_for)
    }
}

/// I/O that records activity on every successful read or write.
struct ActivityIo<I> {
    inner: I,
    activity: Activity,
}

impl<I> ActivityIo<I> {
    fn new(inner: I) -> (Self, Activity) {
        let activity = Activity(Arc::new(AtomicU64::new(now_ms())));
        (
            ActivityIo {
                inner,
                activity: activity.clone(),
            },
            activity,
        )
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for ActivityIo<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        result
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for ActivityIo<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        result
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A listener address as a URL for the startup log line.
pub fn listener_url(scheme: &str, addr: SocketAddr) -> String {
    format!("{scheme}://{addr}")
}
