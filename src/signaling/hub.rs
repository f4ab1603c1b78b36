//! The signaling rules: who may send what to whom, how calls move from idle to calling to in-call
//! and back, and how a dropped connection resumes.
//!
//! The hub does no I/O, reads no clock and pushes into no queue. Given one text frame and the
//! current [`Instant`], it checks the frame, asks the [`Registry`] for the one atomic change the
//! message needs, and returns [`Effects`]: deliver this envelope to that ID, reply to the sender,
//! acknowledge, take over a resumed ID, close. The [`Router`](super::router::Router) applies them
//! (local IDs through [`super::connections`], others through [`super::bus`]), which is also what
//! the session layer calls.
//!
//! Everything here is short: no lock is held across a call out of this module, and a forwarded
//! message is parsed once and serialised once. With the [`MemoryRegistry`] every `.await` is
//! ready at once.
//!
//! # Driving the hub through a router
//!
//! ```
//! use std::time::Instant;
//! use callgate::signaling::SignalingLimits;
//! use callgate::signaling::hub::Departure;
//! use callgate::signaling::protocol::ServerKind;
//! use callgate::signaling::router::Router;
//!
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! let router = Router::single_node(SignalingLimits::default());
//!
//! // On upgrade: the router keeps the only sender; the session task writes what `rx` yields.
//! let (tx, mut rx) = callgate::signaling::outbox::channel(128);
//! let mut conn = router.connect(tx, None, Instant::now()).await.expect("room for one more");
//! assert!(rx.try_recv().unwrap().bytes.starts_with(br#"{"type":"id","id":"#));
//!
//! // For each text frame (after the session's own size and rate checks):
//! let outcome = router.handle_text(&mut conn, br#"{"type":"ping"}"#, Instant::now()).await;
//! assert_eq!(outcome.close, None); // otherwise: flush `rx`, then close with that code
//! let pong = rx.try_recv().unwrap();
//! assert_eq!(pong.kind, ServerKind::Pong); // typed: nobody reads the bytes to learn this
//! assert_eq!(&pong.bytes[..], br#"{"type":"pong"}"#);
//!
//! // When the socket ends without a close frame 1000 from the client:
//! router.disconnect(conn, Departure::Dropped, Instant::now()).await;
//! // `rx` now reports closed; a timer task calls `router.expire(Instant::now())` and sleeps until
//! // the deadline it returns.
//! assert!(rx.is_closed());
//! # });
//! ```
//!
//! The session layer must also close the connection when `rx` reports closed while the socket is
//! still up: that is how a reader too slow to keep its queue from filling is disconnected, and a
//! connection whose ID another connection resumed. Give each queue room for at least
//! [`SignalingLimits::resume_queue_messages`] + 1 frames so a resume's backlog fits.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use serde_json::value::RawValue;
use smallvec::SmallVec;

use super::delivery::{AckBeyond, Envelope, Origin};
use super::protocol::{
    self, ClientId, ClientMessage, CloseCode, DropReason, EndReason, ErrorCode, MessageKind,
    ProtocolError, ResumeToken, ServerFrame, ServerMessage,
};
use super::registry::{
    Binding, CallState, Freed, MemoryRegistry, NodeId, RegisterError, Registry, ResumeError, Stale,
    Takeover, Transition, TransitionError,
};
use super::SignalingLimits;

/// The signaling rules over a registry (shared by every session through the router).
pub struct Hub<R = MemoryRegistry> {
    /// Where IDs, tokens, epochs and call states live.
    registry: R,
    /// This node, for claims and resumes.
    node: NodeId,
    /// The knobs, read on every message.
    limits: SignalingLimits,
    /// Told about every call's start, answer and end (metrics); `None` in most tests.
    observer: Option<Arc<dyn CallObserver>>,
}

/// One thing the hub decided must happen; the router does it.
#[derive(Debug)]
pub enum Effect {
    /// Deliver to an ID wherever it is held. If it cannot be delivered or held, the envelope's
    /// origin (if any) is told with `undelivered`.
    Deliver {
        /// The recipient.
        to: ClientId,
        /// The message.
        envelope: Envelope,
    },
    /// Queue for the connection itself; if it cannot take it, the connection must close.
    Reply(Envelope),
    /// The connection acknowledged everything up to `seq`; an ack beyond what was sent is refused
    /// through [`Hub::refuse_ack`].
    Ack {
        /// The acknowledged sequence number.
        seq: u64,
    },
    /// The connection resumed another ID: move its queue there, kick a live holder, send the `id`
    /// message (made with [`id_frame`]) and replay what is held. Boxed: rare, and large next to a
    /// delivery.
    TakeOver(Box<Resumption>),
}

/// What the router needs to carry out a resume.
#[derive(Debug)]
pub struct Resumption {
    /// The connection's binding before the resume (its own ID, now freed).
    pub from: Binding,
    /// What the registry did.
    pub takeover: Takeover,
    /// The last sequence number the client says it processed.
    pub last_seq: Option<u64>,
    /// The ICE servers for the resumed ID, for the `id` message.
    pub ice_servers: Option<Box<RawValue>>,
}

/// Everything a hub call decided: effects in order, and what the session must know.
#[derive(Debug, Default)]
#[must_use]
pub struct Effects {
    /// What to do, in order.
    pub list: SmallVec<[Effect; 2]>,
    /// Close the connection, counts and the message type (the router adds what delivery found).
    pub outcome: Outcome,
}

impl Effects {
    fn push(&mut self, effect: Effect) {
        self.list.push(effect);
    }
}

/// A step in a call's life, reported to the [`CallObserver`] with the time it happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallEvent {
    /// `caller` sent an offer that was delivered towards `callee`.
    Offered {
        /// Who called.
        caller: ClientId,
        /// Who is being called.
        callee: ClientId,
    },
    /// `callee` accepted `caller`'s call.
    Answered {
        /// Who called.
        caller: ClientId,
        /// Who answered.
        callee: ClientId,
    },
    /// `callee` declined `caller`'s call.
    Declined {
        /// Who called.
        caller: ClientId,
        /// Who declined.
        callee: ClientId,
    },
    /// The call between `by` and `peer` ended (hang-up, cancel, leave, or `by` did not resume).
    Ended {
        /// The side that ended it or went away.
        by: ClientId,
        /// The other side.
        peer: ClientId,
        /// Why.
        reason: EndReason,
    },
}

/// Receives call lifecycle events, for metrics. Called synchronously from the hub: keep it cheap
/// and never block.
pub trait CallObserver: Send + Sync {
    /// One call event at `now`.
    fn call_event(&self, event: CallEvent, now: Instant);
}

/// One WebSocket connection's standing with the hub. The session layer owns it and passes it to
/// every hub call; it is the connection's state that does not need to be shared.
pub struct Attachment {
    /// The ID this connection holds (it changes on a successful resume).
    binding: Binding,
    /// Rule violations so far; at [`SignalingLimits::max_violations`] the hub asks for a close.
    violations: u32,
    /// Failed resumes so far; at [`SignalingLimits::max_resume_failures`] the hub asks for a close,
    /// so one connection cannot guess tokens.
    resume_failures: u32,
    /// Makes the ICE servers (with TURN credentials tied to the ID) for the `id` message, at
    /// connect and again after a resume, so credentials are fresh and name the resumed ID.
    ice_servers: Option<IceServersFor>,
}

/// Produces the `iceServers` JSON for a client ID (TURN credentials are tied to the ID).
pub type IceServersFor = Arc<dyn Fn(ClientId) -> Option<Box<RawValue>> + Send + Sync>;

impl Attachment {
    /// The ID this connection currently holds.
    pub fn id(&self) -> ClientId {
        self.binding.id
    }

    /// Which holder of its ID this connection is.
    pub fn binding(&self) -> Binding {
        self.binding
    }
}

impl std::fmt::Debug for Attachment {
    /// Leaves out the ICE servers: they carry TURN credentials, which must not reach logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attachment")
            .field("binding", &self.binding)
            .field("violations", &self.violations)
            .field("resume_failures", &self.resume_failures)
            .finish_non_exhaustive()
    }
}

/// What the session layer must do after a hub call, beyond what the hub already queued.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[must_use]
pub struct Outcome {
    /// Close this connection with this code after flushing its queue.
    pub close: Option<CloseCode>,
    /// The error sent back to this connection, if any (for metrics).
    pub error: Option<ErrorCode>,
    /// The type of the message handled, when it parsed (for metrics).
    pub received: Option<MessageKind>,
    /// A peer whose outbox was full: the hub detached it (dropped its outbox, so its session sees
    /// the channel close) and keeps its ID reserved for a resume. For metrics and logs.
    pub detached_peer: Option<ClientId>,
}

/// How a connection ended, as seen by the session layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Departure {
    /// The socket broke, timed out or the server is shutting down: keep the ID reserved for
    /// [`SignalingLimits::resume_grace`] so the client can resume.
    Dropped,
    /// The client said goodbye: it sent a close frame with 1000. Free the ID now and tell the call
    /// peer at once. (Browsers send 1001 when a page unloads; treat that as `Dropped`, so a reload
    /// that kept its token can resume.)
    Left,
}

/// Why a new connection could not join.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct ConnectError(#[from] RegisterError);

