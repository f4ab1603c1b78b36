//! The one configuration type, [`Config`], and where its values come from.
//!
//! Every setting has the same name as a command-line flag (`--https-listen`), a key in the optional
//! TOML file (`https-listen = "…"`) and an environment variable (`CALLGATE_HTTPS_LISTEN`). Precedence:
//! flags > environment > file > defaults. The raw layers are [`Options`] (every field optional);
//! [`Config::resolve`] merges them over [`Config::default`], links the values that several
//! subsystems share, and validates, so the rest of the program only ever sees a complete, checked
//! [`Config`]. Defaults are safe on the public internet.
//!
//! `Config` is made of sections, and the sections are the types the subsystems take:
//! [`ConnectionSettings`] (HTTP connections), [`SessionSettings`] and [`SignalingLimits`]
//! (signaling), [`TurnSettings`] (the relay), [`AcmeConfig`], and small ones defined here. Each
//! section has one `Default`, which is the one place its defaults are written, and one `check`,
//! which validates each of its values once; [`Config::check`] adds the checks that span sections.
//!
//! # How to add a setting
//!
//! 1. Give the section that uses it a field with a `///` comment and its default in the
//!    section's `Default` (a new section: a struct with `Default` and `check`, and a field in
//!    [`Config`]).
//! 2. Add one row to the `settings!` table below: the `///` help text for `--help`,
//!    `#[arg(value_name = …)]`, then `key: LayerType => section.field;`. The row's name is the
//!    TOML key in snake case; the macro makes the flag `--key`, the environment variable
//!    `CALLGATE_KEY` and the TOML key `key`, merges the layers and prints the value in
//!    `check-config`; `--help` appends `[default: …]` read from `Config::default()` (write it in
//!    words in the help only when it depends on the host or on another setting). `LayerType` is
//!    what the user writes (`Seconds` for a duration, `u32` for a count, `Secret` for anything
//!    that must not be printed; a new one needs `FromStr`, `Deserialize` and `Serialize`, see
//!    [`values`]); it becomes the field's type through [`Layered`] (add an impl there for a new
//!    pair of types).
//! 3. Validate the value in the section's `check` (or [`Config::check`] if it depends on another
//!    section), with an error naming the key.
//! 4. Add it to README's settings table and to `ops/callgate.toml` (`tests/ops.rs` checks that
//!    every setting appears exactly once in `--help`, the table and the example file).
//!
//! This module reads the config file and nothing else: no sockets, no certificates.

pub mod values;

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use serde::{Deserialize, Serialize};

pub use crate::http::websocket::OriginPolicy;
pub use crate::http::ConnectionSettings;
pub use crate::signaling::session::SessionSettings;
pub use crate::signaling::SignalingLimits;
use crate::turn::{ExternalIp, TurnSettings};
pub use values::{
    AcmeChallenge, IpRange, Listen, LogFormat, PortOrOff, PublicUrl, RedisUrl, Seconds, Secret,
    LETS_ENCRYPT_PRODUCTION,
};

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

