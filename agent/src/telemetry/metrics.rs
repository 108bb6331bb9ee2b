//! The metrics registry: datapath counters and blackholed destinations read from the kernel at scrape time,
//! configuration state, and the proxy's request metrics.

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{
        counter::ConstCounter,
        counter::Counter,
        family::Family,
        gauge::{ConstGauge, Gauge},
        MetricType,
    },
    registry::Registry,
};

use super::{access_log::AccessLog, requests::RequestTelemetry};
use crate::datapath::{protocol_name, BlackholedDestinations, VerdictCounters, VerdictTotals};

/// The registry the metrics endpoint serves, and the metrics the agent's tasks set.
pub struct Metrics {
    pub registry: std::sync::Arc<Registry>,
    pub blocked_flows: Counter,
    /// How many policies have been applied since the agent started.
    pub config_generation: Gauge,
    /// 1 for each resource rejected by the last load (whose last good version, if any, stays in force).
    pub config_rejected: Family<[(&'static str, String); 3], Gauge>,
    /// Istio's request metrics and the access log, for the proxy.
    pub requests: RequestTelemetry,
    pub interfaces: InterfaceMetrics,
    /// Upstream connections refused because their destination was the gateway node itself.
    pub local_destinations_refused: Counter,
    /// When each certificate a Gateway server presents expires (Unix seconds), by where it is read from.
    pub certificate_expiry: Family<[(&'static str, String); 1], Gauge>,
}

/// Whether the classifier is on the intercepted interfaces, and how often it had to be put back.
#[derive(Clone, Debug)]
pub struct InterfaceMetrics {
    /// 1 for each configured interface the classifier is on (enforcing the policy in force), 0 for one it is not.
    pub attached: Family<[(&'static str, String); 1], Gauge>,
    /// Attachments that mended a gap: an interface appeared or was re-created, a link was found severed.
    pub reattachments: Family<[(&'static str, String); 2], Counter>,
    /// The policy routing for intercepted traffic found missing and installed again.
    pub routing_restored: Counter,
}

impl Metrics {
    /// Records the resources the last load rejected, each named `Kind namespace/name`.
    pub fn set_rejected<'a>(&self, ids: impl Iterator<Item = &'a str>) {
        self.config_rejected.clear();
        for id in ids {
            self.add_rejected(id);
        }
    }

    /// Marks one more resource (`Kind namespace/name`) as rejected, or in part not applied (a Gateway server
    /// whose certificate cannot be used), until the next reload.
    pub fn add_rejected(&self, id: &str) {
        let (kind, rest) = id.split_once(' ').unwrap_or((id, ""));
        let (namespace, name) = rest.split_once('/').unwrap_or(("", rest));
        let labels = [("kind", kind.to_owned()), ("namespace", namespace.to_owned()), ("name", name.to_owned())];
        self.config_rejected.get_or_create(&labels).set(1);
    }
}

/// The registry with every metric; starts the access-log writer (so it runs inside the runtime).
pub fn registry(counters: VerdictCounters, blackholed: BlackholedDestinations, access_log: AccessLog) -> Metrics {
    let mut registry = Registry::default();
    let requests = RequestTelemetry::start(&mut registry, access_log);
    registry.register_collector(Box::new(DatapathCollector { counters, blackholed }));
    registry.register_collector(Box::new(RuntimeCollector));
    let blocked_flows = Counter::default();
    registry.register(
        "sluice_blocked_flows",
        "Flows whose first packet the kernel blackholed (as reported through the event ring buffer)",
        blocked_flows.clone(),
    );
    let config_generation = Gauge::default();
    registry.register(
        "sluice_config_generation",
        "Policies applied since the agent started",
        config_generation.clone(),
    );
    let config_rejected = Family::default();
    registry.register(
        "sluice_config_rejected",
        "Resources rejected by the last configuration load (1 each); their last good version stays in force",
        config_rejected.clone(),
    );
    let datapath_attached = Family::default();
    registry.register(
        "sluice_datapath_attached",
        "1 for each configured interface the classifier is attached to and enforcing the policy in force, 0 for one \
         it is not (traffic entering it is not enforced)",
        datapath_attached.clone(),
    );
    let datapath_reattachments = Family::default();
    registry.register(
        "sluice_datapath_reattachments",
        "Times the classifier was attached again to an interface (it appeared, was re-created, or its link was \
         severed), by reason",
        datapath_reattachments.clone(),
    );
    let routing_restored = Counter::default();
    registry.register(
        "sluice_datapath_routing_restored",
        "Times the policy routing for intercepted traffic was found missing and installed again",
        routing_restored.clone(),
    );
    registry.register(
        "sluice_passthrough_series_collapsed",
        "Requests and connections passed through to a destination that got no series of its own, because \
         --max-passthrough-series destinations have: counted under destination_service=\"PassthroughCluster\"",
        super::passthrough::PASSTHROUGH_COLLAPSED.clone(),
    );
    let local_destinations_refused = Counter::default();
    registry.register(
        "sluice_local_destinations_refused",
        "Upstream connections the proxy refused because their destination was the gateway node itself (loopback, \
         link-local, one of its addresses)",
        local_destinations_refused.clone(),
    );
    let certificate_expiry = Family::default();
    registry.register(
        "sluice_certificate_expiry_timestamp_seconds",
        "When the certificate each Gateway server terminating TLS presents expires (Unix time), by where it is read \
         from (a credentialName, a file, istio-certs)",
        certificate_expiry.clone(),
    );
    Metrics {
        registry: std::sync::Arc::new(registry),
        local_destinations_refused,
        certificate_expiry,
        blocked_flows,
        config_generation,
        config_rejected,
        requests,
        interfaces: InterfaceMetrics {
            attached: datapath_attached,
            reattachments: datapath_reattachments,
            routing_restored,
        },
    }
}

#[derive(Debug)]
struct DatapathCollector {
    counters: VerdictCounters,
    blackholed: BlackholedDestinations,
}

impl Collector for DatapathCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let totals = self.counters.read();
        let packets = "Packets classified by the eBPF datapath, by verdict.";
        encode_per_verdict(&mut encoder, "sluice_datapath_packets", packets, &totals, |t| t.packets)?;
        let bytes = "Bytes classified by the eBPF datapath, by verdict.";
        encode_per_verdict(&mut encoder, "sluice_datapath_bytes", bytes, &totals, |t| t.bytes)?;

        let help = "Packets blackholed in the kernel, by destination (the most recently blocked destinations).";
        let mut family = encoder.encode_descriptor("sluice_blackholed_packets", help, None, MetricType::Counter)?;
        for destination in self.blackholed.read() {
            let labels = [
                ("destination", destination.destination.to_string()),
                ("protocol", protocol_name(destination.protocol).to_owned()),
            ];
            ConstCounter::new(destination.packets).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// The agent's own tasks, read as they are scraped: a count that keeps growing is a leak.
#[derive(Debug)]
struct RuntimeCollector;

impl Collector for RuntimeCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return Ok(()) };
        let help = "Tasks alive in the agent's async runtime (each client connection is at least one)";
        let family = encoder.encode_descriptor("sluice_runtime_tasks", help, None, MetricType::Gauge)?;
        ConstGauge::new(runtime.metrics().num_alive_tasks() as i64).encode(family)
    }
}

fn encode_per_verdict(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    totals: &[VerdictTotals],
    value: impl Fn(&VerdictTotals) -> u64,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for total in totals {
        let labels = [("verdict", total.verdict.label())];
        ConstCounter::new(value(total)).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}
