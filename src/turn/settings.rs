//! [`TurnSettings`]: every knob of the embedded relay, named after coturn's options, with defaults that
//! are safe on the public internet. This is the gateway config's `turn.relay` section (its
//! defaults are the config's); nothing here reads files or the environment.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use ipnet::IpNet;

use super::credentials::DEFAULT_CREDENTIAL_TTL;
use super::error::TurnError;
use super::policy::{OwnAddresses, PeerPolicy};

/// coturn's `external-ip=public/private`: the relay binds on `private` but tells clients `public`
/// (1:1 NAT, e.g. a cloud VM with an elastic IP).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExternalIp {
    /// The address clients and peers see; advertised in XOR-RELAYED-ADDRESS.
    pub public: IpAddr,
    /// The local address relay sockets bind to. `None` means "the relay IP" (see
    /// [`TurnSettings::relay_ip`]).
    pub private: Option<IpAddr>,
}

/// Where relay sockets of one address family bind, and what they advertise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayIp {
    /// The local address relay sockets bind to.
    pub bind: IpAddr,
    /// The address put in XOR-RELAYED-ADDRESS.
    pub advertised: IpAddr,
}

/// Relay addresses per family (RFC 6156): IPv4, IPv6, or both for a dual-stack relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RelayIps {
    /// Where IPv4 allocations live, if the relay has them.
    pub ipv4: Option<RelayIp>,
    /// Where IPv6 allocations live, if the relay has them.
    pub ipv6: Option<RelayIp>,
}

impl RelayIps {
    /// The relay address for IPv4 (`true`) or IPv6 (`false`) allocations.
    pub fn for_family(&self, ipv4: bool) -> Option<RelayIp> {
        if ipv4 {
            self.ipv4
        } else {
            self.ipv6
        }
    }
}

