//! The PROXY protocol v1/v2 header reader (`http::proxy_protocol::read_header`) on arbitrary
//! byte streams from a trusted balancer.
//!
//! The first input byte seeds how the stream is cut. Checked: no panic; a header accepted when it
//! arrives at once is accepted, with the same client address, when it arrives in pieces, and the
//! reverse (a real balancer's header may be split across TCP segments); and every byte after the
//! header is handed on, unchanged. Refusals may differ in kind: ppp calls some garbage
//! "incomplete" at one length and "invalid" at another, and both end the connection.

#![no_main]

#[path = "chunked.rs"]
mod chunked;

use std::sync::OnceLock;
use std::time::Duration;

use callgate::http::proxy_protocol::read_header;
use libfuzzer_sys::fuzz_target;
use tokio::io::AsyncReadExt;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("a runtime")
    })
}

/// `Ok((client, bytes after the header))` or the error's kind.
fn read(stream: &[u8], seed: Option<u8>) -> Result<(String, Vec<u8>), String> {
    runtime().block_on(async {
        let io = chunked::Chunked::new(stream, seed);
        match read_header(io, Duration::from_secs(3600)).await {
            Ok((client, mut rest)) => {
                let mut after = Vec::new();
                rest.read_to_end(&mut after).await.expect("in-memory read");
                Ok((format!("{client:?}"), after))
            }
            Err(e) => Err(e.to_string()),
        }
    })
}

fuzz_target!(|input: &[u8]| {
    let Some((&seed, stream)) = input.split_first() else {
        return;
    };
    let whole = read(stream, None);
    if let Ok((_, after)) = &whole {
        assert!(stream.ends_with(after), "bytes after the header changed");
        assert!(after.len() < stream.len(), "a header of zero bytes");
    }
    let chunked = read(stream, Some(seed));
    if whole.is_ok() || chunked.is_ok() {
        assert_eq!(whole, chunked, "accepted one way, not the other");
    }
});
