//! A real `redis-server` for one test: a free loopback port, no persistence, stopped by PID when
//! dropped. Without `redis-server` the test prints why and passes — except under `CI=true`, where
//! a missing server is a failure (`.ci/run` installs Debian's `redis-server`).

#![allow(dead_code)]

use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One running (or stopped, restartable) redis-server.
pub struct RedisServer {
    /// The running process, `None` while stopped.
    child: Option<Child>,
    /// Extra configuration directives, kept across restarts.
    extra: Vec<String>,
    /// Its port on 127.0.0.1, kept across restarts so clients reconnect to the same address.
    port: u16,
    /// Its working directory (nothing is written there with persistence off, but Redis wants one).
    dir: tempfile::TempDir,
}

impl RedisServer {
    /// Starts a server, or returns `None` (test skipped) when redis-server is not installed.
    pub fn start() -> Option<Self> {
        Self::start_with(&[])
    }

    /// Like [`RedisServer::start`], with extra configuration directives (`["--user", "..."]`).
    pub fn start_with(extra: &[&str]) -> Option<Self> {
        let found = std::env::var_os("PATH").is_some_and(|paths| {
            std::env::split_paths(&paths).any(|p| p.join("redis-server").is_file())
        });
        if !found {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("redis-server is required under CI=true: apt-get install redis-server");
            }
            eprintln!("skipping: redis-server not found (apt-get install redis-server)");
            return None;
        }
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free loopback port")
            .port();
        let mut server = Self {
            child: None,
            extra: extra.iter().map(|s| (*s).to_owned()).collect(),
            port,
            dir: tempfile::tempdir().expect("a temporary directory"),
        };
        server.spawn();
        Some(server)
    }

    /// `redis://127.0.0.1:PORT/`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kills the server (SIGKILL by PID) and waits for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port (empty: persistence is off, as after a crash).
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Runs redis-server and waits until it answers PING.
    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.answers_ping() {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("redis-server exited at start ({status}); check its arguments");
            }
            assert!(
                Instant::now() < deadline,
                "redis-server did not answer within 10 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the server answers `PING` with `+PONG` right now.
    fn answers_ping(&self) -> bool {
        let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
        // With the default user switched off (ACL tests) the answer is -NOAUTH: up all the same.
        let mut reply = [0u8; 7];
        stream.write_all(b"PING\r\n").is_ok()
            && stream.read_exact(&mut reply).is_ok()
            && (&reply == b"+PONG\r\n" || &reply == b"-NOAUTH")
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}
