//! The node-to-node link's protocol, without I/O: the hello each side sends, the keys both derive
//! from `static-auth-secret`, and the sealed frames that follow.
//!
//! A link opens with each side's [`Hello`] in the clear (a magic, a random 32-byte nonce, the
//! node ID). Each direction then has its own AES-256-GCM key, HKDF-SHA256 of the secret with both
//! nonces, both IDs and the direction in the info ([`Keys::derive`]), so no two links (and no two
//! directions of one link) share a key. Every frame after the hellos is `u32` length, then the
//! ciphertext and its tag; the AEAD nonce is the frame's number in its direction (0, 1, 2, …),
//! never sent: a frame replayed, dropped or reordered does not open. The first frame each way is a
//! [`Frame::Proof`]: the acceptor answers nothing beyond its hello until the dialer's proof opens,
//! and the dialer sends no message until the acceptor's does. A frame longer than [`MAX_FRAME`]
//! is refused before it is read.
//!
//! Rotation: the dialer seals with the first configured secret; the acceptor tries each of its
//! secrets on the dialer's proof and answers with the one that opened it.

use bytes::{Buf as _, BufMut as _, Bytes, BytesMut};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::hkdf::{Salt, HKDF_SHA256};
use ring::rand::{SecureRandom, SystemRandom};

use crate::cluster::publish::MAX_BATCH_BYTES;

/// First bytes of a hello: names the protocol and its version.
pub const MAGIC: &[u8; 8] = b"CGLINK\x00\x01";
/// Length of each side's random nonce.
pub const NONCE_BYTES: usize = 32;
/// A hello's fixed part: magic, nonce, and the length of the node ID that follows.
pub const HELLO_HEAD: usize = MAGIC.len() + NONCE_BYTES + 1;
/// Longest node ID (as `node-id` allows).
pub const MAX_NODE_ID: usize = 64;
/// AES-GCM's tag.
pub const TAG: usize = 16;
/// Longest sealed frame (length prefix excluded): one writer batch of bus payloads
/// ([`MAX_BATCH_BYTES`], plus the largest single message that can start it) and room for its
/// framing. Anything longer closes the link before it is read.
pub const MAX_FRAME: usize = 2 * MAX_BATCH_BYTES + 64 * 1024;

/// HKDF salt: names the scheme, so another use of the same secret derives other keys.
const SALT: &[u8] = b"callgate cluster link v1";
/// The plaintext of a proof frame.
const PROOF: &[u8] = b"callgate link proof";

/// Why a link is closed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The peer does not speak this protocol (or this version of it).
    #[error("the peer's hello is not a callgate link hello")]
    NotALink,
    /// The hello's node ID is empty, too long or not `[A-Za-z0-9._-]`.
    #[error("the peer's hello names no valid node ID")]
    BadNodeId,
    /// A frame does not open with the key: another secret, altered, replayed or out of order.
    #[error("a frame did not open (wrong static-auth-secret, altered, replayed or reordered)")]
    BadTag,
    /// A frame's length is above [`MAX_FRAME`] or below a tag.
    #[error("a frame of {0} bytes is outside the allowed size")]
    Oversize(usize),
    /// A frame opened but its content is not what the protocol allows there.
    #[error("a frame's content is not valid here: {0}")]
    Malformed(&'static str),
}

impl WireError {
    /// The `reason` label of `callgate_cluster_link_failures_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NotALink | Self::BadNodeId => "hello",
            Self::BadTag => "auth",
            Self::Oversize(_) => "oversize",
            Self::Malformed(_) => "malformed",
        }
    }
}

/// What each side sends first, in the clear.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// Fresh for each link, from the system's random source.
    pub nonce: [u8; NONCE_BYTES],
    /// The sender's `node-id`.
    pub node: String,
}

impl Hello {
    /// A hello for `node` with a fresh nonce.
    pub fn new(node: &str) -> Self {
        let mut nonce = [0u8; NONCE_BYTES];
        SystemRandom::new()
            .fill(&mut nonce)
            .expect("the system random source works");
        Self {
            nonce,
            node: node.to_owned(),
        }
    }

