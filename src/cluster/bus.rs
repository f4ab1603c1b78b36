//! Delivery between nodes through Redis: a message for an ID held by another node is published on
//! that node's channel; a message that finds nobody live is held in the ID's capped stream until
//! the node that resumes the ID takes it.
//!
//! Pub/sub alone drops what arrives while a node is away, so `PUBLISH`'s answer (how many
//! subscribers received it) is what tells the sender whether to hold the message instead. Held
//! messages live in `cg:held:{id}`: a stream with an exact cap on messages and bytes, checked
//! before each `XADD`, under a cluster-wide byte budget too, so nothing already held is trimmed
//! away silently — a message that does not fit is refused and its sender is told. A node's own subscription reconnects and resubscribes by
//! itself after Redis restarts, and says so ([`BusEvent::Subscribed`]) so the node can take what
//! was held for its live IDs meanwhile.
//!
//! The node that resumes an ID reads its held stream without deleting it, delivers, then trims up
//! to the last entry it read ([`RedisBus::read_held`], [`RedisBus::trim_held`]): an answer lost to
//! a timeout is read again. A range a node had to drop for a reserved ID travels in the stream as
//! a [`BusKind::Missed`] marker, so the resume reports it wherever it happens.
//!
//! Messages held for an ID that expires without a resume (its node died) outlive it by a grace
//! period; any node's orphan sweep ([`RedisBus::take_orphans`]) takes them so their senders can
//! be told.
//!
//! The payload is a small versioned binary record ([`BusMessage::encode`]); the frame inside is
//! the unsealed JSON, since sequence numbers are given by the node that holds the ID.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use bytes::{Buf as _, BufMut as _, Bytes, BytesMut};
use futures_util::{FutureExt as _, StreamExt as _};
use redis::aio::{ConnectionLike, ConnectionManager};
use redis::Script;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::link::Links;
use super::nodes::BusReaders;
use super::publish::{Publisher, BATCH_VERSION};
use super::types::{CallState, NodeId, Unavailable};
use crate::signaling::delivery::{Envelope, Origin};
use crate::signaling::protocol::{
    ClientId, DropReason, ErrorCode, MessageKind, ServerKind, SEQ_ROOM,
};

/// The stream holding messages for an ID nobody holds live.
pub fn held_key(id: ClientId) -> String {
    format!("cg:held:{id}")
}

/// A node's inbox channel.
pub fn node_channel(node: &NodeId) -> String {
    format!("{NODE_CHANNEL_PREFIX}{node}")
}

/// What [`node_channel`] puts before the node ID.
const NODE_CHANNEL_PREFIX: &str = "cg:node:";

/// Holds one message, checking the caps first.
static HOLD: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/hold.lua")));
/// Takes and deletes every held message in one step.
static TAKE_HELD: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/take_held.lua")));
/// Reads the held messages without deleting them (the reader trims what it delivered).
static READ_HELD: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/read_held.lua")));
/// Deletes held messages up to the last one delivered.
static TRIM_HELD: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/trim_held.lua")));
/// Takes the messages held for IDs that expired unresumed.
static ORPHANS: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/orphans.lua")));

/// When each ID with held messages should be looked at by the orphan sweep (a sorted set; its
/// entries are bounded by the IDs with held messages, and it expires when holds stop).
const DUE_KEY: &str = "cg:held:due";

/// What the receiving node is asked to do with a [`BusMessage`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BusKind {
    /// Deliver the frame to the recipient's connection (or its delivery log).
    Deliver,
    /// Close the connection holding the recipient at `epoch`: the ID was resumed elsewhere while
    /// that (half-open) connection still held it. The frame is empty, or names the new home
    /// ([`Handover`]) that waits for a [`BusKind::Flushed`] answer.
    Kick,
    /// The answer to a kick naming a new home: everything the kicked connection held for the
    /// recipient, and the range it had to drop ([`Flushed`]). `epoch` is the new home's.
    Flushed,
    /// A marker in a held stream: the recipient's old home had to drop the `seq` range in the
    /// frame (two u64, first and last), which its client has not been told yet.
    Missed,
    /// On a node's channel only: a node that just opened a direct link to this one (see
    /// [`super::link`]) published it behind everything it published here before; the frame is
    /// the link's nonce. Once the inbox reads it, the link may carry messages in order.
    LinkStart,
    /// A barrier from a node whose route to the recipient moved off the receiving node: "answer
    /// once you have handled everything I published to you before this". The frame names the
    /// asking node, `epoch` carries its token. Handled in order with everything else, so the
    /// answer means what the asker sent here before has been delivered, held or sent on.
    Sync,
    /// The answer to a [`BusKind::Sync`]: `epoch` is its token.
    Synced,
}

/// Where a kicked connection's log goes: the node that resumed the ID, under its new epoch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Handover {
    /// The node now holding the ID.
    pub node: NodeId,
    /// The ID's epoch there.
    pub epoch: u64,
}

/// What a kicked connection held, sent to the ID's new home in one message so it is replayed
/// before anything sent to the ID since.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Flushed {
    /// The held messages, oldest first (sealed with the old home's numbers when the client
    /// acknowledges, so the new home leaves out what the client processed).
    pub messages: Vec<BusMessage>,
    /// The `seq` range the old home dropped and had not reported.
    pub missed: Option<(u64, u64)>,
}

impl Flushed {
    /// The frame of a [`BusKind::Flushed`] message: first and last of the missed range (0, 0:
    /// none), then each message as a u32 length and its payload.
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::new();
        let (first, last) = self.missed.unwrap_or((0, 0));
        out.put_u64(first);
        out.put_u64(last);
        for message in &self.messages {
            let payload = message.encode();
            out.put_u32(u32::try_from(payload.len()).unwrap_or(u32::MAX));
            out.put_slice(&payload);
        }
        out.freeze()
    }

    /// Reads [`Flushed::encode`]'s frame.
    pub fn decode(mut frame: Bytes) -> Result<Self, PayloadError> {
        if frame.remaining() < 16 {
            return Err(PayloadError::Truncated);
        }
        let (first, last) = (frame.get_u64(), frame.get_u64());
        let missed = (first != 0).then_some((first, last));
        let mut messages = Vec::new();
        while frame.has_remaining() {
            if frame.remaining() < 4 {
                return Err(PayloadError::Truncated);
            }
            let len = frame.get_u32() as usize;
            if frame.remaining() < len {
                return Err(PayloadError::Truncated);
            }
            messages.push(BusMessage::decode(frame.split_to(len))?);
        }
        Ok(Self { messages, missed })
    }
}

