//! A context's `tls` routes, compiled: where a TLS connection goes by its ClientHello's server name, the port
//! and address it was sent to and its source — Istio's `TLSRoute`, the first match winning.

use super::*;
use crate::{config::virtual_service::TlsMatch, policy::http_match::RequestView};

/// The `tls` routes of the VirtualServices bound to one host of a context, in declaration order.
#[derive(Debug)]
pub struct TlsRoutes {
    pub(super) routes: Box<[TlsRule]>,
}

#[derive(Debug)]
pub struct TlsRule {
    /// Empty: every connection matches.
    matches: Box<[TlsRouteMatch]>,
    pub targets: Targets,
    /// The VirtualService it comes from.
    pub scope: Arc<RouteScope>,
}

#[derive(Debug)]
struct TlsRouteMatch {
    /// Lowercase: `*`, `*.suffix` or a name. Empty: any.
    sni_hosts: Box<[Box<str>]>,
    destination_subnets: Box<[IpNet]>,
    /// `port`, `gateways`, `sourceLabels`, `sourceNamespace`: what a TLS match shares with an HTTP one, compiled
    /// as one.
    shared: RequestMatch,
}

/// What a TLS connection is matched on.
pub struct TlsView<'a> {
    pub server_name: &'a str,
    /// The address and port it was sent to (a Gateway's: the listener's).
    pub destination: SocketAddr,
    /// `mesh`, or the Gateway (`namespace/name`) whose listener received it.
    pub gateway: &'a str,
    pub source: Option<&'a Workload>,
}

impl TlsRoutes {
    /// The first route, in declaration order, that `visible` lets the connection see and whose matches admit it.
    pub fn first_match(&self, view: &TlsView<'_>, visible: impl Fn(&TlsRule) -> bool) -> Option<&TlsRule> {
        let headers = http::HeaderMap::new();
        let request = RequestView {
            path: "/",
            query: None,
            method: "",
            scheme: "https",
            authority: view.server_name,
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

impl TlsRouteMatch {
    fn admits(&self, view: &TlsView<'_>, request: &RequestView<'_>) -> bool {
        let name = view.server_name;
        (self.sni_hosts.is_empty() || self.sni_hosts.iter().any(|pattern| sni_matches(pattern, name)))
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

/// The `tls` routes of the VirtualServices `indexes` point at, for one host of a context; `None` when they have
/// none.
pub(super) fn tls_routes(snapshot: &Snapshot, indexes: &[usize], interner: &mut Interner) -> Option<TlsRoutes> {
    let mut routes = Vec::new();
    for resource in bindings::services(snapshot, indexes) {
        let Spec::VirtualService(service) = &resource.spec else { continue };
        if service.tls.is_empty() {
            continue;
        }
        let namespace = resource.metadata.namespace();
        let visible_to =
            Visibility::compile_or(&service.export_to, &snapshot.mesh.default_virtual_service_export_to, namespace);
        let scope = Arc::new(RouteScope {
            source: format!("{namespace}/{}", resource.metadata.name).into(),
            exported: interner.exported(namespace, visible_to),
            names: Box::default(),
        });
        for route in &service.tls {
            routes.push(tls_rule(route, &scope, namespace, interner));
        }
    }
    (!routes.is_empty()).then(|| TlsRoutes { routes: routes.into() })
}

fn tls_rule(route: &TlsRouteConfig, scope: &Arc<RouteScope>, namespace: &str, interner: &mut Interner) -> TlsRule {
    let destinations = route.route.iter().map(|d| (&d.destination, d.weight, None));
    TlsRule {
        matches: route.matches.iter().map(|m| tls_match(m, namespace, &mut interner.regexes)).collect(),
        targets: targets(destinations, interner),
        scope: scope.clone(),
    }
}

fn tls_match(m: &TlsMatch, namespace: &str, regexes: &mut RegexCache) -> TlsRouteMatch {
    let l4 = &m.l4;
    let shared = crate::config::virtual_service::HttpMatch {
        port: l4.port,
        gateways: l4.gateways.clone(),
        source_labels: l4.source_labels.clone(),
        source_namespace: l4.source_namespace.clone(),
        ..Default::default()
    };
    TlsRouteMatch {
        sni_hosts: m.sni_hosts.iter().map(|host| host.to_ascii_lowercase().into_boxed_str()).collect(),
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
