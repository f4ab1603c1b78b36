//! Relay sockets: the UDP sockets an allocation uses to talk to peers. [`PeerSocketGenerator`] is the
//! engine's `RelayAddressGenerator`; every socket it makes is a [`PeerSocket`], a `Conn` that the
//! engine's per-allocation loop reads and writes.
//!
//! This module owns what happens at the peer edge: the port range, the receive buffer, the
//! advertised (external) address, the bandwidth cap, the byte and packet counters, and — as defence
//! in depth behind the gate's 403 — refusing to send to a forbidden peer even if a permission
//! somehow exists. It must never send to an address [`PeerPolicy`](super::PeerPolicy) refuses.
//! [`PeerSockets`] is the registry of the relay sockets alive.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, Weak};
use std::task::{ready, Context, Poll};

use async_trait::async_trait;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::net::UdpSocket;
use webrtc_util::Conn;

use super::bind::bind_udp;
use super::policy::PeerFilter;
use super::relayed::RelayedPorts;
use super::reservation::ReservedSlot;
use super::route::{channel_data, JumboRoute};
use super::settings::RelayIps;
use super::stats::TurnStats;

thread_local! {
    /// Where relay sockets read datagrams: one 64 KiB buffer per runtime thread, used only inside
    /// one poll (never across an await), so thousands of allocations need no buffer each and no
    /// datagram is ever truncated.
    static READ_BUFFER: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0; 65_536]);
}

/// What one read from a relay socket produced.
enum Received {
    /// Copied into the engine's buffer.
    Fits(usize, SocketAddr),
    /// Too large for the engine; relayed on the side if a channel is bound.
    Oversized(Vec<u8>, SocketAddr),
}

/// How many random ports to try before answering 508 (Insufficient Capacity).
const PORT_ATTEMPTS: usize = 32;

/// Creates relay sockets for the engine.
pub struct PeerSocketGenerator {
    /// Where relay sockets bind (`relay-ip`, the private half of `external-ip`, `relay_ipv6`) and
    /// what they advertise (the public half of `external-ip`), per address family.
    pub relay_ips: RelayIps,
    /// `min-port`.
    pub min_port: u16,
    /// `max-port` (inclusive).
    pub max_port: u16,
    /// SO_RCVBUF asked for.
    pub recv_buffer_bytes: usize,
    /// Checked on every send, after the gate already checked CreatePermission/ChannelBind.
    pub policy: Arc<PeerFilter>,
    /// Where byte and packet counts go.
    pub stats: Arc<TurnStats>,
    /// `max-bps` per allocation and direction.
    pub max_bytes_per_sec: Option<u32>,
    /// A port reserved by RESERVATION-TOKEN, put here by this engine loop's front just before
    /// it hands the engine the Allocate that presents the token.
    pub reserved: ReservedSlot,
    /// Where relay sockets are registered (oversized ChannelData, relayed addresses as peers).
    pub sockets: Arc<PeerSockets>,
}

#[async_trait]
impl turn::relay::RelayAddressGenerator for PeerSocketGenerator {
    fn validate(&self) -> Result<(), turn::Error> {
        if self.min_port == 0 || self.max_port < self.min_port {
            return Err(turn::Error::ErrMaxPortLessThanMinPort);
        }
        Ok(())
    }

    async fn allocate_conn(
        &self,
        use_ipv4: bool,
        requested_port: u16,
    ) -> Result<(Arc<dyn Conn + Send + Sync>, SocketAddr), turn::Error> {
        let Some(ip) = self.relay_ips.for_family(use_ipv4) else {
            // The gate answers 440 before this; kept so the generator stands on its own.
            return Err(turn::Error::ErrInvalidRequestedFamilyValue);
        };
        let reserved = self
            .reserved
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let socket = if let Some(std_socket) = reserved.filter(|_| requested_port == 0) {
            UdpSocket::from_std(std_socket).map_err(|e| turn::Error::Other(e.to_string()))?
        } else if requested_port != 0 {
            bind_udp(
                SocketAddr::new(ip.bind, requested_port),
                false,
                self.recv_buffer_bytes,
            )
            .map_err(|e| turn::Error::Other(e.to_string()))?
        } else {
            self.bind_in_range(ip.bind)?
        };
        let mut relay_addr = socket
            .local_addr()
            .map_err(|e| turn::Error::Other(e.to_string()))?;
        relay_addr.set_ip(ip.advertised);
        let budgets = self.max_bytes_per_sec.and_then(NonZeroU32::new).map(|bps| {
            let limiter = || RateLimiter::direct(Quota::per_second(bps).allow_burst(bps));
            Box::new(Budgets {
                to_peer: limiter(),
                to_client: limiter(),
            })
        });
        let conn = Arc::new(PeerSocket {
            socket,
            relay_addr,
            policy: Arc::clone(&self.policy),
            stats: Arc::clone(&self.stats),
            budgets,
            sockets: Arc::clone(&self.sockets),
            route: Mutex::new(JumboRoute::default()),
        });
        self.sockets.register(relay_addr, Arc::downgrade(&conn));
        Ok((conn, relay_addr))
    }
}

