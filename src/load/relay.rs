//! `relay`: P call pairs, each in a connected call, doing `offer` → `answer` round trips.
//!
//! Set-up per pair, as the web app does it: both sides connect and read their `id`; A sends
//! `video-offer-request` to B, B accepts with `client-reply`, A reads `server-reply`. The pair is
//! now `in-call`, and the measured traffic is the protocol's in-call renegotiation: A sends
//! `offer` (an SDP of `--sdp-bytes`), the gateway relays it to B, B answers with an `answer` of the
//! same size, the gateway relays it to A. One round trip = two forwarded messages. The payload
//! carries a sequence number (`"seq"` inside the opaque SDP object), which B echoes, so A matches
//! every answer to its offer.
//!
//! - **Closed loop** (default): each pair sends its next offer as soon as the answer arrives.
//!   Latency is send → answer.
//! - **Open loop** (`--rate R`): offers are scheduled at R round trips/s in total, evenly spread
//!   over pairs and time, and sent at their scheduled time whether or not earlier answers came
//!   back. Latency is measured from the *scheduled* send time, so a stall in the gateway (or in
//!   this client) shows up as latency instead of silently lowering the offered load.
//!
//! Only round trips scheduled inside the measured window (after `--warmup`) count. The server's
//! CPU time and RSS (`--server-pid`) are read at the window's start and end.
//!
//! With several `--target`s (the nodes of a cluster), pair `i`'s caller connects to node
//! `i mod N`; its callee to node `i + 1 mod N` (`--placement cross`: every forwarded message
//! crosses between nodes) or to the same node (`--placement local`: the cluster's cost for calls
//! that stay on one node). Several `--server-pid`s are summed, so CPU per forwarded message is
//! the whole cluster's (give Redis's PID too to count it).

use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use fastwebsockets::{Frame, OpCode, Payload};
use serde_json::json;
use tokio::sync::{mpsc, Semaphore};
use tokio::time::Instant;

use super::client::{self, Socket, Target};
use super::stats::{self, Latencies, ServerUse, MAX_SAMPLES};
use super::{Error, Report, TargetArgs};

/// `callgate-load relay` options.
#[derive(Debug, Args)]
pub struct RelayArgs {
    /// Call pairs (two WebSockets each), at most 10 000.
    #[arg(long, default_value_t = 50)]
    pairs: usize,
    /// Measured seconds (after the warm-up), at most 600.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds of traffic before measuring starts (not counted).
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Open loop: total offer → answer round trips per second over all pairs. Without it, each
    /// pair runs closed loop (next offer when the answer arrives).
    #[arg(long, value_name = "ROUND_TRIPS_PER_SECOND")]
    rate: Option<f64>,
    /// Size of each offer's and answer's SDP object, in bytes (100..=60000).
    #[arg(long, default_value_t = 3072)]
    sdp_bytes: usize,
    /// Connections being set up at once.
    #[arg(long, default_value_t = 64)]
    connect_concurrency: usize,
    /// With several `--target`s: put each pair's two sides on different nodes (`cross`) or on
    /// the same node (`local`); pairs take the nodes in turn either way.
    #[arg(long, value_enum, default_value_t = Placement::Cross)]
    placement: Placement,
}

/// Where a pair's two sides connect when there are several targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Placement {
    /// Caller on node `i`, callee on node `i + 1`: every message crosses between nodes.
    Cross,
    /// Both sides of pair `i` on node `i`: no message leaves its node.
    Local,
}

impl Placement {
    /// The (caller, callee) target indexes of pair `index` among `nodes` targets.
    fn nodes(self, index: usize, nodes: usize) -> (usize, usize) {
        let caller = index % nodes;
        match self {
            Placement::Cross => (caller, (index + 1) % nodes),
            Placement::Local => (caller, caller),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Placement::Cross => "cross",
            Placement::Local => "local",
        }
    }
}

/// How long an answer may take before the round trip counts as lost (and the pair stops).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// After the window ends, how long open-loop pairs wait for answers still in flight.
const DRAIN: Duration = Duration::from_secs(5);

