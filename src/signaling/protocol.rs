//! The signaling wire format: what browsers send, what the server sends back, and the error and close
//! codes. This module owns the JSON vocabulary and nothing else — no state, no I/O, no clock.
//!
//! Parsing borrows from the received frame: SDP, ICE candidates and every other payload the server
//! only relays are kept as [`RawValue`] slices and written back out byte for byte, so a 3 KB offer is
//! validated once by serde and copied once into the outgoing frame. Outgoing frames are written by hand
//! into one buffer and handed out as [`Bytes`], ready to be sent as a WebSocket text frame.
//!
//! The seed's browser client must keep working unchanged, so the seed's message names and field names
//! (`video-offer-request`, `calleeId`, `reply: "1"` …) are kept exactly; see `docs/PROTOCOL.md`.

use std::borrow::Cow;
use std::fmt;
use std::io::Write as _;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use bytes::Bytes;
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;
use subtle::ConstantTimeEq as _;

/// Version of this protocol, sent in every `id` message so new clients can tell what to expect.
pub const PROTOCOL_VERSION: u32 = 1;

/// The number a client is reached by: what the seed calls its "ID".
///
/// The seed client turns a typed ID into a JavaScript `Number`, so IDs stay integers on the wire; they
/// are random (see `registry`) so that knowing one ID tells nothing about the others.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientId(u64);

impl ClientId {
    /// Wraps a raw number; used by the registry when it draws a new ID and by tests.
    pub const fn new(raw: u64) -> Self {
        Self(raw)
    }

    /// The number as sent on the wire.
    pub const fn get(self) -> u64 {
        self.0
    }

    /// Reads an ID field: a JSON integer (what the seed sends) or a string of digits.
    fn from_raw(raw: &RawValue) -> Option<Self> {
        let text = raw.get();
        let digits = text
            .strip_prefix('"')
            .and_then(|t| t.strip_suffix('"'))
            .unwrap_or(text);
        // `u64::from_str` accepts a leading '+', JSON does not.
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        digits.parse().ok().filter(|&n| n != 0).map(Self)
    }
}

impl fmt::Display for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The secret that lets a reconnecting browser take its ID back.
///
/// 128 random bits, sent only in the `id` message over TLS, compared in constant time, and replaced
/// by a fresh one on every successful resume so a token is good for one reconnection.
/// Deliberately not `PartialEq`: the only comparison is [`ResumeToken::matches`], in constant time.
#[derive(Clone)]
pub struct ResumeToken([u8; ResumeToken::LEN]);

impl ResumeToken {
    /// Length of a token in bytes (128 bits).
    pub const LEN: usize = 16;
    /// Length of a token as sent on the wire: unpadded URL-safe base64.
    pub const ENCODED_LEN: usize = 22;

    /// Draws a new token from a cryptographically secure generator.
    pub fn random(rng: &mut impl rand::CryptoRng) -> Self {
        let mut bytes = [0u8; Self::LEN];
        rng.fill_bytes(&mut bytes);
        Self(bytes)
    }

    /// Reads a token as a client sends it back; `None` if it cannot be a token we issued.
    pub fn parse(text: &str) -> Option<Self> {
        if text.len() != Self::ENCODED_LEN {
            return None;
        }
        let mut bytes = [0u8; Self::LEN];
        match URL_SAFE_NO_PAD.decode_slice(text, &mut bytes) {
            Ok(Self::LEN) => Some(Self(bytes)),
            _ => None,
        }
    }

    /// Compares two tokens without leaking, through timing, how many leading bytes match.
    pub fn matches(&self, other: &ResumeToken) -> bool {
        self.0.ct_eq(&other.0).into()
    }

    /// Appends the wire form (22 base64 characters, no quoting needed) to `out`.
    fn write_to(&self, out: &mut Vec<u8>) {
        let mut text = [0u8; Self::ENCODED_LEN];
        let written = URL_SAFE_NO_PAD
            .encode_slice(self.0, &mut text)
            .expect("22 bytes hold 16 bytes of unpadded base64");
        out.extend_from_slice(&text[..written]);
    }
}

impl fmt::Display for ResumeToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut text = Vec::with_capacity(Self::ENCODED_LEN);
        self.write_to(&mut text);
        f.write_str(std::str::from_utf8(&text).expect("base64 is ASCII"))
    }
}

impl fmt::Debug for ResumeToken {
    /// Never prints the secret, so a token cannot leak through a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ResumeToken(..)")
    }
}

/// Stable, machine-readable error codes sent in `{"type":"error","code":...}`.
///
/// The whole wire vocabulary lives here, including the codes the session layer uses for limits it
/// enforces itself (size, frame type, rates), so clients see one consistent set. Codes never change
/// meaning once released; new ones may be added.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorCode {
    /// The frame is not valid JSON, or not a JSON object.
    InvalidJson,
    /// The JSON nests objects and arrays deeper than the server allows.
    TooDeep,
    /// The `type` field names no message the server knows.
    UnknownType,
    /// A field the message type needs is absent (or `null`).
    MissingField,
    /// A field has the wrong JSON type or a value outside what it may hold.
    InvalidField,
    /// The message's `id` is not the ID this connection was given.
    IdMismatch,
    /// The called ID belongs to nobody right now.
    UnknownClient,
    /// A client tried to call its own ID.
    CannotCallSelf,
    /// A new call was started while this connection already has one.
    AlreadyInCall,
    /// The message addresses a client this connection has no call with.
    NotInCall,
    /// The call exists but is in a state where this message makes no sense (e.g. an answer before
    /// an offer was accepted).
    WrongCallState,
    /// A resume named an unknown or expired ID, or the token did not match.
    ResumeFailed,
    /// A resume was sent by a connection that is itself in a call; hang up first.
    ResumeNotAllowed,
    /// This connection was taken over by a resume from another connection.
    SessionReplaced,
    /// A message the client sent was accepted but will not reach its recipient (see
    /// [`ServerMessage::Undelivered`]).
    Undelivered,
    /// The frame is larger than the server accepts (enforced by the session layer).
    MessageTooLarge,
    /// A binary frame arrived; the protocol is JSON text only (enforced by the session layer).
    BinaryNotSupported,
    /// The connection sends messages faster than allowed (enforced by the session layer).
    RateLimited,
    /// The connection starts new calls faster than allowed (enforced by the session layer).
    TooManyCalls,
    /// This address has too many open connections (enforced by the session layer).
    TooManyConnections,
    /// The server holds as many clients as it is configured for; try again later.
    ServerFull,
    /// The connection broke the rules too often and will be closed.
    TooManyViolations,
    /// Something went wrong on the server; the message was not processed.
    InternalError,
    /// The cluster's shared registry (Redis) cannot be reached, so an action that needs it (a new
    /// ID, a resume, a call to a client on another node) failed; retry later.
    ClusterUnavailable,
}

impl ErrorCode {
    /// Every code, for documentation checks and metrics registration.
    pub const ALL: [ErrorCode; 24] = [
        Self::InvalidJson,
        Self::TooDeep,
        Self::UnknownType,
        Self::MissingField,
        Self::InvalidField,
        Self::IdMismatch,
        Self::UnknownClient,
        Self::CannotCallSelf,
        Self::AlreadyInCall,
        Self::NotInCall,
        Self::WrongCallState,
        Self::ResumeFailed,
        Self::ResumeNotAllowed,
        Self::SessionReplaced,
        Self::Undelivered,
        Self::MessageTooLarge,
        Self::BinaryNotSupported,
        Self::RateLimited,
        Self::TooManyCalls,
        Self::TooManyConnections,
        Self::ServerFull,
        Self::TooManyViolations,
        Self::InternalError,
        Self::ClusterUnavailable,
    ];

