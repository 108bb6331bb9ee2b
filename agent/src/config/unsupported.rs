//! The fields of valid resources that Sluice reads but does not apply yet: named, so the agent can warn once per
//! resource instead of letting a setting be ignored in silence.

use super::{
    destination_rule::{PolicySettings, TrafficPolicy},
    Resource, Spec,
};

/// Why a source match holds for no request when the pods are not watched.
const NO_SOURCES: &str = "sources are known only with --kube (the pods watched): without it, this match never holds";

/// The paths of the fields `resource` sets that have no effect in Sluice, each with why. `knows_sources`: the
/// pods behind the gateway are watched (`--kube`), so `sourceLabels` and `sourceNamespace` can hold.
pub fn fields(resource: &Resource, knows_sources: bool) -> Vec<(String, &'static str)> {
    let mut found = Vec::new();
    match &resource.spec {
        Spec::VirtualService(service) => {
            if !knows_sources {
                let http = service.http.iter().enumerate().flat_map(|(i, route)| {
                    let matches = route.matches.iter().enumerate();
                    matches.map(move |(j, m)| {
                        (
                            format!("spec.http[{i}].match[{j}]"),
                            !m.source_labels.is_empty(),
                            m.source_namespace.is_some(),
                        )
                    })
                });
                let tls = service.tls.iter().enumerate().flat_map(|(i, route)| {
                    let matches = route.matches.iter().enumerate();
                    matches.map(move |(j, m)| {
                        (
                            format!("spec.tls[{i}].match[{j}]"),
                            !m.l4.source_labels.is_empty(),
                            m.l4.source_namespace.is_some(),
                        )
                    })
                });
                let tcp = service.tcp.iter().enumerate().flat_map(|(i, route)| {
                    let matches = route.matches.iter().enumerate();
                    matches.map(move |(j, m)| {
                        (format!("spec.tcp[{i}].match[{j}]"), !m.source_labels.is_empty(), m.source_namespace.is_some())
                    })
                });
                for (path, labels, namespace) in http.chain(tls).chain(tcp) {
                    if labels {
                        found.push((format!("{path}.sourceLabels"), NO_SOURCES));
                    }
                    if namespace {
                        found.push((format!("{path}.sourceNamespace"), NO_SOURCES));
                    }
                }
            }
            for (i, route) in service.http.iter().enumerate() {
                if route.fault.as_ref().and_then(|f| f.abort.as_ref()).is_some_and(|a| a.http_status.is_none()) {
                    found.push((format!("spec.http[{i}].fault.abort.grpcStatus"), "gRPC aborts are not injected"));
                }
            }
        }
        Spec::DestinationRule(rule) => {
            if rule.workload_selector.is_some() {
                found.push(("spec.workloadSelector".into(), "the rule applies to every workload it is exported to"));
            }
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
                let Some(tls) = &server.tls else { continue };
                let mode = tls.mode();
                let path = format!("spec.servers[{i}].tls");
                if !tls.terminates() && mode != "PASSTHROUGH" && tls.https_redirect != Some(true) {
                    found.push((format!("{path}.mode"), "AUTO_PASSTHROUGH servers are not served yet"));
                }
                let old = |version: &Option<String>| matches!(version.as_deref(), Some("TLSV1_0" | "TLSV1_1"));
                if old(&tls.min_protocol_version) {
                    found.push((
                        format!("{path}.minProtocolVersion"),
                        "TLS 1.0 and 1.1 are not spoken: 1.2 is the least",
                    ));
                }
                if tls.https_redirect == Some(true) && !server.port.protocol.eq_ignore_ascii_case("HTTP") {
                    found.push((format!("{path}.httpsRedirect"), "redirects are sent from HTTP servers only"));
                }
            }
        }
        Spec::AuthorizationPolicy(policy) => {
            for (i, rule) in policy.rules.iter().flatten().enumerate() {
                for (j, from) in rule.from.iter().flatten().enumerate() {
                    let Some(source) = &from.source else { continue };
                    if !source.request_principals.is_empty() || !source.not_request_principals.is_empty() {
                        found.push((
                            format!("spec.rules[{i}].from[{j}].source.requestPrincipals"),
                            "JWTs are not validated: requestPrincipals never match",
                        ));
                    }
                }
            }
        }
        Spec::Telemetry(telemetry) => {
            if !telemetry.tracing.is_empty() {
                found.push(("spec.tracing".into(), "Sluice does not trace: tracing settings are not applied"));
            }
            let mut refs = telemetry.target_ref.iter().chain(&telemetry.target_refs);
            if refs.any(|target| target.target_kind() == crate::config::authorization_policy::TargetKind::Other) {
                found.push((
                    "spec.targetRefs".into(),
                    "only a Service or a Kubernetes Gateway can name this gateway: other targets are not applied",
                ));
            }
        }
        Spec::ServiceEntry(_) => {}
    }
    found
}

