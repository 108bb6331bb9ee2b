//! The eBPF classifier on real traffic: a workload sends through the gateway namespace, where the agent has
//! attached it, to servers in the internet namespace.

use std::{
    io::ErrorKind,
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use sluice_tests::{
    agent::{sample, Bpffs},
    peers::{http_body, http_status, send_udp, Dnsmasq, Nginx, UdpSink},
    require_root,
    topology::{GATEWAY_WORKLOAD_IFACE, INTERNET_ADDR, SERVER_A, SERVER_A_V6, SERVER_B, WORKLOAD_ADDR},
    Agent, Topology,
};

/// Ethernet + IPv4 + UDP headers: what the classifier counts beyond the payload.
const UDP_V4_OVERHEAD: u64 = 14 + 20 + 8;
const PAYLOAD: usize = 100;
const QUICK: Duration = Duration::from_secs(2);

fn addr(host: &str, port: u16) -> SocketAddr {
    let host = if host.contains(':') { format!("[{host}]") } else { host.to_owned() };
    format!("{host}:{port}").parse().expect("test address")
}

fn series(name: &str, verdict: &str) -> String {
    format!("sluice_datapath_{name}_total{{verdict=\"{verdict}\"}}")
}

fn registry_only(extra: &str) -> String {
    format!("--intercept {GATEWAY_WORKLOAD_IFACE} --outbound-traffic-policy REGISTRY_ONLY {extra}")
}

#[test]
fn registry_only_drops_unlisted_destinations_in_the_kernel_and_counts_them() {
    require_root();
    let topology = Topology::new().unwrap();
    let _nginx = Nginx::start(&topology.internet, &[addr(SERVER_A, 80), addr(SERVER_A, 8080)], "server a").unwrap();
    let url_8080 = format!("http://{SERVER_A}:8080/");
    assert_eq!(http_status(&topology.workload, &url_8080, QUICK), Some(200), "without the agent, 8080 is reachable");

    let agent = Agent::start(
        &topology.gateway,
        &registry_only(&format!("--allow {SERVER_A}:80/tcp --allow {SERVER_A}:5353/udp")),
    )
    .unwrap();

    assert_eq!(http_status(&topology.workload, &format!("http://{SERVER_A}/"), QUICK), Some(200), "{}", agent.log());
    assert_eq!(http_status(&topology.workload, &url_8080, QUICK), None, "8080 is not allowed");

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

    let metrics = agent.metrics().unwrap();
    let destination = format!("sluice_blackholed_packets_total{{destination=\"{SERVER_A}:6000\",protocol=\"udp\"}}");
    assert_eq!(sample(&metrics, &destination), Some(7), "{metrics}");
    // One UDP flow (one source port), reported once through the event ring buffer, and logged.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !agent.log().contains(&format!("dst={SERVER_A}:6000")) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(agent.log().contains(&format!("dst={SERVER_A}:6000")), "{}", agent.log());
    assert!(agent.sample("sluice_blocked_flows_total").unwrap() >= 1);

    let (status, log) = agent.stop();
    assert!(status.is_some_and(|s| s.success()), "the agent stops cleanly on SIGTERM:\n{log}");
    assert_eq!(http_status(&topology.workload, &url_8080, QUICK), Some(200), "cleanup on exit detaches");
}

#[test]
fn istio_configuration_files_decide_what_the_kernel_allows() {
    require_root();
    let topology = Topology::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("mesh.yaml"),
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: istio, namespace: istio-system}\n\
         data:\n  mesh: |\n    outboundTrafficPolicy:\n      mode: REGISTRY_ONLY\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("entries.yaml"),
        format!(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: dns}}\n\
             spec: {{hosts: [dns.example], addresses: ['{SERVER_A}'], ports: [{{number: 5353, name: dns, protocol: UDP}}]}}\n\
             ---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: broken}}\n\
             spec: {{hosts: ['*'], addresses: ['{SERVER_A}'], ports: [{{number: 6000, name: udp, protocol: UDP}}]}}\n\
             ---\napiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {{name: egress, namespace: istio-system}}\n\
             spec: {{selector: {{istio: egressgateway}}, servers: [{{port: {{number: 80, name: http, protocol: HTTP}}, hosts: ['*']}}]}}\n\
             ---\napiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {{name: ingress, namespace: istio-system}}\n\
             spec: {{selector: {{istio: ingressgateway}}, servers: [{{port: {{number: 80, name: http, protocol: HTTP}}, hosts: ['*']}}]}}\n"
        ),
    )
    .unwrap();
    let args = format!("--intercept {GATEWAY_WORKLOAD_IFACE} --config {}", dir.path().display());
    let agent = Agent::start(&topology.gateway, &args).unwrap();
    let allowed = UdpSink::bind(&topology.internet, addr(SERVER_A, 5353)).unwrap();
    let rejected = UdpSink::bind(&topology.internet, addr(SERVER_A, 6000)).unwrap();

    send_udp(&topology.workload, addr(SERVER_A, 5353), 3, PAYLOAD).unwrap();
    send_udp(&topology.workload, addr(SERVER_A, 6000), 3, PAYLOAD).unwrap();

    assert_eq!(allowed.drain(), 3, "the ServiceEntry's address and port pass:\n{}", agent.log());
    assert_eq!(rejected.drain(), 0, "REGISTRY_ONLY from the mesh config; the invalid ServiceEntry is not applied");
    assert!(agent.log().contains("ServiceEntry default/broken: spec.hosts[0]"), "{}", agent.log());
    let dump: serde_json::Value = serde_json::from_str(&agent.config_dump().unwrap()).unwrap();
    let gateways = serde_json::json!([{"id": "istio-system/egress", "ports": [80]}]);
    assert_eq!(dump["gateways"], gateways, "the Gateway selecting istio=egressgateway (the default labels)");
}

