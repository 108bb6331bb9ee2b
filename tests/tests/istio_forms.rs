//! Routes in the forms Istio accepts that a stricter reader would refuse, end to end through the proxy: a
//! VirtualService delegating to another, RE2's `\Q…\E` quoting, and `withoutHeaders` with `regex: "*"`.

use sluice_tests::{
    http::{get, ECHO},
    istio::{self, backend, HTTPBIN, MESH_REGISTRY_ONLY},
    peers::Nginx,
    require_root,
    topology::{addr, GATEWAY_WORKLOAD_IFACE, SERVER_A, SERVER_B},
    Agent, Topology,
};

/// Routes in forms Istio takes and a stricter reader would refuse: a delegate, RE2's `\Q…\E` quoting, and
/// `withoutHeaders` with `regex: "*"` (the header is absent).
const ISTIO_FORMS: &str = r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: root, namespace: egress}
spec:
  hosts: [httpbin.org]
  http:
  - match: [{uri: {prefix: /team}}]
    headers: {response: {set: {x-root: 'yes'}}}
    delegate: {name: team-routes, namespace: team}
  - match: [{uri: {regex: '\Q/v1.0/\E[a-z]+'}}]
    route: [{destination: {host: canary.backend}}]
  - match: [{uri: {prefix: /quiet}, withoutHeaders: {x-debug: {regex: '*'}}}]
    route: [{destination: {host: canary.backend}}]
  - route: [{destination: {host: httpbin.org}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: team-routes, namespace: team}
spec:
  http:
  - match: [{uri: {prefix: /team/canary}}]
    route: [{destination: {host: canary.backend}}]
  - route: [{destination: {host: httpbin.org}}]
"#;

#[test]
fn delegates_re2_quoting_and_absent_headers_route_as_istio_routes_them() {
    require_root();
    let topology = Topology::new().unwrap();
    let _nginx = Nginx::start(&topology.internet, &[addr(SERVER_A, 80), addr(SERVER_B, 80)], ECHO).unwrap();
    let config = tempfile::tempdir().unwrap();
    istio::write(config.path(), &[MESH_REGISTRY_ONLY, HTTPBIN, &backend("canary", SERVER_B, 80), ISTIO_FORMS]).unwrap();
    let args = format!("--intercept {GATEWAY_WORKLOAD_IFACE} --config {}", config.path().display());
    let agent = Agent::start(&topology.gateway, &args).unwrap();
    let routed_to = |path: &str, extra: &[&str]| {
        let mut extra = extra.to_vec();
        extra.extend(["-D", "-"]);
        let (code, response) = get(&topology, "httpbin.org", SERVER_A, path, &extra);
        assert_eq!(code, 200, "{path}: {response}\n{}", agent.log());
        let body = response.rsplit("\r\n\r\n").next().unwrap_or("").to_owned();
        (body.split(' ').next().unwrap_or("").to_owned(), response.to_ascii_lowercase().contains("x-root: yes"))
    };

    // The root's /team route stands for the delegate's routes, each within /team, with the root's headers.
    assert_eq!(routed_to("/team/canary/x", &[]), (SERVER_B.to_owned(), true), "the delegate's first route");
    assert_eq!(routed_to("/team/other", &[]), (SERVER_A.to_owned(), true), "the delegate's catch-all, within /team");
    assert_eq!(routed_to("/other", &[]), (SERVER_A.to_owned(), false), "the root's own catch-all");
    // `\Q/v1.0/\E` quotes the dot: /v1x0/ is not matched.
    assert_eq!(routed_to("/v1.0/abc", &[]).0, SERVER_B);
    assert_eq!(routed_to("/v1x0/abc", &[]).0, SERVER_A);
    // `withoutHeaders: {x-debug: {regex: "*"}}`: only requests without x-debug.
    assert_eq!(routed_to("/quiet", &[]).0, SERVER_B);
    assert_eq!(routed_to("/quiet", &["-H", "x-debug: 1"]).0, SERVER_A);
}
