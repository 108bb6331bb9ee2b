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
    recent::{self, RecentSeries},
    response_flags::ResponseFlag,
    switches::{Metric, MetricSwitches},
    tags::{TagOverrides, Tags},
};
use crate::{
    config::workloads::Workload,
    policy::labels::{DestinationLabels, LabelText, UNKNOWN},
};

type Label = LabelText;

/// The addresses (and lengths) of a `TcpLabels`' texts.
type TextsKey = [(usize, usize); TCP_LABEL_NAMES.len()];

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
        for (i, (name, value)) in TCP_LABEL_NAMES.iter().zip(self.standard()).enumerate() {
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

    /// The standard labels' texts by address, when no tag override changed them: the key of their series in
    /// `ConnectionMetrics::recent`.
    fn texts_key(&self) -> Option<TextsKey> {
        if self.tags != Tags::default() {
            return None;
        }
        Some(self.standard().map(|text| recent::address(text.as_str())))
    }

    /// The standard labels' values, in the order of `TCP_LABEL_NAMES`.
    fn standard(&self) -> [&Label; TCP_LABEL_NAMES.len()] {
        [
            &self.reporter,
            &self.source_workload,
            &self.source_workload_namespace,
            &self.destination_service,
            &self.destination_service_name,
            &self.destination_service_namespace,
            &self.request_protocol,
            &self.response_flags,
            &self.connection_security_policy,
        ]
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
    /// Each kind of connection's four series, found by its labels' texts (held by the entry) where no tag
    /// override changed them.
    recent: Arc<RecentSeries<TextsKey, TcpSeries, TcpLabels>>,
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
            recent: Arc::default(),
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
        let series = match labels.texts_key() {
            Some(key) => self.recent.find_or_make(key, || (Arc::new(self.series([labels; 4])), labels.clone())),
            None => Arc::new(self.series([labels; 4])),
        };
        self.registered(series)
    }

    /// The series of each metric's labels (in the order of `Metric`).
    fn series(&self, [opened, closed, sent, received]: [&TcpLabels; 4]) -> TcpSeries {
        TcpSeries {
            opened: self.opened.get_or_create(opened).clone(),
            closed: self.closed.get_or_create(closed).clone(),
            sent: self.sent.get_or_create(sent).clone(),
            received: self.received.get_or_create(received).clone(),
        }
    }

    /// Counts a connection opened in `series`, to be counted closed there.
    fn registered(&self, series: Arc<TcpSeries>) -> OpenConnection {
        if !self.switches.is_off(Metric::TcpOpened) {
            series.opened.inc();
        }
        OpenConnection::Registered(series, self.switches.clone())
    }

    /// The same, each metric's series with labels of its own (in the order of `Metric`: opened, closed, sent,
    /// received), as tag overrides make them.
    pub fn opened_labelled(&self, labels: [TcpLabels; 4]) -> OpenConnection {
        let opened_labels = &labels[0];
        if opened_labels.destination_service_name.as_str() != "PassthroughCluster" {
            return self.registered(Arc::new(self.series(labels.each_ref())));
        }
        let opened = self.opened.get_or_create(opened_labels);
        if !self.switches.is_off(Metric::TcpOpened) {
            opened.inc();
        }
        let mut watched = self.passthrough.lock().unwrap_or_else(PoisonError::into_inner);
        if !watched.contains_key(&labels) {
            watched.insert(labels.clone(), Watched::new(opened.clone()));
        }
        // Its series may be swept while it lasts: looked up again when it closes.
        OpenConnection::LookedUpAtClose(self.clone(), Box::new(labels))
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

/// The four series one connection counts in.
pub struct TcpSeries {
    opened: Counter,
    closed: Counter,
    sent: Counter,
    received: Counter,
}

/// A connection counted as opened, to be counted as closed: its series, found once.
#[must_use = "a connection opened is counted closed when it ends"]
pub enum OpenConnection {
    Registered(Arc<TcpSeries>, MetricSwitches),
    /// Series looked up when the connection closes (in the order of `Metric`: opened, closed, sent, received).
    LookedUpAtClose(ConnectionMetrics, Box<[TcpLabels; 4]>),
}

impl OpenConnection {
    /// The connection ended: `received` bytes came from the client, `sent` went back to it.
    pub fn closed(self, received: u64, sent: u64) {
        match self {
            OpenConnection::Registered(series, switches) => {
                let on = |metric| !switches.is_off(metric);
                if on(Metric::TcpClosed) {
                    series.closed.inc();
                }
                if on(Metric::TcpReceived) {
                    series.received.inc_by(received);
                }
                if on(Metric::TcpSent) {
                    series.sent.inc_by(sent);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_connection_counts_in_the_series_its_labels_name() {
        let mut registry = Registry::default();
        let metrics = ConnectionMetrics::register(&mut registry, &MetricSwitches::default());
        let to = |host: &str, flag| {
            TcpLabels::new(&DestinationLabels::registered(host.into(), "ns".into(), 443, None), flag)
        };
        let (none, dt) = (ResponseFlag::None, ResponseFlag::DurationTimeout);
        // The same texts in other allocations (a reload's) count in the same series, found by address after.
        let shared = to("a.com", none);
        for labels in [to("a.com", none), to("a.com", none), shared.clone(), shared, to("a.com", dt), to("b.com", none)]
        {
            metrics.opened(&labels).closed(10, 100);
        }
        // A tag override's labels are series of their own.
        let tagged = TcpLabels {
            tags: Tags { left_out: 0, set: Some(Arc::new([("team".into(), LabelText::Static(&"pay"))])) },
            ..to("a.com", none)
        };
        metrics.opened(&tagged).closed(1, 1);

        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        let value = |metric: &str, service: &str, flags: &str, tagged: bool| {
            let labels = format!("destination_service=\"{service}\",destination_service_name=\"{service}\"");
            let flags = format!("response_flags=\"{flags}\"");
            text.lines()
                .find(|line| {
                    line.starts_with(&format!("{metric}{{"))
                        && line.contains(&labels)
                        && line.contains(&flags)
                        && line.contains("team=\"pay\"") == tagged
                })
                .and_then(|line| line.rsplit(' ').next()?.parse::<u64>().ok())
        };
        assert_eq!(value("istio_tcp_connections_opened_total", "a.com", "-", false), Some(4), "{text}");
        assert_eq!(value("istio_tcp_connections_closed_total", "a.com", "-", false), Some(4), "{text}");
        assert_eq!(value("istio_tcp_received_bytes_total", "a.com", "-", false), Some(40), "{text}");
        assert_eq!(value("istio_tcp_sent_bytes_total", "a.com", "-", false), Some(400), "{text}");
        assert_eq!(value("istio_tcp_connections_opened_total", "a.com", "DT", false), Some(1), "{text}");
        assert_eq!(value("istio_tcp_connections_opened_total", "b.com", "-", false), Some(1), "{text}");
        assert_eq!(value("istio_tcp_connections_opened_total", "a.com", "-", true), Some(1), "{text}");
        assert_eq!(value("istio_tcp_sent_bytes_total", "a.com", "-", true), Some(1), "{text}");
    }
}
