//! The relay over UDP with real clients on real sockets: the webrtc-rs TURN client and an
//! independent raw STUN client.

#[path = "support/turn_rawclient.rs"]
mod raw;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use raw::*;
use stun::message::Setter;
use tokio::net::UdpSocket;
use turn::client::{Client, ClientConfig};
use turn::proto::rsrvtoken::ReservationToken;
use webrtc_util::Conn;

async fn turn_crate_client(server: SocketAddr, user: &str) -> Client {
    let (username, password) = credentials(user);
    let conn = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let client = Client::new(ClientConfig {
        stun_serv_addr: server.to_string(),
        turn_serv_addr: server.to_string(),
        username,
        password,
        realm: REALM.into(),
        software: String::new(),
        rto_in_ms: 0,
        conn: Arc::new(conn),
        vnet: None,
    })
    .await
    .unwrap();
    client.listen().await.unwrap();
    client
}

async fn recv_on(conn: &impl Conn) -> (Vec<u8>, SocketAddr) {
    let mut buf = vec![0u8; 1500];
    let (n, from) = tokio::time::timeout(WAIT, conn.recv_from(&mut buf))
        .await
        .expect("relayed data")
        .unwrap();
    buf.truncate(n);
    (buf, from)
}

#[tokio::test]
async fn two_turn_crate_clients_relay_to_each_other() {
    let relay = start(test_settings(), None).await;
    let server = relay.udp_addrs()[0];
    let alice = turn_crate_client(server, "alice").await;
    let bob = turn_crate_client(server, "bob").await;
    let alice_relay = alice.allocate().await.expect("alice allocates");
    let bob_relay = bob.allocate().await.expect("bob allocates");
    let alice_addr = alice_relay.local_addr().unwrap();
    let bob_addr = bob_relay.local_addr().unwrap();
    assert_eq!(alice_addr.ip().to_string(), "127.0.0.1");

    // Bob opens a permission towards Alice's relay first (his first packet is dropped by Alice's
    // allocation, which has no permission yet), then they exchange data. The client binds a
    // channel in the background, so later messages travel as ChannelData.
    bob_relay.send_to(b"knock", alice_addr).await.unwrap();
    for i in 0..20u8 {
        alice_relay.send_to(&[b'a', i], bob_addr).await.unwrap();
        let (data, from) = recv_on(&bob_relay).await;
        assert_eq!(data, [b'a', i]);
        assert_eq!(from, alice_addr);
        bob_relay.send_to(&[b'b', i], alice_addr).await.unwrap();
        let (data, from) = loop {
            let (data, from) = recv_on(&alice_relay).await;
            if data != b"knock" {
                break (data, from);
            }
        };
        assert_eq!(data, [b'b', i]);
        assert_eq!(from, bob_addr);
    }
    let s = relay.stats().snapshot();
    assert_eq!(s.allocations_active, 2);
    assert!(s.packets_to_peers >= 40, "{s:?}");
    assert!(s.packets_to_clients >= 40, "{s:?}");
    alice.close().await.unwrap();
    bob.close().await.unwrap();
    relay.shutdown().await;
}

#[tokio::test]
async fn channel_bind_relays_channel_data_both_ways() {
    let relay = start(test_settings(), None).await;
    let mut client = RawClient::udp(relay.udp_addrs()[0], "carol").await;
    let relayed = client.allocate().await.expect("allocates");
    channel_round_trip(&mut client, relayed).await;
    relay.shutdown().await;
}

