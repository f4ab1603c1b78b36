//! One signaling WebSocket: the upgrade checks, the read loop, the bounded write queue, heartbeats
//! and per-connection limits. Everything a message *means* is decided by the hub; this module only
//! moves bytes, enforces sizes and rates, and keeps the connection alive or closes it.
//!
//! Each session is two tasks. The reader parses frames, assembles fragmented messages (bounded over
//! the whole message, which fastwebsockets' `FragmentCollector` does not do) and hands text to the
//! hub. The writer drains the connection's outbox (a bounded channel the hub pushes into without
//! ever blocking), sends heartbeat pings, and closes the socket with the right code. A writer that
//! cannot write for `write-timeout` — a client that stopped reading — is cut off; others never wait
//! for it.

use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use fastwebsockets::{Frame, OpCode, Payload, WebSocketError};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};
use tokio::sync::mpsc;

use super::hub::{Attachment, Departure, Hub, IceServersFor};
use super::protocol::{ClientId, CloseCode, ErrorCode, ServerMessage};
use crate::http::{text_response, Body, ConnectionContext};
use crate::limits::{IpRefusal, PerIpLimits, SessionRates};
use crate::metrics::{CloseReason, Limit, Metrics};
use crate::shutdown::Shutdown;
use crate::turn::{TurnCredentials, TurnEndpoints};

/// The hub as sessions use it: the in-process directory over tokio channels.
pub type SessionHub = Hub<super::directory::MemoryDirectory<mpsc::Sender<Bytes>>>;

/// Session-level settings, taken from the config.
#[derive(Debug, Clone)]
pub struct SessionSettings {
    /// Largest message accepted, counted over all fragments. Default 64 KiB.
    pub max_message_bytes: usize,
    /// Frames waiting for a client before it counts as too slow and is disconnected. Default 128.
    pub outbox_frames: usize,
    /// A write that makes no progress for this long ends the connection. Default 10 s.
    pub write_timeout: Duration,
    /// WebSocket ping interval. Default 20 s.
    pub heartbeat_interval: Duration,
    /// Unanswered pings before the connection counts as dead. Default 2.
    pub missed_pongs: u32,
    /// Messages per second per connection (sustained). Default 20.
    pub messages_per_second: std::num::NonZeroU32,
    /// Message burst per connection. Default 60.
    pub message_burst: std::num::NonZeroU32,
    /// New calls per minute per connection. Default 10.
    pub calls_per_minute: std::num::NonZeroU32,
    /// Origins allowed to open a WebSocket; empty means "the server's own host".
    pub allowed_origins: Vec<String>,
    /// The configured public origin's authority (`host[:port]`), also allowed.
    pub public_authority: Option<String>,
}

impl Default for SessionSettings {
    fn default() -> Self {
        let n = |v| std::num::NonZeroU32::new(v).expect("non-zero default");
        SessionSettings {
            max_message_bytes: 64 * 1024,
            outbox_frames: 128,
            write_timeout: Duration::from_secs(10),
            heartbeat_interval: Duration::from_secs(20),
            missed_pongs: 2,
            messages_per_second: n(20),
            message_burst: n(60),
            calls_per_minute: n(10),
            allowed_origins: Vec::new(),
            public_authority: None,
        }
    }
}

/// Hands each client its ICE servers: STUN and TURN URLs of the embedded relay, with TURN REST
/// credentials whose user is the client's ID, valid for `ttl`.
pub struct IceProvider {
    /// Signs the credentials.
    credentials: TurnCredentials,
    /// The relay's ports; `host` is filled per connection unless configured.
    endpoints: TurnEndpoints,
    /// A fixed host for the URLs (`turn-host`, or the public URL's host).
    host: Option<String>,
    /// Credential lifetime.
    ttl: Duration,
}

impl IceProvider {
    /// A provider for a relay listening on `endpoints`' ports.
    pub fn new(
        credentials: TurnCredentials,
        endpoints: TurnEndpoints,
        host: Option<String>,
        ttl: Duration,
    ) -> Self {
        IceProvider {
            credentials,
            endpoints,
            host,
            ttl,
        }
    }