impl PeerSocketGenerator {
    fn bind_in_range(&self, bind_ip: IpAddr) -> Result<UdpSocket, turn::Error> {
        let span = u32::from(self.max_port - self.min_port) + 1;
        for _ in 0..PORT_ATTEMPTS {
            let port = self.min_port + (rand::random::<u32>() % span) as u16;
            let addr = SocketAddr::new(bind_ip, port);
            if let Ok(s) = bind_udp(addr, false, self.recv_buffer_bytes) {
                return Ok(s);
            }
        }
        Err(turn::Error::ErrMaxRetriesExceeded)
    }
}

/// The relay sockets alive right now: by relayed port for the jumbo table, which links an
/// allocation to its socket when the engine confirms it, and as [`RelayedPorts`] (lock-free) for
/// the peer policy, which lets relayed addresses of this relay through as peers.
pub struct PeerSockets {
    /// The same sockets as one bit per port, shared with the gate.
    relayed: Arc<RelayedPorts>,
    /// By relayed address: (IPv4?, port), since the advertised IP may be an external one.
    by_port: Mutex<HashMap<(bool, u16), Weak<PeerSocket>>>,
}

impl PeerSockets {
    /// An empty registry that keeps `relayed` in step.
    pub fn new(relayed: Arc<RelayedPorts>) -> Self {
        PeerSockets {
            relayed,
            by_port: Mutex::default(),
        }
    }

    fn by_port(&self) -> std::sync::MutexGuard<'_, HashMap<(bool, u16), Weak<PeerSocket>>> {
        self.by_port.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A relay socket was created for the relayed address `relayed`.
    fn register(&self, relayed: SocketAddr, socket: Weak<PeerSocket>) {
        self.by_port()
            .insert((relayed.is_ipv4(), relayed.port()), socket);
        self.relayed.insert(relayed);
    }

    /// The relay socket for `relayed` is gone.
    fn unregister(&self, relayed: SocketAddr) {
        let k = (relayed.is_ipv4(), relayed.port());
        let mut by_port = self.by_port();
        if by_port.get(&k).is_some_and(|w| w.strong_count() == 0) {
            by_port.remove(&k);
            self.relayed.remove(relayed);
        }
    }

    /// The live relay socket on `relayed`'s family and port.
    pub fn get(&self, relayed: SocketAddr) -> Option<Arc<PeerSocket>> {
        self.by_port()
            .get(&(relayed.is_ipv4(), relayed.port()))
            .and_then(Weak::upgrade)
    }

    /// Whether `relayed` is the relayed address of a live allocation of this relay (by family and
    /// port: the advertised IP may be an external one). One atomic load.
    pub fn is_relayed(&self, relayed: SocketAddr) -> bool {
        self.relayed.contains(relayed)
    }

    /// Relay sockets registered.
    pub fn len(&self) -> usize {
        self.by_port().len()
    }