#[tokio::test]
async fn wrong_or_expired_credentials_get_401() {
    let relay = start(test_settings(), None).await;
    let server = relay.udp_addrs()[0];

    let mut wrong = RawClient::udp(server, "mallory").await;
    wrong.password = "not-the-password".into();
    assert_eq!(wrong.allocate().await, Err(401));

    let mut expired = RawClient::udp(server, "mallory").await;
    let c = callgate::turn::TurnCredentials::new(&[SECRET])
        .unwrap()
        .issue(
            "mallory",
            std::time::SystemTime::now() - Duration::from_secs(3600),
            Duration::from_secs(60),
        );
    expired.username = c.username;
    expired.password = c.password;
    assert_eq!(expired.allocate().await, Err(401));

    let mut plain_username = RawClient::udp(server, "x").await;
    plain_username.username = "1999999999".into(); // what the engine's own handler expects
    assert_eq!(plain_username.allocate().await, Err(401));

    let mut other_secret = RawClient::udp(server, "eve").await;
    let c = callgate::turn::TurnCredentials::new(&["another-secret"])
        .unwrap()
        .issue("eve", std::time::SystemTime::now(), Duration::from_secs(60));
    other_secret.username = c.username;
    other_secret.password = c.password;
    assert_eq!(other_secret.allocate().await, Err(401));

    assert_eq!(relay.stats().snapshot().auth_failures, 4);
    assert_eq!(relay.stats().snapshot().allocations_active, 0);
    relay.shutdown().await;
}

#[tokio::test]
async fn rotated_secrets_are_all_accepted() {
    let mut settings = test_settings();
    settings.auth_secrets = vec!["brand-new".into(), SECRET.into()];
    let relay = start(settings, None).await;
    let mut old = RawClient::udp(relay.udp_addrs()[0], "dave").await;
    assert!(old.allocate().await.is_ok(), "old secret still works");
    let mut new = RawClient::udp(relay.udp_addrs()[0], "dave").await;
    let c = relay.credentials().issue(
        "dave",
        std::time::SystemTime::now(),
        Duration::from_secs(60),
    );
    new.username = c.username;
    new.password = c.password;
    assert!(new.allocate().await.is_ok(), "new secret works");
    relay.shutdown().await;
}

#[tokio::test]
async fn refused_peers_get_403_while_the_allowed_loopback_peer_works() {
    let relay = start(test_settings(), None).await;
    let mut client = RawClient::udp(relay.udp_addrs()[0], "frank").await;
    client.allocate().await.unwrap();
    // (::ffff:127.0.0.1 normalises to the allowed 127.0.0.1 here; the default-policy test below
    // covers it refused.)
    let refused = [
        "[::ffff:127.0.0.2]:5000",
        "127.0.0.2:5000",
        "0.0.0.0:5000",
        "169.254.169.254:80",
        "10.0.0.1:5000",
        "172.16.0.1:5000",
        "192.168.1.1:5000",
        "100.64.0.1:5000",
        "224.0.0.1:5000",
        "255.255.255.255:5000",
        "[::1]:5000",
        "[::]:5000",
        "[fe80::1]:5000",
        "[fd00::1]:5000",
        "[::127.0.0.2]:5000",
        "[2002:a9fe:a9fe::]:80",
        "[64:ff9b::a9fe:a9fe]:80",
        "[64:ff9b:1::a00:1]:80",
    ];
    for peer in refused {
        let peer: SocketAddr = peer.parse().unwrap();
        assert_eq!(
            client.create_permission(peer).await.code(),
            Some(403),
            "{peer}"
        );
        assert_eq!(
            client.channel_bind(0x4001, peer).await.code(),
            Some(403),
            "{peer}"
        );
    }
    let (_peer, allowed) = peer_socket().await;
    assert_eq!(client.create_permission(allowed).await.code(), None);
    assert_eq!(
        relay.stats().snapshot().refused_peers,
        2 * refused.len() as u64
    );
    relay.shutdown().await;
}

#[tokio::test]
async fn default_policy_refuses_loopback_including_mapped_forms() {
    let mut settings = test_settings();
    settings.allowed_peer_ips.clear();
    let relay = start(settings, None).await;
    let mut client = RawClient::udp(relay.udp_addrs()[0], "grace").await;
    client.allocate().await.unwrap();
    for peer in [
        "127.0.0.1:9",
        "[::ffff:127.0.0.1]:9",
        "0.0.0.0:9",
        "169.254.169.254:80",
    ] {
        let peer: SocketAddr = peer.parse().unwrap();
        assert_eq!(
            client.create_permission(peer).await.code(),
            Some(403),
            "{peer}"
        );
        assert_eq!(
            client.channel_bind(0x4002, peer).await.code(),
            Some(403),
            "{peer}"
        );
    }
    relay.shutdown().await;
}