/// Generates, from one row per setting, the layer type [`Options`] (a clap flag with its
/// `CALLGATE_*` variable and a TOML key per row), merging layers, writing a layer into a
/// [`Config`] and reading a `Config` back into a layer (for `check-config`).
macro_rules! settings {
    ($(
        $(#[doc = $doc:literal])*
        #[arg($($arg:tt)*)]
        $key:ident: $layer:ty => $($path:ident).+;
    )*) => {
        /// One layer of settings: the command line (with the environment) or the TOML file.
        ///
        /// Every field is `Option` so that layers can be merged; [`Config`] holds the resolved
        /// values. The doc comment of each field is its `--help` text.
        #[derive(Debug, Default, Clone, Args, Deserialize, Serialize)]
        #[serde(rename_all = "kebab-case", deny_unknown_fields)]
        #[command(mut_args = with_env_var)]
        pub struct Options {
            /// TOML file with settings (keys are the flag names without "--").
            #[arg(long, value_name = "FILE")]
            #[serde(skip)]
            pub config: Option<PathBuf>,
            $(
                $(#[doc = $doc])*
                #[arg(long, $($arg)*)]
                #[serde(skip_serializing_if = "Option::is_none")]
                pub $key: Option<$layer>,
            )*
        }

        impl Options {
            /// Fills every unset field of `self` from `lower`.
            fn or(self, lower: Options) -> Options {
                Options {
                    config: self.config.or(lower.config),
                    $($key: self.$key.or(lower.$key),)*
                }
            }

            /// Writes every value this layer sets into `config`.
            fn apply(self, config: &mut Config) -> Result<(), ConfigError> {
                $(
                    if let Some(value) = self.$key {
                        config.$($path).+ = Layered::from_layer(value)
                            .map_err(|reason| invalid(&key_of(stringify!($key)), &reason))?;
                    }
                )*
                Ok(())
            }

            /// The layer that sets every setting to its value in `config`.
            fn of(config: &Config) -> Options {
                Options {
                    config: None,
                    $($key: <_ as Layered<$layer>>::to_layer(&config.$($path).+),)*
                }
            }
        }
    };
}

/// `ws_max_message_bytes` → `ws-max-message-bytes`.
fn key_of(field: &str) -> String {
    field.replace('_', "-")
}

/// Gives every flag its environment variable, `CALLGATE_` and the flag's name in capitals, and
/// ends its help with the default from [`Config::default`] unless the help describes the default
/// itself (one that depends on the host or on another setting).
fn with_env_var(arg: clap::Arg) -> clap::Arg {
    let Some(long) = arg.get_long() else {
        return arg;
    };
    let var = format!("CALLGATE_{}", long.replace('-', "_").to_ascii_uppercase());
    let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
    let default = default_text(long).filter(|_| !help.contains("[default:"));
    let arg = arg.env(var);
    match default {
        Some(default) => arg.help(format!("{help} [default: {default}]")),
        None => arg,
    }
}

/// The default of the setting `key` as written in a flag, if it has one: `Config::default()`
/// read back into a layer.
fn default_text(key: &str) -> Option<String> {
    static DEFAULTS: std::sync::OnceLock<toml::Table> = std::sync::OnceLock::new();
    let defaults = DEFAULTS
        .get_or_init(|| toml::Table::try_from(Options::of(&Config::default())).unwrap_or_default());
    let text = |value: &toml::Value| match value {
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    match defaults.get(key)? {
        toml::Value::Array(items) if items.is_empty() => Some("none".to_owned()),
        toml::Value::Array(items) => Some(items.iter().map(text).collect::<Vec<_>>().join(",")),
        value => Some(text(value)),
    }
}

settings! {
    /// Address of the HTTPS listener (web app, WebSocket signaling); `[::]` accepts IPv4 too, and
    /// falls back to 0.0.0.0 on a host without IPv6.
    #[arg(value_name = "ADDR")]
    https_listen: SocketAddr => http.https_listen;

    /// Address of the plain-HTTP listener that only redirects to HTTPS and answers /healthz, or
    /// "off".
    #[arg(value_name = "ADDR|off")]
    http_listen: Listen => http.http_listen;

    /// Public base URL of the HTTPS listener, e.g. https://call.example.com, when it differs from
    /// what clients send in Host (port mapping, load balancer). Used for redirects and the origin check.
    #[arg(value_name = "URL")]
    public_url: String => http.public_url;

    /// Directory of the web app served over HTTPS.
    #[arg(value_name = "DIR")]
    public_dir: PathBuf => http.public_dir;

    /// PEM certificate chain (leaf first). Without --tls-cert/--tls-key callgate uses
    /// certs/cert.pem and certs/key.pem, generating a self-signed development pair there if absent.
    #[arg(value_name = "FILE", requires = "tls_key")]
    tls_cert: PathBuf => tls.cert;

    /// PEM private key (PKCS#8, PKCS#1 or SEC1) for --tls-cert.
    #[arg(value_name = "FILE", requires = "tls_cert")]
    tls_key: PathBuf => tls.key;

    /// Directory for the generated development certificate.
    #[arg(value_name = "DIR")]
    certs_dir: PathBuf => tls.certs_dir;

    /// How often the certificate files are checked for changes; SIGHUP reloads at once.
    #[arg(value_name = "DURATION")]
    tls_reload_interval: Seconds => tls.reload_interval;

    /// A TLS handshake that takes longer than this is cut off.
    #[arg(value_name = "DURATION")]
    tls_handshake_timeout: Seconds => http.connection.tls_handshake_timeout;

    /// An HTTP/1 client must send a complete request head within this time; this also bounds how
    /// long an idle keep-alive connection waits for its next request.
    #[arg(value_name = "DURATION")]
    header_read_timeout: Seconds => http.connection.header_read_timeout;

    /// A connection (HTTP/1 or HTTP/2) with no traffic at all for this long is closed.
    #[arg(value_name = "DURATION")]
    idle_timeout: Seconds => http.connection.idle_timeout;

    /// Most concurrent streams per HTTP/2 connection.
    #[arg(value_name = "N")]
    h2_max_concurrent_streams: u32 => http.connection.h2_max_concurrent_streams;

    /// Most open connections per client address (IPv6 per /64) on every listener, counted at accept
    /// before any TLS work; behind a trusted PROXY-protocol balancer, per address it names.
    #[arg(value_name = "N")]
    connections_per_ip: u32 => http.connections_per_ip;

    /// A response that sends no byte for this long (the client stopped reading, or advertises a zero
    /// HTTP/2 window) ends its connection.
    #[arg(value_name = "DURATION")]
    response_stall_timeout: Seconds => http.connection.response_stall_timeout;

    /// Largest total size of public-dir, which is held in memory; more fails at startup.
    #[arg(value_name = "BYTES")]
    public_dir_max_bytes: u64 => http.public_dir_max_bytes;

    /// Most open client connections over all listeners; more are refused at accept.
    #[arg(value_name = "N")]
    max_connections: usize => http.max_connections;

    /// Threads running connections [default: one per CPU core the process may use].
    #[arg(value_name = "N")]
    worker_threads: usize => runtime.worker_threads;

    /// Max-age of the Strict-Transport-Security header; 0 tells browsers to forget it.
    #[arg(value_name = "DURATION")]
    hsts_max_age: Seconds => http.hsts_max_age;

    /// After SIGTERM, how long /readyz reports 503 while new connections are still accepted, so a
    /// load balancer can take this instance out first.
    #[arg(value_name = "DURATION")]
    shutdown_drain_delay: Seconds => shutdown.drain_delay;

    /// After the drain delay, how long in-flight requests may take before callgate exits anyway.
    #[arg(value_name = "DURATION")]
    shutdown_timeout: Seconds => shutdown.timeout;

    /// Origins (e.g. https://app.example.com) allowed to open signaling WebSockets besides this
    /// server's own; comma-separated on the command line.
    #[arg(value_name = "ORIGIN,...", value_delimiter = ',')]
    allowed_origins: Vec<String> => signaling.origins.allowed_origins;

    /// Largest signaling message, counted over all fragments.
    #[arg(value_name = "BYTES")]
    ws_max_message_bytes: usize => signaling.session.max_message_bytes;

    /// Interval of WebSocket pings; after ws-missed-pongs unanswered ones the connection is closed.
    #[arg(value_name = "DURATION")]
    ws_heartbeat_interval: Seconds => signaling.session.heartbeat_interval;

    /// Unanswered pings before a connection counts as dead.
    #[arg(value_name = "N")]
    ws_missed_pongs: u32 => signaling.session.missed_pongs;

    /// Frames queued for one client before it counts as too slow and is disconnected.
    #[arg(value_name = "N")]
    ws_outbox_frames: usize => signaling.session.outbox_frames;

    /// Bytes queued for one client before it counts as too slow and is disconnected; at least
    /// resume-queue-bytes + ws-max-message-bytes.
    #[arg(value_name = "BYTES")]
    ws_outbox_bytes: usize => signaling.session.outbox_bytes;

    /// Bytes queued over all clients; once spent, a client with more than 64 KiB queued counts as
    /// too slow.
    #[arg(value_name = "BYTES")]
    ws_outbox_bytes_total: usize => signaling.session.outbox_bytes_total;

    /// Bytes of messages held for one client ID until it acknowledges them or resumes; beyond
    /// it, messages are dropped and their senders told.
    #[arg(value_name = "BYTES")]
    resume_queue_bytes: usize => signaling.limits.resume_queue_bytes;

    /// Reserved IDs (dropped connections awaiting a resume) per client address, IPv6 per /64;
    /// beyond it a dropped ID is freed at once.
    #[arg(value_name = "N")]
    reservations_per_ip: usize => signaling.limits.reservations_per_ip;

    /// Client IDs held at once, live and reserved; when full, the oldest reservation makes room
    /// for a live client.
    #[arg(value_name = "N")]
    max_clients: usize => signaling.limits.max_clients;

    /// A write to a client that makes no progress for this long ends the connection.
    #[arg(value_name = "DURATION")]
    ws_write_timeout: Seconds => signaling.session.write_timeout;

    /// Signaling messages per second per connection, sustained.
    #[arg(value_name = "N")]
    ws_messages_per_second: u32 => signaling.session.messages_per_second;

    /// Signaling message burst per connection.
    #[arg(value_name = "N")]
    ws_message_burst: u32 => signaling.session.message_burst;

    /// New calls per minute per connection (stops ID scanning and call spam).
    #[arg(value_name = "N")]
    ws_calls_per_minute: u32 => signaling.session.calls_per_minute;

    /// WebSocket upgrades per second per client address (IPv6 per /64).
    #[arg(value_name = "N")]
    ws_upgrades_per_second: u32 => signaling.upgrades_per_second;

    /// Open WebSockets per client address (IPv6 per /64).
    #[arg(value_name = "N")]
    ws_connections_per_ip: u32 => signaling.connections_per_ip;

    /// Digits in a client ID: random, so IDs cannot be enumerated.
    #[arg(value_name = "N")]
    id_digits: u8 => signaling.limits.id_digits;

    /// How long a dropped client's ID (and call) is kept for it to resume.
    #[arg(value_name = "DURATION")]
    resume_grace: Seconds => signaling.limits.resume_grace;

    /// Directory holding HTTP-01 token files written by an outside ACME client: the plain-HTTP
    /// listener answers /.well-known/acme-challenge/TOKEN with the file DIR/TOKEN. For
    /// `certbot --webroot -w W` pass W/.well-known/acme-challenge (not W) [default: none].
    #[arg(value_name = "DIR")]
    acme_challenge_dir: PathBuf => acme.challenge_dir;

    /// Domain names (comma-separated) to get a certificate for automatically over ACME; the
    /// account key and certificate are kept in certs-dir. Unset: no ACME.
    #[arg(value_name = "NAME,...", value_delimiter = ',')]
    acme_domain: Vec<String> => acme.domains;

    /// Contact e-mail address for the ACME account, for the CA's problem notices [default: none].
    #[arg(value_name = "ADDRESS")]
    acme_email: String => acme.email;

    /// ACME directory URL; the default is Let's Encrypt production, its staging directory is
    /// https://acme-staging-v02.api.letsencrypt.org/directory.
    #[arg(value_name = "URL")]
    acme_directory: String => acme.directory;

    /// PEM file of CA certificates to trust for the ACME directory's own HTTPS (a private CA);
    /// when set, only these are trusted [default: the system's trusted roots].
    #[arg(value_name = "FILE")]
    acme_directory_ca: PathBuf => acme.directory_ca;

    /// Which ACME challenge to answer: tls-alpn-01 (on the HTTPS listener), http-01 (on the
    /// plain-HTTP listener) or auto (both, switching after a failed validation).
    #[arg(value_name = "TYPE")]
    acme_challenge: AcmeChallenge => acme.challenge;

    /// Wait before retrying a failed ACME order; doubles after each failure up to 6h, and a CA's
    /// rate-limit Retry-After is always honoured.
    #[arg(value_name = "DURATION")]
    acme_retry_delay: Seconds => acme.retry_delay;

    /// Load balancers (CIDR or IP, comma-separated) whose connections start with a PROXY protocol
    /// header (v1 or v2) naming the real client; required from them, ignored from anyone else.
    #[arg(value_name = "CIDR,...", value_delimiter = ',')]
    proxy_protocol_from: Vec<IpRange> => http.proxy_protocol_from;

    /// Run the embedded TURN relay (true|false).
    #[arg(value_name = "BOOL")]
    turn: bool => turn.relay.enabled;

    /// TURN realm, sent in authentication challenges.
    #[arg(value_name = "REALM")]
    realm: String => turn.relay.realm;

    /// Addresses the TURN listeners bind, comma-separated; 0.0.0.0 and :: stand for every IPv4 and
    /// IPv6 address of this host at start, each bound separately so answers leave from the address
    /// asked.
    #[arg(value_name = "IP,...", value_delimiter = ',')]
    listening_ip: Vec<IpAddr> => turn.relay.listening_ips;

    /// TURN port for UDP and TCP.
    #[arg(value_name = "PORT")]
    listening_port: u16 => turn.listening_port;

    /// TURN over TLS (turns:) port, using the HTTPS certificate, or "off".
    #[arg(value_name = "PORT|off")]
    tls_listening_port: PortOrOff => turn.relay.tls_port;

    /// Serve TURN over UDP (true|false).
    #[arg(value_name = "BOOL")]
    turn_udp: bool => turn.udp;

    /// Serve TURN over TCP (true|false).
    #[arg(value_name = "BOOL")]
    turn_tcp: bool => turn.tcp;

    /// Local address relay sockets bind to [default: the listening IP, or this host's first
    /// non-loopback address when listening on 0.0.0.0].
    #[arg(value_name = "IP")]
    relay_ip: IpAddr => turn.relay.relay_ip;

    /// Public address advertised for relayed candidates behind 1:1 NAT (cloud VMs): PUBLIC or
    /// PUBLIC/PRIVATE.
    #[arg(value_name = "IP[/IP]")]
    external_ip: String => turn.relay.external_ip;

    /// Lowest UDP port for relayed candidates.
    #[arg(value_name = "PORT")]
    min_port: u16 => turn.relay.min_port;

    /// Highest UDP port for relayed candidates.
    #[arg(value_name = "PORT")]
    max_port: u16 => turn.relay.max_port;

    /// TURN REST API shared secret(s), comma-separated, newest first: the first signs new
    /// credentials, all are accepted (rotation). Same as coturn's static-auth-secret [default: a
    /// random secret per process].
    #[arg(value_name = "SECRET,...", value_delimiter = ',', hide_env_values = true)]
    static_auth_secret: Vec<Secret> => turn.relay.auth_secrets;

    /// Lifetime of TURN credentials handed to clients.
    #[arg(value_name = "DURATION")]
    turn_credential_ttl: Seconds => turn.relay.credential_ttl;

    /// Concurrent TURN allocations per user.
    #[arg(value_name = "N")]
    user_quota: usize => turn.relay.user_quota;

    /// Concurrent TURN allocations in total.
    #[arg(value_name = "N")]
    total_quota: usize => turn.relay.total_quota;

    /// Concurrent TURN allocations one client address may hold, IPv6 counted per /64; over it
    /// Allocate gets 486 [default: 1 % of total-quota, at least 1].
    #[arg(value_name = "N")]
    allocations_per_ip: usize => turn.relay.allocations_per_ip;

    /// Unauthenticated TURN requests (each client's first Allocate, Binding) accepted per second per
    /// source address, burst twice that; more are dropped.
    #[arg(value_name = "N")]
    turn_unauthenticated_per_ip: u32 => turn.relay.unauthenticated_per_ip_per_sec;

    /// Bandwidth cap per allocation, bytes per second each way [default: none].
    #[arg(value_name = "BYTES")]
    max_bps: u32 => turn.relay.max_bytes_per_sec;

    /// Peer ranges (CIDR or IP) the relay may reach even if special or denied, comma-separated.
    #[arg(value_name = "CIDR,...", value_delimiter = ',')]
    allowed_peer_ip: Vec<IpRange> => turn.relay.allowed_peer_ips;

    /// Extra peer ranges (CIDR or IP) the relay never reaches, comma-separated.
    #[arg(value_name = "CIDR,...", value_delimiter = ',')]
    denied_peer_ip: Vec<IpRange> => turn.relay.denied_peer_ips;

    /// Let the relay reach private networks (RFC 1918, CGNAT, ULA): only for relays inside a
    /// private deployment. Loopback, link-local and metadata addresses stay refused.
    #[arg(value_name = "BOOL")]
    allow_private_peers: bool => turn.relay.allow_private_peers;

    /// Also answer TURN over TLS on the HTTPS port (connections offering ALPN `stun.turn`, or none
    /// and starting with a STUN header) and advertise `turns:HOST:HTTPS-PORT?transport=tcp`, for
    /// callers whose firewall opens only TCP 443. Needs TURN on.
    #[arg(value_name = "BOOL")]
    turn_on_https_port: bool => turn.on_https_port;

    /// Host name put in the turn:/turns: URLs handed to browsers [default: public-url's host, else
    /// the host the browser connected to].
    #[arg(value_name = "HOST")]
    turn_host: String => turn.host;

    /// API key that enables GET /api/turn-credentials (Authorization: Bearer KEY) for apps doing
    /// their own signaling [default: endpoint disabled].
    #[arg(value_name = "SECRET", hide_env_values = true)]
    turn_api_key: Secret => turn.api_key;

    /// Address of the admin listener serving Prometheus metrics at /metrics, or "off". Keep it
    /// off the public internet.
    #[arg(value_name = "ADDR|off")]
    metrics_listen: Listen => metrics.listen;

    /// Bearer token required on /metrics (Authorization: Bearer TOKEN); unset means none.
    #[arg(value_name = "SECRET", hide_env_values = true)]
    metrics_token: Secret => metrics.token;

    /// Log format.
    #[arg(value_name = "FORMAT")]
    log_format: LogFormat => log.format;

    /// Log filter in tracing's EnvFilter syntax, e.g. "info" or "callgate=debug".
    #[arg(value_name = "FILTER")]
    log_level: String => log.level;

    /// Redis that every node of a cluster shares, e.g. redis://:PASSWORD@HOST:6379/0 (password,
    /// port and database optional; rediss:// for TLS); nodes given the same URL form one cluster.
    /// Needs static-auth-secret and turn-host or external-ip. Unset: a single node, nothing shared.
    #[arg(value_name = "URL", hide_env_values = true)]
    redis_url: RedisUrl => cluster.redis_url;

    /// This node's name in the cluster: letters, digits, '.', '_', '-', at most 64 characters,
    /// unique per node [default: the host name plus a random suffix].
    #[arg(value_name = "NAME")]
    node_id: String => cluster.node_id;

    /// Address this node accepts direct links from the other nodes on, e.g. 10.0.0.5:7400: the
    /// messages between nodes then skip Redis (authenticated and encrypted with
    /// static-auth-secret). Keep it on a private network, firewalled to the nodes. Needs
    /// redis-url and static-auth-secret. Unset: no links, every message through Redis.
    #[arg(value_name = "ADDR")]
    cluster_listen: SocketAddr => cluster.listen;

    /// Address the other nodes dial for this node's link [default: cluster-listen; required when
    /// that is 0.0.0.0 or ::].
    #[arg(value_name = "ADDR")]
    cluster_advertise: SocketAddr => cluster.advertise;
}

/// How a setting's layer value (what the user writes) becomes the field it sets, and back.
///
/// Most settings are their field's type; a duration is written as [`Seconds`] and held as a
/// [`Duration`], an optional field is set by a plain value, and so on.
pub trait Layered<L>: Sized {
    /// The field's value for a layer value; `Err` says why it is not acceptable.
    fn from_layer(value: L) -> Result<Self, String>;
    /// The layer value that sets this field to `self`, if it has one.
    fn to_layer(&self) -> Option<L>;
}

impl<T: Clone> Layered<T> for T {
    fn from_layer(value: T) -> Result<T, String> {
        Ok(value)
    }
    fn to_layer(&self) -> Option<T> {
        Some(self.clone())
    }
}

impl<T: Clone> Layered<T> for Option<T> {
    fn from_layer(value: T) -> Result<Self, String> {
        Ok(Some(value))
    }
    fn to_layer(&self) -> Option<T> {
        self.clone()
    }
}

impl Layered<Seconds> for Duration {
    fn from_layer(value: Seconds) -> Result<Self, String> {
        Ok(value.0)
    }
    fn to_layer(&self) -> Option<Seconds> {
        Some(Seconds(*self))
    }
}

impl Layered<u32> for NonZeroU32 {
    fn from_layer(value: u32) -> Result<Self, String> {
        NonZeroU32::new(value).ok_or_else(|| "must be at least 1".to_owned())
    }
    fn to_layer(&self) -> Option<u32> {
        Some(self.get())
    }
}

impl Layered<String> for Option<PublicUrl> {
    fn from_layer(value: String) -> Result<Self, String> {
        PublicUrl::parse(&value).map(Some)
    }
    fn to_layer(&self) -> Option<String> {
        self.as_ref().map(ToString::to_string)
    }
}

impl Layered<PortOrOff> for Option<u16> {
    fn from_layer(value: PortOrOff) -> Result<Self, String> {
        Ok(match value {
            PortOrOff::Port(port) => Some(port),
            PortOrOff::Off => None,
        })
    }
    fn to_layer(&self) -> Option<PortOrOff> {
        Some(self.map_or(PortOrOff::Off, PortOrOff::Port))
    }
}

impl Layered<String> for Option<ExternalIp> {
    fn from_layer(value: String) -> Result<Self, String> {
        let (public, private) = values::parse_external_ip(&value)?;
        Ok(Some(ExternalIp { public, private }))
    }
    fn to_layer(&self) -> Option<String> {
        self.map(|ip| match ip.private {
            Some(private) => format!("{}/{private}", ip.public),
            None => ip.public.to_string(),
        })
    }
}

impl Layered<Vec<Secret>> for Vec<String> {
    fn from_layer(value: Vec<Secret>) -> Result<Self, String> {
        Ok(value.iter().map(|s| s.expose().to_owned()).collect())
    }
    fn to_layer(&self) -> Option<Vec<Secret>> {
        Some(self.iter().map(|s| Secret::from(s.clone())).collect())
    }
}

impl Layered<Vec<IpRange>> for Vec<ipnet::IpNet> {
    fn from_layer(value: Vec<IpRange>) -> Result<Self, String> {
        Ok(value.into_iter().map(|r| r.0).collect())
    }
    fn to_layer(&self) -> Option<Vec<IpRange>> {
        Some(self.iter().copied().map(IpRange).collect())
    }
}

/// The effective configuration: every layer merged, defaults applied, values checked.
///
/// Each field is a section; the subsystems take their section (or a part of it) as it is.
#[derive(Debug, Clone)]
pub struct Config {
    /// The HTTPS and redirect listeners, the web app and HTTP connection limits.
    pub http: HttpConfig,
    /// Where the certificate comes from and how often it is re-read.
    pub tls: TlsConfig,
    /// Automatic certificates over ACME (`acme-*`); off without `acme-domain`.
    pub acme: AcmeConfig,
    /// WebSocket sessions, the signaling hub and per-address WebSocket limits.
    pub signaling: SignalingConfig,
    /// The embedded TURN relay.
    pub turn: TurnConfig,
    /// The Prometheus listener.
    pub metrics: MetricsConfig,
    /// Log format and filter.
    pub log: LogConfig,
    /// What happens after SIGTERM.
    pub shutdown: ShutdownConfig,
    /// The async runtime.
    pub runtime: RuntimeConfig,
    /// Cluster mode (`redis-url`, `node-id`); off without `redis-url`.
    pub cluster: ClusterConfig,
}

impl Default for Config {
    /// Every section's defaults, linked.
    fn default() -> Self {
        let mut config = Config::unlinked();
        config.link();
        config
    }
}

impl Config {
    /// Every section's own defaults, before [`Config::link`] derives the shared values (so that
    /// a default derived from another setting, like `allocations-per-ip`, follows that setting).
    fn unlinked() -> Config {
        Config {
            http: HttpConfig::default(),
            tls: TlsConfig::default(),
            acme: AcmeConfig::default(),
            signaling: SignalingConfig::default(),
            turn: TurnConfig::default(),
            metrics: MetricsConfig::default(),
            log: LogConfig::default(),
            shutdown: ShutdownConfig::default(),
            runtime: RuntimeConfig::default(),
            cluster: ClusterConfig::default(),
        }
    }
}

/// The HTTPS and redirect listeners, the web app and the limits of HTTP connections.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// Where the HTTPS listener binds.
    pub https_listen: SocketAddr,
    /// Where the redirect-only HTTP listener binds, if at all.
    pub http_listen: Listen,
    /// Canonical public origin, when clients cannot be trusted to name it in `Host`.
    pub public_url: Option<PublicUrl>,
    /// Root of the static web app.
    pub public_dir: PathBuf,
    /// Budget for the web app held in memory.
    pub public_dir_max_bytes: u64,
    /// Global cap on open client connections (HTTPS and redirect listeners).
    pub max_connections: usize,
    /// Open connections per client address (IPv6 per /64), on every listener.
    pub connections_per_ip: u32,
    /// `Strict-Transport-Security` max-age.
    pub hsts_max_age: Duration,
    /// Trusted load balancers that send the PROXY protocol.
    pub proxy_protocol_from: Vec<IpRange>,
    /// Timeouts and caps of each connection.
    pub connection: ConnectionSettings,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            https_listen: SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 8443)),
            http_listen: Listen::On(SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 8080))),
            public_url: None,
            public_dir: PathBuf::from("public"),
            public_dir_max_bytes: 64 * 1024 * 1024,
            max_connections: 10_000,
            connections_per_ip: 128,
            hsts_max_age: Duration::from_secs(365 * 86_400),
            proxy_protocol_from: Vec::new(),
            connection: ConnectionSettings::default(),
        }
    }
}

