//! One signaling WebSocket after the upgrade: the session loop, the bounded write queue,
//! heartbeats and per-connection limits. Everything a message *means* is decided by the hub (through
//! the router); this module only moves bytes, enforces sizes and rates, and keeps the connection
//! alive or closes it. The upgrade itself (origin check, per-address upgrade rate, ICE servers) is
//! `http::websocket`'s; what happens here is reported to a [`SessionObserver`].
//!
//! Each session is one task that owns the socket. It reads frames ([`super::wire`], which keeps no
//! buffer between messages), assembles fragmented messages (bounded over the whole message) and
//! hands text to the router; it drains the connection's outbox ([`super::outbox`], bounded, which
//! the router pushes into without ever blocking) into one write; it pings, and closes the socket
//! with the right code. A client that takes no output for `write-timeout` — one that stopped
//! reading — is cut off; others never wait for it. One task instead of a reader and a writer saves a
//! task and a channel per connection, and a wake-up per relayed message.

use std::future::{poll_fn, Future};
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, LazyLock};
use std::task::{ready, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use memchr::memmem;

use super::bus::{Bus, NoBus};
use super::connections::Joining;
use super::hub::{Attachment, Departure, IceServersFor};
use super::observer::{CloseReason, SessionEvent, SessionLimit, SessionObserver};
use super::outbox::{self, OutboxBudget, OutboxLimits, OutboxReceiver, OutboxSender};
use super::protocol::{CloseCode, ErrorCode, ServerFrame, ServerKind, ServerMessage};
use super::registry::{MemoryRegistry, Registry};
use super::router::Router;
use super::wire::{close_code_allowed, Frame, FrameReader, OpCode, Outgoing, ReadError};
use crate::limits::{IpRefusal, PerIpLimits, SessionRates};
use crate::shutdown::Shutdown;

/// The signaling core as sessions use it: a router over session outboxes (by default a single
/// node's: memory registry, no bus).
pub type SessionHub<R = MemoryRegistry, B = NoBus> = Router<R, B, OutboxSender>;

/// A boxed, sendable future (what [`SessionRunner`] hands out).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Runs sessions whatever the node's registry and bus are, so the HTTP layer and the server hold one
/// type (`Arc<dyn SessionRunner>`) for a single node and for a cluster node alike.
pub trait SessionRunner: Send + Sync + std::fmt::Debug + 'static {
    /// Runs one upgraded connection to its end in a task of its own (see [`Sessions::run`]),
    /// holding `hold` (the HTTP connection's slots under its caps) until then.
    ///
    /// The task is spawned here, where the session future's type is known, so it is one
    /// allocation for the connection's life: a future boxed for the caller and awaited in the
    /// caller's task cost a second one (≈ 350 B per idle connection).
    fn spawn(
        self: Arc<Self>,
        io: Stream,
        ip: IpAddr,
        joining: Joining,
        ice: Option<IceServersFor>,
        shutdown: Shutdown,
        hold: Arc<dyn std::any::Any + Send + Sync>,
    );

    /// Ends the reservations due at `now`; returns the next deadline (see [`Router::expire`]).
    fn expire(&self, now: Instant) -> BoxFuture<'_, Option<Instant>>;

    /// How long a dropped connection's ID stays reserved.
    fn resume_grace(&self) -> Duration;
}

impl<R: Registry, B: Bus> SessionRunner for Sessions<R, B> {
    fn spawn(
        self: Arc<Self>,
        io: Stream,
        ip: IpAddr,
        joining: Joining,
        ice: Option<IceServersFor>,
        shutdown: Shutdown,
        hold: Arc<dyn std::any::Any + Send + Sync>,
    ) {
        // The future itself is the task: wrapped in an `async` block that awaits it and then
        // drops `hold`, the block's copies of the arguments would stay in the task too (+152 B).
        tokio::spawn(self.run(io, ip, joining, ice, shutdown, hold));
    }

    fn expire(&self, now: Instant) -> BoxFuture<'_, Option<Instant>> {
        Box::pin(self.hub.expire(now))
    }

    fn resume_grace(&self) -> Duration {
        self.hub.limits().resume_grace
    }
}

