//! What one client ID is owed: sequence numbers, the messages held until the client acknowledges
//! them (or, for clients that do not acknowledge, until a resume takes them), and the range it
//! missed when the budget ran out. Pure bookkeeping: no I/O, no clock, no locks (the connections table
//! holds this inside the ID's slot, under its shard lock).
//!
//! Bytes written to a socket that then dies are lost, so "written" is not "delivered". A client
//! that opts in (WebSocket URL `?seq=1`) gets `"seq":N` in every message; it acknowledges with
//! `{"type":"ack","seq":N}` and resumes with `"last_seq":N`. The server holds every message after
//! the last acknowledged one and replays, in order, whatever the client did not process. Clients
//! that do not opt in keep the seed's behaviour: messages are held only while the ID is reserved.
//!
//! Every message given to an ID takes the next sequence number, even one that cannot be held: its
//! sender is told at once (`undelivered`), and its number joins the ID's missed range, which the
//! client learns on its next resume. Once a message has been dropped, every later one is dropped
//! too until the resume, so the client never sees a gap it cannot explain.

use std::collections::VecDeque;
use std::io::Write as _;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;

use super::protocol::{ClientId, DropReason, MessageKind, ServerFrame, ServerKind, ServerMessage};

/// A server message on its way to one ID: its JSON, finished once its sequence number is known.
#[derive(Debug)]
pub struct Envelope {
    /// The complete JSON object (ending in `}`), with [`SEQ_ROOM`](super::protocol::SEQ_ROOM) spare
    /// capacity.
    json: Vec<u8>,
    /// The message's type, carried to the session and metrics with the frame.
    kind: ServerKind,
    /// Who caused it, when a client did (so it can be told if the message is not delivered).
    origin: Option<Origin>,
}

/// The client message a server message relays, for an `undelivered` error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Origin {
    /// The sender.
    pub from: ClientId,
    /// The type of the sender's message.
    pub kind: MessageKind,
}

impl Envelope {
    /// A message from the server itself (a reply, an error, a notice): nobody to tell if lost.
    pub fn new(message: &ServerMessage<'_>) -> Self {
        Self::from_parts(message.kind(), message.to_json(), None)
    }

    /// A message relaying what `origin` sent.
    pub fn relaying(message: &ServerMessage<'_>, origin: Origin) -> Self {
        Self::from_parts(message.kind(), message.to_json(), Some(origin))
    }

    /// An envelope from its parts, e.g. as a bus carried it from another node. `json` must be one
    /// complete JSON object of type `kind`.
    pub fn from_parts(kind: ServerKind, json: Vec<u8>, origin: Option<Origin>) -> Self {
        Self { json, kind, origin }
    }

    /// Who caused this message, if a client did.
    pub fn origin(&self) -> Option<Origin> {
        self.origin
    }

    /// The message's type.
    pub fn kind(&self) -> ServerKind {
        self.kind
    }

    /// The JSON, before any `seq` goes in.
    pub fn json(&self) -> &[u8] {
        &self.json
    }

    /// Takes a sealed frame's sequence number back out (`,"seq":N` just before the closing
    /// brace, which only [`seal`](Self::seal) writes there: a client's JSON is always nested one
    /// level deeper), returning the plain envelope and the number. For a frame a cluster node
    /// held or forwarded after numbering it: the ID's new home numbers it again.
    pub fn unsealed(mut self) -> (Self, Option<u64>) {
        const KEY: &[u8] = br#","seq":"#;
        let Some(body) = self.json.strip_suffix(b"}") else {
            return (self, None);
        };
        let digits = body.iter().rev().take_while(|b| b.is_ascii_digit()).count();
        let start = body.len() - digits;
        if digits == 0 || digits > 20 || !body[..start].ends_with(KEY) {
            return (self, None);
        }
        let seq = std::str::from_utf8(&body[start..])
            .ok()
            .and_then(|d| d.parse().ok());
        let cut = start - KEY.len();
        self.json.truncate(cut);
        self.json.push(b'}');
        (self, seq)
    }

