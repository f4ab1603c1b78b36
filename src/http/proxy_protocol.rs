//! The PROXY protocol (HAProxy v1 text and v2 binary) for connections from trusted load balancers.
//!
//! Behind a TCP load balancer every connection comes from the balancer's address, so per-address
//! limits would lump all clients together. A balancer that speaks the PROXY protocol sends the real
//! client address first. callgate reads that header only on connections whose TCP peer is in
//! `proxy-protocol-from`, and requires it there; a connection from anywhere else is taken as direct,
//! so a client cannot forge its address by sending a header itself.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use ppp::{v1, v2, HeaderResult, PartialResult};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

use crate::config::values::IpRange;

/// The longest header accepted: v1 is at most 107 bytes; v2 carries addresses and TLVs.
const MAX_HEADER: usize = 536;

/// Which peers must (and may) send a PROXY header.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies {
    /// Load balancer ranges.
    ranges: Vec<IpRange>,
}

impl TrustedProxies {
    /// Trusts `ranges`; empty means nobody (the protocol is off).
    pub fn new(ranges: Vec<IpRange>) -> Self {
        TrustedProxies { ranges }
    }

    /// Whether connections from `peer` carry a PROXY header.
    pub fn trusts(&self, peer: IpAddr) -> bool {
        let peer = match peer {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(peer, IpAddr::V4),
            v4 => v4,
        };
        self.ranges.iter().any(|range| range.0.contains(&peer))
    }
}

/// Why a trusted peer's connection was refused.
#[derive(Debug, thiserror::Error)]
pub enum ProxyHeaderError {
    /// The socket failed or closed before a complete header arrived.
    #[error("reading the PROXY header: {0}")]
    Io(#[from] io::Error),
    /// The bytes are not a PROXY v1 or v2 header.
    #[error("the load balancer did not send a valid PROXY protocol header")]
    Invalid,
    /// No complete header within the deadline.
    #[error("no PROXY protocol header within {0:?}")]
    Timeout(Duration),
}

/// A stream that first yields bytes read past the PROXY header, then the socket.
#[derive(Debug)]
pub struct Prefixed<S> {
    prefix: Bytes,
    inner: S,
}

impl<S> Prefixed<S> {
    /// A stream with nothing to replay.
    pub fn direct(inner: S) -> Self {
        Prefixed {
            prefix: Bytes::new(),
            inner,
        }
    }