/// Session-level settings: the config's `signaling.session` section.
#[derive(Debug, Clone)]
pub struct SessionSettings {
    /// Largest message accepted, counted over all fragments. Default 64 KiB.
    pub max_message_bytes: usize,
    /// Frames waiting for a client before it counts as too slow and is disconnected. Default 128.
    pub outbox_frames: usize,
    /// Bytes waiting for a client before it counts as too slow and is disconnected. Default 1 MiB.
    pub outbox_bytes: usize,
    /// Bytes waiting over all clients; once spent, a client with more than 64 KiB waiting counts
    /// as too slow. Default 256 MiB.
    pub outbox_bytes_total: usize,
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
}

impl Default for SessionSettings {
    fn default() -> Self {
        let n = |v| std::num::NonZeroU32::new(v).expect("non-zero default");
        SessionSettings {
            max_message_bytes: 64 * 1024,
            outbox_frames: 128,
            outbox_bytes: 1024 * 1024,
            outbox_bytes_total: 256 * 1024 * 1024,
            write_timeout: Duration::from_secs(10),
            heartbeat_interval: super::HEARTBEAT_INTERVAL,
            missed_pongs: 2,
            messages_per_second: n(20),
            message_burst: n(60),
            calls_per_minute: n(10),
        }
    }
}

/// Runs upgraded WebSockets as signaling sessions over a node's registry `R` and bus `B`.
pub struct Sessions<R = MemoryRegistry, B = NoBus> {
    /// The call rules and routing table.
    hub: Arc<SessionHub<R, B>>,
    /// Sizes, rates, heartbeat.
    settings: SessionSettings,
    /// The per-address cap on open sockets.
    per_ip: Arc<PerIpLimits>,
    /// Told about opens, closes, messages and limits (metrics).
    observer: Arc<dyn SessionObserver>,
    /// The byte budget over every session's outbox.
    outbox_budget: Arc<OutboxBudget>,
}