fn service_entry(name: &str, host: &str, port: u16) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: {name}}}\n\
         spec: {{hosts: ['{host}'], addresses: ['{SERVER_A}'], ports: [{{number: {port}, name: udp, protocol: UDP}}]}}\n"
    )
}

/// Waits until the agent has logged `text` `count` times.
fn wait_for_log(agent: &Agent, text: &str, count: usize) {
    agent.wait_for_log(text, count).unwrap();
}

#[test]
fn configuration_changes_are_applied_and_a_broken_change_keeps_the_last_good_version() {
    require_root();
    let topology = Topology::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("entries.yaml");
    std::fs::write(&file, service_entry("dns", "dns.example", 5353)).unwrap();
    let args = format!(
        "--intercept {GATEWAY_WORKLOAD_IFACE} --outbound-traffic-policy REGISTRY_ONLY --config {}",
        dir.path().display()
    );
    let agent = Agent::start(&topology.gateway, &args).unwrap();
    let first = UdpSink::bind(&topology.internet, addr(SERVER_A, 5353)).unwrap();
    let second = UdpSink::bind(&topology.internet, addr(SERVER_A, 6000)).unwrap();
    send_udp(&topology.workload, addr(SERVER_A, 5353), 2, PAYLOAD).unwrap();
    assert_eq!(first.drain(), 2);
    assert_eq!(agent.sample("sluice_config_generation").unwrap(), 1);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        agent.sample("sluice_config_generation").unwrap(),
        1,
        "reading the files is no change:\n{}",
        agent.log()
    );

    std::fs::write(&file, service_entry("other", "other.example", 6000)).unwrap();
    wait_for_log(&agent, "policy applied", 1);
    send_udp(&topology.workload, addr(SERVER_A, 5353), 2, PAYLOAD).unwrap();
    send_udp(&topology.workload, addr(SERVER_A, 6000), 2, PAYLOAD).unwrap();
    assert_eq!(first.drain(), 0, "the removed ServiceEntry no longer admits anything");
    assert_eq!(second.drain(), 2, "the new one does");

    std::fs::write(&file, service_entry("other", "*", 6000)).unwrap();
    wait_for_log(&agent, "keeping the last good version", 1);
    send_udp(&topology.workload, addr(SERVER_A, 6000), 2, PAYLOAD).unwrap();
    assert_eq!(second.drain(), 2, "a broken change leaves the last good version in force");
    let rejected = "sluice_config_rejected{kind=\"ServiceEntry\",namespace=\"default\",name=\"other\"}";
    assert_eq!(agent.sample(rejected).unwrap(), 1, "{}", agent.metrics().unwrap());
    assert!(agent.sample("sluice_config_generation").unwrap() >= 3);
    let dump: serde_json::Value = serde_json::from_str(&agent.config_dump().unwrap()).unwrap();
    assert_eq!(dump["datapath"]["rules"], serde_json::json!([format!("{SERVER_A}/32:6000/udp")]), "{dump}");
    assert_eq!(dump["resources"][0]["name"], "other");
    assert!(dump["rejected"][0].as_str().unwrap().contains("ServiceEntry default/other: spec.hosts[0]"), "{dump}");
    assert_eq!(dump["gateways"], serde_json::json!([]), "no Gateway selects the agent");
}