impl HttpConfig {
    fn check(&self) -> Result<(), ConfigError> {
        let c = &self.connection;
        let positive = [
            ("tls-handshake-timeout", c.tls_handshake_timeout),
            ("header-read-timeout", c.header_read_timeout),
            ("idle-timeout", c.idle_timeout),
            ("response-stall-timeout", c.response_stall_timeout),
        ];
        for (key, value) in positive {
            if value.is_zero() {
                return Err(invalid(key, "must be greater than 0"));
            }
        }
        if c.h2_max_concurrent_streams == 0 {
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
        if let Listen::On(http) = self.http_listen {
            if http == self.https_listen && http.port() != 0 {
                return Err(invalid(
                    "http-listen",
                    "must differ from https-listen (the redirect listener needs its own port)",
                ));
            }
        }
        Ok(())
    }
}

/// Where the serving certificate comes from and how often it is re-read.
#[derive(Debug, Clone)]
pub struct TlsConfig {
    /// `tls-cert`: a PEM chain the operator named.
    pub cert: Option<PathBuf>,
    /// `tls-key`: its private key.
    pub key: Option<PathBuf>,
    /// `certs-dir`: the development certificate and the ACME state.
    pub certs_dir: PathBuf,
    /// Poll interval for certificate changes.
    pub reload_interval: Duration,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            cert: None,
            key: None,
            certs_dir: PathBuf::from("certs"),
            reload_interval: Duration::from_secs(10),
        }
    }
}