    /// Magic, nonce, ID length (u8), ID.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HELLO_HEAD + self.node.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.nonce);
        out.push(u8::try_from(self.node.len()).unwrap_or(u8::MAX));
        out.extend_from_slice(self.node.as_bytes());
        out
    }

    /// Reads a hello's fixed part: its nonce and how many ID bytes follow.
    pub fn head(head: &[u8; HELLO_HEAD]) -> Result<([u8; NONCE_BYTES], usize), WireError> {
        if &head[..MAGIC.len()] != MAGIC {
            return Err(WireError::NotALink);
        }
        let nonce = head[MAGIC.len()..MAGIC.len() + NONCE_BYTES]
            .try_into()
            .expect("NONCE_BYTES long");
        let len = usize::from(head[HELLO_HEAD - 1]);
        if len == 0 || len > MAX_NODE_ID {
            return Err(WireError::BadNodeId);
        }
        Ok((nonce, len))
    }

    /// The hello whose fixed part gave `nonce` and whose ID bytes are `id`.
    pub fn with_id(nonce: [u8; NONCE_BYTES], id: &[u8]) -> Result<Self, WireError> {
        let valid = id
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(b));
        if !valid || id.is_empty() || id.len() > MAX_NODE_ID {
            return Err(WireError::BadNodeId);
        }
        Ok(Self {
            nonce,
            node: String::from_utf8(id.to_vec()).map_err(|_| WireError::BadNodeId)?,
        })
    }
}

/// Which end of the link this side is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Opened the connection; sends messages, reads acknowledgements.
    Dialer,
    /// Accepted it; reads messages, sends acknowledgements.
    Acceptor,
}

/// One side's keys: sealing what it sends, opening what it reads.
pub struct Keys {
    /// For frames this side sends.
    pub sealer: Sealer,
    /// For frames this side reads.
    pub opener: Opener,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keys").finish_non_exhaustive()
    }
}

impl Keys {
    /// This side's keys for the link whose hellos are `dialer` and `acceptor`, from `secret`.
    pub fn derive(secret: &[u8], role: Role, dialer: &Hello, acceptor: &Hello) -> Self {
        let prk = Salt::new(HKDF_SHA256, SALT).extract(secret);
        let key = |direction: &[u8]| {
            let (dl, al) = ([dialer.node.len() as u8], [acceptor.node.len() as u8]);
            let info = [
                &dialer.nonce[..],
                &acceptor.nonce[..],
                &dl,
                dialer.node.as_bytes(),
                &al,
                acceptor.node.as_bytes(),
                direction,
            ];
            let okm = prk
                .expand(&info, &AES_256_GCM)
                .expect("32 bytes is a valid HKDF-SHA256 output length");
            LessSafeKey::new(UnboundKey::from(okm))
        };
        let (to_acceptor, to_dialer) = (key(b"dialer to acceptor"), key(b"acceptor to dialer"));
        let (send, read) = match role {
            Role::Dialer => (to_acceptor, to_dialer),
            Role::Acceptor => (to_dialer, to_acceptor),
        };
        Self {
            sealer: Sealer { key: send, next: 0 },
            opener: Opener { key: read, next: 0 },
        }
    }

    /// The acceptor's keys: those of the first of `secrets` under which the dialer's first frame
    /// (`proof`, sealed, without its length) opens as a [`Frame::Proof`]; that frame is consumed.
    pub fn accept<S: AsRef<[u8]>>(
        secrets: &[S],
        dialer: &Hello,
        acceptor: &Hello,
        proof: &[u8],
    ) -> Result<Self, WireError> {
        for secret in secrets {
            let mut keys = Self::derive(secret.as_ref(), Role::Acceptor, dialer, acceptor);
            let mut copy = proof.to_vec();
            if let Ok(Frame::Proof) = keys.opener.open(&mut copy).and_then(Frame::decode) {
                return Ok(keys);
            }
        }
        Err(WireError::BadTag)
    }
}

