//! Several real `callgate` binaries sharing one redis-url: a test cluster.
//!
//! Every node of a [`Cluster`] serves the same web app copy and the same development certificate
//! (the first node generates it; the others load it), so one TLS client trusts them all — also
//! through a TCP load balancer, where the client cannot know which node answers. Nodes bind
//! loopback port 0 everywhere and log JSON, which the harness reads line by line to learn the
//! bound addresses and to await events. A node is stopped by PID: SIGKILL ([`Node::kill`]) or
//! SIGTERM ([`Node::terminate`]); whatever still runs is killed on drop.
//!
//! Needs `mod common;` in the test crate (TLS client, HTTP/1 client).

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::{connect, get, read_cert, sample, tls_client, H1};

/// The shared TURN secret of test clusters (cluster mode requires one).
pub const SECRET: &str = "cluster-test-secret-0123456789";

/// Nodes sharing a web app copy, a certificate and a redis-url.
pub struct Cluster {
    /// Holds `public/` and `certs/`.
    dir: tempfile::TempDir,
    /// Given to every node.
    pub redis_url: String,
    /// Extra environment variables for every node.
    env: Vec<(String, String)>,
    /// Whether nodes open direct links to each other (`--cluster-listen 127.0.0.1:0`): on
    /// unless [`Cluster::without_links`] or a node's own flags say otherwise.
    links: bool,
}

impl Cluster {
    /// A cluster on `redis_url`, with no node yet.
    pub fn new(redis_url: String) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        crate::common::copy_public(dir.path());
        Cluster {
            dir,
            redis_url,
            env: Vec::new(),
            links: true,
        }
    }

    /// Nodes started from now on have no direct links: every message between them goes through
    /// Redis (`PUBLISH`), as without `cluster-listen`.
    pub fn without_links(&mut self) {
        self.links = false;
    }

    /// A cluster whose Redis is not started yet: `redis_url` is set once it is.
    pub fn without_redis() -> Cluster {
        Cluster::new(String::new())
    }

    /// Sets an environment variable for every node started from now on.
    pub fn env(&mut self, name: &str, value: &str) {
        self.env.push((name.to_owned(), value.to_owned()));
    }

    /// The cluster's development certificate and key (generated now if absent), e.g. for a
    /// TLS Redis that the nodes then trust through `SSL_CERT_FILE`.
    pub fn dev_cert(&self) -> (PathBuf, PathBuf) {
        let dir = self.dir.path().join("certs");
        callgate::tls::ensure_dev_cert(&dir).unwrap();
        (dir.join("cert.pem"), dir.join("key.pem"))
    }

    /// Starts node `id` with the test settings plus `extra` flags, and waits until it is ready.
    pub async fn start(&self, id: &str, extra: &[&str]) -> Node {
        self.start_with_certs(id, &self.dir.path().join("certs"), extra)
            .await
    }

    /// Like [`Cluster::start`], with the node's own certs-dir (e.g. where its ACME copy lives).
    pub async fn start_with_certs(
        &self,
        id: &str,
        certs: &std::path::Path,
        extra: &[&str],
    ) -> Node {
        let bin = env!("CARGO_BIN_EXE_callgate");
        let mut child = Command::new(bin)
            .args([
                "--https-listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "127.0.0.1:0",
                "--listening-ip",
                "127.0.0.1",
                "--listening-port",
                "0",
                "--tls-listening-port",
                "0",
                "--turn-host",
                "127.0.0.1",
                "--log-format",
                "json",
                "--log-level",
                "info",
                "--redis-url",
                &self.redis_url,
                "--node-id",
                id,
            ])
            // The shared secret and a direct link listener, unless the test says otherwise.
            .args(
                (!extra.contains(&"--static-auth-secret"))
                    .then_some(["--static-auth-secret", SECRET])
                    .into_iter()
                    .flatten(),
            )
            .args(
                (self.links && !extra.contains(&"--cluster-listen"))
                    .then_some(["--cluster-listen", "127.0.0.1:0"])
                    .into_iter()
                    .flatten(),
            )
            // No plain-HTTP listener unless the test asks for one.
            .args(
                (!extra.contains(&"--http-listen"))
                    .then_some(["--http-listen", "off"])
                    .into_iter()
                    .flatten(),
            )
            .arg("--public-dir")
            .arg(self.dir.path().join("public"))
            .arg("--certs-dir")
            .arg(certs)
            .args(extra)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("the callgate binary starts");
        let log = Log::read(child.stderr.take().unwrap());
        let mut node = Node {
            child: Some(child),
            id: id.to_owned(),
            https: "0.0.0.0:0".parse().unwrap(),
            http: None,
            metrics: "0.0.0.0:0".parse().unwrap(),
            log,
            cert: self.dir.path().join("certs/cert.pem"),
        };
        let ready = node
            .wait_for_log("callgate ready", Duration::from_secs(30))
            .await;
        let event: serde_json::Value = serde_json::from_str(&ready).unwrap();
        let listeners = event["fields"]["listeners"]
            .as_str()
            .or_else(|| event["listeners"].as_str())
            .expect("listeners in the ready line")
            .to_owned();
        for listener in listeners.split(", ") {
            if let Some(addr) = listener.strip_prefix("https://") {
                node.https = addr.parse().unwrap();
            } else if let Some(addr) = listener
                .strip_prefix("http://")
                .and_then(|rest| rest.strip_suffix(" (redirect to HTTPS)"))
            {
                node.http = Some(addr.parse().unwrap());
            } else if let Some(rest) = listener.strip_prefix("http://") {
                node.metrics = rest.trim_end_matches("/metrics").parse().unwrap();
            }
        }
        node
    }

    /// A TLS client trusting the cluster's certificate (for the name `localhost`).
    pub fn tls(&self) -> tokio_rustls::TlsConnector {
        tls_client(
            &[read_cert(&self.dir.path().join("certs/cert.pem"))],
            &[b"http/1.1"],
        )
    }
}