    /// `{"iceServers":[...],"expiresAt":N}` for `user`, for apps that do their own signaling
    /// (`/api/turn-credentials`). `None` if no host is configured and the request names none.
    pub fn ice_servers_json<B>(&self, req: &Request<B>, user: &str) -> Option<String> {
        let host = match &self.host {
            Some(host) => host.clone(),
            None => request_host(req)?,
        };
        let endpoints = TurnEndpoints {
            host,
            ..self.endpoints.clone()
        };
        let servers =
            self.credentials
                .ice_servers(user, std::time::SystemTime::now(), self.ttl, &endpoints);
        serde_json::to_string(&servers).ok()
    }

    /// The generator for one connection: the URLs name the configured host, or else the host the
    /// browser used to reach this server (which is what it can reach the relay by, too).
    fn for_request<B>(self: &Arc<Self>, req: &Request<B>) -> Option<IceServersFor> {
        let host = match &self.host {
            Some(host) => host.clone(),
            None => request_host(req)?,
        };
        let provider = self.clone();
        Some(Arc::new(move |id: ClientId| {
            let endpoints = TurnEndpoints {
                host: host.clone(),
                ..provider.endpoints.clone()
            };
            let servers = provider.credentials.ice_servers(
                &id.to_string(),
                std::time::SystemTime::now(),
                provider.ttl,
                &endpoints,
            );
            serde_json::value::to_raw_value(&servers.ice_servers).ok()
        }))
    }
}

/// The host name (without port) the client addressed, if it is a plain name or address.
fn request_host<B>(req: &Request<B>) -> Option<String> {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().host())?;
    let host = if host.starts_with('[') {
        &host[1..host.find(']')?]
    } else {
        host.rsplit_once(':').map_or(host, |(name, _)| name)
    };
    let plain = !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.:".contains(&b));
    plain.then(|| host.to_ascii_lowercase())
}

/// Accepts WebSocket upgrades and runs their sessions.
pub struct Signaling {
    /// The call rules and routing table.
    hub: Arc<SessionHub>,
    /// Sizes, rates, heartbeat.
    settings: SessionSettings,
    /// Per-address upgrade rate and open-socket cap.
    per_ip: Arc<PerIpLimits>,
    /// Connection, message and limit counters.
    metrics: Arc<Metrics>,
    /// ICE servers for the `id` message, when the TURN relay runs.
    ice: Option<Arc<IceProvider>>,
}

impl std::fmt::Debug for Signaling {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signaling")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// What the writer task is asked to do besides draining the outbox.
#[derive(Debug)]
enum Control {
    /// Send this frame now (pong replies, session-level errors).
    Send(OpCode, Bytes),
    /// Send a close frame and end the connection.
    Close(CloseCode, &'static str),
}

impl Signaling {
    /// A signaling service over `hub`.
    pub fn new(
        hub: Arc<SessionHub>,
        settings: SessionSettings,
        per_ip: Arc<PerIpLimits>,
        metrics: Arc<Metrics>,
        ice: Option<IceProvider>,
    ) -> Arc<Self> {
        Arc::new(Signaling {
            hub,
            settings,
            per_ip,
            metrics,
            ice: ice.map(Arc::new),
        })
    }

    /// The ICE server provider, when the TURN relay runs.
    pub fn ice(&self) -> Option<&Arc<IceProvider>> {
        self.ice.as_ref()
    }

    /// The hub, for the expiry task and metrics.
    pub fn hub(&self) -> &Arc<SessionHub> {
        &self.hub
    }

