//! Sidecar (`networking.istio.io`): the outbound traffic policy and egress hosts of a namespace's workloads; and
//! Istio's checks of it, listener structure and ports included.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use super::{
    error::FieldError,
    fields::{is_protocol, validate_port, Destination, WorkloadSelector, PROTOCOLS},
    gateway::GatewayPort,
    mesh::{OutboundTrafficMode, OutboundTrafficPolicy},
    names::{self, HostsOf},
};

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Sidecar {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload_selector: Option<WorkloadSelector>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress: Vec<EgressListener>,
    /// Inbound listeners: checked as Istio checks them; the gateway has no inbound side to apply them to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ingress: Vec<IngressListener>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outbound_traffic_policy: Option<OutboundTrafficPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inbound_connection_pool: Option<serde_json::Value>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EgressListener {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<GatewayPort>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capture_mode: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct IngressListener {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<GatewayPort>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_endpoint: Option<String>,
}

const UNIX: &str = "unix://";

impl Sidecar {
    pub fn validate(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        if let Some(selector) = &self.workload_selector {
            names::validate_selector(&selector.labels, "spec.workloadSelector.labels", &mut errors);
        }
        if self.egress.is_empty()
            && self.ingress.is_empty()
            && self.outbound_traffic_policy.is_none()
            && self.inbound_connection_pool.is_none()
        {
            errors.push(FieldError::new(
                "spec",
                "a Sidecar must set egress, ingress, outboundTrafficPolicy or inboundConnectionPool",
            ));
        }
        let mut ports = HashSet::new();
        for (i, listener) in self.ingress.iter().enumerate() {
            let path = format!("spec.ingress[{i}]");
            let Some(port) = &listener.port else {
                errors.push(FieldError::new(format!("{path}.port"), "an ingress listener needs a port"));
                continue;
            };
            validate_listener_port(port, &path, &mut errors);
            validate_port(port.number, &format!("{path}.port.number"), &mut errors);
            if let Some(bind) = listener.bind.as_deref().filter(|bind| !names::is_ip(bind)) {
                errors.push(FieldError::new(format!("{path}.bind"), format!("'{bind}' is not an IP address")));
            }
            if !ports.insert(port.number) {
                errors.push(FieldError::new(
                    format!("{path}.port.number"),
                    format!("port {} is used twice", port.number),
                ));
            }
            if let Some(reason) = listener.default_endpoint.as_deref().and_then(default_endpoint_problem) {
                errors.push(FieldError::new(format!("{path}.defaultEndpoint"), reason));
            }
        }
        let mut ports = HashSet::new();
        let mut sockets = HashSet::new();
        let last = self.egress.len().saturating_sub(1);
        for (i, listener) in self.egress.iter().enumerate() {
            let path = format!("spec.egress[{i}]");
            match &listener.port {
                // The catch-all listener (no port) must be the last, so there is one at most.
                None if i != last => {
                    errors.push(FieldError::new(&path, "the egress listener without a port must be the last one"));
                }
                None => {}
                Some(port) => {
                    validate_listener_port(port, &path, &mut errors);
                    let bind = listener.bind.as_deref().unwrap_or("");
                    if port.number == 0 {
                        match bind.strip_prefix(UNIX) {
                            None => errors.push(FieldError::new(
                                format!("{path}.bind"),
                                "port 0 needs a unix domain socket bind (unix://path)",
                            )),
                            Some(socket) if !socket.starts_with('/') && !socket.starts_with('@') => errors.push(
                                FieldError::new(format!("{path}.bind"), format!("'{socket}' is not an absolute path")),
                            ),
                            Some(_) => {}
                        }
                        if !sockets.insert(bind) {
                            errors.push(FieldError::new(format!("{path}.bind"), format!("'{bind}' is used twice")));
                        }
                        if listener.capture_mode.as_deref().is_some_and(|mode| !matches!(mode, "DEFAULT" | "NONE")) {
                            errors.push(FieldError::new(
                                format!("{path}.captureMode"),
                                "a unix domain socket listener's captureMode must be DEFAULT or NONE",
                            ));
                        }
                    } else {
                        validate_port(port.number, &format!("{path}.port.number"), &mut errors);
                        if !bind.is_empty() && !names::is_ip(bind) {
                            errors.push(FieldError::new(
                                format!("{path}.bind"),
                                format!("'{bind}' is not an IP address"),
                            ));
                        }
                        if !ports.insert(port.number) {
                            errors.push(FieldError::new(
                                format!("{path}.port.number"),
                                format!("port {} is used twice", port.number),
                            ));
                        }
                    }
                }
            }
            if listener.hosts.is_empty() {
                errors.push(FieldError::new(format!("{path}.hosts"), "at least one host is required"));
            }
            for (j, host) in listener.hosts.iter().enumerate() {
                if let Err(reason) = names::namespaced_host(host, HostsOf::Sidecar) {
                    errors.push(FieldError::new(format!("{path}.hosts[{j}]"), reason));
                }
            }
        }
        if let Some(policy) = &self.outbound_traffic_policy {
            validate_egress_proxy(policy, &mut errors);
        }
        errors
    }
}

/// What ingress and egress listeners' ports share: a name if any is a DNS label, a known protocol, no target port.
fn validate_listener_port(port: &GatewayPort, path: &str, errors: &mut Vec<FieldError>) {
    if port.target_port.is_some_and(|target| target > 0) {
        errors.push(FieldError::new(format!("{path}.port.targetPort"), "targetPort has no effect in a Sidecar"));
    }
    if !port.name.is_empty() && !names::is_dns_label(&port.name) {
        errors.push(FieldError::new(format!("{path}.port.name"), format!("'{}' is not a port name", port.name)));
    }
    if !port.protocol.is_empty() && !is_protocol(&port.protocol) {
        errors.push(FieldError::new(
            format!("{path}.port.protocol"),
            format!("unknown protocol '{}' ({PROTOCOLS})", port.protocol),
        ));
    }
}

