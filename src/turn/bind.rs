//! Binding the relay's UDP sockets — listeners, relay sockets and reserved ports — with its socket
//! options: SO_RCVBUF (with a warning when the kernel grants less), SO_REUSEPORT for listener
//! siblings, IPV6_V6ONLY for IPv6.
//!
//! This module only binds; what a socket is for is decided by its caller.

use std::net::SocketAddr;

use tokio::net::UdpSocket;

/// Binds a non-blocking UDP socket with SO_RCVBUF set and, for listener sockets, SO_REUSEPORT so
/// several read loops can share one port.
pub fn bind_udp(
    addr: SocketAddr,
    reuse_port: bool,
    recv_buffer_bytes: usize,
) -> std::io::Result<UdpSocket> {
    UdpSocket::from_std(bind_udp_std(addr, reuse_port, recv_buffer_bytes)?)
}

/// [`bind_udp`] without the tokio registration (usable outside a runtime, e.g. for reservations).
pub fn bind_udp_std(
    addr: SocketAddr,
    reuse_port: bool,
    recv_buffer_bytes: usize,
) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    if recv_buffer_bytes > 0 {
        // The kernel caps this at net.core.rmem_max; a smaller buffer is not fatal.
        if let Err(e) = socket.set_recv_buffer_size(recv_buffer_bytes) {
            tracing::warn!(%addr, "could not set SO_RCVBUF to {recv_buffer_bytes}: {e}");
        }
        // Linux reports twice what it grants and silently caps at net.core.rmem_max.
        let granted = socket.recv_buffer_size().unwrap_or(0) / 2;
        static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        if granted < recv_buffer_bytes && !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
            tracing::warn!(
                "TURN sockets got a {granted}-byte receive buffer instead of {recv_buffer_bytes}; \
                 raise net.core.rmem_max (sysctl) or bursts will be dropped"
            );
        }
    }
    socket.bind(&addr.into())?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}
