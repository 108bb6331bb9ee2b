//! The route table compiled from configurations as users write them.

use std::collections::BTreeMap;

use super::*;
use crate::policy::{bindings::bind, http_match::RequestView};

fn policy(yaml: &str, resolved: &Resolved) -> ProxyPolicy {
    let snapshot = Snapshot::from_yaml(yaml);
    let labels = BTreeMap::from([("istio".to_owned(), "egressgateway".to_owned())]);
    let sidecars = Arc::new(SidecarModes::compile(&snapshot, OutboundMode::RegistryOnly));
    proxy_policy(
        &snapshot,
        resolved,
        &bind(&snapshot, &labels),
        sidecars,
        &ProxySettings::default(),
        &Default::default(),
    )
}

const CONFIG: &str = "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: httpbin, namespace: egress}
spec:
  hosts: [httpbin.org]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: wildcard}
spec:
  hosts: ['*.example.com']
  ports: [{number: 80, name: http, protocol: HTTP}, {number: 8080, name: grpc, protocol: GRPC}]
  resolution: NONE
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db}
spec:
  hosts: [db.internal]
  ports: [{number: 80, name: http, protocol: HTTP, targetPort: 8000}]
  resolution: STATIC
  endpoints: [{address: 192.0.2.1}, {address: 192.0.2.2, ports: {http: 9000}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: httpbin, namespace: egress}
spec:
  hosts: [httpbin.org]
  http:
  - name: teapot
    match: [{uri: {prefix: /status/418}}]
    directResponse: {status: 418, body: {string: short and stout}}
  - match: [{uri: {exact: /old}}]
    redirect: {uri: /new, redirectCode: 308}
  - match: [{headers: {x-canary: {exact: 'yes'}}}]
    route:
    - {destination: {host: a.example.com}, weight: 25}
    - {destination: {host: b.example.com}, weight: 75}
  - route: [{destination: {host: httpbin.org}}]
    timeout: 2s
";

fn first_match<'a>(host: &'a VirtualHost, path: &str, headers: &http::HeaderMap) -> Option<&'a Route> {
    let view = RequestView {
        path,
        query: None,
        method: "GET",
        scheme: "http",
        authority: "httpbin.org",
        headers,
        port: 80,
        gateway: "mesh",
        source: None,
    };
    host.first_match(&view, |_| true).map(|matched| matched.route)
}

#[test]
fn routes_that_match_alike_share_their_compiled_matches_header_manipulations_destinations_and_exports() {
    let service = |name: &str, namespace: &str, host: &str| {
        format!(
                "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: {name}, namespace: {namespace}}}\n\
                 spec:\n  hosts: [{host}]\n  http:\n  - match: [{{uri: {{prefix: /api/}}, gateways: [edge]}}]\n    \
                 headers: {{request: {{set: {{x-route: api}}}}}}\n    route: [{{destination: {{host: {host}, subset: v1}}}}]\n  \
                 - match: [{{uri: {{prefix: /v2/}}}}]\n    route: [{{destination: {{host: {host}}}}}]\n  \
                 - route: [{{destination: {{host: {host}}}}}]\n"
            )
    };
    let yaml =
        [service("a", "team", "a.example"), service("b", "team", "b.example"), service("c", "other", "c.example")]
            .join("---\n");
    let policy = policy(&yaml, &Resolved::new());
    let bound = |host: &str| policy.mesh_routes(host).map(|host| &host.routes[0]);
    let (a, b, c) = (bound("a.example"), bound("b.example"), bound("c.example"));
    let (Some(a), Some(b), Some(c)) = (a, b, c) else { panic!("each VirtualService is bound: {policy:?}") };
    assert!(Arc::ptr_eq(&a.matches, &b.matches), "the same conditions in one namespace: compiled once");
    assert!(!Arc::ptr_eq(&a.matches, &c.matches), "`edge` names another namespace's Gateway in `other`");
    let (Some(a_extras), Some(c_extras)) = (&a.extras, &c.extras) else { panic!("the header set is compiled") };
    assert!(Arc::ptr_eq(a_extras, c_extras), "the same header manipulations, nothing else set: compiled once");
    let mut headers = http::HeaderMap::new();
    c.request_headers().apply(&mut headers);
    assert_eq!(headers["x-route"], "api", "and applied by each route");
    let to = |route: &Route| match &route.action {
        Action::Forward(Targets::One(to)) => to.clone(),
        _ => panic!("a route to one destination"),
    };
    let (Some(a_subset), Some(c_subset)) = (&to(a).extras, &to(c).extras) else { panic!("the subset is compiled") };
    assert!(Arc::ptr_eq(a_subset, c_subset), "the same subset: held once");
    assert_eq!(to(a).subset(), Some("v1"));
    let routes = &policy.mesh_routes("a.example").expect("bound").routes;
    assert!(routes[1].extras.is_none() && routes[2].extras.is_none(), "nothing set, nothing held");
    assert!(Arc::ptr_eq(&to(&routes[1]), &to(&routes[2])), "the same destination: held once");
    assert!(!Arc::ptr_eq(&to(&routes[0]), &to(&routes[1])), "another subset: another destination");
    assert_eq!((to(&routes[1]).host.as_ref(), &*a.scope.exported.namespace), ("a.example", "team"));
    assert!(Arc::ptr_eq(&a.scope.exported, &b.scope.exported), "one namespace, exported alike: held once");
    assert!(!Arc::ptr_eq(&a.scope.exported, &c.scope.exported), "another namespace");
}