impl ConnectError {
    /// The wire code to send before closing.
    pub fn code(&self) -> ErrorCode {
        match self.0 {
            RegisterError::Full | RegisterError::NoFreeId => ErrorCode::ServerFull,
            RegisterError::Unavailable => ErrorCode::ClusterUnavailable,
            _ => ErrorCode::InternalError,
        }
    }

    /// The close code to use.
    pub fn close_code(&self) -> CloseCode {
        match self.0 {
            RegisterError::Full | RegisterError::NoFreeId | RegisterError::Unavailable => {
                CloseCode::TryAgainLater
            }
            _ => CloseCode::InternalError,
        }
    }

    /// The `error` frame to send before closing.
    pub fn frame(&self) -> Bytes {
        let code = self.code();
        ServerMessage::Error {
            code,
            message: code.describe(),
            request: None,
        }
        .encode()
    }
}

/// Why the hub refused a message; sent to the client as `{"type":"error",...}`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RuleError {
    /// The frame could not be read.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// The message claims another ID than the connection's.
    #[error("This connection's ID is {own}, but the message says it is {claimed}.")]
    IdMismatch {
        /// The connection's ID.
        own: ClientId,
        /// The `id` in the message.
        claimed: ClientId,
    },
    /// Nobody holds the called ID.
    #[error("Nobody with ID {0} is connected.")]
    UnknownClient(ClientId),
    /// A client called itself.
    #[error("You cannot call your own ID.")]
    CannotCallSelf,
    /// A new call while one is already going.
    #[error("You are already {state} with {peer}; hang up first.")]
    AlreadyInCall {
        /// The current call's peer.
        peer: ClientId,
        /// The current call's phase, in words.
        state: &'static str,
    },
    /// The message addresses someone the sender has no call with.
    #[error("You have no call with {0}.")]
    NotInCall(ClientId),
    /// The message does not fit the call's phase.
    #[error("Your call with {peer} is {state}, so a \"{kind}\" message is not allowed now.", kind = kind.as_str())]
    WrongCallState {
        /// The call's peer.
        peer: ClientId,
        /// The call's phase, in words.
        state: &'static str,
        /// The message type.
        kind: MessageKind,
    },
    /// An `ack` named a sequence number the server never sent.
    #[error(transparent)]
    AckBeyond(#[from] AckBeyond),
    /// Wrong token, unknown or expired ID — deliberately one answer for all three.
    #[error("ID {0} cannot be resumed: it is unknown or expired, or the token is wrong.")]
    ResumeFailed(ClientId),
    /// A connection in a call tried to resume another ID.
    #[error("Hang up your current call before resuming another ID.")]
    ResumeNotAllowed,
    /// The connection lost its ID (taken over, or detached for reading too slowly).
    #[error(transparent)]
    Stale(#[from] Stale),
    /// The cluster's shared registry cannot be reached; nothing changed.
    #[error("The cluster cannot be reached right now; nothing was done. Try again shortly.")]
    ClusterUnavailable,
}

impl RuleError {
    /// The wire code for this refusal.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Protocol(e) => e.code(),
            Self::IdMismatch { .. } => ErrorCode::IdMismatch,
            Self::UnknownClient(_) => ErrorCode::UnknownClient,
            Self::CannotCallSelf => ErrorCode::CannotCallSelf,
            Self::AlreadyInCall { .. } => ErrorCode::AlreadyInCall,
            Self::NotInCall(_) => ErrorCode::NotInCall,
            Self::WrongCallState { .. } => ErrorCode::WrongCallState,
            Self::AckBeyond(_) => ErrorCode::InvalidField,
            Self::ResumeFailed(_) => ErrorCode::ResumeFailed,
            Self::ResumeNotAllowed => ErrorCode::ResumeNotAllowed,
            Self::Stale(_) => ErrorCode::SessionReplaced,
            Self::ClusterUnavailable => ErrorCode::ClusterUnavailable,
        }
    }
}

impl Hub<MemoryRegistry> {
    /// A hub for a node that runs alone, over a fresh [`MemoryRegistry`].
    pub fn single_node(limits: SignalingLimits) -> Self {
        Self::new(MemoryRegistry::new(&limits), NodeId::local(), limits)
    }
}

impl<R: Registry> Hub<R> {
    /// A hub over `registry` for the node `node`, enforcing `limits`.
    pub fn new(registry: R, node: NodeId, limits: SignalingLimits) -> Self {
        Self {
            registry,
            node,
            limits,
            observer: None,
        }
    }

    /// Reports call events to `observer` from now on.
    pub fn with_observer(mut self, observer: Arc<dyn CallObserver>) -> Self {
        self.observer = Some(observer);
        self
    }

    /// Reports a call event to the observer. The hub reports what it decides itself; a cluster
    /// node also reports what its clients learn from another node (their call was answered,
    /// declined or ended there), so call metrics can be counted on the caller's node only.
    pub fn observe(&self, event: CallEvent, now: Instant) {
        if let Some(observer) = &self.observer {
            observer.call_event(event, now);
        }
    }

    /// The registry, for the router and tests.
    pub fn registry(&self) -> &R {
        &self.registry
    }

    /// This node.
    pub fn node(&self) -> &NodeId {
        &self.node
    }

    /// The limits this hub enforces.
    pub fn limits(&self) -> &SignalingLimits {
        &self.limits
    }

    /// Claims a fresh ID and token for a new connection; returns its attachment and its `id`
    /// message (with `ice_servers(id)`, opaque JSON such as
    /// `[{"urls":"turn:..","username":..,"credential":..}]`).
    pub async fn connect(
        &self,
        ice_servers: Option<IceServersFor>,
        now: Instant,
    ) -> Result<(Attachment, ServerFrame), ConnectError> {
        let claim = self.registry.claim(&self.node, now).await?;
        let ice = ice_servers.as_ref().and_then(|make| make(claim.binding.id));
        let hello = id_frame(
            claim.binding.id,
            &claim.token,
            false,
            None,
            self.limits.heartbeat_interval,
            ice.as_deref(),
        );
        let conn = Attachment {
            binding: claim.binding,
            violations: 0,
            resume_failures: 0,
            ice_servers,
        };
        Ok((conn, hello))
    }

    /// Handles one text frame from `conn`. Every refusal is answered with an `error` frame to the
    /// connection itself; the connection stays open unless the outcome's `close` says otherwise.
    pub async fn handle_text(&self, conn: &mut Attachment, frame: &[u8], now: Instant) -> Effects {
        let inbound = match protocol::parse(frame, self.limits.max_nesting_depth) {
            Ok(inbound) => inbound,
            Err(e) => return self.refuse(conn, &e.into(), None),
        };
        let kind = inbound.message.kind();
        let mut effects = Effects {
            list: SmallVec::new(),
            outcome: Outcome {
                received: Some(kind),
                ..Outcome::default()
            },
        };
        let result = match inbound.claimed_id {
            Some(claimed) if claimed != conn.id() => Err(RuleError::IdMismatch {
                own: conn.id(),
                claimed,
            }),
            _ => {
                self.dispatch(conn, inbound.message, now, &mut effects)
                    .await
            }
        };
        match result {
            Ok(()) => effects,
            Err(e) => {
                let mut refused = self.refuse(conn, &e, Some(kind));
                refused.outcome.received = Some(kind);
                refused
            }
        }
    }

    /// Answers a frame the session layer refused itself (too large, binary, rate limited, too many
    /// calls) with an `error` frame, counting it as a violation.
    pub fn reject(&self, conn: &mut Attachment, code: ErrorCode) -> Effects {
        self.send_error(conn, code, code.describe(), None)
    }

    /// Refuses an `ack` the router found beyond what was sent (or from a stale connection).
    pub fn refuse_ack(&self, conn: &mut Attachment, error: AckRefusal) -> Effects {
        let error = match error {
            AckRefusal::Stale(stale) => RuleError::Stale(stale),
            AckRefusal::Beyond(beyond) => RuleError::AckBeyond(beyond),
        };
        let mut refused = self.refuse(conn, &error, Some(MessageKind::Ack));
        refused.outcome.received = Some(MessageKind::Ack);
        refused
    }

    /// An ID went away for good: its call peer gets `close-call-server` (reason `peer_gone`) and
    /// each sender of a message still held for it (`lost`) gets one `undelivered` with the count.
    pub fn gone(&self, freed: Freed, lost: Vec<Origin>, now: Instant) -> Effects {
        let mut effects = Effects::default();
        let mut senders: Vec<(ClientId, usize, Option<MessageKind>)> = Vec::new();
        for Origin { from, kind } in lost {
            match senders.iter_mut().find(|(sender, ..)| *sender == from) {
                Some((_, count, first)) => {
                    *count += 1;
                    if *first != Some(kind) {
                        *first = None;
                    }
                }
                None => senders.push((from, 1, Some(kind))),
            }
        }
        for (from, count, request) in senders {
            let message = ServerMessage::Undelivered {
                to: freed.id,
                reason: DropReason::RecipientGone,
                count,
                request,
            };
            effects.push(Effect::Deliver {
                to: from,
                envelope: Envelope::new(&message),
            });
        }
        if let Some(peer) = freed.peer {
            self.observe(
                CallEvent::Ended {
                    by: freed.id,
                    peer,
                    reason: EndReason::PeerGone,
                },
                now,
            );
            let frame = ServerMessage::CloseCallServer {
                peer: freed.id,
                reason: EndReason::PeerGone,
            };
            effects.push(Effect::Deliver {
                to: peer,
                envelope: Envelope::new(&frame),
            });
        }
        effects
    }

