//! The configuration in force: each reload replaces it, except that a resource rejected now keeps its last good
//! version, and a file that cannot be read keeps the resources it last gave.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use serde::{Deserialize, Serialize};

use super::{error::ConfigError, sources::files::Loaded, Kind, MeshConfig, Metadata, Resource, Snapshot, Spec};

#[derive(Debug, Default)]
pub struct Store {
    /// Resource id → the resource and where it came from.
    resources: BTreeMap<String, Arc<Stored>>,
    mesh: MeshConfig,
}

/// A resource in force, held as the compact JSON it reads back from: the typed form takes several times the
/// memory, and is needed only while a policy is compiled from it.
#[derive(Debug)]
pub struct Stored {
    kind: Kind,
    /// The file (or `kubernetes`) the resource came from; shared by the resources of one source.
    source: Arc<str>,
    /// `{"metadata": …, "spec": …}`, empty fields left out.
    json: Box<str>,
}

/// What a stored resource's JSON holds.
#[derive(Deserialize, Serialize)]
struct Held<M, S> {
    metadata: M,
    spec: S,
}

impl Stored {
    fn new(source: Arc<str>, resource: &Resource) -> Stored {
        let held = Held { metadata: &resource.metadata, spec: &resource.spec };
        let json = serde_json::to_string(&held).unwrap_or_default();
        Stored { kind: resource.kind, source, json: json.into_boxed_str() }
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The resource's metadata, and its spec as JSON (as `/config_dump` shows it).
    pub fn metadata_and_spec(&self) -> Option<(Metadata, serde_json::Value)> {
        let held: Held<Metadata, serde_json::Value> = serde_json::from_str(&self.json).ok()?;
        Some((held.metadata, held.spec))
    }

    /// The typed resource; `None` only if what was written cannot be read back (logged: it is left out).
    pub fn resource(&self) -> Option<Resource> {
        fn read<S: serde::de::DeserializeOwned>(
            json: &str,
            spec: fn(Box<S>) -> Spec,
        ) -> serde_json::Result<(Metadata, Spec)> {
            let held: Held<Metadata, Box<S>> = serde_json::from_str(json)?;
            Ok((held.metadata, spec(held.spec)))
        }
        let read = match self.kind {
            Kind::ServiceEntry => read(&self.json, Spec::ServiceEntry),
            Kind::VirtualService => read(&self.json, Spec::VirtualService),
            Kind::Gateway => read(&self.json, Spec::Gateway),
            Kind::DestinationRule => read(&self.json, Spec::DestinationRule),
            Kind::Sidecar => read(&self.json, Spec::Sidecar),
        };
        match read {
            Ok((metadata, spec)) => Some(Resource { kind: self.kind, metadata, spec }),
            Err(error) => {
                tracing::error!(source = %self.source, kind = %self.kind, %error, "a stored resource reads back wrong");
                None
            }
        }
    }
}

/// What a reload did beyond taking what was valid.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Resources rejected this time whose last good version stays in force.
    pub kept: Vec<String>,
}

impl Store {
    /// Takes a fresh load of every source.
    pub fn update(&mut self, loaded: &Loaded) -> Outcome {
        let rejected: BTreeSet<&str> = loaded.errors.iter().filter_map(|e| e.resource.as_deref()).collect();
        let unreadable: BTreeSet<&str> =
            loaded.errors.iter().filter(|e| e.resource.is_none()).map(|e| e.source.as_str()).collect();
        let mut next: BTreeMap<String, Arc<Stored>> = BTreeMap::new();
        let mut sources: BTreeMap<&str, Arc<str>> = BTreeMap::new();
        for (source, resource) in &loaded.sources {
            let source = sources.entry(source.as_str()).or_insert_with(|| source.as_str().into()).clone();
            next.insert(resource.id(), Arc::new(Stored::new(source, resource)));
        }
        let mut outcome = Outcome::default();
        for (id, stored) in &self.resources {
            let keep =
                (rejected.contains(id.as_str()) || unreadable.contains(&*stored.source)) && !next.contains_key(id);
            if keep {
                next.insert(id.clone(), stored.clone());
                outcome.kept.push(id.clone());
            }
        }
        self.resources = next;
        let mesh_rejected = loaded.errors.iter().any(is_mesh_error);
        if !mesh_rejected {
            self.mesh = loaded.snapshot.mesh.clone();
        }
        outcome
    }