#[test]
fn a_route_is_48_bytes_its_action_16_a_service_96() {
    use std::mem::size_of;
    assert_eq!((size_of::<Route>(), size_of::<Action>(), size_of::<Service>()), (48, 16, 96));
}

#[test]
fn routes_that_set_the_same_rewrite_retries_and_headers_share_them_and_others_keep_their_own() {
    let service = |name: &str, attempts: u32| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: {name}, namespace: team}}\n\
             spec:\n  hosts: [{name}.example]\n  http:\n  - match: [{{uri: {{prefix: /v2/}}}}]\n    \
             rewrite: {{uri: /api/v2/}}\n    retries: {{attempts: {attempts}, perTryTimeout: 2s, retryOn: 5xx}}\n    \
             headers: {{response: {{remove: [server]}}}}\n    route: [{{destination: {{host: {name}.example}}}}]\n"
        )
    };
    let yaml = [service("a", 3), service("b", 3), service("c", 2)].join("---\n");
    let policy = policy(&yaml, &Resolved::new());
    let route = |host: &str| &policy.mesh_routes(host).expect("bound").routes[0];
    let extras = |host: &str| route(host).extras.clone().expect("extras are set");
    assert!(Arc::ptr_eq(&extras("a.example"), &extras("b.example")), "written alike: compiled once");
    assert!(!Arc::ptr_eq(&extras("a.example"), &extras("c.example")), "another retry count: its own");
    for (host, attempts) in [("a.example", 3), ("b.example", 3), ("c.example", 2)] {
        let route = route(host);
        assert_eq!(route.rewrite().and_then(|rewrite| rewrite.uri.as_deref()), Some("/api/v2/"), "{host}");
        assert_eq!(route.retries().map(|retries| retries.attempts), Some(attempts), "{host}");
        assert!(route.response_headers().is_some_and(|ops| !ops.is_empty()), "{host}");
        assert!(route.request_headers().is_empty(), "{host}");
        let Action::Forward(targets) = &route.action else { panic!("{host}: a forwarding route") };
        assert_eq!(targets.pick(0).map(Target::host), Some(host), "each its own destination");
    }
}

#[test]
fn routes_are_tried_in_declaration_order_and_the_first_match_wins() {
    let policy = policy(CONFIG, &Resolved::new());
    let host = policy.mesh_routes("HTTPBIN.org:80").expect("the VirtualService is bound to the mesh");
    let none = http::HeaderMap::new();
    assert_eq!(first_match(host, "/status/418", &none).unwrap().name().to_string(), "teapot");
    assert!(matches!(
        &first_match(host, "/status/418", &none).unwrap().action,
        Action::Respond(response) if response.0 == StatusCode::IM_A_TEAPOT
    ));
    assert!(matches!(
        &first_match(host, "/old", &none).unwrap().action,
        Action::Redirect(redirect) if redirect.status == StatusCode::PERMANENT_REDIRECT
    ));
    let last = first_match(host, "/get", &none).unwrap();
    assert_eq!(last.name().to_string(), "egress/httpbin[3]");
    assert_eq!(last.timeout(), Some(Duration::from_secs(2)));
    let mut canary = http::HeaderMap::new();
    canary.insert("x-canary", "yes".parse().unwrap());
    let Action::Forward(targets) = &first_match(host, "/get", &canary).unwrap().action else { panic!() };
    let picks: Vec<&str> = [0, 24, 25, 99, 100, 124, 125].map(|roll| targets.pick(roll).unwrap().host()).into();
    assert_eq!(
        picks,
        [
            "a.example.com",
            "a.example.com",
            "b.example.com",
            "b.example.com",
            "a.example.com",
            "a.example.com",
            "b.example.com"
        ]
    );
}

