//! [`Relay::start`] and [`RunningRelay`]: binds the listeners, wires the front layer to the engine,
//! runs housekeeping, and stops the relay when the server's [`Shutdown`] fires.
//!
//! This module owns lifetimes — which tasks run and how they stop — and nothing else. Decisions live
//! in the gate, byte handling in `udp`, `stream` and `peer`.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use turn::server::config::{ConnConfig, ServerConfig};
use turn::server::Server;

use super::bind::bind_udp;
use super::credentials::{TurnCredentials, TurnEndpoints};
use super::error::TurnError;
use super::front::{forward_closes, FrontShared};
use super::gate::{Gate, GateMemory, GateRules, GateShared};
use super::jumbo::JumboTable;
use super::peer::{PeerSocketGenerator, PeerSockets};
use super::quota::Transport;
use super::relayed::RelayedPorts;
use super::reservation::PortReservations;
use super::settings::TurnSettings;
use super::stats::TurnStats;
use super::stream::{self, StreamListener, TlsAcceptorSource};
use super::udp::UdpFront;
use crate::shutdown::Shutdown;

/// How often housekeeping runs: rate-limiter pruning, stale reservations, nonce rotation.
const MAINTENANCE_EVERY: Duration = Duration::from_secs(5);

/// The embedded TURN relay. See [`Relay::start`].
pub struct Relay;

/// A started relay: its bound addresses and counters. It runs until the [`Shutdown`] passed to
/// [`Relay::start`] fires; dropping this handle does not stop it.
pub struct RunningRelay {
    /// Bound UDP listening addresses, one per listening address.
    udp_addrs: Vec<SocketAddr>,
    /// Bound TCP listening addresses.
    tcp_addrs: Vec<SocketAddr>,
    /// Bound TLS listening addresses.
    tls_addrs: Vec<SocketAddr>,
    /// Issues the credentials the relay accepts.
    credentials: TurnCredentials,
    /// Counters for the metrics layer.
    stats: Arc<TurnStats>,
    /// The gate's and the fronts' shared tables, for [`RunningRelay::memory`]; `None` when
    /// disabled.
    front: Option<Arc<FrontShared>>,
    /// Where the HTTPS listener hands TURN connections it routed; `None` when disabled.
    handoff: Option<stream::StreamHandoff>,
}

/// Sizes of the relay's bounded maps, for tests and diagnostics: the gate's ([`GateMemory`])
/// and the fronts' tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayMemory {
    /// Source IPs the unauthenticated rate limiter tracks.
    pub rate_limited_ips: usize,
    /// Keys remembered for the engine's `AuthHandler`.
    pub verified_keys: usize,
    /// Allocations (pending and confirmed) in the quota ledger.
    pub ledger_entries: usize,
    /// Allocate successes kept to answer retransmissions.
    pub allocate_replies: usize,
    /// Nonces the engine has issued: one per priming, none per client request.
    pub engine_nonces: usize,
    /// Relay sockets, allocations and pending ChannelBinds known for oversized ChannelData.
    pub jumbo: (usize, usize, usize),
    /// Ports held for RESERVATION-TOKENs.
    pub reservations: usize,
}

