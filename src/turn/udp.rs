//! [`UdpFront`]: one UDP listening socket as the engine sees it — a `webrtc_util::Conn` whose
//! `recv_from` only returns packets the [`Gate`] let through and whose `send_to` lets the gate watch
//! the engine's answers.
//!
//! This module owns the UDP edge: the read loop's staging buffer, answering the gate's replies
//! directly on the socket, injecting the nonce-priming request and saying when it was answered,
//! and stopping on shutdown. It makes no decisions of its own; those are the gate's, carried out
//! through [`FrontShared`].

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use tokio::net::UdpSocket;
use tokio::sync::{watch, Notify};
use webrtc_util::Conn;

use super::front::{FrontShared, Inbound};
use super::gate::{Gate, Outbound, PRIMING_ADDR};
use super::quota::Transport;
use super::reservation::ReservedSlot;
use super::route::ClientPath;

/// Staging buffer size: any UDP datagram fits, so oversized ones are detected, not truncated.
const STAGING: usize = 65_536;

/// A listening UDP socket in front of the engine.
pub struct UdpFront {
    socket: Arc<UdpSocket>,
    local: SocketAddr,
    /// The gate of this socket's engine.
    gate: Arc<Gate>,
    /// What every listener shares: where the gate's verdicts are carried out.
    front: Arc<FrontShared>,
    /// Set once the engine answered a priming request with a nonce (see [`UdpFront::primed`]).
    primed: watch::Sender<bool>,
    /// A request to hand the engine before the next socket read (nonce priming).
    injected: Mutex<Option<Vec<u8>>>,
    /// Set with `injected`, so the per-packet path checks an atomic instead of taking a lock.
    has_injected: AtomicBool,
    wake: Notify,
    shutdown: watch::Receiver<bool>,
    /// Only the engine's read loop for this socket calls `recv_from`, so never contended: a
    /// `recv_from` takes the buffer out for its duration ([`Staging`]) instead of holding an async
    /// lock, which cost a semaphore acquire and release per packet.
    staging: Mutex<Vec<u8>>,
    /// Shared with this loop's relay-socket generator (RESERVATION-TOKEN).
    reserved: ReservedSlot,
}

impl UdpFront {
    /// Wraps a bound socket.
    pub fn new(
        socket: UdpSocket,
        gate: Arc<Gate>,
        front: Arc<FrontShared>,
        shutdown: watch::Receiver<bool>,
    ) -> std::io::Result<Self> {
        let local = socket.local_addr()?;
        Ok(UdpFront {
            socket: Arc::new(socket),
            local,
            gate,
            front,
            primed: watch::channel(false).0,
            injected: Mutex::new(None),
            has_injected: AtomicBool::new(false),
            wake: Notify::new(),
            shutdown,
            staging: Mutex::new(vec![0; STAGING]),
            reserved: ReservedSlot::default(),
        })
    }

    /// The slot this front fills for its generator.
    pub fn reserved_slot(&self) -> ReservedSlot {
        Arc::clone(&self.reserved)
    }

    /// Makes the engine process `packet` as if it came from [`PRIMING_ADDR`].
    pub fn inject(&self, packet: Vec<u8>) {
        *self.injected.lock().unwrap_or_else(|p| p.into_inner()) = Some(packet);
        self.has_injected.store(true, Ordering::Release);
        self.wake.notify_one();
    }

    /// Resolves once the engine has answered a priming request injected here with a nonce.
    pub async fn primed(&self) {
        let mut rx = self.primed.subscribe();
        let _ = rx.wait_for(|p| *p).await;
    }

    fn take_injected(&self) -> Option<Vec<u8>> {
        if !self.has_injected.swap(false, Ordering::AcqRel) {
            return None;
        }
        self.injected
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }
}

/// The staging buffer, taken out of its [`UdpFront`] for one `recv_from` and put back when that
/// call ends or is dropped.
struct Staging<'a> {
    home: &'a Mutex<Vec<u8>>,
    buf: Vec<u8>,
}

impl<'a> Staging<'a> {
    fn take(home: &'a Mutex<Vec<u8>>) -> Self {
        let mut buf = std::mem::take(&mut *home.lock().unwrap_or_else(|p| p.into_inner()));
        if buf.len() < STAGING {
            // Only if the engine ever called recv_from twice at once: the second call gets its own.
            buf = vec![0; STAGING];
        }
        Staging { home, buf }
    }
}

impl Drop for Staging<'_> {
    fn drop(&mut self) {
        *self.home.lock().unwrap_or_else(|p| p.into_inner()) = std::mem::take(&mut self.buf);
    }
}

fn closed() -> webrtc_util::Error {
    webrtc_util::Error::ErrUseClosedNetworkConn
}