/// db.example, resolved by DNS, on UDP port 5353.
const DB_BY_DNS: &str = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: db}\n\
                         spec: {hosts: [db.example], ports: [{number: 5353, name: udp, protocol: UDP}], resolution: DNS}\n";

/// The agent in REGISTRY_ONLY on the configuration in `dir`, resolving names with the internet's DNS server.
fn start_resolving<'a>(topology: &'a Topology, dir: &std::path::Path) -> Agent<'a> {
    let args = format!(
        "--intercept {GATEWAY_WORKLOAD_IFACE} --outbound-traffic-policy REGISTRY_ONLY --dns-server {INTERNET_ADDR} --config {}",
        dir.display()
    );
    Agent::start(&topology.gateway, &args).unwrap()
}

#[test]
fn a_service_entry_resolved_by_dns_admits_the_addresses_its_host_has_now() {
    require_root();
    let topology = Topology::new().unwrap();
    let dns = Dnsmasq::start(&topology.internet, INTERNET_ADDR, &[("db.example", SERVER_A)]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("db.yaml"), DB_BY_DNS).unwrap();
    let agent = start_resolving(&topology, dir.path());
    let at_a = UdpSink::bind(&topology.internet, addr(SERVER_A, 5353)).unwrap();
    let at_b = UdpSink::bind(&topology.internet, addr(SERVER_B, 5353)).unwrap();

    send_udp(&topology.workload, addr(SERVER_A, 5353), 2, PAYLOAD).unwrap();
    send_udp(&topology.workload, addr(SERVER_B, 5353), 2, PAYLOAD).unwrap();
    assert_eq!(at_a.drain(), 2, "db.example's address passes:\n{}", agent.log());
    assert_eq!(at_b.drain(), 0);

    // The name moves: once the answer's TTL has run out, the kernel follows.
    drop(dns);
    let _dns = Dnsmasq::start(&topology.internet, INTERNET_ADDR, &[("db.example", SERVER_B)]).unwrap();
    wait_for_log(&agent, "policy applied", 1);
    send_udp(&topology.workload, addr(SERVER_A, 5353), 2, PAYLOAD).unwrap();
    send_udp(&topology.workload, addr(SERVER_B, 5353), 2, PAYLOAD).unwrap();
    assert_eq!(at_b.drain(), 2, "the new address passes");
    assert_eq!(at_a.drain(), 0, "the old one no longer does");
}