    /// The `undelivered` notice for a message to `to` that could not be delivered or held, for
    /// its sender; `None` for a server notice (nobody to tell: the recipient learns the missed
    /// range on resume).
    pub fn undelivered(
        &self,
        to: ClientId,
        reason: DropReason,
        origin: Option<Origin>,
    ) -> Option<Effect> {
        let Origin { from, kind } = origin?;
        let notice = ServerMessage::Undelivered {
            to,
            reason,
            count: 1,
            request: Some(kind),
        };
        Some(Effect::Deliver {
            to: from,
            envelope: Envelope::new(&notice),
        })
    }

    /// The connection's call state, for metrics and tests.
    pub async fn call_state(&self, conn: &Attachment) -> Result<CallState, Stale> {
        self.registry.call_state(conn.binding).await
    }

    async fn dispatch(
        &self,
        conn: &mut Attachment,
        message: ClientMessage<'_>,
        now: Instant,
        effects: &mut Effects,
    ) -> Result<(), RuleError> {
        let me = conn.id();
        let origin = Origin {
            from: me,
            kind: message.kind(),
        };
        match message {
            ClientMessage::VideoOfferRequest { callee, offer } => {
                self.start_call(conn, callee, offer, now, effects).await
            }
            ClientMessage::ClientReply {
                caller,
                accepted,
                answer,
            } => {
                let t = match accepted {
                    true => Transition::Accept,
                    false => Transition::Decline,
                };
                self.transition(conn, caller, t, origin.kind).await?;
                let frame = ServerMessage::ServerReply {
                    accepted,
                    callee: me,
                    answer,
                };
                effects.push(deliver(caller, &frame, origin));
                let event = if accepted {
                    CallEvent::Answered { caller, callee: me }
                } else {
                    CallEvent::Declined { caller, callee: me }
                };
                self.observe(event, now);
                Ok(())
            }
            ClientMessage::CloseCallClient { peer, reason } => {
                self.end_call(conn, peer, reason, Transition::Hangup, origin, now, effects)
                    .await
            }
            ClientMessage::Cancel { peer } => {
                let reason = EndReason::Cancelled;
                self.end_call(conn, peer, reason, Transition::Cancel, origin, now, effects)
                    .await
            }
            ClientMessage::IceCandidate { peer, candidate } => {
                self.relay(conn, peer, origin, |_| true).await?;
                let frame = ServerMessage::IceCandidate {
                    peer: me,
                    candidate,
                };
                effects.push(deliver(peer, &frame, origin));
                Ok(())
            }
            ClientMessage::Ringing { peer } => {
                self.relay(conn, peer, origin, |s| {
                    matches!(s, CallState::Called { .. })
                })
                .await?;
                effects.push(deliver(peer, &ServerMessage::Ringing { peer: me }, origin));
                Ok(())
            }
            ClientMessage::Offer { peer, offer } => {
                self.relay(conn, peer, origin, |s| {
                    matches!(s, CallState::InCall { .. })
                })
                .await?;
                let frame = ServerMessage::Offer { peer: me, offer };
                effects.push(deliver(peer, &frame, origin));
                Ok(())
            }
            ClientMessage::Answer { peer, answer } => {
                self.relay(conn, peer, origin, |s| {
                    matches!(s, CallState::InCall { .. })
                })
                .await?;
                let frame = ServerMessage::Answer { peer: me, answer };
                effects.push(deliver(peer, &frame, origin));
                Ok(())
            }
            ClientMessage::Normal { text } => {
                let shown = match text.char_indices().nth(self.limits.max_logged_chars) {
                    Some((cut, _)) => &text[..cut],
                    None => &text[..],
                };
                // Debug formatting escapes newlines and control characters: no forged log lines.
                // DEBUG, not INFO: a client may send 20 a second, and they are no one's business.
                tracing::debug!(client = %me, text = ?shown, truncated = shown.len() < text.len(), "normal message");
                Ok(())
            }
            ClientMessage::Resume {
                id,
                token,
                last_seq,
            } => {
                // Boxed: rare, and its state would otherwise sit in every message's future.
                Box::pin(self.resume(conn, id, &token, last_seq, now, effects)).await
            }
            ClientMessage::Ping => {
                let pong = Envelope::new(&ServerMessage::Pong);
                effects.push(Effect::Reply(pong));
                Ok(())
            }
            ClientMessage::Ack { seq } => {
                effects.push(Effect::Ack { seq });
                Ok(())
            }
        }
    }

    /// Applies a call transition named by a message of type `kind` about `peer`, mapping a
    /// refusal to the sender's words.
    async fn transition(
        &self,
        conn: &Attachment,
        peer: ClientId,
        t: Transition,
        kind: MessageKind,
    ) -> Result<CallState, RuleError> {
        match self.registry.transition(conn.binding, peer, t).await {
            Ok(state) => Ok(state),
            Err(e) => Err(refusal(e, peer, kind)),
        }
    }

