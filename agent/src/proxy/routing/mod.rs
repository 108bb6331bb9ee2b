//! Routing one request, without I/O: its context's VirtualServices (first match wins), then the registry and the
//! outbound mode decide where it goes, or what the proxy answers itself. A mesh route to this gateway's own
//! Service continues in the gateway context, in process, so two-hop egress configurations work on one node.

use std::net::SocketAddr;

use bytes::Bytes;
use http::{
    uri::{InvalidUri, PathAndQuery},
    Request, StatusCode, Uri,
};

pub mod explain;

use super::failure::Failure;
pub use crate::policy::host_match::strip_port as host_of;
use crate::policy::{
    clusters::{Cluster, Connect, UpstreamDefaults},
    http_match::RequestView,
    routes::{
        Action, HostVerify, Matched, PortKind, ProxyPolicy, Redirect, Route, Service, ServiceChoice, Target, Upstream,
        Viewer,
    },
    OutboundMode,
};
use crate::{config::workloads::Workload, policy::labels::DestinationLabels};

/// Which listener a request arrived on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listener {
    /// The transparent listener: the workloads' intercepted traffic (Istio's `mesh` gateway).
    Mesh,
    /// A Gateway server port.
    Gateway(u16),
    /// The forward-proxy port (clients with `HTTP_PROXY` set): mesh semantics, the destination named by the
    /// request and resolved by the proxy.
    Forward,
}

impl Listener {
    /// Whether requests are routed as the workloads' own (the `mesh` gateway).
    fn is_mesh(self) -> bool {
        matches!(self, Listener::Mesh | Listener::Forward)
    }
}

/// Who looks hosts up for a request on `listener` from `source`: the workload, for its own traffic (intercepted or
/// forward-proxied); the gateway, on its Gateway ports.
pub fn viewer(listener: Listener, source: Option<&Workload>) -> Viewer<'_> {
    if listener.is_mesh() {
        Viewer::Workload(source)
    } else {
        Viewer::Gateway
    }
}

/// Where a routed request is sent.
#[derive(Debug)]
pub struct Destination<'p> {
    pub address: SocketAddr,
    /// The upstream speaks HTTP/2 (the service port is declared HTTP2 or GRPC).
    pub http2: bool,
    pub labels: DestinationLabels,
    /// The registered service the request goes through, and how; a retry goes to its next endpoint.
    pub service: Option<ServiceChoice<'p>>,
    /// The request's consistent hash, for a cluster that balances by one.
    pub hash: Option<u64>,
}

impl<'p> Destination<'p> {
    /// The address for another try: the service's next endpoint, or the same address.
    pub fn next_address(&self) -> SocketAddr {
        match self.service.map(|service| service.upstream(self.hash)) {
            Some(Upstream::Endpoint(address)) => address,
            _ => self.address,
        }
    }

    /// Sends the request to the endpoint its key hashes to, when the cluster balances by a consistent hash and the
    /// request has the key (`headers`, `uri`, the client's address `peer`).
    pub fn hash_request(&mut self, headers: &http::HeaderMap, uri: &Uri, peer: std::net::IpAddr) {
        let Some(key) = self.cluster().and_then(|cluster| cluster.policy.hash.as_ref()) else { return };
        self.hash = key.hash(headers, uri, peer);
        if self.hash.is_some() {
            self.address = self.next_address();
        }
    }

    /// How a new upstream connection is opened: the cluster's `connectTimeout` and `tcpKeepalive` over the mesh
    /// config's `defaults`.
    pub fn connect(&self, defaults: &UpstreamDefaults) -> Connect {
        defaults.connect(self.cluster().map(|cluster| &*cluster.policy))
    }

    /// How the cluster's HTTP/1.1 upstream connections are reused (its DestinationRule's `connectionPool.http`).
    pub fn reuse(&self) -> crate::proxy::upstreams::Reuse {
        let policy = self.cluster().map(|cluster| &cluster.policy);
        crate::proxy::upstreams::Reuse {
            max_requests: policy.and_then(|policy| policy.max_requests_per_connection),
            idle_timeout: policy
                .and_then(|policy| policy.http_idle_timeout)
                .unwrap_or(crate::proxy::upstreams::IDLE_TIMEOUT),
            lifetime: self.lifetime(),
        }
    }

