//! Tests of kubernetes.

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
    let list = json!({"apiVersion": api_version, "kind": kind, "metadata": {"resourceVersion": "10"}, "items": items});
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