/// What one pair measured.
#[derive(Default)]
struct PairResult {
    latencies: Latencies,
    /// Open loop: how late this client sent offers after their scheduled time (client-side lag,
    /// included in `latencies`; large values mean the load generator, not the gateway, fell behind).
    send_lag: Latencies,
    /// Round trips scheduled in the window and completed.
    round_trips: u64,
    errors: u64,
    /// Offers sent whose answer never came (open loop, after the drain).
    lost: u64,
    first_error: Option<String>,
}

impl PairResult {
    fn error(&mut self, e: impl std::fmt::Display) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(e.to_string());
        }
    }
}

/// When the phases of the run begin and end.
#[derive(Clone, Copy)]
struct Window {
    /// First offer.
    start: Instant,
    /// Measuring starts.
    measure: Instant,
    /// No offer is scheduled at or after this.
    end: Instant,
}

impl Window {
    fn counts(&self, scheduled: Instant) -> bool {
        scheduled >= self.measure && scheduled < self.end
    }
}

/// The fixed parts of the messages a pair sends; only the sequence number changes.
#[derive(Clone)]
struct Templates {
    /// `{"type":"offer","clientId":B,"offer":{"type":"offer","seq":` … and the rest after the number.
    offer: (String, String),
    answer: (String, String),
}

impl Templates {
    fn new(a: u64, b: u64, sdp_bytes: usize) -> Templates {
        let split = |kind: &str, to: u64| {
            let sdp = client::session_description(kind, 0, sdp_bytes);
            let (head, tail) = sdp.split_once("\"seq\":0").expect("seq in template");
            (
                format!(r#"{{"type":"{kind}","clientId":{to},"{kind}":{head}"seq":"#),
                format!("{tail}}}"),
            )
        };
        Templates {
            offer: split("offer", b),
            answer: split("answer", a),
        }
    }

    fn fill(buf: &mut Vec<u8>, (head, tail): &(String, String), seq: u64) {
        buf.clear();
        buf.extend_from_slice(head.as_bytes());
        buf.extend_from_slice(seq.to_string().as_bytes());
        buf.extend_from_slice(tail.as_bytes());
    }
}

pub async fn run(
    targets: &[Arc<Target>],
    common: &TargetArgs,
    args: RelayArgs,
) -> Result<Report, Error> {
    if args.pairs == 0 || args.pairs > 10_000 {
        return Err("--pairs must be 1..=10000".into());
    }
    if !(100..=60_000).contains(&args.sdp_bytes) {
        return Err("--sdp-bytes must be 100..=60000".into());
    }
    let duration = super::bounded("duration", args.duration)?;
    let warmup = if args.warmup == 0.0 {
        Duration::ZERO
    } else {
        super::bounded("warmup", args.warmup)?
    };
    if let Some(rate) = args.rate {
        if !(rate > 0.0 && rate <= 1_000_000.0) {
            return Err("--rate must be more than 0 and at most 1000000".into());
        }
    }
    super::check_fd_limit(args.pairs * 2);

    // Set up every pair's call before any traffic.
    let setup_started = std::time::Instant::now();
    let gate = Arc::new(Semaphore::new(args.connect_concurrency.max(1)));
    let mut setups = tokio::task::JoinSet::new();
    for index in 0..args.pairs {
        let (caller, callee) = args.placement.nodes(index, targets.len());
        let (caller, callee) = (targets[caller].clone(), targets[callee].clone());
        let gate = gate.clone();
        let sdp_bytes = args.sdp_bytes;
        setups.spawn(async move {
            let _permit = gate.acquire_owned().await.expect("never closed");
            let set_up = set_up_call(&caller, &callee, sdp_bytes);
            tokio::time::timeout(Duration::from_secs(30), set_up)
                .await
                .map_err(|_| Error::from("call set-up took over 30 s"))?
        });
    }
    let mut pairs = Vec::with_capacity(args.pairs);
    while let Some(done) = setups.join_next().await {
        pairs.push(done.map_err(|e| format!("set-up task failed: {e}"))??);
    }
    let setup_time = setup_started.elapsed();

    let start = Instant::now() + Duration::from_millis(50);
    let window = Window {
        start,
        measure: start + warmup,
        end: start + warmup + duration,
    };
    let cap = MAX_SAMPLES / args.pairs;
    let pacer = args.rate.map(|rate| {
        Arc::new(Pacer {
            start: window.start,
            pairs: pairs.len() as u64,
            rate,
        })
    });
    let mut ticks = Vec::new();
    let mut tasks = tokio::task::JoinSet::new();
    for (index, (a, b, a_id, b_id)) in pairs.into_iter().enumerate() {
        let templates = Templates::new(a_id, b_id, args.sdp_bytes);
        let answerer = tokio::spawn(answer_offers(b, templates.clone()));
        let paced = pacer.clone().map(|pacer| {
            let (tx, rx) = mpsc::unbounded_channel();
            ticks.push(tx);
            ((pacer, index), rx)
        });
        tasks.spawn(async move {
            let mut result = match paced {
                None => closed_loop(a, &templates, window, cap).await,
                Some((pacer, rx)) => open_loop(a, &templates, window, pacer, rx, cap).await,
            };
            match tokio::time::timeout(Duration::from_secs(5), answerer).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => result.error(format!("answering side: {e}")),
                Ok(Err(e)) => result.error(format!("answering task: {e}")),
                Err(_) => result.error("answering side did not see the hang-up"),
            }
            result
        });
    }

