//! Upgrades and restarts under steady load: an agent replaced by SIGTERM and a new start, by a new agent starting
//! beside it (a DaemonSet surge), and by `kill -9` and a new start. Workloads keep sending HTTP on kept-alive and on
//! new connections (proxied), TCP to a port allowed by address (forwarded by the kernel) and connections to a port
//! nobody registered (blackholed): not one allowed flow may fail across any replacement, not one proxied request
//! across a drained one, and the blackholed port is never reached. And a successor that dies between its claim on
//! the pins and its readiness leaves the owner serving, enforcing and writing the datapath.

use std::{
    net::TcpListener,
    process::Command,
    time::{Duration, Instant},
};

use sluice_tests::{
    agent::Bpffs,
    http::silent_server,
    istio::{self, HTTPBIN, MESH_REGISTRY_ONLY},
    load::{self, Load},
    peers::{send_udp, Nginx, UdpSink},
    require_root,
    topology::{addr, GATEWAY_WORKLOAD_IFACE, INTERNET_ADDR, SERVER_A},
    Agent, Topology,
};

/// What the workloads send, each from a thread of its own.
const KEPT_ALIVE: &str = "HTTP/1.1 kept alive (proxied)";
const NEW_CONNECTIONS: &str = "HTTP/1.1 on new connections (proxied)";
const ALLOWED_BY_ADDRESS: &str = "TCP to a port allowed by address (kernel)";
const BLACKHOLED: &str = "connections to a blackholed port";
const FLOWS: [&str; 4] = [KEPT_ALIVE, NEW_CONNECTIONS, ALLOWED_BY_ADDRESS, BLACKHOLED];

/// The replacements, in the order the test makes them.
const STEADY: usize = 0;
const SIGTERM: usize = 1;
const SURGE: usize = 2;
const KILLED: usize = 3;
const PHASES: [(usize, &str); 4] = [(STEADY, "steady"), (SIGTERM, "SIGTERM"), (SURGE, "surge"), (KILLED, "kill -9")];

const ALLOWED_PORT: u16 = 8080;
const BLACKHOLED_PORT: u16 = 9090;
const BLACKHOLED_UDP_PORT: u16 = 6000;

/// Sends `flow` until the load stops (on a thread inside the workload's namespace).
fn send(load: &Load, flow: &'static str) {
    let proxied = addr(SERVER_A, 80);
    let pause = Duration::from_millis(5);
    match flow {
        KEPT_ALIVE => {
            let mut kept = None;
            load.send(flow, pause, || load::kept_alive(&mut kept, proxied, "httpbin.org"))
        }
        NEW_CONNECTIONS => load.send(flow, pause, || load::one_request(proxied, "httpbin.org")),
        ALLOWED_BY_ADDRESS => load.send(flow, pause, || load::one_request(addr(SERVER_A, ALLOWED_PORT), "server-a")),
        _ => load.send(flow, pause, || load::never_connects(addr(SERVER_A, BLACKHOLED_PORT))),
    }
}

