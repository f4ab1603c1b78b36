//! STUN/ChannelData inspection (`turn::inspect`) on arbitrary datagrams.
//!
//! Checked: no panic in `inspect` or any accessor; ChannelData lengths stay inside the datagram;
//! a request rewritten and re-signed by the front layer parses again, keeps its method, class and
//! transaction ID, passes its own integrity check and carries no stripped attribute; every decoded
//! peer address encodes back to the bytes it came from.

#![no_main]

use callgate::turn::inspect::{
    self, attr, decode_xor_address, encode_xor_address, integrity_key, Packet, StunMessage,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|datagram: &[u8]| {
    let key = integrity_key(b"0123456789abcdef");
    match inspect::inspect(datagram) {
        Ok(Packet::ChannelData { number, len }) => {
            assert!((0x4000..=0x7fff).contains(&number));
            assert!(4 + len <= datagram.len());
        }
        Ok(Packet::Stun(m)) => {
            assert_eq!(m.raw(), datagram);
            let _ = (m.username(), m.realm(), m.nonce(), m.reservation_token());
            let _ = (
                m.has_integrity(),
                m.integrity_matches(&key),
                m.ambiguity(),
            );
            for typ in [
                attr::XOR_PEER_ADDRESS,
                attr::LIFETIME,
                attr::FINGERPRINT,
                0xffff,
            ] {
                let _ = m.attribute(typ);
            }
            assert!(m.peer_count() <= inspect::MAX_PEERS);
            let tid = m.transaction_id();
            for peer in m.peers() {
                let encoded = encode_xor_address(peer, &tid);
                assert_eq!(decode_xor_address(&encoded, &tid), Some(peer));
            }
            let strip = [attr::DONT_FRAGMENT];
            let rewritten =
                inspect::rewrite(&m, &strip, Some((attr::LIFETIME, [0, 0, 2, 88])), &key);
            let again = StunMessage::parse(&rewritten).expect("a rewritten request parses");
            assert_eq!(
                (again.method, again.class, again.transaction_id()),
                (m.method, m.class, tid)
            );
            assert!(
                again.integrity_matches(&key),
                "a re-signed request fails its own check"
            );
            assert!(!again.dont_fragment, "a stripped attribute survived");
            assert_eq!(again.attribute(attr::LIFETIME), Some(&[0, 0, 2, 88][..]));
        }
        Err(_) => {}
    }
});