impl TlsConfig {
    /// The certificate source these settings name (`check` made sure they name one).
    pub fn source(&self) -> TlsSource {
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => TlsSource::Files {
                cert: cert.clone(),
                key: key.clone(),
            },
            _ => TlsSource::DevDir {
                dir: self.certs_dir.clone(),
            },
        }
    }

    /// The certificate chain and key paths to read: [`TlsSource::paths`] of the source.
    pub fn paths(&self) -> (PathBuf, PathBuf) {
        self.source().paths()
    }

    fn check(&self) -> Result<(), ConfigError> {
        match (&self.cert, &self.key) {
            (Some(_), None) => return Err(invalid("tls-key", "is required when tls-cert is set")),
            (None, Some(_)) => return Err(invalid("tls-cert", "is required when tls-key is set")),
            _ => {}
        }
        if self.reload_interval.is_zero() {
            return Err(invalid("tls-reload-interval", "must be greater than 0"));
        }
        Ok(())
    }
}

/// Where the serving certificate comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
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

/// Signaling: the WebSocket sessions, the hub, and per-address WebSocket limits.
#[derive(Debug, Clone)]
pub struct SignalingConfig {
    /// What each WebSocket session may send and queue.
    pub session: SessionSettings,
    /// Which browser origins may open a WebSocket.
    pub origins: OriginPolicy,
    /// The hub's IDs, reservations and held messages.
    pub limits: SignalingLimits,
    /// WebSocket upgrades per second per client address (IPv6 per /64).
    pub upgrades_per_second: NonZeroU32,
    /// Open WebSockets per client address (IPv6 per /64).
    pub connections_per_ip: u32,
}

