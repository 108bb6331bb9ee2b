//! The registry by address: the services a destination address belongs to, for connections that name no host
//! (a TLS ClientHello without `server_name`), decided by address as the kernel decides other TCP.

use std::collections::HashMap;

use super::*;

/// Every address the registry knows a service at (its `addresses`, endpoints and resolved names), exact
/// addresses in a hash, ranges in a list.
#[derive(Debug, Default)]
pub(super) struct AddressIndex {
    exact: HashMap<IpAddr, Vec<Arc<Service>>>,
    ranges: Vec<(IpNet, Arc<Service>)>,
}

impl AddressIndex {
    pub(super) fn insert(&mut self, service: &Arc<Service>) {
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
    }

    /// The services known at `address`: those at exactly it first, in declaration order, then those whose
    /// range holds it.
    pub(super) fn at(&self, address: IpAddr) -> impl Iterator<Item = &Service> {
        let exact = self.exact.get(&address).into_iter().flatten();
        let ranges = self.ranges.iter().filter(move |(net, _)| net.contains(&address)).map(|(_, service)| service);
        exact.chain(ranges).map(|service| &**service)
    }
}
