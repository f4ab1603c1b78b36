//! A deliberately small TURN client built on the `stun` and `turn::proto` crates (not on callgate's
//! own encoder), so the relay's answers are checked by an independent implementation. Included by
//! the `turn_*` integration tests with `#[path]`; compiled alone it has no tests.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use callgate::shutdown::ShutdownController;
use callgate::turn::{Relay, RunningRelay, TlsAcceptorSource, TurnCredentials, TurnSettings};
use stun::agent::TransactionId;
use stun::attributes::*;
use stun::error_code::ErrorCodeAttribute;
use stun::integrity::MessageIntegrity;
use stun::message::*;
use stun::textattrs::{Nonce, Realm, Username};
use stun::xoraddr::XorMappedAddress;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use turn::proto::channum::ChannelNumber;
use turn::proto::lifetime::Lifetime;
use turn::proto::peeraddr::PeerAddress;
use turn::proto::relayaddr::RelayedAddress;
use turn::proto::reqtrans::RequestedTransport;
use turn::proto::PROTO_UDP;

pub const SECRET: &str = "integration-secret";
pub const REALM: &str = "callgate";
pub const WAIT: Duration = Duration::from_secs(5);

/// Settings for a relay on loopback with ephemeral ports, allowing the loopback peer explicitly.
pub fn test_settings() -> TurnSettings {
    TurnSettings {
        listening_ips: vec!["127.0.0.1".parse().unwrap()],
        udp_port: Some(0),
        tcp_port: Some(0),
        tls_port: Some(0),
        udp_sockets: 2,
        auth_secrets: vec![SECRET.into()],
        allowed_peer_ips: vec!["127.0.0.1/32".parse().unwrap()],
        ..TurnSettings::default()
    }
}

/// A relay and the shutdown controller it stops with, as the server owns them. Dropping it drops
/// the controller, which also stops the relay (without waiting).
pub struct TestRelay {
    relay: RunningRelay,
    controller: ShutdownController,
}

impl std::ops::Deref for TestRelay {
    type Target = RunningRelay;
    fn deref(&self) -> &RunningRelay {
        &self.relay
    }
}

impl TestRelay {
    /// Fires the shutdown and waits, as the server does, until the relay has let go of it.
    pub async fn shutdown(self) {
        self.controller.trigger();
        tokio::time::timeout(WAIT, self.controller.drained())
            .await
            .expect("the relay stops within 5 s of shutdown");
    }
}

/// Starts a relay with its own shutdown controller.
pub async fn try_start(
    settings: TurnSettings,
    tls: Option<TlsAcceptorSource>,
) -> Result<TestRelay, callgate::turn::TurnError> {
    let controller = ShutdownController::new();
    let relay = Relay::start(settings, tls, controller.handle()).await?;
    Ok(TestRelay { relay, controller })
}

pub async fn start(settings: TurnSettings, tls: Option<TlsAcceptorSource>) -> TestRelay {
    try_start(settings, tls).await.expect("relay starts")
}

pub fn credentials(user: &str) -> (String, String) {
    let c = TurnCredentials::new(&[SECRET]).unwrap().issue(
        user,
        SystemTime::now(),
        Duration::from_secs(600),
    );
    (c.username, c.password)
}

enum Link {
    Udp(UdpSocket, SocketAddr),
    Stream(
        Box<dyn AsyncRead + Unpin + Send>,
        Box<dyn AsyncWrite + Unpin + Send>,
    ),
}

/// What the relay answered.
#[derive(Debug)]
pub enum Answer {
    Success(Message),
    Error(u16, Message),
}

impl Answer {
    pub fn code(&self) -> Option<u16> {
        match self {
            Answer::Success(_) => None,
            Answer::Error(c, _) => Some(*c),
        }
    }
}

pub struct RawClient {
    link: Link,
    pub username: String,
    pub password: String,
    pub realm: String,
    pub nonce: String,
    /// Frames received that were not the awaited response (ChannelData, Data indications).
    pub backlog: Vec<Vec<u8>>,
}

