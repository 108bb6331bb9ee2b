//! Reading the agent's Prometheus text.

/// The sum of `name`'s samples whose labels include every `label="value"` of `labels`.
pub fn total(metrics: &str, name: &str, labels: &[(&str, &str)]) -> u64 {
    metrics
        .lines()
        .filter(|line| line.starts_with(&format!("{name}{{")) || line.starts_with(&format!("{name} ")))
        .filter(|line| labels.iter().all(|(k, v)| line.contains(&format!("{k}=\"{v}\""))))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// An agent in REGISTRY_ONLY that has served traffic of every kind its standing metrics count — a request proxied,
/// a connection refused, a datagram blackholed, a resource rejected — and its scrape: what dashboards and alerts
/// can rely on finding. (A family without series is left out of a scrape.)
pub fn agent_with_traffic(
    topology: &crate::Topology,
) -> (crate::Agent<'_>, tempfile::TempDir, crate::peers::Nginx, String) {
    use std::io::{Read, Write};

    use crate::{
        istio::{self, HTTPBIN, MESH_REGISTRY_ONLY},
        topology::{addr, GATEWAY_WORKLOAD_IFACE, SERVER_A, SERVER_B},
    };
    let nginx = crate::peers::Nginx::start(&topology.internet, &[addr(SERVER_A, 80)], crate::http::ECHO).unwrap();
    let config = tempfile::tempdir().unwrap();
    let rejected =
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: broken, namespace: egress}\n\
                    spec: {hosts: ['*'], ports: [{number: 443, name: tls, protocol: TLS}]}\n";
    istio::write(config.path(), &[MESH_REGISTRY_ONLY, HTTPBIN, rejected]).unwrap();
    let args = format!("--intercept {GATEWAY_WORKLOAD_IFACE} --config {}", config.path().display());
    let agent = crate::Agent::start(&topology.gateway, &args).unwrap();
    assert_eq!(crate::http::get(topology, "httpbin.org", SERVER_A, "/", &[]).0, 200, "{}", agent.log());
    topology
        .workload
        .enter(|| {
            let timeout = std::time::Duration::from_secs(2);
            let mut stream = std::net::TcpStream::connect_timeout(&addr(SERVER_B, 80), timeout).unwrap();
            stream.set_read_timeout(Some(timeout)).unwrap();
            let _ = stream.write_all(b"hello\r\n\r\n").and_then(|()| stream.read(&mut [0; 16]));
        })
        .unwrap();
    crate::peers::send_udp(&topology.workload, addr(SERVER_B, 6000), 2, 100).unwrap();
    agent.wait_for_log("blocked flow", 1).unwrap();
    let scrape = agent.metrics().unwrap();
    (agent, config, nginx, scrape)
}

/// docs/telemetry.md's metrics table: each series it lists (Istio's and Sluice's), with the labels it names.
pub fn documented_metrics() -> std::collections::BTreeMap<String, std::collections::BTreeSet<String>> {
    let page = std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/telemetry.md"))
        .expect("reading docs/telemetry.md");
    page.lines()
        .filter(|line| line.starts_with("| `"))
        .filter_map(|line| {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            let name = cells.get(1)?.trim_matches('`').to_owned();
            let labels = cells.get(3)?.split(", ").map(|label| label.trim_matches('`').to_owned()).collect();
            (name.starts_with("istio_") || name.starts_with("sluice_")).then_some((name, labels))
        })
        .collect()
}