#[tokio::test]
async fn user_quota_answers_486_and_frees_on_release() {
    let mut settings = test_settings();
    settings.user_quota = 2;
    let relay = start(settings, None).await;
    let server = relay.udp_addrs()[0];
    let mut first = RawClient::udp(server, "heidi").await;
    first.allocate().await.unwrap();
    let mut second = RawClient::udp(server, "heidi").await;
    second.allocate().await.unwrap();
    let mut third = RawClient::udp(server, "heidi").await;
    assert_eq!(third.allocate().await, Err(486));
    let mut other_user = RawClient::udp(server, "ivan").await;
    assert!(other_user.allocate().await.is_ok(), "quota is per user");
    assert_eq!(relay.stats().snapshot().quota_hits_user, 1);

    // Releasing one (Refresh with lifetime 0) frees a slot once the engine reports the close.
    assert!(matches!(
        first.refresh(Duration::ZERO).await,
        Answer::Success(_)
    ));
    let mut freed = false;
    for _ in 0..100 {
        if third.allocate().await.is_ok() {
            freed = true;
            break;
        }
        tokio::task::yield_now().await;
    }
    assert!(freed, "slot freed after release");
    relay.shutdown().await;
}

#[tokio::test]
async fn a_retransmitted_allocate_gets_the_same_success_again() {
    let relay = start(test_settings(), None).await;
    let server = relay.udp_addrs()[0];
    let mut client = RawClient::udp(server, "judy").await;
    client.learn_nonce().await;
    let allocate = client.request(
        stun::message::METHOD_ALLOCATE,
        vec![Box::new(udp_transport())],
        true,
    );
    client.send_raw(&allocate.raw).await;
    let first = client.recv_raw().await;
    // As if that response was lost on the way: the client retransmits the same request.
    client.send_raw(&allocate.raw).await;
    let again = client.recv_raw().await;
    assert_eq!(
        again, first,
        "the same success, not 437 Allocation Mismatch"
    );
    let mut response = stun::message::Message::new();
    response.raw = again;
    response.decode().unwrap();
    assert_eq!(response.typ.class, stun::message::CLASS_SUCCESS_RESPONSE);
    assert_eq!(relay.stats().snapshot().allocations_active, 1);
    // The allocation works.
    channel_round_trip(&mut client, relayed_address(&response)).await;
    relay.shutdown().await;
}

#[tokio::test]
async fn total_quota_answers_486() {
    let mut settings = test_settings();
    settings.total_quota = 1;
    let relay = start(settings, None).await;
    let mut a = RawClient::udp(relay.udp_addrs()[0], "a").await;
    a.allocate().await.unwrap();
    let mut b = RawClient::udp(relay.udp_addrs()[0], "b").await;
    assert_eq!(b.allocate().await, Err(486));
    assert_eq!(relay.stats().snapshot().quota_hits_total, 1);
    relay.shutdown().await;
}

#[tokio::test]
async fn binding_requests_are_answered() {
    let relay = start(test_settings(), None).await;
    let mut client = RawClient::udp(relay.udp_addrs()[0], "judy").await;
    let mapped = client.binding().await;
    assert_eq!(mapped.ip().to_string(), "127.0.0.1");
    assert_ne!(mapped.port(), 0);
    relay.shutdown().await;
}

#[tokio::test]
async fn dont_fragment_is_accepted_and_unknown_reservation_tokens_get_508() {
    let relay = start(test_settings(), None).await;
    let mut client = RawClient::udp(relay.udp_addrs()[0], "ken").await;
    let df: Vec<Box<dyn Setter>> = vec![Box::new(turn::proto::dontfrag::DontFragmentAttr)];
    assert!(
        client.allocate_with(df).await.is_ok(),
        "engine alone answers 420"
    );

    let mut other = RawClient::udp(relay.udp_addrs()[0], "ken").await;
    let token: Vec<Box<dyn Setter>> = vec![Box::new(ReservationToken(vec![1; 8]))];
    assert_eq!(other.allocate_with(token).await, Err(508));
    relay.shutdown().await;
}

/// EVEN-PORT with the R bit (the `turn` crate's type keeps the bit private).
struct EvenPortReserve;

