//! The ports the configuration declares HTTP are enforced by name without `--intercept-port`: the proxy takes
//! them, and the set follows the configuration as it is reloaded.

use sluice_tests::{
    http::{get, ECHO},
    istio::{self, HTTPBIN, MESH_REGISTRY_ONLY},
    peers::Nginx,
    require_root,
    topology::{addr, GATEWAY_WORKLOAD_IFACE, SERVER_A},
    Agent, Topology,
};

/// `api.example` registered at server A on port 8080, HTTP.
fn api_on_8080() -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: api, namespace: egress}}\n\
         spec: {{hosts: [api.example], addresses: ['{SERVER_A}'], ports: [{{number: 8080, name: http-alt, protocol: HTTP}}], resolution: NONE}}\n"
    )
}

/// The status of `GET http://HOST:8080/` sent to server A; 0 when no answer comes within 2 s.
fn status_on_8080(topology: &Topology, host: &str) -> u16 {
    let resolve = format!("{host}:8080:{SERVER_A}");
    let url = format!("http://{host}:8080/");
    let output = topology
        .workload
        .command("curl")
        .args(["-s", "--max-time", "2", "--resolve", &resolve, "-o", "/dev/null", "-w", "%{http_code}", &url])
        .output()
        .unwrap();
    String::from_utf8_lossy(&output.stdout).trim().parse().unwrap_or(0)
}

fn intercept_ports(agent: &Agent) -> serde_json::Value {
    let dump: serde_json::Value = serde_json::from_str(&agent.config_dump().unwrap()).unwrap();
    dump["datapath"]["interceptPorts"].clone()
}

#[test]
fn http_ports_of_the_configuration_are_decided_by_host_without_a_flag_and_follow_reloads() {
    require_root();
    let topology = Topology::new().unwrap();
    let _nginx = Nginx::start(&topology.internet, &[addr(SERVER_A, 80), addr(SERVER_A, 8080)], ECHO).unwrap();
    let config = tempfile::tempdir().unwrap();
    istio::write(config.path(), &[MESH_REGISTRY_ONLY, HTTPBIN]).unwrap();
    let args = format!("--intercept {GATEWAY_WORKLOAD_IFACE} --config {}", config.path().display());
    let agent = Agent::start(&topology.gateway, &args).unwrap();

    assert_eq!(intercept_ports(&agent), serde_json::json!([80]), "{}", agent.log());
    assert!(agent.log().contains("intercept_ports=[80]"), "the startup line shows the set:\n{}", agent.log());
    assert_eq!(get(&topology, "httpbin.org", SERVER_A, "/", &[]).0, 200, "{}", agent.log());
    assert_eq!(get(&topology, "other.example", SERVER_A, "/", &[]).0, 502, "by Host, not by the address dialled");
    assert_eq!(status_on_8080(&topology, "api.example"), 0, "8080 is not registered yet: blackholed");

    istio::write(config.path(), &[MESH_REGISTRY_ONLY, HTTPBIN, &api_on_8080()]).unwrap();
    agent.wait_for_log("policy applied", 1).unwrap();

    assert_eq!(intercept_ports(&agent), serde_json::json!([80, 8080]));
    assert_eq!(status_on_8080(&topology, "api.example"), 200, "{}", agent.log());
    assert_eq!(status_on_8080(&topology, "other.example"), 502, "the new port is decided by name too");
    let metrics = agent.metrics().unwrap();
    let served = [("destination_service_name", "api.example"), ("response_code", "200")];
    assert_eq!(sluice_tests::metrics::total(&metrics, "istio_requests_total", &served), 1, "{metrics}");
}
