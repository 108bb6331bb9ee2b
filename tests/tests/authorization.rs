//! AuthorizationPolicies end to end: the seeds' `restrict-egress` on a Gateway port passing TLS through (decided
//! by the ClientHello's name and the port), and root-namespace policies on intercepted HTTP (DENY before ALLOW,
//! dry run counted and not enforced, 403 `RBAC: access denied` before any route); a denied connection or
//! request never reaches the server, and each decision is counted.

use std::{
    io::{Read, Write},
    net::TcpStream,
};

use sluice_tests::{
    http::{get, ECHO},
    istio::{self, HTTPBIN, MESH_REGISTRY_ONLY},
    metrics::total,
    peers::{curl, send_udp, Dnsmasq, Nginx, UdpSink},
    require_root,
    tls::{accepted, certificates, https, openssl_through, signed, tls_server},
    topology::{addr, GATEWAY_WORKLOAD_ADDR, GATEWAY_WORKLOAD_IFACE, INTERNET_ADDR, SERVER_A, SERVER_B},
    Agent, Topology,
};

/// The seeds' policy, as written (`../shared/seeds/k8s-egress-gateway-options-istio.txt`, "Security
/// Configuration").
const RESTRICT_EGRESS: &str = "apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata:
  name: restrict-egress
  namespace: default
spec:
  selector:
    matchLabels:
      istio: egressgateway
  action: ALLOW
  rules:
  - to:
    - operation:
        hosts:
        - \"api.trusted-service.com\"
        - \"*.internal.company.com\"
        ports:
        - \"443\"
        - \"8443\"
";

/// A Gateway passing TLS through on 443 for three names, routed to one registered host at server A.
const PASSTHROUGH: &str = "apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: egress, namespace: istio-system}
spec:
  selector: {istio: egressgateway}
  servers:
  - port: {number: 443, name: tls, protocol: TLS}
    hosts: [api.trusted-service.com, db.internal.company.com, blocked.example.com]
    tls: {mode: PASSTHROUGH}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: passthrough, namespace: istio-system}
