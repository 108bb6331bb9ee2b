//! The HTTP proxy on intercepted traffic, end to end: a workload's curl → the gateway's classifier → the agent's
//! proxy → nginx in the internet namespace, with Istio configuration from files.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener},
    path::Path,
};

use sluice_tests::{
    http::{get, silent_server, ECHO},
    istio::{self, backend, FLAKY, HTTPBIN, MESH_REGISTRY_ONLY},
    metrics::total,
    peers::{curl, read_head, Dnsmasq, Nginx, ScriptedServer},
    require_root,
    topology::{addr, GATEWAY_WORKLOAD_ADDR, GATEWAY_WORKLOAD_IFACE, INTERNET_ADDR, SERVER_A, SERVER_B, WORKLOAD_ADDR},
    Agent, Topology,
};

fn write_config(dir: &Path, documents: &[&str]) {
    istio::write(dir, documents).unwrap();
}

/// The agent's arguments, with `extra`, writing Envoy's text access log (the tests read it). Port 80 is handed to
/// the proxy because the configuration declares it HTTP: no --intercept-port.
fn intercepting(config: &std::path::Path, extra: &str) -> String {
    let config = config.display();
    format!("--intercept {GATEWAY_WORKLOAD_IFACE} --access-log-format text {extra} --config {config}")
}

#[test]
fn unregistered_host_gets_502_under_registry_only_and_registered_host_is_proxied() {
    require_root();
    let topology = Topology::new().unwrap();
    let _nginx = Nginx::start(&topology.internet, &[addr(SERVER_A, 80), addr(SERVER_B, 80)], ECHO).unwrap();
    let config = tempfile::tempdir().unwrap();
    write_config(config.path(), &[MESH_REGISTRY_ONLY, HTTPBIN]);
    let args = intercepting(config.path(), "");
    let agent = Agent::start(&topology.gateway, &args).unwrap();

    let (code, body) = get(&topology, "httpbin.org", SERVER_A, "/get?x=1", &["-A", "sluice-test"]);
    assert_eq!(code, 200, "{body}\n{}", agent.log());
    // Intercepted traffic is forwarded as a sidecar forwards it: no x-forwarded-for added.
    assert!(body.starts_with(&format!("{SERVER_A} host=httpbin.org uri=/get?x=1 added= xff= id=")), "{body}");
    let id = body.rsplit("id=").next().unwrap().trim();
    assert_eq!(id.len(), 36, "the proxy adds an x-request-id: {body}");

    let (code, body) = get(&topology, "edition.cnn.com", SERVER_B, "/", &[]);
    assert_eq!(code, 502, "Envoy's answer for an unregistered host under REGISTRY_ONLY: {body}");
    assert!(body.is_empty(), "{body}");
    let (code, _) = get(&topology, "edition.cnn.com", SERVER_A, "/", &[]);
    assert_eq!(code, 502, "the Host decides, not the address");
    let (answer, closed) = raw_exchange(&topology, addr(SERVER_B, 80), b"hello\r\n\r\n");
    assert!(answer.is_empty() && closed, "opaque TCP to an unregistered destination is reset: {answer:?}");

    let metrics = agent.metrics().unwrap();
    let blackholed = [("destination_service_name", "BlackHoleCluster"), ("response_code", "502")];
    assert_eq!(total(&metrics, "istio_requests_total", &blackholed), 2, "{metrics}");
    let refused = [("destination_service_name", "BlackHoleCluster"), ("request_protocol", "tcp")];
    assert_eq!(total(&metrics, "istio_tcp_connections_opened_total", &refused), 1, "{metrics}");
    let served = [
        ("reporter", "source"),
        ("destination_service", "httpbin.org"),
        ("destination_service_name", "httpbin.org"),
        ("destination_service_namespace", "egress"),
        ("response_code", "200"),
        ("request_protocol", "http"),
    ];
    assert_eq!(total(&metrics, "istio_requests_total", &served), 1, "{metrics}");
    assert_eq!(total(&metrics, "istio_request_duration_milliseconds_count", &served), 1, "{metrics}");

    // The access log is written in batches, after the metrics count a request: waited for.
    agent.wait_for_log("\"GET / HTTP/1.1\" 502 - 0 0 ", 2).unwrap();
    let log = agent.log();
    assert!(log.contains("\"GET /get?x=1 HTTP/1.1\" 200 - 0 "), "an access-log line per request:\n{log}");
    assert!(log.contains("\"sluice-test\""), "{log}");
    assert!(log.contains(&format!("\"httpbin.org\" \"{SERVER_A}:80\"")), "{log}");
    assert!(log.contains("\"GET / HTTP/1.1\" 502 - 0 0 "), "{log}");
}

#[test]
fn upstream_connections_are_kept_alive_and_reused_once_a_response_has_been_read() {
    require_root();
    let topology = Topology::new().unwrap();
    let _nginx = Nginx::start(&topology.internet, &[addr(SERVER_A, 80)], "$connection $connection_requests").unwrap();
    let config = tempfile::tempdir().unwrap();
    write_config(config.path(), &[MESH_REGISTRY_ONLY, HTTPBIN]);
    let args = intercepting(config.path(), "");
    let agent = Agent::start(&topology.gateway, &args).unwrap();

    // Each curl is a client connection of its own; upstream, one connection carries every request in turn.
    let served: Vec<String> =
        (0..4).map(|_| get(&topology, "httpbin.org", SERVER_A, "/", &[]).1.trim().to_owned()).collect();
    let connection = served[0].split(' ').next().unwrap();
    let expected: Vec<String> = (1..=4).map(|n| format!("{connection} {n}")).collect();
    assert_eq!(served, expected, "{}", agent.log());
}

