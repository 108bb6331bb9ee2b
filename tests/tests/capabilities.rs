//! The agent runs with exactly the capabilities `deploy/base/daemonset.yaml` grants it, not privileged, and without
//! each one it needs it stops at start with one line naming it, before the kernel is touched.

use serde_json::Value;
use sluice_agent::config::sources::yaml;
use sluice_tests::{
    agent::{setpriv, Bpffs},
    http::{get, ECHO},
    istio::{self, HTTPBIN, MESH_REGISTRY_ONLY},
    peers::{curl, send_udp, Nginx, UdpSink},
    require_root,
    topology::{addr, GATEWAY_WORKLOAD_ADDR, GATEWAY_WORKLOAD_IFACE, SERVER_A, SERVER_B},
    Agent, Topology,
};

/// The agent container's securityContext in the DaemonSet.
fn security_context() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/base/daemonset.yaml");
    let mut documents = Vec::new();
    yaml::documents(&std::fs::read_to_string(path).unwrap(), |document| documents.push(document.unwrap()));
    let daemon_set = documents.iter().find(|document| document["kind"] == "DaemonSet").unwrap();
    daemon_set["spec"]["template"]["spec"]["containers"][0]["securityContext"].clone()
}

fn granted() -> Vec<String> {
    let context = security_context();
    assert_eq!(context["privileged"], false, "{context}");
    assert_eq!(context["capabilities"]["drop"], serde_json::json!(["ALL"]), "{context}");
    context["capabilities"]["add"].as_array().unwrap().iter().map(|name| name.as_str().unwrap().to_owned()).collect()
}

const GATEWAY_ON_80: &str = "apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: egress, namespace: istio-system}
spec:
  selector: {istio: egressgateway}
  servers: [{port: {number: 80, name: http, protocol: HTTP}, hosts: ['*']}]
";

#[test]
fn the_daemonsets_capabilities_are_enough_to_enforce_intercept_and_serve_gateway_ports() {
    require_root();
    let topology = Topology::new().unwrap();
    let _nginx = Nginx::start(&topology.internet, &[addr(SERVER_A, 80)], ECHO).unwrap();
    let config = tempfile::tempdir().unwrap();
    istio::write(config.path(), &[MESH_REGISTRY_ONLY, HTTPBIN, GATEWAY_ON_80]).unwrap();
    let capabilities = granted();
    let capabilities: Vec<&str> = capabilities.iter().map(String::as_str).collect();
    let args = format!(
        "--intercept {GATEWAY_WORKLOAD_IFACE} --config {} --allow-cidr {GATEWAY_WORKLOAD_ADDR}/32",
        config.path().display()
    );
    let agent = Agent::start_with_capabilities(&topology.gateway, &capabilities, &args).unwrap();
    // It holds these capabilities and no other (Linux's numbers).
    let bit = |name: &str| match name {
        "NET_BIND_SERVICE" => 10,
        "NET_ADMIN" => 12,
        "PERFMON" => 38,
        "BPF" => 39,
        other => panic!("a capability this test does not know: {other}"),
    };
    let granted: u64 = capabilities.iter().map(|name| 1u64 << bit(name)).sum();
    let status = std::fs::read_to_string(format!("/proc/{}/status", agent.pid())).unwrap();
    assert!(status.contains(&format!("CapEff:\t{granted:016x}\n")), "CapEff is not {granted:016x}:\n{status}");

    assert_eq!(get(&topology, "httpbin.org", SERVER_A, "/", &[]).0, 200, "intercepted and proxied:\n{}", agent.log());
    let sink = UdpSink::bind(&topology.internet, addr(SERVER_B, 6000)).unwrap();
    send_udp(&topology.workload, addr(SERVER_B, 6000), 3, 100).unwrap();
    assert_eq!(sink.drain(), 0, "blackholed in the kernel");
    // The Gateway's port 80 is open: a Host no VirtualService bound to it serves gets Envoy's 404.
    let url = format!("http://{GATEWAY_WORKLOAD_ADDR}/");
    let code =
        curl(&topology.workload, &["-o", "/dev/null", "-w", "%{http_code}", "-H", "Host: nowhere.example", &url]);
    assert_eq!(code.unwrap(), "404", "{}", agent.log());
    assert!(!agent.log().contains("ERROR"), "{}", agent.log());
}

#[test]
fn without_each_capability_it_needs_the_agent_stops_at_start_naming_it() {
    require_root();
    let topology = Topology::new().unwrap();
    let granted = granted();
    for missing in ["BPF", "PERFMON", "NET_ADMIN"] {
        let kept: Vec<&str> = granted.iter().map(String::as_str).filter(|name| *name != missing).collect();
        let bpffs = Bpffs::mount().unwrap();
        let mut command = topology.gateway.command("setpriv");
        command.args(&setpriv(&kept)[1..]).arg(sluice_tests::agent::binary());
        command.args(["run", "--intercept", GATEWAY_WORKLOAD_IFACE, "--metrics-addr", "127.0.0.1:0", "--bpffs"]);
        command.arg(bpffs.pin_dir());
        let output = command.output().unwrap();
        let text = String::from_utf8_lossy(&output.stderr).into_owned();
        assert!(!output.status.success(), "without CAP_{missing}:\n{text}");
        let errors: Vec<&str> = text.lines().filter(|line| line.contains("ERROR")).collect();
        assert_eq!(errors.len(), 1, "{text}");
        assert!(errors[0].contains(&format!("missing capabilities: CAP_{missing} (")), "{text}");
        assert!(!bpffs.pin_dir().exists(), "nothing was loaded without CAP_{missing}");
    }
}