/// A message on its way to an ID on another node, or held for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BusMessage {
    /// What to do with it.
    pub kind: BusKind,
    /// The recipient.
    pub to: ClientId,
    /// The recipient's epoch the sender routed by, if it knew one: a receiving node whose holder
    /// of `to` has another epoch answers that the route is stale.
    pub epoch: Option<u64>,
    /// Who caused the message, to tell them if it is never delivered.
    pub origin: Option<Origin>,
    /// The recipient's call state after the transition this message announces (an offer, a
    /// reply, a cancel, a hang-up), so the recipient's node updates its cached state without
    /// asking Redis.
    pub call: Option<CallState>,
    /// The frame's message type, so the receiving node need not read it back out of the JSON.
    pub server_kind: ServerKind,
    /// The JSON object, without a sequence number.
    pub frame: Bytes,
}

/// Why a payload read from Redis is not a [`BusMessage`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    /// Written by a newer (or unrelated) program.
    #[error("The bus payload has version {0}; this node reads version 2.")]
    Version(u8),
    /// Shorter than its header says.
    #[error("The bus payload is truncated.")]
    Truncated,
    /// A message type this node does not know.
    #[error("The bus payload names message type {0}, which this node does not know.")]
    UnknownKind(u8),
    /// A server message type this node does not know.
    #[error("The bus payload names server message type {0:#04x}, which this node does not know.")]
    UnknownServerKind(u8),
    /// A call phase this node does not know.
    #[error("The bus payload names call phase {0}, which this node does not know.")]
    UnknownPhase(u8),
    /// Flags this version does not define.
    #[error("The bus payload sets flags {0:#04x}, which this node does not know.")]
    UnknownFlags(u8),
    /// A kick (or a flush, or a marker) without the epoch it is for.
    #[error("The bus payload is a kick, flush or marker without an epoch.")]
    KickWithoutEpoch,
}

impl BusMessage {
    /// Payload format version, the first byte.
    const VERSION: u8 = 2;
    /// Flag: an epoch follows the recipient.
    const HAS_EPOCH: u8 = 1;
    /// Flag: an origin (sender ID and message type) follows.
    const HAS_ORIGIN: u8 = 2;
    /// Flag: the recipient's new call state follows (u8 phase, then u64 peer unless idle).
    const HAS_CALL: u8 = 4;
    /// Flag: a [`BusKind::Kick`] (otherwise a delivery).
    const KICK: u8 = 8;
    /// Flag: a [`BusKind::Flushed`].
    const FLUSHED: u8 = 16;
    /// Flag: a [`BusKind::Missed`] marker.
    const MISSED: u8 = 32;
    /// Flag: a [`BusKind::Sync`] barrier; with [`Self::FLUSHED`], its answer
    /// ([`BusKind::Synced`]). A node of an earlier release skips both (unknown flags): an asker
    /// then waits out its bound.
    const SYNC: u8 = 64;
    /// Flags: a [`BusKind::LinkStart`] marker ([`Self::SYNC`] with [`Self::KICK`]).
    const LINK_START: u8 = Self::SYNC | Self::KICK;
    /// The longest header: version, flags, server kind, recipient, epoch, origin, call.
    const MAX_HEADER: usize = 1 + 1 + 1 + 8 + 8 + 9 + 9;

    /// The message carrying `envelope` to `to` (routed by `epoch` when known), announcing the
    /// recipient's new call state `call` when the message changes it.
    pub fn new(
        to: ClientId,
        epoch: Option<u64>,
        call: Option<CallState>,
        envelope: Envelope,
    ) -> Self {
        Self {
            kind: BusKind::Deliver,
            to,
            epoch,
            origin: envelope.origin(),
            call,
            server_kind: envelope.kind(),
            frame: envelope.seal(None).bytes,
        }
    }

    /// Asks `to`'s node to close the connection holding `to` at `epoch`.
    pub fn kick(to: ClientId, epoch: u64) -> Self {
        Self {
            kind: BusKind::Kick,
            to,
            epoch: Some(epoch),
            origin: None,
            call: None,
            server_kind: ServerKind::Pong,
            frame: Bytes::new(),
        }
    }

    /// Asks `to`'s node to close the connection holding `to` at `epoch` and to send what it
    /// held to `handover` (a [`BusKind::Flushed`] message on that node's channel).
    pub fn kick_to(to: ClientId, epoch: u64, handover: &Handover) -> Self {
        let mut frame = BytesMut::with_capacity(8 + handover.node.to_string().len());
        frame.put_u64(handover.epoch);
        frame.put_slice(handover.node.to_string().as_bytes());
        Self {
            frame: frame.freeze(),
            ..Self::kick(to, epoch)
        }
    }

    /// The new home a kick names, if it names one (a node of the previous version sends none).
    pub fn handover(&self) -> Option<Handover> {
        if self.kind != BusKind::Kick || self.frame.len() <= 8 {
            return None;
        }
        let mut frame = self.frame.clone();
        let epoch = frame.get_u64();
        let node = std::str::from_utf8(&frame).ok()?;
        Some(Handover {
            node: NodeId::new(node),
            epoch,
        })
    }

    /// The answer to a kick: what the kicked connection held for `to`, for its new home at
    /// `epoch`.
    pub fn flushed(to: ClientId, epoch: u64, flushed: &Flushed) -> Self {
        Self {
            kind: BusKind::Flushed,
            to,
            epoch: Some(epoch),
            origin: None,
            call: None,
            server_kind: ServerKind::Pong,
            frame: flushed.encode(),
        }
    }

    /// A marker for `to`'s held stream: its old home dropped `first..=last` (see
    /// [`BusKind::Missed`]).
    pub fn missed(to: ClientId, epoch: u64, (first, last): (u64, u64)) -> Self {
        let mut frame = BytesMut::with_capacity(16);
        frame.put_u64(first);
        frame.put_u64(last);
        Self {
            kind: BusKind::Missed,
            to,
            epoch: Some(epoch),
            origin: None,
            call: None,
            server_kind: ServerKind::Pong,
            frame: frame.freeze(),
        }
    }

    /// The link-start marker of the direct link whose dialer's nonce is `nonce` (see
    /// [`BusKind::LinkStart`]).
    pub fn link_start(nonce: [u8; 32]) -> Self {
        Self {
            kind: BusKind::LinkStart,
            to: ClientId::new(0),
            epoch: Some(0),
            origin: None,
            call: None,
            server_kind: ServerKind::Pong,
            frame: Bytes::copy_from_slice(&nonce),
        }
    }

    /// A barrier for `node`'s route to `to` (see [`BusKind::Sync`]), with `token` for its answer.
    pub fn sync(to: ClientId, token: u64, node: &NodeId) -> Self {
        Self {
            kind: BusKind::Sync,
            to,
            epoch: Some(token),
            origin: None,
            call: None,
            server_kind: ServerKind::Pong,
            frame: Bytes::from(node.to_string()),
        }
    }