#[test]
fn allow_any_passes_unregistered_hosts_through_to_their_original_destination() {
    require_root();
    let topology = Topology::new().unwrap();
    let _nginx = Nginx::start(&topology.internet, &[addr(SERVER_B, 80)], ECHO).unwrap();
    let config = tempfile::tempdir().unwrap();
    write_config(config.path(), &[HTTPBIN]);
    // One worker: every task on the thread that drives the I/O (the runtime a one-CPU pod gets).
    let args = intercepting(config.path(), "--concurrency 1");
    let agent = Agent::start(&topology.gateway, &args).unwrap();

    let (code, body) = get(&topology, "edition.cnn.com", SERVER_B, "/world", &[]);
    assert_eq!(code, 200, "{body}");
    assert!(body.starts_with(&format!("{SERVER_B} host=edition.cnn.com uri=/world")), "{body}");
    // Not HTTP: relayed as TCP, bytes untouched.
    let (answer, closed) = raw_exchange(&topology, addr(SERVER_B, 80), b"hello\r\n\r\n");
    assert!(answer.starts_with("HTTP/1.1 400") && closed, "nginx's own answer to what it got: {answer:?}");

    let metrics = agent.metrics().unwrap();
    let passthrough = [("destination_service_name", "PassthroughCluster"), ("response_code", "200")];
    assert_eq!(total(&metrics, "istio_requests_total", &passthrough), 1, "{metrics}");
    let relayed = [("destination_service_name", "PassthroughCluster"), ("request_protocol", "tcp")];
    assert_eq!(total(&metrics, "istio_tcp_connections_opened_total", &relayed), 1, "{metrics}");
    assert_eq!(total(&metrics, "istio_tcp_connections_closed_total", &relayed), 1, "{metrics}");
    assert_eq!(total(&metrics, "istio_tcp_received_bytes_total", &relayed), 9, "{metrics}");
    assert!(total(&metrics, "istio_tcp_sent_bytes_total", &relayed) > 0, "{metrics}");
}

#[test]
fn a_root_namespace_sidecars_outbound_mode_is_every_workloads_in_the_proxy_and_in_the_kernel() {
    require_root();
    let topology = Topology::new().unwrap();
    let _nginx = Nginx::start(&topology.internet, &[addr(SERVER_B, 80), addr(SERVER_B, 8081)], ECHO).unwrap();
    let config = tempfile::tempdir().unwrap();
    // No mesh config (Istio's ALLOW_ANY), but the root namespace's Sidecar says REGISTRY_ONLY.
    let sidecar = "apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: default, namespace: istio-system}
spec: {outboundTrafficPolicy: {mode: REGISTRY_ONLY}}
";
    write_config(config.path(), &[HTTPBIN, sidecar]);
    let args = intercepting(config.path(), "--blackhole reject");
    let agent = Agent::start(&topology.gateway, &args).unwrap();
    let opaque = format!("http://{SERVER_B}:8081/");

    assert_eq!(get(&topology, "edition.cnn.com", SERVER_B, "/", &[]).0, 502, "the proxy: {}", agent.log());
    let refused = curl(&topology.workload, &["--max-time", "2", &opaque]).unwrap_err().to_string();
    assert!(refused.contains("refused") || refused.contains("(7)"), "the kernel rejects it: {refused}");

    write_config(config.path(), &[HTTPBIN]);
    wait_for_log(&agent, "policy applied");
    assert_eq!(get(&topology, "edition.cnn.com", SERVER_B, "/", &[]).0, 200, "the mesh's ALLOW_ANY again");
    assert!(curl(&topology.workload, &[&opaque]).unwrap().starts_with(SERVER_B), "and in the kernel");
}

const ROUTES: &str = "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: backends, namespace: egress}
spec:
  hosts: [a.backend, b.backend]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints: [{address: 203.0.113.20}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: httpbin, namespace: egress}
spec:
  hosts: [httpbin.org]
  http:
  - name: teapot
    match: [{uri: {exact: /status/418}}]
    directResponse: {status: 418, body: {string: short and stout}}
  - match: [{uri: {prefix: /old}}]
    redirect: {uri: /new, authority: example.org}
  - match: [{uri: {prefix: /api/}}]
    rewrite: {uri: /v2/}
    headers:
      request: {set: {x-added: 'yes'}}
      response: {set: {x-route: api}}
    route: [{destination: {host: httpbin.org}}]
  - match: [{headers: {x-canary: {exact: 'yes'}}}]
    route: [{destination: {host: a.backend}}]
  - match: [{uri: {prefix: /split}}]
    route:
    - {destination: {host: httpbin.org}, weight: 50}
    - {destination: {host: b.backend}, weight: 50}
  - match: [{uri: {prefix: /slow}}]
    timeout: 0.5s
    route: [{destination: {host: slow.backend}}]
  - match: [{uri: {prefix: /down}}]
    route: [{destination: {host: down.backend}}]
  - match: [{uri: {prefix: /unregistered}}]
    route: [{destination: {host: nowhere.example}}]
  - match: [{uri: {prefix: /}, method: {exact: GET}}]
    route: [{destination: {host: httpbin.org}}]
";