/// Everything the relay needs to start. Build it with `TurnSettings::default()` and override fields.
/// Its `Debug` output redacts the auth secrets.
#[derive(Clone)]
pub struct TurnSettings {
    /// Master switch; when false [`Relay::start`](super::Relay::start) binds nothing.
    pub enabled: bool,
    /// `realm`: sent in 401 challenges and mixed into the long-term key.
    pub realm: String,
    /// `listening-ip`: addresses every listener binds on. A wildcard (`0.0.0.0`, `::`) stands for
    /// every address of that family this host has when the relay starts, each bound on its own
    /// socket (see [`TurnSettings::listening_addrs`]), so an answer always leaves from the address
    /// its request came to. Default `[0.0.0.0, ::]`: every address of the host, as coturn does.
    pub listening_ips: Vec<IpAddr>,
    /// `listening-port` for UDP; `None` turns the UDP listener off. Default 3478.
    pub udp_port: Option<u16>,
    /// `listening-port` for TCP; `None` turns the TCP listener off. Default 3478.
    pub tcp_port: Option<u16>,
    /// `tls-listening-port` for `turns:`; `None` turns it off. Also off when no TLS acceptor is
    /// passed to `Relay::start`. Default 5349.
    pub tls_port: Option<u16>,
    /// How many SO_REUSEPORT UDP sockets share each UDP listening address, each with its own read
    /// loop, so one loop is not the bottleneck. Default: the number of CPUs, at most 8.
    pub udp_sockets: usize,
    /// Receive buffer asked for on every listening and relay socket. The OS default (208 KiB on
    /// Linux) drops 21–29 % of bursty traffic; coturn asks for 4 MiB. The kernel may cap it at
    /// `net.core.rmem_max`.
    pub recv_buffer_bytes: usize,
    /// `relay-ip`: the local address relay sockets bind to. `None`: the first listening IP, or
    /// `0.0.0.0` if that is unspecified.
    pub relay_ip: Option<IpAddr>,
    /// A second `relay-ip`, IPv6, for a dual-stack relay when the first is IPv4: clients asking
    /// for an IPv6 relayed address (REQUESTED-ADDRESS-FAMILY, RFC 6156) get one here. `None`: the
    /// relay only has the first relay IP's family.
    pub relay_ipv6: Option<IpAddr>,
    /// `external-ip`: the public address to advertise when the relay sits behind 1:1 NAT.
    pub external_ip: Option<ExternalIp>,
    /// `min-port`: lowest relay port. Default 49152.
    pub min_port: u16,
    /// `max-port`: highest relay port (inclusive). Default 65535.
    pub max_port: u16,
    /// `static-auth-secret`(s) of the TURN REST API, newest first. Required.
    pub auth_secrets: Vec<String>,
    /// Lifetime of credentials issued to clients. Default one hour.
    pub credential_ttl: Duration,
    /// `user-quota`: concurrent allocations per REST user. Default 10.
    pub user_quota: usize,
    /// `total-quota`: concurrent allocations in total. Default 10 000.
    pub total_quota: usize,
    /// `allocations-per-ip`: allocations one client address may hold (IPv6: one /64), so one
    /// address cannot take the total quota with many anonymous users. `None` means 1 % of
    /// `total_quota` (at least 1); see [`TurnSettings::allocations_per_ip`].
    pub allocations_per_ip: Option<usize>,
    /// Distinct peer IPs one allocation may have permissions for at once (the engine has no limit,
    /// so one credential could otherwise create permissions, and timer tasks, without bound).
    /// Default 64; WebRTC needs a handful.
    pub max_permissions_per_allocation: usize,
    /// `max-bps` per allocation, in bytes per second each way; `None` for no cap.
    pub max_bytes_per_sec: Option<u32>,
    /// Unauthenticated STUN requests (no or bad MESSAGE-INTEGRITY, Binding) accepted per source IP
    /// per second; beyond it they are dropped unanswered.
    pub unauthenticated_per_ip_per_sec: u32,
    /// `allowed-peer-ip`: ranges relayed to even though they are special or denied.
    pub allowed_peer_ips: Vec<IpNet>,
    /// `denied-peer-ip`: extra ranges never relayed to.
    pub denied_peer_ips: Vec<IpNet>,
    /// Opens RFC 1918, CGNAT and ULA peers (`--allow-private-peers`); loopback, link-local and
    /// metadata addresses stay refused.
    pub allow_private_peers: bool,
    /// Concurrent TCP plus TLS client connections; beyond it new ones are closed at once.
    pub max_stream_connections: usize,
    /// Concurrent TCP plus TLS connections from one source IP.
    pub max_stream_connections_per_ip: usize,
    /// How long a TLS client may take to finish its handshake, and any stream client to get its
    /// first authenticated request answered (until then it is closed at this deadline whatever
    /// it sends).
    pub tls_handshake_timeout: Duration,
    /// How long a TCP/TLS connection may stay silent before it is closed. RFC 8656 clients refresh
    /// well within the 10-minute default allocation lifetime.
    pub stream_idle_timeout: Duration,
    /// Bytes queued towards one TCP/TLS client before further frames are dropped and counted
    /// (`turn_dropped_packets_total{reason="client_queue_full"}`). Default 256 KiB.
    pub stream_write_queue_bytes: usize,
}

impl Default for TurnSettings {
    fn default() -> Self {
        TurnSettings {
            enabled: true,
            realm: "callgate".to_owned(),
            listening_ips: vec![
                IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            ],
            udp_port: Some(3478),
            tcp_port: Some(3478),
            tls_port: Some(5349),
            udp_sockets: std::thread::available_parallelism()
                .map_or(1, |n| n.get())
                .clamp(1, 8),
            recv_buffer_bytes: 4 << 20,
            relay_ip: None,
            relay_ipv6: None,
            external_ip: None,
            min_port: 49152,
            max_port: 65535,
            auth_secrets: Vec::new(),
            credential_ttl: DEFAULT_CREDENTIAL_TTL,
            user_quota: 10,
            total_quota: 10_000,
            allocations_per_ip: None,
            max_permissions_per_allocation: 64,
            max_bytes_per_sec: None,
            unauthenticated_per_ip_per_sec: 20,
            allowed_peer_ips: Vec::new(),
            denied_peer_ips: Vec::new(),
            allow_private_peers: false,
            max_stream_connections: 4096,
            max_stream_connections_per_ip: 64,
            tls_handshake_timeout: Duration::from_secs(10),
            stream_idle_timeout: Duration::from_secs(15 * 60),
            stream_write_queue_bytes: super::write_queue::DEFAULT_WRITE_QUEUE_BYTES,
        }
    }
}

