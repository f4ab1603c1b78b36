//! A real `redis-server` for tests: on a free loopback port, persistence off, stopped by PID.
//!
//! [`RedisServer::start`] returns `None` (and says why) when redis-server is not installed —
//! except under `CI=true`, where that is a failure. [`RedisServer::stop`] and
//! [`RedisServer::restart`] are for the "Redis trouble" tests: the port stays the same, so the
//! nodes' redis-url stays valid.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running redis-server, killed on drop.
pub struct RedisServer {
    /// The process, while it runs.
    child: Option<Child>,
    /// Its address (127.0.0.1 and a port that was free at start).
    pub addr: SocketAddr,
    /// Certificate and key when it speaks only TLS on `addr`.
    tls: Option<(PathBuf, PathBuf)>,
    /// Extra configuration directives (ACL users, `maxmemory`), kept across restarts.
    extra: Vec<String>,
}

impl RedisServer {
    /// Starts redis-server on a free port and waits until it answers PING.
    pub fn start() -> Option<RedisServer> {
        Self::start_with(None)
    }

    /// Starts redis-server with extra configuration directives, each word its own argument
    /// (`["--maxmemory", "3mb"]`, `["--user", "callgate", "on", ...]`).
    pub fn start_configured(extra: &[&str]) -> Option<RedisServer> {
        if !tool_present() {
            return None;
        }
        let mut server = RedisServer {
            child: None,
            addr: SocketAddr::from(([127, 0, 0, 1], free_port())),
            tls: None,
            extra: extra.iter().map(|s| (*s).to_owned()).collect(),
        };
        server.restart();
        Some(server)
    }

    /// Starts redis-server speaking only TLS (with this PEM certificate and key, clients not
    /// asked for certificates) on a free port, and waits until it listens.
    pub fn start_tls(cert: &Path, key: &Path) -> Option<RedisServer> {
        Self::start_with(Some((cert.to_owned(), key.to_owned())))
    }

    fn start_with(tls: Option<(PathBuf, PathBuf)>) -> Option<RedisServer> {
        if !tool_present() {
            return None;
        }
        let mut server = RedisServer {
            child: None,
            addr: SocketAddr::from(([127, 0, 0, 1], free_port())),
            tls,
            extra: Vec::new(),
        };
        server.restart();
        Some(server)
    }

    /// `redis://127.0.0.1:PORT`, or `rediss://localhost:PORT` for a TLS server (the name its
    /// certificate carries).
    pub fn url(&self) -> String {
        match self.tls {
            None => format!("redis://{}", self.addr),
            Some(_) => format!("rediss://localhost:{}", self.addr.port()),
        }
    }

    /// A synchronous client, for assertions on what the nodes wrote (plain servers only).
    pub fn client(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .unwrap()
            .get_connection_with_timeout(Duration::from_secs(2))
            .expect("test redis answers")
    }

    /// Stops the server (SIGKILL by PID: nothing is persisted anyway) and waits for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // A paused server must run again to die of SIGKILL promptly; SIGKILL works anyway,
            // SIGCONT only makes sure nothing waits on it.
            let _ = Command::new("kill")
                .args(["-CONT", &child.id().to_string()])
                .status();
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Freezes the server (SIGSTOP): it keeps its connections but answers nothing, like a Redis
    /// that hangs or a network that drops everything.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Lets a paused server go on (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, name: &str) {
        let pid = self.child.as_ref().expect("redis-server runs").id();
        let status = Command::new("kill")
            .args([name, &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Starts the server again on the same port (empty: persistence is off) and waits for PING.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop it first");
        let port = self.addr.port().to_string();
        let mut command = Command::new("redis-server");
        match &self.tls {
            None => command.args(["--port", &port]),
            Some((cert, key)) => command
                .args([
                    "--port",
                    "0",
                    "--tls-port",
                    &port,
                    "--tls-auth-clients",
                    "no",
                ])
                .arg("--tls-cert-file")
                .arg(cert)
                .arg("--tls-key-file")
                .arg(key),
        };
        let child = command
            .args([
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "yes",
            ])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.pings() {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("redis-server exited at start ({status}); check its arguments");
            }
            assert!(
                Instant::now() < deadline,
                "redis-server on {} did not answer PING within 10 s",
                self.addr
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the server answers PING right now (a TLS server: whether it listens).
    fn pings(&self) -> bool {
        let Ok(mut tcp) = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)) else {
            return false;
        };
        if self.tls.is_some() {
            return true;
        }
        let _ = tcp.set_read_timeout(Some(Duration::from_millis(500)));
        let mut answer = [0u8; 7];
        // With the default user switched off (ACL tests) the answer is -NOAUTH: up all the same.
        tcp.write_all(b"PING\r\n").is_ok()
            && tcp.read_exact(&mut answer).is_ok()
            && (&answer == b"+PONG\r\n" || &answer == b"-NOAUTH")
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A loopback port that was free a moment ago.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Whether redis-server is installed; under `CI=true` its absence fails the test.
fn tool_present() -> bool {
    let found = std::process::Command::new("sh")
        .args(["-c", "command -v redis-server"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("redis-server is required under CI=true (Debian package redis-server); .ci/run installs it");
        }
        eprintln!("skipping: redis-server not installed (apt-get install redis-server)");
    }
    found
}
