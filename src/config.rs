//! The one configuration type, [`Config`], and where its values come from.
//!
//! Every setting has the same name as a command-line flag (`--https-listen`), a key in the optional
//! TOML file (`https-listen = "…"`) and an environment variable (`CALLGATE_HTTPS_LISTEN`). Precedence:
//! flags > environment > file > defaults. The raw layers are [`Options`] (every field optional);
//! [`Config::resolve`] merges them, applies the defaults and validates, so the rest of the program only
//! ever sees a complete, checked [`Config`]. Defaults are safe on the public internet.
//!
//! This module reads the config file and nothing else: no sockets, no certificates.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::{Deserialize, Deserializer, Serialize};

/// The command line: global [`Options`] plus an optional subcommand.
#[derive(Debug, Parser)]
#[command(
    name = "callgate",
    version,
    about = "Browser video calls in one binary: HTTPS, WebSocket signaling and a TURN relay",
    long_about = "Browser video calls in one binary: HTTPS, WebSocket signaling and a TURN relay.\n\n\
                  Every flag can also be set as CALLGATE_<FLAG> in the environment or as <flag> in the \
                  TOML file given with --config. Precedence: flags > environment > file > defaults."
)]
pub struct Cli {
    /// Settings; every one is optional here and falls back to the environment, the file, then defaults.
    #[command(flatten)]
    pub options: Options,

    /// What to do; without a subcommand callgate serves.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Subcommands other than serving.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Subcommand)]
pub enum Command {
    /// Serve (the default).
    Serve,
    /// Validate the configuration, print the effective values (secrets masked) and exit.
    CheckConfig,
}

/// One layer of settings: the command line (with the environment) or the TOML file.
///
/// Every field is `Option` so that layers can be merged; [`Config`] holds the resolved values. The
/// doc comment of each field is its `--help` text.
#[derive(Debug, Default, Clone, Args, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Options {
    /// TOML file with settings (keys are the flag names without "--").
    #[arg(long, env = "CALLGATE_CONFIG", value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,

    /// Address of the HTTPS listener (web app, WebSocket signaling); `[::]` accepts IPv4 too, and
    /// falls back to 0.0.0.0 on a host without IPv6 [default: [::]:8443].
    #[arg(long, env = "CALLGATE_HTTPS_LISTEN", value_name = "ADDR")]
    pub https_listen: Option<SocketAddr>,

    /// Address of the plain-HTTP listener that only redirects to HTTPS and answers /healthz, or "off"
    /// [default: [::]:8080].
    #[arg(long, env = "CALLGATE_HTTP_LISTEN", value_name = "ADDR|off")]
    pub http_listen: Option<Listen>,

    /// Public base URL of the HTTPS listener, e.g. https://call.example.com, when it differs from
    /// what clients send in Host (port mapping, load balancer). Used for redirects and the origin check.
    #[arg(long, env = "CALLGATE_PUBLIC_URL", value_name = "URL")]
    pub public_url: Option<String>,

    /// Directory of the web app served over HTTPS [default: public].
    #[arg(long, env = "CALLGATE_PUBLIC_DIR", value_name = "DIR")]
    pub public_dir: Option<PathBuf>,

