//! `compile`: the configuration in force (and the node's own settings) → the policy the datapath enforces.

use std::collections::BTreeSet;

use ipnet::IpNet;

use super::{
    l4::{BlackholeAction, DatapathPolicy, L4Rule, OutboundMode, Protocol},
    sidecars::SidecarModes,
};
use crate::config::{
    resolver::{entry_names, Resolved},
    service_entry::{is_http, is_tls, parse_address, transport, Resolution, ServiceEntry, Transport},
    OutboundTrafficMode, Snapshot, Spec,
};

/// What the node decides, not the mesh: interfaces' neighbours, the proxy, command-line overrides.
#[derive(Clone, Debug, Default)]
pub struct NodeSettings {
    /// Overrides the mesh config's `outboundTrafficPolicy.mode` (whose absence means Istio's ALLOW_ANY).
    pub mode: Option<OutboundMode>,
    pub blackhole: BlackholeAction,
    pub allow_cidrs: Vec<IpNet>,
    /// Destinations allowed besides what the ServiceEntries register.
    pub rules: Vec<L4Rule>,
    pub intercept_ports: Vec<u16>,
    pub proxy_port: u16,
    /// The pods behind the gateway are known (`--kube`): namespace AuthorizationPolicies apply to their traffic.
    pub knows_sources: bool,
}

/// The datapath's policy: every address a ServiceEntry registers — its `addresses`, its endpoints' with STATIC
/// resolution, or what its hosts (or endpoint names) resolve to with DNS resolution — is allowed at L4 on each of
/// its ports.
pub fn datapath_policy(snapshot: &Snapshot, resolved: &Resolved, node: &NodeSettings) -> DatapathPolicy {
    let intercept_ports = intercepted_ports(snapshot, node);
    let governed = node.proxy_port != 0 && super::authorization::governs_intercepted(snapshot, node.knows_sources);
    let mut rules: BTreeSet<(String, u16, u8)> = BTreeSet::new();
    let mut out = Vec::new();
    let mut push = |rule: L4Rule| {
        if rules.insert((rule.net.to_string(), rule.port, rule.protocol.number())) {
            out.push(rule);
        }
    };
    for rule in &node.rules {
        push(*rule);
    }
    for resource in &snapshot.resources {
        if let Spec::ServiceEntry(entry) = &resource.spec {
            for rule in service_entry_rules(entry, resolved, &intercept_ports) {
                push(rule);
            }
        }
    }
    DatapathPolicy {
        // Everyone's mode: the root namespace's Sidecar's, else the mesh's. Workloads whose own Sidecar says
        // otherwise are the datapath's per-source exceptions.
        mode: SidecarModes::compile(snapshot, mesh_mode(snapshot, node)).default,
        blackhole: node.blackhole,
        allow_cidrs: node.allow_cidrs.clone(),
        rules: out,
        intercept_ports,
        denials: super::authorization::kernel_denials(snapshot),
        unmatched_tcp_to_proxy: governed,
        proxy_port: node.proxy_port,
    }
}

