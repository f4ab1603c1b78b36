//! `bare_relay`: the floor reference for callgate's signaling CPU — the leanest WebSocket relay that
//! speaks enough of the seed protocol for `callgate-load relay` to drive it, built on the crates
//! callgate itself uses (tokio, hyper + hyper-util, tokio-rustls with rustls' `ring` provider,
//! fastwebsockets, serde_json with `RawValue`). It is a measuring tool, not a server: it only
//! listens on loopback addresses.
//!
//! Run it and callgate side by side, load each with the same command, and compare the
//! `cpu_us_per_message` lines; the difference is what callgate spends per forwarded message beyond
//! bare relaying — limits, metrics, heartbeats, resume, call rules and its own session design (see
//! `docs/PERFORMANCE.md`, "Budget" and "The floor, measured in the same run").
//!
//! ```sh
//! cargo build --release --example bare_relay --bin callgate-load
//! ./target/release/examples/bare_relay --cert certs/cert.pem --key certs/key.pem \
//!     --listen 127.0.0.1:7443 &
//! ./target/release/callgate-load --target 127.0.0.1:7443 --ca certs/cert.pem --server-pid $! \
//!     relay --pairs 500 --duration 10
//! ```
//!
//! (`certs/` is where `cargo run` puts callgate's development certificate.)
//!
//! # The design it measures
//!
//! One task per connection reads frames (fastwebsockets, defragmented) and parses only the message
//! `type`, the target ID and the payload as a borrowed `&RawValue`; it writes the outgoing JSON
//! once and hands it to the target's writer task through a bounded tokio mpsc channel, found in a
//! sharded `Mutex<HashMap<ID, Sender>>`. The writer task writes whatever is queued, then flushes.
//!
//! | received | sent to | as |
//! |---|---|---|
//! | (connect) | the new client | `{"type":"id","id":N}` |
//! | `video-offer-request` + `calleeId` | the callee | `video-answer-request` + `callerId`, `offer` |
//! | `client-reply` + `callerId` | the caller | `server-reply` + `reply` `"1"`/`"0"`, `calleeId`, `answer` |
//! | `offer` / `answer` + `clientId` | that client | the same type + `clientId` (the sender), payload |
//! | (disconnect) | the call peer | `close-call-server` + `clientId`, `reason` `"peer_gone"` |
//!
//! Every message but `id` is byte for byte what callgate's hub writes; IDs are 9 digits, as
//! callgate's are by default, so relayed frames have the same length.
//!
//! # What it deliberately leaves out
//!
//! Everything that is not the relay itself: no connection, size or rate limits (a client that
//! stops reading stalls whoever sends to it), no Origin check, no call rules (any client may send
//! an `offer` to any ID; a caller counts as in a call with the callee as soon as it asks), no
//! `ringing`, `cancel`, `close-call-client`, `ice-candidate`, `ping`, `normal` or `resume` (they
//! are ignored, as is anything malformed: no `error` replies), no resume token in the `id`
//! message, no heartbeats or write timeouts, no metrics or logging, no graceful shutdown, no HTTP/2
//! and no static files. Any path upgrades to a WebSocket.

use std::collections::HashMap;
use std::convert::Infallible;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use fastwebsockets::upgrade::{is_upgrade_request, upgrade};
use fastwebsockets::{FragmentCollectorRead, Frame, OpCode, Payload, WebSocket, WebSocketWrite};
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::upgrade::Upgraded;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;

/// The floor reference for callgate's signaling CPU: a bare seed-protocol relay (loopback only).
#[derive(Debug, Parser)]
#[command(name = "bare_relay")]
struct Args {
    /// PEM certificate chain, e.g. callgate's `certs/cert.pem`.
    #[arg(long, value_name = "FILE")]
    cert: PathBuf,
    /// PEM private key, e.g. callgate's `certs/key.pem`.
    #[arg(long, value_name = "FILE")]
    key: PathBuf,
    /// Address to listen on, e.g. 127.0.0.1:7443; must be a loopback address.
    #[arg(long, value_name = "ADDR")]
    listen: SocketAddr,
}

/// Messages queued for one client before its senders wait; callgate's default outbox size.
const OUTBOX_FRAMES: usize = 128;

/// Independently locked parts of the routing table.
const SHARDS: usize = 16;

/// The first ID handed out; IDs count up from here, so they have callgate's default 9 digits.
const FIRST_ID: u64 = 100_000_000;

/// A WebSocket after the upgrade.
type Socket = WebSocket<TokioIo<Upgraded>>;

