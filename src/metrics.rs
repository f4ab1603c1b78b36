//! Prometheus metrics: one registry, every family callgate exports, and handles resolved once.
//!
//! Hot paths (per message, per connection) touch only pre-resolved counters — arrays indexed by an
//! enum — never a label lookup or a formatted string. Labels are bounded sets (message types, error
//! codes, route classes, outcomes); a client ID, address or SDP field is never a label.
//! The admin listener that serves `/metrics` lives in `crate::http::admin`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

use crate::signaling::hub::{CallEvent, CallObserver};
pub use crate::signaling::observer::CloseReason;
use crate::signaling::observer::{SessionEvent, SessionLimit, SessionObserver};
use crate::signaling::protocol::{ClientId, ErrorCode, MessageKind, ServerKind};
use crate::turn::TurnStats;

/// Every metric family, registered in one registry.
pub struct Metrics {
    /// What `/metrics` encodes.
    registry: Registry,
    /// The process collector's families (`process_*`), kept apart from the `callgate_` prefix.
    process: Registry,
    /// HTTP requests by route class and status class.
    pub http: HttpMetrics,
    /// TLS handshakes and the certificate.
    pub tls: TlsMetrics,
    /// Refusals by limit.
    pub limits: LimitMetrics,
    /// WebSocket connections and signaling messages.
    pub signaling: SignalingMetrics,
    /// Calls: in progress, setup time, duration.
    pub calls: CallMetrics,
    /// The TURN relay's counters, copied from its atomics at every scrape.
    turn: Mutex<Option<TurnExport>>,
}

/// Prometheus handles mirroring a running relay's [`TurnStats`].
struct TurnExport {
    stats: Arc<TurnStats>,
    allocations_active: IntGauge,
    created: IntCounter,
    quota_user: IntCounter,
    quota_total: IntCounter,
    failed: IntCounter,
    auth_failures: IntCounter,
    refused_peers: IntCounter,
    rate_limited: IntCounter,
    ambiguous_requests: IntCounter,
    quota_hits_ip: IntCounter,
    bandwidth_dropped: IntCounter,
    oversized_dropped: IntCounter,
    client_queue_dropped: IntCounter,
    bytes_to_peer: IntCounter,
    bytes_to_client: IntCounter,
    packets_to_peer: IntCounter,
    packets_to_client: IntCounter,
    stream_connections: IntGauge,
    https_port_connections: IntGauge,
}

impl TurnExport {
    fn register(registry: &Registry, stats: Arc<TurnStats>) -> TurnExport {
        let r = registry;
        let allocations = counter_vec(
            r,
            "turn_allocations_total",
            "TURN Allocate requests, by outcome (created, quota_user, quota_total, failed).",
            &["outcome"],
        );
        let bytes = counter_vec(
            r,
            "turn_relayed_bytes_total",
            "Payload bytes relayed, by direction.",
            &["direction"],
        );
        let packets = counter_vec(
            r,
            "turn_relayed_packets_total",
            "Datagrams relayed, by direction.",
            &["direction"],
        );
        let dropped = counter_vec(
            r,
            "turn_dropped_packets_total",
            "Datagrams the relay dropped, by reason (bandwidth cap, oversized, a TCP/TLS client's full write queue).",
            &["reason"],
        );
        TurnExport {
            stats,
            allocations_active: gauge(r, "turn_allocations_active", "TURN allocations alive now."),
            created: allocations.with_label_values(&["created"]),
            quota_user: allocations.with_label_values(&["quota_user"]),
            quota_total: allocations.with_label_values(&["quota_total"]),
            failed: allocations.with_label_values(&["failed"]),
            auth_failures: counter(r, "turn_auth_failures_total", "TURN requests answered 401 (wrong, expired or malformed credentials)."),
            refused_peers: counter(r, "turn_refused_peers_total", "TURN permissions or channels refused (403) or datagrams dropped by the peer policy."),
            rate_limited: counter(r, "turn_rate_limited_total", "Unauthenticated TURN requests dropped by the per-address rate limit."),
            ambiguous_requests: counter(r, "turn_ambiguous_requests_total", "Authenticated TURN requests answered 400 because the engine could read them differently from the gate."),
            quota_hits_ip: counter(r, "turn_quota_hits_ip_total", "TURN Allocate requests refused (486) because their source address (IPv6: /64) reached allocations-per-ip."),
            bandwidth_dropped: dropped.with_label_values(&["bandwidth"]),
            oversized_dropped: dropped.with_label_values(&["oversized"]),
            client_queue_dropped: dropped.with_label_values(&["client_queue_full"]),
            bytes_to_peer: bytes.with_label_values(&["to_peer"]),
            bytes_to_client: bytes.with_label_values(&["to_client"]),
            packets_to_peer: packets.with_label_values(&["to_peer"]),
            packets_to_client: packets.with_label_values(&["to_client"]),
            stream_connections: gauge(r, "turn_stream_connections_open", "TURN TCP and TLS client connections open now."),
            https_port_connections: gauge(r, "turn_https_port_connections_open", "Of the TURN TLS connections open now, those on the HTTPS port (turn-on-https-port)."),
        }
    }

