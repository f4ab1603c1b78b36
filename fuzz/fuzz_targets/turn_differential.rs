//! Differential: the gate's reading of a STUN message against the engine's.
//!
//! The relay's front layer (`callgate::turn::inspect`) decides on a request; the `turn` engine then
//! acts on it through the `stun` crate (`Message::unmarshal_binary` and the attribute getters, which
//! read the first attribute of a type anywhere). For every message the gate would hand to the engine
//! — a request or a Send indication that parses and is not [`Ambiguity`]-flagged — both must agree on
//! method, class, transaction, USERNAME/REALM/NONCE, every XOR-PEER-ADDRESS, LIFETIME,
//! REQUESTED-TRANSPORT, REQUESTED-ADDRESS-FAMILY, CHANNEL-NUMBER, RESERVATION-TOKEN, EVEN-PORT,
//! DONT-FRAGMENT, DATA, and the bytes MESSAGE-INTEGRITY covers (the message is re-signed at the
//! gate's integrity offset and both must accept the signature).
//!
//! [`Ambiguity`]: callgate::turn::inspect::Ambiguity

#![no_main]

use std::net::SocketAddr;

use callgate::turn::inspect::{self, method, Class, Packet, StunWriter, HEADER_LEN};
use libfuzzer_sys::fuzz_target;
use stun::attributes::{AttrType, ATTR_DONT_FRAGMENT, ATTR_MESSAGE_INTEGRITY, ATTR_NONCE, ATTR_REALM, ATTR_USERNAME};
use stun::integrity::MessageIntegrity;
use stun::message::{
    Getter, Message, CLASS_ERROR_RESPONSE, CLASS_INDICATION, CLASS_REQUEST,
    CLASS_SUCCESS_RESPONSE, METHOD_ALLOCATE, METHOD_BINDING, METHOD_CHANNEL_BIND,
    METHOD_CREATE_PERMISSION, METHOD_REFRESH, METHOD_SEND,
};
use stun::textattrs::TextAttribute;
use turn::proto::channum::ChannelNumber;
use turn::proto::data::Data;
use turn::proto::evenport::EvenPort;
use turn::proto::lifetime::Lifetime;
use turn::proto::peeraddr::PeerAddress;
use turn::proto::reqfamily::RequestedAddressFamily;
use turn::proto::reqtrans::RequestedTransport;
use turn::proto::rsrvtoken::ReservationToken;

const KEY: &[u8] = b"0123456789abcdef";

