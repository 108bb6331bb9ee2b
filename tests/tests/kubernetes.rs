//! The agent with `--kube`, end to end: its Kubernetes sources (the Istio kinds, the mesh ConfigMap, the pods)
//! read from an API server that answers lists and holds watches open with the JSON the API sends, served on
//! the gateway namespace's loopback, since no real API server runs on these machines.

use std::{
    collections::BTreeMap,
    io::{ErrorKind, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use serde_json::{json, Value};
use sluice_tests::{
    metrics::total,
    peers::{curl, Nginx},
    require_root,
    tls::certificates,
    topology::{GATEWAY_WORKLOAD_ADDR, GATEWAY_WORKLOAD_IFACE, SERVER_B, WORKLOAD_ADDR},
    Agent, Netns, Topology,
};

/// Answers `GET` lists from `lists` (by path), 404 for any other path, and holds every watch open (no events)
/// until dropped.
struct ApiServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl ApiServer {
    fn start(netns: &Netns, mut lists: BTreeMap<String, Value>) -> ApiServer {
        // What the agent asks first, to know the server answers.
        let version = json!({"major": "1", "minor": "31", "gitVersion": "v1.31.0", "gitCommit": "0", "gitTreeState": "clean",
            "buildDate": "2026-01-01T00:00:00Z", "goVersion": "go1.22", "compiler": "gc", "platform": "linux/amd64"});
        lists.entry("/version".into()).or_insert(version);
        let listener = netns.enter(|| TcpListener::bind("127.0.0.1:0")).unwrap().unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let (stopped, lists) = (stop.clone(), Arc::new(lists));
        std::thread::spawn(move || {
            while !stopped.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let (stopped, lists) = (stopped.clone(), lists.clone());
                        std::thread::spawn(move || serve(stream, &lists, &stopped));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        ApiServer { addr, stop }
    }

    /// A kubeconfig naming this server, written to `dir`.
    fn kubeconfig(&self, dir: &std::path::Path) -> String {
        kubeconfig(self.addr, dir)
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// One keep-alive connection: request after request until the client closes it or a watch holds it.
/// A kubeconfig naming the API server at `addr`, written to `dir`.
fn kubeconfig(addr: SocketAddr, dir: &std::path::Path) -> String {
    let path = dir.join("kubeconfig");
    let config = format!(
        "apiVersion: v1\nkind: Config\ncurrent-context: test\n\
         clusters: [{{name: test, cluster: {{server: 'http://{addr}'}}}}]\n\
         users: [{{name: test, user: {{}}}}]\n\
         contexts: [{{name: test, context: {{cluster: test, user: test, namespace: default}}}}]\n"
    );
    std::fs::write(&path, config).unwrap();
    path.to_str().unwrap().to_owned()
}

fn serve(mut stream: TcpStream, lists: &BTreeMap<String, Value>, stop: &AtomicBool) {
    let _ = stream.set_read_timeout(Some(Duration::from_millis(100)));
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    while !stop.load(Ordering::SeqCst) {
        let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") else {
            match stream.read(&mut chunk) {
                Ok(0) => return,
                Ok(n) => buffer.extend_from_slice(&chunk[..n]),
                Err(error) if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(_) => return,
            }
            continue;
        };
        let head = String::from_utf8_lossy(&buffer[..end]).into_owned();
        let body_length: usize = head
            .lines()
            .find_map(|line| line.to_ascii_lowercase().strip_prefix("content-length:").map(|n| n.trim().to_owned()))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        if buffer.len() < end + 4 + body_length {
            // The rest of a body (an Event posted) is still coming.
            match stream.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            }
            continue;
        }
        buffer.drain(..end + 4 + body_length);
        let target = head.split_whitespace().nth(1).unwrap_or("/").to_owned();
        let (path, query) = target.split_once('?').unwrap_or((&target, ""));
        if query.split('&').any(|pair| pair == "watch=true" || pair == "watch=1") {
            // Held open: nothing changes while the test runs.
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n");
            while !stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(50));
            }
            return;
        }
        let (status, body) = match (head.starts_with("GET "), lists.get(path)) {
            (true, Some(list)) => ("200 OK", list.to_string()),
            (false, _) => ("201 Created", "{}".to_owned()),
            (true, None) => (
                "404 Not Found",
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404})
                    .to_string(),
            ),
        };
        let response = format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        if stream.write_all(response.as_bytes()).is_err() {
            return;
        }
    }
}

fn list(api_version: &str, kind: &str, items: Vec<Value>) -> Value {
    json!({"apiVersion": api_version, "kind": format!("{kind}List"), "metadata": {"resourceVersion": "1"}, "items": items})
}

