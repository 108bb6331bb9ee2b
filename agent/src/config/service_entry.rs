//! ServiceEntry (`networking.istio.io`): what the mesh's registry knows of services outside it, and the checks
//! Istio's own validation makes of it.

use std::{
    collections::{BTreeMap, HashSet},
    net::IpAddr,
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::{
    error::FieldError,
    fields::{is_protocol, port_problem, WorkloadSelector, PROTOCOLS},
    names,
};

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceEntry {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    /// Virtual IPs or CIDRs of the service.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<ServicePort>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<Location>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolution: Option<Resolution>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<WorkloadEntry>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub export_to: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subject_alt_names: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload_selector: Option<WorkloadSelector>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    pub number: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_port: Option<u32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
pub enum Location {
    #[serde(rename = "MESH_EXTERNAL")]
    MeshExternal,
    #[serde(rename = "MESH_INTERNAL")]
    MeshInternal,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub enum Resolution {
    #[default]
    #[serde(rename = "NONE")]
    None,
    #[serde(rename = "STATIC")]
    Static,
    #[serde(rename = "DNS")]
    Dns,
    #[serde(rename = "DNS_ROUND_ROBIN")]
    DnsRoundRobin,
}

/// One endpoint of a ServiceEntry (Istio's WorkloadEntry fields).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadEntry {
    #[serde(default)]
    pub address: String,
    /// Port name → port number on this endpoint.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ports: BTreeMap<String, u32>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locality: Option<String>,
}

/// The L4 protocol a port's declared protocol travels over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Tcp,
    Udp,
    Sctp,
}

/// Istio's port protocols, and the transport under each.
pub fn transport(protocol: &str) -> Option<Transport> {
    match protocol.to_ascii_uppercase().as_str() {
        "HTTP" | "HTTPS" | "HTTP2" | "GRPC" | "GRPC-WEB" | "MONGO" | "MYSQL" | "REDIS" | "TCP" | "TLS" => {
            Some(Transport::Tcp)
        }
        "UDP" => Some(Transport::Udp),
        "SCTP" => Some(Transport::Sctp),
        _ => None,
    }
}

/// Whether Istio's `protocol` is read as HTTP, request by request (HTTP, HTTP2, GRPC, GRPC-WEB).
pub fn is_http(protocol: &str) -> bool {
    matches!(protocol.to_ascii_uppercase().as_str(), "HTTP" | "HTTP2" | "GRPC" | "GRPC-WEB")
}

/// Whether a port of Istio's `protocol` carries TLS the gateway does not terminate (HTTPS, TLS): its
/// connections are told apart by the ClientHello's server name.
pub fn is_tls(protocol: &str) -> bool {
    matches!(protocol.to_ascii_uppercase().as_str(), "HTTPS" | "TLS")
}

/// Whether a port of Istio's `protocol` speaks HTTP/2 to its upstream (HTTP2, GRPC).
pub fn is_http2(protocol: &str) -> bool {
    matches!(protocol.to_ascii_uppercase().as_str(), "HTTP2" | "GRPC")
}

impl ServiceEntry {
    pub fn resolution(&self) -> Resolution {
        self.resolution.unwrap_or_default()
    }

    /// Every problem with this ServiceEntry, as Istio's validation reports them.
    pub fn validate(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        let mut fail = |path: String, reason: String| errors.push(FieldError::new(path, reason));
        if let Some(selector) = &self.workload_selector {
            let mut selector_errors = Vec::new();
            names::validate_selector(&selector.labels, "spec.workloadSelector.labels", &mut selector_errors);
            if !selector_errors.is_empty() {
                return selector_errors;
            }
            if !self.endpoints.is_empty() {
                fail("spec.endpoints".into(), "only one of workloadSelector or endpoints may be set".into());
            }
        }
        if self.hosts.is_empty() {
            fail("spec.hosts".into(), "at least one host is required".into());
        }
        for (i, host) in self.hosts.iter().enumerate() {
            if let Err(reason) = validate_host(host) {
                fail(format!("spec.hosts[{i}]"), reason);
            }
        }
        let resolution = self.resolution();
        for (i, address) in self.addresses.iter().enumerate() {
            match parse_address(address) {
                None => fail(format!("spec.addresses[{i}]"), format!("'{address}' is not an IP address or CIDR")),
                Some(_) if address.contains('/') && is_dns(resolution) => fail(
                    format!("spec.addresses[{i}]"),
                    format!("CIDR '{address}' is only allowed with NONE or STATIC resolution"),
                ),
                Some(_) => {}
            }
        }
        let (mut numbers, mut port_names) = (HashSet::new(), HashSet::new());
        for (i, port) in self.ports.iter().enumerate() {
            let path = format!("spec.ports[{i}]");
            if let Some(reason) = port_problem(port.number) {
                fail(format!("{path}.number"), reason);
            } else if !numbers.insert(port.number) {
                fail(format!("{path}.number"), format!("port {} is declared twice", port.number));
            }
            if port.name.is_empty() {
                fail(format!("{path}.name"), "a port name is required".into());
            } else if !names::is_dns_label(&port.name) {
                fail(format!("{path}.name"), format!("'{}' is not a port name (letters, digits and '-')", port.name));
            } else if !port_names.insert(port.name.as_str()) {
                fail(format!("{path}.name"), format!("port name '{}' is used twice", port.name));
            }
            if let Some(protocol) = port.protocol.as_deref().filter(|p| !p.is_empty() && !is_protocol(p)) {
                fail(format!("{path}.protocol"), format!("unknown protocol '{protocol}' ({PROTOCOLS})"));
            }
            if let Some(reason) = port.target_port.filter(|target| *target != 0).and_then(port_problem) {
                fail(format!("{path}.targetPort"), reason);
            }
        }
        match resolution {
            Resolution::None if !self.endpoints.is_empty() => {
                fail("spec.endpoints".into(), "endpoints are not allowed with NONE resolution".into())
            }
            Resolution::Dns | Resolution::DnsRoundRobin if self.endpoints.is_empty() => {
                for (i, host) in self.hosts.iter().enumerate() {
                    if host.starts_with('*') {
                        fail(
                            format!("spec.hosts[{i}]"),
                            format!("wildcard host '{host}' with DNS resolution needs endpoints to resolve"),
                        );
                    }
                }
            }
            Resolution::DnsRoundRobin if self.endpoints.len() > 1 => fail(
                "spec.endpoints".into(),
                "DNS_ROUND_ROBIN takes at most one endpoint (resolved by DNS, in turn)".into(),
            ),
            _ => {}
        }
        if resolution != Resolution::None && self.hosts.len() > 1 {
            let opaque = self.ports.iter().position(|port| {
                let protocol = port.protocol.as_deref().unwrap_or("");
                !is_http(protocol) && !protocol.eq_ignore_ascii_case("HTTP_PROXY") && !is_tls(protocol)
            });
            if let Some(i) = opaque {
                fail(
                    format!("spec.ports[{i}].protocol"),
                    "several hosts cannot be told apart on a port that is neither HTTP nor TLS (unless resolution is NONE)"
                        .into(),
                );
            }
        }
        let unix_ports_ok = self.ports.len() == 1;
        let mut label_errors = Vec::new();
        for (i, endpoint) in self.endpoints.iter().enumerate() {
            let path = format!("spec.endpoints[{i}]");
            let address = endpoint.address.as_str();
            if address.is_empty() {
                if endpoint.network.as_deref().unwrap_or("").is_empty() {
                    fail(format!("{path}.address"), "an address is required".into());
                }
            } else if let Some(socket) = address.strip_prefix("unix://") {
                if resolution == Resolution::Static {
                    if !socket.starts_with('/') && !socket.starts_with('@') {
                        fail(format!("{path}.address"), format!("'{socket}' is not an absolute path"));
                    }
                    if !endpoint.ports.is_empty() {
                        fail(format!("{path}.ports"), "a unix domain socket endpoint takes no ports".into());
                    }
                    if !unix_ports_ok {
                        fail(
                            format!("{path}.address"),
                            "a unix domain socket endpoint needs exactly one service port".into(),
                        );
                    }
                } else {
                    fail(format!("{path}.address"), format!("'{address}' is not a host name or IP address"));
                }
            } else if !names::is_ip(address) {
                if resolution == Resolution::Static {
                    fail(
                        format!("{path}.address"),
                        format!("'{address}' is not an IP address (STATIC resolution needs addresses)"),
                    );
                } else if names::fqdn(address).is_err() {
                    fail(format!("{path}.address"), format!("'{address}' is not a host name or IP address"));
                }
            }
            for (name, number) in &endpoint.ports {
                if !port_names.contains(name.as_str()) {
                    fail(format!("{path}.ports.{name}"), format!("no port of the ServiceEntry is named '{name}'"));
                }
                if let Some(reason) = port_problem(*number) {
                    fail(format!("{path}.ports.{name}"), reason);
                }
            }
            names::validate_labels(&endpoint.labels, &format!("{path}.labels"), &mut label_errors);
        }
        errors.extend(label_errors);
        errors
    }
}

fn is_dns(resolution: Resolution) -> bool {
    matches!(resolution, Resolution::Dns | Resolution::DnsRoundRobin)
}

/// An address or CIDR of `spec.addresses`.
pub fn parse_address(text: &str) -> Option<IpNet> {
    match text.parse::<IpNet>() {
        Ok(net) => Some(net),
        Err(_) => text.parse::<IpAddr>().ok().map(IpNet::from),
    }
}

/// A ServiceEntry host: a DNS name, optionally with a leading wildcard label (Istio warns of `*foo.example`, and
/// takes it); a lone `*` or an address is not one. Short names are allowed (they are qualified by namespace).
pub fn validate_host(host: &str) -> Result<(), String> {
    if host == "*" {
        return Err("'*' is not allowed as a ServiceEntry host".into());
    }
    if names::is_ip(host) {
        return Err(format!("'{host}' is an IP address; hosts are names (put addresses in spec.addresses)"));
    }
    names::wildcard_domain(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(yaml: &str) -> ServiceEntry {
        serde_yaml_ng::from_str(yaml).unwrap_or_else(|e| panic!("{yaml}: {e}"))
    }

    #[test]
    fn hosts_are_checked_as_istio_checks_them() {
        for host in ["httpbin.org", "*.example.com", "*example.com", "reviews", "a-b.c-d.example"] {
            assert_eq!(validate_host(host), Ok(()), "{host}");
        }
        for (host, reason) in [
            ("*", "is not allowed"),
            ("", "may not be empty"),
            ("203.0.113.10", "is an IP address"),
            ("bad_host.com", "not a valid DNS name"),
            ("-lead.example", "not a valid DNS name"),
            ("a..b", "not a valid DNS name"),
            ("*.*.example.com", "not a valid DNS name"),
        ] {
            let error = validate_host(host).expect_err(host);
            assert!(error.contains(reason), "{host}: {error}");
        }
    }

    #[test]
    fn valid_service_entries_have_no_errors() {
        let cases = [
            "hosts: [httpbin.org]\nports: [{number: 80, name: http, protocol: HTTP}]\nresolution: DNS\nlocation: MESH_EXTERNAL",
            "hosts: [api.example]\naddresses: [203.0.113.0/24]\nports: [{number: 443, name: tls, protocol: TLS}]\nresolution: NONE",
            "hosts: [db.example]\nports: [{number: 5432, name: tcp, protocol: TCP}]\nresolution: STATIC\nendpoints: [{address: 203.0.113.5, ports: {tcp: 15432}}]",
            "hosts: ['*.example.com']\nports: [{number: 443, name: https, protocol: HTTPS}]\nresolution: NONE",
            "hosts: ['*.example.com']\nports: [{number: 443, name: https}]\nresolution: DNS\nendpoints: [{address: proxy.example}]",
            // What Istio takes though a stricter reader might not: no ports, STATIC without endpoints, a trailing
            // dot, a port name in capitals, HTTP_PROXY.
            "hosts: [api.example.com.]\nresolution: STATIC",
            "hosts: [a.example]\nports: [{number: 3128, name: Proxy, protocol: HTTP_PROXY}]",
        ];
        for yaml in cases {
            assert_eq!(entry(yaml).validate(), vec![], "{yaml}");
        }
    }

    #[test]
    fn invalid_service_entries_say_which_field_and_why() {
        let cases = [
            ("ports: [{number: 80, name: http}]", "spec.hosts", "at least one host"),
            ("hosts: ['*']\nports: [{number: 80, name: http}]", "spec.hosts[0]", "not allowed"),
            ("hosts: [a.example]\nports: [{number: 0, name: x}]", "spec.ports[0].number", "not a port"),
            ("hosts: [a.example]\nports: [{number: 70000, name: x}]", "spec.ports[0].number", "not a port"),
            (
                "hosts: [a.example]\nports: [{number: 80, name: a}, {number: 80, name: b}]",
                "spec.ports[1].number",
                "declared twice",
            ),
            ("hosts: [a.example]\nports: [{number: 80, name: a}, {number: 81, name: a}]", "spec.ports[1].name", "used twice"),
            ("hosts: [a.example]\nports: [{number: 80}]", "spec.ports[0].name", "name is required"),
            ("hosts: [a.example]\nports: [{number: 80, name: a, protocol: QUIC}]", "spec.ports[0].protocol", "unknown protocol"),
            (
                "hosts: [a.example]\naddresses: [10.0.0.0/8]\nports: [{number: 80, name: a}]\nresolution: DNS",
                "spec.addresses[0]",
                "only allowed with NONE or STATIC",
            ),
            ("hosts: [a.example]\naddresses: [10.0.0.300]\nports: [{number: 80, name: a}]", "spec.addresses[0]", "not an IP"),
            (
                "hosts: ['*.a.example']\nports: [{number: 80, name: a}]\nresolution: DNS",
                "spec.hosts[0]",
                "needs endpoints",
            ),
            ("hosts: [a.example]\nports: [{number: 80, name: a_b}]", "spec.ports[0].name", "not a port name"),
            ("hosts: [a.example]\nports: [{number: 80, name: a, protocol: SCTP}]", "spec.ports[0].protocol", "unknown protocol"),
            (
                "hosts: [a.example, b.example]\nports: [{number: 5432, name: a, protocol: TCP}]\nresolution: DNS",
                "spec.ports[0].protocol",
                "cannot be told apart",
            ),
            (
                "hosts: [a.example]\nports: [{number: 80, name: a}]\nresolution: DNS_ROUND_ROBIN\nendpoints: [{address: a.example}, {address: b.example}]",
                "spec.endpoints",
                "at most one endpoint",
            ),
            (
                "hosts: [a.example]\nworkloadSelector: {labels: {app: a}}\nports: [{number: 80, name: a}]\nresolution: STATIC\nendpoints: [{address: 10.0.0.1}]",
                "spec.endpoints",
                "only one of workloadSelector or endpoints",
            ),
            (
                "hosts: [a.example]\nports: [{number: 80, name: a}]\nresolution: NONE\nendpoints: [{address: 10.0.0.1}]",
                "spec.endpoints",
                "not allowed with NONE",
            ),
            (
                "hosts: [a.example]\nports: [{number: 80, name: a}]\nresolution: STATIC\nendpoints: [{address: db.example}]",
                "spec.endpoints[0].address",
                "not an IP address",
            ),
            (
                "hosts: [a.example]\nports: [{number: 80, name: a}]\nresolution: STATIC\nendpoints: [{address: 10.0.0.1, ports: {b: 8080}}]",
                "spec.endpoints[0].ports.b",
                "no port of the ServiceEntry is named 'b'",
            ),
        ];
        for (yaml, path, reason) in cases {
            let errors = entry(yaml).validate();
            assert!(
                errors.iter().any(|e| e.path == path && e.reason.contains(reason)),
                "{yaml}\nexpected {path}: {reason}\ngot {errors:?}"
            );
        }
    }
}
