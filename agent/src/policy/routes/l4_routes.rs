//! A context's `tls` and `tcp` routes, compiled: where a connection goes by its ClientHello's server name (TLS),
//! the port and address it was sent to and its source — Istio's `TLSRoute` and `TCPRoute`, the first match
//! winning.

use super::*;
use crate::{config::virtual_service::L4Match, policy::http_match::RequestView};

/// Which of a VirtualService's routes: `tls` (matched by server name too) or `tcp`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4Kind {
    Tls,
    Tcp,
}

/// The `tls` (or `tcp`) routes of the VirtualServices bound to one host of a context, in declaration order.
#[derive(Debug)]
pub struct L4Routes {
    pub(super) routes: Box<[L4Route]>,
}

#[derive(Debug)]
pub struct L4Route {
    /// Empty: every connection matches.
    matches: Box<[L4RouteMatch]>,
    pub targets: Targets,
    /// The VirtualService it comes from.
    pub scope: Arc<RouteScope>,
}

#[derive(Debug)]
struct L4RouteMatch {
    /// Lowercase: `*`, `*.suffix` or a name. Empty: any.
    sni_hosts: Box<[Box<str>]>,
    destination_subnets: Box<[IpNet]>,
    /// `port`, `gateways`, `sourceLabels`, `sourceNamespace`: what a TLS match shares with an HTTP one, compiled
    /// as one.
    shared: RequestMatch,
}

/// What a connection is matched on.
pub struct L4View<'a> {
    /// The ClientHello's, for TLS.
    pub server_name: Option<&'a str>,
    /// The address and port it was sent to (a Gateway's: the listener's).
    pub destination: SocketAddr,
    /// `mesh`, or the Gateway (`namespace/name`) whose listener received it.
    pub gateway: &'a str,
    pub source: Option<&'a Workload>,
}

impl L4Routes {
    /// The first route, in declaration order, that `visible` lets the connection see and whose matches admit it.
    pub fn first_match(&self, view: &L4View<'_>, visible: impl Fn(&L4Route) -> bool) -> Option<&L4Route> {
        let headers = http::HeaderMap::new();
        let request = RequestView {
            path: "/",
            query: None,
            method: "",
            scheme: "https",
            authority: view.server_name.unwrap_or(""),
            headers: &headers,
            port: view.destination.port(),
            gateway: view.gateway,
            source: view.source,
        };
        self.routes
            .iter()
            .filter(|rule| visible(rule))
            .find(|rule| rule.matches.is_empty() || rule.matches.iter().any(|m| m.admits(view, &request)))
    }
}

impl L4RouteMatch {
    fn admits(&self, view: &L4View<'_>, request: &RequestView<'_>) -> bool {
        let named = |pattern: &str| view.server_name.is_some_and(|name| sni_matches(pattern, name));
        (self.sni_hosts.is_empty() || self.sni_hosts.iter().any(|pattern| named(pattern)))
            && (self.destination_subnets.is_empty()
                || self.destination_subnets.iter().any(|net| net.contains(&view.destination.ip())))
            && self.shared.matches(request)
    }
}

/// Whether `name` (lowercase) is one `pattern` names, as Envoy matches server names: `*` any, `*.example.com`
/// any name below example.com (not example.com itself).
fn sni_matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_prefix('*') {
        Some("") => true,
        Some(suffix) => suffix.starts_with('.') && name.len() > suffix.len() && name.ends_with(suffix),
        None => pattern == name,
    }
}

/// The `kind` routes of the VirtualServices `indexes` point at, for one host of a context; `None` when they
/// have none.
pub(super) fn l4_routes(
    snapshot: &Snapshot,
    indexes: &[usize],
    kind: L4Kind,
    interner: &mut Interner,
) -> Option<L4Routes> {
    let mut routes = Vec::new();
    for resource in bindings::services(snapshot, indexes) {
        let Spec::VirtualService(service) = &resource.spec else { continue };
        let (tls, tcp) = match kind {
            L4Kind::Tls => (&service.tls[..], &[][..]),
            L4Kind::Tcp => (&[][..], &service.tcp[..]),
        };
        if tls.is_empty() && tcp.is_empty() {
            continue;
        }
        let scope = route_scope(snapshot, resource, service, None, interner);
        for route in tls {
            let matches = route.matches.iter().map(|m| (&m.sni_hosts[..], &m.l4));
            routes.push(l4_route(matches, &route.route, &scope, interner));
        }
        for route in tcp {
            let matches = route.matches.iter().map(|m| (&[][..], m));
            routes.push(l4_route(matches, &route.route, &scope, interner));
        }
    }
    (!routes.is_empty()).then(|| L4Routes { routes: routes.into() })
}

fn l4_route<'a>(
    matches: impl Iterator<Item = (&'a [String], &'a L4Match)>,
    destinations: &[RouteDestination],
    scope: &Arc<RouteScope>,
    interner: &mut Interner,
) -> L4Route {
    let namespace = &*scope.exported.namespace;
    let matches = matches.map(|(sni_hosts, m)| l4_match(sni_hosts, m, namespace, &mut interner.regexes)).collect();
    let destinations = destinations.iter().map(|d| (&d.destination, d.weight, None));
    L4Route { matches, targets: targets(destinations, interner), scope: scope.clone() }
}

fn l4_match(sni_hosts: &[String], l4: &L4Match, namespace: &str, regexes: &mut RegexCache) -> L4RouteMatch {
    let shared = crate::config::virtual_service::HttpMatch {
        port: l4.port,
        gateways: l4.gateways.clone(),
        source_labels: l4.source_labels.clone(),
        source_namespace: l4.source_namespace.clone(),
        ..Default::default()
    };
    L4RouteMatch {
        sni_hosts: sni_hosts.iter().map(|host| host.to_ascii_lowercase().into_boxed_str()).collect(),
        // Validated as CIDRs or addresses; one that is neither matches nothing rather than everything.
        destination_subnets: l4
            .destination_subnets
            .iter()
            .map(|subnet| {
                parse_address(subnet).unwrap_or_else(|| IpNet::from(IpAddr::from(std::net::Ipv6Addr::UNSPECIFIED)))
            })
            .collect(),
        shared: RequestMatch::compile(&shared, namespace, regexes),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_names_match_as_envoy_matches_them() {
        assert!(sni_matches("*", "anything.example"));
        assert!(sni_matches("*.googleapis.com", "storage.googleapis.com"));
        assert!(sni_matches("*.googleapis.com", "a.b.googleapis.com"));
        assert!(!sni_matches("*.googleapis.com", "googleapis.com"));
        assert!(!sni_matches("*.googleapis.com", "evilgoogleapis.com"));
        assert!(sni_matches("api.example.com", "api.example.com"));
        assert!(!sni_matches("api.example.com", "www.api.example.com"));
        assert!(!sni_matches("*googleapis.com", "evilgoogleapis.com"), "a wildcard that is not a label");
    }
}
