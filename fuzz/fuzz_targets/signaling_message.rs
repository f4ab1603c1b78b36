//! The signaling protocol parser (`signaling::protocol::parse`) on arbitrary UTF-8 text frames
//! (the session closes with 1007 on anything else before parsing).
//!
//! Checked: no panic; the cheap pre-pass (`check_shape`) agrees with serde_json about nesting —
//! a frame serde reads as deeper than the limit is refused as too deep, and a frame within the
//! limit is never refused as too deep.

#![no_main]

use std::fmt;

use callgate::signaling::protocol::{check_shape, parse, ProtocolError};
use libfuzzer_sys::fuzz_target;
use serde::de::{Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// The server's default `max_nesting_depth`.
const MAX_DEPTH: usize = 32;

/// The nesting depth of a JSON text as serde reads it: every array and object counts, also those
/// under a key that appears twice (a `Value` would keep only the last).
struct Depth(usize);

impl<'de> Deserialize<'de> for Depth {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(DepthVisitor)
    }
}

struct DepthVisitor;

impl<'de> Visitor<'de> for DepthVisitor {
    type Value = Depth;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("JSON")
    }
    fn visit_bool<E>(self, _: bool) -> Result<Depth, E> {
        Ok(Depth(0))
    }
    fn visit_i64<E>(self, _: i64) -> Result<Depth, E> {
        Ok(Depth(0))
    }
    fn visit_u64<E>(self, _: u64) -> Result<Depth, E> {
        Ok(Depth(0))
    }
    fn visit_f64<E>(self, _: f64) -> Result<Depth, E> {
        Ok(Depth(0))
    }
    fn visit_str<E>(self, _: &str) -> Result<Depth, E> {
        Ok(Depth(0))
    }
    fn visit_unit<E>(self) -> Result<Depth, E> {
        Ok(Depth(0))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Depth, A::Error> {
        let mut deepest = 0;
        while let Some(Depth(d)) = seq.next_element()? {
            deepest = deepest.max(d);
        }
        Ok(Depth(deepest + 1))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Depth, A::Error> {
        let mut deepest = 0;
        while let Some((IgnoredAny, Depth(d))) = map.next_entry()? {
            deepest = deepest.max(d);
        }
        Ok(Depth(deepest + 1))
    }
}

fuzz_target!(|frame: &[u8]| {
    // The session refuses a text message that is not UTF-8 (close 1007) before parsing it.
    if std::str::from_utf8(frame).is_err() {
        return;
    }
    let parsed = parse(frame, MAX_DEPTH);
    if let Ok(inbound) = &parsed {
        // Whatever was accepted is a JSON object.
        let _ = format!("{inbound:?}");
        // JSON by grammar (IgnoredAny): a Value would also refuse numbers beyond f64 such as
        // 1E400, which JSON allows and the server, ignoring the field, rightly accepts.
        assert!(serde_json::from_slice::<IgnoredAny>(frame).is_ok());
        assert_eq!(frame.iter().find(|b| !b.is_ascii_whitespace()), Some(&b'{'));
    }
    // serde_json's own recursion limit is 128: beyond it there is no depth to compare with.
    let is_object = frame.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
    if let (true, Ok(Depth(depth))) = (is_object, serde_json::from_slice::<Depth>(frame)) {
        let too_deep = matches!(
            check_shape(frame, MAX_DEPTH),
            Err(ProtocolError::TooDeep { .. })
        );
        assert_eq!(
            too_deep,
            depth > MAX_DEPTH,
            "check_shape disagrees with serde about nesting"
        );
    }
});
