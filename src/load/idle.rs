//! `idle`: N connections that each take their ID and then sit, answering the server's heartbeat
//! pings, as open but quiet browser tabs do.
//!
//! Reports how fast they connected (TLS handshake + upgrade + `id` message, `--concurrency` at a
//! time), the server's RSS growth per connection once they are all open, and — while they are held
//! for `--hold` seconds — the round-trip time of an application `ping` on one more connection every
//! `--probe-ms`, which shows whether heartbeats over all those sockets cause latency spikes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use fastwebsockets::OpCode;
use serde_json::json;
use tokio::sync::{watch, Semaphore};
use tokio::time::Instant;

use super::client::{self, Target};
use super::stats::{self, Latencies, MAX_SAMPLES};
use super::{Error, Report, TargetArgs};

/// `callgate-load idle` options.
#[derive(Debug, Args)]
pub struct IdleArgs {
    /// Connections to open and hold, at most 100 000.
    #[arg(long, default_value_t = 1000)]
    connections: usize,
    /// Seconds to hold them once all are open, at most 600.
    #[arg(long, default_value_t = 10.0)]
    hold: f64,
    /// Connections being set up at once.
    #[arg(long, default_value_t = 128)]
    concurrency: usize,
    /// Milliseconds between the latency probe's pings while holding.
    #[arg(long, default_value_t = 10)]
    probe_ms: u64,
    /// Seconds to wait after the last connect before reading the server's RSS (lets allocator
    /// caches and the handshake's transient buffers settle).
    #[arg(long, default_value_t = 2.0)]
    settle: f64,
}