    /// PEM certificate chain (leaf first). Without --tls-cert/--tls-key callgate uses
    /// certs/cert.pem and certs/key.pem, generating a self-signed development pair there if absent.
    #[arg(
        long,
        env = "CALLGATE_TLS_CERT",
        value_name = "FILE",
        requires = "tls_key"
    )]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key (PKCS#8, PKCS#1 or SEC1) for --tls-cert.
    #[arg(
        long,
        env = "CALLGATE_TLS_KEY",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    pub tls_key: Option<PathBuf>,

    /// Directory for the generated development certificate [default: certs].
    #[arg(long, env = "CALLGATE_CERTS_DIR", value_name = "DIR")]
    pub certs_dir: Option<PathBuf>,

    /// How often the certificate files are checked for changes; SIGHUP reloads at once [default: 10s].
    #[arg(long, env = "CALLGATE_TLS_RELOAD_INTERVAL", value_name = "DURATION")]
    pub tls_reload_interval: Option<Seconds>,

    /// A TLS handshake that takes longer than this is cut off [default: 10s].
    #[arg(long, env = "CALLGATE_TLS_HANDSHAKE_TIMEOUT", value_name = "DURATION")]
    pub tls_handshake_timeout: Option<Seconds>,

    /// An HTTP/1 client must send a complete request head within this time; this also bounds how
    /// long an idle keep-alive connection waits for its next request [default: 10s].
    #[arg(long, env = "CALLGATE_HEADER_READ_TIMEOUT", value_name = "DURATION")]
    pub header_read_timeout: Option<Seconds>,

    /// A connection (HTTP/1 or HTTP/2) with no traffic at all for this long is closed [default: 60s].
    #[arg(long, env = "CALLGATE_IDLE_TIMEOUT", value_name = "DURATION")]
    pub idle_timeout: Option<Seconds>,

    /// Most concurrent streams per HTTP/2 connection [default: 100].
    #[arg(long, env = "CALLGATE_H2_MAX_CONCURRENT_STREAMS", value_name = "N")]
    pub h2_max_concurrent_streams: Option<u32>,

    /// Most open connections per client address (IPv6 per /64) on every listener, counted at accept
    /// before any TLS work; behind a trusted PROXY-protocol balancer, per address it names
    /// [default: 128].
    #[arg(long, env = "CALLGATE_CONNECTIONS_PER_IP", value_name = "N")]
    pub connections_per_ip: Option<u32>,

    /// A response that sends no byte for this long (the client stopped reading, or advertises a zero
    /// HTTP/2 window) ends its connection [default: 30s].
    #[arg(long, env = "CALLGATE_RESPONSE_STALL_TIMEOUT", value_name = "DURATION")]
    pub response_stall_timeout: Option<Seconds>,

    /// Largest total size of public-dir, which is held in memory; more fails at startup
    /// [default: 67108864].
    #[arg(long, env = "CALLGATE_PUBLIC_DIR_MAX_BYTES", value_name = "BYTES")]
    pub public_dir_max_bytes: Option<u64>,

    /// Most open client connections over all listeners; more are refused at accept [default: 10000].
    #[arg(long, env = "CALLGATE_MAX_CONNECTIONS", value_name = "N")]
    pub max_connections: Option<usize>,

    /// Threads running connections [default: one per CPU core the process may use].
    #[arg(long, env = "CALLGATE_WORKER_THREADS", value_name = "N")]
    pub worker_threads: Option<usize>,

    /// Max-age of the Strict-Transport-Security header; 0 tells browsers to forget it [default: 31536000s].
    #[arg(long, env = "CALLGATE_HSTS_MAX_AGE", value_name = "DURATION")]
    pub hsts_max_age: Option<Seconds>,

    /// After SIGTERM, how long /readyz reports 503 while new connections are still accepted, so a
    /// load balancer can take this instance out first [default: 0s].
    #[arg(long, env = "CALLGATE_SHUTDOWN_DRAIN_DELAY", value_name = "DURATION")]
    pub shutdown_drain_delay: Option<Seconds>,

    /// After the drain delay, how long in-flight requests may take before callgate exits anyway
    /// [default: 10s].
    #[arg(long, env = "CALLGATE_SHUTDOWN_TIMEOUT", value_name = "DURATION")]
    pub shutdown_timeout: Option<Seconds>,

    /// Origins (e.g. https://app.example.com) allowed to open signaling WebSockets besides this
    /// server's own; comma-separated on the command line [default: none].
    #[arg(
        long,
        env = "CALLGATE_ALLOWED_ORIGINS",
        value_name = "ORIGIN,...",
        value_delimiter = ','
    )]
    pub allowed_origins: Option<Vec<String>>,

    /// Largest signaling message, counted over all fragments [default: 65536].
    #[arg(long, env = "CALLGATE_WS_MAX_MESSAGE_BYTES", value_name = "BYTES")]
    pub ws_max_message_bytes: Option<usize>,

    /// Interval of WebSocket pings; after ws-missed-pongs unanswered ones the connection is closed
    /// [default: 20s].
    #[arg(long, env = "CALLGATE_WS_HEARTBEAT_INTERVAL", value_name = "DURATION")]
    pub ws_heartbeat_interval: Option<Seconds>,

    /// Unanswered pings before a connection counts as dead [default: 2].
    #[arg(long, env = "CALLGATE_WS_MISSED_PONGS", value_name = "N")]
    pub ws_missed_pongs: Option<u32>,

    /// Frames queued for one client before it counts as too slow and is disconnected [default: 128].
    #[arg(long, env = "CALLGATE_WS_OUTBOX_FRAMES", value_name = "N")]
    pub ws_outbox_frames: Option<usize>,

    /// Bytes queued for one client before it counts as too slow and is disconnected; at least
    /// resume-queue-bytes + ws-max-message-bytes [default: 1048576].
    #[arg(long, env = "CALLGATE_WS_OUTBOX_BYTES", value_name = "BYTES")]
    pub ws_outbox_bytes: Option<usize>,

    /// Bytes queued over all clients; once spent, a client with more than 64 KiB queued counts as
    /// too slow [default: 268435456].
    #[arg(long, env = "CALLGATE_WS_OUTBOX_BYTES_TOTAL", value_name = "BYTES")]
    pub ws_outbox_bytes_total: Option<usize>,

    /// Bytes of messages held for one client ID until it acknowledges them or resumes; beyond
    /// it, messages are dropped and their senders told [default: 262144].
    #[arg(long, env = "CALLGATE_RESUME_QUEUE_BYTES", value_name = "BYTES")]
    pub resume_queue_bytes: Option<usize>,

    /// Reserved IDs (dropped connections awaiting a resume) per client address, IPv6 per /64;
    /// beyond it a dropped ID is freed at once [default: 16].
    #[arg(long, env = "CALLGATE_RESERVATIONS_PER_IP", value_name = "N")]
    pub reservations_per_ip: Option<usize>,

    /// Client IDs held at once, live and reserved; when full, the oldest reservation makes room
    /// for a live client [default: 100000].
    #[arg(long, env = "CALLGATE_MAX_CLIENTS", value_name = "N")]
    pub max_clients: Option<usize>,

    /// A write to a client that makes no progress for this long ends the connection [default: 10s].
    #[arg(long, env = "CALLGATE_WS_WRITE_TIMEOUT", value_name = "DURATION")]
    pub ws_write_timeout: Option<Seconds>,

    /// Signaling messages per second per connection, sustained [default: 20].
    #[arg(long, env = "CALLGATE_WS_MESSAGES_PER_SECOND", value_name = "N")]
    pub ws_messages_per_second: Option<u32>,

    /// Signaling message burst per connection [default: 60].
    #[arg(long, env = "CALLGATE_WS_MESSAGE_BURST", value_name = "N")]
    pub ws_message_burst: Option<u32>,

    /// New calls per minute per connection (stops ID scanning and call spam) [default: 10].
    #[arg(long, env = "CALLGATE_WS_CALLS_PER_MINUTE", value_name = "N")]
    pub ws_calls_per_minute: Option<u32>,

    /// WebSocket upgrades per second per client address (IPv6 per /64) [default: 10].
    #[arg(long, env = "CALLGATE_WS_UPGRADES_PER_SECOND", value_name = "N")]
    pub ws_upgrades_per_second: Option<u32>,

    /// Open WebSockets per client address (IPv6 per /64) [default: 64].
    #[arg(long, env = "CALLGATE_WS_CONNECTIONS_PER_IP", value_name = "N")]
    pub ws_connections_per_ip: Option<u32>,

    /// Digits in a client ID: random, so IDs cannot be enumerated [default: 9].
    #[arg(long, env = "CALLGATE_ID_DIGITS", value_name = "N")]
    pub id_digits: Option<u8>,

    /// How long a dropped client's ID (and call) is kept for it to resume [default: 30s].
    #[arg(long, env = "CALLGATE_RESUME_GRACE", value_name = "DURATION")]
    pub resume_grace: Option<Seconds>,

    /// Directory holding HTTP-01 token files written by an outside ACME client: the plain-HTTP
    /// listener answers /.well-known/acme-challenge/TOKEN with the file DIR/TOKEN. For
    /// `certbot --webroot -w W` pass W/.well-known/acme-challenge (not W) [default: none].
    #[arg(long, env = "CALLGATE_ACME_CHALLENGE_DIR", value_name = "DIR")]
    pub acme_challenge_dir: Option<PathBuf>,

    /// Domain names (comma-separated) to get a certificate for automatically over ACME; the
    /// account key and certificate are kept in certs-dir. Unset: no ACME [default: none].
    #[arg(
        long,
        env = "CALLGATE_ACME_DOMAIN",
        value_name = "NAME,...",
        value_delimiter = ','
    )]
    pub acme_domain: Option<Vec<String>>,

    /// Contact e-mail address for the ACME account, for the CA's problem notices [default: none].
    #[arg(long, env = "CALLGATE_ACME_EMAIL", value_name = "ADDRESS")]
    pub acme_email: Option<String>,

    /// ACME directory URL [default: Let's Encrypt production,
    /// https://acme-v02.api.letsencrypt.org/directory; staging:
    /// https://acme-staging-v02.api.letsencrypt.org/directory].
    #[arg(long, env = "CALLGATE_ACME_DIRECTORY", value_name = "URL")]
    pub acme_directory: Option<String>,

    /// PEM file of CA certificates to trust for the ACME directory's own HTTPS (a private CA);
    /// when set, only these are trusted [default: the system's trusted roots].
    #[arg(long, env = "CALLGATE_ACME_DIRECTORY_CA", value_name = "FILE")]
    pub acme_directory_ca: Option<PathBuf>,

    /// Which ACME challenge to answer: tls-alpn-01 (on the HTTPS listener), http-01 (on the
    /// plain-HTTP listener) or auto (both, switching after a failed validation) [default: auto].
    #[arg(long, env = "CALLGATE_ACME_CHALLENGE", value_name = "TYPE")]
    pub acme_challenge: Option<AcmeChallenge>,

    /// Wait before retrying a failed ACME order; doubles after each failure up to 6h, and a CA's
    /// rate-limit Retry-After is always honoured [default: 60s].
    #[arg(long, env = "CALLGATE_ACME_RETRY_DELAY", value_name = "DURATION")]
    pub acme_retry_delay: Option<Seconds>,

    /// Load balancers (CIDR or IP, comma-separated) whose connections start with a PROXY protocol
    /// header (v1 or v2) naming the real client; required from them, ignored from anyone else
    /// [default: none].
    #[arg(
        long,
        env = "CALLGATE_PROXY_PROTOCOL_FROM",
        value_name = "CIDR,...",
        value_delimiter = ','
    )]
    pub proxy_protocol_from: Option<Vec<IpRange>>,

    /// Run the embedded TURN relay (true|false) [default: true].
    #[arg(long, env = "CALLGATE_TURN", value_name = "BOOL")]
    pub turn: Option<bool>,

    /// TURN realm, sent in authentication challenges [default: callgate].
    #[arg(long, env = "CALLGATE_REALM", value_name = "REALM")]
    pub realm: Option<String>,

    /// Addresses the TURN listeners bind, comma-separated; 0.0.0.0 and :: stand for every IPv4 and
    /// IPv6 address of this host at start, each bound separately so answers leave from the address
    /// asked [default: 0.0.0.0,::].
    #[arg(
        long,
        env = "CALLGATE_LISTENING_IP",
        value_name = "IP,...",
        value_delimiter = ','
    )]
    pub listening_ip: Option<Vec<IpAddr>>,

    /// TURN port for UDP and TCP [default: 3478].
    #[arg(long, env = "CALLGATE_LISTENING_PORT", value_name = "PORT")]
    pub listening_port: Option<u16>,

    /// TURN over TLS (turns:) port, using the HTTPS certificate, or "off" [default: 5349].
    #[arg(long, env = "CALLGATE_TLS_LISTENING_PORT", value_name = "PORT|off")]
    pub tls_listening_port: Option<PortOrOff>,

    /// Serve TURN over UDP (true|false) [default: true].
    #[arg(long, env = "CALLGATE_TURN_UDP", value_name = "BOOL")]
    pub turn_udp: Option<bool>,

    /// Serve TURN over TCP (true|false) [default: true].
    #[arg(long, env = "CALLGATE_TURN_TCP", value_name = "BOOL")]
    pub turn_tcp: Option<bool>,

    /// Local address relay sockets bind to [default: the listening IP, or this host's first
    /// non-loopback address when listening on 0.0.0.0].
    #[arg(long, env = "CALLGATE_RELAY_IP", value_name = "IP")]
    pub relay_ip: Option<IpAddr>,

    /// Public address advertised for relayed candidates behind 1:1 NAT (cloud VMs): PUBLIC or
    /// PUBLIC/PRIVATE.
    #[arg(long, env = "CALLGATE_EXTERNAL_IP", value_name = "IP[/IP]")]
    pub external_ip: Option<String>,

    /// Lowest UDP port for relayed candidates [default: 49152].
    #[arg(long, env = "CALLGATE_MIN_PORT", value_name = "PORT")]
    pub min_port: Option<u16>,

    /// Highest UDP port for relayed candidates [default: 65535].
    #[arg(long, env = "CALLGATE_MAX_PORT", value_name = "PORT")]
    pub max_port: Option<u16>,

    /// TURN REST API shared secret(s), comma-separated, newest first: the first signs new
    /// credentials, all are accepted (rotation). Same as coturn's static-auth-secret [default: a
    /// random secret per process].
    #[arg(
        long,
        env = "CALLGATE_STATIC_AUTH_SECRET",
        value_name = "SECRET,...",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub static_auth_secret: Option<Vec<Secret>>,

    /// Lifetime of TURN credentials handed to clients [default: 1h].
    #[arg(long, env = "CALLGATE_TURN_CREDENTIAL_TTL", value_name = "DURATION")]
    pub turn_credential_ttl: Option<Seconds>,

    /// Concurrent TURN allocations per user [default: 10].
    #[arg(long, env = "CALLGATE_USER_QUOTA", value_name = "N")]
    pub user_quota: Option<usize>,

    /// Concurrent TURN allocations in total [default: 10000].
    #[arg(long, env = "CALLGATE_TOTAL_QUOTA", value_name = "N")]
    pub total_quota: Option<usize>,

    /// Concurrent TURN allocations one client address may hold, IPv6 counted per /64; over it
    /// Allocate gets 486 [default: 1 % of total-quota, at least 1].
    #[arg(long, env = "CALLGATE_ALLOCATIONS_PER_IP", value_name = "N")]
    pub allocations_per_ip: Option<usize>,

    /// Unauthenticated TURN requests (each client's first Allocate, Binding) accepted per second per
    /// source address, burst twice that; more are dropped [default: 20].
    #[arg(long, env = "CALLGATE_TURN_UNAUTHENTICATED_PER_IP", value_name = "N")]
    pub turn_unauthenticated_per_ip: Option<u32>,

    /// Bandwidth cap per allocation, bytes per second each way [default: none].
    #[arg(long, env = "CALLGATE_MAX_BPS", value_name = "BYTES")]
    pub max_bps: Option<u32>,

    /// Peer ranges (CIDR or IP) the relay may reach even if special or denied, comma-separated.
    #[arg(
        long,
        env = "CALLGATE_ALLOWED_PEER_IP",
        value_name = "CIDR,...",
        value_delimiter = ','
    )]
    pub allowed_peer_ip: Option<Vec<IpRange>>,

    /// Extra peer ranges (CIDR or IP) the relay never reaches, comma-separated.
    #[arg(
        long,
        env = "CALLGATE_DENIED_PEER_IP",
        value_name = "CIDR,...",
        value_delimiter = ','
    )]
    pub denied_peer_ip: Option<Vec<IpRange>>,

    /// Let the relay reach private networks (RFC 1918, CGNAT, ULA): only for relays inside a
    /// private deployment. Loopback, link-local and metadata addresses stay refused [default: false].
    #[arg(long, env = "CALLGATE_ALLOW_PRIVATE_PEERS", value_name = "BOOL")]
    pub allow_private_peers: Option<bool>,

    /// Also answer TURN over TLS on the HTTPS port (connections offering ALPN `stun.turn`, or none
    /// and starting with a STUN header) and advertise `turns:HOST:HTTPS-PORT?transport=tcp`, for
    /// callers whose firewall opens only TCP 443. Needs TURN on [default: true].
    #[arg(long, env = "CALLGATE_TURN_ON_HTTPS_PORT", value_name = "BOOL")]
    pub turn_on_https_port: Option<bool>,

    /// Host name put in the turn:/turns: URLs handed to browsers [default: public-url's host, else
    /// the host the browser connected to].
    #[arg(long, env = "CALLGATE_TURN_HOST", value_name = "HOST")]
    pub turn_host: Option<String>,

    /// API key that enables GET /api/turn-credentials (Authorization: Bearer KEY) for apps doing
    /// their own signaling [default: endpoint disabled].
    #[arg(
        long,
        env = "CALLGATE_TURN_API_KEY",
        value_name = "SECRET",
        hide_env_values = true
    )]
    pub turn_api_key: Option<Secret>,

    /// Address of the admin listener serving Prometheus metrics at /metrics, or "off". Keep it
    /// off the public internet [default: 127.0.0.1:9100].
    #[arg(long, env = "CALLGATE_METRICS_LISTEN", value_name = "ADDR|off")]
    pub metrics_listen: Option<Listen>,

    /// Bearer token required on /metrics (Authorization: Bearer TOKEN); unset means none.
    #[arg(
        long,
        env = "CALLGATE_METRICS_TOKEN",
        value_name = "SECRET",
        hide_env_values = true
    )]
    pub metrics_token: Option<Secret>,

    /// Log format [default: text].
    #[arg(long, env = "CALLGATE_LOG_FORMAT", value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,

    /// Log filter in tracing's EnvFilter syntax, e.g. "info" or "callgate=debug" [default: info].
    #[arg(long, env = "CALLGATE_LOG_LEVEL", value_name = "FILTER")]
    pub log_level: Option<String>,

    /// Redis that every node of a cluster shares, e.g. redis://:PASSWORD@HOST:6379/0 (password,
    /// port and database optional; rediss:// for TLS); nodes given the same URL form one cluster. Needs static-auth-secret and
    /// turn-host or external-ip. Unset: a single node, nothing shared [default: none].
    #[arg(
        long,
        env = "CALLGATE_REDIS_URL",
        value_name = "URL",
        hide_env_values = true
    )]
    pub redis_url: Option<RedisUrl>,

    /// This node's name in the cluster: letters, digits, '.', '_', '-', at most 64 characters,
    /// unique per node [default: the host name plus a random suffix].
    #[arg(long, env = "CALLGATE_NODE_ID", value_name = "NAME")]
    pub node_id: Option<String>,
}

