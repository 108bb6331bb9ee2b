//! DestinationRules end to end: a workload's curl → the classifier → the agent's proxy → nginx and scripted
//! upstreams in the internet namespace — subsets, consistent hashing, outlier ejection, connection-pool limits,
//! and TLS originated to the endpoints and verified.

use std::net::SocketAddr;

use sluice_tests::{
    http::{get, silent_server, ECHO},
    istio::{self, backend, FLAKY, HTTPBIN, MESH_REGISTRY_ONLY},
    peers::Nginx,
    require_root,
    tls::certificates,
    topology::{addr, GATEWAY_WORKLOAD_IFACE, SERVER_A, SERVER_B},
    Agent, Topology,
};

const DESTINATION_RULES: &str = "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: versions, namespace: egress}
spec:
  hosts: [versions.backend]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints: [{address: 203.0.113.10, labels: {version: v1}}, {address: 203.0.113.20, labels: {version: v2}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: versions, namespace: egress}
spec:
  host: versions.backend
  subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: flaky, namespace: egress}
spec:
  host: flaky.backend
  trafficPolicy:
    outlierDetection: {consecutiveGatewayErrors: 1, interval: 1s, baseEjectionTime: 60s, maxEjectionPercent: 50}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: slow, namespace: egress}
spec:
  host: slow.backend
  trafficPolicy:
    connectionPool: {tcp: {maxConnections: 1}, http: {http1MaxPendingRequests: 1}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: sticky, namespace: egress}
spec:
  hosts: [sticky.backend]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints: [{address: 203.0.113.10}, {address: 203.0.113.20}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: sticky, namespace: egress}
spec:
  host: sticky.backend
  trafficPolicy:
    loadBalancer: {consistentHash: {httpHeaderName: x-user}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: tls, namespace: egress}
spec:
  host: tls.backend
  trafficPolicy: {tls: {mode: SIMPLE}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: unreachable, namespace: egress}
spec:
  host: unreachable.backend
  trafficPolicy:
    connectionPool: {tcp: {connectTimeout: 300ms}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: httpbin, namespace: egress}
spec:
  hosts: [httpbin.org]
  http:
  - match: [{headers: {x-version: {exact: v2}}}]
    route: [{destination: {host: versions.backend, subset: v2}}]
  - match: [{uri: {exact: /versions}}]
    route: [{destination: {host: versions.backend, subset: v1}}]
  - match: [{uri: {exact: /missing-subset}}]
    route: [{destination: {host: versions.backend, subset: v3}}]
  - match: [{uri: {exact: /sticky}}]
    route: [{destination: {host: sticky.backend}}]
  - match: [{uri: {exact: /tls}}]
    route: [{destination: {host: tls.backend}}]
  - match: [{uri: {exact: /unreachable}}]
    retries: {attempts: 0}
    route: [{destination: {host: unreachable.backend}}]
  - match: [{uri: {exact: /flaky}}]
    retries: {attempts: 0}
    route: [{destination: {host: flaky.backend}}]
  - match: [{uri: {exact: /slow}}]
    timeout: 2s
    retries: {attempts: 0}
    route: [{destination: {host: slow.backend}}]
";