    /// The ready-to-send frame: `,"seq":N` goes in before the closing brace when `seq` is given.
    /// No copy: the spare capacity was reserved when the JSON was written.
    pub fn seal(self, seq: Option<u64>) -> ServerFrame {
        let mut json = self.json;
        if let Some(seq) = seq {
            debug_assert_eq!(json.last(), Some(&b'}'));
            json.pop();
            write!(json, r#","seq":{seq}}}"#).expect("writing to a Vec cannot fail");
        }
        ServerFrame {
            kind: self.kind,
            bytes: Bytes::from(json),
        }
    }
}

/// Under global pressure, a live ID holding less than this still holds (see [`Log::hold`]).
pub const LIVE_PRESSURE_BYTES: usize = 64 * 1024;

/// The limits a [`Log`] holds to.
#[derive(Clone, Copy, Debug)]
pub struct HoldLimits {
    /// Most messages held for one ID.
    pub messages: usize,
    /// Most bytes held for one ID.
    pub bytes: usize,
    /// Most bytes held for all IDs together.
    pub bytes_total: usize,
}

/// One held message.
#[derive(Debug)]
struct Held {
    /// Its sequence number.
    seq: u64,
    /// The frame as sent (with `seq` inside for clients that opted in).
    frame: ServerFrame,
    /// Who caused it, to tell them if it is never delivered.
    origin: Option<Origin>,
}

/// The delivery state of one ID: sequence numbers, held messages, the missed range.
#[derive(Debug, Default)]
pub struct Log {
    /// The last sequence number given out (0: none yet).
    last_seq: u64,
    /// The highest sequence number handed to a live connection.
    sent_through: u64,
    /// Messages held, in sequence order.
    held: VecDeque<Held>,
    /// Total length of `held`'s frames.
    bytes: usize,
    /// Sequence numbers dropped since the last resume (first, last), both inclusive.
    missed: Option<(u64, u64)>,
    /// After a resume from another node: the last number the client said it processed there.
    /// What that node forwards later under its own numbers up to this is not delivered again.
    processed_elsewhere: u64,
}

impl Log {
    /// Gives out the next sequence number.
    pub fn next_seq(&mut self) -> u64 {
        self.last_seq += 1;
        self.last_seq
    }

    /// The last sequence number given out.
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// Notes that `seq` went to a live connection.
    pub fn sent(&mut self, seq: u64) {
        self.sent_through = seq;
    }

    /// Holds `frame` (numbered `seq`) if the budgets allow and nothing has been dropped since the
    /// last resume; otherwise records `seq` as missed and says why it was not held.
    ///
    /// The global budget is hard for a reserved ID (`live` false: connect-and-drop churn is what
    /// it stops) and soft for a live one: a connection that acknowledges and holds less than
    /// [`LIVE_PRESSURE_BYTES`] keeps receiving when the budget is spent, so a busy server does
    /// not cut off clients that keep up.
    pub fn hold(
        &mut self,
        seq: u64,
        frame: ServerFrame,
        origin: Option<Origin>,
        limits: HoldLimits,
        held_total: &AtomicUsize,
        live: bool,
    ) -> Result<(), DropReason> {
        let len = frame.len();
        let refusal = if self.missed.is_some()
            || self.held.len() >= limits.messages
            || self.bytes + len > limits.bytes
        {
            Some(DropReason::QueueFull)
        } else if held_total.fetch_add(len, Ordering::Relaxed) + len > limits.bytes_total
            && !(live && self.bytes < LIVE_PRESSURE_BYTES)
        {
            held_total.fetch_sub(len, Ordering::Relaxed);
            Some(DropReason::ServerBusy)
        } else {
            None
        };
        if let Some(reason) = refusal {
            self.missed = Some(match self.missed {
                Some((first, _)) => (first, seq),
                None => (seq, seq),
            });
            return Err(reason);
        }
        self.bytes += len;
        self.held.push_back(Held { seq, frame, origin });
        Ok(())
    }