    /// Answers an upgrade request: refuses it (403, 429, 400) or switches protocols and starts the
    /// session in its own task.
    pub fn upgrade(
        self: &Arc<Self>,
        mut req: Request<Incoming>,
        conn: Arc<ConnectionContext>,
        shutdown: Shutdown,
    ) -> Response<Body> {
        if !self.origin_allowed(&req) {
            return text_response(StatusCode::FORBIDDEN, "origin not allowed\n");
        }
        let ip = conn.peer.ip();
        if self.per_ip.check_upgrade(ip).is_err() {
            self.metrics.limits.rejected(Limit::UpgradeRate);
            let mut response = text_response(
                StatusCode::TOO_MANY_REQUESTS,
                "too many connection attempts; retry in a second\n",
            );
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            return response;
        }
        let (response, upgrade) = match fastwebsockets::upgrade::upgrade(&mut req) {
            Ok(upgraded) => upgraded,
            Err(e) => {
                tracing::debug!(peer = %conn.peer, "bad WebSocket upgrade: {e}");
                return text_response(
                    StatusCode::BAD_REQUEST,
                    "invalid WebSocket upgrade request\n",
                );
            }
        };
        let ice = self.ice.as_ref().and_then(|ice| ice.for_request(&req));
        let this = self.clone();
        tokio::spawn(async move {
            match upgrade.await {
                Ok(ws) => this.run(ws, ip, ice, conn, shutdown).await,
                Err(e) => tracing::debug!("WebSocket upgrade did not complete: {e}"),
            }
        });
        response.map(|body| crate::http::boxed(body.map_err(|never| match never {})))
    }

    /// Cross-site WebSocket hijacking guard: a browser always sends `Origin`; it must name this
    /// server (or a configured origin). Clients without `Origin` are not browsers and are allowed.
    fn origin_allowed<B>(&self, req: &Request<B>) -> bool {
        let Some(origin) = req.headers().get(header::ORIGIN) else {
            return true;
        };
        let Ok(origin) = origin.to_str() else {
            return false;
        };
        let origin = origin.trim_end_matches('/').to_ascii_lowercase();
        if self
            .settings
            .allowed_origins
            .iter()
            .any(|allowed| allowed.eq_ignore_ascii_case(&origin))
        {
            return true;
        }
        let Some(authority) = origin.strip_prefix("https://") else {
            return false;
        };
        if let Some(public) = &self.settings.public_authority {
            return authority == public;
        }
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| req.uri().authority().map(|a| a.as_str()));
        host.is_some_and(|host| host.eq_ignore_ascii_case(authority))
    }