/// The ports handed to the proxy: the node's (`--intercept-port`), and whenever the node intercepts at all, those
/// the configuration needs the proxy for: ServiceEntry ports with protocol `HTTP`, `HTTP2`, `GRPC` or `GRPC-WEB`
/// (decided by Host, as Istio's HTTP listeners decide them); `HTTPS` or `TLS` (decided by server name); TCP ports of ServiceEntries known at no address (which Istio gives the whole port) or whose `addresses`
/// are virtual IPs in front of endpoints or a DNS name (a connection to one goes where the proxy sends it, not
/// where it was sent); the ports of the mesh's `tls` and `tcp` routes, and for a route that names no port, its
/// hosts' ports.
fn intercepted_ports(snapshot: &Snapshot, node: &NodeSettings) -> Vec<u16> {
    if node.proxy_port == 0 {
        return node.intercept_ports.clone();
    }
    let mut ports: BTreeSet<u16> = node.intercept_ports.iter().copied().collect();
    let mut opaque_ports_by_host: Vec<(&str, u16)> = Vec::new();
    for resource in &snapshot.resources {
        let Spec::ServiceEntry(entry) = &resource.spec else { continue };
        let unaddressed = entry.addresses.is_empty() && entry.resolution() == Resolution::None;
        let virtual_ips = !entry.addresses.is_empty() && entry.resolution() != Resolution::None;
        for port in &entry.ports {
            let Ok(number) = u16::try_from(port.number) else { continue };
            let protocol = port.protocol.as_deref();
            if protocol.is_some_and(is_http) {
                ports.insert(number);
                continue;
            }
            opaque_ports_by_host.extend(entry.hosts.iter().map(|host| (host.as_str(), number)));
            let tcp = protocol.is_none_or(|protocol| transport(protocol) == Some(Transport::Tcp));
            if protocol.is_some_and(is_tls) || (tcp && (unaddressed || virtual_ips)) {
                ports.insert(number);
            }
        }
    }
    for resource in &snapshot.resources {
        let Spec::VirtualService(service) = &resource.spec else { continue };
        if !service.binds_to_mesh() {
            continue;
        }
        let tls = service.tls.iter().map(|route| route.matches.iter().map(|m| m.l4.port).collect::<Vec<_>>());
        let tcp = service.tcp.iter().map(|route| route.matches.iter().map(|m| m.port).collect::<Vec<_>>());
        for matched_ports in tls.chain(tcp) {
            ports.extend(matched_ports.iter().flatten().filter_map(|&port| u16::try_from(port).ok()));
            // A route with no match, or a match without a port: every non-HTTP port of the hosts it routes.
            if matched_ports.is_empty() || matched_ports.iter().any(Option::is_none) {
                let routed = |host: &str| service.hosts.iter().any(|pattern| host_matches(pattern, host));
                ports.extend(opaque_ports_by_host.iter().filter(|(host, _)| routed(host)).map(|(_, port)| *port));
            }
        }
    }
    // AuthorizationPolicies the kernel cannot decide are decided in the proxy: where they govern the workloads' own
    // traffic, the TCP the kernel would pass by address (registered ports, and those the policies name) goes
    // through the proxy instead (and, in ALLOW_ANY, the TCP it would pass unmatched: `unmatched_tcp_to_proxy`).
    if super::authorization::governs_intercepted(snapshot, node.knows_sources) {
        for resource in &snapshot.resources {
            match &resource.spec {
                Spec::ServiceEntry(entry) => {
                    let tcp = |port: &&crate::config::service_entry::ServicePort| {
                        port.protocol.as_deref().is_none_or(|protocol| transport(protocol) == Some(Transport::Tcp))
                    };
                    ports.extend(entry.ports.iter().filter(tcp).filter_map(|port| u16::try_from(port.number).ok()));
                }
                Spec::AuthorizationPolicy(policy) => {
                    let operations = policy.rules.iter().flatten().flat_map(|rule| rule.to.iter().flatten());
                    let named = operations.filter_map(|to| to.operation.as_ref()).flat_map(|operation| {
                        operation.ports.iter().chain(&operation.not_ports).filter_map(|port| port.parse::<u16>().ok())
                    });
                    ports.extend(named.filter(|port| *port != 0));
                }
                _ => {}
            }
        }
    }
    ports.into_iter().collect()
}

/// Whether a VirtualService's host `pattern` (exact, or `*.suffix`) covers the registered `host`.
fn host_matches(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix('*') {
        Some(suffix) => host.len() > suffix.len() && host.to_ascii_lowercase().ends_with(&suffix.to_ascii_lowercase()),
        None => pattern.eq_ignore_ascii_case(host),
    }
}

/// The mesh's outbound mode: the node's override, else the mesh config's, else Istio's default (ALLOW_ANY).
pub fn mesh_mode(snapshot: &Snapshot, node: &NodeSettings) -> OutboundMode {
    node.mode.unwrap_or(match snapshot.mesh.outbound_mode() {
        Some(OutboundTrafficMode::RegistryOnly) => OutboundMode::RegistryOnly,
        Some(OutboundTrafficMode::AllowAny) | None => OutboundMode::AllowAny,
    })
}

