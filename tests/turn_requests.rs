//! What one client may make the relay do, over real sockets to the real relay (issue 11).
//!
//! One reading of every request: what the engine acts on is what the gate checked. The first
//! tests send a request the `turn` engine would read differently from the gate (finding 1) and
//! expect 400 — before the fix each of these was granted. Then per-source limits (finding 3).

#[path = "support/turn_rawclient.rs"]
mod raw;

use std::net::SocketAddr;

use raw::*;
use stun::message::{Setter, METHOD_CREATE_PERMISSION, METHOD_REFRESH};
use turn::proto::lifetime::Lifetime;
use turn::proto::peeraddr::PeerAddress;

/// XOR-PEER-ADDRESS.
const XOR_PEER_ADDRESS: u16 = 0x0012;

fn peer_attr(peer: SocketAddr) -> PeerAddress {
    PeerAddress {
        ip: peer.ip(),
        port: peer.port(),
    }
}

/// Settings with the default peer policy (loopback refused).
fn default_policy() -> callgate::turn::TurnSettings {
    let mut settings = test_settings();
    settings.allowed_peer_ips.clear();
    settings
}

/// A client of `relay` holding an allocation.
async fn allocated(relay: &callgate::turn::RunningRelay, user: &str) -> RawClient {
    let mut client = RawClient::udp(relay.udp_addrs()[0], user).await;
    client.allocate().await.unwrap();
    client
}

#[tokio::test]
async fn a_refused_peer_after_message_integrity_gets_400_not_a_permission() {
    let relay = start(default_policy(), None).await;
    let mut client = allocated(&relay, "mia").await;
    let loopback: SocketAddr = "127.0.0.1:9".parse().unwrap();
    assert_eq!(client.create_permission(loopback).await.code(), Some(403));
    // The same peer placed after MESSAGE-INTEGRITY, where the gate used not to look.
    let mut m = client.request(METHOD_CREATE_PERMISSION, vec![], true);
    peer_attr(loopback).add_to(&mut m).unwrap();
    assert_eq!(client.exchange(&m).await.code(), Some(400));
    // And after an allowed one before it.
    let mut m = client.request(
        METHOD_CREATE_PERMISSION,
        vec![Box::new(peer_attr("192.0.2.1:9".parse().unwrap()))],
        true,
    );
    peer_attr(loopback).add_to(&mut m).unwrap();
    assert_eq!(client.exchange(&m).await.code(), Some(400));
    assert_eq!(relay.stats().snapshot().ambiguous_requests, 2);
    relay.shutdown().await;
}

#[tokio::test]
async fn a_truncated_peer_address_gets_400() {
    let relay = start(default_policy(), None).await;
    let mut client = allocated(&relay, "tia").await;
    for len in 5..=7 {
        // Family 1, port 9, then 1–3 bytes of 127.x: the engine zero-filled the rest.
        let mut value = vec![0, 1, 0x21, 0x12 ^ 9, 0x7f ^ 0x21, 0x12, 0xa4];
        value.truncate(len);
        let a = client
            .transact(
                METHOD_CREATE_PERMISSION,
                vec![Box::new(RawAttribute(XOR_PEER_ADDRESS, value))],
                true,
            )
            .await;
        assert_eq!(a.code(), Some(400), "{len} bytes");
    }
    relay.shutdown().await;
}

#[tokio::test]
async fn peers_after_message_integrity_cannot_grow_permissions_past_the_cap() {
    let relay = start(default_policy(), None).await;
    let mut client = allocated(&relay, "flo").await;
    // The default cap: 64 distinct peer IPs per allocation.
    for i in 0..64u8 {
        let peer: SocketAddr = SocketAddr::from(([192, 0, 2, i], 9));
        assert_eq!(client.create_permission(peer).await.code(), None, "{peer}");
    }
    let next: SocketAddr = "198.51.100.1:9".parse().unwrap();
    assert_eq!(client.create_permission(next).await.code(), Some(508));
    for i in 0..50u8 {
        let mut m = client.request(METHOD_CREATE_PERMISSION, vec![], true);
        peer_attr(SocketAddr::from(([198, 51, 100, i], 9)))
            .add_to(&mut m)
            .unwrap();
        assert_eq!(client.exchange(&m).await.code(), Some(400), "peer {i}");
    }
    relay.shutdown().await;
}

#[tokio::test]
async fn create_permission_without_a_peer_gets_400() {
    let relay = start(default_policy(), None).await;
    let mut client = allocated(&relay, "nia").await;
    let a = client
        .transact(METHOD_CREATE_PERMISSION, vec![], true)
        .await;
    assert_eq!(a.code(), Some(400));
    relay.shutdown().await;
}

#[tokio::test]
async fn two_lifetimes_in_a_refresh_get_400() {
    let relay = start(default_policy(), None).await;
    let mut client = allocated(&relay, "lia").await;
    let a = client
        .transact(
            METHOD_REFRESH,
            vec![
                Box::new(Lifetime(std::time::Duration::from_secs(0))),
                Box::new(Lifetime(std::time::Duration::from_secs(600))),
            ],
            true,
        )
        .await;
    assert_eq!(a.code(), Some(400));
    // The allocation is still there: a plain refresh succeeds.
    assert_eq!(
        client
            .refresh(std::time::Duration::from_secs(600))
            .await
            .code(),
        None
    );
    relay.shutdown().await;
}

