//! The one Redis connection a node shares between all its tasks, and what it reports about it.
//!
//! [`Redis`] wraps redis-rs's `ConnectionManager` (one multiplexed connection that reconnects by
//! itself) so that every command, script and pipeline:
//! - is cut off after [`COMMAND_TIMEOUT`], so a Redis that stops answering never stalls a caller
//!   for longer than that;
//! - is timed into `callgate_redis_round_trip_seconds`, and counted into
//!   `callgate_redis_errors_total{kind}` when it fails;
//! - moves `callgate_redis_up` and writes one log line when Redis goes away and one when it comes
//!   back: once per outage, never once per command.
//!
//! Nothing here panics on a Redis error: every failure is a [`RedisError`] value for the caller to
//! turn into a clear answer. Callers use [`Redis::query`] and [`Redis::pipeline`], or hand
//! [`Redis::connection`] to redis-rs (`Script::invoke_async`, `Cmd::query_async`): it implements
//! redis-rs's `ConnectionLike`, so scripts get the same timeout, timing and health tracking.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts};
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::{Cmd, FromRedisValue, Pipeline, RedisFuture, Value};

use crate::config::RedisUrl;
use crate::metrics::Metrics;

/// Longest a command (or pipeline, or script) may take, round trip included, before it fails
/// with [`RedisError::Timeout`]. Heartbeats run every second, so a stuck Redis shows within one.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(1);

/// Longest a (re)connection attempt may take, TLS handshake and AUTH included.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Why a Redis command failed. Every variant is an answer for the client, never a panic.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RedisError {
    /// No answer within [`COMMAND_TIMEOUT`]: Redis is overloaded, paused or unreachable.
    #[error("Redis did not answer within {0:?}")]
    Timeout(Duration),
    /// The connection could not be made or broke (refused, reset, DNS, TLS).
    #[error("cannot reach Redis: {0}")]
    Connection(String),
    /// Redis refused the user or password (AUTH failed, NOAUTH, WRONGPASS).
    #[error("Redis refused our user or password: {0}")]
    Auth(String),
    /// Redis answered with an error (out of memory, read-only replica, a script error, a
    /// command the ACL does not allow).
    #[error("Redis answered with an error: {0}")]
    Server(String),
    /// The answer had an unexpected shape, or the client could not be set up.
    #[error("unexpected exchange with Redis: {0}")]
    Other(String),
}

/// The `kind` label values of `callgate_redis_errors_total`, in [`RedisError::index`] order.
const ERROR_KINDS: [&str; 5] = ["timeout", "connection", "auth", "server", "other"];

impl RedisError {
    /// The `kind` label of `callgate_redis_errors_total`.
    pub fn kind(&self) -> &'static str {
        ERROR_KINDS[self.index()]
    }

    fn index(&self) -> usize {
        match self {
            RedisError::Timeout(_) => 0,
            RedisError::Connection(_) => 1,
            RedisError::Auth(_) => 2,
            RedisError::Server(_) => 3,
            RedisError::Other(_) => 4,
        }
    }

    /// Whether the failure says Redis is unreachable (as opposed to refusing one command).
    pub fn is_outage(&self) -> bool {
        matches!(
            self,
            RedisError::Timeout(_) | RedisError::Connection(_) | RedisError::Auth(_)
        )
    }

    fn from_redis(e: &redis::RedisError) -> RedisError {
        use redis::ErrorKind;
        let text = e.to_string();
        if e.is_timeout() {
            return RedisError::Timeout(COMMAND_TIMEOUT);
        }
        match e.kind() {
            ErrorKind::Io => RedisError::Connection(text),
            ErrorKind::AuthenticationFailed => RedisError::Auth(text),
            // NOPERM is an answer to one command (an ACL without it): Redis is there, so it is
            // a `Server` error, logged by the caller, not an outage.
            ErrorKind::Server(_) if text.contains("NOAUTH") || text.contains("WRONGPASS") => {
                RedisError::Auth(text)
            }
            ErrorKind::Server(_) | ErrorKind::Extension => RedisError::Server(text),
            _ => RedisError::Other(text),
        }
    }
}

/// Pre-resolved handles for the `callgate_redis_*` families.
#[derive(Clone)]
pub struct RedisMetrics {
    /// `callgate_redis_round_trip_seconds`: every command, pipeline and script, failed ones too.
    pub round_trip: Histogram,
    /// `callgate_redis_errors_total{kind}`, indexed like `ERROR_KINDS`.
    errors: Vec<IntCounter>,
    /// `callgate_redis_up`: 1 while the last command reached Redis, else 0.
    pub up: IntGauge,
}

impl RedisMetrics {
    /// Registers the families in `metrics`' registry (on every node, so a dashboard sees zeros on
    /// a single node rather than no series).
    pub fn register(metrics: &Metrics) -> RedisMetrics {
        Self::families(metrics).expect("the Redis metric definitions are valid")
    }

