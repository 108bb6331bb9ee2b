//! One Istio resource as read from YAML or JSON: its kind, metadata and spec, checked as Istio checks it.

use std::{collections::BTreeMap, fmt};

use serde::{Deserialize, Serialize};

use super::{
    authorization_policy::{AuthorizationPolicy, DRY_RUN},
    destination_rule::DestinationRule,
    error::FieldError,
    gateway::Gateway,
    mesh::MeshConfig,
    names::{self, ExportOf},
    service_entry::ServiceEntry,
    sidecar::Sidecar,
    telemetry::Telemetry,
    virtual_service::VirtualService,
};

const ISTIO_GROUP: &str = "networking.istio.io";
const ISTIO_VERSIONS: [&str; 3] = ["v1alpha3", "v1beta1", "v1"];
const SECURITY_GROUP: &str = "security.istio.io";
const SECURITY_VERSIONS: [&str; 2] = ["v1beta1", "v1"];
const TELEMETRY_GROUP: &str = "telemetry.istio.io";
const TELEMETRY_VERSIONS: [&str; 2] = ["v1alpha1", "v1"];

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize)]
pub enum Kind {
    ServiceEntry,
    VirtualService,
    Gateway,
    DestinationRule,
    Sidecar,
    AuthorizationPolicy,
    Telemetry,
}