    /// Copies the relay's atomics into the Prometheus handles.
    fn refresh(&self) {
        let s = self.stats.snapshot();
        let set = |counter: &IntCounter, value: u64| {
            counter.reset();
            counter.inc_by(value);
        };
        self.allocations_active.set(s.allocations_active as i64);
        set(&self.created, s.allocations_created);
        set(&self.quota_user, s.quota_hits_user);
        set(&self.quota_total, s.quota_hits_total);
        set(&self.failed, s.allocations_failed);
        set(&self.auth_failures, s.auth_failures);
        set(&self.refused_peers, s.refused_peers);
        set(&self.rate_limited, s.rate_limited);
        set(&self.ambiguous_requests, s.ambiguous_requests);
        set(&self.quota_hits_ip, s.quota_hits_ip);
        set(&self.bandwidth_dropped, s.bandwidth_dropped);
        set(&self.oversized_dropped, s.oversized_dropped);
        set(&self.client_queue_dropped, s.client_queue_dropped);
        set(&self.bytes_to_peer, s.bytes_to_peers);
        set(&self.bytes_to_client, s.bytes_to_clients);
        set(&self.packets_to_peer, s.packets_to_peers);
        set(&self.packets_to_client, s.packets_to_clients);
        self.stream_connections.set(s.stream_connections as i64);
        self.https_port_connections
            .set(s.https_port_connections as i64);
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let vec = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    registry
        .register(Box::new(vec.clone()))
        .expect("unique metric");
    vec
}

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("valid metric");
    registry
        .register(Box::new(c.clone()))
        .expect("unique metric");
    c
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("valid metric");
    registry
        .register(Box::new(g.clone()))
        .expect("unique metric");
    g
}

fn histogram(registry: &Registry, name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
        .expect("valid metric");
    registry
        .register(Box::new(h.clone()))
        .expect("unique metric");
    h
}

/// What kind of route a request hit (a bounded label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteClass {
    /// A file from `public/`.
    Static,
    /// `/healthz`, `/readyz`.
    Health,
    /// A WebSocket upgrade (answered 101, or refused).
    WebSocket,
    /// The plain-HTTP redirect listener.
    Redirect,
    /// `/api/...` endpoints.
    Api,
}

impl RouteClass {
    const ALL: [RouteClass; 5] = [
        RouteClass::Static,
        RouteClass::Health,
        RouteClass::WebSocket,
        RouteClass::Redirect,
        RouteClass::Api,
    ];

    fn label(self) -> &'static str {
        match self {
            RouteClass::Static => "static",
            RouteClass::Health => "health",
            RouteClass::WebSocket => "websocket",
            RouteClass::Redirect => "redirect",
            RouteClass::Api => "api",
        }
    }
}

