//! Where a task's network grants may lead: granted HTTP origins and TCP targets as parsed
//! from manifests, and which addresses count as public (the rest need a literal grant).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// `https://api.example.com` or `http://127.0.0.1:8080`: scheme, host and port, nothing
/// else (no path, query, user or wildcard).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub https: bool,
    /// Lower case; an IPv6 address without brackets.
    pub host: String,
    pub port: u16,
}

/// `smtp.example.com:587` or `127.0.0.1:2525`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpTarget {
    pub host: String,
    pub port: u16,
}

impl Origin {
    pub fn parse(text: &str) -> Result<Origin, String> {
        let bad = |why: &str| format!("{text:?} is not an origin such as \"https://api.example.com\" ({why})");
        let (scheme, rest) = text.split_once("://").ok_or_else(|| bad("no scheme"))?;
        let https = match scheme.to_ascii_lowercase().as_str() {
            "https" => true,
            "http" => false,
            _ => return Err(bad("the scheme must be http or https")),
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains(['/', '?', '#', '@', '*']) {
            return Err(bad("an origin has no path, query, user or wildcard"));
        }
        let (host, port) = split_host_port(rest).map_err(|e| bad(&e))?;
        Ok(Origin { https, host, port: port.unwrap_or(if https { 443 } else { 80 }) })
    }

    /// The literal address this origin names, if it names one rather than a host name.
    pub fn literal(&self) -> Option<IpAddr> {
        self.host.parse().ok()
    }

    /// `host[:port]` as sent in Host: brackets around IPv6, the default port left out.
    pub fn authority(&self) -> String {
        let default_port = if self.https { 443 } else { 80 };
        if self.port == default_port {
            bracketed(&self.host)
        } else {
            format!("{}:{}", bracketed(&self.host), self.port)
        }
    }

    /// A grant of a non-public address by its literal: needs the operator's allowance.
    pub fn is_private_literal(&self) -> bool {
        self.literal().is_some_and(|ip| !is_public(ip))
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.https { "https" } else { "http" };
        let default_port = if self.https { 443 } else { 80 };
        let host = bracketed(&self.host);
        if self.port == default_port {
            write!(f, "{scheme}://{host}")
        } else {
            write!(f, "{scheme}://{host}:{}", self.port)
        }
    }
}

impl TcpTarget {
    pub fn parse(text: &str) -> Result<TcpTarget, String> {
        let bad = |why: &str| format!("{text:?} is not a host:port such as \"smtp.example.com:587\" ({why})");
        if text.contains(['/', '?', '#', '@', '*']) {
            return Err(bad("no scheme, path or wildcard"));
        }
        let (host, port) = split_host_port(text).map_err(|e| bad(&e))?;
        Ok(TcpTarget { host, port: port.ok_or_else(|| bad("the port is missing"))? })
    }

    pub fn literal(&self) -> Option<IpAddr> {
        self.host.parse().ok()
    }

    /// A grant of a non-public address by its literal: needs the operator's allowance.
    pub fn is_private_literal(&self) -> bool {
        self.literal().is_some_and(|ip| !is_public(ip))
    }
}

impl fmt::Display for TcpTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", bracketed(&self.host), self.port)
    }
}

impl<'de> serde::Deserialize<'de> for Origin {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Origin::parse(&String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

impl<'de> serde::Deserialize<'de> for TcpTarget {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        TcpTarget::parse(&String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

impl std::str::FromStr for Origin {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Origin::parse(s)
    }
}

impl std::str::FromStr for TcpTarget {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        TcpTarget::parse(s)
    }
}

fn bracketed(host: &str) -> String {
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    }
}

/// `host`, `host:port`, `[v6]`, `[v6]:port` → lower-case host and the port if given.
pub fn split_host_port(text: &str) -> Result<(String, Option<u16>), String> {
    let (host, port) = if let Some(rest) = text.strip_prefix('[') {
        let (v6, after) = rest.split_once(']').ok_or("an unclosed '['")?;
        v6.parse::<Ipv6Addr>().map_err(|_| format!("{v6:?} is not an IPv6 address"))?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or("text after ']'")?),
        };
        (v6.to_string(), port)
    } else {
        match text.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (text.to_string(), None),
        }
    };
    if host.is_empty() {
        return Err("no host".into());
    }
    if host.parse::<IpAddr>().is_err()
        && !host.split('.').all(|label| {
            !label.is_empty() && label.len() <= 63 && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        })
    {
        return Err(format!("{host:?} is not a host name or address"));
    }
    let port = match port {
        None => None,
        Some(p) => Some(p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| format!("{p:?} is not a port"))?),
    };
    Ok((host.to_ascii_lowercase(), port))
}

