//! Istio's standard TCP metrics, for connections the proxy relays without reading them (opaque TCP on
//! intercepted ports, CONNECT tunnels).

use prometheus_client::{
    encoding::{EncodeLabel, EncodeLabelSet, LabelSetEncoder},
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};

use std::{
    collections::{HashMap, HashSet},
    fmt::Write,
    net::SocketAddr,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, SystemTime},
};

use super::{
    access_log::format::Fields,
    passthrough::Watched,
    response_flags::ResponseFlag,
    switches::{Metric, MetricSwitches},
    tags::{TagOverrides, Tags},
};
use crate::{
    config::workloads::Workload,
    policy::labels::{DestinationLabels, LabelText, UNKNOWN},
};

type Label = LabelText;

/// Istio's TCP labels (those Sluice can know; the rest read `unknown`, as Istio writes them), and what the
/// Telemetry API's tag overrides made of them.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct TcpLabels {
    pub reporter: Label,
    pub source_workload: Label,
    pub source_workload_namespace: Label,
    pub destination_service: Label,
    pub destination_service_name: Label,
    pub destination_service_namespace: Label,
    pub request_protocol: Label,
    pub response_flags: Label,
    pub connection_security_policy: Label,
    pub tags: Tags,
}

/// The standard labels' names, in the order of `TcpLabels`' fields.
pub const TCP_LABEL_NAMES: [&str; 9] = [
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "request_protocol",
    "response_flags",
    "connection_security_policy",
];

/// The standard labels the tags leave in, then the labels they set.
impl EncodeLabelSet for TcpLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        let standard = [
            &self.reporter,
            &self.source_workload,
            &self.source_workload_namespace,
            &self.destination_service,
            &self.destination_service_name,
            &self.destination_service_namespace,
            &self.request_protocol,
            &self.response_flags,
            &self.connection_security_policy,
        ];
        for (i, (name, value)) in TCP_LABEL_NAMES.iter().zip(standard).enumerate() {
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

impl TcpLabels {
    /// Labels for a connection to `destination`, with Envoy's response `flag`.
    pub fn new(destination: &DestinationLabels, flag: ResponseFlag) -> TcpLabels {
        TcpLabels {
            reporter: LabelText::Static(&"source"),
            source_workload: UNKNOWN,
            source_workload_namespace: UNKNOWN,
            destination_service: destination.service.clone(),
            destination_service_name: destination.name().clone(),
            destination_service_namespace: destination.namespace.clone(),
            request_protocol: LabelText::Static(&"tcp"),
            response_flags: flag.label(),
            connection_security_policy: UNKNOWN,
            tags: Tags::default(),
        }
    }

    /// Each TCP metric's labels (in the order of `Metric`: opened, closed, sent, received) as `overrides` make them
    /// for the connection `fields` describe.
    /// The same labels with another response flag.
    pub fn with_flag(self, flag: ResponseFlag) -> TcpLabels {
        TcpLabels { response_flags: flag.label(), ..self }
    }

    pub fn tagged(self, overrides: &TagOverrides, fields: &Fields<'_>) -> [TcpLabels; 4] {
        std::array::from_fn(|i| TcpLabels {
            tags: overrides.tags(Metric::TcpOpened as usize + i, fields),
            ..self.clone()
        })
    }

    /// The same, from `source` when the pod watcher knows it.
    pub fn from_source(mut self, source: Option<&Workload>) -> TcpLabels {
        if let Some(source) = source {
            self.source_workload = LabelText::Shared(source.name.clone());
            self.source_workload_namespace = LabelText::Shared(source.namespace.clone());
        }
        self
    }
}

/// One TCP connection the proxy relayed or refused, as its access-log line tells it.
#[derive(Debug)]
pub struct ConnectionRecord<'a> {
    pub start: SystemTime,
    pub duration: Duration,
    pub flag: ResponseFlag,
    /// From the client, and back to it.
    pub received: u64,
    pub sent: u64,
    pub upstream: Option<SocketAddr>,
    /// The address the upstream connection left from.
    pub upstream_local: Option<SocketAddr>,
    /// Why no connection to the upstream could be made (`delayed_connect_error:_Connection_refused`).
    pub upstream_transport_failure_reason: Option<&'a str>,
    /// Why the connection was closed for L4 reasons: an AuthorizationPolicy's denial
    /// (`rbac_access_denied_matched_policy[…]`), as Envoy's network RBAC filter says it.
    pub termination_details: Option<&'a str>,
    pub destination: &'a DestinationLabels,
    /// Where the client sent it (the original destination; on a Gateway port, the listener's address).
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// The ClientHello's server name, for TLS.
    pub server_name: Option<&'a str>,
    /// How its bytes were relayed (`splice`, `copy`), if it was.
    pub relay_engine: Option<&'static str>,
    /// Why it was refused (`rbac_access_denied`, `no_route`…), when the decision refused it.
    pub refused_because: Option<&'static str>,
}