#[test]
fn virtual_service_routes_are_applied_in_order_with_their_actions() {
    require_root();
    let topology = Topology::new().unwrap();
    let _nginx = Nginx::start(&topology.internet, &[addr(SERVER_A, 80), addr(SERVER_B, 80)], ECHO).unwrap();
    let _silent = silent_server(&topology, addr(SERVER_B, 8081));
    let config = tempfile::tempdir().unwrap();
    let (slow, down) = (backend("slow", SERVER_B, 8081), backend("down", SERVER_B, 81));
    write_config(config.path(), &[MESH_REGISTRY_ONLY, HTTPBIN, &slow, &down, ROUTES]);
    let args = intercepting(config.path(), "");
    let agent = Agent::start(&topology.gateway, &args).unwrap();
    let get = |path: &str, extra: &[&str]| get(&topology, "httpbin.org", SERVER_A, path, extra);

    assert_eq!(get("/status/418", &[]), (418, "short and stout".to_owned()), "directResponse");

    let (code, headers) = get("/old/x?q=1", &["-D", "-", "-o", "/dev/null"]);
    assert_eq!(code, 301, "{headers}");
    assert!(headers.to_ascii_lowercase().contains("location: http://example.org/new?q=1"), "{headers}");

    let (code, headers_and_body) = get("/api/items", &["-D", "-"]);
    assert_eq!(code, 200, "{headers_and_body}");
    assert!(
        headers_and_body.contains(&format!("{SERVER_A} host=httpbin.org uri=/v2/items added=yes")),
        "{headers_and_body}"
    );
    let lower = headers_and_body.to_ascii_lowercase();
    assert!(lower.contains("x-route: api"), "response headers are set: {headers_and_body}");
    assert!(lower.contains("x-envoy-upstream-service-time: "), "{headers_and_body}");

    let (code, body) = get("/anything", &["-H", "x-canary: yes"]);
    assert_eq!(code, 200);
    assert!(body.starts_with(&format!("{SERVER_B} host=httpbin.org uri=/anything")), "a header match routes: {body}");

    let (code, body) = get("/anything", &["-X", "POST"]);
    assert_eq!(code, 404, "no route matches a POST: Envoy's NR: {body}");

    assert_eq!(get("/slow", &[]).0, 504, "the route's timeout: UT");
    assert_eq!(get("/down", &[]).0, 503, "a refused upstream connection, retried as Istio's default retries: UF,URX");
    assert_eq!(get("/unregistered", &[]).0, 502, "a destination no ServiceEntry registers: BlackHoleCluster");

    // One connection, kept alive, for all the requests of the weighted split.
    let url = "http://httpbin.org/split";
    let resolve = format!("httpbin.org:80:{SERVER_A}");
    let mut args = vec!["--resolve", resolve.as_str(), "-w", "\n"];
    args.extend(std::iter::repeat_n(url, 200));
    let output = curl(&topology.workload, &args).unwrap();
    let to_a = output.lines().filter(|l| l.starts_with(&format!("{SERVER_A} "))).count();
    let to_b = output.lines().filter(|l| l.starts_with(&format!("{SERVER_B} "))).count();
    assert_eq!(to_a + to_b, 200, "{output}");
    // 50/50 over 200 requests: outside 60..=140 has a probability below 1e-8.
    assert!((60..=140).contains(&to_a), "weights 50/50 gave {to_a} to A and {to_b} to B");

    let metrics = agent.metrics().unwrap();
    let flags = |code: &str, flag: &str| {
        total(&metrics, "istio_requests_total", &[("response_code", code), ("response_flags", flag)])
    };
    assert_eq!(flags("404", "NR"), 1, "{metrics}");
    assert_eq!(flags("504", "UT"), 1, "{metrics}");
    assert_eq!(flags("503", "UF,URX"), 1, "{metrics}");
    wait_for_log(&agent, "\"GET /slow HTTP/1.1\" 504 UT ");
    wait_for_log(&agent, "\"GET /down HTTP/1.1\" 503 UF,URX ");
    let log = agent.log();
    assert!(log.contains("\"GET /slow HTTP/1.1\" 504 UT "), "{log}");
    assert!(log.contains("\"GET /down HTTP/1.1\" 503 UF,URX "), "{log}");
}

