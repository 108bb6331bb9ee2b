//! The fields of valid resources that Sluice reads but does not apply yet: named, so the agent can warn once per
//! resource instead of letting a setting be ignored in silence.

use super::{
    destination_rule::{PolicySettings, TrafficPolicy},
    Resource, Spec,
};

/// The paths of the fields `resource` sets that have no effect in Sluice, each with why.
pub fn fields(resource: &Resource) -> Vec<(String, &'static str)> {
    let mut found = Vec::new();
    match &resource.spec {
        Spec::VirtualService(service) => {
            for (i, route) in service.http.iter().enumerate() {
                for (j, m) in route.matches.iter().enumerate() {
                    let path = format!("spec.http[{i}].match[{j}]");
                    if !m.source_labels.is_empty() {
                        found.push((format!("{path}.sourceLabels"), "workload labels are not known to the gateway"));
                    }
                    if m.source_namespace.is_some() {
                        found.push((
                            format!("{path}.sourceNamespace"),
                            "workload namespaces are not known to the gateway",
                        ));
                    }
                }
                if route.fault.as_ref().and_then(|f| f.abort.as_ref()).is_some_and(|a| a.http_status.is_none()) {
                    found.push((format!("spec.http[{i}].fault.abort.grpcStatus"), "gRPC aborts are not injected"));
                }
            }
        }
        Spec::DestinationRule(rule) => {
            if let Some(policy) = &rule.traffic_policy {
                traffic_policy(policy, "spec.trafficPolicy", &mut found);
            }
            for (i, subset) in rule.subsets.iter().enumerate() {
                if let Some(policy) = &subset.traffic_policy {
                    traffic_policy(policy, &format!("spec.subsets[{i}].trafficPolicy"), &mut found);
                }
            }
        }
        Spec::Sidecar(sidecar) => {
            for (i, listener) in sidecar.egress.iter().enumerate() {
                if listener.bind.is_some() {
                    found.push((format!("spec.egress[{i}].bind"), "the node's interception decides what is heard"));
                }
            }
        }
        Spec::Gateway(gateway) => {
            for (i, server) in gateway.servers.iter().enumerate() {
                let mode = server.tls.as_ref().and_then(|tls| tls.mode.as_deref());
                if mode.is_some_and(|mode| !mode.eq_ignore_ascii_case("PASSTHROUGH")) {
                    found.push((
                        format!("spec.servers[{i}].tls.mode"),
                        "TLS is not terminated at the gateway yet: this server is not served",
                    ));
                }
            }
        }
        Spec::ServiceEntry(_) => {}
    }
    found
}

fn traffic_policy(policy: &TrafficPolicy, path: &str, found: &mut Vec<(String, &'static str)>) {
    settings(&policy.settings, path, found);
    for (i, port) in policy.port_level_settings.iter().enumerate() {
        settings(&port.settings, &format!("{path}.portLevelSettings[{i}]"), found);
    }
}

fn settings(settings: &PolicySettings, path: &str, found: &mut Vec<(String, &'static str)>) {
    // ISTIO_MUTUAL secures the hop from a sidecar to the gateway, which Sluice makes in process.
    if let Some(tls) = &settings.tls {
        if tls.credential_name.is_some() {
            found.push((
                format!("{path}.tls.credentialName"),
                "Secrets are not read: give caCertificates (and clientCertificate, privateKey); requests are refused",
            ));
        }
        if !tls.subject_alt_names.is_empty() {
            found.push((format!("{path}.tls.subjectAltNames"), "the certificate is checked against the SNI name"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Snapshot;

    #[test]
    fn fields_read_but_not_applied_are_named() {
        let snapshot = Snapshot::from_yaml(
            "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: a}
spec:
  hosts: [a.example]
  http: [{fault: {abort: {grpcStatus: UNAVAILABLE, percentage: {value: 1}}}, route: [{destination: {host: a.example}}]}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: a}
spec:
  host: a.example
  trafficPolicy:
    tls: {mode: SIMPLE, credentialName: api-ca}
    connectionPool: {tcp: {connectTimeout: 1s, maxConnections: 4}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: b}
spec: {hosts: [b.example], http: [{route: [{destination: {host: b.example}}]}]}
",
        );
        let named: Vec<Vec<String>> = snapshot
            .resources
            .iter()
            .map(|resource| fields(resource).into_iter().map(|(path, _)| path).collect())
            .collect();
        assert_eq!(
            named,
            [
                vec!["spec.http[0].fault.abort.grpcStatus".to_owned()],
                vec!["spec.trafficPolicy.tls.credentialName".to_owned()],
                vec![],
            ]
        );
    }
}