    let pacer_thread = pacer.map(|pacer| pacer.spawn(window.end, ticks));

    // The server's use over exactly the measured window.
    let pids = common.server_pid.clone();
    let sampler = tokio::spawn(async move {
        if pids.is_empty() {
            return Ok(None);
        }
        let each = |pids: &[u32]| {
            pids.iter()
                .map(|&pid| stats::sample(Some(pid)))
                .collect::<Result<Vec<_>, _>>()
        };
        tokio::time::sleep_until(window.measure).await;
        let before = each(&pids)?;
        let own_before = stats::sample(None)?;
        tokio::time::sleep_until(window.end).await;
        let after = each(&pids)?;
        let own_after = stats::sample(None)?;
        // Each process's share (a cluster: which node, and Redis), in the order given.
        let per_pid: Vec<f64> = before
            .iter()
            .zip(&after)
            .map(|(b, a)| stats::round3(a.cpu.saturating_sub(b.cpu).as_secs_f64()))
            .collect();
        let (before, after) = (
            stats::total(&before).expect("a PID"),
            stats::total(&after).expect("a PID"),
        );
        Ok::<_, Error>(Some((
            ServerUse::between(before, after),
            own_after.cpu.saturating_sub(own_before.cpu),
            per_pid,
        )))
    });

    let mut total = PairResult::default();
    let deadline = window.end + DRAIN + Duration::from_secs(15);
    loop {
        match tokio::time::timeout_at(deadline, tasks.join_next()).await {
            Ok(Some(Ok(pair))) => {
                total.latencies.merge(pair.latencies);
                total.send_lag.merge(pair.send_lag);
                total.round_trips += pair.round_trips;
                total.errors += pair.errors;
                total.lost += pair.lost;
                if total.first_error.is_none() {
                    total.first_error = pair.first_error;
                }
            }
            Ok(Some(Err(e))) => total.error(format!("pair task failed: {e}")),
            Ok(None) => break,
            Err(_) => {
                total.error(format!("{} pairs did not finish in time", tasks.len()));
                tasks.abort_all();
                break;
            }
        }
    }
    if let Some(thread) = pacer_thread {
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    }
    let usage = sampler
        .await
        .map_err(|e| format!("sampler failed: {e}"))??;

