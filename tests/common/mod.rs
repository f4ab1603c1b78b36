//! Shared helpers for integration tests: start a real server on loopback ports, talk to it over
//! real TLS with the server's own certificate as the only trust root.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use callgate::config::{Config, Listen, Options, Seconds};
use callgate::server::{BoundAddrs, Server};
use callgate::tls::CertStore;
use http_body_util::{BodyExt, Empty};
use hyper::{HeaderMap, Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::RootCertStore;
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// A server running in this process on ephemeral loopback ports.
pub struct TestServer {
    pub addrs: BoundAddrs,
    pub certs: Arc<CertStore>,
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    pub public_dir: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

/// Options for a test server: loopback ports, a temp certs dir and a copy of `public/`.
pub fn test_options(dir: &Path) -> Options {
    Options {
        https_listen: Some("127.0.0.1:0".parse().unwrap()),
        http_listen: Some(Listen::On("127.0.0.1:0".parse().unwrap())),
        metrics_listen: Some(Listen::On("127.0.0.1:0".parse().unwrap())),
        listening_ip: Some(vec!["127.0.0.1".parse().unwrap()]),
        listening_port: Some(0),
        tls_listening_port: Some(callgate::config::PortOrOff::Port(0)),
        public_dir: Some(dir.join("public")),
        certs_dir: Some(dir.join("certs")),
        tls_reload_interval: Some(Seconds(std::time::Duration::from_millis(50))),
        // Every test connects from 127.0.0.1, some with a thousand WebSockets; tests of the
        // per-address cap (tests/adversarial.rs) set their own.
        connections_per_ip: Some(100_000),
        ..Options::default()
    }
}

/// Copies the repository's `public/` into `dir/public`.
pub fn copy_public(dir: &Path) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("public");
    copy_dir(&src, &dir.join("public"));
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let entry = entry.unwrap();
        let target = dst.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

impl TestServer {
    /// Starts a server with the default test options, adjusted by `tweak`.
    pub async fn start(tweak: impl FnOnce(&Path, &mut Options)) -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        copy_public(dir.path());
        let mut options = test_options(dir.path());
        tweak(dir.path(), &mut options);
        let config = Config::from_options(options).expect("test config is valid");
        let (cert_path, key_path) = config.tls.paths();
        let public_dir = config.http.public_dir.clone();
        let server = Server::bind(config).await.expect("server binds");
        let addrs = server.local_addrs();
        let certs = server.cert_store();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            server
                .run(
                    async {
                        let _ = stopped.await;
                    },
                    false,
                )
                .await
                .unwrap();
        });
        TestServer {
            addrs,
            certs,
            cert_path,
            key_path,
            public_dir,
            stop: Some(stop),
            task: Some(task),
            _dir: dir,
        }
    }

    /// The server's current certificate (the test trust root).
    pub fn cert_der(&self) -> CertificateDer<'static> {
        read_cert(&self.cert_path)
    }

    /// A TLS client trusting only the server's certificate, offering `alpn`.
    pub fn client(&self, alpn: &[&[u8]]) -> TlsConnector {
        tls_client(&[self.cert_der()], alpn)
    }

    /// Stops the server and waits for its shutdown to finish.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap();
        }
    }
}

/// Reads the first certificate of a PEM file.
pub fn read_cert(path: &Path) -> CertificateDer<'static> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_file_iter(path)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
}

