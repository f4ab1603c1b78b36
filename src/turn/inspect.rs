//! Zero-copy reading and minimal writing of STUN and ChannelData messages, for the front layer that
//! sees every packet before the engine does.
//!
//! This module owns byte layout only (RFC 8489 / RFC 8656): it tells a ChannelData frame from a STUN
//! message, indexes the few attributes the front layer acts on, checks MESSAGE-INTEGRITY against a
//! key, decodes XOR-PEER-ADDRESS, and writes the handful of error responses the front layer sends
//! itself. It does no I/O and keeps no state, and reading never allocates.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ring::hmac;
use subtle::ConstantTimeEq;

/// The fixed STUN magic cookie.
pub const MAGIC_COOKIE: u32 = 0x2112_A442;
/// STUN header length.
pub const HEADER_LEN: usize = 20;

/// STUN methods the front layer distinguishes.
pub mod method {
    /// Binding (STUN).
    pub const BINDING: u16 = 0x001;
    /// Allocate.
    pub const ALLOCATE: u16 = 0x003;
    /// Refresh.
    pub const REFRESH: u16 = 0x004;
    /// Send (indication).
    pub const SEND: u16 = 0x006;
    /// Data (indication).
    pub const DATA: u16 = 0x007;
    /// CreatePermission.
    pub const CREATE_PERMISSION: u16 = 0x008;
    /// ChannelBind.
    pub const CHANNEL_BIND: u16 = 0x009;
}

/// STUN attribute types the front layer reads or writes.
pub mod attr {
    /// USERNAME.
    pub const USERNAME: u16 = 0x0006;
    /// MESSAGE-INTEGRITY.
    pub const MESSAGE_INTEGRITY: u16 = 0x0008;
    /// ERROR-CODE.
    pub const ERROR_CODE: u16 = 0x0009;
    /// CHANNEL-NUMBER.
    pub const CHANNEL_NUMBER: u16 = 0x000C;
    /// XOR-PEER-ADDRESS.
    pub const XOR_PEER_ADDRESS: u16 = 0x0012;
    /// XOR-RELAYED-ADDRESS.
    pub const XOR_RELAYED_ADDRESS: u16 = 0x0016;
    /// LIFETIME.
    pub const LIFETIME: u16 = 0x000D;
    /// REQUESTED-ADDRESS-FAMILY (RFC 6156).
    pub const REQUESTED_ADDRESS_FAMILY: u16 = 0x0017;
    /// REALM.
    pub const REALM: u16 = 0x0014;
    /// NONCE.
    pub const NONCE: u16 = 0x0015;
    /// DONT-FRAGMENT.
    pub const DONT_FRAGMENT: u16 = 0x001A;
    /// RESERVATION-TOKEN.
    pub const RESERVATION_TOKEN: u16 = 0x0022;
    /// FINGERPRINT.
    pub const FINGERPRINT: u16 = 0x8028;
    /// DATA (Send and Data indications).
    pub const DATA: u16 = 0x0013;
    /// EVEN-PORT.
    pub const EVEN_PORT: u16 = 0x0018;
    /// REQUESTED-TRANSPORT.
    pub const REQUESTED_TRANSPORT: u16 = 0x0019;
}

/// The four STUN message classes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Expects a response.
    Request,
    /// Fire and forget (Send, Data).
    Indication,
    /// Success response.
    Success,
    /// Error response.
    Error,
}

/// Why a packet is not something the relay will look at further. Such packets are dropped silently.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InspectError {
    /// Neither STUN (first two bits 00 with the magic cookie) nor ChannelData (first bits 01).
    #[error("the packet is neither STUN nor ChannelData")]
    Unknown,
    /// The header's length disagrees with the bytes received, or an attribute overruns.
    #[error("the packet's length fields disagree with its size")]
    Truncated,
}

/// One datagram (or one stream frame) as the front layer sees it.
// Lives on the stack for one packet; boxing the STUN index would allocate per packet.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Packet<'a> {
    /// Relay data for a bound channel: the hot path, passed through without parsing.
    ChannelData {
        /// The channel number (0x4000–0x7FFF).
        number: u16,
        /// Length of the application data after the 4-byte header.
        len: usize,
    },
    /// A STUN message with its interesting attributes indexed.
    Stun(StunMessage<'a>),
}

/// Upper bound of XOR-PEER-ADDRESS attributes indexed in one message. More than this and the
/// message is ambiguous ([`Ambiguity::TooManyPeers`]); clients send one, RFC 8656 allows several in
/// CreatePermission.
pub const MAX_PEERS: usize = 8;