#[test]
fn replacing_the_agent_fails_no_allowed_flow_and_a_drained_one_no_proxied_request() {
    require_root();
    let topology = Topology::new().unwrap();
    let ports = [addr(SERVER_A, 80), addr(SERVER_A, ALLOWED_PORT)];
    let _nginx = Nginx::start(&topology.internet, &ports, "served").unwrap();
    let blackholed_server =
        topology.internet.enter(|| TcpListener::bind(addr(SERVER_A, BLACKHOLED_PORT))).unwrap().unwrap();
    blackholed_server.set_nonblocking(true).unwrap();
    let blackholed_udp = UdpSink::bind(&topology.internet, addr(SERVER_A, BLACKHOLED_UDP_PORT)).unwrap();
    let config = tempfile::tempdir().unwrap();
    istio::write(config.path(), &[MESH_REGISTRY_ONLY, HTTPBIN]).unwrap();
    let bpffs = Bpffs::mount().unwrap();
    let args = format!(
        "--intercept {GATEWAY_WORKLOAD_IFACE} --config {} --allow {SERVER_A}:{ALLOWED_PORT}/tcp \
         --drain-delay 3s --drain-timeout 5s",
        config.path().display()
    );
    let start = || Agent::start_pinned(&topology.gateway, &bpffs, &args).unwrap();
    let load = Load::default();

    let logs = std::thread::scope(|scope| {
        // The load begins once the first agent is up (connections opened before would be cut by its interception).
        let first = start();
        for flow in FLOWS {
            let (load, workload) = (&load, &topology.workload);
            scope.spawn(move || workload.enter(|| send(load, flow)).unwrap());
        }
        let steady = || std::thread::sleep(Duration::from_secs(1));
        let mut logs = Vec::new();
        steady();

        // SIGTERM, and the next agent started at once: the first drains while the second takes over.
        load.enter(SIGTERM);
        first.terminate();
        let deadline = Instant::now() + Duration::from_secs(2);
        while first.readiness().is_ok() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let draining = first.readiness().map_err(|e| format!("{e:#}"));
        let second = start();
        let (status, log) = first.wait_for_exit(Duration::from_secs(15));
        logs.push(("first", log));
        steady();

        // Surge: a new agent starts beside the running one, which hands the datapath over and drains by itself.
        load.enter(SURGE);
        let third = start();
        let handed_over =
            second.wait_for_log("handed over and drained: waiting for SIGTERM", 1).map_err(|e| e.to_string());
        second.terminate();
        let (second_status, log) = second.wait_for_exit(Duration::from_secs(5));
        logs.push(("second", log));
        steady();

        // A crash: the kernel goes on alone until the next agent adopts the pins.
        load.enter(KILLED);
        // What began before it ends first: a request the crash cuts is counted as the crash's.
        std::thread::sleep(Duration::from_millis(300));
        logs.push(("third", third.kill()));
        let fourth = start();
        steady();
        load.stop();
        let (_, log) = fourth.stop();
        logs.push(("fourth", log));
        (logs, draining, status, handed_over, second_status)
    });
    let (logs, draining, first_status, handed_over, second_status) = logs;
    let all_logs: String = logs.iter().map(|(name, log)| format!("--- {name} agent ---\n{log}\n")).collect();

    let draining = draining.expect_err("readiness answers 200 after SIGTERM");
    assert!(draining.contains("503") || draining.contains("draining"), "readiness while draining: {draining}");
    assert!(first_status.is_some_and(|status| status.success()), "the first agent exits after its drain:\n{all_logs}");
    assert!(logs[0].1.contains("drained: no client connection is open"), "{all_logs}");
    handed_over.unwrap_or_else(|why| panic!("the surged agent hands over: {why}"));
    assert!(second_status.is_some_and(|status| status.success()), "{all_logs}");
    assert!(logs[3].1.contains("adopted="), "{all_logs}");

    for (phase, name) in PHASES {
        let counts: Vec<String> = FLOWS
            .iter()
            .map(|flow| {
                let tally = load.tally(phase, flow);
                format!("{flow}: {} done, {} failed", tally.done, tally.failures())
            })
            .collect();
        eprintln!("{name}: {}", counts.join("; "));
        for flow in FLOWS {
            let tally = load.tally(phase, flow);
            assert!(tally.done > 0, "{flow} made no progress in {name}\n{all_logs}");
            // A crash loses the proxy's requests in flight, as Envoy's would; nothing else may fail.
            let may_fail = phase == KILLED && (flow == KEPT_ALIVE || flow == NEW_CONNECTIONS);
            assert!(
                may_fail || tally.failures() == 0,
                "{} of {} {flow} failed in {name}: {:?}\n{all_logs}",
                tally.failures(),
                tally.failures() + tally.done,
                tally.failed
            );
        }
    }
    assert!(blackholed_server.accept().is_err(), "no connection reached the blackholed port");
    send_udp(&topology.workload, addr(SERVER_A, BLACKHOLED_UDP_PORT), 3, 64).unwrap();
    assert_eq!(blackholed_udp.drain(), 0);
    let lost = load.tally(KILLED, KEPT_ALIVE).failures() + load.tally(KILLED, NEW_CONNECTIONS).failures();
    eprintln!("proxied requests failed across kill -9: {lost}");
}

/// A ServiceEntry resolved by DNS: the successor's start waits on its lookup (the DNS server never answers), which
/// holds it between its claim and its readiness.
const SLOW_DNS: &str = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: slow, namespace: egress}\n\
                        spec: {hosts: [slow.example], ports: [{number: 443, name: tls, protocol: TLS}], resolution: DNS}\n";

/// Registers server A's port 8080 by address: what the owner writes after its successor died.
const ALLOWED_LATER: &str = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: later, namespace: egress}\n\
                             spec: {hosts: [later.example], addresses: [203.0.113.10], ports: [{number: 8080, name: tcp, protocol: TCP}], resolution: NONE}\n";

