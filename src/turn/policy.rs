//! Which peer addresses the relay may send to (the CVE-2020-26262 / CVE-2026-27624 class: a TURN
//! relay that forwards to `127.0.0.1`, `169.254.169.254` or the LAN behind it is an open door into the
//! operator's network).
//!
//! This module owns the decision only: [`PeerPolicy::check`] is a pure function of an address. It
//! must never do I/O, resolve names, or allocate per call — it runs on every CreatePermission and
//! ChannelBind and, as defence in depth, on every datagram a relay socket sends.
//!
//! Every IPv4-in-IPv6 form is normalised to IPv4 *before* any range is consulted, so
//! `::ffff:127.0.0.1`, `::127.0.0.1`, `::ffff:0:127.0.0.1` (SIIT), `2002:7f00:1::`,
//! `64:ff9b::7f00:1`, `64:ff9b:1::7f00:1` and a Teredo address whose client is `127.0.0.1` are all
//! judged as `127.0.0.1` (a Teredo address's server IPv4 is judged too).
//!
//! The relay's own addresses ([`OwnAddresses`]) are refused as peers — a client must not reach the
//! relay's listeners or any other daemon on its host through it — except a live relayed address of
//! this same relay, so that two relayed callers can talk through it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::OnceLock;

use ipnet::IpNet;

/// Why a peer address was refused; reported in logs and counted in metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PeerRefusal {
    /// The address is in a `denied-peer-ip` range.
    #[error("the peer address is in a denied-peer-ip range")]
    Denied,
    /// Loopback (127/8, ::1): the relay host itself.
    #[error("the peer address is loopback, i.e. the relay host itself")]
    Loopback,
    /// Unspecified or "this network" (0.0.0.0/8, ::), which Linux routes to the host itself.
    #[error("the peer address is unspecified (0.0.0.0/8 or ::), which reaches the relay host")]
    Unspecified,
    /// Link-local (169.254/16, fe80::/10), including cloud metadata at 169.254.169.254.
    #[error("the peer address is link-local (including cloud metadata services)")]
    LinkLocal,
    /// Multicast (224/4, ff00::/8).
    #[error("the peer address is multicast")]
    Multicast,
    /// Broadcast (255.255.255.255) and the reserved 240/4 block.
    #[error("the peer address is broadcast or reserved (240.0.0.0/4)")]
    Broadcast,
    /// A private network (RFC 1918, CGNAT 100.64/10, ULA fc00::/7, site-local fec0::/10, NAT64
    /// local-use 64:ff9b:1::/48); allowed only with `allow_private_peers` or an `allowed-peer-ip`.
    #[error("the peer address is on a private network")]
    Private,
    /// One of the relay host's own addresses (see [`OwnAddresses`]) that is not a live relayed
    /// address of this relay.
    #[error("the peer address is the relay host itself and not a live relayed address")]
    OwnAddress,
}

/// The relay host's own addresses, for refusing them as peers: every address the relay listens
/// on (every interface address when it listens on an unspecified one), its relay IPs (bound and
/// advertised) and its external IPs. Known only once the listeners are bound, so it is given to
/// a [`PeerFilter`] after start with [`PeerFilter::set_own_addresses`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OwnAddresses {
    /// Normalised, sorted, deduplicated host addresses.
    ips: Vec<IpAddr>,
    /// Where relay sockets bind (normalised); an unspecified one means every host address.
    relay_ips: Vec<IpAddr>,
    /// The bound listening sockets (UDP, TCP, TLS); refused even where `allowed-peer-ip` opens
    /// their IP.
    listeners: Vec<SocketAddr>,
}

impl OwnAddresses {
    /// Own addresses from the host's `ips`, the `relay_ips` relay sockets bind to (also host
    /// addresses) and the bound `listeners` (their specific IPs are host addresses too).
    pub fn new(
        ips: impl IntoIterator<Item = IpAddr>,
        relay_ips: impl IntoIterator<Item = IpAddr>,
        listeners: impl IntoIterator<Item = SocketAddr>,
    ) -> Self {
        let listeners: Vec<SocketAddr> = listeners.into_iter().collect();
        let mut relay_ips: Vec<IpAddr> = relay_ips.into_iter().map(normalize).collect();
        relay_ips.sort_unstable();
        relay_ips.dedup();
        let mut all: Vec<IpAddr> = ips
            .into_iter()
            .chain(relay_ips.iter().copied())
            .chain(listeners.iter().map(SocketAddr::ip))
            .map(normalize)
            .filter(|ip| !ip.is_unspecified())
            .collect();
        all.sort_unstable();
        all.dedup();
        OwnAddresses {
            ips: all,
            relay_ips,
            listeners,
        }
    }