/// Why a well-formed STUN message is still one the relay will not act on: the gate and the engine
/// (the `stun`/`turn` crates, which read the first attribute of a type anywhere in the message and
/// zero-fill short addresses) could read it differently. The gate answers such requests 400.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Ambiguity {
    /// An attribute other than FINGERPRINT follows MESSAGE-INTEGRITY (RFC 8489 §14.5 says to
    /// ignore it; the engine reads it).
    #[error("attribute {0:#06x} follows MESSAGE-INTEGRITY, where only FINGERPRINT may")]
    AfterIntegrity(u16),
    /// An attribute follows FINGERPRINT, which must be last.
    #[error("attribute {0:#06x} follows FINGERPRINT, which must be the last attribute")]
    AfterFingerprint(u16),
    /// An attribute the relay reads appears twice (only XOR-PEER-ADDRESS may repeat).
    #[error("attribute {0:#06x} appears more than once")]
    Duplicate(u16),
    /// An attribute the relay reads has a length its definition does not allow.
    #[error("attribute {0:#06x} has a length its definition does not allow")]
    BadLength(u16),
    /// An XOR-PEER-ADDRESS is not family 1 with 8 bytes or family 2 with 20 bytes.
    #[error("an XOR-PEER-ADDRESS is neither 8 bytes of IPv4 nor 20 bytes of IPv6")]
    BadPeerAddress,
    /// More XOR-PEER-ADDRESS attributes than [`MAX_PEERS`].
    #[error("more than {MAX_PEERS} XOR-PEER-ADDRESS attributes")]
    TooManyPeers,
}

/// The attributes the relay (gate or engine) reads, each at most once per message: their slot
/// in [`StunMessage`]'s index, or `None` for attributes nobody reads.
fn slot(typ: u16) -> Option<usize> {
    Some(match typ {
        attr::USERNAME => 0,
        attr::REALM => 1,
        attr::NONCE => 2,
        attr::MESSAGE_INTEGRITY => 3,
        attr::FINGERPRINT => 4,
        attr::LIFETIME => 5,
        attr::REQUESTED_TRANSPORT => 6,
        attr::REQUESTED_ADDRESS_FAMILY => 7,
        attr::CHANNEL_NUMBER => 8,
        attr::RESERVATION_TOKEN => 9,
        attr::EVEN_PORT => 10,
        attr::DONT_FRAGMENT => 11,
        attr::DATA => 12,
        _ => return None,
    })
}

/// How many attribute types [`slot`] knows.
const SLOTS: usize = 13;

/// The length each slot's attribute must have, where its definition fixes one.
fn length_allowed(typ: u16, len: usize) -> bool {
    match typ {
        attr::MESSAGE_INTEGRITY => len == 20,
        attr::FINGERPRINT
        | attr::LIFETIME
        | attr::REQUESTED_TRANSPORT
        | attr::REQUESTED_ADDRESS_FAMILY
        | attr::CHANNEL_NUMBER => len == 4,
        attr::RESERVATION_TOKEN => len == 8,
        attr::EVEN_PORT => len == 1,
        attr::DONT_FRAGMENT => len == 0,
        _ => true,
    }
}

/// A parsed STUN message: header fields plus offsets of the attributes the relay acts on.
///
/// Every attribute is indexed, wherever it is; what the engine would read differently from the
/// gate is recorded as an [`Ambiguity`] rather than skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StunMessage<'a> {
    raw: &'a [u8],
    /// The method (`method::ALLOCATE`, …).
    pub method: u16,
    /// Request, indication or response.
    pub class: Class,
    /// Offset of each known attribute's header (see [`slot`]), 0 when absent.
    known: [u32; SLOTS],
    /// Offsets of the XOR-PEER-ADDRESS attribute headers, in order.
    peers: [u32; MAX_PEERS],
    peer_count: u8,
    /// DONT-FRAGMENT is present.
    pub dont_fragment: bool,
    ambiguity: Option<Ambiguity>,
}

/// Splits ChannelData from STUN and indexes a STUN message. `buf` is one datagram or one frame.
pub fn inspect(buf: &[u8]) -> Result<Packet<'_>, InspectError> {
    match buf.first() {
        Some(0x40..=0x7f) => {
            if buf.len() < 4 {
                return Err(InspectError::Truncated);
            }
            let number = u16::from_be_bytes([buf[0], buf[1]]);
            let len = usize::from(u16::from_be_bytes([buf[2], buf[3]]));
            if buf.len() < 4 + len {
                return Err(InspectError::Truncated);
            }
            Ok(Packet::ChannelData { number, len })
        }
        Some(0x00..=0x3f) => StunMessage::parse(buf).map(Packet::Stun),
        _ => Err(InspectError::Unknown),
    }
}

