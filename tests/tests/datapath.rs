//! The eBPF classifier on real traffic: a workload sends through the gateway namespace, where the agent has
//! attached it, to servers in the internet namespace.

use std::{net::SocketAddr, time::Duration};

use sluice_tests::{
    peers::{http_status, send_udp, Nginx, UdpSink},
    require_root,
    topology::{GATEWAY_WORKLOAD_IFACE, SERVER_A, SERVER_B},
    Agent, Topology,
};

/// Ethernet + IPv4 + UDP headers: what the classifier counts beyond the payload.
const UDP_V4_OVERHEAD: u64 = 14 + 20 + 8;
const PAYLOAD: usize = 100;

fn addr(host: &str, port: u16) -> SocketAddr {
    format!("{host}:{port}").parse().expect("test address")
}

fn series(name: &str, verdict: &str) -> String {
    format!("sluice_datapath_{name}_total{{verdict=\"{verdict}\"}}")
}

const QUICK: Duration = Duration::from_secs(2);

#[test]
fn registry_only_drops_unlisted_destinations_in_the_kernel_and_counts_them() {
    require_root();
    let topology = Topology::new().unwrap();
    let _nginx = Nginx::start(&topology.internet, &[addr(SERVER_A, 80), addr(SERVER_A, 8080)], "server a").unwrap();
    assert_eq!(
        http_status(&topology.workload, &format!("http://{SERVER_A}:8080/"), QUICK),
        Some(200),
        "without the agent, port 8080 is reachable"
    );

    let agent = Agent::start(
        &topology.gateway,
        &[
            "--intercept",
            GATEWAY_WORKLOAD_IFACE,
            "--outbound-traffic-policy",
            "REGISTRY_ONLY",
            "--allow",
            &format!("{SERVER_A}:80/tcp"),
            "--allow",
            &format!("{SERVER_A}:5353/udp"),
        ],
    )
    .unwrap();

    assert_eq!(http_status(&topology.workload, &format!("http://{SERVER_A}/"), QUICK), Some(200), "{}", agent.log());
    assert_eq!(
        http_status(&topology.workload, &format!("http://{SERVER_A}:8080/"), QUICK),
        None,
        "8080 is not allowed"
    );

    let allowed = UdpSink::bind(&topology.internet, addr(SERVER_A, 5353)).unwrap();
    let blocked = UdpSink::bind(&topology.internet, addr(SERVER_A, 6000)).unwrap();
    let before = |name, verdict| agent.sample(&series(name, verdict)).unwrap();
    let (allowed_packets, allowed_bytes) = (before("packets", "allowed"), before("bytes", "allowed"));
    let (blackholed_packets, blackholed_bytes) = (before("packets", "blackholed"), before("bytes", "blackholed"));

    send_udp(&topology.workload, addr(SERVER_A, 5353), 10, PAYLOAD).unwrap();
    send_udp(&topology.workload, addr(SERVER_A, 6000), 7, PAYLOAD).unwrap();
    assert_eq!(allowed.drain(), 10, "every datagram to the allowed port arrives");
    assert_eq!(blocked.drain(), 0, "no datagram to the unlisted port arrives");

    let after = |name, verdict| agent.sample(&series(name, verdict)).unwrap();
    assert_eq!(after("packets", "allowed") - allowed_packets, 10);
    assert_eq!(after("bytes", "allowed") - allowed_bytes, 10 * (UDP_V4_OVERHEAD + PAYLOAD as u64));
    assert_eq!(after("packets", "blackholed") - blackholed_packets, 7);
    assert_eq!(after("bytes", "blackholed") - blackholed_bytes, 7 * (UDP_V4_OVERHEAD + PAYLOAD as u64));

    let (status, log) = agent.stop();
    assert!(status.is_some_and(|s| s.success()), "the agent stops cleanly on SIGTERM:\n{log}");
    assert_eq!(
        http_status(&topology.workload, &format!("http://{SERVER_A}:8080/"), QUICK),
        Some(200),
        "a stopped agent leaves nothing attached"
    );
}

