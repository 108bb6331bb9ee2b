//! Istio's standard metrics, each of which the Telemetry API may turn off (`metrics.overrides[].disabled`): a
//! switch per metric, read where it is recorded (nothing is counted while it is off) and where it is scraped (it is
//! left out whole, descriptor included).

use std::sync::{
    atomic::{AtomicBool, Ordering},
    Arc,
};

use prometheus_client::{
    encoding::{EncodeMetric, MetricEncoder},
    metrics::MetricType,
};

use crate::config::telemetry::METRICS;

/// One of Istio's standard metrics, in the order of [`METRICS`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Metric {
    RequestCount,
    RequestDuration,
    RequestSize,
    ResponseSize,
    TcpOpened,
    TcpClosed,
    TcpSent,
    TcpReceived,
}

/// Whether each metric is off; shared by the recorders and the registry.
#[derive(Clone, Debug, Default)]
pub struct MetricSwitches(Arc<[AtomicBool; METRICS.len()]>);

impl MetricSwitches {
    pub fn is_off(&self, metric: Metric) -> bool {
        self.0[metric as usize].load(Ordering::Relaxed)
    }

    /// Turns off the metrics named (the Telemetry API's names), and on the others.
    pub fn set(&self, disabled: &[&str]) {
        for (switch, (name, _)) in self.0.iter().zip(METRICS) {
            switch.store(disabled.contains(&name), Ordering::Relaxed);
        }
    }

    /// `metric`'s family, left out of the scrape while it is off.
    pub fn wrap<M>(&self, metric: Metric, inner: M) -> Switched<M> {
        Switched { inner, switches: self.clone(), metric }
    }
}

#[derive(Debug)]
pub struct Switched<M> {
    inner: M,
    switches: MetricSwitches,
    metric: Metric,
}

impl<M: EncodeMetric> EncodeMetric for Switched<M> {
    fn encode(&self, encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        self.inner.encode(encoder)
    }

    fn metric_type(&self) -> MetricType {
        self.inner.metric_type()
    }

    fn is_empty(&self) -> bool {
        self.switches.is_off(self.metric) || self.inner.is_empty()
    }
}