    /// The stable snake_case code sent on the wire.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::InvalidJson => "invalid_json",
            Self::TooDeep => "too_deep",
            Self::UnknownType => "unknown_type",
            Self::MissingField => "missing_field",
            Self::InvalidField => "invalid_field",
            Self::IdMismatch => "id_mismatch",
            Self::UnknownClient => "unknown_client",
            Self::CannotCallSelf => "cannot_call_self",
            Self::AlreadyInCall => "already_in_call",
            Self::NotInCall => "not_in_call",
            Self::WrongCallState => "wrong_call_state",
            Self::ResumeFailed => "resume_failed",
            Self::ResumeNotAllowed => "resume_not_allowed",
            Self::SessionReplaced => "session_replaced",
            Self::Undelivered => "undelivered",
            Self::MessageTooLarge => "message_too_large",
            Self::BinaryNotSupported => "binary_not_supported",
            Self::RateLimited => "rate_limited",
            Self::TooManyCalls => "too_many_calls",
            Self::TooManyConnections => "too_many_connections",
            Self::ServerFull => "server_full",
            Self::TooManyViolations => "too_many_violations",
            Self::InternalError => "internal_error",
            Self::ClusterUnavailable => "cluster_unavailable",
        }
    }

    /// Plain words for this code, for errors the session layer raises itself (size, rate, frame
    /// type) where there is no more specific message.
    pub const fn describe(self) -> &'static str {
        match self {
            Self::InvalidJson => "The message is not a valid JSON object.",
            Self::TooDeep => "The message nests objects and arrays too deeply.",
            Self::UnknownType => "The message type is not one this server knows.",
            Self::MissingField => "The message lacks a field its type needs.",
            Self::InvalidField => "A field of the message has the wrong type or value.",
            Self::IdMismatch => "The message's id is not this connection's ID.",
            Self::UnknownClient => "Nobody with that ID is connected.",
            Self::CannotCallSelf => "You cannot call your own ID.",
            Self::AlreadyInCall => "You are already in a call; hang up first.",
            Self::NotInCall => "You have no call with that client.",
            Self::WrongCallState => "The call is not in a state where that message is allowed.",
            Self::ResumeFailed => {
                "That ID cannot be resumed: it is unknown or expired, or the token is wrong."
            }
            Self::ResumeNotAllowed => "Hang up your current call before resuming another ID.",
            Self::SessionReplaced => "Another connection resumed this ID; this one is closing.",
            Self::Undelivered => "A message you sent could not be delivered.",
            Self::MessageTooLarge => "The message is larger than the server accepts.",
            Self::BinaryNotSupported => "Binary frames are not supported; send JSON text.",
            Self::RateLimited => "You are sending messages too fast; slow down.",
            Self::TooManyCalls => "You are starting calls too fast; wait a minute.",
            Self::TooManyConnections => "Too many connections from your address.",
            Self::ServerFull => "The server is full; try again later.",
            Self::TooManyViolations => "Too many invalid messages; the connection is closing.",
            Self::InternalError => "Something went wrong on the server.",
            Self::ClusterUnavailable => {
                "The cluster cannot be reached right now; nothing was done. Try again shortly."
            }
        }
    }

    /// Whether this error shows a misbehaving client (counted towards closing it with 1008), as
    /// opposed to an ordinary race such as calling someone who just left.
    pub const fn is_violation(self) -> bool {
        matches!(
            self,
            Self::InvalidJson
                | Self::TooDeep
                | Self::UnknownType
                | Self::MissingField
                | Self::InvalidField
                | Self::IdMismatch
                | Self::MessageTooLarge
                | Self::BinaryNotSupported
                | Self::RateLimited
                | Self::TooManyCalls
        )
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// WebSocket close codes the server uses (RFC 6455 §7.4 and the IANA registry).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CloseCode {
    /// 1000: the conversation is over; nothing to resume.
    Normal,
    /// 1001: the server is going away (restart, deploy); reconnect and resume.
    GoingAway,
    /// 1002: the client broke the WebSocket framing rules (unmasked frame, reserved bits, a
    /// continuation without a message, an invalid close frame).
    ProtocolError,
    /// 1007: a text message (or a close reason) is not UTF-8.
    InvalidPayload,
    /// 1008: the client broke a rule (too many violations, too slow to read, taken over by a resume).
    PolicyViolation,
    /// 1009: a frame exceeded the size limit.
    MessageTooBig,
    /// 1011: the server hit an unexpected condition.
    InternalError,
    /// 1013: the server is full; try again later.
    TryAgainLater,
}

impl CloseCode {
    /// The numeric code for the close frame.
    pub const fn as_u16(self) -> u16 {
        match self {
            Self::Normal => 1000,
            Self::GoingAway => 1001,
            Self::ProtocolError => 1002,
            Self::InvalidPayload => 1007,
            Self::PolicyViolation => 1008,
            Self::MessageTooBig => 1009,
            Self::InternalError => 1011,
            Self::TryAgainLater => 1013,
        }
    }
}

/// Why a call ended, sent as `reason` in `close-call-server`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum EndReason {
    /// The peer hung up (`close-call-client` without a reason, or with `"hangup"`).
    Hangup,
    /// The caller gave up before the call was answered (`cancel`).
    Cancelled,
    /// The peer's media connection failed and it gave up (`close-call-client` with `"failed"`).
    Failed,
    /// The peer's connection closed and it did not come back within the resume grace period.
    PeerGone,
}

impl EndReason {
    /// The reason as sent on the wire.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Hangup => "hangup",
            Self::Cancelled => "cancelled",
            Self::Failed => "failed",
            Self::PeerGone => "peer_gone",
        }
    }
}

/// The message types a client may send.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum MessageKind {
    /// Seed: start a call with an SDP offer.
    VideoOfferRequest,
    /// Seed: accept or decline a call, with the SDP answer.
    ClientReply,
    /// Seed: hang up.
    CloseCallClient,
    /// Seed: free text, only logged.
    Normal,
    /// Trickle ICE candidate for the call peer.
    IceCandidate,
    /// The callee's UI is showing the incoming call.
    Ringing,
    /// The caller gives up before an answer.
    Cancel,
    /// Renegotiation offer inside a connected call.
    Offer,
    /// Renegotiation answer inside a connected call.
    Answer,
    /// Take back an ID after a reconnect.
    Resume,
    /// Application-level liveness check; answered with `pong`.
    Ping,
    /// Acknowledges every server message up to a sequence number.
    Ack,
}

impl MessageKind {
    /// Every client message type.
    pub const ALL: [MessageKind; 12] = [
        Self::VideoOfferRequest,
        Self::ClientReply,
        Self::CloseCallClient,
        Self::Normal,
        Self::IceCandidate,
        Self::Ringing,
        Self::Cancel,
        Self::Offer,
        Self::Answer,
        Self::Resume,
        Self::Ping,
        Self::Ack,
    ];

    /// The `type` string on the wire.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::VideoOfferRequest => "video-offer-request",
            Self::ClientReply => "client-reply",
            Self::CloseCallClient => "close-call-client",
            Self::Normal => "normal",
            Self::IceCandidate => "ice-candidate",
            Self::Ringing => "ringing",
            Self::Cancel => "cancel",
            Self::Offer => "offer",
            Self::Answer => "answer",
            Self::Resume => "resume",
            Self::Ping => "ping",
            Self::Ack => "ack",
        }
    }

    /// Matches the raw JSON of a `type` field (quotes included) without unescaping or allocating.
    fn from_raw(raw: &RawValue) -> Option<Self> {
        Some(match raw.get() {
            "\"video-offer-request\"" => Self::VideoOfferRequest,
            "\"client-reply\"" => Self::ClientReply,
            "\"close-call-client\"" => Self::CloseCallClient,
            "\"normal\"" => Self::Normal,
            "\"ice-candidate\"" => Self::IceCandidate,
            "\"ringing\"" => Self::Ringing,
            "\"cancel\"" => Self::Cancel,
            "\"offer\"" => Self::Offer,
            "\"answer\"" => Self::Answer,
            "\"resume\"" => Self::Resume,
            "\"ping\"" => Self::Ping,
            "\"ack\"" => Self::Ack,
            _ => return None,
        })
    }
}

