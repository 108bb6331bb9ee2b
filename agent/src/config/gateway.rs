//! Gateway (`networking.istio.io`): the ports and hosts a gateway workload — here, the agent — serves, chosen by
//! label selector; and Istio's checks of it.

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};

use super::{
    error::FieldError,
    fields::{is_protocol, validate_namespaced_host, validate_port},
};

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct Gateway {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub selector: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub servers: Vec<Server>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Server {
    #[serde(default)]
    pub port: GatewayPort,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ServerTls>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bind: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayPort {
    #[serde(default)]
    pub number: u32,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub protocol: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_port: Option<u32>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServerTls {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub https_redirect: Option<bool>,
    /// The certificate, key and client CA from a Kubernetes Secret of this name (outside Kubernetes, a directory
    /// of `--credentials-dir`), in place of the files below.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential_name: Option<String>,
    /// Files (PEM) on the gateway: its certificate chain and key, and for MUTUAL the CAs clients' certificates
    /// must chain to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_certificate: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_certificates: Option<String>,
    /// MUTUAL: a client certificate must carry one of these names (DNS or URI SANs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subject_alt_names: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_protocol_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_protocol_version: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cipher_suites: Vec<String>,
    /// A client certificate must be one of these: base64 SHA-256 of its SubjectPublicKeyInfo, or hex SHA-256 of the
    /// whole certificate (colons allowed). Either list matching is enough, as in Envoy.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub verify_certificate_spki: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub verify_certificate_hash: Vec<String>,
}

impl ServerTls {
    /// The mode in upper case; Istio's default (its enum's zero) is PASSTHROUGH.
    pub fn mode(&self) -> String {
        self.mode.as_deref().unwrap_or("PASSTHROUGH").to_ascii_uppercase()
    }

    /// Whether the gateway terminates TLS for this server: with a certificate it is given (SIMPLE, MUTUAL) or the
    /// mesh's workload certificate (ISTIO_MUTUAL).
    pub fn terminates(&self) -> bool {
        matches!(self.mode().as_str(), "SIMPLE" | "MUTUAL" | "ISTIO_MUTUAL" | "OPTIONAL_MUTUAL")
    }

    /// Whether clients must present a certificate (MUTUAL, ISTIO_MUTUAL).
    pub fn mutual(&self) -> bool {
        matches!(self.mode().as_str(), "MUTUAL" | "ISTIO_MUTUAL")
    }
}

const TLS_MODES: [&str; 6] = ["PASSTHROUGH", "SIMPLE", "MUTUAL", "AUTO_PASSTHROUGH", "ISTIO_MUTUAL", "OPTIONAL_MUTUAL"];
/// Istio's `TLSProtocol` values.
pub const TLS_VERSIONS: [&str; 5] = ["TLS_AUTO", "TLSV1_0", "TLSV1_1", "TLSV1_2", "TLSV1_3"];

impl Gateway {
    /// Whether this Gateway selects a workload with `labels`: every selector label matches.
    pub fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        self.selector.iter().all(|(key, value)| labels.get(key) == Some(value))
    }

    pub fn validate(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        if self.servers.is_empty() {
            errors.push(FieldError::new("spec.servers", "at least one server is required"));
        }
        let mut names = HashSet::new();
        for (i, server) in self.servers.iter().enumerate() {
            let path = format!("spec.servers[{i}]");
            validate_port(server.port.number, &format!("{path}.port.number"), &mut errors);
            if !is_protocol(&server.port.protocol) {
                errors.push(FieldError::new(
                    format!("{path}.port.protocol"),
                    format!("unknown protocol '{}'", server.port.protocol),
                ));
            }
            if !server.port.name.is_empty() && !names.insert(server.port.name.as_str()) {
                errors.push(FieldError::new(
                    format!("{path}.port.name"),
                    format!("port name '{}' is used twice", server.port.name),
                ));
            }
            if server.hosts.is_empty() {
                errors.push(FieldError::new(format!("{path}.hosts"), "at least one host is required"));
            }
            for (j, host) in server.hosts.iter().enumerate() {
                if let Err(reason) = validate_namespaced_host(host) {
                    errors.push(FieldError::new(format!("{path}.hosts[{j}]"), reason));
                }
            }
            let protocol = server.port.protocol.to_ascii_uppercase();
            let redirect_only = server.tls.as_ref().is_some_and(|tls| tls.https_redirect == Some(true));
            if (protocol == "HTTPS" || protocol == "TLS") && server.tls.is_none() {
                errors.push(FieldError::new(format!("{path}.tls"), format!("a {protocol} server needs tls settings")));
            }
            if let Some(mode) = server.tls.as_ref().and_then(|tls| tls.mode.as_deref()) {
                if !TLS_MODES.contains(&mode) && !redirect_only {
                    errors.push(FieldError::new(format!("{path}.tls.mode"), format!("unknown TLS mode '{mode}'")));
                }
            }
            if let Some(tls) = server.tls.as_ref().filter(|_| protocol == "HTTPS" || protocol == "TLS") {
                validate_terminated(tls, &format!("{path}.tls"), &mut errors);
            }
        }
        errors
    }
}

/// Istio's checks of a terminating server's TLS settings: what it needs to present a certificate, and versions
/// it knows.
fn validate_terminated(tls: &ServerTls, path: &str, errors: &mut Vec<FieldError>) {
    let mode = tls.mode();
    if matches!(mode.as_str(), "SIMPLE" | "MUTUAL" | "OPTIONAL_MUTUAL") && tls.credential_name.is_none() {
        if tls.server_certificate.is_none() {
            let reason = format!("{mode} needs serverCertificate and privateKey, or credentialName");
            errors.push(FieldError::new(format!("{path}.serverCertificate"), reason));
        }
        if tls.private_key.is_none() {
            let reason = format!("{mode} needs serverCertificate and privateKey, or credentialName");
            errors.push(FieldError::new(format!("{path}.privateKey"), reason));
        }
        if mode != "SIMPLE" && tls.ca_certificates.is_none() {
            let reason =
                format!("{mode} needs caCertificates (the CAs clients' certificates chain to), or credentialName");
            errors.push(FieldError::new(format!("{path}.caCertificates"), reason));
        }
    }
    for (field, version) in
        [("minProtocolVersion", &tls.min_protocol_version), ("maxProtocolVersion", &tls.max_protocol_version)]
    {
        if let Some(version) = version.as_deref().filter(|version| !TLS_VERSIONS.contains(version)) {
            errors.push(FieldError::new(format!("{path}.{field}"), format!("unknown TLS version '{version}'")));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gateway(yaml: &str) -> Gateway {
        serde_yaml_ng::from_str(yaml).unwrap_or_else(|e| panic!("{yaml}: {e}"))
    }

    #[test]
    fn gateways_are_checked_as_istio_checks_them() {
        let valid = [
            "selector: {gateway-name: egress-demo, gateway-type: egress}\nservers: [{port: {number: 80, name: http, protocol: HTTP}, hosts: ['*']}]",
            "selector: {istio: egressgateway}\nservers: [{port: {number: 443, name: tls, protocol: TLS}, hosts: [api.example], tls: {mode: PASSTHROUGH}}]",
            "selector: {istio: egressgateway}\nservers: [{port: {number: 80, name: http, protocol: HTTP}, hosts: ['./httpbin.org', 'istio-system/*']}]",
            "servers: [{port: {number: 443, name: a, protocol: HTTPS}, hosts: ['*'], tls: {mode: MUTUAL, credentialName: api-cert}}]",
        ];
        for yaml in valid {
            assert_eq!(gateway(yaml).validate(), vec![], "{yaml}");
        }
        let invalid = [
            ("selector: {a: b}", "spec.servers", "at least one server"),
            (
                "servers: [{port: {number: 0, name: a, protocol: HTTP}, hosts: ['*']}]",
                "spec.servers[0].port.number",
                "not a port",
            ),
            (
                "servers: [{port: {number: 80, name: a, protocol: SMTP}, hosts: ['*']}]",
                "spec.servers[0].port.protocol",
                "unknown protocol",
            ),
            ("servers: [{port: {number: 80, name: a, protocol: HTTP}}]", "spec.servers[0].hosts", "at least one host"),
            (
                "servers: [{port: {number: 443, name: a, protocol: HTTPS}, hosts: ['*']}]",
                "spec.servers[0].tls",
                "needs tls settings",
            ),
            (
                "servers: [{port: {number: 443, name: a, protocol: TLS}, hosts: ['*'], tls: {mode: LOOSE}}]",
                "spec.servers[0].tls.mode",
                "unknown TLS mode",
            ),
            (
                "servers: [{port: {number: 80, name: a, protocol: HTTP}, hosts: ['Bad_NS/x.example']}]",
                "spec.servers[0].hosts[0]",
                "not a namespace",
            ),
            (
                "servers: [{port: {number: 443, name: a, protocol: HTTPS}, hosts: ['*'], tls: {mode: SIMPLE}}]",
                "spec.servers[0].tls.serverCertificate",
                "or credentialName",
            ),
            (
                "servers: [{port: {number: 443, name: a, protocol: HTTPS}, hosts: ['*'], tls: {mode: MUTUAL, serverCertificate: c, privateKey: k}}]",
                "spec.servers[0].tls.caCertificates",
                "MUTUAL needs caCertificates",
            ),
            (
                "servers: [{port: {number: 443, name: a, protocol: HTTPS}, hosts: ['*'], tls: {mode: SIMPLE, credentialName: c, minProtocolVersion: TLSV9}}]",
                "spec.servers[0].tls.minProtocolVersion",
                "unknown TLS version",
            ),
        ];
        for (yaml, path, reason) in invalid {
            let errors = gateway(yaml).validate();
            assert!(errors.iter().any(|e| e.path == path && e.reason.contains(reason)), "{yaml}\n{errors:?}");
        }
    }

    #[test]
    fn a_gateway_selects_workloads_carrying_all_its_labels() {
        let g = gateway("selector: {istio: egressgateway, app: sluice}\nservers: []");
        let labels = |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        assert!(g.selects(&labels(&[("istio", "egressgateway"), ("app", "sluice"), ("extra", "x")])));
        assert!(!g.selects(&labels(&[("istio", "egressgateway")])));
        assert!(gateway("servers: []").selects(&labels(&[])), "an empty selector selects every workload");
    }
}