    /// Whether the normalised `ip` is one of the host's.
    fn holds(&self, ip: IpAddr) -> bool {
        self.ips.contains(&ip)
    }

    /// Whether relay sockets can be bound on the normalised `ip`.
    fn relays_on(&self, ip: IpAddr) -> bool {
        self.relay_ips
            .iter()
            .any(|r| *r == ip || r.is_unspecified())
    }

    /// Whether `peer` (IP normalised) is one of the relay's listening sockets.
    fn is_listener(&self, ip: IpAddr, port: u16) -> bool {
        self.listeners
            .iter()
            .any(|l| l.port() == port && (l.ip().is_unspecified() || normalize(l.ip()) == ip))
    }
}

/// The relay's rule for peer addresses, in coturn's vocabulary. The default refuses every
/// non-public destination; operators open holes explicitly.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerPolicy {
    /// `allowed-peer-ip`: ranges relayed to even if they are denied or special (this is the explicit
    /// opt-in for, say, a media server on the LAN, or loopback in tests). Takes precedence over
    /// everything else, as in coturn.
    pub allowed: Vec<IpNet>,
    /// `denied-peer-ip`: extra ranges refused on top of the built-in ones.
    pub denied: Vec<IpNet>,
    /// Opens RFC 1918, CGNAT and ULA/site-local wholesale (for a relay serving one private network).
    /// Loopback, link-local, unspecified, multicast and broadcast stay refused.
    pub allow_private_peers: bool,
}

impl PeerPolicy {
    /// Decides whether the relay may send to `ip` (after normalising IPv4-in-IPv6 forms; a Teredo
    /// address's server IPv4 must pass too).
    pub fn check(&self, ip: IpAddr) -> Result<(), PeerRefusal> {
        self.check_normalized(normalize(ip))?;
        match teredo_server(ip) {
            Some(server) => self.check_normalized(IpAddr::V4(server)),
            None => Ok(()),
        }
    }

    fn check_normalized(&self, ip: IpAddr) -> Result<(), PeerRefusal> {
        // Ranges are configured in either family; compare against both the normalised address and
        // the raw one so an allowed `::ffff:10.0.0.0/104` still matches.
        if self.allowed.iter().any(|net| net_contains(net, ip)) {
            return Ok(());
        }
        if self.denied.iter().any(|net| net_contains(net, ip)) {
            return Err(PeerRefusal::Denied);
        }
        match classify(ip) {
            None => Ok(()),
            Some(PeerRefusal::Private) if self.allow_private_peers => Ok(()),
            Some(reason) => Err(reason),
        }
    }
}

impl PeerPolicy {
    /// Compiles the configured ranges into sorted, merged intervals for [`PeerFilter::check`],
    /// which the per-packet path uses: a binary search instead of a scan of every range.
    pub fn compile(&self) -> PeerFilter {
        PeerFilter {
            allowed: intervals(&self.allowed),
            denied: intervals(&self.denied),
            allow_private_peers: self.allow_private_peers,
            own: OnceLock::new(),
        }
    }
}

/// [`PeerPolicy`] compiled for the hot path. Decides exactly as [`PeerPolicy::check`] does (a test
/// sweeps both), in O(log ranges).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerFilter {
    allowed: Vec<(u128, u128)>,
    denied: Vec<(u128, u128)>,
    allow_private_peers: bool,
    /// The relay's own addresses, once its listeners are bound.
    own: OnceLock<OwnAddresses>,
}

impl PeerFilter {
    /// Gives the filter the relay's own addresses (once; later calls are ignored and return
    /// false). Until then [`PeerFilter::check_peer`] judges by the policy alone.
    pub fn set_own_addresses(&self, own: OwnAddresses) -> bool {
        self.own.set(own).is_ok()
    }