const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// `callgate_http_requests_total{route,status}`.
pub struct HttpMetrics {
    /// `[route][status class]`.
    requests: Vec<[IntCounter; 5]>,
}

impl HttpMetrics {
    /// Counts one response.
    pub fn record(&self, route: RouteClass, status: u16) {
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        self.requests[route as usize][class].inc();
    }
}

/// TLS handshakes, certificate reloads and expiry.
pub struct TlsMetrics {
    /// Completed handshakes.
    pub handshakes_ok: IntCounter,
    /// Handshakes that failed (bad client hello, untrusted, protocol error).
    pub handshakes_failed: IntCounter,
    /// Handshakes cut off by `tls-handshake-timeout`.
    pub handshakes_timeout: IntCounter,
    /// Duration of completed handshakes.
    pub handshake_seconds: Histogram,
    /// Unix time the served certificate expires.
    pub certificate_expiry: Gauge,
    /// Successful reloads.
    pub reloads_ok: IntCounter,
    /// Reloads that kept the old certificate.
    pub reloads_failed: IntCounter,
}

/// Which limit refused something (a bounded label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// The global connection cap.
    MaxConnections,
    /// WebSocket upgrades per second per address.
    UpgradeRate,
    /// Open WebSockets per address.
    ConnectionsPerIp,
    /// Signaling messages per second per connection.
    Messages,
    /// New calls per minute per connection.
    Calls,
    /// The signaling hub is full (max clients).
    ServerFull,
    /// Too many open connections from one address, on any listener.
    AddressConnections,
}

impl Limit {
    const ALL: [Limit; 7] = [
        Limit::MaxConnections,
        Limit::UpgradeRate,
        Limit::ConnectionsPerIp,
        Limit::Messages,
        Limit::Calls,
        Limit::ServerFull,
        Limit::AddressConnections,
    ];

    fn label(self) -> &'static str {
        match self {
            Limit::MaxConnections => "max_connections",
            Limit::UpgradeRate => "ws_upgrades_per_ip",
            Limit::ConnectionsPerIp => "ws_connections_per_ip",
            Limit::Messages => "ws_messages",
            Limit::Calls => "ws_calls",
            Limit::ServerFull => "signaling_clients",
            Limit::AddressConnections => "connections_per_ip",
        }
    }
}

/// `callgate_rate_limited_total{limit}`.
pub struct LimitMetrics {
    /// Indexed by [`Limit`].
    rejected: Vec<IntCounter>,
}

impl LimitMetrics {
    /// Counts one refusal.
    pub fn rejected(&self, limit: Limit) {
        self.rejected[limit as usize].inc();
    }

    /// The counter for one limit, for code that counts its own refusals.
    pub fn rejected_counter(&self, limit: Limit) -> IntCounter {
        self.rejected[limit as usize].clone()
    }
}

impl CloseReason {
    const ALL: [CloseReason; 8] = [
        CloseReason::Client,
        CloseReason::HeartbeatTimeout,
        CloseReason::SlowClient,
        CloseReason::Replaced,
        CloseReason::Policy,
        CloseReason::TooBig,
        CloseReason::Refused,
        CloseReason::Shutdown,
    ];

    fn label(self) -> &'static str {
        match self {
            CloseReason::Client => "client",
            CloseReason::HeartbeatTimeout => "heartbeat_timeout",
            CloseReason::SlowClient => "slow_client",
            CloseReason::Replaced => "replaced",
            CloseReason::Policy => "policy",
            CloseReason::TooBig => "too_big",
            CloseReason::Refused => "refused",
            CloseReason::Shutdown => "shutdown",
        }
    }
}