/// The write half of a split [`Socket`], owned by the connection's writer task.
type Writer = WebSocketWrite<tokio::io::WriteHalf<TokioIo<Upgraded>>>;

/// One frame for a client's writer task.
#[derive(Debug)]
struct Outgoing {
    /// Text for relayed messages; Pong or Close for what fastwebsockets owes the client.
    opcode: OpCode,
    /// The frame's payload, written once by the sender.
    payload: Vec<u8>,
}

/// Who is connected: ID → the sender into that client's writer task.
struct Router {
    /// `SHARDS` maps; an ID lives in shard `id % SHARDS` (IDs are sequential, so they spread evenly).
    shards: Vec<Mutex<HashMap<u64, mpsc::Sender<Outgoing>>>>,
    /// The next ID to hand out.
    next_id: AtomicU64,
}

impl Router {
    fn new() -> Router {
        Router {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            next_id: AtomicU64::new(FIRST_ID),
        }
    }

    fn shard(&self, id: u64) -> std::sync::MutexGuard<'_, HashMap<u64, mpsc::Sender<Outgoing>>> {
        self.shards[(id % SHARDS as u64) as usize]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Queues `text` for client `to`, waiting while its queue is full; a client that is not
    /// connected (or whose writer has ended) is skipped silently.
    async fn send(&self, to: u64, text: Vec<u8>) {
        // Clone the sender out of the lock so no lock is held across the wait.
        let sender = self.shard(to).get(&to).cloned();
        if let Some(sender) = sender {
            let _ = sender
                .send(Outgoing {
                    opcode: OpCode::Text,
                    payload: text,
                })
                .await;
        }
    }
}

/// The fields of a client message the relay reads; everything else in it is skipped.
#[derive(Deserialize)]
struct Inbound<'a> {
    #[serde(rename = "type", borrow)]
    kind: &'a str,
    /// `video-offer-request`: whom to call.
    #[serde(rename = "calleeId")]
    callee: Option<u64>,
    /// `client-reply`: whose call this answers.
    #[serde(rename = "callerId")]
    caller: Option<u64>,
    /// `offer` / `answer`: the call peer.
    #[serde(rename = "clientId")]
    peer: Option<u64>,
    /// `client-reply`: "1" (or 1 / true) accepts.
    #[serde(borrow)]
    reply: Option<&'a RawValue>,
    #[serde(borrow)]
    offer: Option<&'a RawValue>,
    #[serde(borrow)]
    answer: Option<&'a RawValue>,
}

/// `head` + `raw` + `}`, written into one buffer of the right size.
fn message(head: std::fmt::Arguments<'_>, raw: &RawValue) -> Vec<u8> {
    let mut out = Vec::with_capacity(96 + raw.get().len());
    out.write_fmt(head).expect("writing to a Vec cannot fail");
    out.extend_from_slice(raw.get().as_bytes());
    out.push(b'}');
    out
}

