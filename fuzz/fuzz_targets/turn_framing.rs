//! TURN over TCP/TLS framing (`turn::framing::frame_length`, `frame_for_stream`) on arbitrary
//! byte streams, and each frame through `turn::inspect`.
//!
//! Checked: no panic; a frame's wire length covers its message, pads only ChannelData and to a
//! multiple of four; cutting a stream into frames and writing them back out with
//! `frame_for_stream` gives back the same bytes (minus a final partial frame).

#![no_main]

use callgate::turn::framing::{frame_for_stream, frame_length};
use callgate::turn::inspect;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|stream: &[u8]| {
    let mut at = 0;
    let mut rebuilt = Vec::new();
    while stream.len() - at >= 4 {
        let header: [u8; 4] = stream[at..at + 4].try_into().expect("4 bytes");
        let Ok((len, wire)) = frame_length(header) else {
            assert!(header[0] >> 6 >= 2, "a STUN or ChannelData header refused");
            break;
        };
        assert!(len <= wire && wire - len < 4 && len >= 4);
        if header[0] >> 6 == 1 {
            assert_eq!(wire % 4, 0);
        } else {
            assert_eq!(len, wire);
        }
        if stream.len() - at < wire {
            break;
        }
        let frame = &stream[at..at + len];
        let _ = inspect::inspect(frame);
        let out = frame_for_stream(frame);
        if header[0] >> 6 == 1 {
            assert_eq!(out.len(), wire);
        }
        assert!(out.starts_with(frame));
        rebuilt.extend_from_slice(&out);
        at += wire;
    }
    // Padding bytes on the wire are not kept: compare everything but them.
    assert_eq!(rebuilt.len(), at);
});