    /// A stream that first replays `prefix` (bytes read to route it), then reads `inner`.
    pub fn with_prefix(prefix: Bytes, inner: S) -> Self {
        Prefixed { prefix, inner }
    }
}

/// Reads the PROXY header from a trusted peer's `stream` and returns the client address it names
/// (`None` for `UNKNOWN`/`LOCAL`, e.g. the balancer's own health checks) and the stream to continue
/// with.
pub async fn read_header<S>(
    mut stream: S,
    timeout: Duration,
) -> Result<(Option<SocketAddr>, Prefixed<S>), ProxyHeaderError>
where
    S: AsyncRead + Unpin,
{
    let read = async {
        let mut buf = Vec::with_capacity(MAX_HEADER);
        loop {
            if buf.len() >= MAX_HEADER {
                return Err(ProxyHeaderError::Invalid);
            }
            let mut chunk = [0u8; MAX_HEADER];
            let wanted = MAX_HEADER - buf.len();
            let n = stream.read(&mut chunk[..wanted]).await?;
            if n == 0 {
                return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
            }
            buf.extend_from_slice(&chunk[..n]);
            if !may_be_whole(&buf) {
                continue;
            }
            let parsed = HeaderResult::parse(&buf);
            if parsed.is_incomplete() {
                continue;
            }
            let (client, used) = match parsed {
                HeaderResult::V1(Ok(header)) => (v1_client(&header.addresses), header.header.len()),
                HeaderResult::V2(Ok(header)) => (v2_client(&header.addresses), header.len()),
                _ => return Err(ProxyHeaderError::Invalid),
            };
            let mut rest = Bytes::from(buf);
            rest.advance(used);
            return Ok((client, rest));
        }
    };
    let (client, prefix) = tokio::time::timeout(timeout, read)
        .await
        .map_err(|_| ProxyHeaderError::Timeout(timeout))??;
    Ok((
        client,
        Prefixed {
            prefix,
            inner: stream,
        },
    ))
}

/// The v2 signature, the first 12 bytes of every v2 header.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

/// Whether `buf` may hold a whole header, so that it is worth parsing: a v1 header ends with
/// CRLF, a v2 header says its length in bytes 14–15; anything else is parsed at once (and
/// refused). ppp refuses some prefixes of valid v1 headers (found by the `proxy_header` fuzz
/// target), so a header split across TCP segments must not be parsed before it is whole.
fn may_be_whole(buf: &[u8]) -> bool {
    let starts = |sig: &[u8]| buf.starts_with(sig) || sig.starts_with(buf);
    if starts(V2_SIGNATURE) {
        buf.len() >= 16 && buf.len() >= 16 + usize::from(u16::from_be_bytes([buf[14], buf[15]]))
    } else if starts(b"PROXY ") {
        // 107 bytes: the longest v1 header; longer without CRLF is not v1.
        memchr::memmem::find(buf, b"\r\n").is_some() || buf.len() >= 107
    } else {
        true
    }
}

fn v1_client(addresses: &v1::Addresses) -> Option<SocketAddr> {
    match addresses {
        v1::Addresses::Tcp4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        v1::Addresses::Tcp6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        v1::Addresses::Unknown => None,
    }
}

fn v2_client(addresses: &v2::Addresses) -> Option<SocketAddr> {
    match addresses {
        v2::Addresses::IPv4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        v2::Addresses::IPv6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        v2::Addresses::Unspecified | v2::Addresses::Unix(_) => None,
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
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

#[cfg(test)]
mod tests {
    use super::*;

    async fn parse(bytes: &[u8]) -> Result<(Option<SocketAddr>, Vec<u8>), ProxyHeaderError> {
        let (client, mut rest) = read_header(bytes, Duration::from_secs(1)).await?;
        let mut after = Vec::new();
        rest.read_to_end(&mut after).await.unwrap();
        Ok((client, after))
    }

    #[tokio::test]
    async fn v1_header_gives_the_client_and_keeps_what_follows() {
        let (client, rest) = parse(b"PROXY TCP4 203.0.113.7 192.0.2.1 51234 443\r\n\x16\x03\x01")
            .await
            .unwrap();
        assert_eq!(client, Some("203.0.113.7:51234".parse().unwrap()));
        assert_eq!(rest, b"\x16\x03\x01");
        let (client, _) = parse(b"PROXY TCP6 2001:db8::7 2001:db8::1 40000 443\r\n")
            .await
            .unwrap();
        assert_eq!(client, Some("[2001:db8::7]:40000".parse().unwrap()));
        let (client, _) = parse(b"PROXY UNKNOWN\r\n").await.unwrap();
        assert_eq!(client, None);
    }

    #[tokio::test]
    async fn v2_header_gives_the_client() {
        let mut header = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
        header.extend([0x21, 0x11, 0, 12]); // v2 PROXY, TCP over IPv4, 12 address bytes
        header.extend([198, 51, 100, 9, 192, 0, 2, 1]);
        header.extend(60000u16.to_be_bytes());
        header.extend(443u16.to_be_bytes());
        header.extend(b"hello");
        let (client, rest) = parse(&header).await.unwrap();
        assert_eq!(client, Some("198.51.100.9:60000".parse().unwrap()));
        assert_eq!(rest, b"hello");
    }

    #[tokio::test]
    async fn garbage_and_truncation_are_refused() {
        assert!(matches!(
            parse(b"\x16\x03\x01\x02\x00 TLS hello").await,
            Err(ProxyHeaderError::Invalid)
        ));
        assert!(matches!(
            parse(b"PROXY TCP4 1.2.3.4").await,
            Err(ProxyHeaderError::Io(_))
        ));
        assert!(matches!(
            parse(&[b'P'; 600]).await,
            Err(ProxyHeaderError::Invalid)
        ));
    }

    /// Hands out its bytes one per read, as a slow network might.
    struct OneByteAtATime<'a>(&'a [u8]);

    impl AsyncRead for OneByteAtATime<'_> {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            if let Some((&first, rest)) = self.0.split_first() {
                buf.put_slice(&[first]);
                self.0 = rest;
            }
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_header_split_across_reads_is_read_as_a_whole_one() {
        // Found by the proxy_header fuzz target: read a byte at a time, ppp refused a prefix of
        // this valid header, and the balancer's connection was dropped.
        let v1 = b"PROXY TCP6 ::1 ::11 52000 2865\r\nnext";
        let mut v2 = V2_SIGNATURE.to_vec();
        v2.extend([
            0x21, 0x11, 0, 12, 198, 51, 100, 9, 192, 0, 2, 1, 0xea, 0x60, 1, 0xbb,
        ]);
        v2.extend(b"next");
        for (header, client) in [(&v1[..], "[::1]:52000"), (&v2[..], "198.51.100.9:60000")] {
            let (got, mut rest) = read_header(OneByteAtATime(header), Duration::from_secs(1))
                .await
                .expect("accepted");
            assert_eq!(got, Some(client.parse().unwrap()));
            let mut after = Vec::new();
            rest.read_to_end(&mut after).await.unwrap();
            assert_eq!(after, b"next");
        }
    }

    #[test]
    fn only_configured_ranges_are_trusted() {
        let trusted = TrustedProxies::new(vec!["10.0.0.0/8".parse().unwrap()]);
        assert!(trusted.trusts("10.1.2.3".parse().unwrap()));
        assert!(trusted.trusts("::ffff:10.1.2.3".parse().unwrap()));
        assert!(!trusted.trusts("192.0.2.1".parse().unwrap()));
        assert!(!TrustedProxies::default().trusts("10.1.2.3".parse().unwrap()));
    }
}
