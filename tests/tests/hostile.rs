//! A hostile workload behind the gateway: each test plays one attack and asserts it fails — the answer, nothing
//! received at the target, a counter moved.

use std::{
    io::{Read, Write},
    net::SocketAddr,
    time::Duration,
};

use sluice_tests::{
    istio::{self, HTTPBIN, MESH_REGISTRY_ONLY},
    peers::{curl, Dnsmasq, ScriptedServer},
    require_root,
    tls::client_hello,
    topology::{
        addr, GATEWAY_INTERNET_ADDR, GATEWAY_WORKLOAD_ADDR, GATEWAY_WORKLOAD_IFACE, INTERNET_ADDR, SERVER_A, SERVER_B,
    },
    Agent, Topology,
};

/// The cloud metadata service's address, which a gateway node can reach and its workloads must not through it.
const METADATA: &str = "169.254.169.254";
const REFUSED: &str = "sluice_local_destinations_refused_total";

/// A metadata service in the internet namespace, routed from the gateway as a node's would be.
fn metadata_service(topology: &Topology) -> ScriptedServer {
    topology.internet.ip(&["addr", "add", &format!("{METADATA}/32"), "dev", "lo"]).unwrap();
    topology.gateway.ip(&["route", "add", &format!("{METADATA}/32"), "via", INTERNET_ADDR]).unwrap();
    ScriptedServer::start(&topology.internet, addr(METADATA, 80), &[]).unwrap()
}

/// `curl ARGS…` from the workload: the HTTP status it printed last.
fn status(topology: &Topology, args: &[&str]) -> String {
    let mut all = vec!["-sS", "--max-time", "5", "-o", "/dev/null", "-w", "%{http_code} %{http_connect}"];
    all.extend_from_slice(args);
    curl(&topology.workload, &all).unwrap_or_else(|error| error.to_string())
}

#[test]
fn passthrough_never_fetches_the_metadata_service_for_a_workload() {
    require_root();
    let topology = Topology::new().unwrap();
    let metadata = metadata_service(&topology);
    let args = format!("--intercept {GATEWAY_WORKLOAD_IFACE} --intercept-port 80 --outbound-traffic-policy ALLOW_ANY");
    let agent = Agent::start(&topology.gateway, &args).unwrap();

    let answer = status(&topology, &[&format!("http://{METADATA}/latest/meta-data/iam/security-credentials/")]);
    assert_eq!(answer, "403 000", "{}", agent.log());

    let mut stream = topology
        .workload
        .enter(|| std::net::TcpStream::connect_timeout(&addr(METADATA, 80), Duration::from_secs(2)))
        .unwrap()
        .unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    stream.write_all(b"SSH-2.0-not http, relayed as opaque TCP\r\n").unwrap();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    assert!(answer.is_empty(), "opaque TCP to the node itself is reset: {answer:?}");
    // TLS naming an unregistered host is passed through under ALLOW_ANY, to its original destination: not this.
    let mut tls = topology
        .workload
        .enter(|| std::net::TcpStream::connect_timeout(&addr(METADATA, 80), Duration::from_secs(2)))
        .unwrap()
        .unwrap();
    tls.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    tls.write_all(&client_hello("metadata.google.internal")).unwrap();
    let mut answer = Vec::new();
    let _ = tls.read_to_end(&mut answer);
    assert!(answer.is_empty(), "TLS to the node itself is reset: {answer:?}");

    std::thread::sleep(Duration::from_millis(200));
    assert!(metadata.heads().is_empty(), "nothing reached the metadata service: {:?}", metadata.heads());
    assert_eq!(agent.sample(REFUSED).unwrap(), 3, "{}", agent.metrics().unwrap());
    assert!(agent.log().contains("verdict=\"local_destination\""), "{}", agent.log());
}