/// WebSocket and signaling message counters.
pub struct SignalingMetrics {
    /// `callgate_websocket_connections_open`.
    pub open: IntGauge,
    /// `callgate_websocket_connections_opened_total`.
    pub opened: IntCounter,
    /// `callgate_websocket_connections_closed_total{reason}`, indexed by [`CloseReason`].
    closed: Vec<IntCounter>,
    /// `callgate_signaling_messages_received_total{type}`, indexed by `MessageKind::ALL` order,
    /// plus one for messages that did not parse.
    received: Vec<IntCounter>,
    /// `callgate_signaling_messages_sent_total{type}`, indexed by [`ServerKind::type_index`].
    sent: Vec<IntCounter>,
    /// `callgate_signaling_errors_sent_total{code}`, indexed by `ErrorCode::ALL` order.
    errors: Vec<IntCounter>,
    /// `callgate_heartbeat_timeouts_total`.
    pub heartbeat_timeouts: IntCounter,
    /// `callgate_resumes_total{outcome="ok"}`.
    pub resumes_ok: IntCounter,
    /// `callgate_resumes_total{outcome="failed"}`.
    pub resumes_failed: IntCounter,
    /// `callgate_outbound_queue_overflows_total`.
    pub outbox_overflows: IntCounter,
}

impl SignalingMetrics {
    /// Counts a closed WebSocket.
    pub fn closed(&self, reason: CloseReason) {
        self.closed[reason as usize].inc();
        self.open.dec();
    }

    /// Counts a handled message (`None`: it did not parse), the error it drew and a resume outcome.
    pub fn handled(&self, kind: Option<MessageKind>, error: Option<ErrorCode>) {
        let index = kind.map_or(MessageKind::ALL.len(), |k| k as usize);
        self.received[index].inc();
        if let Some(code) = error {
            self.errors[code as usize].inc();
        }
        if kind == Some(MessageKind::Resume) {
            match error {
                None => self.resumes_ok.inc(),
                Some(_) => self.resumes_failed.inc(),
            }
        }
    }

    /// Counts an error the session raised itself.
    pub fn error(&self, code: ErrorCode) {
        self.errors[code as usize].inc();
    }

    /// Counts an outgoing frame by its type (an `undelivered` notice also by its error code:
    /// `callgate_signaling_errors_sent_total{code="undelivered"}` counts messages the server
    /// accepted but could not deliver, immediate drops and expiries alike).
    pub fn sent(&self, kind: ServerKind) {
        self.sent[kind.type_index()].inc();
        if kind == ServerKind::Error(ErrorCode::Undelivered) {
            self.error(ErrorCode::Undelivered);
        }
    }
}

impl SessionObserver for Metrics {
    fn session_event(&self, event: SessionEvent) {
        let signaling = &self.signaling;
        match event {
            SessionEvent::Opened => {
                signaling.opened.inc();
                signaling.open.inc();
            }
            SessionEvent::Closed(reason) => signaling.closed(reason),
            SessionEvent::Handled { kind, error } => signaling.handled(kind, error),
            SessionEvent::Error(code) => signaling.error(code),
            SessionEvent::Sent(kind) => signaling.sent(kind),
            SessionEvent::Limited(limit) => self.limits.rejected(match limit {
                SessionLimit::ConnectionsPerIp => Limit::ConnectionsPerIp,
                SessionLimit::Messages => Limit::Messages,
                SessionLimit::Calls => Limit::Calls,
                SessionLimit::ServerFull => Limit::ServerFull,
            }),
            SessionEvent::OutboxOverflow => signaling.outbox_overflows.inc(),
            SessionEvent::HeartbeatTimeout => signaling.heartbeat_timeouts.inc(),
        }
    }
}

/// Call counts and timings, fed by the hub's [`CallObserver`] events.
pub struct CallMetrics {
    /// `callgate_calls_in_progress`.
    pub in_progress: IntGauge,
    /// `callgate_calls_total{outcome}`: answered, declined, cancelled (ended before an answer).
    answered: IntCounter,
    declined: IntCounter,
    unanswered: IntCounter,
    /// `callgate_calls_attempted_total`.
    attempted: IntCounter,
    /// Offer to answer.
    setup_seconds: Histogram,
    /// Answer to hang-up.
    duration_seconds: Histogram,
    /// Calls being set up or in progress, keyed by caller ID: when they were offered and answered.
    /// Bounded: a client is in at most one call, and entries are dropped when calls end.
    open: Mutex<HashMap<ClientId, CallTimes>>,
}

