//! The HTTPS and redirect listeners: accept loops, connection limits, timeouts, graceful close.
//!
//! Each accepted TCP connection must first fit under its address's `connections-per-ip` and then
//! get a permit from the listener's [`ConnectionLimit`] ([`Admission`]; behind a trusted PROXY
//! balancer the address is the one the header names). It must then finish its TLS handshake within
//! `tls-handshake-timeout` and send request heads within `header-read-timeout`; afterwards
//! [`lifetime`] ends it when idle, stalled, or closing for too long. None of this holds a worker:
//! every connection is its own task, and every wait is bounded. Routing lives in [`routes`], files
//! in [`static_files`], headers in [`headers`]. With [`TurnOnHttps`], TLS connections meant for
//! TURN are told apart ([`tls_route`]) and handed to the relay.

pub mod admin;
pub mod headers;
pub mod lifetime;
pub mod proxy_protocol;
pub mod ranges;
mod redirect;
pub mod routes;
pub mod static_files;
pub mod tls_route;
pub mod websocket;

use std::convert::Infallible;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full};
use hyper::{Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};

use proxy_protocol::{Prefixed, TrustedProxies};
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::LazyConfigAcceptor;

use crate::limits::{AddressLimit, AddressSlot, ConnectionLimit, ConnectionPermit};
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;
use crate::turn::stream::StreamHandoff;
use lifetime::{Activity, TrackedBody, Verdict};
use tls_route::{HelloRoute, Service};

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

/// HTTP/2 header list limit (decoded size of one request's headers). Browsers send 1–4 KB;
/// this is also where a CONTINUATION flood is cut.
pub const H2_MAX_HEADER_LIST_SIZE: u32 = 16 * 1024;

/// Streams the client may reset before the server has accepted them, per connection; more and
/// the connection ends with GOAWAY ENHANCE_YOUR_CALM (the "rapid reset" attack, CVE-2023-44487).
pub const H2_MAX_PENDING_ACCEPT_RESET_STREAMS: usize = 20;

/// Streams the server may reset because of the client's protocol errors, per connection, before
/// it ends the connection (CVE-2024-27316 family, "MadeYouReset").
pub const H2_MAX_LOCAL_ERROR_RESET_STREAMS: usize = 64;

/// Largest HTTP/2 frame the server accepts (the protocol's minimum, 16 KiB).
pub const H2_MAX_FRAME_SIZE: u32 = 16 * 1024;

/// Bytes hyper buffers per HTTP/2 stream for sending; with file bodies in 16 KiB frames this
/// keeps a zero-window stream from queueing the whole file.
pub const H2_MAX_SEND_BUF_SIZE: usize = 64 * 1024;

/// Timeouts and caps for HTTP connections: the config's `http.connection` section.
#[derive(Debug, Clone)]
pub struct ConnectionSettings {
    /// Deadline for the TLS handshake (and for a trusted balancer's PROXY header).
    pub tls_handshake_timeout: Duration,
    /// Deadline for each HTTP/1 request head (and the idle wait before it).
    pub header_read_timeout: Duration,
    /// Graceful close of a connection with no request in flight for this long.
    pub idle_timeout: Duration,
    /// A connection whose responses make no progress for this long is dropped.
    pub response_stall_timeout: Duration,
    /// After a graceful close begins, the connection is dropped after this long whatever the peer
    /// does (`shutdown-timeout`: the server does not wait longer on shutdown either).
    pub close_timeout: Duration,
    /// HTTP/2 concurrent stream cap.
    pub h2_max_concurrent_streams: u32,
}

impl Default for ConnectionSettings {
    /// The defaults of `tls-handshake-timeout`, `header-read-timeout`, `idle-timeout`,
    /// `response-stall-timeout`, `shutdown-timeout` and `h2-max-concurrent-streams`.
    fn default() -> Self {
        ConnectionSettings {
            tls_handshake_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            response_stall_timeout: Duration::from_secs(30),
            close_timeout: Duration::from_secs(10),
            h2_max_concurrent_streams: 100,
        }
    }
}