/// Why a message could not be held for its recipient.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DropReason {
    /// The ID's own budget (bytes or messages) is spent: it is away, or does not acknowledge.
    #[error("its queue is full")]
    QueueFull,
    /// The budget over all IDs is spent.
    #[error("the server is holding too many messages")]
    ServerBusy,
    /// The ID went away for good (left, or did not come back within the resume grace).
    #[error("it left or did not come back in time")]
    RecipientGone,
    /// The server that held the recipient failed (cluster: killed, or cut off) before the
    /// recipient confirmed receipt; what it had written to the recipient may be lost.
    #[error("its server failed before it confirmed receipt")]
    NodeFailed,
}

impl DropReason {
    /// The stable code sent as `reason` in the `undelivered` error.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::QueueFull => "queue_full",
            Self::ServerBusy => "server_busy",
            Self::RecipientGone => "recipient_gone",
            Self::NodeFailed => "node_failed",
        }
    }
}

/// Room kept at the end of every encoded server message for `,"seq":N` (N up to 20 digits), so
// the connections table can number it in place.
pub const SEQ_ROOM: usize = 28;

/// Why a frame could not be read as a client message. Each maps to one [`ErrorCode`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// The frame is not JSON at all.
    #[error("The message is not valid JSON: {0}.")]
    InvalidJson(#[source] serde_json::Error),
    /// The frame is JSON but not an object.
    #[error("The message must be a JSON object.")]
    NotAnObject,
    /// Objects and arrays nest deeper than allowed.
    #[error("The message nests objects and arrays more than {max} levels deep.")]
    TooDeep {
        /// The configured limit.
        max: usize,
    },
    /// No `type` field.
    #[error("The message has no \"type\" field.")]
    MissingType,
    /// `type` is present but names nothing we know.
    #[error("The message type is not one this server knows.")]
    UnknownType,
    /// A field the type needs is absent or null.
    #[error("A \"{kind}\" message needs a \"{field}\" field.", kind = kind.as_str())]
    MissingField {
        /// The message type being read.
        kind: MessageKind,
        /// The wire name of the missing field.
        field: &'static str,
    },
    /// A field holds the wrong JSON type or an impossible value.
    #[error("The \"{field}\" field must be {expected}.")]
    InvalidField {
        /// The wire name of the field.
        field: &'static str,
        /// What it should hold, in plain words.
        expected: &'static str,
    },
}

impl ProtocolError {
    /// The wire code for this error.
    pub const fn code(&self) -> ErrorCode {
        match self {
            Self::InvalidJson(_) | Self::NotAnObject => ErrorCode::InvalidJson,
            Self::TooDeep { .. } => ErrorCode::TooDeep,
            Self::MissingType | Self::UnknownType => ErrorCode::UnknownType,
            Self::MissingField { .. } => ErrorCode::MissingField,
            Self::InvalidField { .. } => ErrorCode::InvalidField,
        }
    }
}

/// One message from a client, with its payloads borrowed from the received frame.
#[derive(Debug)]
pub struct Inbound<'a> {
    /// The `id` the client says it has. Checked against the connection's own ID (except in
    /// `resume`, where `id` names the ID to take back); new clients may leave it out.
    pub claimed_id: Option<ClientId>,
    /// What the client asks for.
    pub message: ClientMessage<'a>,
}

/// What a client asks the server to do.
#[derive(Debug)]
#[non_exhaustive]
pub enum ClientMessage<'a> {
    /// Seed: call `callee` with an SDP offer (opaque JSON, relayed verbatim).
    VideoOfferRequest {
        /// Who is being called (`calleeId`).
        callee: ClientId,
        /// The caller's session description.
        offer: &'a RawValue,
    },
    /// Seed: the callee accepts or declines the call from `caller`.
    ClientReply {
        /// Who called (`callerId`).
        caller: ClientId,
        /// `reply` was "1" (or 1 / true).
        accepted: bool,
        /// The callee's session description; absent or null when declining.
        answer: Option<&'a RawValue>,
    },
    /// Seed: hang up the call with `peer`, optionally saying why.
    CloseCallClient {
        /// The other party (`clientId`).
        peer: ClientId,
        /// `reason`, defaulting to hang-up; unknown reasons are read as hang-up.
        reason: EndReason,
    },
    /// Seed: free text the server only logs.
    Normal {
        /// The `message` text.
        text: Cow<'a, str>,
    },
    /// A trickle ICE candidate for the call peer (opaque JSON, may be `null` for end-of-candidates).
    IceCandidate {
        /// The other party (`clientId`).
        peer: ClientId,
        /// The candidate, relayed verbatim.
        candidate: &'a RawValue,
    },
    /// The callee tells the caller its UI is ringing.
    Ringing {
        /// The caller (`clientId`).
        peer: ClientId,
    },
    /// The caller gives up before an answer.
    Cancel {
        /// The callee (`clientId`).
        peer: ClientId,
    },
    /// A renegotiation offer inside a connected call (screen share, ICE restart).
    Offer {
        /// The other party (`clientId`).
        peer: ClientId,
        /// The session description, relayed verbatim.
        offer: &'a RawValue,
    },
    /// A renegotiation answer inside a connected call.
    Answer {
        /// The other party (`clientId`).
        peer: ClientId,
        /// The session description, relayed verbatim.
        answer: &'a RawValue,
    },
    /// Take back `id` after a reconnect, proving ownership with `token`.
    Resume {
        /// The ID to take back.
        id: ClientId,
        /// The token from the last `id` message for that ID.
        token: ResumeToken,
        /// The highest `seq` the client processed for that ID (`last_seq`), if it says.
        last_seq: Option<u64>,
    },
    /// Application-level ping; the server answers `pong` to this connection.
    Ping,
    /// Every server message up to `seq` was processed; the server may free them.
    Ack {
        /// The highest `seq` processed.
        seq: u64,
    },
}

impl ClientMessage<'_> {
    /// The wire type of this message.
    pub const fn kind(&self) -> MessageKind {
        match self {
            Self::VideoOfferRequest { .. } => MessageKind::VideoOfferRequest,
            Self::ClientReply { .. } => MessageKind::ClientReply,
            Self::CloseCallClient { .. } => MessageKind::CloseCallClient,
            Self::Normal { .. } => MessageKind::Normal,
            Self::IceCandidate { .. } => MessageKind::IceCandidate,
            Self::Ringing { .. } => MessageKind::Ringing,
            Self::Cancel { .. } => MessageKind::Cancel,
            Self::Offer { .. } => MessageKind::Offer,
            Self::Answer { .. } => MessageKind::Answer,
            Self::Resume { .. } => MessageKind::Resume,
            Self::Ping => MessageKind::Ping,
            Self::Ack { .. } => MessageKind::Ack,
        }
    }
}