    async fn start_call(
        &self,
        conn: &Attachment,
        callee: ClientId,
        offer: &RawValue,
        now: Instant,
        effects: &mut Effects,
    ) -> Result<(), RuleError> {
        if callee == conn.id() {
            return Err(RuleError::CannotCallSelf);
        }
        match self
            .registry
            .transition(conn.binding, callee, Transition::Offer)
            .await
        {
            Ok(_) => {
                let frame = ServerMessage::VideoAnswerRequest {
                    caller: conn.id(),
                    offer,
                };
                let origin = Origin {
                    from: conn.id(),
                    kind: MessageKind::VideoOfferRequest,
                };
                effects.push(deliver(callee, &frame, origin));
                self.observe(
                    CallEvent::Offered {
                        caller: conn.id(),
                        callee,
                    },
                    now,
                );
                Ok(())
            }
            Err(TransitionError::Busy) => {
                let frame = Envelope::new(&ServerMessage::Busy { peer: callee });
                effects.push(Effect::Reply(frame));
                Ok(())
            }
            Err(e) => Err(refusal(e, callee, MessageKind::VideoOfferRequest)),
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn end_call(
        &self,
        conn: &Attachment,
        peer: ClientId,
        reason: EndReason,
        t: Transition,
        origin: Origin,
        now: Instant,
        effects: &mut Effects,
    ) -> Result<(), RuleError> {
        self.transition(conn, peer, t, origin.kind).await?;
        let frame = ServerMessage::CloseCallServer {
            peer: conn.id(),
            reason,
        };
        effects.push(deliver(peer, &frame, origin));
        self.observe(
            CallEvent::Ended {
                by: conn.id(),
                peer,
                reason,
            },
            now,
        );
        Ok(())
    }

    /// Checks that the sender's call is with `peer` and in a phase `allowed` accepts.
    async fn relay(
        &self,
        conn: &Attachment,
        peer: ClientId,
        origin: Origin,
        allowed: impl FnOnce(CallState) -> bool,
    ) -> Result<(), RuleError> {
        let state = self.registry.call_state(conn.binding).await?;
        if state.peer() != Some(peer) || !allowed(state) {
            return Err(wrong_state(state, peer, origin.kind));
        }
        Ok(())
    }

    async fn resume(
        &self,
        conn: &mut Attachment,
        target: ClientId,
        token: &ResumeToken,
        last_seq: Option<u64>,
        now: Instant,
        effects: &mut Effects,
    ) -> Result<(), RuleError> {
        let resumed = self
            .registry
            .resume(conn.binding, target, token, &self.node, now)
            .await;
        match resumed {
            Ok(takeover) => {
                tracing::debug!(
                    from = %conn.id(),
                    to = %target,
                    call = ?takeover.call,
                    was_live = takeover.was_live,
                    "resumed"
                );
                let from = conn.binding;
                conn.binding = takeover.binding;
                let ice_servers = conn.ice_servers.as_ref().and_then(|make| make(target));
                effects.push(Effect::TakeOver(Box::new(Resumption {
                    from,
                    takeover,
                    last_seq,
                    ice_servers,
                })));
                Ok(())
            }
            Err(ResumeError::Stale(stale)) => Err(stale.into()),
            Err(ResumeError::InCall) => Err(RuleError::ResumeNotAllowed),
            Err(ResumeError::Unavailable) => Err(RuleError::ClusterUnavailable),
            Err(ResumeError::Unknown | ResumeError::TokenMismatch) => {
                Err(RuleError::ResumeFailed(target))
            }
        }
    }

    /// The effects of refusing a message with `error`.
    pub fn refuse(
        &self,
        conn: &mut Attachment,
        error: &RuleError,
        kind: Option<MessageKind>,
    ) -> Effects {
        if let RuleError::Stale(_) = error {
            return Effects {
                list: SmallVec::new(),
                outcome: Outcome {
                    close: Some(CloseCode::PolicyViolation),
                    ..Outcome::default()
                },
            };
        }
        let mut effects = self.send_error(conn, error.code(), &error.to_string(), kind);
        if let RuleError::ResumeFailed(_) = error {
            conn.resume_failures += 1;
            if conn.resume_failures >= self.limits.max_resume_failures {
                effects.outcome.close = Some(CloseCode::PolicyViolation);
            }
        }
        effects
    }

    fn send_error(
        &self,
        conn: &mut Attachment,
        code: ErrorCode,
        message: &str,
        kind: Option<MessageKind>,
    ) -> Effects {
        let mut effects = Effects {
            list: SmallVec::new(),
            outcome: Outcome {
                error: Some(code),
                ..Outcome::default()
            },
        };
        let frame = ServerMessage::Error {
            code,
            message,
            request: kind,
        };
        effects.push(Effect::Reply(Envelope::new(&frame)));
        if code.is_violation() {
            conn.violations += 1;
            if conn.violations >= self.limits.max_violations {
                let code = ErrorCode::TooManyViolations;
                let frame = ServerMessage::Error {
                    code,
                    message: code.describe(),
                    request: None,
                };
                effects.push(Effect::Reply(Envelope::new(&frame)));
                effects.outcome.close = Some(CloseCode::PolicyViolation);
            }
        }
        effects
    }
}

/// Why the router could not apply an `ack`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AckRefusal {
    /// The connection lost its ID.
    Stale(Stale),
    /// The number was never sent.
    Beyond(AckBeyond),
}

/// The `id` message: the connection's ID and resume token, whether it resumed (and what it
/// missed), the heartbeat interval and the ICE servers.
pub fn id_frame(
    id: ClientId,
    token: &ResumeToken,
    resumed: bool,
    missed: Option<(u64, u64)>,
    heartbeat: std::time::Duration,
    ice_servers: Option<&RawValue>,
) -> ServerFrame {
    resumed_id_frame(id, token, resumed, missed, None, heartbeat, ice_servers)
}

/// Like [`id_frame`], after a resume from a server that failed: messages it numbered from
/// `lost_from` on may be lost (`"missed":[first,null]`).
pub fn resumed_id_frame(
    id: ClientId,
    token: &ResumeToken,
    resumed: bool,
    missed: Option<(u64, u64)>,
    lost_from: Option<u64>,
    heartbeat: std::time::Duration,
    ice_servers: Option<&RawValue>,
) -> ServerFrame {
    ServerMessage::Id {
        id,
        token,
        resumed,
        missed,
        lost_from,
        heartbeat,
        ice_servers,
    }
    .frame()
}

/// The `session_replaced` error sent to a connection whose ID another connection resumed.
pub fn replaced_frame() -> ServerFrame {
    let code = ErrorCode::SessionReplaced;
    ServerMessage::Error {
        code,
        message: code.describe(),
        request: None,
    }
    .frame()
}

/// A delivery of a server message relaying what `origin` sent.
fn deliver(to: ClientId, message: &ServerMessage<'_>, origin: Origin) -> Effect {
    Effect::Deliver {
        to,
        envelope: Envelope::relaying(message, origin),
    }
}

/// The refusal for a message of type `kind` about `peer` whose transition the registry refused.
fn refusal(e: TransitionError, peer: ClientId, kind: MessageKind) -> RuleError {
    match e {
        TransitionError::Stale(stale) => RuleError::Stale(stale),
        TransitionError::Unavailable => RuleError::ClusterUnavailable,
        TransitionError::AlreadyInCall { peer, state } => RuleError::AlreadyInCall {
            peer,
            state: state.describe(),
        },
        TransitionError::UnknownPeer => RuleError::UnknownClient(peer),
        // Only an offer finds its peer busy, and `start_call` answers that with `busy`.
        TransitionError::Busy => RuleError::NotInCall(peer),
        TransitionError::WrongState(mine) => wrong_state(mine, peer, kind),
    }
}

/// The refusal for a message about `peer` that the sender's call state `mine` does not allow.
fn wrong_state(mine: CallState, peer: ClientId, kind: MessageKind) -> RuleError {
    if mine.peer() == Some(peer) {
        RuleError::WrongCallState {
            peer,
            state: mine.describe(),
            kind,
        }
    } else {
        RuleError::NotInCall(peer)
    }
}

#[cfg(test)]
mod tests {
    use std::cell::{RefCell, RefMut};
    use std::collections::HashMap;
    use std::time::Duration;

    use serde_json::{json, Value};

    use super::*;
    use crate::signaling::bus::NoBus;
    use crate::signaling::connections::test_outbox::TestOutbox;
    use crate::signaling::connections::Joining;
    use crate::signaling::registry::{ready, MemoryRegistry};
    use crate::signaling::router::Router;

    type TestHub = Router<MemoryRegistry, NoBus, TestOutbox>;

    const SDP_OFFER: &str = r#"{"type":"offer","sdp":"v=0\r\no=- 4611731400430051336 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\na=group:BUNDLE 0 1\r\n"}"#;
    const SDP_ANSWER: &str =
        r#"{"type":"answer","sdp":"v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\n"}"#;

    /// One simulated browser: its attachment and what the server has queued for it.
    struct Client {
        conn: RefCell<Option<Attachment>>,
        outbox: TestOutbox,
        id: u64,
        token: String,
    }

    impl Client {
        fn conn(&self) -> RefMut<'_, Attachment> {
            RefMut::map(self.conn.borrow_mut(), |c| c.as_mut().expect("connected"))
        }

        /// Hands the attachment back, as the session layer does when the socket ends.
        fn leave(&self) -> Attachment {
            self.conn.borrow_mut().take().expect("connected")
        }

        /// Frames received since the last call, as text.
        fn inbox(&self) -> Vec<String> {
            self.outbox.take()
        }

        /// Frames received since the last call, parsed.
        fn json(&self) -> Vec<Value> {
            self.inbox()
                .iter()
                .map(|f| serde_json::from_str(f).expect("server sends valid JSON"))
                .collect()
        }

        /// The single frame received since the last call.
        fn one(&self) -> Value {
            let mut frames = self.json();
            assert_eq!(frames.len(), 1, "expected one frame, got {frames:?}");
            frames.pop().unwrap()
        }

        fn nothing(&self) {
            let frames = self.inbox();
            assert!(frames.is_empty(), "expected nothing, got {frames:?}");
        }

        fn error_code(&self) -> String {
            let frame = self.one();
            assert_eq!(frame["type"], "error", "{frame}");
            assert!(frame["message"].as_str().is_some_and(|m| m.len() > 10));
            frame["code"].as_str().unwrap().to_owned()
        }
    }

    fn hub() -> TestHub {
        hub_with(SignalingLimits::default())
    }

    fn hub_with(limits: SignalingLimits) -> TestHub {
        Router::single_node(limits)
    }

    fn connect(hub: &TestHub, now: Instant) -> Client {
        connect_with_capacity(hub, now, 256)
    }

    fn connect_with_capacity(hub: &TestHub, now: Instant, capacity: usize) -> Client {
        join_with(hub, now, capacity, Joining::default())
    }

    /// A client that opted in to `seq` and acknowledgements.
    fn join_acking(hub: &TestHub, now: Instant, capacity: usize) -> Client {
        let joining = Joining {
            address: None,
            acks: true,
        };
        join_with(hub, now, capacity, joining)
    }

    fn join_with(hub: &TestHub, now: Instant, capacity: usize, joining: Joining) -> Client {
        let outbox = TestOutbox::with_capacity(capacity);
        let conn = ready(hub.join(outbox.clone(), None, joining, now)).expect("room");
        let mut client = Client {
            id: conn.id().get(),
            conn: RefCell::new(Some(conn)),
            outbox,
            token: String::new(),
        };
        let hello = client.one();
        assert_eq!(hello["type"], "id");
        assert_eq!(hello["id"], client.id);
        client.token = hello["token"].as_str().unwrap().to_owned();
        client
    }

    fn send(hub: &TestHub, client: &Client, text: &str, now: Instant) -> Outcome {
        ready(hub.handle_text(&mut client.conn(), text.as_bytes(), now))
    }

    /// Sends and asserts the hub did not ask for a close.
    fn ok(hub: &TestHub, client: &Client, text: &str, now: Instant) {
        let outcome = send(hub, client, text, now);
        assert_eq!(outcome.close, None, "{text}");
    }

    fn offer(from: &Client, to: &Client) -> String {
        format!(
            r#"{{"type":"video-offer-request","id":{},"calleeId":{},"offer":{SDP_OFFER}}}"#,
            from.id, to.id
        )
    }

    fn accept(callee: &Client, caller: &Client) -> String {
        format!(
            r#"{{"type":"client-reply","reply":"1","id":{},"callerId":{},"answer":{SDP_ANSWER}}}"#,
            callee.id, caller.id
        )
    }

    fn candidate(from: &Client, to: &Client, n: u32) -> String {
        format!(
            r#"{{"type":"ice-candidate","id":{},"clientId":{},"candidate":{{"candidate":"candidate:{n} 1 udp 2122260223 192.0.2.1 5{n} typ host","sdpMid":"0","sdpMLineIndex":0}}}}"#,
            from.id, to.id
        )
    }

    /// Two clients in a connected call, inboxes empty.
    fn call(hub: &TestHub, now: Instant) -> (Client, Client) {
        let a = connect(hub, now);
        let b = connect(hub, now);
        ok(hub, &a, &offer(&a, &b), now);
        b.one();
        ok(hub, &b, &accept(&b, &a), now);
        a.one();
        (a, b)
    }