#[test]
fn the_seeds_two_hop_egress_works_through_the_gateway_port_and_from_intercepted_traffic() {
    require_root();
    let topology = Topology::new().unwrap();
    let _nginx = Nginx::start(&topology.internet, &[addr(SERVER_A, 80), addr(SERVER_B, 80)], ECHO).unwrap();
    let _dns = Dnsmasq::start(&topology.internet, INTERNET_ADDR, &[("httpbin.org", SERVER_A)]).unwrap();
    let config = tempfile::tempdir().unwrap();
    let seed = istio::seed("create-egress-gateway");
    write_config(config.path(), &[MESH_REGISTRY_ONLY, &seed]);
    let args = format!(
        "--intercept {GATEWAY_WORKLOAD_IFACE} --access-log-format text --config {} --dns-server {INTERNET_ADDR} \
         --allow-cidr {GATEWAY_WORKLOAD_ADDR}/32 --gateway-labels gateway-name=egress-demo,gateway-type=egress \
         --gateway-service egress-demo.smm-demo.svc.cluster.local",
        config.path().display()
    );
    let agent = Agent::start(&topology.gateway, &args).unwrap();
    wait_for_log(&agent, "gateway listener open");

    // What a sidecar sends to the egress gateway's Service: the gateway's own address, port 80.
    let gateway_url = format!("http://{GATEWAY_WORKLOAD_ADDR}/headers");
    let body = curl(&topology.workload, &["-H", "Host: httpbin.org", &gateway_url]).unwrap();
    assert!(body.starts_with(&format!("{SERVER_A} host=httpbin.org uri=/headers")), "{body}\n{}", agent.log());
    assert!(
        body.contains(&format!("xff={WORKLOAD_ADDR} ")),
        "a Gateway port adds the client to x-forwarded-for: {body}"
    );
    let (code, _) = get(&topology, "example.com", GATEWAY_WORKLOAD_ADDR, "/", &[]);
    assert_eq!(code, 404, "no VirtualService bound to the Gateway serves example.com: NR");
    // The port speaks the HTTP its client starts with: HTTP/2 with prior knowledge as well; bytes that are no
    // HTTP get HTTP/1.1's 400.
    let h2 = ["--http2-prior-knowledge", "-o", "/dev/null", "-w", "%{http_code} %{http_version}"];
    let answer = curl(&topology.workload, &[&h2[..], &["-H", "Host: httpbin.org", &gateway_url]].concat()).unwrap();
    assert_eq!(answer, "200 2", "{}", agent.log());
    let (answer, _) = raw_exchange(&topology, addr(GATEWAY_WORKLOAD_ADDR, 80), b"HELLO\r\n\r\n");
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer:?}");

    // A workload that addresses httpbin.org itself: mesh → egress-demo → httpbin.org, which is reached at the
    // address its name resolves to.
    let (code, body) = get(&topology, "httpbin.org", SERVER_A, "/get", &[]);
    assert_eq!(code, 200, "{body}\n{}", agent.log());
    assert!(body.starts_with(&format!("{SERVER_A} host=httpbin.org uri=/get")), "{body}");
    // Domain fronting: httpbin.org's Host sent to another address is refused (--host-verify strict).
    let (code, _) = get(&topology, "httpbin.org", SERVER_B, "/get", &[]);
    assert_eq!(code, 421);
    let (code, _) = get(&topology, "edition.cnn.com", SERVER_B, "/", &[]);
    assert_eq!(code, 502, "unregistered under REGISTRY_ONLY");

    let metrics = agent.metrics().unwrap();
    let served = [("destination_service", "httpbin.org"), ("destination_service_namespace", "smm-demo")];
    assert_eq!(total(&metrics, "istio_requests_total", &served), 3, "{metrics}");
    assert_eq!(total(&metrics, "sluice_host_mismatch_total", &[("action", "refused")]), 1, "{metrics}");
}

#[test]
fn host_verify_route_sends_a_fronted_request_to_the_hosts_own_address() {
    require_root();
    let topology = Topology::new().unwrap();
    let _nginx = Nginx::start(&topology.internet, &[addr(SERVER_A, 80), addr(SERVER_B, 80)], ECHO).unwrap();
    let config = tempfile::tempdir().unwrap();
    write_config(config.path(), &[MESH_REGISTRY_ONLY, HTTPBIN]);
    let args = intercepting(config.path(), "--host-verify route");
    let agent = Agent::start(&topology.gateway, &args).unwrap();
    let (code, body) = get(&topology, "httpbin.org", SERVER_B, "/get", &[]);
    assert_eq!(code, 200, "{body}");
    assert!(body.starts_with(&format!("{SERVER_A} host=httpbin.org")), "sent to the registered address: {body}");
    let metrics = agent.metrics().unwrap();
    assert_eq!(total(&metrics, "sluice_host_mismatch_total", &[("action", "routed")]), 1, "{metrics}");
}

fn wait_for_log(agent: &Agent, text: &str) {
    agent.wait_for_log(text, 1).unwrap();
}

const RESILIENCE: &str = "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: httpbin, namespace: egress}
spec:
  hosts: [httpbin.org]
  http:
  - match: [{uri: {exact: /retry-connect}}]
    route: [{destination: {host: flaky.backend}}]
  - match: [{uri: {exact: /no-retry}}]
    retries: {attempts: 0}
    route: [{destination: {host: flaky.backend}}]
  - match: [{uri: {exact: /closed}}]
    route: [{destination: {host: closing.backend}}]
  - match: [{uri: {exact: /retry-status}}]
    retries: {attempts: 2, retryOn: 5xx}
    route: [{destination: {host: scripted.backend}}]
  - match: [{uri: {exact: /retries-spent}}]
    retries: {attempts: 1, retryOn: 5xx}
    route: [{destination: {host: spent.backend}}]
  - match: [{uri: {exact: /abort}}]
    fault: {abort: {httpStatus: 503, percentage: {value: 100}}}
    route: [{destination: {host: httpbin.org}}]
  - match: [{uri: {exact: /delay}}]
    fault: {delay: {fixedDelay: 0.3s, percentage: {value: 100}}}
    route: [{destination: {host: httpbin.org}}]
  - match: [{uri: {exact: /mirror}}]
    mirror: {host: shadow.backend}
    route: [{destination: {host: httpbin.org}}]
  - match: [{uri: {prefix: /cors}}]
    corsPolicy:
      allowOrigins: [{exact: 'https://app.example'}]
      allowMethods: [GET, POST]
      maxAge: 1m
    route: [{destination: {host: httpbin.org}}]
";