    /// Decides whether the relay may send to the transport address `peer`: the relay's own
    /// addresses are refused unless `peer` is a live relayed address of this relay
    /// (`is_relayed`, asked only for own addresses, with the IP normalised), or an `allowed-peer-ip` opens its IP and it
    /// is not one of the relay's listening sockets; every other address is judged by
    /// [`PeerFilter::check`].
    pub fn check_peer(
        &self,
        peer: SocketAddr,
        is_relayed: impl FnOnce(SocketAddr) -> bool,
    ) -> Result<(), PeerRefusal> {
        let ip = normalize(peer.ip());
        if let Some(own) = self.own.get() {
            if own.holds(ip) {
                if own.relays_on(ip) && is_relayed(SocketAddr::new(ip, peer.port())) {
                    return Ok(());
                }
                let allowed = in_intervals(&self.allowed, as_u128(ip));
                if !allowed || own.is_listener(ip, peer.port()) {
                    return Err(PeerRefusal::OwnAddress);
                }
                return Ok(());
            }
        }
        self.check_normalized(ip)?;
        match teredo_server(peer.ip()) {
            Some(server) => self.check_normalized(IpAddr::V4(server)),
            None => Ok(()),
        }
    }

    /// Decides whether the relay may send to `ip` (after normalising IPv4-in-IPv6 forms; a Teredo
    /// address's server IPv4 must pass too). Knows nothing of the relay's own addresses; see
    /// [`PeerFilter::check_peer`].
    pub fn check(&self, ip: IpAddr) -> Result<(), PeerRefusal> {
        self.check_normalized(normalize(ip))?;
        match teredo_server(ip) {
            Some(server) => self.check_normalized(IpAddr::V4(server)),
            None => Ok(()),
        }
    }

    fn check_normalized(&self, ip: IpAddr) -> Result<(), PeerRefusal> {
        let key = as_u128(ip);
        if in_intervals(&self.allowed, key) {
            return Ok(());
        }
        if in_intervals(&self.denied, key) {
            return Err(PeerRefusal::Denied);
        }
        match classify(ip) {
            None => Ok(()),
            Some(PeerRefusal::Private) if self.allow_private_peers => Ok(()),
            Some(reason) => Err(reason),
        }
    }
}

/// IPv4 is placed at its IPv4-mapped position, so IPv4 and IPv6 ranges share one line (as
/// `net_contains` treats an IPv6 range as covering mapped IPv4).
fn as_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u128::from(a.to_ipv6_mapped()),
        IpAddr::V6(a) => u128::from(a),
    }
}

fn intervals(nets: &[IpNet]) -> Vec<(u128, u128)> {
    let mut v: Vec<(u128, u128)> = nets
        .iter()
        .map(|n| (as_u128(n.network()), as_u128(n.broadcast())))
        .collect();
    v.sort_unstable();
    let mut merged: Vec<(u128, u128)> = Vec::with_capacity(v.len());
    for (lo, hi) in v {
        match merged.last_mut() {
            Some(last) if lo <= last.1.saturating_add(1) => last.1 = last.1.max(hi),
            _ => merged.push((lo, hi)),
        }
    }
    merged
}

fn in_intervals(intervals: &[(u128, u128)], key: u128) -> bool {
    // The first interval starting after `key`; the one before it is the only candidate.
    let i = intervals.partition_point(|(lo, _)| *lo <= key);
    i > 0 && intervals[i - 1].1 >= key
}

fn net_contains(net: &IpNet, ip: IpAddr) -> bool {
    match (net, ip) {
        (IpNet::V4(n), IpAddr::V4(a)) => n.contains(&a),
        (IpNet::V6(n), IpAddr::V6(a)) => n.contains(&a),
        (IpNet::V6(n), IpAddr::V4(a)) => n.contains(&a.to_ipv6_mapped()),
        (IpNet::V4(_), IpAddr::V6(_)) => false,
    }
}

/// The server IPv4 of a Teredo address (RFC 4380: `2001:0000::/32`, server in bits 32–63).
pub fn teredo_server(ip: IpAddr) -> Option<Ipv4Addr> {
    match ip {
        IpAddr::V6(v6) if v6.segments()[..2] == [0x2001, 0] => {
            let o = v6.octets();
            Some(Ipv4Addr::new(o[4], o[5], o[6], o[7]))
        }
        _ => None,
    }
}