impl<R, B> std::fmt::Debug for Sessions<R, B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sessions")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl<R: Registry, B: Bus> Sessions<R, B> {
    /// Sessions over `hub`, reporting to `observer`.
    pub fn new(
        hub: Arc<SessionHub<R, B>>,
        settings: SessionSettings,
        per_ip: Arc<PerIpLimits>,
        observer: Arc<dyn SessionObserver>,
    ) -> Arc<Self> {
        Arc::new(Sessions {
            hub,
            outbox_budget: OutboxBudget::new(settings.outbox_bytes_total),
            settings,
            per_ip,
            observer,
        })
    }

    /// The router, for the expiry task and tests.
    pub fn hub(&self) -> &Arc<SessionHub<R, B>> {
        &self.hub
    }

    fn observe(&self, event: SessionEvent) {
        self.observer.session_event(event);
    }

    /// One session, from the completed upgrade to the closed socket: `io` is the upgraded
    /// connection from `ip`, `ice` makes the ICE servers for its `id` messages, and `_hold`
    /// (the HTTP connection's slots under its caps) is let go of when the session ends.
    pub async fn run(
        self: Arc<Self>,
        mut io: Stream,
        ip: IpAddr,
        joining: Joining,
        ice: Option<IceServersFor>,
        mut shutdown: Shutdown,
        _hold: Arc<dyn std::any::Any + Send + Sync>,
    ) {
        self.observe(SessionEvent::Opened);
        let mut link = Link {
            reader: FrameReader::new(self.settings.max_message_bytes),
            out: Outgoing::default(),
        };

        // Too many sockets from one address: say so, then close.
        let _ip_slot = match self.per_ip.open(ip) {
            Ok(slot) => slot,
            Err(IpRefusal::TooManyOpen | IpRefusal::UpgradeRate) => {
                self.observe(SessionEvent::Limited(SessionLimit::ConnectionsPerIp));
                self.observe(SessionEvent::Error(ErrorCode::TooManyConnections));
                self.observe(SessionEvent::Closed(CloseReason::Refused));
                link.out
                    .push(OpCode::Text, &error_frame(ErrorCode::TooManyConnections));
                let close = (
                    CloseCode::PolicyViolation.as_u16(),
                    "too many connections from your address",
                );
                self.close_and_linger(&mut io, &mut link, close).await;
                return;
            }
        };

        let (outbox, mut outbox_rx) = outbox::bounded(OutboxLimits {
            frames: self.settings.outbox_frames,
            bytes: self.settings.outbox_bytes,
            budget: Some(self.outbox_budget.clone()),
        });
        let attachment = match self.hub.join(outbox, ice, joining, Instant::now()).await {
            Ok(attachment) => attachment,
            Err(e) => {
                if e.code() == ErrorCode::ServerFull {
                    self.observe(SessionEvent::Limited(SessionLimit::ServerFull));
                }
                self.observe(SessionEvent::Error(e.code()));
                self.observe(SessionEvent::Closed(CloseReason::Refused));
                link.out.push(OpCode::Text, &e.frame());
                let close = (e.close_code().as_u16(), "cannot join");
                self.close_and_linger(&mut io, &mut link, close).await;
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

        let end = self
            .serve(
                &mut io,
                &mut link,
                &mut session,
                &mut outbox_rx,
                &mut shutdown,
            )
            .await;
        self.observe(SessionEvent::Closed(end.reason));
        self.hub
            .disconnect(session.attachment, end.departure, Instant::now())
            .await;
        match end.close {
            Closing::Silent => {}
            Closing::Reply(code) => {
                link.out.push_close(code, "");
                let _ = link.out.send(&mut io, self.settings.write_timeout).await;
            }
            Closing::Send(code, reason) => {
                self.close_and_linger(&mut io, &mut link, (code, reason))
                    .await;
            }
        }
    }

    /// Runs an attached session until it ends: reads frames, writes what the hub queues, pings.
    ///
    /// One task does it all. Every source is polled in one `poll_fn` (rather than `select!`, which
    /// would rebuild its futures per message): the pending write or, when nothing is pending, the
    /// outbox; then the socket, unless too much output is stuck (a client that does not read is
    /// not read either); then shutdown; then the one timer, which serves the heartbeat and the
    /// write timeout.
    async fn serve(
        &self,
        io: &mut Stream,
        link: &mut Link,
        session: &mut ReadState,
        outbox: &mut OutboxReceiver,
        shutdown: &mut Shutdown,
    ) -> End {
        let settings = &self.settings;
        let Link { reader, out } = link;
        let mut unanswered = 0u32;
        // Set when the hub told this connection another one resumed its ID.
        let mut replaced = false;
        let mut next_ping = tokio::time::Instant::now() + settings.heartbeat_interval;
        let mut write_deadline: Option<tokio::time::Instant> = None;
        let timer = tokio::time::sleep_until(next_ping);
        let shutdown_signal = shutdown.recv();
        tokio::pin!(timer, shutdown_signal);
        loop {
            let event = poll_fn(|cx| {
                if out.pending() > 0 {
                    match out.poll_send(io, cx) {
                        Poll::Ready(result) => return Poll::Ready(Event::Sent(result)),
                        Poll::Pending if write_deadline.is_none() => {
                            let deadline = tokio::time::Instant::now() + settings.write_timeout;
                            write_deadline = Some(deadline);
                            if deadline < timer.deadline() {
                                timer.as_mut().reset(deadline);
                            }
                        }
                        Poll::Pending => {}
                    }
                } else if let Poll::Ready(next) = outbox.poll_recv(cx) {
                    return Poll::Ready(Event::Outbox(next));
                }
                if out.pending() < STOP_READING_AT {
                    if let Poll::Ready(frame) = reader.poll_frame(io, cx) {
                        return Poll::Ready(Event::Frame(frame));
                    }
                }
                // Polled after the busy sources (polling it costs more than a message's
                // routing); tokio's cooperative budget makes a busy socket yield to it.
                if shutdown_signal.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Event::Shutdown);
                }
                if timer.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Event::Timer);
                }
                Poll::Pending
            })
            .await;
            match event {
                Event::Shutdown => {
                    return End::send(
                        CloseReason::Shutdown,
                        CloseCode::GoingAway,
                        "server restarting; reconnect and resume",
                    );
                }
                Event::Sent(Ok(())) => write_deadline = None,
                Event::Sent(Err(e)) => {
                    tracing::debug!("WebSocket write failed: {e}");
                    return End::silent(CloseReason::Client);
                }
                Event::Outbox(Some(frame)) => {
                    // Everything already queued goes out in one write (one TLS record, one
                    // system call) when a client is sent several frames at once.
                    let mut next = Some(frame);
                    while let Some(frame) = next {
                        self.observe(SessionEvent::Sent(frame.kind));
                        replaced |= frame.kind == ServerKind::Error(ErrorCode::SessionReplaced);
                        out.push(OpCode::Text, &frame.bytes);
                        next = match out.pending() < WRITE_BATCH {
                            true => outbox.try_recv(),
                            false => None,
                        };
                    }
                }
                // The hub dropped the outbox: another connection resumed this ID, or the queue
                // overflowed because the client does not read.
                Event::Outbox(None) if replaced => {
                    return End::send(
                        CloseReason::Replaced,
                        CloseCode::PolicyViolation,
                        "another connection resumed this ID",
                    );
                }
                Event::Outbox(None) => {
                    self.observe(SessionEvent::OutboxOverflow);
                    return End::send(
                        CloseReason::SlowClient,
                        CloseCode::PolicyViolation,
                        "too slow: outbound queue full",
                    );
                }
                Event::Frame(frame) => {
                    let end = match frame {
                        Ok(frame) => {
                            unanswered = 0;
                            self.on_frame(session, frame, out).await
                        }
                        Err(e) => Some(self.on_read_error(session, e).await),
                    };
                    if let Some(end) = end {
                        if let Closing::Send(..) = end.close {
                            // What the hub queued before the close (typically the error that
                            // explains it) goes out first.
                            while let Some(frame) = outbox.try_recv() {
                                self.observe(SessionEvent::Sent(frame.kind));
                                out.push(OpCode::Text, &frame.bytes);
                            }
                        }
                        return end;
                    }
                }
                Event::Timer => {
                    let now = tokio::time::Instant::now();
                    if write_deadline.is_some_and(|deadline| deadline <= now) {
                        tracing::debug!("WebSocket write timed out: client not reading");
                        self.observe(SessionEvent::OutboxOverflow);
                        return End::silent(CloseReason::SlowClient);
                    }
                    if next_ping <= now {
                        if unanswered >= settings.missed_pongs {
                            tracing::debug!("heartbeat timeout");
                            self.observe(SessionEvent::HeartbeatTimeout);
                            return End::send(
                                CloseReason::HeartbeatTimeout,
                                CloseCode::GoingAway,
                                "heartbeat timeout",
                            );
                        }
                        unanswered += 1;
                        out.push(OpCode::Ping, b"hb");
                        next_ping = now + settings.heartbeat_interval;
                    }
                    let wake = write_deadline.map_or(next_ping, |d| d.min(next_ping));
                    timer.as_mut().reset(wake);
                }
            }
        }
    }

    /// Handles one frame from the client; returns how the session ends, if it does.
    async fn on_frame(
        &self,
        session: &mut ReadState,
        frame: Frame,
        out: &mut Outgoing,
    ) -> Option<End> {
        let max = self.settings.max_message_bytes;
        let Frame {
            fin,
            opcode,
            payload,
        } = frame;
        let message = match (opcode, fin, session.partial.as_mut()) {
            (OpCode::Close, _, _) => return Some(on_close(&payload)),
            // Control frames count against the message rate like text does: browsers never send
            // pings (and answer the server's with one pong each), so only a flood is refused.
            (OpCode::Ping | OpCode::Pong, _, _) => {
                if session.rates.messages.check().is_err() {
                    self.observe(SessionEvent::Limited(SessionLimit::Messages));
                    return self.reject(session, ErrorCode::RateLimited).await;
                }
                if opcode == OpCode::Ping {
                    out.push(OpCode::Pong, &payload);
                }
                return None;
            }
            (OpCode::Text | OpCode::Binary, _, Some(_)) => {
                return Some(End::protocol("new message inside a fragmented one"));
            }
            (OpCode::Continuation, _, None) => {
                return Some(End::protocol("continuation without a message"));
            }
            (OpCode::Continuation, fin, Some(partial)) => {
                if partial.bytes.len() + payload.len() > max {
                    return Some(self.too_large(session).await);
                }
                partial.bytes.extend_from_slice(&payload);
                if !fin {
                    return None;
                }
                let partial = session.partial.take().expect("matched Some");
                if partial.binary {
                    return self.reject(session, ErrorCode::BinaryNotSupported).await;
                }
                partial.bytes
            }
            (opcode @ (OpCode::Text | OpCode::Binary), false, None) => {
                session.partial = Some(Partial {
                    binary: opcode == OpCode::Binary,
                    bytes: payload,
                });
                return None;
            }
            (OpCode::Binary, true, None) => {
                return self.reject(session, ErrorCode::BinaryNotSupported).await;
            }
            (OpCode::Text, true, None) => payload,
        };
        // Checked once the message is whole: a character may span fragments. (simdutf8: std's
        // check was 5% of the instructions spent on a 3 KB message.)
        if simdutf8::basic::from_utf8(&message).is_err() {
            return Some(End::send(
                CloseReason::Policy,
                CloseCode::InvalidPayload,
                "text message is not UTF-8",
            ));
        }
        self.on_text(session, &message).await
    }

    /// Ends the session after a failed read.
    async fn on_read_error(&self, session: &mut ReadState, error: ReadError) -> End {
        match error {
            ReadError::Io(_) | ReadError::Ended => {
                tracing::debug!("WebSocket read ended: {error}");
                End::silent(CloseReason::Client)
            }
            ReadError::Protocol(reason) => End::protocol(reason),
            ReadError::TooLarge(_) => self.too_large(session).await,
        }
    }

    /// Refuses a message over the size limit: an error, then close 1009.
    async fn too_large(&self, session: &mut ReadState) -> End {
        let _ = self.reject(session, ErrorCode::MessageTooLarge).await;
        End::send(
            CloseReason::TooBig,
            CloseCode::MessageTooBig,
            "message too large",
        )
    }

    /// Applies the per-connection rates, then hands the message (valid UTF-8) to the hub.
    async fn on_text(&self, session: &mut ReadState, message: &[u8]) -> Option<End> {
        if session.rates.messages.check().is_err() {
            self.observe(SessionEvent::Limited(SessionLimit::Messages));
            return self.reject(session, ErrorCode::RateLimited).await;
        }
        if starts_a_call(message) && session.rates.calls.check().is_err() {
            self.observe(SessionEvent::Limited(SessionLimit::Calls));
            return self.reject(session, ErrorCode::TooManyCalls).await;
        }
        let outcome = self
            .hub
            .handle_text(&mut session.attachment, message, Instant::now())
            .await;
        self.observe(SessionEvent::Handled {
            kind: outcome.received,
            error: outcome.error,
        });
        outcome.close.map(End::violations)
    }

    /// Answers a message the session refused itself; the hub counts it and may ask for a close.
    async fn reject(&self, session: &mut ReadState, code: ErrorCode) -> Option<End> {
        self.observe(SessionEvent::Error(code));
        let outcome = self
            .hub
            .reject(&mut session.attachment, code, Instant::now())
            .await;
        outcome.close.map(End::violations)
    }

    /// Sends what is queued and a close frame, then reads (and discards) what the client still
    /// sends until its own close frame arrives or it goes away, for at most [`CLOSE_LINGER`].
    ///
    /// Closing the socket with unread data in it would reset the connection, and the client would
    /// lose the error and the close frame just sent (after an oversized frame, or in a flood).
    async fn close_and_linger(&self, io: &mut Stream, link: &mut Link, close: (u16, &str)) {
        link.out.push_close(close.0, close.1);
        if link
            .out
            .send(io, self.settings.write_timeout)
            .await
            .is_err()
        {
            return;
        }
        let until_close = poll_fn(|cx| loop {
            match ready!(link.reader.poll_frame(io, cx)) {
                Ok(frame) if frame.opcode == OpCode::Close => return Poll::Ready(()),
                Ok(_) | Err(ReadError::TooLarge(_)) => continue,
                Err(_) => return Poll::Ready(()),
            }
        });
        let _ = tokio::time::timeout(CLOSE_LINGER, until_close).await;
    }
}

