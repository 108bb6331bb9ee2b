//! Gateway (`networking.istio.io`): the ports and hosts a gateway workload — here, the agent — serves, chosen by
//! label selector; and Istio's checks of it.

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};

use super::{
    error::FieldError,
    fields::{is_protocol, validate_port, PROTOCOLS},
    names::{self, HostsOf},
    service_entry::{is_http, is_tls},
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
    /// A certificate revocation list (not applied: refused where Istio refuses it, warned of elsewhere).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_crl: Option<String>,
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

    /// The PEM files it names (certificate, key, CAs), as written.
    pub fn files(&self) -> impl Iterator<Item = &str> {
        [&self.server_certificate, &self.private_key, &self.ca_certificates].into_iter().flatten().map(String::as_str)
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
            if server.hosts.is_empty() {
                errors.push(FieldError::new(format!("{path}.hosts"), "at least one host is required"));
            }
            for (j, host) in server.hosts.iter().enumerate() {
                if let Err(reason) = names::namespaced_host(host, HostsOf::Gateway) {
                    errors.push(FieldError::new(format!("{path}.hosts[{j}]"), reason));
                }
            }
            let port_valid = server.validate_port(&path, &mut errors);
            if server.port.name.is_empty() && port_valid {
                errors.push(FieldError::new(format!("{path}.port.name"), "a port name is required"));
            } else if !names.insert(server.port.name.as_str()) {
                errors.push(FieldError::new(
                    format!("{path}.port.name"),
                    format!("port name '{}' is used twice", server.port.name),
                ));
            }
            if let Some(tls) = &server.tls {
                validate_tls(tls, &format!("{path}.tls"), &mut errors);
            }
            if port_valid {
                let protocol = server.port.protocol.as_str();
                match &server.tls {
                    None if is_tls(protocol) => errors.push(FieldError::new(
                        format!("{path}.tls"),
                        format!("a {} server needs tls settings", protocol.to_ascii_uppercase()),
                    )),
                    Some(tls)
                        if !is_tls(protocol) && (is_http(protocol) || protocol.eq_ignore_ascii_case("HTTP_PROXY")) =>
                    {
                        let passthrough = matches!(tls.mode().as_str(), "PASSTHROUGH" | "AUTO_PASSTHROUGH");
                        let files = tls.server_certificate.is_some()
                            || tls.private_key.is_some()
                            || tls.ca_certificates.is_some();
                        if !passthrough || files {
                            errors.push(FieldError::new(
                                format!("{path}.tls"),
                                "a plain-text HTTP server takes no TLS settings but httpsRedirect",
                            ));
                        }
                    }
                    Some(_) if !is_tls(protocol) => errors.push(FieldError::new(
                        format!("{path}.tls"),
                        format!("a {} server takes no TLS settings", protocol.to_ascii_uppercase()),
                    )),
                    _ => {}
                }
            }
        }
        errors
    }
}

impl Server {
    /// Istio's checks of the port and bind; whether the port is sound enough to judge the TLS settings by.
    fn validate_port(&self, path: &str, errors: &mut Vec<FieldError>) -> bool {
        let port = &self.port;
        if port.number == 0 && port.name.is_empty() && port.protocol.is_empty() {
            errors.push(FieldError::new(format!("{path}.port"), "a port is required"));
            return false;
        }
        let before = errors.len();
        if port.protocol.is_empty() {
            errors.push(FieldError::new(
                format!("{path}.port.protocol"),
                format!("a protocol is required ({PROTOCOLS})"),
            ));
        } else if !is_protocol(&port.protocol) {
            errors.push(FieldError::new(
                format!("{path}.port.protocol"),
                format!("unknown protocol '{}' ({PROTOCOLS})", port.protocol),
            ));
        }
        let bind = self.bind.as_deref().unwrap_or("");
        if port.number > 0 || !bind.starts_with(UNIX) {
            validate_port(port.number, &format!("{path}.port.number"), errors);
        }
        if port.target_port.is_some_and(|target| target > 0) {
            errors.push(FieldError::new(format!("{path}.port.targetPort"), "targetPort has no effect on Gateways"));
        }
        let port_valid = errors.len() == before;
        if let Some(socket) = bind.strip_prefix(UNIX) {
            if !socket.starts_with('/') && !socket.starts_with('@') {
                errors.push(FieldError::new(format!("{path}.bind"), format!("'{socket}' is not an absolute path")));
            }
            if port.number != 0 {
                errors.push(FieldError::new(
                    format!("{path}.port.number"),
                    "a unix domain socket server's port must be 0",
                ));
            }
        } else if !bind.is_empty() && !names::is_ip(bind) {
            errors.push(FieldError::new(format!("{path}.bind"), format!("'{bind}' is not an IP address")));
        }
        port_valid
    }
}

const UNIX: &str = "unix://";

/// Istio's checks of a server's TLS settings: a mode and versions it knows, what each mode needs to present a
/// certificate, and what ISTIO_MUTUAL (the mesh's own certificates) may not be given.
fn validate_tls(tls: &ServerTls, path: &str, errors: &mut Vec<FieldError>) {
    let mode = tls.mode();
    if !TLS_MODES.contains(&mode.as_str()) {
        errors.push(FieldError::new(
            format!("{path}.mode"),
            format!("unknown TLS mode '{}' ({})", tls.mode.as_deref().unwrap_or(""), TLS_MODES.join(", ")),
        ));
    }
    for (field, version) in
        [("minProtocolVersion", &tls.min_protocol_version), ("maxProtocolVersion", &tls.max_protocol_version)]
    {
        if let Some(version) = version.as_deref().filter(|version| !TLS_VERSIONS.contains(version)) {
            errors.push(FieldError::new(
                format!("{path}.{field}"),
                format!("unknown TLS version '{version}' ({})", TLS_VERSIONS.join(", ")),
            ));
        }
    }
    let set = [
        ("serverCertificate", tls.server_certificate.is_some()),
        ("privateKey", tls.private_key.is_some()),
        ("caCertificates", tls.ca_certificates.is_some()),
        ("credentialName", tls.credential_name.is_some()),
    ];
    if mode == "ISTIO_MUTUAL" {
        for (field, _) in set.iter().filter(|(_, set)| *set) {
            errors.push(FieldError::new(
                format!("{path}.{field}"),
                "ISTIO_MUTUAL uses the mesh's certificates: no serverCertificate, privateKey, caCertificates or credentialName",
            ));
        }
        return;
    }
    if tls.ca_crl.is_some() {
        if tls.credential_name.is_some() {
            errors
                .push(FieldError::new(format!("{path}.caCrl"), "with credentialName, the CRL comes in the credential"));
        }
        if mode == "SIMPLE" {
            errors.push(FieldError::new(format!("{path}.caCrl"), "a CRL needs a mutual mode, not SIMPLE"));
        }
    }
    if !matches!(mode.as_str(), "SIMPLE" | "MUTUAL" | "OPTIONAL_MUTUAL") || tls.credential_name.is_some() {
        return;
    }
    let needs = |field: &str, what: &str| {
        FieldError::new(format!("{path}.{field}"), format!("{mode} needs {what}, or credentialName"))
    };
    if tls.server_certificate.is_none() {
        errors.push(needs("serverCertificate", "serverCertificate and privateKey"));
    }
    if tls.private_key.is_none() {
        errors.push(needs("privateKey", "serverCertificate and privateKey"));
    }
    if mode != "SIMPLE" && tls.ca_certificates.is_none() {
        errors.push(needs("caCertificates", "caCertificates (the CAs clients' certificates chain to)"));
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
