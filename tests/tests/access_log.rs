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
    peers::{curl, Nginx},
    require_root,
    topology::{addr, GATEWAY_WORKLOAD_IFACE, SERVER_A, SERVER_B},
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
    // The upstream connection's own address (from the gateway's side toward the internet), then the client's.
    assert!(
        line.contains(" outbound|80||httpbin.org 10.240.2.1:") && line.contains(" 203.0.113.10:80 10.240.1.2:"),
        "{line}"
    );

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
        upstream_server:
          value: response.headers['server']
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
    // The upstream's response headers, kept for the override though no access log is on.
    assert!(httpbin.contains("upstream_server=\"nginx/"), "{httpbin}");
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

/// What the failure operators are tested against: an HTTP host whose endpoint refuses connections, and TCP at
/// server B — port 8081 served, 8082 refusing, 8080 denied by an AuthorizationPolicy (whose rules name source
/// namespaces: the proxy decides all three, the kernel could not).
const FAILING: &str = "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: closed, namespace: egress}
spec:
  hosts: [closed.example]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints: [{address: 203.0.113.20}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: tcp-services, namespace: egress}
spec:
  hosts: [tcp.backend]
  addresses: [203.0.113.20]
  ports:
  - {number: 8080, name: tcp-denied, protocol: TCP}
  - {number: 8081, name: tcp-served, protocol: TCP}
  - {number: 8082, name: tcp-refusing, protocol: TCP}
  location: MESH_EXTERNAL
  resolution: NONE
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-8080, namespace: istio-system}
spec:
  action: DENY
  rules:
  - from: [{source: {notNamespaces: [trusted]}}]
    to: [{operation: {ports: ['8080']}}]
  - from: [{source: {namespaces: [nowhere]}}]
    to: [{operation: {ports: ['8081', '8082']}}]
";

#[test]
fn failures_and_upstream_addresses_are_logged_in_envoys_words() {
    require_root();
    let topology = Topology::new().unwrap();
    let _nginx = Nginx::start(&topology.internet, &[addr(SERVER_A, 80), addr(SERVER_B, 8081)], ECHO).unwrap();
    let config = tempfile::tempdir().unwrap();
    let format = r#"{"dialled": "%DOWNSTREAM_LOCAL_ADDRESS%", "path": "%REQ(:PATH)%", "code": "%RESPONSE_CODE%", "flags": "%RESPONSE_FLAGS%", "details": "%RESPONSE_CODE_DETAILS%", "termination": "%CONNECTION_TERMINATION_DETAILS%", "transport": "%UPSTREAM_TRANSPORT_FAILURE_REASON%", "upstream": "%UPSTREAM_HOST%", "local": "%UPSTREAM_LOCAL_ADDRESS%"}"#;
    let json = format!("accessLogFile: /dev/stdout\naccessLogEncoding: JSON\naccessLogFormat: '{format}'");
    istio::write(config.path(), &[&mesh(&json), HTTPBIN, FAILING]).unwrap();
    let agent = Agent::start(&topology.gateway, &args(config.path())).unwrap();
    let line = |key: &str, value: &str| -> serde_json::Value {
        let needle = format!("\"{key}\":\"{value}\"");
        agent.wait_for_log(&needle, 1).unwrap_or_else(|error| panic!("{needle}: {error}\n{}", agent.log()));
        let log = agent.log();
        serde_json::from_str(log.lines().find(|line| line.contains(&needle)).unwrap()).unwrap()
    };
    let gateway_port = |local: &serde_json::Value| {
        let local = local.as_str().unwrap_or_default();
        local.strip_prefix("10.240.2.1:").is_some_and(|port| port.parse::<u16>().is_ok_and(|port| port > 0))
    };

    // Served: the upstream connection's own address, on the gateway's side toward the internet.
    assert_eq!(get(&topology, "httpbin.org", SERVER_A, "/served", &[]).0, 200);
    let served = line("path", "/served");
    assert_eq!((&served["details"], &served["transport"]), (&"via_upstream".into(), &serde_json::Value::Null));
    assert!(gateway_port(&served["local"]), "{served}");

    // Refused by the endpoint: 503, Envoy's details, transport failure reason and body; Istio's default retry
    // policy retries a connect failure twice, and Envoy flags what is left `UF,URX`.
    let (code, body) = get(&topology, "closed.example", SERVER_B, "/refused", &[]);
    assert_eq!(code, 503, "{body}");
    assert!(body.ends_with("transport failure reason: delayed connect error: Connection refused"), "{body}");
    let refused = line("path", "/refused");
    let expected = serde_json::json!({
        "dialled": "203.0.113.20:80", "path": "/refused", "code": 503, "flags": "UF,URX",
        "details": "upstream_reset_before_response_started{remote_connection_failure|delayed_connect_error:_Connection_refused}",
        "termination": null, "transport": "delayed_connect_error:_Connection_refused", "upstream": "203.0.113.20:80",
        "local": null,
    });
    assert_eq!(refused, expected);

    // Unregistered in REGISTRY_ONLY: Istio's block_all route answers directly.
    assert_eq!(get(&topology, "unregistered.example", SERVER_A, "/unregistered", &[]).0, 502);
    assert_eq!(line("path", "/unregistered")["details"], "direct_response");

    // TCP relayed, refused by the endpoint, and denied by the AuthorizationPolicy (the network RBAC filter's
    // termination details).
    let fetch = |port: u16| curl(&topology.workload, &["--max-time", "3", &format!("http://{SERVER_B}:{port}/")]);
    assert!(fetch(8081).is_ok(), "{}", agent.log());
    let relayed = line("dialled", &format!("{SERVER_B}:8081"));
    assert!(gateway_port(&relayed["local"]) && relayed["flags"] == "-", "{relayed}");
    assert!(fetch(8082).is_err());
    let refused = line("dialled", &format!("{SERVER_B}:8082"));
    assert_eq!(
        (&refused["flags"], &refused["transport"], &refused["upstream"], &refused["local"]),
        (
            &"UF".into(),
            &"delayed_connect_error:_Connection_refused".into(),
            &"203.0.113.20:8082".into(),
            &serde_json::Value::Null
        ),
        "{refused}"
    );
    assert!(fetch(8080).is_err());
    let denied = line("dialled", &format!("{SERVER_B}:8080"));
    assert_eq!(denied["termination"], "rbac_access_denied_matched_policy[istio-system/no-8080]", "{denied}");
    assert_eq!(denied["upstream"], serde_json::Value::Null, "{denied}");
}

