//! The configuration in force: each reload replaces it, except that a resource rejected now keeps its last good
//! version, and a file or directory that cannot be read keeps the resources (and the mesh config) it last gave.

use std::{
    borrow::Cow,
    collections::{BTreeMap, BTreeSet},
    io::{BufRead, Write},
    path::Path,
    sync::Arc,
};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::{error::ConfigError, sources::files::Loaded, Kind, MeshConfig, Metadata, Resource, Snapshot, Spec};

/// zstd's level for the store: its default, fast enough for 20,000 resources in tens of milliseconds.
const LEVEL: i32 = 3;

#[derive(Debug, Default)]
pub struct Store {
    resources: Arc<Packed>,
    mesh: MeshConfig,
}

/// The resources in force, compressed together: one JSON line per resource, in id order, with the file (or
/// `kubernetes`) it came from and its `metadata` and `spec` (empty fields left out). Resources repeat one
/// another's structure and names, so the whole compresses many times over (bench/README.md has the figures);
/// the typed form takes several times the JSON's memory, and is needed only while a policy is compiled from it, which reads the whole in one pass.
#[derive(Debug, Default)]
pub struct Packed {
    /// Empty before the first load.
    zstd: Box<[u8]>,
}

/// One resource's line.
#[derive(Deserialize, Serialize)]
struct Line<'a, R> {
    #[serde(borrow)]
    id: Cow<'a, str>,
    kind: Kind,
    #[serde(borrow)]
    source: Cow<'a, str>,
    /// `{"metadata": …, "spec": …}`.
    resource: R,
}

/// What a line's resource holds.
#[derive(Deserialize, Serialize)]
struct Held<M, S> {
    metadata: M,
    spec: S,
}

impl Packed {
    fn new<'a>(lines: impl Iterator<Item = &'a str>) -> std::io::Result<Packed> {
        let mut encoder = zstd::stream::write::Encoder::new(Vec::new(), LEVEL)?;
        for line in lines {
            encoder.write_all(line.as_bytes())?;
            encoder.write_all(b"\n")?;
        }
        Ok(Packed { zstd: encoder.finish()?.into_boxed_slice() })
    }

    /// Each resource's line, in id order.
    fn lines(&self) -> impl Iterator<Item = String> + '_ {
        let unreadable =
            |error: std::io::Error| tracing::error!(%error, "the configuration in force cannot be read back");
        let reader = (!self.zstd.is_empty())
            .then(|| zstd::stream::read::Decoder::with_buffer(&self.zstd[..]).map_err(unreadable).ok())
            .flatten();
        reader
            .map(std::io::BufReader::new)
            .into_iter()
            .flat_map(move |reader| reader.lines().map_while(move |line| line.map_err(unreadable).ok()))
    }

    /// Each resource with the file it came from, typed, in id order. A line that does not read back (it cannot
    /// but for a fault in Sluice) is logged and left out.
    pub fn resources(&self) -> impl Iterator<Item = Resource> + '_ {
        self.lines().filter_map(|text| match read(&text) {
            Ok(resource) => Some(resource),
            Err(error) => {
                tracing::error!(%error, line = text, "a stored resource reads back wrong");
                None
            }
        })
    }

    /// Each resource's kind, metadata and spec as JSON (as `/config_dump` shows them).
    pub fn entries(&self) -> impl Iterator<Item = (Kind, Metadata, serde_json::Value)> + '_ {
        self.lines().filter_map(|text| {
            let line: Line<&RawValue> = serde_json::from_str(&text).ok()?;
            let held: Held<Metadata, serde_json::Value> = serde_json::from_str(line.resource.get()).ok()?;
            Some((line.kind, held.metadata, held.spec))
        })
    }
}

/// `resource`'s line.
fn line(id: &str, source: &str, resource: &Resource) -> serde_json::Result<String> {
    let held = Held { metadata: &resource.metadata, spec: &resource.spec };
    serde_json::to_string(&Line { id: id.into(), kind: resource.kind, source: source.into(), resource: held })
}