/// The effective configuration: every layer merged, defaults applied, values checked.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Config {
    /// Where the HTTPS listener binds.
    pub https_listen: SocketAddr,
    /// Where the redirect-only HTTP listener binds, if at all.
    pub http_listen: Listen,
    /// Canonical public origin, when clients cannot be trusted to name it in `Host`.
    pub public_url: Option<PublicUrl>,
    /// Root of the static web app.
    pub public_dir: PathBuf,
    /// Where the certificate and key come from.
    pub tls: TlsSource,
    /// Poll interval for certificate changes.
    #[serde(serialize_with = "as_seconds")]
    pub tls_reload_interval: Duration,
    /// Deadline for a TLS handshake.
    #[serde(serialize_with = "as_seconds")]
    pub tls_handshake_timeout: Duration,
    /// Deadline for an HTTP/1 request head, and for an idle keep-alive connection's next request.
    #[serde(serialize_with = "as_seconds")]
    pub header_read_timeout: Duration,
    /// Connections with no traffic for this long are closed.
    #[serde(serialize_with = "as_seconds")]
    pub idle_timeout: Duration,
    /// HTTP/2 stream cap per connection.
    pub h2_max_concurrent_streams: u32,
    /// Open connections per client address (IPv6 per /64), on every listener.
    pub connections_per_ip: u32,
    /// A response that makes no progress for this long ends its connection.
    #[serde(serialize_with = "as_seconds")]
    pub response_stall_timeout: Duration,
    /// Budget for the web app held in memory.
    pub public_dir_max_bytes: u64,
    /// Global cap on open client connections.
    pub max_connections: usize,
    /// Threads of the async runtime.
    pub worker_threads: usize,
    /// `Strict-Transport-Security` max-age.
    #[serde(serialize_with = "as_seconds")]
    pub hsts_max_age: Duration,
    /// Time between SIGTERM and closing the listeners.
    #[serde(serialize_with = "as_seconds")]
    pub shutdown_drain_delay: Duration,
    /// Deadline for in-flight work once the listeners are closed.
    #[serde(serialize_with = "as_seconds")]
    pub shutdown_timeout: Duration,
    /// Extra origins allowed to open WebSockets.
    pub allowed_origins: Vec<String>,
    /// Signaling message size cap.
    pub ws_max_message_bytes: usize,
    /// WebSocket ping interval.
    #[serde(serialize_with = "as_seconds")]
    pub ws_heartbeat_interval: Duration,
    /// Unanswered pings before close.
    pub ws_missed_pongs: u32,
    /// Outbound queue length per client.
    pub ws_outbox_frames: usize,
    /// Outbound queue bytes per client.
    pub ws_outbox_bytes: usize,
    /// Outbound queue bytes over all clients.
    pub ws_outbox_bytes_total: usize,
    /// Bytes held per client ID until acknowledged or resumed.
    pub resume_queue_bytes: usize,
    /// Reserved IDs per client address.
    pub reservations_per_ip: usize,
    /// Live plus reserved client IDs.
    pub max_clients: usize,
    /// Stalled-write deadline.
    #[serde(serialize_with = "as_seconds")]
    pub ws_write_timeout: Duration,
    /// Per-connection message rate.
    pub ws_messages_per_second: NonZeroU32,
    /// Per-connection message burst.
    pub ws_message_burst: NonZeroU32,
    /// Per-connection new calls per minute.
    pub ws_calls_per_minute: NonZeroU32,
    /// Per-address upgrade rate.
    pub ws_upgrades_per_second: NonZeroU32,
    /// Per-address open WebSockets.
    pub ws_connections_per_ip: u32,
    /// Client ID length.
    pub id_digits: u8,
    /// Resume grace period.
    #[serde(serialize_with = "as_seconds")]
    pub resume_grace: Duration,
    /// Where ACME HTTP-01 challenge tokens are served from.
    pub acme_challenge_dir: Option<PathBuf>,
    /// Automatic certificates over ACME, if `acme-domain` is set.
    pub acme: Option<AcmeConfig>,
    /// Trusted load balancers that send the PROXY protocol.
    pub proxy_protocol_from: Vec<IpRange>,
    /// Embedded TURN relay settings.
    pub turn: TurnConfig,
    /// Where `/metrics` is served, if at all.
    pub metrics_listen: Listen,
    /// Token required to scrape `/metrics`.
    pub metrics_token: Option<Secret>,
    /// Text for people or JSON for log pipelines.
    pub log_format: LogFormat,
    /// tracing `EnvFilter` directive.
    pub log_level: String,
    /// Cluster mode, if `redis-url` is set.
    pub cluster: Option<ClusterConfig>,
}

/// Settings of cluster mode (`redis-url`, `node-id`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ClusterConfig {
    /// The Redis every node shares; printed with its password masked.
    pub redis_url: RedisUrl,
    /// This node's unique name: in Redis keys, membership and logs.
    pub node_id: String,
}

/// A `redis://` or `rediss://` URL. It may carry a password, so it prints with the user part
/// masked (`redis://***@host:6379`).
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct RedisUrl(String);