/// Every field any client message may carry, each kept as raw JSON (with `null` preserved) so the
/// per-type rules below can tell "missing" from "wrong type" and say which field was wrong.
#[derive(Deserialize)]
struct Fields<'a> {
    #[serde(rename = "type", borrow, default, deserialize_with = "present")]
    kind: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    id: Option<&'a RawValue>,
    #[serde(rename = "calleeId", borrow, default, deserialize_with = "present")]
    callee_id: Option<&'a RawValue>,
    #[serde(rename = "callerId", borrow, default, deserialize_with = "present")]
    caller_id: Option<&'a RawValue>,
    #[serde(rename = "clientId", borrow, default, deserialize_with = "present")]
    client_id: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    offer: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    answer: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    candidate: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    reply: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    reason: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    message: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    token: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    seq: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    last_seq: Option<&'a RawValue>,
}

/// Deserializes a present field as raw JSON, keeping `null` (plain `Option` would turn it into `None`).
fn present<'de, D: Deserializer<'de>>(de: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(de).map(Some)
}

/// Rejects frames that are not a JSON object or nest deeper than `max_depth`, in one cheap pass
/// over the bytes before serde sees them (serde's own recursion limit is 128 and costs stack).
///
/// Only structure outside strings is counted; strings are skipped with `memchr`, so a 3 KB SDP costs
/// one vectorised search. Malformed JSON is left for serde to describe.
pub fn check_shape(frame: &[u8], max_depth: usize) -> Result<(), ProtocolError> {
    let start = frame.iter().position(|b| !b.is_ascii_whitespace());
    if start.is_none_or(|i| frame[i] != b'{') {
        // Let serde say what is wrong with non-JSON; only well-formed non-objects are ours to name.
        return match serde_json::from_slice::<serde::de::IgnoredAny>(frame) {
            Ok(_) => Err(ProtocolError::NotAnObject),
            Err(e) => Err(ProtocolError::InvalidJson(e)),
        };
    }
    let mut depth = 0usize;
    let mut i = 0;
    while i < frame.len() {
        match frame[i] {
            b'"' => {
                // Jump from quote to quote; a quote ends the string unless an odd number of
                // backslashes precedes it. SDP is full of `\r\n` escapes but has no quotes, so
                // this crosses a 3 KB SDP in one `memchr`.
                let mut from = i + 1;
                loop {
                    let Some(at) = memchr::memchr(b'"', &frame[from..]) else {
                        return Ok(()); // unterminated: serde will say so
                    };
                    let quote = from + at;
                    let escapes = frame[..quote]
                        .iter()
                        .rev()
                        .take_while(|&&b| b == b'\\')
                        .count();
                    if escapes % 2 == 0 {
                        i = quote;
                        break;
                    }
                    from = quote + 1;
                }
            }
            b'{' | b'[' => {
                depth += 1;
                if depth > max_depth {
                    return Err(ProtocolError::TooDeep { max: max_depth });
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    Ok(())
}

/// Reads one text frame as a client message.
///
/// Payloads the server relays stay borrowed from `frame`; nothing is allocated unless a `normal`
/// text contains escapes.
pub fn parse(frame: &[u8], max_depth: usize) -> Result<Inbound<'_>, ProtocolError> {
    check_shape(frame, max_depth)?;
    let fields: Fields<'_> = serde_json::from_slice(frame).map_err(ProtocolError::InvalidJson)?;
    let kind = fields.kind.ok_or(ProtocolError::MissingType)?;
    let kind = MessageKind::from_raw(kind).ok_or(if kind.get().starts_with('"') {
        ProtocolError::UnknownType
    } else {
        ProtocolError::InvalidField {
            field: "type",
            expected: "a string",
        }
    })?;

    let need = |field, value| need(kind, field, value);
    let need_id = |field, value| need_id(kind, field, value);

    let claimed_id = match (kind, fields.id) {
        (MessageKind::Resume, _) | (_, None) => None,
        (_, Some(raw)) if raw.get() == "null" => None,
        (_, Some(raw)) => Some(ClientId::from_raw(raw).ok_or(ProtocolError::InvalidField {
            field: "id",
            expected: "a positive integer client ID",
        })?),
    };

    let message = match kind {
        MessageKind::VideoOfferRequest => ClientMessage::VideoOfferRequest {
            callee: need_id("calleeId", fields.callee_id)?,
            offer: need("offer", fields.offer)?,
        },
        MessageKind::ClientReply => ClientMessage::ClientReply {
            caller: need_id("callerId", fields.caller_id)?,
            accepted: match need("reply", fields.reply)?.get() {
                "\"1\"" | "1" | "true" => true,
                "\"0\"" | "0" | "false" => false,
                _ => {
                    return Err(ProtocolError::InvalidField {
                        field: "reply",
                        expected: "\"1\" (accept) or \"0\" (decline)",
                    })
                }
            },
            answer: fields.answer.filter(|a| a.get() != "null"),
        },
        MessageKind::CloseCallClient => ClientMessage::CloseCallClient {
            peer: need_id("clientId", fields.client_id)?,
            reason: match fields.reason {
                None => EndReason::Hangup,
                Some(r) if r.get() == "\"failed\"" => EndReason::Failed,
                // Unknown reasons are read as a hang-up so newer clients can add their own.
                Some(r) if r.get() == "null" || r.get().starts_with('"') => EndReason::Hangup,
                Some(_) => {
                    return Err(ProtocolError::InvalidField {
                        field: "reason",
                        expected: "a string",
                    })
                }
            },
        },
        MessageKind::Normal => ClientMessage::Normal {
            text: serde_json::from_str::<Cow<'_, str>>(need("message", fields.message)?.get())
                .map_err(|_| ProtocolError::InvalidField {
                    field: "message",
                    expected: "a string",
                })?,
        },
        MessageKind::IceCandidate => ClientMessage::IceCandidate {
            peer: need_id("clientId", fields.client_id)?,
            // `null` is the standard end-of-candidates marker, so only absence is an error here.
            candidate: fields.candidate.ok_or(ProtocolError::MissingField {
                kind,
                field: "candidate",
            })?,
        },
        MessageKind::Ringing => ClientMessage::Ringing {
            peer: need_id("clientId", fields.client_id)?,
        },
        MessageKind::Cancel => ClientMessage::Cancel {
            peer: need_id("clientId", fields.client_id)?,
        },
        MessageKind::Offer => ClientMessage::Offer {
            peer: need_id("clientId", fields.client_id)?,
            offer: need("offer", fields.offer)?,
        },
        MessageKind::Answer => ClientMessage::Answer {
            peer: need_id("clientId", fields.client_id)?,
            answer: need("answer", fields.answer)?,
        },
        MessageKind::Resume => ClientMessage::Resume {
            id: need_id("id", fields.id)?,
            token: need("token", fields.token)?
                .get()
                .strip_prefix('"')
                .and_then(|t| t.strip_suffix('"'))
                .and_then(ResumeToken::parse)
                .ok_or(ProtocolError::InvalidField {
                    field: "token",
                    expected: "the token from the last \"id\" message",
                })?,
            last_seq: match fields.last_seq {
                Some(raw) if raw.get() != "null" => Some(sequence_number("last_seq", raw)?),
                _ => None,
            },
        },
        MessageKind::Ping => ClientMessage::Ping,
        MessageKind::Ack => ClientMessage::Ack {
            seq: sequence_number("seq", need("seq", fields.seq)?)?,
        },
    };
    Ok(Inbound {
        claimed_id,
        message,
    })
}

/// A sequence number field: a non-negative JSON integer.
fn sequence_number(field: &'static str, raw: &RawValue) -> Result<u64, ProtocolError> {
    let text = raw.get();
    text.bytes()
        .all(|b| b.is_ascii_digit())
        .then(|| text.parse().ok())
        .flatten()
        .ok_or(ProtocolError::InvalidField {
            field,
            expected: "a sequence number (a non-negative integer)",
        })
}

/// A field the message type cannot do without; `null` counts as absent.
fn need<'r>(
    kind: MessageKind,
    field: &'static str,
    value: Option<&'r RawValue>,
) -> Result<&'r RawValue, ProtocolError> {
    value
        .filter(|v| v.get() != "null")
        .ok_or(ProtocolError::MissingField { kind, field })
}

/// A client ID field the message type cannot do without.
fn need_id(
    kind: MessageKind,
    field: &'static str,
    value: Option<&RawValue>,
) -> Result<ClientId, ProtocolError> {
    ClientId::from_raw(need(kind, field, value)?).ok_or(ProtocolError::InvalidField {
        field,
        expected: "a positive integer client ID",
    })
}

/// A message from the server to one client, borrowing what it relays.
#[derive(Debug)]
#[non_exhaustive]
pub enum ServerMessage<'a> {
    /// Seed (extended): "this is your ID", on connect and after a resume.
    Id {
        /// The connection's ID.
        id: ClientId,
        /// The secret for taking the ID back after a reconnect.
        token: &'a ResumeToken,
        /// True when this answers a successful `resume`.
        resumed: bool,
        /// After a resume: the `seq` range dropped for the ID while it was away (both inclusive).
        missed: Option<(u64, u64)>,
        /// After a resume from a server that failed: messages it numbered from here on may be
        /// lost and how many is unknown; sent as `"missed":[first,null]` (with `missed`'s first
        /// number if lower).
        lost_from: Option<u64>,
        /// How often the server pings at the WebSocket level, so clients can size their own timeouts.
        heartbeat: Duration,
        /// ICE servers (STUN/TURN with credentials) as opaque JSON from the caller of the hub.
        ice_servers: Option<&'a RawValue>,
    },
    /// Seed: an incoming call.
    VideoAnswerRequest {
        /// Who calls.
        caller: ClientId,
        /// The caller's offer, verbatim.
        offer: &'a RawValue,
    },
    /// Seed: the callee's decision.
    ServerReply {
        /// Whether the callee accepted.
        accepted: bool,
        /// Who was called.
        callee: ClientId,
        /// The callee's answer, verbatim, or `null`.
        answer: Option<&'a RawValue>,
    },
    /// Seed (extended with `reason`): the call with `peer` is over.
    CloseCallServer {
        /// The other party.
        peer: ClientId,
        /// Why it ended.
        reason: EndReason,
    },
    /// A trickle ICE candidate from the call peer.
    IceCandidate {
        /// Who sent it.
        peer: ClientId,
        /// The candidate, verbatim.
        candidate: &'a RawValue,
    },
    /// The callee's UI is ringing.
    Ringing {
        /// The callee.
        peer: ClientId,
    },
    /// The callee is already in a call; nothing was sent to it.
    Busy {
        /// The callee.
        peer: ClientId,
    },
    /// Renegotiation offer from the call peer.
    Offer {
        /// Who sent it.
        peer: ClientId,
        /// The session description, verbatim.
        offer: &'a RawValue,
    },
    /// Renegotiation answer from the call peer.
    Answer {
        /// Who sent it.
        peer: ClientId,
        /// The session description, verbatim.
        answer: &'a RawValue,
    },
    /// Answer to `ping`.
    Pong,
    /// An `error` with code `undelivered`: messages the client sent to `to` were accepted but
    /// will not be delivered.
    Undelivered {
        /// The recipient.
        to: ClientId,
        /// Why.
        reason: DropReason,
        /// How many of the client's messages this covers.
        count: usize,
        /// The type of the client's message(s), when all were of one type.
        request: Option<MessageKind>,
    },
    /// The last message could not be processed.
    Error {
        /// Stable machine code.
        code: ErrorCode,
        /// Plain words for humans and logs.
        message: &'a str,
        /// The type of the message that caused it, when known.
        request: Option<MessageKind>,
    },
}