spec:
  hosts: [api.trusted-service.com, db.internal.company.com, blocked.example.com]
  gateways: [egress]
  tls:
  - match: [{port: 443, sniHosts: [api.trusted-service.com, db.internal.company.com, blocked.example.com]}]
    route: [{destination: {host: api.trusted-service.com}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: trusted, namespace: istio-system}
spec:
  hosts: [api.trusted-service.com]
  ports: [{number: 443, name: tls, protocol: TLS}]
  location: MESH_EXTERNAL
  resolution: STATIC
  endpoints: [{address: 203.0.113.10}]
";

#[test]
fn the_seeds_restrict_egress_lets_its_names_through_the_gateway_and_closes_the_rest() {
    require_root();
    let topology = Topology::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let names = ["api.trusted-service.com", "db.internal.company.com", "blocked.example.com"];
    let (ca, cert, key) = certificates(dir.path(), "sluice-test-ca", &names);
    let _nginx = tls_server(&topology, &[addr(SERVER_A, 443)], &cert, &key);
    let config = tempfile::tempdir().unwrap();
    istio::write(config.path(), &[MESH_REGISTRY_ONLY, PASSTHROUGH, RESTRICT_EGRESS]).unwrap();
    let args = format!(
        "--intercept {GATEWAY_WORKLOAD_IFACE} --config {} --allow-cidr {GATEWAY_WORKLOAD_ADDR}/32",
        config.path().display()
    );
    let agent = Agent::start(&topology.gateway, &args).unwrap();
    agent.wait_for_log("gateway listener open", 1).unwrap();

    let trusted = https(&topology, "api.trusted-service.com", GATEWAY_WORKLOAD_ADDR, &ca);
    assert_eq!(trusted.as_deref(), Ok("sni=api.trusted-service.com\n"), "{}", agent.log());
    let internal = https(&topology, "db.internal.company.com", GATEWAY_WORKLOAD_ADDR, &ca);
    assert_eq!(internal.as_deref(), Ok("sni=db.internal.company.com\n"), "a *.internal.company.com name");
    let reached = accepted(&topology);
    // Routed and registered, but not a host the policy allows: closed before a byte reaches the server.
    let blocked = https(&topology, "blocked.example.com", GATEWAY_WORKLOAD_ADDR, &ca);
    assert!(blocked.is_err(), "{blocked:?}");
    assert_eq!(accepted(&topology), reached + 1, "only the status request reached nginx: {}", agent.log());

    let metrics = agent.metrics().unwrap();
    let allowed = [("policy", "default/restrict-egress"), ("action", "ALLOW"), ("result", "allowed")];
    assert_eq!(total(&metrics, "sluice_authorization_decisions_total", &allowed), 2, "{metrics}");
    let denied = [("policy", "none"), ("result", "denied")];
    assert_eq!(total(&metrics, "sluice_authorization_decisions_total", &denied), 1, "{metrics}");
    let closed = [("destination_service_name", "api.trusted-service.com"), ("response_flags", "-")];
    assert_eq!(total(&metrics, "istio_tcp_connections_opened_total", &closed), 3, "counted, relayed or not");
}

/// Root-namespace policies: they apply to every workload, known or not.
const MESH_POLICIES: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-admin, namespace: istio-system}
spec:
  action: DENY
  rules: [{to: [{operation: {paths: ['/admin/*']}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: httpbin-only, namespace: istio-system}
spec:
  rules: [{to: [{operation: {hosts: [httpbin.org]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: no-posts
  namespace: istio-system
  annotations: {istio.io/dry-run: 'true'}
spec:
  action: DENY
  rules: [{to: [{operation: {methods: [POST]}}]}]
";

#[test]
fn intercepted_requests_meet_deny_then_allow_and_a_dry_run_is_only_counted() {
    require_root();
    let topology = Topology::new().unwrap();
    let _nginx = Nginx::start(&topology.internet, &[addr(SERVER_A, 80), addr(SERVER_B, 80)], ECHO).unwrap();
    let config = tempfile::tempdir().unwrap();
    istio::write(config.path(), &[MESH_REGISTRY_ONLY, HTTPBIN, &istio::backend("other", SERVER_B, 80), MESH_POLICIES])
        .unwrap();
    let args = format!(
        "--intercept {GATEWAY_WORKLOAD_IFACE} --intercept-port 80 --access-log-format json --config {}",
        config.path().display()
    );
    let agent = Agent::start(&topology.gateway, &args).unwrap();

    let (code, body) = get(&topology, "httpbin.org", SERVER_A, "/anything", &[]);
    assert_eq!(code, 200, "{body}\n{}", agent.log());
    assert!(body.starts_with(&format!("{SERVER_A} host=httpbin.org uri=/anything")), "{body}");
    // DENY first: the allowed host's admin paths are refused, by the proxy itself, as Envoy's RBAC filter answers.
    assert_eq!(get(&topology, "httpbin.org", SERVER_A, "/admin/users", &[]), (403, "RBAC: access denied".to_owned()));
    // A registered host the ALLOW policy does not name: refused before it is routed.
    assert_eq!(get(&topology, "other.backend", SERVER_B, "/", &[]), (403, "RBAC: access denied".to_owned()));
    // The dry-run DENY matches a POST and lets it by.
    let (code, _) = get(&topology, "httpbin.org", SERVER_A, "/anything", &["-X", "POST"]);
    assert_eq!(code, 200);

    let metrics = agent.metrics().unwrap();
    let count = |labels: &[(&str, &str)]| total(&metrics, "sluice_authorization_decisions_total", labels);
    assert_eq!(count(&[("policy", "istio-system/no-admin"), ("result", "denied")]), 1, "{metrics}");
    assert_eq!(count(&[("policy", "none"), ("result", "denied")]), 1, "{metrics}");
    assert_eq!(count(&[("policy", "istio-system/httpbin-only"), ("result", "allowed")]), 2, "{metrics}");
    assert_eq!(count(&[("policy", "istio-system/no-posts"), ("result", "dry_run_denied")]), 1, "{metrics}");
    let forbidden = [("response_code", "403"), ("response_flags", "-")];
    assert_eq!(total(&metrics, "istio_requests_total", &forbidden), 2, "{metrics}");
    // The access log says which policy denied, as Envoy's response code details do.
    let details = "\"response_code_details\":\"rbac_access_denied_matched_policy[istio-system/no-admin]\"";
    agent.wait_for_log(details, 1).unwrap();
    agent.wait_for_log("\"response_code_details\":\"rbac_access_denied_matched_policy[none]\"", 1).unwrap();
}

/// A policy attached by `targetRefs` to one ServiceEntry (as Istio's egress waypoints are configured): it applies
/// to traffic to that service, from any workload, and to nothing else.
const TARGETED_AT_OTHER: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: other-reads-only, namespace: egress}
spec:
  targetRefs: [{kind: ServiceEntry, group: networking.istio.io, name: other}]
  action: ALLOW
  rules: [{to: [{operation: {methods: [GET]}}]}]
";

#[test]
fn a_policy_attached_to_a_service_entry_governs_the_traffic_to_that_service_only() {
    require_root();
    let topology = Topology::new().unwrap();
    let _nginx = Nginx::start(&topology.internet, &[addr(SERVER_A, 80), addr(SERVER_B, 80)], ECHO).unwrap();
    let config = tempfile::tempdir().unwrap();
    let other = istio::backend("other", SERVER_B, 80);
    istio::write(config.path(), &[MESH_REGISTRY_ONLY, HTTPBIN, &other, TARGETED_AT_OTHER]).unwrap();
    let args = format!("--intercept {GATEWAY_WORKLOAD_IFACE} --intercept-port 80 --config {}", config.path().display());
    let agent = Agent::start(&topology.gateway, &args).unwrap();

    let (code, body) = get(&topology, "other.backend", SERVER_B, "/", &[]);
    assert_eq!(
        code,
        200,
        "{body}
{}",
        agent.log()
    );
    let posted = get(&topology, "other.backend", SERVER_B, "/", &["-X", "POST"]);
    assert_eq!(posted, (403, "RBAC: access denied".to_owned()), "only GET is allowed to the targeted service");
    let (code, _) = get(&topology, "httpbin.org", SERVER_A, "/anything", &["-X", "POST"]);
    assert_eq!(code, 200, "another service: the policy does not apply");
    let metrics = agent.metrics().unwrap();
    let count = |labels: &[(&str, &str)]| total(&metrics, "sluice_authorization_decisions_total", labels);
    assert_eq!(count(&[("policy", "egress/other-reads-only"), ("result", "allowed")]), 1, "{metrics}");
    assert_eq!(count(&[("policy", "none"), ("result", "denied")]), 1, "{metrics}");
}

/// Relays an HTTP/1.0 request through the TLS server on 9001 as `db.internal`, presenting `client`.
fn through_terminated_tls(topology: &Topology, ca: &str, client: &(String, String)) -> String {
    openssl_through(topology, 9001, "db.internal", ca, Some(client), b"GET / HTTP/1.0\r\nHost: anything\r\n\r\n")
}

#[test]
fn a_tls_server_relaying_tcp_decides_by_the_client_certificates_identity() {
    require_root();
    let topology = Topology::new().unwrap();
    let _nginx = Nginx::start(&topology.internet, &[addr(SERVER_A, 80)], "reached").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = certificates(dir.path(), "gateway-ca", &["db.internal"]);
    // Another directory: each CA's first certificate is written as `server.pem` there.
    let clients = tempfile::tempdir().unwrap();
    let (client_ca, _, _) = certificates(clients.path(), "client-ca", &["unused.client"]);
    let client = signed(clients.path(), "client-ca", "client", &["URI:spiffe://cluster.local/ns/apps/sa/client"]);
    let stranger =
        signed(clients.path(), "client-ca", "stranger", &["URI:spiffe://cluster.local/ns/other/sa/stranger"]);
    // MUTUAL: any certificate of the client CA gets through the handshake; the policy says whose bytes are relayed.
    let config = format!(
        "apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: db-gw, namespace: istio-system}}
spec:
  selector: {{istio: egressgateway}}
  servers:
  - port: {{number: 9001, name: tls-db, protocol: TLS}}
    hosts: ['*']
    tls: {{mode: MUTUAL, serverCertificate: {cert}, privateKey: {key}, caCertificates: {client_ca}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: db, namespace: istio-system}}
spec:
  hosts: ['*']
  gateways: [db-gw]
  tcp: [{{route: [{{destination: {{host: db.backend, port: {{number: 80}}}}}}]}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: db, namespace: istio-system}}
spec:
  hosts: [db.backend]
  ports: [{{number: 80, name: tcp, protocol: TCP}}]
  endpoints: [{{address: {SERVER_A}}}]
  resolution: STATIC
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: db-clients, namespace: istio-system}}
spec:
  selector: {{matchLabels: {{istio: egressgateway}}}}
  rules:
  - from: [{{source: {{principals: [cluster.local/ns/apps/sa/client], namespaces: [apps]}}}}]
    to: [{{operation: {{hosts: [db.internal], ports: ['9001']}}}}]
"
    );
    let configs = tempfile::tempdir().unwrap();
    istio::write(configs.path(), &[MESH_REGISTRY_ONLY, &config]).unwrap();
    let args = format!(
        "--intercept {GATEWAY_WORKLOAD_IFACE} --intercept-port 80 --config {} --allow-cidr {GATEWAY_WORKLOAD_ADDR}/32",
        configs.path().display()
    );
    let agent = Agent::start(&topology.gateway, &args).unwrap();
    agent.wait_for_log("gateway listener open", 1).unwrap();

    let relayed = through_terminated_tls(&topology, &ca, &client);
    assert!(
        relayed.starts_with("HTTP/1.1 200") && relayed.trim_end().ends_with("reached"),
        "{relayed}\n{}",
        agent.log()
    );
    assert_eq!(through_terminated_tls(&topology, &ca, &stranger), "", "another identity: closed unrelayed");
    let metrics = agent.metrics().unwrap();
    let count = |labels: &[(&str, &str)]| total(&metrics, "sluice_authorization_decisions_total", labels);
    assert_eq!(count(&[("policy", "istio-system/db-clients"), ("result", "allowed")]), 1, "{metrics}");
    assert_eq!(count(&[("policy", "none"), ("result", "denied")]), 1, "{metrics}");
}

/// Two TCP ports registered at server B, which the kernel would pass by address; a root-namespace policy denies
/// one of them to sources outside a namespace (a source condition: the proxy's to decide, not the kernel's).
const TCP_BY_ADDRESS: &str = "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: tcp-services, namespace: egress}
spec:
  hosts: [tcp.backend]
  addresses: [203.0.113.20]
  ports: [{number: 8080, name: tcp-a, protocol: TCP}, {number: 8081, name: tcp-b, protocol: TCP}]
  location: MESH_EXTERNAL
  resolution: NONE
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-8080, namespace: istio-system}
spec:
  action: DENY
  rules: [{from: [{source: {notNamespaces: [trusted]}}], to: [{operation: {ports: ['8080']}}]}]
";

#[test]
fn tcp_the_kernel_would_pass_by_address_is_decided_in_the_proxy_when_policies_govern_it() {
    require_root();
    let topology = Topology::new().unwrap();
    let _nginx = Nginx::start(&topology.internet, &[addr(SERVER_B, 8080), addr(SERVER_B, 8081)], "reached").unwrap();
    let config = tempfile::tempdir().unwrap();
    istio::write(config.path(), &[MESH_REGISTRY_ONLY, TCP_BY_ADDRESS]).unwrap();
    let args = format!("--intercept {GATEWAY_WORKLOAD_IFACE} --intercept-port 80 --config {}", config.path().display());
    let agent = Agent::start(&topology.gateway, &args).unwrap();
    let fetch = |port: u16| curl(&topology.workload, &["--max-time", "3", &format!("http://{SERVER_B}:{port}/")]);

    assert_eq!(fetch(8081).unwrap().trim(), "reached", "registered and not denied: {}", agent.log());
    assert!(fetch(8080).is_err(), "denied by port: closed before it reaches the server");
    let metrics = agent.metrics().unwrap();
    let denied = [("policy", "istio-system/no-8080"), ("action", "DENY"), ("result", "denied")];
    assert_eq!(total(&metrics, "sluice_authorization_decisions_total", &denied), 1, "{metrics}");
}

/// Root-namespace DENY rules that need only addresses and ports: every workload's TCP and UDP to port 8080,
/// anything to server A's port 6000, port 7000 from the workload's subnet and port 7001 from another.
const DENY_BY_ADDRESSES: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-8080, namespace: istio-system}
spec:
  action: DENY
  rules:
  - to: [{operation: {ports: ['8080']}}]
  - when:
    - {key: destination.ip, values: ['203.0.113.10/32']}
    - {key: destination.port, values: ['6000']}
  - from: [{source: {ipBlocks: [10.240.1.0/24]}}]
    to: [{operation: {ports: ['7000']}}]
  - from: [{source: {ipBlocks: [192.0.2.0/24]}}]
    to: [{operation: {ports: ['7001']}}]
";

#[test]
fn a_deny_by_addresses_and_ports_alone_is_enforced_in_the_kernel_for_tcp_and_udp() {
    require_root();
    let topology = Topology::new().unwrap();
    let _nginx = Nginx::start(&topology.internet, &[addr(SERVER_B, 8080), addr(SERVER_B, 8081)], "reached").unwrap();
    let config = tempfile::tempdir().unwrap();
    // ALLOW_ANY (Istio's default): without the policy, everything here would pass.
    istio::write(config.path(), &[DENY_BY_ADDRESSES]).unwrap();
    let args = format!("--intercept {GATEWAY_WORKLOAD_IFACE} --intercept-port 80 --config {}", config.path().display());
    let agent = Agent::start(&topology.gateway, &args).unwrap();
    let fetch = |port: u16| curl(&topology.workload, &["--max-time", "3", &format!("http://{SERVER_B}:{port}/")]);
    let sink = |server, port| UdpSink::bind(&topology.internet, addr(server, port)).unwrap();
    let denied_udp = [sink(SERVER_B, 8080), sink(SERVER_A, 6000), sink(SERVER_B, 7000)];
    let passed_udp = UdpSink::bind(&topology.internet, addr(SERVER_B, 6000)).unwrap();
    let from_elsewhere_only = UdpSink::bind(&topology.internet, addr(SERVER_B, 7001)).unwrap();
    let intercepted_before = agent.sample("sluice_datapath_packets_total{verdict=\"intercepted\"}").unwrap();

    assert_eq!(fetch(8081).unwrap().trim(), "reached", "not denied: {}", agent.log());
    // Refused at its first packet by the kernel (a RST to the SYN), not accepted by the proxy and then closed.
    let refused = fetch(8080).expect_err("denied by port").to_string();
    assert!(refused.contains("Connection refused") || refused.contains("Couldn't connect"), "{refused}");
    send_udp(&topology.workload, addr(SERVER_B, 8080), 3, 100).unwrap();
    send_udp(&topology.workload, addr(SERVER_A, 6000), 3, 100).unwrap();
    send_udp(&topology.workload, addr(SERVER_B, 6000), 3, 100).unwrap();
    send_udp(&topology.workload, addr(SERVER_B, 7000), 3, 100).unwrap();
    send_udp(&topology.workload, addr(SERVER_B, 7001), 3, 100).unwrap();
    let arrived: usize = denied_udp.iter().map(UdpSink::drain).sum();
    assert_eq!(arrived, 0, "no denied datagram arrives");
    assert_eq!(passed_udp.drain(), 3, "server B's port 6000 is not denied");
    assert_eq!(from_elsewhere_only.drain(), 3, "port 7001 is denied from another subnet, not the workload's");

    assert!(agent.sample("sluice_datapath_packets_total{verdict=\"denied\"}").unwrap() >= 10);
    let intercepted = agent.sample("sluice_datapath_packets_total{verdict=\"intercepted\"}").unwrap();
    assert_eq!(intercepted, intercepted_before, "a policy wholly in the kernel hands nothing to the proxy");
    // Each denied flow (one TCP, three UDP) reported by the kernel, counted as the policy's decision and logged.
    let denied = [("policy", "istio-system/no-8080"), ("action", "DENY"), ("result", "denied")];
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while total(&agent.metrics().unwrap(), "sluice_authorization_decisions_total", &denied) < 4
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let metrics = agent.metrics().unwrap();
    assert_eq!(total(&metrics, "sluice_authorization_decisions_total", &denied), 4, "{metrics}");
    agent.wait_for_log(&format!("dst={SERVER_B}:8080 protocol=\"tcp\" verdict=\"denied\""), 1).unwrap();
    agent.wait_for_log("policy=\"istio-system/no-8080\"", 4).unwrap();
    let dump: serde_json::Value = serde_json::from_str(&agent.config_dump().unwrap()).unwrap();
    let denied = &dump["datapath"]["denied"];
    let denied = denied.as_array().unwrap();
    let has = |destination: &str, port: u16, sources: &[&str]| {
        let policy = "istio-system/no-8080";
        denied.contains(
            &serde_json::json!({"destination": destination, "port": port, "sources": sources, "policy": policy}),
        )
    };
    assert!(has("0.0.0.0/0", 8080, &[]) && has("::/0", 8080, &[]), "{dump}");
    assert!(has("203.0.113.10/32", 6000, &[]) && has("0.0.0.0/0", 7000, &["10.240.1.0/24"]), "{dump}");
    assert_eq!(denied.len(), 7, "8080, 7000 and 7001 in each family, and server A's 6000: {dump}");
    assert_eq!(dump["datapath"]["unmatchedTcpToProxy"], false, "nothing left for the proxy to decide");
}

/// A root-namespace ALLOW: every workload may reach port 8081, and nothing else.
const ONLY_8081: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: only-8081, namespace: istio-system}
spec:
  action: ALLOW
  rules: [{to: [{operation: {ports: ['8081']}}]}]
";

#[test]
fn in_allow_any_tcp_no_entry_names_is_decided_by_the_policies_not_passed_through() {
    require_root();
    let topology = Topology::new().unwrap();
    let _nginx = Nginx::start(&topology.internet, &[addr(SERVER_B, 8080), addr(SERVER_B, 8081)], "reached").unwrap();
    let config = tempfile::tempdir().unwrap();
    istio::write(config.path(), &[ONLY_8081]).unwrap();
    let args = format!("--intercept {GATEWAY_WORKLOAD_IFACE} --intercept-port 80 --config {}", config.path().display());
    let agent = Agent::start(&topology.gateway, &args).unwrap();
    let fetch = |port: u16| curl(&topology.workload, &["--max-time", "3", &format!("http://{SERVER_B}:{port}/")]);

    // No ServiceEntry names either port: ALLOW_ANY would pass both in the kernel, unseen by the policy.
    assert_eq!(fetch(8081).unwrap().trim(), "reached", "allowed, and passed through: {}", agent.log());
    // HTTP, by what the proxy read: Envoy's RBAC answer.
    assert_eq!(fetch(8080).unwrap(), "RBAC: access denied", "no ALLOW rule matches: denied");
    // Bytes that are not HTTP: the connection is closed before nginx could answer them (a 400).
    let mut stream = topology.workload.enter(|| TcpStream::connect(addr(SERVER_B, 8080))).unwrap().unwrap();
    stream.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
    stream.write_all(b"\x00\x01\x02\x03 binary\r\n\r\n").unwrap();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    assert!(answer.is_empty(), "{}", String::from_utf8_lossy(&answer));
    let metrics = agent.metrics().unwrap();
    let allowed = [("policy", "istio-system/only-8081"), ("action", "ALLOW"), ("result", "allowed")];
    let denied = [("policy", "none"), ("action", "ALLOW"), ("result", "denied")];
    assert_eq!(total(&metrics, "sluice_authorization_decisions_total", &allowed), 1, "{metrics}");
    assert_eq!(total(&metrics, "sluice_authorization_decisions_total", &denied), 2, "{metrics}");
}

/// A policy of the egress gateway (selected by its labels), for the seeds' two-hop egress: mesh → the gateway's
/// own Service → httpbin.org.
const GATEWAY_NO_ADMIN: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: gateway-no-admin, namespace: smm-demo}
spec:
  selector: {matchLabels: {gateway-name: egress-demo}}
  action: DENY
  rules: [{to: [{operation: {paths: ['/admin/*']}}]}]
";

#[test]
fn the_gateways_policies_apply_to_the_second_hop_of_mesh_traffic_routed_through_it() {
    require_root();
    let topology = Topology::new().unwrap();
    let _nginx = Nginx::start(&topology.internet, &[addr(SERVER_A, 80)], ECHO).unwrap();
    let _dns = Dnsmasq::start(&topology.internet, INTERNET_ADDR, &[("httpbin.org", SERVER_A)]).unwrap();
    let config = tempfile::tempdir().unwrap();
    let seed = istio::seed("create-egress-gateway");
    istio::write(config.path(), &[MESH_REGISTRY_ONLY, &seed, GATEWAY_NO_ADMIN]).unwrap();
    let args = format!(
        "--intercept {GATEWAY_WORKLOAD_IFACE} --intercept-port 80 --config {} --dns-server {INTERNET_ADDR} \
         --allow-cidr {GATEWAY_WORKLOAD_ADDR}/32 --gateway-labels gateway-name=egress-demo,gateway-type=egress \
         --gateway-service egress-demo.smm-demo.svc.cluster.local",
        config.path().display()
    );
    let agent = Agent::start(&topology.gateway, &args).unwrap();
    agent.wait_for_log("gateway listener open", 1).unwrap();

    // From the mesh: the mesh route hands the request to the gateway in process, whose policy applies there.
    let (code, body) = get(&topology, "httpbin.org", SERVER_A, "/get", &[]);
    assert_eq!(code, 200, "{body}\n{}", agent.log());
    assert_eq!(get(&topology, "httpbin.org", SERVER_A, "/admin/users", &[]), (403, "RBAC: access denied".to_owned()));
    // To the gateway's port directly, as another node's sidecar sends it: the same policy.
    let (code, _) = get(&topology, "httpbin.org", GATEWAY_WORKLOAD_ADDR, "/admin/users", &[]);
    assert_eq!(code, 403);
    let metrics = agent.metrics().unwrap();
    let denied = [("policy", "smm-demo/gateway-no-admin"), ("result", "denied")];
    assert_eq!(total(&metrics, "sluice_authorization_decisions_total", &denied), 2, "{metrics}");
}

/// The gateway's policy for the seeds' SNI egress gateway: no storage.googleapis.com through it.
const NO_STORAGE: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-storage, namespace: istio-system}
spec:
  selector: {matchLabels: {istio: egressgateway}}
  action: DENY
  rules: [{to: [{operation: {hosts: [storage.googleapis.com]}}]}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: googleapis-wildcard, namespace: egress}