/// Maps every IPv4-in-IPv6 form to the IPv4 address it reaches: IPv4-mapped `::ffff:a.b.c.d`,
/// IPv4-translated (SIIT, RFC 2765) `::ffff:0:a.b.c.d`, IPv4-compatible `::a.b.c.d` (except `::`
/// and `::1`), 6to4 `2002:aabb:ccdd::/48`, Teredo `2001:0::/32` (the client's IPv4, stored
/// inverted in the last 32 bits; see [`teredo_server`] for the other one), NAT64 well-known
/// `64:ff9b::/96` and local-use `64:ff9b:1::/48` (RFC 8215; the /96 layout when bits 48–95 are
/// zero, otherwise the RFC 6052 /48 layout). Anything else is returned unchanged.
pub fn normalize(ip: IpAddr) -> IpAddr {
    let v6 = match ip {
        IpAddr::V4(_) => return ip,
        IpAddr::V6(v6) => v6,
    };
    let o = v6.octets();
    let seg = v6.segments();
    let v4 = |a: u8, b: u8, c: u8, d: u8| IpAddr::V4(Ipv4Addr::new(a, b, c, d));
    if seg[..5] == [0, 0, 0, 0, 0] && seg[5] == 0xffff {
        return v4(o[12], o[13], o[14], o[15]);
    }
    if seg[..4] == [0; 4] && seg[4] == 0xffff && seg[5] == 0 {
        return v4(o[12], o[13], o[14], o[15]);
    }
    if seg[..6] == [0; 6] && !(seg[6] == 0 && seg[7] <= 1) {
        return v4(o[12], o[13], o[14], o[15]);
    }
    if seg[..2] == [0x2001, 0] {
        return v4(!o[12], !o[13], !o[14], !o[15]);
    }
    if seg[0] == 0x2002 {
        return v4(o[2], o[3], o[4], o[5]);
    }
    if seg[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return v4(o[12], o[13], o[14], o[15]);
    }
    if seg[..3] == [0x64, 0xff9b, 1] {
        if seg[3..6] == [0, 0, 0] {
            return v4(o[12], o[13], o[14], o[15]);
        }
        // RFC 6052 /48: bits 48..63 then (skipping the u-octet at 64..71) bits 72..87.
        return v4(o[6], o[7], o[9], o[10]);
    }
    ip
}

/// The built-in classification of a normalised address, or `None` if it is public.
fn classify(ip: IpAddr) -> Option<PeerRefusal> {
    match ip {
        IpAddr::V4(a) => classify_v4(a),
        IpAddr::V6(a) => classify_v6(a),
    }
}

fn classify_v4(a: Ipv4Addr) -> Option<PeerRefusal> {
    let [b0, b1, _, _] = a.octets();
    if b0 == 0 {
        Some(PeerRefusal::Unspecified)
    } else if b0 == 127 {
        Some(PeerRefusal::Loopback)
    } else if b0 == 169 && b1 == 254 {
        Some(PeerRefusal::LinkLocal)
    } else if (224..=239).contains(&b0) {
        Some(PeerRefusal::Multicast)
    } else if b0 >= 240 {
        Some(PeerRefusal::Broadcast)
    } else if b0 == 10
        || (b0 == 172 && (16..=31).contains(&b1))
        || (b0 == 192 && b1 == 168)
        || (b0 == 100 && (64..=127).contains(&b1))
    {
        Some(PeerRefusal::Private)
    } else {
        None
    }
}

