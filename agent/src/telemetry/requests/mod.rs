//! What each proxied request leaves behind: Istio's standard request metrics (so existing dashboards work) and
//! one access-log line in Envoy's default format (or JSON), written off the request path.

use std::{
    collections::HashMap,
    sync::{Arc, PoisonError},
    time::Duration,
};

use arc_swap::ArcSwap;
use prometheus_client::{
    encoding::{EncodeLabel, EncodeLabelSet, LabelSetEncoder},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use super::{
    access_log::{writer::Sink, AccessLog},
    connections::ConnectionMetrics,
    passthrough::Watched,
    recent::{self, RecentSeries},
    response_flags::ResponseFlag,
    scopes::{Scope, WorkloadScopes},
    switches::{Metric, MetricSwitches},
    tags::{TagOverrides, Tags},
};
use crate::{
    config::workloads::Workload,
    policy::labels::{DestinationLabels, LabelText, UNKNOWN},
};

mod in_force;
mod lines;
mod record;
pub use in_force::TelemetryInForce;
use lines::LineQueue;
pub use lines::{json_line, rfc3339_millis, text_line, write_rfc3339_millis};
pub use record::{ConnectionSecurity, Principal, RequestRecord};

type Label = LabelText;

/// Istio's standard labels (those Sluice can know; the rest read `unknown`, as Istio writes them), and what the
/// Telemetry API's tag overrides made of them.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct RequestLabels {
    pub reporter: Label,
    pub source_workload: Label,
    pub source_workload_namespace: Label,
    pub source_principal: Label,
    pub destination_workload: Label,
    pub destination_workload_namespace: Label,
    pub destination_principal: Label,
    pub destination_service: Label,
    pub destination_service_name: Label,
    pub destination_service_namespace: Label,
    pub request_protocol: Label,
    pub response_code: Label,
    pub grpc_response_status: Label,
    pub response_flags: Label,
    pub connection_security_policy: Label,
    pub tags: Tags,
}

/// The standard labels' names, in the order of `RequestLabels`' fields.
pub const REQUEST_LABEL_NAMES: [&str; 15] = [
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "request_protocol",
    "response_code",
    "grpc_response_status",
    "response_flags",
    "connection_security_policy",
];

impl RequestLabels {
    fn standard(&self) -> [&Label; REQUEST_LABEL_NAMES.len()] {
        [
            &self.reporter,
            &self.source_workload,
            &self.source_workload_namespace,
            &self.source_principal,
            &self.destination_workload,
            &self.destination_workload_namespace,
            &self.destination_principal,
            &self.destination_service,
            &self.destination_service_name,
            &self.destination_service_namespace,
            &self.request_protocol,
            &self.response_code,
            &self.grpc_response_status,
            &self.response_flags,
            &self.connection_security_policy,
        ]
    }
}

/// The standard labels the tags leave in, then the labels they set.
impl EncodeLabelSet for RequestLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        for (i, (name, value)) in REQUEST_LABEL_NAMES.iter().zip(self.standard()).enumerate() {
            if self.tags.left_out & (1 << i) == 0 {
                (*name, value.clone()).encode(encoder.encode_label())?;
            }
        }
        for (name, value) in self.tags.set.iter().flat_map(|set| set.iter()) {
            (&**name, value.clone()).encode(encoder.encode_label())?;
        }
        Ok(())
    }
}

/// Istio's duration buckets, in milliseconds.
const DURATION_BUCKETS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0, 60000.0, 300000.0,
    600000.0, 1800000.0, 3600000.0,
];
/// Istio's size buckets, in bytes.
const SIZE_BUCKETS: [f64; 8] = [1.0, 10.0, 100.0, 1000.0, 10000.0, 100000.0, 1000000.0, 10000000.0];