impl Default for SignalingConfig {
    fn default() -> Self {
        SignalingConfig {
            session: SessionSettings::default(),
            origins: OriginPolicy::default(),
            limits: SignalingLimits::default(),
            upgrades_per_second: NonZeroU32::new(10).expect("non-zero"),
            connections_per_ip: 64,
        }
    }
}

impl SignalingConfig {
    fn check(&self) -> Result<(), ConfigError> {
        let (session, limits) = (&self.session, &self.limits);
        for origin in &self.origins.allowed_origins {
            let scheme_ok = origin.starts_with("https://") || origin.starts_with("http://");
            if !scheme_ok || origin.matches('/').count() != 2 {
                return Err(invalid(
                    "allowed-origins",
                    &format!("\"{origin}\" must be an origin like https://app.example.com (scheme, host, optional port; no path)"),
                ));
            }
        }
        if !(1024..=16 * 1024 * 1024).contains(&session.max_message_bytes) {
            return Err(invalid(
                "ws-max-message-bytes",
                "must be between 1024 and 16777216",
            ));
        }
        if session.write_timeout.is_zero() {
            return Err(invalid("ws-write-timeout", "must be greater than 0"));
        }
        if session.heartbeat_interval.is_zero() {
            return Err(invalid("ws-heartbeat-interval", "must be greater than 0"));
        }
        if session.missed_pongs == 0 {
            return Err(invalid("ws-missed-pongs", "must be at least 1"));
        }
        // A resume replays up to resume-queue-bytes of held messages at once.
        if session.outbox_bytes < limits.resume_queue_bytes + session.max_message_bytes {
            return Err(invalid(
                "ws-outbox-bytes",
                "must be at least resume-queue-bytes + ws-max-message-bytes (a resume replays what is held at once)",
            ));
        }
        if session.outbox_bytes_total < session.outbox_bytes {
            return Err(invalid(
                "ws-outbox-bytes-total",
                "must be at least ws-outbox-bytes",
            ));
        }
        if limits.resume_queue_bytes < session.max_message_bytes {
            return Err(invalid(
                "resume-queue-bytes",
                "must be at least ws-max-message-bytes (one message must fit)",
            ));
        }
        if limits.reservations_per_ip == 0 {
            return Err(invalid("reservations-per-ip", "must be at least 1"));
        }
        if limits.max_clients == 0 {
            return Err(invalid("max-clients", "must be at least 1"));
        }
        if session.outbox_frames < 65 {
            return Err(invalid(
                "ws-outbox-frames",
                "must be at least 65 (a resume delivers up to 64 queued messages at once)",
            ));
        }
        if self.connections_per_ip == 0 {
            return Err(invalid("ws-connections-per-ip", "must be at least 1"));
        }
        if !(6..=15).contains(&limits.id_digits) {
            return Err(invalid(
                "id-digits",
                "must be between 6 and 15 (IDs must stay exact JavaScript numbers)",
            ));
        }
        Ok(())
    }
}

/// The embedded TURN relay: its [`TurnSettings`] and what the gateway adds around it.
#[derive(Debug, Clone)]
pub struct TurnConfig {
    /// The relay's own settings; its ports and TLS handshake timeout are linked from the
    /// settings below and from the HTTP section. `auth_secrets` empty means a random secret per
    /// process (chosen at start).
    pub relay: TurnSettings,
    /// `listening-port`: the UDP and TCP port.
    pub listening_port: u16,
    /// `turn-udp`: the UDP listener is on.
    pub udp: bool,
    /// `turn-tcp`: the TCP listener is on.
    pub tcp: bool,
    /// TURN over TLS on the HTTPS port too (`turn-on-https-port`).
    pub on_https_port: bool,
    /// Host name for ICE server URLs.
    pub host: Option<String>,
    /// Key for `/api/turn-credentials`.
    pub api_key: Option<Secret>,
}

impl Default for TurnConfig {
    /// The relay's defaults; the listening port and transports are read from them.
    fn default() -> Self {
        let relay = TurnSettings::default();
        TurnConfig {
            listening_port: relay
                .udp_port
                .or(relay.tcp_port)
                .expect("the relay listens on UDP and TCP by default"),
            udp: relay.udp_port.is_some(),
            tcp: relay.tcp_port.is_some(),
            relay,
            on_https_port: true,
            host: None,
            api_key: None,
        }
    }
}

impl TurnConfig {
    fn check(&self) -> Result<(), ConfigError> {
        let relay = &self.relay;
        if relay.realm.is_empty() {
            return Err(invalid("realm", "must not be empty"));
        }
        if relay.listening_ips.is_empty() {
            return Err(invalid("listening-ip", "needs at least one address"));
        }
        if relay.min_port == 0 || relay.max_port < relay.min_port {
            return Err(invalid(
                "min-port",
                "must be at least 1 and no greater than max-port",
            ));
        }
        if relay.auth_secrets.iter().any(|s| s.len() < 16) {
            return Err(invalid(
                "static-auth-secret",
                "each secret must be at least 16 characters",
            ));
        }
        if relay.credential_ttl.is_zero() {
            return Err(invalid("turn-credential-ttl", "must be greater than 0"));
        }
        if relay.user_quota == 0 {
            return Err(invalid("user-quota", "must be at least 1"));
        }
        if relay.total_quota == 0 {
            return Err(invalid("total-quota", "must be at least 1"));
        }
        if relay.allocations_per_ip == Some(0) {
            return Err(invalid("allocations-per-ip", "must be at least 1"));
        }
        if relay.unauthenticated_per_ip_per_sec == 0 {
            return Err(invalid("turn-unauthenticated-per-ip", "must be at least 1"));
        }
        if relay.max_bytes_per_sec == Some(0) {
            return Err(invalid(
                "max-bps",
                "must be at least 1 (leave it unset for no cap)",
            ));
        }
        if self.api_key.as_ref().is_some_and(|t| t.expose().len() < 16) {
            return Err(invalid("turn-api-key", "must be at least 16 characters"));
        }
        Ok(())
    }
}

