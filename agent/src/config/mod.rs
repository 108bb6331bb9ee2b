//! Istio configuration: the resources Sluice reads, how they are checked, and where they come from.

pub mod destination_rule;
pub mod error;
pub mod fields;
pub mod gateway;
pub mod mesh;
pub mod resolver;
pub mod resource;
pub mod service_entry;
pub mod sidecar;
pub mod sources;
pub mod store;
pub mod virtual_service;

pub use error::ConfigError;
pub use mesh::{MeshConfig, OutboundTrafficMode};
pub use resource::{Kind, Metadata, Resource, Spec};

/// Every resource in force, and the mesh config: what the policy is compiled from.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub resources: Vec<Resource>,
    pub mesh: MeshConfig,
}
