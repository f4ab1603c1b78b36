//! Binds every listener, starts the subsystems, and owns the one shutdown path.
//!
//! [`Server::bind`] does everything that can fail at startup (certificate, listeners, public
//! directory) so that errors surface before anything is served. [`Server::run`] serves until the
//! given signal, then: in a cluster the node is marked draining in Redis, `/readyz` turns 503, the
//! drain delay passes, the listeners close, every connection and session is told to finish, the
//! server waits for them up to the shutdown timeout, and a cluster node leaves the membership.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::acme::{self, Acme, AcmeMetrics};
use crate::cluster;
use crate::cluster::link::{self, LinkMetrics, Links};
use crate::cluster::node::ClusterMetrics;
use crate::cluster::node::NodeRouter;
use crate::cluster::nodes::{BusReaders, Membership, NodeInfo, NodeMetrics, BUS_READS};
use crate::cluster::redis::{Redis, RedisMetrics};
use crate::config::{Config, TlsSource};
use crate::http::headers::SecurityHeaders;
use crate::http::proxy_protocol::TrustedProxies;
use crate::http::routes::Readiness;
use crate::http::static_files::StaticFiles;
use crate::http::websocket::{IceProvider, WebSocketEndpoint};
use crate::http::{self, Admission, App, RedirectTarget};
use crate::limits::{AddressLimit, ConnectionLimit, PerIpLimits};
use crate::metrics::{Limit, Metrics};
use crate::shutdown::{Shutdown, ShutdownController};
use crate::signaling::registry::NodeId;
use crate::signaling::router::Router;
use crate::signaling::session::{SessionRunner, Sessions};
use crate::tls::{self, CertStore, LoadError};
use crate::turn::{Relay, RunningRelay, TlsAcceptorSource};

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
    /// The Redis client could not be set up from `redis-url` (nothing is connected yet).
    #[error("redis-url: {0}")]
    Redis(#[from] crate::cluster::redis::RedisError),
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
    /// The shared Redis connection, when `redis-url` is set (cluster mode): not connected yet.
    redis: Option<Redis>,
    /// The `callgate_cluster_nodes_*` gauges, registered on every node (0 on a single node).
    node_metrics: NodeMetrics,
    /// A cluster node's router, whose tasks (inbox, leases, orphan sweep) start with the server.
    cluster_hub: Option<Arc<NodeRouter>>,
    /// Which nodes read batch payloads: filled by membership, asked by the router's bus.
    bus_readers: BusReaders,
    /// Direct links between nodes (`cluster-listen`): the bound listener and the links the
    /// router's bus sends on.
    cluster_links: Option<(TcpListener, Arc<Links>)>,
}

