//! The configuration in force: each reload replaces it, except that a resource rejected now keeps its last good
//! version, and a file that cannot be read keeps the resources it last gave.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use super::{error::ConfigError, sources::files::Loaded, MeshConfig, Resource, Snapshot};

#[derive(Debug, Default)]
pub struct Store {
    /// Resource id → (source, resource).
    resources: BTreeMap<String, (String, Arc<Resource>)>,
    mesh: MeshConfig,
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
        let mut next: BTreeMap<String, (String, Arc<Resource>)> = BTreeMap::new();
        for (source, resource) in &loaded.sources {
            next.insert(resource.id(), (source.clone(), resource.clone()));
        }
        let mut outcome = Outcome::default();
        for (id, (source, resource)) in &self.resources {
            let keep =
                (rejected.contains(id.as_str()) || unreadable.contains(source.as_str())) && !next.contains_key(id);
            if keep {
                next.insert(id.clone(), (source.clone(), resource.clone()));
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

    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            resources: self.resources.values().map(|(_, resource)| resource.clone()).collect(),
            mesh: self.mesh.clone(),
        }
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
