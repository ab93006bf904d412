//! The client's address. The TCP peer is the client unless `edge.trusted_hops` proxies stand
//! in front of the edge; then the address those proxies appended to `X-Forwarded-For` is used:
//! with N trusted hops, the N-th entry from the right. Entries further left are written by
//! the client and never trusted.

use std::net::IpAddr;

use http::{HeaderMap, HeaderName};

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// The client IP for a request from `peer` with `headers`.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted_hops: usize) -> IpAddr {
    if trusted_hops == 0 {
        return peer;
    }
    let entries: Vec<&str> = headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    // The peer is the nearest trusted proxy; each further trusted proxy appended the address
    // it received from, so the client is `trusted_hops` entries from the right.
    entries.len().checked_sub(trusted_hops).and_then(|i| entries.get(i)).and_then(|s| s.parse().ok()).unwrap_or(peer)
}

/// `ip` as text (IPv4 without the formatting machinery: this runs for every call).
pub fn ip_text(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let mut s = String::with_capacity(15);
            let mut num = itoa::Buffer::new();
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    s.push('.');
                }
                s.push_str(num.format(octet));
            }
            s
        }
        IpAddr::V6(_) => ip.to_string(),
    }
}

/// An address block, `203.0.113.0/24` or `2001:db8::/32` (a bare address is a block of one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

impl std::str::FromStr for IpNet {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr.trim().parse().map_err(|_| format!("`{s}` is not an IP address or a CIDR block"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => match p.trim().parse::<u8>() {
                Ok(n) if n <= max => n,
                _ => return Err(format!("`{s}`: the prefix length must be 0..={max}")),
            },
        };
        // An IPv4 block written IPv4-mapped (`::ffff:10.0.0.0/104`) is that IPv4 block: addresses
        // are compared in their canonical form (`contains`), so it would otherwise match none.
        let (addr, prefix) = match addr {
            IpAddr::V6(v6) if prefix >= 96 && v6.to_ipv4_mapped().is_some() => (addr.to_canonical(), prefix - 96),
            _ => (addr, prefix),
        };
        let net = Self { addr, prefix };
        if net.masked(addr) != addr {
            return Err(format!(
                "`{s}` has bits set past its prefix length (the block starts at {})",
                net.masked(addr)
            ));
        }
        Ok(net)
    }
}

impl IpNet {
    /// `ip` with the bits past the prefix cleared.
    fn masked(&self, ip: IpAddr) -> IpAddr {
        match ip {
            IpAddr::V4(v4) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                IpAddr::V4((u32::from(v4) & mask).into())
            }
            IpAddr::V6(v6) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                IpAddr::V6((u128::from(v6) & mask).into())
            }
        }
    }

    /// Whether `ip` is in the block (an IPv4 address written as IPv6, `::ffff:a.b.c.d`, counts
    /// as the IPv4 address: what a dual-stack listener reports).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        ip.is_ipv4() == self.addr.is_ipv4() && self.masked(ip) == self.addr
    }

    /// Whether every address of `other` is in the block.
    fn covers(&self, other: &IpNet) -> bool {
        self.addr.is_ipv4() == other.addr.is_ipv4()
            && self.prefix <= other.prefix
            && self.masked(other.addr) == self.addr
    }
}