impl RedisUrl {
    /// The URL itself, for the one place that connects.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether the connection uses TLS (`rediss://`).
    pub fn is_tls(&self) -> bool {
        self.0.starts_with("rediss://")
    }
}

impl FromStr for RedisUrl {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if !(s.starts_with("redis://") || s.starts_with("rediss://")) {
            return Err(format!(
                "\"{}\" must start with redis:// or rediss:// (e.g. redis://10.0.0.5:6379)",
                RedisUrl(s.to_owned())
            ));
        }
        redis::IntoConnectionInfo::into_connection_info(s).map_err(|e| {
            format!(
                "\"{}\" is not a Redis URL like redis://:PASSWORD@HOST:6379/0 ({:?})",
                RedisUrl(s.to_owned()),
                e.kind()
            )
        })?;
        Ok(RedisUrl(s.to_owned()))
    }
}

impl TryFrom<String> for RedisUrl {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl fmt::Display for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Some((scheme, rest)) = self.0.split_once("://") else {
            return f.write_str("***");
        };
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        match rest[..authority_end].rfind('@') {
            Some(at) => write!(f, "{scheme}://***{}", &rest[at..]),
            None => f.write_str(&self.0),
        }
    }
}

impl fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RedisUrl({self})")
    }
}

impl Serialize for RedisUrl {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Checks a `node-id`: it names Redis keys and log lines, so only `[A-Za-z0-9._-]`, 1 to 64.
fn check_node_id(id: &str) -> Result<(), String> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "\"{id}\" must be 1 to 64 characters of letters, digits, '.', '_' and '-'"
        ))
    }
}

/// The default `node-id`: this host's name (cleaned to the allowed characters) and a random
/// suffix, so two processes on one host, or two containers with one image, still differ.
fn default_node_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_default();
    let mut host: String = host
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || "._-".contains(*c))
        .take(48)
        .collect();
    if host.is_empty() {
        host.push_str("callgate");
    }
    format!("{host}-{:06x}", rand::random::<u32>() & 0xff_ffff)
}

/// Builds and checks the cluster settings; `None` without `redis-url`.
fn cluster_config(o: &Options) -> Result<Option<ClusterConfig>, ConfigError> {
    let Some(redis_url) = o.redis_url.clone() else {
        if o.node_id.is_some() {
            return Err(invalid(
                "node-id",
                "only means something in a cluster: set redis-url too",
            ));
        }
        return Ok(None);
    };
    let node_id = match o.node_id.as_deref().map(str::trim) {
        Some(id) => {
            check_node_id(id).map_err(|reason| ConfigError::Invalid {
                key: "node-id",
                reason,
            })?;
            id.to_owned()
        }
        None => default_node_id(),
    };
    if o.turn != Some(false) {
        if o.static_auth_secret.as_ref().is_none_or(Vec::is_empty) {
            return Err(invalid(
                "static-auth-secret",
                "is required with redis-url: every node must sign TURN credentials with the same \
                 secret so that credentials from one node work on the relay of another",
            ));
        }
        if o.turn_host.is_none() && o.external_ip.is_none() {
            return Err(invalid(
                "turn-host",
                "(or external-ip) is required with redis-url: each node must advertise its own TURN \
                 address, since media must reach the relay that holds the allocation",
            ));
        }
    }
    Ok(Some(ClusterConfig { redis_url, node_id }))
}

/// Where the serving certificate comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "source")]
pub enum TlsSource {
    /// Files the operator named; they must exist.
    Files {
        /// PEM chain, leaf first.
        cert: PathBuf,
        /// PEM private key.
        key: PathBuf,
    },
    /// `cert.pem`/`key.pem` in this directory, generated as a self-signed development pair if absent.
    DevDir {
        /// The directory, `certs/` by default.
        dir: PathBuf,
    },
}

impl TlsSource {
    /// The certificate chain and key paths this source reads.
    pub fn paths(&self) -> (PathBuf, PathBuf) {
        match self {
            TlsSource::Files { cert, key } => (cert.clone(), key.clone()),
            TlsSource::DevDir { dir } => (dir.join("cert.pem"), dir.join("key.pem")),
        }
    }
}

/// A listener address, or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listen {
    /// Bind here.
    On(SocketAddr),
    /// Do not open this listener.
    Off,
}

impl Listen {
    /// The address, if the listener is on.
    pub fn addr(self) -> Option<SocketAddr> {
        match self {
            Listen::On(addr) => Some(addr),
            Listen::Off => None,
        }
    }
}

impl FromStr for Listen {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.eq_ignore_ascii_case("off") {
            return Ok(Listen::Off);
        }
        s.parse()
            .map(Listen::On)
            .map_err(|_| format!("\"{s}\" is neither an address like 0.0.0.0:8080 nor \"off\""))
    }
}

impl fmt::Display for Listen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Listen::On(addr) => addr.fmt(f),
            Listen::Off => f.write_str("off"),
        }
    }
}

impl<'de> Deserialize<'de> for Listen {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl Serialize for Listen {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A duration written as seconds: `30`, `30s`, `500ms`, `5m`, `1h` or `365d`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seconds(pub Duration);

impl FromStr for Seconds {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (digits, unit) = s.split_at(split);
        let bad = || format!("\"{s}\" is not a duration (examples: 30, 30s, 500ms, 5m, 1h, 365d)");
        let n: u64 = digits.parse().map_err(|_| bad())?;
        let duration = match unit {
            "" | "s" => Duration::from_secs(n),
            "ms" => Duration::from_millis(n),
            "m" => Duration::from_secs(n.checked_mul(60).ok_or_else(bad)?),
            "h" => Duration::from_secs(n.checked_mul(3600).ok_or_else(bad)?),
            "d" => Duration::from_secs(n.checked_mul(86_400).ok_or_else(bad)?),
            _ => return Err(bad()),
        };
        Ok(Seconds(duration))
    }
}

impl<'de> Deserialize<'de> for Seconds {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(Seconds(Duration::from_secs(n))),
            Raw::Text(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

fn as_seconds<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    if d.subsec_millis() == 0 {
        s.collect_str(&format_args!("{}s", d.as_secs()))
    } else {
        s.collect_str(&format_args!("{}ms", d.as_millis()))
    }
}

/// The embedded TURN relay's settings (coturn's names where coturn has one).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct TurnConfig {
    /// Whether the relay runs at all.
    pub enabled: bool,
    /// Authentication realm.
    pub realm: String,
    /// Addresses the listeners bind; a wildcard stands for every host address of its family.
    pub listening_ip: Vec<IpAddr>,
    /// UDP and TCP port.
    pub listening_port: u16,
    /// `turns:` port.
    pub tls_listening_port: PortOrOff,
    /// UDP listener on.
    pub udp: bool,
    /// TCP listener on.
    pub tcp: bool,
    /// Local address for relay sockets.
    pub relay_ip: Option<IpAddr>,
    /// Public (and private) address behind 1:1 NAT.
    #[serde(serialize_with = "external_ip_text")]
    pub external_ip: Option<(IpAddr, Option<IpAddr>)>,
    /// Relay port range start.
    pub min_port: u16,
    /// Relay port range end (inclusive).
    pub max_port: u16,
    /// REST API secrets, newest first; empty means a random one per process.
    pub static_auth_secret: Vec<Secret>,
    /// Lifetime of issued credentials.
    #[serde(serialize_with = "as_seconds")]
    pub credential_ttl: Duration,
    /// Allocations per user.
    pub user_quota: usize,
    /// Allocations in total.
    pub total_quota: usize,
    /// Allocations per client address (IPv6: per /64).
    pub allocations_per_ip: usize,
    /// Unauthenticated requests per second per source address.
    pub unauthenticated_per_ip: u32,
    /// Per-allocation bandwidth cap (bytes/s each way).
    pub max_bps: Option<u32>,
    /// Peer ranges always allowed.
    pub allowed_peer_ip: Vec<IpRange>,
    /// Peer ranges always refused.
    pub denied_peer_ip: Vec<IpRange>,
    /// Opt-in to private peers.
    pub allow_private_peers: bool,
    /// TURN over TLS on the HTTPS port too (`turn-on-https-port`).
    pub on_https_port: bool,
    /// Host name for ICE server URLs.
    pub host: Option<String>,
    /// Key for `/api/turn-credentials`.
    pub api_key: Option<Secret>,
}

/// A port, or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortOrOff {
    /// Listen on this port.
    Port(u16),
    /// No listener.
    Off,
}

impl FromStr for PortOrOff {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.eq_ignore_ascii_case("off") {
            return Ok(PortOrOff::Off);
        }
        s.parse()
            .map(PortOrOff::Port)
            .map_err(|_| format!("\"{s}\" is neither a port number nor \"off\""))
    }
}

impl<'de> Deserialize<'de> for PortOrOff {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u16),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(port) => Ok(PortOrOff::Port(port)),
            Raw::Text(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

impl Serialize for PortOrOff {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            PortOrOff::Port(port) => s.serialize_u16(*port),
            PortOrOff::Off => s.serialize_str("off"),
        }
    }
}

/// An address range in CIDR notation (a bare address is a /32 or /128).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpRange(pub ipnet::IpNet);

