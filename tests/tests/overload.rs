//! Overload: clients holding the proxy's memory (many connections, each with most of a request's headers sent)
//! push it past `--max-memory`; it sheds new requests with 503 and the flag `OM`, says so in its metrics, stays up,
//! and serves again once they are gone.

use std::{
    io::Write,
    net::TcpStream,
    time::{Duration, Instant},
};

use sluice_tests::{
    http::{get, ECHO},
    istio::{self, HTTPBIN, MESH_REGISTRY_ONLY},
    metrics::total,
    peers::Nginx,
    require_root,
    topology::{addr, GATEWAY_WORKLOAD_IFACE, SERVER_A},
    Agent, Topology,
};

/// Connections holding memory, and the header bytes each sends without ending its head.
const HOLDERS: usize = 600;
const HELD_BYTES: usize = 48 * 1024;

/// Waits up to 15 s for the agent's `sluice_overload_active` to be `value`.
fn wait_for_overload(agent: &Agent, value: u64) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while agent.sample("sluice_overload_active").unwrap() != value {
        assert!(
            Instant::now() < deadline,
            "sluice_overload_active never became {value} ({:?} KiB resident)",
            agent.resident_kib()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn past_max_memory_new_requests_are_shed_with_503_om_and_served_again_once_memory_is_back() {
    require_root();
    let topology = Topology::new().unwrap();
    let _nginx = Nginx::start(&topology.internet, &[addr(SERVER_A, 80)], ECHO).unwrap();
    let config = tempfile::tempdir().unwrap();
    istio::write(config.path(), &[MESH_REGISTRY_ONLY, HTTPBIN]).unwrap();
    let args = |max_memory: &str| {
        format!(
            "--intercept {GATEWAY_WORKLOAD_IFACE} --config {} --request-headers-timeout 60s --max-memory {max_memory}",
            config.path().display()
        )
    };
    // What the agent holds serving: the threshold is set 16 MiB above it.
    let idle = {
        let agent = Agent::start(&topology.gateway, &args("0")).unwrap();
        assert_eq!(get(&topology, "httpbin.org", SERVER_A, "/", &[]).0, 200, "{}", agent.log());
        agent.resident_kib().unwrap()
    };
    let threshold = (idle + 16 * 1024) * 1024;
    let agent = Agent::start(&topology.gateway, &args(&threshold.to_string())).unwrap();
    assert_eq!(get(&topology, "httpbin.org", SERVER_A, "/", &[]).0, 200, "below the threshold: served");
    assert_eq!(agent.sample("sluice_overload_active").unwrap(), 0);

    let head = format!("GET / HTTP/1.1\r\nHost: httpbin.org\r\nX-Pad: {}", "a".repeat(HELD_BYTES));
    let holders: Vec<TcpStream> = topology
        .workload
        .enter(|| {
            (0..HOLDERS)
                .filter_map(|_| {
                    let mut stream = TcpStream::connect(addr(SERVER_A, 80)).ok()?;
                    stream.write_all(head.as_bytes()).ok()?;
                    Some(stream)
                })
                .collect()
        })
        .unwrap();
    assert!(holders.len() > HOLDERS * 9 / 10, "{} connections held", holders.len());
    wait_for_overload(&agent, 1);

    let (status, body) = get(&topology, "httpbin.org", SERVER_A, "/", &[]);
    assert_eq!((status, body.trim()), (503, "overloaded"), "{}", agent.log());
    let metrics = agent.metrics().unwrap();
    assert!(
        total(&metrics, "istio_requests_total", &[("response_flags", "OM"), ("response_code", "503")]) >= 1,
        "{metrics}"
    );
    assert!(
        sluice_tests::agent::sample(&metrics, "sluice_overload_shed_total{what=\"request\"}").unwrap_or(0) >= 1,
        "{metrics}"
    );
    assert!(agent.log().contains("overloaded: new requests get 503"), "{}", agent.log());

    drop(holders);
    wait_for_overload(&agent, 0);
    assert_eq!(get(&topology, "httpbin.org", SERVER_A, "/", &[]).0, 200, "served again:\n{}", agent.log());
    assert!(agent.log().contains("no longer overloaded"), "{}", agent.log());
    let (status, log) = agent.stop();
    assert!(status.is_some_and(|status| status.success()), "the agent lived through it:\n{log}");
}
