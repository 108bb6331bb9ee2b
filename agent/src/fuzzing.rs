//! What the fuzz targets (`fuzz/`, `cargo xtask fuzz`) feed arbitrary bytes to: the parsers and encoders that
//! take what a hostile workload or a careless operator writes. Each entry point must return for every input —
//! no panic, no unbounded work — and the committed seeds and every input a fuzzer found are replayed through
//! them by `cargo test` (`tests/tests/fuzz_regressions.rs`).

use std::{
    net::{Ipv4Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use crate::{
    config::{mesh::MeshConfig, resolver::Resolved, sources::files::Loaded, sources::yaml, Snapshot},
    datapath::BlockedFlow,
    policy::{
        bindings::bind,
        compile::{datapath_policy, mesh_mode, NodeSettings},
        routes::{proxy_policy, ProxySettings},
        sidecars::SidecarModes,
        telemetry::GatewayTelemetry,
    },
    proxy::{
        detect,
        l4::client_hello,
        routing::{self, Listener},
        upstreams::http1::{against_hyper, head},
    },
    telemetry::{
        access_log::AccessLog,
        requests::{RequestRecord, RequestTelemetry},
    },
};

/// What a fuzz target calls with each input.
pub type Target = fn(&[u8]);

/// The fuzz targets, by name (`cargo xtask fuzz NAME`), with what each takes.
pub const TARGETS: [(&str, Target); 6] = [
    ("configuration", configuration),
    ("first_bytes", first_bytes),
    ("routing", routing),
    ("access_log", access_log),
    ("datapath_event", datapath_event),
    ("upstream_response", upstream_response),
];

/// Istio documents (a YAML stream) → validation → every compiled form: the kernel's policy, the bindings, the
/// proxy's routes.
pub fn configuration(bytes: &[u8]) {
    let snapshot = snapshot(bytes);
    compile(&snapshot);
}

/// What an HTTP/1.1 upstream answers, read by Sluice's own code and by hyper's client, which must agree on the
/// status, headers, body and trailers or both refuse it: `FLAGS PIECE RESPONSE…` (a HEAD request when FLAGS is
/// odd, else a GET; the upstream sends PIECE bytes at a time, at least one).
pub fn upstream_response(bytes: &[u8]) {
    let [flags, piece, response @ ..] = bytes else { return };
    let method = if flags % 2 == 1 { http::Method::HEAD } else { http::Method::GET };
    let (native, hyper) = against_hyper::both_readings(&method, response, usize::from(*piece));
    // Heads past Envoy's 60 KiB limit are refused by Sluice, taken by hyper (up to about 400 KiB).
    if response.len() < head::MAX_RESPONSE_HEAD_BYTES {
        assert_eq!(native, hyper, "Sluice and hyper read {:?} differently", String::from_utf8_lossy(response));
    }
}

/// The first bytes of an intercepted connection: protocol detection and the ClientHello reader.
pub fn first_bytes(bytes: &[u8]) {
    let _ = detect::classify(bytes);
    if let client_hello::Hello::Complete { len, .. } = client_hello::parse(bytes) {
        assert!(len <= bytes.len(), "a hello cannot span more bytes than were read");
    }
}

/// A request built from the input against a policy built from it: `YAML \0 METHOD \0 AUTHORITY \0 PATH
/// \0 NAME: VALUE\n…`.
pub fn routing(bytes: &[u8]) {
    let mut parts = bytes.splitn(5, |byte| *byte == 0);
    let (config, method, authority, path, headers) =
        (parts.next(), parts.next(), parts.next(), parts.next(), parts.next());
    let snapshot = snapshot(config.unwrap_or_default());
    let policy = compile(&snapshot);
    let mut request = http::Request::builder();
    if let Some(method) = method.and_then(|method| http::Method::from_bytes(method).ok()) {
        request = request.method(method);
    }
    if let Some(path) = path.and_then(|path| http::Uri::try_from(path).ok()) {
        request = request.uri(path);
    }
    for line in headers.unwrap_or_default().split(|byte| *byte == b'\n') {
        let Some(colon) = line.iter().position(|byte| *byte == b':') else { continue };
        let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
        if let (Ok(name), Ok(value)) = (http::HeaderName::from_bytes(name), http::HeaderValue::from_bytes(value)) {
            request = request.header(name, value);
        }
    }
    let Ok(request) = request.body(()) else { return };
    let authority = String::from_utf8_lossy(authority.unwrap_or_default());
    let local = SocketAddr::from((Ipv4Addr::new(203, 0, 113, 10), 80));
    for listener in [Listener::Mesh, Listener::Forward, Listener::Gateway(80)] {
        let _ = routing::decide(&policy, &request, &authority, listener, local, None, 7);
    }
}

/// An access-log format (the mesh config's `accessLogFormat`, text and JSON) rendering a request whose fields
/// came from a client, and the metric series those fields label: `FORMAT \0 METHOD \0 AUTHORITY \0 PATH \0
/// USER-AGENT \0 WORKLOAD`.
pub fn access_log(bytes: &[u8]) {
    let mut parts = bytes.splitn(6, |byte| *byte == 0).map(String::from_utf8_lossy);
    let mut next = || parts.next().unwrap_or_default().into_owned();
    let (format, method, authority, path, user_agent, workload) = (next(), next(), next(), next(), next(), next());
    // As hyper hands them over: a method and path it parsed, header values with any byte but controls.
    let value = |text: &str| http::HeaderValue::from_bytes(text.as_bytes()).ok();
    let record = RequestRecord {
        method: http::Method::from_bytes(method.as_bytes()).ok(),
        authority: value(&authority),
        path: http::uri::PathAndQuery::try_from(path.as_str()).ok(),
        user_agent: value(&user_agent),
        x_forwarded_for: value(&workload),
        request_id: value(&format),
        response_code: 200,
        duration: Duration::from_millis(3),
        source_workload: Some(Arc::<str>::from(workload.as_str()).into()),
        source_workload_namespace: Some(Arc::<str>::from(workload).into()),
        ..RequestRecord::default()
    };
    let quoted = serde_json::to_string(&format).unwrap_or_default();
    for encoding in ["TEXT", "JSON"] {
        let mesh = format!("accessLogFile: /dev/null\naccessLogEncoding: {encoding}\naccessLogFormat: {quoted}\n");
        let Ok(mesh) = MeshConfig::from_mesh_yaml(&mesh) else { continue };
        if !mesh.validate("").is_empty() {
            continue;
        }
        let log = AccessLog::compile(&mesh, None, &GatewayTelemetry::default());
        if let Some(line) = log.request_line(&record) {
            if encoding == "JSON" {
                serde_json::from_str::<serde_json::Value>(&line).expect("a JSON access-log line is JSON");
            }
        }
    }
    let mut registry = prometheus_client::registry::Registry::default();
    let telemetry = RequestTelemetry::start(&mut registry, AccessLog::default());
    telemetry.record(&record);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).expect("encoding metrics");
    let _ = crate::telemetry::server::prometheus_text(&text);
}

/// A record the classifier sends the agent through its ring buffer.
pub fn datapath_event(bytes: &[u8]) {
    if let Some(flow) = BlockedFlow::decode(bytes) {
        let _ = format!("{flow:?}");
    }
}

/// The resources and mesh config the input's YAML documents hold, each validated as the files' are.
fn snapshot(bytes: &[u8]) -> Snapshot {
    let mut loaded = Loaded::default();
    yaml::documents(&String::from_utf8_lossy(bytes), |document| {
        if let Ok(document) = document {
            loaded.add("fuzz", document);
        }
    });
    loaded.snapshot
}

/// Everything the agent compiles from a configuration; the proxy's routes are returned.
fn compile(snapshot: &Snapshot) -> crate::policy::routes::ProxyPolicy {
    let node = NodeSettings { proxy_port: 15001, ..NodeSettings::default() };
    let resolved = Resolved::default();
    let _ = datapath_policy(snapshot, &resolved, &node);
    let labels = [("istio".to_owned(), "egressgateway".to_owned())].into();
    let bindings = bind(snapshot, &labels);
    let sidecars = Arc::new(SidecarModes::compile(snapshot, mesh_mode(snapshot, &node)));
    let settings = ProxySettings { gateway_labels: labels, ..ProxySettings::default() };
    proxy_policy(snapshot, &resolved, &bindings, sidecars, &settings, &Default::default())
}
