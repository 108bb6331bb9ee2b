//! The access log as Istio configures it, end to end: off unless the mesh config names `accessLogFile`; Istio's
//! default text line in a file that logrotate may rename (no line lost, the new file takes the next) or SIGHUP
//! reopens; a JSON encoding with a custom format read back as JSON; a bad format refused with its position while
//! the last good one stays in force; the Telemetry API's filters, metric switches and tag overrides.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use sluice_tests::{
    http::{get, ECHO},
    istio::{self, HTTPBIN},
    peers::Nginx,
    require_root,
    topology::{addr, GATEWAY_WORKLOAD_IFACE, SERVER_A},
    Agent, Topology,
};

fn mesh(fields: &str) -> String {
    let fields: String = fields.lines().map(|line| format!("    {line}\n")).collect();
    format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: istio, namespace: istio-system}}\ndata:\n  mesh: |\n    \
         outboundTrafficPolicy:\n      mode: REGISTRY_ONLY\n{fields}"
    )
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path).unwrap_or_default().lines().map(str::to_owned).collect()
}

/// Waits up to 10 s for `condition`.
fn eventually(mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if condition() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    condition()
}

fn args(config: &Path) -> String {
    format!("--intercept {GATEWAY_WORKLOAD_IFACE} --config {}", config.display())
}

#[test]
fn without_access_log_file_nothing_is_logged_as_in_istio() {
    require_root();
    let topology = Topology::new().unwrap();
    let _nginx = Nginx::start(&topology.internet, &[addr(SERVER_A, 80)], ECHO).unwrap();
    let config = tempfile::tempdir().unwrap();
    istio::write(config.path(), &[&mesh(""), HTTPBIN]).unwrap();
    let agent = Agent::start(&topology.gateway, &args(config.path())).unwrap();

    assert_eq!(get(&topology, "httpbin.org", SERVER_A, "/quiet", &[]).0, 200);
    std::thread::sleep(Duration::from_millis(300));
    assert!(!agent.log().contains("/quiet"), "no access-log line: {}", agent.log());
    assert!(agent.metrics().unwrap().contains("response_code=\"200\""), "the request is still counted");
}

#[test]
fn a_file_takes_istios_default_line_and_follows_rotation() {
    require_root();
    let topology = Topology::new().unwrap();
    let _nginx = Nginx::start(&topology.internet, &[addr(SERVER_A, 80)], ECHO).unwrap();
    let config = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let file = logs.path().join("access.log");
    istio::write(config.path(), &[&mesh(&format!("accessLogFile: {}", file.display())), HTTPBIN]).unwrap();
    let agent = Agent::start(&topology.gateway, &args(config.path())).unwrap();

    assert_eq!(get(&topology, "httpbin.org", SERVER_A, "/first", &["-A", "probe/1"]).0, 200);
    assert!(eventually(|| lines(&file).len() == 1), "{:?}\n{}", lines(&file), agent.log());
    let line = &lines(&file)[0];
    // Istio's default format: details, termination details and the transport failure between flags and bytes;
    // cluster, addresses, server name and route at the end.
    assert!(line.contains("\"GET /first HTTP/1.1\" 200 - via_upstream - \"-\" 0 "), "{line}");
    assert!(line.contains(" \"probe/1\" ") && line.contains(" \"httpbin.org\" \"203.0.113.10:80\" "), "{line}");
    assert!(line.contains(" outbound|80||httpbin.org - 203.0.113.10:80 10.240.1.2:"), "{line}");

    // Renamed away while a client sends 300 requests on one connection: every line lands in one file or the
    // other, and once the agent has noticed (within a second) the next goes to a new file at the path.
    let urls: Vec<String> = (0..300).map(|i| format!("http://httpbin.org/burst/{i}")).collect();
    let mut burst = topology.workload.command("curl");
    burst.args(["-sS", "-o", "/dev/null", "--resolve", "httpbin.org:80:203.0.113.10"]).args(&urls);
    let mut burst = burst.spawn().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let rotated = logs.path().join("access.log.1");
    std::fs::rename(&file, &rotated).unwrap();
    assert!(burst.wait().unwrap().success());
    let burst_lines =
        || [&file, &rotated].iter().flat_map(|path| lines(path)).filter(|l| l.contains("/burst/")).count();
    assert!(eventually(|| burst_lines() == 300), "{} of 300 burst lines", burst_lines());
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(get(&topology, "httpbin.org", SERVER_A, "/after-rotation", &[]).0, 200);
    assert!(eventually(|| lines(&file).iter().any(|l| l.contains("/after-rotation"))), "{}", agent.log());

    // SIGHUP: reopened before the next line, without waiting for the check.
    std::fs::rename(&file, logs.path().join("access.log.2")).unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(agent.pid() as i32), nix::sys::signal::Signal::SIGHUP).unwrap();
    agent.wait_for_log("SIGHUP", 1).unwrap();
    assert_eq!(get(&topology, "httpbin.org", SERVER_A, "/after-hangup", &[]).0, 200);
    assert!(eventually(|| lines(&file).iter().any(|l| l.contains("/after-hangup"))), "{}", agent.log());
    assert_eq!(agent.sample("sluice_access_log_dropped_lines_total").unwrap(), 0);
}