/// When one call was offered and (if it was) answered.
#[derive(Debug, Clone, Copy)]
struct CallTimes {
    offered: Instant,
    answered: Option<Instant>,
}

/// Calls tracked at most; beyond it new calls are counted but not timed.
const MAX_TIMED_CALLS: usize = 200_000;

impl CallObserver for CallMetrics {
    fn call_event(&self, event: CallEvent, now: Instant) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        match event {
            CallEvent::Offered { caller, .. } => {
                self.attempted.inc();
                if open.len() < MAX_TIMED_CALLS {
                    open.insert(
                        caller,
                        CallTimes {
                            offered: now,
                            answered: None,
                        },
                    );
                }
            }
            // Counted where the offer was (the caller's node): in a cluster the callee's node
            // reports the answer too, and the caller's node learns it from the bus, so counting
            // only calls offered here counts each call once when summed over nodes.
            CallEvent::Answered { caller, .. } => {
                if let Some(times) = open.get_mut(&caller) {
                    if times.answered.is_none() {
                        self.answered.inc();
                        self.in_progress.inc();
                        times.answered = Some(now);
                        self.setup_seconds
                            .observe(now.saturating_duration_since(times.offered).as_secs_f64());
                    }
                }
            }
            CallEvent::Declined { caller, .. } => {
                if open.remove(&caller).is_some() {
                    self.declined.inc();
                }
            }
            CallEvent::Ended { by, peer, .. } => {
                let times = open.remove(&by).or_else(|| open.remove(&peer));
                match times.and_then(|t| t.answered) {
                    Some(answered) => {
                        self.in_progress.dec();
                        self.duration_seconds
                            .observe(now.saturating_duration_since(answered).as_secs_f64());
                    }
                    None if times.is_some() => self.unanswered.inc(),
                    None => {}
                }
            }
        }
    }
}

impl CallObserver for Metrics {
    fn call_event(&self, event: CallEvent, now: Instant) {
        self.calls.call_event(event, now);
    }
}

