//! The Kubernetes source: watchers on the Istio kinds Sluice reads (all namespaces, or one) and on the mesh
//! ConfigMap.
//! After every change the whole set is read again, through the same validation as files, and sent on.
//!
//! Objects are held as compact JSON of what Sluice reads of them (`apiVersion`, `kind`, the metadata it names
//! resources by, `spec`, the ConfigMap's `data`): not as parsed values, nor with the metadata the API server
//! adds (managed fields, `last-applied-configuration`), which would take several times the memory.

use std::collections::{BTreeMap, HashSet};

use futures_util::{stream, StreamExt};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{ConfigMap, ObjectReference, Pod, Secret};
use kube::{
    api::{Api, ApiResource, DynamicObject, GroupVersionKind},
    runtime::{
        events::{Event, EventType, Recorder, Reporter},
        watcher, WatchStreamExt,
    },
    Client,
};
use tokio::sync::watch;

use super::files::Loaded;
use crate::config::{
    secrets::{KnownSecrets, SecretData},
    workloads::{KnownWorkloads, PodAddresses, Workload, Workloads},
};

/// How errors from this source name it.
pub const SOURCE: &str = "kubernetes";
const ISTIO_GROUP: &str = "networking.istio.io";
const ISTIO_VERSION: &str = "v1";
const SECURITY_GROUP: &str = "security.istio.io";
const TELEMETRY_GROUP: &str = "telemetry.istio.io";
/// Kind, its plural as the API names its resources, and its group.
const KINDS: [(&str, &str, &str); 7] = [
    ("ServiceEntry", "serviceentries", ISTIO_GROUP),
    ("VirtualService", "virtualservices", ISTIO_GROUP),
    ("Gateway", "gateways", ISTIO_GROUP),
    ("DestinationRule", "destinationrules", ISTIO_GROUP),
    ("Sidecar", "sidecars", ISTIO_GROUP),
    ("AuthorizationPolicy", "authorizationpolicies", SECURITY_GROUP),
    ("Telemetry", "telemetries", TELEMETRY_GROUP),
];

/// Where to watch.
#[derive(Clone, Debug)]
pub struct Scope {
    /// Only this namespace's Istio resources; all namespaces when None.
    pub namespace: Option<String>,
    /// Where the `istio` ConfigMap (the mesh config) lives.
    pub mesh_namespace: String,
}