    /// How long an upstream connection of the cluster lives at most (`connectionPool.tcp.maxConnectionDuration`).
    pub fn lifetime(&self) -> Option<std::time::Duration> {
        self.cluster().and_then(|cluster| cluster.policy.max_connection_duration())
    }

    /// The cluster the request goes through (its limits and outlier detection), for a registered service.
    pub fn cluster(&self) -> Option<&'p Cluster> {
        self.service.and_then(|service| service.cluster())
    }
}

#[derive(Debug)]
pub enum Decision<'p> {
    Fail {
        failure: Failure,
        labels: Option<DestinationLabels>,
    },
    Respond {
        route: &'p Route,
        status: StatusCode,
        body: Bytes,
    },
    Redirect {
        route: &'p Route,
        status: StatusCode,
        location: String,
    },
    /// A plain-text request to a Gateway server with `tls.httpsRedirect`: 301 to the same URL over HTTPS.
    RequireTls {
        location: String,
    },
    Forward {
        route: Option<Matched<'p>>,
        target: Option<&'p Target>,
        destination: Destination<'p>,
        /// The Host is registered at other addresses than the one connected to (routed or trusted by
        /// `--host-verify`).
        host_mismatch: bool,
    },
}

/// Whether an intercepted request for `authority`, sent to `local`, names a host the registry knows at no
/// address (a wildcard, or resolution `NONE` without `addresses`): under `--host-verify strict` the Host must then
/// resolve to the address the client connected to, or anything could be reached by naming such a host.
pub fn host_needs_dns_verification(
    policy: &ProxyPolicy,
    authority: &str,
    listener: Listener,
    local: SocketAddr,
    source: Option<&Workload>,
) -> bool {
    policy.verifies_hosts_by_dns
        && listener == Listener::Mesh
        && policy
            .registered_for(host_of(authority), local.port(), Viewer::Workload(source))
            .is_some_and(|service| service.known_at(local.ip()).is_none())
}

/// Decides what becomes of `request`, for `authority`, received on `listener` at `local` (for intercepted
/// traffic, the original destination; for forward-proxied traffic, the address the authority resolved to). `roll` (uniform) picks among weighted destinations.
pub fn decide<'p, B>(
    policy: &'p ProxyPolicy,
    request: &Request<B>,
    authority: &str,
    listener: Listener,
    local: SocketAddr,
    source: Option<&Workload>,
    roll: u32,
) -> Decision<'p> {
    decide_noting_hop(policy, request, authority, (listener, local), source, roll, &mut None)
}