#[test]
fn retries_faults_mirrors_and_cors_behave_as_envoys() {
    require_root();
    let topology = Topology::new().unwrap();
    let _nginx = Nginx::start(&topology.internet, &[addr(SERVER_A, 80)], ECHO).unwrap();
    let scripted = ScriptedServer::start(&topology.internet, addr(SERVER_B, 8082), &[503]).unwrap();
    let shadow = ScriptedServer::start(&topology.internet, addr(SERVER_B, 8083), &[]).unwrap();
    let closing = ScriptedServer::start(&topology.internet, addr(SERVER_B, 8084), &[0]).unwrap();
    let _spent = ScriptedServer::start(&topology.internet, addr(SERVER_B, 8086), &[503, 503]).unwrap();
    let config = tempfile::tempdir().unwrap();
    let (scripted_entry, shadow_entry) = (backend("scripted", SERVER_B, 8082), backend("shadow", SERVER_B, 8083));
    let (closing_entry, spent_entry) = (backend("closing", SERVER_B, 8084), backend("spent", SERVER_B, 8086));
    write_config(
        config.path(),
        &[MESH_REGISTRY_ONLY, HTTPBIN, FLAKY, &scripted_entry, &shadow_entry, &closing_entry, &spent_entry, RESILIENCE],
    );
    let args = intercepting(config.path(), "");
    let agent = Agent::start(&topology.gateway, &args).unwrap();
    let get = |path: &str, extra: &[&str]| get(&topology, "httpbin.org", SERVER_A, path, extra);

    let (code, body) = get("/retry-connect", &[]);
    assert_eq!(code, 200, "Istio's default retries move past a refused endpoint: {body}\n{}", agent.log());
    assert!(body.starts_with(&format!("{SERVER_A} ")), "{body}");
    assert_eq!(get("/no-retry", &[]).0, 503, "attempts: 0 turns retries off (the next endpoint refuses)");

    // Istio's default retries refused streams, not a connection closed once the request was sent (the upstream
    // may have acted on it), as Envoy's `refused-stream` and `reset` differ.
    let (code, body) = get("/closed", &[]);
    assert_eq!(code, 503, "{body}");
    assert_eq!(closing.heads().len(), 1, "sent once: {:?}", closing.heads());

    let (code, body) = get("/retry-status", &[]);
    assert_eq!((code, body.as_str()), (200, "scripted 200\n"), "a 503 is retried under retryOn: 5xx");
    assert_eq!(scripted.heads().len(), 2, "{:?}", scripted.heads());
    // A 503 to retry on, with no retry left: answered as it came, flagged URX as Envoy flags it.
    assert_eq!(get("/retries-spent", &[]).0, 503);

    assert_eq!(get("/abort", &[]), (503, "fault filter abort".to_owned()));
    assert_eq!(get("/delay", &[]).0, 200);

    assert_eq!(get("/mirror", &[]).0, 200);
    let mut mirrored = Vec::new();
    for _ in 0..100 {
        mirrored = shadow.heads();
        if !mirrored.is_empty() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(mirrored.len(), 1, "{mirrored:?}");
    assert!(mirrored[0].starts_with("GET /mirror HTTP/1.1"), "{mirrored:?}");
    assert!(mirrored[0].to_ascii_lowercase().contains("host: httpbin.org-shadow"), "{mirrored:?}");

    let preflight =
        ["-X", "OPTIONS", "-H", "Origin: https://app.example", "-H", "Access-Control-Request-Method: POST", "-D", "-"];
    let (code, head) = get("/cors", &preflight);
    let head = head.to_ascii_lowercase();
    assert_eq!(code, 200, "{head}");
    assert!(head.contains("access-control-allow-origin: https://app.example"), "{head}");
    assert!(head.contains("access-control-allow-methods: get,post"), "{head}");
    assert!(head.contains("access-control-max-age: 60"), "{head}");
    let (_, head) = get("/cors", &["-H", "Origin: https://app.example", "-D", "-"]);
    assert!(head.to_ascii_lowercase().contains("access-control-allow-origin: https://app.example"), "{head}");
    let (_, head) = get("/cors", &["-H", "Origin: https://evil.example", "-D", "-"]);
    assert!(!head.to_ascii_lowercase().contains("access-control-allow-origin"), "{head}");

    wait_for_log(&agent, "\"GET /no-retry HTTP/1.1\" 503 UF ");
    let log = agent.log();
    assert!(log.contains("\"GET /abort HTTP/1.1\" 503 FI "), "{log}");
    assert!(log.contains("\"GET /retries-spent HTTP/1.1\" 503 URX "), "{log}");
    // Envoy's fields after the flags: bytes received, bytes sent, duration (ms).
    let delayed = log.split("\"GET /delay HTTP/1.1\" 200 DI ").nth(1).expect("the delayed request's line");
    let duration: u64 = delayed.split_whitespace().nth(2).and_then(|d| d.parse().ok()).expect("a duration");
    assert!(duration >= 300, "the 0.3s fault delay was served: {duration} ms\n{log}");
}

/// Sends `bytes` on a new connection from the workload to `dst` and reads until the peer closes (or 5 s pass):
/// what came back, and whether the peer closed.
fn raw_exchange(topology: &Topology, dst: SocketAddr, bytes: &[u8]) -> (String, bool) {
    use std::io::Write;
    topology
        .workload
        .enter(|| {
            let Ok(mut stream) = std::net::TcpStream::connect_timeout(&dst, std::time::Duration::from_secs(2)) else {
                // Reset during the handshake.
                return (String::new(), true);
            };
            let written =
                stream.set_read_timeout(Some(std::time::Duration::from_secs(5))).and_then(|()| stream.write_all(bytes));
            if written.is_err() {
                // Reset before the request was written.
                return (String::new(), true);
            }
            let mut received = Vec::new();
            let mut buf = [0u8; 4096];
            let closed = loop {
                match stream.read(&mut buf) {
                    Ok(0) => break true,
                    Ok(n) => received.extend_from_slice(&buf[..n]),
                    Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset => break true,
                    Err(_) => break false,
                }
            };
            (String::from_utf8_lossy(&received).into_owned(), closed)
        })
        .unwrap()
}

#[test]
fn bad_requests_are_refused_as_envoy_refuses_them_and_slow_or_surplus_clients_are_cut_off() {
    require_root();
    let topology = Topology::new().unwrap();
    let _nginx = Nginx::start(&topology.internet, &[addr(SERVER_A, 80)], ECHO).unwrap();
    let config = tempfile::tempdir().unwrap();
    write_config(config.path(), &[MESH_REGISTRY_ONLY, HTTPBIN]);
    let args = format!(
        "--intercept {GATEWAY_WORKLOAD_IFACE} --access-log-format text --intercept-port 80 --config {} --request-headers-timeout 1s \
         --max-connections 2",
        config.path().display()
    );
    let agent = Agent::start(&topology.gateway, &args).unwrap();
    let server = addr(SERVER_A, 80);

    let big = format!("x-big: {}", "a".repeat(70 * 1024));
    assert_eq!(get(&topology, "httpbin.org", SERVER_A, "/", &["-H", &big]).0, 431, "headers over 60 KiB");
    let long = format!("/?q={}", "a".repeat(20 * 1024));
    assert_eq!(get(&topology, "httpbin.org", SERVER_A, &long, &[]).0, 414, "a URI over 16 KiB");
    // Refused by the proxy (the access log is written apart from the response, so it is waited for).
    wait_for_log(&agent, " HTTP/1.1\" 414 DPE ");
    // (nginx behind takes request lines up to 8 KiB.)
    let long_enough = format!("/?q={}", "a".repeat(6 * 1024));
    assert_eq!(get(&topology, "httpbin.org", SERVER_A, &long_enough, &[]).0, 200, "one under it");
    let (answer, _) = raw_exchange(&topology, server, b"GET / HTTP/1.1\r\nHost: httpbin.org\r\nno colon\r\n\r\n");
    assert!(answer.starts_with("HTTP/1.1 400"), "a malformed header: {answer:?}");
    let (answer, _) = raw_exchange(&topology, server, b"GET / HTTP/1.0\r\n\r\n");
    assert!(answer.starts_with("HTTP/1.0 400") || answer.starts_with("HTTP/1.1 400"), "no Host: {answer:?}");

    let (answer, closed) = raw_exchange(&topology, server, b"GET / HTTP/1.1\r\nHost: httpbin.org\r\n");
    assert!(closed, "a client that never finishes its headers is cut off after 1 s: {answer:?}");

    // Two clients hold the two connections allowed; a third is reset at once.
    let held: Vec<std::net::TcpStream> = (0..2)
        .map(|_| {
            topology
                .workload
                .enter(|| {
                    use std::io::Write;
                    let mut stream = std::net::TcpStream::connect(server).unwrap();
                    stream.write_all(b"GET / HTTP/1.1\r\n").unwrap();
                    stream
                })
                .unwrap()
        })
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(200));
    let (answer, closed) = raw_exchange(&topology, server, b"GET / HTTP/1.1\r\nHost: httpbin.org\r\n\r\n");
    assert!(closed && answer.is_empty(), "over --max-connections: {answer:?}");
    drop(held);
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_eq!(get(&topology, "httpbin.org", SERVER_A, "/", &[]).0, 200, "{}", agent.log());
    let metrics = agent.metrics().unwrap();
    assert!(total(&metrics, "sluice_proxy_connections_refused_total", &[]) >= 1, "{metrics}");
}

