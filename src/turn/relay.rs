//! [`Relay::start`] and [`RunningRelay`]: binds the listeners, wires the front layer to the engine,
//! runs housekeeping, and owns the relay's one shutdown path.
//!
//! This module owns lifetimes — which tasks run and how they stop — and nothing else. Decisions live
//! in the gate, byte handling in `udp`, `stream` and `peer`.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use turn::allocation::AllocationInfo;
use turn::server::config::{ConnConfig, ServerConfig};
use turn::server::Server;

use super::credentials::{TurnCredentials, TurnEndpoints};
use super::error::TurnError;
use super::gate::{Gate, GateMemory, GateRules, GateShared};
use super::jumbo::JumboTable;
use super::peer::{bind_udp, PeerSocketGenerator};
use super::quota::Transport;
use super::reservation::PortReservations;
use super::settings::TurnSettings;
use super::stats::TurnStats;
use super::stream::{self, StreamListener};
use super::udp::UdpFront;

/// Where the TLS listener gets its acceptor, called once per connection so a certificate the
/// gateway reloads is used by the next handshake. The gateway owns loading and reloading.
pub type TlsAcceptorSource = Arc<dyn Fn() -> tokio_rustls::TlsAcceptor + Send + Sync>;

/// How often housekeeping runs: rate-limiter pruning, stale reservations, nonce rotation.
const MAINTENANCE_EVERY: Duration = Duration::from_secs(5);

/// The embedded TURN relay. See [`Relay::start`].
pub struct Relay;

/// A started relay: its bound addresses, its counters, and the handle that stops it.
pub struct RunningRelay {
    udp_addrs: Vec<SocketAddr>,
    tcp_addrs: Vec<SocketAddr>,
    tls_addrs: Vec<SocketAddr>,
    credentials: TurnCredentials,
    stats: Arc<TurnStats>,
    shared: Option<Arc<GateShared>>,
    shutdown: watch::Sender<bool>,
    engines: Vec<Server>,
    tasks: JoinSet<()>,
}