    fn families(metrics: &Metrics) -> prometheus::Result<RedisMetrics> {
        let round_trip = Histogram::with_opts(
            HistogramOpts::new(
                "redis_round_trip_seconds",
                "Time from sending a Redis command (or pipeline, or script) to its answer or failure.",
            )
            .buckets(vec![
                0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
            ]),
        )?;
        let errors = IntCounterVec::new(
            Opts::new(
                "redis_errors_total",
                "Failed Redis commands, by kind (timeout, connection, auth, server, other).",
            ),
            &["kind"],
        )?;
        let up = IntGauge::new(
            "redis_up",
            "1 while this node reaches Redis (its last command got an answer), else 0; always 0 \
             without redis-url.",
        )?;
        metrics.register(Box::new(round_trip.clone()));
        metrics.register(Box::new(errors.clone()));
        metrics.register(Box::new(up.clone()));
        Ok(RedisMetrics {
            round_trip,
            errors: ERROR_KINDS
                .iter()
                .map(|kind| errors.with_label_values(&[kind]))
                .collect(),
            up,
        })
    }
}

/// Whether Redis was reachable at the last command: drives the gauge and the outage log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Health {
    /// No command has finished yet.
    Unknown = 0,
    /// The last command got an answer (an error answer included).
    Up = 1,
    /// The last command could not reach Redis.
    Down = 2,
}

/// What every clone of [`Redis`] shares.
struct Shared {
    /// The URL with its password masked, for log lines.
    url: String,
    /// Round-trip histogram, error counters, up gauge.
    metrics: RedisMetrics,
    /// A [`Health`] as `u8`; swapped, so exactly one command logs each change.
    health: AtomicU8,
}

/// A node's connection to Redis: cheap to clone, shared by every task.
#[derive(Clone)]
pub struct Redis {
    /// The client the manager was made from; the bus opens its own subscriber connection from it.
    client: redis::Client,
    /// redis-rs's self-reconnecting multiplexed connection.
    manager: ConnectionManager,
    /// Metrics and health, shared by clones.
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Redis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redis")
            .field("url", &self.shared.url)
            .finish_non_exhaustive()
    }
}

impl Redis {
    /// Sets up the connection without connecting: the first command connects, and a Redis that
    /// is down at start does not stop the node from serving (it serves as a single node until
    /// Redis answers). Must be called inside a Tokio runtime.
    pub fn open(url: &RedisUrl, metrics: RedisMetrics) -> Result<Redis, RedisError> {
        let client = redis::Client::open(url.expose())
            .map_err(|e| RedisError::Other(format!("{url}: {}", e.category())))?;
        // One quick retry per attempt: a command that finds Redis gone fails within
        // COMMAND_TIMEOUT, and the next command (the heartbeat, every second) tries again.
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(COMMAND_TIMEOUT))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(200));
        let manager = ConnectionManager::new_lazy_with_config(client.clone(), config)
            .map_err(|e| RedisError::from_redis(&e))?;
        metrics.up.set(0);
        Ok(Redis {
            client,
            manager,
            shared: Arc::new(Shared {
                url: url.to_string(),
                metrics,
                health: AtomicU8::new(Health::Unknown as u8),
            }),
        })
    }

    /// A handle for redis-rs calls (`Script::invoke_async`, `Cmd::query_async`) that times out,
    /// times and tracks health like [`query`](Self::query).
    pub fn connection(&self) -> RedisConnection {
        RedisConnection(self.clone())
    }

    /// The client, for a connection of its own that the shared one cannot be: a pub/sub
    /// subscriber (which blocks its connection). Commands should use [`connection`](Self::connection).
    pub fn client(&self) -> &redis::Client {
        &self.client
    }

    /// Runs one command.
    pub async fn query<T: FromRedisValue>(&self, cmd: &Cmd) -> Result<T, RedisError> {
        let mut conn = self.connection();
        cmd.query_async(&mut conn)
            .await
            .map_err(|e| RedisError::from_redis(&e))
    }

    /// Runs a pipeline (one round trip).
    pub async fn pipeline<T: FromRedisValue>(&self, pipe: &Pipeline) -> Result<T, RedisError> {
        let mut conn = self.connection();
        pipe.query_async(&mut conn)
            .await
            .map_err(|e| RedisError::from_redis(&e))
    }

    /// Runs a Lua script (EVALSHA, loading it on NOSCRIPT).
    pub async fn script<T: FromRedisValue>(
        &self,
        invocation: &redis::ScriptInvocation<'_>,
    ) -> Result<T, RedisError> {
        let mut conn = self.connection();
        invocation
            .invoke_async(&mut conn)
            .await
            .map_err(|e| RedisError::from_redis(&e))
    }

    /// Whether the last command reached Redis.
    pub fn is_up(&self) -> bool {
        self.shared.health.load(Ordering::Relaxed) == Health::Up as u8
    }

    /// Runs `exchange` with the timeout, and records its time and outcome. An answer that is a
    /// Redis error (`answered_error`: WRONGTYPE, OOM, a script error; redis-rs hands those back as
    /// values and turns them into errors later) counts as a `server` error.
    async fn timed<T>(
        &self,
        exchange: impl std::future::Future<Output = redis::RedisResult<T>>,
        answered_error: impl FnOnce(&T) -> bool,
    ) -> redis::RedisResult<T> {
        let started = Instant::now();
        let outcome = match tokio::time::timeout(COMMAND_TIMEOUT, exchange).await {
            Ok(result) => result,
            Err(_) => Err(redis::RedisError::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {COMMAND_TIMEOUT:?}"),
            ))),
        };
        let shared = &self.shared;
        shared
            .metrics
            .round_trip
            .observe(started.elapsed().as_secs_f64());
        match &outcome {
            Ok(answer) => {
                if answered_error(answer) {
                    shared.metrics.errors[RedisError::Server(String::new()).index()].inc();
                }
                self.set_health(Health::Up, None);
            }
            Err(e) => {
                let error = RedisError::from_redis(e);
                shared.metrics.errors[error.index()].inc();
                if error.is_outage() {
                    self.set_health(Health::Down, Some(&error));
                } else {
                    // Redis answered: it is there, even if it refused this command.
                    self.set_health(Health::Up, None);
                }
            }
        }
        outcome
    }

    /// Records the health after a command; the one command that changes it writes the log line.
    fn set_health(&self, now: Health, error: Option<&RedisError>) {
        let shared = &self.shared;
        let before = shared.health.swap(now as u8, Ordering::AcqRel);
        if before == now as u8 {
            return;
        }
        shared.metrics.up.set(i64::from(now == Health::Up));
        match (before, now) {
            (b, Health::Up) if b == Health::Unknown as u8 => {
                tracing::info!(redis = %shared.url, "connected to Redis: cluster mode on");
            }
            (_, Health::Up) => tracing::warn!(
                redis = %shared.url,
                "Redis is reachable again: cluster features are back"
            ),
            (_, _) => tracing::error!(
                redis = %shared.url,
                error = %error.map_or_else(String::new, ToString::to_string),
                "Redis is unreachable: calls between clients on this node go on; cross-node \
                 calls and resumes fail with cluster_unavailable until it returns (retrying \
                 every second)"
            ),
        }
    }
}