#[test]
fn websocket_upgrades_are_passed_through_both_ways() {
    require_root();
    let topology = Topology::new().unwrap();
    let upstream = ScriptedServer::start(&topology.internet, addr(SERVER_B, 80), &[]).unwrap();
    let config = tempfile::tempdir().unwrap();
    let entry = HTTPBIN.replace("httpbin", "ws").replace("203.0.113.10", SERVER_B);
    write_config(config.path(), &[MESH_REGISTRY_ONLY, &entry]);
    let args = intercepting(config.path(), "");
    let agent = Agent::start(&topology.gateway, &args).unwrap();
    let answer = topology
        .workload
        .enter(|| {
            use std::io::Write;
            let mut stream = std::net::TcpStream::connect(upstream.addr()).unwrap();
            stream.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
            let handshake = "GET /chat HTTP/1.1\r\nHost: ws.org\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
                             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
            stream.write_all(handshake.as_bytes()).unwrap();
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).unwrap() == 1 {
                head.push(byte[0]);
            }
            stream.write_all(b"ping across the proxy").unwrap();
            let mut echoed = [0u8; 21];
            stream.read_exact(&mut echoed).unwrap();
            // A transfer: the relay takes the two sockets to splice(2).
            let bulk: Vec<u8> = (0..4u32 << 20).map(|i| (i % 251) as u8).collect();
            let mut writer = stream.try_clone().unwrap();
            let sent = bulk.clone();
            let writing = std::thread::spawn(move || writer.write_all(&sent).unwrap());
            let mut back = vec![0u8; bulk.len()];
            stream.read_exact(&mut back).unwrap();
            writing.join().unwrap();
            assert!(back == bulk, "4 MiB echoed intact");
            (String::from_utf8_lossy(&head).into_owned(), String::from_utf8_lossy(&echoed).into_owned())
        })
        .unwrap();
    assert!(answer.0.starts_with("HTTP/1.1 101"), "{answer:?}\n{}", agent.log());
    assert!(answer.0.to_ascii_lowercase().contains("upgrade: websocket"), "{answer:?}");
    assert_eq!(answer.1, "ping across the proxy");
    let heads = upstream.heads();
    assert!(heads[0].to_ascii_lowercase().contains("upgrade: websocket"), "{heads:?}");
    agent.wait_for_log("upgraded connection ended", 1).unwrap();
    assert!(agent.log().contains("engine: Splice"), "the upgraded sockets were spliced:\n{}", agent.log());
    // Its access-log line is written as it ends, as Envoy's is: the bytes relayed each way (the ping and the
    // transfer, 4,194,325 bytes up and echoed down), not the 101's empty body.
    agent.wait_for_log("\"GET /chat HTTP/1.1\" 101", 1).unwrap();
    let line = agent.log().lines().find(|line| line.contains("\"GET /chat HTTP/1.1\" 101")).unwrap().to_owned();
    assert!(line.contains(" 4194325 4194325 "), "{line}");
}

