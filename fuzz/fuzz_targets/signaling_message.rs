//! The signaling protocol parser (`signaling::protocol::parse`) on arbitrary text frames.
//!
//! Checked: no panic; the cheap pre-pass (`check_shape`) agrees with serde_json about nesting —
//! a frame serde reads as deeper than the limit is refused as too deep, and a frame within the
//! limit is never refused as too deep.

#![no_main]

use callgate::signaling::protocol::{check_shape, parse, ProtocolError};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

/// The server's default `max_nesting_depth`.
const MAX_DEPTH: usize = 32;

fn depth(value: &Value) -> usize {
    match value {
        Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
        Value::Object(fields) => 1 + fields.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

fuzz_target!(|frame: &[u8]| {
    let parsed = parse(frame, MAX_DEPTH);
    if let Ok(inbound) = &parsed {
        // Whatever was accepted is a JSON object serde can read.
        let _ = format!("{inbound:?}");
        assert!(matches!(
            serde_json::from_slice::<Value>(frame),
            Ok(Value::Object(_))
        ));
    }
    // serde_json's own recursion limit is 128: beyond it there is no Value to compare with.
    if let Ok(value @ Value::Object(_)) = serde_json::from_slice::<Value>(frame) {
        let too_deep = matches!(
            check_shape(frame, MAX_DEPTH),
            Err(ProtocolError::TooDeep { .. })
        );
        assert_eq!(
            too_deep,
            depth(&value) > MAX_DEPTH,
            "check_shape disagrees with serde about nesting"
        );
    }
});