/// Whether `ip` is an ordinary address on the public internet. Loopback, private,
/// link-local, shared (CGNAT), unspecified, multicast, broadcast, documentation and
/// reserved ranges are not, nor IPv6 forms that embed such an IPv4 address: a task
/// reaches those only through a grant that names the address itself.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public_v4(v4);
            }
            let s = v6.segments();
            let embedded = |hi: u16, lo: u16| Ipv4Addr::new((hi >> 8) as u8, hi as u8, (lo >> 8) as u8, lo as u8);
            // NAT64 (64:ff9b::/96) and 6to4 (2002::/16) carry an IPv4 address a gateway
            // would connect to.
            if s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0, 0, 0, 0] {
                return is_public_v4(embedded(s[6], s[7]));
            }
            if s[0] == 0x2002 {
                return is_public_v4(embedded(s[1], s[2]));
            }
            // SIIT (::ffff:0:0:0/96) carries one too.
            if s[0..4] == [0, 0, 0, 0] && s[4] == 0xffff && s[5] == 0 {
                return is_public_v4(embedded(s[6], s[7]));
            }
            !(v6.is_unspecified()
                || v6.is_loopback()
                || v6.is_multicast()
                || s[0..6] == [0, 0, 0, 0, 0, 0] // IPv4-compatible (deprecated) and ::/96
                || (s[0] & 0xfe00) == 0xfc00 // unique local
                || (s[0] & 0xffc0) == 0xfe80 // link-local
                || (s[0] & 0xffc0) == 0xfec0 // site-local (deprecated)
                || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation
                || (s[0] == 0x64 && s[1] == 0xff9b && s[2] == 1) // local-use NAT64 (RFC 8215)
                || (s[0] == 0x100 && s[1..4] == [0, 0, 0]) // discard-only
                || (s[0] == 0x2001 && s[1] < 0x0200)) // IETF special purpose, Teredo
        }
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || a == 0
        || a >= 240 // reserved
        || (a == 100 && (b & 0xc0) == 64) // shared address space (CGNAT)
        || (a == 192 && b == 0 && c == 0) // IETF protocol assignments
        || (a == 198 && (b & 0xfe) == 18) // benchmarking
        || ip == Ipv4Addr::new(168, 63, 129, 16)) // Azure's host endpoint (WireServer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_parse_to_scheme_host_port() {
        let o = Origin::parse("https://API.example.com").unwrap();
        assert_eq!((o.https, o.host.as_str(), o.port), (true, "api.example.com", 443));
        assert_eq!(o.to_string(), "https://api.example.com");
        let o = Origin::parse("http://127.0.0.1:8080/").unwrap();
        assert_eq!((o.https, o.host.as_str(), o.port), (false, "127.0.0.1", 8080));
        assert_eq!(o.literal(), Some("127.0.0.1".parse().unwrap()));
        let o = Origin::parse("http://[::1]:9000").unwrap();
        assert_eq!((o.host.as_str(), o.port, o.to_string()), ("::1", 9000, "http://[::1]:9000".to_string()));
        for bad in [
            "api.example.com",
            "ftp://x.com",
            "https://x.com/path",
            "https://user@x.com",
            "https://*.x.com",
            "https://x.com:0",
            "https://x.com:99999",
            "https://",
            "https://[::1",
            "https://bad host",
        ] {
            assert!(Origin::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn tcp_targets_need_a_port() {
        let t = TcpTarget::parse("smtp.example.com:587").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("smtp.example.com", 587));
        assert_eq!(TcpTarget::parse("[::1]:25").unwrap().to_string(), "[::1]:25");
        assert!(TcpTarget::parse("smtp.example.com").is_err());
        assert!(TcpTarget::parse("smtp://x:25").is_err());
    }

    #[test]
    fn only_ordinary_internet_addresses_are_public() {
        for ip in ["93.184.216.34", "1.1.1.1", "2606:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808"] {
            assert!(is_public(ip.parse().unwrap()), "{ip} should be public");
        }
        for ip in [
            "127.0.0.1",
            "127.1.2.3",
            "10.0.0.1",
            "172.16.5.4",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "0.1.2.3",
            "255.255.255.255",
            "224.0.0.1",
            "240.0.0.1",
            "192.0.0.8",
            "198.18.0.1",
            "::1",
            "::",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::127.0.0.1",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "ff02::1",
            "64:ff9b::7f00:1",
            "2002:7f00:1::",
            "2002:c0a8:101::1",
            "2001:db8::1",
            "::ffff:0:7f00:1",
            "64:ff9b:1::a00:1",
            "100::1",
            "168.63.129.16",
        ] {
            assert!(!is_public(ip.parse().unwrap()), "{ip} should not be public");
        }
    }
}
