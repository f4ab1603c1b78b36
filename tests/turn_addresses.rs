//! Answers leave from the address asked: with the default `listening-ip` (every address of the
//! host), a request to each address of a multi-address host is answered from that same address,
//! over UDP (IPv4 and IPv6) and TCP. A wildcard socket would answer from whatever source the
//! kernel picks for the client — on Linux the address nearest the client, here 127.0.0.1 or ::1 —
//! and clients (Chromium among them) drop such answers.
//!
//! The test needs a host with more than one address and IPv6, so it builds one: it creates a
//! network namespace (`turnnet-<pid>`, with loopback and a veth pair holding 10.200.0.1 and
//! fd99::1) and runs itself inside it with `ip netns exec`. That needs root and `ip` (iproute2);
//! without them it explains why and passes, except under `CI=true`, where it fails.

#[path = "support/turn_rawclient.rs"]
mod raw;

use std::net::{IpAddr, SocketAddr};
use std::process::Command;

use callgate::turn::TurnSettings;
use raw::*;
use tokio::net::UdpSocket;

/// Set in the child process that runs inside the namespace.
const INSIDE: &str = "CALLGATE_TURNNET_INSIDE";

/// The addresses the namespace has besides loopback.
const V4: &str = "10.200.0.1";
const V6: &str = "fd99::1";

/// Deletes the namespace however the test ends.
struct Namespace(String);

impl Namespace {
    fn create(name: &str) -> Result<Namespace, String> {
        let ip = |args: &[&str]| -> Result<(), String> {
            let out = Command::new("ip")
                .args(args)
                .output()
                .map_err(|e| format!("cannot run `ip` (apt-get install iproute2): {e}"))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(format!(
                    "`ip {}` failed (root needed): {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr).trim()
                ))
            }
        };
        ip(&["netns", "add", name])?;
        let ns = Namespace(name.to_owned());
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        ip(&[
            "-n", name, "link", "add", "turnnet0", "type", "veth", "peer", "name", "turnnet1",
        ])?;
        ip(&["-n", name, "link", "set", "turnnet0", "up"])?;
        ip(&["-n", name, "link", "set", "turnnet1", "up"])?;
        ip(&[
            "-n",
            name,
            "addr",
            "add",
            "10.200.0.1/24",
            "dev",
            "turnnet0",
        ])?;
        ip(&[
            "-n",
            name,
            "addr",
            "add",
            "fd99::1/64",
            "dev",
            "turnnet0",
            "nodad",
        ])?;
        Ok(ns)
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

#[test]
fn every_host_address_answers_from_itself() {
    if std::env::var_os(INSIDE).is_some() {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
            .block_on(inside_the_namespace());
        return;
    }
    let ns = match Namespace::create(&format!("turnnet-{}", std::process::id())) {
        Ok(ns) => ns,
        Err(why) if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("a network namespace is required under CI=true: {why}")
        }
        Err(why) => {
            eprintln!("skipping: cannot build a two-address host: {why}");
            return;
        }
    };
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.0])
        .arg(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "every_host_address_answers_from_itself",
            "--nocapture",
        ])
        .env(INSIDE, "1")
        .output()
        .expect("ip netns exec runs");
    println!("{}", String::from_utf8_lossy(&out.stdout));
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success(),
        "the test failed inside the namespace; its output is above"
    );
}

async fn inside_the_namespace() {
    let settings = TurnSettings {
        listening_ips: TurnSettings::default().listening_ips,
        relay_ip: Some("127.0.0.1".parse().unwrap()),
        tls_port: None,
        ..test_settings()
    };
    assert!(settings.listening_ips.iter().all(IpAddr::is_unspecified));
    let relay = start(settings, None).await;
    let port = relay.udp_addrs()[0].port();
    let tcp_port = relay.tcp_addrs()[0].port();
    let host: Vec<IpAddr> = ["127.0.0.1", V4, "::1", V6]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
    for ip in &host {
        assert!(
            relay.udp_addrs().contains(&SocketAddr::new(*ip, port)),
            "UDP listens on {ip}:{port}: {:?}",
            relay.udp_addrs()
        );
        assert!(
            relay.tcp_addrs().contains(&SocketAddr::new(*ip, tcp_port)),
            "TCP listens on {ip}:{tcp_port}: {:?}",
            relay.tcp_addrs()
        );
    }

    for &ip in &host {
        // The client sits on loopback, so for every other address the kernel's choice of source
        // (the one nearest the client) differs from the address asked.
        let client_ip: IpAddr = if ip.is_ipv4() {
            "127.0.0.1".parse().unwrap()
        } else {
            "::1".parse().unwrap()
        };
        let asked = SocketAddr::new(ip, port);
        let client = UdpSocket::bind(SocketAddr::new(client_ip, 0))
            .await
            .unwrap();
        let binding: [u8; 20] = [
            0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xa4, 0x42, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,
        ];
        client.send_to(&binding, asked).await.unwrap();
        let mut buf = [0u8; 1500];
        let (n, from) = tokio::time::timeout(WAIT, client.recv_from(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("no answer to a Binding sent to {asked}"))
            .unwrap();
        assert_eq!(
            from, asked,
            "the Binding sent to {asked} was answered from {from}"
        );
        assert_eq!(&buf[..2], [0x01, 0x01], "a Binding success ({n} bytes)");

        // A full allocation through that address, answered from it (the raw client's socket is
        // connected to `asked`, so the kernel drops answers from any other source).
        let sock = UdpSocket::bind(SocketAddr::new(client_ip, 0))
            .await
            .unwrap();
        sock.connect(asked).await.unwrap();
        let mut raw = RawClient::from_socket(sock, asked, &format!("user-{ip}"));
        let relayed = raw.allocate().await.expect("allocates over UDP");
        assert_eq!(
            relayed.ip().to_string(),
            "127.0.0.1",
            "the relayed address is the relay IP, whatever address the client asked"
        );

        let tcp = SocketAddr::new(ip, tcp_port);
        let mut raw = RawClient::tcp(tcp, &format!("tcp-{ip}")).await;
        raw.allocate().await.expect("allocates over TCP");
        println!("{asked}: answered from {from}; TCP {tcp} allocates");
    }
    relay.shutdown().await;
}