/// `127.0.0.1:PORT`, `0.0.0.0:PORT`, `[::1]:PORT`, `[::]:PORT`, `:PORT` or `unix://PATH`.
fn default_endpoint_problem(endpoint: &str) -> Option<String> {
    if let Some(socket) = endpoint.strip_prefix(UNIX) {
        return (!socket.starts_with('/') && !socket.starts_with('@'))
            .then(|| format!("'{socket}' is not an absolute path"));
    }
    let forms = "127.0.0.1:PORT, 0.0.0.0:PORT, [::1]:PORT, [::]:PORT or unix://PATH";
    let Some((host, port)) = endpoint.rsplit_once(':') else {
        return Some(format!("'{endpoint}' is not of the form {forms}"));
    };
    if !matches!(host, "" | "127.0.0.1" | "0.0.0.0" | "[::1]" | "[::]") {
        return Some(format!("'{endpoint}' is not of the form {forms}"));
    }
    match port.parse::<u32>() {
        Ok(number) => super::fields::port_problem(number),
        Err(_) => Some(format!("'{port}' in '{endpoint}' is not a port number")),
    }
}

fn validate_egress_proxy(policy: &OutboundTrafficPolicy, errors: &mut Vec<FieldError>) {
    let Some(proxy) = &policy.egress_proxy else { return };
    let path = "spec.outboundTrafficPolicy.egressProxy";
    if policy.mode != Some(OutboundTrafficMode::AllowAny) {
        errors.push(FieldError::new(path, "egressProxy may be set only with mode ALLOW_ANY"));
        return;
    }
    if let Err(reason) = names::fqdn(&proxy.host) {
        errors.push(FieldError::new(format!("{path}.host"), reason));
    }
    if proxy.port.is_none() {
        errors.push(FieldError::new(format!("{path}.port"), "egressProxy needs a port"));
    }
    Destination::validate(proxy, path, errors);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sidecar(yaml: &str) -> Sidecar {
        serde_yaml_ng::from_str(yaml).unwrap_or_else(|e| panic!("{yaml}: {e}"))
    }

    #[test]
    fn what_istio_accepts_is_accepted() {
        for yaml in [
            "outboundTrafficPolicy: {mode: REGISTRY_ONLY}\negress: [{hosts: ['./*', 'istio-system/*']}]",
            "egress: [{hosts: ['~/*']}]",
            "egress: [{port: {number: 80, protocol: HTTP, name: http}, hosts: ['*/api.example.com.']}, {hosts: ['./*']}]",
            "workloadSelector: {labels: {app: ratings}}\ningress: [{port: {number: 9080, protocol: HTTP, name: http}, defaultEndpoint: '127.0.0.1:8080'}]",
            "outboundTrafficPolicy: {mode: ALLOW_ANY, egressProxy: {host: proxy.example.com, port: {number: 3128}}}",
        ] {
            assert_eq!(sidecar(yaml).validate(), vec![], "{yaml}");
        }
    }

    #[test]
    fn what_istio_refuses_is_refused_with_its_field() {
        for (yaml, path, reason) in [
            ("egress: [{hosts: [httpbin.org]}]", "spec.egress[0].hosts[0]", "must be namespace/host"),
            ("egress: [{}]", "spec.egress[0].hosts", "at least one host"),
            ("workloadSelector: {labels: {app: '*'}}", "spec", "must set egress"),
            (
                "workloadSelector: {labels: {app: '*'}}\negress: [{hosts: ['./*']}]",
                "spec.workloadSelector.labels.app",
                "wildcard",
            ),
            ("egress: [{hosts: ['./*']}, {port: {number: 80}, hosts: ['./*']}]", "spec.egress[0]", "must be the last"),
            ("egress: [{hosts: ['./*']}, {hosts: ['*/*']}]", "spec.egress[0]", "must be the last"),
            (
                "egress: [{port: {number: 80}, hosts: ['./*']}, {port: {number: 80}, hosts: ['*/*']}]",
                "spec.egress[1].port.number",
                "used twice",
            ),
            (
                "egress: [{port: {number: 80, protocol: SMTP}, hosts: ['./*']}]",
                "spec.egress[0].port.protocol",
                "unknown protocol",
            ),
            ("egress: [{port: {number: 0}, hosts: ['./*']}]", "spec.egress[0].bind", "unix domain socket"),
            (
                "egress: [{port: {number: 80, targetPort: 8080}, hosts: ['./*']}]",
                "spec.egress[0].port.targetPort",
                "no effect",
            ),
            (
                "ingress: [{port: {number: 80}, defaultEndpoint: '10.0.0.1:80'}]",
                "spec.ingress[0].defaultEndpoint",
                "not of the form",
            ),
            (
                "outboundTrafficPolicy: {mode: REGISTRY_ONLY, egressProxy: {host: p.example, port: {number: 3128}}}",
                "spec.outboundTrafficPolicy.egressProxy",
                "only with mode ALLOW_ANY",
            ),
        ] {
            let errors = sidecar(yaml).validate();
            assert!(errors.iter().any(|e| e.path == path && e.reason.contains(reason)), "{yaml}\n{errors:?}");
        }
    }
}