impl FromStr for IpRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        s.parse::<ipnet::IpNet>()
            .or_else(|_| s.parse::<IpAddr>().map(ipnet::IpNet::from))
            .map(IpRange)
            .map_err(|_| format!("\"{s}\" is not an address or CIDR range (e.g. 10.0.0.0/8)"))
    }
}

impl<'de> Deserialize<'de> for IpRange {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl Serialize for IpRange {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0)
    }
}

/// Prints `external-ip` as it is written (`PUBLIC` or `PUBLIC/PRIVATE`); TOML has no null for
/// a missing private address.
fn external_ip_text<S: serde::Serializer>(
    value: &Option<(IpAddr, Option<IpAddr>)>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match value {
        None => s.serialize_none(),
        Some((public, None)) => s.collect_str(public),
        Some((public, Some(private))) => s.collect_str(&format_args!("{public}/{private}")),
    }
}

/// `PUBLIC` or `PUBLIC/PRIVATE`, as coturn's external-ip.
fn parse_external_ip(s: &str) -> Result<(IpAddr, Option<IpAddr>), String> {
    let bad =
        || format!("\"{s}\" must be PUBLIC or PUBLIC/PRIVATE addresses, e.g. 203.0.113.7/10.0.0.5");
    match s.split_once('/') {
        Some((public, private)) => Ok((
            public.trim().parse().map_err(|_| bad())?,
            Some(private.trim().parse().map_err(|_| bad())?),
        )),
        None => Ok((s.trim().parse().map_err(|_| bad())?, None)),
    }
}

/// A secret setting (a token): never printed, compared in constant time.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// The secret itself, for the one place that must use it (signing, comparing).
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether `candidate` equals the secret, in time independent of where they differ.
    pub fn matches(&self, candidate: &[u8]) -> bool {
        use subtle::ConstantTimeEq;
        self.0.len() == candidate.len() && bool::from(self.0.as_bytes().ct_eq(candidate))
    }
}

impl FromStr for Secret {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(Secret(s.to_owned()))
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("***")
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LogFormat {
    /// One human-readable line per event.
    Text,
    /// One JSON object per line, for log pipelines.
    Json,
}

/// A checked `https://host[:port]` origin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicUrl {
    /// `host` or `host:port`, as it appears in an `Origin` header.
    pub authority: String,
}

impl PublicUrl {
    fn parse(s: &str) -> Result<Self, String> {
        let rest = s
            .strip_prefix("https://")
            .ok_or_else(|| format!("\"{s}\" must start with https://"))?;
        let authority = rest.trim_end_matches('/');
        let valid = !authority.is_empty()
            && authority
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b));
        if !valid {
            return Err(format!(
                "\"{s}\" must be https://host or https://host:port, without a path"
            ));
        }
        Ok(PublicUrl {
            authority: authority.to_ascii_lowercase(),
        })
    }
}

impl PublicUrl {
    /// The host part, without port or brackets.
    pub fn host(&self) -> &str {
        let authority = self.authority.as_str();
        if let Some(rest) = authority.strip_prefix('[') {
            return rest.split(']').next().unwrap_or(rest);
        }
        authority.split(':').next().unwrap_or(authority)
    }
}

impl fmt::Display for PublicUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "https://{}", self.authority)
    }
}

impl Serialize for PublicUrl {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Why the configuration was refused. Each names the key (or file) at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file named by `--config` could not be read.
    #[error("config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The file is not valid TOML, has an unknown key, or a value of the wrong type.
    #[error("config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's explanation, naming the key and line.
        message: String,
    },
    /// A value parsed but is not acceptable.
    #[error("{key}: {reason}")]
    Invalid {
        /// The flag/file key at fault.
        key: &'static str,
        /// What is wrong and what would be right.
        reason: String,
    },
}

impl Options {
    /// Reads a TOML settings file.
    pub fn from_file(path: &Path) -> Result<Options, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string().trim_end().replace('\n', " "),
        })
    }

    /// Fills every unset field of `self` from `lower`.
    fn or(self, lower: Options) -> Options {
        macro_rules! pick {
            ($($field:ident),* $(,)?) => {
                Options { $($field: self.$field.or(lower.$field)),* }
            };
        }
        pick!(
            config,
            https_listen,
            http_listen,
            public_url,
            public_dir,
            tls_cert,
            tls_key,
            certs_dir,
            tls_reload_interval,
            tls_handshake_timeout,
            header_read_timeout,
            idle_timeout,
            h2_max_concurrent_streams,
            connections_per_ip,
            response_stall_timeout,
            public_dir_max_bytes,
            max_connections,
            worker_threads,
            hsts_max_age,
            shutdown_drain_delay,
            shutdown_timeout,
            allowed_origins,
            ws_max_message_bytes,
            ws_heartbeat_interval,
            ws_missed_pongs,
            ws_outbox_frames,
            ws_outbox_bytes,
            ws_outbox_bytes_total,
            resume_queue_bytes,
            reservations_per_ip,
            max_clients,
            ws_write_timeout,
            ws_messages_per_second,
            ws_message_burst,
            ws_calls_per_minute,
            ws_upgrades_per_second,
            ws_connections_per_ip,
            id_digits,
            resume_grace,
            acme_challenge_dir,
            acme_domain,
            acme_email,
            acme_directory,
            acme_directory_ca,
            acme_challenge,
            acme_retry_delay,
            proxy_protocol_from,
            turn,
            realm,
            listening_ip,
            listening_port,
            tls_listening_port,
            turn_udp,
            turn_tcp,
            relay_ip,
            external_ip,
            min_port,
            max_port,
            static_auth_secret,
            turn_credential_ttl,
            user_quota,
            total_quota,
            allocations_per_ip,
            turn_unauthenticated_per_ip,
            max_bps,
            allowed_peer_ip,
            denied_peer_ip,
            allow_private_peers,
            turn_on_https_port,
            turn_host,
            turn_api_key,
            metrics_listen,
            metrics_token,
            log_format,
            log_level,
            redis_url,
            node_id,
        )
    }
}

impl Config {
    /// Merges the command line (flags and environment) over the file it names, applies defaults and
    /// validates.
    pub fn resolve(cli: Options) -> Result<Config, ConfigError> {
        let file = match &cli.config {
            Some(path) => Options::from_file(path)?,
            None => Options::default(),
        };
        Config::from_options(cli.or(file))
    }