#[test]
fn the_forward_proxy_never_reaches_the_agents_own_ports_or_itself() {
    require_root();
    let topology = Topology::new().unwrap();
    let args = format!(
        "--intercept {GATEWAY_WORKLOAD_IFACE} --forward-proxy-port 3128 --outbound-traffic-policy ALLOW_ANY \
         --allow-cidr {GATEWAY_WORKLOAD_ADDR}/32"
    );
    let agent = Agent::start(&topology.gateway, &args).unwrap();
    let proxy = format!("http://{GATEWAY_WORKLOAD_ADDR}:3128");

    let admin = status(&topology, &["-x", &proxy, "http://127.0.0.1:15000/config_dump"]);
    assert_eq!(admin, "403 000", "the admin port on loopback: {}", agent.log());
    let tunnel = status(&topology, &["-x", &proxy, "-p", "http://127.0.0.1:15000/config_dump"]);
    assert!(tunnel.contains("CONNECT tunnel failed, response 403"), "a CONNECT tunnel to loopback: {tunnel}");
    let itself = status(&topology, &["-x", &proxy, &format!("http://{GATEWAY_INTERNET_ADDR}:3128/")]);
    assert_eq!(itself, "403 000", "the proxy's own port on another of the node's addresses");
    let metrics = status(&topology, &["-x", &proxy, &format!("http://{GATEWAY_WORKLOAD_ADDR}:15090/stats/prometheus")]);
    assert_eq!(metrics, "403 000", "the metrics port on the node's address");

    assert_eq!(agent.sample(REFUSED).unwrap(), 4, "{}", agent.metrics().unwrap());
}

#[test]
fn a_range_named_by_the_operator_is_reached_all_the_same() {
    require_root();
    let topology = Topology::new().unwrap();
    let metadata = metadata_service(&topology);
    let args = format!(
        "--intercept {GATEWAY_WORKLOAD_IFACE} --intercept-port 80 --outbound-traffic-policy ALLOW_ANY \
         --allow-local-destination {METADATA}/32"
    );
    let agent = Agent::start(&topology.gateway, &args).unwrap();

    let answer = status(&topology, &[&format!("http://{METADATA}/latest/meta-data/")]);

    assert_eq!(answer, "200 000", "{}", agent.log());
    assert_eq!(metadata.heads().len(), 1);
    assert_eq!(agent.sample(REFUSED).unwrap(), 0);
}

/// Sends `request` from the workload to `to` and reads the answer until the upstream or the proxy closes.
fn exchange(topology: &Topology, to: SocketAddr, request: &str) -> String {
    topology
        .workload
        .enter(|| {
            let mut stream = std::net::TcpStream::connect_timeout(&to, Duration::from_secs(2)).unwrap();
            // The proxy keeps the connection open after its answer: what came within a second is the answer.
            stream.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
            stream.write_all(request.as_bytes()).unwrap();
            let mut answer = Vec::new();
            let _ = stream.read_to_end(&mut answer);
            String::from_utf8_lossy(&answer).into_owned()
        })
        .unwrap()
}