impl<'a> StunMessage<'a> {
    /// Parses the header and indexes every attribute. Refuses (with [`InspectError`]) what is not
    /// a STUN message; records (in [`StunMessage::ambiguity`]) what is one but could be read two
    /// ways.
    pub fn parse(raw: &'a [u8]) -> Result<Self, InspectError> {
        if raw.len() < HEADER_LEN {
            return Err(InspectError::Truncated);
        }
        let typ = u16::from_be_bytes([raw[0], raw[1]]);
        let len = usize::from(u16::from_be_bytes([raw[2], raw[3]]));
        if typ & 0xc000 != 0 || u32::from_be_bytes([raw[4], raw[5], raw[6], raw[7]]) != MAGIC_COOKIE
        {
            return Err(InspectError::Unknown);
        }
        if len % 4 != 0 || HEADER_LEN + len != raw.len() {
            return Err(InspectError::Truncated);
        }
        let class = match ((typ >> 4) & 1) | ((typ >> 7) & 2) {
            0 => Class::Request,
            1 => Class::Indication,
            2 => Class::Success,
            _ => Class::Error,
        };
        let method = (typ & 0x000f) | ((typ >> 1) & 0x0070) | ((typ >> 2) & 0x0f80);
        let mut m = StunMessage {
            raw,
            method,
            class,
            known: [0; SLOTS],
            peers: [0; MAX_PEERS],
            peer_count: 0,
            dont_fragment: false,
            ambiguity: None,
        };
        let mut integrity = false;
        let mut fingerprint = false;
        let mut at = HEADER_LEN;
        while at < raw.len() {
            if raw.len() - at < 4 {
                return Err(InspectError::Truncated);
            }
            let t = u16::from_be_bytes([raw[at], raw[at + 1]]);
            let l = usize::from(u16::from_be_bytes([raw[at + 2], raw[at + 3]]));
            if at + 4 + l > raw.len() {
                return Err(InspectError::Truncated);
            }
            let seen = if fingerprint {
                Some(Ambiguity::AfterFingerprint(t))
            } else if integrity && t != attr::FINGERPRINT {
                Some(Ambiguity::AfterIntegrity(t))
            } else if t == attr::XOR_PEER_ADDRESS {
                m.index_peer(at, l)
            } else if let Some(i) = slot(t) {
                if m.known[i] != 0 {
                    Some(Ambiguity::Duplicate(t))
                } else if !length_allowed(t, l) {
                    Some(Ambiguity::BadLength(t))
                } else {
                    // `at` is at least HEADER_LEN, so 0 still means absent.
                    m.known[i] = at as u32;
                    integrity |= t == attr::MESSAGE_INTEGRITY;
                    fingerprint |= t == attr::FINGERPRINT;
                    m.dont_fragment |= t == attr::DONT_FRAGMENT;
                    None
                }
            } else {
                None
            };
            if m.ambiguity.is_none() {
                m.ambiguity = seen;
            }
            at += 4 + l.next_multiple_of(4);
        }
        Ok(m)
    }

    fn index_peer(&mut self, at: usize, len: usize) -> Option<Ambiguity> {
        let value = &self.raw[at + 4..at + 4 + len];
        let strict = matches!((value, len), ([0, 1, ..], 8) | ([0, 2, ..], 20));
        if !strict {
            return Some(Ambiguity::BadPeerAddress);
        }
        let n = usize::from(self.peer_count);
        if n == MAX_PEERS {
            return Some(Ambiguity::TooManyPeers);
        }
        self.peers[n] = at as u32;
        self.peer_count += 1;
        None
    }

    /// What makes this message one the gate and the engine could read differently, if anything
    /// (the first such thing found).
    pub fn ambiguity(&self) -> Option<Ambiguity> {
        self.ambiguity
    }

