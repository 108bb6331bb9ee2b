//! The metrics registry: datapath counters read from the kernel at scrape time.

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, MetricType},
    registry::Registry,
};

use crate::datapath::{VerdictCounters, VerdictTotals};

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
        let packets = "Packets classified by the eBPF datapath, by verdict.";
        encode_per_verdict(&mut encoder, "sluice_datapath_packets", packets, &totals, |t| t.packets)?;
        let bytes = "Bytes classified by the eBPF datapath, by verdict.";
        encode_per_verdict(&mut encoder, "sluice_datapath_bytes", bytes, &totals, |t| t.bytes)
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
