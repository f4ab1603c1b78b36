//! How long an HTTP connection may live: idle, stalled, and closing connections all end.
//!
//! A connection's clock is its *requests*, not its bytes: HTTP/2 PINGs, SETTINGS or WINDOW_UPDATEs
//! with no request behind them must not keep a connection open, and a response whose client reads
//! nothing must not either. Three limits, decided by the pure [`judge`]:
//!
//! - **idle**: no request in flight and none begun or finished for `idle-timeout` → graceful close
//!   (HTTP/2 GOAWAY, HTTP/1 closes after the current exchange);
//! - **stalled**: requests in flight but no response body has moved for `response-stall-timeout`
//!   (a client that stopped reading, a zero HTTP/2 window) → the connection is dropped at once;
//! - **closing**: once a graceful close begins (idle or shutdown), the connection gets
//!   `shutdown-timeout` to finish and is then dropped, whatever the peer does.
//!
//! [`Activity`] is the shared state: the service marks requests with a [`RequestGuard`] that rides
//! on the response body ([`TrackedBody`]) and counts every body frame handed to the connection as
//! progress. Bodies are sent in frames of at most [`super::static_files::CHUNK`] bytes, so progress
//! follows what the client actually reads.

use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::{Body as HttpBody, Frame, SizeHint};

/// Milliseconds since the process's first call: the clock of [`Activity`].
pub fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// What the connection's timers decide at one instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing to do; look again after this long.
    Wait(Duration),
    /// No request for `idle-timeout`: begin a graceful close.
    Idle,
    /// Requests in flight and no body progress for `response-stall-timeout`: drop the connection.
    Stalled,
}

/// One reading of a connection's [`Activity`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Snapshot {
    /// Requests whose responses are not yet fully handed to the connection.
    pub in_flight: u32,
    /// When a body last moved, the connection became busy, or it became quiet (ms, [`now_ms`]).
    pub last_progress_ms: u64,
}

/// Decides, at `now_ms`, whether a connection in state `s` is idle, stalled or fine.
pub fn judge(s: Snapshot, now_ms: u64, idle: Duration, stall: Duration) -> Verdict {
    let quiet = Duration::from_millis(now_ms.saturating_sub(s.last_progress_ms));
    let limit = if s.in_flight == 0 { idle } else { stall };
    if quiet < limit {
        // Look again when the limit would run out; progress meanwhile just means another wait.
        Verdict::Wait(limit - quiet)
    } else if s.in_flight == 0 {
        Verdict::Idle
    } else {
        Verdict::Stalled
    }
}

/// A connection's requests in flight and its last progress, shared by its task, its service and
/// its response bodies.
#[derive(Debug)]
pub struct Activity {
    /// Responses not yet fully handed over.
    in_flight: AtomicU32,
    /// See [`Snapshot::last_progress_ms`].
    last_progress_ms: AtomicU64,
    /// Wakes the connection's task when it turns busy or quiet, since the limit it waits on (idle
    /// or stall) changes then.
    turned: tokio::sync::Notify,
}

impl Activity {
    /// A fresh connection: quiet since now.
    pub fn new() -> Arc<Activity> {
        Arc::new(Activity {
            in_flight: AtomicU32::new(0),
            last_progress_ms: AtomicU64::new(now_ms()),
            turned: tokio::sync::Notify::new(),
        })
    }

    /// The current state.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            in_flight: self.in_flight.load(Ordering::Relaxed),
            last_progress_ms: self.last_progress_ms.load(Ordering::Relaxed),
        }
    }

    /// Marks a request as begun; the guard ends it when dropped. Only the first request of a busy
    /// period restarts the clock, so opening new streams does not excuse old ones that never move.
    pub fn begin(self: &Arc<Self>) -> RequestGuard {
        if self.in_flight.fetch_add(1, Ordering::Relaxed) == 0 {
            self.touch();
            self.turned.notify_one();
        }
        RequestGuard(self.clone())
    }

    /// Resolves when the connection turned busy or quiet (or already has, since the last call).
    pub async fn turned(&self) {
        self.turned.notified().await;
    }

    fn touch(&self) {
        self.last_progress_ms.store(now_ms(), Ordering::Relaxed);
    }
}

/// One request in flight; dropping it (the response was handed over, or abandoned) ends it.
#[derive(Debug)]
pub struct RequestGuard(Arc<Activity>);

impl RequestGuard {
    /// A response body frame was handed to the connection.
    fn progressed(&self) {
        self.0.touch();
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::Relaxed) == 1 {
            // The idle clock starts when the last response is done.
            self.0.touch();
            self.0.turned.notify_one();
        }
    }
}

/// A response body that reports its progress and ends its request when done or dropped.
pub struct TrackedBody<B> {
    /// The body being sent.
    inner: B,
    /// Dropped at the end of the body, which ends the request.
    guard: Option<RequestGuard>,
}

impl<B> TrackedBody<B> {
    /// Tracks `inner` under `guard`.
    pub fn new(inner: B, guard: RequestGuard) -> Self {
        TrackedBody {
            inner,
            guard: Some(guard),
        }
    }
}

impl<B> HttpBody for TrackedBody<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(_))) => {
                if let Some(guard) = &self.guard {
                    guard.progressed();
                }
            }
            Poll::Ready(_) => self.guard = None,
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IDLE: Duration = Duration::from_secs(60);
    const STALL: Duration = Duration::from_secs(30);

    fn at(in_flight: u32, last_progress_ms: u64) -> Snapshot {
        Snapshot {
            in_flight,
            last_progress_ms,
        }
    }

    #[test]
    fn a_quiet_connection_is_idle_after_the_idle_timeout() {
        assert_eq!(
            judge(at(0, 1_000), 31_000, IDLE, STALL),
            Verdict::Wait(Duration::from_secs(30))
        );
        assert_eq!(judge(at(0, 1_000), 61_000, IDLE, STALL), Verdict::Idle);
    }

    #[test]
    fn a_busy_connection_without_progress_is_stalled_after_the_stall_timeout() {
        assert_eq!(
            judge(at(3, 1_000), 21_000, IDLE, STALL),
            Verdict::Wait(Duration::from_secs(10))
        );
        assert_eq!(judge(at(3, 1_000), 31_000, IDLE, STALL), Verdict::Stalled);
    }

    #[test]
    fn new_requests_do_not_reset_the_clock_of_stuck_ones_but_body_progress_does() {
        let activity = Activity::new();
        let first = activity.begin();
        let started = activity.snapshot().last_progress_ms;
        std::thread::sleep(Duration::from_millis(5));
        let _second = activity.begin();
        assert_eq!(activity.snapshot().last_progress_ms, started);
        assert_eq!(activity.snapshot().in_flight, 2);
        first.progressed();
        assert!(activity.snapshot().last_progress_ms > started);
        drop(first);
        assert_eq!(activity.snapshot().in_flight, 1);
    }

    #[tokio::test]
    async fn a_body_ends_its_request_when_it_is_done_or_dropped() {
        use http_body_util::BodyExt;
        let activity = Activity::new();
        let body = TrackedBody::new(
            http_body_util::Full::new(Bytes::from_static(b"x")),
            activity.begin(),
        );
        assert_eq!(activity.snapshot().in_flight, 1);
        body.collect().await.unwrap();
        assert_eq!(activity.snapshot().in_flight, 0);

        let abandoned = TrackedBody::new(
            http_body_util::Full::new(Bytes::from_static(b"x")),
            activity.begin(),
        );
        drop(abandoned);
        assert_eq!(activity.snapshot().in_flight, 0);
    }
}