fn istio(kind: &str, namespace: &str, name: &str, spec: Value) -> Value {
    json!({"apiVersion": "networking.istio.io/v1", "kind": kind,
           "metadata": {"name": name, "namespace": namespace, "resourceVersion": "1", "uid": format!("{namespace}-{name}")},
           "spec": spec})
}

/// What the API serves: the mesh config (REGISTRY_ONLY), the `legacy` namespace's Sidecar (ALLOW_ANY), and the
/// workload's pod, in `legacy`.
fn cluster() -> BTreeMap<String, Value> {
    let istio_path = |plural: &str| format!("/apis/networking.istio.io/v1/{plural}");
    let mut lists = BTreeMap::new();
    for (kind, plural) in [
        ("ServiceEntry", "serviceentries"),
        ("VirtualService", "virtualservices"),
        ("Gateway", "gateways"),
        ("DestinationRule", "destinationrules"),
    ] {
        lists.insert(istio_path(plural), list("networking.istio.io/v1", kind, vec![]));
    }
    let sidecar = istio("Sidecar", "legacy", "default", json!({"outboundTrafficPolicy": {"mode": "ALLOW_ANY"}}));
    lists.insert(istio_path("sidecars"), list("networking.istio.io/v1", "Sidecar", vec![sidecar]));
    let mesh = json!({"apiVersion": "v1", "kind": "ConfigMap",
                      "metadata": {"name": "istio", "namespace": "istio-system", "resourceVersion": "1", "uid": "mesh"},
                      "data": {"mesh": "outboundTrafficPolicy:\n  mode: REGISTRY_ONLY\n"}});
    lists.insert("/api/v1/namespaces/istio-system/configmaps".into(), list("v1", "ConfigMap", vec![mesh]));
    let pod = json!({"apiVersion": "v1", "kind": "Pod",
                     "metadata": {"name": "web-7d9f", "namespace": "legacy", "labels": {"app": "web"},
                                  "resourceVersion": "1", "uid": "web-7d9f"},
                     "spec": {"containers": [{"name": "web", "image": "web"}]},
                     "status": {"phase": "Running", "podIP": WORKLOAD_ADDR, "podIPs": [{"ip": WORKLOAD_ADDR}]}});
    lists.insert("/api/v1/pods".into(), list("v1", "Pod", vec![pod]));
    // The `legacy` namespace's AuthorizationPolicies for its web workload: one enforced, one on trial (dry run).
    let policy = |name: &str, path: &str, annotations: Value| {
        json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
               "metadata": {"name": name, "namespace": "legacy", "resourceVersion": "1", "uid": name, "annotations": annotations},
               "spec": {"selector": {"matchLabels": {"app": "web"}}, "action": "DENY",
                        "rules": [{"to": [{"operation": {"paths": [path]}}]}]}})
    };
    let policies = vec![
        policy("no-forbidden", "/forbidden", json!({})),
        policy(
            "trial",
            "/trial",
            json!({"istio.io/dry-run": "true", "kubectl.kubernetes.io/last-applied-configuration": "{}"}),
        ),
    ];
    let authorization = "/apis/security.istio.io/v1/authorizationpolicies";
    lists.insert(authorization.into(), list("security.istio.io/v1", "AuthorizationPolicy", policies));
    // The web workload's own Telemetry, as its sidecar would take it: its requests logged (the mesh config logs
    // none) and counted with a team label.
    let telemetry = json!({"apiVersion": "telemetry.istio.io/v1", "kind": "Telemetry",
        "metadata": {"name": "web-telemetry", "namespace": "legacy", "resourceVersion": "1", "uid": "web-telemetry"},
        "spec": {"selector": {"matchLabels": {"app": "web"}},
                 "accessLogging": [{"providers": [{"name": "envoy"}]}],
                 "metrics": [{"providers": [{"name": "prometheus"}],
                              "overrides": [{"match": {"metric": "REQUEST_COUNT"},
                                             "tagOverrides": {"team": {"value": "'web-team'"}}}]}]}});
    lists.insert(
        "/apis/telemetry.istio.io/v1/telemetries".into(),
        list("telemetry.istio.io/v1", "Telemetry", vec![telemetry]),
    );
    lists
}