impl ConnectionSettings {
    /// The hyper builder: HTTP/1.1 with upgrades and HTTP/2 (no extended CONNECT, so browsers open
    /// WebSockets over HTTP/1.1), with hyper's timer for the header timeout and every HTTP/2 limit
    /// set explicitly rather than left to library defaults.
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
            .max_header_list_size(H2_MAX_HEADER_LIST_SIZE)
            .max_pending_accept_reset_streams(H2_MAX_PENDING_ACCEPT_RESET_STREAMS)
            .max_local_error_reset_streams(H2_MAX_LOCAL_ERROR_RESET_STREAMS)
            .max_frame_size(H2_MAX_FRAME_SIZE)
            .max_send_buf_size(H2_MAX_SEND_BUF_SIZE)
            // No server PINGs: a dead peer with nothing in flight is idle, and one with requests
            // in flight makes no progress, so the idle and stall limits already end it; and the
            // client's PINGs do not count as activity (see `lifetime`).
            .keep_alive_interval(None);
        builder
    }
}

/// Who may open a connection on a listener: the per-address cap, then the listener's global cap.
#[derive(Debug, Clone)]
pub struct Admission {
    /// The listener's global cap (`max-connections`).
    pub limit: Arc<ConnectionLimit>,
    /// Open connections per client address, shared by every listener (`connections-per-ip`).
    pub per_ip: Arc<AddressLimit>,
    /// Load balancers whose connections start with a PROXY header.
    pub trusted_proxies: Arc<TrustedProxies>,
    /// Deadline for a trusted balancer's PROXY header.
    pub proxy_header_timeout: Duration,
}

/// A connection admitted at accept, before any bytes are read.
pub(crate) struct Accepted {
    /// The TCP stream.
    tcp: TcpStream,
    /// The TCP peer (IPv4-mapped IPv6 shown as IPv4).
    peer: SocketAddr,
    /// What the connection holds so far.
    hold: ConnectionHold,
}

/// The slots a connection holds for its whole life (a WebSocket's included); dropping it frees them.
#[derive(Debug)]
pub struct ConnectionHold {
    /// The slot under the listener's global cap.
    _permit: ConnectionPermit,
    /// The slot under the client address's cap; `None` for a trusted balancer's own connections
    /// that name no client (health checks), which are capped only globally.
    _slot: Option<AddressSlot>,
}

/// `::ffff:a.b.c.d` (what a dual-stack listener reports for IPv4 clients) as `a.b.c.d`.
fn canonical(peer: SocketAddr) -> SocketAddr {
    match peer.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), peer.port()),
            None => peer,
        },
        IpAddr::V4(_) => peer,
    }
}

impl Admission {
    /// Decides at accept, without reading: a direct client must fit under its address's cap and
    /// then the global cap; a trusted balancer only under the global cap (its clients are capped
    /// once the PROXY header names them, in [`Admission::client`]).
    fn at_accept(&self, tcp: TcpStream, peer: SocketAddr) -> Option<Accepted> {
        let peer = canonical(peer);
        let slot = if self.trusted_proxies.trusts(peer.ip()) {
            None
        } else {
            Some(self.per_ip.try_take(peer.ip())?)
        };
        let permit = self.limit.try_admit()?;
        Some(Accepted {
            tcp,
            peer,
            hold: ConnectionHold {
                _permit: permit,
                _slot: slot,
            },
        })
    }

    /// Reads the PROXY header if the peer is a trusted balancer and takes the named client's
    /// address slot; returns the client's address, the stream to serve and the slots held, or
    /// `None` if the header is missing, late or invalid, or the client is over its cap.
    pub(crate) async fn client(
        &self,
        accepted: Accepted,
    ) -> Option<(SocketAddr, Prefixed<TcpStream>, ConnectionHold)> {
        let Accepted {
            tcp,
            peer,
            mut hold,
        } = accepted;
        if !self.trusted_proxies.trusts(peer.ip()) {
            return Some((peer, Prefixed::direct(tcp), hold));
        }
        match proxy_protocol::read_header(tcp, self.proxy_header_timeout).await {
            Ok((Some(client), stream)) => {
                let client = canonical(client);
                hold._slot = Some(self.per_ip.try_take(client.ip())?);
                Some((client, stream, hold))
            }
            Ok((None, stream)) => Some((peer, stream, hold)),
            Err(e) => {
                tracing::warn!(%peer, "refusing a load balancer connection: {e}");
                None
            }
        }
    }
}