impl RawClient {
    pub async fn udp(server: SocketAddr, user: &str) -> Self {
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        Self::with_link(Link::Udp(sock, server), user)
    }

    pub fn from_socket(sock: UdpSocket, server: SocketAddr, user: &str) -> Self {
        Self::with_link(Link::Udp(sock, server), user)
    }

    pub async fn tcp(server: SocketAddr, user: &str) -> Self {
        let s = TcpStream::connect(server).await.unwrap();
        let (r, w) = s.into_split();
        Self::with_link(Link::Stream(Box::new(r), Box::new(w)), user)
    }

    pub fn stream<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(s: S, user: &str) -> Self {
        let (r, w) = tokio::io::split(s);
        Self::with_link(Link::Stream(Box::new(r), Box::new(w)), user)
    }

    fn with_link(link: Link, user: &str) -> Self {
        let (username, password) = credentials(user);
        RawClient {
            link,
            username,
            password,
            realm: String::new(),
            nonce: String::new(),
            backlog: Vec::new(),
        }
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        match &mut self.link {
            Link::Udp(s, server) => {
                s.send_to(bytes, *server).await.unwrap();
            }
            Link::Stream(_, w) => {
                let mut v = bytes.to_vec();
                if bytes[0] >> 6 == 1 {
                    v.resize(bytes.len().next_multiple_of(4), 0);
                }
                w.write_all(&v).await.unwrap();
                // Over TLS an unflushed write can stay in the client (see `common::Ws::send`).
                w.flush().await.unwrap();
            }
        }
    }

    /// Next datagram or frame (ChannelData returned without stream padding).
    pub async fn recv_raw(&mut self) -> Vec<u8> {
        match &mut self.link {
            Link::Udp(s, _) => {
                let mut buf = vec![0u8; 65536];
                let (n, _) = tokio::time::timeout(WAIT, s.recv_from(&mut buf))
                    .await
                    .expect("a datagram from the relay")
                    .unwrap();
                buf.truncate(n);
                buf
            }
            Link::Stream(r, _) => {
                let mut h = [0u8; 4];
                tokio::time::timeout(WAIT, r.read_exact(&mut h))
                    .await
                    .expect("a frame from the relay")
                    .unwrap();
                let len = u16::from_be_bytes([h[2], h[3]]) as usize;
                let (keep, wire) = if h[0] >> 6 == 1 {
                    (4 + len, (4 + len).next_multiple_of(4))
                } else {
                    (20 + len, 20 + len)
                };
                let mut v = vec![0u8; wire];
                v[..4].copy_from_slice(&h);
                r.read_exact(&mut v[4..]).await.unwrap();
                v.truncate(keep);
                v
            }
        }
    }

    /// A request with a new transaction ID, signed with the client's credentials if `sign`.
    pub fn request(&self, method: Method, attrs: Vec<Box<dyn Setter>>, sign: bool) -> Message {
        let mut setters: Vec<Box<dyn Setter>> = vec![
            Box::new(TransactionId::new()),
            Box::new(MessageType::new(method, CLASS_REQUEST)),
        ];
        setters.extend(attrs);
        if sign {
            setters.push(Box::new(Username::new(
                ATTR_USERNAME,
                self.username.clone(),
            )));
            setters.push(Box::new(Realm::new(ATTR_REALM, self.realm.clone())));
            setters.push(Box::new(Nonce::new(ATTR_NONCE, self.nonce.clone())));
            setters.push(Box::new(MessageIntegrity::new_long_term_integrity(
                self.username.clone(),
                self.realm.clone(),
                self.password.clone(),
            )));
        }
        let mut m = Message::new();
        m.build(&setters).unwrap();
        m
    }

    /// Sends a request and waits for the response with the same transaction ID.
    pub async fn transact(
        &mut self,
        method: Method,
        attrs: Vec<Box<dyn Setter>>,
        sign: bool,
    ) -> Answer {
        let m = self.request(method, attrs, sign);
        self.exchange(&m).await
    }