/// Cluster mode: several nodes sharing one Redis (`redis-url`, `node-id`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterConfig {
    /// The Redis every node shares; printed with its password masked. `None`: a single node.
    pub redis_url: Option<RedisUrl>,
    /// This node's unique name (Redis keys, membership, logs); filled with [`default_node_id`]
    /// when `redis-url` is set and it is not.
    pub node_id: Option<String>,
    /// Where this node accepts direct links from the other nodes (`cluster-listen`); `None`: no
    /// links, every message between nodes through Redis.
    pub listen: Option<SocketAddr>,
    /// What the other nodes dial for this node's link (`cluster-advertise`); `None`: `listen`.
    pub advertise: Option<SocketAddr>,
}

impl ClusterConfig {
    /// The Redis URL and this node's name, in cluster mode.
    pub fn enabled(&self) -> Option<(&RedisUrl, &str)> {
        Some((self.redis_url.as_ref()?, self.node_id.as_deref()?))
    }

    /// The address other nodes dial for this node's link, when it has one (the listener's own
    /// when that is port 0 is filled in by the server).
    pub fn link_advertise(&self) -> Option<SocketAddr> {
        self.advertise.or(self.listen)
    }

    fn check(&self) -> Result<(), ConfigError> {
        if self.redis_url.is_none() && self.listen.is_some() {
            return Err(invalid(
                "cluster-listen",
                "only means something in a cluster: set redis-url too",
            ));
        }
        if self.listen.is_none() && self.advertise.is_some() {
            return Err(invalid(
                "cluster-advertise",
                "only means something with cluster-listen",
            ));
        }
        if self.advertise.is_none() && self.listen.is_some_and(|l| l.ip().is_unspecified()) {
            return Err(invalid(
                "cluster-advertise",
                "is required when cluster-listen is 0.0.0.0 or [::]: the other nodes need an \
                 address of this node they can reach",
            ));
        }
        if self
            .advertise
            .is_some_and(|a| a.ip().is_unspecified() || a.port() == 0)
        {
            return Err(invalid(
                "cluster-advertise",
                "must be an address and port the other nodes can dial",
            ));
        }
        match (&self.redis_url, &self.node_id) {
            (None, Some(_)) => Err(invalid(
                "node-id",
                "only means something in a cluster: set redis-url too",
            )),
            (_, Some(id)) => check_node_id(id).map_err(|reason| invalid("node-id", &reason)),
            _ => Ok(()),
        }
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

/// The admin listener serving Prometheus metrics.
#[derive(Debug, Clone)]
pub struct MetricsConfig {
    /// Where `/metrics` is served, if at all.
    pub listen: Listen,
    /// Token required to scrape `/metrics`.
    pub token: Option<Secret>,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: Listen::On(SocketAddr::from(([127, 0, 0, 1], 9100))),
            token: None,
        }
    }
}

impl MetricsConfig {
    fn check(&self) -> Result<(), ConfigError> {
        if self.token.as_ref().is_some_and(|t| t.expose().len() < 16) {
            return Err(invalid("metrics-token", "must be at least 16 characters"));
        }
        Ok(())
    }
}

/// How and what the process logs.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// Text for people or JSON for log pipelines.
    pub format: LogFormat,
    /// tracing `EnvFilter` directive.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            level: "info".to_owned(),
        }
    }
}

impl LogConfig {
    fn check(&self) -> Result<(), ConfigError> {
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.level) {
            return Err(invalid("log-level", &format!("\"{}\": {e}", self.level)));
        }
        Ok(())
    }
}

/// What happens between SIGTERM and exit.
#[derive(Debug, Clone)]
pub struct ShutdownConfig {
    /// Time between SIGTERM and closing the listeners, while `/readyz` reports 503.
    pub drain_delay: Duration,
    /// Deadline for in-flight work once the listeners are closed; also how long any connection
    /// may take to close gracefully ([`ConnectionSettings::close_timeout`] is linked to it).
    pub timeout: Duration,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig {
            drain_delay: Duration::ZERO,
            timeout: ConnectionSettings::default().close_timeout,
        }
    }
}

/// The async runtime.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Threads running connections.
    pub worker_threads: usize,
}

impl Default for RuntimeConfig {
    /// One worker per CPU core the process may use.
    fn default() -> Self {
        RuntimeConfig {
            worker_threads: std::thread::available_parallelism()
                .map_or(1, std::num::NonZeroUsize::get),
        }
    }
}

impl RuntimeConfig {
    fn check(&self) -> Result<(), ConfigError> {
        if !(1..=1024).contains(&self.worker_threads) {
            return Err(invalid("worker-threads", "must be between 1 and 1024"));
        }
        Ok(())
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
        key: String,
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

    /// Applies merged options over the defaults, links shared values and validates.
    pub fn from_options(options: Options) -> Result<Config, ConfigError> {
        // Only an explicit request conflicts: with the relay off, the default is moot.
        if options.turn_on_https_port == Some(true) && options.turn == Some(false) {
            return Err(invalid(
                "turn-on-https-port",
                "needs the TURN relay on (turn = true)",
            ));
        }
        let mut config = Config::unlinked();
        options.apply(&mut config)?;
        config.link();
        config.check()?;
        Ok(config)
    }

    /// Copies the values several sections share from the section that owns them, and
    /// normalises lists, so every subsystem sees the same value.
    fn link(&mut self) {
        self.http.connection.close_timeout = self.shutdown.timeout;
        let signaling = &mut self.signaling;
        signaling.limits.heartbeat_interval = signaling.session.heartbeat_interval;
        let origins = &mut signaling.origins;
        origins.public_authority = self
            .http
            .public_url
            .as_ref()
            .map(|url| url.authority.clone());
        origins.allowed_origins = origins
            .allowed_origins
            .iter()
            .map(|origin| origin.trim().trim_end_matches('/').to_ascii_lowercase())
            .filter(|origin| !origin.is_empty())
            .collect();
        let turn = &mut self.turn;
        turn.relay.udp_port = turn.udp.then_some(turn.listening_port);
        turn.relay.tcp_port = turn.tcp.then_some(turn.listening_port);
        turn.relay.tls_handshake_timeout = self.http.connection.tls_handshake_timeout;
        turn.relay.allocations_per_ip = Some(turn.relay.allocations_per_ip());
        self.acme.state_dir = self.tls.certs_dir.join("acme");
        self.acme.normalise();
        if self.cluster.redis_url.is_some() && self.cluster.node_id.is_none() {
            self.cluster.node_id = Some(default_node_id());
        }
    }

    /// Validates every section, then what spans sections.
    pub fn check(&self) -> Result<(), ConfigError> {
        self.http.check()?;
        self.tls.check()?;
        self.acme.check()?;
        self.signaling.check()?;
        self.turn.check()?;
        self.metrics.check()?;
        self.log.check()?;
        self.runtime.check()?;
        self.cluster.check()?;
        if self.cluster.redis_url.is_some() && self.turn.relay.enabled {
            if self.turn.relay.auth_secrets.is_empty() {
                return Err(invalid(
                    "static-auth-secret",
                    "is required with redis-url: every node must sign TURN credentials with the \
                     same secret so that credentials from one node work on the relay of another",
                ));
            }
            if self.turn.host.is_none() && self.turn.relay.external_ip.is_none() {
                return Err(invalid(
                    "turn-host",
                    "(or external-ip) is required with redis-url: each node must advertise its own \
                     TURN address, since media must reach the relay that holds the allocation",
                ));
            }
        }
        if self.cluster.listen.is_some() && self.turn.relay.auth_secrets.is_empty() {
            return Err(invalid(
                "static-auth-secret",
                "is required with cluster-listen: the nodes authenticate their links and derive \
                 the links' keys from it",
            ));
        }
        if self.acme.enabled() && self.tls.cert.is_some() {
            return Err(invalid(
                "acme-domain",
                "cannot be combined with tls-cert/tls-key: ACME obtains the certificate itself \
                 (remove one or the other)",
            ));
        }
        if self.acme.enabled()
            && self.acme.challenge == AcmeChallenge::Http01
            && self.http.http_listen == Listen::Off
        {
            return Err(invalid(
                "acme-challenge",
                "http-01 is answered on the plain-HTTP listener, so http-listen must not be off",
            ));
        }
        Ok(())
    }

    /// Automatic certificates, if `acme-domain` is set.
    pub fn acme(&self) -> Option<&AcmeConfig> {
        self.acme.enabled().then_some(&self.acme)
    }

    /// The effective configuration in the file format, for `check-config`: every setting, one
    /// key each, in the order of `--help`.
    ///
    /// Secrets print as `***`.
    pub fn to_toml(&self) -> String {
        match toml::to_string(&Options::of(self)) {
            Ok(text) if text.ends_with('\n') => text,
            Ok(text) => text + "\n",
            Err(e) => format!("# cannot print configuration: {e}\n"),
        }
    }
}

/// Settings for automatic certificates over ACME (`acme-*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcmeConfig {
    /// The names on the certificate, lowercase, first one first; empty: ACME is off.
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
    pub retry_delay: Duration,
    /// Where the account and certificate are kept: `certs-dir/acme` (linked).
    pub state_dir: PathBuf,
    /// Where HTTP-01 tokens of an outside ACME client are read from (`acme-challenge-dir`),
    /// served whether or not callgate runs ACME itself.
    pub challenge_dir: Option<PathBuf>,
}