    /// The node a [`BusKind::Sync`] barrier asks to be answered on.
    pub fn sync_from(&self) -> Option<NodeId> {
        if self.kind != BusKind::Sync || self.frame.is_empty() {
            return None;
        }
        std::str::from_utf8(&self.frame).ok().map(NodeId::new)
    }

    /// The answer to `sync` (a [`BusKind::Sync`] barrier).
    pub fn synced(sync: &BusMessage) -> Self {
        Self {
            kind: BusKind::Synced,
            frame: Bytes::new(),
            ..sync.clone()
        }
    }

    /// The range a [`BusKind::Missed`] marker names.
    pub fn missed_range(&self) -> Option<(u64, u64)> {
        if self.kind != BusKind::Missed || self.frame.len() != 16 {
            return None;
        }
        let mut frame = self.frame.clone();
        Some((frame.get_u64(), frame.get_u64()))
    }

    /// Back into an envelope for the local delivery log (with room for a sequence number).
    pub fn into_envelope(self) -> Envelope {
        let mut json = Vec::with_capacity(self.frame.len() + SEQ_ROOM);
        json.extend_from_slice(&self.frame);
        Envelope::from_parts(self.server_kind, json, self.origin)
    }

    /// The payload: version, flags, the server message type (u8), recipient (u64), then when present the epoch (u64), the
    /// origin (u64 sender, u8 message type) and the call state (u8 phase, u64 peer unless idle),
    /// all big-endian; the frame takes the rest. 11 to 37 bytes of header.
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(Self::MAX_HEADER + self.frame.len());
        let mut flags = 0;
        if self.epoch.is_some() {
            flags |= Self::HAS_EPOCH;
        }
        if self.origin.is_some() {
            flags |= Self::HAS_ORIGIN;
        }
        if self.call.is_some() {
            flags |= Self::HAS_CALL;
        }
        flags |= match self.kind {
            BusKind::Deliver => 0,
            BusKind::Kick => Self::KICK,
            BusKind::Flushed => Self::FLUSHED,
            BusKind::Missed => Self::MISSED,
            BusKind::LinkStart => Self::LINK_START,
            BusKind::Sync => Self::SYNC,
            BusKind::Synced => Self::SYNC | Self::FLUSHED,
        };
        out.put_u8(Self::VERSION);
        out.put_u8(flags);
        out.put_u8(server_kind_code(self.server_kind));
        out.put_u64(self.to.get());
        if let Some(epoch) = self.epoch {
            out.put_u64(epoch);
        }
        if let Some(origin) = self.origin {
            out.put_u64(origin.from.get());
            out.put_u8(kind_code(origin.kind));
        }
        if let Some(call) = self.call {
            let (phase, peer) = match call {
                CallState::Idle => (0, None),
                CallState::Calling { peer } => (1, Some(peer)),
                CallState::Called { peer } => (2, Some(peer)),
                CallState::InCall { peer } => (3, Some(peer)),
            };
            out.put_u8(phase);
            if let Some(peer) = peer {
                out.put_u64(peer.get());
            }
        }
        out.put_slice(&self.frame);
        out.freeze()
    }

    /// Reads a payload written by [`BusMessage::encode`].
    pub fn decode(mut payload: Bytes) -> Result<Self, PayloadError> {
        let need = |payload: &Bytes, n: usize| {
            if payload.remaining() < n {
                Err(PayloadError::Truncated)
            } else {
                Ok(())
            }
        };
        need(&payload, 11)?;
        let version = payload.get_u8();
        if version != Self::VERSION {
            return Err(PayloadError::Version(version));
        }
        let flags = payload.get_u8();
        let unknown = flags
            & !(Self::HAS_EPOCH
                | Self::HAS_ORIGIN
                | Self::HAS_CALL
                | Self::KICK
                | Self::FLUSHED
                | Self::MISSED
                | Self::SYNC);
        if unknown != 0 {
            return Err(PayloadError::UnknownFlags(unknown));
        }
        let server_kind = server_kind_of(payload.get_u8())?;
        let to = ClientId::new(payload.get_u64());
        let epoch = if flags & Self::HAS_EPOCH != 0 {
            need(&payload, 8)?;
            Some(payload.get_u64())
        } else {
            None
        };
        let origin = if flags & Self::HAS_ORIGIN != 0 {
            need(&payload, 9)?;
            let from = ClientId::new(payload.get_u64());
            let code = payload.get_u8();
            let kind = *MessageKind::ALL
                .get(usize::from(code))
                .ok_or(PayloadError::UnknownKind(code))?;
            Some(Origin { from, kind })
        } else {
            None
        };
        let call = if flags & Self::HAS_CALL != 0 {
            need(&payload, 1)?;
            let phase = payload.get_u8();
            if phase == 0 {
                Some(CallState::Idle)
            } else {
                need(&payload, 8)?;
                let peer = ClientId::new(payload.get_u64());
                Some(match phase {
                    1 => CallState::Calling { peer },
                    2 => CallState::Called { peer },
                    3 => CallState::InCall { peer },
                    _ => return Err(PayloadError::UnknownPhase(phase)),
                })
            }
        } else {
            None
        };
        let kind = match flags & (Self::KICK | Self::FLUSHED | Self::MISSED | Self::SYNC) {
            0 => BusKind::Deliver,
            Self::KICK => BusKind::Kick,
            Self::FLUSHED => BusKind::Flushed,
            Self::MISSED => BusKind::Missed,
            Self::SYNC => BusKind::Sync,
            Self::LINK_START => BusKind::LinkStart,
            synced if synced == Self::SYNC | Self::FLUSHED => BusKind::Synced,
            both => return Err(PayloadError::UnknownFlags(both)),
        };
        if kind != BusKind::Deliver && epoch.is_none() {
            return Err(PayloadError::KickWithoutEpoch);
        }
        Ok(Self {
            kind,
            to,
            epoch,
            origin,
            call,
            server_kind,
            frame: payload,
        })
    }
}

/// The messages of one payload read from a node's channel: a single message
/// ([`BusMessage::encode`]) or a batch ([`super::publish::encode_batch`]), decoded lazily, each sharing the
/// payload's buffer (no copy). A record that cannot be read is an `Err` and the next is still
/// read; a batch whose framing is cut short ends with `Err(Truncated)`.
#[derive(Debug)]
pub struct Records {
    /// What is left to read; `None` once done.
    rest: Option<Bytes>,
    /// Whether `rest` is a batch's records (else it is one message).
    batch: bool,
}

impl Records {
    /// The messages in `payload`.
    pub fn new(mut payload: Bytes) -> Self {
        let batch = payload.first() == Some(&BATCH_VERSION);
        if batch {
            payload.advance(1);
        }
        Self {
            rest: Some(payload),
            batch,
        }
    }
}