impl Relay {
    /// Binds every enabled listener (UDP, TCP, and TLS if `tls` is given) on every listening
    /// address (see [`TurnSettings::listening_addrs`]), starts the engine behind the front layer
    /// and returns once the relay answers requests.
    ///
    /// The relay stops with the rest of the server: when `shutdown` fires (or its controller is
    /// dropped) it stops accepting, closes every allocation and listener, and holds `shutdown`
    /// until all of its tasks have ended, so the server's `shutdown-timeout` bounds it too.
    ///
    /// With `settings.enabled == false` nothing is bound and the returned relay is inert (its
    /// credentials still work, so the signaling layer needs no special case).
    pub async fn start(
        settings: TurnSettings,
        tls: Option<TlsAcceptorSource>,
        shutdown: Shutdown,
    ) -> Result<RunningRelay, TurnError> {
        settings.validate()?;
        let credentials = TurnCredentials::new(&settings.auth_secrets)
            .map_err(|e| TurnError::InvalidSettings(e.to_string()))?;
        let stats = Arc::new(TurnStats::default());
        let mut relay = RunningRelay {
            udp_addrs: Vec::new(),
            tcp_addrs: Vec::new(),
            tls_addrs: Vec::new(),
            credentials: credentials.clone(),
            stats: Arc::clone(&stats),
            front: None,
            handoff: None,
        };
        if !settings.enabled {
            return Ok(relay);
        }
        let listen = settings.listening_addrs(&host_addresses(&settings)?)?;
        // What the engine's objects (its `Conn`s) watch: set by `supervise` when `shutdown`
        // fires. They must not hold `shutdown` itself, or the engine's lifetime would delay the
        // server's drain; the tasks below are what `supervise` waits for.
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut tasks = JoinSet::new();
        let mut engines = Vec::new();
        let relay_ips = settings.relay_ips()?;
        let policy = Arc::new(settings.peer_policy().compile());
        let relayed = Arc::new(RelayedPorts::default());
        let sockets = Arc::new(PeerSockets::new(Arc::clone(&relayed)));
        let reservations = Arc::new(PortReservations::new(
            relay_ips,
            settings.max_port,
            settings.recv_buffer_bytes,
        ));
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
            relayed,
            Arc::clone(&reservations) as _,
        );
        let front = Arc::new(FrontShared {
            gate: Arc::clone(&shared),
            jumbo: Arc::new(JumboTable::new(Arc::clone(&sockets))),
            reservations,
            stats: Arc::clone(&stats),
        });
        relay.front = Some(Arc::clone(&front));
        let generator = {
            let settings = settings.clone();
            let policy = Arc::clone(&policy);
            let stats = Arc::clone(&stats);
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
                    sockets: Arc::clone(&sockets),
                }) as Box<dyn turn::relay::RelayAddressGenerator + Send + Sync>
            }
        };
        let generator: stream::GeneratorFactory = Arc::new(generator);

        let mut udp_gates = Vec::new();
        if let Some(mut port) = settings.udp_port {
            for &ip in &listen {
                let started = start_udp(
                    SocketAddr::new(ip, port),
                    &settings,
                    &front,
                    &generator,
                    &stop_rx,
                    &mut tasks,
                )
                .await;
                let Some((engine, gate, front, addr)) = skip_vanished(&settings, ip, started)?
                else {
                    continue;
                };
                // Port 0 (tests): every address listens on the port the first one got, so one
                // advertised URL port works on all of them.
                port = addr.port();
                engines.push(engine);
                relay.udp_addrs.push(addr);
                udp_gates.push((gate, front));
            }
        }
        let stream_ctx = Arc::new(stream::StreamContext {
            front: Arc::clone(&front),
            generator: Arc::clone(&generator),
            realm: settings.realm.clone(),
            stats: Arc::clone(&stats),
            connections: Arc::new(tokio::sync::Semaphore::new(settings.max_stream_connections)),
            per_ip: Arc::new(stream::PerIpConnections::new(
                settings.max_stream_connections_per_ip,
            )),
            handshake_timeout: settings.tls_handshake_timeout,
            idle_timeout: settings.stream_idle_timeout,
            write_queue_bytes: settings.stream_write_queue_bytes,
            shutdown: stop_rx.clone(),
        });
        relay.handoff = Some(stream::StreamHandoff::new(Arc::clone(&stream_ctx)));
        let mut stream_listeners = Vec::new();
        let stream_ports = [
            (settings.tcp_port, None, "TCP"),
            (settings.tls_port.filter(|_| tls.is_some()), tls, "TLS"),
        ];
        for (port, tls, transport) in stream_ports {
            let Some(mut port) = port else { continue };
            for &ip in &listen {
                let bound = bind_tcp(SocketAddr::new(ip, port), transport);
                let Some(listener) = skip_vanished(&settings, ip, bound)? else {
                    continue;
                };
                let addr = local(&listener, SocketAddr::new(ip, port), transport)?;
                port = addr.port();
                if tls.is_some() {
                    relay.tls_addrs.push(addr);
                } else {
                    relay.tcp_addrs.push(addr);
                }
                stream_listeners.push(StreamListener {
                    listener,
                    tls: tls.clone(),
                });
            }
        }
        // Now that every listener is bound: the relay's own addresses are refused as peers.
        let bound = [&relay.udp_addrs, &relay.tcp_addrs, &relay.tls_addrs].map(|a| a.as_slice());
        let own = settings.own_addresses(&bound.concat());
        shared.set_own_addresses(own.clone());
        policy.set_own_addresses(own);
        for l in stream_listeners {
            tasks.spawn(stream::accept_loop(l, Arc::clone(&stream_ctx)));
        }

        // Housekeeping: prune maps, rotate the engine nonce before it expires.
        {
            let front = Arc::clone(&front);
            let mut stop = stop_rx.clone();
            tasks.spawn(async move {
                let mut tick = tokio::time::interval(MAINTENANCE_EVERY);
                loop {
                    tokio::select! {
                        _ = tick.tick() => {}
                        _ = stop.wait_for(|s| *s) => return,
                    }
                    let now = Instant::now();
                    front.maintain(now);
                    for (gate, front) in &udp_gates {
                        if gate.needs_priming(now) {
                            front.inject(Gate::priming_request());
                        }
                    }
                }
            });
        }
        tracing::info!(
            udp = ?relay.udp_addrs,
            tcp = ?relay.tcp_addrs,
            tls = ?relay.tls_addrs,
            "TURN relay listening"
        );
        tokio::spawn(supervise(shutdown, stop_tx, engines, tasks));
        Ok(relay)
    }
}

