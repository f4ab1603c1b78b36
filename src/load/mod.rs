//! The load generator behind `callgate-load`: three scenarios over real TLS WebSockets against a
//! gateway on this machine.
//!
//! | file | what it holds |
//! |---|---|
//! | `mod.rs` | the command line, target checks, the summary and JSON line |
//! | `client.rs` | TLS + WebSocket client connections (hand-written upgrade, spread source addresses) |
//! | `relay.rs` | `relay`: call pairs doing `offer` → `answer` round trips, closed or open loop |
//! | `idle.rs` | `idle`: N connections that take their ID and sit, answering heartbeats |
//! | `churn.rs` | `churn`: connect → call → hang up → disconnect cycles at a given rate |
//! | `stats.rs` | latency percentiles and the server's CPU time and RSS from `/proc` |
//!
//! Every run is bounded in time and size, refuses targets that are not loopback (this is a
//! benchmark tool, not a way to load someone else's server), prints a human summary on stderr and
//! exactly one JSON line on stdout.

mod churn;
mod client;
mod idle;
mod relay;
mod stats;

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

/// Any failure in the tool; its message is shown to the user as is.
pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// Drive a callgate on this machine over real WSS and report what it sustained.
#[derive(Debug, Parser)]
#[command(name = "callgate-load", version)]
struct Cli {
    #[command(flatten)]
    target: TargetArgs,
    #[command(subcommand)]
    scenario: Scenario,
}

/// Where the gateway is and how to trust it; shared by every scenario.
#[derive(Debug, Args)]
pub struct TargetArgs {
    /// The gateway's HTTPS address; must be a loopback address. Repeat it (or give a comma list)
    /// to spread the load over several nodes of a cluster: `relay` puts each pair's two sides on
    /// different nodes (`--placement cross`) or both on one (`local`), `idle` and `churn` take the
    /// nodes in turn.
    #[arg(
        long,
        global = true,
        default_value = "127.0.0.1:8443",
        value_delimiter = ','
    )]
    pub target: Vec<String>,
    /// TLS server name (SNI) and Host header.
    #[arg(long, global = true, default_value = "localhost")]
    pub server_name: String,
    /// PEM file with the certificate (or CA) to trust, e.g. the server's `certs/cert.pem`.
    #[arg(long, global = true, value_name = "FILE", conflicts_with = "insecure")]
    pub ca: Option<PathBuf>,
    /// Accept any server certificate. Loopback only, like everything here.
    #[arg(long, global = true)]
    pub insecure: bool,
    /// WebSocket path.
    #[arg(long, global = true, default_value = "/socket")]
    pub path: String,
    /// Spread connections over this many source addresses 127.0.0.1, 127.0.0.2, … (IPv4 targets),
    /// so ephemeral ports and the server's per-IP limits are shared out.
    #[arg(long, global = true, default_value_t = 16)]
    pub sources: u8,
    /// The server's process ID: report its CPU time per forwarded message and its RSS. Repeat it
    /// (or give a comma list) for a cluster: the nodes' (and Redis's, if given) CPU is summed.
    #[arg(long, global = true, value_name = "PID", value_delimiter = ',')]
    pub server_pid: Vec<u32>,
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// P call pairs doing offer → answer round trips (in-call renegotiation messages).
    Relay(relay::RelayArgs),
    /// N connections that each get their ID and then sit, answering the server's heartbeats.
    Idle(idle::IdleArgs),
    /// Connect → call → hang up → disconnect cycles at a fixed rate.
    Churn(churn::ChurnArgs),
}

/// Longest run any scenario accepts.
pub const MAX_DURATION: Duration = Duration::from_secs(600);

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("callgate-load: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        let targets = client::Target::all(&cli.target)?;
        match cli.scenario {
            Scenario::Relay(args) => relay::run(&targets, &cli.target, args).await,
            Scenario::Idle(args) => idle::run(&targets, &cli.target, args).await,
            Scenario::Churn(args) => churn::run(&targets, &cli.target, args).await,
        }
    });
    match result {
        Ok(report) => {
            eprintln!("{}", report.human);
            println!("{}", report.json);
            if report.errors == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("callgate-load: {e}");
            ExitCode::from(2)
        }
    }
}

/// What a scenario hands back: a summary for people, one JSON object for scripts.
pub struct Report {
    /// Multi-line human summary (stderr).
    pub human: String,
    /// One JSON object (stdout, one line).
    pub json: serde_json::Value,
    /// Errors seen; a run with errors exits with status 1.
    pub errors: u64,
}

/// Resolves `target` and refuses anything that is not loopback.
pub fn loopback_addr(target: &str) -> Result<SocketAddr, Error> {
    let addrs: Vec<SocketAddr> = target
        .to_socket_addrs()
        .map_err(|e| format!("--target {target}: {e}"))?
        .collect();
    let addr = *addrs
        .first()
        .ok_or_else(|| format!("--target {target}: resolves to no address"))?;
    if addrs.iter().any(|a| !a.ip().is_loopback()) {
        return Err(format!(
            "--target {target}: not a loopback address; callgate-load only loads a gateway on this machine"
        )
        .into());
    }
    Ok(addr)
}

/// Checks a duration against [`MAX_DURATION`].
pub fn bounded(name: &str, seconds: f64) -> Result<Duration, Error> {
    if !(seconds > 0.0 && seconds <= MAX_DURATION.as_secs_f64()) {
        return Err(format!(
            "--{name} {seconds}: must be more than 0 and at most {} s",
            MAX_DURATION.as_secs()
        )
        .into());
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// Warns when the open-file limit cannot hold `sockets` connections plus some slack.
pub fn check_fd_limit(sockets: usize) {
    let Ok(limits) = std::fs::read_to_string("/proc/self/limits") else {
        return;
    };
    let soft = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse::<usize>().ok());
    if let Some(soft) = soft {
        if soft < sockets + 64 {
            eprintln!(
                "callgate-load: warning: open-file limit {soft} < {sockets} sockets; raise it with `ulimit -n`"
            );
        }
    }
}