impl Iterator for Records {
    type Item = Result<BusMessage, PayloadError>;

    fn next(&mut self) -> Option<Self::Item> {
        if !self.batch {
            return self.rest.take().map(BusMessage::decode);
        }
        let rest = self.rest.as_mut().filter(|rest| !rest.is_empty())?;
        let len = if rest.len() >= 4 {
            rest.get_u32() as usize
        } else {
            usize::MAX
        };
        if rest.len() < len {
            self.rest = None;
            return Some(Err(PayloadError::Truncated));
        }
        Some(BusMessage::decode(rest.split_to(len)))
    }
}

/// Decodes held payloads for `to`, logging and skipping any that cannot be read.
fn decode_all(to: ClientId, payloads: Vec<Vec<u8>>) -> Vec<BusMessage> {
    payloads
        .into_iter()
        .filter_map(|payload| match BusMessage::decode(Bytes::from(payload)) {
            Ok(message) => Some(message),
            Err(e) => {
                tracing::warn!(error = %e, id = %to, "redis bus: skipped a held message");
                None
            }
        })
        .collect()
}

/// A server message type's code on the bus: its place in [`ServerKind::TYPES`], or for an error
/// 0x80 plus the code's place in [`ErrorCode::ALL`].
fn server_kind_code(kind: ServerKind) -> u8 {
    let index = match kind {
        ServerKind::Error(code) => {
            0x80 + ErrorCode::ALL
                .iter()
                .position(|c| *c == code)
                .expect("ALL lists every code")
        }
        other => other.type_index(),
    };
    u8::try_from(index).expect("fewer than 128 types and codes")
}

/// The server message type a [`server_kind_code`] names.
fn server_kind_of(code: u8) -> Result<ServerKind, PayloadError> {
    let unknown = PayloadError::UnknownServerKind(code);
    if code >= 0x80 {
        let error = ErrorCode::ALL
            .get(usize::from(code - 0x80))
            .ok_or(unknown)?;
        return Ok(ServerKind::Error(*error));
    }
    const KINDS: [ServerKind; 10] = [
        ServerKind::Id,
        ServerKind::VideoAnswerRequest,
        ServerKind::ServerReply,
        ServerKind::CloseCallServer,
        ServerKind::IceCandidate,
        ServerKind::Ringing,
        ServerKind::Busy,
        ServerKind::Offer,
        ServerKind::Answer,
        ServerKind::Pong,
    ];
    KINDS
        .iter()
        .copied()
        .find(|k| k.type_index() == usize::from(code))
        .ok_or(unknown)
}

/// A message type's code on the bus: its place in [`MessageKind::ALL`].
fn kind_code(kind: MessageKind) -> u8 {
    let index = MessageKind::ALL
        .iter()
        .position(|k| *k == kind)
        .expect("ALL lists every kind");
    u8::try_from(index).expect("fewer than 256 message kinds")
}

/// What became of a message handed to [`RedisBus::hold`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub enum Hold {
    /// Held for the next resume of the ID.
    Held,
    /// Nobody holds the ID (it left or expired): tell the sender.
    NoSuchClient,
    /// The ID moved to another epoch since the sender located it: locate it again and send there.
    Moved,
    /// The ID's held budget (messages or bytes: `QueueFull`) or the cluster's (`ServerBusy`) is
    /// spent: tell the sender.
    Dropped(DropReason),
}

/// What [`RedisBus::read_held`] found.
#[derive(Debug, Default)]
pub struct HeldRead {
    /// The held messages (deliveries and [`BusKind::Missed`] markers), oldest first.
    pub messages: Vec<BusMessage>,
    /// The last entry read, for [`RedisBus::trim_held`]; `None` when nothing was held.
    pub cursor: Option<String>,
}

/// One event of a node's subscription.
#[derive(Debug)]
pub enum BusEvent {
    /// The subscription is (again) in place. `resumed` is true after a gap (Redis restarted or the
    /// connection broke): senders found no receiver meanwhile and held their messages, so the
    /// node should [take](RedisBus::take_held) what was held for its live IDs.
    Subscribed {
        /// Whether this follows a gap rather than being the first subscription.
        resumed: bool,
    },
    /// A message for one of this node's IDs.
    Message(BusMessage),
}

/// How the bus behaves; the cluster configuration maps onto this.
#[derive(Clone, Copy, Debug)]
pub struct BusSettings {
    /// Most messages held per ID (`resume_queue_messages`).
    pub held_messages: usize,
    /// Most payload bytes held per ID (`resume_queue_bytes`).
    pub held_bytes: usize,
    /// Most payload bytes held for all IDs together, cluster-wide (`resume_queue_bytes_total`),
    /// so many reserved IDs cannot fill Redis. Counted per grace-long window, conservatively.
    pub held_bytes_total: usize,
    /// Shortest life of a held stream (the resume grace); longer while its ID's key lives longer.
    pub grace: Duration,
    /// Longest wait for one operation, and for the subscription's liveness ping.
    pub timeout: Duration,
}

/// Publishes to other nodes, holds for reserved IDs, and subscribes this node's inbox. Generic
/// over the command connection, like [`super::registry::RedisRegistry`].
#[derive(Clone)]
pub struct RedisBus<C = ConnectionManager> {
    /// Opens the subscription's own connection (pub/sub needs a dedicated one).
    client: redis::Client,
    /// The shared command connection.
    conn: C,
    /// Coalesces what goes to each node into one `PUBLISH` at a time, on `conn`.
    publisher: Publisher<C>,
    /// Caps and timeouts.
    settings: BusSettings,
    /// Direct links to other nodes (`cluster-listen`): a node with one established gets its
    /// messages there instead of by `PUBLISH`.
    links: Option<Arc<Links>>,
}