impl ConnectionRecord<'_> {
    /// Envoy's default format as Istio writes it for TCP (no request: `"- - -" 0`), with Istio's tail:
    /// `%UPSTREAM_CLUSTER% %DOWNSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS% %REQUESTED_SERVER_NAME%`.
    pub fn text_line(&self) -> String {
        let mut line = String::with_capacity(200);
        let upstream = self.upstream.map_or_else(|| "-".to_owned(), |address| address.to_string());
        let _ = writeln!(
            line,
            "[{}] \"- - -\" 0 {} {} {} {} - \"-\" \"-\" \"-\" \"-\" \"{upstream}\" {} {} {} {}",
            super::requests::rfc3339_millis(self.start),
            self.flag.text(),
            self.received,
            self.sent,
            self.duration.as_millis(),
            self.destination.cluster(),
            self.local,
            self.remote,
            self.server_name.unwrap_or("-"),
        );
        line
    }

    pub fn json_line(&self) -> String {
        let mut line = serde_json::json!({
            "start_time": super::requests::rfc3339_millis(self.start),
            "protocol": "tcp",
            "response_code": 0,
            "response_flags": self.flag.text(),
            "bytes_received": self.received,
            "bytes_sent": self.sent,
            "duration": self.duration.as_millis() as u64,
            "upstream_host": self.upstream.map(|address| address.to_string()),
            "upstream_local_address": self.upstream_local.map(|address| address.to_string()),
            "upstream_transport_failure_reason": self.upstream_transport_failure_reason,
            "connection_termination_details": self.termination_details,
            "upstream_cluster": self.destination.cluster().to_string(),
            "downstream_local_address": self.local.to_string(),
            "downstream_remote_address": self.remote.to_string(),
            "requested_server_name": self.server_name,
            "relay_engine": self.relay_engine,
        })
        .to_string();
        line.push('\n');
        line
    }
}

#[derive(Clone)]
pub struct ConnectionMetrics {
    opened: Family<TcpLabels, Counter>,
    closed: Family<TcpLabels, Counter>,
    sent: Family<TcpLabels, Counter>,
    received: Family<TcpLabels, Counter>,
    switches: MetricSwitches,
    /// The series of connections passed through unregistered (an address and port a client chose), dropped once
    /// unused for a while: each metric's labels (in the order of `Metric`), which tag overrides may make differ.
    passthrough: Arc<Mutex<HashMap<[TcpLabels; 4], Watched>>>,
}

impl ConnectionMetrics {
    pub fn register(registry: &mut Registry, switches: &MetricSwitches) -> ConnectionMetrics {
        let metrics = ConnectionMetrics {
            opened: Family::default(),
            closed: Family::default(),
            sent: Family::default(),
            received: Family::default(),
            switches: switches.clone(),
            passthrough: Arc::default(),
        };
        let opened = switches.wrap(Metric::TcpOpened, metrics.opened.clone());
        registry.register("istio_tcp_connections_opened", "TCP connections opened", opened);
        let closed = switches.wrap(Metric::TcpClosed, metrics.closed.clone());
        registry.register("istio_tcp_connections_closed", "TCP connections closed", closed);
        let sent = switches.wrap(Metric::TcpSent, metrics.sent.clone());
        registry.register(
            "istio_tcp_sent_bytes",
            "Bytes sent to the client during the response of TCP connections",
            sent,
        );
        let received = switches.wrap(Metric::TcpReceived, metrics.received.clone());
        let help = "Bytes received from the client during the request of TCP connections";
        registry.register("istio_tcp_received_bytes", help, received);
        metrics
    }

    /// Counts a connection opened; what it returns counts it closed, with the series looked up now.
    pub fn opened(&self, labels: &TcpLabels) -> OpenConnection {
        if labels.destination_service_name.as_str() == "PassthroughCluster" {
            return self.opened_labelled(std::array::from_fn(|_| labels.clone()));
        }
        let opened = self.opened.get_or_create(labels);
        if !self.switches.is_off(Metric::TcpOpened) {
            opened.inc();
        }
        OpenConnection::Registered {
            closed: self.closed.get_or_create(labels).clone(),
            received: self.received.get_or_create(labels).clone(),
            sent: self.sent.get_or_create(labels).clone(),
            switches: self.switches.clone(),
        }
    }