    /// For a client that does not acknowledge (its log holds nothing while it is live): `frames`
    /// were handed to its connection but never written, and are held again for its resume, under
    /// the numbers of the last sequence numbers sent. `id` messages among them (not numbered) are
    /// left out. Their senders are not known any more, so if these are dropped later nobody is
    /// told; the client still learns the missed range.
    pub fn requeue_unsent(
        &mut self,
        frames: Vec<ServerFrame>,
        limits: HoldLimits,
        held_total: &AtomicUsize,
    ) {
        let frames: Vec<ServerFrame> = frames
            .into_iter()
            .filter(|f| f.kind != ServerKind::Id)
            .collect();
        if frames.is_empty() || !self.held.is_empty() {
            return;
        }
        let first = self.sent_through.saturating_sub(frames.len() as u64) + 1;
        self.sent_through = first - 1;
        for (seq, frame) in (first..).zip(frames) {
            let _ = self.hold(seq, frame, None, limits, held_total, false);
        }
    }

    /// The client processed everything up to `seq`: frees what is held up to it. Refuses a
    /// number never given out.
    pub fn ack(&mut self, seq: u64, held_total: &AtomicUsize) -> Result<(), AckBeyond> {
        if seq > self.last_seq {
            return Err(AckBeyond {
                acked: seq,
                last: self.last_seq,
            });
        }
        self.release_through(seq, held_total);
        Ok(())
    }

    /// Starts a resume: frees what the client says it processed (`last_seq`), or, for a client
    /// that does not say, what was already handed to a connection. Returns the frames to replay
    /// with their numbers, in order, and the missed range to report (which is cleared).
    pub fn resume(&mut self, last_seq: Option<u64>, held_total: &AtomicUsize) -> Replay {
        let through = last_seq.unwrap_or(self.sent_through).min(self.last_seq);
        self.release_through(through, held_total);
        Replay {
            frames: self.held.iter().map(|h| (h.seq, h.frame.clone())).collect(),
            missed: self.missed.take(),
        }
    }

    /// Empties the log for good, returning who caused each held message (those senders must be
    /// told their messages were not delivered).
    pub fn discard(&mut self, held_total: &AtomicUsize) -> Vec<Origin> {
        held_total.fetch_sub(self.bytes, Ordering::Relaxed);
        self.bytes = 0;
        let origins = self.held.drain(..).filter_map(|h| h.origin).collect();
        self.held = VecDeque::new();
        origins
    }

    /// Empties the log, handing over what it held (in sequence order, with who caused each) so
    /// it can be held elsewhere: a cluster node moves a reserved ID's messages into the shared
    /// held stream, so a resume on any node finds them. Sequence numbers stay as given out.
    pub fn take_held(&mut self, held_total: &AtomicUsize) -> Vec<(ServerFrame, Option<Origin>)> {
        held_total.fetch_sub(self.bytes, Ordering::Relaxed);
        self.bytes = 0;
        std::mem::take(&mut self.held)
            .into_iter()
            .map(|h| (h.frame, h.origin))
            .collect()
    }

    /// Continues numbering after `seq` (a resume moved the ID here from another node, where the
    /// client saw numbers up to `seq`), so numbers never go back.
    pub fn continue_after(&mut self, seq: u64) {
        self.last_seq = self.last_seq.max(seq);
        self.sent_through = self.sent_through.max(seq);
        self.processed_elsewhere = self.processed_elsewhere.max(seq);
    }

    /// The range dropped since the last resume, not yet reported.
    pub fn missed(&self) -> Option<(u64, u64)> {
        self.missed
    }