impl Relay {
    /// Binds every enabled listener (UDP, TCP, and TLS if `tls` is given), starts the engine behind
    /// the front layer and returns once the relay answers requests. It stops when `shutdown`
    /// resolves or [`RunningRelay::shutdown`] is called.
    ///
    /// With `settings.enabled == false` nothing is bound and the returned relay is inert (its
    /// credentials still work, so the signaling layer needs no special case).
    pub async fn start(
        settings: TurnSettings,
        tls: Option<TlsAcceptorSource>,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<RunningRelay, TurnError> {
        settings.validate()?;
        let credentials = TurnCredentials::new(&settings.auth_secrets)
            .map_err(|e| TurnError::InvalidSettings(e.to_string()))?;
        let stats = Arc::new(TurnStats::default());
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let mut relay = RunningRelay {
            udp_addrs: Vec::new(),
            tcp_addrs: Vec::new(),
            tls_addrs: Vec::new(),
            credentials: credentials.clone(),
            stats: Arc::clone(&stats),
            shared: None,
            shutdown: shutdown_tx,
            engines: Vec::new(),
            tasks: JoinSet::new(),
        };
        if !settings.enabled {
            return Ok(relay);
        }
        let relay_ips = settings.relay_ips()?;
        let policy = Arc::new(settings.peer_policy().compile());
        let shared = GateShared::new(
            GateRules {
                realm: settings.realm.clone(),
                credentials,
                policy: settings.peer_policy(),
                user_quota: settings.user_quota,
                total_quota: settings.total_quota,
                allocations_per_ip: settings.allocations_per_ip(),
                unauthenticated_per_ip_per_sec: settings.unauthenticated_per_ip_per_sec,
                relay_ips,
                max_permissions_per_allocation: settings.max_permissions_per_allocation,
            },
            Arc::clone(&stats),
            Arc::new(PortReservations::new(
                relay_ips,
                settings.max_port,
                settings.recv_buffer_bytes,
            )),
            Arc::new(JumboTable::default()),
        );
        relay.shared = Some(Arc::clone(&shared));
        let generator = {
            let settings = settings.clone();
            let policy = Arc::clone(&policy);
            let stats = Arc::clone(&stats);
            let jumbo = Arc::clone(shared.jumbo());
            move |reserved| {
                Box::new(PeerSocketGenerator {
                    relay_ips,
                    min_port: settings.min_port,
                    max_port: settings.max_port,
                    recv_buffer_bytes: settings.recv_buffer_bytes,
                    policy: Arc::clone(&policy),
                    stats: Arc::clone(&stats),
                    max_bytes_per_sec: settings.max_bytes_per_sec,
                    reserved,
                    jumbo: Arc::clone(&jumbo),
                }) as Box<dyn turn::relay::RelayAddressGenerator + Send + Sync>
            }
        };
        let generator: stream::GeneratorFactory = Arc::new(generator);

        let mut udp_gates = Vec::new();
        if let Some(port) = settings.udp_port {
            for ip in &settings.listening_ips {
                let (engine, gate, front, addr) = start_udp(
                    SocketAddr::new(*ip, port),
                    &settings,
                    &shared,
                    &generator,
                    &stats,
                    &shutdown_rx,
                    &mut relay.tasks,
                )
                .await?;
                relay.engines.push(engine);
                relay.udp_addrs.push(addr);
                udp_gates.push((gate, front));
            }
        }
        let stream_ctx = Arc::new(stream::StreamContext {
            shared: Arc::clone(&shared),
            generator: Arc::clone(&generator),
            realm: settings.realm.clone(),
            stats: Arc::clone(&stats),
            connections: Arc::new(tokio::sync::Semaphore::new(settings.max_stream_connections)),
            per_ip: Arc::new(stream::PerIpConnections::new(
                settings.max_stream_connections_per_ip,
            )),
            handshake_timeout: settings.tls_handshake_timeout,
            idle_timeout: settings.stream_idle_timeout,
            shutdown: shutdown_rx.clone(),
        });
        let mut stream_listeners = Vec::new();
        if let Some(port) = settings.tcp_port {
            for ip in &settings.listening_ips {
                let addr = SocketAddr::new(*ip, port);
                let listener = bind_tcp(addr, "TCP")?;
                relay.tcp_addrs.push(local(&listener, addr, "TCP")?);
                stream_listeners.push(StreamListener {
                    listener,
                    tls: None,
                });
            }
        }
        if let (Some(port), Some(tls)) = (settings.tls_port, tls) {
            for ip in &settings.listening_ips {
                let addr = SocketAddr::new(*ip, port);
                let listener = bind_tcp(addr, "TLS")?;
                relay.tls_addrs.push(local(&listener, addr, "TLS")?);
                stream_listeners.push(StreamListener {
                    listener,
                    tls: Some(Arc::clone(&tls)),
                });
            }
        }
        // Now that every listener is bound: the relay's own addresses are refused as peers.
        let bound = [&relay.udp_addrs, &relay.tcp_addrs, &relay.tls_addrs].map(|a| a.as_slice());
        let own = settings.own_addresses(&bound.concat());
        shared.set_own_addresses(own.clone());
        policy.set_own_addresses(own);
        for l in stream_listeners {
            relay
                .tasks
                .spawn(stream::accept_loop(l, Arc::clone(&stream_ctx)));
        }

        // Housekeeping: prune maps, rotate the engine nonce before it expires.
        {
            let shared = Arc::clone(&shared);
            let mut shutdown = shutdown_rx.clone();
            relay.tasks.spawn(async move {
                let mut tick = tokio::time::interval(MAINTENANCE_EVERY);
                loop {
                    tokio::select! {
                        _ = tick.tick() => {}
                        _ = shutdown.changed() => return,
                    }
                    let now = Instant::now();
                    shared.maintain(now);
                    for (gate, front) in &udp_gates {
                        if gate.needs_priming(now) {
                            front.inject(Gate::priming_request());
                        }
                    }
                }
            });
        }
        // The caller's shutdown future.
        {
            let tx = relay.shutdown.clone();
            relay.tasks.spawn(async move {
                let mut closed = tx.subscribe();
                tokio::select! {
                    _ = shutdown => { tx.send_replace(true); }
                    _ = closed.wait_for(|s| *s) => {}
                }
            });
        }
        tracing::info!(
            udp = ?relay.udp_addrs,
            tcp = ?relay.tcp_addrs,
            tls = ?relay.tls_addrs,
            "TURN relay listening"
        );
        Ok(relay)
    }
}

/// Binds one UDP listening address with `settings.udp_sockets` SO_REUSEPORT sockets, all in front
/// of one engine instance (so they share its nonce table), and waits until the nonce is primed.
async fn start_udp(
    addr: SocketAddr,
    settings: &TurnSettings,
    shared: &Arc<GateShared>,
    generator: &stream::GeneratorFactory,
    stats: &Arc<TurnStats>,
    shutdown: &watch::Receiver<bool>,
    tasks: &mut JoinSet<()>,
) -> Result<(Server, Arc<Gate>, Arc<UdpFront>, SocketAddr), TurnError> {
    let bind_err = |source| TurnError::Bind {
        transport: "UDP",
        addr,
        source,
    };
    let reuse = settings.udp_sockets > 1;
    let first = bind_udp(addr, reuse, settings.recv_buffer_bytes).map_err(bind_err)?;
    let bound = first.local_addr().map_err(bind_err)?;
    let mut sockets = vec![first];
    for _ in 1..settings.udp_sockets {
        sockets.push(bind_udp(bound, true, settings.recv_buffer_bytes).map_err(bind_err)?);
    }
    let gate = Arc::new(Gate::new(Arc::clone(shared), Transport::Udp));
    let mut fronts = Vec::new();
    for s in sockets {
        let front = UdpFront::new(s, Arc::clone(&gate), Arc::clone(stats), shutdown.clone())
            .map_err(bind_err)?;
        fronts.push(Arc::new(front));
    }
    let (close_tx, close_rx) = mpsc::channel(256);
    tasks.spawn(forward_closes(
        Transport::Udp,
        close_rx,
        Arc::clone(shared),
        shutdown.clone(),
    ));
    let engine = Server::new(ServerConfig {
        conn_configs: fronts
            .iter()
            .map(|f| ConnConfig {
                conn: Arc::clone(f) as Arc<dyn webrtc_util::Conn + Send + Sync>,
                relay_addr_generator: generator(f.reserved_slot()),
            })
            .collect(),
        realm: settings.realm.clone(),
        auth_handler: Arc::new(shared.auth_handler()),
        channel_bind_timeout: Duration::ZERO,
        alloc_close_notify: Some(close_tx),
    })
    .await?;
    fronts[0].inject(Gate::priming_request());
    gate.primed().await;
    Ok((engine, gate, Arc::clone(&fronts[0]), bound))
}

/// Feeds the engine's allocation-closed notifications to the quota ledger.
pub(crate) async fn forward_closes(
    transport: Transport,
    mut rx: mpsc::Receiver<AllocationInfo>,
    shared: Arc<GateShared>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let info = tokio::select! {
            info = rx.recv() => info,
            _ = shutdown.wait_for(|s| *s) => None,
        };
        let Some(info) = info else { return };
        let t = info.five_tuple;
        shared.allocation_closed(&(transport, t.src_addr, t.dst_addr));
    }
}