/// The request metrics, registered under Istio's names.
#[derive(Clone)]
pub struct RequestMetrics {
    requests: Family<RequestLabels, Counter>,
    duration: Family<RequestLabels, Histogram>,
    request_bytes: Family<RequestLabels, Histogram>,
    response_bytes: Family<RequestLabels, Histogram>,
    /// Each kind of request's four series, found with one lookup by what varies between requests, its shared
    /// texts by address (held by the entry).
    recent: Arc<RecentSeries<SeriesKey, Series, [LabelText; SHARED_TEXTS]>>,
    /// The series of destinations passed through unregistered, whose labels come from clients: dropped once
    /// unused for a while (`sweep`), so that the passthrough series cap holds the destinations in use. By the
    /// four metrics' labels (which tag overrides may make differ).
    passthrough: Arc<std::sync::Mutex<HashMap<[RequestLabels; 4], Watched>>>,
}

/// A request's series as `RequestMetrics::recent` knows it: the addresses of its label texts (the source
/// workload and namespace, the destination service, name and namespace), and its code, flags and protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct SeriesKey {
    texts: [(usize, usize); SHARED_TEXTS],
    response_code: u16,
    response_flags: ResponseFlag,
    grpc: bool,
    connection_security: ConnectionSecurity,
}

impl SeriesKey {
    fn of(record: &RequestRecord) -> SeriesKey {
        SeriesKey {
            texts: shared_texts(record).map(|text| recent::address(text.as_str())),
            response_code: record.response_code,
            response_flags: record.response_flags,
            grpc: record.grpc,
            connection_security: record.connection_security,
        }
    }
}

const SHARED_TEXTS: usize = 6;

/// The label texts of `record` that are shared between requests (`unknown` where it has none): the source
/// workload, namespace and principal (the client connection's), the destination service, name and namespace (the
/// policy's).
fn shared_texts(record: &RequestRecord) -> [&LabelText; SHARED_TEXTS] {
    let destination = record.destination.as_ref();
    [
        record.source_workload.as_ref(),
        record.source_workload_namespace.as_ref(),
        record.source_principal.as_ref(),
        destination.map(|d| &d.service),
        destination.map(DestinationLabels::name),
        destination.map(|d| &d.namespace),
    ]
    .map(|text| text.unwrap_or(&UNKNOWN))
}

/// The four series one request updates.
struct Series {
    requests: Counter,
    duration: Histogram,
    request_bytes: Histogram,
    response_bytes: Histogram,
}

impl RequestMetrics {
    pub fn register(registry: &mut Registry, switches: &MetricSwitches) -> RequestMetrics {
        let metrics = RequestMetrics {
            requests: Family::default(),
            duration: Family::new_with_constructor(|| Histogram::new(DURATION_BUCKETS.iter().copied())),
            request_bytes: Family::new_with_constructor(|| Histogram::new(SIZE_BUCKETS.iter().copied())),
            response_bytes: Family::new_with_constructor(|| Histogram::new(SIZE_BUCKETS.iter().copied())),
            recent: Arc::default(),
            passthrough: Arc::default(),
        };
        let requests = switches.wrap(Metric::RequestCount, metrics.requests.clone());
        registry.register("istio_requests", "Requests proxied, by Istio's standard labels", requests);
        let duration = switches.wrap(Metric::RequestDuration, metrics.duration.clone());
        registry.register("istio_request_duration_milliseconds", "Request durations in milliseconds", duration);
        let request_bytes = switches.wrap(Metric::RequestSize, metrics.request_bytes.clone());
        registry.register("istio_request_bytes", "Request body sizes in bytes", request_bytes);
        let response_bytes = switches.wrap(Metric::ResponseSize, metrics.response_bytes.clone());
        registry.register("istio_response_bytes", "Response body sizes in bytes", response_bytes);
        metrics
    }