#[tokio::test]
async fn one_address_cannot_hold_more_than_allocations_per_ip() {
    let mut settings = test_settings();
    settings.allocations_per_ip = Some(3);
    let relay = start(settings, None).await;
    let server = relay.udp_addrs()[0];
    // Anonymous WebSocket clients each get their own user: four users, one address.
    let mut clients = Vec::new();
    for user in ["a1", "a2", "a3"] {
        let mut c = RawClient::udp(server, user).await;
        c.allocate().await.unwrap();
        clients.push(c);
    }
    let mut fourth = RawClient::udp(server, "a4").await;
    assert_eq!(fourth.allocate().await, Err(486));
    assert_eq!(relay.stats().snapshot().quota_hits_ip, 1);
    // A released allocation frees the address's slot.
    assert_eq!(
        clients[0].refresh(std::time::Duration::ZERO).await.code(),
        None
    );
    let mut fifth = RawClient::udp(server, "a5").await;
    let mut freed = false;
    for _ in 0..50 {
        if fifth.allocate().await.is_ok() {
            freed = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(
        freed,
        "the slot is freed once the engine closes the allocation"
    );
    relay.shutdown().await;
}

#[tokio::test]
async fn the_relays_own_listeners_are_refused_as_peers_even_where_allowed() {
    // test_settings allows 127.0.0.1, where the relay itself listens.
    let relay = start(test_settings(), None).await;
    let mut client = RawClient::udp(relay.udp_addrs()[0], "own").await;
    client.allocate().await.unwrap();
    let listeners: Vec<SocketAddr> = relay
        .udp_addrs()
        .iter()
        .chain(relay.tcp_addrs())
        .copied()
        .collect();
    for listener in listeners {
        assert_eq!(
            client.create_permission(listener).await.code(),
            Some(403),
            "{listener}"
        );
        assert_eq!(
            client.channel_bind(0x4005, listener).await.code(),
            Some(403),
            "{listener}"
        );
    }
    // Another socket on the allowed loopback address still works.
    let mut other = RawClient::udp(relay.udp_addrs()[0], "own2").await;
    let relayed = other.allocate().await.unwrap();
    channel_round_trip(&mut other, relayed).await;
    relay.shutdown().await;
}

#[tokio::test]
async fn two_relayed_callers_exchange_data_through_one_relay_with_the_default_policy() {
    // No allowed-peer-ip: 127.0.0.1 (the relay's own address, and loopback) is refused, except
    // where it is a live relayed address of this relay.
    let mut settings = test_settings();
    settings.allowed_peer_ips.clear();
    let relay = start(settings, None).await;
    let server = relay.udp_addrs()[0];
    let mut alice = RawClient::udp(server, "alice").await;
    let mut bob = RawClient::udp(server, "bob").await;
    let alice_relayed = alice.allocate().await.unwrap();
    let bob_relayed = bob.allocate().await.unwrap();
    assert_eq!(alice.channel_bind(0x4000, bob_relayed).await.code(), None);
    assert_eq!(bob.channel_bind(0x4001, alice_relayed).await.code(), None);
    alice.send_channel_data(0x4000, b"hi bob").await;
    assert_eq!(bob.recv_channel_data().await, (0x4001, b"hi bob".to_vec()));
    bob.send_channel_data(0x4001, b"hi alice").await;
    assert_eq!(
        alice.recv_channel_data().await,
        (0x4000, b"hi alice".to_vec())
    );

    // The permission for 127.0.0.1 does not open the relay's listener: a Send indication there
    // is dropped at the relay socket and counted.
    let refused = relay.stats().snapshot().refused_peers;
    let mut send = stun::message::Message::new();
    send.build(&[
        Box::new(stun::agent::TransactionId::new()),
        Box::new(stun::message::MessageType::new(
            stun::message::METHOD_SEND,
            stun::message::CLASS_INDICATION,
        )),
        Box::new(peer_attr(server)),
        Box::new(turn::proto::data::Data(b"to the listener".to_vec())),
    ])
    .unwrap();
    alice.send_raw(&send.raw).await;
    // The relay handles one client's packets in order: once the next request is answered, the
    // Send indication has been processed.
    assert_eq!(
        alice
            .refresh(std::time::Duration::from_secs(600))
            .await
            .code(),
        None
    );
    assert_eq!(relay.stats().snapshot().refused_peers, refused + 1);
    // A relayed address that is no longer live is refused again.
    assert_eq!(bob.refresh(std::time::Duration::ZERO).await.code(), None);
    let mut refused_later = false;
    for _ in 0..50 {
        if alice.create_permission(bob_relayed).await.code() == Some(403) {
            refused_later = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(refused_later, "bob's relayed address is closed");
    relay.shutdown().await;
}