/// Tag overrides on the TCP metrics: the upstream and the port dialled added to the opened connections' series,
/// the response flags left out of the sent bytes'.
const TCP_TAGS: &str = "apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: tcp-tags, namespace: istio-system}
spec:
  selector: {matchLabels: {istio: egressgateway}}
  metrics:
  - providers: [{name: prometheus}]
    overrides:
    - match: {metric: TCP_OPENED_CONNECTIONS}
      tagOverrides:
        upstream_address: {value: upstream.address}
        dialled_port: {value: string(destination.port)}
    - match: {metric: TCP_SENT_BYTES}
      tagOverrides:
        response_flags: {operation: REMOVE}
";

#[test]
fn tag_overrides_label_the_tcp_metrics_of_relayed_connections() {
    require_root();
    let topology = Topology::new().unwrap();
    let _nginx = Nginx::start(&topology.internet, &[addr(SERVER_B, 8081)], ECHO).unwrap();
    let config = tempfile::tempdir().unwrap();
    istio::write(config.path(), &[&mesh(""), FAILING, TCP_TAGS]).unwrap();
    let agent = Agent::start(&topology.gateway, &args(config.path())).unwrap();

    let fetch = |port: u16| curl(&topology.workload, &["--max-time", "3", &format!("http://{SERVER_B}:{port}/")]);
    assert!(fetch(8081).is_ok(), "{}", agent.log());
    assert!(fetch(8082).is_err(), "refused by the endpoint");
    let metrics = agent.metrics().unwrap();
    let series = |name: &str| -> Vec<String> {
        metrics.lines().filter(|line| line.starts_with(&format!("{name}{{"))).map(str::to_owned).collect()
    };
    let opened = series("istio_tcp_connections_opened_total");
    let relayed = opened.iter().find(|line| line.contains("dialled_port=\"8081\"")).expect("the relayed connection");
    assert!(relayed.contains("upstream_address=\"203.0.113.20\"") && relayed.ends_with(" 1"), "{relayed}");
    assert!(relayed.contains("destination_service=\"tcp.backend\""), "the standard labels stay: {relayed}");
    let refused = opened.iter().find(|line| line.contains("dialled_port=\"8082\"")).expect("the refused connection");
    assert!(refused.contains("response_flags=\"UF\""), "{refused}");
    // The other metrics: their own overrides, or none.
    let sent = series("istio_tcp_sent_bytes_total");
    assert!(!sent.is_empty() && sent.iter().all(|line| !line.contains("response_flags=")), "{sent:?}");
    let closed = series("istio_tcp_connections_closed_total");
    assert!(
        closed.iter().all(|line| line.contains("response_flags=") && !line.contains("dialled_port=")),
        "{closed:?}"
    );
}