    /// Drops the passthrough series that counted no request in the last `quiet_sweeps` sweeps: returns their
    /// destinations' names.
    fn sweep(&self, quiet_sweeps: u32) -> Vec<String> {
        let mut watched = self.passthrough.lock().unwrap_or_else(PoisonError::into_inner);
        let stale = super::passthrough::stale(&mut watched, quiet_sweeps);
        if stale.is_empty() {
            return Vec::new();
        }
        // The fast path's cache holds the series too: emptied, so that no request counts in a dropped one.
        self.recent.clear();
        for [requests, duration, request_bytes, response_bytes] in &stale {
            self.requests.remove(requests);
            self.duration.remove(duration);
            self.request_bytes.remove(request_bytes);
            self.response_bytes.remove(response_bytes);
        }
        stale.iter().map(|labels| labels[0].destination_service.as_str().to_owned()).collect()
    }

    /// The passed-through destinations that still have request series.
    fn passthrough_in_use(&self) -> std::collections::HashSet<String> {
        let watched = self.passthrough.lock().unwrap_or_else(PoisonError::into_inner);
        watched.keys().map(|labels| labels[0].destination_service.as_str().to_owned()).collect()
    }

    /// The series `record` counts in.
    fn series_of(&self, record: &RequestRecord) -> Arc<Series> {
        self.recent.find_or_make(SeriesKey::of(record), || {
            let labels = labels_of(record);
            let series = self.series_labelled(record, [labels.clone(), labels.clone(), labels.clone(), labels]);
            (series, shared_texts(record).map(LabelText::clone))
        })
    }

    /// The series `record` counts in under tag overrides: labelled per metric, each time (the values the
    /// overrides set vary with the request, so they cannot be found by the texts' addresses).
    fn tagged_series_of(&self, record: &RequestRecord, overrides: &TagOverrides) -> Arc<Series> {
        let labels = labels_of(record);
        let tagged = super::access_log::with_request_fields(record, |fields| {
            std::array::from_fn(|metric| RequestLabels { tags: overrides.tags(metric, fields), ..labels.clone() })
        });
        self.series_labelled(record, tagged)
    }

    /// The four series of `record`, labelled (in the order of `Metric`): a passed-through destination's watched
    /// for the sweep.
    fn series_labelled(&self, record: &RequestRecord, labels: [RequestLabels; 4]) -> Arc<Series> {
        let [requests, duration, request_bytes, response_bytes] = &labels;
        let series = Arc::new(Series {
            requests: self.requests.get_or_create(requests).clone(),
            duration: self.duration.get_or_create(duration).clone(),
            request_bytes: self.request_bytes.get_or_create(request_bytes).clone(),
            response_bytes: self.response_bytes.get_or_create(response_bytes).clone(),
        });
        if record.destination.as_ref().is_some_and(DestinationLabels::is_passthrough) {
            let counter = series.requests.clone();
            let mut watched = self.passthrough.lock().unwrap_or_else(PoisonError::into_inner);
            watched.entry(labels).or_insert_with(|| Watched::new(counter));
        }
        series
    }
}

/// What the configuration asks of the request telemetry: the access log, the metrics the Telemetry API turns
/// off (`REQUEST_COUNT`…), its tag overrides, and the Telemetry that scopes to workloads.
#[derive(Default)]
pub struct TelemetryConfig {
    pub access_log: AccessLog,
    pub disabled_metrics: Vec<&'static str>,
    pub tags: TagOverrides,
    pub scopes: WorkloadScopes,
}

/// The access log's line format, as the command line overrides the mesh config's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AccessLogFormat {
    /// Envoy's default text format.
    Text,
    /// One JSON object per line, Envoy's field names.
    Json,
    /// No access log (Istio's default when `accessLogFile` is unset); metrics are still recorded.
    Off,
}

/// Access-log lines queued for the writer at most, and their bytes at most (a line can be tens of KiB: a long
/// URI, a user agent): past either, lines are dropped and counted rather than slow a request or fill memory.
const ACCESS_LOG_QUEUE_LINES: usize = 16_384;
const ACCESS_LOG_QUEUE_BYTES: usize = 4 << 20;
/// How long the writer leaves lines to gather after writing a batch: at most this late, a line is written. Short
/// enough that a batch is small: the writer shares the proxy's CPU, and a long burst of writes holds requests up
/// (20 ms batches doubled the p99 of a saturated proxy; bench/README.md).
const ACCESS_LOG_BATCH_INTERVAL: Duration = Duration::from_millis(2);

