//! Istio's validation of a DestinationRule: its host and subsets, and every part of a traffic policy
//! (load balancer, consistent hash, locality, connection pool, outlier detection, client TLS, tunnel).

use std::collections::HashSet;

use serde_json::Value;

use super::{
    ClientTls, ConsistentHash, DestinationRule, LoadBalancer, LocalityLbSetting, OutlierDetection, PolicySettings,
    TrafficPolicy,
};
use crate::config::{
    error::FieldError,
    fields::{duration_problem, subset_name_problem, validate_duration, validate_port},
    names,
};

const LB_SIMPLE: [&str; 6] = ["UNSPECIFIED", "LEAST_CONN", "RANDOM", "PASSTHROUGH", "ROUND_ROBIN", "LEAST_REQUEST"];
const TLS_MODES: [&str; 4] = ["DISABLE", "SIMPLE", "MUTUAL", "ISTIO_MUTUAL"];
/// Envoy's largest Maglev table (a prime below it is required).
const MAGLEV_MAX: u64 = 5_000_011;
const TOPOLOGY_LABELS: [&str; 3] =
    ["topology.kubernetes.io/region", "topology.kubernetes.io/zone", "topology.istio.io/subzone"];

impl DestinationRule {
    pub fn validate(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        if self.host.is_empty() {
            errors.push(FieldError::new("spec.host", "a host is required"));
        } else if let Err(reason) = names::wildcard_domain(&self.host) {
            errors.push(FieldError::new("spec.host", reason));
        }
        if let Some(policy) = &self.traffic_policy {
            policy.validate("spec.trafficPolicy", &mut errors);
        }
        let mut subsets = HashSet::new();
        for (i, subset) in self.subsets.iter().enumerate() {
            let path = format!("spec.subsets[{i}]");
            if let Some(reason) = subset_name_problem(&subset.name) {
                errors.push(FieldError::new(format!("{path}.name"), reason));
            } else if !subsets.insert(subset.name.as_str()) {
                errors.push(FieldError::new(
                    format!("{path}.name"),
                    format!("subset '{}' is defined twice", subset.name),
                ));
            }
            names::validate_labels(&subset.labels, &format!("{path}.labels"), &mut errors);
            if let Some(policy) = &subset.traffic_policy {
                policy.validate(&format!("{path}.trafficPolicy"), &mut errors);
            }
        }
        if let Some(selector) = &self.workload_selector {
            names::validate_selector(&selector.match_labels, "spec.workloadSelector.matchLabels", &mut errors);
        }
        errors
    }
}

impl TrafficPolicy {
    fn validate(&self, path: &str, errors: &mut Vec<FieldError>) {
        if self.settings.is_empty()
            && self.port_level_settings.is_empty()
            && self.tunnel.is_none()
            && self.proxy_protocol.is_none()
        {
            errors.push(FieldError::new(path, "a traffic policy must set at least one field"));
            return;
        }
        if self.tunnel.is_some() && self.proxy_protocol.is_some() {
            errors.push(FieldError::new(path, "tunnel and proxyProtocol may not be set together"));
            return;
        }
        self.settings.validate(path, errors);
        for (i, port) in self.port_level_settings.iter().enumerate() {
            let path = format!("{path}.portLevelSettings[{i}]");
            match &port.port {
                Some(port) => validate_port(port.number, &format!("{path}.port.number"), errors),
                None => errors.push(FieldError::new(format!("{path}.port"), "a port is required")),
            }
            if port.settings.is_empty() {
                errors.push(FieldError::new(&path, "a port's traffic policy must set at least one field"));
            } else {
                port.settings.validate(&path, errors);
            }
        }
        if let Some(tunnel) = &self.tunnel {
            let path = format!("{path}.tunnel");
            if let Some(protocol) = tunnel.protocol.as_deref().filter(|p| !matches!(*p, "" | "CONNECT" | "POST")) {
                errors
                    .push(FieldError::new(format!("{path}.protocol"), format!("'{protocol}' is not CONNECT or POST")));
            }
            if names::fqdn(&tunnel.target_host).is_err() && !names::is_ip(&tunnel.target_host) {
                errors.push(FieldError::new(
                    format!("{path}.targetHost"),
                    format!("'{}' is not a host name or IP address", tunnel.target_host),
                ));
            }
            validate_port(tunnel.target_port, &format!("{path}.targetPort"), errors);
        }
        if let Some(version) =
            self.proxy_protocol.as_ref().and_then(|p| p.version.as_deref()).filter(|v| !matches!(*v, "V1" | "V2"))
        {
            errors
                .push(FieldError::new(format!("{path}.proxyProtocol.version"), format!("'{version}' is not V1 or V2")));
        }
    }
}