    async fn run(
        self: Arc<Self>,
        ws: fastwebsockets::WebSocket<hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>>,
        ip: IpAddr,
        ice: Option<IceServersFor>,
        conn: Arc<ConnectionContext>,
        shutdown: Shutdown,
    ) {
        let (outbox, outbox_rx) = mpsc::channel::<Bytes>(self.settings.outbox_frames);
        // Boxed: a tokio channel allocates its first 32-slot block up front whatever the capacity,
        // so 40-byte `Control`s cost every idle connection 1.3 KB; boxes cost it 0.3 KB, and control
        // frames (pongs, errors, closes) are rare.
        let (control, control_rx) = mpsc::channel::<Box<Control>>(8);
        let unanswered = Arc::new(AtomicU32::new(0));
        let read_side = Arc::new(std::sync::Mutex::new(None));
        let (mut reader, writer) = ws.split(|io| {
            let (read, write) = tokio::io::split(io);
            *read_side.lock().expect("fresh lock") = Some(read);
            (
                Detachable {
                    inner: read_side.clone(),
                },
                write,
            )
        });
        reader.set_auto_close(true);
        reader.set_auto_pong(true);
        // One byte over the limit lets fastwebsockets reject too-large single frames for us.
        reader.set_max_message_size(self.settings.max_message_bytes + 1);

        let signaling = &self.metrics.signaling;
        signaling.opened.inc();
        signaling.open.inc();
        let writer_task = tokio::spawn(write_loop(
            writer,
            outbox_rx,
            control_rx,
            unanswered.clone(),
            self.settings.clone(),
            self.metrics.clone(),
            shutdown,
        ));

        // Too many sockets from one address: say so, then close.
        let _ip_slot = match self.per_ip.open(ip) {
            Ok(slot) => slot,
            Err(IpRefusal::TooManyOpen | IpRefusal::UpgradeRate) => {
                self.metrics.limits.rejected(Limit::ConnectionsPerIp);
                signaling.error(ErrorCode::TooManyConnections);
                signaling.closed(CloseReason::Refused);
                let _ = control.try_send(error_frame(ErrorCode::TooManyConnections));
                let _ = control.try_send(Box::new(Control::Close(
                    CloseCode::PolicyViolation,
                    "too many connections from your address",
                )));
                drop(control);
                let _ = writer_task.await;
                return;
            }
        };

        let attachment = match self.hub.connect(outbox, ice, Instant::now()) {
            Ok(attachment) => attachment,
            Err(e) => {
                self.metrics.limits.rejected(Limit::ServerFull);
                signaling.error(e.code());
                signaling.closed(CloseReason::Refused);
                let _ = control.try_send(Box::new(Control::Send(OpCode::Text, e.frame())));
                let _ = control.try_send(Box::new(Control::Close(e.close_code(), "cannot join")));
                drop(control);
                let _ = writer_task.await;
                return;
            }
        };
        let mut session = ReadState {
            attachment,
            rates: SessionRates::new(
                self.settings.messages_per_second,
                self.settings.message_burst,
                self.settings.calls_per_minute,
            ),
            partial: None,
        };

        let mut writer_task = writer_task;
        let mut writer_end = None;
        let ended = tokio::select! {
            ended = self.read_loop(&mut reader, &mut session, &control, &unanswered) => ended,
            // The writer ended first (shutdown, heartbeat timeout, slow client): stop reading too.
            end = &mut writer_task => {
                writer_end = end.ok();
                ReadEnd::Dropped
            }
        };
        signaling.closed(match (writer_end, ended) {
            (Some(end), _) => end,
            (None, ReadEnd::Close(CloseCode::MessageTooBig, _)) => CloseReason::TooBig,
            (None, ReadEnd::Close(..)) => CloseReason::Policy,
            (None, ReadEnd::Left | ReadEnd::Dropped) => CloseReason::Client,
        });
        let departure = match ended {
            ReadEnd::Left => Departure::Left,
            ReadEnd::Dropped | ReadEnd::Close(..) => Departure::Dropped,
        };
        self.hub
            .disconnect(session.attachment, departure, Instant::now());
        if let ReadEnd::Close(code, reason) = ended {
            let _ = control.try_send(Box::new(Control::Close(code, reason)));
            drop(control);
            let _ = writer_task.await;
            // Closing the socket with unread data in it would reset the connection, and the client
            // would lose the error and close frame just sent. Read and discard what it still sends
            // (an oversized frame's rest, a flood) until it closes, for a short while.
            drop(reader);
            let raw = read_side.lock().unwrap_or_else(|e| e.into_inner()).take();
            if let Some(mut raw) = raw {
                let mut sink = tokio::io::sink();
                let _ =
                    tokio::time::timeout(CLOSE_LINGER, tokio::io::copy(&mut raw, &mut sink)).await;
            }
        } else {
            drop(control);
            if !writer_task.is_finished() {
                let _ = writer_task.await;
            }
        }
        drop(conn);
    }

