//! A real HAProxy for tests, configured from the shipped `ops/haproxy/haproxy.cfg`.
//!
//! The harness keeps every option of the shipped file and changes only what must differ on a
//! test machine: the `bind` addresses (free loopback ports), the `server` lines (one per test
//! node, each connecting from `source` so that only HAProxy's connections are trusted for the
//! PROXY header), and the process settings of `global` (no chroot, no user switch, log to
//! stderr, `maxconn` within an unprivileged file limit). Started with `-db` (foreground), stopped by PID on drop. Without haproxy installed
//! `start` returns `None` — under `CI=true` it panics instead.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A running haproxy, killed on drop.
pub struct Haproxy {
    child: Child,
    /// The frontend address clients connect to.
    pub addr: SocketAddr,
    /// The port-80 frontend's address (plain HTTP: redirects and ACME HTTP-01).
    pub http_addr: SocketAddr,
    /// Its stderr, line by line (server state changes: "Server callgate_nodes/node1 is DOWN").
    lines: mpsc::Receiver<String>,
    /// Holds the generated config.
    _dir: tempfile::TempDir,
}

impl Haproxy {
    /// Starts haproxy in front of `nodes` (their HTTPS addresses), connecting from `source`.
    pub fn start(nodes: &[SocketAddr], source: IpAddr) -> Option<Haproxy> {
        Self::start_balanced(nodes, source, None)
    }

    /// Like [`Haproxy::start`], with the port-80 frontend forwarding to `http_nodes` (the
    /// nodes' plain-HTTP listeners) on [`Haproxy::http_addr`].
    pub fn start_with_http(
        nodes: &[SocketAddr],
        http_nodes: &[SocketAddr],
        source: IpAddr,
    ) -> Option<Haproxy> {
        Self::start_full(nodes, http_nodes, source, None)
    }

    /// Like [`Haproxy::start`], with the backend's `balance` algorithm replaced when `balance` is
    /// given: `Some("first")` sends every connection to the first live node, so a test knows
    /// where a client lands (and where it lands once that node is gone) without counting the
    /// browser's connections. Every other option of the shipped file stays.
    pub fn start_balanced(
        nodes: &[SocketAddr],
        source: IpAddr,
        balance: Option<&str>,
    ) -> Option<Haproxy> {
        Self::start_full(nodes, &[], source, balance)
    }

    fn start_full(
        nodes: &[SocketAddr],
        http_nodes: &[SocketAddr],
        source: IpAddr,
        balance: Option<&str>,
    ) -> Option<Haproxy> {
        if !tool_present() {
            return None;
        }
        let free = || {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            SocketAddr::from(([127, 0, 0, 1], port))
        };
        let (addr, http_addr) = (free(), free());
        let template = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("ops/haproxy/haproxy.cfg"),
        )
        .unwrap();
        let mut config = for_test(&template, addr, http_addr, nodes, http_nodes, source);
        if let Some(algorithm) = balance {
            config = config
                .lines()
                .map(|line| match line.split_whitespace().next() {
                    Some("balance") => format!("    balance {algorithm}\n"),
                    _ => format!("{line}\n"),
                })
                .collect();
            assert!(
                config.contains(&format!("balance {algorithm}")),
                "the template has no balance line"
            );
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("haproxy.cfg");
        std::fs::write(&path, &config).unwrap();
        let mut child = Command::new("haproxy")
            .arg("-f")
            .arg(&path)
            .arg("-db")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("haproxy starts");
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            if let Ok(Some(status)) = child.try_wait() {
                let said: Vec<String> = lines.try_iter().collect();
                panic!(
                    "haproxy exited with {status}:\n{}\n{config}",
                    said.join("\n")
                );
            }
            assert!(
                Instant::now() < deadline,
                "haproxy did not listen on {addr}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(Haproxy {
            child,
            addr,
            http_addr,
            lines,
            _dir: dir,
        })
    }

    /// Blocks until a stderr line contains `needle`; panics after `within`.
    pub fn wait_for_log(&self, needle: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => continue,
                Err(_) => panic!("haproxy logged no line containing {needle:?} within {within:?}"),
            }
        }
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The shipped config with test addresses; every other line kept as it is.
///
/// The HTTPS frontend binds `bind` and its backend's `server` lines become `nodes`; the port-80
/// frontend (the one whose name ends in `_http`) binds `http_bind` and its backend's `server`
/// lines become `http_nodes` (none: a backend without servers, which answers nothing).
pub fn for_test(
    template: &str,
    bind: SocketAddr,
    http_bind: SocketAddr,
    nodes: &[SocketAddr],
    http_nodes: &[SocketAddr],
    source: IpAddr,
) -> String {
    let mut out = String::new();
    let mut section = String::new();
    let mut written: Vec<String> = Vec::new();
    for line in template.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        if !line.starts_with(char::is_whitespace) && !words.is_empty() && !line.starts_with('#') {
            section = words.join(" ");
        }
        let plain_http = section.ends_with("_http");
        match words.first().copied() {
            Some("chroot" | "user" | "group" | "daemon") => continue,
            // Sized for production; a test runs unprivileged with a lower file limit.
            Some("maxconn") => out.push_str("    maxconn 1000\n"),
            Some("log") if words.get(1) == Some(&"/dev/log") => {
                out.push_str("    log stderr format raw local0\n");
            }
            Some("bind") => {
                let addr = if plain_http { http_bind } else { bind };
                out.push_str(&format!("    bind {addr}\n"));
            }
            Some("server") => {
                // One line per test node, with the template's options after the address.
                if !written.contains(&section) {
                    let options = words.get(3..).unwrap_or_default().join(" ");
                    let targets = if plain_http { http_nodes } else { nodes };
                    for (i, node) in targets.iter().enumerate() {
                        out.push_str(&format!(
                            "    server node{} {node} {options} source {source}\n",
                            i + 1
                        ));
                    }
                    written.push(section.clone());
                }
            }
            _ => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    assert!(
        written.iter().any(|s| !s.ends_with("_http")),
        "the template has no server line"
    );
    out
}

/// Whether haproxy is installed; under `CI=true` its absence fails the test.
fn tool_present() -> bool {
    let found = Command::new("sh")
        .args(["-c", "command -v haproxy"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!(
                "haproxy is required under CI=true (Debian package haproxy); .ci/run installs it"
            );
        }
        eprintln!("skipping: haproxy not installed (apt-get install haproxy)");
    }
    found
}
