//! VirtualService delegation as Istio applies it: a root's HTTP route that names a `delegate` is replaced by the
//! delegate's HTTP routes (a VirtualService without hosts), each match merged with the root's and each setting
//! the delegate leaves out taken from the root. A delegate match that no root match contains is dropped, as is a
//! delegate that is missing, has hosts, or is not exported to the root's namespace (with a warning).

use std::borrow::Cow;

use super::*;
use crate::config::{
    fields::StringMatch,
    virtual_service::{HttpMatch, HttpRoute, VirtualService},
};

/// The HTTP routes of `service` (living in `namespace`) with each delegating route replaced by what it delegates
/// to; borrowed when nothing delegates.
pub(super) fn expanded<'a>(snapshot: &Snapshot, namespace: &str, service: &'a VirtualService) -> Cow<'a, [HttpRoute]> {
    if service.http.iter().all(|route| route.delegate.is_none()) {
        return Cow::Borrowed(&service.http);
    }
    let mut routes = Vec::new();
    for root in &service.http {
        let Some(delegate) = &root.delegate else {
            routes.push(root.clone());
            continue;
        };
        let delegate_namespace = delegate.namespace.as_deref().unwrap_or(namespace);
        let Some(child) = find(snapshot, &delegate.name, delegate_namespace, namespace) else {
            tracing::warn!(
                delegate = %format!("{delegate_namespace}/{}", delegate.name),
                "a VirtualService route delegates to no VirtualService without hosts exported to its namespace: \
                 the route is left out"
            );
            continue;
        };
        routes.extend(child.http.iter().filter_map(|leaf| merged(root, leaf)));
    }
    Cow::Owned(routes)
}

fn find<'a>(snapshot: &'a Snapshot, name: &str, namespace: &str, viewer: &str) -> Option<&'a VirtualService> {
    snapshot.resources.iter().find_map(|resource| match &resource.spec {
        Spec::VirtualService(service)
            if resource.metadata.name == name
                && resource.metadata.namespace() == namespace
                && service.hosts.is_empty()
                && Visibility::compile_or(
                    &service.export_to,
                    &snapshot.mesh.default_virtual_service_export_to,
                    namespace,
                )
                .admits(Some(viewer)) =>
        {
            Some(&**service)
        }
        _ => None,
    })
}

/// The delegate's route `leaf` under `root`: its matches within the root's, its unset settings the root's.
fn merged(root: &HttpRoute, leaf: &HttpRoute) -> Option<HttpRoute> {
    let matches = merged_matches(&root.matches, &leaf.matches)?;
    let mut route = leaf.clone();
    route.matches = matches;
    route.delegate = None;
    route.name = match (&root.name, &leaf.name) {
        (Some(root), Some(leaf)) => Some(format!("{root}-{leaf}")),
        (root, leaf) => leaf.clone().or_else(|| root.clone()),
    };
    macro_rules! inherit {
        ($($field:ident),*) => { $( if route.$field.is_none() { route.$field = root.$field.clone(); } )* };
    }
    inherit!(
        rewrite,
        direct_response,
        timeout,
        retries,
        fault,
        mirror,
        mirror_percent,
        mirror_percentage,
        cors_policy,
        headers
    );
    if route.mirrors.is_empty() {
        route.mirrors = root.mirrors.clone();
    }
    Some(route)
}

/// Each leaf match merged with every root match it does not conflict with; `None` when a leaf match fits no root
/// match (Istio drops the whole delegate route then).
fn merged_matches(roots: &[HttpMatch], leaves: &[HttpMatch]) -> Option<Vec<HttpMatch>> {
    if roots.is_empty() {
        return Some(leaves.to_vec());
    }
    if leaves.is_empty() {
        return Some(roots.to_vec());
    }
    let mut out = Vec::new();
    for leaf in leaves {
        let before = out.len();
        out.extend(roots.iter().filter(|root| !conflicts(root, leaf)).map(|root| merged_match(root, leaf)));
        if out.len() == before {
            return None;
        }
    }
    Some(out)
}