    /// Reads until the client leaves or must be closed; returns the close to send, if any.
    async fn read_loop<S>(
        &self,
        reader: &mut fastwebsockets::WebSocketRead<S>,
        session: &mut ReadState,
        control: &mpsc::Sender<Box<Control>>,
        unanswered: &AtomicU32,
    ) -> ReadEnd
    where
        S: tokio::io::AsyncRead + Unpin,
    {
        let max = self.settings.max_message_bytes;
        let mut obligations = |frame: Frame<'_>| {
            let control = control.clone();
            let owned = (frame.opcode, Bytes::copy_from_slice(&frame.payload));
            async move {
                control
                    .send(Box::new(Control::Send(owned.0, owned.1)))
                    .await
            }
        };
        loop {
            let frame = match reader.read_frame(&mut obligations).await {
                Ok(frame) => frame,
                Err(WebSocketError::FrameTooLarge) => {
                    let _ = self.reject(session, ErrorCode::MessageTooLarge);
                    return ReadEnd::Close(CloseCode::MessageTooBig, "message too large");
                }
                Err(e) => {
                    tracing::debug!("WebSocket read ended: {e}");
                    return ReadEnd::Dropped;
                }
            };
            unanswered.store(0, Ordering::Relaxed);
            // A whole message is handed to the hub straight from the read buffer; only fragmented
            // ones are assembled into a buffer of their own.
            let assembled: BytesMut = match (frame.opcode, frame.fin, session.partial.as_mut()) {
                (OpCode::Close, _, _) => {
                    // 1000 (normal closure): the client is leaving for good. Anything else, 1001
                    // from a reloading tab included, may want to resume.
                    let code = frame
                        .payload
                        .get(..2)
                        .map(|c| u16::from_be_bytes([c[0], c[1]]));
                    return match code {
                        Some(1000) | None => ReadEnd::Left,
                        Some(_) => ReadEnd::Dropped,
                    };
                }
                (OpCode::Pong | OpCode::Ping, _, _) => continue,
                (OpCode::Text | OpCode::Binary, _, Some(_)) => {
                    return ReadEnd::Close(
                        CloseCode::PolicyViolation,
                        "new message inside a fragmented one",
                    );
                }
                (OpCode::Continuation, _, None) => {
                    return ReadEnd::Close(
                        CloseCode::PolicyViolation,
                        "continuation without a message",
                    );
                }
                (OpCode::Continuation, fin, Some(partial)) => {
                    if partial.bytes.len() + frame.payload.len() > max {
                        let _ = self.reject(session, ErrorCode::MessageTooLarge);
                        return ReadEnd::Close(CloseCode::MessageTooBig, "message too large");
                    }
                    partial.bytes.extend_from_slice(&frame.payload);
                    if !fin {
                        continue;
                    }
                    let partial = session.partial.take().expect("matched Some");
                    if partial.binary {
                        if let Some(close) = self.reject(session, ErrorCode::BinaryNotSupported) {
                            return close;
                        }
                        continue;
                    }
                    // Checked here, once whole: a character may span fragments.
                    if std::str::from_utf8(&partial.bytes).is_err() {
                        return ReadEnd::Close(
                            CloseCode::PolicyViolation,
                            "text message is not UTF-8",
                        );
                    }
                    partial.bytes
                }
                (opcode @ (OpCode::Text | OpCode::Binary), false, None) => {
                    session.partial = Some(Partial {
                        binary: opcode == OpCode::Binary,
                        bytes: BytesMut::from(&frame.payload[..]),
                    });
                    continue;
                }
                (OpCode::Binary, true, None) => {
                    if let Some(close) = self.reject(session, ErrorCode::BinaryNotSupported) {
                        return close;
                    }
                    continue;
                }
                // fastwebsockets has checked a whole text frame's UTF-8; the hub reads it where
                // it lies, with no copy.
                (OpCode::Text, true, None) => {
                    if let Some(close) = self.on_text(session, &frame.payload) {
                        return close;
                    }
                    continue;
                }
            };
            if let Some(close) = self.on_text(session, &assembled) {
                return close;
            }
        }
    }

    /// Applies the per-connection rates, then hands the message (valid UTF-8) to the hub.
    fn on_text(&self, session: &mut ReadState, message: &[u8]) -> Option<ReadEnd> {
        if session.rates.messages.check().is_err() {
            self.metrics.limits.rejected(Limit::Messages);
            return self.reject(session, ErrorCode::RateLimited);
        }
        if starts_a_call(message) && session.rates.calls.check().is_err() {
            self.metrics.limits.rejected(Limit::Calls);
            return self.reject(session, ErrorCode::TooManyCalls);
        }
        let outcome = self
            .hub
            .handle_text(&mut session.attachment, message, Instant::now());
        self.metrics
            .signaling
            .handled(outcome.received, outcome.error);
        outcome
            .close
            .map(|code| ReadEnd::Close(code, "closing after repeated violations"))
    }