    /// The last number the client said it processed on the node it resumed from (0: none).
    pub fn processed_elsewhere(&self) -> u64 {
        self.processed_elsewhere
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Messages held.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// Frees what is held up to `seq` (delivered, or handed to a client that does not
    /// acknowledge).
    pub fn release_through(&mut self, seq: u64, held_total: &AtomicUsize) {
        let mut freed = 0;
        while self.held.front().is_some_and(|h| h.seq <= seq) {
            let held = self.held.pop_front().expect("checked");
            freed += held.frame.len();
        }
        if freed > 0 {
            self.bytes -= freed;
            held_total.fetch_sub(freed, Ordering::Relaxed);
        }
        if self.held.is_empty() && self.held.capacity() > 8 {
            self.held = VecDeque::new();
        }
    }
}

/// What a resume hands the client after its `id` message.
#[derive(Debug, PartialEq, Eq)]
pub struct Replay {
    /// The held frames to send again, with their numbers, in order.
    pub frames: Vec<(u64, ServerFrame)>,
    /// The numbers dropped since the last resume (first, last), both inclusive.
    pub missed: Option<(u64, u64)>,
}

/// An acknowledgement of a sequence number the server never gave out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("ack {acked} is beyond the last message sent to this ID ({last}).")]
pub struct AckBeyond {
    /// The number acknowledged.
    pub acked: u64,
    /// The last number given out.
    pub last: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: HoldLimits = HoldLimits {
        messages: 4,
        bytes: 100,
        bytes_total: 1000,
    };