impl std::fmt::Debug for TurnSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TurnSettings")
            .field("enabled", &self.enabled)
            .field("realm", &self.realm)
            .field("listening_ips", &self.listening_ips)
            .field("udp_port", &self.udp_port)
            .field("tcp_port", &self.tcp_port)
            .field("tls_port", &self.tls_port)
            .field("udp_sockets", &self.udp_sockets)
            .field("recv_buffer_bytes", &self.recv_buffer_bytes)
            .field("relay_ip", &self.relay_ip)
            .field("relay_ipv6", &self.relay_ipv6)
            .field("external_ip", &self.external_ip)
            .field("min_port", &self.min_port)
            .field("max_port", &self.max_port)
            .field(
                "auth_secrets",
                &format_args!("[{} redacted]", self.auth_secrets.len()),
            )
            .field("credential_ttl", &self.credential_ttl)
            .field("user_quota", &self.user_quota)
            .field("total_quota", &self.total_quota)
            .field("allocations_per_ip", &self.allocations_per_ip)
            .field(
                "max_permissions_per_allocation",
                &self.max_permissions_per_allocation,
            )
            .field("max_bytes_per_sec", &self.max_bytes_per_sec)
            .field(
                "unauthenticated_per_ip_per_sec",
                &self.unauthenticated_per_ip_per_sec,
            )
            .field("allowed_peer_ips", &self.allowed_peer_ips)
            .field("denied_peer_ips", &self.denied_peer_ips)
            .field("allow_private_peers", &self.allow_private_peers)
            .field("max_stream_connections", &self.max_stream_connections)
            .field(
                "max_stream_connections_per_ip",
                &self.max_stream_connections_per_ip,
            )
            .field("tls_handshake_timeout", &self.tls_handshake_timeout)
            .field("stream_idle_timeout", &self.stream_idle_timeout)
            .field("stream_write_queue_bytes", &self.stream_write_queue_bytes)
            .finish()
    }
}

impl TurnSettings {
    /// The peer policy these settings describe.
    pub fn peer_policy(&self) -> PeerPolicy {
        PeerPolicy {
            allowed: self.allowed_peer_ips.clone(),
            denied: self.denied_peer_ips.clone(),
            allow_private_peers: self.allow_private_peers,
        }
    }

    /// Checks the settings for mistakes that would only show up at the first allocation.
    pub fn validate(&self) -> Result<(), TurnError> {
        let bad = |why: &str| Err(TurnError::InvalidSettings(why.to_owned()));
        if self.realm.is_empty() {
            return bad("realm must not be empty");
        }
        if self.auth_secrets.is_empty() || self.auth_secrets.iter().any(String::is_empty) {
            return bad("at least one non-empty auth secret (static-auth-secret) is required");
        }
        if self.listening_ips.is_empty() {
            return bad("at least one listening IP is required");
        }
        if self.min_port == 0 || self.max_port < self.min_port {
            return bad("min-port must be at least 1 and no greater than max-port");
        }
        if self.max_stream_connections == 0 || self.max_stream_connections_per_ip == 0 {
            return bad("max_stream_connections and its per-IP cap must be at least 1");
        }
        if self.stream_write_queue_bytes < 4096 {
            return bad("stream_write_queue_bytes must be at least 4096");
        }
        if self.max_permissions_per_allocation == 0 {
            return bad("max_permissions_per_allocation must be at least 1");
        }
        if self.user_quota == 0 || self.total_quota == 0 {
            return bad("user-quota and total-quota must be at least 1");
        }
        if self.allocations_per_ip == Some(0) {
            return bad("allocations-per-ip must be at least 1");
        }
        if self.unauthenticated_per_ip_per_sec == 0 {
            return bad("unauthenticated_per_ip_per_sec must be at least 1");
        }
        if self.max_bytes_per_sec == Some(0) {
            return bad("max-bps must be at least 1 byte per second when set");
        }
        Ok(())
    }

    /// Allocations one client address (IPv6: one /64) may hold: `allocations_per_ip`, or 1 % of
    /// `total_quota` (at least 1) when unset.
    pub fn allocations_per_ip(&self) -> usize {
        self.allocations_per_ip
            .unwrap_or((self.total_quota / 100).max(1))
    }