/// The resource a line holds, typed.
fn read(text: &str) -> serde_json::Result<Resource> {
    fn typed<S: serde::de::DeserializeOwned>(
        json: &str,
        spec: fn(Box<S>) -> Spec,
    ) -> serde_json::Result<(Metadata, Spec)> {
        let held: Held<Metadata, Box<S>> = serde_json::from_str(json)?;
        Ok((held.metadata, spec(held.spec)))
    }
    let line: Line<&RawValue> = serde_json::from_str(text)?;
    let json = line.resource.get();
    let (metadata, spec) = match line.kind {
        Kind::ServiceEntry => typed(json, Spec::ServiceEntry),
        Kind::VirtualService => typed(json, Spec::VirtualService),
        Kind::Gateway => typed(json, Spec::Gateway),
        Kind::DestinationRule => typed(json, Spec::DestinationRule),
        Kind::Sidecar => typed(json, Spec::Sidecar),
        Kind::AuthorizationPolicy => typed(json, Spec::AuthorizationPolicy),
        Kind::Telemetry => typed(json, Spec::Telemetry),
    }?;
    Ok(Resource { kind: line.kind, metadata, spec })
}

/// What a reload did beyond taking what was valid.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Resources rejected this time whose last good version stays in force.
    pub kept: Vec<String>,
}

impl Store {
    /// Takes a fresh load of every source. (Should the configuration fail to compress, which takes running out of
    /// memory, the configuration in force stays.)
    pub fn update(&mut self, loaded: &Loaded) -> Outcome {
        let rejected: BTreeSet<&str> = loaded.errors.iter().filter_map(|e| e.resource.as_deref()).collect();
        let unreadable: BTreeSet<&str> =
            loaded.errors.iter().filter(|e| e.resource.is_none()).map(|e| e.source.as_str()).collect();
        // Resource id → its line.
        let mut next: BTreeMap<String, String> = BTreeMap::new();
        for (source, resource) in &loaded.sources {
            let id = resource.id();
            match line(&id, source, resource) {
                Ok(line) => {
                    next.insert(id, line);
                }
                Err(error) => tracing::error!(%error, resource = id, "a resource cannot be stored"),
            }
        }
        let mut outcome = Outcome::default();
        // A rejected AuthorizationPolicy without a last good version is stood in for by a deny-all (below, the
        // last good one replaces it if there is one).
        for (source, stand_in) in &loaded.stand_ins {
            let id = stand_in.id();
            if !next.contains_key(&id) && !self.holds(&id) {
                if let Ok(line) = line(&id, source, stand_in) {
                    tracing::warn!(
                        resource = id,
                        "rejected, with no last good version: it denies what it would have governed until it is fixed"
                    );
                    next.insert(id, line);
                }
            }
        }
        if !rejected.is_empty() || !unreadable.is_empty() {
            for text in self.resources.lines() {
                let Ok(line) = serde_json::from_str::<Line<&RawValue>>(&text) else { continue };
                // A directory that cannot be read (gone, swapped, its permissions changed) keeps what its files
                // held, as a file that cannot be read does.
                let from_unreadable = || unreadable.iter().any(|path| Path::new(&*line.source).starts_with(path));
                let keep = (rejected.contains(&*line.id) || from_unreadable()) && !next.contains_key(&*line.id);
                if keep {
                    let id = line.id.into_owned();
                    outcome.kept.push(id.clone());
                    next.insert(id, text);
                }
            }
        }
        match Packed::new(next.values().map(String::as_str)) {
            Ok(packed) => self.resources = Arc::new(packed),
            Err(error) => tracing::error!(%error, "the configuration read cannot be stored; the last stays in force"),
        }
        // The mesh config may have been in what could not be read: its mode stays rather than falling back to
        // ALLOW_ANY.
        let mesh_rejected = loaded.errors.iter().any(is_mesh_error) || !unreadable.is_empty();
        if !mesh_rejected {
            self.mesh = loaded.snapshot.mesh.clone();
        }
        outcome
    }