    /// The value of the indexed attribute `typ` (one of those [`slot`] knows).
    fn known(&self, typ: u16) -> Option<&'a [u8]> {
        let at = *self.known.get(slot(typ)?)? as usize;
        (at != 0).then(|| {
            let l = usize::from(u16::from_be_bytes([self.raw[at + 2], self.raw[at + 3]]));
            &self.raw[at + 4..at + 4 + l]
        })
    }

    /// The whole message.
    pub fn raw(&self) -> &'a [u8] {
        self.raw
    }

    /// The 96-bit transaction ID.
    pub fn transaction_id(&self) -> [u8; 12] {
        let mut t = [0; 12];
        t.copy_from_slice(&self.raw[8..20]);
        t
    }

    fn text(&self, typ: u16) -> Option<&'a str> {
        self.known(typ).and_then(|v| std::str::from_utf8(v).ok())
    }

    /// USERNAME, if present and UTF-8.
    pub fn username(&self) -> Option<&'a str> {
        self.text(attr::USERNAME)
    }

    /// REALM, if present and UTF-8.
    pub fn realm(&self) -> Option<&'a str> {
        self.text(attr::REALM)
    }

    /// NONCE, if present and UTF-8.
    pub fn nonce(&self) -> Option<&'a str> {
        self.text(attr::NONCE)
    }

    /// RESERVATION-TOKEN, if present: `Some(Some(token))` when it is 8 bytes long, `Some(None)`
    /// when malformed (which also makes the message ambiguous).
    pub fn reservation_token(&self) -> Option<Option<[u8; 8]>> {
        self.attribute(attr::RESERVATION_TOKEN)
            .map(|v| v.try_into().ok())
    }

    /// LIFETIME in seconds, if present with its 4 bytes.
    pub fn lifetime(&self) -> Option<u32> {
        self.known(attr::LIFETIME)
            .and_then(|v| <[u8; 4]>::try_from(v).ok())
            .map(u32::from_be_bytes)
    }

    /// The protocol number of REQUESTED-TRANSPORT (17 = UDP), if present with its 4 bytes.
    pub fn requested_transport(&self) -> Option<u8> {
        self.known(attr::REQUESTED_TRANSPORT)
            .filter(|v| v.len() == 4)
            .map(|v| v[0])
    }

    /// The family byte of REQUESTED-ADDRESS-FAMILY (1 = IPv4, 2 = IPv6), if present with its
    /// 4 bytes.
    pub fn requested_family(&self) -> Option<u8> {
        self.known(attr::REQUESTED_ADDRESS_FAMILY)
            .filter(|v| v.len() == 4)
            .map(|v| v[0])
    }

    /// CHANNEL-NUMBER, if present with its 4 bytes.
    pub fn channel_number(&self) -> Option<u16> {
        self.known(attr::CHANNEL_NUMBER)
            .filter(|v| v.len() == 4)
            .map(|v| u16::from_be_bytes([v[0], v[1]]))
    }

    /// Whether EVEN-PORT is present.
    pub fn has_even_port(&self) -> bool {
        self.known[10] != 0
    }

    /// The DATA attribute of a Send indication, if present.
    pub fn data(&self) -> Option<&'a [u8]> {
        self.known(attr::DATA)
    }

    /// Offset of the MESSAGE-INTEGRITY attribute header: the HMAC covers the bytes before it.
    pub fn integrity_offset(&self) -> Option<usize> {
        let at = self.known[3] as usize;
        (at != 0).then_some(at)
    }

    /// The first attribute of type `typ` anywhere in the message (indexed for the attributes the
    /// relay reads, a linear scan for others such as those of an engine response).
    pub fn attribute(&self, typ: u16) -> Option<&'a [u8]> {
        if slot(typ).is_some() {
            return self.known(typ);
        }
        let raw = self.raw;
        let mut at = HEADER_LEN;
        while at + 4 <= raw.len() {
            let t = u16::from_be_bytes([raw[at], raw[at + 1]]);
            let l = usize::from(u16::from_be_bytes([raw[at + 2], raw[at + 3]]));
            if at + 4 + l > raw.len() {
                return None;
            }
            if t == typ {
                return Some(&raw[at + 4..at + 4 + l]);
            }
            at += 4 + l.next_multiple_of(4);
        }
        None
    }

    /// Whether MESSAGE-INTEGRITY is present.
    pub fn has_integrity(&self) -> bool {
        self.integrity_offset().is_some()
    }

    /// Checks MESSAGE-INTEGRITY (HMAC-SHA1 over the message up to it, with the header length
    /// adjusted to end after it) under `key`, in constant time. No allocation.
    pub fn integrity_matches(&self, key: &hmac::Key) -> bool {
        let Some(at) = self.integrity_offset() else {
            return false;
        };
        let tag = integrity_tag(key, &self.raw[..at]);
        tag.ct_eq(&self.raw[at + 4..at + 24]).into()
    }

    /// The XOR-PEER-ADDRESS attributes, decoded, in order. Only strictly decodable ones are
    /// indexed (any other makes the message ambiguous), so each yields an address.
    pub fn peers(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.peers[..usize::from(self.peer_count)]
            .iter()
            .filter_map(|&at| {
                let at = at as usize;
                let l = usize::from(u16::from_be_bytes([self.raw[at + 2], self.raw[at + 3]]));
                decode_xor_address(&self.raw[at + 4..at + 4 + l], &self.raw[8..20])
            })
    }

    /// How many XOR-PEER-ADDRESS attributes were indexed.
    pub fn peer_count(&self) -> usize {
        usize::from(self.peer_count)
    }
}

/// HMAC-SHA1 over `prefix` (header plus attributes before MESSAGE-INTEGRITY) with the header's
/// length field set as if the message ended right after a MESSAGE-INTEGRITY attribute.
fn integrity_tag(key: &hmac::Key, prefix: &[u8]) -> [u8; 20] {
    let mut header = [0u8; HEADER_LEN];
    header.copy_from_slice(&prefix[..HEADER_LEN]);
    let len = (prefix.len() - HEADER_LEN + 24) as u16;
    header[2..4].copy_from_slice(&len.to_be_bytes());
    let mut ctx = hmac::Context::with_key(key);
    ctx.update(&header);
    ctx.update(&prefix[HEADER_LEN..]);
    let mut tag = [0u8; 20];
    tag.copy_from_slice(ctx.sign().as_ref());
    tag
}