    /// The relay's own addresses once its listeners are bound to `listeners`: those, the relay
    /// and external IPs, and — when a listener is on an unspecified address — every address of
    /// the host's interfaces (read here, once, at start).
    pub fn own_addresses(&self, listeners: &[SocketAddr]) -> OwnAddresses {
        let mut ips: Vec<IpAddr> = Vec::new();
        if listeners.iter().any(|l| l.ip().is_unspecified())
            || self.listening_ips.iter().any(IpAddr::is_unspecified)
        {
            match if_addrs::get_if_addrs() {
                Ok(interfaces) => ips.extend(interfaces.iter().map(|i| i.ip())),
                Err(e) => tracing::warn!(
                    "cannot list the host's addresses to refuse them as TURN peers: {e}"
                ),
            }
        }
        if let Some(ExternalIp { public, private }) = self.external_ip {
            ips.push(public);
            ips.extend(private);
        }
        let relay_ips = self.relay_ips().map(|r| {
            [r.ipv4, r.ipv6]
                .into_iter()
                .flatten()
                .flat_map(|r| [r.bind, r.advertised])
                .collect::<Vec<_>>()
        });
        OwnAddresses::new(
            ips,
            relay_ips.unwrap_or_default(),
            listeners.iter().copied(),
        )
    }

    /// The addresses to bind listeners on, given the addresses this host has (`host`, as
    /// `if_addrs` reports them): each configured address as is, and each wildcard replaced by
    /// every host address of its family. IPv6 link-local addresses are left out (they need a
    /// scope to be bound and no TURN client reaches a server by one), as are multicast ones.
    /// Duplicates are dropped, order is kept. An empty result is an error: nothing to listen on.
    ///
    /// Addresses added to the host after the relay started are not listened on until a restart
    /// (coturn behaves the same); a bound address that disappears stops receiving.
    pub fn listening_addrs(&self, host: &[IpAddr]) -> Result<Vec<IpAddr>, TurnError> {
        let mut out: Vec<IpAddr> = Vec::new();
        let mut add = |ip: IpAddr| {
            if !out.contains(&ip) {
                out.push(ip);
            }
        };
        for &ip in &self.listening_ips {
            if !ip.is_unspecified() {
                add(ip);
                continue;
            }
            let expanded = host.iter().copied().filter(|h| {
                h.is_ipv4() == ip.is_ipv4()
                    && !h.is_unspecified()
                    && !h.is_multicast()
                    && !matches!(h, IpAddr::V6(v6) if v6.is_unicast_link_local())
            });
            for h in expanded {
                add(h);
            }
        }
        if out.is_empty() {
            return Err(TurnError::InvalidSettings(format!(
                "listening-ip {:?} matches no address of this host; name an address the host has",
                self.listening_ips
            )));
        }
        Ok(out)
    }

    /// The local IP relay sockets bind to.
    pub(crate) fn relay_bind_ip(&self) -> IpAddr {
        if let Some(ExternalIp {
            private: Some(p), ..
        }) = self.external_ip
        {
            return p;
        }
        self.relay_ip
            .or_else(|| self.listening_ips.first().copied())
            .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
    }

    /// Where relay sockets bind and what they advertise, per family; refuses an unspecified
    /// advertised address and a second relay IP that is not IPv6 beside an IPv4 first one.
    pub fn relay_ips(&self) -> Result<RelayIps, TurnError> {
        let bind = self.relay_bind_ip();
        let advertised = self.relay_advertised_ip(SocketAddr::new(bind, 0));
        if advertised.is_unspecified() {
            return Err(TurnError::InvalidSettings(
                "relay sockets would advertise an unspecified address: set relay-ip (or \
                 external-ip) when listening on 0.0.0.0 or ::"
                    .to_owned(),
            ));
        }
        let first = RelayIp { bind, advertised };
        let mut ips = RelayIps::default();
        if bind.is_ipv4() {
            ips.ipv4 = Some(first);
        } else {
            ips.ipv6 = Some(first);
        }
        if let Some(v6) = self.relay_ipv6 {
            if !v6.is_ipv6() || v6.is_unspecified() || !bind.is_ipv4() {
                return Err(TurnError::InvalidSettings(
                    "relay_ipv6 must be a specific IPv6 address beside an IPv4 relay-ip".to_owned(),
                ));
            }
            ips.ipv6 = Some(RelayIp {
                bind: v6,
                advertised: v6,
            });
        }
        Ok(ips)
    }