#[test]
fn a_successor_that_dies_before_it_is_ready_leaves_the_owner_serving_and_writing() {
    require_root();
    let topology = Topology::new().unwrap();
    let ports = [addr(SERVER_A, 80), addr(SERVER_A, ALLOWED_PORT)];
    let _nginx = Nginx::start(&topology.internet, &ports, "served").unwrap();
    let blackholed_udp = UdpSink::bind(&topology.internet, addr(SERVER_A, BLACKHOLED_UDP_PORT)).unwrap();
    // A DNS server that takes queries and never answers, over UDP and TCP.
    let _silent_udp = UdpSink::bind(&topology.internet, addr(INTERNET_ADDR, 53)).unwrap();
    let _silent_tcp = silent_server(&topology, addr(INTERNET_ADDR, 53));
    let (owner_config, successor_config) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    istio::write(owner_config.path(), &[MESH_REGISTRY_ONLY, HTTPBIN]).unwrap();
    istio::write(successor_config.path(), &[MESH_REGISTRY_ONLY, HTTPBIN, SLOW_DNS]).unwrap();
    let bpffs = Bpffs::mount().unwrap();
    let common = format!("--intercept {GATEWAY_WORKLOAD_IFACE} --dns-server {INTERNET_ADDR}");
    let owner =
        Agent::start_pinned(&topology.gateway, &bpffs, &format!("{common} --config {}", owner_config.path().display()))
            .unwrap();
    // The successor serves its metrics elsewhere, so that the harness waits for its own.
    let successor_args = format!(
        "{common} --config {} --metrics-addr 127.0.0.1:25090 --admin-addr 127.0.0.1:25000 \
         --readiness-addr 127.0.0.1:25021",
        successor_config.path().display()
    );

    let started = std::thread::scope(|scope| {
        let successor = scope.spawn(|| Agent::start_pinned(&topology.gateway, &bpffs, &successor_args).map(drop));
        // Held still for it: the successor has claimed the pins and is taking them up. It dies there, once its
        // classifier runs on the link (a policy was pinned: it enforces at once, before its lookups).
        owner.wait_for_log("a successor agent is starting on these pins: holding still", 1).unwrap();
        let ours = owner.status().unwrap()["datapath"]["programId"].as_u64().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while owner.status().unwrap()["datapath"]["linkPrograms"][GATEWAY_WORKLOAD_IFACE].as_u64() == Some(ours) {
            assert!(Instant::now() < deadline, "the successor's classifier never ran on the link");
            std::thread::sleep(Duration::from_millis(20));
        }
        let killed = Command::new("pkill").args(["-KILL", "-f", "metrics-addr 127.0.0.1:25090"]).status().unwrap();
        assert!(killed.success(), "the successor was running");
        successor.join().unwrap()
    });
    assert!(started.is_err(), "the successor was killed before it was ready");

    owner.wait_for_log("the successor went away before it was ready: this agent goes on", 1).unwrap();
    // The owner's classifier is back on the link, so that what the owner writes is what the kernel reads whatever
    // the successor's map layout.
    owner.wait_for_log("this agent's classifier put back on the links", 1).unwrap();
    let status = owner.status().unwrap();
    let ours = status["datapath"]["programId"].as_u64().unwrap();
    assert_eq!(status["datapath"]["linkPrograms"][GATEWAY_WORKLOAD_IFACE].as_u64(), Some(ours), "{status}");
    // The owner serves and enforces as before…
    assert!(owner.readiness().is_ok(), "{}", owner.log());
    assert_eq!(topology.workload.enter(|| load::one_request(addr(SERVER_A, 80), "httpbin.org")).unwrap(), Ok(()));
    send_udp(&topology.workload, addr(SERVER_A, BLACKHOLED_UDP_PORT), 3, 64).unwrap();
    assert_eq!(blackholed_udp.drain(), 0, "still blackholed in the kernel");
    let unregistered = topology.workload.enter(|| load::never_connects(addr(SERVER_A, ALLOWED_PORT))).unwrap();
    assert_eq!(unregistered, Ok(()), "port {ALLOWED_PORT} is registered by nothing yet");
    // …and writes the datapath again: a port registered now is opened in the kernel.
    istio::write(owner_config.path(), &[MESH_REGISTRY_ONLY, HTTPBIN, ALLOWED_LATER]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while topology.workload.enter(|| load::one_request(addr(SERVER_A, ALLOWED_PORT), "server-a")).unwrap().is_err() {
        assert!(Instant::now() < deadline, "the owner's new policy was not written:\n{}", owner.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    let (status, log) = owner.stop();
    assert!(status.is_some_and(|status| status.success()), "{log}");
}