/// The stream of an upgraded connection (TLS inside).
pub type Stream = hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>;

/// A session's framing state: what is half read and what is not yet written.
struct Link {
    /// Incoming frames.
    reader: FrameReader,
    /// Encoded outgoing frames.
    out: Outgoing,
}

/// What woke the session.
enum Event {
    /// The server is shutting down.
    Shutdown,
    /// The pending output was written (or could not be).
    Sent(std::io::Result<()>),
    /// The router queued a frame; `None` once it dropped the outbox.
    Outbox(Option<ServerFrame>),
    /// A frame arrived (or the read failed).
    Frame(Result<Frame, ReadError>),
    /// The heartbeat or the write timeout is due.
    Timer,
}

/// How a session ended.
#[derive(Debug, Clone, Copy)]
struct End {
    /// The reason counted in the metrics.
    reason: CloseReason,
    /// Whether the ID is freed now or kept for a resume.
    departure: Departure,
    /// The close frame the server sends.
    close: Closing,
}

/// The server's part of the closing handshake.
#[derive(Debug, Clone, Copy)]
enum Closing {
    /// None: the connection is gone or cannot be written to.
    Silent,
    /// The client closed; answer with this code.
    Reply(u16),
    /// The server closes with this code and reason, and waits for the client's answer.
    Send(u16, &'static str),
}

impl End {
    /// The server closes the connection; the ID stays reserved for a resume.
    fn send(reason: CloseReason, code: CloseCode, why: &'static str) -> End {
        End {
            reason,
            departure: Departure::Dropped,
            close: Closing::Send(code.as_u16(), why),
        }
    }