impl Setter for EvenPortReserve {
    fn add_to(&self, m: &mut stun::message::Message) -> Result<(), stun::Error> {
        m.add(stun::attributes::ATTR_EVEN_PORT, &[0x80]);
        Ok(())
    }
}

#[tokio::test]
async fn even_port_reservation_token_gets_the_next_port() {
    let relay = start(test_settings(), None).await;
    let server = relay.udp_addrs()[0];
    let mut rtp = RawClient::udp(server, "pat").await;
    if rtp.nonce.is_empty() {
        rtp.learn_nonce().await;
    }
    let attrs: Vec<Box<dyn Setter>> = vec![Box::new(udp_transport()), Box::new(EvenPortReserve)];
    let Answer::Success(m) = rtp
        .transact(stun::message::METHOD_ALLOCATE, attrs, true)
        .await
    else {
        panic!("EVEN-PORT allocate failed")
    };
    let mut relayed = turn::proto::relayaddr::RelayedAddress::default();
    stun::message::Getter::get_from(&mut relayed, &m).unwrap();
    assert_eq!(relayed.port % 2, 0, "even port");
    let mut token = ReservationToken::default();
    stun::message::Getter::get_from(&mut token, &m).unwrap();

    let mut rtcp = RawClient::udp(server, "pat").await;
    let with_token: Vec<Box<dyn Setter>> = vec![Box::new(ReservationToken(token.0.clone()))];
    let rtcp_addr = rtcp
        .allocate_with(with_token)
        .await
        .expect("token honoured");
    assert_eq!(rtcp_addr.port(), relayed.port + 1);
    channel_round_trip(&mut rtcp, rtcp_addr).await;

    // A token is good once.
    let mut again = RawClient::udp(server, "pat").await;
    let reused: Vec<Box<dyn Setter>> = vec![Box::new(ReservationToken(token.0))];
    assert_eq!(again.allocate_with(reused).await, Err(508));
    relay.shutdown().await;
}

#[tokio::test]
async fn unauthenticated_flood_leaves_state_bounded() {
    let mut settings = test_settings();
    settings.unauthenticated_per_ip_per_sec = 50;
    let relay = start(settings, None).await;
    let server = relay.udp_addrs()[0];
    let before = relay.memory().unwrap();

    // 20 000 unauthenticated Allocates from 20 source ports, plus signed ones with made-up nonces.
    let mut socks = Vec::new();
    for _ in 0..20 {
        socks.push(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    }
    let unsigned = callgate::turn::gate::Gate::priming_request();
    for _ in 0..1000 {
        for s in &socks {
            s.send_to(&unsigned, server).await.unwrap();
        }
    }
    let mut stale = RawClient::udp(server, "flood").await;
    stale.realm = REALM.into();
    stale.nonce = "not-a-nonce".into();
    // Answered 438 (or dropped by the rate limit, which then times out) — never by the engine.
    let _ = tokio::time::timeout(Duration::from_millis(200), stale.allocate()).await;

    // A legitimate client still gets through once the limiter refills.
    let mut legit = RawClient::udp(server, "legit").await;
    let mut ok = false;
    for _ in 0..50 {
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(200), legit.allocate()).await
        {
            ok = true;
            break;
        }
        legit.nonce.clear();
    }
    assert!(ok, "legitimate client allocates after the flood");

    let after = relay.memory().unwrap();
    let stats = relay.stats().snapshot();
    assert!(stats.rate_limited > 10_000, "{stats:?}");
    // One source IP tracked, one key remembered (the legit client), one allocation — and the
    // engine has handed out exactly one nonce (the priming one), so its nonce map did not grow.
    assert!(after.rate_limited_ips <= 1, "{after:?}");
    assert!(after.verified_keys <= 1, "{after:?}");
    assert_eq!(after.ledger_entries, 1, "{after:?}");
    assert_eq!(before.engine_nonces, 1);
    assert_eq!(
        after.engine_nonces, 1,
        "no nonce leaked into the engine's map"
    );
    relay.shutdown().await;
}