#[test]
fn the_forward_proxy_port_routes_absolute_requests_and_admits_connect_tunnels_by_host() {
    require_root();
    let topology = Topology::new().unwrap();
    let servers = [addr(SERVER_A, 80), addr(SERVER_A, 443), addr(SERVER_B, 80), addr(SERVER_B, 443)];
    let _nginx = Nginx::start(&topology.internet, &servers, ECHO).unwrap();
    let _dns =
        Dnsmasq::start(&topology.internet, INTERNET_ADDR, &[("httpbin.org", SERVER_A), ("evil.example", SERVER_B)])
            .unwrap();
    let config = tempfile::tempdir().unwrap();
    let entry = HTTPBIN.replace(
        "ports: [{number: 80, name: http, protocol: HTTP}]",
        "ports: [{number: 80, name: http, protocol: HTTP}, {number: 443, name: tls, protocol: TLS}]",
    );
    write_config(config.path(), &[MESH_REGISTRY_ONLY, &entry]);
    let args = format!(
        "--intercept {GATEWAY_WORKLOAD_IFACE} --access-log-format text --config {} --forward-proxy-port 3128 --dns-server {INTERNET_ADDR} \
         --allow-cidr {GATEWAY_WORKLOAD_ADDR}/32",
        config.path().display()
    );
    let agent = Agent::start(&topology.gateway, &args).unwrap();
    let proxy = format!("http://{GATEWAY_WORKLOAD_ADDR}:3128");
    let through = |extra: &[&str], url: &str| {
        let output = topology
            .workload
            .command("curl")
            .args(["-sS", "--max-time", "10", "-x", &proxy, "-w", "\n%{http_code} %{http_connect}"])
            .args(extra)
            .arg(url)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        let (body, codes) = text.rsplit_once('\n').unwrap();
        (codes.to_owned(), body.to_owned())
    };

    let (codes, body) = through(&[], "http://httpbin.org/get");
    assert_eq!(codes, "200 000", "{body}\n{}", agent.log());
    assert!(body.starts_with(&format!("{SERVER_A} host=httpbin.org uri=/get")), "{body}");
    let (codes, _) = through(&[], "http://evil.example/");
    assert_eq!(codes, "502 000", "an unregistered host under REGISTRY_ONLY");

    let (codes, body) = through(&["-p"], "http://httpbin.org:443/tunnelled");
    assert_eq!(codes, "200 200", "CONNECT to a registered host and port: {body}\n{}", agent.log());
    assert!(body.starts_with(&format!("{SERVER_A} host=httpbin.org uri=/tunnelled")), "{body}");
    let (codes, _) = through(&["-p"], "http://evil.example:443/");
    assert!(codes.ends_with(" 502"), "CONNECT to an unregistered host is refused: {codes}");
    let (codes, _) = through(&["-p"], "http://httpbin.org:8443/");
    assert!(codes.ends_with(" 502"), "CONNECT to a port the ServiceEntry does not declare: {codes}");
    let metrics = agent.metrics().unwrap();
    let tunnels = [("destination_service", "httpbin.org"), ("request_protocol", "tcp")];
    assert_eq!(total(&metrics, "istio_tcp_connections_opened_total", &tunnels), 1, "{metrics}");
}

#[test]
fn upstream_connections_leave_from_the_configured_source_address() {
    require_root();
    let topology = Topology::new().unwrap();
    // A second address on the gateway's internet-facing link: the fixed egress IP.
    topology.gateway.ip(&["addr", "add", "10.240.2.3/24", "dev", "gw-net"]).unwrap();
    let _nginx = Nginx::start(&topology.internet, &[addr(SERVER_A, 80)], "from $remote_addr").unwrap();
    let config = tempfile::tempdir().unwrap();
    write_config(config.path(), &[MESH_REGISTRY_ONLY, HTTPBIN]);
    let args = intercepting(config.path(), "--upstream-source-address 10.240.2.3");
    let _agent = Agent::start(&topology.gateway, &args).unwrap();
    let (code, body) = get(&topology, "httpbin.org", SERVER_A, "/", &[]);
    assert_eq!((code, body.trim()), (200, "from 10.240.2.3"));
}

/// An HTTP/1.1 upstream on `addr` that answers every request with a chunked body and a trailer reflecting the
/// request's `te` header (`x-checksum: te=…`).
fn trailers_server(topology: &Topology, addr: SocketAddr) -> TcpListener {
    let listener = topology.internet.enter(|| TcpListener::bind(addr)).unwrap().unwrap();
    let accepting = listener.try_clone().unwrap();
    std::thread::spawn(move || {
        while let Ok((mut stream, _)) = accepting.accept() {
            let head = read_head(&mut stream).to_ascii_lowercase();
            let te = head.lines().find_map(|line| line.strip_prefix("te:")).unwrap_or("").trim().to_owned();
            let response = format!(
                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: x-checksum\r\nconnection: close\r\n\r\n\
                 d\r\nchunked body\n\r\n0\r\nx-checksum: te={te}\r\n\r\n"
            );
            let _ = stream.write_all(response.as_bytes());
        }
    });
    listener
}

