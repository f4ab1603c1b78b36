//! `churn`: whole short sessions at a fixed rate, as users arriving, calling and leaving do.
//!
//! One cycle: A and B connect (TLS, upgrade, `id`); A sends `video-offer-request` (1 KB SDP); B
//! accepts with `client-reply`; A reads `server-reply`; A hangs up with `close-call-client`; B reads
//! `close-call-server`; both close with 1000. Cycles start on an open-loop schedule (`--rate` per
//! second); the latency of a cycle is measured from its scheduled start, so a slow gateway shows
//! up as latency and, past `--max-in-flight`, as errors, not as a quietly lower rate.

use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use serde_json::json;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::client::{self, Socket, Target};
use super::stats::{self, Latencies, ServerUse, MAX_SAMPLES};
use super::{Error, Report, TargetArgs};

/// `callgate-load churn` options.
#[derive(Debug, Args)]
pub struct ChurnArgs {
    /// Cycles started per second.
    #[arg(long, default_value_t = 50.0)]
    rate: f64,
    /// Seconds during which cycles start, at most 600.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Cycles in progress at once; a cycle that finds no room counts as an error.
    #[arg(long, default_value_t = 1000)]
    max_in_flight: usize,
}

/// Longest a cycle may take.
const CYCLE_TIMEOUT: Duration = Duration::from_secs(10);

pub async fn run(
    targets: &[Arc<Target>],
    common: &TargetArgs,
    args: ChurnArgs,
) -> Result<Report, Error> {
    let duration = super::bounded("duration", args.duration)?;
    if !(args.rate > 0.0 && args.rate <= 10_000.0) {
        return Err("--rate must be more than 0 and at most 10000".into());
    }
    super::check_fd_limit(args.max_in_flight * 2);
    let before = stats::sample_servers(&common.server_pid)?;
    let room = Arc::new(Semaphore::new(args.max_in_flight.max(1)));
    let start = Instant::now() + Duration::from_millis(20);
    let interval = Duration::from_secs_f64(1.0 / args.rate);
    let mut cycles = tokio::task::JoinSet::new();
    let mut tally = Tally::default();
    let mut scheduled = 0u64;
    loop {
        let at = start + interval.mul_f64(scheduled as f64);
        if at >= start + duration {
            break;
        }
        tokio::time::sleep_until(at).await;
        // Several nodes: each cycle's caller on one, its callee on the next.
        let n = scheduled as usize;
        let caller = targets[n % targets.len()].clone();
        let callee = targets[(n + 1) % targets.len()].clone();
        let permit = room.clone().try_acquire_owned();
        cycles.spawn(async move {
            let Ok(_permit) = permit else {
                return Err(Error::from("too many cycles in flight"));
            };
            match tokio::time::timeout(CYCLE_TIMEOUT, cycle(&caller, &callee)).await {
                Ok(Ok(())) => Ok(at.elapsed()),
                Ok(Err(e)) => Err(e),
                Err(_) => Err("cycle took over 10 s".into()),
            }
        });
        scheduled += 1;
        // Reap finished cycles as we go so the set stays small.
        while let Some(done) = cycles.try_join_next() {
            tally.add(done);
        }
    }
    let deadline = Instant::now() + CYCLE_TIMEOUT + Duration::from_secs(5);
    loop {
        match tokio::time::timeout_at(deadline, cycles.join_next()).await {
            Ok(Some(done)) => tally.add(done),
            Ok(None) => break,
            Err(_) => {
                tally.errors += cycles.len() as u64;
                tally
                    .first_error
                    .get_or_insert_with(|| "cycles still running at the deadline".into());
                cycles.abort_all();
                break;
            }
        }
    }
    let elapsed = start.elapsed();
    let after = stats::sample_servers(&common.server_pid)?;

    let seconds = duration.as_secs_f64();
    let latency = tally.latencies.summary();
    let mut human = format!(
        "churn: {scheduled} cycles scheduled at {:.0}/s over {seconds:.1} s; {} completed ({:.1}/s)\n\
         cycle latency (scheduled start → both closed): {}\n\
         errors: {}",
        args.rate,
        tally.completed,
        tally.completed as f64 / seconds,
        latency.line(),
        tally.errors,
    );
    if let Some(e) = &tally.first_error {
        human.push_str(&format!(" (first: {e})"));
    }
    let server = match (before, after) {
        (Some(before), Some(after)) => {
            let usage = ServerUse::between(before, after);
            let per_cycle = usage.cpu.as_secs_f64() * 1e6 / tally.completed.max(1) as f64;
            human.push_str(&format!(
                "\nserver: {:.2} s CPU over {:.1} s ({:.0} µs per cycle: 2 TLS handshakes, 2 upgrades, 3 messages); RSS {} → {} KiB",
                usage.cpu.as_secs_f64(),
                elapsed.as_secs_f64(),
                per_cycle,
                usage.rss_before_kib,
                usage.rss_after_kib,
            ));
            Some(json!({
                "cpu_s": stats::round3(usage.cpu.as_secs_f64()),
                "cpu_us_per_cycle": stats::round3(per_cycle),
                "rss_before_kib": usage.rss_before_kib,
                "rss_after_kib": usage.rss_after_kib,
            }))
        }
        _ => None,
    };
    let json = json!({
        "scenario": "churn",
        "rate": args.rate,
        "duration_s": seconds,
        "scheduled": scheduled,
        "completed": tally.completed,
        "cycles_per_s": stats::round3(tally.completed as f64 / seconds),
        "latency": latency.json(),
        "errors": tally.errors,
        "first_error": tally.first_error,
        "server": server,
    });
    Ok(Report {
        human,
        json,
        errors: tally.errors,
    })
}