    let seconds = duration.as_secs_f64();
    let round_trips_per_s = total.round_trips as f64 / seconds;
    let messages = total.round_trips * 2;
    let latency = total.latencies.summary();
    let mode = if args.rate.is_some() {
        "open"
    } else {
        "closed"
    };
    let mut human = format!(
        "relay ({mode} loop): {} pairs{}, {} B SDP, {:.1} s measured after {:.1} s warm-up (set-up {:.2} s)\n\
         round trips: {} ({:.0}/s{}), forwarded messages {:.0}/s\n\
         latency (offer sent{} → answer received): {}\n\
         errors: {}, lost: {}",
        args.pairs,
        if targets.len() > 1 {
            format!(" over {} nodes ({})", targets.len(), args.placement.name())
        } else {
            String::new()
        },
        args.sdp_bytes,
        seconds,
        warmup.as_secs_f64(),
        setup_time.as_secs_f64(),
        total.round_trips,
        round_trips_per_s,
        args.rate.map(|r| format!(", target {r:.0}/s")).unwrap_or_default(),
        messages as f64 / seconds,
        if args.rate.is_some() { " at its scheduled time" } else { "" },
        latency.line(),
        total.errors,
        total.lost,
    );
    if let Some(e) = &total.first_error {
        human.push_str(&format!(" (first: {e})"));
    }
    let send_lag = args.rate.map(|_| total.send_lag.summary());
    if let Some(lag) = &send_lag {
        human.push_str(&format!(
            "\nclient send lag (offer written − scheduled, part of the latency above): {}",
            lag.line()
        ));
    }
    let server = usage.map(|(server, own_cpu, per_pid)| {
        let per_message = if messages > 0 {
            server.cpu.as_secs_f64() * 1e6 / messages as f64
        } else {
            0.0
        };
        human.push_str(&format!(
            "\nserver: {:.2} s CPU ({:.0}% of one core, {:.0}% kernel) = {:.1} µs per forwarded message; RSS {} KiB\n\
             load generator: {:.2} s CPU",
            server.cpu.as_secs_f64(),
            server.cpu.as_secs_f64() / seconds * 100.0,
            if server.cpu.is_zero() { 0.0 } else { server.system.as_secs_f64() / server.cpu.as_secs_f64() * 100.0 },
            per_message,
            server.rss_after_kib,
            own_cpu.as_secs_f64(),
        ));
        if per_pid.len() > 1 {
            let shares: Vec<String> = common
                .server_pid
                .iter()
                .zip(&per_pid)
                .map(|(pid, cpu)| format!("{pid}: {cpu:.2} s"))
                .collect();
            human.push_str(&format!("\nCPU per PID: {}", shares.join(", ")));
        }
        json!({
            "cpu_s_per_pid": per_pid,
            "cpu_s": stats::round3(server.cpu.as_secs_f64()),
            "system_cpu_s": stats::round3(server.system.as_secs_f64()),
            "cpu_us_per_message": stats::round3(per_message),
            "rss_kib": server.rss_after_kib,
            "load_generator_cpu_s": stats::round3(own_cpu.as_secs_f64()),
        })
    });
    let json = json!({
        "scenario": "relay",
        "mode": mode,
        "pairs": args.pairs,
        "nodes": targets.len(),
        "placement": args.placement.name(),
        "sdp_bytes": args.sdp_bytes,
        "duration_s": seconds,
        "warmup_s": warmup.as_secs_f64(),
        "target_round_trips_per_s": args.rate,
        "round_trips": total.round_trips,
        "round_trips_per_s": stats::round3(round_trips_per_s),
        "messages_per_s": stats::round3(messages as f64 / seconds),
        "latency": latency.json(),
        "send_lag": send_lag.map(|lag| lag.json()),
        "errors": total.errors,
        "lost": total.lost,
        "first_error": total.first_error,
        "server": server,
    });
    Ok(Report {
        human,
        json,
        errors: total.errors + total.lost,
    })
}

/// Connects A (to `caller`) and B (to `callee`) and puts them in a call: (A, B, A's ID, B's ID).
async fn set_up_call(
    caller: &Target,
    callee: &Target,
    sdp_bytes: usize,
) -> Result<(Socket, Socket, u64, u64), Error> {
    let (mut a, a_id) = caller.join().await?;
    let (mut b, b_id) = callee.join().await?;
    let offer = client::session_description("offer", 0, sdp_bytes);
    let request = format!(
        r#"{{"type":"video-offer-request","id":{a_id},"calleeId":{b_id},"offer":{offer}}}"#
    );
    client::send_text(&mut a, request.as_bytes()).await?;
    expect(&mut b, b"video-answer-request").await?;
    let answer = client::session_description("answer", 0, sdp_bytes);
    let reply = format!(
        r#"{{"type":"client-reply","reply":"1","id":{b_id},"callerId":{a_id},"answer":{answer}}}"#
    );
    client::send_text(&mut b, reply.as_bytes()).await?;
    expect(&mut a, b"server-reply").await?;
    Ok((a, b, a_id, b_id))
}

