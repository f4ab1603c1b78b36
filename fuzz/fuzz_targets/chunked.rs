//! A byte stream that hands out its input in pieces chosen by a seed, sometimes answering
//! `Pending` first, as a TCP or TLS socket does: readers must give the same result however the
//! bytes are cut.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};

/// Serves `data` in chunks whose sizes (1..=16) and `Pending` pauses come from `seed`; with
/// `seed == None` everything is offered at once.
pub struct Chunked<'a> {
    data: &'a [u8],
    state: Option<u64>,
    paused: bool,
    /// How many times a read answered `Pending`.
    pub pendings: usize,
}

impl<'a> Chunked<'a> {
    pub fn new(data: &'a [u8], seed: Option<u8>) -> Self {
        Chunked {
            data,
            // xorshift needs a non-zero state.
            state: seed.map(|s| (u64::from(s) * 0x9E37_79B9_7F4A_7C15) | 1),
            paused: false,
            pendings: 0,
        }
    }

    fn next(&mut self) -> Option<u64> {
        let x = self.state.as_mut()?;
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        Some(*x)
    }
}

impl AsyncRead for Chunked<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let roll = self.next();
        if let Some(r) = roll {
            if !self.paused && r % 4 == 0 {
                self.paused = true;
                self.pendings += 1;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
        }
        self.paused = false;
        let take = match roll {
            Some(r) => ((r >> 8) % 16 + 1) as usize,
            None => usize::MAX,
        };
        let n = take.min(buf.remaining()).min(self.data.len());
        buf.put_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Poll::Ready(Ok(()))
    }
}