impl Server {
    /// Loads (or generates) the certificate, opens the web app directory and binds every listener.
    pub async fn bind(config: Config) -> Result<Server, StartError> {
        if let TlsSource::DevDir { dir } = &config.tls.source() {
            let generated = tls::ensure_dev_cert(dir).map_err(|source| StartError::DevCert {
                dir: dir.clone(),
                source,
            })?;
            if let (Some(dev), Some(acme)) = (&generated, config.acme()) {
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
            .acme()
            .cloned()
            .map(|acme| Acme::open(acme, acme_listeners(&config)))
            .transpose()?;
        let certs = CertStore::new(match acme.as_ref().and_then(Acme::stored_key) {
            Some(stored) => stored,
            None => tls::load_certified_key(&cert_path, &key_path)?,
        });

        let files = StaticFiles::load(&config.http.public_dir, config.http.public_dir_max_bytes)?;
        let (file_count, file_bytes) = files.size();
        tracing::debug!(
            files = file_count,
            bytes = file_bytes,
            "web app loaded into memory"
        );
        let readiness = Arc::new(Readiness::default());
        let controller = ShutdownController::new();
        let metrics = Arc::new(Metrics::new());
        let redis_metrics = RedisMetrics::register(&metrics);
        let node_metrics = NodeMetrics::register(&metrics);
        let redis = match config.cluster.enabled() {
            Some((redis_url, _)) => Some(Redis::open(redis_url, redis_metrics)?),
            None => None,
        };
        let mut acme = acme;
        if let (Some(acme), Some(redis), Some((_, node_id))) =
            (acme.as_mut(), &redis, config.cluster.enabled())
        {
            // One certificate for the cluster; its key sealed with static-auth-secret (which
            // cluster mode requires).
            if let Some(sealer) = acme::Sealer::new(&config.turn.relay.auth_secrets) {
                acme.share(redis.clone(), node_id, sealer);
            }
        }
        let relay = start_relay(&config, &certs, controller.handle()).await?;
        metrics.export_turn(relay.stats().clone());
        let https = bind("https-listen", config.http.https_listen).await?;
        let mut endpoints = relay.endpoints("");
        if config.turn.on_https_port {
            let port = https
                .local_addr()
                .map_or(config.http.https_listen.port(), |a| a.port());
            endpoints.https_port = Some(port);
        }
        let ice = config.turn.relay.enabled.then(|| {
            IceProvider::new(
                relay.credentials().clone(),
                endpoints,
                config.turn.host.clone().or_else(|| {
                    config
                        .http
                        .public_url
                        .as_ref()
                        .map(|url| url.host().to_owned())
                }),
                config.turn.relay.credential_ttl,
            )
        });
        let per_ip = PerIpLimits::new(
            config.signaling.upgrades_per_second,
            config.signaling.connections_per_ip,
        );
        let cluster_metrics = ClusterMetrics::register(&metrics);
        // A cluster node's router runs on Redis (and its tasks start with the server); a single
        // node's is the memory registry with no bus, exactly as before.
        let bus_readers = BusReaders::default();
        let link_metrics = LinkMetrics::register(&metrics);
        let cluster_links = match (config.cluster.listen, config.cluster.enabled()) {
            (Some(addr), Some((_, node_id))) => Some((
                bind("cluster-listen", addr).await?,
                Links::new(
                    node_id,
                    &config.turn.relay.auth_secrets,
                    cluster::node::BUS_TIMEOUT,
                    link_metrics,
                ),
            )),
            _ => None,
        };
        let (sessions, cluster_hub): (Arc<dyn SessionRunner>, _) =
            match (&redis, config.cluster.enabled()) {
                (Some(redis), Some((_, node_id))) => {
                    let hub = Arc::new(
                        cluster::node::router(
                            redis,
                            NodeId::new(node_id),
                            config.signaling.limits.clone(),
                            cluster_metrics,
                            bus_readers.clone(),
                            cluster_links.as_ref().map(|(_, links)| links.clone()),
                        )
                        .with_observer(metrics.clone()),
                    );
                    let sessions = Sessions::new(
                        hub.clone(),
                        config.signaling.session.clone(),
                        per_ip.clone(),
                        metrics.clone(),
                    );
                    (sessions, Some(hub))
                }
                _ => {
                    let hub = Router::single_node(config.signaling.limits.clone())
                        .with_observer(metrics.clone());
                    let sessions = Sessions::new(
                        Arc::new(hub),
                        config.signaling.session.clone(),
                        per_ip.clone(),
                        metrics.clone(),
                    );
                    (sessions, None)
                }
            };
        let signaling = WebSocketEndpoint::new(
            sessions,
            config.signaling.origins.clone(),
            per_ip.clone(),
            metrics.clone(),
            ice,
        );
        let app = Arc::new(App::new(
            files,
            SecurityHeaders::new(config.http.hsts_max_age),
            readiness.clone(),
            signaling.clone(),
            controller.handle(),
            metrics.clone(),
            config.turn.api_key.clone(),
        ));

        let admin = match config.metrics.listen.addr() {
            Some(addr) => Some(bind("metrics-listen", addr).await?),
            None => None,
        };
        let http = match config.http.http_listen.addr() {
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
            redis,
            node_metrics,
            cluster_hub,
            bus_readers,
            cluster_links,
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
            redis,
            node_metrics,
            cluster_hub,
            bus_readers,
            cluster_links,
        } = self;
        // Where the other nodes dial this node's link: cluster-advertise, else the bound
        // cluster-listen (its real port when that was 0).
        let link_address = cluster_links.as_ref().and_then(|(listener, _)| {
            config
                .cluster
                .advertise
                .or_else(|| listener.local_addr().ok())
                .map(|addr| addr.to_string())
        });
        let membership = match (config.cluster.enabled(), redis) {
            (Some((_, node_id)), Some(redis)) => Some(Membership::start(
                redis,
                NodeInfo {
                    id: node_id.to_owned(),
                    https: addrs.https.to_string(),
                    turn: config.turn.host.clone().or_else(|| {
                        config
                            .turn
                            .relay
                            .external_ip
                            .map(|ip| ip.public.to_string())
                    }),
                    draining: false,
                    bus_reads: BUS_READS,
                    link: link_address.clone(),
                },
                config.signaling.limits.resume_grace,
                node_metrics,
                bus_readers,
            )),
            _ => None,
        };
        if let Some(hub) = cluster_hub {
            if let (Some((listener, links)), Some(membership)) = (cluster_links, &membership) {
                tracing::info!(
                    listen = %listener.local_addr().map_or_else(|e| e.to_string(), |a| a.to_string()),
                    advertised = link_address.as_deref().unwrap_or_default(),
                    "cluster links: accepting links from the other nodes"
                );
                tokio::spawn(link::accept::serve(
                    listener,
                    links.clone(),
                    controller.handle(),
                ));
                tokio::spawn(link::dial::run(
                    links,
                    hub.bus().routes().bus().clone(),
                    membership.alive(),
                    controller.handle(),
                ));
            }
            cluster::node::spawn(hub, &controller.handle());
        }
        tokio::spawn(expire_reservations(signaling, controller.handle()));
        tokio::spawn(prune_rate_limits(per_ip, controller.handle()));
        let per_ip = AddressLimit::new(
            config.http.connections_per_ip,
            metrics.limits.rejected_counter(Limit::AddressConnections),
        );
        let admission = Admission {
            limit: ConnectionLimit::new(
                config.http.max_connections,
                metrics.limits.rejected_counter(Limit::MaxConnections),
            ),
            per_ip: per_ip.clone(),
            trusted_proxies: Arc::new(TrustedProxies::new(config.http.proxy_protocol_from.clone())),
            proxy_header_timeout: config.http.connection.tls_handshake_timeout,
        };
        // The metrics listener has its own global cap (a flood on the public port must not keep
        // the scraper out) and trusts no PROXY header; the per-address cap is shared.
        let metrics_admission = Admission {
            limit: ConnectionLimit::new(
                config.http.max_connections,
                metrics.limits.rejected_counter(Limit::MaxConnections),
            ),
            per_ip,
            trusted_proxies: Arc::new(TrustedProxies::default()),
            proxy_header_timeout: config.http.connection.tls_handshake_timeout,
        };
        let settings = config.http.connection.clone();

        let (mut cert_path, mut key_path) = config.tls.paths();
        let (mut loaded_version, mut reload_interval) =
            (loaded_version, config.tls.reload_interval);
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
                config.metrics.token.clone(),
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
                public_url: config.http.public_url.clone(),
                https_port: addrs.https.port(),
                acme_dir: config.acme.challenge_dir.clone(),
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
        // In a cluster the others (and their resumes) learn first: the flag is in Redis before
        // /readyz turns 503 and before any client is told to reconnect.
        if let Some(membership) = &membership {
            match membership.start_draining().await {
                Ok(()) => tracing::info!(node = %membership.node_id(), "marked draining in Redis"),
                Err(e) => tracing::warn!(
                    node = %membership.node_id(),
                    "could not mark this node draining in Redis ({e}); shutting down anyway"
                ),
            }
        }
        readiness.start_draining();
        tracing::info!(
            drain_delay = ?config.shutdown.drain_delay,
            "shutting down: /readyz now reports 503"
        );
        tokio::time::sleep(config.shutdown.drain_delay).await;
        controller.trigger();
        // The relay holds a shutdown handle like every listener: the drain below waits for it.
        drop(relay);
        tracing::info!(timeout = ?config.shutdown.timeout, "listeners closing, draining connections");
        match tokio::time::timeout(config.shutdown.timeout, controller.drained()).await {
            Ok(()) => tracing::info!("shutdown complete"),
            Err(_) => tracing::warn!(
                "shutdown timeout reached with connections still open; exiting anyway"
            ),
        }
        if let Some(membership) = membership {
            membership.leave().await;
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
    let mut settings = config.turn.relay.clone();
    if settings.auth_secrets.is_empty() {
        use base64::Engine as _;
        let random: [u8; 32] = rand::random();
        settings
            .auth_secrets
            .push(base64::engine::general_purpose::STANDARD_NO_PAD.encode(random));
        if settings.enabled {
            tracing::info!(
                "TURN: no static-auth-secret configured; credentials are signed with a random secret \
                 for this process (set one to share credentials across instances or restarts)"
            );
        }
    }
    if settings.enabled
        && settings.relay_ip.is_none()
        && settings.external_ip.is_none()
        && settings.listening_ips.iter().all(|ip| ip.is_unspecified())
    {
        settings.relay_ip = first_interface_address();
        match settings.relay_ip {
            Some(ip) => {
                tracing::info!(relay_ip = %ip, "TURN: relaying from this host's first non-loopback address (set relay-ip or external-ip to choose)")
            }
            None => {
                tracing::warn!(
                    "TURN: found no non-loopback IPv4 address to relay from, so relayed candidates \
                     will be 127.0.0.1 and only work on this host; set relay-ip (or external-ip)"
                );
                settings.relay_ip = Some(std::net::IpAddr::from([127, 0, 0, 1]));
            }
        }
    }
    let acceptor = TlsAcceptor::from(tls::server_config(certs.clone(), &[]));
    let tls: TlsAcceptorSource = Arc::new(move || acceptor.clone());
    Ok(Relay::start(settings, Some(tls), shutdown).await?)
}

/// Which ports the CA's validations can reach.
fn acme_listeners(config: &Config) -> acme::Listeners {
    acme::Listeners {
        https_port: config.http.https_listen.port(),
        http_port: config.http.http_listen.addr().map(|a| a.port()),
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