/// The type of a message the server sends, known when the message is built, so nothing
/// downstream (metrics, the session) has to read it back out of the bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ServerKind {
    /// `id`.
    Id,
    /// `video-answer-request`.
    VideoAnswerRequest,
    /// `server-reply`.
    ServerReply,
    /// `close-call-server`.
    CloseCallServer,
    /// `ice-candidate`.
    IceCandidate,
    /// `ringing`.
    Ringing,
    /// `busy`.
    Busy,
    /// `offer`.
    Offer,
    /// `answer`.
    Answer,
    /// `pong`.
    Pong,
    /// `error`, with its code (`undelivered` included).
    Error(ErrorCode),
}

impl ServerKind {
    /// Every `"type"` the server sends, in [`ServerKind::type_index`] order.
    pub const TYPES: [&'static str; 11] = [
        "id",
        "video-answer-request",
        "server-reply",
        "close-call-server",
        "ice-candidate",
        "ringing",
        "busy",
        "offer",
        "answer",
        "pong",
        "error",
    ];

    /// The position of this kind's `"type"` in [`ServerKind::TYPES`] (errors share one).
    pub const fn type_index(self) -> usize {
        match self {
            Self::Id => 0,
            Self::VideoAnswerRequest => 1,
            Self::ServerReply => 2,
            Self::CloseCallServer => 3,
            Self::IceCandidate => 4,
            Self::Ringing => 5,
            Self::Busy => 6,
            Self::Offer => 7,
            Self::Answer => 8,
            Self::Pong => 9,
            Self::Error(_) => 10,
        }
    }

    /// The `"type"` on the wire.
    pub const fn as_str(self) -> &'static str {
        Self::TYPES[self.type_index()]
    }
}

/// A ready-to-send text frame and its type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerFrame {
    /// What kind of message it is.
    pub kind: ServerKind,
    /// The JSON text, as sent.
    pub bytes: Bytes,
}

impl ServerFrame {
    /// Its length in bytes.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Whether it is empty (never, for a frame callgate built).
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

impl ServerMessage<'_> {
    /// Serialises the message once into a ready-to-send WebSocket text payload.
    pub fn encode(&self) -> Bytes {
        Bytes::from(self.to_json())
    }

    /// [`ServerMessage::encode`], with the message's kind.
    pub fn frame(&self) -> ServerFrame {
        ServerFrame {
            kind: self.kind(),
            bytes: self.encode(),
        }
    }

    /// The message's type.
    pub const fn kind(&self) -> ServerKind {
        match self {
            Self::Id { .. } => ServerKind::Id,
            Self::VideoAnswerRequest { .. } => ServerKind::VideoAnswerRequest,
            Self::ServerReply { .. } => ServerKind::ServerReply,
            Self::CloseCallServer { .. } => ServerKind::CloseCallServer,
            Self::IceCandidate { .. } => ServerKind::IceCandidate,
            Self::Ringing { .. } => ServerKind::Ringing,
            Self::Busy { .. } => ServerKind::Busy,
            Self::Offer { .. } => ServerKind::Offer,
            Self::Answer { .. } => ServerKind::Answer,
            Self::Pong => ServerKind::Pong,
            Self::Undelivered { .. } => ServerKind::Error(ErrorCode::Undelivered),
            Self::Error { code, .. } => ServerKind::Error(*code),
        }
    }