    /// The connection is gone (or unwritable); the ID stays reserved for a resume.
    fn silent(reason: CloseReason) -> End {
        End {
            reason,
            departure: Departure::Dropped,
            close: Closing::Silent,
        }
    }

    /// The client broke the framing rules: close 1002.
    fn protocol(why: &'static str) -> End {
        End::send(CloseReason::Policy, CloseCode::ProtocolError, why)
    }

    /// The hub asks for a close after repeated violations.
    fn violations(code: CloseCode) -> End {
        let reason = match code {
            CloseCode::MessageTooBig => CloseReason::TooBig,
            _ => CloseReason::Policy,
        };
        End::send(reason, code, "closing after repeated violations")
    }
}

/// Answers the client's close frame. 1000 (normal closure) means the client leaves for good;
/// anything else, 1001 from a reloading tab included, may want to resume.
fn on_close(payload: &[u8]) -> End {
    let code = match payload {
        [] => None,
        [_] => return End::protocol("close frame with a one-byte payload"),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            if !close_code_allowed(code) {
                return End::protocol("close code not allowed");
            }
            if std::str::from_utf8(reason).is_err() {
                return End::send(
                    CloseReason::Policy,
                    CloseCode::InvalidPayload,
                    "close reason is not UTF-8",
                );
            }
            Some(code)
        }
    };
    End {
        reason: CloseReason::Client,
        departure: match code {
            Some(1000) | None => Departure::Left,
            Some(_) => Departure::Dropped,
        },
        close: Closing::Reply(code.unwrap_or(1000)),
    }
}

