//! Interfaces come and go under a running gateway (a CNI re-creating its device, a veth re-plumbed, a link
//! flapping) and between two agents' lifetimes: the classifier follows them, and never fails open silently.
//! Each test keeps a live listener at an unregistered destination, so that a packet let through is seen.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use sluice_tests::{
    agent::Bpffs,
    peers::{send_udp, UdpSink},
    require_root,
    topology::{GATEWAY_WORKLOAD_IFACE, SERVER_A},
    Agent, Topology,
};

/// What the agent is given at most to put the classifier back on an interface that appeared.
const ATTACH_WITHIN: Duration = Duration::from_secs(1);

fn unregistered() -> SocketAddr {
    format!("{SERVER_A}:6000").parse().expect("test address")
}

fn registry_only(intercept: &str) -> String {
    format!("--intercept {intercept} --outbound-traffic-policy REGISTRY_ONLY")
}

fn attached(interface: &str) -> String {
    format!("sluice_datapath_attached{{interface=\"{interface}\"}}")
}

fn reattachments(interface: &str, reason: &str) -> String {
    format!("sluice_datapath_reattachments_total{{interface=\"{interface}\",reason=\"{reason}\"}}")
}

/// Sends 3 datagrams to the unregistered destination: how many arrived.
fn leaked(topology: &Topology, sink: &UdpSink) -> usize {
    send_udp(&topology.workload, unregistered(), 3, 64).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    sink.drain()
}