fn merged_match(root: &HttpMatch, leaf: &HttpMatch) -> HttpMatch {
    let mut merged = leaf.clone();
    merged.name = match (&root.name, &leaf.name) {
        (Some(root), Some(leaf)) => Some(format!("{root}-{leaf}")),
        (root, leaf) => leaf.clone().or_else(|| root.clone()),
    };
    for (mine, theirs) in [
        (&mut merged.uri, &root.uri),
        (&mut merged.scheme, &root.scheme),
        (&mut merged.method, &root.method),
        (&mut merged.authority, &root.authority),
    ] {
        if mine.is_none() {
            mine.clone_from(theirs);
        }
    }
    // The leaf's value wins where both name a header, parameter or label.
    let union = |root: &crate::config::fields::Pairs<StringMatch>, leaf: &crate::config::fields::Pairs<StringMatch>| {
        root.iter().chain(leaf.iter()).map(|(name, value)| (name.clone(), value.clone())).collect()
    };
    merged.headers = union(&root.headers, &leaf.headers);
    merged.without_headers = union(&root.without_headers, &leaf.without_headers);
    merged.query_params = union(&root.query_params, &leaf.query_params);
    if merged.port.unwrap_or(0) == 0 {
        merged.port = root.port;
    }
    let mut labels = root.source_labels.clone();
    labels.extend(leaf.source_labels.clone());
    merged.source_labels = labels;
    if merged.source_namespace.is_none() {
        merged.source_namespace.clone_from(&root.source_namespace);
    }
    if merged.gateways.is_empty() {
        merged.gateways.clone_from(&root.gateways);
    }
    merged
}

/// Whether `leaf` asks for something `root` cannot hold (Istio's `hasConflict`).
fn conflicts(root: &HttpMatch, leaf: &HttpMatch) -> bool {
    let strings = [
        (&root.uri, &leaf.uri),
        (&root.scheme, &leaf.scheme),
        (&root.method, &leaf.method),
        (&root.authority, &leaf.authority),
    ];
    if strings.iter().any(|(root, leaf)| string_conflict(root.as_deref(), leaf.as_deref())) {
        return true;
    }
    let pairs_conflict = |root: &crate::config::fields::Pairs<StringMatch>,
                          leaf: &crate::config::fields::Pairs<StringMatch>| {
        leaf.iter().any(|(name, value)| {
            let root_value = root.iter().find(|(root_name, _)| *root_name == name).map(|(_, value)| value);
            string_conflict(root_value, Some(value))
        })
    };
    if pairs_conflict(&root.headers, &leaf.headers)
        || pairs_conflict(&root.without_headers, &leaf.without_headers)
        || pairs_conflict(&root.query_params, &leaf.query_params)
        || root.ignore_uri_case != leaf.ignore_uri_case
    {
        return true;
    }
    let (root_port, leaf_port) = (root.port.unwrap_or(0), leaf.port.unwrap_or(0));
    if root_port > 0 && leaf_port > 0 && root_port != leaf_port {
        return true;
    }
    if root.source_namespace.is_some() && leaf.source_namespace != root.source_namespace {
        return true;
    }
    if leaf.source_labels.iter().any(|(key, value)| root.source_labels.get(key).is_some_and(|root| root != value)) {
        return true;
    }
    !root.gateways.is_empty()
        && !leaf.gateways.is_empty()
        && leaf.gateways.iter().any(|gateway| !root.gateways.contains(gateway))
}