fn bind_tcp(addr: SocketAddr, transport: &'static str) -> Result<TcpListener, TurnError> {
    let err = |source| TurnError::Bind {
        transport,
        addr,
        source,
    };
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
    }
    .map_err(err)?;
    socket.set_reuseaddr(true).map_err(err)?;
    socket.bind(addr).map_err(err)?;
    socket.listen(1024).map_err(err)
}

fn local(
    listener: &TcpListener,
    addr: SocketAddr,
    transport: &'static str,
) -> Result<SocketAddr, TurnError> {
    listener.local_addr().map_err(|source| TurnError::Bind {
        transport,
        addr,
        source,
    })
}

impl RunningRelay {
    /// Bound UDP listening addresses (the real ports when settings asked for port 0).
    pub fn udp_addrs(&self) -> &[SocketAddr] {
        &self.udp_addrs
    }

    /// Bound TCP listening addresses.
    pub fn tcp_addrs(&self) -> &[SocketAddr] {
        &self.tcp_addrs
    }

    /// Bound TLS listening addresses.
    pub fn tls_addrs(&self) -> &[SocketAddr] {
        &self.tls_addrs
    }

    /// The credential authority, for the signaling layer to issue ICE servers with.
    pub fn credentials(&self) -> &TurnCredentials {
        &self.credentials
    }

    /// The relay's counters, for the metrics layer.
    pub fn stats(&self) -> &Arc<TurnStats> {
        &self.stats
    }

    /// The endpoints to advertise under `host`, from the listeners actually bound.
    pub fn endpoints(&self, host: &str) -> TurnEndpoints {
        TurnEndpoints {
            host: host.to_owned(),
            udp_port: self.udp_addrs.first().map(SocketAddr::port),
            tcp_port: self.tcp_addrs.first().map(SocketAddr::port),
            tls_port: self.tls_addrs.first().map(SocketAddr::port),
        }
    }

    /// Sizes of the front layer's maps (all bounded), for tests and diagnostics.
    pub fn memory(&self) -> Option<GateMemory> {
        self.shared.as_ref().map(|s| s.memory())
    }

    /// Stops accepting, closes every allocation and listener, and waits for all relay tasks.
    /// Dropping a `RunningRelay` also stops it, without waiting.
    pub async fn shutdown(mut self) {
        self.shutdown.send_replace(true);
        for engine in &self.engines {
            let _ = engine.close().await;
        }
        while self.tasks.join_next().await.is_some() {}
    }
}