    /// The message's JSON, with room at the end for the `seq` the connections table adds (see
    /// [`super::delivery::Envelope`]), so numbering it never copies or reallocates.
    pub fn to_json(&self) -> Vec<u8> {
        let payload_len = match self {
            Self::VideoAnswerRequest { offer: raw, .. }
            | Self::IceCandidate { candidate: raw, .. }
            | Self::Offer { offer: raw, .. }
            | Self::Answer { answer: raw, .. } => raw.get().len(),
            Self::ServerReply { answer, .. } => answer.map_or(0, |a| a.get().len()),
            Self::Id { ice_servers, .. } => ice_servers.map_or(0, |a| a.get().len()),
            Self::Error { message, .. } => message.len() + 64,
            Self::Undelivered { .. } => 128,
            _ => 0,
        };
        let mut out = Vec::with_capacity(96 + SEQ_ROOM + payload_len);
        self.write_to(&mut out)
            .expect("writing to a Vec cannot fail");
        out
    }

    fn write_to(&self, out: &mut Vec<u8>) -> std::io::Result<()> {
        match self {
            Self::Id {
                id,
                token,
                resumed,
                missed,
                lost_from,
                heartbeat,
                ice_servers,
            } => {
                write!(out, r#"{{"type":"id","id":{id},"token":""#)?;
                token.write_to(out);
                write!(
                    out,
                    r#"","resumed":{resumed},"version":{PROTOCOL_VERSION},"heartbeatMs":{}"#,
                    heartbeat.as_millis()
                )?;
                match (missed, lost_from) {
                    (missed, Some(from)) => {
                        let first = missed.map_or(*from, |(first, _)| first.min(*from));
                        write!(out, r#","missed":[{first},null]"#)?;
                    }
                    (Some((first, last)), None) => {
                        write!(out, r#","missed":[{first},{last}]"#)?;
                    }
                    (None, None) => {}
                }
                if let Some(ice) = ice_servers {
                    out.extend_from_slice(br#","iceServers":"#);
                    out.extend_from_slice(ice.get().as_bytes());
                }
                out.push(b'}');
            }
            Self::VideoAnswerRequest { caller, offer } => {
                write!(
                    out,
                    r#"{{"type":"video-answer-request","callerId":{caller},"offer":"#
                )?;
                raw_then_close(out, offer);
            }
            Self::ServerReply {
                accepted,
                callee,
                answer,
            } => {
                let reply = if *accepted { "1" } else { "0" };
                write!(
                    out,
                    r#"{{"type":"server-reply","reply":"{reply}","calleeId":{callee},"answer":"#
                )?;
                match answer {
                    Some(answer) => raw_then_close(out, answer),
                    None => out.extend_from_slice(b"null}"),
                }
            }
            Self::CloseCallServer { peer, reason } => write!(
                out,
                r#"{{"type":"close-call-server","clientId":{peer},"reason":"{}"}}"#,
                reason.as_str()
            )?,
            Self::IceCandidate { peer, candidate } => {
                write!(
                    out,
                    r#"{{"type":"ice-candidate","clientId":{peer},"candidate":"#
                )?;
                raw_then_close(out, candidate);
            }
            Self::Ringing { peer } => write!(out, r#"{{"type":"ringing","clientId":{peer}}}"#)?,
            Self::Busy { peer } => write!(out, r#"{{"type":"busy","clientId":{peer}}}"#)?,
            Self::Offer { peer, offer } => {
                write!(out, r#"{{"type":"offer","clientId":{peer},"offer":"#)?;
                raw_then_close(out, offer);
            }
            Self::Answer { peer, answer } => {
                write!(out, r#"{{"type":"answer","clientId":{peer},"answer":"#)?;
                raw_then_close(out, answer);
            }
            Self::Pong => out.extend_from_slice(br#"{"type":"pong"}"#),
            Self::Undelivered {
                to,
                reason,
                count,
                request,
            } => {
                let code = ErrorCode::Undelivered;
                let sentence = match (request, count) {
                    (Some(kind), 1) => {
                        format!(
                            "Your {} to {to} was not delivered: {reason}.",
                            kind.as_str()
                        )
                    }
                    (_, 1) => format!("Your message to {to} was not delivered: {reason}."),
                    // How many is unknown (its server failed): say so rather than a number.
                    (_, 0) => format!("Messages you sent to {to} lately may be lost: {reason}."),
                    (_, n) => format!("{n} of your messages to {to} were not delivered: {reason}."),
                };
                write!(out, r#"{{"type":"error","code":"{code}","message":"#)?;
                serde_json::to_writer(&mut *out, &sentence)?;
                if let Some(request) = request {
                    write!(out, r#","request":"{}""#, request.as_str())?;
                }
                write!(
                    out,
                    r#","clientId":{to},"reason":"{}","count":{count}}}"#,
                    reason.as_str()
                )?;
            }
            Self::Error {
                code,
                message,
                request,
            } => {
                write!(out, r#"{{"type":"error","code":"{code}","message":"#)?;
                serde_json::to_writer(&mut *out, message)?;
                if let Some(request) = request {
                    write!(out, r#","request":"{}""#, request.as_str())?;
                }
                out.push(b'}');
            }
        }
        Ok(())
    }
}

fn raw_then_close(out: &mut Vec<u8>, raw: &RawValue) {
    out.extend_from_slice(raw.get().as_bytes());
    out.push(b'}');
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEPTH: usize = 32;

    fn parse_ok(text: &str) -> Inbound<'_> {
        parse(text.as_bytes(), DEPTH).unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    fn code_of(text: &str) -> ErrorCode {
        match parse(text.as_bytes(), DEPTH) {
            Ok(m) => panic!("{text} parsed as {m:?}"),
            Err(e) => e.code(),
        }
    }

    fn raw(text: &str) -> Box<RawValue> {
        RawValue::from_string(text.to_owned()).unwrap()
    }

    #[test]
    fn reads_the_seed_offer_with_the_sdp_object_borrowed_verbatim() {
        let text = r#"{"type":"video-offer-request","id":123456789,"calleeId":987654321,"offer":{"type":"offer","sdp":"v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\n"}}"#;
        let inbound = parse_ok(text);
        assert_eq!(inbound.claimed_id, Some(ClientId::new(123456789)));
        match inbound.message {
            ClientMessage::VideoOfferRequest { callee, offer } => {
                assert_eq!(callee, ClientId::new(987654321));
                assert_eq!(
                    offer.get(),
                    r#"{"type":"offer","sdp":"v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\n"}"#
                );
                // Borrowed from the frame, not copied.
                let range = text.as_bytes().as_ptr_range();
                assert!(range.contains(&offer.get().as_ptr()));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn reads_every_spelling_of_reply() {
        for (reply, accepted) in [
            ("\"1\"", true),
            ("1", true),
            ("true", true),
            ("\"0\"", false),
            ("0", false),
            ("false", false),
        ] {
            let text = format!(
                r#"{{"type":"client-reply","reply":{reply},"id":5,"callerId":6,"answer":null}}"#
            );
            match parse_ok(&text).message {
                ClientMessage::ClientReply {
                    caller,
                    accepted: a,
                    answer,
                } => {
                    assert_eq!(caller, ClientId::new(6));
                    assert_eq!(a, accepted, "{reply}");
                    assert!(answer.is_none());
                }
                other => panic!("{other:?}"),
            }
        }
        for bad in ["\"yes\"", "2", "[]", "{}", "\"\""] {
            let text = format!(r#"{{"type":"client-reply","reply":{bad},"callerId":6}}"#);
            assert_eq!(code_of(&text), ErrorCode::InvalidField, "{bad}");
        }
    }

    #[test]
    fn ids_are_positive_integers_or_digit_strings() {
        for (id, want) in [("42", Some(42)), ("\"42\"", Some(42))] {
            let text = format!(r#"{{"type":"ringing","clientId":{id}}}"#);
            match parse_ok(&text).message {
                ClientMessage::Ringing { peer } => assert_eq!(Some(peer.get()), want),
                other => panic!("{other:?}"),
            }
        }
        for bad in [
            "0",
            "-1",
            "1.5",
            "1e9",
            "\"\"",
            "\"+1\"",
            "\"abc\"",
            "true",
            "{}",
            "[1]",
            "99999999999999999999999",
        ] {
            let text = format!(r#"{{"type":"ringing","clientId":{bad}}}"#);
            assert_eq!(code_of(&text), ErrorCode::InvalidField, "{bad}");
            let text = format!(r#"{{"type":"ping","id":{bad}}}"#);
            assert_eq!(code_of(&text), ErrorCode::InvalidField, "id {bad}");
        }
    }

    #[test]
    fn bad_frames_get_the_right_code() {
        let cases = [
            ("", ErrorCode::InvalidJson),
            ("hello", ErrorCode::InvalidJson),
            ("{", ErrorCode::InvalidJson),
            (r#"{"type":"ping""#, ErrorCode::InvalidJson),
            (r#"{"type":"ping"} x"#, ErrorCode::InvalidJson),
            (r#"{"type":"ping","type":"ping"}"#, ErrorCode::InvalidJson),
            ("[1,2]", ErrorCode::InvalidJson),
            ("42", ErrorCode::InvalidJson),
            ("\"video-offer-request\"", ErrorCode::InvalidJson),
            ("{}", ErrorCode::UnknownType),
            (r#"{"type":"dance"}"#, ErrorCode::UnknownType),
            (r#"{"type":"PING"}"#, ErrorCode::UnknownType),
            (r#"{"type":7}"#, ErrorCode::InvalidField),
            (
                r#"{"type":"video-offer-request","offer":{}}"#,
                ErrorCode::MissingField,
            ),
            (
                r#"{"type":"video-offer-request","calleeId":5}"#,
                ErrorCode::MissingField,
            ),
            (
                r#"{"type":"video-offer-request","calleeId":5,"offer":null}"#,
                ErrorCode::MissingField,
            ),
            (
                r#"{"type":"video-offer-request","calleeId":"x","offer":{}}"#,
                ErrorCode::InvalidField,
            ),
            (
                r#"{"type":"client-reply","callerId":5}"#,
                ErrorCode::MissingField,
            ),
            (r#"{"type":"close-call-client"}"#, ErrorCode::MissingField),
            (
                r#"{"type":"close-call-client","clientId":5,"reason":3}"#,
                ErrorCode::InvalidField,
            ),
            (r#"{"type":"normal"}"#, ErrorCode::MissingField),
            (r#"{"type":"normal","message":5}"#, ErrorCode::InvalidField),
            (
                r#"{"type":"ice-candidate","clientId":5}"#,
                ErrorCode::MissingField,
            ),
            (r#"{"type":"offer","clientId":5}"#, ErrorCode::MissingField),
            (r#"{"type":"answer","clientId":5}"#, ErrorCode::MissingField),
            (r#"{"type":"cancel"}"#, ErrorCode::MissingField),
            (
                r#"{"type":"resume","token":"AAAAAAAAAAAAAAAAAAAAAA"}"#,
                ErrorCode::MissingField,
            ),
            (r#"{"type":"resume","id":5}"#, ErrorCode::MissingField),
            (
                r#"{"type":"resume","id":5,"token":"short"}"#,
                ErrorCode::InvalidField,
            ),
            (
                r#"{"type":"resume","id":5,"token":7}"#,
                ErrorCode::InvalidField,
            ),
        ];
        for (text, code) in cases {
            assert_eq!(code_of(text), code, "{text}");
        }
    }

    #[test]
    fn nesting_is_limited_before_serde_runs() {
        for depth in 1..=40 {
            let payload = format!("{}{}", "[".repeat(depth - 1), "]".repeat(depth - 1));
            let payload = if depth == 1 { "1".to_owned() } else { payload };
            let text = format!(r#"{{"type":"ice-candidate","clientId":5,"candidate":{payload}}}"#);
            let result = parse(text.as_bytes(), DEPTH);
            if depth <= DEPTH {
                assert!(result.is_ok(), "depth {depth}: {result:?}");
            } else {
                assert_eq!(
                    result.unwrap_err().code(),
                    ErrorCode::TooDeep,
                    "depth {depth}"
                );
            }
        }
        // Brackets inside strings, including after escaped quotes, do not count.
        let text = format!(
            r#"{{"type":"normal","message":"\"{}\\"}}"#,
            "[{".repeat(100)
        );
        assert!(parse(text.as_bytes(), DEPTH).is_ok());
        let text = format!(
            r#"{{"type":"normal","message":"x\\\"{}\\\\"}}"#,
            "[".repeat(100)
        );
        assert!(parse(text.as_bytes(), DEPTH).is_ok(), "{text}");
        // Deep garbage that serde would also reject is still reported as too deep, cheaply.
        assert_eq!(
            parse("{".repeat(10_000).as_bytes(), DEPTH)
                .unwrap_err()
                .code(),
            ErrorCode::TooDeep
        );
    }

    #[test]
    fn truncated_and_mangled_frames_never_panic() {
        let valid = r#"{"type":"video-offer-request","id":123,"calleeId":456,"offer":{"type":"offer","sdp":"v=0\r\na=x:\"[{\\\"}"},"reason":["a",{"b":null}]}"#;
        assert!(parse(valid.as_bytes(), DEPTH).is_ok());
        for cut in 0..valid.len() {
            let _ = parse(&valid.as_bytes()[..cut], DEPTH);
        }
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..5000 {
            let mut bytes = valid.as_bytes().to_vec();
            for _ in 0..3 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let at = (seed % bytes.len() as u64) as usize;
                let mangle = b"\\\"{}[]:,0 \xff";
                bytes[at] = mangle[(seed >> 32) as usize % mangle.len()];
            }
            if let Err(e) = parse(&bytes, DEPTH) {
                let _ = e.to_string();
            }
        }
        for tail in ["\\", "\"\\", "{\"a\":\"\\", "{\"type\":\"\\\\\\"] {
            assert_eq!(code_of(tail), ErrorCode::InvalidJson, "{tail}");
        }
    }

    #[test]
    fn unknown_fields_are_ignored_and_id_may_be_omitted() {
        let inbound = parse_ok(r#"{"type":"ping","extra":{"a":[1,2]},"id":null}"#);
        assert_eq!(inbound.claimed_id, None);
        assert!(matches!(inbound.message, ClientMessage::Ping));
    }

    #[test]
    fn hangup_reasons() {
        for (reason, want) in [
            ("", EndReason::Hangup),
            (r#","reason":null"#, EndReason::Hangup),
            (r#","reason":"hangup""#, EndReason::Hangup),
            (r#","reason":"failed""#, EndReason::Failed),
            (r#","reason":"something-new""#, EndReason::Hangup),
        ] {
            let text = format!(r#"{{"type":"close-call-client","clientId":5{reason}}}"#);
            match parse_ok(&text).message {
                ClientMessage::CloseCallClient { peer, reason } => {
                    assert_eq!(peer, ClientId::new(5));
                    assert_eq!(reason, want, "{text}");
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn candidate_may_be_null_for_end_of_candidates() {
        match parse_ok(r#"{"type":"ice-candidate","clientId":5,"candidate":null}"#).message {
            ClientMessage::IceCandidate { candidate, .. } => assert_eq!(candidate.get(), "null"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn normal_text_is_unescaped() {
        match parse_ok(r#"{"type":"normal","id":1,"message":"hi \"you\" \u00e9"}"#).message {
            ClientMessage::Normal { text } => assert_eq!(text, "hi \"you\" é"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn resume_token_round_trips_and_compares() {
        let mut rng = rand::rng();
        for _ in 0..100 {
            let token = ResumeToken::random(&mut rng);
            let text = token.to_string();
            assert_eq!(text.len(), ResumeToken::ENCODED_LEN);
            let back = ResumeToken::parse(&text).unwrap();
            assert!(back.matches(&token));
            assert!(!ResumeToken::random(&mut rng).matches(&token));
            let msg = format!(r#"{{"type":"resume","id":77,"token":"{text}"}}"#);
            match parse_ok(&msg).message {
                ClientMessage::Resume {
                    id,
                    token: t,
                    last_seq: None,
                } => {
                    assert_eq!(id, ClientId::new(77));
                    assert!(t.matches(&token));
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(format!("{:?}", ResumeToken([7; 16])), "ResumeToken(..)");
        assert!(ResumeToken::parse("!!!!!!!!!!!!!!!!!!!!!!").is_none());
    }

    #[test]
    fn ack_and_last_seq_are_sequence_numbers() {
        match parse_ok(r#"{"type":"ack","seq":42}"#).message {
            ClientMessage::Ack { seq } => assert_eq!(seq, 42),
            other => panic!("{other:?}"),
        }
        let token = ResumeToken([1; 16]);
        let resume = format!(r#"{{"type":"resume","id":77,"token":"{token}","last_seq":9}}"#);
        match parse_ok(&resume).message {
            ClientMessage::Resume { last_seq, .. } => assert_eq!(last_seq, Some(9)),
            other => panic!("{other:?}"),
        }
        assert_eq!(code_of(r#"{"type":"ack"}"#), ErrorCode::MissingField);
        for bad in [r#""7""#, "-1", "1.5", "1e3", "true", "18446744073709551616"] {
            let text = format!(r#"{{"type":"ack","seq":{bad}}}"#);
            assert_eq!(code_of(&text), ErrorCode::InvalidField, "{bad}");
        }
        let resume = format!(r#"{{"type":"resume","id":77,"token":"{token}","last_seq":"x"}}"#);
        assert_eq!(code_of(&resume), ErrorCode::InvalidField);
    }

    #[test]
    fn the_id_message_names_the_missed_range_and_undelivered_names_what_and_why() {
        let token = ResumeToken([0xfb; 16]);
        let id = ServerMessage::Id {
            id: ClientId::new(123456789),
            token: &token,
            resumed: true,
            missed: Some((5, 9)),
            lost_from: None,
            heartbeat: Duration::from_secs(20),
            ice_servers: None,
        };
        assert_eq!(
            String::from_utf8(id.to_json()).unwrap(),
            format!(
                r#"{{"type":"id","id":123456789,"token":"{token}","resumed":true,"version":1,"heartbeatMs":20000,"missed":[5,9]}}"#
            )
        );
        let undelivered = ServerMessage::Undelivered {
            to: ClientId::new(222222222),
            reason: DropReason::QueueFull,
            count: 1,
            request: Some(MessageKind::Offer),
        };
        assert_eq!(
            &undelivered.encode()[..],
            br#"{"type":"error","code":"undelivered","message":"Your offer to 222222222 was not delivered: its queue is full.","request":"offer","clientId":222222222,"reason":"queue_full","count":1}"#
        );
        let gone = ServerMessage::Undelivered {
            to: ClientId::new(222222222),
            reason: DropReason::RecipientGone,
            count: 3,
            request: None,
        };
        let json: serde_json::Value = serde_json::from_slice(&gone.encode()).unwrap();
        assert_eq!(json["count"], 3);
        assert_eq!(json["reason"], "recipient_gone");
        assert!(json["message"]
            .as_str()
            .unwrap()
            .starts_with("3 of your messages"));
    }

    #[test]
    fn every_server_message_leaves_room_for_its_seq() {
        let ice = raw(r#"[{"urls":"stun:example.org"}]"#);
        let json = ServerMessage::IceCandidate {
            peer: ClientId::new(1),
            candidate: &ice,
        }
        .to_json();
        assert!(json.capacity() - json.len() >= SEQ_ROOM);
    }

    #[test]
    fn server_messages_are_exact_json() {
        let offer = raw(r#"{"type":"offer","sdp":"v=0\r\n"}"#);
        let token = ResumeToken([0xfb; 16]);
        let ice = raw(r#"[{"urls":"stun:example.org"}]"#);
        let id = ClientId::new(123456789);
        let cases: Vec<(ServerMessage<'_>, String)> = vec![
            (
                ServerMessage::Id {
                    id,
                    token: &token,
                    resumed: false,
                    missed: None,
                    lost_from: None,
                    heartbeat: Duration::from_secs(20),
                    ice_servers: Some(&ice),
                },
                format!(
                    r#"{{"type":"id","id":123456789,"token":"{token}","resumed":false,"version":1,"heartbeatMs":20000,"iceServers":[{{"urls":"stun:example.org"}}]}}"#
                ),
            ),
            (
                ServerMessage::VideoAnswerRequest { caller: id, offer: &offer },
                r#"{"type":"video-answer-request","callerId":123456789,"offer":{"type":"offer","sdp":"v=0\r\n"}}"#.into(),
            ),
            (
                ServerMessage::ServerReply { accepted: false, callee: id, answer: None },
                r#"{"type":"server-reply","reply":"0","calleeId":123456789,"answer":null}"#.into(),
            ),
            (
                ServerMessage::CloseCallServer { peer: id, reason: EndReason::PeerGone },
                r#"{"type":"close-call-server","clientId":123456789,"reason":"peer_gone"}"#.into(),
            ),
            (ServerMessage::Busy { peer: id }, r#"{"type":"busy","clientId":123456789}"#.into()),
            (ServerMessage::Pong, r#"{"type":"pong"}"#.into()),
            (
                ServerMessage::Error {
                    code: ErrorCode::IdMismatch,
                    message: "say \"no\"",
                    request: Some(MessageKind::Normal),
                },
                r#"{"type":"error","code":"id_mismatch","message":"say \"no\"","request":"normal"}"#
                    .into(),
            ),
        ];
        for (message, want) in cases {
            let bytes = message.encode();
            assert_eq!(std::str::from_utf8(&bytes).unwrap(), want);
            serde_json::from_slice::<serde_json::Value>(&bytes).expect("valid JSON");
        }
    }

    #[test]
    fn error_codes_are_distinct_snake_case() {
        let all = ErrorCode::ALL;
        let mut seen = std::collections::HashSet::new();
        for code in all {
            let s = code.as_str();
            assert!(seen.insert(s), "{s} twice");
            assert!(
                s.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{s}"
            );
        }
    }

    #[test]
    fn protocol_md_documents_every_code_type_and_reason() {
        let doc = include_str!("../../docs/PROTOCOL.md");
        for code in ErrorCode::ALL {
            assert!(
                doc.contains(&format!("| `{}` |", code.as_str())),
                "{code} undocumented"
            );
        }
        for kind in MessageKind::ALL {
            let name = format!("`{}`", kind.as_str());
            assert!(
                doc.lines()
                    .any(|l| l.starts_with("### ") && l.contains(&name)),
                "{kind:?} has no section"
            );
            assert!(MessageKind::from_raw(&raw(&format!("\"{}\"", kind.as_str()))) == Some(kind));
        }
        for reason in [
            EndReason::Hangup,
            EndReason::Cancelled,
            EndReason::Failed,
            EndReason::PeerGone,
        ] {
            assert!(
                doc.contains(&format!("| `{}` |", reason.as_str())),
                "{reason:?} undocumented"
            );
        }
        for code in [1000, 1001, 1008, 1009, 1011, 1013] {
            assert!(
                doc.contains(&format!("| {code} |")),
                "close code {code} undocumented"
            );
        }
    }
}
