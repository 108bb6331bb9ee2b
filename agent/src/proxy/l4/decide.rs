//! What becomes of a connection the proxy relays without reading: TLS by its ClientHello's server name, TCP by
//! the address it was sent to; by the registry, the `tls` and `tcp` routes of the mesh and, on a Gateway's port
//! (or continuing from a mesh route to the gateway's own Service), of that Gateway. No I/O.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::sync::OwnedSemaphorePermit;

use crate::{
    config::{service_entry::Resolution, virtual_service::MESH, workloads::Workload},
    policy::{
        clusters::{Admission, ClusterPolicy, ClusterState, Connect},
        labels::DestinationLabels,
        routes::{HostVerify, L4Route, L4View, PortKind, ProxyPolicy, ServiceChoice, Target, Upstream, Viewer},
        OutboundMode,
    },
    telemetry::response_flags::ResponseFlag,
};

/// Where a TLS connection arrived: intercepted (the mesh's `tls` routes apply), or on a Gateway server's port
/// that passes TLS through (that Gateway's do).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arrival {
    Intercepted,
    Gateway(u16),
}

/// What becomes of a TLS connection.
#[derive(Debug, PartialEq)]
pub enum Verdict {
    /// Relayed to `address`. `verify`: a name registered at no address, which must resolve to `address` first
    /// (`--host-verify strict`).
    Forward { address: SocketAddr, labels: DestinationLabels, verify: Option<String>, terms: RelayTerms },
    /// Relayed to what `host` resolves to, on `port`: a Gateway's route to a host registered at no address.
    Resolve { host: String, port: u16, labels: DestinationLabels, terms: RelayTerms },
    /// Closed without a byte of any server's.
    Refuse { labels: DestinationLabels, flag: ResponseFlag, reason: &'static str },
}

/// How a relayed connection's upstream side is opened, how many may be open at once and how long the relay may
/// last: the destination's DestinationRule `connectionPool.tcp` over the mesh config's defaults.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelayTerms {
    /// Within how long, with which keepalive.
    pub connect: Connect,
    /// `idleTimeout`; `None`: the agent's `--idle-timeout`.
    pub idle: Option<Duration>,
    /// `maxConnectionDuration`: the relay is ended this long after it began, however busy.
    pub lifetime: Option<Duration>,
    /// The cluster whose `maxConnections` the connection counts against, where it sets one.
    pub limited: Option<Limited>,
}

/// A cluster with a connection limit: the same only as itself.
#[derive(Clone, Debug)]
pub struct Limited(Arc<ClusterState>);

impl PartialEq for Limited {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for Limited {}

impl Limited {
    /// A place for one more relayed connection, without waiting (Envoy's `tcp_proxy` queues none): `None` when
    /// every place is taken.
    pub fn admit(&self) -> Option<OwnedSemaphorePermit> {
        match self.0.admit() {
            Admission::Now(permit) => permit,
            Admission::Wait(_) | Admission::Overflow => None,
        }
    }
}

impl RelayTerms {
    /// For a destination that is no cluster of a DestinationRule's (passthrough): the mesh's.
    fn of_mesh(policy: &ProxyPolicy) -> RelayTerms {
        RelayTerms { connect: policy.upstream.connect(None), idle: None, lifetime: None, limited: None }
    }

