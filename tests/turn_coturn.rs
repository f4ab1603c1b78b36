//! Interoperability with coturn's test clients (`turnutils_uclient`, `turnutils_stunclient`, Debian
//! package `coturn`). Without the tools these tests print why and pass — except under `CI=true`,
//! where a missing tool is a failure, so CI cannot silently skip interop.

#[path = "support/turn_rawclient.rs"]
mod raw;

#[path = "support/uclient.rs"]
mod uclient;

use std::process::Output;
use std::time::Duration;

use raw::*;
use tokio::process::Command;
use uclient::{lost_packets, received_packets};

/// Resolves a coturn tool or explains why the test cannot run.
fn tool(name: &str) -> Option<String> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    });
    match found {
        Some(p) => Some(p.to_string_lossy().into_owned()),
        None if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("{name} is required under CI=true: apt-get install coturn")
        }
        None => {
            eprintln!("skipping: {name} not found (apt-get install coturn)");
            None
        }
    }
}

async fn run(program: &str, args: &[&str]) -> Output {
    let child = Command::new(program).args(args).kill_on_drop(true).output();
    tokio::time::timeout(Duration::from_secs(60), child)
        .await
        .unwrap_or_else(|_| panic!("{program} {args:?} did not finish"))
        .expect("tool runs")
}

fn text(o: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The relaying tests assert zero loss, so they take turns: four uclient runs at once on a 2-core
/// machine (with other test binaries beside them) starve the clients themselves, and their own
/// socket buffers overflow — loss that says nothing about the relay.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn uclient_relays(extra: &[&str], port_of: fn(&callgate::turn::RunningRelay) -> u16) {
    let Some(uclient) = tool("turnutils_uclient") else {
        return;
    };
    let _turn = ONE_AT_A_TIME.lock().await;
    let relay = start(test_settings(), Some(tls_source())).await;
    let port = port_of(&relay).to_string();
    // -y: two clients relaying to each other, each with an RTP/RTCP pair allocated through
    // EVEN-PORT and RESERVATION-TOKEN.
    let mut args = vec![
        "-y",
        "-n",
        "100",
        "-m",
        "2",
        "-l",
        "170",
        "-z",
        "5",
        "-u",
        "coturn-user",
        "-W",
        SECRET,
        "-p",
        &port,
    ];
    args.extend_from_slice(extra);
    args.push("127.0.0.1");
    let out = run(&uclient, &args).await;
    let t = text(&out);
    assert!(out.status.success(), "uclient failed:\n{t}");
    assert_eq!(lost_packets(&t), Some(0), "uclient lost packets:\n{t}");
    assert!(received_packets(&t).unwrap_or(0) >= 100, "no traffic:\n{t}");
    let s = relay.stats().snapshot();
    // Two clients, each an RTP allocation (EVEN-PORT) plus an RTCP one (RESERVATION-TOKEN).
    assert!(s.allocations_created >= 4, "{s:?}");
    assert!(
        s.packets_to_peers >= 100 && s.packets_to_clients >= 100,
        "{s:?}"
    );
    relay.shutdown().await;
}

#[tokio::test]
async fn coturn_uclient_relays_over_udp_with_rest_credentials() {
    uclient_relays(&[], |r| r.udp_addrs()[0].port()).await;
}

#[tokio::test]
async fn coturn_uclient_relays_over_udp_with_dont_fragment() {
    uclient_relays(&["-g"], |r| r.udp_addrs()[0].port()).await;
}

#[tokio::test]
async fn coturn_uclient_relays_over_tcp() {
    uclient_relays(&["-t"], |r| r.tcp_addrs()[0].port()).await;
}

#[tokio::test]
async fn coturn_uclient_relays_over_tls() {
    uclient_relays(&["-t", "-S"], |r| r.tls_addrs()[0].port()).await;
}

/// A self-signed certificate; uclient does not verify it without -E.
fn tls_source() -> callgate::turn::TlsAcceptorSource {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into());
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(vec![ck.cert.der().clone()], key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    std::sync::Arc::new(move || acceptor.clone())
}

#[tokio::test]
async fn coturn_uclient_with_wrong_secret_is_refused() {
    let Some(uclient) = tool("turnutils_uclient") else {
        return;
    };
    let relay = start(test_settings(), None).await;
    let port = relay.udp_addrs()[0].port().to_string();
    let out = run(
        &uclient,
        &[
            "-y",
            "-n",
            "5",
            "-u",
            "u",
            "-W",
            "wrong-secret",
            "-p",
            &port,
            "127.0.0.1",
        ],
    )
    .await;
    let t = text(&out);
    assert!(
        !out.status.success() || received_packets(&t).unwrap_or(0) == 0,
        "{t}"
    );
    assert!(relay.stats().snapshot().auth_failures >= 1, "{t}");
    assert_eq!(relay.stats().snapshot().allocations_created, 0);
    relay.shutdown().await;
}

#[tokio::test]
async fn coturn_stunclient_gets_a_binding_answer() {
    let Some(stunclient) = tool("turnutils_stunclient") else {
        return;
    };
    let relay = start(test_settings(), None).await;
    let port = relay.udp_addrs()[0].port().to_string();
    let out = run(&stunclient, &["-p", &port, "127.0.0.1"]).await;
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains("UDP reflexive addr: 127.0.0.1:"), "{t}");
    relay.shutdown().await;
}

/// Not a test: a burst measurement, run by hand with
/// `cargo test --test turn_coturn burst -- --ignored --nocapture`. It prints uclient's loss with the
/// OS-default receive buffer and with callgate's 4 MiB, on one and on two read loops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement; slow and machine-dependent"]
async fn burst_loss_measurement() {
    let Some(uclient) = tool("turnutils_uclient") else {
        return;
    };
    for (rcvbuf, sockets) in [(212_992usize, 1usize), (4 << 20, 1), (4 << 20, 2)] {
        let mut settings = test_settings();
        settings.recv_buffer_bytes = rcvbuf;
        settings.udp_sockets = sockets;
        settings.total_quota = 1000;
        settings.user_quota = 1000;
        settings.allocations_per_ip = Some(1000);
        let relay = start(settings, None).await;
        let port = relay.udp_addrs()[0].port().to_string();
        let out = run(
            &uclient,
            &[
                "-y",
                "-c",
                "-m",
                "40",
                "-n",
                "300",
                "-l",
                "1000",
                "-z",
                "1",
                "-u",
                "burst",
                "-W",
                SECRET,
                "-p",
                &port,
                "127.0.0.1",
            ],
        )
        .await;
        let t = text(&out);
        let summary: Vec<&str> = t
            .lines()
            .filter(|l| l.contains("Total lost") || l.contains("tot_recv_msgs="))
            .collect();
        println!(
            "rcvbuf={rcvbuf} sockets={sockets}: {:?} stats={:?}",
            summary.last(),
            relay.stats().snapshot()
        );
        println!("  {}", summary.first().unwrap_or(&""));
        relay.shutdown().await;
    }
}