impl PolicySettings {
    fn is_empty(&self) -> bool {
        self.load_balancer.is_none()
            && self.connection_pool.is_none()
            && self.outlier_detection.is_none()
            && self.tls.is_none()
    }

    fn validate(&self, path: &str, errors: &mut Vec<FieldError>) {
        if let Some(outlier) = &self.outlier_detection {
            outlier.validate(&format!("{path}.outlierDetection"), errors);
        }
        if let Some(pool) = &self.connection_pool {
            validate_connection_pool(pool, &format!("{path}.connectionPool"), errors);
        }
        if let Some(balancer) = &self.load_balancer {
            balancer.validate(&format!("{path}.loadBalancer"), self.outlier_detection.is_some(), errors);
        }
        if let Some(tls) = &self.tls {
            tls.validate(&format!("{path}.tls"), errors);
        }
    }
}

impl OutlierDetection {
    fn validate(&self, path: &str, errors: &mut Vec<FieldError>) {
        validate_duration(&self.interval, &format!("{path}.interval"), errors);
        validate_duration(&self.base_ejection_time, &format!("{path}.baseEjectionTime"), errors);
        if !self.split_external_local_origin_errors && self.consecutive_local_origin_failures.is_some_and(|n| n > 0) {
            errors.push(FieldError::new(
                format!("{path}.consecutiveLocalOriginFailures"),
                "needs splitExternalLocalOriginErrors: true",
            ));
        }
        for (field, percent) in
            [("maxEjectionPercent", self.max_ejection_percent), ("minHealthPercent", self.min_health_percent)]
        {
            if let Some(percent) = percent.filter(|percent| !(0..=100).contains(percent)) {
                errors.push(FieldError::new(
                    format!("{path}.{field}"),
                    format!("{percent} is not a percentage (0 to 100)"),
                ));
            }
        }
    }
}

/// The connection pool as Istio checks it; it is kept as read (the proxy takes its limits from it).
fn validate_connection_pool(pool: &Value, path: &str, errors: &mut Vec<FieldError>) {
    let (http, tcp) = (pool.get("http"), pool.get("tcp"));
    if http.is_none() && tcp.is_none() {
        errors.push(FieldError::new(path, "a connection pool must set http or tcp"));
        return;
    }
    let counts = |section: &Value, section_path: &str, fields: &[&str], errors: &mut Vec<FieldError>| {
        for field in fields {
            match section.get(field) {
                Some(value) if value.as_i64().is_some_and(|n| n < 0) => errors
                    .push(FieldError::new(format!("{section_path}.{field}"), format!("{value} may not be negative"))),
                Some(value) if value.as_i64().is_none() => errors
                    .push(FieldError::new(format!("{section_path}.{field}"), format!("{value} is not a whole number"))),
                _ => {}
            }
        }
    };
    let durations = |section: &Value, section_path: &str, fields: &[&str], errors: &mut Vec<FieldError>| {
        for field in fields {
            let Some(value) = section.get(field) else { continue };
            let path = format!("{section_path}.{field}");
            match value.as_str() {
                Some(text) => {
                    if let Some(reason) = duration_problem(text) {
                        errors.push(FieldError::new(path, reason));
                    }
                }
                None => errors.push(FieldError::new(path, format!("{value} is not a duration (like 10s or 250ms)"))),
            }
        }
    };
    if let Some(http) = http {
        let path = format!("{path}.http");
        let fields = [
            "http1MaxPendingRequests",
            "http2MaxRequests",
            "maxRequestsPerConnection",
            "maxRetries",
            "maxConcurrentStreams",
        ];
        counts(http, &path, &fields, errors);
        durations(http, &path, &["idleTimeout"], errors);
        let upgrade = http.get("h2UpgradePolicy").and_then(Value::as_str) == Some("UPGRADE");
        if upgrade && http.get("useClientProtocol").and_then(Value::as_bool) == Some(true) {
            errors.push(FieldError::new(
                format!("{path}.useClientProtocol"),
                "useClientProtocol may not be true with h2UpgradePolicy UPGRADE",
            ));
        }
    }
    if let Some(tcp) = tcp {
        let path = format!("{path}.tcp");
        counts(tcp, &path, &["maxConnections"], errors);
        durations(tcp, &path, &["connectTimeout", "maxConnectionDuration", "idleTimeout"], errors);
        if let Some(keepalive) = tcp.get("tcpKeepalive") {
            crate::config::fields::keepalive_problems(keepalive, &format!("{path}.tcpKeepalive"), errors);
        }
    }
}