/// A TLS connector trusting exactly `roots`.
pub fn tls_client(roots: &[CertificateDer<'static>], alpn: &[&[u8]]) -> TlsConnector {
    let mut store = RootCertStore::empty();
    for root in roots {
        store.add(root.clone()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(store)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    TlsConnector::from(Arc::new(config))
}

/// Opens a TLS connection to `addr` for the name `localhost`.
pub async fn connect(
    connector: &TlsConnector,
    addr: SocketAddr,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
}

/// A response read completely.
#[derive(Debug)]
pub struct Fetched {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub version: hyper::Version,
}

/// An HTTP/1.1 client connection over an established stream.
pub struct H1 {
    sender: hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
}

impl H1 {
    pub async fn over<S>(stream: S) -> H1
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        H1 { sender }
    }

    pub async fn send(&mut self, req: Request<Empty<Bytes>>) -> hyper::Result<Fetched> {
        self.sender.ready().await?;
        let response = self.sender.send_request(req).await?;
        collect(response).await
    }

    pub async fn get(&mut self, path: &str) -> Fetched {
        self.send(get(path)).await.unwrap()
    }
}

/// An HTTP/2 client connection; `closed` resolves when the server ends the connection.
pub struct H2 {
    pub sender: hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
    pub closed: tokio::task::JoinHandle<hyper::Result<()>>,
}

impl H2 {
    pub async fn over<S>(stream: S) -> H2
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .unwrap();
        H2 {
            sender,
            closed: tokio::spawn(conn),
        }
    }

    pub async fn get(&mut self, path: &str) -> Fetched {
        let req = Request::get(format!("https://localhost{path}"))
            .body(Empty::new())
            .unwrap();
        collect(self.sender.send_request(req).await.unwrap())
            .await
            .unwrap()
    }
}

async fn collect(response: hyper::Response<hyper::body::Incoming>) -> hyper::Result<Fetched> {
    let (parts, body) = response.into_parts();
    Ok(Fetched {
        status: parts.status,
        headers: parts.headers,
        version: parts.version,
        body: body.collect().await?.to_bytes(),
    })
}

/// A GET request with a Host header.
pub fn get(path: &str) -> Request<Empty<Bytes>> {
    Request::get(path)
        .header("host", "localhost")
        .body(Empty::new())
        .unwrap()
}

/// One HTTPS GET over a fresh HTTP/1.1 connection.
pub async fn https_get(server: &TestServer, path: &str) -> Fetched {
    let tls = connect(&server.client(&[b"http/1.1"]), server.addrs.https)
        .await
        .unwrap();
    H1::over(tls).await.get(path).await
}

/// Writes a fresh self-signed certificate and key for `localhost` over `cert` and `key`.
pub fn write_new_cert(cert: &Path, key: &Path) -> CertificateDer<'static> {
    let generated = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    std::fs::write(key, generated.signing_key.serialize_pem()).unwrap();
    std::fs::write(cert, generated.cert.pem()).unwrap();
    generated.cert.der().clone()
}

/// A WebSocket client over real TLS.
pub struct Ws {
    pub ws: fastwebsockets::WebSocket<TokioIo<hyper::upgrade::Upgraded>>,
}

/// Why a WebSocket upgrade failed: the HTTP status, if the server answered with one.
#[derive(Debug)]
pub struct UpgradeRefused(pub Option<u16>);

impl Ws {
    /// Opens `wss://localhost/<path>` with an optional Origin header.
    pub async fn open(
        server: &TestServer,
        path: &str,
        origin: Option<&str>,
    ) -> Result<Ws, UpgradeRefused> {
        let tls = connect(&server.client(&[b"http/1.1"]), server.addrs.https)
            .await
            .map_err(|_| UpgradeRefused(None))?;
        Ws::handshake(server, tls, path, origin).await
    }