#[test]
fn names_that_dns_does_not_answer_delay_the_others_by_one_round_of_lookups_at_most() {
    require_root();
    let topology = Topology::new().unwrap();
    // Names under slow.example go to a server that never answers: each lookup of one times out.
    let silent = UdpSink::bind(&topology.internet, addr("127.0.0.1", 5399)).unwrap();
    let _dns = Dnsmasq::start_forwarding(
        &topology.internet,
        INTERNET_ADDR,
        &[("db.example", SERVER_A)],
        &[("slow.example", "127.0.0.1#5399")],
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    // One ServiceEntry a name: several hosts on a UDP port cannot be told apart, and Istio refuses them together.
    let slow_entries: Vec<String> = (0..40)
        .map(|i| {
            let name = DB_BY_DNS.replace("{name: db}", &format!("{{name: slow{i}}}"));
            name.replace("[db.example]", &format!("[n{i}.slow.example]"))
        })
        .collect();
    std::fs::write(dir.path().join("entries.yaml"), format!("{DB_BY_DNS}---\n{}", slow_entries.join("---\n"))).unwrap();
    // The first policy is attached once the names are looked up: 40 lookups of 5 s each, made one after
    // another, would hold it back for 200 s; made together, 5 (the agent is given 20).
    let agent = start_resolving(&topology, dir.path());
    let at_a = UdpSink::bind(&topology.internet, addr(SERVER_A, 5353)).unwrap();
    send_udp(&topology.workload, addr(SERVER_A, 5353), 2, PAYLOAD).unwrap();
    assert_eq!(at_a.drain(), 2, "db.example's address passes:\n{}", agent.log());
    assert!(silent.drain() >= 40, "every slow name was asked for");
    let log = agent.log();
    assert!(log.contains("failed=40"), "the failures are reported once, together:\n{log}");
}

#[test]
fn fragmented_datagrams_to_an_allowed_destination_arrive_whole() {
    require_root();
    let topology = Topology::new().unwrap();
    let _agent = Agent::start(&topology.gateway, &registry_only(&format!("--allow {SERVER_A}:5353/udp"))).unwrap();
    let allowed = UdpSink::bind(&topology.internet, addr(SERVER_A, 5353)).unwrap();
    let blocked = UdpSink::bind(&topology.internet, addr(SERVER_A, 6000)).unwrap();

    // 4000 bytes over a 1500-byte MTU: three fragments each, only the first with ports.
    send_udp(&topology.workload, addr(SERVER_A, 5353), 5, 4000).unwrap();
    send_udp(&topology.workload, addr(SERVER_A, 6000), 5, 4000).unwrap();

    assert_eq!(allowed.drain(), 5, "every fragment of an allowed datagram passes");
    assert_eq!(blocked.drain(), 0);
}

#[test]
fn allow_any_passes_unlisted_destinations_as_passthrough() {
    require_root();
    let topology = Topology::new().unwrap();
    let args = format!("--intercept {GATEWAY_WORKLOAD_IFACE} --allow {SERVER_A}:5353/udp");
    let agent = Agent::start(&topology.gateway, &args).unwrap();
    assert_eq!(agent.readiness().unwrap(), "ready\n", "ready once attached");
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
    let _agent = Agent::start(&topology.gateway, &registry_only("--allow-cidr 203.0.113.16/28")).unwrap();
    let sink = UdpSink::bind(&topology.internet, addr(SERVER_B, 7777)).unwrap();

    send_udp(&topology.workload, addr(SERVER_B, 7777), 3, PAYLOAD).unwrap();

    assert_eq!(sink.drain(), 3);
    assert_eq!(http_status(&topology.workload, &format!("http://{SERVER_B}:8080/"), QUICK), Some(200));
    assert_eq!(http_status(&topology.workload, &format!("http://{SERVER_A}:8080/"), QUICK), None, "outside the range");
}

#[test]
fn ipv6_destinations_are_policed_like_ipv4() {
    require_root();
    let topology = Topology::new().unwrap();
    let _nginx = Nginx::start(&topology.internet, &[addr(SERVER_A_V6, 80), addr(SERVER_A_V6, 8080)], "v6").unwrap();
    let agent = Agent::start(&topology.gateway, &registry_only(&format!("--allow [{SERVER_A_V6}]:80/tcp"))).unwrap();

    let status = http_status(&topology.workload, &format!("http://[{SERVER_A_V6}]/"), QUICK);
    assert_eq!(status, Some(200), "{}\n{}", agent.log(), agent.metrics().unwrap());
    assert_eq!(http_status(&topology.workload, &format!("http://[{SERVER_A_V6}]:8080/"), QUICK), None);
}

#[test]
fn reject_mode_makes_blocked_connections_fail_at_once() {
    require_root();
    let topology = Topology::new().unwrap();
    let _nginx = Nginx::start(&topology.internet, &[addr(SERVER_A, 8080), addr(SERVER_A_V6, 8080)], "a").unwrap();
    let agent = Agent::start(&topology.gateway, &registry_only("--blackhole reject")).unwrap();

    for target in [addr(SERVER_A, 8080), addr(SERVER_A_V6, 8080)] {
        let started = Instant::now();
        let result = topology.workload.enter(|| TcpStream::connect_timeout(&target, Duration::from_secs(3))).unwrap();
        let error = result.expect_err("a blocked connect fails");
        assert_eq!(error.kind(), ErrorKind::ConnectionRefused, "{target}: {error}");
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "{target}: took {:?}\n{}",
            started.elapsed(),
            agent.metrics().unwrap()
        );
    }

    // UDP gets ICMP administratively prohibited, which a connected socket reports: as EHOSTUNREACH for ICMP
    // (type 3 code 13), as EACCES for ICMPv6 (type 1 code 1).
    for (target, errno) in
        [(addr(SERVER_A, 6000), nix::libc::EHOSTUNREACH), (addr(SERVER_A_V6, 6000), nix::libc::EACCES)]
    {
        let bind = if target.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
        let socket = topology.workload.enter(|| std::net::UdpSocket::bind(bind)).unwrap().unwrap();
        socket.connect(target).unwrap();
        socket.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        socket.send(b"ping").unwrap();
        let error = socket.recv(&mut [0u8; 64]).expect_err("the answer is an ICMP error");
        assert_eq!(error.raw_os_error(), Some(errno), "{target}: {error}");
    }
}