/// Decodes an XOR-MAPPED/PEER/RELAYED-ADDRESS value, strictly: a zero first byte, then family 1
/// with 8 bytes or family 2 with 20 bytes. Anything else is `None` (the `stun` crate would
/// zero-fill a short address).
pub fn decode_xor_address(value: &[u8], transaction_id: &[u8]) -> Option<SocketAddr> {
    if value.len() < 4 || value[0] != 0 {
        return None;
    }
    let port = u16::from_be_bytes([value[2], value[3]]) ^ (MAGIC_COOKIE >> 16) as u16;
    let cookie = MAGIC_COOKIE.to_be_bytes();
    match (value[1], value.len()) {
        (0x01, 8) => {
            let mut o = [0u8; 4];
            for i in 0..4 {
                o[i] = value[4 + i] ^ cookie[i];
            }
            Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::from(o)), port))
        }
        (0x02, 20) => {
            let mut o = [0u8; 16];
            for i in 0..16 {
                let pad = if i < 4 {
                    cookie[i]
                } else {
                    transaction_id[i - 4]
                };
                o[i] = value[4 + i] ^ pad;
            }
            Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(o)), port))
        }
        _ => None,
    }
}

/// Encodes an XOR-PEER-ADDRESS-style value (used by tests, benches and rewritten requests).
pub fn encode_xor_address(addr: SocketAddr, transaction_id: &[u8; 12]) -> Vec<u8> {
    let cookie = MAGIC_COOKIE.to_be_bytes();
    let port = addr.port() ^ (MAGIC_COOKIE >> 16) as u16;
    let mut v = vec![0u8];
    match addr.ip() {
        IpAddr::V4(ip) => {
            v.push(0x01);
            v.extend_from_slice(&port.to_be_bytes());
            v.extend(ip.octets().iter().zip(cookie).map(|(a, c)| a ^ c));
        }
        IpAddr::V6(ip) => {
            v.push(0x02);
            v.extend_from_slice(&port.to_be_bytes());
            let pad: Vec<u8> = cookie
                .iter()
                .chain(transaction_id.iter())
                .copied()
                .collect();
            v.extend(ip.octets().iter().zip(pad).map(|(a, c)| a ^ c));
        }
    }
    v
}

/// Writes STUN messages attribute by attribute; used for the few responses the front layer sends
/// itself and for rewritten requests. Not on the per-packet path.
#[derive(Debug)]
pub struct StunWriter {
    buf: Vec<u8>,
}

impl StunWriter {
    /// Starts a message of `method` and `class` with `transaction_id`.
    pub fn new(method: u16, class: Class, transaction_id: [u8; 12]) -> Self {
        let c = match class {
            Class::Request => 0,
            Class::Indication => 1,
            Class::Success => 2,
            Class::Error => 3,
        };
        let typ = (method & 0x000f)
            | ((method & 0x0070) << 1)
            | ((method & 0x0f80) << 2)
            | ((c & 1) << 4)
            | ((c & 2) << 7);
        let mut buf = Vec::with_capacity(128);
        buf.extend_from_slice(&typ.to_be_bytes());
        buf.extend_from_slice(&[0, 0]);
        buf.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
        buf.extend_from_slice(&transaction_id);
        StunWriter { buf }
    }

    /// An error response to `request` carrying `code` and a short reason phrase.
    pub fn error_response(request: &StunMessage<'_>, code: u16, reason: &str) -> Self {
        let mut w = StunWriter::new(request.method, Class::Error, request.transaction_id());
        let mut v = vec![0, 0, (code / 100) as u8, (code % 100) as u8];
        v.extend_from_slice(reason.as_bytes());
        w.attribute(attr::ERROR_CODE, &v);
        w
    }

    /// Appends one attribute, padded to 4 bytes, and updates the header length.
    pub fn attribute(&mut self, typ: u16, value: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(&typ.to_be_bytes());
        self.buf
            .extend_from_slice(&(value.len() as u16).to_be_bytes());
        self.buf.extend_from_slice(value);
        self.buf.resize(self.buf.len().next_multiple_of(4), 0);
        let len = (self.buf.len() - HEADER_LEN) as u16;
        self.buf[2..4].copy_from_slice(&len.to_be_bytes());
        self
    }

    /// Appends MESSAGE-INTEGRITY under `key` and returns the finished message.
    pub fn finish_with_integrity(mut self, key: &hmac::Key) -> Vec<u8> {
        let tag = integrity_tag(key, &self.buf);
        self.attribute(attr::MESSAGE_INTEGRITY, &tag);
        self.buf
    }

