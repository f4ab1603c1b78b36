//! The WebSocket frame reader (`signaling::wire::FrameReader`) on arbitrary client byte streams.
//!
//! The first input byte seeds how the stream is cut; the rest is the stream. Checked: no panic, no
//! frame over the limit, and the same frames and errors whether the bytes arrive at once or in
//! pieces with pauses (the reader keeps its progress across `Pending`).

#![no_main]

#[path = "chunked.rs"]
mod chunked;

use std::task::{Context, Poll, Waker};

use callgate::signaling::wire::{FrameReader, ReadError};
use libfuzzer_sys::fuzz_target;

/// Small, so that both accepted and refused frames are reached from short inputs.
const MAX_PAYLOAD: usize = 200;

/// What the session would see: frames, then the error that ends the connection.
fn read_all(stream: &[u8], seed: Option<u8>) -> Vec<String> {
    let mut io = chunked::Chunked::new(stream, seed);
    let mut reader = FrameReader::new(MAX_PAYLOAD);
    let mut cx = Context::from_waker(Waker::noop());
    let mut seen = Vec::new();
    let mut pendings = 0;
    loop {
        match reader.poll_frame(&mut io, &mut cx) {
            Poll::Pending => {
                // Pending is only allowed when the stream was: otherwise the session would hang.
                assert!(
                    io.pendings > pendings,
                    "reader pending without the stream being"
                );
                pendings = io.pendings;
                continue;
            }
            Poll::Ready(Ok(frame)) => {
                assert!(frame.payload.len() <= MAX_PAYLOAD, "frame over the limit");
                seen.push(format!(
                    "{} {:?} {:?}",
                    frame.fin, frame.opcode, frame.payload
                ));
            }
            // The session skips an oversized frame's payload during a lingering close.
            Poll::Ready(Err(ReadError::TooLarge(len))) => {
                assert!(len > MAX_PAYLOAD as u64);
                seen.push(format!("too large {len}"));
            }
            Poll::Ready(Err(e)) => {
                seen.push(e.to_string());
                return seen;
            }
        }
    }
}

fuzz_target!(|input: &[u8]| {
    let Some((&seed, stream)) = input.split_first() else {
        return;
    };
    assert_eq!(read_all(stream, None), read_all(stream, Some(seed)));
});
