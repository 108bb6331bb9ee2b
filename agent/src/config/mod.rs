//! Istio configuration: the resources Sluice reads, how they are checked, and where they come from.

pub mod authorization_policy;
pub mod destination_rule;
pub mod error;
pub mod fields;
pub mod gateway;
pub mod http_headers;
pub mod mesh;
pub mod names;
pub mod re2;
pub mod resolver;
pub mod resource;
pub mod secrets;
pub mod service_entry;
pub mod sidecar;
pub mod sources;
pub mod store;
pub mod telemetry;
pub mod unsupported;
pub mod virtual_service;
pub mod warnings;
pub mod workloads;

pub use error::ConfigError;
pub use mesh::{MeshConfig, OutboundTrafficMode};
pub use resource::{Kind, Metadata, Resource, Spec};

/// Every resource in force, and the mesh config: what the policy is compiled from.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Shared with the store and the load they came from: a snapshot costs no copy of the resources.
    pub resources: Vec<std::sync::Arc<Resource>>,
    pub mesh: MeshConfig,
}

impl Snapshot {
    /// The certificate and key files its Gateway servers and DestinationRules name, each once: read when the
    /// policy is compiled, so watched for a rotated file to be read again.
    pub fn certificate_files(&self) -> Vec<std::path::PathBuf> {
        let mut files: Vec<std::path::PathBuf> = Vec::new();
        for resource in &self.resources {
            match &resource.spec {
                Spec::Gateway(gateway) => {
                    let servers = gateway.servers.iter().filter_map(|server| server.tls.as_ref());
                    files.extend(servers.flat_map(gateway::ServerTls::files).map(Into::into));
                }
                Spec::DestinationRule(rule) => {
                    files.extend(rule.tls_settings().flat_map(destination_rule::ClientTls::files).map(Into::into));
                }
                _ => {}
            }
        }
        files.sort();
        files.dedup();
        files
    }
}

#[cfg(test)]
impl Snapshot {
    /// The resources and mesh config of a YAML stream, each document required to parse.
    pub(crate) fn from_yaml(yaml: &str) -> Snapshot {
        let mut snapshot = Snapshot::default();
        for document in serde_yaml_ng::Deserializer::from_str(yaml) {
            let value: serde_json::Value = serde::Deserialize::deserialize(document).expect("valid YAML");
            match resource::Document::parse(value).expect("a readable document") {
                resource::Document::Resource(resource) => snapshot.resources.push(std::sync::Arc::new(*resource)),
                resource::Document::Mesh(mesh) => snapshot.mesh = *mesh,
                resource::Document::Ignored(..) => {}
            }
        }
        snapshot
    }
}

#[cfg(test)]
mod tests {
    use super::Snapshot;

    #[test]
    fn the_certificate_files_are_those_of_every_gateway_server_and_destination_rule_setting() {
        let snapshot = Snapshot::from_yaml(
            "apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw, namespace: ns}
spec:
  servers:
  - port: {number: 443, name: https, protocol: HTTPS}
    hosts: [a.example]
    tls: {mode: MUTUAL, serverCertificate: /certs/a.pem, privateKey: /certs/a.key, caCertificates: /certs/ca.pem}
  - port: {number: 8443, name: https-b, protocol: HTTPS}
    hosts: [b.example]
    tls: {mode: SIMPLE, credentialName: b-cert}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: dr, namespace: ns}
spec:
  host: c.example
  trafficPolicy:
    portLevelSettings:
    - port: {number: 443}
      tls: {mode: SIMPLE, caCertificates: /certs/ca.pem}
  subsets:
  - name: v1
    labels: {version: v1}
    trafficPolicy:
      tls: {mode: MUTUAL, clientCertificate: /client/c.pem, privateKey: /client/c.key}
",
        );
        let files: Vec<String> = snapshot.certificate_files().iter().map(|file| file.display().to_string()).collect();
        assert_eq!(files, ["/certs/a.key", "/certs/a.pem", "/certs/ca.pem", "/client/c.key", "/client/c.pem"]);
    }
}