impl Metrics {
    /// Registers every family (and the process collector) in a fresh registry.
    pub fn new() -> Self {
        let registry = Registry::new_custom(Some("callgate".into()), None).expect("valid prefix");
        let r = &registry;

        let requests = counter_vec(
            r,
            "http_requests_total",
            "HTTP responses sent, by route class and status class.",
            &["route", "status"],
        );
        let http = HttpMetrics {
            requests: RouteClass::ALL
                .iter()
                .map(|route| {
                    STATUS_CLASSES
                        .map(|status| requests.with_label_values(&[route.label(), status]))
                })
                .collect(),
        };

        let handshakes = counter_vec(
            r,
            "tls_handshakes_total",
            "TLS handshakes, by outcome.",
            &["outcome"],
        );
        let reloads = counter_vec(
            r,
            "certificate_reloads_total",
            "Certificate reload attempts, by outcome.",
            &["outcome"],
        );
        let expiry = Gauge::new(
            "certificate_expiry_timestamp_seconds",
            "Unix time at which the served certificate expires.",
        )
        .expect("valid metric");
        r.register(Box::new(expiry.clone())).expect("unique metric");
        let tls = TlsMetrics {
            handshakes_ok: handshakes.with_label_values(&["ok"]),
            handshakes_failed: handshakes.with_label_values(&["failed"]),
            handshakes_timeout: handshakes.with_label_values(&["timeout"]),
            handshake_seconds: histogram(
                r,
                "tls_handshake_duration_seconds",
                "Duration of completed TLS handshakes.",
                vec![
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                ],
            ),
            certificate_expiry: expiry,
            reloads_ok: reloads.with_label_values(&["ok"]),
            reloads_failed: reloads.with_label_values(&["failed"]),
        };

        let rejected = counter_vec(
            r,
            "rate_limited_total",
            "Requests, connections or messages refused by a limit, by limit.",
            &["limit"],
        );
        let limits = LimitMetrics {
            rejected: Limit::ALL
                .iter()
                .map(|l| rejected.with_label_values(&[l.label()]))
                .collect(),
        };

        let closed = counter_vec(
            r,
            "websocket_connections_closed_total",
            "WebSocket connections closed, by reason.",
            &["reason"],
        );
        let received = counter_vec(
            r,
            "signaling_messages_received_total",
            "Signaling messages received, by type (\"invalid\" when unparseable).",
            &["type"],
        );
        let sent = counter_vec(
            r,
            "signaling_messages_sent_total",
            "Signaling messages sent, by type.",
            &["type"],
        );
        let errors = counter_vec(
            r,
            "signaling_errors_sent_total",
            "Error messages sent to clients, by code.",
            &["code"],
        );
        let resumes = counter_vec(
            r,
            "resumes_total",
            "Resume attempts, by outcome.",
            &["outcome"],
        );
        let signaling = SignalingMetrics {
            open: gauge(
                r,
                "websocket_connections_open",
                "WebSocket connections open now.",
            ),
            opened: counter(
                r,
                "websocket_connections_opened_total",
                "WebSocket connections opened.",
            ),
            closed: CloseReason::ALL
                .iter()
                .map(|c| closed.with_label_values(&[c.label()]))
                .collect(),
            received: MessageKind::ALL
                .iter()
                .map(|k| k.as_str())
                .chain(["invalid"])
                .map(|t| received.with_label_values(&[t]))
                .collect(),
            sent: ServerKind::TYPES
                .iter()
                .map(|t| sent.with_label_values(&[t]))
                .collect(),
            errors: ErrorCode::ALL
                .iter()
                .map(|c| errors.with_label_values(&[c.as_str()]))
                .collect(),
            heartbeat_timeouts: counter(
                r,
                "heartbeat_timeouts_total",
                "WebSocket connections closed because pings went unanswered.",
            ),
            resumes_ok: resumes.with_label_values(&["ok"]),
            resumes_failed: resumes.with_label_values(&["failed"]),
            outbox_overflows: counter(
                r,
                "outbound_queue_overflows_total",
                "Clients disconnected because their outbound queue was full or a write stalled.",
            ),
        };

        let outcomes = counter_vec(r, "calls_total", "Calls that got a decision, by outcome (answered, declined, unanswered: ended before an answer).", &["outcome"]);
        let calls = CallMetrics {
            in_progress: gauge(r, "calls_in_progress", "Answered calls not yet ended."),
            answered: outcomes.with_label_values(&["answered"]),
            declined: outcomes.with_label_values(&["declined"]),
            unanswered: outcomes.with_label_values(&["unanswered"]),
            attempted: counter(
                r,
                "calls_attempted_total",
                "Call offers delivered to a callee.",
            ),
            setup_seconds: histogram(
                r,
                "call_setup_duration_seconds",
                "Time from a call's offer to its answer.",
                vec![0.5, 1.0, 2.0, 3.0, 5.0, 8.0, 13.0, 20.0, 30.0, 60.0],
            ),
            duration_seconds: histogram(
                r,
                "call_duration_seconds",
                "Time from a call's answer to its end.",
                vec![
                    10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0,
                ],
            ),
            open: Mutex::new(HashMap::new()),
        };

        let build = IntGauge::with_opts(
            Opts::new("build_info", "Build information; the value is always 1.")
                .const_label("version", env!("CARGO_PKG_VERSION")),
        )
        .expect("valid metric");
        build.set(1);
        r.register(Box::new(build)).expect("unique metric");
        // CPU seconds, resident memory, open and max file descriptors, start time: exported as
        // `process_*` (Prometheus' convention, which dashboards and alerts expect), so they live in
        // a registry without the `callgate_` prefix.
        let process = Registry::new();
        process
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("unique metric");

        Metrics {
            registry,
            process,
            http,
            tls,
            limits,
            signaling,
            calls,
            turn: Mutex::new(None),
        }
    }

