//! An operator's mistakes fail closed and loudly: at start, a configuration or interface that cannot be what was
//! meant stops the agent with one line before it touches the kernel; during a run, configuration that disappears
//! leaves the last good policy enforced.

use std::{
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use sluice_tests::{
    agent::Bpffs,
    istio::MESH_REGISTRY_ONLY,
    peers::{send_udp, UdpSink},
    require_root,
    topology::{GATEWAY_WORKLOAD_IFACE, SERVER_A},
    Agent, Topology,
};

fn udp_entry(name: &str, port: u16) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: {name}, namespace: egress}}\n\
         spec: {{hosts: [{name}.example], addresses: ['{SERVER_A}'], ports: [{{number: {port}, name: udp, protocol: UDP}}]}}\n"
    )
}

fn server_a(port: u16) -> SocketAddr {
    format!("{SERVER_A}:{port}").parse().unwrap()
}

/// Runs `sluice run ARGS` to its end with pins on a bpffs of its own: its status, what it printed, and whether it
/// pinned anything (touched the kernel).
fn start_to_end(topology: &Topology, args: &str) -> (std::process::ExitStatus, String, bool) {
    let bpffs = Bpffs::mount().unwrap();
    let args = format!("run {args} --bpffs {} --metrics-addr 127.0.0.1:0", bpffs.pin_dir().display());
    let (status, output) = Agent::run_to_end(&topology.gateway, &args).unwrap();
    (status, output, bpffs.pin_dir().exists())
}

#[test]
fn each_operator_mistake_stops_the_start_with_one_line_before_the_kernel_is_touched() {
    require_root();
    let topology = Topology::new().unwrap();
    let empty = tempfile::tempdir().unwrap();
    std::fs::write(empty.path().join("notes.txt"), "not configuration").unwrap();
    let broken = tempfile::tempdir().unwrap();
    std::fs::write(broken.path().join("entry.yaml"), udp_entry("api", 0)).unwrap();
    let valid = tempfile::tempdir().unwrap();
    std::fs::write(valid.path().join("entry.yaml"), udp_entry("api", 5353)).unwrap();
    let missing = empty.path().join("istio-typo");

    let config = |path: &Path| format!("--intercept {GATEWAY_WORKLOAD_IFACE} --config {}", path.display());
    let cases = [
        (config(&missing), format!("--config {}: no such file or directory", missing.display())),
        (config(empty.path()), format!("--config {}: no Istio resource or mesh config in it", empty.path().display())),
        (config(broken.path()), format!("--config {}: every resource was rejected", broken.path().display())),
        (
            format!("--intercept gw-typo --config {}", valid.path().display()),
            "--intercept gw-typo: no such interface".into(),
        ),
    ];
    for (args, expected) in cases {
        let (status, output, pinned) = start_to_end(&topology, &args);
        assert!(!status.success(), "{args}: the agent must not start:\n{output}");
        let errors: Vec<&str> = output.lines().filter(|line| line.contains("ERROR")).collect();
        assert_eq!(errors.len(), 1, "{args}: one line says what is wrong:\n{output}");
        assert!(errors[0].contains(&expected), "{args}: expected {expected:?} in:\n{output}");
        assert!(errors[0].contains("--allow-empty-config") || errors[0].contains("--wait-for-interfaces"), "{output}");
        assert!(!output.contains("panicked") && !output.contains("datapath attached"), "{args}:\n{output}");
        assert!(!pinned, "{args}: nothing was loaded into the kernel");
    }
    assert!(output_of_check(broken.path()).contains("spec.ports[0].number"), "sluice check names the field");

    // Whoever means it says so.
    let allowed = format!("{} --allow-empty-config", config(&missing));
    let agent = Agent::start(&topology.gateway, &allowed).unwrap();
    assert!(agent.log().contains("no such file or directory"), "and it is still reported:\n{}", agent.log());
}

fn output_of_check(path: &Path) -> String {
    let output = std::process::Command::new(sluice_tests::agent::binary()).arg("check").arg(path).output().unwrap();
    String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr)
}

#[test]
fn a_configuration_directory_that_disappears_keeps_the_last_good_policy_until_it_returns() {
    require_root();
    let topology = Topology::new().unwrap();
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("istio");
    let write = |entry: &str| {
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("mesh.yaml"), MESH_REGISTRY_ONLY).unwrap();
        std::fs::write(dir.join("entry.yaml"), entry).unwrap();
    };
    write(&udp_entry("first", 5353));
    let args = format!("--intercept {GATEWAY_WORKLOAD_IFACE} --config {}", dir.display());
    let agent = Agent::start(&topology.gateway, &args).unwrap();
    let first = UdpSink::bind(&topology.internet, server_a(5353)).unwrap();
    let second = UdpSink::bind(&topology.internet, server_a(6000)).unwrap();
    let send = || {
        send_udp(&topology.workload, server_a(5353), 2, 100).unwrap();
        send_udp(&topology.workload, server_a(6000), 2, 100).unwrap();
        (first.drain(), second.drain())
    };
    assert_eq!(send(), (2, 0), "REGISTRY_ONLY: the ServiceEntry's port alone passes\n{}", agent.log());

    std::fs::remove_dir_all(&dir).unwrap();
    agent.wait_for_log("keeping the last good version", 1).unwrap();
    assert_eq!(send(), (2, 0), "neither the ServiceEntry nor REGISTRY_ONLY is lost");
    let dump: serde_json::Value = serde_json::from_str(&agent.config_dump().unwrap()).unwrap();
    let rejected = dump["rejected"].to_string();
    assert!(rejected.contains(&format!("{}: no such file or directory", dir.display())), "{dump}");
    assert_eq!(dump["resources"][0]["name"], "first", "{dump}");

    write(&udp_entry("second", 6000));
    let settled = |expected| {
        let deadline = Instant::now() + Duration::from_secs(5);
        while send() != expected && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
        }
        send()
    };
    assert_eq!(settled((0, 2)), (0, 2), "the directory made again is read:\n{}", agent.log());
    std::fs::write(dir.join("entry.yaml"), udp_entry("third", 5353)).unwrap();
    assert_eq!(settled((2, 0)), (2, 0), "and watched again:\n{}", agent.log());
}