#[tokio::test]
async fn shutdown_releases_the_ports() {
    let relay = start(test_settings(), None).await;
    let udp = relay.udp_addrs()[0];
    let tcp = relay.tcp_addrs()[0];
    let mut client = RawClient::udp(udp, "leo").await;
    client.allocate().await.unwrap();
    relay.shutdown().await;
    // Every listener is closed (SO_REUSEPORT would otherwise let us bind alongside, so bind
    // without it and expect success only because the relay's sockets are gone).
    UdpSocket::bind(udp)
        .await
        .expect("UDP port free after shutdown");
    tokio::net::TcpListener::bind(tcp)
        .await
        .expect("TCP port free after shutdown");
}

#[tokio::test]
async fn disabled_relay_binds_nothing_but_issues_credentials() {
    let mut settings = test_settings();
    settings.enabled = false;
    let relay = start(settings, None).await;
    assert!(relay.udp_addrs().is_empty());
    assert!(relay.tcp_addrs().is_empty());
    assert!(relay.memory().is_none());
    let ice = relay.credentials().ice_servers(
        "u",
        std::time::SystemTime::now(),
        Duration::from_secs(60),
        &relay.endpoints("example.org"),
    );
    assert!(ice.ice_servers.is_empty());
    relay.shutdown().await;
}