#[test]
fn retries_default_to_istios_and_read_envoys_conditions() {
    let default = RetryPolicy::mesh_default();
    assert_eq!(default.attempts, 2);
    assert!(default.on.connect_failure && default.on.refused_stream && default.on.status(503));
    assert!(!default.on.reset_or_timeout(), "a reset after the request was sent is not retried by default");
    assert!(!default.on.status(500) && !default.on.status(502));
    let cases = [
        ("5xx", 500, true),
        ("5xx", 404, false),
        ("gateway-error", 504, true),
        ("gateway-error", 500, false),
        ("retriable-4xx", 409, true),
        ("connect-failure,429", 429, true),
        ("connect-failure", 503, false),
    ];
    for (retry_on, status, expected) in cases {
        assert_eq!(RetryOn::parse(retry_on).status(status), expected, "{retry_on} on {status}");
    }
    assert!(RetryOn::parse("gateway-error").reset_or_timeout());
    assert!(!RetryOn::parse("connect-failure,retriable-4xx").reset_or_timeout());
}

#[test]
fn destination_rule_subsets_select_endpoints_by_label() {
    let yaml = "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api}
spec:
  hosts: [api.internal]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints: [{address: 192.0.2.1, labels: {version: v1}}, {address: 192.0.2.2, labels: {version: v2}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: api}
spec:
  host: api.internal
  trafficPolicy: {loadBalancer: {simple: RANDOM}}
  subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}, trafficPolicy: {loadBalancer: {simple: PASSTHROUGH}}}]
";
    let policy = policy(yaml, &Resolved::new());
    let Some(service) = policy.registered("api.internal", 80) else { panic!("registered") };
    let v1 = Upstream::Endpoint("192.0.2.1:80".parse().unwrap());
    assert!((0..5).all(|_| service.upstream(80, Some("v1")) == v1));
    assert_eq!(service.upstream(80, Some("v2")), Upstream::OriginalDestination, "the subset's own policy");
    assert_eq!(service.upstream(80, Some("v3")), Upstream::NoSubset);
    let variant = service.variant(Viewer::Gateway, &policy);
    assert_eq!(service.cluster(variant, 80, None).unwrap().policy.lb, LoadBalance::Random);
}

#[test]
fn the_destination_rule_of_the_workloads_namespace_comes_before_the_services_and_the_roots() {
    // Each rule told apart by its connect timeout (seconds).
    let rule = |namespace: &str, seconds: u32, export: &str| {
        format!(
                "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: api, namespace: {namespace}}}\n\
                 spec: {{host: api.internal, exportTo: [{export}], trafficPolicy: {{connectionPool: {{tcp: {{connectTimeout: {seconds}s}}}}}}}}\n---\n"
            )
    };
    let yaml = format!(
        "{}{}{}{}apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: api, namespace: services}}
spec:
  hosts: [api.internal]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints: [{{address: 192.0.2.1}}]
",
        rule("team-a", 1, "'.'"),
        rule("services", 2, "'team-b', 'team-c'"),
        rule("istio-system", 3, "'team-d'"),
        rule("team-x", 4, "'*'"),
    );
    let policy = policy(&yaml, &Resolved::new());
    let Some(service) = policy.registered("api.internal", 80) else { panic!("registered") };
    let timeout = |namespace: Option<&str>| {
        let workload = namespace.map(|ns| Workload { name: "w".into(), namespace: ns.into(), ..Default::default() });
        let variant = service.variant(Viewer::Workload(workload.as_ref()), &policy);
        service.cluster(variant, 80, None).unwrap().policy.connect_timeout.map(|t| t.as_secs())
    };
    assert_eq!(timeout(Some("team-a")), Some(1), "the workload's own namespace's rule");
    assert_eq!(timeout(Some("team-b")), Some(2), "the service's namespace's, exported to team-b");
    assert_eq!(timeout(Some("team-d")), Some(3), "the root namespace's, exported to team-d");
    assert_eq!(timeout(Some("team-e")), None, "none is exported to team-e (team-x's is for its own)");
    assert_eq!(timeout(None), Some(2), "an unknown source: the service's namespace's");
}