    /// Sends an already built request (say, one with attributes after MESSAGE-INTEGRITY) and
    /// waits for the response with its transaction ID.
    pub async fn exchange(&mut self, m: &Message) -> Answer {
        let tid = m.transaction_id;
        self.send_raw(&m.raw).await;
        loop {
            let raw = self.recv_raw().await;
            if raw[0] >> 6 != 0 {
                self.backlog.push(raw);
                continue;
            }
            let mut resp = Message::new();
            resp.raw = raw.clone();
            resp.decode().unwrap();
            if resp.transaction_id != tid {
                self.backlog.push(raw);
                continue;
            }
            if resp.typ.class == CLASS_ERROR_RESPONSE {
                let mut code = ErrorCodeAttribute::default();
                code.get_from(&resp).unwrap();
                return Answer::Error(code.code.0, resp);
            }
            return Answer::Success(resp);
        }
    }

    /// Unauthenticated first try, learns realm and nonce from the 401.
    pub async fn learn_nonce(&mut self) {
        let a = self
            .transact(METHOD_ALLOCATE, vec![Box::new(udp_transport())], false)
            .await;
        let Answer::Error(401, m) = a else {
            panic!("expected a 401 challenge, got {a:?}")
        };
        let mut realm = Realm::new(ATTR_REALM, String::new());
        realm.get_from(&m).unwrap();
        let mut nonce = Nonce::new(ATTR_NONCE, String::new());
        nonce.get_from(&m).unwrap();
        self.realm = realm.to_string();
        self.nonce = nonce.to_string();
    }

    /// Full Allocate: returns the relayed address or the error code.
    pub async fn allocate(&mut self) -> Result<SocketAddr, u16> {
        self.allocate_with(vec![]).await
    }

    pub async fn allocate_with(&mut self, extra: Vec<Box<dyn Setter>>) -> Result<SocketAddr, u16> {
        if self.nonce.is_empty() {
            self.learn_nonce().await;
        }
        let mut attrs: Vec<Box<dyn Setter>> = vec![Box::new(udp_transport())];
        attrs.extend(extra);
        match self.transact(METHOD_ALLOCATE, attrs, true).await {
            Answer::Success(m) => {
                MessageIntegrity::new_long_term_integrity(
                    self.username.clone(),
                    self.realm.clone(),
                    self.password.clone(),
                )
                .check(&mut m.clone())
                .expect("success responses are signed");
                Ok(relayed_address(&m))
            }
            Answer::Error(code, _) => Err(code),
        }
    }

    pub async fn create_permission(&mut self, peer: SocketAddr) -> Answer {
        self.transact(
            METHOD_CREATE_PERMISSION,
            vec![Box::new(PeerAddress {
                ip: peer.ip(),
                port: peer.port(),
            })],
            true,
        )
        .await
    }

    pub async fn channel_bind(&mut self, number: u16, peer: SocketAddr) -> Answer {
        self.transact(
            METHOD_CHANNEL_BIND,
            vec![
                Box::new(ChannelNumber(number)),
                Box::new(PeerAddress {
                    ip: peer.ip(),
                    port: peer.port(),
                }),
            ],
            true,
        )
        .await
    }

    pub async fn refresh(&mut self, lifetime: Duration) -> Answer {
        self.transact(METHOD_REFRESH, vec![Box::new(Lifetime(lifetime))], true)
            .await
    }

    pub async fn binding(&mut self) -> SocketAddr {
        let Answer::Success(m) = self.transact(METHOD_BINDING, vec![], false).await else {
            panic!("binding failed")
        };
        let mut xor = XorMappedAddress::default();
        xor.get_from(&m).unwrap();
        SocketAddr::new(xor.ip, xor.port)
    }

    pub async fn send_channel_data(&mut self, number: u16, payload: &[u8]) {
        let mut v = number.to_be_bytes().to_vec();
        v.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        v.extend_from_slice(payload);
        self.send_raw(&v).await;
    }