    /// The same, each metric's series with labels of its own (in the order of `Metric`: opened, closed, sent,
    /// received), as tag overrides make them.
    pub fn opened_labelled(&self, labels: [TcpLabels; 4]) -> OpenConnection {
        let [opened_labels, closed, sent, received] = &labels;
        let opened = self.opened.get_or_create(opened_labels);
        if !self.switches.is_off(Metric::TcpOpened) {
            opened.inc();
        }
        if opened_labels.destination_service_name.as_str() == "PassthroughCluster" {
            let mut watched = self.passthrough.lock().unwrap_or_else(PoisonError::into_inner);
            if !watched.contains_key(&labels) {
                watched.insert(labels.clone(), Watched::new(opened.clone()));
            }
            // Its series may be swept while it lasts: looked up again when it closes.
            return OpenConnection::LookedUpAtClose(self.clone(), Box::new(labels));
        }
        OpenConnection::Registered {
            closed: self.closed.get_or_create(closed).clone(),
            received: self.received.get_or_create(received).clone(),
            sent: self.sent.get_or_create(sent).clone(),
            switches: self.switches.clone(),
        }
    }

    /// A connection opened under other labels that ends with a response flag of its own (`DT`): its close and
    /// its bytes are counted under `labels`, which carry that flag, as Istio's stats filter labels a connection's
    /// last report with the flags it ended with. Its opening was counted when it opened.
    pub fn ending(&self, labels: [TcpLabels; 4]) -> OpenConnection {
        OpenConnection::LookedUpAtClose(self.clone(), Box::new(labels))
    }

    /// Drops the passthrough series that saw no connection in the last `quiet_sweeps` sweeps: returns their
    /// destinations' names.
    pub(super) fn sweep(&self, quiet_sweeps: u32) -> Vec<String> {
        let mut watched = self.passthrough.lock().unwrap_or_else(PoisonError::into_inner);
        let stale = super::passthrough::stale(&mut watched, quiet_sweeps);
        for [opened, closed, sent, received] in &stale {
            self.opened.remove(opened);
            self.closed.remove(closed);
            self.sent.remove(sent);
            self.received.remove(received);
        }
        stale.iter().map(|[labels, ..]| labels.destination_service.as_str().to_owned()).collect()
    }

    /// The passed-through destinations that still have connection series.
    pub(super) fn passthrough_in_use(&self) -> HashSet<String> {
        let watched = self.passthrough.lock().unwrap_or_else(PoisonError::into_inner);
        watched.keys().map(|[labels, ..]| labels.destination_service.as_str().to_owned()).collect()
    }
}

/// A connection counted as opened, to be counted as closed: its series, found once.
#[must_use = "a connection opened is counted closed when it ends"]
pub enum OpenConnection {
    Registered {
        closed: Counter,
        received: Counter,
        sent: Counter,
        switches: MetricSwitches,
    },
    /// Series looked up when the connection closes (in the order of `Metric`: opened, closed, sent, received).
    LookedUpAtClose(ConnectionMetrics, Box<[TcpLabels; 4]>),
}

impl OpenConnection {
    /// The connection ended: `received` bytes came from the client, `sent` went back to it.
    pub fn closed(self, received: u64, sent: u64) {
        match self {
            OpenConnection::Registered { closed, received: from_client, sent: to_client, switches } => {
                let on = |metric| !switches.is_off(metric);
                if on(Metric::TcpClosed) {
                    closed.inc();
                }
                if on(Metric::TcpReceived) {
                    from_client.inc_by(received);
                }
                if on(Metric::TcpSent) {
                    to_client.inc_by(sent);
                }
            }
            OpenConnection::LookedUpAtClose(metrics, labels) => {
                let [_, closed_labels, sent_labels, received_labels] = &*labels;
                let on = |metric| !metrics.switches.is_off(metric);
                if on(Metric::TcpClosed) {
                    metrics.closed.get_or_create(closed_labels).inc();
                }
                if on(Metric::TcpReceived) {
                    metrics.received.get_or_create(received_labels).inc_by(received);
                }
                if on(Metric::TcpSent) {
                    metrics.sent.get_or_create(sent_labels).inc_by(sent);
                }
            }
        }
    }
}