/// Queued outbox frames are gathered into one write up to this many bytes.
const WRITE_BATCH: usize = 64 * 1024;

/// With this much output not taken by the client, its frames are not read until it catches up.
const STOP_READING_AT: usize = 64 * 1024;

/// How long a connection the server is closing may keep sending before the socket is dropped.
const CLOSE_LINGER: Duration = Duration::from_secs(1);

/// Whether a text message is a `video-offer-request`, cheaply and without a full parse: the
/// per-minute call limit must apply before the hub does any work on it.
fn starts_a_call(message: &[u8]) -> bool {
    // A vectorised substring search: the naive `windows().any()` compared every offset and was the
    // hottest function in a relay profile (7% of server CPU with 3 KB SDPs). The searcher is built
    // once: `memmem::find` built it on every call, ≈ 800 of a message's ≈ 57k instructions.
    static FINDER: LazyLock<memmem::Finder<'static>> =
        LazyLock::new(|| memmem::Finder::new(b"\"video-offer-request\""));
    FINDER.find(message).is_some()
}

/// A session-level error as a ready-to-send text frame.
fn error_frame(code: ErrorCode) -> Bytes {
    ServerMessage::Error {
        code,
        message: code.describe(),
        request: None,
    }
    .encode()
}

/// What the session keeps between frames.
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
    bytes: Vec<u8>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the future `make` returns, without making one.
    fn future_size<A, F: Future, M: FnOnce(A) -> F>(_make: M) -> usize {
        std::mem::size_of::<F>()
    }

    /// An idle connection holds its session's task for its whole life, and the task is as
    /// large as the session future. It is spawned as is (`SessionRunner::spawn`): boxed and
    /// awaited inside the upgrade's task it cost a 384 B task more, and wrapped in an `async`
    /// block another 120 B of moved-out arguments (dhat and this size, release build).
    #[test]
    fn a_session_task_is_the_session_future_and_small() {
        type Args = (
            Arc<Sessions>,
            Stream,
            IpAddr,
            Joining,
            Option<IceServersFor>,
            Shutdown,
            Arc<dyn std::any::Any + Send + Sync>,
        );
        let size = future_size(|(sessions, io, ip, joining, ice, shutdown, hold): Args| {
            sessions.run(io, ip, joining, ice, shutdown, hold)
        });
        assert!(size <= 1_536, "a session's future is {size} B");
    }
}