    /// Returns the finished message without integrity (challenges, unauthenticated errors).
    pub fn finish(self) -> Vec<u8> {
        self.buf
    }
}

/// Rewrites an authenticated request without the attributes in `strip`, re-signing it under `key`.
/// The front layer uses it to remove DONT-FRAGMENT, which the engine would answer with 420.
pub fn rewrite_without(message: &StunMessage<'_>, strip: &[u16], key: &hmac::Key) -> Vec<u8> {
    rewrite(message, strip, None, key)
}

/// Rewrites an authenticated request without the attributes in `strip` and with the value of the
/// attribute `replace.0` set to `replace.1` (appended if absent), re-signed under `key`.
pub fn rewrite(
    message: &StunMessage<'_>,
    strip: &[u16],
    replace: Option<(u16, [u8; 4])>,
    key: &hmac::Key,
) -> Vec<u8> {
    let raw = message.raw;
    let class = message.class;
    let mut replaced = false;
    let mut w = StunWriter::new(message.method, class, message.transaction_id());
    let mut at = HEADER_LEN;
    while at + 4 <= raw.len() {
        let t = u16::from_be_bytes([raw[at], raw[at + 1]]);
        let l = usize::from(u16::from_be_bytes([raw[at + 2], raw[at + 3]]));
        // Nothing after MESSAGE-INTEGRITY is covered by it, and a FINGERPRINT covers the old
        // bytes: both end the copy (the message is re-signed below).
        if t == attr::MESSAGE_INTEGRITY || t == attr::FINGERPRINT {
            break;
        }
        match replace {
            Some((typ, value)) if typ == t => {
                w.attribute(t, &value);
                replaced = true;
            }
            _ if strip.contains(&t) => {}
            _ => {
                w.attribute(t, &raw[at + 4..at + 4 + l]);
            }
        }
        at += 4 + l.next_multiple_of(4);
    }
    if let Some((typ, value)) = replace.filter(|_| !replaced) {
        w.attribute(typ, &value);
    }
    w.finish_with_integrity(key)
}