/// The addresses in both lists, as blocks. (Two blocks are nested or apart: where they meet,
/// the smaller one is what both hold.)
pub fn intersect(a: &[IpNet], b: &[IpNet]) -> Vec<IpNet> {
    let mut both = Vec::new();
    for x in a {
        for y in b {
            let inner = if x.covers(y) {
                y
            } else if y.covers(x) {
                x
            } else {
                continue;
            };
            if !both.contains(inner) {
                both.push(*inner);
            }
        }
    }
    both
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use http::HeaderValue;

    #[test]
    fn address_blocks_contain_their_addresses_only() {
        let net = |s: &str| s.parse::<IpNet>().unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(net("203.0.113.0/24").contains(ip("203.0.113.255")));
        assert!(!net("203.0.113.0/24").contains(ip("203.0.114.0")));
        assert!(net("203.0.113.0/24").contains(ip("::ffff:203.0.113.9")), "IPv4-mapped");
        assert!(net("198.51.100.7").contains(ip("198.51.100.7")) && !net("198.51.100.7").contains(ip("198.51.100.8")));
        assert!(net("0.0.0.0/0").contains(ip("8.8.8.8")) && !net("0.0.0.0/0").contains(ip("2001:db8::1")));
        assert!(net("2001:db8::/32").contains(ip("2001:db8:ffff::1")));
        assert!(!net("2001:db8::/32").contains(ip("2001:db9::1")));
        assert!(net("::/0").contains(ip("::1")));
        // IPv4 blocks written IPv4-mapped are IPv4 blocks.
        assert_eq!(net("::ffff:203.0.113.0/120"), net("203.0.113.0/24"));
        assert!(net("::ffff:203.0.113.0/120").contains(ip("203.0.113.9")));
        assert!(net("::ffff:203.0.113.0/120").contains(ip("::ffff:203.0.113.9")));
        assert!(!net("::ffff:203.0.113.0/120").contains(ip("203.0.114.9")));
        assert_eq!(net("::ffff:198.51.100.7"), net("198.51.100.7"));
        for bad in ["203.0.113.1/24", "203.0.113.0/33", "2001:db8::/129", "example.com", "10.0.0.0/x", ""] {
            assert!(bad.parse::<IpNet>().is_err(), "{bad}");
        }
    }

    #[test]
    fn intersections_keep_the_inner_blocks_of_nested_pairs() {
        let nets = |s: &[&str]| s.iter().map(|n| n.parse::<IpNet>().unwrap()).collect::<Vec<_>>();
        let a = nets(&["10.0.0.0/8", "203.0.113.0/24", "2001:db8::/32"]);
        // Inside, around, apart, the other family.
        let b = nets(&["10.1.0.0/16", "203.0.0.0/16", "192.0.2.0/24", "2001:db8:1::/48", "0.0.0.0/0"]);
        assert_eq!(intersect(&a, &b), nets(&["10.1.0.0/16", "10.0.0.0/8", "203.0.113.0/24", "2001:db8:1::/48"]));
        assert_eq!(intersect(&b, &a), nets(&["10.1.0.0/16", "203.0.113.0/24", "2001:db8:1::/48", "10.0.0.0/8"]));
        assert!(intersect(&nets(&["10.0.0.0/8"]), &nets(&["11.0.0.0/8", "::/0"])).is_empty());
        // An address in the result is in both lists, and the other way round.
        let both = intersect(&a, &b);
        for ip in ["10.1.2.3", "10.2.0.1", "203.0.113.9", "192.0.2.1", "2001:db8:1::5", "2001:db8:2::5", "8.8.8.8"] {
            let ip: IpAddr = ip.parse().unwrap();
            let in_both = a.iter().any(|n| n.contains(ip)) && b.iter().any(|n| n.contains(ip));
            assert_eq!(both.iter().any(|n| n.contains(ip)), in_both, "{ip}");
        }
    }

    fn h(xff: &[&str]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for v in xff {
            m.append("x-forwarded-for", HeaderValue::from_str(v).unwrap());
        }
        m
    }

    #[test]
    fn trusted_hops_table() {
        let peer: IpAddr = "10.0.0.1".parse().unwrap();
        let cases: &[(&[&str], usize, &str)] = &[
            (&["6.6.6.6"], 0, "10.0.0.1"),                   // not trusted: spoofing ignored
            (&["6.6.6.6, 203.0.113.9"], 1, "203.0.113.9"),   // LB appended the real client
            (&["6.6.6.6", "203.0.113.9"], 1, "203.0.113.9"), // same, as two header lines
            (&["6.6.6.6, 203.0.113.9, 10.0.0.7"], 2, "203.0.113.9"),
            (&[], 1, "10.0.0.1"),                    // proxy sent nothing: the peer
            (&["garbage, nonsense"], 1, "10.0.0.1"), // unparsable: the peer
            (&["203.0.113.9"], 3, "10.0.0.1"),       // fewer entries than hops
        ];
        for (xff, hops, want) in cases {
            assert_eq!(client_ip(peer, &h(xff), *hops).to_string(), *want, "{xff:?} hops={hops}");
        }
    }

    #[test]
    fn ip_text_matches_display() {
        for ip in ["0.0.0.0", "127.0.0.1", "10.20.30.40", "255.255.255.255", "::1", "2001:db8::7"] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(ip_text(ip), ip.to_string());
        }
    }
}