impl Default for AcmeConfig {
    fn default() -> Self {
        AcmeConfig {
            domains: Vec::new(),
            email: None,
            directory: LETS_ENCRYPT_PRODUCTION.to_owned(),
            directory_ca: None,
            challenge: AcmeChallenge::Auto,
            retry_delay: Duration::from_secs(60),
            state_dir: PathBuf::from("certs/acme"),
            challenge_dir: None,
        }
    }
}

impl AcmeConfig {
    /// Whether callgate obtains its certificate over ACME (`acme-domain` is set).
    pub fn enabled(&self) -> bool {
        !self.domains.is_empty()
    }

    /// Lowercases the names and drops trailing dots and empty entries; an empty e-mail is none.
    fn normalise(&mut self) {
        self.domains = self
            .domains
            .iter()
            .map(|d| d.trim().trim_end_matches('.').to_ascii_lowercase())
            .filter(|d| !d.is_empty())
            .collect();
        self.email = self
            .email
            .as_deref()
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .map(str::to_owned);
    }

    /// Checks the `acme-*` settings; without `acme-domain` there is nothing to check.
    fn check(&self) -> Result<(), ConfigError> {
        if !self.enabled() {
            return Ok(());
        }
        if self.domains.len() > 100 {
            return Err(invalid(
                "acme-domain",
                "at most 100 names fit on one certificate",
            ));
        }
        for domain in &self.domains {
            if let Err(reason) = check_domain(domain) {
                return Err(invalid("acme-domain", &format!("\"{domain}\" {reason}")));
            }
        }
        if let Some(email) = &self.email {
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
        let directory = &self.directory;
        if !directory.starts_with("https://") || directory.parse::<hyper::Uri>().is_err() {
            return Err(invalid(
                "acme-directory",
                &format!(
                    "\"{directory}\" must be an https:// URL such as {LETS_ENCRYPT_PRODUCTION}"
                ),
            ));
        }
        if self.retry_delay.is_zero() {
            return Err(invalid("acme-retry-delay", "must be greater than 0"));
        }
        Ok(())
    }
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

fn invalid(key: &str, reason: &str) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_owned(),
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
        assert_eq!(config.http.https_listen, "[::]:8443".parse().unwrap());
        assert_eq!(
            config.http.http_listen,
            Listen::On("[::]:8080".parse().unwrap())
        );
        assert_eq!(
            config.tls.source(),
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
        assert_eq!(config.http.https_listen, "127.0.0.1:9443".parse().unwrap());
        assert_eq!(config.http.http_listen, Listen::Off);
        assert_eq!(
            config.http.connection.idle_timeout,
            Duration::from_secs(120)
        );
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
        assert_eq!(config.runtime.worker_threads, cores);
        let one = Config::from_options(parse(&["--worker-threads", "1"])).unwrap();
        assert_eq!(one.runtime.worker_threads, 1);
        let zero = Config::from_options(parse(&["--worker-threads", "0"])).unwrap_err();
        assert_eq!(
            zero.to_string(),
            "worker-threads: must be between 1 and 1024"
        );
    }

    #[test]
    fn edge_limits_have_safe_defaults_and_are_validated() {
        let config = Config::from_options(Options::default()).unwrap();
        assert_eq!(config.http.connections_per_ip, 128);
        assert_eq!(
            config.http.connection.response_stall_timeout,
            Duration::from_secs(30)
        );
        assert_eq!(config.http.public_dir_max_bytes, 64 * 1024 * 1024);
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
        assert_eq!(
            config.http.connection.tls_handshake_timeout,
            Duration::from_secs(3)
        );
        assert_eq!(
            config.http.connection.header_read_timeout,
            Duration::from_millis(1500)
        );
        assert_eq!(config.shutdown.timeout, Duration::from_secs(3600));
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
        assert_eq!(Config::from_options(parse(&[])).unwrap().acme(), None);
        let acme = Config::from_options(parse(&[
            "--acme-domain",
            "Call.Example.com.,www.example.com",
            "--certs-dir",
            "/var/lib/callgate/certs",
        ]))
        .unwrap()
        .acme;
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
        let acme = Config::from_options(file).unwrap().acme;
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
        assert_eq!(default.turn.relay.allocations_per_ip(), 100);
        let bigger = Config::from_options(parse(&["--total-quota", "50000"])).unwrap();
        assert_eq!(bigger.turn.relay.allocations_per_ip(), 500);
        let tiny = Config::from_options(parse(&["--total-quota", "20"])).unwrap();
        assert_eq!(tiny.turn.relay.allocations_per_ip(), 1);
        let file: Options = toml::from_str("allocations-per-ip = 7").unwrap();
        assert_eq!(
            Config::from_options(file)
                .unwrap()
                .turn
                .relay
                .allocations_per_ip(),
            7
        );
        let flag = Config::from_options(parse(&["--allocations-per-ip", "3"])).unwrap();
        assert_eq!(flag.turn.relay.allocations_per_ip(), 3);
        let zero = Config::from_options(parse(&["--allocations-per-ip", "0"])).unwrap_err();
        assert_eq!(zero.to_string(), "allocations-per-ip: must be at least 1");
    }

    #[test]
    fn every_default_in_help_is_the_default() {
        use clap::CommandFactory;
        let defaults = Config::default().to_toml();
        let mut checked = Vec::new();
        let command = Cli::command();
        for arg in command.get_arguments() {
            let Some(long) = arg.get_long() else {
                continue;
            };
            let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
            assert!(help.matches("[default:").count() <= 1, "--{long}: {help}");
            let Some(text) = help
                .split_once("[default: ")
                .and_then(|(_, rest)| rest.strip_suffix(']'))
            else {
                continue;
            };
            let line = defaults
                .lines()
                .find(|l| l.starts_with(&format!("{long} = ")));
            if line.is_none_or(|l| l.ends_with("= []")) {
                // Unset by default: the help says what that means in words.
                checked.push(long);
                continue;
            }
            assert_ne!(
                text, "none",
                "--{long}: help says none, the default is {line:?}"
            );
            // Descriptive defaults ("one per CPU core ...") are not values; the rest must be
            // exactly what an unset setting gives.
            let Ok(cli) = Cli::try_parse_from(["callgate", &format!("--{long}={text}")]) else {
                continue;
            };
            let Ok(config) = Config::from_options(cli.options) else {
                continue;
            };
            assert_eq!(config.to_toml(), defaults, "--{long}: help says {text}");
            checked.push(long);
        }
        assert!(checked.len() >= 55, "only {checked:?}");
    }

    #[test]
    fn the_printed_config_reads_back_as_the_same_config() {
        let config = Config::from_options(parse(&[
            "--public-url=https://Call.Example.com",
            "--external-ip=203.0.113.7/10.0.0.5",
            "--relay-ip=192.0.2.1",
            "--tls-listening-port=off",
            "--max-bps=250000",
            "--allowed-peer-ip=10.0.0.0/8,192.0.2.7",
            "--acme-domain=call.example.com",
            "--acme-email=ops@example.com",
            "--ws-heartbeat-interval=1500ms",
            "--ws-messages-per-second=5",
            "--turn-udp=false",
            "--metrics-listen=off",
            "--log-format=json",
            "--allowed-origins=https://App.example.com/",
        ]))
        .unwrap();
        let printed = config.to_toml();
        for line in [
            "public-url = \"https://call.example.com\"",
            "external-ip = \"203.0.113.7/10.0.0.5\"",
            "tls-listening-port = \"off\"",
            "allowed-peer-ip = [\"10.0.0.0/8\", \"192.0.2.7/32\"]",
            "ws-heartbeat-interval = \"1500ms\"",
            "turn-udp = false",
            "allowed-origins = [\"https://app.example.com\"]",
        ] {
            assert!(printed.contains(line), "{line} not in\n{printed}");
        }
        let reread: Options =
            toml::from_str(&printed).expect("check-config prints the file format");
        assert_eq!(Config::from_options(reread).unwrap().to_toml(), printed);

        // An optional part of a value prints as written (TOML has no null).
        let public_only = Config::from_options(parse(&["--external-ip=203.0.113.7"])).unwrap();
        assert!(public_only
            .to_toml()
            .contains("external-ip = \"203.0.113.7\"\n"));
    }

    #[test]
    fn values_that_several_subsystems_use_are_set_once() {
        let config = Config::from_options(parse(&[
            "--ws-heartbeat-interval=5s",
            "--shutdown-timeout=3s",
            "--tls-handshake-timeout=4s",
            "--public-url=https://call.example.com:8443",
            "--listening-port=4000",
            "--turn-tcp=false",
            "--certs-dir=/srv/certs",
        ]))
        .unwrap();
        let secs = Duration::from_secs;
        assert_eq!(config.signaling.session.heartbeat_interval, secs(5));
        assert_eq!(config.signaling.limits.heartbeat_interval, secs(5));
        assert_eq!(config.shutdown.timeout, secs(3));
        assert_eq!(config.http.connection.close_timeout, secs(3));
        assert_eq!(config.http.connection.tls_handshake_timeout, secs(4));
        assert_eq!(config.turn.relay.tls_handshake_timeout, secs(4));
        assert_eq!(
            config.signaling.origins.public_authority.as_deref(),
            Some("call.example.com:8443")
        );
        assert_eq!(config.turn.relay.udp_port, Some(4000));
        assert_eq!(config.turn.relay.tcp_port, None);
        assert_eq!(config.acme.state_dir, Path::new("/srv/certs/acme"));

        // The defaults agree with the subsystems' own.
        let defaults = Config::default();
        assert_eq!(
            defaults.signaling.limits.heartbeat_interval,
            crate::signaling::HEARTBEAT_INTERVAL
        );
        assert_eq!(
            defaults.http.connection.close_timeout,
            defaults.shutdown.timeout
        );
        assert_eq!(
            defaults.turn.relay.udp_port,
            TurnSettings::default().udp_port
        );
        assert_eq!(
            defaults.turn.relay.tls_port,
            TurnSettings::default().tls_port
        );
    }

    #[test]
    fn cluster_mode_needs_a_shared_secret_and_an_own_turn_address() {
        assert_eq!(
            Config::from_options(parse(&[])).unwrap().cluster.enabled(),
            None
        );
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
        let (redis_url, node_id) = config.cluster.enabled().unwrap();
        assert_eq!(node_id, "node-1");
        assert_eq!(redis_url.expose(), url[1]);
        // check-config masks the password; the host stays visible.
        let printed = config.to_toml();
        assert!(!printed.contains("hunter2"), "{printed}");
        assert!(printed.contains("redis://***@10.0.0.5:6379/0"), "{printed}");
    }

    #[test]
    fn cluster_links_need_a_cluster_a_secret_and_a_dialable_address() {
        let base = ["--turn", "false"];
        let with = |extra: &[&str]| {
            let mut args = base.to_vec();
            args.extend_from_slice(extra);
            Config::from_options(parse(&args)).map_err(|e| e.to_string())
        };
        let url = ["--redis-url", "redis://10.0.0.5:6379"];
        let secret = ["--static-auth-secret", "0123456789abcdef0123"];
        let listen = |addr| ["--cluster-listen", addr];
        fn join<'a>(parts: &[&[&'a str]]) -> Vec<&'a str> {
            parts.concat()
        }
        assert!(with(&listen("10.0.0.1:7400"))
            .unwrap_err()
            .starts_with("cluster-listen: only means something in a cluster"));
        assert!(with(&join(&[&url, &listen("10.0.0.1:7400")]))
            .unwrap_err()
            .starts_with("static-auth-secret: is required with cluster-listen"));
        let config = with(&join(&[&url, &secret, &listen("10.0.0.1:7400")])).unwrap();
        assert_eq!(
            config.cluster.link_advertise(),
            Some("10.0.0.1:7400".parse().unwrap())
        );
        assert!(with(&join(&[&url, &secret, &listen("0.0.0.0:7400")]))
            .unwrap_err()
            .starts_with("cluster-advertise: is required when cluster-listen is 0.0.0.0"));
        let advertised = join(&[
            &url,
            &secret,
            &listen("[::]:7400"),
            &["--cluster-advertise", "10.0.0.1:7400"],
        ]);
        assert_eq!(
            with(&advertised).unwrap().cluster.link_advertise(),
            Some("10.0.0.1:7400".parse().unwrap())
        );
        assert!(
            with(&join(&[&url, &["--cluster-advertise", "10.0.0.1:7400"]]))
                .unwrap_err()
                .starts_with("cluster-advertise: only means something with cluster-listen")
        );
        // Without it: no links, as before.
        assert_eq!(with(&url).unwrap().cluster.listen, None);
        // The TOML keys and the environment variables.
        let toml: Options = toml::from_str(
            "redis-url = \"redis://10.0.0.5:6379\"\ncluster-listen = \"10.0.0.1:7400\"",
        )
        .unwrap();
        assert!(toml.cluster_listen.is_some());
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
        let a = Config::from_options(parse(&base)).unwrap().cluster;
        let b = Config::from_options(parse(&base)).unwrap().cluster;
        let (a_url, a_id) = a.enabled().unwrap();
        let (_, b_id) = b.enabled().unwrap();
        assert!(check_node_id(a_id).is_ok(), "{a_id}");
        assert_ne!(a_id, b_id, "two processes on one host differ");
        assert!(a_url.is_tls());
        // Config::default() stays deterministic: no node-id without redis-url.
        assert_eq!(Config::default().cluster, ClusterConfig::default());
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
