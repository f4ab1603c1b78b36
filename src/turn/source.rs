//! [`source_key`]: the one key every per-address limit of the relay counts under.
//!
//! An IPv4 client has one address; an IPv6 client usually has a whole /64 and can pick a fresh
//! address in it for every request. So a limit keyed on the exact IPv6 address limits nothing:
//! per-address limits count an IPv6 source by its /64 (as RFC 6177 assigns at least one /64 per
//! site). IPv4-mapped IPv6 (`::ffff:a.b.c.d`, seen on dual-stack sockets) counts as the IPv4
//! address. Pure: no I/O, no state.

use std::net::{IpAddr, Ipv6Addr};

/// The key per-address limits count `ip` under: an IPv4 address itself (also when it arrives
/// IPv4-mapped), an IPv6 address's /64 (the other 64 bits zero).
pub fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !u128::from(u64::MAX))),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> IpAddr {
        source_key(s.parse().unwrap())
    }

    #[test]
    fn ipv4_is_its_own_key_and_ipv6_counts_per_64() {
        assert_eq!(key("198.51.100.7"), key("198.51.100.7"));
        assert_ne!(key("198.51.100.7"), key("198.51.100.8"));
        assert_eq!(key("::ffff:198.51.100.7"), key("198.51.100.7"));
        assert_eq!(
            key("2001:db8:1:2::1"),
            key("2001:db8:1:2:ffff:ffff:ffff:ffff")
        );
        assert_eq!(
            key("2001:db8:1:2:aaaa::5"),
            "2001:db8:1:2::".parse::<IpAddr>().unwrap()
        );
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
        assert_eq!(key("::1"), key("::1"));
    }
}