/// As [`decide`]; `hop` is set to the Gateway port the request continued on when a mesh route sent it to this
/// gateway's own Service (the two-hop egress pattern), whose AuthorizationPolicies then apply too.
pub fn decide_noting_hop<'p, B>(
    policy: &'p ProxyPolicy,
    request: &Request<B>,
    authority: &str,
    (listener, local): (Listener, SocketAddr),
    source: Option<&Workload>,
    roll: u32,
    hop: &mut Option<u16>,
) -> Decision<'p> {
    let mut listener = listener;
    let mut port = local.port();
    let host_name = host_of(authority);
    // Whose exportTo view applies: the source workload's namespace for the workloads' own traffic (unknown: all
    // visible). On Gateway ports every resource is visible.
    // The service an intercepted request's own host is registered as, for its workload: looked up once, for the
    // fronting check and for the request's destination when it goes to that host on that port (most do).
    let own = (listener == Listener::Mesh).then(|| policy.registered_for(host_name, port, Viewer::Workload(source)));
    // Domain fronting: an intercepted request for a registered host, sent to an address that is not the host's.
    let host_mismatch = own.flatten().is_some_and(|service| service.known_at(local.ip()) == Some(false));
    if host_mismatch && policy.host_verify == HostVerify::Strict {
        return Decision::Fail { failure: Failure::HostMismatch, labels: None };
    }
    let reroute = host_mismatch && policy.host_verify == HostVerify::Route;
    // At most two passes: the mesh, then (for a route to this gateway's own Service) the gateway.
    for _ in 0..2 {
        let viewer = viewer(listener, source);
        let (gateway_id, virtual_host) = match listener {
            Listener::Mesh | Listener::Forward => ("mesh", policy.mesh_routes(authority)),
            Listener::Gateway(gateway_port) => {
                port = gateway_port;
                match policy.gateway_on(gateway_port) {
                    Some(gateway) => {
                        let virtual_host = gateway.hosts.get(authority);
                        if virtual_host.is_some() && gateway.https_redirect_ports.contains(&gateway_port) {
                            let path = request.uri().path_and_query().map_or("/", |pq| pq.as_str());
                            return Decision::RequireTls { location: format!("https://{host_name}{path}") };
                        }
                        (gateway.id.as_str(), virtual_host)
                    }
                    None => ("", None),
                }
            }
        };
        let matched = match virtual_host {
            Some(host) => {
                let view = RequestView {
                    path: request.uri().path(),
                    query: request.uri().query(),
                    method: request.method().as_str(),
                    scheme: request.uri().scheme_str().unwrap_or("http"),
                    authority,
                    headers: request.headers(),
                    port,
                    gateway: gateway_id,
                    source,
                };
                let visible = |route: &Route| viewer.sees(policy, &route.scope.exported, host_name, port);
                match host.first_match(&view, visible) {
                    Some(found) => Some(found),
                    // None of the host's VirtualServices is exported to this workload: the host's default route.
                    None if listener.is_mesh() && !host.routes.iter().any(visible) => None,
                    None => return Decision::Fail { failure: Failure::NoRoute, labels: None },
                }
            }
            // A Gateway serves only the hosts its VirtualServices name.
            None if !listener.is_mesh() => return Decision::Fail { failure: Failure::NoRoute, labels: None },
            None => None,
        };
        let target = match matched.map(|matched| (matched.route, &matched.route.action)) {
            Some((route, Action::Respond(response))) => {
                let (status, body) = &**response;
                return Decision::Respond { route, status: *status, body: body.clone() };
            }
            Some((route, Action::Redirect(redirect))) => {
                let location = redirect_location(redirect, authority, request.uri());
                return Decision::Redirect { route, status: redirect.status, location };
            }
            Some((_, Action::Forward(targets))) => targets.pick(roll),
            None => None,
        };
        let (host, destination_port, subset) = match target {
            Some(target) => (target.host(), target.port().unwrap_or(port), target.subset()),
            None => (host_name, port, None),
        };
        if listener.is_mesh() && policy.is_own_service(host) {
            listener = Listener::Gateway(destination_port);
            *hop = Some(destination_port);
            continue;
        }
        let registered = match own {
            Some(found) if listener == Listener::Mesh && host == host_name && destination_port == port => found,
            _ => policy.registered_for(host, destination_port, viewer),
        };
        let asked = (host, destination_port, subset);
        return match destination_of(policy, registered, asked, (listener, local), viewer) {
            Ok(mut destination) => {
                if reroute && destination.address.ip() == local.ip() {
                    match destination.service.and_then(|choice| choice.service.own_address(choice.port)) {
                        Some(address) => destination.address = address,
                        None => return Decision::Fail { failure: Failure::HostMismatch, labels: None },
                    }
                }
                Decision::Forward { route: matched, target, destination, host_mismatch }
            }
            Err((failure, labels)) => Decision::Fail { failure, labels },
        };
    }
    // A gateway route back to this gateway's own Service would loop.
    Decision::Fail { failure: Failure::NoCluster, labels: None }
}

/// Where `host`:`port` is reached from `listener`, by the registry and the outbound mode.
/// `source`: the workload that sent intercepted traffic (when known), whose namespace's exportTo view of the
/// registry applies, and whose Sidecar's outbound mode.
pub fn destination<'p>(
    policy: &'p ProxyPolicy,
    host: &str,
    port: u16,
    subset: Option<&'p str>,
    listener: Listener,
    local: SocketAddr,
    viewer: Viewer<'_>,
) -> Result<Destination<'p>, (Failure, Option<DestinationLabels>)> {
    let registered = policy.registered_for(host, port, viewer);
    destination_of(policy, registered, (host, port, subset), (listener, local), viewer)
}