    fn of(choice: &ServiceChoice<'_>, policy: &ProxyPolicy) -> RelayTerms {
        let cluster = choice.cluster();
        let rule = cluster.map(|cluster| &*cluster.policy);
        RelayTerms {
            connect: policy.upstream.connect(rule),
            idle: rule.and_then(|rule| rule.tcp_idle_timeout),
            lifetime: rule.and_then(ClusterPolicy::max_connection_duration),
            limited: cluster.filter(|cluster| cluster.policy.limits.is_some()).map(|c| Limited(c.state.clone())),
        }
    }
}

impl Verdict {
    /// The verdict, relayed with `choice`'s terms.
    fn with_terms_of(mut self, choice: &ServiceChoice<'_>, policy: &ProxyPolicy) -> Verdict {
        if let Verdict::Forward { terms, .. } | Verdict::Resolve { terms, .. } = &mut self {
            *terms = RelayTerms::of(choice, policy);
        }
        self
    }
}

/// How a connection whose name is registered at other addresses than the dialled one was handled, for
/// `sluice_host_mismatch_total{action}`.
pub type Mismatch = Option<&'static str>;

/// Decides a TLS connection from `source` to `dialled` (on a Gateway: the listener's address) whose ClientHello
/// named `server_name`; `roll` (uniform) picks among a route's weighted destinations.
pub fn decide_tls(
    policy: &ProxyPolicy,
    server_name: Option<&str>,
    dialled: SocketAddr,
    source: Option<&Workload>,
    arrival: Arrival,
    roll: u32,
) -> (Verdict, Mismatch) {
    decide_tls_noting_hop(policy, server_name, dialled, source, arrival, roll, &mut None)
}

/// As [`decide_tls`]; `hop` is set to the Gateway port an intercepted connection continued on when a mesh route
/// sent it to this gateway's own Service, whose AuthorizationPolicies then apply too.
pub fn decide_tls_noting_hop(
    policy: &ProxyPolicy,
    server_name: Option<&str>,
    dialled: SocketAddr,
    source: Option<&Workload>,
    arrival: Arrival,
    roll: u32,
    hop: &mut Option<u16>,
) -> (Verdict, Mismatch) {
    let viewer = Viewer::Workload(source);
    let gateway_port = match arrival {
        Arrival::Gateway(port) => port,
        Arrival::Intercepted => {
            let routed = server_name.and_then(|name| {
                let routes = policy.mesh_tls_routes(name)?;
                let view = L4View { server_name: Some(name), destination: dialled, gateway: MESH, source };
                let visible = |rule: &L4Route| viewer.sees(policy, &rule.scope.exported, name, dialled.port());
                routes.first_match(&view, visible)?.targets.pick(roll)
            });
            match routed {
                // A route to this gateway's own Service continues in the gateway's context, in process.
                Some(target) if policy.is_own_service(target.host()) => {
                    *hop = Some(target.port().unwrap_or(dialled.port()));
                    target.port().unwrap_or(dialled.port())
                }
                Some(target) => return routed_tls(policy, target, server_name, dialled, viewer),
                // No route for the name: the registered host itself, as without a VirtualService.
                None => return by_registry(policy, server_name.unwrap_or(""), server_name, dialled, viewer),
            }
        }
    };
    let mut gateways = policy.tls_gateways_on(gateway_port).peekable();
    if gateways.peek().is_none() {
        return (no_route("no_gateway_server"), None);
    }
    let Some(name) = server_name else { return (no_route("no_server_name"), None) };
    let at = SocketAddr::new(dialled.ip(), gateway_port);
    let visible = |rule: &L4Route| Viewer::Gateway.sees(policy, &rule.scope.exported, name, gateway_port);
    // Every Gateway serving TLS on the port, in turn: their servers share it, as Istio merges them.
    let routed = gateways.find_map(|gateway| {
        let view = L4View { server_name: Some(name), destination: at, gateway: &gateway.id, source };
        gateway.tls_routes(name)?.first_match(&view, visible)?.targets.pick(roll)
    });
    match routed {
        Some(target) => (to_target(policy, target, gateway_port, Viewer::Gateway, Some(name), None), None),
        None => (no_route("no_route"), None),
    }
}

/// Decides an opaque TCP connection from `source` to `dialled` (on a Gateway: the listener's address): by the
/// registered service the address is, its `tcp` routes, and on a Gateway port the Gateway's.
pub fn decide_tcp(
    policy: &ProxyPolicy,
    dialled: SocketAddr,
    source: Option<&Workload>,
    arrival: Arrival,
    roll: u32,
) -> (Verdict, Mismatch) {
    decide_tcp_noting_hop(policy, dialled, source, arrival, roll, &mut None)
}

/// As [`decide_tcp`], noting the hop to this gateway's own Service as [`decide_tls_noting_hop`] does.
pub fn decide_tcp_noting_hop(
    policy: &ProxyPolicy,
    dialled: SocketAddr,
    source: Option<&Workload>,
    arrival: Arrival,
    roll: u32,
    hop: &mut Option<u16>,
) -> (Verdict, Mismatch) {
    let viewer = Viewer::Workload(source);
    let port = dialled.port();
    let gateway_port = match arrival {
        Arrival::Gateway(port) => port,
        Arrival::Intercepted => {
            // A port declared HTTP is the HTTP proxy's: bytes it cannot read are not relayed past its routes.
            let service = policy.registered_at(dialled, viewer);
            if service.is_some_and(|service| service.port_kind(port) == Some(PortKind::Http)) {
                return (no_route("not_http_on_an_http_port"), None);
            }
            let routed = service.and_then(|service| {
                let routes = policy.mesh_tcp_routes(&service.host)?;
                let view = L4View { server_name: None, destination: dialled, gateway: MESH, source };
                let visible = |rule: &L4Route| viewer.sees(policy, &rule.scope.exported, &service.host, port);
                routes.first_match(&view, visible)?.targets.pick(roll)
            });
            match routed {
                Some(target) if policy.is_own_service(target.host()) => {
                    *hop = Some(target.port().unwrap_or(port));
                    target.port().unwrap_or(port)
                }
                Some(target) => return (to_target(policy, target, port, viewer, None, Some(dialled)), None),
                None => return by_registry(policy, "", None, dialled, viewer),
            }
        }
    };
    let mut gateways = policy.tcp_gateways_on(gateway_port).peekable();
    if gateways.peek().is_none() {
        return (no_route("no_gateway_server"), None);
    }
    let at = SocketAddr::new(dialled.ip(), gateway_port);
    let visible = |rule: &L4Route| Viewer::Gateway.sees(policy, &rule.scope.exported, "", gateway_port);
    let routed = gateways.find_map(|gateway| {
        let view = L4View { server_name: None, destination: at, gateway: &gateway.id, source };
        gateway.tcp_routes.as_ref()?.first_match(&view, visible)?.targets.pick(roll)
    });
    match routed {
        Some(target) => (to_target(policy, target, gateway_port, Viewer::Gateway, None, None), None),
        None => (no_route("no_route"), None),
    }
}

/// Where an intercepted connection a mesh `tls` route took goes: to the route's destination as Envoy's cluster
/// would choose (its subset, its endpoints, the load balancer), so a name that routes elsewhere cannot reach the
/// address it was sent to. A destination with resolution NONE has no endpoints of its own: the connection goes to
/// the address dialled, which must then be the destination's (no fronting), as without a route.
fn routed_tls(
    policy: &ProxyPolicy,
    target: &Target,
    server_name: Option<&str>,
    dialled: SocketAddr,
    viewer: Viewer<'_>,
) -> (Verdict, Mismatch) {
    let port = target.port().unwrap_or(dialled.port());
    let to_original =
        policy.registered_for(target.host(), port, viewer).is_none_or(|service| service.resolution == Resolution::None);
    if to_original {
        by_registry(policy, target.host(), server_name, SocketAddr::new(dialled.ip(), port), viewer)
    } else {
        (to_target(policy, target, port, viewer, server_name, Some(dialled)), None)
    }
}

fn no_route(reason: &'static str) -> Verdict {
    Verdict::Refuse { labels: DestinationLabels::blackhole(), flag: ResponseFlag::NoRouteFound, reason }
}

/// Where a route's `target` goes, as `viewer` sees the registry: an endpoint of the registered host; for one with
/// resolution NONE, `original` (intercepted traffic: the address dialled), else an address it is registered at,
/// else what the name resolves to (a route's wildcard host: the name the client asked for, `server_name`).
fn to_target(
    policy: &ProxyPolicy,
    target: &Target,
    port: u16,
    viewer: Viewer<'_>,
    server_name: Option<&str>,
    original: Option<SocketAddr>,
) -> Verdict {
    let (host, port) = (target.host(), target.port().unwrap_or(port));
    let resolved_name = match server_name {
        Some(name) if host.starts_with('*') => name,
        _ => host,
    };
    let unaddressed = |labels| match original {
        Some(address) => Verdict::Forward {
            address: SocketAddr::new(address.ip(), port),
            labels,
            verify: None,
            terms: RelayTerms::of_mesh(policy),
        },
        None => Verdict::Resolve { host: resolved_name.to_owned(), port, labels, terms: RelayTerms::of_mesh(policy) },
    };
    let Some(service) = policy.registered_for(host, port, viewer) else {
        return match viewer.mode(policy) {
            OutboundMode::RegistryOnly => blackholed("unregistered_destination"),
            OutboundMode::AllowAny => unaddressed(crate::telemetry::passthrough::destination(resolved_name)),
        };
    };
    let choice = ServiceChoice { service, port, subset: target.subset(), variant: service.variant(viewer, policy) };
    let labels = labels_of(&choice);
    let verdict = match choice.upstream(None) {
        Upstream::Endpoint(address) => {
            Verdict::Forward { address, labels, verify: None, terms: RelayTerms::of_mesh(policy) }
        }
        // Resolution NONE: on a Gateway (no original destination), an address the host is registered at.
        Upstream::OriginalDestination => match (original, service.own_address(port)) {
            (None, Some(address)) => {
                Verdict::Forward { address, labels, verify: None, terms: RelayTerms::of_mesh(policy) }
            }
            _ => unaddressed(labels),
        },
        Upstream::NoEndpoint => {
            Verdict::Refuse { labels, flag: ResponseFlag::NoHealthyUpstream, reason: "no_endpoint" }
        }
        Upstream::NoSubset => Verdict::Refuse { labels, flag: ResponseFlag::NoClusterFound, reason: "no_subset" },
    };
    verdict.with_terms_of(&choice, policy)
}

fn blackholed(reason: &'static str) -> Verdict {
    Verdict::Refuse { labels: DestinationLabels::blackhole(), flag: ResponseFlag::NoHealthyUpstream, reason }
}

fn labels_of(choice: &ServiceChoice<'_>) -> DestinationLabels {
    choice
        .cluster()
        .map(|cluster| choice.service.labels(cluster))
        .unwrap_or_else(|| crate::telemetry::passthrough::destination(&choice.service.host))
}

/// Decides an intercepted connection to `dialled` by the registry: `host` (the name asked for, or a route's
/// destination; empty when the hello named none) on `dialled`'s port, else the dialled address itself.
fn by_registry(
    policy: &ProxyPolicy,
    host: &str,
    server_name: Option<&str>,
    dialled: SocketAddr,
    viewer: Viewer<'_>,
) -> (Verdict, Mismatch) {
    let port = dialled.port();
    let registered = match host {
        "" => policy.registered_at(dialled, viewer),
        host => policy.registered_for(host, port, viewer),
    };
    let Some(service) = registered else {
        return match viewer.mode(policy) {
            OutboundMode::RegistryOnly => {
                let reason = if server_name.is_some() { "unregistered_server_name" } else { "unregistered_address" };
                (blackholed(reason), None)
            }
            OutboundMode::AllowAny => {
                let shown = server_name.map_or_else(|| dialled.to_string(), str::to_owned);
                let labels = crate::telemetry::passthrough::destination(&shown);
                (Verdict::Forward { address: dialled, labels, verify: None, terms: RelayTerms::of_mesh(policy) }, None)
            }
        };
    };
    let choice = ServiceChoice { service, port, subset: None, variant: service.variant(viewer, policy) };
    let labels = labels_of(&choice);
    let (verdict, mismatch) = match service.known_at(dialled.ip()) {
        Some(true) => {
            // One of its `addresses` that no endpoint is (a virtual IP): an endpoint, as Envoy's cluster chooses.
            let virtual_ip = choice.cluster().is_some_and(|cluster| cluster.endpoint(dialled.ip()).is_none());
            let upstream = if virtual_ip { choice.upstream(None) } else { Upstream::OriginalDestination };
            let verdict = match upstream {
                Upstream::Endpoint(address) => {
                    Verdict::Forward { address, labels, verify: None, terms: RelayTerms::of_mesh(policy) }
                }
                Upstream::NoEndpoint | Upstream::NoSubset => {
                    Verdict::Refuse { labels, flag: ResponseFlag::NoHealthyUpstream, reason: "no_endpoint" }
                }
                Upstream::OriginalDestination => {
                    Verdict::Forward { address: dialled, labels, verify: None, terms: RelayTerms::of_mesh(policy) }
                }
            };
            (verdict, None)
        }
        // The name is another host's address: domain fronting by SNI, or a stale DNS answer.
        Some(false) => match policy.host_verify {
            HostVerify::Strict => {
                (Verdict::Refuse { labels, flag: ResponseFlag::NoRouteFound, reason: "fronted" }, Some("refused"))
            }
            HostVerify::Route => match service.own_address(port) {
                Some(address) => (
                    Verdict::Forward { address, labels, verify: None, terms: RelayTerms::of_mesh(policy) },
                    Some("routed"),
                ),
                None => {
                    let refused = Verdict::Refuse { labels, flag: ResponseFlag::NoRouteFound, reason: "fronted" };
                    (refused, Some("refused"))
                }
            },
            HostVerify::Off => (
                Verdict::Forward { address: dialled, labels, verify: None, terms: RelayTerms::of_mesh(policy) },
                Some("trusted"),
            ),
        },
        // Registered at no address (a wildcard, resolution NONE): only DNS can tell whether the dialled
        // address is the name's.
        None => {
            let verify = match (server_name, policy.host_verify) {
                (Some(name), HostVerify::Strict) => Some(name.to_owned()),
                _ => None,
            };
            (Verdict::Forward { address: dialled, labels, verify, terms: RelayTerms::of_mesh(policy) }, None)
        }
    };
    (verdict.with_terms_of(&choice, policy), mismatch)
}

#[cfg(test)]
mod tests;
