//! Client connections as a browser makes them: TCP from one of several loopback source addresses,
//! TLS (rustls, trusting the given certificate or, with `--insecure`, anything), an HTTP/1.1
//! upgrade to `/socket`, then WebSocket frames with fastwebsockets.
//!
//! The upgrade is written by hand and its response read byte by byte, so no byte of the first
//! WebSocket frame (the server sends the `id` message at once) is left behind in a client buffer.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use base64::Engine as _;
use fastwebsockets::{Frame, OpCode, Payload, Role, WebSocket};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::TlsConnector;

use super::{Error, TargetArgs};

/// A TLS stream to the gateway.
pub type Stream = tokio_rustls::client::TlsStream<TcpStream>;

/// A WebSocket to the gateway, after the upgrade.
pub type Socket = WebSocket<Stream>;

/// Everything needed to open another connection to the gateway.
pub struct Target {
    /// The gateway's HTTPS address (loopback).
    pub addr: SocketAddr,
    /// SNI and Host.
    server_name: ServerName<'static>,
    /// `Host` header value.
    host: String,
    /// The WebSocket path.
    path: String,
    /// TLS settings (one config, so session tickets are reused as a browser reuses them).
    tls: TlsConnector,
    /// Source addresses connections are spread over.
    sources: Vec<IpAddr>,
    /// Round-robin position in `sources`.
    next_source: AtomicUsize,
}

impl Target {
    /// One [`Target`] per `--target` (at least one), in the order given.
    pub fn all(args: &TargetArgs) -> Result<Vec<Arc<Target>>, Error> {
        if args.target.is_empty() {
            return Err("--target: give at least one address".into());
        }
        args.target
            .iter()
            .map(|target| Target::new(args, target))
            .collect()
    }

    /// Checks `target` (loopback only) and builds the TLS client for it.
    pub fn new(args: &TargetArgs, target: &str) -> Result<Arc<Target>, Error> {
        let addr = super::loopback_addr(target)?;
        let server_name = ServerName::try_from(args.server_name.clone())
            .map_err(|e| format!("--server-name {}: {e}", args.server_name))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?;
        let mut config = match (&args.ca, args.insecure) {
            (Some(path), _) => {
                let mut roots = rustls::RootCertStore::empty();
                let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                    .map_err(|e| format!("{}: {e}", path.display()))?
                    .collect::<Result<_, _>>()
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                if certs.is_empty() {
                    return Err(
                        format!("{}: no certificate found (expected PEM)", path.display()).into(),
                    );
                }
                for cert in certs {
                    roots
                        .add(cert)
                        .map_err(|e| format!("{}: {e}", path.display()))?;
                }
                builder.with_root_certificates(roots).with_no_client_auth()
            }
            (None, true) => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(provider)))
                .with_no_client_auth(),
            (None, false) => {
                return Err(
                    "give the certificate to trust with --ca FILE, or pass --insecure".into(),
                )
            }
        };
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let sources = match addr.ip() {
            IpAddr::V4(_) => (1..=args.sources.max(1))
                .map(|n| IpAddr::V4(Ipv4Addr::new(127, 0, 0, n)))
                .collect(),
            ip @ IpAddr::V6(_) => vec![ip],
        };
        Ok(Arc::new(Target {
            addr,
            host: format!("{}:{}", args.server_name, addr.port()),
            server_name,
            path: args.path.clone(),
            tls: TlsConnector::from(Arc::new(config)),
            sources,
            next_source: AtomicUsize::new(0),
        }))
    }

    /// Opens a TLS connection from the next source address.
    pub async fn tls(&self) -> Result<Stream, Error> {
        let n = self.next_source.fetch_add(1, Ordering::Relaxed);
        let source = self.sources[n % self.sources.len()];
        let socket = match source {
            IpAddr::V4(_) => TcpSocket::new_v4()?,
            IpAddr::V6(_) => TcpSocket::new_v6()?,
        };
        socket.bind(SocketAddr::new(source, 0))?;
        let tcp = socket.connect(self.addr).await?;
        tcp.set_nodelay(true)?;
        Ok(self.tls.connect(self.server_name.clone(), tcp).await?)
    }

    /// Opens a WebSocket: TLS, then the HTTP/1.1 upgrade.
    pub async fn websocket(&self) -> Result<Socket, Error> {
        let mut tls = self.tls().await?;
        let key = base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 16]>());
        let request = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n",
            self.path, self.host
        );
        tls.write_all(request.as_bytes()).await?;
        tls.flush().await?;
        let head = read_head(&mut tls).await?;
        let head = String::from_utf8_lossy(&head);
        let status = head.split_whitespace().nth(1).unwrap_or("?");
        if status != "101" {
            return Err(format!("upgrade refused: HTTP {status}").into());
        }
        let expected = accept_key(&key);
        let accepted = head.lines().any(|line| {
            line.split_once(':').is_some_and(|(name, value)| {
                name.eq_ignore_ascii_case("sec-websocket-accept") && value.trim() == expected
            })
        });
        if !accepted {
            return Err("upgrade answered without the right Sec-WebSocket-Accept".into());
        }
        Ok(WebSocket::after_handshake(tls, Role::Client))
    }

    /// Opens a WebSocket and reads the `id` message: (socket, ID).
    pub async fn join(&self) -> Result<(Socket, u64), Error> {
        let mut ws = self.websocket().await?;
        let hello = recv_text(&mut ws).await?;
        let id = json_u64(&hello, "id")
            .filter(|_| hello.starts_with(br#"{"type":"id""#))
            .ok_or_else(|| format!("expected the id message, got {}", preview(&hello)))?;
        Ok((ws, id))
    }
}

/// Reads an HTTP response head (through the blank line), at most 8 KiB, one byte at a time so
/// nothing after it is consumed.
async fn read_head(tls: &mut Stream) -> Result<Vec<u8>, Error> {
    let mut head = Vec::with_capacity(256);
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 8192 {
            return Err("upgrade response head over 8 KiB".into());
        }
        head.push(tls.read_u8().await?);
    }
    Ok(head)
}