/// An HMAC key for MESSAGE-INTEGRITY from a 16-byte long-term key.
pub fn integrity_key(long_term_key: &[u8]) -> hmac::Key {
    hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, long_term_key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use stun::agent::TransactionId;
    use stun::attributes::{ATTR_NONCE, ATTR_REALM, ATTR_USERNAME};
    use stun::integrity::MessageIntegrity;
    use stun::message::{Getter, Message, MessageType, Setter, CLASS_REQUEST, METHOD_ALLOCATE};
    use stun::textattrs::{Nonce, Realm, Username};
    use turn::proto::peeraddr::PeerAddress;

    fn stun_request(method: stun::message::Method, extra: Vec<Box<dyn Setter>>) -> Message {
        let mut setters: Vec<Box<dyn Setter>> = vec![
            Box::new(TransactionId::new()),
            Box::new(MessageType::new(method, CLASS_REQUEST)),
        ];
        setters.extend(extra);
        let mut m = Message::new();
        m.build(&setters).unwrap();
        m
    }

    #[test]
    fn tells_channel_data_from_stun_and_garbage() {
        assert_eq!(
            inspect(&[0x40, 0x01, 0x00, 0x02, 0xaa, 0xbb, 0, 0]),
            Ok(Packet::ChannelData {
                number: 0x4001,
                len: 2
            })
        );
        assert_eq!(
            inspect(&[0x40, 0x01, 0x00, 0x05, 0xaa]),
            Err(InspectError::Truncated)
        );
        assert_eq!(inspect(&[0x80; 24]), Err(InspectError::Unknown));
        assert_eq!(inspect(&[]), Err(InspectError::Unknown));
        let mut not_cookie = [0u8; 20];
        not_cookie[1] = 1;
        assert_eq!(inspect(&not_cookie), Err(InspectError::Unknown));
    }

    #[test]
    fn indexes_a_stun_allocate_built_by_the_stun_crate() {
        let key = crate::turn::credentials::long_term_key("1:u", "realm", "pw");
        let m = stun_request(
            METHOD_ALLOCATE,
            vec![
                Box::new(Username::new(ATTR_USERNAME, "1:u".into())),
                Box::new(Realm::new(ATTR_REALM, "realm".into())),
                Box::new(Nonce::new(ATTR_NONCE, "abc".into())),
                Box::new(MessageIntegrity(key.clone())),
            ],
        );
        let Ok(Packet::Stun(s)) = inspect(&m.raw) else {
            panic!("not stun")
        };
        assert_eq!(s.method, method::ALLOCATE);
        assert_eq!(s.class, Class::Request);
        assert_eq!(s.username(), Some("1:u"));
        assert_eq!(s.realm(), Some("realm"));
        assert_eq!(s.nonce(), Some("abc"));
        assert_eq!(s.transaction_id(), m.transaction_id.0);
        assert!(s.integrity_matches(&integrity_key(&key)));
        let wrong = crate::turn::credentials::long_term_key("1:u", "realm", "other");
        assert!(!s.integrity_matches(&integrity_key(&wrong)));
        // A flipped bit anywhere before MESSAGE-INTEGRITY breaks it.
        let mut tampered = m.raw.clone();
        tampered[HEADER_LEN + 5] ^= 1;
        let t = StunMessage::parse(&tampered).unwrap();
        assert!(!t.integrity_matches(&integrity_key(&key)));
    }

    #[test]
    fn decodes_peer_addresses_like_the_engine_encodes_them() {
        for peer in [
            "127.0.0.1:5000",
            "[::ffff:127.0.0.1]:7",
            "[2001:db8::5]:65535",
        ] {
            let peer: SocketAddr = peer.parse().unwrap();
            let m = stun_request(
                stun::message::METHOD_CREATE_PERMISSION,
                vec![Box::new(PeerAddress {
                    ip: peer.ip(),
                    port: peer.port(),
                })],
            );
            let s = StunMessage::parse(&m.raw).unwrap();
            assert_eq!(s.peer_count(), 1);
            assert_eq!(s.peers().next(), Some(peer));
            assert_eq!(s.ambiguity(), None);
            let encoded = encode_xor_address(peer, &m.transaction_id.0);
            assert_eq!(
                decode_xor_address(&encoded, &m.transaction_id.0),
                Some(peer)
            );
        }
        assert_eq!(decode_xor_address(&[0, 1, 0], &[0; 12]), None);
        assert_eq!(
            decode_xor_address(&[0, 3, 0, 0, 1, 2, 3, 4], &[0; 12]),
            None
        );
    }

    #[test]
    fn counts_too_many_peers() {
        let mut extra: Vec<Box<dyn Setter>> = Vec::new();
        for i in 0..(MAX_PEERS + 1) {
            extra.push(Box::new(PeerAddress {
                ip: "8.8.8.8".parse().unwrap(),
                port: i as u16,
            }));
        }
        let m = stun_request(stun::message::METHOD_CREATE_PERMISSION, extra);
        let s = StunMessage::parse(&m.raw).unwrap();
        assert_eq!(s.peer_count(), MAX_PEERS);
        assert_eq!(s.ambiguity(), Some(Ambiguity::TooManyPeers));
    }

    /// A request with `attrs` (type, value) in this order.
    fn with_attributes(attrs: &[(u16, &[u8])]) -> Vec<u8> {
        let mut w = StunWriter::new(method::CREATE_PERMISSION, Class::Request, [4; 12]);
        for (t, v) in attrs {
            w.attribute(*t, v);
        }
        w.finish()
    }

    #[test]
    fn records_what_the_engine_could_read_differently() {
        let peer = encode_xor_address("8.8.8.8:1".parse().unwrap(), &[4; 12]);
        let mi: &[u8] = &[0; 20];
        type Attributes<'a> = &'a [(u16, &'a [u8])];
        let cases: [(Attributes, Option<Ambiguity>); 10] = [
            (
                &[
                    (attr::XOR_PEER_ADDRESS, &peer),
                    (attr::MESSAGE_INTEGRITY, mi),
                ],
                None,
            ),
            (
                &[(attr::MESSAGE_INTEGRITY, mi), (attr::FINGERPRINT, &[0; 4])],
                None,
            ),
            (
                &[
                    (attr::MESSAGE_INTEGRITY, mi),
                    (attr::XOR_PEER_ADDRESS, &peer),
                ],
                Some(Ambiguity::AfterIntegrity(attr::XOR_PEER_ADDRESS)),
            ),
            (
                &[(attr::FINGERPRINT, &[0; 4]), (attr::MESSAGE_INTEGRITY, mi)],
                Some(Ambiguity::AfterFingerprint(attr::MESSAGE_INTEGRITY)),
            ),
            (
                &[(attr::NONCE, b"a"), (attr::NONCE, b"b")],
                Some(Ambiguity::Duplicate(attr::NONCE)),
            ),
            (
                &[(attr::LIFETIME, &[0, 0, 1])],
                Some(Ambiguity::BadLength(attr::LIFETIME)),
            ),
            (
                &[(attr::MESSAGE_INTEGRITY, &[0; 19])],
                Some(Ambiguity::BadLength(attr::MESSAGE_INTEGRITY)),
            ),
            (
                &[(attr::XOR_PEER_ADDRESS, &peer[..6])],
                Some(Ambiguity::BadPeerAddress),
            ),
            (
                &[(attr::XOR_PEER_ADDRESS, &[&peer[..], &[0; 12]].concat())],
                Some(Ambiguity::BadPeerAddress),
            ),
            // Attributes nobody reads may repeat.
            (&[(0x8022, b"x"), (0x8022, b"y")], None),
        ];
        for (attrs, want) in cases {
            let bytes = with_attributes(attrs);
            let m = StunMessage::parse(&bytes).unwrap();
            assert_eq!(m.ambiguity(), want, "{attrs:?}");
        }
        // The error reads like a sentence.
        assert_eq!(
            Ambiguity::AfterIntegrity(0x0012).to_string(),
            "attribute 0x0012 follows MESSAGE-INTEGRITY, where only FINGERPRINT may"
        );
    }

    #[test]
    fn rejects_inconsistent_lengths() {
        let m = stun_request(METHOD_ALLOCATE, vec![]);
        let mut longer = m.raw.clone();
        longer.extend_from_slice(&[0, 0, 0, 0]);
        assert_eq!(StunMessage::parse(&longer), Err(InspectError::Truncated));
        let mut overrun = m.raw.clone();
        overrun.extend_from_slice(&[0, 6, 0, 40, 0, 0, 0, 0]);
        overrun[3] = 8;
        assert_eq!(StunMessage::parse(&overrun), Err(InspectError::Truncated));
    }

    #[test]
    fn writer_output_is_accepted_by_the_stun_crate() {
        let req = stun_request(METHOD_ALLOCATE, vec![]);
        let parsed = StunMessage::parse(&req.raw).unwrap();
        let key = crate::turn::credentials::long_term_key("1:u", "r", "p");
        let mut w = StunWriter::error_response(&parsed, 486, "Allocation Quota Reached");
        w.attribute(attr::REALM, b"r");
        let bytes = w.finish_with_integrity(&integrity_key(&key));

        let mut m = Message::new();
        m.raw = bytes.clone();
        m.decode().unwrap();
        assert_eq!(m.transaction_id, req.transaction_id);
        assert_eq!(
            m.typ,
            MessageType::new(METHOD_ALLOCATE, stun::message::CLASS_ERROR_RESPONSE)
        );
        let mut code = stun::error_code::ErrorCodeAttribute::default();
        code.get_from(&m).unwrap();
        assert_eq!(code.code.0, 486);
        assert_eq!(code.reason, b"Allocation Quota Reached");
        MessageIntegrity(key).check(&mut m).unwrap();
        // And our reader agrees.
        let ours = StunMessage::parse(&bytes).unwrap();
        assert_eq!(ours.class, Class::Error);
        assert_eq!(ours.realm(), Some("r"));
    }

    #[test]
    fn strips_dont_fragment_and_resigns() {
        let key_bytes = crate::turn::credentials::long_term_key("1:u", "r", "p");
        let key = integrity_key(&key_bytes);
        let mut w = StunWriter::new(method::ALLOCATE, Class::Request, [7; 12]);
        w.attribute(0x0019, &[17, 0, 0, 0]); // REQUESTED-TRANSPORT UDP
        w.attribute(attr::DONT_FRAGMENT, &[]);
        w.attribute(attr::USERNAME, b"1:u");
        let original = w.finish_with_integrity(&key);
        let parsed = StunMessage::parse(&original).unwrap();
        assert!(parsed.dont_fragment);
        assert!(parsed.integrity_matches(&key));

        let rewritten = rewrite_without(&parsed, &[attr::DONT_FRAGMENT], &key);
        let again = StunMessage::parse(&rewritten).unwrap();
        assert!(!again.dont_fragment);
        assert_eq!(again.username(), Some("1:u"));
        assert!(again.integrity_matches(&key));
        let mut m = Message::new();
        m.raw = rewritten;
        m.decode().unwrap();
        MessageIntegrity(key_bytes).check(&mut m).unwrap();
    }

    #[test]
    fn a_rewrite_drops_a_fingerprint_that_no_longer_matches() {
        // Found by the stun_inspect fuzz target: a FINGERPRINT without MESSAGE-INTEGRITY was
        // copied into the rewrite, so the appended attribute and the new MESSAGE-INTEGRITY
        // followed it and the rewrite failed its own check.
        let key = integrity_key(&crate::turn::credentials::long_term_key("1:u", "r", "p"));
        let mut w = StunWriter::new(method::ALLOCATE, Class::Request, [9; 12]);
        w.attribute(attr::USERNAME, b"1:u");
        w.attribute(attr::FINGERPRINT, &[1, 2, 3, 4]);
        let original = w.finish();
        let parsed = StunMessage::parse(&original).unwrap();
        let rewritten = rewrite(&parsed, &[], Some((attr::LIFETIME, [0, 0, 2, 88])), &key);
        let again = StunMessage::parse(&rewritten).unwrap();
        assert_eq!(again.ambiguity(), None);
        assert!(again.integrity_matches(&key));
        assert_eq!(again.attribute(attr::FINGERPRINT), None);
        assert_eq!(again.attribute(attr::LIFETIME), Some(&[0, 0, 2, 88][..]));
    }
}