enum Change {
    Reset(&'static str),
    Buffer(&'static str, serde_json::Value),
    Commit(&'static str),
    Apply(&'static str, serde_json::Value),
    Delete(&'static str, serde_json::Value),
}

/// Every object the watches hold, as compact JSON: what [`watch`] sends on after each change.
#[derive(Debug, Default)]
pub struct Documents(Vec<Arc<str>>);

impl Documents {
    /// Reads and validates the objects, as the files are.
    pub fn load(&self) -> Loaded {
        let mut loaded = Loaded::default();
        for text in &self.0 {
            match serde_json::from_str(text) {
                Ok(value) => loaded.add(SOURCE, value),
                Err(error) => tracing::error!(%error, "a Kubernetes object held reads back wrong"),
            }
        }
        loaded
    }
}

type Objects = BTreeMap<&'static str, BTreeMap<String, Arc<str>>>;

/// An object as held: its key and compact JSON.
fn held(object: serde_json::Value) -> (String, Arc<str>) {
    (key(&object), object.to_string().into())
}

/// Watches until the task is dropped, sending the full, validated set after every change once every kind has
/// been listed. A kind whose watch fails (CRD missing, RBAC denied) is logged and retried with backoff; the
/// others go on.
pub async fn watch(client: Client, scope: Scope, sender: watch::Sender<Option<Arc<Documents>>>) {
    let mut rejections = Rejections::new(client.clone());
    let mut streams = Vec::new();
    for (kind, plural, group) in KINDS {
        let resource = ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, ISTIO_VERSION, kind), plural);
        let api: Api<DynamicObject> = match &scope.namespace {
            Some(namespace) => Api::namespaced_with(client.clone(), namespace, &resource),
            None => Api::all_with(client.clone(), &resource),
        };
        let events = watcher(api, watcher::Config::default()).default_backoff();
        streams.push(events.map(move |event| (kind, event.map(|event| as_json(event, dynamic_json)))).boxed());
    }
    let mesh: Api<ConfigMap> = Api::namespaced(client, &scope.mesh_namespace);
    let events = watcher(mesh, watcher::Config::default().fields("metadata.name=istio")).default_backoff();
    streams.push(events.map(|event| ("ConfigMap", event.map(|event| as_json(event, config_map_json)))).boxed());

    let mut objects = Objects::new();
    let mut buffers = Objects::new();
    let mut listed: BTreeMap<&'static str, bool> = BTreeMap::new();
    let mut events = stream::select_all(streams);
    while let Some((kind, event)) = events.next().await {
        let change = match event {
            Ok(watcher::Event::Init) => Change::Reset(kind),
            Ok(watcher::Event::InitApply(object)) => Change::Buffer(kind, object),
            Ok(watcher::Event::InitDone) => Change::Commit(kind),
            Ok(watcher::Event::Apply(object)) => Change::Apply(kind, object),
            Ok(watcher::Event::Delete(object)) => Change::Delete(kind, object),
            Err(watcher::Error::InitialListFailed(kube::Error::Api(status))) if status.is_not_found() => {
                // No such resource type: the CRD is not installed, so there are none of them. Retried all the same.
                if listed.insert(kind, true).is_none() {
                    tracing::warn!(kind, "its CRD is not installed; reading none; retrying");
                    objects.insert(kind, BTreeMap::new());
                }
                Change::Commit(kind)
            }
            Err(error) => {
                tracing::warn!(kind, %error, "watching Kubernetes (is the RBAC granted?); retrying");
                continue;
            }
        };
        let changed = match change {
            Change::Reset(kind) => {
                buffers.insert(kind, BTreeMap::new());
                false
            }
            Change::Buffer(kind, object) => {
                let (key, object) = held(object);
                buffers.entry(kind).or_default().insert(key, object);
                false
            }
            Change::Commit(kind) => {
                // A relist (after a restart or 410 Gone) replaces the kind whole: what it lacks was deleted.
                if let Some(buffer) = buffers.remove(kind) {
                    objects.insert(kind, buffer);
                }
                listed.insert(kind, true);
                true
            }
            Change::Apply(kind, object) => {
                let (key, object) = held(object);
                objects.entry(kind).or_default().insert(key, object);
                true
            }
            Change::Delete(kind, object) => {
                objects.entry(kind).or_default().remove(&key(&object));
                true
            }
        };
        let synced = KINDS.iter().all(|(kind, _, _)| listed.contains_key(kind)) && listed.contains_key("ConfigMap");
        if changed && synced {
            let documents = Documents(objects.values().flat_map(BTreeMap::values).cloned().collect());
            // Read here for the rejections to report on the objects; the agent reads the set again itself, so
            // that nothing holds it parsed.
            rejections.report(&documents.load(), &objects).await;
            let _ = sender.send(Some(Arc::new(documents)));
        }
    }
}

/// Watches every pod until the task is dropped, publishing the workloads by pod IP after every change (once
/// listed).
pub async fn watch_pods(client: Client, workloads: Arc<KnownWorkloads>) {
    let pods: Api<Pod> = Api::all(client);
    let mut events = watcher(pods, watcher::Config::default()).default_backoff().boxed();
    let (mut known, mut buffer, mut listed): (
        BTreeMap<String, PodSummary>,
        Option<BTreeMap<String, PodSummary>>,
        bool,
    ) = (BTreeMap::new(), None, false);
    while let Some(event) = events.next().await {
        let changed = match event {
            Ok(watcher::Event::Init) => {
                buffer = Some(BTreeMap::new());
                false
            }
            Ok(watcher::Event::InitApply(pod)) => {
                if let (Some(buffer), Some((key, summary))) = (buffer.as_mut(), summarize(&pod)) {
                    buffer.insert(key, summary);
                }
                false
            }
            Ok(watcher::Event::InitDone) => {
                known = buffer.take().unwrap_or_default();
                listed = true;
                true
            }
            Ok(watcher::Event::Apply(pod)) => {
                let key = pod_key(&pod);
                match summarize(&pod) {
                    Some((key, summary)) => known.insert(key, summary),
                    None => known.remove(&key),
                };
                true
            }
            Ok(watcher::Event::Delete(pod)) => {
                known.remove(&pod_key(&pod));
                true
            }
            Err(error) => {
                tracing::warn!(kind = "Pod", %error, "watching Kubernetes (is the RBAC granted?); retrying");
                false
            }
        };
        if changed && listed {
            workloads.publish(Workloads::from_pods(known.values().cloned()));
        }
    }
}

/// Watches the Secrets of `namespace` (the gateway's: Istio reads a Gateway's `credentialName` there) and
/// publishes their certificate keys in `secrets` after every change, once listed.
pub async fn watch_secrets(client: Client, namespace: String, secrets: Arc<KnownSecrets>) {
    let api: Api<Secret> = Api::namespaced(client, &namespace);
    let mut events = watcher(api, watcher::Config::default()).default_backoff().boxed();
    let (mut known, mut buffer, mut listed) = (BTreeMap::new(), None::<BTreeMap<String, Arc<SecretData>>>, false);
    while let Some(event) = events.next().await {
        let changed = match event {
            Ok(watcher::Event::Init) => {
                buffer = Some(BTreeMap::new());
                false
            }
            Ok(watcher::Event::InitApply(secret)) => {
                if let (Some(buffer), Some((name, data))) = (buffer.as_mut(), certificate_keys(&secret)) {
                    buffer.insert(name, data);
                }
                false
            }
            Ok(watcher::Event::InitDone) => {
                known = buffer.take().unwrap_or_default();
                listed = true;
                true
            }
            Ok(watcher::Event::Apply(secret)) => {
                let name = secret.metadata.name.clone().unwrap_or_default();
                match certificate_keys(&secret) {
                    Some((name, data)) => known.insert(name, data),
                    None => known.remove(&name),
                };
                true
            }
            Ok(watcher::Event::Delete(secret)) => {
                known.remove(secret.metadata.name.as_deref().unwrap_or_default());
                true
            }
            Err(error) => {
                tracing::warn!(kind = "Secret", %namespace, %error, "watching Kubernetes (is the RBAC granted?); retrying");
                false
            }
        };
        if changed && listed {
            secrets.publish(known.clone());
        }
    }
}

/// The keys of a Secret that hold certificates and keys, as Istio reads them; `None` for a Secret with none
/// (service account tokens, passwords: not held).
fn certificate_keys(secret: &Secret) -> Option<(String, Arc<SecretData>)> {
    const KEYS: [&str; 6] = ["tls.crt", "tls.key", "ca.crt", "cert", "key", "cacert"];
    let data = secret.data.as_ref()?;
    let held: SecretData =
        KEYS.iter().filter_map(|key| data.get(*key).map(|bytes| ((*key).to_owned(), bytes.0.clone()))).collect();
    (!held.is_empty()).then(|| (secret.metadata.name.clone().unwrap_or_default(), Arc::new(held)))
}

type PodSummary = PodAddresses;

fn pod_key(pod: &Pod) -> String {
    format!("{}/{}", pod.metadata.namespace.as_deref().unwrap_or(""), pod.metadata.name.as_deref().unwrap_or(""))
}

/// A pod's addresses and workload; `None` for a pod without an address (pending, or on the host network, whose
/// address is its node's), and for one that has ended (`Succeeded`, `Failed`): its address may already be
/// another pod's, which must not inherit its Sidecar or `sourceLabels` routes.
fn summarize(pod: &Pod) -> Option<(String, PodSummary)> {
    let status = pod.status.as_ref()?;
    if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
        return None;
    }
    if pod.spec.as_ref().and_then(|spec| spec.host_network).unwrap_or(false) {
        return None;
    }
    let mut addresses: Vec<std::net::IpAddr> =
        status.pod_ips.iter().flatten().filter_map(|ip| ip.ip.parse().ok()).collect();
    if addresses.is_empty() {
        addresses.extend(status.pod_ip.as_deref().and_then(|ip| ip.parse::<std::net::IpAddr>().ok()));
    }
    if addresses.is_empty() {
        return None;
    }
    let labels: BTreeMap<String, String> = pod.metadata.labels.clone().unwrap_or_default();
    let name = labels.get("app").or(pod.metadata.name.as_ref()).map_or("", String::as_str).into();
    let namespace = pod.metadata.namespace.as_deref().unwrap_or_default().into();
    let workload = Workload { name, namespace, labels };
    let created = pod.metadata.creation_timestamp.as_ref().map_or(0, |time| time.0.as_second());
    Some((pod_key(pod), PodAddresses { addresses, workload, created }))
}

/// Publishes a Warning Event on each rejected resource, once per distinct reason, so `kubectl describe` shows it.
struct Rejections {
    recorder: Recorder,
    reported: HashSet<String>,
}

impl Rejections {
    fn new(client: Client) -> Rejections {
        let instance = std::env::var("POD_NAME").or_else(|_| std::env::var("HOSTNAME")).ok();
        let reporter = Reporter { controller: "sluice".into(), instance };
        Rejections { recorder: Recorder::new(client, reporter), reported: HashSet::new() }
    }

    async fn report(&mut self, loaded: &Loaded, objects: &Objects) {
        for error in &loaded.errors {
            let Some(id) = error.resource.as_deref() else { continue };
            let message = error.to_string();
            if self.reported.contains(&message) {
                continue;
            }
            let (kind, key) = id.split_once(' ').unwrap_or((id, ""));
            let object = objects.get(kind).and_then(|objects| objects.get(key));
            let Some(object) = object.and_then(|text| serde_json::from_str::<serde_json::Value>(text).ok()) else {
                continue;
            };
            let event = Event {
                type_: EventType::Warning,
                reason: "Rejected".into(),
                note: Some(if error.path.is_empty() {
                    error.reason.clone()
                } else {
                    format!("{}: {}", error.path, error.reason)
                }),
                action: "Validate".into(),
                secondary: None,
            };
            match self.recorder.publish(&event, &reference(&object)).await {
                Ok(()) => {
                    self.reported.insert(message);
                }
                Err(error) => tracing::warn!(resource = %id, %error, "publishing the rejection as a Kubernetes Event"),
            }
        }
    }
}

fn reference(object: &serde_json::Value) -> ObjectReference {
    let text = |value: &serde_json::Value| value.as_str().map(str::to_owned);
    let metadata = &object["metadata"];
    ObjectReference {
        api_version: text(&object["apiVersion"]),
        kind: text(&object["kind"]),
        name: text(&metadata["name"]),
        namespace: text(&metadata["namespace"]),
        uid: text(&metadata["uid"]),
        resource_version: text(&metadata["resourceVersion"]),
        ..ObjectReference::default()
    }
}

fn as_json<K>(event: watcher::Event<K>, json: fn(K) -> serde_json::Value) -> watcher::Event<serde_json::Value> {
    match event {
        watcher::Event::Apply(object) => watcher::Event::Apply(json(object)),
        watcher::Event::Delete(object) => watcher::Event::Delete(json(object)),
        watcher::Event::Init => watcher::Event::Init,
        watcher::Event::InitApply(object) => watcher::Event::InitApply(json(object)),
        watcher::Event::InitDone => watcher::Event::InitDone,
    }
}

fn key(object: &serde_json::Value) -> String {
    let metadata = &object["metadata"];
    format!("{}/{}", metadata["namespace"].as_str().unwrap_or(""), metadata["name"].as_str().unwrap_or(""))
}

/// The object as a document, with its apiVersion and kind (list items may come without them), and of its
/// metadata what names it.
fn dynamic_json(object: DynamicObject) -> serde_json::Value {
    let (api_version, kind) = match object.types {
        Some(types) => (types.api_version, Some(types.kind)),
        None => (format!("{ISTIO_GROUP}/{ISTIO_VERSION}"), None),
    };
    let mut document = serde_json::json!({"apiVersion": api_version, "metadata": metadata(&object.metadata)});
    if let Some(kind) = kind {
        document["kind"] = kind.into();
    }
    if let Some(spec) = object.data.get("spec") {
        document["spec"] = spec.clone();
    }
    document
}

fn config_map_json(object: ConfigMap) -> serde_json::Value {
    let metadata = metadata(&object.metadata);
    serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": object.data})
}

/// What Sluice reads of an object's metadata: its name, namespace and labels, and what an Event on it names.
fn metadata(metadata: &kube::api::ObjectMeta) -> serde_json::Value {
    let mut kept = serde_json::Map::new();
    let fields = [
        ("name", metadata.name.as_deref()),
        ("namespace", metadata.namespace.as_deref()),
        ("uid", metadata.uid.as_deref()),
        ("resourceVersion", metadata.resource_version.as_deref()),
    ];
    for (field, value) in fields {
        if let Some(value) = value {
            kept.insert(field.into(), value.into());
        }
    }
    if let Some(labels) = metadata.labels.as_ref().filter(|labels| !labels.is_empty()) {
        kept.insert("labels".into(), serde_json::to_value(labels).unwrap_or_default());
    }
    // Of the annotations, only the one Sluice reads (an AuthorizationPolicy's dry run).
    let dry_run = crate::config::authorization_policy::DRY_RUN;
    if let Some(value) = metadata.annotations.as_ref().and_then(|annotations| annotations.get(dry_run)) {
        kept.insert("annotations".into(), serde_json::json!({ dry_run: value }));
    }
    kept.into()
}

#[cfg(test)]
mod tests;