#[test]
fn the_registry_knows_hosts_by_port_and_where_their_endpoints_are() {
    let resolved = Resolved::from([("httpbin.org".to_owned(), vec!["203.0.113.80".parse().unwrap()])]);
    let policy = policy(CONFIG, &resolved);
    let service = |host: &str, port: u16| policy.registered(host, port);
    assert_eq!(
        service("httpbin.org", 80).unwrap().upstream(80, None),
        Upstream::Endpoint("203.0.113.80:80".parse().unwrap())
    );
    assert!(service("httpbin.org", 443).is_none(), "a port the ServiceEntry does not declare is not registered");
    assert!(service("edition.cnn.com", 80).is_none());
    let wildcard = service("api.example.com", 8080).unwrap();
    assert_eq!(wildcard.upstream(8080, None), Upstream::OriginalDestination);
    assert!(wildcard.http2(8080) && !wildcard.http2(80));
    let db = service("db.internal", 80).unwrap();
    let picks = [db.upstream(80, None), db.upstream(80, None), db.upstream(80, None)];
    assert_eq!(
        picks,
        [
            Upstream::Endpoint("192.0.2.1:8000".parse().unwrap()),
            Upstream::Endpoint("192.0.2.2:9000".parse().unwrap()),
            Upstream::Endpoint("192.0.2.1:8000".parse().unwrap())
        ]
    );
    let unresolved = policy_without_answers();
    assert!(
        matches!(unresolved.registered("httpbin.org", 80), Some(s) if s.upstream(80, None) == Upstream::NoEndpoint)
    );
}

#[test]
fn of_the_services_registered_under_one_host_a_viewer_gets_the_first_it_sees_on_the_port() {
    let entry = |name: &str, namespace: &str, port: u16, export: &str| {
        format!(
                "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: {name}, namespace: {namespace}}}\n\
                 spec: {{hosts: [API.shared], ports: [{{number: {port}, name: p, protocol: TCP}}], resolution: NONE, \
                 exportTo: [{export}]}}\n"
            )
    };
    let yaml = [
        entry("first", "team-a", 80, "'.'"),
        entry("second", "team-b", 80, "'*'"),
        entry("third", "team-c", 443, "'*'"),
        entry("fourth", "team-d", 80, "'*'"),
    ]
    .join("---\n");
    let policy = policy(&yaml, &Resolved::new());
    let registered = |namespace: Option<&str>, port: u16| {
        let workload = namespace.map(|ns| Workload { name: "w".into(), namespace: ns.into(), ..Default::default() });
        policy
            .registered_for("api.shared", port, Viewer::Workload(workload.as_ref()))
            .map(|service| service.exported.namespace.to_string())
    };
    assert_eq!(registered(Some("team-a"), 80).as_deref(), Some("team-a"), "the first, exported to its own");
    assert_eq!(registered(Some("team-x"), 80).as_deref(), Some("team-b"), "the first exported to everyone");
    assert_eq!(registered(Some("team-x"), 443).as_deref(), Some("team-c"), "the first with the port");
    assert_eq!(registered(None, 80).as_deref(), Some("team-a"), "an unknown source sees all: the first");
    assert_eq!(registered(Some("team-x"), 8080), None, "no service has the port");
}

fn policy_without_answers() -> ProxyPolicy {
    policy(CONFIG, &Resolved::new())
}