/// Reads the next message and checks its type.
async fn expect(ws: &mut Socket, kind: &[u8]) -> Result<Vec<u8>, Error> {
    let message = client::recv_text(ws).await?;
    if client::message_type(&message) != kind {
        return Err(format!(
            "expected {}, got {}",
            String::from_utf8_lossy(kind),
            client::preview(&message)
        )
        .into());
    }
    Ok(message)
}

/// B's side: answers every offer with an answer carrying the same `seq`, until A hangs up.
async fn answer_offers(mut b: Socket, templates: Templates) -> Result<(), Error> {
    let mut buf = Vec::new();
    loop {
        let message = client::recv_text(&mut b).await?;
        match client::message_type(&message) {
            b"offer" => {
                let seq = client::json_u64(&message, "seq").ok_or("offer without seq")?;
                Templates::fill(&mut buf, &templates.answer, seq);
                client::send_text(&mut b, &buf).await?;
            }
            b"close-call-server" => {
                client::close(b).await;
                return Ok(());
            }
            _ => return Err(format!("unexpected message: {}", client::preview(&message)).into()),
        }
    }
}

/// A's side, closed loop: offer, wait for its answer, repeat until the window ends; then leave.
async fn closed_loop(
    mut a: Socket,
    templates: &Templates,
    window: Window,
    cap: usize,
) -> PairResult {
    let mut result = PairResult::default();
    let mut buf = Vec::new();
    tokio::time::sleep_until(window.start).await;
    let mut seq = 0u64;
    loop {
        let sent_at = Instant::now();
        if sent_at >= window.end {
            break;
        }
        Templates::fill(&mut buf, &templates.offer, seq);
        if let Err(e) = client::send_text(&mut a, &buf).await {
            result.error(e);
            break;
        }
        match tokio::time::timeout(ANSWER_TIMEOUT, expect(&mut a, b"answer")).await {
            Ok(Ok(answer)) if client::json_u64(&answer, "seq") == Some(seq) => {
                if window.counts(sent_at) {
                    result.round_trips += 1;
                    result.latencies.record(sent_at.elapsed(), cap);
                }
            }
            Ok(Ok(answer)) => {
                result.error(format!("answer out of order: {}", client::preview(&answer)));
                break;
            }
            Ok(Err(e)) => {
                result.error(e);
                break;
            }
            Err(_) => {
                result.lost += 1;
                result.error("no answer within 10 s");
                break;
            }
        }
        seq += 1;
    }
    client::close(a).await;
    result
}

/// Paces every pair's offers from one OS thread: offer `seq` of pair `i` is due at
/// `start + (seq × pairs + i) / rate`, and the thread hands it to that pair's writer at that
/// instant. `std::thread::sleep` wakes within tens of microseconds, where tokio's timer wheel rounds
/// every sleep up to the next millisecond, which would add up to 1 ms of client-side lag to every
/// latency measured from the schedule.
struct Pacer {
    start: Instant,
    pairs: u64,
    rate: f64,
}

impl Pacer {
    /// When offer `seq` of pair `index` is due.
    fn scheduled(&self, index: usize, seq: u64) -> Instant {
        self.start + Duration::from_secs_f64((seq * self.pairs + index as u64) as f64 / self.rate)
    }

    /// Runs the schedule until `end` on its own thread, sending each due `seq` to its pair.
    fn spawn(
        self: Arc<Self>,
        end: Instant,
        ticks: Vec<mpsc::UnboundedSender<u64>>,
    ) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || {
            for k in 0u64.. {
                let (index, seq) = ((k % self.pairs) as usize, k / self.pairs);
                let at = self.scheduled(index, seq);
                if at >= end {
                    break;
                }
                let wait = at.saturating_duration_since(Instant::now());
                if !wait.is_zero() {
                    std::thread::sleep(wait);
                }
                // A pair that already failed has dropped its receiver; the rest go on.
                let _ = ticks[index].send(seq);
            }
        })
    }
}