#[test]
fn destination_rules_pick_subsets_eject_failing_endpoints_and_limit_connections() {
    require_root();
    let topology = Topology::new().unwrap();
    let _nginx = Nginx::start(&topology.internet, &[addr(SERVER_A, 80), addr(SERVER_B, 80)], ECHO).unwrap();
    let _silent = silent_server(&topology, addr(SERVER_B, 8081));
    let config = tempfile::tempdir().unwrap();
    istio::write(
        config.path(),
        &[
            MESH_REGISTRY_ONLY,
            HTTPBIN,
            FLAKY,
            &backend("slow", SERVER_B, 8081),
            // Nothing answers there: connecting takes as long as the DestinationRule allows.
            &backend("unreachable", "203.0.113.99", 80),
            // nginx answers plain HTTP there: a request sent in the clear would get 200, TLS fails.
            &backend("tls", SERVER_A, 80),
            DESTINATION_RULES,
        ],
    )
    .unwrap();
    let args = format!(
        "--intercept {GATEWAY_WORKLOAD_IFACE} --access-log-format text --intercept-port 80 --config {}",
        config.path().display()
    );
    let agent = Agent::start(&topology.gateway, &args).unwrap();
    let get = |path: &str, extra: &[&str]| get(&topology, "httpbin.org", SERVER_A, path, extra);

    for _ in 0..3 {
        assert!(get("/versions", &[]).1.starts_with(&format!("{SERVER_A} ")), "subset v1 is server A only");
        assert!(get("/versions", &["-H", "x-version: v2"]).1.starts_with(&format!("{SERVER_B} ")), "v2 is B only");
    }
    assert_eq!(get("/missing-subset", &[]).0, 503, "a subset no DestinationRule defines: NC");
    // A consistent hash on x-user: each user stays on one endpoint, and the users share both.
    let mut servers = std::collections::BTreeSet::new();
    for user in ["alice", "bob", "carol", "dave", "erin", "frank"] {
        let user_header = format!("x-user: {user}");
        let seen: std::collections::BTreeSet<String> = (0..4)
            .map(|_| get("/sticky", &["-H", &user_header]).1.split(' ').next().unwrap_or_default().to_owned())
            .collect();
        assert_eq!(seen.len(), 1, "{user} went to {seen:?}");
        servers.extend(seen);
    }
    assert_eq!(servers.len(), 2, "{servers:?}");
    assert_eq!(get("/unreachable", &[]).0, 503, "a connect timeout: UF");
    let (code, body) = get("/tls", &[]);
    assert_eq!(code, 503, "TLS to a server that speaks none fails: never sent in the clear: {body}");
    agent.wait_for_log("\"GET /unreachable HTTP/1.1\" 503 UF ", 1).unwrap();
    let log = agent.log();
    let line = log.lines().find(|l| l.contains("\"GET /unreachable HTTP/1.1\" 503 UF ")).expect(&log);
    let duration: u64 = line.split(' ').nth(8).and_then(|d| d.parse().ok()).expect(line);
    assert!((300..5000).contains(&duration), "connectTimeout 300ms, not Istio's default 10s: {line}");

    // The refusing endpoint fails once, is ejected, and every later request goes to the healthy one.
    let codes: Vec<u16> = (0..6).map(|_| get("/flaky", &[]).0).collect();
    assert_eq!(codes.iter().filter(|&&c| c == 503).count(), 1, "{codes:?}\n{}", agent.log());
    assert_eq!(codes[1..], [200; 5], "{codes:?}");

    // One connection and one pending request: of three at once, the third overflows (503 UO) at once.
    let requests: Vec<_> = (0..3)
        .map(|i| {
            std::thread::sleep(std::time::Duration::from_millis(150 * i));
            let namespace = topology.workload.name().to_owned();
            std::thread::spawn(move || {
                std::process::Command::new("ip")
                    .args(["netns", "exec", &namespace, "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}"])
                    .args(["--resolve", &format!("httpbin.org:80:{SERVER_A}"), "http://httpbin.org/slow"])
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                    .unwrap_or_default()
            })
        })
        .collect();
    let codes: Vec<String> = requests.into_iter().map(|r| r.join().unwrap()).collect();
    assert_eq!(codes.iter().filter(|c| c.as_str() == "503").count(), 1, "{codes:?}");
    assert_eq!(codes.iter().filter(|c| c.as_str() == "504").count(), 2, "{codes:?}");
    agent.wait_for_log("\"GET /slow HTTP/1.1\" 503 UO ", 1).unwrap();
}

#[test]
fn destination_rules_originate_tls_to_the_endpoints_and_verify_them() {
    require_root();
    let topology = Topology::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = certificates(dir.path(), "sluice-test-ca", &["secure.backend"]);
    let other = tempfile::tempdir().unwrap();
    let (other_ca, _, _) = certificates(other.path(), "another-ca", &["secure.backend"]);
    let (tls, tls_h2) = (addr(SERVER_B, 443), addr(SERVER_B, 8443));
    let server = |listen: SocketAddr, http2: &str| {
        format!(
            "server {{\n    listen {listen} ssl{http2};\n    ssl_certificate {cert};\n    ssl_certificate_key {key};\n    \
             location / {{ default_type text/plain; \
             return 200 \"$server_protocol $ssl_protocol sni=$ssl_server_name host=$host\\n\"; }}\n  }}\n"
        )
    };
    let servers = server(tls, "") + &server(tls_h2, " http2");
    let _origin = Nginx::start_with(&topology.internet, &servers, &[tls, tls_h2]).unwrap();
    let config = tempfile::tempdir().unwrap();
    let routes = format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: secure, namespace: egress}}