/// TURN over TLS on the HTTPS port (`turn-on-https-port`): the TLS configuration for clients that
/// offer ALPN `stun.turn`, and where TURN connections go once routed.
#[derive(Debug, Clone)]
pub struct TurnOnHttps {
    /// The TLS configuration for a ClientHello offering `stun.turn` (same certificates, that
    /// protocol selected).
    pub config: Arc<ServerConfig>,
    /// The relay's stream front.
    pub handoff: StreamHandoff,
}

/// Accepts TLS connections on `listener` until shutdown and serves each with `app`, or, with
/// `turn`, hands those meant for TURN (see [`tls_route`]) to the relay.
#[allow(clippy::too_many_arguments)]
pub async fn serve_https(
    listener: TcpListener,
    https_config: Arc<ServerConfig>,
    turn: Option<TurnOnHttps>,
    app: Arc<App>,
    settings: ConnectionSettings,
    admission: Admission,
    metrics: Arc<Metrics>,
    shutdown: Shutdown,
) {
    let builder = Arc::new(settings.builder());
    let gate = admission.clone();
    accept_until_shutdown(listener, &gate, shutdown, |accepted, shutdown| {
        let _ = accepted.tcp.set_nodelay(true);
        let Ok(local) = accepted.tcp.local_addr() else {
            return;
        };
        let https_config = https_config.clone();
        let turn = turn.clone();
        let app = app.clone();
        let builder = builder.clone();
        let settings = settings.clone();
        let metrics = metrics.clone();
        let admission = admission.clone();
        tokio::spawn(async move {
            let Some((peer, tcp, hold)) = admission.client(accepted).await else {
                return;
            };
            let conn = Arc::new(ConnectionContext { peer, _hold: hold });
            let started = std::time::Instant::now();
            let handshake = async {
                let start =
                    LazyConfigAcceptor::new(tokio_rustls::rustls::server::Acceptor::default(), tcp)
                        .await?;
                let route = match &turn {
                    Some(_) => tls_route::by_alpn(start.client_hello().alpn()),
                    None => HelloRoute::To(Service::Http),
                };
                let config = match (&turn, route) {
                    (Some(turn), HelloRoute::To(Service::Turn)) => turn.config.clone(),
                    _ => https_config,
                };
                let tls = start.into_stream(config).await?;
                Ok::<_, io::Error>((route, tls))
            };
            let (route, mut tls) =
                match tokio::time::timeout(settings.tls_handshake_timeout, handshake).await {
                    Ok(Ok(done)) => {
                        metrics.tls.handshakes_ok.inc();
                        metrics
                            .tls
                            .handshake_seconds
                            .observe(started.elapsed().as_secs_f64());
                        done
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
            let (service, replay) = match route {
                HelloRoute::To(service) => (service, Bytes::new()),
                HelloRoute::Sniff => {
                    match tls_route::peek(&mut tls, settings.header_read_timeout).await {
                        Ok(decided) => decided,
                        Err(e) => {
                            tracing::debug!(%peer, "closing an HTTPS-port connection: {e}");
                            return;
                        }
                    }
                }
            };
            let io = Prefixed::with_prefix(replay, tls);
            if let (Service::Turn, Some(turn)) = (service, turn) {
                // The connection keeps its HTTPS-listener slots (`conn`) while TURN serves it.
                turn.handoff.serve(io, peer, local).await;
                drop((conn, shutdown));
                return;
            }
            let service = hyper::service::service_fn(move |req| {
                let app = app.clone();
                let conn = conn.clone();
                async move { Ok::<_, Infallible>(app.handle(req, conn).await) }
            });
            serve_connection(&builder, io, service, &settings, shutdown).await;
        });
    })
    .await;
}

/// Accepts on `listener` until shutdown. Each connection that [`Admission`] lets in is handed to
/// `admit` (which spawns its task) with a shutdown handle; the rest are closed at once.
pub(crate) async fn accept_until_shutdown(
    listener: TcpListener,
    admission: &Admission,
    mut shutdown: Shutdown,
    mut admit: impl FnMut(Accepted, Shutdown),
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
        if let Some(accepted) = admission.at_accept(tcp, peer) {
            admit(accepted, shutdown.clone());
        }
    }
}

/// What a request handler knows about its connection.
///
/// Shared by every request on the connection; a WebSocket session keeps it after the upgrade, which
/// keeps the connection counted against `max-connections` and `connections-per-ip` for as long as
/// the socket is open.
#[derive(Debug)]
pub struct ConnectionContext {
    /// The client's address: the TCP peer, or the one a trusted balancer's PROXY header names.
    pub peer: SocketAddr,
    /// The connection's slots under the caps.
    _hold: ConnectionHold,
}

/// Serves one connection until it ends, or [`lifetime`] ends it: idle → graceful close, stalled →
/// dropped, closing (idle or shutdown) for longer than `close_timeout` → dropped.
async fn serve_connection<I, S>(
    builder: &auto::Builder<TokioExecutor>,
    io: I,
    service: S,
    settings: &ConnectionSettings,
    mut shutdown: Shutdown,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<
            hyper::Request<hyper::body::Incoming>,
            Response = Response<Body>,
            Error = Infallible,
        > + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    let activity = Activity::new();
    let service = {
        let activity = activity.clone();
        let service = Arc::new(service);
        hyper::service::service_fn(move |req| {
            use hyper::service::Service as _;
            let guard = activity.begin();
            let response = service.call(req);
            async move {
                let response = response.await?;
                Ok::<_, Infallible>(response.map(|body| boxed(TrackedBody::new(body, guard))))
            }
        })
    };
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(conn);
    let mut close_deadline: Option<tokio::time::Instant> = None;
    loop {
        let verdict = lifetime::judge(
            activity.snapshot(),
            lifetime::now_ms(),
            settings.idle_timeout,
            settings.response_stall_timeout,
        );
        let wait = match verdict {
            Verdict::Wait(wait) => wait,
            Verdict::Stalled => {
                tracing::debug!("connection dropped: its responses made no progress");
                return;
            }
            Verdict::Idle if close_deadline.is_none() => {
                close_deadline = Some(tokio::time::Instant::now() + settings.close_timeout);
                conn.as_mut().graceful_shutdown();
                settings.idle_timeout
            }
            Verdict::Idle => settings.idle_timeout,
        };
        let check = tokio::time::Instant::now() + wait;
        let hard_stop = close_deadline.unwrap_or(check);
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!("connection ended: {e}");
                }
                return;
            }
            _ = shutdown.recv(), if close_deadline.is_none() => {
                close_deadline = Some(tokio::time::Instant::now() + settings.close_timeout);
                conn.as_mut().graceful_shutdown();
            }
            _ = tokio::time::sleep_until(check) => {}
            // Busy ↔ quiet: the other limit applies from now on.
            _ = activity.turned() => {}
            _ = tokio::time::sleep_until(hard_stop), if close_deadline.is_some() => {
                tracing::debug!("connection dropped: still open after its graceful close deadline");
                return;
            }
        }
    }
}

/// Waits briefly after an accept error: out of file descriptors must not become a busy loop.
async fn accept_error(e: io::Error) {
    tracing::warn!("accept failed: {e}");
    tokio::time::sleep(Duration::from_millis(50)).await;
}

/// A listener address as a URL for the startup log line.
pub fn listener_url(scheme: &str, addr: SocketAddr) -> String {
    format!("{scheme}://{addr}")
}
