//! DestinationRule (`networking.istio.io`): subsets and traffic policies of a destination; and Istio's checks.

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};

use super::{
    error::FieldError,
    fields::{validate_duration, validate_host_or_ip, validate_port},
};

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DestinationRule {
    #[serde(default)]
    pub host: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic_policy: Option<TrafficPolicy>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subsets: Vec<Subset>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub export_to: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Subset {
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic_policy: Option<TrafficPolicy>,
}

/// A destination's traffic policy, and per-port overrides (which replace it rather than inherit from it).
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TrafficPolicy {
    #[serde(flatten)]
    pub settings: PolicySettings,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub port_level_settings: Vec<PortTrafficPolicy>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PortTrafficPolicy {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<super::fields::PortSelector>,
    #[serde(flatten)]
    pub settings: PolicySettings,
}

/// What a traffic policy sets, for the whole destination or one port. Kept as read beyond the fields checked
/// here; the proxy reads the rest.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicySettings {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancer>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_pool: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetection>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ClientTls>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LoadBalancer {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub simple: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consistent_hash: Option<ConsistentHash>,
}

/// What a consistent-hash load balancer hashes (one key); `ringHash`, `maglev` and `minimumRingSize` shape
/// Envoy's tables and are read without effect (Sluice's hashing needs no table).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConsistentHash {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_header_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_cookie: Option<HttpCookie>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub use_source_ip: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_query_parameter_name: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpCookie {
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OutlierDetection {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_5xx_errors: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_gateway_errors: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_ejection_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ejection_percent: Option<i64>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ClientTls {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sni: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subject_alt_names: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential_name: Option<String>,
    /// Files (PEM) on the gateway: the CAs that sign the destination's certificate (else the system's), and for
    /// MUTUAL the client certificate and its key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_certificates: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_certificate: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub insecure_skip_verify: Option<bool>,
}

const LB_SIMPLE: [&str; 6] = ["UNSPECIFIED", "LEAST_CONN", "RANDOM", "PASSTHROUGH", "ROUND_ROBIN", "LEAST_REQUEST"];
const TLS_MODES: [&str; 4] = ["DISABLE", "SIMPLE", "MUTUAL", "ISTIO_MUTUAL"];

impl DestinationRule {
    pub fn validate(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        if self.host.is_empty() {
            errors.push(FieldError::new("spec.host", "a host is required"));
        } else if let Err(reason) = validate_host_or_ip(&self.host) {
            errors.push(FieldError::new("spec.host", reason));
        }
        if let Some(policy) = &self.traffic_policy {
            validate_policy(policy, "spec.trafficPolicy", &mut errors);
        }
        let mut names = HashSet::new();
        for (i, subset) in self.subsets.iter().enumerate() {
            let path = format!("spec.subsets[{i}]");
            if subset.name.is_empty() {
                errors.push(FieldError::new(format!("{path}.name"), "a subset name is required"));
            } else if !names.insert(subset.name.as_str()) {
                errors.push(FieldError::new(
                    format!("{path}.name"),
                    format!("subset '{}' is defined twice", subset.name),
                ));
            }
            if let Some(policy) = &subset.traffic_policy {
                validate_policy(policy, &format!("{path}.trafficPolicy"), &mut errors);
            }
        }
        errors
    }
}

fn validate_policy(policy: &TrafficPolicy, path: &str, errors: &mut Vec<FieldError>) {
    policy.settings.validate(path, errors);
    for (i, port) in policy.port_level_settings.iter().enumerate() {
        let path = format!("{path}.portLevelSettings[{i}]");
        match &port.port {
            Some(port) => validate_port(port.number, &format!("{path}.port.number"), errors),
            None => errors.push(FieldError::new(format!("{path}.port"), "a port is required")),
        }
        port.settings.validate(&path, errors);
    }
}

impl PolicySettings {
    fn validate(&self, path: &str, errors: &mut Vec<FieldError>) {
        let PolicySettings { load_balancer, outlier_detection: outlier, tls, connection_pool } = self;
        if let Some(simple) = load_balancer.as_ref().and_then(|lb| lb.simple.as_deref()) {
            if !LB_SIMPLE.contains(&simple) {
                errors.push(FieldError::new(
                    format!("{path}.loadBalancer.simple"),
                    format!("unknown load balancer '{simple}'"),
                ));
            }
        }
        if let Some(hash) = load_balancer.as_ref().and_then(|lb| lb.consistent_hash.as_ref()) {
            validate_consistent_hash(hash, &format!("{path}.loadBalancer.consistentHash"), errors);
        }
        if let Some(timeout) = connection_pool.as_ref().and_then(|pool| pool.get("tcp")?.get("connectTimeout")) {
            let path = format!("{path}.connectionPool.tcp.connectTimeout");
            match timeout.as_str() {
                Some(timeout) => validate_duration(&Some(timeout.to_owned()), &path, errors),
                None => errors.push(FieldError::new(path, "a duration (e.g. 1s) is required")),
            }
        }
        if let Some(outlier) = outlier {
            validate_duration(&outlier.interval, &format!("{path}.outlierDetection.interval"), errors);
            validate_duration(
                &outlier.base_ejection_time,
                &format!("{path}.outlierDetection.baseEjectionTime"),
                errors,
            );
            if let Some(percent) = outlier.max_ejection_percent {
                if !(0..=100).contains(&percent) {
                    errors.push(FieldError::new(
                        format!("{path}.outlierDetection.maxEjectionPercent"),
                        format!("{percent} is not a percentage (0 to 100)"),
                    ));
                }
            }
        }
        if let Some(tls) = tls {
            match tls.mode.as_deref() {
                Some(mode) if !TLS_MODES.contains(&mode) => {
                    errors.push(FieldError::new(format!("{path}.tls.mode"), format!("unknown TLS mode '{mode}'")));
                }
                // As Istio checks it: MUTUAL needs the client's certificate and key, from files or a Secret.
                Some("MUTUAL")
                    if tls.credential_name.is_none()
                        && (tls.client_certificate.is_none() || tls.private_key.is_none()) =>
                {
                    errors.push(FieldError::new(
                        format!("{path}.tls"),
                        "MUTUAL needs clientCertificate and privateKey (or credentialName)",
                    ));
                }
                _ => {}
            }
        }
    }
}

/// One hash key, as the oneof in Istio's API allows; a cookie needs a name, a header a valid header name.
fn validate_consistent_hash(hash: &ConsistentHash, path: &str, errors: &mut Vec<FieldError>) {
    let ConsistentHash { http_header_name, http_cookie, use_source_ip, http_query_parameter_name } = hash;
    let keys = [http_header_name.is_some(), http_cookie.is_some(), *use_source_ip, http_query_parameter_name.is_some()];
    if keys.iter().filter(|&&set| set).count() > 1 {
        errors.push(FieldError::new(
            path,
            "only one of httpHeaderName, httpCookie, useSourceIp and httpQueryParameterName may be set",
        ));
    }
    if let Some(name) = http_header_name {
        if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
            errors.push(FieldError::new(format!("{path}.httpHeaderName"), format!("'{name}' is not a header name")));
        }
    }
    if let Some(cookie) = http_cookie {
        if cookie.name.is_empty() {
            errors.push(FieldError::new(format!("{path}.httpCookie.name"), "a cookie name is required"));
        }
        validate_duration(&cookie.ttl, &format!("{path}.httpCookie.ttl"), errors);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destination_rules_are_checked_as_istio_checks_them() {
        let rule = |yaml: &str| -> DestinationRule { serde_yaml_ng::from_str(yaml).unwrap() };
        let valid = "host: istio-egressgateway.istio-system.svc.cluster.local\nsubsets: [{name: httpbin}]\n\
                     trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}, tls: {mode: ISTIO_MUTUAL, sni: httpbin.org},\n\
                     connectionPool: {tcp: {connectTimeout: 250ms}},\n\
                     outlierDetection: {consecutive5xxErrors: 5, interval: 30s, baseEjectionTime: 1m, maxEjectionPercent: 50},\n\
                     portLevelSettings: [{port: {number: 443}, tls: {mode: SIMPLE}}]}";
        assert_eq!(rule(valid).validate(), vec![]);
        let invalid = [
            ("subsets: []", "spec.host", "required"),
            ("host: a.example\nsubsets: [{name: v1}, {name: v1}]", "spec.subsets[1].name", "defined twice"),
            ("host: a.example\nsubsets: [{labels: {v: '1'}}]", "spec.subsets[0].name", "required"),
            (
                "host: a.example\ntrafficPolicy: {loadBalancer: {simple: FASTEST}}",
                "spec.trafficPolicy.loadBalancer.simple",
                "unknown",
            ),
            (
                "host: a.example\ntrafficPolicy: {tls: {mode: MUTUAL, caCertificates: /etc/ca.pem}}",
                "spec.trafficPolicy.tls",
                "clientCertificate and privateKey",
            ),
            (
                "host: a.example\ntrafficPolicy: {tls: {mode: STRICT}}",
                "spec.trafficPolicy.tls.mode",
                "unknown TLS mode",
            ),
            (
                "host: a.example\ntrafficPolicy: {outlierDetection: {interval: often}}",
                "spec.trafficPolicy.outlierDetection.interval",
                "not a duration",
            ),
            (
                "host: a.example\ntrafficPolicy: {loadBalancer: {consistentHash: {httpHeaderName: x-user, useSourceIp: true}}}",
                "spec.trafficPolicy.loadBalancer.consistentHash",
                "only one of",
            ),
            (
                "host: a.example\ntrafficPolicy: {loadBalancer: {consistentHash: {httpCookie: {ttl: 0s}}}}",
                "spec.trafficPolicy.loadBalancer.consistentHash.httpCookie.name",
                "required",
            ),
            (
                "host: a.example\ntrafficPolicy: {loadBalancer: {consistentHash: {httpHeaderName: 'x user'}}}",
                "spec.trafficPolicy.loadBalancer.consistentHash.httpHeaderName",
                "not a header name",
            ),
            (
                "host: a.example\ntrafficPolicy: {connectionPool: {tcp: {connectTimeout: soon}}}",
                "spec.trafficPolicy.connectionPool.tcp.connectTimeout",
                "not a duration",
            ),
            (
                "host: a.example\ntrafficPolicy: {portLevelSettings: [{tls: {mode: SIMPLE}}]}",
                "spec.trafficPolicy.portLevelSettings[0].port",
                "required",
            ),
        ];
        for (yaml, path, reason) in invalid {
            let errors = rule(yaml).validate();
            assert!(errors.iter().any(|e| e.path == path && e.reason.contains(reason)), "{yaml}\n{errors:?}");
        }
    }
}
