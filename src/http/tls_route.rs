//! Which service a TLS connection on the HTTPS port is for: HTTP (and WebSockets) or TURN
//! (issue 14, "TURN over TLS on the HTTPS port").
//!
//! First by the ClientHello's ALPN list ([`by_alpn`]): `stun.turn` (RFC 7443) anywhere in it wins
//! (coturn's `turnutils_uclient -S` offers `http/1.1, stun.turn, stun.nat-discovery`); any other
//! list is HTTP (and `acme-tls/1` alone stays the ACME validation, which the HTTPS configuration's
//! certificate resolver answers). A ClientHello without ALPN — what browsers send for `turns:` —
//! is decided after the handshake by its first bytes ([`by_first_bytes`], read by [`peek`]): a STUN
//! header (two zero bits, magic cookie 0x2112A442 at bytes 4–7) is TURN, anything else HTTP, so
//! `curl --no-alpn` still works. ChannelData never starts a connection, so it is not looked for.
//! The peek is bounded in bytes ([`PEEK_BYTES`]) and time (the caller's header-read timeout), and
//! what it read is replayed to whichever side gets the connection.

use std::io;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt};

/// RFC 7443's ALPN id for TURN.
pub const STUN_TURN_ALPN: &[u8] = b"stun.turn";

/// The STUN magic cookie, bytes 4–7 of every STUN message.
const MAGIC_COOKIE: [u8; 4] = [0x21, 0x12, 0xA4, 0x42];

/// Most bytes read before deciding: a STUN header's length. The decision needs at most 8.
pub const PEEK_BYTES: usize = 20;

/// The service a connection goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    /// HTTPS and WebSockets (and the ACME validation).
    Http,
    /// TURN over TLS.
    Turn,
}

/// What the ClientHello alone decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HelloRoute {
    /// Decided: this service.
    To(Service),
    /// No ALPN offered: complete the handshake with the HTTP configuration (which selects no
    /// protocol for such a client) and decide by the first bytes.
    Sniff,
}

/// Routes by the offered ALPN ids (`None`: the ClientHello carried no ALPN extension).
pub fn by_alpn<'a>(offered: Option<impl Iterator<Item = &'a [u8]>>) -> HelloRoute {
    match offered {
        None => HelloRoute::Sniff,
        Some(mut ids) => {
            if ids.any(|id| id == STUN_TURN_ALPN) {
                HelloRoute::To(Service::Turn)
            } else {
                HelloRoute::To(Service::Http)
            }
        }
    }
}

/// Decides by the first bytes a client sent, or `None` if more are needed (at most 8).
pub fn by_first_bytes(first: &[u8]) -> Option<Service> {
    match first.first() {
        None => None,
        Some(b) if b >> 6 != 0 => Some(Service::Http),
        Some(_) if first.len() < 8 => None,
        Some(_) if first[4..8] == MAGIC_COOKIE => Some(Service::Turn),
        Some(_) => Some(Service::Http),
    }
}