impl<C> RedisBus<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    /// A bus on `conn` (commands) and `client` (subscriptions) that batches to no node: see
    /// [`RedisBus::with_readers`].
    pub fn new(client: redis::Client, conn: C, settings: BusSettings) -> Self {
        Self::with_readers(client, conn, settings, BusReaders::default())
    }

    /// A bus that puts several messages in one `PUBLISH` only to the nodes `readers` says read
    /// batches (membership fills it from the heartbeats); any other node gets each message in a
    /// `PUBLISH` of its own, which every release reads.
    pub fn with_readers(
        client: redis::Client,
        conn: C,
        settings: BusSettings,
        readers: BusReaders,
    ) -> Self {
        let batches = move |channel: &str| {
            channel
                .strip_prefix(NODE_CHANNEL_PREFIX)
                .is_some_and(|node| readers.reads_batches(node))
        };
        Self {
            client,
            publisher: Publisher::new(conn.clone(), settings.timeout).batching(batches),
            conn,
            settings,
            links: None,
        }
    }

    /// Sends to a node with an established direct link on that link (see [`super::link`]).
    pub fn with_links(mut self, links: Arc<Links>) -> Self {
        self.links = Some(links);
        self
    }

    /// The direct links, if this node has them.
    pub fn links(&self) -> Option<&Arc<Links>> {
        self.links.as_ref()
    }

    /// Publishes `message` on `node`'s channel even when a link to it is up: the link-start
    /// marker, which must follow what was published before it.
    pub async fn publish_only(
        &self,
        node: &NodeId,
        message: &BusMessage,
    ) -> Result<bool, Unavailable> {
        self.publisher
            .publish(&node_channel(node), message.encode())
            .await
    }

    /// Publishes `message` on `node`'s channel, in one `PUBLISH` with whatever else is queued
    /// for `node` meanwhile (see [`super::publish`]) — or, with a direct link to `node`
    /// established, sends it on the link (no Redis round trip; see [`super::link`]), with the
    /// same answers. `Ok(true)`: the node received it; `Ok(false)`: nobody is subscribed (that
    /// node is gone or between reconnects, or its inbox left its channel) — hold it instead.
    pub async fn send(&self, node: &NodeId, message: &BusMessage) -> Result<bool, Unavailable> {
        let payload = message.encode();
        if let Some(links) = &self.links {
            if let Some(answer) = links.send(node.as_str(), payload.clone()).await {
                return answer;
            }
            links.metrics().by_redis.inc();
        }
        self.publisher.publish(&node_channel(node), payload).await
    }

    /// Holds `message` for its recipient's next resume, if the recipient exists at the epoch it
    /// was routed by and its budget allows. The stream lives as long as the ID can be resumed.
    pub async fn hold(&self, message: &BusMessage) -> Result<Hold, Unavailable> {
        let code = self.run_hold(message, false).await?;
        Ok(match code {
            1 => Hold::Held,
            0 => Hold::NoSuchClient,
            2 => Hold::Moved,
            5 => Hold::Dropped(DropReason::ServerBusy),
            _ => Hold::Dropped(DropReason::QueueFull),
        })
    }

    /// Runs `hold.lua` for `message` (`marker`: a [`BusKind::Missed`] marker the caps do not
    /// refuse); its answer code.
    async fn run_hold(&self, message: &BusMessage, marker: bool) -> Result<i64, Unavailable> {
        let mut call = HOLD.prepare_invoke();
        call.key(super::registry::id_key(message.to))
            .key(held_key(message.to))
            .key(DUE_KEY)
            .arg(message.epoch.map(|e| e.to_string()).unwrap_or_default())
            .arg(message.encode().as_ref())
            .arg(self.settings.held_messages)
            .arg(self.settings.held_bytes)
            .arg(
                u64::try_from(self.settings.grace.as_millis())
                    .unwrap_or(u64::MAX)
                    .max(1),
            )
            .arg(self.settings.held_bytes_total)
            .arg(message.to.get());
        if marker {
            call.arg("1");
        }
        let mut conn = self.conn.clone();
        self.run(call.invoke_async(&mut conn)).await
    }

    /// Takes every message held for `to`, oldest first, deleting them in the same step: of two
    /// nodes racing to replay, one gets them all and the other none. Payloads that cannot be read
    /// are logged and skipped.
    pub async fn take_held(&self, to: ClientId) -> Result<Vec<BusMessage>, Unavailable> {
        let mut call = TAKE_HELD.prepare_invoke();
        call.key(held_key(to))
            .key(super::registry::id_key(to))
            .key(DUE_KEY)
            .arg(to.get());
        let mut conn = self.conn.clone();
        let payloads: Vec<Vec<u8>> = self.run(call.invoke_async(&mut conn)).await?;
        Ok(decode_all(to, payloads))
    }

    /// Holds a [`BusKind::Missed`] marker for `to` at `epoch`: the caps do not refuse it (it is
    /// 27 bytes and reports a drop the caps made). `Ok(false)`: the ID is not there at `epoch`.
    pub async fn hold_marker(&self, marker: &BusMessage) -> Result<bool, Unavailable> {
        Ok(self.run_hold(marker, true).await? == 1)
    }

    /// Reads what is held for `to.id`, oldest first, without deleting it, if the ID is still at
    /// `to.epoch` (else nothing: it moved on, and its new home reads). Deliver, then
    /// [`trim_held`](Self::trim_held) up to [`HeldRead::cursor`]: a read whose answer is lost
    /// (a timeout) can be retried and loses nothing.
    pub async fn read_held(&self, to: super::types::Binding) -> Result<HeldRead, Unavailable> {
        let mut call = READ_HELD.prepare_invoke();
        call.key(held_key(to.id))
            .key(super::registry::id_key(to.id))
            .arg(to.epoch);
        let mut conn = self.conn.clone();
        let found: Option<Vec<Vec<u8>>> = self.run(call.invoke_async(&mut conn)).await?;
        let mut read = HeldRead::default();
        for pair in found.unwrap_or_default().chunks(2) {
            let [entry, payload] = pair else { break };
            read.cursor = Some(String::from_utf8_lossy(entry).into_owned());
            read.messages
                .extend(decode_all(to.id, vec![payload.clone()]));
        }
        Ok(read)
    }

    /// Deletes what is held for `to` up to and including the entry `cursor` (from
    /// [`read_held`](Self::read_held)); later entries stay, in order.
    pub async fn trim_held(&self, to: ClientId, cursor: &str) -> Result<(), Unavailable> {
        let mut call = TRIM_HELD.prepare_invoke();
        call.key(held_key(to))
            .key(super::registry::id_key(to))
            .key(DUE_KEY)
            .arg(cursor)
            .arg(to.get());
        let mut conn = self.conn.clone();
        let _kept: i64 = self.run(call.invoke_async(&mut conn)).await?;
        Ok(())
    }

    /// The orphan sweep, for any node to run every few seconds: takes the messages held for up
    /// to `limit` IDs that expired without a resume (their node died before anyone resumed
    /// them), so the caller can tell each message's sender it was not delivered
    /// (`recipient_gone`). Atomic like [`take_held`](Self::take_held): of all the nodes
    /// sweeping, and a resume racing them, exactly one gets each message.
    pub async fn take_orphans(
        &self,
        limit: usize,
    ) -> Result<Vec<(ClientId, Vec<BusMessage>)>, Unavailable> {
        let mut call = ORPHANS.prepare_invoke();
        call.key(DUE_KEY).arg(limit.max(1));
        let mut conn = self.conn.clone();
        let found: Vec<redis::Value> = self.run(call.invoke_async(&mut conn)).await?;
        let mut out = Vec::new();
        for pair in found.chunks(2) {
            let [id, payloads] = pair else { break };
            let id: Option<u64> = redis::from_redis_value_ref::<String>(id)
                .ok()
                .and_then(|id| id.parse().ok());
            let payloads: Option<Vec<Vec<u8>>> = redis::from_redis_value_ref(payloads).ok();
            match (id, payloads) {
                (Some(id), Some(payloads)) => {
                    let id = ClientId::new(id);
                    out.push((id, decode_all(id, payloads)));
                }
                _ => tracing::warn!("redis bus: the orphan sweep answered in an unexpected shape"),
            }
        }
        Ok(out)
    }

    /// Subscribes to `node`'s channel on a connection of its own, kept up by a task that
    /// reconnects (every `timeout`, at most) and resubscribes after any break. Dropping the
    /// [`Subscription`] ends the task. Up to `capacity` events wait for the reader; beyond that
    /// the task stops reading and Redis buffers (up to its `client-output-buffer-limit pubsub`).
    pub fn subscribe(&self, node: &NodeId, capacity: usize) -> Subscription {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(keep_subscribed(
            self.client.clone(),
            node_channel(node),
            self.settings.timeout,
            tx,
            stopped,
        ));
        Subscription {
            rx,
            task,
            stop: Some(stop),
        }
    }

    /// Runs one Redis future within the timeout; any error or a timeout is `Unavailable`.
    async fn run<T>(
        &self,
        op: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, Unavailable> {
        match tokio::time::timeout(self.settings.timeout, op).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "redis bus operation failed");
                Err(Unavailable)
            }
            Err(_) => {
                tracing::debug!("redis bus operation timed out");
                Err(Unavailable)
            }
        }
    }
}

