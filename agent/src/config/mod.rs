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