/// The AEAD nonce of frame `n`: four zero bytes, then `n` big-endian.
fn nonce(n: u64) -> Nonce {
    let mut bytes = [0u8; NONCE_LEN];
    bytes[4..].copy_from_slice(&n.to_be_bytes());
    Nonce::assume_unique_for_key(bytes)
}

/// Seals one direction's frames, numbering them.
pub struct Sealer {
    /// The direction's key.
    key: LessSafeKey,
    /// The next frame's number (its AEAD nonce).
    next: u64,
}

impl Sealer {
    /// The number the next sealed frame gets.
    pub fn next(&self) -> u64 {
        self.next
    }

    /// Appends `frame`, sealed, with its length before it, to `out`; returns its number.
    pub fn seal(&mut self, frame: &Frame, out: &mut BytesMut) -> u64 {
        let n = self.next;
        self.next += 1;
        let start = out.len();
        out.put_u32(0);
        frame.encode(out);
        let mut body = out.split_off(start + 4);
        let tag = self
            .key
            .seal_in_place_separate_tag(nonce(n), Aad::empty(), &mut body)
            .expect("AES-GCM seals any frame length we send");
        body.extend_from_slice(tag.as_ref());
        let len = u32::try_from(body.len()).expect("frames are far below 4 GiB");
        out[start..start + 4].copy_from_slice(&len.to_be_bytes());
        out.unsplit(body);
        n
    }
}

/// Opens one direction's frames, in order.
pub struct Opener {
    /// The direction's key.
    key: LessSafeKey,
    /// The number the next frame must have.
    next: u64,
}

impl Opener {
    /// The number the next frame must have.
    pub fn next(&self) -> u64 {
        self.next
    }

    /// Checks a frame's length prefix before reading it: the body length to read.
    pub fn check_len(len: u32) -> Result<usize, WireError> {
        let len = len as usize;
        if !(TAG..=MAX_FRAME).contains(&len) {
            return Err(WireError::Oversize(len));
        }
        Ok(len)
    }

    /// Opens the next frame (`sealed`, without its length prefix) in place; its plaintext.
    pub fn open<'a>(&mut self, sealed: &'a mut [u8]) -> Result<&'a [u8], WireError> {
        Self::check_len(u32::try_from(sealed.len()).unwrap_or(u32::MAX))?;
        let plain = self
            .key
            .open_in_place(nonce(self.next), Aad::empty(), sealed)
            .map_err(|_| WireError::BadTag)?;
        self.next += 1;
        Ok(plain)
    }
}

/// What a frame carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// The first frame each way: opening it proves the sender holds the secret.
    Proof,
    /// Acceptor to dialer: its inbox has seen the link-start marker the dialer published, so
    /// every message the dialer sent through Redis before it is in the inbox ahead of the link's.
    Ready,
    /// Dialer to acceptor: a bus payload (one [`BusMessage`](crate::cluster::bus::BusMessage) or
    /// a batch), acknowledged by an [`Frame::Ack`] naming this frame's number.
    Messages(Bytes),
    /// Acceptor to dialer: what became of the messages of the dialer's frame `frame`.
    Ack {
        /// The number of the [`Frame::Messages`] frame answered (frames are answered in order).
        frame: u64,
        /// One answer per message, in order: `true` taken by the inbox, `false` nobody reads
        /// this node's inbox any more (it is draining: hold the message).
        taken: Vec<bool>,
    },
}

impl Frame {
    /// Type byte, then the body.
    fn encode(&self, out: &mut BytesMut) {
        match self {
            Frame::Proof => {
                out.put_u8(0);
                out.put_slice(PROOF);
            }
            Frame::Ready => out.put_u8(1),
            Frame::Messages(payload) => {
                out.put_u8(2);
                out.put_slice(payload);
            }
            Frame::Ack { frame, taken } => {
                out.put_u8(3);
                out.put_u64(*frame);
                out.extend(taken.iter().map(|&t| u8::from(t)));
            }
        }
    }