/// The `Sec-WebSocket-Accept` value for `key` (RFC 6455 §4.2.2).
fn accept_key(key: &str) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
    ctx.update(key.as_bytes());
    ctx.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    base64::engine::general_purpose::STANDARD.encode(ctx.finish())
}

/// Sends one text message and flushes it: unflushed, a message can stay in the TLS layer until
/// the next send on the socket (once the task's tokio cooperative budget is spent, the TCP write
/// returns pending and tokio-rustls keeps the encrypted record while reporting the text written).
pub async fn send_text(ws: &mut Socket, text: &[u8]) -> Result<(), Error> {
    ws.write_frame(Frame::text(Payload::Borrowed(text))).await?;
    ws.flush().await?;
    Ok(())
}

/// The next text message (pings are answered inside fastwebsockets); a close is an error.
pub async fn recv_text(ws: &mut Socket) -> Result<Vec<u8>, Error> {
    loop {
        let frame = ws.read_frame().await?;
        match frame.opcode {
            OpCode::Text => return Ok(frame.payload.to_vec()),
            OpCode::Close => return Err(close_error(&frame.payload)),
            _ => continue,
        }
    }
}

/// Says goodbye with close code 1000 (the ID is freed at once) and waits briefly for the echo.
pub async fn close(mut ws: Socket) {
    if ws.write_frame(Frame::close(1000, b"")).await.is_ok() && ws.flush().await.is_ok() {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), async {
            while let Ok(frame) = ws.read_frame().await {
                if frame.opcode == OpCode::Close {
                    break;
                }
            }
        })
        .await;
    }
}

/// A server close frame as an error message.
pub fn close_error(payload: &[u8]) -> Error {
    let code = payload.get(..2).map(|c| u16::from_be_bytes([c[0], c[1]]));
    let reason = String::from_utf8_lossy(payload.get(2..).unwrap_or_default());
    format!("server closed the connection: {code:?} {reason}").into()
}