/// A node's stderr, collected by a thread; tasks await new lines through a watch channel.
#[derive(Clone)]
pub struct Log {
    /// Every line so far.
    lines: Arc<Mutex<Vec<String>>>,
    /// The number of lines, bumped by the reader thread.
    count: tokio::sync::watch::Sender<usize>,
}

impl Log {
    fn read(stderr: impl std::io::Read + Send + 'static) -> Log {
        let log = Log {
            lines: Arc::default(),
            count: tokio::sync::watch::Sender::new(0),
        };
        let writer = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut lines = writer.lines.lock().unwrap();
                lines.push(line);
                let n = lines.len();
                drop(lines);
                writer.count.send_replace(n);
            }
        });
        log
    }
}

/// One running callgate node.
pub struct Node {
    /// The process, until it is killed or has exited.
    child: Option<Child>,
    /// Its `node-id`.
    pub id: String,
    /// Its HTTPS listener.
    pub https: SocketAddr,
    /// Its plain-HTTP listener, when started with `--http-listen`.
    pub http: Option<SocketAddr>,
    /// Its metrics listener.
    pub metrics: SocketAddr,
    /// Its log.
    log: Log,
    /// The certificate it serves.
    cert: PathBuf,
}

impl Node {
    /// Awaits a log line containing `needle` (looking at earlier lines too); panics after `within`.
    pub async fn wait_for_log(&self, needle: &str, within: Duration) -> String {
        let mut count = self.log.count.subscribe();
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(line) = self
                .log
                .lines
                .lock()
                .unwrap()
                .iter()
                .find(|l| l.contains(needle))
            {
                return line.clone();
            }
            if tokio::time::timeout_at(deadline, count.changed())
                .await
                .is_err()
            {
                panic!(
                    "node {}: no log line containing {needle:?} within {within:?}:\n{}",
                    self.id,
                    self.log.lines.lock().unwrap().join("\n")
                );
            }
        }
    }

    /// How many log lines so far contain `needle`.
    pub fn log_count(&self, needle: &str) -> usize {
        self.log
            .lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// The log so far (for assertion messages).
    pub fn log_text(&self) -> String {
        self.log.lines.lock().unwrap().join("\n")
    }

    /// Index of the first log line containing `needle`, if any.
    pub fn log_position(&self, needle: &str) -> Option<usize> {
        self.log
            .lines
            .lock()
            .unwrap()
            .iter()
            .position(|l| l.contains(needle))
    }

    /// The node's `/metrics` text.
    pub async fn scrape(&self) -> String {
        let tcp = tokio::net::TcpStream::connect(self.metrics).await.unwrap();
        let fetched = H1::over(tcp).await.send(get("/metrics")).await.unwrap();
        String::from_utf8(fetched.body.to_vec()).unwrap()
    }

    /// One sample of its metrics (`name` or `name{labels}`); 0 when absent.
    pub async fn metric(&self, series: &str) -> f64 {
        sample(&self.scrape().await, series).unwrap_or(0.0)
    }

    /// Awaits `series` satisfying `accept`, re-reading `/metrics` every 100 ms (a metric has no
    /// event to await); returns the time it took. Panics after `within` with the last value.
    pub async fn wait_for_metric(
        &self,
        series: &str,
        accept: impl Fn(f64) -> bool,
        within: Duration,
    ) -> Duration {
        let started = Instant::now();
        let mut ticks = tokio::time::interval(Duration::from_millis(100));
        loop {
            ticks.tick().await;
            let value = self.metric(series).await;
            if accept(value) {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < within,
                "node {}: {series} is still {value} after {within:?}",
                self.id
            );
        }
    }

    /// The status of `GET /readyz` over HTTPS, or `None` if the node does not answer.
    pub async fn readyz(&self) -> Option<u16> {
        let connector = tls_client(&[read_cert(&self.cert)], &[b"http/1.1"]);
        let tls = connect(&connector, self.https).await.ok()?;
        let mut h1 = H1::over(tls).await;
        let fetched = h1.send(get("/readyz")).await.ok()?;
        Some(fetched.status.as_u16())
    }

    /// Its process ID, while it runs (e.g. for a browser test that kills it itself).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL: the node dies without a word (no draining, no leaving).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM: the one shutdown path.
    pub fn terminate(&self) {
        let pid = self.child.as_ref().expect("node runs").id();
        let status = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// Awaits the exit (at most `within`) and returns its code.
    pub async fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let started = Instant::now();
        let mut ticks = tokio::time::interval(Duration::from_millis(50));
        loop {
            ticks.tick().await;
            let child = self.child.as_mut().expect("node runs");
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return status.code();
            }
            assert!(
                started.elapsed() < within,
                "node {} did not exit within {within:?}",
                self.id
            );
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}