#[test]
fn a_pods_own_sidecar_mode_applies_to_its_traffic_in_the_proxy_and_in_the_kernel() {
    require_root();
    let topology = Topology::new().unwrap();
    let server_b = |port| SocketAddr::new(SERVER_B.parse().unwrap(), port);
    let _nginx = Nginx::start(&topology.internet, &[server_b(80), server_b(8081)], "$server_addr").unwrap();
    // A second address in the workload namespace that no pod has: a source the mesh's mode applies to.
    topology.workload.ip(&["addr", "add", "10.240.1.3/24", "dev", "wl0"]).unwrap();
    let api = ApiServer::start(&topology.gateway, cluster());
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = api.kubeconfig(dir.path());
    let args = format!(
        "--kube --intercept {GATEWAY_WORKLOAD_IFACE} --intercept-port 80 --intercept-port 443 --blackhole reject"
    );
    let agent = Agent::start_with_env(&topology.gateway, &args, &[("KUBECONFIG", &kubeconfig)]).unwrap();

    // Not registered anywhere, on a port the kernel decides alone.
    let opaque = format!("http://{SERVER_B}:8081/");
    let from_pod = || curl(&topology.workload, &["--max-time", "2", "--interface", WORKLOAD_ADDR, &opaque]);
    // The pods are listed beside the configuration: wait for the pod's mode to reach the kernel.
    let deadline = Instant::now() + Duration::from_secs(10);
    while from_pod().is_err() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(from_pod().unwrap().trim(), SERVER_B, "the pod's Sidecar says ALLOW_ANY\n{}", agent.log());
    let other = curl(&topology.workload, &["--max-time", "2", "--interface", "10.240.1.3", &opaque]);
    assert!(other.is_err(), "another source has the mesh's REGISTRY_ONLY: {other:?}");

    // The proxy too: an unregistered host passes through for the pod, labelled with its workload.
    let resolve = format!("edition.cnn.com:80:{SERVER_B}");
    let status = curl(
        &topology.workload,
        &["-o", "/dev/null", "-w", "%{http_code}", "--resolve", &resolve, "http://edition.cnn.com:80/"],
    );
    assert_eq!(status.unwrap(), "200", "passed through, not blackholed (502)\n{}", agent.log());
    let metrics = agent.metrics().unwrap();
    let line = metrics
        .lines()
        .find(|line| line.starts_with("istio_requests_total{") && line.contains("PassthroughCluster"))
        .unwrap_or_else(|| panic!("{metrics}"));
    assert!(
        line.contains("source_workload=\"web\"") && line.contains("source_workload_namespace=\"legacy\""),
        "{line}"
    );
    // The workload's Telemetry: its request logged and its series labelled; a source no pod has keeps the
    // gateway's (no log, Istio's labels).
    assert!(line.contains("team=\"web-team\""), "{line}");
    agent.wait_for_log("\"GET / HTTP/1.1\" 200 - via_upstream", 1).unwrap();
    let unregistered = curl(
        &topology.workload,
        &[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--interface",
            "10.240.1.3",
            "--resolve",
            &resolve,
            "http://edition.cnn.com:80/other",
        ],
    );
    assert_eq!(unregistered.unwrap(), "502", "the mesh's REGISTRY_ONLY for a source no pod has");
    let metrics = agent.metrics().unwrap();
    let refused = metrics
        .lines()
        .find(|line| line.starts_with("istio_requests_total{") && line.contains("response_code=\"502\""));
    assert!(refused.is_some_and(|line| !line.contains("team=")), "{metrics}");

    // The namespace's AuthorizationPolicies select the pod by its labels: one denies, the dry run only counts.
    let get = |path: &str| {
        let url = format!("http://edition.cnn.com:80{path}");
        let args = ["-w", "\n%{http_code}", "--interface", WORKLOAD_ADDR, "--resolve", &resolve, &url];
        curl(&topology.workload, &args).unwrap()
    };
    assert_eq!(get("/forbidden"), "RBAC: access denied\n403", "{}", agent.log());
    assert!(get("/trial").ends_with("\n200"));
    let metrics = agent.metrics().unwrap();
    let count = |labels: &[(&str, &str)]| total(&metrics, "sluice_authorization_decisions_total", labels);
    assert_eq!(count(&[("policy", "legacy/no-forbidden"), ("result", "denied")]), 1, "{metrics}");
    assert_eq!(count(&[("policy", "legacy/trial"), ("result", "dry_run_denied")]), 1, "{metrics}");
    // The web workload's later requests are logged; the other source's request never was.
    agent.wait_for_log("\"GET /trial HTTP/1.1\" 200", 1).unwrap();
    assert!(!agent.log().contains("GET /other "), "{}", agent.log());
    // A TLS connection is the workload's too: decided by its name, denied (the namespace's DENY rules' HTTP fields
    // do not narrow them for TLS, as in Istio), its line written as the workload's Telemetry says, with the
    // network RBAC filter's termination details.
    let tls = ["--max-time", "2", "-k", "--interface", WORKLOAD_ADDR, "--resolve", "tls.example:443:203.0.113.20"];
    assert!(curl(&topology.workload, &[&tls[..], &["https://tls.example/"]].concat()).is_err());
    agent.wait_for_log("\"- - -\" 0 - - rbac_access_denied_matched_policy[legacy/no-forbidden] \"-\"", 1).unwrap();
}

