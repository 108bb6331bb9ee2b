//! What Istio's validation warns of but takes: said by `sluice check` and logged once by the agent, so that a
//! resource that works, but not as its author likely meant, does not pass in silence.

use std::collections::HashSet;

use super::{names, Resource, Spec};

/// The field and the warning, for each thing Istio would warn of in `resource`.
pub fn warnings(resource: &Resource) -> Vec<(String, String)> {
    let mut found = Vec::new();
    let mut warn = |path: String, reason: String| found.push((path, reason));
    match &resource.spec {
        Spec::ServiceEntry(entry) => {
            for (i, host) in entry.hosts.iter().enumerate() {
                if names::partial_wildcard(host).is_some() {
                    let suffix = host.trim_start_matches('*');
                    warn(
                        format!("spec.hosts[{i}]"),
                        format!("partial wildcard: '{host}' matches any name ending in '{suffix}'"),
                    );
                }
            }
            if entry.resolution() == super::service_entry::Resolution::None {
                for (i, _) in entry.ports.iter().enumerate().filter(|(_, port)| port.target_port.is_some()) {
                    warn(format!("spec.ports[{i}].targetPort"), "has no effect with resolution NONE".into());
                }
            }
        }
        Spec::VirtualService(service) => {
            let mut seen = Vec::new();
            for (i, route) in service.http.iter().enumerate() {
                if route.matches.is_empty() && i + 1 < service.http.len() {
                    warn(
                        format!("spec.http[{i}]"),
                        "a route without matches takes every request: the routes after it are never used".into(),
                    );
                }
                for (j, m) in route.matches.iter().enumerate() {
                    let mut unnamed = m.clone();
                    unnamed.name = None;
                    if seen.contains(&unnamed) {
                        warn(
                            format!("spec.http[{i}].match[{j}]"),
                            "an earlier route has the same match: it is never used".into(),
                        );
                    } else {
                        seen.push(unnamed);
                    }
                }
            }
            for (i, gateway) in service.gateways.iter().enumerate() {
                if let Some((name, namespace)) = gateway.split_once('.').filter(|_| !gateway.contains('/')) {
                    warn(
                        format!("spec.gateways[{i}]"),
                        format!("'{gateway}' is the legacy form: prefer '{namespace}/{name}'"),
                    );
                }
            }
        }
        Spec::Gateway(gateway) => {
            for (i, server) in gateway.servers.iter().enumerate() {
                let Some(tls) = &server.tls else { continue };
                let certificates = tls.server_certificate.is_some()
                    || tls.private_key.is_some()
                    || tls.ca_certificates.is_some()
                    || tls.credential_name.is_some();
                if matches!(tls.mode().as_str(), "PASSTHROUGH" | "AUTO_PASSTHROUGH") && certificates {
                    warn(
                        format!("spec.servers[{i}].tls"),
                        format!("{} does not use certificates: they are ignored", tls.mode()),
                    );
                }
            }
        }
        Spec::DestinationRule(rule) => {
            let policies = rule.traffic_policy.iter().map(|policy| ("spec.trafficPolicy".to_owned(), policy)).chain(
                (rule.subsets.iter().enumerate()).filter_map(|(i, subset)| {
                    Some((format!("spec.subsets[{i}].trafficPolicy"), subset.traffic_policy.as_ref()?))
                }),
            );
            for (path, policy) in policies {
                let settings = &policy.settings;
                if settings.outlier_detection.as_ref().is_some_and(|outlier| outlier.consecutive_errors.is_some()) {
                    warn(
                        format!("{path}.outlierDetection.consecutiveErrors"),
                        "deprecated: use consecutiveGatewayErrors or consecutive5xxErrors".into(),
                    );
                }
                let balancer = settings.load_balancer.as_ref();
                if balancer
                    .and_then(|lb| lb.consistent_hash.as_ref())
                    .is_some_and(|hash| hash.minimum_ring_size.is_some())
                {
                    warn(
                        format!("{path}.loadBalancer.consistentHash.minimumRingSize"),
                        "deprecated: use ringHash.minimumRingSize".into(),
                    );
                }
                let failover = balancer
                    .and_then(|lb| lb.locality_lb_setting.as_ref())
                    .is_some_and(|locality| !locality.failover.is_empty() || !locality.failover_priority.is_empty());
                if failover && settings.outlier_detection.is_none() {
                    warn(
                        format!("{path}.loadBalancer.localityLbSetting"),
                        "failover needs outlierDetection to notice an unhealthy locality".into(),
                    );
                }
            }
        }
        Spec::Sidecar(sidecar) => {
            if sidecar.workload_selector.as_ref().is_some_and(|selector| selector.labels.is_empty()) {
                warn("spec.workloadSelector".into(), "no labels: it applies to every workload of the namespace".into());
            }
            for (i, listener) in sidecar.egress.iter().enumerate() {
                let mut seen = HashSet::new();
                for (j, host) in listener.hosts.iter().enumerate() {
                    if !seen.insert(host.as_str()) {
                        warn(format!("spec.egress[{i}].hosts[{j}]"), format!("'{host}' is listed twice"));
                    }
                }
            }
        }
        Spec::AuthorizationPolicy(policy) => {
            if policy.selector.as_ref().is_some_and(|selector| selector.match_labels.is_empty()) {
                warn("spec.selector".into(), "no labels: it applies to every workload of the namespace".into());
            }
            if policy.action() == Ok(super::authorization_policy::Action::Deny) {
                for (i, rule) in policy.rules.iter().flatten().enumerate() {
                    let operations = rule.to.iter().flatten().filter_map(|to| to.operation.as_ref());
                    let http_only = operations.clone().any(|operation| {
                        !operation.methods.is_empty()
                            || !operation.not_methods.is_empty()
                            || !operation.paths.is_empty()
                            || !operation.not_paths.is_empty()
                    });
                    let names_ports = operations.clone().any(|operation| !operation.ports.is_empty());
                    if http_only && !names_ports {
                        warn(
                            format!("spec.rules[{i}]"),
                            "HTTP attributes in a DENY rule deny all TCP traffic it applies to: name the ports".into(),
                        );
                    }
                }
            }
        }
        Spec::Telemetry(telemetry) => {
            if telemetry.selector.as_ref().is_some_and(|selector| selector.match_labels.is_empty()) {
                warn("spec.selector".into(), "no labels: it applies to every workload of the namespace".into());
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Snapshot;

    #[test]
    fn what_istio_warns_of_is_said() {
        let yaml = "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: partial}
spec: {hosts: ['*bin.org'], ports: [{number: 80, name: http, targetPort: 8080}]}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: unreachable}
spec:
  hosts: [a.example]
  gateways: [egress.istio-system]
  http:
  - route: [{destination: {host: a.example}}]
  - match: [{uri: {prefix: /a}}]
    route: [{destination: {host: a.example}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-posts}
spec:
  action: DENY
  rules: [{to: [{operation: {methods: [POST]}}]}]
";
        let snapshot = Snapshot::from_yaml(yaml);
        let said: Vec<String> = (snapshot.resources.iter())
            .flat_map(|resource| warnings(resource).into_iter().map(|(path, why)| format!("{path}: {why}")))
            .collect();
        for expected in [
            "spec.hosts[0]: partial wildcard: '*bin.org' matches any name ending in 'bin.org'",
            "spec.ports[0].targetPort: has no effect with resolution NONE",
            "spec.http[0]: a route without matches takes every request",
            "spec.gateways[0]: 'egress.istio-system' is the legacy form: prefer 'istio-system/egress'",
            "spec.rules[0]: HTTP attributes in a DENY rule deny all TCP traffic",
        ] {
            assert!(said.iter().any(|line| line.starts_with(expected)), "{expected}\n{said:#?}");
        }
    }
}