#[test]
fn only_websocket_upgrades_are_forwarded_and_h2c_is_served_as_http1() {
    require_root();
    let topology = Topology::new().unwrap();
    let origin = ScriptedServer::start(&topology.internet, addr(SERVER_A, 80), &[]).unwrap();
    let args = format!("--intercept {GATEWAY_WORKLOAD_IFACE} --intercept-port 80 --outbound-traffic-policy ALLOW_ANY");
    let agent = Agent::start(&topology.gateway, &args).unwrap();

    let h2c = exchange(
        &topology,
        addr(SERVER_A, 80),
        "GET /smuggle HTTP/1.1\r\nHost: origin.example\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n\
         HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
    );
    assert!(h2c.starts_with("HTTP/1.1 200"), "the request is served as HTTP/1.1: {h2c}\n{}", agent.log());
    let heads = origin.heads();
    assert_eq!(heads.len(), 1, "{heads:?}");
    let head = heads[0].to_ascii_lowercase();
    assert!(!head.contains("upgrade") && !head.contains("http2-settings"), "no upgrade reached the origin: {head}");

    let other = exchange(
        &topology,
        addr(SERVER_A, 80),
        "GET /tunnel HTTP/1.1\r\nHost: origin.example\r\nConnection: Upgrade\r\nUpgrade: x-custom-tunnel\r\n\r\n",
    );
    assert!(other.starts_with("HTTP/1.1 403"), "an upgrade not allowed is refused: {other}");
    assert_eq!(origin.heads().len(), 1, "nothing more reached the origin");

    let websocket = exchange(
        &topology,
        addr(SERVER_A, 80),
        "GET /chat HTTP/1.1\r\nHost: origin.example\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    );
    assert!(websocket.starts_with("HTTP/1.1 101"), "websocket is forwarded: {websocket}");
}

/// httpbin.org's routes: `/admin` is closed by a direct response, everything else goes to the origin.
const ADMIN_CLOSED: &str = "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: httpbin, namespace: egress}
spec:
  hosts: [httpbin.org]
  http:
  - match: [{uri: {prefix: /admin}}]
    directResponse: {status: 403, body: {string: closed}}
  - route: [{destination: {host: httpbin.org}}]
";

#[test]
fn paths_that_dress_up_a_closed_route_are_normalized_before_matching() {
    require_root();
    let topology = Topology::new().unwrap();
    let origin = ScriptedServer::start(&topology.internet, addr(SERVER_A, 80), &[]).unwrap();
    let config = tempfile::tempdir().unwrap();
    let mesh = format!("{MESH_REGISTRY_ONLY}    pathNormalization: {{normalization: MERGE_SLASHES}}\n");
    istio::write(config.path(), &[&mesh, HTTPBIN, ADMIN_CLOSED]).unwrap();
    let args = format!("--intercept {GATEWAY_WORKLOAD_IFACE} --intercept-port 80 --config {}", config.path().display());
    let agent = Agent::start(&topology.gateway, &args).unwrap();
    let url = |path: &str| format!("http://httpbin.org{path}");
    let resolve = format!("httpbin.org:80:{SERVER_A}");
    let get = |path: &str| status(&topology, &["--path-as-is", "--resolve", &resolve, &url(path)]);

    for dressed in ["/admin", "/public/../admin", "/./admin", "/%61dmin/users", "//admin", "/public/%2e%2e/admin"] {
        assert_eq!(get(dressed), "403 000", "{dressed}\n{}", agent.log());
    }
    assert!(origin.heads().is_empty(), "nothing reached the origin: {:?}", origin.heads());

    assert_eq!(get("/public/./page"), "200 000");
    assert_eq!(get("/bad%zzescape"), "400 000", "a broken escape is refused");
    let heads = origin.heads();
    assert_eq!(heads.len(), 1, "{heads:?}");
    assert!(heads[0].starts_with("GET /public/page HTTP/1.1"), "forwarded as normalized: {}", heads[0]);
}

/// Opens a connection from the workload to `to` and sends `bytes`, leaving it open.
fn open_and_send(topology: &Topology, to: SocketAddr, bytes: &[u8]) -> std::net::TcpStream {
    topology
        .workload
        .enter(|| {
            let mut stream = std::net::TcpStream::connect_timeout(&to, Duration::from_secs(2)).unwrap();
            stream.write_all(bytes).unwrap();
            stream
        })
        .unwrap()
}

/// Whether the proxy has closed `stream` (what it sent before closing, if anything, is read and dropped).
fn closed_by_the_proxy(stream: &mut std::net::TcpStream) -> bool {
    stream.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let mut buf = [0u8; 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(error) => return error.kind() == std::io::ErrorKind::ConnectionReset,
        }
    }
}

#[test]
fn preface_only_http2_and_half_sent_bodies_release_their_connection_places() {
    require_root();
    let topology = Topology::new().unwrap();
    let _origin = ScriptedServer::start(&topology.internet, addr(SERVER_A, 80), &[]).unwrap();
    let args = format!(
        "--intercept {GATEWAY_WORKLOAD_IFACE} --intercept-port 80 --outbound-traffic-policy ALLOW_ANY \
         --max-connections 4 --request-headers-timeout 3s --stream-idle-timeout 3s"
    );
    let agent = Agent::start(&topology.gateway, &args).unwrap();
    let origin = addr(SERVER_A, 80);
    let request = |path: &str| status(&topology, &[&format!("http://{SERVER_A}{path}")]);
    assert_eq!(request("/before"), "200 000");

    // Two HTTP/2 connections that send the preface and their settings, then nothing; two HTTP/1.1 requests that
    // promise a body and send a tenth of it.
    let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";
    let half_body = b"POST /upload HTTP/1.1\r\nHost: origin.example\r\nContent-Length: 1000\r\n\r\n0123456789";
    let mut flood: Vec<_> = (0..2)
        .map(|_| open_and_send(&topology, origin, preface))
        .chain((0..2).map(|_| open_and_send(&topology, origin, half_body)))
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let held = request("/while-held");
    assert!(!held.starts_with("200"), "every place is held: a fifth client is reset: {held}");
    assert!(agent.sample("sluice_proxy_connections_refused_total").unwrap() >= 1);

    // The timeouts are long enough that the places are still held while the fifth client tries, on a loaded
    // machine too; then they lapse.
    std::thread::sleep(Duration::from_secs(4));
    for (i, stream) in flood.iter_mut().enumerate() {
        assert!(closed_by_the_proxy(stream), "flood connection {i} was closed");
    }
    assert_eq!(request("/after"), "200 000", "the places were released:\n{}", agent.log());
    let metrics = agent.metrics().unwrap();
    assert!(metrics.contains("response_code=\"408\""), "half-sent bodies time out as Envoy's do (408 SI):\n{metrics}");
}