#[test]
fn a_gateway_server_presents_the_certificate_of_the_secret_its_credential_name_names() {
    use base64::Engine;
    require_root();
    let topology = Topology::new().unwrap();
    let _backend =
        Nginx::start(&topology.internet, &[SocketAddr::new(SERVER_B.parse().unwrap(), 80)], "backend").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = certificates(dir.path(), "secret-ca", &["api.internal"]);
    let encoded = |path: &str| base64::engine::general_purpose::STANDARD.encode(std::fs::read(path).unwrap());
    let mut lists = cluster();
    let secret = json!({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
                        "metadata": {"name": "api-cert", "namespace": "istio-system", "resourceVersion": "1", "uid": "api-cert"},
                        "data": {"tls.crt": encoded(&cert), "tls.key": encoded(&key)}});
    let token = json!({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                       "metadata": {"name": "unrelated", "namespace": "istio-system", "resourceVersion": "1", "uid": "unrelated"},
                       "data": {"password": encoded(&cert)}});
    lists.insert("/api/v1/namespaces/istio-system/secrets".into(), list("v1", "Secret", vec![secret, token]));
    let gateway = istio(
        "Gateway",
        "istio-system",
        "terminating",
        json!({
        "selector": {"istio": "egressgateway"},
        "servers": [{"port": {"number": 8443, "name": "https", "protocol": "HTTPS"}, "hosts": ["api.internal"],
                     "tls": {"mode": "SIMPLE", "credentialName": "api-cert"}}]}),
    );
    let route = istio(
        "VirtualService",
        "istio-system",
        "api",
        json!({
        "hosts": ["api.internal"], "gateways": ["terminating"],
        "http": [{"route": [{"destination": {"host": "backend.example", "port": {"number": 80}}}]}]}),
    );
    let backend = istio(
        "ServiceEntry",
        "istio-system",
        "backend",
        json!({
        "hosts": ["backend.example"], "ports": [{"number": 80, "name": "http", "protocol": "HTTP"}],
        "endpoints": [{"address": SERVER_B}], "resolution": "STATIC"}),
    );
    let istio_path = |plural: &str| format!("/apis/networking.istio.io/v1/{plural}");
    lists.insert(istio_path("gateways"), list("networking.istio.io/v1", "Gateway", vec![gateway]));
    lists.insert(istio_path("virtualservices"), list("networking.istio.io/v1", "VirtualService", vec![route]));
    lists.insert(istio_path("serviceentries"), list("networking.istio.io/v1", "ServiceEntry", vec![backend]));
    let api = ApiServer::start(&topology.gateway, lists);
    let kubeconfig = api.kubeconfig(dir.path());
    let args = format!(
        "--kube --gateway-namespace istio-system --intercept {GATEWAY_WORKLOAD_IFACE} --allow-cidr {GATEWAY_WORKLOAD_ADDR}/32"
    );
    let agent = Agent::start_with_env(&topology.gateway, &args, &[("KUBECONFIG", &kubeconfig)]).unwrap();
    agent.wait_for_log("gateway listener open", 1).unwrap();

    // The Secret is listed beside the configuration: its certificate is served once both are.
    let url = "https://api.internal:8443/";
    let resolve = format!("api.internal:8443:{GATEWAY_WORKLOAD_ADDR}");
    let fetch = || curl(&topology.workload, &["--max-time", "2", "--cacert", &ca, "--resolve", &resolve, url]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while fetch().is_err() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(fetch().unwrap().trim(), "backend", "{}", agent.log());
}

#[test]
fn an_api_server_that_does_not_answer_stops_the_start_with_one_line() {
    require_root();
    let topology = Topology::new().unwrap();
    // A port nothing listens on, in the gateway's namespace.
    let closed = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = kubeconfig(closed, dir.path());
    let bpffs = sluice_tests::agent::Bpffs::mount().unwrap();
    let started = Instant::now();
    let output = topology
        .gateway
        .command(sluice_tests::agent::binary().to_str().unwrap())
        .args(["run", "--kube", "--kube-connect-timeout", "2s", "--intercept", GATEWAY_WORKLOAD_IFACE])
        .args(["--metrics-addr", "127.0.0.1:0", "--bpffs"])
        .arg(bpffs.pin_dir())
        .env("KUBECONFIG", &kubeconfig)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(!output.status.success(), "{text}");
    assert!(started.elapsed() < Duration::from_secs(10), "stopped after the timeout: {:?}", started.elapsed());
    let errors: Vec<&str> = text.lines().filter(|line| line.contains("ERROR")).collect();
    assert_eq!(errors.len(), 1, "{text}");
    let expected = format!("--kube: the Kubernetes API server at http://{closed}/ does not answer");
    assert!(errors[0].contains(&expected) && errors[0].contains("--kube-connect-timeout"), "{text}");
    assert!(!bpffs.pin_dir().exists(), "nothing was loaded");
}