    /// Whether a resource of this id is in force.
    fn holds(&self, id: &str) -> bool {
        self.resources
            .lines()
            .any(|text| serde_json::from_str::<Line<&RawValue>>(&text).is_ok_and(|line| line.id == id))
    }

    /// The resources in force, typed, with the mesh config: what a policy is compiled from.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot { resources: self.resources.resources().map(Arc::new).collect(), mesh: self.mesh.clone() }
    }

    /// The resources in force as held, and the mesh config.
    pub fn stored(&self) -> (Arc<Packed>, MeshConfig) {
        (self.resources.clone(), self.mesh.clone())
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
        let mut store = Store::default();
        store.update(&loaded);
        let read: BTreeMap<String, &Arc<Resource>> =
            loaded.sources.iter().map(|(_, resource)| (resource.id(), resource)).collect();
        let held = store.snapshot().resources;
        assert_eq!(held.len(), read.len(), "every resource is held");
        for ((id, resource), held) in read.iter().zip(&held) {
            assert_eq!(held, *resource, "{id}");
        }
    }

    #[test]
    fn an_invalid_authorization_policy_fails_closed_until_it_is_fixed_then_keeps_its_last_good_version() {
        use crate::config::authorization_policy::Action;
        let dir = tempfile_dir();
        let policy = |action: &str| {
            format!(
                "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: team}}\n\
                 spec: {{selector: {{matchLabels: {{app: web}}}}, action: {action}, rules: [{{to: [{{operation: {{ports: ['443']}}}}]}}]}}\n"
            )
        };
        let held = |store: &Store| match &store.snapshot().resources[0].spec {
            Spec::AuthorizationPolicy(policy) => (*policy.clone(), policy.action().unwrap()),
            _ => unreachable!(),
        };
        let mut store = Store::default();
        write(&dir, "p.yaml", &policy("CUSTOM"));
        store.update(&files::load(std::slice::from_ref(&dir)));
        let (stand_in, action) = held(&store);
        assert_eq!(action, Action::Deny, "a first version that is invalid denies");
        assert_eq!(stand_in.rules.as_ref().map(Vec::len), Some(1), "everything: one empty rule");
        assert_eq!(stand_in.selector.unwrap().match_labels["app"], "web", "what it would have governed");

        write(&dir, "p.yaml", &policy("ALLOW"));
        store.update(&files::load(std::slice::from_ref(&dir)));
        assert_eq!(held(&store).1, Action::Allow, "fixed, it applies");
        write(&dir, "p.yaml", &policy("CUSTOM"));
        let outcome = store.update(&files::load(std::slice::from_ref(&dir)));
        assert_eq!(outcome.kept, ["AuthorizationPolicy team/p"]);
        assert_eq!(held(&store).1, Action::Allow, "rejected again, the last good version stays");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_directory_that_disappears_keeps_what_its_files_held_and_the_mesh_mode() {
        let dir = tempfile_dir();
        let config = dir.join("istio");
        std::fs::create_dir_all(&config).unwrap();
        write(&config, "mesh.yaml", "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: istio}\ndata:\n  mesh: |\n    outboundTrafficPolicy:\n      mode: REGISTRY_ONLY\n");
        write(&config, "entry.yaml", "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: api, namespace: default}\nspec: {hosts: [api.example], ports: [{number: 443, name: tls, protocol: TLS}], resolution: DNS}\n");
        let mut store = Store::default();
        store.update(&files::load(std::slice::from_ref(&config)));
        assert_eq!(store.snapshot().resources.len(), 1);

        std::fs::remove_dir_all(&config).unwrap();
        let outcome = store.update(&files::load(std::slice::from_ref(&config)));
        assert_eq!(outcome.kept, ["ServiceEntry default/api"]);
        assert_eq!(store.snapshot().mesh.outbound_mode(), Some(OutboundTrafficMode::RegistryOnly), "not ALLOW_ANY");

        std::fs::create_dir_all(&config).unwrap();
        store.update(&files::load(std::slice::from_ref(&config)));
        assert!(store.snapshot().resources.is_empty(), "back and empty, it is read as it is");
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
