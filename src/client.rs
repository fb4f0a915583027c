//! Who a client is, for counting: the unit that connection caps and failed-login counts use.
//!
//! Contract: an IPv4 address counts as itself; an IPv6 address counts as its /64, because one
//! subscriber usually holds a whole /64 and can pick any address in it; an IPv4-mapped IPv6
//! address (a dual-stack socket's view of an IPv4 client) counts as the IPv4 address.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The counting unit for one client; see the module header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClientKey {
    V4(Ipv4Addr),
    /// The upper 64 bits of the address.
    V6Net(u64),
}

impl ClientKey {
    pub fn of(ip: IpAddr) -> ClientKey {
        match canonical_ip(ip) {
            IpAddr::V4(v4) => ClientKey::V4(v4),
            IpAddr::V6(v6) => ClientKey::V6Net((v6.to_bits() >> 64) as u64),
        }
    }
}

impl fmt::Display for ClientKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientKey::V4(v4) => write!(f, "{v4}"),
            ClientKey::V6Net(net) => {
                write!(f, "{}/64", Ipv6Addr::from_bits(u128::from(*net) << 64))
            }
        }
    }
}

/// IPv4-mapped IPv6 addresses (dual-stack sockets) are treated as IPv4, for `allowed_networks`
/// as for counting.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> ClientKey {
        ClientKey::of(s.parse().unwrap())
    }

    #[test]
    fn ipv4_per_address_ipv6_per_64_mapped_as_ipv4() {
        assert_eq!(key("192.0.2.1"), key("192.0.2.1"));
        assert_ne!(key("192.0.2.1"), key("192.0.2.2"));
        assert_eq!(key("2001:db8:1:2::1"), key("2001:db8:1:2:ffff::9"));
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
        assert_eq!(key("::ffff:192.0.2.1"), key("192.0.2.1"));
        assert_eq!(key("2001:db8:1:2::1").to_string(), "2001:db8:1:2::/64");
        assert_eq!(key("::ffff:10.0.0.1").to_string(), "10.0.0.1");
    }
}