#[test]
fn http2_clients_and_http2_upstreams_are_proxied() {
    require_root();
    let topology = Topology::new().unwrap();
    let echo = "$server_addr $server_protocol host=$host uri=$request_uri";
    let _nginx = Nginx::start(&topology.internet, &[addr(SERVER_A, 80)], echo).unwrap();
    let _h2_origin = Nginx::start_h2c(&topology.internet, addr(SERVER_B, 8085), echo).unwrap();
    let config = tempfile::tempdir().unwrap();
    let h2 = "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: h2, namespace: egress}
spec:
  hosts: [h2.backend]
  ports: [{number: 80, name: http2, protocol: HTTP2, targetPort: 8085}]
  resolution: STATIC
  endpoints: [{address: 203.0.113.20}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: httpbin, namespace: egress}
spec:
  hosts: [httpbin.org]
  http:
  - match: [{uri: {prefix: /h2}}]
    route: [{destination: {host: h2.backend}}]
  - match: [{uri: {prefix: /trailers}}]
    route: [{destination: {host: trailers.backend}}]
  - route: [{destination: {host: httpbin.org}}]
";
    let _trailers = trailers_server(&topology, addr(SERVER_B, 8086));
    write_config(config.path(), &[MESH_REGISTRY_ONLY, HTTPBIN, h2, &backend("trailers", SERVER_B, 8086)]);
    let args = intercepting(config.path(), "");
    let agent = Agent::start(&topology.gateway, &args).unwrap();
    let h2_client = ["--http2-prior-knowledge"];

    let (code, body) = get(&topology, "httpbin.org", SERVER_A, "/get", &h2_client);
    assert_eq!(code, 200, "{body}\n{}", agent.log());
    assert!(body.starts_with(&format!("{SERVER_A} HTTP/1.1 host=httpbin.org uri=/get")), "{body}");
    let resolve = format!("httpbin.org:80:{SERVER_A}");
    let version = curl(
        &topology.workload,
        &[
            "--http2-prior-knowledge",
            "-o",
            "/dev/null",
            "-w",
            "%{http_version}",
            "--resolve",
            &resolve,
            "http://httpbin.org/",
        ],
    )
    .unwrap();
    assert_eq!(version, "2", "the client spoke HTTP/2 with the proxy");
    let (code, body) = get(&topology, "httpbin.org", SERVER_A, "/h2/x", &[]);
    assert_eq!(code, 200, "{body}\n{}", agent.log());
    assert!(body.starts_with(&format!("{SERVER_B} HTTP/2.0 host=httpbin.org uri=/h2/x")), "an HTTP2 port: {body}");
    let (code, body) = get(&topology, "httpbin.org", SERVER_A, "/h2/y", &h2_client);
    assert_eq!(code, 200);
    assert!(body.starts_with(&format!("{SERVER_B} HTTP/2.0 host=httpbin.org uri=/h2/y")), "{body}");

    // Trailers (what gRPC's status rides on) come back through, to HTTP/2 and HTTP/1.1 clients alike; `te:
    // trailers` goes upstream, as Envoy lets it.
    let resolve = format!("httpbin.org:80:{SERVER_A}");
    for version in ["--http2-prior-knowledge", "--http1.1"] {
        let args = [version, "-H", "te: trailers", "-D", "-", "--resolve", &resolve, "http://httpbin.org/trailers"];
        let response = curl(&topology.workload, &args).unwrap();
        assert!(response.contains("chunked body") && response.contains("x-checksum: te=trailers"), "{response}");
    }

    // h2load: four clients with 16 streams each in flight, to both kinds of upstream.
    for path in ["/h2/load", "/load"] {
        let url = format!("http://{SERVER_A}{path}");
        let output = topology
            .workload
            .command("h2load")
            .args(["-n", "800", "-c", "4", "-m", "16", "-H", ":authority: httpbin.org", &url])
            .output()
            .unwrap();
        let report = String::from_utf8_lossy(&output.stdout);
        assert!(
            report.contains("800 done, 800 succeeded, 0 failed, 0 errored") && report.contains("status codes: 800 2xx"),
            "{report}\n{}",
            agent.log()
        );
    }
    let metrics = agent.metrics().unwrap();
    let multiplexed = [("destination_service_name", "h2.backend"), ("response_code", "200")];
    assert_eq!(total(&metrics, "istio_requests_total", &multiplexed), 802, "{metrics}");
}

#[test]
fn fields_not_applied_are_warned_of_once_per_resource() {
    require_root();
    let topology = Topology::new().unwrap();
    let config = tempfile::tempdir().unwrap();
    let unserved_gateway = "apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: auto-passthrough, namespace: egress}
spec:
  selector: {istio: egressgateway}
  servers: [{port: {number: 443, name: https, protocol: HTTPS}, hosts: [httpbin.org], tls: {mode: AUTO_PASSTHROUGH}}]
";
    write_config(config.path(), &[HTTPBIN, unserved_gateway]);
    // Reloads with one worker too.
    let args = format!(
        "--intercept {GATEWAY_WORKLOAD_IFACE} --access-log-format text --concurrency 1 --config {}",
        config.path().display()
    );
    let agent = Agent::start(&topology.gateway, &args).unwrap();
    wait_for_log(&agent, "field not applied");
    // A reload of the same resources warns of nothing new.
    write_config(config.path(), &[HTTPBIN, unserved_gateway, &backend("other", SERVER_B, 80)]);
    wait_for_log(&agent, "policy applied");
    let log = agent.log();
    let warnings: Vec<&str> = log.lines().filter(|line| line.contains("field not applied")).collect();
    assert_eq!(warnings.len(), 1, "{log}");
    assert!(
        warnings[0].contains("Gateway egress/auto-passthrough")
            && warnings[0].contains("field=spec.servers[0].tls.mode"),
        "{log}"
    );
}