#[test]
fn intercepted_connections_reach_the_proxy_with_their_original_destination() {
    require_root();
    let topology = Topology::new().unwrap();
    let servers = [addr(SERVER_A, 80), addr(SERVER_A, 8080), addr(SERVER_A_V6, 80)];
    let _nginx = Nginx::start(&topology.internet, &servers, "saw $remote_addr").unwrap();
    let args = format!("--intercept {GATEWAY_WORKLOAD_IFACE} --intercept-port 80");
    let agent = Agent::start(&topology.gateway, &args).unwrap();

    let proxied = http_body(&topology.workload, &format!("http://{SERVER_A}/"), QUICK).unwrap();
    assert_eq!(proxied.trim(), "saw 10.240.2.1", "the server sees the gateway's proxy:\n{}", agent.log());
    let direct = http_body(&topology.workload, &format!("http://{SERVER_A}:8080/"), QUICK).unwrap();
    assert_eq!(direct.trim(), format!("saw {WORKLOAD_ADDR}"), "other ports are forwarded by the kernel");
    let proxied_v6 = http_body(&topology.workload, &format!("http://[{SERVER_A_V6}]/"), QUICK).unwrap();
    assert_eq!(proxied_v6.trim(), "saw fd00:240:2::1");

    assert!(agent.log().contains(&format!("original_dst={SERVER_A}:80")), "{}", agent.log());
    assert!(agent.log().contains(&format!("original_dst=[{SERVER_A_V6}]:80")), "{}", agent.log());
    assert!(agent.sample(&series("packets", "intercepted")).unwrap() >= 6, "handshake, request, ack at least");
}

#[test]
fn a_killed_agent_keeps_enforcing_and_a_restarted_one_adopts_its_pins() {
    require_root();
    let topology = Topology::new().unwrap();
    let bpffs = Bpffs::mount().unwrap();
    let allowed = UdpSink::bind(&topology.internet, addr(SERVER_A, 5353)).unwrap();
    let blocked = UdpSink::bind(&topology.internet, addr(SERVER_A, 6000)).unwrap();
    let args = registry_only(&format!("--allow {SERVER_A}:5353/udp"));

    let first = Agent::start_pinned(&topology.gateway, &bpffs, &args).unwrap();
    send_udp(&topology.workload, addr(SERVER_A, 6000), 4, PAYLOAD).unwrap();
    assert_eq!(blocked.drain(), 0);
    let counted = first.sample(&series("packets", "blackholed")).unwrap();
    first.kill();

    send_udp(&topology.workload, addr(SERVER_A, 5353), 3, PAYLOAD).unwrap();
    send_udp(&topology.workload, addr(SERVER_A, 6000), 3, PAYLOAD).unwrap();
    assert_eq!(allowed.drain(), 3, "with no agent, the allowed destination still passes");
    assert_eq!(blocked.drain(), 0, "with no agent, the kernel still blackholes (fail closed)");

    let second = Agent::start_pinned(&topology.gateway, &bpffs, &args).unwrap();
    assert!(second.log().contains(&format!("adopted=[\"{GATEWAY_WORKLOAD_IFACE}\"]")), "{}", second.log());
    assert!(
        second.sample(&series("packets", "blackholed")).unwrap() >= counted + 3,
        "the counters of the adopted maps go on from where they were"
    );
    send_udp(&topology.workload, addr(SERVER_A, 6000), 2, PAYLOAD).unwrap();
    assert_eq!(blocked.drain(), 0);
    second.kill();

    let (status, output) =
        Agent::run_to_end(&topology.gateway, &format!("cleanup --bpffs {}", bpffs.pin_dir().display())).unwrap();
    assert!(status.success(), "{output}");
    assert!(!bpffs.pin_dir().exists(), "cleanup removes every pin");
    send_udp(&topology.workload, addr(SERVER_A, 6000), 2, PAYLOAD).unwrap();
    assert_eq!(blocked.drain(), 2, "after cleanup nothing is attached");
}

