//! The registry by address: the services a destination address belongs to, for connections that name no host
//! (a TLS ClientHello without `server_name`), decided by address as the kernel decides other TCP.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, Ipv6Addr},
};

use super::*;

/// Every address the registry knows a service at (its `addresses`, endpoints and resolved names): exact addresses
/// in sorted lists, searched (one entry of 16 bytes per IPv4 address and service: a hash table over as many
/// would hold three times that in spare buckets and lists); ranges in a hash per prefix length (a lookup costs
/// one probe per length the registry uses, as the kernel's CIDR table does, not one test per range); and the
/// services known at no address, by port (Istio gives such a TCP service the whole port).
#[derive(Debug, Default)]
pub(super) struct AddressIndex {
    /// By address, each address's services in declaration order (sorted once all are in: `finish`).
    exact4: Vec<(Ipv4Addr, Arc<Service>)>,
    exact6: Vec<(Ipv6Addr, Arc<Service>)>,
    /// By prefix length, the longest first.
    ranges: Vec<(u8, HashMap<IpNet, Services>)>,
    port_wide: HashMap<u16, Services>,
}

/// Services in declaration order.
type Services = Vec<Arc<Service>>;

impl AddressIndex {
    pub(super) fn insert(&mut self, service: &Arc<Service>) {
        if service.known_nets().next().is_none() {
            for port in service.ports.iter().filter(|port| port.kind == PortKind::Opaque) {
                self.port_wide.entry(port.number).or_default().push(service.clone());
            }
        }
        for net in service.known_nets() {
            if net.prefix_len() == net.max_prefix_len() {
                match net.addr() {
                    IpAddr::V4(address) => self.exact4.push((address, service.clone())),
                    IpAddr::V6(address) => self.exact6.push((address, service.clone())),
                }
            } else {
                let length = net.prefix_len();
                let at = match self.ranges.binary_search_by(|(held, _)| length.cmp(held)) {
                    Ok(at) => at,
                    Err(at) => {
                        self.ranges.insert(at, (length, HashMap::new()));
                        at
                    }
                };
                self.ranges[at].1.entry(net.trunc()).or_default().push(service.clone());
            }
        }
    }

    /// Sorts the exact addresses for lookups (a stable sort: each address's services stay in declaration order)
    /// and gives back spare room; `at` answers only after this.
    pub(super) fn finish(&mut self) {
        self.exact4.sort_by_key(|(address, _)| *address);
        self.exact6.sort_by_key(|(address, _)| *address);
        self.exact4.shrink_to_fit();
        self.exact6.shrink_to_fit();
        self.ranges.iter_mut().for_each(|(_, nets)| nets.shrink_to_fit());
        self.port_wide.shrink_to_fit();
    }

    /// The services known at `address`: those at exactly it first, in declaration order, then those whose
    /// range holds it (the longest first), then the TCP services known at no address that declare `port`.
    pub(super) fn at(&self, address: IpAddr, port: u16) -> impl Iterator<Item = &Service> {
        let (exact4, exact6) = match address {
            IpAddr::V4(address) => (at_exactly(&self.exact4, address), &[][..]),
            IpAddr::V6(address) => (&[][..], at_exactly(&self.exact6, address)),
        };
        let exact = exact4.iter().map(|(_, service)| service).chain(exact6.iter().map(|(_, service)| service));
        let ranges = self.ranges.iter().flat_map(move |(length, nets)| {
            let net = IpNet::new(address, *length).ok().map(|net| net.trunc());
            net.and_then(|net| nets.get(&net)).into_iter().flatten()
        });
        let port_wide = self.port_wide.get(&port).into_iter().flatten();
        exact.chain(ranges).chain(port_wide).map(|service| &**service)
    }
}

/// The entries of a sorted list at `address` (its services, in declaration order).
fn at_exactly<A: Ord + Copy>(sorted: &[(A, Arc<Service>)], address: A) -> &[(A, Arc<Service>)] {
    let from = sorted.partition_point(|(held, _)| *held < address);
    let to = from + sorted[from..].partition_point(|(held, _)| *held == address);
    &sorted[from..to]
}