    /// Applies defaults to merged options and validates them.
    pub fn from_options(o: Options) -> Result<Config, ConfigError> {
        let secs =
            |v: Option<Seconds>, default: u64| v.map_or(Duration::from_secs(default), |s| s.0);
        let tls = match (o.tls_cert.clone(), o.tls_key.clone()) {
            (Some(cert), Some(key)) => TlsSource::Files { cert, key },
            (None, None) => TlsSource::DevDir {
                dir: o
                    .certs_dir
                    .clone()
                    .unwrap_or_else(|| PathBuf::from("certs")),
            },
            (Some(_), None) => return Err(invalid("tls-key", "is required when tls-cert is set")),
            (None, Some(_)) => return Err(invalid("tls-cert", "is required when tls-key is set")),
        };
        let acme = acme_config(&o, &tls)?;
        let cluster = cluster_config(&o)?;
        let public_url = o
            .public_url
            .as_deref()
            .map(PublicUrl::parse)
            .transpose()
            .map_err(|reason| ConfigError::Invalid {
                key: "public-url",
                reason,
            })?;
        if o.turn_on_https_port == Some(true) && o.turn == Some(false) {
            return Err(invalid(
                "turn-on-https-port",
                "needs the TURN relay on (turn = true)",
            ));
        }
        let config = Config {
            https_listen: o
                .https_listen
                .unwrap_or_else(|| SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 8443))),
            http_listen: o.http_listen.unwrap_or(Listen::On(SocketAddr::from((
                std::net::Ipv6Addr::UNSPECIFIED,
                8080,
            )))),
            public_url,
            public_dir: o.public_dir.unwrap_or_else(|| PathBuf::from("public")),
            tls,
            tls_reload_interval: secs(o.tls_reload_interval, 10),
            tls_handshake_timeout: secs(o.tls_handshake_timeout, 10),
            header_read_timeout: secs(o.header_read_timeout, 10),
            idle_timeout: secs(o.idle_timeout, 60),
            h2_max_concurrent_streams: o.h2_max_concurrent_streams.unwrap_or(100),
            connections_per_ip: o.connections_per_ip.unwrap_or(128),
            response_stall_timeout: secs(o.response_stall_timeout, 30),
            public_dir_max_bytes: o.public_dir_max_bytes.unwrap_or(64 * 1024 * 1024),
            max_connections: o.max_connections.unwrap_or(10_000),
            worker_threads: o.worker_threads.unwrap_or_else(|| {
                std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
            }),
            hsts_max_age: secs(o.hsts_max_age, 31_536_000),
            shutdown_drain_delay: secs(o.shutdown_drain_delay, 0),
            shutdown_timeout: secs(o.shutdown_timeout, 10),
            allowed_origins: o
                .allowed_origins
                .unwrap_or_default()
                .into_iter()
                .map(|origin| origin.trim().trim_end_matches('/').to_ascii_lowercase())
                .filter(|origin| !origin.is_empty())
                .collect(),
            ws_max_message_bytes: o.ws_max_message_bytes.unwrap_or(64 * 1024),
            ws_heartbeat_interval: secs(o.ws_heartbeat_interval, 20),
            ws_missed_pongs: o.ws_missed_pongs.unwrap_or(2),
            ws_outbox_frames: o.ws_outbox_frames.unwrap_or(128),
            ws_outbox_bytes: o.ws_outbox_bytes.unwrap_or(1024 * 1024),
            ws_outbox_bytes_total: o.ws_outbox_bytes_total.unwrap_or(256 * 1024 * 1024),
            resume_queue_bytes: o.resume_queue_bytes.unwrap_or(256 * 1024),
            reservations_per_ip: o.reservations_per_ip.unwrap_or(16),
            max_clients: o.max_clients.unwrap_or(100_000),
            ws_write_timeout: secs(o.ws_write_timeout, 10),
            ws_messages_per_second: non_zero(
                "ws-messages-per-second",
                o.ws_messages_per_second,
                20,
            )?,
            ws_message_burst: non_zero("ws-message-burst", o.ws_message_burst, 60)?,
            ws_calls_per_minute: non_zero("ws-calls-per-minute", o.ws_calls_per_minute, 10)?,
            ws_upgrades_per_second: non_zero(
                "ws-upgrades-per-second",
                o.ws_upgrades_per_second,
                10,
            )?,
            ws_connections_per_ip: o.ws_connections_per_ip.unwrap_or(64),
            id_digits: o.id_digits.unwrap_or(9),
            resume_grace: secs(o.resume_grace, 30),
            acme_challenge_dir: o.acme_challenge_dir,
            acme,
            proxy_protocol_from: o.proxy_protocol_from.unwrap_or_default(),
            turn: TurnConfig {
                enabled: o.turn.unwrap_or(true),
                realm: o.realm.unwrap_or_else(|| "callgate".to_owned()),
                listening_ip: o
                    .listening_ip
                    .unwrap_or_else(|| vec![IpAddr::from([0, 0, 0, 0]), IpAddr::from([0u16; 8])]),
                listening_port: o.listening_port.unwrap_or(3478),
                tls_listening_port: o.tls_listening_port.unwrap_or(PortOrOff::Port(5349)),
                udp: o.turn_udp.unwrap_or(true),
                tcp: o.turn_tcp.unwrap_or(true),
                relay_ip: o.relay_ip,
                external_ip: o
                    .external_ip
                    .as_deref()
                    .map(parse_external_ip)
                    .transpose()
                    .map_err(|reason| ConfigError::Invalid {
                        key: "external-ip",
                        reason,
                    })?,
                min_port: o.min_port.unwrap_or(49152),
                max_port: o.max_port.unwrap_or(65535),
                static_auth_secret: o.static_auth_secret.unwrap_or_default(),
                credential_ttl: secs(o.turn_credential_ttl, 3600),
                user_quota: o.user_quota.unwrap_or(10),
                total_quota: o.total_quota.unwrap_or(10_000),
                allocations_per_ip: o
                    .allocations_per_ip
                    .unwrap_or((o.total_quota.unwrap_or(10_000) / 100).max(1)),
                unauthenticated_per_ip: o.turn_unauthenticated_per_ip.unwrap_or(20),
                max_bps: o.max_bps,
                allowed_peer_ip: o.allowed_peer_ip.unwrap_or_default(),
                denied_peer_ip: o.denied_peer_ip.unwrap_or_default(),
                allow_private_peers: o.allow_private_peers.unwrap_or(false),
                on_https_port: o.turn_on_https_port.unwrap_or(true),
                host: o.turn_host,
                api_key: o.turn_api_key,
            },
            metrics_listen: o
                .metrics_listen
                .unwrap_or(Listen::On(SocketAddr::from(([127, 0, 0, 1], 9100)))),
            metrics_token: o.metrics_token,
            log_format: o.log_format.unwrap_or(LogFormat::Text),
            log_level: o.log_level.unwrap_or_else(|| "info".to_owned()),
            cluster,
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let positive = [
            ("tls-reload-interval", self.tls_reload_interval),
            ("tls-handshake-timeout", self.tls_handshake_timeout),
            ("header-read-timeout", self.header_read_timeout),
            ("idle-timeout", self.idle_timeout),
            ("response-stall-timeout", self.response_stall_timeout),
        ];
        for (key, value) in positive {
            if value.is_zero() {
                return Err(invalid(key, "must be greater than 0"));
            }
        }
        for origin in &self.allowed_origins {
            let scheme_ok = origin.starts_with("https://") || origin.starts_with("http://");
            if !scheme_ok || origin.matches('/').count() != 2 {
                return Err(invalid(
                    "allowed-origins",
                    &format!("\"{origin}\" must be an origin like https://app.example.com (scheme, host, optional port; no path)"),
                ));
            }
        }
        if !(1024..=16 * 1024 * 1024).contains(&self.ws_max_message_bytes) {
            return Err(invalid(
                "ws-max-message-bytes",
                "must be between 1024 and 16777216",
            ));
        }
        if self.ws_heartbeat_interval.is_zero() || self.ws_write_timeout.is_zero() {
            let key = if self.ws_write_timeout.is_zero() {
                "ws-write-timeout"
            } else {
                "ws-heartbeat-interval"
            };
            return Err(invalid(key, "must be greater than 0"));
        }
        if self.ws_missed_pongs == 0 {
            return Err(invalid("ws-missed-pongs", "must be at least 1"));
        }
        // A resumed connection receives its `id` message and up to 64 queued messages at once.
        // A resume replays up to resume-queue-bytes of held messages at once.
        if self.ws_outbox_bytes < self.resume_queue_bytes + self.ws_max_message_bytes {
            return Err(invalid(
                "ws-outbox-bytes",
                "must be at least resume-queue-bytes + ws-max-message-bytes (a resume replays what is held at once)",
            ));
        }
        if self.ws_outbox_bytes_total < self.ws_outbox_bytes {
            return Err(invalid(
                "ws-outbox-bytes-total",
                "must be at least ws-outbox-bytes",
            ));
        }
        if self.resume_queue_bytes < self.ws_max_message_bytes {
            return Err(invalid(
                "resume-queue-bytes",
                "must be at least ws-max-message-bytes (one message must fit)",
            ));
        }
        if self.reservations_per_ip == 0 {
            return Err(invalid("reservations-per-ip", "must be at least 1"));
        }
        if self.max_clients == 0 {
            return Err(invalid("max-clients", "must be at least 1"));
        }
        if self.ws_outbox_frames < 65 {
            return Err(invalid(
                "ws-outbox-frames",
                "must be at least 65 (a resume delivers up to 64 queued messages at once)",
            ));
        }
        if self.ws_connections_per_ip == 0 {
            return Err(invalid("ws-connections-per-ip", "must be at least 1"));
        }
        if !(6..=15).contains(&self.id_digits) {
            return Err(invalid(
                "id-digits",
                "must be between 6 and 15 (IDs must stay exact JavaScript numbers)",
            ));
        }
        let turn = &self.turn;
        if turn.realm.is_empty() {
            return Err(invalid("realm", "must not be empty"));
        }
        if turn.listening_ip.is_empty() {
            return Err(invalid("listening-ip", "needs at least one address"));
        }
        if turn.min_port == 0 || turn.max_port < turn.min_port {
            return Err(invalid(
                "min-port",
                "must be at least 1 and no greater than max-port",
            ));
        }
        if turn.static_auth_secret.iter().any(|s| s.0.len() < 16) {
            return Err(invalid(
                "static-auth-secret",
                "each secret must be at least 16 characters",
            ));
        }
        if turn.credential_ttl.is_zero() {
            return Err(invalid("turn-credential-ttl", "must be greater than 0"));
        }
        if turn.user_quota == 0 || turn.total_quota == 0 {
            let key = if turn.user_quota == 0 {
                "user-quota"
            } else {
                "total-quota"
            };
            return Err(invalid(key, "must be at least 1"));
        }
        if turn.allocations_per_ip == 0 {
            return Err(invalid("allocations-per-ip", "must be at least 1"));
        }
        if turn.unauthenticated_per_ip == 0 {
            return Err(invalid("turn-unauthenticated-per-ip", "must be at least 1"));
        }
        if turn.max_bps == Some(0) {
            return Err(invalid(
                "max-bps",
                "must be at least 1 (leave it unset for no cap)",
            ));
        }
        if turn.api_key.as_ref().is_some_and(|t| t.0.len() < 16) {
            return Err(invalid("turn-api-key", "must be at least 16 characters"));
        }
        if self.metrics_token.as_ref().is_some_and(|t| t.0.len() < 16) {
            return Err(invalid("metrics-token", "must be at least 16 characters"));
        }
        if self.h2_max_concurrent_streams == 0 {
            return Err(invalid("h2-max-concurrent-streams", "must be at least 1"));
        }
        if self.connections_per_ip == 0 {
            return Err(invalid("connections-per-ip", "must be at least 1"));
        }
        if !(1024..=4 * 1024 * 1024 * 1024).contains(&self.public_dir_max_bytes) {
            return Err(invalid(
                "public-dir-max-bytes",
                "must be between 1024 and 4294967296 (the web app is held in memory)",
            ));
        }
        if self.max_connections == 0 {
            return Err(invalid("max-connections", "must be at least 1"));
        }
        if !(1..=1024).contains(&self.worker_threads) {
            return Err(invalid("worker-threads", "must be between 1 and 1024"));
        }
        if let Listen::On(http) = self.http_listen {
            if http == self.https_listen && http.port() != 0 {
                return Err(invalid(
                    "http-listen",
                    "must differ from https-listen (the redirect listener needs its own port)",
                ));
            }
        }
        if let Some(acme) = &self.acme {
            if acme.challenge == AcmeChallenge::Http01 && self.http_listen == Listen::Off {
                return Err(invalid(
                    "acme-challenge",
                    "http-01 is answered on the plain-HTTP listener, so http-listen must not be off",
                ));
            }
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log_level) {
            return Err(invalid(
                "log-level",
                &format!("\"{}\": {e}", self.log_level),
            ));
        }
        Ok(())
    }

    /// The effective configuration as TOML, in the file format, for `check-config`.
    ///
    /// Secrets print as `***`.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("# cannot print configuration: {e}\n"))
    }
}

