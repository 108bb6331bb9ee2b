//! The kernel's share of the policy: the outbound mode and the destinations allowed at L4.

use std::{fmt, net::IpAddr, str::FromStr};

use ipnet::IpNet;

/// What happens to traffic that no rule matches (Istio's `outboundTrafficPolicy.mode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum OutboundMode {
    /// Unmatched traffic passes (Istio's PassthroughCluster). Istio's default.
    #[default]
    #[value(name = "ALLOW_ANY", alias = "allow-any")]
    AllowAny,
    /// Unmatched traffic is blackholed in the kernel (Istio's BlackHoleCluster).
    #[value(name = "REGISTRY_ONLY", alias = "registry-only")]
    RegistryOnly,
}

impl OutboundMode {
    /// The mode as Istio spells it.
    pub fn name(self) -> &'static str {
        match self {
            OutboundMode::AllowAny => "ALLOW_ANY",
            OutboundMode::RegistryOnly => "REGISTRY_ONLY",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// The IP protocol number.
    pub const fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => 132,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        })
    }
}

/// Destinations (an address or CIDR) allowed on one port of one protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct L4Rule {
    pub net: IpNet,
    pub port: u16,
    pub protocol: Protocol,
}

impl fmt::Display for L4Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.net {
            IpNet::V4(net) => write!(f, "{net}:{}/{}", self.port, self.protocol),
            IpNet::V6(net) => write!(f, "[{net}]:{}/{}", self.port, self.protocol),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid L4 rule '{rule}': {reason} (expected ADDR[/LEN]:PORT/PROTO, e.g. 203.0.113.10:443/tcp or [2001:db8::/64]:53/udp)")]
pub struct L4RuleError {
    rule: String,
    reason: &'static str,
}

impl FromStr for L4Rule {
    type Err = L4RuleError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let fail = |reason| L4RuleError { rule: text.to_owned(), reason };
        let (rest, protocol) = text.rsplit_once('/').ok_or_else(|| fail("no protocol"))?;
        let protocol = match protocol.to_ascii_lowercase().as_str() {
            "tcp" => Protocol::Tcp,
            "udp" => Protocol::Udp,
            "sctp" => Protocol::Sctp,
            _ => return Err(fail("protocol must be tcp, udp or sctp")),
        };
        let (addr, port) = rest.rsplit_once(':').ok_or_else(|| fail("no port"))?;
        let port: u16 = port.parse().map_err(|_| fail("port must be a number from 1 to 65535"))?;
        if port == 0 {
            return Err(fail("port must be a number from 1 to 65535"));
        }
        let addr = match addr.strip_prefix('[') {
            Some(bracketed) => bracketed.strip_suffix(']').ok_or_else(|| fail("unclosed '['"))?,
            None if addr.contains(':') => return Err(fail("IPv6 addresses go in brackets")),
            None => addr,
        };
        let net = parse_net(addr).ok_or_else(|| fail("not an IP address or CIDR"))?;
        Ok(L4Rule { net, port, protocol })
    }
}

/// An address (a host route) or a CIDR, normalised to its network address.
pub fn parse_net(text: &str) -> Option<IpNet> {
    match text.parse::<IpNet>() {
        Ok(net) => Some(net.trunc()),
        Err(_) => text.parse::<IpAddr>().ok().map(IpNet::from),
    }
}

/// What the kernel does with a blackholed packet.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum BlackholeAction {
    /// Drop silently: the client times out.
    #[default]
    Drop,
    /// Answer TCP with a RST and other protocols with ICMP administratively prohibited: the client fails at once.
    Reject,
}

/// Everything the classifier decides with: compiled from configuration, written to the maps whole.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DatapathPolicy {
    pub mode: OutboundMode,
    pub blackhole: BlackholeAction,
    /// Always allowed, any protocol and port (cluster ranges, DNS servers).
    pub allow_cidrs: Vec<IpNet>,
    /// Destinations forwarded by the kernel.
    pub rules: Vec<L4Rule>,
    /// TCP ports whose traffic, to any destination not allowed above, goes to the proxy.
    pub intercept_ports: Vec<u16>,
    /// Destinations AuthorizationPolicies deny to every workload, refused in the kernel (always-allowed ranges
    /// excepted).
    pub denials: Vec<super::authorization::KernelDenial>,
    /// TCP that nothing above matches goes to the proxy instead of through (ALLOW_ANY): AuthorizationPolicies
    /// the kernel cannot decide govern the workloads.
    pub unmatched_tcp_to_proxy: bool,
    /// The transparent proxy's listener port; 0 when there is none (nothing is intercepted then).
    pub proxy_port: u16,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn l4_rules_parse_from_the_command_line_forms() {
        let cases = [
            ("203.0.113.10:80/tcp", "203.0.113.10/32:80/tcp"),
            ("203.0.113.0/24:53/UDP", "203.0.113.0/24:53/udp"),
            ("203.0.113.7/24:53/udp", "203.0.113.0/24:53/udp"),
            ("[2001:db8::1]:443/tcp", "[2001:db8::1/128]:443/tcp"),
            ("[2001:db8::/64]:9/sctp", "[2001:db8::/64]:9/sctp"),
        ];
        for (input, shown) in cases {
            let rule: L4Rule = input.parse().unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(rule.to_string(), shown, "{input}");
        }
    }

    #[test]
    fn malformed_l4_rules_say_what_is_wrong() {
        let cases = [
            ("203.0.113.10:80", "no protocol"),
            ("203.0.113.10/tcp", "no port"),
            ("203.0.113.10:0/tcp", "port must be"),
            ("203.0.113.10:99999/tcp", "port must be"),
            ("2001:db8::1:443/tcp", "IPv6 addresses go in brackets"),
            ("[2001:db8::1:443/tcp", "unclosed"),
            ("example.com:443/tcp", "not an IP address or CIDR"),
            ("203.0.113.10:80/icmp", "protocol must be"),
        ];
        for (input, reason) in cases {
            let error = input.parse::<L4Rule>().expect_err(input).to_string();
            assert!(error.contains(reason), "{input}: {error}");
            assert!(error.contains(input), "{input}: {error}");
        }
    }
}