/// The L4 rules of one ServiceEntry. TCP ports the node intercepts get none: their traffic goes to the proxy,
/// which checks each request's host, each ClientHello's server name, or each connection's address against the
/// registry, and applies the routes.
fn service_entry_rules(entry: &ServiceEntry, resolved: &Resolved, intercepted: &[u16]) -> Vec<L4Rule> {
    let mut rules = Vec::new();
    let dns_addresses: Vec<IpNet> = entry_names(entry)
        .iter()
        .filter_map(|name| resolved.get(name))
        .flatten()
        .map(|&address| IpNet::from(address))
        .collect();
    for port in &entry.ports {
        let protocol = match port.protocol.as_deref().map(transport).unwrap_or(Some(Transport::Tcp)) {
            Some(Transport::Tcp) => Protocol::Tcp,
            Some(Transport::Udp) => Protocol::Udp,
            Some(Transport::Sctp) => Protocol::Sctp,
            None => continue,
        };
        let Ok(number) = u16::try_from(port.number) else { continue };
        // The proxy decides the ports the node hands it, by name where the protocol has one, else by address.
        if intercepted.contains(&number) && protocol == Protocol::Tcp {
            continue;
        }
        for address in &entry.addresses {
            if let Some(net) = parse_address(address) {
                rules.push(L4Rule { net: net.trunc(), port: number, protocol });
            }
        }
        for &net in &dns_addresses {
            rules.push(L4Rule { net, port: number, protocol });
        }
        if entry.resolution() == Resolution::Static {
            for endpoint in &entry.endpoints {
                let Some(net) = parse_address(&endpoint.address) else { continue };
                let target = endpoint.ports.get(&port.name).copied().or(port.target_port).unwrap_or(port.number);
                if let Ok(target) = u16::try_from(target) {
                    rules.push(L4Rule { net, port: target, protocol });
                }
            }
        }
    }
    rules
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(yaml: &str) -> Snapshot {
        Snapshot::from_yaml(yaml)
    }

    fn rules(policy: &DatapathPolicy) -> Vec<String> {
        policy.rules.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn service_entry_addresses_and_static_endpoints_become_l4_rules() {
        let snapshot = snapshot(
            "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: default}
spec:
  hosts: [api.example]
  addresses: [203.0.113.10, 198.51.100.0/24, '2001:db8::1']
  ports: [{number: 443, name: tls, protocol: TLS}, {number: 53, name: dns, protocol: UDP}]
  resolution: NONE
---
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {name: db}
spec:
  hosts: [db.example]
  ports: [{number: 5432, name: pg, protocol: TCP, targetPort: 6432}]
  resolution: STATIC
  endpoints: [{address: 203.0.113.20}, {address: 203.0.113.21, ports: {pg: 7432}}]
---
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {name: by-dns}
spec:
  hosts: [httpbin.org]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: DNS
",
        );
        let resolved = Resolved::from([("httpbin.org".to_owned(), vec!["203.0.113.80".parse().unwrap()])]);
        let policy = datapath_policy(&snapshot, &resolved, &NodeSettings::default());
        assert_eq!(
            rules(&policy),
            [
                "203.0.113.10/32:443/tcp",
                "198.51.100.0/24:443/tcp",
                "[2001:db8::1/128]:443/tcp",
                "203.0.113.10/32:53/udp",
                "198.51.100.0/24:53/udp",
                "[2001:db8::1/128]:53/udp",
                "203.0.113.20/32:6432/tcp",
                "203.0.113.21/32:7432/tcp",
                "203.0.113.80/32:80/tcp",
            ]
        );
        assert_eq!(policy.mode, OutboundMode::AllowAny, "Istio's default");

        // Ports the node intercepts are decided by name in the proxy: HTTP by Host, HTTPS and TLS by SNI. Other
        // protocols stay decided by address in the kernel.
        let node = NodeSettings { intercept_ports: vec![80, 6432], proxy_port: 15001, ..NodeSettings::default() };
        let intercepting = datapath_policy(&snapshot, &resolved, &node);
        let kept = ["203.0.113.10/32:53/udp", "198.51.100.0/24:53/udp", "[2001:db8::1/128]:53/udp"];
        let kept = kept.into_iter().chain(["203.0.113.20/32:6432/tcp", "203.0.113.21/32:7432/tcp"]);
        assert_eq!(rules(&intercepting), kept.collect::<Vec<_>>());
        assert_eq!(intercepting.intercept_ports, [80, 443, 6432], "443 is named TLS: handed to the proxy too");
        let not_intercepting = NodeSettings { intercept_ports: Vec::new(), proxy_port: 0, ..NodeSettings::default() };
        assert!(datapath_policy(&snapshot, &resolved, &not_intercepting).intercept_ports.is_empty());
    }

    #[test]
    fn virtual_ips_and_the_hosts_of_portless_tcp_routes_are_handed_to_the_proxy() {
        let snapshot = snapshot(
            "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db, namespace: default}
spec:
  hosts: [db.example]
  addresses: [198.51.100.2]
  ports: [{number: 5432, name: pg, protocol: TCP}]
  endpoints: [{address: 203.0.113.20}]
  resolution: STATIC
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: cache, namespace: default}
spec:
  hosts: [cache.example]
  ports: [{number: 6379, name: redis, protocol: TCP}, {number: 8080, name: http, protocol: HTTP}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: kafka, namespace: default}
spec:
  hosts: [kafka.example]
  ports: [{number: 9092, name: kafka, protocol: TCP}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: cache, namespace: default}
spec:
  hosts: ['*.example']
  tcp:
  - route: [{destination: {host: cache.example}}]
",
        );
        let node = NodeSettings { intercept_ports: vec![80], proxy_port: 15001, ..NodeSettings::default() };
        let policy = datapath_policy(&snapshot, &Resolved::new(), &node);
        // 5432: a virtual IP in front of an endpoint; 6379 and 9092: what the portless tcp route covers; 8080: HTTP.
        assert_eq!(policy.intercept_ports, [80, 5432, 6379, 8080, 9092]);
        let no_flags = NodeSettings { proxy_port: 15001, ..NodeSettings::default() };
        let policy = datapath_policy(&snapshot, &Resolved::new(), &no_flags);
        assert_eq!(policy.intercept_ports, [5432, 6379, 8080, 9092], "the configuration's ports need no flag");
        assert!(host_matches("*.Example", "cache.example") && !host_matches("*.example", "example"));
    }

    #[test]
    fn the_mesh_config_sets_the_mode_and_the_command_line_overrides_it() {
        let registry_only = snapshot(
            "apiVersion: v1
kind: ConfigMap
metadata: {name: istio, namespace: istio-system}
data:
  mesh: |
    outboundTrafficPolicy:
      mode: REGISTRY_ONLY
",
        );
        assert_eq!(
            datapath_policy(&registry_only, &Resolved::new(), &NodeSettings::default()).mode,
            OutboundMode::RegistryOnly
        );
        let node = NodeSettings { mode: Some(OutboundMode::AllowAny), ..NodeSettings::default() };
        assert_eq!(datapath_policy(&registry_only, &Resolved::new(), &node).mode, OutboundMode::AllowAny);
    }
}