/// Whether a leaf's string match can hold within the root's: the leaf's exact or prefix within the root's
/// prefix, the same exact; a regex on either side only with nothing on the other.
fn string_conflict(root: Option<&StringMatch>, leaf: Option<&StringMatch>) -> bool {
    let (Some(root), Some(leaf)) = (root, leaf) else { return false };
    let set = |m: &StringMatch| m.exact.is_some() || m.prefix.is_some() || m.regex.is_some();
    if root.regex.is_some() || leaf.regex.is_some() {
        return set(root) && set(leaf);
    }
    if let Some(exact) = &root.exact {
        return leaf.exact.as_ref() != Some(exact);
    }
    if let Some(prefix) = &root.prefix {
        return match (&leaf.prefix, &leaf.exact) {
            (Some(leaf), _) | (None, Some(leaf)) => !leaf.starts_with(prefix.as_str()),
            (None, None) => true,
        };
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(yaml: &str) -> Snapshot {
        Snapshot::from_yaml(yaml)
    }

    const CHILD: &str = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews, namespace: team}\nspec:\n  http:\n  - name: v2\n    match: [{uri: {prefix: /reviews/v2}, headers: {x-beta: {exact: 'yes'}}}]\n    route: [{destination: {host: reviews-v2.team.svc.cluster.local}}]\n  - match: [{uri: {prefix: /ratings}}]\n    route: [{destination: {host: ratings.team.svc.cluster.local}}]\n  - route: [{destination: {host: reviews-v1.team.svc.cluster.local}}]\n";

    fn root(delegate: &str) -> String {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: root, namespace: istio-system}}\nspec:\n  hosts: [bookinfo.example]\n  gateways: [egress]\n  http:\n  - name: reviews\n    match: [{{uri: {{prefix: /reviews}}}}]\n    timeout: 5s\n    delegate: {delegate}\n  - route: [{{destination: {{host: fallback.example}}}}]\n"
        )
    }

    fn service(snapshot: &Snapshot, name: &str) -> VirtualService {
        snapshot
            .resources
            .iter()
            .find_map(|r| match &r.spec {
                Spec::VirtualService(s) if r.metadata.name == name => Some((**s).clone()),
                _ => None,
            })
            .unwrap()
    }

    #[test]
    fn a_delegating_route_becomes_the_delegates_routes_within_its_matches() {
        let snapshot = snapshot(&format!("{}---\n{CHILD}", root("{name: reviews, namespace: team}")));
        let service = service(&snapshot, "root");
        let routes = expanded(&snapshot, "istio-system", &service);
        // The ratings route fits no root match (/ratings is not under /reviews): dropped, as Istio drops it.
        let names: Vec<Option<&str>> = routes.iter().map(|r| r.name.as_deref()).collect();
        assert_eq!(names, [Some("reviews-v2"), Some("reviews"), None]);
        let beta = &routes[0];
        assert_eq!(beta.matches[0].uri.as_ref().unwrap().prefix.as_deref(), Some("/reviews/v2"));
        assert!(beta.matches[0].headers.iter().any(|(name, _)| name == "x-beta"));
        assert_eq!(beta.timeout.as_deref(), Some("5s"), "what the delegate leaves out, the root gives");
        let catch_all = &routes[1];
        assert_eq!(catch_all.matches[0].uri.as_ref().unwrap().prefix.as_deref(), Some("/reviews"));
        assert_eq!(catch_all.route[0].destination.host, "reviews-v1.team.svc.cluster.local");
        assert_eq!(routes[2].route[0].destination.host, "fallback.example");
    }

    #[test]
    fn a_missing_or_hidden_delegate_leaves_the_route_out() {
        let missing = snapshot(&root("{name: nobody, namespace: team}"));
        assert_eq!(expanded(&missing, "istio-system", &service(&missing, "root")).len(), 1);
        let hidden = CHILD.replace("spec:\n", "spec:\n  exportTo: ['.']\n");
        let hidden = snapshot(&format!("{}---\n{hidden}", root("{name: reviews, namespace: team}")));
        assert_eq!(expanded(&hidden, "istio-system", &service(&hidden, "root")).len(), 1, "not exported to the root");
    }

    #[test]
    fn string_matches_conflict_as_istio_says() {
        let prefix = |p: &str| StringMatch { prefix: Some(p.into()), ..StringMatch::default() };
        let exact = |p: &str| StringMatch { exact: Some(p.into()), ..StringMatch::default() };
        let regex = |p: &str| StringMatch { regex: Some(p.into()), ..StringMatch::default() };
        assert!(!string_conflict(Some(&prefix("/a")), Some(&prefix("/a/b"))));
        assert!(string_conflict(Some(&prefix("/a/b")), Some(&prefix("/a"))));
        assert!(!string_conflict(Some(&prefix("/a")), Some(&exact("/a/x"))));
        assert!(string_conflict(Some(&exact("/a")), Some(&prefix("/a"))));
        assert!(string_conflict(Some(&regex("/a.*")), Some(&prefix("/a"))));
        assert!(!string_conflict(None, Some(&regex("/a.*"))));
    }
}