impl Kind {
    pub const ALL: [Kind; 7] = [
        Kind::ServiceEntry,
        Kind::VirtualService,
        Kind::Gateway,
        Kind::DestinationRule,
        Kind::Sidecar,
        Kind::AuthorizationPolicy,
        Kind::Telemetry,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::ServiceEntry => "ServiceEntry",
            Kind::VirtualService => "VirtualService",
            Kind::Gateway => "Gateway",
            Kind::DestinationRule => "DestinationRule",
            Kind::Sidecar => "Sidecar",
            Kind::AuthorizationPolicy => "AuthorizationPolicy",
            Kind::Telemetry => "Telemetry",
        }
    }

    /// The API group the kind belongs to.
    pub fn group(self) -> &'static str {
        match self {
            Kind::AuthorizationPolicy => SECURITY_GROUP,
            Kind::Telemetry => TELEMETRY_GROUP,
            _ => ISTIO_GROUP,
        }
    }

    fn from_name(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|kind| kind.name() == name)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct Metadata {
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

impl Metadata {
    /// The namespace, `default` when the resource names none (as `kubectl apply` would place it).
    pub fn namespace(&self) -> &str {
        self.namespace.as_deref().unwrap_or("default")
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Spec {
    // Boxed: a resource is as small as its kind needs (the kinds differ widely in size).
    ServiceEntry(Box<ServiceEntry>),
    VirtualService(Box<VirtualService>),
    Gateway(Box<Gateway>),
    DestinationRule(Box<DestinationRule>),
    Sidecar(Box<Sidecar>),
    AuthorizationPolicy(Box<AuthorizationPolicy>),
    Telemetry(Box<Telemetry>),
}

impl Serialize for Spec {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Spec::ServiceEntry(spec) => spec.serialize(serializer),
            Spec::VirtualService(spec) => spec.serialize(serializer),
            Spec::Gateway(spec) => spec.serialize(serializer),
            Spec::DestinationRule(spec) => spec.serialize(serializer),
            Spec::Sidecar(spec) => spec.serialize(serializer),
            Spec::AuthorizationPolicy(spec) => spec.serialize(serializer),
            Spec::Telemetry(spec) => spec.serialize(serializer),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Resource {
    pub kind: Kind,
    pub metadata: Metadata,
    pub spec: Spec,
}

impl Resource {
    /// `Kind namespace/name`, as errors and logs name it.
    pub fn id(&self) -> String {
        format!("{} {}/{}", self.kind, self.metadata.namespace(), self.metadata.name)
    }
}

/// What one YAML or JSON document turned out to be.
#[derive(Clone, Debug, PartialEq)]
pub enum Document {
    Resource(Box<Resource>),
    /// The mesh config: the `istio` ConfigMap (key `mesh`), or a `MeshConfig` resource.
    Mesh(Box<MeshConfig>),
    /// Something Sluice does not read (a Deployment, an EnvoyFilter…): `apiVersion` and `kind`.
    Ignored(String, String),
}

/// A document that could not be read: the resource it claims to be (when that much was readable) and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DocumentError {
    pub resource: Option<String>,
    pub errors: Vec<FieldError>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Envelope {
    #[serde(default)]
    api_version: String,
    #[serde(default)]
    kind: String,
    #[serde(default)]
    metadata: EnvelopeMetadata,
    #[serde(default)]
    spec: serde_json::Value,
    #[serde(default)]
    data: BTreeMap<String, String>,
}

/// A document's metadata as written: the resource keeps its name, namespace and labels; of the annotations only
/// what Sluice reads is taken (the dry-run one, into an AuthorizationPolicy's spec).
#[derive(Default, Deserialize)]
struct EnvelopeMetadata {
    #[serde(flatten)]
    kept: Metadata,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

impl Document {
    pub fn parse(value: serde_json::Value) -> Result<Document, DocumentError> {
        let envelope: Envelope = serde_path_to_error::deserialize(value).map_err(|e| DocumentError {
            resource: None,
            errors: vec![FieldError::from_serde("", &e.path().to_string(), &e.inner().to_string())],
        })?;
        let (group, version) = envelope.api_version.split_once('/').unwrap_or(("", envelope.api_version.as_str()));
        let id = format!("{} {}/{}", envelope.kind, envelope.metadata.kept.namespace(), envelope.metadata.kept.name);
        let fail = |path: &str, reason: String| DocumentError {
            resource: Some(id.clone()),
            errors: vec![FieldError::new(path, reason)],
        };
        let parse_failed = |e: serde_path_to_error::Error<serde_json::Error>| DocumentError {
            resource: Some(id.clone()),
            errors: vec![FieldError::from_serde("spec", &e.path().to_string(), &e.inner().to_string())],
        };
        let checked_mesh = |mesh: MeshConfig, prefix: &str| {
            let errors = mesh.validate(prefix);
            if errors.is_empty() {
                Ok(Document::Mesh(Box::new(mesh)))
            } else {
                Err(DocumentError { resource: Some(id.clone()), errors })
            }
        };
        if envelope.kind == "ConfigMap" && group.is_empty() && envelope.metadata.kept.name == "istio" {
            let mesh = envelope.data.get("mesh").map(String::as_str).unwrap_or("");
            return match MeshConfig::from_mesh_yaml(mesh) {
                Ok(mesh) => checked_mesh(mesh, "data.mesh"),
                Err(error) => Err(DocumentError { resource: Some(id.clone()), errors: vec![error] }),
            };
        }
        let versions: &[&str] = match group {
            ISTIO_GROUP => &ISTIO_VERSIONS,
            SECURITY_GROUP if envelope.kind == "AuthorizationPolicy" => &SECURITY_VERSIONS,
            TELEMETRY_GROUP if envelope.kind == "Telemetry" => &TELEMETRY_VERSIONS,
            _ => return Ok(Document::Ignored(envelope.api_version, envelope.kind)),
        };
        if !versions.contains(&version) {
            let (last, others) = versions.split_last().unwrap_or((&"", &[]));
            let known = if others.is_empty() { (*last).to_owned() } else { format!("{} or {last}", others.join(", ")) };
            return Err(fail("apiVersion", format!("unknown version '{version}' of {group} ({known})")));
        }
        if envelope.kind == "MeshConfig" {
            // Not an Istio kind, but how some guides write the mesh config down: read its spec as the mesh config.
            let mesh = serde_path_to_error::deserialize(envelope.spec).map_err(parse_failed)?;
            return checked_mesh(mesh, "spec");
        }
        let Some(kind) = Kind::from_name(&envelope.kind) else {
            return Ok(Document::Ignored(envelope.api_version, envelope.kind));
        };
        if envelope.metadata.kept.name.is_empty() {
            return Err(fail("metadata.name", "a name is required".into()));
        }
        let spec = envelope.spec;
        let typed = parse_failed;
        let spec = match kind {
            Kind::ServiceEntry => Spec::ServiceEntry(serde_path_to_error::deserialize(spec).map_err(typed)?),
            Kind::VirtualService => Spec::VirtualService(serde_path_to_error::deserialize(spec).map_err(typed)?),
            Kind::Gateway => Spec::Gateway(serde_path_to_error::deserialize(spec).map_err(typed)?),
            Kind::DestinationRule => Spec::DestinationRule(serde_path_to_error::deserialize(spec).map_err(typed)?),
            Kind::Sidecar => Spec::Sidecar(serde_path_to_error::deserialize(spec).map_err(typed)?),
            Kind::AuthorizationPolicy => {
                let mut policy: Box<AuthorizationPolicy> = serde_path_to_error::deserialize(spec).map_err(typed)?;
                policy.dry_run = envelope.metadata.annotations.get(DRY_RUN).cloned();
                Spec::AuthorizationPolicy(policy)
            }
            Kind::Telemetry => Spec::Telemetry(serde_path_to_error::deserialize(spec).map_err(typed)?),
        };
        Ok(Document::Resource(Box::new(Resource { kind, metadata: envelope.metadata.kept, spec })))
    }
}

impl Resource {
    /// Every problem Istio's validation would report for this resource.
    pub fn validate(&self) -> Vec<FieldError> {
        let namespace = self.metadata.namespace();
        let mut errors = match &self.spec {
            Spec::ServiceEntry(spec) => spec.validate(),
            Spec::VirtualService(spec) => spec.validate(),
            Spec::Gateway(spec) => spec.validate(),
            Spec::DestinationRule(spec) => spec.validate(),
            Spec::Sidecar(spec) => spec.validate(),
            Spec::AuthorizationPolicy(spec) => spec.validate(),
            Spec::Telemetry(spec) => spec.validate(),
        };
        let export_to = match &self.spec {
            Spec::ServiceEntry(spec) => Some((&spec.export_to, ExportOf::ServiceEntry)),
            Spec::VirtualService(spec) => Some((&spec.export_to, ExportOf::Other)),
            Spec::DestinationRule(spec) => Some((&spec.export_to, ExportOf::Other)),
            Spec::Gateway(_) | Spec::Sidecar(_) | Spec::AuthorizationPolicy(_) | Spec::Telemetry(_) => None,
        };
        if let Some((export_to, of)) = export_to {
            names::validate_export_to(namespace, export_to, of, "spec.exportTo", &mut errors);
        }
        if let Spec::DestinationRule(rule) = &self.spec {
            // A rule for some workloads only is the namespace's own.
            if rule.workload_selector.is_some() && rule.export_to.iter().any(|e| e != "." && e != namespace) {
                errors.push(FieldError::new(
                    "spec.exportTo",
                    "a DestinationRule with a workloadSelector may be exported only to its own namespace",
                ));
            }
        }
        if self.kind == Kind::Gateway && !names::is_dns_label(&self.metadata.name) {
            errors.push(FieldError::new(
                "metadata.name",
                format!("'{}' is not a Gateway name (letters, digits and '-', no dots)", self.metadata.name),
            ));
        }
        errors
    }
}