    /// Upgrades an established stream to a WebSocket at `path`.
    pub async fn handshake<S>(
        server: &TestServer,
        stream: S,
        path: &str,
        origin: Option<&str>,
    ) -> Result<Ws, UpgradeRefused>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let host = format!("localhost:{}", server.addrs.https.port());
        Ws::upgrade(stream, &host, path, origin).await
    }

    /// Upgrades an established stream to a WebSocket at `path`, naming `host` (`host:port`).
    pub async fn upgrade<S>(
        stream: S,
        host: &str,
        path: &str,
        origin: Option<&str>,
    ) -> Result<Ws, UpgradeRefused>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let mut req = Request::get(path)
            .header("host", host)
            .header("upgrade", "websocket")
            .header("connection", "upgrade")
            .header(
                "sec-websocket-key",
                fastwebsockets::handshake::generate_key(),
            )
            .header("sec-websocket-version", "13");
        if let Some(origin) = origin {
            req = req.header("origin", origin);
        }
        let req = req.body(Empty::<Bytes>::new()).unwrap();
        match fastwebsockets::handshake::client(&SpawnExecutor, req, stream).await {
            Ok((ws, _)) => Ok(Ws { ws }),
            Err(fastwebsockets::WebSocketError::InvalidStatusCode(code)) => {
                Err(UpgradeRefused(Some(code)))
            }
            Err(_) => Err(UpgradeRefused(None)),
        }
    }

    /// Opens `/socket` and reads the `id` message.
    pub async fn join(server: &TestServer) -> (Ws, serde_json::Value) {
        let mut ws = Ws::open(server, "/socket", None).await.expect("upgrade");
        let hello = ws.recv().await;
        assert_eq!(hello["type"], "id", "{hello}");
        (ws, hello)
    }

    /// Sends one text message and flushes it. Without the flush a message can stay in the TLS
    /// layer indefinitely: once the task's tokio cooperative budget is spent (about 128 socket
    /// operations without yielding, e.g. 4 × 50 sends in a row), the TCP write returns pending,
    /// tokio-rustls keeps the encrypted record and reports the plaintext written, and nothing
    /// writes it until the next send on the same socket.
    pub async fn send(&mut self, text: &str) {
        self.ws
            .write_frame(fastwebsockets::Frame::text(
                fastwebsockets::Payload::Borrowed(text.as_bytes()),
            ))
            .await
            .unwrap();
        self.ws.flush().await.unwrap();
    }

    pub async fn send_json(&mut self, value: serde_json::Value) {
        self.send(&value.to_string()).await;
    }

    /// The next text message as JSON; panics after 10 s or on close.
    pub async fn recv(&mut self) -> serde_json::Value {
        match self.next().await {
            Event::Text(text) => serde_json::from_str(&text).unwrap(),
            other => panic!("expected a text message, got {other:?}"),
        }
    }

    /// The next text message, close frame or end of stream; panics after 10 s.
    pub async fn next(&mut self) -> Event {
        let frame = tokio::time::timeout(std::time::Duration::from_secs(10), self.ws.read_frame())
            .await
            .expect("a message within 10 s");
        match frame {
            Ok(frame) => match frame.opcode {
                fastwebsockets::OpCode::Text => {
                    Event::Text(String::from_utf8(frame.payload.to_vec()).unwrap())
                }
                fastwebsockets::OpCode::Close => {
                    let code = frame
                        .payload
                        .get(..2)
                        .map(|c| u16::from_be_bytes([c[0], c[1]]));
                    let reason =
                        String::from_utf8_lossy(frame.payload.get(2..).unwrap_or_default())
                            .into_owned();
                    Event::Close(code, reason)
                }
                other => Event::Other(format!("{other:?}")),
            },
            Err(e) => Event::Ended(e.to_string()),
        }
    }

    /// Reads until the server closes; returns the close code.
    pub async fn expect_close(&mut self) -> Option<u16> {
        loop {
            match self.next().await {
                Event::Close(code, _) => return code,
                Event::Ended(e) => {
                    eprintln!("stream ended without a close frame: {e}");
                    return None;
                }
                _ => continue,
            }
        }
    }
}

/// What a test client saw.
#[derive(Debug)]
pub enum Event {
    Text(String),
    Close(Option<u16>, String),
    Other(String),
    Ended(String),
}

/// Runs hyper's connection futures on tokio.
pub struct SpawnExecutor;

impl<F> hyper::rt::Executor<F> for SpawnExecutor
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        tokio::spawn(fut);
    }
}

/// GETs `/metrics` from the admin listener, with an optional bearer token.
pub async fn scrape(server: &TestServer, token: Option<&str>) -> Fetched {
    let tcp = TcpStream::connect(server.addrs.metrics.expect("metrics listener on"))
        .await
        .unwrap();
    let mut req = get("/metrics");
    if let Some(token) = token {
        req.headers_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    H1::over(tcp).await.send(req).await.unwrap()
}

/// The value of one sample line (`name{labels} value`) in a text exposition, if present.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        line.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// Whether a system tool is available; in CI (`CI=true`) a missing tool fails the test instead.
pub fn require_tool(tool: &str, package: &str) -> bool {
    let found = std::process::Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{tool} is required in CI (Debian package {package}); .ci/run installs it");
        }
        eprintln!("skipping: {tool} not installed (apt-get install {package})");
    }
    found
}