#[test]
fn cleanup_removes_the_policy_routing_for_intercepted_traffic() {
    require_root();
    let topology = Topology::new().unwrap();
    let bpffs = Bpffs::mount().unwrap();
    let agent = Agent::start_pinned(
        &topology.gateway,
        &bpffs,
        &format!("--intercept {GATEWAY_WORKLOAD_IFACE} --intercept-port 80"),
    )
    .unwrap();
    let rules = |family: &str| {
        let output = topology.gateway.command("ip").args([family, "rule", "show"]).output().unwrap();
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    assert!(rules("-4").contains("fwmark 0x200/0xf00 lookup 100"), "{}", rules("-4"));
    assert!(rules("-6").contains("fwmark 0x200/0xf00 lookup 100"), "{}", rules("-6"));
    agent.kill();

    let (status, output) =
        Agent::run_to_end(&topology.gateway, &format!("cleanup --bpffs {}", bpffs.pin_dir().display())).unwrap();

    assert!(status.success(), "{output}");
    assert!(!rules("-4").contains("fwmark 0x200"), "{}", rules("-4"));
    assert!(!rules("-6").contains("fwmark 0x200"), "{}", rules("-6"));
    let table = topology.gateway.command("ip").args(["route", "show", "table", "100"]).output().unwrap();
    assert!(String::from_utf8_lossy(&table.stdout).trim().is_empty(), "table 100 is empty");
}

#[test]
fn another_tc_program_on_the_interface_still_sees_what_sluice_passes() {
    require_root();
    let topology = Topology::new().unwrap();
    let args = format!("--intercept {GATEWAY_WORKLOAD_IFACE}");
    let first = Agent::start(&topology.gateway, &args).unwrap();
    let others = "--metrics-addr 127.0.0.1:15091 --admin-addr 127.0.0.1:15002 --readiness-addr 127.0.0.1:15022 \
                  --proxy-port 15003";
    let second = Agent::start(&topology.gateway, &format!("{args} {others}")).unwrap();
    let sink = UdpSink::bind(&topology.internet, addr(SERVER_B, 6000)).unwrap();
    let before = [&first, &second].map(|agent| agent.sample(&series("packets", "passthrough")).unwrap());

    send_udp(&topology.workload, addr(SERVER_B, 6000), 5, PAYLOAD).unwrap();

    assert_eq!(sink.drain(), 5);
    let after = [&first, &second].map(|agent| agent.sample(&series("packets", "passthrough")).unwrap());
    assert_eq!([after[0] - before[0], after[1] - before[1]], [5, 5], "both programs ran on every packet");
}

#[test]
fn what_cannot_name_an_interface_is_refused_and_nothing_is_left_attached() {
    require_root();
    let topology = Topology::new().unwrap();
    let sink = UdpSink::bind(&topology.internet, addr(SERVER_A, 6000)).unwrap();
    let bpffs = Bpffs::mount().unwrap();

    let args = format!(
        "run --bpffs {} --intercept {GATEWAY_WORKLOAD_IFACE} --intercept an-overlong-name \
         --outbound-traffic-policy REGISTRY_ONLY --metrics-addr 127.0.0.1:15090",
        bpffs.pin_dir().display()
    );
    let (status, output) = Agent::run_to_end(&topology.gateway, &args).unwrap();

    assert!(!status.success(), "{output}");
    assert!(output.contains("'an-overlong-name' is not an interface name (1 to 15 characters)"), "{output}");
    send_udp(&topology.workload, addr(SERVER_A, 6000), 3, PAYLOAD).unwrap();
    assert_eq!(sink.drain(), 3, "no interface was attached");
    assert!(!bpffs.pin_dir().exists(), "nothing was pinned");
}

#[test]
fn a_metrics_port_in_use_is_refused_before_anything_is_attached() {
    require_root();
    let topology = Topology::new().unwrap();
    // Another program's listener (an agent's own listeners are shared with its successor, SO_REUSEPORT).
    let metrics_addr: std::net::SocketAddr = sluice_tests::agent::METRICS_ADDR.parse().unwrap();
    let _other = topology.gateway.enter(|| std::net::TcpListener::bind(metrics_addr)).unwrap().unwrap();
    let sink = UdpSink::bind(&topology.internet, addr(SERVER_A, 6000)).unwrap();
    let bpffs = Bpffs::mount().unwrap();

    let args = format!(
        "run --bpffs {} {} --metrics-addr {}",
        bpffs.pin_dir().display(),
        registry_only(""),
        sluice_tests::agent::METRICS_ADDR
    );
    let (status, output) = Agent::run_to_end(&topology.gateway, &args).unwrap();

    assert!(!status.success(), "{output}");
    assert!(output.contains("binding the metrics listener on 127.0.0.1:15090: Address already in use"), "{output}");
    send_udp(&topology.workload, addr(SERVER_A, 6000), 3, PAYLOAD).unwrap();
    assert_eq!(sink.drain(), 3, "the refused agent blackholed nothing");
}