/// Why [`peek`] could not decide; the connection is closed.
#[derive(Debug, thiserror::Error)]
pub enum PeekError {
    /// Nothing decisive arrived within the header-read timeout.
    #[error("the client sent no request or STUN header within {0:?}")]
    Timeout(Duration),
    /// The connection failed or ended while being read.
    #[error("the connection ended before its first bytes could be read: {0}")]
    Io(#[from] io::Error),
}

/// Reads up to [`PEEK_BYTES`] from `stream` within `timeout`, until [`by_first_bytes`] decides,
/// and returns the decision with the bytes read (to replay). A connection that ends after a few
/// bytes goes to HTTP, which answers or closes it.
pub async fn peek<S: AsyncRead + Unpin>(
    stream: &mut S,
    timeout: Duration,
) -> Result<(Service, Bytes), PeekError> {
    let read = async {
        let mut buf = [0u8; PEEK_BYTES];
        let mut len = 0;
        loop {
            let n = stream.read(&mut buf[len..]).await?;
            if n == 0 {
                if len == 0 {
                    return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
                }
                return Ok((Service::Http, Bytes::copy_from_slice(&buf[..len])));
            }
            len += n;
            if let Some(service) = by_first_bytes(&buf[..len]) {
                return Ok((service, Bytes::copy_from_slice(&buf[..len])));
            }
        }
    };
    tokio::time::timeout(timeout, read)
        .await
        .map_err(|_| PeekError::Timeout(timeout))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    fn alpn(ids: &[&'static [u8]]) -> HelloRoute {
        by_alpn(Some(ids.iter().copied()))
    }

    #[test]
    fn stun_turn_wins_whenever_it_is_offered() {
        // What coturn's turnutils_uclient -S offers.
        let uclient: &[&[u8]] = &[b"http/1.1", STUN_TURN_ALPN, b"stun.nat-discovery"];
        assert_eq!(alpn(uclient), HelloRoute::To(Service::Turn));
        assert_eq!(alpn(&[STUN_TURN_ALPN]), HelloRoute::To(Service::Turn));
        assert_eq!(alpn(&[b"h2", b"http/1.1"]), HelloRoute::To(Service::Http));
        assert_eq!(alpn(&[b"acme-tls/1"]), HelloRoute::To(Service::Http));
        assert_eq!(by_alpn(None::<std::iter::Empty<&[u8]>>), HelloRoute::Sniff);
    }

    #[test]
    fn a_stun_header_is_turn_and_http_is_http() {
        let binding = [0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xA4, 0x42, 1, 2, 3, 4];
        assert_eq!(by_first_bytes(&binding), Some(Service::Turn));
        assert_eq!(by_first_bytes(&binding[..7]), None);
        assert_eq!(
            by_first_bytes(b"GET /healthz HTTP/1.1\r\n"),
            Some(Service::Http)
        );
        // The HTTP/2 preface starts with 'P' (0x50): its top bits are 01.
        assert_eq!(by_first_bytes(b"PRI * HTTP/2.0"), Some(Service::Http));
        // Two zero bits but no cookie (an RFC 3489 client, or garbage): HTTP answers or closes it.
        assert_eq!(
            by_first_bytes(&[0, 1, 0, 0, 9, 9, 9, 9]),
            Some(Service::Http)
        );
        assert_eq!(by_first_bytes(&[]), None);
    }

    #[tokio::test]
    async fn peek_decides_on_split_bytes_and_returns_them_for_replay() {
        let (mut client, mut server) = tokio::io::duplex(64);
        let binding = [0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xA4, 0x42, 1, 2, 3, 4];
        let writer = tokio::spawn(async move {
            client.write_all(&binding[..5]).await.unwrap();
            tokio::task::yield_now().await;
            client.write_all(&binding[5..]).await.unwrap();
            client
        });
        let (service, bytes) = peek(&mut server, Duration::from_secs(5)).await.unwrap();
        assert_eq!(service, Service::Turn);
        assert!(bytes.len() >= 8 && bytes.len() <= PEEK_BYTES);
        assert_eq!(&bytes[..], &binding[..bytes.len()]);
        drop(writer.await.unwrap());
    }

    // The crate's tokio has no `test-util` (no paused clock): these wait 50 ms of real time.
    #[tokio::test]
    async fn a_silent_client_is_cut_off_at_the_timeout() {
        let (_client, mut server) = tokio::io::duplex(64);
        let outcome = peek(&mut server, Duration::from_millis(50)).await;
        assert!(matches!(outcome, Err(PeekError::Timeout(_))));
    }

    #[tokio::test]
    async fn a_client_trickling_zero_bits_is_bounded_by_the_timeout() {
        // Seven bytes then silence: undecidable, so the timeout ends it.
        let (mut client, mut server) = tokio::io::duplex(64);
        client
            .write_all(&[0, 1, 0, 0, 0x21, 0x12, 0xA4])
            .await
            .unwrap();
        let outcome = peek(&mut server, Duration::from_millis(50)).await;
        assert!(matches!(outcome, Err(PeekError::Timeout(_))));
    }
}