    /// Whether no relay socket is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One allocation's relay socket. The engine keeps one per allocation for the allocation's whole
/// life, so its size (and that of its receive future) is paid by every idle allocation; see
/// `docs/PERFORMANCE-TURN.md`, "Memory per allocation".
pub struct PeerSocket {
    socket: UdpSocket,
    /// The advertised relayed address (its key in [`PeerSockets`]).
    relay_addr: SocketAddr,
    policy: Arc<PeerFilter>,
    stats: Arc<TurnStats>,
    /// `max-bps`, boxed so that allocations without a cap (the default) do not carry two limiters.
    budgets: Option<Box<Budgets>>,
    /// The registry this socket leaves when dropped.
    sockets: Arc<PeerSockets>,
    /// Channels and the client path, for datagrams too large for the engine.
    route: Mutex<JumboRoute>,
}

/// The `max-bps` limiters of one allocation, one per direction.
struct Budgets {
    to_peer: DefaultDirectRateLimiter,
    to_client: DefaultDirectRateLimiter,
}

impl PeerSocket {
    /// The oversized-datagram route of this allocation.
    pub fn jumbo_route(&self) -> std::sync::MutexGuard<'_, JumboRoute> {
        self.route.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Relays a datagram too large for the engine to the client, on its bound channel.
    fn relay_oversized(&self, datagram: Vec<u8>, src: SocketAddr) {
        let route = {
            let r = self.jumbo_route();
            r.channel_for(src).zip(r.client.clone())
        };
        let Some((number, client)) = route else {
            TurnStats::bump(&self.stats.oversized_dropped);
            return;
        };
        if datagram.len() > usize::from(u16::MAX) {
            TurnStats::bump(&self.stats.oversized_dropped);
            return;
        }
        if client.send(channel_data(number, &datagram)) {
            TurnStats::add(&self.stats.bytes_to_clients, datagram.len());
            TurnStats::bump(&self.stats.packets_to_clients);
        } else {
            TurnStats::bump(&self.stats.oversized_dropped);
        }
    }

    /// Polls for one datagram for the client: copies it into `buf` and returns its length and
    /// sender, or handles it on the side (oversized, over budget) and keeps polling.
    ///
    /// A plain poll function, so that the future the engine keeps pending on every idle
    /// allocation holds two references instead of tokio's readiness future and an awaited send.
    fn poll_for_client(
        &self,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<std::io::Result<(usize, SocketAddr)>> {
        loop {
            let received = READ_BUFFER.with(|cell| {
                let mut big = cell.borrow_mut();
                let mut read = tokio::io::ReadBuf::new(&mut big);
                let src = ready!(self.socket.poll_recv_from(cx, &mut read))?;
                let n = read.filled().len();
                Poll::Ready(Ok::<_, std::io::Error>(if n <= buf.len() {
                    buf[..n].copy_from_slice(read.filled());
                    Received::Fits(n, src)
                } else {
                    Received::Oversized(read.filled().to_vec(), src)
                }))
            });
            let (n, src) = match ready!(received)? {
                Received::Fits(n, src) => (n, src),
                Received::Oversized(datagram, src) => {
                    if self.within_budget(Direction::ToClient, datagram.len()) {
                        self.relay_oversized(datagram, src);
                    } else {
                        TurnStats::bump(&self.stats.bandwidth_dropped);
                    }
                    continue;
                }
            };
            if !self.within_budget(Direction::ToClient, n) {
                TurnStats::bump(&self.stats.bandwidth_dropped);
                continue;
            }
            TurnStats::add(&self.stats.bytes_to_clients, n);
            TurnStats::bump(&self.stats.packets_to_clients);
            return Poll::Ready(Ok((n, src)));
        }
    }

    /// Whether `len` bytes fit this allocation's `max-bps` budget in `direction` (always, without
    /// a cap).
    fn within_budget(&self, direction: Direction, len: usize) -> bool {
        let Some(budgets) = &self.budgets else {
            return true;
        };
        let limiter = match direction {
            Direction::ToPeer => &budgets.to_peer,
            Direction::ToClient => &budgets.to_client,
        };
        let n = NonZeroU32::new(len.max(1) as u32).unwrap_or(NonZeroU32::MIN);
        matches!(limiter.check_n(n), Ok(Ok(())))
    }
}

/// Which way a datagram goes, for the bandwidth cap.
#[derive(Clone, Copy)]
enum Direction {
    ToPeer,
    ToClient,
}

impl Drop for PeerSocket {
    fn drop(&mut self) {
        self.sockets.unregister(self.relay_addr);
    }
}

#[async_trait]
impl Conn for PeerSocket {
    async fn connect(&self, _addr: SocketAddr) -> webrtc_util::Result<()> {
        Err(std::io::Error::other("relay sockets are not connected").into())
    }

