//! Sidecar (`networking.istio.io`): the outbound traffic policy and egress hosts of a namespace's workloads.

use serde::{Deserialize, Serialize};

use super::{
    error::FieldError,
    fields::{validate_namespaced_host, validate_port},
    mesh::OutboundTrafficPolicy,
};

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Sidecar {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload_selector: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress: Vec<EgressListener>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outbound_traffic_policy: Option<OutboundTrafficPolicy>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EgressListener {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<super::gateway::GatewayPort>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bind: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
}

impl Sidecar {
    pub fn validate(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        for (i, listener) in self.egress.iter().enumerate() {
            let path = format!("spec.egress[{i}]");
            if listener.hosts.is_empty() {
                errors.push(FieldError::new(format!("{path}.hosts"), "at least one host is required"));
            }
            for (j, host) in listener.hosts.iter().enumerate() {
                if !host.contains('/') {
                    errors.push(FieldError::new(
                        format!("{path}.hosts[{j}]"),
                        format!("'{host}' must be namespace/host"),
                    ));
                } else if let Err(reason) = validate_namespaced_host(host) {
                    errors.push(FieldError::new(format!("{path}.hosts[{j}]"), reason));
                }
            }
            if let Some(port) = &listener.port {
                validate_port(port.number, &format!("{path}.port.number"), &mut errors);
            }
        }
        errors
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sidecars_are_checked_as_istio_checks_them() {
        let sidecar = |yaml: &str| -> Sidecar { serde_yaml_ng::from_str(yaml).unwrap() };
        let valid = "outboundTrafficPolicy: {mode: REGISTRY_ONLY}\negress: [{hosts: ['./*', 'istio-system/*']}]";
        assert_eq!(sidecar(valid).validate(), vec![]);
        let errors = sidecar("egress: [{hosts: [httpbin.org]}]").validate();
        assert_eq!(errors[0].path, "spec.egress[0].hosts[0]");
        assert!(errors[0].reason.contains("must be namespace/host"));
        assert_eq!(sidecar("egress: [{}]").validate()[0].path, "spec.egress[0].hosts");
    }
}