/// The unsigned integer after `"field":` in a server message (server messages are compact JSON
/// written by callgate, so a substring search finds the top-level field when it comes first).
pub fn json_u64(message: &[u8], field: &str) -> Option<u64> {
    let needle = format!("\"{field}\":");
    let at = memchr::memmem::find(message, needle.as_bytes())? + needle.len();
    let digits = message[at..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .count();
    std::str::from_utf8(&message[at..at + digits])
        .ok()?
        .parse()
        .ok()
}

/// The `"type"` of a server message, which callgate always writes first.
pub fn message_type(message: &[u8]) -> &[u8] {
    message
        .strip_prefix(br#"{"type":""#)
        .and_then(|rest| rest.split(|&b| b == b'"').next())
        .unwrap_or(b"?")
}

/// The first 120 characters of a message, for error text.
pub fn preview(message: &[u8]) -> String {
    String::from_utf8_lossy(&message[..message.len().min(120)]).into_owned()
}

/// `--insecure`: any certificate is accepted; signatures are still checked, so the handshake
/// costs what a browser's does.
#[derive(Debug)]
struct AcceptAnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// SDP-like payload of about `size` bytes of JSON: `{"type":"offer","seq":N,"sdp":"v=0\r\n…"}`.
/// `seq` lets the caller match each answer to the offer (and scheduled time) it answers.
pub fn session_description(kind: &str, seq: u64, size: usize) -> String {
    const LINES: [&str; 6] = [
        "m=video 9 UDP/TLS/RTP/SAVPF 96 97 102 103 104 105 106 107 108 109 127 125\\r\\n",
        "c=IN IP4 0.0.0.0\\r\\na=rtcp:9 IN IP4 0.0.0.0\\r\\na=ice-ufrag:Xk2f\\r\\na=ice-pwd:8Zq3bW7yV1nT4kR9mJ2pL6sD\\r\\n",
        "a=fingerprint:sha-256 4A:AD:B9:B1:3F:82:18:3B:54:02:12:DF:3E:5D:49:6B:19:E5:7C:AB:3C:4B:9F:50:8D:E8:12:7B:7A:0E:44:33\\r\\n",
        "a=rtpmap:96 VP8/90000\\r\\na=rtcp-fb:96 goog-remb\\r\\na=rtcp-fb:96 transport-cc\\r\\na=rtcp-fb:96 nack\\r\\n",
        "a=candidate:1467250027 1 udp 2122260223 192.168.1.20 46243 typ host generation 0 network-id 1\\r\\n",
        "a=ssrc:3735928559 cname:kLq9Xw2vB7nP3tYz\\r\\na=ssrc:3735928559 msid:stream track-video\\r\\n",
    ];
    let head = format!(
        r#"{{"type":"{kind}","seq":{seq},"sdp":"v=0\r\no=- 4611731400430051336 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n"#
    );
    let mut out = head;
    let mut i = 0;
    while out.len() + 2 < size {
        out.push_str(LINES[i % LINES.len()]);
        i += 1;
    }
    out.truncate(size.saturating_sub(2).max(out.find("v=0").unwrap_or(0) + 3));
    while out.ends_with('\\') {
        out.pop();
    }
    out.push_str("\"}");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_descriptions_are_json_of_the_asked_size() {
        for size in [200, 1024, 3072, 10240] {
            let sdp = session_description("offer", 7, size);
            let value: serde_json::Value = serde_json::from_str(&sdp).expect("valid JSON");
            assert_eq!(value["seq"], 7);
            assert!(sdp.len().abs_diff(size) <= 2, "{} vs {size}", sdp.len());
        }
    }

    #[test]
    fn reads_fields_and_types_of_server_messages() {
        let m = br#"{"type":"answer","clientId":123456789,"answer":{"type":"answer","seq":42,"sdp":""}}"#;
        assert_eq!(message_type(m), b"answer");
        assert_eq!(json_u64(m, "clientId"), Some(123456789));
        assert_eq!(json_u64(m, "seq"), Some(42));
        assert_eq!(json_u64(m, "nope"), None);
    }

    #[test]
    fn accept_key_matches_rfc_6455() {
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }
}