    /// The IP advertised in XOR-RELAYED-ADDRESS.
    pub(crate) fn relay_advertised_ip(&self, bound: SocketAddr) -> IpAddr {
        match self.external_ip {
            Some(ExternalIp { public, .. }) => public,
            None => bound.ip(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_issue() {
        let s = TurnSettings::default();
        assert_eq!(s.udp_port, Some(3478));
        assert_eq!(s.tcp_port, Some(3478));
        assert_eq!(s.tls_port, Some(5349));
        assert_eq!(s.realm, "callgate");
        assert_eq!(s.user_quota, 10);
        assert_eq!(s.total_quota, 10_000);
        assert_eq!(s.credential_ttl, Duration::from_secs(3600));
        assert!(s.recv_buffer_bytes >= 2 << 20);
        assert!(!s.allow_private_peers);
        assert!(s.allowed_peer_ips.is_empty());
    }

    #[test]
    fn validate_requires_a_secret_and_sane_ports() {
        let mut s = TurnSettings::default();
        assert!(matches!(s.validate(), Err(TurnError::InvalidSettings(_))));
        s.auth_secrets = vec!["x".into()];
        assert!(s.validate().is_ok());
        s.min_port = 2000;
        s.max_port = 1000;
        let e = s.validate().unwrap_err();
        assert!(e.to_string().contains("min-port"), "{e}");
    }

    #[test]
    fn relay_ips_per_family() {
        let mut s = TurnSettings {
            listening_ips: vec!["127.0.0.1".parse().unwrap()],
            ..Default::default()
        };
        let ips = s.relay_ips().unwrap();
        assert!(ips.ipv4.is_some() && ips.ipv6.is_none());
        s.relay_ipv6 = Some("::1".parse().unwrap());
        let ips = s.relay_ips().unwrap();
        assert_eq!(
            ips.for_family(false).unwrap().bind,
            "::1".parse::<IpAddr>().unwrap()
        );
        s.relay_ipv6 = Some("10.0.0.1".parse().unwrap());
        assert!(s.relay_ips().is_err());
        s.relay_ipv6 = None;
        s.listening_ips = vec!["0.0.0.0".parse().unwrap()];
        assert!(s.relay_ips().is_err(), "would advertise 0.0.0.0");
    }

    #[test]
    fn a_wildcard_listens_on_every_host_address_of_its_family() {
        let ips = |v: &[&str]| -> Vec<IpAddr> { v.iter().map(|s| s.parse().unwrap()).collect() };
        let host = ips(&[
            "127.0.0.1",
            "192.0.2.2",
            "::1",
            "fe80::1",
            "2001:db8::2",
            "192.0.2.2",
        ]);
        let s = TurnSettings::default();
        assert_eq!(
            s.listening_addrs(&host).unwrap(),
            ips(&["127.0.0.1", "192.0.2.2", "::1", "2001:db8::2"]),
            "both families by default, link-local and duplicates left out"
        );
        let s = TurnSettings {
            listening_ips: ips(&["0.0.0.0", "127.0.0.1"]),
            ..Default::default()
        };
        assert_eq!(
            s.listening_addrs(&host).unwrap(),
            ips(&["127.0.0.1", "192.0.2.2"])
        );
        let s = TurnSettings {
            listening_ips: ips(&["10.9.9.9"]),
            ..Default::default()
        };
        assert_eq!(
            s.listening_addrs(&[]).unwrap(),
            ips(&["10.9.9.9"]),
            "an explicit address is bound as given"
        );
        let s = TurnSettings {
            listening_ips: ips(&["::"]),
            ..Default::default()
        };
        let e = s.listening_addrs(&ips(&["127.0.0.1"])).unwrap_err();
        assert!(e.to_string().contains("matches no address"), "{e}");
    }

    #[test]
    fn debug_output_redacts_secrets() {
        let s = TurnSettings {
            auth_secrets: vec!["hunter2".into()],
            ..Default::default()
        };
        let shown = format!("{s:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("[1 redacted]"), "{shown}");
    }

    #[test]
    fn external_ip_maps_public_and_private() {
        let mut s = TurnSettings {
            listening_ips: vec!["10.0.0.5".parse().unwrap()],
            ..Default::default()
        };
        assert_eq!(s.relay_bind_ip(), "10.0.0.5".parse::<IpAddr>().unwrap());
        s.relay_ip = Some("10.0.0.6".parse().unwrap());
        assert_eq!(s.relay_bind_ip(), "10.0.0.6".parse::<IpAddr>().unwrap());
        s.external_ip = Some(ExternalIp {
            public: "203.0.113.9".parse().unwrap(),
            private: Some("10.0.0.7".parse().unwrap()),
        });
        assert_eq!(s.relay_bind_ip(), "10.0.0.7".parse::<IpAddr>().unwrap());
        let bound: SocketAddr = "10.0.0.7:50000".parse().unwrap();
        assert_eq!(
            s.relay_advertised_ip(bound),
            "203.0.113.9".parse::<IpAddr>().unwrap()
        );
    }
}
