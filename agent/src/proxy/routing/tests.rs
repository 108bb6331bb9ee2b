//! Tests of routing.

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
        credentials: Default::default(),
        gateway_labels: labels.clone(),
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
        Decision::Forward { destination, .. } => Some((destination.address, destination.labels.cluster().to_string())),
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
    let workload = |namespace: &str| Workload { name: "w".into(), namespace: namespace.into(), ..Workload::default() };
    let (team_a, team_b) = (workload("team-a"), workload("team-b"));
    let internal: SocketAddr = "198.51.100.9:80".parse().unwrap();
    let request = get("/");
    let to =
        |source: Option<&Workload>| decide(&policy, &request, "internal.example", Listener::Mesh, internal, source, 0);
    assert!(matches!(to(Some(&team_a)), Decision::Forward { .. }), "exported to its own namespace");
    assert!(matches!(to(Some(&team_b)), Decision::Fail { failure: Failure::Blackholed, .. }), "not to others");
    assert!(matches!(to(None), Decision::Forward { .. }), "an unknown source sees everything");
    let httpbin: SocketAddr = "198.51.100.8:80".parse().unwrap();
    let to = |source: Option<&Workload>| decide(&policy, &request, "httpbin.org", Listener::Mesh, httpbin, source, 0);
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
    let workload = |namespace: &str| Workload { name: "w".into(), namespace: namespace.into(), ..Workload::default() };
    let (team_a, team_b, team_c) = (workload("team-a"), workload("team-b"), workload("team-c"));
    let httpbin: SocketAddr = "198.51.100.8:80".parse().unwrap();
    let request = get("/");
    let to = |host: &str, source: &Workload| decide(&policy, &request, host, Listener::Mesh, httpbin, Some(source), 0);
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
        let settings = ProxySettings { gateway_namespace: namespace.map(str::to_owned), ..ProxySettings::default() };
        let sidecars = Arc::new(SidecarModes::compile(&snapshot, OutboundMode::RegistryOnly));
        proxy_policy(&snapshot, &Resolved::new(), &bindings, sidecars, &settings, &Default::default())
    };
    let request = get("/");
    let port: SocketAddr = "10.240.1.1:80".parse().unwrap();
    let (in_istio_system, anywhere) = (at(Some("istio-system")), at(None));
    let decide_at =
        |policy: &ProxyPolicy, host: &str| match decide(policy, &request, host, Listener::Gateway(80), port, None, 0) {
            Decision::Respond { status, .. } => status.as_u16(),
            Decision::Forward { .. } => 200,
            Decision::Fail { failure, .. } => failure.status().as_u16(),
            Decision::Redirect { status, .. } => status.as_u16(),
            Decision::RequireTls { .. } => 301,
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
    let workload = |namespace: &str| Workload { name: "w".into(), namespace: namespace.into(), ..Workload::default() };
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
