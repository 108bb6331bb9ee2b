//! What the agent tells the outside, read by the tools users read it with: a real Prometheus scraping
//! `/stats/prometheus` on Istio's port, and promtool checking the exposition.

use std::{net::SocketAddr, time::Duration};

use sluice_tests::{
    agent::METRICS_ADDR,
    istio::{self, HTTPBIN, MESH_REGISTRY_ONLY},
    peers::{curl, Nginx, Prometheus},
    require_root,
    topology::{GATEWAY_WORKLOAD_IFACE, SERVER_A, SERVER_B},
    Agent, Topology,
};

/// The value of the single series the query returns, once Prometheus has it (within 20 s).
fn scraped_value(prometheus: &Prometheus, query: &str) -> f64 {
    let mut last = String::new();
    for _ in 0..80 {
        last = prometheus.query(query).unwrap();
        let answer: serde_json::Value = serde_json::from_str(&last).unwrap();
        if let Some(value) = answer["data"]["result"][0]["value"][1].as_str() {
            return value.parse().unwrap();
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    panic!("Prometheus has no {query}: {last}");
}

/// A root-namespace policy: the mesh's workloads may not reach `/admin` anywhere.
const NO_ADMIN: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-admin, namespace: istio-system}
spec:
  action: DENY
  rules: [{to: [{operation: {paths: [/admin]}}]}]
";

#[test]
fn prometheus_scrapes_istios_request_metrics_and_promtool_reads_them() {
    require_root();
    let topology = Topology::new().unwrap();
    let _nginx = Nginx::start(&topology.internet, &[SocketAddr::new(SERVER_A.parse().unwrap(), 80)], "ok").unwrap();
    let config = tempfile::tempdir().unwrap();
    istio::write(config.path(), &[MESH_REGISTRY_ONLY, HTTPBIN, NO_ADMIN]).unwrap();
    let args = format!("--intercept {GATEWAY_WORKLOAD_IFACE} --config {}", config.path().display());
    let agent = Agent::start(&topology.gateway, &args).unwrap();
    let requests = [("httpbin.org", SERVER_A, "/"), ("httpbin.org", SERVER_A, "/"), ("edition.cnn.com", SERVER_B, "/")];
    for (host, address, path) in requests.into_iter().chain([("httpbin.org", SERVER_A, "/admin")]) {
        let resolve = format!("{host}:80:{address}");
        curl(&topology.workload, &["-o", "/dev/null", "--resolve", &resolve, &format!("http://{host}{path}")]).unwrap();
    }

    let prometheus = Prometheus::start(&topology.gateway, "sluice", METRICS_ADDR, "/stats/prometheus").unwrap();
    let served = "sum(istio_requests_total{job=\"sluice\",reporter=\"source\",destination_service=\"httpbin.org\",\
                  response_code=\"200\"})";
    assert_eq!(scraped_value(&prometheus, served), 2.0);
    let blackholed = "sum(istio_requests_total{destination_service_name=\"BlackHoleCluster\",response_code=\"502\"})";
    assert_eq!(scraped_value(&prometheus, blackholed), 1.0);
    let histogram = "sum(istio_request_duration_milliseconds_count{destination_service=\"httpbin.org\"})";
    assert_eq!(scraped_value(&prometheus, histogram), 2.0);
    assert!(scraped_value(&prometheus, "sum(sluice_datapath_packets_total{verdict=\"intercepted\"})") > 0.0);
    assert_eq!(scraped_value(&prometheus, "sluice_config_generation"), 1.0);
    let denied = "sum(sluice_authorization_decisions_total{policy=\"istio-system/no-admin\",action=\"DENY\",\
                  result=\"denied\"})";
    assert_eq!(scraped_value(&prometheus, denied), 1.0);
    let forbidden = "sum(istio_requests_total{response_code=\"403\",response_flags=\"-\"})";
    assert_eq!(scraped_value(&prometheus, forbidden), 1.0);
    // Prometheus knows the families' types, as Istio's dashboards expect.
    let metadata = prometheus.api("metadata", "metric=istio_requests_total").unwrap();
    assert!(metadata.contains("\"type\":\"counter\""), "{metadata}");
    let metadata = prometheus.api("metadata", "metric=istio_request_duration_milliseconds").unwrap();
    assert!(metadata.contains("\"type\":\"histogram\""), "{metadata}");

    let exposition = agent.metrics().unwrap();
    let output = topology
        .gateway
        .command("sh")
        .args(["-c", "promtool check metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child.stdin.take().expect("piped").write_all(exposition.as_bytes())?;
            child.wait_with_output()
        })
        .unwrap();
    let report = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    // Istio's names carry their unit (milliseconds, not seconds): promtool's naming advice, not an error.
    let problems: Vec<&str> =
        report.lines().filter(|line| !line.contains("use base unit \"seconds\" instead of \"milliseconds\"")).collect();
    assert!(problems.is_empty(), "promtool check metrics:\n{report}");
}