    async fn recv(&self, _buf: &mut [u8]) -> webrtc_util::Result<usize> {
        Err(std::io::Error::other("use recv_from").into())
    }

    async fn recv_from(&self, buf: &mut [u8]) -> webrtc_util::Result<(usize, SocketAddr)> {
        Ok(std::future::poll_fn(|cx| self.poll_for_client(cx, buf)).await?)
    }

    async fn send(&self, _buf: &[u8]) -> webrtc_util::Result<usize> {
        Err(std::io::Error::other("use send_to").into())
    }

    async fn send_to(&self, buf: &[u8], target: SocketAddr) -> webrtc_util::Result<usize> {
        if (self.policy)
            .check_peer(target, |a| self.sockets.is_relayed(a))
            .is_err()
        {
            TurnStats::bump(&self.stats.refused_peers);
            return Ok(buf.len());
        }
        if !self.within_budget(Direction::ToPeer, buf.len()) {
            TurnStats::bump(&self.stats.bandwidth_dropped);
            // Report success: the engine treats a short write as an error, a drop is UDP.
            return Ok(buf.len());
        }
        // Try the send first; wait for writability (a full socket buffer) through a poll function
        // rather than `UdpSocket::send_to(..).await`: `async_trait` boxes this future on every
        // call, and tokio's send future would make it, and the copy into the box, larger.
        let n = match self.socket.try_send_to(buf, target) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::future::poll_fn(|cx| self.socket.poll_send_to(cx, buf, target)).await?
            }
            r => r?,
        };
        TurnStats::add(&self.stats.bytes_to_peers, n);
        TurnStats::bump(&self.stats.packets_to_peers);
        Ok(n)
    }

    fn local_addr(&self) -> webrtc_util::Result<SocketAddr> {
        Ok(self.socket.local_addr()?)
    }

    fn remote_addr(&self) -> Option<SocketAddr> {
        None
    }

    async fn close(&self) -> webrtc_util::Result<()> {
        // The socket closes when the engine drops its last Arc to this allocation.
        Ok(())
    }

    fn as_any(&self) -> &(dyn std::any::Any + Send + Sync) {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::turn::policy::PeerPolicy;

    fn generator(max_bytes_per_sec: Option<u32>) -> PeerSocketGenerator {
        let loopback = IpAddr::from([127, 0, 0, 1]);
        PeerSocketGenerator {
            relay_ips: RelayIps {
                ipv4: Some(crate::turn::settings::RelayIp {
                    bind: loopback,
                    advertised: loopback,
                }),
                ipv6: None,
            },
            min_port: 49_000,
            max_port: 49_999,
            recv_buffer_bytes: 0,
            policy: Arc::new(PeerPolicy::default().compile()),
            stats: Arc::new(TurnStats::default()),
            max_bytes_per_sec,
            reserved: ReservedSlot::default(),
            sockets: Arc::new(PeerSockets::new(Arc::default())),
        }
    }

    /// The engine keeps one pending `recv_from` future per allocation for the allocation's whole
    /// life (boxed by `async_trait`). It was 800 bytes while it held tokio's readiness future and
    /// an awaited send; keep it to a few references.
    #[tokio::test]
    async fn the_pending_receive_of_an_idle_allocation_stays_small() {
        use turn::relay::RelayAddressGenerator;
        for cap in [None, Some(1_000_000)] {
            let (conn, _) = generator(cap).allocate_conn(true, 0).await.unwrap();
            let mut buf = [0u8; 1500];
            let pending = conn.recv_from(&mut buf);
            let size = std::mem::size_of_val(&*pending);
            assert!(size <= 64, "recv_from future is {size} bytes");
        }
    }

    /// What every allocation carries for its relay socket besides the socket itself.
    #[test]
    fn a_relay_socket_without_a_bandwidth_cap_carries_no_limiters() {
        assert_eq!(
            std::mem::size_of::<Option<Box<Budgets>>>(),
            std::mem::size_of::<usize>()
        );
        assert!(
            std::mem::size_of::<PeerSocket>() <= 192,
            "{}",
            std::mem::size_of::<PeerSocket>()
        );
    }
}
