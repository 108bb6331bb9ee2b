//! The file source: YAML (multi-document) and JSON files, or directories of them, read and validated.

use std::path::{Path, PathBuf};

use super::super::{
    authorization_policy::fail_closed,
    error::ConfigError,
    resource::{Document, Resource},
    MeshConfig, Snapshot, Spec,
};

/// What reading the files gave: the resources that passed validation, the mesh config, and every error. A
/// rejected resource is left out alone; the rest are kept.
#[derive(Clone, Debug, Default)]
pub struct Loaded {
    pub snapshot: Snapshot,
    /// The valid resources with the file each came from.
    pub sources: Vec<(String, std::sync::Arc<Resource>)>,
    pub errors: Vec<ConfigError>,
    /// Documents of kinds Sluice does not read, as `FILE: apiVersion/kind`.
    pub ignored: Vec<String>,
    /// For each AuthorizationPolicy rejected here, the deny-all that stands in for it where it has no last good
    /// version (with its file): an invalid policy fails closed.
    pub stand_ins: Vec<(String, std::sync::Arc<Resource>)>,
    /// How many valid mesh config documents were read.
    pub mesh_documents: usize,
}

/// Reads every `.yaml`, `.yml` and `.json` file in `paths` (directories are read recursively, in name order).
pub fn load(paths: &[PathBuf]) -> Loaded {
    let mut loaded = Loaded::default();
    let mut files = Vec::new();
    for path in paths {
        collect(path, &mut files, &mut loaded.errors);
    }
    for file in files {
        read_file(&file, &mut loaded);
    }
    loaded
}

fn collect(path: &Path, files: &mut Vec<PathBuf>, errors: &mut Vec<ConfigError>) {
    let fail = |reason: String| ConfigError {
        source: path.display().to_string(),
        resource: None,
        path: String::new(),
        reason,
    };
    if path.is_dir() {
        let mut entries: Vec<PathBuf> = match std::fs::read_dir(path) {
            Ok(entries) => entries.filter_map(|e| e.ok().map(|e| e.path())).collect(),
            Err(e) => return errors.push(fail(format!("cannot read directory: {e}"))),
        };
        entries.sort();
        for entry in entries {
            let is_config = entry.extension().is_some_and(|ext| ext == "yaml" || ext == "yml" || ext == "json");
            if entry.is_dir() || is_config {
                collect(&entry, files, errors);
            }
        }
    } else if path.exists() {
        files.push(path.to_owned());
    } else {
        errors.push(fail("no such file or directory".into()));
    }
}

fn read_file(file: &Path, loaded: &mut Loaded) {
    let source = file.display().to_string();
    let file_error =
        |reason: String| ConfigError { source: source.clone(), resource: None, path: String::new(), reason };
    let text = match std::fs::read_to_string(file) {
        Ok(text) => text,
        Err(e) => return loaded.errors.push(file_error(format!("cannot read: {e}"))),
    };
    let mut add = |document: Result<serde_json::Value, String>| match document {
        Ok(serde_json::Value::Null) => {}
        Ok(value) => loaded.add(&source, value),
        Err(reason) => loaded.errors.push(file_error(format!("not valid YAML or JSON: {reason}"))),
    };
    if file.extension().is_some_and(|ext| ext == "json") {
        add(serde_json::from_str(&text).map_err(|e| e.to_string()));
    } else {
        super::yaml::documents(&text, add);
    }
}

impl Loaded {
    /// Reads one document from `source`: a valid resource is kept, an invalid one reported, other kinds listed.
    pub fn add(&mut self, source: &str, value: serde_json::Value) {
        match Document::parse(value) {
            Ok(Document::Resource(resource)) => accept(*resource, source, self),
            Ok(Document::Mesh(mesh)) => {
                self.mesh_documents += 1;
                self.snapshot.mesh = merge_mesh(&self.snapshot.mesh, *mesh)
            }
            Ok(Document::Ignored(api_version, kind)) => self.ignored.push(format!("{source}: {api_version}/{kind}")),
            Err(error) => {
                if let Some(stand_in) = error.resource.as_deref().and_then(|id| fail_closed(id, None)) {
                    self.stand_ins.push((source.to_owned(), std::sync::Arc::new(stand_in)));
                }
                self.add_errors(source, error)
            }
        }
    }

    fn add_errors(&mut self, source: &str, error: crate::config::resource::DocumentError) {
        self.errors.extend(error.errors.into_iter().map(|field| ConfigError {
            source: source.to_owned(),
            resource: error.resource.clone(),
            path: field.path,
            reason: field.reason,
        }));
    }

    /// Adds what `other` read (a second source) to this load.
    pub fn extend(&mut self, other: Loaded) {
        self.stand_ins.extend(other.stand_ins);
        self.snapshot.resources.extend(other.snapshot.resources);
        self.sources.extend(other.sources);
        self.errors.extend(other.errors);
        self.ignored.extend(other.ignored);
        self.mesh_documents += other.mesh_documents;
        self.snapshot.mesh = merge_mesh(&self.snapshot.mesh, other.snapshot.mesh);
    }
}

fn accept(resource: Resource, source: &str, loaded: &mut Loaded) {
    let errors = resource.validate();
    if errors.is_empty() {
        let resource = std::sync::Arc::new(resource);
        loaded.sources.push((source.to_owned(), resource.clone()));
        loaded.snapshot.resources.push(resource);
        return;
    }
    let id = resource.id();
    if let Spec::AuthorizationPolicy(policy) = &resource.spec {
        // The selector stays where it was valid: the stand-in denies what the policy would have governed.
        let selector_valid = !errors.iter().any(|error| error.path.starts_with("spec.selector"));
        let selector = policy.selector.clone().filter(|_| selector_valid);
        if let Some(stand_in) = fail_closed(&id, selector) {
            loaded.stand_ins.push((source.to_owned(), std::sync::Arc::new(stand_in)));
        }
    }
    loaded.errors.extend(errors.into_iter().map(|error| ConfigError {
        source: source.to_owned(),
        resource: Some(id.clone()),
        path: error.path,
        reason: error.reason,
    }));
}

/// A later mesh config overrides what it sets.
fn merge_mesh(current: &MeshConfig, later: MeshConfig) -> MeshConfig {
    if later.outbound_traffic_policy.is_some() {
        later
    } else {
        current.clone()
    }
}
