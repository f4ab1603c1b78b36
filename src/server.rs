//! Binds every listener, starts the subsystems, and owns the one shutdown path.
//!
//! [`Server::bind`] does everything that can fail at startup (certificate, listeners, public
//! directory) so that errors surface before anything is served. [`Server::run`] serves until the
//! given signal, then: `/readyz` turns 503, the drain delay passes, the listeners close, every
//! connection and session is told to finish, and the server waits for them up to the shutdown
//! timeout.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::acme::{self, Acme, AcmeMetrics};
use crate::config::{Config, PortOrOff, TlsSource};
use crate::http::headers::SecurityHeaders;
use crate::http::proxy_protocol::TrustedProxies;
use crate::http::routes::Readiness;
use crate::http::static_files::StaticFiles;
use crate::http::websocket::{IceProvider, OriginPolicy, WebSocketEndpoint};
use crate::http::{self, Admission, App, ConnectionSettings, RedirectTarget};
use crate::limits::{AddressLimit, ConnectionLimit, PerIpLimits};
use crate::metrics::{Limit, Metrics};
use crate::shutdown::{Shutdown, ShutdownController};
use crate::signaling::router::Router;
use crate::signaling::session::{SessionSettings, Sessions};
use crate::signaling::SignalingLimits;
use crate::tls::{self, CertStore, LoadError};
use crate::turn::{ExternalIp, Relay, RunningRelay, TlsAcceptorSource, TurnSettings};