fn classify_v6(a: Ipv6Addr) -> Option<PeerRefusal> {
    let s0 = a.segments()[0];
    if a.is_unspecified() {
        Some(PeerRefusal::Unspecified)
    } else if a.is_loopback() {
        Some(PeerRefusal::Loopback)
    } else if s0 & 0xffc0 == 0xfe80 {
        Some(PeerRefusal::LinkLocal)
    } else if s0 & 0xff00 == 0xff00 {
        Some(PeerRefusal::Multicast)
    } else if s0 & 0xfe00 == 0xfc00 || s0 & 0xffc0 == 0xfec0 {
        Some(PeerRefusal::Private)
    } else if a.segments()[..3] == [0x64, 0xff9b, 1] {
        // Only reachable for addresses normalize() could not map (it maps the whole /48); kept
        // so the classification stands on its own.
        Some(PeerRefusal::Private)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn refuses_every_special_ipv4_range_by_default() {
        let p = PeerPolicy::default();
        let cases = [
            ("127.0.0.1", PeerRefusal::Loopback),
            ("127.255.255.254", PeerRefusal::Loopback),
            ("0.0.0.0", PeerRefusal::Unspecified),
            ("0.1.2.3", PeerRefusal::Unspecified),
            ("169.254.169.254", PeerRefusal::LinkLocal),
            ("169.254.0.1", PeerRefusal::LinkLocal),
            ("224.0.0.1", PeerRefusal::Multicast),
            ("239.255.255.250", PeerRefusal::Multicast),
            ("255.255.255.255", PeerRefusal::Broadcast),
            ("240.0.0.1", PeerRefusal::Broadcast),
            ("10.0.0.1", PeerRefusal::Private),
            ("10.255.255.255", PeerRefusal::Private),
            ("172.16.0.1", PeerRefusal::Private),
            ("172.31.255.255", PeerRefusal::Private),
            ("192.168.1.1", PeerRefusal::Private),
            ("100.64.0.1", PeerRefusal::Private),
            ("100.127.255.255", PeerRefusal::Private),
        ];
        for (addr, want) in cases {
            assert_eq!(p.check(ip(addr)), Err(want), "{addr}");
        }
    }

    #[test]
    fn allows_public_neighbours_of_special_ranges() {
        let p = PeerPolicy::default();
        for addr in [
            "1.1.1.1",
            "8.8.8.8",
            "9.255.255.255",
            "11.0.0.0",
            "100.63.255.255",
            "100.128.0.0",
            "126.255.255.255",
            "128.0.0.0",
            "169.253.255.255",
            "169.255.0.0",
            "172.15.255.255",
            "172.32.0.0",
            "192.167.255.255",
            "192.169.0.0",
            "223.255.255.255",
            "2001:4860:4860::8888",
            "2606:4700::1111",
        ] {
            assert_eq!(p.check(ip(addr)), Ok(()), "{addr}");
        }
    }

    #[test]
    fn refuses_every_special_ipv6_range_by_default() {
        let p = PeerPolicy::default();
        let cases = [
            ("::1", PeerRefusal::Loopback),
            ("::", PeerRefusal::Unspecified),
            ("fe80::1", PeerRefusal::LinkLocal),
            ("febf:ffff::1", PeerRefusal::LinkLocal),
            ("ff02::1", PeerRefusal::Multicast),
            ("ff0e::1", PeerRefusal::Multicast),
            ("fc00::1", PeerRefusal::Private),
            ("fd12:3456::1", PeerRefusal::Private),
            ("fec0::1", PeerRefusal::Private),
        ];
        for (addr, want) in cases {
            assert_eq!(p.check(ip(addr)), Err(want), "{addr}");
        }
    }

    #[test]
    fn normalizes_every_ipv4_in_ipv6_form_before_judging() {
        let p = PeerPolicy::default();
        let cases = [
            ("::ffff:127.0.0.1", "127.0.0.1"),
            ("::ffff:169.254.169.254", "169.254.169.254"),
            ("::ffff:0.0.0.0", "0.0.0.0"),
            ("::ffff:10.1.2.3", "10.1.2.3"),
            ("::127.0.0.1", "127.0.0.1"),
            ("::169.254.169.254", "169.254.169.254"),
            ("::10.0.0.1", "10.0.0.1"),
            ("2002:7f00:1::", "127.0.0.1"),
            ("2002:a9fe:a9fe:1234::1", "169.254.169.254"),
            ("2002:c0a8:0101::", "192.168.1.1"),
            ("64:ff9b::7f00:1", "127.0.0.1"),
            ("64:ff9b::a9fe:a9fe", "169.254.169.254"),
            ("64:ff9b::0.0.0.0", "0.0.0.0"),
            ("64:ff9b:1::7f00:1", "127.0.0.1"),
            ("64:ff9b:1:7f00:0:100::", "127.0.0.1"),
            ("64:ff9b:1:a9fe:00a9:fe00::", "169.254.169.254"),
        ];
        for (v6, v4) in cases {
            assert_eq!(normalize(ip(v6)), ip(v4), "{v6}");
            assert_eq!(p.check(ip(v6)), p.check(ip(v4)), "{v6}");
            assert!(p.check(ip(v6)).is_err(), "{v6}");
        }
        // Public IPv4 behind an IPv6 form is public.
        for v6 in ["::ffff:8.8.8.8", "2002:0808:0808::1", "64:ff9b::808:808"] {
            assert_eq!(p.check(ip(v6)), Ok(()), "{v6}");
        }
        // :: and ::1 are themselves, not 0.0.0.0 / 0.0.0.1.
        assert_eq!(normalize(ip("::")), ip("::"));
        assert_eq!(normalize(ip("::1")), ip("::1"));
        assert_eq!(normalize(ip("2001:db8::1")), ip("2001:db8::1"));
        assert_eq!(normalize(ip("1.2.3.4")), ip("1.2.3.4"));
    }

    /// A Teredo address (RFC 4380) with `server` and `client` IPv4s (the client stored inverted).
    fn teredo(server: [u8; 4], client: [u8; 4]) -> IpAddr {
        let mut o = [0u8; 16];
        o[..4].copy_from_slice(&[0x20, 0x01, 0, 0]);
        o[4..8].copy_from_slice(&server);
        o[10..12].copy_from_slice(&[0xff, 0xff]); // obfuscated port
        for (i, b) in client.iter().enumerate() {
            o[12 + i] = !b;
        }
        IpAddr::V6(Ipv6Addr::from(o))
    }

    #[test]
    fn teredo_and_siit_forms_are_judged_as_their_ipv4() {
        // RFC 4380's own example: server 65.54.227.120, client 192.0.2.45.
        let example = ip("2001:0:4136:e378:8000:63bf:3fff:fdd2");
        assert_eq!(normalize(example), ip("192.0.2.45"));
        assert_eq!(
            teredo_server(example),
            Some(Ipv4Addr::new(65, 54, 227, 120))
        );
        let public = [65, 54, 227, 120];
        let policy = PeerPolicy::default();
        let filter = policy.compile();
        let cases = [
            (teredo(public, [127, 0, 0, 1]), Err(PeerRefusal::Loopback)),
            (teredo(public, [10, 1, 2, 3]), Err(PeerRefusal::Private)),
            (
                teredo(public, [169, 254, 169, 254]),
                Err(PeerRefusal::LinkLocal),
            ),
            (
                teredo([10, 0, 0, 1], [8, 8, 8, 8]),
                Err(PeerRefusal::Private),
            ),
            (
                teredo([127, 0, 0, 1], [8, 8, 8, 8]),
                Err(PeerRefusal::Loopback),
            ),
            (teredo(public, [8, 8, 8, 8]), Ok(())),
            (ip("::ffff:0:127.0.0.1"), Err(PeerRefusal::Loopback)),
            (ip("::ffff:0:10.9.8.7"), Err(PeerRefusal::Private)),
            (ip("::ffff:0:169.254.169.254"), Err(PeerRefusal::LinkLocal)),
            (ip("::ffff:0:8.8.8.8"), Ok(())),
            // Neighbours that are neither form.
            (ip("2001:1::1"), Ok(())),
            (ip("::fffe:0:7f00:1"), Ok(())),
        ];
        for (addr, want) in cases {
            assert_eq!(policy.check(addr), want, "{addr}");
            assert_eq!(filter.check(addr), want, "{addr} (compiled)");
        }
        // An allowed range for the embedded IPv4 opens the Teredo form too.
        let open = PeerPolicy {
            allowed: vec![net("10.0.0.0/8")],
            ..Default::default()
        };
        assert_eq!(open.check(teredo(public, [10, 1, 2, 3])), Ok(()));
    }

    #[test]
    fn own_addresses_are_refused_except_live_relayed_ones() {
        let host = ip("203.0.113.10");
        let other_host_ip = ip("198.51.100.20"); // listens there too, relays on `host` only
        let own = OwnAddresses::new(
            [other_host_ip],
            [host],
            [
                SocketAddr::new(ip("0.0.0.0"), 3478),
                SocketAddr::new(host, 5349),
            ],
        );
        let relayed: SocketAddr = "203.0.113.10:50000".parse().unwrap();
        let is_relayed = |a: SocketAddr| a == relayed;
        let never = |a: SocketAddr| -> bool { panic!("asked about {a}, not an own address") };
        let at = |s: &str| -> SocketAddr { s.parse().unwrap() };

        let filter = PeerPolicy::default().compile();
        // Before the relay is bound, only the policy decides.
        assert_eq!(filter.check_peer(at("203.0.113.10:22"), never), Ok(()));
        assert!(filter.set_own_addresses(own.clone()));
        assert!(
            !filter.set_own_addresses(OwnAddresses::default()),
            "set once"
        );
        for peer in [
            "203.0.113.10:22",
            "203.0.113.10:3478",
            "203.0.113.10:5349",
            "203.0.113.10:50001",
            "[::ffff:203.0.113.10]:22",
            "[::ffff:0:203.0.113.10]:22",
            "198.51.100.20:53",
            "198.51.100.20:50000", // a relayed port, but not on a relay IP
        ] {
            assert_eq!(
                filter.check_peer(at(peer), is_relayed),
                Err(PeerRefusal::OwnAddress),
                "{peer}"
            );
        }
        assert_eq!(filter.check_peer(relayed, is_relayed), Ok(()));
        assert_eq!(
            filter.check_peer(at("[::ffff:203.0.113.10]:50000"), is_relayed),
            Ok(())
        );
        // Others are judged by the policy alone, and never looked up as relayed addresses.
        assert_eq!(filter.check_peer(at("203.0.113.11:22"), never), Ok(()));
        assert_eq!(
            filter.check_peer(at("127.0.0.1:22"), never),
            Err(PeerRefusal::Loopback)
        );

        // allowed-peer-ip opens an own IP, but never the relay's listening sockets.
        let opened = PeerPolicy {
            allowed: vec![net("203.0.113.10/32")],
            ..Default::default()
        }
        .compile();
        opened.set_own_addresses(own);
        assert_eq!(opened.check_peer(at("203.0.113.10:22"), is_relayed), Ok(()));
        assert_eq!(opened.check_peer(relayed, is_relayed), Ok(()));
        for listener in ["203.0.113.10:3478", "203.0.113.10:5349"] {
            assert_eq!(
                opened.check_peer(at(listener), is_relayed),
                Err(PeerRefusal::OwnAddress),
                "{listener}"
            );
        }
        assert_eq!(
            opened.check_peer(at("198.51.100.20:22"), is_relayed),
            Err(PeerRefusal::OwnAddress),
            "another own IP stays refused"
        );
    }

    #[test]
    fn a_relay_bound_on_every_address_relays_on_each_of_them() {
        let own = OwnAddresses::new(
            [ip("192.0.2.1"), ip("2001:db8::1")],
            [ip("0.0.0.0")],
            [SocketAddr::new(ip("0.0.0.0"), 3478)],
        );
        let filter = PeerPolicy::default().compile();
        filter.set_own_addresses(own);
        let yes = |_: SocketAddr| true;
        let no = |_: SocketAddr| false;
        for peer in ["192.0.2.1:50000", "[2001:db8::1]:50000"] {
            let peer: SocketAddr = peer.parse().unwrap();
            assert_eq!(filter.check_peer(peer, yes), Ok(()), "{peer}");
            assert_eq!(
                filter.check_peer(peer, no),
                Err(PeerRefusal::OwnAddress),
                "{peer}"
            );
        }
    }

    #[test]
    fn allowed_ranges_override_built_ins_and_denied_ranges() {
        let p = PeerPolicy {
            allowed: vec![net("127.0.0.1/32"), net("10.1.0.0/16")],
            denied: vec![net("10.0.0.0/8"), net("8.8.8.0/24")],
            allow_private_peers: false,
        };
        assert_eq!(p.check(ip("127.0.0.1")), Ok(()));
        assert_eq!(p.check(ip("::ffff:127.0.0.1")), Ok(()), "normalised first");
        assert_eq!(p.check(ip("127.0.0.2")), Err(PeerRefusal::Loopback));
        assert_eq!(p.check(ip("10.1.2.3")), Ok(()));
        assert_eq!(p.check(ip("10.2.0.1")), Err(PeerRefusal::Denied));
        assert_eq!(p.check(ip("8.8.8.8")), Err(PeerRefusal::Denied));
        assert_eq!(p.check(ip("::ffff:8.8.8.8")), Err(PeerRefusal::Denied));
        assert_eq!(p.check(ip("8.8.4.4")), Ok(()));
    }

    #[test]
    fn ipv6_ranges_match_mapped_ipv4() {
        let p = PeerPolicy {
            allowed: vec![net("::ffff:192.168.0.0/112")],
            ..Default::default()
        };
        assert_eq!(p.check(ip("192.168.5.5")), Ok(()));
        assert_eq!(p.check(ip("192.169.5.5")), Ok(()), "public anyway");
        assert_eq!(p.check(ip("192.168.255.255")), Ok(()));
        let v6_allowed = PeerPolicy {
            allowed: vec![net("fd00::/8")],
            ..Default::default()
        };
        assert_eq!(v6_allowed.check(ip("fd00::5")), Ok(()));
        assert_eq!(v6_allowed.check(ip("fc00::5")), Err(PeerRefusal::Private));
    }

    #[test]
    fn private_opt_in_opens_private_ranges_only() {
        let p = PeerPolicy {
            allow_private_peers: true,
            ..Default::default()
        };
        for addr in [
            "10.0.0.1",
            "172.16.0.1",
            "192.168.0.1",
            "100.64.0.1",
            "fd00::1",
            "::ffff:10.0.0.1",
        ] {
            assert_eq!(p.check(ip(addr)), Ok(()), "{addr}");
        }
        for addr in [
            "127.0.0.1",
            "::1",
            "0.0.0.0",
            "169.254.169.254",
            "fe80::1",
            "224.0.0.1",
            "255.255.255.255",
        ] {
            assert!(p.check(ip(addr)).is_err(), "{addr}");
        }
        // A denied range still wins over the blanket private opt-in.
        let p = PeerPolicy {
            denied: vec![net("10.0.0.0/8")],
            allow_private_peers: true,
            ..Default::default()
        };
        assert_eq!(p.check(ip("10.0.0.1")), Err(PeerRefusal::Denied));
    }

    #[test]
    fn compiled_filter_decides_exactly_like_the_policy() {
        let policies = [
            PeerPolicy::default(),
            PeerPolicy {
                allowed: [
                    "127.0.0.1/32",
                    "10.1.0.0/16",
                    "::ffff:192.168.0.0/112",
                    "fd00::/8",
                    "10.1.2.0/24",
                ]
                .iter()
                .map(|n| net(n))
                .collect(),
                denied: [
                    "10.0.0.0/8",
                    "8.8.8.0/24",
                    "8.8.9.0/24",
                    "2001:db8::/32",
                    "0.0.0.0/0",
                ]
                .iter()
                .map(|n| net(n))
                .collect(),
                allow_private_peers: false,
            },
            PeerPolicy {
                denied: vec![net("8.8.0.0/16")],
                allow_private_peers: true,
                ..Default::default()
            },
        ];
        let mut addrs: Vec<IpAddr> = Vec::new();
        for a in 0u8..=255 {
            for b in [0u8, 1, 8, 9, 63, 64, 127, 168, 169, 254, 255] {
                for c in [0u8, 1, 2, 255] {
                    let v4 = Ipv4Addr::new(a, b, c, 1);
                    addrs.push(IpAddr::V4(v4));
                    addrs.push(IpAddr::V6(v4.to_ipv6_mapped()));
                }
            }
        }
        for v6 in [
            "::1",
            "::",
            "fe80::1",
            "fd00::1",
            "fc00::1",
            "2001:db8::1",
            "2001:db9::1",
            "ff02::1",
            "2002:a00:1::",
            "64:ff9b::808:808",
        ] {
            addrs.push(ip(v6));
        }
        for p in &policies {
            let f = p.compile();
            for a in &addrs {
                assert_eq!(f.check(*a), p.check(*a), "{a} under {p:?}");
            }
        }
    }

    #[test]
    fn intervals_merge_and_search() {
        let v = intervals(&[
            net("10.0.0.0/24"),
            net("10.0.1.0/24"),
            net("10.0.0.128/25"),
            net("11.0.0.0/8"),
        ]);
        assert_eq!(v.len(), 2, "adjacent and nested ranges merge: {v:?}");
        let k = |s: &str| as_u128(ip(s));
        assert!(in_intervals(&v, k("10.0.1.255")));
        assert!(!in_intervals(&v, k("10.0.2.0")));
        assert!(in_intervals(&v, k("11.255.255.255")));
        assert!(!in_intervals(&v, k("9.255.255.255")));
        assert!(!in_intervals(&[], k("1.1.1.1")));
    }

    #[test]
    fn exhaustive_first_octet_sweep_matches_the_rfc_tables() {
        // Every /8 once, every address of the interesting /16s' first octets, in both families.
        let p = PeerPolicy::default();
        for a in 0u8..=255 {
            for b in [
                0u8, 15, 16, 31, 32, 63, 64, 127, 128, 167, 168, 169, 253, 254, 255,
            ] {
                let v4 = Ipv4Addr::new(a, b, 1, 1);
                let special = a == 0
                    || a == 10
                    || a == 127
                    || a >= 224
                    || (a == 100 && (64..128).contains(&b))
                    || (a == 169 && b == 254)
                    || (a == 172 && (16..32).contains(&b))
                    || (a == 192 && b == 168);
                let got = p.check(IpAddr::V4(v4));
                assert_eq!(got.is_err(), special, "{v4}");
                assert_eq!(p.check(IpAddr::V6(v4.to_ipv6_mapped())), got, "{v4} mapped");
                let nat64 = Ipv6Addr::from((0x0064_ff9b_u128 << 96) | u128::from(u32::from(v4)));
                assert_eq!(p.check(IpAddr::V6(nat64)), got, "{nat64}");
            }
        }
    }
}
