//! The metrics registry: datapath counters read from the kernel at scrape time.

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::counter::ConstCounter,
    registry::Registry,
};

use crate::datapath::VerdictCounters;

/// Builds the registry the metrics endpoint serves.
pub fn registry(datapath: VerdictCounters) -> Registry {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(DatapathCollector(datapath)));
    registry
}

#[derive(Debug)]
struct DatapathCollector(VerdictCounters);

impl Collector for DatapathCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let totals = self.0.read();
        let families: [(&str, &str, fn(&crate::datapath::VerdictTotals) -> u64); 2] = [
            ("sluice_datapath_packets", "Packets classified by the eBPF datapath, by verdict.", |t| t.packets),
            ("sluice_datapath_bytes", "Bytes classified by the eBPF datapath, by verdict.", |t| t.bytes),
        ];
        for (name, help, value) in families {
            let mut family =
                encoder.encode_descriptor(name, help, None, prometheus_client::metrics::MetricType::Counter)?;
            for total in &totals {
                let labels = [("verdict", total.verdict.label())];
                ConstCounter::new(value(total)).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}