#[tokio::test]
async fn bandwidth_cap_drops_excess_per_allocation() {
    let mut settings = test_settings();
    settings.max_bytes_per_sec = Some(2_000);
    let relay = start(settings, None).await;
    let mut client = RawClient::udp(relay.udp_addrs()[0], "olga").await;
    client.allocate().await.unwrap();
    let (peer, peer_addr) = peer_socket().await;
    assert!(matches!(
        client.channel_bind(0x4000, peer_addr).await,
        Answer::Success(_)
    ));
    // 20 × 500 bytes at once: the 2 000-byte burst lets about four through.
    for _ in 0..20 {
        client.send_channel_data(0x4000, &[7u8; 500]).await;
    }
    // A marker after the burst proves the drops are the cap, not lost in flight: wait for the
    // relay to have counted all 20 one way or the other.
    let stats = Arc::clone(relay.stats());
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let s = stats.snapshot();
        if s.packets_to_peers + s.bandwidth_dropped >= 20 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{s:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let s = stats.snapshot();
    assert!((3..=5).contains(&s.packets_to_peers), "{s:?}");
    assert_eq!(s.packets_to_peers + s.bandwidth_dropped, 20, "{s:?}");
    let mut received = 0;
    while tokio::time::timeout(Duration::from_millis(100), peer.recv_from(&mut [0u8; 600]))
        .await
        .is_ok()
    {
        received += 1;
    }
    assert_eq!(received, s.packets_to_peers);
    relay.shutdown().await;
}

#[tokio::test]
async fn external_ip_and_port_range_shape_the_relayed_address() {
    let probe = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let base = probe.local_addr().unwrap().port().min(60_000);
    drop(probe);
    let mut settings = test_settings();
    settings.external_ip = Some(callgate::turn::ExternalIp {
        public: "203.0.113.7".parse().unwrap(),
        private: Some("127.0.0.1".parse().unwrap()),
    });
    settings.min_port = base;
    settings.max_port = base + 40;
    let relay = start(settings, None).await;
    let mut client = RawClient::udp(relay.udp_addrs()[0], "pia").await;
    let relayed = client.allocate().await.unwrap();
    assert_eq!(relayed.ip().to_string(), "203.0.113.7");
    assert!((base..=base + 40).contains(&relayed.port()), "{relayed}");
    relay.shutdown().await;
}

/// REQUESTED-ADDRESS-FAMILY: IPv6 (RFC 6156).
struct WantIpv6;

impl Setter for WantIpv6 {
    fn add_to(&self, m: &mut stun::message::Message) -> Result<(), stun::Error> {
        m.add(
            stun::attributes::ATTR_REQUESTED_ADDRESS_FAMILY,
            &[0x02, 0, 0, 0],
        );
        Ok(())
    }
}

#[tokio::test]
async fn ipv6_listener_and_relay_work() {
    let mut settings = test_settings();
    settings.listening_ips = vec!["::1".parse().unwrap()];
    settings.allowed_peer_ips = vec!["::1/128".parse().unwrap()];
    let relay = start(settings, None).await;
    let server = relay.udp_addrs()[0];
    assert!(server.is_ipv6());
    let sock = UdpSocket::bind("[::1]:0").await.unwrap();
    let mut client = RawClient::from_socket(sock, server, "quinn");
    let relayed = client
        .allocate_with(vec![Box::new(WantIpv6)])
        .await
        .unwrap();
    assert_eq!(relayed.ip().to_string(), "::1");
    let peer = UdpSocket::bind("[::1]:0").await.unwrap();
    let peer_addr = peer.local_addr().unwrap();
    assert!(matches!(
        client.channel_bind(0x4000, peer_addr).await,
        Answer::Success(_)
    ));
    client.send_channel_data(0x4000, b"v6").await;
    let (data, _) = recv_from(&peer).await;
    assert_eq!(data, b"v6");
    // Without the attribute RFC 6156 means IPv4, which this relay does not have: 440.
    let sock = UdpSocket::bind("[::1]:0").await.unwrap();
    let mut v4 = RawClient::from_socket(sock, server, "quinn");
    assert_eq!(v4.allocate().await, Err(440));
    relay.shutdown().await;
}

#[tokio::test]
async fn lifetimes_are_clamped_per_rfc_8656() {
    use turn::proto::lifetime::Lifetime;
    let relay = start(test_settings(), None).await;
    for (asked, granted) in [(30u64, 600u64), (86_400, 3599), (1200, 1200)] {
        let mut client = RawClient::udp(relay.udp_addrs()[0], "rita").await;
        client.learn_nonce().await;
        let attrs: Vec<Box<dyn Setter>> = vec![
            Box::new(udp_transport()),
            Box::new(Lifetime(Duration::from_secs(asked))),
        ];
        let Answer::Success(m) = client
            .transact(stun::message::METHOD_ALLOCATE, attrs, true)
            .await
        else {
            panic!("allocate with lifetime {asked} failed")
        };
        let mut lifetime = Lifetime::default();
        stun::message::Getter::get_from(&mut lifetime, &m).unwrap();
        assert_eq!(lifetime.0.as_secs(), granted, "asked {asked}");
        let refreshed = client.refresh(Duration::from_secs(5)).await;
        let Answer::Success(m) = refreshed else {
            panic!("refresh failed: {refreshed:?}")
        };
        stun::message::Getter::get_from(&mut lifetime, &m).unwrap();
        assert_eq!(
            lifetime.0.as_secs(),
            600,
            "refresh below the default gets the default"
        );
    }
    relay.shutdown().await;
}

#[tokio::test]
async fn start_errors_say_what_to_fix() {
    let taken = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut settings = test_settings();
    settings.udp_port = Some(taken.local_addr().unwrap().port());
    let err = try_start(settings, None).await.err().expect("port in use");
    let msg = err.to_string();
    assert!(
        msg.starts_with("could not bind the TURN UDP listener on 127.0.0.1:"),
        "{msg}"
    );

    let mut settings = test_settings();
    settings.listening_ips = vec!["0.0.0.0".parse().unwrap()];
    let err = try_start(settings, None)
        .await
        .err()
        .expect("unspecified relay address");
    assert!(
        err.to_string().contains("set relay-ip (or external-ip)"),
        "{err}"
    );

    let mut settings = test_settings();
    settings.auth_secrets.clear();
    let err = try_start(settings, None).await.err().expect("no secret");
    assert!(err.to_string().contains("auth secret"), "{err}");
}

#[tokio::test]
async fn the_server_shutdown_stops_the_relay_and_waits_for_it() {
    let controller = callgate::shutdown::ShutdownController::new();
    let relay = callgate::turn::Relay::start(test_settings(), None, controller.handle())
        .await
        .unwrap();
    let udp = relay.udp_addrs()[0];
    let tcp = relay.tcp_addrs()[0];
    let mut client = RawClient::udp(udp, "sam").await;
    client.allocate().await.unwrap();
    let mut stream_client = RawClient::tcp(tcp, "sam-tcp").await;
    stream_client.allocate().await.unwrap();
    // The relay handle is not what keeps it alive: the server's shutdown is.
    drop(relay);
    controller.trigger();
    tokio::time::timeout(WAIT, controller.drained())
        .await
        .expect("the drain includes the relay and ends once it stopped");
    // Drained means stopped: every listener is closed by then, no retry needed.
    UdpSocket::bind(udp).await.expect("UDP port free");
    tokio::net::TcpListener::bind(tcp)
        .await
        .expect("TCP port free");
}

#[tokio::test]
async fn dropping_the_shutdown_controller_stops_the_relay() {
    let relay = start(test_settings(), None).await;
    let udp = relay.udp_addrs()[0];
    let mut client = RawClient::udp(udp, "tina").await;
    client.allocate().await.unwrap();
    drop(relay);
    // The engine's loops notice the dropped controller on their next poll; nothing to await
    // from outside, so retry the bind for a bounded time.
    let deadline = tokio::time::Instant::now() + WAIT;
    while UdpSocket::bind(udp).await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "UDP port still bound"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn permissions_per_allocation_are_capped() {
    let mut settings = test_settings();
    settings.max_permissions_per_allocation = 2;
    let relay = start(settings, None).await;
    let mut client = RawClient::udp(relay.udp_addrs()[0], "uma").await;
    client.allocate().await.unwrap();
    let (_peer, loopback_peer) = peer_socket().await;
    // Permissions only; nothing is sent to the public addresses.
    assert_eq!(client.create_permission(loopback_peer).await.code(), None);
    assert_eq!(
        client
            .create_permission("192.0.2.1:9".parse().unwrap())
            .await
            .code(),
        None
    );
    assert_eq!(
        client.channel_bind(0x4000, loopback_peer).await.code(),
        None,
        "an existing peer IP does not count again"
    );
    assert_eq!(
        client
            .create_permission("198.51.100.1:9".parse().unwrap())
            .await
            .code(),
        Some(508)
    );
    relay.shutdown().await;
}

#[tokio::test]
async fn channel_data_larger_than_the_engine_buffer_is_relayed_both_ways() {
    let relay = start(test_settings(), None).await;
    let mut client = RawClient::udp(relay.udp_addrs()[0], "vera").await;
    client.allocate().await.unwrap();
    jumbo_round_trip(&mut client).await;
    let s = relay.stats().snapshot();
    assert_eq!(s.oversized_dropped, 0, "{s:?}");
    // On a channel that is not bound, an oversized datagram is dropped and counted.
    client.send_channel_data(0x4ffe, &[0u8; 3000]).await;
    client.binding().await; // the relay has handled the packet before this answer
    assert_eq!(relay.stats().snapshot().oversized_dropped, 1);
    assert!(
        s.bytes_to_peers >= 4001 && s.bytes_to_clients >= 9003,
        "{s:?}"
    );
    relay.shutdown().await;
}

#[tokio::test]
async fn dual_stack_relay_gives_each_family_its_relay_address() {
    let mut settings = test_settings();
    settings.relay_ipv6 = Some("::1".parse().unwrap());
    settings.allowed_peer_ips.push("::1/128".parse().unwrap());
    let relay = start(settings, None).await;
    let server = relay.udp_addrs()[0];

    let mut v6 = RawClient::udp(server, "xena").await;
    let relayed = v6.allocate_with(vec![Box::new(WantIpv6)]).await.unwrap();
    assert_eq!(
        relayed.ip().to_string(),
        "::1",
        "IPv6 relay over an IPv4 listener"
    );
    let peer = UdpSocket::bind("[::1]:0").await.unwrap();
    let peer_addr = peer.local_addr().unwrap();
    assert!(matches!(
        v6.channel_bind(0x4000, peer_addr).await,
        Answer::Success(_)
    ));
    v6.send_channel_data(0x4000, b"over v6").await;
    let (data, from) = recv_from(&peer).await;
    assert_eq!(data, b"over v6");
    assert_eq!(from.port(), relayed.port());
    peer.send_to(b"back", from).await.unwrap();
    assert_eq!(v6.recv_channel_data().await, (0x4000, b"back".to_vec()));

    let mut v4 = RawClient::udp(server, "xena").await;
    let relayed = v4.allocate().await.unwrap();
    assert_eq!(relayed.ip().to_string(), "127.0.0.1");
    relay.shutdown().await;
}