fuzz_target!(|datagram: &[u8]| {
    let Ok(Packet::Stun(gate)) = inspect::inspect(datagram) else {
        return;
    };
    let forwarded = match gate.class {
        Class::Request => true,
        Class::Indication => gate.method == method::SEND,
        _ => false,
    };
    if !forwarded || gate.ambiguity().is_some() {
        return;
    }
    let mut engine = Message::new();
    engine
        .unmarshal_binary(datagram)
        .expect("the engine decodes every message the gate forwards");

    // Header.
    // The same message type: the gate's method and class written back give the engine's type.
    let ours = StunWriter::new(gate.method, gate.class, gate.transaction_id()).finish();
    assert_eq!(engine.typ.value(), u16::from_be_bytes([ours[0], ours[1]]), "type");
    for (theirs, ours) in [
        (METHOD_BINDING, method::BINDING),
        (METHOD_ALLOCATE, method::ALLOCATE),
        (METHOD_REFRESH, method::REFRESH),
        (METHOD_SEND, method::SEND),
        (METHOD_CREATE_PERMISSION, method::CREATE_PERMISSION),
        (METHOD_CHANNEL_BIND, method::CHANNEL_BIND),
    ] {
        assert_eq!(engine.typ.method == theirs, gate.method == ours, "method {theirs}");
    }
    let class = match gate.class {
        Class::Request => CLASS_REQUEST,
        Class::Indication => CLASS_INDICATION,
        Class::Success => CLASS_SUCCESS_RESPONSE,
        Class::Error => CLASS_ERROR_RESPONSE,
    };
    assert_eq!(engine.typ.class, class, "class");
    assert_eq!(engine.transaction_id.0, gate.transaction_id(), "transaction");

    // Text attributes (the gate reads non-UTF-8 as absent; the engine fails on it).
    for (typ, ours) in [
        (ATTR_USERNAME, gate.username()),
        (ATTR_REALM, gate.realm()),
        (ATTR_NONCE, gate.nonce()),
    ] {
        let theirs = TextAttribute::get_from_as(&engine, typ).ok().map(|t| t.text);
        assert_eq!(ours.map(str::to_owned), theirs, "{typ}");
    }

    // Peers: the engine grants its first one (once per XOR-PEER-ADDRESS), and reads it for
    // ChannelBind and Send; the gate checked all of them.
    let peers: Vec<SocketAddr> = gate.peers().collect();
    assert_eq!(peers.len(), gate.peer_count());
    let engine_peers: Vec<&stun::attributes::RawAttribute> = engine
        .attributes
        .0
        .iter()
        .filter(|a| a.typ == AttrType(0x0012))
        .collect();
    assert_eq!(engine_peers.len(), peers.len(), "number of peers");
    let mut first = PeerAddress::default();
    match (first.get_from(&engine), peers.first()) {
        (Ok(()), Some(p)) => assert_eq!(SocketAddr::new(first.ip, first.port), *p, "first peer"),
        (Err(_), None) => {}
        (e, p) => panic!("first peer: engine {e:?}, gate {p:?}"),
    }
    // Every peer, read alone by the engine's getter, is the address the gate checked.
    for (raw, ours) in engine_peers.iter().zip(&peers) {
        let mut alone = Message::new();
        alone.transaction_id = engine.transaction_id;
        alone.write_header();
        alone.add(raw.typ, &raw.value);
        let mut p = PeerAddress::default();
        p.get_from(&alone).expect("the engine reads a peer the gate decoded");
        assert_eq!(SocketAddr::new(p.ip, p.port), *ours, "peer");
    }

    // Fixed-size attributes.
    let mut lifetime = Lifetime::default();
    let theirs = lifetime.get_from(&engine).ok().map(|()| lifetime.0.as_secs());
    assert_eq!(gate.lifetime().map(u64::from), theirs, "LIFETIME");

    let mut transport = RequestedTransport::default();
    let theirs = transport.get_from(&engine).ok().map(|()| transport.protocol.0);
    assert_eq!(gate.requested_transport(), theirs, "REQUESTED-TRANSPORT");

    let mut family = RequestedAddressFamily::default();
    match (family.get_from(&engine), gate.requested_family()) {
        (Ok(()), Some(f)) => assert_eq!(family.0, f, "REQUESTED-ADDRESS-FAMILY"),
        (Err(stun::Error::ErrAttributeNotFound), None) => {}
        // The engine answers 440 for families other than 1 and 2; so does the gate.
        (Err(stun::Error::Other(_)), Some(f)) => assert!(f != 1 && f != 2),
        (e, f) => panic!("REQUESTED-ADDRESS-FAMILY: engine {e:?}, gate {f:?}"),
    }

    let mut channel = ChannelNumber::default();
    let theirs = channel.get_from(&engine).ok().map(|()| channel.0);
    assert_eq!(gate.channel_number(), theirs, "CHANNEL-NUMBER");

    let mut token = ReservationToken::default();
    let theirs = token.get_from(&engine).ok().map(|()| token.0.clone());
    let ours = gate.reservation_token().map(|t| t.expect("indexed tokens are 8 bytes").to_vec());
    assert_eq!(ours, theirs, "RESERVATION-TOKEN");

    let mut even = EvenPort::default();
    assert_eq!(gate.has_even_port(), even.get_from(&engine).is_ok(), "EVEN-PORT");
    assert_eq!(gate.dont_fragment, engine.contains(ATTR_DONT_FRAGMENT), "DONT-FRAGMENT");

    let mut data = Data::default();
    let theirs = data.get_from(&engine).ok().map(|()| data.0.clone());
    assert_eq!(gate.data().map(<[u8]>::to_vec), theirs, "DATA");

    // MESSAGE-INTEGRITY: the same attribute, over the same bytes.
    assert_eq!(gate.has_integrity(), engine.contains(ATTR_MESSAGE_INTEGRITY), "MI present");
    if let Some(at) = gate.integrity_offset() {
        let mut signed = datagram.to_vec();
        let mut header = [0u8; HEADER_LEN];
        header.copy_from_slice(&signed[..HEADER_LEN]);
        header[2..4].copy_from_slice(&((at - HEADER_LEN + 24) as u16).to_be_bytes());
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, KEY);
        let mut ctx = ring::hmac::Context::with_key(&key);
        ctx.update(&header);
        ctx.update(&signed[HEADER_LEN..at]);
        signed[at + 4..at + 24].copy_from_slice(ctx.sign().as_ref());

        let ours = inspect::StunMessage::parse(&signed).expect("still parses");
        assert!(ours.integrity_matches(&inspect::integrity_key(KEY)), "gate MI");
        let mut theirs = Message::new();
        theirs.unmarshal_binary(&signed).expect("still decodes");
        MessageIntegrity(KEY.to_vec())
            .check(&mut theirs)
            .expect("the engine accepts the MI the gate accepts");
    }
});