#[test]
fn a_random_host_flood_cannot_grow_the_metrics_past_the_series_cap() {
    require_root();
    let topology = Topology::new().unwrap();
    let _origin = ScriptedServer::start(&topology.internet, addr(SERVER_A, 80), &[]).unwrap();
    let args = format!(
        "--intercept {GATEWAY_WORKLOAD_IFACE} --intercept-port 80 --outbound-traffic-policy ALLOW_ANY \
         --max-passthrough-series 5"
    );
    let agent = Agent::start(&topology.gateway, &args).unwrap();

    for i in 0..30 {
        let host = format!("Host: random-{i}.example");
        assert_eq!(status(&topology, &["-H", &host, &format!("http://{SERVER_A}/")]), "200 000");
    }

    let metrics = agent.metrics().unwrap();
    let series: Vec<&str> = metrics
        .lines()
        .filter(|line| line.starts_with("istio_requests_total{"))
        .filter(|line| line.contains("destination_service_name=\"PassthroughCluster\""))
        .collect();
    assert_eq!(series.len(), 6, "5 hosts of their own and the rest together:\n{}", series.join("\n"));
    assert!(series
        .iter()
        .any(|line| line.contains("destination_service=\"PassthroughCluster\"") && line.ends_with(" 25")));
    assert_eq!(agent.sample("sluice_passthrough_series_collapsed_total").unwrap(), 25);
}

#[test]
fn the_forward_proxy_never_sends_an_https_url_in_the_clear() {
    require_root();
    let topology = Topology::new().unwrap();
    let origin = ScriptedServer::start(&topology.internet, addr(SERVER_A, 80), &[]).unwrap();
    let args = format!(
        "--intercept {GATEWAY_WORKLOAD_IFACE} --forward-proxy-port 3128 --outbound-traffic-policy ALLOW_ANY \
         --allow-cidr {GATEWAY_WORKLOAD_ADDR}/32"
    );
    let _agent = Agent::start(&topology.gateway, &args).unwrap();

    let answer = exchange(
        &topology,
        addr(GATEWAY_WORKLOAD_ADDR, 3128),
        &format!("GET https://{SERVER_A}/account HTTP/1.1\r\nHost: {SERVER_A}\r\n\r\n"),
    );

    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("tunnelled with CONNECT"), "{answer}");
    assert!(origin.heads().is_empty(), "nothing was sent in the clear: {:?}", origin.heads());
}

#[test]
fn a_gateway_port_says_itself_how_a_request_came_whatever_the_client_claims() {
    require_root();
    let topology = Topology::new().unwrap();
    let origin = ScriptedServer::start(&topology.internet, addr(SERVER_A, 80), &[]).unwrap();
    let _dns = Dnsmasq::start(&topology.internet, INTERNET_ADDR, &[("httpbin.org", SERVER_A)]).unwrap();
    let config = tempfile::tempdir().unwrap();
    let seed = istio::seed("create-egress-gateway");
    istio::write(config.path(), &[MESH_REGISTRY_ONLY, &seed]).unwrap();
    let args = format!(
        "--intercept {GATEWAY_WORKLOAD_IFACE} --config {} --dns-server {INTERNET_ADDR} \
         --allow-cidr {GATEWAY_WORKLOAD_ADDR}/32 --gateway-labels gateway-name=egress-demo,gateway-type=egress",
        config.path().display()
    );
    let agent = Agent::start(&topology.gateway, &args).unwrap();
    agent.wait_for_log("gateway listener open", 1).unwrap();

    let spoofed = [
        "-H",
        "Host: httpbin.org",
        "-H",
        "X-Forwarded-Proto: https",
        "-H",
        "X-Forwarded-For: 198.51.100.1",
        &format!("http://{GATEWAY_WORKLOAD_ADDR}/headers"),
    ];
    assert_eq!(status(&topology, &spoofed), "200 000", "{}", agent.log());

    let heads = origin.heads();
    let head = heads[0].to_ascii_lowercase();
    assert!(head.contains("x-forwarded-proto: http\r\n"), "{head}");
    assert!(head.contains("x-forwarded-for: 198.51.100.1, 10.240.1.2\r\n"), "{head}");
}