/// [`Redis`] as a redis-rs connection: every request goes through its timeout and metrics.
#[derive(Clone)]
pub struct RedisConnection(Redis);

impl ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        let mut manager = self.0.manager.clone();
        let redis = self.0.clone();
        Box::pin(async move {
            redis
                .timed(manager.send_packed_command(cmd), is_counted_error)
                .await
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        let mut manager = self.0.manager.clone();
        let redis = self.0.clone();
        Box::pin(async move {
            redis
                .timed(
                    manager.send_packed_commands(pipeline, offset, count),
                    |answers: &Vec<Value>| answers.iter().any(is_counted_error),
                )
                .await
        })
    }

    fn get_db(&self) -> i64 {
        self.0.manager.get_db()
    }
}

/// Whether an answer is an error worth counting: every error answer but NOSCRIPT, which only
/// means the script cache was empty (after a Redis restart) and redis-rs loads it and retries.
fn is_counted_error(answer: &Value) -> bool {
    match answer {
        Value::ServerError(e) => e.kind() != Some(redis::ServerErrorKind::NoScript),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_kinds_are_a_small_fixed_set() {
        let io = redis::RedisError::from(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "refused",
        ));
        assert_eq!(RedisError::from_redis(&io).kind(), "connection");
        let slow =
            redis::RedisError::from(std::io::Error::new(std::io::ErrorKind::TimedOut, "slow"));
        assert_eq!(RedisError::from_redis(&slow).kind(), "timeout");
        assert!(RedisError::from_redis(&slow).is_outage());
    }

    #[tokio::test]
    async fn a_redis_that_is_not_there_fails_fast_and_is_logged_down() {
        // A port nobody listens on: bind, learn the port, close.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let metrics = Metrics::new();
        let url: RedisUrl = format!("redis://:hunter2@127.0.0.1:{port}")
            .parse()
            .unwrap();
        let redis = Redis::open(&url, RedisMetrics::register(&metrics)).unwrap();
        let started = Instant::now();
        let error = redis
            .query::<String>(&redis::cmd("PING"))
            .await
            .unwrap_err();
        assert!(error.is_outage(), "{error}");
        assert!(started.elapsed() <= COMMAND_TIMEOUT + Duration::from_millis(500));
        assert!(!redis.is_up());
        let text = metrics.encode();
        assert!(text.contains("callgate_redis_up 0"), "{text}");
        assert!(!format!("{redis:?}").contains("hunter2"));
    }
}