/// As [`destination`], the service `registered` for `host` on `port` (as `viewer` sees it) already looked up.
fn destination_of<'p>(
    policy: &'p ProxyPolicy,
    registered: Option<&'p Service>,
    (host, port, subset): (&str, u16, Option<&'p str>),
    (listener, local): (Listener, SocketAddr),
    viewer: Viewer<'_>,
) -> Result<Destination<'p>, (Failure, Option<DestinationLabels>)> {
    // Intercepted (or forward-proxied) requests have an original destination: the address the client (or the
    // proxy's own lookup) chose.
    let intercepted = listener.is_mesh();
    let original = SocketAddr::new(local.ip(), port);
    match registered {
        Some(service) => {
            // Through the DestinationRule that applies to the viewer. Labelled as compiled: the subset's cluster,
            // or the host's (for a subset that is not defined).
            let choice = ServiceChoice { service, port, subset, variant: service.variant(viewer, policy) };
            let labels = choice
                .cluster()
                .or_else(|| ServiceChoice { subset: None, ..choice }.cluster())
                .map(|cluster| service.labels(cluster));
            let address = match choice.upstream(None) {
                Upstream::Endpoint(address) => address,
                Upstream::OriginalDestination if intercepted => original,
                Upstream::OriginalDestination | Upstream::NoSubset => return Err((Failure::NoCluster, labels)),
                Upstream::NoEndpoint => return Err((Failure::NoHealthyUpstream, labels)),
            };
            let labels = labels.unwrap_or_else(|| crate::telemetry::passthrough::destination(host));
            // HTTP/2 upstream where the port declares it, or the DestinationRule or the mesh upgrades to it.
            let rule = choice.cluster().map(|cluster| &*cluster.policy);
            let http_port = service.port_kind(port) == Some(PortKind::Http);
            let http2 = service.http2(port) || policy.upstream.speaks_http2(rule, http_port);
            Ok(Destination { address, http2, labels, service: Some(choice), hash: None })
        }
        None if viewer.mode(policy) == OutboundMode::RegistryOnly => {
            Err((Failure::Blackholed, Some(DestinationLabels::blackhole())))
        }
        None if intercepted => Ok(Destination {
            address: original,
            http2: false,
            labels: crate::telemetry::passthrough::destination(host),
            service: None,
            hash: None,
        }),
        None => Err((Failure::NoCluster, None)),
    }
}

/// The `Location` of a redirect: the redirect's scheme, authority, port and path, the request's otherwise (a
/// redirect path without a query keeps the request's query, as Envoy does).
fn redirect_location(redirect: &Redirect, authority: &str, uri: &Uri) -> String {
    let scheme = redirect.scheme.as_deref().unwrap_or("http");
    let host = redirect.authority.as_deref().unwrap_or(authority);
    let host = match redirect.port {
        Some(port) => format!("{}:{port}", host_of(host)),
        None => host.to_owned(),
    };
    let path = match &redirect.uri {
        Some(path) if path.contains('?') => path.clone(),
        Some(path) => format!("{path}{}", uri.query().map(|q| format!("?{q}")).unwrap_or_default()),
        None => uri.path_and_query().map_or_else(|| "/".to_owned(), |pq| pq.as_str().to_owned()),
    };
    format!("{scheme}://{host}{path}")
}

/// The path and query sent upstream: a route's `rewrite.uri` replaces the prefix the route matched on (or the
/// whole path), `uriRegexRewrite` rewrites the path; the query is kept. Without a rewrite it is the client's, shared
/// rather than copied. A rewrite that makes no valid path is an error, naming it.
pub fn rewritten_path(route: Option<Matched<'_>>, uri: &Uri) -> Result<PathAndQuery, InvalidUri> {
    let Some(rewrite) = route.and_then(|matched| matched.route.rewrite()) else {
        return Ok(uri.path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/")));
    };
    let path = uri.path();
    let prefix = route.and_then(|matched| matched.uri_prefix);
    let mut path = if let Some(uri) = &rewrite.uri {
        match prefix {
            Some(prefix) => format!("{uri}{}", path.get(prefix.len()..).unwrap_or("")),
            _ => uri.to_string(),
        }
    } else if let Some((regex, replacement)) = &rewrite.uri_regex {
        regex.replace_all(path, &**replacement).into_owned()
    } else {
        path.to_owned()
    };
    if let Some(query) = uri.query() {
        path.push('?');
        path.push_str(query);
    }
    PathAndQuery::try_from(path)
}

#[cfg(test)]
mod tests;