#[test]
fn a_json_format_is_read_back_and_a_bad_one_keeps_the_last_good() {
    require_root();
    let topology = Topology::new().unwrap();
    let _nginx = Nginx::start(&topology.internet, &[addr(SERVER_A, 80)], ECHO).unwrap();
    let config = tempfile::tempdir().unwrap();
    let format = r#"{"code": "%RESPONSE_CODE%", "tenant": "%REQ(X-TENANT)%", "path": "%REQ(:PATH)%", "cluster": "%UPSTREAM_CLUSTER%", "missing": "%REQ(X-ABSENT)%", "content": "%RESP(CONTENT-TYPE)% %RESP(X-ABSENT?SERVER)%"}"#;
    let json = format!("accessLogFile: /dev/stdout\naccessLogEncoding: JSON\naccessLogFormat: '{format}'");
    istio::write(config.path(), &[&mesh(&json), HTTPBIN]).unwrap();
    let agent = Agent::start(&topology.gateway, &args(config.path())).unwrap();

    assert_eq!(get(&topology, "httpbin.org", SERVER_A, "/json", &["-H", "x-tenant: payments"]).0, 200);
    agent.wait_for_log("\"path\":\"/json\"", 1).unwrap();
    let log = agent.log();
    let line = log.lines().find(|line| line.contains("\"path\":\"/json\"")).unwrap();
    let mut parsed: serde_json::Value = serde_json::from_str(line).unwrap();
    // The upstream's response headers, the second by its alternative.
    let content = parsed["content"].take();
    assert!(content.as_str().unwrap().starts_with("text/plain nginx/"), "{line}");
    let expected = serde_json::json!({
        "code": 200, "tenant": "payments", "path": "/json", "cluster": "outbound|80||httpbin.org", "missing": null,
        "content": null
    });
    assert_eq!(parsed, expected, "{line}");

    // A format with an unknown operator: the mesh config is refused with the field and the position, and the
    // access log stays as it was.
    let bad = json.replace("%REQ(X-TENANT)%", "%NO_SUCH_THING%");
    istio::write(config.path(), &[&mesh(&bad), HTTPBIN]).unwrap();
    agent.wait_for_log("accessLogFormat", 1).unwrap();
    let log = agent.log();
    let error = log.lines().find(|line| line.contains("accessLogFormat")).unwrap();
    assert!(error.contains("%NO_SUCH_THING% is not a command operator") && error.contains("position"), "{error}");
    assert_eq!(get(&topology, "httpbin.org", SERVER_A, "/still", &["-H", "x-tenant: payments"]).0, 200);
    agent.wait_for_log("\"path\":\"/still\"", 1).unwrap();
    // Keys in order, as Envoy writes a JSON format's.
    assert!(agent.log().contains("\"path\":\"/still\",\"tenant\":\"payments\"}"), "{}", agent.log());
}

/// The seeds' Telemetry resources ("Access Logging", "Custom Metrics"), selecting this gateway: errors only, and
/// the request-size metric turned off.
const ERRORS_ONLY: &str = "apiVersion: telemetry.istio.io/v1alpha1
kind: Telemetry
metadata: {name: gateway-logging, namespace: istio-system}
spec:
  selector:
    matchLabels:
      istio: egressgateway
  accessLogging:
  - providers:
    - name: envoy
    filter:
      expression: response.code >= 400 # Log errors only
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: gateway-metrics, namespace: istio-system}
spec:
  selector: {matchLabels: {istio: egressgateway}}
  metrics:
  - providers: [{name: prometheus}]
    overrides:
    - match: {metric: REQUEST_SIZE}
      disabled: true
";