/// Records ended requests: metrics at once, access-log lines through a bounded queue to a writer task (a full
/// queue drops the line and counts it, never slows a request).
#[derive(Clone)]
pub struct RequestTelemetry {
    metrics: RequestMetrics,
    /// Istio's TCP metrics, for the connections relayed without reading them.
    pub tcp: ConnectionMetrics,
    lines: LineQueue,
    /// The access log, tag overrides and workload-scoped Telemetry in force: replaced whole when the configuration
    /// changes, read once per request.
    in_force: Arc<ArcSwap<TelemetryInForce>>,
    /// Where the writer writes: the gateway's access log's file, else the one workload-scoped logs write to.
    destination: Arc<ArcSwap<Option<std::path::PathBuf>>>,
    /// Which of Istio's metrics the Telemetry API turned off.
    switches: MetricSwitches,
    dropped_lines: Counter,
    host_mismatches: Family<[(&'static str, &'static str); 1], Counter>,
    connections_refused: Counter,
    /// Work shed while overloaded (`--max-memory`), by what (request, connection), and whether it is now.
    overload_shed: Family<[(&'static str, &'static str); 1], Counter>,
    overloaded: Gauge,
    client_hellos_refused: Family<[(&'static str, &'static str); 1], Counter>,
    handshakes_failed: Family<[(&'static str, &'static str); 1], Counter>,
    authorization: Family<[(&'static str, Label); 3], Counter>,
    /// Every request and connection decided, for `sluice observe`, while someone watches.
    flows: super::flows::FlowStream,
}

impl RequestTelemetry {
    /// Starts the access-log writer (standard output, as Envoy's `/dev/stdout`).
    pub fn start(registry: &mut Registry, access_log: AccessLog) -> RequestTelemetry {
        let switches = MetricSwitches::default();
        let metrics = RequestMetrics::register(registry, &switches);
        let tcp = ConnectionMetrics::register(registry, &switches);
        let dropped_lines = Counter::default();
        registry.register(
            "sluice_access_log_dropped_lines",
            "Access-log lines dropped because the writer fell behind",
            dropped_lines.clone(),
        );
        let host_mismatches = Family::default();
        registry.register(
            "sluice_host_mismatch",
            "Intercepted requests whose Host is registered at other addresses than the one connected to, by what \
             became of them (refused, routed, trusted)",
            host_mismatches.clone(),
        );
        let connections_refused = Counter::default();
        registry.register(
            "sluice_proxy_connections_refused",
            "Client connections reset at accept because --max-connections were open",
            connections_refused.clone(),
        );
        let overload_shed = Family::default();
        registry.register(
            "sluice_overload_shed",
            "New work the proxy shed while past --max-memory, by what: requests (answered 503, flag OM) and relayed \
             connections or TLS handshakes (reset)",
            overload_shed.clone(),
        );
        let overloaded = Gauge::default();
        registry.register(
            "sluice_overload_active",
            "1 while the proxy is past --max-memory and sheds new work, else 0",
            overloaded.clone(),
        );
        let client_hellos_refused = Family::default();
        registry.register(
            "sluice_tls_client_hello_refused",
            "TLS connections to pass through (intercepted, or on a Gateway's PASSTHROUGH port) closed before a \
             decision because their ClientHello was not read, by why (malformed, timeout, closed, not_tls)",
            client_hellos_refused.clone(),
        );
        let handshakes_failed = Family::default();
        registry.register(
            "sluice_tls_handshake_failed",
            "Connections to Gateway servers terminating TLS that ended before their requests, by why (no_server, \
             unusable_server, no_client_certificate, bad_client_certificate, client_certificate_name, \
             client_certificate_pin, handshake, timeout, and the ClientHello's malformed, closed, not_tls)",
            handshakes_failed.clone(),
        );
        let authorization = Family::default();
        registry.register(
            "sluice_authorization_decisions",
            "Requests and connections decided by AuthorizationPolicies, by deciding policy (none: ALLOW policies \
             applied and none matched), action and result (allowed, denied; dry_run_allowed, dry_run_denied and \
             audited for policies decided but not enforced)",
            authorization.clone(),
        );
        let (lines, mut queue) = LineQueue::new(ACCESS_LOG_QUEUE_LINES, ACCESS_LOG_QUEUE_BYTES);
        let destination = Arc::new(ArcSwap::from_pointee(access_log.file.clone()));
        let in_force = TelemetryInForce::new(access_log, TagOverrides::default(), WorkloadScopes::default());
        let in_force = Arc::new(ArcSwap::from_pointee(in_force));
        // A thread of its own: writes block, and lines are written in batches, flushed whenever the queue runs
        // dry. A line that cannot be written is counted as dropped.
        let (log, dropped) = (destination.clone(), dropped_lines.clone());
        let writer = std::thread::Builder::new().name("access-log".into()).spawn(move || {
            let mut sink = Sink::default();
            let mut failing = false;
            while let Some(line) = queue.blocking_next() {
                if !sink.ready(log.load().as_deref()) {
                    dropped.inc();
                    continue;
                }
                let mut written = sink.write(&line);
                while let (Ok(()), Some(line)) = (&written, queue.try_next()) {
                    written = sink.write(&line);
                }
                match written.and_then(|()| sink.flush()) {
                    Ok(()) => failing = false,
                    Err(error) => {
                        dropped.inc();
                        if !std::mem::replace(&mut failing, true) {
                            tracing::error!(%error, "writing the access log; lines are dropped until it works again");
                        }
                    }
                }
                // Not waiting on the queue for a while: requests queue their lines without waking this thread
                // (a wake-up per line cost more than the line), and the next batch is written in one go.
                std::thread::sleep(ACCESS_LOG_BATCH_INTERVAL);
            }
        });
        if let Err(error) = writer {
            tracing::error!(%error, "starting the access-log writer; access-log lines will be dropped");
        }
        RequestTelemetry {
            metrics,
            tcp,
            lines,
            in_force,
            destination,
            switches,
            dropped_lines,
            host_mismatches,
            connections_refused,
            overload_shed,
            overloaded,
            client_hellos_refused,
            handshakes_failed,
            authorization,
            flows: Default::default(),
        }
    }

    /// Where requests, connections and the kernel's blocked flows are published for `sluice observe`.
    pub fn flows(&self) -> &super::flows::FlowStream {
        &self.flows
    }

    /// Counts what AuthorizationPolicies decided of a request or connection (nothing when none applied).
    pub fn authorization(&self, verdict: &crate::policy::authorization::Verdict) {
        use crate::config::authorization_policy::Action;
        let action_label = |action: Action| {
            LabelText::Static(match action {
                Action::Allow => &"ALLOW",
                Action::Deny => &"DENY",
                Action::Audit => &"AUDIT",
            })
        };
        let count = |policy: Label, action: Label, result: &'static &'static str| {
            let labels = [("policy", policy), ("action", action), ("result", LabelText::Static(result))];
            self.authorization.get_or_create(&labels).inc();
        };
        if verdict.governed {
            let result = if verdict.denied { &"denied" } else { &"allowed" };
            match &verdict.policy {
                Some((policy, action)) => count(LabelText::Shared(policy.clone()), action_label(*action), result),
                None => count(LabelText::Static(&"none"), LabelText::Static(&"ALLOW"), result),
            }
        }
        for (policy, action, matched) in &verdict.reported {
            let result = match (action, matched) {
                (Action::Audit, true) => &"audited",
                (Action::Audit, false) => continue,
                (Action::Deny, true) | (Action::Allow, false) => &"dry_run_denied",
                (Action::Deny, false) | (Action::Allow, true) => &"dry_run_allowed",
            };
            count(LabelText::Shared(policy.clone()), action_label(*action), result);
        }
    }

    /// Drops the series of destinations passed through unregistered that saw no request or connection in the last
    /// `quiet_sweeps` sweeps, and gives their places under `--max-passthrough-series` back. Returns how many
    /// destinations lost their series.
    pub fn sweep_passthrough(&self, quiet_sweeps: u32) -> usize {
        let mut stale = self.metrics.sweep(quiet_sweeps);
        stale.extend(self.tcp.sweep(quiet_sweeps));
        if stale.is_empty() {
            return 0;
        }
        let mut in_use = self.metrics.passthrough_in_use();
        in_use.extend(self.tcp.passthrough_in_use());
        stale.sort();
        stale.dedup();
        stale.retain(|name| !in_use.contains(name));
        for name in &stale {
            super::passthrough::release_passthrough(name);
        }
        stale.len()
    }

    /// Counts a client connection refused at `--max-connections`.
    pub fn connection_refused(&self) {
        self.connections_refused.inc();
    }

    /// The telemetry configuration in force, for a request to keep from its start to its end.
    pub fn in_force(&self) -> Arc<TelemetryInForce> {
        self.in_force.load_full()
    }

    /// Whether a request's details (its Host, method, path, headers, start) are wanted: by what is in force, or by
    /// someone observing the flows (else requests are only counted).
    pub fn wants_request_details(&self, in_force: &TelemetryInForce) -> bool {
        in_force.details_wanted || self.flows.watched()
    }

    /// The telemetry of `workload`'s requests and connections, when a Telemetry resource scopes to it (`None`: the
    /// gateway's).
    pub fn scope_of(&self, workload: &Workload) -> Option<Arc<Scope>> {
        self.in_force.load().scope_of(workload)
    }

    /// Puts a newly compiled access log in force, the Telemetry API's disabled metrics (`REQUEST_COUNT`…) and its
    /// tag overrides.
    pub fn configure(&self, config: TelemetryConfig) {
        let scoped_destination = (!config.scopes.is_empty()).then(|| config.scopes.destination()).flatten();
        self.destination.store(Arc::new(config.access_log.file.clone().or(scoped_destination)));
        self.switches.set(&config.disabled_metrics);
        self.in_force.store(Arc::new(TelemetryInForce::new(config.access_log, config.tags, config.scopes)));
    }

    /// Counts new work shed while overloaded: a `request` or a `connection`.
    pub fn overload_shed(&self, what: &'static str) {
        self.overload_shed.get_or_create(&[("what", what)]).inc();
    }

    /// The gauge that shows whether the proxy is overloaded.
    pub fn overloaded(&self) -> Gauge {
        self.overloaded.clone()
    }

    /// Counts an intercepted TLS connection closed because its ClientHello was not read, for `reason`.
    pub fn client_hello_refused(&self, reason: &'static str) {
        self.client_hellos_refused.get_or_create(&[("reason", reason)]).inc();
    }

    /// Counts a connection to a Gateway server terminating TLS that ended before its requests, for `reason`.
    pub fn tls_handshake_failed(&self, reason: &'static str) {
        self.handshakes_failed.get_or_create(&[("reason", reason)]).inc();
    }

    /// Counts a request or TLS connection whose host did not belong to the address it was sent to.
    pub fn host_mismatch(&self, action: &'static str) {
        self.host_mismatches.get_or_create(&[("action", action)]).inc();
    }

    /// The Telemetry API's tag overrides, when some apply to the TCP metrics (see `TcpLabels::tagged`).
    pub fn connection_tags(&self) -> Option<Arc<TelemetryInForce>> {
        let in_force = self.in_force.load_full();
        in_force.tags.on_connections().then_some(in_force)
    }

    /// Writes `connection`'s access-log line (its metrics are counted as it opens and closes), as its source
    /// workload's own Telemetry says where some scopes to it (`scope`), else as the gateway's.
    /// Whether a relayed connection's line would be written (what only its line shows need not be read).
    pub fn logs_connections(&self, scope: Option<&Scope>) -> bool {
        scope.map_or_else(|| self.in_force.load().access_log.writes(), |scope| scope.access_log.writes())
    }

    pub fn log_connection(&self, connection: &super::connections::ConnectionRecord<'_>, scope: Option<&Scope>) {
        self.flows.publish(|| super::flows::Flow::connection(connection));
        let line = match scope {
            Some(scope) => scope.access_log.connection_line(connection),
            None => self.in_force.load().access_log.connection_line(connection),
        };
        let Some(line) = line else { return };
        if !self.lines.offer(line) {
            self.dropped_lines.inc();
        }
    }

    pub fn record(&self, record: &RequestRecord) {
        // What was in force as the request began (read now for a record made without).
        let loaded;
        let in_force = match &record.telemetry {
            Some(in_force) => &**in_force,
            None => {
                loaded = self.in_force.load();
                &**loaded
            }
        };
        // A workload's own telemetry, where a Telemetry resource scopes to it; else the gateway's.
        let scope = record.telemetry_scope.as_deref();
        let overrides = scope.map_or(&in_force.tags, |scope| &scope.tags);
        let series = if !overrides.on_requests() {
            self.metrics.series_of(record)
        } else {
            self.metrics.tagged_series_of(record, overrides)
        };
        let on = |metric: Metric| match scope {
            Some(scope) => !scope.disabled[metric as usize],
            None => !self.switches.is_off(metric),
        };
        if on(Metric::RequestCount) {
            series.requests.inc();
        }
        if on(Metric::RequestDuration) {
            series.duration.observe(record.duration.as_secs_f64() * 1000.0);
        }
        if on(Metric::RequestSize) {
            series.request_bytes.observe(record.bytes_received as f64);
        }
        if on(Metric::ResponseSize) {
            series.response_bytes.observe(record.bytes_sent as f64);
        }
        self.flows.publish(|| super::flows::Flow::request(record));
        let line = match scope {
            Some(scope) => scope.access_log.request_line(record),
            None => in_force.access_log.request_line(record),
        };
        let Some(line) = line else { return };
        if !self.lines.offer(line) {
            self.dropped_lines.inc();
        }
    }
}

/// Istio's standard labels for `record`.
fn labels_of(record: &RequestRecord) -> RequestLabels {
    let [source_workload, source_workload_namespace, source_principal, destination_service, destination_service_name, destination_service_namespace] =
        shared_texts(record).map(LabelText::clone);
    RequestLabels {
        reporter: LabelText::Static(&"source"),
        source_workload,
        source_workload_namespace,
        source_principal,
        destination_workload: UNKNOWN,
        destination_workload_namespace: UNKNOWN,
        destination_principal: UNKNOWN,
        destination_service,
        destination_service_name,
        destination_service_namespace,
        request_protocol: LabelText::Static(if record.grpc { &"grpc" } else { &"http" }),
        response_code: status_label(record.response_code),
        grpc_response_status: LabelText::default(),
        response_flags: record.response_flags.label(),
        connection_security_policy: record.connection_security.label(),
        tags: Tags::default(),
    }
}

/// The status code as a label, its text made once per code.
fn status_label(code: u16) -> Label {
    static CODES: std::sync::LazyLock<Vec<std::sync::Arc<str>>> =
        std::sync::LazyLock::new(|| (100..600u16).map(|code| code.to_string().into()).collect());
    match code.checked_sub(100).and_then(|i| CODES.get(usize::from(i))) {
        Some(text) => LabelText::Shared(text.clone()),
        None => LabelText::Shared(code.to_string().into()),
    }
}

#[cfg(test)]
mod tests;