/// Waits up to 5 s for `series` to read `value`; fails with the agent's metrics otherwise.
fn wait_for_sample(agent: &Agent, series: &str, value: u64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while agent.sample(series).unwrap() != value {
        assert!(Instant::now() < deadline, "{series} never read {value}:\n{}", agent.metrics().unwrap());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn an_interface_recreated_while_the_agent_runs_is_blocked_again_within_a_second() {
    require_root();
    let topology = Topology::new().unwrap();
    let sink = UdpSink::bind(&topology.internet, unregistered()).unwrap();
    let agent = Agent::start(&topology.gateway, &registry_only(GATEWAY_WORKLOAD_IFACE)).unwrap();
    assert_eq!(leaked(&topology, &sink), 0, "blackholed before");
    assert_eq!(agent.sample(&attached(GATEWAY_WORKLOAD_IFACE)).unwrap(), 1);

    topology.remove_workload_link().unwrap();
    wait_for_sample(&agent, &attached(GATEWAY_WORKLOAD_IFACE), 0);
    let not_ready = agent.readiness().unwrap_err().to_string();
    assert!(
        not_ready.contains("503") && not_ready.contains("no classifier on gw-wl (no such interface)"),
        "{not_ready}"
    );

    topology.add_workload_link().unwrap();
    std::thread::sleep(ATTACH_WITHIN);

    assert_eq!(leaked(&topology, &sink), 0, "the re-created interface is enforced again");
    assert_eq!(agent.sample(&reattachments(GATEWAY_WORKLOAD_IFACE, "recreated")).unwrap(), 1);
    assert_eq!(agent.sample(&attached(GATEWAY_WORKLOAD_IFACE)).unwrap(), 1);
    assert_eq!(agent.readiness().unwrap(), "ready\n");
    let log = agent.log();
    assert!(log.contains("configured interface without the classifier: not enforced"), "{log}");
    assert!(log.contains("classifier attached again") && log.contains("reason=\"recreated\""), "{log}");
}

#[test]
fn an_interface_recreated_while_no_agent_runs_is_attached_fresh_by_the_next_one() {
    require_root();
    let topology = Topology::new().unwrap();
    let bpffs = Bpffs::mount().unwrap();
    let sink = UdpSink::bind(&topology.internet, unregistered()).unwrap();
    let args = registry_only(GATEWAY_WORKLOAD_IFACE);
    let first = Agent::start_pinned(&topology.gateway, &bpffs, &args).unwrap();
    assert_eq!(leaked(&topology, &sink), 0);
    first.kill();

    topology.remove_workload_link().unwrap();
    topology.add_workload_link().unwrap();
    assert_eq!(leaked(&topology, &sink), 3, "an interface created while no agent runs has no classifier");

    let second = Agent::start_pinned(&topology.gateway, &bpffs, &args).unwrap();
    assert_eq!(leaked(&topology, &sink), 0, "the next agent attaches to it");
    assert_eq!(second.sample(&reattachments(GATEWAY_WORKLOAD_IFACE, "severed")).unwrap(), 1);
    assert_eq!(second.readiness().unwrap(), "ready\n");
    let log = second.kill();
    assert!(log.contains("reason=\"severed\""), "{log}");

    let (status, output) =
        Agent::run_to_end(&topology.gateway, &format!("cleanup --bpffs {}", bpffs.pin_dir().display())).unwrap();
    assert!(status.success(), "{output}");
}

#[test]
fn a_link_taken_down_and_up_keeps_its_classifier() {
    require_root();
    let topology = Topology::new().unwrap();
    let sink = UdpSink::bind(&topology.internet, unregistered()).unwrap();
    let agent = Agent::start(&topology.gateway, &registry_only(GATEWAY_WORKLOAD_IFACE)).unwrap();

    topology.gateway.ip(&["link", "set", "dev", GATEWAY_WORKLOAD_IFACE, "down"]).unwrap();
    topology.gateway.ip(&["link", "set", "dev", GATEWAY_WORKLOAD_IFACE, "mtu", "1400"]).unwrap();
    topology.gateway.ip(&["link", "set", "dev", GATEWAY_WORKLOAD_IFACE, "up"]).unwrap();
    std::thread::sleep(ATTACH_WITHIN);

    assert_eq!(leaked(&topology, &sink), 0);
    assert_eq!(agent.sample(&attached(GATEWAY_WORKLOAD_IFACE)).unwrap(), 1);
    let metrics = agent.metrics().unwrap();
    assert!(!metrics.contains("sluice_datapath_reattachments_total{"), "nothing was re-attached:\n{metrics}");
}

#[test]
fn a_pattern_selects_an_interface_that_appears_after_the_agent_started() {
    require_root();
    let topology = Topology::new().unwrap();
    let sink = UdpSink::bind(&topology.internet, unregistered()).unwrap();
    topology.remove_workload_link().unwrap();
    let agent = Agent::start(&topology.gateway, &registry_only("gw-w*")).unwrap();
    assert_eq!(agent.readiness().unwrap(), "ready\n", "a pattern that selects nothing yet is not a fault");

    topology.add_workload_link().unwrap();
    std::thread::sleep(ATTACH_WITHIN);

    assert_eq!(leaked(&topology, &sink), 0, "the new interface is enforced");
    assert_eq!(agent.sample(&reattachments(GATEWAY_WORKLOAD_IFACE, "appeared")).unwrap(), 1);
    assert_eq!(agent.sample(&attached(GATEWAY_WORKLOAD_IFACE)).unwrap(), 1);
    assert_eq!(agent.sample(&attached("gw-net")).unwrap(), 0, "the pattern does not select the internet side");
    assert!(!agent.metrics().unwrap().contains("interface=\"gw-net\""));
}

#[test]
fn a_named_interface_waited_for_keeps_the_agent_unready_until_it_appears() {
    require_root();
    let topology = Topology::new().unwrap();
    let sink = UdpSink::bind(&topology.internet, unregistered()).unwrap();
    topology.remove_workload_link().unwrap();
    let args = format!("{} --wait-for-interfaces", registry_only(GATEWAY_WORKLOAD_IFACE));
    let agent = Agent::start(&topology.gateway, &args).unwrap();

    let not_ready = agent.readiness().unwrap_err().to_string();
    assert!(not_ready.contains("no classifier on gw-wl (no such interface)"), "{not_ready}");
    assert_eq!(agent.sample(&attached(GATEWAY_WORKLOAD_IFACE)).unwrap(), 0);

    topology.add_workload_link().unwrap();
    std::thread::sleep(ATTACH_WITHIN);

    assert_eq!(leaked(&topology, &sink), 0);
    assert_eq!(agent.readiness().unwrap(), "ready\n");
    assert_eq!(agent.sample(&attached(GATEWAY_WORKLOAD_IFACE)).unwrap(), 1);
}

#[test]
fn policy_routing_removed_by_hand_is_put_back() {
    require_root();
    let topology = Topology::new().unwrap();
    let agent =
        Agent::start(&topology.gateway, &format!("--intercept {GATEWAY_WORKLOAD_IFACE} --intercept-port 80")).unwrap();
    let rules = || {
        let output = topology.gateway.command("ip").args(["-4", "rule", "show"]).output().unwrap();
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    assert!(rules().contains("fwmark 0x200/0xf00 lookup 100"), "{}", rules());

    topology.gateway.ip(&["-4", "rule", "del", "fwmark", "0x200/0xf00", "lookup", "100"]).unwrap();
    std::thread::sleep(ATTACH_WITHIN + Duration::from_millis(500));

    assert!(rules().contains("fwmark 0x200/0xf00 lookup 100"), "{}", rules());
    assert_eq!(agent.sample("sluice_datapath_routing_restored_total").unwrap(), 1);
}

#[test]
fn default_route_selects_the_interface_the_default_route_leaves_through_as_it_changes() {
    require_root();
    let topology = Topology::new().unwrap();
    let sink = UdpSink::bind(&topology.internet, unregistered()).unwrap();
    let agent = Agent::start(&topology.gateway, &registry_only("default-route")).unwrap();
    assert_eq!(leaked(&topology, &sink), 3, "no default route: nothing selected");

    topology.gateway.ip(&["route", "add", "default", "via", "10.240.1.2", "dev", GATEWAY_WORKLOAD_IFACE]).unwrap();
    std::thread::sleep(ATTACH_WITHIN);

    assert_eq!(leaked(&topology, &sink), 0, "the default route's interface is enforced");
    assert_eq!(agent.sample(&reattachments(GATEWAY_WORKLOAD_IFACE, "appeared")).unwrap(), 1);
    assert_eq!(agent.sample(&attached(GATEWAY_WORKLOAD_IFACE)).unwrap(), 1);
    assert!(!agent.metrics().unwrap().contains("interface=\"gw-net\""));
}

#[test]
fn a_renamed_interface_is_followed_by_its_new_name() {
    require_root();
    let topology = Topology::new().unwrap();
    let sink = UdpSink::bind(&topology.internet, unregistered()).unwrap();
    let agent = Agent::start(&topology.gateway, &registry_only("gw-w*")).unwrap();
    assert_eq!(agent.sample(&attached(GATEWAY_WORKLOAD_IFACE)).unwrap(), 1);

    for step in [["down"].as_slice(), &["name", "gw-wz"], &["up"]] {
        let mut args = vec!["link", "set", "dev"];
        args.push(if step[0] == "name" || step[0] == "down" { GATEWAY_WORKLOAD_IFACE } else { "gw-wz" });
        args.extend_from_slice(step);
        topology.gateway.ip(&args).unwrap();
    }
    wait_for_sample(&agent, &attached("gw-wz"), 1);
    std::thread::sleep(Duration::from_millis(1500));

    assert_eq!(leaked(&topology, &sink), 0, "the renamed interface is still enforced");
    let metrics = agent.metrics().unwrap();
    assert!(!metrics.contains(&attached(GATEWAY_WORKLOAD_IFACE)), "the old name's state is forgotten:\n{metrics}");
    assert!(agent.log().contains("interface gone or no longer selected"), "{}", agent.log());
}