#[test]
fn the_seeds_telemetry_logs_errors_only_and_turns_a_metric_off() {
    require_root();
    let topology = Topology::new().unwrap();
    let _nginx = Nginx::start(&topology.internet, &[addr(SERVER_A, 80)], ECHO).unwrap();
    let config = tempfile::tempdir().unwrap();
    // No accessLogFile: the Telemetry turns the log on (Istio's `envoy` provider: standard output).
    istio::write(config.path(), &[&mesh(""), HTTPBIN, ERRORS_ONLY]).unwrap();
    let agent = Agent::start(&topology.gateway, &args(config.path())).unwrap();

    assert_eq!(get(&topology, "httpbin.org", SERVER_A, "/fine", &[]).0, 200);
    assert_eq!(get(&topology, "edition.cnn.com", "203.0.113.20", "/unregistered", &[]).0, 502);
    agent.wait_for_log("\"GET /unregistered HTTP/1.1\" 502 ", 1).unwrap();
    assert!(!agent.log().contains("/fine"), "a 200 is filtered out: {}", agent.log());

    let metrics = agent.metrics().unwrap();
    assert!(metrics.contains("istio_requests_total{"), "{metrics}");
    assert!(metrics.contains("istio_response_bytes_bucket{"), "{metrics}");
    assert!(!metrics.contains("istio_request_bytes"), "turned off, left out whole: {metrics}");

    // An expression that does not compile: the Telemetry is refused with its field and position, the last good
    // version stays (errors only, still).
    let bad = ERRORS_ONLY.replace("response.code >= 400 # Log errors only", "response.code >= 400 )");
    istio::write(config.path(), &[&mesh(""), HTTPBIN, &bad]).unwrap();
    agent.wait_for_log("spec.accessLogging[0].filter.expression", 1).unwrap();
    let log = agent.log();
    let error = log.lines().find(|line| line.contains("spec.accessLogging[0].filter.expression")).unwrap();
    assert!(error.contains("Telemetry istio-system/gateway-logging") && error.contains("column"), "{error}");
    assert_eq!(get(&topology, "httpbin.org", SERVER_A, "/still-fine", &[]).0, 200);
    assert_eq!(get(&topology, "edition.cnn.com", "203.0.113.20", "/still-unregistered", &[]).0, 502);
    agent.wait_for_log("/still-unregistered", 1).unwrap();
    assert!(!agent.log().contains("/still-fine"), "{}", agent.log());
}

/// The seeds' "Custom Metrics" Telemetry, with a label added and one removed: on `istio_requests_total` only.
const CUSTOM_METRICS: &str = "apiVersion: telemetry.istio.io/v1alpha1
kind: Telemetry
metadata: {name: gateway-metrics, namespace: istio-system}
spec:
  selector:
    matchLabels:
      istio: egressgateway
  metrics:
  - providers:
    - name: prometheus
    overrides:
    - match:
        metric: REQUEST_COUNT
      tagOverrides:
        source_principal:
          operation: UPSERT
          value: request.auth.principal
        response_code:
          operation: UPSERT
          value: response.code
        request_host:
          value: request.host
        tenant:
          value: request.headers['x-tenant']
        grpc_response_status:
          operation: REMOVE
";

#[test]
fn tag_overrides_set_and_remove_labels_of_the_metric_they_name() {
    require_root();
    let topology = Topology::new().unwrap();
    let _nginx = Nginx::start(&topology.internet, &[addr(SERVER_A, 80)], ECHO).unwrap();
    let config = tempfile::tempdir().unwrap();
    istio::write(config.path(), &[&mesh(""), HTTPBIN, CUSTOM_METRICS]).unwrap();
    let agent = Agent::start(&topology.gateway, &args(config.path())).unwrap();

    assert_eq!(get(&topology, "httpbin.org", SERVER_A, "/", &["-H", "x-tenant: payments"]).0, 200);
    assert_eq!(get(&topology, "edition.cnn.com", "203.0.113.20", "/", &[]).0, 502);
    let metrics = agent.metrics().unwrap();
    let requests: Vec<&str> = metrics.lines().filter(|line| line.starts_with("istio_requests_total{")).collect();
    let httpbin = requests.iter().find(|line| line.contains("destination_service=\"httpbin.org\"")).unwrap();
    for label in
        ["request_host=\"httpbin.org\"", "tenant=\"payments\"", "response_code=\"200\"", "source_principal=\"unknown\""]
    {
        assert!(httpbin.contains(label), "{label} in {httpbin}");
    }
    assert!(requests.iter().all(|line| !line.contains("grpc_response_status=")), "removed: {requests:?}");
    let refused = requests.iter().find(|line| line.contains("response_code=\"502\"")).unwrap();
    assert!(
        refused.contains("request_host=\"edition.cnn.com\"") && refused.contains("tenant=\"unknown\""),
        "{refused}"
    );
    // The other metrics keep Istio's standard labels.
    let duration = metrics.lines().find(|line| line.starts_with("istio_request_duration_milliseconds_count{")).unwrap();
    assert!(duration.contains("grpc_response_status=") && !duration.contains("request_host="), "{duration}");

    // A label that is not a Prometheus name: the resource is refused, naming it; the last good one stays.
    let bad = CUSTOM_METRICS.replace("request_host:", "request-host:");
    istio::write(config.path(), &[&mesh(""), HTTPBIN, &bad]).unwrap();
    agent.wait_for_log("'request-host' is not a Prometheus label name", 1).unwrap();
    assert_eq!(get(&topology, "httpbin.org", SERVER_A, "/", &["-H", "x-tenant: billing"]).0, 200);
    let metrics = agent.metrics().unwrap();
    assert!(metrics.contains("tenant=\"billing\""), "the last good overrides stay in force: {metrics}");
}