#[test]
fn a_connection_naming_no_host_finds_the_services_at_its_address_exact_first_in_declaration_order() {
    let entry = |name: &str, address: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: {name}, namespace: ns}}\n\
             spec: {{hosts: [{name}.example], addresses: ['{address}'], ports: [{{number: 5432, name: pg, protocol: \
             TCP}}], resolution: NONE}}\n"
        )
    };
    // Declared out of address order, with three at one address: the index sorts by address, keeping each
    // address's services in declaration order.
    let yaml = [
        entry("zeta", "203.0.113.9"),
        entry("range", "203.0.113.0/24"),
        entry("first", "203.0.113.7"),
        entry("alpha", "203.0.113.1"),
        entry("second", "203.0.113.7"),
        entry("six", "2001:db8::7"),
        entry("third", "203.0.113.7"),
    ]
    .join("---\n");
    let policy = policy(&yaml, &Resolved::new());
    let at = |address: &str| {
        let address = SocketAddr::new(address.parse().unwrap(), 5432);
        policy.by_address.at(address.ip(), address.port()).map(|service| service.host.to_string()).collect::<Vec<_>>()
    };
    assert_eq!(at("203.0.113.7"), ["first.example", "second.example", "third.example", "range.example"]);
    assert_eq!(at("203.0.113.1"), ["alpha.example", "range.example"]);
    assert_eq!(at("203.0.113.9"), ["zeta.example", "range.example"]);
    assert_eq!(at("203.0.113.8"), ["range.example"], "no exact address: the range");
    assert_eq!(at("2001:db8::7"), ["six.example"]);
    assert!(at("2001:db8::8").is_empty() && at("198.51.100.7").is_empty());
    let first = policy.registered_at("203.0.113.7:5432".parse().unwrap(), Viewer::Gateway);
    assert_eq!(first.map(|service| &*service.host), Some("first.example"));
}

#[test]
fn a_clusters_state_outlives_a_recompile_and_is_its_own() {
    let config = |max: u32| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: api, namespace: ns}}\n\
             spec: {{hosts: [api.example, other.example], ports: [{{number: 80, name: http, protocol: HTTP}}], \
             resolution: STATIC, endpoints: [{{address: 192.0.2.1, labels: {{v: '1'}}}}, {{address: 192.0.2.2, \
             labels: {{v: '2'}}}}]}}\n---\n\
             apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: api, namespace: ns}}\n\
             spec: {{host: api.example, trafficPolicy: {{connectionPool: {{tcp: {{maxConnections: {max}}}}}}}, \
             subsets: [{{name: one, labels: {{v: '1'}}}}, {{name: two, labels: {{v: '2'}}}}]}}\n"
        )
    };
    let states = ClusterStates::default();
    let compile = |yaml: &str| {
        let snapshot = Snapshot::from_yaml(yaml);
        let sidecars = Arc::new(SidecarModes::compile(&snapshot, OutboundMode::RegistryOnly));
        let bindings = bind(&snapshot, &BTreeMap::new());
        proxy_policy(&snapshot, &Resolved::new(), &bindings, sidecars, &ProxySettings::default(), &states)
    };
    // The rule's clusters (all endpoints, then each subset), each with its state.
    let of_rule = |policy: &ProxyPolicy| {
        let service = policy.registered("api.example", 80).expect("registered");
        let clusters = service.clusters.iter().filter(|held| held.variant == 1);
        clusters.map(|held| held.state.clone()).collect::<Vec<_>>()
    };
    let (before, again) = (compile(&config(10)), compile(&config(10)));
    let (before, again) = (of_rule(&before), of_rule(&again));
    assert_eq!(before.len(), 3, "all endpoints, subset one, subset two");
    for (old, new) in before.iter().zip(&again) {
        assert!(Arc::ptr_eq(old, new), "a recompile keeps each cluster's state (its limits' places, ejections)");
    }
    assert!(!Arc::ptr_eq(&before[1], &before[2]) && !Arc::ptr_eq(&before[0], &before[1]), "each cluster its own");
    let changed = of_rule(&compile(&config(20)));
    assert!(changed.iter().zip(&before).all(|(new, old)| !Arc::ptr_eq(new, old)), "new limits, new state");
}