#[async_trait]
impl Conn for UdpFront {
    async fn connect(&self, _addr: SocketAddr) -> webrtc_util::Result<()> {
        Err(std::io::Error::other("listening sockets are not connected").into())
    }

    async fn recv(&self, _buf: &mut [u8]) -> webrtc_util::Result<usize> {
        Err(std::io::Error::other("use recv_from").into())
    }

    async fn recv_from(&self, buf: &mut [u8]) -> webrtc_util::Result<(usize, SocketAddr)> {
        let mut staging = Staging::take(&self.staging);
        let staging = &mut staging.buf;
        // The previous request has been handled: a reserved socket it did not use is released.
        self.reserved
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        loop {
            if *self.shutdown.borrow() {
                return Err(closed());
            }
            if let Some(p) = self.take_injected() {
                let n = p.len().min(buf.len());
                buf[..n].copy_from_slice(&p[..n]);
                return Ok((n, PRIMING_ADDR));
            }
            // Under load a datagram is usually queued already: take it without building the
            // select! below, whose shutdown and wake futures cost more per packet than the gate
            // (see docs/PERFORMANCE-TURN.md). Only an empty socket waits.
            let received = match self.socket.try_recv_from(staging) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    let mut shutdown = self.shutdown.clone();
                    tokio::select! {
                        biased;
                        _ = shutdown.changed() => return Err(closed()),
                        _ = self.wake.notified() => continue,
                        r = self.socket.recv_from(staging) => r,
                    }
                }
                r => r,
            };
            let (n, src) = match received {
                Ok(v) => v,
                // ICMP errors from earlier sends surface here on some systems; they concern
                // one client, not the listener, which must keep serving everyone else.
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::ConnectionReset
                            | std::io::ErrorKind::ConnectionRefused
                            | std::io::ErrorKind::Interrupted
                    ) =>
                {
                    continue
                }
                Err(e) => return Err(e.into()),
            };
            let packet = &staging[..n];
            let forward =
                match self
                    .front
                    .inbound(&self.gate, packet, src, self.local, &self.reserved)
                {
                    Inbound::Engine(forward) => forward,
                    Inbound::Reply(v) => {
                        let _ = self.socket.send_to(&v, src).await;
                        continue;
                    }
                    Inbound::Dropped => continue,
                };
            if forward.len() > buf.len() {
                // Too large for the engine: relay it on its bound channel ourselves.
                let key = (Transport::Udp, src, self.local);
                self.front.relay_oversized(&key, &forward).await;
                continue;
            }
            buf[..forward.len()].copy_from_slice(&forward);
            return Ok((forward.len(), src));
        }
    }

    async fn send(&self, _buf: &[u8]) -> webrtc_util::Result<usize> {
        Err(std::io::Error::other("use send_to").into())
    }

    async fn send_to(&self, buf: &[u8], target: SocketAddr) -> webrtc_util::Result<usize> {
        let path = || ClientPath::Udp {
            socket: Arc::clone(&self.socket),
            client: target,
        };
        match self
            .front
            .outbound(&self.gate, buf, target, self.local, path)
        {
            Outbound::Swallow => return Ok(buf.len()),
            Outbound::Primed => {
                self.primed.send_replace(true);
                return Ok(buf.len());
            }
            _ => {}
        }
        // As in `PeerSocket::send_to`: try first, wait through a poll function (small future).
        match self.socket.try_send_to(buf, target) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                Ok(std::future::poll_fn(|cx| self.socket.poll_send_to(cx, buf, target)).await?)
            }
            r => Ok(r?),
        }
    }

    fn local_addr(&self) -> webrtc_util::Result<SocketAddr> {
        Ok(self.local)
    }

    fn remote_addr(&self) -> Option<SocketAddr> {
        None
    }

    async fn close(&self) -> webrtc_util::Result<()> {
        // The engine calls this on its listener Conn whenever *an allocation* closes; closing the
        // listener then would cut every other client. The relay's shutdown path closes it instead.
        Ok(())
    }

    fn as_any(&self) -> &(dyn std::any::Any + Send + Sync) {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_staging_buffer_goes_back_when_a_receive_ends_or_is_dropped() {
        let home = Mutex::new(vec![0; STAGING]);
        let ptr = home.lock().unwrap().as_ptr();
        {
            let first = Staging::take(&home);
            assert_eq!(first.buf.as_ptr(), ptr, "the one buffer is reused");
            assert!(home.lock().unwrap().is_empty());
            // A second receive at the same time (the engine never does this) gets its own.
            let second = Staging::take(&home);
            assert_eq!(second.buf.len(), STAGING);
            assert_ne!(second.buf.as_ptr(), ptr);
        }
        assert_eq!(home.lock().unwrap().len(), STAGING);
    }
}