    #[test]
    fn the_seed_client_sequence_works_byte_for_byte() {
        let hub = hub();
        let now = Instant::now();
        let a = connect(&hub, now);
        let b = connect(&hub, now);

        ok(&hub, &a, &offer(&a, &b), now);
        a.nothing();
        assert_eq!(
            b.inbox(),
            [format!(
                r#"{{"type":"video-answer-request","callerId":{},"offer":{SDP_OFFER}}}"#,
                a.id
            )]
        );

        ok(&hub, &b, &accept(&b, &a), now);
        b.nothing();
        assert_eq!(
            a.inbox(),
            [format!(
                r#"{{"type":"server-reply","reply":"1","calleeId":{},"answer":{SDP_ANSWER}}}"#,
                b.id
            )]
        );
        assert_eq!(
            ready(hub.call_state(&a.conn())),
            Ok(CallState::InCall {
                peer: ClientId::new(b.id)
            })
        );

        let hangup = format!(
            r#"{{"type":"close-call-client","id":{},"clientId":{}}}"#,
            a.id, b.id
        );
        ok(&hub, &a, &hangup, now);
        a.nothing();
        assert_eq!(
            b.inbox(),
            [format!(
                r#"{{"type":"close-call-server","clientId":{},"reason":"hangup"}}"#,
                a.id
            )]
        );
        assert_eq!(ready(hub.call_state(&a.conn())), Ok(CallState::Idle));
        assert_eq!(ready(hub.call_state(&b.conn())), Ok(CallState::Idle));

        // Both can call again, the other way round.
        ok(&hub, &b, &offer(&b, &a), now);
        assert_eq!(a.one()["type"], "video-answer-request");

        // The seed's free-text message is only logged.
        let normal = format!(
            r#"{{"type":"normal","id":{},"message":"hello\nfake log line"}}"#,
            a.id
        );
        ok(&hub, &a, &normal, now);
        a.nothing();
        b.nothing();
    }

    #[test]
    fn the_id_message_carries_token_heartbeat_version_and_ice_servers() {
        let hub = hub();
        let outbox = TestOutbox::with_capacity(8);
        let ice = RawValue::from_string(
            r#"[{"urls":"turn:example.org","username":"u","credential":"c"}]"#.into(),
        )
        .unwrap();
        let conn = ready(hub.connect(
            outbox.clone(),
            Some(Arc::new(move |_| Some(ice.clone()))),
            Instant::now(),
        ))
        .unwrap();
        let hello: Value = serde_json::from_str(&outbox.take()[0]).unwrap();
        assert_eq!(hello["id"], conn.id().get());
        assert_eq!(hello["resumed"], false);
        assert_eq!(hello["version"], 1);
        assert_eq!(hello["heartbeatMs"], 20_000);
        assert_eq!(hello["iceServers"][0]["urls"], "turn:example.org");
        assert_eq!(hello["token"].as_str().unwrap().len(), 22);
    }