/// Settings for automatic certificates over ACME (`acme-*`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct AcmeConfig {
    /// The names on the certificate, lowercase, first one first.
    pub domains: Vec<String>,
    /// Contact e-mail address for the account, if any.
    pub email: Option<String>,
    /// The ACME directory URL (always `https://`).
    pub directory: String,
    /// CA certificates to trust for the directory's TLS instead of the system roots.
    pub directory_ca: Option<PathBuf>,
    /// Which challenge type to answer.
    pub challenge: AcmeChallenge,
    /// First wait after a failed order (doubles up to six hours).
    #[serde(serialize_with = "as_seconds")]
    pub retry_delay: Duration,
    /// Where the account and certificate are kept: `certs-dir/acme`.
    pub state_dir: PathBuf,
}

/// Let's Encrypt's production directory, the default `acme-directory`.
pub const LETS_ENCRYPT_PRODUCTION: &str = "https://acme-v02.api.letsencrypt.org/directory";

/// Which ACME challenge callgate answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AcmeChallenge {
    /// TLS-ALPN-01 on the HTTPS listener first, HTTP-01 after a failed validation, and so on.
    Auto,
    /// Only TLS-ALPN-01 (the CA connects to port 443).
    #[value(name = "tls-alpn-01")]
    #[serde(rename = "tls-alpn-01")]
    TlsAlpn01,
    /// Only HTTP-01 (the CA connects to port 80).
    #[value(name = "http-01")]
    #[serde(rename = "http-01")]
    Http01,
}

/// Builds and checks the `acme-*` settings; `None` without `acme-domain`.
fn acme_config(o: &Options, tls: &TlsSource) -> Result<Option<AcmeConfig>, ConfigError> {
    let domains: Vec<String> = o
        .acme_domain
        .iter()
        .flatten()
        .map(|d| d.trim().trim_end_matches('.').to_ascii_lowercase())
        .filter(|d| !d.is_empty())
        .collect();
    if domains.is_empty() {
        return Ok(None);
    }
    let TlsSource::DevDir { dir } = tls else {
        return Err(invalid(
            "acme-domain",
            "cannot be combined with tls-cert/tls-key: ACME obtains the certificate itself \
             (remove one or the other)",
        ));
    };
    if domains.len() > 100 {
        return Err(invalid(
            "acme-domain",
            "at most 100 names fit on one certificate",
        ));
    }
    for domain in &domains {
        if let Err(reason) = check_domain(domain) {
            return Err(invalid("acme-domain", &format!("\"{domain}\" {reason}")));
        }
    }
    let email = o
        .acme_email
        .as_deref()
        .map(str::trim)
        .filter(|e| !e.is_empty());
    if let Some(email) = email {
        let ok = email.split_once('@').is_some_and(|(user, host)| {
            !user.is_empty() && host.contains('.') && !host.starts_with('.')
        }) && !email.contains(|c: char| c.is_whitespace() || c == ',' || c == '?');
        if !ok {
            return Err(invalid(
                "acme-email",
                &format!("\"{email}\" is not an e-mail address like ops@example.com"),
            ));
        }
    }
    let directory = o
        .acme_directory
        .clone()
        .unwrap_or_else(|| LETS_ENCRYPT_PRODUCTION.to_owned());
    if !directory.starts_with("https://") || directory.parse::<hyper::Uri>().is_err() {
        return Err(invalid(
            "acme-directory",
            &format!("\"{directory}\" must be an https:// URL such as {LETS_ENCRYPT_PRODUCTION}"),
        ));
    }
    let retry_delay = o.acme_retry_delay.map_or(Duration::from_secs(60), |s| s.0);
    if retry_delay.is_zero() {
        return Err(invalid("acme-retry-delay", "must be greater than 0"));
    }
    Ok(Some(AcmeConfig {
        domains,
        email: email.map(str::to_owned),
        directory,
        directory_ca: o.acme_directory_ca.clone(),
        challenge: o.acme_challenge.unwrap_or(AcmeChallenge::Auto),
        retry_delay,
        state_dir: dir.join("acme"),
    }))
}

/// Why `name` cannot be on a certificate obtained with HTTP-01 or TLS-ALPN-01, if it cannot.
fn check_domain(name: &str) -> Result<(), &'static str> {
    if name.parse::<IpAddr>().is_ok() {
        return Err("is an IP address; ACME here needs a DNS name");
    }
    if name.starts_with("*.") {
        return Err("is a wildcard, which needs the DNS-01 challenge; list each name instead");
    }
    if name.len() > 253 || !name.contains('.') {
        return Err("is not a fully qualified DNS name like call.example.com");
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    if !name.split('.').all(label_ok) {
        return Err("is not a valid DNS name (letters, digits and hyphens between dots)");
    }
    Ok(())
}

fn non_zero(
    key: &'static str,
    value: Option<u32>,
    default: u32,
) -> Result<NonZeroU32, ConfigError> {
    NonZeroU32::new(value.unwrap_or(default)).ok_or_else(|| invalid(key, "must be at least 1"))
}