/// `*.example.org` registered with resolution NONE and no addresses: the proxy keeps the address the client
/// connected to.
const WILDCARD_NONE: &str = "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: example-org, namespace: egress}
spec:
  hosts: ['*.example.org']
  ports: [{number: 80, name: http, protocol: HTTP}]
  location: MESH_EXTERNAL
  resolution: NONE
";

#[test]
fn a_wildcard_host_cannot_front_for_an_address_it_does_not_resolve_to() {
    require_root();
    let topology = Topology::new().unwrap();
    let real = ScriptedServer::start(&topology.internet, addr(SERVER_A, 80), &[]).unwrap();
    let elsewhere = ScriptedServer::start(&topology.internet, addr(SERVER_B, 80), &[]).unwrap();
    let _dns = Dnsmasq::start(&topology.internet, INTERNET_ADDR, &[("api.example.org", SERVER_A)]).unwrap();
    let config = tempfile::tempdir().unwrap();
    istio::write(config.path(), &[MESH_REGISTRY_ONLY, WILDCARD_NONE]).unwrap();
    let args = format!(
        "--intercept {GATEWAY_WORKLOAD_IFACE} --intercept-port 80 --config {} --dns-server {INTERNET_ADDR}",
        config.path().display()
    );
    let agent = Agent::start(&topology.gateway, &args).unwrap();
    let get = |host: &str, address: &str| {
        let resolve = format!("{host}:80:{address}");
        status(&topology, &["--resolve", &resolve, &format!("http://{host}/")])
    };

    assert_eq!(get("api.example.org", SERVER_A), "200 000", "where the name resolves: {}", agent.log());
    assert_eq!(get("api.example.org", SERVER_B), "421 000", "an address the name does not resolve to");
    assert_eq!(get("ghost.example.org", SERVER_B), "421 000", "a name that does not resolve");

    assert_eq!(real.heads().len(), 1);
    assert!(elsewhere.heads().is_empty(), "nothing reached the fronted address: {:?}", elsewhere.heads());
    assert_eq!(agent.sample("sluice_host_mismatch_total{action=\"refused\"}").unwrap(), 2);
}

#[test]
fn an_upstream_that_never_answers_holds_the_request_no_longer_than_the_stream_idle_timeout() {
    require_root();
    let topology = Topology::new().unwrap();
    // Accepts, reads, and says nothing back.
    let silent = topology.internet.enter(|| std::net::TcpListener::bind(addr(SERVER_A, 80))).unwrap().unwrap();
    let holder = std::thread::spawn(move || {
        let (mut stream, _) = silent.accept().unwrap();
        let mut buf = [0u8; 1024];
        let _ = stream.read(&mut buf);
        std::thread::sleep(Duration::from_millis(2500));
    });
    let args = format!(
        "--intercept {GATEWAY_WORKLOAD_IFACE} --intercept-port 80 --outbound-traffic-policy ALLOW_ANY \
         --stream-idle-timeout 1s"
    );
    let agent = Agent::start(&topology.gateway, &args).unwrap();

    let started = std::time::Instant::now();
    let answer = status(&topology, &[&format!("http://{SERVER_A}/hold")]);

    assert_eq!(answer, "504 000", "{}", agent.log());
    assert!(started.elapsed() < Duration::from_secs(4), "answered after {:?}", started.elapsed());
    assert!(agent.metrics().unwrap().contains("response_flags=\"SI\""));
    holder.join().unwrap();
}