    /// Waits for the next ChannelData frame; returns (channel, payload).
    pub async fn recv_channel_data(&mut self) -> (u16, Vec<u8>) {
        if let Some(i) = self.backlog.iter().position(|f| f[0] >> 6 == 1) {
            let f = self.backlog.remove(i);
            return split_channel_data(&f);
        }
        loop {
            let f = self.recv_raw().await;
            if f[0] >> 6 == 1 {
                return split_channel_data(&f);
            }
        }
    }
}

fn split_channel_data(f: &[u8]) -> (u16, Vec<u8>) {
    let n = u16::from_be_bytes([f[0], f[1]]);
    let len = u16::from_be_bytes([f[2], f[3]]) as usize;
    (n, f[4..4 + len].to_vec())
}

/// Any attribute with any value, for requests no well-behaved client would send.
pub struct RawAttribute(pub u16, pub Vec<u8>);

impl Setter for RawAttribute {
    fn add_to(&self, m: &mut Message) -> Result<(), stun::Error> {
        m.add(AttrType(self.0), &self.1);
        Ok(())
    }
}

/// The XOR-RELAYED-ADDRESS of an Allocate success.
pub fn relayed_address(success: &Message) -> SocketAddr {
    let mut relayed = RelayedAddress::default();
    relayed.get_from(success).unwrap();
    SocketAddr::new(relayed.ip, relayed.port)
}

pub fn udp_transport() -> RequestedTransport {
    RequestedTransport {
        protocol: PROTO_UDP,
    }
}

/// A plain UDP socket on loopback playing the remote peer.
pub async fn peer_socket() -> (Arc<UdpSocket>, SocketAddr) {
    let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let a = s.local_addr().unwrap();
    (Arc::new(s), a)
}

pub async fn recv_from(s: &UdpSocket) -> (Vec<u8>, SocketAddr) {
    let mut buf = vec![0u8; 65536];
    let (n, from) = tokio::time::timeout(WAIT, s.recv_from(&mut buf))
        .await
        .expect("a datagram")
        .unwrap();
    buf.truncate(n);
    (buf, from)
}

/// Channel bind, then data both ways between this client and a plain UDP peer.
pub async fn channel_round_trip(client: &mut RawClient, relayed: SocketAddr) {
    let (peer, peer_addr) = peer_socket().await;
    let a = client.channel_bind(0x4000, peer_addr).await;
    assert!(matches!(a, Answer::Success(_)), "channel bind: {a:?}");
    // Odd length so stream padding is exercised.
    client.send_channel_data(0x4000, b"hello peer").await;
    let (payload, from) = recv_from(&peer).await;
    assert_eq!(payload, b"hello peer");
    assert_eq!(
        from.port(),
        relayed.port(),
        "relayed from the allocation's socket"
    );
    peer.send_to(b"hello client!", from).await.unwrap();
    let (number, payload) = client.recv_channel_data().await;
    assert_eq!(number, 0x4000);
    assert_eq!(payload, b"hello client!");
}

/// ChannelData larger than the engine's 1500-byte buffers, both ways, then a small one.
pub async fn jumbo_round_trip(client: &mut RawClient) {
    let (peer, peer_addr) = peer_socket().await;
    let a = client.channel_bind(0x4001, peer_addr).await;
    assert!(matches!(a, Answer::Success(_)), "channel bind: {a:?}");
    let big: Vec<u8> = (0..4001u32).map(|i| i as u8).collect();
    client.send_channel_data(0x4001, &big).await;
    let (payload, from) = recv_from(&peer).await;
    assert_eq!(payload, big, "client → peer, 4001 bytes");
    let bigger: Vec<u8> = (0..9003u32).map(|i| (i * 7) as u8).collect();
    peer.send_to(&bigger, from).await.unwrap();
    let (number, payload) = client.recv_channel_data().await;
    assert_eq!(number, 0x4001);
    assert_eq!(payload, bigger, "peer → client, 9003 bytes");
    peer.send_to(b"small", from).await.unwrap();
    let (_, payload) = client.recv_channel_data().await;
    assert_eq!(payload, b"small");
}
