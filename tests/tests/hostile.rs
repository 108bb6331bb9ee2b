//! A hostile workload behind the gateway: each test plays one attack and asserts it fails — the answer, nothing
//! received at the target, a counter moved.

use std::{
    io::{Read, Write},
    net::SocketAddr,
    time::Duration,
};

use sluice_tests::{
    peers::{curl, ScriptedServer},
    require_root,
    topology::{GATEWAY_INTERNET_ADDR, GATEWAY_WORKLOAD_ADDR, GATEWAY_WORKLOAD_IFACE, INTERNET_ADDR},
    Agent, Topology,
};

/// The cloud metadata service's address, which a gateway node can reach and its workloads must not through it.
const METADATA: &str = "169.254.169.254";
const REFUSED: &str = "sluice_local_destinations_refused_total";

fn addr(host: &str, port: u16) -> SocketAddr {
    SocketAddr::new(host.parse().unwrap(), port)
}

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
    stream.write_all(b"\x16\x03\x01 not http, relayed as opaque TCP").unwrap();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    assert!(answer.is_empty(), "opaque TCP to the node itself is reset: {answer:?}");

    std::thread::sleep(Duration::from_millis(200));
    assert!(metadata.heads().is_empty(), "nothing reached the metadata service: {:?}", metadata.heads());
    assert_eq!(agent.sample(REFUSED).unwrap(), 2, "{}", agent.metrics().unwrap());
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