    #[test]
    fn a_spoofed_id_is_refused_for_every_message_type() {
        let hub = hub();
        let now = Instant::now();
        let (a, b) = call(&hub, now);
        let spoofed = [
            format!(
                r#"{{"type":"video-offer-request","id":{},"calleeId":{},"offer":{{}}}}"#,
                b.id, a.id
            ),
            format!(
                r#"{{"type":"client-reply","reply":"1","id":{},"callerId":{},"answer":{{}}}}"#,
                b.id, a.id
            ),
            format!(
                r#"{{"type":"close-call-client","id":{},"clientId":{}}}"#,
                b.id, b.id
            ),
            format!(r#"{{"type":"normal","id":{},"message":"x"}}"#, b.id),
            format!(
                r#"{{"type":"ice-candidate","id":{},"clientId":{},"candidate":{{}}}}"#,
                b.id, b.id
            ),
            format!(
                r#"{{"type":"offer","id":{},"clientId":{},"offer":{{}}}}"#,
                b.id, b.id
            ),
            format!(r#"{{"type":"ping","id":{}}}"#, b.id + 1),
        ];
        for text in &spoofed {
            ok(&hub, &a, text, now);
            assert_eq!(a.error_code(), "id_mismatch", "{text}");
            b.nothing();
        }
        // The call is untouched.
        assert_eq!(
            ready(hub.call_state(&b.conn())),
            Ok(CallState::InCall {
                peer: ClientId::new(a.id)
            })
        );
        // New clients may leave `id` out entirely.
        ok(&hub, &a, r#"{"type":"ping"}"#, now);
        assert_eq!(a.inbox(), [r#"{"type":"pong"}"#]);
    }

    #[test]
    fn calling_an_unknown_id_or_yourself_is_an_error() {
        let hub = hub();
        let now = Instant::now();
        let a = connect(&hub, now);
        for callee in [1u64, 123_456_789, 999_999_999, u64::MAX] {
            let text = format!(
                r#"{{"type":"video-offer-request","id":{},"calleeId":{callee},"offer":{{}}}}"#,
                a.id
            );
            if callee == a.id {
                continue;
            }
            ok(&hub, &a, &text, now);
            let frame = a.one();
            assert_eq!(frame["code"], "unknown_client");
            assert_eq!(frame["request"], "video-offer-request");
        }
        let text = format!(
            r#"{{"type":"video-offer-request","calleeId":{},"offer":{{}}}}"#,
            a.id
        );
        ok(&hub, &a, &text, now);
        assert_eq!(a.error_code(), "cannot_call_self");
        assert_eq!(ready(hub.call_state(&a.conn())), Ok(CallState::Idle));
    }

    #[test]
    fn a_busy_callee_keeps_its_call_and_the_caller_is_told() {
        let hub = hub();
        let now = Instant::now();
        let (a, b) = call(&hub, now);
        let c = connect(&hub, now);
        for callee in [&b, &a] {
            ok(&hub, &c, &offer(&c, callee), now);
            assert_eq!(
                c.inbox(),
                [format!(r#"{{"type":"busy","clientId":{}}}"#, callee.id)]
            );
        }
        a.nothing();
        b.nothing();
        assert_eq!(ready(hub.call_state(&c.conn())), Ok(CallState::Idle));
        // The existing call still relays.
        ok(&hub, &b, &candidate(&b, &a, 1), now);
        assert_eq!(a.one()["type"], "ice-candidate");
        // A callee that is only ringing is busy too.
        let d = connect(&hub, now);
        ok(&hub, &c, &offer(&c, &d), now);
        d.one();
        let e = connect(&hub, now);
        ok(&hub, &e, &offer(&e, &d), now);
        assert_eq!(e.one()["type"], "busy");
        // And a caller already in a call cannot start another.
        ok(&hub, &a, &offer(&a, &e), now);
        assert_eq!(a.error_code(), "already_in_call");
        e.nothing();
    }

    #[test]
    fn the_caller_can_cancel_before_an_answer() {
        let hub = hub();
        let now = Instant::now();
        let a = connect(&hub, now);
        let b = connect(&hub, now);
        ok(&hub, &a, &offer(&a, &b), now);
        b.one();
        // The callee rings.
        ok(
            &hub,
            &b,
            &format!(r#"{{"type":"ringing","clientId":{}}}"#, a.id),
            now,
        );
        assert_eq!(
            a.inbox(),
            [format!(r#"{{"type":"ringing","clientId":{}}}"#, b.id)]
        );
        // Only the caller may cancel.
        ok(
            &hub,
            &b,
            &format!(r#"{{"type":"cancel","clientId":{}}}"#, a.id),
            now,
        );
        assert_eq!(b.error_code(), "wrong_call_state");
        ok(
            &hub,
            &a,
            &format!(r#"{{"type":"cancel","clientId":{}}}"#, b.id),
            now,
        );
        assert_eq!(
            b.inbox(),
            [format!(
                r#"{{"type":"close-call-server","clientId":{},"reason":"cancelled"}}"#,
                a.id
            )]
        );
        a.nothing();
        // The callee's late answer finds no call.
        ok(&hub, &b, &accept(&b, &a), now);
        assert_eq!(b.error_code(), "not_in_call");
        a.nothing();
        assert_eq!(ready(hub.call_state(&a.conn())), Ok(CallState::Idle));
    }

    #[test]
    fn a_declined_call_returns_both_to_idle() {
        let hub = hub();
        let now = Instant::now();
        let a = connect(&hub, now);
        let b = connect(&hub, now);
        ok(&hub, &a, &offer(&a, &b), now);
        b.one();
        let decline = format!(
            r#"{{"type":"client-reply","reply":"0","id":{},"callerId":{},"answer":null}}"#,
            b.id, a.id
        );
        ok(&hub, &b, &decline, now);
        assert_eq!(
            a.inbox(),
            [format!(
                r#"{{"type":"server-reply","reply":"0","calleeId":{},"answer":null}}"#,
                b.id
            )]
        );
        assert_eq!(ready(hub.call_state(&a.conn())), Ok(CallState::Idle));
        assert_eq!(ready(hub.call_state(&b.conn())), Ok(CallState::Idle));
        // Candidates after a decline go nowhere.
        ok(&hub, &a, &candidate(&a, &b, 1), now);
        assert_eq!(a.error_code(), "not_in_call");
        b.nothing();
    }

    #[test]
    fn candidates_reach_only_the_call_peer_even_before_the_answer() {
        let hub = hub();
        let now = Instant::now();
        let a = connect(&hub, now);
        let b = connect(&hub, now);
        let c = connect(&hub, now);
        ok(&hub, &a, &offer(&a, &b), now);
        b.one();
        for n in 0..5 {
            ok(&hub, &a, &candidate(&a, &b, n), now);
        }
        let got = b.json();
        assert_eq!(got.len(), 5);
        for (n, frame) in got.iter().enumerate() {
            assert_eq!(frame["type"], "ice-candidate");
            assert_eq!(frame["clientId"], a.id);
            assert!(frame["candidate"]["candidate"]
                .as_str()
                .unwrap()
                .starts_with(&format!("candidate:{n} ")));
        }
        ok(&hub, &a, &candidate(&a, &c, 9), now);
        assert_eq!(a.error_code(), "not_in_call");
        c.nothing();
        // End-of-candidates (`null`) is relayed as is.
        ok(
            &hub,
            &a,
            &format!(
                r#"{{"type":"ice-candidate","clientId":{},"candidate":null}}"#,
                b.id
            ),
            now,
        );
        assert_eq!(
            b.inbox(),
            [format!(
                r#"{{"type":"ice-candidate","clientId":{},"candidate":null}}"#,
                a.id
            )]
        );
    }

    #[test]
    fn nothing_but_a_new_call_reaches_a_non_peer() {
        let hub = hub();
        let now = Instant::now();
        let (a, b) = call(&hub, now);
        let c = connect(&hub, now);
        let (d, e) = call(&hub, now);
        for sender in [&a, &c] {
            for target in [&d, &e] {
                let t = target.id;
                for text in [
                    format!(
                        r#"{{"type":"client-reply","reply":"1","callerId":{t},"answer":{{}}}}"#
                    ),
                    format!(r#"{{"type":"client-reply","reply":"0","callerId":{t}}}"#),
                    format!(r#"{{"type":"close-call-client","clientId":{t}}}"#),
                    format!(r#"{{"type":"cancel","clientId":{t}}}"#),
                    format!(r#"{{"type":"ringing","clientId":{t}}}"#),
                    format!(r#"{{"type":"ice-candidate","clientId":{t},"candidate":{{}}}}"#),
                    format!(r#"{{"type":"offer","clientId":{t},"offer":{{}}}}"#),
                    format!(r#"{{"type":"answer","clientId":{t},"answer":{{}}}}"#),
                ] {
                    ok(&hub, sender, &text, now);
                    assert_eq!(sender.error_code(), "not_in_call", "{text}");
                }
            }
        }
        d.nothing();
        e.nothing();
        b.nothing();
        assert_eq!(
            ready(hub.call_state(&d.conn())),
            Ok(CallState::InCall {
                peer: ClientId::new(e.id)
            })
        );
    }

    #[test]
    fn renegotiation_works_inside_a_call_only() {
        let hub = hub();
        let now = Instant::now();
        let a = connect(&hub, now);
        let b = connect(&hub, now);
        ok(&hub, &a, &offer(&a, &b), now);
        b.one();
        let reoffer = |from: &Client, to: &Client| {
            format!(
                r#"{{"type":"offer","id":{},"clientId":{},"offer":{SDP_OFFER}}}"#,
                from.id, to.id
            )
        };
        ok(&hub, &a, &reoffer(&a, &b), now);
        assert_eq!(a.error_code(), "wrong_call_state");
        b.nothing();
        ok(&hub, &b, &accept(&b, &a), now);
        a.one();
        // Either side may renegotiate (screen share, ICE restart).
        ok(&hub, &b, &reoffer(&b, &a), now);
        assert_eq!(
            a.inbox(),
            [format!(
                r#"{{"type":"offer","clientId":{},"offer":{SDP_OFFER}}}"#,
                b.id
            )]
        );
        ok(
            &hub,
            &a,
            &format!(
                r#"{{"type":"answer","clientId":{},"answer":{SDP_ANSWER}}}"#,
                b.id
            ),
            now,
        );
        assert_eq!(
            b.inbox(),
            [format!(
                r#"{{"type":"answer","clientId":{},"answer":{SDP_ANSWER}}}"#,
                a.id
            )]
        );
        // Ringing makes no sense once connected.
        ok(
            &hub,
            &b,
            &format!(r#"{{"type":"ringing","clientId":{}}}"#, a.id),
            now,
        );
        assert_eq!(b.error_code(), "wrong_call_state");
    }

    fn resume_text(id: u64, token: &str) -> String {
        format!(r#"{{"type":"resume","id":{id},"token":"{token}"}}"#)
    }

    #[test]
    fn resume_within_grace_keeps_the_call_and_delivers_the_gap_in_order() {
        let hub = hub();
        let start = Instant::now();
        let (a, b) = call(&hub, start);
        let old_token = a.token.clone();
        ready(hub.disconnect(a.leave(), Departure::Dropped, start));
        let later = start + Duration::from_secs(10);
        for n in 0..5 {
            ok(&hub, &b, &candidate(&b, &a, n), later);
        }
        b.nothing();
        assert_eq!(
            ready(hub.expire(later)),
            Some(start + Duration::from_secs(30))
        );

        let mut a2 = connect(&hub, later);
        assert_ne!(a2.id, a.id);
        let fresh_id = a2.id;
        ok(&hub, &a2, &resume_text(a.id, &old_token), later);
        let frames = a2.json();
        assert_eq!(frames.len(), 6, "{frames:?}");
        assert_eq!(frames[0]["type"], "id");
        assert_eq!(frames[0]["id"], a.id);
        assert_eq!(frames[0]["resumed"], true);
        let new_token = frames[0]["token"].as_str().unwrap();
        assert_ne!(new_token, old_token);
        for (n, frame) in frames[1..].iter().enumerate() {
            assert_eq!(frame["type"], "ice-candidate");
            assert!(frame["candidate"]["candidate"]
                .as_str()
                .unwrap()
                .starts_with(&format!("candidate:{n} ")));
        }
        a2.id = a.id;
        assert_eq!(a2.conn().id().get(), a.id);
        // The throwaway ID is freed.
        assert_eq!(hub.connections().len(), 2);
        let c = connect(&hub, later);
        ok(
            &hub,
            &c,
            &format!(r#"{{"type":"video-offer-request","calleeId":{fresh_id},"offer":{{}}}}"#),
            later,
        );
        assert_eq!(c.error_code(), "unknown_client");

        // The call continues both ways.
        ok(&hub, &a2, &candidate(&a2, &b, 7), later);
        assert_eq!(b.one()["clientId"], a.id);
        ok(
            &hub,
            &b,
            &format!(r#"{{"type":"close-call-client","clientId":{}}}"#, a.id),
            later,
        );
        assert_eq!(a2.one()["type"], "close-call-server");

        // Nothing expires for the resumed ID.
        assert_eq!(ready(hub.expire(start + Duration::from_secs(60))), None);
        assert_eq!(hub.connections().len(), 3);

        // A token is good for one resume only.
        ready(hub.disconnect(a2.leave(), Departure::Dropped, later));
        let x = connect(&hub, later);
        ok(&hub, &x, &resume_text(a.id, &old_token), later);
        assert_eq!(x.error_code(), "resume_failed");
        ok(&hub, &x, &resume_text(a.id, new_token), later);
        assert_eq!(x.json()[0]["resumed"], true);
    }

    #[test]
    fn after_the_grace_period_the_peer_is_told_and_the_id_is_gone() {
        let hub = hub();
        let start = Instant::now();
        let (a, b) = call(&hub, start);
        ready(hub.disconnect(a.leave(), Departure::Dropped, start));
        assert_eq!(
            ready(hub.expire(start + Duration::from_millis(29_999))),
            Some(start + Duration::from_secs(30))
        );
        b.nothing();
        assert_eq!(ready(hub.expire(start + Duration::from_secs(30))), None);
        assert_eq!(
            b.inbox(),
            [format!(
                r#"{{"type":"close-call-server","clientId":{},"reason":"peer_gone"}}"#,
                a.id
            )]
        );
        assert_eq!(ready(hub.call_state(&b.conn())), Ok(CallState::Idle));
        let a2 = connect(&hub, start + Duration::from_secs(31));
        ok(
            &hub,
            &a2,
            &resume_text(a.id, &a.token),
            start + Duration::from_secs(31),
        );
        assert_eq!(a2.error_code(), "resume_failed");
        assert_eq!(hub.connections().len(), 2);
        // B is free for new calls.
        ok(&hub, &a2, &offer(&a2, &b), start + Duration::from_secs(31));
        assert_eq!(b.one()["type"], "video-answer-request");
    }

    #[test]
    fn a_wrong_token_cannot_take_the_id_and_repeated_tries_close_the_connection() {
        let hub = hub();
        let now = Instant::now();
        let (a, b) = call(&hub, now);
        ready(hub.disconnect(a.leave(), Departure::Dropped, now));
        let thief = connect(&hub, now);
        let mut wrong = a.token.clone().into_bytes();
        wrong[0] = if wrong[0] == b'A' { b'B' } else { b'A' };
        let wrong = String::from_utf8(wrong).unwrap();
        for attempt in 1..=3 {
            let outcome = send(&hub, &thief, &resume_text(a.id, &wrong), now);
            assert_eq!(thief.error_code(), "resume_failed");
            let want = (attempt == 3).then_some(CloseCode::PolicyViolation);
            assert_eq!(outcome.close, want, "attempt {attempt}");
        }
        assert_eq!(thief.conn().id().get(), thief.id);
        b.nothing();
        // The owner still can.
        let a2 = connect(&hub, now);
        ok(&hub, &a2, &resume_text(a.id, &a.token), now);
        assert_eq!(a2.json()[0]["id"], a.id);
    }

    #[test]
    fn a_resume_takes_over_a_half_open_connection() {
        let hub = hub();
        let now = Instant::now();
        let (a, b) = call(&hub, now);
        let mut a2 = connect(&hub, now);
        ok(&hub, &a2, &resume_text(a.id, &a.token), now);
        assert_eq!(a2.json()[0]["resumed"], true);
        assert_eq!(a.error_code(), "session_replaced");
        assert!(a.outbox.dropped_by_node());
        // The old connection can no longer act on the ID and is told to close.
        let outcome = send(&hub, &a, &candidate(&a, &b, 1), now);
        assert_eq!(outcome.close, Some(CloseCode::PolicyViolation));
        b.nothing();
        // Its late disconnect does not disturb the new holder.
        ready(hub.disconnect(a.leave(), Departure::Left, now));
        b.nothing();
        a2.id = a.id;
        ok(&hub, &a2, &candidate(&a2, &b, 2), now);
        assert_eq!(b.one()["clientId"], a.id);
    }

    #[test]
    fn a_connection_in_a_call_cannot_resume_another_id() {
        let hub = hub();
        let now = Instant::now();
        let (a, _b) = call(&hub, now);
        let c = connect(&hub, now);
        ok(&hub, &a, &resume_text(c.id, &c.token), now);
        assert_eq!(a.error_code(), "resume_not_allowed");
    }

    #[test]
    fn a_client_that_leaves_frees_its_id_at_once() {
        let hub = hub();
        let now = Instant::now();
        let (a, b) = call(&hub, now);
        ready(hub.disconnect(a.leave(), Departure::Left, now));
        assert_eq!(
            b.inbox(),
            [format!(
                r#"{{"type":"close-call-server","clientId":{},"reason":"peer_gone"}}"#,
                a.id
            )]
        );
        assert_eq!(hub.connections().len(), 1);
        assert_eq!(ready(hub.expire(now + Duration::from_secs(60))), None);
    }

    #[test]
    fn every_bad_input_gets_its_code_and_the_connection_stays() {
        let hub = hub();
        let now = Instant::now();
        let a = connect(&hub, now);
        let deep = format!(
            r#"{{"type":"ping","x":{}1{}}}"#,
            "[".repeat(40),
            "]".repeat(40)
        );
        let cases = [
            ("not json", "invalid_json"),
            (r#"{"type":"ping""#, "invalid_json"),
            ("[]", "invalid_json"),
            (r#"{"type":"subscribe"}"#, "unknown_type"),
            (r#"{"id":1}"#, "unknown_type"),
            (
                r#"{"type":"video-offer-request","offer":{}}"#,
                "missing_field",
            ),
            (r#"{"type":"client-reply","callerId":5}"#, "missing_field"),
            (
                r#"{"type":"video-offer-request","calleeId":"bob","offer":{}}"#,
                "invalid_field",
            ),
            (
                r#"{"type":"client-reply","callerId":5,"reply":"maybe"}"#,
                "invalid_field",
            ),
            (r#"{"type":"normal","message":["x"]}"#, "invalid_field"),
            (&deep, "too_deep"),
        ];
        for (text, code) in cases {
            let outcome = send(&hub, &a, text, now);
            assert_eq!(outcome.close, None, "{text}");
            assert_eq!(outcome.error.map(ErrorCode::as_str), Some(code), "{text}");
            assert_eq!(a.error_code(), code, "{text}");
        }
        // Still usable.
        ok(&hub, &a, r#"{"type":"ping"}"#, now);
        assert_eq!(a.one()["type"], "pong");
    }

    #[test]
    fn repeated_violations_close_with_1008() {
        let hub = hub();
        let now = Instant::now();
        let a = connect(&hub, now);
        for n in 1..=16 {
            let outcome = send(&hub, &a, "{", now);
            if n < 16 {
                assert_eq!(outcome.close, None);
                assert_eq!(a.error_code(), "invalid_json");
            } else {
                assert_eq!(outcome.close, Some(CloseCode::PolicyViolation));
                let codes: Vec<_> = a.json().iter().map(|f| f["code"].clone()).collect();
                assert_eq!(codes, ["invalid_json", "too_many_violations"]);
            }
        }
        // Ordinary races (calling someone who left) are not violations.
        let b = connect(&hub, now);
        for _ in 0..40 {
            ok(
                &hub,
                &b,
                r#"{"type":"video-offer-request","calleeId":1,"offer":{}}"#,
                now,
            );
            assert_eq!(b.error_code(), "unknown_client");
        }
        // Limits the session layer enforces count too.
        let c = connect(&hub, now);
        let outcome = ready(hub.reject(&mut c.conn(), ErrorCode::RateLimited, now));
        assert_eq!(outcome.error, Some(ErrorCode::RateLimited));
        assert_eq!(c.error_code(), "rate_limited");
    }

    /// Only what B truly processed counts: B acknowledges with `seq`, so frames that sat in its
    /// outbox (or its socket) when it was cut off are replayed on resume, none twice.
    #[test]
    fn a_slow_peer_is_detached_and_can_resume_what_it_missed() {
        let hub = hub();
        let now = Instant::now();
        let a = connect(&hub, now);
        let b = join_acking(&hub, now, 4);
        ok(&hub, &a, &offer(&a, &b), now);
        // B never reads: three more frames fit, the fourth detaches it.
        let mut detached_at = None;
        for n in 0..6 {
            let outcome = send(&hub, &a, &candidate(&a, &b, n), now);
            assert_eq!(outcome.close, None);
            if let Some(peer) = outcome.detached_peer {
                assert_eq!(peer.get(), b.id);
                detached_at.get_or_insert(n);
            }
        }
        assert_eq!(detached_at, Some(3));
        assert!(b.outbox.dropped_by_node());
        // What sat in B's outbox never reached B; B processed only the offer (seq 1).
        let queued = b.json();
        assert_eq!(queued[0]["type"], "video-answer-request");
        assert_eq!(queued[0]["seq"], 1);
        // B's session notices and closes; its old attachment is stale.
        let outcome = send(&hub, &b, r#"{"type":"ping"}"#, now);
        assert_eq!(outcome.close, Some(CloseCode::PolicyViolation));
        ready(hub.disconnect(b.leave(), Departure::Dropped, now));
        // It comes back and gets candidates 0 to 5, in order, numbered 2 to 7.
        let mut b2 = join_acking(&hub, now, 64);
        ok(
            &hub,
            &b2,
            &format!(
                r#"{{"type":"resume","id":{},"token":"{}","last_seq":1}}"#,
                b.id, b.token
            ),
            now,
        );
        let frames = b2.json();
        assert_eq!(frames.len(), 7, "{frames:?}");
        assert_eq!(frames[0]["resumed"], true);
        for (n, frame) in frames[1..].iter().enumerate() {
            assert!(frame["candidate"]["candidate"]
                .as_str()
                .unwrap()
                .starts_with(&format!("candidate:{n} ")));
            assert_eq!(frame["seq"], n + 2);
        }
        a.nothing();
        b2.id = b.id;
        ok(&hub, &b2, &accept(&b2, &a), now);
        assert_eq!(a.one()["type"], "server-reply");
    }

    /// A client that does not acknowledge keeps the seed's behaviour: from the frame that did not
    /// fit on, everything is kept for its resume.
    #[test]
    fn a_slow_peer_without_acks_resumes_from_the_frame_that_did_not_fit() {
        let hub = hub();
        let now = Instant::now();
        let a = connect(&hub, now);
        let b = connect_with_capacity(&hub, now, 4);
        ok(&hub, &a, &offer(&a, &b), now);
        for n in 0..6 {
            assert_eq!(send(&hub, &a, &candidate(&a, &b, n), now).close, None);
        }
        let queued = b.json();
        assert!(
            queued.iter().all(|f| f.get("seq").is_none()),
            "no seq unless asked"
        );
        ready(hub.disconnect(b.leave(), Departure::Dropped, now));
        let b2 = connect(&hub, now);
        ok(&hub, &b2, &resume_text(b.id, &b.token), now);
        let frames = b2.json();
        assert_eq!(frames.len(), 4);
        for (frame, n) in frames[1..].iter().zip(3..) {
            assert!(frame["candidate"]["candidate"]
                .as_str()
                .unwrap()
                .starts_with(&format!("candidate:{n} ")));
        }
    }

    #[test]
    fn a_full_own_outbox_closes_the_connection() {
        let hub = hub();
        let now = Instant::now();
        // Room for one frame, and the test never reads it.
        let a = connect_with_capacity(&hub, now, 1);
        ok(&hub, &a, r#"{"type":"ping"}"#, now);
        let outcome = send(&hub, &a, r#"{"type":"ping"}"#, now);
        assert_eq!(outcome.close, Some(CloseCode::PolicyViolation));
    }

    #[test]
    fn over_its_budget_a_reservation_drops_tells_the_sender_and_reports_the_gap() {
        let hub = hub_with(SignalingLimits {
            resume_queue_messages: 3,
            ..SignalingLimits::default()
        });
        let now = Instant::now();
        let (a, b) = call(&hub, now);
        ready(hub.disconnect(b.leave(), Departure::Dropped, now));
        for n in 0..3 {
            ok(&hub, &a, &candidate(&a, &b, n), now);
            a.nothing();
        }
        for n in 3..5 {
            ok(&hub, &a, &candidate(&a, &b, n), now);
            let told = a.one();
            assert_eq!(told["code"], "undelivered");
            assert_eq!(told["clientId"], b.id);
            assert_eq!(told["request"], "ice-candidate");
            assert_eq!(told["reason"], "queue_full");
        }
        // The reservation lives on; B gets the three and learns which numbers it missed.
        let b2 = connect(&hub, now);
        ok(&hub, &b2, &resume_text(b.id, &b.token), now);
        let frames = b2.json();
        assert_eq!(frames.len(), 4);
        // Seq 1 was B's incoming call; candidates 0..=2 are 2..=4 (held), 3 and 4 are 5 and 6.
        assert_eq!(frames[0]["missed"], json!([5, 6]));
        assert_eq!(hub.connections().len(), 2);
        assert_eq!(hub.connections().held_bytes(), 0);
    }

    #[test]
    fn when_a_reservation_expires_each_sender_is_told_what_was_not_delivered() {
        let hub = hub();
        let start = Instant::now();
        let (a, b) = call(&hub, start);
        ready(hub.disconnect(b.leave(), Departure::Dropped, start));
        for n in 0..3 {
            ok(&hub, &a, &candidate(&a, &b, n), start);
        }
        a.nothing();
        ready(hub.expire(start + Duration::from_secs(31)));
        let told = a.json();
        assert_eq!(told.len(), 2, "{told:?}");
        assert_eq!(told[0]["code"], "undelivered");
        assert_eq!(told[0]["count"], 3);
        assert_eq!(told[0]["reason"], "recipient_gone");
        assert_eq!(told[0]["request"], "ice-candidate");
        assert_eq!(told[1]["type"], "close-call-server");
        assert_eq!(told[1]["reason"], "peer_gone");
    }

    #[test]
    fn a_call_to_a_reconnecting_client_waits_for_its_resume() {
        let hub = hub();
        let now = Instant::now();
        let a = connect(&hub, now);
        let b = connect(&hub, now);
        ready(hub.disconnect(b.leave(), Departure::Dropped, now));
        ok(&hub, &a, &offer(&a, &b), now);
        a.nothing();
        let b2 = connect(&hub, now);
        ok(&hub, &b2, &resume_text(b.id, &b.token), now);
        let frames = b2.json();
        assert_eq!(frames[1]["type"], "video-answer-request");
        assert_eq!(frames[1]["callerId"], a.id);
    }

    #[test]
    fn many_connect_call_drop_expire_cycles_leave_the_directory_empty() {
        let hub = hub();
        let start = Instant::now();
        for round in 0..30u32 {
            let now = start + Duration::from_secs(40) * round;
            let mut pairs = Vec::new();
            for _ in 0..20 {
                let a = connect(&hub, now);
                let b = connect(&hub, now);
                ok(&hub, &a, &offer(&a, &b), now);
                ok(&hub, &b, &accept(&b, &a), now);
                ok(&hub, &a, &candidate(&a, &b, 1), now);
                pairs.push((a, b));
            }
            for (i, (a, b)) in pairs.into_iter().enumerate() {
                let how = if i % 3 == 0 {
                    Departure::Left
                } else {
                    Departure::Dropped
                };
                ready(hub.disconnect(a.leave(), how, now));
                ready(hub.disconnect(b.leave(), Departure::Dropped, now));
            }
            ready(hub.expire(now + Duration::from_secs(30)));
            assert!(
                hub.connections().is_empty(),
                "round {round}: {}",
                hub.connections().len()
            );
        }
        assert_eq!(hub.connections().held_bytes(), 0);
        assert_eq!(hub.connections().pending_deadlines(), 0);
    }

    #[test]
    fn concurrent_sessions_keep_call_states_symmetric() {
        let hub = hub();
        let now = Instant::now();
        let clients: Vec<Client> = (0..64)
            .map(|_| connect_with_capacity(&hub, now, 1_000_000))
            .collect();
        let ids: Vec<u64> = clients.iter().map(|c| c.id).collect();
        let mut groups: Vec<Vec<Client>> = (0..4).map(|_| Vec::new()).collect();
        for (i, client) in clients.into_iter().enumerate() {
            groups[i % 4].push(client);
        }
        let clients: Vec<Client> = std::thread::scope(|scope| {
            let workers: Vec<_> = groups
                .into_iter()
                .enumerate()
                .map(|(t, group)| {
                    let (hub, ids) = (&hub, &ids);
                    scope.spawn(move || {
                        let mut seed = 0x9e37_79b9_7f4a_7c15u64 ^ t as u64;
                        let mut next = move || {
                            seed ^= seed << 13;
                            seed ^= seed >> 7;
                            seed ^= seed << 17;
                            seed
                        };
                        for _ in 0..3000 {
                            let me = &group[next() as usize % group.len()];
                            let other = ids[next() as usize % ids.len()];
                            let state = ready(hub.call_state(&me.conn())).unwrap();
                            let text = match (next() % 6, state.peer()) {
                                (0, _) => format!(
                                    r#"{{"type":"video-offer-request","calleeId":{other},"offer":{{}}}}"#
                                ),
                                (1, Some(p)) => format!(
                                    r#"{{"type":"client-reply","reply":"1","callerId":{p},"answer":{{}}}}"#
                                ),
                                (2, Some(p)) => format!(r#"{{"type":"close-call-client","clientId":{p}}}"#),
                                (3, Some(p)) => format!(r#"{{"type":"cancel","clientId":{p}}}"#),
                                (4, Some(p)) => format!(
                                    r#"{{"type":"ice-candidate","clientId":{p},"candidate":null}}"#
                                ),
                                _ => {
                                    me.inbox();
                                    continue;
                                }
                            };
                            let outcome = send(hub, me, &text, now);
                            assert_eq!(outcome.close, None);
                        }
                        group
                    })
                })
                .collect();
            workers
                .into_iter()
                .flat_map(|w| w.join().unwrap())
                .collect()
        });
        let states: HashMap<u64, CallState> = clients
            .iter()
            .map(|c| (c.id, ready(hub.call_state(&c.conn())).unwrap()))
            .collect();
        let mut in_calls = 0;
        for (id, state) in &states {
            let Some(peer) = state.peer() else { continue };
            in_calls += 1;
            let back = states[&peer.get()];
            let me = ClientId::new(*id);
            let expected = match state {
                CallState::Calling { .. } => CallState::Called { peer: me },
                CallState::Called { .. } => CallState::Calling { peer: me },
                _ => CallState::InCall { peer: me },
            };
            assert_eq!(back, expected, "{id} is {state:?}");
        }
        assert!(in_calls > 0, "the workload should leave some calls up");
    }

    #[test]
    fn a_full_server_says_so() {
        let hub = hub_with(SignalingLimits {
            max_clients: 2,
            ..SignalingLimits::default()
        });
        let now = Instant::now();
        let _a = connect(&hub, now);
        let _b = connect(&hub, now);
        let err = ready(hub.connect(TestOutbox::with_capacity(4), None, now)).unwrap_err();
        assert_eq!(err.code(), ErrorCode::ServerFull);
        assert_eq!(err.close_code().as_u16(), 1013);
        let frame: Value = serde_json::from_slice(&err.frame()).unwrap();
        assert_eq!(frame["code"], "server_full");
    }

    #[test]
    fn the_hub_is_shareable_across_tasks_with_session_outboxes() {
        fn assert_shareable<T: Send + Sync>() {}
        assert_shareable::<Router<MemoryRegistry, NoBus, crate::signaling::outbox::OutboxSender>>();
        let hub: Router = Router::single_node(SignalingLimits::default());
        let (tx, mut rx) = crate::signaling::outbox::channel(8);
        let mut conn = ready(hub.connect(tx, None, Instant::now())).unwrap();
        let _ = ready(hub.handle_text(&mut conn, br#"{"type":"ping"}"#, Instant::now()));
        let hello: Value = serde_json::from_slice(&rx.try_recv().unwrap().bytes).unwrap();
        assert_eq!(hello["id"], conn.id().get());
        assert_eq!(
            rx.try_recv().unwrap().bytes,
            Bytes::from_static(br#"{"type":"pong"}"#)
        );
        // Detaching drops the only sender: the session's receiver sees the channel close.
        ready(hub.disconnect(conn, Departure::Dropped, Instant::now()));
        assert!(rx.is_closed());
        let _ = json!(null);
    }
}