/// Results of finished cycles.
#[derive(Default)]
struct Tally {
    latencies: Latencies,
    completed: u64,
    errors: u64,
    first_error: Option<String>,
}

impl Tally {
    fn add(&mut self, done: Result<Result<Duration, Error>, tokio::task::JoinError>) {
        match done {
            Ok(Ok(latency)) => {
                self.completed += 1;
                self.latencies.record(latency, MAX_SAMPLES);
            }
            Ok(Err(e)) => {
                self.errors += 1;
                self.first_error.get_or_insert_with(|| e.to_string());
            }
            Err(e) => {
                self.errors += 1;
                self.first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
}

/// One user session: connect both, call, accept, hang up, leave.
async fn cycle(caller: &Target, callee: &Target) -> Result<(), Error> {
    let ((mut a, a_id), (mut b, b_id)) = tokio::try_join!(caller.join(), callee.join())?;
    let offer = client::session_description("offer", 0, 1024);
    let request = format!(
        r#"{{"type":"video-offer-request","id":{a_id},"calleeId":{b_id},"offer":{offer}}}"#
    );
    client::send_text(&mut a, request.as_bytes()).await?;
    expect(&mut b, b"video-answer-request").await?;
    let answer = client::session_description("answer", 0, 1024);
    let reply = format!(
        r#"{{"type":"client-reply","reply":"1","id":{b_id},"callerId":{a_id},"answer":{answer}}}"#
    );
    client::send_text(&mut b, reply.as_bytes()).await?;
    expect(&mut a, b"server-reply").await?;
    let hangup = format!(r#"{{"type":"close-call-client","id":{a_id},"clientId":{b_id}}}"#);
    client::send_text(&mut a, hangup.as_bytes()).await?;
    expect(&mut b, b"close-call-server").await?;
    tokio::join!(client::close(a), client::close(b));
    Ok(())
}

async fn expect(ws: &mut Socket, kind: &[u8]) -> Result<(), Error> {
    let message = client::recv_text(ws).await?;
    if client::message_type(&message) != kind {
        return Err(format!(
            "expected {}, got {}",
            String::from_utf8_lossy(kind),
            client::preview(&message)
        )
        .into());
    }
    Ok(())
}