#[test]
fn allow_any_passes_unlisted_destinations_as_passthrough() {
    require_root();
    let topology = Topology::new().unwrap();
    let agent = Agent::start(
        &topology.gateway,
        &["--intercept", GATEWAY_WORKLOAD_IFACE, "--allow", &format!("{SERVER_A}:5353/udp")],
    )
    .unwrap();
    let sink = UdpSink::bind(&topology.internet, addr(SERVER_B, 6000)).unwrap();
    let passthrough = agent.sample(&series("packets", "passthrough")).unwrap();

    send_udp(&topology.workload, addr(SERVER_B, 6000), 5, PAYLOAD).unwrap();

    assert_eq!(sink.drain(), 5);
    assert_eq!(agent.sample(&series("packets", "passthrough")).unwrap() - passthrough, 5);
}

#[test]
fn allow_cidr_admits_every_port_and_protocol_in_the_range() {
    require_root();
    let topology = Topology::new().unwrap();
    let _nginx = Nginx::start(&topology.internet, &[addr(SERVER_B, 8080)], "server b").unwrap();
    let _agent = Agent::start(
        &topology.gateway,
        &[
            "--intercept",
            GATEWAY_WORKLOAD_IFACE,
            "--outbound-traffic-policy",
            "REGISTRY_ONLY",
            "--allow-cidr",
            "203.0.113.16/28",
        ],
    )
    .unwrap();
    let sink = UdpSink::bind(&topology.internet, addr(SERVER_B, 7777)).unwrap();

    send_udp(&topology.workload, addr(SERVER_B, 7777), 3, PAYLOAD).unwrap();

    assert_eq!(sink.drain(), 3);
    assert_eq!(http_status(&topology.workload, &format!("http://{SERVER_B}:8080/"), QUICK), Some(200));
    assert_eq!(http_status(&topology.workload, &format!("http://{SERVER_A}:8080/"), QUICK), None, "outside the range");
}

#[test]
fn an_unknown_interface_is_refused_and_nothing_is_left_attached() {
    require_root();
    let topology = Topology::new().unwrap();
    let sink = UdpSink::bind(&topology.internet, addr(SERVER_A, 6000)).unwrap();

    let (status, output) = Agent::run_to_end(
        &topology.gateway,
        &[
            "run",
            "--intercept",
            GATEWAY_WORKLOAD_IFACE,
            "--intercept",
            "eth-missing",
            "--outbound-traffic-policy",
            "REGISTRY_ONLY",
            "--metrics-addr",
            "127.0.0.1:15090",
        ],
    )
    .unwrap();

    assert!(!status.success(), "{output}");
    assert!(
        output.contains("attaching TC ingress to eth-missing: interface not found (is --intercept right?)"),
        "{output}"
    );
    send_udp(&topology.workload, addr(SERVER_A, 6000), 3, PAYLOAD).unwrap();
    assert_eq!(sink.drain(), 3, "the interface attached before the failure was detached again");
}

#[test]
fn a_metrics_port_in_use_is_refused_before_anything_is_attached() {
    require_root();
    let topology = Topology::new().unwrap();
    let _first = Agent::start(&topology.gateway, &["--intercept", GATEWAY_WORKLOAD_IFACE]).unwrap();
    let sink = UdpSink::bind(&topology.internet, addr(SERVER_A, 6000)).unwrap();

    let (status, output) = Agent::run_to_end(
        &topology.gateway,
        &[
            "run",
            "--intercept",
            GATEWAY_WORKLOAD_IFACE,
            "--outbound-traffic-policy",
            "REGISTRY_ONLY",
            "--metrics-addr",
            sluice_tests::agent::METRICS_ADDR,
        ],
    )
    .unwrap();

    assert!(!status.success(), "{output}");
    assert!(output.contains("binding the metrics listener on 127.0.0.1:15090: Address already in use"), "{output}");
    send_udp(&topology.workload, addr(SERVER_A, 6000), 3, PAYLOAD).unwrap();
    assert_eq!(sink.drain(), 3, "the refused agent blackholed nothing");
}