impl LoadBalancer {
    fn validate(&self, path: &str, has_outlier: bool, errors: &mut Vec<FieldError>) {
        if let Some(simple) = self.simple.as_deref().filter(|simple| !LB_SIMPLE.contains(simple)) {
            errors.push(FieldError::new(
                format!("{path}.simple"),
                format!("unknown load balancer '{simple}' ({})", LB_SIMPLE.join(", ")),
            ));
        }
        if let Some(hash) = &self.consistent_hash {
            hash.validate(&format!("{path}.consistentHash"), errors);
        }
        if let Some(locality) = &self.locality_lb_setting {
            validate_locality(locality, &format!("{path}.localityLbSetting"), has_outlier, errors);
        }
        validate_duration(&self.warmup_duration_secs, &format!("{path}.warmupDurationSecs"), errors);
    }
}

impl ConsistentHash {
    /// One hash key, as the oneof in Istio's API allows; a cookie needs a name, a header a valid header name;
    /// Maglev's table a prime size.
    fn validate(&self, path: &str, errors: &mut Vec<FieldError>) {
        let keys = [
            self.http_header_name.is_some(),
            self.http_cookie.is_some(),
            self.use_source_ip,
            self.http_query_parameter_name.is_some(),
        ];
        if keys.iter().filter(|&&set| set).count() > 1 {
            errors.push(FieldError::new(
                path,
                "only one of httpHeaderName, httpCookie, useSourceIp and httpQueryParameterName may be set",
            ));
        }
        if let Some(name) = &self.http_header_name {
            if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                errors
                    .push(FieldError::new(format!("{path}.httpHeaderName"), format!("'{name}' is not a header name")));
            }
        }
        if let Some(cookie) = &self.http_cookie {
            if cookie.name.is_empty() {
                errors.push(FieldError::new(format!("{path}.httpCookie.name"), "a cookie name is required"));
            }
            // A cookie's TTL may be 0 (a session cookie), unlike timeouts.
            if let Some(Err(reason)) = cookie.ttl.as_deref().map(crate::config::fields::parse_duration) {
                errors.push(FieldError::new(format!("{path}.httpCookie.ttl"), reason));
            }
        }
        let algorithm = self.ring_hash.is_some() || self.maglev.is_some();
        if self.ring_hash.is_some() && self.maglev.is_some() {
            errors.push(FieldError::new(path, "only one of ringHash or maglev may be set"));
        }
        if self.minimum_ring_size.is_some_and(|size| size != 0) && algorithm {
            errors.push(FieldError::new(
                format!("{path}.minimumRingSize"),
                "minimumRingSize (deprecated) may not be set with ringHash or maglev",
            ));
        }
        if let Some(maglev) = &self.maglev {
            let size = maglev.table_size;
            let path = format!("{path}.maglev.tableSize");
            if size == 0 {
                errors.push(FieldError::new(path, "a Maglev table size is required"));
            } else if size >= MAGLEV_MAX {
                errors.push(FieldError::new(path, format!("{size} is not below {MAGLEV_MAX}")));
            } else if !is_prime(size) {
                errors.push(FieldError::new(path, format!("{size} is not a prime number")));
            }
        }
    }
}