fn invalid(key: &'static str, reason: &str) -> ConfigError {
    ConfigError::Invalid {
        key,
        reason: reason.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Options {
        let mut argv = vec!["callgate"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv).expect("arguments parse").options
    }

    #[test]
    fn defaults_are_the_documented_ports() {
        let config = Config::from_options(Options::default()).unwrap();
        assert_eq!(config.https_listen, "[::]:8443".parse().unwrap());
        assert_eq!(config.http_listen, Listen::On("[::]:8080".parse().unwrap()));
        assert_eq!(
            config.tls,
            TlsSource::DevDir {
                dir: PathBuf::from("certs")
            }
        );
    }

    #[test]
    fn flags_win_over_the_file() {
        let cli = parse(&["--https-listen", "127.0.0.1:9443", "--http-listen", "off"]);
        let file: Options =
            toml::from_str("https-listen = \"127.0.0.1:1\"\nidle-timeout = \"2m\"\n").unwrap();
        let config = Config::from_options(cli.or(file)).unwrap();
        assert_eq!(config.https_listen, "127.0.0.1:9443".parse().unwrap());
        assert_eq!(config.http_listen, Listen::Off);
        assert_eq!(config.idle_timeout, Duration::from_secs(120));
    }

    #[test]
    fn turn_on_https_port_is_on_by_default_and_needs_turn() {
        let config = Config::from_options(Options::default()).unwrap();
        assert!(config.turn.on_https_port);
        let off = Config::from_options(parse(&["--turn-on-https-port", "false"])).unwrap();
        assert!(!off.turn.on_https_port);
        let file: Options = toml::from_str("turn-on-https-port = false").unwrap();
        assert!(!Config::from_options(file).unwrap().turn.on_https_port);
        let without_turn = parse(&["--turn", "false", "--turn-on-https-port", "true"]);
        let err = Config::from_options(without_turn).unwrap_err();
        assert!(err.to_string().contains("turn-on-https-port"), "{err}");
    }

    #[test]
    fn worker_threads_default_to_the_usable_cores_and_are_bounded() {
        let config = Config::from_options(Options::default()).unwrap();
        let cores = std::thread::available_parallelism().unwrap().get();
        assert_eq!(config.worker_threads, cores);
        let one = Config::from_options(parse(&["--worker-threads", "1"])).unwrap();
        assert_eq!(one.worker_threads, 1);
        let zero = Config::from_options(parse(&["--worker-threads", "0"])).unwrap_err();
        assert_eq!(
            zero.to_string(),
            "worker-threads: must be between 1 and 1024"
        );
    }

    #[test]
    fn edge_limits_have_safe_defaults_and_are_validated() {
        let config = Config::from_options(Options::default()).unwrap();
        assert_eq!(config.connections_per_ip, 128);
        assert_eq!(config.response_stall_timeout, Duration::from_secs(30));
        assert_eq!(config.public_dir_max_bytes, 64 * 1024 * 1024);
        for (args, message) in [
            (
                &["--connections-per-ip", "0"][..],
                "connections-per-ip: must be at least 1",
            ),
            (
                &["--response-stall-timeout", "0"][..],
                "response-stall-timeout: must be greater than 0",
            ),
            (
                &["--public-dir-max-bytes", "10"][..],
                "public-dir-max-bytes: must be between 1024 and 4294967296 (the web app is held in memory)",
            ),
        ] {
            let err = Config::from_options(parse(args)).unwrap_err();
            assert_eq!(err.to_string(), message);
        }
    }

    #[test]
    fn durations_accept_units_and_plain_seconds() {
        let file: Options = toml::from_str(
            "tls-handshake-timeout = 3\nheader-read-timeout = \"1500ms\"\nshutdown-timeout = \"1h\"",
        )
        .unwrap();
        let config = Config::from_options(file).unwrap();
        assert_eq!(config.tls_handshake_timeout, Duration::from_secs(3));
        assert_eq!(config.header_read_timeout, Duration::from_millis(1500));
        assert_eq!(config.shutdown_timeout, Duration::from_secs(3600));
        assert!("5 parsecs".parse::<Seconds>().is_err());
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key() {
        let unknown = toml::from_str::<Options>("htps-listen = \"0.0.0.0:1\"").unwrap_err();
        assert!(unknown.to_string().contains("htps-listen"), "{unknown}");
        let bad = toml::from_str::<Options>("http-listen = \"nowhere\"").unwrap_err();
        assert!(bad.to_string().contains("http-listen"), "{bad}");

        let zero = Config::from_options(parse(&["--idle-timeout", "0"])).unwrap_err();
        assert_eq!(zero.to_string(), "idle-timeout: must be greater than 0");
        let url = Config::from_options(parse(&["--public-url", "http://x"])).unwrap_err();
        assert!(url.to_string().starts_with("public-url: "), "{url}");
    }

    #[test]
    fn the_printed_config_shows_normalised_values() {
        let config =
            Config::from_options(parse(&["--public-url", "https://Call.Example.com/"])).unwrap();
        let printed = config.to_toml();
        assert!(
            printed.contains("public-url = \"https://call.example.com\""),
            "{printed}"
        );
    }

    #[test]
    fn acme_is_off_without_a_domain_and_checked_with_one() {
        assert_eq!(Config::from_options(parse(&[])).unwrap().acme, None);
        let acme = Config::from_options(parse(&[
            "--acme-domain",
            "Call.Example.com.,www.example.com",
            "--certs-dir",
            "/var/lib/callgate/certs",
        ]))
        .unwrap()
        .acme
        .unwrap();
        assert_eq!(acme.domains, ["call.example.com", "www.example.com"]);
        assert_eq!(acme.directory, LETS_ENCRYPT_PRODUCTION);
        assert_eq!(acme.challenge, AcmeChallenge::Auto);
        assert_eq!(acme.retry_delay, Duration::from_secs(60));
        assert_eq!(acme.state_dir, Path::new("/var/lib/callgate/certs/acme"));

        let file: Options = toml::from_str(
            "acme-domain = [\"call.example.com\"]\nacme-email = \"ops@example.com\"\n\
             acme-directory = \"https://acme-staging-v02.api.letsencrypt.org/directory\"\n\
             acme-challenge = \"http-01\"\nacme-retry-delay = \"5m\"",
        )
        .unwrap();
        let acme = Config::from_options(file).unwrap().acme.unwrap();
        assert_eq!(acme.email.as_deref(), Some("ops@example.com"));
        assert_eq!(acme.challenge, AcmeChallenge::Http01);
        assert_eq!(acme.retry_delay, Duration::from_secs(300));

        let refused = |args: &[&str]| {
            let mut all = vec!["--acme-domain", "call.example.com"];
            all.extend_from_slice(args);
            Config::from_options(parse(&all)).unwrap_err().to_string()
        };
        assert!(refused(&["--tls-cert", "c", "--tls-key", "k"]).starts_with("acme-domain: "));
        assert!(
            refused(&["--acme-directory", "http://ca.test/dir"]).starts_with("acme-directory: ")
        );
        assert!(refused(&["--acme-email", "nobody"]).starts_with("acme-email: "));
        assert!(
            refused(&["--acme-challenge", "http-01", "--http-listen", "off"])
                .starts_with("acme-challenge: ")
        );
        assert!(refused(&["--acme-retry-delay", "0"]).starts_with("acme-retry-delay: "));
        for bad in [
            "*.example.com",
            "192.0.2.1",
            "localhost",
            "a..b.com",
            "-a.example.com",
        ] {
            let error = Config::from_options(parse(&[&format!("--acme-domain={bad}")]))
                .unwrap_err()
                .to_string();
            assert!(
                error.starts_with(&format!("acme-domain: \"{bad}\"")),
                "{error}"
            );
        }
    }

    #[test]
    fn allocations_per_ip_defaults_to_one_percent_of_the_total_quota() {
        let default = Config::from_options(Options::default()).unwrap();
        assert_eq!(default.turn.allocations_per_ip, 100);
        let bigger = Config::from_options(parse(&["--total-quota", "50000"])).unwrap();
        assert_eq!(bigger.turn.allocations_per_ip, 500);
        let tiny = Config::from_options(parse(&["--total-quota", "20"])).unwrap();
        assert_eq!(tiny.turn.allocations_per_ip, 1);
        let file: Options = toml::from_str("allocations-per-ip = 7").unwrap();
        assert_eq!(
            Config::from_options(file).unwrap().turn.allocations_per_ip,
            7
        );
        let flag = Config::from_options(parse(&["--allocations-per-ip", "3"])).unwrap();
        assert_eq!(flag.turn.allocations_per_ip, 3);
        let zero = Config::from_options(parse(&["--allocations-per-ip", "0"])).unwrap_err();
        assert_eq!(zero.to_string(), "allocations-per-ip: must be at least 1");
    }

    #[test]
    fn cluster_mode_needs_a_shared_secret_and_an_own_turn_address() {
        assert_eq!(Config::from_options(parse(&[])).unwrap().cluster, None);
        let url = ["--redis-url", "redis://:hunter2hunter2@10.0.0.5:6379/0"];
        let refused = |extra: &[&str]| {
            let mut args = url.to_vec();
            args.extend_from_slice(extra);
            Config::from_options(parse(&args)).unwrap_err().to_string()
        };
        assert!(refused(&[]).starts_with("static-auth-secret: is required with redis-url"));
        let secret = ["--static-auth-secret", "0123456789abcdef0123"];
        assert!(refused(&secret).starts_with("turn-host: (or external-ip) is required"));
        // Without TURN nothing is advertised, so neither is needed.
        assert!(Config::from_options(parse(&[url[0], url[1], "--turn", "false"])).is_ok());

        let mut args = url.to_vec();
        args.extend_from_slice(&secret);
        args.extend_from_slice(&["--turn-host", "node1.example.com", "--node-id", "node-1"]);
        let config = Config::from_options(parse(&args)).unwrap();
        let cluster = config.cluster.as_ref().unwrap();
        assert_eq!(cluster.node_id, "node-1");
        assert_eq!(cluster.redis_url.expose(), url[1]);
        // check-config masks the password; the host stays visible.
        let printed = config.to_toml();
        assert!(!printed.contains("hunter2"), "{printed}");
        assert!(printed.contains("redis://***@10.0.0.5:6379/0"), "{printed}");
    }

    #[test]
    fn check_config_prints_external_ip_as_written() {
        // A public address without a private one used to stop the printout ("unsupported None
        // value"), since TOML has no null.
        let public = Config::from_options(parse(&["--external-ip", "203.0.113.7"])).unwrap();
        let printed = public.to_toml();
        assert!(
            printed.contains("external-ip = \"203.0.113.7\""),
            "{printed}"
        );
        let both = Config::from_options(parse(&["--external-ip", "203.0.113.7/10.0.0.5"])).unwrap();
        let printed = both.to_toml();
        assert!(
            printed.contains("external-ip = \"203.0.113.7/10.0.0.5\""),
            "{printed}"
        );
    }

    #[test]
    fn node_ids_are_checked_and_default_to_the_host_name_and_a_suffix() {
        let base = [
            "--redis-url",
            "rediss://redis.internal:6380",
            "--turn",
            "false",
        ];
        let with_id = |id: &str| {
            let mut args = base.to_vec();
            args.extend_from_slice(&["--node-id", id]);
            Config::from_options(parse(&args))
        };
        assert!(with_id("eu-1.node_2").is_ok());
        for bad in ["", "a b", "a/b", "ключ", &"n".repeat(65)] {
            let error = with_id(bad).unwrap_err().to_string();
            assert!(error.starts_with("node-id: "), "{bad:?}: {error}");
        }
        let a = Config::from_options(parse(&base)).unwrap().cluster.unwrap();
        let b = Config::from_options(parse(&base)).unwrap().cluster.unwrap();
        assert!(check_node_id(&a.node_id).is_ok(), "{}", a.node_id);
        assert_ne!(a.node_id, b.node_id, "two processes on one host differ");
        assert!(a.redis_url.is_tls());
        // node-id alone is a mistake, and so is a URL of another scheme.
        let alone = Config::from_options(parse(&["--node-id", "n1"])).unwrap_err();
        assert!(alone
            .to_string()
            .starts_with("node-id: only means something in a cluster"));
        let http = Cli::try_parse_from(["callgate", "--redis-url", "http://x"]).unwrap_err();
        assert!(
            http.to_string().contains("must start with redis://"),
            "{http}"
        );
        // The file takes the same keys; a bad URL there names the key too.
        let file: Options =
            toml::from_str("redis-url = \"redis://10.0.0.5:6379\"\nnode-id = \"call-2\"").unwrap();
        assert_eq!(file.node_id.as_deref(), Some("call-2"));
        let bad = toml::from_str::<Options>("redis-url = \"10.0.0.5:6379\"").unwrap_err();
        assert!(bad.to_string().contains("redis-url"), "{bad}");
    }
}