/// Why the server could not start. Each names the setting or file to fix.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener could not bind its address.
    #[error("{key} {addr}: cannot listen: {source}")]
    Bind {
        /// The setting naming the address.
        key: &'static str,
        /// The address.
        addr: SocketAddr,
        /// What the OS said (address in use, permission denied, ...).
        source: std::io::Error,
    },
    /// The certificate or key is unusable.
    #[error(transparent)]
    Certificate(#[from] LoadError),
    /// The development certificate could not be written.
    #[error("cannot create a development certificate in {dir}: {source}")]
    DevCert {
        /// The directory.
        dir: PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
    /// The web app directory is missing or unreadable.
    #[error(transparent)]
    PublicDir(#[from] crate::http::static_files::PublicDirError),
    /// The TURN relay could not start (bad settings, a port in use).
    #[error("TURN relay: {0}")]
    Turn(#[from] crate::turn::TurnError),
    /// ACME could not be set up (state directory, acme-directory-ca).
    #[error(transparent)]
    Acme(#[from] crate::acme::AcmeSetupError),
    /// Signal handlers could not be installed.
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
}

/// The addresses the server actually bound (useful with port 0).
#[derive(Debug, Clone)]
pub struct BoundAddrs {
    /// HTTPS listener.
    pub https: SocketAddr,
    /// Redirect listener, if enabled.
    pub http: Option<SocketAddr>,
    /// Metrics listener, if enabled.
    pub metrics: Option<SocketAddr>,
    /// TURN listeners: UDP, TCP, TLS (empty when off).
    pub turn_udp: Vec<SocketAddr>,
    /// TURN over TCP.
    pub turn_tcp: Vec<SocketAddr>,
    /// TURN over TLS.
    pub turn_tls: Vec<SocketAddr>,
}

/// A server whose listeners are bound and certificate loaded, ready to [`run`](Server::run).
pub struct Server {
    config: Config,
    https: TcpListener,
    http: Option<TcpListener>,
    certs: Arc<CertStore>,
    /// The version of the certificate files that `certs` was loaded from.
    loaded_version: tls::Fingerprint,
    app: Arc<App>,
    readiness: Arc<Readiness>,
    signaling: Arc<WebSocketEndpoint>,
    per_ip: Arc<PerIpLimits>,
    controller: ShutdownController,
    metrics: Arc<Metrics>,
    admin: Option<TcpListener>,
    relay: RunningRelay,
    /// Automatic certificates, when `acme-domain` is set: started by `run`.
    acme: Option<Acme>,
}

impl Server {
    /// Loads (or generates) the certificate, opens the web app directory and binds every listener.
    pub async fn bind(config: Config) -> Result<Server, StartError> {
        if let TlsSource::DevDir { dir } = &config.tls {
            let generated = tls::ensure_dev_cert(dir).map_err(|source| StartError::DevCert {
                dir: dir.clone(),
                source,
            })?;
            if let (Some(dev), Some(acme)) = (&generated, &config.acme) {
                tracing::info!(
                    cert = %dev.cert.display(),
                    "generated a self-signed development certificate, served until ACME obtains \
                     one for {}",
                    acme.domains.join(", ")
                );
            } else if let Some(dev) = generated {
                tracing::warn!(
                    cert = %dev.cert.display(),
                    reason = %dev.reason,
                    "generated a self-signed development certificate for localhost, 127.0.0.1 and ::1, \
                     valid 27 months; browsers will warn until you trust it. For a real deployment pass \
                     --tls-cert and --tls-key (see README, \"Certificates\")"
                );
            }
        }
        let (cert_path, key_path) = config.tls.paths();
        let loaded_version = tls::Fingerprint::of(&cert_path, &key_path);
        let acme = config
            .acme
            .clone()
            .map(|acme| Acme::open(acme, acme_listeners(&config)))
            .transpose()?;
        let certs = CertStore::new(match acme.as_ref().and_then(Acme::stored_key) {
            Some(stored) => stored,
            None => tls::load_certified_key(&cert_path, &key_path)?,
        });

        let files = StaticFiles::load(&config.public_dir, config.public_dir_max_bytes)?;
        let (file_count, file_bytes) = files.size();
        tracing::debug!(
            files = file_count,
            bytes = file_bytes,
            "web app loaded into memory"
        );
        let readiness = Arc::new(Readiness::default());
        let controller = ShutdownController::new();
        let metrics = Arc::new(Metrics::new());
        let relay = start_relay(&config, &certs, controller.handle()).await?;
        metrics.export_turn(relay.stats().clone());
        let https = bind("https-listen", config.https_listen).await?;
        let mut endpoints = relay.endpoints("");
        if config.turn.on_https_port {
            let port = https
                .local_addr()
                .map_or(config.https_listen.port(), |a| a.port());
            endpoints.https_port = Some(port);
        }
        let ice = config.turn.enabled.then(|| {
            IceProvider::new(
                relay.credentials().clone(),
                endpoints,
                config
                    .turn
                    .host
                    .clone()
                    .or_else(|| config.public_url.as_ref().map(|url| url.host().to_owned())),
                config.turn.credential_ttl,
            )
        });
        let per_ip = PerIpLimits::new(config.ws_upgrades_per_second, config.ws_connections_per_ip);
        let hub = Router::single_node(signaling_limits(&config)).with_observer(metrics.clone());
        let sessions = Sessions::new(
            Arc::new(hub),
            session_settings(&config),
            per_ip.clone(),
            metrics.clone(),
        );
        let signaling = WebSocketEndpoint::new(
            sessions,
            origin_policy(&config),
            per_ip.clone(),
            metrics.clone(),
            ice,
        );
        let app = Arc::new(App::new(
            files,
            SecurityHeaders::new(config.hsts_max_age),
            readiness.clone(),
            signaling.clone(),
            controller.handle(),
            metrics.clone(),
            config.turn.api_key.clone(),
        ));

        let admin = match config.metrics_listen.addr() {
            Some(addr) => Some(bind("metrics-listen", addr).await?),
            None => None,
        };
        let http = match config.http_listen.addr() {
            Some(addr) => Some(bind("http-listen", addr).await?),
            None => None,
        };
        Ok(Server {
            config,
            https,
            http,
            certs,
            loaded_version,
            app,
            readiness,
            signaling,
            per_ip,
            controller,
            metrics,
            admin,
            relay,
            acme,
        })
    }

    /// The bound addresses.
    pub fn local_addrs(&self) -> BoundAddrs {
        BoundAddrs {
            https: self
                .https
                .local_addr()
                .expect("bound socket has an address"),
            http: self.http.as_ref().and_then(|l| l.local_addr().ok()),
            metrics: self.admin.as_ref().and_then(|l| l.local_addr().ok()),
            turn_udp: self.relay.udp_addrs().to_vec(),
            turn_tcp: self.relay.tcp_addrs().to_vec(),
            turn_tls: self.relay.tls_addrs().to_vec(),
        }
    }

    /// The certificate store, for callers that want to watch reloads.
    pub fn cert_store(&self) -> Arc<CertStore> {
        self.certs.clone()
    }

    /// Serves until `stop` completes, then shuts down as described in the module docs.
    ///
    /// `handle_sighup` installs the SIGHUP certificate reload (the binary wants it; in-process
    /// tests, which share one process, do not).
    pub async fn run(
        self,
        stop: impl Future<Output = ()>,
        handle_sighup: bool,
    ) -> Result<(), StartError> {
        let addrs = self.local_addrs();
        let Server {
            config,
            https,
            http,
            certs,
            loaded_version,
            app,
            readiness,
            signaling,
            per_ip,
            controller,
            metrics,
            admin,
            relay,
            acme,
        } = self;
        tokio::spawn(expire_reservations(signaling, controller.handle()));
        tokio::spawn(prune_rate_limits(per_ip, controller.handle()));
        let per_ip = AddressLimit::new(
            config.connections_per_ip,
            metrics.limits.rejected_counter(Limit::AddressConnections),
        );
        let admission = Admission {
            limit: ConnectionLimit::new(
                config.max_connections,
                metrics.limits.rejected_counter(Limit::MaxConnections),
            ),
            per_ip: per_ip.clone(),
            trusted_proxies: Arc::new(TrustedProxies::new(config.proxy_protocol_from.clone())),
            proxy_header_timeout: config.tls_handshake_timeout,
        };
        // The metrics listener has its own global cap (a flood on the public port must not keep
        // the scraper out) and trusts no PROXY header; the per-address cap is shared.
        let metrics_admission = Admission {
            limit: ConnectionLimit::new(
                config.max_connections,
                metrics.limits.rejected_counter(Limit::MaxConnections),
            ),
            per_ip,
            trusted_proxies: Arc::new(TrustedProxies::default()),
            proxy_header_timeout: config.tls_handshake_timeout,
        };
        let settings = ConnectionSettings {
            tls_handshake_timeout: config.tls_handshake_timeout,
            header_read_timeout: config.header_read_timeout,
            idle_timeout: config.idle_timeout,
            response_stall_timeout: config.response_stall_timeout,
            close_timeout: config.shutdown_timeout,
            h2_max_concurrent_streams: config.h2_max_concurrent_streams,
        };

        let (mut cert_path, mut key_path) = config.tls.paths();
        let (mut loaded_version, mut reload_interval) =
            (loaded_version, config.tls_reload_interval);
        if let Some(acme) = &acme {
            // The ACME task swaps its certificates in itself; the file watch only serves SIGHUP
            // (re-reading the ACME files), so it never puts the dev certificate back.
            (cert_path, key_path) = acme.files();
            loaded_version = tls::Fingerprint::of(&cert_path, &key_path);
            reload_interval = std::time::Duration::from_secs(365 * 86_400);
        }
        let acme_answers = acme.as_ref().map(Acme::answers);
        let acme_metrics = AcmeMetrics::register(&metrics);
        if let Some(acme) = acme {
            acme.spawn(certs.clone(), acme_metrics, controller.handle());
        }
        tls::spawn_reloader(
            certs.clone(),
            cert_path,
            key_path,
            loaded_version,
            reload_interval,
            handle_sighup,
            controller.handle(),
        )
        .map_err(StartError::Signals)?;

        tokio::spawn(watch_certificate(
            certs.clone(),
            metrics.clone(),
            controller.handle(),
        ));
        let mut https_config = tls::server_config(certs.clone(), &[b"h2", b"http/1.1"]);
        if let Some(answers) = &acme_answers {
            https_config = acme::answer_tls_alpn01(https_config, answers.clone());
        }
        let turn_on_https = relay
            .stream_handoff()
            .filter(|_| config.turn.on_https_port)
            .map(|handoff| http::TurnOnHttps {
                config: tls::server_config(certs.clone(), &[http::tls_route::STUN_TURN_ALPN]),
                handoff,
            });
        let mut listeners = vec![http::listener_url("https", addrs.https)];
        tokio::spawn(http::serve_https(
            https,
            https_config,
            turn_on_https,
            app,
            settings.clone(),
            admission.clone(),
            metrics.clone(),
            controller.handle(),
        ));
        if let Some(admin) = admin {
            listeners.push(format!(
                "{}/metrics",
                http::listener_url("http", addrs.metrics.expect("bound"))
            ));
            tokio::spawn(http::admin::serve_metrics(
                admin,
                metrics.clone(),
                config.metrics_token.clone(),
                settings.clone(),
                metrics_admission,
                controller.handle(),
            ));
        }
        if let Some(http_listener) = http {
            listeners.push(format!(
                "{} (redirect to HTTPS)",
                http::listener_url("http", addrs.http.expect("bound"))
            ));
            let target = RedirectTarget {
                public_url: config.public_url.clone(),
                https_port: addrs.https.port(),
                acme_dir: config.acme_challenge_dir.clone(),
                acme_answers: acme_answers.clone(),
            };
            tokio::spawn(http::serve_redirects(
                http_listener,
                target,
                settings,
                admission,
                metrics.clone(),
                controller.handle(),
            ));
        }
        for (scheme, addrs) in [
            ("turn+udp", &addrs.turn_udp),
            ("turn+tcp", &addrs.turn_tcp),
            ("turns", &addrs.turn_tls),
        ] {
            listeners.extend(addrs.iter().map(|a| format!("{scheme}://{a}")));
        }
        // On a wildcard address, say which URL to open on this machine.
        let local = if addrs.https.ip().is_unspecified() {
            format!("https://localhost:{}/", addrs.https.port())
        } else {
            format!("https://{}/", addrs.https)
        };
        tracing::info!(listeners = %listeners.join(", "), open = %local, "callgate ready");

        stop.await;
        readiness.start_draining();
        tracing::info!(
            drain_delay = ?config.shutdown_drain_delay,
            "shutting down: /readyz now reports 503"
        );
        tokio::time::sleep(config.shutdown_drain_delay).await;
        controller.trigger();
        // The relay holds a shutdown handle like every listener: the drain below waits for it.
        drop(relay);
        tracing::info!(timeout = ?config.shutdown_timeout, "listeners closing, draining connections");
        match tokio::time::timeout(config.shutdown_timeout, controller.drained()).await {
            Ok(()) => tracing::info!("shutdown complete"),
            Err(_) => tracing::warn!(
                "shutdown timeout reached with connections still open; exiting anyway"
            ),
        }
        Ok(())
    }
}

/// Starts the embedded TURN relay (or a disabled one that binds nothing).
async fn start_relay(
    config: &Config,
    certs: &Arc<CertStore>,
    shutdown: Shutdown,
) -> Result<RunningRelay, StartError> {
    let turn = &config.turn;
    let mut secrets: Vec<String> = turn
        .static_auth_secret
        .iter()
        .map(|s| s.expose().to_owned())
        .collect();
    if secrets.is_empty() {
        use base64::Engine as _;
        let random: [u8; 32] = rand::random();
        secrets.push(base64::engine::general_purpose::STANDARD_NO_PAD.encode(random));
        if turn.enabled {
            tracing::info!(
                "TURN: no static-auth-secret configured; credentials are signed with a random secret \
                 for this process (set one to share credentials across instances or restarts)"
            );
        }
    }
    let mut relay_ip = turn.relay_ip;
    if turn.enabled
        && relay_ip.is_none()
        && turn.external_ip.is_none()
        && turn.listening_ip.iter().all(|ip| ip.is_unspecified())
    {
        relay_ip = first_interface_address();
        match relay_ip {
            Some(ip) => {
                tracing::info!(relay_ip = %ip, "TURN: relaying from this host's first non-loopback address (set relay-ip or external-ip to choose)")
            }
            None => {
                tracing::warn!(
                    "TURN: found no non-loopback IPv4 address to relay from, so relayed candidates \
                     will be 127.0.0.1 and only work on this host; set relay-ip (or external-ip)"
                );
                relay_ip = Some(std::net::IpAddr::from([127, 0, 0, 1]));
            }
        }
    }
    let settings = TurnSettings {
        enabled: turn.enabled,
        realm: turn.realm.clone(),
        listening_ips: turn.listening_ip.clone(),
        udp_port: turn.udp.then_some(turn.listening_port),
        tcp_port: turn.tcp.then_some(turn.listening_port),
        tls_port: match turn.tls_listening_port {
            PortOrOff::Port(port) => Some(port),
            PortOrOff::Off => None,
        },
        relay_ip,
        external_ip: turn
            .external_ip
            .map(|(public, private)| ExternalIp { public, private }),
        min_port: turn.min_port,
        max_port: turn.max_port,
        auth_secrets: secrets,
        credential_ttl: turn.credential_ttl,
        user_quota: turn.user_quota,
        total_quota: turn.total_quota,
        allocations_per_ip: Some(turn.allocations_per_ip),
        max_bytes_per_sec: turn.max_bps,
        unauthenticated_per_ip_per_sec: turn.unauthenticated_per_ip,
        allowed_peer_ips: turn.allowed_peer_ip.iter().map(|r| r.0).collect(),
        denied_peer_ips: turn.denied_peer_ip.iter().map(|r| r.0).collect(),
        allow_private_peers: turn.allow_private_peers,
        tls_handshake_timeout: config.tls_handshake_timeout,
        ..TurnSettings::default()
    };
    let acceptor = TlsAcceptor::from(tls::server_config(certs.clone(), &[]));
    let tls: TlsAcceptorSource = Arc::new(move || acceptor.clone());
    Ok(Relay::start(settings, Some(tls), shutdown).await?)
}

/// Which ports the CA's validations can reach.
fn acme_listeners(config: &Config) -> acme::Listeners {
    acme::Listeners {
        https_port: config.https_listen.port(),
        http_port: config.http_listen.addr().map(|a| a.port()),
    }
}

/// This host's first non-loopback, non-link-local IPv4 address, for relay sockets.
fn first_interface_address() -> Option<std::net::IpAddr> {
    let interfaces = if_addrs::get_if_addrs().ok()?;
    interfaces.iter().map(|i| i.ip()).find(|ip| match ip {
        std::net::IpAddr::V4(v4) => {
            !v4.is_loopback() && !v4.is_link_local() && !v4.is_unspecified()
        }
        std::net::IpAddr::V6(_) => false,
    })
}

/// Keeps the certificate metrics current: expiry of the served certificate, reload outcomes.
async fn watch_certificate(certs: Arc<CertStore>, metrics: Arc<Metrics>, mut shutdown: Shutdown) {
    let mut status = certs.subscribe();
    let mut seen = status.borrow().clone();
    loop {
        if let Some(expiry) = tls::not_after(&certs.current()) {
            metrics.tls.certificate_expiry.set(expiry as f64);
        }
        tokio::select! {
            _ = shutdown.recv() => return,
            changed = status.changed() => if changed.is_err() { return },
        }
        let now = status.borrow_and_update().clone();
        metrics.tls.reloads_ok.inc_by(now.reloads - seen.reloads);
        metrics
            .tls
            .reloads_failed
            .inc_by(now.failures - seen.failures);
        seen = now;
    }
}

/// Ends resume reservations when their grace period is over (and tells their call peers).
async fn expire_reservations(signaling: Arc<WebSocketEndpoint>, mut shutdown: Shutdown) {
    let sessions = signaling.sessions().clone();
    let grace = sessions.resume_grace();
    loop {
        let now = std::time::Instant::now();
        let next = sessions.expire(now).await.unwrap_or(now + grace);
        let wake = tokio::time::Instant::from_std(next);
        tokio::select! {
            _ = shutdown.recv() => return,
            _ = tokio::time::sleep_until(wake) => {}
        }
    }
}

/// Forgets per-address rate-limit state of quiet addresses, once a minute.
async fn prune_rate_limits(per_ip: Arc<PerIpLimits>, mut shutdown: Shutdown) {
    let mut ticks = tokio::time::interval(std::time::Duration::from_secs(60));
    loop {
        tokio::select! {
            _ = shutdown.recv() => return,
            _ = ticks.tick() => per_ip.prune(),
        }
    }
}

fn signaling_limits(config: &Config) -> SignalingLimits {
    SignalingLimits {
        id_digits: config.id_digits,
        resume_grace: config.resume_grace,
        resume_queue_bytes: config.resume_queue_bytes,
        max_clients: config.max_clients,
        reservations_per_ip: config.reservations_per_ip,
        heartbeat_interval: config.ws_heartbeat_interval,
        ..SignalingLimits::default()
    }
}

fn session_settings(config: &Config) -> SessionSettings {
    SessionSettings {
        max_message_bytes: config.ws_max_message_bytes,
        outbox_frames: config.ws_outbox_frames,
        outbox_bytes: config.ws_outbox_bytes,
        outbox_bytes_total: config.ws_outbox_bytes_total,
        write_timeout: config.ws_write_timeout,
        heartbeat_interval: config.ws_heartbeat_interval,
        missed_pongs: config.ws_missed_pongs,
        messages_per_second: config.ws_messages_per_second,
        message_burst: config.ws_message_burst,
        calls_per_minute: config.ws_calls_per_minute,
    }
}

fn origin_policy(config: &Config) -> OriginPolicy {
    OriginPolicy {
        allowed_origins: config.allowed_origins.clone(),
        public_authority: config.public_url.as_ref().map(|url| url.authority.clone()),
    }
}

/// Binds a listener. `[::]` is dual-stack (IPv4 clients arrive as `::ffff:a.b.c.d`, which the
/// accept loops show as IPv4); on a host without IPv6 it falls back to `0.0.0.0` with a log line.
async fn bind(key: &'static str, addr: SocketAddr) -> Result<TcpListener, StartError> {
    match listen(addr) {
        Ok(listener) => Ok(listener),
        Err(e) if addr.ip() == std::net::Ipv6Addr::UNSPECIFIED && ipv6_unavailable(&e) => {
            let v4 = SocketAddr::from(([0, 0, 0, 0], addr.port()));
            tracing::info!(
                setting = key,
                "IPv6 is not available on this host ({e}); listening on {v4} (IPv4 only)"
            );
            listen(v4).map_err(|source| StartError::Bind {
                key,
                addr: v4,
                source,
            })
        }
        Err(source) => Err(StartError::Bind { key, addr, source }),
    }
}

/// A listening socket on `addr`; IPv6 sockets also accept IPv4 (`IPV6_V6ONLY` off).
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

/// Whether binding `[::]` failed because the host has no IPv6 (disabled in the kernel, or no
/// IPv6 address family): EAFNOSUPPORT, EPROTONOSUPPORT, EADDRNOTAVAIL.
fn ipv6_unavailable(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::AddrNotAvailable || matches!(e.raw_os_error(), Some(97 | 93))
}