#[test]
fn destination_rules_alike_share_one_compiled_policy_and_others_keep_their_own() {
    let pair = |name: &str, max: u32| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: {name}, namespace: ns}}\n\
             spec: {{hosts: [{name}.example], ports: [{{number: 80, name: http, protocol: HTTP}}], resolution: \
             STATIC, endpoints: [{{address: 192.0.2.1}}]}}\n---\n\
             apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: {name}, namespace: ns}}\n\
             spec: {{host: {name}.example, trafficPolicy: {{connectionPool: {{tcp: {{maxConnections: {max}}}}}, \
             loadBalancer: {{simple: RANDOM}}}}}}\n"
        )
    };
    let yaml = [pair("one", 10), pair("two", 10), pair("three", 20)].join("---\n");
    let policy = policy(&yaml, &Resolved::new());
    let of = |host: &str| {
        let service = policy.registered(host, 80).expect("registered");
        service.clusters.iter().find(|cluster| cluster.variant == 1).expect("under its rule").policy.clone()
    };
    let (one, two, three) = (of("one.example"), of("two.example"), of("three.example"));
    assert!(Arc::ptr_eq(&one, &two), "the same settings: one policy");
    assert!(!Arc::ptr_eq(&one, &three), "other limits: a policy of its own");
    assert_eq!((one.limits.map(|(n, _)| n), three.limits.map(|(n, _)| n)), (Some(10), Some(20)));
    assert_eq!(one.lb, LoadBalance::Random);
}

#[test]
fn a_host_is_known_at_its_entrys_addresses_and_its_endpoints() {
    let yaml = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: db, namespace: ns}\n\
        spec: {hosts: [db.example, replica.example], addresses: [203.0.113.0/28], ports: [{number: 80, name: http, \
        protocol: HTTP}, {number: 5432, name: pg, protocol: TCP}], resolution: STATIC, endpoints: [{address: \
        192.0.2.1}, {address: 192.0.2.2, ports: {pg: 6432}}]}\n---\n\
        apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: any, namespace: ns}\n\
        spec: {hosts: [any.example], ports: [{number: 443, name: tls, protocol: TLS}], resolution: NONE}\n";
    let policy = policy(yaml, &Resolved::new());
    for host in ["db.example", "replica.example"] {
        let service = policy.registered(host, 5432).expect("registered");
        for known in ["192.0.2.1", "192.0.2.2", "203.0.113.5"] {
            assert_eq!(service.known_at(known.parse().unwrap()), Some(true), "{host} at {known}");
        }
        assert_eq!(service.known_at("198.51.100.1".parse().unwrap()), Some(false), "{host}");
    }
    let any = policy.registered("any.example", 443).expect("registered");
    assert_eq!(any.known_at("192.0.2.1".parse().unwrap()), None, "known at no address: nothing to check");
    let at = |address: &str| {
        let found = policy.registered_at(address.parse().unwrap(), Viewer::Gateway);
        found.map(|service| service.host.to_string())
    };
    assert_eq!(at("192.0.2.2:5432").as_deref(), Some("db.example"), "by an endpoint's address");
    assert_eq!(at("203.0.113.9:5432").as_deref(), Some("db.example"), "by the entry's range");
}

#[test]
fn each_gateway_port_is_served_as_its_servers_say() {
    let gateways = "apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: egress, namespace: istio-system}
spec:
  selector: {istio: egressgateway}
  servers:
  - {port: {number: 80, name: http, protocol: HTTP}, hosts: ['*']}
  - {port: {number: 443, name: tls, protocol: TLS}, hosts: [api.example.com], tls: {mode: PASSTHROUGH}}
  - {port: {number: 5432, name: tcp, protocol: TCP}, hosts: ['*']}
  - {port: {number: 8443, name: https, protocol: HTTPS}, hosts: ['*'], tls: {mode: SIMPLE, serverCertificate: /c.pem, privateKey: /k.pem}}
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: mixed, namespace: istio-system}
spec:
  selector: {istio: egressgateway}
  servers:
  - {port: {number: 9443, name: tls, protocol: TLS}, hosts: [api.example.com], tls: {mode: PASSTHROUGH}}
  - {port: {number: 9443, name: http, protocol: HTTP}, hosts: ['*']}
";
    let policy = policy(gateways, &Resolved::default());
    let served = [80, 443, 5432, 8443, 9443, 1234].map(|port| policy.gateway_port(port));
    assert_eq!(
        served,
        [
            GatewayPort::Detected,
            GatewayPort::PassesTlsThrough,
            GatewayPort::Tcp,
            GatewayPort::TerminatesTls,
            // A port with HTTP servers too: the client's first bytes decide.
            GatewayPort::Detected,
            GatewayPort::Detected,
        ]
    );
}