pub async fn run(
    targets: &[Arc<Target>],
    common: &TargetArgs,
    args: IdleArgs,
) -> Result<Report, Error> {
    if args.connections == 0 || args.connections > 100_000 {
        return Err("--connections must be 1..=100000".into());
    }
    let hold = super::bounded("hold", args.hold)?;
    let settle = super::bounded("settle", args.settle)?;
    super::check_fd_limit(args.connections + 1);
    let pids = &common.server_pid;
    let before = stats::sample_servers(pids)?;

    let (stop_tx, stop_rx) = watch::channel(false);
    let gate = Arc::new(Semaphore::new(args.concurrency.max(1)));
    let connected = Arc::new(AtomicU64::new(0));
    let dropped = Arc::new(AtomicU64::new(0));
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<Result<(), Error>>(1024);
    let started = Instant::now();
    let mut holders = tokio::task::JoinSet::new();
    for n in 0..args.connections {
        // Several nodes: connections take them in turn.
        let target = targets[n % targets.len()].clone();
        let gate = gate.clone();
        let ready = ready_tx.clone();
        let mut stop = stop_rx.clone();
        let dropped = dropped.clone();
        let connected = connected.clone();
        holders.spawn(async move {
            let permit = gate.acquire_owned().await.expect("never closed");
            let joined = tokio::time::timeout(Duration::from_secs(30), target.join()).await;
            drop(permit);
            let mut ws = match joined {
                Ok(Ok((ws, _id))) => ws,
                Ok(Err(e)) => {
                    let _ = ready.send(Err(e)).await;
                    return;
                }
                Err(_) => {
                    let _ = ready.send(Err("connect took over 30 s".into())).await;
                    return;
                }
            };
            connected.fetch_add(1, Ordering::Relaxed);
            let _ = ready.send(Ok(())).await;
            drop(ready);
            // Sit: read (answering pings inside fastwebsockets) until told to stop.
            loop {
                tokio::select! {
                    _ = stop.changed() => break,
                    frame = ws.read_frame() => match frame {
                        Ok(frame) if frame.opcode == OpCode::Close => {
                            dropped.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                        Ok(_) => continue,
                        Err(_) => {
                            dropped.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                    }
                }
            }
            client::close(ws).await;
        });
    }
    drop(ready_tx);
    let mut errors = 0u64;
    let mut first_error = None;
    while let Some(result) = ready_rx.recv().await {
        if let Err(e) = result {
            errors += 1;
            first_error.get_or_insert_with(|| e.to_string());
        }
    }
    let connect_time = started.elapsed();
    let open = connected.load(Ordering::Relaxed);

    tokio::time::sleep(settle).await;
    let loaded = stats::sample_servers(pids)?;

    // Hold, probing latency on one more connection.
    let hold_end = Instant::now() + hold;
    let mut probe = Latencies::default();
    let mut probe_errors = 0u64;
    match targets[0].join().await {
        Ok((mut ws, _)) => {
            while Instant::now() < hold_end {
                let sent = Instant::now();
                let answered = async {
                    client::send_text(&mut ws, br#"{"type":"ping"}"#).await?;
                    let pong = client::recv_text(&mut ws).await?;
                    if client::message_type(&pong) != b"pong" {
                        return Err(Error::from(format!(
                            "expected pong, got {}",
                            client::preview(&pong)
                        )));
                    }
                    Ok(())
                };
                match tokio::time::timeout(Duration::from_secs(5), answered).await {
                    Ok(Ok(())) => probe.record(sent.elapsed(), MAX_SAMPLES),
                    Ok(Err(e)) => {
                        probe_errors += 1;
                        first_error.get_or_insert_with(|| format!("probe: {e}"));
                        break;
                    }
                    Err(_) => {
                        probe_errors += 1;
                        first_error.get_or_insert_with(|| "probe: no pong within 5 s".into());
                        break;
                    }
                }
                tokio::time::sleep(Duration::from_millis(args.probe_ms)).await;
            }
            client::close(ws).await;
        }
        Err(e) => {
            probe_errors += 1;
            first_error.get_or_insert_with(|| format!("probe connect: {e}"));
        }
    }
    tokio::time::sleep_until(hold_end).await;
    let held = stats::sample_servers(pids)?;
    let dropped_during_hold = dropped.load(Ordering::Relaxed);
    let _ = stop_tx.send(true);
    let closing = Instant::now();
    while tokio::time::timeout(Duration::from_secs(20), holders.join_next())
        .await
        .ok()
        .flatten()
        .is_some()
    {}
    holders.abort_all();
    let close_time = closing.elapsed();

    let probe = probe.summary();
    let errors = errors + probe_errors + dropped_during_hold;
    let mut human = format!(
        "idle: {open}/{} connections open in {:.2} s ({:.0} connects/s, {} at a time); held {:.0} s, closed in {:.2} s\n\
         ping probe every {} ms while holding: {}\n\
         errors: {errors} (connect failures, probe failures, {dropped_during_hold} dropped while idle)",
        args.connections,
        connect_time.as_secs_f64(),
        open as f64 / connect_time.as_secs_f64(),
        args.concurrency,
        hold.as_secs_f64(),
        close_time.as_secs_f64(),
        args.probe_ms,
        probe.line(),
    );
    if let Some(e) = &first_error {
        human.push_str(&format!(" (first: {e})"));
    }
    let server = match (before, loaded, held) {
        (Some(before), Some(loaded), Some(held)) => {
            let per_connection =
                (loaded.rss_kib.saturating_sub(before.rss_kib) * 1024) as f64 / open.max(1) as f64;
            human.push_str(&format!(
                "\nserver RSS: {} KiB before, {} KiB with {open} open ({:.0} bytes per connection), {} KiB after holding; CPU while holding {:.2} s",
                before.rss_kib,
                loaded.rss_kib,
                per_connection,
                held.rss_kib,
                held.cpu.saturating_sub(loaded.cpu).as_secs_f64(),
            ));
            Some(json!({
                "rss_before_kib": before.rss_kib,
                "rss_loaded_kib": loaded.rss_kib,
                "rss_after_hold_kib": held.rss_kib,
                "rss_per_connection_bytes": per_connection.round(),
                "hold_cpu_s": stats::round3(held.cpu.saturating_sub(loaded.cpu).as_secs_f64()),
            }))
        }
        _ => None,
    };
    let json = json!({
        "scenario": "idle",
        "connections": args.connections,
        "open": open,
        "connect_s": stats::round3(connect_time.as_secs_f64()),
        "connects_per_s": stats::round3(open as f64 / connect_time.as_secs_f64()),
        "hold_s": hold.as_secs_f64(),
        "dropped": dropped_during_hold,
        "probe": probe.json(),
        "errors": errors,
        "first_error": first_error,
        "server": server,
    });
    Ok(Report {
        human,
        json,
        errors,
    })
}
