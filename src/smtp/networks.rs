//! Which address space is not public: the networks `allowed_networks` may list without
//! `allow_public_networks`.
//!
//! Contract: [`includes_public`] is true unless every address of the network lies in one of
//! the ranges below: private (RFC 1918), loopback, link-local, shared CGNAT space (RFC 6598) for
//! IPv4; loopback, link-local and unique local (fc00::/7) for IPv6. An IPv4-mapped IPv6 network
//! (`::ffff:a.b.c.d/n`) is judged as the IPv4 network it maps, because clients are matched as
//! IPv4 ([`super::client::canonical_ip`]). Anything else, including documentation, multicast and
//! reserved space, counts as public: the check errs on the side of refusing.

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

const NOT_PUBLIC_V4: [(Ipv4Addr, u8); 6] = [
    (Ipv4Addr::new(10, 0, 0, 0), 8),
    (Ipv4Addr::new(172, 16, 0, 0), 12),
    (Ipv4Addr::new(192, 168, 0, 0), 16),
    (Ipv4Addr::new(127, 0, 0, 0), 8),
    (Ipv4Addr::new(169, 254, 0, 0), 16),
    (Ipv4Addr::new(100, 64, 0, 0), 10),
];

const NOT_PUBLIC_V6: [(Ipv6Addr, u8); 3] = [
    (Ipv6Addr::LOCALHOST, 128),
    (Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0), 10),
    (Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, 0), 7),
];

/// True if `net` contains at least one public (globally routable) address.
pub fn includes_public(net: &IpNet) -> bool {
    match net {
        IpNet::V4(v4) => !within_v4(v4),
        IpNet::V6(v6) => match mapped_v4(v6) {
            Some(v4) => !within_v4(&v4),
            None => !NOT_PUBLIC_V6
                .iter()
                .any(|&(addr, len)| Ipv6Net::new(addr, len).is_ok_and(|range| range.contains(v6))),
        },
    }
}

fn within_v4(net: &Ipv4Net) -> bool {
    NOT_PUBLIC_V4
        .iter()
        .any(|&(addr, len)| Ipv4Net::new(addr, len).is_ok_and(|range| range.contains(net)))
}

/// The IPv4 network an IPv4-mapped IPv6 network stands for (`::ffff:0:0/96` and narrower).
fn mapped_v4(net: &Ipv6Net) -> Option<Ipv4Net> {
    let prefix = net.prefix_len().checked_sub(96)?;
    let v4 = net.network().to_ipv4_mapped()?;
    Ipv4Net::new(v4, prefix).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification() {
        let public = [
            "0.0.0.0/0",
            "0.0.0.0/1",
            "128.0.0.0/1",
            "8.8.8.0/24",
            "8.8.8.8/32",
            "192.168.0.0/15",
            "172.0.0.0/8",
            "100.0.0.0/8",
            "198.51.100.0/24",
            "224.0.0.0/4",
            "::/0",
            "2000::/3",
            "2001:db8::/32",
            "::/8",
            "::ffff:0:0/96",
            "::ffff:8.8.8.0/120",
            "64:ff9b::/96",
            "fc00::/6",
        ];
        let private = [
            "10.0.0.0/8",
            "10.1.2.0/24",
            "172.16.0.0/12",
            "172.31.255.0/24",
            "192.168.0.0/16",
            "192.168.10.0/24",
            "127.0.0.0/8",
            "127.0.0.1/32",
            "169.254.0.0/16",
            "100.64.0.0/10",
            "::1/128",
            "fe80::/10",
            "fe80::/64",
            "fc00::/7",
            "fd12:3456::/48",
            "::ffff:192.168.1.0/120",
            "::ffff:10.0.0.1/128",
        ];
        for n in public {
            assert!(includes_public(&n.parse().unwrap()), "{n} should be public");
        }
        for n in private {
            assert!(
                !includes_public(&n.parse().unwrap()),
                "{n} should not be public"
            );
        }
    }
}