spec:
  hosts: [secure.backend, forged.backend]
  ports: [{{number: 80, name: http, protocol: HTTP, targetPort: 443}}]
  resolution: STATIC
  endpoints: [{{address: {SERVER_B}}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: secure-h2, namespace: egress}}
spec:
  hosts: [h2.backend]
  ports: [{{number: 80, name: grpc, protocol: HTTP2, targetPort: 8443}}]
  resolution: STATIC
  endpoints: [{{address: {SERVER_B}}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: secure-h2, namespace: egress}}
spec:
  host: h2.backend
  trafficPolicy: {{tls: {{mode: SIMPLE, sni: secure.backend, caCertificates: {ca}}}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: secure, namespace: egress}}
spec:
  host: secure.backend
  trafficPolicy: {{tls: {{mode: SIMPLE, sni: secure.backend, caCertificates: {ca}}}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: forged, namespace: egress}}
spec:
  host: forged.backend
  trafficPolicy: {{tls: {{mode: SIMPLE, sni: secure.backend, caCertificates: {other_ca}}}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: httpbin, namespace: egress}}
spec:
  hosts: [httpbin.org]
  http:
  - match: [{{uri: {{prefix: /forged}}}}]
    route: [{{destination: {{host: forged.backend}}}}]
  - match: [{{uri: {{prefix: /h2}}}}]
    route: [{{destination: {{host: h2.backend}}}}]
  - route: [{{destination: {{host: secure.backend}}}}]
"
    );
    istio::write(config.path(), &[MESH_REGISTRY_ONLY, HTTPBIN, &routes]).unwrap();
    let args = format!(
        "--intercept {GATEWAY_WORKLOAD_IFACE} --access-log-format text --intercept-port 80 --config {}",
        config.path().display()
    );
    let agent = Agent::start(&topology.gateway, &args).unwrap();

    // The workload speaks plain HTTP; the gateway speaks TLS to the endpoint, SNI and certificate checked.
    for _ in 0..2 {
        let (code, body) = get(&topology, "httpbin.org", SERVER_A, "/", &[]);
        assert_eq!(code, 200, "{body}\n{}", agent.log());
        // (nginx 1.22 offers up to TLS 1.2 by default.)
        assert_eq!(body.trim(), "HTTP/1.1 TLSv1.2 sni=secure.backend host=httpbin.org", "{body}");
    }
    // An HTTP2 port: HTTP/2 over TLS, agreed by ALPN.
    for _ in 0..2 {
        let (code, body) = get(&topology, "httpbin.org", SERVER_A, "/h2", &[]);
        assert_eq!(code, 200, "{body}\n{}", agent.log());
        assert_eq!(body.trim(), "HTTP/2.0 TLSv1.2 sni=secure.backend host=httpbin.org", "{body}");
    }
    let (code, body) = get(&topology, "httpbin.org", SERVER_A, "/forged", &[]);
    assert_eq!(code, 503, "a certificate another CA signed is refused: {body}");
    // Said as Envoy says it (BoringSSL's reason, then rustls's detail).
    let reason =
        "transport failure reason: TLS_error:|CERTIFICATE_VERIFY_FAILED:invalid peer certificate: UnknownIssuer";
    assert!(body.contains(reason), "{body}");
    // A failed handshake is a connect failure: retried under Istio's default retries, then `UF,URX`.
    agent.wait_for_log("\"GET /forged HTTP/1.1\" 503 UF,URX ", 1).unwrap();
}

#[test]
fn a_destination_rules_max_requests_per_connection_closes_upstream_connections_after_that_many() {
    require_root();
    let topology = Topology::new().unwrap();
    // nginx answers with how many requests its connection has carried.
    let _nginx = Nginx::start(&topology.internet, &[addr(SERVER_A, 80)], "$connection_requests").unwrap();
    let config = tempfile::tempdir().unwrap();
    let two_requests = "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: httpbin, namespace: egress}
spec:
  host: httpbin.org
  trafficPolicy:
    connectionPool: {http: {maxRequestsPerConnection: 2}}
";
    istio::write(config.path(), &[MESH_REGISTRY_ONLY, HTTPBIN, two_requests]).unwrap();
    let args =
        format!("--intercept {GATEWAY_WORKLOAD_IFACE} --access-log-format text --config {}", config.path().display());
    let agent = Agent::start(&topology.gateway, &args).unwrap();

    let counts: Vec<String> =
        (0..5).map(|_| get(&topology, "httpbin.org", SERVER_A, "/", &[]).1.trim().to_owned()).collect();
    assert_eq!(counts, ["1", "2", "1", "2", "1"], "two requests per upstream connection: {}", agent.log());
}

