//! Routing one request, without I/O: its context's VirtualServices (first match wins), then the registry and the
//! outbound mode decide where it goes, or what the proxy answers itself. A mesh route to this gateway's own
//! Service continues in the gateway context, in process, so two-hop egress configurations work on one node.

use std::{net::SocketAddr, time::Duration};

use bytes::Bytes;
use http::{
    uri::{InvalidUri, PathAndQuery},
    Request, StatusCode, Uri,
};

use super::{failure::Failure, tcp};
pub use crate::policy::host_match::strip_port as host_of;
use crate::policy::{
    clusters::Cluster,
    http_match::RequestView,
    routes::{Action, HostVerify, Matched, ProxyPolicy, Redirect, Route, ServiceChoice, Target, Upstream, Viewer},
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

    /// How long a new upstream connection may take: the cluster's `connectTimeout`, else Istio's default.
    pub fn connect_timeout(&self) -> Duration {
        self.cluster().and_then(|cluster| cluster.policy.connect_timeout).unwrap_or(tcp::CONNECT_TIMEOUT)
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
    let mut listener = listener;
    let mut port = local.port();
    let host_name = host_of(authority);
    // Whose exportTo view applies: the source workload's namespace for the workloads' own traffic (unknown: all
    // visible). On Gateway ports every resource is visible.
    // Domain fronting: an intercepted request for a registered host, sent to an address that is not the host's.
    let host_mismatch = listener == Listener::Mesh
        && policy
            .registered_for(host_name, port, Viewer::Workload(source))
            .is_some_and(|service| service.known_at(local.ip()) == Some(false));
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
                    Some(gateway) => (gateway.id.as_str(), gateway.hosts.get(authority)),
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
            continue;
        }
        return match destination(policy, host, destination_port, subset, listener, local, viewer) {
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
    // Intercepted (or forward-proxied) requests have an original destination: the address the client (or the
    // proxy's own lookup) chose.
    let intercepted = listener.is_mesh();
    let original = SocketAddr::new(local.ip(), port);
    match policy.registered_for(host, port, viewer) {
        Some(service) => {
            // Through the DestinationRule that applies to the viewer. Labelled as compiled: the subset's cluster,
            // or the host's (for a subset that is not defined).
            let choice = ServiceChoice { service, port, subset, variant: service.variant(viewer, policy) };
            let labels = choice
                .cluster()
                .or_else(|| ServiceChoice { subset: None, ..choice }.cluster())
                .map(|c| c.labels.clone());
            let address = match choice.upstream(None) {
                Upstream::Endpoint(address) => address,
                Upstream::OriginalDestination if intercepted => original,
                Upstream::OriginalDestination | Upstream::NoSubset => return Err((Failure::NoCluster, labels)),
                Upstream::NoEndpoint => return Err((Failure::NoHealthyUpstream, labels)),
            };
            let labels = labels.unwrap_or_else(|| crate::telemetry::passthrough::destination(host));
            Ok(Destination { address, http2: service.http2(port), labels, service: Some(choice), hash: None })
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
            _ => uri.clone(),
        }
    } else if let Some((regex, replacement)) = &rewrite.uri_regex {
        regex.replace_all(path, replacement.as_str()).into_owned()
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
mod tests {
    use std::{collections::BTreeMap, sync::Arc};

    use super::*;
    use crate::{
        config::{resolver::Resolved, Snapshot},
        policy::{
            bindings::bind,
            routes::{proxy_policy, HostVerify, ProxySettings},
            sidecars::SidecarModes,
        },
    };

    fn policy_verifying(yaml: &str, labels: &[(&str, &str)], own: &[&str], verify: HostVerify) -> ProxyPolicy {
        let snapshot = Snapshot::from_yaml(yaml);
        let labels: BTreeMap<String, String> = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let resolved = Resolved::from([("httpbin.org".to_owned(), vec!["203.0.113.80".parse().unwrap()])]);
        let settings = ProxySettings {
            own_services: own.iter().map(|s| s.to_string()).collect(),
            host_verify: verify,
            gateway_namespace: None,
            upgrades: Vec::new(),
        };
        let sidecars = Arc::new(SidecarModes::compile(&snapshot, OutboundMode::RegistryOnly));
        proxy_policy(&snapshot, &resolved, &bind(&snapshot, &labels), sidecars, &settings, &Default::default())
    }

    fn get(uri: &str) -> Request<()> {
        Request::get(uri).body(()).unwrap()
    }

    fn seed() -> ProxyPolicy {
        seed_verifying(HostVerify::Strict)
    }

    fn seed_verifying(verify: HostVerify) -> ProxyPolicy {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/examples/seeds/create-egress-gateway.yaml"
        ))
        .unwrap();
        policy_verifying(
            &text,
            &[("gateway-name", "egress-demo"), ("gateway-type", "egress")],
            &["egress-demo.smm-demo.svc.cluster.local"],
            verify,
        )
    }

    #[test]
    fn a_host_sent_to_an_address_not_its_own_is_refused_routed_or_trusted() {
        let fronted: SocketAddr = "198.51.100.7:80".parse().unwrap();
        let own: SocketAddr = "203.0.113.80:80".parse().unwrap();
        let strict = seed_verifying(HostVerify::Strict);
        let decision = decide(&strict, &get("/"), "httpbin.org", Listener::Mesh, fronted, None, 0);
        assert!(matches!(decision, Decision::Fail { failure: Failure::HostMismatch, .. }), "{decision:?}");
        let decision = decide(&strict, &get("/"), "httpbin.org", Listener::Mesh, own, None, 0);
        assert!(matches!(decision, Decision::Forward { host_mismatch: false, .. }), "{decision:?}");
        let unregistered = decide(&strict, &get("/"), "example.com", Listener::Mesh, fronted, None, 0);
        assert!(matches!(unregistered, Decision::Fail { failure: Failure::Blackholed, .. }), "{unregistered:?}");
        for verify in [HostVerify::Route, HostVerify::Off] {
            let policy = seed_verifying(verify);
            let decision = decide(&policy, &get("/"), "httpbin.org", Listener::Mesh, fronted, None, 0);
            let Decision::Forward { destination, host_mismatch: true, .. } = decision else { panic!("{decision:?}") };
            assert_eq!(destination.address, own, "{verify:?}: a DNS host is reached at its resolved address");
        }
    }

    fn forwarded_to(decision: Decision<'_>) -> Option<(SocketAddr, String)> {
        match decision {
            Decision::Forward { destination, .. } => {
                Some((destination.address, destination.labels.cluster().to_string()))
            }
            _ => None,
        }
    }

    #[test]
    fn the_seeds_two_hop_route_continues_in_the_gateway_context_on_one_node() {
        let policy = seed();
        let intercepted: SocketAddr = "203.0.113.80:80".parse().unwrap();
        let decision = decide(&policy, &get("/get"), "httpbin.org", Listener::Mesh, intercepted, None, 0);
        assert_eq!(
            forwarded_to(decision),
            Some(("203.0.113.80:80".parse().unwrap(), "outbound|80||httpbin.org".into())),
            "mesh → egress-demo → httpbin.org at its resolved address"
        );
        let at_gateway: SocketAddr = "10.240.1.1:80".parse().unwrap();
        let decision = decide(&policy, &get("/get"), "httpbin.org", Listener::Gateway(80), at_gateway, None, 0);
        assert_eq!(forwarded_to(decision).unwrap().0, "203.0.113.80:80".parse().unwrap());
    }

    #[test]
    fn the_path_sent_upstream_is_the_clients_or_the_routes_rewrite_of_it_with_the_query_kept() {
        let policy = policy_verifying(
            r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: httpbin, namespace: default}
spec:
  hosts: [httpbin.org]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: httpbin, namespace: default}
spec:
  hosts: [httpbin.org]
  http:
  - match: [{uri: {prefix: /v1/}}]
    rewrite: {uri: /v2/}
    route: [{destination: {host: httpbin.org}}]
  - match: [{uri: {prefix: /users/}}]
    rewrite: {uriRegexRewrite: {match: "^/users/([^/]+)$", rewrite: '/u?id=\1'}}
    route: [{destination: {host: httpbin.org}}]
  - match: [{uri: {prefix: /bad/}}]
    rewrite: {uri: "/a b/"}
    route: [{destination: {host: httpbin.org}}]
  - route: [{destination: {host: httpbin.org}}]
"#,
            &[],
            &[],
            HostVerify::Off,
        );
        let sent = |uri: &str| {
            let request = get(uri);
            let address: SocketAddr = "203.0.113.80:80".parse().unwrap();
            match decide(&policy, &request, "httpbin.org", Listener::Mesh, address, None, 0) {
                Decision::Forward { route, .. } => rewritten_path(route, request.uri()).map(|pq| pq.to_string()),
                _ => panic!("{uri} is forwarded"),
            }
        };
        assert_eq!(sent("/v1/items?q=1&r=2").unwrap(), "/v2/items?q=1&r=2");
        assert_eq!(sent("/other/path?x=%20").unwrap(), "/other/path?x=%20");
        assert_eq!(sent("http://httpbin.org").unwrap(), "/", "an absolute URI without a path asks for /");
        assert_eq!(sent("/users/ann").unwrap(), "/u?id=ann");
        assert!(sent("/bad/x").is_err(), "a rewrite to a path with a space cannot be sent");
    }

    #[test]
    fn export_to_limits_what_each_namespaces_workloads_see() {
        let yaml = "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: internal, namespace: team-a}
spec: {hosts: [internal.example], addresses: [198.51.100.9], ports: [{number: 80, name: http, protocol: HTTP}], exportTo: ['.']}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: httpbin, namespace: egress}
spec: {hosts: [httpbin.org], addresses: [198.51.100.8], ports: [{number: 80, name: http, protocol: HTTP}]}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: teapot, namespace: team-b}
spec:
  hosts: [httpbin.org]
  exportTo: ['.']
  http: [{directResponse: {status: 418}}]
