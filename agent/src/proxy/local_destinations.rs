//! Destinations the proxy never connects to on a client's behalf: the gateway node itself. Loopback, link-local
//! (the cloud metadata service at 169.254.169.254), unspecified, multicast and broadcast addresses, and every
//! address of the node's interfaces, kept current as they change — so the agent's own listeners too. A hostile
//! workload could otherwise make the gateway act with the node's identity (passthrough, the forward proxy, a
//! name that resolves to 127.0.0.1), reach its admin port, or loop the proxy into itself through an
//! intercepted port. `--allow-local-destination` names ranges an operator does want reached.

use std::net::{IpAddr, SocketAddr};

use arc_swap::ArcSwap;
use ipnet::IpNet;
use prometheus_client::metrics::counter::Counter;

/// A connection refused because its destination is the gateway node's own.
#[derive(Debug, thiserror::Error)]
#[error("{0} is the gateway node itself (loopback, link-local or one of the node's addresses): refused")]
pub struct LocalDestination(pub SocketAddr);

pub struct LocalDestinations {
    /// The addresses of the node's interfaces now.
    node: ArcSwap<Box<[IpAddr]>>,
    /// Ranges allowed all the same (`--allow-local-destination`).
    allowed: Box<[IpNet]>,
    /// Connections refused (`sluice_local_destinations_refused_total`).
    refused: Counter,
}

impl LocalDestinations {
    pub fn new(allowed: Vec<IpNet>, refused: Counter) -> LocalDestinations {
        LocalDestinations { node: ArcSwap::from_pointee(Box::new([])), allowed: allowed.into(), refused }
    }

    /// Makes `addresses` the node's own; whether they changed.
    pub fn set_node_addresses(&self, mut addresses: Vec<IpAddr>) -> bool {
        addresses.sort_unstable();
        addresses.dedup();
        if ***self.node.load() == *addresses {
            return false;
        }
        self.node.store(std::sync::Arc::new(addresses.into()));
        true
    }

    /// Refuses (and counts) `destination` if it is the node's own and not allowed.
    pub fn check(&self, destination: SocketAddr) -> Result<(), LocalDestination> {
        let ip = canonical(destination.ip());
        let local = is_local_scope(ip) || self.node.load().binary_search(&ip).is_ok();
        if local && !self.allowed.iter().any(|net| net.contains(&ip)) {
            self.refused.inc();
            return Err(LocalDestination(destination));
        }
        Ok(())
    }
}

/// An IPv4 address written as IPv6 (`::ffff:127.0.0.1`) is the IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Addresses that are this host's whatever its interfaces: a connection to them never leaves the node.
fn is_local_scope(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            v4.is_loopback()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.octets()[0] == 0
                || v4.is_multicast()
                || v4.is_broadcast()
        }
        IpAddr::V6(v6) => v6.is_loopback() || v6.is_unspecified() || v6.is_unicast_link_local() || v6.is_multicast(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn address(text: &str) -> SocketAddr {
        SocketAddr::new(text.parse().unwrap(), 80)
    }

    #[test]
    fn the_node_itself_is_refused_and_the_internet_is_not() {
        let refused = Counter::default();
        let local = LocalDestinations::new(Vec::new(), refused.clone());
        local.set_node_addresses(vec!["10.240.1.1".parse().unwrap(), "fd00:240:1::1".parse().unwrap()]);
        for ip in [
            "127.0.0.1",
            "127.1.2.3",
            "169.254.169.254",
            "0.0.0.0",
            "0.1.2.3",
            "255.255.255.255",
            "224.0.0.1",
            "::1",
            "::",
            "fe80::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "10.240.1.1",
            "fd00:240:1::1",
            "::ffff:10.240.1.1",
        ] {
            assert!(local.check(address(ip)).is_err(), "{ip} is the node's");
        }
        for ip in ["203.0.113.10", "10.240.1.2", "2001:db8::1", "::ffff:203.0.113.10"] {
            assert!(local.check(address(ip)).is_ok(), "{ip} is not the node's");
        }
        assert_eq!(refused.get(), 16);
    }

    #[test]
    fn allowed_ranges_and_changed_node_addresses_are_honoured() {
        let local = LocalDestinations::new(vec!["169.254.169.254/32".parse().unwrap()], Counter::default());
        assert!(local.check(address("169.254.169.254")).is_ok());
        assert!(local.check(address("169.254.0.1")).is_err());
        assert!(local.set_node_addresses(vec!["192.0.2.1".parse().unwrap()]));
        assert!(!local.set_node_addresses(vec!["192.0.2.1".parse().unwrap()]), "unchanged");
        assert!(local.check(address("192.0.2.1")).is_err());
        assert!(local.set_node_addresses(vec!["192.0.2.2".parse().unwrap()]));
        assert!(local.check(address("192.0.2.1")).is_ok(), "an address the node no longer has");
    }
}
