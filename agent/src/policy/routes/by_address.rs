//! The registry by address: the services a destination address belongs to, for connections that name no host
//! (a TLS ClientHello without `server_name`), decided by address as the kernel decides other TCP.

use std::collections::HashMap;

use super::*;

/// Every address the registry knows a service at (its `addresses`, endpoints and resolved names), exact
/// addresses in a hash, ranges in a list; and the services known at no address, by port (Istio gives such a
/// TCP service the whole port).
#[derive(Debug, Default)]
pub(super) struct AddressIndex {
    exact: HashMap<IpAddr, Vec<Arc<Service>>>,
    ranges: Vec<(IpNet, Arc<Service>)>,
    port_wide: HashMap<u16, Vec<Arc<Service>>>,
}

impl AddressIndex {
    pub(super) fn insert(&mut self, service: &Arc<Service>) {
        if service.known_at.is_empty() {
            for port in service.ports.iter().filter(|port| port.kind == PortKind::Opaque) {
                self.port_wide.entry(port.number).or_default().push(service.clone());
            }
        }
        for net in service.known_at.iter() {
            if net.prefix_len() == net.max_prefix_len() {
                self.exact.entry(net.addr()).or_default().push(service.clone());
            } else {
                self.ranges.push((*net, service.clone()));
            }
        }
    }

    pub(super) fn shrink_to_fit(&mut self) {
        self.exact.shrink_to_fit();
        self.ranges.shrink_to_fit();
        self.port_wide.shrink_to_fit();
    }

    /// The services known at `address`: those at exactly it first, in declaration order, then those whose
    /// range holds it, then the TCP services known at no address that declare `port`.
    pub(super) fn at(&self, address: IpAddr, port: u16) -> impl Iterator<Item = &Service> {
        let exact = self.exact.get(&address).into_iter().flatten();
        let ranges = self.ranges.iter().filter(move |(net, _)| net.contains(&address)).map(|(_, service)| service);
        let port_wide = self.port_wide.get(&port).into_iter().flatten();
        exact.chain(ranges).chain(port_wide).map(|service| &**service)
    }
}