fn traffic_policy(policy: &TrafficPolicy, path: &str, found: &mut Vec<(String, &'static str)>) {
    if policy.tunnel.is_some() {
        found.push((format!("{path}.tunnel"), "connections are not tunnelled through the destination"));
    }
    if policy.proxy_protocol.is_some() {
        found.push((format!("{path}.proxyProtocol"), "no PROXY protocol header is sent to the destination"));
    }
    settings(&policy.settings, path, found);
    for (i, port) in policy.port_level_settings.iter().enumerate() {
        settings(&port.settings, &format!("{path}.portLevelSettings[{i}]"), found);
    }
}

fn settings(settings: &PolicySettings, path: &str, found: &mut Vec<(String, &'static str)>) {
    // ISTIO_MUTUAL secures the hop from a sidecar to the gateway, which Sluice makes in process.
    if let Some(tls) = &settings.tls {
        if !tls.subject_alt_names.is_empty() {
            found.push((format!("{path}.tls.subjectAltNames"), "the certificate is checked against the SNI name"));
        }
    }
    if let Some(balancer) = &settings.load_balancer {
        if balancer.locality_lb_setting.is_some() {
            let why = "one gateway node has one locality: endpoints are balanced without regard to theirs";
            found.push((format!("{path}.loadBalancer.localityLbSetting"), why));
        }
        if balancer.warmup_duration_secs.is_some() {
            found.push((format!("{path}.loadBalancer.warmupDurationSecs"), "new endpoints take their share at once"));
        }
    }
    if let Some(outlier) = &settings.outlier_detection {
        if outlier.min_health_percent.is_some_and(|percent| percent > 0) {
            let why = "ejection is bounded by maxEjectionPercent alone";
            found.push((format!("{path}.outlierDetection.minHealthPercent"), why));
        }
        if outlier.split_external_local_origin_errors {
            let why = "connection failures count as gateway errors, not apart";
            found.push((format!("{path}.outlierDetection.splitExternalLocalOriginErrors"), why));
        }
    }
    let http = settings.connection_pool.as_ref().and_then(|pool| pool.get("http"));
    let set = |field: &str| http.and_then(|http| http.get(field)).filter(|value| !value.is_null());
    let unapplied = [
        ("maxConcurrentStreams", "an HTTP/2 upstream connection carries as many streams as its server allows"),
        ("useClientProtocol", "the upstream's protocol is its service port's, whatever the client spoke"),
    ];
    for (field, why) in unapplied {
        let applies = match field {
            "useClientProtocol" => set(field).and_then(serde_json::Value::as_bool) == Some(true),
            _ => set(field).is_some(),
        };
        if applies {
            found.push((format!("{path}.connectionPool.http.{field}"), why));
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
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: g}
spec:
  servers:
  - {port: {number: 443, name: a, protocol: HTTPS}, hosts: ['*'], tls: {mode: SIMPLE, credentialName: c}}
  - {port: {number: 444, name: b, protocol: HTTPS}, hosts: ['*'], tls: {mode: AUTO_PASSTHROUGH}}
  - {port: {number: 445, name: c, protocol: TLS}, hosts: ['*'], tls: {mode: MUTUAL, credentialName: c}}
  - {port: {number: 446, name: d, protocol: HTTPS}, hosts: ['*'], tls: {mode: PASSTHROUGH}}
  - {port: {number: 80, name: e, protocol: HTTP}, hosts: ['*'], tls: {httpsRedirect: true}}
",
        );
        let named: Vec<Vec<String>> = snapshot
            .resources
            .iter()
            .map(|resource| fields(resource, false).into_iter().map(|(path, _)| path).collect())
            .collect();
        assert_eq!(
            named,
            [
                vec!["spec.http[0].fault.abort.grpcStatus".to_owned()],
                vec![],
                vec![],
                vec!["spec.servers[1].tls.mode".to_owned()],
            ]
        );
    }

    #[test]
    fn connection_pool_fields_without_effect_are_named_and_applied_ones_are_not() {
        let snapshot = Snapshot::from_yaml(
            "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: a}
spec:
  host: a.example
  trafficPolicy:
    connectionPool:
      tcp: {maxConnections: 4, connectTimeout: 1s, maxConnectionDuration: 1h, tcpKeepalive: {time: 60s}}
      http: {maxRequestsPerConnection: 10, idleTimeout: 30s, maxRetries: 3, h2UpgradePolicy: UPGRADE}
    portLevelSettings:
    - port: {number: 8443}
      connectionPool: {http: {useClientProtocol: true, maxConcurrentStreams: 100}}
",
        );
        let paths: Vec<String> = fields(&snapshot.resources[0], false).into_iter().map(|(path, _)| path).collect();
        assert_eq!(
            paths,
            [
                "spec.trafficPolicy.portLevelSettings[0].connectionPool.http.maxConcurrentStreams",
                "spec.trafficPolicy.portLevelSettings[0].connectionPool.http.useClientProtocol",
            ]
        );
    }

    #[test]
    fn destination_rule_fields_checked_but_not_applied_are_named() {
        let snapshot = Snapshot::from_yaml(
            "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: a}
spec:
  host: a.example
  workloadSelector: {matchLabels: {app: a}}
  trafficPolicy:
    tunnel: {protocol: CONNECT, targetHost: a.example, targetPort: 443}
    proxyProtocol: {version: V2}
    loadBalancer: {simple: ROUND_ROBIN, warmupDurationSecs: 60s}
    outlierDetection: {consecutive5xxErrors: 3, minHealthPercent: 50, splitExternalLocalOriginErrors: true}
",
        );
        let paths: Vec<String> = fields(&snapshot.resources[0], false).into_iter().map(|(path, _)| path).collect();
        assert_eq!(
            paths,
            [
                "spec.workloadSelector",
                "spec.trafficPolicy.tunnel",
                "spec.trafficPolicy.proxyProtocol",
                "spec.trafficPolicy.loadBalancer.warmupDurationSecs",
                "spec.trafficPolicy.outlierDetection.minHealthPercent",
                "spec.trafficPolicy.outlierDetection.splitExternalLocalOriginErrors",
            ]
        );
    }

    #[test]
    fn source_matches_are_named_unless_the_pods_are_watched() {
        let snapshot = Snapshot::from_yaml(
            "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: s}
spec:
  hosts: [s.example]
  http: [{match: [{sourceLabels: {app: a}}], route: [{destination: {host: s.example}}]}]
  tcp: [{match: [{sourceNamespace: team-a}], route: [{destination: {host: s.example}}]}]
",
        );
        let paths = |knows_sources| -> Vec<String> {
            fields(&snapshot.resources[0], knows_sources).into_iter().map(|(path, _)| path).collect()
        };
        assert_eq!(paths(false), ["spec.http[0].match[0].sourceLabels", "spec.tcp[0].match[0].sourceNamespace"]);
        assert!(paths(true).is_empty(), "with --kube they hold");
    }
}
