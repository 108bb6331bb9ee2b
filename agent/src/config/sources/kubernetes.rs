//! The Kubernetes source: watchers on the five Istio kinds (all namespaces, or one) and on the mesh ConfigMap.
//! After every change the whole set is read again, through the same validation as files, and sent on.
//!
//! Objects are held as compact JSON of what Sluice reads of them (`apiVersion`, `kind`, the metadata it names
//! resources by, `spec`, the ConfigMap's `data`): not as parsed values, nor with the metadata the API server
//! adds (managed fields, `last-applied-configuration`), which would take several times the memory.

use std::collections::{BTreeMap, HashSet};

use futures_util::{stream, StreamExt};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{ConfigMap, ObjectReference, Pod};
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
use crate::config::workloads::{KnownWorkloads, PodAddresses, Workload, Workloads};

/// How errors from this source name it.
pub const SOURCE: &str = "kubernetes";
const ISTIO_GROUP: &str = "networking.istio.io";
const ISTIO_VERSION: &str = "v1";
/// Kind, and its plural as the API names its resources.
const KINDS: [(&str, &str); 5] = [
    ("ServiceEntry", "serviceentries"),
    ("VirtualService", "virtualservices"),
    ("Gateway", "gateways"),
    ("DestinationRule", "destinationrules"),
    ("Sidecar", "sidecars"),
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
    for (kind, plural) in KINDS {
        let resource =
            ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(ISTIO_GROUP, ISTIO_VERSION, kind), plural);
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
        let synced = KINDS.iter().all(|(kind, _)| listed.contains_key(kind)) && listed.contains_key("ConfigMap");
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
    kept.into()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http::{Request, Response, StatusCode};
    use kube::client::Body;
    use serde_json::{json, Value};

    use super::*;

    #[test]
    fn only_pods_that_have_not_ended_are_sources_and_they_carry_their_creation_time() {
        let pod = |phase: &str| -> Pod {
            serde_json::from_value(json!({
                "metadata": {"name": "web-1", "namespace": "shop", "labels": {"app": "web"},
                             "creationTimestamp": "2026-12-01T10:00:00Z"},
                "spec": {"containers": []},
                "status": {"phase": phase, "podIP": "10.0.0.7"}
            }))
            .unwrap()
        };
        let (_, running) = summarize(&pod("Running")).unwrap();
        assert_eq!(running.addresses, vec!["10.0.0.7".parse::<std::net::IpAddr>().unwrap()]);
        assert_eq!((&*running.workload.namespace, &*running.workload.name), ("shop", "web"));
        assert_eq!(running.created, 1_796_119_200, "2026-12-01T10:00:00Z");
        assert!(summarize(&pod("Pending")).is_some(), "a pod with an address may already send");
        assert!(summarize(&pod("Succeeded")).is_none(), "its address may be another pod's now");
        assert!(summarize(&pod("Failed")).is_none());
    }

    fn service_entry(name: &str, host: &str) -> Value {
        json!({
            "apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
            "metadata": {"name": name, "namespace": "default", "resourceVersion": "10"},
            "spec": {"hosts": [host], "ports": [{"number": 443, "name": "tls", "protocol": "TLS"}]}
        })
    }

    fn list(kind: &str, api_version: &str, items: Vec<Value>) -> Vec<u8> {
        let list =
            json!({"apiVersion": api_version, "kind": kind, "metadata": {"resourceVersion": "10"}, "items": items});
        serde_json::to_vec(&list).unwrap()
    }

    fn events(events: &[(&str, Value)]) -> Vec<u8> {
        let mut body = Vec::new();
        for (kind, object) in events {
            body.extend(serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap());
            body.push(b'\n');
        }
        body
    }

    /// Plays the API server: lists and watches as it sends them, a 410 Gone on the second ServiceEntry watch,
    /// and 404 for Sidecars (CRD not installed). Watches it has nothing more for are held open.
    async fn api_server(
        mut handle: tower_test::mock::Handle<Request<Body>, Response<Body>>,
        published: tokio::sync::mpsc::UnboundedSender<(String, Value)>,
    ) {
        let (mut lists, mut watches, mut held) = (0, 0, Vec::new());
        while let Some((request, send)) = handle.next_request().await {
            let uri = request.uri().to_string();
            let watching = uri.contains("watch=true");
            let (status, body) = if request.method() == http::Method::POST && uri.contains("/events") {
                let body = request.into_body().collect_bytes().await.unwrap();
                let event: Value = serde_json::from_slice(&body).unwrap();
                let _ = published.send((uri, event.clone()));
                (StatusCode::CREATED, serde_json::to_vec(&event).unwrap())
            } else if uri.contains("/serviceentries") && !watching {
                lists += 1;
                let items = if lists == 1 {
                    vec![service_entry("api", "api.example"), service_entry("broken", "*")]
                } else {
                    vec![service_entry("db", "db.example")]
                };
                (StatusCode::OK, list("ServiceEntryList", "networking.istio.io/v1", items))
            } else if uri.contains("/serviceentries") {
                watches += 1;
                match watches {
                    1 => (StatusCode::OK, events(&[("ADDED", service_entry("db", "db.example"))])),
                    2 => {
                        let gone = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                            "message": "too old resource version", "reason": "Expired", "code": 410});
                        (StatusCode::OK, events(&[("ERROR", gone)]))
                    }
                    _ => {
                        held.push(send);
                        continue;
                    }
                }
            } else if uri.contains("/sidecars") && !watching {
                let missing = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                    "message": "the server could not find the requested resource", "reason": "NotFound", "code": 404});
                (StatusCode::NOT_FOUND, serde_json::to_vec(&missing).unwrap())
            } else if uri.contains("/configmaps") && !watching {
                assert!(uri.contains("/namespaces/istio-system/"), "{uri}");
                let mesh = json!({"metadata": {"name": "istio", "namespace": "istio-system"},
                    "data": {"mesh": "outboundTrafficPolicy:\n  mode: REGISTRY_ONLY\n"}});
                (StatusCode::OK, list("ConfigMapList", "v1", vec![mesh]))
            } else if !watching {
                (StatusCode::OK, list("List", "networking.istio.io/v1", vec![]))
            } else {
                held.push(send);
                continue;
            };
            send.send_response(Response::builder().status(status).body(Body::from(body)).unwrap());
        }
    }

    fn names(loaded: &Loaded) -> Vec<String> {
        loaded.snapshot.resources.iter().map(|resource| resource.metadata.name.clone()).collect()
    }

    #[tokio::test]
    async fn istio_resources_are_listed_watched_validated_and_relisted_after_410_gone() {
        let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        tokio::spawn(api_server(handle, tokio::sync::mpsc::unbounded_channel().0));
        let client = Client::new(service, "default");
        let (sender, mut receiver) = watch::channel(None);
        let scope = Scope { namespace: None, mesh_namespace: "istio-system".into() };
        let task = tokio::spawn(watch(client, scope, sender));

        let mut seen = Vec::new();
        let outcome = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                receiver.changed().await.unwrap();
                let loaded = receiver.borrow_and_update().clone().unwrap().load();
                seen.push(names(&loaded));
                if names(&loaded) == ["db"] {
                    return loaded;
                }
            }
        })
        .await;
        task.abort();
        let last = outcome.unwrap_or_else(|_| panic!("never relisted to just db; saw {seen:?}"));

        // The channel keeps the latest set only, so intermediate sets may be skipped; their order may not.
        assert!(seen[0].contains(&"api".to_owned()), "the first list comes first: {seen:?}");
        assert!(seen.iter().all(|names| !names.contains(&"broken".to_owned())), "never the invalid one: {seen:?}");
        assert_eq!(last.snapshot.mesh.outbound_mode(), Some(crate::config::OutboundTrafficMode::RegistryOnly));
        assert!(last.errors.is_empty(), "after the relist the broken one is gone too");
    }

    #[tokio::test]
    async fn a_rejected_resource_is_reported_as_from_kubernetes_and_as_an_event_on_it() {
        let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let (published, mut events) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(api_server(handle, published));
        let (sender, mut receiver) = watch::channel(None);
        let scope = Scope { namespace: None, mesh_namespace: "istio-system".into() };
        let task = tokio::spawn(watch(Client::new(service, "default"), scope, sender));
        receiver.changed().await.unwrap();
        let loaded = receiver.borrow().clone().unwrap().load();
        task.abort();
        let errors: Vec<String> = loaded.errors.iter().map(ToString::to_string).collect();
        assert_eq!(
            errors,
            ["kubernetes: ServiceEntry default/broken: spec.hosts[0]: '*' is not allowed as a ServiceEntry host"]
        );

        // Published before the set was sent on, so it is already there.
        let (uri, event) = events.try_recv().expect("an Event on the rejected resource");
        assert!(uri.starts_with("/apis/events.k8s.io/v1/namespaces/default/events"), "{uri}");
        assert_eq!(event["type"], "Warning");
        assert_eq!(event["reason"], "Rejected");
        assert_eq!(event["note"], "spec.hosts[0]: '*' is not allowed as a ServiceEntry host");
        assert_eq!(event["regarding"]["kind"], "ServiceEntry");
        assert_eq!(event["regarding"]["name"], "broken");
        assert_eq!(event["reportingController"], "sluice");
    }

    /// Plays an API server whose RBAC forbids listing Gateways until the second try.
    async fn api_server_forbidding_gateways_once(mut handle: tower_test::mock::Handle<Request<Body>, Response<Body>>) {
        let (mut gateway_lists, mut held) = (0, Vec::new());
        while let Some((request, send)) = handle.next_request().await {
            let uri = request.uri().to_string();
            if uri.contains("watch=true") {
                held.push(send);
                continue;
            }
            let (status, body) = if uri.contains("/gateways") {
                gateway_lists += 1;
                if gateway_lists == 1 {
                    let forbidden = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Forbidden",
                        "message": "gateways.networking.istio.io is forbidden: User \"system:serviceaccount:sluice-system:sluice\" cannot list resource", "code": 403});
                    (StatusCode::FORBIDDEN, serde_json::to_vec(&forbidden).unwrap())
                } else {
                    let gateway = json!({"apiVersion": "networking.istio.io/v1", "kind": "Gateway",
                        "metadata": {"name": "egress", "namespace": "istio-system", "resourceVersion": "10"},
                        "spec": {"selector": {"istio": "egressgateway"},
                                 "servers": [{"port": {"number": 80, "name": "http", "protocol": "HTTP"}, "hosts": ["*"]}]}});
                    (StatusCode::OK, list("GatewayList", "networking.istio.io/v1", vec![gateway]))
                }
            } else {
                (StatusCode::OK, list("List", "networking.istio.io/v1", vec![]))
            };
            send.send_response(Response::builder().status(status).body(Body::from(body)).unwrap());
        }
    }

    #[tokio::test]
    async fn nothing_is_sent_on_while_rbac_forbids_a_kind_and_everything_once_it_is_listed() {
        let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        tokio::spawn(api_server_forbidding_gateways_once(handle));
        let (sender, mut receiver) = watch::channel(None);
        let scope = Scope { namespace: None, mesh_namespace: "istio-system".into() };
        let task = tokio::spawn(watch(Client::new(service, "default"), scope, sender));
        let first = tokio::time::timeout(Duration::from_secs(20), receiver.changed()).await;
        let loaded = receiver.borrow().clone();
        task.abort();
        assert!(first.is_ok(), "the Gateways were listed on the retry");
        // The first set sent (which makes the agent ready) already holds the kind that was forbidden.
        assert_eq!(names(&loaded.expect("a full set").load()), ["egress"]);
    }

    #[test]
    fn an_object_is_held_as_what_sluice_reads_of_it() {
        let object: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
            "metadata": {"name": "api", "namespace": "shop", "uid": "7", "resourceVersion": "10",
                "labels": {"team": "a"},
                "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{\"spec\": {}}"},
                "managedFields": [{"manager": "kubectl", "operation": "Apply", "fieldsV1": {"f:spec": {}}}]},
            "spec": {"hosts": ["api.example"], "ports": [{"number": 443, "name": "tls"}]},
            "status": {"validationMessages": []}
        }))
        .unwrap();
        let (key, text) = held(dynamic_json(object));
        assert_eq!(key, "shop/api");
        let value: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            value,
            json!({"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
                "metadata": {"name": "api", "namespace": "shop", "uid": "7", "resourceVersion": "10", "labels": {"team": "a"}},
                "spec": {"hosts": ["api.example"], "ports": [{"number": 443, "name": "tls"}]}})
        );
        let loaded = Documents(vec![text]).load();
        assert_eq!(names(&loaded), ["api"], "{:?}", loaded.errors);
    }

    #[tokio::test]
    async fn pods_become_workloads_by_address() {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Some((request, send)) = handle.next_request().await {
                if request.uri().to_string().contains("watch=true") {
                    held.push(send);
                    continue;
                }
                let pod = |name: &str, ip: &str, host_network: bool| {
                    json!({"metadata": {"name": name, "namespace": "shop", "labels": {"app": "cart", "version": "v2"}},
                           "spec": {"hostNetwork": host_network, "containers": []},
                           "status": {"podIP": ip, "podIPs": [{"ip": ip}, {"ip": "fd00::7"}]}})
                };
                let items = vec![pod("cart-1", "10.1.0.7", false), pod("node-agent", "192.0.2.1", true)];
                let body = list("PodList", "v1", items);
                send.send_response(Response::builder().status(StatusCode::OK).body(Body::from(body)).unwrap());
            }
        });
        let known = Arc::new(KnownWorkloads::default());
        let task = tokio::spawn(watch_pods(Client::new(service, "default"), known.clone()));
        tokio::time::timeout(Duration::from_secs(10), known.changed()).await.unwrap();
        let workloads = known.load();
        task.abort();
        let cart = workloads.get("10.1.0.7".parse().unwrap()).expect("the pod's IPv4 address");
        assert_eq!((&*cart.name, &*cart.namespace), ("cart", "shop"));
        assert_eq!(cart.labels.get("version").map(String::as_str), Some("v2"));
        assert!(workloads.get("fd00::7".parse().unwrap()).is_some(), "and its IPv6 address");
        assert!(workloads.get("192.0.2.1".parse().unwrap()).is_none(), "a host-network pod's address is its node's");
    }
}