fn is_prime(n: u64) -> bool {
    if n < 4 {
        return n > 1;
    }
    if n % 2 == 0 {
        return false;
    }
    (3..).step_by(2).take_while(|f| f * f <= n).all(|f| n % f != 0)
}

fn validate_locality(setting: &LocalityLbSetting, path: &str, has_outlier: bool, errors: &mut Vec<FieldError>) {
    let _ = has_outlier; // Istio only warns of failover without outlier detection.
    if !setting.distribute.is_empty() && !setting.failover.is_empty() {
        errors.push(FieldError::new(path, "distribute and failover may not be set together"));
        return;
    }
    if !setting.failover.is_empty() {
        if let Some(label) = setting.failover_priority.iter().find(|label| TOPOLOGY_LABELS.contains(&label.as_str())) {
            errors.push(FieldError::new(
                format!("{path}.failoverPriority"),
                format!("'{label}' may not be used with failover"),
            ));
            return;
        }
    }
    let mut sources = Vec::new();
    for (i, distribute) in setting.distribute.iter().enumerate() {
        let path = format!("{path}.distribute[{i}]");
        sources.push(distribute.from.as_str());
        if let Some((locality, weight)) = distribute.to.iter().find(|(_, weight)| !(1..=100).contains(*weight)) {
            errors.push(FieldError::new(format!("{path}.to.{locality}"), format!("weight {weight} is not 1 to 100")));
            return;
        }
        let total: u32 = distribute.to.values().sum();
        if total != 100 {
            errors.push(FieldError::new(format!("{path}.to"), format!("the weights add up to {total}, not 100")));
            return;
        }
        if let Some(reason) = localities_problem(distribute.to.keys().map(String::as_str)) {
            errors.push(FieldError::new(format!("{path}.to"), reason));
        }
    }
    if let Some(reason) = localities_problem(sources.into_iter()) {
        errors.push(FieldError::new(format!("{path}.distribute"), reason));
    }
    for (i, failover) in setting.failover.iter().enumerate() {
        let path = format!("{path}.failover[{i}]");
        if failover.from == failover.to {
            errors.push(FieldError::new(&path, "a failover must go from one region to another"));
        }
        if failover.from.contains('/') || failover.to.contains('/') {
            errors.push(FieldError::new(&path, "a failover names regions only (no '/')"));
        }
        if failover.from.contains('*') || failover.to.contains('*') {
            errors.push(FieldError::new(&path, "a failover region may not hold '*'"));
        }
    }
}

/// Localities (`region/zone/subzone`, a trailing `*` allowed) none of which overlaps another.
fn localities_problem<'a>(localities: impl Iterator<Item = &'a str>) -> Option<String> {
    let mut seen: Vec<[&str; 3]> = Vec::new();
    for locality in localities {
        let stars = locality.matches('*').count();
        if stars > 1 || (stars == 1 && !locality.ends_with('*')) {
            return Some(format!("locality '{locality}': one '*' at most, and only at the end"));
        }
        let parts: Vec<&str> = locality.splitn(3, '/').collect();
        if parts.iter().any(|part| part.is_empty()) {
            return Some(format!("locality '{locality}' has an empty region, zone or subzone"));
        }
        // A shorter locality covers all below it, as `*` does.
        let padded = [parts[0], parts.get(1).copied().unwrap_or("*"), parts.get(2).copied().unwrap_or("*")];
        let overlaps = |other: &[&str; 3]| (0..3).all(|i| padded[i] == other[i] || padded[i] == "*" || other[i] == "*");
        if seen.iter().any(overlaps) {
            return Some(format!("locality '{locality}' overlaps one listed before it"));
        }
        seen.push(padded);
    }
    None
}