spec:
  hosts: ['*.googleapis.com']
  ports: [{number: 443, name: https, protocol: HTTPS}]
  location: MESH_EXTERNAL
  resolution: NONE
";

#[test]
fn the_gateways_policies_apply_to_tls_the_mesh_hands_to_it_by_server_name() {
    require_root();
    let topology = Topology::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let names = ["www.googleapis.com", "storage.googleapis.com", "bigquery.googleapis.com"];
    let (ca, cert, key) = certificates(dir.path(), "sluice-test-ca", &names);
    let _nginx = tls_server(&topology, &[addr(SERVER_B, 443)], &cert, &key);
    let _dns = Dnsmasq::start(&topology.internet, INTERNET_ADDR, &[("www.googleapis.com", SERVER_B)]).unwrap();
    let config = tempfile::tempdir().unwrap();
    let seed = istio::seed("egress-gateway-sni");
    istio::write(config.path(), &[MESH_REGISTRY_ONLY, &seed, NO_STORAGE]).unwrap();
    let args = format!(
        "--intercept {GATEWAY_WORKLOAD_IFACE} --intercept-port 443 --config {} --dns-server {INTERNET_ADDR} \
         --allow-cidr {GATEWAY_WORKLOAD_ADDR}/32 --gateway-service istio-egressgateway.istio-system.svc.cluster.local",
        config.path().display()
    );
    let agent = Agent::start(&topology.gateway, &args).unwrap();
    agent.wait_for_log("gateway listener open", 1).unwrap();

    // From the mesh, whatever address was dialled: the mesh route hands the connection to the gateway, whose
    // policy decides it by the ClientHello's name.
    let allowed = https(&topology, "bigquery.googleapis.com", SERVER_A, &ca);
    assert_eq!(allowed.as_deref(), Ok("sni=bigquery.googleapis.com\n"), "{}", agent.log());
    let reached = accepted(&topology);
    assert!(https(&topology, "storage.googleapis.com", SERVER_A, &ca).is_err());
    assert_eq!(accepted(&topology), reached + 1, "only the status request reached nginx");
    let metrics = agent.metrics().unwrap();
    let denied = [("policy", "istio-system/no-storage"), ("result", "denied")];
    assert_eq!(total(&metrics, "sluice_authorization_decisions_total", &denied), 1, "{metrics}");
}