    /// The resources in force, typed, with the mesh config: what a policy is compiled from.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            resources: self.resources.values().filter_map(|stored| stored.resource().map(Arc::new)).collect(),
            mesh: self.mesh.clone(),
        }
    }

    /// The resources in force as held (in id order), and the mesh config.
    pub fn stored(&self) -> (Vec<Arc<Stored>>, MeshConfig) {
        (self.resources.values().cloned().collect(), self.mesh.clone())
    }
}

fn is_mesh_error(error: &ConfigError) -> bool {
    error.resource.as_deref().is_some_and(|id| id.starts_with("ConfigMap ") || id.starts_with("MeshConfig "))
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::config::{sources::files, OutboundTrafficMode};

    fn write(dir: &std::path::Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    const GOOD: &str = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: api}\n\
                        spec: {hosts: [api.example], ports: [{number: 443, name: tls}]}\n";
    const BROKEN: &str = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: api}\n\
                          spec: {hosts: ['*'], ports: [{number: 443, name: tls}]}\n";

    #[test]
    fn a_rejected_resource_keeps_its_last_good_version_and_a_deleted_one_goes() {
        let dir = tempfile_dir();
        write(&dir, "a.yaml", GOOD);
        let mut store = Store::default();
        store.update(&files::load(std::slice::from_ref(&dir)));
        assert_eq!(store.snapshot().resources.len(), 1);

        write(&dir, "a.yaml", BROKEN);
        let outcome = store.update(&files::load(std::slice::from_ref(&dir)));
        assert_eq!(outcome.kept, ["ServiceEntry default/api"]);
        assert_eq!(store.snapshot().resources[0].metadata.name, "api", "the last good version stays");

        write(&dir, "a.yaml", "not: [valid yaml");
        store.update(&files::load(std::slice::from_ref(&dir)));
        assert_eq!(store.snapshot().resources.len(), 1, "an unreadable file keeps what it gave");

        write(&dir, "a.yaml", "");
        store.update(&files::load(std::slice::from_ref(&dir)));
        assert!(store.snapshot().resources.is_empty(), "a resource removed from its file is removed");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn every_resource_of_the_examples_and_the_valid_corpus_reads_back_as_it_was_read() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let loaded = files::load(&[root.join("deploy/examples"), root.join("tests/corpus/valid")]);
        assert!(loaded.sources.len() >= 20, "the examples and the corpus are read: {}", loaded.sources.len());
        for (source, resource) in &loaded.sources {
            let stored = Stored::new(source.as_str().into(), resource);
            assert_eq!(stored.resource().as_ref(), Some(&**resource), "{source}: {stored:?}");
        }
    }

    #[test]
    fn a_broken_mesh_config_keeps_the_last_good_mode() {
        let dir = tempfile_dir();
        let mesh = |mode: &str| {
            format!(
                "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: istio}}\ndata:\n  mesh: |\n    outboundTrafficPolicy:\n      mode: {mode}\n"
            )
        };
        write(&dir, "mesh.yaml", &mesh("REGISTRY_ONLY"));
        let mut store = Store::default();
        store.update(&files::load(std::slice::from_ref(&dir)));
        write(&dir, "mesh.yaml", &mesh("SOMETIMES"));
        store.update(&files::load(std::slice::from_ref(&dir)));
        assert_eq!(store.snapshot().mesh.outbound_mode(), Some(OutboundTrafficMode::RegistryOnly));
        let _ = std::fs::remove_dir_all(dir);
    }

    fn tempfile_dir() -> PathBuf {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("sluice-store-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