    /// Answers a message the session refused itself; the hub counts it and may ask for a close.
    fn reject(&self, session: &mut ReadState, code: ErrorCode) -> Option<ReadEnd> {
        self.metrics.signaling.error(code);
        let outcome = self
            .hub
            .reject(&mut session.attachment, code, Instant::now());
        outcome
            .close
            .map(|code| ReadEnd::Close(code, "closing after repeated violations"))
    }
}

/// How the read side ended.
#[derive(Debug, Clone, Copy)]
enum ReadEnd {
    /// The client closed the WebSocket normally: its ID is freed at once.
    Left,
    /// The connection broke or timed out: the ID stays reserved for a resume.
    Dropped,
    /// The server closes it with this code.
    Close(CloseCode, &'static str),
}

/// Whether a text message is a `video-offer-request`, cheaply and without a full parse: the
/// per-minute call limit must apply before the hub does any work on it.
fn starts_a_call(message: &[u8]) -> bool {
    // A vectorised substring search: the naive `windows().any()` compared every offset and was the
    // hottest function in a relay profile (7% of server CPU with 3 KB SDPs).
    memchr::memmem::find(message, b"\"video-offer-request\"").is_some()
}

/// A session-level error as a frame for the writer.
fn error_frame(code: ErrorCode) -> Box<Control> {
    let frame = ServerMessage::Error {
        code,
        message: code.describe(),
        request: None,
    }
    .encode();
    Box::new(Control::Send(OpCode::Text, frame))
}

/// What the reader keeps between frames.
struct ReadState {
    /// This connection's standing with the hub (its ID changes on resume).
    attachment: Attachment,
    /// Token buckets.
    rates: SessionRates,
    /// A fragmented message being assembled.
    partial: Option<Partial>,
}

/// A fragmented message in progress.
struct Partial {
    /// Whether it started as a binary frame (refused once complete).
    binary: bool,
    /// The bytes so far; never more than `max_message_bytes`.
    bytes: BytesMut,
}

/// Drains the outbox and control queue into the socket, pings, and closes.
///
/// Returns why it ended the connection itself, or the reader's verdict when the reader asked for
/// the close (then the reader counts the reason).
async fn write_loop<W>(
    mut writer: fastwebsockets::WebSocketWrite<W>,
    mut outbox: mpsc::Receiver<Bytes>,
    mut control: mpsc::Receiver<Box<Control>>,
    unanswered: Arc<AtomicU32>,
    settings: SessionSettings,
    metrics: Arc<Metrics>,
    mut shutdown: Shutdown,
) -> CloseReason
where
    W: tokio::io::AsyncWrite + Unpin,
{
    let mut heartbeat = tokio::time::interval_at(
        tokio::time::Instant::now() + settings.heartbeat_interval,
        settings.heartbeat_interval,
    );
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let timeout = settings.write_timeout;
    let signaling = &metrics.signaling;
    // Set when the hub told this connection another one resumed its ID.
    let mut replaced = false;
    let close = async |writer: &mut fastwebsockets::WebSocketWrite<W>,
                       code: CloseCode,
                       reason: &'static str| {
        let frame = Frame::close(code.as_u16(), reason.as_bytes());
        let _ = tokio::time::timeout(timeout, writer.write_frame(frame)).await;
    };
    loop {
        let frame = tokio::select! {
            biased;
            ctl = control.recv() => match ctl.map(|boxed| *boxed) {
                Some(Control::Send(opcode, bytes)) => {
                    signaling.sent(&bytes);
                    Frame::new(true, opcode, None, Payload::Owned(bytes.to_vec()))
                }
                Some(Control::Close(code, reason)) => {
                    // What the hub queued before the close (typically the error that explains
                    // it) goes out first.
                    while let Ok(bytes) = outbox.try_recv() {
                        signaling.sent(&bytes);
                        if let Err(end) = write(&mut writer, Frame::text(Payload::Borrowed(&bytes)), timeout).await {
                            return end;
                        }
                    }
                    close(&mut writer, code, reason).await;
                    return CloseReason::Client;
                }
                // The reader is gone (client closed or dropped).
                None => return CloseReason::Client,
            },
            _ = shutdown.recv() => {
                close(&mut writer, CloseCode::GoingAway, "server restarting; reconnect and resume").await;
                return CloseReason::Shutdown;
            }
            next = outbox.recv() => match next {
                Some(bytes) => {
                    signaling.sent(&bytes);
                    replaced |= bytes.starts_with(br#"{"type":"error","code":"session_replaced""#);
                    if let Err(end) = write(&mut writer, Frame::text(Payload::Borrowed(&bytes)), timeout).await {
                        if end == CloseReason::SlowClient {
                            signaling.outbox_overflows.inc();
                        }
                        return end;
                    }
                    continue;
                }
                // The hub dropped the outbox: another connection resumed this ID, or the queue
                // overflowed because the client does not read.
                None if replaced => {
                    close(&mut writer, CloseCode::PolicyViolation, "another connection resumed this ID").await;
                    return CloseReason::Replaced;
                }
                None => {
                    signaling.outbox_overflows.inc();
                    close(&mut writer, CloseCode::PolicyViolation, "too slow: outbound queue full").await;
                    return CloseReason::SlowClient;
                }
            },
            _ = heartbeat.tick() => {
                if unanswered.fetch_add(1, Ordering::Relaxed) >= settings.missed_pongs {
                    tracing::debug!("heartbeat timeout");
                    signaling.heartbeat_timeouts.inc();
                    close(&mut writer, CloseCode::GoingAway, "heartbeat timeout").await;
                    return CloseReason::HeartbeatTimeout;
                }
                Frame::new(true, OpCode::Ping, None, Payload::Borrowed(b"hb"))
            }
        };
        if let Err(end) = write(&mut writer, frame, timeout).await {
            if end == CloseReason::SlowClient {
                signaling.outbox_overflows.inc();
            }
            return end;
        }
    }
}

/// Writes one frame, giving up after `timeout` (a client that does not read).
async fn write<W>(
    writer: &mut fastwebsockets::WebSocketWrite<W>,
    frame: Frame<'_>,
    timeout: Duration,
) -> Result<(), CloseReason>
where
    W: tokio::io::AsyncWrite + Unpin,
{
    match tokio::time::timeout(timeout, writer.write_frame(frame)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => {
            tracing::debug!("WebSocket write failed: {e}");
            Err(CloseReason::Client)
        }
        Err(_) => {
            tracing::debug!("WebSocket write timed out: client not reading");
            Err(CloseReason::SlowClient)
        }
    }
}

/// How long a connection the server is closing may keep sending before the socket is dropped.
const CLOSE_LINGER: Duration = Duration::from_secs(1);

/// The read half of a session's stream, which the session can take back from fastwebsockets.
///
/// Used for a lingering close: once the server has sent its close frame it only needs to see the
/// client go away, and draining the raw stream (rather than resetting it) keeps the close frame
/// deliverable even when the WebSocket framing is out of step (after an oversized frame). The lock
/// is uncontended: only the reader task touches it until the session takes the stream back.
struct Detachable<R> {
    inner: Arc<std::sync::Mutex<Option<R>>>,
}

impl<R: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Detachable<R> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        match inner.as_mut() {
            Some(read) => Pin::new(read).poll_read(cx, buf),
            // Taken back by the session: end of stream for fastwebsockets.
            None => Poll::Ready(Ok(())),
        }
    }
}