/// `connectionPool.http.h2UpgradePolicy: UPGRADE` sends an HTTP/1.1 client's requests to the endpoints as HTTP/2
/// (here an nginx that speaks nothing else on its port); a host without the rule is still spoken to in HTTP/1.1.
/// The mesh config's `h2UpgradePolicy: UPGRADE` upgrades every HTTP port but a rule's `DO_NOT_UPGRADE`.
#[test]
fn a_destination_rules_h2_upgrade_policy_speaks_http2_to_the_endpoints() {
    require_root();
    let topology = Topology::new().unwrap();
    let echo = "$server_protocol host=$host";
    let _nginx = Nginx::start(&topology.internet, &[addr(SERVER_A, 80)], echo).unwrap();
    let _h2_only = Nginx::start_h2c(&topology.internet, addr(SERVER_B, 8085), echo).unwrap();
    let config = tempfile::tempdir().unwrap();
    let upgraded = "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: upgraded, namespace: egress}
spec:
  host: upgraded.backend
  trafficPolicy:
    connectionPool: {http: {h2UpgradePolicy: UPGRADE}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: httpbin, namespace: egress}
spec:
  hosts: [httpbin.org]
  http:
  - match: [{uri: {prefix: /up}}]
    route: [{destination: {host: upgraded.backend}}]
  - route: [{destination: {host: httpbin.org}}]
";
    let documents = [MESH_REGISTRY_ONLY, HTTPBIN, &backend("upgraded", SERVER_B, 8085), upgraded];
    istio::write(config.path(), &documents).unwrap();
    let args =
        format!("--intercept {GATEWAY_WORKLOAD_IFACE} --access-log-format text --config {}", config.path().display());
    let agent = Agent::start(&topology.gateway, &args).unwrap();

    let (code, body) = get(&topology, "httpbin.org", SERVER_A, "/up", &["--http1.1"]);
    assert_eq!((code, body.trim()), (200, "HTTP/2.0 host=httpbin.org"), "{}", agent.log());
    let (code, body) = get(&topology, "httpbin.org", SERVER_A, "/get", &["--http1.1"]);
    assert_eq!((code, body.trim()), (200, "HTTP/1.1 host=httpbin.org"), "{}", agent.log());

    // Mesh-wide: the h2-only nginx is reached without a rule; httpbin.org's rule keeps it on HTTP/1.1.
    let mesh = "apiVersion: v1
kind: ConfigMap
metadata: {name: istio, namespace: istio-system}
data:
  mesh: |
    outboundTrafficPolicy: {mode: REGISTRY_ONLY}
    h2UpgradePolicy: UPGRADE
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: httpbin, namespace: egress}
spec:
  host: httpbin.org
  trafficPolicy:
    connectionPool: {http: {h2UpgradePolicy: DO_NOT_UPGRADE}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: httpbin, namespace: egress}
spec:
  hosts: [httpbin.org]
  http:
  - match: [{uri: {prefix: /up}}]
    route: [{destination: {host: plain.backend}}]
  - route: [{destination: {host: httpbin.org}}]
";
    istio::write(config.path(), &[HTTPBIN, &backend("plain", SERVER_B, 8085), mesh]).unwrap();
    agent.wait_for_log("configuration loaded", 2).unwrap();
    let (code, body) = get(&topology, "httpbin.org", SERVER_A, "/up", &["--http1.1"]);
    assert_eq!((code, body.trim()), (200, "HTTP/2.0 host=httpbin.org"), "{}", agent.log());
    let (code, body) = get(&topology, "httpbin.org", SERVER_A, "/get", &["--http1.1"]);
    assert_eq!((code, body.trim()), (200, "HTTP/1.1 host=httpbin.org"), "{}", agent.log());
}