";
        let policy = policy_verifying(yaml, &[], &[], HostVerify::Strict);
        let workload =
            |namespace: &str| Workload { name: "w".into(), namespace: namespace.into(), ..Workload::default() };
        let (team_a, team_b) = (workload("team-a"), workload("team-b"));
        let internal: SocketAddr = "198.51.100.9:80".parse().unwrap();
        let request = get("/");
        let to = |source: Option<&Workload>| {
            decide(&policy, &request, "internal.example", Listener::Mesh, internal, source, 0)
        };
        assert!(matches!(to(Some(&team_a)), Decision::Forward { .. }), "exported to its own namespace");
        assert!(matches!(to(Some(&team_b)), Decision::Fail { failure: Failure::Blackholed, .. }), "not to others");
        assert!(matches!(to(None), Decision::Forward { .. }), "an unknown source sees everything");
        let httpbin: SocketAddr = "198.51.100.8:80".parse().unwrap();
        let to =
            |source: Option<&Workload>| decide(&policy, &request, "httpbin.org", Listener::Mesh, httpbin, source, 0);
        assert!(matches!(to(Some(&team_b)), Decision::Respond { .. }), "team-b's own VirtualService applies");
        assert!(matches!(to(Some(&team_a)), Decision::Forward { .. }), "team-a sees none: the host's default route");
    }

    #[test]
    fn a_sidecars_egress_hosts_and_mode_decide_what_its_workloads_reach() {
        let yaml = "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: httpbin, namespace: egress}
spec: {hosts: [httpbin.org], addresses: [198.51.100.8], ports: [{number: 80, name: http, protocol: HTTP}]}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: teapot, namespace: egress}
spec: {hosts: [httpbin.org], http: [{directResponse: {status: 418}}]}
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: default, namespace: team-a}
spec: {egress: [{hosts: ['./*']}]}
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: default, namespace: team-b}
spec: {outboundTrafficPolicy: {mode: ALLOW_ANY}}
";
        // The mesh is REGISTRY_ONLY (policy_verifying's settings).
        let policy = policy_verifying(yaml, &[], &[], HostVerify::Strict);
        let workload =
            |namespace: &str| Workload { name: "w".into(), namespace: namespace.into(), ..Workload::default() };
        let (team_a, team_b, team_c) = (workload("team-a"), workload("team-b"), workload("team-c"));
        let httpbin: SocketAddr = "198.51.100.8:80".parse().unwrap();
        let request = get("/");
        let to =
            |host: &str, source: &Workload| decide(&policy, &request, host, Listener::Mesh, httpbin, Some(source), 0);
        assert!(matches!(to("httpbin.org", &team_c), Decision::Respond { .. }), "no Sidecar: everything exported");
        assert!(
            matches!(to("httpbin.org", &team_a), Decision::Fail { failure: Failure::Blackholed, .. }),
            "team-a imports only its own namespace: the egress namespace's host and routes are not there"
        );
        assert!(matches!(to("example.com", &team_b), Decision::Forward { .. }), "team-b's own mode: ALLOW_ANY");
        assert!(matches!(to("example.com", &team_c), Decision::Fail { failure: Failure::Blackholed, .. }));
    }

    #[test]
    fn gateway_ports_see_what_is_exported_to_the_gateways_namespace() {
        let yaml = "apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: egress, namespace: istio-system}
spec: {selector: {istio: egressgateway}, servers: [{port: {number: 80, name: http, protocol: HTTP}, hosts: ['*/*']}]}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: external, namespace: app}
spec: {hosts: [a.example, b.example], ports: [{number: 80, name: http, protocol: HTTP}], resolution: NONE}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: private, namespace: app}
spec:
  hosts: [c.example]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints: [{address: 198.51.100.9}]
  exportTo: ['.']
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: public, namespace: app}
spec:
  hosts: [a.example]
  gateways: [istio-system/egress]
  http: [{route: [{destination: {host: c.example}}]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: private, namespace: app}
spec:
  hosts: [b.example]
  gateways: [istio-system/egress]
  exportTo: ['.']
  http: [{directResponse: {status: 418}}]
";
        let snapshot = Snapshot::from_yaml(yaml);
        let labels = BTreeMap::from([("istio".to_owned(), "egressgateway".to_owned())]);
        let bindings = bind(&snapshot, &labels);
        let at = |namespace: Option<&str>| {
            let settings =
                ProxySettings { gateway_namespace: namespace.map(str::to_owned), ..ProxySettings::default() };
            let sidecars = Arc::new(SidecarModes::compile(&snapshot, OutboundMode::RegistryOnly));
            proxy_policy(&snapshot, &Resolved::new(), &bindings, sidecars, &settings, &Default::default())
        };
        let request = get("/");
        let port: SocketAddr = "10.240.1.1:80".parse().unwrap();
        let (in_istio_system, anywhere) = (at(Some("istio-system")), at(None));
        let decide_at = |policy: &ProxyPolicy, host: &str| match decide(
            policy,
            &request,
            host,
            Listener::Gateway(80),
            port,
            None,
            0,
        ) {
            Decision::Respond { status, .. } => status.as_u16(),
            Decision::Forward { .. } => 200,
            Decision::Fail { failure, .. } => failure.status().as_u16(),
            Decision::Redirect { status, .. } => status.as_u16(),
        };
        assert_eq!(decide_at(&anywhere, "b.example"), 418, "a gateway of no known namespace sees everything");
        assert_eq!(decide_at(&in_istio_system, "b.example"), 404, "app's private VirtualService is not for it");
        assert_eq!(decide_at(&anywhere, "a.example"), 200);
        assert_eq!(
            decide_at(&in_istio_system, "a.example"),
            502,
            "the route's destination is exported to app only: unregistered, as the gateway sees it"
        );
    }

    #[test]
    fn the_mesh_configs_default_export_to_applies_to_resources_that_set_none() {
        let yaml = "apiVersion: v1
kind: ConfigMap
metadata: {name: istio, namespace: istio-system}
data:
  mesh: |
    defaultServiceExportTo: ['.']
    defaultVirtualServiceExportTo: ['.']
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: internal, namespace: team-a}
spec: {hosts: [internal.example], addresses: [198.51.100.9], ports: [{number: 80, name: http, protocol: HTTP}]}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: shared, namespace: team-a}
spec: {hosts: [shared.example], addresses: [198.51.100.8], ports: [{number: 80, name: http, protocol: HTTP}], exportTo: ['*']}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: teapot, namespace: team-a}
spec: {hosts: [shared.example], http: [{directResponse: {status: 418}}]}
";
        let policy = policy_verifying(yaml, &[], &[], HostVerify::Strict);
        let workload =
            |namespace: &str| Workload { name: "w".into(), namespace: namespace.into(), ..Workload::default() };
        let (team_a, team_b) = (workload("team-a"), workload("team-b"));
        let request = get("/");
        let to = |host: &str, address: &str, source: &Workload| {
            decide(&policy, &request, host, Listener::Mesh, address.parse().unwrap(), Some(source), 0)
        };
        let internal = |source| to("internal.example", "198.51.100.9:80", source);
        assert!(matches!(internal(&team_a), Decision::Forward { .. }), "the default exports to its own namespace");
        assert!(matches!(internal(&team_b), Decision::Fail { failure: Failure::Blackholed, .. }), "and no further");
        let shared = |source| to("shared.example", "198.51.100.8:80", source);
        assert!(matches!(shared(&team_b), Decision::Forward { .. }), "an exportTo of its own wins over the default");
        assert!(matches!(shared(&team_a), Decision::Respond { .. }), "team-a's VirtualService, for team-a only");
    }

    #[test]
    fn gateways_serve_only_their_hosts_and_the_mesh_only_registered_ones() {
        let policy = seed();
        let at_gateway: SocketAddr = "10.240.1.1:80".parse().unwrap();
        let unknown = decide(&policy, &get("/"), "example.com", Listener::Gateway(80), at_gateway, None, 0);
        assert!(matches!(unknown, Decision::Fail { failure: Failure::NoRoute, .. }), "{unknown:?}");
        let other_port = decide(&policy, &get("/"), "httpbin.org", Listener::Gateway(8080), at_gateway, None, 0);
        assert!(matches!(other_port, Decision::Fail { failure: Failure::NoRoute, .. }), "{other_port:?}");
        let intercepted: SocketAddr = "198.51.100.7:80".parse().unwrap();
        let unregistered = decide(&policy, &get("/"), "example.com", Listener::Mesh, intercepted, None, 0);
        assert!(
            matches!(&unregistered, Decision::Fail { failure: Failure::Blackholed, labels: Some(l) } if l.name().as_str() == "BlackHoleCluster"),
            "{unregistered:?}"
        );
    }
}