/// Acts on one text message from client `me`; `peer` is its call peer, once it has one.
async fn handle(router: &Router, me: u64, peer: &mut Option<u64>, text: &[u8]) {
    let Ok(msg) = serde_json::from_slice::<Inbound<'_>>(text) else {
        return;
    };
    match (msg.kind, msg.callee, msg.caller, msg.peer) {
        ("video-offer-request", Some(callee), _, _) => {
            let Some(offer) = msg.offer else { return };
            *peer = Some(callee);
            let out = message(
                format_args!(r#"{{"type":"video-answer-request","callerId":{me},"offer":"#),
                offer,
            );
            router.send(callee, out).await;
        }
        ("client-reply", _, Some(caller), _) => {
            let accepted = matches!(msg.reply.map(RawValue::get), Some("\"1\"" | "1" | "true"));
            let reply = if accepted { "1" } else { "0" };
            let payload = msg.answer.map_or("null", RawValue::get);
            let mut out = Vec::with_capacity(96 + payload.len());
            write!(
                out,
                r#"{{"type":"server-reply","reply":"{reply}","calleeId":{me},"answer":{payload}}}"#
            )
            .expect("writing to a Vec cannot fail");
            if accepted {
                *peer = Some(caller);
            }
            router.send(caller, out).await;
        }
        ("offer", _, _, Some(to)) => {
            let Some(offer) = msg.offer else { return };
            let out = message(
                format_args!(r#"{{"type":"offer","clientId":{me},"offer":"#),
                offer,
            );
            router.send(to, out).await;
        }
        ("answer", _, _, Some(to)) => {
            let Some(answer) = msg.answer else { return };
            let out = message(
                format_args!(r#"{{"type":"answer","clientId":{me},"answer":"#),
                answer,
            );
            router.send(to, out).await;
        }
        _ => {}
    }
}

/// One client, from the upgrade to the end: registers it, spawns its writer, reads until the
/// socket closes, then unregisters it and tells its call peer.
async fn serve(ws: Socket, router: Arc<Router>) {
    let me = router.next_id.fetch_add(1, Ordering::Relaxed);
    let (reader, writer) = ws.split(tokio::io::split);
    let (tx, rx) = mpsc::channel(OUTBOX_FRAMES);
    tokio::spawn(write_queued(writer, rx));
    // Queued before the ID is routable, so it is the first thing the client reads.
    let hello = format!(r#"{{"type":"id","id":{me}}}"#).into_bytes();
    let _ = tx
        .send(Outgoing {
            opcode: OpCode::Text,
            payload: hello,
        })
        .await;
    router.shard(me).insert(me, tx.clone());

    let mut reader = FragmentCollectorRead::new(reader);
    // Pongs and the close echo fastwebsockets owes the client go out through the writer task.
    let mut owed = |frame: Frame<'_>| {
        let tx = tx.clone();
        let owed = Outgoing {
            opcode: frame.opcode,
            payload: frame.payload.to_vec(),
        };
        async move { tx.send(owed).await }
    };
    let mut peer = None;
    while let Ok(frame) = reader.read_frame(&mut owed).await {
        match frame.opcode {
            OpCode::Text => handle(&router, me, &mut peer, &frame.payload).await,
            OpCode::Close => break,
            _ => {}
        }
    }

    // The writer ends once every sender is gone: this one, the table's, and any a peer cloned.
    router.shard(me).remove(&me);
    if let Some(peer) = peer {
        let gone =
            format!(r#"{{"type":"close-call-server","clientId":{me},"reason":"peer_gone"}}"#);
        router.send(peer, gone.into_bytes()).await;
    }
}

/// The writer task: writes every queued frame, flushing when the queue is empty.
async fn write_queued(mut writer: Writer, mut rx: mpsc::Receiver<Outgoing>) {
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(out) = next {
            let frame = Frame::new(true, out.opcode, None, Payload::Owned(out.payload));
            if writer.write_frame(frame).await.is_err() {
                return;
            }
            next = rx.try_recv().ok();
        }
        if writer.flush().await.is_err() {
            return;
        }
    }
}

/// The HTTP side: a WebSocket upgrade on any path; anything else is a 400.
async fn upgrade_request(
    mut req: Request<Incoming>,
    router: Arc<Router>,
) -> Result<Response<Empty<Bytes>>, Infallible> {
    if is_upgrade_request(&req) {
        if let Ok((response, upgraded)) = upgrade(&mut req) {
            tokio::spawn(async move {
                if let Ok(ws) = upgraded.await {
                    serve(ws, router).await;
                }
            });
            return Ok(response);
        }
    }
    let mut response = Response::new(Empty::new());
    *response.status_mut() = StatusCode::BAD_REQUEST;
    Ok(response)
}

/// The TLS acceptor for `cert` and `key`, with an error message naming the file at fault.
fn tls_acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, String> {
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!(
            "{}: no certificate found (expected PEM)",
            cert.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| {
        format!(
            "{}: no private key found (expected PEM): {e}",
            key.display()
        )
    })?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
    .map_err(|e| e.to_string())?
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .map_err(|e| format!("{}: {e}", cert.display()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    if !args.listen.ip().is_loopback() {
        eprintln!(
            "bare_relay: --listen {}: not a loopback address; this is a measuring tool, not a server to deploy",
            args.listen
        );
        return ExitCode::from(2);
    }
    let acceptor = match tls_acceptor(&args.cert, &args.key) {
        Ok(acceptor) => acceptor,
        Err(e) => {
            eprintln!("bare_relay: {e}");
            return ExitCode::from(2);
        }
    };
    let listener = match TcpListener::bind(args.listen).await {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("bare_relay: --listen {}: {e}", args.listen);
            return ExitCode::from(2);
        }
    };
    eprintln!(
        "bare_relay: listening on wss://{} (pid {})",
        args.listen,
        std::process::id()
    );
    let router = Arc::new(Router::new());
    loop {
        let tcp = match listener.accept().await {
            Ok((tcp, _)) => tcp,
            Err(e) => {
                // Out of file descriptors, usually; give connections a moment to close.
                eprintln!("bare_relay: accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let router = router.clone();
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            let service = service_fn(move |req| upgrade_request(req, router.clone()));
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(tls), service)
                .with_upgrades()
                .await;
        });
    }
}