/// This host's addresses, read only when a listening IP is a wildcard that needs them.
fn host_addresses(settings: &TurnSettings) -> Result<Vec<IpAddr>, TurnError> {
    if !settings.listening_ips.iter().any(IpAddr::is_unspecified) {
        return Ok(Vec::new());
    }
    let interfaces = if_addrs::get_if_addrs().map_err(TurnError::HostAddresses)?;
    Ok(interfaces.iter().map(|i| i.ip()).collect())
}

/// Passes a bind result through, except that an address found by expanding a wildcard which the
/// OS will not bind (`EADDRNOTAVAIL`: it went away since it was listed, or IPv6 duplicate address
/// detection has not finished) is skipped with a warning instead of failing the start. An address
/// the operator named fails the start.
fn skip_vanished<T>(
    settings: &TurnSettings,
    ip: IpAddr,
    bound: Result<T, TurnError>,
) -> Result<Option<T>, TurnError> {
    match bound {
        Err(TurnError::Bind { source, addr, .. })
            if source.kind() == std::io::ErrorKind::AddrNotAvailable
                && !settings.listening_ips.contains(&ip) =>
        {
            tracing::warn!(%addr, "TURN: not listening on a host address the OS would not bind: {source}");
            Ok(None)
        }
        other => other.map(Some),
    }
}

/// Waits for the server's shutdown, then stops the relay: tells every front to stop (their reads
/// fail, which ends the engine's read loops and closes their allocations), closes the engines,
/// and waits for every relay task. `shutdown` is held until then, so the server's drain — bounded
/// by `shutdown-timeout` — includes the relay.
async fn supervise(
    mut shutdown: Shutdown,
    stop: watch::Sender<bool>,
    engines: Vec<Server>,
    mut tasks: JoinSet<()>,
) {
    shutdown.recv().await;
    stop.send_replace(true);
    for engine in &engines {
        let _ = engine.close().await;
    }
    while tasks.join_next().await.is_some() {}
    tracing::debug!("TURN relay stopped");
}

/// Binds one UDP listening address with `settings.udp_sockets` SO_REUSEPORT sockets, all in front
/// of one engine instance (so they share its nonce table), and waits until the nonce is primed.
async fn start_udp(
    addr: SocketAddr,
    settings: &TurnSettings,
    front: &Arc<FrontShared>,
    generator: &stream::GeneratorFactory,
    stop: &watch::Receiver<bool>,
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
    let gate = Arc::new(Gate::new(Arc::clone(&front.gate), Transport::Udp));
    let mut fronts = Vec::new();
    for s in sockets {
        let udp = UdpFront::new(s, Arc::clone(&gate), Arc::clone(front), stop.clone())
            .map_err(bind_err)?;
        fronts.push(Arc::new(udp));
    }
    let (close_tx, close_rx) = mpsc::channel(256);
    tasks.spawn(forward_closes(
        Transport::Udp,
        close_rx,
        Arc::clone(front),
        stop.clone(),
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
        auth_handler: Arc::new(front.gate.auth_handler()),
        channel_bind_timeout: Duration::ZERO,
        alloc_close_notify: Some(close_tx),
    })
    .await?;
    fronts[0].inject(Gate::priming_request());
    fronts[0].primed().await;
    Ok((engine, gate, Arc::clone(&fronts[0]), bound))
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
            https_port: None,
        }
    }

    /// Serves TURN-over-TLS connections accepted on another listener (the HTTPS port); `None`
    /// when the relay is disabled.
    pub fn stream_handoff(&self) -> Option<stream::StreamHandoff> {
        self.handoff.clone()
    }

    /// Sizes of the front layer's maps (all bounded), for tests and diagnostics.
    pub fn memory(&self) -> Option<RelayMemory> {
        self.front.as_ref().map(|f| {
            let GateMemory {
                rate_limited_ips,
                verified_keys,
                ledger_entries,
                allocate_replies,
                engine_nonces,
            } = f.gate.memory();
            RelayMemory {
                rate_limited_ips,
                verified_keys,
                ledger_entries,
                allocate_replies,
                engine_nonces,
                jumbo: f.jumbo.sizes(),
                reservations: f.reservations.len(),
            }
        })
    }
}