    /// Reads an opened frame's plaintext.
    pub fn decode(plain: &[u8]) -> Result<Frame, WireError> {
        let (&kind, mut body) = plain
            .split_first()
            .ok_or(WireError::Malformed("empty frame"))?;
        match kind {
            0 if body == PROOF => Ok(Frame::Proof),
            1 if body.is_empty() => Ok(Frame::Ready),
            2 if !body.is_empty() => Ok(Frame::Messages(Bytes::copy_from_slice(body))),
            3 if body.len() >= 8 => {
                let frame = body.get_u64();
                let taken = body
                    .iter()
                    .map(|&b| match b {
                        0 => Ok(false),
                        1 => Ok(true),
                        _ => Err(WireError::Malformed("an answer is neither 0 nor 1")),
                    })
                    .collect::<Result<_, _>>()?;
                Ok(Frame::Ack { frame, taken })
            }
            _ => Err(WireError::Malformed("unknown frame type or length")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123";

    fn hellos() -> (Hello, Hello) {
        (Hello::new("node-a"), Hello::new("node-b"))
    }

    /// The frame `out` holds (one), without its length prefix.
    fn body(out: &BytesMut) -> Vec<u8> {
        let len = u32::from_be_bytes(out[..4].try_into().unwrap()) as usize;
        assert_eq!(out.len(), 4 + len);
        out[4..].to_vec()
    }

    fn sealed(sealer: &mut Sealer, frame: &Frame) -> Vec<u8> {
        let mut out = BytesMut::new();
        sealer.seal(frame, &mut out);
        body(&out)
    }

    #[test]
    fn hellos_round_trip_and_foreign_bytes_are_refused() {
        let hello = Hello::new("call-2.example_1");
        let bytes = hello.encode();
        let head: [u8; HELLO_HEAD] = bytes[..HELLO_HEAD].try_into().unwrap();
        let (nonce, len) = Hello::head(&head).unwrap();
        assert_eq!(
            Hello::with_id(nonce, &bytes[HELLO_HEAD..HELLO_HEAD + len]).unwrap(),
            hello
        );
        let mut http = [0u8; HELLO_HEAD];
        http[..8].copy_from_slice(b"GET / HT");
        assert_eq!(Hello::head(&http), Err(WireError::NotALink));
        let mut empty = head;
        empty[HELLO_HEAD - 1] = 0;
        assert_eq!(Hello::head(&empty), Err(WireError::BadNodeId));
        assert_eq!(
            Hello::with_id(nonce, b"a b"),
            Err(WireError::BadNodeId),
            "IDs are what node-id allows"
        );
        assert_ne!(Hello::new("x").nonce, Hello::new("x").nonce);
    }

    #[test]
    fn both_sides_derive_matching_keys_and_every_frame_type_round_trips() {
        let (d, a) = hellos();
        let mut dialer = Keys::derive(SECRET, Role::Dialer, &d, &a);
        let proof = sealed(&mut dialer.sealer, &Frame::Proof);
        let mut acceptor = Keys::accept(&[b"old-secret-0123456789", SECRET], &d, &a, &proof)
            .expect("the second (listed) secret opens it");
        let frames = [
            Frame::Ready,
            Frame::Messages(Bytes::from_static(b"\x02payload")),
            Frame::Ack {
                frame: 7,
                taken: vec![true, false, true],
            },
        ];
        for frame in &frames {
            let mut s = sealed(&mut acceptor.sealer, frame);
            assert!(!s.windows(7).any(|w| w == b"payload"), "not in the clear");
            let plain = dialer.opener.open(&mut s).unwrap();
            assert_eq!(&Frame::decode(plain).unwrap(), frame);
        }
        let mut s = sealed(&mut dialer.sealer, &frames[1]);
        assert_eq!(
            Frame::decode(acceptor.opener.open(&mut s).unwrap()).unwrap(),
            frames[1]
        );
        assert_eq!(acceptor.opener.next(), 2, "proof, then one message frame");
    }

    #[test]
    fn a_wrong_secret_is_refused_at_the_proof() {
        let (d, a) = hellos();
        let mut dialer = Keys::derive(b"another-secret-of-20b", Role::Dialer, &d, &a);
        let proof = sealed(&mut dialer.sealer, &Frame::Proof);
        assert_eq!(
            Keys::accept(&[SECRET], &d, &a, &proof).unwrap_err(),
            WireError::BadTag
        );
        // The right secret but another link's hellos (a proof replayed from an old link).
        let mut dialer = Keys::derive(SECRET, Role::Dialer, &d, &a);
        let proof = sealed(&mut dialer.sealer, &Frame::Proof);
        let other = Hello::new("node-b");
        assert!(Keys::accept(&[SECRET], &d, &other, &proof).is_err());
        // A message frame is not a proof, even under the right key.
        let mut dialer = Keys::derive(SECRET, Role::Dialer, &d, &a);
        let ready = sealed(&mut dialer.sealer, &Frame::Ready);
        assert!(Keys::accept(&[SECRET], &d, &a, &ready).is_err());
    }

    #[test]
    fn tampered_replayed_and_reordered_frames_do_not_open() {
        let (d, a) = hellos();
        let mut dialer = Keys::derive(SECRET, Role::Dialer, &d, &a);
        let mut acceptor = Keys::derive(SECRET, Role::Acceptor, &d, &a);
        let message = Frame::Messages(Bytes::from_static(b"hello"));
        let first = sealed(&mut dialer.sealer, &message);
        let second = sealed(&mut dialer.sealer, &message);

        let mut tampered = first.clone();
        tampered[3] ^= 1;
        assert_eq!(
            acceptor.opener.open(&mut tampered).unwrap_err(),
            WireError::BadTag
        );
        // Out of order: frame 1 where frame 0 is due.
        assert_eq!(
            acceptor.opener.open(&mut second.clone()).unwrap_err(),
            WireError::BadTag
        );
        acceptor.opener.open(&mut first.clone()).unwrap();
        // Replayed: frame 0 again where frame 1 is due.
        assert_eq!(
            acceptor.opener.open(&mut first.clone()).unwrap_err(),
            WireError::BadTag
        );
        acceptor.opener.open(&mut second.clone()).unwrap();
        // The other direction's key does not open the dialer's frames (no reflection).
        let mut reflected = sealed(&mut dialer.sealer, &message);
        assert!(dialer.opener.open(&mut reflected).is_err());
    }

    #[test]
    fn oversize_and_undersize_lengths_are_refused_before_reading() {
        assert_eq!(
            Opener::check_len(MAX_FRAME as u32 + 1),
            Err(WireError::Oversize(MAX_FRAME + 1))
        );
        assert_eq!(
            Opener::check_len(u32::MAX).unwrap_err().reason(),
            "oversize"
        );
        assert_eq!(Opener::check_len(3), Err(WireError::Oversize(3)));
        assert_eq!(Opener::check_len(MAX_FRAME as u32), Ok(MAX_FRAME));
        // A full writer batch fits.
        let (d, a) = hellos();
        let mut dialer = Keys::derive(SECRET, Role::Dialer, &d, &a);
        let mut acceptor = Keys::derive(SECRET, Role::Acceptor, &d, &a);
        let big = Frame::Messages(Bytes::from(vec![7u8; 2 * MAX_BATCH_BYTES]));
        let mut s = sealed(&mut dialer.sealer, &big);
        assert_eq!(
            Frame::decode(acceptor.opener.open(&mut s).unwrap()),
            Ok(big)
        );
    }

    #[test]
    fn malformed_frames_are_refused() {
        assert!(Frame::decode(&[]).is_err());
        assert!(Frame::decode(&[0, b'x']).is_err());
        assert!(Frame::decode(&[1, 0]).is_err());
        assert!(Frame::decode(&[2]).is_err());
        assert!(Frame::decode(&[3, 0, 0, 0]).is_err());
        assert!(Frame::decode(&[3, 0, 0, 0, 0, 0, 0, 0, 1, 2]).is_err());
        assert!(Frame::decode(&[9]).is_err());
    }
}