    /// Exports a running relay's counters from now on (once).
    pub fn export_turn(&self, stats: Arc<TurnStats>) {
        let mut turn = self.turn.lock().unwrap_or_else(|e| e.into_inner());
        if turn.is_none() {
            *turn = Some(TurnExport::register(&self.registry, stats));
        }
    }

    /// Adds a collector (the TURN relay's, the process collector) to the registry.
    pub fn register(&self, collector: Box<dyn prometheus::core::Collector>) {
        if let Err(e) = self.registry.register(collector) {
            tracing::warn!("metrics collector not registered: {e}");
        }
    }

    /// The text exposition of every metric.
    pub fn encode(&self) -> String {
        // The lock also serialises concurrent scrapes' reset-and-set of the TURN counters.
        let turn = self.turn.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(turn) = turn.as_ref() {
            turn.refresh();
        }
        let mut families = self.registry.gather();
        drop(turn);
        families.extend(self.process.gather());
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&families, &mut out) {
            tracing::error!("encoding metrics: {e}");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn enum_indexes_match_their_all_lists() {
        for (i, code) in ErrorCode::ALL.iter().enumerate() {
            assert_eq!(*code as usize, i);
        }
        for (i, kind) in MessageKind::ALL.iter().enumerate() {
            assert_eq!(*kind as usize, i);
        }
        for (i, l) in Limit::ALL.iter().enumerate() {
            assert_eq!(*l as usize, i);
        }
        for (i, c) in CloseReason::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i);
        }
        for (i, r) in RouteClass::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
        }
    }

    #[test]
    fn sent_frames_are_counted_by_their_type() {
        let m = Metrics::new();
        m.signaling.sent(ServerKind::VideoAnswerRequest);
        m.signaling.sent(ServerKind::Pong);
        m.signaling.sent(ServerKind::Error(ErrorCode::Undelivered));
        m.signaling.sent(ServerKind::Error(ErrorCode::RateLimited));
        let text = m.encode();
        assert!(
            text.contains(
                r#"callgate_signaling_messages_sent_total{type="video-answer-request"} 1"#
            ),
            "{text}"
        );
        assert!(text.contains(r#"callgate_signaling_messages_sent_total{type="pong"} 1"#));
        assert!(text.contains(r#"callgate_signaling_messages_sent_total{type="error"} 2"#));
        // An `undelivered` notice also counts under its code; other errors are counted where
        // they are raised.
        assert!(text.contains(r#"callgate_signaling_errors_sent_total{code="undelivered"} 1"#));
    }

    #[test]
    fn call_events_drive_setup_and_duration() {
        let m = Metrics::new();
        let (a, b) = (ClientId::new(111_111_111), ClientId::new(222_222_222));
        let t0 = Instant::now();
        m.calls.call_event(
            CallEvent::Offered {
                caller: a,
                callee: b,
            },
            t0,
        );
        m.calls.call_event(
            CallEvent::Answered {
                caller: a,
                callee: b,
            },
            t0 + Duration::from_secs(2),
        );
        assert_eq!(m.calls.in_progress.get(), 1);
        m.calls.call_event(
            CallEvent::Ended {
                by: b,
                peer: a,
                reason: crate::signaling::protocol::EndReason::Hangup,
            },
            t0 + Duration::from_secs(62),
        );
        assert_eq!(m.calls.in_progress.get(), 0);
        assert_eq!(m.calls.setup_seconds.get_sample_sum(), 2.0);
        assert_eq!(m.calls.duration_seconds.get_sample_sum(), 60.0);
        assert!(m.calls.open.lock().unwrap().is_empty());
    }
}