    fn frame(n: u64) -> ServerFrame {
        let json = format!(r#"{{"n":{n}}}"#).into_bytes();
        Envelope::from_parts(ServerKind::Offer, json, None).seal(Some(n))
    }

    fn origin() -> Option<Origin> {
        Some(Origin {
            from: ClientId::new(123_456_789),
            kind: MessageKind::Offer,
        })
    }

    #[test]
    fn seal_puts_seq_before_the_closing_brace_without_reallocating() {
        let mut json = Vec::with_capacity(16 + crate::signaling::protocol::SEQ_ROOM);
        json.extend_from_slice(br#"{"type":"pong"}"#);
        let ptr = json.as_ptr();
        let frame = Envelope::from_parts(ServerKind::Pong, json, None).seal(Some(u64::MAX));
        assert_eq!(
            &frame.bytes[..],
            format!(r#"{{"type":"pong","seq":{}}}"#, u64::MAX).as_bytes()
        );
        assert_eq!(frame.bytes.as_ptr(), ptr, "sealed in place");
        assert_eq!(frame.kind, ServerKind::Pong);
        let plain = Envelope::new(&ServerMessage::Pong).seal(None);
        assert_eq!(&plain.bytes[..], br#"{"type":"pong"}"#);
        assert_eq!(plain.kind, ServerKind::Pong);
    }

    #[test]
    fn acks_free_what_was_read_and_resume_replays_the_rest_in_order() {
        let total = AtomicUsize::new(0);
        let mut log = Log::default();
        for _ in 0..3 {
            let seq = log.next_seq();
            log.hold(seq, frame(seq), origin(), LIMITS, &total, false)
                .unwrap();
            log.sent(seq);
        }
        log.ack(1, &total).unwrap();
        assert_eq!(log.len(), 2);
        assert_eq!(total.load(Ordering::Relaxed), log.bytes());
        assert_eq!(log.ack(9, &total), Err(AckBeyond { acked: 9, last: 3 }));
        // The client processed 2 before its socket died; 3 was written but never read.
        let replay = log.resume(Some(2), &total);
        assert_eq!(replay.frames, [(3, frame(3))]);
        assert_eq!(replay.missed, None);
        // Without last_seq, what was handed to a connection counts as delivered (seed behaviour).
        assert!(log.resume(None, &total).frames.is_empty());
        assert_eq!(total.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn over_budget_the_rest_is_dropped_and_reported_as_one_range() {
        let total = AtomicUsize::new(0);
        let mut log = Log::default();
        let mut results = Vec::new();
        for _ in 0..7 {
            let seq = log.next_seq();
            results.push(log.hold(seq, frame(seq), origin(), LIMITS, &total, false));
        }
        assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 4);
        assert_eq!(results[4], Err(DropReason::QueueFull));
        // A small message after a drop is dropped too: no unexplained gap.
        let replay = log.resume(Some(0), &total);
        assert_eq!(replay.frames.len(), 4);
        assert_eq!(replay.missed, Some((5, 7)));
        // After the resume the range is cleared and, once the replay is read, messages are
        // held again.
        log.ack(7, &total).unwrap();
        let seq = log.next_seq();
        assert_eq!(seq, 8);
        log.hold(seq, frame(seq), origin(), LIMITS, &total, false)
            .unwrap();
    }

    #[test]
    fn the_global_budget_is_shared_and_given_back() {
        let total = AtomicUsize::new(0);
        let limits = HoldLimits {
            bytes_total: 20,
            ..LIMITS
        };
        let (mut a, mut b) = (Log::default(), Log::default());
        let seq = a.next_seq();
        a.hold(seq, frame(seq), None, limits, &total, false)
            .unwrap();
        let seq = b.next_seq();
        assert!(total.load(Ordering::Relaxed) + frame(seq).len() > 20);
        assert_eq!(
            b.hold(seq, frame(seq), None, limits, &total, false),
            Err(DropReason::ServerBusy)
        );
        // A live ID that holds little still holds under pressure; once it holds more, it does not.
        let mut c = Log::default();
        let seq = c.next_seq();
        c.hold(seq, frame(seq), None, limits, &total, true).unwrap();
        let limits = HoldLimits {
            bytes: usize::MAX,
            ..limits
        };
        let seq = c.next_seq();
        let big = ServerFrame {
            kind: ServerKind::Offer,
            bytes: Bytes::from(vec![b'x'; LIVE_PRESSURE_BYTES]),
        };
        c.hold(seq, big, None, limits, &total, true).unwrap();
        let seq = c.next_seq();
        assert_eq!(
            c.hold(seq, frame(seq), None, limits, &total, true),
            Err(DropReason::ServerBusy)
        );
        c.discard(&total);
        assert_eq!(a.discard(&total), []);
        assert_eq!(total.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn discarding_names_every_sender_of_what_was_held() {
        let total = AtomicUsize::new(0);
        let mut log = Log::default();
        for _ in 0..2 {
            let seq = log.next_seq();
            log.hold(seq, frame(seq), origin(), LIMITS, &total, false)
                .unwrap();
        }
        let seq = log.next_seq();
        log.hold(seq, frame(seq), None, LIMITS, &total, false)
            .unwrap();
        assert_eq!(log.discard(&total).len(), 2);
        assert!(log.is_empty());
        assert_eq!(total.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn unsealing_takes_out_exactly_the_number_seal_put_in() {
        let message = ServerMessage::Pong;
        let plain = Envelope::new(&message).seal(None).bytes;
        let sealed = Envelope::new(&message).seal(Some(41));
        let (back, seq) = Envelope::from_parts(sealed.kind, sealed.bytes.to_vec(), None).unsealed();
        assert_eq!(seq, Some(41));
        assert_eq!(back.json(), &plain[..]);
        // No number: unchanged. A client's nested `"seq"` is never mistaken for one.
        let (same, none) = Envelope::from_parts(sealed.kind, plain.to_vec(), None).unsealed();
        assert_eq!((same.json(), none), (&plain[..], None));
        let nested = br#"{"type":"ice-candidate","candidate":{"x":1,"seq":5}}"#.to_vec();
        let (same, none) = Envelope::from_parts(sealed.kind, nested.clone(), None).unsealed();
        assert_eq!((same.json(), none), (&nested[..], None));
    }
}