impl ClientTls {
    fn validate(&self, path: &str, errors: &mut Vec<FieldError>) {
        let mode = self.mode.as_deref().unwrap_or("DISABLE");
        if !TLS_MODES.contains(&mode) {
            errors.push(FieldError::new(
                format!("{path}.mode"),
                format!("unknown TLS mode '{mode}' ({})", TLS_MODES.join(", ")),
            ));
        }
        if self.insecure_skip_verify == Some(true) {
            let conflicting = match mode {
                "SIMPLE" => {
                    self.ca_certificates.is_some()
                        || self.credential_name.is_some()
                        || !self.subject_alt_names.is_empty()
                }
                "MUTUAL" => self.ca_certificates.is_some() || !self.subject_alt_names.is_empty(),
                _ => false,
            };
            if conflicting {
                errors.push(FieldError::new(
                    format!("{path}.insecureSkipVerify"),
                    "with insecureSkipVerify, no caCertificates, subjectAltNames (or, for SIMPLE, credentialName) may be set",
                ));
            }
        }
        if matches!(mode, "SIMPLE" | "MUTUAL") && self.credential_name.is_some() {
            if self.client_certificate.is_some()
                || self.ca_certificates.is_some()
                || self.private_key.is_some()
                || self.ca_crl.is_some()
            {
                errors.push(FieldError::new(
                    format!("{path}.credentialName"),
                    "with credentialName, no clientCertificate, privateKey, caCertificates or caCrl may be set",
                ));
            }
            return;
        }
        if mode == "MUTUAL" && (self.client_certificate.is_none() || self.private_key.is_none()) {
            errors.push(FieldError::new(path, "MUTUAL needs clientCertificate and privateKey (or credentialName)"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(yaml: &str) -> DestinationRule {
        serde_yaml_ng::from_str(yaml).unwrap_or_else(|e| panic!("{yaml}: {e}"))
    }

    #[test]
    fn what_istio_accepts_is_accepted() {
        for yaml in [
            "host: istio-egressgateway.istio-system.svc.cluster.local\nsubsets: [{name: httpbin}]\n\
             trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}, tls: {mode: ISTIO_MUTUAL, sni: httpbin.org},\n\
             connectionPool: {tcp: {connectTimeout: 250ms}},\n\
             outlierDetection: {consecutive5xxErrors: 5, interval: 30s, baseEjectionTime: 1m, maxEjectionPercent: 50},\n\
             portLevelSettings: [{port: {number: 443}, tls: {mode: SIMPLE}}]}",
            "host: '*.example.com'\ntrafficPolicy: {loadBalancer: {consistentHash: {httpCookie: {name: s, ttl: 0s}, maglev: {tableSize: 65537}}}}",
            "host: a.example\ntrafficPolicy: {loadBalancer: {localityLbSetting: {distribute: [{from: us-west/zone1/*, to: {'us-west/zone1/*': 80, 'us-west/zone2/*': 20}}]}}}",
            "host: a.example\ntrafficPolicy: {tunnel: {protocol: CONNECT, targetHost: proxy.example, targetPort: 3128}}",
        ] {
            assert_eq!(rule(yaml).validate(), vec![], "{yaml}");
        }
    }

    #[test]
    fn what_istio_refuses_is_refused_with_its_field() {
        for (yaml, path, reason) in [
            ("subsets: []", "spec.host", "required"),
            ("host: 10.0.0.1", "spec.host", "all digits"),
            ("host: a.example\nsubsets: [{name: v1}, {name: v1}]", "spec.subsets[1].name", "defined twice"),
            ("host: a.example\nsubsets: [{labels: {v: '1'}}]", "spec.subsets[0].name", "may not be empty"),
            ("host: a.example\nsubsets: [{name: v_1}]", "spec.subsets[0].name", "not a subset name"),
            ("host: a.example\nsubsets: [{name: v1, labels: {'bad key!': x}}]", "spec.subsets[0].labels.bad key!", "not a label key"),
            ("host: a.example\ntrafficPolicy: {}", "spec.trafficPolicy", "at least one field"),
            ("host: a.example\ntrafficPolicy: {loadBalancer: {simple: FASTEST}}", "spec.trafficPolicy.loadBalancer.simple", "unknown"),
            ("host: a.example\ntrafficPolicy: {tls: {mode: MUTUAL, caCertificates: /etc/ca.pem}}", "spec.trafficPolicy.tls", "clientCertificate and privateKey"),
            ("host: a.example\ntrafficPolicy: {tls: {mode: STRICT}}", "spec.trafficPolicy.tls.mode", "unknown TLS mode"),
            ("host: a.example\ntrafficPolicy: {tls: {mode: SIMPLE, credentialName: c, caCertificates: /ca.pem}}", "spec.trafficPolicy.tls.credentialName", "with credentialName"),
            ("host: a.example\ntrafficPolicy: {outlierDetection: {interval: often}}", "spec.trafficPolicy.outlierDetection.interval", "not a duration"),
            ("host: a.example\ntrafficPolicy: {outlierDetection: {consecutiveLocalOriginFailures: 3}}", "spec.trafficPolicy.outlierDetection.consecutiveLocalOriginFailures", "splitExternalLocalOriginErrors"),
            ("host: a.example\ntrafficPolicy: {loadBalancer: {consistentHash: {httpHeaderName: x-user, useSourceIp: true}}}", "spec.trafficPolicy.loadBalancer.consistentHash", "only one of"),
            ("host: a.example\ntrafficPolicy: {loadBalancer: {consistentHash: {httpCookie: {ttl: 0s}}}}", "spec.trafficPolicy.loadBalancer.consistentHash.httpCookie.name", "required"),
            ("host: a.example\ntrafficPolicy: {loadBalancer: {consistentHash: {httpHeaderName: 'x user'}}}", "spec.trafficPolicy.loadBalancer.consistentHash.httpHeaderName", "not a header name"),
            ("host: a.example\ntrafficPolicy: {loadBalancer: {consistentHash: {useSourceIp: true, maglev: {tableSize: 1000}}}}", "spec.trafficPolicy.loadBalancer.consistentHash.maglev.tableSize", "not a prime"),
            ("host: a.example\ntrafficPolicy: {loadBalancer: {localityLbSetting: {distribute: [{from: a/*, to: {b/*: 60}}]}}}", "spec.trafficPolicy.loadBalancer.localityLbSetting.distribute[0].to", "add up to 60"),
            ("host: a.example\ntrafficPolicy: {loadBalancer: {localityLbSetting: {failover: [{from: us-east, to: us-east}]}}}", "spec.trafficPolicy.loadBalancer.localityLbSetting.failover[0]", "from one region to another"),
            ("host: a.example\ntrafficPolicy: {connectionPool: {tcp: {connectTimeout: soon}}}", "spec.trafficPolicy.connectionPool.tcp.connectTimeout", "not a duration"),
            ("host: a.example\ntrafficPolicy: {connectionPool: {tcp: {maxConnections: -1}}}", "spec.trafficPolicy.connectionPool.tcp.maxConnections", "negative"),
            ("host: a.example\ntrafficPolicy: {connectionPool: {}}", "spec.trafficPolicy.connectionPool", "http or tcp"),
            ("host: a.example\ntrafficPolicy: {portLevelSettings: [{tls: {mode: SIMPLE}}]}", "spec.trafficPolicy.portLevelSettings[0].port", "required"),
            ("host: a.example\ntrafficPolicy: {portLevelSettings: [{port: {number: 80}}]}", "spec.trafficPolicy.portLevelSettings[0]", "at least one field"),
            ("host: a.example\ntrafficPolicy: {tunnel: {targetHost: p.example, targetPort: 3128}, proxyProtocol: {version: V1}}", "spec.trafficPolicy", "may not be set together"),
            ("host: a.example\nworkloadSelector: {matchLabels: {app: '*'}}", "spec.workloadSelector.matchLabels.app", "wildcard"),
        ] {
            let errors = rule(yaml).validate();
            assert!(errors.iter().any(|e| e.path == path && e.reason.contains(reason)), "{yaml}\n{errors:?}");
        }
    }
}