/// A node's inbox: events from its subscription task, which ends when this is dropped.
#[derive(Debug)]
pub struct Subscription {
    /// Events from the task.
    rx: mpsc::Receiver<BusEvent>,
    /// The task, aborted on drop so its connection closes.
    task: JoinHandle<()>,
    /// Tells the task to unsubscribe ([`Subscription::unsubscribe`]).
    stop: Option<oneshot::Sender<()>>,
}

impl Subscription {
    /// The next event; `None` once the task ended: after [`Subscription::unsubscribe`], when
    /// everything Redis sent before it confirmed has been passed on (or, short of a panic, never).
    pub async fn next(&mut self) -> Option<BusEvent> {
        self.rx.recv().await
    }

    /// Leaves the channel cleanly (a draining node, once no client of its own is live): the task
    /// sends `UNSUBSCRIBE`, passes on every message Redis sent before confirming it, and ends, so
    /// [`next`](Self::next) yields those and then `None`. From the confirmation on, a `PUBLISH` to
    /// this node reaches nobody and its sender holds the message in the ID's stream. Dropping the
    /// subscription instead loses what Redis counted as received but the node never read.
    pub fn unsubscribe(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The subscription task: connect, subscribe, forward messages, ping every `timeout` to notice a
/// silent break; after any break wait `timeout` and start over. Ends when the receiver is gone,
/// or on `stop`: then it unsubscribes and forwards what came before Redis confirmed it.
async fn keep_subscribed(
    client: redis::Client,
    channel: String,
    timeout: Duration,
    tx: mpsc::Sender<BusEvent>,
    mut stop: oneshot::Receiver<()>,
) {
    let mut resumed = false;
    loop {
        match tokio::time::timeout(timeout, subscribe_once(&client, &channel)).await {
            Ok(Ok(pubsub)) => {
                let (mut sink, mut stream) = pubsub.split();
                if tx.send(BusEvent::Subscribed { resumed }).await.is_err() {
                    return;
                }
                resumed = true;
                let mut ping = tokio::time::interval(timeout);
                ping.tick().await;
                loop {
                    tokio::select! {
                        message = stream.next() => {
                            let Some(message) = message else { break };
                            if !forward(&message, &tx).await {
                                return;
                            }
                        }
                        _ = &mut stop => {
                            // Leaving. Redis answers UNSUBSCRIBE after every message it sent
                            // before, and the connection hands those to the stream before the
                            // answer: all of them are there now.
                            let left = tokio::time::timeout(timeout, sink.unsubscribe(&channel)).await;
                            if !matches!(left, Ok(Ok(()))) {
                                tracing::warn!(%channel, "redis bus: UNSUBSCRIBE not confirmed; messages sent to this node just now may be lost");
                            }
                            while let Some(Some(message)) = stream.next().now_or_never() {
                                if !forward(&message, &tx).await {
                                    return;
                                }
                            }
                            return;
                        }
                        _ = ping.tick() => {
                            let pong = tokio::time::timeout(timeout, sink.ping::<redis::Value>()).await;
                            if !matches!(pong, Ok(Ok(_))) {
                                break;
                            }
                        }
                        () = tx.closed() => return,
                    }
                }
                tracing::warn!(%channel, "redis bus: subscription lost; resubscribing");
            }
            Ok(Err(e)) => tracing::debug!(error = %e, %channel, "redis bus: subscribe failed"),
            Err(_) => tracing::debug!(%channel, "redis bus: subscribe timed out"),
        }
        tokio::select! {
            () = tokio::time::sleep(timeout) => {}
            () = tx.closed() => return,
            // Not subscribed: nothing to pass on.
            _ = &mut stop => return,
        }
    }
}

/// Passes the records of one payload to the inbox; `false` if the inbox is gone.
async fn forward(message: &redis::Msg, tx: &mpsc::Sender<BusEvent>) -> bool {
    let payload = Bytes::copy_from_slice(message.get_payload_bytes());
    for record in Records::new(payload) {
        match record {
            Ok(message) => {
                if tx.send(BusEvent::Message(message)).await.is_err() {
                    return false;
                }
            }
            Err(e) => tracing::warn!(error = %e, "redis bus: skipped a message"),
        }
    }
    true
}

/// One connection, subscribed.
async fn subscribe_once(
    client: &redis::Client,
    channel: &str,
) -> redis::RedisResult<redis::aio::PubSub> {
    let mut pubsub = client.get_async_pubsub().await?;
    pubsub.subscribe(channel).await?;
    Ok(pubsub)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::publish::encode_batch;

    fn message(epoch: Option<u64>, origin: Option<Origin>) -> BusMessage {
        BusMessage {
            kind: BusKind::Deliver,
            to: ClientId::new(123_456_789),
            epoch,
            origin,
            call: None,
            server_kind: ServerKind::IceCandidate,
            frame: Bytes::from_static(br#"{"type":"ice-candidate","candidate":{}}"#),
        }
    }

    #[test]
    fn every_server_kind_has_a_code_and_comes_back() {
        let mut kinds: Vec<ServerKind> = ErrorCode::ALL
            .iter()
            .map(|c| ServerKind::Error(*c))
            .collect();
        kinds.extend([
            ServerKind::Id,
            ServerKind::VideoAnswerRequest,
            ServerKind::ServerReply,
            ServerKind::CloseCallServer,
            ServerKind::IceCandidate,
            ServerKind::Ringing,
            ServerKind::Busy,
            ServerKind::Offer,
            ServerKind::Answer,
            ServerKind::Pong,
        ]);
        for kind in kinds {
            assert_eq!(server_kind_of(server_kind_code(kind)), Ok(kind));
        }
        assert!(server_kind_of(0x7f).is_err());
        assert!(server_kind_of(0xff).is_err());
    }

    #[test]
    fn every_shape_of_message_survives_the_payload_round_trip() {
        let origin = Origin {
            from: ClientId::new(987_654_321),
            kind: MessageKind::Answer,
        };
        for m in [
            message(None, None),
            message(Some(u64::MAX), None),
            message(None, Some(origin)),
            message(Some(7), Some(origin)),
        ] {
            let payload = m.encode();
            assert_eq!(BusMessage::decode(payload).unwrap(), m);
        }
        for kind in MessageKind::ALL {
            let m = message(None, Some(Origin { kind, ..origin }));
            assert_eq!(BusMessage::decode(m.encode()).unwrap(), m);
        }
        let peer = ClientId::new(42);
        for call in [
            CallState::Idle,
            CallState::Calling { peer },
            CallState::Called { peer },
            CallState::InCall { peer },
        ] {
            let m = BusMessage {
                call: Some(call),
                ..message(Some(7), Some(origin))
            };
            assert_eq!(BusMessage::decode(m.encode()).unwrap(), m);
        }
        let kick = BusMessage::kick(ClientId::new(5), 99);
        assert_eq!(BusMessage::decode(kick.encode()).unwrap(), kick);
        let longest = BusMessage {
            call: Some(CallState::InCall { peer }),
            ..message(Some(7), Some(origin))
        };
        assert_eq!(longest.encode().len(), BusMessage::MAX_HEADER + 39);
    }

    /// A route change's barrier names the node to answer and carries its token; the answer
    /// carries the token back; both survive the payload, and neither reads as anything else.
    #[test]
    fn barriers_and_their_answers_survive_the_payload_round_trip() {
        let to = ClientId::new(5);
        let node = NodeId::new("node-c");
        let sync = BusMessage::decode(BusMessage::sync(to, 41, &node).encode()).unwrap();
        assert_eq!(sync.kind, BusKind::Sync);
        assert_eq!((sync.to, sync.epoch), (to, Some(41)));
        assert_eq!(sync.sync_from(), Some(node));
        assert_eq!(sync.handover(), None);
        let answer = BusMessage::decode(BusMessage::synced(&sync).encode()).unwrap();
        assert_eq!(answer.kind, BusKind::Synced);
        assert_eq!((answer.to, answer.epoch), (to, Some(41)));
        assert_eq!(answer.sync_from(), None);
        assert_eq!(BusMessage::kick(to, 9).sync_from(), None);
    }

    /// A kick names where to hand over, the answer carries the held messages and the dropped
    /// range, and a marker its range: each survives the payload, and a kick from a node that
    /// names no new home (the previous version) reads as a plain kick.
    #[test]
    fn handovers_and_missed_markers_survive_the_payload_round_trip() {
        let to = ClientId::new(5);
        let handover = Handover {
            node: NodeId::new("node-b"),
            epoch: 77,
        };
        let kick = BusMessage::kick_to(to, 9, &handover);
        let back = BusMessage::decode(kick.encode()).unwrap();
        assert_eq!(back.kind, BusKind::Kick);
        assert_eq!(back.epoch, Some(9));
        assert_eq!(back.handover(), Some(handover));
        assert_eq!(BusMessage::kick(to, 9).handover(), None);

        let origin = Origin {
            from: ClientId::new(6),
            kind: MessageKind::IceCandidate,
        };
        let flushed = Flushed {
            messages: vec![message(Some(77), Some(origin)), message(Some(77), None)],
            missed: Some((4, 6)),
        };
        let answer = BusMessage::decode(BusMessage::flushed(to, 77, &flushed).encode()).unwrap();
        assert_eq!(answer.kind, BusKind::Flushed);
        assert_eq!(Flushed::decode(answer.frame).unwrap(), flushed);
        let empty = Flushed::default();
        assert_eq!(Flushed::decode(empty.encode()).unwrap(), empty);
        let cut = flushed.encode();
        assert_eq!(
            Flushed::decode(cut.slice(..cut.len() - 1)),
            Err(PayloadError::Truncated)
        );

        let marker = BusMessage::decode(BusMessage::missed(to, 3, (10, 12)).encode()).unwrap();
        assert_eq!(marker.kind, BusKind::Missed);
        assert_eq!(marker.missed_range(), Some((10, 12)));
        assert_eq!(message(None, None).missed_range(), None);
        // Two kinds at once is not a payload of ours.
        let mut both = kick.encode().to_vec();
        both[1] |= BusMessage::MISSED;
        assert!(BusMessage::decode(Bytes::from(both)).is_err());
    }

    #[test]
    fn a_payload_that_is_not_ours_is_refused_not_misread() {
        let full = message(
            Some(7),
            Some(Origin {
                from: ClientId::new(1),
                kind: MessageKind::Offer,
            }),
        )
        .encode();
        // Cut inside the header: truncated, at every length.
        for len in 0..28 {
            assert_eq!(
                BusMessage::decode(full.slice(..len)),
                Err(PayloadError::Truncated),
                "{len} bytes"
            );
        }
        let mut newer = full.to_vec();
        newer[0] = 3;
        assert_eq!(
            BusMessage::decode(Bytes::from(newer)),
            Err(PayloadError::Version(3))
        );
        let mut server_kind = full.to_vec();
        server_kind[2] = 0x7f;
        assert_eq!(
            BusMessage::decode(Bytes::from(server_kind)),
            Err(PayloadError::UnknownServerKind(0x7f))
        );
        let mut flags = full.to_vec();
        flags[1] |= 0x80;
        assert_eq!(
            BusMessage::decode(Bytes::from(flags)),
            Err(PayloadError::UnknownFlags(0x80))
        );
        // 0x40 is the link-start marker (a direct link's nonce); it round-trips.
        let marker = BusMessage::link_start([7; 32]);
        let decoded = BusMessage::decode(marker.encode()).unwrap();
        assert_eq!(decoded, marker);
        assert_eq!(decoded.kind, BusKind::LinkStart);
        let mut unknown = full.to_vec();
        unknown[27] = 200;
        assert_eq!(
            BusMessage::decode(Bytes::from(unknown)),
            Err(PayloadError::UnknownKind(200))
        );
        let with_call = BusMessage {
            call: Some(CallState::InCall {
                peer: ClientId::new(3),
            }),
            ..message(None, None)
        }
        .encode();
        let mut phase = with_call.to_vec();
        phase[11] = 9;
        assert_eq!(
            BusMessage::decode(Bytes::from(phase)),
            Err(PayloadError::UnknownPhase(9))
        );
        assert_eq!(
            BusMessage::decode(with_call.slice(..16)),
            Err(PayloadError::Truncated)
        );
        let mut kick = BusMessage::kick(ClientId::new(5), 99).encode().to_vec();
        kick[1] &= !BusMessage::HAS_EPOCH;
        kick.truncate(11);
        assert_eq!(
            BusMessage::decode(Bytes::from(kick)),
            Err(PayloadError::KickWithoutEpoch)
        );
    }

    #[test]
    fn a_batch_carries_every_message_in_order_and_a_single_message_is_unchanged() {
        let origin = Origin {
            from: ClientId::new(987_654_321),
            kind: MessageKind::IceCandidate,
        };
        let messages: Vec<BusMessage> = (0..5)
            .map(|n| BusMessage {
                to: ClientId::new(100 + n),
                ..message(Some(n), Some(origin))
            })
            .chain([BusMessage::kick(ClientId::new(5), 99)])
            .collect();
        let encoded: Vec<Bytes> = messages.iter().map(BusMessage::encode).collect();
        let batch = encode_batch(encoded.iter());
        assert_eq!(batch[0], BATCH_VERSION);
        assert_eq!(
            batch.len(),
            1 + encoded.iter().map(|e| 4 + e.len()).sum::<usize>()
        );
        let back: Vec<BusMessage> = Records::new(batch.clone()).map(Result::unwrap).collect();
        assert_eq!(back, messages);
        // The frames share the payload's buffer: no copy per message.
        let range = batch.as_ptr_range();
        for m in Records::new(batch.clone()).map(Result::unwrap) {
            if !m.frame.is_empty() {
                assert!(range.contains(&m.frame.as_ptr()));
            }
        }
        // A single message is read as it always was.
        let single: Vec<_> = Records::new(encoded[0].clone()).collect();
        assert_eq!(single, vec![Ok(messages[0].clone())]);
        assert_eq!(
            Records::new(Bytes::new()).collect::<Vec<_>>(),
            vec![Err(PayloadError::Truncated)]
        );
    }

    #[test]
    fn a_bad_record_in_a_batch_is_skipped_and_a_cut_batch_ends_truncated() {
        let good = message(Some(1), None).encode();
        let mut bad = good.to_vec();
        bad[0] = 9;
        let bad = Bytes::from(bad);
        let batch = encode_batch([&good, &bad, &good].into_iter());
        let records: Vec<_> = Records::new(batch.clone()).collect();
        assert_eq!(records.len(), 3);
        assert!(records[0].is_ok() && records[2].is_ok());
        assert_eq!(records[1], Err(PayloadError::Version(9)));
        // Cut anywhere: never a panic, never a message past the cut, and the last record
        // read is an error unless the cut falls between records.
        for len in 1..batch.len() {
            let records: Vec<_> = Records::new(batch.slice(..len)).collect();
            assert!(records.len() <= 3, "{len}");
            let record = 4 + good.len();
            if (len - 1) % record != 0 {
                assert_eq!(records.last(), Some(&Err(PayloadError::Truncated)), "{len}");
            }
        }
    }

    #[test]
    fn reading_arbitrary_batches_never_panics_and_ends() {
        use rand::{Rng as _, SeedableRng as _};
        let mut rng = rand::rngs::StdRng::seed_from_u64(31);
        let good = message(Some(1), None).encode();
        for _ in 0..50_000 {
            let mut bytes = vec![BATCH_VERSION];
            while bytes.len() < 120 && rng.random_range(0..4) != 0 {
                if rng.random() {
                    // A real record, sometimes with a lying length.
                    let len = u32::try_from(good.len()).unwrap() ^ (rng.random::<u32>() & 1);
                    bytes.extend_from_slice(&len.to_be_bytes());
                    bytes.extend_from_slice(&good);
                } else {
                    bytes.push(rng.random());
                }
            }
            let len = bytes.len();
            let records = Records::new(Bytes::from(bytes)).count();
            assert!(records <= len / 4 + 1, "{records} records from {len} bytes");
        }
    }

    #[test]
    fn decoding_arbitrary_bytes_never_panics_and_what_decodes_encodes_back_the_same() {
        use rand::{Rng as _, SeedableRng as _};
        let mut rng = rand::rngs::StdRng::seed_from_u64(13);
        let mut decoded = 0;
        for _ in 0..200_000 {
            let len = rng.random_range(0..48);
            let mut bytes: Vec<u8> = (0..len).map(|_| rng.random()).collect();
            if let Some(first) = bytes.first_mut() {
                *first = 2; // mostly the current version, so the rest of the header is exercised
            }
            if let Some(kind) = bytes.get_mut(2) {
                if rng.random_range(0..8) != 0 {
                    *kind %= 10; // mostly a known server kind
                }
            }
            if let Some(flags) = bytes.get_mut(1) {
                if rng.random_range(0..8) != 0 {
                    *flags &= 0x0f;
                }
            }
            if let Ok(m) = BusMessage::decode(Bytes::from(bytes)) {
                decoded += 1;
                assert_eq!(BusMessage::decode(m.encode()).unwrap(), m);
            }
        }
        assert!(
            decoded > 10_000,
            "the generator reaches valid payloads: {decoded}"
        );
    }

    #[test]
    fn an_envelope_crosses_the_bus_with_its_origin_and_seals_the_same() {
        let origin = Origin {
            from: ClientId::new(5),
            kind: MessageKind::IceCandidate,
        };
        let json = br#"{"type":"ice-candidate"}"#.to_vec();
        let m = BusMessage::new(
            ClientId::new(9),
            Some(3),
            Some(CallState::Called { peer: origin.from }),
            Envelope::from_parts(ServerKind::IceCandidate, json.clone(), Some(origin)),
        );
        let back = BusMessage::decode(m.encode()).unwrap().into_envelope();
        assert_eq!(back.origin(), Some(origin));
        assert_eq!(back.kind(), ServerKind::IceCandidate);
        assert_eq!(
            &back.seal(Some(42)).bytes[..],
            br#"{"type":"ice-candidate","seq":42}"#
        );
    }
}
