//! Telemetry (`telemetry.istio.io` v1alpha1 and v1): what is logged and measured, and Istio's checks of it. Of
//! its sections Sluice applies `accessLogging` (providers, `disabled`, `filter.expression`) and `metrics`
//! overrides that disable metrics; `tracing` and tag overrides are read, checked and warned of.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{authorization_policy::Selector, authorization_policy::TargetRef, error::FieldError};

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Telemetry {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<Selector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_ref: Option<TargetRef>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub target_refs: Vec<TargetRef>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub access_logging: Vec<AccessLogging>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub metrics: Vec<Metrics>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tracing: Vec<serde_json::Value>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct ProviderRef {
    #[serde(default)]
    pub name: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct WorkloadMode {
    /// `CLIENT_AND_SERVER` (the default), `CLIENT` or `SERVER`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct Filter {
    #[serde(default)]
    pub expression: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AccessLogging {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub providers: Vec<ProviderRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disabled: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<Filter>,
    #[serde(default, rename = "match", skip_serializing_if = "Option::is_none")]
    pub matches: Option<WorkloadMode>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Metrics {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub providers: Vec<ProviderRef>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub overrides: Vec<MetricsOverride>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reporting_interval: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MetricsOverride {
    #[serde(default, rename = "match", skip_serializing_if = "Option::is_none")]
    pub matches: Option<MetricSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disabled: Option<bool>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tag_overrides: BTreeMap<String, TagOverride>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MetricSelector {
    /// One of Istio's standard metrics, or `ALL_METRICS`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metric: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub custom_metric: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct TagOverride {
    /// `UPSERT` (the default) or `REMOVE`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

/// Istio's standard metrics as the Telemetry API names them, and the series each is exported as.
pub const METRICS: [(&str, &str); 8] = [
    ("REQUEST_COUNT", "istio_requests_total"),
    ("REQUEST_DURATION", "istio_request_duration_milliseconds"),
    ("REQUEST_SIZE", "istio_request_bytes"),
    ("RESPONSE_SIZE", "istio_response_bytes"),
    ("TCP_OPENED_CONNECTIONS", "istio_tcp_connections_opened_total"),
    ("TCP_CLOSED_CONNECTIONS", "istio_tcp_connections_closed_total"),
    ("TCP_SENT_BYTES", "istio_tcp_sent_bytes_total"),
    ("TCP_RECEIVED_BYTES", "istio_tcp_received_bytes_total"),
];

const MODES: [&str; 3] = ["CLIENT_AND_SERVER", "CLIENT", "SERVER"];

impl Telemetry {
    pub fn attached_by_target(&self) -> bool {
        self.target_ref.is_some() || !self.target_refs.is_empty()
    }

    pub fn validate(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        let mut fail = |path: String, reason: String| errors.push(FieldError::new(path, reason));
        if self.selector.is_some() && self.attached_by_target() {
            fail("spec.selector".into(), "only one of selector or targetRefs may be set".into());
        }
        for (i, logging) in self.access_logging.iter().enumerate() {
            let at = |field: &str| format!("spec.accessLogging[{i}].{field}");
            for (j, provider) in logging.providers.iter().enumerate() {
                if provider.name.is_empty() {
                    fail(at(&format!("providers[{j}].name")), "a provider's name is required".into());
                }
            }
            if let Some(mode) = logging.matches.as_ref().and_then(|m| m.mode.as_deref()) {
                if !MODES.contains(&mode) {
                    fail(at("match.mode"), format!("'{mode}' is not CLIENT_AND_SERVER, CLIENT or SERVER"));
                }
            }
            if let Some(filter) = &logging.filter {
                if let Err(reason) = check_expression(&filter.expression) {
                    fail(at("filter.expression"), reason);
                }
            }
        }
        for (i, metrics) in self.metrics.iter().enumerate() {
            for (j, metric_override) in metrics.overrides.iter().enumerate() {
                let at = |field: &str| format!("spec.metrics[{i}].overrides[{j}].{field}");
                if let Some(selector) = &metric_override.matches {
                    if selector.metric.is_some() && selector.custom_metric.is_some() {
                        fail(at("match"), "only one of metric or customMetric may be set".into());
                    }
                    if let Some(metric) = selector.metric.as_deref() {
                        let known = metric == "ALL_METRICS"
                            || METRICS.iter().any(|(name, _)| *name == metric)
                            || metric.starts_with("GRPC_");
                        if !known {
                            fail(at("match.metric"), format!("'{metric}' is not one of Istio's standard metrics"));
                        }
                    }
                    if let Some(mode) = selector.mode.as_deref().filter(|mode| !MODES.contains(mode)) {
                        fail(at("match.mode"), format!("'{mode}' is not CLIENT_AND_SERVER, CLIENT or SERVER"));
                    }
                }
                for (tag, tag_override) in &metric_override.tag_overrides {
                    let is_label_name = tag.bytes().enumerate().all(|(i, byte)| {
                        byte == b'_' || byte.is_ascii_alphabetic() || (i > 0 && byte.is_ascii_digit())
                    });
                    if tag.is_empty() || !is_label_name || tag.starts_with("__") {
                        fail(at(&format!("tagOverrides.{tag}")), format!("'{tag}' is not a Prometheus label name"));
                    }
                    let at = |field: &str| at(&format!("tagOverrides.{tag}.{field}"));
                    match tag_override.operation.as_deref() {
                        None | Some("UPSERT") => match tag_override.value.as_deref() {
                            None | Some("") => fail(at("value"), "an UPSERT needs a value expression".into()),
                            Some(value) => {
                                if let Err(reason) = check_expression(value) {
                                    fail(at("value"), reason);
                                }
                            }
                        },
                        Some("REMOVE") if tag_override.value.is_some() => {
                            fail(at("value"), "a REMOVE takes no value".into())
                        }
                        Some("REMOVE") => {}
                        Some(other) => fail(at("operation"), format!("'{other}' is not UPSERT or REMOVE")),
                    }
                }
            }
        }
        errors
    }
}

/// Whether `expression` is CEL Sluice can evaluate: it parses, and names only the attributes it knows.
pub fn check_expression(expression: &str) -> Result<(), String> {
    crate::telemetry::expression::Expression::compile(expression).map(drop)
}