/// A's side, open loop: a writer sends offer `seq` when the [`Pacer`] says it is due; a reader
/// matches answers to their scheduled time by `seq`, until every offer scheduled before the end
/// of the window is answered (or the drain time runs out).
async fn open_loop(
    a: Socket,
    templates: &Templates,
    window: Window,
    (pacer, index): (Arc<Pacer>, usize),
    mut ticks: mpsc::UnboundedReceiver<u64>,
    cap: usize,
) -> PairResult {
    let scheduled = move |seq: u64| pacer.scheduled(index, seq);
    let expected = (0..).take_while(|&seq| scheduled(seq) < window.end).count() as u64;
    let (mut reader, mut writer) = a.split(tokio::io::split);
    // Pongs (and the close echo) the reader owes the server go out through the writer.
    let (owed_tx, mut owed_rx) = mpsc::channel::<(OpCode, Vec<u8>)>(8);
    let (reader_done_tx, mut reader_done_rx) = tokio::sync::oneshot::channel::<()>();

    let offer = templates.offer.clone();
    let writer_scheduled = scheduled.clone();
    let writer_task = tokio::spawn(async move {
        let mut buf = Vec::new();
        let mut lag = Latencies::default();
        let mut failure = None;
        let mut pacing = true;
        loop {
            tokio::select! {
                biased;
                owed = owed_rx.recv() => match owed {
                    Some((opcode, payload)) => {
                        if let Err(e) = writer.write_frame(Frame::new(true, opcode, None, Payload::Owned(payload))).await {
                            failure = Some(e.to_string());
                            break;
                        }
                    }
                    None => break,
                },
                _ = &mut reader_done_rx => break,
                tick = ticks.recv(), if pacing => match tick {
                    Some(seq) => {
                        let at = writer_scheduled(seq);
                        if window.counts(at) {
                            lag.record(Instant::now().saturating_duration_since(at), cap);
                        }
                        Templates::fill(&mut buf, &offer, seq);
                        if let Err(e) = writer.write_frame(Frame::text(Payload::Borrowed(&buf))).await {
                            failure = Some(e.to_string());
                            break;
                        }
                    }
                    None => pacing = false,
                },
            }
        }
        let _ = writer.write_frame(Frame::close(1000, b"")).await;
        (failure, lag)
    });

    let mut result = PairResult::default();
    let mut received = 0u64;
    let mut owe = |frame: Frame<'_>| {
        let owed = owed_tx.clone();
        let payload = (frame.opcode, frame.payload.to_vec());
        async move { owed.send(payload).await }
    };
    while received < expected {
        let frame =
            match tokio::time::timeout_at(window.end + DRAIN, reader.read_frame(&mut owe)).await {
                Ok(Ok(frame)) => frame,
                Ok(Err(e)) => {
                    result.error(e);
                    break;
                }
                Err(_) => break,
            };
        match frame.opcode {
            OpCode::Text => {}
            OpCode::Close => {
                result.error(client::close_error(&frame.payload));
                break;
            }
            _ => continue,
        }
        let now = Instant::now();
        let message = &frame.payload[..];
        match (
            client::message_type(message),
            client::json_u64(message, "seq"),
        ) {
            (b"answer", Some(seq)) if seq == received => {
                received += 1;
                let at = scheduled(seq);
                if window.counts(at) {
                    result.round_trips += 1;
                    result
                        .latencies
                        .record(now.saturating_duration_since(at), cap);
                }
            }
            _ => {
                result.error(format!("unexpected message: {}", client::preview(message)));
                break;
            }
        }
    }
    let _ = reader_done_tx.send(());
    drop(owed_tx);
    match tokio::time::timeout(Duration::from_secs(5), writer_task).await {
        Ok(Ok((failure, lag))) => {
            result.send_lag.merge(lag);
            if let Some(e) = failure {
                result.error(format!("sending offers: {e}"));
            }
        }
        Ok(Err(e)) => result.error(format!("writer task: {e}")),
        Err(_) => result.error("writer did not finish"),
    }
    result.lost += expected.saturating_sub(received);
    result
}

#[cfg(test)]
mod tests {
    use super::Placement;

    #[test]
    fn cross_placement_puts_every_pair_across_two_nodes_and_local_on_one() {
        let cross: Vec<_> = (0..4).map(|i| Placement::Cross.nodes(i, 2)).collect();
        assert_eq!(cross, [(0, 1), (1, 0), (0, 1), (1, 0)]);
        let local: Vec<_> = (0..4).map(|i| Placement::Local.nodes(i, 2)).collect();
        assert_eq!(local, [(0, 0), (1, 1), (0, 0), (1, 1)]);
        // One target: both placements are that one node.
        assert_eq!(Placement::Cross.nodes(3, 1), (0, 0));
    }
}
